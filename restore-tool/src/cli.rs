//! Command line of `tidemark-restore`: settings (TOML file, then
//! `TIDEMARK_*` variables, then flags), dispatch, error line with hint.

use crate::wal_get::{wal_get, Fetched};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_proto::repo::backup::{BackupManifest, BackupSummary};
use tidemark_proto::repo::records::DrillRecord;
use tidemark_proto::wal::summary::canonical_table;
use tidemark_proto::Xid;
use tidemark_repo::catalog::{complete_backups, read_manifest, Catalog, TimelineInfo, WalRange, Window};
use tidemark_repo::{redact_url, Create, Fail, Repository};

#[derive(Parser, Debug)]
#[command(name = "tidemark-restore", version, about = "Restores PostgreSQL from a Tidemark repository")]
struct Args {
    /// TOML config file (default ./tidemark.toml if it exists); only `repo`
    /// and `key_files` are read from it.
    #[arg(long, global = true, env = "TIDEMARK_CONFIG")]
    config: Option<PathBuf>,
    /// Repository URL: file:///path (default ./tidemark-repo) or s3://bucket/prefix.
    #[arg(long, global = true, env = "TIDEMARK_REPO")]
    repo: Option<String>,
    /// Key file of an encrypted repository; repeat it (or separate paths
    /// with `:` in the variable) for objects sealed before a key rotation.
    #[arg(long = "key-file", global = true, env = "TIDEMARK_KEY_FILE", value_delimiter = ':')]
    key_files: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Rebuild the cluster as of one target into a new data directory.
    Restore(RestoreArgs),
    /// Tables (or the rows --where picks) as of a target, from a private
    /// scratch restore: into a file (csv, sql, copy) or into a live database
    /// (only rows whose key is absent there, in one transaction).
    Extract(ExtractArgs),
    /// Undo one transaction in a live database: the rows it inserted are
    /// deleted, the rows it updated or deleted get their old values back;
    /// rows changed again since are conflicts, reported and left alone.
    Repair(RepairArgs),
    /// The WAL audit: transactions with commit time, xid, LSN and the rows
    /// they inserted, updated and deleted per table; unusual ones flagged.
    Timeline {
        /// Only transactions that changed this table: `"AttendanceRecord"`,
        /// `public.orders` (unqualified means public; unquoted folds to lower case).
        #[arg(long)]
        table: Option<String>,
        /// Committed at or after this time (with a zone).
        #[arg(long)]
        since: Option<String>,
        /// Committed at or before this time (with a zone).
        #[arg(long)]
        until: Option<String>,
        /// Only this transaction.
        #[arg(long)]
        xid: Option<Xid>,
        /// Rows changed per table in each minute or hour, instead of transactions.
        #[arg(long, value_parser = ["minute", "hour"])]
        per: Option<String>,
        /// Show the newest N matching transactions (oldest first).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// The audit cache (derived from the repository; default ~/.cache/tidemark/audit/<system id>).
        #[arg(long, env = "TIDEMARK_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Write the audit as one self-contained HTML page to FILE instead
        /// of printing it: rows changed per table over time, the flagged
        /// transactions marked and listed with the commands that undo them.
        /// It covers every matching transaction, whatever --limit says.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["json", "per"])]
        html: Option<PathBuf>,
    },
    /// Base backups, timelines, archived WAL and the restorable window.
    /// The operations log: backups, marks, expire runs (with what they
    /// deleted), key rotations and re-encryptions, oldest first.
    Events {
        /// Only events since this long ago (`7d`, `12h`) or this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    List {
        /// The audit cache, which knows the last archived commit (the window's end).
        #[arg(long, env = "TIDEMARK_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Read every object the backups need (files, WAL to the end of the
    /// archive, history, summaries) and check authentication, framing and
    /// checksums; name each bad object and exit 1 if there is one.
    Verify {
        /// Only this backup (default: every complete backup).
        #[arg(long)]
        backup: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The restore_command: write WAL file SEGMENT (%f) to PATH (%p).
    /// Exits 1 if the repository has no such file, 200 on corruption or errors.
    WalGet {
        segment: String,
        path: PathBuf,
        /// A directory where `restore --start` stages segments ahead of replay.
        #[arg(long)]
        staged: Option<PathBuf>,
    },
    /// Write a base backup's files into a new or empty directory (no recovery
    /// configuration yet: a building block of `restore`).
    FetchBackup {
        /// The backup id, or `latest`.
        #[arg(long, default_value = "latest")]
        backup: String,
        #[arg(long)]
        pgdata: PathBuf,
        /// As for restore: FROM=TO, FROM a tablespace's OID or original location.
        #[arg(long = "tablespace-map", value_name = "FROM=TO", value_parser = crate::tablespaces::parse_mapping)]
        tablespace_map: Vec<(String, PathBuf)>,
    },
}

/// Where the scratch restores of `extract` and `repair` go and run.
#[derive(clap::Args, Debug)]
struct ScratchArgs {
    /// Where the scratch data directory is made (default: the temp directory); it needs room for the cluster.
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    /// PostgreSQL's bin directory (default: pg_config --bindir, pg_ctl on PATH, /usr/lib/postgresql/<major>/bin).
    #[arg(long, env = "TIDEMARK_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Seconds to wait for the scratch restore's recovery.
    #[arg(long, default_value_t = 86_400)]
    wait_timeout: u64,
    /// The audit cache (default ~/.cache/tidemark/audit/<system id>).
    #[arg(long, env = "TIDEMARK_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl ScratchArgs {
    fn options(self) -> crate::scratch::ScratchOptions {
        crate::scratch::ScratchOptions {
            parent: self.scratch_dir,
            pg_bin: self.pg_bin,
            cache_dir: self.cache_dir,
            wait_timeout: std::time::Duration::from_secs(self.wait_timeout),
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["to", "into"])))]
struct ExtractArgs {
    /// A table, as the audit writes it: '"User"', 'public."AttendanceRecord"'. Repeatable.
    #[arg(long = "table", required = true)]
    tables: Vec<String>,
    /// Only rows matching this SQL condition (on each --table).
    #[arg(long = "where")]
    condition: Option<String>,
    #[command(flatten)]
    target: TargetArgs,
    /// Write the rows to this file (written to a temporary name, then renamed).
    #[arg(long)]
    to: Option<PathBuf>,
    /// The file's format: csv (one table, with a header), sql (INSERTs) or copy (psql's COPY ... FROM stdin).
    #[arg(long, value_parser = ["csv", "sql", "copy"], default_value = "csv")]
    format: String,
    /// Insert the rows into this live database (a libpq connection string: URL or key=value,
    /// PG* variables, a service, ~/.pgpass): only rows whose key is absent.
    #[arg(long)]
    into: Option<String>,
    /// The database holding the tables (default: --into's, else postgres).
    #[arg(long)]
    database: Option<String>,
    /// Also the rows that reference the chosen rows through foreign keys, parents first.
    #[arg(long)]
    with_dependents: bool,
    /// Tell rows of tables without a key apart by all their columns.
    #[arg(long)]
    all_columns_key: bool,
    #[command(flatten)]
    scratch: ScratchArgs,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["dry_run", "apply"])))]
