//! Base backup speed and size, in one run, on the same databases:
//! `tidemark-agent backup` (a fresh repository each time, so nothing is
//! reused), `pg_basebackup -Ft` with client-side zstd level 1, and pgBackRest
//! (zst level 1, process-max 2) to local disk. Two data sets: pgbench's own
//! (its filler columns are blank and compress about 22x) and the same with
//! the filler filled with random text (compresses like real data).
//! Tidemark also runs encrypted, and into S3 (s3s-fs on loopback, when
//! installed), so those costs show. Prints figures; asserts nothing. Needs pgbackrest (`./dev test` does not
//! install it: `apt-get install pgbackrest`).
//!
//!     cargo run -p tidemark-tests --bin bench-backup -- [scale, default 50]

use std::process::Command;
use tidemark_tests::agent::{have_s3_server, keygen, AgentSetup};
use tidemark_tests::benchmarks::{dir_size, run_timed, PgBackRest};
use tidemark_tests::cluster::{pg_bin, Cluster, ClusterOptions};
use tidemark_tests::s3::S3Server;

fn report(tool: &str, seconds: f64, data_bytes: u64, stored: u64) {
    println!(
        "  {tool:<32} {seconds:7.2} s  {:7.1} MB/s  stored {:7.1} MB",
        data_bytes as f64 / 1e6 / seconds,
        stored as f64 / 1e6
    );
}

fn run(command: &mut Command, what: &str) -> f64 {
    run_timed(command, what).0
}

fn measure(cluster: &Cluster, round: &str, s3: Option<&S3Server>) {
    cluster.psql("CHECKPOINT");
    let data_bytes: u64 = cluster.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").parse().expect("size");
    println!("{round}: {:.0} MB of databases", data_bytes as f64 / 1e6);
    let work = cluster.dir.path().join(format!("bench-{}", round.replace(' ', "-")));
    std::fs::create_dir_all(&work).expect("mkdir");

    // Tidemark, into a fresh repository.
    let agent = AgentSetup::new(&work.join("tidemark"), cluster.url("postgres"));
    agent.init();
    let seconds = run(&mut agent.command(&["backup", "--label", "bench"]), "tidemark-agent backup");
    report("tidemark-agent backup", seconds, data_bytes, dir_size(&agent.repo.join("backups")));
    // The same, encrypted: the cost of sealing every chunk.
    let key = work.join("bench.key");
    keygen(&key);
    let mut encrypted = AgentSetup::new(&work.join("tidemark-encrypted"), cluster.url("postgres"));
    encrypted.key_files = vec![key.clone()];
    encrypted.init();
    let seconds = run(&mut encrypted.command(&["backup", "--label", "bench"]), "tidemark-agent backup (encrypted)");
    report("tidemark-agent backup, encrypted", seconds, data_bytes, dir_size(&encrypted.repo.join("backups")));
    // Into S3 (s3s-fs on loopback), plain and encrypted.
    for (label, keyed) in [("tidemark-agent backup, s3s-fs", false), ("  ... s3s-fs, encrypted", true)] {
        let Some(s3) = s3 else { break };
        let prefix = format!("{}-{keyed}", round.replace(' ', "-"));
        let mut remote = AgentSetup::new(&work.join(&prefix), cluster.url("postgres"));
        remote.url = Some(s3.url(&prefix));
        remote.env.extend(s3.env());
        if keyed {
            remote.key_files = vec![key.clone()];
        }
        remote.init();
        let seconds = run(&mut remote.command(&["backup", "--label", "bench"]), label);
        report(label, seconds, data_bytes, dir_size(&s3.object_path(&prefix, "backups")));
    }

    // pg_basebackup, tar format, client-side zstd level 1, no WAL.
    let target = work.join("basebackup");
    let seconds = run(
        Command::new(pg_bin().join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-Ft",
                "-X",
                "none",
                "-c",
                "fast",
                "--compress=client-zstd:1",
                "-D",
            ])
            .arg(&target)
            .arg("-p")
            .arg(cluster.port.to_string()),
        "pg_basebackup",
    );
    report("pg_basebackup -Ft client-zstd:1", seconds, data_bytes, dir_size(&target));

    // pgBackRest: zst level 1, two processes, local repository.
    let pgbr = PgBackRest::create(cluster, &work.join("pgbackrest"));
    let pgbackrest = |args: &[&str]| pgbr.command(cluster, args);
    let seconds = run(&mut pgbackrest(&["--type=full", "backup"]), "pgbackrest backup");
    report("pgbackrest zst-1 process-max 2", seconds, data_bytes, dir_size(&pgbr.dir.join("repo").join("backup")));
}

fn main() {
    let scale: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let cluster = Cluster::start(ClusterOptions {
        conf: vec!["archive_mode = on".into(), "archive_command = '/bin/true'".into(), "max_wal_size = '4GB'".into()],
        ..Default::default()
    });
    cluster.pgbench_init(scale);
    let s3 = have_s3_server().then(S3Server::start);
    if s3.is_none() {
        println!("(s3s-fs is not installed: no S3 lines; `./dev test` installs it)");
    }
    measure(&cluster, &format!("pgbench scale {scale}"), s3.as_ref());
    // Random text in the filler columns: compresses like real data.
    cluster.psql("UPDATE pgbench_accounts SET filler = md5(random()::text) || md5(random()::text) || substr(md5(random()::text), 1, 20)");
    cluster.psql("VACUUM FULL pgbench_accounts");
    measure(&cluster, &format!("pgbench scale {scale} with random filler"), s3.as_ref());
}
