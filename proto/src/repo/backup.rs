//! Base backups in the repository.
//!
//! ```text
//! backups/<id>/chunks/<n>        a piece (at most CHUNK_SIZE bytes) of a file, framed
//! backups/<id>/backup_manifest   the server's own backup_manifest, framed
//! backups/<id>/backup.json       BackupManifest, framed; written last: a backup
//!                                without it is incomplete and is never listed
//! ```
//!
//! A chunk identical to the one at the same place of the same file in the
//! previous backup (same length, CRC-32 and CRC-32C: 64 bits of checksum) is
//! not stored again; the manifest refers to the earlier backup's object.
//!
//! An incremental backup names its `base`; each of its relation files with
//! `blocks` holds only those 8 kB blocks (in order, in its chunks), and every
//! other block of the file comes from the base's same file, which may itself
//! be incremental (a chain, put back together by [`crate::repo::chain`]).
//! Incremental backups are format 2, which builds that know only format 1
//! refuse instead of restoring them wrongly; full backups stay format 1.
//! An incremental backup whose files store their blocks XORed with the
//! chain's whole copy of the file (`pages_xor`) is format 3.
//!
//! **API boundary:** a stored format; changing it needs a new `FORMAT_VERSION`.

use crate::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};

/// The format of a full backup's manifest.
pub const FORMAT_VERSION: u32 = 1;
/// The format of an incremental backup's manifest (one with `base`).
pub const INCREMENTAL_FORMAT_VERSION: u32 = 2;
/// The format of an incremental backup with files stored as XORed pages.
pub const XOR_FORMAT_VERSION: u32 = 3;
pub const CHUNK_SIZE: usize = 8 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format_version: u32,
    pub id: String,
    pub label: String,
    pub system_identifier: String,
    pub server_version_num: u32,
    pub timeline: TimelineId,
    /// The checkpoint's redo point: WAL from here on is needed.
    pub start_lsn: Lsn,
    /// Recovery is consistent once WAL up to here is replayed.
    pub end_lsn: Lsn,
    pub start_time: String,
    pub end_time: String,
    pub tablespaces: Vec<Tablespace>,
    pub files: Vec<BackupFile>,
    /// Key of the server's backup_manifest.
    pub pg_manifest_key: String,
    /// Bytes of the data directory (sum of file sizes).
    pub bytes: u64,
    /// Bytes this backup added to the repository (chunks it did not reuse).
    pub stored_bytes: u64,
    /// Bytes of files the server sent for it: the data directory's size for
    /// a full backup, less for an incremental one that read only changed
    /// blocks (`None` in backups taken before Tidemark counted them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
    /// The backup this one is incremental on; `None` for a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// A backup in reports. **Stable JSON:** the fields are in alphabetical
/// order, as they were when reports were built as JSON maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// The backup this one is incremental on (`null` for a full backup).
    pub base: Option<String>,
    pub bytes: u64,
    pub end_lsn: Lsn,
    pub end_time: String,
    pub id: String,
    pub label: String,
    /// Bytes of files the server sent (see [`BackupManifest::read_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
    pub start_lsn: Lsn,
    pub start_time: String,
    pub stored_bytes: u64,
    pub timeline: TimelineId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    pub location: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// `base` for the data directory, else the tablespace OID.
    pub archive: String,
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    pub chunks: Vec<ChunkRef>,
    /// In an incremental backup, a relation file stored block by block: the
    /// ranges (`[first block, count]`, ascending) of the 8 kB blocks whose
    /// bytes `chunks` hold, in order. Every other block below `size` comes
    /// from the base backup's same file. `None`: `chunks` hold the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<[u32; 2]>>,
    /// The stored blocks are XORed with the same block of this file in the
    /// chain's backup that holds it whole (zeros past that copy's end): a
    /// page that changed a little becomes mostly zeros, which compress to
    /// almost nothing. Each chunk's `pages_crc32c` checks the undone XOR.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pages_xor: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub key: String,
    pub raw_len: u64,
    pub crc32: u32,
    pub crc32c: u32,
    /// In a file with `pages_xor`: the CRC-32C of the chunk's pages once
    /// the XOR is undone (`crc32`/`crc32c` are the stored bytes').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_crc32c: Option<u32>,
}

