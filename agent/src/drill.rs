//! `tidemark-agent drill`: the monthly test restore, automated. Restores the
//! repository (with `tidemark-restore`, as an operator would) into a scratch
//! directory, starts PostgreSQL on a private socket and port, and checks it:
//! the time until it accepts writes (the RTO), `pg_amcheck` on every
//! database, the operator's SQL checks (each must return true) and check
//! command (the application's smoke test, with `DATABASE_URL`/`PG*` set),
//! and row counts per table. The outcome goes to the repository
//! (`drills/`, [`tidemark_repo::drills`]) and the operations log, pass or
//! fail; the scratch directory and the server are always removed.

use crate::config::{DrillSettings, Settings};
use anyhow::Context;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tidemark_proto::repo::records::{AmcheckOutcome, DrillCheck, DrillRecord, TableRows};
use tidemark_repo::Fail;
use tracing::{info, warn};

/// The restored server while the drill checks it.
struct Restored {
    pgdata: PathBuf,
    port: u16,
    pg_bin: PathBuf,
}

impl Restored {
    fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.pgdata).port(self.port).user("postgres").dbname(database);
        config.connect_timeout(Duration::from_secs(10));
        config
    }

    async fn connect(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = self
            .config(database)
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to database {database:?} of the restored server"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// `postgresql://` URL of the restored server over its private socket.
    fn url(&self, database: &str) -> String {
        let socket = percent_encode(self.pgdata.as_os_str().as_encoded_bytes());
        format!("postgresql://postgres@/{}?host={socket}&port={}", percent_encode(database.as_bytes()), self.port)
    }
}

/// Every byte but RFC 3986's unreserved characters as `%XX` (valid in a
/// URL's path and query alike; libpq decodes both).
fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Checks what can be checked before anything is restored.
fn preflight(drill: &DrillSettings) -> anyhow::Result<(PathBuf, Vec<String>)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Err(Fail::new(
            "a drill starts PostgreSQL, which refuses to run as root",
            "run the drill (and `run` with [drill] interval) as the PostgreSQL OS user, as the shipped systemd units do",
        )
        .into());
    }
    let queries = match &drill.check_sql {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Fail::new(format!("cannot read check SQL file {}: {e}", path.display()), "check --check-sql")
            })?;
            let queries = split_sql(&text);
            if queries.is_empty() {
                return Err(Fail::new(
                    format!("check SQL file {} holds no query", path.display()),
                    "write one query per statement, each returning true, separated by semicolons",
                )
                .into());
            }
            queries
        }
    };
    Ok((restore_program()?, queries))
}

/// `tidemark-restore` beside this program, or on PATH.
fn restore_program() -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join("tidemark-restore")));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("tidemark-restore")).find(|p| p.is_file()))
        .ok_or_else(|| {
            Fail::new(
                "tidemark-restore is neither beside tidemark-agent nor on PATH",
                "install both binaries in the same directory",
            )
            .into()
        })
}

