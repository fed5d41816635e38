//! Release moves both strategies share: the intents not yet acted on, the runs and the
//! requeue, the order of traffic writes, pod counts, phase and conditions.
//!
//! Pure, like the planners that call them.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::events::Reason;
#[cfg(test)]
use super::model::ObservedLeftover;
use super::model::{
    Observed, ObservedReplicaSet, ObservedTraffic, PlannedEvent, ReplicaSetIntent, TrafficIntent,
    TrafficWrite, add, until,
};
use super::runs::{self, RunName};
use crate::api::analysis::AnalysisPhase;
use crate::api::rollout::{
    PauseCondition, PauseReason, RolloutPhase, RolloutSpec, RolloutStatus, RoutedObject,
};
use crate::conditions;
use crate::traffic::Targets;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How often a Rollout with nothing going on is looked at again (watches bring changes).
const IDLE_RESYNC: Duration = Duration::from_secs(300);
/// How often a release in progress is looked at again when nothing else is due sooner.
const ACTIVE_RESYNC: Duration = Duration::from_secs(15);
/// The soonest a reconcile asks to run again.
const MIN_REQUEUE: Duration = Duration::from_millis(200);
const DEFAULT_PROGRESS_DEADLINE: i32 = 600;
/// The scale-down delay when the spec sets none.
pub const DEFAULT_SCALE_DOWN_DELAY: Duration = Duration::from_secs(30);

/// Where the traffic objects point now, as far as the status knows: what the router was
/// asked to observe.
pub fn current_targets(status: &RolloutStatus, desired_hash: &str) -> Targets {
    let stable = status
        .stable_revision
        .clone()
        .unwrap_or_else(|| desired_hash.to_string());
    Targets {
        canary: status
            .canary_revision
            .clone()
            .unwrap_or_else(|| stable.clone()),
        stable,
    }
}

/// The router writes that take traffic from what was observed to `intent`, in order.
///
/// Nothing when traffic is already there. A superseded or cancelled canary (same stable, the
/// canary destination moving to another revision, the weight going down) first lowers the
/// weight while the canary destination still points at pods that exist, then re-points it: in
/// between, traffic never reaches a revision without pods. Every other move points the
/// destinations first and sets the weight after (the router's own order), so a promotion
/// re-points stable before the canary weight drops.
pub fn route_writes(o: &Observed, intent: &TrafficIntent) -> Vec<TrafficWrite> {
    let route = |targets: &Targets| TrafficWrite::Route {
        targets: targets.clone(),
        canary_weight: intent.canary_weight,
    };
    let (observed_weight, targets_match) = match &o.traffic {
        ObservedTraffic::None => return Vec::new(),
        ObservedTraffic::State(state) => (state.canary_weight, state.targets_match),
        // Missing or malformed routing objects: try again, the write reports what is wrong.
        ObservedTraffic::Failed(_) => return vec![route(&intent.targets)],
    };
    if observed_weight == Some(intent.canary_weight) && targets_match {
        return Vec::new();
    }
    let current = current_targets(&o.status, &o.desired_hash);
    let lowering = observed_weight.is_some_and(|w| w > intent.canary_weight);
    if lowering
        && intent.targets.stable == current.stable
        && intent.targets.canary != current.canary
    {
        return vec![route(&current), route(&intent.targets)];
    }
    vec![route(&intent.targets)]
}

/// Starts the runs a planner asked for, and the requeue: the soonest of the planner's wakeups,
/// the next measurement due, and the resync (`busy`: a release is going on).
pub fn schedule(
    status: &mut RolloutStatus,
    o: &Observed,
    starts: &[(RunName, String)],
    wakeups: &[Timestamp],
    busy: bool,
) -> Duration {
    runs::start(
        status,
        &o.spec.strategy,
        o.background.as_ref(),
        starts,
        o.now,
    );
    let resync = if busy || !starts.is_empty() {
        ACTIVE_RESYNC
    } else {
        IDLE_RESYNC
    };
    wakeups
        .iter()
        .copied()
        .chain(runs::next_due(
            status,
            &o.spec.strategy,
            o.background.as_ref(),
        ))
        .map(|at| until(o.now, at))
        .min()
        .map_or(resync, |d| d.min(resync))
        .max(MIN_REQUEUE)
}

pub struct Intents {
    pub abort: Option<String>,
    pub promote: Option<String>,
    pub promote_full: Option<String>,
    pub retry: Option<String>,
    pub override_freeze: Option<String>,
}

