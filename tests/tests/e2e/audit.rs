//! The WAL audit end to end: an ORM-style attendance schema, normal traffic,
//! a corrupting UPDATE and a hard delete; the timeline names both with exact
//! row counts and flags the corruption; a restore to just before it gives
//! back a whole table.

use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE "User" (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE "StudentProfile" (id serial PRIMARY KEY,
    "userId" int NOT NULL REFERENCES "User"(id) ON DELETE CASCADE, grade int);
CREATE TABLE "AttendanceRecord" (id serial PRIMARY KEY,
    "studentId" int NOT NULL REFERENCES "StudentProfile"(id) ON DELETE CASCADE,
    day date NOT NULL, status text);
INSERT INTO "User" (name) SELECT 'user ' || g FROM generate_series(1, 40) g;
INSERT INTO "StudentProfile" ("userId", grade) SELECT id, id % 12 FROM "User";
"#;

/// `n` attendance transactions, each one insert or one update, `pause` apart
/// (student 7 only until user 7 is deleted, at `from` 150).
pub(crate) fn attendance_traffic(cluster: &Cluster, from: u32, n: u32, pause: f64) {
    let mut script = String::new();
    for i in from..from + n {
        let student = match i % 40 + 1 {
            7 if from >= 150 => 8,
            s => s,
        };
        if i % 3 == 2 {
            script.push_str(&format!(
                "UPDATE \"AttendanceRecord\" SET status = 'late' WHERE id = (SELECT max(id) FROM \"AttendanceRecord\" WHERE \"studentId\" = {student});\n"
            ));
        } else {
            script.push_str(&format!(
                "INSERT INTO \"AttendanceRecord\" (\"studentId\", day, status) VALUES ({student}, date '2026-09-01' + {i}, 'present');\n"
            ));
        }
        script.push_str(&format!("SELECT pg_sleep({pause});\n"));
    }
    cluster.psql_file(&script);
}

/// Runs `sql` in one transaction and returns its xid.
pub(crate) fn transaction(cluster: &Cluster, sql: &str) -> u32 {
    let out = cluster.psql_file(&format!("BEGIN;\n{sql};\nSELECT txid_current();\nCOMMIT;\n"));
    out.lines().last().expect("xid").trim().parse().expect("xid number")
}

#[test]
fn attendance_corruption_is_found_and_restored_away() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql_file(SCHEMA);
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--label", "before the term"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));

    // Normal traffic for about a minute, with a segment switch in the middle.
    attendance_traffic(&cluster, 0, 90, 0.25);
    cluster.switch_wal();
    attendance_traffic(&cluster, 90, 60, 0.25);
    let before = cluster.psql("SELECT id || ':' || coalesce(status, 'NULL') FROM \"AttendanceRecord\" ORDER BY id");
    let present = cluster.psql("SELECT count(*) FROM \"AttendanceRecord\" WHERE status = 'present'");
    let bad_xid = transaction(&cluster, "UPDATE \"AttendanceRecord\" SET status = NULL WHERE status = 'present'");
    let user7_rows = cluster.psql(
        "SELECT count(*) FROM \"AttendanceRecord\" a JOIN \"StudentProfile\" s ON s.id = a.\"studentId\" WHERE s.\"userId\" = 7",
    );
    let delete_xid = transaction(&cluster, "DELETE FROM \"User\" WHERE id = 7");
    attendance_traffic(&cluster, 150, 30, 0.25);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);

    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let cache = scratch.path().join("audit-cache");
    let cache_arg = cache.to_str().expect("utf-8").to_string();
    let timeline = |args: &[&str]| -> String {
        let mut all = vec!["timeline", "--cache-dir", &cache_arg];
        all.extend_from_slice(args);
        let output = restorer.run(&all);
        assert!(output.status.success(), "timeline {args:?}: {}", stderr(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // The agent names tables once it has summarized the segment.
    let json: serde_json::Value =
        wait_until("the audit names the corrupting transaction", Duration::from_secs(120), || {
            let json: serde_json::Value =
                serde_json::from_str(&timeline(&["--table", "\"AttendanceRecord\"", "--json"])).expect("json");
            let named = json["transactions"].as_array().is_some_and(|t| {
                t.iter().any(|t| t["xid"] == bad_xid && t["tables"].as_array().is_some_and(|c| !c.is_empty()))
            });
            named.then_some(json)
        });
    assert!(running.stop(), "agent did not stop cleanly");

    let transactions = json["transactions"].as_array().expect("transactions");
    assert!(transactions.len() >= 150, "expected the attendance traffic, got {}", transactions.len());
    let bad = transactions.iter().find(|t| t["xid"] == bad_xid).expect("the corrupting transaction");
    assert_eq!(bad["status"], "committed");
    let changes = bad["tables"].as_array().expect("tables");
    assert_eq!(changes.len(), 1, "{bad}");
    let change = &changes[0];
    assert_eq!(change["table"], "public.\"AttendanceRecord\"");
    assert_eq!(change["updated"].as_u64(), Some(present.parse().expect("count")), "{bad}");
    assert_eq!((change["inserted"].as_u64(), change["deleted"].as_u64()), (Some(0), Some(0)));
    assert_eq!(change["unusual"], true, "the corrupting UPDATE is not flagged: {bad}");
    let flagged: Vec<_> = transactions.iter().filter(|t| t["unusual"] == true).map(|t| t["xid"].clone()).collect();
    assert_eq!(flagged, vec![serde_json::json!(bad_xid)], "only the corruption should be flagged");
    // Times and LSNs are in the stable form of ARCHITECTURE.md.
    assert!(bad["commit_time"].as_str().is_some_and(|t| t.contains('T') && (t.ends_with('Z') || t.contains('+'))));
    assert!(bad["lsn"].as_str().is_some_and(|l| l.contains('/')));

    // The hard delete cascades: one user, one profile, their attendance rows.
    let deleted: serde_json::Value =
        serde_json::from_str(&timeline(&["--xid", &delete_xid.to_string(), "--json"])).expect("json");
    let tables = deleted["transactions"][0]["tables"].as_array().expect("tables").clone();
    let count = |name: &str| tables.iter().find(|c| c["table"] == name).map(|c| c["deleted"].clone());
    assert_eq!(count("public.\"User\""), Some(serde_json::json!(1)), "{deleted}");
    assert_eq!(count("public.\"StudentProfile\""), Some(serde_json::json!(1)), "{deleted}");
    assert_eq!(count("public.\"AttendanceRecord\""), Some(serde_json::json!(user7_rows.parse::<u64>().expect("n"))));

    // The readable table flags it too; the per-minute view sums the rows.
    let table = timeline(&["--table", "\"AttendanceRecord\""]);
    assert!(table.lines().any(|l| l.contains(&bad_xid.to_string()) && l.contains("unusual")), "{table}");
    let per_minute = timeline(&["--table", "\"AttendanceRecord\"", "--per", "minute", "--json"]);
    let periods: serde_json::Value = serde_json::from_str(&per_minute).expect("json");
    let updated: u64 =
        periods["periods"].as_array().expect("periods").iter().map(|p| p["updated"].as_u64().unwrap_or(0)).sum();
    assert!(updated >= present.parse::<u64>().expect("n"));

    // --limit shows the newest transactions and counts the rest; the
    // per-minute view adds up all of them, whatever the limit.
    let limited: serde_json::Value =
        serde_json::from_str(&timeline(&["--table", "\"AttendanceRecord\"", "--json", "--limit", "5"])).expect("json");
    assert_eq!(limited["matched"].as_u64(), Some(transactions.len() as u64), "{limited}");
    assert_eq!(limited["shown"].as_u64(), Some(5));
    assert_eq!(limited["transactions"].as_array().expect("array")[..], transactions[transactions.len() - 5..]);
    let per_minute_limited: serde_json::Value = serde_json::from_str(&timeline(&[
        "--table",
        "\"AttendanceRecord\"",
        "--per",
        "minute",
        "--json",
        "--limit",
        "5",
    ]))
    .expect("json");
    assert_eq!(per_minute_limited, periods);

    // Restore to just before the corruption: whole table, user 7 still there.
    let (restored, report) = restorer.restore_and_start(&["--before-xid", &bad_xid.to_string()]);
    assert!(report["reached_lsn"].as_str().is_some(), "{report}");
    assert_eq!(restored.psql("SELECT count(*) FROM \"AttendanceRecord\" WHERE status IS NULL"), "0");
    assert_eq!(
        restored.psql("SELECT id || ':' || coalesce(status, 'NULL') FROM \"AttendanceRecord\" ORDER BY id"),
        before
    );
    assert_eq!(restored.psql("SELECT count(*) FROM \"User\" WHERE id = 7"), "1");
}
