//! `expire`: load what the repository holds, plan with [`crate::retention`],
//! and apply the plan so that a crash at any instant leaves a valid
//! repository and a rerun finishes the job.
//!
//! Applying: take the expire lease (one run at a time, across machines);
//! finish the journal of an interrupted run if there is one; check that
//! these credentials may delete (deleting an object that does not exist),
//! before anything is written; write the journal (every key to delete, in
//! order); delete in that order; remove the journal; log an event.

use crate::error::RepoError;
use crate::lease::Lease;
use crate::retention::{self, Deletion, Inventory, Plan, Policy, WalObject, What};
use crate::store::{Repository, StoredObject};
use anyhow::Context;
use std::collections::BTreeMap;
use std::time::Duration;
use tidemark_proto::repo::backup::complete_backup_ids;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::layout::{ObjectKey, SUMMARIES_PREFIX};
use tidemark_proto::repo::records::{
    ExpireJournal, MarkRecord, CLAIMS_PREFIX, EXPIRE_JOURNAL_KEY, EXPIRE_LEASE_KEY, MARKS_PREFIX,
};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::wal::summary::SegmentSummary;
use tidemark_proto::TimelineId;
use time::OffsetDateTime;

/// Test hook: SIGKILL this process after this many deletions (0: right
/// after the journal is written), to prove that a rerun finishes the job.
pub const KILL_AFTER_VARIABLE: &str = "TIDEMARK_TEST_EXPIRE_KILL_AFTER";

pub struct Options {
    pub policy: Policy,
    pub orphan_grace: time::Duration,
    pub dry_run: bool,
}

/// What a run did.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Deletions finished from an interrupted earlier run.
    pub resumed: usize,
    pub plan: Plan,
}

/// Reads everything the planner needs.
pub async fn load_inventory(repo: &Repository) -> Result<Inventory, RepoError> {
    let catalog = crate::catalog::Catalog::load(repo).await?;
    let meta = repo.meta().await?;
    let size = meta.wal_segment_size;
    let backup_objects = repo.list_objects("backups").await?;
    let mut backups = Vec::new();
    for id in complete_backup_ids(backup_objects.iter().map(|o| o.key.as_str())) {
        backups.push(crate::catalog::read_manifest(repo, &id).await?);
    }
    let mut wal = Vec::new();
    let mut partials: BTreeMap<SegmentId, Vec<(u64, StoredObject)>> = BTreeMap::new();
    for object in repo.list_objects("wal").await? {
        match ObjectKey::parse(&object.key, size) {
            Some(ObjectKey::Segment(segment)) => {
                wal.push(WalObject { object, segment, partial_end: None, stale: false })
            }
            Some(ObjectKey::PartialSegment(segment)) => partials.entry(segment).or_default().push((0, object)),
            Some(ObjectKey::PartialPiece { segment, offset }) => {
                partials.entry(segment).or_default().push((offset, object))
            }
            _ => {}
        }
    }
    // A segment's partial objects go together: those on its chain end
    // where the chain ends (so retention keeps or deletes them as one). One
    // behind the chain's end but off it is read by nobody (stale). One
    // ahead of the end is kept: a listing that missed the piece before it
    // (uploaded while the listing ran) would otherwise cost the next one.
    for (segment, objects) in partials {
        let offsets = objects.iter().map(|(offset, _)| *offset).collect();
        let (end_offset, chain) = crate::partial::chain_end(repo, segment, size, &offsets).await?;
        let end = tidemark_proto::Lsn(segment.start_lsn(size).0 + end_offset);
        for (offset, object) in objects {
            let stale = !chain.contains(&offset) && offset < end_offset;
            wal.push(WalObject { object, segment, partial_end: Some(end), stale });
        }
    }
    let mut summaries = Vec::new();
    for object in repo.list_objects(SUMMARIES_PREFIX.trim_end_matches('/')).await? {
        if let Some(ObjectKey::Summary(segment)) = ObjectKey::parse(&object.key, size) {
            summaries.push((segment, object));
        }
    }
    let mut marks = Vec::new();
    for object in repo.list_objects(MARKS_PREFIX.trim_end_matches('/')).await? {
        let Some(raw) = repo.get(&object.key).await? else { continue };
        let mark: MarkRecord =
            serde_json::from_slice(&raw).map_err(|e| RepoError::corrupt(&object.key, e.to_string()))?;
        marks.push((object, mark));
    }
    let mut leftovers = repo.local_staging_files();
    leftovers.extend(repo.list_objects(CLAIMS_PREFIX.trim_end_matches('/')).await?);
    Ok(Inventory {
        segment_size: size,
        backups,
        backup_objects,
        wal,
        timelines: catalog.timelines,
        summaries,
        marks,
        leftovers,
        audit_from: BTreeMap::new(),
    })
}