impl Intents {
    /// No request waits to be acted on.
    pub fn is_empty(&self) -> bool {
        self.abort.is_none()
            && self.promote.is_none()
            && self.promote_full.is_none()
            && self.retry.is_none()
            && self.override_freeze.is_none()
    }
}

pub fn unhandled(status: &RolloutStatus) -> Intents {
    let handled = status.handled_intents.clone().unwrap_or_default();
    let fresh = |intent: &Option<crate::api::common::Intent>, seen: &Option<String>| {
        intent
            .as_ref()
            .filter(|i| Some(&i.id) != seen.as_ref())
            .map(|i| i.id.clone())
    };
    Intents {
        abort: fresh(&status.abort, &handled.abort),
        promote: fresh(&status.promote, &handled.promote),
        promote_full: fresh(&status.promote_full, &handled.promote_full),
        retry: fresh(&status.retry, &handled.retry),
        override_freeze: fresh(&status.override_freeze, &handled.override_freeze),
    }
}

/// The objects in the Rollout's namespace whose revision label Sluice sets for this spec:
/// the DestinationRule's subsets, and the Services whose selectors it points.
pub fn routed_objects(spec: &RolloutSpec) -> Vec<RoutedObject> {
    let object = |kind: &str, name: &str| RoutedObject {
        kind: kind.to_string(),
        name: name.to_string(),
    };
    let mut objects = Vec::new();
    let strategy = &spec.strategy;
    if let Some(canary) = &strategy.canary
        && let Some(routing) = &canary.traffic_routing
    {
        if let Some(dr) = routing
            .istio
            .as_ref()
            .and_then(|i| i.destination_rule.as_ref())
        {
            objects.push(object("DestinationRule", &dr.name));
        }
        for service in [&canary.stable_service, &canary.canary_service]
            .into_iter()
            .flatten()
        {
            objects.push(object("Service", service));
        }
    }
    if let Some(bg) = &strategy.blue_green {
        let routing = bg.traffic_routing.as_ref();
        if let Some(dr) = routing
            .and_then(|r| r.istio.as_ref())
            .and_then(|i| i.destination_rule.as_ref())
        {
            objects.push(object("DestinationRule", &dr.name));
        }
        // Without a router the selectors are the switch; with one, only host-level routing
        // (a preview Service) points them.
        if routing.is_none() || bg.preview_service.is_some() {
            objects.push(object("Service", &bg.active_service));
            objects.extend(bg.preview_service.iter().map(|p| object("Service", p)));
        }
    }
    objects.sort();
    objects.dedup();
    objects
}

/// What Sluice marks now, and the writes that take the label back from objects the spec no
/// longer names (kept on the list until they are seen unmarked, so a failed write is retried).
pub fn take_back(o: &Observed) -> (Vec<RoutedObject>, Vec<TrafficWrite>) {
    let mut marked = routed_objects(&o.spec);
    let mut writes = Vec::new();
    for leftover in o.leftovers.iter().filter(|l| l.marked) {
        marked.push(leftover.object.clone());
        writes.push(TrafficWrite::Release(leftover.object.clone()));
    }
    marked.sort();
    marked.dedup();
    (marked, writes)
}

/// Whether a person holds the release: `spec.paused`, or a `kubectl sluice pause` newer than
/// the last `resume`.
pub fn paused_by_person(o: &Observed) -> bool {
    let by_plugin = match (&o.status.pause, &o.status.resume) {
        (Some(pause), Some(resume)) => pause.requested_at.0 > resume.requested_at.0,
        (Some(_), None) => true,
        _ => false,
    };
    o.spec.paused == Some(true) || by_plugin
}

/// Adds a pause condition (once, keeping the first start time).
pub fn pause_for(status: &mut RolloutStatus, reason: PauseReason, since: Timestamp) {
    if !status.pause_conditions.iter().any(|p| p.reason == reason) {
        status.pause_conditions.push(PauseCondition {
            reason,
            start_time: Time(since),
        });
    }
}

/// How long a release may wait for its pods before it is Degraded (`progressDeadlineSeconds`,
/// default 600).
pub fn progress_deadline(o: &Observed) -> Duration {
    Duration::from_secs(
        o.spec
            .progress_deadline_seconds
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE)
            .max(1) as u64,
    )
}

/// The phase of the named run judging `revision`, if there is one.
pub fn run_phase(status: &RolloutStatus, name: RunName, revision: &str) -> Option<AnalysisPhase> {
    let name = name.to_string();
    status
        .analysis_runs
        .iter()
        .find(|r| r.name == name && r.revision == revision)
        .map(|r| r.phase)
}

