//! Encryption at rest: the sealed envelope around a framed object.
//!
//! When a repository is encrypted, every object but `repository.json` is
//! stored as a sealed frame. The frame (see `frame`) is built first, so
//! compression happens before encryption; sealing then encrypts the whole
//! frame with XChaCha20-Poly1305. Layout (our format):
//!
//! ```text
//! offset  size  field
//! 0       4     magic "TMS\x01"
//! 4       1     cipher: 1 = XChaCha20-Poly1305
//! 5       1     binding: 0 = the object's key only, 1 = also the repository
//! 6       2     reserved, zero
//! 8       8     key id (see `KeyId`)
//! 16      24    nonce, fresh and random for every object
//! 40      ..    ciphertext of the frame, then the 16-byte tag
//! ```
//!
//! The associated data is the 40-byte header, then (binding 1) the
//! repository's id and system identifier, then the object's key (its path in
//! the repository): an object copied or renamed to another key, or copied
//! from another repository sealed with the same key, fails to authenticate,
//! and so does a header edited to name another key or another binding.
//! Binding 0 is the form objects had before repositories had an id; a
//! repository created since refuses it (see [`Binding`]). The 192-bit nonce
//! is large enough to draw at random for every object without a counter to
//! keep.
//!
//! `repository.json` itself is not sealed (it says how to unseal) but
//! authenticated: [`tag_meta`] and [`check_meta_tags`], one HMAC-SHA256 tag
//! per key that signed it.
//!
//! A key comes from a key file: 64 hex digits are a raw 256-bit key;
//! anything else is a passphrase stretched with Argon2id using the salt and
//! costs in `repository.json`. A key's id is a hash of the key itself, so
//! the repository can list the ids it accepts (the key check) without
//! storing anything that helps decrypt.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 4] = *b"TMS\x01";
pub const HEADER_LEN: usize = 40;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
const CIPHER_XCHACHA20_POLY1305: u8 = 1;
/// Header byte 5: what the associated data binds besides the object's key.
const BOUND_TO_KEY_ONLY: u8 = 0;
const BOUND_TO_REPOSITORY: u8 = 1;
/// The cipher's name in `repository.json`.
pub const CIPHER_NAME: &str = "xchacha20-poly1305";
/// Shortest passphrase accepted: short ones are guessable whatever the KDF.
pub const MIN_PASSPHRASE_LEN: usize = 12;
/// The most a repository's Argon2id may ask for, checked before deriving
/// anything: `repository.json` is only authenticated once the key is
/// derived, so an edited one must not make a command allocate gigabytes or
/// spin for hours on a production or restore host. Tidemark writes 64 MiB
/// and 3 passes and has no setting to raise them; these are 16 times that
/// memory and 5 times the passes.
pub const MAX_KDF_MEMORY_KIB: u32 = 1024 * 1024;
pub const MAX_KDF_ITERATIONS: u32 = 16;
pub const MAX_KDF_PARALLELISM: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for KeyId {
    type Err = String;
    fn from_str(text: &str) -> Result<KeyId, String> {
        let bytes = hex_decode(text).ok_or_else(|| format!("key id {text:?} is not hex"))?;
        let id: [u8; 8] = bytes.try_into().map_err(|_| format!("key id {text:?} is not 16 hex digits"))?;
        Ok(KeyId(id))
    }
}

/// A 256-bit key and its id.
#[derive(Clone)]
pub struct Key {
    pub id: KeyId,
    bytes: [u8; 32],
}

impl std::fmt::Debug for Key {
    // Never the key bytes: keys must not reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        let mut hash = Sha256::new();
        hash.update(b"tidemark key id v1\0");
        hash.update(bytes);
        let digest = hash.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
        Key { id: KeyId(id), bytes }
    }
}

