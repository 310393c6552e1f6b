//! The `INCREMENTAL.<name>` files PostgreSQL 17+ sends in place of a
//! relation segment when BASE_BACKUP runs with `INCREMENTAL` (after
//! `UPLOAD_MANIFEST` of the backup it is based on), turned into Tidemark's
//! block ranges as their bytes stream past.
//!
//! The format (PostgreSQL's `basebackup.c`, `sendFile`): three native-endian
//! (little-endian here) u32 — magic `0xd3ae1f0d`, the number of blocks n,
//! the truncation block length — then n ascending block numbers relative to
//! the segment, then (from 18, whenever n > 0) zero padding to a multiple
//! of BLCKSZ, then the n blocks in that order. Which of the two header
//! layouts a file uses is told by its size, known from the tar header.
//!
//! What the reconstructed segment holds (pg_combinebackup's rule): a listed
//! block comes from this file; an unlisted block below the truncation block
//! length comes from the base; an unlisted block at or past it, up to the
//! last listed one, is zeros. A Tidemark chain takes an unlisted block from
//! the base only when the base has it: so zero blocks (and any block the
//! base's file is too short to hold, such as pages a bulk extension left
//! unwritten) are stored here as zero pages, and no block is ever missing.

use crate::repo::chain::BLOCK_SIZE;

/// PostgreSQL's INCREMENTAL_MAGIC.
pub const MAGIC: u32 = 0xd3ae_1f0d;
/// Blocks in a 1 GiB segment (RELSEG_SIZE): no file lists more.
pub const SEGMENT_BLOCKS: u32 = 131_072;
const PREFIX: &str = "INCREMENTAL.";

/// The path an incremental file stands for (`base/5/INCREMENTAL.16384.1` →
/// `base/5/16384.1`), or `None` when `path` is no incremental file.
pub fn target_path(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let rest = name.strip_prefix(PREFIX).filter(|rest| !rest.is_empty())?;
    Some(match dir {
        Some(dir) => format!("{dir}/{rest}"),
        None => rest.to_string(),
    })
}

