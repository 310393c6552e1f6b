//! `tidemark-agent backup`: a base backup over the replication protocol
//! (BASE_BACKUP, PostgreSQL 15+ syntax), stored as chunk objects plus a
//! manifest written last. See `tidemark_proto::repo::backup` for the layout.
//!
//! Chunks are compressed and stored concurrently (a few at a time, on all
//! cores) while the stream continues; a chunk equal to the previous backup's
//! chunk at the same place is referenced instead of stored again. An
//! incremental backup stores only the changed blocks of relation files
//! (`incremental.rs`).

pub(crate) mod sql;

use crate::config::Settings;
use crate::incremental::BlockFilter;
use crate::session;
use anyhow::Context;
use std::collections::HashMap;
use std::sync::Arc;
use tidemark_pg::{Connection, QueryEvent};
use tidemark_proto::base_backup::{self, BackupMessage, BackupResults, Row};
use tidemark_proto::incremental_file::{self, combined_backup_label, IncrementalFile};
use tidemark_proto::repo::backup::{
    chunk_key, manifest_key, pg_manifest_key, BackupFile, BackupManifest, ChunkRef, FileKind, CHUNK_SIZE,
    FORMAT_VERSION, INCREMENTAL_FORMAT_VERSION, XOR_FORMAT_VERSION,
};
use tidemark_proto::repo::chain::{is_block_file, BLOCK_SIZE};
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::tar::{EntryKind, TarEvent, TarReader};
use tidemark_proto::Lsn;
use tidemark_repo::progress::Progress;
use tidemark_repo::Fail;
use tidemark_repo::{catalog, Repository};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::info;

/// Where the file being received stands.
struct OpenFile {
    file: BackupFile,
    buffer: Vec<u8>,
    chunk_index: usize,
    reading: Reading,
    /// Its chunks hold changed blocks: never the same place of the same file.
    by_block: bool,
    /// Pages put in chunks so far (by block only).
    pages_flushed: u64,
    /// The stored ranges once the reading has finished (by block only).
    final_ranges: Option<Vec<[u32; 2]>>,
}

/// A stored chunk's checksums, known only once its pages were XORed with
/// the whole copy (on the upload task): file index, chunk index, CRC-32,
/// CRC-32C and the pages' CRC-32C.
type ChunkSums = (usize, usize, u32, u32, u32);

/// What one upload task did.
struct Uploaded {
    stored_len: u64,
    sums: Option<ChunkSums>,
}

/// A file, directory or link of the backup as it begins.
pub(crate) struct Entry {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix: i64,
    pub link_target: Option<String>,
}

/// How the bytes of the file being received are read.
pub(crate) enum Reading {
    /// Stored as they come.
    Whole,
    /// A relation file sent whole, stored block by block (incremental backups).
    Blocks(BlockFilter),
    /// PostgreSQL 17+'s `INCREMENTAL.<name>`: only changed blocks were sent.
    Incremental(IncrementalFile),
    /// Only these blocks are sent, in order (PostgreSQL 13–16's SQL path,
    /// which reads the blocks the WAL map names).
    Chosen { ranges: Vec<[u32; 2]> },
    /// An incremental backup's backup_label from PostgreSQL 17+, stored
    /// without the lines that would stop the server starting from it.
    Label,
}

pub(crate) struct Receiver<'a> {
    repo: Repository,
    id: String,
    /// The previous backup's files, for reusing unchanged chunks.
    pub(crate) previous: HashMap<(&'a str, &'a str), &'a BackupFile>,
    /// For each file of the base, the copy of its chain that holds it
    /// whole: changed pages are stored XORed with its pages.
    wholes: Arc<HashMap<(String, String), BackupFile>>,
    /// Checksums of XORed chunks, set into `files` at the end.
    sums: Vec<ChunkSums>,
    /// The start of the backup this one is incremental on.
    base_start: Option<Lsn>,
    /// Relation blocks received, and those stored (incremental backups).
    relation_blocks: (u64, u64),
    /// The server sends incremental files (`BASE_BACKUP … INCREMENTAL`).
    native: bool,
    pub(crate) archive: String,
    tar: TarReader,
    open: Option<OpenFile>,
    files: Vec<BackupFile>,
    next_chunk: u64,
    uploads: JoinSet<anyhow::Result<Uploaded>>,
    slots: Arc<Semaphore>,
    pub(crate) bytes: u64,
    /// Bytes put in the repository by finished chunk uploads.
    stored_bytes: u64,
}

