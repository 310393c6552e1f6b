//! The retention planner: from what the repository holds, a policy and
//! "now", what to delete, in what order, and the proof that every promised
//! restore stays possible. Pure: the inventory is loaded and the plan
//! applied in [`crate::expire`].
//!
//! What is kept:
//! - **Backups**: the newest complete one always (the next backup reuses its
//!   chunks); the newest `min_backups`; for `recovery_window`, every backup
//!   that ended inside it plus the newest one that ended before it (the
//!   anchor, from which every moment of the window is reached); for
//!   `keep_daily` / `keep_weekly` / `keep_monthly`, the newest backup of
//!   each of that many calendar days / ISO weeks / months (UTC), counting the
//!   current one; for each protected mark, the newest backup before it.
//! - **WAL**: everything after the *floor* — the start of the oldest backup
//!   kept for point-in-time recovery (the window's anchor, the oldest of the
//!   `min_backups`, else the newest backup) — on every timeline, so every
//!   moment from there on is restorable; for a backup kept by the calendar,
//!   only the WAL from its start to its end (restorable to its consistent
//!   point); for a protected mark, the WAL from its backup to the mark.
//!   A partial object whose complete segment exists is superseded.
//! - **Summaries**: as long as their WAL, or for `audit_window` if longer.
//! - **Chunks** of a dropped backup that a kept backup references.
//! - **Bases**: a kept incremental backup keeps every backup it is based on
//!   (its unchanged blocks are theirs), each with its own WAL from start to
//!   end so that it stays listed and restorable to its consistent point.
//! - Objects of a backup without `backup.json` younger than `orphan_grace`
//!   (a backup in progress); older ones, staging files and old lease claims
//!   are orphans.
//!
//! Deletion order (see [`Plan::deletions`]): dropped backups' `backup.json`
//! first (the backup stops being listed), then expired mark records, the
//! rest of the dropped backups, WAL oldest first, summaries, orphans. Each
//! prefix of that list leaves a repository whose listed backups are complete
//! and whose window is contiguous.

use crate::catalog::{available_along, history, is_restorable, on_history, segments_along, wal_ranges};
use crate::catalog::{Catalog, TimelineInfo, WalPiece, Window};
pub use crate::store::StoredObject;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use tidemark_proto::repo::backup::{manifest_key, BackupManifest};
use tidemark_proto::repo::records::{MarkRecord, KEEP_FOREVER};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// A retention policy; `None` where the policy says nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub recovery_window: Option<Duration>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub min_backups: Option<u32>,
    pub audit_window: Option<Duration>,
}

/// How old leftovers must be before they count as orphans (a day by
/// default: a backup in progress writes a chunk every few seconds).
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::DAY;

impl Policy {
    /// Whether any retention is set (without one, expire keeps every backup
    /// and all WAL, and only removes orphans and superseded partials).
    pub fn is_set(&self) -> bool {
        self.recovery_window.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.min_backups.is_some()
    }

    /// Refuses a policy that keeps no backup for restores.
    pub fn check(&self) -> Result<(), String> {
        let window = self.recovery_window.unwrap_or(Duration::ZERO);
        let counts = [self.keep_daily, self.keep_weekly, self.keep_monthly, self.min_backups];
        if self.is_set() && window <= Duration::ZERO && counts.iter().all(|c| c.unwrap_or(0) == 0) {
            return Err("this retention policy keeps nothing to restore: set recovery_window, min_backups or keep_daily/weekly/monthly above zero".into());
        }
        if window < Duration::ZERO || self.audit_window.is_some_and(|a| a < Duration::ZERO) {
            return Err("retention durations cannot be negative".into());
        }
        Ok(())
    }
}

/// `30d`, `12h`, `15m`, `90s`, `2w` (or a number of seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().map_err(|_| format!("{text:?} is not a duration: use e.g. 30d, 12h, 15m or 90s"))?;
    let unit_seconds = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{text:?} has an unknown unit: use s, m, h, d or w")),
    };
    n.checked_mul(unit_seconds).map(Duration::seconds).ok_or_else(|| format!("{text:?} is too long"))
}

/// A WAL object: a complete segment, or one of a segment's partial
/// objects, whose chain ends at `partial_end` (see `crate::partial`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalObject {
    pub object: StoredObject,
    pub segment: SegmentId,
    pub partial_end: Option<Lsn>,
    /// A partial object off its segment's chain (already folded into a
    /// newer prefix, or left by an agent that restarted): no reader uses it.
    pub stale: bool,
}

