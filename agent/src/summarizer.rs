//! Decodes archived WAL into the audit: for each segment, a summary of the
//! records that start in it (row changes per transaction and table, commits
//! and aborts with their times, restore points), stored in the repository
//! under `summaries/` and in the index.
//!
//! It runs beside the uploader, fed each segment once it is stored, and never
//! holds archiving up: if it falls behind or restarts, it reads the segments
//! it missed back from the repository. A segment's summary is written only
//! once every record starting in it is complete (the last one may end in the
//! next segment), and `summary_next` in the index says where to resume.

use crate::index::Index;
use crate::relnames::RelationNames;
use anyhow::Context;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::layout::{segment_key, summary_key};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::wal::page::major_for_magic;
use tidemark_proto::wal::summary::SummaryBuilder;
use tidemark_proto::wal::{self, WalReader};
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::Repository;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A complete segment just stored, with its bytes.
pub type SegmentBytes = (SegmentId, Arc<Vec<u8>>);

/// Summaries being built, per segment number (a record belongs to the segment it starts in).
type Building = BTreeMap<u64, (TimelineId, SummaryBuilder)>;

pub struct Summarizer {
    repo: Repository,
    index: Arc<Index>,
    catalog: RelationNames,
    segment_size: u64,
    reader: Option<WalReader>,
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
        Summarizer { repo, index, catalog, segment_size, reader: None, building: BTreeMap::new(), metrics }
    }

    pub async fn run(mut self, mut segments: mpsc::Receiver<SegmentBytes>) {
        while let Some((segment, bytes)) = segments.recv().await {
            if let Err(e) = self.take(segment, bytes).await {
                // The next segment retries from `summary_next`, reading the repository.
                warn!(segment = %segment.file_name(self.segment_size), "could not summarize WAL: {e:#}");
                self.reader = None;
                self.building.clear();
            }
        }
    }

    async fn take(&mut self, segment: SegmentId, bytes: Arc<Vec<u8>>) -> anyhow::Result<()> {
        let next = match self.index.summary_next()? {
            Some(next) => next,
            None => self.first_archived()?.unwrap_or(segment.segment_no),
        };
        if segment.segment_no < next {
            return Ok(()); // summarized before a restart
        }
        for segment_no in next..segment.segment_no {
            match self.archived(segment_no, segment.timeline).await? {
                Some((missed, data)) => self.feed(missed, Arc::new(data)).await?,
                None => {
                    warn!(segment_no, "no archived WAL to summarize; the audit has a gap there");
                    self.reader = None;
                    self.building.clear();
                    self.index.put_summary_next(segment_no + 1)?;
                }
            }
        }
        self.feed(segment, bytes).await
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

    async fn feed(&mut self, segment: SegmentId, data: Arc<Vec<u8>>) -> anyhow::Result<()> {
        let start = segment.start_lsn(self.segment_size);
        let major = data
            .get(..2)
            .and_then(|b| major_for_magic(u16::from_le_bytes([b[0], b[1]])))
            .context("the segment does not start with a WAL page of PostgreSQL 13 to 18")?;
        let reader = match self.reader.take() {
            Some(reader) if reader.next_page() == start => reader,
            _ => {
                self.building.clear();
                WalReader::new(start, self.segment_size)
            }
        };
        self.building.entry(segment.segment_no).or_insert_with(|| (segment.timeline, SummaryBuilder::default()));
        let building = std::mem::take(&mut self.building);
        let segment_size = self.segment_size;
        // Decoding a segment is CPU work: off the async threads, so the
        // replication stream's keepalives are never held up behind it.
        let (reader, building) =
            tokio::task::spawn_blocking(move || decode(reader, building, segment, segment_size, &data, major))
                .await
                .context("join the WAL decoder")?;
        self.building = building;
        let done_before = match reader.end() {
            None => {
                let done = reader.complete_before();
                self.reader = Some(reader);
                done
            }
            Some(end) => {
                // A complete segment holds valid WAL to its end (or zeros after
                // a switch, which the reader skips): this is damage. Decoding
                // starts afresh at the next segment.
                warn!(segment = %segment.file_name(segment_size), "WAL decoding stopped early: {end}");
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
                let json = summary.to_json()?;
                anyhow::Ok((frame::encode(&json, Compression::Zstd { level: 3 })?.0, summary))
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
                index.put_summary(segment, &summary)?;
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

/// Feeds one segment's bytes to the reader, adding each record to the
/// builder of the segment it starts in.
fn decode(
    mut reader: WalReader,
    mut building: Building,
    segment: SegmentId,
    segment_size: u64,
    data: &[u8],
    major: wal::PgMajor,
) -> (WalReader, Building) {
    let mut malformed = 0u64;
    reader.feed(data, |raw| match wal::decode(raw.lsn, raw.end, raw.bytes, major) {
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
        }
    });
    if malformed > 0 {
        warn!(segment = %segment.file_name(segment_size), malformed, "records the decoder could not take apart");
    }
    (reader, building)
}
