//! Which relation blocks the WAL changed: the map an incremental backup of
//! PostgreSQL 13–16 reads by (only the blocks it names, over SQL).
//!
//! Every WAL-logged change to a relation page carries a block reference
//! (tablespace, database, file number, fork, block), so the union of the
//! references of the records between two backups' start positions names
//! every main-fork page that differs between them. What changes files
//! without block references is recorded apart: a relation file created
//! (`XLOG_SMGR_CREATE`: every block counts as changed) or truncated
//! (`XLOG_SMGR_TRUNCATE`: every block from the new length on), and a
//! database created or dropped (CREATE DATABASE … FILE_COPY copies files
//! without logging their blocks: every file of the database counts as
//! changed). Only the main fork is mapped: the other forks are stored whole
//! (the visibility map's bits are cleared by heap records that do not
//! reference its page). A segment with a record the decoder could not take
//! apart has no map, and a backup that needs it reads whole files.
//!
//! Facts from PostgreSQL's catalog/storage_xlog.h and commands/dbcommands_xlog.h.

use super::page::u32_at;
use super::record::{Record, RelFileLocator};
use super::rmgr::RM_SMGR;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

const RM_DBASE: u8 = 4;
const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
/// `SMGR_TRUNCATE_HEAP`: the truncation includes the main fork.
const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
const MAIN_FORK: u8 = 0;

/// The blocks one segment's records changed. Stored in its summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// One entry per relation file (main fork), ordered by file.
    pub files: Vec<FileBlocks>,
    /// Databases created or dropped: every file in them counts as changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileBlocks {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
    /// Every block from this one on counts as changed (the file was created
    /// or truncated to this length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// Changed blocks of the relation (over all its 1 GB segments) as
    /// `[first, count]` ranges, ascending and apart.
    pub ranges: Vec<[u32; 2]>,
}

/// Collects the map of one segment as its records are decoded.
#[derive(Default)]
pub struct BlockMapBuilder {
    files: FxHashMap<RelFileLocator, (Option<u32>, Vec<u32>)>,
    databases: FxHashSet<u32>,
    incomplete: bool,
}

impl BlockMapBuilder {
    pub fn add(&mut self, record: &Record<'_>) {
        for block in record.blocks.iter().filter(|b| b.fork == MAIN_FORK) {
            self.files.entry(block.rel).or_default().1.push(block.block);
        }
        let data = record.main_data;
        match (record.rmid, record.rmgr_info()) {
            (RM_SMGR, XLOG_SMGR_CREATE) => match (RelFileLocator::parse(data, 0), u32_at(data, 12)) {
                (Some(rel), Some(fork)) if fork == u32::from(MAIN_FORK) => self.from(rel, 0),
                (Some(_), Some(_)) => {}
                _ => self.incomplete = true,
            },
            (RM_SMGR, XLOG_SMGR_TRUNCATE) => {
                match (u32_at(data, 0), RelFileLocator::parse(data, 4), u32_at(data, 16)) {
                    (Some(length), Some(rel), Some(flags)) if flags & SMGR_TRUNCATE_HEAP != 0 => self.from(rel, length),
                    (Some(_), Some(_), Some(_)) => {}
                    _ => self.incomplete = true,
                }
            }
            // Every dbase record (create by copy or by WAL, drop) starts with the database's OID.
            (RM_DBASE, _) => match u32_at(data, 0) {
                Some(db) => {
                    self.databases.insert(db);
                }
                None => self.incomplete = true,
            },
            _ => {}
        }
    }

    fn from(&mut self, rel: RelFileLocator, block: u32) {
        let from = &mut self.files.entry(rel).or_default().0;
        *from = Some(from.map_or(block, |old| old.min(block)));
    }

    /// A record in this segment could not be decoded: the map would miss its blocks.
    pub fn mark_incomplete(&mut self) {
        self.incomplete = true;
    }

