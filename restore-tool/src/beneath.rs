//! Writing beneath a directory without ever following a link, and the
//! backup manifest's paths checked to stay beneath it.
//!
//! A repository is data from outside: whoever can write to it can put a
//! link `x -> /home` and a file `x/.ssh/authorized_keys` in a manifest, and
//! `restore` may run as root. Two walls, each enough on its own:
//! - [`check_manifest`] refuses, before anything is written, a manifest path
//!   that is absolute, has `.`, `..` or empty parts, passes through a link
//!   the manifest itself makes, is listed twice, or (in a tablespace) lies
//!   outside PostgreSQL's `PG_<version>_<catalog>` directory; and a link
//!   where Tidemark writes a file of its own.
//! - [`Beneath`] opens the root once and reaches every path one component at
//!   a time with `openat(O_NOFOLLOW | O_DIRECTORY)`, making missing
//!   directories with `mkdirat`, and creates the last component with
//!   `O_NOFOLLOW` (files) or `symlinkat` (links): a link met on the way,
//!   whoever put it there, fails the write instead of being followed.
//!   (openat2's RESOLVE_BENEATH would do the walk in the kernel, but only
//!   from Linux 5.6 on; one component at a time works everywhere.)

use anyhow::Context;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use tidemark_proto::repo::backup::{BackupManifest, FileKind};
use tidemark_repo::Fail;

/// Files Tidemark itself writes into a restored data directory after the
/// backup's files: a link there would take those writes elsewhere.
pub const WRITTEN_BY_TIDEMARK: [&str; 6] = [
    "backup_manifest",
    "postgresql.auto.conf",
    "recovery.signal",
    "standby.signal",
    "tablespace_map",
    "tidemark-delta-restore",
];

/// The parts of a manifest path, refused unless it is relative and plain
/// (no `..` or empty part, no NUL). `.` parts are dropped: PostgreSQL sends
/// `./pg_wal/archive_status`.
pub fn components(relative: &str) -> Result<Vec<&str>, String> {
    if relative.is_empty() || relative.starts_with('/') || relative.contains('\0') {
        return Err(format!("{relative:?} is not a relative path"));
    }
    let parts: Vec<&str> = relative.split('/').filter(|p| *p != ".").collect();
    if parts.is_empty() || parts.iter().any(|p| p.is_empty() || *p == "..") {
        return Err(format!("{relative:?} has an empty or `..` part"));
    }
    Ok(parts)
}

/// Refuses a manifest whose paths could write anywhere but beneath their
/// archive's root (see the module comment). Nothing is written before this.
pub fn check_manifest(manifest: &BackupManifest) -> Result<(), Fail> {
    let refuse = |what: String| {
        Fail::new(
            format!("backup {} is unsafe to restore: {what}", manifest.id),
            "PostgreSQL never sends such a backup: check who can write to the repository, and restore another backup",
        )
    };
    let mut links = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::new();
    for file in manifest.files.iter().filter(|f| f.kind == FileKind::Symlink) {
        if let Ok(parts) = components(&file.path) {
            links.insert((file.archive.as_str(), parts.join("/")));
        }
    }
    for file in &manifest.files {
        let entry = format!("{}:{}", file.archive, file.path);
        let parts = components(&file.path).map_err(|e| refuse(format!("entry {entry}: {e}")))?;
        let path = parts.join("/");
        if file.archive != "base" {
            if !manifest.tablespaces.iter().any(|t| t.oid.to_string() == file.archive) {
                return Err(refuse(format!("entry {entry} belongs to no tablespace of the backup")));
            }
            if !parts.first().is_some_and(|p| p.starts_with("PG_")) {
                return Err(refuse(format!("entry {entry} is outside the tablespace's PG_ version directory")));
            }
        }
        if !seen.insert((file.archive.as_str(), path.clone())) {
            return Err(refuse(format!("entry {entry} is listed twice")));
        }
        let mut prefix = path.as_str();
        while let Some((parent, _)) = prefix.rsplit_once('/') {
            if links.contains(&(file.archive.as_str(), parent.to_string())) {
                return Err(refuse(format!("entry {entry} passes through the link {parent}")));
            }
            prefix = parent;
        }
        if file.kind == FileKind::Symlink && file.archive == "base" && WRITTEN_BY_TIDEMARK.contains(&path.as_str()) {
            return Err(refuse(format!("entry {entry} is a link where the restore writes its own file")));
        }
    }
    Ok(())
}

