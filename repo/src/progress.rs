//! Progress of long operations (backup, restore fetch and replay, verify,
//! re-encryption), for both binaries: a bar with bytes, rate and ETA when
//! stderr is a terminal (indicatif), otherwise one log line every few
//! seconds (`TIDEMARK_PROGRESS_SECS`, default 5) and one at the end, so a
//! service's journal shows that a long restore is moving.
//!
//! Shared by concurrent tasks (`&self` everywhere; counts are atomics).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tracing target of the log lines; both binaries enable it at `info`
/// whatever their default level, so the lines appear without `TIDEMARK_LOG`.
pub const LOG_TARGET: &str = "tidemark::progress";

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Objects,
}

pub struct Progress {
    what: String,
    unit: Unit,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    /// When the last log line was written (no bar).
    last_line: Mutex<Instant>,
    every: Duration,
}

/// What one line says: done and total (MB or objects), percent, rate, ETA.
pub fn describe(what: &str, unit: Unit, done: u64, total: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / seconds;
    let total = total.max(done);
    let percent = if total > 0 { done as f64 * 100.0 / total as f64 } else { 100.0 };
    let eta = if rate > 0.0 && total > done { format!("{:.0} s", (total - done) as f64 / rate) } else { "-".into() };
    match unit {
        Unit::Bytes => format!(
            "{what}: {:.1} of {:.1} MB ({percent:.0}%), {:.1} MB/s, ETA {eta}",
            done as f64 / 1e6,
            total as f64 / 1e6,
            rate / 1e6
        ),
        Unit::Objects => format!("{what}: {done} of {total} objects ({percent:.0}%), {rate:.1}/s, ETA {eta}"),
    }
}

fn line_interval() -> Duration {
    let secs = std::env::var("TIDEMARK_PROGRESS_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(5.0);
    Duration::from_secs_f64(secs.clamp(0.1, 3600.0))
}

impl Progress {
    /// Progress over `total` bytes (it may grow with [`Progress::grow`]).
    pub fn bytes(what: impl Into<String>, total: u64) -> Progress {
        Progress::new(what.into(), Unit::Bytes, total)
    }

    /// Progress over `total` objects.
    pub fn objects(what: impl Into<String>, total: u64) -> Progress {
        Progress::new(what.into(), Unit::Objects, total)
    }

    fn new(what: String, unit: Unit, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = match unit {
                Unit::Bytes => "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                Unit::Objects => "{msg} [{bar:30}] {pos}/{len} objects {per_sec} ETA {eta}",
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.clone());
            bar
        });
        Progress {
            what,
            unit,
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            started: Instant::now(),
            bar,
            last_line: Mutex::new(Instant::now()),
            every: line_interval(),
        }
    }

    pub fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.show(done);
    }

    /// Sets the bytes done (for work measured by position, like WAL replay).
    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.show(done);
    }

    pub fn grow(&self, more: u64) {
        let total = self.total.fetch_add(more, Ordering::Relaxed) + more;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    fn show(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= self.every {
            *last = Instant::now();
            drop(last);
            let total = self.total.load(Ordering::Relaxed);
            tracing::info!(target: LOG_TARGET, "{}", describe(&self.what, self.unit, done, total, self.started.elapsed()));
        }
    }

    /// The final line (or the bar's last state).
    pub fn finish(&self) {
        let done = self.done.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.finish(),
            None => {
                let total = self.total.load(Ordering::Relaxed).max(done);
                tracing::info!(
                    target: LOG_TARGET,
                    "{} (done in {:.1} s)",
                    describe(&self.what, self.unit, done, total, self.started.elapsed()),
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_amount_rate_and_eta() {
        let line = describe("fetch", Unit::Bytes, 50_000_000, 200_000_000, Duration::from_secs(10));
        assert_eq!(line, "fetch: 50.0 of 200.0 MB (25%), 5.0 MB/s, ETA 30 s");
        let line = describe("verify", Unit::Objects, 30, 120, Duration::from_secs(10));
        assert_eq!(line, "verify: 30 of 120 objects (25%), 3.0/s, ETA 30 s");
        let done = describe("replay", Unit::Bytes, 10, 0, Duration::from_secs(1));
        assert_eq!(done, "replay: 0.0 of 0.0 MB (100%), 0.0 MB/s, ETA -");
    }
}
