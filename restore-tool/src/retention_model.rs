//! A model-based property test of the retention planner against the restore
//! planner: random histories (backups with chunk references, WAL on several
//! timelines, superseded partials and partial pieces, marks with and without `--keep`,
//! interrupted uploads, incremental backups on the one before) × random
//! policies × random "now". After the plan,
//! every target the policy promises that was restorable before is still
//! restorable according to [`crate::planner::plan`], every listed backup is
//! complete (also after any prefix of the deletions: a crash mid-expire),
//! and nothing a successful restore needs was deleted.

use crate::planner::{plan, Stop};
use crate::target::Target;
use proptest::prelude::*;
use std::collections::BTreeSet;
use tidemark_proto::repo::backup::{chunk_key, manifest_key, pg_manifest_key, BackupManifest};
use tidemark_proto::repo::layout::{partial_piece_key, partial_segment_key, segment_key, summary_key};
use tidemark_proto::repo::records::MarkRecord;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::catalog::{history, segments_along, Catalog, TimelineInfo};
use tidemark_repo::retention::{self, Inventory, Policy, StoredObject, WalObject};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

const SEG: u64 = 64;
/// One LSN unit of the model is ten minutes of wall clock.
const UNIT: i64 = 600;

fn base() -> OffsetDateTime {
    OffsetDateTime::parse("2026-10-01T00:00:00Z", &Rfc3339).expect("time")
}

fn at(lsn: u64) -> OffsetDateTime {
    base() + Duration::seconds(lsn as i64 * UNIT)
}

fn text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("format")
}

/// A small deterministic generator, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn object(key: String, modified: OffsetDateTime) -> StoredObject {
    StoredObject { key, bytes: 100, modified }
}

struct Model {
    inventory: Inventory,
    now: OffsetDateTime,
    /// Incomplete backups still being written (must never be touched).
    in_progress: Vec<String>,
}

fn timeline_info(timeline: u32, ancestors: Vec<(u32, u64)>) -> TimelineInfo {
    TimelineInfo {
        timeline: TimelineId(timeline),
        parent: ancestors.last().map(|a| TimelineId(a.0)),
        switch_lsn: ancestors.last().map(|a| Lsn(a.1)),
        ancestors: ancestors.into_iter().map(|(t, l)| (TimelineId(t), Lsn(l))).collect(),
    }
}

/// WAL of `timeline` from `from` to `to`: complete segments, the last one partial.
fn wal_of(
    rng: &mut Rng,
    timeline: u32,
    from: u64,
    to: u64,
    out: &mut Vec<WalObject>,
    summaries: &mut Vec<(SegmentId, StoredObject)>,
) {
    let first = from / SEG;
    let last = to / SEG;
    for n in first..=last {
        let segment = SegmentId { timeline: TimelineId(timeline), segment_no: n };
        let modified = at((n + 1) * SEG);
        let end = ((n + 1) * SEG).min(to);
        if end == (n + 1) * SEG {
            out.push(WalObject {
                object: object(segment_key(segment, SEG), modified),
                segment,
                partial_end: None,
                stale: false,
            });
            summaries.push((segment, object(summary_key(segment, SEG), modified)));
            if rng.chance(10) {
                // A superseded partial the agent could not delete.
                let key = partial_segment_key(segment, SEG);
                out.push(WalObject {
                    object: object(key, modified),
                    segment,
                    partial_end: Some(Lsn(end - 1)),
                    stale: false,
                });
            }
        } else if end > n * SEG {
            let key = partial_segment_key(segment, SEG);
            out.push(WalObject { object: object(key, modified), segment, partial_end: Some(Lsn(end)), stale: false });
            // A piece continuing the prefix (its chain ends where the
            // prefix's does), and one already folded into the prefix that
            // the agent could not delete (stale).
            for (offset, stale) in [(1, false), (2, true)] {
                if rng.chance(30) {
                    let object = object(partial_piece_key(segment, SEG, offset), modified);
                    out.push(WalObject { object, segment, partial_end: Some(Lsn(end)), stale });
                }
            }
        }
    }
}

