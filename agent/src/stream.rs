//! The receiver loop: START_REPLICATION, XLogData into the spool, standby
//! status updates that report only fsynced positions, partial uploads on a
//! timer, and moving on to the next timeline when the server ends one.

use crate::config::Settings;
use crate::index::{Index, Progress};
use crate::session::{self, Identity};
use crate::spool::{SegmentWriter, Spool};
use crate::uploader::UploadJob;
use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_pg::{Connection, CopyEvent, Wake};
use tidemark_proto::replication::{standby_status_update, ServerMessage};
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::layout::history_key;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::Repository;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub struct StreamContext {
    pub settings: Settings,
    pub index: Arc<Index>,
    pub repo: Repository,
    pub spool: Spool,
    pub uploads: mpsc::UnboundedSender<UploadJob>,
    pub system_identifier: String,
    pub stream_start: (TimelineId, Lsn),
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Whether a commit may be waiting for our flushes (see `syncrep`).
    pub synchronous: watch::Receiver<bool>,
    /// The agent's main runtime, for work the receive loop starts but does
    /// not wait for (it runs on a thread and runtime of its own).
    pub runtime: tokio::runtime::Handle,
}

fn now_unix_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Where to resume: the newest of the spool's own state and the recorded progress.
pub fn resume_point(ctx: &StreamContext) -> anyhow::Result<(TimelineId, Lsn)> {
    let size = ctx.spool.segment_size;
    let mut candidates = vec![ctx.stream_start];
    if let Some(point) = ctx.spool.resume_point()? {
        candidates.push(point);
    }
    if let Some(progress) = ctx.index.progress()? {
        candidates.push((progress.timeline, progress.flushed_lsn.segment_start(size)));
    }
    if let Some((segment, record)) = ctx.index.segments()?.last() {
        candidates.push((segment.timeline, record.end_lsn));
    }
    candidates.into_iter().max().context("no resume point")
}

/// Streams until shutdown (Ok) or an error. Sets `*started` once streaming began.
pub async fn stream_once(
    ctx: &StreamContext,
    shutdown: &mut watch::Receiver<bool>,
    started: &mut bool,
) -> anyhow::Result<()> {
    let mut conn = session::connect_replication(&ctx.settings.conn).await?;
    let identity: Identity = session::identify(&mut conn).await?;
    session::check_same_cluster("the repository", &ctx.system_identifier, &identity.system_identifier)?;
    let (mut timeline, mut start) = resume_point(ctx)?;
    if timeline > identity.timeline {
        anyhow::bail!(tidemark_repo::Fail::new(
            format!("the archive is on timeline {timeline} but the server is on timeline {}", identity.timeline),
            "was this server restored from an older backup? archive it into a new repository",
        ));
    }
    if identity.timeline > timeline {
        (timeline, start) = follow_fork(ctx, &mut conn, identity.timeline, timeline, start).await?;
    }
    loop {
        if timeline.0 > 1 {
            archive_history(ctx, &mut conn, timeline).await?;
        }
        let command = format!("START_REPLICATION SLOT \"{}\" PHYSICAL {start} TIMELINE {timeline}", ctx.settings.slot);
        match conn.start_copy_both(&command).await {
            Ok(()) => {}
            // A promoted standby has no slot of ours yet (a failover): make it, then stream.
            Err(tidemark_pg::PgError::Server(e)) if e.code == "42704" => {
                warn!(slot = %ctx.settings.slot, "the server has no replication slot of ours (a new primary after a failover?): creating it");
                session::ensure_slot(&mut conn, &ctx.settings.slot).await?;
                conn.start_copy_both(&command)
                    .await
                    .with_context(|| format!("start streaming at {start} on timeline {timeline}"))?;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("start streaming at {start} on timeline {timeline}")))
            }
        }
        if !*started {
            crate::service::ready();
        }
        *started = true;
        ctx.metrics.streaming_started();
        info!(%timeline, %start, "streaming");
        match stream_timeline(ctx, &mut conn, timeline, start, shutdown).await? {
            None => return Ok(()),
            Some((next_timeline, next_start)) => {
                info!(%timeline, next_timeline = %next_timeline, switch = %next_start, "timeline ended");
                timeline = next_timeline;
                start = next_start.segment_start(ctx.spool.segment_size);
                ctx.index.put_progress(&Progress {
                    timeline,
                    flushed_lsn: start,
                    server_lsn: Lsn::ZERO,
                    updated_at_unix: now_unix_micros() / 1_000_000,
                })?;
            }
        }
    }
}

