//! Block-level incremental backups: which files are stored block by block,
//! which blocks changed, and how a file is put back together from a chain
//! of backups (newest first, ending at one that holds the whole file).
//!
//! A block changed since the base backup started if its page LSN is at or
//! past the base's start LSN: every WAL-logged change sets the page LSN to
//! its record's, and the base's checkpoint flushed every change made before
//! its start. Pages PostgreSQL has not initialized yet (`pd_upper` 0, all
//! zeros after an extension) carry no LSN and are always stored. Only the
//! main fork's segments are compared: the visibility map's bits are cleared
//! without touching its page LSN, and the free space map is not WAL-logged,
//! so both (and init forks) are stored whole.

use crate::repo::backup::{BackupFile, BackupManifest, ChunkRef};
use crate::wal::RelFileLocator;
use crate::Lsn;
use std::collections::{BTreeMap, HashMap};

/// PostgreSQL's block size (BLCKSZ), the unit of incremental storage.
pub const BLOCK_SIZE: u64 = 8192;

/// Whether `archive`/`path` is a main-fork segment of a relation: the files
/// an incremental backup stores block by block. `base/<db>/<relfilenode>[.<n>]`
/// and `global/<relfilenode>[.<n>]` in the data directory,
/// `<version directory>/<db>/<relfilenode>[.<n>]` in a tablespace.
pub fn is_block_file(archive: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let name_ok = |name: &str| {
        let mut pieces = name.splitn(2, '.');
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        pieces.next().is_some_and(numeric) && pieces.next().is_none_or(numeric)
    };
    let db_ok = |db: &str| !db.is_empty() && db.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        ["base", db, name] if archive == "base" => db_ok(db) && name_ok(name),
        ["global", name] if archive == "base" => name_ok(name),
        [version, db, name] if archive != "base" => version.starts_with("PG_") && db_ok(db) && name_ok(name),
        _ => false,
    }
}

/// The default tablespace's OID (`base/`) and the shared one's (`global/`).
pub const DEFAULT_TABLESPACE: u32 = 1663;
pub const GLOBAL_TABLESPACE: u32 = 1664;
/// Blocks in one segment file of a relation (RELSEG_SIZE: 1 GB of 8 kB blocks).
pub const SEGMENT_BLOCKS: u32 = 131_072;

/// The relation file and first block of a main-fork segment file (see
/// [`is_block_file`]); `None` for any other file. `archive` is `base` or a
/// tablespace's OID.
pub fn block_file_of(archive: &str, path: &str) -> Option<(RelFileLocator, u32)> {
    if !is_block_file(archive, path) {
        return None;
    }
    let parts: Vec<&str> = path.split('/').collect();
    let (tablespace, database, name) = match parts.as_slice() {
        ["base", db, name] => (DEFAULT_TABLESPACE, db.parse().ok()?, *name),
        ["global", name] => (GLOBAL_TABLESPACE, 0, *name),
        [_, db, name] => (archive.parse().ok()?, db.parse().ok()?, *name),
        _ => return None,
    };
    let (relfilenode, segment) = match name.split_once('.') {
        Some((rel, segment)) => (rel.parse().ok()?, segment.parse::<u32>().ok()?),
        None => (name.parse().ok()?, 0),
    };
    let first_block = segment.checked_mul(SEGMENT_BLOCKS)?;
    Some((RelFileLocator { tablespace, database, relfilenode }, first_block))
}

/// Whether a page read now must be stored in a backup based on one that
/// started at `base_start`. A short page (never sent by PostgreSQL) counts
/// as changed.
pub fn page_changed(page: &[u8], base_start: Lsn) -> bool {
    // PageHeaderData: pd_lsn (xlogid, xrecoff: two native-endian u32), pd_checksum,
    // pd_flags, pd_lower, pd_upper (u16 each). Native is little-endian on
    // every platform Tidemark builds for.
    let (Some(lsn), Some(upper)) = (page.get(0..8), page.get(14..16)) else { return true };
    let word = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    let lsn = (word(lsn.get(0..4).unwrap_or_default()) << 32) | word(lsn.get(4..8).unwrap_or_default());
    word(upper) == 0 || lsn >= base_start.0
}

