//! The repository as an object store: `file://` (the default) or `s3://`,
//! `gs://`, `az://` (see [`crate::remote`]). Reading, for both binaries.
//!
//! In an encrypted repository every object but `repository.json` is sealed
//! (see `tidemark_proto::repo::seal`); objects are opened here, so callers
//! see frames ([`Repository::get_frame`]) or contents ([`Repository::get`]).
//! Key files are read when the repository is opened, but the keys are
//! derived and checked against `repository.json` on the first object read,
//! so `wal-get` serving a staged segment never pays for a passphrase's key
//! derivation. Writing is in [`crate::write`].
//!
//! Unlocking also authenticates `repository.json` (its tags, with the keys
//! given) and compares it with what this machine remembers of it
//! ([`crate::trust`]) before any key is derived.

use crate::error::RepoError;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_proto::repo::frame::{self, FrameInfo};
use tidemark_proto::repo::layout::{RepositoryMeta, META_KEY};
use tidemark_proto::repo::seal::{self, Key, KeyMaterial, Keyring};
use tokio::sync::OnceCell;

#[derive(Clone)]
pub struct Repository {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// Set for a local directory, whose objects are fsynced after each put.
    pub(crate) local_root: Option<PathBuf>,
    /// The URL without credentials, for messages.
    pub display: String,
    /// The key files as given (absolute paths go into restore_command).
    pub key_files: Vec<PathBuf>,
    /// The key files' contents: (file name, material).
    key_material: Arc<Vec<(String, KeyMaterial)>>,
    /// The checked keys, once `repository.json` has been read: `None` for a
    /// plain repository. Shared by clones.
    keyring: Arc<OnceCell<Option<Arc<Keyring>>>>,
    /// False when the credentials must not delete (the agent's no-delete
    /// mode): every delete is then refused here, before the store is asked.
    pub(crate) deletes_allowed: bool,
    /// Where this machine remembers the repository's keys (see
    /// [`crate::trust`]); `None`: nothing remembered.
    memory: Option<PathBuf>,
}

/// An object as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub bytes: u64,
    pub modified: time::OffsetDateTime,
}

/// Whether opening may create a missing local directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    Yes,
    No,
}

/// Reads key files (`--key-file`), refusing unreadable or malformed ones,
/// and ones group or others may access (as libpq refuses such a
/// `~/.pgpass`): a key others can read is no longer a secret, and a
/// warning in a log nobody reads would not say so in time.
pub fn read_key_files(paths: &[PathBuf]) -> Result<Vec<(String, KeyMaterial)>, RepoError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path.display().to_string();
        let unreadable = |e: std::io::Error| RepoError::Keys(format!("cannot read key file {name}: {e}"));
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        // The mode of the file opened, so it cannot change between the check and the read.
        let mode = file.metadata().map_err(unreadable)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(RepoError::KeyFileExposed(format!(
                "key file {name} may be accessed by group or others (mode {:04o})",
                mode & 0o7777
            )));
        }
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).map_err(unreadable)?;
        let material = KeyMaterial::parse(&contents).map_err(|e| {
            RepoError::Keys(format!("key file {name}: {e} (create a key with `tidemark-agent keygen PATH`)"))
        })?;
        out.push((name, material));
    }
    Ok(out)
}

/// The keys for `meta`'s repository from the given key material: none for a
/// plain repository, every given one checked for an encrypted one, and
/// `repository.json` authenticated with them.
pub fn unlock(
    meta: &RepositoryMeta,
    display: &str,
    material: &[(String, KeyMaterial)],
) -> Result<Option<Arc<Keyring>>, RepoError> {
    match (&meta.encryption, material.is_empty()) {
        (None, true) => Ok(None),
        (None, false) => {
            Err(RepoError::Keys(format!("repository {display} is not encrypted, but a key file was given")))
        }
        (Some(_), true) => Err(RepoError::Keys(format!(
            "repository {display} is encrypted: pass its key with --key-file PATH (or TIDEMARK_KEY_FILE)"
        ))),
        (Some(encryption), false) => {
            let mut keyring = Keyring::unlock(encryption, material)
                .map_err(|e| RepoError::Keys(format!("wrong key for repository {display}: {e}")))?;
            meta.authenticate(&keyring.keys).map_err(|e| RepoError::Metadata(format!("{display}: {e}")))?;
            keyring.binding = meta.binding();
            Ok(Some(Arc::new(keyring)))
        }
    }
}

