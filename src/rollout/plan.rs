//! The Rollout planner: given what the cluster looks like, what should it look like?
//!
//! Pure: the reconciler observes the world into an [`Observed`], folds new measurements into
//! its status (`runs`), calls [`plan`], and carries out the [`Plan`] in order.

use super::model::{Observed, ObservedTraffic, Plan, ReplicaSetIntent, TrafficWrite, WriteOrder};
use super::steps::{self, Step};
use super::{bluegreen, canary, policy, runs};
use crate::api::rollout::{RolloutStatus, TrafficWeights};
use crate::traffic::TrafficState;

/// Plans one reconcile: the ErrorBudget and Pipeline holds around the Rollout's strategy.
pub fn plan(o: &Observed) -> Plan {
    pass_the_weight_written(o, plan_once(o))
}

/// A route written before its status ([`WriteOrder::TrafficFirst`]: a timed step, or the
/// weight of the step recorded) is, once the router has taken it, where the plan put it. A
/// step that then waits only for that weight (a `setWeight`, its pods available) is passed in
/// the same plan, from the world as it will be: its status write carries both steps, where
/// the next reconcile, woken by the watch showing the route, wrote a second status (the
/// costliest write while releases run). A timed pause that follows starts as the route is
/// written, not once the watch shows it. Folded only when the step adds no write of its own (no route, no ReplicaSet, no
/// request handled, no promotion); `unfolded` keeps the plan without it, for a route write
/// the router refuses. Restart-safe as the route-first order is: a stop after the route write
/// leaves the status as it was, from which the same steps are passed again.
fn pass_the_weight_written(o: &Observed, plan: Plan) -> Plan {
    let (WriteOrder::TrafficFirst, None, Some(traffic), ObservedTraffic::State(_)) = (
        plan.order,
        plan.status.aborted_at.as_ref(),
        plan.traffic.as_ref(),
        &o.traffic,
    ) else {
        return plan;
    };
    let routed = Observed {
        traffic: ObservedTraffic::State(TrafficState {
            canary_weight: Some(traffic.canary_weight),
            targets_match: true,
        }),
        status: plan.status.clone(),
        recorded_runs: None,
        ..o.clone()
    };
    let next = plan_once(&routed);
    let sorted = |mut writes: Vec<ReplicaSetIntent>| {
        writes.sort_by(|a, b| a.hash.cmp(&b.hash));
        writes
    };
    let handled = |s: &RolloutStatus| s.handled_intents.clone().unwrap_or_default();
    let adds_nothing = next.traffic_writes.is_empty()
        && sorted(next.replica_set_writes()) == sorted(plan.replica_set_writes())
        && handled(&next.status) == handled(&plan.status)
        && next.status.aborted_at == plan.status.aborted_at
        && next.status.canary_revision == plan.status.canary_revision
        && next.promoted.is_none();
    if !adds_nothing || next.status.current_step_index == plan.status.current_step_index {
        return plan;
    }
    let mut events = plan.events.clone();
    events.extend(next.events);
    Plan {
        status: next.status,
        events,
        requeue_after: next.requeue_after,
        unfolded: Some(Box::new(plan.clone())),
        ..plan
    }
}

/// One plan, from the world as observed.
fn plan_once(o: &Observed) -> Plan {
    let plan = policy::plan(o, |seen| {
        match (&seen.spec.strategy.canary, &seen.spec.strategy.blue_green) {
            (None, Some(blue_green)) => bluegreen::plan(seen, blue_green),
            _ => canary::plan(seen),
        }
    });
    let mut plan = order_writes(o, plan);
    plan.order = write_order(o, &plan);
    // Only through a router that was read fine: the weights it records are then those the
    // route writes set (a write refused as misconfigured clears `verified` in the shell).
    let routed = plan
        .traffic_writes
        .iter()
        .any(|w| matches!(w, TrafficWrite::Route { .. }));
    if plan.order == WriteOrder::TrafficFirst
        && routed
        && matches!(o.traffic, ObservedTraffic::State(_))
        && let Some(traffic) = &plan.traffic
    {
        // Recorded once the route writes succeeded: the weights are those just written.
        plan.status.weights = Some(TrafficWeights {
            stable: 100 - traffic.canary_weight,
            canary: traffic.canary_weight,
            verified: Some(true),
        });
    }
    plan.status_waits = passes_may_wait(o, &plan);
    plan
}