/// Bytes of one restored file: `len` bytes at `file_offset`, from
/// `chunk_offset` in the chunk's raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub file_offset: u64,
    pub chunk_offset: u64,
    pub len: u64,
}

/// A chunk a restored file needs, and where its bytes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkUse<'a> {
    pub chunk: &'a ChunkRef,
    pub extents: Vec<Extent>,
    /// When the chunk's pages are XORed (`pages_xor`): the block of each of
    /// its pages, whose copy in the chain's whole file undoes the XOR.
    pub xor_blocks: Option<Vec<u64>>,
}

/// The blocks of the stored pages at positions `first..first + count` of a
/// file stored as `ranges`; `None` when the ranges hold fewer pages.
pub fn blocks_at(ranges: &[[u32; 2]], first: u64, count: u64) -> Option<Vec<u64>> {
    let mut out = Vec::with_capacity(usize::try_from(count).ok()?);
    let (end, mut position) = (first.checked_add(count)?, 0u64);
    for &[start, len] in ranges {
        let (start, len) = (u64::from(start), u64::from(len));
        let (from, to) = (first.max(position), end.min(position + len));
        if from < to {
            out.extend((from - position + start)..(to - position + start));
        }
        position += len;
        if position >= end {
            break;
        }
    }
    (out.len() as u64 == count).then_some(out)
}

/// The blocks of the pages in chunk `index` of a file stored by block.
pub fn chunk_blocks(file: &BackupFile, index: usize) -> Result<Vec<u64>, String> {
    let ranges = file.blocks.as_deref().ok_or_else(|| format!("{} is not stored by block", file.path))?;
    let before: u64 = file.chunks.iter().take(index).map(|c| c.raw_len).sum();
    let chunk = file.chunks.get(index).ok_or_else(|| format!("{} has no chunk {index}", file.path))?;
    if !before.is_multiple_of(BLOCK_SIZE) || !chunk.raw_len.is_multiple_of(BLOCK_SIZE) {
        return Err(format!("{}: a chunk of its blocks is not whole pages", file.path));
    }
    blocks_at(ranges, before / BLOCK_SIZE, chunk.raw_len / BLOCK_SIZE)
        .ok_or_else(|| format!("{}: its chunks hold more pages than its ranges", file.path))
}

/// XORs `pages` with `base` in place (both whole pages, the same length):
/// its own inverse, so it both stores and restores a `pages_xor` chunk.
pub fn xor_pages(pages: &mut [u8], base: &[u8]) {
    let (mut words, mut base_words) = (pages.chunks_exact_mut(8), base.chunks_exact(8));
    for (word, other) in (&mut words).zip(&mut base_words) {
        let value = u64::from_ne_bytes(word.try_into().unwrap_or([0; 8]))
            ^ u64::from_ne_bytes(other.try_into().unwrap_or([0; 8]));
        word.copy_from_slice(&value.to_ne_bytes());
    }
    for (byte, other) in words.into_remainder().iter_mut().zip(base_words.remainder()) {
        *byte ^= other;
    }
}

/// Where one layer's bytes are: the chunks' starts, to find a byte's chunk.
struct Layer<'a> {
    file: &'a BackupFile,
    starts: Vec<u64>,
    /// Blocks of the file at this layer (its size in blocks; for the whole
    /// layer, the blocks its size covers completely).
    blocks: u64,
    /// `[first, count]` ranges stored here; `None` for the whole layer.
    ranges: Option<&'a [[u32; 2]]>,
}

