//! The local spool: WAL segment files in `<state-dir>/spool`.
//!
//! - `<segment>.partial`: being filled (created zero-filled to the segment's
//!   size). Bytes count as flushed only after `SegmentWriter::flush` fsynced them.
//! - `<segment>`: complete and fsynced, waiting for the uploader, which
//!   deletes it once the repository holds it durably.
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
}

impl SegmentWriter {
    /// Starts at `start`, which must be a segment boundary.
    pub fn new(spool: Spool, timeline: TimelineId, start: Lsn) -> SegmentWriter {
        SegmentWriter { spool, timeline, position: start, flushed: start, current: None }
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

    /// Writes bytes that start at `start`; returns the segments this completed.
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
        Ok(completed)
    }

    fn open_current(&mut self) -> anyhow::Result<&mut OpenSegment> {
        let segment = SegmentId::containing(self.timeline, self.position, self.spool.segment_size);
        if self.current.as_ref().map(|c| c.segment) != Some(segment) {
            let path = self.spool.partial_path(segment);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("open spool file {}", path.display()))?;
            preallocate(&file, self.spool.segment_size)
                .with_context(|| format!("fill {} with zeros", path.display()))?;
            sync_dir(&self.spool.dir)?;
            self.current = Some(OpenSegment { segment, file, dirty: false });
        }
        self.current.as_mut().context("no open spool segment")
    }

    /// fsyncs the full segment, gives it its final name durably.
    fn complete_current(&mut self) -> anyhow::Result<CompletedSegment> {
        let open = self.current.take().context("no open spool segment")?;
        open.file.sync_all().context("fsync spool segment")?;
        let from = self.spool.partial_path(open.segment);
        let to = self.spool.complete_path(open.segment);
        std::fs::rename(&from, &to).with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
        sync_dir(&self.spool.dir)?;
        self.flushed = self.position;
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
}
