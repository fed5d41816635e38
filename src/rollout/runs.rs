//! A Rollout's analysis runs: their names, what each one judges, which measurements are due,
//! and how results are folded into status. Pure: the shell only takes the measurements.

use std::fmt;
use std::str::FromStr;

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::analysis::condition::MeasuredValue;
use crate::analysis::run::{self as analysis, ProviderFailure, ResolvedAnalysis, ResolvedMetric};
use crate::analysis::template::TemplateVars;
use crate::api::analysis::{
    AnalysisPhase, AnalysisRunStatus, AnalysisSpec, MeasurementPhase, MetricStatus,
};
use crate::api::rollout::{RolloutStatus, RolloutStrategy};

/// The name of an analysis run in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunName {
    /// The canary's background analysis, from the first step to full promotion.
    Background,
    /// A canary `analysis` step, by its index in `steps`.
    Step(usize),
    /// Blue-green: checks the preview before the switch.
    PrePromotion,
    /// Blue-green: checks the new active revision after the switch.
    PostPromotion,
}

impl fmt::Display for RunName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunName::Background => f.write_str("background"),
            RunName::Step(index) => write!(f, "step-{index}"),
            RunName::PrePromotion => f.write_str("pre-promotion"),
            RunName::PostPromotion => f.write_str("post-promotion"),
        }
    }
}

impl FromStr for RunName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "background" => Ok(RunName::Background),
            "pre-promotion" => Ok(RunName::PrePromotion),
            "post-promotion" => Ok(RunName::PostPromotion),
            other => other
                .strip_prefix("step-")
                .and_then(|i| i.parse().ok())
                .map(RunName::Step)
                .ok_or_else(|| format!("unknown analysis run {other:?}")),
        }
    }
}

/// A step analysis or a blue-green gate must end: without a count, three measurements decide.
const GATE_COUNT: i32 = 3;

/// The analysis a run carries out, with every default filled in (`None`: the spec no longer
/// has it, e.g. the step was removed).
pub fn resolve(
    name: RunName,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
) -> Option<ResolvedAnalysis> {
    match (name, &strategy.canary, &strategy.blue_green) {
        (RunName::PrePromotion, _, Some(bg)) => Some(analysis::resolve(
            bg.pre_promotion_analysis.as_ref()?,
            Some(GATE_COUNT),
            bg.prometheus.as_ref(),
        )),
        (RunName::PostPromotion, _, Some(bg)) => Some(analysis::resolve(
            bg.post_promotion_analysis.as_ref()?,
            Some(GATE_COUNT),
            bg.prometheus.as_ref(),
        )),
        (RunName::Background, Some(_), _) => background.cloned(),
        (RunName::Step(index), Some(canary), _) => {
            let step = canary.steps.get(index)?.analysis.as_ref()?;
            let base = canary.analysis.clone().unwrap_or_default();
            let spec = AnalysisSpec {
                metrics: if step.metrics.is_empty() {
                    base.metrics.clone()
                } else {
                    step.metrics.clone()
                },
                count: step.count,
                interval: step.interval.clone().or(base.interval.clone()),
                // A blocking step analysis starts measuring at once.
                initial_delay: None,
                ..base
            };
            Some(analysis::resolve(
                &spec,
                Some(GATE_COUNT),
                canary.prometheus.as_ref(),
            ))
        }
        _ => None,
    }
}

/// [`resolve`] for a run's name as it stands in status.
fn resolve_named(
    name: &str,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
) -> Option<ResolvedAnalysis> {
    resolve(name.parse().ok()?, strategy, background)
}

/// Starts (or restarts) the named runs, each judging its revision: any earlier run of the same
/// name is replaced. Runs the spec no longer has are not started.
pub fn start(
    status: &mut RolloutStatus,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
    starts: &[(RunName, String)],
    now: Timestamp,
) {
    for (name, revision) in starts {
        let Some(resolved) = resolve(*name, strategy, background) else {
            continue;
        };
        let name = name.to_string();
        status.analysis_runs.retain(|r| r.name != name);
        status
            .analysis_runs
            .push(analysis::start(&name, revision, &resolved, now));
    }
}

/// A measurement due now.
#[derive(Clone, Debug, PartialEq)]
pub struct Due {
    /// The run's name in status.
    pub run: String,
    pub metric: ResolvedMetric,
    /// The template values the query is rendered with: `{{canary.revision}}` is the revision
    /// the run judges (after a blue-green switch, the new active one).
    pub vars: TemplateVars,
}

