//! WAL file names: segments (`TTTTTTTTXXXXXXXXYYYYYYYY`) and timeline history files.

use crate::{Lsn, TimelineId};
use std::fmt;

/// One WAL segment of one timeline.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SegmentId {
    pub timeline: TimelineId,
    pub segment_no: u64,
}

/// A WAL file name as PostgreSQL's restore_command is asked for it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalFileName {
    Segment(SegmentId),
    History(TimelineId),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a WAL file name: expected 24 hex digits (a segment) or 8 hex digits + .history")]
pub struct WalFileNameError(pub String);

/// Segment sizes PostgreSQL accepts: powers of two from 1 MiB to 1 GiB.
pub fn is_valid_segment_size(bytes: u64) -> bool {
    bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes)
}

impl SegmentId {
    pub fn containing(timeline: TimelineId, lsn: Lsn, segment_size: u64) -> SegmentId {
        SegmentId { timeline, segment_no: lsn.segment_no(segment_size) }
    }

    pub fn start_lsn(self, segment_size: u64) -> Lsn {
        Lsn(self.segment_no.saturating_mul(segment_size))
    }

    pub fn end_lsn(self, segment_size: u64) -> Lsn {
        Lsn(self.segment_no.saturating_add(1).saturating_mul(segment_size))
    }

    pub fn next(self) -> SegmentId {
        SegmentId { timeline: self.timeline, segment_no: self.segment_no.saturating_add(1) }
    }

    /// The file name, e.g. `00000001000000000000000B`, for the given segment size.
    pub fn file_name(self, segment_size: u64) -> String {
        let per_xlogid = segments_per_xlogid(segment_size);
        format!("{:08X}{:08X}{:08X}", self.timeline.0, self.segment_no / per_xlogid, self.segment_no % per_xlogid)
    }
}

fn segments_per_xlogid(segment_size: u64) -> u64 {
    (0x1_0000_0000 / segment_size.max(1)).max(1)
}

pub fn history_file_name(timeline: TimelineId) -> String {
    format!("{:08X}.history", timeline.0)
}

impl WalFileName {
    /// Parses a name PostgreSQL asks its restore_command for.
    pub fn parse(name: &str, segment_size: u64) -> Result<WalFileName, WalFileNameError> {
        let error = || WalFileNameError(name.to_string());
        let hex = |s: &str| u32::from_str_radix(s, 16).map_err(|_| error());
        let all_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() != 8 || !all_hex(tli) {
                return Err(error());
            }
            return Ok(WalFileName::History(TimelineId(hex(tli)?)));
        }
        if name.len() != 24 || !all_hex(name) {
            return Err(error());
        }
        let (tli, rest) = name.split_at(8);
        let (log, seg) = rest.split_at(8);
        let per_xlogid = segments_per_xlogid(segment_size);
        let seg = u64::from(hex(seg)?);
        if seg >= per_xlogid {
            return Err(error());
        }
        Ok(WalFileName::Segment(SegmentId {
            timeline: TimelineId(hex(tli)?),
            segment_no: u64::from(hex(log)?) * per_xlogid + seg,
        }))
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timeline {} segment {}", self.timeline, self.segment_no)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB16: u64 = 16 * 1024 * 1024;

    #[test]
    fn names_like_postgresql() {
        let id = SegmentId::containing(TimelineId(1), Lsn(0x0B03_1718), MB16);
        assert_eq!(id.file_name(MB16), "00000001000000000000000B");
        let high = SegmentId::containing(TimelineId(2), Lsn(0x16_B374_D848), MB16);
        assert_eq!(high.file_name(MB16), "0000000200000016000000B3");
        let big = SegmentId::containing(TimelineId(1), Lsn(0x1_4000_0000), 1 << 30);
        assert_eq!(big.file_name(1 << 30), "000000010000000100000001");
    }

    #[test]
    fn parses_names() {
        assert_eq!(
            WalFileName::parse("0000000200000016000000B3", MB16),
            Ok(WalFileName::Segment(SegmentId { timeline: TimelineId(2), segment_no: 0x16 * 256 + 0xB3 }))
        );
        assert_eq!(WalFileName::parse("00000003.history", MB16), Ok(WalFileName::History(TimelineId(3))));
        assert!(WalFileName::parse("000000010000000000000100", MB16).is_err());
        assert!(WalFileName::parse("00000001000000000000000B.partial", MB16).is_err());
        assert!(WalFileName::parse("../../etc/passwd", MB16).is_err());
        assert!(WalFileName::parse("0000000g.history", MB16).is_err());
    }

    #[test]
    fn segment_sizes() {
        assert!(is_valid_segment_size(MB16));
        assert!(!is_valid_segment_size(3 << 20));
        assert!(!is_valid_segment_size(1 << 19));
    }

    proptest! {
        #[test]
        fn name_round_trip(tli in 1u32.., segment_no in 0u64..(1 << 40), shift in 20u32..=30) {
            let size = 1u64 << shift;
            let id = SegmentId { timeline: TimelineId(tli), segment_no: segment_no % (1u64 << (64 - shift)) };
            let name = id.file_name(size);
            prop_assert_eq!(WalFileName::parse(&name, size), Ok(WalFileName::Segment(id)));
        }

        #[test]
        fn parse_never_panics(name in ".*", shift in 0u32..40) {
            let _ = WalFileName::parse(&name, 1u64 << shift);
        }
    }
}
