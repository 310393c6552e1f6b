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
//! 5       3     reserved, zero
//! 8       8     key id (see `KeyId`)
//! 16      24    nonce, fresh and random for every object
//! 40      ..    ciphertext of the frame, then the 16-byte tag
//! ```
//!
//! The associated data is the 40-byte header followed by the object's key
//! (its path in the repository): an object copied or renamed to another key
//! fails to authenticate, and so does a header edited to name another key.
//! The 192-bit nonce is large enough to draw at random for every object
//! without a counter to keep.
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
/// The cipher's name in `repository.json`.
pub const CIPHER_NAME: &str = "xchacha20-poly1305";
/// Shortest passphrase accepted: short ones are guessable whatever the KDF.
pub const MIN_PASSPHRASE_LEN: usize = 12;

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

fn associated_data(header: &[u8], path: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + path.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(path.as_bytes());
    aad
}

/// Seals `frame` as the object at `path` with `key` and a fresh random `nonce`.
pub fn seal(key: &Key, path: &str, frame: &[u8], nonce: [u8; NONCE_LEN]) -> Result<Vec<u8>, SealError> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.push(CIPHER_XCHACHA20_POLY1305);
    header.extend_from_slice(&[0, 0, 0]);
    header.extend_from_slice(&key.id.0);
    header.extend_from_slice(&nonce);
    let cipher = XChaCha20Poly1305::new((&key.bytes).into());
    let aad = associated_data(&header, path);
    let ciphertext = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: frame, aad: &aad })
        .map_err(|_| SealError::Encrypt)?;
    let mut object = header;
    object.extend_from_slice(&ciphertext);
    Ok(object)
}

/// Opens a sealed object stored at `path` with whichever of `keys` it names.
pub fn open(keys: &[Key], path: &str, object: &[u8]) -> Result<Vec<u8>, SealError> {
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
    if header.get(5..8) != Some(&[0, 0, 0][..]) {
        return Err(SealError::Reserved);
    }
    let key = keys.iter().find(|k| k.id == id).ok_or(SealError::MissingKey(id))?;
    let nonce = header.get(16..HEADER_LEN).ok_or(SealError::Truncated)?;
    let cipher = XChaCha20Poly1305::new((&key.bytes).into());
    let aad = associated_data(header, path);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
        .map_err(|_| SealError::Authentication)
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
        Ok(Keyring { keys, current })
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

    #[test]
    fn round_trip_and_binding() {
        let frame = b"TMK\x01 some framed object".to_vec();
        let object = seal(&key(1), "wal/00000001/A", &frame, [7; NONCE_LEN]).expect("seal");
        assert_eq!(sealed_key_id(&object), Ok(key(1).id));
        assert_eq!(open(&[key(2), key(1)], "wal/00000001/A", &object).expect("open"), frame);
        // Another name, another key, a missing key.
        assert_eq!(open(&[key(1)], "wal/00000001/B", &object), Err(SealError::Authentication));
        assert_eq!(open(&[key(2)], "wal/00000001/A", &object), Err(SealError::MissingKey(key(1).id)));
        // A header rewritten to name another key the reader has.
        let mut renamed = object.clone();
        renamed[8..16].copy_from_slice(&key(2).id.0);
        assert_eq!(open(&[key(1), key(2)], "wal/00000001/A", &renamed), Err(SealError::Authentication));
        // Every flipped byte is caught.
        for i in 0..object.len() {
            let mut bad = object.clone();
            bad[i] ^= 0x01;
            assert!(open(&[key(1)], "wal/00000001/A", &bad).is_err(), "flip at {i} unnoticed");
        }
    }

    #[test]
    fn the_plaintext_does_not_appear() {
        let frame = b"MARKER-MARKER-MARKER".repeat(10);
        let object = seal(&key(3), "x", &frame, [1; NONCE_LEN]).expect("seal");
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
            let _ = open(&[key(1)], "k", &bytes);
            let _ = sealed_key_id(&bytes);
        }

        #[test]
        fn arbitrary_tail_after_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut object = seal(&key(1), "k", b"", [0; NONCE_LEN]).expect("seal")[..HEADER_LEN].to_vec();
            object.extend_from_slice(&tail);
            prop_assert!(open(&[key(1)], "k", &object).is_err());
        }
    }
}