fn manifest(id: &str, timeline: u32, start: u64, end: u64, chunks: &[String]) -> BackupManifest {
    let files: Vec<serde_json::Value> = chunks
        .iter()
        .enumerate()
        .map(|(i, key)| {
            serde_json::json!({"archive": "base", "path": format!("f{i}"), "kind": "file", "size": 1, "mode": 384,
                "mtime_unix": 0, "chunks": [{"key": key, "raw_len": 1, "crc32": 0, "crc32c": 0}]})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "format_version": 1, "id": id, "label": id, "system_identifier": "1", "server_version_num": 150000,
        "timeline": timeline, "start_lsn": Lsn(start).to_string(), "end_lsn": Lsn(end).to_string(),
        "start_time": text(at(start)), "end_time": text(at(end)),
        "tablespaces": [], "files": files, "pg_manifest_key": pg_manifest_key(id), "bytes": 3, "stored_bytes": 3
    }))
    .expect("manifest")
}

/// Backups along the newest history, each reusing some of the previous
/// one's chunks, some incremental on it.
fn backups_along(
    rng: &mut Rng,
    end: u64,
    timeline_at: &dyn Fn(u64) -> u32,
) -> (Vec<BackupManifest>, Vec<StoredObject>) {
    let mut backups: Vec<BackupManifest> = Vec::new();
    let mut backup_objects = Vec::new();
    let mut lsn = rng.below(SEG * 2);
    let mut n = 0;
    while lsn + 12 < end {
        let id = format!("B{n:03}");
        let finish = lsn + 1 + rng.below(10);
        let mut chunks = Vec::new();
        for c in 0..3u64 {
            match backups.last() {
                Some(previous) if rng.chance(50) => {
                    chunks.push(previous.files[c as usize].chunks[0].key.clone());
                }
                _ => {
                    let key = chunk_key(&id, c);
                    backup_objects.push(object(key.clone(), at(finish)));
                    chunks.push(key);
                }
            }
        }
        let mut backup = manifest(&id, timeline_at(lsn), lsn, finish, &chunks);
        if let Some(previous) = backups.last().filter(|p| p.timeline == backup.timeline && rng.chance(40)) {
            backup.base = Some(previous.id.clone());
            backup.format_version = tidemark_proto::repo::backup::INCREMENTAL_FORMAT_VERSION;
        }
        backup_objects.push(object(pg_manifest_key(&id), at(finish)));
        backup_objects.push(object(manifest_key(&id), at(finish)));
        backups.push(backup);
        n += 1;
        lsn = finish + 10 + rng.below(SEG * 4);
    }
    (backups, backup_objects)
}

