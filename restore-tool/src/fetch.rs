//! Materializes a base backup into a new data directory: every file from its
//! chunks (each checked against its frame's CRC-32 and the manifest's
//! CRC-32C), directories and links, the `tablespace_map` and `backup_label`
//! that came in the archive, and the server's own `backup_manifest` (so
//! `pg_verifybackup` can check the result).
//!
//! A file of an incremental backup stored block by block is put together
//! from the chain (`tidemark_proto::repo::chain`): each block from the
//! newest backup that holds it, written once; the server's manifest then
//! gets those files' checksums of what was written (`pg_manifest.rs`).
//!
//! Files are written into a staging directory beside the target, which is
//! renamed into place only when everything is there: a failed fetch leaves no
//! half-restored data directory behind (and with `--force`, the old one as it
//! was: `force.rs`). Every path is written beneath its root without following
//! links, directories first and the backup's links last (`beneath.rs`).

use crate::beneath::Beneath;
use crate::tablespaces::Placement;
use anyhow::Context;
use futures::StreamExt;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tidemark_proto::repo::backup::{manifest_key, BackupFile, BackupManifest, ChunkRef, FileKind};
use tidemark_proto::repo::chain::{Chain, ChunkUse, Extent};
use tidemark_repo::durable::{fsync_dir, parent_dir};
use tidemark_repo::{RepoError, Repository};

/// Chunk downloads in flight at once.
const PARALLEL_FILES: usize = 8;

/// Restored files are written a PostgreSQL block (8 kB) per write(2). The
/// kernel sizes page-cache folios by the write (ext4 has large folios since
/// Linux 6.16), and every later 8 kB write PostgreSQL makes into a page
/// costs time proportional to its folio's size: redo, which writes back
/// evicted buffers all the time, ran about 1.5× slower over files written a
/// chunk (megabytes) at a time. Measured: `bench-restore`, perf showing
/// `ext4_block_write_begin` as the startup process's hottest function.
const WRITE_SIZE: usize = 8192;

/// True for a missing or empty directory: the only kind a restore writes into.
pub fn is_empty_or_missing(path: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("inspect {}", path.display())),
    }
}

/// Refuses anything but a missing or empty directory.
pub fn check_target(pgdata: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_empty_or_missing(pgdata)?,
        "{} is not empty; restore into a new or empty directory",
        pgdata.display()
    );
    Ok(())
}

/// Writes the backup (`chain`'s first: the backup and the ones it is
/// incremental on, as `catalog::read_chain` gives them) into `pgdata`, and each tablespace into its placement
/// (`pg_tblspc/OID` a link to it). With `sync`, everything is durable when
/// this returns; without it the caller relies on PostgreSQL, which fsyncs
/// the whole data directory itself when it starts from a backup
/// (recovery_init_sync_method) — `restore --start` starts it at once, and
/// leaving the pages to that one pass keeps them from being written twice.
/// With `replace` (`--force`, checked by `force.rs`), a non-empty `pgdata`
/// is swapped out for the restore at the end instead of refused.
pub async fn fetch_backup(
    repo: &Repository,
    chain: &[BackupManifest],
    pgdata: &Path,
    placements: &[Placement],
    sync: bool,
    only_databases: Option<&[u32]>,
    replace: bool,
) -> anyhow::Result<u64> {
    let manifest = chain.first().context("no backup to fetch")?;
    crate::beneath::check_manifest(manifest)?;
    if !replace {
        check_target(pgdata)?;
    }
    check_placements(manifest, placements)?;
    let existed_before: Vec<&Path> =
        placements.iter().map(|p| p.target.as_path()).filter(|target| target.exists()).collect();
    let staging = staging_beside(pgdata, "staging")?;
    let mut roots = vec![("base".to_string(), staging.clone())];
    for placement in placements {
        roots.push((placement.oid.to_string(), staging_beside(&placement.target, "staging")?));
    }
    let remove_all = |roots: &[(String, PathBuf)]| {
        for (_, root) in roots {
            let _ = std::fs::remove_dir_all(root);
        }
    };
    let bytes = match fill(repo, chain, &roots, placements, sync, only_databases).await {
        Ok(bytes) => bytes,
        Err(e) => {
            remove_all(&roots);
            return Err(e);
        }
    };
    // Tablespaces first, the data directory last: a data directory in place
    // means the whole restore is.
    let mut finals: Vec<(&Path, &Path)> = placements
        .iter()
        .map(|p| p.target.as_path())
        .zip(&roots[1..])
        .map(|(to, (_, from))| (from.as_path(), to))
        .collect();
    finals.push((staging.as_path(), pgdata));
    let mut moved: Vec<(&Path, bool)> = Vec::new();
    for (from, to) in finals {
        // rename(2) replaces an empty directory; --force swaps out a full one.
        let placed = match replace && to == pgdata && !is_empty_or_missing(pgdata)? {
            true => swap_in(from, to),
            false => std::fs::rename(from, to).map_err(anyhow::Error::new),
        };
        if let Err(e) = placed {
            remove_all(&roots);
            // Tablespaces already moved in were missing or empty before:
            // put them back as they were.
            for (done, existed) in moved {
                let _ = std::fs::remove_dir_all(done);
                if existed {
                    let _ = std::fs::DirBuilder::new().mode(0o700).create(done);
                }
            }
            return Err(e.context(format!("move the restored files into {}", to.display())));
        }
        let parent = parent_dir(to);
        fsync_dir(parent).with_context(|| format!("fsync {}", parent.display()))?;
        moved.push((to, existed_before.contains(&to)));
    }
    Ok(bytes)
}

