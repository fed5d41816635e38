//! A Rollout's analysis runs: their names, what each one judges, which measurements are due,
//! and how results are folded into status. Pure: the shell only takes the measurements.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::jiff::Timestamp;

use crate::analysis::condition::MeasuredValue;
use crate::analysis::run::{self as analysis, ProviderFailure, ResolvedAnalysis, ResolvedMetric};
use crate::analysis::template::TemplateVars;
use crate::api::analysis::{AnalysisPhase, AnalysisRunStatus, AnalysisSpec, MeasurementPhase};
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
