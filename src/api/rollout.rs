//! `Rollout`: a pod template that is released progressively (canary or blue-green).

use std::sync::Arc;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::analysis::{AnalysisRunStatus, AnalysisSpec, Metric, PrometheusConfig};
use super::common::Intent;
use super::duration::Duration;

/// Run a pod template; when it changes, move traffic to the new revision step by step (canary)
/// or switch all at once after checks (blue-green), judged by Prometheus.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "sro",
    category = "sluice",
    doc = "A Rollout runs a pod template and releases each new revision progressively: canary (traffic shifted step by step) or blue-green (switched at once after checks), judged by Prometheus analysis and rolled back automatically when it fails.",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Healthy, Progressing, Paused or Degraded"
    ),
    printcolumn(
        name = "Step",
        type_ = "string",
        json_path = ".status.stepProgress",
        description = "Current canary step out of the total"
    ),
    printcolumn(
        name = "Weight",
        type_ = "integer",
        json_path = ".status.weights.canary",
        description = "Percent of traffic on the canary"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Stable",
        type_ = "string",
        json_path = ".status.stableRevision",
        description = "Pod-template hash of the stable revision"
    ),
    printcolumn(
        name = "Canary",
        type_ = "string",
        json_path = ".status.canaryRevision",
        description = "Pod-template hash of the revision being released",
        priority = 1
    ),
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
pub struct RolloutSpec {
    /// Desired number of pods. Default 1. Served by the scale subresource, so an HPA can own it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Label selector for the pods. Must match the template's labels; Sluice adds the
    /// `sluice.dev/pod-template-hash` label to tell revisions apart.
    pub selector: LabelSelector,
    /// The pod template, exactly as in a Deployment. Changing it starts a release.
    // Shared rather than owned: the controller's cache keeps no template (rollout/cached.rs),
    // and its 10,000 copies all point at one empty one instead of 1,872 bytes each.
    pub template: Arc<PodTemplateSpec>,
    /// Old ReplicaSets kept (scaled to zero) for `kubectl sluice undo`. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub revision_history_limit: Option<i32>,
    /// Seconds a release may go without progress before the Rollout is marked Degraded.
    /// Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,
    /// Seconds a new pod must be ready before it counts as available. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_ready_seconds: Option<i32>,
    /// Hold the release where it is (no step advances, no promotion). Analysis keeps running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// How a new revision is released.
    pub strategy: RolloutStrategy,
}

/// Exactly one of `canary` or `blueGreen`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.canary) ? 1 : 0) + (has(self.blueGreen) ? 1 : 0) == 1").message("strategy needs exactly one of canary or blueGreen"))]
pub struct RolloutStrategy {
    /// Shift traffic to the new revision step by step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed, as is blueGreen: a Rollout uses one of the two, and room for both inline
    // would cost every cached Rollout about 900 bytes.
    pub canary: Option<Box<CanaryStrategy>>,
    /// Bring the new revision up next to the old one and switch traffic at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<Box<BlueGreenStrategy>>,
}

/// Canary: the new revision takes a growing share of traffic, step by step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.stableService) == has(self.canaryService)").message("stableService and canaryService go together"),
    validation = Rule::new("!has(self.stableService) || self.stableService != self.canaryService").message("stableService and canaryService must be different Services"),
    validation = Rule::new("!has(self.trafficRouting) || !has(self.trafficRouting.gatewayAPI) || has(self.stableService)").message("gatewayAPI routing needs stableService and canaryService"),
    validation = Rule::new("!has(self.trafficRouting) || !has(self.trafficRouting.istio) || has(self.trafficRouting.istio.destinationRule) != has(self.stableService)").message("istio routing needs either a destinationRule (subset-level) or stableService and canaryService (host-level), not both"),
    validation = Rule::new("!has(self.steps) || !self.steps.exists(s, has(s.analysis) && (!has(s.analysis.metrics) || size(s.analysis.metrics) == 0)) || (has(self.analysis) && has(self.analysis.metrics) && size(self.analysis.metrics) > 0)").message("an analysis step without metrics needs metrics in the canary's analysis")
)]
pub struct CanaryStrategy {
    /// Service whose selector Sluice points at the stable revision (host-level routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_service: Option<String>,
    /// Service whose selector Sluice points at the canary revision (host-level routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_service: Option<String>,
    /// The traffic router. Without one, weight is approximated by replica counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_routing: Option<TrafficRouting>,
    /// The release plan. Default: 10, 25, 50 and 75 percent, each held for one minute, then 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub steps: Vec<CanaryStep>,
    /// Background analysis: runs from the first step until full promotion; failing it aborts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,
    /// Prometheus used by this Rollout's metrics unless a metric names its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusConfig>,
    /// How long the old stable ReplicaSet stays up after a promotion. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay: Option<Duration>,
    /// How long the canary ReplicaSet stays up after an abort (traffic is already off it).
    /// Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_scale_down_delay: Option<Duration>,
}

