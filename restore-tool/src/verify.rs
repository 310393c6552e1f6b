//! `tidemark-restore verify`: reads every object a backup needs and checks
//! each one completely — sealing (authentication, in an encrypted
//! repository), framing, decompression, CRC-32 — plus the backup manifest's
//! CRC-32C and length per chunk and the size of every WAL segment. It keeps
//! going after a bad object, so one run names every bad one.
//!
//! What a backup needs: its manifest, the server's backup_manifest, every
//! file chunk, every timeline history file, and the WAL from its start to its
//! end (to become consistent). The restorable window needs the WAL from the
//! start of its oldest backup on to the end of the archive on every timeline
//! from that one's on (with the audit summaries of those segments, which
//! time targets rely on): a segment missing in the middle of that stretch is
//! a problem too. Backups kept outside the window by retention need only
//! their own WAL, and a gap before the window is retention's doing.

use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use tidemark_proto::repo::backup::{complete_backup_ids, manifest_key, BackupManifest};
use tidemark_proto::repo::layout::{partial_segment_key, segment_key, ObjectKey};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::TimelineId;
use tidemark_repo::catalog::{self, Catalog};
use tidemark_repo::{Fail, RepoError, Repository};

/// Objects read at once.
const PARALLEL_READS: usize = 8;

#[derive(Debug, Serialize)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub backups: Vec<String>,
    pub objects_checked: usize,
    /// Bytes after decryption and decompression.
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
}

/// What one object must hold, beyond a sound frame.
#[derive(Clone, Debug)]
enum Expect {
    /// Any sound frame.
    Frame,
    /// A complete WAL segment: exactly the segment size.
    Segment(u64),
    /// A partial segment's prefix or piece: at most this many bytes.
    Partial(u64),
    /// A backup chunk: this length and CRC-32C, as the manifest says.
    Chunk { raw_len: u64, crc32c: u32 },
}

pub async fn verify(repo: &Repository, backup: Option<&str>) -> anyhow::Result<VerifyReport> {
    let meta = repo.meta().await?;
    // A wrong or missing key stops here, before anything is reported bad.
    repo.check_keys().await?;
    let segment_size = meta.wal_segment_size;
    let keys = repo.list("").await?;
    let ids = backups_to_verify(&keys, backup)?;
    let mut problems = Vec::new();
    let mut checks: Vec<(String, Expect)> = Vec::new();
    let catalog = Catalog::load(repo).await?;
    // The window's oldest backup: from its first segment on, no gaps.
    let window = catalog.window(None);
    let window_backup = window.as_ref().and_then(|w| catalog.restorable.iter().find(|b| b.end_lsn == w.earliest_lsn));
    let window_first = window_backup.map(|b| SegmentId::containing(b.timeline, b.start_lsn, segment_size));
    let mut earliest: Option<SegmentId> = None;
    let mut required: BTreeSet<SegmentId> = BTreeSet::new();
    for id in &ids {
        let Some(manifest) = read_backup_manifest(repo, id, &mut problems).await? else { continue };
        checks.extend(backup_checks(&manifest));
        if manifest.base.is_some() {
            // An incremental backup needs the backups it is based on, and
            // its files must add up along that chain.
            match catalog::read_chain(repo, &manifest).await {
                Ok(chain) => {
                    problems.extend(chain_problems(&chain));
                    for base in chain.iter().skip(1).filter(|b| !ids.contains(&b.id)) {
                        checks.extend(backup_checks(base));
                    }
                }
                Err(RepoError::Corrupt { key, reason }) => problems.push(Problem { key, problem: reason }),
                Err(e) => return Err(e.into()),
            }
        }
        // A backup still waiting for its WAL (the archive has not reached
        // its end yet) needs nothing more than what is there.
        if catalog.restorable.iter().any(|b| b.id == manifest.id) {
            let steps = catalog::history(&catalog.timelines, manifest.timeline).unwrap_or_default();
            required.extend(catalog::segments_along(&steps, manifest.start_lsn, manifest.end_lsn, segment_size));
        }
        let first = SegmentId::containing(manifest.timeline, manifest.start_lsn, segment_size);
        if window_first.is_some_and(|w| (first.timeline, first.segment_no) >= (w.timeline, w.segment_no)) {
            earliest = Some(match earliest {
                Some(e) if (e.timeline, e.segment_no) <= (first.timeline, first.segment_no) => e,
                _ => first,
            });
        }
    }
    let (wal, present) = wal_checks(&keys, earliest, &required, segment_size);
    checks.extend(wal);
    if let Some(first) = earliest {
        problems.extend(missing_segments(first, &present, segment_size));
    }
    for segment in &required {
        let archived = [segment_key(*segment, segment_size), partial_segment_key(*segment, segment_size)];
        if !archived.iter().any(|k| keys.contains(k)) {
            problems.push(Problem {
                key: segment_key(*segment, segment_size),
                problem: "missing: a backup needs it to become consistent".into(),
            });
        }
    }
    let (objects_checked, bytes_checked) = run_checks(repo, checks, &mut problems).await?;
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(VerifyReport { backups: ids, objects_checked, bytes_checked, problems })
}

