//! `restore --force` replaces only a PostgreSQL data directory of the
//! backup's cluster, and only once the restore is complete: a parent of a
//! live data directory, a directory without PG_VERSION, another cluster's
//! data, `/` and the repository are refused with nothing
//! touched, and a restore that fails mid-fetch leaves the old data in place.

use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};

#[test]
fn force_replaces_only_this_clusters_data_directory_and_only_at_the_end() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY); INSERT INTO ledger SELECT generate_series(1, 100)");
    // The repository and state outside the cluster's directory, which
    // stands for a parent of a live data directory below.
    let base = tempfile::tempdir().expect("tempdir");
    let agent = AgentSetup::new(base.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    let backup: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop());
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let force = |pgdata: &str| ["restore", "--force", "--latest", "--pgdata", pgdata].map(str::to_string);
    let refused = |pgdata: &Path, needle: &str| {
        let args = force(pgdata.to_str().expect("utf-8"));
        restorer.refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    };

    // A parent of the live data directory: its postmaster.pid is named, the server lives on.
    let parent_before = listing(cluster.dir.path());
    refused(cluster.dir.path(), "postmaster.pid");
    assert_eq!(listing(cluster.dir.path()), parent_before, "the parent of a live data directory was touched");
    assert_eq!(cluster.psql("SELECT count(*) FROM ledger"), "100");

    // A directory without PG_VERSION.
    let (_dir, plain) = Restorer::target_dir();
    std::fs::create_dir(&plain).expect("mkdir");
    std::fs::write(plain.join("precious"), "keep me").expect("write");
    tidemark_tests::cluster::chown(&plain, tidemark_tests::cluster::PG_USER_OS);
    refused(&plain, "no PG_VERSION");
    assert_eq!(std::fs::read_to_string(plain.join("precious")).expect("precious"), "keep me");

    // `/` and the repository (home directories: force.rs's unit tests).
    refused(Path::new("/"), "system directory");
    refused(&agent.repo, "Tidemark's own");

    // A data directory of this cluster, restored earlier.
    let (_dir, pgdata) = Restorer::target_dir();
    let pgdata_arg = pgdata.to_str().expect("utf-8").to_string();
    let output = restorer.run(&["restore", "--latest", "--pgdata", &pgdata_arg]);
    assert!(output.status.success(), "{}", stderr(&output));
    std::fs::write(pgdata.join("from-the-old-restore"), "old").expect("write");
    let old = listing(&pgdata);

    // Another cluster's: its pg_control names another system identifier.
    let control = pgdata.join("global/pg_control");
    let genuine_control = std::fs::read(&control).expect("pg_control");
    let mut other = genuine_control.clone();
    other[..8].copy_from_slice(&12345u64.to_le_bytes());
    std::fs::write(&control, &other).expect("write pg_control");
    refused(&pgdata, "another cluster (system identifier 12345");
    std::fs::write(&control, &genuine_control).expect("put pg_control back");
    assert_eq!(listing(&pgdata), old);

    // A fetch that fails (a damaged chunk): the old data stays, nothing beside it.
    let chunk_dir = agent.repo.join(format!("backups/{}/chunks", backup["id"].as_str().expect("id")));
    let chunk = std::fs::read_dir(&chunk_dir).expect("chunks").flatten().next().expect("a chunk").path();
    let genuine_chunk = std::fs::read(&chunk).expect("read chunk");
    let mut damaged = genuine_chunk.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    std::fs::write(&chunk, &damaged).expect("write chunk");
    let beside = listing(pgdata.parent().expect("parent"));
    refused(&pgdata, &chunk.file_name().expect("name").to_string_lossy());
    assert_eq!(listing(&pgdata), old, "a failed --force restore changed the old data directory");
    assert_eq!(listing(pgdata.parent().expect("parent")), beside, "a failed restore left something beside it");
    std::fs::write(&chunk, &genuine_chunk).expect("put the chunk back");

    // With the repository whole again, --force replaces it.
    let args = force(&pgdata_arg);
    let output = restorer.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(pgdata.join("PG_VERSION").is_file() && pgdata.join("recovery.signal").is_file());
    assert!(!pgdata.join("from-the-old-restore").exists(), "the old data was not replaced");
    let beside = listing(pgdata.parent().expect("parent"));
    assert_eq!(beside.iter().filter(|(p, _)| !p.starts_with(&pgdata)).count(), 0, "left beside: {beside:?}");
}
