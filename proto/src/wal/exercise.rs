//! Every WAL decoder driven over arbitrary bytes, in one place: the fuzz
//! target (`fuzz/fuzz_targets/wal_decode.rs`) and the stable property tests
//! below call the same entry point, so `cargo test` alone covers what the
//! fuzzer explores (in fewer cases).
//!
//! The first byte chooses a mode and a major version. Mode 0 lays the rest
//! out as WAL pages with headers made valid enough (magic, address, long
//! header at a segment start) to reach record reassembly; mode 1 hands the
//! rest straight to the record decoder and every payload parser; mode 2
//! writes the rest as well-formed records (valid CRCs, spanning pages and
//! segments) and then flips one byte the input chooses.

use super::writer::WalWriter;
use super::{rmgr, summary, PgMajor, WalReader};
use crate::Lsn;

/// Smaller than any real segment size: the reader does not care, and runs are faster.
pub const SEGMENT: u64 = 1 << 16;
const PAGE: usize = 8192;

/// Runs the decoders over `data`; returns how many records were decoded.
/// It must return, never panic, for any input.
pub fn exercise(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else { return 0 };
    let major = PgMajor(13 + u32::from(mode >> 4) % 6);
    match mode % 3 {
        0 => decode_pages(&as_pages(rest), major),
        1 => decode_one(rest, major),
        _ => {
            let mut pages = written_records(rest);
            let at = data
                .get(1..3)
                .map(|b| u16::from_le_bytes([b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)]));
            if let Some(byte) = at.and_then(|at| pages.get_mut(usize::from(at) * 16)) {
                *byte ^= 0x5A;
            }
            decode_pages(&pages, major)
        }
    }
}

/// Every payload parser over one decoded record.
fn parse_everything(record: &super::Record<'_>, major: PgMajor) {
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

/// Pages through the reader, each record through the decoders and a summary.
fn decode_pages(pages: &[u8], major: PgMajor) -> usize {
    let mut builder = summary::SummaryBuilder::default();
    let mut reader = WalReader::new(Lsn(0), SEGMENT);
    let mut decoded = 0;
    reader.feed(pages, |raw| {
        if let Ok(record) = super::decode(raw.lsn, raw.end, raw.bytes, major) {
            parse_everything(&record, major);
            builder.add(&record, major);
            decoded += 1;
        }
    });
    let _ = reader.end();
    let _ = builder.finish(1, Lsn(0), |_| summary::Naming::Unknown);
    decoded
}

/// The bytes as one record, and as summary JSON.
fn decode_one(bytes: &[u8], major: PgMajor) -> usize {
    let mut decoded = 0;
    if let Ok(record) = super::decode(Lsn(0), Lsn(bytes.len() as u64), bytes, major) {
        parse_everything(&record, major);
        summary::SummaryBuilder::default().add(&record, major);
        decoded = 1;
    }
    let _ = summary::SegmentSummary::from_json(bytes);
    decoded
}

/// The bytes cut into 8 kB pages whose headers are made plausible.
fn as_pages(bytes: &[u8]) -> Vec<u8> {
    let mut pages = Vec::new();
    for (i, chunk) in bytes.chunks(PAGE).enumerate() {
        let mut page = chunk.to_vec();
        page.resize(PAGE, 0);
        let lsn = (i * PAGE) as u64;
        let mut put = |at: usize, value: &[u8]| {
            if let Some(slot) = page.get_mut(at..at + value.len()) {
                slot.copy_from_slice(value);
            }
        };
        put(0, &0xD110u16.to_le_bytes());
        put(8, &lsn.to_le_bytes());
        let info = u16::from_le_bytes([chunk.get(2).copied().unwrap_or(0), chunk.get(3).copied().unwrap_or(0)]);
        let mut info = info & !0x0002;
        if lsn.is_multiple_of(SEGMENT) {
            info |= 0x0002;
            put(32, &(SEGMENT as u32).to_le_bytes());
            put(36, &(PAGE as u32).to_le_bytes());
        }
        put(2, &info.to_le_bytes());
        pages.extend_from_slice(&page);
    }
    pages
}

/// The bytes as records (rmid, info, a length byte ×97 so records span
/// pages, body), written as valid WAL.
pub fn written_records(mut rest: &[u8]) -> Vec<u8> {
    let mut writer = WalWriter::new(Lsn(0), SEGMENT);
    while let [rmid, info, len, tail @ ..] = rest {
        let len = (usize::from(*len) * 97).min(tail.len());
        let (body, next) = tail.split_at(len);
        writer.append(*rmid % 24, *info, 7, body);
        rest = next;
    }
    writer.finish_segment_padded()
}

/// The records the reader finds in `pages` when they arrive in pieces cut
/// at `cuts` (byte offsets), each feed given what the last one left over
/// as a stream's receive buffer would: (start, end, bytes) per record.
pub fn records_fed_in_pieces(pages: &[u8], cuts: &[usize]) -> Vec<(Lsn, Lsn, Vec<u8>)> {
    let mut reader = WalReader::new(Lsn(0), SEGMENT);
    let mut records = Vec::new();
    let mut buffer: Vec<u8> = Vec::new();
    let mut from = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| (*c).min(pages.len())).collect();
    ends.sort_unstable();
    ends.push(pages.len());
    for end in ends {
        buffer.extend_from_slice(pages.get(from..end.max(from)).unwrap_or_default());
        from = end.max(from);
        let used = reader.feed(&buffer, |raw| records.push((raw.lsn, raw.end, raw.bytes.to_vec())));
        buffer.drain(..used.min(buffer.len()));
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            exercise(&data);
        }

        #[test]
        fn records_are_the_same_however_the_input_is_split(
            script in proptest::collection::vec(any::<u8>(), 3..6_000),
            cuts in proptest::collection::vec(0usize..70_000, 0..12),
        ) {
            let pages = written_records(&script);
            let whole = records_fed_in_pieces(&pages, &[]);
            let page_by_page: Vec<usize> = (1..pages.len() / PAGE).map(|n| n * PAGE).collect();
            prop_assert_eq!(&records_fed_in_pieces(&pages, &page_by_page), &whole);
            prop_assert_eq!(&records_fed_in_pieces(&pages, &cuts), &whole);
        }
    }

    #[test]
    fn well_formed_records_are_all_found() {
        // Three records, the second spanning two pages.
        let mut script = vec![1, 0, 1];
        script.extend(vec![0xAB; 97]);
        script.extend([10, 0x10, 120]);
        script.extend(vec![0xCD; 120 * 97]);
        script.extend([1, 0, 0]);
        let pages = written_records(&script);
        assert_eq!(records_fed_in_pieces(&pages, &[]).len(), 3);
        assert_eq!(records_fed_in_pieces(&pages, &[1, 8191, 8193, 20_000]).len(), 3);
        assert!(exercise(&[2]) == 0 && exercise(&[]) == 0);
    }
}
