//! Bad input: each case is one error line plus a hint, a non-zero exit, and
//! nothing written.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{free_port, Cluster, ClusterOptions};

/// Asserts the shape of a failure: exit 1, `tidemark-agent: error: …` naming
/// `needle`, then `hint: …` containing `hint`, and nothing else.
fn assert_fails(output: &Output, needle: &str, hint: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "expected one error line and one hint line:\n{text}");
    assert!(lines[0].starts_with("tidemark-agent: error: ") && lines[0].contains(needle), "{text}");
    assert!(lines[1].starts_with("hint: ") && lines[1].contains(hint), "{text}");
}

#[test]
fn unreachable_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = AgentSetup::new(dir.path(), format!("postgresql://postgres@127.0.0.1:{}/postgres", free_port()));
    assert_fails(&agent.run_command(&["init"]), "could not connect", "is PostgreSQL running");
    assert!(!agent.repo.exists() && !agent.state_dir.exists());
}

#[test]
fn wrong_password_and_missing_replication_privilege() {
    let cluster = Cluster::start(ClusterOptions {
        hba: vec![
            "host replication alice 127.0.0.1/32 scram-sha-256".into(),
            "host replication norep 127.0.0.1/32 trust".into(),
        ],
        ..Default::default()
    });
    cluster.psql("CREATE ROLE alice LOGIN REPLICATION PASSWORD 'right'; CREATE ROLE norep LOGIN");
    let base = cluster.dir.path();
    let wrong =
        AgentSetup::new(&base.join("a"), format!("postgresql://alice:wrong@127.0.0.1:{}/postgres", cluster.port));
    assert_fails(&wrong.run_command(&["init"]), "password authentication failed", "check the password");
    assert!(!wrong.repo.exists() && !wrong.state_dir.exists());

    let norep = AgentSetup::new(&base.join("b"), cluster.url("norep"));
    assert_fails(&norep.run_command(&["init"]), "replication role", "ALTER ROLE");
    assert!(!norep.repo.exists() && !norep.state_dir.exists());
    assert_eq!(cluster.psql("SELECT count(*) FROM pg_replication_slots"), "0");
}

#[test]
fn wal_level_minimal() {
    let cluster = Cluster::start(ClusterOptions {
        wal_level: "minimal".into(),
        max_wal_senders: 0,
        wal_keep_size: None,
        ..Default::default()
    });
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    assert_fails(&agent.run_command(&["init"]), "wal_level is minimal", "wal_level = replica");
    assert!(!agent.repo.exists() && !agent.state_dir.exists());
}

#[test]
fn max_wal_senders_zero() {
    let cluster = Cluster::start(ClusterOptions { max_wal_senders: 0, ..Default::default() });
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    assert_fails(&agent.run_command(&["init"]), "max_wal_senders is 0", "max_wal_senders = 10");
    assert!(!agent.repo.exists() && !agent.state_dir.exists());
}

#[test]
fn repository_of_another_cluster() {
    let first = Cluster::start(ClusterOptions::default());
    let second = Cluster::start(ClusterOptions::default());
    let shared_repo = first.dir.path().join("repo");
    let a = AgentSetup::new(first.dir.path(), first.url("postgres"));
    a.init();
    let before = std::fs::read(shared_repo.join("repository.json")).expect("meta");
    let mut b = AgentSetup::new(second.dir.path(), second.url("postgres"));
    b.repo = shared_repo.clone();
    assert_fails(&b.run_command(&["init"]), "belongs to another cluster", "new empty one");
    // Nothing written: no slot on the second server, no state, the repository untouched.
    assert_eq!(second.psql("SELECT count(*) FROM pg_replication_slots"), "0");
    assert!(!b.state_dir.exists());
    assert_eq!(std::fs::read(shared_repo.join("repository.json")).expect("meta"), before);
    // run refuses it too.
    let mut b_run = AgentSetup::new(&second.dir.path().join("other"), second.url("postgres"));
    b_run.init();
    b_run.repo = shared_repo;
    assert_fails(&b_run.run_command(&["run"]), "belongs to another cluster", "new empty one");
}

/// A small tmpfs mounted for one test and unmounted after, also on failure.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(path).expect("mkdir mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root)");
        Mount(path.to_path_buf())
    }

    fn remount_read_only(&self) {
        let status = Command::new("mount").args(["-o", "remount,ro"]).arg(&self.0).status().expect("run mount");
        assert!(status.success(), "remount read-only failed");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_spool_directory() {
    let cluster = Cluster::start(ClusterOptions::default());
    let state = cluster.dir.path().join("small-state");
    let _mount = Mount::tmpfs(&state, "12m");
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.state_dir = state.join("agent");
    agent.init();
    assert_fails(&agent.run_command(&["run"]), "kB free", "free space");
    // Nothing archived, nothing acknowledged: the slot has not moved past its start.
    assert!(empty_or_absent(&agent.repo.join("wal")));
}

#[test]
fn read_only_spool_directory() {
    let cluster = Cluster::start(ClusterOptions::default());
    let state = cluster.dir.path().join("ro-state");
    let mount = Mount::tmpfs(&state, "64m");
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.state_dir = state.join("agent");
    agent.init();
    mount.remount_read_only();
    assert_fails(&agent.run_command(&["run"]), "Read-only file system", "writable");
    assert!(empty_or_absent(&agent.repo.join("wal")));
}

/// `init` that cannot write its state directory or its repository leaves no
/// replication slot behind (one nobody streams from would hold the
/// server's WAL until its disk fills) and writes nothing: a local directory
/// is found unwritable before the slot is made; an S3 repository whose
/// credentials may only read fails after it, and the slot is dropped again.
#[test]
fn init_that_cannot_write_leaves_no_slot() {
    let cluster = Cluster::start(ClusterOptions::default());
    let slots = || cluster.psql("SELECT count(*) FROM pg_replication_slots");
    let base = cluster.dir.path();

    let state = base.join("ro-state");
    let state_mount = Mount::tmpfs(&state, "4m");
    state_mount.remount_read_only();
    let mut agent = AgentSetup::new(&base.join("a"), cluster.url("postgres"));
    agent.state_dir = state.join("agent");
    assert_fails(&agent.run_command(&["init"]), "cannot write state directory", "--state-dir");
    assert_eq!(slots(), "0");
    assert!(!agent.repo.exists() && !agent.state_dir.exists());

    let repo = base.join("ro-repo");
    let repo_mount = Mount::tmpfs(&repo, "4m");
    repo_mount.remount_read_only();
    let mut agent = AgentSetup::new(&base.join("b"), cluster.url("postgres"));
    agent.repo = repo.clone();
    assert_fails(&agent.run_command(&["init"]), "cannot write repository", "permissions of the repository");
    assert_eq!(slots(), "0");
    assert!(!agent.state_dir.exists());

    let moto = tidemark_tests::moto::MotoServer::start();
    let mut agent = AgentSetup::new(&base.join("c"), cluster.url("postgres"));
    agent.url = Some(moto.url("prod"));
    agent.env.extend(moto.env("readonly"));
    // (The store's own answer, quoted in the message, spans lines: its XML body.)
    let output = agent.run_command(&["init"]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("repository.json") && text.contains("\nhint: these credentials may not"), "{text}");
    assert_eq!(slots(), "0", "the slot init created was dropped again");
    assert!(!agent.state_dir.exists());
    // With credentials that may write, the same init succeeds.
    agent.env.extend(moto.env("dba"));
    agent.init();
    assert_eq!(slots(), "1");
}
