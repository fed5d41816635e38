//! The analysis state machine: which measurements are due, how a measurement is judged, and
//! how the tallies turn into a verdict. Pure: time and results come in as arguments.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::condition::{Condition, MeasuredValue};
use crate::api::analysis::{
    AnalysisPhase, AnalysisRunStatus, AnalysisSpec, ErrorBudgetMetric, Measurement,
    MeasurementPhase, MetricStatus, PrometheusConfig, PrometheusMetric,
};

/// Measurements kept per metric in status: enough for `kubectl sluice status`, bounded so a
/// Rollout's size stays flat however long a release runs.
pub const MEASUREMENTS_KEPT: usize = 10;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_CONSECUTIVE_ERROR_LIMIT: i32 = 4;

/// Where a metric's value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A PromQL query, with the connection settings that apply to it.
    Prometheus(Box<PrometheusSource>),
    /// An ErrorBudget's published status.
    ErrorBudget(ErrorBudgetMetric),
}

/// A Prometheus metric and the connection settings that apply to it.
#[derive(Clone, Debug, PartialEq)]
pub struct PrometheusSource {
    pub metric: PrometheusMetric,
    pub config: PrometheusConfig,
}

/// A metric with every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedMetric {
    pub name: String,
    pub source: Source,
    pub success_condition: Option<String>,
    pub failure_condition: Option<String>,
    pub interval: Duration,
    pub count: Option<i32>,
    pub failure_limit: i32,
    pub inconclusive_limit: i32,
    pub consecutive_error_limit: i32,
    pub dry_run: bool,
}

/// An analysis with every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedAnalysis {
    pub initial_delay: Duration,
    pub metrics: Vec<ResolvedMetric>,
}

/// Fills in defaults. `default_count` applies when neither the analysis nor a metric sets a
/// count (a step analysis must end; a background analysis need not).
pub fn resolve(
    spec: &AnalysisSpec,
    default_count: Option<i32>,
    prometheus: Option<&PrometheusConfig>,
) -> ResolvedAnalysis {
    let base = prometheus.cloned().unwrap_or_default();
    let metrics = spec
        .metrics
        .iter()
        .filter_map(|m| {
            let source = match (&m.prometheus, &m.error_budget) {
                (Some(p), _) => Source::Prometheus(Box::new(PrometheusSource {
                    config: PrometheusConfig {
                        address: p.address.clone().or(base.address.clone()),
                        timeout: p.timeout.clone().or(base.timeout.clone()),
                        headers: base.headers.iter().chain(&p.headers).cloned().collect(),
                        ..base.clone()
                    },
                    metric: p.clone(),
                })),
                (None, Some(b)) => Source::ErrorBudget(b.clone()),
                // Refused at admission; skipped rather than guessed at.
                (None, None) => return None,
            };
            let success_condition = match (&source, &m.success_condition) {
                (Source::ErrorBudget(b), None) => Some(budget_condition(b)),
                (_, given) => given.clone(),
            };
            Some(ResolvedMetric {
                name: m.name.clone(),
                source,
                success_condition,
                failure_condition: m.failure_condition.clone(),
                interval: m
                    .interval
                    .as_ref()
                    .or(spec.interval.as_ref())
                    .map_or(DEFAULT_INTERVAL, |d| d.as_std()),
                count: m.count.or(spec.count).or(default_count),
                failure_limit: m.failure_limit.or(spec.failure_limit).unwrap_or(0),
                inconclusive_limit: m
                    .inconclusive_limit
                    .or(spec.inconclusive_limit)
                    .unwrap_or(0),
                consecutive_error_limit: m
                    .consecutive_error_limit
                    .or(spec.consecutive_error_limit)
                    .unwrap_or(DEFAULT_CONSECUTIVE_ERROR_LIMIT),
                dry_run: m.dry_run.or(spec.dry_run).unwrap_or(false),
            })
        })
        .collect();
    ResolvedAnalysis {
        initial_delay: spec
            .initial_delay
            .as_ref()
            .map_or(Duration::ZERO, |d| d.as_std()),
        metrics,
    }
}

