//! `restore --delta`: a backup written onto an existing data directory of
//! the same cluster (a stale copy, the old primary after a failover,
//! yesterday's drill), rewriting only what differs.
//!
//! - Only a directory of the same cluster: its `global/pg_control` (or the
//!   marker of an interrupted delta restore) names the backup's system
//!   identifier. Never next to a running server (checked before, as for
//!   every restore). A tablespace is updated where it goes (its original
//!   location or `--tablespace-map`): a directory that is missing, empty,
//!   or the one the data directory's `pg_tblspc/<OID>` already points to;
//!   any other is refused, as it may be another cluster's.
//! - `global/pg_control` goes first and comes back last, and a marker file
//!   holds the system identifier meanwhile: an interrupted delta restore
//!   leaves a directory PostgreSQL will not start, which the next
//!   `restore --delta` accepts and finishes.
//! - A whole file is compared chunk by chunk (the manifest's CRC-32C of
//!   each chunk against the local bytes): an equal chunk is neither fetched
//!   nor written. A file put together from a chain is compared block by
//!   block against the fetched chunks, and only differing blocks written.
//! - Everything the backup does not list is removed (old WAL in `pg_wal`,
//!   files of dropped relations, `postmaster.pid` of a dead server), a
//!   link where the backup has a directory or file included. Every write is
//!   beneath the data directory or tablespace without following links
//!   (`beneath.rs`), as in a fresh restore.

use crate::beneath::Beneath;
use crate::fetch::{crc32c_of, fetch_use, manifest_path, sync_tree, write_pg_manifest, CHUNKS_PER_FILE};
use crate::tablespaces::Placement;
use anyhow::Context;
use futures::StreamExt;
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tidemark_proto::repo::backup::{manifest_key, BackupFile, BackupManifest, FileKind};
use tidemark_proto::repo::chain::{Chain, BLOCK_SIZE};
use tidemark_repo::{Fail, RepoError, Repository};
use tracing::info;

/// Written while a delta restore is under way; holds the system identifier.
pub(crate) const MARKER: &str = "tidemark-delta-restore";
const CONTROL: &str = "global/pg_control";

/// What a delta restore did.
#[derive(Clone, Debug, Default)]
pub struct DeltaReport {
    pub bytes_written: u64,
    pub bytes_unchanged: u64,
    pub files_removed: u64,
}

/// The system identifier in a pg_control file: its first 8 bytes, in the
/// server's (here little-endian) byte order.
fn control_system_identifier(control: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(control.get(0..8)?.try_into().ok()?))
}

/// The system identifier of the cluster `pgdata` belongs to: from the
/// marker of an interrupted delta restore, else from global/pg_control.
pub fn system_identifier_of(pgdata: &Path) -> Option<String> {
    match std::fs::read_to_string(pgdata.join(MARKER)).ok() {
        Some(text) => Some(text.trim().to_string()),
        None => std::fs::read(pgdata.join(CONTROL))
            .ok()
            .and_then(|c| control_system_identifier(&c))
            .map(|id| id.to_string()),
    }
}

/// Refuses a directory that is not one of the cluster `system_identifier`
/// (or a delta restore of it that was interrupted).
pub fn check_target(pgdata: &Path, system_identifier: &str) -> anyhow::Result<()> {
    match system_identifier_of(pgdata) {
        Some(id) if id == system_identifier => Ok(()),
        Some(id) => Err(Fail::new(
            format!(
                "{} belongs to another cluster (system identifier {id}, the backup's {system_identifier})",
                pgdata.display()
            ),
            "--delta only updates a data directory of the same cluster; restore into an empty directory instead",
        )
        .into()),
        None => Err(Fail::new(
            format!("{} is not a PostgreSQL data directory (no global/pg_control)", pgdata.display()),
            "--delta updates an existing data directory of the same cluster; leave it out to restore into an empty one",
        )
        .into()),
    }
}

