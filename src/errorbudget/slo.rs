//! The arithmetic of a service level objective: budget, error ratio, burn rate, consumption,
//! time to exhaustion, and the multiwindow burn-rate pairs. Pure.
//!
//! With objective O (a fraction) the error budget is B = 1 - O. Over a window W the error
//! ratio is E(W) = bad(W) / total(W); the burn rate is BR(W) = E(W) / B (1.0 spends exactly the
//! budget over the SLO window); the budget consumed is E(window) / B, and what remains is
//! max(0, 1 - consumed). `docs/errorbudgets.md` works an example through.

use std::time::Duration;

/// Floats closer than this are equal: 1 - 0.999 is 0.0010000000000000009, not 0.001.
pub const TOLERANCE: f64 = 1e-9;

pub use crate::api::errorbudget::Objective;

/// What Prometheus answered for one window: the rate of bad events and of all events.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub bad: f64,
    pub total: f64,
}

/// Why a window's ratio cannot be judged.
#[derive(Clone, Debug, PartialEq)]
pub enum Unjudgeable {
    /// The numbers are wrong: NaN, infinite, negative, or more bad events than events.
    Invalid(String),
    /// Too few events to say anything (none at all, or fewer than `minEvents`).
    TooFewEvents(String),
}

/// The error ratio E = bad / total over a window of `window` length, refusing answers that
/// cannot be right and windows with fewer than `min_events` events.
pub fn error_ratio(rates: Rates, window: Duration, min_events: u64) -> Result<f64, Unjudgeable> {
    let Rates { bad, total } = rates;
    if !bad.is_finite() || !total.is_finite() {
        return Err(Unjudgeable::Invalid(format!(
            "Prometheus answered a non-finite rate (bad {bad}, total {total})"
        )));
    }
    if bad < -TOLERANCE || total < -TOLERANCE {
        return Err(Unjudgeable::Invalid(format!(
            "Prometheus answered a negative rate (bad {bad}, total {total})"
        )));
    }
    let events = total * window.as_secs_f64();
    if total <= TOLERANCE {
        return Err(Unjudgeable::TooFewEvents(
            "no events in the window".to_string(),
        ));
    }
    if events + TOLERANCE < min_events as f64 {
        return Err(Unjudgeable::TooFewEvents(format!(
            "{events:.0} events in the window, fewer than minEvents {min_events}"
        )));
    }
    let ratio = bad.max(0.0) / total;
    if ratio > 1.0 + TOLERANCE {
        return Err(Unjudgeable::Invalid(format!(
            "more bad events than events (bad {bad}, total {total}): check the queries"
        )));
    }
    Ok(ratio.min(1.0))
}

/// The burn rate of an error ratio: 1.0 spends exactly the budget over the SLO window.
pub fn burn_rate(ratio: f64, budget: f64) -> f64 {
    ratio / budget
}

/// Budget consumed over the SLO window, as a fraction (may exceed 1).
pub fn consumed(window_ratio: f64, budget: f64) -> f64 {
    window_ratio / budget
}

/// Budget left, as a fraction, never below 0.
pub fn remaining(consumed: f64) -> f64 {
    (1.0 - consumed).max(0.0)
}

/// How long until the budget is spent at `burn` (the short-window burn rate): the remaining
/// share of the window's budget, spent at `burn` budgets per window. `None` when nothing burns.
pub fn time_to_exhaustion(remaining: f64, burn: f64, window: Duration) -> Option<Duration> {
    if burn <= TOLERANCE {
        return None;
    }
    let seconds = remaining * window.as_secs_f64() / burn;
    seconds
        .is_finite()
        .then(|| Duration::from_secs_f64(seconds.max(0.0)))
}

/// A multiwindow, multi-burn-rate alert: it fires when both windows burn faster than `factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct BurnAlert {
    /// The condition type in status.
    pub name: &'static str,
    pub long: Duration,
    pub short: Duration,
    pub factor: f64,
}

const DAY: u64 = 86_400;
/// The SRE workbook's pairs for a 30-day SLO: (name, long, short, share of the budget the long
/// window may spend). The factor is k = share x SLO window / long window: 14.4, 6 and 1.
const WORKBOOK: [(&str, u64, u64, f64); 3] = [
    ("FastBurn", 3_600, 300, 0.02),
    ("MediumBurn", 6 * 3_600, 1_800, 0.05),
    ("SlowBurn", 3 * DAY, 6 * 3_600, 0.10),
];
/// Burn windows never shorter than this (a rate needs a few scrapes).
pub const MIN_BURN_WINDOW: Duration = Duration::from_secs(10);

