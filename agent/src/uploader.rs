//! Moves spool segments into the repository: read, compress, frame, put
//! (durable), record in the index, and only then delete the spool file.
//! Jobs run one at a time in the order they were queued, so the repository
//! fills in LSN order and a partial object never overwrites a newer state.

use crate::index::{Index, SegmentRecord};
use crate::summarizer::{SegmentPiece, INLINE_BYTES};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tidemark_proto::repo::frame::{FrameInfo, Pieces};
use tidemark_proto::repo::layout::{partial_piece_key, partial_segment_key, segment_key};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::Lsn;
use tidemark_repo::partial::{NextUpload, StoredChain};
use tidemark_repo::Repository;
use tokio::sync::mpsc;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

#[derive(Debug, Clone)]
pub enum UploadJob {
    /// A full segment, fsynced and renamed in the spool.
    Complete { segment: SegmentId, path: PathBuf },
    /// The first `len` flushed bytes of a segment still being filled. With
    /// `last`, the timeline ended inside it: it stays partial for good, and the
    /// spool file goes once it is stored.
    Partial { segment: SegmentId, path: PathBuf, len: u64, last: bool },
}

impl UploadJob {
    /// Where the repository's WAL ends once this job is done.
    pub fn end_lsn(&self, segment_size: u64) -> Lsn {
        match self {
            UploadJob::Complete { segment, .. } => segment.end_lsn(segment_size),
            UploadJob::Partial { segment, len, .. } => Lsn(segment.start_lsn(segment_size).0 + len),
        }
    }
}

pub struct Uploader {
    pub repo: Repository,
    pub index: Arc<Index>,
    pub segment_size: u64,
    /// One zstd context, reused for every piece (making one per object cost
    /// a fresh allocation of its tables each time).
    compressor: Arc<std::sync::Mutex<zstd::bulk::Compressor<'static>>>,
    /// Where the bytes read for each upload go to be summarized for the audit.
    /// Waited on for at most `SUMMARIZER_WAIT`: a summarizer that misses a
    /// piece reads the segment back from the repository later.
    summaries: Option<mpsc::Sender<SegmentPiece>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The compressed pieces of the segment being filled, kept between its uploads.
    building: Mutex<Option<Building>>,
}

/// How often a stuck upload is reported.
const BEHIND_REPORT: Duration = Duration::from_secs(10);

/// The zstd level of WAL objects. On pgbench's WAL, level 1 is both the
/// fastest and the smallest (`zstd -b1 -e4` on a 16 MiB segment: ratio 3.45
/// at 400 MB/s; level 3, zstd's default: 3.02 at 215 MB/s).
const COMPRESSION_LEVEL: i32 = 1;

