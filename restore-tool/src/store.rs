//! Reading the repository: `file://` paths and `s3://` URLs, read-only.
//!
//! In an encrypted repository every object but `repository.json` is sealed;
//! objects are opened here, so callers see frames only. The keys are derived
//! on the first object read (not at open), so `wal-get` serving a staged
//! segment never pays for a passphrase's key derivation.

use anyhow::Context;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use std::path::PathBuf;
use std::sync::Arc;
use tidemark_proto::repo::layout::{RepositoryMeta, META_KEY};
use tidemark_proto::repo::seal::{self, Key, KeyMaterial, Keyring};

/// Why a read failed, sorted by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("repository {0} does not exist")]
    NoRepository(String),
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0}")]
    Keys(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ReadError {
    /// What to do about it, for the `hint:` line.
    pub fn hint(&self) -> &'static str {
        match self {
            ReadError::Corrupt { .. } => {
                "an object is missing or does not match its checksum; run `tidemark-restore verify` and restore from another copy"
            }
            ReadError::NoRepository(_) => "check --repo / TIDEMARK_REPO",
            ReadError::Keys(_) => {
                "pass the repository's key files with --key-file (repeat it for keys of objects written before a rotation)"
            }
            ReadError::Other(_) => "check the repository is reachable; nothing is guessed",
        }
    }
}

pub struct RepositoryReader {
    store: Arc<dyn ObjectStore>,
    pub display: String,
    /// The key files given, read at open: (file name, contents).
    key_material: Vec<(String, KeyMaterial)>,
    /// The checked keys once the metadata has been read: `None` for a plain repository.
    keys: tokio::sync::OnceCell<Option<Vec<Key>>>,
    /// The key files as given, for restore_command.
    pub key_files: Vec<PathBuf>,
}

impl RepositoryReader {
    pub fn open(url: &str, key_files: &[PathBuf]) -> Result<RepositoryReader, ReadError> {
        let mut reader = Self::open_store(url)?;
        for path in key_files {
            let name = path.display().to_string();
            let contents =
                std::fs::read(path).map_err(|e| ReadError::Keys(format!("cannot read key file {name}: {e}")))?;
            let material =
                KeyMaterial::parse(&contents).map_err(|e| ReadError::Keys(format!("key file {name}: {e}")))?;
            reader.key_material.push((name, material));
            reader.key_files.push(path.clone());
        }
        Ok(reader)
    }

