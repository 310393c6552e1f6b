//! `wal-get %f %p`, the restore_command.
//!
//! Exit codes follow what PostgreSQL expects of a restore_command:
//! 0 the file was written completely; 1 there is no such file (normal: the
//! server probes for history files and for the segment after the last);
//! 200 anything else, which PostgreSQL treats as fatal (above 125), so a
//! corrupt object or an unreachable repository stops recovery instead of
//! passing for the end of WAL.

use crate::store::{ReadError, RepositoryReader};
use anyhow::Context;
use std::io::Write;
use std::path::Path;
use tidemark_proto::repo::layout::{history_key, partial_segment_key, segment_key};
use tidemark_proto::segment::{SegmentId, WalFileName};

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Written; `partial` when only the durable prefix existed (zero-padded).
    Written {
        bytes: u64,
        partial: bool,
    },
    Missing,
}

pub async fn wal_get(repo: &RepositoryReader, name: &str, destination: &Path) -> Result<Fetched, ReadError> {
    fetch_wal(repo, name, destination, Durability::Fsync).await
}

/// Whether a written WAL file is fsynced. Staged files are not: nothing
/// durable depends on them (a restore that crashes starts over), and an fsync
/// per 16 MiB segment would slow replay down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Fsync,
    PageCache,
}

pub async fn fetch_wal(
    repo: &RepositoryReader,
    name: &str,
    destination: &Path,
    durability: Durability,
) -> Result<Fetched, ReadError> {
    let meta = repo.meta().await?;
    let size = meta.wal_segment_size;
    let file = WalFileName::parse(name, size).map_err(|e| ReadError::Other(e.into()))?;
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
            return Err(ReadError::Corrupt {
                key: name.into(),
                reason: format!("{} bytes, expected {size}", content.len()),
            });
        }
    }
    write_atomically(destination, &content, durability)?;
    Ok(Fetched::Written { bytes: content.len() as u64, partial })
}

/// A segment's bytes: the complete object, or else the partial one (the
/// segment still being filled when it was last archived: its durable prefix,
/// padded with zeros as PostgreSQL pads a new segment, so a reader stops at
/// the last archived record). The flag says it was partial.
pub async fn segment_bytes(
    repo: &RepositoryReader,
    segment: SegmentId,
    size: u64,
) -> Result<Option<(Vec<u8>, bool)>, ReadError> {
    if let Some(content) = repo.get(&segment_key(segment, size)).await? {
        return Ok(Some((content, false)));
    }
    Ok(repo.get(&partial_segment_key(segment, size)).await?.map(|mut prefix| {
        prefix.resize(size as usize, 0);
        (prefix, true)
    }))
}

/// Temp file beside the destination, fsync, rename, fsync the directory:
/// PostgreSQL never sees a half-written file under the name it asked for.
fn write_atomically(destination: &Path, content: &[u8], durability: Durability) -> anyhow::Result<()> {
    let dir = destination.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = destination.file_name().context("destination has no file name")?;
    let temp = dir.join(format!(".{}.tidemark-tmp", file_name.to_string_lossy()));
    let mut file = std::fs::File::create(&temp).with_context(|| format!("create {}", temp.display()))?;
    file.write_all(content).with_context(|| format!("write {}", temp.display()))?;
    if durability == Durability::Fsync {
        file.sync_all().with_context(|| format!("fsync {}", temp.display()))?;
    }
    std::fs::rename(&temp, destination).with_context(|| format!("rename to {}", destination.display()))?;
    if durability == Durability::Fsync {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))?;
    }
    Ok(())
}
