//! Block-level incremental backups: chains of 1, 3 and 7 increments taken
//! under load restore exactly (the ledger, pgbench's invariant, every index
//! against its heap); the combined directory passes pg_verifybackup; small
//! changes store small increments; a flipped byte in the middle of a chain
//! is refused, naming the object; a hole in the archived WAL gives a full
//! backup, never a restore that misses a block. On PostgreSQL 17 with
//! summarize_wal, increments that read only changed blocks, taken under
//! load, restore exactly too. `restore --delta` brings a stale copy (also
//! one whose tablespace lives elsewhere) to what a fresh restore gives.

use crate::common::*;
use crate::restore::{commit_rows, rows, Restorer};
use std::process::Command;
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{pg_bin, server_bin_for, Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

fn backup(agent: &AgentSetup, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["backup", "--json"];
    all.extend_from_slice(args);
    let output = agent.run_command(&all);
    assert!(output.status.success(), "backup failed: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("backup JSON")
}

fn stored(backup: &serde_json::Value) -> u64 {
    backup["stored_bytes"].as_u64().expect("stored_bytes")
}

/// pgbench's invariant (every transaction moved the same delta in accounts,
/// tellers and history), and the indexes.
fn assert_consistent(restored: &Cluster) {
    let invariant = restored.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
         AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    );
    assert_eq!(invariant, "t", "pgbench's invariant does not hold");
    assert_indexes_intact(restored);
}

/// Every B-tree index against its heap (amcheck's heapallindexed: a block
/// missing from heap or index is found).
fn assert_indexes_intact(restored: &Cluster) {
    restored.psql("CREATE EXTENSION IF NOT EXISTS amcheck");
    let checked = restored.psql(
        "SELECT count(bt_index_check(c.oid, true)) FROM pg_class c JOIN pg_am am ON am.oid = c.relam \
         WHERE am.amname = 'btree' AND c.relpersistence <> 't' AND c.relkind = 'i'",
    );
    assert!(checked.parse::<u32>().expect("count") > 10, "amcheck checked {checked} indexes");
}

/// A cluster with pgbench's tables (scale 5) and a ledger table, and an
/// agent streaming from it.
fn pgbench_ledger_and_agent() -> (Cluster, AgentSetup, tidemark_tests::agent::RunningAgent) {
    pgbench_ledger_and_agent_on(ClusterOptions::default())
}

fn pgbench_ledger_and_agent_on(options: ClusterOptions) -> (Cluster, AgentSetup, tidemark_tests::agent::RunningAgent) {
    let cluster = Cluster::start(options);
    cluster.pgbench_init(5);
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    (cluster, agent, running)
}

/// Takes `count` increments, each while pgbench (4 s, 2 clients, then
/// `pgbench_args`) runs, each followed by ten ledger rows; returns the
/// backups (the full one first) and, per increment, an LSN only that
/// increment reaches first.
fn increments_under_load(
    cluster: &Cluster,
    agent: &AgentSetup,
    count: u32,
    pgbench_args: &[&str],
) -> (Vec<serde_json::Value>, Vec<String>) {
    let full = backup(agent, &[]);
    assert!(full["base"].is_null(), "the first backup is full: {full}");
    let mut chain = vec![full.clone()];
    let mut targets = Vec::new();
    for k in 1..=count {
        let history = cluster.psql("SELECT count(*) FROM pgbench_history").parse::<u64>().expect("count");
        let mut args = vec!["-n", "-T", "4", "-c", "2"];
        args.extend_from_slice(pgbench_args);
        let mut pgbench = cluster.pgbench_spawn(&args);
        wait_until("pgbench to commit", Duration::from_secs(60), || {
            let now = cluster.psql("SELECT count(*) FROM pgbench_history").parse::<u64>().ok()?;
            (now > history + 50).then_some(())
        });
        let increment = backup(agent, &[]);
        assert!(pgbench.wait().expect("wait pgbench").success());
        assert_eq!(increment["base"], chain[chain.len() - 1]["id"], "increment {k} is on the one before: {increment}");
        // Under this much load most pages change, but each changed page is
        // stored XORed with the full backup's copy: mostly zeros. The XOR
        // grows along the chain as pages drift from the full backup's
        // (here 1.2 %, 23 %, 28 %, 31 %, 34 %, 41 % of the full backup; the
        // first increment is taken as pgbench begins).
        eprintln!("increment {k} stored {} of the full backup's {}", stored(&increment), stored(&full));
        let limit = if k <= 2 { 40 } else { 70 };
        assert!(
            stored(&increment) * 100 <= limit * stored(&full),
            "increment {k} stored {} of {}",
            stored(&increment),
            stored(&full)
        );
        let lsns = commit_rows(cluster, 10 * k - 9, 10 * k, 0.0);
        targets.push(lsns.last().expect("an LSN").clone());
        chain.push(increment);
    }
    (chain, targets)
}

/// A restorer with a scratch directory of its own (kept while the first lives).
fn restorer_for(agent: &AgentSetup) -> (tempfile::TempDir, Restorer) {
    let scratch = tempfile::Builder::new().prefix("tidemark-incremental-").tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let restorer = Restorer::new(agent, scratch.path());
    (scratch, restorer)
}

/// Restores (started, with `extra` arguments) to the target after each of
/// `increments` (counted from 1) of `chain` (the full backup first) and its
/// `targets`: each starts from that increment and holds the ledger as
/// committed before the target, pgbench's invariant and intact indexes.
fn restore_each(
    restorer: &Restorer,
    cluster: &Cluster,
    (chain, targets): (&[serde_json::Value], &[String]),
    increments: &[usize],
    extra: &[&str],
) {
    for &k in increments {
        let mut args = vec!["--lsn", targets[k - 1].as_str()];
        args.extend_from_slice(extra);
        let (restored, report) = restorer.restore_and_start(&args);
        assert_eq!(report["backup_id"], chain[k]["id"], "chain of {k} increments: {report}");
        let expected = rows(cluster, &format!("WHERE id <= {}", 10 * k));
        assert_eq!(rows(&restored, ""), expected, "chain of {k}: the ledger as committed before the target");
        assert_consistent(&restored);
    }
}

#[test]
fn postgresql_17_increments_that_read_only_changed_blocks_restore_exactly_under_load() {
    let bin = server_bin_for(17);
    let options = ClusterOptions {
        server_bin: Some(bin.clone()),
        conf: vec!["summarize_wal = on".to_string()],
        ..Default::default()
    };
    let (cluster, agent, running) = pgbench_ledger_and_agent_on(options);
    // At 100 transactions a second a minority of pages changes, and the
    // server sends the segments incrementally.
    let (chain, targets) = increments_under_load(&cluster, &agent, 3, &["-R", "100"]);
    let read = |backup: &serde_json::Value| backup["bytes"].as_u64().expect("bytes");
    for increment in &chain[1..] {
        // The server sent only changed blocks (of what it sends whole, the
        // free space maps and the WAL-free files are small).
        assert!(read(increment) * 2 < read(&chain[0]), "read {} of {}", read(increment), read(&chain[0]));
    }
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");

    let (_scratch, restorer) = restorer_for(&agent);
    let bin_arg = bin.display().to_string();
    restore_each(&restorer, &cluster, (&chain, &targets), &[1, 2, 3], &["--pg-bin", &bin_arg]);
    let (_dir, pgdata) = Restorer::target_dir();
    let newest = chain[3]["id"].as_str().expect("id");
    let output = restorer.run(&["fetch-backup", "--backup", newest, "--pgdata", pgdata.to_str().expect("utf-8")]);
    assert!(output.status.success(), "fetch-backup: {}", stderr(&output));
    check_backup_manifest(&pgdata);
}

/// Bytes an incremental backup since `since` must read at least: the main-fork
/// pages of the database's relations whose LSN is at or after it (pageinspect),
/// and every other file of the data directory, which any method reads whole.
fn changed_bytes(cluster: &Cluster, since: &str) -> u64 {
    let pages: u64 = cluster
        .psql(&format!(
            "SELECT coalesce(sum((SELECT count(*) FROM generate_series(0, pg_relation_size(c.oid) / 8192 - 1) AS b \
             WHERE (page_header(get_raw_page(c.oid::regclass::text, 'main', b::int))).lsn >= '{since}'::pg_lsn)), 0) \
             FROM pg_class c WHERE c.relpersistence = 'p' AND c.relkind IN ('r', 'i', 't', 'm', 'S') \
             AND pg_relation_size(c.oid) > 0"
        ))
        .parse()
        .expect("a page count");
    let mut whole = 0;
    let mut stack = vec![cluster.data.clone()];
    let skipped = [
        "pg_wal",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_subtrans",
        "pg_dynshmem",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
    ];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the data directory") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let relative = path.strip_prefix(&cluster.data).expect("inside").to_string_lossy().to_string();
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() && !skipped.contains(&relative.as_str()) {
                stack.push(path);
            } else if meta.is_file()
                && !tidemark_proto::repo::chain::is_block_file("base", &relative)
                && !relative.starts_with("postmaster.")
            {
                whole += meta.len();
            }
        }
    }
    pages * 8192 + whole
}