fn generate(seed: u64) -> Model {
    let mut rng = Rng(seed | 1);
    let end = SEG * (8 + rng.below(40)) + rng.below(SEG);
    let mut timelines = vec![timeline_info(1, vec![])];
    // The newest history: (timeline, from) steps.
    let mut steps: Vec<(u32, u64)> = vec![(1, 0)];
    let mut wal = Vec::new();
    let mut summaries = Vec::new();
    let switches = rng.below(3);
    let mut ancestors: Vec<(u32, u64)> = Vec::new();
    let mut from = 0;
    for k in 0..switches {
        let switch = from + SEG + rng.below((end - from).saturating_sub(2 * SEG).max(1));
        if switch + SEG >= end {
            break;
        }
        let timeline = 1 + k as u32;
        // The old timeline went on a little past the switch (its last partial).
        let left_at = switch + rng.below(SEG / 2);
        wal_of(&mut rng, timeline, from, left_at, &mut wal, &mut summaries);
        ancestors.push((timeline, switch));
        timelines.push(timeline_info(timeline + 1, ancestors.clone()));
        steps.push((timeline + 1, switch));
        from = switch;
    }
    let newest = steps.last().map(|s| s.0).unwrap_or(1);
    wal_of(&mut rng, newest, from, end, &mut wal, &mut summaries);
    if rng.chance(15) {
        // A lost segment somewhere old: a hole.
        let victim = rng.below(wal.len() as u64 / 2) as usize;
        wal.remove(victim);
    }
    let timeline_at = |lsn: u64| steps.iter().rev().find(|s| s.1 <= lsn).map(|s| s.0).unwrap_or(1);
    let (backups, mut backup_objects) = backups_along(&mut rng, end, &timeline_at);
    let now = at(end) + Duration::seconds(rng.below(100) as i64 * UNIT / 10);
    // Interrupted and in-progress backups (no backup.json).
    let mut in_progress = Vec::new();
    for k in 0..rng.below(3) {
        let id = format!("Z{k}");
        let age = if rng.chance(50) { Duration::days(3) } else { Duration::minutes(5) };
        if age < Duration::DAY {
            in_progress.push(id.clone());
        }
        backup_objects.push(object(chunk_key(&id, 0), now - age));
    }
    let mut marks = Vec::new();
    for k in 0..rng.below(4) {
        let mark_lsn = rng.below(end);
        let keep_until = match rng.below(4) {
            0 => None,
            1 => Some("forever".to_string()),
            2 => Some(text(now - Duration::hours(1))),
            _ => Some(text(now + Duration::days(3))),
        };
        let record = MarkRecord {
            name: format!("m{k}"),
            lsn: Lsn(mark_lsn),
            timeline: TimelineId(timeline_at(mark_lsn)),
            time: text(at(mark_lsn)),
            keep_until,
        };
        marks.push((object(format!("marks/{mark_lsn:016X}.json"), at(mark_lsn)), record));
    }
    let leftovers = vec![
        object("wal/00000001/x#1".into(), now - Duration::days(2)),
        object("wal/00000001/y#2".into(), now - Duration::minutes(1)),
    ];
    let inventory = Inventory {
        segment_size: SEG,
        backups,
        backup_objects,
        wal,
        timelines,
        summaries,
        marks,
        leftovers,
        audit_from: Default::default(),
    };
    Model { inventory, now, in_progress }
}

fn policy_from(rng: &mut Rng) -> Policy {
    let maybe = |rng: &mut Rng, n: u64| if rng.chance(50) { Some(rng.below(n) as u32) } else { None };
    let policy = Policy {
        recovery_window: rng.chance(70).then(|| Duration::seconds((rng.below(SEG * 20) as i64) * UNIT)),
        keep_daily: maybe(rng, 8),
        keep_weekly: maybe(rng, 4),
        keep_monthly: maybe(rng, 3),
        min_backups: maybe(rng, 4),
        audit_window: rng.chance(30).then(|| Duration::days(30)),
    };
    if policy.check().is_ok() {
        policy
    } else {
        Policy { min_backups: Some(1), ..policy }
    }
}

/// The keys present after `deletions`.
fn remaining(model: &Model, deletions: &[retention::Deletion]) -> BTreeSet<String> {
    let gone: BTreeSet<&str> = deletions.iter().map(|d| d.key.as_str()).collect();
    let inv = &model.inventory;
    inv.backup_objects
        .iter()
        .map(|o| &o.key)
        .chain(inv.wal.iter().map(|w| &w.object.key))
        .chain(inv.summaries.iter().map(|s| &s.1.key))
        .chain(inv.marks.iter().map(|m| &m.0.key))
        .chain(inv.leftovers.iter().map(|o| &o.key))
        .filter(|k| !gone.contains(k.as_str()))
        .cloned()
        .collect()
}

/// Every backup still listed has all its objects, and those of every
/// backup it is incremental on.
fn listed_backups_complete(model: &Model, present: &BTreeSet<String>) -> Result<(), String> {
    let by_id = |id: &str| model.inventory.backups.iter().find(|b| b.id == id);
    for listed in &model.inventory.backups {
        if !present.contains(&manifest_key(&listed.id)) {
            continue;
        }
        let mut current = Some(listed);
        while let Some(backup) = current {
            let needed = backup.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.key.clone()));
            let own = [manifest_key(&backup.id), backup.pg_manifest_key.clone()];
            for key in needed.chain(own) {
                if !present.contains(&key) {
                    return Err(format!("listed backup {} lost {key} (of {})", listed.id, backup.id));
                }
            }
            current = backup.base.as_deref().and_then(by_id);
        }
    }
    Ok(())
}