/// What the repository holds, as the planner needs it.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub segment_size: u64,
    /// Complete backups (with `backup.json`), oldest first.
    pub backups: Vec<BackupManifest>,
    /// Every object under `backups/`.
    pub backup_objects: Vec<StoredObject>,
    pub wal: Vec<WalObject>,
    pub timelines: Vec<TimelineInfo>,
    pub summaries: Vec<(SegmentId, StoredObject)>,
    pub marks: Vec<(StoredObject, MarkRecord)>,
    /// Staging files of killed puts and old lease claims: orphans once old.
    pub leftovers: Vec<StoredObject>,
    /// With an audit window: per timeline, the first segment whose summary
    /// is inside it (summaries before it are older). Absent timelines: keep.
    pub audit_from: BTreeMap<TimelineId, u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    /// A dropped backup's `backup.json`: deleted first, so it stops being listed.
    BackupListing,
    Mark,
    BackupObject,
    Wal,
    SupersededPartial,
    Summary,
    Orphan,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deletion {
    pub key: String,
    pub bytes: u64,
    pub what: What,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeptBackup {
    pub id: String,
    pub end_time: String,
    pub end_lsn: Lsn,
    pub timeline: TimelineId,
    /// Why it is kept (`window`, `min_backups`, `daily 2026-11-27`, ...).
    pub reasons: Vec<String>,
    /// Whether its WAL to its consistent point remains after the plan.
    pub restorable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeptMark {
    pub name: String,
    pub lsn: Lsn,
    pub keep_until: String,
    /// The backup a restore to it starts from, if any.
    pub backup: Option<String>,
}

/// The plan, and its proof: the window and restore points after it.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub kept: Vec<KeptBackup>,
    pub dropped: Vec<String>,
    /// In the order they run.
    pub deletions: Vec<Deletion>,
    pub freed_bytes: u64,
    /// Every moment from the floor on stays restorable.
    pub floor: Lsn,
    pub window_after: Option<Window>,
    pub protected_marks: Vec<KeptMark>,
    pub warnings: Vec<String>,
}

fn end_time(backup: &BackupManifest) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&backup.end_time, &Rfc3339).ok()
}

/// Until when a mark is protected; `None` when it is not (or no longer).
fn protected_until(mark: &MarkRecord, now: OffsetDateTime) -> Option<String> {
    let until = mark.keep_until.as_deref()?;
    if until == KEEP_FOREVER {
        return Some(until.to_string());
    }
    let time = OffsetDateTime::parse(until, &Rfc3339).ok()?;
    (time > now).then(|| until.to_string())
}

struct Keeper<'a> {
    inventory: &'a Inventory,
    kept: BTreeMap<String, Vec<String>>,
    /// Segments kept for backups outside the floor and for marks.
    segments: BTreeSet<SegmentId>,
    warnings: Vec<String>,
}

impl Keeper<'_> {
    fn keep(&mut self, backup: &BackupManifest, reason: impl Into<String>) {
        self.kept.entry(backup.id.clone()).or_default().push(reason.into());
    }

    /// Every backup a kept incremental backup is based on, down to its full
    /// backup, is kept too.
    fn keep_bases_of(&mut self, id: &str) {
        let by_id: BTreeMap<&str, &BackupManifest> =
            self.inventory.backups.iter().map(|b| (b.id.as_str(), b)).collect();
        let mut current = by_id.get(id).and_then(|b| b.base.as_deref());
        while let Some(base) = current {
            let Some(backup) = by_id.get(base) else {
                self.warnings.push(format!("backup {id} is based on {base}, which is not in the repository"));
                return;
            };
            self.keep(backup, format!("base of {id}"));
            current = backup.base.as_deref();
        }
    }

    /// A backup kept only to its consistent point: its own WAL.
    fn keep_consistency_wal(&mut self, backup: &BackupManifest) {
        let steps = history(&self.inventory.timelines, backup.timeline).unwrap_or_default();
        self.keep_wal_along(&steps, backup.start_lsn, backup.end_lsn);
    }

    /// The segments from `start` to `end` along `steps`, of every timeline
    /// of the history (a switch segment is read from the new timeline, but
    /// the catalog also counts the old timeline's copy up to the switch).
    fn keep_wal_along(&mut self, steps: &[crate::catalog::Step], start: Lsn, end: Lsn) {
        let size = self.inventory.segment_size;
        for segment in segments_along(steps, start, end, size) {
            for step in steps {
                self.segments.insert(SegmentId { timeline: step.timeline, segment_no: segment.segment_no });
            }
        }
    }

    /// The newest backup of each of the last `count` periods (`period` maps
    /// a time to its period number; the current period counts).
    fn calendar(
        &mut self,
        restorable: &[&BackupManifest],
        count: Option<u32>,
        now: OffsetDateTime,
        name: &str,
        period: fn(OffsetDateTime) -> (i64, String),
    ) {
        let Some(count) = count.filter(|c| *c > 0) else { return };
        let (current, _) = period(now);
        let oldest = current - i64::from(count) + 1;
        let mut newest_per_period: BTreeMap<i64, (&BackupManifest, String)> = BTreeMap::new();
        for backup in restorable {
            let Some(end) = end_time(backup) else { continue };
            let (number, label) = period(end);
            if number >= oldest && number <= current {
                newest_per_period.insert(number, (backup, label)); // oldest first: the last one wins
            }
        }
        for (backup, label) in newest_per_period.into_values() {
            self.keep(backup, format!("{name} {label}"));
        }
    }
}

