//! The envelope every repository object is stored in.
//!
//! Layout, all integers little-endian (this is our format, not PostgreSQL's):
//!
//! ```text
//! offset  size  field
//! 0       4     magic "TMK\x01"
//! 4       2     format version (1)
//! 6       1     compression: 0 none, 1 zstd
//! 7       1     flags (reserved, 0)
//! 8       8     raw length: bytes after decompression
//! 16      4     CRC-32 (IEEE) of the raw bytes
//! 20      8     payload length: bytes stored after this header
//! 28      ..    payload
//! ```
//!
//! The checksum covers the raw bytes, so it proves the whole chain
//! (transfer, storage, decompression) gave back exactly what was written.

use bytes::Buf;

pub const MAGIC: [u8; 4] = *b"TMK\x01";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 28;
/// Largest raw object we accept; bounds the memory a hostile header can ask for.
pub const MAX_RAW_LEN: u64 = 1 << 31;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a Tidemark object (bad magic)")]
    BadMagic,
    #[error("object is truncated: header says {expected} payload bytes, found {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("object format version {0} is newer than this build understands (1); upgrade Tidemark")]
    UnknownVersion(u16),
    #[error("unknown compression {0} in object header")]
    UnknownCompression(u8),
    #[error("unknown flags {0:#04x} in object header")]
    UnknownFlags(u8),
    #[error("object claims {0} raw bytes, more than the limit")]
    TooLarge(u64),
    #[error("object payload does not decompress: {0}")]
    Decompress(String),
    #[error("object length mismatch: header says {expected} raw bytes, got {found}")]
    LengthMismatch { expected: u64, found: u64 },
    #[error("object checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("compression failed: {0}")]
    Compress(String),
}

/// What a frame's header says about its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub raw_len: u64,
    pub crc32: u32,
    pub stored_len: u64,
}

/// Frames `raw`, compressing it as asked. Returns the object bytes and their info.
pub fn encode(raw: &[u8], compression: Compression) -> Result<(Vec<u8>, FrameInfo), FrameError> {
    let (code, payload) = match compression {
        Compression::None => (0u8, raw.to_vec()),
        Compression::Zstd { level } => {
            (1u8, zstd::bulk::compress(raw, level).map_err(|e| FrameError::Compress(e.to_string()))?)
        }
    };
    let crc32 = crc32fast::hash(raw);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    write_header(&mut out, code, raw.len() as u64, crc32, payload.len() as u64);
    out.extend_from_slice(&payload);
    let info = FrameInfo { raw_len: raw.len() as u64, crc32, stored_len: out.len() as u64 };
    Ok((out, info))
}

