//! The WAL audit's speed: how fast our decoder reads WAL compared with
//! `pg_waldump` on the same segments, and how long `tidemark-restore timeline
//! --table` takes over a million indexed transactions. Prints figures;
//! asserts only that the runs succeeded.
//!
//!     cargo run -p tidemark-tests --bin bench-audit -- [transactions, default 1000000] [WAL MB, default 1024]
//!     cargo run -p tidemark-tests --bin bench-audit -- decode DIR [ours]   # only the decode comparison, on
//!                                                                        # DIR's segments (ours: no pg_waldump, to profile)
//!
//! The workload: that many one-row INSERT transactions into a small table
//! (pgbench with a custom script), then pgbench's TPC-B-like load until the
//! WAL since the start reaches the given size. The agent archives and
//! summarizes it all; the restore tool builds its audit cache from the
//! repository (timed once), then answers queries from the cache (timed).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_proto::segment::{SegmentId, WalFileName};
use tidemark_proto::wal::page::major_for_magic;
use tidemark_proto::wal::summary::{Naming, SummaryBuilder};
use tidemark_proto::wal::{self, WalReader};
use tidemark_proto::{Lsn, TimelineId};
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

const SEGMENT: u64 = 16 << 20;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("decode") {
        let dir = PathBuf::from(std::env::args().nth(2).expect("usage: bench-audit decode DIR"));
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).expect("read DIR").map(|e| e.expect("entry").path()).collect();
        files.sort();
        let name = |f: &PathBuf| f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let segment = |f: &PathBuf| match WalFileName::parse(&name(f), SEGMENT) {
            Ok(WalFileName::Segment(s)) => s,
            _ => panic!("{} is not a WAL segment", f.display()),
        };
        let (first, last) = (segment(&files[0]), segment(&files[files.len() - 1]));
        let with_waldump = std::env::args().nth(3).as_deref() != Some("ours");
        decode_comparison(&dir, first.start_lsn(SEGMENT), last.end_lsn(SEGMENT), with_waldump);
        return;
    }
    let transactions: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let wal_mb: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let cluster = Cluster::start(ClusterOptions {
        conf: vec![
            "max_wal_size = '4GB'".into(),
            // Keeps every segment in pg_wal for the decode comparison.
            format!("wal_keep_size = '{}MB'", wal_mb * 2 + 1024),
            // Many tiny transactions: their commits need not wait for a flush.
            "synchronous_commit = off".into(),
        ],
        ..Default::default()
    });
    cluster.pgbench_init(10);
    cluster.psql("CREATE TABLE tiny (id bigserial PRIMARY KEY, v int)");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let start = cluster.current_lsn();

    let began = Instant::now();
    let script = cluster.dir.path().join("tiny.sql");
    std::fs::write(&script, "INSERT INTO tiny (v) VALUES (1);\n").expect("write script");
    let clients = 4;
    let per_client = transactions.div_ceil(clients).to_string();
    let mut pgbench = cluster.pgbench_spawn(&[
        "-n",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-t",
        &per_client,
        "-f",
        script.to_str().expect("utf-8"),
    ]);
    assert!(pgbench.wait().expect("pgbench").success(), "pgbench with the one-row script failed");
    println!(
        "workload: {} one-row transactions in {:.0} s",
        per_client.parse::<u64>().unwrap_or(0) * clients,
        began.elapsed().as_secs_f64()
    );
    while cluster.current_lsn().0 - start.0 < wal_mb << 20 {
        let mut pgbench = cluster.pgbench_spawn(&["-n", "-T", "10", "-c", "4", "-j", "2"]);
        pgbench.wait().expect("pgbench");
    }
    let end = cluster.switch_wal();
    println!(
        "workload done: {:.0} MB of WAL in {:.0} s",
        (end.0 - start.0) as f64 / 1e6,
        began.elapsed().as_secs_f64()
    );
    wait_until("archive", Duration::from_secs(3600), || agent.archived_lsn().filter(|a| *a >= end));
    let last = SegmentId::containing(TimelineId(1), Lsn(end.0 - 1), SEGMENT);
    let last_summary = agent.repo.join("summaries").join(format!("{:08X}", 1)).join(last.file_name(SEGMENT));
    wait_until("summaries", Duration::from_secs(3600), || last_summary.exists().then_some(()));
    println!("agent: archived and summarized {:.0} s after the workload began", began.elapsed().as_secs_f64());
    running.stop();

    decode_comparison(&cluster.wal_dir(), Lsn(start.segment_start(SEGMENT).0), end, true);
    timeline_queries(&agent);
}

