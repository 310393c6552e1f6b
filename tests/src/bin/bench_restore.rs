//! Restore speed: a pgbench database, a base backup with each tool, then
//! about 1 GB of pgbench WAL; then one restore to a time near the end with
//! Tidemark (WAL staged ahead of replay, and fetched on demand) and with
//! pgBackRest `restore --type=time` (archive-async with its prefetch queue,
//! its fastest setting). Prints seconds to a promoted, queryable server, the
//! WAL replayed per second and PostgreSQL's own redo time. Asserts only that
//! the restores succeed.
//!
//!     apt-get install pgbackrest   # ./dev test does not install it
//!     cargo run -p tidemark-tests --bin bench-restore -- [scale, default 50] [WAL MB, default 1024]
//!
//! Without pgbackrest on the PATH the pgBackRest line is skipped (said so).
//! With BENCH_RESTORE_PERF=DIR each restore runs under a system-wide
//! `perf record -g` into DIR/<tidemark|no-prefetch|pgbackrest>.data, to see
//! where the time goes (`perf report -i FILE --comm postgres`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::benchmarks::{as_pg, is_root};
use tidemark_tests::cluster::{chown, free_port, pg_bin, Cluster, ClusterOptions, PG_USER_OS};
use tidemark_tests::wait::wait_until;

/// Every restore starts from the same state: the source checkpointed and
/// nothing dirty left for the kernel to write back during the timed run
/// (otherwise whichever restore runs first pays for the WAL generation's writeback).
fn quiesce(cluster: &Cluster) {
    cluster.psql("CHECKPOINT");
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// A system-wide `perf record -g` while it lives, when BENCH_RESTORE_PERF names a directory.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(name: &str) -> Profile {
        let Some(dir) = std::env::var_os("BENCH_RESTORE_PERF") else { return Profile(None) };
        let output = Path::new(&dir).join(format!("{name}.data"));
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-F", "499", "-q", "-o"])
            .arg(&output)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run perf");
        println!("  (profiling into {})", output.display());
        Profile(Some(child))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// The kernel's dirty and under-writeback page cache, for the report.
fn dirty() -> String {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?").to_string()
    };
    format!("dirty {} kB, writeback {} kB", field("Dirty:"), field("Writeback:"))
}

fn has_pgbackrest() -> bool {
    Command::new("pgbackrest").arg("version").output().is_ok_and(|o| o.status.success())
}

/// PostgreSQL's redo time from its log line "redo done at ... elapsed: N s".
fn redo_time(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("redo done at"))
        .and_then(|l| l.rsplit("elapsed: ").next())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn report(label: &str, seconds: f64, wal: u64, redo: &str) {
    println!(
        "  {label:<48} {seconds:6.2} s to a promoted server, {:6.1} MB/s of WAL (PostgreSQL redo: {redo})",
        wal as f64 / 1e6 / seconds
    );
}

struct PgBackRest {
    conf: PathBuf,
}

