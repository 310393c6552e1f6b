//! A restored copy never talks to anything (issue 34): a drill and an
//! `extract` of a cluster that subscribes to a second cluster, names a
//! synchronous standby and keeps a tablespace leave the publisher's slot
//! where it was, never connect to it, finish in normal time and write
//! nothing where the tablespace lives; `restore --start --isolate` starts
//! such a copy inert, plain `--start` says first what reaches outside, a
//! taken port is refused before anything is fetched; a cluster on Debian's
//! layout (configuration outside the data directory) drills, and starts
//! only isolated.

use crate::common::*;
use crate::restore::Restorer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_tests::agent::{AgentSetup, RunningAgent};
use tidemark_tests::cluster::{chown, free_port, pg_bin, Cluster, ClusterOptions, PG_USER_OS};
use tidemark_tests::wait::wait_until;

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An agent streaming `cluster` as the PostgreSQL OS user, its drills'
/// scratch directory in `base/scratch`.
fn start_agent(cluster: &Cluster, base: &Path) -> (AgentSetup, RunningAgent) {
    let mut agent = AgentSetup::new(base, cluster.url("postgres"));
    agent.run_as_pg_user(base);
    let config = base.join("tidemark.toml");
    let scratch = base.join("scratch");
    std::fs::write(&config, format!("[drill]\nscratch_dir = '{}'\ntimeout = '10m'\n", scratch.display()))
        .expect("write config");
    agent.env.push(("TIDEMARK_CONFIG".into(), config.display().to_string()));
    agent.init();
    let running = agent.spawn();
    (agent, running)
}

fn drill(agent: &AgentSetup, args: &[&str]) -> (serde_json::Value, String) {
    let mut full = vec!["drill", "--json"];
    full.extend_from_slice(args);
    let output = agent.run_command(&full);
    let record = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("drill {args:?} printed no JSON record: {}", stderr(&output)));
    (record, stderr(&output))
}

/// Every path under `dir` with its length and modification time.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("list").flatten() {
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                pending.push(entry.path());
            }
            found.insert(entry.path(), (meta.len(), meta.modified().expect("mtime")));
        }
    }
    found
}

/// The publisher's slot: (active, restart_lsn, confirmed_flush_lsn).
fn slot(publisher: &Cluster) -> String {
    publisher.psql("SELECT active, restart_lsn, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'sub'")
}

/// What the publisher logged from byte `from` on.
fn log_since(publisher: &Cluster, from: u64) -> String {
    let bytes = std::fs::read(&publisher.log).expect("publisher log");
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
}

fn log_len(publisher: &Cluster) -> u64 {
    std::fs::metadata(&publisher.log).map(|m| m.len()).unwrap_or(0)
}

/// A publisher logging every connection, and a subscriber of it with a
/// tablespace and (set last, so its own commits before went through) a
/// synchronous standby that does not exist.
fn publisher_and_subscriber() -> (Cluster, Cluster, PathBuf) {
    let publisher = Cluster::start(ClusterOptions {
        wal_level: "logical".into(),
        conf: vec!["log_connections = on".into()],
        ..Default::default()
    });
    publisher.psql("CREATE TABLE feed (id int PRIMARY KEY, note text)");
    publisher.psql("CREATE PUBLICATION pub FOR TABLE feed");
    publisher.psql("INSERT INTO feed SELECT g, 'before ' || g FROM generate_series(1, 10) g");
    let cluster = Cluster::start(ClusterOptions::default());
    let location = cluster.dir.path().join("tablespace");
    std::fs::create_dir_all(&location).expect("mkdir tablespace");
    if as_root() {
        chown(&location, PG_USER_OS);
    }
    cluster.psql(&format!("CREATE TABLESPACE ts LOCATION '{}'", location.display()));
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY, note text) TABLESPACE ts");
    cluster.psql("INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 100) g");
    cluster.psql("CREATE TABLE feed (id int PRIMARY KEY, note text)");
    cluster.psql(&format!(
        "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} dbname=postgres user=postgres' PUBLICATION pub",
        publisher.port
    ));
    wait_until("the subscription copied the feed", Duration::from_secs(120), || {
        (cluster.psql("SELECT count(*) FROM feed") == "10").then_some(())
    });
    cluster.psql("VACUUM ANALYZE ledger");
    cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'elsewhere'");
    cluster.psql("SELECT pg_reload_conf()");
    (publisher, cluster, location)
}

