//! `wal-get %f %p`, the restore_command.
//!
//! Exit codes follow what PostgreSQL expects of a restore_command:
//! 0 the file was written completely; 1 there is no such file (normal: the
//! server probes for history files and for the segment after the last);
//! 200 anything else, which PostgreSQL treats as fatal (above 125), so a
//! corrupt object or an unreachable repository stops recovery instead of
//! passing for the end of WAL.

use anyhow::Context;
use std::path::Path;
use tidemark_proto::repo::layout::{history_key, segment_key};
use tidemark_proto::segment::{SegmentId, WalFileName};
use tidemark_repo::durable::write_atomically;
pub use tidemark_repo::durable::Durability;
use tidemark_repo::{Fail, RepoError, Repository};

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Written; `partial` when only the durable prefix existed (zero-padded).
    Written {
        bytes: u64,
        partial: bool,
    },
    Missing,
}

pub async fn wal_get(repo: &Repository, name: &str, destination: &Path) -> anyhow::Result<Fetched> {
    fetch_wal(repo, name, destination, Durability::Fsync).await
}

pub async fn fetch_wal(
    repo: &Repository,
    name: &str,
    destination: &Path,
    durability: Durability,
) -> anyhow::Result<Fetched> {
    let meta = repo.meta().await?;
    let size = meta.wal_segment_size;
    let file = WalFileName::parse(name, size).map_err(|e| {
        Fail::new(e.to_string(), "wal-get takes the %f PostgreSQL gives: a segment or history file name")
    })?;
    let (content, partial) = match file {
        WalFileName::History(timeline) => match repo.get(&history_key(timeline)).await? {
            Some(content) => (content, false),
            None => return Ok(Fetched::Missing),
        },
        WalFileName::Segment(segment) => match segment_bytes(repo, segment, size).await? {
            Some(found) => found,
            None => return Ok(Fetched::Missing),
        },
    };
    if let WalFileName::Segment(_) = file {
        if content.len() as u64 != size {
            return Err(RepoError::Corrupt {
                key: name.into(),
                reason: format!("{} bytes, expected {size}", content.len()),
            }
            .into());
        }
    }
    write_atomically(destination, &content, durability).with_context(|| format!("write {}", destination.display()))?;
    Ok(Fetched::Written { bytes: content.len() as u64, partial })
}

/// A segment's bytes: the complete object, or else the partial one (the
/// segment still being filled when it was last archived: its durable prefix,
/// padded with zeros as PostgreSQL pads a new segment, so a reader stops at
/// the last archived record). The flag says it was partial.
pub async fn segment_bytes(
    repo: &Repository,
    segment: SegmentId,
    size: u64,
) -> Result<Option<(Vec<u8>, bool)>, RepoError> {
    if let Some(content) = repo.get(&segment_key(segment, size)).await? {
        return Ok(Some((content, false)));
    }
    Ok(tidemark_repo::partial::read_prefix(repo, segment, size).await?.map(|mut prefix| {
        prefix.resize(size as usize, 0);
        (prefix, true)
    }))
}