/// Pod counts over every revision, as observed.
pub fn record_counts(status: &mut RolloutStatus, o: &Observed) {
    let sum = |f: fn(&ObservedReplicaSet) -> i32| o.replica_sets.iter().map(f).sum::<i32>();
    status.replicas = Some(sum(|r| r.replicas));
    status.ready_replicas = Some(sum(|r| r.ready));
    status.available_replicas = Some(sum(|r| r.available));
    status.updated_replicas = Some(
        o.replica_sets
            .iter()
            .filter(|r| r.hash == o.desired_hash)
            .map(|r| r.replicas)
            .sum(),
    );
}

/// Phase, message, the `Paused` (or `AnalysisInconclusive`) Event and the standard conditions, the same for every
/// strategy. `counts` is (role of the serving revision, its available pods, replicas).
pub fn record_phase(
    status: &mut RolloutStatus,
    events: &mut Vec<PlannedEvent>,
    (phase, message): (RolloutPhase, String),
    progressing_reason: &'static str,
    (role, available, replicas): (&str, i32, i32),
    o: &Observed,
) {
    if status.phase != Some(phase) && phase == RolloutPhase::Paused {
        let inconclusive = status
            .pause_conditions
            .first()
            .is_some_and(|c| c.reason == crate::api::rollout::PauseReason::InconclusiveAnalysis);
        events.push(PlannedEvent {
            warning: inconclusive,
            reason: if inconclusive {
                Reason::AnalysisInconclusive
            } else {
                Reason::Paused
            },
            message: message.clone(),
        });
    }
    status.phase = Some(phase);
    status.message = Some(message.clone());
    let (generation, now) = (o.generation, o.now);
    let enough = available >= replicas;
    let reason = if enough {
        "MinimumReplicasAvailable"
    } else {
        "MinimumReplicasUnavailable"
    };
    let pods = format!("{available}/{replicas} {role} pods available");
    conditions::set(
        &mut status.conditions,
        "Available",
        enough,
        reason,
        pods,
        generation,
        now,
    );
    let progressing = phase == RolloutPhase::Progressing;
    conditions::set(
        &mut status.conditions,
        "Progressing",
        progressing,
        progressing_reason,
        message,
        generation,
        now,
    );
    let paused = phase == RolloutPhase::Paused;
    let reason = if paused { "Paused" } else { "NotPaused" };
    conditions::set(
        &mut status.conditions,
        "Paused",
        paused,
        reason,
        "",
        generation,
        now,
    );
    if status.aborted_at.is_none() {
        conditions::set(
            &mut status.conditions,
            "Aborted",
            false,
            "NotAborted",
            "",
            generation,
            now,
        );
    }
}

/// The stable revision, or, for a Rollout's very first revision, the template's: it goes
/// straight to stable (`role`: what the strategy calls it), with nothing to compare it to.
pub fn first_revision(
    status: &mut RolloutStatus,
    events: &mut Vec<PlannedEvent>,
    o: &Observed,
    role: &str,
) -> String {
    if let Some(stable) = &status.stable_revision {
        return stable.clone();
    }
    events.push(PlannedEvent {
        warning: false,
        reason: Reason::Deployed,
        message: format!("first revision {} deployed as {role}", o.desired_hash),
    });
    status.stable_revision = Some(o.desired_hash.clone());
    o.desired_hash.clone()
}

/// What the template did to the release in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateChange {
    /// A new revision: a release starts (or supersedes the one in flight).
    Release(String),
    /// The template is back at stable: the release in flight is cancelled.
    Cancel,
}

