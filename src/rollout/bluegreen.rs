//! The blue-green planner: the new revision comes up beside the active one, is checked, and
//! takes all traffic at once; a failing post-promotion analysis switches straight back.
//!
//! Pure, like the canary planner. The phases live in status:
//! - `canaryRevision` set: the new revision is in preview (`currentStepStartedAt`: when it
//!   became ready, for auto-promotion);
//! - `previousRevision` set: the switch happened (`currentStepStartedAt`: when), and the old
//!   revision stays up for an instant rollback.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

use super::events::Reason;
use super::model::{
    Observed, ObservedTraffic, Plan, PlannedEvent, ReplicaSetIntent, TrafficIntent, TrafficWrite,
    WriteOrder, add, budget_actions,
};
use super::release::{
    DEFAULT_SCALE_DOWN_DELAY, TemplateChange, abort, first_revision, follow_template, pause_for,
    paused_by_person, progress_deadline, record_counts, record_phase, reset, route_writes,
    run_phase, schedule, take_back, unhandled,
};
use super::runs::RunName;
use crate::api::analysis::AnalysisPhase;
use crate::api::rollout::{
    BlueGreenStatus, BlueGreenStrategy, HandledIntents, PauseCondition, PauseReason, RolloutPhase,
    RolloutStatus, TrafficWeights,
};
use crate::conditions;
use crate::k8s::lanes::Lane;
use crate::traffic::Targets;
use k8s_openapi::jiff::Timestamp;

/// An analysis that could not decide: a person's promote starts it again; otherwise the
/// rollout pauses (never promotes, never rolls back on that alone).
fn restart_or_pause(
    status: &mut RolloutStatus,
    handled: &mut HandledIntents,
    start_runs: &mut Vec<(RunName, String)>,
    promote: &Option<String>,
    (run, revision): (RunName, &str),
    now: Timestamp,
) {
    if let Some(id) = promote.clone() {
        handled.promote = Some(id);
        start_runs.push((run, revision.to_string()));
    } else {
        pause_for(status, PauseReason::InconclusiveAnalysis, now);
    }
}

fn note(events: &mut Vec<PlannedEvent>, warning: bool, reason: Reason, message: String) {
    events.push(PlannedEvent {
        warning,
        reason,
        message,
    });
}

