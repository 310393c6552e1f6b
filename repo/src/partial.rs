//! A segment's durable prefix while the segment is still being filled.
//!
//! The agent uploads what it has of the current segment every few seconds.
//! Rewriting the whole prefix each time would cost a quiet agent megabytes
//! a minute once a segment is well filled, so the prefix is stored as a
//! chain: `<segment>.partial` holds the bytes from offset 0, and each
//! `<segment>.partial.OOOOOOOO` the bytes from offset `OOOOOOOO` on. The
//! chain is followed from 0: the piece that starts where the bytes so far
//! end, and so on. Every object holds the server's WAL at its offsets, so
//! any object on the chain is right; one not on it (left by an agent that
//! restarted, or already folded into a newer prefix) is never read.
//!
//! The agent folds the pieces into a new prefix object now and then and
//! deletes them afterwards, so a reader may meet a piece that is gone.
//! [`read_prefix`] then reads again; [`chain_end`] reports the shorter
//! chain it found (a view a few seconds old, never a wrong one).
//!
//! An older prefix (or piece) put back in place of a newer one is
//! authentic (same key, same bytes as once uploaded), so it is noticed by
//! what it contradicts: a piece that starts past where the chain from it
//! ends holds bytes from a newer chain. [`read_prefix`] refuses that.

use crate::error::RepoError;
use crate::store::Repository;
use object_store::path::Path as ObjectPath;
use std::collections::BTreeSet;
use tidemark_proto::repo::layout::{partial_piece_key, partial_segment_key, ObjectKey};
use tidemark_proto::segment::SegmentId;

/// How many times a read that met a prefix replaced under it starts again.
const READ_ATTEMPTS: usize = 3;

/// The durable prefix of `segment` (not padded): the prefix object and the
/// pieces that continue it, fetched one after the other (no listing, so
/// `wal-get` stays one request per object). `None` without a prefix object.
///
/// A piece listed past the chain's end (after reading again, in case the
/// agent was uploading it) means an older object was put back over a newer
/// one: refused as corrupt, never served as a shorter prefix.
pub async fn read_prefix(repo: &Repository, segment: SegmentId, size: u64) -> Result<Option<Vec<u8>>, RepoError> {
    let prefix_key = partial_segment_key(segment, size);
    let mut assembled = None;
    for attempt in 1..=READ_ATTEMPTS {
        let Some(mut bytes) = repo.get(&prefix_key).await? else { return Ok(assembled) };
        while (bytes.len() as u64) < size {
            let key = partial_piece_key(segment, size, bytes.len() as u64);
            let Some(piece) = repo.get(&key).await? else { break };
            if piece.is_empty() {
                break;
            }
            if bytes.len() as u64 + piece.len() as u64 > size {
                return Err(RepoError::corrupt(&key, format!("{} bytes run past the segment's end", piece.len())));
            }
            bytes.extend_from_slice(&piece);
        }
        // The chain ended where a piece was missing. If the agent folded
        // the pieces into a longer prefix meanwhile, read that.
        let end = bytes.len() as u64;
        let folded = raw_len(repo, &prefix_key).await?.is_some_and(|now| now > end);
        assembled = Some(bytes);
        if folded {
            continue;
        }
        // A piece at or past the end: just uploaded (read again), or left
        // by a newer chain that an older object was put back over.
        match first_piece_from(repo, segment, size, end).await? {
            None => break,
            Some(offset) if attempt == READ_ATTEMPTS && offset > end => {
                return Err(RepoError::corrupt(
                    &prefix_key,
                    format!(
                        "its chain ends at offset {end:#X}, but a piece of a newer chain starts at {offset:#X}: an older \
                         partial object was put back in place of a newer one; put the newer one back, or run `verify`"
                    ),
                ));
            }
            Some(_) if attempt == READ_ATTEMPTS => break,
            Some(_) => {}
        }
    }
    Ok(assembled)
}

/// The lowest start offset of a listed piece of `segment` at or past
/// `end`. Listed from the prefix object's key on, so only the segment's own
/// objects are read from a long timeline directory.
async fn first_piece_from(
    repo: &Repository,
    segment: SegmentId,
    size: u64,
    end: u64,
) -> Result<Option<u64>, RepoError> {
    use futures::StreamExt;
    let prefix_key = partial_segment_key(segment, size);
    let dir = ObjectPath::from(prefix_key.rsplit_once('/').map_or("", |(dir, _)| dir));
    let mut listing = repo.store.list_with_offset(Some(&dir), &ObjectPath::from(prefix_key.as_str()));
    let mut first = None;
    while let Some(object) = listing.next().await {
        let object = object.map_err(|e| RepoError::store(format!("list the pieces of {prefix_key}"), e))?;
        let key = object.location.to_string();
        if !key.starts_with(&prefix_key) {
            // Keys are listed in order on object stores; a local listing
            // is not ordered, so it is read to its end.
            if repo.local_root.is_none() {
                break;
            }
            continue;
        }
        if let Some(ObjectKey::PartialPiece { offset, .. }) = ObjectKey::parse(&key, size) {
            if offset >= end && first.is_none_or(|f| offset < f) {
                first = Some(offset);
            }
        }
    }
    Ok(first)
}

