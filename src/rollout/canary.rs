//! The canary planner: the new revision takes a growing share of traffic, step by step, and
//! is promoted once the last step is done.
//!
//! Pure: no I/O, no clock. The reconciler observes the world into an [`Observed`], folds any
//! new analysis measurements into its status, calls [`plan`], and applies the [`Plan`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

use super::events::Reason;
use super::model::{
    Observed, ObservedReplicaSet, ObservedTraffic, Plan, PlannedEvent, ReplicaSetIntent,
    TrafficIntent, WriteOrder, add, budget_actions,
};
use super::release::{
    DEFAULT_SCALE_DOWN_DELAY, abort, first_revision, follow_template, pause_for, paused_by_person,
    progress_deadline, record_counts, record_phase, reset, route_writes, run_phase,
    scale_down_later, schedule, take_back, unhandled,
};
use super::runs::RunName;
use super::steps::{self, Step};
use crate::analysis::run as analysis;
use crate::api::analysis::AnalysisPhase;
use crate::api::rollout::{
    CanaryStrategy, HandledIntents, PauseReason, RolloutPhase, RolloutStatus, TrafficWeights,
};
use crate::conditions;
use crate::k8s::lanes::Lane;
use crate::traffic::{Targets, TrafficState};

struct Planner<'a> {
    o: &'a Observed,
    canary: CanaryStrategy,
    status: RolloutStatus,
    handled: HandledIntents,
    events: Vec<PlannedEvent>,
    start_runs: Vec<(RunName, String)>,
    wakeups: Vec<Timestamp>,
    replicas: i32,
    /// Why an ErrorBudget holds the release, for the status message.
    budget_hold: Option<String>,
    /// Steps passed in this plan: timed pauses that ran out, and any other.
    passed_by_clock: bool,
    passed_otherwise: bool,
    /// Steps passed in this plan that the next plan, from the status as it was and the route
    /// this plan writes, might not pass again: a weight step (passed on the route as it was),
    /// a pause passed by a promote, an analysis step passed on its verdict.
    passed_unrepeatably: bool,
    /// A weight step counted done by this plan's own route write
    /// ([`Planner::own_write_passes`]).
    passed_by_own_write: bool,
}

impl Planner<'_> {
    fn event(&mut self, warning: bool, reason: Reason, message: String) {
        self.events.push(PlannedEvent {
            warning,
            reason,
            message,
        });
    }

    fn rs(&self, hash: &str) -> Option<&ObservedReplicaSet> {
        self.o.replica_sets.iter().find(|r| r.hash == hash)
    }

    fn available(&self, hash: &str) -> i32 {
        self.rs(hash).map_or(0, |r| r.available)
    }

    /// A release (re)starts at its first step, or none is in flight.
    fn restart_steps(&mut self) {
        let in_flight = self.status.canary_revision.is_some();
        self.status.current_step_index = in_flight.then_some(0);
        self.status.current_step_started_at = in_flight.then_some(MicroTime(self.o.now));
    }

    fn abort(&mut self, reason: Reason, message: String) {
        abort(
            &mut self.status,
            &mut self.events,
            (reason, message),
            self.o,
        );
    }

    fn run_phase(&self, name: RunName) -> Option<AnalysisPhase> {
        let canary = self.status.canary_revision.as_deref()?;
        run_phase(&self.status, name, canary)
    }

    /// Every canary run judges the canary revision.
    fn ensure_run(&mut self, name: RunName) {
        let Some(canary) = self.status.canary_revision.clone() else {
            return;
        };
        if self.run_phase(name).is_none() && !self.start_runs.iter().any(|(n, _)| *n == name) {
            self.start_runs.push((name, canary));
        }
    }

    fn restart_run(&mut self, name: RunName) {
        let text = name.to_string();
        self.status.analysis_runs.retain(|r| r.name != text);
        self.ensure_run(name);
    }

    /// True when the newest word of the background analysis is "don't know": hold steps.
    fn background_doubtful(&self) -> bool {
        let (Some(analysis), Some(canary)) = (&self.o.background, &self.status.canary_revision)
        else {
            return false;
        };
        self.status
            .analysis_runs
            .iter()
            .find(|r| r.name == RunName::Background.to_string() && &r.revision == canary)
            .is_some_and(|run| analysis::latest_is_doubtful(run, analysis))
    }

    fn pause(&mut self, reason: PauseReason, since: Timestamp) {
        pause_for(&mut self.status, reason, since);
    }

    /// Whether a weight step whose route is not yet there may count as done by this plan's own
    /// route write, so that the status recording the pause after it goes out with that write
    /// (traffic first) rather than as a second write once the route is seen: one Rollout
    /// status write, the apiserver's dearest, fewer per step. Only where the operator stopping
    /// between the two writes loses nothing: in the same release, with no request pending
    /// ([`OwnWrite`]), after no step passed in this plan but timed pauses that ran out and
    /// canary scales, so the status as it was and the route as written lead the next plan to
    /// the same step (it passes the same pauses, as the clock only goes on, the same scales,
    /// and the weight step as the route shows its weight). And only before a pause that takes
    /// time, which this plan then begins and does not pass: the route holds one weight per
    /// write. The shell writes this status only if the route write succeeds
    /// ([`Plan::status_needs_traffic`]).
    fn own_write_passes(&self, steps: &[Step], index: usize, own_write: OwnWrite) -> bool {
        own_write == OwnWrite::MayPass
            && !self.passed_unrepeatably
            && !self.passed_by_own_write
            && self.status.canary_revision == self.o.status.canary_revision
            && matches!(self.o.traffic, ObservedTraffic::State(_))
            && match steps.get(index + 1) {
                Some(Step::Pause(None)) => true,
                Some(Step::Pause(Some(duration))) => !duration.is_zero(),
                _ => false,
            }
    }

    fn traffic_at(&self, weight: i32, canary: &str) -> bool {
        match &self.o.traffic {
            ObservedTraffic::None => true,
            ObservedTraffic::State(state) => {
                state.canary_weight == Some(weight) && state.targets_match && !canary.is_empty()
            }
            ObservedTraffic::Failed(_) => false,
        }
    }
}

/// Whether a weight step may count as done by the plan's own route write
/// ([`Planner::own_write_passes`]). The caller knows: it sees the requests pending before the
/// budget policy around this planner handles its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnWrite {
    MayPass,
    Never,
}

