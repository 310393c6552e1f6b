//! The repository as an object store: `file://` (the default) or `s3://`.
//!
//! In an encrypted repository every object but `repository.json` is sealed
//! here, on the way in, and opened here on the way out (see
//! `tidemark_proto::repo::seal`), so the rest of the agent handles frames only.
//!
//! object_store's local backend writes to a staging name and renames, but
//! does not fsync. A put here on a local repository therefore fsyncs the file
//! and its directory afterwards: only then is the object durable, and only
//! then do we record it as archived.

use crate::fail::Fail;
use anyhow::Context;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use tidemark_proto::repo::layout::{RepositoryMeta, META_KEY};
use tidemark_proto::repo::seal::{self, KeyMaterial, Keyring};

/// Objects larger than this go to a remote store in parts (S3's smallest
/// part is 5 MiB; WAL segments that do not compress well exceed this).
const MULTIPART_THRESHOLD: usize = 8 << 20;
const MULTIPART_PART_SIZE: usize = 5 << 20;

#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// Set for a local directory, whose objects we fsync ourselves.
    local_root: Option<PathBuf>,
    /// The URL without credentials, for messages.
    pub display: String,
    /// Set when the repository is encrypted.
    keyring: Option<Arc<Keyring>>,
}

/// Reads key files (`--key-file`), refusing unreadable or malformed ones.
pub fn read_key_files(paths: &[PathBuf]) -> Result<Vec<(String, KeyMaterial)>, Fail> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path.display().to_string();
        let contents = std::fs::read(path).map_err(|e| {
            Fail::new(format!("cannot read key file {name}: {e}"), "check --key-file / TIDEMARK_KEY_FILE")
        })?;
        if let Ok(metadata) = std::fs::metadata(path) {
            if metadata.permissions().mode() & 0o077 != 0 {
                tracing::warn!("key file {name} can be read by others; chmod 0600 it");
            }
        }
        let material = KeyMaterial::parse(&contents).map_err(|e| {
            Fail::new(format!("key file {name}: {e}"), "create a key with `tidemark-agent keygen PATH`")
        })?;
        out.push((name, material));
    }
    Ok(out)
}

/// The keys for `meta`'s repository from the given key files: none for a
/// plain repository, every given one checked for an encrypted one.
pub fn unlock(meta: &RepositoryMeta, display: &str, key_files: &[PathBuf]) -> Result<Option<Arc<Keyring>>, Fail> {
    match (&meta.encryption, key_files.is_empty()) {
        (None, true) => Ok(None),
        (None, false) => Err(Fail::new(
            format!("repository {display} is not encrypted, but a key file was given"),
            "drop --key-file / TIDEMARK_KEY_FILE, or check --repo",
        )),
        (Some(_), true) => Err(Fail::new(
            format!("repository {display} is encrypted"),
            "pass its key with --key-file PATH (or TIDEMARK_KEY_FILE)",
        )),
        (Some(encryption), false) => {
            let materials = read_key_files(key_files)?;
            let keyring = Keyring::unlock(encryption, &materials)
                .map_err(|e| Fail::new(format!("wrong key for repository {display}: {e}"), "check --key-file"))?;
            Ok(Some(Arc::new(keyring)))
        }
    }
}

/// A local path or `file://` URL as a directory path.
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    if url.contains("://") {
        return None;
    }
    Some(PathBuf::from(url))
}

pub use tidemark_proto::repo::redact_url;

