//! What this machine remembers of an encrypted repository's
//! `repository.json`, so that one put back from an older copy is refused.
//!
//! The tags in `repository.json` prove a key holder wrote it, but an older
//! genuine copy (naming a retired key as current) carries valid tags too.
//! So each program remembers, per repository, the keys and current key it
//! last saw, the key derivation settings and whether the document was
//! authenticated, and refuses a document that goes backwards from there:
//! keys removed or reordered, an earlier key current again, other KDF
//! settings (checked before deriving anything), the tags gone.
//!
//! The agent remembers in its state directory; the restore tool, which needs
//! nothing but the repository, under `$XDG_STATE_HOME` (or
//! `~/.local/state`)`/tidemark/repositories/`, one file per repository URL.
//! The first contact trusts what it finds (and remembers it). A memory that
//! cannot be written is a warning, not a failure: a restore must not stop
//! because the home directory is read-only.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tidemark_proto::repo::layout::RepositoryMeta;
use tidemark_proto::repo::seal::KdfParams;

/// One repository as last seen (only encrypted ones are remembered).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub repository_id: Option<String>,
    /// The repository's key ids, oldest first.
    pub keys: Vec<String>,
    pub current_key: String,
    pub kdf: KdfParams,
    /// Whether `repository.json` was authenticated (format 3).
    pub authenticated: bool,
}

impl Remembered {
    /// What to remember of `meta`; `None` for a plain repository.
    pub fn of(meta: &RepositoryMeta) -> Option<Remembered> {
        let encryption = meta.encryption.as_ref()?;
        Some(Remembered {
            repository_id: meta.repository_id.clone(),
            keys: encryption.keys.iter().map(|k| k.id.clone()).collect(),
            current_key: encryption.current_key.clone(),
            kdf: encryption.kdf.clone(),
            authenticated: !meta.is_unauthenticated(),
        })
    }
}

/// Compares `meta` with what was remembered: `Err` says why it goes
/// backwards; `Ok(Some(_))` is what to remember now (first contact, a
/// rotation, an upgrade), `Ok(None)` nothing new.
pub fn compare(remembered: Option<&Remembered>, meta: &RepositoryMeta) -> Result<Option<Remembered>, String> {
    let Some(now) = Remembered::of(meta) else {
        return match remembered {
            Some(_) => Err("has no encryption settings, but the repository was encrypted when last opened here".into()),
            None => Ok(None),
        };
    };
    let Some(before) = remembered else { return Ok(Some(now)) };
    if before.authenticated && !now.authenticated {
        return Err("is in the older unauthenticated form, but was authenticated when last opened here".into());
    }
    if let (Some(was), Some(is)) = (&before.repository_id, &now.repository_id) {
        if was != is {
            return Err(format!("is repository {is}'s, but this location held repository {was} when last opened here"));
        }
    }
    if before.kdf != now.kdf {
        return Err("has other key derivation settings than when last opened here".into());
    }
    if now.keys.get(..before.keys.len()) != Some(&before.keys[..]) {
        return Err(format!(
            "lists keys {}, but listed {} when last opened here (keys are only ever added)",
            now.keys.join(", "),
            before.keys.join(", ")
        ));
    }
    let position = |id: &str| now.keys.iter().position(|k| k == id);
    if position(&now.current_key) < position(&before.current_key) {
        return Err(format!(
            "names key {} as current, but key {} (added after it) was current when last opened here",
            now.current_key, before.current_key
        ));
    }
    Ok((now != *before).then_some(now))
}

/// The restore tool's memory file for the repository at `location` (its
/// URL without credentials, or a local repository's resolved directory).
pub fn user_memory_file(location: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))?;
    let digest = Sha256::digest(location.as_bytes());
    let name: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    Some(base.join("tidemark").join("repositories").join(format!("{name}.json")))
}

/// What `path` remembers; `None` when there is no such file (or it cannot
/// be read, which is said).
pub fn load(path: &Path) -> Option<Remembered> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("cannot read {}: {e}; treating the repository as first seen", path.display());
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(remembered) => Some(remembered),
        Err(e) => {
            tracing::warn!(
                "{} is not what Tidemark wrote ({e}); treating the repository as first seen",
                path.display()
            );
            None
        }
    }
}

