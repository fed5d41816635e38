//! The plain data the Rollout planners work on: what the reconciler observed, and the plan
//! it must carry out. No behaviour beyond time arithmetic.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::events::Reason;
use crate::analysis::run::ResolvedAnalysis;
use crate::api::analysis::AnalysisRunStatus;
use crate::api::errorbudget::BudgetAction;
use crate::api::pipeline::Release;
use crate::api::rollout::{RolloutSpec, RolloutStatus, RoutedObject};
use crate::k8s::lanes::Lane;
use crate::traffic::{Targets, TrafficState};

/// A ReplicaSet of this Rollout as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedReplicaSet {
    pub hash: String,
    pub replicas: i32,
    pub ready: i32,
    pub available: i32,
    pub scale_down_at: Option<Timestamp>,
}

/// What the router reported.
#[derive(Clone, Debug, PartialEq)]
pub enum ObservedTraffic {
    /// No router: weight follows replica counts.
    None,
    State(TrafficState),
    /// The router's objects are missing or malformed.
    Failed(String),
}

/// A Service whose selector Sluice points at a revision (blue-green without a router).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedService {
    pub name: String,
    /// The revision its selector names; `None` when it names none.
    pub selects: Option<String>,
    /// False when the Service does not exist.
    pub exists: bool,
}

/// An object Sluice once marked, that the spec no longer names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedLeftover {
    pub object: RoutedObject,
    /// Whether it still carries the revision label (false also when it is gone).
    pub marked: bool,
}

/// An ErrorBudget that targets this Rollout and has a policy action in force.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetHold {
    /// `namespace/name` of the ErrorBudget.
    pub budget: String,
    pub action: BudgetAction,
    pub consumed_percent: Option<f64>,
    /// The `whenConsumed` threshold of the action.
    pub threshold: Option<i32>,
    /// How recent a completed release must be for `Rollback` to take it back.
    pub rollback_window: Duration,
}

impl BudgetHold {
    /// "ErrorBudget shop/checkout is 85.2% consumed (FreezePromotions at 80%)".
    pub fn describe(&self) -> String {
        let consumed = self.consumed_percent.map_or_else(
            || "not evaluable".to_string(),
            |c| format!("{c:.1}% consumed"),
        );
        let at = self
            .threshold
            .map_or(String::new(), |t| format!(" at {t}%"));
        format!(
            "ErrorBudget {} is {consumed} ({:?}{at})",
            self.budget, self.action
        )
    }
}

/// The budget actions in force on a release: the freeze (a `FreezePromotions` or a
/// `Rollback` threshold, which includes it) and the rollback.
pub fn budget_actions(budgets: &[BudgetHold]) -> (Option<BudgetHold>, Option<BudgetHold>) {
    let find =
        |wanted: fn(BudgetAction) -> bool| budgets.iter().find(|b| wanted(b.action)).cloned();
    (
        find(|a| a != BudgetAction::Notify),
        find(|a| a == BudgetAction::Rollback),
    )
}

/// The Pipeline stage a Rollout belongs to, as far as it decides when a release may start.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineGate {
    /// `namespace/name` of the Pipeline.
    pub pipeline: String,
    pub stage: String,
    /// The release the stage admitted (`None`: none yet).
    pub admitted: Option<Release>,
    /// What the stage waits for, in the Pipeline's words.
    pub waiting: Option<String>,
    /// Set when the Rollout is listed in more than one stage or Pipeline (they are named).
    pub conflict: Option<String>,
}

/// The world, as the reconciler saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    pub spec: RolloutSpec,
    pub status: RolloutStatus,
    /// Hash of `spec.template`.
    pub desired_hash: String,
    pub replica_sets: Vec<ObservedReplicaSet>,
    pub traffic: ObservedTraffic,
    /// The canary strategy's analyses, resolved (`None` for a blue-green Rollout).
    pub background: Option<ResolvedAnalysis>,
    /// Blue-green without a router: the active and preview Services, in that order.
    pub services: Vec<ObservedService>,
    /// ErrorBudgets targeting this Rollout whose policy freezes or rolls back.
    pub budgets: Vec<BudgetHold>,
    /// Objects in `status.routedObjects` that the spec no longer names.
    pub leftovers: Vec<ObservedLeftover>,
    /// The release the template declares (its images, sorted).
    pub release: Release,
    /// The Pipeline stage the Rollout is in, if any.
    pub pipeline: Option<PipelineGate>,
    /// The analysis runs as the cluster has them, when `status` may also hold measurements
    /// not written yet: passes kept from earlier reconciles, and those just taken (`None`:
    /// `status` is as recorded).
    pub recorded_runs: Option<Vec<AnalysisRunStatus>>,
    /// How long passing measurements may wait to be written
    /// (`--record-passes-within-seconds`; see `runs::passes_may_wait`). Zero: each at once.
    pub passes_wait: Duration,
    pub now: Timestamp,
}

