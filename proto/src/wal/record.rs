//! The structure of one record (access/xlogrecord.h): the fixed header, the
//! block references with their optional page images, and the main data.
//! Payload meanings live in [`super::rmgr`].

use super::page::{i64_at, u16_at, u32_at, u64_at, PgMajor};
use crate::Lsn;

/// Size of `XLogRecord`, the fixed record header.
pub const RECORD_HEADER_LEN: usize = 24;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_SAME_REL: u8 = 0x80;

const BKPIMAGE_HAS_HOLE: u8 = 0x01;

/// The on-disk identity of a relation: tablespace, database, file number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFileLocator {
    pub tablespace: u32,
    pub database: u32,
    pub relfilenode: u32,
}

impl RelFileLocator {
    pub(crate) fn parse(b: &[u8], at: usize) -> Option<RelFileLocator> {
        Some(RelFileLocator {
            tablespace: u32_at(b, at)?,
            database: u32_at(b, at + 4)?,
            relfilenode: u32_at(b, at + 8)?,
        })
    }
}

impl std::fmt::Display for RelFileLocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.tablespace, self.database, self.relfilenode)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockImage {
    /// Bytes of the image as stored (compressed or with the hole cut out).
    pub length: u16,
    pub hole_offset: u16,
    pub hole_length: u16,
    pub info: u8,
    /// Redo restores the page from it (otherwise it is only for consistency checks).
    pub apply: bool,
    pub compressed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub id: u8,
    /// 0 main, 1 fsm, 2 visibility map, 3 init.
    pub fork: u8,
    pub flags: u8,
    pub rel: RelFileLocator,
    pub block: u32,
    pub image: Option<BlockImage>,
    pub data_len: u16,
}

/// A record taken apart. Slices borrow from the record's bytes.
#[derive(Clone, Debug)]
pub struct Record<'a> {
    pub lsn: Lsn,
    pub end: Lsn,
    pub total_len: u32,
    pub xid: u32,
    pub previous: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub blocks: Vec<BlockRef>,
    pub main_data: &'a [u8],
    pub origin: Option<u16>,
    pub toplevel_xid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed WAL record at {lsn}: {reason}")]
pub struct RecordError {
    pub lsn: Lsn,
    pub reason: &'static str,
}

impl Record<'_> {
    /// Bytes of all page images: pg_waldump's `rec` length is `tot` minus these.
    pub fn image_bytes(&self) -> u32 {
        self.blocks.iter().filter_map(|b| b.image).map(|i| u32::from(i.length)).sum()
    }

    /// The rmgr-specific bits of `xl_info`.
    pub fn rmgr_info(&self) -> u8 {
        self.info & 0xF0
    }
}

/// Reads the headers of a record front to back, refusing to run past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    lsn: Lsn,
    pos: usize,
    /// Bytes after `pos`.
    remaining: usize,
}

impl Cursor<'_> {
    fn bad(&self, reason: &'static str) -> RecordError {
        RecordError { lsn: self.lsn, reason }
    }

    /// The offset of the next `n` bytes, which are then passed over.
    fn take(&mut self, n: usize) -> Result<usize, RecordError> {
        if self.remaining < n {
            return Err(self.bad("headers run past the end"));
        }
        let at = self.pos;
        self.pos += n;
        self.remaining -= n;
        Ok(at)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        let at = self.take(1)?;
        self.bytes.get(at).copied().ok_or(self.bad("header"))
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        let at = self.take(2)?;
        u16_at(self.bytes, at).ok_or(self.bad("header"))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        let at = self.take(4)?;
        u32_at(self.bytes, at).ok_or(self.bad("header"))
    }

    /// One block reference's header (after its id); returns it with the
    /// number of data bytes (image and block data) it announces.
    fn block(
        &mut self,
        id: u8,
        last_rel: Option<RelFileLocator>,
        major: PgMajor,
    ) -> Result<(BlockRef, usize), RecordError> {
        let fork_flags = self.u8()?;
        let data_len = self.u16()?;
        let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
        if has_data != (data_len > 0) {
            return Err(self.bad("block data flag disagrees with its length"));
        }
        let mut data = usize::from(data_len);
        let image = if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
            let length = self.u16()?;
            let hole_offset = self.u16()?;
            let image_info = self.u8()?;
            let (apply, compressed) = image_flags(image_info, major);
            let has_hole = image_info & BKPIMAGE_HAS_HOLE != 0;
            let hole_length = if has_hole && compressed {
                self.u16()?
            } else if has_hole {
                // BLCKSZ is 8192 in every build we read (the page header says so).
                8192u16.saturating_sub(length)
            } else {
                0
            };
            data += usize::from(length);
            Some(BlockImage { length, hole_offset, hole_length, info: image_info, apply, compressed })
        } else {
            None
        };
        let rel = if fork_flags & BKPBLOCK_SAME_REL != 0 {
            last_rel.ok_or(self.bad("SAME_REL on the first block"))?
        } else {
            let at = self.take(12)?;
            RelFileLocator::parse(self.bytes, at).ok_or(self.bad("header"))?
        };
        let block = self.u32()?;
        let fork = fork_flags & BKPBLOCK_FORK_MASK;
        Ok((BlockRef { id, fork, flags: fork_flags, rel, block, image, data_len }, data))
    }
}

