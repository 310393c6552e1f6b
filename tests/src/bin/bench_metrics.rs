//! The cost of `--listen`: two agents stream the same steady pgbench load at
//! the same time, from their own slots into their own repositories, one with
//! /metrics and /healthz served and scraped every second (fifteen times
//! Prometheus's default rate), one without; `pg_receivewal` streams the
//! same WAL beside them as the peer. Each process's CPU time comes from
//! /proc (user + system, all threads); the figures and ratios are printed,
//! nothing is asserted.
//!
//!     cargo run -p tidemark-tests --bin bench-metrics -- [seconds, default 120] [pgbench tps, default 200]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{free_port, pg_bin, Cluster, ClusterOptions};
use tidemark_tests::http::get;
use tidemark_tests::wait::wait_until;

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(120);
    let rate: u32 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(10);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    let mut agents = Vec::new();
    for (name, listen) in [("plain", false), ("listen", true)] {
        let base = cluster.dir.path().join(name);
        std::fs::create_dir_all(&base).expect("mkdir");
        let mut agent = AgentSetup::new(&base, cluster.url("postgres"));
        agent.extra_args = vec!["--slot".into(), name.into()];
        if listen {
            agent.env.push(("TIDEMARK_LISTEN".into(), addr.to_string()));
        }
        agent.init();
        agents.push((name, agent));
    }
    cluster.psql("SELECT pg_create_physical_replication_slot('receivewal', true)");
    let received = cluster.dir.path().join("receivewal");
    std::fs::create_dir_all(&received).expect("mkdir");
    let mut receivewal = Command::new(pg_bin().join("pg_receivewal"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "--slot", "receivewal", "-n"])
        .arg("-p")
        .arg(cluster.port.to_string())
        .arg("-D")
        .arg(&received)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run pg_receivewal");
    let running: Vec<_> = agents.iter().map(|(name, agent)| (*name, agent.spawn())).collect();
    wait_until("/healthz answers 200", Duration::from_secs(120), || {
        get(addr, "/healthz").filter(|(status, _)| *status == 200)
    });

    let start_lsn = cluster.current_lsn();
    let before: Vec<f64> = running.iter().map(|(_, agent)| cpu_seconds(agent.pid())).collect();
    let peer_before = cpu_seconds(receivewal.id());
    let began = Instant::now();
    let mut load = cluster.pgbench_spawn(&["-T", &seconds.to_string(), "-c", "2", "-R", &rate.to_string()]);
    let mut scrapes = 0u32;
    while load.try_wait().expect("pgbench").is_none() {
        if get(addr, "/metrics").is_some_and(|(status, _)| status == 200) {
            scrapes += 1;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let elapsed = began.elapsed().as_secs_f64();
    let wal = cluster.current_lsn().0 - start_lsn.0;
    let used: Vec<f64> =
        running.iter().zip(&before).map(|((_, agent), start)| cpu_seconds(agent.pid()) - start).collect();
    let peer = cpu_seconds(receivewal.id()) - peer_before;
    let _ = receivewal.kill();
    let _ = receivewal.wait();
    println!(
        "steady load: pgbench -R {rate} -c 2 for {elapsed:.0} s, {:.0} MB of WAL; /metrics scraped {scrapes} times",
        wal as f64 / 1e6
    );
    for ((name, _), cpu) in running.iter().zip(&used) {
        println!("tidemark-agent ({name:<6})  {cpu:6.2} CPU s  {:5.2} % of a core", cpu * 100.0 / elapsed);
    }
    println!("pg_receivewal            {peer:6.2} CPU s  {:5.2} % of a core", peer * 100.0 / elapsed);
    let (plain, listen) = (used[0], used[1]);
    println!(
        "--listen costs {:+.2} percentage points of a core ({:+.1} % relative); agent/pg_receivewal CPU {:.2}x",
        (listen - plain) * 100.0 / elapsed,
        (listen / plain.max(1e-9) - 1.0) * 100.0,
        plain / peer.max(1e-9)
    );
    for (_, agent) in running {
        agent.stop();
    }
}