/// How passphrases become keys in one repository (stored in `repository.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Always "argon2id".
    pub algorithm: String,
    /// 16 random bytes, hex.
    pub salt: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// Costs for a new repository: 64 MiB and 3 passes (a fraction of a
    /// second here, once per command), with the given random salt.
    pub fn new(salt: [u8; 16]) -> KdfParams {
        KdfParams {
            algorithm: "argon2id".into(),
            salt: hex_encode(&salt),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }

    /// Refuses costs above the caps (`MAX_KDF_*`) before anything is derived.
    pub fn check_costs(&self) -> Result<(), SealError> {
        let too_high = |what: &str, value: u32, cap: u32| {
            SealError::BadMeta(format!(
                "Argon2id {what} {value} is above the most Tidemark accepts ({cap}): repository.json was altered"
            ))
        };
        if self.memory_kib > MAX_KDF_MEMORY_KIB {
            return Err(too_high("memory (KiB)", self.memory_kib, MAX_KDF_MEMORY_KIB));
        }
        if self.iterations > MAX_KDF_ITERATIONS {
            return Err(too_high("passes", self.iterations, MAX_KDF_ITERATIONS));
        }
        if self.parallelism > MAX_KDF_PARALLELISM {
            return Err(too_high("lanes", self.parallelism, MAX_KDF_PARALLELISM));
        }
        Ok(())
    }
}

/// What a key file holds, before any derivation.
pub enum KeyMaterial {
    Raw([u8; 32]),
    Passphrase(Vec<u8>),
}

impl KeyMaterial {
    /// Reads a key file's contents: 64 hex digits are a raw key, anything else
    /// (surrounding whitespace removed) a passphrase.
    pub fn parse(contents: &[u8]) -> Result<KeyMaterial, SealError> {
        let text = contents.trim_ascii();
        if text.len() == 64 {
            if let Some(bytes) = std::str::from_utf8(text).ok().and_then(hex_decode) {
                let mut key = [0u8; 32];
                key.copy_from_slice(&bytes);
                return Ok(KeyMaterial::Raw(key));
            }
        }
        if text.len() < MIN_PASSPHRASE_LEN {
            return Err(SealError::BadKeyFile(format!(
                "holds neither a key (64 hex digits) nor a passphrase of at least {MIN_PASSPHRASE_LEN} characters"
            )));
        }
        Ok(KeyMaterial::Passphrase(text.to_vec()))
    }

    /// The key: a raw key as is, a passphrase through Argon2id.
    pub fn derive(&self, kdf: &KdfParams) -> Result<Key, SealError> {
        match self {
            KeyMaterial::Raw(bytes) => Ok(Key::from_bytes(*bytes)),
            KeyMaterial::Passphrase(passphrase) => {
                if kdf.algorithm != "argon2id" {
                    return Err(SealError::BadMeta(format!("unknown key derivation {:?}", kdf.algorithm)));
                }
                kdf.check_costs()?;
                let salt = hex_decode(&kdf.salt).ok_or_else(|| SealError::BadMeta("kdf salt is not hex".into()))?;
                let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
                    .map_err(|e| SealError::BadMeta(format!("kdf parameters: {e}")))?;
                let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
                let mut key = [0u8; 32];
                argon
                    .hash_password_into(passphrase, &salt, &mut key)
                    .map_err(|e| SealError::BadMeta(format!("kdf: {e}")))?;
                Ok(Key::from_bytes(key))
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("not a sealed object")]
    NotSealed,
    #[error("sealed object is truncated")]
    Truncated,
    #[error("unknown cipher {0} in the sealed header")]
    UnknownCipher(u8),
    #[error("nonzero reserved bytes in the sealed header")]
    Reserved,
    #[error("unknown binding {0} in the sealed header")]
    UnknownBinding(u8),
    #[error("sealed without the repository's id, which this repository no longer accepts: copied from another repository, or an old copy put back")]
    Unbound,
    #[error("sealed for a repository with an id, but repository.json has none: an older repository.json was put back")]
    NoBinding,
    #[error("encrypted with key {0}, which was not given")]
    MissingKey(KeyId),
    #[error("does not authenticate: altered, moved from another name, or sealed with another key")]
    Authentication,
    #[error("encryption failed")]
    Encrypt,
    #[error("key file {0}")]
    BadKeyFile(String),
    #[error("repository encryption settings: {0}")]
    BadMeta(String),
    #[error("repository.json {0}")]
    MetaTag(String),
}

/// Whether stored bytes are a sealed object (by magic only).
pub fn is_sealed(object: &[u8]) -> bool {
    object.get(..4) == Some(&MAGIC[..])
}

/// The key id in a sealed object's header (the first 16 bytes suffice).
pub fn sealed_key_id(object: &[u8]) -> Result<KeyId, SealError> {
    if !is_sealed(object) {
        return Err(SealError::NotSealed);
    }
    let id: [u8; 8] = object.get(8..16).and_then(|s| s.try_into().ok()).ok_or(SealError::Truncated)?;
    Ok(KeyId(id))
}

/// The repository an object is sealed for, from `repository.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// `repository_id` (32 hex digits).
    pub repository_id: String,
    pub system_identifier: String,
    /// Whether objects sealed before the repository had an id (binding 0)
    /// are still read: only in a repository upgraded from that form, until
    /// `reencrypt` has re-sealed them all. Without this rule anyone could
    /// put such an object, copied from another repository with the same
    /// key, in place of a newer one.
    pub accept_unbound: bool,
}

fn associated_data(header: &[u8], binding: Option<&Binding>, path: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + path.len() + 64);
    aad.extend_from_slice(header);
    if let Some(binding) = binding {
        // NUL-separated: neither an id nor a system identifier holds one.
        aad.extend_from_slice(binding.repository_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(binding.system_identifier.as_bytes());
        aad.push(0);
    }
    aad.extend_from_slice(path.as_bytes());
    aad
}

/// Seals `frame` as the object at `path` with `key` and a fresh random
/// `nonce`, bound to the repository when it has an id (`binding`).
pub fn seal(
    key: &Key,
    binding: Option<&Binding>,
    path: &str,
    frame: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, SealError> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.push(CIPHER_XCHACHA20_POLY1305);
    header.push(if binding.is_some() { BOUND_TO_REPOSITORY } else { BOUND_TO_KEY_ONLY });
    header.extend_from_slice(&[0, 0]);
    header.extend_from_slice(&key.id.0);
    header.extend_from_slice(&nonce);
    let cipher = XChaCha20Poly1305::new((&key.bytes).into());
    let aad = associated_data(&header, binding, path);
    let ciphertext = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: frame, aad: &aad })
        .map_err(|_| SealError::Encrypt)?;
    let mut object = header;
    object.extend_from_slice(&ciphertext);
    Ok(object)
}

