//! The WAL audit as the restore tool reads it: transactions with commit time,
//! xid, LSN and per-table row counts, from the agent's per-segment summaries
//! in the repository, plus WAL archived after the last summary (decoded here,
//! with tables shown by file number since only the agent can name them).
//!
//! Summaries are replayed once into a local RocksDB cache (derived data,
//! safe to delete), indexed so a query reads only what it returns:
//! - `state`                                   -> ingested position + assembler state
//! - `tm` + time i64 + lsn u64                 -> Transaction (all, by commit time)
//! - `tt` + table + 0x00 + time i64 + lsn u64  -> Transaction (per table)
//! - `xi` + xid u32 + lsn u64                  -> Transaction
//! - `rp` + lsn u64                            -> RestorePoint
//! - `hi` + table                              -> rows-per-transaction histogram
//! - `tc` + table + 0x00 + hour i64            -> transactions that hour (u64;
//!   table "" counts all of them)
//!
//! Times are stored with the sign bit flipped so byte order is time order.
//! The hourly counts let a query count its matches without visiting each.

mod cache;
mod keys;
mod tail;

pub use cache::default_cache_dir;
pub use tail::first_end_after_quick;

use anyhow::Context;
use keys::{count_key, table_prefix, time_key, time_of_hour_key, time_of_key, tx_key, xid_key};
use rocksdb::{Direction, IteratorMode, DB};
use std::path::Path;
use tail::summaries_along;
use tidemark_proto::wal::summary::{Assembler, RestorePoint, SegmentSummary, Transaction};
use tidemark_proto::Lsn;
use tidemark_repo::catalog::Catalog;
use tidemark_repo::{RepoError, Repository};

/// Histogram buckets: bucket b holds transactions that changed 2^b .. 2^(b+1)-1 rows.
const BUCKETS: usize = 40;

const HOUR: i64 = 3_600_000_000;

pub struct Audit {
    db: DB,
    state: cache::CacheState,
    /// Transactions from WAL not summarized yet (newest stretch), oldest first.
    pub tail: Vec<Transaction>,
    pub tail_restore_points: Vec<RestorePoint>,
    /// End of the WAL the audit covers.
    pub covered_to: Lsn,
}

impl Audit {
    /// Opens the cache and brings it up to date with the repository.
    pub async fn load(repo: &Repository, catalog: &Catalog, cache_dir: Option<&Path>) -> anyhow::Result<Audit> {
        let meta = repo.meta().await?;
        let dir = cache::cache_dir(cache_dir, &meta.system_identifier)?;
        let lineage = catalog.lineage();
        let (db, state) = cache::open(&dir, &lineage)?;
        let mut audit = Audit { db, state, tail: Vec::new(), tail_restore_points: Vec::new(), covered_to: Lsn::ZERO };
        let size = meta.wal_segment_size;
        let chosen = summaries_along(repo, &lineage, size).await?;
        for (segment_no, (timeline, key)) in &chosen {
            if audit.state.last_segment.is_some_and(|last| *segment_no <= last) {
                continue;
            }
            let object = repo.get(key).await?.ok_or_else(|| RepoError::corrupt(key, "listed, then gone"))?;
            let summary =
                SegmentSummary::from_json(&object).map_err(|reason| RepoError::Corrupt { key: key.clone(), reason })?;
            // RocksDB writes block: off the async threads.
            let (segment_no, timeline) = (*segment_no, *timeline);
            audit = tokio::task::spawn_blocking(move || audit.ingest(&summary, segment_no, timeline).map(|()| audit))
                .await
                .context("join the audit cache writer")??;
        }
        audit.covered_to = Lsn(audit.state.last_segment.map(|s| (s + 1) * size).unwrap_or(0));
        audit.decode_tail(repo, catalog, size).await?;
        Ok(audit)
    }