/// Plans one reconcile of a blue-green Rollout.
pub fn plan(o: &Observed, bg: &BlueGreenStrategy) -> Plan {
    let replicas = o.spec.replicas.unwrap_or(1).max(0);
    let intents = unhandled(&o.status);
    let mut status = o.status.clone();
    let mut handled = status.handled_intents.clone().unwrap_or_default();
    let mut events = Vec::new();
    let mut start_runs = Vec::new();
    let mut wakeups = Vec::new();
    let available = |hash: &str| {
        o.replica_sets
            .iter()
            .find(|r| r.hash == hash)
            .map_or(0, |r| r.available)
    };
    let scale_down_delay = bg
        .scale_down_delay
        .as_ref()
        .map_or(DEFAULT_SCALE_DOWN_DELAY, |d| d.as_std());
    status.observed_generation = o.generation;
    let mut bgs = status.blue_green.take().unwrap_or_default();

    let mut stable = first_revision(&mut status, &mut events, o, "active");

    // A new template: preview it; the template back at the active revision cancels the preview.
    match follow_template(&mut status, &mut events, o, (&stable, "active")) {
        Some(TemplateChange::Release(_)) => {
            if let Some(previous) = status.previous_revision.take() {
                // A new release ends the last one's rollback window.
                note(
                    &mut events,
                    false,
                    Reason::PreviousScaledDown,
                    format!("{previous} scaled down: a new release started"),
                );
            }
            bgs = BlueGreenStatus {
                preview_started_at: Some(MicroTime(o.now)),
                ..BlueGreenStatus::default()
            };
        }
        Some(TemplateChange::Cancel) => bgs = BlueGreenStatus::default(),
        None => {}
    }

    if let Some(id) = intents.retry.clone() {
        handled.retry = Some(id);
        if status.aborted_at.is_some()
            && let Some(preview) = status.canary_revision.clone()
        {
            reset(&mut status, Some(preview), o);
            bgs.promotion_requested = None;
            bgs.preview_started_at = Some(MicroTime(o.now));
            note(
                &mut events,
                false,
                Reason::Retried,
                "preview started again".into(),
            );
        }
    }

    // ErrorBudget policy in flight: a freeze holds the promotion, a rollback aborts the
    // preview or switches straight back.
    let (freeze, rollback) = budget_actions(&o.budgets);
    status
        .pause_conditions
        .retain(|c| c.reason != PauseReason::BudgetFreeze);
    let mut budget_hold = None;

    let mut switch_to: Option<String> = None;
    let mut switch_back = None;
    let mut desired_weight = 0;

    // After a switch: post-promotion analysis, instant rollback, then the old revision goes.
    if let Some(previous) = status.previous_revision.clone() {
        let switched = bgs.switched_at.as_ref().map_or(o.now, |t| t.0);
        let has_post = bg
            .post_promotion_analysis
            .as_ref()
            .is_some_and(|a| !a.metrics.is_empty());
        let post = run_phase(&status, RunName::PostPromotion, &stable);
        if has_post && post.is_none() {
            start_runs.push((RunName::PostPromotion, stable.clone()));
        }
        if let Some(hold) = &rollback {
            switch_back = Some((
                Reason::AbortedByErrorBudget,
                format!(
                    "{}: switched back from {stable} to {previous}",
                    hold.describe()
                ),
            ));
        } else if let Some(id) = intents.abort.clone() {
            handled.abort = Some(id);
            switch_back = Some((
                Reason::AbortedByUser,
                format!("switched back from {stable} to {previous} by a user"),
            ));
        } else if post == Some(AnalysisPhase::Failed) {
            let why = status
                .analysis_runs
                .iter()
                .find(|r| r.name == RunName::PostPromotion.to_string())
                .and_then(|r| r.message.clone())
                .unwrap_or_default();
            switch_back = Some((
                Reason::AnalysisFailed,
                format!(
                    "post-promotion analysis of {stable} failed ({why}); switched back to {previous}"
                ),
            ));
        } else if matches!(
            post,
            Some(AnalysisPhase::Inconclusive | AnalysisPhase::Error)
        ) {
            restart_or_pause(
                &mut status,
                &mut handled,
                &mut start_runs,
                &intents.promote,
                (RunName::PostPromotion, &stable),
                o.now,
            );
        } else {
            let checked = !has_post || post == Some(AnalysisPhase::Successful);
            let delay_over = add(switched, scale_down_delay) <= o.now;
            if checked && delay_over {
                status.previous_revision = None;
                bgs.switched_at = None;
                note(
                    &mut events,
                    false,
                    Reason::PreviousScaledDown,
                    format!("{previous} scaled down; the switch to {stable} is final"),
                );
            } else if !delay_over {
                wakeups.push(add(switched, scale_down_delay));
            }
        }
        if let Some((reason, message)) = switch_back {
            status.canary_revision = Some(stable.clone());
            status.stable_revision = Some(previous.clone());
            status.previous_revision = None;
            abort(&mut status, &mut events, (reason, message), o);
            stable = previous;
        }
    }

    // Before a switch: preview, pre-promotion analysis, promotion.
    if status.previous_revision.is_none()
        && let Some(preview) = status.canary_revision.clone()
    {
        if let Some(id) = intents.abort.clone() {
            handled.abort = Some(id);
            if status.aborted_at.is_none() {
                let message =
                    format!("preview of {preview} aborted by a user; {stable} stays active");
                abort(
                    &mut status,
                    &mut events,
                    (Reason::AbortedByUser, message),
                    o,
                );
            }
        }
        if let Some(hold) = &rollback
            && status.aborted_at.is_none()
        {
            let message = format!(
                "{}: preview of {preview} aborted; {stable} stays active",
                hold.describe()
            );
            abort(
                &mut status,
                &mut events,
                (Reason::AbortedByErrorBudget, message),
                o,
            );
        }
        if status.aborted_at.is_none() {
            let preview_size = bg.preview_replica_count.unwrap_or(replicas).min(replicas);
            let ready = available(&preview) >= preview_size.max(1);
            if ready && bgs.preview_ready_at.is_none() {
                bgs.preview_ready_at = Some(MicroTime(o.now));
            }
            let has_pre = bg
                .pre_promotion_analysis
                .as_ref()
                .is_some_and(|a| !a.metrics.is_empty());
            let pre = run_phase(&status, RunName::PrePromotion, &preview);
            if ready && has_pre && pre.is_none() {
                start_runs.push((RunName::PrePromotion, preview.clone()));
            }
            let checked = match pre {
                _ if !has_pre => true,
                Some(AnalysisPhase::Successful) => true,
                Some(AnalysisPhase::Failed) => {
                    let why = status
                        .analysis_runs
                        .iter()
                        .find(|r| r.name == RunName::PrePromotion.to_string())
                        .and_then(|r| r.message.clone())
                        .unwrap_or_default();
                    let message = format!(
                        "pre-promotion analysis of {preview} failed ({why}); {stable} stays active"
                    );
                    abort(
                        &mut status,
                        &mut events,
                        (Reason::AnalysisFailed, message),
                        o,
                    );
                    false
                }
                Some(AnalysisPhase::Inconclusive | AnalysisPhase::Error) => {
                    restart_or_pause(
                        &mut status,
                        &mut handled,
                        &mut start_runs,
                        &intents.promote,
                        (RunName::PrePromotion, &preview),
                        o.now,
                    );
                    false
                }
                _ => false,
            };
            let ready_since = bgs.preview_ready_at.as_ref().map(|t| t.0);
            let auto = bg.auto_promotion.as_ref().filter(|a| a.enabled);
            let auto_due = match (auto, ready_since) {
                (Some(a), Some(since)) => {
                    let due = add(
                        since,
                        a.after.as_ref().map_or(Duration::ZERO, |d| d.as_std()),
                    );
                    if due > o.now {
                        wakeups.push(due);
                    }
                    due <= o.now
                }
                _ => false,
            };
            let requested = intents.promote.is_some() || intents.promote_full.is_some();
            // A person's pause (or spec.paused) holds the promotion and the switch; an early
            // promote waits for the resume.
            if paused_by_person(o) {
                pause_for(&mut status, PauseReason::UserPause, o.now);
            } else {
                status
                    .pause_conditions
                    .retain(|c| c.reason != PauseReason::UserPause);
            }
            if let Some(hold) = &freeze {
                pause_for(&mut status, PauseReason::BudgetFreeze, o.now);
                budget_hold = Some(format!(
                    "promotion of {preview} held: {}; `kubectl sluice promote --override-freeze --reason TEXT` releases it anyway",
                    hold.describe()
                ));
            }
            let held = paused_by_person(o) || freeze.is_some();
            let requested_before = bgs.promotion_requested == Some(true);
            let promote = !held
                && status.aborted_at.is_none()
                && ready
                && (requested || auto_due)
                && (checked || intents.promote_full.is_some());
            if promote {
                handled.promote = intents.promote.clone().or(handled.promote.clone());
                handled.promote_full = intents
                    .promote_full
                    .clone()
                    .or(handled.promote_full.clone());
                status
                    .pause_conditions
                    .retain(|c| c.reason != PauseReason::BlueGreenPause);
                // Full size first, then the switch.
                let full = available(&preview) >= replicas;
                let routed = !matches!(o.traffic, ObservedTraffic::None);
                let at_full_weight = match &o.traffic {
                    ObservedTraffic::State(s) => s.canary_weight == Some(100) && s.targets_match,
                    _ => !routed,
                };
                if full {
                    desired_weight = 100;
                    if at_full_weight {
                        switch_to = Some(preview.clone());
                    }
                }
                // Remember the request until the switch happens (the planner runs again).
                if switch_to.is_none() {
                    bgs.promotion_requested = Some(true);
                }
            } else if requested_before && !held && status.aborted_at.is_none() {
                // Promotion already requested and in progress.
                desired_weight = 100;
                let full = available(&preview) >= replicas;
                let at_full_weight = match &o.traffic {
                    ObservedTraffic::State(s) => s.canary_weight == Some(100) && s.targets_match,
                    ObservedTraffic::None => true,
                    ObservedTraffic::Failed(_) => false,
                };
                if full && at_full_weight {
                    switch_to = Some(preview.clone());
                }
            } else if ready
                && !held
                && !requested_before
                && status.aborted_at.is_none()
                && !status
                    .pause_conditions
                    .iter()
                    .any(|c| c.reason == PauseReason::BlueGreenPause)
                && auto.is_none()
            {
                status.pause_conditions.push(PauseCondition {
                    reason: PauseReason::BlueGreenPause,
                    start_time: Time(o.now),
                });
            }
        }
    }
    // A promote waits while a preview is getting ready or being checked; with nothing to
    // promote (or an aborted preview) it is used up, so it cannot surprise a later release.
    let nothing_to_promote = status.canary_revision.is_none() || status.aborted_at.is_some();
    if nothing_to_promote {
        if intents.promote.is_some() {
            handled.promote = intents.promote.clone();
        }
        if intents.promote_full.is_some() {
            handled.promote_full = intents.promote_full.clone();
        }
        if status.canary_revision.is_none()
            && status.previous_revision.is_none()
            && intents.abort.is_some()
        {
            handled.abort = intents.abort.clone();
        }
    }

    let promoted = switch_to.clone();
    if let Some(new_active) = switch_to {
        note(
            &mut events,
            false,
            Reason::Promoted,
            format!("switched traffic to {new_active} (was {stable})"),
        );
        status.previous_revision = Some(stable.clone());
        status.stable_revision = Some(new_active.clone());
        status.canary_revision = None;
        bgs = BlueGreenStatus {
            switched_at: Some(MicroTime(o.now)),
            ..BlueGreenStatus::default()
        };
        status.pause_conditions.clear();
        if let Some(run) = status
            .analysis_runs
            .iter_mut()
            .find(|r| r.name == RunName::PrePromotion.to_string())
        {
            run.finished_at.get_or_insert(Time(o.now));
        }
        if bg
            .post_promotion_analysis
            .as_ref()
            .is_some_and(|a| !a.metrics.is_empty())
        {
            start_runs.push((RunName::PostPromotion, new_active.clone()));
        }
        stable = new_active;
        desired_weight = 0;
        wakeups.push(add(o.now, scale_down_delay));
    }

    // Desired state.
    let preview = status.canary_revision.clone();
    let previous = status.previous_revision.clone();
    let aborted = status.aborted_at.is_some();
    let weight = if aborted || preview.as_deref().is_none_or(|p| available(p) == 0) {
        0
    } else {
        desired_weight
    };
    // An aborted preview keeps the preview destination until its pods are gone; then it
    // points at the active revision again, as whenever nothing is in preview.
    let preview_target = preview
        .clone()
        .filter(|p| {
            !aborted
                || o.replica_sets
                    .iter()
                    .any(|r| &r.hash == p && r.replicas > 0)
        })
        .unwrap_or_else(|| stable.clone());
    // Without a router the Services alone switch; the weight is then only informative.
    let traffic = Some(TrafficIntent {
        targets: Targets {
            stable: stable.clone(),
            canary: preview_target,
        },
        canary_weight: weight,
    });
    let mut replica_sets = vec![ReplicaSetIntent {
        hash: stable.clone(),
        replicas,
        scale_down_at: None,
    }];
    if let Some(p) = &previous {
        replica_sets.push(ReplicaSetIntent {
            hash: p.clone(),
            replicas,
            scale_down_at: None,
        });
    }
    if let Some(p) = &preview {
        let size = if bgs.promotion_requested == Some(true) {
            replicas
        } else {
            bg.preview_replica_count.unwrap_or(replicas).min(replicas)
        };
        let size = if aborted {
            let at = add(
                status.aborted_at.as_ref().map_or(o.now, |t| t.0),
                scale_down_delay,
            );
            if at <= o.now {
                0
            } else {
                wakeups.push(at);
                o.replica_sets
                    .iter()
                    .find(|r| &r.hash == p)
                    .map_or(0, |r| r.replicas)
            }
        } else {
            size
        };
        replica_sets.push(ReplicaSetIntent {
            hash: p.clone(),
            replicas: size,
            scale_down_at: None,
        });
    }
    // Old revisions already waited their delay as `previousRevision` (or were never active).
    let old: Vec<ReplicaSetIntent> = o
        .replica_sets
        .iter()
        .filter(|r| !replica_sets.iter().any(|i| i.hash == r.hash))
        .map(|r| ReplicaSetIntent {
            hash: r.hash.clone(),
            replicas: 0,
            scale_down_at: None,
        })
        .collect();
    replica_sets.extend(old);

    record_counts(&mut status, o);
    status.weights = Some(TrafficWeights {
        stable: 100 - weight,
        canary: weight,
        verified: match &o.traffic {
            ObservedTraffic::State(s) => Some(s.canary_weight == Some(weight) && s.targets_match),
            _ => None,
        },
    });
    status.step_progress = None;
    let active_available = available(&stable);
    // A preview that never gets its pods: Degraded (not aborted) once the deadline passes.
    let preview_size = bg.preview_replica_count.unwrap_or(replicas).min(replicas);
    let stalled = match (&preview, bgs.preview_started_at.as_ref()) {
        (Some(p), Some(started)) if !aborted && available(p) < preview_size.max(1) => {
            let due = add(started.0, progress_deadline(o));
            if due > o.now {
                wakeups.push(due);
            }
            due <= o.now
        }
        _ => false,
    };
    let (phase, message) = if aborted {
        (
            RolloutPhase::Degraded,
            conditions::message(&status.conditions, "Aborted")
                .unwrap_or("aborted")
                .to_string(),
        )
    } else if let ObservedTraffic::Failed(why) = &o.traffic {
        (RolloutPhase::Degraded, format!("traffic routing: {why}"))
    } else if stalled {
        let p = preview.clone().unwrap_or_default();
        (
            RolloutPhase::Degraded,
            format!(
                "progress deadline exceeded: preview {p} has {}/{preview_size} available pods after {}s",
                available(&p),
                progress_deadline(o).as_secs()
            ),
        )
    } else if status
        .pause_conditions
        .iter()
        .any(|c| c.reason == PauseReason::UserPause)
    {
        (
            RolloutPhase::Paused,
            "paused (spec.paused or `kubectl sluice pause`); `kubectl sluice resume` continues"
                .to_string(),
        )
    } else if let Some(message) = budget_hold.filter(|_| {
        status
            .pause_conditions
            .iter()
            .any(|c| c.reason == PauseReason::BudgetFreeze)
    }) {
        (RolloutPhase::Paused, message)
    } else if status
        .pause_conditions
        .iter()
        .any(|c| c.reason == PauseReason::InconclusiveAnalysis)
    {
        (
            RolloutPhase::Paused,
            "paused: analysis inconclusive; fix it, then `kubectl sluice promote`".to_string(),
        )
    } else if let Some(p) = &preview {
        if status
            .pause_conditions
            .iter()
            .any(|c| c.reason == PauseReason::BlueGreenPause)
        {
            (
                RolloutPhase::Paused,
                format!("{p} is ready in preview; `kubectl sluice promote` switches traffic to it"),
            )
        } else {
            (
                RolloutPhase::Progressing,
                format!(
                    "previewing {p}: {}/{} pods available",
                    available(p),
                    replicas
                ),
            )
        }
    } else if let Some(prev) = &previous {
        (
            RolloutPhase::Progressing,
            format!("switched to {stable}; {prev} kept for an instant rollback"),
        )
    } else if active_available < replicas {
        (
            RolloutPhase::Progressing,
            format!("active {stable}: {active_available}/{replicas} pods available"),
        )
    } else {
        (
            RolloutPhase::Healthy,
            format!("active {stable}: {active_available}/{replicas} pods available"),
        )
    };
    status.blue_green = (bgs != BlueGreenStatus::default()).then_some(bgs);
    let counts = ("active", active_available, replicas);
    record_phase(
        &mut status,
        &mut events,
        (phase, message),
        if stalled {
            "ProgressDeadlineExceeded"
        } else {
            "BlueGreen"
        },
        counts,
        o,
    );
    status.handled_intents = Some(handled);
    status.clear_intents();
    let busy = preview.is_some() || previous.is_some();
    let requeue_after = schedule(&mut status, o, &start_runs, &wakeups, busy);
    let mut traffic_writes = match &traffic {
        Some(intent) if !matches!(o.traffic, ObservedTraffic::None) => route_writes(o, intent),
        Some(intent) => selector_writes(o, bg, &intent.targets),
        None => Vec::new(),
    };
    let (routed, take_back_writes) = take_back(o);
    status.routed_objects = routed;
    traffic_writes.extend(take_back_writes);
    Plan {
        replica_sets,
        replica_sets_after_traffic: Vec::new(),
        traffic,
        traffic_writes,
        status,
        order: WriteOrder::StatusFirst,
        status_lane: Lane::Usual,
        stepped_by_clock: false,
        status_needs_traffic: false,
        status_waits: false,
        events,
        requeue_after,
        promoted,
    }
}