/// The segment files [from, to) in `dir`, in order.
fn segments(dir: &Path, from: Lsn, to: Lsn) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let segment = SegmentId::containing(TimelineId(1), at, SEGMENT);
        out.push(dir.join(segment.file_name(SEGMENT)));
        at = segment.end_lsn(SEGMENT);
    }
    out
}

fn decode_comparison(dir: &Path, from: Lsn, to: Lsn, with_waldump: bool) {
    let files = segments(dir, from, to);
    let bytes = files.len() as u64 * SEGMENT;
    let mb = bytes as f64 / 1e6;
    println!("\ndecoding {} segments ({mb:.0} MB) from {from} to {to}, page cache warm, best of 2:", files.len());
    // Warm the page cache so both sides read from memory.
    for file in &files {
        std::fs::read(file).expect("read segment");
    }

    let decoder_only = best_of_2(|| {
        let mut reader = WalReader::new(from, SEGMENT);
        let mut records = 0u64;
        let mut blocks = 0u64;
        for_each_chunk(&files, |data, major| {
            reader.feed(data, |raw| {
                if let Ok(record) = wal::decode(raw.lsn, raw.end, raw.bytes, major) {
                    records += 1;
                    blocks += record.blocks.len() as u64;
                }
            });
        });
        assert!(records > 0 && blocks > 0, "nothing decoded");
        records
    });
    println!(
        "  tidemark decoder (pages, CRC, records, blocks): {:>6.2} s  {:>6.0} MB/s  ({} records)",
        decoder_only.0,
        mb / decoder_only.0,
        decoder_only.1
    );
    let ours = best_of_2(|| {
        let mut reader = WalReader::new(from, SEGMENT);
        // As the agent: one summary per segment, of the records that start in it.
        let mut builder = SummaryBuilder::default();
        let mut builder_segment = from.segment_no(SEGMENT);
        let mut records = 0u64;
        let mut summarized = 0u64;
        for_each_chunk(&files, |data, major| {
            reader.feed(data, |raw| {
                if let Ok(record) = wal::decode(raw.lsn, raw.end, raw.bytes, major) {
                    let segment = raw.lsn.segment_no(SEGMENT);
                    if segment != builder_segment {
                        let done = std::mem::take(&mut builder);
                        summarized += done.finish(1, Lsn(builder_segment * SEGMENT), |_| Naming::Unknown).records;
                        builder_segment = segment;
                    }
                    builder.add(&record, major);
                    records += 1;
                }
            });
        });
        summarized += builder.finish(1, Lsn(builder_segment * SEGMENT), |_| Naming::Unknown).records;
        assert!(records > 0 && records == summarized, "every decoded record is in a summary");
        records
    });
    println!("  tidemark decoder + summaries (the agent's work): {:>6.2} s  {:>6.0} MB/s", ours.0, mb / ours.0);

    if !with_waldump {
        return;
    }
    let waldump = |extra: &[&str]| {
        best_of_2(|| {
            let status = Command::new(pg_bin().join("pg_waldump"))
                .arg("-p")
                .arg(dir)
                .args(["-s", &from.to_string(), "-e", &to.to_string()])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run pg_waldump");
            // pg_waldump exits 1 when it reaches the end it was given mid-record; the time is what counts.
            status.code().unwrap_or(-1)
        })
    };
    let full = waldump(&[]);
    println!("  pg_waldump (records printed):                    {:>6.2} s  {:>6.0} MB/s", full.0, mb / full.0);
    let stats = waldump(&["--stats"]);
    println!("  pg_waldump --stats (decodes, prints counts):     {:>6.2} s  {:>6.0} MB/s", stats.0, mb / stats.0);
    println!(
        "  decoder vs pg_waldump --stats: {:.2}x the speed; with summaries {:.2}x",
        stats.0 / decoder_only.0,
        stats.0 / ours.0
    );
}