/// The server is on a newer timeline than the archive (a failover). When
/// the archive already holds WAL of `timeline` past the point where the
/// server's history left it, that WAL is on no path to the server's
/// timeline: transactions the old primary wrote there are not on the new
/// one. Said loudly (log and operations log), and streaming goes on where
/// the server's history continues: the next timeline, from the switch.
async fn follow_fork(
    ctx: &StreamContext,
    conn: &mut Connection,
    server_timeline: TimelineId,
    timeline: TimelineId,
    start: Lsn,
) -> anyhow::Result<(TimelineId, Lsn)> {
    let result = conn.simple_query(&format!("TIMELINE_HISTORY {server_timeline}")).await?;
    let content = result.value("content")?.context("TIMELINE_HISTORY returned no content")?.as_bytes().to_vec();
    let history =
        tidemark_proto::timeline::parse_history(&content).context("the server sent an unreadable history file")?;
    let Some(at) = history.iter().position(|entry| entry.parent == timeline) else {
        return Ok((timeline, start)); // the server's history does not pass through ours: START_REPLICATION says why
    };
    let switch = history[at].switch_lsn;
    // How far this timeline's WAL reached here (streaming resumes at the
    // start of a partial segment, so `start` alone may be behind it).
    let size = ctx.spool.segment_size;
    let flushed = ctx.index.progress()?.filter(|p| p.timeline == timeline).map(|p| p.flushed_lsn).unwrap_or(start);
    let reached = flushed.max(start);
    if reached <= switch {
        return Ok((timeline, start)); // an ordinary timeline switch: streaming reaches it and moves on
    }
    let next = history.get(at + 1).map(|entry| entry.parent).unwrap_or(server_timeline);
    let lost = reached.0 - switch.0;
    // The segment holding the end of what we have stays as it is, whole,
    // in the repository (re-streaming it from the new primary would cut it at the switch).
    let last = SegmentId::containing(timeline, Lsn(reached.0 - 1), size);
    let path = ctx.spool.partial_path(last);
    if path.exists() {
        let len = reached.0 - last.start_lsn(size).0;
        ctx.uploads
            .send(UploadJob::Partial { segment: last, path, len, last: true })
            .context("the uploader stopped")?;
    }
    let start = reached;
    tracing::error!(
        "FAILOVER DIVERGENCE: the archive holds {lost} bytes of timeline {timeline} WAL past {switch}, where the new \
         primary's timeline {next} branched off; transactions the old primary committed there are not on the new \
         primary. The archive keeps them (timeline {timeline}); streaming continues on timeline {next} from {switch}"
    );
    let summary = format!("failover: timeline {timeline} WAL from {switch} to {start} is not on timeline {next}");
    let details =
        serde_json::json!({ "timeline": timeline, "switch_lsn": switch, "archived_to": start, "next_timeline": next });
    tidemark_repo::events::record(&ctx.repo, "failover", summary, details).await;
    Ok((next, switch.segment_start(size)))
}

/// Stores `%08X.history` for `timeline` if the repository lacks it.
async fn archive_history(ctx: &StreamContext, conn: &mut Connection, timeline: TimelineId) -> anyhow::Result<()> {
    let key = history_key(timeline);
    if ctx.repo.exists(&key).await? {
        return Ok(());
    }
    let result = conn.simple_query(&format!("TIMELINE_HISTORY {timeline}")).await?;
    let content = result.value("content")?.context("TIMELINE_HISTORY returned no content")?.as_bytes().to_vec();
    tidemark_proto::timeline::parse_history(&content).context("the server sent an unreadable history file")?;
    let (object, _) = frame::encode(&content, Compression::None)?;
    ctx.repo.put(&key, object).await?;
    info!(%timeline, "archived timeline history");
    Ok(())
}