/// Queries of a check file: split at semicolons outside quotes, dollar
/// quotes and comments; empty statements dropped.
pub fn split_sql(text: &str) -> Vec<String> {
    let mut queries = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut quote: Option<String> = None; // the closing quote we wait for
    while let Some(c) = chars.next() {
        if let Some(close) = &quote {
            current.push(c);
            if current.ends_with(close.as_str()) {
                quote = None;
            }
            continue;
        }
        match c {
            '-' if chars.peek() == Some(&'-') => {
                // A comment: skip to the end of the line.
                for next in chars.by_ref() {
                    if next == '\n' {
                        break;
                    }
                }
                current.push('\n');
            }
            ';' => queries.push(std::mem::take(&mut current)),
            '\'' | '"' => {
                current.push(c);
                quote = Some(c.to_string());
            }
            '$' => {
                // $tag$ ... $tag$ (the tag may be empty).
                let mut tag = String::from("$");
                while let Some(&next) = chars.peek() {
                    if next.is_alphanumeric() || next == '_' {
                        tag.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if chars.peek() == Some(&'$') {
                    chars.next();
                    tag.push('$');
                    current.push_str(&tag);
                    quote = Some(tag);
                } else {
                    current.push_str(&tag);
                }
            }
            _ => current.push(c),
        }
    }
    queries.push(current);
    queries.into_iter().map(|q| q.trim().to_string()).filter(|q| !q.is_empty()).collect()
}

fn now_rfc3339() -> String {
    crate::clock::now_rfc3339()
}

/// Runs a drill and records it; an `Err` only when nothing could be
/// attempted (bad options, another drill running) — a failed drill is an
/// `Ok` record with `passed: false`. When `stop` turns true (the agent or
/// the command is stopping), the drill ends early, cleans up and records
/// that it was interrupted.
pub async fn drill(
    settings: &Settings,
    drill: &DrillSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<DrillRecord> {
    let (program, queries) = preflight(drill)?;
    let (repo, _) = settings.open_repository().await?;
    let parent = drill.scratch_dir.clone().unwrap_or_else(|| settings.state_dir.clone());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .with_context(|| format!("create {}", parent.display()))?;
    let _lock = crate::lock::lock_file(&parent, "drill.lock", "another drill")?;
    remove_leftovers(&parent, drill).await;
    let scratch = parent.join(format!("drill-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let mut record = DrillRecord {
        started: now_rfc3339(),
        finished: String::new(),
        host: tidemark_repo::events::host_name(),
        passed: false,
        failure: None,
        target: "latest".into(),
        backup_id: None,
        reached_lsn: None,
        reached_time: None,
        rto_seconds: None,
        amcheck: AmcheckOutcome::default(),
        checks: Vec::new(),
        row_counts: Vec::new(),
    };
    let run = Run { settings, drill, program: &program, scratch: &scratch, queries: &queries };
    let mut server = None;
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(drill.timeout, run.steps(&mut record, &mut server)) => match outcome {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("the drill did not finish within {} s ([drill] timeout)", drill.timeout.as_secs())),
        },
        _ = stop.wait_for(|stopping| *stopping) => Err(anyhow::anyhow!("interrupted: the agent was stopped during the drill")),
    };
    match &server {
        Some(server) => stop_server(server).await,
        None => stop_leftover_server(&scratch.join("data"), drill).await,
    }
    if let Err(e) = std::fs::remove_dir_all(&scratch) {
        warn!("could not remove the drill's scratch directory {}: {e}", scratch.display());
    }
    record.finished = now_rfc3339();
    match outcome {
        Ok(failure) => {
            record.passed = failure.is_none();
            record.failure = failure;
        }
        Err(e) => record.failure = Some(format!("{e:#}")),
    }
    let summary = match &record.failure {
        None => format!("drill passed: restored {} in {:.1} s", record.target, record.rto_seconds.unwrap_or(0.0)),
        Some(why) => format!("drill FAILED: {why}"),
    };
    let saved = tidemark_repo::drills::save(&repo, &record).await;
    tidemark_repo::events::record(&repo, "drill", summary, serde_json::to_value(&record)?).await;
    saved.context("record the drill in the repository")?;
    Ok(record)
}

/// Scratch directories of drills that were killed: their servers stopped,
/// the directories removed (the drill lock says none is running).
async fn remove_leftovers(parent: &Path, drill: &DrillSettings) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with("drill-") && path.is_dir() {
            warn!("removing the scratch directory of an interrupted drill: {}", path.display());
            stop_leftover_server(&path.join("data"), drill).await;
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

struct Run<'a> {
    settings: &'a Settings,
    drill: &'a DrillSettings,
    program: &'a Path,
    scratch: &'a Path,
    queries: &'a [String],
}

impl Run<'_> {
    /// The drill's steps; `Ok(Some(why))` when a check failed.
    async fn steps(&self, record: &mut DrillRecord, server: &mut Option<Restored>) -> anyhow::Result<Option<String>> {
        let target = self.target().await?;
        record.target = target.join(" ").trim_start_matches("--").to_string();
        let pgdata = self.scratch.join("data");
        let port = free_port()?;
        self.check_space(&pgdata, &target).await?;
        let started = Instant::now();
        info!(target = %record.target, "drill: restoring into {}", pgdata.display());
        let mut args: Vec<String> = vec!["restore".into(), "--pgdata".into(), pgdata.display().to_string()];
        // Isolated (a generated inert configuration: no TCP, no subscription
        // workers, no synchronous standby, no archiving), its tablespaces
        // inside the scratch directory: a drill reaches nothing of production.
        args.extend(["--start".into(), "--isolate".into(), "--port".into(), port.to_string(), "--json".into()]);
        args.extend(self.tablespaces_under()?);
        args.extend(["--wait-timeout".into(), self.drill.timeout.as_secs().to_string()]);
        args.extend(target);
        if let Some(bin) = &self.drill.pg_bin {
            args.extend(["--pg-bin".into(), bin.display().to_string()]);
        }
        let output = self.restore_tool(&args).await?;
        let report: serde_json::Value = serde_json::from_slice(&output).context("tidemark-restore's JSON report")?;
        let text = |key: &str| report.get(key).and_then(|v| v.as_str()).map(str::to_string);
        record.backup_id = text("backup_id");
        record.reached_lsn = text("reached_lsn");
        record.reached_time = text("reached_time");
        let restored = Restored { pgdata: pgdata.canonicalize()?, port, pg_bin: PathBuf::new() };
        let version = accept_writes(&restored).await?;
        record.rto_seconds = Some(started.elapsed().as_secs_f64());
        // The installation tidemark-restore found and started it with.
        let pg_bin = text("pg_bin")
            .map(PathBuf::from)
            .or_else(|| self.drill.pg_bin.clone())
            .unwrap_or_else(|| default_pg_bin(version / 10_000));
        let restored = server.insert(Restored { pg_bin, ..restored });
        info!(rto_seconds = record.rto_seconds, "drill: the restored server accepts writes");
        let databases = databases(restored).await?;
        record.amcheck = amcheck(restored, &databases).await;
        record.row_counts = row_counts(restored, &databases).await?;
        for query in self.queries {
            record.checks.push(sql_check(restored, &self.drill.check_database, query).await);
        }
        if let Some(command) = &self.drill.check_cmd {
            let keep_output = self.drill.record_check_output;
            record.checks.push(command_check(restored, &self.drill.check_database, command, keep_output).await);
        }
        Ok(first_failure(record))
    }

    /// `tidemark-restore` with the agent's repository and keys; its stdout,
    /// or its error line as the error.
    async fn restore_tool(&self, args: &[String]) -> anyhow::Result<Vec<u8>> {
        let mut command = tokio::process::Command::new(self.program);
        command.arg("--repo").arg(&self.settings.repo_url);
        for key in &self.settings.key_files {
            command.arg("--key-file").arg(key.canonicalize().with_context(|| format!("key file {}", key.display()))?);
        }
        command.args(args).args(["--cache-dir".to_string(), self.scratch.join("cache").display().to_string()]);
        command.env_remove("TIDEMARK_KEY_FILE").stdin(Stdio::null()).kill_on_drop(true);
        let output = command.output().await.with_context(|| format!("run {}", self.program.display()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let line = stderr
                .lines()
                .find_map(|l| l.strip_prefix("tidemark-restore: error: "))
                .unwrap_or_else(|| stderr.lines().last().unwrap_or("tidemark-restore failed"));
            anyhow::bail!("restore failed: {line}");
        }
        Ok(output.stdout)
    }

    /// Every tablespace into the scratch directory, never where the source
    /// had it (on the source's own host that is the live one).
    fn tablespaces_under(&self) -> anyhow::Result<[String; 2]> {
        let scratch = self.scratch.canonicalize().with_context(|| format!("resolve {}", self.scratch.display()))?;
        Ok(["--tablespaces-under".into(), scratch.display().to_string()])
    }

    /// `--latest`, or `--time T` for a random time inside the window.
    async fn target(&self) -> anyhow::Result<Vec<String>> {
        if !self.drill.random_target {
            return Ok(vec!["--latest".into()]);
        }
        let list: serde_json::Value =
            serde_json::from_slice(&self.restore_tool(&["list".into(), "--json".into()]).await?)
                .context("tidemark-restore list's JSON")?;
        let window = list.get("window").filter(|w| !w.is_null()).ok_or_else(|| {
            Fail::new(
                "nothing is restorable yet: no drill target",
                "take a base backup first (`tidemark-agent backup`)",
            )
        })?;
        let field = |key: &str| window.get(key).and_then(|v| v.as_str()).map(crate::metrics::unix_seconds);
        let (Some(earliest), Some(latest)) = (field("earliest"), field("latest")) else {
            return Ok(vec!["--latest".into()]); // no commit archived since the backup: only its end point
        };
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).context("random drill target")?;
        let fraction = u64::from_le_bytes(random) as f64 / u64::MAX as f64;
        let seconds = earliest + (latest - earliest).max(0.0) * fraction;
        let time = time::OffsetDateTime::from_unix_timestamp_nanos((seconds * 1e9) as i128)
            .context("drill target time")?
            .format(&time::format_description::well_known::Rfc3339)
            .context("format the drill target")?;
        Ok(vec!["--time".into(), time])
    }

    /// Refuses before writing when the scratch disk cannot hold the backup.
    async fn check_space(&self, pgdata: &Path, target: &[String]) -> anyhow::Result<()> {
        let mut args: Vec<String> = vec!["restore".into(), "--dry-run".into(), "--json".into()];
        args.extend(["--pgdata".into(), pgdata.display().to_string()]);
        args.extend(self.tablespaces_under()?);
        args.extend(target.iter().cloned());
        let plan: serde_json::Value =
            serde_json::from_slice(&self.restore_tool(&args).await?).context("tidemark-restore's dry-run report")?;
        let needed = plan.get("bytes_to_fetch").and_then(|v| v.as_u64()).unwrap_or(0);
        let available = crate::daemon::free_bytes(self.scratch)?;
        // The WAL replayed and the server's own files need room too.
        let wanted = needed + needed / 10 + (256 << 20);
        if available < wanted {
            return Err(Fail::new(
                format!(
                    "the drill needs about {} MB in {} but {} MB are free",
                    wanted >> 20,
                    self.scratch.display(),
                    available >> 20
                ),
                "point [drill] scratch_dir (or --scratch-dir) at a larger disk",
            )
            .into());
        }
        Ok(())
    }
}

/// The first failed check (amcheck or a user check), as one line.
fn first_failure(record: &DrillRecord) -> Option<String> {
    if record.amcheck.ran && !record.amcheck.passed {
        return Some(format!("pg_amcheck found problems: {}", record.amcheck.note.as_deref().unwrap_or("")));
    }
    record.checks.iter().find(|c| !c.passed).map(|c| format!("{} check failed: {} ({})", c.kind, c.check, c.detail))
}

fn default_pg_bin(major: i32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port for the restored server")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until the restored server takes a write; returns its version number.
async fn accept_writes(server: &Restored) -> anyhow::Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let client = server.connect("postgres").await?;
            client
                .batch_execute(
                    "CREATE TEMP TABLE tidemark_drill_probe (x int); INSERT INTO tidemark_drill_probe VALUES (1)",
                )
                .await?;
            let row = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?;
            Ok::<i32, anyhow::Error>(row.get(0))
        };
        match attempt.await {
            Ok(version) => return Ok(version),
            Err(e) if Instant::now() > deadline => return Err(e.context("the restored server does not accept writes")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn databases(server: &Restored) -> anyhow::Result<Vec<String>> {
    let client = server.connect("postgres").await?;
    let rows = client
        .query("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// `pg_amcheck` (heap and B-tree checks) on every database, or why not.
async fn amcheck(server: &Restored, databases: &[String]) -> AmcheckOutcome {
    let program = server.pg_bin.join("pg_amcheck");
    let mut outcome = AmcheckOutcome { databases: databases.to_vec(), ..Default::default() };
    if !program.is_file() {
        outcome.note = Some(format!(
            "skipped: no pg_amcheck in {} (install the PostgreSQL client package or set [drill] pg_bin)",
            server.pg_bin.display()
        ));
        outcome.passed = true;
        return outcome;
    }
    let output = tokio::process::Command::new(&program)
        .arg("--all")
        .arg("--install-missing")
        .arg("--host")
        .arg(&server.pgdata)
        .arg("--port")
        .arg(server.port.to_string())
        .args(["--username", "postgres", "--no-password"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    outcome.ran = true;
    match output {
        Ok(output) => {
            outcome.passed = output.status.success();
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            if !outcome.passed {
                outcome.note = Some(last_lines(&text, 5));
            }
        }
        Err(e) => outcome.note = Some(format!("could not run {}: {e}", program.display())),
    }
    outcome
}

/// Exact row counts of every ordinary table, per database.
async fn row_counts(server: &Restored, databases: &[String]) -> anyhow::Result<Vec<TableRows>> {
    let mut counts = Vec::new();
    for database in databases {
        let client = server.connect(database).await?;
        let tables = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1",
                &[],
            )
            .await?;
        for table in tables {
            let name: String = table.get(0);
            let row = client.query_one(&format!("SELECT count(*) FROM {name}"), &[]).await?;
            counts.push(TableRows {
                database: database.clone(),
                table: name,
                rows: row.get::<_, i64>(0).max(0) as u64,
            });
        }
    }
    Ok(counts)
}

/// One query that must return a single true.
async fn sql_check(server: &Restored, database: &str, query: &str) -> DrillCheck {
    let result = async {
        let client = server.connect(database).await?;
        let rows = client.query(query, &[]).await?;
        let value = match rows.as_slice() {
            [row] if row.len() == 1 => row.try_get::<_, Option<bool>>(0).context("the query must return a boolean")?,
            _ => anyhow::bail!("the query returned {} rows; it must return one row with one boolean", rows.len()),
        };
        Ok(value)
    };
    let (passed, detail) = match result.await {
        Ok(Some(true)) => (true, "true".to_string()),
        Ok(Some(false)) => (false, "false".to_string()),
        Ok(None) => (false, "null".to_string()),
        Err(e) => (false, format!("{e:#}")),
    };
    DrillCheck { kind: "sql".into(), check: query.to_string(), passed, detail }
}

/// The operator's command, with the restored server in its environment.
/// The record (kept in the repository for good) says how it exited; its
/// output, which may hold rows or secrets, only with `keep_output`.
async fn command_check(server: &Restored, database: &str, command: &str, keep_output: bool) -> DrillCheck {
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("DATABASE_URL", server.url(database))
        .env("PGHOST", &server.pgdata)
        .env("PGPORT", server.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", database)
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let (passed, detail) = match output {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            let status = match output.status.code() {
                Some(code) => format!("exit {code}"),
                None => "killed by a signal".into(),
            };
            let detail = match (keep_output, output.status.success()) {
                (true, _) => format!("{status}: {}", last_lines(&text, 5)),
                (false, true) => status,
                (false, false) => format!(
                    "{status}; its output is not recorded (--record-check-output or [drill] record_check_output = true keeps it)"
                ),
            };
            (output.status.success(), detail)
        }
        Err(e) => (false, format!("could not run sh: {e}")),
    };
    DrillCheck { kind: "command".into(), check: command.to_string(), passed, detail }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

async fn stop_server(server: &Restored) {
    let stop = |mode: &'static str| {
        tokio::process::Command::new(server.pg_bin.join("pg_ctl"))
            .arg("-D")
            .arg(&server.pgdata)
            .args(["stop", "-w", "-t", "60", "-m", mode])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    if !matches!(stop("fast").await, Ok(s) if s.success()) {
        let _ = stop("immediate").await;
    }
}

/// A server `tidemark-restore` left running (a recovery that timed out):
/// stopped with the pg_ctl of its own version.
async fn stop_leftover_server(pgdata: &Path, drill: &DrillSettings) {
    if !pgdata.join("postmaster.pid").exists() {
        return;
    }
    let major = std::fs::read_to_string(pgdata.join("PG_VERSION")).ok().and_then(|v| v.trim().parse().ok());
    let pg_bin = drill.pg_bin.clone().unwrap_or_else(|| default_pg_bin(major.unwrap_or(0)));
    stop_server(&Restored { pgdata: pgdata.to_path_buf(), port: 0, pg_bin }).await;
}

/// The drill as text: outcome, target, RTO, checks and the largest tables.
pub fn render(record: &DrillRecord) -> String {
    let mut out = String::new();
    let outcome = if record.passed { "PASSED" } else { "FAILED" };
    out.push_str(&format!("drill {outcome} ({} .. {})\n", record.started, record.finished));
    if let Some(why) = &record.failure {
        out.push_str(&format!("  failure: {why}\n"));
    }
    out.push_str(&format!("  target: {}", record.target));
    if let Some(id) = &record.backup_id {
        out.push_str(&format!(", backup {id}"));
    }
    if let Some(lsn) = &record.reached_lsn {
        out.push_str(&format!(", reached {lsn}"));
    }
    if let Some(time) = &record.reached_time {
        out.push_str(&format!(" (last transaction {time})"));
    }
    out.push('\n');
    if let Some(rto) = record.rto_seconds {
        out.push_str(&format!("  RTO: {rto:.1} s until the restored server accepted writes\n"));
    }
    let amcheck = match (&record.amcheck.ran, record.amcheck.passed) {
        (true, true) => format!("passed on {} databases", record.amcheck.databases.len()),
        (true, false) => format!("FAILED: {}", record.amcheck.note.as_deref().unwrap_or("")),
        (false, _) => record.amcheck.note.clone().unwrap_or_else(|| "not run".into()),
    };
    out.push_str(&format!("  pg_amcheck: {amcheck}\n"));
    for check in &record.checks {
        let verdict = if check.passed { "ok" } else { "FAILED" };
        out.push_str(&format!("  {} check {verdict}: {} -> {}\n", check.kind, check.check, check.detail));
    }
    let rows: u64 = record.row_counts.iter().map(|t| t.rows).sum();
    out.push_str(&format!("  {} tables, {rows} rows\n", record.row_counts.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_files_split_into_queries() {
        let text = "-- the ledger is whole; really\nSELECT count(*) = 10 FROM ledger;\n\
                    SELECT 'a;b' <> 'x';  SELECT $$;$$ = ';';\nSELECT $f$ it's; $f$ IS NOT NULL\n;;\n";
        assert_eq!(
            split_sql(text),
            vec![
                "SELECT count(*) = 10 FROM ledger",
                "SELECT 'a;b' <> 'x'",
                "SELECT $$;$$ = ';'",
                "SELECT $f$ it's; $f$ IS NOT NULL"
            ]
        );
        assert!(split_sql("-- nothing\n ; \n").is_empty());
        assert_eq!(split_sql("SELECT \"odd;name\" FROM t"), vec!["SELECT \"odd;name\" FROM t"]);
    }

    #[test]
    fn urls_reach_the_private_socket() {
        let server =
            Restored { pgdata: PathBuf::from("/var/lib/tidemark/drill-1/data"), port: 5433, pg_bin: PathBuf::new() };
        assert_eq!(
            server.url("app db"),
            "postgresql://postgres@/app%20db?host=%2Fvar%2Flib%2Ftidemark%2Fdrill-1%2Fdata&port=5433"
        );
    }
}
