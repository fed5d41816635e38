//! The Rollout planner: given what the cluster looks like, what should it look like?
//!
//! Pure: the reconciler observes the world into an [`Observed`], folds new measurements into
//! its status (`runs`), calls [`plan`], and carries out the [`Plan`] in order.

use super::model::{Observed, Plan, ReplicaSetIntent};
use super::{bluegreen, canary, policy};

/// Plans one reconcile: the ErrorBudget and Pipeline holds around the Rollout's strategy.
pub fn plan(o: &Observed) -> Plan {
    let plan = policy::plan(o, |seen| {
        match (&seen.spec.strategy.canary, &seen.spec.strategy.blue_green) {
            (None, Some(blue_green)) => bluegreen::plan(seen, blue_green),
            _ => canary::plan(seen),
        }
    });
    order_writes(o, plan)
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