/// Every tablespace of the backup has a placement, and every placement's
/// directory is missing or empty. Nothing is written before this passes.
pub fn check_placements(manifest: &BackupManifest, placements: &[Placement]) -> anyhow::Result<()> {
    for tablespace in &manifest.tablespaces {
        anyhow::ensure!(
            placements.iter().any(|p| p.oid == tablespace.oid),
            "backup {} has tablespace {} ({}) with no place to go",
            manifest.id,
            tablespace.oid,
            tablespace.location
        );
    }
    for placement in placements {
        anyhow::ensure!(
            is_empty_or_missing(&placement.target)?,
            "tablespace {} would be restored into {}, which is not empty (with the source on this machine it is \
             the source's own); place it elsewhere with --tablespace-map {}=NEW_DIR",
            placement.oid,
            placement.target.display(),
            placement.oid
        );
    }
    Ok(())
}

/// A fresh (stale one removed, not yet created) `.NAME.tidemark-SUFFIX`
/// beside `path`, its parent created if missing: restored files are written
/// into `staging` ones and renamed into place when all are.
pub fn staging_beside(path: &Path, suffix: &str) -> anyhow::Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{} has no directory name", path.display()))?;
    let parent = parent_dir(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .with_context(|| format!("create {}", parent.display()))?;
    let staging = parent.join(format!(".{}.tidemark-{suffix}", name.to_string_lossy()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("remove stale {}", staging.display()))?;
    }
    Ok(staging)
}

