//! Timelines and timeline history files.

use crate::Lsn;
use std::fmt;

/// A PostgreSQL timeline id; 1 for a cluster that was never promoted or recovered.
/// In JSON it is the bare number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One line of a `%08X.history` file: `parent` was left at `switch_lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent: TimelineId,
    pub switch_lsn: Lsn,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid timeline history line {line}: {reason}")]
pub struct HistoryError {
    pub line: usize,
    pub reason: &'static str,
}

/// Parses a history file: lines `parentTLI <tab> switchpoint <tab> reason`,
/// blank lines and `#` comments ignored, as PostgreSQL's readTimeLineHistory does.
pub fn parse_history(content: &[u8]) -> Result<Vec<HistoryEntry>, HistoryError> {
    let text = String::from_utf8_lossy(content);
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parent = fields
            .next()
            .and_then(|f| f.parse::<u32>().ok())
            .ok_or(HistoryError { line: line_no, reason: "expected a timeline id" })?;
        let switch_lsn = fields
            .next()
            .and_then(|f| f.parse::<Lsn>().ok())
            .ok_or(HistoryError { line: line_no, reason: "expected a switch point X/Y" })?;
        entries.push(HistoryEntry { parent: TimelineId(parent), switch_lsn });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_history() {
        let content = b"1\t0/9021F58\tno recovery target specified\n\n2\t0/A000000\tat restore point \"x\"\n";
        let entries = parse_history(content).expect("valid history");
        assert_eq!(
            entries,
            vec![
                HistoryEntry { parent: TimelineId(1), switch_lsn: Lsn(0x0902_1F58) },
                HistoryEntry { parent: TimelineId(2), switch_lsn: Lsn(0x0A00_0000) },
            ]
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_history(b"one\t0/1").unwrap_err().line, 1);
        assert!(parse_history(b"1 nolsn").is_err());
    }
}
