//! Retention end to end: scheduled backups every minute under a ledger
//! workload with `recovery_window = "150s"` and `min_backups = 2`; `expire`
//! run beside a backup and the live stream; the window's restores exact, a
//! time before it refused naming it, a `--keep forever` mark older than it
//! exact; one agent per repository (a second refused naming the holder, a
//! dead one's lease taken over); `expire` SIGKILLed at five points, each
//! rerun finishing the job; `verify` after all of it.

use crate::common::*;
use crate::restore::{commit_rows, rows, Restorer};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn json_of(output: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(output.status.success(), "{what}: {}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{what} JSON: {e}"))
}

fn commit_time(cluster: &Cluster, id: u32) -> String {
    cluster.psql(&format!("SELECT pg_xact_commit_timestamp(xmin) FROM ledger WHERE id = {id}"))
}

/// Restores to `time` and compares with the source's rows committed by then.
fn restore_time_exactly(restorer: &Restorer, cluster: &Cluster, time: &str, extra: &[&str]) {
    let mut args = vec!["--time", time];
    args.extend_from_slice(extra);
    let (restored, _) = restorer.restore_and_start(&args);
    let expected = rows(cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{time}'"));
    assert_eq!(rows(&restored, ""), expected, "restore to {time} {extra:?}");
}

#[test]
fn retention_keeps_the_window_exact_and_survives_kills() {
    let cluster = Cluster::start(ClusterOptions { track_commit_timestamp: true, ..Default::default() });
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let base = cluster.dir.path();
    let config = base.join("tidemark.toml");
    // Full backups only: the final expire must find backups older than the
    // window to drop, and a chain's bases would be kept for their
    // increments (the retention model test covers chains).
    std::fs::write(
        &config,
        "lease_secs = 6\nmax_incremental_chain = 0\n[retention]\nrecovery_window = \"150s\"\nmin_backups = 2\n",
    )
    .expect("config");
    let mut agent = AgentSetup::new(base, cluster.url("postgres"));
    agent.extra_args = vec!["--config".into(), config.display().to_string()];
    agent.env = vec![("TIDEMARK_BACKUP_INTERVAL".into(), "60".into())];
    agent.init();
    let running = agent.spawn();
    commit_rows(&cluster, 1, 10, 0.1);
    let mark = json_of(&agent.run_command(&["mark", "before-migration", "--keep", "forever", "--json"]), "mark");
    assert_eq!(mark["keep_until"], "forever", "{mark}");

    // A second agent (another state directory and slot) on the same repository.
    let mut second = agent.clone();
    second.state_dir = base.join("state2");
    second.extra_args.extend(["--slot".to_string(), "tidemark2".to_string()]);
    second.init();
    let refused = run_briefly(&second);
    assert!(
        refused.contains("held by tidemark-agent run (state directory")
            && refused.contains(&agent.state_dir.display().to_string()),
        "{refused}"
    );

    // Four and a half minutes of commits, one a second; scheduled backups every
    // minute, so the final expire finds backups older than the window.
    let (beside_backup, beside_time) = std::thread::scope(|scope| {
        let workload = scope.spawn(|| commit_rows(&cluster, 11, 280, 1.0));
        wait_until("two scheduled backups", Duration::from_secs(300), || (complete_backups(&agent) >= 2).then_some(()));
        // expire from another process while a backup runs and WAL streams.
        let backup =
            agent.command(&["backup", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("backup");
        let expire = agent.run_command(&["expire", "--json"]);
        json_of(&expire, "expire beside a backup");
        let backup = json_of(&backup.wait_with_output().expect("backup"), "backup beside expire");
        let verify = restore_tool(&agent, &["verify"]);
        assert!(
            verify.status.success(),
            "verify after expire beside a backup: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            stderr(&verify)
        );
        let time = cluster.psql("SELECT now()");
        workload.join().expect("workload");
        (backup["id"].as_str().expect("id").to_string(), time)
    });
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    // The agent crashes; from here the repository alone. The backup taken
    // beside expire restores exactly (before the final expire drops it: it
    // will be older than the window).
    running.kill9();
    let scratch = tempfile::tempdir().expect("tempdir");
    let restorer = Restorer::new(&agent, scratch.path());
    restore_time_exactly(&restorer, &cluster, &beside_time, &["--backup", &beside_backup]);
    let report = json_of(&agent.run_command(&["expire", "--json"]), "expire");
    let expired_at = OffsetDateTime::now_utc();
    assert!(!report["plan"]["dropped"].as_array().expect("dropped").is_empty(), "{report}");
    assert!(
        report["plan"]["deletions"].as_array().expect("deletions").iter().any(|d| d["what"] == "wal"),
        "old WAL goes"
    );
    let window_start =
        OffsetDateTime::parse(report["plan"]["window_after"]["earliest"].as_str().expect("earliest"), &Rfc3339)
            .expect("time");
    assert!(window_start <= expired_at - time::Duration::seconds(150), "the window covers 150 s: {report}");
    // Three times inside the window (from its 150 s to the last commit), exactly.
    let last = 280;
    for id in [last - 100, last - 40, last - 3] {
        restore_time_exactly(&restorer, &cluster, &commit_time(&cluster, id), &[]);
    }
    // Before the window: refused, naming it.
    let (_dir, pgdata) = Restorer::target_dir();
    let before = (window_start - time::Duration::minutes(1)).format(&Rfc3339).expect("format");
    restorer.refused(&["restore", "--pgdata", pgdata.to_str().expect("utf-8"), "--time", &before], "window starts at");
    assert!(!pgdata.exists());
    // The protected mark, older than the window, restores exactly.
    let (restored, _) = restorer.restore_and_start(&["--name", "before-migration"]);
    assert_eq!(rows(&restored, ""), rows(&cluster, "WHERE id <= 10"));
    drop(restored);

    // The second agent takes the dead one's lease over (same host, dead pid).
    let taken = run_when_the_lease_is_free(&second, Duration::from_secs(60));

    // expire SIGKILLed at five points, each followed by a rerun.
    for kill_after in [0, 1, 2, 4, 7] {
        cluster.psql(&format!("INSERT INTO ledger (note) VALUES ('kill point {kill_after}')"));
        for _ in 0..3 {
            cluster.psql("SELECT pg_switch_wal()");
            cluster.psql("INSERT INTO ledger (note) VALUES ('filler')");
        }
        json_of(&second.run_command(&["backup", "--json"]), "backup");
        // Archived past the backup's end, so it is restorable and the one before goes.
        let end = cluster.switch_wal();
        wait_archived(&second, end);
        // A window of zero: only the newest backup and min_backups count, whatever the clock.
        let tight = ["expire", "--recovery-window", "0s", "--min-backups", "1", "--json"];
        let killed = second
            .command(&tight)
            .env("TIDEMARK_TEST_EXPIRE_KILL_AFTER", kill_after.to_string())
            .output()
            .expect("expire");
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "expire was to die after {kill_after} deletions: {}",
            stderr(&killed)
        );
        let rerun = json_of(&second.run_command(&tight), "expire rerun");
        assert!(rerun["resumed"].as_u64().unwrap_or(0) > 0, "the rerun finishes the journal: {rerun}");
        let verify = restore_tool(&second, &["verify"]);
        assert!(
            verify.status.success(),
            "verify after a kill at {kill_after}: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            stderr(&verify)
        );
    }
    let end = cluster.switch_wal();
    wait_archived(&second, end);
    assert!(taken.stop(), "second agent did not stop cleanly");
    let restorer = Restorer::new(&agent, scratch.path());
    let (restored, _) = restorer.restore_and_start(&["--latest"]);
    assert_eq!(rows(&restored, ""), rows(&cluster, ""));
    drop(restored);
    let (restored, _) = restorer.restore_and_start(&["--name", "before-migration"]);
    assert_eq!(rows(&restored, ""), rows(&cluster, "WHERE id <= 10"));
    let events = restorer.run(&["events", "--json"]);
    let events: serde_json::Value = json_of(&events, "events");
    let kinds: Vec<&str> = events.as_array().expect("list").iter().filter_map(|e| e["kind"].as_str()).collect();
    for kind in ["mark", "backup", "expire"] {
        assert!(kinds.contains(&kind), "no {kind} event in {kinds:?}");
    }
}

/// Complete backups in the local repository (those with a `backup.json`).
fn complete_backups(agent: &AgentSetup) -> usize {
    let Ok(entries) = std::fs::read_dir(agent.repo.join("backups")) else { return 0 };
    entries.flatten().filter(|e| e.path().join("backup.json").exists()).count()
}

/// `tidemark-restore` as this process's user, for commands that start no
/// server (`verify`) while the agent, writing owner-only files, runs.
fn restore_tool(agent: &AgentSetup, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tidemark_tests::agent::bin("tidemark-restore"))
        .arg("--repo")
        .arg(agent.repo_url())
        .args(agent.key_args())
        .args(args)
        .output()
        .expect("run tidemark-restore")
}

/// Runs `run` for a second agent that must be refused; returns its error.
fn run_briefly(agent: &AgentSetup) -> String {
    let mut child = agent.command(&["run"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("run");
    let status = wait_until("the second agent exits", Duration::from_secs(60), || child.try_wait().ok().flatten());
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut text);
    }
    assert!(!status.success(), "a second agent must be refused: {text}");
    text
}
