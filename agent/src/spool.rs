//! The local spool: WAL segment files in `<state-dir>/spool`.
//!
//! - `<segment>.partial`: being filled (created zero-filled to the segment's
//!   size). Bytes count as flushed only after `SegmentWriter::flush` fsynced them.
//! - `<segment>`: complete and fsynced, waiting for the uploader, which
//!   deletes it once the repository holds it durably.
//! - `spare`: an archived segment's file, kept by the uploader for the next
//!   segment instead of being deleted (as PostgreSQL recycles its own WAL
//!   files); opening the next segment renames it. Its old bytes are never
//!   read: every reader of a `.partial` stops at the flushed position.
//!
//! After a crash, streaming resumes at the start of the newest `.partial`
//! (rewriting identical bytes) or after the newest complete file: the server
//! keeps that segment, because the slot never advanced past what we flushed.

use anyhow::Context;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tidemark_proto::segment::{SegmentId, WalFileName};
use tidemark_proto::{Lsn, TimelineId};

#[derive(Clone, Debug)]
pub struct Spool {
    pub dir: PathBuf,
    pub segment_size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolFile {
    pub segment: SegmentId,
    pub complete: bool,
    pub path: PathBuf,
}

impl Spool {
    pub fn open(state_dir: &Path, segment_size: u64) -> anyhow::Result<Spool> {
        let dir = state_dir.join("spool");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create spool directory {}", dir.display()))?;
        Ok(Spool { dir, segment_size })
    }

    /// Spool files in (timeline, segment) order.
    pub fn scan(&self) -> anyhow::Result<Vec<SpoolFile>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("list {}", self.dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let (base, complete) = match name.strip_suffix(".partial") {
                Some(base) => (base.to_string(), false),
                None => (name.clone(), true),
            };
            if let Ok(WalFileName::Segment(segment)) = WalFileName::parse(&base, self.segment_size) {
                files.push(SpoolFile { segment, complete, path: entry.path() });
            }
        }
        files.sort_by_key(|f| (f.segment, f.complete));
        Ok(files)
    }

    /// Where streaming must resume, judged from the spool alone.
    pub fn resume_point(&self) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
        let files = self.scan()?;
        Ok(files.last().map(|f| {
            let lsn =
                if f.complete { f.segment.end_lsn(self.segment_size) } else { f.segment.start_lsn(self.segment_size) };
            (f.segment.timeline, lsn)
        }))
    }

    pub fn partial_path(&self, segment: SegmentId) -> PathBuf {
        self.dir.join(format!("{}.partial", segment.file_name(self.segment_size)))
    }

    pub fn complete_path(&self, segment: SegmentId) -> PathBuf {
        self.dir.join(segment.file_name(self.segment_size))
    }
}

/// A segment that was filled, fsynced and renamed to its final name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedSegment {
    pub segment: SegmentId,
    pub path: PathBuf,
}

/// The file the next segment is opened from (see `recycle`).
const SPARE: &str = "spare";

struct OpenSegment {
    segment: SegmentId,
    file: File,
    dirty: bool,
}

/// Writes streamed WAL into spool files; tracks written and flushed positions.
pub struct SegmentWriter {
    spool: Spool,
    timeline: TimelineId,
    /// The next byte we expect from the server.
    position: Lsn,
    /// Everything before this is fsynced.
    flushed: Lsn,
    current: Option<OpenSegment>,
    /// A rename in the spool directory (a completed segment's final name,
    /// the spare taken as the new `.partial`) not yet made durable.
    names_unsynced: bool,
}

impl SegmentWriter {
    /// Starts at `start`, which must be a segment boundary.
    pub fn new(spool: Spool, timeline: TimelineId, start: Lsn) -> SegmentWriter {
        SegmentWriter { spool, timeline, position: start, flushed: start, current: None, names_unsynced: false }
    }

    pub fn position(&self) -> Lsn {
        self.position
    }

    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// Writes bytes that start at `start`; returns the segments this
    /// completed, each fsynced under its final name.
    pub fn write(&mut self, start: Lsn, mut data: &[u8]) -> anyhow::Result<Vec<CompletedSegment>> {
        anyhow::ensure!(
            start == self.position,
            "the server sent WAL from {start} but the next byte expected is {}",
            self.position
        );
        let size = self.spool.segment_size;
        let mut completed = Vec::new();
        while !data.is_empty() {
            let offset = self.position.segment_offset(size);
            let room = (size - offset) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            let open = self.open_current()?;
            open.file
                .write_all_at(now, offset)
                .with_context(|| format!("write spool segment {}", open.segment.file_name(size)))?;
            open.dirty = true;
            self.position = Lsn(self.position.0 + now.len() as u64);
            data = rest;
            if self.position.segment_offset(size) == 0 {
                completed.push(self.complete_current()?);
            }
        }
        // One fsync of the directory for every rename above: a segment
        // switch is one `rename` each way and this, where a commit may wait.
        if self.names_unsynced {
            sync_dir(&self.spool.dir)?;
            self.names_unsynced = false;
        }
        if let Some(last) = completed.last() {
            self.flushed = self.flushed.max(last.segment.end_lsn(size));
        }
        Ok(completed)
    }

