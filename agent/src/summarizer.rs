//! Decodes archived WAL into the audit: for each segment, a summary of the
//! records that start in it (row changes per transaction and table, commits
//! and aborts with their times, restore points), stored in the repository
//! under `summaries/` and in the index.
//!
//! It runs beside the uploader, fed the bytes of each upload as the uploader
//! reads them (a piece of at most 2 MiB at a time), and never
//! holds archiving up: if it falls behind or restarts, it reads the segments
//! it missed back from the repository. A segment's summary is written only
//! once every record starting in it is complete (the last one may end in the
//! next segment), and `summary_next` in the index says where to resume.

use crate::index::Index;
use crate::relnames::RelationNames;
use anyhow::Context;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tidemark_proto::repo::frame;
use tidemark_proto::repo::layout::{segment_key, summary_key};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::wal::page::major_for_magic;
use tidemark_proto::wal::summary::SummaryBuilder;
use tidemark_proto::wal::{self, WalReader};
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::Repository;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Bytes of a segment the uploader just read: `bytes` start `offset` bytes into `segment`.
pub struct SegmentPiece {
    pub segment: SegmentId,
    pub offset: u64,
    pub bytes: Arc<Vec<u8>>,
}

/// Pieces up to this many bytes are decoded on the async thread itself, and
/// the uploader compresses new spool bytes up to this many there too
/// (`Uploader::append_inline`); more go to a blocking thread.
pub const INLINE_BYTES: usize = 64 * 1024;

/// Summaries being built, per segment number (a record belongs to the segment it starts in).
type Building = BTreeMap<u64, (TimelineId, SummaryBuilder)>;

/// Where decoding stands: the reader, the bytes it has not taken yet (the
/// start of a page whose end has not arrived), and the PostgreSQL version
/// whose record layouts apply.
struct Decoding {
    reader: WalReader,
    pending: Vec<u8>,
    major: wal::PgMajor,
}

impl Decoding {
    /// The LSN of the next byte this decoding takes.
    fn expects(&self) -> Lsn {
        Lsn(self.reader.next_page().0 + self.pending.len() as u64)
    }
}

