//! Incremental backups of PostgreSQL 13–16 that read only changed blocks.
//!
//! BASE_BACKUP before 17 sends every file whole, so an incremental backup
//! over it reads the whole database. This path uses the low-level backup
//! API over an ordinary SQL session instead: `pg_backup_start` (13–14:
//! `pg_start_backup`, non-exclusive), a WAL switch so that the segment
//! holding the start is summarized, the WAL block map of every segment from
//! the base's start to this one's (`wal::blockmap`, kept in the summaries),
//! then each file listed with `pg_ls_dir`/`pg_stat_file` and read with
//! `pg_read_binary_file(path, offset, length)`: a relation's main fork only
//! at the blocks the map names (plus blocks past the base's length) unless
//! they are more than half of it, every other file whole; `pg_backup_stop` last, whose label and tablespace map
//! become files of the backup. The same files are left out as BASE_BACKUP
//! leaves out (basebackup.c), and a `backup_manifest` in the server's format
//! is written for the restore to complete (it sets the checksum of every
//! file it rebuilds from the chain).
//!
//! When the map is incomplete (a segment unsummarized, a record the decoder
//! could not take apart) every relation file is read whole and stored by
//! page LSN, as over BASE_BACKUP: never a missing block.

use super::{Entry, Reading, Receiver};
use anyhow::Context;
use std::time::Duration;
use tidemark_proto::base_backup::{BackupResults, TablespaceRow};
use tidemark_proto::repo::backup::{BackupManifest, FileKind};
use tidemark_proto::repo::chain::{block_file_of, BLOCK_SIZE};
use tidemark_proto::repo::layout::summary_key;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::wal::blockmap::{ChangedSince, Reads};
use tidemark_proto::wal::summary::SegmentSummary;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::Repository;
use tokio_postgres::Client;
use tracing::warn;

/// How long the backup waits for the agent to summarize the WAL up to its start.
const MAP_WAIT: Duration = Duration::from_secs(120);
/// Bytes asked of the server per query.
const READ_PIECE: u64 = 8 << 20;

/// What the SQL path adds to the received files, for `backup::finish`.
pub(crate) struct SqlBackup {
    pub results: BackupResults,
    pub pg_manifest: Vec<u8>,
    /// File bytes read from the server.
    pub read_bytes: u64,
    /// Whether relation files were read by the WAL map (else whole).
    pub by_map: bool,
}

/// The functions the SQL path calls, by major version.
fn functions(major: u32) -> [&'static str; 6] {
    let (start, stop) = if major >= 15 {
        ("pg_backup_start(text, boolean)", "pg_backup_stop(boolean)")
    } else {
        ("pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)")
    };
    [
        start,
        stop,
        "pg_switch_wal()",
        "pg_ls_dir(text, boolean, boolean)",
        "pg_stat_file(text, boolean)",
        "pg_read_binary_file(text, bigint, bigint, boolean)",
    ]
}

/// An SQL session that may take the backup, or why not (logged by the caller).
pub(crate) async fn session(settings: &crate::config::Settings, major: u32) -> Result<Client, String> {
    let client =
        tidemark_pg::sql::connect(&settings.conn).await.map_err(|e| format!("cannot open an SQL session: {e}"))?;
    let names: Vec<String> = functions(major).iter().map(|f| f.to_string()).collect();
    let missing: Vec<String> = client
        .query("SELECT f FROM unnest($1::text[]) AS f WHERE NOT has_function_privilege(f, 'EXECUTE')", &[&names])
        .await
        .map_err(|e| format!("cannot check the role's privileges: {e}"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the role may not execute {} (GRANT EXECUTE ON FUNCTION … TO it, or use a superuser)",
            missing.join(", ")
        ));
    }
    Ok(client)
}

