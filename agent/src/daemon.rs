//! `tidemark-agent run`: one agent per state directory, streaming with
//! reconnects, the uploader beside it, a clean stop on SIGINT/SIGTERM.

use crate::backup::Reporting;
use crate::config::Settings;
use crate::index::Index;
use crate::metrics::{Metrics, RepositoryFacts, Schedule};
use crate::relnames::RelationNames;
use crate::spool::Spool;
use crate::stream::{stream_once, StreamContext};
use crate::summarizer::Summarizer;
use crate::uploader::{UploadJob, Uploader};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tidemark_pg::PgError;
use tidemark_proto::repo::records::AGENT_LEASE_KEY;
use tidemark_proto::Lsn;
use tidemark_repo::lease::Lease;
use tidemark_repo::{Fail, Repository};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

/// Opens the state written by `init`; refuses a state directory never initialized.
pub fn open_state(settings: &Settings) -> anyhow::Result<(Arc<Index>, crate::index::IndexMeta)> {
    let index_dir = settings.state_dir.join("index");
    if !index_dir.is_dir() {
        return Err(Fail::new(
            format!("state directory {} is not initialized", settings.state_dir.display()),
            "run `tidemark-agent init` with the same --state-dir first",
        )
        .into());
    }
    let index = Index::open(&index_dir)?;
    let meta = index.meta()?.context("the index has no metadata; run `tidemark-agent init` again")?;
    Ok((Arc::new(index), meta))
}

/// Holds the repository's agent lease, renewing it; a lost lease stops the agent.
async fn keep_lease(
    mut lease: Lease,
    stop: watch::Sender<bool>,
    lost: tokio::sync::oneshot::Sender<anyhow::Error>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(lease.renew_every()) => {}
            _ = &mut done => break,
        }
        match lease.renew().await {
            Ok(()) => failures = 0,
            Err(e) if e.downcast_ref::<Fail>().is_some() => {
                error!("{e:#}");
                let _ = lost.send(e);
                let _ = stop.send(true);
                return;
            }
            Err(e) => {
                // The repository is unreachable: keep trying; the lease
                // outlives a short outage.
                failures += 1;
                warn!(failures, "cannot renew the repository lease: {e:#}");
            }
        }
    }
    lease.release().await;
}

/// The tasks beside streaming: /metrics, the repository facts, scheduled
/// backups and drills, the systemd watchdog. Aborted at stop.
fn spawn_helpers(
    settings: &Settings,
    repo: &Repository,
    index: &Arc<Index>,
    shutdown: &watch::Receiver<bool>,
    reporting: &Reporting,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(refresh_facts(repo.clone(), index.clone(), reporting.clone()))];
    if let Some(interval) = settings.backup_interval {
        let schedule = crate::backup::schedule(settings.clone(), interval, shutdown.clone(), reporting.clone());
        tasks.push(tokio::spawn(schedule));
    }
    tasks.extend(crate::service::spawn_watchdog());
    tasks
}