#[test]
fn copies_of_a_subscriber_reach_nothing_outside() {
    let (publisher, cluster, location) = publisher_and_subscriber();
    let base = cluster.dir.path().join("agent");
    let (agent, running) = start_agent(&cluster, &base);
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    wait_archived(&agent, cluster.current_lsn());
    // The source goes down (its own connection to the publisher with it):
    // a copy that subscribed now would get the slot to itself and consume it.
    assert!(running.stop(), "the agent stops cleanly");
    cluster.stop("fast");
    publisher.psql("INSERT INTO feed SELECT g, 'after ' || g FROM generate_series(11, 20) g");
    wait_until("the publisher's slot is idle", Duration::from_secs(60), || {
        slot(&publisher).starts_with("f|").then_some(())
    });
    let slot_before = slot(&publisher);
    let tablespace_before = tree(&location);
    let beside_before = tree(cluster.dir.path()).into_keys().filter(|p| p.parent() == Some(cluster.dir.path())).count();
    let log_from = log_len(&publisher);

    // 1. A drill: it passes in normal time (its first write does not wait
    //    for the synchronous standby), and the check command's output is
    //    not kept in the record.
    let psql = pg_bin().join("psql");
    let command = format!(
        "echo not-for-the-record-$((4700 + 11)); {} -XAtc 'SELECT count(*) FROM ledger' | grep -qx 100",
        psql.display()
    );
    let (record, err) = drill(&agent, &["--check-cmd", &command]);
    assert_eq!(record["passed"], true, "{err}\n{record:#}");
    let rto = record["rto_seconds"].as_f64().expect("RTO");
    assert!(rto < 120.0, "the drill took {rto} s to accept a write: {record:#}");
    let check = record["checks"].as_array().and_then(|c| c.first()).cloned().expect("the command check");
    assert_eq!(check["detail"], "exit 0", "{record:#}");
    assert!(!record.to_string().contains("not-for-the-record-4711"), "{record:#}");
    let ledger = record["row_counts"].as_array().expect("row counts").iter().find(|t| t["table"] == "public.ledger");
    assert_eq!(ledger.map(|t| t["rows"].clone()), Some(100.into()), "{record:#}");

    // 2. extract --latest: its scratch copy promotes, and still never subscribes.
    let restorer = Restorer::new(&agent, &base);
    let (dir, _) = Restorer::target_dir();
    let csv = dir.path().join("ledger.csv");
    let cache = dir.path().join("cache").display().to_string();
    let scratch = dir.path().display().to_string();
    let output = restorer.run(&[
        "extract",
        "--table",
        "ledger",
        "--latest",
        "--to",
        csv.to_str().expect("utf-8"),
        "--cache-dir",
        &cache,
        "--scratch-dir",
        &scratch,
    ]);
    assert!(output.status.success(), "extract: {}", stderr(&output));
    let text = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(text.lines().count(), 101, "a header and 100 rows: {text}");

    // 3. A port already taken is refused before anything is fetched.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("address").port().to_string();
    let (dir, pgdata) = Restorer::target_dir();
    let pgdata_text = pgdata.to_str().expect("utf-8");
    let map = format!("{}={}", location.display(), dir.path().join("ts").display());
    let args =
        ["restore", "--pgdata", pgdata_text, "--start", "--port", &taken_port, "--latest", "--tablespace-map", &map];
    let output = restorer.run(&args);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("port {taken_port} on 127.0.0.1")) && text.contains("hint:"), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("error:")).count(), 1, "{text}");
    assert!(empty_or_absent(&pgdata), "nothing was written to {}", pgdata.display());
    drop(taken);

    // 4. restore --start --isolate: inert, its subscription disabled without
    //    asking the publisher, commits that wait for no one.
    let port = free_port();
    let port_text = port.to_string();
    let output = restorer.run(&[
        "restore",
        "--pgdata",
        pgdata_text,
        "--start",
        "--isolate",
        "--port",
        &port_text,
        "--latest",
        "--json",
        "--tablespace-map",
        &map,
    ]);
    let copy = Cluster::adopt_isolated(dir, pgdata.clone(), port);
    assert!(output.status.success(), "restore --isolate: {}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("restore JSON");
    assert_eq!(report["isolated"], true, "{report:#}");
    assert_eq!(report["subscriptions_disabled"], serde_json::json!(["postgres.sub"]), "{report:#}");
    assert!(!stderr(&output).contains("warning"), "{}", stderr(&output));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the isolated copy listens on TCP");
    for (setting, value) in [("listen_addresses", ""), ("synchronous_standby_names", ""), ("archive_mode", "off")] {
        assert_eq!(copy.psql(&format!("SHOW {setting}")), value, "{setting}");
    }
    assert_eq!(copy.psql("SHOW max_logical_replication_workers"), "0");
    assert_eq!(copy.psql("SELECT subenabled FROM pg_subscription WHERE subname = 'sub'"), "f");
    copy.psql("INSERT INTO ledger VALUES (101, 'written in the copy')");
    let kept = std::fs::read_to_string(pgdata.join("postgresql.auto.conf.production")).expect("the source's auto.conf");
    assert!(kept.contains("synchronous_standby_names = 'elsewhere'"), "{kept}");
    drop(copy);

    // Nothing reached the publisher, and nothing landed at the source's tablespace.
    let logged = log_since(&publisher, log_from);
    assert!(!logged.contains("connection received"), "the publisher was contacted:\n{logged}");
    assert_eq!(slot(&publisher), slot_before, "the publisher's slot moved");
    assert_eq!(publisher.psql("SELECT count(*) FROM pg_stat_replication"), "0");
    assert_eq!(tree(&location), tablespace_before, "something was written at {}", location.display());
    let beside_after = tree(cluster.dir.path()).into_keys().filter(|p| p.parent() == Some(cluster.dir.path())).count();
    assert_eq!(beside_after, beside_before, "something was written beside {}", location.display());

    // 5. Plain --start keeps the cluster's own settings, but says first what reaches outside.
    let (dir, pgdata) = Restorer::target_dir();
    let port = free_port();
    let port_text = port.to_string();
    let map = format!("{}={}", location.display(), dir.path().join("ts").display());
    let args = [
        "restore",
        "--pgdata",
        pgdata.to_str().expect("utf-8"),
        "--start",
        "--port",
        &port_text,
        "--latest",
        "--tablespace-map",
        &map,
    ];
    let output = restorer.run(&args);
    let _own = Cluster::adopt_running(dir, pgdata, port);
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("reach outside"), "{text}");
    assert!(text.contains("synchronous_standby_names = 'elsewhere'"), "{text}");
    assert!(text.contains("subscription \"sub\" (database postgres, enabled)"), "{text}");
    assert!(text.contains(&format!("port={}", publisher.port)), "{text}");
}

