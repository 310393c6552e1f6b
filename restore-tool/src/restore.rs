//! `tidemark-restore restore`: check everything, then fetch the backup,
//! write the recovery settings, and (with `--start`) run PostgreSQL until the
//! target is reached.

use crate::audit::{Audit, Filter};
use crate::planner::{plan, Plan, Stop};
use crate::target::Target;
use anyhow::Context;
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_proto::wal::rmgr::XactStatus;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::catalog::Catalog;
use tidemark_repo::{Fail, RepoError, Repository};

#[derive(Clone)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub target: Target,
    pub backup_id: Option<String>,
    pub timeline: Option<String>,
    pub dry_run: bool,
    pub force: bool,
    /// `--allow-root`: restoring as root was asked for explicitly.
    pub allow_root: bool,
    /// Update the existing directory in place (`delta.rs`).
    pub delta: bool,
    pub start: bool,
    pub port: u16,
    pub pause: bool,
    pub pg_bin: Option<PathBuf>,
    /// How long --start waits for recovery to reach the target.
    pub wait_timeout: Duration,
    /// Stage WAL ahead of replay during --start.
    pub prefetch: bool,
    /// The audit cache (default under ~/.cache).
    pub cache_dir: Option<PathBuf>,
    /// `--tablespace-map FROM=TO`: tablespaces placed elsewhere than on the source.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Every tablespace not mapped goes to `<dir>/tablespace-<oid>` (scratch
    /// restores, which must never write where the source's tablespaces are).
    pub tablespaces_under: Option<PathBuf>,
    /// Only these user databases' files are fetched (the others are left
    /// as sparse files of zeros): scratch restores that read one database.
    pub only_databases: Option<Vec<u32>>,
    /// With --start: run the copy on the inert configuration of
    /// `isolate.rs` instead of the source's own settings.
    pub isolate: bool,
}

/// Where recovery will stop for a time, xid or restore-point target,
/// according to the WAL audit; a refusal when it never would.
fn resolve_stop(audit: &Audit, target: &Target) -> anyhow::Result<Lsn> {
    let timeline_hint = "`tidemark-restore timeline` lists the archived transactions and restore points";
    match target {
        Target::Time(t) => {
            let micros = (t.unix_timestamp_nanos() / 1000) as i64;
            match audit.first_end_after(micros) {
                Some(lsn) => Ok(lsn),
                None => {
                    let last = audit
                        .last_commit()
                        .map(|c| format!("the last archived commit is at {}", crate::audit_report::time_text(c.time)))
                        .unwrap_or_else(|| "no commit is archived yet".into());
                    Err(refuse(
                        format!(
                            "no transaction ends after {} in the archived WAL ({last}); recovery would run out of WAL before reaching the target",
                            crate::target::format_time(*t)
                        ),
                        "restore with --latest to get everything archived, or retry once a later commit is archived",
                    ))
                }
            }
        }
        Target::Xid(xid) | Target::BeforeXid(xid) => {
            let found = audit.query(&Filter { xid: Some(xid.0), ..Default::default() }, None).transactions;
            match found.iter().rev().find(|t| t.status == XactStatus::Committed) {
                Some(t) => Ok(Lsn(t.lsn)),
                None if !found.is_empty() => Err(refuse(
                    format!("transaction {xid} aborted; recovery never stops at an aborted transaction"),
                    timeline_hint,
                )),
                None => Err(refuse(
                    format!("transaction {xid} has no commit in the archived WAL (audited up to {})", audit.covered_to),
                    timeline_hint,
                )),
            }
        }
        Target::Name(name) => {
            let points = audit.restore_points();
            match points.iter().filter(|p| &p.name == name).map(|p| p.lsn).max() {
                Some(lsn) => Ok(Lsn(lsn)),
                None => {
                    let known: Vec<&str> = points.iter().rev().take(5).map(|p| p.name.as_str()).collect();
                    Err(refuse(
                        format!("there is no restore point named {name:?} in the archived WAL (newest: {known:?})"),
                        timeline_hint,
                    ))
                }
            }
        }
        _ => Err(anyhow::anyhow!("only time, xid and name targets are resolved by the audit")),
    }
}