/// An incremental backup's backup_label without the two lines that make
/// PostgreSQL refuse to start from it (`INCREMENTAL FROM LSN:` and
/// `INCREMENTAL FROM TLI:`), as pg_combinebackup writes it.
pub fn combined_backup_label(label: &[u8]) -> Vec<u8> {
    label
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| !line.starts_with(b"INCREMENTAL FROM "))
        .flatten()
        .copied()
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IncrementalFileError {
    #[error("incremental file {0}: bad magic number")]
    Magic(String),
    #[error("incremental file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Reads one incremental file of `entry_size` bytes and appends the pages
/// to store to `out`, as `BlockFilter` does for a whole file.
pub struct IncrementalFile {
    path: String,
    entry_size: u64,
    /// Blocks of the base backup's file (the newest layer that has it).
    base_blocks: u64,
    header: Vec<u8>,
    /// Set once the whole header (and its padding) is read.
    listed: Option<Listed>,
    /// A page split between two pieces of the stream.
    carry: Vec<u8>,
    ranges: Vec<[u32; 2]>,
}

struct Listed {
    blocks: Vec<u32>,
    truncation: u32,
    /// The padding still to skip after the block numbers.
    padding_left: u64,
    /// The next block number (of `blocks`) whose page arrives.
    next: usize,
    /// The first block not yet accounted for in `ranges`.
    written_to: u64,
}

impl IncrementalFile {
    pub fn new(path: &str, entry_size: u64, base_size: u64) -> IncrementalFile {
        IncrementalFile {
            path: path.to_string(),
            entry_size,
            base_blocks: base_size / BLOCK_SIZE,
            header: Vec::new(),
            listed: None,
            carry: Vec::new(),
            ranges: Vec::new(),
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> IncrementalFileError {
        IncrementalFileError::Invalid { path: self.path.clone(), reason: reason.into() }
    }

    /// Takes the next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), IncrementalFileError> {
        let page_size = BLOCK_SIZE as usize;
        while !bytes.is_empty() {
            let Some(listed) = self.listed.as_mut() else {
                bytes = self.read_header(bytes)?;
                continue;
            };
            if listed.padding_left > 0 {
                let skip = usize::try_from(listed.padding_left).unwrap_or(usize::MAX).min(bytes.len());
                listed.padding_left -= skip as u64;
                bytes = bytes.get(skip..).unwrap_or_default();
                continue;
            }
            let take = (page_size - self.carry.len()).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            bytes = rest;
            if self.carry.is_empty() && head.len() == page_size {
                self.page(head, out)?;
            } else {
                self.carry.extend_from_slice(head);
                if self.carry.len() == page_size {
                    let page = std::mem::take(&mut self.carry);
                    self.page(&page, out)?;
                }
            }
        }
        Ok(())
    }

    /// The header's length so far known: 12 bytes, then the block numbers.
    fn header_wanted(&self) -> Result<usize, IncrementalFileError> {
        let Some(count) = self.header.get(4..8) else { return Ok(12) };
        let count = le_u32(count);
        if count > SEGMENT_BLOCKS {
            return Err(self.invalid(format!("lists {count} blocks, more than a segment has")));
        }
        Ok(12 + 4 * count as usize)
    }

    /// Collects header bytes; parses the header once it is whole. Returns
    /// what is left of `bytes`.
    fn read_header<'b>(&mut self, bytes: &'b [u8]) -> Result<&'b [u8], IncrementalFileError> {
        let wanted = self.header_wanted()?;
        let take = (wanted - self.header.len()).min(bytes.len());
        let (head, rest) = bytes.split_at(take);
        self.header.extend_from_slice(head);
        if self.header.len() == 12 && self.header.get(0..4) != Some(&MAGIC.to_le_bytes()[..]) {
            return Err(IncrementalFileError::Magic(self.path.clone()));
        }
        if self.header.len() >= 12 && self.header.len() == self.header_wanted()? {
            self.parse_header()?;
        }
        Ok(rest)
    }

    fn parse_header(&mut self) -> Result<(), IncrementalFileError> {
        let words: Vec<u32> = self.header.chunks_exact(4).map(le_u32).collect();
        let (count, truncation) = (words.get(1).copied().unwrap_or(0), words.get(2).copied().unwrap_or(0));
        let blocks: Vec<u32> = words.get(3..).unwrap_or_default().to_vec();
        if truncation > SEGMENT_BLOCKS {
            return Err(self.invalid(format!("truncation block length {truncation} is past a segment's end")));
        }
        if blocks.windows(2).any(|pair| pair.first() >= pair.get(1)) || blocks.iter().any(|&b| b >= SEGMENT_BLOCKS) {
            return Err(self.invalid("its block numbers are not ascending within a segment"));
        }
        let header_len = self.header.len() as u64;
        let data = u64::from(count) * BLOCK_SIZE;
        let padded = if count > 0 { header_len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE } else { header_len };
        let padding = if self.entry_size == header_len + data {
            0
        } else if self.entry_size == padded + data {
            padded - header_len
        } else {
            return Err(self.invalid(format!("{} bytes do not fit a header listing {count} blocks", self.entry_size)));
        };
        self.listed = Some(Listed { blocks, truncation, padding_left: padding, next: 0, written_to: 0 });
        Ok(())
    }

    /// Whether an unlisted block must be stored as zeros here rather than
    /// taken from the base.
    fn zero_here(&self, block: u64, truncation: u32) -> bool {
        block >= u64::from(truncation) || block >= self.base_blocks
    }

    /// Accounts for unlisted blocks up to `until`: zero pages where the base
    /// cannot supply them.
    fn fill_to(&mut self, until: u64, out: &mut Vec<u8>) {
        let Some(listed) = self.listed.as_ref() else { return };
        let (from, truncation) = (listed.written_to, listed.truncation);
        for block in from..until {
            if self.zero_here(block, truncation) {
                out.resize(out.len() + BLOCK_SIZE as usize, 0);
                push_block(&mut self.ranges, block);
            }
        }
        if let Some(listed) = self.listed.as_mut() {
            listed.written_to = listed.written_to.max(until);
        }
    }

    fn page(&mut self, page: &[u8], out: &mut Vec<u8>) -> Result<(), IncrementalFileError> {
        let listed = self.listed.as_ref().ok_or_else(|| self.invalid("a page before the header"))?;
        let Some(&block) = listed.blocks.get(listed.next) else {
            return Err(self.invalid("more pages than the header lists"));
        };
        self.fill_to(u64::from(block), out);
        out.extend_from_slice(page);
        push_block(&mut self.ranges, u64::from(block));
        if let Some(listed) = self.listed.as_mut() {
            listed.next += 1;
            listed.written_to = u64::from(block) + 1;
        }
        Ok(())
    }

    /// The ranges of the pages given out so far.
    pub fn ranges(&self) -> &[[u32; 2]] {
        &self.ranges
    }

    /// The stored ranges and the reconstructed file's length in blocks,
    /// once every byte has been fed.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(Vec<[u32; 2]>, u64), IncrementalFileError> {
        let listed = self.listed.as_ref().ok_or_else(|| self.invalid("it ended inside its header"))?;
        if !self.carry.is_empty() || listed.next != listed.blocks.len() || listed.padding_left > 0 {
            return Err(self.invalid("it ended before its last block"));
        }
        let last = listed.blocks.last().map_or(0, |&b| u64::from(b) + 1);
        let length = last.max(u64::from(listed.truncation));
        self.fill_to(length, out);
        Ok((self.ranges, length))
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    bytes.try_into().map(u32::from_le_bytes).unwrap_or(0)
}