/// Writes every archive of the backup into its root (`roots`: archive name
/// → directory), then links `pg_tblspc/OID` to each placement.
async fn fill(
    repo: &Repository,
    chain: &[BackupManifest],
    roots: &[(String, PathBuf)],
    placements: &[Placement],
    sync: bool,
    only_databases: Option<&[u32]>,
) -> anyhow::Result<u64> {
    let manifest = chain.first().context("no backup to fetch")?;
    let chain = Chain::new(chain).map_err(|reason| RepoError::Corrupt { key: manifest_key(&manifest.id), reason })?;
    let mut opened = Vec::new();
    for (name, root) in roots {
        std::fs::DirBuilder::new().mode(0o700).create(root).with_context(|| format!("create {}", root.display()))?;
        opened.push((name.clone(), Beneath::open(root)?));
    }
    let roots = &opened;
    let root_of = |archive: &str| root_of(roots, manifest, archive);
    // Directories first (the tar lists them before their files), then
    // files, the backup's links last: nothing is written through them.
    for dir in manifest.files.iter().filter(|f| f.kind == FileKind::Directory) {
        root_of(&dir.archive)?.create_dirs(&dir.path, 0o700)?;
    }
    let mut files = Vec::new();
    for file in manifest.files.iter().filter(|f| f.kind == FileKind::File) {
        let root = root_of(&file.archive)?;
        if is_skipped(file, only_databases) {
            write_hollow(root, file)?;
        } else {
            files.push((root, file));
        }
    }
    let progress = tidemark_repo::progress::Progress::bytes("restore: fetch the backup", manifest.bytes);
    let chain = &chain;
    let mut results = futures::stream::iter(files.into_iter().map(|(root, file)| async move {
        match file.blocks {
            Some(_) => write_rebuilt(repo, root, file, chain).await.map(|crc| (file.size, Some((file, crc)))),
            None => write_file(repo, root, file).await.map(|written| (written, None)),
        }
    }))
    .buffer_unordered(PARALLEL_FILES);
    let mut bytes = 0;
    let mut rebuilt = HashMap::new();
    while let Some(result) = results.next().await {
        let (written, crc) = result?;
        bytes += written;
        progress.add(written);
        if let Some((file, crc)) = crc {
            rebuilt.insert(manifest_path(file), crc);
        }
    }
    progress.finish();
    for link in manifest.files.iter().filter(|f| f.kind == FileKind::Symlink) {
        let target = link.link_target.as_deref().unwrap_or_default();
        root_of(&link.archive)?.symlink(&link.path, Path::new(target))?;
    }
    let base = root_of("base")?;
    link_tablespaces(base, placements)?;
    write_pg_manifest(repo, manifest, base, &rebuilt).await?;
    if sync {
        // One syncfs per filesystem would do; one per root is simpler and as cheap.
        for (_, root) in roots {
            sync_tree(root.path())?;
        }
    }
    Ok(bytes)
}

/// Where `archive` (`base` or a tablespace's OID) of `manifest` is written,
/// among `roots` (archive name → directory).
pub(crate) fn root_of<'r>(
    roots: &'r [(String, Beneath)],
    manifest: &BackupManifest,
    archive: &str,
) -> anyhow::Result<&'r Beneath> {
    roots.iter().find(|(name, _)| name == archive).map(|(_, root)| root).ok_or_else(|| {
        anyhow::Error::new(RepoError::Corrupt {
            key: manifest_key(&manifest.id),
            reason: format!("it lists files of an unknown archive {archive:?}"),
        })
    })
}