struct RepairArgs {
    /// The transaction to undo.
    #[arg(long)]
    xid: Xid,
    /// Only its changes to this table.
    #[arg(long)]
    table: Option<String>,
    /// Print what would change, the conflicts and the SQL; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Change the live database, in one transaction.
    #[arg(long)]
    apply: bool,
    /// The live database: a libpq connection string (postgresql://USER@HOST:PORT/DATABASE, or
    /// key=value; the password from PGPASSWORD, ~/.pgpass or a service, not the URL).
    #[arg(long)]
    into: String,
    /// Rows changed again since the transaction: keep them (theirs, quietly) or overwrite them (ours).
    #[arg(long, value_parser = ["theirs", "ours"])]
    on_conflict: Option<String>,
    /// Tell rows of tables without a key apart by all their columns.
    #[arg(long)]
    all_columns_key: bool,
    #[command(flatten)]
    scratch: ScratchArgs,
}

/// Where recovery stops: exactly one of these.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["time", "lsn", "xid", "before_xid", "name", "latest", "immediate"])))]
struct TargetArgs {
    /// A time with a zone: RFC 3339 or `YYYY-MM-DD HH:MM:SS+TZ`.
    #[arg(long)]
    time: Option<String>,
    /// An LSN, X/Y.
    #[arg(long)]
    lsn: Option<String>,
    /// Stop just after this transaction commits.
    #[arg(long)]
    xid: Option<Xid>,
    /// Stop just before this transaction commits.
    #[arg(long)]
    before_xid: Option<Xid>,
    /// A named restore point (`tidemark-agent mark NAME`).
    #[arg(long)]
    name: Option<String>,
    /// Everything archived.
    #[arg(long)]
    latest: bool,
    /// Only the backup's own consistent point.
    #[arg(long)]
    immediate: bool,
}

