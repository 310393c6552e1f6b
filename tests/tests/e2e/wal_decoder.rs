//! The WAL decoder against pg_waldump, record by record, on WAL a real
//! server wrote for a workload that exercises what the audit reads.

use crate::common::SEGMENT_SIZE;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::TimelineId;
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};
use tidemark_tests::waldump;

/// Every kind of change the audit must understand, in one script.
fn workload() -> String {
    let mut copy_rows = String::new();
    for i in 0..3000 {
        copy_rows.push_str(&format!("copied {i}\t{i}\n"));
    }
    format!(
        r#"
CREATE TABLE ledger (id serial PRIMARY KEY, note text, amount int);
INSERT INTO ledger (note, amount) SELECT 'row ' || g, g FROM generate_series(1, 2000) g;
UPDATE ledger SET amount = amount + 1 WHERE id <= 100;
UPDATE ledger SET id = id + 100000 WHERE id > 1900;
DELETE FROM ledger WHERE id BETWEEN 200 AND 300;
BEGIN;
INSERT INTO ledger (note) VALUES ('kept');
SAVEPOINT a;
INSERT INTO ledger (note) VALUES ('rolled back');
ROLLBACK TO a;
SAVEPOINT b;
INSERT INTO ledger (note) VALUES ('kept in a subtransaction');
RELEASE b;
COMMIT;
BEGIN;
INSERT INTO ledger (note) VALUES ('aborted');
ROLLBACK;
COPY ledger (note, amount) FROM STDIN;
{copy_rows}\.
CREATE TABLE blobs (id int, payload text);
ALTER TABLE blobs ALTER payload SET STORAGE EXTERNAL;
INSERT INTO blobs SELECT g, repeat(md5(g::text), 3000) FROM generate_series(1, 20) g;
TRUNCATE blobs;
VACUUM FULL ledger;
SELECT pg_create_restore_point('before_migration');
BEGIN;
INSERT INTO ledger (note) VALUES ('prepared');
PREPARE TRANSACTION 'p1';
COMMIT PREPARED 'p1';
BEGIN;
INSERT INTO ledger (note) VALUES ('prepared, then rolled back');
PREPARE TRANSACTION 'p2';
ROLLBACK PREPARED 'p2';
CREATE UNLOGGED TABLE scratch (x int);
INSERT INTO scratch VALUES (1);
CREATE TEMP TABLE tmp (x int);
INSERT INTO tmp VALUES (1);
DROP TABLE scratch;
CHECKPOINT;
UPDATE ledger SET amount = 0 WHERE id < 50;
DO $$ BEGIN FOR i IN 1..100 LOOP BEGIN INSERT INTO ledger (note) VALUES ('s' || i); EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$;
INSERT INTO ledger (note) SELECT repeat('wide ', 1500) FROM generate_series(1, 400);
"#
    )
}

#[test]
fn decoder_agrees_with_pg_waldump_record_by_record() {
    let cluster = Cluster::start(ClusterOptions {
        conf: vec![
            "max_prepared_transactions = 5".into(),
            "wal_compression = zstd".into(),
            "wal_log_hints = on".into(),
        ],
        ..Default::default()
    });
    let start = cluster.switch_wal();
    cluster.pgbench_init(2);
    let mut bench = cluster.pgbench_spawn(&["-T", "3", "-c", "2"]);
    cluster.psql_file(&workload());
    assert!(bench.wait().expect("pgbench").success());
    let end = cluster.switch_wal();

    // Copies of the segments, as pg_waldump must not read a live pg_wal.
    let dir = cluster.dir.path().join("waldump");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let names: Vec<String> = (start.segment_no(SEGMENT_SIZE)..end.segment_no(SEGMENT_SIZE))
        .map(|segment_no| SegmentId { timeline: TimelineId(1), segment_no }.file_name(SEGMENT_SIZE))
        .collect();
    assert!(names.len() >= 2, "the workload should fill more than one segment, got {names:?}");
    for name in &names {
        std::fs::copy(cluster.wal_dir().join(name), dir.join(name)).expect("copy segment");
    }
    let (first, last) = (names.first().expect("first"), names.last().expect("last"));

    let theirs = waldump::parse_pg_waldump(&waldump::run_pg_waldump(&pg_bin(), &dir, first, last, &[]), SEGMENT_SIZE);
    let (ours, stop) = waldump::decode_with_tidemark(&dir, &names, start, SEGMENT_SIZE);
    assert!(theirs.len() > 10_000, "expected a sizeable workload, pg_waldump saw {} records", theirs.len());
    for (i, (mine, reference)) in ours.iter().zip(&theirs).enumerate() {
        let mut reference = reference.clone();
        if mine.kind.is_none() {
            reference.kind = None; // a type we do not name: the rest must still agree
        }
        assert_eq!(mine, &reference, "record {i} differs");
    }
    assert_eq!(ours.len(), theirs.len(), "record counts differ; our decoder stopped with {stop:?}");

    // The workload's landmarks were all seen.
    let kinds = |k: &str| ours.iter().filter(|f| f.kind.as_deref() == Some(k)).count();
    for kind in ["COMMIT", "ABORT", "COMMIT_PREPARED", "ABORT_PREPARED", "PREPARE", "MULTI_INSERT", "HOT_UPDATE"] {
        assert!(kinds(kind) > 0, "no {kind} record in the workload");
    }
    assert!(ours.iter().any(|f| f.restore_point.as_deref() == Some("before_migration")));
    assert!(ours.iter().any(|f| !f.subxacts.is_empty()), "no commit listed subtransactions");
    assert!(ours.iter().any(|f| f.blocks.iter().any(|b| b.image)), "no full-page image");
    assert!(ours.iter().any(|f| f.crosses_segment), "no record crossed a segment boundary");

    let their_stats = waldump::parse_stats(&waldump::run_pg_waldump(&pg_bin(), &dir, first, last, &["--stats"]));
    assert_eq!(waldump::stats_of(&ours), their_stats, "--stats totals differ");
}