/// The measurements due at `now` in the runs still going.
pub fn due(
    status: &RolloutStatus,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
    rollout: (&str, &str),
    stable: &str,
    now: Timestamp,
) -> Vec<Due> {
    let (name, namespace) = rollout;
    let mut due = Vec::new();
    for run in measuring(status) {
        let Some(resolved) = resolve_named(&run.name, strategy, background) else {
            continue;
        };
        let vars = TemplateVars {
            rollout_name: name.to_string(),
            rollout_namespace: namespace.to_string(),
            canary_revision: run.revision.clone(),
            stable_revision: stable.to_string(),
            window: None,
        };
        for metric in analysis::due(&resolved, run, now) {
            due.push(Due {
                run: run.name.clone(),
                metric: metric.clone(),
                vars: vars.clone(),
            });
        }
    }
    due
}

/// Folds measurements into their runs, and moves runs whose delay is over from Pending to
/// Running. Returns the outcome of each measurement, for the metrics.
pub fn record(
    status: &mut RolloutStatus,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
    measured: Vec<(Due, Result<MeasuredValue, ProviderFailure>)>,
    now: Timestamp,
) -> Vec<MeasurementPhase> {
    let mut outcomes = Vec::new();
    for (due, outcome) in measured {
        let Some(run) = status.analysis_runs.iter_mut().find(|r| r.name == due.run) else {
            continue;
        };
        let Some(resolved) = resolve_named(&run.name, strategy, background) else {
            continue;
        };
        let measurement = analysis::judge(&due.metric, outcome, now);
        outcomes.push(measurement.phase);
        analysis::record(run, &resolved, &due.metric, measurement, now);
    }
    for run in status.analysis_runs.iter_mut() {
        if run.phase == AnalysisPhase::Pending && now >= run.started_at.0 {
            run.phase = AnalysisPhase::Running;
        }
    }
    outcomes
}

/// The earliest time a measurement of any run is due, for the requeue.
pub fn next_due(
    status: &RolloutStatus,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
) -> Option<Timestamp> {
    measuring(status)
        .filter_map(|run| {
            let resolved = resolve_named(&run.name, strategy, background)?;
            analysis::earliest_due(&resolved, run)
        })
        .min()
}

/// Whether `planned` may go unwritten for now: it differs from the status as `recorded` only
/// by passing measurements that no decision depends on, and the newest measurement recorded
/// of each metric they add to is younger than `window`. Those are `Successful` measurements
/// of a metric without a `count` (its passes never end the run), in a run still `Running`,
/// that change no phase and end no streak of errors. They wait for the next status write
/// (any other change, a failure, or the window running out): 100 canaries measured every 5 s
/// would otherwise write 20 statuses a second to say that nothing happened. Lost on a
/// restart, they are only taken again: the runs as recorded are due at once.
pub fn passes_may_wait(
    recorded: &RolloutStatus,
    planned: &RolloutStatus,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
    now: Timestamp,
    window: Duration,
) -> bool {
    if window.is_zero() || recorded.analysis_runs == planned.analysis_runs {
        return false;
    }
    // Intents belong to the plugin's field manager, never ours to write; the selector is
    // the spec's, filled in by the shell (a new one comes with a new generation).
    let rest = |s: &RolloutStatus| {
        let mut rest = RolloutStatus {
            analysis_runs: Vec::new(),
            selector: None,
            ..s.clone()
        };
        rest.clear_intents();
        rest
    };
    if crate::k8s::status::changed(Some(&rest(recorded)), &rest(planned))
        || recorded.analysis_runs.len() != planned.analysis_runs.len()
    {
        return false;
    }
    let oldest = SignedDuration::try_from(window)
        .ok()
        .and_then(|w| now.checked_sub(w).ok())
        .unwrap_or(Timestamp::MIN);
    recorded
        .analysis_runs
        .iter()
        .zip(&planned.analysis_runs)
        .all(|(r, p)| r == p || run_adds_only_passes(r, p, strategy, background, oldest))
}

/// See [`passes_may_wait`]: `p` is `r` with passes added to metrics without a count, each
/// metric's newest recorded measurement taken after `oldest`.
fn run_adds_only_passes(
    r: &AnalysisRunStatus,
    p: &AnalysisRunStatus,
    strategy: &RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
    oldest: Timestamp,
) -> bool {
    let Some(resolved) = resolve_named(&p.name, strategy, background) else {
        return false;
    };
    let same_run = AnalysisRunStatus {
        metrics: r.metrics.clone(),
        ..p.clone()
    } == *r;
    same_run
        && r.phase == AnalysisPhase::Running
        && r.metrics.len() == p.metrics.len()
        && r.metrics.iter().zip(&p.metrics).all(|(rm, pm)| {
            rm == pm
                || resolved
                    .metrics
                    .iter()
                    .find(|m| m.name == pm.name)
                    .is_some_and(|m| m.count.is_none() && metric_adds_only_passes(rm, pm, oldest))
        })
}