/// A local path or `file://` URL as a directory path; `None` for other schemes.
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    (!url.contains("://")).then(|| PathBuf::from(url))
}

/// A repository URL with any user name or password removed, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

fn local_store(dir: &Path, display: &str, create: Create) -> Result<(Arc<dyn ObjectStore>, PathBuf), RepoError> {
    let local = |context: String| move |source| RepoError::Local { context, source };
    if create == Create::Yes {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(local(format!("cannot create repository directory {}", dir.display())))?;
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(RepoError::NotADirectory(display.to_string())),
        Err(_) => return Err(RepoError::NoRepository(display.to_string())),
    }
    let root = dir.canonicalize().map_err(local(format!("resolve repository path {}", dir.display())))?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(&root)
        .map_err(|source| RepoError::Configuration { display: display.to_string(), source })?;
    Ok((Arc::new(store), root))
}

impl Repository {
    /// Opens a repository and reads the key files given for it. A local
    /// directory must exist, unless `create` (then it is made, owner-only).
    pub fn open(url: &str, key_files: &[PathBuf], create: Create) -> Result<Repository, RepoError> {
        let display = redact_url(url);
        let (store, local_root) = if let Some(dir) = local_path(url) {
            let (store, root) = local_store(&dir, &display, create)?;
            (store, Some(root))
        } else if let Some(store) = crate::remote::open(url) {
            (store.map_err(|source| RepoError::Configuration { display: display.clone(), source })?, None)
        } else {
            return Err(RepoError::UnsupportedUrl(display));
        };
        Ok(Repository {
            store,
            local_root,
            display,
            key_files: key_files.to_vec(),
            key_material: Arc::new(read_key_files(key_files)?),
            keyring: Arc::new(OnceCell::new()),
            deletes_allowed: true,
            memory: None,
        })
    }

    /// Remembers this repository's keys in `path` (the agent's state
    /// directory) and refuses a `repository.json` that goes backwards.
    pub fn remembering(mut self, path: PathBuf) -> Repository {
        self.memory = Some(path);
        self
    }

    /// Remembers this repository's keys in the user's state directory (the
    /// restore tool, which has no other), one file per location.
    pub fn remembering_for_user(self) -> Repository {
        let location = match &self.local_root {
            Some(root) => format!("file://{}", root.display()),
            None => self.display.clone(),
        };
        match crate::trust::user_memory_file(&location) {
            Some(path) => self.remembering(path),
            None => self,
        }
    }

    /// Opens an initialized repository and checks its keys now: refuses a
    /// missing `repository.json`, a wrong key, and (for a writer) a missing
    /// current key.
    pub async fn open_initialized(
        url: &str,
        key_files: &[PathBuf],
        writes: bool,
    ) -> Result<(Repository, RepositoryMeta), RepoError> {
        Repository::open(url, key_files, Create::No)?.initialized(writes).await
    }

    /// Reads `repository.json` and checks the keys now, as
    /// [`Repository::open_initialized`] does, on a handle already open. A
    /// writer (`writes`) brings an encrypted repository of the older
    /// unauthenticated form to the current one first.
    pub async fn initialized(self, writes: bool) -> Result<(Repository, RepositoryMeta), RepoError> {
        let meta = self.meta().await?;
        self.unlock_with(&meta)?;
        let keyring = self.keyring().await?;
        if let (true, Some(keyring), Some(encryption)) = (writes, keyring, &meta.encryption) {
            if keyring.current.is_none() {
                return Err(RepoError::Keys(format!(
                    "new objects in {} are sealed with key {}, which was not given: pass the current key's file with --key-file (old keys too, to read old objects)",
                    self.display, encryption.current_key
                )));
            }
        }
        if writes {
            return self.upgrade_if_older(meta).await;
        }
        Ok((self, meta))
    }