/// Reads the segments in 256 kB pieces into one buffer and hands each to
/// `feed` (whole pages), with the PostgreSQL version from the first page: the
/// data is decoded while it is still in the CPU cache, as pg_waldump does with
/// its page reads.
fn for_each_chunk(files: &[PathBuf], mut feed: impl FnMut(&[u8], tidemark_proto::wal::page::PgMajor)) {
    let mut buffer = vec![0u8; 256 << 10];
    let mut major = None;
    for file in files {
        let mut handle = std::fs::File::open(file).expect("open segment");
        loop {
            let n = std::io::Read::read(&mut handle, &mut buffer).expect("read segment");
            if n == 0 {
                break;
            }
            assert_eq!(n % 8192, 0, "{}: a read that is not whole pages", file.display());
            let data = &buffer[..n];
            let major = *major.get_or_insert_with(|| {
                major_for_magic(u16::from_le_bytes([data[0], data[1]])).expect("a WAL page header")
            });
            feed(data, major);
        }
    }
}

fn best_of_2<T>(mut run: impl FnMut() -> T) -> (f64, T) {
    let mut best: Option<(f64, T)> = None;
    for _ in 0..2 {
        let began = Instant::now();
        let value = run();
        let seconds = began.elapsed().as_secs_f64();
        if best.as_ref().is_none_or(|(b, _)| seconds < *b) {
            best = Some((seconds, value));
        }
    }
    best.expect("two runs")
}

fn timeline_queries(agent: &AgentSetup) {
    let cache = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| -> (f64, String) {
        let began = Instant::now();
        let output = Command::new(bin("tidemark-restore"))
            .arg("--repo")
            .arg(agent.repo_url())
            .arg("timeline")
            .arg("--cache-dir")
            .arg(cache.path())
            .args(args)
            .output()
            .expect("run timeline");
        let seconds = began.elapsed().as_secs_f64();
        assert!(output.status.success(), "timeline {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        (seconds, String::from_utf8_lossy(&output.stdout).into_owned())
    };
    println!("\ntidemark-restore timeline (whole command: process start, cache open, query, output):");
    let (seconds, text) = run(&["--json", "--limit", "1"]);
    let all: serde_json::Value = serde_json::from_str(&text).expect("timeline json");
    println!(
        "  first run, builds the cache from the repository's summaries: {seconds:.1} s for {} transactions",
        all["matched"]
    );
    for (label, args) in [
        ("--table public.tiny (newest 1000 shown)", vec!["--table", "public.tiny"]),
        ("--table public.tiny --json", vec!["--table", "public.tiny", "--json"]),
        ("--table pgbench_accounts", vec!["--table", "pgbench_accounts"]),
        ("all tables (newest 1000 shown)", vec![]),
    ] {
        let best = (0..3).map(|_| run(&args)).min_by(|a, b| a.0.total_cmp(&b.0)).expect("three runs");
        let matched = best
            .1
            .lines()
            .find_map(|l| l.strip_prefix('(').and_then(|l| l.split(' ').next()).and_then(|n| n.parse::<u64>().ok()))
            .map(|older| format!(", {older} older not shown"))
            .unwrap_or_default();
        println!("  {label:<42} {:>6.0} ms (best of 3){matched}", best.0 * 1000.0);
    }
    let middle = all["transactions"][0]["xid"].as_u64().unwrap_or(1) / 2;
    let xid = run(&["--xid", &middle.to_string()]);
    println!("  {:<42} {:>6.0} ms", format!("--xid {middle}"), xid.0 * 1000.0);
}
