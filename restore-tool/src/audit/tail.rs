//! The audit without the cache: the WAL archived after the last summary,
//! decoded here (tables shown by file number, since only the agent can name
//! them), and time targets resolved from the newest summaries alone.

use anyhow::Context;
use std::collections::BTreeMap;
use tidemark_proto::repo::layout::{ObjectKey, SUMMARIES_PREFIX};
use tidemark_proto::segment::SegmentId;
use tidemark_proto::wal::page::major_for_magic;
use tidemark_proto::wal::summary::{Naming, SegmentSummary, SummaryBuilder};
use tidemark_proto::wal::{self, WalReader};
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::catalog::Catalog;
use tidemark_repo::{RepoError, Repository};

/// Per segment number, the summary on the newest timeline of `lineage`:
/// (timeline, object key), in segment order.
pub(super) async fn summaries_along(
    repo: &Repository,
    lineage: &[TimelineId],
    size: u64,
) -> Result<BTreeMap<u64, (TimelineId, String)>, RepoError> {
    let mut chosen: BTreeMap<u64, (TimelineId, String)> = BTreeMap::new();
    for key in repo.list(SUMMARIES_PREFIX.trim_end_matches('/')).await? {
        let Some(ObjectKey::Summary(segment)) = ObjectKey::parse(&key, size) else { continue };
        if !lineage.contains(&segment.timeline) {
            continue;
        }
        let entry = chosen.entry(segment.segment_no).or_insert((segment.timeline, key.clone()));
        if segment.timeline > entry.0 {
            *entry = (segment.timeline, key);
        }
    }
    Ok(chosen)
}

/// Decodes the archived WAL of the current range from `covered_to` on (the
/// part no summary covers yet) into one summary; `None` if there is none.
pub(super) async fn decode_past(
    repo: &Repository,
    catalog: &Catalog,
    covered_to: Lsn,
    size: u64,
) -> anyhow::Result<Option<SegmentSummary>> {
    let Some(last_range) = catalog.current_range() else { return Ok(None) };
    let mut start = covered_to.max(last_range.start.segment_start(size));
    if start >= last_range.end {
        return Ok(None);
    }
    // Summaries resume at a segment start: a record continued from before is skipped.
    let mut reader = WalReader::new(start, size);
    let mut builder = SummaryBuilder::default();
    let timeline = last_range.timeline;
    while start < last_range.end {
        let segment = SegmentId::containing(timeline, start, size);
        let Some((bytes, _)) = crate::wal_get::segment_bytes(repo, segment, size).await? else { break };
        let Some(major) = bytes.get(..2).and_then(|b| major_for_magic(u16::from_le_bytes([b[0], b[1]]))) else {
            break;
        };
        // Decoding a segment is CPU work: off the async threads.
        (reader, builder) = tokio::task::spawn_blocking(move || {
            reader.feed(&bytes, |raw| {
                if let Ok(record) = wal::decode(raw.lsn, raw.end, raw.bytes, major) {
                    builder.add(&record, major);
                }
            });
            (reader, builder)
        })
        .await
        .context("join the WAL decoder")?;
        start = segment.end_lsn(size);
        if reader.end().is_some() {
            break;
        }
    }
    Ok(Some(builder.finish(timeline.0, covered_to, tail_naming)))
}

/// How the tail names a relation file without the server's catalog: files
/// of the objects initdb made (numbers below 16384, PostgreSQL's
/// FirstNormalObjectId) are system catalogs, which the agent's summaries
/// leave out too, so a transaction reads the same before and after its
/// segment is summarized; others are shown by number.
fn tail_naming(rel: tidemark_proto::wal::record::RelFileLocator) -> Naming {
    if rel.relfilenode < 16384 {
        Naming::Skip
    } else {
        Naming::Unknown
    }
}

/// The transaction ends of a stored summary, without building its changes.
async fn summary_ends(repo: &Repository, key: &str) -> anyhow::Result<Vec<tidemark_proto::wal::summary::End>> {
    #[derive(serde::Deserialize)]
    struct EndsOnly {
        version: u32,
        ends: Vec<tidemark_proto::wal::summary::End>,
    }
    let object = repo.get(key).await?.ok_or_else(|| RepoError::corrupt(key, "listed, then gone"))?;
    let summary: EndsOnly = serde_json::from_slice(&object)
        .map_err(|e| RepoError::Corrupt { key: key.to_string(), reason: e.to_string() })?;
    if summary.version != tidemark_proto::wal::summary::SUMMARY_VERSION {
        return Err(RepoError::Corrupt {
            key: key.to_string(),
            reason: format!("summary version {}", summary.version),
        }
        .into());
    }
    Ok(summary.ends)
}

/// The LSN of the first transaction end (commit or abort, as PostgreSQL's
/// recovery_target_time counts them) after `micros`, found without the
/// cache: the unsummarized tail, then summaries newest first, until two
/// segments with transactions all ended at or before `micros` (one more than
/// commit order needs: commit times are taken just before the record is
/// written, so they are in LSN order to within a moment). Reads only what
/// lies after the target, so a restore to a recent time (the usual case)
/// costs a few summaries, not the whole archive. `None`: nothing ends after it.
///
/// Also returns the newest end at or before `micros` it saw (in the segments
/// it read): evidence that the archive reaches back to the target, which the
/// planner needs when the backup it starts from ended after the target.
pub async fn first_end_after_quick(
    repo: &Repository,
    catalog: &Catalog,
    micros: i64,
) -> anyhow::Result<(Option<Lsn>, Option<Lsn>)> {
    let size = repo.meta().await?.wal_segment_size;
    let chosen = summaries_along(repo, &catalog.lineage(), size).await?;
    let covered_to = Lsn(chosen.keys().next_back().map(|s| (s + 1) * size).unwrap_or(0));
    let mut first: Option<u64> = None;
    let mut before: Option<u64> = None;
    let mut consider = |lsn: u64| first = Some(first.map_or(lsn, |f| f.min(lsn)));
    let mut evidence = |lsn: u64| before = Some(before.map_or(lsn, |b| b.max(lsn)));
    if let Some(tail) = decode_past(repo, catalog, covered_to, size).await? {
        tail.ends.iter().filter(|e| e.time > micros).for_each(|e| consider(e.lsn));
        tail.ends.iter().filter(|e| e.time <= micros).for_each(|e| evidence(e.lsn));
    }
    let mut settled = 0;
    for (_, key) in chosen.values().rev() {
        let ends = summary_ends(repo, key).await?;
        if ends.is_empty() {
            continue;
        }
        let mut any_after = false;
        for end in &ends {
            if end.time > micros {
                consider(end.lsn);
                any_after = true;
            } else {
                evidence(end.lsn);
            }
        }
        if !any_after {
            settled += 1;
            if settled == 2 {
                break;
            }
        }
    }
    Ok((first.map(Lsn), before.map(Lsn)))
}