/// One step of a canary release: exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.setWeight) ? 1 : 0) + (has(self.pause) ? 1 : 0) + (has(self.analysis) ? 1 : 0) + (has(self.setCanaryScale) ? 1 : 0) == 1").message("a step sets exactly one of setWeight, pause, analysis or setCanaryScale"))]
pub struct CanaryStep {
    /// Send this percentage of traffic to the canary (0 to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub set_weight: Option<i32>,
    /// Wait: for `duration`, or (without one) until `kubectl sluice promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
    /// Run an analysis to completion before going on; `{}` reuses the canary's metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<StepAnalysis>,
    /// Size the canary independently of its traffic weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_canary_scale: Option<SetCanaryScale>,
}

/// A pause step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    /// How long to wait. Without it the rollout waits for `kubectl sluice promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

/// An analysis that blocks its step until it completes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepAnalysis {
    /// Metrics to measure; empty means the metrics of the canary's `analysis`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub metrics: Vec<Metric>,
    /// Measurements per metric. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub count: Option<i32>,
    /// Time between measurements. Default: the canary analysis interval, else `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
}

/// Canary size override: exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.replicas) ? 1 : 0) + (has(self.weight) ? 1 : 0) + (has(self.matchTrafficWeight) ? 1 : 0) == 1").message("setCanaryScale sets exactly one of replicas, weight or matchTrafficWeight"))]
pub struct SetCanaryScale {
    /// An absolute number of canary pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Canary pods as a percentage of `spec.replicas` (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,
    /// Go back to sizing the canary by its traffic weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_traffic_weight: Option<bool>,
}

/// The traffic router: exactly one of `istio` or `gatewayAPI`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.istio) ? 1 : 0) + (has(self.gatewayAPI) ? 1 : 0) == 1").message("trafficRouting needs exactly one of istio or gatewayAPI"))]
pub struct TrafficRouting {
    /// Split traffic with Istio VirtualService weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioRouting>,
    /// Split traffic with Gateway API HTTPRoute backend weights.
    #[serde(
        default,
        rename = "gatewayAPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_api: Option<GatewayApiRouting>,
}

/// Istio routing. Subset-level with a `destinationRule`, host-level with the strategy's
/// stable and canary Services.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.virtualService) != (has(self.virtualServices) && size(self.virtualServices) > 0)").message("istio routing needs exactly one of virtualService or virtualServices"))]
pub struct IstioRouting {
    /// The VirtualService whose route weights Sluice sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<VirtualServiceRef>,
    /// Several VirtualServices (e.g. a mesh one and a gateway one), all kept in step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub virtual_services: Vec<VirtualServiceRef>,
    /// Subset-level routing: Sluice keeps each subset's pod-template-hash label on its revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<DestinationRuleRef>,
}

/// A VirtualService and the HTTP routes in it that Sluice manages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceRef {
    /// Name of the VirtualService. Names may contain dots. For a VirtualService in another
    /// namespace, set `namespace`; the short form `name.namespace` is also accepted when the
    /// name itself has no dot (the part after the only dot is then the namespace).
    #[schemars(length(min = 1, max = 317))]
    pub name: String,
    /// Namespace of the VirtualService. Default: the Rollout's namespace (or the one given by
    /// the `name.namespace` short form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Names of the HTTP routes to manage. May be omitted when the VirtualService has exactly
    /// one HTTP route. Other routes are never touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub routes: Vec<String>,
}

/// A DestinationRule with one subset per revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.stableSubset != self.canarySubset").message("stableSubset and canarySubset must differ"))]
pub struct DestinationRuleRef {
    /// Name of the DestinationRule (same namespace as the Rollout).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Subset that routes to the stable revision.
    #[schemars(length(min = 1, max = 253))]
    pub stable_subset: String,
    /// Subset that routes to the canary revision.
    #[schemars(length(min = 1, max = 253))]
    pub canary_subset: String,
}

/// Gateway API routing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiRouting {
    /// The HTTPRoute whose backend weights Sluice sets.
    pub http_route: HttpRouteRef,
}

