//! What the repository holds, in memory: backups, archived WAL ranges,
//! timelines, and the restorable window. Loading is I/O; the decisions
//! (ranges, restorability, window) are pure functions tested with tables.

use crate::store::{ReadError, RepositoryReader};
use serde::Serialize;
use tidemark_proto::repo::backup::BackupManifest;
use tidemark_proto::segment::WalFileName;
use tidemark_proto::{Lsn, TimelineId};

/// One archived WAL object: complete segments end at the segment end,
/// partial objects where their durable prefix ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalPiece {
    pub timeline: TimelineId,
    pub start: Lsn,
    pub end: Lsn,
}

/// A contiguous archived stretch of one timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WalRange {
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    #[serde(skip)]
    pub start: Lsn,
    #[serde(skip)]
    pub end: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimelineInfo {
    pub timeline: u32,
    pub parent: Option<u32>,
    pub switch_lsn: Option<String>,
    /// Every ancestor and where it ended, oldest first (the history file's
    /// entries): enough to follow this timeline without its ancestors' files.
    #[serde(skip)]
    pub ancestors: Vec<(u32, Lsn)>,
}

/// Merges pieces into contiguous ranges per timeline (pieces may overlap:
/// a partial object and a complete one of the same segment).
pub fn wal_ranges(mut pieces: Vec<WalPiece>) -> Vec<WalRange> {
    pieces.sort_by_key(|p| (p.timeline, p.start, p.end));
    let mut ranges: Vec<WalRange> = Vec::new();
    for piece in pieces {
        match ranges.last_mut() {
            Some(last) if last.timeline == piece.timeline.0 && piece.start <= last.end => {
                if piece.end > last.end {
                    last.end = piece.end;
                    last.end_lsn = piece.end.to_string();
                }
            }
            _ => ranges.push(WalRange {
                timeline: piece.timeline.0,
                start_lsn: piece.start.to_string(),
                end_lsn: piece.end.to_string(),
                start: piece.start,
                end: piece.end,
            }),
        }
    }
    ranges
}

/// A backup can be restored once one archived range of its timeline covers
/// its WAL from start to end.
pub fn is_restorable(backup: &BackupManifest, ranges: &[WalRange]) -> bool {
    let (Ok(start), Ok(end)) = (backup.start_lsn.parse::<Lsn>(), backup.end_lsn.parse::<Lsn>()) else { return false };
    ranges.iter().any(|r| r.timeline == backup.timeline && r.start <= start && r.end >= end)
}

pub struct Catalog {
    /// Complete backups whose WAL is archived, oldest first.
    pub restorable: Vec<BackupManifest>,
    /// Complete backups still waiting for their WAL.
    pub waiting: Vec<BackupManifest>,
    pub ranges: Vec<WalRange>,
    pub timelines: Vec<TimelineInfo>,
}

impl Catalog {
    pub async fn load(repo: &RepositoryReader) -> Result<Catalog, ReadError> {
        let meta = repo.meta().await?;
        let size = meta.wal_segment_size;
        let mut pieces = Vec::new();
        let mut timelines = vec![TimelineInfo { timeline: 1, parent: None, switch_lsn: None, ancestors: Vec::new() }];
        for key in repo.list("wal").await? {
            let Some(name) = key.rsplit('/').next() else { continue };
            let (base, partial) = match name.strip_suffix(".partial") {
                Some(base) => (base, true),
                None => (name, false),
            };
            let Ok(WalFileName::Segment(segment)) = WalFileName::parse(base, size) else { continue };
            let start = segment.start_lsn(size);
            let end = if partial { Lsn(start.0 + repo.frame_info(&key).await?.raw_len) } else { segment.end_lsn(size) };
            pieces.push(WalPiece { timeline: segment.timeline, start, end });
        }
        for key in repo.list("timelines").await? {
            let Some(name) = key.rsplit('/').next() else { continue };
            let Ok(WalFileName::History(timeline)) = WalFileName::parse(name, size) else { continue };
            let content = repo.get(&key).await?.unwrap_or_default();
            let entries = tidemark_proto::timeline::parse_history(&content)
                .map_err(|e| ReadError::Corrupt { key: key.clone(), reason: e.to_string() })?;
            let last = entries.last();
            timelines.push(TimelineInfo {
                timeline: timeline.0,
                parent: last.map(|e| e.parent.0),
                switch_lsn: last.map(|e| e.switch_lsn.to_string()),
                ancestors: entries.iter().map(|e| (e.parent.0, e.switch_lsn)).collect(),
            });
        }
        timelines.sort_by_key(|t| t.timeline);
        let ranges = wal_ranges(pieces);
        let mut restorable = Vec::new();
        let mut waiting = Vec::new();
        for id in crate::fetch::list_backups(repo).await? {
            let manifest = crate::fetch::read_manifest(repo, &id).await?;
            if is_restorable(&manifest, &ranges) {
                restorable.push(manifest);
            } else {
                waiting.push(manifest);
            }
        }
        Ok(Catalog { restorable, waiting, ranges, timelines })
    }