fn metric_adds_only_passes(r: &MetricStatus, p: &MetricStatus, oldest: Timestamp) -> bool {
    let Ok(added) = usize::try_from(p.count - r.count) else {
        return false;
    };
    let tallies = |m: &MetricStatus| {
        (
            m.name.clone(),
            m.phase,
            m.failed,
            m.inconclusive,
            m.error,
            m.consecutive_errors,
        )
    };
    let new = added.min(p.measurements.len());
    let (kept, taken) = p.measurements.split_at(p.measurements.len() - new);
    added > 0
        && p.successful - r.successful == p.count - r.count
        && tallies(r) == tallies(p)
        && taken
            .iter()
            .all(|m| m.phase == MeasurementPhase::Successful)
        && r.measurements.ends_with(kept)
        && r.measurements.last().is_some_and(|m| m.taken_at.0 > oldest)
}

/// The runs that still take measurements: those going, unless the release is aborted. An
/// aborted release is judged already, and nothing plans on its runs until a retry or a new
/// revision starts them again; measuring on would cost a query and a status write per
/// interval for as long as it stays aborted.
fn measuring(status: &RolloutStatus) -> impl Iterator<Item = &AnalysisRunStatus> {
    let aborted = status.aborted_at.is_some();
    status
        .analysis_runs
        .iter()
        .filter(move |r| !aborted && is_going(r.phase))
}

