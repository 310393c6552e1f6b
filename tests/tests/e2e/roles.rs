//! The backup / restore / delete split on an S3 server that enforces IAM
//! (moto), with the policies shipped in `deploy/iam`: the agent with the DBA
//! policy archives, backs up and reports with zero delete requests; the
//! restore tool with the read-only policy restores; `expire` with the DBA
//! policy fails clearly and deletes nothing, with the administrator's it
//! succeeds. And the lease on S3: a second agent is refused naming the
//! holder; when the holder stops renewing, its lease is taken over after it
//! expires, and the old holder, woken up, stops on its own.

use crate::common::*;
use crate::restore::{commit_rows, rows, Restorer};
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::moto::MotoServer;
use tidemark_tests::wait::wait_until;

fn as_user(agent: &AgentSetup, moto: &MotoServer, user: &str) -> AgentSetup {
    let mut other = agent.clone();
    other.env = moto.env(user);
    other.env.push(("TIDEMARK_BACKUP_INTERVAL".into(), "0".into()));
    other
}

#[test]
fn roles_on_an_s3_server_that_enforces_iam() {
    let moto = MotoServer::start();
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let base = cluster.dir.path();
    let config = base.join("tidemark.toml");
    std::fs::write(&config, "lease_secs = 6\nno_delete = true\n").expect("config");
    let mut agent = AgentSetup::new(base, cluster.url("postgres"));
    agent.url = Some(moto.url("prod"));
    agent.extra_args = vec!["--config".into(), config.display().to_string()];
    let dba = as_user(&agent, &moto, "dba");
    dba.init();
    let running = dba.spawn();
    let backup = dba.run_command(&["backup", "--json"]);
    assert!(backup.status.success(), "backup as the DBA: {}", stderr(&backup));
    commit_rows(&cluster, 1, 20, 0.05);
    let end = cluster.switch_wal();
    wait_archived(&dba, end);
    let status = dba.status();
    assert!(status["last_backup"].is_object(), "{status}");
    assert_eq!(moto.delete_requests(), Vec::<String>::new(), "the DBA's agent sent delete requests");

    // A second agent is refused, naming the holder.
    let mut second = as_user(&agent, &moto, "dba");
    second.state_dir = base.join("state2");
    second.extra_args.extend(["--slot".to_string(), "tidemark2".to_string()]);
    second.init();
    let refused = second.run_command(&["run"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("held by tidemark-agent run (state directory"), "{}", stderr(&refused));

    // Read-only credentials restore.
    let scratch = tempfile::tempdir().expect("tempdir");
    let reader = Restorer::new(&as_user(&agent, &moto, "readonly"), scratch.path());
    let (restored, _) = reader.restore_and_start(&["--latest"]);
    assert_eq!(rows(&restored, ""), rows(&cluster, ""));
    drop(restored);

    // expire as the DBA: refused by the store before anything is deleted.
    let policy = ["expire", "--recovery-window", "1s", "--min-backups", "1", "--json"];
    let denied = as_user(&agent, &moto, "dba").run_command(&policy);
    assert_eq!(denied.status.code(), Some(1), "{}", stderr(&denied));
    assert!(stderr(&denied).contains("may delete") && stderr(&denied).contains("hint:"), "{}", stderr(&denied));
    let deletes = moto.delete_requests();
    assert!(deletes.iter().all(|line| line.contains(" 403")), "a delete went through: {deletes:?}");
    // As the administrator it succeeds (the superseded partials the DBA's agent left, at least).
    let admin = as_user(&agent, &moto, "admin").run_command(&policy);
    assert!(admin.status.success(), "expire as the administrator: {}", stderr(&admin));
    let report: serde_json::Value = serde_json::from_slice(&admin.stdout).expect("expire JSON");
    assert!(!report["plan"]["deletions"].as_array().expect("deletions").is_empty(), "{report}");
    let verify = reader.run(&["verify"]);
    assert!(verify.status.success(), "verify: {}", stderr(&verify));

    // The holder stops renewing (SIGSTOP): after its lease expires, the
    // second agent takes over; woken up, the first finds it lost the lease.
    let pid = running.pid() as i32;
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let taken = run_when_the_lease_is_free(&second, Duration::from_secs(120));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut running = running;
    wait_until("the first agent stops after losing its lease", Duration::from_secs(60), || {
        (!running.is_running()).then_some(())
    });
    assert!(running.log_text().contains("lost the repository's lease"), "{}", running.log_text());
    assert!(taken.stop(), "the second agent did not stop cleanly");
}