/// Opens a sealed object stored at `path` with whichever of `keys` it names.
/// `binding` is the repository's (`None` for one that has no id yet): an
/// object bound to a repository opens only with its binding, and one bound
/// to its key only only where the binding accepts that older form.
pub fn open(keys: &[Key], binding: Option<&Binding>, path: &str, object: &[u8]) -> Result<Vec<u8>, SealError> {
    let id = sealed_key_id(object)?;
    let header = object.get(..HEADER_LEN).ok_or(SealError::Truncated)?;
    let ciphertext = object.get(HEADER_LEN..).ok_or(SealError::Truncated)?;
    if ciphertext.len() < TAG_LEN {
        return Err(SealError::Truncated);
    }
    match header.get(4) {
        Some(&CIPHER_XCHACHA20_POLY1305) => {}
        Some(&other) => return Err(SealError::UnknownCipher(other)),
        None => return Err(SealError::Truncated),
    }
    if header.get(6..8) != Some(&[0, 0][..]) {
        return Err(SealError::Reserved);
    }
    let bound_to = match (header.get(5), binding) {
        (Some(&BOUND_TO_REPOSITORY), Some(binding)) => Some(binding),
        (Some(&BOUND_TO_REPOSITORY), None) => return Err(SealError::NoBinding),
        (Some(&BOUND_TO_KEY_ONLY), Some(binding)) if !binding.accept_unbound => return Err(SealError::Unbound),
        (Some(&BOUND_TO_KEY_ONLY), _) => None,
        (Some(&other), _) => return Err(SealError::UnknownBinding(other)),
        (None, _) => return Err(SealError::Truncated),
    };
    let key = keys.iter().find(|k| k.id == id).ok_or(SealError::MissingKey(id))?;
    let nonce = header.get(16..HEADER_LEN).ok_or(SealError::Truncated)?;
    let cipher = XChaCha20Poly1305::new((&key.bytes).into());
    let aad = associated_data(header, bound_to, path);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
        .map_err(|_| SealError::Authentication)
}

/// Whether a sealed object is bound to its repository (binding 1), from its
/// header; `None` if it is not a sealed object.
pub fn is_bound(object: &[u8]) -> Option<bool> {
    is_sealed(object).then(|| object.get(5) == Some(&BOUND_TO_REPOSITORY))
}

/// One key's tag over `repository.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaTag {
    /// The id of the key that made it.
    pub key: String,
    /// HMAC-SHA256, hex.
    pub tag: String,
}

