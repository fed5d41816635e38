//! Kubernetes Events (events.k8s.io/v1), with a structured log line for each.
//!
//! Not kube's `Recorder`: it aggregates every Event of one reason on one object into a single
//! series that keeps the first note, so "step 3/6 done" was shown as "step 1/6 done (x3)",
//! and its cache lives in memory. Here an Event's name is derived from what it says (object,
//! reason, note): the same decision recorded again, by this process or by a restarted one,
//! finds its Event and counts it (`series.count`), and different decisions stay apart.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

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

    async fn record(
        &self,
        reference: &ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
        at: Timestamp,
    ) -> kube::Result<()> {
        let namespace = reference.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let name = event_name(reference, reason, note);
        let now = MicroTime(at);
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

/// Posts the Events a reconcile decided on after it, so that the reconcile ends with its last
/// write: a reconcile of the same object cannot start before it ends, and Events queue behind
/// status writes on a busy apiserver. In a bench run at 10,000 Rollouts, 16 of the 100 timed
/// steps started about 0.5 s late, waiting for the Events of the reconcile that had begun
/// their pause (docs/performance.md).
///
/// Nothing is dropped and nothing is reordered: each object's Events are posted in the order
/// they were decided, by one task at a time per object, and at most `HANDOVERS_WAITING`
/// handovers wait at once, beyond which a reconcile waits for room (so memory stays bounded).
/// At most `POSTS_IN_FLIGHT` Events are posted at once, so they never take more than that
/// many of the request lane's places from the status writes. Like any write, an Event not yet
/// posted when the operator stops (or loses its Lease) is lost: Events are a report, not a
/// step (docs/reliability.md).
#[derive(Clone)]
pub struct Poster {
    recorder: Recorder,
    room: Arc<Semaphore>,
    posts: Arc<Semaphore>,
    /// The handovers not yet posted, by the object they were decided for; an object is here
    /// exactly while a task posts its Events.
    queued: Arc<Mutex<HashMap<String, VecDeque<Handover>>>>,
}

/// The Events of one reconcile, decided `at`, and their place among those waiting.
struct Handover {
    events: Vec<(ObjectReference, PlannedEvent)>,
    at: Timestamp,
    _room: OwnedSemaphorePermit,
}

/// Handovers that may wait to be posted at once.
const HANDOVERS_WAITING: usize = 512;

/// Events posted at once: half of the usual lane's places at the default bound
/// (`k8s::lanes`), so status writes and measurements always have the other half.
const POSTS_IN_FLIGHT: usize = 4;

impl Poster {
    pub fn new(recorder: Recorder) -> Self {
        Self {
            recorder,
            room: Arc::new(Semaphore::new(HANDOVERS_WAITING)),
            posts: Arc::new(Semaphore::new(POSTS_IN_FLIGHT)),
            queued: Arc::default(),
        }
    }

    /// Hands over the Events a reconcile of `object` decided on (each with the object it is
    /// recorded on), to be posted after those handed over for `object` before. Returns once
    /// there is room for them, not once they are posted.
    pub async fn hand_over(&self, object: String, events: Vec<(ObjectReference, PlannedEvent)>) {
        if events.is_empty() {
            return;
        }
        // Logged and timed as decided: the Event's time is the decision's, not the post's.
        let at = Timestamp::now();
        for (reference, event) in &events {
            log(reference, event.reason, &event.message);
        }
        // Err only once closed, and this semaphore is never closed.
        let Ok(room) = self.room.clone().acquire_owned().await else {
            return;
        };
        let handover = Handover {
            events,
            at,
            _room: room,
        };
        let first = {
            let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = queued.entry(object.clone()).or_default();
            queue.push_back(handover);
            queue.len() == 1
        };
        if first {
            // The reconcile's span goes with them, so a failure's log line names the object.
            tokio::spawn(
                self.clone()
                    .post_queued(object)
                    .instrument(tracing::Span::current()),
            );
        }
    }

    /// Hands over `events`, all on `reference` (the object reconciled).
    pub async fn hand_over_on(&self, reference: &ObjectReference, events: &[PlannedEvent]) {
        self.hand_over(
            object_key(reference),
            events
                .iter()
                .map(|event| (reference.clone(), event.clone()))
                .collect(),
        )
        .await;
    }

    /// Posts `object`'s handovers in order until none is left.
    async fn post_queued(self, object: String) {
        while let Some((events, at)) = self.front(&object) {
            for (reference, event) in events {
                let Ok(_in_flight) = self.posts.acquire().await else {
                    return;
                };
                post(
                    &self.recorder,
                    &reference,
                    event.warning,
                    event.reason,
                    &event.message,
                    at,
                )
                .await;
            }
            if !self.posted_front(&object) {
                return;
            }
        }
    }

    /// The Events of `object`'s oldest handover. It stays at the queue's front until posted,
    /// so a handover arriving meanwhile finds the object busy and starts no second task.
    fn front(&self, object: &str) -> Option<(Vec<(ObjectReference, PlannedEvent)>, Timestamp)> {
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        let front = queued.get_mut(object)?.front_mut()?;
        Some((std::mem::take(&mut front.events), front.at))
    }

    /// Takes `object`'s oldest handover out, posted; whether another one waits.
    fn posted_front(&self, object: &str) -> bool {
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = queued.get_mut(object) else {
            return false;
        };
        queue.pop_front();
        if queue.is_empty() {
            queued.remove(object);
            return false;
        }
        true
    }
}

/// `kind/namespace/name` of the object an Event is on.
pub fn object_key(reference: &ObjectReference) -> String {
    format!(
        "{}/{}/{}",
        reference.kind.as_deref().unwrap_or_default(),
        reference.namespace.as_deref().unwrap_or_default(),
        reference.name.as_deref().unwrap_or_default()
    )
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
    log(reference, reason, message);
    post(
        recorder,
        reference,
        warning,
        reason,
        message,
        Timestamp::now(),
    )
    .await;
}

/// The structured log line of an Event.
fn log(reference: &ObjectReference, reason: &'static str, message: &str) {
    tracing::info!(
        reason,
        message,
        actor = actor(reason),
        kind = reference.kind.as_deref().unwrap_or_default(),
        object = reference.name.as_deref().unwrap_or_default(),
        namespace = reference.namespace.as_deref().unwrap_or_default(),
        "event"
    );
}

/// Records an Event decided `at`; a failure is logged.
async fn post(
    recorder: &Recorder,
    reference: &ObjectReference,
    warning: bool,
    reason: &'static str,
    message: &str,
    at: Timestamp,
) {
    let note: String = message.chars().take(MAX_NOTE).collect();
    if let Err(e) = recorder.record(reference, warning, reason, &note, at).await {
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

    /// An apiserver that takes Events and keeps their notes in the order their posts ended,
    /// each answered after a delay of its own (so posts made at once would end out of order).
    async fn events_server() -> (Client, Arc<Mutex<Vec<String>>>) {
        use axum::extract::State;
        use axum::http::StatusCode;
        async fn take(
            State(notes): State<Arc<Mutex<Vec<String>>>>,
            body: String,
        ) -> (StatusCode, String) {
            let event: serde_json::Value = serde_json::from_str(&body).unwrap();
            let note = event["note"].as_str().unwrap().to_string();
            let delay = note.bytes().map(u64::from).sum::<u64>() % 7;
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            notes.lock().unwrap().push(note);
            (StatusCode::CREATED, body)
        }
        let notes = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/apis/events.k8s.io/v1/namespaces/{namespace}/events",
                axum::routing::post(take),
            )
            .with_state(notes.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{address}").parse().unwrap());
        (Client::try_from(config).unwrap(), notes)
    }

    #[tokio::test]
    async fn each_objects_events_are_posted_in_the_order_decided_and_none_is_lost() {
        let (client, notes) = events_server().await;
        let poster = Poster::new(Recorder::new(client, "test".into()));
        // Reconciles of two objects, one after another, each handing over two Events.
        for i in 0..20 {
            for name in ["a", "b"] {
                let mut on = rollout(name);
                on.name = Some(name.into());
                let event = |which: &str| PlannedEvent {
                    warning: false,
                    reason: "StepCompleted",
                    message: format!("{name} {i} {which}"),
                };
                poster
                    .hand_over_on(&on, &[event("first"), event("second")])
                    .await;
            }
        }
        let started = std::time::Instant::now();
        while notes.lock().unwrap().len() < 80 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "posted: {:?}",
                notes.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let notes = notes.lock().unwrap().clone();
        for name in ["a", "b"] {
            let posted: Vec<&String> = notes.iter().filter(|n| n.starts_with(name)).collect();
            let decided: Vec<String> = (0..20)
                .flat_map(|i| [format!("{name} {i} first"), format!("{name} {i} second")])
                .collect();
            assert_eq!(posted, decided.iter().collect::<Vec<_>>());
        }
        // Every handover's room given back, and no object left queued.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(poster.room.available_permits(), HANDOVERS_WAITING);
        assert!(poster.queued.lock().unwrap().is_empty());
    }
}