/// Takes a whole record apart. `major` decides the block-image flag layout.
pub fn decode<'a>(lsn: Lsn, end: Lsn, bytes: &'a [u8], major: PgMajor) -> Result<Record<'a>, RecordError> {
    let bad = |reason| RecordError { lsn, reason };
    let total_len = u32_at(bytes, 0).ok_or(bad("shorter than a record header"))?;
    if total_len as usize != bytes.len() || bytes.len() < RECORD_HEADER_LEN {
        return Err(bad("length field disagrees with the record"));
    }
    let xid = u32_at(bytes, 4).ok_or(bad("header"))?;
    let previous = Lsn(u64_at(bytes, 8).ok_or(bad("header"))?);
    let info = *bytes.get(16).ok_or(bad("header"))?;
    let rmid = *bytes.get(17).ok_or(bad("header"))?;

    let mut cursor = Cursor { bytes, lsn, pos: RECORD_HEADER_LEN, remaining: bytes.len() - RECORD_HEADER_LEN };
    let mut data_total = 0usize;
    let mut blocks: Vec<BlockRef> = Vec::new();
    let mut main_len = 0usize;
    let mut origin = None;
    let mut toplevel_xid = None;
    // Headers come first; they end where the announced data would fill the rest.
    while cursor.remaining > data_total {
        match cursor.u8()? {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = usize::from(cursor.u8()?);
                data_total += main_len;
                break; // main data is always last
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = cursor.u32()? as usize;
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => origin = Some(cursor.u16()?),
            XLR_BLOCK_ID_TOPLEVEL_XID => toplevel_xid = Some(cursor.u32()?),
            id if id <= XLR_MAX_BLOCK_ID => {
                if blocks.last().is_some_and(|last| id <= last.id) {
                    return Err(bad("block ids out of order"));
                }
                let (block, data) = cursor.block(id, blocks.last().map(|b| b.rel), major)?;
                data_total += data;
                blocks.push(block);
            }
            _ => return Err(bad("unknown block id")),
        }
    }
    if cursor.remaining != data_total {
        return Err(bad("data lengths do not add up to the record length"));
    }
    // Block images and data come in block order, then the main data.
    let main_start = bytes.len() - main_len;
    let main_data = bytes.get(main_start..).ok_or(bad("main data"))?;
    Ok(Record { lsn, end, total_len, xid, previous, info, rmid, blocks, main_data, origin, toplevel_xid })
}

/// (apply, compressed) from `bimg_info`; the bits moved in PostgreSQL 15.
fn image_flags(info: u8, major: PgMajor) -> (bool, bool) {
    if major < PgMajor(15) {
        (info & 0x04 != 0, info & 0x02 != 0)
    } else {
        (info & 0x02 != 0, info & (0x04 | 0x08 | 0x10) != 0)
    }
}

/// A PostgreSQL TimestampTz (microseconds since 2000-01-01 UTC) as Unix microseconds.
pub fn timestamptz_to_unix_micros(ts: i64) -> i64 {
    const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    ts.saturating_add(POSTGRES_EPOCH_UNIX_MICROS)
}

pub(crate) fn read_timestamptz(b: &[u8], at: usize) -> Option<i64> {
    i64_at(b, at).map(timestamptz_to_unix_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; 24];
        r[..4].copy_from_slice(&((24 + body.len()) as u32).to_le_bytes());
        r[17] = 10;
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn block_reference_with_data_and_short_main_data() {
        let mut body = vec![0u8, 0x20, 3, 0];
        body.extend_from_slice(&1663u32.to_le_bytes());
        body.extend_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(&16399u32.to_le_bytes());
        body.extend_from_slice(&7u32.to_le_bytes());
        body.extend_from_slice(&[255, 2]);
        body.extend_from_slice(&[9, 9, 9]); // block data
        body.extend_from_slice(&[1, 2]); // main data
        let bytes = record(&body);
        let r = decode(Lsn(0), Lsn(0), &bytes, PgMajor(15)).expect("decodes");
        assert_eq!(r.blocks.len(), 1);
        assert_eq!(r.blocks[0].rel, RelFileLocator { tablespace: 1663, database: 5, relfilenode: 16399 });
        assert_eq!(r.blocks[0].block, 7);
        assert_eq!(r.main_data, &[1, 2]);
    }

    #[test]
    fn a_record_without_main_data_ends_after_its_blocks() {
        // An FPI: one image, no main-data header (the bug the doc warns of).
        let mut body = vec![0u8, 0x10, 0, 0];
        body.extend_from_slice(&100u16.to_le_bytes()); // image length
        body.extend_from_slice(&0u16.to_le_bytes());
        body.push(0x02); // APPLY on 15
        body.extend_from_slice(&[1, 0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0]);
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&[0xAB; 100]);
        let bytes = record(&body);
        let r = decode(Lsn(0), Lsn(0), &bytes, PgMajor(15)).expect("decodes");
        assert!(r.main_data.is_empty());
        assert_eq!(r.image_bytes(), 100);
        assert!(r.blocks[0].image.is_some_and(|i| i.apply && !i.compressed));
    }

    #[test]
    fn lengths_that_do_not_add_up_are_refused() {
        let bytes = record(&[255, 10, 1, 2]);
        assert!(decode(Lsn(0), Lsn(0), &bytes, PgMajor(15)).is_err());
        let bytes = record(&[0, 0x80, 0, 0]);
        assert!(decode(Lsn(0), Lsn(0), &bytes, PgMajor(15)).is_err());
    }
}
