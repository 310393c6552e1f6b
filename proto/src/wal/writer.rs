//! A minimal WAL writer for tests and the fuzz target: lays records out on
//! pages the way the server does (aligned starts, page headers, continuation
//! lengths, CRC), so the reader's edge cases can be produced on purpose. Real
//! WAL from a real server is checked against pg_waldump in the end-to-end tests.

use super::page::{XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER};
use crate::Lsn;

const BLOCK: u64 = 8192;
const MAGIC_15: u16 = 0xD110;

pub struct WalWriter {
    segment_size: u64,
    base: Lsn,
    data: Vec<u8>,
    previous: Lsn,
}

impl WalWriter {
    pub fn new(base: Lsn, segment_size: u64) -> WalWriter {
        WalWriter { segment_size, base, data: Vec::new(), previous: Lsn::ZERO }
    }

    fn pos(&self) -> u64 {
        self.base.0 + self.data.len() as u64
    }

    fn page_header(&mut self, rem_len: u32) {
        let at = self.pos();
        let long = at.is_multiple_of(self.segment_size);
        let mut info = if long { XLP_LONG_HEADER } else { 0 };
        if rem_len > 0 {
            info |= XLP_FIRST_IS_CONTRECORD;
        }
        self.data.extend_from_slice(&MAGIC_15.to_le_bytes());
        self.data.extend_from_slice(&info.to_le_bytes());
        self.data.extend_from_slice(&1u32.to_le_bytes());
        self.data.extend_from_slice(&at.to_le_bytes());
        self.data.extend_from_slice(&rem_len.to_le_bytes());
        self.data.extend_from_slice(&[0u8; 4]);
        if long {
            self.data.extend_from_slice(&42u64.to_le_bytes());
            self.data.extend_from_slice(&(self.segment_size as u32).to_le_bytes());
            self.data.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        }
    }

    /// Appends a record whose body (everything after the 24-byte header) is
    /// `body`; returns its LSN and its whole bytes.
    pub fn append(&mut self, rmid: u8, info: u8, xid: u32, body: &[u8]) -> (Lsn, Vec<u8>) {
        if self.pos().is_multiple_of(BLOCK) {
            self.page_header(0);
        }
        let lsn = Lsn(self.pos());
        let mut record = Vec::with_capacity(24 + body.len());
        record.extend_from_slice(&((24 + body.len()) as u32).to_le_bytes());
        record.extend_from_slice(&xid.to_le_bytes());
        record.extend_from_slice(&self.previous.0.to_le_bytes());
        record.push(info);
        record.push(rmid);
        record.extend_from_slice(&[0, 0]);
        record.extend_from_slice(&[0u8; 4]);
        record.extend_from_slice(body);
        let crc = super::reader::record_crc(&record).unwrap_or_default();
        if let Some(field) = record.get_mut(20..24) {
            field.copy_from_slice(&crc.to_le_bytes());
        }
        let mut rest: &[u8] = &record;
        while !rest.is_empty() {
            if self.pos().is_multiple_of(BLOCK) {
                self.page_header(rest.len() as u32);
            }
            let room = (BLOCK - self.pos() % BLOCK) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.data.extend_from_slice(now);
            rest = later;
        }
        while !self.pos().is_multiple_of(8) {
            self.data.push(0);
        }
        self.previous = lsn;
        (lsn, record)
    }

    /// Zero-fills to the next segment start, as after XLOG SWITCH.
    pub fn switch_segment(&mut self) {
        while !self.pos().is_multiple_of(self.segment_size) {
            self.data.push(0);
        }
    }

    /// The bytes written, zero-filled to a whole segment.
    pub fn finish_segment_padded(mut self) -> Vec<u8> {
        self.switch_segment();
        self.data
    }
}