/// Brings `pgdata` to the backup (`chain`'s first, with the backups it is
/// based on). See the module comment for the order of things.
/// Refuses a tablespace placement `--delta` must not write into: each must
/// be missing, empty, or where `pgdata`'s `pg_tblspc/<OID>` points now.
pub fn check_placements(pgdata: &Path, manifest: &BackupManifest, placements: &[Placement]) -> anyhow::Result<()> {
    for tablespace in &manifest.tablespaces {
        let placement = placements
            .iter()
            .find(|p| p.oid == tablespace.oid)
            .with_context(|| format!("tablespace {} of backup {} has no place to go", tablespace.oid, manifest.id))?;
        if crate::fetch::is_empty_or_missing(&placement.target)? {
            continue;
        }
        let linked = std::fs::canonicalize(pgdata.join("pg_tblspc").join(tablespace.oid.to_string())).ok();
        if linked.is_none() || linked != std::fs::canonicalize(&placement.target).ok() {
            return Err(Fail::new(
                format!(
                    "tablespace {} would be updated in {}, which is not empty and not where {}'s pg_tblspc/{} points",
                    tablespace.oid,
                    placement.target.display(),
                    pgdata.display(),
                    tablespace.oid
                ),
                "give --tablespace-map OID=DIR with the directory the copy uses, or a new or empty one",
            )
            .into());
        }
    }
    Ok(())
}

/// Brings `pgdata` (and each tablespace, at its placement) to the backup
/// (`chain`'s first, with the backups it is based on). See the module
/// comment for the order of things.
pub async fn apply(
    repo: &Repository,
    chain: &[BackupManifest],
    pgdata: &Path,
    placements: &[Placement],
) -> anyhow::Result<DeltaReport> {
    let manifest = chain.first().context("no backup to restore")?;
    crate::beneath::check_manifest(manifest)?;
    check_placements(pgdata, manifest, placements)?;
    let links = Chain::new(chain).map_err(|reason| RepoError::Corrupt { key: manifest_key(&manifest.id), reason })?;
    let mut paths = vec![("base".to_string(), pgdata.to_path_buf())];
    paths.extend(placements.iter().map(|p| (p.oid.to_string(), p.target.clone())));
    let base = Beneath::open(pgdata)?;
    write_durably(&base, MARKER, manifest.system_identifier.as_bytes())?;
    base.remove(CONTROL)?;
    let mut report = DeltaReport::default();
    let mut roots = Vec::new();
    for (archive, root) in paths {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&root)?;
        report.files_removed += remove_unlisted(&root, &archive, manifest)?;
        roots.push((archive, Beneath::open(&root)?));
    }
    let root_of = |archive: &str| crate::fetch::root_of(&roots, manifest, archive);
    for dir in manifest.files.iter().filter(|f| f.kind == FileKind::Directory) {
        root_of(&dir.archive)?.create_dirs(&dir.path, 0o700)?;
    }
    let (control, files): (Vec<&BackupFile>, Vec<&BackupFile>) =
        manifest.files.iter().filter(|f| f.kind == FileKind::File).partition(|f| f.path == CONTROL);
    let control =
        control.first().copied().with_context(|| format!("backup {} has no global/pg_control", manifest.id))?;
    let links = &links;
    let mut rooted = Vec::new();
    for file in files {
        rooted.push((root_of(&file.archive)?, file));
    }
    let mut results = futures::stream::iter(
        rooted
            .into_iter()
            .map(|(root, file)| async move { sync_file(repo, links, root, file).await.map(|done| (file, done)) }),
    )
    .buffer_unordered(8);
    let mut rebuilt = HashMap::new();
    let mut add = |file: &BackupFile, (written, unchanged, crc): (u64, u64, Option<u32>)| {
        report.bytes_written += written;
        report.bytes_unchanged += unchanged;
        if let Some(crc) = crc {
            rebuilt.insert(manifest_path(file), crc);
        }
    };
    while let Some(result) = results.next().await {
        let (file, done) = result?;
        add(file, done);
    }
    crate::fetch::link_tablespaces(&base, placements)?;
    // Every other file durable before pg_control exists again.
    for (_, root) in &roots {
        sync_tree(root.path())?;
    }
    add(control, sync_file(repo, links, &base, control).await?);
    write_pg_manifest(repo, manifest, &base, &rebuilt).await?;
    sync_tree(pgdata)?;
    std::fs::remove_file(pgdata.join(MARKER)).context("remove the delta restore's marker")?;
    tidemark_repo::durable::fsync_dir(pgdata).context("fsync the data directory")?;
    // On the progress target: the line a restore prints when it is done.
    info!(
        target: tidemark_repo::progress::LOG_TARGET,
        "restore: delta: {} MB written, {} MB already there, {} files removed",
        report.bytes_written >> 20,
        report.bytes_unchanged >> 20,
        report.files_removed
    );
    Ok(report)
}

