//! Log sequence numbers: byte positions in the WAL stream.

use std::fmt;
use std::str::FromStr;

/// A position in the WAL, printed as PostgreSQL prints it: `X/Y`, the high and
/// low 32 bits in uppercase hex without padding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected the form X/Y in hexadecimal, e.g. 0/16B3748")]
pub struct ParseLsnError(pub String);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Number of the segment holding this position.
    pub fn segment_no(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }

    /// Offset of this position inside its segment.
    pub fn segment_offset(self, segment_size: u64) -> u64 {
        self.0 % segment_size
    }

    /// The first byte of the segment holding this position.
    pub fn segment_start(self, segment_size: u64) -> Lsn {
        Lsn(self.0 - self.0 % segment_size)
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }

    pub fn saturating_sub(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// In JSON (manifests, reports) an LSN is its `X/Y` text, as PostgreSQL prints it.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// For stored records that have always kept an LSN as a JSON number (the
/// agent's index): `#[serde(with = "tidemark_proto::lsn::as_number")]`.
pub mod as_number {
    use super::Lsn;

    pub fn serialize<S: serde::Serializer>(lsn: &Lsn, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(lsn.0)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        <u64 as serde::Deserialize>::deserialize(deserializer).map(Lsn)
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseLsnError(text.to_string());
        let (high, low) = text.trim().split_once('/').ok_or_else(error)?;
        let hex = |part: &str| -> Result<u32, ParseLsnError> {
            if part.is_empty() || part.len() > 8 {
                return Err(error());
            }
            u32::from_str_radix(part, 16).map_err(|_| error())
        };
        Ok(Lsn((u64::from(hex(high)?) << 32) | u64::from(hex(low)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_like_postgresql() {
        assert_eq!(Lsn(0x0B00_0028).to_string(), "0/B000028");
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
    }

    #[test]
    fn parses_padded_and_unpadded() {
        assert_eq!("0/0B000028".parse::<Lsn>(), Ok(Lsn(0x0B00_0028)));
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert!("0B000028".parse::<Lsn>().is_err());
        assert!("0/".parse::<Lsn>().is_err());
        assert!("0/123456789".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_arithmetic() {
        let size = 16 * 1024 * 1024;
        let lsn = Lsn(0x0B03_1718);
        assert_eq!(lsn.segment_no(size), 0xB);
        assert_eq!(lsn.segment_offset(size), 0x3_1718);
        assert_eq!(lsn.segment_start(size), Lsn(0x0B00_0000));
    }

    proptest! {
        #[test]
        fn text_round_trip(n: u64) {
            prop_assert_eq!(Lsn(n).to_string().parse::<Lsn>(), Ok(Lsn(n)));
        }

        #[test]
        fn parse_never_panics(text in ".*") {
            let _ = text.parse::<Lsn>();
        }
    }
}