/// How often the receive loop records its progress in the index: for
/// `status` and the metrics' repository lag, and a hint when resuming
/// (the spool decides; the loop also records it whenever it ends). A put a
/// second was a sixth of the receive thread's CPU on a quiet database.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// When no commit can be waiting for this agent (see `syncrep`), received
/// WAL is fsynced at the latest this long after its first unflushed byte
/// arrived, or once this many bytes wait: a few fsyncs a second under load
/// instead of one per commit, with the durable lag still a fraction of a second.
///
/// A batch that comes alone (a quiet database: commits seconds apart) is
/// fsynced with the next status update instead (every `status_interval`,
/// 10 s): nobody waits for it, and the repository's copy does not depend on
/// it (partial uploads read the spool's bytes whether fsynced or not). Its
/// only effect is how far the slot trails, and an fsync per commit was most
/// of a quiet agent's CPU (on a virtual disk each one is a trip to the host).
pub const ASYNC_FLUSH_DELAY: Duration = Duration::from_millis(200);
const ASYNC_FLUSH_BYTES: u64 = 1 << 20;
/// When no commit waits, the pause between reads of the socket after a
/// batch smaller than `ASYNC_READ_PAUSE_BELOW` bytes that came less than
/// `ASYNC_READ_PAUSE_WITHIN` after the one before (a stream of small
/// batches: load). A quiet database's commits, seconds apart, are read
/// without it: the pause would only add a wake-up per commit.
const ASYNC_READ_PAUSE: Duration = Duration::from_millis(20);
const ASYNC_READ_PAUSE_WITHIN: Duration = Duration::from_millis(100);
const ASYNC_READ_PAUSE_BELOW: u64 = 256 * 1024;
/// When no commit waits and a batch under this many bytes came alone (a
/// quiet database), the plain loop waits until the socket holds this many
/// bytes (`SO_RCVLOWAT`) or the next deadline comes, instead of waking for
/// each commit. Nothing needs those bytes sooner: they are fsynced with the
/// status update and stored with the partial upload, and the loop reads
/// what the socket holds before either. A wake-up per commit was half of a
/// quiet agent's CPU. Load starting fills the threshold within
/// milliseconds, and a batch that large ends the quiet wait.
const QUIET_BATCH_BELOW: u64 = 64 * 1024;

/// The receive loop's state on one timeline.
struct Receiving {
    writer: SegmentWriter,
    server_lsn: Lsn,
    /// The flushed position last sent to the server.
    last_reported: Lsn,
    last_progress_write: Instant,
    /// A progress write was skipped (at most one a second): the next is due.
    progress_due: bool,
    /// When the oldest written but not yet fsynced byte arrived.
    unflushed_since: Option<Instant>,
    /// When the last batch was read.
    last_batch: Instant,
    /// The batch being read came alone, not in a stream of batches.
    alone: bool,
    /// The last batch was small and came alone with no commit waiting:
    /// the plain loop waits for `QUIET_BATCH_BELOW` bytes or a deadline.
    quiet: bool,
    /// At the spool limit nothing more is read: the flushed position (and so
    /// the slot) stops, and the server keeps the WAL until the repository
    /// catches up. Status updates go on, so the connection stays alive.
    paused: bool,
}

impl Receiving {
    /// When what is written must be fsynced by (when no commit waits): soon
    /// after a stream of batches, at the next status update after a batch
    /// that came alone (`None`: the status deadline covers it).
    fn flush_due(&self) -> Option<Instant> {
        match self.unflushed_since {
            Some(since) if !self.alone => Some(since + ASYNC_FLUSH_DELAY),
            _ => None,
        }
    }
}

