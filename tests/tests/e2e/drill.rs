//! Restore drills against a live agent running as the PostgreSQL OS user
//! (as the systemd units run it): the agent's own scheduled drill, a drill
//! with SQL checks and a check command, a failing check, a random target,
//! and a corrupted chunk — each recorded in the repository and shown by
//! `status`, `tidemark-restore list` and the metrics.

use crate::common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tidemark_tests::agent::{AgentSetup, RunningAgent};
use tidemark_tests::cluster::{free_port, pg_bin, Cluster, ClusterOptions};
use tidemark_tests::http::{get, sample};
use tidemark_tests::wait::wait_until;

fn drill_json(agent: &AgentSetup, args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut full = vec!["drill", "--json"];
    full.extend_from_slice(args);
    let output = agent.run_command(&full);
    let record = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!("drill {args:?} printed no JSON record: {}", stderr(&output));
    });
    (output.status.success(), record, stderr(&output))
}

/// Nothing of a drill is left: no scratch directory, no server.
fn assert_cleaned_up(scratch: &Path) {
    let left: Vec<String> = std::fs::read_dir(scratch)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|name| !name.starts_with("drill-")), "drill leftovers in {}: {left:?}", scratch.display());
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    get(addr, "/metrics").and_then(|(_, body)| sample(&body, name))
}

fn start_agent(cluster: &Cluster, base: &Path, addr: SocketAddr) -> (AgentSetup, RunningAgent) {
    let mut agent = AgentSetup::new(base, cluster.url("postgres"));
    agent.run_as_pg_user(base);
    let config = base.join("tidemark.toml");
    std::fs::write(
        &config,
        format!(
            "listen = '{addr}'\nbackup_interval_secs = 3600\n\n[drill]\ninterval = '1h'\nscratch_dir = '{}'\n",
            base.join("scratch").display()
        ),
    )
    .expect("write config");
    agent.env.retain(|(k, _)| k != "TIDEMARK_BACKUP_INTERVAL");
    agent.env.push(("TIDEMARK_CONFIG".into(), config.display().to_string()));
    agent.init();
    let running = agent.spawn();
    (agent, running)
}