#[derive(Debug, serde::Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub target: String,
    pub pgdata: String,
    pub dry_run: bool,
    /// The backup's timeline, and the one recovery follows to the target.
    pub timeline: TimelineId,
    pub target_timeline: TimelineId,
    pub wal_start_lsn: Lsn,
    pub wal_needed_to_lsn: Lsn,
    pub wal_available_to_lsn: Lsn,
    pub bytes_to_fetch: u64,
    /// Bytes of other user databases left out (as sparse files) when only
    /// some databases were asked for; 0 otherwise.
    pub bytes_left_out: u64,
    pub segments_to_replay: u64,
    /// Where each tablespace goes (its original location unless mapped).
    pub tablespaces: Vec<crate::tablespaces::Placement>,
    pub reached_lsn: Option<String>,
    pub reached_time: Option<String>,
    /// Where the time went: planning (catalog, target resolution, checks),
    /// fetching the backup, and recovery until the target (with --start).
    pub seconds: Timings,
    /// With --start: the PostgreSQL bin directory that runs the result.
    pub pg_bin: Option<String>,
    /// Started with the inert configuration (`--isolate`).
    pub isolated: bool,
    /// Without --isolate: what in the cluster's own settings (and
    /// catalog) reaches outside it, as printed before it started.
    pub reaches_outside: Vec<String>,
    /// With --isolate, once promoted: the subscriptions disabled in the
    /// copy's catalog (`database.name`).
    pub subscriptions_disabled: Vec<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Timings {
    pub plan: f64,
    pub fetch: f64,
    pub recovery: Option<f64>,
}

fn refuse(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    Fail::new(message, hint).into()
}

