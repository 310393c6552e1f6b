//! `tidemark-restore verify`: reads every object a backup needs and checks
//! each one completely — sealing (authentication, in an encrypted
//! repository), framing, decompression, CRC-32 — plus the backup manifest's
//! CRC-32C and length per chunk and the size of every WAL segment. It keeps
//! going after a bad object, so one run names every bad one.
//!
//! What a backup needs: its manifest, the server's backup_manifest, every
//! file chunk, every timeline history file, and the WAL from the segment its
//! start LSN is in on to the end of the archive on every timeline from its
//! own on (with the audit summaries of those segments, which time targets
//! rely on). A segment missing in the middle of that stretch is a problem too.

use crate::store::{ReadError, RepositoryReader};
use futures::StreamExt;
use serde::Serialize;
use std::collections::BTreeMap;
use tidemark_proto::repo::backup::{complete_backup_ids, manifest_key, BackupManifest};
use tidemark_proto::segment::{SegmentId, WalFileName};
use tidemark_proto::{Lsn, TimelineId};

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
    /// A partial segment: at most the segment size.
    Partial(u64),
    /// A backup chunk: this length and CRC-32C, as the manifest says.
    Chunk { raw_len: u64, crc32c: u32 },
}

pub async fn verify(repo: &RepositoryReader, backup: Option<&str>) -> Result<VerifyReport, ReadError> {
    let meta = repo.meta().await?;
    // A wrong or missing key stops here, before anything is reported bad.
    repo.check_keys().await?;
    let segment_size = meta.wal_segment_size;
    let keys = repo.list("").await?;
    let mut ids = complete_backup_ids(keys.iter().map(String::as_str));
    if let Some(wanted) = backup {
        if !ids.iter().any(|id| id == wanted) {
            return Err(ReadError::Other(anyhow::anyhow!("there is no complete backup {wanted}")));
        }
        ids.retain(|id| id == wanted);
    }
    if ids.is_empty() {
        return Err(ReadError::Other(anyhow::anyhow!("the repository has no complete backup to verify")));
    }

    let mut problems = Vec::new();
    let mut checks: Vec<(String, Expect)> = Vec::new();
    let mut earliest: Option<SegmentId> = None;
    for id in &ids {
        let key = manifest_key(id);
        let manifest = match repo.get(&key).await {
            Ok(Some(raw)) => match BackupManifest::from_json(&raw) {
                Ok(manifest) => manifest,
                Err(reason) => {
                    problems.push(Problem { key, problem: format!("not a backup manifest: {reason}") });
                    continue;
                }
            },
            Ok(None) => {
                problems.push(Problem { key, problem: "missing".into() });
                continue;
            }
            Err(e) => {
                problems.push(problem_of(&key, e)?);
                continue;
            }
        };
        checks.push((key, Expect::Frame));
        checks.push((manifest.pg_manifest_key.clone(), Expect::Frame));
        for file in &manifest.files {
            for chunk in &file.chunks {
                checks.push((chunk.key.clone(), Expect::Chunk { raw_len: chunk.raw_len, crc32c: chunk.crc32c }));
            }
        }
        let start = manifest.start_lsn.parse::<Lsn>().map_err(|e| ReadError::Other(e.into()))?;
        let first = SegmentId::containing(TimelineId(manifest.timeline), start, segment_size);
        earliest = Some(match earliest {
            Some(e) if (e.timeline, e.segment_no) <= (first.timeline, first.segment_no) => e,
            _ => first,
        });
    }

    // WAL (and its summaries) from the earliest backup's first segment on.
    let mut segments_per_timeline: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for key in &keys {
        if key.starts_with("timelines/") {
            checks.push((key.clone(), Expect::Frame));
            continue;
        }
        let (is_summary, rest) = match (key.strip_prefix("wal/"), key.strip_prefix("summaries/")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => continue,
        };
        let Some((_, name)) = rest.split_once('/') else { continue };
        let (name, partial) = match name.strip_suffix(".partial") {
            Some(name) => (name, true),
            None => (name, false),
        };
        let Ok(WalFileName::Segment(segment)) = WalFileName::parse(name, segment_size) else { continue };
        let Some(first) = earliest else { continue };
        if segment.timeline < first.timeline || segment.segment_no < first.segment_no {
            continue;
        }
        let expect = match (is_summary, partial) {
            (true, _) => Expect::Frame,
            (false, true) => Expect::Partial(segment_size),
            (false, false) => Expect::Segment(segment_size),
        };
        if !is_summary {
            segments_per_timeline.entry(segment.timeline.0).or_default().push(segment.segment_no);
        }
        checks.push((key.clone(), expect));
    }
    if let Some(first) = earliest {
        problems.extend(missing_segments(first, &segments_per_timeline, segment_size));
    }

    let mut results = futures::stream::iter(checks.into_iter().map(|(key, expect)| async move {
        let outcome = check_object(repo, &key, &expect).await;
        (key, outcome)
    }))
    .buffer_unordered(PARALLEL_READS);
    let mut objects_checked = 0;
    let mut bytes_checked = 0;
    while let Some((key, outcome)) = results.next().await {
        objects_checked += 1;
        match outcome {
            Ok(bytes) => bytes_checked += bytes,
            Err(e) => problems.push(problem_of(&key, e)?),
        }
    }
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(VerifyReport { backups: ids, objects_checked, bytes_checked, problems })
}

