//! Undoing one bad transaction in the live database without losing later
//! work, on an ORM-shaped schema (text keys, an enum, `timestamp(3)`,
//! foreign keys with ON DELETE CASCADE): `extract --with-dependents --into`
//! brings back a hard-deleted user with everything that cascaded (Scenario
//! A); `repair --xid` undoes a bad UPDATE row by row, leaving rows changed
//! since as conflicts (Scenario B); an INSERT-only transaction, a TOASTed
//! value, and a table without a key.

use crate::common::*;
use crate::restore::Restorer;
use std::collections::BTreeMap;
use tidemark_tests::agent::{AgentSetup, RunningAgent};
use tidemark_tests::cluster::{Cluster, ClusterOptions};

const SCHEMA: &str = r#"
CREATE TYPE "Status" AS ENUM ('present', 'absent', 'late', 'excused');
CREATE TABLE "User" (id text PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
                     "createdAt" timestamp(3) NOT NULL DEFAULT now());
CREATE TABLE "StudentProfile" (id text PRIMARY KEY,
                     "userId" text NOT NULL REFERENCES "User"(id) ON DELETE CASCADE, grade int NOT NULL);
CREATE TABLE "AttendanceRecord" (id text PRIMARY KEY,
                     "studentId" text NOT NULL REFERENCES "StudentProfile"(id) ON DELETE CASCADE,
                     day date NOT NULL, status "Status", "updatedAt" timestamp(3) NOT NULL DEFAULT now());
INSERT INTO "User" (id, email, name)
    SELECT 'u' || lpad(g::text, 2, '0'), 'student' || lpad(g::text, 2, '0') || '@school.test', 'Student ' || g
    FROM generate_series(1, 30) g;
INSERT INTO "StudentProfile" (id, "userId", grade) SELECT 'p' || substr(id, 2), id, 9 FROM "User";
INSERT INTO "AttendanceRecord" (id, "studentId", day, status)
    SELECT 'a' || substr(p.id, 2) || '-' || d, p.id, date '2026-09-01' + d, 'present'
    FROM "StudentProfile" p, generate_series(0, 19) d;
"#;

/// Starts a cluster with the schema and an agent streaming it (as the
/// PostgreSQL OS user, so the restore tool can read what it writes).
fn setup() -> (Cluster, AgentSetup, RunningAgent) {
    setup_with(|_| {})
}

fn setup_with(before_backup: impl Fn(&Cluster)) -> (Cluster, AgentSetup, RunningAgent) {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql_file(SCHEMA);
    before_backup(&cluster);
    let agent = AgentSetup::init_as_pg_user(&cluster.dir.path().join("agent"), cluster.url("postgres"));
    let running = agent.spawn();
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    (cluster, agent, running)
}

/// Runs `sql` in one transaction and returns its xid.
fn transaction(cluster: &Cluster, sql: &str) -> String {
    let out = cluster.psql_file(&format!("BEGIN;\n{sql}\nSELECT 'xid=' || txid_current();\nCOMMIT;\n"));
    out.lines().find_map(|l| l.strip_prefix("xid=")).expect("the xid").trim().to_string()
}

/// Every row of a table as text, by id.
fn rows(cluster: &Cluster, table: &str) -> BTreeMap<String, String> {
    cluster
        .psql(&format!("SELECT t.id || ' ' || t::text FROM {table} t"))
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(id, row)| (id.to_string(), row.to_string())))
        .collect()
}

/// Normal attendance work: new rows, for every student but number 7
/// (the one the first test deletes).
fn work(cluster: &Cluster, from: u32, count: u32) {
    let mut script = String::new();
    for i in from..from + count {
        let student = match i % 29 + 1 {
            s if s >= 7 => s + 1,
            s => s,
        };
        script.push_str(&format!(
            "INSERT INTO \"AttendanceRecord\" (id, \"studentId\", day, status) VALUES ('new-{i}', 'p{student:02}', date '2026-10-01' + {i}, 'present');\n"
        ));
    }
    cluster.psql_file(&script);
}

