//! What the running agent knows about itself, for `/metrics` (Prometheus)
//! and `/healthz`. Every task of `run` reports into one shared [`Metrics`]
//! (atomics and one small lock, cheap enough for each received batch);
//! values derived from others (lags, ages, spool bytes) are computed when
//! scraped. [`crate::listen`] serves them.
//!
//! Names follow Prometheus conventions: `tidemark_` prefix, base units
//! (`_bytes`, `_seconds`), `_total` on counters (added by the encoder),
//! times as `_timestamp_seconds` since the Unix epoch. LSNs are exported as
//! byte positions, so `rate()` of one is WAL bytes per second.

use crate::spool::Spool;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tidemark_proto::Lsn;

type FloatGauge = Gauge<f64, AtomicU64>;

/// How long the server's WAL has waited to be flushed here: the age of the
/// oldest server position seen that the flushed position has not reached.
/// Samples are kept in LSN order; at most [`LagTracker::MAX`] of them (past
/// that the newest sample's position moves up and keeps its older time,
/// which can only overstate the lag).
#[derive(Debug, Default)]
pub struct LagTracker {
    pending: VecDeque<(u64, Instant)>,
}

impl LagTracker {
    const MAX: usize = 128;

    pub fn observe(&mut self, server: u64, flushed: u64, now: Instant) {
        while self.pending.front().is_some_and(|(lsn, _)| *lsn <= flushed) {
            self.pending.pop_front();
        }
        if server <= flushed {
            return;
        }
        let full = self.pending.len() >= Self::MAX;
        match self.pending.back_mut() {
            Some((lsn, _)) if *lsn >= server => {}
            Some((lsn, _)) if full => *lsn = server,
            _ => self.pending.push_back((server, now)),
        }
    }

    pub fn seconds(&self, now: Instant) -> f64 {
        self.pending.front().map(|(_, seen)| now.saturating_duration_since(*seen).as_secs_f64()).unwrap_or(0.0)
    }
}

/// What `/healthz` answers.
#[derive(Debug, serde::Serialize)]
pub struct Health {
    pub healthy: bool,
    /// Why not, one sentence each; empty when healthy.
    pub reasons: Vec<String>,
    pub server_connected: bool,
    pub flushed_lsn: Lsn,
    pub archived_lsn: Lsn,
    pub replication_lag_bytes: u64,
    pub repository_behind_bytes: u64,
}

/// State that is not a number: why streaming or the repository is down.
#[derive(Debug, Default)]
struct Problems {
    lag: LagTracker,
    /// `None` until streaming first starts.
    stream: Option<Result<(), String>>,
    repository: Option<String>,
    spool_full: bool,
}

/// The last backup, the window and the last drill, as the repository says
/// (read by `run` every minute and after each backup and drill).
#[derive(Debug, Default, Clone)]
pub struct RepositoryFacts {
    pub last_backup: Option<tidemark_proto::repo::backup::BackupSummary>,
    /// Start of the restorable window (Unix seconds), if anything is restorable.
    pub window_start: Option<f64>,
    pub last_drill: Option<tidemark_proto::repo::records::DrillRecord>,
}

pub struct Metrics {
    registry: Registry,
    spool: OnceLock<Spool>,
    problems: Mutex<Problems>,
    healthy: Gauge,
    server_connected: Gauge,
    timeline: Gauge,
    server_lsn: Gauge,
    flushed_lsn: Gauge,
    archived_lsn: Gauge,
    summarized_lsn: Gauge,
    replication_lag_bytes: Gauge,
    replication_lag_seconds: FloatGauge,
    last_commit_timestamp: FloatGauge,
    last_commit_age: FloatGauge,
    repository_behind: Gauge,
    repository_reachable: Gauge,
    repository_errors: Counter,
    archive_gaps: Counter,
    spool_bytes: Gauge,
    backup_last_end: FloatGauge,
    backup_last_duration: FloatGauge,
    backup_last_bytes: Gauge,
    backup_last_stored: Gauge,
    backups: Counter,
    backup_failures: Counter,
    window_start: FloatGauge,
    window_end_lsn: Gauge,
    retention_runs: Counter,
    retention_failures: Counter,
    retention_freed: Counter,
    drill_last_timestamp: FloatGauge,
    drill_last_success: Gauge,
    drill_last_rto: FloatGauge,
}