/// Frames the bytes `produce` writes, compressed with zstd at `level` as
/// they come: the raw bytes are never held whole. A busy segment's summary
/// is tens of MB of JSON; holding it, `encode`'s compression buffer (as
/// large as the input) and the framed copy at once was the agent's peak
/// memory. The object reads back with [`decode`] like any other.
pub fn encode_zstd_from(
    level: i32,
    produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(Vec<u8>, FrameInfo), FrameError> {
    let compress_error = |e: std::io::Error| FrameError::Compress(e.to_string());
    // The header goes in front once the lengths and checksum are known.
    let encoder = zstd::stream::write::Encoder::new(vec![0u8; HEADER_LEN], level).map_err(compress_error)?;
    // Buffered ahead of the checksum and the compressor: serializers write
    // a few bytes at a time.
    let mut writer = std::io::BufWriter::with_capacity(
        64 * 1024,
        Counting { inner: encoder, crc: crc32fast::Hasher::new(), raw_len: 0 },
    );
    produce(&mut writer).map_err(compress_error)?;
    let Counting { inner, crc, raw_len } = writer.into_inner().map_err(|e| compress_error(e.into_error()))?;
    let mut object = inner.finish().map_err(compress_error)?;
    let crc32 = crc.finalize();
    fill_zstd_header(&mut object, raw_len, crc32);
    let info = FrameInfo { raw_len, crc32, stored_len: object.len() as u64 };
    Ok((object, info))
}

/// Passes writes on, counting and checksumming what was taken.
struct Counting<W> {
    inner: W,
    crc: crc32fast::Hasher,
    raw_len: u64,
}

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let taken = self.inner.write(buf)?;
        self.crc.update(buf.get(..taken).unwrap_or(buf));
        self.raw_len += taken as u64;
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An object built up from consecutive pieces of its raw bytes, each piece
/// compressed as a zstd frame of its own. Concatenated zstd frames
/// decompress to the concatenation of their contents, so [`decode`] reads
/// such an object like any other; the header's length and CRC cover all of it.
///
/// This lets a WAL segment that is uploaded several times while it fills
/// (partial objects) compress each byte once: every upload adds the new
/// bytes as one more frame and stores the pieces so far.
pub struct Pieces {
    raw_len: u64,
    crc: crc32fast::Hasher,
    /// The object: a header (rewritten by `object`) and the frames so far.
    object: Vec<u8>,
    /// Where the frames not yet stored start (see [`Pieces::since_mark`]).
    mark: Mark,
}

/// A point in [`Pieces`]: the raw bytes before it, where its frames start
/// in the object, and the checksum of the raw bytes after it.
#[derive(Clone)]
struct Mark {
    raw_len: u64,
    object_len: usize,
    crc: crc32fast::Hasher,
}

impl Default for Pieces {
    fn default() -> Self {
        Pieces::new()
    }
}

impl Pieces {
    pub fn new() -> Pieces {
        let mark = Mark { raw_len: 0, object_len: HEADER_LEN, crc: crc32fast::Hasher::new() };
        Pieces { raw_len: 0, crc: crc32fast::Hasher::new(), object: vec![0; HEADER_LEN], mark }
    }

    /// Raw bytes taken so far.
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }

    /// Appends `raw` as one more compressed frame.
    pub fn push(&mut self, raw: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> Result<(), FrameError> {
        if raw.is_empty() {
            return Ok(());
        }
        let frame = compressor.compress(raw).map_err(|e| FrameError::Compress(e.to_string()))?;
        self.object.extend_from_slice(&frame);
        self.crc.update(raw);
        self.mark.crc.update(raw);
        self.raw_len += raw.len() as u64;
        Ok(())
    }

    /// Raw bytes before the mark.
    pub fn marked_raw_len(&self) -> u64 {
        self.mark.raw_len
    }

    /// Moves the mark to the end: what is there now has been stored.
    pub fn set_mark(&mut self) {
        self.mark = Mark { raw_len: self.raw_len, object_len: self.object.len(), crc: crc32fast::Hasher::new() };
    }

    /// An object of its own holding the frames pushed since the mark (the
    /// raw bytes from [`Pieces::marked_raw_len`] on), and its info.
    pub fn since_mark(&self) -> (Vec<u8>, FrameInfo) {
        let frames = self.object.get(self.mark.object_len..).unwrap_or_default();
        let raw_len = self.raw_len - self.mark.raw_len;
        let crc32 = self.mark.crc.clone().finalize();
        let mut object = Vec::with_capacity(HEADER_LEN + frames.len());
        write_header(&mut object, 1, raw_len, crc32, frames.len() as u64);
        object.extend_from_slice(frames);
        let info = FrameInfo { raw_len, crc32, stored_len: object.len() as u64 };
        (object, info)
    }

    /// The info of the object holding every piece so far, without building it.
    pub fn info(&self) -> FrameInfo {
        FrameInfo { raw_len: self.raw_len, crc32: self.crc.clone().finalize(), stored_len: self.object.len() as u64 }
    }

    /// A copy of the object holding every piece so far, and its info.
    pub fn object(&mut self) -> (Vec<u8>, FrameInfo) {
        let info = self.write_header();
        (self.object.clone(), info)
    }

    /// The object holding every piece, without a copy.
    pub fn into_object(mut self) -> (Vec<u8>, FrameInfo) {
        let info = self.write_header();
        (self.object, info)
    }

    fn write_header(&mut self) -> FrameInfo {
        let crc32 = self.crc.clone().finalize();
        // The object always starts with HEADER_LEN bytes set aside for this.
        fill_zstd_header(&mut self.object, self.raw_len, crc32);
        FrameInfo { raw_len: self.raw_len, crc32, stored_len: self.object.len() as u64 }
    }
}

/// Writes the header of a zstd object over the `HEADER_LEN` bytes set
/// aside at the start of `object` (the payload is the rest).
fn fill_zstd_header(object: &mut [u8], raw_len: u64, crc32: u32) {
    let payload_len = object.len().saturating_sub(HEADER_LEN) as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    write_header(&mut header, 1, raw_len, crc32, payload_len);
    for (slot, byte) in object.iter_mut().zip(header) {
        *slot = byte;
    }
}

fn write_header(out: &mut Vec<u8>, compression: u8, raw_len: u64, crc32: u32, payload_len: u64) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(compression);
    out.push(0);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&crc32.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
}

