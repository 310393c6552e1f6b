//! Command line: parse, merge settings, run, and turn errors into one line
//! plus a hint. Exit codes: 0 success, 1 failure, 2 usage (clap's).

use crate::config::{self, CliConfig, Settings};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_pg::PgError;

#[derive(Parser, Debug)]
#[command(name = "tidemark-agent", version, about = "Streams PostgreSQL WAL into a Tidemark repository")]
struct Args {
    /// TOML config file (default ./tidemark.toml if it exists).
    #[arg(long, global = true, env = "TIDEMARK_CONFIG")]
    config: Option<PathBuf>,
    /// Repository URL: file:///path (default ./tidemark-repo) or s3://bucket/prefix.
    #[arg(long, global = true, env = "TIDEMARK_REPO")]
    repo: Option<String>,
    /// PostgreSQL connection (postgresql:// URL or libpq key=value); PG* variables also apply.
    #[arg(long, global = true, env = "TIDEMARK_PG_URL")]
    pg_url: Option<String>,
    /// The agent's spool and index (default ./tidemark-state).
    #[arg(long, global = true, env = "TIDEMARK_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Physical replication slot name (default tidemark).
    #[arg(long, global = true, env = "TIDEMARK_SLOT")]
    slot: Option<String>,
    /// application_name of the replication connection; list it in
    /// synchronous_standby_names for synchronous mode (default tidemark).
    #[arg(long, global = true, env = "TIDEMARK_APPLICATION_NAME")]
    application_name: Option<String>,
    /// Seconds between uploads of the segment still being filled (default 10).
    #[arg(long, global = true, env = "TIDEMARK_PARTIAL_UPLOAD_INTERVAL")]
    partial_upload_interval: Option<u64>,
    /// Seconds between scheduled base backups in `run` (default 86400, a day; 0 = none).
    #[arg(long, global = true, env = "TIDEMARK_BACKUP_INTERVAL")]
    backup_interval: Option<u64>,
    /// The checkpoint a base backup starts with: fast (default) or spread.
    #[arg(long, global = true, env = "TIDEMARK_BACKUP_CHECKPOINT")]
    backup_checkpoint: Option<String>,
    /// Most incremental backups in a row on one full backup (default 7; 0:
    /// every backup is full).
    #[arg(long, global = true, env = "TIDEMARK_MAX_INCREMENTAL_CHAIN")]
    max_incremental_chain: Option<u32>,
    /// On PostgreSQL 13–16, whether an incremental backup reads only the
    /// changed blocks over an SQL session (default true; needs EXECUTE on
    /// the low-level backup functions) or every file over BASE_BACKUP.
    #[arg(long, global = true, env = "TIDEMARK_READ_CHANGED_BLOCKS")]
    read_changed_blocks: Option<bool>,
    /// Key file of an encrypted repository: 64 hex digits (`keygen`) or a
    /// passphrase. Repeat it (or separate paths with `:` in the variable)
    /// to give old keys after a rotation; the current key must be among them.
    #[arg(long = "key-file", global = true, env = "TIDEMARK_KEY_FILE", value_delimiter = ':')]
    key_files: Vec<PathBuf>,
    /// MiB of WAL the spool may hold waiting for the repository; at the limit
    /// the agent stops receiving (the server keeps the WAL in the slot). 0 = no limit (default).
    #[arg(long, global = true, env = "TIDEMARK_SPOOL_LIMIT_MB")]
    spool_limit_mb: Option<u64>,
    /// The repository credentials cannot delete: never try (superseded
    /// partial objects and leftovers are then left to `expire`).
    #[arg(long, global = true, env = "TIDEMARK_NO_DELETE")]
    no_delete: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the server, create the slot, create or adopt the repository.
    Init {
        #[arg(long)]
        json: bool,
    },
    /// The daemon: stream WAL into the repository until stopped.
    Run {
        /// Serve /metrics (Prometheus) and /healthz at this address, e.g. 127.0.0.1:9187.
        #[arg(long, env = "TIDEMARK_LISTEN")]
        listen: Option<String>,
    },
    /// Restore drill: restore into a scratch directory, start PostgreSQL
    /// privately, check it (pg_amcheck, your SQL and command), record the
    /// outcome and RTO in the repository, remove everything. Exits 1 if it failed.
    Drill {
        #[command(flatten)]
        options: DrillArgs,
        #[arg(long)]
        json: bool,
    },
    /// Take one base backup now: incremental on the newest backup when it
    /// can be (see max_incremental_chain), else full.
    Backup {
        /// A label for the backup (written to backup_label too).
        #[arg(long)]
        label: Option<String>,
        /// A full backup even when an incremental one could be taken.
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Create a named restore point now (e.g. before a migration).
    Mark {
        name: String,
        /// Protect it: retention keeps the backup and WAL it needs for this
        /// long (30d, 12h, ...) or `forever`, even outside the window.
        #[arg(long)]
        keep: Option<String>,
        /// Return only once the repository holds the WAL with the restore
        /// point (the agent must be running), so restoring to it works now.
        #[arg(long)]
        wait: bool,
        /// Longest --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Apply the retention policy: delete old backups, WAL, summaries and
    /// leftovers of interrupted uploads. Needs only the repository.
    Expire {
        /// Print the plan and its proof; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Archived-to LSN, lag, last backup and restorable window.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Write a new random encryption key to PATH (owner-only; never overwrites).
    Keygen { path: PathBuf },
    /// Make the key in --new-key-file the one new objects are sealed with;
    /// old objects stay readable while their key file is also given.
    RotateKey {
        #[arg(long)]
        new_key_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-seal every object not under the current key (resumable: run it again after an interruption).
    Reencrypt {
        #[arg(long)]
        json: bool,
    },
}

/// Retention flags; each overrides the `[retention]` key of the same name.
#[derive(clap::Args, Debug, Default)]
struct PolicyArgs {
    /// Every moment of the last DURATION stays restorable (30d, 12h, 90s).
    #[arg(long)]
    recovery_window: Option<String>,
    /// Keep the newest backup of each of the last N days (UTC).
    #[arg(long)]
    keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// Never fewer complete backups than N.
    #[arg(long)]
    min_backups: Option<u32>,
    /// Keep audit summaries this long (default: as long as their WAL).
    #[arg(long)]
    audit_window: Option<String>,
    /// Leftovers of interrupted uploads older than this are removed (default 1d).
    #[arg(long)]
    orphan_grace: Option<String>,
}

/// Drill flags; each overrides the `[drill]` key of the same name.
#[derive(clap::Args, Debug, Default)]
struct DrillArgs {
    /// `latest` (default) or `random`: a random time inside the restorable window.
    #[arg(long)]
    target: Option<String>,
    /// A file of SQL queries, separated by semicolons; each must return true.
    #[arg(long)]
    check_sql: Option<PathBuf>,
    /// The database the SQL checks and the check command use (default postgres).
    #[arg(long)]
    check_database: Option<String>,
    /// A shell command run against the restored server (DATABASE_URL and
    /// PGHOST/PGPORT/PGUSER/PGDATABASE set); it must exit 0.
    #[arg(long)]
    check_cmd: Option<String>,
    /// Where the scratch data directory is made (default: the state directory).
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    /// PostgreSQL's bin directory (default /usr/lib/postgresql/<version>/bin).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// Keep the check command's output in the drill record (by default the
    /// record says only how it exited: the output may hold data or secrets).
    #[arg(long)]
    record_check_output: bool,
}

impl DrillArgs {
    fn over(self, base: &config::DrillSettings) -> anyhow::Result<config::DrillSettings> {
        let random_target = match self.target.as_deref() {
            None => base.random_target,
            Some("latest") => false,
            Some("random") => true,
            Some(other) => {
                return Err(
                    tidemark_repo::Fail::new(format!("invalid --target {other:?}"), "use latest or random").into()
                )
            }
        };
        Ok(config::DrillSettings {
            interval: base.interval,
            random_target,
            check_sql: self.check_sql.or(base.check_sql.clone()),
            check_database: self.check_database.unwrap_or(base.check_database.clone()),
            check_cmd: self.check_cmd.or(base.check_cmd.clone()),
            scratch_dir: self.scratch_dir.or(base.scratch_dir.clone()),
            pg_bin: self.pg_bin.or(base.pg_bin.clone()),
            timeout: base.timeout,
            record_check_output: self.record_check_output || base.record_check_output,
        })
    }
}

impl PolicyArgs {
    fn into_config(self) -> config::RetentionConfig {
        config::RetentionConfig {
            recovery_window: self.recovery_window,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            min_backups: self.min_backups,
            audit_window: self.audit_window,
            orphan_grace: self.orphan_grace,
        }
    }
}

/// glibc's allocator keeps up to eight arenas per core and, after a large
/// block is freed, raises its mmap threshold up to 32 MiB so that later
/// blocks of that size come from (and stay in) the heap: with a few threads
/// passing megabyte-sized pieces around, freed memory piled up in several arenas.
/// Two arenas, and a fixed 512 KiB threshold (large blocks are mapped and
/// returned to the system when freed), keep the agent's RSS at what it uses.
fn limit_allocator_footprint() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
    }
}

pub fn main() -> ExitCode {
    owner_only_files();
    let args = Args::parse();
    // The daemon, a backup and a drill report what they do in their logs;
    // other commands only problems (and the progress of long work).
    let default_level = if matches!(
        args.command,
        Command::Run { .. } | Command::Backup { .. } | Command::Expire { .. } | Command::Drill { .. }
    ) {
        "info".to_string()
    } else {
        format!("warn,{}=info", tidemark_repo::progress::LOG_TARGET)
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    // Only the resident daemon: a one-off backup compresses 8 MiB chunks on
    // every core, and mapping each afresh cost it a third of its speed.
    let daemon = matches!(args.command, Command::Run { .. });
    if daemon {
        limit_allocator_footprint();
    }
    // Few workers whatever the host's core count: CPU work runs on blocking
    // threads. The daemon's async work is a few helpers around one
    // replication stream (which has its own thread), and it gets one
    // worker: with two, each task that became ready made one worker wake
    // the other to look for work (an eventfd write and a futex wake), turns
    // on a CPU that a quiet database paid for every 10 s. One-off commands
    // (a backup's concurrent uploads) keep two.
    // Blocking threads are kept for two minutes when idle: the daemon's
    // periodic work (a partial upload every 10 s, the lease every 40 s)
    // would otherwise start a thread almost every time.
    let workers = if daemon { 1 } else { 2 };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_keep_alive(std::time::Duration::from_secs(120))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark-agent: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidemark-agent: error: {error:#}");
            if let Some(hint) = hint_for(&error) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(args: Args) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    match args.command {
        Command::Init { json } => {
            let report = crate::init::init(&settings).await?;
            print_init(&settings, &report, json);
            Ok(())
        }
        Command::Run { .. } => crate::daemon::run(settings).await,
        Command::Drill { options, json } => drill(&settings, options, json).await,
        Command::Mark { name, keep, wait, wait_timeout, json } => {
            mark(&settings, &name, keep.as_deref(), wait.then(|| std::time::Duration::from_secs(wait_timeout)), json)
                .await
        }
        Command::Expire { dry_run, json, policy } => {
            let retention = policy.into_config().over(settings.retention.clone());
            crate::expire::run(&settings, retention, dry_run, json).await
        }
        Command::Backup { label, full, json } => {
            let manifest = crate::backup::backup(&settings, label, full).await?;
            if json {
                // Through a JSON value, whose maps keep their keys sorted.
                println!("{:#}", serde_json::to_value(manifest.summary())?);
            } else {
                let kind = match &manifest.base {
                    Some(base) => format!("incremental on {base}"),
                    None => "full".to_string(),
                };
                println!(
                    "backup {} ({}, {kind}): {} files, {} bytes, {} bytes stored; WAL {} to {} on timeline {}",
                    manifest.id,
                    manifest.label,
                    manifest.files.len(),
                    manifest.bytes,
                    manifest.stored_bytes,
                    manifest.start_lsn,
                    manifest.end_lsn,
                    manifest.timeline
                );
            }
            Ok(())
        }
        Command::Keygen { path } => {
            let id = crate::keys::keygen(&path)?;
            println!(
                "key {id} written to {}; keep a copy somewhere safe: without it the repository cannot be read",
                path.display()
            );
            Ok(())
        }
        Command::RotateKey { new_key_file, json } => {
            let rotation = crate::keys::rotate_key(&settings, &new_key_file).await?;
            if json {
                println!("{:#}", serde_json::json!({ "old_key": rotation.old_key, "new_key": rotation.new_key }));
            } else {
                println!(
                    "new objects are sealed with key {}; objects under key {} stay readable while its key file is given too.\n\
                     next: restart the agent with both --key-file options, then run `tidemark-agent reencrypt`",
                    rotation.new_key, rotation.old_key
                );
            }
            Ok(())
        }
        Command::Reencrypt { json } => {
            let report = crate::keys::reencrypt(&settings).await?;
            print_reencryption(&report, json)
        }
        Command::Status { json } => {
            let status = crate::status::status(&settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", crate::status::render_text(&status));
            }
            Ok(())
        }
    }
}

/// `drill`: run, print, and fail (exit 1) when the drill failed.
async fn drill(settings: &Settings, options: DrillArgs, json: bool) -> anyhow::Result<()> {
    let drill = options.over(&settings.drill)?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::daemon::wait_for_signal().await;
        let _ = stop.send(true);
    });
    let record = crate::drill::drill(settings, &drill, stopping).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        print!("{}", crate::drill::render(&record));
    }
    match &record.failure {
        None => Ok(()),
        Some(why) => Err(tidemark_repo::Fail::new(
            format!("the drill failed: {why}"),
            "the drill is recorded in the repository (`tidemark-agent status` shows it); fix the cause and run `tidemark-agent drill` again",
        )
        .into()),
    }
}

/// `mark`: the restore point, with `--wait` once it is archived, and the command that restores to it.
async fn mark(
    settings: &Settings,
    name: &str,
    keep: Option<&str>,
    wait: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let mark = crate::mark::mark(settings, name, keep).await?;
    let restore = crate::mark::restore_command(settings, name);
    if let Some(timeout) = wait {
        crate::mark::wait_archived(settings, &mark, timeout).await?;
    }
    if json {
        let mut value = serde_json::to_value(&mark)?;
        value["archived"] = wait.is_some().into();
        value["restore_command"] = restore.into();
        println!("{value:#}");
    } else {
        let kept = match &mark.keep_until {
            Some(until) => format!(", protected until {until}"),
            None => String::new(),
        };
        let archived = if wait.is_some() { " (archived)" } else { "" };
        println!("restore point {name:?} at {}{archived}{kept}; restore to it with:\n  {restore}", mark.lsn);
    }
    Ok(())
}

/// `init`'s report: as JSON (stable fields) or a sentence with the next step.
fn print_init(settings: &Settings, report: &crate::init::InitReport, json: bool) {
    let repository = tidemark_repo::redact_url(&settings.repo_url);
    if json {
        let value = serde_json::json!({
            "system_identifier": report.system_identifier,
            "timeline": report.timeline,
            "slot": settings.slot,
            "slot_created": report.slot_created,
            "repository": repository,
            "repository_created": report.repository_created,
            "stream_start_lsn": report.stream_start,
            "advice": report.advice,
        });
        println!("{value:#}");
        return;
    }
    println!(
        "cluster {} (timeline {}): slot \"{}\" {}, repository {} {}; streaming will start at {}",
        report.system_identifier,
        report.timeline,
        settings.slot,
        if report.slot_created { "created" } else { "already existed" },
        repository,
        if report.repository_created { "created" } else { "adopted" },
        report.stream_start
    );
    for advice in &report.advice {
        println!("advice: {advice}");
    }
    println!("next: tidemark-agent run");
}

fn print_reencryption(report: &crate::keys::Reencryption, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "{} objects re-sealed with key {}, {} already were",
        report.resealed, report.current_key, report.already_current
    );
    for key in &report.left_to_the_agent {
        println!("  left to the running agent (it rewrites it under the current key): {key}");
    }
    Ok(())
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    let file = config::load_file(args.config.as_deref())?;
    let cli = CliConfig {
        config: args.config.clone(),
        repo: args.repo.clone(),
        pg_url: args.pg_url.clone(),
        state_dir: args.state_dir.clone(),
        slot: args.slot.clone(),
        application_name: args.application_name.clone(),
        partial_upload_interval_secs: args.partial_upload_interval,
        backup_interval_secs: args.backup_interval,
        backup_checkpoint: args.backup_checkpoint.clone(),
        max_incremental_chain: args.max_incremental_chain,
        read_changed_blocks: args.read_changed_blocks,
        key_files: args.key_files.clone(),
        spool_limit_mb: args.spool_limit_mb,
        no_delete: args.no_delete,
        listen: match &args.command {
            Command::Run { listen } => listen.clone(),
            _ => None,
        },
    };
    let env: BTreeMap<String, String> = std::env::vars().collect();
    // The password file is read per server when connecting (tidemark_pg::settings).
    Ok(config::resolve(file, cli, &env)?)
}

