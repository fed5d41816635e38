//! The ErrorBudget planner: given the spec, the last status and what Prometheus answered for
//! each window, what is the budget's status now, and what must be said about it? Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::policy;
use super::slo::{self, Objective, Rates, Unjudgeable};
use crate::api::errorbudget::{BudgetPhase, ErrorBudgetSpec, ErrorBudgetStatus};
use crate::conditions;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// Burn-rate windows published when the spec names none.
const DEFAULT_BURN_WINDOWS: [u64; 4] = [300, 3_600, 6 * 3_600, 3 * 86_400];
/// Retry sooner than the interval after a failed evaluation, but not in a tight loop.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// What one evaluation found for one window.
pub type Answer = Result<Rates, String>;

/// The world as the reconciler saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    pub spec: ErrorBudgetSpec,
    pub status: ErrorBudgetStatus,
    /// Prometheus's answers by window, when an evaluation was due and made.
    pub answers: Option<BTreeMap<Duration, Answer>>,
    /// The share (0 to 1) of the window's coverage steps that have data, asked with the
    /// answers (`None`: not asked, or Prometheus could not say).
    pub coverage: Option<f64>,
    /// Targets that do not exist, as `namespace/name` (`None`: not looked at this time;
    /// they are looked at with each evaluation).
    pub missing_targets: Option<Vec<String>>,
    pub now: Timestamp,
}

/// An Event to record.
pub use crate::k8s::events::PlannedEvent;

/// What the reconciler must do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: ErrorBudgetStatus,
    pub events: Vec<PlannedEvent>,
    pub requeue_after: Duration,
}

/// The evaluation interval.
pub fn interval(spec: &ErrorBudgetSpec) -> Duration {
    spec.evaluation_interval
        .as_ref()
        .map_or(DEFAULT_INTERVAL, |d| d.as_std())
        .max(Duration::from_secs(1))
}

/// Whether an evaluation is due: never made, the spec changed, or the interval has passed
/// since the last attempt.
pub fn due(
    spec: &ErrorBudgetSpec,
    status: &ErrorBudgetStatus,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let Some(last) = &status.last_attempt_time else {
        return true;
    };
    status.observed_generation != generation || add(last.0, interval(spec)) <= now
}

/// Every window an evaluation asks Prometheus about: the SLO window, the published burn-rate
/// windows, and both windows of each multiwindow alert.
pub fn windows(spec: &ErrorBudgetSpec) -> BTreeSet<Duration> {
    let window = spec.window.as_std();
    let burn: Vec<Duration> = if spec.burn_rate_windows.is_empty() {
        DEFAULT_BURN_WINDOWS
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect()
    } else {
        spec.burn_rate_windows.iter().map(|d| d.as_std()).collect()
    };
    std::iter::once(window)
        .chain(burn)
        .chain(
            slo::burn_alerts(window)
                .into_iter()
                .flat_map(|a| [a.long, a.short]),
        )
        .collect()
}

/// How many points the coverage query samples across the window.
const COVERAGE_POINTS: u64 = 60;

/// The step of the coverage query: a sixtieth of the window, but never shorter than the
/// shortest burn-rate window (a rate over less than that may hold no two scrapes).
pub fn coverage_step(spec: &ErrorBudgetSpec) -> Duration {
    let shortest = spec
        .burn_rate_windows
        .iter()
        .map(|d| d.as_std())
        .min()
        .unwrap_or(Duration::from_secs(DEFAULT_BURN_WINDOWS[0]));
    let window = spec.window.as_std();
    let sixtieth = Duration::from_secs((window.as_secs() / COVERAGE_POINTS).max(1));
    sixtieth.max(shortest).min(window)
}

/// How much of the window has data: the total query, rated over one step, sampled at every
/// step across the window; the points with an answer over the points asked.
/// `total_over_step` is the total query with `{{window}}` already set to the step.
pub fn coverage_query(spec: &ErrorBudgetSpec, total_over_step: &str) -> (String, u64) {
    let step = coverage_step(spec);
    let window = spec.window.as_std();
    let points = (window.as_secs() / step.as_secs().max(1)).max(1);
    (
        format!(
            "count_over_time(({total_over_step})[{}:{}])",
            window_text(window),
            window_text(step)
        ),
        points,
    )
}

