//! What the benchmarks share: directory sizes, timed commands, and a
//! pgBackRest stanza beside a test cluster (zst level 1, two processes,
//! a local repository), the peer the backup benchmarks run in the same run.

use crate::cluster::{chown, Cluster, PG_USER_OS};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// Bytes of the files under `dir` (links not followed).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).ok();
        total += match meta {
            Some(m) if m.is_dir() => dir_size(&path),
            Some(m) => m.len(),
            None => 0,
        };
    }
    total
}

/// Runs `command`, panicking with its output unless it succeeds; returns
/// the seconds it took and its output.
pub fn run_timed(command: &mut Command, what: &str) -> (f64, Output) {
    let began = Instant::now();
    let output = command.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let seconds = began.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (seconds, output)
}

/// Whether we run as root (CI): PostgreSQL's programs then run as its OS user.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program` run as the PostgreSQL OS user when we are root.
pub fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_USER_OS, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A pgBackRest stanza (`bench`) for `cluster`, its files under `dir`.
pub struct PgBackRest {
    pub dir: PathBuf,
    conf: PathBuf,
}

impl PgBackRest {
    /// Writes the configuration and runs stanza-create.
    pub fn create(cluster: &Cluster, dir: &Path) -> PgBackRest {
        for sub in ["repo", "log", "lock", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        let conf = dir.join("pgbackrest.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nrepo1-path={}\nlog-path={}\nlock-path={}\nspool-path={}\ncompress-type=zst\ncompress-level=1\nprocess-max=2\nstart-fast=y\narchive-check=n\nrepo1-retention-full=10\nlog-level-console=warn\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
                dir.join("repo").display(),
                dir.join("log").display(),
                dir.join("lock").display(),
                dir.join("spool").display(),
                cluster.data.display(),
                cluster.port,
                cluster.dir.path().display()
            ),
        )
        .expect("write pgbackrest.conf");
        if is_root() {
            chown(dir, PG_USER_OS);
        }
        let stanza = PgBackRest { dir: dir.to_path_buf(), conf };
        run_timed(&mut stanza.command(cluster, &["stanza-create"]), "pgbackrest stanza-create");
        stanza
    }

    /// `pgbackrest --stanza=bench ARGS`, as the server's OS user.
    pub fn command(&self, cluster: &Cluster, args: &[&str]) -> Command {
        let mut command = cluster.as_pg_user(Path::new("pgbackrest"));
        command.arg(format!("--config={}", self.conf.display())).arg("--stanza=bench").args(args);
        command
    }
}