impl PgBackRest {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = as_pg(Path::new("pgbackrest"));
        command.arg(format!("--config={}", self.conf.display())).arg("--stanza=bench").args(args);
        command
    }

    fn run(&self, args: &[&str]) {
        let output = self.command(args).output().expect("run pgbackrest");
        assert!(
            output.status.success(),
            "pgbackrest {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A pgBackRest stanza in `work` for `data`, set up for its fastest restore:
/// asynchronous archive-get with a 1 GiB prefetch queue, two processes, zstd level 1.
fn pgbackrest_setup(work: &Path, data: &Path, port: u16, socket_dir: &Path) -> PgBackRest {
    let dir = work.join("pgbackrest");
    for sub in ["repo", "log", "lock", "spool"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let conf = dir.join("pgbackrest.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nrepo1-path={}\nlog-path={}\nlock-path={}\nspool-path={}\ncompress-type=zst\n\
             compress-level=1\nprocess-max=2\nstart-fast=y\narchive-async=y\narchive-get-queue-max=1GiB\n\
             repo1-retention-full=10\nlog-level-console=warn\n\n[bench]\npg1-path={}\npg1-port={port}\n\
             pg1-socket-path={}\npg1-user=postgres\n",
            dir.join("repo").display(),
            dir.join("log").display(),
            dir.join("lock").display(),
            dir.join("spool").display(),
            data.display(),
            socket_dir.display()
        ),
    )
    .expect("write pgbackrest.conf");
    if is_root() {
        chown(&dir, PG_USER_OS);
    }
    PgBackRest { conf }
}

fn main() {
    let scale: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let wal_mb: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let pgbackrest_here = has_pgbackrest();
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let mut conf = vec!["max_wal_size = '4GB'".to_string()];
    // pgBackRest archives through archive_command; its config path is known
    // before the cluster exists, so the command can name it.
    let pgbr_conf = work.path().join("pgbackrest").join("pgbackrest.conf");
    if pgbackrest_here {
        conf.push("archive_mode = on".into());
        conf.push(format!(
            "archive_command = 'pgbackrest --config={} --stanza=bench archive-push %p'",
            pgbr_conf.display()
        ));
    }
    let cluster = Cluster::start(ClusterOptions { conf, ..Default::default() });
    let pgbr = pgbackrest_here.then(|| pgbackrest_setup(work.path(), &cluster.data, cluster.port, cluster.dir.path()));
    if let Some(pgbr) = &pgbr {
        pgbr.run(&["stanza-create"]);
    }
    cluster.pgbench_init(scale);

    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup failed: {}", String::from_utf8_lossy(&output.stderr));
    let backup: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    if let Some(pgbr) = &pgbr {
        pgbr.run(&["--type=full", "backup"]);
    }
    let start: tidemark_proto::Lsn = backup["start_lsn"].as_str().expect("lsn").parse().expect("lsn");
    while cluster.current_lsn().0 - start.0 < wal_mb << 20 {
        let mut pgbench = cluster.pgbench_spawn(&["-T", "10", "-c", "4", "-j", "2"]);
        pgbench.wait().expect("pgbench");
    }
    // The target: a moment after the last pgbench commit, before one more commit.
    let target = cluster.psql("SELECT clock_timestamp()");
    cluster.psql("SELECT pg_sleep(0.2); CREATE TABLE after_target (x int)");
    let end = cluster.switch_wal();
    wait_until("tidemark archive", Duration::from_secs(1800), || agent.archived_lsn().filter(|a| *a >= end));
    running.stop();
    if pgbr.is_some() {
        let last = tidemark_proto::segment::SegmentId::containing(
            tidemark_proto::TimelineId(1),
            tidemark_proto::Lsn(end.0 - 1),
            16 << 20,
        )
        .file_name(16 << 20);
        wait_until("pgBackRest archive", Duration::from_secs(1800), || {
            (cluster.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") >= last).then_some(())
        });
    }
    let wal = end.0 - start.0;
    println!(
        "pgbench scale {scale} ({:.0} MB of data), {:.0} MB of WAL after the backup; restoring to {target}",
        backup["bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        wal as f64 / 1e6
    );

    let tidemark_seconds = tidemark_restores(&cluster, &agent, &target, wal);
    let Some(pgbr) = pgbr else {
        println!("  pgBackRest: not installed here (apt-get install pgbackrest), no comparison");
        return;
    };
    let seconds = pgbackrest_restore(&cluster, &pgbr, &target, wal);
    if let Some(ours) = tidemark_seconds {
        println!("  tidemark (staged) / pgBackRest = {:.2} (target: at most 0.8)", ours / seconds);
    }
}

/// Restores to `target` with tidemark-restore --start, WAL staged and on
/// demand; returns the staged run's seconds.
fn tidemark_restores(cluster: &Cluster, agent: &AgentSetup, target: &str, wal: u64) -> Option<f64> {
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = scratch.path().join("tidemark-restore");
    std::fs::copy(bin("tidemark-restore"), &exe).expect("copy");
    if is_root() {
        chown(&agent.repo, PG_USER_OS);
        chown(scratch.path(), PG_USER_OS);
    }
    let mut tidemark_seconds = None;
    for (label, extra) in [
        ("tidemark, WAL staged ahead of replay", None),
        ("tidemark, WAL fetched on demand (--no-prefetch)", Some("--no-prefetch")),
    ] {
        let pgdata = scratch.path().join(format!("data-{}", extra.is_some()));
        let port = free_port().to_string();
        let mut command = as_pg(&exe);
        command
            .arg("--repo")
            .arg(agent.repo_url())
            .args(["restore", "--time", target, "--start", "--json", "--port", &port])
            .args(["--cache-dir", scratch.path().join(format!("cache-{}", extra.is_some())).to_str().expect("utf-8")])
            .arg("--pgdata")
            .arg(&pgdata);
        command.args(extra);
        quiesce(cluster);
        let profile = Profile::start(if extra.is_some() { "no-prefetch" } else { "tidemark" });
        let began = Instant::now();
        let output = command.output().expect("run restore");
        let seconds = began.elapsed().as_secs_f64();
        drop(profile);
        println!("    page cache after it: {}", dirty());
        let server = Cluster::adopt_running(tempfile::tempdir().expect("tempdir"), pgdata, port.parse().expect("port"));
        assert!(output.status.success(), "restore failed: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(server.psql("SELECT count(*) FROM pg_class WHERE relname = 'after_target'"), "0");
        report(label, seconds, wal, &redo_time(&server.data.join("tidemark-restore.log")));
        let _ = std::fs::copy(
            server.data.join("tidemark-restore.log"),
            format!("/tmp/bench-restore-tidemark-{}.log", extra.is_some()),
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let part = |name: &str| json["seconds"][name].as_f64().map(|s| format!("{s:.2} s")).unwrap_or("?".into());
        println!(
            "    of which: plan {}, fetch (WAL staged meanwhile) {}, recovery {}",
            part("plan"),
            part("fetch"),
            part("recovery")
        );
        tidemark_seconds.get_or_insert(seconds);
        drop(server);
    }
    tidemark_seconds
}

/// Restores to `target` with pgBackRest (archive-async); returns its seconds.
fn pgbackrest_restore(cluster: &Cluster, pgbr: &PgBackRest, target: &str, wal: u64) -> f64 {
    let restored_dir = tempfile::tempdir().expect("tempdir");
    let pgdata = restored_dir.path().join("data");
    std::fs::create_dir(&pgdata).expect("mkdir");
    std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    if is_root() {
        chown(restored_dir.path(), PG_USER_OS);
    }
    quiesce(cluster);
    let profile = Profile::start("pgbackrest");
    let began = Instant::now();
    let pg1_path = format!("--pg1-path={}", pgdata.display());
    let target_arg = format!("--target={target}");
    pgbr.run(&[&pg1_path, "--type=time", &target_arg, "--target-action=promote", "restore"]);
    let files_written = began.elapsed().as_secs_f64();
    println!("    files restored after {files_written:.2} s; page cache then: {}", dirty());
    let server = Cluster::start_existing_with(
        pg_bin(),
        restored_dir,
        pgdata,
        &["listen_addresses = '127.0.0.1'".into(), "archive_mode = off".into()],
    );
    wait_until("pgBackRest restore to promote", Duration::from_secs(1800), || {
        (server.psql("SELECT pg_is_in_recovery()") == "f").then_some(())
    });
    let seconds = began.elapsed().as_secs_f64();
    drop(profile);
    println!("    page cache after it: {}", dirty());
    assert_eq!(server.psql("SELECT count(*) FROM pg_class WHERE relname = 'after_target'"), "0");
    report("pgBackRest restore --type=time, archive-async", seconds, wal, &redo_time(&server.log));
    let _ = std::fs::copy(&server.log, "/tmp/bench-restore-pgbackrest.log");
    seconds
}