/// The fields of a frame header.
struct Header {
    compression: u8,
    raw_len: u64,
    crc32: u32,
    payload_len: u64,
}

fn read_header(object: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    let mut bytes = object;
    let mut magic = [0u8; 4];
    bytes.try_copy_to_slice(&mut magic).map_err(|_| FrameError::BadMagic)?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let short = |_| FrameError::Truncated { expected: HEADER_LEN as u64, found: object.len() as u64 };
    let version = bytes.try_get_u16_le().map_err(short)?;
    if version != VERSION {
        return Err(FrameError::UnknownVersion(version));
    }
    let compression = bytes.try_get_u8().map_err(short)?;
    let flags = bytes.try_get_u8().map_err(short)?;
    if flags != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let raw_len = bytes.try_get_u64_le().map_err(short)?;
    let crc32 = bytes.try_get_u32_le().map_err(short)?;
    let payload_len = bytes.try_get_u64_le().map_err(short)?;
    Ok((Header { compression, raw_len, crc32, payload_len }, bytes))
}

/// Reads just the header (the first HEADER_LEN bytes) of an object.
pub fn parse_header(header: &[u8]) -> Result<FrameInfo, FrameError> {
    let (header, _) = read_header(header)?;
    Ok(FrameInfo {
        raw_len: header.raw_len,
        crc32: header.crc32,
        stored_len: header.payload_len.saturating_add(HEADER_LEN as u64),
    })
}

