//! Moves spool segments into the repository: read, compress, frame, put
//! (durable), record in the index, and only then delete the spool file.
//! Jobs run one at a time in the order they were queued, so the repository
//! fills in LSN order and a partial object never overwrites a newer state.

use crate::index::{Index, SegmentRecord};
use crate::summarizer::SegmentBytes;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::layout::{partial_segment_key, segment_key};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::Lsn;
use tidemark_repo::Repository;
use tokio::sync::mpsc;
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
    pub compression_level: i32,
    /// Where stored segments go to be summarized for the audit. Never waited
    /// on: when it is behind, the summarizer reads the segment back later.
    pub summaries: Option<mpsc::Sender<SegmentBytes>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// How often a stuck upload is reported.
const BEHIND_REPORT: Duration = Duration::from_secs(10);

impl Uploader {
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

    async fn upload_complete(&self, segment: SegmentId, path: &PathBuf) -> anyhow::Result<()> {
        let name = segment.file_name(self.segment_size);
        let raw = match tokio::fs::read(path).await {
            Ok(raw) => raw,
            // Already uploaded and removed by an earlier attempt.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.index.segment(segment)?.is_some() => {
                return Ok(())
            }
            Err(e) => return Err(e).with_context(|| format!("read spool segment {}", path.display())),
        };
        anyhow::ensure!(
            raw.len() as u64 == self.segment_size,
            "spool segment {} has {} bytes, expected {}",
            path.display(),
            raw.len(),
            self.segment_size
        );
        let raw = Arc::new(raw);
        let record = self.store(&segment_key(segment, self.segment_size), raw.clone(), segment).await?;
        let stored_bytes = record.stored_bytes;
        let index = self.index.clone();
        off_runtime(move || index.put_segment(segment, &record)).await?;
        if let Some(summaries) = &self.summaries {
            let _ = summaries.try_send((segment, raw));
        }
        // The complete object supersedes any partial one (left to `expire`
        // when these credentials may not delete).
        if self.repo.may_delete() {
            self.repo.delete(&partial_segment_key(segment, self.segment_size)).await?;
        }
        let (index, path) = (self.index.clone(), path.clone());
        off_runtime(move || {
            index.delete_partial(segment)?;
            remove_durably(&path)
        })
        .await?;
        info!(segment = %name, stored_bytes, "archived segment");
        Ok(())
    }

    async fn upload_partial(&self, segment: SegmentId, path: &PathBuf, len: u64, last: bool) -> anyhow::Result<()> {
        if self.index.segment(segment)?.is_some() {
            return Ok(()); // The complete segment is already stored.
        }
        let raw = match read_prefix(path, len).await {
            Ok(raw) => raw,
            // Renamed to complete meanwhile: its Complete job follows.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("read spool file {}", path.display())),
        };
        let record = self.store(&partial_segment_key(segment, self.segment_size), Arc::new(raw), segment).await?;
        let (index, path) = (self.index.clone(), path.clone());
        off_runtime(move || {
            index.put_partial(segment, &record)?;
            if last {
                remove_durably(&path)?;
            }
            Ok(())
        })
        .await?;
        debug!(segment = %segment.file_name(self.segment_size), bytes = len, "archived partial segment");
        Ok(())
    }

    async fn store(&self, key: &str, raw: Arc<Vec<u8>>, segment: SegmentId) -> anyhow::Result<SegmentRecord> {
        let level = self.compression_level;
        let raw_len = raw.len() as u64;
        let (object, info) = tokio::task::spawn_blocking(move || frame::encode(&raw, Compression::Zstd { level }))
            .await
            .context("join compression task")??;
        self.repo.put(key, object).await?;
        let start = segment.start_lsn(self.segment_size);
        Ok(SegmentRecord {
            start_lsn: start,
            end_lsn: Lsn(start.0 + raw_len),
            raw_bytes: info.raw_len,
            stored_bytes: info.stored_len,
            crc32: info.crc32,
            archived_at_unix: crate::clock::now_unix(),
        })
    }
}

async fn read_prefix(path: &PathBuf, len: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await?;
    let mut raw = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut raw).await?;
    if (raw.len() as u64) < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "spool file shorter than its flushed length",
        ));
    }
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