/// Metrics that start from what the index already knows (a restarted agent).
fn initial_metrics(settings: &Settings, index: &Index, spool: &Spool) -> anyhow::Result<Arc<Metrics>> {
    let metrics = Arc::new(Metrics::new(&Schedule {
        spool_limit: settings.spool_limit,
        backup_interval: settings.backup_interval,
        drill_interval: settings.drill.interval,
    }));
    metrics.watch_spool(spool.clone());
    if let Some(archived) = index.archived_end()? {
        metrics.archived(archived);
    }
    if let Some(next) = index.summary_next()? {
        metrics.summarized(Lsn(next * spool.segment_size), index.last_commit()?.map(|(micros, _)| micros));
    }
    Ok(metrics)
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    if settings.drill.interval.is_some() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return Err(Fail::new(
                "[drill] interval is set, but drills start PostgreSQL, which refuses to run as root",
                "run the agent as the PostgreSQL OS user (the shipped systemd unit does), or remove [drill] interval",
            )
            .into());
        }
    }
    let _lock = crate::lock::lock_state_dir(&settings.state_dir)?;
    let (index, meta) = open_state(&settings)?;
    let (repo, repo_meta) = settings.open_repository().await?;
    let holder = format!("tidemark-agent run (state directory {})", settings.state_dir.display());
    let lease = Lease::acquire(&repo, AGENT_LEASE_KEY, &holder, settings.lease_length, "cannot stream").await?;
    crate::session::check_same_cluster(
        &format!("repository {}", repo.display),
        &repo_meta.system_identifier,
        &meta.system_identifier,
    )?;
    let spool = Spool::open(&settings.state_dir, meta.wal_segment_size)?;
    check_spool_space(&spool)?;
    let metrics = initial_metrics(&settings, &index, &spool)?;
    let reporting = Reporting { metrics: metrics.clone(), refresh: Arc::new(tokio::sync::Notify::new()) };
    let server = match settings.listen {
        Some(addr) => Some(crate::listen::serve(addr, metrics.clone()).await?),
        None => None,
    };
    let (uploads, jobs) = mpsc::unbounded_channel();
    // Segments completed before a crash go first, in order.
    for file in spool.scan()?.into_iter().filter(|f| f.complete) {
        uploads.send(UploadJob::Complete { segment: file.segment, path: file.path })?;
    }
    // Two pieces (8 MiB) of slack; beyond that the summarizer catches up from the repository.
    let (summaries, segments) = mpsc::channel(2);
    let catalog = RelationNames::new(settings.conn.clone(), index.clone())?;
    let summarizer = Summarizer::new(repo.clone(), index.clone(), catalog, meta.wal_segment_size, metrics.clone());
    let summarizer_task = tokio::spawn(summarizer.run(segments));
    let uploader = Uploader::new(repo.clone(), index.clone(), meta.wal_segment_size, Some(summaries), metrics.clone())?;
    let uploader_task = tokio::spawn(uploader.run(jobs));

    let (stop, shutdown) = watch::channel(false);
    let (lost_tx, mut lost_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let lease_task = tokio::spawn(keep_lease(lease, stop.clone(), lost_tx, done_rx));
    let stop_everything = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop.send(true);
    });

    let (synchronous, syncrep_task) = crate::syncrep::watch(settings.conn.clone(), settings.application_name.clone());
    let ctx = StreamContext {
        settings: settings.clone(),
        index: index.clone(),
        repo,
        spool,
        uploads,
        system_identifier: meta.system_identifier.clone(),
        stream_start: (meta.stream_start_timeline, meta.stream_start_lsn),
        metrics: metrics.clone(),
        synchronous,
        runtime: tokio::runtime::Handle::current(),
    };
    let helpers = spawn_helpers(&settings, &ctx.repo, &index, &shutdown, &reporting);
    // Not aborted at stop like the others: a drill stops its server and removes its files first.
    let drills = settings
        .drill
        .interval
        .map(|interval| tokio::spawn(drill_schedule(settings.clone(), interval, reporting.clone(), shutdown.clone())));
    let streamed = receive_on_its_own_thread(ctx, shutdown)?;
    let (ctx, result) = streamed.await.context("the receive loop panicked")?;
    // Streaming ended (a signal, a lost lease or an error): every task stops.
    let _ = stop_everything.send(true);
    crate::service::stopping();
    if let Some(task) = drills {
        if tokio::time::timeout(Duration::from_secs(120), task).await.is_err() {
            warn!("a drill did not clean up within 2 minutes; the next drill removes what it left");
        }
    }
    // A backup or drill still running is abandoned; expire removes what a backup left.
    for task in helpers.into_iter().chain(server).chain([syncrep_task]) {
        task.abort();
        let _ = task.await;
    }
    // Let the uploader store what is queued; a later run resumes anything left.
    drop(ctx);
    if tokio::time::timeout(Duration::from_secs(60), uploader_task).await.is_err() {
        warn!("stopping with uploads still queued; the next run uploads them");
    }
    // The uploader is gone, so the summarizer's queue is closed: let it finish.
    if tokio::time::timeout(Duration::from_secs(30), summarizer_task).await.is_err() {
        warn!("stopping before the audit caught up; the next run continues it");
    }
    // Give the lease up, so the next agent need not wait for it to expire.
    let _ = done_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), lease_task).await;
    info!("stopped");
    if let Ok(lost) = lost_rx.try_recv() {
        return Err(lost);
    }
    result
}

/// Starts the receive loop on a thread and a runtime of its own: a
/// synchronous commit waits for it (receive, write, fsync, reply), so it
/// never waits behind the uploader's, summarizer's or helpers' tasks for
/// one of the shared workers, and the thread epoll wakes is the one that
/// runs the loop. The context comes back with the result when it ends.
fn receive_on_its_own_thread(
    ctx: StreamContext,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<(StreamContext, anyhow::Result<()>)>> {
    let (done, streamed) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("tidemark-receive".into())
        .spawn(move || {
            // Only the drivers the loop uses: the process driver's reaping
            // and the signal driver would otherwise run on every wake-up.
            let result = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
                Ok(runtime) => runtime.block_on(stream_until_stopped(&ctx, &mut shutdown)),
                Err(e) => Err(anyhow::Error::new(e).context("start the receive loop's runtime")),
            };
            let _ = done.send((ctx, result));
        })
        .context("start the receive loop's thread")?;
    Ok(streamed)
}

