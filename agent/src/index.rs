//! The agent's RocksDB index: what is archived, and where streaming stands.
//! This is the only module that names rocksdb. Everything in it can be
//! rebuilt from the repository (the segment objects themselves).
//!
//! Keys (numbers big-endian, so byte order is numeric order):
//! - `meta`                         -> IndexMeta
//! - `progress`                     -> Progress
//! - `seg` + tli u32 + segno u64    -> SegmentRecord (a complete segment object)
//! - `par` + tli u32 + segno u64    -> SegmentRecord (the latest partial object)
//! - `cmt` + tli u32 + segno u64    -> the newest commit among the records starting
//!   in a summarized segment, (Unix microseconds, LSN), or null. The summaries
//!   themselves live in the repository only (`sum` keys of older versions, which
//!   held them whole, are no longer written or read)
//! - `summary_next`                 -> the segment number the summarizer decodes next
//! - `rel` + db u32 + filenode u32  -> RelName (what a relation file was named)
//! - `gap`                          -> (TimelineId, Lsn): where streaming went on after
//!   the newest archive gap (the server no longer had the WAL before it)

use anyhow::Context;
use rocksdb::{Options, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::wal::summary::SegmentSummary;
use tidemark_proto::{Lsn, TimelineId};

pub struct Index {
    db: DB,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub system_identifier: String,
    pub wal_segment_size: u64,
    /// Where streaming begins on the first `run`: the segment holding the
    /// server's position when `init` created the slot.
    pub stream_start_timeline: TimelineId,
    #[serde(with = "tidemark_proto::lsn::as_number")]
    pub stream_start_lsn: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub timeline: TimelineId,
    /// Everything before this is fsynced in the spool.
    #[serde(with = "tidemark_proto::lsn::as_number")]
    pub flushed_lsn: Lsn,
    /// The server's end of WAL as last reported by it.
    #[serde(with = "tidemark_proto::lsn::as_number")]
    pub server_lsn: Lsn,
    pub updated_at_unix: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    #[serde(with = "tidemark_proto::lsn::as_number")]
    pub start_lsn: Lsn,
    /// Just past the last archived byte.
    #[serde(with = "tidemark_proto::lsn::as_number")]
    pub end_lsn: Lsn,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub crc32: u32,
    pub archived_at_unix: i64,
}

fn segment_key(prefix: &[u8; 3], segment: SegmentId) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&segment.timeline.0.to_be_bytes());
    key.extend_from_slice(&segment.segment_no.to_be_bytes());
    key
}

fn rel_key(database: u32, filenode: u32) -> Vec<u8> {
    let mut key = b"rel".to_vec();
    key.extend_from_slice(&database.to_be_bytes());
    key.extend_from_slice(&filenode.to_be_bytes());
    key
}

/// What a relation file was, as the catalog named it: a user table
/// (schema-qualified, quoted as needed) or something the audit skips.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelName {
    pub table: Option<String>,
}

/// A three-letter prefix, the timeline (4 bytes) and the segment number (8 bytes).
const SEGMENT_KEY_LEN: usize = 15;

/// RocksDB's defaults suit a database server (64 MiB memtables, a 32 MiB
/// block cache, statistics dumped every 10 minutes). The index holds a few
/// small records per WAL segment and sits beside the database it archives,
/// so it gets a footprint of a few MiB and no periodic work of its own.
fn small_footprint() -> Options {
    let mut options = Options::default();
    options.set_write_buffer_size(2 << 20);
    options.set_max_write_buffer_number(2);
    options.set_max_open_files(64);
    options.set_max_background_jobs(1);
    options.set_max_total_wal_size(8 << 20);
    options.set_keep_log_file_num(2);
    options.set_max_log_file_size(1 << 20);
    options.set_stats_dump_period_sec(0);
    options.set_stats_persist_period_sec(0);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(2 << 20));
    table.set_cache_index_and_filter_blocks(true);
    options.set_block_based_table_factory(&table);
    options
}

