//! Chunks of a backup read back and checked against its manifest, and the
//! pages of a chain's whole copy of a relation file: what an incremental
//! backup XORs its changed pages with (`pages_xor`), and what undoes that
//! XOR at restore. The agent and the restore tool use the same functions,
//! so both sides always XOR with the same bytes.

use crate::{RepoError, Repository};
use tidemark_proto::repo::backup::{BackupFile, ChunkRef};
use tidemark_proto::repo::chain::{xor_pages, BLOCK_SIZE};

/// A chunk's bytes, checked against the manifest that lists it (length and
/// CRC-32C); `needed_by` names the file for the error.
pub async fn get_chunk(repo: &Repository, chunk: &ChunkRef, needed_by: &str) -> Result<Vec<u8>, RepoError> {
    let raw = repo
        .get(&chunk.key)
        .await?
        .ok_or_else(|| RepoError::corrupt(&chunk.key, format!("missing (needed by {needed_by})")))?;
    if raw.len() as u64 != chunk.raw_len || crc32c::crc32c(&raw) != chunk.crc32c {
        return Err(RepoError::corrupt(&chunk.key, "does not match the backup manifest"));
    }
    Ok(raw)
}

/// The pages at `blocks` (ascending) of `whole`, a file stored whole, one
/// after the other; a zero page for a block past its end. Each chunk is
/// fetched once per call.
pub async fn whole_pages(repo: &Repository, whole: &BackupFile, blocks: &[u64]) -> Result<Vec<u8>, RepoError> {
    let page = BLOCK_SIZE as usize;
    let mut out = vec![0u8; blocks.len() * page];
    // (index, first byte, bytes) of the chunk fetched last.
    let mut current: Option<(usize, u64, Vec<u8>)> = None;
    let mut chunk_start = 0u64;
    let mut chunk_index = 0usize;
    for (slot, &block) in out.chunks_exact_mut(page).zip(blocks) {
        let offset = block * BLOCK_SIZE;
        if offset + BLOCK_SIZE > whole.size {
            continue; // past the whole copy's end: XORed with zeros
        }
        // Blocks ascend: walk the chunks forward to the one holding `offset`.
        while let Some(chunk) = whole.chunks.get(chunk_index) {
            if offset < chunk_start + chunk.raw_len {
                break;
            }
            chunk_start += chunk.raw_len;
            chunk_index += 1;
        }
        let chunk = whole.chunks.get(chunk_index).ok_or_else(|| {
            RepoError::corrupt(&whole.path, format!("block {block} is past the chunks of the whole copy"))
        })?;
        if current.as_ref().map(|(index, ..)| *index) != Some(chunk_index) {
            current = Some((chunk_index, chunk_start, get_chunk(repo, chunk, &whole.path).await?));
        }
        let (_, start, bytes) = current.as_ref().ok_or_else(|| RepoError::corrupt(&chunk.key, "not fetched"))?;
        let at = usize::try_from(offset - start).unwrap_or(usize::MAX);
        match bytes.get(at..at.saturating_add(page)) {
            Some(bytes) => slot.copy_from_slice(bytes),
            // A page across two chunks: whole files are chunked at 8 MiB,
            // a multiple of the page, so only a damaged manifest does this.
            None => return Err(RepoError::corrupt(&chunk.key, "a page crosses the end of the chunk")),
        }
    }
    Ok(out)
}

/// Undoes the XOR of a `pages_xor` chunk in place (`blocks`: each page's
/// block) and checks the pages against the chunk's `pages_crc32c`.
pub async fn unxor_chunk(
    repo: &Repository,
    whole: &BackupFile,
    chunk: &ChunkRef,
    blocks: &[u64],
    raw: &mut [u8],
) -> Result<(), RepoError> {
    if raw.len() as u64 != blocks.len() as u64 * BLOCK_SIZE {
        return Err(RepoError::corrupt(&chunk.key, "its length is not its pages'"));
    }
    let base = whole_pages(repo, whole, blocks).await?;
    xor_pages(raw, &base);
    if Some(crc32c::crc32c(raw)) != chunk.pages_crc32c {
        return Err(RepoError::corrupt(
            &chunk.key,
            format!("its pages XORed with the whole copy of {} do not match the backup manifest", whole.path),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Create;
    use tidemark_proto::repo::backup::FileKind;
    use tidemark_proto::repo::frame::{self, Compression};

    async fn put(repo: &Repository, key: &str, raw: &[u8]) -> ChunkRef {
        let (object, _) = frame::encode(raw, Compression::Zstd { level: 1 }).expect("frame");
        repo.put(key, object).await.expect("put");
        ChunkRef {
            key: key.into(),
            raw_len: raw.len() as u64,
            crc32: crc32fast::hash(raw),
            crc32c: crc32c::crc32c(raw),
            pages_crc32c: None,
        }
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK_SIZE as usize]
    }

    #[tokio::test]
    async fn xored_pages_come_back_from_the_whole_copy_or_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().to_str().expect("utf-8").to_string();
        let repo = Repository::open(&url, &[], Create::Yes).expect("open").with_keyring(None);
        // The whole copy: blocks 0-1 in one chunk, block 2 in the next.
        let first = put(&repo, "w0", &[page(1), page(2)].concat()).await;
        let second = put(&repo, "w1", &page(3)).await;
        let whole = BackupFile {
            archive: "base".into(),
            path: "base/5/16384".into(),
            kind: FileKind::File,
            size: 3 * BLOCK_SIZE,
            mode: 0o600,
            mtime_unix: 0,
            link_target: None,
            chunks: vec![first, second],
            blocks: None,
            pages_xor: false,
        };
        let base = whole_pages(&repo, &whole, &[0, 2, 5]).await.expect("pages");
        assert_eq!(base, [page(1), page(3), page(0)].concat(), "past the end: zeros");
        // Blocks 2 and 5 changed: stored XORed with the whole copy's.
        let pages = [page(7), page(9)].concat();
        let mut stored = pages.clone();
        xor_pages(&mut stored, &whole_pages(&repo, &whole, &[2, 5]).await.expect("pages"));
        let mut chunk = put(&repo, "x0", &stored).await;
        chunk.pages_crc32c = Some(crc32c::crc32c(&pages));
        let mut raw = get_chunk(&repo, &chunk, "base/5/16384").await.expect("chunk");
        unxor_chunk(&repo, &whole, &chunk, &[2, 5], &mut raw).await.expect("undone");
        assert_eq!(raw, pages);
        // XORed with the wrong pages: the checksum of the pages refuses it.
        let mut raw = stored.clone();
        let error = unxor_chunk(&repo, &whole, &chunk, &[1, 5], &mut raw).await.expect_err("refused");
        assert!(error.to_string().contains("x0"), "{error}");
        // A chunk that is not what the manifest says is refused by name.
        let mut wrong = chunk.clone();
        wrong.crc32c ^= 1;
        assert!(get_chunk(&repo, &wrong, "f").await.expect_err("refused").to_string().contains("x0"));
    }
}