/// Returns `None` on shutdown, or the next timeline and its start when the server ended this one.
///
/// Spool writes and fsyncs run right here on the async thread, not through
/// `block_in_place`/`spawn_blocking`: they are this task's own critical path
/// (nothing else in the task can proceed until the fsync returns), and
/// handing the thread over for every batch cost more CPU than the fsync
/// itself. The runtime's workers take the other tasks meanwhile.
async fn stream_timeline(
    ctx: &StreamContext,
    conn: &mut Connection,
    timeline: TimelineId,
    start: Lsn,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
    let writer = SegmentWriter::new(ctx.spool.clone(), timeline, start);
    let mut state = Receiving {
        last_reported: writer.flushed(),
        writer,
        server_lsn: start,
        last_progress_write: Instant::now(),
        progress_due: false,
        unflushed_since: None,
        last_batch: Instant::now(),
        alone: false,
        quiet: false,
        paused: false,
    };
    let result = receive(ctx, conn, &mut state, shutdown).await;
    if result.is_err() {
        // Progress is written every 10 s at most: record where the
        // fsynced WAL ends now, so that what runs next (a reconnect, or the
        // last upload before an archive gap) starts from all of it.
        if let Err(e) = record_progress(ctx, &state.writer, state.server_lsn) {
            warn!("could not record the streaming progress: {e:#}");
        }
    }
    result
}

/// When the receive loop's periodic work is next due. One timer serves all
/// of it: on a quiet database every wake-up of this thread costs about as
/// much in the runtime as in the kernel, so the loop polls one timer (reset
/// only when the earliest deadline moves) instead of a timer per duty.
struct Deadlines {
    /// The next status update (keeps the connection alive) and spool-limit check.
    status: Instant,
    /// The next look at whether the partial segment grew and should be uploaded.
    partial: Instant,
    /// The partial segment and length last handed to the uploader.
    last_partial: Option<(SegmentId, u64)>,
}

impl Deadlines {
    /// The earliest deadline among those that apply in `state`.
    fn next(&self, state: &Receiving) -> Instant {
        let mut next = self.status.min(self.partial);
        if let Some(due) = state.flush_due() {
            next = next.min(due);
        }
        if state.progress_due {
            next = next.min(state.last_progress_write + PROGRESS_INTERVAL);
        }
        next
    }
}

/// The receive loop on one timeline, until shutdown, the timeline's end or an error.
async fn receive(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
    send_status(conn, &state.writer).await?;
    let began = Instant::now();
    let mut due = Deadlines {
        status: began + ctx.settings.status_interval,
        partial: began + ctx.settings.partial_upload_interval,
        last_partial: None,
    };
    if conn.is_plain() {
        receive_plain(ctx, conn, state, shutdown, &mut due).await
    } else {
        receive_async(ctx, conn, state, shutdown, &mut due).await
    }
}

/// The loop on a plain socket (TCP without TLS, or Unix): the thread
/// blocks in `poll(2)` on the socket and a stop pipe until the next
/// deadline, and reads with `recv(2)`. This thread runs nothing else (see
/// `daemon::receive_on_its_own_thread`), so blocking it is what it is for;
/// it spares each commit the runtime's wake-up, timer and waker work.
async fn receive_plain(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    shutdown: &mut watch::Receiver<bool>,
    due: &mut Deadlines,
) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
    let stop = StopPipe::new(ctx, shutdown)?;
    let result = receive_plain_until_done(ctx, conn, state, &stop, due).await;
    // The threshold is the socket's own: what reads it next (the end of a
    // timeline, a reconnect) must see every byte.
    let reset = conn.set_read_threshold(1);
    let result = result?;
    reset?;
    match result {
        PlainEnd::Stopped => {
            on_stop(ctx, conn, state).await?;
            Ok(None)
        }
        PlainEnd::TimelineEnded => end_of_timeline(ctx, conn, &mut state.writer).await.map(Some),
    }
}

/// Why the plain loop ended.
enum PlainEnd {
    Stopped,
    TimelineEnded,
}

async fn receive_plain_until_done(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    stop: &StopPipe,
    due: &mut Deadlines,
) -> anyhow::Result<PlainEnd> {
    loop {
        if !state.paused {
            if let Some(event) = conn.try_recv_copy()? {
                if on_batch(ctx, conn, state, event).await? {
                    return Ok(PlainEnd::TimelineEnded);
                }
                continue;
            }
        }
        let now = Instant::now();
        let next = due.next(state);
        if next <= now {
            // What the socket holds goes first (it may have been left
            // unread): the fsync and the partial upload cover all of it.
            if !state.paused && conn.read_plain()? {
                continue;
            }
            periodic(ctx, conn, state, due).await?;
            continue;
        }
        conn.set_read_threshold(if state.quiet { QUIET_BATCH_BELOW as u32 } else { 1 })?;
        match conn.wait_plain(!state.paused, stop.fd(), next - now)? {
            Wake::Readable => {
                conn.read_plain()?;
            }
            Wake::Stop => return Ok(PlainEnd::Stopped),
            Wake::TimedOut => {}
        }
    }
}

