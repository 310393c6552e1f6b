//! What a backup after a change costs, in one run on the same database
//! states: Tidemark's block-level incremental (`backup`; on 13–16 both
//! ways of reading: only the changed blocks over SQL, the default, and every
//! file over BASE_BACKUP, into a copy of the repository), its file-level
//! backup (chunk reuse only: `--max-incremental-chain 0`, into a copy of
//! the repository made after the full backup), and pgBackRest's full and
//! incremental (file-level; block incremental needs pgBackRest 2.46+ with
//! bundling, which Debian 12's 2.45 lacks). After a full backup of pgbench
//! scale N: 5 s of `pgbench -c 4`, then a one-row update, then a hot spot
//! (1 % of the accounts updated three times); each backup is against the
//! one before it. Prints stored bytes (and their share of the full
//! backup's), bytes read from the server and wall time. Then `restore
//! --delta` onto a copy restored before a minute of pgbench and one more
//! backup, against a fresh restore of the same target (files written, no
//! recovery: what --delta changes). Asserts nothing.
//! Needs pgbackrest (`apt-get install pgbackrest`).
//!
//!     cargo run -p tidemark-tests --bin bench-incremental -- [scale, default 30] [random] [pg17 | pg17-nosummaries]
//!
//! `random` fills pgbench's filler column with random text first (pgbench's
//! own blank filler compresses about 38x, so its primary key index, whose
//! pages nearly all change under random updates, dominates the stored bytes).
//! `pg17` runs npm's PostgreSQL 17 with summarize_wal on, so increments read
//! only changed blocks (`BASE_BACKUP … INCREMENTAL`); `pg17-nosummaries`
//! the same server with it off, so they read every file: the two runs
//! compare the paths. pgBackRest 2.45 does not know 17 and is left out there.

use std::path::Path;
use tidemark_tests::agent::bin;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::benchmarks::{as_pg, is_root, run_timed, PgBackRest};
use tidemark_tests::cluster::{chown, PG_USER_OS};
use tidemark_tests::cluster::{Cluster, ClusterOptions};

/// A change to the database, and what to call it.
type Scenario<'a> = (&'a str, Box<dyn Fn() + 'a>);

/// One backup's figures.
struct Figures {
    seconds: f64,
    read: u64,
    stored: u64,
}

fn tidemark(agent: &AgentSetup, args: &[&str]) -> Figures {
    let mut all = vec!["backup", "--json"];
    all.extend_from_slice(args);
    let (seconds, output) = run_timed(&mut agent.command(&all), "tidemark-agent backup");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    // What the agent says about the blocks it stored, or why the backup is full.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.contains("relation blocks stored")
            || line.contains("full backup:")
            || line.contains("the server sent only")
        {
            println!("    {}", line.split("INFO").last().unwrap_or(line).trim());
        }
    }
    let number = |field: &str| report[field].as_u64().expect("a byte count");
    // What the server sent: every file over BASE_BACKUP, or only the changed
    // blocks of relation segments (13–16 over SQL, 17+ with summarize_wal).
    Figures { seconds, read: number("read_bytes"), stored: number("stored_bytes") }
}

fn pgbackrest(cluster: &Cluster, stanza: &PgBackRest, kind: &str) -> Figures {
    let (seconds, _) =
        run_timed(&mut stanza.command(cluster, &[&format!("--type={kind}"), "backup"]), "pgbackrest backup");
    let (_, output) = run_timed(&mut stanza.command(cluster, &["--output=json", "info"]), "pgbackrest info");
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("pgbackrest info JSON");
    let last = info[0]["backup"].as_array().and_then(|b| b.last()).cloned().expect("a pgbackrest backup");
    // `delta`: bytes of the files this backup copied; the repository's delta: what it stored.
    Figures {
        seconds,
        read: last["info"]["delta"].as_u64().unwrap_or(0),
        stored: last["info"]["repository"]["delta"].as_u64().unwrap_or(0),
    }
}