impl Uploader {
    pub fn new(
        repo: Repository,
        index: Arc<Index>,
        segment_size: u64,
        summaries: Option<mpsc::Sender<SegmentPiece>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Uploader> {
        let compressor = zstd::bulk::Compressor::new(COMPRESSION_LEVEL).context("create a zstd context")?;
        Ok(Uploader {
            repo,
            index,
            segment_size,
            compressor: Arc::new(std::sync::Mutex::new(compressor)),
            summaries,
            metrics,
            building: Mutex::new(None),
        })
    }

    /// Runs jobs until the channel closes; each is retried until it succeeds.
    /// While one is stuck (the repository unreachable), the log says every
    /// 10 s how far behind the repository is; WAL keeps landing in the spool.
    pub async fn run(self, mut jobs: mpsc::UnboundedReceiver<UploadJob>) {
        while let Some(job) = jobs.recv().await {
            let started = std::time::Instant::now();
            let mut attempt = 0;
            let mut report = tokio::time::interval_at(tokio::time::Instant::now() + BEHIND_REPORT, BEHIND_REPORT);
            let mut upload = Box::pin(self.upload(&job));
            loop {
                tokio::select! {
                    result = &mut upload => match result {
                        Ok(()) => {
                            self.metrics.archived(job.end_lsn(self.segment_size));
                            if attempt > 0 || started.elapsed() >= BEHIND_REPORT {
                                info!("repository reachable again after {:.0}s; uploading the backlog in order ({} jobs queued)", started.elapsed().as_secs_f64(), jobs.len());
                            }
                            break;
                        }
                        Err(e) => {
                            self.metrics.repository_failed(&e);
                            let wait = crate::backoff::delay(attempt, Duration::from_secs(30));
                            warn!("upload failed, retrying in {:.1}s: {e:#}", wait.as_secs_f64());
                            attempt += 1;
                            tokio::time::sleep(wait).await;
                            upload = Box::pin(self.upload(&job));
                        }
                    },
                    _ = report.tick() => {
                        warn!(
                            "repository {} is behind by {} bytes of WAL: an upload has not finished for {:.0}s; {} uploads wait, the WAL is safe in the spool",
                            self.repo.display,
                            self.behind_bytes().map(|b| b.to_string()).unwrap_or_else(|_| "?".into()),
                            started.elapsed().as_secs_f64(),
                            jobs.len() + 1,
                        );
                    }
                }
            }
        }
    }

    /// WAL durable in the spool but not yet in the repository.
    fn behind_bytes(&self) -> anyhow::Result<u64> {
        let flushed = self.index.progress()?.map(|p| p.flushed_lsn).unwrap_or(Lsn::ZERO);
        let archived = self.index.archived_end()?;
        Ok(flushed.saturating_sub(archived.unwrap_or(Lsn::ZERO)))
    }

    pub async fn upload(&self, job: &UploadJob) -> anyhow::Result<()> {
        match job {
            UploadJob::Complete { segment, path } => self.upload_complete(*segment, path).await,
            UploadJob::Partial { segment, path, len, last } => self.upload_partial(*segment, path, *len, *last).await,
        }
    }

    async fn upload_complete(&self, segment: SegmentId, path: &Path) -> anyhow::Result<()> {
        let name = segment.file_name(self.segment_size);
        let length = match tokio::fs::metadata(path).await {
            Ok(meta) => meta.len(),
            // Already uploaded and removed by an earlier attempt.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.index.segment(segment)?.is_some() => {
                return Ok(())
            }
            Err(e) => return Err(e).with_context(|| format!("read spool segment {}", path.display())),
        };
        anyhow::ensure!(
            length == self.segment_size,
            "spool segment {} has {length} bytes, expected {}",
            path.display(),
            self.segment_size
        );
        self.compress_up_to(segment, path, self.segment_size).await?;
        // The segment is whole: its pieces become the object (no copy) and
        // are not kept (a retry after a failed put compresses it again).
        let building = self.building.lock().await.take().context("no compressed segment")?;
        let pieces: Vec<u64> = building.chain.pieces.iter().map(|(offset, _)| *offset).collect();
        let (object, info) = building.pieces.into_object();
        let record = self.store(&segment_key(segment, self.segment_size), object, info, segment).await?;
        let stored_bytes = record.stored_bytes;
        let index = self.index.clone();
        off_runtime(move || index.put_segment(segment, &record)).await?;
        // The complete object supersedes any partial one (left to `expire`
        // when these credentials may not delete).
        if self.repo.may_delete() {
            self.repo.delete(&partial_segment_key(segment, self.segment_size)).await?;
        }
        self.delete_pieces(segment, pieces.into_iter()).await;
        let (index, path) = (self.index.clone(), path.to_path_buf());
        off_runtime(move || {
            index.delete_partial(segment)?;
            // Kept as the spool's spare, not deleted: the receive loop opens
            // the next segment from it (see `spool::recycle`).
            crate::spool::recycle(&path)
        })
        .await?;
        info!(segment = %name, stored_bytes, "archived segment");
        Ok(())
    }

