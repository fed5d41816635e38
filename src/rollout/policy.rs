//! What ErrorBudgets and Pipelines do around either strategy planner.
//!
//! - A Pipeline stage holds a new release on stable until it admits it.
//! - A freeze holds a new revision on stable, unless a person overrode it for that revision
//!   (an override lifts the freeze, not a Rollback threshold).
//! - A rollback takes a release that completed within the budget's rollback window back to
//!   the revision before it, without editing the spec: the old revision is scaled up, traffic
//!   moves once its pods are available, and the template's revision is not released again
//!   until the template changes or a person retries.
//!
//! What a budget does to a release in flight (steps held, the release aborted, a blue-green
//! switch taken back) belongs to the strategy planners, which know what "in flight" means.
//!
//! Pure. This module decides which revision the strategy planner is asked to run (the
//! template's, or stable's while the template is held or rolled back), then adjusts its plan.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::events::Reason;
use super::model::{
    Observed, Plan, PlannedEvent, ReplicaSetIntent, TrafficWrite, add, budget_actions, until,
};
use super::release::{
    DEFAULT_SCALE_DOWN_DELAY, pause_for, record_counts, record_phase, scale_down_later, unhandled,
};
use crate::api::errorbudget::BudgetAction;
use crate::api::rollout::{BudgetRollback, FreezeOverride, PauseReason, Promotion, RolloutPhase};

/// The rollback window when the policy sets none.
pub const DEFAULT_ROLLBACK_WINDOW: Duration = Duration::from_secs(3600);

fn event(events: &mut Vec<PlannedEvent>, warning: bool, reason: Reason, message: String) {
    events.push(PlannedEvent {
        warning,
        reason,
        message,
    });
}

fn available(o: &Observed, hash: &str) -> i32 {
    o.replica_sets
        .iter()
        .find(|r| r.hash == hash)
        .map_or(0, |r| r.available)
}