/// The multiwindow pairs for an SLO window. The workbook's windows are for 30 days; for
/// another window both alert windows scale with it (a 7-day SLO watches 14 minutes and
/// 1h24m for the fast burn), so the factors stay 14.4, 6 and 1: k = share x window / long.
pub fn burn_alerts(window: Duration) -> Vec<BurnAlert> {
    let scale = window.as_secs_f64() / (30 * DAY) as f64;
    let scaled =
        |secs: u64| Duration::from_secs((secs as f64 * scale).round() as u64).max(MIN_BURN_WINDOW);
    WORKBOOK
        .iter()
        .map(|&(name, long, short, share)| {
            let long = scaled(long);
            BurnAlert {
                name,
                long,
                short: scaled(short),
                factor: share * window.as_secs_f64() / long.as_secs_f64(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: Duration = Duration::from_secs(3_600);

    #[test]
    fn objectives_parse_exactly() {
        let table = [
            ("99.9", Some(0.001)),
            ("99.99", Some(0.0001)),
            ("95", Some(0.05)),
            ("99.999999", Some(0.000_000_01)),
            ("0.5", Some(0.995)),
            ("100", None),
            // Found by fuzzing: overflowed the exact arithmetic.
            ("18446744073709551", None),
            ("0", None),
            ("99.9999999", None),
            ("9a", None),
            ("", None),
            (".5", None),
        ];
        for (text, budget) in table {
            let parsed = Objective::parse(text).map(Objective::budget);
            match budget {
                Some(b) => assert!((parsed.clone().unwrap() - b).abs() < 1e-15, "{text}"),
                None => assert!(parsed.is_err(), "{text}"),
            }
        }
    }

    #[test]
    fn the_worked_example() {
        // 99.9% over 30 days; 0.042% of requests failed over the window: 42% consumed.
        let budget = Objective::parse("99.9").unwrap().budget();
        let window = Duration::from_secs(30 * DAY);
        let ratio = error_ratio(
            Rates {
                bad: 0.42,
                total: 1_000.0,
            },
            window,
            0,
        )
        .unwrap();
        let used = consumed(ratio, budget);
        assert!((used - 0.42).abs() < TOLERANCE);
        assert!((remaining(used) - 0.58).abs() < TOLERANCE);
        // Burning 14.4x: the 58% left lasts 0.58 x 30d / 14.4 = 29 hours.
        let left = time_to_exhaustion(remaining(used), 14.4, window).unwrap();
        assert_eq!(left.as_secs(), 29 * 3_600);
    }

    #[test]
    fn bad_answers_are_never_judged() {
        let w = HOUR;
        let table = [
            (f64::NAN, 1.0, "non-finite"),
            (1.0, f64::INFINITY, "non-finite"),
            (-1.0, 1.0, "negative"),
            (2.0, 1.0, "more bad events"),
        ];
        for (bad, total, says) in table {
            match error_ratio(Rates { bad, total }, w, 0) {
                Err(Unjudgeable::Invalid(why)) => assert!(why.contains(says), "{why}"),
                other => panic!("{bad}/{total}: {other:?}"),
            }
        }
        assert!(matches!(
            error_ratio(
                Rates {
                    bad: 0.0,
                    total: 0.0
                },
                w,
                0
            ),
            Err(Unjudgeable::TooFewEvents(_))
        ));
        // 10 requests an hour against minEvents 100: too few to judge a 99.99% objective.
        assert!(matches!(
            error_ratio(
                Rates {
                    bad: 0.0,
                    total: 10.0 / 3_600.0
                },
                w,
                100
            ),
            Err(Unjudgeable::TooFewEvents(_))
        ));
    }

    #[test]
    fn the_workbook_factors_hold_for_any_window() {
        for days in [30, 28, 7, 1] {
            let alerts = burn_alerts(Duration::from_secs(days * DAY));
            let factors: Vec<f64> = alerts
                .iter()
                .map(|a| (a.factor * 10.0).round() / 10.0)
                .collect();
            assert_eq!(factors, vec![14.4, 6.0, 1.0], "{days}d");
        }
        let thirty = burn_alerts(Duration::from_secs(30 * DAY));
        assert_eq!(
            (thirty[0].long, thirty[0].short),
            (HOUR, Duration::from_secs(300))
        );
        assert_eq!(thirty[2].long, Duration::from_secs(3 * DAY));
        // A 10-minute SLO (the tests') keeps windows of at least 10 s.
        assert!(
            burn_alerts(Duration::from_secs(600))
                .iter()
                .all(|a| a.short >= MIN_BURN_WINDOW)
        );
    }

    proptest! {
        #[test]
        fn remaining_stays_in_range_and_consumed_grows_with_errors(
            bad in 0.0..1_000.0f64,
            more in 0.0..1_000.0f64,
            total in 1_000.0..10_000.0f64,
            objective in prop_oneof![Just("99.9"), Just("99"), Just("99.99"), Just("90")],
        ) {
            let budget = Objective::parse(objective).unwrap().budget();
            let w = HOUR;
            let less = error_ratio(Rates { bad, total }, w, 0).unwrap();
            let worse = error_ratio(Rates { bad: (bad + more).min(total), total }, w, 0).unwrap();
            prop_assert!(consumed(worse, budget) + TOLERANCE >= consumed(less, budget));
            let left = remaining(consumed(less, budget));
            prop_assert!((0.0..=1.0).contains(&left));
        }
    }
}