pub struct Summarizer {
    repo: Repository,
    index: Arc<Index>,
    catalog: RelationNames,
    segment_size: u64,
    decoding: Option<Decoding>,
    /// Summaries being built, by segment number, with their file's timeline.
    building: Building,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Summarizer {
    pub fn new(
        repo: Repository,
        index: Arc<Index>,
        catalog: RelationNames,
        segment_size: u64,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Summarizer {
        Summarizer { repo, index, catalog, segment_size, decoding: None, building: BTreeMap::new(), metrics }
    }

    pub async fn run(mut self, mut pieces: mpsc::Receiver<SegmentPiece>) {
        while let Some(piece) = pieces.recv().await {
            let segment = piece.segment;
            if let Err(e) = self.take(piece).await {
                // The next segment retries from `summary_next`, reading the repository.
                warn!(segment = %segment.file_name(self.segment_size), "could not summarize WAL: {e:#}");
                self.reset();
            }
        }
    }

    fn reset(&mut self) {
        self.decoding = None;
        self.building.clear();
    }

    async fn take(&mut self, piece: SegmentPiece) -> anyhow::Result<()> {
        let at = Lsn(piece.segment.start_lsn(self.segment_size).0 + piece.offset);
        if self.decoding.as_ref().map(Decoding::expects) == Some(at) {
            return self.feed(piece).await;
        }
        if piece.offset != 0 {
            // A piece was missed (the queue was full): wait for the next
            // segment's start, where the missed segment is read back.
            self.reset();
            return Ok(());
        }
        // Out of sequence at a segment start (after a restart, or pieces
        // missed): the segments from `summary_next` on are read back from the repository.
        let segment = piece.segment;
        let next = match self.index.summary_next()? {
            Some(next) => next,
            None => self.first_archived()?.unwrap_or(segment.segment_no),
        };
        if segment.segment_no < next {
            return Ok(()); // summarized before a restart
        }
        self.reset();
        for segment_no in next..segment.segment_no {
            match self.archived(segment_no, segment.timeline).await? {
                Some((missed, data)) => {
                    self.feed(SegmentPiece { segment: missed, offset: 0, bytes: Arc::new(data) }).await?
                }
                None => {
                    warn!(segment_no, "no archived WAL to summarize; the audit has a gap there");
                    self.reset();
                    self.index.put_summary_next(segment_no + 1)?;
                }
            }
        }
        self.feed(piece).await
    }

    fn first_archived(&self) -> anyhow::Result<Option<u64>> {
        Ok(self.index.segments()?.first().map(|(s, _)| s.segment_no))
    }

    /// A segment the uploader stored earlier: the copy on the newest timeline
    /// not after `timeline`.
    async fn archived(&self, segment_no: u64, timeline: TimelineId) -> anyhow::Result<Option<(SegmentId, Vec<u8>)>> {
        let Some(segment) = self
            .index
            .segments()?
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| s.segment_no == segment_no && s.timeline <= timeline)
            .max_by_key(|s| s.timeline)
        else {
            return Ok(None);
        };
        let key = segment_key(segment, self.segment_size);
        let raw = self.repo.get(&key).await?.with_context(|| format!("{key} is in the index but not stored"))?;
        Ok(Some((segment, raw)))
    }

    /// Decodes a piece that continues the current decoding, or starts a new
    /// decoding at a segment's start; any other piece is left alone.
    async fn feed(&mut self, piece: SegmentPiece) -> anyhow::Result<()> {
        let SegmentPiece { segment, offset, bytes } = piece;
        let at = Lsn(segment.start_lsn(self.segment_size).0 + offset);
        let decoding = match self.decoding.take() {
            Some(decoding) if decoding.expects() == at => decoding,
            _ if offset == 0 => {
                self.building.clear();
                let major = bytes
                    .get(..2)
                    .and_then(|b| major_for_magic(u16::from_le_bytes([b[0], b[1]])))
                    .context("the segment does not start with a WAL page of PostgreSQL 13 to 18")?;
                Decoding { reader: WalReader::new(at, self.segment_size), pending: Vec::new(), major }
            }
            _ => return Ok(()),
        };
        self.building.entry(segment.segment_no).or_insert_with(|| (segment.timeline, SummaryBuilder::default()));
        let building = std::mem::take(&mut self.building);
        let segment_size = self.segment_size;
        // Decoding is CPU work: off the async threads, so other tasks are
        // not held up behind it; but a quiet database's few kilobytes
        // decode in microseconds, less than the hop to a blocking thread.
        let (decoding, building) = if bytes.len() <= INLINE_BYTES {
            decode(decoding, building, segment, segment_size, &bytes)
        } else {
            tokio::task::spawn_blocking(move || {
                crate::priority::background_priority();
                decode(decoding, building, segment, segment_size, &bytes)
            })
            .await
            .context("join the WAL decoder")?
        };
        self.building = building;
        let done_before = match decoding.reader.end() {
            None => {
                let done = decoding.reader.complete_before();
                self.decoding = Some(decoding);
                done
            }
            Some(end) => {
                // A complete segment holds valid WAL to its end (or zeros after
                // a switch, which the reader skips): this is damage. Decoding
                // starts afresh at the next segment.
                warn!(segment = %segment.file_name(segment_size), "WAL decoding stopped early: {end}");
                for (_, builder) in self.building.values_mut() {
                    builder.mark_incomplete();
                }
                segment.end_lsn(segment_size)
            }
        };
        self.finish_before(done_before).await
    }

    /// Writes the summaries of every segment whose records are all complete.
    async fn finish_before(&mut self, done_before: Lsn) -> anyhow::Result<()> {
        while let Some(entry) = self.building.first_entry() {
            let segment_no = *entry.key();
            let segment_end = (segment_no + 1) * self.segment_size;
            if segment_end > done_before.0 {
                break;
            }
            let (timeline, builder) = entry.remove();
            let segment = SegmentId { timeline, segment_no };
            let touched: Vec<_> = builder.touched().collect();
            let ddl: HashSet<u32> =
                builder.created.iter().map(|r| r.database).chain(builder.locked.iter().map(|l| l.0)).collect();
            self.catalog.refresh(&touched, &ddl).await;
            let catalog = &self.catalog;
            let summary = builder.finish(timeline.0, segment.start_lsn(self.segment_size), |rel| catalog.naming(rel));
            let (object, summary) = tokio::task::spawn_blocking(move || {
                crate::priority::background_priority();
                let (object, _) = frame::encode_zstd_from(3, |out| summary.write_json(out))?;
                anyhow::Ok((object, summary))
            })
            .await
            .context("join the summary compression")??;
            self.repo.put(&summary_key(segment, self.segment_size), object).await?;
            let index = self.index.clone();
            let transactions = summary.ends.len();
            let newest_commit = summary
                .ends
                .iter()
                .filter(|e| e.status == tidemark_proto::wal::rmgr::XactStatus::Committed)
                .map(|e| e.time)
                .max();
            tokio::task::spawn_blocking(move || {
                index.put_summarized(segment, &summary)?;
                index.put_summary_next(segment_no + 1)
            })
            .await
            .context("join the index write")??;
            self.metrics.summarized(Lsn(segment_end), newest_commit);
            info!(
                segment = %segment.file_name(self.segment_size),
                transactions,
                "summarized segment"
            );
        }
        Ok(())
    }
}

/// Feeds a piece's bytes (after what was pending) to the reader, adding each
/// record to the builder of the segment it starts in; keeps the bytes of a
/// page whose end is still to come.
fn decode(
    mut decoding: Decoding,
    mut building: Building,
    segment: SegmentId,
    segment_size: u64,
    bytes: &[u8],
) -> (Decoding, Building) {
    let data = if decoding.pending.is_empty() {
        std::borrow::Cow::Borrowed(bytes)
    } else {
        let mut joined = std::mem::take(&mut decoding.pending);
        joined.extend_from_slice(bytes);
        std::borrow::Cow::Owned(joined)
    };
    let major = decoding.major;
    let mut malformed = 0u64;
    let used = decoding.reader.feed(&data, |raw| match wal::decode(raw.lsn, raw.end, raw.bytes, major) {
        Ok(record) => {
            let segment_no = raw.lsn.segment_no(segment_size);
            building
                .entry(segment_no)
                .or_insert_with(|| (segment.timeline, SummaryBuilder::default()))
                .1
                .add(&record, major);
        }
        Err(e) => {
            malformed += 1;
            debug!("{e}");
            // Its blocks are not known: the segment's block map is dropped.
            building
                .entry(raw.lsn.segment_no(segment_size))
                .or_insert_with(|| (segment.timeline, SummaryBuilder::default()))
                .1
                .mark_incomplete();
        }
    });
    decoding.pending = data.get(used..).unwrap_or_default().to_vec();
    if malformed > 0 {
        warn!(segment = %segment.file_name(segment_size), malformed, "records the decoder could not take apart");
    }
    (decoding, building)
}
