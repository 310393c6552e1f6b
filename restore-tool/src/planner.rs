//! From the catalog and a target to a restore plan, or a refusal that names
//! the window. Pure: no I/O, `now` passed in.

use crate::target::{format_time, parse_time, Target};
use tidemark_proto::repo::backup::BackupManifest;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::catalog::{self, on_history, Catalog, TimelineInfo};
pub use tidemark_repo::catalog::{available_along, segments_along, Step};
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
    pub target_timeline: TimelineId,
    pub history: Vec<Step>,
    /// Where recovery stops, when the audit says (time, xid and name targets).
    pub stop_lsn: Option<Lsn>,
}

/// Where the WAL audit says recovery stops for a time, xid or
/// restore-point target (`lsn`), and for a time, the newest transaction end
/// at or before it that the audit saw (`known_before`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stop {
    pub lsn: Option<Lsn>,
    pub known_before: Option<Lsn>,
}

/// Why there is no plan. Each message names what is there instead (the
/// window, the timelines, the backups) so the user can pick again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No restorable backup at all, or none of the ones asked for.
    #[error("nothing to restore: {window}")]
    NoBackup { window: String },
    #[error("there is no backup {0}; `tidemark-restore list` shows them")]
    UnknownBackup(String),
    #[error("backup {0} is not restorable yet: its WAL is not all archived")]
    BackupWaiting(String),
    #[error("no restorable backup{} lies on the history of timeline {timeline}", backup.as_ref().map(|id| format!(" ({id})")).unwrap_or_default())]
    NotOnHistory { backup: Option<String>, timeline: TimelineId },
    #[error("timeline {timeline} is not in the archive (it has {known})")]
    UnknownTimeline { timeline: TimelineId, known: String },
    #[error("--timeline {0:?} is not a timeline: give latest, current or a number from `list`")]
    NotATimeline(String),
    #[error("the target {0} is in the future")]
    InTheFuture(String),
    /// Before the window: recovery would stop before the backup is consistent.
    #[error("{what}: {window}")]
    BeforeWindow { what: String, window: String },
    /// Past the archive: recovery would run out of WAL first.
    #[error("{what} past the WAL archived on timeline {timeline}'s history (to {available}){}", window.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    PastArchive { what: String, timeline: TimelineId, available: Lsn, window: Option<String> },
}

fn backup_end_time(backup: &BackupManifest) -> Option<OffsetDateTime> {
    parse_time(&backup.end_time).ok()
}

/// The history of `timeline`, or a refusal naming the timelines there are.
pub fn history(timelines: &[TimelineInfo], timeline: TimelineId) -> Result<Vec<Step>, Refusal> {
    catalog::history(timelines, timeline).ok_or_else(|| {
        let known: Vec<String> = timelines.iter().map(|t| t.timeline.to_string()).collect();
        Refusal::UnknownTimeline { timeline, known: known.join(", ") }
    })
}

fn window_text(catalog: &Catalog) -> String {
    match catalog.window(None) {
        Some(w) => format!(
            "the restorable window starts at {} (LSN {}) and the archive reaches LSN {}",
            w.earliest, w.earliest_lsn, w.latest_lsn
        ),
        None => "there is no restorable backup yet".into(),
    }
}

/// The timeline asked for: `None` for `current` (the chosen backup's own,
/// settled once it is chosen); by default the newest, as PostgreSQL's `latest`.
fn requested_timeline(catalog: &Catalog, timeline: Option<&str>) -> Result<Option<TimelineId>, Refusal> {
    let newest = catalog.timelines.iter().map(|t| t.timeline).max().unwrap_or(TimelineId(1));
    match timeline.map(str::trim) {
        None | Some("latest") => Ok(Some(newest)),
        Some("current") => Ok(None),
        Some(text) => parse_timeline(text).map(Some),
    }
}

/// The backups that may serve: the one asked for, or every restorable one;
/// only those on `history` when a timeline is followed.
fn candidates<'a>(
    catalog: &'a Catalog,
    backup_id: Option<&str>,
    followed: Option<(TimelineId, &[Step])>,
) -> Result<Vec<&'a BackupManifest>, Refusal> {
    let candidates: Vec<&BackupManifest> = match backup_id {
        Some(id) => match catalog.restorable.iter().find(|b| b.id == id) {
            Some(backup) => vec![backup],
            None if catalog.waiting.iter().any(|b| b.id == id) => return Err(Refusal::BackupWaiting(id.into())),
            None => return Err(Refusal::UnknownBackup(id.into())),
        },
        None => catalog.restorable.iter().collect(),
    };
    let Some((timeline, steps)) = followed else { return Ok(candidates) };
    let on: Vec<&BackupManifest> = candidates.into_iter().filter(|b| on_history(b, steps)).collect();
    if on.is_empty() {
        return Err(Refusal::NotOnHistory { backup: backup_id.map(str::to_string), timeline });
    }
    Ok(on)
}

