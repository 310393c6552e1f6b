//! Progress of long operations (backup, verify, restore's fetch and WAL
//! replay): log lines when the output is not a terminal, a bar on one (in
//! tmux); and `mark --wait`, which returns only once the restore point can
//! be restored to.

use crate::common::*;
use crate::restore::Restorer;
use std::process::Command;
use std::time::Duration;
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::cluster::{free_port, Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

/// Progress lines come this often in these runs (the default is every 5 s).
const EVERY: (&str, &str) = ("TIDEMARK_PROGRESS_SECS", "0.05");

#[test]
fn long_operations_show_progress_and_mark_waits_for_its_wal() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    cluster.pgbench_init(3);
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.env.push((EVERY.0.into(), EVERY.1.into()));
    agent.init();
    let running = agent.spawn();

    // Backup: lines with amount, rate and ETA, and a last one.
    let output = agent.run_command(&["backup"]);
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("backup: ") && text.contains(" MB (") && text.contains("MB/s, ETA"), "{text}");
    assert!(text.contains("(done in"), "{text}");

    // mark --wait returns once the WAL holding the restore point is in the
    // repository: a restore to it can be planned at once.
    cluster.psql("INSERT INTO ledger (note) VALUES ('before the deployment')");
    let output = agent.run_command(&["mark", "before-deploy", "--wait", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mark: serde_json::Value = serde_json::from_slice(&output.stdout).expect("mark JSON");
    assert_eq!(mark["archived"], true);
    let command = mark["restore_command"].as_str().expect("restore command");
    assert!(command.contains("restore --name 'before-deploy'"), "{command}");
    let planned = Command::new(bin("tidemark-restore"))
        .args(["--repo", &agent.repo_url(), "restore", "--name", "before-deploy", "--dry-run", "--json", "--pgdata"])
        .arg(cluster.dir.path().join("not-written"))
        .output()
        .expect("run tidemark-restore");
    assert!(planned.status.success(), "restoring to the mark right after --wait: {}", stderr(&planned));
    let text = String::from_utf8_lossy(&agent.run_command(&["mark", "after-deploy", "--wait"]).stdout).into_owned();
    assert!(text.contains("(archived)") && text.contains("tidemark-restore --repo"), "{text}");

    // verify, with its object counts.
    let output = Command::new(bin("tidemark-restore"))
        .args(["--repo", &agent.repo_url(), "verify"])
        .env(EVERY.0, EVERY.1)
        .output()
        .expect("run verify");
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("verify: ") && text.contains(" objects (") && text.contains("(done in"), "{text}");

    // The bar on a terminal: verify inside tmux, the pane captured.
    let socket = format!("tidemark-test-{}", std::process::id());
    let tmux = |args: &[&str]| Command::new("tmux").arg("-L").arg(&socket).args(args).output().expect("run tmux");
    let shell = format!("{} --repo '{}' verify; sleep 60", bin("tidemark-restore").display(), agent.repo_url());
    let started = tmux(&["new-session", "-d", "-x", "200", "-y", "20", &shell]);
    assert!(started.status.success(), "tmux: {}", stderr(&started));
    let pane = wait_until("the progress bar in the terminal", Duration::from_secs(120), || {
        let pane = String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).into_owned();
        pane.contains("objects").then_some(pane)
    });
    tmux(&["kill-server"]);
    // The bar's fill: '=' for what is done and '>' at its head; a capture
    // in the first few percent (19 of 823 objects, seen in CI) has only the head.
    assert!(pane.contains("verify [") && (pane.contains('=') || pane.contains('>')), "a bar, not log lines: {pane}");
    assert!(!pane.contains("verify: "), "no log lines on a terminal: {pane}");

    // Restore: the fetch, then the WAL replay up to the target.
    assert!(running.stop(), "the agent stops cleanly");
    let restorer = Restorer::new(&agent, cluster.dir.path());
    let (dir, pgdata) = Restorer::target_dir();
    let port = free_port().to_string();
    let pgdata_arg = pgdata.display().to_string();
    let output = restorer.run(&[
        "restore",
        "--pgdata",
        &pgdata_arg,
        "--name",
        "before-deploy",
        "--start",
        "--port",
        &port,
        "--wait-timeout",
        "300",
    ]);
    let server = Cluster::adopt_running(dir, pgdata, port.parse().expect("port"));
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("restore: fetch the backup: ") && text.contains(" MB ("), "{text}");
    assert!(text.contains("restore: WAL replay: ") && text.contains("(done in"), "{text}");
    assert_eq!(server.psql("SELECT note FROM ledger"), "before the deployment");
}