/// Takes the backup into `receiver` (which holds the base's files).
pub(crate) async fn backup(
    client: &Client,
    repo: &Repository,
    receiver: &mut Receiver<'_>,
    base: &BackupManifest,
    label: &str,
    fast: bool,
    major: u32,
) -> anyhow::Result<SqlBackup> {
    let start_sql = if major >= 15 {
        "SELECT pg_backup_start($1, $2)::text"
    } else {
        "SELECT pg_start_backup($1, $2, false)::text"
    };
    let start: Lsn = client
        .query_one(start_sql, &[&label, &fast])
        .await
        .context("start the backup")?
        .get::<_, String>(0)
        .parse()
        .map_err(|e| anyhow::anyhow!("start LSN: {e}"))?;
    // Until pg_backup_stop, an error leaves the backup running in this
    // session, which ends with it (the server then aborts the backup).
    client
        .execute("SELECT pg_switch_wal()", &[])
        .await
        .context("switch WAL so that the backup's start is summarized")?;
    let timeline = TimelineId(base.timeline.0);
    let map = changed_since(repo, timeline, base.start_lsn, start).await?;
    let tablespaces = tablespaces(client).await?;
    let mode = client.query_one("SHOW data_directory_mode", &[]).await?.get::<_, String>(0);
    let group = mode.trim_start_matches('0').starts_with("75");
    let version_dir = version_directory(client, major).await?;
    // The base's size is the estimate: most files are the same size.
    let progress = tidemark_repo::progress::Progress::bytes("backup", base.bytes);
    let mut walk = Walk {
        client,
        receiver,
        map: map.as_ref(),
        group,
        read_bytes: 0,
        manifest: Vec::new(),
        progress,
        cross_checked: 0,
        map_missed: 0,
    };
    for tablespace in &tablespaces {
        let oid = tablespace.oid.context("a tablespace without an OID")?;
        walk.receiver.archive = oid.to_string();
        let root = format!("pg_tblspc/{oid}");
        walk.directory(&root, &version_dir).await?;
    }
    walk.receiver.archive = "base".to_string();
    walk.directory(".", "").await?;
    if walk.cross_checked > 0 && walk.map_missed == 0 {
        tracing::info!("the page LSNs of {} files read whole agree with the WAL map", walk.cross_checked);
    }
    let stop_sql = if major >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let stopped = client.query_one(stop_sql, &[]).await.context("stop the backup")?;
    let end: Lsn = stopped.get::<_, String>(0).parse().map_err(|e| anyhow::anyhow!("stop LSN: {e}"))?;
    let label_file: String = stopped.get(1);
    let map_file: Option<String> = stopped.get(2);
    let started_on = label_timeline(&label_file).context("the backup label names no START TIMELINE")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    walk.small_file("backup_label", label_file.as_bytes(), now).await?;
    if let Some(map_file) = map_file.filter(|m| !m.is_empty()) {
        walk.small_file("tablespace_map", map_file.as_bytes(), now).await?;
    }
    walk.progress.set(walk.receiver.bytes);
    walk.progress.finish();
    let by_map = walk.map.is_some();
    let (read_bytes, files) = (walk.read_bytes, walk.manifest);
    let mut rows = tablespaces;
    rows.push(TablespaceRow { oid: None, location: None, size_kb: None });
    let results = BackupResults { start: Some((start, started_on)), tablespaces: Some(rows), end: Some(end) };
    let pg_manifest = server_manifest(&files, started_on, start, end);
    Ok(SqlBackup { results, pg_manifest, read_bytes, by_map })
}

