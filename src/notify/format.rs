//! The message each channel receives for a transition. Pure: one function per format, tested
//! against the shapes the services document (Slack Block Kit, Teams Adaptive Cards through a
//! workflow webhook, PagerDuty Events API v2, CloudEvents 1.0 structured JSON with CDEvents
//! types).

use serde_json::{Value, json};

use super::transition::Transition;
use crate::api::notifier::{NotificationEvent, WatchedKind};

/// The channels a Notifier can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Slack,
    Teams,
    PagerDuty,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Slack => "Slack",
            Channel::Teams => "Teams",
            Channel::PagerDuty => "PagerDuty",
            Channel::Webhook => "Webhook",
        }
    }
}

/// "Aborted", "Release started", ...
fn headline(event: NotificationEvent) -> &'static str {
    use NotificationEvent::*;
    match event {
        ReleaseStarted => "Release started",
        StepReached => "Step reached",
        Paused => "Paused, waiting for a person",
        Promoted => "Promoted",
        Aborted => "Aborted",
        RolledBack => "Rolled back by its error budget",
        BudgetPhaseChanged => "Error budget phase changed",
        FreezeOverridden => "Released despite a freeze",
        AnalysisInconclusive => "Analysis inconclusive, waiting for a person",
        StagePromoted => "Release promoted to a stage",
        StageWaitingForApproval => "Waiting for approval",
        StageFrozen => "Held by an error budget",
        Approved => "Approved",
        Rejected => "Rejected",
        StageFailed => "Stage failed",
    }
}

/// The plugin command that shows the resource, ready to paste.
pub fn status_command(t: &Transition) -> String {
    let verb = match t.kind {
        WatchedKind::Rollout => "status",
        WatchedKind::ErrorBudget => "budget",
        WatchedKind::Pipeline => "pipeline",
    };
    format!("kubectl sluice {verb} {}/{}", t.namespace, t.name)
}

/// `Aborted: Rollout shop/checkout`
pub fn title(t: &Transition) -> String {
    format!(
        "{}: {:?} {}/{}",
        headline(t.event),
        t.kind,
        t.namespace,
        t.name
    )
}

fn when(t: &Transition) -> String {
    t.time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Slack incoming webhook: Block Kit, with `text` as the notification's fallback.
pub fn slack(t: &Transition) -> Value {
    let field =
        |name: &str, value: &str| json!({"type": "mrkdwn", "text": format!("*{name}*\n{value}")});
    json!({
        "text": format!("{}. {}", title(t), t.message),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title(t)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": t.message}},
            {"type": "section", "fields": [
                field("Kind", &format!("{:?}", t.kind)),
                field("Where", &format!("{}/{}", t.namespace, t.name)),
                field("Reason", &t.reason),
                field("When", &when(t)),
            ]},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": format!("`{}`", status_command(t))}
            ]}
        ]
    })
}

/// Microsoft Teams workflow webhook ("Post to a channel when a webhook request is received"):
/// a message with one Adaptive Card attachment.
pub fn teams(t: &Transition) -> Value {
    let color = if t.warning { "Attention" } else { "Good" };
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.5",
                "body": [
                    {"type": "TextBlock", "text": title(t), "size": "Large", "weight": "Bolder",
                     "color": color, "wrap": true},
                    {"type": "TextBlock", "text": t.message, "wrap": true},
                    {"type": "FactSet", "facts": [
                        {"title": "Kind", "value": format!("{:?}", t.kind)},
                        {"title": "Where", "value": format!("{}/{}", t.namespace, t.name)},
                        {"title": "Reason", "value": t.reason},
                        {"title": "When", "value": when(t)}
                    ]},
                    {"type": "TextBlock", "text": status_command(t), "fontType": "Monospace",
                     "wrap": true}
                ]
            }
        }]
    })
}

/// What PagerDuty does with a transition: open an alert, close it, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagerAction {
    Trigger(&'static str),
    Resolve,
}

