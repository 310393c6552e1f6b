//! Authentication methods and TLS modes of the replication connection.

use crate::common::*;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions, PG_USER_OS};
use tidemark_tests::tls::make_ca;

fn init_ok(agent: &AgentSetup) {
    let output = agent.run_command(&["init"]);
    assert!(output.status.success(), "init failed: {}", stderr(&output));
    let status = agent.status();
    assert!(status["server_lsn"].as_str().is_some(), "status could not reach the server: {status}");
}

/// Runs `agent`, writes a table `table` and switches WAL: the segments reach
/// the repository byte for byte and the agent stops cleanly.
fn streams_and_stops(cluster: &Cluster, agent: &AgentSetup, table: &str) {
    let start = cluster.current_lsn();
    let running = agent.spawn();
    cluster.psql(&format!("CREATE TABLE {table} AS SELECT generate_series(1, 10000) AS n"));
    let switched = cluster.switch_wal();
    wait_archived(agent, switched);
    assert!(assert_segments_identical(cluster, agent, start, switched) >= 1);
    let log = running.log_text();
    assert!(log.contains("streaming"), "{log}");
    assert!(running.stop(), "the agent did not stop cleanly:\n{log}");
}

#[test]
fn trust_md5_scram_and_password_sources() {
    let cluster = Cluster::start(ClusterOptions {
        hba: vec![
            "host replication md5user 127.0.0.1/32 md5".into(),
            "host replication scramuser 127.0.0.1/32 scram-sha-256".into(),
        ],
        ..Default::default()
    });
    cluster.psql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5-secret'");
    cluster.psql("CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'scram-secret'");
    let base = cluster.dir.path();

    // trust
    init_ok(&AgentSetup::new(&base.join("trust"), cluster.url("postgres")));
    // md5, password in the URL
    let md5 = AgentSetup::new(
        &base.join("md5"),
        format!("postgresql://md5user:md5-secret@127.0.0.1:{}/postgres", cluster.port),
    );
    init_ok(&md5);
    // SCRAM-SHA-256, password from PGPASSWORD
    let mut scram = AgentSetup::new(&base.join("scram"), cluster.url("scramuser"));
    scram.env.push(("PGPASSWORD".into(), "scram-secret".into()));
    init_ok(&scram);
    // SCRAM-SHA-256, password from ~/.pgpass (matched on the "replication" database)
    let home = base.join("home");
    std::fs::create_dir_all(&home).expect("mkdir home");
    let pgpass = home.join(".pgpass");
    std::fs::write(&pgpass, format!("127.0.0.1:{}:replication:scramuser:scram-secret\n", cluster.port))
        .expect("write pgpass");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut from_file = AgentSetup::new(&base.join("pgpass"), cluster.url("scramuser"));
    from_file.env.push(("HOME".into(), home.display().to_string()));
    init_ok(&from_file);

    // Secrets never reach output: not in the daemon's log, not in status, not in errors.
    let running = md5.spawn();
    let lsn = cluster.switch_wal();
    wait_archived(&md5, lsn);
    let log = running.log_text();
    assert!(running.stop(), "agent did not stop cleanly");
    assert!(log.contains("streaming") && !log.contains("md5-secret"), "{log}");
    let output = md5.run_command(&["status", "--json"]);
    assert!(!String::from_utf8_lossy(&output.stdout).contains("md5-secret"));
    let wrong = AgentSetup::new(
        &base.join("wrong"),
        format!("postgresql://md5user:not-the-secret@127.0.0.1:{}/postgres", cluster.port),
    );
    let output = wrong.run_command(&["init"]);
    assert!(!output.status.success());
    assert!(!stderr(&output).contains("not-the-secret"), "{}", stderr(&output));
}

#[test]
fn tls_require_verify_ca_and_verify_full() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let owner = if unsafe { libc::geteuid() } == 0 { Some(PG_USER_OS) } else { None };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ca = make_ca(&scratch.path().join("good"), "good", "IP:127.0.0.1", owner);
    let other = make_ca(&scratch.path().join("other"), "other", "IP:127.0.0.1", owner);
    let cluster = Cluster::start(ClusterOptions {
        ssl: Some((ca.server_cert.clone(), ca.server_key.clone())),
        hba: vec![
            "hostssl replication tlsuser 127.0.0.1/32 scram-sha-256".into(),
            "hostnossl replication tlsuser 127.0.0.1/32 reject".into(),
            "hostssl all tlsuser 127.0.0.1/32 scram-sha-256".into(),
        ],
        ..Default::default()
    });
    cluster.psql("CREATE ROLE tlsuser LOGIN REPLICATION PASSWORD 'tls-secret'");
    let base = cluster.dir.path();
    let url =
        |host: &str, params: &str| format!("postgresql://tlsuser:tls-secret@{host}:{}/postgres?{params}", cluster.port);
    let root = |ca: &tidemark_tests::tls::TestCa| ca.ca_cert.display().to_string();

    // require: encrypted (the server rejects anything else for this user).
    let require = AgentSetup::new(&base.join("require"), url("127.0.0.1", "sslmode=require"));
    init_ok(&require);
    // Streaming over TLS takes the receive loop's async path (every other
    // test streams over a plain socket, which the loop polls itself): the
    // WAL arrives byte for byte and the agent stops cleanly.
    streams_and_stops(&cluster, &require, "over_tls");
    let plain = AgentSetup::new(&base.join("plain"), url("127.0.0.1", "sslmode=disable"));
    let output = plain.run_command(&["init"]);
    assert!(!output.status.success() && stderr(&output).contains("pg_hba.conf"), "{}", stderr(&output));

    // verify-full with the right CA and a name in the certificate.
    init_ok(&AgentSetup::new(
        &base.join("full"),
        url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", root(&ca))),
    ));
    // verify-full with a CA that did not sign the server certificate.
    let wrong_ca = AgentSetup::new(
        &base.join("wrongca"),
        url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", root(&other))),
    );
    let output = wrong_ca.run_command(&["init"]);
    assert!(!output.status.success(), "a certificate from an unknown CA was accepted");
    assert!(stderr(&output).contains("TLS") && stderr(&output).contains("hint:"), "{}", stderr(&output));
    // A host name the certificate does not carry: verify-full refuses, verify-ca accepts.
    let wrong_name = AgentSetup::new(
        &base.join("wrongname"),
        url("localhost", &format!("sslmode=verify-full&sslrootcert={}", root(&ca))),
    );
    let output = wrong_name.run_command(&["init"]);
    assert!(!output.status.success(), "verify-full accepted a name not in the certificate");
    init_ok(&AgentSetup::new(
        &base.join("ca"),
        url("localhost", &format!("sslmode=verify-ca&sslrootcert={}", root(&ca))),
    ));
}

#[test]
fn streams_over_a_unix_socket() {
    // The receive loop polls a Unix socket as it does plain TCP: WAL arrives
    // byte for byte and the agent stops cleanly.
    let cluster =
        Cluster::start(ClusterOptions { hba: vec!["local replication postgres trust".into()], ..Default::default() });
    let agent = AgentSetup::new(
        &cluster.dir.path().join("unix"),
        format!("host={} port={} user=postgres dbname=postgres", cluster.dir.path().display(), cluster.port),
    );
    init_ok(&agent);
    streams_and_stops(&cluster, &agent, "over_unix");
}