/// The union of the block maps of the segments from `from`'s to `to`'s;
/// `None` (logged) when one is missing or has no map. The agent summarizes
/// segments in order, so only the last is waited for: once it is there, an
/// earlier one that is missing never will be (the agent was not streaming).
async fn changed_since(
    repo: &Repository,
    timeline: TimelineId,
    from: Lsn,
    to: Lsn,
) -> anyhow::Result<Option<ChangedSince>> {
    let size = repo.meta().await?.wal_segment_size;
    let key = |segment_no| summary_key(SegmentId { timeline, segment_no }, size);
    let last = key(to.segment_no(size));
    let deadline = tokio::time::Instant::now() + MAP_WAIT;
    while !repo.exists(&last).await? {
        if tokio::time::Instant::now() >= deadline {
            warn!(key = %last, "no WAL summary yet (is tidemark-agent run streaming?): reading every relation file whole");
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut since = ChangedSince::default();
    for segment_no in from.segment_no(size)..=to.segment_no(size) {
        let key = key(segment_no);
        let Some(raw) = repo.get(&key).await? else {
            warn!(%key, "the WAL has no summary there (the agent was not streaming): reading every relation file whole");
            return Ok(None);
        };
        let summary = SegmentSummary::from_json(&raw).map_err(|reason| anyhow::anyhow!("{key}: {reason}"))?;
        match &summary.blocks {
            Some(blocks) => since.add(blocks),
            None => {
                warn!(%key, "the WAL summary has no block map: reading every relation file whole");
                return Ok(None);
            }
        }
    }
    Ok(Some(since))
}

/// The tablespaces besides the data directory, as BASE_BACKUP lists them.
async fn tablespaces(client: &Client) -> anyhow::Result<Vec<TablespaceRow>> {
    let rows = client
        .query(
            "SELECT oid::int8, pg_tablespace_location(oid) FROM pg_tablespace \
             WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid",
            &[],
        )
        .await
        .context("list tablespaces")?;
    Ok(rows
        .iter()
        .map(|row| TablespaceRow {
            oid: u32::try_from(row.get::<_, i64>(0)).ok(),
            location: Some(row.get(1)),
            size_kb: None,
        })
        .collect())
}

/// `PG_<major>_<catalog version>`: a tablespace's directory for this server.
async fn version_directory(client: &Client, major: u32) -> anyhow::Result<String> {
    let row = client.query_one("SELECT catalog_version_no::int8 FROM pg_control_system()", &[]).await?;
    Ok(format!("PG_{major}_{}", row.get::<_, i64>(0)))
}

fn label_timeline(label: &str) -> Option<TimelineId> {
    let line = label.lines().find_map(|l| l.strip_prefix("START TIMELINE: "))?;
    line.trim().parse().ok().map(TimelineId)
}

/// One file's line in the server's manifest: path, size, mtime, CRC-32C
/// (`None`: a file the restore rebuilds from the chain and checksums then).
struct ManifestFile {
    path: String,
    size: u64,
    mtime_unix: i64,
    crc32c: Option<u32>,
}

/// Walks the server's directories and reads their files into the receiver.
struct Walk<'a, 'r, 'b> {
    client: &'a Client,
    receiver: &'a mut Receiver<'r>,
    map: Option<&'b ChangedSince>,
    /// data_directory_mode 0750: group-readable modes.
    group: bool,
    read_bytes: u64,
    manifest: Vec<ManifestFile>,
    /// A bar on a terminal, a log line every few seconds otherwise.
    progress: tidemark_repo::progress::Progress,
    /// Files read whole checked against the WAL map, and the changed
    /// blocks in them it did not name.
    cross_checked: u64,
    map_missed: u64,
}

/// One listed name of a directory.
struct Listed {
    name: String,
    is_dir: bool,
    size: u64,
    mtime_unix: i64,
}

/// Directories whose contents BASE_BACKUP leaves out (the directory itself is kept).
const EMPTY_DIRECTORIES: [&str; 9] = [
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    "pg_wal",
    "pg_tblspc",
];
/// Files of the data directory BASE_BACKUP leaves out (the label and map come from pg_backup_stop).
const LEFT_OUT: [&str; 8] = [
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
    "backup_label.old",
];

impl Walk<'_, '_, '_> {
    /// Lists `dir` (`.` for the data directory, `pg_tblspc/<oid>` for a
    /// tablespace, whose only directory taken is `only`) depth first.
    async fn directory(&mut self, root: &str, only: &str) -> anyhow::Result<()> {
        let mut stack: Vec<String> = vec![String::new()];
        let archive_is_base = self.receiver.archive == "base";
        while let Some(relative) = stack.pop() {
            let on_server = if relative.is_empty() { root.to_string() } else { format!("{root}/{relative}") };
            let listed = self.list(&on_server).await?;
            let unlogged: Vec<String> = listed
                .iter()
                .filter_map(|l| l.name.strip_suffix("_init").filter(|r| r.bytes().all(|b| b.is_ascii_digit())))
                .map(str::to_string)
                .collect();
            let mut subdirectories = Vec::new();
            for entry in listed {
                let path = if relative.is_empty() { entry.name.clone() } else { format!("{relative}/{}", entry.name) };
                if relative.is_empty() && !only.is_empty() && entry.name != only {
                    continue;
                }
                if left_out(&entry.name, &unlogged, archive_is_base && relative.is_empty()) {
                    continue;
                }
                if entry.is_dir {
                    self.begin(&path, FileKind::Directory, 0, entry.mtime_unix, Reading::Whole);
                    self.receiver.end_of_entry().await?;
                    let keep_contents = !(archive_is_base && EMPTY_DIRECTORIES.contains(&path.as_str()));
                    if keep_contents {
                        subdirectories.push(path);
                    } else if path == "pg_wal" {
                        self.begin("pg_wal/archive_status", FileKind::Directory, 0, entry.mtime_unix, Reading::Whole);
                        self.receiver.end_of_entry().await?;
                    }
                } else {
                    self.file(&on_server, &path, &entry).await?;
                }
            }
            // Depth first, in name order.
            stack.extend(subdirectories.into_iter().rev());
        }
        Ok(())
    }

    async fn list(&self, dir: &str) -> anyhow::Result<Vec<Listed>> {
        let rows = self
            .client
            .query(
                "SELECT name, s.isdir, s.size, extract(epoch FROM s.modification)::int8 \
                 FROM pg_ls_dir($1, true, false) AS name, LATERAL pg_stat_file($1 || '/' || name, true) AS s \
                 WHERE s.size IS NOT NULL ORDER BY name",
                &[&dir],
            )
            .await
            .with_context(|| format!("list {dir} on the server"))?;
        Ok(rows
            .iter()
            .map(|row| Listed {
                name: row.get(0),
                is_dir: row.get(1),
                size: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                mtime_unix: row.get(3),
            })
            .collect())
    }

    fn begin(&mut self, path: &str, kind: FileKind, size: u64, mtime_unix: i64, reading: Reading) {
        let mode = match (&kind, self.group) {
            (FileKind::Directory, false) => 0o700,
            (FileKind::Directory, true) => 0o750,
            (_, false) => 0o600,
            (_, true) => 0o640,
        };
        let entry = Entry { path: path.to_string(), kind, size, mode, mtime_unix, link_target: None };
        self.receiver.begin_entry(entry, (path.to_string(), reading));
    }

    /// A file read whole although the map named its blocks: every page
    /// whose LSN says it changed should be one the map named. One that is
    /// not was stored all the same (the page LSN decides); the warning says
    /// the map missed it, which would make a read by the map miss a block.
    fn cross_check(&mut self, path: &str, stored: &[[u32; 2]], map: &[[u32; 2]]) {
        let (missed, first) = tidemark_proto::wal::blockmap::blocks_not_in(stored, map);
        self.cross_checked += 1;
        if missed > 0 {
            self.map_missed += missed;
            warn!(
                path,
                missed,
                first_block = first,
                "the WAL map missed changed blocks of this file (stored from their page LSNs); please report it"
            );
        }
    }

    /// Reads one file: by the map, by page LSN, or whole.
    async fn file(&mut self, on_server: &str, path: &str, listed: &Listed) -> anyhow::Result<()> {
        let server_path = format!("{on_server}/{}", listed.name);
        let size = listed.size;
        let archive = self.receiver.archive.clone();
        let base_file = self.receiver.previous.get(&(archive.as_str(), path)).copied();
        let reads = match (block_file_of(&archive, path), base_file, self.map) {
            (Some((rel, first_block)), Some(old), Some(map))
                if old.kind == FileKind::File
                    && old.size.is_multiple_of(BLOCK_SIZE)
                    && size.is_multiple_of(BLOCK_SIZE) =>
            {
                let blocks = u32::try_from(size / BLOCK_SIZE).context("a relation file of more than 2^32 blocks")?;
                let base_blocks = u32::try_from(old.size / BLOCK_SIZE).unwrap_or(u32::MAX);
                map.reads(rel, first_block, blocks, base_blocks)
            }
            _ => Reads::Whole,
        };
        // Most blocks changed: one sequential read of the file is cheaper
        // than many scattered ones (the page LSNs then pick the changed ones,
        // and are checked against the map).
        let (reads, by_map) = match reads {
            Reads::Blocks(ranges) if chosen_blocks(&ranges) * BLOCK_SIZE * 2 > size => (Reads::Whole, Some(ranges)),
            other => (other, None),
        };
        match reads {
            Reads::Blocks(ranges) => {
                self.begin(path, FileKind::File, size, listed.mtime_unix, Reading::Chosen { ranges: ranges.clone() });
                let pieces: Vec<(i64, i64)> = ranges
                    .iter()
                    .flat_map(|&[first, count]| pieces(u64::from(first) * BLOCK_SIZE, u64::from(count) * BLOCK_SIZE))
                    .collect();
                for batch in pieces.chunks(256) {
                    self.read(&server_path, batch, None).await?;
                }
                self.receiver.end_of_entry().await?;
                self.manifest.push(ManifestFile {
                    path: self.manifest_path(path),
                    size,
                    mtime_unix: listed.mtime_unix,
                    crc32c: None,
                });
            }
            Reads::Whole => {
                let reading =
                    self.receiver.block_filter(path, size, &FileKind::File).map_or(Reading::Whole, Reading::Blocks);
                let rebuilt = matches!(reading, Reading::Blocks(_));
                self.begin(path, FileKind::File, size, listed.mtime_unix, reading);
                let mut crc = 0u32;
                for piece in pieces(0, size) {
                    self.read(&server_path, &[piece], Some(&mut crc)).await?;
                }
                self.receiver.end_of_entry().await?;
                let stored = self.receiver.files.last().and_then(|f| f.blocks.clone());
                if let (Some(map), Some(stored)) = (by_map, stored) {
                    self.cross_check(path, &stored, &map);
                }
                let crc32c = (!rebuilt).then_some(crc);
                self.manifest.push(ManifestFile {
                    path: self.manifest_path(path),
                    size,
                    mtime_unix: listed.mtime_unix,
                    crc32c,
                });
            }
        }
        Ok(())
    }

    /// Reads `(offset, length)` pieces of a file in one query and passes
    /// them on; a piece the file no longer has (it shrank or went away
    /// since it was listed) is zeros, which replay from the backup's start
    /// truncates or removes, as it does for BASE_BACKUP.
    async fn read(
        &mut self,
        server_path: &str,
        pieces: &[(i64, i64)],
        mut crc: Option<&mut u32>,
    ) -> anyhow::Result<()> {
        let offsets: Vec<i64> = pieces.iter().map(|p| p.0).collect();
        let lengths: Vec<i64> = pieces.iter().map(|p| p.1).collect();
        let rows = self
            .client
            .query(
                "SELECT pg_read_binary_file($1, o, l, true) FROM unnest($2::int8[], $3::int8[]) \
                 WITH ORDINALITY AS r(o, l, n) ORDER BY n",
                &[&server_path, &offsets, &lengths],
            )
            .await
            .with_context(|| format!("read {server_path} on the server"))?;
        anyhow::ensure!(
            rows.len() == pieces.len(),
            "the server answered {} of {} reads of {server_path}",
            rows.len(),
            pieces.len()
        );
        for (row, &(_, length)) in rows.iter().zip(pieces) {
            let mut bytes: Vec<u8> = row.get::<_, Option<Vec<u8>>>(0).unwrap_or_default();
            self.read_bytes += bytes.len() as u64;
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            bytes.truncate(length);
            bytes.resize(length, 0);
            if let Some(crc) = crc.as_deref_mut() {
                *crc = crc32c::crc32c_append(*crc, &bytes);
            }
            self.receiver.entry_data(&bytes).await?;
        }
        self.progress.set(self.receiver.bytes);
        Ok(())
    }

    /// A file whose bytes are in hand (the label, the tablespace map).
    async fn small_file(&mut self, path: &str, bytes: &[u8], mtime_unix: i64) -> anyhow::Result<()> {
        self.receiver.archive = "base".to_string();
        self.begin(path, FileKind::File, bytes.len() as u64, mtime_unix, Reading::Whole);
        self.receiver.entry_data(bytes).await?;
        self.receiver.end_of_entry().await?;
        self.manifest.push(ManifestFile {
            path: path.to_string(),
            size: bytes.len() as u64,
            mtime_unix,
            crc32c: Some(crc32c::crc32c(bytes)),
        });
        Ok(())
    }

    /// The path the server's manifest gives a file of the current archive.
    fn manifest_path(&self, path: &str) -> String {
        match self.receiver.archive.as_str() {
            "base" => path.to_string(),
            oid => format!("pg_tblspc/{oid}/{path}"),
        }
    }
}