/// A ReplicaSet as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSetIntent {
    pub hash: String,
    pub replicas: i32,
    /// When it will be scaled to zero (kept in an annotation so restarts keep the deadline).
    pub scale_down_at: Option<Timestamp>,
}

/// The traffic split as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficIntent {
    pub targets: Targets,
    pub canary_weight: i32,
}

/// One write to the objects that route traffic. The shell makes them in the order listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrafficWrite {
    /// Through the router: destinations pointed at `targets`, then the canary weight.
    Route {
        targets: Targets,
        canary_weight: i32,
    },
    /// A Service's selector pointed at a revision (blue-green without a router).
    Selector { service: String, revision: String },
    /// The revision label taken back from an object the Rollout no longer routes through.
    Release(RoutedObject),
}

/// A Kubernetes Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: Reason,
    pub message: String,
}

/// Which of a plan's status and traffic writes comes first (ReplicaSets that add pods come
/// before both, so traffic never reaches a revision without pods).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteOrder {
    /// The decision is recorded before traffic moves, so a crash in between leaves a status
    /// from which the next reconcile makes the same move.
    #[default]
    StatusFirst,
    /// Traffic moves before the decision is recorded, and the record then shows the weights
    /// just written as verified: traffic moves one write (a Rollout's status, the slowest)
    /// sooner. Only where a crash in between loses nothing the next reconcile would not
    /// decide again from the status as it was:
    /// - a person's abort, towards stable: the request stays unhandled in status until the
    ///   record lands (each kind of request has its own field manager, so no later request
    ///   erases it), so the same abort is planned again;
    /// - a step past timed pauses that ran out ([`Plan::stepped_by_clock`]): the pause's start
    ///   is in status and the clock only goes on, so the same pauses are passed again, and the
    ///   weight they lead to is the one already written. A measurement taken in the same
    ///   reconcile is then lost and taken again (it did not fail: the step would not have
    ///   moved);
    /// - a weight step counted done by the plan's own route write
    ///   ([`Plan::status_needs_traffic`]), after no step passed in the plan but timed pauses
    ///   that ran out and canary scales: the status as it was stands at that step or at such
    ///   steps before it, which the next plan passes again, and it completes the weight step
    ///   from the route it reads.
    TrafficFirst,
}

/// What the reconciler must do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// ReplicaSets to write before the status and the traffic: those that add pods the new
    /// split will send traffic to.
    pub replica_sets: Vec<ReplicaSetIntent>,
    /// ReplicaSets to write after the traffic moved: those that add no pods (a scale-down
    /// deadline, fewer replicas). Traffic leaving a revision never waits for them.
    pub replica_sets_after_traffic: Vec<ReplicaSetIntent>,
    /// The traffic split wanted (`None` without a router).
    pub traffic: Option<TrafficIntent>,
    /// The writes that get traffic there, in order (empty when it is already there).
    pub traffic_writes: Vec<TrafficWrite>,
    /// The status to record, with any analysis runs started by this plan. It is written
    /// before the traffic moves (unless `order` says otherwise), so a crash in between
    /// repeats the same move.
    pub status: RolloutStatus,
    /// Whether the status or the traffic is written first.
    pub order: WriteOrder,
    /// The lane of the status write (`k8s::lanes`): what waits on it.
    pub status_lane: Lane,
    /// The status adds only passing measurements that may wait (`runs::passes_may_wait`):
    /// not written now, but kept for the next write.
    pub status_waits: bool,
    /// Every step this plan passed was a timed pause that ran out (not a promote, a weight
    /// reached or an analysis), and at least one was.
    pub stepped_by_clock: bool,
    /// The status counts a weight step done by this plan's own route write (written traffic
    /// first): it is written only if every traffic write succeeds. A route refused as
    /// misconfigured leaves the status as it was, and the next reconcile plans from the
    /// refusal it then observes.
    pub status_needs_traffic: bool,
    pub events: Vec<PlannedEvent>,
    pub requeue_after: Duration,
    /// The revision that became stable in this plan (for the release-duration metric).
    pub promoted: Option<String>,
}

#[cfg(test)]
impl Plan {
    /// Every ReplicaSet write, before and after the traffic.
    pub fn replica_set_writes(&self) -> Vec<ReplicaSetIntent> {
        self.replica_sets
            .iter()
            .chain(&self.replica_sets_after_traffic)
            .cloned()
            .collect()
    }
}

pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}
