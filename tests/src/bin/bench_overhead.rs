//! What an archiver costs the database it sits beside, in one run: the same
//! pgbench load (`-c 4 -j 2`) with no archiver, with pg_receivewal, with
//! the agent, and with each as the synchronous standby; then a quiet
//! database (one commit a second), the agent's CPU beside pg_receivewal
//! --synchronous's (which also fsyncs each commit). For each: TPS against no archiver, the
//! archiver's CPU (user and system, from /proc), its peak and final RSS,
//! the durable lag (server WAL end minus the archiver's reported flush,
//! sampled from pg_stat_replication: median and max), the catch-up time
//! after the load, the CPU of the server's walsender that feeds the archiver
//! (the cost of streaming on the server's side, the same whichever client
//! reads) and the share of the machine left idle. Prints figures; asserts
//! nothing.
//!
//!     cargo run -p tidemark-tests --bin bench-overhead -- [seconds per run, default 30] [scale, default 50] [quiet seconds, default 240] [rounds, default 1] [all|async|sync, default all]
//!
//! With more than one round the loaded runs repeat (in reverse order every
//! other round) and the median of each archiver's TPS ratios is printed at
//! the end: on a shared machine one run's ratio moves by ±15 %. Then, round
//! by round, the agent's TPS and p99 over pg_receivewal's in the same mode.
//! The fifth argument runs one mode's pair alone (`async` or `sync`), for
//! more rounds of that comparison in the same time. With 0 seconds
//! per run only the quiet database is measured, on a fresh cluster. The
//! quiet figures come with each thread's share (`schedstat`), by name, and
//! the WAL the database wrote meanwhile; each starts once autovacuum is
//! idle and after a CHECKPOINT (and a VACUUM of what the loaded runs left
//! before both, autovacuum then off), so both archivers see the same quiet,
//! and once the archiver has gone idle over a span longer than the agent's
//! 10 s partial-upload deadline (so what it still had to store of the
//! backlog is not counted as the quiet database's).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

/// CPU seconds (user, system) a process has used so far, and its RSS now and at peak (KiB).
fn usage(pid: u32) -> (f64, f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0) / hz.max(1.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (ticks(11), ticks(12), kib("VmRSS:"), kib("VmHWM:"))
}

/// One thread's share of the CPU so far, from `/proc/PID/task/TID/schedstat`:
/// nanoseconds (finer than the clock ticks of `stat`, which matters for
/// threads that run a few milliseconds a minute) and its turns on a CPU
/// (the file's third field).
struct ThreadSample {
    name: String,
    ran_ns: u64,
    turns: u64,
}

/// Every thread of `pid` now, by thread id.
fn thread_times(pid: u32) -> std::collections::BTreeMap<u32, ThreadSample> {
    let mut threads = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return threads };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let field = |i: usize| schedstat.split_whitespace().nth(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        threads.insert(tid, ThreadSample { name, ran_ns: field(0), turns: field(2) });
    }
    threads
}

/// One thread name's CPU seconds and turns on a CPU per hour.
struct ThreadRate {
    name: String,
    cpu: f64,
    turns: f64,
}

/// The hourly rate of each thread name between two `thread_times` samples
/// (threads of one name summed; a thread that ended in between is not
/// counted), most CPU first.
fn per_thread_hourly(
    before: &std::collections::BTreeMap<u32, ThreadSample>,
    after: &std::collections::BTreeMap<u32, ThreadSample>,
    elapsed: f64,
) -> Vec<ThreadRate> {
    let mut by_name: std::collections::BTreeMap<&str, ThreadRate> = std::collections::BTreeMap::new();
    for (tid, now) in after {
        let (ran_before, turns_before) = before.get(tid).map_or((0, 0), |then| (then.ran_ns, then.turns));
        let rate =
            by_name.entry(&now.name).or_insert_with(|| ThreadRate { name: now.name.clone(), cpu: 0.0, turns: 0.0 });
        rate.cpu += now.ran_ns.saturating_sub(ran_before) as f64 / 1e9 * 3600.0 / elapsed;
        rate.turns += now.turns.saturating_sub(turns_before) as f64 * 3600.0 / elapsed;
    }
    let mut rates: Vec<ThreadRate> = by_name.into_values().collect();
    rates.sort_by(|a, b| b.cpu.total_cmp(&a.cpu));
    rates
}