impl Receiver<'_> {
    async fn tar_bytes(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let events = self.tar.feed(data).with_context(|| format!("read archive {}", self.archive))?;
        for event in events {
            match event {
                TarEvent::Entry(header) => {
                    let (kind, link_target) = match header.kind {
                        EntryKind::File => (FileKind::File, None),
                        EntryKind::Directory => (FileKind::Directory, None),
                        EntryKind::Symlink { target } => (FileKind::Symlink, Some(target)),
                    };
                    let entry = Entry {
                        path: header.path,
                        kind,
                        size: header.size,
                        mode: header.mode,
                        mtime_unix: header.mtime_unix,
                        link_target,
                    };
                    let reading = self.reading(&entry)?;
                    self.begin_entry(entry, reading);
                }
                TarEvent::Data(bytes) => self.entry_data(&bytes).await?,
                TarEvent::EndOfEntry => self.end_of_entry().await?,
                TarEvent::End => {}
            }
        }
        Ok(())
    }

    /// A file (or directory, or link) of the current archive begins.
    pub(crate) fn begin_entry(&mut self, entry: Entry, (path, reading): (String, Reading)) {
        self.bytes += entry.size;
        let by_block = matches!(reading, Reading::Blocks(_) | Reading::Incremental(_) | Reading::Chosen { .. });
        let pages_xor = by_block && self.wholes.contains_key(&(self.archive.clone(), path.clone()));
        self.open = Some(OpenFile {
            file: BackupFile {
                archive: self.archive.clone(),
                path,
                kind: entry.kind,
                size: entry.size,
                mode: entry.mode,
                mtime_unix: entry.mtime_unix,
                link_target: entry.link_target,
                chunks: Vec::new(),
                blocks: None,
                pages_xor,
            },
            buffer: Vec::new(),
            chunk_index: 0,
            by_block,
            pages_flushed: 0,
            final_ranges: None,
            reading,
        });
    }

    /// Bytes of the open file, as its reading takes them.
    pub(crate) async fn entry_data(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let full = {
            let open = self.open.as_mut().context("file data outside a file")?;
            match &mut open.reading {
                Reading::Blocks(filter) => filter.feed(bytes, &mut open.buffer),
                Reading::Incremental(reader) => reader.feed(bytes, &mut open.buffer)?,
                Reading::Whole | Reading::Label | Reading::Chosen { .. } => open.buffer.extend_from_slice(bytes),
            }
            open.buffer.len() >= CHUNK_SIZE && !matches!(open.reading, Reading::Label)
        };
        if full {
            self.flush_chunk().await?;
        }
        Ok(())
    }

    /// Finishes the open file: its last chunk, its block ranges and length.
    pub(crate) async fn end_of_entry(&mut self) -> anyhow::Result<()> {
        let open = self.open.as_mut().context("end of an entry that never began")?;
        let mut ranges = None;
        match std::mem::replace(&mut open.reading, Reading::Whole) {
            Reading::Whole => {}
            Reading::Label => {
                open.buffer = combined_backup_label(&open.buffer);
                open.file.size = open.buffer.len() as u64;
            }
            Reading::Blocks(filter) => {
                let (stored, blocks) = filter.finish()?;
                ranges = Some((stored, blocks));
            }
            Reading::Incremental(reader) => {
                let (stored, blocks) = reader.finish(&mut open.buffer)?;
                open.file.size = blocks * BLOCK_SIZE;
                ranges = Some((stored, blocks));
            }
            Reading::Chosen { ranges: stored } => {
                ranges = Some((stored, open.file.size / BLOCK_SIZE));
            }
        }
        open.final_ranges = ranges.as_ref().map(|(stored, _)| stored.clone());
        if !open.buffer.is_empty() {
            self.flush_chunk().await?;
        }
        let mut open = self.open.take().context("end of an entry that never began")?;
        if let Some((stored, blocks)) = ranges {
            self.relation_blocks.0 += blocks;
            self.relation_blocks.1 += stored.iter().map(|[_, count]| u64::from(*count)).sum::<u64>();
            open.file.blocks = Some(stored);
        }
        self.files.push(open.file);
        Ok(())
    }

    /// How to read a file that begins: its path in the backup and its reader.
    fn reading(&self, entry: &Entry) -> anyhow::Result<(String, Reading)> {
        let (path, size, kind) = (entry.path.clone(), entry.size, &entry.kind);
        if !self.native || *kind != FileKind::File {
            return Ok((path.clone(), self.block_filter(&path, size, kind).map_or(Reading::Whole, Reading::Blocks)));
        }
        if self.archive == "base" && path == "backup_label" {
            return Ok((path, Reading::Label));
        }
        let Some(target) = incremental_file::target_path(&path) else {
            return Ok((path.clone(), self.block_filter(&path, size, kind).map_or(Reading::Whole, Reading::Blocks)));
        };
        // The server sends a file incrementally only when the base's manifest
        // lists it; blocks it leaves out come from the base.
        let Some(old) = self.previous.get(&(self.archive.as_str(), target.as_str())) else {
            anyhow::bail!(
                "the server sent {path} as changed blocks, but the base backup has no {target}; take a full backup (--full)"
            );
        };
        let reader = IncrementalFile::new(&path, size, old.size);
        Ok((target, Reading::Incremental(reader)))
    }

    /// A filter when the file is a relation file the base backup has whole
    /// blocks of: an incremental backup stores only its changed blocks.
    pub(crate) fn block_filter(&self, path: &str, size: u64, kind: &FileKind) -> Option<BlockFilter> {
        let base_start = self.base_start?;
        if *kind != FileKind::File || !size.is_multiple_of(BLOCK_SIZE) || !is_block_file(&self.archive, path) {
            return None;
        }
        let old = self.previous.get(&(self.archive.as_str(), path))?;
        (old.kind == FileKind::File && old.size.is_multiple_of(BLOCK_SIZE))
            .then(|| BlockFilter::new(base_start, old.size))
    }

    /// Stores (or reuses) the buffered chunk of the open file.
    async fn flush_chunk(&mut self) -> anyhow::Result<()> {
        let open = self.open.as_mut().context("no open file")?;
        let raw = std::mem::take(&mut open.buffer);
        if open.file.pages_xor {
            return self.flush_xored(raw).await;
        }
        let crc32 = crc32fast::hash(&raw);
        let crc32c = crc32c::crc32c(&raw);
        let index = open.chunk_index;
        open.chunk_index += 1;
        let reusable = Some(&*open)
            .filter(|open| !open.by_block)
            .and_then(|open| self.previous.get(&(open.file.archive.as_str(), open.file.path.as_str())))
            .filter(|f| f.blocks.is_none())
            .and_then(|f| f.chunks.get(index))
            .filter(|c| c.raw_len == raw.len() as u64 && c.crc32 == crc32 && c.crc32c == crc32c)
            .cloned();
        if let Some(chunk) = reusable {
            open.file.chunks.push(chunk);
            return Ok(());
        }
        let key = chunk_key(&self.id, self.next_chunk);
        self.next_chunk += 1;
        open.file.chunks.push(ChunkRef {
            key: key.clone(),
            raw_len: raw.len() as u64,
            crc32,
            crc32c,
            pages_crc32c: None,
        });
        let repo = self.repo.clone();
        self.upload(async move {
            let (object, info) =
                tokio::task::spawn_blocking(move || frame::encode(&raw, Compression::Zstd { level: 1 }))
                    .await
                    .context("join compression task")??;
            repo.put(&key, object).await?;
            Ok(Uploaded { stored_len: info.stored_len, sums: None })
        })
        .await
    }

    /// Stores a chunk of changed pages XORed with the same pages of the
    /// chain's whole copy of the file: where a page changed a little, the
    /// XOR is mostly zeros. Reading the whole copy's pages from the
    /// repository runs on the upload task, so the checksums (of the XORed
    /// bytes) are set at the end.
    async fn flush_xored(&mut self, raw: Vec<u8>) -> anyhow::Result<()> {
        let open = self.open.as_mut().context("no open file")?;
        let pages = raw.len() as u64 / BLOCK_SIZE;
        let ranges: &[[u32; 2]] = match (&open.reading, &open.final_ranges) {
            (Reading::Blocks(filter), _) => filter.ranges(),
            (Reading::Incremental(reader), _) => reader.ranges(),
            (Reading::Chosen { ranges }, _) | (_, Some(ranges)) => ranges,
            _ => anyhow::bail!("{}: changed pages without their ranges", open.file.path),
        };
        let blocks = tidemark_proto::repo::chain::blocks_at(ranges, open.pages_flushed, pages)
            .filter(|_| raw.len() as u64 == pages * BLOCK_SIZE)
            .with_context(|| format!("{}: changed pages that are not those of its ranges", open.file.path))?;
        open.pages_flushed += pages;
        let place = (self.files.len(), open.file.chunks.len());
        let whole = (open.file.archive.clone(), open.file.path.clone());
        let key = chunk_key(&self.id, self.next_chunk);
        self.next_chunk += 1;
        // The checksums are those of the XORed bytes, known on the task.
        open.file.chunks.push(ChunkRef {
            key: key.clone(),
            raw_len: raw.len() as u64,
            crc32: 0,
            crc32c: 0,
            pages_crc32c: Some(0),
        });
        let (repo, wholes) = (self.repo.clone(), self.wholes.clone());
        self.upload(async move {
            let whole = wholes.get(&whole).context("the whole copy of a file stored as XORed pages")?;
            let base = tidemark_repo::pages::whole_pages(&repo, whole, &blocks).await?;
            let (object, info, sums) = tokio::task::spawn_blocking(move || {
                let mut raw = raw;
                let pages_crc32c = crc32c::crc32c(&raw);
                tidemark_proto::repo::chain::xor_pages(&mut raw, &base);
                let sums = (place.0, place.1, crc32fast::hash(&raw), crc32c::crc32c(&raw), pages_crc32c);
                frame::encode(&raw, Compression::Zstd { level: 1 }).map(|(object, info)| (object, info, sums))
            })
            .await
            .context("join compression task")??;
            repo.put(&key, object).await?;
            Ok(Uploaded { stored_len: info.stored_len, sums: Some(sums) })
        })
        .await
    }

    /// Runs an upload on its own task once a slot is free.
    async fn upload(
        &mut self,
        task: impl std::future::Future<Output = anyhow::Result<Uploaded>> + Send + 'static,
    ) -> anyhow::Result<()> {
        let permit = self.slots.clone().acquire_owned().await.context("upload slots closed")?;
        self.uploads.spawn(async move {
            let _permit = permit;
            task.await
        });
        // Surface a failed upload early rather than at the end.
        while let Some(done) = self.uploads.try_join_next() {
            self.uploaded(done.context("join upload task")??);
        }
        Ok(())
    }

    fn uploaded(&mut self, done: Uploaded) {
        self.stored_bytes += done.stored_len;
        self.sums.extend(done.sums);
    }

    /// Waits for every upload, then sets the checksums of XORed chunks.
    async fn all_uploaded(&mut self) -> anyhow::Result<()> {
        while let Some(done) = self.uploads.join_next().await {
            self.uploaded(done.context("join upload task")??);
        }
        for (file, chunk, crc32, crc32c, pages_crc32c) in std::mem::take(&mut self.sums) {
            let chunk = self.files.get_mut(file).and_then(|f| f.chunks.get_mut(chunk)).context("a stored chunk")?;
            (chunk.crc32, chunk.crc32c, chunk.pages_crc32c) = (crc32, crc32c, Some(pages_crc32c));
        }
        Ok(())
    }
}

