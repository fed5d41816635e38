//! `Notifier`: where Sluice tells people what happened (Slack, Microsoft Teams, PagerDuty, or
//! a CloudEvents webhook), and which transitions of which resources it tells them about.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SecretKeyRef;

/// "Tell #releases on Slack when a release in this namespace is promoted or aborted."
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "Notifier",
    namespaced,
    status = "NotifierStatus",
    shortname = "snt",
    category = "sluice",
    doc = "A Notifier sends the transitions of Rollouts, ErrorBudgets and Pipelines (release started, promoted, aborted, rolled back, budget phase changed, stage promoted, approved...) to one channel: a Slack or Microsoft Teams webhook, PagerDuty, or a CloudEvents webhook. It covers the resources of its own namespace; one in the operator's namespace with allNamespaces covers every namespace. Webhook URLs and keys are read from Secrets, never from the spec.",
    derive = "PartialEq",
    printcolumn(name = "Channel", type_ = "string", json_path = ".status.channel"),
    printcolumn(name = "Delivered", type_ = "integer", json_path = ".status.delivered"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(name = "Last", type_ = "date", json_path = ".status.lastDeliveredAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("[has(self.slack), has(self.teams), has(self.pagerDuty), has(self.webhook)].filter(c, c).size() == 1").message("a Notifier has exactly one channel: slack, teams, pagerDuty or webhook"))]
#[serde(rename_all = "camelCase")]
pub struct NotifierSpec {
    /// A Slack incoming webhook: its URL is in the Secret key named here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<WebhookChannel>,
    /// A Microsoft Teams workflow webhook (Adaptive Cards): its URL is in the Secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teams: Option<WebhookChannel>,
    /// PagerDuty Events API v2: triggers an alert on an abort, a rollback or an exhausted
    /// budget, and resolves it when the resource is healthy again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pager_duty: Option<PagerDutyChannel>,
    /// Any HTTP endpoint, sent CloudEvents 1.0 in structured JSON (CDEvents types where one
    /// fits: service deployed, service rolledback, incident detected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookChannel>,
    /// The transitions to send. Empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub events: Vec<NotificationEvent>,
    /// The kinds of resource to send about. Empty: all three.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub kinds: Vec<WatchedKind>,
    /// Only these resources (by name). Empty: every one of the kinds above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub names: Vec<String>,
    /// Cover every namespace, not only this Notifier's own. Honoured only for a Notifier in the
    /// operator's namespace (`sluice-system` by default), so that a namespace's users cannot
    /// subscribe to other namespaces' releases.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_namespaces: bool,
}

/// A webhook whose URL (which carries its credential) lives in a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookChannel {
    /// The Secret key (in the Notifier's namespace) that holds the webhook URL.
    pub url_secret_ref: SecretKeyRef,
}

/// PagerDuty Events API v2.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PagerDutyChannel {
    /// The Secret key (in the Notifier's namespace) that holds the integration's routing key.
    pub routing_key_secret_ref: SecretKeyRef,
    /// The Events API endpoint. Default: https://events.pagerduty.com/v2/enqueue (EU
    /// accounts: https://events.eu.pagerduty.com/v2/enqueue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
}

/// A transition people can subscribe to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum NotificationEvent {
    /// A Rollout started releasing a new revision.
    ReleaseStarted,
    /// A canary finished a step.
    StepReached,
    /// A release paused, waiting for a person (`kubectl sluice promote`).
    Paused,
    /// A release was promoted: the new revision is stable.
    Promoted,
    /// A release was aborted (by a person, by analysis with the values that decided it, or by
    /// an ErrorBudget): traffic is back on stable.
    Aborted,
    /// An ErrorBudget took a completed release back to the revision before it.
    RolledBack,
    /// An ErrorBudget's phase changed (Healthy, Warning, Frozen, Exhausted...).
    BudgetPhaseChanged,
    /// A person released a revision despite an ErrorBudget freeze.
    FreezeOverridden,
    /// An analysis was inconclusive or erred: the release pauses until a person decides.
    AnalysisInconclusive,
    /// A Pipeline admitted a release to a stage.
    StagePromoted,
    /// A release waits for a person's approval at a Pipeline stage.
    StageWaitingForApproval,
    /// An ErrorBudget gate holds a release at a Pipeline stage.
    StageFrozen,
    /// A person approved a release for a Pipeline stage.
    Approved,
    /// A person rejected a release for a Pipeline stage.
    Rejected,
    /// A Pipeline stage failed on a release.
    StageFailed,
}

/// The kinds a Notifier can cover.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum WatchedKind {
    Rollout,
    ErrorBudget,
    Pipeline,
}

/// What the Notifier delivered (written by Sluice).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifierStatus {
    /// The channel in use: Slack, Teams, PagerDuty or Webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Messages delivered since the Notifier was created.
    #[serde(default)]
    pub delivered: u64,
    /// Messages given up on after every retry failed (each one a Warning Event).
    #[serde(default)]
    pub failed: u64,
    /// When the last message was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivered_at: Option<Time>,
    /// The last transitions sent (at most 50, newest last): a restarted operator does not send
    /// them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<SentRecord>,
    /// `Ready`: the channel's Secret is readable and the last delivery worked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One transition sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SentRecord {
    /// The transition's key: the Event's uid and its count.
    pub key: String,
    /// What it was, e.g. `Aborted Rollout shop/checkout`.
    pub what: String,
    /// When it was sent (or given up on).
    pub at: Time,
    /// Whether it reached the channel.
    pub delivered: bool,
}
