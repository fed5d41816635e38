//! Notifications, end to end: the operator binary (a real process, so its log can be read and
//! it can be killed) sends a canary's transitions to a receiver on 127.0.0.1 that plays Slack,
//! Microsoft Teams, PagerDuty and a CloudEvents sink. `make test` runs these with `--ignored`.

#[path = "chaos/process.rs"]
#[allow(dead_code)]
mod process;
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use sluice::api::notifier::{Notifier, NotifierStatus};
use sluice::api::rollout::RolloutPhase;
use support::receiver::{Receiver, TOKEN, notifier, secret_ref};
use support::*;

/// Slack headers, Teams card titles, PagerDuty actions, CloudEvent types: what each channel
/// received, in order.
fn slack_titles(r: &Receiver) -> Vec<String> {
    r.of("slack")
        .iter()
        .map(|m| {
            m.body["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn teams_titles(r: &Receiver) -> Vec<String> {
    r.of("teams")
        .iter()
        .map(|m| {
            m.body["attachments"][0]["content"]["body"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn pagerduty_actions(r: &Receiver) -> Vec<String> {
    r.of("pagerduty")
        .iter()
        .map(|m| {
            m.body["event_action"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn cloudevent_types(r: &Receiver) -> Vec<String> {
    r.of("events")
        .iter()
        .map(|m| m.body["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The CloudEvents 1.0 JSON format's rules for the attributes Sluice sets.
fn cloudevent_problems(event: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for required in ["specversion", "id", "source", "type"] {
        if event[required].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{required} missing or empty"));
        }
    }
    if event["specversion"] != "1.0" {
        problems.push("specversion is not 1.0".into());
    }
    if event["time"]
        .as_str()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .is_none()
    {
        problems.push("time is not RFC 3339".into());
    }
    if event["datacontenttype"] != "application/json" || !event["data"].is_object() {
        problems.push("data is not JSON".into());
    }
    let known = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "data",
    ];
    for key in event.as_object().into_iter().flat_map(|o| o.keys()) {
        // Extension attributes: lower-case letters and digits only.
        if !known.contains(&key.as_str())
            && !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            problems.push(format!("attribute name {key}"));
        }
    }
    problems
}

/// Waits up to 60 s for `check`; a timeout says what each channel had received by then, so a
/// short channel is named in the failure.
async fn wait_messages(receiver: &Receiver, what: &str, check: impl Fn() -> bool) {
    wait_for_seen(what, Duration::from_secs(60), || async {
        if check() {
            return Ok(());
        }
        Err(format!(
            "slack {:?}, teams {:?}, pagerduty {:?}, events {:?}",
            slack_titles(receiver),
            teams_titles(receiver),
            pagerduty_actions(receiver),
            cloudevent_types(receiver),
        ))
    })
    .await;
}

/// Waits up to 30 s for `check` to hold for the status of every Notifier.
async fn every_notifier(
    notifiers: &Api<Notifier>,
    what: &str,
    check: impl Fn(&NotifierStatus) -> bool,
) {
    wait_for(
        &format!("every Notifier: {what}"),
        Duration::from_secs(30),
        || async {
            let all = notifiers.list(&ListParams::default()).await.ok()?;
            all.items
                .iter()
                .all(|n| n.status.as_ref().is_some_and(&check))
                .then_some(())
        },
    )
    .await;
}

/// A canary promoted and a canary aborted by a person reach all four channels, each message
/// exactly once and in order, with the operator killed and restarted right after the
/// promotion was delivered and recorded; the token is in no log line, Event or status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: make test"]
async fn a_promotion_and_an_abort_reach_every_channel_once_in_order_across_a_restart() {
    let ns = TestNamespace::new("notify").await;
    let leases: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ns.client.clone());
    let _ = leases
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": process::LEASE_NAMESPACE}}))
                .unwrap(),
        )
        .await;
    let (receiver, address) = Receiver::start().await;
    notifier(
        &ns,
        "slack",
        &format!("{address}/slack/{TOKEN}"),
        json!({"slack": {"urlSecretRef": secret_ref("slack")},
               "events": ["ReleaseStarted", "Promoted", "Aborted"]}),
    )
    .await;
    notifier(
        &ns,
        "teams",
        &format!("{address}/teams/{TOKEN}"),
        json!({"teams": {"urlSecretRef": secret_ref("teams")}, "kinds": ["Rollout"]}),
    )
    .await;
    notifier(
        &ns,
        "pagerduty",
        TOKEN,
        json!({"pagerDuty": {"routingKeySecretRef": secret_ref("pagerduty"),
                             "endpoint": format!("{address}/pagerduty/enqueue")}}),
    )
    .await;
    notifier(
        &ns,
        "events",
        &format!("{address}/events/{TOKEN}"),
        json!({"webhook": {"urlSecretRef": secret_ref("events")}}),
    )
    .await;
    let mut operator = process::Operator::new(&ns.name, "notify", &prometheus_url(), 15);
    operator.start();
    routing(&ns).await;
    let (api, _) = healthy_rollout(&ns, json!([{"setWeight": 50}, {"pause": {}}])).await;
    let notifiers: Api<Notifier> = Api::namespaced(ns.client.clone(), &ns.name);
    every_notifier(&notifiers, "checked", |s| s.channel.is_some()).await;

    // A release, promoted by a person.
    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    plugin(&["promote", &format!("{}/web", ns.name)]);
    healthy(&api).await;
    wait_messages(&receiver, "the promotion everywhere", || {
        slack_titles(&receiver).len() == 2
            && pagerduty_actions(&receiver) == ["resolve"]
            && cloudevent_types(&receiver).contains(&"dev.cdevents.service.deployed.0.2.0".into())
    })
    .await;
    // Each delivery is recorded just after it is made (a kill in between sends it again: at
    // least once). Killed right after the records: the restarted operator sees every Event
    // again and sends none twice.
    every_notifier(&notifiers, "the promotion recorded", |s| {
        s.sent.iter().any(|r| r.what.starts_with("Promoted"))
    })
    .await;
    operator.kill();
    let before_restart = receiver.received.lock().unwrap().len();
    operator.start();

    // A release, aborted by a person.
    set_template(&api, "web:3", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    plugin(&["abort", &format!("{}/web", ns.name)]);
    wait_messages(&receiver, "the abort everywhere", || {
        slack_titles(&receiver).len() == 4 && pagerduty_actions(&receiver).len() == 2
    })
    .await;
    // Anything still on its way arrives now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let rollout = format!("Rollout {}/web", ns.name);
    assert_eq!(
        slack_titles(&receiver),
        [
            format!("Release started: {rollout}"),
            format!("Promoted: {rollout}"),
            format!("Release started: {rollout}"),
            format!("Aborted: {rollout}"),
        ]
    );
    assert_eq!(pagerduty_actions(&receiver), ["resolve", "trigger"]);
    let trigger = &receiver.of("pagerduty")[1].body;
    assert_eq!(trigger["routing_key"], TOKEN);
    assert_eq!(
        trigger["dedup_key"],
        format!("sluice/Rollout/{}/web", ns.name)
    );
    // Teams (every Rollout transition): both releases' steps, in order.
    let teams = teams_titles(&receiver);
    let expected = [
        "Release started",
        "Step reached",
        "Paused, waiting for a person",
        "Step reached",
        "Promoted",
        "Release started",
        "Step reached",
        "Paused, waiting for a person",
        "Aborted",
    ];
    let heads: Vec<&str> = teams
        .iter()
        .map(|t| t.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(heads, expected, "{teams:?}");
    // CloudEvents: each valid, each sent once (ids unique across the restart).
    let cloudevents = receiver.of("events");
    let mut ids = Vec::new();
    for e in &cloudevents {
        assert!(
            e.content_type.starts_with("application/cloudevents+json"),
            "{}",
            e.content_type
        );
        let problems = cloudevent_problems(&e.body);
        assert!(problems.is_empty(), "{problems:?} in {}", e.body);
        ids.push(e.body["id"].as_str().unwrap_or_default().to_string());
    }
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a CloudEvent sent twice: {ids:?}");
    let types = cloudevent_types(&receiver);
    assert!(
        types.contains(&"dev.cdevents.service.rolledback.0.2.0".into())
            && types.contains(&"dev.sluice.rollout.releasestarted.v1".into()),
        "{types:?}"
    );
    let aborted = cloudevents
        .iter()
        .find(|e| e.body["type"] == "dev.cdevents.service.rolledback.0.2.0")
        .unwrap();
    assert_eq!(aborted.body["data"]["sluice"]["reason"], "AbortedByUser");
    assert!(before_restart > 0);

    // The audit trail, newest first: the abort (by the user the apiserver knows), the
    // promotion, the releases.
    let trail = plugin(&["history", &format!("rollout/{}/web", ns.name)]);
    let actions: Vec<&str> = trail
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let started: Vec<usize> = (0..actions.len())
        .filter(|i| actions[*i] == "ReleaseStarted")
        .collect();
    let promoted = actions.iter().position(|a| *a == "Promoted");
    assert!(
        actions.first() == Some(&"AbortedByUser")
            && actions.last() == Some(&"Deployed")
            && started.len() == 2
            && promoted.is_some_and(|p| started[0] < p && p < started[1]),
        "{trail}"
    );
    let abort_line = trail.lines().find(|l| l.contains("AbortedByUser")).unwrap();
    assert!(
        abort_line.contains("a person") && !abort_line.contains("aborted by a user"),
        "the abort names who asked: {abort_line}"
    );

    // The token: nowhere in the operator's log, the Events, or the Notifiers' status.
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(!log.is_empty());
    assert!(!log.contains(TOKEN), "the token is in the operator log");
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let all = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap()).unwrap();
    assert!(!all.contains(TOKEN), "the token is in an Event");
    let statuses =
        serde_json::to_string(&notifiers.list(&ListParams::default()).await.unwrap()).unwrap();
    assert!(!statuses.contains(TOKEN), "the token is in a Notifier");
    let slack = notifiers.get("slack").await.unwrap().status.unwrap();
    assert_eq!((slack.delivered, slack.failed), (4, 0));

    // Real messages for docs/notifications.md: SLUICE_NOTIFY_EXAMPLES=FILE writes them.
    if let Ok(file) = std::env::var("SLUICE_NOTIFY_EXAMPLES") {
        let pick = |channel: &str, index: usize| receiver.of(channel)[index].body.clone();
        let examples = json!({
            "slack": pick("slack", 3), "teams": pick("teams", 8),
            "pagerduty_trigger": pick("pagerduty", 1), "pagerduty_resolve": pick("pagerduty", 0),
            "cloudevent_deployed": cloudevents.iter().find(|e| e.body["type"] == "dev.cdevents.service.deployed.0.2.0").map(|e| e.body.clone()),
            "cloudevent_started": cloudevents.iter().find(|e| e.body["type"] == "dev.sluice.rollout.releasestarted.v1").map(|e| e.body.clone()),
        });
        std::fs::write(file, serde_json::to_string_pretty(&examples).unwrap()).unwrap();
    }

    // How long from a transition to its delivery, from the operator's own log.
    let mut delays: Vec<f64> = operator
        .log_lines("\"notification\"")
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| l["seconds_since_transition"].as_f64())
        .collect();
    delays.sort_by(f64::total_cmp);
    if let (Some(first), Some(last)) = (delays.first(), delays.last()) {
        println!(
            "MEASURE notification delay: {} deliveries, min {:.0} ms, median {:.0} ms, max {:.0} ms",
            delays.len(),
            first * 1000.0,
            delays[delays.len() / 2] * 1000.0,
            last * 1000.0
        );
    }
    drop(operator);
    ns.delete().await;
}

/// A receiver that fails: a few 500s are retried and the message arrives; one that keeps
/// failing costs one Warning Event and a `failed` count, and the release it reports on goes on
/// unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: make test"]
async fn a_failing_receiver_is_retried_then_given_up_with_one_warning_and_the_release_goes_on() {
    let ns = TestNamespace::new("notify-fail").await;
    let (receiver, address) = Receiver::start().await;
    notifier(
        &ns,
        "hook",
        &format!("{address}/events/{TOKEN}"),
        json!({"webhook": {"urlSecretRef": secret_ref("hook")}, "events": ["ReleaseStarted", "Promoted"]}),
    )
    .await;
    let _controllers = start_controllers(&ns.name, prometheus_url()).await;
    routing(&ns).await;
    let (api, _) = healthy_rollout(&ns, json!([{"setWeight": 50}, {"pause": {}}])).await;
    // Two failures, then success: delivered on the third attempt (after 1 s and 2 s).
    receiver.fail(2);
    set_template(&api, "web:2", json!({})).await;
    wait_messages(&receiver, "ReleaseStarted after two retries", || {
        cloudevent_types(&receiver).len() == 1
    })
    .await;
    // Then the receiver fails for good: the promotion is given up on after five attempts.
    at_step(&api, 1, RolloutPhase::Paused).await;
    receiver.fail(u32::MAX);
    let started = Instant::now();
    plugin(&["promote", &format!("{}/web", ns.name)]);
    healthy(&api).await;
    let release_took = started.elapsed();
    let notifiers: Api<Notifier> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        "the promotion given up",
        Duration::from_secs(60),
        || async {
            let s = notifiers.get("hook").await.ok()?.status?;
            (s.failed == 1).then_some(s)
        },
    )
    .await;
    let status = notifiers.get("hook").await.unwrap().status.unwrap();
    assert_eq!(status.delivered, 1);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("5 attempts failed"),
        "{}",
        ready.message
    );
    // The Warning Event, once the apiserver lists it.
    expect_events(&ns, &["NotificationFailed"]).await;
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let warnings: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("NotificationFailed"))
        .filter_map(|e| e.note)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(!warnings[0].contains(TOKEN) && !warnings[0].contains(&address));
    // The release did not wait for the channel (retries take 15 s).
    assert!(release_took < Duration::from_secs(12), "{release_took:?}");
    println!(
        "MEASURE notification retries: delivered after 2 failures; given up after 5 attempts; release took {release_took:?}"
    );
    ns.delete().await;
}

/// An ErrorBudget that crosses into Exhausted and back: PagerDuty opens an alert and resolves
/// it, the CloudEvents sink gets an incident (CDEvents `incident.detected`), Slack both phase
/// changes, each once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: make test"]
async fn a_budget_exhausted_and_recovered_opens_and_resolves_an_alert() {
    let ns = TestNamespace::new("notify-budget").await;
    let (receiver, address) = Receiver::start().await;
    notifier(
        &ns,
        "pagerduty",
        TOKEN,
        json!({"pagerDuty": {"routingKeySecretRef": secret_ref("pagerduty"),
                             "endpoint": format!("{address}/pagerduty/enqueue")},
               "kinds": ["ErrorBudget"]}),
    )
    .await;
    notifier(
        &ns,
        "events",
        &format!("{address}/events/{TOKEN}"),
        json!({"webhook": {"urlSecretRef": secret_ref("events")}, "kinds": ["ErrorBudget"]}),
    )
    .await;
    notifier(
        &ns,
        "slack",
        &format!("{address}/slack/{TOKEN}"),
        json!({"slack": {"urlSecretRef": secret_ref("slack")}, "events": ["BudgetPhaseChanged"]}),
    )
    .await;
    let _controllers = start_controllers(&ns.name, prometheus_url()).await;
    // A 10% budget (objective 90) with a constant error ratio the test sets in the spec.
    let slo = |errors: &str| {
        budget(
            &ns.name,
            "avail",
            errors,
            "vector(1)",
            json!({"targets": []}),
        )
    };
    create(&ns, &slo("vector(0)")).await.unwrap();
    let budgets: Api<sluice::api::ErrorBudget> = Api::namespaced(ns.client.clone(), &ns.name);
    let phase = |want: &'static str| {
        let budgets = budgets.clone();
        async move {
            wait_for(
                &format!("budget {want}"),
                Duration::from_secs(60),
                || async {
                    let s = budgets.get("avail").await.ok()?.status?;
                    (format!("{:?}", s.phase?) == want).then_some(())
                },
            )
            .await
        }
    };
    phase("Healthy").await;
    let patch = |errors: &'static str| {
        let budgets = budgets.clone();
        async move {
            budgets
                .patch(
                    "avail",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(
                        json!({"spec": {"indicator": {"ratio": {"errors": errors}}}}),
                    ),
                )
                .await
                .unwrap();
        }
    };
    // 9.8% errors against a 10% budget: 98% consumed.
    patch("vector(0.098)").await;
    phase("Exhausted").await;
    // The first evaluation (Healthy) resolves nothing open yet; then the alert.
    wait_messages(&receiver, "the alert", || {
        pagerduty_actions(&receiver) == ["resolve", "trigger"]
    })
    .await;
    patch("vector(0)").await;
    phase("Healthy").await;
    wait_messages(&receiver, "the resolve", || {
        pagerduty_actions(&receiver).len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        pagerduty_actions(&receiver),
        ["resolve", "trigger", "resolve"]
    );
    let trigger = &receiver.of("pagerduty")[1].body;
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(
        trigger["dedup_key"],
        format!("sluice/ErrorBudget/{}/avail", ns.name)
    );
    let types = cloudevent_types(&receiver);
    assert_eq!(
        types,
        [
            "dev.sluice.errorbudget.budgetphasechanged.v1",
            "dev.cdevents.incident.detected.0.2.0",
            "dev.sluice.errorbudget.budgetphasechanged.v1",
        ],
        "Healthy (first evaluation), Exhausted, Healthy"
    );
    for e in receiver.of("events") {
        let problems = cloudevent_problems(&e.body);
        assert!(problems.is_empty(), "{problems:?}");
    }
    let slack: Vec<String> = receiver
        .of("slack")
        .iter()
        .map(|m| {
            m.body["blocks"][1]["text"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(slack.len(), 3, "{slack:?}");
    assert!(
        slack[1].starts_with("Exhausted:") && slack[2].starts_with("Healthy:"),
        "{slack:?}"
    );
    ns.delete().await;
}
