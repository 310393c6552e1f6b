//! Cuts WAL pages into whole records: page headers skipped, records that span
//! pages and segments reassembled, each record checked (length, `xl_prev`,
//! CRC-32C) before it is handed out. Fed page by page, in LSN order, so the
//! agent can decode segment after segment without rereading anything.
//!
//! The reader stops at the first thing that is not valid WAL — a zero length
//! where a record should start, a page of the wrong address, a bad CRC — and
//! reports it as [`EndOfWal`]: in a partial segment that is simply where the
//! server stopped writing, in a complete one it means damage.

use super::page::{self, PageHeader, PgMajor, XLP_FIRST_IS_OVERWRITE_CONTRECORD};
use crate::Lsn;
use std::fmt;

use super::record::RECORD_HEADER_LEN;
/// PostgreSQL refuses records above this size (XLogRecordMaxSize, 1020 MB).
pub const MAX_RECORD_LEN: usize = 1020 * 1024 * 1024;
const DEFAULT_BLOCK_SIZE: usize = 8192;

/// One whole record as it was written: header, block headers, data.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// Where the record starts.
    pub lsn: Lsn,
    /// The position just after its last byte (before alignment padding).
    pub end: Lsn,
    pub bytes: &'a [u8],
}

/// Why the reader stopped. `ZeroLength` is the usual end of what was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndOfWal {
    ZeroLength { at: Lsn },
    BadPageHeader { at: Lsn },
    UnknownMagic { at: Lsn, magic: u16 },
    MagicChanged { at: Lsn, magic: u16 },
    WrongPageAddress { at: Lsn, found: Lsn },
    WrongSegmentSize { at: Lsn, found: u32 },
    MissingContinuation { at: Lsn },
    ContinuationLength { at: Lsn, expected: usize, found: u32 },
    BadLength { at: Lsn, length: u32 },
    BadPrevious { at: Lsn, expected: Lsn, found: Lsn },
    BadChecksum { at: Lsn },
}

impl EndOfWal {
    /// The position at which valid WAL stops.
    pub fn lsn(&self) -> Lsn {
        match self {
            EndOfWal::ZeroLength { at }
            | EndOfWal::BadPageHeader { at }
            | EndOfWal::UnknownMagic { at, .. }
            | EndOfWal::MagicChanged { at, .. }
            | EndOfWal::WrongPageAddress { at, .. }
            | EndOfWal::WrongSegmentSize { at, .. }
            | EndOfWal::MissingContinuation { at }
            | EndOfWal::ContinuationLength { at, .. }
            | EndOfWal::BadLength { at, .. }
            | EndOfWal::BadPrevious { at, .. }
            | EndOfWal::BadChecksum { at } => *at,
        }
    }
}

impl fmt::Display for EndOfWal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndOfWal::ZeroLength { at } => write!(f, "no record at {at} (end of written WAL)"),
            EndOfWal::BadPageHeader { at } => write!(f, "invalid page header at {at}"),
            EndOfWal::UnknownMagic { at, magic } => {
                write!(f, "page at {at} has magic {magic:#06X}, not WAL of PostgreSQL 13 to 18")
            }
            EndOfWal::MagicChanged { at, magic } => write!(f, "page at {at} has a different magic {magic:#06X}"),
            EndOfWal::WrongPageAddress { at, found } => write!(f, "page at {at} claims address {found}"),
            EndOfWal::WrongSegmentSize { at, found } => write!(f, "page at {at} claims segment size {found}"),
            EndOfWal::MissingContinuation { at } => write!(f, "page at {at} lacks the continuation of a record"),
            EndOfWal::ContinuationLength { at, expected, found } => {
                write!(f, "page at {at} continues {found} bytes, expected {expected}")
            }
            EndOfWal::BadLength { at, length } => write!(f, "invalid record length {length} at {at}"),
            EndOfWal::BadPrevious { at, expected, found } => {
                write!(f, "record at {at} points back to {found}, expected {expected}")
            }
            EndOfWal::BadChecksum { at } => write!(f, "incorrect CRC-32C in record at {at}"),
        }
    }
}

/// A record being reassembled across pages (or, at the reader's start, the
/// tail of one that began before it, which is skipped).
struct Pending {
    lsn: Lsn,
    want: usize,
    have: usize,
    discard: bool,
}

