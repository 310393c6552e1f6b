//! The readers of repository objects must never panic, whatever the bytes:
//! the sealed envelope (with the key that sealed it and with another, bound
//! to a repository or not), the frame, and the JSON documents
//! (repository.json and its tags, backup manifests,
//! summaries), and the planner that puts a file back together from a chain
//! of incremental backups, over layers built from the bytes; and the reader
//! of the INCREMENTAL.* files PostgreSQL 17+ sends, and the WAL block map
//! a summary carries (the blocks an incremental backup asks the server
//! for). The first byte picks
//! the reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_proto::repo::seal::{self, Key};
use tidemark_proto::repo::backup::{BackupFile, ChunkRef, FileKind};
use tidemark_proto::incremental_file;
use tidemark_proto::wal::blockmap;
use tidemark_proto::repo::{backup, chain, frame, layout};

/// Layers of one file from bytes: per layer a size in blocks, up to three
/// block ranges (or none: stored whole) and up to three chunk lengths.
fn layers(mut bytes: &[u8]) -> Vec<BackupFile> {
    let mut take = || -> Option<u64> {
        let (&b, rest) = bytes.split_first()?;
        bytes = rest;
        Some(u64::from(b))
    };
    let mut out = Vec::new();
    while let (Some(size), Some(shape)) = (take(), take()) {
        let blocks = (shape & 3 != 0).then(|| {
            (0..shape & 3).filter_map(|_| Some([take()? as u32, take()? as u32 % 9])).collect::<Vec<_>>()
        });
        let chunks = (0..(shape >> 2) % 4)
            .filter_map(|_| {
                let len = take()? * if shape & 0x80 != 0 { 8192 } else { 97 };
                Some(ChunkRef { key: format!("c{}", out.len()), raw_len: len, crc32: 0, crc32c: 0, pages_crc32c: None })
            })
            .collect();
        let file = BackupFile {
            archive: "base".into(),
            path: "base/5/16384".into(),
            kind: FileKind::File,
            size: size * chain::BLOCK_SIZE + u64::from(shape & 0x40 != 0),
            mode: 0o600,
            mtime_unix: 0,
            link_target: None,
            chunks,
            pages_xor: blocks.is_some() && shape & 0x20 != 0,
            blocks,
        };
        out.push(file);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let keys = [Key::from_bytes([7; 32]), Key::from_bytes([9; 32])];
    let binding = seal::Binding {
        repository_id: "0123456789abcdef0123456789abcdef".into(),
        system_identifier: "7711696038950075490".into(),
        accept_unbound: mode & 0x80 != 0,
    };
    match mode % 6 {
        0 => {
            let _ = seal::open(&keys, None, "wal/00000001/000000010000000000000001", rest);
            let _ = seal::open(&keys, Some(&binding), "wal/00000001/000000010000000000000001", rest);
            let _ = seal::sealed_key_id(rest);
            let _ = seal::is_bound(rest);
            // A server certificate, as SCRAM channel binding reads it.
            let _ = tidemark_proto::certificate::binding_hash(rest);
        }
        1 => {
            // A well-sealed frame of the input (bound to a repository or
            // not), then one byte flipped: must fail to open, never panic.
            let Some((&flip, body)) = rest.split_first() else { return };
            let bound = (flip & 1 == 0).then_some(&binding);
            if let Ok(mut object) = seal::seal(&keys[0], bound, "k", body, [3; seal::NONCE_LEN]) {
                let at = flip as usize % object.len();
                object[at] ^= 0x20;
                assert!(seal::open(&keys, bound, "k", &object).is_err());
            }
        }
        2 => {
            let _ = frame::decode(rest);
            let _ = frame::parse_header(rest);
        }
        3 => {
            let layers = layers(rest);
            let refs: Vec<&BackupFile> = layers.iter().collect();
            if let Ok(uses) = chain::plan_file(&refs) {
                // Every extent lies inside its chunk, and an XORed chunk
                // names the block of each of its pages.
                assert!(uses.iter().all(|u| u.extents.iter().all(|e| e.chunk_offset + e.len <= u.chunk.raw_len)));
                for u in &uses {
                    if let Some(blocks) = &u.xor_blocks {
                        assert_eq!(blocks.len() as u64 * chain::BLOCK_SIZE, u.chunk.raw_len);
                        assert!(blocks.windows(2).all(|w| w[0] < w[1]));
                    }
                }
            }
            for layer in &layers {
                if let Some(ranges) = &layer.blocks {
                    let first = u64::from(rest.first().copied().unwrap_or(0));
                    if let Some(blocks) = chain::blocks_at(ranges, first, layer.size % 64) {
                        assert_eq!(blocks.len() as u64, layer.size % 64);
                    }
                }
            }
            let _ = chain::page_changed(rest, tidemark_proto::Lsn(7));
            let _ = chain::is_block_file("base", &String::from_utf8_lossy(rest));
            let _ = chain::block_file_of("16390", &String::from_utf8_lossy(rest));
        }
        4 => {
            // PostgreSQL 17+'s INCREMENTAL.* files as BASE_BACKUP sends them:
            // the declared size, the base's length and the piece size come
            // from the input; the truncation block length is kept small so
            // the zero pages it may imply stay cheap to fuzz.
            let Some((&[size, base, piece], body)) = rest.split_first_chunk::<3>() else { return };
            let mut body = body.to_vec();
            if let Some(truncation) = body.get_mut(8..12) {
                truncation[2] = 0;
                truncation[3] = 0;
            }
            let entry_size = (body.len() as u64).saturating_add(u64::from(size) * 8192) % (1 << 20);
            let mut reader = incremental_file::IncrementalFile::new("f", entry_size, u64::from(base) * 8192);
            let mut out = Vec::new();
            let fed = body.chunks(usize::from(piece).max(1)).try_for_each(|part| reader.feed(part, &mut out));
            if fed.is_ok() {
                if let Ok((ranges, length)) = reader.finish(&mut out) {
                    let stored: u64 = ranges.iter().map(|[_, count]| u64::from(*count)).sum();
                    assert_eq!(stored * 8192, out.len() as u64);
                    assert!(ranges.iter().all(|[first, count]| u64::from(*first + *count) <= length));
                }
            }
            let _ = incremental_file::target_path(&String::from_utf8_lossy(rest));
            let _ = incremental_file::combined_backup_label(rest);
        }
        _ => {
            // repository.json: parsed, and its tags checked (never a panic,
            // and never accepted unless signed by one of the keys).
            if let Ok(meta) = layout::RepositoryMeta::from_json(rest) {
                let _ = meta.authenticate(&keys);
                let _ = meta.signed_bytes();
                let _ = meta.binding();
            }
            let _ = backup::BackupManifest::from_json(rest);
            // A summary's block map, as an incremental backup reads it: the
            // ranges asked of the server stay inside the file, in order.
            if let Ok(summary) = tidemark_proto::wal::summary::SegmentSummary::from_json(rest) {
                let mut since = blockmap::ChangedSince::default();
                let Some(map) = &summary.blocks else { return };
                since.add(map);
                for file in &map.files {
                    let rel = tidemark_proto::wal::RelFileLocator { tablespace: file.spc, database: file.db, relfilenode: file.rel };
                    for (first, blocks, base) in [(0, 131_072, 100), (131_072, 7, 9), (u32::MAX - 3, 3, 0)] {
                        if let blockmap::Reads::Blocks(ranges) = since.reads(rel, first, blocks, base) {
                            let mut next = 0u64;
                            for [start, count] in &ranges {
                                assert!(u64::from(*start) >= next && *count > 0);
                                next = u64::from(*start) + u64::from(*count);
                            }
                            assert!(next <= u64::from(blocks));
                            // The cross-check of a file read whole: nothing is
                            // missing from the ranges themselves, and every
                            // block is missing from none.
                            assert_eq!(blockmap::blocks_not_in(&ranges, &ranges), (0, None));
                            let total: u64 = ranges.iter().map(|[_, c]| u64::from(*c)).sum();
                            assert_eq!(blockmap::blocks_not_in(&ranges, &[]).0, total);
                        }
                    }
                }
            }
        }
    }
});
