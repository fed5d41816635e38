//! Kubernetes Events (events.k8s.io/v1), with a structured log line for each.
//!
//! Not kube's `Recorder`: it aggregates every Event of one reason on one object into a single
//! series that keeps the first note, so "step 3/6 done" was shown as "step 1/6 done (x3)",
//! and its cache lives in memory. Here an Event's name is derived from what it says (object,
//! reason, note): the same decision recorded again, by this process or by a restarted one,
//! finds its Event and counts it (`series.count`), and different decisions stay apart.
//!
//! Events are written off the reconcile, by a few writers of their own: a reconcile queues its
//! Events and goes on. One object's Events always go to the same writer, so they are recorded
//! in the order they were decided (notifications follow that order). At 1,000 Rollouts, 100 releases wrote
//! about 680 Events, and written inline each held its reconcile's slot and took a place among
//! the requests in flight that another Rollout's abort was waiting for (docs/performance.md).
//! Like client-go's broadcaster, the queue is bounded and drops (and counts) what does not
//! fit: an Event is a report, never a step, and the log line is written either way.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::telemetry::EventCounts;

/// Events waiting to be written, at most (split evenly between the writers); one more is
/// dropped. client-go's broadcaster keeps as many. 100 releases at once queue about 700.
const QUEUE: usize = 1_000;

/// Writers, each writing one Event at a time. Few, so that a burst of Events leaves the
/// requests in flight to the writes that move traffic; enough that the queue drains faster
/// than releases fill it.
const WRITERS: usize = 4;

/// An Event decided on, waiting to be written.
#[derive(Clone, Debug)]
struct Pending {
    reference: ObjectReference,
    warning: bool,
    reason: &'static str,
    note: String,
    /// When it was decided: its time, however long it waited.
    at: Timestamp,
}

/// How an Event's write ended, as counted in `sluice_events_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Created.
    Recorded,
    /// Recorded before: its series counted once more.
    Counted,
    /// The apiserver refused it, or could not be reached (logged).
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Recorded => "recorded",
            Outcome::Counted => "counted",
            Outcome::Failed => "failed",
        }
    }
}

type Write = Arc<dyn Fn(Pending) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// Queues Events for the writers that record them as one reporting controller and instance.
/// Clones share the queues.
#[derive(Clone)]
pub struct Recorder {
    /// One queue per writer; an object's Events go to the queue its reference picks.
    queues: Arc<[mpsc::Sender<Pending>]>,
    /// Events queued and not yet written (or given up on).
    unwritten: Arc<watch::Sender<usize>>,
    counts: EventCounts,
}

impl Recorder {
    /// Starts the writers (on the current Tokio runtime); they end once every clone is
    /// dropped and the queues are empty.
    pub fn new(client: Client, instance: String, counts: EventCounts) -> Self {
        let writer = Arc::new(Writer { client, instance });
        let write: Write = Arc::new(move |event| {
            let writer = writer.clone();
            Box::pin(async move { writer.record(&event).await })
        });
        Self::with_writer(write, QUEUE, counts)
    }

    /// `capacity`: the Events waiting, at most, over all the writers.
    fn with_writer(write: Write, capacity: usize, counts: EventCounts) -> Self {
        let unwritten = Arc::new(watch::Sender::new(0));
        let queues = (0..WRITERS)
            .map(|_| {
                let (queue, pending) = mpsc::channel((capacity / WRITERS).max(1));
                tokio::spawn(write_each(
                    write.clone(),
                    pending,
                    unwritten.clone(),
                    counts.clone(),
                ));
                queue
            })
            .collect();
        Self {
            queues,
            unwritten,
            counts,
        }
    }