/// An ErrorBudget metric measures `[burn rate, remaining percent]`; its thresholds become
/// the success condition.
fn budget_condition(metric: &ErrorBudgetMetric) -> String {
    let mut parts = Vec::new();
    if let Some(max) = metric.max_burn_rate {
        parts.push(format!("result[0] <= {max:?}"));
    }
    if let Some(min) = metric.min_remaining_percent {
        parts.push(format!("result[1] >= {:?}", f64::from(min)));
    }
    if parts.is_empty() {
        "true".to_string()
    } else {
        parts.join(" && ")
    }
}

/// A fresh run.
pub fn start(
    name: &str,
    revision: &str,
    analysis: &ResolvedAnalysis,
    now: Timestamp,
) -> AnalysisRunStatus {
    AnalysisRunStatus {
        name: name.to_string(),
        revision: revision.to_string(),
        phase: if analysis.initial_delay.is_zero() {
            AnalysisPhase::Running
        } else {
            AnalysisPhase::Pending
        },
        started_at: Time(now),
        finished_at: None,
        message: None,
        metrics: analysis
            .metrics
            .iter()
            .map(|m| MetricStatus {
                name: m.name.clone(),
                phase: AnalysisPhase::Pending,
                count: 0,
                successful: 0,
                failed: 0,
                inconclusive: 0,
                error: 0,
                consecutive_errors: 0,
                measurements: Vec::new(),
            })
            .collect(),
    }
}

fn is_finished(phase: AnalysisPhase) -> bool {
    !matches!(phase, AnalysisPhase::Pending | AnalysisPhase::Running)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// When the next measurement of `metric` is due (`None`: it needs no more).
pub fn next_due(
    analysis: &ResolvedAnalysis,
    run: &AnalysisRunStatus,
    metric: &ResolvedMetric,
) -> Option<Timestamp> {
    if is_finished(run.phase) {
        return None;
    }
    let status = run.metrics.iter().find(|s| s.name == metric.name);
    if status.is_some_and(|s| is_finished(s.phase)) {
        return None;
    }
    match status.and_then(|s| s.measurements.last()) {
        Some(last) => Some(add(last.taken_at.0, metric.interval)),
        None => Some(add(run.started_at.0, analysis.initial_delay)),
    }
}

/// The metrics to measure now.
pub fn due<'a>(
    analysis: &'a ResolvedAnalysis,
    run: &AnalysisRunStatus,
    now: Timestamp,
) -> Vec<&'a ResolvedMetric> {
    analysis
        .metrics
        .iter()
        .filter(|m| next_due(analysis, run, m).is_some_and(|at| at <= now))
        .collect()
}

/// The earliest time anything in the run is due, for the requeue.
pub fn earliest_due(analysis: &ResolvedAnalysis, run: &AnalysisRunStatus) -> Option<Timestamp> {
    analysis
        .metrics
        .iter()
        .filter_map(|m| next_due(analysis, run, m))
        .min()
}

/// Why a provider could not give a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderFailure {
    /// The provider answered, but with nothing to judge (empty vector, no status yet).
    NoData(String),
    /// The provider could not be asked (unreachable, timeout, bad query, missing Secret).
    Error(String),
}

