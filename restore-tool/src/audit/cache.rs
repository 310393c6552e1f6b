//! The audit's local RocksDB cache: where it lives, its state, and writing
//! a summary's transactions into it. Derived data: deleted and rebuilt
//! whenever its layout or the followed history changes.

use super::keys::{count_key, histogram_key, restore_point_key, table_prefix, time_key, tx_key, xid_key};
use super::{bucket_of, Audit, BUCKETS, HOUR};
use anyhow::Context;
use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tidemark_proto::wal::summary::{Assembler, SegmentSummary};
use tidemark_proto::TimelineId;
use tidemark_repo::Fail;

/// The cache's layout; a cache of another version is rebuilt.
pub(super) const CACHE_VERSION: u32 = 2;

#[derive(Default, Serialize, Deserialize)]
pub(super) struct CacheState {
    #[serde(default)]
    pub version: u32,
    /// The history (timelines, newest first) the cache was built along; when
    /// the repository's changes (a promotion), the cache is rebuilt.
    #[serde(default)]
    pub lineage: Vec<TimelineId>,
    /// The last summarized segment replayed, and its timeline.
    pub last_segment: Option<u64>,
    pub last_timeline: Option<TimelineId>,
    pub assembler: Assembler,
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".tidemark-probe.{}", std::process::id()));
    let ok = tidemark_repo::durable::create_exclusive(&probe).is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}

/// The default cache directory: `$XDG_CACHE_HOME` or `~/.cache`, per cluster.
pub fn default_cache_dir(system_identifier: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("tidemark").join("audit").join(system_identifier)
}

/// The cache directory: the one given, else the default, else (when the
/// home directory is not ours to write, as under `sudo -u postgres`) a
/// private one in /tmp.
pub(super) fn cache_dir(given: Option<&Path>, system_identifier: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        std::fs::create_dir_all(dir).with_context(|| format!("create audit cache {}", dir.display()))?;
        return Ok(dir.to_path_buf());
    }
    let home = default_cache_dir(system_identifier);
    if std::fs::create_dir_all(&home).is_ok() && writable(&home) {
        return Ok(home);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let tmp = std::env::temp_dir().join(format!("tidemark-audit-{uid}-{system_identifier}"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tmp)
        .with_context(|| format!("create audit cache {}", tmp.display()))?;
    // The name is predictable: a directory (or link) someone else put
    // there first would let them feed this cache.
    let ours = std::fs::symlink_metadata(&tmp)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o077 == 0);
    if !ours {
        return Err(Fail::new(
            format!("{} is not a private directory of this user", tmp.display()),
            "pass --cache-dir (or TIDEMARK_CACHE_DIR) naming a directory of your own",
        )
        .into());
    }
    Ok(tmp)
}

/// Opens the cache in `dir`, starting over when it is of another layout or
/// was built along another history than `lineage`.
pub(super) fn open(dir: &Path, lineage: &[TimelineId]) -> anyhow::Result<(DB, CacheState)> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    let open = || DB::open(&options, dir).with_context(|| format!("open audit cache {}", dir.display()));
    let db = open()?;
    let stored: Option<CacheState> = db.get(b"state")?.and_then(|bytes| serde_json::from_slice(&bytes).ok());
    match stored {
        Some(state) if state.version == CACHE_VERSION && state.lineage == lineage => Ok((db, state)),
        other => {
            let db = if other.is_some() || db.get(b"state")?.is_some() {
                drop(db);
                DB::destroy(&options, dir).with_context(|| format!("clear audit cache {}", dir.display()))?;
                open()?
            } else {
                db
            };
            Ok((db, CacheState { version: CACHE_VERSION, lineage: lineage.to_vec(), ..Default::default() }))
        }
    }
}

impl Audit {
    pub(super) fn ingest(
        &mut self,
        summary: &SegmentSummary,
        segment_no: u64,
        timeline: TimelineId,
    ) -> anyhow::Result<()> {
        let mut batch = WriteBatch::default();
        let mut histograms: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for tx in self.state.assembler.add(summary) {
            let hour = tx.time.div_euclid(HOUR);
            *counts.entry(count_key("", hour)).or_default() += 1;
            for change in &tx.tables {
                *counts.entry(count_key(&change.table, hour)).or_default() += 1;
            }
            let json = serde_json::to_vec(&tx)?;
            batch.put(tx_key(b"tm", tx.time, tx.lsn), &json);
            batch.put(xid_key(tx.xid, Some(tx.lsn)), &json);
            for change in &tx.tables {
                let mut key = table_prefix(&change.table);
                key.extend_from_slice(&time_key(tx.time));
                key.extend_from_slice(&tx.lsn.to_be_bytes());
                batch.put(key, &json);
                let histogram = match histograms.get_mut(&change.table) {
                    Some(h) => h,
                    None => histograms.entry(change.table.clone()).or_insert(self.histogram(&change.table)?),
                };
                let rows = change.inserted + change.updated + change.deleted;
                if let Some(bucket) = histogram.get_mut(bucket_of(rows)) {
                    *bucket += 1;
                }
            }
        }
        for (table, histogram) in histograms {
            batch.put(histogram_key(&table), serde_json::to_vec(&histogram)?);
        }
        for (key, added) in counts {
            let before = self.db.get(&key)?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
            batch.put(key, (before + added).to_be_bytes());
        }
        for point in &summary.restore_points {
            batch.put(restore_point_key(point.lsn), serde_json::to_vec(point)?);
        }
        self.state.last_segment = Some(segment_no);
        self.state.last_timeline = Some(timeline);
        batch.put(b"state", serde_json::to_vec(&self.state)?);
        self.db.write(batch).context("write audit cache")
    }

    pub(super) fn histogram(&self, table: &str) -> anyhow::Result<Vec<u64>> {
        Ok(match self.db.get(histogram_key(table))? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| vec![0; BUCKETS]),
            None => vec![0; BUCKETS],
        })
    }
}
