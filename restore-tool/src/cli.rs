//! Command line of `tidemark-restore`: settings (TOML file, then
//! `TIDEMARK_*` variables, then flags), dispatch, error line with hint.

use crate::store::{ReadError, RepositoryReader};
use crate::wal_get::{wal_get, Fetched};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_proto::repo::backup::BackupManifest;

#[derive(Parser, Debug)]
#[command(name = "tidemark-restore", version, about = "Restores PostgreSQL from a Tidemark repository")]
struct Args {
    /// TOML config file (default ./tidemark.toml if it exists); only `repo` is read from it.
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
    #[command(group(clap::ArgGroup::new("target").required(true).args(["time", "lsn", "xid", "before_xid", "name", "latest", "immediate"])))]
    Restore {
        /// The new data directory (must be missing or empty, unless --force).
        #[arg(long)]
        pgdata: PathBuf,
        /// A time with a zone: RFC 3339 or `YYYY-MM-DD HH:MM:SS+TZ`.
        #[arg(long)]
        time: Option<String>,
        /// An LSN, X/Y.
        #[arg(long)]
        lsn: Option<String>,
        /// Stop just after this transaction commits.
        #[arg(long)]
        xid: Option<u32>,
        /// Stop just before this transaction commits.
        #[arg(long)]
        before_xid: Option<u32>,
        /// A named restore point (`tidemark-agent mark NAME`).
        #[arg(long)]
        name: Option<String>,
        /// Everything archived.
        #[arg(long)]
        latest: bool,
        /// Only the backup's own consistent point.
        #[arg(long)]
        immediate: bool,
        /// The timeline to follow: latest (default, the newest archived), current (the backup's) or a number.
        #[arg(long)]
        timeline: Option<String>,
        /// Use this backup instead of the newest that can reach the target.
        #[arg(long)]
        backup: Option<String>,
        /// Check and print the plan; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replace the contents of a non-empty --pgdata (never next to a running server).
        #[arg(long)]
        force: bool,
        /// Put a tablespace elsewhere than its original location: FROM (its
        /// OID or original location, see --dry-run) = TO (an absolute,
        /// missing or empty directory). Repeatable.
        #[arg(long = "tablespace-map", value_name = "FROM=TO", value_parser = crate::tablespaces::parse_mapping)]
        tablespace_map: Vec<(String, PathBuf)>,
        /// Start PostgreSQL on the result and wait until the target is reached.
        #[arg(long)]
        start: bool,
        /// Port for --start (default 5432).
        #[arg(long, default_value_t = 5432)]
        port: u16,
        /// Pause at the target instead of promoting.
        #[arg(long)]
        pause: bool,
        /// Directory of pg_ctl and psql for --start (default /usr/lib/postgresql/<major>/bin).
        #[arg(long)]
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
    },
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
        xid: Option<u32>,
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
    },
    /// Base backups, timelines, archived WAL and the restorable window.
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

/// Exit code that makes PostgreSQL abort recovery (anything above 125).
const ABORT_RECOVERY: u8 = 200;

pub fn main() -> ExitCode {
    // Restored files, staged WAL, the audit cache and the recovery settings
    // are for their owner only (PostgreSQL wants that of a data directory too).
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark-restore: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(args))
}