#[test]
fn drills_restore_check_record_and_fail_loudly() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    cluster.psql("INSERT INTO ledger (note) SELECT 'row ' || g FROM generate_series(1, 10) g");
    let base = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&base).expect("mkdir");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    let (agent, running) = start_agent(&cluster, &base, addr);
    let scratch = base.join("scratch");

    // 1. The agent drills by itself once the first backup is restorable.
    let scheduled = wait_until("the agent's scheduled drill is recorded", Duration::from_secs(600), || {
        let status = agent.status();
        (!status["last_drill"].is_null()).then(|| status["last_drill"].clone())
    });
    assert_eq!(scheduled["passed"], true, "{scheduled:#}");
    assert!(scheduled["rto_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{scheduled:#}");
    wait_until("the metrics show the drill", Duration::from_secs(120), || {
        (metric(addr, "tidemark_drill_last_success") == Some(1.0)
            && metric(addr, "tidemark_drill_last_rto_seconds").unwrap_or(0.0) > 0.0
            && metric(addr, "tidemark_drill_interval_seconds") == Some(3600.0))
        .then_some(())
    });
    assert_cleaned_up(&scratch);

    // 2. A drill with the operator's checks: SQL that must return true and
    // the application's smoke test, given the restored server's URL.
    let lsn = cluster.current_lsn();
    cluster.switch_wal();
    wait_archived(&agent, lsn);
    let checks = base.join("checks.sql");
    std::fs::write(
        &checks,
        "-- the ledger survived\nSELECT count(*) = 10 FROM ledger;\nSELECT bool_and(note LIKE 'row %') FROM ledger;\n",
    )
    .expect("write checks");
    let psql = pg_bin().join("psql");
    let command = format!(
        "{psql} \"$DATABASE_URL\" -XAtc 'SELECT count(*) FROM ledger' | grep -qx 10 && \
         {psql} -XAtc 'SELECT current_database()' | grep -qx postgres",
        psql = psql.display()
    );
    let checks_arg = checks.display().to_string();
    let (ok, record, err) = drill_json(&agent, &["--check-sql", &checks_arg, "--check-cmd", &command]);
    assert!(ok, "{err}\n{record:#}");
    assert_eq!(record["passed"], true, "{record:#}");
    assert_eq!(record["target"], "latest");
    assert_eq!(record["amcheck"]["ran"], true, "pg_amcheck is in {}: {record:#}", pg_bin().display());
    assert_eq!(record["amcheck"]["passed"], true, "{record:#}");
    let checks = record["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 3, "{record:#}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{record:#}");
    assert!(checks.iter().any(|c| c["kind"] == "command"), "{record:#}");
    let ledger = record["row_counts"]
        .as_array()
        .expect("row counts")
        .iter()
        .find(|t| t["table"] == "public.ledger" && t["database"] == "postgres")
        .cloned()
        .expect("the ledger's row count");
    assert_eq!(ledger["rows"], 10);
    let rto = record["rto_seconds"].as_f64().expect("RTO");
    assert!(rto > 0.0 && rto < 600.0, "{record:#}");
    assert_cleaned_up(&scratch);
    let status = agent.status();
    assert_eq!(status["last_drill"]["rto_seconds"].as_f64(), Some(rto), "status --json shows the last drill's RTO");
    let text = String::from_utf8_lossy(&agent.run_command(&["status"]).stdout).into_owned();
    assert!(text.contains("last drill          passed"), "{text}");

    // 3. A check that does not hold fails the drill, named.
    let bad = base.join("bad.sql");
    std::fs::write(&bad, "SELECT count(*) = 11 FROM ledger").expect("write");
    let (ok, record, err) = drill_json(&agent, &["--check-sql", &bad.display().to_string()]);
    assert!(!ok && record["passed"] == false, "{record:#}");
    assert!(err.contains("sql check failed: SELECT count(*) = 11 FROM ledger (false)"), "{err}");
    assert_eq!(agent.status()["last_drill"]["passed"], false);
    assert_cleaned_up(&scratch);

    // 4. A random time inside the window.
    let (ok, record, err) = drill_json(&agent, &["--target", "random"]);
    assert!(ok, "{err}\n{record:#}");
    assert!(record["target"].as_str().unwrap_or("").starts_with("time "), "{record:#}");

    // 5. A corrupted chunk: the drill fails, names the object, and it shows.
    let chunk = largest_chunk(&agent.repo.join("backups"));
    let mut bytes = std::fs::read(&chunk).expect("read chunk");
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 64] {
        *byte ^= 0x5a;
    }
    std::fs::write(&chunk, bytes).expect("corrupt chunk");
    let key = chunk.strip_prefix(&agent.repo).expect("in the repository").display().to_string();
    let (ok, record, err) = drill_json(&agent, &[]);
    assert!(!ok, "{record:#}");
    let failure = record["failure"].as_str().unwrap_or("");
    assert!(failure.contains(&key), "the failure names {key}: {failure}");
    assert!(err.contains(&key), "{err}");
    assert_cleaned_up(&scratch);
    let status = agent.status();
    assert!(status["last_drill"]["failure"].as_str().unwrap_or("").contains(&key), "{status:#}");
    wait_until("the metrics show the failed drill", Duration::from_secs(120), || {
        (metric(addr, "tidemark_drill_last_success") == Some(0.0)).then_some(())
    });
    let list = tidemark_tests::agent::retry_busy(|| {
        agent.program("tidemark-restore").arg("--repo").arg(agent.repo_url()).arg("list").output()
    });
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("last restore drill\n  FAILED"), "{list}");
    assert!(running.stop(), "the agent stops cleanly");
}

/// The largest chunk object of any backup (surely read by a restore).
fn largest_chunk(backups: &Path) -> std::path::PathBuf {
    let mut chunks = Vec::new();
    for backup in std::fs::read_dir(backups).expect("backups").flatten() {
        if let Ok(entries) = std::fs::read_dir(backup.path().join("chunks")) {
            for chunk in entries.flatten() {
                let size = chunk.metadata().map(|m| m.len()).unwrap_or(0);
                chunks.push((size, chunk.path()));
            }
        }
    }
    chunks.into_iter().max().map(|(_, path)| path).expect("a chunk")
}
