//! `extract --to FILE --format csv` of a table of a million rows, against
//! doing it by hand: `restore --latest --start`, then psql's `\copy` of the
//! same table, then stopping the server. Prints both times and the ratio;
//! asserts only that both files hold the same number of lines.
//!
//!     cargo run -p tidemark-tests --bin bench-extract -- [rows, default 1000000]

use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_tests::agent::{retry_busy, AgentSetup};
use tidemark_tests::cluster::{free_port, pg_bin, Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

fn main() {
    let rows: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, note text NOT NULL, at timestamptz NOT NULL); \
         INSERT INTO big SELECT g, 'row ' || g || ' ' || md5(g::text), now() FROM generate_series(1, {rows}) g"
    ));
    let base = cluster.dir.path().join("bench");
    let agent = AgentSetup::init_as_pg_user(&base, cluster.url("postgres"));
    let running = agent.spawn();
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", String::from_utf8_lossy(&output.stderr));
    let lsn = cluster.switch_wal();
    wait_until("the WAL is archived", Duration::from_secs(600), || agent.archived_lsn().filter(|a| *a >= lsn));
    running.stop();
    let restore = |args: &[&str]| {
        retry_busy(|| {
            agent
                .program("tidemark-restore")
                .arg("--repo")
                .arg(agent.repo_url())
                .args(args)
                .args(["--cache-dir", &base.join("cache").display().to_string()])
                .output()
        })
    };
    // Warm the audit cache, so neither side pays for building it.
    restore(&["list"]);

    let extracted = base.join("extract.csv");
    let began = Instant::now();
    let output = restore(&[
        "extract",
        "--table",
        "big",
        "--latest",
        "--to",
        extracted.to_str().expect("utf-8"),
        "--format",
        "csv",
        "--scratch-dir",
        base.to_str().expect("utf-8"),
    ]);
    let ours = began.elapsed().as_secs_f64();
    assert!(output.status.success(), "extract: {}", String::from_utf8_lossy(&output.stderr));

    let pgdata = base.join("restored");
    let port = free_port().to_string();
    let by_hand = base.join("by-hand.csv");
    let began = Instant::now();
    let output =
        restore(&["restore", "--latest", "--pgdata", pgdata.to_str().expect("utf-8"), "--start", "--port", &port]);
    assert!(output.status.success(), "restore: {}", String::from_utf8_lossy(&output.stderr));
    let copy = Command::new(pg_bin().join("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-p", &port, "-d", "postgres", "-c"])
        .arg(format!("\\copy big TO '{}' WITH (FORMAT csv, HEADER)", by_hand.display()))
        .output()
        .expect("psql");
    let stop = retry_busy(|| {
        let mut command = Command::new(pg_bin().join("pg_ctl"));
        if let Some((uid, gid)) = agent.os_user {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        command.arg("-D").arg(&pgdata).args(["stop", "-w", "-m", "fast"]).output()
    });
    let theirs = began.elapsed().as_secs_f64();
    assert!(copy.status.success(), "\\copy: {}", String::from_utf8_lossy(&copy.stderr));
    assert!(stop.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&stop.stderr));
    let lines = |path: &std::path::Path| std::fs::read_to_string(path).expect("csv").lines().count();
    assert_eq!(lines(&extracted), lines(&by_hand), "both files hold the table");
    println!(
        "table big: {rows} rows, {:.0} MB of CSV",
        std::fs::metadata(&extracted).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
    println!("tidemark-restore extract --to FILE --format csv     {ours:6.2} s");
    println!("restore --latest --start + \\copy + pg_ctl stop      {theirs:6.2} s");
    println!("extract / by hand: {:.2}x the time", ours / theirs.max(1e-9));
}