/// An increment's bytes read from the server, and its log.
fn backup_logged(agent: &AgentSetup) -> (serde_json::Value, String) {
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup failed: {}", stderr(&output));
    (serde_json::from_slice(&output.stdout).expect("backup JSON"), stderr(&output))
}

fn read_bytes(backup: &serde_json::Value) -> u64 {
    backup["read_bytes"].as_u64().expect("read_bytes")
}

#[test]
fn postgresql_15_increments_read_only_the_blocks_the_wal_map_names_and_restore_exactly() {
    // As the README sets it up: a replication role with the grants of the
    // low-level backup functions, not a superuser.
    let cluster = Cluster::start(ClusterOptions {
        hba: vec!["host all tidemark 127.0.0.1/32 trust".into(), "host replication tidemark 127.0.0.1/32 trust".into()],
        ..Default::default()
    });
    cluster.pgbench_init(5);
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    cluster.psql("CREATE ROLE tidemark LOGIN REPLICATION");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("tidemark"));
    // Without the grants, init says what incremental backups would cost.
    let output = agent.run_command(&["init", "--json"]);
    assert!(output.status.success(), "init: {}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("init JSON");
    assert!(report["advice"].to_string().contains("may not execute pg_backup_start(text, boolean)"), "{report}");
    cluster.psql(
        "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean), pg_switch_wal(), \
         pg_ls_dir(text, boolean, boolean), pg_stat_file(text, boolean), \
         pg_read_binary_file(text, bigint, bigint, boolean) TO tidemark",
    );
    let output = agent.run_command(&["init", "--json"]);
    assert!(output.status.success(), "init: {}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("init JSON");
    assert_eq!(report["advice"], serde_json::json!([]), "{report}");
    let running = agent.spawn();
    cluster.psql("CREATE EXTENSION pageinspect");
    let (mut chain, mut targets) = increments_under_load(&cluster, &agent, 2, &["-R", "100"]);
    let full_read = read_bytes(&chain[0]);
    for increment in &chain[1..] {
        assert!(read_bytes(increment) * 3 < full_read, "read {} of {full_read}", read_bytes(increment));
    }

    // A quiet change (pgbench's invariant kept): what the increment reads
    // against what changed.
    cluster.psql("UPDATE pgbench_accounts SET filler = 'quiet' WHERE aid % 5000 = 0");
    // Every block of the tellers changes: read whole, and its page LSNs
    // checked against the map.
    cluster.psql("UPDATE pgbench_tellers SET filler = 'all of them'");
    let before = chain.last().expect("a backup")["start_lsn"].as_str().expect("start").to_string();
    let (quiet, log) = backup_logged(&agent);
    assert!(log.contains("read only the blocks the WAL map shows changed"), "{log}");
    assert!(log.contains("files read whole agree with the WAL map"), "{log}");
    assert!(!log.contains("the WAL map missed"), "{log}");
    let changed = changed_bytes(&cluster, &before);
    eprintln!("read {} bytes for {changed} changed bytes (full backup: {full_read})", read_bytes(&quiet));
    assert!(read_bytes(&quiet) <= 2 * changed, "read {} for {changed} changed bytes", read_bytes(&quiet));
    chain.push(quiet);
    targets.push(commit_rows(&cluster, 21, 30, 0.0).last().expect("an LSN").clone());

    // A summary gone from the middle of the WAL since the last backup (as
    // if the agent had not been streaming then): the map is incomplete, so
    // the relation files are read whole (and stored by page LSN).
    let size = SEGMENT_SIZE;
    let start: tidemark_proto::Lsn =
        chain.last().expect("a backup")["start_lsn"].as_str().expect("lsn").parse().expect("lsn");
    cluster.psql("UPDATE pgbench_accounts SET filler = 'gap' WHERE aid % 70 = 0");
    cluster.switch_wal();
    cluster.psql("UPDATE pgbench_accounts SET filler = 'gap' WHERE aid % 90 = 0");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    let gone = tidemark_proto::segment::SegmentId {
        timeline: tidemark_proto::TimelineId(1),
        segment_no: start.segment_no(size) + 1,
    };
    let summary = agent.repo.join(tidemark_proto::repo::layout::summary_key(gone, size));
    wait_until("the segment to be summarized", Duration::from_secs(60), || summary.exists().then_some(()));
    std::fs::remove_file(&summary).expect("remove a summary");
    let (whole, log) = backup_logged(&agent);
    assert!(log.contains("reading every relation file whole"), "{log}");
    assert!(read_bytes(&whole) * 2 > full_read, "read {} of {full_read}", read_bytes(&whole));
    chain.push(whole);
    targets.push(commit_rows(&cluster, 31, 40, 0.0).last().expect("an LSN").clone());

    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");
    let (_scratch, restorer) = restorer_for(&agent);
    restore_each(&restorer, &cluster, (&chain, &targets), &[2, 3, 4], &[]);
    let (_dir, pgdata) = Restorer::target_dir();
    let newest = chain[4]["id"].as_str().expect("id");
    let output = restorer.run(&["fetch-backup", "--backup", newest, "--pgdata", pgdata.to_str().expect("utf-8")]);
    assert!(output.status.success(), "fetch-backup: {}", stderr(&output));
    check_backup_manifest(&pgdata);
    let verify =
        Command::new(pg_bin().join("pg_verifybackup")).arg("-n").arg(&pgdata).output().expect("run pg_verifybackup");
    assert!(verify.status.success(), "pg_verifybackup: {}{}", stderr(&verify), String::from_utf8_lossy(&verify.stdout));
}

#[test]
fn chains_of_one_three_and_seven_increments_restore_exactly_under_load() {
    let (cluster, agent, running) = pgbench_ledger_and_agent();
    let (chain, targets) = increments_under_load(&cluster, &agent, 7, &[]);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");

    let (_scratch, restorer) = restorer_for(&agent);
    let listed = String::from_utf8_lossy(&restorer.run(&["list"]).stdout).to_string();
    for (k, b) in chain.iter().enumerate().skip(1) {
        let line = listed.lines().find(|l| l.contains(b["id"].as_str().expect("id"))).expect("listed");
        let on = chain[k - 1]["id"].as_str().expect("id");
        assert!(line.contains(&format!("incremental on {on}")), "{line}");
    }
    restore_each(&restorer, &cluster, (&chain, &targets), &[1, 3, 7], &[]);

    // The combined directory of the longest chain is what its manifest says.
    let (dir, pgdata) = Restorer::target_dir();
    let newest = chain[7]["id"].as_str().expect("id");
    let output = restorer.run(&["fetch-backup", "--backup", newest, "--pgdata", pgdata.to_str().expect("utf-8")]);
    assert!(output.status.success(), "fetch-backup: {}", stderr(&output));
    let verify =
        Command::new(pg_bin().join("pg_verifybackup")).arg("-n").arg(&pgdata).output().expect("run pg_verifybackup");
    assert!(verify.status.success(), "pg_verifybackup: {}{}", stderr(&verify), String::from_utf8_lossy(&verify.stdout));
    drop(dir);

    // A flipped byte in every chunk of the middle increment: verify names
    // one, and a restore through it is refused naming one, writing nothing.
    let middle = chain[3]["id"].as_str().expect("id");
    let chunks = agent.repo.join("backups").join(middle).join("chunks");
    for entry in std::fs::read_dir(&chunks).expect("chunks") {
        let path = entry.expect("entry").path();
        let mut bytes = std::fs::read(&path).expect("read chunk");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).expect("write chunk");
    }
    let named = format!("backups/{middle}/chunks/");
    let output = restorer.run(&["verify"]);
    assert!(
        !output.status.success() && String::from_utf8_lossy(&output.stdout).contains(&named),
        "verify: {}",
        stderr(&output)
    );
    let (dir, pgdata) = Restorer::target_dir();
    let output = restorer.run(&["restore", "--pgdata", pgdata.to_str().expect("utf-8"), "--lsn", &targets[6]]);
    assert!(!output.status.success() && stderr(&output).contains(&named), "restore: {}", stderr(&output));
    assert!(empty_or_absent(&pgdata), "a refused restore wrote {}", pgdata.display());
    drop(dir);
}