    /// An encrypted repository of the older unauthenticated form, opened by
    /// a writer with its keys: given an id and signed, so from now on its
    /// metadata is authenticated and its new objects bound to it (older
    /// objects stay readable until `reencrypt`). Anything else is returned as is.
    pub async fn upgrade_if_older(self, mut meta: RepositoryMeta) -> Result<(Repository, RepositoryMeta), RepoError> {
        // Only with the current key: readers holding it require its tag.
        let older = meta.is_unauthenticated();
        let Some(keyring) = self.keyring().await?.cloned().filter(|k| older && k.current.is_some()) else {
            return Ok((self, meta));
        };
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(|e| RepoError::Local {
            context: "draw a random repository id".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        meta.upgrade(seal::hex_encode(&id));
        self.write_signed_meta(&mut meta, &[]).await?;
        tracing::info!("repository.json of {} now authenticated (format {})", self.display, meta.format_version);
        let keyring = Keyring { binding: meta.binding(), ..keyring.as_ref().clone() };
        let repo = self.with_keyring(Some(Arc::new(keyring)));
        Ok((repo, meta))
    }

    /// The keys this handle holds (none for a plain repository).
    pub(crate) async fn held_keys(&self) -> Result<Vec<Key>, RepoError> {
        Ok(self.keyring().await?.map(|k| k.keys.clone()).unwrap_or_default())
    }

    /// Uses these keys from now on (a new encrypted repository, a rotation).
    pub fn with_keyring(mut self, keyring: Option<Arc<Keyring>>) -> Repository {
        self.keyring = Arc::new(OnceCell::new_with(Some(keyring)));
        self
    }

    /// The keys, checked against `repository.json` (once).
    pub(crate) async fn keyring(&self) -> Result<Option<&Arc<Keyring>>, RepoError> {
        let keyring = self.keyring.get_or_try_init(|| async { self.unlock_remembering(&self.meta().await?) }).await?;
        Ok(keyring.as_ref())
    }

    /// Checks the given keys against `meta` (just read by the caller) and
    /// keeps them, so the first object read does not read `repository.json` again.
    pub fn unlock_with(&self, meta: &RepositoryMeta) -> Result<(), RepoError> {
        if self.keyring.initialized() {
            return Ok(());
        }
        let keyring = self.unlock_remembering(meta)?;
        // Already set by an earlier read: the same metadata gave the same keys.
        let _ = self.keyring.set(keyring);
        Ok(())
    }

    /// [`unlock`], between what this machine remembers of the repository
    /// (compared before any key is derived, so a changed KDF never runs)
    /// and remembering what it authenticated.
    fn unlock_remembering(&self, meta: &RepositoryMeta) -> Result<Option<Arc<Keyring>>, RepoError> {
        let Some(path) = &self.memory else { return unlock(meta, &self.display, &self.key_material) };
        let update = crate::trust::compare(crate::trust::load(path).as_ref(), meta)
            .map_err(|reason| self.went_backwards(path, &reason))?;
        let keyring = unlock(meta, &self.display, &self.key_material)?;
        if let Some(update) = update {
            crate::trust::save(path, &update);
        }
        Ok(keyring)
    }

    /// Remembers `meta`, just written by this handle, so the newest there
    /// is (a new repository, an upgrade, a rotation).
    pub(crate) fn remember(&self, meta: &RepositoryMeta) {
        if let (Some(path), Some(remembered)) = (&self.memory, crate::trust::Remembered::of(meta)) {
            crate::trust::save(path, &remembered);
        }
    }

    /// Checks the given keys against the repository now (they are otherwise
    /// checked at the first object read).
    pub async fn check_keys(&self) -> Result<(), RepoError> {
        self.keyring().await.map(|_| ())
    }

    /// Keys of every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(prefix);
        let objects: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| RepoError::store(format!("list {prefix} in {}", self.display), e))?;
        Ok(objects.into_iter().map(|o| o.location.to_string()).collect())
    }

