//! The readers of repository objects must never panic, whatever the bytes:
//! the sealed envelope (with the key that sealed it and with another), the
//! frame, and the JSON documents (repository.json, backup manifests,
//! summaries). The first byte picks the reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_proto::repo::seal::{self, Key};
use tidemark_proto::repo::{backup, frame, layout};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let keys = [Key::from_bytes([7; 32]), Key::from_bytes([9; 32])];
    match mode % 4 {
        0 => {
            let _ = seal::open(&keys, "wal/00000001/000000010000000000000001", rest);
            let _ = seal::sealed_key_id(rest);
        }
        1 => {
            // A well-sealed frame of the input, then one byte flipped: must
            // fail to open, never panic.
            let Some((&flip, body)) = rest.split_first() else { return };
            if let Ok(mut object) = seal::seal(&keys[0], "k", body, [3; seal::NONCE_LEN]) {
                let at = flip as usize % object.len();
                object[at] ^= 0x20;
                assert!(seal::open(&keys, "k", &object).is_err());
            }
        }
        2 => {
            let _ = frame::decode(rest);
            let _ = frame::parse_header(rest);
        }
        _ => {
            let _ = layout::RepositoryMeta::from_json(rest);
            let _ = backup::BackupManifest::from_json(rest);
            let _ = tidemark_proto::wal::summary::SegmentSummary::from_json(rest);
        }
    }
});