/// A directory, opened once, under which paths are reached without
/// following links (see the module comment).
pub struct Beneath {
    root: OwnedFd,
    path: PathBuf,
}

/// What to do with a missing directory on the way to a path.
#[derive(Clone, Copy)]
enum Missing {
    Make(u32),
    Fail,
}

impl Beneath {
    /// Opens `root` itself (a link there is the caller's choice and followed).
    pub fn open(root: &Path) -> anyhow::Result<Beneath> {
        let name = cstring(&root.to_string_lossy())?;
        // SAFETY: open(2) with a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        let root_fd = owned(fd).with_context(|| format!("open {}", root.display()))?;
        Ok(Beneath { root: root_fd, path: root.to_path_buf() })
    }

    /// The root's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `root/relative` as a path (for messages and for readers).
    pub fn join(&self, relative: &str) -> PathBuf {
        self.path.join(relative)
    }

    /// Makes the directory `relative` and every missing one above it (`mode`).
    pub fn create_dirs(&self, relative: &str, mode: u32) -> anyhow::Result<()> {
        let (dir, last) = self.parent(relative, Missing::Make(mode))?;
        open_dir(dir.as_fd(), &last, Missing::Make(mode))
            .with_context(|| format!("create {}", self.join(relative).display()))?;
        Ok(())
    }

    /// A new file (refused if anything is there), its directories made (0700).
    pub fn create_file(&self, relative: &str, mode: u32) -> anyhow::Result<std::fs::File> {
        self.open_file_with(relative, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, mode)
    }

    /// An existing file opened for reading and writing, or a new one.
    pub fn open_file(&self, relative: &str, mode: u32) -> anyhow::Result<std::fs::File> {
        self.open_file_with(relative, libc::O_RDWR | libc::O_CREAT, mode)
    }

    /// A file opened to append to (made if missing).
    pub fn append_file(&self, relative: &str, mode: u32) -> anyhow::Result<std::fs::File> {
        self.open_file_with(relative, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, mode)
    }

    /// `bytes` as the whole content of the file `relative` (made if missing).
    pub fn write_file(&self, relative: &str, bytes: &[u8], mode: u32) -> anyhow::Result<std::fs::File> {
        let mut file = self.open_file_with(relative, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, mode)?;
        std::io::Write::write_all(&mut file, bytes)
            .with_context(|| format!("write {}", self.join(relative).display()))?;
        Ok(file)
    }

    fn open_file_with(&self, relative: &str, flags: i32, mode: u32) -> anyhow::Result<std::fs::File> {
        let (dir, last) = self.parent(relative, Missing::Make(0o700))?;
        // SAFETY: openat(2) on a descriptor we own, with a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                last.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        let fd = owned(fd).map_err(|e| self.explain(relative, e))?;
        Ok(std::fs::File::from(fd))
    }

    /// A link at `relative` pointing to `target` (never followed here).
    pub fn symlink(&self, relative: &str, target: &Path) -> anyhow::Result<()> {
        let (dir, last) = self.parent(relative, Missing::Make(0o700))?;
        let target_name = CString::new(target.as_os_str().as_encoded_bytes())
            .with_context(|| format!("link target {} has a NUL byte", target.display()))?;
        // SAFETY: symlinkat(2) with NUL-terminated strings and a descriptor we own.
        let result = unsafe { libc::symlinkat(target_name.as_ptr(), dir.as_raw_fd(), last.as_ptr()) };
        check(result).map_err(|e| self.explain(relative, e))
    }