/// Streams, reconnecting after server-side failures, until shutdown.
async fn stream_until_stopped(ctx: &StreamContext, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut started = false;
    let mut attempt = 0u32;
    loop {
        let error = match stream_once(ctx, shutdown, &mut started).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        ctx.metrics.streaming_stopped(format!("{error:#}"));
        if *shutdown.borrow() {
            return Ok(());
        }
        // At startup any failure is reported and ends the command; once
        // streaming has worked, the agent keeps trying.
        if !started {
            return Err(error);
        }
        // Only the server's side is retried: a local disk error (full,
        // read-only) stops the agent with its cause rather than spin.
        let Some(pg_error) = error.downcast_ref::<PgError>() else { return Err(error) };
        if matches!(pg_error, PgError::Server(e) if e.code == "58P01") {
            // The server no longer has WAL the archive lacks: a gap nothing can fill.
            if let Err(e) = skip_gap(ctx).await {
                warn!("could not move past the gap yet: {e:#}");
            } else {
                attempt = 0;
                continue;
            }
        }
        let transient = pg_error.is_transient();
        let wait = crate::backoff::delay(attempt, Duration::from_secs(30));
        if transient {
            warn!("streaming interrupted, reconnecting in {:.1}s: {error:#}", wait.as_secs_f64());
        } else {
            error!("streaming failed, retrying in {:.1}s: {error:#}", wait.as_secs_f64());
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if attempt > 3 {
            attempt = 3; // Stay near a few seconds: a restarted server should be picked up fast.
        }
    }
}

/// The server removed WAL the archive still needs (after a failover to a
/// standby that recycled it, or a lost slot). Said loudly — log, the
/// operations log, `tidemark_archive_gaps_total` — never papered over:
/// streaming goes on from the start of the server's current segment, what
/// the spool holds of the old one is kept, and a base backup starts at once
/// so the restorable window begins again after the gap.
async fn skip_gap(ctx: &StreamContext) -> anyhow::Result<()> {
    let size = ctx.spool.segment_size;
    let (old_timeline, old_start) = crate::stream::resume_point(ctx)?;
    let mut conn = crate::session::connect_replication(&ctx.settings.conn).await?;
    let identity = crate::session::identify(&mut conn).await?;
    conn.close().await;
    let start = identity.xlogpos.segment_start(size);
    if (identity.timeline, start) <= (old_timeline, old_start) {
        anyhow::bail!(
            "the server's WAL ({} on timeline {}) is not past the gap yet",
            identity.xlogpos,
            identity.timeline
        );
    }
    if let Some(file) = ctx.spool.scan()?.into_iter().rev().find(|f| !f.complete) {
        let flushed = ctx.index.progress()?.map(|p| p.flushed_lsn).unwrap_or(old_start);
        let len = flushed.0.saturating_sub(file.segment.start_lsn(size).0).min(size);
        if len > 0 {
            let job = UploadJob::Partial { segment: file.segment, path: file.path, len, last: true };
            ctx.uploads.send(job).context("the uploader stopped")?;
        }
    }
    ctx.index.put_progress(&crate::index::Progress {
        timeline: identity.timeline,
        flushed_lsn: start,
        server_lsn: identity.xlogpos,
        updated_at_unix: crate::clock::now_unix(),
    })?;
    ctx.index.put_gap((identity.timeline, start))?;
    ctx.metrics.archive_gap();
    error!(
        "ARCHIVE GAP: the server no longer has the WAL from {old_start} (timeline {old_timeline}) to {start} \
         (timeline {}); the archive cannot be restored across it. Streaming continues at {start}; a base backup \
         starts now so the restorable window begins again after the gap",
        identity.timeline
    );
    let summary = format!("archive gap: WAL from {old_start} to {start} is missing (the server no longer had it)");
    let details = serde_json::json!({ "from_lsn": old_start, "from_timeline": old_timeline, "to_lsn": start, "to_timeline": identity.timeline });
    tidemark_repo::events::record(&ctx.repo, "gap", summary, details).await;
    let settings = ctx.settings.clone();
    // On the agent's main runtime: the receive loop's thread is for receiving.
    ctx.runtime.spawn(async move {
        match crate::backup::backup(&settings, Some("after an archive gap".into()), true).await {
            Ok(manifest) => info!(id = %manifest.id, "base backup after the gap done"),
            Err(e) => error!("the base backup after the gap failed: {e:#}"),
        }
    });
    Ok(())
}

/// How often the repository's facts are re-read when nothing of ours changed
/// them: they change by the hour (backups, drills, retention), and what
/// another process does (a backup from cron) shows within this.
const FACTS_INTERVAL: Duration = Duration::from_secs(300);
const WINDOW_PENDING: Duration = Duration::from_secs(15);
/// How often `drills/` is listed for a drill another process recorded.
const DRILLS_LOOK: Duration = Duration::from_secs(60);

/// Re-reads the last backup, the window and the last drill from the
/// repository every 5 minutes (listing the backups and reading manifests
/// through the repository the agent has open), at once after a backup,
/// drill or expire of ours, and when the newest drill record's name changes
/// (a listing of `drills/` every minute: a drill from a systemd timer shows
/// within that).
async fn refresh_facts(repo: Repository, index: Arc<Index>, reporting: Reporting) {
    let mut newest_drill = newest_drill_key(&repo).await;
    let mut cache = crate::status::FactsCache::default();
    loop {
        let last_commit = index.last_commit().ok().flatten();
        let archived = Some(reporting.metrics.archived_lsn()).filter(|l| *l > Lsn::ZERO);
        let view = crate::status::read_facts_with(&repo, archived, last_commit, &mut cache).await;
        // A backup whose WAL is not all archived yet starts the window soon: look again shortly.
        let wait = if view.last_backup.is_some() && view.window.is_none() { WINDOW_PENDING } else { FACTS_INTERVAL };
        match view.error {
            None => reporting.metrics.repository_facts(&RepositoryFacts {
                window_start: view.window.as_ref().map(|w| crate::metrics::unix_seconds(&w.earliest)),
                last_backup: view.last_backup,
                last_drill: view.last_drill,
            }),
            // An unreachable repository shows in the uploader's metrics.
            Some(error) => debug!("cannot read the repository's facts: {error}"),
        }
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = reporting.refresh.notified() => break,
                _ = tokio::time::sleep(DRILLS_LOOK) => {
                    let newest = newest_drill_key(&repo).await;
                    if newest != newest_drill {
                        newest_drill = newest;
                        break;
                    }
                }
            }
        }
    }
}

