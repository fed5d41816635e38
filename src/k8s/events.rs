//! Kubernetes Events through the context's one recorder, with a log line for each.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// An Event a planner decided on (the ErrorBudget and Pipeline planners; the Rollout planner's
/// reasons are typed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Records each planned Event on `reference`, in order.
pub async fn publish_all(
    recorder: &Recorder,
    reference: &ObjectReference,
    events: &[PlannedEvent],
) {
    for event in events {
        publish(
            recorder,
            reference,
            event.warning,
            event.reason,
            &event.message,
        )
        .await;
    }
}

/// Events are bounded by the API; longer notes are cut.
const MAX_NOTE: usize = 1024;

/// Records an Event on `reference` and writes the same decision as a structured log line.
/// A failure to record is logged, never returned: Events are a report, not a step.
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    warning: bool,
    reason: &'static str,
    message: &str,
) {
    tracing::info!(
        reason,
        message,
        kind = reference.kind.as_deref().unwrap_or_default(),
        object = reference.name.as_deref().unwrap_or_default(),
        namespace = reference.namespace.as_deref().unwrap_or_default(),
        "event"
    );
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.chars().take(MAX_NOTE).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason, "could not record an Event");
    }
}
