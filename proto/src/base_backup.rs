//! What BASE_BACKUP answers, as data: its result sets (start position,
//! tablespaces, end position) and, from PostgreSQL 15 on, the typed CopyData
//! messages of its one CopyOut (`n` new archive, `d` data, `m` manifest
//! follows, `p` progress). Before 15 each archive is its own raw CopyOut.
//! Pure: the agent feeds what its connection receives.

use crate::repo::backup::Tablespace;
use crate::{Lsn, TimelineId};
use bytes::Bytes;

/// One row of a result set, as text (NULL is `None`).
pub type Row = Vec<Option<String>>;

/// A tablespace as BASE_BACKUP lists it: OID (none for the data directory,
/// which comes last), location, and size in kB (with PROGRESS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablespaceRow {
    pub oid: Option<u32>,
    pub location: Option<String>,
    pub size_kb: Option<u64>,
}

impl TablespaceRow {
    /// The archive's name in a backup manifest: `base` or the OID.
    pub fn archive(&self) -> String {
        self.oid.map(|oid| oid.to_string()).unwrap_or_else(|| "base".to_string())
    }
}

/// The result sets, in the order the server sends them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupResults {
    pub start: Option<(Lsn, TimelineId)>,
    /// Set once the second result set has arrived.
    pub tablespaces: Option<Vec<TablespaceRow>>,
    pub end: Option<Lsn>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BaseBackupError {
    #[error("BASE_BACKUP result is missing a value")]
    Missing,
    #[error("BASE_BACKUP sent an unreadable {what}: {text:?}")]
    Unreadable { what: &'static str, text: String },
    #[error("unexpected BASE_BACKUP message type {0:?}")]
    UnknownMessage(Option<u8>),
}

fn cell(row: &Row, column: usize) -> Option<&str> {
    row.get(column)?.as_deref()
}

fn parsed<T: std::str::FromStr>(row: &Row, column: usize, what: &'static str) -> Result<T, BaseBackupError> {
    let text = cell(row, column).ok_or(BaseBackupError::Missing)?;
    text.parse().map_err(|_| BaseBackupError::Unreadable { what, text: text.to_string() })
}

impl BackupResults {
    /// Takes one completed result set. The start position and the
    /// tablespaces always come (the list may be empty); later empty sets
    /// (the CopyOuts' own completions) are not results.
    pub fn add(&mut self, rows: Vec<Row>) -> Result<(), BaseBackupError> {
        if self.start.is_none() {
            let row = rows.first().ok_or(BaseBackupError::Missing)?;
            self.start = Some((parsed(row, 0, "start LSN")?, TimelineId(parsed(row, 1, "timeline")?)));
        } else if self.tablespaces.is_none() {
            let list = rows
                .iter()
                .map(|row| TablespaceRow {
                    oid: cell(row, 0).and_then(|t| t.parse().ok()),
                    location: cell(row, 1).map(str::to_string),
                    size_kb: cell(row, 2).and_then(|t| t.parse().ok()),
                })
                .collect();
            self.tablespaces = Some(list);
        } else if let Some(row) = rows.first() {
            self.end = Some(parsed(row, 0, "end LSN")?);
        }
        Ok(())
    }

    /// The total size of the backup in bytes, once the tablespaces are known.
    pub fn total_bytes(&self) -> Option<u64> {
        Some(self.tablespaces.as_ref()?.iter().filter_map(|t| t.size_kb).sum::<u64>() * 1024)
    }

    /// The tablespaces other than the data directory, for the manifest.
    pub fn manifest_tablespaces(&self) -> Vec<Tablespace> {
        self.tablespaces
            .iter()
            .flatten()
            .filter_map(|t| Some(Tablespace { oid: t.oid?, location: t.location.clone()? }))
            .collect()
    }
}

/// A CopyData message of a PostgreSQL 15+ BASE_BACKUP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupMessage {
    /// A new archive begins: `base` or a tablespace OID.
    Archive(String),
    /// Bytes of the current archive, or of the manifest once it began.
    Data(Bytes),
    /// The backup_manifest follows (as `Data`).
    ManifestFollows,
    /// Bytes sent so far.
    Progress(u64),
}

/// The archive name of a `n` message's file name: `base.tar` -> `base`, `16384.tar` -> `16384`.
fn archive_of(file: &str) -> String {
    match file {
        "base.tar" => "base".to_string(),
        other => other.trim_end_matches(".tar").to_string(),
    }
}

pub fn parse_message(data: Bytes) -> Result<BackupMessage, BaseBackupError> {
    let kind = data.first().copied();
    let body = data.slice(1.min(data.len())..);
    match kind {
        Some(b'n') => {
            let name =
                body.split(|b| *b == 0).next().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default();
            Ok(BackupMessage::Archive(archive_of(&name)))
        }
        Some(b'd') => Ok(BackupMessage::Data(body)),
        Some(b'm') => Ok(BackupMessage::ManifestFollows),
        Some(b'p') => {
            let done = body.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
            Ok(BackupMessage::Progress(done))
        }
        other => Err(BaseBackupError::UnknownMessage(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[Option<&str>]) -> Row {
        cells.iter().map(|c| c.map(str::to_string)).collect()
    }

    #[test]
    fn result_sets_in_order() {
        let mut results = BackupResults::default();
        results.add(vec![row(&[Some("0/2000028"), Some("1")])]).expect("start");
        results
            .add(vec![row(&[Some("16384"), Some("/srv/ts"), Some("10")]), row(&[None, None, Some("30")])])
            .expect("tablespaces");
        results.add(vec![]).expect("an empty set is no result");
        results.add(vec![row(&[Some("0/2000100"), Some("1")])]).expect("end");
        assert_eq!(results.start, Some((Lsn(0x2000028), TimelineId(1))));
        assert_eq!(results.end, Some(Lsn(0x2000100)));
        assert_eq!(results.total_bytes(), Some(40 * 1024));
        assert_eq!(results.manifest_tablespaces(), vec![Tablespace { oid: 16384, location: "/srv/ts".into() }]);
        let archives: Vec<String> = results.tablespaces.iter().flatten().map(TablespaceRow::archive).collect();
        assert_eq!(archives, ["16384", "base"]);
        let mut bad = BackupResults::default();
        assert!(bad.add(vec![row(&[Some("x"), Some("1")])]).is_err());
        assert_eq!(bad.add(vec![]), Err(BaseBackupError::Missing));
    }

    #[test]
    fn messages() {
        let message = |bytes: &[u8]| parse_message(Bytes::copy_from_slice(bytes));
        assert_eq!(message(b"nbase.tar\0\0"), Ok(BackupMessage::Archive("base".into())));
        assert_eq!(message(b"n16384.tar\0/srv/ts\0"), Ok(BackupMessage::Archive("16384".into())));
        assert_eq!(message(b"dxyz"), Ok(BackupMessage::Data(Bytes::from_static(b"xyz"))));
        assert_eq!(message(b"m"), Ok(BackupMessage::ManifestFollows));
        assert_eq!(message(&[b'p', 0, 0, 0, 0, 0, 0, 1, 0]), Ok(BackupMessage::Progress(256)));
        assert_eq!(message(b"p"), Ok(BackupMessage::Progress(0)));
        assert_eq!(message(b""), Err(BaseBackupError::UnknownMessage(None)));
        assert_eq!(message(b"?"), Err(BaseBackupError::UnknownMessage(Some(b'?'))));
    }
}