/// The newest candidate that can still reach the target (the oldest for an
/// xid or name the audit could not place, which reaches any in the window).
fn choose<'a>(
    catalog: &Catalog,
    candidates: &[&'a BackupManifest],
    target: &Target,
    stop: Stop,
) -> Result<&'a BackupManifest, Refusal> {
    let stop_lsn = stop.lsn;
    let newest_ending_by = |ok: &dyn Fn(&BackupManifest) -> bool| candidates.iter().rev().find(|b| ok(b)).copied();
    let before = |what: String| Refusal::BeforeWindow { what, window: window_text(catalog) };
    let no_backup = || Refusal::NoBackup { window: window_text(catalog) };
    match (target, stop_lsn) {
        // A backup that ended after the target time serves only if the
        // archive shows a transaction end at or before the time within its
        // WAL: else the commits between the time and the backup may be gone
        // (expired), and recovery would stop later than asked.
        (Target::Time(t), Some(stop_at)) => newest_ending_by(&|b| {
            b.end_lsn <= stop_at
                && (backup_end_time(b).is_some_and(|end| end <= *t)
                    || stop.known_before.is_some_and(|known| known >= b.start_lsn))
        })
        .ok_or_else(|| {
            before(format!("recovery for {target} stops at {stop_at}, before any restorable backup is consistent"))
        }),
        (Target::Xid(_) | Target::BeforeXid(_) | Target::Name(_), Some(stop)) => {
            newest_ending_by(&|b| b.end_lsn <= stop).ok_or_else(|| {
                before(format!("recovery for {target} stops at {stop}, before any restorable backup is consistent"))
            })
        }
        (Target::Time(t), None) => newest_ending_by(&|b| backup_end_time(b).is_some_and(|end| end <= *t))
            .ok_or_else(|| before(format!("the target {} is before the chosen backup's end", format_time(*t)))),
        (Target::Lsn(lsn), _) => newest_ending_by(&|b| b.end_lsn <= *lsn)
            .ok_or_else(|| before(format!("the target LSN {lsn} is before the chosen backup's end"))),
        (Target::Xid(_) | Target::BeforeXid(_) | Target::Name(_), None) => {
            candidates.first().copied().ok_or_else(no_backup)
        }
        (Target::Latest | Target::Immediate, _) => candidates.last().copied().ok_or_else(no_backup),
    }
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
    stop: Stop,
    now: OffsetDateTime,
) -> Result<Plan, Refusal> {
    let stop_lsn = stop.lsn;
    if catalog.restorable.is_empty() {
        return Err(Refusal::NoBackup { window: window_text(catalog) });
    }
    let requested = requested_timeline(catalog, timeline)?;
    let followed = requested.map(|t| history(&catalog.timelines, t).map(|steps| (t, steps))).transpose()?;
    let candidates = candidates(catalog, backup_id, followed.as_ref().map(|(t, steps)| (*t, steps.as_slice())))?;
    if let Target::Time(t) = &target {
        if *t > now {
            return Err(Refusal::InTheFuture(format_time(*t)));
        }
    }
    let chosen = choose(catalog, &candidates, &target, stop)?;
    let (target_timeline, history) = match followed {
        Some(followed) => followed,
        None => (chosen.timeline, history(&catalog.timelines, chosen.timeline)?),
    };
    let wal_available_to = available_along(&catalog.ranges, &history, chosen.start_lsn).max(chosen.end_lsn);
    let past_archive = |what: String, window: Option<String>| Refusal::PastArchive {
        what,
        timeline: target_timeline,
        available: wal_available_to,
        window,
    };
    if let Some(stop) = stop_lsn.filter(|stop| *stop > wal_available_to) {
        return Err(past_archive(format!("recovery for {target} stops at {stop},"), Some(window_text(catalog))));
    }
    let wal_needed_to = match &target {
        Target::Lsn(lsn) if *lsn > wal_available_to => {
            return Err(past_archive(format!("the target LSN {lsn} is"), Some(window_text(catalog))));
        }
        Target::Lsn(lsn) => *lsn,
        _ => chosen.end_lsn,
    };
    Ok(Plan {
        backup: chosen.clone(),
        target,
        wal_start: chosen.start_lsn,
        wal_needed_to,
        wal_available_to,
        target_timeline,
        history,
        stop_lsn,
    })
}

