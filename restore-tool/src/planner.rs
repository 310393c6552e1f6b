//! From the catalog and a target to a restore plan, or a refusal that names
//! the window. Pure: no I/O, `now` passed in.

use crate::catalog::{Catalog, TimelineInfo, WalRange};
use crate::target::{format_time, parse_time, Target};
use tidemark_proto::repo::backup::BackupManifest;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::Lsn;
use tidemark_proto::TimelineId;
use time::OffsetDateTime;

#[derive(Debug)]
pub struct Plan {
    pub backup: BackupManifest,
    pub target: Target,
    /// The WAL range replay starts from (the backup's start) and must at
    /// least reach (the backup's end, or an LSN target).
    pub wal_start: Lsn,
    pub wal_needed_to: Lsn,
    /// The end of the archived WAL that recovery can follow.
    pub wal_available_to: Lsn,
    /// The timeline recovery follows (recovery_target_timeline) and its history.
    pub target_timeline: u32,
    pub history: Vec<Step>,
}

/// One timeline's stretch of a history: WAL of `timeline` from `from` up to
/// `to`, where the next timeline branched off (none for the last step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub timeline: u32,
    pub from: Lsn,
    pub to: Option<Lsn>,
}

/// The history of `timeline`, oldest step first, from its history file's entries.
pub fn history(timelines: &[TimelineInfo], timeline: u32) -> Result<Vec<Step>, String> {
    let info = timelines.iter().find(|t| t.timeline == timeline).ok_or_else(|| {
        let known: Vec<String> = timelines.iter().map(|t| t.timeline.to_string()).collect();
        format!("timeline {timeline} is not in the archive (it has {})", known.join(", "))
    })?;
    let mut steps = Vec::new();
    let mut from = Lsn(0);
    for (parent, switch) in &info.ancestors {
        steps.push(Step { timeline: *parent, from, to: Some(*switch) });
        from = *switch;
    }
    steps.push(Step { timeline, from, to: None });
    Ok(steps)
}

