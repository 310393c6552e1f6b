//! The WAL decoder must never panic, whatever the bytes.
//!
//! Mode 0 feeds the input as WAL pages, with page headers made valid enough
//! (magic, address, long header at segment start) that the fuzzer reaches
//! record reassembly; record checksums are left to chance, so mode 1 hands
//! the input straight to the record decoder and every payload parser, and
//! mode 2 writes the input as well-formed records (valid CRCs, spanning pages
//! and segments), then flips one byte the input chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_proto::wal::writer::WalWriter;
use tidemark_proto::wal::{self, rmgr, summary, PgMajor, WalReader};
use tidemark_proto::Lsn;

// Smaller than any real segment size: the reader does not care, and runs are faster.
const SEGMENT: u64 = 1 << 16;
const PAGE: usize = 8192;

fn parse_everything(record: &wal::Record<'_>, major: PgMajor) {
    let _ = rmgr::record_type_name(record.rmid, record.info, major);
    let _ = rmgr::parse_xact_end(record, major);
    let _ = rmgr::parse_prepare(record);
    let _ = rmgr::parse_assignment(record);
    let _ = rmgr::parse_row_change(record);
    let _ = rmgr::parse_restore_point(record);
    let _ = rmgr::parse_checkpoint_time(record);
    let _ = rmgr::parse_smgr_create(record);
    let _ = rmgr::parse_standby_locks(record);
    let _ = rmgr::parse_oldest_running_xid(record);
    let _ = rmgr::parse_relmap_update(record);
}

fn decode_pages(pages: &[u8], major: PgMajor) {
    let mut builder = summary::SummaryBuilder::default();
    let mut reader = WalReader::new(Lsn(0), SEGMENT);
    reader.feed(pages, |raw| {
        if let Ok(record) = wal::decode(raw.lsn, raw.end, raw.bytes, major) {
            parse_everything(&record, major);
            builder.add(&record, major);
        }
    });
    let _ = reader.end();
    let _ = builder.finish(1, Lsn(0), |_| summary::Naming::Unknown);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let major = PgMajor(13 + u32::from(mode >> 4) % 6);
    if mode % 3 == 2 {
        let mut writer = WalWriter::new(Lsn(0), SEGMENT);
        let mut rest = rest;
        // Each record: rmid, info, a length byte (×97 so records span pages), body.
        while let [rmid, info, len, tail @ ..] = rest {
            let len = (usize::from(*len) * 97).min(tail.len());
            let (body, next) = tail.split_at(len);
            writer.append(*rmid % 24, *info, 7, body);
            rest = next;
        }
        let mut pages = writer.finish_segment_padded();
        if let Some(at) = data.get(1..3).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])) * 16) {
            if let Some(byte) = pages.get_mut(at) {
                *byte ^= 0x5A;
            }
        }
        decode_pages(&pages, major);
    } else if mode % 3 == 0 {
        let mut pages = Vec::new();
        for (i, chunk) in rest.chunks(PAGE).enumerate() {
            let mut page = vec![0u8; PAGE];
            page[..chunk.len()].copy_from_slice(chunk);
            let lsn = (i * PAGE) as u64;
            page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
            page[8..16].copy_from_slice(&lsn.to_le_bytes());
            let mut info = u16::from_le_bytes([page[2], page[3]]) & !0x0002;
            if lsn % SEGMENT == 0 {
                info |= 0x0002;
                page[32..36].copy_from_slice(&(SEGMENT as u32).to_le_bytes());
                page[36..40].copy_from_slice(&(PAGE as u32).to_le_bytes());
            }
            page[2..4].copy_from_slice(&info.to_le_bytes());
            pages.extend_from_slice(&page);
        }
        decode_pages(&pages, major);
    } else {
        let end = Lsn(rest.len() as u64);
        if let Ok(record) = wal::decode(Lsn(0), end, rest, major) {
            parse_everything(&record, major);
            let mut builder = summary::SummaryBuilder::default();
            builder.add(&record, major);
        }
        let _ = summary::SegmentSummary::from_json(rest);
    }
});