/// Turns a provider's answer into a measurement.
pub fn judge(
    metric: &ResolvedMetric,
    outcome: Result<MeasuredValue, ProviderFailure>,
    now: Timestamp,
) -> Measurement {
    let taken_at = Time(now);
    let value = match outcome {
        Ok(value) => value,
        Err(ProviderFailure::NoData(why)) => {
            return Measurement {
                phase: MeasurementPhase::Inconclusive,
                value: None,
                taken_at,
                message: Some(why),
            };
        }
        Err(ProviderFailure::Error(why)) => {
            return Measurement {
                phase: MeasurementPhase::Error,
                value: None,
                taken_at,
                message: Some(why),
            };
        }
    };
    let shown = Some(value.to_string());
    if value.has_nan() {
        return Measurement {
            phase: MeasurementPhase::Inconclusive,
            value: shown,
            taken_at,
            message: Some("the query returned NaN (no traffic?)".into()),
        };
    }
    let mentions_is_inf = [&metric.success_condition, &metric.failure_condition]
        .into_iter()
        .flatten()
        .any(|c| c.contains("isInf"));
    if value.has_infinity() && !mentions_is_inf {
        return Measurement {
            phase: MeasurementPhase::Inconclusive,
            value: shown,
            taken_at,
            message: Some(
                "the query returned an infinite value (a division by zero, or \
                 histogram_quantile beyond the last bucket); use isInf(result) in a condition \
                 to judge it"
                    .into(),
            ),
        };
    }
    let check = |source: &Option<String>| -> Result<Option<bool>, String> {
        match source {
            None => Ok(None),
            Some(source) => Condition::compile(source)
                .and_then(|c| c.evaluate(&value))
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    };
    let verdict = check(&metric.failure_condition)
        .and_then(|failed| Ok((failed, check(&metric.success_condition)?)));
    let (phase, message) = match verdict {
        Err(why) => (MeasurementPhase::Error, why),
        Ok((Some(true), _)) => (
            MeasurementPhase::Failed,
            format!(
                "failureCondition {} holds",
                quote(&metric.failure_condition)
            ),
        ),
        Ok((_, Some(true))) => (
            MeasurementPhase::Successful,
            format!(
                "successCondition {} holds",
                quote(&metric.success_condition)
            ),
        ),
        Ok((None, Some(false))) => (
            MeasurementPhase::Failed,
            format!(
                "successCondition {} does not hold",
                quote(&metric.success_condition)
            ),
        ),
        Ok((Some(false), Some(false))) => (
            MeasurementPhase::Inconclusive,
            "neither condition holds".to_string(),
        ),
        Ok((Some(false), None)) => (
            MeasurementPhase::Successful,
            format!(
                "failureCondition {} does not hold",
                quote(&metric.failure_condition)
            ),
        ),
        Ok((None, None)) => (
            MeasurementPhase::Successful,
            "no condition to check".to_string(),
        ),
    };
    Measurement {
        phase,
        value: shown,
        taken_at,
        message: Some(message),
    }
}

fn quote(source: &Option<String>) -> String {
    format!("`{}`", source.as_deref().unwrap_or_default())
}

/// Adds a measurement to the run, updates the tallies and the verdicts.
pub fn record(
    run: &mut AnalysisRunStatus,
    analysis: &ResolvedAnalysis,
    metric: &ResolvedMetric,
    measurement: Measurement,
    now: Timestamp,
) {
    let index = match run.metrics.iter().position(|s| s.name == metric.name) {
        Some(i) => i,
        None => {
            run.metrics.push(MetricStatus {
                name: metric.name.clone(),
                phase: AnalysisPhase::Pending,
                count: 0,
                successful: 0,
                failed: 0,
                inconclusive: 0,
                error: 0,
                consecutive_errors: 0,
                measurements: Vec::new(),
            });
            run.metrics.len() - 1
        }
    };
    let status = &mut run.metrics[index];
    status.count += 1;
    match measurement.phase {
        MeasurementPhase::Successful => status.successful += 1,
        MeasurementPhase::Failed => status.failed += 1,
        MeasurementPhase::Inconclusive => status.inconclusive += 1,
        MeasurementPhase::Error => status.error += 1,
    }
    status.consecutive_errors = if measurement.phase == MeasurementPhase::Error {
        status.consecutive_errors + 1
    } else {
        0
    };
    status.measurements.push(measurement);
    let overflow = status.measurements.len().saturating_sub(MEASUREMENTS_KEPT);
    status.measurements.drain(..overflow);
    status.phase = metric_phase(status, metric);
    settle(run, analysis, now);
}

fn metric_phase(status: &MetricStatus, metric: &ResolvedMetric) -> AnalysisPhase {
    if status.failed > metric.failure_limit {
        AnalysisPhase::Failed
    } else if status.consecutive_errors > metric.consecutive_error_limit {
        AnalysisPhase::Error
    } else if status.inconclusive > metric.inconclusive_limit {
        AnalysisPhase::Inconclusive
    } else if metric.count.is_some_and(|count| status.count >= count) {
        // A run that never once got an answer proves nothing: it must not pass a gate.
        if status.successful > 0 {
            AnalysisPhase::Successful
        } else {
            AnalysisPhase::Inconclusive
        }
    } else {
        AnalysisPhase::Running
    }
}

/// Recomputes the run's verdict from its metrics. Dry-run metrics never decide.
pub fn settle(run: &mut AnalysisRunStatus, analysis: &ResolvedAnalysis, now: Timestamp) {
    let deciding: Vec<(&MetricStatus, &ResolvedMetric)> = analysis
        .metrics
        .iter()
        .filter(|m| !m.dry_run)
        .filter_map(|m| {
            run.metrics
                .iter()
                .find(|s| s.name == m.name)
                .map(|s| (s, m))
        })
        .collect();
    let any = |phase| deciding.iter().find(|(s, _)| s.phase == phase);
    let (phase, message) = if let Some((s, _)) = any(AnalysisPhase::Failed) {
        (
            AnalysisPhase::Failed,
            format!(
                "metric {} failed {} times (limit {})",
                s.name,
                s.failed,
                limit_of(&deciding, &s.name, |m| m.failure_limit)
            ),
        )
    } else if let Some((s, _)) = any(AnalysisPhase::Error) {
        (
            AnalysisPhase::Error,
            format!(
                "metric {} errored {} times in a row: {}",
                s.name,
                s.consecutive_errors,
                last_message(s)
            ),
        )
    } else if let Some((s, _)) = any(AnalysisPhase::Inconclusive) {
        let message = if s.inconclusive > 0 {
            format!(
                "metric {} was inconclusive {} times: {}",
                s.name,
                s.inconclusive,
                last_message(s)
            )
        } else {
            // The count ran out with errors below their limit and no success.
            format!(
                "metric {} got no successful measurement in {}: {}",
                s.name,
                s.count,
                last_message(s)
            )
        };
        (AnalysisPhase::Inconclusive, message)
    } else if !deciding.is_empty()
        && deciding
            .iter()
            .all(|(s, _)| s.phase == AnalysisPhase::Successful)
    {
        (
            AnalysisPhase::Successful,
            "every metric met its conditions".to_string(),
        )
    } else if deciding.is_empty()
        && analysis
            .metrics
            .iter()
            .all(|m| m.dry_run && m.count.is_some())
        && run.metrics.iter().all(|s| is_finished(s.phase))
    {
        (AnalysisPhase::Successful, "dry run finished".to_string())
    } else {
        (AnalysisPhase::Running, String::new())
    };
    run.phase = phase;
    run.message = (!message.is_empty()).then_some(message);
    run.finished_at = is_finished(phase).then(|| run.finished_at.clone().unwrap_or(Time(now)));
}

fn limit_of(
    deciding: &[(&MetricStatus, &ResolvedMetric)],
    name: &str,
    f: impl Fn(&ResolvedMetric) -> i32,
) -> i32 {
    deciding
        .iter()
        .find(|(s, _)| s.name == name)
        .map_or(0, |(_, m)| f(m))
}

fn last_message(status: &MetricStatus) -> String {
    status
        .measurements
        .last()
        .and_then(|m| m.message.clone())
        .unwrap_or_default()
}

/// True when the newest measurement of any deciding metric is not a success: the rollout must
/// not move forward on a run whose latest word is "I don't know".
pub fn latest_is_doubtful(run: &AnalysisRunStatus, analysis: &ResolvedAnalysis) -> bool {
    analysis.metrics.iter().filter(|m| !m.dry_run).any(|m| {
        run.metrics
            .iter()
            .find(|s| s.name == m.name)
            .and_then(|s| s.measurements.last())
            .is_some_and(|last| {
                matches!(
                    last.phase,
                    MeasurementPhase::Error | MeasurementPhase::Inconclusive
                )
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::analysis::Metric;

    fn metric(name: &str, success: &str) -> Metric {
        Metric {
            name: name.into(),
            prometheus: Some(PrometheusMetric {
                query: "q".into(),
                address: None,
                timeout: None,
                headers: vec![],
            }),
            error_budget: None,
            success_condition: Some(success.into()),
            failure_condition: None,
            interval: None,
            count: None,
            failure_limit: None,
            inconclusive_limit: None,
            consecutive_error_limit: None,
            dry_run: None,
        }
    }

    fn analysis(
        failure_limit: i32,
        inconclusive_limit: i32,
        count: Option<i32>,
    ) -> ResolvedAnalysis {
        let spec = AnalysisSpec {
            interval: Some("30s".parse().unwrap()),
            failure_limit: Some(failure_limit),
            inconclusive_limit: Some(inconclusive_limit),
            metrics: vec![metric("error-rate", "result < 0.01")],
            ..AnalysisSpec::default()
        };
        resolve(&spec, count, None)
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn measure(
        run: &mut AnalysisRunStatus,
        a: &ResolvedAnalysis,
        value: Result<f64, ProviderFailure>,
        at: i64,
    ) {
        let m = &a.metrics[0];
        let measurement = judge(m, value.map(MeasuredValue::Number), t(at));
        record(run, a, m, measurement, t(at));
    }

    #[test]
    fn measurements_fall_due_after_initial_delay_then_every_interval() {
        let mut a = analysis(0, 0, None);
        a.initial_delay = Duration::from_secs(10);
        let mut run = start("background", "abc", &a, t(0));
        assert_eq!(run.phase, AnalysisPhase::Pending);
        assert!(due(&a, &run, t(9)).is_empty());
        assert_eq!(due(&a, &run, t(10)).len(), 1);
        measure(&mut run, &a, Ok(0.001), 10);
        assert!(due(&a, &run, t(39)).is_empty());
        assert_eq!(earliest_due(&a, &run), Some(t(40)));
        assert_eq!(due(&a, &run, t(40)).len(), 1);
    }

    #[test]
    fn failing_past_the_limit_fails_the_run() {
        let a = analysis(1, 0, None);
        let mut run = start("background", "abc", &a, t(0));
        measure(&mut run, &a, Ok(0.3), 0);
        assert_eq!(
            run.phase,
            AnalysisPhase::Running,
            "one failure is within the limit"
        );
        measure(&mut run, &a, Ok(0.3), 30);
        assert_eq!(run.phase, AnalysisPhase::Failed);
        assert_eq!(run.finished_at, Some(Time(t(30))));
        assert!(
            run.message
                .as_deref()
                .unwrap()
                .contains("error-rate failed 2 times (limit 1)")
        );
        assert!(
            due(&a, &run, t(1000)).is_empty(),
            "a finished run takes no more measurements"
        );
    }

    #[test]
    fn no_data_and_nan_are_inconclusive_never_success() {
        let a = analysis(0, 1, None);
        let mut run = start("background", "abc", &a, t(0));
        measure(
            &mut run,
            &a,
            Err(ProviderFailure::NoData("empty vector".into())),
            0,
        );
        assert_eq!(
            run.metrics[0].measurements[0].phase,
            MeasurementPhase::Inconclusive
        );
        assert!(latest_is_doubtful(&run, &a));
        measure(&mut run, &a, Ok(f64::NAN), 30);
        assert_eq!(run.phase, AnalysisPhase::Inconclusive);
        assert_eq!(run.metrics[0].successful, 0);
    }

    #[test]
    fn an_unreachable_prometheus_is_an_error_then_pauses_never_fails() {
        let a = analysis(0, 0, None);
        let mut run = start("background", "abc", &a, t(0));
        for i in 0..5 {
            measure(
                &mut run,
                &a,
                Err(ProviderFailure::Error("connection refused".into())),
                i * 30,
            );
            assert_ne!(run.phase, AnalysisPhase::Failed);
        }
        assert_eq!(
            run.phase,
            AnalysisPhase::Error,
            "5 errors in a row pass the default limit of 4"
        );
        assert!(
            run.message
                .as_deref()
                .unwrap()
                .contains("connection refused")
        );
    }

    #[test]
    fn errors_in_a_row_reset_on_an_answer() {
        let a = analysis(0, 0, None);
        let mut run = start("background", "abc", &a, t(0));
        for i in 0..4 {
            measure(
                &mut run,
                &a,
                Err(ProviderFailure::Error("timeout".into())),
                i,
            );
        }
        measure(&mut run, &a, Ok(0.0), 10);
        assert_eq!(run.metrics[0].consecutive_errors, 0);
        assert_eq!(run.phase, AnalysisPhase::Running);
        assert!(!latest_is_doubtful(&run, &a));
    }

    #[test]
    fn a_counted_run_succeeds_when_every_measurement_is_taken() {
        let a = analysis(0, 0, Some(3));
        let mut run = start("step-3", "abc", &a, t(0));
        for i in 0..3 {
            assert_ne!(run.phase, AnalysisPhase::Successful);
            measure(&mut run, &a, Ok(0.001), i * 30);
        }
        assert_eq!(run.phase, AnalysisPhase::Successful);
    }

    #[test]
    fn a_counted_run_without_a_single_answer_is_inconclusive() {
        let a = analysis(0, 10, Some(2));
        let mut run = start("pre-promotion", "abc", &a, t(0));
        measure(
            &mut run,
            &a,
            Err(ProviderFailure::NoData("empty".into())),
            0,
        );
        measure(
            &mut run,
            &a,
            Err(ProviderFailure::NoData("empty".into())),
            30,
        );
        assert_eq!(run.phase, AnalysisPhase::Inconclusive);
    }

    #[test]
    fn measurements_in_status_are_bounded() {
        let a = analysis(1000, 1000, None);
        let mut run = start("background", "abc", &a, t(0));
        for i in 0..100 {
            measure(&mut run, &a, Ok(0.001), i * 30);
        }
        assert_eq!(run.metrics[0].measurements.len(), MEASUREMENTS_KEPT);
        assert_eq!(run.metrics[0].count, 100);
        assert_eq!(
            run.metrics[0].measurements.last().unwrap().taken_at,
            Time(t(99 * 30))
        );
    }

    #[test]
    fn both_conditions_leave_a_middle_ground_inconclusive() {
        let mut a = analysis(0, 5, None);
        a.metrics[0].success_condition = Some("result < 0.01".into());
        a.metrics[0].failure_condition = Some("result > 0.05".into());
        let m = &a.metrics[0];
        let phase = |v: f64| judge(m, Ok(MeasuredValue::Number(v)), t(0)).phase;
        assert_eq!(phase(0.001), MeasurementPhase::Successful);
        assert_eq!(phase(0.03), MeasurementPhase::Inconclusive);
        assert_eq!(phase(0.2), MeasurementPhase::Failed);
    }

    #[test]
    fn dry_run_metrics_never_decide() {
        let spec = AnalysisSpec {
            metrics: vec![
                Metric {
                    dry_run: Some(true),
                    ..metric("noisy", "result < 0.01")
                },
                metric("error-rate", "result < 0.01"),
            ],
            ..AnalysisSpec::default()
        };
        let a = resolve(&spec, Some(1), None);
        let mut run = start("step-1", "abc", &a, t(0));
        let noisy = judge(&a.metrics[0], Ok(MeasuredValue::Number(0.9)), t(0));
        record(&mut run, &a, &a.metrics[0], noisy, t(0));
        assert_ne!(run.phase, AnalysisPhase::Failed);
        let good = judge(&a.metrics[1], Ok(MeasuredValue::Number(0.0)), t(0));
        record(&mut run, &a, &a.metrics[1], good, t(0));
        assert_eq!(run.phase, AnalysisPhase::Successful);
    }

    #[test]
    fn error_budget_thresholds_become_the_condition() {
        let spec = AnalysisSpec {
            metrics: vec![Metric {
                prometheus: None,
                success_condition: None,
                error_budget: Some(ErrorBudgetMetric {
                    name: "b".into(),
                    namespace: None,
                    max_burn_rate: Some(14.4),
                    min_remaining_percent: Some(20),
                    revision_label: None,
                    window: None,
                }),
                ..metric("slo", "unused")
            }],
            ..AnalysisSpec::default()
        };
        let a = resolve(&spec, None, None);
        let m = &a.metrics[0];
        let phase =
            |burn: f64, left: f64| judge(m, Ok(MeasuredValue::List(vec![burn, left])), t(0)).phase;
        assert_eq!(phase(1.0, 50.0), MeasurementPhase::Successful);
        assert_eq!(phase(20.0, 50.0), MeasurementPhase::Failed);
        assert_eq!(phase(1.0, 10.0), MeasurementPhase::Failed);
    }

    #[test]
    fn metric_settings_override_the_analysis() {
        let spec = AnalysisSpec {
            interval: Some("1m".parse().unwrap()),
            count: Some(5),
            failure_limit: Some(2),
            metrics: vec![Metric {
                interval: Some("10s".parse().unwrap()),
                failure_limit: Some(0),
                ..metric("m", "true")
            }],
            ..AnalysisSpec::default()
        };
        let config = PrometheusConfig {
            address: Some("http://prom:9090".into()),
            ..PrometheusConfig::default()
        };
        let a = resolve(&spec, Some(3), Some(&config));
        let m = &a.metrics[0];
        assert_eq!(m.interval, Duration::from_secs(10));
        assert_eq!(m.count, Some(5));
        assert_eq!(m.failure_limit, 0);
        assert_eq!(m.consecutive_error_limit, DEFAULT_CONSECUTIVE_ERROR_LIMIT);
        let Source::Prometheus(source) = &m.source else {
            panic!("prometheus source")
        };
        assert_eq!(source.config.address.as_deref(), Some("http://prom:9090"));
    }

    #[test]
    fn infinity_is_inconclusive_unless_a_condition_asks_about_it() {
        let now = Timestamp::from_second(1_000).unwrap();
        // `vector(1)/vector(0)` is +Inf: `result > 0.95` must not pass on it.
        let passes_on_inf = metric("m", "result > 0.95");
        let r = resolve(
            &AnalysisSpec {
                metrics: vec![passes_on_inf],
                ..AnalysisSpec::default()
            },
            None,
            None,
        );
        let m = &r.metrics[0];
        for value in [
            MeasuredValue::Number(f64::INFINITY),
            MeasuredValue::Number(f64::NEG_INFINITY),
            MeasuredValue::List(vec![0.5, f64::INFINITY]),
        ] {
            let judged = judge(m, Ok(value.clone()), now);
            assert_eq!(judged.phase, MeasurementPhase::Inconclusive, "{value}");
            assert!(judged.message.unwrap_or_default().contains("infinite"));
        }
        let mut asks = m.clone();
        asks.success_condition = Some("!isInf(result) && result > 0.95".into());
        assert_eq!(
            judge(&asks, Ok(MeasuredValue::Number(f64::INFINITY)), now).phase,
            MeasurementPhase::Failed
        );
    }
}
