//! `Pipeline`: the order in which a release reaches environments, and the gates between them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Intent;
use super::duration::Duration;

/// "A release goes dev -> staging -> prod; each stage has gates."
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    shortname = "spl",
    category = "sluice",
    doc = "A Pipeline moves a release through environments in order (dev -> staging -> prod). Each stage's Rollouts hold a new release on stable until the Pipeline releases it to that stage, once the stage's gates pass: soak time, error budget left, manual approval, ArgoCD health.",
    derive = "PartialEq",
    printcolumn(
        name = "Stages",
        type_ = "string",
        json_path = ".status.summary",
        description = "stage:phase for each stage"
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
pub struct PipelineSpec {
    /// The stages in release order. Names must be unique.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub stages: Vec<Stage>,
}

/// One environment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    /// Stage name, e.g. `staging`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The Rollouts that make up this stage.
    #[schemars(length(min = 1, max = 64))]
    pub rollouts: Vec<StageRollout>,
    /// What must hold before a release enters this stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<Gates>,
}

/// A Rollout in a stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageRollout {
    /// Namespace of the Rollout.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the Rollout.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Gates between the previous stage and this one. All must pass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gates {
    /// The previous stage must have been healthy on this release for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<Duration>,
    /// A person must approve (`kubectl sluice approve pipeline/NAME --stage STAGE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGate>,
    /// Error budgets that must have enough left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub error_budgets: Vec<ErrorBudgetGate>,
    /// An ArgoCD Application that must be Synced and Healthy.
    #[serde(default, rename = "argoCD", skip_serializing_if = "Option::is_none")]
    pub argo_cd: Option<ArgoCdGate>,
    /// When a release may enter, in the shape of ArgoCD sync windows: inside an `allow`
    /// window (when any are listed) and outside every `deny` window (a deployment freeze).
    /// `kubectl sluice approve --override-windows --reason TEXT` lets one release through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<DeployWindow>,
}

/// A recurring window of time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeployWindow {
    /// `allow` or `deny`.
    pub kind: WindowKind,
    /// When the window opens: a standard five-field cron expression, e.g. `0 9 * * 1-5`.
    #[schemars(length(min = 9, max = 256), regex(pattern = r"^\S+(\s+\S+){4}$"))]
    pub schedule: String,
    /// How long it stays open, e.g. `8h`.
    pub duration: Duration,
    /// IANA time zone of the schedule, e.g. `Europe/Berlin`. Default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
}

/// Whether a window lets releases in or keeps them out.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    Allow,
    Deny,
}

/// Manual approval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalGate {
    /// Whether an approval is required.
    pub required: bool,
    /// Who may approve, besides needing the RBAC verb `approve` on this Pipeline: a user named
    /// here, or a member of a group named here. Empty: anyone with the verb. The apiserver
    /// enforces it (the ValidatingAdmissionPolicy `sluice-pipeline-approvals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Approvers>,
}

/// People who may approve a stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// User names as the apiserver authenticates them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub users: Vec<String>,
    /// Groups as the apiserver authenticates them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub groups: Vec<String>,
}

/// An ErrorBudget that must have at least `minRemainingPercent` left and not be frozen.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBudgetGate {
    /// Namespace of the ErrorBudget; defaults to the Pipeline's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the ErrorBudget.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Minimum percent of budget left. Default 0 (only a frozen or exhausted budget blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub min_remaining_percent: Option<i32>,
    /// Let a release through while the budget is `InsufficientData` (too few events to judge).
    /// Default false: fail closed. An `Unknown` budget never passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_insufficient_data: Option<bool>,
}

/// An ArgoCD Application gate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArgoCdGate {
    /// Name of the Application.
    #[schemars(length(min = 1, max = 253))]
    pub application: String,
    /// Namespace of the Application. Default `argocd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A release: what a stage runs, identified by its container images.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// The container images, sorted.
    pub images: Vec<String>,
}

/// Where a stage stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum StagePhase {
    /// No release has reached this stage yet.
    Pending,
    /// Waiting for the previous stage to soak.
    Soaking,
    /// Waiting for gates other than approval (error budget, ArgoCD).
    WaitingForGates,
    /// Waiting for a person to approve.
    WaitingForApproval,
    /// The stage's Rollouts are releasing.
    Progressing,
    /// The stage runs the release and is healthy.
    Healthy,
    /// A Rollout of the stage aborted or degraded.
    Failed,
    /// An error budget froze promotions into the stage.
    Frozen,
}

/// The verdict of one gate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateResult {
    /// Which gate: `soak`, `approval`, `errorBudget/<ns>/<name>`, `argoCD/<ns>/<app>`.
    pub gate: String,
    /// Whether it passes now.
    pub passed: bool,
    /// Why (e.g. "soaked 4m of 10m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The state of one stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// The stage name.
    pub name: String,
    /// The release admitted to this stage: its Rollouts may release it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
    /// The release the stage's Rollouts declare, waiting at the gates (absent once admitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Release>,
    /// A sentence for humans: what the stage waits for, or how it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the gates will be looked at again at the latest (a soak ending, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_check: Option<Time>,
    /// Where the stage stands.
    pub phase: StagePhase,
    /// Since when the stage is in this phase (soak counts from `Healthy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Gate verdicts for the pending release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateResult>,
}

/// An approval (or a rejection), written by `kubectl sluice approve` or `reject`. The
/// apiserver checks that `intent.requestedBy` is the authenticated user and that this user may
/// approve the stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The stage approved.
    pub stage: String,
    /// The release approved; an approval does not carry over to a different release.
    pub release: Release,
    /// Approved (default) or Rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// An emergency: the release enters although the stage's windows keep it out now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_windows: Option<bool>,
    /// Who, when and why.
    pub intent: Intent,
}

/// A person's decision on a release for a stage.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Decision {
    Approved,
    Rejected,
}

/// What happened, for the audit trail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum HistoryAction {
    /// A release was let into a stage.
    Promoted,
    /// A person approved a release for a stage.
    Approved,
    /// A stage's release failed.
    Failed,
    /// A stage was frozen by an error budget.
    Frozen,
    /// A person rejected a release for a stage.
    Rejected,
    /// A stage's Rollouts all run the release, Healthy.
    Healthy,
}

/// One entry of the pipeline history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The stage.
    pub stage: String,
    /// The release.
    pub release: Release,
    /// What happened.
    pub action: HistoryAction,
    /// When.
    pub time: Time,
    /// Who (a person for approvals, `sluice` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The id of the person's request this entry records (approvals and rejections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// The per-stage view of the pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A sentence for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `stage:phase` for each stage, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// One entry per stage, in spec order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub stages: Vec<StageStatus>,
    /// Approvals given with `kubectl sluice approve` (written only by the plugin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["stage".into()]))]
    pub approvals: Vec<Approval>,
    /// Who promoted what, when and why. Bounded: the newest 50 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub history: Vec<HistoryEntry>,
    /// Standard conditions: `Ready` (every stage's Rollouts exist and belong to this Pipeline
    /// alone; its budgets exist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
