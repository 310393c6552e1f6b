//! `restore --force`: which directories it may replace, and the replacement.
//!
//! - Never `/`, a system directory, nor a directory that is or holds a home
//!   directory, the repository, a key file or the audit cache
//!   ([`protected`]; also where a tablespace may go by default).
//! - Only a PostgreSQL data directory: `PG_VERSION` (or the marker of an
//!   interrupted `--delta`) at its top, and of the backup's cluster when its
//!   `global/pg_control` (or that marker) says which.
//! - Nothing below its top that belongs elsewhere: a `postmaster.pid` (a data
//!   directory inside it, maybe live), a Tidemark repository
//!   (`repository.json`) or an agent's state directory (`agent.lock`). A
//!   live postmaster at the top is refused for every restore.
//! - Not a mount point: the old directory is replaced by a rename, which
//!   cannot cross one.
//! - Replaced only at the very end: the restore is written into a staging
//!   directory beside it (as every restore is), then the two are swapped by
//!   one rename(2) with RENAME_EXCHANGE and the old data removed. A restore
//!   that fails before that leaves the old data as it was.

use anyhow::Context;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use tidemark_repo::Fail;

/// Directories of the running system: never replaced, nothing restored under them.
const SYSTEM: [&str; 13] =
    ["/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr", "/var"];
/// Of those, the ones whose insides never hold a data directory or tablespace.
const SYSTEM_INSIDE: [&str; 6] = ["/boot", "/dev", "/etc", "/proc", "/run", "/sys"];

/// Why `path` (absolute, no `.` or `..`) must not be replaced nor receive a
/// tablespace by default, if it must not: `/` or a system directory, a
/// place under `/etc`, `/proc` and the like, or a directory that is or
/// holds one of `keep` (home directories, the repository, key files, the
/// audit cache).
pub fn protected(path: &Path, keep: &[PathBuf]) -> Option<String> {
    if path == Path::new("/") || SYSTEM.iter().any(|s| path == Path::new(s)) {
        return Some(format!("{} is a system directory", path.display()));
    }
    if let Some(system) = SYSTEM_INSIDE.iter().find(|s| path.starts_with(s)) {
        return Some(format!("{} is inside the system directory {system}", path.display()));
    }
    keep.iter().find(|k| k.starts_with(path)).map(|k| match k == path {
        true => format!("{} is a home directory or Tidemark's own", path.display()),
        false => format!("{} holds {}", path.display(), k.display()),
    })
}

/// Every user's home directory (from /etc/passwd) and `$HOME`.
pub fn home_directories() -> Vec<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut homes: Vec<PathBuf> = passwd
        .lines()
        .filter_map(|line| line.split(':').nth(5))
        .filter(|h| h.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    homes.extend(std::env::var_os("HOME").map(PathBuf::from));
    homes.retain(|h| h != Path::new("/"));
    homes
}

/// True for an absolute path with no `.`, `..` or repeated separators.
pub fn is_plain_absolute(text: &str) -> bool {
    let path = Path::new(text);
    path.is_absolute()
        && !text.contains("//")
        && (text == "/" || !text.ends_with('/'))
        && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !text.split('/').any(|p| p == ".")
}

fn refuse(pgdata: &Path, what: String) -> anyhow::Error {
    Fail::new(
        format!("--force will not replace {}: {what}", pgdata.display()),
        "--force only replaces a PostgreSQL data directory of the backup's cluster; restore into a new directory",
    )
    .into()
}

/// The checks that need no plan: `pgdata` (not empty) may be replaced by
/// `--force` unless it is protected, holds something that is not its own,
/// lacks `PG_VERSION`, or is a mount point.
pub fn check_replaceable(pgdata: &Path, keep: &[PathBuf]) -> anyhow::Result<()> {
    let top = pgdata.canonicalize().with_context(|| format!("resolve {}", pgdata.display()))?;
    let keep: Vec<PathBuf> = keep.iter().map(|k| k.canonicalize().unwrap_or_else(|_| k.clone())).collect();
    if let Some(why) = protected(&top, &keep) {
        return Err(refuse(pgdata, why));
    }
    if let Some((found, what)) = foreign_below(&top)? {
        return Err(refuse(pgdata, format!("it holds {what} ({})", found.display())));
    }
    if !top.join("PG_VERSION").is_file() && !top.join(crate::delta::MARKER).is_file() {
        return Err(refuse(pgdata, "it is not a PostgreSQL data directory (no PG_VERSION at its top)".into()));
    }
    let parent = tidemark_repo::durable::parent_dir(&top);
    let (here, above) = (std::fs::metadata(&top)?.dev(), std::fs::metadata(parent)?.dev());
    if here != above {
        return Err(Fail::new(
            format!("--force cannot replace {}: it is a mount point", pgdata.display()),
            "the restore is renamed over it at the end, which cannot cross a mount point; restore into a new \
             directory below it",
        )
        .into());
    }
    Ok(())
}

/// The check that needs the plan: a data directory whose pg_control (or
/// delta marker) names another cluster is not replaced.
pub fn check_same_cluster(pgdata: &Path, system_identifier: &str) -> anyhow::Result<()> {
    match crate::delta::system_identifier_of(pgdata) {
        Some(found) if found != system_identifier => Err(refuse(
            pgdata,
            format!("it belongs to another cluster (system identifier {found}, the backup's {system_identifier})"),
        )),
        _ => Ok(()),
    }
}

