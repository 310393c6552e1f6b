//! Places Tidemark never replaces and never restores a tablespace into by
//! default: the running system's directories, home directories, and
//! Tidemark's own (the repository, key files, the audit cache).

use std::path::{Component, Path, PathBuf};

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
}
