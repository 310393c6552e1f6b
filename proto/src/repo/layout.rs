//! Where each object lives in the repository, and the repository's own metadata.
//!
//! ```text
//! repository.json                          RepositoryMeta (plain JSON, not framed)
//! wal/TTTTTTTT/<segment name>              a complete segment, framed
//! wal/TTTTTTTT/<segment name>.partial      the durable prefix of a segment still
//!                                          being filled (or the last one of a timeline
//!                                          that was left), framed; superseded by the
//!                                          complete object when there is one
//! wal/TTTTTTTT/<segment name>.partial.OOOOOOOO
//!                                          the segment's bytes from offset OOOOOOOO
//!                                          (hex) on, continuing the prefix: see
//!                                          `repo::partial` in the repository crate
//! timelines/TTTTTTTT.history               a timeline history file, framed
//! ```
//!
//! **API boundary:** these keys are a stored format; changing one needs a new
//! `RepositoryMeta::format_version`.

use crate::repo::seal::{self, Binding, Key, SealError};
pub use crate::repo::seal::{EncryptionMeta, KeyRecord, MetaTag};
use crate::segment::{history_file_name, SegmentId, WalFileName};
use crate::TimelineId;
use serde::{Deserialize, Serialize};

pub const META_KEY: &str = "repository.json";
/// The newest format this build reads and writes. Version 2 added
/// encryption; version 3 authenticates an encrypted repository's
/// `repository.json` (`tags`) and binds its objects to its id. An
/// unencrypted repository is still written as version 1, so older builds
/// keep reading it, while an encrypted one is refused by them with "upgrade".
pub const FORMAT_VERSION: u32 = 3;
/// An encrypted repository before version 3: read as it is, upgraded by the
/// next command that writes to it with the key.
pub const FORMAT_VERSION_UNAUTHENTICATED: u32 = 2;
pub const FORMAT_VERSION_PLAIN: u32 = 1;

/// Written once when the repository is created; read by every command that opens it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryMeta {
    pub format_version: u32,
    /// The cluster this repository belongs to (IDENTIFY_SYSTEM's systemid), as text
    /// because JSON numbers lose precision above 2^53.
    pub system_identifier: String,
    pub wal_segment_size: u64,
    pub server_version_num: u32,
    pub created_at: String,
    /// Present when every object but this one is sealed (see `seal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionMeta>,
    /// An encrypted repository's random id (32 hex digits, format 3), which
    /// its sealed objects are bound to: objects copied from another
    /// repository sealed with the same key do not open here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
    /// This document's tags, one per key that signed it (format 3): over
    /// everything above, as [`RepositoryMeta::signed_bytes`] writes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<MetaTag>,
}