/// The loop on a TLS connection, whose bytes only the async stream can
/// decrypt: one timer for all deadlines, reset only when the earliest moves.
async fn receive_async(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    shutdown: &mut watch::Receiver<bool>,
    due: &mut Deadlines,
) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
    let timer = tokio::time::sleep_until(due.next(state).into());
    tokio::pin!(timer);
    let stop = shutdown.changed();
    tokio::pin!(stop);
    loop {
        let next = due.next(state);
        if timer.deadline() != next.into() {
            timer.as_mut().reset(next.into());
        }
        tokio::select! {
            event = conn.recv_copy(), if !state.paused => {
                if on_batch(ctx, conn, state, event?).await? {
                    return end_of_timeline(ctx, conn, &mut state.writer).await.map(Some);
                }
            }
            () = &mut timer => periodic(ctx, conn, state, due).await?,
            _ = &mut stop => {
                on_stop(ctx, conn, state).await?;
                return Ok(None);
            }
        }
    }
}

/// A pipe whose read end becomes readable when the agent shuts down: a
/// task on the main runtime waits for the shutdown signal and writes to
/// it, so the plain loop's `poll(2)` sees shutdown without waking to check.
struct StopPipe {
    read: std::os::unix::net::UnixStream,
    signal: tokio::task::JoinHandle<()>,
}

impl StopPipe {
    fn new(ctx: &StreamContext, shutdown: &watch::Receiver<bool>) -> anyhow::Result<StopPipe> {
        let (read, write) = std::os::unix::net::UnixStream::pair().context("create the receive loop's stop pipe")?;
        let mut shutdown = shutdown.clone();
        let signal = ctx.runtime.spawn(async move {
            if !*shutdown.borrow_and_update() {
                // A closed channel (the daemon gone) stops the loop as well.
                let _ = shutdown.changed().await;
            }
            let _ = std::io::Write::write(&mut &write, &[1]);
        });
        Ok(StopPipe { read, signal })
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.read)
    }
}

impl Drop for StopPipe {
    fn drop(&mut self) {
        self.signal.abort();
    }
}

/// A batch of messages, starting with `event`: written, fsynced and
/// reported as `receive_batch` decides. Returns whether the server ended
/// the timeline.
async fn on_batch(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    event: CopyEvent,
) -> anyhow::Result<bool> {
    let busy = state.last_batch.elapsed() < ASYNC_READ_PAUSE_WITHIN;
    state.last_batch = Instant::now();
    // A batch that comes alone (a quiet database) waits for the status
    // update's fsync (see `ASYNC_FLUSH_DELAY`).
    state.alone = !busy;
    let received_before = state.writer.position();
    if receive_batch(ctx, conn, state, event).await? {
        return Ok(true);
    }
    let received = state.writer.position().0 - received_before.0;
    let synchronous = *ctx.synchronous.borrow();
    // A quiet database: the plain loop reads again when much has come or
    // at the next deadline.
    state.quiet = state.alone && received < QUIET_BATCH_BELOW && !synchronous;
    let small = received < ASYNC_READ_PAUSE_BELOW;
    if small && busy && !synchronous {
        // No commit waits and the stream is not behind: let the socket
        // gather WAL for a moment, so one read takes many messages instead
        // of one a commit. (A backlog comes in large batches and is read
        // without pauses.) The plain loop's thread runs nothing else and
        // sleeps outright: its runtime's timer would wake it each time the
        // socket, registered with that runtime too, gets more bytes.
        if conn.is_plain() {
            std::thread::sleep(ASYNC_READ_PAUSE);
        } else {
            tokio::time::sleep(ASYNC_READ_PAUSE).await;
        }
    }
    Ok(false)
}