pub struct WalReader {
    segment_size: u64,
    block_size: usize,
    magic: Option<u16>,
    system_identifier: Option<u64>,
    next_page: Lsn,
    at_start: bool,
    pending: Option<Pending>,
    assembly: Vec<u8>,
    previous: Option<Lsn>,
    /// After XLOG SWITCH: the rest of the segment holds no records.
    skip_to: Option<Lsn>,
    end: Option<EndOfWal>,
}

impl WalReader {
    /// A reader whose first page is at `start` (a page boundary, normally a
    /// segment start). A record continued from before `start` is skipped.
    pub fn new(start: Lsn, segment_size: u64) -> WalReader {
        WalReader {
            segment_size,
            block_size: DEFAULT_BLOCK_SIZE,
            magic: None,
            system_identifier: None,
            next_page: start,
            at_start: true,
            pending: None,
            assembly: Vec::new(),
            previous: None,
            skip_to: None,
            end: None,
        }
    }

    /// The PostgreSQL version the WAL comes from, once a page was read.
    pub fn major(&self) -> Option<PgMajor> {
        self.magic.and_then(page::major_for_magic)
    }

    pub fn system_identifier(&self) -> Option<u64> {
        self.system_identifier
    }

    /// Why reading stopped, if it did.
    pub fn end(&self) -> Option<&EndOfWal> {
        self.end.as_ref()
    }

    /// The LSN of the next page the reader expects.
    pub fn next_page(&self) -> Lsn {
        self.next_page
    }

    /// Every record starting before this LSN has been handed out.
    pub fn complete_before(&self) -> Lsn {
        match &self.pending {
            Some(p) if !p.discard => p.lsn,
            _ => self.next_page,
        }
    }

    /// Reads whole pages from `data` (whose first byte is at
    /// [`next_page`](Self::next_page)) and hands every completed record to
    /// `emit`. Returns the bytes consumed: a trailing partial page is left.
    pub fn feed<F: FnMut(RawRecord<'_>)>(&mut self, data: &[u8], mut emit: F) -> usize {
        let mut used = 0;
        while self.end.is_none() {
            let Some(rest) = data.get(used..) else { break };
            // The block size is known from the first long header; until then 8 kB.
            if let Some(header) = page::parse_page_header(rest) {
                if let Some(long) = header.long {
                    let size = long.block_size as usize;
                    if size.is_power_of_two() && (1024..=65536).contains(&size) {
                        self.block_size = size;
                    }
                }
            }
            let Some(page) = rest.get(..self.block_size) else { break };
            self.read_page(page, &mut emit);
            used += self.block_size;
            self.next_page = Lsn(self.next_page.0 + self.block_size as u64);
        }
        used
    }

    fn stop(&mut self, why: EndOfWal) {
        if self.end.is_none() {
            self.end = Some(why);
        }
    }

    fn read_page<F: FnMut(RawRecord<'_>)>(&mut self, page: &[u8], emit: &mut F) {
        let at = self.next_page;
        if let Some(skip_to) = self.skip_to {
            if at < skip_to {
                return;
            }
            self.skip_to = None;
        }
        let Some(header) = self.check_header(at, page) else { return };
        let header_len = header.header_len();
        let room = self.block_size - header_len;
        let mut offset = header_len;

        if self.at_start {
            self.at_start = false;
            if header.is_contrecord() {
                self.pending = Some(Pending { lsn: at, want: header.rem_len as usize, have: 0, discard: true });
            }
        } else if self.pending.is_some() && !header.is_contrecord() {
            if header.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                // The server crashed mid-record and wrote past it: the
                // unfinished record is abandoned, as recovery abandons it.
                self.pending = None;
            } else {
                return self.stop(EndOfWal::MissingContinuation { at });
            }
        }

        if let Some(mut pending) = self.pending.take() {
            let missing = pending.want - pending.have;
            if header.rem_len as usize != missing {
                return self.stop(EndOfWal::ContinuationLength { at, expected: missing, found: header.rem_len });
            }
            let n = missing.min(room);
            if !pending.discard {
                if let Some(bytes) = page.get(header_len..header_len + n) {
                    self.assembly.extend_from_slice(bytes);
                }
            }
            pending.have += n;
            if pending.have < pending.want {
                self.pending = Some(pending);
                return;
            }
            offset = header_len + align8(n);
            if !pending.discard {
                let assembly = std::mem::take(&mut self.assembly);
                let end = Lsn(at.0 + (header_len + n) as u64);
                self.finish(pending.lsn, end, &assembly, emit);
                self.assembly = assembly;
                self.assembly.clear();
            }
        }

