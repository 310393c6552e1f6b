//! Staging WAL ahead of replay, so fetching and decompressing overlap with
//! PostgreSQL's redo instead of adding to it.
//!
//! While `restore --start` waits for recovery, this task writes the next
//! segments (complete or zero-padded partial, checked as wal-get checks them)
//! into a staging directory, at most `AHEAD` files at a time. The
//! restore_command (`wal-get --staged DIR`) moves a staged file into place
//! with one rename, and falls back to the repository for anything not staged.

use crate::wal_get::{fetch_wal, Durability, Fetched};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_proto::segment::SegmentId;
use tidemark_repo::Repository;

/// Segments staged ahead of replay at most (bounds the disk used: 16 × 16 MiB).
pub const AHEAD: usize = 16;
/// Downloads in flight.
const PARALLEL: usize = 4;

fn staged_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
        .unwrap_or(0)
}

/// Stages `segments` in order; returns when all are staged, one is missing
/// from the repository (the end of the archive), or an error occurs (wal-get
/// then reads the repository itself and reports it).
pub async fn stage(repo: &Repository, segments: Vec<SegmentId>, segment_size: u64, dir: PathBuf) {
    let fetches = futures::stream::iter(segments.into_iter().map(|segment| {
        let dir = dir.clone();
        async move {
            // Do not run further ahead of replay than AHEAD segments.
            while staged_count(&dir) >= AHEAD {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let name = segment.file_name(segment_size);
            fetch_wal(repo, &name, &dir.join(&name), Durability::PageCache).await
        }
    }))
    .buffered(PARALLEL);
    futures::pin_mut!(fetches);
    while let Some(result) = fetches.next().await {
        match result {
            Ok(Fetched::Written { .. }) => {}
            Ok(Fetched::Missing) | Err(_) => return,
        }
    }
}

/// For wal-get: move a staged copy of `name` to `destination`, if there is one.
pub fn take_staged(dir: &Path, name: &str, destination: &Path) -> bool {
    std::fs::rename(dir.join(name), destination).is_ok()
}
