//! Notifications: the transitions Sluice records as Events, sent to the channels `Notifier`s
//! name (Slack, Microsoft Teams, PagerDuty, CloudEvents webhooks).
//!
//! One watch on Sluice's Events finds the transitions (`transition`); each Notifier that covers
//! one gets it in order through its own queue and worker, which formats it (`format`), reads
//! the channel's Secret, posts it with a timeout and retries with backoff, and records the
//! outcome in the Notifier's status. The status keeps the last transitions sent, so a
//! restarted operator, which sees every Event again, sends none twice; Events from before a
//! Notifier existed are not sent at all. A delivery never blocks a release: the controllers
//! only write Events, and the workers run beside them. URLs and keys are read from Secrets at
//! each delivery and never logged, recorded or put in an Event (errors are stripped of URLs).

pub mod format;
pub mod transition;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::{mpsc, watch};

use crate::api::common::SecretKeyRef;
use crate::api::notifier::{Notifier, NotifierStatus, SentRecord};
use crate::context::Context;
use format::Channel;
use transition::Transition;

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The waits between attempts: five attempts over about 15 s.
const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// PagerDuty's Events API v2.
const PAGERDUTY_ENDPOINT: &str = "https://events.pagerduty.com/v2/enqueue";

/// Runs the notifications until `stop`.
pub async fn run(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let namespace = ctx.settings.namespace.clone();
    let (store, writer) = reflector::store();
    let workers = Workers::new(ctx.clone(), stop.clone());
    let notifiers = {
        let workers = workers.clone();
        crate::k8s::watch::reflected(
            crate::k8s::scoped::<Notifier>(&client, namespace.as_deref()),
            watcher::Config::default(),
            writer,
        )
        .for_each(move |notifier| {
            // A new Notifier says at once whether its channel's Secret is readable.
            if let Ok(notifier) = notifier {
                workers.send(&notifier, Work::Check);
            }
            futures::future::ready(())
        })
    };
    let events = route(
        ctx.clone(),
        crate::k8s::scoped::<Event>(&client, namespace.as_deref()),
        store,
        workers,
    );
    tokio::select! {
        _ = notifiers => {}
        _ = events => {}
        _ = crate::k8s::stopped(stop) => {}
    }
}

/// Hands each transition to the workers of the Notifiers that cover it, once the Notifiers
/// are known (before, a transition would find nobody).
async fn route(ctx: Arc<Context>, events: Api<Event>, store: Store<Notifier>, workers: Workers) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    let operator_namespace = ctx.settings.operator_namespace.clone();
    // Only Sluice's own Events, filtered by the apiserver: a cluster's other Events (pods,
    // nodes, ...) are far more numerous and never a transition.
    let own = watcher::Config::default().fields(&format!(
        "reportingController={}",
        crate::k8s::events::REPORTING_CONTROLLER
    ));
    let mut stream = watcher(events, own)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let Some(t) = transition::from_event(&event) else {
                    continue;
                };
                for notifier in store.state() {
                    if transition::covers(&notifier, &operator_namespace, &t) {
                        workers.send(&notifier, Work::Send(t.clone()));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the Event watch for notifications failed; retrying")
            }
        }
    }
}

enum Work {
    /// Check the channel's Secret and say so in the status.
    Check,
    Send(Transition),
}

/// One queue and worker per Notifier: its transitions go out in order, and a slow or failing
/// channel delays only its own.
#[derive(Clone)]
struct Workers {
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
    queues: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Work>>>>,
}

impl Workers {
    fn new(ctx: Arc<Context>, stop: watch::Receiver<bool>) -> Self {
        Self {
            ctx,
            stop,
            queues: Arc::default(),
        }
    }

    fn send(&self, notifier: &Notifier, work: Work) {
        let namespace = notifier.namespace().unwrap_or_default();
        let name = notifier.name_any();
        let key = format!("{namespace}/{name}");
        let Ok(mut queues) = self.queues.lock() else {
            return;
        };
        let work = match queues.get(&key) {
            Some(queue) => match queue.send(work) {
                Ok(()) => return,
                // A worker ends when its Notifier is gone; a new one of that name gets a new one.
                Err(mpsc::error::SendError(work)) => work,
            },
            None => work,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(work);
        queues.insert(key, tx);
        tokio::spawn(worker(
            self.ctx.clone(),
            namespace,
            name,
            rx,
            self.stop.clone(),
        ));
    }
}

/// What became of one transition.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Delivered,
    /// Nothing to send on this channel (PagerDuty only opens and closes alerts).
    NotForChannel,
    /// Every attempt failed: why, without the URL.
    Failed(String),
}

