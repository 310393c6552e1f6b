//! `tidemark-agent expire [--dry-run] [--json]`: the retention policy from
//! `[retention]` and flags, applied by `tidemark_repo::expire`. It needs
//! only the repository (no server, no state directory), so an administrator
//! can run it from another machine while the agent streams.

use crate::config::{RetentionConfig, Settings};
use std::fmt::Write as _;
use tidemark_repo::expire::{counts, expire, Options, Report};

pub async fn run(settings: &Settings, retention: RetentionConfig, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let (policy, orphan_grace) = retention.resolve()?;
    for warning in warnings(settings, &policy) {
        eprintln!("warning: {warning}");
    }
    let (repo, _) = settings.open_initialized(!dry_run).await?;
    let report = expire(&repo, &Options { policy, orphan_grace, dry_run }).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// A window shorter than the backup interval is kept longer than asked:
/// back to the newest backup older than it.
fn warnings(settings: &Settings, policy: &tidemark_repo::retention::Policy) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(window), Some(interval)) = (policy.recovery_window, settings.backup_interval) {
        if window.whole_seconds() < interval.as_secs() as i64 {
            out.push(format!(
                "recovery_window ({}s) is shorter than backup_interval_secs ({}s): WAL back to the newest backup older than the window is kept, so up to {}s is restorable",
                window.whole_seconds(),
                interval.as_secs(),
                window.whole_seconds() + interval.as_secs() as i64
            ));
        }
    }
    out
}

/// The plan as text: what goes, what stays and why, and the proof.
pub fn render(report: &Report) -> String {
    let plan = &report.plan;
    let mut out = String::new();
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    if report.resumed > 0 {
        let _ = writeln!(out, "finished an interrupted expire: {} deletions", report.resumed);
    }
    let _ = writeln!(out, "{verb} {} objects, {} bytes:", plan.deletions.len(), plan.freed_bytes);
    for (kind, (n, bytes)) in counts(&plan.deletions) {
        let _ = writeln!(out, "  {kind:<18} {n:>6} objects {bytes:>14} bytes");
    }
    for id in &plan.dropped {
        let _ = writeln!(out, "  backup {id} dropped");
    }
    let _ = writeln!(out, "kept backups (each restorable to its consistent point):");
    for kept in &plan.kept {
        let _ = writeln!(
            out,
            "  {} ended {} at {} on timeline {}{}: {}",
            kept.id,
            kept.end_time,
            kept.end_lsn,
            kept.timeline,
            if kept.restorable { "" } else { " (waiting for its WAL)" },
            kept.reasons.join(", ")
        );
    }
    for mark in &plan.protected_marks {
        let from = mark.backup.as_deref().unwrap_or("no backup");
        let _ = writeln!(
            out,
            "  restore point {:?} at {} kept until {} (from backup {from})",
            mark.name, mark.lsn, mark.keep_until
        );
    }
    match &plan.window_after {
        Some(w) => {
            let _ = writeln!(
                out,
                "restorable window after: every moment from {} (LSN {}) to LSN {}",
                w.earliest, w.earliest_lsn, w.latest_lsn
            );
        }
        None => {
            let _ = writeln!(out, "restorable window after: none (no restorable backup)");
        }
    }
    for warning in &plan.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}
