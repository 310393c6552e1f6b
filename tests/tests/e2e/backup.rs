//! Base backups: taken under load, checked by pg_verifybackup, recovered to a
//! consistent state; incremental; interrupted.

use crate::common::*;
use std::process::Command;
use std::time::Duration;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

fn backup_json(agent: &AgentSetup, label: &str) -> serde_json::Value {
    let output = agent.run_command(&["backup", "--label", label, "--json"]);
    assert!(output.status.success(), "backup failed: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("backup JSON")
}

fn fetch_backup(agent: &AgentSetup, id: &str, pgdata: &std::path::Path, maps: &[String]) -> std::process::Output {
    Command::new(bin("tidemark-restore"))
        .arg("--repo")
        .arg(agent.repo_url())
        .args(["fetch-backup", "--backup", id, "--pgdata"])
        .arg(pgdata)
        .args(maps.iter().flat_map(|m| ["--tablespace-map", m.as_str()]))
        .output()
        .expect("run fetch-backup")
}

#[test]
fn backup_under_load_passes_pg_verifybackup_and_recovers_consistent() {
    backup_under_load_round_trip(None);
}

/// PostgreSQL 14 speaks the older BASE_BACKUP syntax and answers with one raw
/// tar stream per tablespace; the same checks must hold.
#[test]
fn backup_of_postgresql_14_uses_the_legacy_protocol() {
    backup_under_load_round_trip(Some(tidemark_tests::cluster::pg14_bin()));
}

/// Backup under pgbench load, materialized, checked by pg_verifybackup,
/// recovered with the archived WAL, and pgbench's invariant checked.
/// `server_bin`: another major version's server binaries.
fn backup_under_load_round_trip(server_bin: Option<std::path::PathBuf>) {
    let other_version = server_bin.is_some();
    let cluster = Cluster::start(ClusterOptions { server_bin: server_bin.clone(), ..Default::default() });
    cluster.pgbench_init(10);
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let mut pgbench = cluster.pgbench_spawn(&["-T", "20", "-c", "2"]);
    // Let the load start, then back up while it runs.
    wait_until("pgbench to commit", Duration::from_secs(60), || {
        (cluster.psql("SELECT count(*) > 100 FROM pgbench_history") == "t").then_some(())
    });
    let backup = backup_json(&agent, "under load");
    assert!(pgbench.wait().expect("wait pgbench").success());
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");

    let start_lsn: Lsn = backup["start_lsn"].as_str().expect("start").parse().expect("lsn");
    let end_lsn: Lsn = backup["end_lsn"].as_str().expect("end").parse().expect("lsn");
    let base = tempfile::Builder::new().prefix("tidemark-restored-").tempdir().expect("tempdir");
    let pgdata = base.path().join("data");
    let output = fetch_backup(&agent, backup["id"].as_str().expect("id"), &pgdata, &[]);
    assert!(output.status.success(), "fetch-backup failed: {}", stderr(&output));

    // The WAL the backup needs, from the repository through wal-get.
    let wal = base.path().join("wal");
    std::fs::create_dir_all(&wal).expect("mkdir wal");
    for segment_no in start_lsn.segment_no(SEGMENT_SIZE)..=end_lsn.segment_no(SEGMENT_SIZE) {
        let name = SegmentId { timeline: TimelineId(1), segment_no }.file_name(SEGMENT_SIZE);
        let output = agent.wal_get(&name, &wal.join(&name));
        assert!(output.status.success(), "wal-get {name}: {}", stderr(&output));
    }
    // pg_verifybackup 15 parses only WAL of its own version: for another
    // version it checks the files, and recovery below proves the WAL.
    let mut verify = Command::new(pg_bin().join("pg_verifybackup"));
    if other_version {
        verify.arg("-n");
    } else {
        verify.arg("-w").arg(&wal);
    }
    let verify = verify.arg(&pgdata).output().expect("run pg_verifybackup");
    assert!(
        verify.status.success(),
        "pg_verifybackup failed:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Recover to the end of the backup and check pgbench's own invariant:
    // every transaction moved the same delta in accounts and history.
    std::fs::write(pgdata.join("recovery.signal"), "").expect("recovery.signal");
    let restored = Cluster::start_existing_with(
        server_bin.unwrap_or_else(pg_bin),
        base,
        pgdata,
        &[
            format!("restore_command = 'cp {}/%f %p'", wal.display()),
            "recovery_target = 'immediate'".into(),
            "recovery_target_action = 'promote'".into(),
        ],
    );
    wait_until("recovery to finish", Duration::from_secs(300), || {
        (restored.psql_output("SELECT pg_is_in_recovery()").stdout == b"f\n").then_some(())
    });
    let consistent = restored.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
         AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
         AND (SELECT count(*) FROM pgbench_history) > 0",
    );
    assert_eq!(consistent, "t", "the restored database is not consistent");
}

#[test]
fn second_backup_stores_only_what_changed() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(10);
    cluster.psql("CREATE TABLE small (id int)");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let first = backup_json(&agent, "first");
    cluster.psql("INSERT INTO small VALUES (1); CHECKPOINT");
    // A spread checkpoint this time (the server is idle, so it is quick).
    let output = agent.run_command(&["backup", "--label", "second", "--json", "--backup-checkpoint", "spread"]);
    assert!(output.status.success(), "backup failed: {}", stderr(&output));
    // Not a terminal: progress goes to the log, at least the final line.
    assert!(stderr(&output).contains("backup: ") && stderr(&output).contains("(done in"), "{}", stderr(&output));
    // No agent streams here, so there is no WAL map: every file is read over BASE_BACKUP.
    assert!(stderr(&output).contains("no tidemark-agent run is streaming"), "{}", stderr(&output));
    let second: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    let first_stored = first["stored_bytes"].as_u64().expect("stored");
    let second_stored = second["stored_bytes"].as_u64().expect("stored");
    assert!(first["bytes"].as_u64().expect("bytes") > 100 << 20, "{first}");
    eprintln!("first backup stored {first_stored} bytes, second {second_stored}");
    assert!(second_stored * 10 < first_stored, "second backup stored {second_stored} bytes, first {first_stored}");
    // The second is complete on its own: it materializes and verifies.
    let base = tempfile::tempdir().expect("tempdir");
    let pgdata = base.path().join("data");
    let output = fetch_backup(&agent, second["id"].as_str().expect("id"), &pgdata, &[]);
    assert!(output.status.success(), "fetch-backup failed: {}", stderr(&output));
    let verify =
        Command::new(pg_bin().join("pg_verifybackup")).arg("-n").arg(&pgdata).output().expect("run pg_verifybackup");
    assert!(verify.status.success(), "pg_verifybackup failed: {}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn killed_backup_is_never_listed_and_the_next_one_succeeds() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(30);
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let mut child = agent
        .command(&["backup", "--label", "doomed"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn backup");
    // Kill it once it has stored some chunks but not finished.
    let chunks_dir = wait_until("the backup to store chunks", Duration::from_secs(120), || {
        let backups = std::fs::read_dir(agent.repo.join("backups")).ok()?;
        backups
            .flatten()
            .map(|e| e.path().join("chunks"))
            .find(|c| std::fs::read_dir(c).map(|mut d| d.next().is_some()).unwrap_or(false))
    });
    child.kill().expect("kill backup");
    let _ = child.wait();
    let doomed_dir = chunks_dir.parent().expect("backup dir").to_path_buf();
    assert!(!doomed_dir.join("backup.json").exists(), "the killed backup finished first; make the database bigger");
    let fetched = fetch_backup(&agent, "latest", &cluster.dir.path().join("nothing"), &[]);
    assert!(!fetched.status.success() && stderr(&fetched).contains("no complete backup"), "{}", stderr(&fetched));

    let next = backup_json(&agent, "next");
    let next_dir = agent.repo.join("backups").join(next["id"].as_str().expect("id"));
    assert!(next_dir.join("backup.json").exists());
    if doomed_dir != next_dir {
        // Leftovers of interrupted backups are expire's to remove (it knows
        // which chunks later backups reference), once older than the grace.
        let expire = agent.run_command(&["expire", "--orphan-grace", "0s", "--json"]);
        assert!(expire.status.success(), "expire: {}", stderr(&expire));
        let left: Vec<_> = std::fs::read_dir(doomed_dir.join("chunks"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "the interrupted backup's objects were not cleaned up: {left:?}");
    }
}

#[test]
fn run_takes_scheduled_backups_while_streaming() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(2);
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.env.push(("TIDEMARK_BACKUP_INTERVAL".into(), "3".into()));
    agent.init();
    let running = agent.spawn();
    let mut pgbench = cluster.pgbench_spawn(&["-T", "15", "-c", "1"]);
    // The first backup at once (the repository had none), then one every 3 s.
    let count = || {
        std::fs::read_dir(agent.repo.join("backups"))
            .map(|d| d.flatten().filter(|e| e.path().join("backup.json").exists()).count())
            .unwrap_or(0)
    };
    wait_until("two scheduled backups", Duration::from_secs(180), || (count() >= 2).then_some(()));
    assert!(pgbench.wait().expect("wait pgbench").success());
    // Streaming went on beside the backups.
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");
}

fn list_json(agent: &AgentSetup) -> serde_json::Value {
    let output = Command::new(bin("tidemark-restore"))
        .arg("--repo")
        .arg(agent.repo_url())
        .args(["list", "--json"])
        .output()
        .expect("run list");
    assert!(output.status.success(), "list failed: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("list JSON")
}

#[test]
fn list_shows_a_backup_only_once_its_wal_is_archived() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(1);
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    // No agent streaming: the backup's WAL is not in the repository.
    let backup = backup_json(&agent, "before streaming");
    let list = list_json(&agent);
    assert_eq!(list["backups"].as_array().map(Vec::len), Some(0), "{list}");
    assert!(list["window"].is_null(), "{list}");
    assert_eq!(list["waiting_for_wal"][0]["id"], backup["id"]);

    let running = agent.spawn();
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");
    let list = list_json(&agent);
    assert_eq!(list["backups"][0]["id"], backup["id"], "{list}");
    assert_eq!(list["backups"][0]["end_lsn"], backup["end_lsn"]);
    assert_eq!(list["window"]["earliest"], backup["end_time"]);
    assert_eq!(list["wal"][0]["timeline"], 1);
    let archived_end: Lsn = list["wal"][0]["end_lsn"].as_str().expect("end").parse().expect("lsn");
    assert!(archived_end >= end, "{list}");
    assert_eq!(list["timelines"][0]["timeline"], 1);
}

#[test]
fn tablespaces_and_tablespace_map_are_stored() {
    let cluster = Cluster::start(ClusterOptions::default());
    let location = cluster.dir.path().join("tablespace one");
    std::fs::create_dir_all(&location).expect("mkdir tablespace");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        tidemark_tests::cluster::chown(&location, tidemark_tests::cluster::PG_USER_OS);
    }
    cluster.psql(&format!("CREATE TABLESPACE ts1 LOCATION '{}'", location.display()));
    cluster.psql("CREATE TABLE far (id int, pad text) TABLESPACE ts1; INSERT INTO far SELECT g, repeat('t', 500) FROM generate_series(1, 20000) g; CHECKPOINT");
    let oid = cluster.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let backup = backup_json(&agent, "with a tablespace");
    let id = backup["id"].as_str().expect("id");

    let object = std::fs::read(agent.repo.join(format!("backups/{id}/backup.json"))).expect("manifest object");
    let manifest = tidemark_proto::repo::backup::BackupManifest::from_json(
        &tidemark_proto::repo::frame::decode(&object).expect("frame"),
    )
    .expect("manifest");
    assert_eq!(manifest.tablespaces.len(), 1);
    assert_eq!(manifest.tablespaces[0].oid.to_string(), oid);
    assert_eq!(std::path::PathBuf::from(&manifest.tablespaces[0].location), location);
    // tablespace_map (not a pg_tblspc link) in the base archive, naming the location.
    let map =
        manifest.files.iter().find(|f| f.archive == "base" && f.path == "tablespace_map").expect("tablespace_map");
    let map_text: Vec<u8> = map
        .chunks
        .iter()
        .flat_map(|c| {
            tidemark_proto::repo::frame::decode(&std::fs::read(agent.repo.join(&c.key)).expect("chunk")).expect("frame")
        })
        .collect();
    assert!(String::from_utf8_lossy(&map_text).starts_with(&format!("{oid} {}", location.display())));
    // Every file of the tablespace, byte for byte as on the server.
    let files: Vec<_> = manifest
        .files
        .iter()
        .filter(|f| f.archive == oid && f.kind == tidemark_proto::repo::backup::FileKind::File)
        .collect();
    assert!(!files.is_empty(), "no tablespace files in the backup");
    let mut total = 0;
    for file in files {
        let ours: Vec<u8> = file
            .chunks
            .iter()
            .flat_map(|c| {
                tidemark_proto::repo::frame::decode(&std::fs::read(agent.repo.join(&c.key)).expect("chunk"))
                    .expect("frame")
            })
            .collect();
        assert_eq!(ours, std::fs::read(location.join(&file.path)).expect("server file"), "{}", file.path);
        total += ours.len();
    }
    assert!(total > 8 << 20, "the table's data is not there: {total} bytes");

    // The tablespace goes back where it was by default: here the running
    // source's own directory, so fetch-backup refuses and writes nothing.
    let pgdata = cluster.dir.path().join("restored");
    let output = fetch_backup(&agent, id, &pgdata, &[]);
    assert!(!output.status.success() && stderr(&output).contains("is not empty"), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("--tablespace-map {oid}=")), "{}", stderr(&output));
    assert!(!pgdata.exists());
    // Moved elsewhere: pg_tblspc/OID links to the new place, and
    // pg_verifybackup checks every file there against the server's manifest
    // (all but tablespace_map, rewritten to name the new place).
    let moved = cluster.dir.path().join("tablespace moved");
    let output = fetch_backup(&agent, id, &pgdata, &[format!("{oid}={}", moved.display())]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_link(pgdata.join("pg_tblspc").join(&oid)).expect("link"), moved);
    let map = std::fs::read_to_string(pgdata.join("tablespace_map")).expect("map");
    assert_eq!(map, format!("{oid} {}\n", moved.display()));
    let verify = Command::new(pg_bin().join("pg_verifybackup"))
        .args(["-n", "-i", "tablespace_map"])
        .arg(&pgdata)
        .output()
        .expect("run pg_verifybackup");
    assert!(
        verify.status.success(),
        "pg_verifybackup failed:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let unverified = Command::new(pg_bin().join("pg_verifybackup")).arg("-n").arg(&pgdata).output().expect("run");
    assert!(String::from_utf8_lossy(&unverified.stderr).contains("tablespace_map"), "the map was not rewritten");
}