    /// Stores what the spool file holds of a segment still being filled:
    /// only the bytes since the last upload, as a piece of the chain
    /// `tidemark_repo::partial` describes, or now and then everything again
    /// as the prefix object (whose pieces then go).
    async fn upload_partial(&self, segment: SegmentId, path: &Path, len: u64, last: bool) -> anyhow::Result<()> {
        if self.index.segment(segment)?.is_some() {
            return Ok(()); // The complete segment is already stored.
        }
        match self.compress_up_to(segment, path, len).await {
            Ok(()) => {}
            // Renamed to complete meanwhile: its Complete job follows.
            Err(e) if e.downcast_ref::<std::io::Error>().map(|e| e.kind()) == Some(std::io::ErrorKind::NotFound) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let mut guard = self.building.lock().await;
        let building = guard.as_mut().context("no compressed segment")?;
        // Nothing new since the last upload (a `last` one still folds pieces
        // into one object), or nothing at all: nothing to store.
        let stored_all = building.pieces.raw_len() == building.pieces.marked_raw_len()
            && building.chain.prefix_stored > 0
            && (!last || building.chain.pieces.is_empty());
        if building.pieces.raw_len() > 0 && !stored_all {
            self.store_partial(building, last).await?;
        }
        drop(guard);
        if last {
            let path = path.to_path_buf();
            off_runtime(move || remove_durably(&path)).await?;
        }
        Ok(())
    }

    /// Stores the new bytes of `building` as a piece, or everything as the
    /// prefix object (then deleting the pieces it folds in), and records
    /// the whole prefix in the index.
    async fn store_partial(&self, building: &mut Building, last: bool) -> anyhow::Result<()> {
        let segment = building.segment;
        let upload = building.chain.next_upload(building.pieces.marked_raw_len(), last);
        let (key, (object, info)) = match upload {
            NextUpload::Prefix => (partial_segment_key(segment, self.segment_size), building.pieces.object()),
            NextUpload::Piece { offset } => {
                (partial_piece_key(segment, self.segment_size, offset), building.pieces.since_mark())
            }
        };
        self.repo.put(&key, object).await?;
        let folded = match upload {
            NextUpload::Prefix => std::mem::take(&mut building.chain.pieces),
            NextUpload::Piece { .. } => Vec::new(),
        };
        building.chain.stored(upload, info.stored_len);
        building.pieces.set_mark();
        // The prefix object now holds what the folded pieces held, durably.
        self.delete_pieces(segment, folded.iter().map(|(offset, _)| *offset)).await;
        let stored_len = building.chain.prefix_stored + building.chain.pieces.iter().map(|(_, s)| s).sum::<u64>();
        let record = self.record(segment, FrameInfo { stored_len, ..building.pieces.info() });
        // Not fsynced (the repository's listing is the truth for partials):
        // a write to RocksDB's memtable and log, too short to be worth a
        // blocking thread.
        self.index.put_partial(segment, &record)?;
        let bytes = building.pieces.raw_len();
        debug!(segment = %segment.file_name(self.segment_size), bytes, ?upload, "archived partial segment");
        Ok(())
    }

    /// Deletes pieces of `segment` that nothing reads any more, when these
    /// credentials may delete; `expire` removes what is left.
    async fn delete_pieces(&self, segment: SegmentId, offsets: impl Iterator<Item = u64>) {
        if !self.repo.may_delete() {
            return;
        }
        for offset in offsets {
            let key = partial_piece_key(segment, self.segment_size, offset);
            if let Err(e) = self.repo.delete(&key).await {
                warn!("could not delete {key}, which `expire` will remove: {e:#}");
            }
        }
    }

    /// The object for the first `len` bytes of `segment`'s spool file. Bytes
    /// compressed for an earlier partial upload of the same segment are
    /// reused; only what follows them is read and compressed, a piece at a
    /// time, and each piece goes on to the summarizer.
    async fn compress_up_to(&self, segment: SegmentId, path: &Path, len: u64) -> anyhow::Result<()> {
        let mut guard = self.building.lock().await;
        let mut building = match guard.take() {
            Some(b) if b.segment == segment && b.pieces.raw_len() <= len => b,
            _ => Building { segment, pieces: Pieces::new(), chain: StoredChain::default() },
        };
        if len.saturating_sub(building.pieces.raw_len()) <= INLINE_BYTES as u64 {
            // A quiet database's few kilobytes: compressed right here (tens
            // of microseconds), since a hop to a blocking thread and back
            // costs more than that in wake-ups.
            let outcome = self.append_inline(&mut building, path, len).await;
            *guard = Some(building);
            return outcome;
        }
        let compressor = self.compressor.clone();
        let summaries = self.summaries.clone();
        let path = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || {
            crate::priority::background_priority();
            let outcome = append_pieces(&mut building, &path, len, &compressor, summaries.as_ref());
            (building, outcome)
        })
        .await
        .context("join compression task")?;
        // Pieces are whole even when reading failed part way: keep them.
        let (building, outcome) = result;
        *guard = Some(building);
        outcome
    }