fn chosen_blocks(ranges: &[[u32; 2]]) -> u64 {
    ranges.iter().map(|[_, count]| u64::from(*count)).sum()
}

/// `(offset, length)` pieces of at most READ_PIECE bytes covering `length` bytes from `offset`.
fn pieces(offset: u64, length: u64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < length {
        let take = READ_PIECE.min(length - at);
        out.push(((offset + at) as i64, take as i64));
        at += take;
    }
    out
}

/// Whether BASE_BACKUP leaves a name out: temporary files, the files it
/// never copies (at the data directory's top), and the other forks of
/// unlogged relations (those with an init fork), whose contents are reset
/// at startup.
fn left_out(name: &str, unlogged: &[String], top: bool) -> bool {
    if name.starts_with("pgsql_tmp") || name.starts_with("pg_internal.init") {
        return true;
    }
    if top && LEFT_OUT.contains(&name) {
        return true;
    }
    // Temporary relations: t<backend>_<relfilenode>[...].
    if let Some(rest) = name.strip_prefix('t') {
        if let Some((backend, rel)) = rest.split_once('_') {
            if !backend.is_empty()
                && backend.bytes().all(|b| b.is_ascii_digit())
                && rel.bytes().next().is_some_and(|b| b.is_ascii_digit())
            {
                return true;
            }
        }
    }
    let relation = name.split(['.', '_']).next().unwrap_or(name);
    !name.ends_with("_init") && unlogged.iter().any(|u| u == relation)
}