/// The database a relation file belongs to: `base/<oid>/...` in the data
/// directory, `<version directory>/<oid>/...` in a tablespace.
pub fn database_of(file: &BackupFile) -> Option<u32> {
    let mut parts = file.path.split('/');
    let first = parts.next()?;
    if file.archive == "base" && first != "base" {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Whether `file` belongs to a user database left out of a partial restore
/// (the databases PostgreSQL creates itself, OIDs below 16384, are always kept).
pub fn is_skipped(file: &BackupFile, only_databases: Option<&[u32]>) -> bool {
    match (only_databases, database_of(file)) {
        (Some(keep), Some(oid)) => oid >= 16384 && !keep.contains(&oid),
        _ => false,
    }
}

/// A file of a left-out database: its size, all zeros, no blocks written
/// (sparse). Recovery rewrites every page the WAL touches from the full
/// page image logged at its first change after the backup's checkpoint, so
/// replay works; the database itself is not usable, which is the point
/// (pgBackRest's `--db-include` does the same).
fn write_hollow(root: &Beneath, file: &BackupFile) -> anyhow::Result<()> {
    let (path, out) = create_file(root, file)?;
    out.set_len(file.size).with_context(|| format!("size {}", path.display()))
}

/// A new, owner-only file for `file` under `root`, its directories made.
fn create_file(root: &Beneath, file: &BackupFile) -> anyhow::Result<(PathBuf, std::fs::File)> {
    Ok((root.join(&file.path), root.create_file(&file.path, 0o600)?))
}

/// `pg_tblspc/OID` → the placement (the archive has it as a directory when
/// the backup came with a tablespace_map). PostgreSQL remakes these links
/// from tablespace_map when recovery starts, so a moved tablespace's map is
/// rewritten too; the links make the directory complete without it
/// (pg_verifybackup follows them).
pub(crate) fn link_tablespaces(base: &Beneath, placements: &[Placement]) -> anyhow::Result<()> {
    if placements.is_empty() {
        return Ok(());
    }
    base.create_dirs("pg_tblspc", 0o700)?;
    for placement in placements {
        let link = format!("pg_tblspc/{}", placement.oid);
        base.remove(&link)?;
        base.symlink(&link, &placement.target)?;
    }
    if crate::tablespaces::relocated(placements) && base.join("tablespace_map").exists() {
        base.write_file("tablespace_map", crate::tablespaces::tablespace_map(placements).as_bytes(), 0o600)?;
    }
    Ok(())
}

/// Makes everything written under `root` durable with one syncfs(2) of its
/// filesystem: far cheaper than an fsync per file when a backup has
/// thousands, and the same guarantee once it returns.
pub(crate) fn sync_tree(root: &Path) -> anyhow::Result<()> {
    let dir = std::fs::File::open(root).with_context(|| format!("open {}", root.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs {}", root.display()));
    }
    Ok(())
}

/// The server's backup_manifest into `base`, with the sizes and checksums
/// of the files put together from a chain (`rebuilt`: manifest path →
/// CRC-32C of what was written). A PostgreSQL 17+ incremental backup's
/// backup_label was stored without its INCREMENTAL lines, so its entry is
/// rewritten too.
pub(crate) async fn write_pg_manifest(
    repo: &Repository,
    manifest: &BackupManifest,
    base: &Beneath,
    rebuilt: &HashMap<String, u32>,
) -> anyhow::Result<()> {
    let pg_manifest = repo.get(&manifest.pg_manifest_key).await?.ok_or_else(|| RepoError::Corrupt {
        key: manifest.pg_manifest_key.clone(),
        reason: format!("missing: backup {} lacks the server's backup_manifest", manifest.id),
    })?;
    let mut written = HashMap::new();
    for file in manifest.files.iter().filter(|f| f.kind == FileKind::File) {
        let path = manifest_path(file);
        if let Some(&crc) = rebuilt.get(&path) {
            written.insert(path, (file.size, crc));
        } else if manifest.base.is_some() && file.archive == "base" && file.path == "backup_label" {
            // Small: one chunk, or none when empty (CRC-32C of nothing is 0).
            if let [] | [_] = file.chunks.as_slice() {
                written.insert(path, (file.size, file.chunks.first().map_or(0, |c| c.crc32c)));
            }
        }
    }
    let pg_manifest = crate::pg_manifest::rewrite(&pg_manifest, &written)
        .map_err(|reason| RepoError::Corrupt { key: manifest.pg_manifest_key.clone(), reason })?;
    base.write_file("backup_manifest", &pg_manifest, 0o600).map(drop)
}

/// The CRC-32C of a whole file, read on a blocking thread.
pub(crate) async fn crc32c_of(file: std::sync::Arc<std::fs::File>, path: &Path) -> anyhow::Result<u32> {
    tokio::task::spawn_blocking(move || {
        let mut crc = 0u32;
        let mut buffer = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        loop {
            let n = file.read_at(&mut buffer, offset)?;
            if n == 0 {
                return Ok::<_, std::io::Error>(crc);
            }
            crc = crc32c::crc32c_append(crc, buffer.get(..n).unwrap_or_default());
            offset += n as u64;
        }
    })
    .await
    .context("join a checksum")?
    .with_context(|| format!("read back {}", path.display()))
}

/// The path PostgreSQL's backup_manifest names a file by.
pub(crate) fn manifest_path(file: &BackupFile) -> String {
    match file.archive.as_str() {
        "base" => file.path.clone(),
        oid => format!("pg_tblspc/{oid}/{}", file.path),
    }
}

/// A chunk's raw bytes, checked against the manifest's length and CRC-32C.
pub(crate) async fn fetch_chunk(repo: &Repository, chunk: &ChunkRef, path: &str) -> anyhow::Result<Vec<u8>> {
    Ok(tidemark_repo::pages::get_chunk(repo, chunk, path).await?)
}

/// A chunk a file put together from a chain needs: fetched, checked, and
/// when its pages are XORed with the chain's whole copy of the file,
/// undone (and checked again).
pub(crate) async fn fetch_use(
    repo: &Repository,
    chain: &Chain<'_>,
    file: &BackupFile,
    use_: &ChunkUse<'_>,
) -> anyhow::Result<Vec<u8>> {
    let mut raw = fetch_chunk(repo, use_.chunk, &file.path).await?;
    if let Some(blocks) = &use_.xor_blocks {
        let layers = chain.layers(file).map_err(|reason| RepoError::Corrupt {
            key: chain.newest().map(|b| manifest_key(&b.id)).unwrap_or_default(),
            reason,
        })?;
        let whole = layers.last().context("a chain without a whole copy")?;
        tidemark_repo::pages::unxor_chunk(repo, whole, use_.chunk, blocks, &mut raw).await?;
    }
    Ok(raw)
}

/// A file of an incremental backup, put together from the chain: each
/// chunk it needs fetched once, each block written once at its place.
/// Returns the CRC-32C of the result, read back, for the backup_manifest.
async fn write_rebuilt(repo: &Repository, root: &Beneath, file: &BackupFile, chain: &Chain<'_>) -> anyhow::Result<u32> {
    let uses = chain.plan(file).map_err(|reason| RepoError::Corrupt {
        key: chain.newest().map(|b| manifest_key(&b.id)).unwrap_or_default(),
        reason,
    })?;
    let (path, out) = create_file(root, file)?;
    out.set_len(file.size).with_context(|| format!("size {}", path.display()))?;
    let out = std::sync::Arc::new(out);
    // Chunks are fetched a few at a time: a large file is one restore's
    // longest task, and an XORed chunk also reads the whole copy's pages.
    let mut writes = futures::stream::iter(uses.into_iter().map(|use_| {
        let (out, path) = (out.clone(), path.clone());
        async move {
            let raw = fetch_use(repo, chain, file, &use_).await?;
            write_extents(out, raw, use_.extents).await.with_context(|| format!("write {}", path.display()))
        }
    }))
    .buffer_unordered(CHUNKS_PER_FILE);
    while let Some(result) = writes.next().await {
        result?;
    }
    drop(writes);
    out.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o700)).context("chmod")?;
    crc32c_of(out, &path).await
}

/// Chunks of one rebuilt file fetched at once.
pub(crate) const CHUNKS_PER_FILE: usize = 3;

/// Writes the extents of one chunk's bytes at their places in `out`.
async fn write_extents(out: std::sync::Arc<std::fs::File>, raw: Vec<u8>, extents: Vec<Extent>) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        for extent in extents {
            let start = usize::try_from(extent.chunk_offset).unwrap_or(usize::MAX);
            let len = usize::try_from(extent.len).unwrap_or(usize::MAX);
            let bytes = raw.get(start..start.saturating_add(len)).ok_or(std::io::ErrorKind::UnexpectedEof)?;
            for (i, block) in bytes.chunks(WRITE_SIZE).enumerate() {
                out.write_all_at(block, extent.file_offset + (i * WRITE_SIZE) as u64)?;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .context("join a file write")??;
    Ok(())
}

async fn write_file(repo: &Repository, root: &Beneath, file: &BackupFile) -> anyhow::Result<u64> {
    let (path, mut out) = create_file(root, file)?;
    let mut written = 0u64;
    for chunk in &file.chunks {
        let raw = fetch_chunk(repo, chunk, &file.path).await?;
        written += raw.len() as u64;
        out = tokio::task::spawn_blocking(move || {
            for block in raw.chunks(WRITE_SIZE) {
                std::io::Write::write_all(&mut out, block)?;
            }
            Ok::<_, std::io::Error>(out)
        })
        .await
        .context("join a file write")?
        .with_context(|| format!("write {}", path.display()))?;
    }
    if written != file.size {
        return Err(RepoError::Corrupt {
            key: file.path.clone(),
            reason: format!("{written} bytes, manifest says {}", file.size),
        }
        .into());
    }
    out.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o700)).context("chmod")?;
    // Made durable all at once at the end (`sync_tree`), not file by file.
    Ok(written)
}