/// Whether a plan's WAL and backup are all present.
fn plan_is_whole(catalog: &Catalog, p: &crate::planner::Plan, present: &BTreeSet<String>) -> Result<(), String> {
    // The WAL before `wal_needed_to` (what the planner itself counts as available).
    let last = Lsn(p.wal_needed_to.0.saturating_sub(1).max(p.wal_start.0));
    for segment in segments_along(&p.history, p.wal_start, last, SEG) {
        let complete = segment_key(segment, SEG);
        let partial = partial_segment_key(segment, SEG);
        if !present.contains(&complete) && !present.contains(&partial) {
            return Err(format!("restore from {} needs {complete}, deleted", p.backup.id));
        }
    }
    let _ = catalog;
    listed_backups_complete_one(&p.backup, present)
}

fn listed_backups_complete_one(backup: &BackupManifest, present: &BTreeSet<String>) -> Result<(), String> {
    for file in &backup.files {
        for chunk in &file.chunks {
            if !present.contains(&chunk.key) {
                return Err(format!("backup {} lost chunk {}", backup.id, chunk.key));
            }
        }
    }
    Ok(())
}

/// A time's calendar period (day, week or month) as a number.
type Period = fn(OffsetDateTime) -> i64;

/// (target, stop, backup id, timeline) of every restore the policy promises.
fn promises(model: &Model, policy: &Policy, before: &Catalog) -> Vec<(Target, Stop, Option<String>, Option<String>)> {
    let mut out = Vec::new();
    let end = before.current_range().map(|r| r.end.0).unwrap_or(0);
    if let Some(window) = policy.recovery_window {
        let cutoff = model.now - window;
        for l in (0..end).step_by(7) {
            if at(l) >= cutoff {
                out.push((Target::Lsn(Lsn(l)), Stop::default(), None, None));
                let stop = Stop { lsn: Some(Lsn(l)), known_before: l.checked_sub(1).map(Lsn) };
                out.push((Target::Time(at(l) - Duration::seconds(1)), stop, None, None));
            }
        }
    }
    for (_, mark) in &model.inventory.marks {
        let protected = match mark.keep_until.as_deref() {
            Some("forever") => true,
            Some(t) => OffsetDateTime::parse(t, &Rfc3339).is_ok_and(|t| t > model.now),
            None => false,
        };
        if protected {
            let stop = Stop { lsn: Some(mark.lsn), known_before: None };
            out.push((Target::Name(mark.name.clone()), stop, None, Some(mark.timeline.0.to_string())));
        }
    }
    // Calendar: the newest restorable backup of each of the last k days / weeks / months.
    let periods: [(Option<u32>, Period); 3] = [
        (policy.keep_daily, |t| i64::from(t.date().to_julian_day())),
        (policy.keep_weekly, |t| {
            i64::from(t.date().to_julian_day() - i32::from(t.weekday().number_days_from_monday())) / 7
        }),
        (policy.keep_monthly, |t| i64::from(t.year()) * 12 + i64::from(u8::from(t.month()))),
    ];
    for (count, period) in periods {
        let Some(count) = count.filter(|c| *c > 0) else { continue };
        let current = period(model.now);
        let mut newest: std::collections::BTreeMap<i64, &BackupManifest> = Default::default();
        for b in &before.restorable {
            let p = period(OffsetDateTime::parse(&b.end_time, &Rfc3339).expect("time"));
            if p > current - i64::from(count) && p <= current {
                newest.insert(p, b);
            }
        }
        for b in newest.values() {
            out.push((Target::Lsn(b.end_lsn), Stop::default(), Some(b.id.clone()), Some(b.timeline.0.to_string())));
        }
    }
    out
}

