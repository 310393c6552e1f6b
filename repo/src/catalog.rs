//! What the repository holds, in memory: complete backups, archived WAL
//! ranges, timelines, and the restorable window. Loading is I/O; the
//! decisions (ranges, restorability, window) are pure functions tested with
//! tables.

use crate::error::RepoError;
use crate::store::Repository;
use serde::Serialize;
use tidemark_proto::repo::backup::{complete_backup_ids, manifest_key, BackupManifest};
use tidemark_proto::repo::layout::ObjectKey;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};

/// Ids of complete backups (those with a `backup.json`), oldest first.
pub async fn complete_backups(repo: &Repository) -> Result<Vec<String>, RepoError> {
    let keys = repo.list("backups").await?;
    Ok(complete_backup_ids(keys.iter().map(String::as_str)))
}

/// Complete backups, oldest first, found without listing their chunks (a
/// long-running agent asks every few minutes, and a repository holds
/// thousands of chunks): the backup directories, each checked for its
/// manifest.
pub async fn complete_backups_by_dir(repo: &Repository) -> Result<Vec<String>, RepoError> {
    let mut ids = Vec::new();
    for id in repo.list_dirs("backups").await? {
        if repo.exists(&manifest_key(&id)).await? {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// A backup's manifest.
pub async fn read_manifest(repo: &Repository, id: &str) -> Result<BackupManifest, RepoError> {
    let key = manifest_key(id);
    let raw = repo.get(&key).await?.ok_or_else(|| RepoError::NoSuchBackup(id.to_string()))?;
    BackupManifest::from_json(&raw).map_err(|reason| RepoError::Corrupt { key, reason })
}

/// A backup and every backup it is incremental on, newest first, ending at
/// a full backup (just `[backup]` for a full one), checked to link up
/// (`tidemark_proto::repo::chain::Chain::new`). A missing base is named.
pub async fn read_chain(repo: &Repository, backup: &BackupManifest) -> Result<Vec<BackupManifest>, RepoError> {
    let mut chain = vec![backup.clone()];
    while let Some(base) = chain.last().and_then(|b| b.base.clone()) {
        // A chain longer than any max_incremental_chain is a loop in edited manifests.
        if chain.len() > 1000 {
            return Err(RepoError::Corrupt {
                key: manifest_key(&backup.id),
                reason: "its chain of bases loops".into(),
            });
        }
        let manifest = read_manifest(repo, &base).await.map_err(|e| match e {
            RepoError::NoSuchBackup(_) => RepoError::Corrupt {
                key: manifest_key(&base),
                reason: format!("missing: backup {} is incremental on it", chain.last().map_or("", |b| b.id.as_str())),
            },
            other => other,
        })?;
        chain.push(manifest);
    }
    tidemark_proto::repo::chain::Chain::new(&chain)
        .map_err(|reason| RepoError::Corrupt { key: manifest_key(&backup.id), reason })?;
    Ok(chain)
}

/// The partial objects a listing shows, by segment: the offsets they start
/// at (the prefix object at 0).
pub type PartialObjects = std::collections::BTreeMap<SegmentId, std::collections::BTreeSet<u64>>;

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
    pub timeline: TimelineId,
    #[serde(rename = "start_lsn")]
    pub start: Lsn,
    #[serde(rename = "end_lsn")]
    pub end: Lsn,
}

/// A timeline and where it branched off its parent. **Stable JSON** (`list --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimelineInfo {
    pub timeline: TimelineId,
    pub parent: Option<TimelineId>,
    pub switch_lsn: Option<Lsn>,
    /// Every ancestor and where it ended, oldest first (the history file's
    /// entries): enough to follow this timeline without its ancestors' files.
    #[serde(skip)]
    pub ancestors: Vec<(TimelineId, Lsn)>,
}

/// The restorable window: from the end of the oldest restorable backup to
/// the end of the archived WAL after it. **Stable JSON** (`status --json`,
/// `list --json`): the fields are in alphabetical order, as they were when
/// the window was built as a JSON map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    /// The oldest backup's end time: the earliest time a restore reaches.
    pub earliest: String,
    pub earliest_lsn: Lsn,
    /// The last archived commit, when known (from the WAL audit).
    pub latest: Option<String>,
    pub latest_lsn: Lsn,
}

