//! Encryption keys: `keygen`, the encryption settings of a new repository,
//! `rotate-key` and `reencrypt`.
//!
//! Rotation never rewrites an object by itself: `rotate-key` only adds the
//! new key to `repository.json` and makes it current, so objects sealed
//! before stay readable as long as the old key file is also given.
//! `reencrypt` then re-seals old objects one by one; each object is replaced
//! atomically, and objects already under the current key are skipped, so an
//! interrupted run is simply started again.

use crate::config::Settings;
use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_proto::repo::layout::{EncryptionMeta, KeyRecord, ObjectKey, META_KEY};
use tidemark_proto::repo::seal::{self, KdfParams, Keyring};
use tidemark_repo::store::read_key_files;
use tidemark_repo::Fail;

/// Writes a new random key (64 hex digits) to `path`, owner-only, never over an existing file.
pub fn keygen(path: &Path) -> anyhow::Result<String> {
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).context("draw a random key")?;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        Fail::new(format!("cannot create key file {}: {e}", path.display()), "choose a path that does not exist yet")
    })?;
    file.write_all(format!("{}\n", seal::hex_encode(&key)).as_bytes())?;
    file.sync_all()?;
    Ok(seal::Key::from_bytes(key).id.to_string())
}

/// The encryption settings and keys of a repository being created with `key_files`.
pub fn new_encryption(key_files: &[PathBuf]) -> anyhow::Result<(EncryptionMeta, Arc<Keyring>)> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).context("draw a random salt")?;
    let kdf = KdfParams::new(salt);
    let mut records: Vec<KeyRecord> = Vec::new();
    let mut keys = Vec::new();
    for (_, material) in read_key_files(key_files)? {
        let key = material.derive(&kdf)?;
        if !records.iter().any(|r| r.id == key.id.to_string()) {
            records.push(KeyRecord { id: key.id.to_string(), added_at: crate::clock::now_rfc3339() });
            keys.push(key);
        }
    }
    let current = keys.first().cloned().context("no key given")?;
    let meta = EncryptionMeta {
        cipher: seal::CIPHER_NAME.into(),
        kdf,
        keys: records,
        current_key: current.id.to_string(),
        unbound_objects: false,
    };
    Ok((meta, Arc::new(Keyring { keys, current: Some(current), binding: None })))
}

pub struct Rotation {
    pub old_key: String,
    pub new_key: String,
}