/// Remembers `remembered` in `path` (a temporary file renamed over it, so
/// concurrent `wal-get`s never see half a file); a failure is a warning.
pub fn save(path: &Path, remembered: &Remembered) {
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
        let temp = dir.join(format!(".{}.{}", std::process::id(), path.file_name().unwrap_or_default().display()));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&serde_json::to_vec_pretty(remembered).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        crate::durable::fsync_dir(dir)
    };
    if let Err(e) = write() {
        tracing::warn!("cannot remember the repository's current key in {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_proto::repo::layout::{EncryptionMeta, KeyRecord, FORMAT_VERSION, FORMAT_VERSION_UNAUTHENTICATED};

    fn meta(keys: &[&str], current: &str, format_version: u32) -> RepositoryMeta {
        RepositoryMeta {
            format_version,
            system_identifier: "1".into(),
            wal_segment_size: 16 << 20,
            server_version_num: 150000,
            created_at: "t".into(),
            encryption: Some(EncryptionMeta {
                cipher: "xchacha20-poly1305".into(),
                kdf: KdfParams::new([1; 16]),
                keys: keys.iter().map(|id| KeyRecord { id: id.to_string(), added_at: "t".into() }).collect(),
                current_key: current.into(),
                unbound_objects: false,
            }),
            repository_id: (format_version >= FORMAT_VERSION).then(|| "ab".repeat(16)),
            tags: Vec::new(),
        }
    }

    #[test]
    fn going_backwards_is_refused_and_forwards_remembered() {
        let first = meta(&["a"], "a", FORMAT_VERSION);
        let seen = compare(None, &first).expect("first contact").expect("remembered");
        assert_eq!(compare(Some(&seen), &first), Ok(None), "nothing new");
        let rotated = meta(&["a", "c"], "c", FORMAT_VERSION);
        let seen = compare(Some(&seen), &rotated).expect("a rotation").expect("remembered");
        assert_eq!(seen.current_key, "c");

        let cases = [
            (meta(&["a", "c"], "a", FORMAT_VERSION), "names key a as current"),
            (meta(&["a"], "a", FORMAT_VERSION), "keys are only ever added"),
            (meta(&["c", "a"], "a", FORMAT_VERSION), "keys are only ever added"),
            (meta(&["a", "c"], "c", FORMAT_VERSION_UNAUTHENTICATED), "older unauthenticated form"),
            (RepositoryMeta { encryption: None, ..rotated.clone() }, "no encryption settings"),
            (RepositoryMeta { repository_id: Some("cd".repeat(16)), ..rotated.clone() }, "this location held"),
        ];
        for (meta, expected) in cases {
            let refused = compare(Some(&seen), &meta).expect_err(expected);
            assert!(refused.contains(expected), "{refused}");
        }
        let mut costlier = rotated.clone();
        if let Some(e) = costlier.encryption.as_mut() {
            e.kdf.iterations = 4;
        }
        assert!(compare(Some(&seen), &costlier).expect_err("kdf").contains("key derivation"));
    }

    #[test]
    fn an_older_form_upgraded_moves_forward() {
        let legacy = meta(&["a"], "a", FORMAT_VERSION_UNAUTHENTICATED);
        let seen = compare(None, &legacy).expect("first contact").expect("remembered");
        assert!(!seen.authenticated);
        let upgraded = compare(Some(&seen), &meta(&["a"], "a", FORMAT_VERSION)).expect("upgrade").expect("new");
        assert!(upgraded.authenticated && upgraded.repository_id.is_some());
        // Plain repositories are not remembered.
        assert_eq!(compare(None, &RepositoryMeta { encryption: None, ..legacy }), Ok(None));
    }

    #[test]
    fn memory_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x/y.json");
        assert_eq!(load(&path), None);
        let remembered = compare(None, &meta(&["a"], "a", FORMAT_VERSION)).expect("ok").expect("new");
        save(&path, &remembered);
        assert_eq!(load(&path), Some(remembered));
        std::fs::write(&path, b"{").expect("write");
        assert_eq!(load(&path), None, "an unreadable memory is a first contact");
    }
}
