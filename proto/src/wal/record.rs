//! The structure of one record (access/xlogrecord.h): the fixed header, the
//! block references with their optional page images, and the main data.
//! Payload meanings live in [`super::rmgr`].

use super::page::{i64_at, u16_at, u32_at, u64_at, PgMajor};
use super::reader::RECORD_HEADER_LEN;
use crate::Lsn;

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

    let mut pos = RECORD_HEADER_LEN;
    let mut remaining = bytes.len() - RECORD_HEADER_LEN;
    let mut data_total = 0usize;
    let mut blocks = Vec::new();
    let mut main_len = 0usize;
    let mut origin = None;
    let mut toplevel_xid = None;
    let mut last_rel: Option<RelFileLocator> = None;
    let mut last_id: Option<u8> = None;
    let take = |pos: &mut usize, remaining: &mut usize, n: usize| -> Result<usize, RecordError> {
        if *remaining < n {
            return Err(bad("headers run past the end"));
        }
        let at = *pos;
        *pos += n;
        *remaining -= n;
        Ok(at)
    };

    // Headers come first; they end where the announced data would fill the rest.
    while remaining > data_total {
        let at = take(&mut pos, &mut remaining, 1)?;
        let id = *bytes.get(at).ok_or(bad("header"))?;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                let at = take(&mut pos, &mut remaining, 1)?;
                main_len = usize::from(*bytes.get(at).ok_or(bad("header"))?);
                data_total += main_len;
                break; // main data is always last
            }
            XLR_BLOCK_ID_DATA_LONG => {
                let at = take(&mut pos, &mut remaining, 4)?;
                main_len = u32_at(bytes, at).ok_or(bad("header"))? as usize;
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                let at = take(&mut pos, &mut remaining, 2)?;
                origin = u16_at(bytes, at);
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                let at = take(&mut pos, &mut remaining, 4)?;
                toplevel_xid = u32_at(bytes, at);
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                if last_id.is_some_and(|last| id <= last) {
                    return Err(bad("block ids out of order"));
                }
                last_id = Some(id);
                let at = take(&mut pos, &mut remaining, 3)?;
                let fork_flags = *bytes.get(at).ok_or(bad("header"))?;
                let data_len = u16_at(bytes, at + 1).ok_or(bad("header"))?;
                let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
                if has_data != (data_len > 0) {
                    return Err(bad("block data flag disagrees with its length"));
                }
                data_total += usize::from(data_len);
                let image = if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let at = take(&mut pos, &mut remaining, 5)?;
                    let length = u16_at(bytes, at).ok_or(bad("header"))?;
                    let hole_offset = u16_at(bytes, at + 2).ok_or(bad("header"))?;
                    let image_info = *bytes.get(at + 4).ok_or(bad("header"))?;
                    let (apply, compressed) = image_flags(image_info, major);
                    let has_hole = image_info & BKPIMAGE_HAS_HOLE != 0;
                    let hole_length = if has_hole && compressed {
                        let at = take(&mut pos, &mut remaining, 2)?;
                        u16_at(bytes, at).ok_or(bad("header"))?
                    } else if has_hole {
                        // BLCKSZ is 8192 in every build we read (the page header says so).
                        8192u16.saturating_sub(length)
                    } else {
                        0
                    };
                    data_total += usize::from(length);
                    Some(BlockImage { length, hole_offset, hole_length, info: image_info, apply, compressed })
                } else {
                    None
                };
                let rel = if fork_flags & BKPBLOCK_SAME_REL != 0 {
                    last_rel.ok_or(bad("SAME_REL on the first block"))?
                } else {
                    let at = take(&mut pos, &mut remaining, 12)?;
                    RelFileLocator::parse(bytes, at).ok_or(bad("header"))?
                };
                last_rel = Some(rel);
                let at = take(&mut pos, &mut remaining, 4)?;
                let block = u32_at(bytes, at).ok_or(bad("header"))?;
                blocks.push(BlockRef {
                    id,
                    fork: fork_flags & BKPBLOCK_FORK_MASK,
                    flags: fork_flags,
                    rel,
                    block,
                    image,
                    data_len,
                });
            }
            _ => return Err(bad("unknown block id")),
        }
    }
    if remaining != data_total {
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