fn check(seed: u64, policy_seed: u64) -> Result<(), String> {
    let mut model = generate(seed);
    let mut rng = Rng(policy_seed | 1);
    let policy = policy_from(&mut rng);
    if policy.audit_window.is_some() {
        // What expire finds by reading summaries: per timeline, the first
        // segment inside the audit window.
        for timeline in 1..=3 {
            model.inventory.audit_from.insert(TimelineId(timeline), rng.below(50));
        }
    }
    let result = retention::plan(&model.inventory, &policy, model.now, Duration::DAY);
    let before = retention::catalog_after(&model.inventory, &[]);
    let after = retention::catalog_after(&model.inventory, &result.deletions);
    let present = remaining(&model, &result.deletions);
    let everything = remaining(&model, &[]);
    listed_backups_complete(&model, &present)?;
    // Any prefix of the deletions (a crash) leaves every listed backup whole.
    for cut in [1, result.deletions.len() / 3, result.deletions.len() / 2, result.deletions.len().saturating_sub(1)] {
        let prefix = result.deletions.get(..cut.min(result.deletions.len())).unwrap_or_default();
        listed_backups_complete(&model, &remaining(&model, prefix))?;
    }
    for id in &model.in_progress {
        if !present.contains(&chunk_key(id, 0)) {
            return Err(format!("in-progress backup {id} was touched"));
        }
    }
    if let Some(newest) = model.inventory.backups.last() {
        if !present.contains(&manifest_key(&newest.id)) {
            return Err("the newest backup was dropped".into());
        }
    }
    let listed = after.restorable.len() + after.waiting.len();
    let wanted = (policy.min_backups.unwrap_or(0) as usize).min(model.inventory.backups.len());
    if listed < wanted {
        return Err(format!("{listed} backups left, min_backups {wanted}"));
    }
    for (target, stop, backup, timeline) in promises(&model, &policy, &before) {
        let was = plan(&before, target.clone(), backup.as_deref(), timeline.as_deref(), stop, model.now);
        if !was.is_ok_and(|p| plan_is_whole(&before, &p, &everything).is_ok()) {
            continue; // not restorable before either (a hole, a mark without a backup)
        }
        match plan(&after, target.clone(), backup.as_deref(), timeline.as_deref(), stop, model.now) {
            Ok(p) => plan_is_whole(&after, &p, &present).map_err(|e| format!("{target}: {e}"))?,
            Err(refusal) => return Err(format!("{target} (backup {backup:?}) was restorable, now: {refusal}")),
        }
    }
    // A segment's pieces go with its prefix object; stale pieces always go.
    for w in &model.inventory.wal {
        let kept = present.contains(&w.object.key);
        if w.stale && kept {
            return Err(format!("stale piece {} was kept", w.object.key));
        }
        let prefix = partial_segment_key(w.segment, SEG);
        // (A hole the generator made may have taken the prefix object.)
        let chained = !w.stale && w.object.key.contains(".partial.") && everything.contains(&prefix);
        if chained && kept != present.contains(&prefix) {
            return Err(format!("piece {} and its prefix object were parted", w.object.key));
        }
    }
    // Summaries inside the audit window stay, whatever happened to their WAL.
    if policy.audit_window.is_some() {
        for (segment, object) in &model.inventory.summaries {
            let from = model.inventory.audit_from.get(&segment.timeline).copied().unwrap_or(0);
            if segment.segment_no >= from && !present.contains(&object.key) {
                return Err(format!("summary {} inside the audit window was deleted", object.key));
            }
        }
    }
    // The proof the plan prints is the catalog's own window afterwards.
    if result.window_after != after.window(None) {
        return Err("the plan's window differs from the catalog's".into());
    }
    let _ = history(&after.timelines, TimelineId(1));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn retention_keeps_every_promised_restore(seed in any::<u64>(), policy_seed in any::<u64>()) {
        if let Err(e) = check(seed, policy_seed) {
            prop_assert!(false, "seed {seed} policy {policy_seed}: {e}");
        }
    }
}

#[test]
fn a_dropped_backups_chunks_stay_while_a_kept_one_references_them() {
    // Many seeds, the policy keeping only the newest: chunks it reuses stay.
    for seed in 1..200u64 {
        let model = generate(seed);
        let policy = Policy { min_backups: Some(1), ..Default::default() };
        let result = retention::plan(&model.inventory, &policy, model.now, Duration::DAY);
        let present = remaining(&model, &result.deletions);
        if let Some(newest) = model.inventory.backups.last() {
            listed_backups_complete_one(newest, &present).expect("newest backup whole");
        }
        assert!(result.deletions.iter().all(|d| !d.key.ends_with("y#2")), "a fresh staging file is not an orphan");
        assert!(result.deletions.iter().any(|d| d.key.ends_with("x#1")), "an old staging file is");
    }
}
