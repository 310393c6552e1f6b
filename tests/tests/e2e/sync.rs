//! Synchronous mode: with the agent as the synchronous standby, a commit that
//! returned is already durable in the agent's spool (RPO = 0).

use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

#[test]
fn commits_wait_for_the_agents_fsync() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE ledger (id int PRIMARY KEY, note text)");
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.extra_args = vec!["--application-name".into(), "tidemark_sync".into()];
    agent.init();
    let running = agent.spawn();
    cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'tidemark_sync'");
    cluster.psql("SELECT pg_reload_conf()");
    wait_until("the agent to be the synchronous standby", Duration::from_secs(120), || {
        (cluster.psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'tidemark_sync'") == "sync")
            .then_some(())
    });

    // Each commit: the WAL position just before COMMIT, then — after COMMIT
    // returned — the flush position the agent reported. The commit record
    // lies past the first, so a reported flush beyond it covers the commit.
    let mut script = String::new();
    for i in 0..100 {
        script.push_str(&format!(
            "BEGIN;\nINSERT INTO ledger VALUES ({i}, 'row {i}');\nSELECT pg_current_wal_insert_lsn() AS before_commit \\gset\nCOMMIT;\n\
             SELECT :'before_commit', flush_lsn, flush_lsn > :'before_commit'::pg_lsn FROM pg_stat_replication WHERE application_name = 'tidemark_sync';\n"
        ));
    }
    let output = cluster.psql_file(&script);
    let rows: Vec<&str> = output.lines().collect();
    assert_eq!(rows.len(), 100, "{output}");
    for row in &rows {
        assert!(row.ends_with("|t"), "a commit returned before the agent flushed it: {row}");
    }
    // The agent's own record agrees: its flushed position covers the last
    // commit (the index's progress is written every 10 s at most).
    let last_before: tidemark_proto::Lsn = rows[99].split('|').next().expect("lsn").parse().expect("lsn");
    wait_until("status shows the last commit flushed", Duration::from_secs(60), || {
        let status = agent.status();
        let flushed = status["flushed_lsn"].as_str().and_then(|l| l.parse::<tidemark_proto::Lsn>().ok());
        flushed.filter(|flushed| *flushed > last_before).map(|_| ())
    });
    cluster.psql("ALTER SYSTEM RESET synchronous_standby_names");
    cluster.psql("SELECT pg_reload_conf()");
    assert!(running.stop(), "agent did not stop cleanly");
}