fn keep_bases(keeper: &mut Keeper) {
    let incremental: Vec<String> = keeper
        .inventory
        .backups
        .iter()
        .filter(|b| b.base.is_some() && keeper.kept.contains_key(&b.id))
        .map(|b| b.id.clone())
        .collect();
    for id in incremental {
        keeper.keep_bases_of(&id);
    }
}

fn day(t: OffsetDateTime) -> (i64, String) {
    let t = t.to_offset(time::UtcOffset::UTC);
    (i64::from(t.date().to_julian_day()), format!("{}", t.date()))
}

fn week(t: OffsetDateTime) -> (i64, String) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let monday = t.date().to_julian_day() - i32::from(t.weekday().number_days_from_monday());
    let (year, number, _) = t.date().to_iso_week_date();
    (i64::from(monday) / 7, format!("{year}-W{number:02}"))
}

fn month(t: OffsetDateTime) -> (i64, String) {
    let t = t.to_offset(time::UtcOffset::UTC);
    (i64::from(t.year()) * 12 + i64::from(u8::from(t.month())), format!("{}-{:02}", t.year(), u8::from(t.month())))
}

fn wal_pieces(wal: &[WalObject], size: u64) -> Vec<WalPiece> {
    wal.iter()
        .filter(|w| !w.stale)
        .map(|w| WalPiece {
            timeline: w.segment.timeline,
            start: w.segment.start_lsn(size),
            end: w.partial_end.unwrap_or_else(|| w.segment.end_lsn(size)),
        })
        .collect()
}

/// Complete backups by restorability against `wal`.
fn split_restorable<'a>(
    backups: &'a [BackupManifest],
    wal: &[WalObject],
    size: u64,
) -> (Vec<&'a BackupManifest>, Vec<&'a BackupManifest>) {
    let ranges = wal_ranges(wal_pieces(wal, size));
    backups.iter().partition(|b| is_restorable(b, &ranges))
}