    /// Removes the file, link or empty directory at `relative`; a missing one is fine.
    pub fn remove(&self, relative: &str) -> anyhow::Result<()> {
        let (dir, last) = match self.parent(relative, Missing::Fail) {
            Ok(found) => found,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        for flags in [0, libc::AT_REMOVEDIR] {
            // SAFETY: unlinkat(2) on a descriptor we own, with a NUL-terminated name.
            let result = unsafe { libc::unlinkat(dir.as_raw_fd(), last.as_ptr(), flags) };
            match check(result) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // A directory: unlink(2) says EISDIR, try rmdir.
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) && flags == 0 => {}
                Err(e) => return Err(self.explain(relative, e)),
            }
        }
        Ok(())
    }

    /// The directory holding `relative`'s last part, reached from the root
    /// one part at a time without following links, and that last part.
    fn parent(&self, relative: &str, missing: Missing) -> anyhow::Result<(OwnedFd, CString)> {
        let parts = components(relative).map_err(|e| {
            Fail::new(
                format!("refusing to write {e} beneath {}", self.path.display()),
                "the backup's manifest is damaged or was tampered with; restore another backup",
            )
        })?;
        let (last, dirs) = parts.split_last().context("an empty path")?;
        let mut dir = self.root.try_clone().context("duplicate a directory descriptor")?;
        for (i, part) in dirs.iter().enumerate() {
            let name = cstring(part)?;
            dir = open_dir(dir.as_fd(), &name, missing).map_err(|e| {
                let so_far = parts.get(..=i).map(|p| p.join("/")).unwrap_or_default();
                self.explain(&so_far, e)
            })?;
        }
        Ok((dir, cstring(last)?))
    }

    /// An error of `relative` in words: a link (or a file) where a
    /// directory or new file was expected is named as such.
    fn explain(&self, relative: &str, error: std::io::Error) -> anyhow::Error {
        let path = self.join(relative);
        match error.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => Fail::new(
                format!("refusing to write through {}: it is a link or not a directory", path.display()),
                "a restore never follows links while writing; remove that entry or restore into a new directory",
            )
            .into(),
            _ => anyhow::Error::new(error).context(format!("write {}", path.display())),
        }
    }
}

fn is_not_found(error: &anyhow::Error) -> bool {
    error.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// The directory `name` under `dir`, opened without following a link;
/// made first (with `missing`'s mode) when absent.
fn open_dir(dir: BorrowedFd<'_>, name: &CString, missing: Missing) -> std::io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat(2) on a borrowed open descriptor, NUL-terminated name.
    let opened = owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) });
    match (opened, missing) {
        (Err(e), Missing::Make(mode)) if e.kind() == std::io::ErrorKind::NotFound => {
            // SAFETY: mkdirat(2) on a borrowed open descriptor, NUL-terminated name.
            match check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            // SAFETY: as above.
            owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })
        }
        (opened, _) => opened,
    }
}

fn cstring(text: &str) -> anyhow::Result<CString> {
    CString::new(text).with_context(|| format!("{text:?} has a NUL byte"))
}