/// The server's `backup_manifest` (version 1, as PostgreSQL 13–16 write
/// it) for these files; a file without a CRC gets zeros, which the restore
/// replaces once it has rebuilt the file.
fn server_manifest(files: &[ManifestFile], timeline: TimelineId, start: Lsn, end: Lsn) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut text = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [");
    for (n, file) in files.iter().enumerate() {
        let separator = if n == 0 { "\n" } else { ",\n" };
        let modified = time::OffsetDateTime::from_unix_timestamp(file.mtime_unix)
            .ok()
            .and_then(|t| {
                t.format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]")).ok()
            })
            .unwrap_or_else(|| "1970-01-01 00:00:00".to_string());
        let checksum: String = file.crc32c.unwrap_or(0).to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let path = serde_json::to_string(&file.path).unwrap_or_default();
        text.push_str(&format!(
            "{separator}{{ \"Path\": {path}, \"Size\": {}, \"Last-Modified\": \"{modified} GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{checksum}\" }}",
            file.size
        ));
    }
    text.push_str(&format!(
        "\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {}, \"Start-LSN\": \"{start}\", \"End-LSN\": \"{end}\" }}\n],\n",
        timeline.0
    ));
    let digest: String = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    text.push_str(&format!("\"Manifest-Checksum\": \"{digest}\"}}\n"));
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_left_out_as_base_backup_leaves_them() {
        let unlogged = vec!["16400".to_string()];
        for name in
            ["pgsql_tmp123", "pg_internal.init", "t3_16500", "t12_16500.1", "16400", "16400.1", "16400_fsm", "16400_vm"]
        {
            assert!(left_out(name, &unlogged, false), "{name}");
        }
        for name in ["16400_init", "16401", "16401_vm", "PG_VERSION", "tablespace_map"] {
            assert!(!left_out(name, &unlogged, false), "{name}");
        }
        assert!(left_out("postmaster.pid", &[], true));
        assert!(left_out("backup_label", &[], true));
        assert!(!left_out("postgresql.conf", &[], true));
    }

    #[test]
    fn the_manifest_checksum_covers_everything_before_it() {
        use sha2::{Digest, Sha256};
        let files = [
            ManifestFile { path: "backup_label".into(), size: 3, mtime_unix: 0, crc32c: Some(0x0102_0304) },
            ManifestFile { path: "base/5/16384".into(), size: 8192, mtime_unix: 86_400, crc32c: None },
        ];
        let text =
            String::from_utf8(server_manifest(&files, TimelineId(1), Lsn(0x2000028), Lsn(0x2000100))).expect("utf-8");
        let (body, checksum) = text.split_at(text.rfind("\"Manifest-Checksum\"").expect("checksum line"));
        let digest: String = Sha256::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert!(checksum.contains(&digest));
        assert!(body.contains("{ \"Path\": \"backup_label\", \"Size\": 3, \"Last-Modified\": \"1970-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"04030201\" }"));
        assert!(body.contains("\"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\""));
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(parsed["Files"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn pieces_cover_the_length() {
        assert_eq!(pieces(0, 0), vec![]);
        assert_eq!(pieces(8192, 8192), vec![(8192, 8192)]);
        let big = pieces(0, READ_PIECE * 2 + 1);
        assert_eq!(big.len(), 3);
        assert_eq!(big[2], ((READ_PIECE * 2) as i64, 1));
    }
}