/// The complete backups to check: all, or the one asked for.
fn backups_to_verify(keys: &[String], backup: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut ids = complete_backup_ids(keys.iter().map(String::as_str));
    if let Some(wanted) = backup {
        if !ids.iter().any(|id| id == wanted) {
            return Err(RepoError::NoSuchBackup(wanted.to_string()).into());
        }
        ids.retain(|id| id == wanted);
    }
    if ids.is_empty() {
        return Err(Fail::new(
            "the repository has no complete backup to verify",
            "take one with `tidemark-agent backup` (or let `run` take it)",
        )
        .into());
    }
    Ok(ids)
}

/// A backup's manifest, or `None` with the problem recorded when it is bad.
async fn read_backup_manifest(
    repo: &Repository,
    id: &str,
    problems: &mut Vec<Problem>,
) -> Result<Option<BackupManifest>, RepoError> {
    let key = manifest_key(id);
    let problem = match repo.get(&key).await {
        Ok(Some(raw)) => match BackupManifest::from_json(&raw) {
            Ok(manifest) => return Ok(Some(manifest)),
            Err(reason) => format!("not a backup manifest: {reason}"),
        },
        Ok(None) => "missing".into(),
        Err(e) => problem_of(&key, e)?.problem,
    };
    problems.push(Problem { key, problem });
    Ok(None)
}

/// The objects of one backup: its manifests and every chunk.
fn backup_checks(manifest: &BackupManifest) -> Vec<(String, Expect)> {
    let mut checks =
        vec![(manifest_key(&manifest.id), Expect::Frame), (manifest.pg_manifest_key.clone(), Expect::Frame)];
    for file in &manifest.files {
        for chunk in &file.chunks {
            checks.push((chunk.key.clone(), Expect::Chunk { raw_len: chunk.raw_len, crc32c: chunk.crc32c }));
        }
    }
    checks
}

/// Files of an incremental backup whose blocks do not add up along its chain.
fn chain_problems(chain: &[BackupManifest]) -> Vec<Problem> {
    let Some(newest) = chain.first() else { return Vec::new() };
    let links = match tidemark_proto::repo::chain::Chain::new(chain) {
        Ok(links) => links,
        Err(problem) => return vec![Problem { key: manifest_key(&newest.id), problem }],
    };
    newest
        .files
        .iter()
        .filter(|f| f.blocks.is_some())
        .filter_map(|f| links.plan(f).err())
        .map(|problem| Problem { key: manifest_key(&newest.id), problem })
        .collect()
}

/// Archived segment numbers per timeline.
type Present = BTreeMap<TimelineId, Vec<u64>>;

/// Every history file, and the WAL and summaries from `first` on; with the
/// segment numbers present per timeline, to find gaps.
fn wal_checks(
    keys: &[String],
    first: Option<SegmentId>,
    required: &BTreeSet<SegmentId>,
    segment_size: u64,
) -> (Vec<(String, Expect)>, Present) {
    let mut checks = Vec::new();
    let mut present: BTreeMap<TimelineId, Vec<u64>> = BTreeMap::new();
    let in_window = |segment: SegmentId| {
        first.is_some_and(|first| segment.timeline >= first.timeline && segment.segment_no >= first.segment_no)
    };
    let needed = |segment: SegmentId| in_window(segment) || required.contains(&segment);
    let mut note = |segment: SegmentId| {
        if in_window(segment) {
            present.entry(segment.timeline).or_default().push(segment.segment_no);
        }
    };
    for key in keys {
        let expect = match ObjectKey::parse(key, segment_size) {
            Some(ObjectKey::History(_)) => Expect::Frame,
            Some(ObjectKey::Summary(segment)) if needed(segment) => Expect::Frame,
            Some(ObjectKey::Segment(segment)) if needed(segment) => {
                note(segment);
                Expect::Segment(segment_size)
            }
            Some(ObjectKey::PartialSegment(segment)) if needed(segment) => {
                note(segment);
                Expect::Partial(segment_size)
            }
            // A piece holds the bytes from its offset to at most the segment's end.
            Some(ObjectKey::PartialPiece { segment, offset }) if needed(segment) => {
                Expect::Partial(segment_size - offset)
            }
            _ => continue,
        };
        checks.push((key.clone(), expect));
    }
    (checks, present)
}