fn owned(fd: libc::c_int) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_proto::repo::backup::{BackupFile, Tablespace};

    #[test]
    fn only_plain_relative_paths_have_components() {
        assert_eq!(components("base/5/1259").unwrap(), vec!["base", "5", "1259"]);
        assert_eq!(components("./pg_wal/archive_status").unwrap(), vec!["pg_wal", "archive_status"]);
        for bad in ["", ".", "/etc/passwd", "../x", "a/../b", "a//b", "a/", "a\0b"] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
    }

    fn entry(archive: &str, path: &str, kind: FileKind) -> BackupFile {
        BackupFile {
            archive: archive.into(),
            path: path.into(),
            kind,
            size: 0,
            mode: 0o600,
            mtime_unix: 0,
            link_target: None,
            chunks: Vec::new(),
            blocks: None,
            pages_xor: false,
        }
    }

    fn manifest(files: Vec<BackupFile>) -> BackupManifest {
        let text = r#"{"format_version":1,"id":"B1","label":"","system_identifier":"1","server_version_num":150000,
            "timeline":1,"start_lsn":"0/3000000","end_lsn":"0/3000100","start_time":"","end_time":"",
            "tablespaces":[],"files":[],"pg_manifest_key":"","bytes":0,"stored_bytes":0}"#;
        let mut manifest = BackupManifest::from_json(text.as_bytes()).expect("manifest");
        manifest.tablespaces.push(Tablespace { oid: 16390, location: "/srv/ts".into() });
        manifest.files = files;
        manifest
    }

    #[test]
    fn a_real_backups_shape_passes() {
        let files = vec![
            entry("base", "base", FileKind::Directory),
            entry("base", "base/5", FileKind::Directory),
            entry("base", "base/5/1259", FileKind::File),
            entry("base", "server.crt", FileKind::Symlink),
            entry("16390", "PG_15_202209061", FileKind::Directory),
            entry("16390", "PG_15_202209061/5/16400", FileKind::File),
        ];
        assert!(check_manifest(&manifest(files)).is_ok());
    }

    #[test]
    fn paths_that_could_leave_the_target_are_refused_by_name() {
        let cases = [
            (
                vec![entry("base", "x", FileKind::Symlink), entry("base", "x/.ssh/authorized_keys", FileKind::File)],
                "base:x/.ssh/authorized_keys passes through the link x",
            ),
            (
                vec![entry("base", "./x", FileKind::Symlink), entry("base", "x/./y", FileKind::File)],
                "base:x/./y passes through the link x",
            ),
            (vec![entry("base", "../etc/cron.d/x", FileKind::File)], "base:../etc/cron.d/x"),
            (vec![entry("base", "/etc/passwd", FileKind::File)], "base:/etc/passwd"),
            (vec![entry("16390", "authorized_keys", FileKind::File)], "outside the tablespace's PG_"),
            (vec![entry("99", "PG_15_1/x", FileKind::File)], "belongs to no tablespace"),
            (vec![entry("base", "a", FileKind::File), entry("base", "a", FileKind::File)], "listed twice"),
            (vec![entry("base", "postgresql.auto.conf", FileKind::Symlink)], "writes its own file"),
        ];
        for (files, needle) in cases {
            let error = check_manifest(&manifest(files)).expect_err(needle);
            assert!(error.message.contains(needle), "{needle}: {}", error.message);
            assert!(error.message.contains("backup B1"), "{}", error.message);
        }
    }

    #[test]
    fn writes_stay_beneath_the_root_and_never_follow_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, canary) = (dir.path().join("root"), dir.path().join("canary"));
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&canary).expect("mkdir");
        let beneath = Beneath::open(&root).expect("open");
        beneath.create_dirs("base/5", 0o700).expect("dirs");
        beneath.create_file("base/5/1259", 0o600).expect("file");
        assert!(beneath.create_file("base/5/1259", 0o600).is_err(), "never over an existing file");
        beneath.create_file("deep/new/file", 0o600).expect("parents made");
        assert!(root.join("deep/new/file").is_file());

        // A link to the canary, made here or found in place: never followed.
        beneath.symlink("out", &canary).expect("link");
        for attempt in [
            beneath.create_file("out/authorized_keys", 0o600).map(drop),
            beneath.create_dirs("out/sub", 0o700),
            beneath.write_file("out", b"x", 0o600).map(drop),
            beneath.append_file("out", 0o600).map(drop),
            beneath.open_file("out/x", 0o600).map(drop),
            beneath.symlink("out/x", Path::new("/")),
        ] {
            let error = attempt.expect_err("through a link");
            assert!(error.to_string().contains("link or not a directory"), "{error}");
        }
        assert_eq!(std::fs::read_dir(&canary).expect("ls").count(), 0, "something was written through the link");
        beneath.remove("out").expect("remove the link itself");
        assert!(canary.exists() && !root.join("out").exists());
        beneath.create_dirs("empty", 0o700).expect("dir");
        beneath.remove("empty").expect("rmdir");
        beneath.remove("never/was").expect("a missing path is fine");
        assert!(beneath.create_file("../escape", 0o600).is_err());
        assert!(!dir.path().join("escape").exists());
    }
}
