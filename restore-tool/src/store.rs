//! Reading the repository: `file://` paths and `s3://` URLs, read-only.

use anyhow::Context;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use std::sync::Arc;
use tidemark_proto::repo::layout::{RepositoryMeta, META_KEY};

/// Why a read failed, sorted by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("repository {0} does not exist")]
    NoRepository(String),
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
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
            ReadError::Other(_) => "check the repository is reachable; nothing is guessed",
        }
    }
}

pub struct RepositoryReader {
    store: Arc<dyn ObjectStore>,
    pub display: String,
}

impl RepositoryReader {
    pub fn open(url: &str) -> Result<RepositoryReader, ReadError> {
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
            return Ok(RepositoryReader { store: Arc::new(store), display });
        }
        if url.starts_with("s3://") {
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .with_context(|| format!("open repository {display}"))?;
            return Ok(RepositoryReader { store: Arc::new(store), display });
        }
        Err(ReadError::Other(anyhow::anyhow!(
            "unsupported repository URL {display}: use file:///path or s3://bucket/prefix"
        )))
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
        let header = self
            .store
            .get_range(&ObjectPath::from(key), 0..tidemark_proto::repo::frame::HEADER_LEN as u64)
            .await
            .with_context(|| format!("read the header of {key}"))?;
        tidemark_proto::repo::frame::parse_header(&header)
            .map_err(|e| ReadError::Corrupt { key: key.into(), reason: e.to_string() })
    }

    /// The raw stored bytes, or `None` if the object does not exist.
    pub async fn get_raw(&self, key: &str) -> Result<Option<Bytes>, ReadError> {
        match self.store.get(&ObjectPath::from(key)).await {
            Ok(result) => Ok(Some(result.bytes().await.with_context(|| format!("read object {key}"))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(ReadError::Other(anyhow::Error::new(e).context(format!("read object {key} from {}", self.display))))
            }
        }
    }

    /// An object's content after checking its frame (checksum, length).
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let Some(object) = self.get_raw(key).await? else { return Ok(None) };
        let raw = tidemark_proto::repo::frame::decode(&object)
            .map_err(|e| ReadError::Corrupt { key: key.to_string(), reason: e.to_string() })?;
        Ok(Some(raw))
    }

    pub async fn meta(&self) -> Result<RepositoryMeta, ReadError> {
        let bytes = self.get_raw(META_KEY).await?.ok_or_else(|| {
            ReadError::Other(anyhow::anyhow!("{} has no {META_KEY}; is it a Tidemark repository?", self.display))
        })?;
        RepositoryMeta::from_json(&bytes).map_err(|reason| ReadError::Corrupt { key: META_KEY.into(), reason })
    }
}
