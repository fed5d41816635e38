//! The Rollout planner: given what the cluster looks like, what should it look like?
//!
//! Pure: the reconciler observes the world into an [`Observed`], folds new measurements into
//! its status (`runs`), calls [`plan`], and carries out the [`Plan`] in order.

use super::model::{Observed, Plan};
use super::{bluegreen, canary, policy};

/// Plans one reconcile: the ErrorBudget and Pipeline holds around the Rollout's strategy.
pub fn plan(o: &Observed) -> Plan {
    policy::plan(o, |seen| {
        match (&seen.spec.strategy.canary, &seen.spec.strategy.blue_green) {
            (None, Some(blue_green)) => bluegreen::plan(seen, blue_green),
            _ => canary::plan(seen),
        }
    })
}