/// HMAC-SHA256 (RFC 2104) of `message` under a 32-byte key.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut inner_pad = [0x36u8; 64];
    let mut outer_pad = [0x5cu8; 64];
    for ((i, o), k) in inner_pad.iter_mut().zip(outer_pad.iter_mut()).zip(key) {
        *i ^= k;
        *o ^= k;
    }
    let inner = Sha256::new().chain_update(inner_pad).chain_update(message).finalize();
    Sha256::new().chain_update(outer_pad).chain_update(inner).finalize().into()
}

/// A key's tag over `message` (the metadata without its tags). The MAC key
/// is a hash of the key under its own label, so the key itself is used for
/// nothing but sealing.
fn meta_tag(key: &Key, message: &[u8]) -> [u8; 32] {
    let mac_key: [u8; 32] =
        Sha256::new().chain_update(b"tidemark repository.json mac v1\0").chain_update(key.bytes).finalize().into();
    hmac_sha256(&mac_key, message)
}

/// The tags of `message` by each of `keys`.
pub fn tag_meta(keys: &[Key], message: &[u8]) -> Vec<MetaTag> {
    keys.iter().map(|key| MetaTag { key: key.id.to_string(), tag: hex_encode(&meta_tag(key, message)) }).collect()
}

/// Checks `repository.json`'s tags with the keys a command was given: at
/// least one tag must be by a given key, every tag by a given key must
/// match, and the current key's tag must be there when the current key was
/// given (so someone holding only a retired key cannot rewrite it for
/// those who hold the current one).
pub fn check_meta_tags(keys: &[Key], current_key: &str, message: &[u8], tags: &[MetaTag]) -> Result<(), SealError> {
    let mut checked = 0;
    for key in keys {
        let id = key.id.to_string();
        let Some(tag) = tags.iter().find(|t| t.key == id) else {
            if id == current_key {
                return Err(SealError::MetaTag(format!("has no tag by its current key {id}: it was altered")));
            }
            continue;
        };
        let expected = meta_tag(key, message);
        let given = hex_decode(&tag.tag).unwrap_or_default();
        // Compared in full whatever differs first, so timing tells nothing.
        let same = given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
        if !same {
            return Err(SealError::MetaTag(format!("does not authenticate with key {id}: it was altered")));
        }
        checked += 1;
    }
    if checked == 0 {
        let by: Vec<&str> = tags.iter().map(|t| t.key.as_str()).collect();
        return Err(SealError::MetaTag(format!(
            "is signed by key {} only, none of which was given",
            if by.is_empty() { "(none)".to_string() } else { by.join(", ") }
        )));
    }
    Ok(())
}

/// How the repository is encrypted and which keys it accepts: the key check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionMeta {
    /// Always `xchacha20-poly1305`.
    pub cipher: String,
    /// How a passphrase becomes a key (unused for raw keys).
    pub kdf: KdfParams,
    /// Every key objects may be sealed with, oldest first.
    pub keys: Vec<KeyRecord>,
    /// The id of the key new objects are sealed with.
    pub current_key: String,
    /// Objects sealed before the repository had an id (binding 0) may still
    /// be read: set when an older repository is upgraded, cleared by
    /// `reencrypt` once it has re-sealed them all.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unbound_objects: bool,
}

fn is_false(value: &bool) -> bool {
    !value
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub added_at: String,
}

/// The keys one command was given, checked against the repository's list.
#[derive(Clone, Debug)]
pub struct Keyring {
    pub keys: Vec<Key>,
    /// The key new objects are sealed with, if it was given.
    pub current: Option<Key>,
    /// The repository objects are bound to; `None` while `repository.json`
    /// is in its older form without an id.
    pub binding: Option<Binding>,
}