/// An HTTPRoute and the rules in it that Sluice manages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRef {
    /// Name of the HTTPRoute (same namespace as the Rollout).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Names of the rules to manage (`rules[].name`). May be omitted when the route has
    /// exactly one rule that refers to the stable Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub rules: Vec<String>,
}

/// Blue-green: the new revision comes up beside the old one and takes all traffic at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.previewService) || self.previewService != self.activeService").message("previewService and activeService must be different Services"),
    validation = Rule::new("!has(self.trafficRouting) || has(self.previewService) || (has(self.trafficRouting.istio) && has(self.trafficRouting.istio.destinationRule))").message("blue-green trafficRouting needs a previewService (host-level) or an istio destinationRule (subset-level)")
)]
pub struct BlueGreenStrategy {
    /// The Service users reach; its selector is switched to the new revision at promotion.
    #[schemars(length(min = 1, max = 63))]
    pub active_service: String,
    /// A Service that reaches the new revision before promotion, for tests and analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub preview_service: Option<String>,
    /// Pods for the new revision before promotion. Default: `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub preview_replica_count: Option<i32>,
    /// Promote without a person once pre-promotion analysis passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promotion: Option<AutoPromotion>,
    /// Must succeed before the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_promotion_analysis: Option<AnalysisSpec>,
    /// Runs after the switch; failing it switches traffic straight back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_promotion_analysis: Option<AnalysisSpec>,
    /// How long the old revision stays up after the switch, ready for an instant rollback.
    /// Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay: Option<Duration>,
    /// Switch traffic with a router (weights 0 -> 100 at once) instead of the Service selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_routing: Option<TrafficRouting>,
    /// Prometheus used by this Rollout's metrics unless a metric names its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusConfig>,
}

/// Automatic promotion for blue-green.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoPromotion {
    /// Promote automatically.
    pub enabled: bool,
    /// Wait this long after the new revision is ready (and pre-promotion analysis passed).
    /// Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Duration>,
}

/// The Rollout's overall state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RolloutPhase {
    /// The stable revision runs and no release is in flight.
    Healthy,
    /// A release is moving forward.
    Progressing,
    /// A release waits: a pause step, a manual pause, or an inconclusive analysis.
    Paused,
    /// A release was aborted or cannot progress; traffic is on stable.
    Degraded,
}

/// Traffic split as last written (and verified) by the router.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficWeights {
    /// Percent of traffic on the stable revision.
    pub stable: i32,
    /// Percent of traffic on the canary (or preview) revision.
    pub canary: i32,
    /// Whether reading the route back showed these weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

/// An object in the Rollout's namespace whose revision label Sluice sets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutedObject {
    /// `DestinationRule` or `Service`.
    pub kind: String,
    pub name: String,
}

/// Where a blue-green release stands. Times are microseconds, like step times.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlueGreenStatus {
    /// When the revision in preview started (the progress deadline counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_started_at: Option<MicroTime>,
    /// When the preview first had `previewReplicaCount` pods available (`autoPromotion.after`
    /// counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_ready_at: Option<MicroTime>,
    /// True once a promotion was decided (by a person or by `autoPromotion`): the preview is
    /// scaled to full size and traffic switches as soon as it is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_requested: Option<bool>,
    /// When traffic switched to the active revision (`scaleDownDelay` of the previous one
    /// counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<MicroTime>,
}

/// Why the rollout is paused.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PauseReason {
    /// A `pause` step.
    CanaryPauseStep,
    /// Blue-green waiting for promotion.
    BlueGreenPause,
    /// Analysis could not decide (no data, Prometheus unreachable).
    InconclusiveAnalysis,
    /// `spec.paused` or `kubectl sluice pause`.
    UserPause,
    /// An ErrorBudget that targets the Rollout freezes promotions.
    BudgetFreeze,
    /// The Rollout is in a Pipeline stage that has not admitted the new release yet.
    PipelineGate,
}

/// A reason the rollout is paused, and since when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseCondition {
    /// Why.
    pub reason: PauseReason,
    /// Since when. Timed pauses count from here, so they survive operator restarts.
    pub start_time: Time,
}

/// Which person-made requests the operator has already acted on (by intent id).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandledIntents {
    /// Id of the last abort handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<String>,
    /// Id of the last promote handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<String>,
    /// Id of the last full promotion handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_full: Option<String>,
    /// Id of the last retry handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
    /// Id of the last freeze override handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_freeze: Option<String>,
}

