//! `ErrorBudget`: a service level objective, evaluated from Prometheus, with a policy.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::analysis::PrometheusConfig;
use super::duration::Duration;

/// "This service promises `objective` percent good events over `window`."
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "ErrorBudget",
    namespaced,
    status = "ErrorBudgetStatus",
    shortname = "eb",
    category = "sluice",
    doc = "An ErrorBudget states a service level objective (the share of good events over a rolling window), evaluates it from Prometheus, publishes budget consumed, remaining and burn rates, and applies a policy (freeze promotions, roll back) as the budget runs out.",
    derive = "PartialEq",
    printcolumn(name = "Objective", type_ = "string", json_path = ".spec.objective"),
    printcolumn(name = "Window", type_ = "string", json_path = ".spec.window"),
    printcolumn(
        name = "Remaining",
        type_ = "number",
        json_path = ".status.remainingPercent",
        description = "Percent of the error budget left"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("double(self.objective) > 0.0 && double(self.objective) < 100.0").message("objective is a percentage strictly between 0 and 100, e.g. \"99.9\""))]
pub struct ErrorBudgetSpec {
    /// Target percentage of good events, as a decimal string strictly between 0 and 100
    /// (e.g. `"99.9"`). A string, because Kubernetes APIs avoid floats in specs.
    #[schemars(regex(pattern = r"^[0-9]{1,2}(\.[0-9]{1,6})?$"))]
    pub objective: String,
    /// Rolling window the objective covers, e.g. `30d`.
    pub window: Duration,
    /// How to count events.
    pub indicator: Indicator,
    /// How often to evaluate. Default `5m`. A spec change is evaluated at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation_interval: Option<Duration>,
    /// Fewer events than this in the window make the budget `InsufficientData` rather than
    /// judged (a 99.99% objective on a service with 10 requests an hour says nothing).
    /// Default 1: only an empty window is insufficient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_events: Option<i64>,
    /// Windows over which burn rates are published (and `maxBurnRate` metrics judge the
    /// shortest). Default `5m`, `1h`, `6h`, `3d`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub burn_rate_windows: Vec<Duration>,
    /// What to do as the budget is consumed. Default: FreezePromotions at 80, Rollback at 95.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["whenConsumed".into()]))]
    pub policy: Vec<BudgetPolicy>,
    /// Rollouts this budget protects: `FreezePromotions` holds their new revisions on stable,
    /// `Rollback` aborts their releases in flight and rolls back recent ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub targets: Vec<BudgetTarget>,
    /// Where to query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusConfig>,
}

/// The service level indicator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Indicator {
    /// Bad (or good) events over total events.
    pub ratio: RatioIndicator,
}

/// A ratio of two PromQL queries. `{{window}}` in a query is replaced by the window being
/// evaluated (e.g. `30d`, or `1h` for a burn rate).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.errors) != has(self.good)").message("ratio needs exactly one of errors or good"))]
pub struct RatioIndicator {
    /// Rate of bad events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8192))]
    pub errors: Option<String>,
    /// Rate of good events (instead of `errors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8192))]
    pub good: Option<String>,
    /// Rate of all events.
    #[schemars(length(min = 1, max = 8192))]
    pub total: String,
}

/// An action taken once a share of the budget is consumed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.rollbackWindow) || self.action == 'Rollback'").message("rollbackWindow applies only to the Rollback action"))]
pub struct BudgetPolicy {
    /// Percent of the budget consumed (0 to 100) at which the action applies.
    #[schemars(range(min = 0, max = 100))]
    pub when_consumed: i32,
    /// What to do.
    pub action: BudgetAction,
    /// `Rollback` only: a release that completed less than this long ago is rolled back to
    /// the revision before it (if its ReplicaSet still exists), without editing the spec.
    /// Default `1h`; `0s` rolls back only releases in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_window: Option<Duration>,
}