/// The pid in `postmaster.pid`, if that process is alive.
pub(crate) fn running_postmaster(pgdata: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// The target directory must be missing or empty (or `--force` on a data
/// directory it may replace: `force.rs`), never next to a running server;
/// `--start` never runs PostgreSQL as root, and a restore runs as root only
/// when asked (`--allow-root`): the repository's files are data from
/// outside, and root may write anywhere.
fn check_target_directory(options: &RestoreOptions, keep: &[PathBuf]) -> anyhow::Result<()> {
    if let Some(pid) = running_postmaster(&options.pgdata) {
        return Err(refuse(
            format!("a postmaster (pid {pid}) is running on {}", options.pgdata.display()),
            "stop that server first; a restore never writes next to a running one",
        ));
    }
    let empty = crate::fetch::is_empty_or_missing(&options.pgdata)?;
    if !empty && !options.force && !options.delta {
        return Err(refuse(
            format!("{} is not empty", options.pgdata.display()),
            "restore into a new or empty directory, or pass --force to replace its contents",
        ));
    }
    if !empty && options.force {
        crate::force::check_replaceable(&options.pgdata, keep)?;
    }
    if options.pause && matches!(options.target, Target::Latest) {
        return Err(refuse(
            "--pause needs a target: with --latest recovery ends at the end of the archive and the server promotes",
            "give a target (--time, --lsn, --xid, --before-xid, --name, --immediate), or leave out --pause",
        ));
    }
    if options.isolate && !options.start {
        return Err(refuse(
            "--isolate is how --start runs the restored server; without --start nothing is started",
            "add --start to start it isolated, or leave out --isolate",
        ));
    }
    if options.start && unsafe { libc::geteuid() } == 0 {
        return Err(refuse(
            "--start cannot run PostgreSQL as root",
            "run tidemark-restore as the PostgreSQL OS user (e.g. sudo -u postgres), or restore without --start",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if !options.dry_run && !options.allow_root && unsafe { libc::geteuid() } == 0 {
        return Err(refuse(
            "restore will not run as root unless asked: root would write the repository's files anywhere",
            "run tidemark-restore as the PostgreSQL OS user (e.g. sudo -u postgres), or pass --allow-root",
        ));
    }
    Ok(())
}

/// What a restore must never replace nor put a tablespace over (besides
/// `/` and system directories): home directories, the local repository,
/// the key files and the audit cache.
fn kept_places(repo_url: &str, key_files: &[PathBuf], options: &RestoreOptions) -> Vec<PathBuf> {
    let mut keep = crate::places::home_directories();
    if !repo_url.contains("://") || repo_url.starts_with("file://") {
        keep.push(PathBuf::from(repo_url.strip_prefix("file://").unwrap_or(repo_url)));
    }
    keep.extend(key_files.iter().cloned());
    keep.extend(options.cache_dir.iter().cloned());
    keep.into_iter().map(|k| k.canonicalize().unwrap_or(k)).collect()
}

/// Where recovery stops (from the audit, for time, xid and name targets)
/// and the plan that reaches it.
async fn make_plan(repo: &Repository, catalog: &Catalog, options: &RestoreOptions) -> anyhow::Result<Plan> {
    let now = time::OffsetDateTime::now_utc();
    let (quick, known_before) = match &options.target {
        // A time needs only the ends after it: no audit cache to build.
        Target::Time(t) => {
            crate::audit::first_end_after_quick(repo, catalog, (t.unix_timestamp_nanos() / 1000) as i64).await?
        }
        _ => (None, None),
    };
    let stop_lsn = match &options.target {
        Target::Time(_) if quick.is_some() => quick,
        Target::Time(_) | Target::Xid(_) | Target::BeforeXid(_) | Target::Name(_) => {
            let audit = Audit::load(repo, catalog, options.cache_dir.as_deref()).await?;
            Some(resolve_stop(&audit, &options.target)?)
        }
        _ => None,
    };
    let stop = Stop { lsn: stop_lsn, known_before };
    plan(catalog, options.target.clone(), options.backup_id.as_deref(), options.timeline.as_deref(), stop, now)
        .map_err(|e| refuse(e.to_string(), "`tidemark-restore list` shows the backups and the window"))
}

/// Where each tablespace goes: `--tablespace-map`, else inside
/// `tablespaces_under` (scratch restores), else its original place.
fn placements(
    options: &RestoreOptions,
    plan: &Plan,
    keep: &[PathBuf],
) -> anyhow::Result<Vec<crate::tablespaces::Placement>> {
    let mut mappings = options.tablespace_map.clone();
    if let Some(dir) = &options.tablespaces_under {
        for t in &plan.backup.tablespaces {
            if !mappings.iter().any(|(from, _)| *from == t.oid.to_string() || *from == t.location) {
                mappings.push((t.oid.to_string(), dir.join(format!("tablespace-{}", t.oid))));
            }
        }
    }
    crate::tablespaces::place(&plan.backup.tablespaces, &mappings, &options.pgdata, keep)
        .map_err(|e| refuse(e, "`restore --dry-run --json` shows each tablespace's OID and original location"))
}

/// Every chunk the restore reads (along the chain of an incremental
/// backup) and the server's manifest are in the repository; returns the
/// bytes of the chunks the fetch reads, and those of the files of databases
/// left out.
async fn check_objects(
    repo: &Repository,
    plan: &Plan,
    chain: &[tidemark_proto::repo::backup::BackupManifest],
    only_databases: Option<&[u32]>,
) -> anyhow::Result<(u64, u64)> {
    let present: HashSet<String> = repo.list("backups").await?.into_iter().collect();
    let links = tidemark_proto::repo::chain::Chain::new(chain).map_err(|reason| RepoError::Corrupt {
        key: tidemark_proto::repo::backup::manifest_key(&plan.backup.id),
        reason,
    })?;
    let (mut bytes_to_fetch, mut bytes_left_out) = (0, 0);
    for file in &plan.backup.files {
        if crate::fetch::is_skipped(file, only_databases) {
            bytes_left_out += file.size;
            continue;
        }
        let corrupt =
            |reason| RepoError::Corrupt { key: tidemark_proto::repo::backup::manifest_key(&plan.backup.id), reason };
        let (chunks, xor_bases): (Vec<_>, Vec<_>) = match file.blocks {
            None => (file.chunks.iter().collect(), Vec::new()),
            Some(_) => {
                let uses = links.plan(file).map_err(corrupt)?;
                // XORed pages are undone with the whole copy's: it must all be there.
                let xor = uses.iter().any(|u| u.xor_blocks.is_some());
                let whole = links.layers(file).map_err(corrupt)?.last().copied();
                let bases = whole.filter(|_| xor).map(|w| w.chunks.iter().collect()).unwrap_or_default();
                (uses.into_iter().map(|u| u.chunk).collect(), bases)
            }
        };
        // (chunk, whether the plan fetches it): the whole copy's chunks are
        // read for the XOR, and counted where the plan also fetches them.
        let needed = chunks.into_iter().map(|c| (c, true)).chain(xor_bases.into_iter().map(|c| (c, false)));
        for (chunk, fetched) in needed {
            if !present.contains(&chunk.key) {
                return Err(RepoError::Corrupt {
                    key: chunk.key.clone(),
                    reason: format!("missing (needed by {})", file.path),
                }
                .into());
            }
            if fetched {
                bytes_to_fetch += chunk.raw_len;
            }
        }
    }
    if !present.contains(&plan.backup.pg_manifest_key) {
        return Err(RepoError::Corrupt { key: plan.backup.pg_manifest_key.clone(), reason: "missing".into() }.into());
    }
    Ok((bytes_to_fetch, bytes_left_out))
}

/// What the checks before any write found.
struct Checked {
    plan: Plan,
    /// The backup and those it is incremental on, newest first.
    chain: Vec<tidemark_proto::repo::backup::BackupManifest>,
    /// --delta onto an existing data directory (checked to be this cluster's).
    delta_onto_existing: bool,
    placements: Vec<crate::tablespaces::Placement>,
    bytes_to_fetch: u64,
    bytes_left_out: u64,
    /// With --start: the PostgreSQL bin directory of the backup's version.
    pg_bin: Option<PathBuf>,
    /// With --start: the source's configuration files, as the backup holds them.
    config: Option<crate::server_config::BackupConfig>,
    planning_seconds: f64,
}

/// Everything checked before anything is written: the target directory,
/// the plan, the objects it reads, where tablespaces go, and (with
/// --start) the PostgreSQL installation that will run the result.
async fn check_everything(repo: &Repository, options: &RestoreOptions, keep: &[PathBuf]) -> anyhow::Result<Checked> {
    // 1. The target directory: checked before anything else is read or written.
    check_target_directory(options, keep)?;
    // 2. The plan: a backup that reaches the target, and the WAL it needs.
    let catalog = Catalog::load(repo).await?;
    let planning = std::time::Instant::now();
    let plan = make_plan(repo, &catalog, options).await?;
    // 3. Every object the restore reads must be there, along the chain of
    //    backups an incremental one is based on.
    let chain = tidemark_repo::catalog::read_chain(repo, &plan.backup).await?;
    // Every path the backup lists stays beneath where it is written.
    crate::beneath::check_manifest(&plan.backup)?;
    if options.force && !options.delta && !crate::fetch::is_empty_or_missing(&options.pgdata)? {
        crate::force::check_same_cluster(&options.pgdata, &plan.backup.system_identifier)?;
    }
    let delta_onto_existing = options.delta && !crate::fetch::is_empty_or_missing(&options.pgdata)?;
    if delta_onto_existing {
        crate::delta::check_target(&options.pgdata, &plan.backup.system_identifier)?;
    }
    let (bytes_to_fetch, bytes_left_out) =
        check_objects(repo, &plan, &chain, options.only_databases.as_deref()).await?;
    // 4. Where the tablespaces go: each directory missing or empty (with
    //    --delta onto a directory: or the one it already uses).
    let placements = placements(options, &plan, keep)?;
    if delta_onto_existing {
        crate::delta::check_placements(&options.pgdata, &plan.backup, &placements)?;
    } else {
        crate::fetch::check_placements(&plan.backup, &placements).map_err(|e| {
            refuse(e.to_string(), "a tablespace directory must be new or empty; --force never clears one")
        })?;
    }
    // 5. The programs that start it, of the backup's major version.
    let pg_bin = match options.start {
        true => Some(crate::pg_bin::find(options.pg_bin.as_deref(), plan.backup.server_version_num / 10000)?),
        false => None,
    };
    // 6. What it starts with, and where it will listen.
    let config = match options.start {
        true => Some(check_start(repo, &plan, options).await?),
        false => None,
    };
    let planning_seconds = planning.elapsed().as_secs_f64();
    Ok(Checked {
        plan,
        chain,
        delta_onto_existing,
        placements,
        bytes_to_fetch,
        bytes_left_out,
        pg_bin,
        config,
        planning_seconds,
    })
}

/// For --start: the backup's own configuration files (read from the
/// repository), a configuration to start with, and a socket path and
/// port the server can take.
async fn check_start(
    repo: &Repository,
    plan: &Plan,
    options: &RestoreOptions,
) -> anyhow::Result<crate::server_config::BackupConfig> {
    let config = crate::server_config::read(repo, &plan.backup).await?;
    if !options.isolate && !config.has_postgresql_conf {
        return Err(refuse(
            format!(
                "backup {} has no postgresql.conf: the cluster's configuration lived outside its data directory \
                 (as in Debian's /etc/postgresql), so --start has no settings of its own to start it with",
                plan.backup.id
            ),
            "add --isolate to start it on a generated inert configuration, or restore without --start and \
             start it with its configuration (e.g. postgres -c config_file=/etc/postgresql/.../postgresql.conf)",
        ));
    }
    if options.port == 0 {
        return Err(refuse("--port 0 is not a port PostgreSQL can listen on", "give --port a free port number"));
    }
    // The server's socket is in the data directory, and Unix limits its path to 107 bytes.
    let directory = std::path::absolute(&options.pgdata).unwrap_or_else(|_| options.pgdata.clone());
    let socket = directory.join(format!(".s.PGSQL.{}", options.port));
    let length = socket.as_os_str().len();
    if length > 107 {
        return Err(refuse(
            format!("the server's socket {} would be {length} bytes long; Unix allows 107", socket.display()),
            "restore into a --pgdata with a shorter path",
        ));
    }
    // Without --isolate it listens on 127.0.0.1:--port, checked free now
    // rather than after the fetch; isolated, it listens on no TCP port.
    if !options.isolate {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", options.port)) {
            return Err(refuse(
                format!("port {} on 127.0.0.1, where --start would listen, is not free: {e}", options.port),
                "choose a free port with --port, or stop what listens there",
            ));
        }
    }
    Ok(config)
}

/// The backup into --pgdata: fetched into a new directory, or with --delta
/// onto the existing one. Returns the bytes written.
async fn write_backup(
    repo: &Repository,
    options: &RestoreOptions,
    chain: &[tidemark_proto::repo::backup::BackupManifest],
    placements: &[crate::tablespaces::Placement],
    delta_onto_existing: bool,
) -> anyhow::Result<u64> {
    if delta_onto_existing {
        return crate::delta::apply(repo, chain, &options.pgdata, placements).await.map(|r| r.bytes_written);
    }
    let databases = options.only_databases.as_deref();
    crate::fetch::fetch_backup(repo, chain, &options.pgdata, placements, !options.start, databases, options.force).await
}

pub async fn restore(repo: &Repository, repo_url: &str, options: RestoreOptions) -> anyhow::Result<RestoreReport> {
    let checked = check_everything(repo, &options, &kept_places(repo_url, &repo.key_files, &options)).await?;
    let segment_size = repo.meta().await?.wal_segment_size;
    let mut report = new_report(&options, &checked, segment_size);
    let Checked { plan, chain, delta_onto_existing, placements, pg_bin, config, .. } = checked;
    if !options.isolate {
        if let Some(config) = &config {
            // Said before anything is fetched or started.
            report.reaches_outside = crate::server_config::reaches_outside(&config.settings);
            announce(&report.reaches_outside);
        }
    }
    if options.dry_run {
        return Ok(report);
    }
    // 5. Write: the backup (with --force, swapped in for the old data only
    //    once complete), then the recovery settings.
    // With --start, WAL is staged ahead of replay from now on, while the
    // backup is fetched, into a directory beside --pgdata.
    let staging = if options.start && options.prefetch { Some(wal_staging_dir(&options.pgdata)?) } else { None };
    let segments = crate::planner::segments_along(&plan.history, plan.wal_start, plan.wal_available_to, segment_size);
    let stage = async {
        if let Some(dir) = &staging {
            crate::prefetch::stage(repo, segments, segment_size, dir.clone()).await;
        }
    };
    tokio::pin!(stage);
    let mut staged = staging.is_none();
    let fetching = std::time::Instant::now();
    let bin = pg_bin.clone().unwrap_or_default();
    let fetched = {
        let fetch = async {
            write_backup(repo, &options, &chain, &placements, delta_onto_existing).await?;
            if let (true, Some(config)) = (options.isolate, &config) {
                put_inert_configuration(&options, &bin, &config.settings).await?;
            }
            write_recovery_settings(&options, &plan, repo_url, &repo.key_files, staging.as_deref())
        };
        tokio::pin!(fetch);
        loop {
            tokio::select! {
                result = &mut fetch => break result,
                _ = &mut stage, if !staged => staged = true,
            }
        }
    };
    let remove_staging = || {
        if let Some(dir) = &staging {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    if let Err(e) = fetched {
        remove_staging();
        return Err(e);
    }
    report.seconds.fetch = fetching.elapsed().as_secs_f64();
    if !options.start {
        return Ok(report);
    }
    let recovering = std::time::Instant::now();
    let waiting = start_and_wait(&options, &plan, &bin);
    tokio::pin!(waiting);
    let result = loop {
        tokio::select! {
            result = &mut waiting => break result,
            _ = &mut stage, if !staged => staged = true,
        }
    };
    remove_staging();
    let started = result?;
    report.seconds.recovery = Some(recovering.elapsed().as_secs_f64());
    report.reached_lsn = started.replay_lsn;
    report.reached_time = started.replay_time;
    report.reaches_outside.extend(started.subscriptions);
    report.subscriptions_disabled = started.subscriptions_disabled;
    Ok(report)
}

/// The report of what the checks found (the rest is filled in as it happens).
fn new_report(options: &RestoreOptions, checked: &Checked, segment_size: u64) -> RestoreReport {
    let plan = &checked.plan;
    let segments_to_replay =
        plan.wal_available_to.segment_no(segment_size).saturating_sub(plan.wal_start.segment_no(segment_size)) + 1;
    RestoreReport {
        backup_id: plan.backup.id.clone(),
        target: plan.target.to_string(),
        pgdata: options.pgdata.display().to_string(),
        dry_run: options.dry_run,
        timeline: plan.backup.timeline,
        target_timeline: plan.target_timeline,
        wal_start_lsn: plan.wal_start,
        wal_needed_to_lsn: plan.wal_needed_to,
        wal_available_to_lsn: plan.wal_available_to,
        bytes_to_fetch: checked.bytes_to_fetch,
        bytes_left_out: checked.bytes_left_out,
        segments_to_replay,
        tablespaces: checked.placements.clone(),
        reached_lsn: None,
        reached_time: None,
        seconds: Timings { plan: checked.planning_seconds, ..Default::default() },
        pg_bin: checked.pg_bin.as_ref().map(|p| p.display().to_string()),
        isolated: options.start && options.isolate,
        reaches_outside: Vec::new(),
        subscriptions_disabled: Vec::new(),
    }
}

/// Prints, before the copy starts with its own settings, what in them
/// reaches outside it.
fn announce(found: &[String]) {
    if found.is_empty() {
        return;
    }
    eprintln!(
        "tidemark-restore: warning: the restored cluster starts with its own settings, and these reach outside it:"
    );
    for line in found {
        eprintln!("  - {line}");
    }
    eprintln!("  (--isolate starts it inert instead: Unix socket only, no subscriptions, no synchronous standby, no archiving)");
}

/// The inert configuration of `isolate.rs` in the restored directory, with
/// what the data needs from its pg_control and the source's files.
async fn put_inert_configuration(
    options: &RestoreOptions,
    bin: &Path,
    settings: &crate::server_config::Settings,
) -> anyhow::Result<()> {
    let pgdata = options.pgdata.canonicalize()?;
    let control = crate::isolate::controldata(bin, &pgdata).await;
    let needed = crate::isolate::Needed::new(settings, control.as_deref());
    crate::isolate::apply(&pgdata, &crate::isolate::postgresql_conf(&needed, &pgdata, options.port))
}

/// A new, empty directory beside `pgdata` for WAL staged ahead of replay
/// (outside the data directory, so staging can start before it exists).
fn wal_staging_dir(pgdata: &Path) -> anyhow::Result<PathBuf> {
    let dir = crate::fetch::staging_beside(pgdata, "wal")?;
    std::fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// A value for postgresql.auto.conf. PostgreSQL's configuration parser
/// reads backslash escapes inside quotes (`\'`, `\\`, `\n`), so a
/// backslash is doubled as well as a quote: a restore point name or path
/// ending in `\` would otherwise escape the closing quote.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// An absolute repository URL: the server runs restore_command in the data directory.
fn absolute_url(url: &str) -> anyhow::Result<String> {
    if url.contains("://") && !url.starts_with("file://") {
        return Ok(url.to_string());
    }
    let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    let absolute = path.canonicalize().with_context(|| format!("resolve repository path {}", path.display()))?;
    Ok(format!("file://{}", absolute.display()))
}

/// One word of the shell command PostgreSQL runs as restore_command: in
/// single quotes for the shell (a `'` inside becomes `'\''`), with `%`
/// doubled, since PostgreSQL replaces `%f`, `%p` and `%r` before the shell
/// sees the command.
fn command_word(text: &str) -> String {
    format!("'{}'", text.replace('%', "%%").replace('\'', "'\\''"))
}

fn write_recovery_settings(
    options: &RestoreOptions,
    plan: &Plan,
    repo_url: &str,
    key_files: &[PathBuf],
    staged: Option<&Path>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("find this program's path for restore_command")?;
    let path = |p: &Path| command_word(&p.display().to_string());
    let staged = staged.map(|dir| format!(" --staged {}", path(dir))).unwrap_or_default();
    let mut keys = String::new();
    for file in key_files {
        let absolute = file.canonicalize().with_context(|| format!("resolve key file {}", file.display()))?;
        keys.push_str(&format!(" --key-file {}", path(&absolute)));
    }
    let restore_command =
        format!("{} --repo {}{keys} wal-get{staged} %f %p", path(&exe), command_word(&absolute_url(repo_url)?));
    let mut settings = vec![("restore_command".to_string(), restore_command)];
    // A backup of a standby carries its primary_conninfo: the restored
    // cluster must never stream from (or hold a slot on) the server it came
    // from, only replay the repository's WAL.
    settings.push(("primary_conninfo".into(), String::new()));
    settings.push(("primary_slot_name".into(), String::new()));
    // Nor may it push its WAL (a new timeline) into the source's archive
    // through an archive_command it inherited; Tidemark itself streams and
    // needs no archiving. Re-enable it deliberately on a restored cluster.
    settings.push(("archive_mode".into(), "off".into()));
    settings.extend(plan.target.settings());
    // The timeline the plan checked, by number: one that appears later is not followed blindly.
    settings.push(("recovery_target_timeline".into(), plan.target_timeline.to_string()));
    if !matches!(plan.target, Target::Latest) {
        settings.push(("recovery_target_action".into(), if options.pause { "pause" } else { "promote" }.into()));
    }
    let mut text = format!("\n# Written by tidemark-restore: backup {}, target {}\n", plan.backup.id, plan.target);
    for (key, value) in settings {
        text.push_str(&format!("{key} = {}\n", quote(&value)));
    }
    // Beneath the data directory without following links: the backup's
    // links are data from outside (`beneath.rs`).
    let pgdata = crate::beneath::Beneath::open(&options.pgdata)?;
    let mut file = pgdata.append_file("postgresql.auto.conf", 0o600)?;
    file.write_all(text.as_bytes()).context("write recovery settings")?;
    file.sync_all().context("fsync postgresql.auto.conf")?;
    // standby.signal (in a standby's backup) would keep the server in standby
    // mode past the end of the archive instead of ending recovery.
    pgdata.remove("standby.signal")?;
    pgdata.write_file("recovery.signal", b"", 0o600)?;
    Ok(())
}

/// What `--start` saw of the restored server.
struct Started {
    /// The replayed LSN and the commit time of the last replayed transaction.
    replay_lsn: Option<String>,
    replay_time: Option<String>,
    /// Without --isolate: the subscriptions in its catalog, described.
    subscriptions: Vec<String>,
    /// With --isolate, once promoted: the subscriptions disabled.
    subscriptions_disabled: Vec<String>,
}

/// Runs `pg_ctl start` on `pgdata` with `server_options`, its log in `log`.
async fn pg_ctl_start(bin: &Path, pgdata: &Path, log: &Path, server_options: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new(bin.join("pg_ctl"))
        .arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(log)
        .arg("-o")
        .arg(server_options)
        .arg("-W")
        .arg("start")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .with_context(|| format!("run {}", bin.join("pg_ctl").display()))?;
    anyhow::ensure!(status.success(), "pg_ctl could not start the restored server; see {}", log.display());
    Ok(())
}

/// Starts the restored server and waits until recovery promoted (or
/// paused, with --pause). It listens on 127.0.0.1:port, or with --isolate
/// on its Unix socket only; its socket is in the data directory.
async fn start_and_wait(options: &RestoreOptions, plan: &Plan, bin: &Path) -> anyhow::Result<Started> {
    let pgdata = options.pgdata.canonicalize()?;
    let log = pgdata.join("tidemark-restore.log");
    let listen = if options.isolate { "''" } else { "127.0.0.1" };
    let server_options =
        format!("-p {} -c listen_addresses={listen} -c unix_socket_directories='{}'", options.port, pgdata.display());
    pg_ctl_start(bin, &pgdata, &log, &server_options).await?;
    let started = std::time::Instant::now();
    let mut seen_pid = false;
    let mut outcome =
        Started { replay_lsn: None, replay_time: None, subscriptions: Vec::new(), subscriptions_disabled: Vec::new() };
    let mut subscriptions_named = options.isolate;
    // Replay measured by position: from the backup's start to where recovery stops.
    let replay_to = match plan.target {
        Target::Latest => plan.wal_available_to,
        _ => plan.stop_lsn.unwrap_or(plan.wal_needed_to).max(plan.wal_needed_to),
    };
    let replay_total = replay_to.0.saturating_sub(plan.wal_start.0);
    let progress = tidemark_repo::progress::Progress::bytes("restore: WAL replay", replay_total);
    let mut failed_queries = 0u32;
    loop {
        let alive = running_postmaster(&pgdata).is_some();
        seen_pid |= alive;
        if !alive && (seen_pid || started.elapsed() > Duration::from_secs(30)) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let fatal = text.lines().rev().find(|l| l.contains("FATAL")).unwrap_or("the server exited").to_string();
            return Err(refuse(
                format!("recovery failed: {}", fatal.trim()),
                format!("see {}; is the target inside the window shown by `tidemark-restore list`?", log.display()),
            ));
        }
        if started.elapsed() > options.wait_timeout {
            return Err(refuse(
                format!("recovery did not reach the target within {} s", options.wait_timeout.as_secs()),
                format!(
                    "the server is still running; see {} and pg_stat_activity, or raise --wait-timeout",
                    log.display()
                ),
            ));
        }
        let probed = match probe_recovery(&pgdata, options.port).await {
            Ok(probed) => {
                failed_queries = 0;
                probed
            }
            // Connected, but the query fails: say why rather than poll on (a minute of it at most).
            Err(message) => {
                failed_queries += 1;
                if failed_queries > 300 {
                    return Err(refuse(
                        format!("the restored server answers but its recovery cannot be read: {message}"),
                        format!("see {}; the server is still running", log.display()),
                    ));
                }
                None
            }
        };
        if let Some(probe) = probed {
            // Subscriptions live in the catalog: named as soon as the server
            // answers, during recovery (their workers start only after it).
            if !subscriptions_named {
                outcome.subscriptions = name_subscriptions(&pgdata, options.port).await;
                subscriptions_named = true;
            }
            let replayed = probe.replay_lsn.as_deref().and_then(|l| l.parse::<Lsn>().ok());
            if let Some(lsn) = replayed {
                progress.set(lsn.0.saturating_sub(plan.wal_start.0).min(replay_total));
            }
            let done = if options.pause { probe.in_recovery && probe.paused } else { !probe.in_recovery };
            if done {
                progress.set(replay_total);
                progress.finish();
                // Only a promoted copy can write its catalog; a paused one
                // (scratch restores) has the workers setting as its defence,
                // and one restored for some databases only cannot reach the others'.
                if options.isolate && !probe.in_recovery && options.only_databases.is_none() {
                    outcome.subscriptions_disabled = disable_subscriptions(&pgdata, options.port).await;
                }
                (outcome.replay_lsn, outcome.replay_time) = (probe.replay_lsn, probe.replay_time);
                return Ok(outcome);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The subscriptions of a promoted isolated copy disabled, or a warning:
/// with no logical replication workers they cannot start either way.
async fn disable_subscriptions(pgdata: &Path, port: u16) -> Vec<String> {
    match crate::isolate::disable_subscriptions(pgdata, port).await {
        Ok(disabled) => disabled,
        Err(e) => {
            eprintln!(
                "tidemark-restore: warning: the isolated copy's subscriptions could not be disabled ({e:#}); \
                 max_logical_replication_workers = 0 keeps them from starting"
            );
            Vec::new()
        }
    }
}

/// Prints the subscriptions of a copy started with its own settings and
/// returns them described (nothing when the catalog cannot be read).
async fn name_subscriptions(pgdata: &Path, port: u16) -> Vec<String> {
    let described: Vec<String> = crate::server_config::subscriptions(pgdata, port)
        .await
        .unwrap_or_default()
        .iter()
        .filter(|s| s.enabled)
        .map(|s| s.describe())
        .collect();
    for line in &described {
        eprintln!("tidemark-restore: warning: {line}");
    }
    described
}

/// What the restored server says of its recovery.
pub(crate) struct RecoveryProbe {
    pub in_recovery: bool,
    pub paused: bool,
    pub replay_lsn: Option<String>,
    pub replay_time: Option<String>,
}

/// Asks the restored server, over its private socket, how recovery stands:
/// `Ok(None)` while it does not accept connections yet, `Err` with the
/// server's message when it accepts them but the query fails.
pub(crate) async fn probe_recovery(pgdata: &Path, port: u16) -> Result<Option<RecoveryProbe>, String> {
    let Ok((client, connection)) = tokio_postgres::Config::new()
        .host_path(pgdata)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
    else {
        return Ok(None);
    };
    let session = tokio::spawn(connection);
    let answer = async {
        let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
        // The pause state exists only during recovery (asking after
        // promotion is an error); PostgreSQL 13 has only the boolean.
        let paused =
            if version >= 140_000 { "pg_get_wal_replay_pause_state() = 'paused'" } else { "pg_is_wal_replay_paused()" };
        let query = format!(
            "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN {paused} ELSE false END, \
             pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()::text"
        );
        client.query_one(&query, &[]).await
    }
    .await;
    drop(client);
    let _ = session.await;
    let row = answer.map_err(|e| match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    })?;
    let read = || -> Result<RecoveryProbe, tokio_postgres::Error> {
        Ok(RecoveryProbe {
            in_recovery: row.try_get(0)?,
            paused: row.try_get(1)?,
            replay_lsn: row.try_get(2)?,
            replay_time: row.try_get(3)?,
        })
    };
    read().map(Some).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::{command_word, quote};

    #[test]
    fn settings_escape_backslashes_and_quotes() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote(r"it's a \"), r"'it''s a \\'");
        // A restore_command word holding a quote carries a backslash too.
        assert_eq!(quote(&command_word("/srv/it's")), r"'''/srv/it''\\''''s'''");
    }

    #[test]
    fn restore_command_words_survive_quotes_and_percent_signs() {
        assert_eq!(command_word("/srv/tidemark repo"), "'/srv/tidemark repo'");
        assert_eq!(command_word("/srv/it's"), r"'/srv/it'\''s'");
        assert_eq!(command_word("/srv/100%"), "'/srv/100%%'");
        // What sh makes of it, once PostgreSQL has turned %% back into %.
        let word = command_word("/a b/it's 100%").replace("%%", "%");
        let output = std::process::Command::new("sh").arg("-c").arg(format!("printf %s {word}")).output().expect("sh");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "/a b/it's 100%");
    }
}