    fn open_current(&mut self) -> anyhow::Result<&mut OpenSegment> {
        let segment = SegmentId::containing(self.timeline, self.position, self.spool.segment_size);
        if self.current.as_ref().map(|c| c.segment) != Some(segment) {
            let path = self.spool.partial_path(segment);
            let took_spare = self.take_spare(&path)?;
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("open spool file {}", path.display()))?;
            // Without a spare (the first segments, or the uploader behind)
            // the file is filled with zeros here.
            preallocate(&file, self.spool.segment_size)
                .with_context(|| format!("fill {} with zeros", path.display()))?;
            if !took_spare {
                sync_dir(&self.spool.dir)?;
            }
            self.current = Some(OpenSegment { segment, file, dirty: false });
        }
        self.current.as_mut().context("no open spool segment")
    }

    /// Renames the spare to `path` when there is one and `path` does not
    /// exist yet (a `.partial` already there is being resumed and keeps its
    /// bytes). The rename is made durable by `write` before anything is
    /// reported flushed.
    fn take_spare(&mut self, path: &Path) -> anyhow::Result<bool> {
        if path.try_exists().with_context(|| format!("stat {}", path.display()))? {
            return Ok(false);
        }
        let spare = self.spool.dir.join(SPARE);
        // A spare of another size (a state directory that followed a
        // cluster of another segment size) is not used.
        match std::fs::metadata(&spare) {
            Ok(meta) if meta.len() == self.spool.segment_size => {}
            Ok(_) => {
                std::fs::remove_file(&spare).with_context(|| format!("remove {}", spare.display()))?;
                return Ok(false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("stat {}", spare.display())),
        }
        match std::fs::rename(&spare, path) {
            Ok(()) => {
                self.names_unsynced = true;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("rename {} to {}", spare.display(), path.display())),
        }
    }

    /// fsyncs the full segment and renames it to its final name; `write`
    /// makes the rename durable.
    fn complete_current(&mut self) -> anyhow::Result<CompletedSegment> {
        let open = self.current.take().context("no open spool segment")?;
        open.file.sync_data().context("fsync spool segment")?;
        let from = self.spool.partial_path(open.segment);
        let to = self.spool.complete_path(open.segment);
        std::fs::rename(&from, &to).with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
        self.names_unsynced = true;
        Ok(CompletedSegment { segment: open.segment, path: to })
    }

    /// Makes everything written so far durable; returns the flushed position.
    pub fn flush(&mut self) -> anyhow::Result<Lsn> {
        if let Some(open) = self.current.as_mut() {
            if open.dirty {
                open.file.sync_data().context("fsync spool segment")?;
                open.dirty = false;
            }
        }
        self.flushed = self.position;
        Ok(self.flushed)
    }

    /// The segment being filled and how many of its bytes are flushed, if any.
    pub fn partial(&self) -> Option<(SegmentId, PathBuf, u64)> {
        let offset = self.flushed.segment_offset(self.spool.segment_size);
        if offset == 0 {
            return None;
        }
        let segment = SegmentId::containing(self.timeline, self.flushed, self.spool.segment_size);
        Some((segment, self.spool.partial_path(segment), offset))
    }
}