impl Repository {
    /// Opens a repository. With `create`, a missing local directory is made
    /// (owner-only); without it, a missing one is an error.
    pub fn open(url: &str, create: bool) -> Result<Repository, anyhow::Error> {
        let display = redact_url(url);
        if let Some(dir) = local_path(url) {
            if create {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| {
                    Fail::new(
                        format!("cannot create repository directory {}: {e}", dir.display()),
                        "check --repo and the permissions of its parent",
                    )
                })?;
            } else if !dir.is_dir() {
                return Err(Fail::new(
                    format!("repository {} does not exist", dir.display()),
                    "check --repo, or create it with `tidemark-agent init`",
                )
                .into());
            }
            let root = dir.canonicalize().with_context(|| format!("resolve repository path {}", dir.display()))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&root)
                .with_context(|| format!("open repository {}", root.display()))?;
            return Ok(Repository { store: Arc::new(store), local_root: Some(root), display, keyring: None });
        }
        if let Some(store) = tidemark_proto::repo::remote::open(url) {
            let store = store.map_err(|e| {
                Fail::new(
                    format!("cannot use repository {display}: {e}"),
                    "check the URL and the AWS_* (GOOGLE_*, AZURE_*) variables",
                )
            })?;
            return Ok(Repository { store, local_root: None, display, keyring: None });
        }
        Err(Fail::new(
            format!("unsupported repository URL {display}"),
            "use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
        )
        .into())
    }

    /// Opens an initialized repository with its keys: refuses a missing
    /// `repository.json`, a wrong key, and (for writers) a missing current key.
    pub async fn open_initialized(
        url: &str,
        key_files: &[PathBuf],
        writes: bool,
    ) -> anyhow::Result<(Repository, RepositoryMeta)> {
        let mut repo = Repository::open(url, false)?;
        let meta = repo.read_meta().await?.ok_or_else(|| {
            Fail::new(
                format!("repository {} is not initialized", repo.display),
                "run `tidemark-agent init` with the same --repo first",
            )
        })?;
        repo.keyring = unlock(&meta, &repo.display, key_files)?;
        if let (true, Some(keyring), Some(encryption)) = (writes, &repo.keyring, &meta.encryption) {
            if keyring.current.is_none() {
                return Err(Fail::new(
                    format!(
                        "new objects in {} are sealed with key {}, which was not given",
                        repo.display, encryption.current_key
                    ),
                    "pass the current key's file with --key-file (give old keys too to read old objects)",
                )
                .into());
            }
        }
        Ok((repo, meta))
    }

    /// Uses these keys from now on (init of a new encrypted repository, rotate-key).
    pub fn set_keyring(&mut self, keyring: Option<Arc<Keyring>>) {
        self.keyring = keyring;
    }

    /// Stores an object and returns once it is durable. In an encrypted
    /// repository the bytes are sealed first, bound to `key`.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let bytes = self.seal(key, bytes)?;
        self.put_stored(key, bytes).await
    }

    fn seal(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let Some(keyring) = &self.keyring else { return Ok(bytes) };
        if key == META_KEY {
            return Ok(bytes);
        }
        let current = keyring.current.as_ref().context("no current key to seal new objects with")?;
        let mut nonce = [0u8; seal::NONCE_LEN];
        getrandom::getrandom(&mut nonce).context("draw a random nonce")?;
        Ok(seal::seal(current, key, &bytes, nonce)?)
    }

    /// The stored bytes of `key` opened: sealed objects must be sealed (and
    /// authentic) in an encrypted repository and must not appear in a plain one.
    fn unseal(&self, key: &str, stored: Bytes) -> anyhow::Result<Bytes> {
        if key == META_KEY {
            return Ok(stored);
        }
        match (&self.keyring, seal::is_sealed(&stored)) {
            (None, false) => Ok(stored),
            (None, true) => Err(Fail::new(
                format!("object {key} is encrypted, but repository.json says the repository is not"),
                "repository.json was altered or replaced; restore it from a copy",
            )
            .into()),
            (Some(_), false) => Err(Fail::new(
                format!("object {key} is not encrypted, but the repository is: refusing it"),
                "the object was replaced by someone without the key; restore it from a copy",
            )
            .into()),
            (Some(keyring), true) => match seal::open(&keyring.keys, key, &stored) {
                Ok(frame) => Ok(Bytes::from(frame)),
                Err(e @ seal::SealError::MissingKey(_)) => Err(Fail::new(
                    format!("object {key}: {e}"),
                    "pass every key the repository's objects use with --key-file",
                )
                .into()),
                Err(e) => Err(Fail::new(format!("object {key} {e}"), "restore the object from a copy").into()),
            },
        }
    }

    /// Stores bytes exactly as given (already sealed, or plain metadata).
    async fn put_stored(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let path = ObjectPath::from(key);
        if self.local_root.is_none() && bytes.len() > MULTIPART_THRESHOLD {
            return self
                .put_multipart(&path, bytes)
                .await
                .with_context(|| format!("store object {key} in {}", self.display));
        }
        self.store
            .put(&path, PutPayload::from(Bytes::from(bytes)))
            .await
            .with_context(|| format!("store object {key} in {}", self.display))?;
        if let Some(root) = &self.local_root {
            let file = root.join(key);
            tokio::task::spawn_blocking(move || fsync_file_and_dir(&file))
                .await
                .context("join fsync task")?
                .with_context(|| format!("fsync object {key}"))?;
        }
        Ok(())
    }

    /// A large object in parts. The object appears only when the upload is
    /// completed, so it is absent or whole; a failed upload is aborted so its
    /// parts do not linger (and cost) in the bucket.
    async fn put_multipart(&self, path: &ObjectPath, bytes: Vec<u8>) -> anyhow::Result<()> {
        let bytes = Bytes::from(bytes);
        let mut upload = self.store.put_multipart(path).await?;
        let parts = bytes.len().div_ceil(MULTIPART_PART_SIZE);
        let result = async {
            for n in 0..parts {
                let part = bytes.slice(n * MULTIPART_PART_SIZE..((n + 1) * MULTIPART_PART_SIZE).min(bytes.len()));
                upload.put_part(PutPayload::from(part)).await?;
            }
            upload.complete().await
        }
        .await;
        match result {
            Ok(_) => {
                tracing::info!(object = %path, parts, "stored in a multipart upload");
                Ok(())
            }
            Err(e) => {
                let _ = upload.abort().await;
                Err(e.into())
            }
        }
    }

    /// The object's bytes (opened, if sealed), or `None` if there is no such object.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        match self.get_stored(key).await? {
            Some(stored) => Ok(Some(self.unseal(key, stored)?)),
            None => Ok(None),
        }
    }

    /// The stored bytes, sealed or not.
    pub async fn get_stored(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        match self.store.get(&ObjectPath::from(key)).await {
            Ok(result) => Ok(Some(result.bytes().await.with_context(|| format!("read object {key}"))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("read object {key} from {}", self.display))),
        }
    }

    /// Keys of every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(prefix);
        let objects: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("list {prefix} in {}", self.display))?;
        Ok(objects.into_iter().map(|o| o.location.to_string()).collect())
    }

    /// Deletes every object under `prefix` (a directory-like prefix). On a
    /// local repository the directory goes too, with any staging files
    /// (`name#N`) a killed put left behind, which listing never shows.
    pub async fn remove_prefix(&self, prefix: &str) -> anyhow::Result<()> {
        for key in self.list(prefix).await? {
            self.delete(&key).await?;
        }
        if let Some(root) = &self.local_root {
            let dir = root.join(prefix);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("remove {}", dir.display())),
            }
        }
        Ok(())
    }

    /// Deletes an object; a missing one is fine.
    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("delete object {key}"))),
        }
    }

    pub async fn read_meta(&self) -> anyhow::Result<Option<RepositoryMeta>> {
        let Some(bytes) = self.get(META_KEY).await? else { return Ok(None) };
        let meta = RepositoryMeta::from_json(&bytes).map_err(|e| {
            Fail::new(format!("{META_KEY} in {} is unreadable: {e}", self.display), "is --repo a Tidemark repository?")
        })?;
        Ok(Some(meta))
    }

    pub async fn write_meta(&self, meta: &RepositoryMeta) -> anyhow::Result<()> {
        self.put_stored(META_KEY, meta.to_json()).await
    }

    /// The key id in a stored object's header, reading only the header;
    /// `None` for an object that is not sealed.
    pub async fn sealed_key_id(&self, key: &str) -> anyhow::Result<Option<seal::KeyId>> {
        let header = self
            .store
            .get_range(&ObjectPath::from(key), 0..16)
            .await
            .with_context(|| format!("read the header of {key}"))?;
        Ok(seal::sealed_key_id(&header).ok())
    }

    /// Re-seals one object under the current key; returns false if the
    /// object is gone (superseded meanwhile).
    pub async fn reseal(&self, key: &str) -> anyhow::Result<bool> {
        let Some(frame) = self.get(key).await? else { return Ok(false) };
        self.put(key, frame.to_vec()).await?;
        Ok(true)
    }
}

fn fsync_file_and_dir(file: &std::path::Path) -> std::io::Result<()> {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    std::fs::File::open(file)?.sync_all()?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_put_get_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/repo", dir.path().display());
        assert!(Repository::open(&url, false).is_err());
        let repo = Repository::open(&url, true).expect("open");
        repo.put("wal/00000001/x", b"abc".to_vec()).await.expect("put");
        assert_eq!(repo.get("wal/00000001/x").await.expect("get").as_deref(), Some(&b"abc"[..]));
        let mode = std::fs::metadata(dir.path().join("repo/wal/00000001/x")).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "objects are owner-only");
        repo.delete("wal/00000001/x").await.expect("delete");
        repo.delete("wal/00000001/x").await.expect("delete again");
        assert_eq!(repo.get("wal/00000001/x").await.expect("get"), None);
    }
}
