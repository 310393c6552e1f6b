//! A streaming reader of the ustar archives PostgreSQL's BASE_BACKUP sends.
//!
//! Feed bytes as they arrive; the reader emits entry headers and file data
//! without buffering whole files. PostgreSQL writes plain ustar headers (names
//! of at most 99 bytes plus the ustar prefix field), regular files, directories
//! and symbolic links (pg_tblspc); anything else is an error, never a panic.

use std::collections::VecDeque;

const BLOCK: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink { target: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarEvent {
    Entry(EntryHeader),
    /// The next bytes of the current file.
    Data(Vec<u8>),
    /// The current file's data is complete.
    EndOfEntry,
    /// The end-of-archive marker (two zero blocks) was read.
    End,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar header at offset {offset} has a bad checksum")]
    BadChecksum { offset: u64 },
    #[error("tar header at offset {offset} has an invalid {field}")]
    BadField { offset: u64, field: &'static str },
    #[error("tar entry {path:?} has unsupported type {kind:?}")]
    UnsupportedType { path: String, kind: char },
    #[error("bytes after the end of the tar archive")]
    TrailingData,
}

enum State {
    Header,
    /// Inside a file: `remaining` data bytes, then `padding` bytes to skip.
    Data {
        remaining: u64,
        padding: usize,
    },
    /// One zero block seen; a second ends the archive.
    ZeroBlock,
    Ended,
}

pub struct TarReader {
    buffer: Vec<u8>,
    state: State,
    /// Archive offset of `buffer[0]`, for error messages.
    offset: u64,
    events: VecDeque<TarEvent>,
}

impl Default for TarReader {
    fn default() -> Self {
        TarReader::new()
    }
}

impl TarReader {
    pub fn new() -> TarReader {
        TarReader { buffer: Vec::new(), state: State::Header, offset: 0, events: VecDeque::new() }
    }

    /// Whether the end-of-archive marker was read.
    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    /// Consumes `bytes` and returns the events they complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<TarEvent>, TarError> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Data { remaining, padding } => {
                    if *remaining > 0 {
                        let take = (*remaining).min(bytes.len() as u64) as usize;
                        let (now, rest) = bytes.split_at(take);
                        self.events.push_back(TarEvent::Data(now.to_vec()));
                        *remaining -= take as u64;
                        self.offset += take as u64;
                        bytes = rest;
                        if *remaining == 0 {
                            self.events.push_back(TarEvent::EndOfEntry);
                        }
                    } else if *padding > 0 {
                        let take = (*padding).min(bytes.len());
                        *padding -= take;
                        self.offset += take as u64;
                        bytes = bytes.get(take..).unwrap_or_default();
                    }
                    if let State::Data { remaining: 0, padding: 0 } = self.state {
                        self.state = State::Header;
                    }
                }
                State::Ended => {
                    if bytes.iter().any(|b| *b != 0) {
                        return Err(TarError::TrailingData);
                    }
                    bytes = &[];
                }
                State::Header | State::ZeroBlock => {
                    let need = BLOCK - self.buffer.len();
                    let take = need.min(bytes.len());
                    let (now, rest) = bytes.split_at(take);
                    self.buffer.extend_from_slice(now);
                    bytes = rest;
                    if self.buffer.len() == BLOCK {
                        let block = std::mem::take(&mut self.buffer);
                        self.header_block(&block)?;
                        self.offset += BLOCK as u64;
                    }
                }
            }
        }
        Ok(self.events.drain(..).collect())
    }

    fn header_block(&mut self, block: &[u8]) -> Result<(), TarError> {
        if block.iter().all(|b| *b == 0) {
            self.state = match self.state {
                State::ZeroBlock => {
                    self.events.push_back(TarEvent::End);
                    State::Ended
                }
                _ => State::ZeroBlock,
            };
            return Ok(());
        }
        let offset = self.offset;
        let header = parse_header(block, offset)?;
        let size = if header.kind == EntryKind::File { header.size } else { 0 };
        self.events.push_back(TarEvent::Entry(header));
        if size == 0 {
            self.events.push_back(TarEvent::EndOfEntry);
            self.state = State::Header;
        } else {
            let padding = ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize;
            self.state = State::Data { remaining: size, padding };
        }
        Ok(())
    }
}

fn field(block: &[u8], start: usize, len: usize) -> &[u8] {
    let bytes = block.get(start..start + len).unwrap_or_default();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or_default()
}

fn octal(block: &[u8], start: usize, len: usize, offset: u64, name: &'static str) -> Result<u64, TarError> {
    let text = std::str::from_utf8(field(block, start, len)).map_err(|_| TarError::BadField { offset, field: name })?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| TarError::BadField { offset, field: name })
}