pub fn pager_action(t: &Transition) -> Option<PagerAction> {
    use NotificationEvent::*;
    match t.event {
        Aborted | StageFailed => Some(PagerAction::Trigger("error")),
        RolledBack => Some(PagerAction::Trigger("critical")),
        BudgetPhaseChanged => match t.budget_phase()? {
            "Exhausted" => Some(PagerAction::Trigger("critical")),
            "Healthy" => Some(PagerAction::Resolve),
            _ => None,
        },
        Promoted => Some(PagerAction::Resolve),
        _ => None,
    }
}

/// PagerDuty Events API v2: one alert per resource (its dedup key), triggered by an abort, a
/// rollback, a failed stage or an exhausted budget, resolved by a promotion or a budget
/// Healthy again. `None`: nothing to tell PagerDuty.
pub fn pager_duty(t: &Transition, routing_key: &str) -> Option<Value> {
    let dedup_key = format!("sluice/{:?}/{}/{}", t.kind, t.namespace, t.name);
    Some(match pager_action(t)? {
        PagerAction::Resolve => json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key,
        }),
        PagerAction::Trigger(severity) => {
            let summary: String = format!("{}. {}", title(t), t.message)
                .chars()
                .take(1024)
                .collect();
            json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": dedup_key,
                "payload": {
                    "summary": summary,
                    "source": format!("{}/{}", t.namespace, t.name),
                    "severity": severity,
                    "timestamp": when(t),
                    "component": t.name,
                    "group": t.namespace,
                    "class": t.reason,
                    "custom_details": {
                        "kind": format!("{:?}", t.kind),
                        "message": t.message,
                        "status": status_command(t),
                    }
                }
            })
        }
    })
}

/// The CDEvents type of a transition, where one fits.
fn cdevents_type(t: &Transition) -> Option<&'static str> {
    use NotificationEvent::*;
    match (t.kind, t.event) {
        (WatchedKind::Rollout, Promoted) => Some("dev.cdevents.service.deployed.0.2.0"),
        (WatchedKind::Rollout, Aborted | RolledBack) => {
            Some("dev.cdevents.service.rolledback.0.2.0")
        }
        (WatchedKind::ErrorBudget, BudgetPhaseChanged) if t.budget_phase() == Some("Exhausted") => {
            Some("dev.cdevents.incident.detected.0.2.0")
        }
        _ => None,
    }
}

fn plural(kind: WatchedKind) -> &'static str {
    match kind {
        WatchedKind::Rollout => "rollouts",
        WatchedKind::ErrorBudget => "errorbudgets",
        WatchedKind::Pipeline => "pipelines",
    }
}