/// Where `segment`'s durable prefix ends, from a listing: `offsets` are the
/// start offsets of its listed pieces (the prefix object, listed too, is
/// offset 0 and must be among them). Returns the end and the offsets on the
/// chain; each object on it costs one header read.
pub async fn chain_end(
    repo: &Repository,
    segment: SegmentId,
    size: u64,
    offsets: &BTreeSet<u64>,
) -> Result<(u64, Vec<u64>), RepoError> {
    let mut end = 0;
    let mut chain = Vec::new();
    while end < size && offsets.contains(&end) {
        let key = if end == 0 { partial_segment_key(segment, size) } else { partial_piece_key(segment, size, end) };
        // Gone since the listing: folded into a newer prefix.
        let Some(len) = raw_len(repo, &key).await? else { break };
        if end + len > size {
            return Err(RepoError::corrupt(&key, format!("{len} bytes at offset {end} run past the segment's end")));
        }
        chain.push(end);
        if len == 0 {
            break; // An empty prefix (an old agent stored one at a segment's start) continues nothing.
        }
        end += len;
    }
    Ok((end, chain))
}

/// The raw length an object's header gives, or `None` when it is gone.
async fn raw_len(repo: &Repository, key: &str) -> Result<Option<u64>, RepoError> {
    match repo.frame_info(key).await {
        Ok(info) => Ok(Some(info.raw_len)),
        Err(e) => match repo.exists(key).await? {
            true => Err(e),
            false => Ok(None),
        },
    }
}

/// What the agent does with the next upload of a partial segment: fold
/// everything into the prefix object, or add the new bytes as a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextUpload {
    Prefix,
    Piece { offset: u64 },
}

/// The pieces stored since the prefix object was last written: what
/// decides when to fold them in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredChain {
    /// Stored bytes of the prefix object; 0 before it is first written.
    pub prefix_stored: u64,
    /// Start offset and stored bytes of each piece after it.
    pub pieces: Vec<(u64, u64)>,
}

/// Readers follow the chain one request at a time: past this many pieces
/// the next upload folds them in.
pub const MAX_PIECES: usize = 32;

impl StoredChain {
    /// The next upload of a segment whose bytes so far end at `raw_end`:
    /// a piece unless there is no prefix object yet, the chain is long, or
    /// the pieces together outweigh the prefix (so the bytes written stay
    /// within a small multiple of the segment, however it fills), or this is
    /// the timeline's last segment (`last`), which stays as one object.
    pub fn next_upload(&self, raw_end: u64, last: bool) -> NextUpload {
        let pieces_stored: u64 = self.pieces.iter().map(|(_, stored)| stored).sum();
        if self.prefix_stored == 0 || last || self.pieces.len() >= MAX_PIECES || pieces_stored >= self.prefix_stored {
            NextUpload::Prefix
        } else {
            NextUpload::Piece { offset: raw_end }
        }
    }