fn parse_header(block: &[u8], offset: u64) -> Result<EntryHeader, TarError> {
    let stored = octal(block, 148, 8, offset, "checksum")?;
    let computed: u64 = block
        .iter()
        .enumerate()
        .map(|(i, b)| if (148..156).contains(&i) { u64::from(b' ') } else { u64::from(*b) })
        .sum();
    if stored != computed {
        return Err(TarError::BadChecksum { offset });
    }
    let text = |start, len, name| {
        String::from_utf8(field(block, start, len).to_vec()).map_err(|_| TarError::BadField { offset, field: name })
    };
    let name = text(0, 100, "name")?;
    let prefix = if field(block, 257, 6).starts_with(b"ustar") { text(345, 155, "prefix")? } else { String::new() };
    let mut path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
    let typeflag = block.get(156).copied().unwrap_or(0);
    let kind = match typeflag {
        b'0' | 0 => EntryKind::File,
        b'5' => EntryKind::Directory,
        b'2' => EntryKind::Symlink { target: text(157, 100, "link name")? },
        other => return Err(TarError::UnsupportedType { path, kind: other as char }),
    };
    if kind == EntryKind::Directory {
        while path.ends_with('/') {
            path.pop();
        }
    }
    if path.is_empty() || path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(TarError::BadField { offset, field: "name" });
    }
    Ok(EntryHeader {
        path,
        kind,
        size: octal(block, 124, 12, offset, "size")?,
        mode: octal(block, 100, 8, offset, "mode")? as u32,
        mtime_unix: octal(block, 136, 12, offset, "mtime")? as i64,
    })
}

/// Builds a ustar header; used by tests (and by anything that writes tar).
pub fn header(path: &str, kind: &EntryKind, size: u64, mode: u32, mtime_unix: i64) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    let mut put = |start: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            if let Some(slot) = block.get_mut(start + i) {
                *slot = *b;
            }
        }
    };
    put(0, path.as_bytes());
    put(100, format!("{mode:07o}\0").as_bytes());
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, format!("{mtime_unix:011o}\0").as_bytes());
    put(148, b"        ");
    let (flag, link) = match kind {
        EntryKind::File => (b'0', ""),
        EntryKind::Directory => (b'5', ""),
        EntryKind::Symlink { target } => (b'2', target.as_str()),
    };
    put(156, &[flag]);
    put(157, link.as_bytes());
    put(257, b"ustar\x0000");
    let sum: u64 = block.iter().map(|b| u64::from(*b)).sum();
    let checksum = format!("{sum:06o}\0 ");
    for (i, b) in checksum.bytes().enumerate() {
        if let Some(slot) = block.get_mut(148 + i) {
            *slot = b;
        }
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn archive() -> Vec<u8> {
        let mut tar = Vec::new();
        tar.extend_from_slice(&header("PG_VERSION", &EntryKind::File, 3, 0o600, 1_700_000_000));
        tar.extend_from_slice(b"15\n");
        tar.extend_from_slice(&[0u8; 509]);
        tar.extend_from_slice(&header("base/", &EntryKind::Directory, 0, 0o700, 1));
        tar.extend_from_slice(&header("pg_tblspc/16384", &EntryKind::Symlink { target: "/tbs".into() }, 0, 0o777, 1));
        tar.extend_from_slice(&header("empty", &EntryKind::File, 0, 0o600, 1));
        tar.extend_from_slice(&[0u8; 1024]);
        tar
    }

    fn collect(chunks: &[&[u8]]) -> Result<Vec<TarEvent>, TarError> {
        let mut reader = TarReader::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(reader.feed(chunk)?);
        }
        // Merge data pieces so differently chunked input compares equal.
        let mut merged: Vec<TarEvent> = Vec::new();
        for event in events {
            match (merged.last_mut(), event) {
                (Some(TarEvent::Data(a)), TarEvent::Data(b)) => a.extend(b),
                (_, e) => merged.push(e),
            }
        }
        Ok(merged)
    }

    #[test]
    fn reads_files_directories_symlinks() {
        let tar = archive();
        let events = collect(&[&tar]).expect("valid");
        assert_eq!(
            events,
            vec![
                TarEvent::Entry(EntryHeader {
                    path: "PG_VERSION".into(),
                    kind: EntryKind::File,
                    size: 3,
                    mode: 0o600,
                    mtime_unix: 1_700_000_000
                }),
                TarEvent::Data(b"15\n".to_vec()),
                TarEvent::EndOfEntry,
                TarEvent::Entry(EntryHeader {
                    path: "base".into(),
                    kind: EntryKind::Directory,
                    size: 0,
                    mode: 0o700,
                    mtime_unix: 1
                }),
                TarEvent::EndOfEntry,
                TarEvent::Entry(EntryHeader {
                    path: "pg_tblspc/16384".into(),
                    kind: EntryKind::Symlink { target: "/tbs".into() },
                    size: 0,
                    mode: 0o777,
                    mtime_unix: 1
                }),
                TarEvent::EndOfEntry,
                TarEvent::Entry(EntryHeader {
                    path: "empty".into(),
                    kind: EntryKind::File,
                    size: 0,
                    mode: 0o600,
                    mtime_unix: 1
                }),
                TarEvent::EndOfEntry,
                TarEvent::End,
            ]
        );
    }

    #[test]
    fn refuses_bad_checksums_and_escaping_paths() {
        let mut tar = archive();
        tar[0] ^= 1;
        assert!(matches!(collect(&[&tar]), Err(TarError::BadChecksum { offset: 0 })));
        let evil = header("../etc/passwd", &EntryKind::File, 0, 0o600, 0);
        assert!(matches!(collect(&[&evil]), Err(TarError::BadField { field: "name", .. })));
    }

    proptest! {
        #[test]
        fn chunking_does_not_change_events(cuts in proptest::collection::vec(0usize..3000, 0..6)) {
            let tar = archive();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % tar.len()).collect();
            cuts.sort();
            let mut pieces = Vec::new();
            let mut last = 0;
            for cut in cuts {
                pieces.push(&tar[last..cut]);
                last = cut;
            }
            pieces.push(&tar[last..]);
            prop_assert_eq!(collect(&pieces), collect(&[&tar]));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = TarReader::new().feed(&bytes);
        }
    }
}