/// Puts the finished restore `staged` in place of `pgdata`: one rename
/// exchanging the two (or, where the filesystem cannot exchange, the old
/// one renamed aside first), the parent fsynced, then the old data removed.
pub fn swap_in(staged: &Path, pgdata: &Path) -> anyhow::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).context("a path with a NUL byte");
    let (from, to) = (c(staged)?, c(pgdata)?);
    // SAFETY: renameat2(2) with NUL-terminated paths relative to the current directory.
    let exchanged =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_EXCHANGE) };
    let old = if exchanged == 0 {
        staged.to_path_buf()
    } else {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error).with_context(|| format!("swap the restore into {}", pgdata.display()));
        }
        let aside = staging_beside(pgdata, "old")?;
        std::fs::rename(pgdata, &aside).with_context(|| format!("move {} aside", pgdata.display()))?;
        std::fs::rename(staged, pgdata).with_context(|| format!("move the restore into {}", pgdata.display()))?;
        aside
    };
    let parent = tidemark_repo::durable::parent_dir(pgdata);
    tidemark_repo::durable::fsync_dir(parent).with_context(|| format!("fsync {}", parent.display()))?;
    // The restore is in place; what is left of the old data is only in the way.
    if let Err(e) = std::fs::remove_dir_all(&old) {
        tracing::warn!("the replaced data directory is left at {}: {e}", old.display());
    }
    Ok(())
}

