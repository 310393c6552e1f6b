//! From the catalog and a target to a restore plan, or a refusal that names
//! the window. Pure: no I/O, `now` passed in.

use crate::catalog::{Catalog, WalRange};
use crate::target::{format_time, parse_time, Target};
use tidemark_proto::repo::backup::BackupManifest;
use tidemark_proto::Lsn;
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
    stop_lsn: Option<Lsn>,
    now: OffsetDateTime,
) -> Result<Plan, String> {
    if catalog.restorable.is_empty() {
        return Err(format!("nothing to restore: {}", window_text(catalog)));
    }
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
    let wal_available_to = available_to(&catalog.ranges, chosen.timeline, wal_start).unwrap_or(backup_end);
    let wal_needed_to = match &target {
        Target::Lsn(lsn) => {
            if *lsn > wal_available_to {
                return Err(format!("the target LSN {lsn} is past the archived WAL: {}", window_text(catalog)));
            }
            *lsn
        }
        _ => backup_end,
    };
    Ok(Plan { backup: chosen.clone(), target, wal_start, wal_needed_to, wal_available_to })
}
