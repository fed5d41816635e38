//! Per-object exponential backoff for the error policies: the first retry comes quickly,
//! an object that keeps failing is retried less and less often, up to a cap, and one
//! object's failures never slow another's retries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const BASE: Duration = Duration::from_millis(500);
const CAP: Duration = Duration::from_secs(120);
/// Failing objects remembered at most; past it the memory starts over (a bound, not a cache).
const MAX_TRACKED: usize = 10_000;

/// The delay before retry number `attempt` (1 for the first failure): 0.5 s doubling, capped.
pub fn delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    BASE.saturating_mul(factor).min(CAP)
}

/// Consecutive failures by object key (`kind/namespace/name`).
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `key` and returns how long to wait before retrying it.
    pub fn failed(&self, key: &str) -> Duration {
        let Ok(mut failures) = self.failures.lock() else {
            return CAP;
        };
        if failures.len() >= MAX_TRACKED && !failures.contains_key(key) {
            failures.clear();
        }
        let attempt = failures.entry(key.to_string()).or_insert(0);
        *attempt = attempt.saturating_add(1);
        delay(*attempt)
    }

    /// Forgets `key`'s failures after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_half_a_second_up_to_the_cap() {
        let table = [
            (1, 500),
            (2, 1_000),
            (3, 2_000),
            (4, 4_000),
            (8, 64_000),
            (9, 120_000),
            (50, 120_000),
            (u32::MAX, 120_000),
        ];
        for (attempt, millis) in table {
            assert_eq!(
                delay(attempt),
                Duration::from_millis(millis),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn objects_back_off_independently_and_success_resets() {
        let backoff = Backoff::default();
        assert_eq!(backoff.failed("a"), Duration::from_millis(500));
        assert_eq!(backoff.failed("a"), Duration::from_secs(1));
        assert_eq!(backoff.failed("b"), Duration::from_millis(500));
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a"), Duration::from_millis(500));
    }
}