/// Whether the plan's status adds to the one recorded nothing but passing measurements that
/// may wait for the next write (`runs::passes_may_wait`). Such passes decide nothing, so the
/// plan is the one the recorded status gives: its ReplicaSets (each planned every time, and
/// written only when off) need no new record. A plan that moves traffic or has an Event to
/// tell writes its status, passes and all.
fn passes_may_wait(o: &Observed, plan: &Plan) -> bool {
    let recorded = RolloutStatus {
        analysis_runs: o
            .recorded_runs
            .clone()
            .unwrap_or_else(|| o.status.analysis_runs.clone()),
        ..o.status.clone()
    };
    plan.traffic_writes.is_empty()
        && plan.events.is_empty()
        && runs::passes_may_wait(
            &recorded,
            &plan.status,
            &o.spec.strategy,
            o.background.as_ref(),
            o.now,
            o.passes_wait,
        )
}

/// Traffic first (see [`WriteOrder::TrafficFirst`]) for a person's abort whose traffic
/// writes send no weight to a canary, for a step past timed pauses that ran out, and for a
/// route to the weight of the step recorded; status first otherwise. An abort by analysis or by a budget is not a request that waits in
/// status, so a crash after its traffic write would lose the decision: it keeps the status
/// first. So does a step that also handles a request (a promote), starts or ends a release,
/// or promotes: those are not all decided again the same way.
fn write_order(o: &Observed, plan: &Plan) -> WriteOrder {
    if plan.traffic_writes.is_empty() {
        return WriteOrder::StatusFirst;
    }
    let handled = |s: &RolloutStatus| s.handled_intents.clone().unwrap_or_default();
    let handles_an_abort = handled(&plan.status).abort.is_some()
        && handled(&plan.status).abort != handled(&o.status).abort
        && plan.status.aborted_at.is_some();
    let only_towards_stable = plan.traffic_writes.iter().all(|w| match w {
        TrafficWrite::Route { canary_weight, .. } => *canary_weight == 0,
        TrafficWrite::Selector { .. } | TrafficWrite::Release(_) => true,
    });
    let same_release = handled(&plan.status) == handled(&o.status)
        && plan.status.aborted_at.is_none()
        && plan.status.canary_revision == o.status.canary_revision
        && plan.promoted.is_none();
    let timed_step = plan.stepped_by_clock && same_release;
    if (handles_an_abort && only_towards_stable)
        || timed_step
        || (same_release && routes_to_the_recorded_step(o, plan))
    {
        WriteOrder::TrafficFirst
    } else {
        WriteOrder::StatusFirst
    }
}

/// The plan passes no step and only routes to the weight of the `setWeight` step the recorded
/// status stands at (its pods are available, or the plan would not route there). The next
/// reconcile decides the same from the status as it was, so a stop after the route write
/// loses nothing, and the route need not wait for a status write.
pub(super) fn routes_to_the_recorded_step(o: &Observed, plan: &Plan) -> bool {
    let Some(index) = o
        .status
        .current_step_index
        .and_then(|i| usize::try_from(i).ok())
    else {
        return false;
    };
    let steps = steps::effective(
        o.spec
            .strategy
            .canary
            .as_deref()
            .map_or(&[], |c| c.steps.as_slice()),
    );
    let Some(Step::SetWeight(weight)) = steps.get(index) else {
        return false;
    };
    o.status.canary_revision.is_some()
        && o.spec.strategy.blue_green.is_none()
        && plan.status.current_step_index == o.status.current_step_index
        && !plan.traffic_writes.is_empty()
        && plan.traffic_writes.iter().all(
            |w| matches!(w, TrafficWrite::Route { canary_weight, .. } if canary_weight == weight),
        )
}

/// When each ReplicaSet is written, relative to the traffic. Pods must exist before traffic
/// goes to them, so a ReplicaSet that is new or gains replicas is written first. One that
/// gains none only schedules or makes a scale-down of pods the new split no longer sends to,
/// so it waits until the traffic has moved: an abort's weight change then waits for no
/// ReplicaSet write (the canary's, a whole-object apply, was an abort's slowest request).
/// Without a traffic write the order does not matter, and all go first as before.
fn order_writes(o: &Observed, mut plan: Plan) -> Plan {
    if plan.traffic_writes.is_empty() {
        return plan;
    }
    let adds_pods = |intent: &ReplicaSetIntent| {
        o.replica_sets
            .iter()
            .find(|rs| rs.hash == intent.hash)
            .is_none_or(|rs| intent.replicas > rs.replicas)
    };
    let (first, after) = std::mem::take(&mut plan.replica_sets)
        .into_iter()
        .partition(adds_pods);
    plan.replica_sets = first;
    plan.replica_sets_after_traffic.extend(after);
    plan
}
