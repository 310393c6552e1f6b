//! Archiving throughput: how fast a WAL backlog reaches the repository.
//!
//! Creates a backlog while the agent is stopped (pgbench -i), then times
//! `tidemark-agent run` catching up (stream, fsync, zstd, durable put) and,
//! on the same backlog from its own slot, PostgreSQL's `pg_receivewal`
//! (stream, fsync per segment, no compression, no upload). The agent runs
//! once per repository kind, each from its own slot on the same backlog:
//! a local directory, the same encrypted, and (when s3s-fs is installed)
//! an S3 bucket on loopback, plain and encrypted — so the cost of encryption
//! and of S3 shows. Prints figures; asserts nothing. pgbench -i WAL
//! compresses unusually well (blank filler).
//!
//!     cargo run -p tidemark-tests --bin bench-archive -- [pgbench scale, default 30]

use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_tests::agent::{have_s3_server, keygen, AgentSetup};
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};
use tidemark_tests::s3::S3Server;
use tidemark_tests::wait::wait_until;

fn main() {
    let scale: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let cluster = Cluster::start(ClusterOptions { wal_keep_size: Some("8GB".into()), ..Default::default() });
    let s3 = have_s3_server().then(S3Server::start);
    let key = cluster.dir.path().join("bench.key");
    keygen(&key);
    // (label, agent, where its stored WAL lies on disk)
    let mut runs: Vec<(String, AgentSetup, std::path::PathBuf)> = Vec::new();
    for (label, encrypted, remote) in [
        ("local", false, false),
        ("local, encrypted", true, false),
        ("s3s-fs", false, true),
        ("s3s-fs, encrypted", true, true),
    ] {
        let name = label.replace([',', ' '], "");
        let base = cluster.dir.path().join(&name);
        std::fs::create_dir_all(&base).expect("mkdir");
        let mut agent = AgentSetup::new(&base, cluster.url("postgres"));
        agent.extra_args = vec!["--slot".into(), name.replace('-', "_")];
        if encrypted {
            agent.key_files = vec![key.clone()];
        }
        let stored_at = match (&s3, remote) {
            (_, false) => agent.repo.join("wal"),
            (Some(s3), true) => {
                agent.url = Some(s3.url(&name));
                agent.env.extend(s3.env());
                s3.object_path(&name, "wal")
            }
            (None, true) => continue,
        };
        agent.init();
        runs.push((label.to_string(), agent, stored_at));
    }
    cluster.psql("SELECT pg_create_physical_replication_slot('receivewal', true)");
    let start = cluster.current_lsn();
    let began = Instant::now();
    cluster.pgbench_init(scale);
    let end = cluster.switch_wal();
    let backlog = end.0 - start.0;
    println!(
        "backlog: {:.0} MB of WAL (pgbench -i -s {scale}) written in {:.1} s",
        backlog as f64 / 1e6,
        began.elapsed().as_secs_f64()
    );
    if s3.is_none() {
        println!("(s3s-fs is not installed: no S3 lines; `./dev test` installs it)");
    }

    for (label, agent, stored_at) in &runs {
        let began = Instant::now();
        let running = agent.spawn();
        wait_until("the agent to catch up", Duration::from_secs(1800), || agent.archived_lsn().filter(|a| *a >= end));
        let ours = began.elapsed().as_secs_f64();
        running.stop();
        let stored: u64 = walk_size(stored_at);
        println!(
            "tidemark-agent ({label:<17}) {ours:6.2} s  {:7.1} MB/s  stored {:.0} MB ({:.1}x smaller)",
            backlog as f64 / 1e6 / ours,
            stored as f64 / 1e6,
            backlog as f64 / stored.max(1) as f64
        );
    }

    // pg_receivewal stops at its end position only once WAL past it arrives.
    cluster.psql("SELECT txid_current()");
    let target = cluster.dir.path().join("receivewal");
    std::fs::create_dir_all(&target).expect("mkdir");
    let began = Instant::now();
    let status = Command::new(pg_bin().join("pg_receivewal"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "--slot", "receivewal", "-n", "--no-loop"])
        .arg("-p")
        .arg(cluster.port.to_string())
        .arg("-D")
        .arg(&target)
        .arg("-E")
        .arg(end.to_string())
        .status()
        .expect("run pg_receivewal");
    let theirs = began.elapsed().as_secs_f64();
    println!(
        "pg_receivewal                      {theirs:6.2} s  {:7.1} MB/s  stored {:.0} MB (uncompressed, local only){}",
        backlog as f64 / 1e6 / theirs,
        walk_size(&target) as f64 / 1e6,
        if status.success() { "" } else { "  [exited non-zero]" }
    );
}

fn walk_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        total += if path.is_dir() { walk_size(&path) } else { entry.metadata().map(|m| m.len()).unwrap_or(0) };
    }
    total
}
