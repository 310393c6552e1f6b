//! WAL page headers (access/xlog_internal.h): the short header on every page,
//! the long one on the first page of each segment.

use crate::Lsn;

pub const SHORT_HEADER_LEN: usize = 24;
pub const LONG_HEADER_LEN: usize = 40;

/// Flags in `xlp_info`.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// 0x0008 in 13–18; 19 moves it to 0x0004 (dropping BKP_REMOVABLE).
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;

/// The PostgreSQL major version whose WAL a page magic belongs to. It decides
/// the few layouts that changed (block image flags, dropped-stats items).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgMajor(pub u32);

/// Maps `xlp_magic` to the major version that writes it; `None` for WAL of a
/// version we do not know (refused rather than misread).
pub fn major_for_magic(magic: u16) -> Option<PgMajor> {
    match magic {
        0xD106 => Some(PgMajor(13)),
        0xD10D => Some(PgMajor(14)),
        0xD110 => Some(PgMajor(15)),
        0xD113 => Some(PgMajor(16)),
        0xD116 => Some(PgMajor(17)),
        0xD118 => Some(PgMajor(18)),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    /// Timeline of the first record on the page.
    pub timeline: u32,
    pub page_addr: Lsn,
    /// Bytes of a record continued from the previous page still to come.
    pub rem_len: u32,
    pub long: Option<LongHeader>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongHeader {
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

impl PageHeader {
    pub fn header_len(&self) -> usize {
        if self.long.is_some() {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_LEN
        }
    }

    pub fn is_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_CONTRECORD != 0
    }
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

pub(crate) fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the header at the start of `page`; `None` if the bytes are too short.
pub fn parse_page_header(page: &[u8]) -> Option<PageHeader> {
    let info = u16_at(page, 2)?;
    let long = if info & XLP_LONG_HEADER != 0 {
        Some(LongHeader {
            system_identifier: u64_at(page, 24)?,
            segment_size: u32_at(page, 32)?,
            block_size: u32_at(page, 36)?,
        })
    } else {
        None
    };
    Some(PageHeader {
        magic: u16_at(page, 0)?,
        info,
        timeline: u32_at(page, 4)?,
        page_addr: Lsn(u64_at(page, 8)?),
        rem_len: u32_at(page, 16)?,
        long,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_long_header_seen_on_postgresql_15() {
        // The first 40 bytes of segment 00000001000000000000000B (doc §4).
        let mut page = vec![0u8; 40];
        page[..16].copy_from_slice(&[0x10, 0xd1, 0x06, 0, 1, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0, 0]);
        page[24..40].copy_from_slice(&[0x62, 0xfc, 0x67, 0x69, 0xb0, 0x72, 0x05, 0x6b, 0, 0, 0, 1, 0, 0x20, 0, 0]);
        let header = parse_page_header(&page).expect("header");
        assert_eq!(major_for_magic(header.magic), Some(PgMajor(15)));
        assert_eq!(header.info, 0x0006);
        assert_eq!(header.page_addr, Lsn(0x0B00_0000));
        let long = header.long.expect("long header");
        assert_eq!(long.segment_size, 16 * 1024 * 1024);
        assert_eq!(long.block_size, 8192);
        assert_eq!(header.header_len(), LONG_HEADER_LEN);
        assert!(parse_page_header(&page[..30]).is_none());
    }
}
