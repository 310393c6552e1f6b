//! The repository as an object store: `file://` (the default) or `s3://`.
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

#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// Set for a local directory, whose objects we fsync ourselves.
    local_root: Option<PathBuf>,
    /// The URL without credentials, for messages.
    pub display: String,
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
            return Ok(Repository { store: Arc::new(store), local_root: Some(root), display });
        }
        if url.starts_with("s3://") {
            let store = object_store::aws::AmazonS3Builder::from_env().with_url(url).build().map_err(|e| {
                Fail::new(format!("cannot use repository {display}: {e}"), "check the URL and the AWS_* variables")
            })?;
            return Ok(Repository { store: Arc::new(store), local_root: None, display });
        }
        Err(Fail::new(format!("unsupported repository URL {display}"), "use file:///path or s3://bucket/prefix").into())
    }

    /// Stores an object and returns once it is durable.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let path = ObjectPath::from(key);
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

    /// The object's bytes, or `None` if there is no such object.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
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
        self.put(META_KEY, meta.to_json()).await
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
