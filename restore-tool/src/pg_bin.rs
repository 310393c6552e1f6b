//! Finding the PostgreSQL installation that runs a restored cluster:
//! `--pg-bin` when given, else `pg_config --bindir` on PATH, else the
//! directory of `pg_ctl` on PATH, else Debian's
//! `/usr/lib/postgresql/<major>/bin`. The chosen directory must hold
//! `pg_ctl` and a `postgres` of the backup's major version; that is checked
//! before anything is written, and a refusal names what was found.

use std::path::{Path, PathBuf};
use std::process::Command;
use tidemark_repo::Fail;

/// The major version in `postgres --version`'s answer:
/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` -> 15.
pub fn parse_major(version: &str) -> Option<u32> {
    let number = version.split_whitespace().find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?;
    number.split(['.', 'b', 'r']).next()?.parse().ok()
}

/// The major version of the `postgres` in `bin`, if it runs.
fn major_in(bin: &Path) -> Option<u32> {
    let output = Command::new(bin.join("postgres")).arg("--version").output().ok()?;
    output.status.success().then(|| parse_major(&String::from_utf8_lossy(&output.stdout))).flatten()
}

/// `program` on PATH, if there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Places to look, with how each was found.
fn candidates(major: u32) -> Vec<(PathBuf, &'static str)> {
    let mut found = Vec::new();
    if let Some(pg_config) = on_path("pg_config") {
        if let Ok(output) = Command::new(pg_config).arg("--bindir").output() {
            let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if output.status.success() && !dir.is_empty() {
                found.push((PathBuf::from(dir), "pg_config --bindir"));
            }
        }
    }
    if let Some(dir) = on_path("pg_ctl").and_then(|p| p.parent().map(Path::to_path_buf)) {
        found.push((dir, "pg_ctl on PATH"));
    }
    found.push((PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")), "Debian's location"));
    found
}

/// The bin directory for a backup of PostgreSQL `major`, or a refusal
/// naming the program and the version needed.
pub fn find(explicit: Option<&Path>, major: u32) -> Result<PathBuf, Fail> {
    let hint = format!(
        "install PostgreSQL {major}'s server, or pass --pg-bin with the directory holding its pg_ctl and postgres"
    );
    if let Some(dir) = explicit {
        if !dir.join("pg_ctl").is_file() {
            return Err(Fail::new(format!("--pg-bin {}: there is no pg_ctl there", dir.display()), hint));
        }
        return match major_in(dir) {
            Some(found) if found == major => Ok(dir.to_path_buf()),
            Some(found) => Err(Fail::new(
                format!("--pg-bin {} holds PostgreSQL {found}; the backup needs PostgreSQL {major}", dir.display()),
                hint,
            )),
            None => Err(Fail::new(format!("--pg-bin {}: its postgres does not run", dir.display()), hint)),
        };
    }
    let mut seen = Vec::new();
    for (dir, how) in candidates(major) {
        if !dir.join("pg_ctl").is_file() {
            continue;
        }
        match major_in(&dir) {
            Some(found) if found == major => return Ok(dir),
            Some(found) => seen.push(format!("PostgreSQL {found} in {} ({how})", dir.display())),
            None => seen.push(format!("{} ({how}), whose postgres does not run", dir.display())),
        }
    }
    let seen = if seen.is_empty() { "no PostgreSQL installation".to_string() } else { seen.join(", ") };
    Err(Fail::new(format!("the backup needs PostgreSQL {major} to start; found {seen}"), hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_postgres_version() {
        assert_eq!(parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(parse_major("postgres (PostgreSQL) 13.22"), Some(13));
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 17rc1"), Some(17));
        assert_eq!(parse_major("something else"), None);
    }

    #[test]
    fn a_wrong_directory_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let refused = find(Some(dir.path()), 15).unwrap_err();
        assert!(refused.message.contains("there is no pg_ctl there"), "{refused:?}");
        assert!(refused.hint.contains("PostgreSQL 15"), "{refused:?}");
    }
}