impl<'a> Layer<'a> {
    fn new(file: &'a BackupFile) -> Result<Layer<'a>, String> {
        let mut starts = Vec::with_capacity(file.chunks.len());
        let mut at = 0u64;
        for chunk in &file.chunks {
            starts.push(at);
            at = at.checked_add(chunk.raw_len).ok_or("chunk lengths overflow")?;
        }
        let ranges = file.blocks.as_deref();
        if let Some(ranges) = ranges {
            if !file.size.is_multiple_of(BLOCK_SIZE) || file.size / BLOCK_SIZE > u64::from(u32::MAX) {
                return Err(format!("{} is stored by block but its size {} is not whole blocks", file.path, file.size));
            }
            let mut next = 0u64;
            let mut stored = 0u64;
            for &[first, count] in ranges {
                let (first, count) = (u64::from(first), u64::from(count));
                if count == 0 || first < next || first + count > file.size / BLOCK_SIZE {
                    return Err(format!("{} has a block range out of order or past its end", file.path));
                }
                next = first + count;
                stored += count;
            }
            if stored * BLOCK_SIZE != at {
                return Err(format!("{}: its chunks hold {at} bytes for {stored} blocks", file.path));
            }
        } else if at != file.size {
            return Err(format!("{}: its chunks hold {at} bytes, its size is {}", file.path, file.size));
        }
        Ok(Layer { file, starts, blocks: file.size / BLOCK_SIZE, ranges })
    }

    /// The chunk holding byte `offset` of this layer's stored bytes, and the
    /// offset inside it.
    fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let index = self.starts.partition_point(|&s| s <= offset).checked_sub(1)?;
        let start = *self.starts.get(index)?;
        Some((index, offset - start))
    }
}

/// A cursor over one layer's ranges, for blocks asked in ascending order.
#[derive(Default)]
struct Cursor {
    range: usize,
    stored_before: u64,
}

impl Cursor {
    /// The block's position among the layer's stored blocks, if stored there.
    fn find(&mut self, ranges: &[[u32; 2]], block: u64) -> Option<u64> {
        while let Some(&[first, count]) = ranges.get(self.range) {
            let (first, count) = (u64::from(first), u64::from(count));
            if block < first {
                return None;
            }
            if block < first + count {
                return Some(self.stored_before + block - first);
            }
            self.stored_before += count;
            self.range += 1;
        }
        None
    }
}

/// How to write one file of the newest backup of a chain. `layers` is the
/// file in each backup of the chain, newest first, ending at the first that
/// holds it whole (for a file not stored by block, just that one). Each
/// block comes from the newest layer that stored it, so each is written
/// once. Errors name the file when the layers do not add up (a block in no
/// layer, chunk lengths that disagree with the ranges).
pub fn plan_file<'a>(layers: &[&'a BackupFile]) -> Result<Vec<ChunkUse<'a>>, String> {
    let Some((whole, increments)) = layers.split_last() else { return Err("no layers".into()) };
    if whole.blocks.is_some() || increments.iter().any(|f| f.blocks.is_none()) {
        return Err("a chain's file must be stored by block in every backup but its oldest".into());
    }
    let whole_layer = Layer::new(whole)?;
    if increments.is_empty() {
        let uses = whole.chunks.iter().zip(&whole_layer.starts);
        return Ok(uses
            .map(|(chunk, &start)| ChunkUse {
                chunk,
                extents: vec![Extent { file_offset: start, chunk_offset: 0, len: chunk.raw_len }],
                xor_blocks: None,
            })
            .collect());
    }
    let mut layers_: Vec<Layer<'a>> = increments.iter().map(|f| Layer::new(f)).collect::<Result<_, _>>()?;
    layers_.push(whole_layer);
    let newest = layers_.first().ok_or("no layers")?;
    let path = &newest.file.path;
    let mut cursors: Vec<Cursor> = layers_.iter().map(|_| Cursor::default()).collect();
    // (layer, chunk) → extents, in file order within each chunk.
    let mut uses: BTreeMap<(usize, usize), Vec<Extent>> = BTreeMap::new();
    for block in 0..newest.blocks {
        let mut source = None;
        for (index, (layer, cursor)) in layers_.iter().zip(cursors.iter_mut()).enumerate() {
            if block >= layer.blocks {
                break; // truncated away here: older layers' copies are stale
            }
            match layer.ranges {
                Some(ranges) => {
                    if let Some(position) = cursor.find(ranges, block) {
                        source = Some((index, position * BLOCK_SIZE));
                        break;
                    }
                }
                None => {
                    source = Some((index, block * BLOCK_SIZE));
                    break;
                }
            }
        }
        let (index, offset) = source.ok_or_else(|| format!("block {block} of {path} is in no backup of the chain"))?;
        let layer = layers_.get(index).ok_or("no layer")?;
        let (chunk, chunk_offset) = layer.locate(offset).ok_or_else(|| format!("block {block} of {path}: no chunk"))?;
        let extents = uses.entry((index, chunk)).or_default();
        let file_offset = block * BLOCK_SIZE;
        match extents.last_mut() {
            Some(last)
                if last.file_offset + last.len == file_offset && last.chunk_offset + last.len == chunk_offset =>
            {
                last.len += BLOCK_SIZE;
            }
            _ => extents.push(Extent { file_offset, chunk_offset, len: BLOCK_SIZE }),
        }
    }
    let mut out = Vec::with_capacity(uses.len());
    for ((index, chunk_index), extents) in uses {
        let layer = layers_.get(index).ok_or("no layer")?;
        let chunk = layer.file.chunks.get(chunk_index).ok_or("no chunk")?;
        if extents.iter().any(|e| e.chunk_offset + e.len > chunk.raw_len) {
            return Err(format!("{path}: a block reaches past the end of {}", chunk.key));
        }
        let xor_blocks = match layer.file.pages_xor {
            true => Some(chunk_blocks(layer.file, chunk_index)?),
            false => None,
        };
        out.push(ChunkUse { chunk, extents, xor_blocks });
    }
    Ok(out)
}