/// Extends a new spool file to the whole segment with zeros and makes that
/// durable, as PostgreSQL does with its own WAL files: the fsync after each
/// later write then has only data to flush, not a grown file's metadata
/// (which on ext4 doubled its cost). Bytes already in the file stay.
fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = file.metadata()?.len();
    if at >= size {
        return Ok(());
    }
    while at < size {
        let n = (size - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

/// Keeps `path`, an archived complete segment in the spool, as the file
/// the next segment is opened from, instead of deleting it: the segment
/// switch on the receive path, where a synchronous commit may wait, is then
/// two renames and one fsync of the directory. Writing and fsyncing 16 MB
/// of zeros there took 15–27 ms under the benchmark's load (an ordinary
/// fsync ~0.4 ms), and doing it ahead on another thread only moved the
/// stall: the commits' fsyncs queued behind its 16 MB (12–18 ms each). A
/// recycled file's blocks are allocated and written, so an fsync after
/// overwriting them flushes data only, as with zeros. Replaces an unused
/// spare; the rename is made durable before returning (as a delete would be).
pub fn recycle(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("a spool file has a directory")?;
    let spare = dir.join(SPARE);
    std::fs::rename(path, &spare).with_context(|| format!("rename {} to {}", path.display(), spare.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    tidemark_repo::durable::fsync_dir(dir).with_context(|| format!("fsync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    #[test]
    fn writes_split_at_segment_boundaries_and_resume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), SIZE).expect("spool");
        let tli = TimelineId(1);
        let mut writer = SegmentWriter::new(spool.clone(), tli, Lsn(SIZE));
        let chunk = vec![7u8; (SIZE - 100) as usize];
        assert!(writer.write(Lsn(SIZE), &chunk).expect("write").is_empty());
        assert!(writer.write(Lsn(SIZE + 1), b"x").is_err(), "a gap is refused");
        let completed = writer.write(Lsn(2 * SIZE - 100), &[8u8; 300]).expect("write");
        assert_eq!(completed.len(), 1);
        assert_eq!(completed[0].segment, SegmentId { timeline: tli, segment_no: 1 });
        assert_eq!(std::fs::metadata(&completed[0].path).expect("stat").len(), SIZE);
        assert_eq!(writer.flushed(), Lsn(2 * SIZE), "a completed segment is flushed");
        assert_eq!(writer.flush().expect("flush"), Lsn(2 * SIZE + 200));
        let (segment, path, len) = writer.partial().expect("partial");
        assert_eq!((segment.segment_no, len), (2, 200));
        // The file being filled was made whole (zeros) when created; its data is in place.
        let bytes = std::fs::read(&path).expect("read partial");
        assert_eq!(bytes.len() as u64, SIZE);
        assert!(bytes[..200].iter().all(|b| *b == 8) && bytes[200..].iter().all(|b| *b == 0));
        // The newest file is a .partial: resume from its segment start.
        assert_eq!(spool.resume_point().expect("resume"), Some((tli, Lsn(2 * SIZE))));
        let files = spool.scan().expect("scan");
        assert_eq!(files.iter().map(|f| f.complete).collect::<Vec<_>>(), vec![true, false]);
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").ino()
    }

    #[test]
    fn the_next_segment_is_opened_from_a_recycled_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), SIZE).expect("spool");
        let tli = TimelineId(1);
        let mut writer = SegmentWriter::new(spool.clone(), tli, Lsn(SIZE));
        let completed = writer.write(Lsn(SIZE), &vec![1u8; SIZE as usize + 10]).expect("write");
        assert_eq!(completed.len(), 1);
        let recycled = inode(&completed[0].path);
        // The uploader stored segment 1: it becomes the spare, not a segment.
        recycle(&completed[0].path).expect("recycle");
        let spare = spool.dir.join(SPARE);
        assert_eq!(inode(&spare), recycled);
        assert_eq!(spool.scan().expect("scan").len(), 1, "only segment 2 is a segment");
        // Crossing into segment 3 takes the spare as its file.
        let completed = writer.write(Lsn(2 * SIZE + 10), &vec![3u8; SIZE as usize]).expect("write");
        assert_eq!(completed.len(), 1);
        let partial = spool.partial_path(SegmentId { timeline: tli, segment_no: 3 });
        assert_eq!(inode(&partial), recycled);
        assert!(!spare.exists());
        assert_eq!(writer.flushed(), Lsn(3 * SIZE), "the completed segment counts as flushed");
        assert_eq!(writer.flush().expect("flush"), Lsn(3 * SIZE + 10));
        // Its first bytes are the new segment's; the rest is the old one's,
        // never read: the partial upload stops at the flushed offset.
        let (segment, path, len) = writer.partial().expect("partial");
        assert_eq!((segment.segment_no, len, path), (3, 10, partial.clone()));
        let bytes = std::fs::read(&partial).expect("read");
        assert!(bytes.len() as u64 == SIZE && bytes[..10].iter().all(|b| *b == 3));
        let done = std::fs::read(spool.complete_path(SegmentId { timeline: tli, segment_no: 2 })).expect("segment 2");
        assert!(done[..10].iter().all(|b| *b == 1) && done[10..].iter().all(|b| *b == 3));
    }

    #[test]
    fn a_partial_being_resumed_keeps_its_bytes_and_a_wrong_sized_spare_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), SIZE).expect("spool");
        let tli = TimelineId(1);
        let partial = spool.partial_path(SegmentId { timeline: tli, segment_no: 1 });
        let mut old = vec![0u8; SIZE as usize];
        old[..50].fill(5);
        std::fs::write(&partial, &old).expect("write partial");
        let spare = spool.dir.join(SPARE);
        std::fs::write(&spare, vec![9u8; SIZE as usize]).expect("write spare");
        let (partial_inode, spare_inode) = (inode(&partial), inode(&spare));
        // Resuming at the segment's start rewrites the same bytes into the same file.
        let mut writer = SegmentWriter::new(spool.clone(), tli, Lsn(SIZE));
        writer.write(Lsn(SIZE), &[5u8; 20]).expect("write");
        assert_eq!(inode(&partial), partial_inode);
        assert_eq!(std::fs::read(&partial).expect("read"), old);
        assert_eq!(inode(&spare), spare_inode, "the unused spare stays");
        // A spare of another size is removed, not used: the file is made anew.
        std::fs::write(&spare, [0u8; 10]).expect("write spare");
        let mut writer = SegmentWriter::new(spool.clone(), tli, Lsn(2 * SIZE));
        writer.write(Lsn(2 * SIZE), &[6u8; 10]).expect("write");
        let next = spool.partial_path(SegmentId { timeline: tli, segment_no: 2 });
        let bytes = std::fs::read(&next).expect("read");
        assert!(
            bytes.len() as u64 == SIZE && bytes[..10].iter().all(|b| *b == 6) && bytes[10..].iter().all(|b| *b == 0)
        );
        assert!(!spare.exists());
    }
}
