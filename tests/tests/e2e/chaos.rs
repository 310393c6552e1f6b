//! Chaos with an oracle: under a ledger workload the agent is SIGKILLed 50
//! times at random moments (during startup, streaming, uploads, summaries)
//! and the server crashes (`pg_ctl stop -m immediate`) and restarts four
//! times; afterwards every archived segment is byte-identical to the
//! server's own, and restores to 20 random commit times hold exactly the
//! rows that had committed by then (by the server's commit timestamps).

use crate::common::*;
use crate::restore::{rows, Restorer};
use std::process::{Command, Stdio};
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};

/// A small deterministic generator (xorshift), seeded from the clock and printed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Commits rows one psql session at a time from another thread until
/// `stop`; a session the server's crash cuts short is simply lost (the
/// server decides what committed; the oracle reads it from the server).
fn workload(port: u16, stop: &std::sync::atomic::AtomicBool) {
    let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        // Every 40th commit also ends its segment, so kills land around many segment ends.
        let switch = if i.is_multiple_of(40) { "; SELECT pg_switch_wal()" } else { "" };
        let _ = Command::new(pg_bin().join("psql"))
            .args(["-X", "-q", "-d", &url, "-c"])
            .arg(format!("INSERT INTO ledger (note) VALUES ('row {i}'){switch}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn fifty_agent_kills_and_server_crashes_lose_nothing() {
    let cluster = Cluster::start(ClusterOptions { track_commit_timestamp: true, ..Default::default() });
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let agent = AgentSetup::init_as_pg_user(&cluster.dir.path().join("agent"), cluster.url("postgres"));
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    let first = cluster.current_lsn();
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            | 1;
    eprintln!("chaos seed {seed}");
    let mut random = Random(seed);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| workload(cluster.port, &stop));
        for kill in 1..=50 {
            let running = agent.spawn();
            std::thread::sleep(Duration::from_millis(100 + random.below(700)));
            running.kill9();
            if kill % 12 == 0 {
                cluster.stop("immediate");
                std::thread::sleep(Duration::from_millis(random.below(300)));
                cluster.start_again();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // A last, undisturbed run archives everything.
    let running = agent.spawn();
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "the agent stops cleanly");
    let checked = assert_segments_identical(&cluster, &agent, first, end);
    let committed: u64 = cluster.psql("SELECT count(*) FROM ledger").parse().expect("count");
    eprintln!("{checked} segments byte-identical; {committed} rows committed under chaos");
    assert!(committed > 100, "the workload committed too little ({committed} rows) to mean anything");
    assert!(checked >= 10, "only {checked} segments were compared");

    // Restores to 20 random commit times, each exactly what had committed.
    let restorer = Restorer::new(&agent, cluster.dir.path());
    let (dir, _) = Restorer::target_dir();
    let cache = dir.path().join("cache").display().to_string();
    for _ in 0..20 {
        let id = 1 + random.below(committed);
        let time = cluster
            .psql(&format!("SELECT pg_xact_commit_timestamp(xmin) FROM ledger ORDER BY id OFFSET {} LIMIT 1", id - 1));
        let expected = rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{time}'"));
        let (restored, _) = restorer.restore_and_start(&["--time", &time, "--cache-dir", &cache]);
        assert_eq!(rows(&restored, ""), expected, "restore to {time} (seed {seed})");
    }
}
