//! Materializes a base backup into a new data directory: every file from its
//! chunks (each checked against its frame's CRC-32 and the manifest's
//! CRC-32C), directories and links, the `tablespace_map` and `backup_label`
//! that came in the archive, and the server's own `backup_manifest` (so
//! `pg_verifybackup` can check the result).
//!
//! Files are written into a staging directory beside the target, which is
//! renamed into place only when everything is there: a failed fetch leaves no
//! half-restored data directory behind.

use crate::store::{ReadError, RepositoryReader};
use anyhow::Context;
use futures::StreamExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tidemark_proto::repo::backup::{manifest_key, BackupFile, BackupManifest, FileKind};

/// Chunk downloads in flight at once.
const PARALLEL_FILES: usize = 8;

pub async fn list_backups(repo: &RepositoryReader) -> Result<Vec<String>, ReadError> {
    let keys = repo.list("backups").await?;
    Ok(tidemark_proto::repo::backup::complete_backup_ids(keys.iter().map(String::as_str)))
}

pub async fn read_manifest(repo: &RepositoryReader, id: &str) -> Result<BackupManifest, ReadError> {
    let key = manifest_key(id);
    let raw = repo.get(&key).await?.ok_or_else(|| ReadError::Other(anyhow::anyhow!("there is no backup {id}")))?;
    BackupManifest::from_json(&raw).map_err(|reason| ReadError::Corrupt { key, reason })
}

/// Refuses anything but a missing or empty directory.
pub fn check_target(pgdata: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(pgdata) {
        Ok(mut entries) => {
            anyhow::ensure!(
                entries.next().is_none(),
                "{} is not empty; restore into a new or empty directory",
                pgdata.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspect {}", pgdata.display())),
    }
}

/// Writes the backup into `pgdata`. With `sync`, everything is durable when
/// this returns; without it the caller relies on PostgreSQL, which fsyncs
/// the whole data directory itself when it starts from a backup
/// (recovery_init_sync_method) — `restore --start` starts it at once, and
/// leaving the pages to that one pass keeps them from being written twice.
pub async fn fetch_backup(
    repo: &RepositoryReader,
    manifest: &BackupManifest,
    pgdata: &Path,
    sync: bool,
) -> Result<u64, ReadError> {
    check_target(pgdata)?;
    if !manifest.tablespaces.is_empty() {
        return Err(ReadError::Other(anyhow::anyhow!(
            "backup {} has tablespaces, which fetch-backup cannot place yet",
            manifest.id
        )));
    }
    let name = pgdata.file_name().context("--pgdata has no directory name")?.to_string_lossy().into_owned();
    let parent = pgdata.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = parent.join(format!(".{name}.tidemark-staging"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("remove stale {}", staging.display()))?;
    }
    let result = fill(repo, manifest, &staging, sync).await;
    match result {
        Ok(bytes) => {
            // rename(2) replaces an empty directory.
            std::fs::rename(&staging, pgdata)
                .with_context(|| format!("move the restored files into {}", pgdata.display()))?;
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("fsync {}", parent.display()))?;
            Ok(bytes)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

async fn fill(repo: &RepositoryReader, manifest: &BackupManifest, root: &Path, sync: bool) -> Result<u64, ReadError> {
    std::fs::DirBuilder::new().mode(0o700).create(root).with_context(|| format!("create {}", root.display()))?;
    // Directories first (the tar lists them before their files), then links.
    for file in manifest.files.iter().filter(|f| f.archive == "base") {
        let path = safe_join(root, &file.path)?;
        match file.kind {
            FileKind::Directory => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .with_context(|| format!("create {}", path.display()))?,
            FileKind::Symlink => {
                let target = file.link_target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(&target, &path).with_context(|| format!("link {}", path.display()))?
            }
            FileKind::File => {}
        }
    }
    let files: Vec<&BackupFile> =
        manifest.files.iter().filter(|f| f.archive == "base" && f.kind == FileKind::File).collect();
    let mut results = futures::stream::iter(files.into_iter().map(|file| write_file(repo, root, file)))
        .buffer_unordered(PARALLEL_FILES);
    let mut bytes = 0;
    while let Some(result) = results.next().await {
        bytes += result?;
    }
    let pg_manifest = repo.get(&manifest.pg_manifest_key).await?.ok_or_else(|| {
        ReadError::Other(anyhow::anyhow!("backup {} lacks the server's backup_manifest", manifest.id))
    })?;
    std::fs::write(root.join("backup_manifest"), pg_manifest).context("write backup_manifest")?;
    if sync {
        sync_tree(root)?;
    }
    Ok(bytes)
}

/// Makes everything written under `root` durable with one syncfs(2) of its
/// filesystem: far cheaper than an fsync per file when a backup has
/// thousands, and the same guarantee once it returns.
fn sync_tree(root: &Path) -> anyhow::Result<()> {
    let dir = std::fs::File::open(root).with_context(|| format!("open {}", root.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs {}", root.display()));
    }
    Ok(())
}

async fn write_file(repo: &RepositoryReader, root: &Path, file: &BackupFile) -> Result<u64, ReadError> {
    let path = safe_join(root, &file.path)?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut written = 0u64;
    for chunk in &file.chunks {
        let raw = repo.get(&chunk.key).await?.ok_or_else(|| ReadError::Corrupt {
            key: chunk.key.clone(),
            reason: format!("missing (needed by {})", file.path),
        })?;
        if raw.len() as u64 != chunk.raw_len || crc32c::crc32c(&raw) != chunk.crc32c {
            return Err(ReadError::Corrupt {
                key: chunk.key.clone(),
                reason: "does not match the backup manifest".into(),
            });
        }
        std::io::Write::write_all(&mut out, &raw).with_context(|| format!("write {}", path.display()))?;
        written += raw.len() as u64;
    }
    if written != file.size {
        return Err(ReadError::Corrupt {
            key: file.path.clone(),
            reason: format!("{written} bytes, manifest says {}", file.size),
        });
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode & 0o700)).context("chmod")?;
    // Made durable all at once at the end (`sync_tree`), not file by file.
    Ok(written)
}

/// `root/relative`, refusing anything that would leave `root`.
fn safe_join(root: &Path, relative: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !relative.starts_with('/') && !relative.split('/').any(|p| p == ".." || p.is_empty()),
        "backup path {relative:?} escapes the data directory"
    );
    Ok(root.join(relative))
}