/// Follows the template: a new revision starts a release (superseding the one in flight), the
/// template back at stable cancels it. Resets what every strategy keeps per release and
/// records the Event (`role`: what the strategy calls stable); the strategy then sets its own
/// fields. `None` when the release in flight already is the template's.
pub fn follow_template(
    status: &mut RolloutStatus,
    events: &mut Vec<PlannedEvent>,
    o: &Observed,
    (stable, role): (&str, &str),
) -> Option<TemplateChange> {
    let in_flight = status.canary_revision.clone();
    let (reason, message, change) = if o.desired_hash == stable {
        let old = in_flight?;
        (
            Reason::ReleaseCancelled,
            format!("template is back to {role} {stable}; release of {old} cancelled"),
            TemplateChange::Cancel,
        )
    } else if in_flight.as_deref() == Some(o.desired_hash.as_str()) {
        return None;
    } else {
        let new = o.desired_hash.clone();
        match in_flight {
            Some(old) => (
                Reason::ReleaseSuperseded,
                format!("revision {new} supersedes {old}"),
                TemplateChange::Release(new),
            ),
            None => (
                Reason::ReleaseStarted,
                format!("releasing revision {new} ({role} {stable})"),
                TemplateChange::Release(new),
            ),
        }
    };
    events.push(PlannedEvent {
        warning: false,
        reason,
        message,
    });
    let revision = match &change {
        TemplateChange::Release(new) => Some(new.clone()),
        TemplateChange::Cancel => None,
    };
    reset(status, revision, o);
    Some(change)
}

/// What every strategy resets when a release starts, is cancelled or is retried: no pauses,
/// not aborted, no verdicts (old ones must not judge the new release).
pub fn reset(status: &mut RolloutStatus, revision: Option<String>, o: &Observed) {
    status.canary_revision = revision;
    status.pause_conditions.clear();
    status.aborted_at = None;
    status.analysis_runs.clear();
    conditions::set(
        &mut status.conditions,
        "Aborted",
        false,
        "NotAborted",
        "",
        o.generation,
        o.now,
    );
}

/// Aborts the release in flight: recorded in `abortedAt`, the `Aborted` condition and a
/// Warning Event; its pauses no longer apply. What happens to traffic is the strategy's.
pub fn abort(
    status: &mut RolloutStatus,
    events: &mut Vec<PlannedEvent>,
    (reason, message): (Reason, String),
    o: &Observed,
) {
    status.aborted_at = Some(Time(o.now));
    status.pause_conditions.clear();
    conditions::set(
        &mut status.conditions,
        "Aborted",
        true,
        reason.as_str(),
        message.clone(),
        o.generation,
        o.now,
    );
    events.push(PlannedEvent {
        warning: true,
        reason,
        message,
    });
}