async fn worker(
    ctx: Arc<Context>,
    namespace: String,
    name: String,
    mut queue: mpsc::UnboundedReceiver<Work>,
    stop: watch::Receiver<bool>,
) {
    let api: Api<Notifier> = Api::namespaced(ctx.client.clone(), &namespace);
    let Ok(http) = reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() else {
        return;
    };
    // Sent by this worker, for while its status write is not yet visible.
    let mut sent_here: VecDeque<String> = VecDeque::new();
    let mut stopped = Box::pin(crate::k8s::stopped(stop));
    loop {
        let work = tokio::select! {
            work = queue.recv() => work,
            _ = &mut stopped => None,
        };
        let Some(work) = work else { return };
        let notifier = match api.get_opt(&name).await {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, notifier = %name, "cannot read the Notifier; a transition is not sent");
                continue;
            }
        };
        let status = notifier.status.clone().unwrap_or_default();
        let Some((channel, _)) = channel_of(&notifier) else {
            continue;
        };
        let outcome = match &work {
            Work::Check => match read_secret(&ctx, &namespace, secret_of(&notifier)).await {
                Ok(_) if status.channel.is_some() => continue,
                Ok(_) => None,
                Err(why) => Some(Outcome::Failed(why)),
            },
            Work::Send(t) => {
                let created = notifier.metadata.creation_timestamp.as_ref().map(|c| c.0);
                if transition::already_handled(created, &status.sent, t)
                    || sent_here.contains(&t.key)
                {
                    continue;
                }
                let started = std::time::Instant::now();
                let outcome = deliver(&ctx, &http, &notifier, channel, t).await;
                tracing::info!(
                    notifier = %name, namespace = %namespace, transition = %t.what(),
                    channel = channel.as_str(), outcome = ?outcome,
                    seconds_since_transition = Timestamp::now().duration_since(t.time).as_secs_f64(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "notification"
                );
                sent_here.push_back(t.key.clone());
                if sent_here.len() > 2 * transition::SENT_KEPT {
                    sent_here.pop_front();
                }
                Some(outcome)
            }
        };
        let transition = match &work {
            Work::Send(t) => Some(t),
            Work::Check => None,
        };
        if let Some(Outcome::Failed(why)) = &outcome
            && let Some(t) = transition
        {
            let reference = notifier.object_ref(&());
            crate::k8s::events::publish(
                &ctx.recorder,
                &reference,
                true,
                "NotificationFailed",
                &format!("{} not sent to {}: {why}", t.what(), channel.as_str()),
            )
            .await;
        }
        let desired = after(
            &status,
            channel,
            transition,
            outcome.as_ref(),
            notifier.metadata.generation,
            Timestamp::now(),
        );
        if let Err(e) = crate::k8s::status::apply(&api, &notifier, Some(&status), &desired).await {
            tracing::warn!(error = %e, notifier = %name, "cannot record a notification in the Notifier's status");
        }
    }
}

/// The Notifier's channel and its Secret key.
fn channel_of(notifier: &Notifier) -> Option<(Channel, &SecretKeyRef)> {
    let spec = &notifier.spec;
    if let Some(c) = &spec.slack {
        return Some((Channel::Slack, &c.url_secret_ref));
    }
    if let Some(c) = &spec.teams {
        return Some((Channel::Teams, &c.url_secret_ref));
    }
    if let Some(c) = &spec.pager_duty {
        return Some((Channel::PagerDuty, &c.routing_key_secret_ref));
    }
    spec.webhook
        .as_ref()
        .map(|c| (Channel::Webhook, &c.url_secret_ref))
}

fn secret_of(notifier: &Notifier) -> Option<&SecretKeyRef> {
    channel_of(notifier).map(|(_, s)| s)
}

/// The value of a Secret key, trimmed; the error names the Secret, never its value.
async fn read_secret(
    ctx: &Context,
    namespace: &str,
    key: Option<&SecretKeyRef>,
) -> Result<String, String> {
    let key = key.ok_or("no channel")?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets
        .get_opt(&key.name)
        .await
        .map_err(|e| format!("cannot read Secret {}: {e}", key.name))?
        .ok_or_else(|| format!("Secret {} not found", key.name))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key.key))
        .ok_or_else(|| format!("Secret {} has no key {}", key.name, key.key))?;
    String::from_utf8(bytes.0.clone())
        .map(|s| s.trim().to_string())
        .map_err(|_| format!("Secret {} key {} is not text", key.name, key.key))
}