/// Whether a backup lies on `history`: its timeline is one of the steps and
/// it was consistent before that timeline branched off.
fn on_history(backup: &BackupManifest, history: &[Step]) -> bool {
    let Ok(end) = backup.end_lsn.parse::<Lsn>() else { return false };
    history.iter().any(|s| s.timeline == backup.timeline && s.to.is_none_or(|to| end <= to))
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

/// The segments recovery reads from `start` to `end` along `history`, each
/// from the timeline PostgreSQL asks for: the newest one that had begun by
/// that segment (the segment holding a switch point comes from the new timeline).
pub fn segments_along(history: &[Step], start: Lsn, end: Lsn, segment_size: u64) -> Vec<SegmentId> {
    let first = start.segment_no(segment_size);
    let last = end.segment_no(segment_size).max(first);
    (first..=last)
        .filter_map(|segment_no| {
            let step = history.iter().rev().find(|s| s.from.segment_no(segment_size) <= segment_no)?;
            Some(SegmentId { timeline: TimelineId(step.timeline), segment_no })
        })
        .collect()
}

fn backup_end_time(backup: &BackupManifest) -> Option<OffsetDateTime> {
    parse_time(&backup.end_time).ok()
}

fn window_text(catalog: &Catalog) -> String {
    match catalog.window() {
        Some(w) => format!(
            "the restorable window starts at {} (LSN {}) and the archive reaches LSN {}",
            w["earliest"].as_str().unwrap_or("?"),
            w["earliest_lsn"].as_str().unwrap_or("?"),
            w["latest_lsn"].as_str().unwrap_or("?")
        ),
        None => "there is no restorable backup yet".into(),
    }
}

/// The end of the archived range of `timeline` that contains `from`.
fn available_to(ranges: &[WalRange], timeline: u32, from: Lsn) -> Option<Lsn> {
    ranges.iter().filter(|r| r.timeline == timeline && r.start <= from && r.end >= from).map(|r| r.end).max()
}

/// Chooses the backup and WAL for `target`. `stop_lsn` is where the WAL
/// audit says recovery will stop for a time, xid or restore-point target (the
/// first commit after the time, the transaction's commit, the restore point):
/// the backup must be consistent before it, or PostgreSQL would refuse to stop
/// there. Without it (no audit), times compare with backup end times and an
/// xid or name takes the oldest backup, which reaches any of them.
pub fn plan(
    catalog: &Catalog,
    target: Target,
    backup_id: Option<&str>,
    timeline: Option<&str>,
    stop_lsn: Option<Lsn>,
    now: OffsetDateTime,
) -> Result<Plan, String> {
    if catalog.restorable.is_empty() {
        return Err(format!("nothing to restore: {}", window_text(catalog)));
    }
    // The timeline to follow: by default the newest, as PostgreSQL's 'latest';
    // 'current' is the chosen backup's own (settled once it is chosen).
    let newest = catalog.timelines.iter().map(|t| t.timeline).max().unwrap_or(1);
    let requested = match timeline.map(str::trim) {
        None | Some("latest") => Some(newest),
        Some("current") => None,
        Some(text) => Some(parse_timeline(text)?),
    };
    let target_history = requested.map(|t| history(&catalog.timelines, t)).transpose()?;
    let candidates: Vec<&BackupManifest> = match backup_id {
        Some(id) => {
            let backup = catalog.restorable.iter().find(|b| b.id == id).ok_or_else(|| {
                if catalog.waiting.iter().any(|b| b.id == id) {
                    format!("backup {id} is not restorable yet: its WAL is not all archived")
                } else {
                    format!("there is no backup {id}; `tidemark-restore list` shows them")
                }
            })?;
            vec![backup]
        }
        None => catalog.restorable.iter().collect(),
    };
    let candidates: Vec<&BackupManifest> = match &target_history {
        Some(steps) => {
            let on: Vec<&BackupManifest> = candidates.iter().copied().filter(|b| on_history(b, steps)).collect();
            if on.is_empty() {
                return Err(format!(
                    "no restorable backup{} lies on the history of timeline {}",
                    backup_id.map(|id| format!(" ({id})")).unwrap_or_default(),
                    requested.unwrap_or(newest)
                ));
            }
            on
        }
        None => candidates,
    };
    // The newest backup that can still reach the target.
    let before_stop = |stop: Lsn| {
        candidates.iter().rev().find(|b| b.end_lsn.parse::<Lsn>().is_ok_and(|end| end <= stop)).copied().ok_or_else(
            || {
                format!(
                    "recovery for {target} stops at {stop}, before any restorable backup is consistent: {}",
                    window_text(catalog)
                )
            },
        )
    };
    if let Target::Time(t) = &target {
        if *t > now {
            return Err(format!("the target {} is in the future", format_time(*t)));
        }
    }
    let chosen = match (&target, stop_lsn) {
        (Target::Time(_) | Target::Xid(_) | Target::BeforeXid(_) | Target::Name(_), Some(stop)) => before_stop(stop)?,
        (Target::Time(t), None) => candidates
            .iter()
            .rev()
            .find(|b| backup_end_time(b).is_some_and(|end| end <= *t))
            .copied()
            .ok_or_else(|| {
                format!("the target {} is before the chosen backup's end: {}", format_time(*t), window_text(catalog))
            })?,
        (Target::Lsn(lsn), _) => candidates
            .iter()
            .rev()
            .find(|b| b.end_lsn.parse::<Lsn>().is_ok_and(|end| end <= *lsn))
            .copied()
            .ok_or_else(|| {
                format!("the target LSN {lsn} is before the chosen backup's end: {}", window_text(catalog))
            })?,
        // Without the WAL audit the position of an xid or a restore point is
        // unknown: the oldest backup reaches any of them that is in the window.
        (Target::Xid(_) | Target::BeforeXid(_) | Target::Name(_), None) => {
            candidates.first().copied().ok_or("no backup")?
        }
        (Target::Latest | Target::Immediate, _) => candidates.last().copied().ok_or("no backup")?,
    };
    let wal_start: Lsn = chosen.start_lsn.parse().map_err(|e| format!("backup {}: {e}", chosen.id))?;
    let backup_end: Lsn = chosen.end_lsn.parse().map_err(|e| format!("backup {}: {e}", chosen.id))?;
    let (target_timeline, history) = match (requested, target_history) {
        (Some(t), Some(steps)) => (t, steps),
        _ => (chosen.timeline, history(&catalog.timelines, chosen.timeline)?),
    };
    let wal_available_to = available_along(&catalog.ranges, &history, wal_start).max(backup_end);
    if let Some(stop) = stop_lsn {
        if stop > wal_available_to {
            return Err(format!(
                "recovery for {target} stops at {stop}, past the WAL archived on timeline {target_timeline}'s history \
                 (to {wal_available_to})"
            ));
        }
    }
    let wal_needed_to = match &target {
        Target::Lsn(lsn) => {
            if *lsn > wal_available_to {
                return Err(format!(
                    "the target LSN {lsn} is past the WAL archived on timeline {target_timeline}'s history (to \
                     {wal_available_to}): {}",
                    window_text(catalog)
                ));
            }
            *lsn
        }
        _ => backup_end,
    };
    Ok(Plan { backup: chosen.clone(), target, wal_start, wal_needed_to, wal_available_to, target_timeline, history })
}

fn parse_timeline(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    };
    parsed
        .filter(|t| *t >= 1)
        .ok_or_else(|| format!("--timeline {text:?} is not a timeline: give latest, current or a number from `list`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{wal_ranges, WalPiece};

    const SEG: u64 = 16;

    fn timelines() -> Vec<TimelineInfo> {
        // Timeline 2 branched from 1 at 40 (mid-segment); 3 from 2 at 72.
        let info = |timeline: u32, ancestors: Vec<(u32, Lsn)>| TimelineInfo {
            timeline,
            parent: ancestors.last().map(|a| a.0),
            switch_lsn: ancestors.last().map(|a| a.1.to_string()),
            ancestors,
        };
        vec![info(1, vec![]), info(2, vec![(1, Lsn(40))]), info(3, vec![(1, Lsn(40)), (2, Lsn(72))])]
    }

    fn piece(timeline: u32, start: u64, end: u64) -> WalPiece {
        WalPiece { timeline: TimelineId(timeline), start: Lsn(start), end: Lsn(end) }
    }

    fn backup(id: &str, timeline: u32, start: u64, end: u64) -> BackupManifest {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": id, "label": id, "system_identifier": "1", "server_version_num": 150000,
            "timeline": timeline, "start_lsn": Lsn(start).to_string(), "end_lsn": Lsn(end).to_string(),
            "start_time": "2026-01-01T00:00:00Z", "end_time": "2026-01-01T00:00:01Z",
            "tablespaces": [], "files": [], "pg_manifest_key": "k", "bytes": 0, "stored_bytes": 0
        }))
        .expect("manifest")
    }

    fn catalog() -> Catalog {
        // Timeline 1 archived to 48 (its last segment partial past the switch
        // at 40: the old primary went on a little); 2 from its switch segment
        // to 80; 3 from its switch segment to 100.
        let ranges = wal_ranges(vec![piece(1, 0, 48), piece(2, 32, 80), piece(3, 64, 100)]);
        Catalog {
            restorable: vec![backup("b1", 1, 4, 8), backup("b2", 2, 50, 52), backup("b3", 3, 90, 92)],
            waiting: vec![],
            ranges,
            timelines: timelines(),
        }
    }

    fn lsn_plan(target: u64, timeline: Option<&str>) -> Result<Plan, String> {
        plan(&catalog(), Target::Lsn(Lsn(target)), None, timeline, None, OffsetDateTime::now_utc())
    }

    #[test]
    fn history_follows_the_switch_points() {
        let steps = history(&timelines(), 3).expect("history");
        let spans: Vec<(u32, u64, Option<u64>)> =
            steps.iter().map(|s| (s.timeline, s.from.0, s.to.map(|t| t.0))).collect();
        assert_eq!(spans, vec![(1, 0, Some(40)), (2, 40, Some(72)), (3, 72, None)]);
        assert!(history(&timelines(), 7).unwrap_err().contains("timeline 7 is not in the archive"));
    }

    #[test]
    fn available_wal_crosses_timelines_at_their_switch_points() {
        let ranges = catalog().ranges;
        let tl3 = history(&timelines(), 3).expect("history");
        assert_eq!(available_along(&ranges, &tl3, Lsn(4)), Lsn(100));
        let tl1 = history(&timelines(), 1).expect("history");
        assert_eq!(available_along(&ranges, &tl1, Lsn(4)), Lsn(48));
        // A hole on timeline 2 stops the way there.
        let holed = wal_ranges(vec![piece(1, 0, 48), piece(2, 32, 60), piece(3, 64, 100)]);
        assert_eq!(available_along(&holed, &tl3, Lsn(4)), Lsn(60));
    }

    #[test]
    fn segments_come_from_the_timeline_postgres_asks_for() {
        let tl3 = history(&timelines(), 3).expect("history");
        let names: Vec<(u32, u64)> =
            segments_along(&tl3, Lsn(4), Lsn(100), SEG).iter().map(|s| (s.timeline.0, s.segment_no)).collect();
        // Segment 2 holds the switch at 40: timeline 2's copy; segment 4 holds 72: timeline 3's.
        assert_eq!(names, vec![(1, 0), (1, 1), (2, 2), (2, 3), (3, 4), (3, 5), (3, 6)]);
    }

    #[test]
    fn backups_and_targets_follow_the_chosen_timeline() {
        // Latest (3): the newest backup before the target on its history.
        let p = lsn_plan(95, None).expect("plan");
        assert_eq!((p.backup.id.as_str(), p.target_timeline, p.wal_available_to), ("b3", 3, Lsn(100)));
        let p = lsn_plan(60, None).expect("plan");
        assert_eq!((p.backup.id.as_str(), p.target_timeline), ("b2", 3));
        // Timeline 1: backups on 2 and 3 are not on its history, and its WAL ends at 48.
        let p = lsn_plan(45, Some("1")).expect("plan");
        assert_eq!((p.backup.id.as_str(), p.target_timeline, p.wal_available_to), ("b1", 1, Lsn(48)));
        let refused = lsn_plan(60, Some("1")).unwrap_err();
        assert!(refused.contains("past the WAL archived on timeline 1's history (to 0/30)"), "{refused}");
        // Timeline 2 ends at 80 in the archive.
        assert!(lsn_plan(79, Some("2")).is_ok());
        assert!(lsn_plan(81, Some("2")).is_err());
        // current: the chosen backup's own timeline.
        let p = lsn_plan(95, Some("current")).expect("plan");
        assert_eq!(p.target_timeline, 3);
        assert!(lsn_plan(95, Some("9")).unwrap_err().contains("timeline 9 is not in the archive"));
        assert!(lsn_plan(95, Some("two")).unwrap_err().contains("is not a timeline"));
        // A backup chosen by id must lie on the history.
        let refused =
            plan(&catalog(), Target::Latest, Some("b3"), Some("1"), None, OffsetDateTime::now_utc()).unwrap_err();
        assert!(refused.contains("no restorable backup (b3) lies on the history of timeline 1"), "{refused}");
    }

    #[test]
    fn a_stop_past_the_followed_history_is_refused() {
        let refused =
            plan(&catalog(), Target::Xid(7), None, Some("1"), Some(Lsn(60)), OffsetDateTime::now_utc()).unwrap_err();
        assert!(refused.contains("stops at 0/3C, past the WAL archived on timeline 1's history"), "{refused}");
    }
}