    /// The map, or `None` when it is incomplete.
    pub fn finish(self) -> Option<ChangedBlocks> {
        if self.incomplete {
            return None;
        }
        let mut files: Vec<FileBlocks> = self
            .files
            .into_iter()
            .map(|(rel, (from, mut blocks))| {
                blocks.sort_unstable();
                blocks.dedup();
                FileBlocks {
                    spc: rel.tablespace,
                    db: rel.database,
                    rel: rel.relfilenode,
                    from,
                    ranges: ranges_of(blocks.into_iter()),
                }
            })
            .collect();
        files.sort_by_key(|f| (f.spc, f.db, f.rel));
        let mut databases: Vec<u32> = self.databases.into_iter().collect();
        databases.sort_unstable();
        Some(ChangedBlocks { files, databases })
    }
}

/// Ascending block numbers as `[first, count]` ranges.
fn ranges_of(blocks: impl Iterator<Item = u32>) -> Vec<[u32; 2]> {
    let mut ranges: Vec<[u32; 2]> = Vec::new();
    for block in blocks {
        match ranges.last_mut() {
            Some([first, count]) if u64::from(*first) + u64::from(*count) == u64::from(block) => *count += 1,
            _ => ranges.push([block, 1]),
        }
    }
    ranges
}

/// Per relation file: the block from which all count as changed, and ranges.
type FileChanges = (Option<u32>, Vec<[u32; 2]>);

/// What changed over a stretch of WAL: the union of its segments' maps.
/// Ranges are kept as ranges (a map read from the repository may name a
/// whole relation in one), and merged per file when asked.
#[derive(Default, Debug)]
pub struct ChangedSince {
    files: FxHashMap<(u32, u32, u32), FileChanges>,
    databases: FxHashSet<u32>,
}

/// How much of a relation segment file an incremental backup must read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reads {
    /// Every block: the file's history is not known block by block.
    Whole,
    /// These ranges of the file's blocks (`[first, count]`, ascending,
    /// within the file); the others are the base's.
    Blocks(Vec<[u32; 2]>),
}

impl ChangedSince {
    pub fn add(&mut self, map: &ChangedBlocks) {
        for file in &map.files {
            let entry = self.files.entry((file.spc, file.db, file.rel)).or_default();
            if let Some(from) = file.from {
                entry.0 = Some(entry.0.map_or(from, |old| old.min(from)));
            }
            entry.1.extend(file.ranges.iter().filter(|[_, count]| *count > 0));
        }
        self.databases.extend(map.databases.iter().copied());
    }