/// Formats and posts one transition, retrying failures with backoff.
async fn deliver(
    ctx: &Context,
    http: &reqwest::Client,
    notifier: &Notifier,
    channel: Channel,
    t: &Transition,
) -> Outcome {
    let namespace = notifier.namespace().unwrap_or_default();
    let secret = match read_secret(ctx, &namespace, secret_of(notifier)).await {
        Ok(s) => s,
        Err(why) => {
            ctx.metrics().notification(channel.as_str(), "failed");
            return Outcome::Failed(why);
        }
    };
    let (url, body, content_type) = match channel {
        Channel::Slack => (secret, format::slack(t), "application/json"),
        Channel::Teams => (secret, format::teams(t), "application/json"),
        Channel::Webhook => (
            secret,
            format::cloud_event(t),
            "application/cloudevents+json; charset=utf-8",
        ),
        Channel::PagerDuty => {
            let Some(body) = format::pager_duty(t, &secret) else {
                return Outcome::NotForChannel;
            };
            let endpoint = notifier
                .spec
                .pager_duty
                .as_ref()
                .and_then(|p| p.endpoint.clone())
                .unwrap_or_else(|| PAGERDUTY_ENDPOINT.to_string());
            (endpoint, body, "application/json")
        }
    };
    let mut last = String::new();
    for attempt in 0..=RETRY_DELAYS.len() {
        let answer = http
            .post(&url)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(body.to_string())
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {
                ctx.metrics().notification(channel.as_str(), "delivered");
                return Outcome::Delivered;
            }
            Ok(r) => last = format!("answered {}", r.status()),
            Err(e) => last = e.without_url().to_string(),
        }
        match RETRY_DELAYS.get(attempt) {
            Some(delay) => {
                ctx.metrics().notification(channel.as_str(), "retried");
                tokio::time::sleep(*delay).await;
            }
            None => break,
        }
    }
    ctx.metrics().notification(channel.as_str(), "failed");
    Outcome::Failed(format!(
        "{} attempts failed, the last one: {last}",
        RETRY_DELAYS.len() + 1
    ))
}

/// The Notifier's status after a check or a transition's outcome. Pure.
pub fn after(
    before: &NotifierStatus,
    channel: Channel,
    transition: Option<&Transition>,
    outcome: Option<&Outcome>,
    generation: Option<i64>,
    now: Timestamp,
) -> NotifierStatus {
    let mut status = before.clone();
    status.channel = Some(channel.as_str().to_string());
    if let (Some(t), Some(outcome)) = (transition, outcome) {
        match outcome {
            Outcome::Delivered => {
                status.delivered += 1;
                status.last_delivered_at = Some(Time(now));
            }
            Outcome::Failed(_) => status.failed += 1,
            Outcome::NotForChannel => {}
        }
        status.sent.push(SentRecord {
            key: t.key.clone(),
            what: t.what(),
            at: Time(now),
            delivered: !matches!(outcome, Outcome::Failed(_)),
        });
        let excess = status.sent.len().saturating_sub(transition::SENT_KEPT);
        status.sent.drain(..excess);
    }
    let (ready, reason, message) = match outcome {
        Some(Outcome::Failed(why)) => (false, "DeliveryFailed", why.clone()),
        Some(Outcome::Delivered) => (true, "Delivered", "the last message was delivered".into()),
        _ => (
            true,
            "SecretReadable",
            "the channel's Secret is readable".into(),
        ),
    };
    crate::conditions::set(
        &mut status.conditions,
        "Ready",
        ready,
        reason,
        message,
        generation,
        now,
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::notifier::{NotificationEvent, WatchedKind};

    fn t(key: &str) -> Transition {
        Transition {
            key: key.into(),
            event: NotificationEvent::Promoted,
            kind: WatchedKind::Rollout,
            namespace: "shop".into(),
            name: "checkout".into(),
            reason: "Promoted".into(),
            message: "m".into(),
            warning: false,
            time: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    #[test]
    fn the_status_counts_outcomes_and_keeps_the_last_sent() {
        let now = Timestamp::from_second(1_700_000_100).unwrap();
        let mut status = NotifierStatus::default();
        for i in 0..60 {
            status = after(
                &status,
                Channel::Slack,
                Some(&t(&format!("u{i}/1"))),
                Some(&Outcome::Delivered),
                Some(1),
                now,
            );
        }
        assert_eq!(status.delivered, 60);
        assert_eq!(status.sent.len(), transition::SENT_KEPT);
        assert_eq!(status.sent.last().map(|s| s.key.as_str()), Some("u59/1"));
        let failed = after(
            &status,
            Channel::Slack,
            Some(&t("x/1")),
            Some(&Outcome::Failed("answered 500".into())),
            Some(1),
            now,
        );
        assert_eq!((failed.delivered, failed.failed), (60, 1));
        assert!(!failed.sent.last().unwrap().delivered);
        assert_eq!(
            crate::conditions::message(&failed.conditions, "Ready"),
            Some("answered 500")
        );
        let checked = after(
            &NotifierStatus::default(),
            Channel::Teams,
            None,
            None,
            Some(1),
            now,
        );
        assert_eq!(checked.channel.as_deref(), Some("Teams"));
        assert!(checked.sent.is_empty());
    }
}