impl TargetArgs {
    /// The target, checked (times need a zone).
    fn target(&self) -> Result<crate::target::Target, Fail> {
        use crate::target::{parse_time, Target};
        let target = if let Some(text) = &self.time {
            parse_time(text).map(Target::Time)
        } else if let Some(text) = &self.lsn {
            text.parse().map(Target::Lsn).map_err(|e: tidemark_proto::lsn::ParseLsnError| e.to_string())
        } else if let Some(xid) = self.xid {
            Ok(Target::Xid(xid))
        } else if let Some(xid) = self.before_xid {
            Ok(Target::BeforeXid(xid))
        } else if let Some(name) = &self.name {
            Ok(Target::Name(name.clone()))
        } else if self.latest {
            Ok(Target::Latest)
        } else {
            debug_assert!(self.immediate);
            Ok(Target::Immediate)
        };
        target.map_err(|e| {
            Fail::new(e, "times need a zone: 2026-11-25T10:31:00Z or \"2026-11-25 10:31:00+00\"; LSNs are X/Y")
        })
    }
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// The new data directory (must be missing or empty, unless --force).
    #[arg(long)]
    pgdata: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    /// The timeline to follow: latest (default, the newest archived), current (the backup's) or a number.
    #[arg(long)]
    timeline: Option<String>,
    /// Use this backup instead of the newest that can reach the target.
    #[arg(long)]
    backup: Option<String>,
    /// Check and print the plan; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace a PostgreSQL data directory of the backup's cluster at
    /// --pgdata (never next to a running server; the old data stays until
    /// the restore is complete).
    #[arg(long, conflicts_with = "delta")]
    force: bool,
    /// Restore even though running as root (refused otherwise: root would
    /// write the repository's files with root's rights).
    #[arg(long)]
    allow_root: bool,
    /// Update an existing data directory of the same cluster in place,
    /// writing only what differs from the backup and removing what it
    /// does not list (never next to a running server).
    #[arg(long)]
    delta: bool,
    /// Put a tablespace elsewhere than its original location: FROM (its
    /// OID or original location, see --dry-run) = TO (an absolute,
    /// missing or empty directory). Repeatable.
    #[arg(long = "tablespace-map", value_name = "FROM=TO", value_parser = crate::tablespaces::parse_mapping)]
    tablespace_map: Vec<(String, PathBuf)>,
    /// Start PostgreSQL on the result and wait until the target is reached.
    /// It keeps the cluster's own settings (saying first what in them
    /// reaches outside it), listening on 127.0.0.1:--port.
    #[arg(long)]
    start: bool,
    /// With --start: start it inert instead, on a generated configuration
    /// (the source's kept as *.production): its Unix socket in the data
    /// directory only, no subscriptions, no synchronous standby, no
    /// archiving, its own pg_hba.conf. For a copy beside production.
    #[arg(long)]
    isolate: bool,
    /// Every tablespace not in --tablespace-map goes to DIR/tablespace-<OID>
    /// instead of its original location.
    #[arg(long, value_name = "DIR")]
    tablespaces_under: Option<PathBuf>,
    /// Port for --start (default 5432).
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// Pause at the target instead of promoting.
    #[arg(long)]
    pause: bool,
    /// Directory of pg_ctl and postgres for --start, of the backup's major version
    /// (default: pg_config --bindir, pg_ctl on PATH, /usr/lib/postgresql/<major>/bin).
    #[arg(long, env = "TIDEMARK_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// With --start: fetch WAL only when PostgreSQL asks, without staging
    /// it ahead of replay (for measuring what staging saves).
    #[arg(long)]
    no_prefetch: bool,
    /// Seconds --start waits for recovery to reach the target (default a day).
    #[arg(long, default_value_t = 86_400)]
    wait_timeout: u64,
    /// The audit cache that resolves time, xid and name targets
    /// (default ~/.cache/tidemark/audit/<system id>).
    #[arg(long, env = "TIDEMARK_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

impl RestoreArgs {
    /// The restore's options, the target checked (times need a zone).
    fn options(self) -> Result<crate::restore::RestoreOptions, Fail> {
        let target = self.target.target()?;
        Ok(crate::restore::RestoreOptions {
            pgdata: self.pgdata,
            target,
            backup_id: self.backup,
            timeline: self.timeline,
            dry_run: self.dry_run,
            force: self.force,
            allow_root: self.allow_root,
            delta: self.delta,
            start: self.start,
            port: self.port,
            pause: self.pause,
            pg_bin: self.pg_bin,
            wait_timeout: std::time::Duration::from_secs(self.wait_timeout),
            prefetch: !self.no_prefetch,
            cache_dir: self.cache_dir,
            tablespace_map: self.tablespace_map,
            tablespaces_under: self.tablespaces_under,
            only_databases: None,
            isolate: self.isolate,
        })
    }
}

/// Exit code that makes PostgreSQL abort recovery (anything above 125).
const ABORT_RECOVERY: u8 = 200;

pub fn main() -> ExitCode {
    // Restored files, staged WAL, the audit cache and the recovery settings
    // are for their owner only (PostgreSQL wants that of a data directory too).
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
        // Problems only, and the progress of long work (restore, verify).
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("warn,{}=info", tidemark_repo::progress::LOG_TARGET))
        });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // wal-get is PostgreSQL's restore_command: any failure but "no such
    // file" must stop recovery, never pass for the end of WAL.
    let failure = if matches!(args.command, Command::WalGet { .. }) { ABORT_RECOVERY } else { 1 };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(dispatch(args)));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tidemark-restore: error: {error:#}");
            eprintln!("hint: {}", hint_for(&error));
            ExitCode::from(failure)
        }
    }
}

