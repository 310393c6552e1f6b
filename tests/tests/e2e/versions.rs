//! Every PostgreSQL from 13 to 18 (Debian's 15, npm's embedded-postgres
//! server builds for the others, which have no psql or other client
//! programs): the agent, a backup, attendance traffic with one bad UPDATE,
//! an incremental backup,
//! the timeline finding it with its exact row count, restores to just
//! before it and to the latest point (started with `--pg-bin`) compared
//! row by row with the source, and verify.
//!
//! On 17 and 18 `init` advises summarize_wal; turned on after the first
//! backup and its summaries then removed, the next incremental backup
//! cannot be served from WAL summaries and reads every file, and the one
//! after it reads only changed blocks
//! (`BASE_BACKUP … INCREMENTAL`); the latest restore puts the chain
//! together, and its backup_manifest matches every file (npm's builds have
//! no pg_verifybackup, so the test checks sizes, CRC-32C and the manifest's
//! SHA-256 itself).

use crate::audit::{attendance_traffic, transaction, SCHEMA};
use crate::common::*;
use crate::restore::Restorer;
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{server_bin_for, Cluster, ClusterOptions};

/// Every attendance row as `id:status`, in id order.
fn attendance(cluster: &Cluster) -> String {
    cluster.psql("SELECT string_agg(id || ':' || coalesce(status, 'NULL'), ',' ORDER BY id) FROM \"AttendanceRecord\"")
}

fn end_to_end_on(major: u32) {
    let bin = server_bin_for(major);
    let cluster =
        Cluster::start(ClusterOptions { server_bin: (major != 15).then(|| bin.clone()), ..Default::default() });
    assert!(cluster.psql("SHOW server_version_num").starts_with(&major.to_string()));
    cluster.psql_file(SCHEMA);
    let agent = AgentSetup::init_as_pg_user(&cluster.dir.path().join("agent"), cluster.url("postgres"));
    let summaries = major >= 17;
    if summaries {
        let output = agent.run_command(&["init", "--json"]);
        assert!(output.status.success(), "init again on PostgreSQL {major}: {}", stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("init JSON");
        assert!(report["advice"][0].as_str().is_some_and(|a| a.contains("summarize_wal = on")), "{report}");
    }
    let running = agent.spawn();
    let first = backup(&agent, major);
    attendance_traffic(&cluster, 0, 40, 0.0);
    let before = attendance(&cluster);
    let rows: u64 = cluster.psql("SELECT count(*) FROM \"AttendanceRecord\"").parse().expect("count");
    let bad = transaction(&cluster, "UPDATE \"AttendanceRecord\" SET status = NULL").to_string();
    if summaries {
        cluster.psql("ALTER SYSTEM SET summarize_wal = on");
        cluster.psql("SELECT pg_reload_conf()");
        // Summaries lost (as wal_summary_keep_time removes them): the
        // server cannot say what changed since the first backup and
        // refuses to send only changed blocks; the agent reads every file.
        forget_wal_summaries(&cluster);
        let fallback = backup(&agent, major);
        assert_eq!(fallback["base"], first["id"], "PostgreSQL {major}: {fallback}");
        assert!(read(&fallback) * 3 > read(&first) * 2, "PostgreSQL {major}: every file read: {fallback} / {first}");
    }
    attendance_traffic(&cluster, 40, 30, 0.0);
    // A block-level incremental backup: the latest restore below starts
    // from it and puts its files together from the chain.
    let second = backup(&agent, major);
    assert!(!second["base"].is_null(), "PostgreSQL {major}: the second backup is incremental: {second}");
    if summaries {
        assert!(read(&second) * 3 < read(&first), "PostgreSQL {major}: only changed blocks read: {second} / {first}");
    }
    attendance_traffic(&cluster, 70, 10, 0.0);
    let after = attendance(&cluster);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "the agent stops cleanly");

    let restorer = Restorer::new(&agent, cluster.dir.path());
    let (dir, _) = Restorer::target_dir();
    let cache = dir.path().join("cache").display().to_string();
    let bin_arg = bin.display().to_string();
    // The audit finds the bad UPDATE with its exact row count.
    let output = restorer.run(&["timeline", "--xid", &bad, "--json", "--cache-dir", &cache]);
    assert!(output.status.success(), "{}", stderr(&output));
    let found: serde_json::Value = serde_json::from_slice(&output.stdout).expect("timeline JSON");
    let table = &found["transactions"][0]["tables"][0];
    assert_eq!(table["table"], "public.\"AttendanceRecord\"", "PostgreSQL {major}: {found}");
    assert_eq!(table["updated"].as_u64(), Some(rows), "PostgreSQL {major}: {found}");
    // Just before it, and everything: equal to the source at those points.
    let (restored, report) =
        restorer.restore_and_start(&["--before-xid", &bad, "--pg-bin", &bin_arg, "--cache-dir", &cache]);
    assert_eq!(report["pg_bin"], bin_arg.as_str());
    assert_eq!(attendance(&restored), before, "PostgreSQL {major}: restored just before the bad UPDATE");
    drop(restored);
    if summaries {
        let (_dir, pgdata) = Restorer::target_dir();
        let pgdata_arg = pgdata.display().to_string();
        let newest = second["id"].as_str().expect("id");
        let output = restorer.run(&["fetch-backup", "--backup", newest, "--pgdata", &pgdata_arg]);
        assert!(output.status.success(), "fetch-backup on PostgreSQL {major}: {}", stderr(&output));
        check_backup_manifest(&pgdata);
    }
    let (restored, report) = restorer.restore_and_start(&["--latest", "--pg-bin", &bin_arg, "--cache-dir", &cache]);
    assert_eq!(report["backup_id"], second["id"], "PostgreSQL {major}: the latest restore starts from the increment");
    assert_eq!(attendance(&restored), after, "PostgreSQL {major}: restored to the latest point");
    drop(restored);
    let output = restorer.run(&["verify"]);
    assert!(output.status.success(), "verify on PostgreSQL {major}: {}", stderr(&output));

    // Another version's programs are refused before anything is written.
    let other = if major == 15 { 16 } else { 15 };
    let (refused_dir, pgdata) = Restorer::target_dir();
    let pgdata_arg = pgdata.display().to_string();
    let wrong = server_bin_for(other).display().to_string();
    restorer.refused(
        &["restore", "--pgdata", &pgdata_arg, "--latest", "--start", "--pg-bin", &wrong, "--cache-dir", &cache],
        &format!("holds PostgreSQL {other}; the backup needs PostgreSQL {major}"),
    );
    assert!(empty_or_absent(&pgdata), "nothing written for a refused --pg-bin");
    drop(refused_dir);
}