    /// The names of the "directories" right under `prefix` (what comes
    /// before the next `/`), without listing what they hold.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        let path = ObjectPath::from(prefix);
        let listing = self
            .store
            .list_with_delimiter(Some(&path))
            .await
            .map_err(|e| RepoError::store(format!("list {path} in {}", self.display), e))?;
        Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// Every object under `prefix` with its size and modification time.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<StoredObject>, RepoError> {
        use futures::TryStreamExt;
        let path = ObjectPath::from(prefix);
        let objects: Vec<_> = self
            .store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| RepoError::store(format!("list {path} in {}", self.display), e))?;
        Ok(objects
            .into_iter()
            .map(|o| StoredObject {
                key: o.location.to_string(),
                bytes: o.size,
                modified: time::OffsetDateTime::from_unix_timestamp(o.last_modified.timestamp())
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            })
            .collect())
    }

    /// Staging files a killed put left in a local repository (`name#N`,
    /// which listing never shows), with their sizes and times; none remotely.
    pub fn local_staging_files(&self) -> Vec<StoredObject> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<StoredObject>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(metadata) = entry.metadata() else { continue };
                if metadata.is_dir() {
                    walk(root, &path, out);
                } else if entry.file_name().to_string_lossy().contains('#') {
                    let modified = metadata.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok());
                    out.push(StoredObject {
                        key: path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned(),
                        bytes: metadata.len(),
                        modified: modified
                            .and_then(|d| time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64).ok())
                            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                    });
                }
            }
        }
        let mut out = Vec::new();
        if let Some(root) = &self.local_root {
            walk(root, root, &mut out);
        }
        out
    }

    /// Whether an object exists (without reading it).
    pub async fn exists(&self, key: &str) -> Result<bool, RepoError> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(RepoError::store(format!("look up object {key} in {}", self.display), e)),
        }
    }

    /// The bytes as stored (sealed or not), or `None` if the object does not exist.
    pub async fn get_stored(&self, key: &str) -> Result<Option<Bytes>, RepoError> {
        let context = || format!("read object {key} from {}", self.display);
        match self.store.get(&ObjectPath::from(key)).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(|e| RepoError::store(context(), e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(RepoError::store(context(), e)),
        }
    }

    /// The object's frame (opened, if sealed), or `None` if it does not exist.
    pub async fn get_frame(&self, key: &str) -> Result<Option<Bytes>, RepoError> {
        let Some(stored) = self.get_stored(key).await? else { return Ok(None) };
        if key == META_KEY {
            return Ok(Some(stored));
        }
        Ok(Some(unseal(self.keyring().await?.map(|k| k.as_ref()), key, stored)?))
    }

    /// An object's content after checking its frame (checksum, length), or
    /// `None` if it does not exist.
    ///
    /// Opening and decompressing run on a blocking thread, so callers that
    /// fetch several objects at once (backup chunks, staged WAL) use every
    /// core instead of the one their task runs on.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RepoError> {
        let Some(stored) = self.get_stored(key).await? else { return Ok(None) };
        let keyring = self.keyring().await?.cloned();
        let key = key.to_string();
        let work = move || {
            let frame = unseal(keyring.as_deref(), &key, stored)?;
            frame::decode(&frame).map_err(|e| RepoError::corrupt(&key, e.to_string()))
        };
        let raw = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| RepoError::Local { context: "decode an object".into(), source: std::io::Error::other(e) })??;
        Ok(Some(raw))
    }

    /// What an object's frame header says, reading only the header where it can.
    pub async fn frame_info(&self, key: &str) -> Result<FrameInfo, RepoError> {
        if self.keyring().await?.is_some() {
            // A sealed header says nothing; open the whole object (only
            // partial segments are asked about, a handful per repository).
            let frame = self.get_frame(key).await?.ok_or_else(|| RepoError::corrupt(key, "listed, then gone"))?;
            return frame::parse_header(&frame).map_err(|e| RepoError::corrupt(key, e.to_string()));
        }
        let header = self
            .store
            .get_range(&ObjectPath::from(key), 0..frame::HEADER_LEN as u64)
            .await
            .map_err(|e| RepoError::store(format!("read the header of {key}"), e))?;
        frame::parse_header(&header).map_err(|e| RepoError::corrupt(key, e.to_string()))
    }

    /// The key id in a stored object's header and whether the object is
    /// bound to its repository, reading only the header; `None` for an
    /// object that is not sealed.
    pub async fn sealed_key_id(&self, key: &str) -> Result<Option<(seal::KeyId, bool)>, RepoError> {
        let header = self
            .store
            .get_range(&ObjectPath::from(key), 0..16)
            .await
            .map_err(|e| RepoError::store(format!("read the header of {key}"), e))?;
        Ok(seal::sealed_key_id(&header).ok().zip(seal::is_bound(&header)))
    }

    /// `repository.json`, or `None` when the repository is not initialized.
    pub async fn read_meta(&self) -> Result<Option<RepositoryMeta>, RepoError> {
        let Some(bytes) = self.get_stored(META_KEY).await? else { return Ok(None) };
        let meta = RepositoryMeta::from_json(&bytes).map_err(|reason| {
            RepoError::Metadata(format!(
                "{}: {META_KEY} is refused: {reason} (is --repo a Tidemark repository?)",
                self.display
            ))
        })?;
        self.check_remembered(&meta)?;
        Ok(Some(meta))
    }

    /// Refuses `meta` if it goes backwards from what this machine
    /// remembers; if it moved forwards (first contact, a rotation), checks
    /// the keys and its tags now so the memory moves with it, whatever the
    /// command goes on to read.
    fn check_remembered(&self, meta: &RepositoryMeta) -> Result<(), RepoError> {
        let Some(path) = &self.memory else { return Ok(()) };
        let update = crate::trust::compare(crate::trust::load(path).as_ref(), meta)
            .map_err(|reason| self.went_backwards(path, &reason))?;
        if update.is_some() && !self.key_material.is_empty() {
            self.unlock_with(meta)?;
        }
        Ok(())
    }

    fn went_backwards(&self, path: &Path, reason: &str) -> RepoError {
        RepoError::Metadata(format!(
            "{}: repository.json {reason} ({} remembers that; remove it only if the change is intended)",
            self.display,
            path.display()
        ))
    }

    /// `repository.json` of an initialized repository.
    pub async fn meta(&self) -> Result<RepositoryMeta, RepoError> {
        self.read_meta().await?.ok_or_else(|| RepoError::NotInitialized(self.display.clone()))
    }
}