/// Without a router, the Services' selectors are the switch: the active Service selects the
/// active revision, the preview Service the preview (or the active one when nothing is in
/// preview). Only the Services that select something else are written; a missing Service is
/// left for the write to report.
fn selector_writes(o: &Observed, bg: &BlueGreenStrategy, targets: &Targets) -> Vec<TrafficWrite> {
    let wanted = std::iter::once((&bg.active_service, &targets.stable))
        .chain(bg.preview_service.iter().map(|p| (p, &targets.canary)));
    wanted
        .filter(|(service, revision)| {
            !o.services
                .iter()
                .any(|s| &&s.name == service && s.exists && s.selects.as_ref() == Some(revision))
        })
        .map(|(service, revision)| TrafficWrite::Selector {
            service: service.clone(),
            revision: revision.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::Intent;
    use crate::api::errorbudget::BudgetAction;
    use crate::api::rollout::{RolloutSpec, RolloutStatus};
    use crate::rollout::model::ObservedReplicaSet;
    use crate::traffic::TrafficState;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn spec(extra: serde_json::Value) -> RolloutSpec {
        let mut bg = serde_json::json!({"activeService": "web", "previewService": "web-preview", "scaleDownDelay": "30s"});
        for (k, v) in extra.as_object().unwrap() {
            bg[k] = v.clone();
        }
        serde_json::from_value(serde_json::json!({
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
            "strategy": {"blueGreen": bg}
        }))
        .unwrap()
    }

    fn rs(hash: &str, n: i32) -> ObservedReplicaSet {
        ObservedReplicaSet {
            hash: hash.into(),
            replicas: n,
            ready: n,
            available: n,
            scale_down_at: None,
        }
    }

    fn observed(
        spec: RolloutSpec,
        status: RolloutStatus,
        sets: Vec<ObservedReplicaSet>,
        now: i64,
    ) -> Observed {
        Observed {
            generation: Some(1),
            spec,
            status,
            desired_hash: "new".into(),
            replica_sets: sets,
            traffic: ObservedTraffic::State(TrafficState {
                canary_weight: Some(0),
                targets_match: true,
            }),
            background: None,
            services: Vec::new(),
            budgets: Vec::new(),
            leftovers: Vec::new(),
            release: Default::default(),
            pipeline: None,
            recorded_runs: None,
            passes_wait: Duration::ZERO,
            now: t(now),
        }
    }

    /// Plans through the dispatcher, as the reconciler does.
    fn plan(o: &Observed) -> Plan {
        crate::rollout::plan::plan(o)
    }

    fn intent(id: &str) -> Option<Intent> {
        Some(Intent {
            id: id.into(),
            requested_at: Time(t(1)),
            requested_by: None,
            reason: None,
        })
    }

    fn active(hash: &str) -> RolloutStatus {
        RolloutStatus {
            stable_revision: Some(hash.into()),
            ..RolloutStatus::default()
        }
    }

    fn hold(action: BudgetAction) -> crate::rollout::model::BudgetHold {
        crate::rollout::model::BudgetHold {
            budget: "shop/avail".into(),
            action,
            consumed_percent: Some(96.0),
            threshold: Some(95),
            rollback_window: Duration::from_secs(3600),
        }
    }

    #[test]
    fn error_budgets_hold_abort_and_switch_back_a_blue_green_release() {
        let new_template = || {
            observed(
                spec(serde_json::json!({})),
                active("old"),
                vec![rs("old", 3)],
                0,
            )
        };
        // Frozen: the new revision is not even previewed.
        let mut frozen = new_template();
        frozen.budgets = vec![hold(BudgetAction::FreezePromotions)];
        let held = plan(&frozen);
        assert_eq!(held.status.canary_revision, None);
        assert_eq!(held.status.phase, Some(RolloutPhase::Paused));
        assert!(
            held.replica_sets
                .iter()
                .all(|r| r.hash != "new" || r.replicas == 0)
        );

        // A freeze during a preview holds the promotion, even one a person asked for.
        let mut previewing = new_template();
        previewing.replica_sets.push(rs("new", 3));
        previewing.status = plan(&previewing).status;
        previewing.status.promote = intent("p");
        previewing.budgets = vec![hold(BudgetAction::FreezePromotions)];
        let waiting = plan(&previewing);
        assert_eq!(waiting.traffic.as_ref().unwrap().canary_weight, 0);
        assert_eq!(waiting.status.phase, Some(RolloutPhase::Paused));
        assert!(
            waiting
                .status
                .message
                .clone()
                .unwrap_or_default()
                .contains("shop/avail"),
            "{:?}",
            waiting.status.message
        );

        // A rollback aborts the preview.
        previewing.budgets = vec![hold(BudgetAction::Rollback)];
        let aborted = plan(&previewing);
        assert!(aborted.status.aborted_at.is_some());
        assert!(
            aborted
                .events
                .iter()
                .any(|e| e.reason == Reason::AbortedByErrorBudget)
        );

        // After the switch, while the old revision is kept: straight back to it.
        let mut switched = new_template();
        switched.replica_sets.push(rs("new", 3));
        switched.status = RolloutStatus {
            stable_revision: Some("new".into()),
            previous_revision: Some("old".into()),
            blue_green: Some(BlueGreenStatus {
                switched_at: Some(MicroTime(t(0))),
                ..BlueGreenStatus::default()
            }),
            ..RolloutStatus::default()
        };
        switched.now = t(5);
        switched.budgets = vec![hold(BudgetAction::Rollback)];
        let back = plan(&switched);
        assert_eq!(back.status.stable_revision.as_deref(), Some("old"));
        assert!(back.status.aborted_at.is_some());
        assert!(
            back.events
                .iter()
                .any(|e| e.reason == Reason::AbortedByErrorBudget)
        );
    }

    #[test]
    fn a_rollback_takes_back_a_switch_whose_old_revision_was_already_scaled_down() {
        let mut o = observed(
            spec(serde_json::json!({})),
            RolloutStatus {
                stable_revision: Some("new".into()),
                last_promotion: Some(crate::api::rollout::Promotion {
                    revision: "new".into(),
                    previous: "old".into(),
                    at: Time(t(0)),
                }),
                ..RolloutStatus::default()
            },
            vec![rs("new", 3), rs("old", 0)],
            600,
        );
        o.budgets = vec![hold(BudgetAction::Rollback)];
        let restoring = plan(&o);
        assert_eq!(restoring.status.stable_revision.as_deref(), Some("new"));
        assert!(restoring.replica_set_writes().contains(&ReplicaSetIntent {
            hash: "old".into(),
            replicas: 3,
            scale_down_at: None
        }));
        o.status = restoring.status;
        o.replica_sets = vec![rs("new", 3), rs("old", 3)];
        let moved = plan(&o);
        assert_eq!(moved.status.stable_revision.as_deref(), Some("old"));
        assert_eq!(moved.status.phase, Some(RolloutPhase::Degraded));
        assert!(matches!(
            moved.traffic_writes.first(),
            Some(TrafficWrite::Route { targets, .. }) if targets.stable == "old"
        ));
        let new_rs = moved
            .replica_set_writes()
            .into_iter()
            .find(|r| r.hash == "new")
            .unwrap();
        assert_eq!((new_rs.replicas, new_rs.scale_down_at.is_some()), (3, true));
        // Later plans keep it for its delay too (blue-green scales other old ones at once).
        o.status = moved.status;
        o.replica_sets = vec![
            ObservedReplicaSet {
                scale_down_at: new_rs.scale_down_at,
                ..rs("new", 3)
            },
            rs("old", 3),
        ];
        let later = plan(&o);
        let new_rs = later
            .replica_set_writes()
            .into_iter()
            .find(|r| r.hash == "new")
            .unwrap();
        assert_eq!(new_rs.replicas, 3);
        assert_eq!(later.status.canary_revision, None, "not previewed again");
    }

    #[test]
    fn preview_waits_for_promotion_then_switches_and_keeps_the_old_one_warm() {
        let plan1 = plan(&observed(
            spec(serde_json::json!({})),
            active("old"),
            vec![rs("old", 3), rs("new", 3)],
            0,
        ));
        assert_eq!(plan1.status.canary_revision.as_deref(), Some("new"));
        assert_eq!(plan1.status.phase, Some(RolloutPhase::Paused));
        assert_eq!(plan1.traffic.as_ref().unwrap().canary_weight, 0);
        let mut status = plan1.status.clone();
        status.promote = intent("p");
        let mut o = observed(
            spec(serde_json::json!({})),
            status,
            vec![rs("old", 3), rs("new", 3)],
            5,
        );
        let plan2 = plan(&o);
        assert_eq!(
            plan2.traffic.as_ref().unwrap().canary_weight,
            100,
            "the switch: weights 0 -> 100 at once"
        );
        o.status = plan2.status.clone();
        o.traffic = ObservedTraffic::State(TrafficState {
            canary_weight: Some(100),
            targets_match: true,
        });
        let plan3 = plan(&o);
        assert_eq!(plan3.status.stable_revision.as_deref(), Some("new"));
        assert_eq!(plan3.status.previous_revision.as_deref(), Some("old"));
        assert_eq!(
            plan3.promoted.as_deref(),
            Some("new"),
            "for the release metric"
        );
        assert_eq!(plan2.promoted, None);
        assert!(plan3.replica_set_writes().contains(&ReplicaSetIntent {
            hash: "old".into(),
            replicas: 3,
            scale_down_at: None
        }));
        // After the delay the old revision goes.
        o.status = plan3.status.clone();
        o.traffic = ObservedTraffic::State(TrafficState {
            canary_weight: Some(0),
            targets_match: true,
        });
        o.now = t(40);
        let plan4 = plan(&o);
        assert_eq!(plan4.status.previous_revision, None);
        assert!(plan4.replica_set_writes().contains(&ReplicaSetIntent {
            hash: "old".into(),
            replicas: 0,
            scale_down_at: None
        }));
        assert_eq!(plan4.status.phase, Some(RolloutPhase::Healthy));
    }

    #[test]
    fn failed_post_promotion_analysis_switches_straight_back() {
        let mut status = active("new");
        status.previous_revision = Some("old".into());
        status.blue_green = Some(BlueGreenStatus {
            switched_at: Some(MicroTime(t(0))),
            ..BlueGreenStatus::default()
        });
        status
            .analysis_runs
            .push(crate::api::analysis::AnalysisRunStatus {
                name: RunName::PostPromotion.to_string(),
                revision: "new".into(),
                phase: AnalysisPhase::Failed,
                started_at: Time(t(0)),
                finished_at: Some(Time(t(5))),
                message: Some("error-rate failed".into()),
                metrics: vec![],
            });
        let spec = spec(
            serde_json::json!({"postPromotionAnalysis": {"metrics": [{"name": "m", "prometheus": {"query": "q"}, "successCondition": "true"}]}}),
        );
        let plan = plan(&observed(spec, status, vec![rs("old", 3), rs("new", 3)], 6));
        assert_eq!(plan.status.stable_revision.as_deref(), Some("old"));
        assert_eq!(plan.traffic.as_ref().unwrap().targets.stable, "old");
        assert_eq!(plan.traffic.unwrap().canary_weight, 0);
        assert_eq!(plan.status.phase, Some(RolloutPhase::Degraded));
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == Reason::AnalysisFailed)
        );
    }

    #[test]
    fn auto_promotion_waits_for_the_delay_and_the_analysis() {
        let spec = spec(serde_json::json!({"autoPromotion": {"enabled": true, "after": "10s"}}));
        let plan1 = plan(&observed(
            spec.clone(),
            active("old"),
            vec![rs("old", 3), rs("new", 3)],
            0,
        ));
        assert_eq!(plan1.traffic.as_ref().unwrap().canary_weight, 0);
        assert_eq!(plan1.requeue_after, Duration::from_secs(10));
        let plan2 = plan(&observed(
            spec,
            plan1.status.clone(),
            vec![rs("old", 3), rs("new", 3)],
            10,
        ));
        assert_eq!(plan2.traffic.unwrap().canary_weight, 100);
    }

    #[test]
    fn abort_before_the_switch_keeps_the_active_revision() {
        let mut status = active("old");
        status.canary_revision = Some("new".into());
        status.abort = intent("a");
        let plan = plan(&observed(
            spec(serde_json::json!({})),
            status,
            vec![rs("old", 3), rs("new", 3)],
            0,
        ));
        assert_eq!(plan.status.stable_revision.as_deref(), Some("old"));
        assert!(plan.status.aborted_at.is_some());
        assert_eq!(plan.traffic.unwrap().canary_weight, 0);
    }

    fn post_analysis() -> serde_json::Value {
        serde_json::json!({"postPromotionAnalysis": {"metrics": [{"name": "m", "prometheus": {"query": "q"}, "successCondition": "true"}]}})
    }

    #[test]
    fn post_promotion_analysis_judges_the_new_active_revision() {
        let mut status = active("old");
        status.canary_revision = Some("new".into());
        // Ready since t0, promotion requested.
        status.blue_green = Some(BlueGreenStatus {
            preview_ready_at: Some(MicroTime(t(0))),
            promotion_requested: Some(true),
            ..BlueGreenStatus::default()
        });
        let mut o = observed(
            spec(post_analysis()),
            status,
            vec![rs("old", 3), rs("new", 3)],
            5,
        );
        o.traffic = ObservedTraffic::State(TrafficState {
            canary_weight: Some(100),
            targets_match: true,
        });
        let plan = plan(&o);
        let run = plan
            .status
            .analysis_runs
            .iter()
            .find(|r| r.name == "post-promotion")
            .expect("the run starts with the switch");
        assert_eq!(run.revision, "new");
        assert_eq!(run.phase, AnalysisPhase::Running);
    }

    #[test]
    fn without_a_router_the_services_are_pointed_only_where_they_differ() {
        let service = |name: &str, selects: Option<&str>, exists: bool| {
            crate::rollout::model::ObservedService {
                name: name.into(),
                selects: selects.map(String::from),
                exists,
            }
        };
        let table = [
            (
                "both right: nothing",
                vec![
                    service("web", Some("old"), true),
                    service("web-preview", Some("new"), true),
                ],
                vec![],
            ),
            (
                "preview wrong",
                vec![
                    service("web", Some("old"), true),
                    service("web-preview", Some("old"), true),
                ],
                vec![("web-preview", "new")],
            ),
            (
                "active first, then preview",
                vec![
                    service("web", None, true),
                    service("web-preview", None, true),
                ],
                vec![("web", "old"), ("web-preview", "new")],
            ),
            (
                "a missing Service is written, so the write names it",
                vec![
                    service("web", None, false),
                    service("web-preview", Some("new"), true),
                ],
                vec![("web", "old")],
            ),
        ];
        for (what, services, want) in table {
            let mut o = observed(
                spec(serde_json::json!({})),
                active("old"),
                vec![rs("old", 3), rs("new", 3)],
                0,
            );
            o.traffic = ObservedTraffic::None;
            o.services = services;
            let want: Vec<TrafficWrite> = want
                .into_iter()
                .map(|(service, revision)| TrafficWrite::Selector {
                    service: service.into(),
                    revision: revision.into(),
                })
                .collect();
            assert_eq!(plan(&o).traffic_writes, want, "{what}");
        }
    }

    #[test]
    fn an_aborted_preview_shows_no_promotion_pause_and_the_preview_service_returns() {
        let mut status = active("old");
        status.canary_revision = Some("new".into());
        status.pause_conditions.push(PauseCondition {
            reason: PauseReason::BlueGreenPause,
            start_time: Time(t(0)),
        });
        status.abort = intent("a");
        let o = observed(
            spec(serde_json::json!({})),
            status,
            vec![rs("old", 3), rs("new", 3)],
            5,
        );
        let aborted = plan(&o);
        assert!(aborted.status.aborted_at.is_some());
        assert!(aborted.status.pause_conditions.is_empty());
        // Pods still up: the preview destination still points at them.
        assert_eq!(aborted.traffic.as_ref().unwrap().targets.canary, "new");
        // Once they are gone, preview points at the active revision again.
        let mut later = observed(
            spec(serde_json::json!({})),
            aborted.status.clone(),
            vec![rs("old", 3), rs("new", 0)],
            60,
        );
        later.traffic = ObservedTraffic::State(TrafficState {
            canary_weight: Some(0),
            targets_match: true,
        });
        assert_eq!(plan(&later).traffic.unwrap().targets.canary, "old");
    }

    #[test]
    fn a_person_pauses_the_promotion_and_resume_lets_it_through() {
        let mut status = active("old");
        status.canary_revision = Some("new".into());
        status.promote = intent("p");
        status.pause = intent("hold");
        let o = observed(
            spec(serde_json::json!({})),
            status,
            vec![rs("old", 3), rs("new", 3)],
            5,
        );
        let held = plan(&o);
        assert_eq!(held.status.phase, Some(RolloutPhase::Paused));
        assert!(
            held.status
                .pause_conditions
                .iter()
                .any(|c| c.reason == PauseReason::UserPause)
        );
        assert_eq!(held.traffic.as_ref().unwrap().canary_weight, 0);
        assert_eq!(
            held.status
                .handled_intents
                .as_ref()
                .and_then(|h| h.promote.clone()),
            None,
            "the promote waits for the resume"
        );
        let mut status = held.status.clone();
        status.promote = intent("p");
        status.pause = intent("hold");
        status.resume = Some(crate::api::common::Intent {
            id: "go".into(),
            requested_at: Time(t(6)),
            requested_by: None,
            reason: None,
        });
        let resumed = plan(&observed(
            spec(serde_json::json!({})),
            status,
            vec![rs("old", 3), rs("new", 3)],
            7,
        ));
        assert_eq!(
            resumed.traffic.unwrap().canary_weight,
            100,
            "promoted on resume"
        );
    }

    #[test]
    fn a_preview_without_pods_past_the_deadline_is_degraded_not_aborted() {
        let mut status = active("old");
        status.canary_revision = Some("new".into());
        status.blue_green = Some(BlueGreenStatus {
            preview_started_at: Some(MicroTime(t(0))),
            ..BlueGreenStatus::default()
        });
        let mut spec = spec(serde_json::json!({}));
        spec.progress_deadline_seconds = Some(60);
        let early = plan(&observed(
            spec.clone(),
            status.clone(),
            vec![rs("old", 3), rs("new", 0)],
            30,
        ));
        assert_eq!(early.status.phase, Some(RolloutPhase::Progressing));
        assert!(
            early.requeue_after <= Duration::from_secs(30),
            "wakes at the deadline"
        );
        let late = plan(&observed(
            spec,
            status,
            vec![rs("old", 3), rs("new", 0)],
            61,
        ));
        assert_eq!(late.status.phase, Some(RolloutPhase::Degraded));
        assert!(
            late.status
                .message
                .unwrap_or_default()
                .contains("progress deadline")
        );
        assert!(late.status.aborted_at.is_none());
        assert_eq!(late.status.stable_revision.as_deref(), Some("old"));
    }

    fn arb_phase() -> impl proptest::strategy::Strategy<Value = Option<AnalysisPhase>> {
        use proptest::prelude::*;
        proptest::option::of(prop_oneof![
            Just(AnalysisPhase::Pending),
            Just(AnalysisPhase::Running),
            Just(AnalysisPhase::Successful),
            Just(AnalysisPhase::Failed),
            Just(AnalysisPhase::Inconclusive),
            Just(AnalysisPhase::Error),
        ])
    }

    fn run(
        name: RunName,
        revision: &str,
        phase: AnalysisPhase,
    ) -> crate::api::analysis::AnalysisRunStatus {
        crate::api::analysis::AnalysisRunStatus {
            name: name.to_string(),
            revision: revision.into(),
            phase,
            started_at: Time(t(0)),
            finished_at: None,
            message: Some("m".into()),
            metrics: vec![],
        }
    }

    proptest::prop_compose! {
        /// Any blue-green world: in preview or switched, analyses in any phase, any request,
        /// pods in any state, routed or not.
        fn arb_world()(
            switched in proptest::bool::ANY,
            aborted in proptest::bool::ANY,
            requested in proptest::bool::ANY,
            ready_since in proptest::option::of(0..60i64),
            pre in arb_phase(),
            post in arb_phase(),
            promote in proptest::bool::ANY,
            promote_full in proptest::bool::ANY,
            abort in proptest::bool::ANY,
            new_available in 0..4i32,
            old_available in 0..4i32,
            observed_weight in proptest::option::of(0..=100i32),
            routed in proptest::bool::ANY,
            now in 0..120i64,
        ) -> (Observed, bool) {
            let analyses = serde_json::json!({
                "autoPromotion": {"enabled": true, "after": "10s"},
                "prePromotionAnalysis": {"metrics": [{"name": "m", "prometheus": {"query": "q"}, "successCondition": "true"}]},
                "postPromotionAnalysis": {"metrics": [{"name": "m", "prometheus": {"query": "q"}, "successCondition": "true"}]}
            });
            let mut status = if switched { active("new") } else { active("old") };
            if switched {
                status.previous_revision = Some("old".into());
                status.blue_green = Some(BlueGreenStatus { switched_at: Some(MicroTime(t(0))), ..BlueGreenStatus::default() });
            } else {
                status.canary_revision = Some("new".into());
                status.blue_green = Some(BlueGreenStatus {
                    preview_ready_at: ready_since.map(|s| MicroTime(t(s))),
                    promotion_requested: requested.then_some(true),
                    ..BlueGreenStatus::default()
                });
            }
            if aborted && !switched { status.aborted_at = Some(Time(t(0))); }
            if let Some(phase) = pre { status.analysis_runs.push(run(RunName::PrePromotion, "new", phase)); }
            if let Some(phase) = post { status.analysis_runs.push(run(RunName::PostPromotion, "new", phase)); }
            if promote { status.promote = intent("p"); }
            if promote_full { status.promote_full = intent("f"); }
            if abort { status.abort = intent("a"); }
            let mut o = observed(spec(analyses), status, vec![rs("old", 3), rs("new", 3)], now);
            o.replica_sets[0].available = old_available;
            o.replica_sets[1].available = new_available;
            o.traffic = if routed {
                ObservedTraffic::State(TrafficState { canary_weight: observed_weight, targets_match: true })
            } else {
                ObservedTraffic::None
            };
            (o, aborted && !switched)
        }
    }

    proptest::proptest! {
        #[test]
        fn blue_green_never_sends_traffic_where_it_must_not(
            (o, aborted) in arb_world()
        ) {
            let plan = plan(&o);
            let weight = plan.traffic.as_ref().map_or(0, |t| t.canary_weight);
            proptest::prop_assert!((0..=100).contains(&weight));
            let preview_available = o.replica_sets[1].available;
            if preview_available == 0 {
                proptest::prop_assert_eq!(weight, 0, "no traffic to a preview without pods");
            }
            if aborted && o.status.retry.is_none() {
                proptest::prop_assert_eq!(weight, 0);
                proptest::prop_assert_eq!(plan.promoted.as_deref(), None, "an aborted preview never switches");
            }
            let pre_failed = o.status.analysis_runs.iter().any(|r| {
                r.name == RunName::PrePromotion.to_string() && r.phase == AnalysisPhase::Failed
            });
            if pre_failed && o.status.promote_full.is_none() && o.status.previous_revision.is_none() {
                proptest::prop_assert_eq!(plan.promoted.as_deref(), None, "a failed pre-promotion analysis never switches");
            }
            let post_failed = o.status.analysis_runs.iter().any(|r| {
                r.name == RunName::PostPromotion.to_string() && r.phase == AnalysisPhase::Failed
            });
            if o.status.previous_revision.is_some() && post_failed {
                proptest::prop_assert_eq!(plan.status.stable_revision.as_deref(), Some("old"), "a failed post-promotion analysis switches back");
            }
        }
    }
}