fn parse_timeline(text: &str) -> Result<TimelineId, Refusal> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    };
    parsed.filter(|t| *t >= 1).map(TimelineId).ok_or_else(|| Refusal::NotATimeline(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_repo::catalog::{wal_ranges, WalPiece};

    const SEG: u64 = 16;

    fn timelines() -> Vec<TimelineInfo> {
        // Timeline 2 branched from 1 at 40 (mid-segment); 3 from 2 at 72.
        let info = |timeline: u32, ancestors: Vec<(u32, Lsn)>| TimelineInfo {
            timeline: TimelineId(timeline),
            parent: ancestors.last().map(|a| TimelineId(a.0)),
            switch_lsn: ancestors.last().map(|a| a.1),
            ancestors: ancestors.into_iter().map(|(t, lsn)| (TimelineId(t), lsn)).collect(),
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

    fn lsn_plan(target: u64, timeline: Option<&str>) -> Result<Plan, Refusal> {
        plan(&catalog(), Target::Lsn(Lsn(target)), None, timeline, Stop::default(), OffsetDateTime::now_utc())
    }

    #[test]
    fn history_follows_the_switch_points() {
        let steps = history(&timelines(), TimelineId(3)).expect("history");
        let spans: Vec<(u32, u64, Option<u64>)> =
            steps.iter().map(|s| (s.timeline.0, s.from.0, s.to.map(|t| t.0))).collect();
        assert_eq!(spans, vec![(1, 0, Some(40)), (2, 40, Some(72)), (3, 72, None)]);
        assert!(history(&timelines(), TimelineId(7))
            .unwrap_err()
            .to_string()
            .contains("timeline 7 is not in the archive"));
    }

    #[test]
    fn available_wal_crosses_timelines_at_their_switch_points() {
        let ranges = catalog().ranges;
        let tl3 = history(&timelines(), TimelineId(3)).expect("history");
        assert_eq!(available_along(&ranges, &tl3, Lsn(4)), Lsn(100));
        let tl1 = history(&timelines(), TimelineId(1)).expect("history");
        assert_eq!(available_along(&ranges, &tl1, Lsn(4)), Lsn(48));
        // A hole on timeline 2 stops the way there.
        let holed = wal_ranges(vec![piece(1, 0, 48), piece(2, 32, 60), piece(3, 64, 100)]);
        assert_eq!(available_along(&holed, &tl3, Lsn(4)), Lsn(60));
    }

    #[test]
    fn segments_come_from_the_timeline_postgres_asks_for() {
        let tl3 = history(&timelines(), TimelineId(3)).expect("history");
        let names: Vec<(u32, u64)> =
            segments_along(&tl3, Lsn(4), Lsn(100), SEG).iter().map(|s| (s.timeline.0, s.segment_no)).collect();
        // Segment 2 holds the switch at 40: timeline 2's copy; segment 4 holds 72: timeline 3's.
        assert_eq!(names, vec![(1, 0), (1, 1), (2, 2), (2, 3), (3, 4), (3, 5), (3, 6)]);
    }

    #[test]
    fn backups_and_targets_follow_the_chosen_timeline() {
        // Latest (3): the newest backup before the target on its history.
        let p = lsn_plan(95, None).expect("plan");
        assert_eq!((p.backup.id.as_str(), p.target_timeline.0, p.wal_available_to), ("b3", 3, Lsn(100)));
        let p = lsn_plan(60, None).expect("plan");
        assert_eq!((p.backup.id.as_str(), p.target_timeline.0), ("b2", 3));
        // Timeline 1: backups on 2 and 3 are not on its history, and its WAL ends at 48.
        let p = lsn_plan(45, Some("1")).expect("plan");
        assert_eq!((p.backup.id.as_str(), p.target_timeline.0, p.wal_available_to), ("b1", 1, Lsn(48)));
        let refused = lsn_plan(60, Some("1")).unwrap_err().to_string();
        assert!(refused.contains("past the WAL archived on timeline 1's history (to 0/30)"), "{refused}");
        // Timeline 2 ends at 80 in the archive.
        assert!(lsn_plan(79, Some("2")).is_ok());
        assert!(lsn_plan(81, Some("2")).is_err());
        // current: the chosen backup's own timeline.
        let p = lsn_plan(95, Some("current")).expect("plan");
        assert_eq!(p.target_timeline.0, 3);
        assert!(lsn_plan(95, Some("9")).unwrap_err().to_string().contains("timeline 9 is not in the archive"));
        assert!(lsn_plan(95, Some("two")).unwrap_err().to_string().contains("is not a timeline"));
        // A backup chosen by id must lie on the history.
        let refused =
            plan(&catalog(), Target::Latest, Some("b3"), Some("1"), Stop::default(), OffsetDateTime::now_utc())
                .unwrap_err()
                .to_string();
        assert!(refused.contains("no restorable backup (b3) lies on the history of timeline 1"), "{refused}");
    }

    #[test]
    fn a_stop_past_the_followed_history_is_refused() {
        let refused = plan(
            &catalog(),
            Target::Xid(tidemark_proto::Xid(7)),
            None,
            Some("1"),
            Stop { lsn: Some(Lsn(60)), known_before: None },
            OffsetDateTime::now_utc(),
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("stops at 0/3C, past the WAL archived on timeline 1's history"), "{refused}");
    }
}