    /// Which blocks of one segment file of a relation's main fork to read:
    /// the file holds relation blocks `first_block..first_block + blocks`,
    /// of which the base has the first `base_blocks` (of the file).
    pub fn reads(&self, rel: RelFileLocator, first_block: u32, blocks: u32, base_blocks: u32) -> Reads {
        if self.databases.contains(&rel.database) {
            return Reads::Whole;
        }
        let (start, end) = (u64::from(first_block), u64::from(first_block) + u64::from(blocks));
        // Half-open spans of file-relative blocks.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        if let Some((from, changed)) = self.files.get(&(rel.tablespace, rel.database, rel.relfilenode)) {
            if from.is_some_and(|from| u64::from(from) <= start) {
                return Reads::Whole;
            }
            for &[first, count] in changed {
                let (a, b) = (u64::from(first).max(start), (u64::from(first) + u64::from(count)).min(end));
                if a < b {
                    spans.push((a - start, b - start));
                }
            }
            if let Some(from) = *from {
                spans.push((u64::from(from).max(start) - start, u64::from(blocks)));
            }
        }
        // Blocks past the base's length of the file are new to the chain.
        spans.push((u64::from(base_blocks.min(blocks)), u64::from(blocks)));
        spans.retain(|(a, b)| a < b);
        spans.sort_unstable();
        let mut ranges: Vec<[u32; 2]> = Vec::new();
        let mut current: Option<(u64, u64)> = None;
        for (a, b) in spans {
            current = match current {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    ranges.push(range(ca, cb));
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((a, b)) = current {
            ranges.push(range(a, b));
        }
        Reads::Blocks(ranges)
    }
}

/// How many blocks of `ranges` (ascending `[first, count]`) are not in
/// `of` (the same form), and the first of them: where a file read whole
/// has pages whose LSNs say they changed but the WAL map did not name.
pub fn blocks_not_in(ranges: &[[u32; 2]], of: &[[u32; 2]]) -> (u64, Option<u32>) {
    let (mut missing, mut first, mut next) = (0u64, None, 0usize);
    for &[start, count] in ranges {
        let (mut at, end) = (u64::from(start), u64::from(start) + u64::from(count));
        while at < end {
            // Skip the ranges of `of` that end at or before `at`.
            while of.get(next).is_some_and(|&[s, c]| u64::from(s) + u64::from(c) <= at) {
                next += 1;
            }
            let covered = of.get(next).map(|&[s, c]| (u64::from(s), u64::from(s) + u64::from(c)));
            let gap_end = match covered {
                Some((s, e)) if s <= at => {
                    at = e.min(end);
                    continue;
                }
                Some((s, _)) => s.min(end),
                None => end,
            };
            missing += gap_end - at;
            first = first.or(u32::try_from(at).ok());
            at = gap_end;
        }
    }
    (missing, first)
}

/// `[first, count]` of a span within one file (both below 2^32: spans are clipped to the file).
fn range(a: u64, b: u64) -> [u32; 2] {
    [u32::try_from(a).unwrap_or(u32::MAX), u32::try_from(b - a).unwrap_or(u32::MAX)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_outside_the_map_are_counted() {
        assert_eq!(blocks_not_in(&[[0, 10]], &[[0, 10]]), (0, None));
        assert_eq!(blocks_not_in(&[[0, 10]], &[[2, 3], [7, 1]]), (6, Some(0)));
        assert_eq!(blocks_not_in(&[[5, 2], [20, 4]], &[[0, 6], [21, 1], [30, 2]]), (4, Some(6)));
        assert_eq!(blocks_not_in(&[], &[[1, 1]]), (0, None));
        assert_eq!(blocks_not_in(&[[u32::MAX - 1, 1]], &[]), (1, Some(u32::MAX - 1)));
    }
    use crate::wal::record::BlockRef;
    use crate::Lsn;

    const REL: RelFileLocator = RelFileLocator { tablespace: 1663, database: 5, relfilenode: 16384 };

    fn record<'a>(rmid: u8, info: u8, blocks: Vec<BlockRef>, main_data: &'a [u8]) -> Record<'a> {
        Record {
            lsn: Lsn(0x100),
            end: Lsn(0x200),
            total_len: 0,
            xid: 0,
            previous: Lsn(0),
            info,
            rmid,
            blocks,
            main_data,
            origin: None,
            toplevel_xid: None,
        }
    }

    fn block(rel: RelFileLocator, fork: u8, block: u32) -> BlockRef {
        BlockRef { id: 0, fork, flags: 0, rel, block, image: None, data_len: 0 }
    }

