//! Point-in-time restore from the repository alone: many targets checked row
//! by row against the source's commit timestamps, a named restore point, a
//! restore without the agent's state, and every refusal.

use crate::common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::cluster::{chown, free_port, Cluster, ClusterOptions, PG_USER_OS};
use tidemark_tests::wait::wait_until;
use time::format_description::well_known::Rfc3339;

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `tidemark-restore` as the PostgreSQL OS user (PostgreSQL will not
/// run as root), from a copy of the binary that user can execute.
pub struct Restorer {
    exe: PathBuf,
    /// A local repository the agent (as root) may still be writing to.
    local_repo: Option<PathBuf>,
    repo_url: String,
    key_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Restorer {
    pub fn new(agent: &AgentSetup, scratch: &Path) -> Restorer {
        let exe = scratch.join("tidemark-restore");
        tidemark_tests::agent::link_binary(&bin("tidemark-restore"), &exe);
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        if as_root() {
            if agent.url.is_none() {
                chown(&agent.repo, PG_USER_OS);
            }
            for key in &agent.key_files {
                chown(key, PG_USER_OS);
            }
        }
        let local_repo = (as_root() && agent.url.is_none()).then(|| agent.repo.clone());
        Restorer { exe, local_repo, repo_url: agent.repo_url(), key_args: agent.key_args(), env: agent.env.clone() }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// As [`Restorer::run`], with more environment variables (`PGPASSWORD`, `PGSERVICEFILE`, ...).
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        // The copy of the binary was open for writing in this process; a child
        // that another test thread forked meanwhile holds that descriptor until
        // it execs, and an exec of the copy in that window fails with ETXTBSY.
        // The window is short: try again a few times.
        for _ in 0..50 {
            match self.run_once(args, env) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {}
                Err(e) => panic!("run tidemark-restore: {e}"),
                // runuser reports it in its own words and exit status.
                Ok(output) if !output.status.success() && stderr(&output).contains("Text file busy") => {}
                Ok(output) => return output,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.run_once(args, env).expect("run tidemark-restore")
    }

    fn run_once(&self, args: &[&str], env: &[(&str, &str)]) -> std::io::Result<Output> {
        if let Some(repo) = &self.local_repo {
            // What a running agent wrote since `new` is root's and private:
            // hand it over too. Best effort: a staging file may vanish
            // while chown walks, and what it missed the next call takes.
            let _ =
                Command::new("chown").arg("-R").arg(PG_USER_OS).arg(repo).stderr(std::process::Stdio::null()).status();
        }
        let mut command = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", PG_USER_OS, "--"]).arg(&self.exe);
            c
        } else {
            Command::new(&self.exe)
        };
        command
            .arg("--repo")
            .arg(&self.repo_url)
            .args(&self.key_args)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .env_remove("TIDEMARK_KEY_FILE")
            .output()
    }

    /// Runs `args` and checks it was refused: exit 1, `needle` in the
    /// message, and a hint.
    pub fn refused(&self, args: &[&str], needle: &str) {
        let output = self.run(args);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains(needle) && text.contains("hint:"), "{args:?}: {text}");
    }

    /// A fresh directory for one restored cluster, owned by the server's user.
    pub fn target_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new().prefix("tidemark-restore-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        if as_root() {
            chown(dir.path(), PG_USER_OS);
        }
        let pgdata = dir.path().join("data");
        (dir, pgdata)
    }

    /// restore --start with `target_args`; returns the running server and the JSON report.
    pub fn restore_and_start(&self, target_args: &[&str]) -> (Cluster, serde_json::Value) {
        let (dir, pgdata) = Restorer::target_dir();
        let port = free_port();
        let port_text = port.to_string();
        let mut args = vec![
            "restore",
            "--pgdata",
            pgdata.to_str().expect("utf-8"),
            "--start",
            "--port",
            &port_text,
            "--json",
            "--wait-timeout",
            "300",
        ];
        args.extend_from_slice(target_args);
        let output = self.run(&args);
        let server = Cluster::adopt_running(dir, pgdata, port);
        assert!(output.status.success(), "restore {target_args:?} failed: {}", stderr(&output));
        (server, serde_json::from_slice(&output.stdout).expect("restore JSON"))
    }
}

/// The rows (id, note) of `ledger`, in id order.
pub fn rows(cluster: &Cluster, filter: &str) -> Vec<String> {
    let text = cluster.psql(&format!("SELECT id || ':' || note FROM ledger {filter} ORDER BY id"));
    text.lines().map(str::to_string).collect()
}