/// Adds the key in `new_key_file` to the repository and makes it current.
pub async fn rotate_key(settings: &Settings, new_key_file: &Path) -> anyhow::Result<Rotation> {
    let (repo, mut meta) = settings.open_initialized(true).await?;
    let Some(encryption) = meta.encryption.as_mut() else {
        return Err(Fail::new(
            format!("repository {} is not encrypted", repo.display),
            "encryption is chosen when the repository is created (`tidemark-agent init --key-file`)",
        )
        .into());
    };
    let (_, material) = read_key_files(&[new_key_file.to_path_buf()])?.pop().context("read the new key file")?;
    let new_key = material.derive(&encryption.kdf)?;
    let new_id = new_key.id.to_string();
    let old_id = encryption.current_key.clone();
    if new_id == old_id {
        return Err(Fail::new(
            format!("{} holds the current key {old_id} already", new_key_file.display()),
            "create a new key with `tidemark-agent keygen PATH`",
        )
        .into());
    }
    if !encryption.keys.iter().any(|k| k.id == new_id) {
        encryption.keys.push(KeyRecord { id: new_id.clone(), added_at: crate::clock::now_rfc3339() });
    }
    encryption.current_key = new_id.clone();
    // Signed with the old keys and the new one, checked by the readers'
    // own rules before it replaces the old metadata.
    repo.write_signed_meta(&mut meta, &[new_key]).await?;
    // Sealed with the key this handle was opened with (the old one, still
    // readable; `reencrypt` moves it under the new one like everything else).
    let summary = format!("encryption key rotated: new objects are sealed with {new_id} (was {old_id})");
    tidemark_repo::events::record(
        &repo,
        "rotate-key",
        summary,
        serde_json::json!({ "old_key": old_id, "new_key": new_id }),
    )
    .await;
    Ok(Rotation { old_key: old_id, new_key: new_id })
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Reencryption {
    pub current_key: String,
    pub resealed: usize,
    pub already_current: usize,
    /// Whether objects sealed before the repository had an id are still
    /// accepted (some were left to the agent); a later run clears it.
    pub older_form_accepted: bool,
    /// Partial segments of the newest timeline: the running agent replaces
    /// them itself (under the current key), so rewriting them here could race it.
    pub left_to_the_agent: Vec<String>,
}

/// Re-seals every object not under the current key, or not bound to the
/// repository; then, if none of the older form is left, stops accepting it.
pub async fn reencrypt(settings: &Settings) -> anyhow::Result<Reencryption> {
    let (repo, mut meta) = settings.open_initialized(true).await?;
    let Some(encryption) = &meta.encryption else {
        return Err(Fail::new(format!("repository {} is not encrypted", repo.display), "nothing to re-encrypt").into());
    };
    let current: seal::KeyId = encryption.current_key.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let mut keys = repo.list("").await?;
    keys.retain(|k| k != META_KEY);
    keys.sort();
    let newest_timeline =
        keys.iter().filter_map(|k| k.strip_prefix("wal/")).filter_map(|k| k.get(..8)).max().map(str::to_string);
    let mut report = Reencryption { current_key: current.to_string(), ..Default::default() };
    let progress = tidemark_repo::progress::Progress::objects("reencrypt", keys.len() as u64);
    let mut unbound_left = false;
    for key in keys {
        progress.add(1);
        let header = repo.sealed_key_id(&key).await?;
        if header == Some((current, true)) {
            report.already_current += 1;
            continue;
        }
        if is_live_partial(&key, newest_timeline.as_deref(), meta.wal_segment_size) {
            unbound_left |= header.is_some_and(|(_, bound)| !bound);
            report.left_to_the_agent.push(key);
            continue;
        }
        if repo.reseal(&key).await? {
            report.resealed += 1;
            tracing::info!("re-sealed {key} with key {current}");
        }
    }
    progress.finish();
    if let Some(encryption) = meta.encryption.as_mut().filter(|e| e.unbound_objects && !unbound_left) {
        // Every object is bound now: one of the older form can only be a
        // copy from elsewhere, so it is refused from here on.
        encryption.unbound_objects = false;
        repo.write_signed_meta(&mut meta, &[]).await?;
    }
    report.older_form_accepted = meta.encryption.as_ref().is_some_and(|e| e.unbound_objects);
    let summary = format!("re-encrypted {} objects with key {current}", report.resealed);
    tidemark_repo::events::record(&repo, "reencrypt", summary, serde_json::to_value(&report)?).await;
    Ok(report)
}

/// A partial object (a prefix or a piece) on the newest timeline: one the
/// agent may still be rewriting.
fn is_live_partial(key: &str, newest_timeline: Option<&str>, segment_size: u64) -> bool {
    let segment = match ObjectKey::parse(key, segment_size) {
        Some(ObjectKey::PartialSegment(segment) | ObjectKey::PartialPiece { segment, .. }) => segment,
        _ => return false,
    };
    newest_timeline == Some(format!("{:08X}", segment.timeline.0).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_timelines_partials_are_left_alone() {
        let size = 16 << 20;
        let newest = Some("00000002");
        assert!(is_live_partial("wal/00000002/000000020000000000000005.partial", newest, size));
        assert!(is_live_partial("wal/00000002/000000020000000000000005.partial.00002000", newest, size));
        assert!(!is_live_partial("wal/00000001/000000010000000000000005.partial", newest, size));
        assert!(!is_live_partial("wal/00000002/000000020000000000000005", newest, size));
        assert!(!is_live_partial("backups/x/files/0.partial", newest, size));
    }

    #[test]
    fn keygen_writes_owner_only_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        let id = keygen(&path).expect("keygen");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0);
        let Ok(seal::KeyMaterial::Raw(raw)) = seal::KeyMaterial::parse(&std::fs::read(&path).expect("read")) else {
            panic!("keygen writes a raw key")
        };
        assert_eq!(seal::Key::from_bytes(raw).id.to_string(), id);
        assert!(keygen(&path).is_err());
    }
}
