//! Connections to a live server the restore tool did not start are libpq
//! connections (issue 34, item 1): a server that accepts the application's
//! role only over TLS with SCRAM, its certificate signed with SHA-384.
//! `extract --into` and `repair --into` reach it with verify-full and
//! channel binding required, with the password from `PGPASSWORD`, from a
//! password file, or from a service; with the default sslmode the session
//! is encrypted (the server refuses that role in plaintext and logs the TLS
//! session); a wrong CA is refused before anything is written. The agent's
//! replication and SQL sessions bind to the same SHA-384 certificate.

use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{chown, Cluster, ClusterOptions, PG_USER_OS};
use tidemark_tests::tls::{make_ca, make_ca_signed, make_client_cert};

const SECRET: &str = "app-secret-4417";

fn as_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A file only the restore tool's OS user may read (libpq ignores a password file others can read).
fn private_file(path: &std::path::Path, content: &str) {
    std::fs::write(path, content).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    if as_root() {
        chown(path, PG_USER_OS);
    }
}

#[test]
fn into_connections_are_libpq_connections() {
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let owner = as_root().then_some(PG_USER_OS);
    let ca = make_ca_signed(&scratch.path().join("good"), "good", "IP:127.0.0.1", owner, "sha384");
    let other = make_ca(&scratch.path().join("other"), "other", "IP:127.0.0.1", owner);
    let cluster = Cluster::start(ClusterOptions {
        ssl: Some((ca.server_cert.clone(), ca.server_key.clone())),
        hba: vec![
            "hostssl all app 127.0.0.1/32 scram-sha-256".into(),
            "hostssl replication app 127.0.0.1/32 scram-sha-256".into(),
            "hostnossl all app 127.0.0.1/32 reject".into(),
            "hostssl all certuser 127.0.0.1/32 cert".into(),
            "hostssl replication certuser 127.0.0.1/32 cert".into(),
            "hostnossl replication app 127.0.0.1/32 reject".into(),
        ],
        conf: vec!["log_connections = on".into(), format!("ssl_ca_file = '{}'", ca.ca_cert.display())],
        ..Default::default()
    });
    cluster.psql_file(&format!(
        "CREATE ROLE certuser LOGIN REPLICATION;
         CREATE ROLE app LOGIN REPLICATION PASSWORD '{SECRET}';
         CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 40) g;
         GRANT ALL ON items TO app;"
    ));
    let agent = AgentSetup::init_as_pg_user(&cluster.dir.path().join("agent"), cluster.url("postgres"));
    let _running = agent.spawn();
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    let deleted = transaction(&cluster, "DELETE FROM items WHERE id <= 3;");
    let updated = transaction(&cluster, "UPDATE items SET note = 'bad' WHERE id > 30;");
    wait_archived(&agent, cluster.current_lsn());

    let restorer = Restorer::new(&agent, cluster.dir.path());
    let (dir, _) = Restorer::target_dir();
    let cache = dir.path().join("cache").display().to_string();
    let root = |ca: &tidemark_tests::tls::TestCa| ca.ca_cert.display().to_string();
    let base = format!("postgresql://app@127.0.0.1:{}/postgres", cluster.port);
    let verified = format!("{base}?sslmode=verify-full&sslrootcert={}&channel_binding=require", root(&ca));
    let extract = |into: &str, env: &[(&str, &str)]| {
        restorer.run_env(
            &["extract", "--table", "items", "--before-xid", &deleted, "--into", into, "--cache-dir", &cache],
            env,
        )
    };
    let missing = || cluster.psql("SELECT count(*) FROM items WHERE id <= 3").trim().to_string();

    // A CA that did not sign the server's certificate: refused, nothing written.
    let wrong = format!("{base}?sslmode=verify-full&sslrootcert={}", root(&other));
    let output = extract(&wrong, &[("PGPASSWORD", SECRET)]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("error:") && text.contains("TLS") && text.contains("hint:"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert_eq!(missing(), "0");

    // verify-full, channel binding required over a SHA-384-signed
    // certificate, the password from PGPASSWORD.
    let output = extract(&verified, &[("PGPASSWORD", SECRET)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(missing(), "3", "the deleted rows are back");

    // The password from a password file (PGPASSFILE), matched on host, port, database and user.
    let passfile = scratch.path().join("pgpass");
    private_file(&passfile, &format!("127.0.0.1:{}:postgres:app:{SECRET}\n", cluster.port));
    let output = extract(&verified, &[("PGPASSFILE", passfile.to_str().expect("utf-8"))]);
    assert!(output.status.success(), "{}", stderr(&output));

    // Everything from a service: the name given as service= and as PGSERVICE.
    let services = scratch.path().join("services.conf");
    private_file(
        &services,
        &format!(
            "[live]\nhost=127.0.0.1\nport={}\ndbname=postgres\nuser=app\nsslmode=verify-full\nsslrootcert={}\n",
            cluster.port,
            root(&ca)
        ),
    );
    let service_env = [("PGSERVICEFILE", services.to_str().expect("utf-8")), ("PGPASSWORD", SECRET)];
    let output = extract("service=live", &service_env);
    assert!(output.status.success(), "{}", stderr(&output));
    let with_pgservice = [service_env[0], service_env[1], ("PGSERVICE", "live")];
    let output = restorer.run_env(
        &["repair", "--xid", &updated, "--dry-run", "--into", "channel_binding=require", "--cache-dir", &cache],
        &with_pgservice,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("bad"), "the dry run shows the rows to undo");

    // The default sslmode (prefer) against a server that offers TLS: the
    // session is encrypted — the server refuses this role in plaintext and
    // logs the TLS session it authorized.
    let output = extract(&base, &[("PGPASSWORD", SECRET)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let log = std::fs::read_to_string(&cluster.log).expect("server log");
    assert!(
        log.lines().any(|l| l.contains("connection authorized: user=app") && l.contains("SSL enabled")),
        "no TLS session of app in the server log"
    );
    assert!(!log.contains("no encryption"), "a plaintext attempt reached the server");

    // The agent's replication and SQL sessions bind to the SHA-384 certificate too.
    let bound = AgentSetup::new(
        &scratch.path().join("bound-agent"),
        format!(
            "postgresql://app:{SECRET}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}&channel_binding=require",
            cluster.port,
            root(&ca)
        ),
    );
    let output = bound.run_command(&["--slot", "bound", "init"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains(SECRET));

    // A client certificate instead of a password (the server's `cert`
    // method): sent from sslcert/sslkey; a key file others can read is refused.
    let (cert, key) = make_client_cert(&scratch.path().join("good"), "good", "certuser");
    let with_cert = |slot: &str| {
        AgentSetup::new(
            &scratch.path().join(slot),
            format!(
                "postgresql://certuser@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
                cluster.port,
                root(&ca),
                cert.display(),
                key.display()
            ),
        )
    };
    let output = with_cert("cert-agent").run_command(&["--slot", "by_cert", "init"]);
    assert!(output.status.success(), "{}", stderr(&output));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = with_cert("cert-agent-exposed").run_command(&["--slot", "by_cert_exposed", "init"]);
    let text = stderr(&output);
    assert!(!output.status.success() && text.contains("group or world access"), "{text}");
    drop(dir);
}

/// Runs `sql` in one transaction and returns its xid.
fn transaction(cluster: &Cluster, sql: &str) -> String {
    let out = cluster.psql_file(&format!("BEGIN;\n{sql}\nSELECT 'xid=' || txid_current();\nCOMMIT;\n"));
    out.lines().find_map(|l| l.strip_prefix("xid=")).expect("the xid").trim().to_string()
}