/// A workload of small commits, one at a time, `pause` seconds apart;
/// returns the WAL position after each commit, in order (row id i is element i-1).
pub fn commit_rows(cluster: &Cluster, from: u32, to: u32, pause: f64) -> Vec<String> {
    let mut script = String::new();
    for i in from..=to {
        script.push_str(&format!(
            "INSERT INTO ledger (note) VALUES ('row {i}');\nSELECT pg_current_wal_lsn();\nSELECT pg_sleep({pause});\n"
        ));
    }
    cluster.psql_file(&script).lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

#[test]
fn ledger_restores_exactly_what_committed_before_each_target() {
    let cluster = Cluster::start(ClusterOptions { track_commit_timestamp: true, ..Default::default() });
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let backup = |label: &str| -> String {
        let output = agent.run_command(&["backup", "--label", label, "--json"]);
        assert!(output.status.success(), "backup: {}", stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
        report["id"].as_str().expect("id").to_string()
    };
    let first = backup("ledger base");
    // 150 commits over about two minutes, a second backup in the middle.
    let mut lsns = commit_rows(&cluster, 1, 75, 0.8);
    let mark = agent.run_command(&["mark", "mid-ledger"]);
    assert!(mark.status.success(), "mark: {}", stderr(&mark));
    let second = backup("mid ledger");
    lsns.extend(commit_rows(&cluster, 76, 150, 0.8));
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    // The agent's status shows the window too, up to the last commit once summarized.
    let last_commit: f64 = cluster
        .psql("SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin)) FROM ledger WHERE id = 150")
        .parse()
        .expect("epoch");
    let status_window = wait_until("status shows the window to the last commit", Duration::from_secs(120), || {
        let window = agent.status()["window"].clone();
        let latest = time::OffsetDateTime::parse(window["latest"].as_str()?, &Rfc3339).ok()?;
        (latest.unix_timestamp_nanos() as f64 / 1e9 >= last_commit - 1e-6).then_some(window)
    });
    assert!(running.stop(), "agent did not stop cleanly");
    // The repository alone from here on: the agent's state goes away.
    std::fs::remove_dir_all(&agent.state_dir).expect("remove agent state");

    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let listed: serde_json::Value =
        serde_json::from_slice(&restorer.run(&["list", "--json"]).stdout).expect("list JSON");
    assert_eq!(status_window["earliest_lsn"], listed["window"]["earliest_lsn"], "{status_window} vs {listed}");
    assert_eq!(status_window["earliest"], listed["window"]["earliest"]);
    let commit_time =
        |id: u32| cluster.psql(&format!("SELECT pg_xact_commit_timestamp(xmin) FROM ledger WHERE id = {id}"));
    let xid = |id: u32| cluster.psql(&format!("SELECT xmin FROM ledger WHERE id = {id}"));
    let between =
        cluster.psql("SELECT pg_xact_commit_timestamp(xmin) + interval '7 milliseconds' FROM ledger WHERE id = 100");

    // (target arguments, the source's rows that committed at or before it,
    // the backup to start from: the newest one consistent before the target)
    let cases: Vec<(Vec<String>, Vec<String>, &String)> = vec![
        (
            vec!["--time".into(), commit_time(30)],
            rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{}'", commit_time(30))),
            &first,
        ),
        (
            vec!["--time".into(), between.clone()],
            rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{between}'")),
            &second,
        ),
        (
            vec!["--time".into(), commit_time(149)],
            rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{}'", commit_time(149))),
            &second,
        ),
        (vec!["--lsn".into(), lsns[59].clone()], rows(&cluster, "WHERE id <= 60"), &first),
        (
            vec!["--xid".into(), xid(120)],
            rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) <= '{}'", commit_time(120))),
            &second,
        ),
        (
            vec!["--before-xid".into(), xid(140)],
            rows(&cluster, &format!("WHERE pg_xact_commit_timestamp(xmin) < '{}'", commit_time(140))),
            &second,
        ),
        (vec!["--name".into(), "mid-ledger".into()], rows(&cluster, "WHERE id <= 75"), &first),
    ];
    assert_eq!(cases[1].1.len(), 100, "the between-commits target must split 100 and 101");
    assert_eq!(cases[5].1.len(), 139);
    for (target, expected, backup_id) in cases {
        let args: Vec<&str> = target.iter().map(String::as_str).collect();
        let (restored, report) = restorer.restore_and_start(&args);
        let got = rows(&restored, "");
        assert_eq!(
            got.len(),
            expected.len(),
            "target {target:?}: {} rows restored, {} expected",
            got.len(),
            expected.len()
        );
        assert_eq!(got, expected, "target {target:?}");
        assert!(report["reached_lsn"].as_str().is_some(), "{report}");
        assert_eq!(report["pgdata"].as_str(), Some(restored.data.to_str().expect("utf-8")));
        assert_eq!(report["backup_id"].as_str(), Some(backup_id.as_str()), "target {target:?}");
    }
    // --latest: every committed row.
    let (restored, _) = restorer.restore_and_start(&["--latest"]);
    assert_eq!(rows(&restored, ""), rows(&cluster, ""));
}

#[test]
fn refusals_write_nothing() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL)");
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let backup: serde_json::Value = {
        let output = agent.run_command(&["backup", "--json"]);
        assert!(output.status.success(), "backup: {}", stderr(&output));
        serde_json::from_slice(&output.stdout).expect("json")
    };
    commit_rows(&cluster, 1, 5, 0.02);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop());
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let refused = |args: &[&str], needle: &str| restorer.refused(args, needle);

    // A time without a zone.
    let (_dir, pgdata) = Restorer::target_dir();
    let path = pgdata.to_str().expect("utf-8");
    refused(&["restore", "--pgdata", path, "--time", "2026-11-25 10:31:00"], "no time zone");
    assert!(!pgdata.exists());
    // Before the window: names the window.
    refused(&["restore", "--pgdata", path, "--time", "2000-01-01 00:00:00+00"], "window starts at");
    assert!(!pgdata.exists());
    // Past the archive.
    refused(&["restore", "--pgdata", path, "--lsn", "FF/0"], "past the WAL archived");
    assert!(!pgdata.exists());
    // A quiet stretch: after the last commit, so recovery would never get there.
    let quiet = cluster.psql("SELECT now()");
    refused(&["restore", "--pgdata", path, "--time", &quiet], "no transaction ends after");
    assert!(!pgdata.exists());
    // A transaction that never committed, a restore point that does not exist.
    refused(&["restore", "--pgdata", path, "--xid", "3999999"], "has no commit");
    refused(&["restore", "--pgdata", path, "--name", "no-such-point"], "no restore point named");
    assert!(!pgdata.exists());
    // A non-empty directory.
    std::fs::create_dir_all(&pgdata).expect("mkdir");
    std::fs::write(pgdata.join("precious"), "keep me").expect("write");
    refused(&["restore", "--pgdata", path, "--latest"], "not empty");
    assert_eq!(std::fs::read_dir(&pgdata).expect("ls").count(), 1);
    // Next to a running postmaster: the source's own data directory, even with --force.
    refused(&["restore", "--pgdata", cluster.data.to_str().expect("utf-8"), "--latest", "--force"], "is running");
    // A corrupt object: named, and nothing left behind.
    let (_dir2, fresh) = Restorer::target_dir();
    let chunk_dir = agent.repo.join(format!("backups/{}/chunks", backup["id"].as_str().expect("id")));
    let chunk = std::fs::read_dir(&chunk_dir).expect("chunks").flatten().next().expect("a chunk").path();
    let mut bytes = std::fs::read(&chunk).expect("read chunk");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&chunk, &bytes).expect("write chunk");
    let name = chunk.file_name().expect("name").to_string_lossy().into_owned();
    refused(&["restore", "--pgdata", fresh.to_str().expect("utf-8"), "--latest"], &name);
    assert!(!fresh.exists(), "a failed restore left files behind");
    // The dry run of a good plan writes nothing either.
    let (_dir3, dry) = Restorer::target_dir();
    let output =
        restorer.run(&["restore", "--pgdata", dry.to_str().expect("utf-8"), "--immediate", "--dry-run", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(plan["backup_id"], backup["id"]);
    assert!(plan["segments_to_replay"].as_u64().expect("segments") >= 1);
    assert!(!dry.exists());
}

#[test]
fn tablespaces_go_back_where_they_were_or_where_mapped() {
    let cluster = Cluster::start(ClusterOptions::default());
    let ts_dir = cluster.dir.path().join("ts-fast");
    std::fs::create_dir(&ts_dir).expect("mkdir");
    std::fs::set_permissions(&ts_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    if as_root() {
        chown(&ts_dir, PG_USER_OS);
    }
    cluster.psql(&format!("CREATE TABLESPACE fast LOCATION '{}'", ts_dir.display()));
    cluster.psql("CREATE TABLE ledger (id serial PRIMARY KEY, note text NOT NULL) TABLESPACE fast");
    let oid = cluster.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'fast'");
    commit_rows(&cluster, 1, 10, 0.0);
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    // Rows after the backup: recovery writes them into the tablespace.
    let lsns = commit_rows(&cluster, 11, 40, 0.02);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop());
    // Stopped, so its tablespace directory holds still while we compare it.
    cluster.stop("fast");
    let source_rows_to_30: Vec<String> = (1..=30).map(|i| format!("{i}:row {i}")).collect();
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let refused = |args: &[&str], needle: &str| restorer.refused(args, needle);
    let source_files = listing(&ts_dir);
    let siblings = || listing(cluster.dir.path()).into_iter().filter(|(p, _)| !p.starts_with(&ts_dir)).count();
    let siblings_before = siblings();

    // By default a tablespace goes back where it was: here, the source's own
    // directory, which is not empty. Refused, with the way out; nothing written.
    let (_dir, pgdata) = Restorer::target_dir();
    let path = pgdata.to_str().expect("utf-8");
    refused(&["restore", "--pgdata", path, "--latest"], &format!("--tablespace-map {oid}=NEW_DIR"));
    refused(&["restore", "--pgdata", path, "--latest", "--force"], "is not empty");
    // A mapping that names no tablespace of the backup, and a relative target.
    refused(&["restore", "--pgdata", path, "--latest", "--tablespace-map", "99999=/tmp/x"], "no tablespace 99999");
    refused(
        &["restore", "--pgdata", path, "--latest", "--tablespace-map", &format!("{oid}=relative")],
        "not an absolute",
    );
    assert!(!pgdata.exists());
    assert_eq!(listing(&ts_dir), source_files, "a refused restore touched the source's tablespace");
    assert_eq!(siblings(), siblings_before, "a refused restore left something beside the tablespace");

    // The dry run, mapping by the original location, shows the placement.
    let homes = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(homes.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    if as_root() {
        chown(homes.path(), PG_USER_OS);
    }
    let new_home = homes.path().join("fast-restored");
    let by_location = format!("{}={}", ts_dir.display(), new_home.display());
    let output = restorer.run(&[
        "restore",
        "--pgdata",
        path,
        "--lsn",
        &lsns[19],
        "--dry-run",
        "--json",
        "--tablespace-map",
        &by_location,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(plan["tablespaces"][0]["oid"].to_string(), oid, "{plan}");
    assert_eq!(plan["tablespaces"][0]["original"].as_str(), ts_dir.to_str(), "{plan}");
    assert_eq!(plan["tablespaces"][0]["target"].as_str(), new_home.to_str(), "{plan}");
    assert!(!pgdata.exists() && !new_home.exists());

    // The restore, mapping by OID: the rows of the tablespace's table as of
    // the target, the tablespace in its new home, the source's untouched.
    let by_oid = format!("{oid}={}", new_home.display());
    let (restored, report) = restorer.restore_and_start(&["--lsn", &lsns[19], "--tablespace-map", &by_oid]);
    assert_eq!(rows(&restored, ""), source_rows_to_30);
    assert_eq!(report["tablespaces"][0]["target"].as_str(), new_home.to_str(), "{report}");
    assert_eq!(restored.psql(&format!("SELECT pg_tablespace_location({oid})")), new_home.to_str().expect("utf-8"));
    assert_eq!(std::fs::read_link(restored.data.join("pg_tblspc").join(&oid)).expect("link"), new_home);
    let version_dirs: Vec<String> = std::fs::read_dir(&new_home)
        .expect("new home")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(version_dirs.len() == 1 && version_dirs[0].starts_with("PG_15_"), "{version_dirs:?}");
    // New rows land in the new home.
    let before = listing(&new_home).iter().map(|(_, size)| size).sum::<u64>();
    restored.psql("INSERT INTO ledger (note) SELECT 'more' FROM generate_series(1, 20000); CHECKPOINT");
    assert!(listing(&new_home).iter().map(|(_, size)| size).sum::<u64>() > before);
    assert_eq!(listing(&ts_dir), source_files, "the restore touched the source's tablespace");
}
