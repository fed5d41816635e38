//! The Rollout planner: given what the cluster looks like, what should it look like?
//!
//! Pure: the reconciler observes the world into an [`Observed`], folds new measurements into
//! its status (`runs`), calls [`plan`], and carries out the [`Plan`] in order.

use super::model::{Observed, Plan};
use super::{bluegreen, canary};

/// Plans one reconcile with the Rollout's strategy.
pub fn plan(o: &Observed) -> Plan {
    match (&o.spec.strategy.canary, &o.spec.strategy.blue_green) {
        (None, Some(blue_green)) => bluegreen::plan(o, blue_green),
        _ => canary::plan(o),
    }
}