impl RepositoryMeta {
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        Ok(text)
    }

    pub fn from_json(bytes: &[u8]) -> Result<RepositoryMeta, String> {
        let meta: RepositoryMeta = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if meta.format_version > FORMAT_VERSION {
            return Err(format!(
                "repository format {} is newer than this build understands ({FORMAT_VERSION}); upgrade Tidemark",
                meta.format_version
            ));
        }
        if let Some(encryption) = &meta.encryption {
            if encryption.cipher != crate::repo::seal::CIPHER_NAME {
                return Err(format!("unknown cipher {:?}; upgrade Tidemark", encryption.cipher));
            }
            if !encryption.keys.iter().any(|k| k.id == encryption.current_key) {
                return Err(format!("current key {} is not among the repository's keys", encryption.current_key));
            }
            encryption.kdf.check_costs().map_err(|e| e.to_string())?;
        }
        meta.check_authentication_form()?;
        if !crate::segment::is_valid_segment_size(meta.wal_segment_size) {
            return Err(format!("invalid wal_segment_size {}", meta.wal_segment_size));
        }
        Ok(meta)
    }

    /// An encrypted repository of format 3 has an id and tags; one of an
    /// older format has neither (the form before they existed); a plain
    /// one is never of format 3 (which someone removing the encryption
    /// settings would leave behind).
    fn check_authentication_form(&self) -> Result<(), String> {
        let altered = |what: &str| format!("{what}: it was altered (put back the repository's own repository.json)");
        match (&self.encryption, self.format_version >= FORMAT_VERSION) {
            (None, true) => Err(altered("format 3 is an encrypted repository's, but there are no encryption settings")),
            (Some(_), true) => {
                let id_ok = self
                    .repository_id
                    .as_deref()
                    .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
                if !id_ok {
                    return Err(altered("repository_id is missing or not 32 hex digits"));
                }
                if self.tags.is_empty() {
                    return Err(altered("its authentication tags are missing"));
                }
                Ok(())
            }
            (Some(_), false) if !self.tags.is_empty() || self.repository_id.is_some() => {
                Err(altered(&format!("format {} has no id or tags, yet they are there", self.format_version)))
            }
            _ => Ok(()),
        }
    }

    /// An encrypted repository's metadata in the form before format 3:
    /// neither authenticated nor bound.
    pub fn is_unauthenticated(&self) -> bool {
        self.encryption.is_some() && self.format_version < FORMAT_VERSION
    }

    /// What this repository's sealed objects are bound to; `None` without an id.
    pub fn binding(&self) -> Option<Binding> {
        Some(Binding {
            repository_id: self.repository_id.clone()?,
            system_identifier: self.system_identifier.clone(),
            accept_unbound: self.encryption.as_ref().is_none_or(|e| e.unbound_objects),
        })
    }

    /// The bytes the tags cover: this document without its tags, compact.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, String> {
        let mut unsigned = self.clone();
        unsigned.tags.clear();
        serde_json::to_vec(&unsigned).map_err(|e| e.to_string())
    }

    /// Signs this document with each of `keys` (replacing any tags).
    pub fn sign(&mut self, keys: &[Key]) -> Result<(), String> {
        self.tags = seal::tag_meta(keys, &self.signed_bytes()?);
        Ok(())
    }

    /// Checks the tags of a format 3 document with the keys given (see
    /// [`seal::check_meta_tags`]); an older or plain one has none to check.
    pub fn authenticate(&self, keys: &[Key]) -> Result<(), SealError> {
        let Some(encryption) = self.encryption.as_ref().filter(|_| !self.is_unauthenticated()) else { return Ok(()) };
        let message = self.signed_bytes().map_err(SealError::MetaTag)?;
        seal::check_meta_tags(keys, &encryption.current_key, &message, &self.tags)
    }

    /// Brings an encrypted repository of an older format to format 3: an id
    /// (`repository_id`, random), its older objects still accepted until
    /// `reencrypt` re-seals them. The caller signs it.
    pub fn upgrade(&mut self, repository_id: String) {
        if let Some(encryption) = self.encryption.as_mut().filter(|_| self.format_version < FORMAT_VERSION) {
            encryption.unbound_objects = true;
            self.format_version = FORMAT_VERSION;
            self.repository_id = Some(repository_id);
        }
    }
}

fn timeline_dir(timeline: TimelineId) -> String {
    format!("wal/{:08X}", timeline.0)
}

/// Key of a complete segment.
pub fn segment_key(segment: SegmentId, segment_size: u64) -> String {
    format!("{}/{}", timeline_dir(segment.timeline), segment.file_name(segment_size))
}

/// Key of the partial object of a segment.
pub fn partial_segment_key(segment: SegmentId, segment_size: u64) -> String {
    format!("{}.partial", segment_key(segment, segment_size))
}

/// Key of a piece of a segment's durable prefix: the bytes from `offset`
/// (never 0: the prefix object starts there) on.
pub fn partial_piece_key(segment: SegmentId, segment_size: u64, offset: u64) -> String {
    format!("{}.{offset:08X}", partial_segment_key(segment, segment_size))
}

pub fn history_key(timeline: TimelineId) -> String {
    format!("timelines/{}", history_file_name(timeline))
}

/// Where the audit summaries live: `summaries/<timeline>/<segment name>`.
pub const SUMMARIES_PREFIX: &str = "summaries/";

/// Key of the audit summary of the records starting in `segment`.
pub fn summary_key(segment: SegmentId, segment_size: u64) -> String {
    format!("{SUMMARIES_PREFIX}{:08X}/{}", segment.timeline.0, segment.file_name(segment_size))
}

/// A listed object key read back into what it holds. Keys that are none of
/// these (a staging file, an unknown prefix) are `None` from [`ObjectKey::parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectKey {
    Meta,
    /// `wal/TTTTTTTT/<segment>`
    Segment(SegmentId),
    /// `wal/TTTTTTTT/<segment>.partial`
    PartialSegment(SegmentId),
    /// `wal/TTTTTTTT/<segment>.partial.OOOOOOOO`: the bytes from `offset` on.
    PartialPiece {
        segment: SegmentId,
        offset: u64,
    },
    /// `timelines/TTTTTTTT.history`
    History(TimelineId),
    /// `summaries/TTTTTTTT/<segment>`
    Summary(SegmentId),
    /// `backups/<id>/chunks/<n>`
    Chunk {
        backup: String,
        n: u64,
    },
    /// `backups/<id>/backup.json`
    BackupManifest {
        backup: String,
    },
    /// `backups/<id>/backup_manifest`
    PgManifest {
        backup: String,
    },
}