/// Adds one block to ascending ranges.
fn push_block(ranges: &mut Vec<[u32; 2]>, block: u64) {
    // Blocks are below SEGMENT_BLOCKS (checked), so they fit a u32.
    let block = u32::try_from(block).unwrap_or(u32::MAX);
    match ranges.last_mut() {
        Some([first, count]) if first.checked_add(*count) == Some(block) => *count += 1,
        _ => ranges.push([block, 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incremental file as PostgreSQL writes it; each page filled with its block number.
    fn file(blocks: &[u32], truncation: u32, padded: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [MAGIC, blocks.len() as u32, truncation].iter().chain(blocks) {
            out.extend_from_slice(&word.to_le_bytes());
        }
        if padded && !blocks.is_empty() {
            out.resize(out.len().div_ceil(8192) * 8192, 0);
        }
        for &b in blocks {
            out.extend(std::iter::repeat_n(b as u8 + 1, 8192));
        }
        out
    }

    /// Ranges, length in blocks, and the pages stored.
    type Decoded = (Vec<[u32; 2]>, u64, Vec<u8>);

    /// Feeds `bytes` in pieces of `piece` bytes.
    fn decode(bytes: &[u8], base_blocks: u64, piece: usize) -> Result<Decoded, IncrementalFileError> {
        let mut reader = IncrementalFile::new("base/5/INCREMENTAL.16384", bytes.len() as u64, base_blocks * 8192);
        let mut out = Vec::new();
        for part in bytes.chunks(piece) {
            reader.feed(part, &mut out)?;
        }
        let (ranges, length) = reader.finish(&mut out)?;
        Ok((ranges, length, out))
    }

    #[test]
    fn names() {
        assert_eq!(target_path("base/5/INCREMENTAL.16384.2").as_deref(), Some("base/5/16384.2"));
        assert_eq!(target_path("INCREMENTAL.x").as_deref(), Some("x"));
        assert_eq!(target_path("base/5/16384"), None);
        assert_eq!(target_path("base/5/INCREMENTAL."), None);
        let label =
            b"START WAL LOCATION: 0/2000028\nINCREMENTAL FROM LSN: 0/1000028\nINCREMENTAL FROM TLI: 1\nLABEL: x\n";
        assert_eq!(combined_backup_label(label), b"START WAL LOCATION: 0/2000028\nLABEL: x\n");
    }

    #[test]
    fn both_header_layouts_in_any_pieces() {
        for padded in [false, true] {
            for piece in [1, 7, 8192, 1 << 20] {
                let bytes = file(&[1, 2, 5], 10, padded);
                let (ranges, length, out) = decode(&bytes, 10, piece).expect("decodes");
                assert_eq!(ranges, vec![[1, 2], [5, 1]]);
                assert_eq!(length, 10);
                assert_eq!(out.len(), 3 * 8192);
                assert_eq!((out[0], out[8192], out[2 * 8192]), (2, 3, 6));
            }
        }
    }

    #[test]
    fn zero_blocks_where_the_base_cannot_supply_them() {
        // The base had 4 blocks; the file is 8 now, blocks 6 and 7 listed:
        // blocks 4 and 5 (extended, never written) are stored as zeros.
        let (ranges, length, out) = decode(&file(&[6, 7], 8, true), 4, 5000).expect("decodes");
        assert_eq!((ranges, length), (vec![[4, 4]], 8));
        assert!(out[..2 * 8192].iter().all(|&b| b == 0));
        assert_eq!(out[2 * 8192], 7);
        // Past the truncation block length, an unlisted block is zeros even
        // where the base has one.
        let (ranges, length, _) = decode(&file(&[7], 4, false), 10, 100).expect("decodes");
        assert_eq!((ranges, length), (vec![[4, 4]], 8));
        // Nothing changed: no blocks, the length from the header.
        let (ranges, length, out) = decode(&file(&[], 3, true), 3, 100).expect("decodes");
        assert_eq!((ranges, length, out.len()), (vec![], 3, 0));
    }

    #[test]
    fn refuses_what_is_not_a_whole_valid_file() {
        let good = file(&[1, 2], 4, true);
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(decode(&bad_magic, 4, 100), Err(IncrementalFileError::Magic(_))));
        assert!(decode(&good[..good.len() - 1], 4, 100).is_err(), "a file cut short");
        let unordered = file(&[2, 1], 4, true);
        assert!(decode(&unordered, 4, 100).is_err());
        let mut huge = file(&[], 4, false);
        huge[4..8].copy_from_slice(&(SEGMENT_BLOCKS + 1).to_le_bytes());
        assert!(decode(&huge, 4, 100).is_err());
        let mut far = file(&[1], 4, true);
        far[8..12].copy_from_slice(&(SEGMENT_BLOCKS + 1).to_le_bytes());
        assert!(decode(&far, 4, 100).is_err());
        // A size that fits neither layout.
        let mut reader = IncrementalFile::new("x", good.len() as u64 + 8192, 0);
        assert!(reader.feed(&good, &mut Vec::new()).is_err());
        assert!(IncrementalFile::new("x", 0, 0).finish(&mut Vec::new()).is_err());
    }
}
