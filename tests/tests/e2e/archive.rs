//! Continuous archiving: under load, across agent crashes, across server
//! restarts, and on a quiet database.

use crate::common::*;
use std::time::{Duration, Instant};
use tidemark_proto::Lsn;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

fn setup(cluster: &Cluster) -> (AgentSetup, Lsn) {
    let start = cluster.current_lsn();
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    (agent, start)
}

#[test]
fn pgbench_load_is_archived_byte_identical() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(5);
    let (agent, start) = setup(&cluster);
    let running = agent.spawn();
    let mut pgbench = cluster.pgbench_spawn(&["-T", "30", "-c", "2"]);
    assert!(pgbench.wait().expect("wait pgbench").success(), "pgbench failed");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    let checked = assert_segments_identical(&cluster, &agent, start, end);
    assert!(checked >= 2, "expected the load to fill several segments, got {checked}");
    // A stored segment's file is kept as the next one's (`spool::recycle`),
    // not deleted: with everything archived, the spool holds that spare (a
    // whole segment's file) and at most the next segment's `.partial`.
    let spool = agent.state_dir.join("spool");
    let names: Vec<String> = std::fs::read_dir(&spool)
        .expect("list the spool")
        .map(|e| e.expect("spool entry").file_name().to_string_lossy().into_owned())
        .collect();
    let partials = names.iter().filter(|n| n.ends_with(".partial")).count();
    assert!(
        names.contains(&"spare".to_string()) && names.len() == 1 + partials && partials <= 1,
        "the spool holds {names:?}"
    );
    assert_eq!(std::fs::metadata(spool.join("spare")).expect("stat").len(), 16 << 20);
    assert!(running.stop(), "agent did not stop cleanly");
}

#[test]
fn sigkill_during_load_leaves_no_gap() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(5);
    let (agent, start) = setup(&cluster);
    let mut pgbench = cluster.pgbench_spawn(&["-T", "40", "-c", "2"]);
    let mut running = agent.spawn();
    for round in 0..3 {
        // Let it get some way into the stream, then kill it without warning.
        let seen = agent.archived_lsn().unwrap_or(start);
        wait_until(&format!("progress before kill {round}"), Duration::from_secs(120), || {
            agent.archived_lsn().filter(|a| *a > seen)
        });
        running.kill9();
        running = agent.spawn();
    }
    assert!(pgbench.wait().expect("wait pgbench").success(), "pgbench failed");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert_segments_identical(&cluster, &agent, start, end);
    assert!(running.stop(), "agent did not stop cleanly");
}

#[test]
fn server_restarts_fast_and_immediate() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE t (id int, pad text)");
    let (agent, start) = setup(&cluster);
    let mut running = agent.spawn();
    for mode in ["fast", "immediate"] {
        cluster.psql("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g");
        let before = cluster.switch_wal();
        wait_archived(&agent, before);
        cluster.stop(mode);
        cluster.start_again();
        cluster.psql("INSERT INTO t SELECT g, repeat('y', 200) FROM generate_series(1, 20000) g");
        let after = cluster.switch_wal();
        // The agent reconnects by itself (with backoff) and carries on.
        wait_archived(&agent, after);
        assert!(running.is_running(), "agent exited after a {mode} restart:\n{}", running.log_text());
    }
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert_segments_identical(&cluster, &agent, start, end);
    assert!(running.stop(), "agent did not stop cleanly");
}