/// What an ErrorBudget policy does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BudgetAction {
    /// Only an Event and the Warning phase.
    Notify,
    /// Pipelines will not promote into the stages this budget gates.
    FreezePromotions,
    /// Abort in-flight releases of the targets (traffic back to stable), and roll back a
    /// release that completed within `rollbackWindow` to the revision before it.
    Rollback,
}

/// A Rollout protected by the budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetTarget {
    /// Name of the Rollout.
    #[schemars(length(min = 1, max = 253))]
    pub rollout: String,
    /// Namespace of the Rollout; defaults to the ErrorBudget's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// How healthy the budget is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BudgetPhase {
    /// Below every policy threshold.
    Healthy,
    /// A `Notify` threshold is crossed.
    Warning,
    /// A `FreezePromotions` threshold is crossed.
    Frozen,
    /// The budget is spent, or a `Rollback` threshold is crossed.
    Exhausted,
    /// The last evaluation failed (Prometheus unreachable, bad query).
    Unknown,
    /// Prometheus answered, but with no events in the window yet.
    InsufficientData,
}

/// What the last evaluation found.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBudgetStatus {
    /// Healthy, Warning, Frozen, Exhausted, Unknown or InsufficientData.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BudgetPhase>,
    /// A sentence for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Percent of the window's error budget consumed (may exceed 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_percent: Option<f64>,
    /// Percent of the budget left (never below 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_percent: Option<f64>,
    /// Burn rate per window: 1.0 spends exactly the budget over the full window.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub burn_rates: BTreeMap<String, f64>,
    /// The policy action in force, if any. While the budget cannot be evaluated (Unknown,
    /// InsufficientData) a freeze stays in force and a rollback becomes a freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_action: Option<BudgetAction>,
    /// The `whenConsumed` threshold of the action in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_in_force: Option<i32>,
    /// How long until the budget is spent at the shortest window's burn rate (e.g. `29h`);
    /// absent when nothing burns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_exhaustion: Option<String>,
    /// True when the figures are from an earlier evaluation (the last one failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<bool>,
    /// Prometheus queries the last evaluation made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries: Option<i32>,
    /// When evaluation was last attempted (successful or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_time: Option<Time>,
    /// Percent of the window that has data (a new SLO, or retention shorter than the
    /// window, covers less than 100): the figures describe only that part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_coverage: Option<f64>,
    /// When the budget was last evaluated successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluation_time: Option<Time>,
    /// Standard conditions: `Ready` (evaluation works), `BudgetHealthy` (no policy threshold
    /// crossed), `TargetsFound`, and the multiwindow burn-rate alerts `FastBurn`, `MediumBurn`
    /// and `SlowBurn` (true when both of their windows burn faster than their factor).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// The objective as a fraction of good events, parsed exactly from the spec's decimal string.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    /// Good events required, in millionths of a percent (`"99.9"` is 99_900_000).
    micro_percent: u64,
}

impl Objective {
    /// Parses `"99.9"` (a percentage strictly between 0 and 100, up to six decimals).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) || fraction.len() > 6 {
            return Err(format!(
                "objective {text:?} is not a percentage such as \"99.9\""
            ));
        }
        let whole: u64 = whole
            .parse()
            .map_err(|_| format!("objective {text:?} is too large"))?;
        let fraction: u64 = format!("{fraction:0<6}")
            .parse()
            .map_err(|_| format!("objective {text:?} is not a percentage"))?;
        let micro_percent = whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(fraction))
            .ok_or_else(|| format!("objective {text:?} must be strictly between 0 and 100"))?;
        if micro_percent == 0 || micro_percent >= 100_000_000 {
            return Err(format!(
                "objective {text:?} must be strictly between 0 and 100"
            ));
        }
        Ok(Self { micro_percent })
    }

    /// The error budget B = 1 - O, computed from the decimal digits (no float subtraction).
    pub fn budget(self) -> f64 {
        (100_000_000 - self.micro_percent) as f64 / 100_000_000.0
    }
}