    fn enqueue(&self, event: Pending) {
        let mut hasher = Fnv64::default();
        for part in [
            &event.reference.uid,
            &event.reference.namespace,
            &event.reference.name,
        ] {
            part.hash(&mut hasher);
        }
        let lane = (hasher.finish() % self.queues.len() as u64) as usize;
        self.unwritten.send_modify(|n| *n += 1);
        let Err(refused) = self.queues[lane].try_send(event) else {
            return;
        };
        self.unwritten.send_modify(|n| *n = n.saturating_sub(1));
        self.counts.count("dropped");
        let reason = match &refused {
            mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e) => e.reason,
        };
        tracing::warn!(
            reason,
            queued = QUEUE,
            "an Event was dropped: too many are waiting to be written"
        );
    }

    /// Waits until every Event queued so far is written or given up on, for at most `limit`;
    /// false if some were still waiting. A graceful stop calls it so that it loses none.
    pub async fn flush(&self, limit: Duration) -> bool {
        let mut unwritten = self.unwritten.subscribe();
        tokio::time::timeout(limit, unwritten.wait_for(|n| *n == 0))
            .await
            .is_ok()
    }
}

/// Writes what is queued, one at a time and in order, until the queue closes.
async fn write_each(
    write: Write,
    mut pending: mpsc::Receiver<Pending>,
    unwritten: Arc<watch::Sender<usize>>,
    counts: EventCounts,
) {
    while let Some(event) = pending.recv().await {
        let outcome = write(event).await;
        counts.count(outcome.as_str());
        unwritten.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Writes Events as one reporting controller and instance.
struct Writer {
    client: Client,
    instance: String,
}

impl Writer {
    async fn record(&self, event: &Pending) -> Outcome {
        match self.try_record(event).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, reason = event.reason, "could not record an Event");
                Outcome::Failed
            }
        }
    }

    async fn try_record(&self, event: &Pending) -> kube::Result<Outcome> {
        let reference = &event.reference;
        let namespace = reference.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let name = event_name(reference, event.reason, &event.note);
        let at = MicroTime(event.at);
        let body = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            event_time: Some(at.clone()),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(event.reason.into()),
            action: Some(event.reason.into()),
            note: Some(event.note.clone()),
            regarding: Some(reference.clone()),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        match api.create(&PostParams::default(), &body).await {
            Ok(_) => Ok(Outcome::Recorded),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Recorded before: count it.
                let seen = api.get(&name).await?;
                let count = seen.series.as_ref().map_or(1, |s| s.count) + 1;
                let series = EventSeries {
                    count,
                    last_observed_time: at,
                };
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "series": series })),
                )
                .await
                .map(|_| Outcome::Counted)
            }
            Err(e) => Err(e),
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