#[test]
fn small_changes_store_small_increments_and_a_hole_in_the_wal_gives_a_full_backup() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.pgbench_init(10);
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    // Over BASE_BACKUP: every file read, the changed pages found by their LSNs.
    agent.env.push(("TIDEMARK_READ_CHANGED_BLOCKS".into(), "false".into()));
    agent.init();
    let running = agent.spawn();
    let full = backup(&agent, &[]);
    // One row.
    cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 500000");
    let one_row = backup(&agent, &[]);
    assert_eq!(one_row["base"], full["id"]);
    assert!(stored(&one_row) * 100 <= stored(&full), "one row: {} of {}", stored(&one_row), stored(&full));
    // A hot spot: 1 % of the rows, updated again and again.
    for _ in 0..5 {
        cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 10000");
    }
    let hot = backup(&agent, &[]);
    assert_eq!(hot["base"], one_row["id"]);
    assert!(stored(&hot) * 20 <= stored(&full), "hot spot: {} of {}", stored(&hot), stored(&full));
    eprintln!("full {} bytes, one row {}, hot spot {}", stored(&full), stored(&one_row), stored(&hot));
    let forced = backup(&agent, &["--full"]);
    assert!(forced["base"].is_null(), "--full: {forced}");

    // WAL the archive lost after the last backup (a segment between two
    // archived ones): the next backup is full, and it restores what the
    // source has.
    cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 1000 = 0");
    cluster.switch_wal();
    cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 8 WHERE aid % 1000 = 1");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    let start: tidemark_proto::Lsn = forced["start_lsn"].as_str().expect("start").parse().expect("lsn");
    let lost = tidemark_proto::segment::SegmentId::containing(
        tidemark_proto::TimelineId(1),
        tidemark_proto::Lsn(end.0 - 1),
        SEGMENT_SIZE,
    );
    assert!(lost.segment_no > start.segment_no(SEGMENT_SIZE), "the lost segment is after the backup's start");
    let name = lost.file_name(SEGMENT_SIZE);
    let wal_dir = agent.repo.join("wal").join(&name[..8]);
    let objects: Vec<_> = std::fs::read_dir(&wal_dir)
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&name)))
        .collect();
    assert!(!objects.is_empty(), "no archived object for {name} in {}", wal_dir.display());
    for path in objects {
        std::fs::remove_file(path).expect("remove a WAL object");
    }
    // A segment archived after the hole.
    cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 3 WHERE aid % 1000 = 2");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 9 WHERE aid % 997 = 0");
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup failed: {}", stderr(&output));
    let after_hole: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    assert!(after_hole["base"].is_null(), "after a hole the backup is full: {after_hole}");
    let log = stderr(&output);
    assert!(log.contains("full backup: the archived WAL has a hole"), "{log}");
    // Retention: the three newest backups are kept, and the increment among
    // them keeps the backups it is based on.
    let output = agent.run_command(&["expire", "--min-backups", "3", "--json"]);
    assert!(output.status.success(), "expire: {}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("expire JSON");
    let reasons = |id: &serde_json::Value| -> String {
        let kept = report["plan"]["kept"].as_array().expect("kept");
        kept.iter().find(|k| k["id"] == *id).map(|k| k["reasons"].to_string()).unwrap_or_default()
    };
    let of_hot = format!("base of {}", hot["id"].as_str().expect("id"));
    assert!(reasons(&one_row["id"]).contains(&of_hot), "{report}");
    assert!(reasons(&full["id"]).contains(&of_hot), "{report}");
    assert!(report["plan"]["dropped"].as_array().expect("dropped").is_empty(), "{report}");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");
    let (_scratch, restorer) = restorer_for(&agent);
    let (restored, _) = restorer.restore_and_start(&["--latest"]);
    let sums = "SELECT sum(abalance), count(*), sum(hashtext(filler)) FROM pgbench_accounts";
    assert_eq!(restored.psql(sums), cluster.psql(sums), "the restored accounts equal the source's");
    assert_indexes_intact(&restored);
}

