//! A failover: the agent on a two-host URL with
//! `target_session_attrs=read-write`; the primary crashes, the standby is
//! promoted, and the agent finds it, makes its slot there, follows the new
//! timeline from the switch point, and the archive restores every commit the
//! new primary acknowledged, and a time before the failover, exactly.

use crate::common::*;
use crate::restore::{commit_rows, rows, Restorer};
use std::time::Duration;
use tidemark_tests::agent::{AgentSetup, RunningAgent};
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

/// A primary with a ledger table, its streaming standby, and an agent on
/// a URL naming both (read-write), streaming, with a first backup taken.
fn pair_with_agent(options: ClusterOptions) -> (Cluster, Cluster, AgentSetup, RunningAgent) {
    let primary = Cluster::start(options);
    primary.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let standby = Cluster::standby_of(&primary);
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let agent = AgentSetup::init_as_pg_user(&primary.dir.path().join("agent"), url);
    let running = agent.spawn();
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    (primary, standby, agent, running)
}

#[test]
fn the_agent_follows_a_failover_to_the_promoted_standby() {
    let (primary, standby, agent, running) = pair_with_agent(ClusterOptions::default());
    commit_rows(&primary, 1, 20, 0.02);
    let before_failover = primary.psql("SELECT now()");
    commit_rows(&primary, 21, 30, 0.02);
    let end = primary.current_lsn();
    wait_until("the standby replays every commit", Duration::from_secs(120), || {
        (standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{end}'")) == "t").then_some(())
    });
    wait_archived(&agent, end);

    // The primary crashes; the standby becomes the primary; work goes on there.
    primary.stop("immediate");
    standby.promote();
    wait_until("the promoted standby accepts writes", Duration::from_secs(120), || {
        (standby.psql("SELECT NOT pg_is_in_recovery()") == "t").then_some(())
    });
    commit_rows(&standby, 31, 50, 0.02);
    let new_end = standby.switch_wal();
    wait_until("the agent archives the new timeline", Duration::from_secs(300), || {
        let status = agent.status();
        (status["timeline"] == 2 && agent.archived_lsn().is_some_and(|a| a >= new_end)).then_some(())
    });
    // The next backup is full: the new timeline's page LSNs say nothing
    // about what changed since a backup of the old one.
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup on the new timeline: {}", stderr(&output));
    let after: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    assert!(after["base"].is_null() && after["timeline"] == 2, "a full backup on timeline 2: {after}");
    assert!(stderr(&output).contains("full backup: the server is on timeline 2"), "{}", stderr(&output));
    let log = running.log_text();
    assert!(log.contains("creating it"), "the agent made its slot on the new primary:\n{log}");
    assert_eq!(standby.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tidemark'"), "1");
    assert!(running.stop(), "the agent stops cleanly");

    // Every commit the new primary acknowledged, and a time before the failover.
    let restorer = Restorer::new(&agent, primary.dir.path());
    // (The new primary's sequence jumped ahead at promotion: ids are its.)
    let expected = rows(&standby, "");
    assert_eq!(expected.len(), 50, "every commit is on the new primary");
    let (restored, _) = restorer.restore_and_start(&["--latest"]);
    assert_eq!(rows(&restored, ""), expected, "restored across the timeline switch");
    drop(restored);
    let (restored, _) = restorer.restore_and_start(&["--time", &before_failover]);
    let first_twenty: Vec<String> = (1..=20).map(|i| format!("{i}:row {i}")).collect();
    assert_eq!(rows(&restored, ""), first_twenty, "restored to a time before the failover");
    let output = restorer.run(&["verify"]);
    assert!(output.status.success(), "verify: {}", stderr(&output));
}

/// A failover to a standby that has already recycled WAL the archive
/// lacks: the gap is said loudly (log, operations log), never papered over;
/// the agent goes on from the new primary's current segment and takes a
/// base backup at once, and the window restarts after it.
#[test]
fn a_gap_after_a_failover_is_loud_and_followed_by_a_new_backup() {
    // No wal_keep_size: nothing keeps WAL for an agent that is away.
    let (primary, standby, agent, running) =
        pair_with_agent(ClusterOptions { wal_keep_size: None, ..Default::default() });
    commit_rows(&primary, 1, 10, 0.0);
    wait_archived(&agent, primary.current_lsn());
    assert!(running.stop(), "the agent stops cleanly");
    // While the agent is away: more work, the failover, and WAL recycled on the new primary.
    commit_rows(&primary, 11, 20, 0.0);
    let end = primary.current_lsn();
    wait_until("the standby replays every commit", Duration::from_secs(120), || {
        (standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{end}'")) == "t").then_some(())
    });
    primary.stop("immediate");
    standby.promote();
    wait_until("the promoted standby accepts writes", Duration::from_secs(120), || {
        (standby.psql("SELECT NOT pg_is_in_recovery()") == "t").then_some(())
    });
    for _ in 0..4 {
        standby.switch_wal();
        standby.psql("CHECKPOINT");
    }
    commit_rows(&standby, 21, 30, 0.0);

    let running = agent.spawn();
    wait_until("the agent reports the gap and backs up after it", Duration::from_secs(300), || {
        let status = agent.status();
        let label = status["last_backup"]["label"].as_str().unwrap_or("").to_string();
        (label == "after an archive gap").then_some(())
    });
    let log = running.log_text();
    assert!(log.contains("ARCHIVE GAP"), "{log}");
    let gap = agent.status()["archive_gap_resumed_at"].clone();
    assert_eq!(gap["timeline"], 2, "status shows the gap: {gap}");
    let text = String::from_utf8_lossy(&agent.run_command(&["status"]).stdout).into_owned();
    assert!(text.contains("ARCHIVE GAP"), "{text}");
    let new_end = standby.switch_wal();
    wait_archived(&agent, new_end);
    assert!(running.stop(), "the agent stops cleanly");
    let restorer = Restorer::new(&agent, primary.dir.path());
    let events = restorer.run(&["events"]);
    assert!(String::from_utf8_lossy(&events.stdout).contains("archive gap: WAL from"), "{}", stderr(&events));
    // Everything on the new primary restores, from the backup taken after the gap.
    let (restored, report) = restorer.restore_and_start(&["--latest"]);
    assert_eq!(rows(&restored, ""), rows(&standby, ""), "everything on the new primary");
    let after_gap = agent.status()["last_backup"]["id"].clone();
    assert_eq!(report["backup_id"], after_gap, "the restore starts from the backup after the gap");
}
