//! This process's wall clock, for the times it writes into shared records
//! (when a job was created, updated, finished). No decision between
//! replicas rests on it: leases are judged by what an observer sees change
//! and by its own monotonic clock, expiry by the store's clock.
//!
//! For tests only, `TLSERVE_TEST_CLOCK_SKEW_SECONDS` (seconds, may be
//! negative) shifts what [`now`] returns, to show that a replica whose clock
//! is wrong decides nothing wrongly (tests/integration/replicas.rs). It is read once and
//! logged at start-up; it is not a setting.

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

/// The variable a test sets to skew this process's wall clock.
pub const SKEW_ENV: &str = "TLSERVE_TEST_CLOCK_SKEW_SECONDS";

/// The skew in seconds; 0 unless the test variable says otherwise.
pub fn skew_seconds() -> f64 {
    static SKEW: OnceLock<f64> = OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(SKEW_ENV)
            .ok()
            .and_then(|value| value.trim().parse::<f64>().ok())
            .filter(|seconds| seconds.is_finite() && seconds.abs() < 1e9)
            .unwrap_or(0.0)
    })
}

/// The wall-clock time, skewed as a test asked.
pub fn now() -> SystemTime {
    let skew = skew_seconds();
    let real = SystemTime::now();
    let shift = Duration::from_secs_f64(skew.abs());
    let shifted = match skew >= 0.0 {
        true => real.checked_add(shift),
        false => real.checked_sub(shift),
    };
    shifted.unwrap_or(real)
}