/// The newest time a summary records (its last transaction end).
async fn summary_time(repo: &Repository, key: &str) -> Result<Option<i64>, RepoError> {
    let Some(raw) = repo.get(key).await? else { return Ok(None) };
    let summary = SegmentSummary::from_json(&raw).map_err(|reason| RepoError::corrupt(key, reason))?;
    Ok(summary.ends.iter().map(|e| e.time).max())
}

/// With an audit window: per timeline, the first summary the WAL rule
/// would delete that is inside the window, found by bisection (summary
/// times grow with their segments; one without a time counts as inside,
/// which only keeps more).
async fn audit_from(
    repo: &Repository,
    candidates: &[(SegmentId, String)],
    cutoff_micros: i64,
) -> Result<BTreeMap<TimelineId, u64>, RepoError> {
    let mut by_timeline: BTreeMap<TimelineId, Vec<(u64, &str)>> = BTreeMap::new();
    for (segment, key) in candidates {
        by_timeline.entry(segment.timeline).or_default().push((segment.segment_no, key));
    }
    let mut from = BTreeMap::new();
    for (timeline, mut list) in by_timeline {
        list.sort_unstable();
        // The first index whose summary is inside the window (or has no time).
        let (mut low, mut high) = (0usize, list.len());
        while low < high {
            let middle = low + (high - low) / 2;
            let Some((_, key)) = list.get(middle) else { break };
            let inside = summary_time(repo, key).await?.is_none_or(|t| t >= cutoff_micros);
            if inside {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        let first_inside = list.get(low).map(|(n, _)| *n).unwrap_or(u64::MAX);
        from.insert(timeline, first_inside);
    }
    Ok(from)
}

/// The plan for the repository as it is now.
pub async fn make_plan(repo: &Repository, options: &Options, now: OffsetDateTime) -> Result<Plan, RepoError> {
    let mut inventory = load_inventory(repo).await?;
    let Some(audit_window) = options.policy.audit_window else {
        return Ok(retention::plan(&inventory, &options.policy, now, options.orphan_grace));
    };
    // Which summaries the WAL rule alone would delete; of those, which are
    // inside the audit window.
    let by_wal = Policy { audit_window: None, ..options.policy.clone() };
    let first = retention::plan(&inventory, &by_wal, now, options.orphan_grace);
    let size = inventory.segment_size;
    let candidates: Vec<(SegmentId, String)> = first
        .deletions
        .iter()
        .filter(|d| d.what == What::Summary)
        .filter_map(|d| match ObjectKey::parse(&d.key, size) {
            Some(ObjectKey::Summary(segment)) => Some((segment, d.key.clone())),
            _ => None,
        })
        .collect();
    let cutoff = now - audit_window;
    inventory.audit_from = audit_from(repo, &candidates, (cutoff.unix_timestamp_nanos() / 1000) as i64).await?;
    Ok(retention::plan(&inventory, &options.policy, now, options.orphan_grace))
}

/// Runs expire: plans, and unless `dry_run`, applies.
pub async fn expire(repo: &Repository, options: &Options) -> anyhow::Result<Report> {
    options.policy.check().map_err(|e| crate::Fail::new(e, "fix the [retention] table or the expire flags"))?;
    if options.dry_run {
        let plan = make_plan(repo, options, OffsetDateTime::now_utc()).await?;
        return Ok(Report { dry_run: true, resumed: 0, plan });
    }
    let holder = format!("tidemark-agent expire (user {})", crate::events::os_user());
    let mut lease = Lease::wait_for(
        repo,
        EXPIRE_LEASE_KEY,
        &holder,
        Duration::from_secs(600),
        Duration::from_secs(600),
        "cannot expire",
    )
    .await?;
    let result = expire_holding(repo, options, &mut lease).await;
    lease.release().await;
    result
}

async fn expire_holding(repo: &Repository, options: &Options, lease: &mut Lease) -> anyhow::Result<Report> {
    let mut fault = FaultHook::from_env();
    // May these credentials delete? Ask with an object that does not exist,
    // before anything is written.
    repo.delete("locks/delete-permission-check").await.context("check that these credentials may delete")?;
    let resumed = match read_journal(repo).await? {
        Some(journal) => {
            tracing::info!(deletions = journal.deletions.len(), "finishing an interrupted expire");
            apply(repo, &journal.deletions, lease, &mut fault).await?;
            repo.delete(EXPIRE_JOURNAL_KEY).await?;
            journal.deletions.len()
        }
        None => 0,
    };
    let plan = make_plan(repo, options, OffsetDateTime::now_utc()).await?;
    if !plan.deletions.is_empty() {
        let keys: Vec<String> = plan.deletions.iter().map(|d| d.key.clone()).collect();
        write_journal(repo, &keys).await?;
        fault.journal_written();
        apply(repo, &keys, lease, &mut fault).await?;
        repo.delete(EXPIRE_JOURNAL_KEY).await?;
    }
    let details = serde_json::json!({
        "dropped_backups": plan.dropped,
        "deleted_objects": plan.deletions.len(),
        "freed_bytes": plan.freed_bytes,
        "by_kind": counts(&plan.deletions),
        "window_after": plan.window_after,
        "resumed": resumed,
    });
    let summary = format!(
        "expire: {} backups dropped, {} objects deleted, {} bytes freed",
        plan.dropped.len(),
        plan.deletions.len(),
        plan.freed_bytes
    );
    crate::events::record(repo, "expire", summary, details).await;
    Ok(Report { dry_run: false, resumed, plan })
}

/// Deletions per kind, for reports.
pub fn counts(deletions: &[Deletion]) -> BTreeMap<String, (usize, u64)> {
    let mut counts: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for deletion in deletions {
        let name = serde_json::to_value(deletion.what).ok().and_then(|v| v.as_str().map(str::to_string));
        let entry = counts.entry(name.unwrap_or_default()).or_default();
        entry.0 += 1;
        entry.1 += deletion.bytes;
    }
    counts
}

async fn read_journal(repo: &Repository) -> Result<Option<ExpireJournal>, RepoError> {
    let Some(raw) = repo.get(EXPIRE_JOURNAL_KEY).await? else { return Ok(None) };
    serde_json::from_slice(&raw).map(Some).map_err(|e| RepoError::corrupt(EXPIRE_JOURNAL_KEY, e.to_string()))
}

async fn write_journal(repo: &Repository, keys: &[String]) -> anyhow::Result<()> {
    let journal = ExpireJournal {
        created_at: OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        deletions: keys.to_vec(),
    };
    let (object, _) = frame::encode(&serde_json::to_vec(&journal)?, Compression::Zstd { level: 3 })?;
    repo.put(EXPIRE_JOURNAL_KEY, object).await?;
    Ok(())
}

async fn apply(repo: &Repository, keys: &[String], lease: &mut Lease, fault: &mut FaultHook) -> anyhow::Result<()> {
    let mut renewed = tokio::time::Instant::now();
    for key in keys {
        repo.delete(key).await?;
        fault.step();
        if renewed.elapsed() >= lease.renew_every() {
            lease.renew().await?;
            renewed = tokio::time::Instant::now();
        }
    }
    Ok(())
}

/// The kill switch of [`KILL_AFTER_VARIABLE`].
struct FaultHook {
    remaining: Option<u64>,
}

impl FaultHook {
    fn from_env() -> FaultHook {
        FaultHook { remaining: std::env::var(KILL_AFTER_VARIABLE).ok().and_then(|v| v.parse().ok()) }
    }

    /// After the journal is written: dies if asked to before any deletion.
    fn journal_written(&self) {
        if self.remaining == Some(0) {
            die();
        }
    }

    /// After a deletion: dies once the count is reached, as a crash would.
    fn step(&mut self) {
        let Some(remaining) = self.remaining.as_mut() else { return };
        *remaining = remaining.saturating_sub(1);
        if *remaining == 0 {
            die();
        }
    }
}

fn die() {
    // SAFETY: sending SIGKILL to this very process.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}