        while self.end.is_none() && self.skip_to.is_none() && offset + 4 <= self.block_size {
            let lsn = Lsn(at.0 + offset as u64);
            let Some(length) = page::u32_at(page, offset) else { break };
            if length == 0 {
                return self.stop(EndOfWal::ZeroLength { at: lsn });
            }
            let len = length as usize;
            if !(RECORD_HEADER_LEN..=MAX_RECORD_LEN).contains(&len) {
                return self.stop(EndOfWal::BadLength { at: lsn, length });
            }
            if let Some(bytes) = page.get(offset..offset + len) {
                self.finish(lsn, Lsn(lsn.0 + length as u64), bytes, emit);
                offset = align8(offset + len);
            } else {
                let head = page.get(offset..).unwrap_or_default();
                self.assembly.clear();
                self.assembly.extend_from_slice(head);
                self.pending = Some(Pending { lsn, want: len, have: head.len(), discard: false });
                break;
            }
        }
    }

    fn check_header(&mut self, at: Lsn, page: &[u8]) -> Option<PageHeader> {
        let Some(header) = page::parse_page_header(page) else {
            self.stop(EndOfWal::BadPageHeader { at });
            return None;
        };
        match self.magic {
            None if page::major_for_magic(header.magic).is_none() => {
                // All zeros is an unwritten page, the ordinary end of WAL.
                if header.magic == 0 && header.page_addr == Lsn::ZERO {
                    self.stop(EndOfWal::ZeroLength { at });
                } else {
                    self.stop(EndOfWal::UnknownMagic { at, magic: header.magic });
                }
                return None;
            }
            None => self.magic = Some(header.magic),
            Some(magic) if magic != header.magic => {
                if header.magic == 0 && header.page_addr == Lsn::ZERO {
                    self.stop(EndOfWal::ZeroLength { at });
                } else {
                    self.stop(EndOfWal::MagicChanged { at, magic: header.magic });
                }
                return None;
            }
            Some(_) => {}
        }
        if header.page_addr != at {
            self.stop(EndOfWal::WrongPageAddress { at, found: header.page_addr });
            return None;
        }
        let segment_start = at.segment_offset(self.segment_size) == 0;
        match header.long {
            Some(long) if !segment_start => {
                let _ = long;
                self.stop(EndOfWal::BadPageHeader { at });
                return None;
            }
            Some(long) => {
                if long.segment_size as u64 != self.segment_size {
                    self.stop(EndOfWal::WrongSegmentSize { at, found: long.segment_size });
                    return None;
                }
                self.system_identifier = Some(long.system_identifier);
            }
            None if segment_start => {
                self.stop(EndOfWal::BadPageHeader { at });
                return None;
            }
            None => {}
        }
        Some(header)
    }

    /// Checks a whole record and hands it out.
    fn finish<F: FnMut(RawRecord<'_>)>(&mut self, lsn: Lsn, end: Lsn, bytes: &[u8], emit: &mut F) {
        let previous = Lsn(page::u64_at(bytes, 8).unwrap_or_default());
        if let Some(expected) = self.previous {
            if previous != expected {
                return self.stop(EndOfWal::BadPrevious { at: lsn, expected, found: previous });
            }
        }
        if !crc_matches(bytes) {
            return self.stop(EndOfWal::BadChecksum { at: lsn });
        }
        let info = bytes.get(16).copied().unwrap_or_default();
        let rmid = bytes.get(17).copied().unwrap_or_default();
        if rmid == super::rmgr::RM_XLOG && info & 0xF0 == super::rmgr::XLOG_SWITCH {
            self.skip_to = Some(Lsn((lsn.0 / self.segment_size + 1) * self.segment_size));
        }
        self.previous = Some(lsn);
        emit(RawRecord { lsn, end, bytes });
    }
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// CRC-32C over the record body, then over the header up to the CRC field.
pub fn record_crc(bytes: &[u8]) -> Option<u32> {
    let body = bytes.get(RECORD_HEADER_LEN..)?;
    let head = bytes.get(..20)?;
    Some(crc32c::crc32c_append(crc32c::crc32c(body), head))
}