    /// `append_pieces` for at most `INLINE_BYTES`, on the calling thread.
    async fn append_inline(&self, building: &mut Building, path: &Path, len: u64) -> anyhow::Result<()> {
        let offset = building.pieces.raw_len();
        if offset >= len {
            return Ok(());
        }
        let file = std::fs::File::open(path).map_err(anyhow::Error::new)?;
        let raw = {
            let mut compressor = self.compressor.lock().map_err(|_| anyhow::anyhow!("the compressor was poisoned"))?;
            push_next_piece(building, &file, path, len, &mut compressor)?
        };
        if let Some(summaries) = &self.summaries {
            let piece = SegmentPiece { segment: building.segment, offset, bytes: Arc::new(raw) };
            let _ = tokio::time::timeout(SUMMARIZER_WAIT, summaries.send(piece)).await;
        }
        Ok(())
    }

    async fn store(
        &self,
        key: &str,
        object: Vec<u8>,
        info: FrameInfo,
        segment: SegmentId,
    ) -> anyhow::Result<SegmentRecord> {
        self.repo.put(key, object).await?;
        Ok(self.record(segment, info))
    }

    /// The index's record of `segment` stored as `info` says.
    fn record(&self, segment: SegmentId, info: FrameInfo) -> SegmentRecord {
        let start = segment.start_lsn(self.segment_size);
        SegmentRecord {
            start_lsn: start,
            end_lsn: Lsn(start.0 + info.raw_len),
            raw_bytes: info.raw_len,
            stored_bytes: info.stored_len,
            crc32: info.crc32,
            archived_at_unix: crate::clock::now_unix(),
        }
    }
}

/// The segment whose compressed pieces the uploader keeps between uploads.
struct Building {
    segment: SegmentId,
    pieces: Pieces,
    /// What of it the repository holds: the prefix object and pieces since.
    chain: StoredChain,
}

/// How much of a spool file is read, compressed and handed on at a time:
/// bounds the agent's memory whatever the segment size.
const PIECE: u64 = 2 << 20;

/// How long a piece may wait for room in the summarizer's queue. A
/// summarizer that is briefly busy (naming tables, storing a summary) is
/// waited for, so it need not read the segment back from the repository;
/// one that is stuck (the server unreachable for the catalog) never holds
/// archiving up for longer than this.
const SUMMARIZER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads `building`'s spool file from where its pieces end up to `len`,
/// adding a compressed piece per [`PIECE`] and offering each to the summarizer.
fn append_pieces(
    building: &mut Building,
    path: &Path,
    len: u64,
    compressor: &std::sync::Mutex<zstd::bulk::Compressor<'static>>,
    summaries: Option<&mpsc::Sender<SegmentPiece>>,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).map_err(anyhow::Error::new)?;
    let mut compressor = compressor.lock().map_err(|_| anyhow::anyhow!("the compressor was poisoned"))?;
    while building.pieces.raw_len() < len {
        let offset = building.pieces.raw_len();
        let raw = push_next_piece(building, &file, path, len, &mut compressor)?;
        if let Some(summaries) = summaries {
            // A summarizer that misses the piece reads the segment back later.
            let piece = SegmentPiece { segment: building.segment, offset, bytes: Arc::new(raw) };
            let _ = tokio::runtime::Handle::current()
                .block_on(tokio::time::timeout(SUMMARIZER_WAIT, summaries.send(piece)));
        }
    }
    Ok(())
}

/// Reads the spool bytes after `building`'s pieces, up to `len` and at most
/// [`PIECE`], and adds them as a compressed piece; returns the raw bytes
/// (for the summarizer).
fn push_next_piece(
    building: &mut Building,
    file: &std::fs::File,
    path: &Path,
    len: u64,
    compressor: &mut zstd::bulk::Compressor<'static>,
) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let offset = building.pieces.raw_len();
    let mut raw = vec![0u8; len.saturating_sub(offset).min(PIECE) as usize];
    file.read_exact_at(&mut raw, offset).with_context(|| format!("read spool file {}", path.display()))?;
    building.pieces.push(&raw, compressor)?;
    Ok(raw)
}

fn remove_durably(path: &Path) -> anyhow::Result<()> {
    tidemark_repo::durable::remove_durably(path).with_context(|| format!("remove spool file {}", path.display()))
}

/// RocksDB writes and fsyncs block: they run on a blocking thread, so a slow
/// disk never holds up the replication stream's keepalives.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await.context("join a blocking task")?
}
