//! Which of Sluice's own Events are transitions people subscribe to, and which Notifier covers
//! which. Pure: the Events are the audit trail the controllers already write, so a transition
//! is sent exactly when it is recorded, and a restarted operator finds the same ones.

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;

use crate::api::notifier::{NotificationEvent, Notifier, SentRecord, WatchedKind};
use crate::k8s::events::REPORTING_CONTROLLER;

/// One transition of one resource, from the Event that recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// `<Event uid>/<count>`: a decision recorded again (the Event's series) is a new one.
    pub key: String,
    pub event: NotificationEvent,
    pub kind: WatchedKind,
    pub namespace: String,
    pub name: String,
    /// The Event's reason, e.g. `AnalysisFailed`.
    pub reason: String,
    /// The Event's note: what happened and why, with the values that decided it.
    pub message: String,
    pub warning: bool,
    pub time: Timestamp,
}

impl Transition {
    /// `Aborted Rollout shop/checkout`
    pub fn what(&self) -> String {
        format!(
            "{:?} {:?} {}/{}",
            self.event, self.kind, self.namespace, self.name
        )
    }

    /// The ErrorBudget phase a `BudgetPhaseChanged` moved to (its note starts with it).
    pub fn budget_phase(&self) -> Option<&str> {
        (self.event == NotificationEvent::BudgetPhaseChanged)
            .then(|| self.message.split(':').next().unwrap_or_default().trim())
    }
}

/// The transition an Event records, if it is one people can subscribe to.
pub fn from_event(event: &Event) -> Option<Transition> {
    if event.reporting_controller.as_deref() != Some(REPORTING_CONTROLLER) {
        return None;
    }
    let regarding = event.regarding.as_ref()?;
    if !regarding
        .api_version
        .as_deref()
        .is_some_and(|v| v.starts_with("sluice.dev/"))
    {
        return None;
    }
    let kind = match regarding.kind.as_deref()? {
        "Rollout" => WatchedKind::Rollout,
        "ErrorBudget" => WatchedKind::ErrorBudget,
        "Pipeline" => WatchedKind::Pipeline,
        _ => return None,
    };
    let reason = event.reason.clone()?;
    let transition = classify(kind, &reason)?;
    let count = event.series.as_ref().map_or(1, |s| s.count);
    let time = event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    Some(Transition {
        key: format!("{}/{count}", event.metadata.uid.as_deref()?),
        event: transition,
        kind,
        namespace: regarding.namespace.clone().unwrap_or_default(),
        name: regarding.name.clone().unwrap_or_default(),
        reason,
        message: event.note.clone().unwrap_or_default(),
        warning: event.type_.as_deref() == Some("Warning"),
        time,
    })
}

/// The transition an Event reason means, per kind (the reasons are stable: see
/// `rollout::events::Reason` and the ErrorBudget and Pipeline planners).
fn classify(kind: WatchedKind, reason: &str) -> Option<NotificationEvent> {
    use NotificationEvent::*;
    Some(match (kind, reason) {
        (WatchedKind::Rollout, "ReleaseStarted") => ReleaseStarted,
        (WatchedKind::Rollout, "StepCompleted") => StepReached,
        (WatchedKind::Rollout, "Paused") => Paused,
        (WatchedKind::Rollout, "AnalysisInconclusive") => AnalysisInconclusive,
        (WatchedKind::Rollout, "Promoted" | "PromotedFull") => Promoted,
        (WatchedKind::Rollout, "AbortedByUser" | "AnalysisFailed" | "AbortedByErrorBudget") => {
            Aborted
        }
        (WatchedKind::Rollout, "RolledBackByErrorBudget") => RolledBack,
        (WatchedKind::Rollout, "FreezeOverridden") => FreezeOverridden,
        (WatchedKind::ErrorBudget, "PhaseChanged") => BudgetPhaseChanged,
        (WatchedKind::Pipeline, "Admitted") => StagePromoted,
        (WatchedKind::Pipeline, "WaitingForApproval") => StageWaitingForApproval,
        (WatchedKind::Pipeline, "StageFrozen") => StageFrozen,
        (WatchedKind::Pipeline, "Approved") => Approved,
        (WatchedKind::Pipeline, "Rejected") => Rejected,
        (WatchedKind::Pipeline, "StageFailed") => StageFailed,
        _ => return None,
    })
}

/// Whether `notifier` (with the operator running in `operator_namespace`) subscribes to `t`.
pub fn covers(notifier: &Notifier, operator_namespace: &str, t: &Transition) -> bool {
    let spec = &notifier.spec;
    let home = notifier.metadata.namespace.as_deref().unwrap_or_default();
    let everywhere = spec.all_namespaces && home == operator_namespace;
    (everywhere || t.namespace == home)
        && (spec.events.is_empty() || spec.events.contains(&t.event))
        && (spec.kinds.is_empty() || spec.kinds.contains(&t.kind))
        && (spec.names.is_empty() || spec.names.contains(&t.name))
}

/// Whether `t` needs no sending by `notifier`: it happened before the Notifier existed (the
/// history is not replayed), or it is among the transitions already sent.
pub fn already_handled(created: Option<Timestamp>, sent: &[SentRecord], t: &Transition) -> bool {
    created.is_some_and(|c| t.time < c) || sent.iter().any(|s| s.key == t.key)
}