/// The plan for `inventory` under `policy` at `now`.
pub fn plan(inventory: &Inventory, policy: &Policy, now: OffsetDateTime, orphan_grace: Duration) -> Plan {
    let size = inventory.segment_size;
    let (restorable, _waiting) = split_restorable(&inventory.backups, &inventory.wal, size);
    let mut keeper = Keeper { inventory, kept: BTreeMap::new(), segments: BTreeSet::new(), warnings: Vec::new() };
    let floor = if policy.is_set() { choose_backups(&mut keeper, &restorable, policy, now) } else { Lsn::ZERO };
    if !policy.is_set() {
        for backup in &inventory.backups {
            keeper.keep(backup, "no retention policy");
        }
    }
    // Complete backups waiting for their WAL after the floor: their WAL is coming.
    for backup in inventory.backups.iter().filter(|b| b.start_lsn >= floor && !restorable.contains(b)) {
        keeper.keep(backup, "waiting for its WAL");
    }
    let protected_marks = keep_marks(&mut keeper, &restorable, floor, now);
    keep_bases(&mut keeper);
    // Backups kept by the calendar (or for a mark) below the floor keep their own WAL.
    let below: Vec<&BackupManifest> =
        inventory.backups.iter().filter(|b| keeper.kept.contains_key(&b.id) && b.start_lsn < floor).collect();
    for backup in below {
        keeper.keep_consistency_wal(backup);
    }
    let Keeper { kept, segments, mut warnings, .. } = keeper;
    let mut deletions = Vec::new();
    backup_deletions(inventory, &kept, now, orphan_grace, &mut deletions);
    let wal_kept = wal_deletions(inventory, floor, &segments, &mut deletions);
    mark_and_summary_deletions(inventory, policy, floor, &wal_kept, &protected_marks, &mut deletions);
    for object in &inventory.leftovers {
        if now - object.modified >= orphan_grace {
            deletions.push(Deletion { key: object.key.clone(), bytes: object.bytes, what: What::Orphan });
        }
    }
    // Stable: keeps the order within each kind, except that backups stop
    // being listed newest first, so that an incremental backup is never
    // listed without the backups it is based on (ids sort by time).
    deletions.sort_by(|a, b| {
        a.what.cmp(&b.what).then_with(|| match a.what {
            What::BackupListing => b.key.cmp(&a.key),
            _ => std::cmp::Ordering::Equal,
        })
    });
    let proof = prove(inventory, &kept, &deletions);
    if let Some(window) = policy.recovery_window {
        if proof
            .window
            .as_ref()
            .and_then(|w| OffsetDateTime::parse(&w.earliest, &Rfc3339).ok())
            .is_some_and(|e| e > now - window)
        {
            warnings.push(format!(
                "the restorable window is shorter than recovery_window ({}s): the repository does not yet hold a backup that old",
                window.whole_seconds()
            ));
        }
    }
    let dropped: Vec<String> =
        inventory.backups.iter().filter(|b| !kept.contains_key(&b.id)).map(|b| b.id.clone()).collect();
    let kept_list = inventory
        .backups
        .iter()
        .filter_map(|b| {
            let reasons = kept.get(&b.id)?.clone();
            Some(KeptBackup {
                id: b.id.clone(),
                end_time: b.end_time.clone(),
                end_lsn: b.end_lsn,
                timeline: b.timeline,
                reasons,
                restorable: proof.restorable.contains(&b.id),
            })
        })
        .collect();
    Plan {
        kept: kept_list,
        dropped,
        freed_bytes: deletions.iter().map(|d| d.bytes).sum(),
        deletions,
        floor,
        window_after: proof.window,
        protected_marks,
        warnings,
    }
}

/// Applies the backup rules; returns the floor.
fn choose_backups(keeper: &mut Keeper, restorable: &[&BackupManifest], policy: &Policy, now: OffsetDateTime) -> Lsn {
    let backups = &keeper.inventory.backups;
    let mut floor: Option<Lsn> = None;
    let lower = |floor: &mut Option<Lsn>, lsn: Lsn| *floor = Some(floor.map_or(lsn, |f| f.min(lsn)));
    if let Some(newest) = backups.last() {
        keeper.keep(newest, "newest");
        lower(&mut floor, newest.start_lsn);
    }
    let min = policy.min_backups.unwrap_or(0) as usize;
    for backup in backups.iter().rev().take(min) {
        keeper.keep(backup, "min_backups");
        lower(&mut floor, backup.start_lsn);
    }
    if let Some(window) = policy.recovery_window.filter(|w| *w > Duration::ZERO) {
        let cutoff = now - window;
        let newest_tl = keeper.inventory.timelines.iter().map(|t| t.timeline).max().unwrap_or(TimelineId(1));
        let steps = history(&keeper.inventory.timelines, newest_tl).unwrap_or_default();
        let ended_before = |b: &&&BackupManifest| end_time(b).is_some_and(|e| e <= cutoff);
        match restorable.iter().filter(|b| on_history(b, &steps)).rev().find(ended_before) {
            Some(anchor) => {
                keeper.keep(anchor, "recovery_window (its oldest moment)");
                lower(&mut floor, anchor.start_lsn);
                for backup in backups.iter().filter(|b| end_time(b).is_none_or(|e| e > cutoff)) {
                    keeper.keep(backup, "recovery_window");
                }
            }
            None => {
                // Not a full window yet: everything is kept.
                for backup in backups {
                    keeper.keep(backup, "recovery_window (not yet full)");
                }
                lower(&mut floor, Lsn::ZERO);
            }
        }
    }
    keeper.calendar(restorable, policy.keep_daily, now, "daily", day);
    keeper.calendar(restorable, policy.keep_weekly, now, "weekly", week);
    keeper.calendar(restorable, policy.keep_monthly, now, "monthly", month);
    floor.unwrap_or(Lsn::ZERO)
}