#[test]
fn a_debian_layout_cluster_drills_and_starts_only_isolated() {
    let cluster = Cluster::start(ClusterOptions { config_outside: true, ..Default::default() });
    assert!(!cluster.data.join("postgresql.conf").exists() && !cluster.data.join("pg_hba.conf").exists());
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY, note text)");
    cluster.psql("INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 10) g");
    let base = cluster.dir.path().join("agent");
    let (agent, running) = start_agent(&cluster, &base);
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    wait_archived(&agent, cluster.current_lsn());

    // A drill, asked to keep the check command's output.
    let psql = pg_bin().join("psql");
    let command =
        format!("echo kept-$((4700 + 12)); {} -XAtc 'SELECT count(*) FROM ledger' | grep -qx 10", psql.display());
    let (record, err) = drill(&agent, &["--check-cmd", &command, "--record-check-output"]);
    assert_eq!(record["passed"], true, "{err}\n{record:#}");
    assert!(record["checks"][0]["detail"].as_str().unwrap_or("").contains("kept-4712"), "{record:#}");
    assert!(running.stop(), "the agent stops cleanly");

    // Plain --start has no settings of the cluster's own to start with: refused, nothing written.
    let restorer = Restorer::new(&agent, &base);
    let (dir, pgdata) = Restorer::target_dir();
    let port_text = free_port().to_string();
    let pgdata_text = pgdata.to_str().expect("utf-8");
    let args = ["restore", "--pgdata", pgdata_text, "--start", "--port", &port_text, "--latest"];
    restorer.refused(&args, "has no postgresql.conf");
    assert!(empty_or_absent(&pgdata), "nothing was written to {}", pgdata.display());
    // --isolate without --start: refused too.
    restorer.refused(&["restore", "--pgdata", pgdata_text, "--isolate", "--latest"], "--isolate");
    assert!(empty_or_absent(&pgdata), "nothing was written to {}", pgdata.display());

    // Isolated, it starts.
    let port = free_port();
    let port_text = port.to_string();
    let args = ["restore", "--pgdata", pgdata_text, "--start", "--isolate", "--port", &port_text, "--latest"];
    let output = restorer.run(&args);
    let copy = Cluster::adopt_isolated(dir, pgdata.clone(), port);
    assert!(output.status.success(), "restore --isolate: {}", stderr(&output));
    assert_eq!(copy.psql("SELECT count(*) FROM ledger"), "10");
    assert!(!pgdata.join("postgresql.conf.production").exists(), "there was none to keep");
    assert!(pgdata.join("postgresql.auto.conf.production").exists(), "the source's auto.conf is kept");
}