    fn locator_bytes(rel: RelFileLocator) -> Vec<u8> {
        [rel.tablespace, rel.database, rel.relfilenode].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn block_references_of_the_main_fork_become_ranges() {
        let mut builder = BlockMapBuilder::default();
        let refs = vec![block(REL, 0, 7), block(REL, 0, 5), block(REL, 2, 0), block(REL, 0, 6), block(REL, 0, 9)];
        builder.add(&record(10, 0, refs, &[]));
        builder.add(&record(10, 0, vec![block(REL, 0, 6)], &[]));
        let map = builder.finish().expect("complete");
        assert_eq!(map.files.len(), 1);
        assert_eq!(map.files[0].ranges, vec![[5, 3], [9, 1]]);
        assert_eq!(map.files[0].from, None);
    }

    #[test]
    fn creations_truncations_and_databases_count_everything_after_them() {
        let mut builder = BlockMapBuilder::default();
        let mut create = locator_bytes(REL);
        create.extend(0u32.to_le_bytes());
        builder.add(&record(RM_SMGR, XLOG_SMGR_CREATE, vec![], &create));
        let other = RelFileLocator { relfilenode: 16390, ..REL };
        let mut truncate = 40u32.to_le_bytes().to_vec();
        truncate.extend(locator_bytes(other));
        truncate.extend(SMGR_TRUNCATE_HEAP.to_le_bytes());
        builder.add(&record(RM_SMGR, XLOG_SMGR_TRUNCATE, vec![], &truncate));
        builder.add(&record(RM_DBASE, 0x00, vec![], &77u32.to_le_bytes()));
        let map = builder.finish().expect("complete");
        assert_eq!(map.files.iter().map(|f| f.from).collect::<Vec<_>>(), vec![Some(0), Some(40)]);
        assert_eq!(map.databases, vec![77]);

        let mut since = ChangedSince::default();
        since.add(&map);
        assert_eq!(since.reads(REL, 0, 10, 10), Reads::Whole);
        assert_eq!(since.reads(other, 0, 50, 50), Reads::Blocks(vec![[40, 10]]));
        let in_77 = RelFileLocator { database: 77, ..other };
        assert_eq!(since.reads(in_77, 0, 3, 3), Reads::Whole);
    }

    #[test]
    fn a_record_cut_short_leaves_no_map() {
        let mut builder = BlockMapBuilder::default();
        builder.add(&record(RM_SMGR, XLOG_SMGR_TRUNCATE, vec![], &[1, 2, 3]));
        assert!(builder.finish().is_none());
        let mut builder = BlockMapBuilder::default();
        builder.mark_incomplete();
        assert!(builder.finish().is_none());
    }

    #[test]
    fn reads_of_one_segment_file_are_within_it_and_include_new_blocks() {
        let mut first = BlockMapBuilder::default();
        first.add(&record(10, 0, vec![block(REL, 0, 3), block(REL, 0, 131_072 + 2)], &[]));
        let mut second = BlockMapBuilder::default();
        second.add(&record(10, 0, vec![block(REL, 0, 4), block(REL, 0, 131_072 + 100)], &[]));
        let mut since = ChangedSince::default();
        since.add(&first.finish().expect("complete"));
        since.add(&second.finish().expect("complete"));
        // The first segment file: blocks 3 and 4; the base had all 131072.
        assert_eq!(since.reads(REL, 0, 131_072, 131_072), Reads::Blocks(vec![[3, 2]]));
        // The second, which grew from 50 to 120 blocks since the base.
        assert_eq!(since.reads(REL, 131_072, 120, 50), Reads::Blocks(vec![[2, 1], [50, 70]]));
        // A file the map never names: only what is new.
        let other = RelFileLocator { relfilenode: 1, ..REL };
        assert_eq!(since.reads(other, 0, 8, 8), Reads::Blocks(vec![]));
        assert_eq!(since.reads(other, 0, 8, 6), Reads::Blocks(vec![[6, 2]]));
    }

    #[test]
    fn ranges_from_the_repository_are_clipped_to_the_file_never_expanded() {
        // A map naming every block of a relation, and overlapping ranges.
        let everything =
            FileBlocks { spc: 1663, db: 5, rel: 16384, from: None, ranges: vec![[0, u32::MAX], [5, 3], [u32::MAX, 1]] };
        let mut since = ChangedSince::default();
        since.add(&ChangedBlocks { files: vec![everything], databases: vec![] });
        assert_eq!(since.reads(REL, 131_072, 10, 10), Reads::Blocks(vec![[0, 10]]));
        assert_eq!(since.reads(REL, u32::MAX - 4, 4, 4), Reads::Blocks(vec![[0, 4]]));
    }
}
