//! Analysis: the metrics that judge a release, where to read them, and what was measured.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SecretKeyRef;
use super::duration::Duration;

/// How often, how long and how strictly to judge a release.
///
/// A measurement is *successful* when `successCondition` holds, *failed* when
/// `failureCondition` holds (or `successCondition` does not), and *inconclusive* when the
/// provider gives no usable answer (no data, NaN, Prometheus unreachable). Inconclusive results
/// never promote and never roll back on their own: past `inconclusiveLimit` the rollout pauses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// Time between two measurements of the same metric. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Measurements to take per metric before the analysis completes. Unset: a background
    /// analysis runs until the rollout is fully promoted; a step analysis takes 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub count: Option<i32>,
    /// Wait this long after the analysis starts before the first measurement (lets the new
    /// revision take traffic first). Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<Duration>,
    /// Failed measurements tolerated per metric; one more fails the analysis. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub failure_limit: Option<i32>,
    /// Inconclusive measurements tolerated per metric; one more pauses the rollout for a
    /// person to decide (it never rolls back on its own). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub inconclusive_limit: Option<i32>,
    /// Consecutive provider errors (query failed, Prometheus unreachable) tolerated per metric
    /// before the analysis is marked Error and the rollout pauses. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_error_limit: Option<i32>,
    /// Measure and record, but never fail or pause the rollout because of the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// The metrics to measure. Names must be unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub metrics: Vec<Metric>,
}

/// One metric: a provider that returns a value, and the CEL conditions that judge it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.prometheus) ? 1 : 0) + (has(self.errorBudget) ? 1 : 0) == 1").message("a metric needs exactly one provider: prometheus or errorBudget"),
    validation = Rule::new("!has(self.prometheus) || has(self.successCondition) || has(self.failureCondition)").message("a prometheus metric needs a successCondition or a failureCondition")
)]
pub struct Metric {
    /// Name of the metric, unique within the analysis (shown in status and Events).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Measure with a Prometheus query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusMetric>,
    /// Judge the release against an ErrorBudget: fails when its burn rate exceeds
    /// `maxBurnRate` or its remaining budget falls below `minRemainingPercent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_budget: Option<ErrorBudgetMetric>,
    /// CEL expression over `result` that must hold for a measurement to succeed, e.g.
    /// `result < 0.01`. `result` is a number for a scalar or one-sample answer, a list of
    /// numbers for a vector answer. Helpers: `isNaN(x)`, `isInf(x)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub success_condition: Option<String>,
    /// CEL expression over `result` that marks a measurement failed when it holds, e.g.
    /// `result > 0.05`. With both conditions, a measurement matching neither is inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub failure_condition: Option<String>,
    /// Overrides the analysis `interval` for this metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Overrides the analysis `count` for this metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub count: Option<i32>,
    /// Overrides the analysis `failureLimit` for this metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub failure_limit: Option<i32>,
    /// Overrides the analysis `inconclusiveLimit` for this metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub inconclusive_limit: Option<i32>,
    /// Overrides the analysis `consecutiveErrorLimit` for this metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_error_limit: Option<i32>,
    /// Overrides the analysis `dryRun` for this metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// A PromQL query, with optional per-metric connection settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusMetric {
    /// PromQL. Template variables, replaced with label-safe values before the query runs:
    /// `{{rollout.name}}`, `{{rollout.namespace}}`, `{{canary.revision}}`, `{{stable.revision}}`.
    #[schemars(length(min = 1, max = 8192))]
    pub query: String,
    /// Overrides the Prometheus address of the strategy (or the operator's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub address: Option<String>,
    /// Query timeout. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Extra HTTP headers sent with the query (e.g. a tenant id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HttpHeader>,
}