/// Waits until the WAL summarizer has passed a checkpoint made now, then
/// removes every summary file it wrote: later summaries start past that
/// checkpoint.
fn forget_wal_summaries(cluster: &Cluster) {
    cluster.psql("CHECKPOINT");
    let redo = cluster.psql("SELECT redo_lsn FROM pg_control_checkpoint()");
    tidemark_tests::wait::wait_until("the WAL summarizer passes the checkpoint", Duration::from_secs(120), || {
        let sql = format!("SELECT summarized_lsn >= '{redo}' FROM pg_get_wal_summarizer_state()");
        (cluster.psql(&sql) == "t").then_some(())
    });
    let summaries = cluster.data.join("pg_wal/summaries");
    for entry in std::fs::read_dir(&summaries).expect("list pg_wal/summaries") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove a WAL summary");
    }
}

/// `backup --json`, which must succeed.
fn backup(agent: &AgentSetup, major: u32) -> serde_json::Value {
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup on PostgreSQL {major}: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("backup JSON")
}

/// Bytes a backup read from the server.
fn read(backup: &serde_json::Value) -> u64 {
    backup["bytes"].as_u64().expect("bytes")
}

#[test]
fn postgresql_13_end_to_end() {
    end_to_end_on(13);
}

#[test]
fn postgresql_14_end_to_end() {
    end_to_end_on(14);
}

#[test]
fn postgresql_15_end_to_end() {
    end_to_end_on(15);
}

#[test]
fn postgresql_16_end_to_end() {
    end_to_end_on(16);
}

#[test]
fn postgresql_17_end_to_end() {
    end_to_end_on(17);
}

#[test]
fn postgresql_18_end_to_end() {
    end_to_end_on(18);
}