/// Reads every object (a few at once); returns how many and how many bytes,
/// recording each bad one.
async fn run_checks(
    repo: &Repository,
    checks: Vec<(String, Expect)>,
    problems: &mut Vec<Problem>,
) -> Result<(usize, u64), RepoError> {
    let progress = tidemark_repo::progress::Progress::objects("verify", checks.len() as u64);
    let mut results = futures::stream::iter(checks.into_iter().map(|(key, expect)| async move {
        let outcome = check_object(repo, &key, &expect).await;
        (key, outcome)
    }))
    .buffer_unordered(PARALLEL_READS);
    let mut objects_checked = 0;
    let mut bytes_checked = 0;
    while let Some((key, outcome)) = results.next().await {
        objects_checked += 1;
        progress.add(1);
        match outcome {
            Ok(bytes) => bytes_checked += bytes,
            Err(e) => problems.push(problem_of(&key, e)?),
        }
    }
    progress.finish();
    Ok((objects_checked, bytes_checked))
}

/// A read failure as a problem with the object, or the error itself when it
/// is not about the object (an unreachable store, a missing key file).
fn problem_of(key: &str, error: RepoError) -> Result<Problem, RepoError> {
    match error {
        RepoError::Corrupt { reason, .. } => Ok(Problem { key: key.to_string(), problem: reason }),
        other => Err(other),
    }
}

async fn check_object(repo: &Repository, key: &str, expect: &Expect) -> Result<u64, RepoError> {
    let corrupt = |reason: String| RepoError::Corrupt { key: key.to_string(), reason };
    // get opens the seal (authentication) and checks the frame (length, CRC-32).
    let raw = repo.get(key).await?.ok_or_else(|| corrupt("missing (listed, then gone)".into()))?;
    let len = raw.len() as u64;
    match *expect {
        Expect::Frame => {}
        Expect::Segment(size) if len != size => return Err(corrupt(format!("{len} bytes, a segment has {size}"))),
        Expect::Partial(size) if len > size => return Err(corrupt(format!("{len} bytes, past the segment's end"))),
        Expect::Chunk { raw_len, crc32c } if len != raw_len || crc32c::crc32c(&raw) != crc32c => {
            return Err(corrupt("does not match the backup manifest".into()));
        }
        _ => {}
    }
    Ok(len)
}

/// Segments missing between the first one needed and the last archived of
/// each timeline (a later timeline starts at its first archived segment).
fn missing_segments(first: SegmentId, present: &BTreeMap<TimelineId, Vec<u64>>, segment_size: u64) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (&timeline, numbers) in present {
        let mut numbers = numbers.clone();
        numbers.sort_unstable();
        numbers.dedup();
        let (Some(&lowest), Some(&highest)) = (numbers.first(), numbers.last()) else { continue };
        let from = if timeline == first.timeline { first.segment_no } else { lowest };
        for segment_no in from..=highest {
            if numbers.binary_search(&segment_no).is_err() {
                let segment = SegmentId { timeline, segment_no };
                problems.push(Problem {
                    key: segment_key(segment, segment_size),
                    problem: "missing: the WAL has a gap here".into(),
                });
            }
        }
    }
    if !present.contains_key(&first.timeline) {
        problems.push(Problem {
            key: segment_key(first, segment_size),
            problem: "missing: the backup's first WAL segment is not archived".into(),
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_found_from_the_first_needed_segment() {
        let size = 16 << 20;
        let first = SegmentId { timeline: TimelineId(1), segment_no: 3 };
        let present: BTreeMap<TimelineId, Vec<u64>> =
            [(TimelineId(1), vec![4, 3, 6]), (TimelineId(2), vec![6, 8])].into();
        let keys: Vec<String> = missing_segments(first, &present, size).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["wal/00000001/000000010000000000000005", "wal/00000002/000000020000000000000007"]);
        let from_two = SegmentId { timeline: TimelineId(1), segment_no: 2 };
        assert_eq!(missing_segments(from_two, &present, size).len(), 3);
        assert_eq!(missing_segments(first, &BTreeMap::new(), size).len(), 1);
    }
}
