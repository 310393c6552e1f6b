//! `restore --force`: which directories it may replace, and the replacement.
//!
//! - Never `/`, a system directory, nor a directory that is or holds a home
//!   directory, the repository, a key file or the audit cache
//!   (`places::protected`; also where a tablespace may go by default).
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

use crate::places::protected;
use anyhow::Context;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tidemark_repo::Fail;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
