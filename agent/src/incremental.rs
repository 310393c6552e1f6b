//! Block-level incremental backups, the agent's half: which backup a new
//! one is based on (or why it is full), and which pages of a relation file
//! it stores. The rules for what changed, and how a chain is put back
//! together, are `tidemark_proto::repo::chain`'s.

use tidemark_proto::repo::backup::BackupManifest;
use tidemark_proto::repo::chain::{page_changed, BLOCK_SIZE};
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::catalog::{self, Catalog};
use tidemark_repo::Repository;
use tracing::info;

/// Picks the changed pages of one relation file as its bytes stream past.
pub struct BlockFilter {
    base_start: Lsn,
    /// The file's length in the base backup, in blocks: every block past it is new.
    base_blocks: u64,
    next_block: u64,
    ranges: Vec<[u32; 2]>,
    /// A page split between two pieces of the stream.
    carry: Vec<u8>,
}

impl BlockFilter {
    pub fn new(base_start: Lsn, base_size: u64) -> BlockFilter {
        BlockFilter {
            base_start,
            base_blocks: base_size / BLOCK_SIZE,
            next_block: 0,
            ranges: Vec::new(),
            carry: Vec::new(),
        }
    }

    /// Appends the pages of `bytes` that must be stored to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) {
        let page_size = BLOCK_SIZE as usize;
        if !self.carry.is_empty() {
            let take = (page_size - self.carry.len()).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.carry.extend_from_slice(head);
            bytes = rest;
            if self.carry.len() == page_size {
                let page = std::mem::take(&mut self.carry);
                self.page(&page, out);
            }
        }
        for page in bytes.chunks(page_size) {
            if page.len() == page_size {
                self.page(page, out);
            } else {
                self.carry.extend_from_slice(page);
            }
        }
    }

    fn page(&mut self, page: &[u8], out: &mut Vec<u8>) {
        let block = self.next_block;
        self.next_block += 1;
        if block < self.base_blocks && !page_changed(page, self.base_start) {
            return;
        }
        out.extend_from_slice(page);
        // Files are at most 2^32 blocks (their size was checked); ranges grow in order.
        let block = block as u32;
        match self.ranges.last_mut() {
            Some([first, count]) if *first + *count == block => *count += 1,
            _ => self.ranges.push([block, 1]),
        }
    }

    /// The ranges of the pages stored so far.
    pub fn ranges(&self) -> &[[u32; 2]] {
        &self.ranges
    }

    /// The stored ranges, and how many blocks the file had.
    pub fn finish(self) -> anyhow::Result<(Vec<[u32; 2]>, u64)> {
        anyhow::ensure!(self.carry.is_empty(), "a relation file ended inside a block");
        Ok((self.ranges, self.next_block))
    }
}

/// Why the next backup cannot be incremental on `previous`, or `Ok` when it
/// can. `increments` counts the incremental backups in `previous`'s chain.
pub fn refusal(
    previous: Option<&BackupManifest>,
    increments: usize,
    max_chain: u32,
    full_asked: bool,
    server_version_num: u32,
    timeline: TimelineId,
) -> Result<(), String> {
    let Some(previous) = previous else { return Err("the repository has no backup yet".into()) };
    if full_asked {
        return Err("--full was given".into());
    }
    if max_chain == 0 {
        return Err("max_incremental_chain is 0".into());
    }
    if increments >= max_chain as usize {
        return Err(format!(
            "backup {} ends a chain of {increments} incremental backups (max_incremental_chain)",
            previous.id
        ));
    }
    if previous.server_version_num / 10000 != server_version_num / 10000 {
        return Err(format!("backup {} is of another PostgreSQL major version", previous.id));
    }
    if previous.timeline != timeline {
        return Err(format!("the server is on timeline {timeline}, backup {} on {}", previous.id, previous.timeline));
    }
    Ok(())
}

/// Whether the archive shows a hole in the WAL after `base`'s start on its
/// timeline, or a later timeline: what a WAL-derived block map could not
/// cover, and a sign that something happened to the cluster that page LSNs
/// could hide (a restore to an earlier point starts a new timeline). WAL
/// not archived yet (the agent behind, or not running) is no hole: nothing
/// is known to be missing, and the page LSNs decide alone.
pub fn wal_since(base: &BackupManifest, catalog: &Catalog) -> Result<(), String> {
    if let Some(newer) = catalog.timelines.iter().find(|t| t.timeline > base.timeline) {
        return Err(format!("timeline {} began after backup {}", newer.timeline, base.id));
    }
    let on_timeline: Vec<_> = catalog.ranges.iter().filter(|r| r.timeline == base.timeline).collect();
    let covering = on_timeline.iter().find(|r| r.start <= base.start_lsn && base.start_lsn <= r.end);
    let archived_from = covering.map_or(base.start_lsn, |r| r.end);
    match on_timeline.iter().filter(|r| r.start > archived_from).map(|r| r.start).min() {
        Some(next) => {
            Err(format!("the archived WAL has a hole from {archived_from} to {next} since backup {}", base.id))
        }
        None => Ok(()),
    }
}