/// `restore --start` into a new directory with `args`; the running server.
fn restore_started(
    restorer: &Restorer,
    pgdata: &std::path::Path,
    dir: tempfile::TempDir,
    args: &[&str],
) -> (Cluster, String) {
    let port = tidemark_tests::cluster::free_port();
    let port_text = port.to_string();
    let mut all = vec!["restore", "--pgdata", pgdata.to_str().expect("utf-8"), "--start", "--port", &port_text];
    all.extend_from_slice(args);
    let output = restorer.run(&all);
    let server = Cluster::adopt_running(dir, pgdata.to_path_buf(), port);
    assert!(output.status.success(), "restore {args:?}: {}", stderr(&output));
    (server, stderr(&output))
}

#[test]
fn delta_restore_onto_a_stale_copy_equals_a_fresh_restore() {
    let (cluster, agent, running) = pgbench_ledger_and_agent();
    backup(&agent, &[]);
    commit_rows(&cluster, 1, 10, 0.0);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    let (scratch, restorer) = restorer_for(&agent);
    // Yesterday's copy: restored, started (it promoted, so it has moved on
    // by itself), stopped.
    let (dir, stale_data) = Restorer::target_dir();
    let (stale, _) = restore_started(&restorer, &stale_data, dir, &["--latest"]);
    assert_eq!(rows(&stale, "").len(), 10);
    stale.psql("INSERT INTO ledger (note) VALUES ('only in the copy')");
    stale.stop("fast");

    // The source moves on: load, an incremental backup, more commits.
    let mut pgbench = cluster.pgbench_spawn(&["-n", "-T", "4", "-c", "2"]);
    assert!(pgbench.wait().expect("wait pgbench").success());
    commit_rows(&cluster, 11, 20, 0.0);
    assert!(!backup(&agent, &[])["base"].is_null(), "the second backup is incremental");
    commit_rows(&cluster, 21, 30, 0.0);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop(), "agent did not stop cleanly");
    // Again: the repository's new objects become readable to the server's user.
    let restorer = Restorer::new(&agent, scratch.path());

    // Refused: another cluster's directory, and a directory with a running server.
    let other = Cluster::start(ClusterOptions::default());
    other.stop("fast");
    restorer.refused(
        &["restore", "--delta", "--pgdata", other.data.to_str().expect("utf-8"), "--latest"],
        "another cluster",
    );
    restorer
        .refused(&["restore", "--delta", "--pgdata", cluster.data.to_str().expect("utf-8"), "--latest"], "is running");

    // The copy as an interrupted delta restore leaves it: pg_control gone,
    // the marker naming the cluster, a relation file cut short. The next
    // --delta accepts it and finishes.
    let marker = stale_data.join("tidemark-delta-restore");
    std::fs::write(&marker, cluster.system_identifier()).expect("marker");
    if tidemark_tests::cluster::pg_os_ids().is_some() {
        tidemark_tests::cluster::chown(&marker, tidemark_tests::cluster::PG_USER_OS);
    }
    std::fs::remove_file(stale_data.join("global/pg_control")).expect("remove pg_control");
    let tellers = stale_data.join(cluster.psql("SELECT pg_relation_filepath('pgbench_tellers')"));
    std::fs::OpenOptions::new().write(true).open(&tellers).and_then(|f| f.set_len(0)).expect("cut a file short");

    // The delta restore onto the stale copy, and a fresh one, both to the latest.
    let expected = rows(&cluster, "");
    let sums = "SELECT sum(abalance), count(*), (SELECT sum(delta) FROM pgbench_history) FROM pgbench_accounts";
    let (delta, log) =
        restore_started(&restorer, &stale_data, tempfile::tempdir().expect("tempdir"), &["--delta", "--latest"]);
    assert!(log.contains("restore: delta: "), "{log}");
    assert!(!stale_data.join("tidemark-delta-restore").exists(), "the marker goes once the delta restore is done");
    let (dir, fresh_data) = Restorer::target_dir();
    let (fresh, _) = restore_started(&restorer, &fresh_data, dir, &["--latest"]);
    for (name, restored) in [("delta", &delta), ("fresh", &fresh)] {
        assert_eq!(rows(restored, ""), expected, "{name}: the ledger as committed");
        assert_eq!(restored.psql(sums), cluster.psql(sums), "{name}: pgbench's tables");
        assert_consistent(restored);
    }
    // What the delta wrote was less than the whole database.
    let written: u64 = log
        .lines()
        .find_map(|l| l.split("restore: delta: ").nth(1)?.split(" MB written").next()?.trim().parse().ok())
        .expect("the delta line");
    let total_mb = cluster.psql("SELECT pg_database_size('postgres') / 1048576").parse::<u64>().expect("size");
    assert!(written < total_mb, "delta wrote {written} MB of a {total_mb} MB database");
    drop(delta);
    drop(stale);

    // --force (replace whatever is there) and --delta (update it) exclude each other.
    let (_dir, target) = Restorer::target_dir();
    let target = target.to_str().expect("utf-8");
    let output = restorer.run(&["restore", "--delta", "--force", "--pgdata", target, "--latest"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot be used with"), "{}", stderr(&output));
    // An incremental backup whose base is gone: no restore from it, and the
    // base is named; nothing is written.
    let listed = restorer.run(&["list", "--json"]);
    let backups: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("list JSON");
    let newest = backups["backups"].as_array().and_then(|b| b.last()).expect("a backup").clone();
    let base = newest["base"].as_str().expect("the newest backup is incremental").to_string();
    std::fs::remove_file(agent.repo.join(format!("backups/{base}/backup.json"))).expect("remove the base's manifest");
    let output = restorer.run(&["restore", "--pgdata", target, "--latest"]);
    assert!(!output.status.success(), "a restore through a missing base");
    assert!(stderr(&output).contains(&base), "the missing base is named: {}", stderr(&output));
    assert!(empty_or_absent(std::path::Path::new(target)), "nothing written");
}

/// A directory the server's OS user owns (owner-only), under `parent`.
fn pg_owned_dir(parent: &std::path::Path, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join(name);
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    if tidemark_tests::cluster::pg_os_ids().is_some() {
        tidemark_tests::cluster::chown(&dir, tidemark_tests::cluster::PG_USER_OS);
    }
    dir
}

#[test]
fn delta_restore_updates_a_tablespace_where_the_copy_keeps_it() {
    let cluster = Cluster::start(ClusterOptions::default());
    let source_ts = pg_owned_dir(cluster.dir.path(), "ts-source");
    cluster.psql(&format!("CREATE TABLESPACE fast LOCATION '{}'", source_ts.display()));
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL) TABLESPACE fast");
    let oid = cluster.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'fast'");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    backup(&agent, &[]);
    commit_rows(&cluster, 1, 10, 0.0);
    wait_archived(&agent, cluster.switch_wal());
    let (scratch, restorer) = restorer_for(&agent);
    // The copy keeps its tablespace elsewhere (--tablespace-map), and moves
    // on by itself after its restore.
    // (The restore stages beside it: its parent is the server user's.)
    let copy_ts = pg_owned_dir(scratch.path(), "homes").join("ts-copy");
    let map = format!("{oid}={}", copy_ts.display());
    let (dir, copy_data) = Restorer::target_dir();
    let (copy, _) = restore_started(&restorer, &copy_data, dir, &["--latest", "--tablespace-map", &map]);
    assert_eq!(rows(&copy, "").len(), 10);
    copy.psql("INSERT INTO ledger (note) VALUES ('only in the copy')");
    copy.stop("fast");

    // The source moves on: rows, an incremental backup, more rows.
    commit_rows(&cluster, 11, 20, 0.0);
    assert!(!backup(&agent, &[])["base"].is_null(), "the second backup is incremental");
    commit_rows(&cluster, 21, 30, 0.0);
    wait_archived(&agent, cluster.switch_wal());
    assert!(running.stop(), "agent did not stop cleanly");
    let restorer = Restorer::new(&agent, scratch.path());

    // Without the map the tablespace would be updated in the source's own
    // directory, which the copy does not use: refused, nothing touched.
    let copy_arg = copy_data.to_str().expect("utf-8");
    let before = std::fs::read_dir(&source_ts).expect("list").count();
    restorer.refused(&["restore", "--delta", "--pgdata", copy_arg, "--latest"], "not where");
    assert_eq!(std::fs::read_dir(&source_ts).expect("list").count(), before);
    assert!(copy_data.join("global/pg_control").exists(), "the refused delta left the copy as it was");

    // What the backup does not have, in the copy's tablespace: removed.
    let version_dir = std::fs::read_dir(&copy_ts).expect("list").next().expect("a version directory").expect("entry");
    let db_dir = std::fs::read_dir(version_dir.path()).expect("list").next().expect("a database").expect("entry");
    let stray = db_dir.path().join("999999");
    std::fs::write(&stray, [7u8; 8192]).expect("a stray relation file");

    // With it: the copy's tablespace is brought to the backup in place.
    let expected = rows(&cluster, "");
    let (delta, log) = restore_started(
        &restorer,
        &copy_data,
        tempfile::tempdir().expect("tempdir"),
        &["--delta", "--latest", "--tablespace-map", &map],
    );
    assert!(log.contains("restore: delta: "), "{log}");
    assert_eq!(rows(&delta, ""), expected, "the ledger, in the tablespace, as committed");
    let link = std::fs::read_link(copy_data.join("pg_tblspc").join(&oid)).expect("pg_tblspc link");
    assert_eq!(link, copy_ts, "the copy's tablespace stays where it was");
    assert!(!stray.exists(), "a file the backup does not have is removed from the tablespace");
    assert_indexes_intact(&delta);
}