fn parse_segment_key(key: &[u8]) -> Option<SegmentId> {
    let tli = u32::from_be_bytes(key.get(3..7)?.try_into().ok()?);
    let segno = u64::from_be_bytes(key.get(7..15)?.try_into().ok()?);
    Some(SegmentId { timeline: TimelineId(tli), segment_no: segno })
}

impl Index {
    pub fn open(dir: &Path) -> anyhow::Result<Index> {
        let mut options = small_footprint();
        options.create_if_missing(true);
        let db = DB::open(&options, dir).with_context(|| format!("open index {}", dir.display()))?;
        Ok(Index { db })
    }

    /// Opens without taking the lock, so `status` can read while `run` writes.
    /// The writer may rotate its log file between our listing and opening
    /// it, so a failed open is retried a few times before it counts; so is
    /// an open that shows no metadata (which `init` writes first): a
    /// reader that read the MANIFEST before a flush and the logs after it
    /// sees neither the flushed table nor the log that held it.
    pub fn open_read_only(dir: &Path) -> anyhow::Result<Index> {
        let mut attempt = 0;
        loop {
            match DB::open_for_read_only(&small_footprint(), dir, false) {
                Ok(db) if attempt < 20 && !matches!(db.get(b"meta"), Ok(Some(_))) => {
                    attempt += 1;
                    drop(db);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Ok(db) => return Ok(Index { db }),
                Err(e) if attempt < 20 && e.kind() == rocksdb::ErrorKind::IOError => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("open index {} read-only", dir.display())),
            }
        }
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> anyhow::Result<Option<T>> {
        match self.db.get(key).context("read index")? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("decode index value")?)),
            None => Ok(None),
        }
    }

    fn put_json<T: Serialize>(&self, key: &[u8], value: &T, sync: bool) -> anyhow::Result<()> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        let bytes = serde_json::to_vec(value).context("encode index value")?;
        self.db.put_opt(key, bytes, &options).context("write index")
    }

    pub fn meta(&self) -> anyhow::Result<Option<IndexMeta>> {
        self.get_json(b"meta")
    }

    pub fn put_meta(&self, meta: &IndexMeta) -> anyhow::Result<()> {
        self.put_json(b"meta", meta, true)
    }

    pub fn progress(&self) -> anyhow::Result<Option<Progress>> {
        self.get_json(b"progress")
    }

    /// Progress is informational (status), so it is not synced on every call.
    pub fn put_progress(&self, progress: &Progress) -> anyhow::Result<()> {
        self.put_json(b"progress", progress, false)
    }

    pub fn put_segment(&self, segment: SegmentId, record: &SegmentRecord) -> anyhow::Result<()> {
        self.put_json(&segment_key(b"seg", segment), record, true)
    }

    /// Not synced: the partial object is durable in the repository before
    /// this is written, and a crash that loses the record only makes the
    /// index (`status`, the metrics' archive lag) show less archived until
    /// the next partial upload rewrites it. On a quiet database this fsync
    /// came every 10 s.
    pub fn put_partial(&self, segment: SegmentId, record: &SegmentRecord) -> anyhow::Result<()> {
        self.put_json(&segment_key(b"par", segment), record, false)
    }

    pub fn delete_partial(&self, segment: SegmentId) -> anyhow::Result<()> {
        self.db.delete(segment_key(b"par", segment)).context("write index")
    }

    pub fn segment(&self, segment: SegmentId) -> anyhow::Result<Option<SegmentRecord>> {
        self.get_json(&segment_key(b"seg", segment))
    }

    pub fn segments(&self) -> anyhow::Result<Vec<(SegmentId, SegmentRecord)>> {
        self.scan(b"seg")
    }

    pub fn partials(&self) -> anyhow::Result<Vec<(SegmentId, SegmentRecord)>> {
        self.scan(b"par")
    }

    /// Records that `segment` is summarized, with the newest commit among its records.
    pub fn put_summarized(&self, segment: SegmentId, summary: &SegmentSummary) -> anyhow::Result<()> {
        let newest = summary
            .ends
            .iter()
            .filter(|e| e.status == tidemark_proto::wal::rmgr::XactStatus::Committed)
            .max_by_key(|e| e.lsn)
            .map(|e| (e.time, e.lsn));
        self.put_json(&segment_key(b"cmt", segment), &newest, false)
    }

    /// The newest commit in the summarized segments (Unix microseconds, LSN),
    /// reading them newest first and stopping at the first that has one.
    pub fn last_commit(&self) -> anyhow::Result<Option<(i64, u64)>> {
        let upper = [b'c', b'm', b't', 0xff];
        let mode = rocksdb::IteratorMode::From(&upper, rocksdb::Direction::Reverse);
        for item in self.db.iterator(mode) {
            let (key, value) = item.context("scan index")?;
            if !key.starts_with(b"cmt") {
                break;
            }
            let newest: Option<(i64, u64)> = serde_json::from_slice(&value).context("decode index value")?;
            if newest.is_some() {
                return Ok(newest);
            }
        }
        Ok(None)
    }

    /// Where streaming went on after the newest archive gap, if there was one.
    pub fn gap(&self) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
        self.get_json(b"gap")
    }

    pub fn put_gap(&self, resumed_at: (TimelineId, Lsn)) -> anyhow::Result<()> {
        self.put_json(b"gap", &resumed_at, true)
    }

    /// The end of the archived WAL (see [`archived_end`]), counted from
    /// after the newest gap: what the archive holds since it can hold it.
    pub fn archived_end(&self) -> anyhow::Result<Option<Lsn>> {
        let gap = self.gap()?;
        let after_gap = |records: Vec<(SegmentId, SegmentRecord)>| -> Vec<(SegmentId, SegmentRecord)> {
            match gap {
                Some(resumed) => records.into_iter().filter(|(id, r)| (id.timeline, r.end_lsn) > resumed).collect(),
                None => records,
            }
        };
        Ok(archived_end(&after_gap(self.segments()?), &after_gap(self.partials()?)))
    }

    pub fn summary_next(&self) -> anyhow::Result<Option<u64>> {
        self.get_json(b"summary_next")
    }

    pub fn put_summary_next(&self, segment_no: u64) -> anyhow::Result<()> {
        self.put_json(b"summary_next", &segment_no, true)
    }

    pub fn put_rel_name(&self, database: u32, filenode: u32, name: &RelName) -> anyhow::Result<()> {
        self.put_json(&rel_key(database, filenode), name, false)
    }

    pub fn rel_names(&self) -> anyhow::Result<Vec<((u32, u32), RelName)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"rel") {
            let (key, value) = item.context("scan index")?;
            if !key.starts_with(b"rel") {
                break;
            }
            let database = u32::from_be_bytes(key.get(3..7).context("corrupt index key")?.try_into()?);
            let filenode = u32::from_be_bytes(key.get(7..11).context("corrupt index key")?.try_into()?);
            out.push(((database, filenode), serde_json::from_slice(&value).context("decode index value")?));
        }
        Ok(out)
    }

    fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &[u8; 3]) -> anyhow::Result<Vec<(SegmentId, T)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(prefix) {
            let (key, value) = item.context("scan index")?;
            if !key.starts_with(prefix) {
                break;
            }
            if key.len() != SEGMENT_KEY_LEN {
                continue; // another key with the same first letters (`summary_next`)
            }
            let segment = parse_segment_key(&key).context("corrupt index key")?;
            out.push((segment, serde_json::from_slice(&value).context("decode index value")?));
        }
        Ok(out)
    }
}