/// One archiver under test.
enum Archiver {
    None,
    Receivewal { synchronous: bool },
    Agent { synchronous: bool },
}

impl Archiver {
    fn name(&self) -> &'static str {
        match self {
            Archiver::None => "no archiver",
            Archiver::Receivewal { synchronous: false } => "pg_receivewal (async)",
            Archiver::Receivewal { synchronous: true } => "pg_receivewal --synchronous (sync standby)",
            Archiver::Agent { synchronous: false } => "tidemark-agent run (async)",
            Archiver::Agent { synchronous: true } => "tidemark-agent run (sync standby)",
        }
    }

    /// Whether it runs as the synchronous standby.
    fn synchronous(&self) -> bool {
        matches!(self, Archiver::Receivewal { synchronous: true } | Archiver::Agent { synchronous: true })
    }

    fn application_name(&self) -> &'static str {
        match self {
            Archiver::Receivewal { .. } => "receivewal",
            _ => "tidemark",
        }
    }
}

struct Figures {
    tps: f64,
    user: f64,
    system: f64,
    peak_rss_kib: u64,
    final_rss_kib: u64,
    lag_median: u64,
    lag_max: u64,
    catch_up: f64,
    latency_p50_us: u64,
    latency_p99_us: u64,
    /// CPU seconds of the server's walsender for this archiver (user + system).
    walsender: f64,
    /// The share of the machine's CPU time left idle during the load.
    idle: f64,
}

fn no_figures() -> Figures {
    Figures {
        tps: 0.0,
        user: 0.0,
        system: 0.0,
        peak_rss_kib: 0,
        final_rss_kib: 0,
        lag_median: 0,
        lag_max: 0,
        catch_up: 0.0,
        latency_p50_us: 0,
        latency_p99_us: 0,
        walsender: 0.0,
        idle: 0.0,
    }
}

/// pgbench with a per-transaction log under `logs` (for latency percentiles).
fn pgbench(cluster: &Cluster, seconds: u64, logs: &std::path::Path) -> Child {
    let _ = std::fs::remove_dir_all(logs);
    std::fs::create_dir_all(logs).expect("mkdir");
    Command::new(pg_bin().join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-c", "4", "-j", "2", "-T", &seconds.to_string()])
        .arg("--log")
        .arg(format!("--log-prefix={}", logs.join("tx").display()))
        .arg("-p")
        .arg(cluster.port.to_string())
        .arg("postgres")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench")
}

/// Transaction latencies (µs) from pgbench's per-transaction logs, sorted:
/// each line is `client transaction latency_us script epoch epoch_us`.
fn latencies(logs: &std::path::Path) -> Vec<u64> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(logs).expect("pgbench logs").flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        all.extend(text.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()));
    }
    all.sort_unstable();
    all
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The machine's CPU time so far, idle and in all (clock ticks, from the
/// first line of /proc/stat: user nice system idle iowait irq softirq steal).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).take(8).filter_map(|f| f.parse().ok()).collect();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (idle, fields.iter().sum())
}

