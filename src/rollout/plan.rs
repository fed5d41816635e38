//! The Rollout planner: given what the cluster looks like, what should it look like?
//!
//! Pure: the reconciler observes the world into an [`Observed`], folds new measurements into
//! its status (`runs`), calls [`plan`], and carries out the [`Plan`] in order.

use super::canary::OwnWrite;
use super::model::{Observed, ObservedTraffic, Plan, ReplicaSetIntent, TrafficWrite, WriteOrder};
use super::release::unhandled;
use super::{bluegreen, canary, policy, runs, steps};
use crate::api::rollout::{HandledIntents, RolloutStatus, TrafficWeights};
use crate::k8s::lanes::Lane;

/// Plans one reconcile: the ErrorBudget and Pipeline holds around the Rollout's strategy.
pub fn plan(o: &Observed) -> Plan {
    let strategy = |own_write: OwnWrite| {
        policy::plan(o, |seen| {
            match (&seen.spec.strategy.canary, &seen.spec.strategy.blue_green) {
                (None, Some(blue_green)) => bluegreen::plan(seen, blue_green),
                _ => canary::plan(seen, own_write),
            }
        })
    };
    // A request pending (the policy hands the strategy its own requests as handled) keeps
    // the status first, so no step may count on a route write made after it.
    let own_write = if unhandled(&o.status).is_empty() {
        OwnWrite::MayPass
    } else {
        OwnWrite::Never
    };
    let mut plan = order_writes(o, strategy(own_write));
    plan.order = write_order(o, &plan);
    if plan.status_needs_traffic && plan.order != WriteOrder::TrafficFirst {
        // Not reached by the conditions the canary planner checks; should they ever part
        // from `write_order`, the step waits for its route rather than be recorded first.
        plan = order_writes(o, strategy(OwnWrite::Never));
        plan.order = write_order(o, &plan);
    }
    plan.status_lane = status_lane(o, &plan);
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
/// weight step the plan counts done by its own route write; status first otherwise. An abort
/// by analysis or by a budget is not a request that waits in status, so a crash after its
/// traffic write would lose the decision: it keeps the status first. So does a step that also
/// handles a request (a promote), starts or ends a release, or promotes: those are not all
/// decided again the same way.
fn write_order(o: &Observed, plan: &Plan) -> WriteOrder {
    if plan.traffic_writes.is_empty() {
        return WriteOrder::StatusFirst;
    }
    let handles_an_abort = handled(&plan.status).abort.is_some()
        && handled(&plan.status).abort != handled(&o.status).abort
        && plan.status.aborted_at.is_some();
    let only_towards_stable = plan.traffic_writes.iter().all(|w| match w {
        TrafficWrite::Route { canary_weight, .. } => *canary_weight == 0,
        TrafficWrite::Selector { .. } | TrafficWrite::Release(_) => true,
    });
    let timed_step = (plan.stepped_by_clock || plan.status_needs_traffic)
        && handled(&plan.status) == handled(&o.status)
        && plan.status.aborted_at.is_none()
        && plan.status.canary_revision == o.status.canary_revision
        && plan.promoted.is_none();
    if (handles_an_abort && only_towards_stable) || timed_step {
        WriteOrder::TrafficFirst
    } else {
        WriteOrder::StatusFirst
    }
}

/// What waits on the status write, and so its lane. Written before a route moves, or to carry
/// out a person's request, a moving release waits on it now: `Urgent`. A status that starts a
/// timed pause records the moment the pause counts from, and the next step comes late if the
/// record lands after the pause ran out: `Progress`, which has a deadline and goes first
/// within its share. Any other status that starts a step holds its Rollout's next reconcile
/// (a person's abort would wait for it): `Usual`. Any other status written after its route
/// only records what the cluster already shows: `Record`, which gives way to the routes still
/// moving. Anything else (a measurement, the pods' counts, a release ended): `Usual`.
fn status_lane(o: &Observed, plan: &Plan) -> Lane {
    let handles_a_request = handled(&plan.status) != handled(&o.status);
    let starts_a_step = plan.status.current_step_started_at.is_some()
        && plan.status.current_step_started_at != o.status.current_step_started_at;
    let timed_pause = o
        .spec
        .strategy
        .canary
        .as_ref()
        .zip(plan.status.current_step_index)
        .is_some_and(|(canary, index)| {
            let steps = steps::effective(&canary.steps);
            let step = usize::try_from(index).ok().and_then(|i| steps.get(i));
            matches!(step, Some(steps::Step::Pause(Some(_))))
        });
    match plan.order {
        WriteOrder::StatusFirst if !plan.traffic_writes.is_empty() || handles_a_request => {
            Lane::Urgent
        }
        _ if starts_a_step && timed_pause => Lane::Progress,
        _ if starts_a_step => Lane::Usual,
        WriteOrder::TrafficFirst => Lane::Record,
        WriteOrder::StatusFirst => Lane::Usual,
    }
}

/// The requests a status records as handled ("none recorded" is "none handled").
fn handled(status: &RolloutStatus) -> HandledIntents {
    status.handled_intents.clone().unwrap_or_default()
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