/// Protected marks keep the newest backup before them and the WAL between.
fn keep_marks(keeper: &mut Keeper, restorable: &[&BackupManifest], floor: Lsn, now: OffsetDateTime) -> Vec<KeptMark> {
    let mut protected = Vec::new();
    let marks = keeper.inventory.marks.clone();
    for (_, mark) in &marks {
        let Some(keep_until) = protected_until(mark, now) else { continue };
        let steps = history(&keeper.inventory.timelines, mark.timeline).unwrap_or_default();
        let ranges = wal_ranges(wal_pieces(&keeper.inventory.wal, keeper.inventory.segment_size));
        let backup = restorable
            .iter()
            .rev()
            .find(|b| {
                on_history(b, &steps)
                    && b.end_lsn <= mark.lsn
                    && available_along(&ranges, &steps, b.start_lsn) >= mark.lsn
            })
            .copied();
        match backup {
            Some(backup) => {
                keeper.keep(backup, format!("mark {:?}", mark.name));
                if backup.start_lsn < floor {
                    keeper.keep_wal_along(&steps, backup.start_lsn, mark.lsn);
                }
            }
            None => keeper.warnings.push(format!(
                "restore point {:?} ({}) cannot be restored: no backup before it has all the WAL to it",
                mark.name, mark.lsn
            )),
        }
        protected.push(KeptMark {
            name: mark.name.clone(),
            lsn: mark.lsn,
            keep_until,
            backup: backup.map(|b| b.id.clone()),
        });
    }
    protected
}

/// The id of the backup an object under `backups/` belongs to.
fn backup_of(key: &str) -> Option<&str> {
    key.strip_prefix("backups/")?.split('/').next()
}

fn backup_deletions(
    inventory: &Inventory,
    kept: &BTreeMap<String, Vec<String>>,
    now: OffsetDateTime,
    grace: Duration,
    deletions: &mut Vec<Deletion>,
) {
    let complete: BTreeSet<&str> = inventory.backups.iter().map(|b| b.id.as_str()).collect();
    let referenced: BTreeSet<&str> = inventory
        .backups
        .iter()
        .filter(|b| kept.contains_key(&b.id))
        .flat_map(|b| b.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.key.as_str())))
        .collect();
    // A backup without backup.json is in progress while any object of it is young.
    let mut newest: BTreeMap<&str, OffsetDateTime> = BTreeMap::new();
    for object in &inventory.backup_objects {
        if let Some(id) = backup_of(&object.key) {
            let entry = newest.entry(id).or_insert(object.modified);
            *entry = (*entry).max(object.modified);
        }
    }
    for object in &inventory.backup_objects {
        let Some(id) = backup_of(&object.key) else { continue };
        if kept.contains_key(id) || referenced.contains(object.key.as_str()) {
            continue;
        }
        let what = if complete.contains(id) {
            if object.key == manifest_key(id) {
                What::BackupListing
            } else {
                What::BackupObject
            }
        } else if newest.get(id).is_some_and(|t| now - *t >= grace) {
            What::Orphan
        } else {
            continue; // in progress
        };
        deletions.push(Deletion { key: object.key.clone(), bytes: object.bytes, what });
    }
}

/// WAL deletions, oldest first; returns the segments whose WAL stays.
fn wal_deletions(
    inventory: &Inventory,
    floor: Lsn,
    segments: &BTreeSet<SegmentId>,
    deletions: &mut Vec<Deletion>,
) -> BTreeSet<SegmentId> {
    let size = inventory.segment_size;
    let complete: BTreeSet<SegmentId> =
        inventory.wal.iter().filter(|w| w.partial_end.is_none()).map(|w| w.segment).collect();
    let mut wal: Vec<&WalObject> = inventory.wal.iter().collect();
    wal.sort_by_key(|w| (w.segment.segment_no, w.segment.timeline, w.partial_end.is_some()));
    let mut kept = BTreeSet::new();
    for object in wal {
        let end = object.partial_end.unwrap_or_else(|| object.segment.end_lsn(size));
        let superseded = object.partial_end.is_some() && (object.stale || complete.contains(&object.segment));
        let keep = !superseded && (end > floor || segments.contains(&object.segment));
        if keep {
            kept.insert(object.segment);
            continue;
        }
        let what = if superseded { What::SupersededPartial } else { What::Wal };
        deletions.push(Deletion { key: object.object.key.clone(), bytes: object.object.bytes, what });
    }
    kept
}

