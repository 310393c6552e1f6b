//! Transaction ids.

use std::fmt;

/// A PostgreSQL transaction id (32 bits, as WAL records carry it). In JSON
/// and on the command line it is the bare number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Xid(pub u32);

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Xid {
    type Err = std::num::ParseIntError;
    fn from_str(text: &str) -> Result<Xid, Self::Err> {
        text.trim().parse().map(Xid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_are_the_bare_number() {
        assert_eq!("742".parse::<Xid>(), Ok(Xid(742)));
        assert!("-1".parse::<Xid>().is_err());
        assert_eq!(Xid(742).to_string(), "742");
        assert_eq!(serde_json::to_string(&Xid(742)).expect("json"), "742");
    }
}