impl ObjectKey {
    pub fn parse(key: &str, segment_size: u64) -> Option<ObjectKey> {
        if key == META_KEY {
            return Some(ObjectKey::Meta);
        }
        let (prefix, rest) = key.split_once('/')?;
        let segment_in = |dir: &str, name: &str| -> Option<SegmentId> {
            let timeline = u32::from_str_radix(dir, 16).ok().filter(|_| dir.len() == 8)?;
            match WalFileName::parse(name, segment_size).ok()? {
                WalFileName::Segment(segment) if segment.timeline.0 == timeline => Some(segment),
                _ => None,
            }
        };
        match prefix {
            "wal" => {
                let (dir, name) = rest.split_once('/')?;
                if let Some(base) = name.strip_suffix(".partial") {
                    return segment_in(dir, base).map(ObjectKey::PartialSegment);
                }
                if let Some((base, offset)) = name.split_once(".partial.") {
                    // Eight hex digits, inside the segment, never 0 (that is the prefix).
                    let hex = offset.len() == 8 && offset.bytes().all(|b| b.is_ascii_hexdigit());
                    let offset = u64::from_str_radix(offset, 16).ok().filter(|o| hex && *o > 0 && *o < segment_size)?;
                    return segment_in(dir, base).map(|segment| ObjectKey::PartialPiece { segment, offset });
                }
                segment_in(dir, name).map(ObjectKey::Segment)
            }
            "summaries" => {
                let (dir, name) = rest.split_once('/')?;
                segment_in(dir, name).map(ObjectKey::Summary)
            }
            "timelines" => match WalFileName::parse(rest, segment_size).ok()? {
                WalFileName::History(timeline) => Some(ObjectKey::History(timeline)),
                WalFileName::Segment(_) => None,
            },
            "backups" => {
                let (backup, what) = rest.split_once('/')?;
                let backup = backup.to_string();
                match what {
                    "backup.json" => Some(ObjectKey::BackupManifest { backup }),
                    "backup_manifest" => Some(ObjectKey::PgManifest { backup }),
                    _ => {
                        let n = what.strip_prefix("chunks/")?;
                        n.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
                        Some(ObjectKey::Chunk { backup, n: n.parse().ok()? })
                    }
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let segment = SegmentId { timeline: TimelineId(2), segment_no: 0xB };
        let size = 16 << 20;
        assert_eq!(segment_key(segment, size), "wal/00000002/00000002000000000000000B");
        assert_eq!(partial_segment_key(segment, size), "wal/00000002/00000002000000000000000B.partial");
        assert_eq!(partial_piece_key(segment, size, 0x2000), "wal/00000002/00000002000000000000000B.partial.00002000");
        assert_eq!(history_key(TimelineId(3)), "timelines/00000003.history");
    }

    #[test]
    fn listed_keys_parse_back_into_what_they_hold() {
        let size = 16 << 20;
        let segment = SegmentId { timeline: TimelineId(2), segment_no: 0xB };
        let cases = [
            (segment_key(segment, size), Some(ObjectKey::Segment(segment))),
            (partial_segment_key(segment, size), Some(ObjectKey::PartialSegment(segment))),
            (partial_piece_key(segment, size, 0x2000), Some(ObjectKey::PartialPiece { segment, offset: 0x2000 })),
            ("wal/00000002/00000002000000000000000B.partial.00000000".into(), None),
            ("wal/00000002/00000002000000000000000B.partial.01000000".into(), None),
            ("wal/00000002/00000002000000000000000B.partial.2000".into(), None),
            ("wal/00000002/00000002000000000000000B.partial.0000200G".into(), None),
            (summary_key(segment, size), Some(ObjectKey::Summary(segment))),
            (history_key(TimelineId(3)), Some(ObjectKey::History(TimelineId(3)))),
            ("repository.json".into(), Some(ObjectKey::Meta)),
            ("backups/B/chunks/00000007".into(), Some(ObjectKey::Chunk { backup: "B".into(), n: 7 })),
            ("backups/B/backup.json".into(), Some(ObjectKey::BackupManifest { backup: "B".into() })),
            ("backups/B/backup_manifest".into(), Some(ObjectKey::PgManifest { backup: "B".into() })),
            // A segment filed under another timeline's directory, staging files, strangers.
            ("wal/00000001/00000002000000000000000B".into(), None),
            ("wal/00000002/00000002000000000000000B#1".into(), None),
            ("backups/B/chunks/-1".into(), None),
            ("elsewhere/x".into(), None),
        ];
        for (key, expected) in cases {
            assert_eq!(ObjectKey::parse(&key, size), expected, "{key}");
        }
    }

    #[test]
    fn meta_round_trip_and_refusals() {
        let meta = RepositoryMeta {
            format_version: 1,
            system_identifier: "7711696038950075490".into(),
            wal_segment_size: 16 << 20,
            server_version_num: 150018,
            created_at: "2026-11-25T01:00:00Z".into(),
            encryption: None,
            repository_id: None,
            tags: Vec::new(),
        };
        assert_eq!(RepositoryMeta::from_json(&meta.to_json().expect("json")), Ok(meta.clone()));
        let newer = RepositoryMeta { format_version: 99, ..meta.clone() };
        assert!(RepositoryMeta::from_json(&newer.to_json().expect("json")).unwrap_err().contains("upgrade"));
        let odd = RepositoryMeta { wal_segment_size: 3, ..meta.clone() };
        assert!(RepositoryMeta::from_json(&odd.to_json().expect("json")).is_err());
        assert!(RepositoryMeta::from_json(b"{").is_err());
        // Format 3 without encryption settings: someone removed them.
        let stripped = RepositoryMeta { format_version: FORMAT_VERSION, ..meta };
        assert!(RepositoryMeta::from_json(&stripped.to_json().expect("json")).unwrap_err().contains("altered"));
    }

    fn encrypted(keys: &[Key]) -> RepositoryMeta {
        let records =
            keys.iter().map(|k| KeyRecord { id: k.id.to_string(), added_at: "2026-11-25T01:00:00Z".into() }).collect();
        RepositoryMeta {
            format_version: FORMAT_VERSION_UNAUTHENTICATED,
            system_identifier: "7711696038950075490".into(),
            wal_segment_size: 16 << 20,
            server_version_num: 150018,
            created_at: "2026-11-25T01:00:00Z".into(),
            encryption: Some(EncryptionMeta {
                cipher: seal::CIPHER_NAME.into(),
                kdf: seal::KdfParams::new([1; 16]),
                keys: records,
                current_key: keys.last().map(|k| k.id.to_string()).unwrap_or_default(),
                unbound_objects: false,
            }),
            repository_id: None,
            tags: Vec::new(),
        }
    }

    #[test]
    fn an_older_encrypted_form_reads_and_upgrades_and_the_new_one_is_authenticated() {
        let (old, new) = (Key::from_bytes([1; 32]), Key::from_bytes([2; 32]));
        let legacy = encrypted(&[old.clone(), new.clone()]);
        let read = RepositoryMeta::from_json(&legacy.to_json().expect("json")).expect("legacy form");
        assert!(read.is_unauthenticated() && read.binding().is_none());
        assert_eq!(read.authenticate(std::slice::from_ref(&new)), Ok(()), "nothing to check in the older form");

        let mut upgraded = read;
        upgraded.upgrade("ab".repeat(16));
        upgraded.sign(std::slice::from_ref(&new)).expect("sign");
        let read = RepositoryMeta::from_json(&upgraded.to_json().expect("json")).expect("format 3");
        assert_eq!(read.format_version, FORMAT_VERSION);
        assert_eq!(read.authenticate(std::slice::from_ref(&new)), Ok(()));
        assert!(read.binding().is_some_and(|b| b.accept_unbound), "older objects stay readable");

        // Edits: rolled back to the older key, a higher KDF cost, the tags
        // or the id removed, the format lowered.
        let mut rolled_back = read.clone();
        if let Some(e) = rolled_back.encryption.as_mut() {
            e.current_key = old.id.to_string();
        }
        assert!(rolled_back.authenticate(&[old.clone(), new.clone()]).is_err());
        let mut costly = read.clone();
        if let Some(e) = costly.encryption.as_mut() {
            e.kdf.memory_kib = u32::MAX;
        }
        assert!(RepositoryMeta::from_json(&costly.to_json().expect("json")).unwrap_err().contains("Argon2id memory"));
        let untagged = RepositoryMeta { tags: Vec::new(), ..read.clone() };
        assert!(RepositoryMeta::from_json(&untagged.to_json().expect("json")).unwrap_err().contains("tags"));
        let no_id = RepositoryMeta { repository_id: None, ..read.clone() };
        assert!(RepositoryMeta::from_json(&no_id.to_json().expect("json")).is_err());
        let lowered = RepositoryMeta { format_version: FORMAT_VERSION_UNAUTHENTICATED, ..read };
        assert!(RepositoryMeta::from_json(&lowered.to_json().expect("json")).unwrap_err().contains("altered"));
    }
}