/// Plans one reconcile of a canary Rollout.
pub fn plan(o: &Observed, own_write: OwnWrite) -> Plan {
    let canary = o
        .spec
        .strategy
        .canary
        .as_deref()
        .cloned()
        .unwrap_or_default();
    let mut p = Planner {
        o,
        canary,
        status: o.status.clone(),
        handled: o.status.handled_intents.clone().unwrap_or_default(),
        events: Vec::new(),
        start_runs: Vec::new(),
        wakeups: Vec::new(),
        budget_hold: None,
        passed_by_clock: false,
        passed_otherwise: false,
        passed_unrepeatably: false,
        passed_by_own_write: false,
        replicas: o.spec.replicas.unwrap_or(1).max(0),
    };
    let intents = unhandled(&o.status);
    p.status.observed_generation = o.generation;

    let stable = first_revision(&mut p.status, &mut p.events, o, "stable");

    if follow_template(&mut p.status, &mut p.events, o, (&stable, "stable")).is_some() {
        p.restart_steps();
    }

    // ErrorBudget policy in flight (a revision held on stable, an override and a rollback of
    // a completed release are `policy`'s): a freeze holds the steps, a rollback aborts.
    let (freeze, rollback) = budget_actions(&o.budgets);
    p.status
        .pause_conditions
        .retain(|c| c.reason != PauseReason::BudgetFreeze);

    let steps = steps::effective(&p.canary.steps);
    let mut desired_weight = 0;
    let mut promoted_to: Option<String> = None;

    if let Some(canary_hash) = p.status.canary_revision.clone() {
        if let Some(id) = intents.abort.clone() {
            p.handled.abort = Some(id);
            if p.status.aborted_at.is_none() {
                let who = o
                    .status
                    .abort
                    .as_ref()
                    .and_then(|i| i.requested_by.clone())
                    .unwrap_or_else(|| "a user".into());
                p.abort(
                    Reason::AbortedByUser,
                    format!(
                        "release of {canary_hash} aborted by {who}; traffic back on stable {stable}"
                    ),
                );
            }
        }
        if let Some(id) = intents.retry.clone() {
            p.handled.retry = Some(id);
            if p.status.aborted_at.is_some() {
                reset(&mut p.status, Some(canary_hash.clone()), o);
                p.restart_steps();
                p.event(
                    false,
                    Reason::Retried,
                    format!("release of {canary_hash} started again"),
                );
            }
        }
        if let Some(hold) = &rollback
            && p.status.aborted_at.is_none()
        {
            p.abort(
                Reason::AbortedByErrorBudget,
                format!(
                    "{}: release of {canary_hash} aborted, traffic back on stable {stable}",
                    hold.describe()
                ),
            );
        }
        if let Some(hold) = &freeze
            && p.status.aborted_at.is_none()
        {
            // In flight: steps hold where they are until the budget recovers.
            p.budget_hold = Some(format!("steps held: {}", hold.describe()));
            p.pause(PauseReason::BudgetFreeze, o.now);
        }
        if p.status.aborted_at.is_none() {
            for (name, phase) in p
                .status
                .analysis_runs
                .clone()
                .iter()
                .filter(|r| r.revision == canary_hash)
                .map(|r| (r.name.clone(), r.phase))
            {
                if phase == AnalysisPhase::Failed {
                    let why = p
                        .status
                        .analysis_runs
                        .iter()
                        .find(|r| r.name == name)
                        .and_then(|r| r.message.clone())
                        .unwrap_or_default();
                    p.abort(Reason::AnalysisFailed, format!("analysis {name} failed ({why}); release of {canary_hash} aborted, traffic back on stable {stable}"));
                    break;
                }
            }
        }

        if p.status.aborted_at.is_none() {
            if let Some(id) = intents.promote_full.clone() {
                p.handled.promote_full = Some(id);
                p.status.current_step_index = Some(steps.len() as i32);
                p.status.current_step_started_at = Some(MicroTime(o.now));
                p.status.pause_conditions.clear();
                p.event(
                    false,
                    Reason::PromotedFull,
                    format!("skipping the remaining steps of {canary_hash}"),
                );
            }
            let mut promote = intents.promote.clone();
            if o.background.as_ref().is_some_and(|a| !a.metrics.is_empty()) {
                match p.run_phase(RunName::Background) {
                    Some(AnalysisPhase::Inconclusive | AnalysisPhase::Error) => {
                        if let Some(id) = promote.take() {
                            p.handled.promote = Some(id);
                            p.restart_run(RunName::Background);
                            p.status
                                .pause_conditions
                                .retain(|c| c.reason != PauseReason::InconclusiveAnalysis);
                            p.event(
                                false,
                                Reason::AnalysisRestarted,
                                "background analysis restarted by promote".into(),
                            );
                        } else {
                            p.pause(PauseReason::InconclusiveAnalysis, o.now);
                        }
                    }
                    None => p.ensure_run(RunName::Background),
                    _ => {}
                }
            }
            if paused_by_person(o) {
                p.pause(PauseReason::UserPause, o.now);
            } else {
                p.status
                    .pause_conditions
                    .retain(|c| c.reason != PauseReason::UserPause);
            }

            let mut index = p.status.current_step_index.unwrap_or(0).max(0) as usize;
            let mut started = p
                .status
                .current_step_started_at
                .as_ref()
                .map_or(o.now, |t| t.0);
            let held =
                |p: &Planner| !p.status.pause_conditions.is_empty() || p.background_doubtful();
            desired_weight = steps::weight_at(&steps, index);
            while index < steps.len() {
                let mut promoted_past = false;
                let mut own_write_now = false;
                let advance = match &steps[index] {
                    Step::SetWeight(weight) => {
                        desired_weight = *weight;
                        let needed = steps::canary_replicas(&steps, index, p.replicas);
                        let ready = p.available(&canary_hash)
                            >= needed.max(if *weight > 0 { 1 } else { 0 });
                        if ready && p.traffic_at(*weight, &canary_hash) {
                            true
                        } else if ready && p.own_write_passes(&steps, index, own_write) {
                            own_write_now = true;
                            true
                        } else {
                            false
                        }
                    }
                    Step::Pause(duration) => {
                        if let Some(id) = promote.take() {
                            p.handled.promote = Some(id);
                            promoted_past = true;
                            p.event(
                                false,
                                Reason::Resumed,
                                format!("pause at step {} ended by promote", index + 1),
                            );
                            true
                        } else if duration.is_some_and(|d| add(started, d) <= o.now) {
                            true
                        } else {
                            if let Some(d) = duration {
                                p.wakeups.push(add(started, *d));
                            }
                            p.pause(PauseReason::CanaryPauseStep, started);
                            false
                        }
                    }
                    Step::Analysis => {
                        let name = RunName::Step(index);
                        match p.run_phase(name) {
                            Some(AnalysisPhase::Successful) => true,
                            Some(AnalysisPhase::Inconclusive | AnalysisPhase::Error) => {
                                if let Some(id) = promote.take() {
                                    p.handled.promote = Some(id);
                                    p.restart_run(name);
                                    p.status
                                        .pause_conditions
                                        .retain(|c| c.reason != PauseReason::InconclusiveAnalysis);
                                } else {
                                    p.pause(PauseReason::InconclusiveAnalysis, o.now);
                                }
                                false
                            }
                            Some(_) => false,
                            None => {
                                p.ensure_run(name);
                                false
                            }
                        }
                    }
                    Step::SetCanaryScale(_) => true,
                };
                let is_pause_step = matches!(steps[index], Step::Pause(_));
                if !advance
                    || p.passed_by_own_write
                    || (!is_pause_step && held(&p))
                    || (is_pause_step
                        && (p.background_doubtful()
                            || p.status.pause_conditions.iter().any(|c| {
                                matches!(
                                    c.reason,
                                    PauseReason::UserPause | PauseReason::BudgetFreeze
                                )
                            })))
                {
                    break;
                }
                p.status
                    .pause_conditions
                    .retain(|c| c.reason != PauseReason::CanaryPauseStep);
                if own_write_now {
                    p.passed_by_own_write = true;
                } else if matches!(steps[index], Step::Pause(Some(_))) && !promoted_past {
                    p.passed_by_clock = true;
                } else {
                    p.passed_otherwise = true;
                    p.passed_unrepeatably |= !matches!(steps[index], Step::SetCanaryScale(_));
                }
                index += 1;
                started = o.now;
                let next = steps
                    .get(index)
                    .map_or_else(|| "full promotion".to_string(), |s| s.to_string());
                p.event(
                    false,
                    Reason::StepCompleted,
                    format!(
                        "step {index}/{} of {canary_hash} done; next: {next}",
                        steps.len()
                    ),
                );
            }
            p.status.current_step_index = Some(index as i32);
            p.status.current_step_started_at = Some(MicroTime(started));

            if index >= steps.len()
                && p.status.pause_conditions.is_empty()
                && !p.background_doubtful()
            {
                desired_weight = 100;
                let full = p.available(&canary_hash) >= p.replicas;
                if full && p.traffic_at(100, &canary_hash) {
                    promoted_to = Some(canary_hash.clone());
                }
            }
            if let Some(id) = promote {
                // A promote with nothing to promote past is consumed, not kept for later.
                p.handled.promote = Some(id);
            }
        }
    }

    // Requests with nothing to act on are used up now, so they cannot surprise a later
    // release (an abort typed between releases must not abort the next one).
    let idle = p.status.canary_revision.is_none() || p.status.aborted_at.is_some();
    if idle {
        let consume = |slot: &mut Option<String>, id: &Option<String>| {
            if id.is_some() {
                *slot = id.clone();
            }
        };
        consume(&mut p.handled.promote, &intents.promote);
        consume(&mut p.handled.promote_full, &intents.promote_full);
        if p.status.canary_revision.is_none() {
            consume(&mut p.handled.abort, &intents.abort);
            consume(&mut p.handled.retry, &intents.retry);
        }
    }

    if let Some(new_stable) = promoted_to.clone() {
        p.event(
            false,
            Reason::Promoted,
            format!("revision {new_stable} is now stable (was {stable})"),
        );
        for run in p
            .status
            .analysis_runs
            .iter_mut()
            .filter(|r| r.revision == new_stable && r.phase == AnalysisPhase::Running)
        {
            run.phase = AnalysisPhase::Successful;
            run.message = Some("release promoted".into());
            run.finished_at = Some(Time(o.now));
        }
        p.status.stable_revision = Some(new_stable);
        p.status.canary_revision = None;
        p.status.current_step_index = None;
        p.status.current_step_started_at = None;
        p.status.pause_conditions.clear();
        desired_weight = 0;
    }

    finish(p, &steps, desired_weight, promoted_to)
}