    fn open_store(url: &str) -> Result<RepositoryReader, ReadError> {
        let display = tidemark_proto::repo::redact_url(url);
        let local =
            url.strip_prefix("file://").map(str::to_string).or_else(|| (!url.contains("://")).then(|| url.to_string()));
        if let Some(dir) = local {
            let path = std::path::Path::new(&dir);
            if !path.is_dir() {
                return Err(ReadError::NoRepository(display));
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(path)
                .with_context(|| format!("open repository {display}"))?;
            return Ok(RepositoryReader::new(Arc::new(store), display));
        }
        if let Some(store) = tidemark_proto::repo::remote::open(url) {
            let store = store.with_context(|| format!("open repository {display}"))?;
            return Ok(RepositoryReader::new(store, display));
        }
        Err(ReadError::Other(anyhow::anyhow!(
            "unsupported repository URL {display}: use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
        )))
    }

    fn new(store: Arc<dyn ObjectStore>, display: String) -> RepositoryReader {
        RepositoryReader {
            store,
            display,
            key_material: Vec::new(),
            keys: tokio::sync::OnceCell::new(),
            key_files: Vec::new(),
        }
    }

    /// The keys for this repository, checked against its metadata (once).
    async fn keys(&self) -> Result<Option<&[Key]>, ReadError> {
        let keys = self
            .keys
            .get_or_try_init(|| async {
                let meta = self.meta().await?;
                match (&meta.encryption, self.key_material.is_empty()) {
                    (None, true) => Ok(None),
                    (None, false) => Err(ReadError::Keys(format!(
                        "repository {} is not encrypted, but a key file was given",
                        self.display
                    ))),
                    (Some(_), true) => Err(ReadError::Keys(format!("repository {} is encrypted", self.display))),
                    (Some(encryption), false) => Keyring::unlock(encryption, &self.key_material)
                        .map(|keyring| Some(keyring.keys))
                        .map_err(|e| ReadError::Keys(format!("wrong key for repository {}: {e}", self.display))),
                }
            })
            .await?;
        Ok(keys.as_deref())
    }

    /// Checks the given keys against the repository now (they are otherwise
    /// checked at the first object read).
    pub async fn check_keys(&self) -> Result<(), ReadError> {
        self.keys().await.map(|_| ())
    }

    /// Opens stored bytes: in an encrypted repository every object must be
    /// sealed and authentic; in a plain one none may be sealed.
    async fn unseal(&self, key: &str, stored: Bytes) -> Result<Bytes, ReadError> {
        if key == META_KEY {
            return Ok(stored);
        }
        unseal_with(self.keys().await?, key, stored)
    }

    /// Keys of every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ReadError> {
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

    /// What an object's frame header says, reading only the header.
    pub async fn frame_info(&self, key: &str) -> Result<tidemark_proto::repo::frame::FrameInfo, ReadError> {
        if self.keys().await?.is_some() {
            // A sealed header says nothing; open the whole object (only partial
            // segments are asked about, a handful per repository).
            let frame = self.get_raw(key).await?.ok_or_else(|| ReadError::Corrupt {
                key: key.into(),
                reason: "the object disappeared while reading".into(),
            })?;
            return tidemark_proto::repo::frame::parse_header(&frame)
                .map_err(|e| ReadError::Corrupt { key: key.into(), reason: e.to_string() });
        }
        let header = self
            .store
            .get_range(&ObjectPath::from(key), 0..tidemark_proto::repo::frame::HEADER_LEN as u64)
            .await
            .with_context(|| format!("read the header of {key}"))?;
        tidemark_proto::repo::frame::parse_header(&header)
            .map_err(|e| ReadError::Corrupt { key: key.into(), reason: e.to_string() })
    }

    /// The object's frame (opened, if sealed), or `None` if the object does not exist.
    pub async fn get_raw(&self, key: &str) -> Result<Option<Bytes>, ReadError> {
        match self.get_stored(key).await? {
            Some(stored) => Ok(Some(self.unseal(key, stored).await?)),
            None => Ok(None),
        }
    }

    /// The bytes as stored (sealed or not), or `None` if the object does not exist.
    pub async fn get_stored(&self, key: &str) -> Result<Option<Bytes>, ReadError> {
        match self.store.get(&ObjectPath::from(key)).await {
            Ok(result) => Ok(Some(result.bytes().await.with_context(|| format!("read object {key}"))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(ReadError::Other(anyhow::Error::new(e).context(format!("read object {key} from {}", self.display))))
            }
        }
    }

    /// An object's content after checking its frame (checksum, length).
    ///
    /// Opening and decompressing run on a blocking thread, so the callers
    /// that fetch several objects at once (backup chunks, staged WAL) use
    /// every core instead of the one their task runs on.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let Some(stored) = self.get_stored(key).await? else { return Ok(None) };
        let keys = if key == META_KEY { None } else { self.keys().await?.map(<[Key]>::to_vec) };
        let key = key.to_string();
        let work = move || {
            let frame = if key == META_KEY { stored } else { unseal_with(keys.as_deref(), &key, stored)? };
            tidemark_proto::repo::frame::decode(&frame).map_err(|e| ReadError::Corrupt { key, reason: e.to_string() })
        };
        let raw = tokio::task::spawn_blocking(work).await.map_err(|e| ReadError::Other(e.into()))??;
        Ok(Some(raw))
    }

    pub async fn meta(&self) -> Result<RepositoryMeta, ReadError> {
        let bytes = self.get_stored(META_KEY).await?.ok_or_else(|| {
            ReadError::Other(anyhow::anyhow!("{} has no {META_KEY}; is it a Tidemark repository?", self.display))
        })?;
        RepositoryMeta::from_json(&bytes).map_err(|reason| ReadError::Corrupt { key: META_KEY.into(), reason })
    }
}

/// Opens stored bytes with `keys` (`None`: a plain repository): in an
/// encrypted repository every object must be sealed and authentic; in a
/// plain one none may be sealed.
fn unseal_with(keys: Option<&[Key]>, key: &str, stored: Bytes) -> Result<Bytes, ReadError> {
    let corrupt = |reason: String| ReadError::Corrupt { key: key.to_string(), reason };
    match (keys, seal::is_sealed(&stored)) {
        (None, false) => Ok(stored),
        (None, true) => Err(corrupt("it is encrypted, but repository.json says the repository is not".into())),
        (Some(_), false) => Err(corrupt("it is not encrypted, but the repository is: refusing it".into())),
        (Some(keys), true) => match seal::open(keys, key, &stored) {
            Ok(frame) => Ok(Bytes::from(frame)),
            Err(e @ seal::SealError::MissingKey(_)) => Err(ReadError::Keys(format!("object {key} is {e}"))),
            Err(e) => Err(corrupt(e.to_string())),
        },
    }
}