/// What to do about an error: the hint of the first cause we recognise.
fn hint_for(error: &anyhow::Error) -> Option<String> {
    for cause in error.chain() {
        if let Some(fail) = cause.downcast_ref::<tidemark_repo::Fail>() {
            return Some(fail.hint.clone());
        }
        if let Some(repo) = cause.downcast_ref::<tidemark_repo::RepoError>() {
            return Some(repo.hint().to_string());
        }
        if let Some(pg) = cause.downcast_ref::<PgError>() {
            return Some(pg_hint(pg));
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                StorageFull => {
                    return Some("the disk is full: free space where --state-dir (or the repository) lives".into())
                }
                ReadOnlyFilesystem | PermissionDenied => {
                    return Some("make --state-dir and the repository writable by this user".into())
                }
                NotADirectory | AlreadyExists => return Some("point --state-dir at a directory".into()),
                _ => {}
            }
        }
    }
    None
}

fn pg_hint(error: &PgError) -> String {
    match error {
        PgError::Connect { .. } => {
            "is PostgreSQL running and listening there? check --pg-url, PGHOST and PGPORT, and listen_addresses".into()
        }
        PgError::Server(e) => match e.code.as_str() {
            "28P01" => "check the password: in --pg-url, PGPASSWORD or ~/.pgpass".into(),
            "42501" => "grant the role replication: ALTER ROLE <user> REPLICATION; (or use a superuser)".into(),
            "28000" if e.message.contains("pg_hba.conf") => {
                "add a line `host replication <user> <address> scram-sha-256` to pg_hba.conf and reload PostgreSQL (`all` does not match replication connections)".into()
            }
            "53300" => "raise max_wal_senders (and max_replication_slots) in postgresql.conf, or stop an idle replication client".into(),
            "58P01" => "the server already removed WAL the archive needs: the slot was lost; take a new base backup".into(),
            code if code.starts_with("57P") => "the server is starting up or shutting down; try again shortly".into(),
            _ => e.hint.clone().unwrap_or_else(|| "see the PostgreSQL server log for details".into()),
        },
        PgError::Auth(_) => "give the password in --pg-url, PGPASSWORD or ~/.pgpass".into(),
        PgError::Tls(_) => "check sslmode and sslrootcert (libpq semantics); the server needs ssl = on for require and above".into(),
        PgError::Protocol(_) | PgError::Io(_) => "check that --pg-url points at a PostgreSQL server; retry".into(),
    }
}

/// Everything this process creates (spool, index, a local repository, key
/// files) is for its owner only, whatever umask it was started with; modes
/// given explicitly are narrowed by this too, never widened.
pub fn owner_only_files() {
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
}