/// A read failure as a problem with the object, or the error itself when it
/// is not about the object (an unreachable store, a missing key file).
fn problem_of(key: &str, error: ReadError) -> Result<Problem, ReadError> {
    match error {
        ReadError::Corrupt { reason, .. } => Ok(Problem { key: key.to_string(), problem: reason }),
        other => Err(other),
    }
}

async fn check_object(repo: &RepositoryReader, key: &str, expect: &Expect) -> Result<u64, ReadError> {
    let corrupt = |reason: String| ReadError::Corrupt { key: key.to_string(), reason };
    // get opens the seal (authentication) and checks the frame (length, CRC-32).
    let raw = repo.get(key).await?.ok_or_else(|| corrupt("missing (listed, then gone)".into()))?;
    let len = raw.len() as u64;
    match *expect {
        Expect::Frame => {}
        Expect::Segment(size) if len != size => return Err(corrupt(format!("{len} bytes, a segment has {size}"))),
        Expect::Partial(size) if len > size => return Err(corrupt(format!("{len} bytes, more than a segment"))),
        Expect::Chunk { raw_len, crc32c } => {
            if len != raw_len || crc32c::crc32c(&raw) != crc32c {
                return Err(corrupt("does not match the backup manifest".into()));
            }
        }
        _ => {}
    }
    Ok(len)
}

/// Segments missing between the first one needed and the last archived of
/// each timeline (a later timeline starts at its first archived segment).
fn missing_segments(first: SegmentId, present: &BTreeMap<u32, Vec<u64>>, segment_size: u64) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (&timeline, numbers) in present {
        let mut numbers = numbers.clone();
        numbers.sort_unstable();
        numbers.dedup();
        let (Some(&lowest), Some(&highest)) = (numbers.first(), numbers.last()) else { continue };
        let from = if timeline == first.timeline.0 { first.segment_no } else { lowest };
        for segment_no in from..=highest {
            if numbers.binary_search(&segment_no).is_err() {
                let segment = SegmentId { timeline: TimelineId(timeline), segment_no };
                problems.push(Problem {
                    key: tidemark_proto::repo::layout::segment_key(segment, segment_size),
                    problem: "missing: the WAL has a gap here".into(),
                });
            }
        }
    }
    if !present.contains_key(&first.timeline.0) {
        problems.push(Problem {
            key: tidemark_proto::repo::layout::segment_key(first, segment_size),
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
        let present: BTreeMap<u32, Vec<u64>> = [(1, vec![4, 3, 6]), (2, vec![6, 8])].into();
        let keys: Vec<String> = missing_segments(first, &present, size).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["wal/00000001/000000010000000000000005", "wal/00000002/000000020000000000000007"]);
        let from_two = SegmentId { timeline: TimelineId(1), segment_no: 2 };
        assert_eq!(missing_segments(from_two, &present, size).len(), 3);
        assert_eq!(missing_segments(first, &BTreeMap::new(), size).len(), 1);
    }
}