/// How a window is written in queries and in status (`5m`, `1h`, `3d`).
pub fn window_text(window: Duration) -> String {
    crate::api::Duration::from_std(window).to_string()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

fn round(value: f64, places: i32) -> f64 {
    let factor = 10f64.powi(places);
    (value * factor).round() / factor
}

/// Plans one reconcile.
pub fn plan(o: &Observed) -> Plan {
    let mut status = o.status.clone();
    let mut events = Vec::new();
    let before = (status.phase, status.active_action);

    // Targets: a missing one is named, and evaluation goes on for the others.
    match o.missing_targets.as_deref() {
        None => {}
        Some([]) => set(
            &mut status,
            (o.generation, o.now),
            "TargetsFound",
            true,
            "TargetsFound",
            String::new(),
        ),
        Some(missing) => set(
            &mut status,
            (o.generation, o.now),
            "TargetsFound",
            false,
            "TargetNotFound",
            format!("no Rollout {}", missing.join(", ")),
        ),
    }

    let requeue_after = match &o.answers {
        None => {
            // Not due: nothing new to say.
            let next = status
                .last_attempt_time
                .as_ref()
                .map_or(o.now, |t| add(t.0, interval(&o.spec)));
            return Plan {
                status,
                events,
                requeue_after: until(o.now, next).max(Duration::from_millis(200)),
            };
        }
        Some(answers) => {
            status.observed_generation = o.generation;
            status.last_attempt_time = Some(Time(o.now));
            status.queries = Some(2 * answers.len() as i32 + 1);
            if let Some(coverage) = o.coverage {
                status.window_coverage = Some(round(coverage.clamp(0.0, 1.0) * 100.0, 1));
            }
            match evaluate(&o.spec, answers) {
                Ok(figures) => record(&mut status, &o.spec, figures, o.now, o.generation),
                Err(Blind { phase, why }) => blind(&mut status, phase, why, o.now, o.generation),
            }
            if status.phase == Some(BudgetPhase::Unknown) {
                RETRY_AFTER_FAILURE.min(interval(&o.spec))
            } else {
                interval(&o.spec)
            }
        }
    };

    if (status.phase, status.active_action) != before {
        let warning = !matches!(status.phase, Some(BudgetPhase::Healthy) | None);
        events.push(PlannedEvent {
            warning,
            reason: "PhaseChanged",
            // "Frozen: ...": the new phase first, which notifications (and people) read.
            message: format!(
                "{}: {}",
                status
                    .phase
                    .map_or_else(|| "Unknown".to_string(), |p| format!("{p:?}")),
                status.message.clone().unwrap_or_default()
            ),
        });
    }
    Plan {
        status,
        events,
        requeue_after,
    }
}

/// Sets a condition as of `(generation, now)`.
fn set(
    status: &mut ErrorBudgetStatus,
    (generation, now): (Option<i64>, Timestamp),
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
) {
    conditions::set(
        &mut status.conditions,
        kind,
        ok,
        reason,
        message,
        generation,
        now,
    );
}

/// The figures of a successful evaluation.
#[derive(Clone, Debug, PartialEq)]
struct Figures {
    consumed: f64,
    burn: BTreeMap<Duration, f64>,
}

/// Why an evaluation could not judge the budget.
#[derive(Clone, Debug, PartialEq)]
struct Blind {
    phase: BudgetPhase,
    why: String,
}

fn evaluate(
    spec: &ErrorBudgetSpec,
    answers: &BTreeMap<Duration, Answer>,
) -> Result<Figures, Blind> {
    let unknown = |why: String| Blind {
        phase: BudgetPhase::Unknown,
        why,
    };
    let budget = Objective::parse(&spec.objective).map_err(unknown)?.budget();
    let window = spec.window.as_std();
    let min_events = spec.min_events.unwrap_or(1).max(1) as u64;
    let mut burn = BTreeMap::new();
    for (length, answer) in answers {
        let rates = answer
            .clone()
            .map_err(|e| unknown(format!("window {}: {e}", window_text(*length))))?;
        // The SLO window needs enough events; a short burn window with none simply burns 0.
        let needed = if *length == window { min_events } else { 1 };
        let ratio = match slo::error_ratio(rates, *length, needed) {
            Ok(ratio) => ratio,
            Err(Unjudgeable::Invalid(why)) => {
                return Err(unknown(format!("window {}: {why}", window_text(*length))));
            }
            Err(Unjudgeable::TooFewEvents(why)) if *length == window => {
                return Err(Blind {
                    phase: BudgetPhase::InsufficientData,
                    why,
                });
            }
            Err(Unjudgeable::TooFewEvents(_)) => 0.0,
        };
        burn.insert(*length, slo::burn_rate(ratio, budget));
    }
    let consumed = burn
        .get(&window)
        .copied()
        .ok_or_else(|| unknown(format!("no answer for the window {}", window_text(window))))?;
    Ok(Figures { consumed, burn })
}

fn record(
    status: &mut ErrorBudgetStatus,
    spec: &ErrorBudgetSpec,
    figures: Figures,
    now: Timestamp,
    generation: Option<i64>,
) {
    let window = spec.window.as_std();
    let consumed_percent = figures.consumed * 100.0;
    let remaining = slo::remaining(figures.consumed);
    let policy = if spec.policy.is_empty() {
        policy::default_policy()
    } else {
        spec.policy.clone()
    };
    let (phase, action, threshold) = policy::judge(consumed_percent, &policy);
    status.consumed_percent = Some(round(consumed_percent, 3));
    status.remaining_percent = Some(round(remaining * 100.0, 3));
    status.burn_rates = figures
        .burn
        .iter()
        .filter(|(w, _)| {
            **w != window || spec.burn_rate_windows.iter().any(|b| b.as_std() == window)
        })
        .map(|(w, b)| (window_text(*w), round(*b, 4)))
        .collect();
    let shortest = figures.burn.iter().next().map(|(_, b)| *b).unwrap_or(0.0);
    status.time_to_exhaustion = slo::time_to_exhaustion(remaining, shortest, window)
        .map(|d| crate::api::Duration::from_secs(d.as_secs()).to_string());
    status.phase = Some(phase);
    status.active_action = action;
    status.threshold_in_force = threshold;
    status.stale = None;
    status.last_evaluation_time = Some(Time(now));
    let threshold_text = match (action, threshold) {
        (Some(a), Some(t)) => format!("; {a:?} at {t}%"),
        _ => String::new(),
    };
    let coverage_text = match status.window_coverage {
        Some(c) if c < 99.0 => format!(
            "; data covers {c:.0}% of the {} window",
            window_text(window)
        ),
        _ => String::new(),
    };
    status.message = Some(format!(
        "{:.1}% of the budget consumed, {:.1}% left{threshold_text}{coverage_text}",
        consumed_percent,
        remaining * 100.0
    ));
    let at = (generation, now);
    set(status, at, "Ready", true, "Evaluated", String::new());
    let healthy = phase == BudgetPhase::Healthy;
    let message = status.message.clone().unwrap_or_default();
    set(
        status,
        at,
        "BudgetHealthy",
        healthy,
        if healthy {
            "WithinBudget"
        } else {
            "ThresholdCrossed"
        },
        message,
    );
    for alert in slo::burn_alerts(window) {
        let long = figures.burn.get(&alert.long).copied().unwrap_or(0.0);
        let short = figures.burn.get(&alert.short).copied().unwrap_or(0.0);
        let firing = long > alert.factor + slo::TOLERANCE && short > alert.factor + slo::TOLERANCE;
        set(
            status,
            at,
            alert.name,
            firing,
            if firing {
                "BurningTooFast"
            } else {
                "BurnWithinLimit"
            },
            format!(
                "burn {long:.2} over {} and {short:.2} over {} against {:.1}",
                window_text(alert.long),
                window_text(alert.short),
                alert.factor
            ),
        );
    }
}

/// The budget cannot be judged now: the last good figures stay (marked stale, with their
/// time), a freeze stays in force, a rollback is never started on them.
fn blind(
    status: &mut ErrorBudgetStatus,
    phase: BudgetPhase,
    why: String,
    now: Timestamp,
    generation: Option<i64>,
) {
    status.phase = Some(phase);
    status.active_action = policy::while_blind(status.active_action);
    if status.consumed_percent.is_some() {
        status.stale = Some(true);
    }
    let since = status
        .last_evaluation_time
        .as_ref()
        .map_or(String::new(), |t| format!("; figures from {}", t.0));
    status.message = Some(format!("{why}{since}"));
    let reason = match phase {
        BudgetPhase::InsufficientData => "InsufficientData",
        _ => "EvaluationFailed",
    };
    conditions::set(
        &mut status.conditions,
        "Ready",
        false,
        reason,
        why,
        generation,
        now,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::errorbudget::BudgetAction;
    use proptest::prelude::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn spec() -> ErrorBudgetSpec {
        serde_json::from_value(serde_json::json!({
            "objective": "99", "window": "10m", "evaluationInterval": "5s",
            "burnRateWindows": ["1m"],
            "indicator": {"ratio": {"errors": "e", "total": "t"}}
        }))
        .unwrap()
    }

    /// Answers with the same error ratio in every window.
    fn answers(spec: &ErrorBudgetSpec, bad: f64, total: f64) -> BTreeMap<Duration, Answer> {
        windows(spec)
            .into_iter()
            .map(|w| (w, Ok(Rates { bad, total })))
            .collect()
    }

    fn observed(
        answers: Option<BTreeMap<Duration, Answer>>,
        status: ErrorBudgetStatus,
    ) -> Observed {
        Observed {
            generation: Some(1),
            spec: spec(),
            status,
            answers,
            coverage: None,
            missing_targets: Some(Vec::new()),
            now: t(100),
        }
    }

    #[test]
    fn coverage_samples_the_window_at_a_step_no_shorter_than_a_burn_window() {
        // 30 days with the default 5m burn window: 12h steps, 60 points.
        let mut month = spec();
        month.window = crate::api::Duration::from_secs(30 * 86_400);
        month.burn_rate_windows.clear();
        let (query, points) = coverage_query(&month, "sum(rate(x[12h]))");
        assert_eq!(query, "count_over_time((sum(rate(x[12h])))[30d:12h])");
        assert_eq!(points, 60);
        // A one-minute window with a 10s burn window: 10s steps, 6 points.
        let mut short = spec();
        short.window = crate::api::Duration::from_secs(60);
        short.burn_rate_windows = vec![crate::api::Duration::from_secs(10)];
        assert_eq!(coverage_step(&short), Duration::from_secs(10));
        assert_eq!(coverage_query(&short, "t").1, 6);
        // Half the points answered: 50% covered, and the message says so.
        let mut o = observed(
            Some(answers(&spec(), 0.0, 100.0)),
            ErrorBudgetStatus::default(),
        );
        o.coverage = Some(0.5);
        let status = plan(&o).status;
        assert_eq!(status.window_coverage, Some(50.0));
        let message = status.message.clone().unwrap_or_default();
        assert!(
            message.contains("covers 50% of the 10m window"),
            "{message}"
        );
        // A coverage query that failed keeps the last figure.
        o.status = status.clone();
        o.coverage = None;
        assert_eq!(plan(&o).status.window_coverage, Some(50.0));
    }

    #[test]
    fn each_phase_is_reached_and_said() {
        let s = spec();
        // Budget 1%: an error ratio of 0.5% consumes 50%, 0.85% consumes 85%, 0.96% 96%.
        let table = [
            (0.0, BudgetPhase::Healthy, None),
            (0.5, BudgetPhase::Healthy, None),
            (
                0.85,
                BudgetPhase::Frozen,
                Some(BudgetAction::FreezePromotions),
            ),
            (0.96, BudgetPhase::Exhausted, Some(BudgetAction::Rollback)),
        ];
        for (bad, phase, action) in table {
            let plan = plan(&observed(
                Some(answers(&s, bad, 100.0)),
                ErrorBudgetStatus::default(),
            ));
            assert_eq!(plan.status.phase, Some(phase), "{bad}");
            assert_eq!(plan.status.active_action, action, "{bad}");
            assert!((plan.status.consumed_percent.unwrap() - bad * 100.0).abs() < 1e-6);
            // Two per window, and one for the window's coverage.
            assert_eq!(plan.status.queries, Some(2 * windows(&s).len() as i32 + 1));
            assert_eq!(plan.events.len(), 1, "a phase change is an Event");
        }
    }

    #[test]
    fn an_outage_keeps_the_figures_and_the_freeze_and_never_rolls_back() {
        let s = spec();
        let exhausted = plan(&observed(
            Some(answers(&s, 0.96, 100.0)),
            ErrorBudgetStatus::default(),
        ));
        let mut failing: BTreeMap<Duration, Answer> = answers(&s, 0.0, 100.0);
        failing.insert(s.window.as_std(), Err("cannot connect".into()));
        let mut o = observed(Some(failing), exhausted.status.clone());
        o.now = t(200);
        let blind = plan(&o);
        assert_eq!(blind.status.phase, Some(BudgetPhase::Unknown));
        assert_eq!(
            blind.status.active_action,
            Some(BudgetAction::FreezePromotions)
        );
        assert_eq!(
            blind.status.consumed_percent,
            exhausted.status.consumed_percent
        );
        assert_eq!(blind.status.stale, Some(true));
        assert!(blind.status.message.unwrap().contains("cannot connect"));
        assert_eq!(blind.requeue_after, Duration::from_secs(5));
    }

    #[test]
    fn no_events_nan_infinity_and_impossible_ratios_are_never_judged() {
        let s = spec();
        let none = plan(&observed(
            Some(answers(&s, 0.0, 0.0)),
            ErrorBudgetStatus::default(),
        ));
        assert_eq!(none.status.phase, Some(BudgetPhase::InsufficientData));
        for (bad, total) in [
            (f64::NAN, 1.0),
            (1.0, f64::INFINITY),
            (2.0, 1.0),
            (-1.0, 1.0),
        ] {
            let p = plan(&observed(
                Some(answers(&s, bad, total)),
                ErrorBudgetStatus::default(),
            ));
            assert_eq!(p.status.phase, Some(BudgetPhase::Unknown), "{bad}/{total}");
            assert_eq!(p.status.active_action, None);
        }
    }

    #[test]
    fn a_missing_target_is_named_and_evaluation_goes_on() {
        let s = spec();
        let mut o = observed(Some(answers(&s, 0.0, 100.0)), ErrorBudgetStatus::default());
        o.missing_targets = Some(vec!["shop/gone".into()]);
        let p = plan(&o);
        assert_eq!(p.status.phase, Some(BudgetPhase::Healthy));
        assert_eq!(
            conditions::message(&p.status.conditions, "TargetsFound"),
            Some("no Rollout shop/gone")
        );
    }

    #[test]
    fn evaluations_are_due_on_the_interval_and_on_spec_changes() {
        let s = spec();
        let mut status = ErrorBudgetStatus::default();
        assert!(due(&s, &status, Some(1), t(0)));
        status.last_attempt_time = Some(Time(t(0)));
        status.observed_generation = Some(1);
        assert!(!due(&s, &status, Some(1), t(4)));
        assert!(due(&s, &status, Some(1), t(5)));
        assert!(
            due(&s, &status, Some(2), t(1)),
            "a spec change is evaluated at once"
        );
        let waiting = plan(&Observed {
            now: t(2),
            ..observed(None, status)
        });
        assert_eq!(waiting.requeue_after, Duration::from_secs(3));
    }

    #[test]
    fn burn_alerts_need_both_windows() {
        let mut s = spec();
        s.window = "30d".parse().unwrap();
        let window = s.window.as_std();
        let fast = slo::burn_alerts(window).remove(0);
        // Long window burning hard, short window calm: no alert.
        let mut a = answers(&s, 0.0, 100.0);
        a.insert(
            fast.long,
            Ok(Rates {
                bad: 20.0,
                total: 100.0,
            }),
        );
        let o = |a| Observed {
            spec: s.clone(),
            ..observed(Some(a), ErrorBudgetStatus::default())
        };
        let p = plan(&o(a.clone()));
        assert!(conditions::message(&p.status.conditions, "FastBurn").is_some());
        let firing = |p: &Plan| {
            p.status
                .conditions
                .iter()
                .any(|c| c.type_ == "FastBurn" && c.status == "True")
        };
        assert!(!firing(&p));
        a.insert(
            fast.short,
            Ok(Rates {
                bad: 20.0,
                total: 100.0,
            }),
        );
        assert!(firing(&plan(&o(a))));
    }

    proptest! {
        #[test]
        fn never_healthy_when_any_answer_is_bad(
            bad in 0.0..1.0f64,
            broken in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-5.0)],
            which in 0..6usize,
        ) {
            let s = spec();
            let mut a = answers(&s, bad, 100.0);
            let key = *a.keys().nth(which % a.len()).unwrap();
            a.insert(key, Ok(Rates { bad: broken, total: 100.0 }));
            let p = plan(&observed(Some(a), ErrorBudgetStatus::default()));
            prop_assert_ne!(p.status.phase, Some(BudgetPhase::Healthy));
            prop_assert_ne!(p.status.active_action, Some(BudgetAction::Rollback));
        }

        #[test]
        fn remaining_is_a_percentage(bad in 0.0..100.0f64) {
            let s = spec();
            let p = plan(&observed(Some(answers(&s, bad, 100.0)), ErrorBudgetStatus::default()));
            let left = p.status.remaining_percent.unwrap();
            prop_assert!((0.0..=100.0).contains(&left));
        }
    }
}
