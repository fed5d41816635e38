//! Kubernetes Events (events.k8s.io/v1), with a structured log line for each.
//!
//! Not kube's `Recorder`: it aggregates every Event of one reason on one object into a single
//! series that keeps the first note, so "step 3/6 done" was shown as "step 1/6 done (x3)",
//! and its cache lives in memory. Here an Event's name is derived from what it says (object,
//! reason, note): the same decision recorded again, by this process or by a restarted one,
//! finds its Event and counts it (`series.count`), and different decisions stay apart.

use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Writes Events as one reporting controller and instance.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    instance: String,
}

impl Recorder {
    pub fn new(client: Client, instance: String) -> Self {
        Self { client, instance }
    }

    /// The same reporter, writing through `client`.
    pub fn through(&self, client: Client) -> Self {
        Self {
            client,
            instance: self.instance.clone(),
        }
    }

    async fn record(
        &self,
        reference: &ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> kube::Result<()> {
        let namespace = reference.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let name = event_name(reference, reason, note);
        let now = MicroTime(Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            event_time: Some(now.clone()),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            reason: Some(reason.into()),
            action: Some(reason.into()),
            note: Some(note.into()),
            regarding: Some(reference.clone()),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Recorded before: count it.
                let seen = api.get(&name).await?;
                let count = seen.series.as_ref().map_or(1, |s| s.count) + 1;
                let series = EventSeries {
                    count,
                    last_observed_time: now,
                };
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "series": series })),
                )
                .await
                .map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }
}

/// `reportingController` of every Event Sluice writes.
pub const REPORTING_CONTROLLER: &str = "sluice.dev/controller";

/// `<object>.<16 hex digits>`: stable for the same object, reason and note.
fn event_name(reference: &ObjectReference, reason: &str, note: &str) -> String {
    let mut hasher = Fnv64::default();
    for part in [
        reference.kind.as_deref().unwrap_or_default(),
        reference.uid.as_deref().unwrap_or_default(),
        reference.name.as_deref().unwrap_or_default(),
        reason,
        note,
    ] {
        part.hash(&mut hasher);
    }
    let object: String = reference
        .name
        .as_deref()
        .unwrap_or("object")
        .chars()
        .take(200)
        .collect();
    format!("{object}.{:016x}", hasher.finish())
}

/// FNV-1a: the same name on every build and platform (std's `DefaultHasher` promises neither).
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

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

/// Whose decision an Event records: a person's request (promote, abort, retry, resume, an
/// override, an approval) or Sluice's own judgement.
pub fn actor(reason: &str) -> &'static str {
    match reason {
        "AbortedByUser" | "PromotedFull" | "Resumed" | "Retried" | "AnalysisRestarted"
        | "FreezeOverridden" | "Approved" | "Rejected" => "person",
        _ => "sluice",
    }
}

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
        actor = actor(reason),
        kind = reference.kind.as_deref().unwrap_or_default(),
        object = reference.name.as_deref().unwrap_or_default(),
        namespace = reference.namespace.as_deref().unwrap_or_default(),
        "event"
    );
    let note: String = message.chars().take(MAX_NOTE).collect();
    if let Err(e) = recorder.record(reference, warning, reason, &note).await {
        tracing::warn!(error = %e, reason, "could not record an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(uid: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Rollout".into()),
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn the_same_decision_gets_the_same_name_and_another_one_another() {
        let step1 = event_name(&rollout("u1"), "StepCompleted", "step 1/6 of abc done");
        assert_eq!(
            step1,
            event_name(&rollout("u1"), "StepCompleted", "step 1/6 of abc done")
        );
        assert!(step1.starts_with("web."), "{step1}");
        assert_eq!(step1.len(), "web.".len() + 16);
        for other in [
            event_name(&rollout("u1"), "StepCompleted", "step 2/6 of abc done"),
            event_name(&rollout("u1"), "Paused", "step 1/6 of abc done"),
            event_name(&rollout("u2"), "StepCompleted", "step 1/6 of abc done"),
        ] {
            assert_ne!(step1, other);
        }
    }

    #[test]
    fn names_stay_valid_for_long_object_names() {
        let mut long = rollout("u1");
        long.name = Some("a".repeat(253));
        assert!(event_name(&long, "Promoted", "x").len() <= 253);
    }
}