/// A CloudEvent (1.0, structured JSON mode). Types: the CDEvents one where it fits, else
/// `dev.sluice.<kind>.<event>.v1`. `data` carries the CDEvent (context and subject) when typed
/// so, and Sluice's own fields in `data.sluice` always.
pub fn cloud_event(t: &Transition) -> Value {
    let source = format!(
        "/apis/sluice.dev/v1alpha1/namespaces/{}/{}/{}",
        t.namespace,
        plural(t.kind),
        t.name
    );
    let own_type = format!(
        "dev.sluice.{}.{}.v1",
        format!("{:?}", t.kind).to_lowercase(),
        format!("{:?}", t.event).to_lowercase()
    );
    let type_ = cdevents_type(t).map_or(own_type, String::from);
    let sluice = json!({
        "kind": format!("{:?}", t.kind),
        "namespace": t.namespace,
        "name": t.name,
        "event": format!("{:?}", t.event),
        "reason": t.reason,
        "message": t.message,
        "warning": t.warning,
        "status": status_command(t),
    });
    let data = match cdevents_type(t) {
        Some(cd) => {
            let subject_type = if cd.contains(".incident.") {
                "incident"
            } else {
                "service"
            };
            json!({
                "context": {"version": "0.4.1", "id": t.key, "source": source, "type": cd,
                            "timestamp": when(t)},
                "subject": {"id": format!("{}/{}", t.namespace, t.name), "source": source,
                            "type": subject_type,
                            "content": {"environment": {"id": t.namespace, "source": source},
                                        "description": t.message}},
                "sluice": sluice,
            })
        }
        None => json!({"sluice": sluice}),
    };
    json!({
        "specversion": "1.0",
        "id": t.key,
        "source": source,
        "type": type_,
        "subject": format!("{}/{}", t.namespace, t.name),
        "time": when(t),
        "datacontenttype": "application/json",
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn transition(kind: WatchedKind, event: NotificationEvent, message: &str) -> Transition {
        Transition {
            key: "u1/1".into(),
            event,
            kind,
            namespace: "shop".into(),
            name: "checkout".into(),
            reason: "AnalysisFailed".into(),
            message: message.into(),
            warning: true,
            time: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    #[test]
    fn slack_and_teams_say_what_where_why_and_how_to_look() {
        let t = transition(
            WatchedKind::Rollout,
            NotificationEvent::Aborted,
            "analysis error-rate failed: 0.12 > 0.05",
        );
        let s = slack(&t);
        assert_eq!(
            s["blocks"][0]["text"]["text"],
            "Aborted: Rollout shop/checkout"
        );
        assert_eq!(s["blocks"][1]["text"]["text"], t.message);
        assert_eq!(
            s["blocks"][3]["elements"][0]["text"],
            "`kubectl sluice status shop/checkout`"
        );
        let card = &teams(&t)["attachments"][0];
        assert_eq!(
            card["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(card["content"]["type"], "AdaptiveCard");
        assert_eq!(card["content"]["body"][0]["color"], "Attention");
        assert_eq!(
            card["content"]["body"][2]["facts"][2]["value"],
            "AnalysisFailed"
        );
    }

    #[test]
    fn pagerduty_triggers_on_trouble_and_resolves_on_recovery() {
        use NotificationEvent::*;
        let rollout = |e| transition(WatchedKind::Rollout, e, "m");
        let budget = |phase: &str| {
            transition(
                WatchedKind::ErrorBudget,
                BudgetPhaseChanged,
                &format!("{phase}: 96% consumed"),
            )
        };
        for (t, action) in [
            (rollout(Aborted), Some(PagerAction::Trigger("error"))),
            (rollout(RolledBack), Some(PagerAction::Trigger("critical"))),
            (rollout(Promoted), Some(PagerAction::Resolve)),
            (rollout(StepReached), None),
            (budget("Exhausted"), Some(PagerAction::Trigger("critical"))),
            (budget("Healthy"), Some(PagerAction::Resolve)),
            (budget("Frozen"), None),
        ] {
            assert_eq!(pager_action(&t), action, "{t:?}");
        }
        let trigger = pager_duty(&rollout(Aborted), "KEY").unwrap();
        let resolve = pager_duty(&rollout(Promoted), "KEY").unwrap();
        assert_eq!(
            trigger["dedup_key"], resolve["dedup_key"],
            "one alert per resource"
        );
        assert_eq!(trigger["payload"]["severity"], "error");
        assert_eq!(resolve["event_action"], "resolve");
        assert!(pager_duty(&rollout(StepReached), "KEY").is_none());
    }

    #[test]
    fn cloudevents_carry_cdevents_types_where_one_fits() {
        use NotificationEvent::*;
        let promoted = cloud_event(&transition(WatchedKind::Rollout, Promoted, "m"));
        assert_eq!(promoted["specversion"], "1.0");
        assert_eq!(promoted["type"], "dev.cdevents.service.deployed.0.2.0");
        assert_eq!(
            promoted["source"],
            "/apis/sluice.dev/v1alpha1/namespaces/shop/rollouts/checkout"
        );
        assert_eq!(promoted["data"]["context"]["type"], promoted["type"]);
        assert_eq!(promoted["time"], "2023-11-14T22:13:20Z");
        let aborted = cloud_event(&transition(WatchedKind::Rollout, Aborted, "m"));
        assert_eq!(aborted["type"], "dev.cdevents.service.rolledback.0.2.0");
        let exhausted = cloud_event(&transition(
            WatchedKind::ErrorBudget,
            BudgetPhaseChanged,
            "Exhausted: spent",
        ));
        assert_eq!(exhausted["type"], "dev.cdevents.incident.detected.0.2.0");
        let stage = cloud_event(&transition(WatchedKind::Pipeline, StagePromoted, "m"));
        assert_eq!(stage["type"], "dev.sluice.pipeline.stagepromoted.v1");
        assert_eq!(stage["data"]["sluice"]["event"], "StagePromoted");
    }
}
