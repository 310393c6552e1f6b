//! The repository in a real S3-protocol server (s3s-fs on loopback): the
//! whole path — streaming, multipart uploads, a base backup, restore to a
//! time, verify — and an outage of more than 30 s under load, with a spool
//! limit reached while the store is away.

use crate::common::*;
use crate::restore::{commit_rows, rows, Restorer};
use std::time::{Duration, Instant};
use tidemark_proto::Lsn;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::s3::S3Server;
use tidemark_tests::wait::wait_until;

/// The slot's restart_lsn: how far the server may recycle WAL.
fn slot_restart_lsn(cluster: &Cluster, slot: &str) -> Lsn {
    cluster
        .psql(&format!("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"))
        .trim()
        .parse()
        .expect("restart_lsn")
}

#[test]
fn s3_repository_survives_an_outage_and_restores_into_it() {
    let mut s3 = S3Server::start();
    let cluster = Cluster::start(ClusterOptions { track_commit_timestamp: true, ..Default::default() });
    cluster.psql(
        "CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL);
         CREATE EXTENSION pgcrypto;
         CREATE TABLE blobs (b bytea); ALTER TABLE blobs ALTER b SET STORAGE EXTERNAL",
    );
    cluster.pgbench_init(5);
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.url = Some(s3.url("prod/cluster-a"));
    agent.env.extend(s3.env());
    // Two segments of slack: the outage below must reach it.
    agent.extra_args = vec!["--spool-limit-mb".into(), "32".into(), "--partial-upload-interval".into(), "2".into()];
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    let backup: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    let backup_start: Lsn = backup["start_lsn"].as_str().expect("start_lsn").parse().expect("lsn");

    // Incompressible WAL (random bytes, stored uncompressed): segments too
    // large for one PUT go up in parts.
    cluster.psql("INSERT INTO blobs SELECT gen_random_bytes(1000) FROM generate_series(1, 32000)");
    commit_rows(&cluster, 1, 10, 0.05);
    let before_outage = cluster.switch_wal();
    wait_archived(&agent, before_outage);
    assert!(
        running.log_text().contains("stored in a multipart upload"),
        "no multipart upload:\n{}",
        running.log_text()
    );

    // The outage: the server is down for more than 30 s while pgbench and
    // the ledger keep committing.
    s3.stop();
    let outage = Instant::now();
    let log_before = running.log_text().len();
    let logged_since_outage = |needle: &str| running.log_text().get(log_before..).is_some_and(|t| t.contains(needle));
    let mut pgbench = cluster.pgbench_spawn(&["-c", "2", "-T", "40"]);
    let first_in_outage = 11;
    commit_rows(&cluster, first_in_outage, 40, 0.5);
    // Status and the log say the repository is behind, and by how much.
    let status = wait_until("status reports the repository behind", Duration::from_secs(120), || {
        let status = agent.status();
        (status["repository_behind_bytes"].as_u64() > Some(16 << 20) && !status["repository_error"].is_null())
            .then_some(status)
    });
    assert!(status["flushed_lsn"] != status["archived_lsn"], "{status}");
    wait_until("the agent logs that the repository is behind", Duration::from_secs(60), || {
        logged_since_outage("is behind by").then_some(())
    });
    // The spool limit: streaming pauses, the slot holds the WAL on the server.
    wait_until("the spool limit is reported", Duration::from_secs(120), || {
        logged_since_outage("SPOOL LIMIT REACHED").then_some(())
    });
    let held = slot_restart_lsn(&cluster, "tidemark");
    wait_until("the server runs ahead of the held slot", Duration::from_secs(120), || {
        (slot_restart_lsn(&cluster, "tidemark") == held && cluster.current_lsn().0 > held.0 + (16 << 20)).then_some(())
    });
    // pgbench -T 40 started with the outage: when it ends, 40 s have passed.
    assert_eq!(pgbench.wait().expect("pgbench").code(), Some(0));
    let outage_length = outage.elapsed();
    s3.start_again();

    // Afterwards: everything archived, contiguous and byte-identical to pg_wal.
    commit_rows(&cluster, 41, 45, 0.05);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(logged_since_outage("streaming resumes"), "{}", running.log_text());
    let checked = assert_segments_identical(&cluster, &agent, backup_start, end);
    assert!(checked > 8, "only {checked} segments checked");
    assert!(outage_length >= Duration::from_secs(30), "outage lasted {outage_length:?}");
    assert!(running.stop(), "agent did not stop cleanly");

    // verify reads every object from S3.
    let scratch = tempfile::tempdir().expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let restorer = Restorer::new(&agent, scratch.path());
    let output = restorer.run(&["verify", "--json"]);
    assert!(output.status.success(), "verify: {}", stderr(&output));

    // Restore from S3 to a time inside the outage: exactly the rows committed by then.
    let middle = cluster.psql("SELECT pg_xact_commit_timestamp(xmin) FROM ledger WHERE id = 25");
    let expected = rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{middle}'"));
    assert_eq!(expected.len(), 25);
    let (restored, report) = restorer.restore_and_start(&["--time", &middle]);
    assert_eq!(rows(&restored, ""), expected, "{report}");
    assert_eq!(report["backup_id"], backup["id"]);
}