/// Shutdown: everything received is fsynced and reported, the progress
/// recorded, the partial segment handed to the uploader, the stream ended.
async fn on_stop(ctx: &StreamContext, conn: &mut Connection, state: &mut Receiving) -> anyhow::Result<()> {
    flush_and_report(ctx, conn, state, true).await?;
    record_progress(ctx, &state.writer, state.server_lsn)?;
    if let Some((segment, path, len)) = state.writer.partial() {
        let _ = ctx.uploads.send(UploadJob::Partial { segment, path, len, last: false });
    }
    conn.send_copy_done().await?;
    Ok(())
}

/// Whatever of the loop's periodic work is due now: the delayed fsync, the
/// index's progress, the status update and the partial segment's upload.
async fn periodic(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    due: &mut Deadlines,
) -> anyhow::Result<()> {
    let now = Instant::now();
    if state.flush_due().is_some_and(|due| due <= now) {
        flush_and_report(ctx, conn, state, false).await?;
    }
    if state.progress_due && state.last_progress_write + PROGRESS_INTERVAL <= now {
        record_progress(ctx, &state.writer, state.server_lsn)?;
        state.last_progress_write = now;
        state.progress_due = false;
    }
    if due.status <= now {
        due.status = now + ctx.settings.status_interval;
        if ctx.settings.spool_limit.is_some() {
            state.paused = spool_limit_state(ctx, state.paused)?;
        }
        flush_and_report(ctx, conn, state, true).await?;
        if state.last_progress_write.elapsed() >= ctx.settings.status_interval {
            record_progress(ctx, &state.writer, state.server_lsn)?;
            state.last_progress_write = Instant::now();
        }
    }
    if due.partial <= now {
        due.partial = now + ctx.settings.partial_upload_interval;
        if let Some((segment, path, len)) = state.writer.partial() {
            if due.last_partial != Some((segment, len)) {
                ctx.uploads
                    .send(UploadJob::Partial { segment, path, len, last: false })
                    .context("the uploader stopped")?;
                due.last_partial = Some((segment, len));
            }
        }
    }
    Ok(())
}

/// Writes everything already received (the event and whatever is buffered
/// behind it), then flushes and replies as `syncrep` says. Returns whether
/// the server ended the timeline.
async fn receive_batch(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    mut event: CopyEvent,
) -> anyhow::Result<bool> {
    let mut reply_now = false;
    let mut ended = false;
    // Take everything already buffered, then fsync once: batching under load.
    loop {
        match event {
            CopyEvent::Data(payload) => match ServerMessage::parse(payload)? {
                ServerMessage::XLogData { start, server_wal_end, data } => {
                    let completed = state.writer.write(start, &data)?;
                    if !completed.is_empty() && ctx.settings.spool_limit.is_some() {
                        state.paused = spool_limit_state(ctx, state.paused)?;
                    }
                    for done in completed {
                        ctx.uploads
                            .send(UploadJob::Complete { segment: done.segment, path: done.path })
                            .context("the uploader stopped")?;
                    }
                    state.server_lsn = state.server_lsn.max(server_wal_end);
                }
                ServerMessage::Keepalive { server_wal_end, reply_requested } => {
                    state.server_lsn = state.server_lsn.max(server_wal_end);
                    reply_now |= reply_requested;
                }
            },
            CopyEvent::Done => {
                ended = true;
                break;
            }
        }
        match conn.try_recv_copy()? {
            Some(next) => event = next,
            None => break,
        }
    }
    let written = state.writer.position();
    if written > state.writer.flushed() && state.unflushed_since.is_none() {
        state.unflushed_since = Some(Instant::now());
    }
    // A synchronous commit may be waiting: fsync and reply now. Otherwise
    // only when enough has gathered (the timer takes the rest).
    let now = *ctx.synchronous.borrow()
        || written.0 - state.writer.flushed().0 >= ASYNC_FLUSH_BYTES
        || state.flush_due().is_some_and(|due| due <= Instant::now());
    if now || ended {
        flush_and_report(ctx, conn, state, reply_now).await?;
    } else if reply_now || state.writer.flushed() > state.last_reported {
        // Completing a segment flushed it: report that at once.
        report(ctx, conn, state).await?;
    }
    Ok(ended)
}