/// An old revision's ReplicaSet after traffic left it: it keeps its pods for `delay`, then
/// scales to zero. The deadline is kept on the ReplicaSet, so a restart keeps it.
pub fn scale_down_later(
    rs: &ObservedReplicaSet,
    now: Timestamp,
    delay: Duration,
    wakeups: &mut Vec<Timestamp>,
) -> ReplicaSetIntent {
    let (replicas, scale_down_at) = match rs.scale_down_at {
        _ if rs.replicas == 0 => (0, None),
        Some(at) if at <= now => (0, None),
        Some(at) => (rs.replicas, Some(at)),
        None => (rs.replicas, Some(add(now, delay))),
    };
    wakeups.extend(scale_down_at);
    ReplicaSetIntent {
        hash: rs.hash.clone(),
        replicas,
        scale_down_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::rollout::RolloutSpec;
    use crate::traffic::TrafficState;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn targets(stable: &str, canary: &str) -> Targets {
        Targets {
            stable: stable.into(),
            canary: canary.into(),
        }
    }

    fn route(stable: &str, canary: &str, weight: i32) -> TrafficWrite {
        TrafficWrite::Route {
            targets: targets(stable, canary),
            canary_weight: weight,
        }
    }

    /// A world whose status says stable `aaa` and canary `status_canary`, whose router reads
    /// `weight` with destinations matching or not.
    fn world(status_canary: Option<&str>, traffic: ObservedTraffic) -> Observed {
        let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
            "strategy": {"canary": {}}
        }))
        .unwrap();
        Observed {
            generation: Some(1),
            spec,
            status: RolloutStatus {
                stable_revision: Some("aaa".into()),
                canary_revision: status_canary.map(String::from),
                ..RolloutStatus::default()
            },
            desired_hash: "ccc".into(),
            replica_sets: Vec::new(),
            traffic,
            background: None,
            services: Vec::new(),
            budgets: Vec::new(),
            leftovers: Vec::new(),
            release: Default::default(),
            pipeline: None,
            recorded_runs: None,
            passes_wait: Duration::ZERO,
            now: t(0),
        }
    }

    fn state(weight: Option<i32>, targets_match: bool) -> ObservedTraffic {
        ObservedTraffic::State(TrafficState {
            canary_weight: weight,
            targets_match,
        })
    }

    #[test]
    fn traffic_writes_follow_the_ordering_rules() {
        struct Case {
            what: &'static str,
            status_canary: Option<&'static str>,
            traffic: ObservedTraffic,
            intent: (&'static str, &'static str, i32),
            writes: Vec<TrafficWrite>,
        }
        let cases = [
            Case {
                what: "already there: nothing to write",
                status_canary: Some("bbb"),
                traffic: state(Some(30), true),
                intent: ("aaa", "bbb", 30),
                writes: vec![],
            },
            Case {
                what: "a step up: one write (destinations, then weight)",
                status_canary: Some("bbb"),
                traffic: state(Some(10), true),
                intent: ("aaa", "bbb", 30),
                writes: vec![route("aaa", "bbb", 30)],
            },
            Case {
                what: "superseded: lower the weight on the old canary, then re-point",
                status_canary: Some("bbb"),
                traffic: state(Some(30), true),
                intent: ("aaa", "ccc", 0),
                writes: vec![route("aaa", "bbb", 0), route("aaa", "ccc", 0)],
            },
            Case {
                what: "promotion: stable re-pointed first, in one write",
                status_canary: Some("bbb"),
                traffic: state(Some(100), true),
                intent: ("bbb", "bbb", 0),
                writes: vec![route("bbb", "bbb", 0)],
            },
            Case {
                what: "abort: weight drops with destinations unchanged",
                status_canary: Some("bbb"),
                traffic: state(Some(30), true),
                intent: ("aaa", "bbb", 0),
                writes: vec![route("aaa", "bbb", 0)],
            },
            Case {
                what: "drift of the destinations alone is put back",
                status_canary: Some("bbb"),
                traffic: state(Some(30), false),
                intent: ("aaa", "bbb", 30),
                writes: vec![route("aaa", "bbb", 30)],
            },
            Case {
                what: "routing objects broken: write anyway, the write names the problem",
                status_canary: Some("bbb"),
                traffic: ObservedTraffic::Failed("VirtualService x not found".into()),
                intent: ("aaa", "bbb", 30),
                writes: vec![route("aaa", "bbb", 30)],
            },
            Case {
                what: "no router: no route writes",
                status_canary: Some("bbb"),
                traffic: ObservedTraffic::None,
                intent: ("aaa", "bbb", 30),
                writes: vec![],
            },
        ];
        for case in cases {
            let o = world(case.status_canary, case.traffic);
            let (stable, canary, weight) = case.intent;
            let intent = TrafficIntent {
                targets: targets(stable, canary),
                canary_weight: weight,
            };
            assert_eq!(route_writes(&o, &intent), case.writes, "{}", case.what);
        }
    }

    #[test]
    fn what_sluice_marked_is_taken_back_once_the_spec_stops_naming_it() {
        let routed: RolloutSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
            "strategy": {"canary": {"trafficRouting": {"istio": {
                "virtualService": {"name": "web"},
                "destinationRule": {"name": "web", "stableSubset": "stable", "canarySubset": "canary"}}}}}
        }))
        .unwrap();
        let dr = RoutedObject {
            kind: "DestinationRule".into(),
            name: "web".into(),
        };
        let mut o = world(None, ObservedTraffic::None);
        o.spec = routed.clone();
        assert_eq!(take_back(&o), (vec![dr.clone()], vec![]));
        // Routing removed: the subsets still carry the label, so it is taken back, and the
        // DestinationRule stays listed until it is seen unmarked.
        o.spec.strategy.canary.as_mut().unwrap().traffic_routing = None;
        o.leftovers = vec![ObservedLeftover {
            object: dr.clone(),
            marked: true,
        }];
        assert_eq!(
            take_back(&o),
            (vec![dr.clone()], vec![TrafficWrite::Release(dr.clone())])
        );
        o.leftovers[0].marked = false;
        assert_eq!(take_back(&o), (vec![], vec![]));
    }

    #[test]
    fn the_requeue_is_the_soonest_of_wakeups_measurements_and_resync() {
        let o = world(None, ObservedTraffic::None);
        let mut status = o.status.clone();
        assert_eq!(schedule(&mut status, &o, &[], &[], false), IDLE_RESYNC);
        assert_eq!(schedule(&mut status, &o, &[], &[], true), ACTIVE_RESYNC);
        assert_eq!(
            schedule(&mut status, &o, &[], &[t(3)], true),
            Duration::from_secs(3)
        );
        // Never sooner than the floor, even for a wakeup in the past.
        assert_eq!(schedule(&mut status, &o, &[], &[t(-5)], true), MIN_REQUEUE);
    }
}