/// A backup and the backups it is incremental on, newest first, ending at
/// a full backup; with each one's files indexed by archive and path.
pub struct Chain<'a> {
    backups: &'a [BackupManifest],
    index: Vec<HashMap<(&'a str, &'a str), &'a BackupFile>>,
}

impl<'a> Chain<'a> {
    /// Checks that each backup's base is the next one and the last is full.
    pub fn new(backups: &'a [BackupManifest]) -> Result<Chain<'a>, String> {
        let Some(last) = backups.last() else { return Err("an empty chain".into()) };
        if last.base.is_some() {
            return Err(format!("backup {} is incremental but its base is not in the chain", last.id));
        }
        for pair in backups.windows(2) {
            if let [newer, older] = pair {
                if newer.base.as_deref() != Some(older.id.as_str()) {
                    return Err(format!("backup {} is not based on {}", newer.id, older.id));
                }
                if newer.system_identifier != older.system_identifier || newer.start_lsn <= older.start_lsn {
                    return Err(format!(
                        "backup {} cannot be based on {} (another cluster, or later)",
                        newer.id, older.id
                    ));
                }
            }
        }
        let index = backups
            .iter()
            .map(|b| b.files.iter().map(|f| ((f.archive.as_str(), f.path.as_str()), f)).collect())
            .collect();
        Ok(Chain { backups, index })
    }

    /// The newest backup: the one being restored.
    pub fn newest(&self) -> Option<&'a BackupManifest> {
        self.backups.first()
    }

