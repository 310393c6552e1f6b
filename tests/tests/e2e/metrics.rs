//! `run --listen`: /metrics and /healthz follow streaming under pgbench
//! load, a repository outage and a stopped server; `promtool check metrics`
//! accepts the exposition; a real Prometheus server (Debian's package)
//! scrapes the agent and fires the shipped rules.

use crate::common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{free_port, Cluster, ClusterOptions};
use tidemark_tests::http::{get, sample};
use tidemark_tests::s3::S3Server;
use tidemark_tests::wait::wait_until;

/// The shipped rule file.
pub fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/tidemark-rules.yml")
}

fn metrics(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    body
}

fn value(addr: SocketAddr, name: &str) -> f64 {
    let text = metrics(addr);
    sample(&text, name).unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

/// Waits until /healthz answers `status` and its body contains `needle`.
fn wait_health(addr: SocketAddr, status: u16, needle: &str) -> String {
    wait_until(&format!("/healthz {status} with {needle:?}"), Duration::from_secs(180), || {
        get(addr, "/healthz").filter(|(s, body)| *s == status && body.contains(needle)).map(|(_, body)| body)
    })
}

/// A Prometheus server on loopback, killed in Drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` every second and evaluates `rules` every second.
    fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let dir = tempfile::Builder::new().prefix("tidemark-prometheus-").tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: tidemark\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        Prometheus { child, addr, _dir: dir }
    }

    /// The names of the alerts now firing.
    fn firing(&self) -> Vec<String> {
        let Some((200, body)) = get(self.addr, "/api/v1/alerts") else { return Vec::new() };
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let alerts = json["data"]["alerts"].as_array().cloned().unwrap_or_default();
        alerts
            .iter()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
            .collect()
    }

    /// The value of an instant query with one result.
    fn query(&self, expression: &str) -> Option<f64> {
        let (status, body) = get(self.addr, &format!("/api/v1/query?query={expression}"))?;
        let json: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped rules with every `for:` at 0s, so an alert fires on the
/// first evaluation that matches (the expressions are unchanged).
fn immediate_rules(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(rules_file()).expect("read the shipped rules");
    let immediate: String = text
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 0s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("rules-immediate.yml");
    std::fs::write(&path, immediate).expect("write rules");
    path
}

#[test]
fn metrics_and_health_follow_the_archive_and_prometheus_alerts() {
    let mut s3 = S3Server::start();
    let cluster = Cluster::start(ClusterOptions::default());
    let base = cluster.dir.path().join("agent");
    let mut agent = AgentSetup::new(&base, cluster.url("postgres"));
    agent.url = Some(s3.url("metrics"));
    agent.env.extend(s3.env());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    agent.env.push(("TIDEMARK_LISTEN".into(), addr.to_string()));
    // A backup at once (none exists), then hourly: the backup metrics fill in.
    agent.env.retain(|(k, _)| k != "TIDEMARK_BACKUP_INTERVAL");
    agent.env.push(("TIDEMARK_BACKUP_INTERVAL".into(), "3600".into()));
    agent.init();
    let running = agent.spawn();
    wait_health(addr, 200, "\"healthy\":true");
    let before = value(addr, "tidemark_archived_lsn_bytes");
    assert_eq!(value(addr, "tidemark_server_connected"), 1.0);
    assert_eq!(value(addr, "tidemark_backup_interval_seconds"), 3600.0);

    // Under load the archive advances; afterwards the lags return to zero.
    cluster.pgbench_init(5);
    let mut load = cluster.pgbench_spawn(&["-T", "15", "-c", "2"]);
    let mut seen_lag = 0.0f64;
    while load.try_wait().expect("pgbench").is_none() {
        seen_lag = seen_lag.max(value(addr, "tidemark_replication_lag_bytes"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let server_end = cluster.current_lsn().0 as f64;
    let settled = wait_until("the lags return to zero after the load", Duration::from_secs(180), || {
        let text = metrics(addr);
        let get = |name: &str| sample(&text, name).unwrap_or(f64::NAN);
        (get("tidemark_archived_lsn_bytes") >= server_end
            && get("tidemark_replication_lag_bytes") == 0.0
            && get("tidemark_repository_behind_bytes") == 0.0)
            .then_some(text)
    });
    let get = |name: &str| sample(&settled, name).expect(name);
    assert!(get("tidemark_archived_lsn_bytes") > before + 10e6, "pgbench wrote tens of MB of WAL:\n{settled}");
    assert!(get("tidemark_replication_lag_seconds") < 5.0, "{settled}");
    assert!(get("tidemark_flushed_lsn_bytes") >= server_end);
    eprintln!("largest replication lag seen under load: {seen_lag} bytes");
    wait_until("the backup and the window show", Duration::from_secs(300), || {
        let text = metrics(addr);
        let get = |name: &str| sample(&text, name).unwrap_or(0.0);
        (get("tidemark_backups_total") >= 1.0
            && get("tidemark_backup_last_end_timestamp_seconds") > 1.7e9
            && get("tidemark_backup_last_bytes") > 1e6
            && get("tidemark_window_start_timestamp_seconds") > 1.7e9
            && get("tidemark_window_end_lsn_bytes") > 0.0
            && get("tidemark_summarized_lsn_bytes") > 0.0
            && get("tidemark_last_archived_commit_timestamp_seconds") > 1.7e9)
            .then_some(())
    });

    // promtool's own parser and linter accept the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus)");
    std::io::Write::write_all(check.stdin.as_mut().expect("stdin"), metrics(addr).as_bytes()).expect("pipe");
    let checked = check.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        stderr(&checked)
    );

    // A real Prometheus scrapes the agent and evaluates the shipped rules.
    let prometheus = Prometheus::start(addr, &immediate_rules(cluster.dir.path()));
    wait_until("Prometheus scrapes the agent", Duration::from_secs(120), || {
        prometheus.query("tidemark_healthy").filter(|v| *v == 1.0)
    });

    // The repository goes away: uploads fail, health says so, the rule fires.
    s3.stop();
    cluster.psql("CREATE TABLE during_outage AS SELECT generate_series(1, 10000) AS n");
    cluster.switch_wal();
    let body = wait_health(addr, 503, "repository writes failing");
    assert!(!body.contains("secret"), "{body}");
    assert_eq!(value(addr, "tidemark_repository_reachable"), 0.0);
    assert!(value(addr, "tidemark_repository_errors_total") >= 1.0);
    wait_until("TidemarkRepositoryUnreachable fires", Duration::from_secs(120), || {
        prometheus.firing().contains(&"TidemarkRepositoryUnreachable".to_string()).then_some(())
    });
    s3.start_again();
    wait_health(addr, 200, "\"healthy\":true");
    wait_until("the alert resolves", Duration::from_secs(120), || {
        (!prometheus.firing().contains(&"TidemarkRepositoryUnreachable".to_string())).then_some(())
    });

    // The server goes away: streaming stops, health flips, and back.
    cluster.stop("fast");
    let body = wait_health(addr, 503, "not streaming from PostgreSQL");
    assert!(body.contains("\"server_connected\":false"), "{body}");
    assert_eq!(value(addr, "tidemark_server_connected"), 0.0);
    assert_eq!(value(addr, "tidemark_healthy"), 0.0);
    wait_until("TidemarkArchivingStalled fires", Duration::from_secs(120), || {
        prometheus.firing().contains(&"TidemarkArchivingStalled".to_string()).then_some(())
    });
    cluster.start_again();
    wait_health(addr, 200, "\"healthy\":true");
    assert_eq!(value(addr, "tidemark_server_connected"), 1.0);
    assert!(running.stop(), "the agent stops cleanly");
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): READY=1 once streaming,
/// WATCHDOG=1 pings at half the interval, STOPPING=1 at shutdown — read
/// from a datagram socket standing in for systemd's NOTIFY_SOCKET.
#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let cluster = Cluster::start(ClusterOptions::default());
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    let socket_path = cluster.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    agent.env.push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    agent.env.push(("WATCHDOG_USEC".into(), "1000000".into()));
    agent.init();
    let running = agent.spawn();
    let mut heard = Vec::new();
    let mut buffer = [0u8; 512];
    while !(heard.iter().any(|m: &String| m.contains("READY=1"))
        && heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3)
    {
        let n = socket.recv(&mut buffer).expect("a notification within 2 minutes");
        heard.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    let ready = heard.iter().find(|m| m.contains("READY=1")).expect("READY=1");
    assert!(ready.contains("STATUS=streaming"), "{heard:?}");
    assert!(running.log_text().contains("streaming"), "READY=1 comes once streaming has started");
    assert!(running.stop(), "the agent stops cleanly");
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buffer) {
        if String::from_utf8_lossy(&buffer[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 at shutdown; heard {heard:?}");
}

/// Whether the peer closed `stream` (end of file or a reset) within its
/// read timeout; any bytes it sent first (an error response) are read past.
fn closed_by_peer(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Clients that hold connections cannot take `/metrics` away: one that
/// opens a connection and sends nothing is dropped after the header
/// timeout, one past the connection cap is closed at once, and /metrics
/// answers beside them and after them; a failing accept does not spin.
#[test]
fn idle_and_surplus_connections_are_dropped_while_metrics_answers() {
    use std::net::TcpStream;
    use std::time::Instant;
    // The agent's HEADER_READ_TIMEOUT and MAX_CONNECTIONS (agent/src/listen.rs).
    const TIMEOUT: Duration = Duration::from_secs(10);
    const CAP: usize = 32;
    let cluster = Cluster::start(ClusterOptions::default());
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    agent.env.push(("TIDEMARK_LISTEN".into(), addr.to_string()));
    agent.init();
    let mut running = agent.spawn();
    wait_health(addr, 200, "\"healthy\":true");

    // One short of the cap, idle: /metrics answers beside them.
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..CAP - 1).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    metrics(addr);
    // That request's connection gives its permit back just after closing.
    std::thread::sleep(Duration::from_millis(300));
    // The cap reached: a connection past it is closed at once (the listener
    // accepts in order, so the idle ones hold every permit by then).
    idle.push(TcpStream::connect(addr).expect("connect"));
    let mut surplus = TcpStream::connect(addr).expect("connect");
    surplus.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let asked = Instant::now();
    assert!(closed_by_peer(&mut surplus), "a connection past the cap was kept");
    assert!(asked.elapsed() < Duration::from_secs(3), "closed after {:?}", asked.elapsed());

    // The idle ones are dropped once the header timeout has passed, not before.
    for stream in &mut idle {
        stream.set_read_timeout(Some(TIMEOUT + Duration::from_secs(20))).expect("timeout");
        assert!(closed_by_peer(stream), "an idle connection was kept past the header timeout");
    }
    let dropped_after = opened.elapsed();
    assert!(dropped_after >= TIMEOUT - Duration::from_secs(1), "dropped after only {dropped_after:?}");
    assert!(dropped_after < TIMEOUT + Duration::from_secs(15), "dropped after {dropped_after:?}");
    // /metrics answers again, and the agent streamed on throughout.
    assert_eq!(value(addr, "tidemark_server_connected"), 1.0);
    assert!(running.is_running(), "{}", running.log_text());

    // Out of descriptors (a soft limit below every free one), the accept
    // that fails is retried after a pause, not in a loop burning a core.
    let pid = running.pid();
    let limit = |soft: &str| {
        let status = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={soft}:"))
            .status()
            .expect("run prlimit");
        assert!(status.success(), "prlimit");
    };
    let soft_before = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        .expect("the soft limit of open files");
    limit("3");
    let _waiting = TcpStream::connect(addr).expect("connect (the kernel queues it)");
    let cpu_before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid) - cpu_before;
    limit(&soft_before);
    assert!(used < 1.0, "the agent used {used:.2} s of CPU in 3 s while it could not accept");
    assert!(running.log_text().contains("cannot accept a /metrics connection"), "{}", running.log_text());
    metrics(addr);
    assert!(running.stop(), "the agent stops cleanly");
}

/// CPU time (user and system) process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("comm").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