/// How many sent transitions a Notifier's status keeps.
pub const SENT_KEPT: usize = 50;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::EventSeries;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};

    fn event(kind: &str, reason: &str) -> Event {
        Event {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(Timestamp::from_second(1_700_000_000).unwrap())),
            reason: Some(reason.into()),
            note: Some("Frozen: 82% consumed".into()),
            type_: Some("Warning".into()),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            regarding: Some(ObjectReference {
                api_version: Some("sluice.dev/v1alpha1".into()),
                kind: Some(kind.into()),
                namespace: Some("shop".into()),
                name: Some("checkout".into()),
                ..ObjectReference::default()
            }),
            ..Event::default()
        }
    }

    #[test]
    fn events_map_to_the_transitions_people_subscribe_to() {
        use NotificationEvent::*;
        for (kind, reason, want) in [
            ("Rollout", "ReleaseStarted", Some(ReleaseStarted)),
            ("Rollout", "StepCompleted", Some(StepReached)),
            ("Rollout", "Paused", Some(Paused)),
            ("Rollout", "PromotedFull", Some(Promoted)),
            ("Rollout", "AnalysisFailed", Some(Aborted)),
            ("Rollout", "AbortedByErrorBudget", Some(Aborted)),
            ("Rollout", "RolledBackByErrorBudget", Some(RolledBack)),
            ("Rollout", "PreviousScaledDown", None),
            ("ErrorBudget", "PhaseChanged", Some(BudgetPhaseChanged)),
            ("Pipeline", "Admitted", Some(StagePromoted)),
            (
                "Pipeline",
                "WaitingForApproval",
                Some(StageWaitingForApproval),
            ),
            (
                "Rollout",
                "AnalysisInconclusive",
                Some(AnalysisInconclusive),
            ),
            ("Pipeline", "Rejected", Some(Rejected)),
            ("Pipeline", "PhaseChanged", None),
            ("Deployment", "Promoted", None),
        ] {
            assert_eq!(
                from_event(&event(kind, reason)).map(|t| t.event),
                want,
                "{kind} {reason}"
            );
        }
        // Someone else's Event about a Rollout is not Sluice's decision.
        let mut foreign = event("Rollout", "Promoted");
        foreign.reporting_controller = Some("someone-else".into());
        assert_eq!(from_event(&foreign), None);
    }

    #[test]
    fn a_repeated_decision_is_a_new_transition_and_the_budget_phase_is_read() {
        let first = from_event(&event("ErrorBudget", "PhaseChanged")).unwrap();
        assert_eq!(first.key, "u1/1");
        assert_eq!(first.budget_phase(), Some("Frozen"));
        let mut again = event("ErrorBudget", "PhaseChanged");
        again.series = Some(EventSeries {
            count: 2,
            last_observed_time: MicroTime(Timestamp::from_second(1_700_000_100).unwrap()),
        });
        let again = from_event(&again).unwrap();
        assert_eq!(again.key, "u1/2");
        assert_eq!(again.time.as_second(), 1_700_000_100);
    }

    fn notifier(namespace: &str, spec: serde_json::Value) -> Notifier {
        let mut n: Notifier = serde_json::from_value(serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Notifier",
            "metadata": {"name": "n", "namespace": namespace},
            "spec": spec,
        }))
        .unwrap();
        n.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        n
    }

    #[test]
    fn a_notifier_covers_its_namespace_or_all_from_the_operators() {
        let t = from_event(&event("Rollout", "AnalysisFailed")).unwrap();
        let slack = serde_json::json!({"slack": {"urlSecretRef": {"name": "s", "key": "url"}}});
        let with = |extra: serde_json::Value| {
            let mut spec = slack.clone();
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            spec
        };
        for (namespace, spec, want) in [
            ("shop", slack.clone(), true),
            ("other", slack.clone(), false),
            (
                "other",
                with(serde_json::json!({"allNamespaces": true})),
                false,
            ),
            (
                "sluice-system",
                with(serde_json::json!({"allNamespaces": true})),
                true,
            ),
            (
                "shop",
                with(serde_json::json!({"events": ["Aborted"]})),
                true,
            ),
            (
                "shop",
                with(serde_json::json!({"events": ["Promoted"]})),
                false,
            ),
            (
                "shop",
                with(serde_json::json!({"kinds": ["Pipeline"]})),
                false,
            ),
            (
                "shop",
                with(serde_json::json!({"names": ["checkout"]})),
                true,
            ),
            ("shop", with(serde_json::json!({"names": ["cart"]})), false),
        ] {
            assert_eq!(
                covers(&notifier(namespace, spec.clone()), "sluice-system", &t),
                want,
                "{namespace} {spec}"
            );
        }
    }

    #[test]
    fn history_and_what_was_sent_are_not_sent_again() {
        let t = from_event(&event("Rollout", "Promoted")).unwrap();
        let before = Timestamp::from_second(1_600_000_000).unwrap();
        let after = Timestamp::from_second(1_800_000_000).unwrap();
        assert!(!already_handled(Some(before), &[], &t));
        assert!(
            already_handled(Some(after), &[], &t),
            "older than the Notifier"
        );
        let sent = vec![SentRecord {
            key: t.key.clone(),
            what: t.what(),
            at: Time(before),
            delivered: true,
        }];
        assert!(already_handled(Some(before), &sent, &t));
    }
}