/// `--since`: a duration back from now, or a time with a zone.
fn parse_since(text: &str) -> anyhow::Result<time::OffsetDateTime> {
    if let Ok(duration) = tidemark_repo::retention::parse_duration(text) {
        return Ok(time::OffsetDateTime::now_utc() - duration);
    }
    crate::target::parse_time(text).map_err(|e| {
        tidemark_repo::Fail::new(format!("--since {text:?}: {e}"), "give a duration (7d, 12h) or a time with a zone")
            .into()
    })
}

/// What to do about an error: the hint of the first cause that has one.
fn hint_for(error: &anyhow::Error) -> String {
    if let Some(hint) = tidemark_repo::hint_of(error) {
        return hint;
    }
    for cause in error.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                StorageFull => return "the disk is full: free space where the restore writes".into(),
                ReadOnlyFilesystem | PermissionDenied => {
                    return "make the target directory writable by this user (PostgreSQL's OS user for --start)".into()
                }
                _ => {}
            }
        }
    }
    "see the message; `tidemark-restore --help` lists the options".into()
}

/// The repository URL and its key files: flags and variables first, else
/// `repo` and `key_files` from the config file (the agent's `tidemark.toml`,
/// so one file serves both programs), else `./tidemark-repo`, no keys.
fn repository_settings(args: &Args) -> Result<(String, Vec<PathBuf>), Fail> {
    if let (Some(repo), false) = (&args.repo, args.key_files.is_empty()) {
        return Ok((repo.clone(), args.key_files.clone()));
    }
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("tidemark.toml"), false),
    };
    let fail = |message: String| Fail::new(message, "fix --config or pass --repo and --key-file");
    let table: toml::Table = match std::fs::read_to_string(&path) {
        Ok(text) => text.parse().map_err(|e| fail(format!("config file {} is invalid: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => toml::Table::new(),
        Err(e) => return Err(fail(format!("cannot read config file {}: {e}", path.display()))),
    };
    let repo = match &args.repo {
        Some(repo) => repo.clone(),
        None => table.get("repo").and_then(|v| v.as_str()).unwrap_or("./tidemark-repo").to_string(),
    };
    if !args.key_files.is_empty() {
        return Ok((repo, args.key_files.clone()));
    }
    let key_files = match table.get("key_files") {
        None => Vec::new(),
        Some(value) => value
            .as_array()
            .and_then(|paths| paths.iter().map(|p| p.as_str().map(PathBuf::from)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| fail(format!("key_files in config file {} is not a list of paths", path.display())))?,
    };
    Ok((repo, key_files))
}

async fn dispatch(args: Args) -> anyhow::Result<ExitCode> {
    let (url, key_files) = repository_settings(&args)?;
    // Remembering the repository's keys refuses a repository.json put back
    // from an older copy (see tidemark_repo::trust).
    let open = || Repository::open(&url, &key_files, Create::No).map(Repository::remembering_for_user);
    match args.command {
        // On SIGINT/SIGTERM the work is dropped, and with it the scratch
        // restore (its server stopped, its directory removed).
        Command::Extract(extract) => until_interrupted(run_extract(&open()?, &url, extract)).await?,
        Command::Repair(repair) => until_interrupted(run_repair(&open()?, &url, repair)).await?,
        Command::Restore(restore) => {
            let json = restore.json;
            let options = restore.options()?;
            let report = crate::restore::restore(&open()?, &url, options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_restore(&report);
            }
        }
        Command::Timeline { table, since, until, xid, per, limit, cache_dir, json, html } => {
            let options = crate::audit_report::TimelineOptions { table, since, until, xid, per, limit, json };
            timeline(&open()?, &url, &options, cache_dir.as_deref(), html.as_deref()).await?;
        }
        Command::Events { since, json } => {
            let repo = open()?;
            let since = since.as_deref().map(parse_since).transpose()?;
            let events = tidemark_repo::events::list(&repo, since).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                for e in &events {
                    println!("{}  {:<10} {}@{}  {}", e.time, e.kind, e.user, e.host, e.summary);
                }
                if events.is_empty() {
                    println!("no events");
                }
            }
        }
        Command::List { json, cache_dir } => {
            let repo = open()?;
            let catalog = Catalog::load(&repo).await?;
            let audit = crate::audit::Audit::load(&repo, &catalog, cache_dir.as_deref()).await?;
            let latest = audit.last_commit().map(|c| crate::audit_report::time_text(c.time));
            let drill = tidemark_repo::drills::latest(&repo).await?;
            print_list(&catalog, latest, drill.as_ref(), json)?;
        }
        Command::FetchBackup { backup, pgdata, tablespace_map } => {
            let repo = open()?;
            let id = match backup.as_str() {
                "latest" => complete_backups(&repo).await?.pop().ok_or_else(|| {
                    Fail::new("the repository has no complete backup", "take one with `tidemark-agent backup`")
                })?,
                _ => backup,
            };
            let manifest = read_manifest(&repo, &id).await?;
            let keep = crate::places::home_directories();
            let placements = crate::tablespaces::place(&manifest.tablespaces, &tablespace_map, &pgdata, &keep)
                .map_err(|e| {
                    Fail::new(e, "see `--tablespace-map FROM=TO` in `tidemark-restore fetch-backup --help`")
                })?;
            let chain = tidemark_repo::catalog::read_chain(&repo, &manifest).await?;
            let bytes = crate::fetch::fetch_backup(&repo, &chain, &pgdata, &placements, true, None, false).await?;
            println!(
                "backup {} written to {} ({bytes} bytes); it needs WAL {} to {} on timeline {}",
                manifest.id,
                pgdata.display(),
                manifest.start_lsn,
                manifest.end_lsn,
                manifest.timeline
            );
        }
        Command::Verify { backup, json } => {
            let report = crate::verify::verify(&open()?, backup.as_deref()).await?;
            print_verify(&report, json)?;
            if !report.problems.is_empty() {
                return Err(Fail::new(
                    format!("{} bad objects in {}", report.problems.len(), redact_url(&url)),
                    "restore from a backup whose objects all verify, or replace the bad objects from a copy",
                )
                .into());
            }
        }
        Command::WalGet { segment, path, staged } => {
            if staged.is_some_and(|dir| crate::prefetch::take_staged(&dir, &segment, &path)) {
                return Ok(ExitCode::SUCCESS);
            }
            let fetched = wal_get(&open()?, &segment, &path).await.with_context(|| format!("wal-get {segment}"))?;
            if fetched == Fetched::Missing {
                eprintln!("tidemark-restore: {segment} is not in the repository");
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `timeline`: the audit printed, or with `--html` written as a page.
async fn timeline(
    repo: &Repository,
    url: &str,
    options: &crate::audit_report::TimelineOptions,
    cache_dir: Option<&std::path::Path>,
    html: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let filter = crate::audit_report::filter_of(options).map_err(|e| {
        Fail::new(e, "times need a zone (2026-11-25T10:31:00Z); tables are schema.name, quoted as in SQL")
    })?;
    let catalog = Catalog::load(repo).await?;
    let audit = crate::audit::Audit::load(repo, &catalog, cache_dir).await?;
    let Some(path) = html else {
        print!("{}", crate::audit_report::render(&audit, options, &filter));
        return Ok(());
    };
    let now = time::OffsetDateTime::now_utc();
    let generated_at = crate::target::format_time(now.replace_nanosecond(0).unwrap_or(now));
    let filters = crate::timeline_html::filters_text(options);
    let provenance = crate::timeline_html::Provenance { repo: url, generated_at: &generated_at, filters: &filters };
    let page = crate::timeline_html::page(&audit, &filter, &provenance);
    // Through a temporary name: a browser reloading the file never sees half a page.
    tidemark_repo::durable::write_atomically(path, page.html.as_bytes(), tidemark_repo::durable::Durability::PageCache)
        .with_context(|| format!("write {}", path.display()))?;
    println!("wrote the audit ({} transactions, {} flagged) to {}", page.transactions, page.flagged, path.display());
    Ok(())
}

fn print_verify(report: &crate::verify::VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for problem in &report.problems {
        println!("BAD {}: {}", problem.key, problem.problem);
    }
    println!(
        "verified backup{} {}: {} objects, {} bytes checked, {} bad",
        if report.backups.len() == 1 { "" } else { "s" },
        report.backups.join(", "),
        report.objects_checked,
        report.bytes_checked,
        report.problems.len()
    );
    Ok(())
}

/// `list --json`. **Stable JSON:** the fields are in alphabetical order, as
/// they were when the report was built as a JSON map.
#[derive(serde::Serialize)]
struct ListReport<'a> {
    backups: Vec<BackupSummary>,
    timelines: &'a [TimelineInfo],
    waiting_for_wal: Vec<BackupSummary>,
    wal: &'a [WalRange],
    window: Option<Window>,
    last_drill: Option<&'a DrillRecord>,
}

fn print_list(
    catalog: &Catalog,
    latest: Option<String>,
    drill: Option<&DrillRecord>,
    json: bool,
) -> anyhow::Result<()> {
    let window = catalog.window(latest);
    if json {
        let report = ListReport {
            backups: catalog.restorable.iter().map(BackupManifest::summary).collect(),
            timelines: &catalog.timelines,
            waiting_for_wal: catalog.waiting.iter().map(BackupManifest::summary).collect(),
            wal: &catalog.ranges,
            window,
            last_drill: drill,
        };
        // Through a JSON value, whose maps keep their keys sorted: the output
        // stays byte for byte what it was.
        println!("{:#}", serde_json::to_value(&report)?);
        return Ok(());
    }
    println!("backups (restorable)");
    if catalog.restorable.is_empty() {
        println!("  none");
    }
    for b in &catalog.restorable {
        let kind = b.base.as_ref().map_or("full".to_string(), |base| format!("incremental on {base}"));
        println!(
            "  {}  timeline {}  {} .. {}  ended {}  {} bytes ({} stored, {kind})  {}",
            b.id, b.timeline, b.start_lsn, b.end_lsn, b.end_time, b.bytes, b.stored_bytes, b.label
        );
    }
    for b in &catalog.waiting {
        println!("  {}  waiting for WAL up to {} to be archived", b.id, b.end_lsn);
    }
    println!("archived WAL");
    if catalog.ranges.is_empty() {
        println!("  none");
    }
    for r in &catalog.ranges {
        println!("  timeline {}: {} .. {}", r.timeline, r.start, r.end);
    }
    println!("timelines");
    for t in &catalog.timelines {
        match (&t.parent, &t.switch_lsn) {
            (Some(parent), Some(switch)) => println!("  {} (from {} at {})", t.timeline, parent, switch),
            _ => println!("  {}", t.timeline),
        }
    }
    match window {
        Some(w) => println!(
            "restorable window\n  from {} ({}) to the last archived commit at {} (WAL archived to {})",
            w.earliest,
            w.earliest_lsn,
            w.latest.as_deref().unwrap_or("(none yet)"),
            w.latest_lsn
        ),
        None => println!("restorable window\n  none (no restorable base backup yet)"),
    }
    println!("last restore drill");
    match drill {
        Some(d) if d.passed => println!(
            "  passed {} (target {}, RTO {:.1} s, {} tables checked)",
            d.finished,
            d.target,
            d.rto_seconds.unwrap_or(0.0),
            d.row_counts.len()
        ),
        Some(d) => println!("  FAILED {}: {}", d.finished, d.failure.as_deref().unwrap_or("")),
        None => println!("  none (`tidemark-agent drill` runs one)"),
    }
    Ok(())
}

/// Runs `work` unless SIGINT or SIGTERM comes first.
async fn until_interrupted(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::select! {
        result = work => result,
        _ = term.recv() => Err(Fail::new("interrupted; the scratch restore was removed", "run the command again").into()),
        _ = int.recv() => Err(Fail::new("interrupted; the scratch restore was removed", "run the command again").into()),
    }
}

async fn run_extract(repo: &Repository, url: &str, args: ExtractArgs) -> anyhow::Result<()> {
    use crate::extract::{Destination, Format};
    let tables = args.tables.iter().map(|t| canonical_table(t)).collect::<Result<Vec<_>, _>>().map_err(|e| {
        Fail::new(e, "tables are schema.name, quoted as in SQL: '\"User\"', 'public.\"AttendanceRecord\"'")
    })?;
    let destination = match (args.to, args.into) {
        (Some(path), None) => Destination::File {
            path,
            format: match args.format.as_str() {
                "sql" => Format::Sql,
                "copy" => Format::Copy,
                _ => Format::Csv,
            },
        },
        (None, Some(url)) => Destination::Into { url },
        _ => return Err(Fail::new("give one of --to and --into", "--to FILE writes a file; --into URL inserts").into()),
    };
    let options = crate::extract::ExtractOptions {
        tables,
        condition: args.condition,
        target: args.target.target()?,
        database: args.database,
        destination,
        with_dependents: args.with_dependents,
        all_columns_key: args.all_columns_key,
        scratch: args.scratch.options(),
    };
    let extracted = crate::extract::extract(repo, url, options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&extracted)?);
    } else {
        for (table, rows, present) in &extracted.tables {
            match present {
                0 => println!("{table}: {rows} rows"),
                _ => println!("{table}: {rows} rows inserted, {present} already present (left as they are)"),
            }
        }
        match extracted.left_out_bytes {
            0 => println!("(scratch restore: {:.1} MB fetched)", extracted.fetched_bytes as f64 / 1e6),
            left => println!(
                "(scratch restore: {:.1} MB fetched, {:.1} MB of other databases left out)",
                extracted.fetched_bytes as f64 / 1e6,
                left as f64 / 1e6
            ),
        }
    }
    Ok(())
}

async fn run_repair(repo: &Repository, url: &str, args: RepairArgs) -> anyhow::Result<()> {
    use crate::repair::OnConflict;
    let table = args
        .table
        .as_deref()
        .map(canonical_table)
        .transpose()
        .map_err(|e| Fail::new(e, "tables are schema.name, quoted as in SQL"))?;
    let options = crate::repair::RepairOptions {
        xid: args.xid,
        table,
        into: args.into,
        on_conflict: match args.on_conflict.as_deref() {
            Some("ours") => OnConflict::Ours,
            Some("theirs") => OnConflict::Theirs,
            _ => OnConflict::Report,
        },
        all_columns_key: args.all_columns_key,
        apply: args.apply,
        scratch: args.scratch.options(),
    };
    let (plan, applied) = crate::repair::repair(repo, url, &options).await?;
    print!("{}", crate::repair::render(&plan, applied.as_ref()));
    Ok(())
}

fn print_restore(report: &crate::restore::RestoreReport) {
    let verb = if report.dry_run { "would restore" } else { "restored" };
    println!("{verb} backup {} into {} for {}", report.backup_id, report.pgdata, report.target);
    println!(
        "  {} bytes to fetch; WAL from {} (timeline {}), needed to {}, archived to {} on timeline {} ({} segments)",
        report.bytes_to_fetch,
        report.wal_start_lsn,
        report.timeline,
        report.wal_needed_to_lsn,
        report.wal_available_to_lsn,
        report.target_timeline,
        report.segments_to_replay
    );
    for placement in &report.tablespaces {
        let moved = if placement.moved() { " (moved)" } else { "" };
        println!(
            "  tablespace {} (on the source {}) into {}{moved}",
            placement.oid,
            placement.original,
            placement.target.display()
        );
    }
    if let Some(lsn) = &report.reached_lsn {
        println!("  recovery reached {} (last transaction {})", lsn, report.reached_time.as_deref().unwrap_or("none"));
        if report.isolated {
            println!(
                "  isolated: its Unix socket in {} only; the source's settings are in *.production",
                report.pgdata
            );
        }
        for name in &report.subscriptions_disabled {
            println!("  subscription {name} disabled in the copy (its publisher was not contacted)");
        }
    } else if !report.dry_run {
        println!(
            "  start it with: pg_ctl -D {} start   (recovery.signal and the recovery settings are in place)",
            report.pgdata
        );
    }
}