/// fsyncs what is written, then reports the flushed position if it moved
/// (or `always`): the reply goes first, a commit may be waiting for it.
async fn flush_and_report(
    ctx: &StreamContext,
    conn: &mut Connection,
    state: &mut Receiving,
    always: bool,
) -> anyhow::Result<()> {
    if state.writer.position() > state.writer.flushed() {
        state.writer.flush()?;
    }
    state.unflushed_since = None;
    if always || state.writer.flushed() > state.last_reported {
        report(ctx, conn, state).await?;
    }
    Ok(())
}

async fn report(ctx: &StreamContext, conn: &mut Connection, state: &mut Receiving) -> anyhow::Result<()> {
    send_status(conn, &state.writer).await?;
    state.last_reported = state.writer.flushed();
    ctx.metrics.streamed(state.writer.timeline().0, state.server_lsn, state.writer.flushed());
    // The index's progress is for `status` and for resuming after a crash
    // (which the spool decides anyway): every 10 s is plenty, and a
    // skipped write follows within them.
    if state.last_progress_write.elapsed() >= PROGRESS_INTERVAL {
        record_progress(ctx, &state.writer, state.server_lsn)?;
        state.last_progress_write = Instant::now();
        state.progress_due = false;
    } else {
        state.progress_due = true;
    }
    Ok(())
}

async fn end_of_timeline(
    ctx: &StreamContext,
    conn: &mut Connection,
    writer: &mut SegmentWriter,
) -> anyhow::Result<(TimelineId, Lsn)> {
    conn.send_copy_done().await?;
    let result = conn.finish_copy().await?;
    writer.flush()?;
    if let Some((segment, path, len)) = writer.partial() {
        // The old timeline ends inside this segment; it stays partial for good.
        ctx.uploads.send(UploadJob::Partial { segment, path, len, last: true }).context("the uploader stopped")?;
    }
    let next_timeline: u32 = result
        .value("next_tli")?
        .context("the server ended the stream without naming the next timeline; is it shutting down?")?
        .parse()?;
    let next_start: Lsn = result.value("next_tli_startpos")?.context("no next timeline start")?.parse()?;
    if next_timeline <= writer.timeline().0 {
        warn!(next_timeline, "server named a timeline that is not newer");
    }
    Ok((TimelineId(next_timeline), next_start))
}

/// Whether streaming must pause for the spool limit, logging each change.
fn spool_limit_state(ctx: &StreamContext, paused: bool) -> anyhow::Result<bool> {
    let Some(limit) = ctx.settings.spool_limit else { return Ok(false) };
    let waiting = ctx.spool.scan()?.iter().filter(|f| f.complete).count() as u64 * ctx.spool.segment_size;
    let over = waiting >= limit;
    ctx.metrics.spool_full(over);
    if over && !paused {
        tracing::error!(
            "SPOOL LIMIT REACHED: {waiting} bytes of WAL wait for the repository (limit {limit}); \
             no longer receiving or acknowledging WAL, so the server keeps it in slot \"{}\" (watch its disk). \
             Nothing is deleted; streaming resumes when uploads catch up",
            ctx.settings.slot
        );
    } else if !over && paused {
        info!("spool below its limit again ({waiting} bytes waiting); streaming resumes");
    }
    Ok(over)
}

fn record_progress(ctx: &StreamContext, writer: &SegmentWriter, server_lsn: Lsn) -> anyhow::Result<()> {
    ctx.index.put_progress(&Progress {
        timeline: writer.timeline(),
        flushed_lsn: writer.flushed(),
        server_lsn,
        updated_at_unix: now_unix_micros() / 1_000_000,
    })
}

/// Reports written = flushed = what is fsynced: the slot may advance to it and
/// synchronous commits waiting for it may return. Apply stays 0, and the
/// server is never asked to reply (its keepalives come on their own).
async fn send_status(conn: &mut Connection, writer: &SegmentWriter) -> anyhow::Result<()> {
    let flushed = writer.flushed();
    let message = standby_status_update(flushed, flushed, now_unix_micros(), false);
    conn.send_copy_data(&message).await?;
    Ok(())
}
