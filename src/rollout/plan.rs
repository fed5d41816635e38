//! The Rollout planner: given what the cluster looks like, what should it look like?
//!
//! Pure: the reconciler observes the world into an [`Observed`], folds new measurements into
//! its status (`runs`), calls [`plan`], and carries out the [`Plan`] in order.

use super::model::{Observed, Plan, TrafficWrite, WriteOrder};
use super::{bluegreen, canary, policy};
use crate::api::rollout::RolloutStatus;

/// Plans one reconcile: the ErrorBudget and Pipeline holds around the Rollout's strategy.
pub fn plan(o: &Observed) -> Plan {
    let mut plan = policy::plan(o, |seen| {
        match (&seen.spec.strategy.canary, &seen.spec.strategy.blue_green) {
            (None, Some(blue_green)) => bluegreen::plan(seen, blue_green),
            _ => canary::plan(seen),
        }
    });
    plan.order = write_order(o, &plan);
    plan
}

/// Traffic first only when the plan carries out a person's abort and its traffic writes
/// send no weight to a canary (see [`WriteOrder::TrafficFirst`]); status first otherwise.
/// An abort by analysis or by a budget is not a request that waits in status, so a crash
/// after its traffic write would lose the decision: it keeps the status first.
fn write_order(o: &Observed, plan: &Plan) -> WriteOrder {
    let abort_handled =
        |s: &RolloutStatus| s.handled_intents.as_ref().and_then(|h| h.abort.clone());
    let handles_an_abort = abort_handled(&plan.status).is_some()
        && abort_handled(&plan.status) != abort_handled(&o.status)
        && plan.status.aborted_at.is_some();
    let only_towards_stable = plan.traffic_writes.iter().all(|w| match w {
        TrafficWrite::Route { canary_weight, .. } => *canary_weight == 0,
        TrafficWrite::Selector { .. } | TrafficWrite::Release(_) => true,
    });
    if handles_an_abort && only_towards_stable && !plan.traffic_writes.is_empty() {
        WriteOrder::TrafficFirst
    } else {
        WriteOrder::StatusFirst
    }
}