/// Judge a release by an ErrorBudget's burn rate and remaining budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.maxBurnRate) || has(self.minRemainingPercent)").message("an errorBudget metric needs maxBurnRate or minRemainingPercent"))]
pub struct ErrorBudgetMetric {
    /// Name of the ErrorBudget.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the ErrorBudget; defaults to the Rollout's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Fail when the canary's own burn rate is above this (e.g. `14.4`, the classic "2% of a
    /// 30-day budget in one hour" page threshold). The canary's burn rate is the budget's
    /// indicator with every selector narrowed to `revisionLabel="<canary revision>"`, over
    /// `window`, divided by the budget: stable traffic does not dilute it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_burn_rate: Option<f64>,
    /// The label that names a revision in the indicator's series, for `maxBurnRate`. Default
    /// `destination_canonical_revision` (Istio reports it from the pod label
    /// `service.istio.io/canonical-revision`, which Sluice sets to the revision hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z_][a-zA-Z0-9_]*$"))]
    pub revision_label: Option<String>,
    /// The window of the canary's burn rate, for `maxBurnRate`. Default `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// Fail when less than this percentage of the budget remains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub min_remaining_percent: Option<i32>,
}

/// How to reach Prometheus.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusConfig {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`.
    /// Defaults to the operator's `--prometheus-address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub address: Option<String>,
    /// Query timeout. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Extra HTTP headers sent with every query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HttpHeader>,
    /// Credentials, read from Secrets in the namespace of the object using them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<PrometheusAuth>,
    /// TLS settings for an `https://` address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// Credentials for Prometheus: a bearer token or basic auth, not both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.bearerTokenSecretRef) != has(self.basic)").message("auth needs exactly one of bearerTokenSecretRef or basic"))]
pub struct PrometheusAuth {
    /// Secret key holding a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret_ref: Option<SecretKeyRef>,
    /// Basic auth user name and password from Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
}

/// Basic-auth credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// Secret key holding the user name.
    pub username_secret_ref: SecretKeyRef,
    /// Secret key holding the password.
    pub password_secret_ref: SecretKeyRef,
}

/// TLS options for talking to Prometheus.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    /// Secret key holding a PEM CA bundle to trust in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Skip server certificate verification. For test clusters only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// An HTTP header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeader {
    /// Header name.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub name: String,
    /// Header value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// Where an analysis stands (or how it ended).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AnalysisPhase {
    /// Created, waiting for its initial delay.
    Pending,
    /// Taking measurements.
    Running,
    /// Every metric met its conditions.
    Successful,
    /// A metric failed more often than its failure limit.
    Failed,
    /// A metric was inconclusive more often than its inconclusive limit.
    Inconclusive,
    /// A provider failed more often in a row than the consecutive error limit.
    Error,
}

/// What a single measurement said.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MeasurementPhase {
    Successful,
    Failed,
    Inconclusive,
    Error,
}

/// One measurement of one metric.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// The verdict.
    pub phase: MeasurementPhase,
    /// The value the provider returned, as text (a number, or a list for a vector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// When the measurement was taken.
    pub taken_at: Time,
    /// Why it is inconclusive or errored, or which condition decided it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The running tally of one metric, with its most recent measurements.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricStatus {
    /// The metric's name.
    pub name: String,
    /// Where this metric stands.
    pub phase: AnalysisPhase,
    /// Measurements taken so far.
    #[serde(default)]
    pub count: i32,
    /// Successful measurements so far.
    #[serde(default)]
    pub successful: i32,
    /// Failed measurements so far.
    #[serde(default)]
    pub failed: i32,
    /// Inconclusive measurements so far.
    #[serde(default)]
    pub inconclusive: i32,
    /// Errored measurements so far.
    #[serde(default)]
    pub error: i32,
    /// Errors in a row, reset by any non-error measurement.
    #[serde(default)]
    pub consecutive_errors: i32,
    /// The most recent measurements, newest last. Bounded (the operator keeps the last 10).
    /// Passes of a metric without a `count` are written with the next status change, or
    /// once the newest one written is 30 s old (`--record-passes-within-seconds`); every
    /// other measurement at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub measurements: Vec<Measurement>,
}

/// A summary of one analysis run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRunStatus {
    /// Which analysis: `background`, `step-<index>`, `pre-promotion` or `post-promotion`.
    pub name: String,
    /// The canary revision the run judges.
    pub revision: String,
    /// Where the run stands.
    pub phase: AnalysisPhase,
    /// When the run started.
    pub started_at: Time,
    /// When the run finished, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Human summary of the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Per-metric tallies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricStatus>,
}
