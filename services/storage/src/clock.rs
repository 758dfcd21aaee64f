//! Versions: causal timestamps in microseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Hands out strictly increasing versions close to wall-clock microseconds, so two events
/// made by one process never share a version even within one microsecond.
#[derive(Debug, Default)]
pub struct VersionClock {
    last: AtomicU64,
}

impl VersionClock {
    /// A clock that has handed out no version yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next version, in microseconds since the Unix epoch: the wall clock now, or one
    /// more than the last version this clock handed out if the wall clock has not moved past
    /// it (or went back). Safe to call from many threads at once; no two calls get the same
    /// version.
    pub fn next(&self) -> u64 {
        let now = now_micros() as u64;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now.max(last + 1);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return candidate,
                Err(seen) => last = seen,
            }
        }
    }
}

/// The environment variable that offsets this process's wall clock, in milliseconds (signed):
/// for tests that run replicas whose clocks disagree, where Debian's `faketime` cannot be used
/// (librdkafka's timed waits spin on a clock set back). Never set it in production.
pub const SKEW_VAR: &str = "CONVEYOR_TEST_CLOCK_SKEW_MS";

/// [`SKEW_VAR`], in µs: 0 when unset or not a number.
fn skew_micros() -> i64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(SKEW_VAR)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |ms| ms.saturating_mul(1_000))
    })
}

/// Wall-clock microseconds since the Unix epoch (offset by [`SKEW_VAR`] in tests): what every
/// version, claim time and log append time of Conveyor's own is taken from.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        .saturating_add(skew_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase() {
        let clock = VersionClock::new();
        let mut last = 0;
        for _ in 0..10_000 {
            let v = clock.next();
            assert!(v > last);
            last = v;
        }
    }
}
