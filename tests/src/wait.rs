//! Waiting for conditions: poll until true or a generous deadline passes.

use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it returns `Some`, or panics naming `what`
/// after `deadline`. Deadlines are generous: a loaded CI machine is slow.
pub fn wait_until<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