pub fn backup_prefix(id: &str) -> String {
    format!("backups/{id}/")
}

pub fn manifest_key(id: &str) -> String {
    format!("backups/{id}/backup.json")
}

pub fn chunk_key(id: &str, n: u64) -> String {
    format!("backups/{id}/chunks/{n:08}")
}

pub fn pg_manifest_key(id: &str) -> String {
    format!("backups/{id}/backup_manifest")
}

/// Ids of complete backups (those with a `backup.json`) among repository
/// keys, oldest first.
pub fn complete_backup_ids<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut ids: Vec<String> = keys
        .into_iter()
        .filter_map(|key| key.strip_prefix("backups/")?.strip_suffix("/backup.json").map(str::to_string))
        .collect();
    ids.sort();
    ids
}

impl BackupManifest {
    /// The backup as reports show it (`list --json`, `status --json`,
    /// `backup --json`): the stable fields, without the file list.
    pub fn summary(&self) -> BackupSummary {
        BackupSummary {
            base: self.base.clone(),
            bytes: self.bytes,
            end_lsn: self.end_lsn,
            end_time: self.end_time.clone(),
            id: self.id.clone(),
            label: self.label.clone(),
            start_lsn: self.start_lsn,
            start_time: self.start_time.clone(),
            stored_bytes: self.stored_bytes,
            read_bytes: self.read_bytes,
            timeline: self.timeline,
        }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub fn from_json(bytes: &[u8]) -> Result<BackupManifest, String> {
        let manifest: BackupManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.format_version > XOR_FORMAT_VERSION {
            return Err(format!(
                "backup format {} is newer than this build understands ({XOR_FORMAT_VERSION}); upgrade Tidemark",
                manifest.format_version
            ));
        }
        if manifest.base.is_some() != (manifest.format_version >= INCREMENTAL_FORMAT_VERSION) {
            return Err(format!(
                "backup format {} disagrees with its base {:?}",
                manifest.format_version, manifest.base
            ));
        }
        if manifest.base.is_none() && manifest.files.iter().any(|f| f.blocks.is_some()) {
            return Err("a full backup lists a file stored block by block".into());
        }
        for file in manifest.files.iter().filter(|f| f.pages_xor) {
            if manifest.format_version < XOR_FORMAT_VERSION || file.blocks.is_none() {
                return Err(format!("{} has XORed pages but is not stored by block in a format 3 backup", file.path));
            }
            if file.chunks.iter().any(|c| c.pages_crc32c.is_none()) {
                return Err(format!("{} has XORed pages without their checksum", file.path));
            }
        }
        for file in &manifest.files {
            if file.path.starts_with('/') || file.path.split('/').any(|p| p == "..") {
                return Err(format!("backup file path {:?} escapes the data directory", file.path));
            }
        }
        Ok(manifest)
    }

    /// The file at `archive`/`path`, for reusing unchanged chunks.
    pub fn file(&self, archive: &str, path: &str) -> Option<&BackupFile> {
        self.files.iter().find(|f| f.archive == archive && f.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> BackupManifest {
        BackupManifest {
            format_version: 1,
            id: "20261125T020000Z".into(),
            label: "nightly".into(),
            system_identifier: "1".into(),
            server_version_num: 150018,
            timeline: TimelineId(1),
            start_lsn: Lsn(0x2000028),
            end_lsn: Lsn(0x2000100),
            start_time: "2026-11-25T02:00:00Z".into(),
            end_time: "2026-11-25T02:00:01Z".into(),
            tablespaces: vec![],
            files: vec![BackupFile {
                archive: "base".into(),
                path: "PG_VERSION".into(),
                kind: FileKind::File,
                size: 3,
                mode: 0o600,
                mtime_unix: 0,
                link_target: None,
                chunks: vec![ChunkRef {
                    key: chunk_key("20261125T020000Z", 0),
                    raw_len: 3,
                    crc32: 1,
                    crc32c: 2,
                    pages_crc32c: None,
                }],
                blocks: None,
                pages_xor: false,
            }],
            pg_manifest_key: pg_manifest_key("20261125T020000Z"),
            bytes: 3,
            stored_bytes: 40,
            read_bytes: None,
            base: None,
        }
    }

    #[test]
    fn round_trip_and_lookup() {
        let m = manifest();
        let back = BackupManifest::from_json(&m.to_json().expect("json")).expect("valid");
        assert_eq!(back, m);
        assert!(back.file("base", "PG_VERSION").is_some());
        assert!(back.file("16384", "PG_VERSION").is_none());
    }

    #[test]
    fn positions_are_text_in_json() {
        let json: serde_json::Value = serde_json::from_slice(&manifest().to_json().expect("json")).expect("json");
        assert_eq!(json["start_lsn"], "0/2000028");
        assert_eq!(json["timeline"], 1);
        let summary = serde_json::to_string(&manifest().summary()).expect("json");
        assert!(summary.starts_with(r#"{"base":null,"bytes":3,"end_lsn":"0/2000100","end_time":"#), "{summary}");
        // A full backup's manifest reads as before incremental backups existed.
        let text = String::from_utf8(manifest().to_json().expect("json")).expect("utf-8");
        assert!(!text.contains("\"base\":") && !text.contains("\"blocks\":"), "{text}");
    }

    #[test]
    fn complete_ids_from_keys() {
        let keys = [
            "backups/B/backup.json",
            "backups/A/chunks/00000000",
            "backups/A/backup.json",
            "backups/C/chunks/1",
            "wal/x",
        ];
        assert_eq!(complete_backup_ids(keys), vec!["A".to_string(), "B".to_string()]);
    }

    #[test]
    fn refuses_escaping_paths_and_newer_formats() {
        let mut m = manifest();
        m.files[0].path = "../../etc/passwd".into();
        assert!(BackupManifest::from_json(&m.to_json().expect("json")).is_err());
        let mut m = manifest();
        m.format_version = 7;
        assert!(BackupManifest::from_json(&m.to_json().expect("json")).unwrap_err().contains("upgrade"));
    }

    #[test]
    fn incremental_manifests_are_format_2_and_only_they_have_blocks() {
        let mut m = manifest();
        m.base = Some("20261124T020000Z".into());
        assert!(BackupManifest::from_json(&m.to_json().expect("json")).is_err(), "format 1 with a base");
        m.format_version = INCREMENTAL_FORMAT_VERSION;
        m.files[0].blocks = Some(vec![[0, 1]]);
        let back = BackupManifest::from_json(&m.to_json().expect("json")).expect("valid");
        assert_eq!(back.files[0].blocks, Some(vec![[0, 1]]));
        assert_eq!(back.summary().base.as_deref(), Some("20261124T020000Z"));
        let mut full = manifest();
        full.files[0].blocks = Some(vec![[0, 1]]);
        assert!(BackupManifest::from_json(&full.to_json().expect("json")).is_err(), "blocks without a base");
    }

    #[test]
    fn xored_pages_need_format_3_blocks_and_their_checksums() {
        let mut m = manifest();
        m.base = Some("20261124T020000Z".into());
        m.format_version = INCREMENTAL_FORMAT_VERSION;
        m.files[0].blocks = Some(vec![[0, 1]]);
        m.files[0].pages_xor = true;
        m.files[0].chunks[0].pages_crc32c = Some(9);
        assert!(BackupManifest::from_json(&m.to_json().expect("json")).is_err(), "XORed pages in format 2");
        m.format_version = XOR_FORMAT_VERSION;
        let back = BackupManifest::from_json(&m.to_json().expect("json")).expect("valid");
        assert!(back.files[0].pages_xor);
        assert_eq!(back.files[0].chunks[0].pages_crc32c, Some(9));
        m.files[0].chunks[0].pages_crc32c = None;
        assert!(BackupManifest::from_json(&m.to_json().expect("json")).is_err(), "without the pages' checksum");
        m.files[0].chunks[0].pages_crc32c = Some(9);
        m.files[0].blocks = None;
        assert!(BackupManifest::from_json(&m.to_json().expect("json")).is_err(), "XORed but not by block");
        // Files without XORed pages keep the JSON they had.
        let plain = serde_json::to_string(&manifest()).expect("json");
        assert!(!plain.contains("pages_xor") && !plain.contains("pages_crc32c"), "{plain}");
    }
}