impl Window {
    /// The window that starts at `oldest`'s end and ends at `latest_lsn`.
    pub fn from_backup(oldest: &BackupManifest, latest_lsn: Lsn, latest: Option<String>) -> Window {
        Window { earliest: oldest.end_time.clone(), earliest_lsn: oldest.end_lsn, latest, latest_lsn }
    }
}

/// Merges pieces into contiguous ranges per timeline (pieces may overlap:
/// a partial object and a complete one of the same segment).
pub fn wal_ranges(mut pieces: Vec<WalPiece>) -> Vec<WalRange> {
    pieces.sort_by_key(|p| (p.timeline, p.start, p.end));
    let mut ranges: Vec<WalRange> = Vec::new();
    for piece in pieces {
        match ranges.last_mut() {
            Some(last) if last.timeline == piece.timeline && piece.start <= last.end => {
                last.end = last.end.max(piece.end);
            }
            _ => ranges.push(WalRange { timeline: piece.timeline, start: piece.start, end: piece.end }),
        }
    }
    ranges
}

/// A backup can be restored once one archived range of its timeline covers
/// its WAL from start to end.
pub fn is_restorable(backup: &BackupManifest, ranges: &[WalRange]) -> bool {
    ranges.iter().any(|r| r.timeline == backup.timeline && r.start <= backup.start_lsn && r.end >= backup.end_lsn)
}

/// One timeline's stretch of a history: WAL of `timeline` from `from` up to
/// `to`, where the next timeline branched off (none for the last step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub timeline: TimelineId,
    pub from: Lsn,
    pub to: Option<Lsn>,
}

/// The history of `timeline`, oldest step first, from its history file's
/// entries; `None` when the timeline is not in the archive.
pub fn history(timelines: &[TimelineInfo], timeline: TimelineId) -> Option<Vec<Step>> {
    let Some(info) = timelines.iter().find(|t| t.timeline == timeline) else {
        // Timeline 1 has no history file: it is its own history.
        return (timeline == TimelineId(1)).then(|| vec![Step { timeline, from: Lsn(0), to: None }]);
    };
    let mut steps = Vec::new();
    let mut from = Lsn(0);
    for (parent, switch) in &info.ancestors {
        steps.push(Step { timeline: *parent, from, to: Some(*switch) });
        from = *switch;
    }
    steps.push(Step { timeline, from, to: None });
    Some(steps)
}

/// Whether a backup lies on `history`: its timeline is one of the steps and
/// it was consistent before that timeline branched off.
pub fn on_history(backup: &BackupManifest, history: &[Step]) -> bool {
    history.iter().any(|s| s.timeline == backup.timeline && s.to.is_none_or(|to| backup.end_lsn <= to))
}

/// How far archived WAL reaches from `start` following `history`: each
/// timeline's archived range up to its switch point, then the next one's.
pub fn available_along(ranges: &[WalRange], history: &[Step], start: Lsn) -> Lsn {
    let mut at = start;
    for step in history {
        if step.to.is_some_and(|to| to <= at) {
            continue; // a timeline that ended before this point
        }
        let Some(end) = available_to(ranges, step.timeline, at) else { return at };
        match step.to {
            Some(to) if end >= to => at = to,
            Some(to) => return end.min(to),
            None => return end,
        }
    }
    at
}

/// The end of the archived range of `timeline` that contains `from`.
fn available_to(ranges: &[WalRange], timeline: TimelineId, from: Lsn) -> Option<Lsn> {
    ranges.iter().filter(|r| r.timeline == timeline && r.start <= from && r.end >= from).map(|r| r.end).max()
}