#[cfg(test)]
mod database_tests {
    use super::*;
    use tidemark_proto::repo::backup::FileKind;

    fn file(archive: &str, path: &str) -> BackupFile {
        BackupFile {
            archive: archive.into(),
            path: path.into(),
            kind: FileKind::File,
            size: 8192,
            mode: 0o600,
            mtime_unix: 0,
            link_target: None,
            chunks: Vec::new(),
            blocks: None,
            pages_xor: false,
        }
    }

    #[test]
    fn manifest_paths_of_tablespace_files_go_through_pg_tblspc() {
        assert_eq!(manifest_path(&file("base", "base/5/16384")), "base/5/16384");
        assert_eq!(manifest_path(&file("16390", "PG_15_202209061/5/16400")), "pg_tblspc/16390/PG_15_202209061/5/16400");
    }

    #[test]
    fn files_of_other_user_databases_are_left_out() {
        assert_eq!(database_of(&file("base", "base/16384/16385")), Some(16384));
        assert_eq!(database_of(&file("base", "global/1262")), None);
        assert_eq!(database_of(&file("16390", "PG_15_202209061/16384/16400")), Some(16384));
        let keep = [16384u32];
        assert!(!is_skipped(&file("base", "base/16384/16385"), Some(&keep)));
        assert!(is_skipped(&file("base", "base/16999/16385"), Some(&keep)));
        assert!(!is_skipped(&file("base", "base/5/1259"), Some(&keep)), "the postgres database is always kept");
        assert!(!is_skipped(&file("base", "base/16999/16385"), None));
        assert!(!is_skipped(&file("base", "pg_wal/000000010000000000000001"), Some(&keep)));
    }
    #[test]
    fn the_swap_puts_the_restore_in_place_and_removes_the_old_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, data) = (dir.path().join(".data.tidemark-staging"), dir.path().join("data"));
        std::fs::create_dir_all(&staged).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(staged.join("PG_VERSION"), "new").expect("write");
        std::fs::write(data.join("PG_VERSION"), "old").expect("write");
        swap_in(&staged, &data).expect("swap");
        assert_eq!(std::fs::read_to_string(data.join("PG_VERSION")).expect("read"), "new");
        assert!(!staged.exists(), "the old data is removed");
    }
}