fn tps_of(output: &str) -> f64 {
    output
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Starts the archiver; returns its pid and a way to stop it.
fn start(cluster: &Cluster, archiver: &Archiver, agent: &AgentSetup) -> Option<(u32, Box<dyn FnOnce()>)> {
    match archiver {
        Archiver::None => None,
        Archiver::Receivewal { synchronous } => {
            let dir = cluster.dir.path().join("receivewal");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let mut command = Command::new(pg_bin().join("pg_receivewal"));
            command.args(["-h", "127.0.0.1", "-U", "postgres", "--slot", "receivewal", "-n", "-D"]).arg(&dir);
            command.arg("-p").arg(cluster.port.to_string()).env("PGAPPNAME", "receivewal");
            if *synchronous {
                command.arg("--synchronous");
            }
            let mut child = command.stdin(Stdio::null()).stderr(Stdio::null()).spawn().expect("pg_receivewal");
            let pid = child.id();
            Some((
                pid,
                Box::new(move || {
                    let _ = child.kill();
                    let _ = child.wait();
                }),
            ))
        }
        Archiver::Agent { .. } => {
            let running = agent.spawn();
            let pid = running.pid();
            Some((
                pid,
                Box::new(move || {
                    running.stop();
                }),
            ))
        }
    }
}

/// Waits until the archiver has the server's WAL end. pg_receivewal without
/// --synchronous flushes (and reports a flush) only when a segment ends, so
/// for it what it has received counts.
fn wait_for_catch_up(cluster: &Cluster, archiver: &Archiver) {
    let reported = match archiver {
        Archiver::Receivewal { synchronous: false } => "write_lsn",
        _ => "flush_lsn",
    };
    let app = archiver.application_name();
    wait_until("the archiver catches up", Duration::from_secs(600), || {
        (cluster.psql(&format!(
            "SELECT {reported} >= pg_current_wal_lsn() FROM pg_stat_replication WHERE application_name = '{app}'"
        )) == "t")
            .then_some(())
    });
}

fn measure(cluster: &Cluster, archiver: &Archiver, agent: &AgentSetup, seconds: u64) -> Figures {
    let synchronous = archiver.synchronous();
    let names = if synchronous { archiver.application_name() } else { "" };
    cluster.psql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"));
    cluster.psql("SELECT pg_reload_conf()");
    let started = start(cluster, archiver, agent);
    let app = archiver.application_name();
    if started.is_some() {
        wait_until("the archiver streams", Duration::from_secs(120), || {
            (cluster.psql(&format!("SELECT count(*) FROM pg_stat_replication WHERE application_name = '{app}'")) == "1")
                .then_some(())
        });
    }
    // Each archiver's slot kept the WAL of the runs before it: let it catch
    // up first, so the run measures the load, not that backlog.
    if let Some((pid, _)) = &started {
        wait_for_catch_up(cluster, archiver);
        // The agent goes on uploading and summarizing what it just received.
        wait_until_idle(*pid);
    }
    cluster.psql("CHECKPOINT");
    // The server's side of streaming: the walsender wakes for each flush of
    // the database's WAL, whichever archiver reads it.
    let walsender: Option<u32> = if started.is_some() {
        cluster.psql(&format!("SELECT pid FROM pg_stat_replication WHERE application_name = '{app}'")).parse().ok()
    } else {
        None
    };
    let walsender_before = walsender.map(usage).unwrap_or_default();
    let before = started.as_ref().map(|(pid, _)| usage(*pid)).unwrap_or_default();
    let machine_before = machine_ticks();
    let logs = cluster.dir.path().join("pgbench-logs");
    let mut load = pgbench(cluster, seconds, &logs);
    let mut lags = Vec::new();
    while load.try_wait().expect("pgbench").is_none() {
        if started.is_some() {
            let lag = cluster.psql(&format!(
                "SELECT coalesce(pg_current_wal_lsn() - flush_lsn, 0) FROM pg_stat_replication WHERE application_name = '{app}'"
            ));
            lags.extend(lag.parse::<f64>().ok().map(|l| l as u64));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = load.wait_with_output().expect("pgbench");
    let machine_after = machine_ticks();
    let walsender_after = walsender.map(usage).unwrap_or_default();
    let tps = tps_of(&String::from_utf8_lossy(&output.stdout));
    let latency = latencies(&logs);
    let ended = Instant::now();
    if started.is_some() {
        wait_for_catch_up(cluster, archiver);
    }
    let catch_up = ended.elapsed().as_secs_f64();
    let after = started.as_ref().map(|(pid, _)| usage(*pid)).unwrap_or_default();
    if let Some((_, stop)) = started {
        stop();
    }
    lags.sort_unstable();
    Figures {
        tps,
        user: after.0 - before.0,
        system: after.1 - before.1,
        peak_rss_kib: after.3,
        final_rss_kib: after.2,
        lag_median: lags.get(lags.len() / 2).copied().unwrap_or(0),
        lag_max: lags.last().copied().unwrap_or(0),
        catch_up,
        latency_p50_us: percentile(&latency, 0.5),
        latency_p99_us: percentile(&latency, 0.99),
        walsender: walsender_after.0 + walsender_after.1 - walsender_before.0 - walsender_before.1,
        idle: (machine_after.0 - machine_before.0) as f64 / (machine_after.1 - machine_before.1).max(1) as f64,
    }
}

/// Waits until `pid` used under 30 ms of CPU in 12 s: an agent that caught
/// up with the stream has also stored and summarized what it received. The
/// span is longer than the agent's 10 s partial-upload deadline: the part
/// of the backlog that landed in the segment still being filled is
/// compressed and decoded at that deadline (tens of milliseconds after a
/// loaded run), and a 3 s span that fell before it counted that work as
/// the quiet database's (2.2–3.5 CPU s per hour instead of about 1).
fn wait_until_idle(pid: u32) {
    wait_until("the archiver goes idle", Duration::from_secs(600), || {
        // Nanoseconds from each thread's schedstat: the clock ticks of
        // `usage` miss bursts shorter than a tick.
        let cpu_ns = || thread_times(pid).values().map(|t| t.ran_ns).sum::<u64>();
        let before = cpu_ns();
        std::thread::sleep(Duration::from_secs(12));
        (cpu_ns().saturating_sub(before) < 30_000_000).then_some(())
    });
}

/// CPU seconds `archiver` uses per hour on a database with one commit a second.
fn quiet_cpu_per_hour(cluster: &Cluster, archiver: &Archiver, agent: &AgentSetup, seconds: u64) -> f64 {
    let synchronous = archiver.synchronous();
    let names = if synchronous { "'receivewal'" } else { "''" };
    cluster.psql(&format!("ALTER SYSTEM SET synchronous_standby_names = {names}"));
    cluster.psql("SELECT pg_reload_conf()");
    // The database itself quiet first: a VACUUM or ANALYZE started before
    // autovacuum was turned off finishes.
    wait_until("autovacuum goes idle", Duration::from_secs(900), || {
        (cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'") == "0")
            .then_some(())
    });
    cluster.psql("CHECKPOINT");
    let (pid, stop) = start(cluster, archiver, agent).expect("an archiver");
    // Past startup: the slot's backlog (the run before) archived, uploaded
    // and summarized, which shows as the archiver going idle.
    wait_for_catch_up(cluster, archiver);
    wait_until_idle(pid);
    let (user0, system0, _, _) = usage(pid);
    let threads0 = thread_times(pid);
    let wal_start = cluster.current_lsn();
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(seconds) {
        cluster.psql("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now())");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (user1, system1, _, _) = usage(pid);
    let threads1 = thread_times(pid);
    let wal = cluster.current_lsn().0.saturating_sub(wal_start.0);
    let elapsed = began.elapsed().as_secs_f64();
    stop();
    let rows = per_thread_hourly(&threads0, &threads1, elapsed);
    let rows_cpu: f64 = rows.iter().map(|r| r.cpu).sum();
    let rows: Vec<String> = rows.iter().map(|r| format!("{} {:.2} ({:.0} turns)", r.name, r.cpu, r.turns)).collect();
    println!(
        "  {}: {} kB of WAL in {:.0} s; per hour by thread, CPU s (turns on a CPU): {}",
        archiver.name(),
        wal / 1000,
        elapsed,
        rows.join(", ")
    );
    // The larger of two counts, so neither flatters: schedstat's
    // nanoseconds (exact, but only threads alive at both ends) and the
    // process's clock ticks (threads that ended too, but coarse).
    let by_ticks = (user1 + system1 - user0 - system0) * 3600.0 / elapsed;
    rows_cpu.max(by_ticks)
}

/// The median of non-empty `values`: with an even count (the reversed
/// order needs one) the mean of the middle two.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// Each value, then their median when there are several.
fn summary(values: &[f64]) -> String {
    let each: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    match values.len() {
        0 | 1 => each.join(", "),
        _ => format!("{} (median {:.2})", each.join(", "), median(values)),
    }
}

/// One archiver's run in one round, kept for the comparisons at the end.
struct RoundResult {
    /// TPS against the mean of the runs without an archiver beside it.
    ratio: f64,
    tps: f64,
    p99_us: u64,
}

/// The agent against pg_receivewal in the same mode, round by round: its
/// absolute TPS and p99 commit latency over the peer's. The two ran minutes
/// apart, not beside the same baseline runs, so this is a second view of
/// the ratios above, not a replacement (`archivers` holds pg_receivewal and
/// the agent in that order for each mode).
fn print_pairs(archivers: &[Archiver], results: &[Vec<RoundResult>]) {
    println!("tidemark-agent over pg_receivewal, round by round:");
    for (pair, runs) in archivers.chunks(2).zip(results.chunks(2)) {
        let ([peer_archiver, _], [peer, ours]) = (pair, runs) else { continue };
        let mode = if peer_archiver.synchronous() { "sync" } else { "async" };
        let tps: Vec<f64> = ours.iter().zip(peer).map(|(a, b)| a.tps / b.tps.max(1e-9)).collect();
        let p99: Vec<f64> = ours.iter().zip(peer).map(|(a, b)| a.p99_us as f64 / b.p99_us.max(1) as f64).collect();
        println!("  {mode:<5} TPS {}; p99 {}", summary(&tps), summary(&p99));
    }
}

fn print_row(archiver: &Archiver, f: &Figures, base_tps: f64, seconds: u64) {
    println!(
        "{:<44} {:>6.0} {:>7.2} {:>8.2} {:>8.2} {:>8.1}% {:>6} MiB {:>7} MiB {:>8} KB {:>8} KB {:>9.2} {:>9.2} {:>10.1}% {:>6.1}%  catch-up {:.1} s",
        archiver.name(),
        f.tps,
        f.tps / base_tps.max(1e-9),
        f.user,
        f.system,
        (f.user + f.system) * 100.0 / seconds as f64,
        f.peak_rss_kib / 1024,
        f.final_rss_kib / 1024,
        f.lag_median / 1000,
        f.lag_max / 1000,
        f.latency_p50_us as f64 / 1000.0,
        f.latency_p99_us as f64 / 1000.0,
        f.walsender * 100.0 / seconds as f64,
        f.idle * 100.0,
        f.catch_up
    );
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let scale: u32 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let which = std::env::args().nth(5).unwrap_or_else(|| "all".into());
    if !matches!(which.as_str(), "all" | "async" | "sync") {
        eprintln!("the fifth argument names the archivers to run: all, async or sync (not {which:?})");
        std::process::exit(2);
    }
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(scale);
    cluster.psql("SELECT pg_create_physical_replication_slot('receivewal', true)");
    let base = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&base).expect("mkdir");
    let agent = AgentSetup::new(&base, cluster.url("postgres"));
    agent.init();
    // Runs without an archiver between the others: each archiver's TPS is
    // compared with the mean of the runs beside it, so drift over the run
    // (table growth, the machine's other load) does not favour the first.
    // Which archivers: all four, or one mode's pair (more rounds of the
    // contested comparison in the same time).
    let archivers: Vec<Archiver> = [false, true]
        .into_iter()
        .filter(|&synchronous| match which.as_str() {
            "async" => !synchronous,
            "sync" => synchronous,
            _ => true,
        })
        .flat_map(|synchronous| [Archiver::Receivewal { synchronous }, Archiver::Agent { synchronous }])
        .collect();
    println!("pgbench scale {scale}, -c 4 -j 2, {seconds} s per run, a CHECKPOINT before each");
    println!(
        "{:<44} {:>6} {:>7} {:>8} {:>8} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>11} {:>7}",
        "",
        "TPS",
        "ratio",
        "user s",
        "sys s",
        "CPU %",
        "peak RSS",
        "final RSS",
        "lag median",
        "lag max",
        "p50 ms",
        "p99 ms",
        "walsender",
        "idle"
    );
    let rounds: usize = std::env::args().nth(4).and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let mut results: Vec<Vec<RoundResult>> = archivers.iter().map(|_| Vec::new()).collect();
    let mut before = if seconds > 0 { measure(&cluster, &Archiver::None, &agent, seconds) } else { no_figures() };
    if seconds > 0 {
        print_row(&Archiver::None, &before, before.tps, seconds);
    }
    // 0 seconds per run: no loaded runs, the quiet database alone (on a fresh cluster).
    for round in 0..if seconds > 0 { rounds } else { 0 } {
        // Every other round runs the archivers in reverse order. The
        // database's speed drifts over a run (2055, 2291 and 2999 TPS in
        // three successive runs without an archiver here), and in a fixed
        // order the later archiver always met the later database: the
        // agent's absolute TPS beat pg_receivewal's in every round of one
        // run while its median ratio trailed. Reversed, a steady drift
        // cancels over an even number of rounds.
        let mut order: Vec<(&Archiver, &mut Vec<RoundResult>)> = archivers.iter().zip(&mut results).collect();
        if !round.is_multiple_of(2) {
            order.reverse();
        }
        for (archiver, results) in order {
            let f = measure(&cluster, archiver, &agent, seconds);
            let after = measure(&cluster, &Archiver::None, &agent, seconds);
            let base = (before.tps + after.tps) / 2.0;
            print_row(archiver, &f, base, seconds);
            print_row(&Archiver::None, &after, after.tps, seconds);
            results.push(RoundResult { ratio: f.tps / base.max(1e-9), tps: f.tps, p99_us: f.latency_p99_us });
            before = after;
        }
    }
    if rounds > 1 && seconds > 0 {
        println!("median TPS ratio over {rounds} rounds:");
        for (archiver, results) in archivers.iter().zip(&results) {
            let mut ratios: Vec<f64> = results.iter().map(|r| r.ratio).collect();
            ratios.sort_by(f64::total_cmp);
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!("  {:<44} {:.2}  ({})", archiver.name(), median(&ratios), each.join(", "));
        }
    }
    if seconds > 0 {
        print_pairs(&archivers, &results);
    }
    let quiet_seconds: u64 = std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(240);
    // What the loaded runs left for autovacuum is done now, and autovacuum
    // is off while the quiet figures are taken: its VACUUMs and ANALYZEs
    // (pg_waldump: Heap/LOCK and UPDATE of catalogs, PRUNE, VACUUM) landed in
    // whichever window came first, ten times the WAL of the commits.
    cluster.psql("VACUUM (FREEZE, ANALYZE)");
    cluster.psql("ALTER SYSTEM SET autovacuum = off");
    cluster.psql("SELECT pg_reload_conf()");
    let quiet = quiet_cpu_per_hour(&cluster, &Archiver::Agent { synchronous: false }, &agent, quiet_seconds);
    let peer = quiet_cpu_per_hour(&cluster, &Archiver::Receivewal { synchronous: true }, &agent, quiet_seconds);
    println!(
        "quiet database (one commit a second): tidemark-agent uses {quiet:.2} CPU s per hour, \
         pg_receivewal --synchronous {peer:.2} (ratio {:.2})",
        quiet / peer.max(1e-9)
    );
}