/// The segments recovery reads from `start` to `end` along `history`, each
/// from the timeline PostgreSQL asks for: the newest one that had begun by
/// that segment (the segment holding a switch point comes from the new timeline).
pub fn segments_along(history: &[Step], start: Lsn, end: Lsn, segment_size: u64) -> Vec<SegmentId> {
    let first = start.segment_no(segment_size);
    let last = end.segment_no(segment_size).max(first);
    (first..=last)
        .filter_map(|segment_no| {
            let step = history.iter().rev().find(|s| s.from.segment_no(segment_size) <= segment_no)?;
            Some(SegmentId { timeline: step.timeline, segment_no })
        })
        .collect()
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
    pub async fn load(repo: &Repository) -> Result<Catalog, RepoError> {
        let meta = repo.meta().await?;
        let size = meta.wal_segment_size;
        let mut pieces = Vec::new();
        let mut partials = PartialObjects::new();
        for key in repo.list("wal").await? {
            match ObjectKey::parse(&key, size) {
                Some(ObjectKey::Segment(segment)) => pieces.push(WalPiece {
                    timeline: segment.timeline,
                    start: segment.start_lsn(size),
                    end: segment.end_lsn(size),
                }),
                Some(ObjectKey::PartialSegment(segment)) => {
                    partials.entry(segment).or_default().insert(0);
                }
                Some(ObjectKey::PartialPiece { segment, offset }) => {
                    partials.entry(segment).or_default().insert(offset);
                }
                _ => {}
            }
        }
        for (segment, offsets) in &partials {
            let (end, _) = crate::partial::chain_end(repo, *segment, size, offsets).await?;
            let start = segment.start_lsn(size);
            if end > 0 {
                pieces.push(WalPiece { timeline: segment.timeline, start, end: Lsn(start.0 + end) });
            }
        }
        let mut timelines =
            vec![TimelineInfo { timeline: TimelineId(1), parent: None, switch_lsn: None, ancestors: Vec::new() }];
        for key in repo.list("timelines").await? {
            let Some(ObjectKey::History(timeline)) = ObjectKey::parse(&key, size) else { continue };
            let content = repo.get(&key).await?.unwrap_or_default();
            let entries = tidemark_proto::timeline::parse_history(&content)
                .map_err(|e| RepoError::Corrupt { key: key.clone(), reason: e.to_string() })?;
            let last = entries.last();
            timelines.push(TimelineInfo {
                timeline,
                parent: last.map(|e| e.parent),
                switch_lsn: last.map(|e| e.switch_lsn),
                ancestors: entries.iter().map(|e| (e.parent, e.switch_lsn)).collect(),
            });
        }
        timelines.sort_by_key(|t| t.timeline);
        let ranges = wal_ranges(pieces);
        let mut restorable = Vec::new();
        let mut waiting = Vec::new();
        for id in complete_backups(repo).await? {
            let manifest = read_manifest(repo, &id).await?;
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
    pub fn lineage(&self) -> Vec<TimelineId> {
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

    /// The window, with its latest restorable time (the last archived
    /// commit, from the WAL audit) when known: every moment from the end of
    /// the oldest restorable backup whose WAL reaches the end of the archive
    /// without a hole (along the newest timeline's history) to that end.
    /// Backups kept outside it (by a calendar policy or for a protected
    /// restore point) restore to their own points, but not to every moment.
    pub fn window(&self, latest_commit: Option<String>) -> Option<Window> {
        let newest = self.timelines.iter().map(|t| t.timeline).max().unwrap_or(TimelineId(1));
        let steps = history(&self.timelines, newest)?;
        let reach = |b: &BackupManifest| available_along(&self.ranges, &steps, b.start_lsn);
        let end = self.restorable.iter().filter(|b| on_history(b, &steps)).map(reach).max()?;
        let oldest = self.restorable.iter().find(|b| on_history(b, &steps) && reach(b) == end)?;
        Some(Window::from_backup(oldest, end, latest_commit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(tli: u32, start: u64, end: u64) -> WalPiece {
        WalPiece { timeline: TimelineId(tli), start: Lsn(start), end: Lsn(end) }
    }

    fn backup(timeline: u32, start: u64, end: u64) -> BackupManifest {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": "x", "label": "x", "system_identifier": "1", "server_version_num": 150000,
            "timeline": timeline, "start_lsn": Lsn(start).to_string(), "end_lsn": Lsn(end).to_string(),
            "start_time": "t0", "end_time": "t1",
            "tablespaces": [], "files": [], "pg_manifest_key": "k", "bytes": 0, "stored_bytes": 0
        }))
        .expect("manifest")
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
        let spans: Vec<(u32, u64, u64)> = ranges.iter().map(|r| (r.timeline.0, r.start.0, r.end.0)).collect();
        assert_eq!(spans, vec![(1, 16, 64), (1, 96, 112), (2, 48, 60)]);
        let json = serde_json::to_string(&ranges[0]).expect("json");
        assert_eq!(json, r#"{"timeline":1,"start_lsn":"0/10","end_lsn":"0/40"}"#);
    }

    #[test]
    fn restorable_only_with_all_its_wal() {
        let ranges = wal_ranges(vec![piece(1, 16, 64)]);
        assert!(is_restorable(&backup(1, 0x20, 0x40), &ranges));
        assert!(!is_restorable(&backup(1, 0x20, 0x41), &ranges));
        assert!(!is_restorable(&backup(2, 0x20, 0x40), &ranges));
    }

    #[test]
    fn the_window_runs_from_the_oldest_restorable_backup_to_the_archive_end() {
        let ranges = wal_ranges(vec![piece(1, 16, 64), piece(2, 60, 90)]);
        let timelines = vec![
            TimelineInfo { timeline: TimelineId(1), parent: None, switch_lsn: None, ancestors: vec![] },
            TimelineInfo {
                timeline: TimelineId(2),
                parent: Some(TimelineId(1)),
                switch_lsn: Some(Lsn(60)),
                ancestors: vec![(TimelineId(1), Lsn(60))],
            },
        ];
        let catalog = Catalog { restorable: vec![backup(1, 0x20, 0x30)], waiting: vec![], ranges, timelines };
        let window = catalog.window(Some("t9".into())).expect("window");
        assert_eq!(
            window,
            Window { earliest: "t1".into(), earliest_lsn: Lsn(0x30), latest: Some("t9".into()), latest_lsn: Lsn(90) }
        );
        assert_eq!(
            serde_json::to_string(&window).expect("json"),
            r#"{"earliest":"t1","earliest_lsn":"0/30","latest":"t9","latest_lsn":"0/5A"}"#
        );
        // A hole after an old kept backup: the window starts at the one after it.
        let ranges = wal_ranges(vec![piece(1, 16, 40), piece(1, 48, 90)]);
        let kept = Catalog {
            restorable: vec![backup(1, 0x10, 0x12), backup(1, 0x30, 0x32)],
            waiting: vec![],
            ranges,
            timelines: vec![],
        };
        assert_eq!(kept.window(None).map(|w| w.earliest_lsn), Some(Lsn(0x32)));
        let empty = Catalog { restorable: vec![], waiting: vec![], ranges: vec![], timelines: vec![] };
        assert_eq!(empty.window(None), None);
    }

    #[tokio::test]
    async fn backups_found_by_directory_are_those_with_a_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().to_str().expect("utf-8").to_string();
        let repo = Repository::open(&url, &[], crate::Create::Yes).expect("open").with_keyring(None);
        let framed = |raw: &[u8]| {
            tidemark_proto::repo::frame::encode(raw, tidemark_proto::repo::frame::Compression::None).expect("frame").0
        };
        for key in ["backups/B/backup.json", "backups/B/chunks/0", "backups/A/backup.json", "backups/C/chunks/0"] {
            repo.put(key, framed(b"x")).await.expect("put");
        }
        // C is interrupted (no manifest): not complete; the order is the ids'.
        assert_eq!(complete_backups_by_dir(&repo).await.expect("listed"), vec!["A".to_string(), "B".to_string()]);
        assert_eq!(complete_backups(&repo).await.expect("listed"), vec!["A".to_string(), "B".to_string()]);
    }
}