/// Waits until the repository holds everything written so far.
fn archive_all(cluster: &Cluster, agent: &AgentSetup) {
    let lsn = cluster.current_lsn();
    wait_archived(agent, lsn);
}

fn restorer(agent: &AgentSetup, cluster: &Cluster) -> (Restorer, tempfile::TempDir, String) {
    let restorer = Restorer::new(agent, cluster.dir.path());
    let (dir, _) = Restorer::target_dir();
    let cache = dir.path().join("cache").display().to_string();
    (restorer, dir, cache)
}

#[test]
fn extract_brings_back_a_deleted_user_with_what_cascaded() {
    let (cluster, agent, _running) = setup();
    work(&cluster, 0, 20);
    let user = "student07@school.test";
    let before: Vec<BTreeMap<String, String>> =
        ["\"User\"", "\"StudentProfile\"", "\"AttendanceRecord\""].iter().map(|t| rows(&cluster, t)).collect();
    let deleted = transaction(&cluster, &format!("DELETE FROM \"User\" WHERE email = '{user}';"));
    work(&cluster, 20, 20);
    cluster.psql("UPDATE \"AttendanceRecord\" SET status = 'late' WHERE id = 'a01-3'");
    let after_work: Vec<BTreeMap<String, String>> =
        ["\"User\"", "\"StudentProfile\"", "\"AttendanceRecord\""].iter().map(|t| rows(&cluster, t)).collect();
    assert_eq!(after_work[2].len(), before[2].len() - 20 + 20, "the cascade removed the user's 20 records");
    archive_all(&cluster, &agent);
    let (restorer, dir, cache) = restorer(&agent, &cluster);

    // To files: CSV of one table, SQL and COPY of the user with dependents.
    let csv = dir.path().join("users.csv");
    let output = restorer.run(&[
        "extract",
        "--table",
        "\"User\"",
        "--before-xid",
        &deleted,
        "--to",
        csv.to_str().expect("utf-8"),
        "--format",
        "csv",
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(text.lines().count(), 31, "a header and 30 users: {text}");
    assert!(text.starts_with("id,email,name,createdAt\n") && text.contains(user), "{text}");
    let sql = dir.path().join("user.sql");
    let output = restorer.run(&[
        "extract",
        "--table",
        "\"User\"",
        "--where",
        &format!("email = '{user}'"),
        "--with-dependents",
        "--before-xid",
        &deleted,
        "--to",
        sql.to_str().expect("utf-8"),
        "--format",
        "sql",
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let script = std::fs::read_to_string(&sql).expect("sql");
    assert_eq!(script.matches("INSERT INTO").count(), 22, "user, profile, 20 records: {script}");
    assert!(script.find("INSERT INTO public.\"User\"") < script.find("INSERT INTO public.\"StudentProfile\""));

    // Into the live database: exactly what was deleted comes back.
    let into = cluster.url("postgres");
    let output = restorer.run(&[
        "extract",
        "--table",
        "\"User\"",
        "--where",
        &format!("email = '{user}'"),
        "--with-dependents",
        "--before-xid",
        &deleted,
        "--into",
        &into,
        "--cache-dir",
        &cache,
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["tables"][0], serde_json::json!(["public.\"User\"", 1, 0]), "{report}");
    assert_eq!(report["tables"][2], serde_json::json!(["public.\"AttendanceRecord\"", 20, 0]), "{report}");
    for (index, table) in ["\"User\"", "\"StudentProfile\"", "\"AttendanceRecord\""].iter().enumerate() {
        let now = rows(&cluster, table);
        for (id, row) in &before[index] {
            if !after_work[index].contains_key(id) {
                assert_eq!(now.get(id), Some(row), "{table} {id} came back byte for byte");
            }
        }
        for (id, row) in &after_work[index] {
            assert_eq!(now.get(id), Some(row), "{table} {id}, written after the deletion, is untouched");
        }
    }
    // Again: everything is present, nothing is inserted twice.
    let output = restorer.run(&[
        "extract",
        "--table",
        "\"User\"",
        "--where",
        &format!("email = '{user}'"),
        "--with-dependents",
        "--before-xid",
        &deleted,
        "--into",
        &into,
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("0 rows inserted, 20 already present"));

    // --latest (no target to pause at: the scratch copy promotes) sees the user back.
    archive_all(&cluster, &agent);
    let latest = dir.path().join("latest.csv");
    let output = restorer.run(&[
        "extract",
        "--table",
        "\"User\"",
        "--latest",
        "--to",
        latest.to_str().expect("utf-8"),
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&latest).expect("csv").lines().count(), 31);

    // A table without a key cannot be merged into.
    cluster.psql("CREATE TABLE nokey (a int, b text); INSERT INTO nokey VALUES (1, 'x')");
    archive_all(&cluster, &agent);
    restorer.refused(
        &["extract", "--table", "nokey", "--latest", "--into", &into, "--cache-dir", &cache],
        "--all-columns-key",
    );
}

/// SQL in database `other` of the cluster.
fn psql_other(cluster: &Cluster, sql: &str) {
    let url =
        format!("{}/other", cluster.url("postgres").strip_suffix("/postgres").expect("a URL ending in the database"));
    let output = std::process::Command::new(tidemark_tests::cluster::pg_bin().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-c", sql])
        .output()
        .expect("psql");
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn repair_undoes_one_transaction_and_leaves_later_work() {
    // Another database, which a repair of database postgres never fetches.
    let (cluster, agent, _running) = setup_with(|cluster| {
        cluster.psql("CREATE DATABASE other");
        psql_other(
            cluster,
            "CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS t FROM generate_series(1, 500000) g",
        );
    });
    // Written after the backup: replay rewrites the pages it left out from their full-page images.
    psql_other(&cluster, "UPDATE filler SET t = 'changed' WHERE id % 1000 = 0");
    cluster.psql(
        "CREATE TABLE doc (id int PRIMARY KEY, body text); \
         INSERT INTO doc SELECT 1, string_agg(md5(random()::text), '') FROM generate_series(1, 4000)",
    );
    let body_md5 = cluster.psql("SELECT md5(body) || ' ' || length(body) FROM doc");
    work(&cluster, 0, 10);
    let before = rows(&cluster, "\"AttendanceRecord\"");
    // The accident: hundreds of statuses set to NULL.
    let bad = transaction(&cluster, "UPDATE \"AttendanceRecord\" SET status = NULL WHERE day < date '2026-09-15';");
    let touched: Vec<String> = before
        .keys()
        .filter(|id| {
            id.starts_with('a') && id.split('-').nth(1).is_some_and(|d| d.parse::<u32>().is_ok_and(|d| d < 14))
        })
        .cloned()
        .collect();
    assert_eq!(touched.len(), 420);
    // Later work: some of the same rows changed again, new rows, others updated.
    cluster.psql(
        "UPDATE \"AttendanceRecord\" SET status = 'late' WHERE id IN ('a03-2', 'a05-7', 'a11-0', 'a20-13', 'a29-5')",
    );
    cluster.psql("UPDATE \"AttendanceRecord\" SET status = 'excused' WHERE id = 'a02-18'");
    work(&cluster, 10, 10);
    let toast = transaction(&cluster, "UPDATE doc SET body = 'short';");
    let inserted = transaction(
        &cluster,
        "INSERT INTO \"User\" (id, email, name) SELECT 'x' || g, 'x' || g || '@t', 'X' FROM generate_series(1, 5) g;",
    );
    cluster.psql("CREATE TABLE nokey (a int, b text); INSERT INTO nokey VALUES (1, 'x')");
    let nokey = transaction(&cluster, "UPDATE nokey SET b = 'y';");
    archive_all(&cluster, &agent);
    let later = rows(&cluster, "\"AttendanceRecord\"");
    let (restorer, _dir, cache) = restorer(&agent, &cluster);
    let into = cluster.url("postgres");

    // The dry run: exactly the bad transaction's rows, the conflicts named, nothing changed.
    let output = restorer.run(&["repair", "--xid", &bad, "--dry-run", "--into", &into, "--cache-dir", &cache]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(text.contains(&format!("transaction {bad} (committed ")), "{text}");
    assert!(text.contains(": 415 rows to put back, 5 conflicts, 0 already as before"), "{text}");
    assert!(text.contains("id=a03-2: updated again after transaction"), "{text}");
    assert!(text.contains("set back status: NULL -> 'present'"), "{text}");
    assert_eq!(text.matches("\nUPDATE public.\"AttendanceRecord\" SET").count(), 415, "{text}");
    let left_out: f64 = text
        .split("MB fetched, ")
        .nth(1)
        .and_then(|rest| rest.split(" MB of other databases left out").next())
        .and_then(|mb| mb.parse().ok())
        .unwrap_or_else(|| panic!("the scratch restore left database other out: {text}"));
    assert!(left_out > 20.0, "{left_out} MB of database other left out");
    assert_eq!(rows(&cluster, "\"AttendanceRecord\""), later, "a dry run changes nothing");

    // Apply: every other row back as before the accident, later work kept.
    let output = restorer.run(&["repair", "--xid", &bad, "--apply", "--into", &into, "--cache-dir", &cache]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout)
        .contains("0 rows inserted back, 415 updated back, 0 deleted; 5 conflicts left"));
    let now = rows(&cluster, "\"AttendanceRecord\"");
    assert_eq!(now.len(), later.len(), "no row added or lost");
    for (id, row) in &now {
        let conflicted = ["a03-2", "a05-7", "a11-0", "a20-13", "a29-5"].contains(&id.as_str());
        if touched.contains(id) && !conflicted {
            assert_eq!(Some(row), before.get(id), "{id} is as before the accident");
        } else {
            assert_eq!(Some(row), later.get(id), "{id} is as later work left it");
        }
    }
    assert_eq!(cluster.psql("SELECT count(*) FROM \"AttendanceRecord\" WHERE status IS NULL"), "0");
    // Again, overwriting the conflicts: only those five change, to their values before the accident.
    let output = restorer.run(&[
        "repair",
        "--xid",
        &bad,
        "--apply",
        "--on-conflict",
        "ours",
        "--into",
        &into,
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.contains(": 5 rows to put back, 0 conflicts, 415 already as before"), "{text}");
    let overwritten = rows(&cluster, "\"AttendanceRecord\"");
    for id in ["a03-2", "a05-7", "a11-0", "a20-13", "a29-5"] {
        assert_eq!(overwritten.get(id), before.get(id), "{id} overwritten with its value before the accident");
    }

    // A TOASTed value comes back whole.
    let output = restorer.run(&["repair", "--xid", &toast, "--apply", "--into", &into, "--cache-dir", &cache]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(cluster.psql("SELECT md5(body) || ' ' || length(body) FROM doc"), body_md5);

    // An INSERT-only transaction: exactly its rows are deleted.
    let output = restorer.run(&["repair", "--xid", &inserted, "--apply", "--into", &into, "--cache-dir", &cache]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("0 rows inserted back, 0 updated back, 5 deleted"));
    assert_eq!(cluster.psql("SELECT count(*) FROM \"User\""), "30");

    // No key: refused, naming the way out.
    restorer.refused(
        &["repair", "--xid", &nokey, "--dry-run", "--into", &into, "--cache-dir", &cache],
        "--all-columns-key",
    );
    let output = restorer.run(&[
        "repair",
        "--xid",
        &nokey,
        "--apply",
        "--all-columns-key",
        "--into",
        &into,
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(cluster.psql("SELECT b FROM nokey"), "x");
}

/// Values PostgreSQL's escape syntax would misread: a backslash at the end
/// of a value, a key ending in one, a quote after one, and a value that,
/// were the backslash before it taken as an escape, would end the INSERT
/// and drop `canary`.
const QUIRKS: &str = r#"
CREATE TABLE canary (x int);
CREATE SEQUENCE quirk_seq;
CREATE TABLE quirk (id text PRIMARY KEY, a text, b text);
INSERT INTO quirk VALUES
    ($$q1$$, $$\$$, $$, NULL);DROP TABLE canary;--$$),
    ($$q2\$$, $$it's\$$, $$\'$$),
    ($$q3$$, $$\\ two$$, NULL);
"#;

#[test]
fn backslashes_round_trip_on_a_server_without_standard_conforming_strings() {
    let conf = vec!["standard_conforming_strings = off".to_string()];
    let cluster = Cluster::start(ClusterOptions { conf, ..Default::default() });
    cluster.psql_file(QUIRKS);
    let agent = AgentSetup::init_as_pg_user(&cluster.dir.path().join("agent"), cluster.url("postgres"));
    let _running = agent.spawn();
    let output = agent.run_command(&["backup"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    let before = rows(&cluster, "quirk");
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(before["q1"].contains(r#""\\""#), "{before:?}");
    let (restorer, dir, cache) = restorer(&agent, &cluster);
    let into = cluster.url("postgres");

    // repair --apply writes the old values (and finds the rows by keys) with backslashes.
    let bad = transaction(&cluster, "UPDATE quirk SET a = 'changed', b = 'changed';");
    archive_all(&cluster, &agent);
    let output = restorer.run(&["repair", "--xid", &bad, "--apply", "--into", &into, "--cache-dir", &cache]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("0 rows inserted back, 3 updated back, 0 deleted"));
    assert_eq!(rows(&cluster, "quirk"), before, "repair put the values back unchanged");

    // extract --into inserts them (a restore point named with a backslash and quotes marks this state).
    let point = r"before 'quirks' \";
    cluster.psql(&format!("SELECT pg_create_restore_point($${point}$$)"));
    let deleted = transaction(&cluster, "DELETE FROM quirk;");
    archive_all(&cluster, &agent);
    let output = restorer.run(&[
        "extract",
        "--table",
        "quirk",
        "--before-xid",
        &deleted,
        "--into",
        &into,
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(rows(&cluster, "quirk"), before, "extract --into inserted the values unchanged");

    // --format sql, restored to the restore point (its name goes into
    // postgresql.auto.conf), and the file run by psql on this server.
    let sql = dir.path().join("quirk.sql");
    let output = restorer.run(&[
        "extract",
        "--table",
        "quirk",
        "--name",
        point,
        "--to",
        sql.to_str().expect("utf-8"),
        "--format",
        "sql",
        "--cache-dir",
        &cache,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    cluster.psql("DELETE FROM quirk");
    cluster.psql_file(&std::fs::read_to_string(&sql).expect("the SQL file"));
    assert_eq!(rows(&cluster, "quirk"), before, "the SQL file inserted the values unchanged");
    assert_eq!(cluster.psql("SELECT count(*) FROM canary"), "0", "the canary table is still there");

    // --where runs read-only, even on a scratch copy that promoted (--latest);
    // the rows just loaded are archived, so the condition is evaluated.
    archive_all(&cluster, &agent);
    let output = restorer.run(&[
        "extract",
        "--table",
        "quirk",
        "--latest",
        "--where",
        "nextval('quirk_seq') > 0",
        "--to",
        dir.path().join("seq.csv").to_str().expect("utf-8"),
        "--cache-dir",
        &cache,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("read-only transaction"), "{}", stderr(&output));
    assert!(!dir.path().join("seq.csv").exists(), "nothing written");
}