fn is_going(phase: AnalysisPhase) -> bool {
    matches!(phase, AnalysisPhase::Pending | AnalysisPhase::Running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const WINDOW: Duration = Duration::from_secs(30);

    /// A canary with a background analysis (errors below 1; every 5 s; tolerating a failure,
    /// an inconclusive measurement and two errors in a row) and an analysis step.
    fn strategy() -> RolloutStrategy {
        serde_json::from_value(json!({"canary": {
            "steps": [{"setWeight": 20}, {"analysis": {}}],
            "analysis": {"interval": "5s", "failureLimit": 1, "inconclusiveLimit": 1,
                         "consecutiveErrorLimit": 2,
                         "metrics": [{"name": "errors", "prometheus": {"query": "q"},
                                      "successCondition": "result < 1"}]}}}))
        .unwrap()
    }

    fn background(s: &RolloutStrategy) -> Option<ResolvedAnalysis> {
        let canary = s.canary.as_ref()?;
        Some(analysis::resolve(canary.analysis.as_ref()?, None, None))
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    /// A status with the named runs started at 0.
    fn started(names: &[RunName]) -> RolloutStatus {
        let s = strategy();
        let mut status = RolloutStatus::default();
        let starts: Vec<_> = names.iter().map(|n| (*n, "r1".to_string())).collect();
        start(&mut status, &s, background(&s).as_ref(), &starts, t(0));
        status
    }

    /// Folds one outcome into every measurement due at `at`, as the reconciler does.
    fn measure(status: &mut RolloutStatus, outcome: &Result<f64, ProviderFailure>, at: i64) {
        let s = strategy();
        let bg = background(&s);
        let due = due(status, &s, bg.as_ref(), ("web", "shop"), "r0", t(at));
        let measured = due
            .into_iter()
            .map(|d| (d, outcome.clone().map(MeasuredValue::Number)))
            .collect();
        record(status, &s, bg.as_ref(), measured, t(at));
    }

    fn may_wait(recorded: &RolloutStatus, planned: &RolloutStatus, now: i64) -> bool {
        let s = strategy();
        passes_may_wait(
            recorded,
            planned,
            &s,
            background(&s).as_ref(),
            t(now),
            WINDOW,
        )
    }

    fn pass() -> Result<f64, ProviderFailure> {
        Ok(0.0)
    }

    #[test]
    fn passes_of_a_metric_without_a_count_wait_for_the_window() {
        let mut recorded = started(&[RunName::Background]);
        measure(&mut recorded, &pass(), 0);
        let mut planned = recorded.clone();
        measure(&mut planned, &pass(), 5);
        assert!(may_wait(&recorded, &planned, 5));
        measure(&mut planned, &pass(), 10);
        assert!(
            may_wait(&recorded, &planned, 29),
            "the newest written is 29 s old"
        );
        assert!(
            !may_wait(&recorded, &planned, 30),
            "the newest written is 30 s old"
        );
        // Whatever else the plan records goes now, passes and all.
        let mut phase_too = planned.clone();
        phase_too.message = Some("paused".into());
        assert!(!may_wait(&recorded, &phase_too, 10));
        // Nor when the flag is 0.
        let s = strategy();
        let bg = background(&s);
        assert!(!passes_may_wait(
            &recorded,
            &planned,
            &s,
            bg.as_ref(),
            t(10),
            Duration::ZERO
        ));
        // More passes than the history keeps: the oldest drop out, and still they wait.
        for i in 3..15 {
            measure(&mut planned, &pass(), 5 * i);
        }
        assert!(may_wait(&recorded, &planned, 25));
        assert!(!may_wait(&recorded, &recorded, 5), "nothing to wait");
    }

    #[test]
    fn what_can_decide_is_written_at_once() {
        let (fail, no_data, error) = (
            Ok(5.0),
            Err(ProviderFailure::NoData("empty".into())),
            Err(ProviderFailure::Error("unreachable".into())),
        );
        let mut recorded = started(&[RunName::Background]);
        measure(&mut recorded, &pass(), 0);
        for outcome in [&fail, &no_data, &error] {
            let mut planned = recorded.clone();
            measure(&mut planned, outcome, 5);
            assert!(!may_wait(&recorded, &planned, 5), "{outcome:?}");
            // Nor a pass after it, in the same write.
            measure(&mut planned, &pass(), 10);
            assert!(
                !may_wait(&recorded, &planned, 10),
                "{outcome:?} then a pass"
            );
        }
        // A pass that ends a streak of errors.
        let mut errored = recorded.clone();
        measure(&mut errored, &error, 5);
        let mut planned = errored.clone();
        measure(&mut planned, &pass(), 10);
        assert!(!may_wait(&errored, &planned, 10));
        // The first measurement of a run (it starts its tally; Pending -> Running).
        let fresh = started(&[RunName::Background]);
        let mut planned = fresh.clone();
        measure(&mut planned, &pass(), 0);
        assert!(!may_wait(&fresh, &planned, 0));
        // A step analysis counts its passes: each one brings its end nearer.
        let mut recorded = started(&[RunName::Step(1)]);
        measure(&mut recorded, &pass(), 0);
        let mut planned = recorded.clone();
        measure(&mut planned, &pass(), 5);
        assert!(!may_wait(&recorded, &planned, 5));
    }

    fn outcome() -> impl Strategy<Value = Result<f64, ProviderFailure>> {
        prop_oneof![
            4 => Just(Ok(0.0)),
            1 => Just(Ok(5.0)),
            1 => Just(Err(ProviderFailure::NoData("empty".into()))),
            1 => Just(Err(ProviderFailure::Error("unreachable".into()))),
        ]
    }

    proptest! {
        /// Passes that wait and are then lost (a restart) change no decision: from the status
        /// as recorded and from the one with the passes, any measurements that follow give
        /// the same phases and the same tallies of what decides.
        #[test]
        fn passes_that_wait_and_are_lost_change_no_verdict(
            before in prop::collection::vec(outcome(), 0..6),
            passes in 1usize..14,
            after in prop::collection::vec(outcome(), 0..8),
        ) {
            let mut recorded = started(&[RunName::Background]);
            let mut at = 0;
            for o in &before {
                measure(&mut recorded, o, at);
                at += 5;
            }
            let mut planned = recorded.clone();
            for _ in 0..passes {
                measure(&mut planned, &pass(), at);
                at += 5;
            }
            let newest = recorded.analysis_runs[0].metrics.first()
                .and_then(|m| m.measurements.last()).map(|m| m.taken_at.0);
            let waits = may_wait(&recorded, &planned, at);
            let running = recorded.analysis_runs[0].phase == AnalysisPhase::Running;
            let streak = recorded.analysis_runs[0].metrics.first().map(|m| m.consecutive_errors);
            let expected = running && streak == Some(0)
                && newest.is_some_and(|n| t(at).duration_since(n) < SignedDuration::from_secs(30));
            prop_assert_eq!(waits, expected);
            if waits {
                // Later, both are due: the lost passes are only taken again.
                at += 60;
                for o in &after {
                    measure(&mut recorded, o, at);
                    measure(&mut planned, o, at);
                    at += 5;
                    let decides = |s: &RolloutStatus| s.analysis_runs.iter().map(|r| (
                        r.phase, r.message.clone(),
                        r.metrics.iter().map(|m| (m.phase, m.failed, m.inconclusive,
                                                  m.error, m.consecutive_errors))
                            .collect::<Vec<_>>())).collect::<Vec<_>>();
                    prop_assert_eq!(decides(&recorded), decides(&planned));
                }
            }
        }
    }

    #[test]
    fn run_names_round_trip() {
        for name in [
            RunName::Background,
            RunName::Step(0),
            RunName::Step(12),
            RunName::PrePromotion,
            RunName::PostPromotion,
        ] {
            assert_eq!(name.to_string().parse::<RunName>(), Ok(name));
        }
        assert!("step-x".parse::<RunName>().is_err());
        assert!("step-".parse::<RunName>().is_err());
        assert!("other".parse::<RunName>().is_err());
    }
}
