//! The one retry policy: exponential backoff with jitter, capped.

use std::time::Duration;

/// Delay before attempt `attempt` (0-based): 0.5 s doubling to `max`, with up
/// to 25 % jitter so many agents do not retry in step.
pub fn delay(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1u32 << attempt.min(16));
    let capped = base.min(max);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let jitter = capped.mul_f64(f64::from(nanos % 1000) / 4000.0);
    capped + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let max = Duration::from_secs(30);
        assert!(delay(0, max) >= Duration::from_millis(500));
        assert!(delay(0, max) < Duration::from_millis(650));
        assert!(delay(3, max) >= Duration::from_secs(4));
        assert!(delay(20, max) >= max && delay(20, max) <= max.mul_f64(1.25));
    }
}
