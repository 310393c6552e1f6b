//! Writing the repository: the agent's side (the restore tool only reads).
//!
//! A put returns once the object is durable: a local repository's object is
//! written to a staging name, fsynced, renamed and its directory fsynced
//! (`durable::put_object_file`); a remote store's PUT (or
//! CompleteMultipartUpload) is durable when it answers.

use crate::durable::fsync_file_and_dir;
use crate::error::RepoError;
use crate::store::Repository;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::PutPayload;
use tidemark_proto::repo::layout::{RepositoryMeta, META_KEY};
use tidemark_proto::repo::seal;

/// Objects larger than this go to a remote store in parts (S3's smallest
/// part is 5 MiB; WAL segments that do not compress well exceed this).
const MULTIPART_THRESHOLD: usize = 8 << 20;
const MULTIPART_PART_SIZE: usize = 5 << 20;

impl Repository {
    /// Stores a frame and returns once it is durable. In an encrypted
    /// repository it is sealed first, bound to `key`.
    pub async fn put(&self, key: &str, frame: Vec<u8>) -> Result<(), RepoError> {
        let bytes = self.seal(key, frame).await?;
        self.put_stored(key, bytes).await
    }

    async fn seal(&self, key: &str, frame: Vec<u8>) -> Result<Vec<u8>, RepoError> {
        if key == META_KEY {
            return Ok(frame);
        }
        let Some(keyring) = self.keyring().await? else { return Ok(frame) };
        let current = keyring
            .current
            .as_ref()
            .ok_or_else(|| RepoError::Keys(format!("no current key to seal {key} with: pass it with --key-file")))?;
        let mut nonce = [0u8; seal::NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| RepoError::Local {
            context: "draw a random nonce".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        seal::seal(current, keyring.binding.as_ref(), key, &frame, nonce)
            .map_err(|e| RepoError::Keys(format!("seal {key}: {e}")))
    }

    /// Stores bytes exactly as given (already sealed, or plain metadata).
    async fn put_stored(&self, key: &str, bytes: Vec<u8>) -> Result<(), RepoError> {
        if let Some(root) = &self.local_root {
            // Locally the object is written, fsynced and only then renamed
            // into place, in one blocking call: object_store's local put
            // renames first and would need a second pass to fsync.
            let file = root.join(key);
            let stored = tokio::task::spawn_blocking(move || crate::durable::put_object_file(&file, &bytes))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            return stored.map_err(|source| RepoError::Local { context: format!("store object {key}"), source });
        }
        let path = ObjectPath::from(key);
        let context = || format!("store object {key} in {}", self.display);
        if bytes.len() > MULTIPART_THRESHOLD {
            return self.put_multipart(&path, bytes).await.map_err(|e| RepoError::store(context(), e));
        }
        self.store
            .put(&path, PutPayload::from(Bytes::from(bytes)))
            .await
            .map_err(|e| RepoError::store(context(), e))?;
        Ok(())
    }

    /// A large object in parts. The object appears only when the upload is
    /// completed, so it is absent or whole; a failed upload is aborted so its
    /// parts do not linger (and cost) in the bucket.
    async fn put_multipart(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<(), object_store::Error> {
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
                Err(e)
            }
        }
    }

    /// Stores a frame only if no object has the key (a conditional put:
    /// `If-None-Match: *` on S3, a hard link locally); false if one has.
    /// Small objects only (leases, claims): never multipart.
    pub async fn put_new(&self, key: &str, frame: Vec<u8>) -> Result<bool, RepoError> {
        let bytes = self.seal(key, frame).await?;
        let options = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
        match self.store.put_opts(&ObjectPath::from(key), PutPayload::from(Bytes::from(bytes)), options).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                return Ok(false)
            }
            Err(e) => return Err(RepoError::store(format!("create object {key} in {}", self.display), e)),
        }
        if let Some(root) = &self.local_root {
            let file = root.join(key);
            let synced = tokio::task::spawn_blocking(move || fsync_file_and_dir(&file))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            synced.map_err(|source| RepoError::Local { context: format!("fsync object {key}"), source })?;
        }
        Ok(true)
    }

    /// This handle never deletes: for credentials that cannot (the agent's
    /// no-delete mode), so not even an attempt reaches the store.
    pub fn forbid_deletes(mut self) -> Repository {
        self.deletes_allowed = false;
        self
    }

    pub fn may_delete(&self) -> bool {
        self.deletes_allowed
    }

    /// Deletes an object; a missing one is fine.
    pub async fn delete(&self, key: &str) -> Result<(), RepoError> {
        if !self.deletes_allowed {
            return Err(RepoError::NoDelete(key.to_string()));
        }
        // A staging file a killed put left in a local repository (`name#N`)
        // is no object to the store (its paths refuse that form): remove
        // the file itself.
        if let Some(root) = self.local_root.as_ref().filter(|_| key.contains('#') && !key.split('/').any(|p| p == ".."))
        {
            let path = root.join(key);
            let removed = tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            return removed.map_err(|source| RepoError::Local { context: format!("remove {key}"), source });
        }
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(RepoError::store(format!("delete object {key} from {}", self.display), e)),
        }
    }

    /// Deletes every object under `prefix` (a directory-like prefix). On a
    /// local repository the directory goes too, with any staging files
    /// (`name#N`) a killed put left behind, which listing never shows.
    pub async fn remove_prefix(&self, prefix: &str) -> Result<(), RepoError> {
        if !self.deletes_allowed {
            return Err(RepoError::NoDelete(prefix.to_string()));
        }
        for key in self.list(prefix).await? {
            self.delete(&key).await?;
        }
        if let Some(root) = &self.local_root {
            let dir = root.join(prefix);
            let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            removed.map_err(|source| RepoError::Local { context: format!("remove {prefix}"), source })?;
        }
        Ok(())
    }

    /// For a local repository, whether this user can write its directory:
    /// a probe file is created there exclusively and removed at once, so
    /// `init` finds out before it creates anything. A remote store is not
    /// probed: a probe object would need a delete, which the roles without
    /// one cannot make (`init` then undoes what it did when the write fails).
    pub async fn check_local_writable(&self) -> Result<(), RepoError> {
        let Some(root) = self.local_root.clone() else { return Ok(()) };
        let probe = root.join(format!(".tidemark-probe.{}", std::process::id()));
        let display = self.display.clone();
        let probed = tokio::task::spawn_blocking(move || {
            crate::durable::create_exclusive(&probe)?;
            std::fs::remove_file(&probe)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        probed.map_err(|source| RepoError::Local { context: format!("cannot write repository {display}"), source })
    }

    pub async fn write_meta(&self, meta: &RepositoryMeta) -> Result<(), RepoError> {
        let json = meta.to_json().map_err(|e| RepoError::corrupt(META_KEY, format!("cannot be written: {e}")))?;
        self.put_stored(META_KEY, json).await
    }

    /// Signs `meta` with every key this handle holds and `more` (a key
    /// being added), checks it by the readers' own rules, writes it and
    /// remembers it. A plain repository's is written as it is.
    pub async fn write_signed_meta(&self, meta: &mut RepositoryMeta, more: &[seal::Key]) -> Result<(), RepoError> {
        if meta.encryption.is_some() && !meta.is_unauthenticated() {
            let mut keys = self.held_keys().await?;
            keys.extend(more.iter().filter(|k| !keys.iter().any(|held| held.id == k.id)).cloned().collect::<Vec<_>>());
            meta.sign(&keys).map_err(|e| RepoError::corrupt(META_KEY, format!("cannot be signed: {e}")))?;
        }
        let json = meta.to_json().map_err(|e| RepoError::corrupt(META_KEY, format!("cannot be written: {e}")))?;
        RepositoryMeta::from_json(&json).map_err(|e| RepoError::corrupt(META_KEY, format!("would be refused: {e}")))?;
        self.put_stored(META_KEY, json).await?;
        self.remember(meta);
        Ok(())
    }

    /// Re-seals one object under the current key; false if the object is
    /// gone (superseded meanwhile).
    pub async fn reseal(&self, key: &str) -> Result<bool, RepoError> {
        let Some(frame) = self.get_frame(key).await? else { return Ok(false) };
        self.put(key, frame.to_vec()).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Create, Repository};
    use std::os::unix::fs::PermissionsExt;
    use tidemark_proto::repo::frame::{self, Compression};

    #[tokio::test]
    async fn local_put_get_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/repo", dir.path().display());
        assert!(Repository::open(&url, &[], Create::No).is_err());
        let repo = Repository::open(&url, &[], Create::Yes).expect("open").with_keyring(None);
        let key = "wal/00000001/x";
        let (framed, _) = frame::encode(b"abc", Compression::Zstd { level: 3 }).expect("frame");
        repo.put(key, framed.clone()).await.expect("put");
        assert_eq!(repo.get_frame(key).await.expect("get").as_deref(), Some(&framed[..]));
        assert_eq!(repo.get(key).await.expect("get").as_deref(), Some(&b"abc"[..]));
        assert!(repo.exists(key).await.expect("exists"));
        let mode = std::fs::metadata(dir.path().join("repo").join(key)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "objects are owner-only");
        repo.delete(key).await.expect("delete");
        repo.delete(key).await.expect("delete again");
        assert_eq!(repo.get(key).await.expect("get"), None);
        assert!(!repo.exists(key).await.expect("exists"));
    }

    #[tokio::test]
    async fn staging_files_a_killed_put_left_are_found_and_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/repo", dir.path().display());
        let repo = Repository::open(&url, &[], Create::Yes).expect("open").with_keyring(None);
        let chunks = dir.path().join("repo/backups/B/chunks");
        std::fs::create_dir_all(&chunks).expect("mkdir");
        std::fs::write(chunks.join("00000098#1"), b"half a chunk").expect("write");
        let found: Vec<String> = repo.local_staging_files().into_iter().map(|o| o.key).collect();
        assert_eq!(found, vec!["backups/B/chunks/00000098#1".to_string()]);
        repo.delete(&found[0]).await.expect("delete");
        assert!(!chunks.join("00000098#1").exists(), "the staging file is gone");
        assert!(repo.local_staging_files().is_empty());
        repo.delete(&found[0]).await.expect("delete again");
    }
}