/// A person released a revision despite an ErrorBudget freeze (the SRE policy's exception for
/// P0 and security fixes). Kept while that revision is being released.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FreezeOverride {
    /// The revision released anyway.
    pub revision: String,
    /// Who asked (as the plugin recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Why (`--reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the override took effect.
    pub at: Time,
}

/// The last release that completed: what became stable, what it replaced, and when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// The revision that became stable.
    pub revision: String,
    /// The stable revision before it (what an ErrorBudget rollback returns to).
    pub previous: String,
    /// When it became stable.
    pub at: Time,
}

/// An ErrorBudget rolled a completed release back to the revision before it. The spec is
/// not edited: while this is set, the template's revision (`revision`) is not released again
/// until the template changes or `kubectl sluice retry`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetRollback {
    /// The revision rolled back (the one the template declares).
    pub revision: String,
    /// The revision running instead.
    pub to: String,
    /// `namespace/name` of the ErrorBudget.
    pub budget: String,
    /// What the budget said when it acted.
    pub reason: String,
    /// When the rollback was decided.
    pub at: Time,
}

/// What the operator observed and decided. Written only by the operator, except the intent
/// fields (`abort`, `promote`, `promoteFull`, `retry`, `pause`, `resume`), which only
/// `kubectl sluice` writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Healthy, Progressing, Paused or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// A sentence for humans about the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Canary: index of the current step (equal to the number of steps once all are done).
    /// Blue-green: not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step_index: Option<i32>,
    /// `current/total`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_progress: Option<String>,
    /// Canary: when the current step started (microseconds: a 1s pause must not end early).
    /// Blue-green: not used (see `blueGreen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step_started_at: Option<MicroTime>,
    /// Pod-template hash of the revision that serves users (blue-green: the active one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// Pod-template hash of the revision being released, if any: the canary, or for
    /// blue-green the revision in preview (until the switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    /// Pods of all revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pods of the newest revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// Ready pods of all revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Available pods of all revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
    /// Label selector in string form, for the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Current traffic split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<TrafficWeights>,
    /// Why the rollout is paused, if it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["reason".into()]))]
    pub pause_conditions: Vec<PauseCondition>,
    /// The analysis runs of the current (or last) release, with their recent measurements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub analysis_runs: Vec<AnalysisRunStatus>,
    /// Standard conditions: `Available`, `Progressing`, `Paused`, `Aborted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Person's request: put all traffic back on stable now. Written by `kubectl sluice abort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Intent>,
    /// Person's request: go past the current pause. Written by `kubectl sluice promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<Intent>,
    /// Person's request: skip the remaining steps and analysis. `kubectl sluice promote --full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_full: Option<Intent>,
    /// Person's request: start an aborted release again. `kubectl sluice retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Intent>,
    /// Objects outside the Rollout that Sluice marked with the revision label (DestinationRule
    /// subsets, Service selectors), so that it can take the label back when the spec stops
    /// naming them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub routed_objects: Vec<RoutedObject>,
    /// Blue-green: where the release stands (preview ready, promotion decided, switch time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreenStatus>,
    /// Blue-green: the revision that served before the last switch, kept running for an
    /// instant switch back until post-promotion analysis passes and `scaleDownDelay` ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    /// When the release of `canaryRevision` was aborted (by a person or by analysis). While
    /// set, traffic stays on stable until `kubectl sluice retry` or a new template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_at: Option<Time>,
    /// Person's request: hold the release where it is. `kubectl sluice pause`. In force while
    /// it is newer than `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Intent>,
    /// Person's request: lift a `kubectl sluice pause`. `kubectl sluice resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Intent>,
    /// Person's request: release the new revision although an ErrorBudget freezes promotions.
    /// `kubectl sluice promote --override-freeze --reason TEXT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_freeze: Option<Intent>,
    /// The freeze override in force, recorded for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_override: Option<FreezeOverride>,
    /// The last release that completed (for an ErrorBudget's rollback window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promotion: Option<Promotion>,
    /// Set while an ErrorBudget's rollback of a completed release is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_rollback: Option<BudgetRollback>,
    /// The intents the operator has acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_intents: Option<HandledIntents>,
}

impl RolloutStatus {
    /// Drops the people's intents: they belong to the person who wrote them, and the operator
    /// never writes them back.
    pub fn clear_intents(&mut self) {
        self.abort = None;
        self.promote = None;
        self.promote_full = None;
        self.retry = None;
        self.pause = None;
        self.resume = None;
    }
}