fn crc_matches(bytes: &[u8]) -> bool {
    match (record_crc(bytes), page::u32_at(bytes, 20)) {
        (Some(computed), Some(stored)) => computed == stored,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::writer::WalWriter;
    use super::*;

    const SEG: u64 = 1024 * 1024;

    fn read_all(data: &[u8], start: Lsn) -> (Vec<(Lsn, Vec<u8>)>, Option<EndOfWal>) {
        let mut reader = WalReader::new(start, SEG);
        let mut out = Vec::new();
        reader.feed(data, |r| out.push((r.lsn, r.bytes.to_vec())));
        (out, reader.end().cloned())
    }

    #[test]
    fn records_spanning_pages_and_segments_come_out_whole() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        let sizes = [100usize, 9000, 30, 20000, 8150, 1_100_000, 50, 7];
        let mut written = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            written.push(w.append(10, 0, i as u32, &vec![i as u8; *size]));
        }
        let data = w.finish_segment_padded();
        assert_eq!(data.len() as u64 % SEG, 0);
        let (records, end) = read_all(&data, Lsn(0));
        assert_eq!(records.len(), sizes.len());
        for ((lsn, bytes), (wlsn, wbytes)) in records.iter().zip(&written) {
            assert_eq!(lsn, wlsn);
            assert_eq!(bytes, wbytes);
        }
        assert!(matches!(end, Some(EndOfWal::ZeroLength { .. })), "{end:?}");
    }

    #[test]
    fn fed_in_pieces_gives_the_same_records() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        for i in 0..400u32 {
            w.append(1, 0, i, &vec![7u8; (i as usize * 37) % 3000]);
        }
        let data = w.finish_segment_padded();
        let (whole, _) = read_all(&data, Lsn(0));
        let mut reader = WalReader::new(Lsn(0), SEG);
        let mut pieces = Vec::new();
        let mut at = 0;
        for chunk in [8192usize, 3 * 8192, 100 * 8192] {
            let used = reader.feed(data.get(at..at + chunk).unwrap_or_default(), |r| pieces.push(r.lsn));
            at += used;
        }
        reader.feed(data.get(at..).unwrap_or_default(), |r| pieces.push(r.lsn));
        assert_eq!(pieces, whole.iter().map(|(l, _)| *l).collect::<Vec<_>>());
    }

    #[test]
    fn starting_at_the_second_segment_skips_the_continued_record() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        w.append(1, 0, 1, &vec![1u8; SEG as usize - 20_000]);
        w.append(1, 0, 2, &vec![2u8; 40_000]); // crosses into segment 2
        let third = w.append(1, 0, 3, &[3u8; 10]);
        let data = w.finish_segment_padded();
        let second = data.get(SEG as usize..).unwrap_or_default();
        let (records, _) = read_all(second, Lsn(SEG));
        assert_eq!(records.first().map(|r| r.0), Some(third.0));
    }

    #[test]
    fn a_flipped_byte_stops_at_that_record() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        let _a = w.append(1, 0, 1, &[1u8; 50]);
        let b = w.append(1, 0, 2, &[2u8; 50]);
        w.append(1, 0, 3, &[3u8; 50]);
        let mut data = w.finish_segment_padded();
        let at = b.0 .0 as usize + 30;
        if let Some(byte) = data.get_mut(at) {
            *byte ^= 0x40;
        }
        let (records, end) = read_all(&data, Lsn(0));
        assert_eq!(records.len(), 1);
        assert_eq!(end, Some(EndOfWal::BadChecksum { at: b.0 }));
    }

    #[test]
    fn a_recycled_page_ends_the_wal() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        w.append(1, 0, 1, &vec![1u8; 30_000]); // pages 0 to 3
        let mut data = w.finish_segment_padded();
        // Page 3 claims to be from an older segment, as in a recycled file.
        if let Some(addr) = data.get_mut(3 * 8192 + 8..3 * 8192 + 16) {
            addr.copy_from_slice(&(5 * SEG + 3 * 8192).to_le_bytes());
        }
        let (records, end) = read_all(&data, Lsn(0));
        assert!(records.is_empty());
        assert!(matches!(end, Some(EndOfWal::WrongPageAddress { .. })), "{end:?}");
    }

    #[test]
    fn after_a_switch_the_next_record_is_in_the_next_segment() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        w.append(1, 0, 1, &[1u8; 50]);
        w.append(0, 0x40, 0, &[]);
        w.switch_segment();
        let next = w.append(1, 0, 2, &[2u8; 50]);
        let data = w.finish_segment_padded();
        let (records, _) = read_all(&data, Lsn(0));
        assert_eq!(records.len(), 3);
        assert_eq!(records.last().map(|r| r.0), Some(next.0));
        assert_eq!(next.0, Lsn(SEG + 40));
    }
}
