//! The WAL decoder must never panic, whatever the bytes. The modes (pages
//! with plausible headers, one record, well-formed records with a flipped
//! byte) live in `tidemark_proto::wal::exercise`, which the stable property
//! tests call too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_proto::wal::exercise::exercise(data);
});