/// Queues each planned Event on `reference`, in order.
pub fn publish_all(recorder: &Recorder, reference: &ObjectReference, events: &[PlannedEvent]) {
    for event in events {
        publish(
            recorder,
            reference,
            event.warning,
            event.reason,
            &event.message,
        );
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

/// Writes a decision as a structured log line, and queues it as an Event on `reference`.
/// Nothing is returned: Events are a report, not a step (a failure to record is logged).
pub fn publish(
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
    recorder.enqueue(Pending {
        reference: reference.clone(),
        warning,
        reason,
        note: message.chars().take(MAX_NOTE).collect(),
        at: Timestamp::now(),
    });
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

    /// A writer that holds every write until `gate` opens, recording how many it held at once.
    fn held_writer(
        gate: Arc<tokio::sync::Semaphore>,
        written: Arc<std::sync::Mutex<Vec<String>>>,
        at_once: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Write {
        use std::sync::atomic::Ordering::SeqCst;
        Arc::new(move |event: Pending| {
            let (gate, written) = (gate.clone(), written.clone());
            let (at_once, most) = (at_once.clone(), most.clone());
            Box::pin(async move {
                let now = at_once.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                let _open = gate.acquire().await;
                at_once.fetch_sub(1, SeqCst);
                written
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(event.note);
                Outcome::Recorded
            })
        })
    }

    /// Counters a held writer reports to.
    struct Held {
        gate: Arc<tokio::sync::Semaphore>,
        written: Arc<std::sync::Mutex<Vec<String>>>,
        at_once: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Held {
        fn new() -> Self {
            Self {
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
                written: Arc::default(),
                at_once: Arc::default(),
                most: Arc::default(),
            }
        }

        fn recorder(&self, capacity: usize, counts: &EventCounts) -> Recorder {
            let write = held_writer(
                self.gate.clone(),
                self.written.clone(),
                self.at_once.clone(),
                self.most.clone(),
            );
            Recorder::with_writer(write, capacity, counts.clone())
        }

        /// Waits (up to 5 s) until `n` writes are held at once.
        async fn until_holding(&self, n: usize) {
            let holding = async {
                while self.at_once.load(std::sync::atomic::Ordering::SeqCst) < n {
                    tokio::task::yield_now().await;
                }
            };
            assert!(
                tokio::time::timeout(Duration::from_secs(5), holding)
                    .await
                    .is_ok(),
                "the writers never held {n} at once"
            );
        }

        fn open(&self) {
            self.gate
                .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
        }

        fn written(&self) -> Vec<String> {
            self.written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }
    }

    #[tokio::test]
    async fn one_objects_events_are_written_one_at_a_time_in_order_and_dropped_past_the_bound() {
        let (held, counts) = (Held::new(), EventCounts::default());
        // Two may wait per writer.
        let recorder = held.recorder(2 * WRITERS, &counts);
        let step = |i: usize| {
            publish(
                &recorder,
                &rollout("u1"),
                false,
                "StepCompleted",
                &format!("step {i}"),
            );
        };
        // Publishing never waits: the object's writer takes the first and holds it...
        step(0);
        held.until_holding(1).await;
        // ...two more wait behind it, and the rest are dropped, counted.
        (1..6).for_each(step);
        assert_eq!(counts.value("dropped"), 3);
        assert!(
            !recorder.flush(Duration::from_millis(50)).await,
            "flushed while three were waiting"
        );
        held.open();
        assert!(recorder.flush(Duration::from_secs(5)).await);
        assert_eq!(counts.value("recorded"), 3);
        assert_eq!(held.written(), ["step 0", "step 1", "step 2"]);
        assert_eq!(held.most.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn different_objects_events_are_written_side_by_side() {
        let (held, counts) = (Held::new(), EventCounts::default());
        let recorder = held.recorder(QUEUE, &counts);
        for uid in 0..32 {
            publish(
                &recorder,
                &rollout(&format!("u{uid}")),
                false,
                "Promoted",
                "done",
            );
        }
        held.until_holding(WRITERS).await;
        held.open();
        assert!(recorder.flush(Duration::from_secs(5)).await);
        assert_eq!(counts.value("recorded"), 32);
        assert_eq!(held.most.load(std::sync::atomic::Ordering::SeqCst), WRITERS);
    }

    #[tokio::test]
    async fn an_event_keeps_the_time_it_was_decided_and_a_note_cut_to_the_bound() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let sink = seen.clone();
        let write: Write = Arc::new(move |event: Pending| {
            let sink = sink.clone();
            Box::pin(async move {
                *sink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(event);
                Outcome::Recorded
            })
        });
        let recorder = Recorder::with_writer(write, 8, EventCounts::default());
        let before = Timestamp::now();
        publish(
            &recorder,
            &rollout("u1"),
            true,
            "Aborted",
            &"x".repeat(MAX_NOTE + 10),
        );
        assert!(recorder.flush(Duration::from_secs(5)).await);
        let event = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(event) = event else {
            panic!("nothing written");
        };
        assert!(event.warning);
        assert_eq!(event.note.chars().count(), MAX_NOTE);
        assert!(event.at >= before && event.at <= Timestamp::now());
    }

    #[test]
    fn names_stay_valid_for_long_object_names() {
        let mut long = rollout("u1");
        long.name = Some("a".repeat(253));
        assert!(event_name(&long, "Promoted", "x").len() <= 253);
    }
}