/// Plans one reconcile: the budget policy around `strategy`.
pub fn plan(o: &Observed, strategy: impl Fn(&Observed) -> Plan) -> Plan {
    // The first revision has nothing to hold it against or roll back to.
    let Some(stable) = o.status.stable_revision.clone() else {
        return strategy(o);
    };
    let replicas = o.spec.replicas.unwrap_or(1).max(0);
    let intents = unhandled(&o.status);
    let mut seen = o.clone();
    let mut handled = seen.status.handled_intents.clone().unwrap_or_default();
    let mut events = Vec::new();

    // A person's override releases one revision despite the budget (the SRE policy's
    // exception for P0 and security fixes); it lasts while the template declares it.
    let (freeze, _) = budget_actions(&o.budgets);
    if let Some(id) = intents.override_freeze.clone() {
        handled.override_freeze = Some(id);
        if freeze.is_some() && o.desired_hash != stable {
            let intent = o.status.override_freeze.clone();
            let by = intent.as_ref().and_then(|i| i.requested_by.clone());
            let why = intent.as_ref().and_then(|i| i.reason.clone());
            event(
                &mut events,
                true,
                Reason::FreezeOverridden,
                format!(
                    "{} released {} despite the error budget: {}",
                    by.as_deref().unwrap_or("a user"),
                    o.desired_hash,
                    why.as_deref().unwrap_or("no reason given")
                ),
            );
            seen.status.freeze_override = Some(FreezeOverride {
                revision: o.desired_hash.clone(),
                requested_by: by,
                reason: why,
                at: Time(o.now),
            });
        }
    }
    if seen
        .status
        .freeze_override
        .as_ref()
        .is_some_and(|f| f.revision != o.desired_hash)
    {
        seen.status.freeze_override = None;
    }
    // An override lifts a freeze only: above a Rollback threshold the service is burning its
    // budget, and a release is still aborted (fail safe).
    if seen.status.freeze_override.is_some() {
        seen.budgets.retain(|b| b.action == BudgetAction::Rollback);
    }
    let freeze = freeze.filter(|_| seen.status.freeze_override.is_none());

    // A rollback in force ends when the template changes or a person retries; otherwise a
    // Rollback threshold takes back a release that completed within the window.
    if let Some(rolled_back) = seen.status.budget_rollback.clone() {
        if let Some(id) = intents.retry.clone() {
            handled.retry = Some(id);
            seen.status.budget_rollback = None;
            event(
                &mut events,
                false,
                Reason::Retried,
                format!(
                    "{} may be released again (rolled back by ErrorBudget {})",
                    rolled_back.revision, rolled_back.budget
                ),
            );
        } else if o.desired_hash != rolled_back.revision {
            seen.status.budget_rollback = None;
        }
    } else if let Some(hold) = seen
        .budgets
        .iter()
        .find(|b| b.action == BudgetAction::Rollback)
        && seen.status.canary_revision.is_none()
        && seen.status.previous_revision.is_none()
        && o.desired_hash == stable
        && let Some(last) = seen.status.last_promotion.clone()
        && last.revision == stable
        && o.now < add(last.at.0, hold.rollback_window)
        && o.replica_sets.iter().any(|r| r.hash == last.previous)
    {
        let ago = until(last.at.0, o.now).as_secs();
        event(
            &mut events,
            true,
            Reason::RolledBackByErrorBudget,
            format!(
                "{}: {stable}, released {ago}s ago, is rolled back to {}",
                hold.describe(),
                last.previous
            ),
        );
        seen.status.budget_rollback = Some(BudgetRollback {
            revision: stable.clone(),
            to: last.previous.clone(),
            budget: hold.budget.clone(),
            reason: hold.describe(),
            at: Time(o.now),
        });
        seen.status.last_promotion = None;
    }

    // While rolled back, the strategy runs the revision rolled back to. Until its pods are
    // available the rolled-back revision keeps serving; then stable moves in one step.
    let mut moved = false;
    let mut restoring = None;
    if let Some(rolled_back) = seen.status.budget_rollback.clone() {
        if seen.status.stable_revision.as_deref() == Some(rolled_back.revision.as_str()) {
            if available(o, &rolled_back.to) >= replicas {
                seen.status.stable_revision = Some(rolled_back.to.clone());
                seen.status.previous_revision = None;
                seen.status.blue_green = None;
                moved = true;
            } else {
                restoring = Some(rolled_back.clone());
            }
        }
        seen.desired_hash = seen
            .status
            .stable_revision
            .clone()
            .unwrap_or_else(|| stable.clone());
    }

    // What holds a revision that is not yet being released on stable: a Pipeline stage that
    // has not admitted it (or a Rollout claimed twice), and a freeze. The freeze goes last, so
    // when both hold, its message (with the way out) is the one shown.
    let since = |pause: PauseReason| {
        o.status
            .pause_conditions
            .iter()
            .find(|c| c.reason == pause)
            .map(|c| c.start_time.clone())
    };
    let frozen_since = since(PauseReason::BudgetFreeze);
    let mut holds = Vec::new();
    let not_in_flight = seen.status.budget_rollback.is_none()
        && o.desired_hash != stable
        && o.status.canary_revision.as_deref() != Some(o.desired_hash.as_str());
    if not_in_flight && let Some(why) = pipeline_wait(o) {
        holds.push(Hold {
            pause: PauseReason::PipelineGate,
            since: since(PauseReason::PipelineGate),
            warning: false,
            reason: Reason::HeldByPipeline,
            event: format!("release of {} held on stable: {why}", o.desired_hash),
            message: format!(
                "release of {} held on stable {stable}: {why}",
                o.desired_hash
            ),
        });
    }
    if not_in_flight && let Some(freeze) = &freeze {
        let superseding = o
            .status
            .canary_revision
            .as_ref()
            .map_or(String::new(), |c| {
                format!("; the release of {c} is cancelled")
            });
        holds.push(Hold {
            pause: PauseReason::BudgetFreeze,
            since: frozen_since.clone(),
            warning: true,
            reason: Reason::FrozenByErrorBudget,
            event: format!(
                "release of {} held on stable: {}{superseding}",
                o.desired_hash,
                freeze.describe()
            ),
            message: format!(
                "release of {} held on stable {stable}: {}; `kubectl sluice promote --override-freeze --reason TEXT` releases it anyway",
                o.desired_hash,
                freeze.describe()
            ),
        });
    }
    seen.status
        .pause_conditions
        .retain(|c| c.reason != PauseReason::BudgetFreeze && c.reason != PauseReason::PipelineGate);
    for hold in &holds {
        if hold.since.is_none() {
            event(&mut events, hold.warning, hold.reason, hold.event.clone());
        }
        seen.desired_hash = stable.clone();
    }
    seen.status.handled_intents = Some(handled);

    let mut plan = strategy(&seen);

    // A freeze pause keeps its first start time.
    if let (Some(since), Some(pause)) = (
        frozen_since.clone(),
        plan.status
            .pause_conditions
            .iter_mut()
            .find(|c| c.reason == PauseReason::BudgetFreeze),
    ) {
        pause.start_time = since;
    }
    let rephase = |plan: &mut Plan, phase: RolloutPhase, message: String, reason: &'static str| {
        let serving = plan.status.stable_revision.clone().unwrap_or_default();
        plan.status.phase = o.status.phase;
        record_phase(
            &mut plan.status,
            &mut plan.events,
            (phase, message),
            reason,
            ("stable", available(o, &serving), replicas),
            o,
        );
    };
    for hold in &holds {
        // The strategy saw no new revision; "template back to stable" is not what happened.
        plan.events.retain(|e| e.reason != Reason::ReleaseCancelled);
        let since = hold.since.as_ref().map_or(o.now, |t| t.0);
        pause_for(&mut plan.status, hold.pause, since);
        rephase(
            &mut plan,
            RolloutPhase::Paused,
            hold.message.clone(),
            "ReleasePaused",
        );
    }
    if let Some(rolled_back) = &restoring {
        let to = &rolled_back.to;
        plan.replica_sets.retain(|r| &r.hash != to);
        plan.replica_sets.push(ReplicaSetIntent {
            hash: to.clone(),
            replicas,
            scale_down_at: None,
        });
        let message = format!(
            "rolling back from {} to {to} ({}): {}/{replicas} pods of {to} available; traffic moves once they are",
            rolled_back.revision,
            rolled_back.reason,
            available(o, to)
        );
        rephase(
            &mut plan,
            RolloutPhase::Progressing,
            message,
            "RollingBackByErrorBudget",
        );
    } else if let Some(rolled_back) = &plan.status.budget_rollback.clone() {
        let mut wakeups = Vec::new();
        let bad = rolled_back.revision.clone();
        plan.replica_sets.retain(|r| r.hash != bad);
        if let Some(rs) = o.replica_sets.iter().find(|r| r.hash == bad) {
            plan.replica_sets.push(scale_down_later(
                rs,
                o.now,
                DEFAULT_SCALE_DOWN_DELAY,
                &mut wakeups,
            ));
        }
        if moved && let Some(intent) = &plan.traffic {
            // The router was observed against the old stable: write the move explicitly.
            plan.traffic_writes
                .retain(|w| !matches!(w, TrafficWrite::Route { .. }));
            plan.traffic_writes.insert(
                0,
                TrafficWrite::Route {
                    targets: intent.targets.clone(),
                    canary_weight: intent.canary_weight,
                },
            );
        }
        let message = format!(
            "rolled back from {bad} to {} ({}); {bad} is not released again until the template changes or `kubectl sluice retry`",
            rolled_back.to, rolled_back.reason
        );
        rephase(
            &mut plan,
            RolloutPhase::Degraded,
            message,
            "RolledBackByErrorBudget",
        );
        for at in wakeups {
            plan.requeue_after = plan.requeue_after.min(until(o.now, at));
        }
    }
    if let Some(revision) = plan.promoted.clone() {
        plan.status.last_promotion = Some(Promotion {
            revision,
            previous: stable.clone(),
            at: Time(o.now),
        });
    }
    record_counts(&mut plan.status, o);
    events.append(&mut plan.events);
    plan.events = events;
    plan
}

/// Something that keeps the template's new revision on stable: a pause condition that keeps
/// its first start, an Event when it begins, and the Rollout Paused with a message.
struct Hold {
    pause: PauseReason,
    /// When the pause began, if it did before this reconcile.
    since: Option<Time>,
    warning: bool,
    reason: Reason,
    event: String,
    message: String,
}

/// Why the Rollout's Pipeline stage does not let the template's release start, if it does not.
fn pipeline_wait(o: &Observed) -> Option<String> {
    let gate = o.pipeline.as_ref()?;
    if let Some(conflict) = &gate.conflict {
        return Some(format!(
            "listed in more than one Pipeline stage ({conflict}); a Rollout belongs to one stage"
        ));
    }
    if gate.admitted.as_ref() == Some(&o.release) {
        return None;
    }
    Some(format!(
        "Pipeline {} has not admitted {} to stage {} ({})",
        gate.pipeline,
        crate::pipeline::plan::describe(&o.release),
        gate.stage,
        gate.waiting.as_deref().unwrap_or("not evaluated yet")
    ))
}