/// Opens a frame: checks header, decompresses, verifies length and checksum.
pub fn decode(object: &[u8]) -> Result<Vec<u8>, FrameError> {
    let (header, payload) = read_header(object)?;
    let raw_len = header.raw_len;
    if raw_len > MAX_RAW_LEN {
        return Err(FrameError::TooLarge(raw_len));
    }
    if payload.len() as u64 != header.payload_len {
        return Err(FrameError::Truncated { expected: header.payload_len, found: payload.len() as u64 });
    }
    let raw = match header.compression {
        0 => payload.to_vec(),
        1 => {
            // The capacity bound makes zstd refuse to produce more than the header promised.
            let capacity = usize::try_from(raw_len).map_err(|_| FrameError::TooLarge(raw_len))?;
            zstd::bulk::decompress(payload, capacity).map_err(|e| FrameError::Decompress(e.to_string()))?
        }
        other => return Err(FrameError::UnknownCompression(other)),
    };
    if raw.len() as u64 != raw_len {
        return Err(FrameError::LengthMismatch { expected: raw_len, found: raw.len() as u64 });
    }
    let computed = crc32fast::hash(&raw);
    if computed != header.crc32 {
        return Err(FrameError::ChecksumMismatch { stored: header.crc32, computed });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_both_compressions() {
        let raw = b"0123456789".repeat(1000);
        for compression in [Compression::None, Compression::Zstd { level: 1 }] {
            let (object, info) = encode(&raw, compression).expect("encode");
            assert_eq!(info.raw_len, raw.len() as u64);
            assert_eq!(info.stored_len, object.len() as u64);
            assert_eq!(decode(&object).expect("decode"), raw);
        }
    }

    #[test]
    fn a_streamed_object_decodes_like_an_encoded_one() {
        let raw: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let (object, info) = encode_zstd_from(3, |w| {
            // Written in uneven pieces, as a serializer would.
            for chunk in raw.chunks(7) {
                w.write_all(chunk)?;
            }
            Ok(())
        })
        .expect("encode");
        let (_, expected) = encode(&raw, Compression::Zstd { level: 3 }).expect("encode");
        assert_eq!((info.raw_len, info.crc32), (expected.raw_len, expected.crc32));
        assert_eq!(info.stored_len, object.len() as u64);
        assert_eq!(decode(&object).expect("decode"), raw);
        let (empty, _) = encode_zstd_from(3, |_| Ok(())).expect("encode nothing");
        assert_eq!(decode(&empty).expect("decode"), Vec::<u8>::new());
        let failed = encode_zstd_from(3, |_| Err(std::io::Error::other("the producer failed")));
        assert!(matches!(failed, Err(FrameError::Compress(e)) if e.contains("the producer failed")));
    }

    #[test]
    fn pieces_decode_as_one_object() {
        let raw: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let mut compressor = zstd::bulk::Compressor::new(3).expect("compressor");
        let mut pieces = Pieces::new();
        let mut taken = 0;
        for cut in [0usize, 1, 8191, 500_000, raw.len()] {
            pieces.push(&raw[taken..cut], &mut compressor).expect("push");
            taken = cut;
            let (object, info) = pieces.object();
            assert_eq!(info.raw_len, cut as u64);
            assert_eq!(info.stored_len, object.len() as u64);
            assert_eq!(info.crc32, crc32fast::hash(&raw[..cut]));
            assert_eq!(decode(&object).expect("decode"), &raw[..cut]);
        }
        let (whole, _) = pieces.into_object();
        assert_eq!(decode(&whole).expect("decode"), raw);
    }

    #[test]
    fn frames_since_the_mark_are_an_object_of_their_own() {
        let raw: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        let mut compressor = zstd::bulk::Compressor::new(1).expect("compressor");
        let mut pieces = Pieces::new();
        let mut stored = Vec::new();
        let mut taken = 0;
        for cut in [10_000usize, 10_001, 400_000, raw.len()] {
            pieces.push(&raw[taken..cut], &mut compressor).expect("push");
            assert_eq!(pieces.marked_raw_len(), taken as u64);
            let (object, info) = pieces.since_mark();
            assert_eq!(info.raw_len, (cut - taken) as u64);
            assert_eq!(info.stored_len, object.len() as u64);
            assert_eq!(info.crc32, crc32fast::hash(&raw[taken..cut]));
            stored.extend(decode(&object).expect("decode"));
            pieces.set_mark();
            taken = cut;
        }
        assert_eq!(stored, raw);
        assert_eq!(pieces.info(), pieces.object().1);
        let (empty, info) = pieces.since_mark();
        assert_eq!(info.raw_len, 0);
        assert_eq!(decode(&empty).expect("decode"), Vec::<u8>::new());
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let raw = b"the quick brown fox".repeat(20);
        let (object, _) = encode(&raw, Compression::Zstd { level: 3 }).expect("encode");
        for i in 0..object.len() {
            let mut bad = object.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn header_alone() {
        let (object, info) = encode(&[5u8; 100], Compression::Zstd { level: 1 }).expect("encode");
        assert_eq!(parse_header(&object[..HEADER_LEN]), Ok(info));
        assert!(parse_header(&object[..10]).is_err());
    }

    #[test]
    fn truncation_is_caught() {
        let (object, _) = encode(b"abc", Compression::None).expect("encode");
        assert!(matches!(decode(&object[..object.len() - 1]), Err(FrameError::Truncated { .. })));
        assert_eq!(decode(b"TMK"), Err(FrameError::BadMagic));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_payload_after_valid_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..256), raw_len in 0u64..4096) {
            let mut object = MAGIC.to_vec();
            object.extend_from_slice(&VERSION.to_le_bytes());
            object.push(1);
            object.push(0);
            object.extend_from_slice(&raw_len.to_le_bytes());
            object.extend_from_slice(&0u32.to_le_bytes());
            object.extend_from_slice(&(tail.len() as u64).to_le_bytes());
            object.extend_from_slice(&tail);
            prop_assert!(decode(&object).is_err() || raw_len == 0);
        }

        #[test]
        fn round_trip(raw in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (object, _) = encode(&raw, Compression::Zstd { level: 1 }).expect("encode");
            prop_assert_eq!(decode(&object).expect("decode"), raw);
        }
    }
}