/// Opens stored bytes with `keyring` (`None`: a plain repository): in an
/// encrypted repository every object must be sealed and authentic; in a
/// plain one none may be sealed.
fn unseal(keyring: Option<&Keyring>, key: &str, stored: Bytes) -> Result<Bytes, RepoError> {
    if key == META_KEY {
        return Ok(stored);
    }
    match (keyring, seal::is_sealed(&stored)) {
        (None, false) => Ok(stored),
        (None, true) => Err(RepoError::corrupt(key, "it is encrypted, but repository.json says the repository is not")),
        (Some(_), false) => Err(RepoError::corrupt(key, "it is not encrypted, but the repository is: refusing it")),
        (Some(keyring), true) => match seal::open(&keyring.keys, keyring.binding.as_ref(), key, &stored) {
            Ok(frame) => Ok(Bytes::from(frame)),
            Err(e @ seal::SealError::MissingKey(_)) => Err(RepoError::Keys(format!("object {key} is {e}"))),
            Err(e) => Err(RepoError::corrupt(key, e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_displayed() {
        assert_eq!(redact_url("s3://key:secret@bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(redact_url("file:///tmp/repo"), "file:///tmp/repo");
        assert_eq!(redact_url("./relative"), "./relative");
    }

    /// An encrypted repository of the older form (format 2, no id or tags,
    /// objects bound to their key only) opens as it is; a writer upgrades
    /// it; its older objects stay readable until the repository stops
    /// accepting them; and once remembered as authenticated, the older
    /// form put back is refused.
    #[tokio::test]
    async fn an_older_encrypted_repository_opens_upgrades_and_cannot_go_back() {
        use tidemark_proto::repo::frame::{encode, Compression};
        use tidemark_proto::repo::layout::{EncryptionMeta, KeyRecord, FORMAT_VERSION, FORMAT_VERSION_UNAUTHENTICATED};
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        std::fs::create_dir_all(root.join("wal/00000001")).expect("mkdir");
        let key_file = dir.path().join("k");
        std::fs::write(&key_file, "11".repeat(32)).expect("key");
        // Key files others may read are refused.
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        let key = Key::from_bytes([0x11; 32]);
        let encryption = EncryptionMeta {
            cipher: seal::CIPHER_NAME.into(),
            kdf: seal::KdfParams::new([1; 16]),
            keys: vec![KeyRecord { id: key.id.to_string(), added_at: "t".into() }],
            current_key: key.id.to_string(),
            unbound_objects: false,
        };
        let legacy = RepositoryMeta {
            format_version: FORMAT_VERSION_UNAUTHENTICATED,
            system_identifier: "7".into(),
            wal_segment_size: 16 << 20,
            server_version_num: 150000,
            created_at: "t".into(),
            encryption: Some(encryption),
            repository_id: None,
            tags: Vec::new(),
        };
        let legacy_json = legacy.to_json().expect("json");
        std::fs::write(root.join(META_KEY), &legacy_json).expect("meta");
        let old_key = "wal/00000001/old";
        let (frame, _) = encode(b"sealed by an older build", Compression::None).expect("frame");
        let sealed = seal::seal(&key, None, old_key, &frame, [3; seal::NONCE_LEN]).expect("seal");
        std::fs::write(root.join(old_key), sealed).expect("object");
        let url = root.to_str().expect("utf-8").to_string();
        let memory = dir.path().join("state/known-repository.json");
        let open = || {
            Repository::open(&url, std::slice::from_ref(&key_file), Create::No)
                .expect("open")
                .remembering(memory.clone())
        };

        // A reader: read as it is, nothing rewritten.
        let (reader, meta) = open().initialized(false).await.expect("the older form opens");
        assert_eq!(meta, legacy);
        assert_eq!(reader.get(old_key).await.expect("get").as_deref(), Some(&b"sealed by an older build"[..]));
        assert_eq!(std::fs::read(root.join(META_KEY)).expect("meta"), legacy_json);

        // A writer: format 3, an id, tags; older objects still read, new ones bound.
        let (writer, meta) = open().initialized(true).await.expect("upgraded");
        assert_eq!(meta.format_version, FORMAT_VERSION);
        assert!(meta.repository_id.is_some() && !meta.tags.is_empty());
        assert_eq!(RepositoryMeta::from_json(&std::fs::read(root.join(META_KEY)).expect("meta")), Ok(meta.clone()));
        assert!(writer.get(old_key).await.expect("get").is_some(), "older objects stay readable");
        writer.put("wal/00000001/new", frame.clone()).await.expect("put");
        assert_eq!(seal::is_bound(&std::fs::read(root.join("wal/00000001/new")).expect("read")), Some(true));
        let (reader, _) = open().initialized(false).await.expect("reopens");
        assert!(reader.get("wal/00000001/new").await.expect("get").is_some());

        // The older form put back is refused now that this machine saw it authenticated...
        std::fs::write(root.join(META_KEY), &legacy_json).expect("roll back");
        let error = open().initialized(false).await.err().expect("refused");
        assert!(matches!(error, RepoError::Metadata(_)), "{error}");
        assert!(error.to_string().contains("older unauthenticated form"), "{error}");

        // ...and once every object is bound (what `reencrypt` ends with),
        // one of the older form is refused: a copy from elsewhere.
        let mut bound_only = meta.clone();
        if let Some(e) = bound_only.encryption.as_mut() {
            e.unbound_objects = false;
        }
        writer.write_signed_meta(&mut bound_only, &[]).await.expect("write");
        let (reader, _) = open().initialized(false).await.expect("opens");
        let error = reader.get(old_key).await.expect_err("an unbound object is refused");
        assert!(error.to_string().contains("no longer accepts"), "{error}");
    }

    #[test]
    fn opening_refuses_what_is_not_a_repository_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let error = Repository::open(missing.to_str().expect("utf-8"), &[], Create::No).err().expect("refused");
        assert!(matches!(error, RepoError::NoRepository(_)), "{error}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let error = Repository::open(file.to_str().expect("utf-8"), &[], Create::No).err().expect("refused");
        assert!(matches!(error, RepoError::NotADirectory(_)), "{error}");
        let error = Repository::open("ftp://host/x", &[], Create::No).err().expect("refused");
        assert!(matches!(error, RepoError::UnsupportedUrl(_)), "{error}");
    }
}