/// The backup the next one is incremental on, or `None` for a full backup
/// (the reason is logged).
pub async fn choose_base(
    repo: &Repository,
    previous: Option<&BackupManifest>,
    max_chain: u32,
    full_asked: bool,
    server_version_num: u32,
    timeline: TimelineId,
) -> anyhow::Result<Option<BackupManifest>> {
    let increments = match previous {
        Some(p) if p.base.is_some() => catalog::read_chain(repo, p).await.map(|c| c.len() - 1),
        _ => Ok(0),
    };
    let decision = match increments {
        Err(e) => Err(format!("the chain of backup {} cannot be read: {e}", previous.map_or("", |p| p.id.as_str()))),
        Ok(increments) => refusal(previous, increments, max_chain, full_asked, server_version_num, timeline),
    };
    let decision = match (decision, previous) {
        (Ok(()), Some(previous)) => wal_since(previous, &Catalog::load(repo).await?).map(|()| previous),
        (Err(reason), _) => Err(reason),
        (Ok(()), None) => Err("no previous backup".into()),
    };
    match decision {
        Ok(base) => {
            info!(base = %base.id, "incremental backup: storing only the blocks changed since {}", base.start_lsn);
            Ok(Some(base.clone()))
        }
        Err(reason) => {
            info!("full backup: {reason}");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(lsn: u64, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; BLOCK_SIZE as usize];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p[14..16].copy_from_slice(&100u16.to_le_bytes());
        p
    }

    #[test]
    fn changed_and_new_pages_are_kept_whatever_the_pieces() {
        let base_start = Lsn(1000);
        // Blocks 0 (old), 1 (changed), 2 (old), 3 (past the base's end, old LSN).
        let file: Vec<u8> = [page(10, 1), page(2000, 2), page(20, 3), page(30, 4)].concat();
        for piece in [1usize, 100, 8192, 9000, 40000] {
            let mut filter = BlockFilter::new(base_start, 3 * BLOCK_SIZE);
            let mut out = Vec::new();
            for bytes in file.chunks(piece) {
                filter.feed(bytes, &mut out);
            }
            let (ranges, blocks) = filter.finish().expect("whole blocks");
            assert_eq!((ranges, blocks), (vec![[1, 1], [3, 1]], 4), "pieces of {piece}");
            assert_eq!(out, [page(2000, 2), page(30, 4)].concat());
        }
        let mut torn = BlockFilter::new(base_start, 0);
        torn.feed(&[0; 100], &mut Vec::new());
        assert!(torn.finish().is_err());
    }

    fn manifest(timeline: u32, version: u32) -> BackupManifest {
        let text = format!(
            r#"{{"format_version":1,"id":"A","label":"","system_identifier":"1","server_version_num":{version},
            "timeline":{timeline},"start_lsn":"0/3000000","end_lsn":"0/3000100","start_time":"","end_time":"",
            "tablespaces":[],"files":[],"pg_manifest_key":"","bytes":0,"stored_bytes":0}}"#
        );
        BackupManifest::from_json(text.as_bytes()).expect("manifest")
    }

    #[test]
    fn full_when_asked_first_too_long_or_across_versions_and_timelines() {
        let m = manifest(1, 150004);
        assert!(refusal(Some(&m), 0, 7, false, 150010, TimelineId(1)).is_ok());
        assert!(refusal(None, 0, 7, false, 150010, TimelineId(1)).unwrap_err().contains("no backup"));
        assert!(refusal(Some(&m), 0, 7, true, 150010, TimelineId(1)).unwrap_err().contains("--full"));
        assert!(refusal(Some(&m), 0, 0, false, 150010, TimelineId(1)).is_err());
        assert!(refusal(Some(&m), 6, 7, false, 150010, TimelineId(1)).is_ok());
        assert!(refusal(Some(&m), 7, 7, false, 150010, TimelineId(1)).unwrap_err().contains("chain of 7"));
        assert!(refusal(Some(&m), 0, 7, false, 160000, TimelineId(1)).unwrap_err().contains("major"));
        assert!(refusal(Some(&m), 0, 7, false, 150010, TimelineId(2)).unwrap_err().contains("timeline 2"));
    }

    #[test]
    fn full_after_a_hole_or_a_new_timeline() {
        use tidemark_repo::catalog::{TimelineInfo, WalRange};
        let base = manifest(1, 150000);
        let range = |t: u32, s: u64, e: u64| WalRange { timeline: TimelineId(t), start: Lsn(s), end: Lsn(e) };
        let one = TimelineInfo { timeline: TimelineId(1), parent: None, switch_lsn: None, ancestors: vec![] };
        let mut catalog = Catalog {
            restorable: vec![],
            waiting: vec![],
            ranges: vec![range(1, 0x1000000, 0x6000000)],
            timelines: vec![one.clone()],
        };
        assert!(wal_since(&base, &catalog).is_ok());
        catalog.ranges.push(range(1, 0x8000000, 0x9000000));
        assert!(wal_since(&base, &catalog).unwrap_err().contains("hole from 0/6000000 to 0/8000000"));
        // The base's start is missing but later WAL is there: a hole.
        catalog.ranges = vec![range(1, 0x4000000, 0x6000000)];
        assert!(wal_since(&base, &catalog).unwrap_err().contains("hole from 0/3000000 to 0/4000000"));
        // Nothing archived since before the base: not yet, not a hole.
        catalog.ranges = vec![range(1, 0x1000000, 0x2000000)];
        assert!(wal_since(&base, &catalog).is_ok());
        catalog.ranges = vec![range(1, 0x1000000, 0x6000000)];
        catalog.timelines.push(TimelineInfo { timeline: TimelineId(2), parent: Some(TimelineId(1)), ..one });
        assert!(wal_since(&base, &catalog).unwrap_err().contains("timeline 2"));
    }
}