    /// Records a finished upload.
    pub fn stored(&mut self, upload: NextUpload, stored_bytes: u64) {
        match upload {
            NextUpload::Prefix => {
                self.prefix_stored = stored_bytes.max(1);
                self.pieces.clear();
            }
            NextUpload::Piece { offset } => self.pieces.push((offset, stored_bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_proto::repo::frame::{encode, Compression};
    use tidemark_proto::TimelineId;

    const SIZE: u64 = 16 << 20;

    fn framed(raw: &[u8]) -> Vec<u8> {
        encode(raw, Compression::Zstd { level: 1 }).expect("frame").0
    }

    #[tokio::test]
    async fn the_prefix_is_the_chain_from_offset_zero_and_a_fold_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().to_str().expect("utf-8").to_string();
        let repo = Repository::open(&url, &[], crate::Create::Yes).expect("open").with_keyring(None);
        let segment = SegmentId { timeline: TimelineId(1), segment_no: 7 };
        let wal: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(read_prefix(&repo, segment, SIZE).await.expect("read"), None, "nothing stored");

        repo.put(&partial_segment_key(segment, SIZE), framed(&wal[..10_000])).await.expect("put");
        repo.put(&partial_piece_key(segment, SIZE, 10_000), framed(&wal[10_000..12_000])).await.expect("put");
        repo.put(&partial_piece_key(segment, SIZE, 12_000), framed(&wal[12_000..20_000])).await.expect("put");
        // Off the chain: starts inside the piece before it (left by a restart).
        repo.put(&partial_piece_key(segment, SIZE, 11_000), framed(&wal[11_000..25_000])).await.expect("put");
        assert_eq!(read_prefix(&repo, segment, SIZE).await.expect("read").as_deref(), Some(&wal[..20_000]));
        let listed = BTreeSet::from([0, 10_000, 11_000, 12_000]);
        let (end, chain) = chain_end(&repo, segment, SIZE, &listed).await.expect("chain");
        assert_eq!((end, chain), (20_000, vec![0, 10_000, 12_000]));

        // A fold: the new prefix first, then the pieces go. A listing made
        // before it meets pieces that are gone and reports the shorter chain.
        repo.put(&partial_segment_key(segment, SIZE), framed(&wal[..20_000])).await.expect("put");
        for offset in [10_000, 12_000] {
            repo.delete(&partial_piece_key(segment, SIZE, offset)).await.expect("delete");
        }
        assert_eq!(read_prefix(&repo, segment, SIZE).await.expect("read").as_deref(), Some(&wal[..20_000]));
        let (end, chain) = chain_end(&repo, segment, SIZE, &listed).await.expect("chain");
        assert_eq!((end, chain), (20_000, vec![0]));
        repo.put(&partial_piece_key(segment, SIZE, 20_000), framed(&wal[20_000..])).await.expect("put");
        assert_eq!(read_prefix(&repo, segment, SIZE).await.expect("read").as_deref(), Some(&wal[..]));

        // The first prefix put back over the folded one: its chain ends at
        // 10 000, while a piece of the newer chain starts at 20 000.
        repo.put(&partial_segment_key(segment, SIZE), framed(&wal[..10_000])).await.expect("put");
        let error = read_prefix(&repo, segment, SIZE).await.expect_err("an older prefix is refused");
        assert!(error.to_string().contains("an older partial object was put back"), "{error}");
        repo.put(&partial_segment_key(segment, SIZE), framed(&wal[..20_000])).await.expect("put");
        assert_eq!(read_prefix(&repo, segment, SIZE).await.expect("read").as_deref(), Some(&wal[..]));

        // A piece running past the segment's end is refused, never served.
        let full = SegmentId { timeline: TimelineId(1), segment_no: 8 };
        let near_end = SIZE - 100;
        repo.put(&partial_segment_key(full, SIZE), framed(&vec![0; near_end as usize])).await.expect("put");
        repo.put(&partial_piece_key(full, SIZE, near_end), framed(&[1; 200])).await.expect("put");
        let error = read_prefix(&repo, full, SIZE).await.expect_err("refused");
        assert!(error.to_string().contains("past the segment's end"), "{error}");
        let error = chain_end(&repo, full, SIZE, &BTreeSet::from([0, near_end])).await.expect_err("refused");
        assert!(error.to_string().contains("past the segment's end"), "{error}");
    }

    #[test]
    fn pieces_follow_a_prefix_and_are_folded_in_when_they_outweigh_it_or_are_many() {
        let mut chain = StoredChain::default();
        assert_eq!(chain.next_upload(100, false), NextUpload::Prefix, "the first upload is the prefix");
        chain.stored(NextUpload::Prefix, 1000);
        assert_eq!(chain.next_upload(100, false), NextUpload::Piece { offset: 100 });
        assert_eq!(chain.next_upload(100, true), NextUpload::Prefix, "a timeline's last segment is one object");
        chain.stored(NextUpload::Piece { offset: 100 }, 600);
        assert_eq!(chain.next_upload(180, false), NextUpload::Piece { offset: 180 });
        chain.stored(NextUpload::Piece { offset: 180 }, 400);
        assert_eq!(chain.next_upload(260, false), NextUpload::Prefix, "pieces as heavy as the prefix fold in");
        chain.stored(NextUpload::Prefix, 1200);
        assert!(chain.pieces.is_empty());
        for n in 0..MAX_PIECES as u64 {
            let offset = 300 + n;
            assert_eq!(chain.next_upload(offset, false), NextUpload::Piece { offset });
            chain.stored(NextUpload::Piece { offset }, 1);
        }
        assert_eq!(chain.next_upload(400, false), NextUpload::Prefix, "a long chain folds in");
    }
}
