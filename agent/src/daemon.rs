//! `tidemark-agent run`: one agent per state directory, streaming with
//! reconnects, the uploader beside it, a clean stop on SIGINT/SIGTERM.

use crate::config::Settings;
use crate::index::Index;
use crate::pg::PgError;
use crate::relnames::RelationNames;
use crate::spool::Spool;
use crate::stream::{stream_once, StreamContext};
use crate::summarizer::Summarizer;
use crate::uploader::{UploadJob, Uploader};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tidemark_proto::repo::records::AGENT_LEASE_KEY;
use tidemark_repo::lease::Lease;
use tidemark_repo::Fail;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

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

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let _lock = crate::lock::lock_state_dir(&settings.state_dir)?;
    let (index, meta) = open_state(&settings)?;
    let (repo, repo_meta) = settings.open_repository().await?;
    let holder = format!("tidemark-agent run (state directory {})", settings.state_dir.display());
    let lease = Lease::acquire(&repo, AGENT_LEASE_KEY, &holder, settings.lease_length, "cannot stream").await?;
    crate::pg::session::check_same_cluster(
        &format!("repository {}", repo.display),
        &repo_meta.system_identifier,
        &meta.system_identifier,
    )?;
    let spool = Spool::open(&settings.state_dir, meta.wal_segment_size)?;
    check_spool_space(&spool)?;
    let (uploads, jobs) = mpsc::unbounded_channel();
    // Segments completed before a crash go first, in order.
    for file in spool.scan()?.into_iter().filter(|f| f.complete) {
        uploads.send(UploadJob::Complete { segment: file.segment, path: file.path })?;
    }
    // Four segments of slack; beyond that the summarizer catches up from the repository.
    let (summaries, segments) = mpsc::channel(4);
    let catalog = RelationNames::new(settings.conn.clone(), index.clone())?;
    let summarizer = Summarizer::new(repo.clone(), index.clone(), catalog, meta.wal_segment_size);
    let summarizer_task = tokio::spawn(summarizer.run(segments));
    let uploader = Uploader {
        repo: repo.clone(),
        index: index.clone(),
        segment_size: meta.wal_segment_size,
        compression_level: 3,
        summaries: Some(summaries),
    };
    let uploader_task = tokio::spawn(uploader.run(jobs));

    let (stop, mut shutdown) = watch::channel(false);
    let (lost_tx, mut lost_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let lease_task = tokio::spawn(keep_lease(lease, stop.clone(), lost_tx, done_rx));
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop.send(true);
    });

    let ctx = StreamContext {
        settings: settings.clone(),
        index,
        repo,
        spool,
        uploads,
        system_identifier: meta.system_identifier.clone(),
        stream_start: (meta.stream_start_timeline, meta.stream_start_lsn),
    };
    let backups = settings
        .backup_interval
        .map(|interval| tokio::spawn(crate::backup::schedule(settings.clone(), interval, shutdown.clone())));
    let mut started = false;
    let mut attempt = 0u32;
    let result = loop {
        let error = match stream_once(&ctx, &mut shutdown, &mut started).await {
            Ok(()) => break Ok(()),
            Err(e) => e,
        };
        if *shutdown.borrow() {
            break Ok(());
        }
        // At startup any failure is reported and ends the command; once
        // streaming has worked, the agent keeps trying.
        if !started {
            break Err(error);
        }
        // Only the server's side is retried: a local disk error (full,
        // read-only) stops the agent with its cause rather than spin.
        let Some(pg_error) = error.downcast_ref::<PgError>() else { break Err(error) };
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
            _ = shutdown.changed() => break Ok(()),
        }
        if attempt > 3 {
            attempt = 3; // Stay near a few seconds: a restarted server should be picked up fast.
        }
    };
    if let Some(task) = backups {
        // A backup still running is abandoned; the next backup removes what it left.
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

/// Refuses to start with less room than two segments in the spool: the
/// segment being filled and one waiting for upload.
fn check_spool_space(spool: &Spool) -> anyhow::Result<()> {
    let path = std::ffi::CString::new(spool.dir.as_os_str().as_encoded_bytes()).context("spool path")?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", spool.dir.display()));
    }
    let available = stats.f_bavail as u64 * stats.f_frsize as u64;
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

async fn wait_for_signal() {
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