/// Seconds since the Unix epoch of an RFC 3339 time (0 when unreadable).
pub fn unix_seconds(rfc3339: &str) -> f64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
        .unwrap_or(0.0)
}

fn lsn_gauge(lsn: Lsn) -> i64 {
    i64::try_from(lsn.0).unwrap_or(i64::MAX)
}

/// The fixed parts of the configuration the rules compare against.
pub struct Schedule {
    pub spool_limit: Option<u64>,
    pub backup_interval: Option<Duration>,
    pub drill_interval: Option<Duration>,
}

impl Metrics {
    pub fn new(schedule: &Schedule) -> Metrics {
        let mut registry = Registry::with_prefix("tidemark");
        // A gauge with a label rather than an OpenMetrics `info` metric: the
        // classic text format (and promtool) knows no `info` type.
        let build = Family::<Vec<(String, String)>, Gauge>::default();
        build.get_or_create(&vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())]).set(1);
        registry.register("build_info", "The agent's version (always 1)", build);
        let start = FloatGauge::default();
        start.set(crate::clock::now_unix_micros() as f64 / 1e6);
        registry.register("agent_start_timestamp_seconds", "When this agent process started", start);
        let fixed = |registry: &mut Registry, name: &str, help: &str, value: u64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            registry.register(name, help, gauge);
        };
        fixed(
            &mut registry,
            "spool_limit_bytes",
            "Most WAL the spool holds waiting for the repository before streaming pauses (0 = no limit)",
            schedule.spool_limit.unwrap_or(0),
        );
        fixed(
            &mut registry,
            "backup_interval_seconds",
            "Seconds between scheduled base backups (0 = no schedule)",
            schedule.backup_interval.map(|d| d.as_secs()).unwrap_or(0),
        );
        fixed(
            &mut registry,
            "drill_interval_seconds",
            "Seconds between restore drills this agent runs (0 = none; a timer may run them)",
            schedule.drill_interval.map(|d| d.as_secs()).unwrap_or(0),
        );
        let metrics = Metrics {
            registry,
            spool: OnceLock::new(),
            problems: Mutex::new(Problems::default()),
            healthy: Gauge::default(),
            server_connected: Gauge::default(),
            timeline: Gauge::default(),
            server_lsn: Gauge::default(),
            flushed_lsn: Gauge::default(),
            archived_lsn: Gauge::default(),
            summarized_lsn: Gauge::default(),
            replication_lag_bytes: Gauge::default(),
            replication_lag_seconds: FloatGauge::default(),
            last_commit_timestamp: FloatGauge::default(),
            last_commit_age: FloatGauge::default(),
            repository_behind: Gauge::default(),
            repository_reachable: Gauge::default(),
            repository_errors: Counter::default(),
            archive_gaps: Counter::default(),
            spool_bytes: Gauge::default(),
            backup_last_end: FloatGauge::default(),
            backup_last_duration: FloatGauge::default(),
            backup_last_bytes: Gauge::default(),
            backup_last_stored: Gauge::default(),
            backups: Counter::default(),
            backup_failures: Counter::default(),
            window_start: FloatGauge::default(),
            window_end_lsn: Gauge::default(),
            retention_runs: Counter::default(),
            retention_failures: Counter::default(),
            retention_freed: Counter::default(),
            drill_last_timestamp: FloatGauge::default(),
            drill_last_success: Gauge::default(),
            drill_last_rto: FloatGauge::default(),
        };
        metrics.repository_reachable.set(1);
        metrics.register_all()
    }

    /// Registers every metric (clones share their value) with its HELP text.
    fn register_all(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register("healthy", "1 when /healthz answers 200: streaming and uploading are current", self.healthy.clone());
        r.register("server_connected", "1 while WAL streams from PostgreSQL", self.server_connected.clone());
        r.register("timeline", "The timeline being streamed", self.timeline.clone());
        r.register("server_lsn_bytes", "The server's WAL end as last reported, in bytes", self.server_lsn.clone());
        r.register("flushed_lsn_bytes", "WAL durable in the local spool, in bytes", self.flushed_lsn.clone());
        r.register("archived_lsn_bytes", "WAL durable in the repository, in bytes", self.archived_lsn.clone());
        r.register("summarized_lsn_bytes", "WAL the audit has summarized, in bytes", self.summarized_lsn.clone());
        r.register(
            "replication_lag_bytes",
            "Server WAL not yet durable here (server minus flushed)",
            self.replication_lag_bytes.clone(),
        );
        r.register(
            "replication_lag_seconds",
            "How long the oldest server WAL not yet durable here has waited",
            self.replication_lag_seconds.clone(),
        );
        r.register(
            "last_archived_commit_timestamp_seconds",
            "Commit time of the newest transaction in archived, summarized WAL (0 = none)",
            self.last_commit_timestamp.clone(),
        );
        r.register(
            "last_archived_commit_age_seconds",
            "Seconds since that commit (0 = none)",
            self.last_commit_age.clone(),
        );
        r.register(
            "repository_behind_bytes",
            "WAL durable in the spool but not yet in the repository",
            self.repository_behind.clone(),
        );
        r.register("repository_reachable", "0 while writes to the repository fail", self.repository_reachable.clone());
        r.register("repository_errors", "Failed repository writes (each is retried)", self.repository_errors.clone());
        r.register(
            "archive_gaps",
            "Times the server no longer had WAL the archive needed (the window restarts after each)",
            self.archive_gaps.clone(),
        );
        r.register(
            "spool_bytes",
            "Complete WAL segments in the spool waiting for the repository",
            self.spool_bytes.clone(),
        );
        r.register(
            "backup_last_end_timestamp_seconds",
            "When the newest complete base backup ended (0 = none)",
            self.backup_last_end.clone(),
        );
        r.register("backup_last_duration_seconds", "How long it took", self.backup_last_duration.clone());
        r.register("backup_last_bytes", "Its size in the data directory", self.backup_last_bytes.clone());
        r.register("backup_last_stored_bytes", "What it added to the repository", self.backup_last_stored.clone());
        r.register("backups", "Scheduled base backups this agent completed", self.backups.clone());
        r.register("backup_failures", "Scheduled base backups that failed", self.backup_failures.clone());
        r.register(
            "window_start_timestamp_seconds",
            "Earliest restorable time (0 = nothing restorable yet)",
            self.window_start.clone(),
        );
        r.register(
            "window_end_lsn_bytes",
            "End of the restorable window: the archived LSN while something is restorable, else 0",
            self.window_end_lsn.clone(),
        );
        r.register("retention_runs", "Retention runs after scheduled backups", self.retention_runs.clone());
        r.register("retention_failures", "Retention runs that failed", self.retention_failures.clone());
        r.register(
            "retention_freed_bytes",
            "Bytes retention deleted from the repository",
            self.retention_freed.clone(),
        );
        r.register(
            "drill_last_timestamp_seconds",
            "When the newest restore drill finished (0 = never)",
            self.drill_last_timestamp.clone(),
        );
        r.register("drill_last_success", "1 if the newest restore drill passed", self.drill_last_success.clone());
        r.register(
            "drill_last_rto_seconds",
            "Seconds the newest drill took until the restored server accepted writes",
            self.drill_last_rto.clone(),
        );
        self
    }

    /// The spool whose complete segments `spool_bytes` counts.
    pub fn watch_spool(&self, spool: Spool) {
        let _ = self.spool.set(spool);
    }

    fn problems(&self) -> std::sync::MutexGuard<'_, Problems> {
        // A panic elsewhere while holding it leaves plain data: keep going.
        self.problems.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn streaming_started(&self) {
        self.server_connected.set(1);
        self.problems().stream = Some(Ok(()));
    }

    pub fn streaming_stopped(&self, reason: String) {
        self.server_connected.set(0);
        self.problems().stream = Some(Err(reason));
    }

    /// After each received batch: positions and the lag they make.
    pub fn streamed(&self, timeline: u32, server: Lsn, flushed: Lsn) {
        self.timeline.set(i64::from(timeline));
        self.server_lsn.set(lsn_gauge(server));
        self.flushed_lsn.set(lsn_gauge(flushed));
        self.problems().lag.observe(server.0, flushed.0, Instant::now());
    }

    pub fn spool_full(&self, full: bool) {
        self.problems().spool_full = full;
    }

    /// The repository now holds WAL up to `end`.
    pub fn archived(&self, end: Lsn) {
        if lsn_gauge(end) > self.archived_lsn.get() {
            self.archived_lsn.set(lsn_gauge(end));
        }
        self.repository_ok();
    }

    pub fn archived_lsn(&self) -> Lsn {
        Lsn(self.archived_lsn.get().max(0) as u64)
    }

    pub fn repository_ok(&self) {
        self.repository_reachable.set(1);
        self.problems().repository = None;
    }

    pub fn archive_gap(&self) {
        self.archive_gaps.inc();
    }

    pub fn repository_failed(&self, error: &anyhow::Error) {
        self.repository_errors.inc();
        self.repository_reachable.set(0);
        self.problems().repository = Some(format!("{error:#}"));
    }

    /// The audit has summarized WAL up to `end`; `commit` is the newest
    /// commit time in it (Unix microseconds), if it had one.
    pub fn summarized(&self, end: Lsn, commit: Option<i64>) {
        self.summarized_lsn.set(lsn_gauge(end));
        if let Some(micros) = commit {
            let seconds = micros as f64 / 1e6;
            if seconds > self.last_commit_timestamp.get() {
                self.last_commit_timestamp.set(seconds);
            }
        }
    }

    pub fn backup_done(&self, ok: bool) {
        if ok {
            self.backups.inc();
        } else {
            self.backup_failures.inc();
        }
    }

    pub fn retention_done(&self, freed_bytes: Option<u64>) {
        self.retention_runs.inc();
        match freed_bytes {
            Some(bytes) => {
                self.retention_freed.inc_by(bytes);
            }
            None => {
                self.retention_failures.inc();
            }
        }
    }

    pub fn repository_facts(&self, facts: &RepositoryFacts) {
        if let Some(backup) = &facts.last_backup {
            let (start, end) = (unix_seconds(&backup.start_time), unix_seconds(&backup.end_time));
            self.backup_last_end.set(end);
            self.backup_last_duration.set((end - start).max(0.0));
            self.backup_last_bytes.set(i64::try_from(backup.bytes).unwrap_or(i64::MAX));
            self.backup_last_stored.set(i64::try_from(backup.stored_bytes).unwrap_or(i64::MAX));
        }
        self.window_start.set(facts.window_start.unwrap_or(0.0));
        if let Some(drill) = &facts.last_drill {
            self.drill_last_timestamp.set(unix_seconds(&drill.finished));
            self.drill_last_success.set(i64::from(drill.passed));
            self.drill_last_rto.set(drill.rto_seconds.unwrap_or(0.0));
        }
    }

    /// Recomputes the derived values; returns the health they make.
    pub fn health(&self) -> Health {
        let server = self.server_lsn.get().max(0) as u64;
        let flushed = self.flushed_lsn.get().max(0) as u64;
        let archived = self.archived_lsn.get().max(0) as u64;
        let lag_bytes = server.saturating_sub(flushed);
        let behind = flushed.saturating_sub(archived);
        self.replication_lag_bytes.set(i64::try_from(lag_bytes).unwrap_or(i64::MAX));
        self.repository_behind.set(i64::try_from(behind).unwrap_or(i64::MAX));
        let commit = self.last_commit_timestamp.get();
        let now = crate::clock::now_unix_micros() as f64 / 1e6;
        self.last_commit_age.set(if commit > 0.0 { (now - commit).max(0.0) } else { 0.0 });
        self.window_end_lsn.set(if self.window_start.get() > 0.0 { self.archived_lsn.get() } else { 0 });
        if let Some(spool) = self.spool.get() {
            self.spool_bytes.set(i64::try_from(spool_waiting_bytes(spool)).unwrap_or(i64::MAX));
        }
        let problems = self.problems();
        self.replication_lag_seconds.set(problems.lag.seconds(Instant::now()));
        let mut reasons = Vec::new();
        match &problems.stream {
            None => reasons.push("not streaming yet: the agent is starting".to_string()),
            Some(Err(why)) => reasons.push(format!("not streaming from PostgreSQL: {why}")),
            Some(Ok(())) => {}
        }
        if let Some(why) = &problems.repository {
            reasons.push(format!("repository writes failing (retrying; the WAL waits in the spool): {why}"));
        }
        if problems.spool_full {
            reasons.push("the spool is at its limit: streaming paused until uploads catch up".to_string());
        }
        let healthy = reasons.is_empty();
        self.healthy.set(i64::from(healthy));
        Health {
            healthy,
            reasons,
            server_connected: self.server_connected.get() == 1,
            flushed_lsn: Lsn(flushed),
            archived_lsn: Lsn(archived),
            replication_lag_bytes: lag_bytes,
            repository_behind_bytes: behind,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric, freshly derived.
    pub fn render(&self) -> String {
        self.health();
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        classic_text(&text)
    }
}

/// The classic Prometheus text format from the client's OpenMetrics text:
/// there a counter family `x` has samples `x_total`; here HELP and TYPE
/// must name `x_total` itself (promtool and older scrapers expect it), and
/// there is no `# EOF`.
pub fn classic_text(open_metrics: &str) -> String {
    let counters: Vec<&str> =
        open_metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Bytes of complete segments in the spool (what the limit counts).
fn spool_waiting_bytes(spool: &Spool) -> u64 {
    let Ok(files) = spool.scan() else { return 0 };
    files.iter().filter(|f| f.complete).count() as u64 * spool.segment_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_unflushed_position() {
        let t0 = Instant::now();
        let mut lag = LagTracker::default();
        lag.observe(100, 100, t0);
        assert_eq!(lag.seconds(t0 + Duration::from_secs(5)), 0.0);
        lag.observe(200, 100, t0);
        lag.observe(300, 150, t0 + Duration::from_secs(2));
        assert_eq!(lag.seconds(t0 + Duration::from_secs(3)), 3.0);
        // Flushing past 200 leaves the sample first seen at 2 s.
        lag.observe(300, 250, t0 + Duration::from_secs(3));
        assert_eq!(lag.seconds(t0 + Duration::from_secs(4)), 2.0);
        lag.observe(300, 300, t0 + Duration::from_secs(4));
        assert_eq!(lag.seconds(t0 + Duration::from_secs(9)), 0.0);
    }

    #[test]
    fn lag_samples_stay_bounded_and_never_understate() {
        let t0 = Instant::now();
        let mut lag = LagTracker::default();
        for i in 1..10_000u64 {
            lag.observe(i * 10, 0, t0 + Duration::from_millis(i));
        }
        assert!(lag.pending.len() <= LagTracker::MAX);
        assert_eq!(lag.pending.back().map(|(lsn, _)| *lsn), Some(99_990));
        assert!(lag.seconds(t0 + Duration::from_secs(20)) >= 19.9);
    }

    #[test]
    fn counters_are_named_with_total_in_the_classic_format() {
        let open = "# HELP x_errors Errors.\n# TYPE x_errors counter\nx_errors_total 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            classic_text(open),
            "# HELP x_errors_total Errors.\n# TYPE x_errors_total counter\nx_errors_total 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }

    #[test]
    fn health_names_each_problem_and_metrics_render() {
        let metrics = Metrics::new(&Schedule {
            spool_limit: Some(1 << 30),
            backup_interval: Some(Duration::from_secs(3600)),
            drill_interval: None,
        });
        let health = metrics.health();
        assert!(!health.healthy && health.reasons[0].contains("starting"), "{health:?}");
        metrics.streaming_started();
        metrics.streamed(1, Lsn(5000), Lsn(4000));
        metrics.archived(Lsn(3000));
        let health = metrics.health();
        assert!(health.healthy, "{health:?}");
        assert_eq!((health.replication_lag_bytes, health.repository_behind_bytes), (1000, 1000));
        metrics.repository_failed(&anyhow::anyhow!("connection refused"));
        metrics.streaming_stopped("server closed the connection".into());
        let health = metrics.health();
        assert_eq!(health.reasons.len(), 2, "{health:?}");
        assert!(health.reasons[0].contains("server closed") && health.reasons[1].contains("connection refused"));
        let text = metrics.render();
        for line in [
            "tidemark_healthy 0",
            "tidemark_archived_lsn_bytes 3000",
            "tidemark_replication_lag_bytes 1000",
            "tidemark_repository_errors_total 1",
            "tidemark_backup_interval_seconds 3600",
            "tidemark_spool_limit_bytes 1073741824",
            "tidemark_build_info{version=",
            "# HELP tidemark_repository_behind_bytes ",
            "# TYPE tidemark_repository_errors_total counter",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