impl Keyring {
    /// Derives each given key (`(file name, material)`) and checks that the
    /// repository accepts it: this is the key check that refuses a wrong key
    /// before anything is read or written.
    pub fn unlock(encryption: &EncryptionMeta, given: &[(String, KeyMaterial)]) -> Result<Keyring, SealError> {
        let accepted: Vec<&str> = encryption.keys.iter().map(|k| k.id.as_str()).collect();
        let mut keys = Vec::with_capacity(given.len());
        for (file, material) in given {
            let key = material.derive(&encryption.kdf)?;
            if !accepted.contains(&key.id.to_string().as_str()) {
                return Err(SealError::BadKeyFile(format!(
                    "{file} holds key {}, which is not a key of this repository (it accepts {})",
                    key.id,
                    accepted.join(", ")
                )));
            }
            keys.push(key);
        }
        let current = keys.iter().find(|k| k.id.to_string() == encryption.current_key).cloned();
        Ok(Keyring { keys, current, binding: None })
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digits = text.as_bytes();
    let mut out = Vec::with_capacity(digits.len() / 2);
    for pair in digits.chunks_exact(2) {
        let high = (*pair.first()? as char).to_digit(16)?;
        let low = (*pair.get(1)? as char).to_digit(16)?;
        out.push((high * 16 + low) as u8);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(byte: u8) -> Key {
        Key::from_bytes([byte; 32])
    }

    fn binding(id: &str) -> Binding {
        Binding { repository_id: id.repeat(32), system_identifier: "7711696038950075490".into(), accept_unbound: false }
    }

    #[test]
    fn round_trip_and_binding() {
        let frame = b"TMK\x01 some framed object".to_vec();
        let ours = binding("a");
        let object = seal(&key(1), Some(&ours), "wal/00000001/A", &frame, [7; NONCE_LEN]).expect("seal");
        assert_eq!(sealed_key_id(&object), Ok(key(1).id));
        assert_eq!(is_bound(&object), Some(true));
        assert_eq!(open(&[key(2), key(1)], Some(&ours), "wal/00000001/A", &object).expect("open"), frame);
        // Another name, another key, a missing key.
        assert_eq!(open(&[key(1)], Some(&ours), "wal/00000001/B", &object), Err(SealError::Authentication));
        assert_eq!(open(&[key(2)], Some(&ours), "wal/00000001/A", &object), Err(SealError::MissingKey(key(1).id)));
        // Another repository with the same key: another id, or the same id
        // for another cluster; and a repository.json that lost its id.
        assert_eq!(open(&[key(1)], Some(&binding("b")), "wal/00000001/A", &object), Err(SealError::Authentication));
        let other_cluster = Binding { system_identifier: "1".into(), ..ours.clone() };
        assert_eq!(open(&[key(1)], Some(&other_cluster), "wal/00000001/A", &object), Err(SealError::Authentication));
        assert_eq!(open(&[key(1)], None, "wal/00000001/A", &object), Err(SealError::NoBinding));
        // A header rewritten to name another key the reader has, or to say
        // the object is bound to its key only.
        let mut renamed = object.clone();
        renamed[8..16].copy_from_slice(&key(2).id.0);
        assert_eq!(open(&[key(1), key(2)], Some(&ours), "wal/00000001/A", &renamed), Err(SealError::Authentication));
        let mut downgraded = object.clone();
        downgraded[5] = 0;
        let upgraded = Binding { accept_unbound: true, ..ours.clone() };
        assert_eq!(open(&[key(1)], Some(&upgraded), "wal/00000001/A", &downgraded), Err(SealError::Authentication));
        assert_eq!(open(&[key(1)], Some(&ours), "wal/00000001/A", &downgraded), Err(SealError::Unbound));
        // Every flipped byte is caught.
        for i in 0..object.len() {
            let mut bad = object.clone();
            bad[i] ^= 0x01;
            assert!(open(&[key(1)], Some(&upgraded), "wal/00000001/A", &bad).is_err(), "flip at {i} unnoticed");
        }
    }

    #[test]
    fn objects_of_the_older_form_open_only_where_accepted() {
        let frame = b"an object sealed before repositories had ids".to_vec();
        let object = seal(&key(1), None, "wal/00000001/A", &frame, [5; NONCE_LEN]).expect("seal");
        assert_eq!(is_bound(&object), Some(false));
        assert_eq!(open(&[key(1)], None, "wal/00000001/A", &object).expect("legacy"), frame);
        let upgraded = Binding { accept_unbound: true, ..binding("a") };
        assert_eq!(open(&[key(1)], Some(&upgraded), "wal/00000001/A", &object).expect("upgraded"), frame);
        assert_eq!(open(&[key(1)], Some(&binding("a")), "wal/00000001/A", &object), Err(SealError::Unbound));
        assert_eq!(open(&[key(1)], None, "wal/00000001/B", &object), Err(SealError::Authentication));
    }

    #[test]
    fn metadata_tags() {
        let message = b"{\"format_version\":3}";
        let tags = tag_meta(&[key(1), key(2)], message);
        let current = key(2).id.to_string();
        assert_eq!(check_meta_tags(&[key(1)], &current, message, &tags), Ok(()));
        assert_eq!(check_meta_tags(&[key(1), key(2)], &current, message, &tags), Ok(()));
        // Edited, or signed with another key, or by a retired key alone.
        let edited = check_meta_tags(&[key(2)], &current, b"{\"format_version\":2}", &tags).unwrap_err();
        assert!(edited.to_string().contains("does not authenticate"), "{edited}");
        assert!(check_meta_tags(&[key(3)], &key(3).id.to_string(), message, &tags).is_err());
        let by_old_only = tag_meta(&[key(1)], message);
        let error = check_meta_tags(&[key(1), key(2)], &current, message, &by_old_only).unwrap_err();
        assert!(error.to_string().contains("no tag by its current key"), "{error}");
        assert!(check_meta_tags(&[key(1)], &current, message, &[]).is_err());
        // RFC 4231 test case 2: the HMAC itself.
        let mut jefe = [0u8; 32];
        jefe[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex_encode(&hmac_sha256(&jefe, b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn kdf_costs_are_capped_before_deriving() {
        let mut kdf = KdfParams::new([9; 16]);
        assert_eq!(kdf.check_costs(), Ok(()));
        kdf.memory_kib = MAX_KDF_MEMORY_KIB + 1;
        let material = KeyMaterial::Passphrase(b"correct horse battery".to_vec());
        // Refused at once: deriving would allocate that much first.
        assert!(matches!(material.derive(&kdf), Err(SealError::BadMeta(m)) if m.contains("memory")));
        let kdf = KdfParams { iterations: u32::MAX, ..KdfParams::new([9; 16]) };
        assert!(matches!(material.derive(&kdf), Err(SealError::BadMeta(m)) if m.contains("passes")));
        let kdf = KdfParams { parallelism: 1000, ..KdfParams::new([9; 16]) };
        assert!(kdf.check_costs().is_err());
    }

    #[test]
    fn the_plaintext_does_not_appear() {
        let frame = b"MARKER-MARKER-MARKER".repeat(10);
        let object = seal(&key(3), Some(&binding("c")), "x", &frame, [1; NONCE_LEN]).expect("seal");
        assert!(!object.windows(6).any(|w| w == b"MARKER"));
    }

    #[test]
    fn key_files() {
        let hex = "00".repeat(31) + "ff";
        let KeyMaterial::Raw(raw) = KeyMaterial::parse(format!("{hex}\n").as_bytes()).expect("raw") else {
            panic!("64 hex digits are a raw key")
        };
        assert_eq!(raw[31], 0xff);
        assert!(
            matches!(KeyMaterial::parse(b"  correct horse battery  \n"), Ok(KeyMaterial::Passphrase(p)) if p == b"correct horse battery")
        );
        assert!(KeyMaterial::parse(b"short").is_err());
        assert!(KeyMaterial::parse(b"").is_err());
    }

    #[test]
    fn passphrases_derive_per_salt() {
        let mut kdf = KdfParams::new([9; 16]);
        kdf.memory_kib = 64; // keep the test fast; the real costs are in KdfParams::new
        kdf.iterations = 1;
        let material = KeyMaterial::Passphrase(b"correct horse battery".to_vec());
        let a = material.derive(&kdf).expect("derive");
        assert_eq!(a.id, material.derive(&kdf).expect("again").id);
        let other_salt = KdfParams { salt: hex_encode(&[8; 16]), ..kdf.clone() };
        assert_ne!(a.id, material.derive(&other_salt).expect("derive").id);
    }

    #[test]
    fn key_ids_print_and_parse() {
        let id = key(4).id;
        assert_eq!(id.to_string().parse::<KeyId>(), Ok(id));
        assert!("xyz".parse::<KeyId>().is_err());
        assert_eq!(hex_decode("0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex_decode("0"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = open(&[key(1)], None, "k", &bytes);
            let _ = open(&[key(1)], Some(&binding("d")), "k", &bytes);
            let _ = sealed_key_id(&bytes);
            let _ = is_bound(&bytes);
        }

        #[test]
        fn arbitrary_tail_after_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..128)) {
            let ours = binding("e");
            let mut object = seal(&key(1), Some(&ours), "k", b"", [0; NONCE_LEN]).expect("seal")[..HEADER_LEN].to_vec();
            object.extend_from_slice(&tail);
            prop_assert!(open(&[key(1)], Some(&ours), "k", &object).is_err());
        }
    }
}