    /// Decodes archived WAL past the last summary (complete and partial
    /// segments of the current history), so the newest commits count too.
    async fn decode_tail(&mut self, repo: &Repository, catalog: &Catalog, size: u64) -> anyhow::Result<()> {
        let Some(summary) = tail::decode_past(repo, catalog, self.covered_to, size).await? else {
            if let Some(range) = catalog.current_range() {
                self.covered_to = self.covered_to.max(range.end);
            }
            return Ok(());
        };
        let mut assembler: Assembler = serde_json::from_slice(&serde_json::to_vec(&self.state.assembler)?)?;
        self.covered_to = Lsn(summary.end_lsn).max(self.covered_to);
        self.tail = assembler.add(&summary);
        self.tail_restore_points = summary.restore_points;
        Ok(())
    }

    fn scan(&self, from: Vec<u8>, prefix_len: usize) -> impl Iterator<Item = Transaction> + '_ {
        let prefix = from.get(..prefix_len).unwrap_or_default().to_vec();
        self.db
            .iterator(IteratorMode::From(&from, Direction::Forward))
            .map_while(move |item| item.ok().filter(|(k, _)| k.starts_with(&prefix)))
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
    }

    /// Transactions matching the filter, oldest first: with `limit`, only the
    /// newest `limit` of them, and how many matched in all. Only what is
    /// shown is decoded; the count comes from hourly counts plus the keys of
    /// the two partial hours at the ends of the range, so a query over
    /// millions of indexed transactions costs about what it shows.
    pub fn query(&self, filter: &Filter, limit: Option<usize>) -> Page {
        let since = filter.since.unwrap_or(i64::MIN);
        let until = filter.until.unwrap_or(i64::MAX);
        let keep = |t: &Transaction| {
            t.time >= since
                && t.time <= until
                && filter.xid.is_none_or(|x| t.xid == x)
                && filter.table.as_ref().is_none_or(|name| t.tables.iter().any(|c| &c.table == name))
        };
        let want = limit.unwrap_or(usize::MAX);
        // The tail (WAL past the last summary) is newer than everything
        // indexed, and disjoint from it: its transactions end after the
        // last summarized segment.
        let mut tail: Vec<Transaction> = self.tail.iter().filter(|t| keep(t)).cloned().collect();
        let (mut indexed, indexed_matches) = if let Some(xid) = filter.xid {
            // Few entries per xid (wraparound): decode them all.
            let all: Vec<Transaction> = self.scan(xid_key(xid, None), 6).filter(|t| keep(t)).collect();
            let count = all.len();
            (all, count)
        } else {
            let (prefix, table) = match &filter.table {
                Some(table) => (table_prefix(table), table.as_str()),
                None => (b"tm".to_vec(), ""),
            };
            let mut upper = prefix.clone();
            upper.extend_from_slice(&time_key(until));
            upper.extend_from_slice(&u64::MAX.to_be_bytes());
            let room = want.saturating_sub(tail.len());
            let mut newest_first = Vec::new();
            let mut it = self.db.raw_iterator();
            it.seek_for_prev(&upper);
            while newest_first.len() < room {
                let (Some(key), Some(value)) = (it.key(), it.value()) else { break };
                if !key.starts_with(&prefix) || time_of_key(key).is_none_or(|t| t < since) {
                    break;
                }
                if let Ok(t) = serde_json::from_slice::<Transaction>(value) {
                    newest_first.push(t);
                }
                it.prev();
            }
            newest_first.reverse();
            let count = if newest_first.len() < room {
                newest_first.len() // all of them were read
            } else {
                self.count_between(&prefix, table, since, until)
            };
            (newest_first, count)
        };
        let matched = tail.len() + indexed_matches;
        indexed.append(&mut tail);
        let mut transactions = indexed;
        transactions.sort_by_key(|t| t.lsn);
        if transactions.len() > want {
            transactions.drain(..transactions.len() - want);
        }
        Page { transactions, matched }
    }

    /// How many keys under `prefix` (tm or tt+table) have a time in [since, until].
    fn count_between(&self, prefix: &[u8], table: &str, since: i64, until: i64) -> usize {
        let (first_hour, last_hour) = (since.div_euclid(HOUR), until.div_euclid(HOUR));
        if first_hour == last_hour {
            return self.count_keys(prefix, since, until);
        }
        // The partial first and last hours key by key, the hours between from their counts.
        let mut count = self.count_keys(prefix, since, (first_hour + 1).saturating_mul(HOUR) - 1)
            + self.count_keys(prefix, last_hour.saturating_mul(HOUR), until);
        let start = count_key(table, first_hour + 1);
        let count_prefix = &start[..start.len() - 8];
        let mut it = self.db.raw_iterator();
        it.seek(&start);
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !key.starts_with(count_prefix) || time_of_hour_key(key) >= last_hour {
                break;
            }
            count += value.try_into().map(u64::from_be_bytes).unwrap_or(0) as usize;
            it.next();
        }
        count
    }

    fn count_keys(&self, prefix: &[u8], since: i64, until: i64) -> usize {
        let mut start = prefix.to_vec();
        start.extend_from_slice(&time_key(since));
        let mut it = self.db.raw_iterator();
        it.seek(&start);
        let mut count = 0;
        while let Some(key) = it.key() {
            if !key.starts_with(prefix) || time_of_key(key).is_none_or(|t| t > until) {
                break;
            }
            count += 1;
            it.next();
        }
        count
    }

    pub fn restore_points(&self) -> Vec<RestorePoint> {
        let mut points: Vec<RestorePoint> = self
            .db
            .prefix_iterator(b"rp")
            .map_while(|item| item.ok().filter(|(k, _)| k.starts_with(b"rp")))
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        points.extend(self.tail_restore_points.iter().cloned());
        points
    }

    /// The typical number of rows one transaction changes in `table` (the
    /// upper end of the median histogram bucket), if there is history.
    pub fn typical_rows(&self, table: &str) -> Option<u64> {
        let histogram = self.histogram(table).ok()?;
        typical_of(&histogram)
    }

    /// Where recovery to a time stops: the earliest (in WAL order) of the
    /// transaction ends timed after `micros`. Commit times follow WAL order
    /// closely but not exactly, so a few ends after the time are compared.
    pub fn first_end_after(&self, micros: i64) -> Option<Lsn> {
        let after = micros.checked_add(1)?;
        let cached = self.scan(tx_key(b"tm", after, 0), 2).take(64).map(|t| t.lsn).min();
        let tail = self.tail.iter().filter(|t| t.time > micros).map(|t| t.lsn).min();
        cached.into_iter().chain(tail).min().map(Lsn)
    }

    /// The last commit the audit knows of.
    pub fn last_commit(&self) -> Option<Transaction> {
        if let Some(last) =
            self.tail.iter().rev().find(|t| t.status == tidemark_proto::wal::rmgr::XactStatus::Committed)
        {
            return Some(last.clone());
        }
        self.db
            .iterator(IteratorMode::From(&tx_key(b"tm", i64::MAX, u64::MAX), Direction::Reverse))
            .map_while(|item| item.ok().filter(|(k, _)| k.starts_with(b"tm")))
            .filter_map(|(_, v)| serde_json::from_slice::<Transaction>(&v).ok())
            .find(|t| t.status == tidemark_proto::wal::rmgr::XactStatus::Committed)
    }
}