fn finish(mut p: Planner, steps: &[Step], desired_weight: i32, promoted: Option<String>) -> Plan {
    let o = p.o;
    let stable = p.status.stable_revision.clone().unwrap_or_default();
    let canary = p.status.canary_revision.clone();
    let aborted = p.status.aborted_at.is_some();
    let index = p.status.current_step_index.unwrap_or(0).max(0) as usize;
    let routed = !matches!(o.traffic, ObservedTraffic::None);

    let canary_available = canary.as_deref().map_or(0, |c| p.available(c));

    // Replica counts.
    let canary_target = match (&canary, aborted) {
        (Some(_), false) if index >= steps.len() => p.replicas,
        (Some(_), false) => steps::canary_replicas(steps, index, p.replicas),
        _ => 0,
    };
    // Traffic never to a canary without available pods, never to an aborted one, and a new
    // weight only once the pods it needs are available (until then the last step's weight).
    let weight = if aborted || canary.is_none() || canary_available == 0 {
        0
    } else if canary_available < canary_target {
        desired_weight
            .min(steps::weight_at(steps, index))
            .clamp(0, 100)
    } else {
        desired_weight.clamp(0, 100)
    };
    let traffic = routed.then(|| TrafficIntent {
        targets: Targets {
            stable: stable.clone(),
            canary: canary.clone().unwrap_or_else(|| stable.clone()),
        },
        canary_weight: weight,
    });
    let stable_target = if routed || canary.is_none() || aborted {
        p.replicas
    } else {
        (p.replicas - canary_target).max(0)
    };
    let scale_down_delay = p
        .canary
        .scale_down_delay
        .as_ref()
        .map_or(DEFAULT_SCALE_DOWN_DELAY, |d| d.as_std());
    let abort_delay = p
        .canary
        .abort_scale_down_delay
        .as_ref()
        .map_or(DEFAULT_SCALE_DOWN_DELAY, |d| d.as_std());
    let mut replica_sets = vec![ReplicaSetIntent {
        hash: stable.clone(),
        replicas: stable_target,
        scale_down_at: None,
    }];
    if let Some(c) = &canary {
        let intent = if aborted {
            let at = add(
                p.status.aborted_at.as_ref().map_or(o.now, |t| t.0),
                abort_delay,
            );
            if at <= o.now {
                ReplicaSetIntent {
                    hash: c.clone(),
                    replicas: 0,
                    scale_down_at: None,
                }
            } else {
                // The deadline is `abortedAt` in status plus the delay: no annotation to
                // write (a whole ReplicaSet write, during an abort), and a restart finds it.
                p.wakeups.push(at);
                ReplicaSetIntent {
                    hash: c.clone(),
                    replicas: p.rs(c).map_or(canary_target, |r| r.replicas),
                    scale_down_at: None,
                }
            }
        } else {
            ReplicaSetIntent {
                hash: c.clone(),
                replicas: canary_target,
                scale_down_at: None,
            }
        };
        replica_sets.push(intent);
    }
    for old in o
        .replica_sets
        .iter()
        .filter(|r| r.hash != stable && Some(&r.hash) != canary.as_ref())
    {
        replica_sets.push(scale_down_later(
            old,
            o.now,
            scale_down_delay,
            &mut p.wakeups,
        ));
    }

    // Counts and weights as observed.
    record_counts(&mut p.status, o);
    p.status.weights = Some(match &o.traffic {
        ObservedTraffic::State(TrafficState {
            canary_weight: Some(w),
            ..
        }) => TrafficWeights {
            stable: 100 - w,
            canary: *w,
            verified: Some(*w == weight),
        },
        ObservedTraffic::None => {
            let canary_ready = canary
                .as_deref()
                .and_then(|c| p.rs(c))
                .map_or(0, |r| r.available);
            let stable_ready = p.rs(&stable).map_or(0, |r| r.available);
            let total = canary_ready + stable_ready;
            let w = if total == 0 {
                0
            } else {
                (canary_ready * 100 + total / 2) / total
            };
            TrafficWeights {
                stable: 100 - w,
                canary: w,
                verified: None,
            }
        }
        _ => TrafficWeights {
            stable: 100 - weight,
            canary: weight,
            verified: Some(false),
        },
    });
    p.status.step_progress = canary
        .as_ref()
        .map(|_| format!("{}/{}", index.min(steps.len()), steps.len()));

    // Phase, message, conditions.
    let deadline = progress_deadline(o);
    let waiting_for_pods = canary.is_some()
        && !aborted
        && matches!(steps.get(index), Some(Step::SetWeight(_)))
        && canary_available < canary_target;
    let started = p
        .status
        .current_step_started_at
        .as_ref()
        .map_or(o.now, |t| t.0);
    let stalled = waiting_for_pods && add(started, deadline) <= o.now;
    let stable_available = p.available(&stable);
    let (phase, message) = if aborted {
        let why = conditions::message(&p.status.conditions, "Aborted")
            .unwrap_or("release aborted")
            .to_string();
        (RolloutPhase::Degraded, why)
    } else if let ObservedTraffic::Failed(why) = &o.traffic {
        (RolloutPhase::Degraded, format!("traffic routing: {why}"))
    } else if stalled {
        (
            RolloutPhase::Degraded,
            format!(
                "progress deadline exceeded: canary {} has {canary_available}/{canary_target} available pods after {}s",
                canary.clone().unwrap_or_default(),
                deadline.as_secs()
            ),
        )
    } else if let Some(pause) = p.status.pause_conditions.first() {
        let message = match pause.reason {
            PauseReason::CanaryPauseStep => format!("paused at step {}/{}", index + 1, steps.len()),
            PauseReason::InconclusiveAnalysis => {
                let why = p
                    .status
                    .analysis_runs
                    .iter()
                    .find(|r| matches!(r.phase, AnalysisPhase::Inconclusive | AnalysisPhase::Error))
                    .and_then(|r| r.message.clone())
                    .unwrap_or_default();
                format!(
                    "paused: analysis inconclusive ({why}); fix it, then `kubectl sluice promote`"
                )
            }
            PauseReason::UserPause => {
                "paused (spec.paused or `kubectl sluice pause`); `kubectl sluice resume` continues"
                    .to_string()
            }
            PauseReason::BlueGreenPause => "waiting for promotion".to_string(),
            // Set (with its message) around the planner, in `policy`.
            PauseReason::PipelineGate => "held by a Pipeline".to_string(),
            PauseReason::BudgetFreeze => p
                .budget_hold
                .clone()
                .unwrap_or_else(|| "held by an ErrorBudget".to_string()),
        };
        (RolloutPhase::Paused, message)
    } else if let Some(c) = &canary {
        (
            RolloutPhase::Progressing,
            format!(
                "releasing {c}: step {}/{}, canary weight {weight}",
                index.min(steps.len()),
                steps.len()
            ),
        )
    } else if stable_available < p.replicas {
        (
            RolloutPhase::Progressing,
            format!(
                "stable {stable}: {stable_available}/{} pods available",
                p.replicas
            ),
        )
    } else {
        (
            RolloutPhase::Healthy,
            format!(
                "stable {stable}: {stable_available}/{} pods available",
                p.replicas
            ),
        )
    };
    let progressing_reason = match phase {
        RolloutPhase::Progressing => "ReleaseProgressing",
        RolloutPhase::Paused => "ReleasePaused",
        RolloutPhase::Degraded if stalled => "ProgressDeadlineExceeded",
        RolloutPhase::Degraded => "ReleaseDegraded",
        RolloutPhase::Healthy => "ReleaseComplete",
    };
    let counts = ("stable", stable_available, p.replicas);
    record_phase(
        &mut p.status,
        &mut p.events,
        (phase, message),
        progressing_reason,
        counts,
        o,
    );
    p.status.handled_intents = Some(p.handled.clone());
    p.status.clear_intents();

    let requeue_after = schedule(
        &mut p.status,
        o,
        &p.start_runs,
        &p.wakeups,
        canary.is_some(),
    );
    let mut traffic_writes = traffic
        .as_ref()
        .map_or_else(Vec::new, |intent| route_writes(o, intent));
    let (routed, take_back_writes) = take_back(o);
    p.status.routed_objects = routed;
    traffic_writes.extend(take_back_writes);
    Plan {
        replica_sets,
        replica_sets_after_traffic: Vec::new(),
        traffic,
        traffic_writes,
        status: p.status,
        order: WriteOrder::StatusFirst,
        status_lane: Lane::Usual,
        stepped_by_clock: p.passed_by_clock && !p.passed_otherwise,
        status_needs_traffic: p.passed_by_own_write,
        status_waits: false,
        events: p.events,
        requeue_after,
        promoted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::errorbudget::BudgetAction;
    // The whole planner: the ErrorBudget policy around the canary strategy.
    use crate::api::common::Intent;
    use crate::api::rollout::{
        CanaryStep, FreezeOverride, PauseStep, RolloutSpec, RolloutStrategy,
    };
    use crate::rollout::model::TrafficWrite;
    use crate::rollout::plan::plan;
    use proptest::prelude::*;
    use std::time::Duration;

    const OLD: &str = "old";
    const NEW: &str = "new";

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn spec(steps: Vec<CanaryStep>, replicas: i32) -> RolloutSpec {
        serde_json::from_value::<RolloutSpec>(serde_json::json!({
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
            "strategy": {"canary": {}}
        }))
        .map(|mut s| {
            s.strategy = RolloutStrategy { canary: Some(Box::new(CanaryStrategy { steps, ..CanaryStrategy::default() })), blue_green: None };
            s
        })
        .unwrap()
    }

    fn weight(w: i32) -> CanaryStep {
        CanaryStep {
            set_weight: Some(w),
            pause: None,
            analysis: None,
            set_canary_scale: None,
        }
    }

    fn pause(secs: Option<u64>) -> CanaryStep {
        CanaryStep {
            set_weight: None,
            pause: Some(PauseStep {
                duration: secs
                    .map(Duration::from_secs)
                    .map(|d| crate::api::Duration::from_secs(d.as_secs())),
            }),
            analysis: None,
            set_canary_scale: None,
        }
    }

    fn rs(hash: &str, replicas: i32, available: i32) -> ObservedReplicaSet {
        ObservedReplicaSet {
            hash: hash.into(),
            replicas,
            ready: available,
            available,
            scale_down_at: None,
        }
    }

    fn releasing(index: i32) -> RolloutStatus {
        RolloutStatus {
            stable_revision: Some(OLD.into()),
            canary_revision: Some(NEW.into()),
            current_step_index: Some(index),
            current_step_started_at: Some(MicroTime(t(0))),
            ..RolloutStatus::default()
        }
    }

    fn observed(
        steps: Vec<CanaryStep>,
        status: RolloutStatus,
        canary_available: i32,
        weight: Option<i32>,
    ) -> Observed {
        Observed {
            generation: Some(1),
            spec: spec(steps, 4),
            status,
            desired_hash: NEW.into(),
            replica_sets: vec![rs(OLD, 4, 4), rs(NEW, canary_available, canary_available)],
            traffic: ObservedTraffic::State(TrafficState {
                canary_weight: weight,
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
            now: t(10),
        }
    }

    fn intent(id: &str) -> Option<Intent> {
        Some(Intent {
            id: id.into(),
            requested_at: Time(t(5)),
            requested_by: Some("alice".into()),
            reason: None,
        })
    }

    #[test]
    fn first_revision_goes_straight_to_stable() {
        let mut o = observed(vec![weight(50)], RolloutStatus::default(), 0, Some(0));
        o.replica_sets.clear();
        let plan = plan(&o);
        assert_eq!(plan.status.stable_revision.as_deref(), Some(NEW));
        assert_eq!(plan.status.canary_revision, None);
        assert_eq!(
            plan.replica_sets[0],
            ReplicaSetIntent {
                hash: NEW.into(),
                replicas: 4,
                scale_down_at: None
            }
        );
        assert_eq!(plan.traffic.unwrap().canary_weight, 0);
    }

    #[test]
    fn a_new_template_starts_a_release_at_step_zero() {
        let status = RolloutStatus {
            stable_revision: Some(OLD.into()),
            ..RolloutStatus::default()
        };
        let plan = plan(&observed(vec![weight(25)], status, 0, Some(0)));
        assert_eq!(plan.status.canary_revision.as_deref(), Some(NEW));
        assert_eq!(plan.status.current_step_index, Some(0));
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == Reason::ReleaseStarted)
        );
        // Canary pods first (25% of 4 = 1), no traffic until they are available.
        assert!(plan.replica_set_writes().contains(&ReplicaSetIntent {
            hash: NEW.into(),
            replicas: 1,
            scale_down_at: None
        }));
        assert_eq!(plan.traffic.unwrap().canary_weight, 0);
    }

    #[test]
    fn weight_is_set_once_pods_are_available_and_step_advances_once_verified() {
        // Another step follows the weight, so the weight step waits for its route to be read
        // back (before a pause, its own route write would complete it).
        let steps = vec![weight(25), weight(25), pause(None)];
        let plan1 = plan(&observed(steps.clone(), releasing(0), 1, Some(0)));
        assert_eq!(plan1.traffic.as_ref().unwrap().canary_weight, 25);
        assert_eq!(plan1.status.current_step_index, Some(0), "not verified yet");
        let plan2 = plan(&observed(steps, releasing(0), 1, Some(25)));
        assert_eq!(plan2.status.current_step_index, Some(2));
        assert_eq!(plan2.status.phase, Some(RolloutPhase::Paused));
        assert_eq!(plan2.traffic.unwrap().canary_weight, 25);
    }

    #[test]
    fn timed_pauses_count_from_the_step_start_in_status() {
        let steps = vec![weight(25), pause(Some(20))];
        let mut o = observed(steps, releasing(1), 1, Some(25));
        let waiting = plan(&o);
        assert_eq!(waiting.status.current_step_index, Some(1));
        assert_eq!(
            waiting.requeue_after,
            Duration::from_secs(10),
            "started at 0, now 10, 20s pause"
        );
        o.now = t(20);
        let done = plan(&o);
        assert_eq!(done.status.current_step_index, Some(2));
        assert_eq!(
            done.traffic.unwrap().canary_weight,
            25,
            "full weight waits for the full canary"
        );
        o.replica_sets[1] = rs(NEW, 4, 4);
        let full = plan(&o);
        assert_eq!(
            full.traffic.unwrap().canary_weight,
            100,
            "after the last step: full weight"
        );
    }

    #[test]
    fn promote_passes_an_indefinite_pause_once() {
        let steps = vec![weight(25), pause(None), weight(50), pause(None)];
        let mut status = releasing(1);
        status.promote = intent("p1");
        let plan1 = plan(&observed(steps.clone(), status, 2, Some(25)));
        assert_eq!(plan1.status.current_step_index, Some(2));
        assert_eq!(
            plan1
                .status
                .handled_intents
                .as_ref()
                .unwrap()
                .promote
                .as_deref(),
            Some("p1")
        );
        assert_eq!(
            plan1.status.promote, None,
            "the operator never writes the person's field"
        );
        // The same intent seen again (handled) does not pass the next pause.
        let mut status = plan1.status.clone();
        status.promote = intent("p1");
        status.current_step_index = Some(3);
        let plan2 = plan(&observed(steps, status, 2, Some(50)));
        assert_eq!(plan2.status.current_step_index, Some(3));
    }

    #[test]
    fn abort_sends_traffic_to_stable_and_retry_starts_over() {
        let steps = vec![weight(50), pause(None)];
        let mut status = releasing(1);
        status.abort = intent("a1");
        let aborted = plan(&observed(steps.clone(), status, 2, Some(50)));
        assert_eq!(aborted.traffic.as_ref().unwrap().canary_weight, 0);
        assert_eq!(aborted.status.phase, Some(RolloutPhase::Degraded));
        assert!(aborted.status.aborted_at.is_some());
        let mut status = aborted.status.clone();
        status.retry = intent("r1");
        let retried = plan(&observed(steps, status, 2, Some(0)));
        assert_eq!(retried.status.aborted_at, None);
        assert!(
            retried.status.analysis_runs.is_empty(),
            "old verdicts must not abort the retry"
        );
        assert_eq!(retried.status.current_step_index, Some(0));
        assert_eq!(retried.traffic.unwrap().canary_weight, 50);
    }

    /// Traffic leaves the canary before anything waits on its ReplicaSet: the abort's write
    /// that only schedules the canary's scale-down comes after the weight change, while a
    /// step that needs more canary pods still creates them before sending traffic.
    #[test]
    fn replica_sets_that_add_no_pods_wait_for_the_traffic() {
        let steps = vec![weight(50), pause(None)];
        let mut status = releasing(1);
        status.abort = intent("a1");
        let aborted = plan(&observed(steps, status, 2, Some(50)));
        assert_eq!(aborted.traffic_writes.len(), 1);
        assert!(
            aborted.replica_sets.is_empty(),
            "{:?}",
            aborted.replica_sets
        );
        let canary = aborted
            .replica_sets_after_traffic
            .iter()
            .find(|r| r.hash == NEW)
            .expect("the canary's scale-down is scheduled after the traffic moved");
        assert_eq!(canary.replicas, 2);
        assert!(
            canary.scale_down_at.is_none(),
            "the deadline is abortedAt + abortScaleDownDelay, from status"
        );

        let stepping = plan(&observed(vec![weight(50)], releasing(0), 0, Some(0)));
        assert!(
            stepping
                .replica_sets
                .iter()
                .any(|r| r.hash == NEW && r.replicas == 2),
            "{:?}",
            stepping.replica_sets
        );
        assert!(stepping.replica_sets_after_traffic.is_empty());
    }

    #[test]
    fn a_persons_abort_moves_traffic_before_its_status_other_aborts_record_first() {
        use crate::api::rollout::TrafficWeights;
        let steps = vec![weight(50), pause(None)];
        let asked_to_abort = || RolloutStatus {
            abort: intent("a1"),
            ..releasing(1)
        };
        let by_person = plan(&observed(steps.clone(), asked_to_abort(), 2, Some(50)));
        assert_eq!(by_person.order, WriteOrder::TrafficFirst);
        assert!(matches!(
            by_person.traffic_writes.as_slice(),
            [TrafficWrite::Route {
                canary_weight: 0,
                ..
            }]
        ));
        // Recorded once the route is written: the weights just written, verified.
        assert_eq!(
            by_person.status.weights,
            Some(TrafficWeights {
                stable: 100,
                canary: 0,
                verified: Some(true)
            })
        );
        // The same request once handled: nothing to move, nothing more to record.
        let again = plan(&observed(
            steps.clone(),
            by_person.status.clone(),
            2,
            Some(0),
        ));
        assert_eq!(again.order, WriteOrder::StatusFirst);
        assert_eq!(again.status.weights, by_person.status.weights);
        // A router that could not be read: nothing says the route writes will take.
        let mut broken = observed(steps.clone(), asked_to_abort(), 2, Some(50));
        broken.traffic = ObservedTraffic::Failed("no VirtualService".into());
        let blind = plan(&broken);
        assert_ne!(
            blind.status.weights.and_then(|w| w.verified),
            Some(true),
            "verified without a router read"
        );
        // A budget's abort is not a request waiting in status: recorded first.
        let mut o = observed(steps.clone(), releasing(1), 2, Some(50));
        o.budgets = vec![hold(BudgetAction::Rollback)];
        let by_budget = plan(&o);
        assert!(by_budget.status.aborted_at.is_some());
        assert_eq!(by_budget.order, WriteOrder::StatusFirst);
        // A release stepping forward on pods and weights to a step other than a pause:
        // recorded first.
        let stepping = plan(&observed(
            vec![weight(50), weight(60)],
            releasing(0),
            2,
            Some(0),
        ));
        assert_eq!(stepping.order, WriteOrder::StatusFirst);
    }

    #[test]
    fn passes_wait_for_the_next_write_unless_the_plan_moves_traffic() {
        use crate::analysis::condition::MeasuredValue;
        use crate::rollout::runs;
        // Paused at 20% for a person, a background analysis measuring every 5 s.
        let steps = vec![weight(20), pause(None)];
        let mut o = observed(steps, releasing(1), 4, Some(20));
        let background: crate::api::analysis::AnalysisSpec = serde_json::from_value(
            serde_json::json!({"interval": "5s", "metrics": [{"name": "errors",
                "prometheus": {"query": "q"}, "successCondition": "result < 1"}]}),
        )
        .unwrap();
        o.background = Some(analysis::resolve(&background, None, None));
        o.passes_wait = Duration::from_secs(30);
        let strategy = o.spec.strategy.clone();
        let measured = |status: &mut RolloutStatus, at: Timestamp| {
            let bg = o.background.as_ref();
            let due = runs::due(status, &strategy, bg, ("web", "shop"), OLD, at);
            let results = due.into_iter().map(|d| (d, Ok(MeasuredValue::Number(0.0))));
            runs::record(status, &strategy, bg, results.collect(), at);
        };
        runs::start(
            &mut o.status,
            &strategy,
            o.background.as_ref(),
            &[(RunName::Background, NEW.into())],
            t(0),
        );
        measured(&mut o.status, t(0));
        // The status the plan settles on, as recorded.
        let settled = plan(&o).status;
        o.status = settled.clone();
        assert_eq!(plan(&o).status, settled, "settled");
        assert!(!plan(&o).status_waits, "nothing new");

        measured(&mut o.status, t(10));
        o.recorded_runs = Some(settled.analysis_runs.clone());
        let passed = plan(&o);
        assert!(passed.status_waits, "a pass alone waits");
        assert_ne!(
            passed.status.analysis_runs, settled.analysis_runs,
            "kept for the next write"
        );
        // Traffic to put back: the status is written, passes and all.
        let drifted = Observed {
            traffic: ObservedTraffic::State(TrafficState {
                canary_weight: Some(0),
                targets_match: true,
            }),
            ..o.clone()
        };
        let moving = plan(&drifted);
        assert!(!moving.traffic_writes.is_empty() && !moving.status_waits);
        assert_eq!(moving.status.analysis_runs, passed.status.analysis_runs);
        // With the flag at 0, each one is written.
        o.passes_wait = Duration::ZERO;
        assert!(!plan(&o).status_waits);
    }

    #[test]
    fn the_status_write_takes_the_lane_of_what_waits_on_it() {
        let steps = vec![weight(20), pause(Some(5)), weight(50), pause(None)];
        let lane_of = |steps: Vec<CanaryStep>, status: RolloutStatus, weight: Option<i32>, now| {
            let mut o = observed(steps, status, 4, weight);
            o.now = t(now);
            let plan = plan(&o);
            (plan.status_lane, plan.order, plan.traffic_writes.is_empty())
        };
        let lane = |status, weight, now| lane_of(steps.clone(), status, weight, now);
        // A route to move, its decision recorded first: the move waits on it now.
        assert_eq!(
            lane_of(vec![weight(20), weight(50)], releasing(0), Some(0), 10),
            (Lane::Urgent, WriteOrder::StatusFirst, false)
        );
        // The weight reached: the timed pause that starts counts from this record.
        assert_eq!(
            lane(releasing(0), Some(20), 10),
            (Lane::Progress, WriteOrder::StatusFirst, true)
        );
        // The weight written by this plan, the pause after it begun in the status that
        // follows the route: the same deadline.
        assert_eq!(
            lane(releasing(0), Some(0), 10),
            (Lane::Progress, WriteOrder::TrafficFirst, false)
        );
        // A pause without a duration has no deadline: its record holds only its Rollout.
        let mut untimed = observed(vec![weight(20), pause(None)], releasing(0), 4, Some(20));
        untimed.now = t(10);
        assert_eq!(
            (
                plan(&untimed).status_lane,
                plan(&untimed).status.current_step_index
            ),
            (Lane::Usual, Some(1))
        );
        // A timed pause ran out: the route went first, and the record starts the pause after
        // the weight (no deadline), yet holds the Rollout's next reconcile: not a mere record.
        assert_eq!(
            lane(releasing(1), Some(20), 10),
            (Lane::Usual, WriteOrder::TrafficFirst, false)
        );
        // A person's promote is recorded before the route moves.
        let promote = RolloutStatus {
            promote: intent("p1"),
            ..releasing(1)
        };
        assert_eq!(
            lane(promote, Some(20), 3),
            (Lane::Urgent, WriteOrder::StatusFirst, false)
        );
        // A person's abort moved the route first: nothing waits on its record, which gives
        // way to the routes still moving.
        let abort = RolloutStatus {
            abort: intent("a1"),
            ..releasing(1)
        };
        assert_eq!(
            lane(abort, Some(20), 3),
            (Lane::Record, WriteOrder::TrafficFirst, false)
        );
        // Within the pause, nothing new.
        assert_eq!(
            lane(releasing(1), Some(20), 3),
            (Lane::Usual, WriteOrder::StatusFirst, true)
        );
    }

    #[test]
    fn a_timed_pause_that_ran_out_moves_traffic_before_its_status_a_promote_records_first() {
        use crate::api::rollout::TrafficWeights;
        let steps = vec![weight(20), pause(Some(5)), weight(50), pause(None)];
        // At 20%, the 5 s pause started at t(0) and it is t(10).
        let due = observed(steps.clone(), releasing(1), 4, Some(20));
        let timed = plan(&due);
        assert!(timed.stepped_by_clock);
        assert_eq!(timed.order, WriteOrder::TrafficFirst);
        // The weight step is done by this plan's own route write, and the pause after it
        // begins in the same status (written only if the route write succeeds).
        assert_eq!(timed.status.current_step_index, Some(3));
        assert!(timed.status_needs_traffic);
        assert_eq!(
            timed.status.weights,
            Some(TrafficWeights {
                stable: 50,
                canary: 50,
                verified: Some(true)
            })
        );
        // The operator stopped after the route write, before the status: from the status as
        // it was, the next reconcile passes the same pause and moves nothing back.
        let (after_lost, after_kept) = next_plans(&due, &timed);
        assert!(after_lost.traffic_writes.is_empty());
        assert_eq!(after_lost.traffic, after_kept.traffic);
        assert_eq!(
            after_lost.status.current_step_index,
            after_kept.status.current_step_index
        );
        // A promote past a pause: the request is recorded first.
        let promoted = plan(&observed(
            vec![weight(20), pause(None), weight(50), pause(None)],
            RolloutStatus {
                promote: intent("p1"),
                ..releasing(1)
            },
            4,
            Some(20),
        ));
        assert_eq!(promoted.status.current_step_index, Some(2));
        assert!(!promoted.stepped_by_clock);
        assert!(!promoted.status_needs_traffic);
        assert_eq!(promoted.order, WriteOrder::StatusFirst);
        // A pause not yet over moves nothing.
        let mut early = due;
        early.now = t(3);
        assert!(plan(&early).traffic_writes.is_empty());
    }

    #[test]
    fn a_weight_step_before_a_pause_is_recorded_with_its_route_write() {
        use crate::api::rollout::TrafficWeights;
        // At 20%, the 5 s pause started at t(0) and it is t(10).
        let due = |steps: Vec<CanaryStep>| plan(&observed(steps, releasing(1), 4, Some(20)));
        let two_pauses = due(vec![
            weight(20),
            pause(Some(5)),
            weight(50),
            pause(Some(30)),
        ]);
        assert_eq!(two_pauses.order, WriteOrder::TrafficFirst);
        assert!(two_pauses.status_needs_traffic);
        assert_eq!(
            two_pauses.traffic.as_ref().map(|t| t.canary_weight),
            Some(50)
        );
        assert_eq!(two_pauses.status.current_step_index, Some(3));
        // The next pause counts from this plan.
        assert_eq!(
            two_pauses.status.current_step_started_at,
            Some(MicroTime(t(10)))
        );
        // Woken by the pause's end at the latest (a release in flight resyncs sooner).
        assert!(two_pauses.requeue_after <= Duration::from_secs(30));
        assert_eq!(two_pauses.status.phase, Some(RolloutPhase::Paused));
        assert_eq!(
            two_pauses.status.weights,
            Some(TrafficWeights {
                stable: 50,
                canary: 50,
                verified: Some(true)
            })
        );
        // The route as written and the status as recorded: nothing more to write.
        let (_, kept) = next_plans(
            &observed(
                vec![weight(20), pause(Some(5)), weight(50), pause(Some(30))],
                releasing(1),
                4,
                Some(20),
            ),
            &two_pauses,
        );
        assert!(kept.traffic_writes.is_empty());
        assert_eq!(kept.status.current_step_index, Some(3));
        assert!(!kept.status_needs_traffic);

        // Before a pause that takes no time, the weight step waits for its route: the
        // pause would end at once, and the route holds one weight per write.
        let zero = due(vec![
            weight(20),
            pause(Some(5)),
            weight(50),
            pause(Some(0)),
            weight(80),
        ]);
        assert_eq!(zero.status.current_step_index, Some(2));
        assert!(!zero.status_needs_traffic);
        assert_eq!(zero.traffic.as_ref().map(|t| t.canary_weight), Some(50));
        // Nor after a weight step passed in the same plan: its route is about to change.
        let two = plan(&observed(
            vec![weight(20), weight(50), pause(None)],
            releasing(0),
            4,
            Some(20),
        ));
        assert_eq!(two.status.current_step_index, Some(1));
        assert!(!two.status_needs_traffic);

        // Without a pause after it, the weight step waits for its route as before.
        for next in [weight(80), analysis_step(), canary_scale(Some(2), None)] {
            let unpaused = due(vec![weight(20), pause(Some(5)), weight(50), next]);
            assert_eq!(unpaused.status.current_step_index, Some(2));
            assert!(!unpaused.status_needs_traffic);
            assert_eq!(unpaused.order, WriteOrder::TrafficFirst);
        }
        let last = due(vec![weight(20), pause(Some(5)), weight(50)]);
        assert_eq!(last.status.current_step_index, Some(2));
        assert!(!last.status_needs_traffic);

        // Reached without a pause (its pods just became available): the same.
        let ready = plan(&observed(
            vec![weight(20), pause(Some(5)), weight(50), pause(None)],
            releasing(0),
            4,
            Some(0),
        ));
        assert_eq!(ready.order, WriteOrder::TrafficFirst);
        assert!(ready.status_needs_traffic);
        assert!(!ready.stepped_by_clock);
        assert_eq!(ready.status.current_step_index, Some(1));
        assert_eq!(ready.traffic.as_ref().map(|t| t.canary_weight), Some(20));

        // Canary pods not yet available for the weight: the step waits for them.
        let steps = vec![weight(20), pause(Some(5)), weight(100), pause(None)];
        let mut short = observed(steps.clone(), releasing(1), 1, Some(20));
        short.replica_sets = vec![rs(OLD, 4, 4), rs(NEW, 4, 1)];
        let waiting = plan(&short);
        assert_eq!(waiting.status.current_step_index, Some(2));
        assert!(!waiting.status_needs_traffic);

        // A router not read fine, a request pending, a person's pause: as before.
        let mut failed = observed(steps.clone(), releasing(1), 4, Some(20));
        failed.traffic = ObservedTraffic::Failed("no route".into());
        assert!(!plan(&failed).status_needs_traffic);
        for status in [
            RolloutStatus {
                abort: intent("a1"),
                ..releasing(1)
            },
            RolloutStatus {
                override_freeze: intent("o1"),
                ..releasing(1)
            },
        ] {
            let pending = plan(&observed(steps.clone(), status, 4, Some(20)));
            assert!(!pending.status_needs_traffic);
        }
        let mut paused = observed(steps, releasing(1), 4, Some(20));
        paused.spec.paused = Some(true);
        assert!(!plan(&paused).status_needs_traffic);
    }

    #[test]
    fn an_aborted_release_takes_no_more_measurements() {
        use crate::rollout::runs;
        let spec: crate::api::analysis::AnalysisSpec = serde_json::from_value(serde_json::json!(
            {"metrics": [{"name": "bg", "prometheus": {"query": "q"}, "successCondition": "result < 1"}]}
        ))
        .unwrap();
        let mut o = observed(vec![weight(50), pause(None)], releasing(1), 2, Some(50));
        o.spec.strategy.canary.as_mut().unwrap().analysis = Some(spec.clone());
        o.background = Some(analysis::resolve(&spec, None, None));
        let later = add(o.now, Duration::from_secs(3600));
        let due = |status: &RolloutStatus| {
            runs::due(
                status,
                &o.spec.strategy,
                o.background.as_ref(),
                ("r", "ns"),
                OLD,
                later,
            )
        };
        let measuring = plan(&o);
        assert!(
            !due(&measuring.status).is_empty(),
            "the background run measures"
        );
        let mut asked = o.clone();
        asked.status = measuring.status;
        asked.status.abort = intent("a1");
        let aborted = plan(&asked);
        assert!(aborted.status.aborted_at.is_some());
        assert!(due(&aborted.status).is_empty(), "measured after the abort");
        assert_eq!(
            runs::next_due(&aborted.status, &o.spec.strategy, o.background.as_ref()),
            None
        );
    }

    #[test]
    fn promote_full_skips_to_full_weight_then_promotes() {
        let steps = vec![weight(10), pause(None), weight(50)];
        let mut status = releasing(1);
        status.promote_full = intent("f1");
        let full = plan(&observed(steps.clone(), status, 1, Some(10)));
        assert_eq!(full.status.current_step_index, Some(3));
        assert_eq!(
            full.traffic.as_ref().unwrap().canary_weight,
            50,
            "100 waits for 4 pods"
        );
        let scaled = plan(&observed(steps.clone(), full.status.clone(), 4, Some(50)));
        assert_eq!(scaled.traffic.as_ref().unwrap().canary_weight, 100);
        assert!(full.replica_sets.contains(&ReplicaSetIntent {
            hash: NEW.into(),
            replicas: 4,
            scale_down_at: None
        }));
        let promoted = plan(&observed(steps, full.status.clone(), 4, Some(100)));
        assert_eq!(promoted.status.stable_revision.as_deref(), Some(NEW));
        assert_eq!(promoted.status.canary_revision, None);
        assert_eq!(
            promoted.traffic.as_ref().unwrap().targets,
            Targets {
                stable: NEW.into(),
                canary: NEW.into()
            }
        );
        assert_eq!(promoted.traffic.unwrap().canary_weight, 0);
    }

    #[test]
    fn a_canary_without_pods_past_the_deadline_is_degraded_but_not_aborted() {
        let mut o = observed(vec![weight(50)], releasing(0), 0, Some(0));
        o.spec.progress_deadline_seconds = Some(60);
        o.now = t(30);
        assert_eq!(plan(&o).status.phase, Some(RolloutPhase::Progressing));
        o.now = t(61);
        let late = plan(&o);
        assert_eq!(late.status.phase, Some(RolloutPhase::Degraded));
        assert!(
            late.status
                .message
                .unwrap()
                .contains("progress deadline exceeded")
        );
        assert!(
            late.status.aborted_at.is_none(),
            "pods may still come: not an abort"
        );
        assert_eq!(late.traffic.unwrap().canary_weight, 0);
    }

    #[test]
    fn requests_between_releases_do_not_touch_the_next_one() {
        let mut status = RolloutStatus {
            stable_revision: Some(NEW.into()),
            ..RolloutStatus::default()
        };
        status.abort = intent("a");
        status.promote_full = intent("f");
        let idle = plan(&observed(vec![weight(50)], status, 0, Some(0)));
        let handled = idle.status.handled_intents.clone().unwrap();
        assert_eq!(
            (handled.abort.as_deref(), handled.promote_full.as_deref()),
            (Some("a"), Some("f"))
        );
        // The next release starts clean even though the person's fields are still set.
        let mut next = idle.status.clone();
        next.stable_revision = Some(OLD.into());
        next.abort = intent("a");
        next.promote_full = intent("f");
        let release = plan(&observed(vec![weight(50), pause(None)], next, 2, Some(0)));
        assert!(release.status.aborted_at.is_none());
        assert_eq!(release.status.current_step_index, Some(0));
    }

    #[test]
    fn a_person_pauses_and_resumes() {
        let steps = vec![weight(25), pause(Some(1))];
        let mut status = releasing(0);
        status.pause = intent("x");
        let paused = plan(&observed(steps.clone(), status.clone(), 1, Some(25)));
        assert_eq!(paused.status.phase, Some(RolloutPhase::Paused));
        assert_eq!(paused.status.current_step_index, Some(0));
        status.resume = Some(Intent {
            id: "y".into(),
            requested_at: Time(t(6)),
            requested_by: None,
            reason: None,
        });
        let resumed = plan(&observed(steps, status, 1, Some(25)));
        assert_eq!(resumed.status.current_step_index, Some(1));
    }

    #[test]
    fn template_back_to_stable_cancels_the_release() {
        let mut o = observed(vec![weight(50)], releasing(0), 2, Some(50));
        o.desired_hash = OLD.into();
        let plan = plan(&o);
        assert_eq!(plan.status.canary_revision, None);
        assert_eq!(plan.traffic.unwrap().canary_weight, 0);
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == Reason::ReleaseCancelled)
        );
    }

    #[test]
    fn a_third_template_supersedes_the_canary() {
        let mut o = observed(vec![weight(50)], releasing(1), 2, Some(50));
        o.desired_hash = "third".into();
        let plan = plan(&o);
        assert_eq!(plan.status.canary_revision.as_deref(), Some("third"));
        assert_eq!(plan.status.current_step_index, Some(0));
        assert_eq!(
            plan.traffic.as_ref().unwrap().canary_weight,
            0,
            "the new canary has no pods yet"
        );
        let superseded = plan
            .replica_set_writes()
            .into_iter()
            .find(|r| r.hash == NEW)
            .unwrap();
        assert!(
            superseded.scale_down_at.is_some(),
            "the superseded canary is scaled down after the delay"
        );
    }

    #[test]
    fn without_a_router_stable_shrinks_as_the_canary_grows() {
        let mut o = observed(vec![weight(50), pause(None)], releasing(0), 2, None);
        o.traffic = ObservedTraffic::None;
        let plan = plan(&o);
        assert!(plan.traffic.is_none());
        assert!(plan.replica_set_writes().contains(&ReplicaSetIntent {
            hash: NEW.into(),
            replicas: 2,
            scale_down_at: None
        }));
        assert!(plan.replica_set_writes().contains(&ReplicaSetIntent {
            hash: OLD.into(),
            replicas: 2,
            scale_down_at: None
        }));
        assert_eq!(plan.status.current_step_index, Some(1));
    }

    #[test]
    fn missing_routing_objects_degrade_without_touching_stable() {
        let mut o = observed(vec![weight(50)], releasing(0), 2, None);
        o.traffic = ObservedTraffic::Failed("VirtualService shop/web not found".into());
        let plan = plan(&o);
        assert_eq!(plan.status.phase, Some(RolloutPhase::Degraded));
        assert!(
            plan.status
                .message
                .as_deref()
                .unwrap()
                .contains("VirtualService shop/web not found")
        );
        assert!(plan.replica_set_writes().contains(&ReplicaSetIntent {
            hash: OLD.into(),
            replicas: 4,
            scale_down_at: None
        }));
        assert_eq!(plan.status.current_step_index, Some(0));
    }

    fn analysis_step() -> CanaryStep {
        let metric: crate::api::analysis::Metric = serde_json::from_value(serde_json::json!(
            {"name": "m", "prometheus": {"query": "q"}, "successCondition": "result < 1"}
        ))
        .unwrap();
        CanaryStep {
            set_weight: None,
            pause: None,
            analysis: Some(crate::api::rollout::StepAnalysis {
                metrics: vec![metric],
                ..Default::default()
            }),
            set_canary_scale: None,
        }
    }

    fn canary_scale(replicas: Option<i32>, weight: Option<i32>) -> CanaryStep {
        CanaryStep {
            set_weight: None,
            pause: None,
            analysis: None,
            set_canary_scale: Some(crate::api::rollout::SetCanaryScale {
                replicas,
                weight,
                match_traffic_weight: (replicas.is_none() && weight.is_none()).then_some(true),
            }),
        }
    }

    fn hold(action: BudgetAction) -> crate::rollout::model::BudgetHold {
        crate::rollout::model::BudgetHold {
            budget: "shop/avail".into(),
            action,
            consumed_percent: Some(85.0),
            threshold: Some(80),
            rollback_window: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_freeze_holds_a_new_revision_on_stable_until_overridden() {
        let stable_only = RolloutStatus {
            stable_revision: Some(OLD.into()),
            ..RolloutStatus::default()
        };
        let mut o = observed(vec![weight(50), pause(None)], stable_only, 0, Some(0));
        o.budgets = vec![hold(BudgetAction::FreezePromotions)];
        let held = plan(&o);
        assert_eq!(held.status.canary_revision, None);
        assert_eq!(held.status.phase, Some(RolloutPhase::Paused));
        let message = held.status.message.clone().unwrap_or_default();
        assert!(
            message.contains("shop/avail") && message.contains("85.0%"),
            "{message}"
        );
        assert!(
            held.events
                .iter()
                .any(|e| e.reason == Reason::FrozenByErrorBudget)
        );
        assert!(
            held.replica_sets
                .iter()
                .all(|r| r.hash != NEW || r.replicas == 0)
        );
        assert_eq!(held.traffic.as_ref().unwrap().canary_weight, 0);

        // Held again: no second Event, and the pause keeps its start.
        let mut again = o.clone();
        again.status = held.status.clone();
        again.now = t(60);
        let still = plan(&again);
        assert!(still.events.is_empty());
        assert_eq!(
            still.status.pause_conditions, held.status.pause_conditions,
            "same reason, same start"
        );

        // A person overrides: the release starts, and the override is on record.
        let mut status = held.status.clone();
        status.override_freeze = intent("o");
        status.override_freeze.as_mut().unwrap().reason = Some("P0 fix".into());
        let mut o2 = o.clone();
        o2.status = status;
        let released = plan(&o2);
        assert_eq!(released.status.canary_revision.as_deref(), Some(NEW));
        let record = released.status.freeze_override.clone().unwrap();
        assert_eq!(
            (record.revision.as_str(), record.reason.as_deref()),
            (NEW, Some("P0 fix"))
        );
        assert!(
            released
                .events
                .iter()
                .any(|e| e.reason == Reason::FreezeOverridden)
        );

        // The budget recovers: the release starts by itself.
        let mut thawed = o.clone();
        thawed.status = held.status;
        thawed.budgets.clear();
        assert_eq!(plan(&thawed).status.canary_revision.as_deref(), Some(NEW));
    }

    #[test]
    fn a_rollback_threshold_aborts_the_release_in_flight() {
        let mut o = observed(vec![weight(50), pause(None)], releasing(1), 2, Some(50));
        o.budgets = vec![hold(BudgetAction::Rollback)];
        let aborted = plan(&o);
        assert!(aborted.status.aborted_at.is_some());
        assert_eq!(aborted.traffic.unwrap().canary_weight, 0);
        assert!(
            aborted
                .events
                .iter()
                .any(|e| e.reason == Reason::AbortedByErrorBudget)
        );
        assert!(
            aborted
                .status
                .message
                .unwrap_or_default()
                .contains("shop/avail")
        );
    }

    /// A release of NEW that completed at `t(0)` (OLD before it, now scaled down).
    fn just_promoted() -> Observed {
        let status = RolloutStatus {
            stable_revision: Some(NEW.into()),
            last_promotion: Some(crate::api::rollout::Promotion {
                revision: NEW.into(),
                previous: OLD.into(),
                at: Time(t(0)),
            }),
            ..RolloutStatus::default()
        };
        let mut o = observed(vec![weight(50)], status, 4, Some(0));
        o.replica_sets = vec![rs(NEW, 4, 4), rs(OLD, 0, 0)];
        o
    }

    #[test]
    fn a_rollback_threshold_takes_back_a_release_completed_within_the_window() {
        let mut o = just_promoted();
        o.budgets = vec![hold(BudgetAction::Rollback)];

        // First the old revision's pods; traffic stays where it is until they are available.
        let restoring = plan(&o);
        let record = restoring.status.budget_rollback.clone().unwrap();
        assert_eq!((record.revision.as_str(), record.to.as_str()), (NEW, OLD));
        assert_eq!(restoring.status.stable_revision.as_deref(), Some(NEW));
        assert!(restoring.replica_sets.contains(&ReplicaSetIntent {
            hash: OLD.into(),
            replicas: 4,
            scale_down_at: None
        }));
        assert_eq!(restoring.traffic.as_ref().unwrap().targets.stable, NEW);
        assert!(restoring.traffic_writes.is_empty());
        assert_eq!(restoring.status.phase, Some(RolloutPhase::Progressing));
        assert!(
            restoring
                .events
                .iter()
                .any(|e| e.reason == Reason::RolledBackByErrorBudget && e.warning)
        );

        // The old revision is up: stable moves to it at once, the new one waits its delay.
        let mut o2 = o.clone();
        o2.status = restoring.status.clone();
        o2.replica_sets = vec![rs(NEW, 4, 4), rs(OLD, 4, 4)];
        let moved = plan(&o2);
        assert_eq!(moved.status.stable_revision.as_deref(), Some(OLD));
        assert_eq!(moved.status.canary_revision, None);
        assert_eq!(
            moved.traffic_writes.first(),
            Some(&TrafficWrite::Route {
                targets: Targets {
                    stable: OLD.into(),
                    canary: OLD.into()
                },
                canary_weight: 0
            })
        );
        let new_rs = moved
            .replica_set_writes()
            .into_iter()
            .find(|r| r.hash == NEW)
            .unwrap();
        assert_eq!(new_rs.replicas, 4, "kept for the scale-down delay");
        assert!(new_rs.scale_down_at.is_some());
        assert_eq!(moved.status.phase, Some(RolloutPhase::Degraded));
        assert_eq!(
            moved
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "Progressing")
                .map(|c| c.reason.as_str()),
            Some("RolledBackByErrorBudget")
        );
        assert_eq!(
            moved.status.updated_replicas,
            Some(4),
            "the template's pods"
        );

        // The budget recovers: the rolled-back revision is not released again by itself.
        let mut o3 = o2.clone();
        o3.status = moved.status.clone();
        o3.budgets.clear();
        let stays = plan(&o3);
        assert_eq!(stays.status.stable_revision.as_deref(), Some(OLD));
        assert_eq!(stays.status.canary_revision, None);
        assert!(stays.events.is_empty(), "{:?}", stays.events);

        // A person retries: it is released again, as a canary from the old revision.
        let mut o4 = o3.clone();
        o4.status.retry = intent("r");
        let retried = plan(&o4);
        assert_eq!(retried.status.budget_rollback, None);
        assert_eq!(retried.status.canary_revision.as_deref(), Some(NEW));

        // Or the template changes: that revision is released from the old one.
        let mut o5 = o3.clone();
        o5.desired_hash = "newer".into();
        let next = plan(&o5);
        assert_eq!(next.status.budget_rollback, None);
        assert_eq!(next.status.canary_revision.as_deref(), Some("newer"));
        assert_eq!(next.status.stable_revision.as_deref(), Some(OLD));
    }

    #[test]
    fn a_completed_release_is_not_rolled_back_outside_the_window_or_without_its_predecessor() {
        let mut late = just_promoted();
        late.budgets = vec![hold(BudgetAction::Rollback)];
        late.now = t(3600);
        assert_eq!(plan(&late).status.budget_rollback, None, "window over");

        let mut gone = just_promoted();
        gone.budgets = vec![hold(BudgetAction::Rollback)];
        gone.replica_sets.retain(|r| r.hash != OLD);
        assert_eq!(plan(&gone).status.budget_rollback, None, "no ReplicaSet");

        let mut frozen = just_promoted();
        frozen.budgets = vec![hold(BudgetAction::FreezePromotions)];
        assert_eq!(plan(&frozen).status.budget_rollback, None, "a freeze only");

        let mut overridden = just_promoted();
        overridden.budgets = vec![hold(BudgetAction::FreezePromotions)];
        overridden.status.freeze_override = Some(FreezeOverride {
            revision: NEW.into(),
            requested_by: Some("alice".into()),
            reason: Some("P0 fix".into()),
            at: Time(t(0)),
        });
        assert_eq!(plan(&overridden).status.budget_rollback, None);
    }

    #[test]
    fn an_override_lifts_a_freeze_but_not_a_rollback_threshold() {
        let mut o = observed(vec![weight(50), pause(None)], releasing(1), 2, Some(50));
        o.status.freeze_override = Some(FreezeOverride {
            revision: NEW.into(),
            requested_by: Some("alice".into()),
            reason: Some("P0 fix".into()),
            at: Time(t(0)),
        });
        o.budgets = vec![hold(BudgetAction::FreezePromotions)];
        let through = plan(&o);
        assert_eq!(through.status.aborted_at, None);
        assert!(
            through
                .status
                .pause_conditions
                .iter()
                .all(|c| c.reason != PauseReason::BudgetFreeze)
        );
        o.budgets = vec![hold(BudgetAction::Rollback)];
        assert!(plan(&o).status.aborted_at.is_some(), "fail safe");
    }

    #[test]
    fn a_pipeline_stage_holds_a_release_it_has_not_admitted() {
        use crate::api::pipeline::Release;
        use crate::rollout::model::PipelineGate;
        let release = |tag: &str| Release {
            images: vec![format!("web:{tag}")],
        };
        let stable_only = RolloutStatus {
            stable_revision: Some(OLD.into()),
            ..RolloutStatus::default()
        };
        let mut o = observed(vec![weight(50)], stable_only, 0, Some(0));
        o.release = release("2");
        o.pipeline = Some(PipelineGate {
            pipeline: "sluice-system/checkout".into(),
            stage: "prod".into(),
            admitted: Some(release("1")),
            waiting: Some("approval: waiting for approval".into()),
            conflict: None,
        });
        let held = plan(&o);
        assert_eq!(held.status.canary_revision, None);
        assert_eq!(held.status.phase, Some(RolloutPhase::Paused));
        assert!(
            held.status
                .pause_conditions
                .iter()
                .any(|c| c.reason == PauseReason::PipelineGate)
        );
        let message = held.status.message.clone().unwrap_or_default();
        assert!(
            message.contains("sluice-system/checkout") && message.contains("stage prod"),
            "{message}"
        );
        assert!(
            held.events
                .iter()
                .any(|e| e.reason == Reason::HeldByPipeline)
        );

        // Admitted: the release starts.
        let mut admitted = o.clone();
        admitted.status = held.status.clone();
        admitted.pipeline.as_mut().unwrap().admitted = Some(release("2"));
        let started = plan(&admitted);
        assert_eq!(started.status.canary_revision.as_deref(), Some(NEW));
        assert!(started.status.pause_conditions.is_empty());

        // Listed twice: held, whatever is admitted.
        let mut claimed = admitted.clone();
        claimed.status = held.status.clone();
        claimed.pipeline.as_mut().unwrap().conflict =
            Some("Pipeline a/b stage x, Pipeline c/d stage y".into());
        let refused = plan(&claimed);
        assert_eq!(refused.status.canary_revision, None);
        assert!(
            refused
                .status
                .message
                .unwrap_or_default()
                .contains("more than one Pipeline stage")
        );
    }

    #[test]
    fn a_freeze_in_flight_holds_the_steps() {
        let mut o = observed(
            vec![weight(20), pause(Some(1)), weight(60)],
            releasing(1),
            4,
            Some(20),
        );
        o.now = t(100);
        o.budgets = vec![hold(BudgetAction::FreezePromotions)];
        let held = plan(&o);
        assert_eq!(
            held.status.current_step_index,
            Some(1),
            "the timed pause does not end"
        );
        assert_eq!(held.traffic.unwrap().canary_weight, 20);
        o.budgets.clear();
        assert_eq!(plan(&o).status.current_step_index, Some(2));
    }

    fn arb_step() -> impl Strategy<Value = CanaryStep> {
        prop_oneof![
            (0..=100i32).prop_map(weight),
            proptest::option::of(0..120u64).prop_map(pause),
            Just(analysis_step()),
            prop_oneof![
                (0..6i32).prop_map(|r| canary_scale(Some(r), None)),
                (0..=100i32).prop_map(|w| canary_scale(None, Some(w))),
                Just(canary_scale(None, None)),
            ],
        ]
    }

    fn arb_phase() -> impl Strategy<Value = AnalysisPhase> {
        prop_oneof![
            Just(AnalysisPhase::Pending),
            Just(AnalysisPhase::Running),
            Just(AnalysisPhase::Successful),
            Just(AnalysisPhase::Failed),
            Just(AnalysisPhase::Inconclusive),
            Just(AnalysisPhase::Error),
        ]
    }

    /// One turn of the world between two reconciles.
    #[derive(Clone, Debug)]
    struct Turn {
        /// Canary pods that became available (capped by what the plan asked for).
        available: i32,
        /// The router shows what was written (false: someone changed it to `drift`).
        echoed: bool,
        drift: i32,
        /// The verdict any run still going reaches by now (`None`: still going).
        verdict: Option<AnalysisPhase>,
        seconds: i64,
        promote: bool,
        /// A person asks for an abort.
        abort: bool,
    }

    fn arb_turn() -> impl Strategy<Value = Turn> {
        (
            0..6i32,
            proptest::bool::weighted(0.8),
            0..=100i32,
            proptest::option::of(arb_phase()),
            0..40i64,
            proptest::bool::weighted(0.2),
            proptest::bool::weighted(0.05),
        )
            .prop_map(
                |(available, echoed, drift, verdict, seconds, promote, abort)| Turn {
                    available,
                    echoed,
                    drift,
                    verdict,
                    seconds,
                    promote,
                    abort,
                },
            )
    }

    /// The next plans once `plan`'s route is written: with its status lost (the operator
    /// stopped in between) and with its status recorded.
    fn next_plans(o: &Observed, plan: &Plan) -> (Plan, Plan) {
        let moved = ObservedTraffic::State(TrafficState {
            canary_weight: plan.traffic.as_ref().map(|t| t.canary_weight),
            targets_match: true,
        });
        let lost = Observed {
            traffic: moved.clone(),
            ..o.clone()
        };
        let kept = Observed {
            traffic: moved,
            status: plan.status.clone(),
            ..o.clone()
        };
        (
            super::super::plan::plan(&lost),
            super::super::plan::plan(&kept),
        )
    }

    /// The most traffic the steps up to `index` allow the canary.
    fn allowed(steps: &[Step], index: usize) -> i32 {
        if index >= steps.len() {
            return 100;
        }
        steps[..=index]
            .iter()
            .filter_map(|s| match s {
                Step::SetWeight(w) => Some(*w),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    prop_compose! {
        fn arb_world()(
            steps in proptest::collection::vec(arb_step(), 0..6),
            index in 0..8i32,
            replicas in 0..8i32,
            canary_available in 0..8i32,
            observed_weight in proptest::option::of(0..=100i32),
            aborted in any::<bool>(),
            abort in any::<bool>(),
            promote in any::<bool>(),
            promote_full in any::<bool>(),
            routed in any::<bool>(),
            elapsed in 0..200i64,
        ) -> (Observed, bool) {
            let mut status = releasing(index);
            if aborted { status.aborted_at = Some(Time(t(0))); }
            if abort { status.abort = intent("a"); }
            if promote { status.promote = intent("p"); }
            if promote_full { status.promote_full = intent("f"); }
            let mut o = observed(steps, status, canary_available, observed_weight);
            o.spec.replicas = Some(replicas);
            o.now = t(elapsed);
            if !routed { o.traffic = ObservedTraffic::None; }
            (o, aborted || abort)
        }
    }

    proptest! {
        /// A status that counts a step done by its own route write goes out after that
        /// write, and only with it.
        #[test]
        fn a_step_done_by_its_own_route_write_goes_traffic_first((o, _) in arb_world()) {
            let plan = plan(&o);
            // The canary planner's own conditions lead to a plan written traffic first: the
            // whole planner's fallback (plan again without) is never needed.
            let direct = crate::rollout::policy::plan(&o, |seen| super::plan(seen, OwnWrite::MayPass));
            if direct.status_needs_traffic && crate::rollout::release::unhandled(&o.status).is_empty() {
                prop_assert!(plan.status_needs_traffic, "the planner fell back");
            }
            if plan.status_needs_traffic {
                prop_assert_eq!(plan.order, WriteOrder::TrafficFirst);
                let routes = plan.traffic_writes.iter().any(|t| matches!(t, TrafficWrite::Route { .. }));
                prop_assert!(routes, "no route write");
                prop_assert_eq!(
                    plan.status.handled_intents.clone().unwrap_or_default(),
                    o.status.handled_intents.clone().unwrap_or_default()
                );
            }
        }

        #[test]
        fn weights_stay_in_range_and_sum_to_100((o, _) in arb_world()) {
            let plan = plan(&o);
            if let Some(traffic) = &plan.traffic {
                prop_assert!((0..=100).contains(&traffic.canary_weight));
            }
            if let Some(w) = &plan.status.weights {
                prop_assert!((0..=100).contains(&w.canary) && (0..=100).contains(&w.stable));
                prop_assert_eq!(w.canary + w.stable, 100);
            }
            prop_assert!(plan.replica_sets.iter().all(|r| r.replicas >= 0));
        }

        /// Pods come before the traffic that needs them: every ReplicaSet written after the
        /// traffic adds no pods, and splitting the writes loses none.
        #[test]
        fn replica_sets_after_the_traffic_add_no_pods((o, _) in arb_world()) {
            let plan = plan(&o);
            let adds_pods = |r: &ReplicaSetIntent| {
                o.replica_sets.iter().find(|rs| rs.hash == r.hash).is_none_or(|rs| r.replicas > rs.replicas)
            };
            prop_assert!(plan.replica_sets_after_traffic.iter().all(|r| !adds_pods(r)));
            if plan.traffic_writes.is_empty() {
                prop_assert!(plan.replica_sets_after_traffic.is_empty());
            } else {
                prop_assert!(plan.replica_sets.iter().all(adds_pods));
            }
            let mut hashes: Vec<&str> = plan.replica_sets.iter()
                .chain(&plan.replica_sets_after_traffic).map(|r| r.hash.as_str()).collect();
            let before = hashes.len();
            hashes.sort_unstable();
            hashes.dedup();
            prop_assert_eq!(hashes.len(), before, "a ReplicaSet planned twice");
        }

        #[test]
        fn no_traffic_to_a_canary_without_available_pods((mut o, _) in arb_world()) {
            o.replica_sets = vec![rs(OLD, 4, 4), rs(NEW, 1, 0)];
            let plan = plan(&o);
            prop_assert_eq!(plan.traffic.map_or(0, |t| t.canary_weight), 0);
        }

        /// Across any sequence of reconciles (pods coming up, weights drifting, analyses
        /// reaching any verdict, people promoting), the weight written never goes beyond what
        /// the steps reached so far allow, never to a canary without available pods, and a
        /// release never goes back a step.
        #[test]
        fn over_any_sequence_weights_follow_the_steps_and_the_pods(
            steps in proptest::collection::vec(arb_step(), 1..7),
            background in any::<bool>(),
            turns in proptest::collection::vec(arb_turn(), 1..25),
        ) {
            let mut o = observed(steps.clone(), releasing(0), 0, Some(0));
            if background {
                let spec: crate::api::analysis::AnalysisSpec = serde_json::from_value(serde_json::json!(
                    {"metrics": [{"name": "bg", "prometheus": {"query": "q"}, "successCondition": "result < 1"}]}
                )).unwrap();
                o.spec.strategy.canary.as_mut().unwrap().analysis = Some(spec.clone());
                o.background = Some(analysis::resolve(&spec, None, None));
            }
            let effective = steps::effective(&steps);
            let mut last_index = 0;
            let mut written = 0;
            for (n, turn) in turns.iter().enumerate() {
                let plan = plan(&o);
                let index = plan.status.current_step_index.unwrap_or(0).max(0) as usize;
                let available = o.replica_sets.iter().find(|r| r.hash == NEW).map_or(0, |r| r.available);
                if plan.status.canary_revision.is_some() {
                    prop_assert!(index >= last_index, "turn {}: step went back from {} to {}", n, last_index, index);
                    last_index = index;
                }
                // A weight step passed in this plan is one whose weight the route shows, or
                // one this plan writes before its status, which waits for that write.
                let before = o.status.current_step_index.unwrap_or(0).max(0) as usize;
                if index > before && index < effective.len() && plan.status.aborted_at.is_none()
                    && let Step::SetWeight(w) = effective[index - 1]
                {
                    let shown = matches!(&o.traffic, ObservedTraffic::State(s) if s.canary_weight == Some(w));
                    let writes_it = |t: &TrafficWrite| matches!(t, TrafficWrite::Route { canary_weight, .. } if *canary_weight == w);
                    let own_write = plan.status_needs_traffic
                        && plan.order == WriteOrder::TrafficFirst
                        && plan.traffic_writes.iter().any(writes_it);
                    prop_assert!(shown || own_write, "turn {}: step {} ({}%) passed without its route", n, index - 1, w);
                }
                if plan.status_needs_traffic {
                    prop_assert_eq!(plan.order, WriteOrder::TrafficFirst, "turn {}", n);
                    let at_pause = matches!(effective.get(index), Some(Step::Pause(_)));
                    prop_assert!(at_pause, "turn {}: own write not before a pause", n);
                }
                if plan.order == WriteOrder::TrafficFirst {
                    let handled = |s: &RolloutStatus| s.handled_intents.as_ref().and_then(|h| h.abort.clone());
                    if handled(&plan.status) != handled(&o.status) {
                        prop_assert!(plan.traffic.as_ref().is_some_and(|t| t.canary_weight == 0), "turn {}: an abort's traffic first towards a canary", n);
                    } else {
                        prop_assert!(plan.stepped_by_clock || plan.status_needs_traffic, "turn {}: traffic first without a new abort, a timed pause or a weight written", n);
                        // The operator stops after the route write: the status as it was and
                        // the route as written plan what the recorded status would have.
                        let (after_lost, after_kept) = next_plans(&o, &plan);
                        prop_assert_eq!(&after_lost.traffic, &after_kept.traffic, "turn {}: a lost status moves traffic elsewhere", n);
                        prop_assert_eq!(after_lost.status.current_step_index, after_kept.status.current_step_index, "turn {}", n);
                    }
                }
                for write in &plan.traffic_writes {
                    let crate::rollout::model::TrafficWrite::Route { targets, canary_weight } = write else {
                        continue;
                    };
                    if *canary_weight > 0 && targets.canary == NEW {
                        prop_assert!(available > 0, "turn {}: {}% to a canary with no available pods", n, canary_weight);
                        prop_assert!(
                            *canary_weight <= allowed(&effective, index),
                            "turn {}: {}% at step {} of {:?}", n, canary_weight, index, effective
                        );
                        prop_assert!(plan.status.aborted_at.is_none(), "turn {}: traffic to an aborted canary", n);
                    }
                    written = *canary_weight;
                }
                if plan.status.stable_revision.as_deref() == Some(NEW) {
                    // Promoted: only after the last step.
                    prop_assert!(plan.status.aborted_at.is_none());
                    break;
                }
                // The world moves on.
                let mut status = plan.status.clone();
                for run in status.analysis_runs.iter_mut() {
                    if let (Some(verdict), AnalysisPhase::Pending | AnalysisPhase::Running) = (turn.verdict, run.phase) {
                        run.phase = verdict;
                    }
                }
                if turn.promote {
                    status.promote = intent(&format!("p{n}"));
                }
                if turn.abort {
                    status.abort = intent(&format!("a{n}"));
                }
                let wanted = plan.replica_set_writes().into_iter().find(|r| r.hash == NEW).map_or(0, |r| r.replicas);
                let up = turn.available.min(wanted);
                o.status = status;
                o.replica_sets = vec![rs(OLD, 4, 4), rs(NEW, wanted, up)];
                o.traffic = ObservedTraffic::State(TrafficState {
                    canary_weight: Some(if turn.echoed { written } else { turn.drift }),
                    targets_match: true,
                });
                o.now = add(o.now, Duration::from_secs(turn.seconds as u64));
            }
        }

        /// A release standing at any step, with the traffic its steps so far set: when the
        /// plan moves the route before its status, the operator stopping in between changes
        /// nothing. The next plan, from the status as it was and the route as written, is the
        /// one the recorded status would have given.
        #[test]
        fn a_route_written_before_its_status_loses_nothing_with_the_status(
            before in proptest::collection::vec(arb_step(), 0..4),
            pause_seconds in 0..60u64,
            after in proptest::collection::vec(arb_step(), 0..4),
            available in 0..6i32,
            elapsed in 0..90i64,
            promote in proptest::bool::weighted(0.2),
        ) {
            // At a timed pause, with the traffic the steps before it set.
            let index = before.len();
            let steps: Vec<_> = before.into_iter().chain([pause(Some(pause_seconds))]).chain(after).collect();
            let mut status = releasing(index as i32);
            if promote {
                status.promote = intent("p");
            }
            let at = steps::weight_at(&steps::effective(&steps), index);
            let mut o = observed(steps, status, available, Some(at));
            o.now = t(elapsed);
            let plan = plan(&o);
            if plan.order != WriteOrder::TrafficFirst {
                return Ok(());
            }
            prop_assert!(plan.stepped_by_clock || plan.status_needs_traffic);
            prop_assert_eq!(plan.status.handled_intents.clone().unwrap_or_default(), o.status.handled_intents.clone().unwrap_or_default());
            let (after_lost, after_kept) = next_plans(&o, &plan);
            prop_assert_eq!(&after_lost.traffic, &after_kept.traffic);
            prop_assert_eq!(after_lost.status.current_step_index, after_kept.status.current_step_index);
            prop_assert_eq!(after_lost.status.aborted_at, after_kept.status.aborted_at);
        }

        /// A release standing at a weight step with a pause after it, the route anywhere:
        /// when the plan counts the step done by its own route write, the operator stopping
        /// between that write and the status changes nothing. The next plan, from the status
        /// as it was and the route as written, is the one the recorded status would have given.
        #[test]
        fn a_weight_written_before_its_status_loses_nothing_with_the_status(
            before in proptest::collection::vec(arb_step(), 0..4),
            at in 0..=100i32,
            pause_seconds in proptest::option::of(0..60u64),
            after in proptest::collection::vec(arb_step(), 0..4),
            available in 0..6i32,
            observed_weight in proptest::option::of(0..=100i32),
            elapsed in 0..90i64,
        ) {
            let index = before.len();
            let steps: Vec<_> = before.into_iter().chain([weight(at), pause(pause_seconds)]).chain(after).collect();
            let mut o = observed(steps, releasing(index as i32), available, observed_weight);
            o.now = t(elapsed);
            let plan = plan(&o);
            if !plan.status_needs_traffic {
                return Ok(());
            }
            prop_assert_eq!(plan.order, WriteOrder::TrafficFirst);
            prop_assert_eq!(plan.status.current_step_index, Some(index as i32 + 1));
            prop_assert_eq!(plan.traffic.as_ref().map(|t| t.canary_weight), Some(at));
            let (after_lost, after_kept) = next_plans(&o, &plan);
            prop_assert_eq!(&after_lost.traffic, &after_kept.traffic);
            prop_assert_eq!(after_lost.status.current_step_index, after_kept.status.current_step_index);
            prop_assert_eq!(after_lost.status.aborted_at, after_kept.status.aborted_at);
        }

        #[test]
        fn aborted_never_promotes_without_a_person((mut o, aborted) in arb_world()) {
            prop_assume!(aborted);
            o.status.retry = None;
            let plan = plan(&o);
            prop_assert_eq!(plan.status.stable_revision.as_deref(), Some(OLD));
            prop_assert_eq!(plan.traffic.map_or(0, |t| t.canary_weight), 0);
            prop_assert_eq!(plan.status.phase, Some(RolloutPhase::Degraded));
        }
    }
}