/// The end of the archive: past the last byte such that every byte from the
/// first archived one up to it is in the repository, following the latest
/// timeline. Complete segments first, then a partial object that continues them.
pub fn archived_end(segments: &[(SegmentId, SegmentRecord)], partials: &[(SegmentId, SegmentRecord)]) -> Option<Lsn> {
    let mut ranges: Vec<(TimelineId, Lsn, Lsn)> =
        segments.iter().chain(partials.iter()).map(|(id, r)| (id.timeline, r.start_lsn, r.end_lsn)).collect();
    // Per timeline in LSN order; a later timeline continues from its switch point.
    ranges.sort();
    let mut end: Option<Lsn> = None;
    let mut current_tli = None;
    for (tli, start, stop) in ranges {
        match end {
            None => end = Some(stop),
            // A new timeline's first segment repeats the old one's prefix, so it
            // may start before the old end.
            Some(e) if Some(tli) != current_tli => {
                if start <= e {
                    end = Some(stop)
                } else {
                    break;
                }
            }
            Some(e) if start <= e => end = Some(e.max(stop)),
            Some(_) => break,
        }
        current_tli = Some(tli);
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: u64, end: u64) -> SegmentRecord {
        SegmentRecord {
            start_lsn: Lsn(start),
            end_lsn: Lsn(end),
            raw_bytes: 0,
            stored_bytes: 0,
            crc32: 0,
            archived_at_unix: 0,
        }
    }
    fn seg(tli: u32, no: u64) -> SegmentId {
        SegmentId { timeline: TimelineId(tli), segment_no: no }
    }

    #[test]
    fn keys_sort_numerically() {
        let a = segment_key(b"seg", seg(1, 255));
        let b = segment_key(b"seg", seg(1, 256));
        let c = segment_key(b"seg", seg(2, 0));
        assert!(a < b && b < c);
        assert_eq!(parse_segment_key(&b), Some(seg(1, 256)));
    }

    #[test]
    fn archived_end_follows_contiguous_segments_and_partial() {
        let segments = vec![(seg(1, 1), rec(16, 32)), (seg(1, 2), rec(32, 48))];
        assert_eq!(archived_end(&segments, &[]), Some(Lsn(48)));
        assert_eq!(archived_end(&segments, &[(seg(1, 3), rec(48, 50))]), Some(Lsn(50)));
        let gap = vec![(seg(1, 1), rec(16, 32)), (seg(1, 3), rec(48, 64))];
        assert_eq!(archived_end(&gap, &[]), Some(Lsn(32)));
        assert_eq!(archived_end(&[], &[]), None);
        // After a gap the index counts from where streaming went on.
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(dir.path()).expect("open");
        index.put_segment(seg(1, 0), &rec(0, 16)).expect("put");
        index.put_segment(seg(1, 5), &rec(80, 96)).expect("put");
        assert_eq!(index.archived_end().expect("end"), Some(Lsn(16)));
        index.put_gap((TimelineId(1), Lsn(80))).expect("gap");
        assert_eq!(index.archived_end().expect("end"), Some(Lsn(96)));
        let switched = vec![(seg(1, 1), rec(16, 32)), (seg(2, 1), rec(16, 32)), (seg(2, 2), rec(32, 40))];
        assert_eq!(archived_end(&switched, &[(seg(1, 2), rec(32, 36))]), Some(Lsn(40)));
    }

    #[test]
    fn round_trip_in_rocksdb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(dir.path()).expect("open");
        index.put_segment(seg(1, 2), &rec(32, 48)).expect("put");
        index.put_segment(seg(1, 1), &rec(16, 32)).expect("put");
        index.put_partial(seg(1, 3), &rec(48, 50)).expect("put");
        let segments = index.segments().expect("scan");
        assert_eq!(segments.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![seg(1, 1), seg(1, 2)]);
        assert_eq!(index.partials().expect("scan").len(), 1);
        let reader = Index::open_read_only(dir.path()).expect("read-only while open");
        assert_eq!(reader.segments().expect("scan").len(), 2);
    }
}