fn print(label: &str, figures: &Figures, full_stored: u64) {
    println!(
        "  {label:<46} {:7.2} s  read {:8.1} MB  stored {:8.2} MB  ({:6.2} % of the full backup's)",
        figures.seconds,
        figures.read as f64 / 1e6,
        figures.stored as f64 / 1e6,
        100.0 * figures.stored as f64 / full_stored.max(1) as f64
    );
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("run cp");
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let random = args.iter().any(|a| a == "random");
    let summaries = args.iter().any(|a| a == "pg17");
    let pg17 = summaries || args.iter().any(|a| a == "pg17-nosummaries");
    let mut conf =
        vec!["archive_mode = on".into(), "archive_command = '/bin/true'".into(), "max_wal_size = '4GB'".into()];
    if pg17 {
        conf.push(format!("summarize_wal = {}", if summaries { "on" } else { "off" }));
    }
    let server_bin = pg17.then(|| tidemark_tests::cluster::server_bin_for(17));
    let cluster = Cluster::start(ClusterOptions { conf, server_bin, ..Default::default() });
    cluster.pgbench_init(scale);
    if random {
        cluster.psql("UPDATE pgbench_accounts SET filler = md5(random()::text) || md5(random()::text) || substr(md5(random()::text), 1, 20)");
        cluster.psql("VACUUM FULL pgbench_accounts");
        // Frozen and all-visible now, so that no autovacuum rewrites pages
        // between the scenarios (it would show as changed blocks, rightly).
        cluster.psql("VACUUM (FREEZE, ANALYZE) pgbench_accounts");
    }
    cluster.psql("CHECKPOINT");
    let work = cluster.dir.path().join("bench-incremental");
    std::fs::create_dir_all(&work).expect("mkdir");
    // The block-level repository has its agent streaming: an incremental
    // backup needs the WAL since its base archived without a hole.
    let block = AgentSetup::new(&work.join("block"), cluster.url("postgres"));
    block.init();
    let streaming = block.spawn();
    let stanza = (!pg17).then(|| PgBackRest::create(&cluster, &work.join("pgbackrest")));

    let server = match (pg17, summaries) {
        (false, _) => "PostgreSQL 15",
        (true, true) => "PostgreSQL 17, summarize_wal on",
        (true, false) => "PostgreSQL 17, summarize_wal off",
    };
    println!("pgbench scale {scale}{} on {server}: full backups", if random { " with random filler" } else { "" });
    let full = tidemark(&block, &[]);
    print("tidemark full", &full, full.stored);
    // The file-level repository starts as a copy of the block-level one.
    let file = AgentSetup::new(&work.join("file"), cluster.url("postgres"));
    std::fs::create_dir_all(&file.repo).expect("mkdir");
    std::fs::create_dir_all(&file.state_dir).expect("mkdir");
    for entry in ["repository.json", "backups"] {
        copy_dir(&block.repo.join(entry), &file.repo.join(entry));
    }
    // 13–16: block-level increments that read every file over BASE_BACKUP
    // (the changed pages found by their LSNs), into another copy.
    let mut whole = AgentSetup::new(&work.join("whole"), cluster.url("postgres"));
    whole.env.push(("TIDEMARK_READ_CHANGED_BLOCKS".into(), "false".into()));
    if !pg17 {
        std::fs::create_dir_all(&whole.repo).expect("mkdir");
        std::fs::create_dir_all(&whole.state_dir).expect("mkdir");
        for entry in ["repository.json", "backups"] {
            copy_dir(&block.repo.join(entry), &whole.repo.join(entry));
        }
    }
    let pgbr_full = stanza.as_ref().map(|stanza| pgbackrest(&cluster, stanza, "full"));
    if let Some(figures) = &pgbr_full {
        print("pgbackrest full", figures, full.stored);
    }

    let hot_rows = scale * 1000;
    let scenarios: [Scenario; 3] = [
        (
            "after 5 s of pgbench -c 4",
            Box::new(|| {
                let mut pgbench = cluster.pgbench_spawn(&["-n", "-T", "5", "-c", "4", "-j", "2"]);
                assert!(pgbench.wait().expect("wait pgbench").success());
            }),
        ),
        (
            "after a one-row update",
            Box::new(|| {
                cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 4242");
            }),
        ),
        (
            "after a hot spot (1 % of rows, 3 times)",
            Box::new(|| {
                for _ in 0..3 {
                    cluster
                        .psql(&format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= {hot_rows}"));
                }
            }),
        ),
    ];
    for (label, change) in &scenarios {
        change();
        println!("{label}");
        let path = if pg17 { "block-level incremental" } else { "block-level, changed blocks over SQL" };
        print(&format!("tidemark {path}"), &tidemark(&block, &[]), full.stored);
        if !pg17 {
            print("tidemark block-level over BASE_BACKUP", &tidemark(&whole, &[]), full.stored);
        }
        print("tidemark file-level (chunk reuse)", &tidemark(&file, &["--max-incremental-chain", "0"]), full.stored);
        if let (Some(stanza), Some(pgbr_full)) = (&stanza, &pgbr_full) {
            print("pgbackrest incr (file-level)", &pgbackrest(&cluster, stanza, "incr"), pgbr_full.stored);
        }
    }
    println!("(targets: ≤ 40 % after 5 s of pgbench, ≤ 1 % after one row, ≤ 5 % after the hot spot)");
    stop_when_archived(&cluster, &block, streaming);
    delta_against_fresh(&cluster, &block, &work);
}

/// Stops the agent once the WAL written so far is in the repository, and
/// hands the repository to the server's OS user (the agent, running as
/// root, makes its directories owner-only), which runs the restores.
fn stop_when_archived(cluster: &Cluster, agent: &AgentSetup, running: tidemark_tests::agent::RunningAgent) {
    let end = cluster.switch_wal();
    tidemark_tests::wait::wait_until("the agent to archive the WAL", std::time::Duration::from_secs(300), || {
        agent.archived_lsn().is_some_and(|a| a >= end).then_some(())
    });
    assert!(running.stop(), "the agent did not stop cleanly");
    if is_root() {
        chown(&agent.repo, PG_USER_OS);
    }
}

/// `tidemark-restore restore --latest` (no --start) into `pgdata`; seconds.
fn restore(agent: &AgentSetup, exe: &Path, pgdata: &Path, extra: &[&str]) -> f64 {
    let mut command = as_pg(exe);
    command.arg("--repo").arg(agent.repo_url()).args(["restore", "--latest", "--pgdata"]).arg(pgdata).args(extra);
    run_timed(&mut command, "tidemark-restore restore").0
}

fn delta_against_fresh(cluster: &Cluster, agent: &AgentSetup, work: &Path) {
    let scratch = work.join("restores");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    let exe = scratch.join("tidemark-restore");
    std::fs::copy(bin("tidemark-restore"), &exe).expect("copy");
    if is_root() {
        chown(work, PG_USER_OS);
    }
    let copy = scratch.join("copy");
    let seconds = restore(agent, &exe, &copy, &[]);
    println!("restore --delta onto a copy a minute of pgbench -c 4 behind");
    println!("  {:<46} {seconds:7.2} s", "the copy (a fresh restore)");
    let streaming = agent.spawn();
    let mut pgbench = cluster.pgbench_spawn(&["-n", "-T", "60", "-c", "4", "-j", "2"]);
    assert!(pgbench.wait().expect("wait pgbench").success());
    tidemark(agent, &[]);
    stop_when_archived(cluster, agent, streaming);
    cluster.psql("CHECKPOINT");
    let delta = restore(agent, &exe, &copy, &["--delta"]);
    let fresh = restore(agent, &exe, &scratch.join("fresh"), &[]);
    println!("  {:<46} {delta:7.2} s", "restore --delta onto the copy");
    println!("  {:<46} {fresh:7.2} s  (delta / fresh {:.2})", "fresh restore of the same target", delta / fresh);
}