/// The name of the newest drill record (names sort by time).
async fn newest_drill_key(repo: &Repository) -> Option<String> {
    let prefix = tidemark_proto::repo::records::DRILLS_PREFIX.trim_end_matches('/');
    repo.list(prefix).await.ok()?.into_iter().max()
}

/// Runs a drill every `interval` after the newest recorded one; with none
/// recorded, as soon as a backup is restorable (a new deployment proves
/// itself on its first day).
async fn drill_schedule(
    settings: Settings,
    interval: Duration,
    reporting: Reporting,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let wait = match next_drill_delay(&settings, interval).await {
            Ok(Some(wait)) => wait,
            Ok(None) => Duration::from_secs(15), // nothing restorable yet: look again soon
            Err(e) => {
                warn!("cannot read the drill records, trying again in a minute: {e:#}");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        if !matches!(next_drill_delay(&settings, interval).await, Ok(Some(d)) if d.is_zero()) {
            continue;
        }
        match crate::drill::drill(&settings, &settings.drill, shutdown.clone()).await {
            Ok(record) if record.passed => info!(rto_seconds = record.rto_seconds, "scheduled drill passed"),
            Ok(record) => error!("scheduled drill FAILED: {}", record.failure.unwrap_or_default()),
            Err(e) => error!("scheduled drill could not run: {e:#}"),
        }
        reporting.refresh.notify_one();
    }
}

/// How long until the next drill is due; `None` while nothing is restorable.
async fn next_drill_delay(settings: &Settings, interval: Duration) -> anyhow::Result<Option<Duration>> {
    let (repo, _) = settings.open_initialized(false).await?;
    let Some(last) = tidemark_repo::drills::latest(&repo).await? else {
        let restorable = !tidemark_repo::catalog::Catalog::load(&repo).await?.restorable.is_empty();
        return Ok(restorable.then_some(Duration::ZERO));
    };
    let age = crate::clock::now_unix_micros() as f64 / 1e6 - crate::metrics::unix_seconds(&last.finished);
    Ok(Some(interval.saturating_sub(Duration::from_secs_f64(age.max(0.0)))))
}

/// Bytes free for this user on the file system that holds `path`.
pub fn free_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).context("path with a NUL byte")?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", path.display()));
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Refuses to start with less room than two segments in the spool: the
/// segment being filled and one waiting for upload.
fn check_spool_space(spool: &Spool) -> anyhow::Result<()> {
    let available = free_bytes(&spool.dir)?;
    let needed = 2 * spool.segment_size;
    if available < needed {
        return Err(Fail::new(
            format!(
                "spool directory {} has {} kB free; streaming needs at least {} kB (two WAL segments)",
                spool.dir.display(),
                available / 1024,
                needed / 1024
            ),
            "free space where --state-dir lives, or move --state-dir to a larger disk",
        )
        .into());
    }
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
