//! The end of a timeline: streaming from a standby that is promoted, the agent
//! follows the server onto the new timeline and archives its history file.

use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::TimelineId;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};

#[test]
fn promotion_moves_the_archive_to_the_next_timeline() {
    let primary = Cluster::start(ClusterOptions::default());
    primary.psql("CREATE TABLE t (id int, pad text)");
    let standby = Cluster::standby_of(&primary);
    let agent = AgentSetup::new(standby.dir.path(), standby.url("postgres"));
    agent.init();
    let running = agent.spawn();

    primary.psql("INSERT INTO t SELECT g, repeat('a', 100) FROM generate_series(1, 50000) g");
    primary.switch_wal();
    // More WAL without a switch, so the promotion happens mid-segment.
    primary.psql("INSERT INTO t SELECT g, repeat('c', 100) FROM generate_series(1, 1000) g");
    let on_primary = primary.current_lsn();
    wait_replayed(&standby, on_primary);
    wait_archived(&agent, on_primary);

    standby.promote();
    standby.psql("INSERT INTO t SELECT g, repeat('b', 100) FROM generate_series(1, 50000) g");
    let end = standby.switch_wal();
    wait_archived(&agent, end);
    let log = running.log.clone();
    assert!(running.stop(), "agent did not stop cleanly");

    // The new timeline's history file, byte for byte.
    let fetched = standby.dir.path().join("history-fetch");
    let output = agent.wal_get("00000002.history", &fetched);
    assert!(output.status.success(), "wal-get history failed: {}", stderr(&output));
    let history = std::fs::read(&fetched).expect("read history");
    assert_eq!(history, std::fs::read(standby.wal_dir().join("00000002.history")).expect("server history"));
    let entries = tidemark_proto::timeline::parse_history(&history).expect("valid history");
    let switch = entries.last().expect("one entry").switch_lsn;
    assert_ne!(switch.segment_offset(SEGMENT_SIZE), 0, "the test means to promote mid-segment");

    // Timeline 2 from the segment holding the switch point to the end is
    // identical to the promoted server's own files.
    let checked = assert_timeline_segments_identical(&standby, &agent, TimelineId(2), switch, end);
    assert!(checked >= 1);
    // Timeline 1's last segment stays partial and ends at the switch point.
    let old = SegmentId::containing(TimelineId(1), switch, SEGMENT_SIZE);
    let partial = agent.repo.join(format!("wal/00000001/{}.partial", old.file_name(SEGMENT_SIZE)));
    // Its bytes up to the switch are the server's own: the new timeline's copy
    // of that segment begins with exactly that prefix.
    let name = old.file_name(SEGMENT_SIZE);
    let new_name = SegmentId { timeline: TimelineId(2), segment_no: old.segment_no }.file_name(SEGMENT_SIZE);
    let fetched = standby.dir.path().join("old-timeline-fetch");
    assert_wal_get_matches_up_to(&agent, &name, &fetched, &standby.wal_dir().join(&new_name), switch);
    let listing: Vec<String> = walk(&agent.repo);
    assert!(
        partial.exists(),
        "the old timeline's last segment was not kept as partial; repository: {listing:?}\nagent log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Waits until `standby` has replayed the primary's WAL up to `lsn`.
fn wait_replayed(standby: &Cluster, lsn: tidemark_proto::Lsn) {
    tidemark_tests::wait::wait_until("the standby to replay", std::time::Duration::from_secs(120), || {
        (standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t").then_some(())
    });
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out.sort();
    out
}

/// Commits rows `from..=to` of `ledger` one transaction each, 0.1 s apart;
/// returns per row its xid, the WAL position and the server's clock after the commit.
fn commit_ledger(cluster: &Cluster, from: u32, to: u32) -> Vec<(u32, String, String)> {
    let mut script = String::new();
    for i in from..=to {
        script.push_str(&format!(
            "INSERT INTO ledger (id) VALUES ({i}) RETURNING txid_current();\n\
             SELECT pg_current_wal_lsn() || '|' || clock_timestamp();\nSELECT pg_sleep(0.1);\n"
        ));
    }
    let text = cluster.psql_file(&script);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .chunks(2)
        .map(|pair| {
            let (lsn, time) = pair[1].split_once('|').expect("lsn|time");
            (pair[0].parse().expect("xid"), lsn.to_string(), time.to_string())
        })
        .collect()
}

fn ids(cluster: &Cluster) -> Vec<u32> {
    cluster.psql("SELECT id FROM ledger ORDER BY id").lines().map(|l| l.parse().expect("id")).collect()
}

/// A backup taken on timeline 1 restores to targets on both sides of a
/// promotion: before it (time, LSN), after it (xid, latest) along timeline
/// 2's history, and on timeline 1 alone when asked.
#[test]
fn restore_follows_the_history_across_a_promotion() {
    let primary = Cluster::start(ClusterOptions::default());
    primary.psql("CREATE TABLE ledger (id int PRIMARY KEY)");
    let standby = Cluster::standby_of(&primary);
    let agent = AgentSetup::new(standby.dir.path(), standby.url("postgres"));
    agent.init();
    let running = agent.spawn();
    // A backup on a standby starts at its last restartpoint, which must not
    // predate the archive: a checkpoint on the primary, replayed, gives one.
    primary.psql("CHECKPOINT");
    let checkpoint = primary.current_lsn();
    wait_replayed(&standby, checkpoint);
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup on the standby failed: {}", stderr(&output));
    let backup: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup json");
    assert_eq!(backup["timeline"], 1);

    let before = commit_ledger(&primary, 1, 20);
    let on_primary = primary.current_lsn();
    wait_replayed(&standby, on_primary);
    standby.promote();
    tidemark_tests::wait::wait_until("the promotion", std::time::Duration::from_secs(120), || {
        (standby.psql("SELECT pg_is_in_recovery()") == "f").then_some(())
    });
    let after = commit_ledger(&standby, 21, 40);
    let end = standby.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");

    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let upto = |n: u32| (1..=n).collect::<Vec<u32>>();

    // Before the promotion, by time and by LSN: timeline 1's part of the history.
    let (restored, report) = restorer.restore_and_start(&["--time", &before[14].2]);
    assert_eq!(ids(&restored), upto(15), "{report}");
    assert_eq!((report["timeline"].as_u64(), report["target_timeline"].as_u64()), (Some(1), Some(2)));
    drop(restored);
    let (restored, report) = restorer.restore_and_start(&["--lsn", &before[9].1]);
    assert_eq!(ids(&restored), upto(10), "{report}");
    drop(restored);

    // After it: from the timeline 1 backup through the switch onto timeline 2.
    let (restored, report) = restorer.restore_and_start(&["--xid", &after[9].0.to_string()]);
    assert_eq!(ids(&restored), upto(30), "{report}");
    drop(restored);
    let (restored, report) = restorer.restore_and_start(&["--latest"]);
    assert_eq!(ids(&restored), upto(40), "{report}");
    // The standby's backup named its primary: the restored cluster must not stream from it.
    assert_eq!(restored.psql("SHOW primary_conninfo"), "");
    assert_eq!(
        restored.psql("SHOW archive_mode"),
        "off",
        "a restored cluster never archives into the source's archive"
    );
    assert!(!restored.data.join("standby.signal").exists());
    drop(restored);

    // Timeline 1 alone ends at the switch: everything the old primary had sent.
    let (restored, report) = restorer.restore_and_start(&["--latest", "--timeline", "1"]);
    assert_eq!(ids(&restored), upto(20), "{report}");
    assert_eq!(report["target_timeline"].as_u64(), Some(1));
    drop(restored);
    // ...and a target past the switch on timeline 1 is refused before anything is written.
    let (_dir, pgdata) = Restorer::target_dir();
    let output = restorer.run(&[
        "restore",
        "--pgdata",
        pgdata.to_str().expect("utf-8"),
        "--timeline",
        "1",
        "--lsn",
        &after[5].1,
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("past the WAL archived on timeline 1's history"), "{}", stderr(&output));
    assert!(empty_or_absent(&pgdata));
}