    /// The newest timeline and its ancestors: the history a restore follows
    /// by default.
    pub fn lineage(&self) -> Vec<u32> {
        let mut lineage = Vec::new();
        let mut current = self.timelines.iter().map(|t| t.timeline).max();
        while let Some(timeline) = current {
            if lineage.contains(&timeline) {
                break;
            }
            lineage.push(timeline);
            current = self.timelines.iter().find(|t| t.timeline == timeline).and_then(|t| t.parent);
        }
        lineage
    }

    /// The archived range that ends the current history (newest timeline, highest end).
    pub fn current_range(&self) -> Option<&WalRange> {
        let lineage = self.lineage();
        self.ranges.iter().filter(|r| lineage.contains(&r.timeline)).max_by_key(|r| (r.timeline, r.end))
    }

    /// The window: from the end of the oldest restorable backup to the end of
    /// the WAL archived after it on its timeline.
    pub fn window(&self) -> Option<serde_json::Value> {
        self.window_until(None)
    }

    /// The window, with its latest restorable time (the last archived commit,
    /// from the WAL audit) when known.
    pub fn window_until(&self, latest_commit: Option<String>) -> Option<serde_json::Value> {
        let oldest = self.restorable.first()?;
        let end_lsn: Lsn = oldest.end_lsn.parse().ok()?;
        let latest =
            self.ranges.iter().filter(|r| r.timeline >= oldest.timeline && r.end >= end_lsn).map(|r| r.end).max()?;
        Some(serde_json::json!({
            "earliest": oldest.end_time,
            "latest": latest_commit,
            "earliest_lsn": oldest.end_lsn,
            "latest_lsn": latest.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(tli: u32, start: u64, end: u64) -> WalPiece {
        WalPiece { timeline: TimelineId(tli), start: Lsn(start), end: Lsn(end) }
    }

    #[test]
    fn ranges_merge_contiguous_and_overlapping_pieces() {
        let ranges = wal_ranges(vec![
            piece(1, 32, 48),
            piece(1, 16, 32),
            piece(1, 48, 50),
            piece(1, 48, 64),
            piece(1, 96, 112),
            piece(2, 48, 60),
        ]);
        let spans: Vec<(u32, u64, u64)> = ranges.iter().map(|r| (r.timeline, r.start.0, r.end.0)).collect();
        assert_eq!(spans, vec![(1, 16, 64), (1, 96, 112), (2, 48, 60)]);
    }

    #[test]
    fn restorable_only_with_all_its_wal() {
        let ranges = wal_ranges(vec![piece(1, 16, 64)]);
        let mut backup: BackupManifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": "x", "label": "x", "system_identifier": "1", "server_version_num": 150000,
            "timeline": 1, "start_lsn": "0/20", "end_lsn": "0/40", "start_time": "t", "end_time": "t",
            "tablespaces": [], "files": [], "pg_manifest_key": "k", "bytes": 0, "stored_bytes": 0
        }))
        .expect("manifest");
        assert!(is_restorable(&backup, &ranges));
        backup.end_lsn = "0/41".into();
        assert!(!is_restorable(&backup, &ranges));
        backup.end_lsn = "0/40".into();
        backup.timeline = 2;
        assert!(!is_restorable(&backup, &ranges));
    }
}