/// A query's answer: the transactions shown (oldest first) and how many matched.
pub struct Page {
    pub transactions: Vec<Transaction>,
    pub matched: usize,
}

#[derive(Default)]
pub struct Filter {
    pub table: Option<String>,
    /// Unix microseconds.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub xid: Option<u32>,
}

fn bucket_of(rows: u64) -> usize {
    (64 - rows.max(1).leading_zeros() as usize - 1).min(BUCKETS - 1)
}

fn typical_of(histogram: &[u64]) -> Option<u64> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (bucket, count) in histogram.iter().enumerate() {
        seen += count;
        if seen * 2 >= total {
            return Some((1u64 << (bucket + 1)) - 1);
        }
    }
    None
}

/// Whether `rows` is far beyond what transactions usually change in a table:
/// ten times the typical count, and at least 50 rows.
pub fn is_unusual(rows: u64, typical: Option<u64>) -> bool {
    typical.is_some_and(|t| rows >= 50 && rows >= 10 * t.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_proto::wal::rmgr::XactStatus;
    use tidemark_proto::wal::summary::{Change, End};
    use tidemark_proto::TimelineId;

    fn cache() -> (tempfile::TempDir, Audit) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = DB::open_default(dir.path()).expect("open");
        let state = cache::CacheState { version: cache::CACHE_VERSION, ..Default::default() };
        (dir, Audit { db, state, tail: Vec::new(), tail_restore_points: Vec::new(), covered_to: Lsn::ZERO })
    }

    /// One segment with a transaction every 7 minutes over `n`, alternately
    /// touching tables a and b.
    fn summary(segment: u64, first: u32, n: u32) -> SegmentSummary {
        let mut changes = Vec::new();
        let mut ends = Vec::new();
        for xid in first..first + n {
            let table = if xid % 2 == 0 { "public.a" } else { "public.b" };
            changes.push(Change { xid, db: 5, filenode: 1, table: Some(table.into()), ins: 1, ..Default::default() });
            let time = i64::from(xid) * 7 * 60_000_000;
            ends.push(End {
                xid,
                status: XactStatus::Committed,
                time,
                lsn: u64::from(xid) * 100,
                subxacts: vec![],
                prepared: false,
            });
        }
        SegmentSummary {
            version: 1,
            timeline: 1,
            start_lsn: segment << 24,
            end_lsn: (segment + 1) << 24,
            records: 0,
            changes,
            ends,
            restore_points: vec![],
            prepared: vec![],
            finished_below: None,
            blocks: None,
        }
    }

    #[test]
    fn counts_and_limits_agree_with_a_full_scan() {
        let (_dir, mut audit) = cache();
        audit.ingest(&summary(1, 1, 60), 1, TimelineId(1)).expect("ingest");
        audit.ingest(&summary(2, 61, 60), 2, TimelineId(1)).expect("ingest");
        let minutes = |m: i64| Some(m * 60_000_000);
        for table in [None, Some("public.a".to_string())] {
            for (since, until) in
                [(None, None), (minutes(30), minutes(500)), (minutes(61), minutes(119)), (None, minutes(200))]
            {
                let filter = Filter { table: table.clone(), since, until, xid: None };
                let all = audit.query(&filter, None);
                let expected: Vec<u32> = (1..=120u32)
                    .filter(|x| table.is_none() || x % 2 == 0)
                    .filter(|x| {
                        let t = i64::from(*x) * 7 * 60_000_000;
                        since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u)
                    })
                    .collect();
                assert_eq!(all.transactions.iter().map(|t| t.xid).collect::<Vec<_>>(), expected, "{since:?} {until:?}");
                assert_eq!(all.matched, expected.len());
                let page = audit.query(&filter, Some(3));
                assert_eq!(page.matched, expected.len(), "{table:?} {since:?} {until:?}");
                let newest: Vec<u32> = expected[expected.len().saturating_sub(3)..].to_vec();
                assert_eq!(page.transactions.iter().map(|t| t.xid).collect::<Vec<_>>(), newest);
            }
        }
    }

    #[test]
    fn histogram_buckets_and_typical_size() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(1000), 9);
        let mut histogram = vec![0; BUCKETS];
        histogram[0] = 90; // single-row transactions
        histogram[9] = 1; // one of ~1000 rows
        assert_eq!(typical_of(&histogram), Some(1));
        assert!(is_unusual(1000, typical_of(&histogram)));
        assert!(!is_unusual(3, typical_of(&histogram)));
        assert!(!is_unusual(1000, None));
    }
}
