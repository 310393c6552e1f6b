//! The end of a timeline: streaming from a standby that is promoted, the agent
//! follows the server onto the new timeline and archives its history file.

use crate::common::*;
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
    tidemark_tests::wait::wait_until("the standby to replay", std::time::Duration::from_secs(120), || {
        (standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{on_primary}'")) == "t").then_some(())
    });
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
    let output = agent.wal_get(&name, &fetched);
    assert!(output.status.success(), "wal-get {name} failed: {}", stderr(&output));
    let ours = std::fs::read(&fetched).expect("read");
    let servers = std::fs::read(standby.wal_dir().join(&new_name)).expect("server segment");
    let upto = switch.segment_offset(SEGMENT_SIZE) as usize;
    assert!(ours[..upto] == servers[..upto], "timeline 1's last segment differs from the server's");
    let listing: Vec<String> = walk(&agent.repo);
    assert!(
        partial.exists(),
        "the old timeline's last segment was not kept as partial; repository: {listing:?}\nagent log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
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
