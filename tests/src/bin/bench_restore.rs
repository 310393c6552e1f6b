//! Restore speed: a backup, then about 1 GB of pgbench WAL, then
//! `tidemark-restore restore --latest --start` with WAL staged ahead of replay
//! and without (`--no-prefetch`). Prints seconds to a promoted, queryable
//! server and the WAL replayed per second. Asserts nothing.
//!
//!     cargo run -p tidemark-tests --bin bench-restore -- [WAL MB, default 1024]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Instant;
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::cluster::{chown, free_port, Cluster, ClusterOptions, PG_USER_OS};

fn main() {
    let wal_mb: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let cluster = Cluster::start(ClusterOptions { conf: vec!["max_wal_size = '4GB'".into()], ..Default::default() });
    cluster.pgbench_init(20);
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup failed: {}", String::from_utf8_lossy(&output.stderr));
    let backup: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let start: tidemark_proto::Lsn = backup["start_lsn"].as_str().expect("lsn").parse().expect("lsn");
    while cluster.current_lsn().0 - start.0 < wal_mb << 20 {
        let mut pgbench = cluster.pgbench_spawn(&["-T", "10", "-c", "4", "-j", "2"]);
        pgbench.wait().expect("pgbench");
    }
    let end = cluster.switch_wal();
    tidemark_tests::wait::wait_until("archive", std::time::Duration::from_secs(1800), || {
        agent.archived_lsn().filter(|a| *a >= end)
    });
    running.stop();
    let wal = end.0 - start.0;
    println!(
        "{:.0} MB of WAL after the backup ({:.0} MB of data)",
        wal as f64 / 1e6,
        backup["bytes"].as_u64().unwrap_or(0) as f64 / 1e6
    );

    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = scratch.path().join("tidemark-restore");
    std::fs::copy(bin("tidemark-restore"), &exe).expect("copy");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        chown(&agent.repo, PG_USER_OS);
        chown(scratch.path(), PG_USER_OS);
    }
    for (label, extra) in
        [("staged ahead of replay", None), ("fetched on demand (--no-prefetch)", Some("--no-prefetch"))]
    {
        let pgdata = scratch.path().join(format!("data-{}", extra.is_some()));
        let port = free_port().to_string();
        let mut command = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", PG_USER_OS, "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        command
            .arg("--repo")
            .arg(agent.repo_url())
            .args(["restore", "--latest", "--start", "--json", "--port", &port, "--pgdata"])
            .arg(&pgdata);
        command.args(extra);
        let began = Instant::now();
        let output = command.output().expect("run restore");
        let seconds = began.elapsed().as_secs_f64();
        let server = Cluster::adopt_running(tempfile::tempdir().expect("tempdir"), pgdata, port.parse().expect("port"));
        assert!(output.status.success(), "restore failed: {}", String::from_utf8_lossy(&output.stderr));
        // PostgreSQL's own redo time, from its log line "redo done at ... elapsed: N s".
        let log = std::fs::read_to_string(server.data.join("tidemark-restore.log")).unwrap_or_default();
        let redo = log
            .lines()
            .find(|l| l.contains("redo done at"))
            .and_then(|l| l.rsplit("elapsed: ").next())
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "?".into());
        println!(
            "  tidemark restore --latest, {label:<34} {seconds:6.2} s to a promoted server, {:6.1} MB/s of WAL (PostgreSQL redo: {redo})",
            wal as f64 / 1e6 / seconds
        );
        drop(server);
    }
}
