//! Durable local writes, said once: what a caller reports as durable has
//! been fsynced, and so has the directory entry that names it.
//!
//! Used by the local repository (its puts, which object_store's local
//! backend would write and rename without an fsync), the agent's spool, and the restore tool's
//! `wal-get` (PostgreSQL must never see a half-written file under the name it
//! asked for).

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Whether a write must survive a crash. Staged WAL does not: nothing durable
/// depends on it (a restore that crashes starts over), and an fsync per
/// 16 MiB segment would slow replay down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Fsync,
    PageCache,
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// fsyncs a directory, making the creation, rename or removal of its entries durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs a file and then its directory.
pub fn fsync_file_and_dir(file: &Path) -> std::io::Result<()> {
    File::open(file)?.sync_all()?;
    fsync_dir(parent_dir(file))
}

/// Creates a new file at `path` for writing, owner-only, with O_EXCL: never
/// through a symlink someone left at that name, never into a file that is
/// already there. Temporary names here carry our pid, so a file found there
/// was left by a killed run whose pid came round again: it is removed (the
/// entry itself, not what a symlink points to) and creation tried once more.
pub fn create_exclusive(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            create()
        }
        other => other,
    }
}

/// Writes `content` to `destination` through a temporary name beside it:
/// write, (fsync), rename, (fsync the directory). A reader sees the old file
/// or the whole new one, never a part.
pub fn write_atomically(destination: &Path, content: &[u8], durability: Durability) -> std::io::Result<()> {
    let dir = parent_dir(destination);
    let file_name = destination
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the destination has no file name"))?;
    let temp = dir.join(format!(".{}.tidemark-tmp.{}", file_name.to_string_lossy(), std::process::id()));
    let mut file = create_exclusive(&temp)?;
    let written = file.write_all(content).and_then(|()| match durability {
        Durability::Fsync => file.sync_all(),
        Durability::PageCache => Ok(()),
    });
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&temp, destination)) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    if durability == Durability::Fsync {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Stores an object of a local repository durably in one pass: a staging
/// file beside it named as object_store names its own (`name#N`, which
/// listings skip and expiry finds if a crash leaves it), created with mode
/// 0600, written and fsynced before it is renamed over the object, then the
/// directory fsynced. A reader and a crash both see the old object or the
/// whole new one. Missing directories are created (and made durable).
pub fn put_object_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
    let mut suffix = [0u8; 4];
    getrandom::getrandom(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!("#{}", u32::from_le_bytes(suffix)));
    let staging = std::path::PathBuf::from(staging);
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staging);
    let mut file = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_dirs_durably(dir)?;
            create()?
        }
        other => other?,
    };
    let written = file.write_all(content).and_then(|()| file.sync_data());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&staging, path)) {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    fsync_dir(dir)
}

/// Creates `dir` and its missing parents, fsyncing the directory that holds
/// each one created so the new entries survive a crash.
fn create_dirs_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.exists() {
        missing.push(at);
        match at.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => at = parent,
            None => break,
        }
    }
    for created in missing.into_iter().rev() {
        match std::fs::create_dir(created) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
        fsync_dir(parent_dir(created))?;
    }
    Ok(())
}

/// Removes a file (a missing one is fine) and makes the removal durable.
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fsync_dir(parent_dir(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_files_are_created_with_their_directories_replaced_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal/00000001/000000010000000000000003.partial");
        put_object_file(&path, b"first").expect("create");
        put_object_file(&path, b"second, longer").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second, longer");
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "objects are private to the agent's user");
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no staging file is left beside the object: {names:?}");
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("000000010000000000000001");
        write_atomically(&path, b"first", Durability::Fsync).expect("write");
        write_atomically(&path, b"second", Durability::PageCache).expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "only the destination remains: {names:?}");
        remove_durably(&path).expect("remove");
        remove_durably(&path).expect("removing a missing file is fine");
        assert!(!path.exists());
        assert!(write_atomically(Path::new("/"), b"x", Durability::Fsync).is_err(), "no file name");
    }

    #[test]
    fn temporary_files_never_write_through_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let destination = dir.path().join("RECOVERYXLOG");
        let planted = dir.path().join(format!(".RECOVERYXLOG.tidemark-tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).expect("symlink");
        write_atomically(&destination, b"segment", Durability::PageCache).expect("write");
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious", "the symlink's target is untouched");
        assert_eq!(std::fs::read(&destination).expect("read"), b"segment");
        assert!(!planted.exists() && std::fs::symlink_metadata(&planted).is_err(), "the planted link is gone");
        let file = create_exclusive(&dir.path().join("new")).expect("create");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(file.metadata().expect("metadata").permissions().mode() & 0o777, 0o600);
    }
}