#[test]
fn quiet_database_commit_reaches_repository_within_interval() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE quiet (note text)");
    let (mut agent, _) = setup(&cluster);
    let interval = Duration::from_secs(2);
    agent.extra_args = vec!["--partial-upload-interval".into(), interval.as_secs().to_string()];
    let running = agent.spawn();
    // Let the agent settle, so the timing below measures only the interval.
    let settled = cluster.current_lsn();
    wait_archived(&agent, settled);

    let marker = "tidemark-quiet-marker-7f3a";
    cluster.psql(&format!("INSERT INTO quiet VALUES ('{marker}')"));
    let committed = cluster.current_lsn();
    let began = Instant::now();
    wait_archived(&agent, committed);
    let took = began.elapsed();
    // The interval plus a margin for a loaded machine; a full segment would take forever here.
    assert!(took < interval + Duration::from_secs(20), "took {took:?}");

    // The partial segment is served through wal-get, zero-padded, and holds
    // exactly the server's bytes up to the commit.
    let name = tidemark_proto::segment::SegmentId::containing(tidemark_proto::TimelineId(1), committed, SEGMENT_SIZE)
        .file_name(SEGMENT_SIZE);
    let destination = cluster.dir.path().join("partial-fetch");
    let server_segment = cluster.wal_dir().join(&name);
    let ours = assert_wal_get_matches_up_to(&agent, &name, &destination, &server_segment, committed);
    assert!(ours.windows(marker.len()).any(|w| w == marker.as_bytes()), "the committed row is not in the archived WAL");

    // Later uploads store only the bytes since the one before, as pieces
    // continuing the prefix object; wal-get follows the chain.
    let partials = |segment: &str| -> Vec<String> {
        let names = std::fs::read_dir(agent.repo.join("wal/00000001")).expect("list the repository's WAL");
        let mut names: Vec<String> =
            names.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
        names.retain(|n| n.starts_with(&format!("{segment}.partial")));
        names
    };
    let mut pieces_seen = false;
    let mut last = committed;
    for n in 0..4 {
        cluster.psql(&format!("INSERT INTO quiet VALUES ('{marker}-{n}')"));
        last = cluster.current_lsn();
        wait_archived(&agent, last);
        pieces_seen |= partials(&name).iter().any(|n| n.contains(".partial."));
    }
    assert_eq!(
        last.segment_no(SEGMENT_SIZE),
        committed.segment_no(SEGMENT_SIZE),
        "the test's commits left the segment"
    );
    assert!(pieces_seen, "every upload rewrote the whole prefix: {:?}", partials(&name));
    assert_wal_get_matches_up_to(&agent, &name, &destination, &server_segment, last);

    // Once the segment is complete, its object replaces the prefix and the pieces.
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    wait_until("the segment's partial objects are deleted", Duration::from_secs(60), || {
        partials(&name).is_empty().then_some(())
    });
    assert!(running.stop(), "agent did not stop cleanly");
}

#[test]
fn run_refuses_a_second_instance_and_status_works_beside_it() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (agent, _) = setup(&cluster);
    let running = agent.spawn();
    let lsn = cluster.current_lsn();
    wait_archived(&agent, lsn);
    let second = agent.run_command(&["run"]);
    assert!(!second.status.success());
    let message = stderr(&second);
    assert!(message.contains("another tidemark-agent run") && message.contains("hint:"), "{message}");
    let status = agent.status();
    assert_eq!(status["system_identifier"].as_str(), Some(cluster.system_identifier().as_str()));
    assert!(status["server_lsn"].as_str().is_some(), "{status}");
    assert!(status["flushed_lsn"].as_str().is_some(), "{status}");
    assert!(status["lag_bytes"].as_u64().is_some(), "{status}");
    assert!(status["last_backup"].is_null() && status["window"].is_null());
    assert!(running.stop(), "agent did not stop cleanly");
}

#[test]
fn wal_get_refuses_a_corrupt_object_and_reports_a_missing_one() {
    let cluster = Cluster::start(ClusterOptions::default());
    let (agent, _) = setup(&cluster);
    let running = agent.spawn();
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");
    let segment =
        tidemark_proto::segment::SegmentId::containing(tidemark_proto::TimelineId(1), Lsn(end.0 - 1), SEGMENT_SIZE);
    let name = segment.file_name(SEGMENT_SIZE);
    let destination = cluster.dir.path().join("pg_wal_RECOVERYXLOG");

    // A name the repository does not have: exit 1, as PostgreSQL expects, nothing written.
    let missing = agent.wal_get("00000001000000FF00000000", &destination);
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    assert!(!destination.exists());

    // One flipped byte in the stored object: exit 200 (recovery stops), the object named, nothing written.
    let object = agent.repo.join(format!("wal/00000001/{name}"));
    let mut bytes = std::fs::read(&object).expect("read object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, &bytes).expect("write object");
    let corrupt = agent.wal_get(&name, &destination);
    assert_eq!(corrupt.status.code(), Some(200), "{}", stderr(&corrupt));
    assert!(stderr(&corrupt).contains(&name) && stderr(&corrupt).contains("corrupt"), "{}", stderr(&corrupt));
    assert!(!destination.exists(), "a corrupt segment was handed to PostgreSQL");
}