fn repo_url(args: &Args) -> Result<String, String> {
    if let Some(repo) = &args.repo {
        return Ok(repo.clone());
    }
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("tidemark.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let table: toml::Table =
                text.parse().map_err(|e| format!("config file {} is invalid: {e}", path.display()))?;
            Ok(table.get("repo").and_then(|v| v.as_str()).unwrap_or("./tidemark-repo").to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok("./tidemark-repo".into()),
        Err(e) => Err(format!("cannot read config file {}: {e}", path.display())),
    }
}

async fn dispatch(args: Args) -> ExitCode {
    let url = match repo_url(&args) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("tidemark-restore: error: {e}\nhint: fix --config or pass --repo");
            return ExitCode::FAILURE;
        }
    };
    let key_files = args.key_files.clone();
    match args.command {
        Command::Restore {
            pgdata,
            time,
            lsn,
            xid,
            before_xid,
            name,
            latest,
            immediate,
            timeline,
            backup,
            dry_run,
            force,
            tablespace_map,
            start,
            port,
            pause,
            pg_bin,
            wait_timeout,
            no_prefetch,
            cache_dir,
            json,
        } => {
            use crate::target::{parse_time, Target};
            let target = if let Some(text) = time {
                parse_time(&text).map(Target::Time)
            } else if let Some(text) = lsn {
                text.parse().map(Target::Lsn).map_err(|e: tidemark_proto::lsn::ParseLsnError| e.to_string())
            } else if let Some(xid) = xid {
                Ok(Target::Xid(xid))
            } else if let Some(xid) = before_xid {
                Ok(Target::BeforeXid(xid))
            } else if let Some(name) = name {
                Ok(Target::Name(name))
            } else if latest {
                Ok(Target::Latest)
            } else {
                debug_assert!(immediate);
                Ok(Target::Immediate)
            };
            let target = match target {
                Ok(target) => target,
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e}");
                    eprintln!(
                        "hint: times need a zone: 2026-11-25T10:31:00Z or \"2026-11-25 10:31:00+00\"; LSNs are X/Y"
                    );
                    return ExitCode::FAILURE;
                }
            };
            let options = crate::restore::RestoreOptions {
                pgdata,
                target,
                backup_id: backup,
                timeline,
                dry_run,
                force,
                start,
                port,
                pause,
                pg_bin,
                wait_timeout: std::time::Duration::from_secs(wait_timeout),
                prefetch: !no_prefetch,
                cache_dir,
                tablespace_map,
            };
            let result = async {
                let repo = RepositoryReader::open(&url, &key_files)?;
                crate::restore::restore(&repo, &url, options).await
            }
            .await;
            match result {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else {
                        print_restore(&report);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e:#}");
                    let hint = e
                        .chain()
                        .find_map(|c| {
                            c.downcast_ref::<crate::restore::Refusal>()
                                .map(|r| r.hint.clone())
                                .or_else(|| c.downcast_ref::<ReadError>().map(|r| r.hint().to_string()))
                        })
                        .unwrap_or_else(|| "see the message".to_string());
                    eprintln!("hint: {hint}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Timeline { table, since, until, xid, per, limit, cache_dir, json } => {
            let options = crate::timeline::TimelineOptions { table, since, until, xid, per, limit, json };
            let filter = match crate::timeline::filter_of(&options) {
                Ok(filter) => filter,
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e}");
                    eprintln!(
                        "hint: times need a zone (2026-11-25T10:31:00Z); tables are schema.name, quoted as in SQL"
                    );
                    return ExitCode::FAILURE;
                }
            };
            let result = async {
                let repo = RepositoryReader::open(&url, &key_files)?;
                let catalog = crate::catalog::Catalog::load(&repo).await?;
                crate::audit::Audit::load(&repo, &catalog, cache_dir.as_deref()).await
            }
            .await;
            match result {
                Ok(audit) => {
                    print!("{}", crate::timeline::render(&audit, &options, &filter));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e:#}");
                    let hint = e
                        .chain()
                        .find_map(|c| c.downcast_ref::<ReadError>().map(|r| r.hint().to_string()))
                        .unwrap_or_else(|| "check --repo and --cache-dir".into());
                    eprintln!("hint: {hint}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::List { json, cache_dir } => {
            let result = async {
                let repo = RepositoryReader::open(&url, &key_files)?;
                let catalog = crate::catalog::Catalog::load(&repo).await?;
                let audit = crate::audit::Audit::load(&repo, &catalog, cache_dir.as_deref()).await?;
                let latest = audit.last_commit().map(|c| crate::timeline::time_text(c.time));
                Ok::<_, anyhow::Error>((catalog, latest))
            }
            .await;
            match result {
                Ok((catalog, latest)) => {
                    print_list(&catalog, latest, json);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e:#}");
                    eprintln!("hint: check --repo (it must be a repository made by `tidemark-agent init`)");
                    ExitCode::FAILURE
                }
            }
        }
        Command::FetchBackup { backup, pgdata, tablespace_map } => {
            let result = async {
                let repo = RepositoryReader::open(&url, &key_files)?;
                let id = if backup == "latest" {
                    crate::fetch::list_backups(&repo)
                        .await?
                        .pop()
                        .ok_or_else(|| ReadError::Other(anyhow::anyhow!("the repository has no complete backup")))?
                } else {
                    backup
                };
                let manifest = crate::fetch::read_manifest(&repo, &id).await?;
                let placements = crate::tablespaces::place(&manifest.tablespaces, &tablespace_map, &pgdata)
                    .map_err(|e| ReadError::Other(anyhow::anyhow!(e)))?;
                let bytes = crate::fetch::fetch_backup(&repo, &manifest, &pgdata, &placements, true).await?;
                Ok::<_, ReadError>((manifest, bytes))
            }
            .await;
            match result {
                Ok((manifest, bytes)) => {
                    println!(
                        "backup {} written to {} ({bytes} bytes); it needs WAL {} to {} on timeline {}",
                        manifest.id,
                        pgdata.display(),
                        manifest.start_lsn,
                        manifest.end_lsn,
                        manifest.timeline
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e:#}");
                    eprintln!("hint: {}", e.hint());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify { backup, json } => {
            let result = async {
                let repo = RepositoryReader::open(&url, &key_files)?;
                crate::verify::verify(&repo, backup.as_deref()).await
            }
            .await;
            match result {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else {
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
                    }
                    if report.problems.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!(
                            "tidemark-restore: error: {} bad objects in {}",
                            report.problems.len(),
                            url_display(&url)
                        );
                        eprintln!("hint: restore from a backup whose objects all verify, or replace the bad objects from a copy");
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("tidemark-restore: error: {e:#}");
                    eprintln!("hint: {}", e.hint());
                    ExitCode::FAILURE
                }
            }
        }
        Command::WalGet { segment, path, staged } => {
            if staged.is_some_and(|dir| crate::prefetch::take_staged(&dir, &segment, &path)) {
                return ExitCode::SUCCESS;
            }
            let result = match RepositoryReader::open(&url, &key_files) {
                Ok(repo) => wal_get(&repo, &segment, &path).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(Fetched::Written { .. }) => ExitCode::SUCCESS,
                Ok(Fetched::Missing) => {
                    eprintln!("tidemark-restore: {segment} is not in the repository");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("tidemark-restore: error: wal-get {segment}: {e:#}");
                    eprintln!("hint: {}", e.hint());
                    ExitCode::from(ABORT_RECOVERY)
                }
            }
        }
    }
}

fn print_list(catalog: &crate::catalog::Catalog, latest: Option<String>, json: bool) {
    let window = catalog.window_until(latest);
    if json {
        let value = serde_json::json!({
            "backups": catalog.restorable.iter().map(BackupManifest::summary).collect::<Vec<_>>(),
            "waiting_for_wal": catalog.waiting.iter().map(BackupManifest::summary).collect::<Vec<_>>(),
            "timelines": catalog.timelines,
            "window": window,
            "wal": catalog.ranges,
        });
        println!("{value:#}");
        return;
    }
    println!("backups (restorable)");
    if catalog.restorable.is_empty() {
        println!("  none");
    }
    for b in &catalog.restorable {
        println!(
            "  {}  timeline {}  {} .. {}  ended {}  {} bytes ({} stored)  {}",
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
        println!("  timeline {}: {} .. {}", r.timeline, r.start_lsn, r.end_lsn);
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
            w["earliest"].as_str().unwrap_or("?"),
            w["earliest_lsn"].as_str().unwrap_or("?"),
            w["latest"].as_str().unwrap_or("(none yet)"),
            w["latest_lsn"].as_str().unwrap_or("?")
        ),
        None => println!("restorable window\n  none (no restorable base backup yet)"),
    }
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
    } else if !report.dry_run {
        println!(
            "  start it with: pg_ctl -D {} start   (recovery.signal and the recovery settings are in place)",
            report.pgdata
        );
    }
}

fn url_display(url: &str) -> String {
    tidemark_proto::repo::redact_url(url)
}