/// Scheduled backups for `run`: one at once if the repository has none, then
/// one every `interval` after the newest backup ended. Runs beside streaming
/// on its own connection; a failed backup is logged and retried next time.
/// What the daemon's schedulers report to: the metrics, and a nudge for
/// the task that re-reads the repository's facts (last backup, window, drill).
#[derive(Clone)]
pub struct Reporting {
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub refresh: std::sync::Arc<tokio::sync::Notify>,
}

pub async fn schedule(
    settings: Settings,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    reporting: Reporting,
) {
    loop {
        let wait = match next_backup_delay(&settings, interval).await {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!("cannot read the backup list, trying again in a minute: {e:#}");
                std::time::Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            result = backup(&settings, None, false) => {
                reporting.metrics.backup_done(result.is_ok());
                if result.is_ok() {
                    expire_after_backup(&settings, &reporting.metrics).await;
                }
                reporting.refresh.notify_one();
                if let Err(e) = result {
                    tracing::error!("scheduled base backup failed: {e:#}");
                    // Do not hammer a server that refuses: wait before trying again.
                    tokio::select! {
                        _ = tokio::time::sleep(interval.min(std::time::Duration::from_secs(600))) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// `run` applies the retention policy after each scheduled backup, when
/// one is set (and the agent may delete).
async fn expire_after_backup(settings: &Settings, metrics: &crate::metrics::Metrics) {
    let Ok((policy, orphan_grace)) = settings.retention.resolve() else { return };
    if !policy.is_set() || settings.no_delete {
        return;
    }
    let result = async {
        let (repo, _) = settings.open_repository().await?;
        tidemark_repo::expire::expire(&repo, &tidemark_repo::expire::Options { policy, orphan_grace, dry_run: false })
            .await
    }
    .await;
    match result {
        Ok(report) => {
            metrics.retention_done(Some(report.plan.freed_bytes));
            info!(
                deleted = report.plan.deletions.len(),
                freed_bytes = report.plan.freed_bytes,
                dropped_backups = report.plan.dropped.len(),
                "retention applied"
            )
        }
        Err(e) => {
            metrics.retention_done(None);
            tracing::error!("applying the retention policy failed: {e:#}")
        }
    }
}

async fn next_backup_delay(settings: &Settings, interval: std::time::Duration) -> anyhow::Result<std::time::Duration> {
    let (repo, _) = settings.open_initialized(false).await?;
    let Some(newest) = catalog::complete_backups(&repo).await?.pop() else { return Ok(std::time::Duration::ZERO) };
    let manifest = catalog::read_manifest(&repo, &newest).await?;
    let ended = time::OffsetDateTime::parse(&manifest.end_time, &time::format_description::well_known::Rfc3339)
        .context("read the newest backup's end time")?;
    let age = time::OffsetDateTime::now_utc() - ended;
    let age = std::time::Duration::try_from(age).unwrap_or_default();
    Ok(interval.saturating_sub(age))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub async fn backup(settings: &Settings, label: Option<String>, full: bool) -> anyhow::Result<BackupManifest> {
    let _lock = crate::lock::lock_file(&settings.state_dir, "backup.lock", "another backup")?;
    let (repo, repo_meta) = settings.open_repository().await?;
    let mut conn = session::connect_replication(&settings.conn).await?;
    let identity = session::identify(&mut conn).await?;
    session::check_same_cluster(
        &format!("repository {}", repo.display),
        &repo_meta.system_identifier,
        &identity.system_identifier,
    )?;
    let facts = session::server_facts(&mut conn).await?;
    if facts.server_version_num < 130000 {
        return Err(Fail::new(
            format!("base backups of PostgreSQL {} are not supported", facts.server_version_num / 10000),
            "Tidemark supports PostgreSQL 13 and later",
        )
        .into());
    }
    // What interrupted backups left is removed by `expire`, which knows
    // which of their chunks later backups still reference.
    let previous = match catalog::complete_backups(&repo).await?.last() {
        Some(id) => Some(catalog::read_manifest(&repo, id).await?),
        None => None,
    };
    let base = crate::incremental::choose_base(
        &repo,
        previous.as_ref(),
        settings.max_incremental_chain,
        full,
        facts.server_version_num,
        identity.timeline,
    )
    .await?;
    let id = new_backup_id(&repo).await?;
    let label = label.unwrap_or_else(|| format!("tidemark {id}"));
    let start_time = crate::clock::now_rfc3339();
    info!(%id, %label, "starting base backup");
    // 15 replaced BASE_BACKUP's syntax and its answer (one CopyOut with typed
    // messages instead of one raw CopyOut per tablespace plus the manifest).
    let legacy = facts.server_version_num < 150000;
    let mut native = match &base {
        Some(base) if facts.server_version_num >= 170000 => native_incremental(&mut conn, &repo, base).await?,
        _ => false,
    };
    let previous: HashMap<_, _> =
        previous.iter().flat_map(|p| &p.files).map(|f| ((f.archive.as_str(), f.path.as_str()), f)).collect();
    let wholes = Arc::new(match &base {
        Some(base) => whole_copies(&repo, base).await?,
        None => HashMap::new(),
    });
    let new_receiver = |native: bool| Receiver {
        repo: repo.clone(),
        id: id.clone(),
        previous: previous.clone(),
        wholes: wholes.clone(),
        sums: Vec::new(),
        base_start: base.as_ref().map(|b| b.start_lsn),
        relation_blocks: (0, 0),
        native,
        archive: String::new(),
        tar: TarReader::new(),
        open: None,
        files: Vec::new(),
        next_chunk: 0,
        uploads: JoinSet::new(),
        slots: Arc::new(Semaphore::new(workers())),
        bytes: 0,
        stored_bytes: 0,
    };
    if let (Some(base), Some(client)) = (&base, sql_session(settings, &repo, facts.server_version_num).await) {
        conn.close().await;
        let receiver = new_receiver(false);
        let known =
            Finished { id, label, start_time, system_identifier: identity.system_identifier, facts, read_bytes: 0 };
        return over_sql(&client, &repo, receiver, base, known, settings.backup_fast_checkpoint).await;
    }
    let command = base_backup_command(&label, legacy, settings.backup_fast_checkpoint, native);
    conn.send_query(&command).await?;
    let mut stream = BackupStream::new(new_receiver(native), legacy);
    if let Err(e) = stream.run(&mut conn).await {
        // The server checks its WAL summaries before it sends anything: when
        // they do not reach back to the base (summarize_wal turned on since,
        // or summaries removed after wal_summary_keep_time), read every file.
        if !native || stream.results.start.is_some() || !stream.receiver.files.is_empty() {
            return Err(e);
        }
        tracing::warn!("the server cannot send only the changed blocks ({e:#}); reading every file instead");
        native = false;
        conn.send_query(&base_backup_command(&label, legacy, settings.backup_fast_checkpoint, false)).await?;
        stream = BackupStream::new(new_receiver(false), legacy);
        stream.run(&mut conn).await?;
    }
    if native {
        info!("the server sent only the blocks its WAL summaries show changed");
    }
    conn.close().await;
    let BackupStream { receiver, results, pg_manifest, .. } = stream;
    let read_bytes = receiver.bytes;
    let facts = Finished { id, label, start_time, system_identifier: identity.system_identifier, facts, read_bytes };
    finish(&repo, receiver, results, pg_manifest, base.as_ref(), facts).await
}

/// What the backup knew before the stream began.
struct Finished {
    id: String,
    /// Bytes of files read from the server.
    read_bytes: u64,
    label: String,
    start_time: String,
    system_identifier: String,
    facts: crate::preflight::ServerFacts,
}

/// Waits for the uploads, then stores the server's manifest and ours (last:
/// only then does the backup exist).
async fn finish(
    repo: &Repository,
    mut receiver: Receiver<'_>,
    results: BackupResults,
    pg_manifest: Vec<u8>,
    base: Option<&BackupManifest>,
    known: Finished,
) -> anyhow::Result<BackupManifest> {
    receiver.all_uploaded().await?;
    let (start_lsn, timeline) = results.start.context("BASE_BACKUP sent no start position")?;
    let end_lsn = results.end.context("BASE_BACKUP sent no end position")?;
    anyhow::ensure!(!pg_manifest.is_empty(), "the server sent no backup_manifest");
    if let Some(base) = base {
        // The server switched timelines between IDENTIFY_SYSTEM and the backup.
        anyhow::ensure!(
            base.timeline == timeline && base.start_lsn < start_lsn,
            "the server moved to timeline {timeline} while the backup began; take it again (it will be full)"
        );
        let (blocks, stored) = receiver.relation_blocks;
        info!(base = %base.id, blocks, stored, "relation blocks stored (the others come from the base)");
    }
    let id = known.id;
    let (object, info) = frame::encode(&pg_manifest, Compression::Zstd { level: 3 })?;
    repo.put(&pg_manifest_key(&id), object).await?;
    let manifest = BackupManifest {
        format_version: match base {
            None => FORMAT_VERSION,
            Some(_) if receiver.files.iter().any(|f| f.pages_xor) => XOR_FORMAT_VERSION,
            Some(_) => INCREMENTAL_FORMAT_VERSION,
        },
        id: id.clone(),
        label: known.label,
        system_identifier: known.system_identifier,
        server_version_num: known.facts.server_version_num,
        timeline,
        start_lsn,
        end_lsn,
        start_time: known.start_time,
        end_time: crate::clock::now_rfc3339(),
        tablespaces: results.manifest_tablespaces(),
        files: receiver.files,
        pg_manifest_key: pg_manifest_key(&id),
        bytes: receiver.bytes,
        stored_bytes: receiver.stored_bytes + info.stored_len,
        read_bytes: Some(known.read_bytes),
        base: base.map(|b| b.id.clone()),
    };
    // Written last: only now does the backup exist.
    let (object, _) = frame::encode(&manifest.to_json()?, Compression::Zstd { level: 3 })?;
    repo.put(&manifest_key(&id), object).await?;
    info!(%id, bytes = manifest.bytes, stored_bytes = manifest.stored_bytes, "base backup complete");
    let kind = manifest.base.as_ref().map_or("full".to_string(), |b| format!("incremental on {b}"));
    let summary =
        format!("backup {id} ({}, {kind}), WAL {} to {}", manifest.label, manifest.start_lsn, manifest.end_lsn);
    tidemark_repo::events::record(repo, "backup", summary, serde_json::to_value(manifest.summary())?).await;
    Ok(manifest)
}

/// For each relation file of `base`, the copy in its chain that holds it
/// whole (the full backup's, or the increment's that stored it new).
async fn whole_copies(
    repo: &Repository,
    base: &BackupManifest,
) -> anyhow::Result<HashMap<(String, String), BackupFile>> {
    let chain = catalog::read_chain(repo, base).await?;
    let links = tidemark_proto::repo::chain::Chain::new(&chain)
        .map_err(|reason| Fail::new(reason, "take a full backup (--full)"))?;
    let mut wholes = HashMap::new();
    for file in base.files.iter().filter(|f| is_block_file(&f.archive, &f.path)) {
        if let Some(whole) = links.layers(file).ok().and_then(|layers| layers.last().copied()) {
            wholes.insert((file.archive.clone(), file.path.clone()), whole.clone());
        }
    }
    Ok(wholes)
}

/// A new backup's id: its start second, then -2, -3, … for backups in the
/// same second (a reused id would overwrite a backup, and could name itself
/// its base).
async fn new_backup_id(repo: &Repository) -> anyhow::Result<String> {
    let second = crate::clock::backup_id(time::OffsetDateTime::now_utc());
    let mut id = second.clone();
    for n in 2.. {
        if !repo.exists(&manifest_key(&id)).await? {
            break;
        }
        id = format!("{second}-{n}");
    }
    Ok(id)
}

/// An incremental backup of PostgreSQL 13–16 over SQL (`backup/sql.rs`).
async fn over_sql(
    client: &tokio_postgres::Client,
    repo: &Repository,
    mut receiver: Receiver<'_>,
    base: &BackupManifest,
    mut known: Finished,
    fast: bool,
) -> anyhow::Result<BackupManifest> {
    let major = known.facts.server_version_num / 10000;
    let taken = sql::backup(client, repo, &mut receiver, base, &known.label, fast, major).await?;
    if taken.by_map {
        info!(read_bytes = taken.read_bytes, "read only the blocks the WAL map shows changed, over SQL");
    }
    known.read_bytes = taken.read_bytes;
    finish(repo, receiver, taken.results, taken.pg_manifest, Some(base), known).await
}

/// On PostgreSQL 13–16 with `read_changed_blocks` on, an SQL session whose
/// role may take a low-level backup (`backup/sql.rs`); `None` (and why,
/// logged) when the backup goes over BASE_BACKUP.
async fn sql_session(
    settings: &Settings,
    repo: &Repository,
    server_version_num: u32,
) -> Option<tokio_postgres::Client> {
    if !(130000..170000).contains(&server_version_num) || !settings.read_changed_blocks {
        return None;
    }
    // The WAL map is the streaming agent's: without one it cannot be complete.
    let key = tidemark_proto::repo::records::AGENT_LEASE_KEY;
    if !tidemark_repo::lease::is_held(repo, key).await.unwrap_or(false) {
        info!("reading every file over BASE_BACKUP (and storing only the changed blocks): no tidemark-agent run is streaming into the repository, so the WAL map of the changed blocks is not kept");
        return None;
    }
    match sql::session(settings, server_version_num / 10000).await {
        Ok(client) => Some(client),
        Err(reason) => {
            info!("reading every file over BASE_BACKUP (and storing only the changed blocks): {reason}");
            None
        }
    }
}

/// Chunks compressed and stored at once.
fn workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) * 2
}

/// Whether the server (PostgreSQL 17+) will send only the blocks changed
/// since `base`: it summarizes its WAL (`summarize_wal`) and took the base's
/// manifest (UPLOAD_MANIFEST). When not, the backup reads every file and
/// stores the changed blocks by their page LSNs; the log says why.
async fn native_incremental(conn: &mut Connection, repo: &Repository, base: &BackupManifest) -> anyhow::Result<bool> {
    let summarizing = conn.simple_query("SHOW summarize_wal").await?;
    if summarizing.rows.first().and_then(|row| row.first()).and_then(|v| v.as_deref()) != Some("on") {
        info!("summarize_wal is off: the server sends every file and only changed blocks are stored; turn it on to read only changed blocks");
        return Ok(false);
    }
    let manifest = repo.get(&base.pg_manifest_key).await?.ok_or_else(|| {
        Fail::new(
            format!("backup {} lacks the server's backup_manifest ({})", base.id, base.pg_manifest_key),
            "run `tidemark-restore verify`, then take a full backup with `tidemark-agent backup --full`",
        )
    })?;
    match conn.copy_in("UPLOAD_MANIFEST", &manifest).await {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!("the server did not take backup {}'s manifest ({e}); reading every file", base.id);
            Ok(false)
        }
    }
}

fn base_backup_command(label: &str, legacy: bool, fast_checkpoint: bool, incremental: bool) -> String {
    if legacy {
        format!(
            "BASE_BACKUP LABEL {} PROGRESS FAST NOWAIT TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'",
            quote_literal(label)
        )
    } else {
        format!(
            "BASE_BACKUP (LABEL {}, PROGRESS, CHECKPOINT '{}', MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP true, WAIT false{})",
            quote_literal(label),
            if fast_checkpoint { "fast" } else { "spread" },
            if incremental { ", INCREMENTAL" } else { "" }
        )
    }
}

/// BASE_BACKUP's answer as it arrives: result sets, archives into the
/// receiver, the server's manifest, progress.
struct BackupStream<'a> {
    receiver: Receiver<'a>,
    legacy: bool,
    results: BackupResults,
    rows: Vec<Row>,
    pg_manifest: Vec<u8>,
    in_manifest: bool,
    /// A bar on a terminal, a log line every few seconds otherwise.
    progress: Option<Progress>,
    /// Before 15: CopyOuts seen (one per tablespace, then the manifest's).
    legacy_copies: usize,
    legacy_bytes: u64,
}

impl<'a> BackupStream<'a> {
    fn new(receiver: Receiver<'a>, legacy: bool) -> BackupStream<'a> {
        BackupStream {
            receiver,
            legacy,
            results: BackupResults::default(),
            rows: Vec::new(),
            pg_manifest: Vec::new(),
            in_manifest: false,
            progress: None,
            legacy_copies: 0,
            legacy_bytes: 0,
        }
    }

    async fn run(&mut self, conn: &mut Connection) -> anyhow::Result<()> {
        loop {
            match conn.next_query_event().await.context("BASE_BACKUP")? {
                QueryEvent::Columns(_) => self.rows = Vec::new(),
                QueryEvent::Row(row) => self.rows.push(row),
                QueryEvent::Complete => {
                    self.results.add(std::mem::take(&mut self.rows))?;
                    if let (None, Some(total)) = (&self.progress, self.results.total_bytes()) {
                        self.progress = Some(Progress::bytes("backup", total));
                    }
                }
                QueryEvent::CopyOut if self.legacy => self.legacy_copy_out(),
                QueryEvent::CopyData(data) if self.legacy => self.legacy_data(&data).await?,
                QueryEvent::CopyDone if self.legacy && !self.in_manifest => {
                    anyhow::ensure!(
                        self.receiver.open.is_none(),
                        "archive {} ended inside a file",
                        self.receiver.archive
                    );
                }
                QueryEvent::CopyOut | QueryEvent::CopyDone => {}
                QueryEvent::CopyData(data) => self.message(base_backup::parse_message(data)?).await?,
                QueryEvent::Ready => break,
            }
        }
        if let Some(progress) = &self.progress {
            progress.set(self.receiver.bytes);
            progress.finish();
        }
        Ok(())
    }

    /// Before 15: one CopyOut per tablespace in result-set order (the data
    /// directory last), raw tar without end blocks, then one with the manifest.
    fn legacy_copy_out(&mut self) {
        self.legacy_copies += 1;
        let tablespaces = self.results.tablespaces.as_deref().unwrap_or_default();
        match tablespaces.get(self.legacy_copies - 1) {
            Some(tablespace) => self.begin_archive(tablespace.archive()),
            None => self.in_manifest = true,
        }
    }

    async fn legacy_data(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.legacy_bytes += data.len() as u64;
        if self.in_manifest {
            self.pg_manifest.extend_from_slice(data);
        } else {
            self.receiver.tar_bytes(data).await?;
        }
        if let Some(progress) = &self.progress {
            progress.set(self.legacy_bytes);
        }
        Ok(())
    }

    async fn message(&mut self, message: BackupMessage) -> anyhow::Result<()> {
        match message {
            BackupMessage::Archive(name) => self.begin_archive(name),
            BackupMessage::Data(data) if self.in_manifest => self.pg_manifest.extend_from_slice(&data),
            BackupMessage::Data(data) => self.receiver.tar_bytes(&data).await?,
            BackupMessage::ManifestFollows => self.in_manifest = true,
            BackupMessage::Progress(done) => {
                if let Some(progress) = &self.progress {
                    progress.set(done);
                }
            }
        }
        Ok(())
    }

    fn begin_archive(&mut self, name: String) {
        self.receiver.archive = name;
        self.receiver.tar = TarReader::new();
    }
}