/// The first thing below `top` (links not followed) that is not part of a
/// data directory of its own: a `postmaster.pid` below the top, a
/// repository's `repository.json`, an agent's `agent.lock`.
fn foreign_below(top: &Path) -> anyhow::Result<Option<(PathBuf, &'static str)>> {
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            // What cannot be read cannot be told to be the data directory's own.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Ok(Some((dir, "a directory this user cannot read")))
            }
            read => read.with_context(|| format!("read {}", dir.display()))?,
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("read {}", dir.display()))?;
            let kind = entry.file_type().with_context(|| format!("inspect {}", entry.path().display()))?;
            if kind.is_dir() {
                pending.push(entry.path());
                continue;
            }
            let what = match entry.file_name().to_str() {
                Some("postmaster.pid") if dir != top => "another data directory",
                Some("repository.json") => "a Tidemark repository",
                Some("agent.lock") => "a tidemark-agent state directory",
                _ => continue,
            };
            return Ok(Some((entry.path(), what)));
        }
    }
    Ok(None)
}

/// Puts the finished restore `staged` in place of `pgdata`: one rename
/// exchanging the two (or, where the filesystem cannot exchange, the old
/// one renamed aside first), the parent fsynced, then the old data removed.
pub fn swap_in(staged: &Path, pgdata: &Path) -> anyhow::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).context("a path with a NUL byte");
    let (from, to) = (c(staged)?, c(pgdata)?);
    // SAFETY: renameat2(2) with NUL-terminated paths relative to the current directory.
    let exchanged =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_EXCHANGE) };
    let old = if exchanged == 0 {
        staged.to_path_buf()
    } else {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error).with_context(|| format!("swap the restore into {}", pgdata.display()));
        }
        let aside = crate::fetch::staging_beside(pgdata, "old")?;
        std::fs::rename(pgdata, &aside).with_context(|| format!("move {} aside", pgdata.display()))?;
        std::fs::rename(staged, pgdata).with_context(|| format!("move the restore into {}", pgdata.display()))?;
        aside
    };
    let parent = tidemark_repo::durable::parent_dir(pgdata);
    tidemark_repo::durable::fsync_dir(parent).with_context(|| format!("fsync {}", parent.display()))?;
    // The restore is in place; what is left of the old data is only in the way.
    if let Err(e) = std::fs::remove_dir_all(&old) {
        tracing::warn!("the replaced data directory is left at {}: {e}", old.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_homes_and_tidemarks_own_places_are_protected() {
        let keep = [PathBuf::from("/var/lib/postgresql"), PathBuf::from("/srv/tidemark/repo")];
        for path in ["/", "/etc", "/usr", "/var", "/etc/cron.d", "/proc/1", "/var/lib", "/var/lib/postgresql", "/srv"] {
            assert!(protected(Path::new(path), &keep).is_some(), "{path}");
        }
        for path in ["/var/lib/postgresql/15/main", "/srv/pg/data", "/usr/local/pgsql/data", "/srv/tidemark/other"] {
            assert_eq!(protected(Path::new(path), &keep), None, "{path}");
        }
        let why = protected(Path::new("/var/lib"), &keep).expect("holds a home");
        assert!(why.contains("holds /var/lib/postgresql"), "{why}");
    }

    #[test]
    fn home_directories_come_from_the_password_file() {
        assert!(home_directories().contains(&PathBuf::from("/root")), "{:?}", home_directories());
    }

    #[test]
    fn plain_absolute_paths() {
        for good in ["/", "/srv/ts", "/srv/ts one"] {
            assert!(is_plain_absolute(good), "{good}");
        }
        for bad in ["srv/ts", "/srv/../etc", "/srv/./ts", "/srv//ts", "/srv/ts/", ""] {
            assert!(!is_plain_absolute(bad), "{bad}");
        }
    }

    #[test]
    fn only_a_data_directory_with_nothing_foreign_below_is_replaceable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("base/5")).expect("mkdir");
        std::fs::write(data.join("precious"), "x").expect("write");
        let error = check_replaceable(&data, &[]).expect_err("no PG_VERSION").to_string();
        assert!(error.contains("no PG_VERSION"), "{error}");
        std::fs::write(data.join("PG_VERSION"), "15\n").expect("write");
        std::fs::write(data.join("postmaster.pid"), "999999999\n").expect("a stale pid at the top is fine");
        check_replaceable(&data, &[]).expect("a data directory");
        std::fs::write(data.join("base/5/postmaster.pid"), "1\n").expect("write");
        let error = check_replaceable(&data, &[]).expect_err("a pid below").to_string();
        assert!(error.contains("base/5/postmaster.pid"), "{error}");
        std::fs::remove_file(data.join("base/5/postmaster.pid")).expect("rm");
        std::fs::write(data.join("base/repository.json"), "{}").expect("write");
        assert!(check_replaceable(&data, &[]).expect_err("a repository").to_string().contains("repository"));
        std::fs::remove_file(data.join("base/repository.json")).expect("rm");
        let error = check_replaceable(&data, &[data.join("base/5")]).expect_err("keeps something").to_string();
        assert!(error.contains("holds"), "{error}");
    }

    #[test]
    fn the_swap_puts_the_restore_in_place_and_removes_the_old_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, data) = (dir.path().join(".data.tidemark-staging"), dir.path().join("data"));
        std::fs::create_dir_all(&staged).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(staged.join("PG_VERSION"), "new").expect("write");
        std::fs::write(data.join("PG_VERSION"), "old").expect("write");
        swap_in(&staged, &data).expect("swap");
        assert_eq!(std::fs::read_to_string(data.join("PG_VERSION")).expect("read"), "new");
        assert!(!staged.exists(), "the old data is removed");
    }
}
