//! Logging (JSON or text) and the operator's own Prometheus metrics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable text, for terminals.
    Text,
}

/// Installs the global tracing subscriber. `filter` uses `RUST_LOG` syntax (e.g. `info`,
/// `sluice=debug,kube=info`).
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()?,
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init()?,
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// `asked` (sent to Prometheus) or `shared` (answered by an identical query).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabel {
    answer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnalysisLabels {
    namespace: String,
    name: String,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThresholdLabels {
    namespace: String,
    name: String,
    metric: String,
    /// `success` or `failure`: which condition the number comes from.
    condition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    channel: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerKindLabels {
    controller: String,
    kind: String,
}

/// The labels of one object's series (a Rollout's, an ErrorBudget's). The names are shared
/// (`Arc`) by the series one call makes, not copied into each: a Rollout has five (four
/// phases and its weight), 50,000 label sets with 10,000 Rollouts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    namespace: Arc<str>,
    name: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: Arc<str>,
    name: Arc<str>,
    phase: &'static str,
}

const PHASES: [&str; 4] = ["Healthy", "Progressing", "Paused", "Degraded"];

/// The operator's metrics.
pub struct Metrics {
    pub registry: Registry,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    reconcile_duration: Family<ControllerLabel, Histogram>,
    reconcile_errors: Family<ControllerKindLabels, Counter>,
    measurements: Family<KindLabel, Counter>,
    notifications: Family<NotificationLabels, Counter>,
    analysis_value: Family<AnalysisLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    analysis_threshold: Family<ThresholdLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The analysis metric names seen per Rollout, to drop their series with it.
    analysis_names: std::sync::Mutex<
        std::collections::HashMap<(String, String), std::collections::BTreeSet<String>>,
    >,
    query_duration: Histogram,
    queries: Family<AnswerLabel, Counter>,
    rollout_phase: Family<PhaseLabels, Gauge>,
    canary_weight: Family<RolloutLabels, Gauge>,
    release_duration: Histogram,
    budget_remaining: Family<RolloutLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget_consumed: Family<RolloutLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget_burn: Family<BurnLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget_phase: Family<PhaseLabels, Gauge>,
    stage_phase: Family<StageLabels, Gauge>,
    time_to_stage: Family<StageOnly, Histogram>,
    approval_wait: Family<StageOnly, Histogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageOnly {
    namespace: String,
    name: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    namespace: String,
    name: String,
    stage: String,
    phase: String,
}

const STAGE_PHASES: [&str; 8] = [
    "Pending",
    "Soaking",
    "WaitingForGates",
    "WaitingForApproval",
    "Progressing",
    "Healthy",
    "Failed",
    "Frozen",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BurnLabels {
    namespace: String,
    name: String,
    window: String,
}

const BUDGET_PHASES: [&str; 6] = [
    "Healthy",
    "Warning",
    "Frozen",
    "Exhausted",
    "Unknown",
    "InsufficientData",
];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "Sluice build information", build_info);
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica is the active (leader) controller",
            leader.clone(),
        );
        let reconcile_duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, by controller",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ControllerKindLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by controller and kind of error",
            reconcile_errors.clone(),
        );
        let measurements = Family::<KindLabel, Counter>::default();
        registry.register(
            "analysis_measurements",
            "Analysis measurements by outcome",
            measurements.clone(),
        );
        let notifications = Family::<NotificationLabels, Counter>::default();
        registry.register(
            "notifications",
            "Notification attempts by channel and result (delivered, retried, failed)",
            notifications.clone(),
        );
        let analysis_value = Family::default();
        registry.register(
            "analysis_value",
            "The last value each Rollout's analysis metric measured (finite single values only)",
            analysis_value.clone(),
        );
        let analysis_threshold = Family::default();
        registry.register(
            "analysis_threshold",
            "The number an analysis metric's condition compares with, where the condition is a plain comparison (result < 0.05)",
            analysis_threshold.clone(),
        );
        let query_duration = Histogram::new(exponential_buckets(0.002, 2.0, 13));
        registry.register(
            "prometheus_query_duration_seconds",
            "Latency of analysis queries to Prometheus",
            query_duration.clone(),
        );
        let queries = Family::<AnswerLabel, Counter>::default();
        registry.register(
            "prometheus_queries",
            "Analysis and budget queries, by answer: asked (sent to Prometheus) or shared (answered by an identical query in flight or younger than the measuring interval)",
            queries.clone(),
        );
        let rollout_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "rollout_phase",
            "1 for the phase each Rollout is in",
            rollout_phase.clone(),
        );
        let canary_weight = Family::<RolloutLabels, Gauge>::default();
        registry.register(
            "rollout_canary_weight",
            "Percent of traffic on each Rollout's canary",
            canary_weight.clone(),
        );
        let release_duration = Histogram::new(exponential_buckets(10.0, 2.0, 12));
        registry.register(
            "rollout_release_duration_seconds",
            "Time from a new revision's ReplicaSet to its promotion",
            release_duration.clone(),
        );
        let budget_remaining = Family::default();
        registry.register(
            "errorbudget_remaining_ratio",
            "Share of each ErrorBudget left (0 to 1), from the last successful evaluation",
            budget_remaining.clone(),
        );
        let budget_consumed = Family::default();
        registry.register(
            "errorbudget_consumed_ratio",
            "Share of each ErrorBudget consumed (may exceed 1)",
            budget_consumed.clone(),
        );
        let budget_burn = Family::default();
        registry.register(
            "errorbudget_burn_rate",
            "Burn rate of each ErrorBudget per window (1 spends the budget over the SLO window)",
            budget_burn.clone(),
        );
        let budget_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "errorbudget_phase",
            "1 for the phase each ErrorBudget is in",
            budget_phase.clone(),
        );
        let stage_phase = Family::<StageLabels, Gauge>::default();
        registry.register(
            "pipeline_stage_phase",
            "1 for the phase each Pipeline stage is in",
            stage_phase.clone(),
        );
        // From a minute to about three weeks.
        let stage_buckets = || Histogram::new(exponential_buckets(60.0, 2.0, 15));
        let time_to_stage = Family::<StageOnly, Histogram>::new_with_constructor(stage_buckets);
        registry.register(
            "pipeline_time_to_stage_seconds",
            "Time from a release entering a Pipeline's first stage to being admitted to this stage",
            time_to_stage.clone(),
        );
        let approval_wait = Family::<StageOnly, Histogram>::new_with_constructor(stage_buckets);
        registry.register(
            "pipeline_approval_wait_seconds",
            "Time a release waited at a stage for a person's approval",
            approval_wait.clone(),
        );
        Self {
            time_to_stage,
            approval_wait,
            stage_phase,
            budget_remaining,
            budget_consumed,
            budget_burn,
            budget_phase,
            release_duration,
            registry,
            leader,
            reconcile_duration,
            reconcile_errors,
            measurements,
            notifications,
            analysis_value,
            analysis_threshold,
            analysis_names: Default::default(),
            query_duration,
            queries,
            rollout_phase,
            canary_weight,
        }
    }

    pub fn observe_reconcile(&self, controller: &str, took: std::time::Duration) {
        self.reconcile_duration
            .get_or_create(&ControllerLabel {
                controller: controller.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn reconcile_errors(&self, controller: &str, kind: &str) {
        self.reconcile_errors
            .get_or_create(&ControllerKindLabels {
                controller: controller.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn notification(&self, channel: &str, result: &str) {
        self.notifications
            .get_or_create(&NotificationLabels {
                channel: channel.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn measurement(&self, outcome: &str) {
        self.measurements
            .get_or_create(&KindLabel {
                kind: outcome.to_string(),
            })
            .inc();
    }

    /// The value an analysis metric measured, and the thresholds its conditions compare with.
    pub fn analysis(
        &self,
        (namespace, name, metric): (&str, &str, &str),
        value: Option<f64>,
        thresholds: [(&str, Option<f64>); 2],
    ) {
        let labels = AnalysisLabels {
            namespace: namespace.into(),
            name: name.into(),
            metric: metric.into(),
        };
        if let Some(v) = value.filter(|v| v.is_finite()) {
            self.analysis_value.get_or_create(&labels).set(v);
        }
        for (condition, threshold) in thresholds {
            if let Some(t) = threshold {
                self.analysis_threshold
                    .get_or_create(&ThresholdLabels {
                        namespace: namespace.into(),
                        name: name.into(),
                        metric: metric.into(),
                        condition: condition.into(),
                    })
                    .set(t);
            }
        }
        if let Ok(mut names) = self.analysis_names.lock() {
            names
                .entry((namespace.into(), name.into()))
                .or_default()
                .insert(metric.into());
        }
    }

    /// Drops a deleted Rollout's series, so the metrics stay as small as the cluster.
    pub fn forget_rollout(&self, namespace: &str, name: &str) {
        let metrics = self
            .analysis_names
            .lock()
            .ok()
            .and_then(|mut names| names.remove(&(namespace.to_string(), name.to_string())))
            .unwrap_or_default();
        for metric in metrics {
            self.analysis_value.remove(&AnalysisLabels {
                namespace: namespace.into(),
                name: name.into(),
                metric: metric.clone(),
            });
            for condition in ["success", "failure"] {
                self.analysis_threshold.remove(&ThresholdLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    metric: metric.clone(),
                    condition: condition.into(),
                });
            }
        }
        for phase in PHASES {
            self.rollout_phase.remove(&PhaseLabels {
                namespace: namespace.into(),
                name: name.into(),
                phase,
            });
        }
        self.canary_weight.remove(&RolloutLabels {
            namespace: namespace.into(),
            name: name.into(),
        });
    }

    /// Records an ErrorBudget's figures and phase (one series per phase, 1 for the current).
    pub fn budget_state(
        &self,
        namespace: &str,
        name: &str,
        status: &crate::api::errorbudget::ErrorBudgetStatus,
    ) {
        let labels = RolloutLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        if let Some(remaining) = status.remaining_percent {
            self.budget_remaining
                .get_or_create(&labels)
                .set(remaining / 100.0);
        }
        if let Some(consumed) = status.consumed_percent {
            self.budget_consumed
                .get_or_create(&labels)
                .set(consumed / 100.0);
        }
        for (window, rate) in &status.burn_rates {
            self.budget_burn
                .get_or_create(&BurnLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    window: window.clone(),
                })
                .set(*rate);
        }
        let current = status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
        for candidate in BUDGET_PHASES {
            self.budget_phase
                .get_or_create(&PhaseLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    phase: candidate,
                })
                .set(i64::from(candidate == current));
        }
    }

    /// Drops a deleted ErrorBudget's series (`windows`: the burn-rate windows it published).
    pub fn forget_budget<'a>(
        &self,
        namespace: &str,
        name: &str,
        windows: impl IntoIterator<Item = &'a String>,
    ) {
        let labels = RolloutLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.budget_remaining.remove(&labels);
        self.budget_consumed.remove(&labels);
        for window in windows {
            self.budget_burn.remove(&BurnLabels {
                namespace: namespace.into(),
                name: name.into(),
                window: window.clone(),
            });
        }
        for candidate in BUDGET_PHASES {
            self.budget_phase.remove(&PhaseLabels {
                namespace: namespace.into(),
                name: name.into(),
                phase: candidate,
            });
        }
    }

    pub fn pipeline_state(
        &self,
        namespace: &str,
        name: &str,
        stages: &[crate::api::pipeline::StageStatus],
    ) {
        for stage in stages {
            let current = format!("{:?}", stage.phase);
            for candidate in STAGE_PHASES {
                self.stage_phase
                    .get_or_create(&StageLabels {
                        namespace: namespace.into(),
                        name: name.into(),
                        stage: stage.name.clone(),
                        phase: candidate.into(),
                    })
                    .set(i64::from(candidate == current));
            }
        }
    }

    /// A release admitted to `stage`, `took` after it entered the first stage.
    pub fn observe_time_to_stage(&self, namespace: &str, name: &str, stage: &str, took: f64) {
        self.time_to_stage
            .get_or_create(&StageOnly {
                namespace: namespace.into(),
                name: name.into(),
                stage: stage.into(),
            })
            .observe(took);
    }

    /// A release approved for `stage` after waiting `took` for it.
    pub fn observe_approval_wait(&self, namespace: &str, name: &str, stage: &str, took: f64) {
        self.approval_wait
            .get_or_create(&StageOnly {
                namespace: namespace.into(),
                name: name.into(),
                stage: stage.into(),
            })
            .observe(took);
    }

    pub fn observe_release(&self, took: std::time::Duration) {
        self.release_duration.observe(took.as_secs_f64());
    }

    /// A query answered in `took`, sent to Prometheus or shared with an identical one.
    pub fn observe_query(
        &self,
        took: std::time::Duration,
        how: crate::analysis::answers::Answered,
    ) {
        let answer = match how {
            crate::analysis::answers::Answered::Asked => {
                self.query_duration.observe(took.as_secs_f64());
                "asked"
            }
            crate::analysis::answers::Answered::Shared => "shared",
        };
        self.queries
            .get_or_create(&AnswerLabel {
                answer: answer.to_string(),
            })
            .inc();
    }

    /// Records a Rollout's phase (one series per phase, 1 for the current) and weight.
    pub fn rollout_state(
        &self,
        namespace: &str,
        name: &str,
        phase: Option<crate::api::rollout::RolloutPhase>,
        weight: i32,
    ) {
        let current = phase.map(|p| format!("{p:?}")).unwrap_or_default();
        let (namespace, name): (Arc<str>, Arc<str>) = (namespace.into(), name.into());
        for candidate in PHASES {
            let labels = PhaseLabels {
                namespace: namespace.clone(),
                name: name.clone(),
                phase: candidate,
            };
            self.rollout_phase
                .get_or_create(&labels)
                .set(i64::from(candidate == current));
        }
        self.canary_weight
            .get_or_create(&RolloutLabels { namespace, name })
            .set(i64::from(weight));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_build_info_and_leader() {
        let metrics = Metrics::new();
        metrics.leader.set(1);
        let text = metrics.encode().unwrap();
        assert!(text.contains(&format!(
            "sluice_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("sluice_leader 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