fn mark_and_summary_deletions(
    inventory: &Inventory,
    policy: &Policy,
    floor: Lsn,
    wal_kept: &BTreeSet<SegmentId>,
    protected: &[KeptMark],
    deletions: &mut Vec<Deletion>,
) {
    let size = inventory.segment_size;
    for (object, mark) in &inventory.marks {
        let segment = SegmentId::containing(mark.timeline, mark.lsn, size);
        let needed = protected.iter().any(|p| p.lsn == mark.lsn) || mark.lsn >= floor || wal_kept.contains(&segment);
        if !needed {
            deletions.push(Deletion { key: object.key.clone(), bytes: object.bytes, what: What::Mark });
        }
    }
    let mut summaries: Vec<&(SegmentId, StoredObject)> = inventory.summaries.iter().collect();
    summaries.sort_by_key(|(s, _)| (s.segment_no, s.timeline));
    for (segment, object) in summaries {
        let by_wal = wal_kept.contains(segment) || segment.end_lsn(size) > floor;
        let by_audit = policy.audit_window.is_some()
            && inventory.audit_from.get(&segment.timeline).is_none_or(|from| segment.segment_no >= *from);
        if !by_wal && !by_audit {
            deletions.push(Deletion { key: object.key.clone(), bytes: object.bytes, what: What::Summary });
        }
    }
}

struct Proof {
    window: Option<Window>,
    restorable: BTreeSet<String>,
}

/// The catalog as it will be once the deletions are done.
pub fn catalog_after(inventory: &Inventory, deletions: &[Deletion]) -> Catalog {
    let gone: BTreeSet<&str> = deletions.iter().map(|d| d.key.as_str()).collect();
    let wal: Vec<WalObject> = inventory.wal.iter().filter(|w| !gone.contains(w.object.key.as_str())).cloned().collect();
    let listed: Vec<BackupManifest> =
        inventory.backups.iter().filter(|b| !gone.contains(manifest_key(&b.id).as_str())).cloned().collect();
    let ranges = wal_ranges(wal_pieces(&wal, inventory.segment_size));
    let (restorable, waiting): (Vec<BackupManifest>, Vec<BackupManifest>) =
        listed.into_iter().partition(|b| is_restorable(b, &ranges));
    Catalog { restorable, waiting, ranges, timelines: inventory.timelines.clone() }
}

fn prove(inventory: &Inventory, _kept: &BTreeMap<String, Vec<String>>, deletions: &[Deletion]) -> Proof {
    let catalog = catalog_after(inventory, deletions);
    Proof { window: catalog.window(None), restorable: catalog.restorable.iter().map(|b| b.id.clone()).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::days(30)));
        assert_eq!(parse_duration("12h"), Ok(Duration::hours(12)));
        assert_eq!(parse_duration("90s"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("90"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("2w"), Ok(Duration::days(14)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3y").is_err());
    }

    #[test]
    fn policies_that_keep_nothing_are_refused() {
        assert!(Policy::default().check().is_ok());
        let nothing = Policy { recovery_window: Some(Duration::ZERO), min_backups: Some(0), ..Default::default() };
        assert!(nothing.check().unwrap_err().contains("keeps nothing"));
        assert!(Policy { keep_daily: Some(7), ..Default::default() }.check().is_ok());
    }

    #[test]
    fn calendar_periods() {
        let t = OffsetDateTime::parse("2026-11-28T23:00:00Z", &Rfc3339).expect("time");
        assert_eq!(day(t).1, "2026-11-28");
        assert_eq!(day(t).0 - day(t - Duration::DAY).0, 1);
        assert_eq!(week(t).1, "2026-W48");
        // Monday 2026-11-30 begins the next week.
        assert_eq!(week(t + Duration::days(2)).0 - week(t).0, 1);
        assert_eq!(week(t + Duration::hours(1)).0, week(t).0);
        assert_eq!(month(t).1, "2026-11");
        assert_eq!(month(t + Duration::days(3)).0 - month(t).0, 1);
    }
}