    /// The file in each backup from the newest down to the first that holds
    /// it whole.
    pub fn layers(&self, file: &'a BackupFile) -> Result<Vec<&'a BackupFile>, String> {
        let mut layers = vec![file];
        let mut current = file;
        let mut depth = 0;
        while current.blocks.is_some() {
            depth += 1;
            let older = self.index.get(depth).and_then(|files| files.get(&(file.archive.as_str(), file.path.as_str())));
            let backup = self.backups.get(depth).map(|b| b.id.as_str()).unwrap_or("(none)");
            current =
                older.ok_or_else(|| format!("{} is stored by block but base backup {backup} lacks it", file.path))?;
            layers.push(current);
        }
        Ok(layers)
    }

    /// How to write `file` (of the newest backup): see [`plan_file`].
    pub fn plan(&self, file: &'a BackupFile) -> Result<Vec<ChunkUse<'a>>, String> {
        plan_file(&self.layers(file)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::backup::FileKind;

    fn page(lsn: u64, upper: u16) -> Vec<u8> {
        let mut p = vec![0u8; BLOCK_SIZE as usize];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p[14..16].copy_from_slice(&upper.to_le_bytes());
        p
    }

    #[test]
    fn block_files_are_main_fork_segments_only() {
        for (archive, path) in [
            ("base", "base/5/16384"),
            ("base", "base/5/16384.2"),
            ("base", "global/1262"),
            ("16390", "PG_15_202209061/5/16400"),
        ] {
            assert!(is_block_file(archive, path), "{archive} {path}");
        }
        for (archive, path) in [
            ("base", "base/5/16384_vm"),
            ("base", "base/5/16384_fsm"),
            ("base", "base/5/16384_init"),
            ("base", "base/5/PG_VERSION"),
            ("base", "global/pg_control"),
            ("base", "global/pg_filenode.map"),
            ("base", "pg_xact/0000"),
            ("base", "base/5/16384."),
            ("16390", "PG_15_202209061/5/16400_fsm"),
            ("base", "PG_15_202209061/5/16400"),
        ] {
            assert!(!is_block_file(archive, path), "{archive} {path}");
            assert_eq!(block_file_of(archive, path), None);
        }
        let rel = |tablespace, database, relfilenode| RelFileLocator { tablespace, database, relfilenode };
        assert_eq!(block_file_of("base", "base/5/16384.2"), Some((rel(1663, 5, 16384), 2 * SEGMENT_BLOCKS)));
        assert_eq!(block_file_of("base", "global/1262"), Some((rel(1664, 0, 1262), 0)));
        assert_eq!(block_file_of("16390", "PG_15_202209061/5/16400"), Some((rel(16390, 5, 16400), 0)));
        assert_eq!(block_file_of("base", "base/5/16384.99999"), None);
    }

    #[test]
    fn pages_changed_at_or_after_the_base_start() {
        let base = Lsn(0x1_0000_2000);
        assert!(!page_changed(&page(0x1_0000_1fff, 500), base));
        assert!(page_changed(&page(0x1_0000_2000, 500), base));
        assert!(page_changed(&page(0x2_0000_0000, 500), base));
        assert!(page_changed(&page(0, 0), base), "an uninitialized page");
        assert!(page_changed(&[1, 2, 3], base), "a short page");
    }

    fn chunk(key: &str, len: u64) -> ChunkRef {
        ChunkRef { key: key.into(), raw_len: len, crc32: 0, crc32c: 0, pages_crc32c: None }
    }

    fn file(size_blocks: u64, chunks: Vec<ChunkRef>, blocks: Option<Vec<[u32; 2]>>) -> BackupFile {
        BackupFile {
            archive: "base".into(),
            path: "base/5/16384".into(),
            kind: FileKind::File,
            size: size_blocks * BLOCK_SIZE,
            mode: 0o600,
            mtime_unix: 0,
            link_target: None,
            chunks,
            blocks,
            pages_xor: false,
        }
    }

    /// Which (key, chunk offset) each block of the planned file comes from.
    fn sources(uses: &[ChunkUse<'_>]) -> BTreeMap<u64, (String, u64)> {
        let mut out = BTreeMap::new();
        for u in uses {
            for e in &u.extents {
                for i in 0..e.len / BLOCK_SIZE {
                    let block = e.file_offset / BLOCK_SIZE + i;
                    assert!(out.insert(block, (u.chunk.key.clone(), e.chunk_offset / BLOCK_SIZE + i)).is_none());
                }
            }
        }
        out
    }

    #[test]
    fn each_block_comes_from_the_newest_backup_that_stored_it() {
        let full = file(6, vec![chunk("F0", 4 * BLOCK_SIZE), chunk("F1", 2 * BLOCK_SIZE)], None);
        // Middle: blocks 1 and 4 changed.
        let middle = file(6, vec![chunk("M0", 2 * BLOCK_SIZE)], Some(vec![[1, 1], [4, 1]]));
        // Newest: grew to 8 blocks; 4..8 stored.
        let newest = file(8, vec![chunk("N0", 4 * BLOCK_SIZE)], Some(vec![[4, 4]]));
        let uses = plan_file(&[&newest, &middle, &full]).expect("plan");
        let got = sources(&uses);
        let want: BTreeMap<u64, (String, u64)> = [
            (0, ("F0", 0)),
            (1, ("M0", 0)),
            (2, ("F0", 2)),
            (3, ("F0", 3)),
            (4, ("N0", 0)),
            (5, ("N0", 1)),
            (6, ("N0", 2)),
            (7, ("N0", 3)),
        ]
        .into_iter()
        .map(|(b, (k, o))| (b, (k.to_string(), o)))
        .collect();
        assert_eq!(got, want);
        // Neighbouring blocks of one chunk are one extent.
        let n0 = uses.iter().find(|u| u.chunk.key == "N0").expect("N0");
        assert_eq!(n0.extents, vec![Extent { file_offset: 4 * BLOCK_SIZE, chunk_offset: 0, len: 4 * BLOCK_SIZE }]);
    }

    #[test]
    fn a_truncation_hides_older_copies_of_the_blocks_past_it() {
        let full = file(6, vec![chunk("F0", 6 * BLOCK_SIZE)], None);
        let truncated = file(2, vec![], Some(vec![]));
        // Grew back to 4 blocks but only block 2 stored: block 3 is nowhere.
        let regrown = file(4, vec![chunk("N0", BLOCK_SIZE)], Some(vec![[2, 1]]));
        let err = plan_file(&[&regrown, &truncated, &full]).unwrap_err();
        assert!(err.contains("block 3 of base/5/16384 is in no backup"), "{err}");
        let regrown = file(4, vec![chunk("N0", 2 * BLOCK_SIZE)], Some(vec![[2, 2]]));
        let got = sources(&plan_file(&[&regrown, &truncated, &full]).expect("plan"));
        assert_eq!(got.get(&1), Some(&("F0".to_string(), 1)));
        assert_eq!(got.get(&3), Some(&("N0".to_string(), 1)));
    }

    #[test]
    fn inconsistent_layers_are_refused() {
        let full = file(2, vec![chunk("F0", 2 * BLOCK_SIZE)], None);
        let short = file(2, vec![chunk("N0", BLOCK_SIZE)], Some(vec![[0, 2]]));
        assert!(plan_file(&[&short, &full]).unwrap_err().contains("hold"));
        let overlapping = file(2, vec![chunk("N0", 2 * BLOCK_SIZE)], Some(vec![[0, 1], [0, 1]]));
        assert!(plan_file(&[&overlapping, &full]).is_err());
        let past_end = file(2, vec![chunk("N0", BLOCK_SIZE)], Some(vec![[5, 1]]));
        assert!(plan_file(&[&past_end, &full]).is_err());
        assert!(plan_file(&[&full, &full]).is_err(), "a whole file cannot sit on top");
        assert!(plan_file(&[]).is_err());
    }

    #[test]
    fn a_whole_file_is_its_chunks_in_order() {
        let full = file(3, vec![chunk("F0", 2 * BLOCK_SIZE), chunk("F1", BLOCK_SIZE)], None);
        let uses = plan_file(&[&full]).expect("plan");
        assert_eq!(uses.len(), 2);
        assert_eq!(uses[1].extents, vec![Extent { file_offset: 2 * BLOCK_SIZE, chunk_offset: 0, len: BLOCK_SIZE }]);
    }

    #[test]
    fn stored_positions_map_to_their_blocks() {
        let ranges = [[2, 3], [10, 2], [20, 1]];
        assert_eq!(blocks_at(&ranges, 0, 6), Some(vec![2, 3, 4, 10, 11, 20]));
        assert_eq!(blocks_at(&ranges, 2, 3), Some(vec![4, 10, 11]));
        assert_eq!(blocks_at(&ranges, 5, 1), Some(vec![20]));
        assert_eq!(blocks_at(&ranges, 4, 0), Some(vec![]));
        assert_eq!(blocks_at(&ranges, 5, 2), None, "more pages than the ranges hold");
        assert_eq!(blocks_at(&ranges, u64::MAX, 2), None);
        let mut xored = file(30, vec![chunk("X0", 4 * BLOCK_SIZE), chunk("X1", 2 * BLOCK_SIZE)], Some(ranges.to_vec()));
        assert_eq!(chunk_blocks(&xored, 1), Ok(vec![11, 20]));
        assert!(chunk_blocks(&xored, 2).is_err());
        xored.chunks[0].raw_len = 100;
        assert!(chunk_blocks(&xored, 1).is_err(), "chunks of part pages");
    }

    #[test]
    fn xor_is_its_own_inverse_and_zero_where_pages_agree() {
        let base: Vec<u8> = (0..BLOCK_SIZE + 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut page = base.clone();
        page[100] ^= 0x5a;
        page[BLOCK_SIZE as usize + 1] ^= 1;
        let original = page.clone();
        xor_pages(&mut page, &base);
        let nonzero: Vec<usize> = page.iter().enumerate().filter(|(_, b)| **b != 0).map(|(i, _)| i).collect();
        assert_eq!(nonzero, vec![100, BLOCK_SIZE as usize + 1]);
        xor_pages(&mut page, &base);
        assert_eq!(page, original);
    }

    #[test]
    fn chunks_of_xored_layers_name_the_blocks_of_all_their_pages() {
        let full = file(4, vec![chunk("F", 4 * BLOCK_SIZE)], None);
        let mut inc = file(4, vec![chunk("I0", BLOCK_SIZE), chunk("I1", 2 * BLOCK_SIZE)], Some(vec![[0, 1], [2, 2]]));
        inc.pages_xor = true;
        let uses = plan_file(&[&inc, &full]).expect("plan");
        let xor: Vec<_> = uses.iter().map(|u| (u.chunk.key.as_str(), u.xor_blocks.clone())).collect();
        assert_eq!(xor, vec![("I0", Some(vec![0])), ("I1", Some(vec![2, 3])), ("F", None)]);
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::repo::backup::{FileKind, FORMAT_VERSION, INCREMENTAL_FORMAT_VERSION};
    use crate::TimelineId;

    fn backup(id: &str, base: Option<&str>, start: u64, files: Vec<BackupFile>) -> BackupManifest {
        BackupManifest {
            format_version: if base.is_some() { INCREMENTAL_FORMAT_VERSION } else { FORMAT_VERSION },
            id: id.into(),
            label: id.into(),
            system_identifier: "7".into(),
            server_version_num: 150000,
            timeline: TimelineId(1),
            start_lsn: Lsn(start),
            end_lsn: Lsn(start + 1),
            start_time: String::new(),
            end_time: String::new(),
            tablespaces: vec![],
            files,
            pg_manifest_key: String::new(),
            bytes: 0,
            stored_bytes: 0,
            read_bytes: None,
            base: base.map(str::to_string),
        }
    }

    fn rel(chunk: &str, blocks: Option<Vec<[u32; 2]>>) -> BackupFile {
        let stored: u64 = blocks.as_ref().map_or(2, |r| r.iter().map(|[_, c]| u64::from(*c)).sum());
        BackupFile {
            archive: "base".into(),
            path: "base/5/16384".into(),
            kind: FileKind::File,
            size: 2 * BLOCK_SIZE,
            mode: 0o600,
            mtime_unix: 0,
            link_target: None,
            chunks: vec![ChunkRef {
                key: chunk.into(),
                raw_len: stored * BLOCK_SIZE,
                crc32: 0,
                crc32c: 0,
                pages_crc32c: None,
            }],
            blocks,
            pages_xor: false,
        }
    }

    #[test]
    fn layers_follow_the_bases_to_the_whole_file() {
        let backups = vec![
            backup("C", Some("B"), 30, vec![rel("c", Some(vec![[1, 1]]))]),
            backup("B", Some("A"), 20, vec![rel("b", None)]),
            backup("A", None, 10, vec![rel("a", None)]),
        ];
        let chain = Chain::new(&backups).expect("chain");
        let file = &backups[0].files[0];
        let layers = chain.layers(file).expect("layers");
        assert_eq!(layers.iter().map(|f| f.chunks[0].key.as_str()).collect::<Vec<_>>(), vec!["c", "b"]);
        assert_eq!(chain.plan(file).expect("plan").len(), 2);
    }

    #[test]
    fn broken_chains_are_refused() {
        let only_incremental = vec![backup("C", Some("B"), 30, vec![])];
        assert!(Chain::new(&only_incremental).is_err());
        let wrong_base = vec![backup("C", Some("X"), 30, vec![]), backup("A", None, 10, vec![])];
        assert!(Chain::new(&wrong_base).is_err());
        let later_base = vec![backup("C", Some("A"), 5, vec![]), backup("A", None, 10, vec![])];
        assert!(Chain::new(&later_base).is_err());
        let missing_file =
            vec![backup("C", Some("A"), 30, vec![rel("c", Some(vec![[1, 1]]))]), backup("A", None, 10, vec![])];
        let chain = Chain::new(&missing_file).expect("chain");
        let err = chain.layers(&missing_file[0].files[0]).unwrap_err();
        assert!(err.contains("base backup A lacks it"), "{err}");
    }
}