fn write_durably(root: &Beneath, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let file = root.write_file(name, bytes, 0o600)?;
    file.sync_all().with_context(|| format!("fsync {}", root.join(name).display()))?;
    tidemark_repo::durable::fsync_dir(root.path()).context("fsync the data directory")
}

/// Removes every file, link and directory under `root` (where `archive`
/// goes: `base` the data directory, an OID its tablespace) that the backup
/// does not list (a listed path of another kind goes too). Returns how many.
fn remove_unlisted(root: &Path, archive: &str, manifest: &BackupManifest) -> anyhow::Result<u64> {
    let listed: HashMap<&str, &FileKind> =
        manifest.files.iter().filter(|f| f.archive == archive).map(|f| (f.path.as_str(), &f.kind)).collect();
    let mut removed = 0;
    let mut stack = vec![String::new()];
    while let Some(relative) = stack.pop() {
        let dir = if relative.is_empty() { root.to_path_buf() } else { root.join(&relative) };
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry.with_context(|| format!("read {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let path_text = if relative.is_empty() { name.clone() } else { format!("{relative}/{name}") };
            let kind = entry.file_type().with_context(|| format!("inspect {}", entry.path().display()))?;
            let local = if kind.is_dir() {
                FileKind::Directory
            } else if kind.is_symlink() {
                FileKind::Symlink
            } else {
                FileKind::File
            };
            if relative.is_empty() && name == MARKER && archive == "base" {
                continue;
            }
            match listed.get(path_text.as_str()) {
                Some(&wanted) if *wanted == local => {
                    if local == FileKind::Directory {
                        stack.push(path_text);
                    }
                }
                _ => {
                    let path = entry.path();
                    let result = if local == FileKind::Directory {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    result.with_context(|| format!("remove {}", path.display()))?;
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// One file brought to the backup's content: (bytes written, bytes that
/// were already right, the CRC-32C of a file put together from a chain).
async fn sync_file(
    repo: &Repository,
    chain: &Chain<'_>,
    root: &Beneath,
    file: &BackupFile,
) -> anyhow::Result<(u64, u64, Option<u32>)> {
    let path = root.join(&file.path);
    let out = Arc::new(root.open_file(&file.path, 0o600)?);
    let (mut written, mut unchanged) = (0u64, 0u64);
    let uses = chain.plan(file).map_err(|reason| RepoError::Corrupt {
        key: chain.newest().map(|b| manifest_key(&b.id)).unwrap_or_default(),
        reason,
    })?;
    // A few chunks at a time: an XORed chunk also reads the whole copy's pages.
    let mut updates = futures::stream::iter(uses.into_iter().map(|use_| {
        let (out, path) = (out.clone(), path.clone());
        async move {
            // A whole file's chunk is one extent: its CRC-32C says whether the
            // local bytes are already right, without fetching it.
            if let [extent] = use_.extents.as_slice() {
                if file.blocks.is_none() && extent.len == use_.chunk.raw_len {
                    let local = read_range(&out, extent.file_offset, extent.len).await?;
                    if local.len() as u64 == extent.len && crc32c::crc32c(&local) == use_.chunk.crc32c {
                        return Ok((0, extent.len));
                    }
                }
            }
            let raw = fetch_use(repo, chain, file, &use_).await?;
            tokio::task::spawn_blocking(move || {
                let (mut written, mut unchanged) = (0, 0);
                for extent in &use_.extents {
                    let (w, u) = write_differing(&out, &raw, extent)?;
                    (written, unchanged) = (written + w, unchanged + u);
                }
                Ok::<_, std::io::Error>((written, unchanged))
            })
            .await
            .context("join a file write")?
            .with_context(|| format!("write {}", path.display()))
        }
    }))
    .buffer_unordered(CHUNKS_PER_FILE);
    while let Some(result) = updates.next().await {
        let (w, u) = result?;
        written += w;
        unchanged += u;
    }
    drop(updates);
    out.set_len(file.size).with_context(|| format!("size {}", path.display()))?;
    out.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o700)).context("chmod")?;
    let crc = match file.blocks {
        Some(_) => Some(crc32c_of(out, &path).await?),
        None => None,
    };
    Ok((written, unchanged, crc))
}

async fn read_range(file: &Arc<std::fs::File>, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buffer = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let mut filled = 0;
        while filled < buffer.len() {
            let n = file.read_at(buffer.get_mut(filled..).unwrap_or_default(), offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buffer.truncate(filled);
        Ok::<_, std::io::Error>(buffer)
    })
    .await
    .context("join a read")?
    .context("read a local file")
}

/// Writes the blocks of `extent` whose local bytes differ from the chunk's.
fn write_differing(
    out: &std::fs::File,
    raw: &[u8],
    extent: &tidemark_proto::repo::chain::Extent,
) -> std::io::Result<(u64, u64)> {
    let start = usize::try_from(extent.chunk_offset).unwrap_or(usize::MAX);
    let len = usize::try_from(extent.len).unwrap_or(usize::MAX);
    let bytes = raw.get(start..start.saturating_add(len)).ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let mut local = vec![0u8; BLOCK_SIZE as usize];
    let (mut written, mut unchanged) = (0, 0);
    for (i, block) in bytes.chunks(BLOCK_SIZE as usize).enumerate() {
        let at = extent.file_offset + i as u64 * BLOCK_SIZE;
        let buffer = local.get_mut(..block.len()).unwrap_or_default();
        let n = out.read_at(buffer, at)?;
        if n == block.len() && buffer == block {
            unchanged += block.len() as u64;
        } else {
            out.write_all_at(block, at)?;
            written += block.len() as u64;
        }
    }
    Ok((written, unchanged))
}

/// Paths the backup lists, for tests.
#[cfg(test)]
fn listed(manifest: &BackupManifest) -> std::collections::BTreeSet<&str> {
    manifest.files.iter().map(|f| f.path.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_identifier_is_pg_controls_first_eight_bytes() {
        let mut control = 7_300_000_000_000_000_123u64.to_le_bytes().to_vec();
        control.extend_from_slice(&[0; 100]);
        assert_eq!(control_system_identifier(&control), Some(7_300_000_000_000_000_123));
        assert_eq!(control_system_identifier(&[1, 2]), None);
    }

    #[test]
    fn only_a_directory_of_the_same_cluster_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_target(dir.path(), "42").is_err(), "no pg_control");
        std::fs::create_dir(dir.path().join("global")).expect("mkdir");
        std::fs::write(dir.path().join(CONTROL), [42u64.to_le_bytes().as_slice(), &[0; 50]].concat()).expect("write");
        assert!(check_target(dir.path(), "42").is_ok());
        assert!(check_target(dir.path(), "43").unwrap_err().to_string().contains("another cluster"));
        // Interrupted: pg_control gone, the marker names the cluster.
        std::fs::remove_file(dir.path().join(CONTROL)).expect("rm");
        std::fs::write(dir.path().join(MARKER), "42").expect("write");
        assert!(check_target(dir.path(), "42").is_ok());
    }

    #[test]
    fn unlisted_paths_and_kind_changes_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["base/5", "pg_wal/archive_status", "old"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for f in ["base/5/16384", "base/5/99999", "pg_wal/000000010000000000000001", "old/x", "PG_VERSION", MARKER] {
            std::fs::write(root.join(f), "x").expect("write");
        }
        std::fs::create_dir(root.join("postgresql.conf")).expect("a directory where a file belongs");
        let text = r#"{"format_version":1,"id":"A","label":"","system_identifier":"1","server_version_num":150000,
            "timeline":1,"start_lsn":"0/3000000","end_lsn":"0/3000100","start_time":"","end_time":"","tablespaces":[],
            "files":[{"archive":"base","path":"base","kind":"directory","size":0,"mode":448,"mtime_unix":0,"chunks":[]},
            {"archive":"base","path":"base/5","kind":"directory","size":0,"mode":448,"mtime_unix":0,"chunks":[]},
            {"archive":"base","path":"base/5/16384","kind":"file","size":1,"mode":384,"mtime_unix":0,"chunks":[]},
            {"archive":"base","path":"pg_wal","kind":"directory","size":0,"mode":448,"mtime_unix":0,"chunks":[]},
            {"archive":"base","path":"pg_wal/archive_status","kind":"directory","size":0,"mode":448,"mtime_unix":0,"chunks":[]},
            {"archive":"base","path":"PG_VERSION","kind":"file","size":1,"mode":384,"mtime_unix":0,"chunks":[]},
            {"archive":"base","path":"postgresql.conf","kind":"file","size":1,"mode":384,"mtime_unix":0,"chunks":[]}],
            "pg_manifest_key":"","bytes":0,"stored_bytes":0}"#;
        let manifest = BackupManifest::from_json(text.as_bytes()).expect("manifest");
        assert_eq!(remove_unlisted(root, "base", &manifest).expect("remove"), 4);
        assert!(root.join(MARKER).exists(), "the marker stays until the end");
        let mut left = Vec::new();
        for path in listed(&manifest) {
            if root.join(path).exists() {
                left.push(path);
            }
        }
        assert_eq!(left, vec!["PG_VERSION", "base", "base/5", "base/5/16384", "pg_wal", "pg_wal/archive_status"]);
        assert!(!root.join("old").exists() && !root.join("base/5/99999").exists());
    }

    #[test]
    fn a_tablespace_is_updated_only_where_the_copy_keeps_it_or_where_nothing_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pgdata, used, other) = (dir.path().join("data"), dir.path().join("ts"), dir.path().join("elsewhere"));
        for d in [pgdata.join("pg_tblspc"), used.join("PG_15_1"), other.join("PG_15_1")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::os::unix::fs::symlink(&used, pgdata.join("pg_tblspc/16384")).expect("link");
        let text = r#"{"format_version":1,"id":"A","label":"","system_identifier":"1","server_version_num":150000,
            "timeline":1,"start_lsn":"0/3000000","end_lsn":"0/3000100","start_time":"","end_time":"",
            "tablespaces":[{"oid":16384,"location":"/src/ts"}],"files":[],"pg_manifest_key":"","bytes":0,"stored_bytes":0}"#;
        let manifest = BackupManifest::from_json(text.as_bytes()).expect("manifest");
        let at =
            |target: &Path| vec![Placement { oid: 16384, original: "/src/ts".into(), target: target.to_path_buf() }];
        assert!(check_placements(&pgdata, &manifest, &at(&used)).is_ok(), "where the copy's link points");
        assert!(check_placements(&pgdata, &manifest, &at(&dir.path().join("new"))).is_ok(), "a missing directory");
        let refused = check_placements(&pgdata, &manifest, &at(&other)).expect_err("another non-empty directory");
        assert!(refused.to_string().contains("not where"), "{refused}");
        std::fs::remove_file(pgdata.join("pg_tblspc/16384")).expect("unlink");
        assert!(check_placements(&pgdata, &manifest, &at(&used)).is_err(), "no link: a non-empty directory is refused");
        assert!(check_placements(&pgdata, &manifest, &[]).is_err(), "a tablespace without a placement");
    }
}
