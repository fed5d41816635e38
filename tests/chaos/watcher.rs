//! An independent judge: watches what the operator writes (VirtualServices, HTTPRoutes,
//! DestinationRules, Services, ReplicaSets, Rollouts) as plain JSON, with none of the
//! operator's code, and checks the invariants on every change:
//!
//! - every route's weights are in 0..=100 and sum to 100;
//! - no weight goes to a revision without available pods (confirmed by fresh reads, so a
//!   watch that lags behind another is not mistaken for a violation);
//! - a Rollout's observedGeneration and, within one release, its step never go backwards;
//! - it records the canary weight of each route, so a scenario can check no step was skipped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::Value;

const HASH_LABEL: &str = "sluice.dev/pod-template-hash";

/// The kinds the judge reads.
fn kinds() -> Vec<(&'static str, ApiResource)> {
    let gvk = |g: &str, v: &str, k: &str| ApiResource::from_gvk(&GroupVersionKind::gvk(g, v, k));
    vec![
        ("ReplicaSet", gvk("apps", "v1", "ReplicaSet")),
        ("Service", gvk("", "v1", "Service")),
        (
            "DestinationRule",
            gvk("networking.istio.io", "v1", "DestinationRule"),
        ),
        (
            "VirtualService",
            gvk("networking.istio.io", "v1", "VirtualService"),
        ),
        (
            "HTTPRoute",
            gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        ),
        ("Rollout", gvk("sluice.dev", "v1alpha1", "Rollout")),
    ]
}

/// Objects by (kind, name), as JSON.
type Objects = BTreeMap<(String, String), Value>;

#[derive(Default)]
struct Judgement {
    objects: Objects,
    violations: Vec<String>,
    /// Canary weight per route, consecutive repeats removed.
    canary_weights: BTreeMap<String, Vec<i64>>,
    /// Last (generation, canary revision, step) seen per Rollout.
    progress: BTreeMap<String, (i64, Option<String>, i64)>,
    changes: u64,
}

pub struct Watcher {
    judgement: Arc<Mutex<Judgement>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching `namespace`; returns once every watch has listed.
    pub async fn start(client: Client, namespace: &str) -> Self {
        let judgement = Arc::new(Mutex::new(Judgement::default()));
        let (changed_tx, mut changed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut tasks = Vec::new();
        let mut listed = Vec::new();
        for (kind, resource) in kinds() {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource);
            let sink = judgement.clone();
            let changed = changed_tx.clone();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            listed.push(ready_rx);
            tasks.push(tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let stream = watcher(api, watcher::Config::default());
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let Ok(event) = event else {
                        // The apiserver went away: the watcher retries; so do we.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let mut j = sink.lock().unwrap();
                    match event {
                        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                            j.objects
                                .insert((kind.to_string(), o.name_any()), object_json(&o));
                            j.changes += 1;
                            drop(j);
                            let _ = changed.send(kind.to_string());
                        }
                        watcher::Event::Delete(o) => {
                            j.objects.remove(&(kind.to_string(), o.name_any()));
                            drop(j);
                            let _ = changed.send(kind.to_string());
                        }
                        watcher::Event::InitDone => {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(());
                            }
                        }
                        watcher::Event::Init => {}
                    }
                }
            }));
        }
        for ready in listed {
            let _ = ready.await;
        }
        // The judge proper: each change is checked against the whole view.
        let sink = judgement.clone();
        let namespace = namespace.to_string();
        tasks.push(tokio::spawn(async move {
            while let Some(kind) = changed_rx.recv().await {
                // The guard is a temporary of this statement: released before any await.
                let suspects = judge(&mut sink.lock().unwrap(), &kind);
                for (route, hash, weight) in suspects {
                    if let Some(violation) =
                        confirm_unavailable(&client, &namespace, &route, &hash, weight).await
                    {
                        sink.lock().unwrap().violations.push(violation);
                    }
                }
            }
        }));
        Self { judgement, tasks }
    }

    pub fn violations(&self) -> Vec<String> {
        self.judgement.lock().unwrap().violations.clone()
    }

    /// The canary weights the route `key` took (e.g. `VirtualService/web/primary`).
    pub fn canary_weights(&self, key: &str) -> Vec<i64> {
        self.judgement
            .lock()
            .unwrap()
            .canary_weights
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether the last canary weight this watcher recorded for the route `key` is `weight`.
    pub fn canary_at(&self, key: &str, weight: i64) -> bool {
        self.canary_weights(key).last() == Some(&weight)
    }

    /// Waits until the route `key` is back at canary weight 0 *as this watcher recorded it*:
    /// a GET can see the last write before the watch delivers it, and a sequence read then
    /// misses its final 0. Panics after `timeout`.
    pub async fn canary_back_at_zero(&self, key: &str, timeout: Duration) {
        let start = std::time::Instant::now();
        while !self.canary_at(key, 0) {
            assert!(
                start.elapsed() < timeout,
                "the watcher never saw {key} back at 0: {:?}",
                self.canary_weights(key)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many object changes it has judged.
    pub fn changes(&self) -> u64 {
        self.judgement.lock().unwrap().changes
    }

    /// Forgets the weights recorded so far (before the release under test starts).
    pub fn reset_weights(&self) {
        self.judgement.lock().unwrap().canary_weights.clear();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn object_json(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// Checks the view after a change of `kind`; returns routes that seem to send traffic to a
/// revision without available pods (to be confirmed by fresh reads).
fn judge(j: &mut Judgement, kind: &str) -> Vec<(String, String, i64)> {
    for (key, weights) in route_weights(&j.objects) {
        let total: i64 = weights.iter().map(|(_, w)| *w).sum();
        if weights.iter().any(|(_, w)| !(0..=100).contains(w)) || total != 100 {
            let v = format!("{key}: weights {weights:?} (sum {total})");
            if !j.violations.contains(&v) {
                j.violations.push(v);
            }
        }
        if let Some(canary) = weights
            .iter()
            .find(|(dest, _)| dest.ends_with("canary"))
            .map(|(_, w)| *w)
        {
            let seen = j.canary_weights.entry(key.clone()).or_default();
            if seen.last() != Some(&canary) {
                seen.push(canary);
            }
        }
    }
    if kind == "Rollout" {
        let rollouts: Vec<(String, Value)> = j
            .objects
            .iter()
            .filter(|((k, _), _)| k == "Rollout")
            .map(|((_, n), o)| (n.clone(), o.clone()))
            .collect();
        for (name, rollout) in rollouts {
            let status = &rollout["status"];
            let generation = status["observedGeneration"].as_i64().unwrap_or(0);
            let canary = status["canaryRevision"].as_str().map(String::from);
            let step = status["currentStepIndex"].as_i64().unwrap_or(0);
            let aborted = status["abortedAt"].is_string();
            if let Some((last_generation, last_canary, last_step)) = j.progress.get(&name) {
                if generation < *last_generation {
                    j.violations.push(format!(
                        "Rollout {name}: observedGeneration went back from {last_generation} to {generation}"
                    ));
                }
                if canary.is_some() && canary == *last_canary && step < *last_step && !aborted {
                    j.violations.push(format!(
                        "Rollout {name}: step went back from {last_step} to {step} in release {canary:?}"
                    ));
                }
            }
            j.progress.insert(name, (generation, canary, step));
        }
    }
    routed_revisions(&j.objects)
        .into_iter()
        .filter(|(_, hash, weight)| *weight > 0 && !available(&j.objects, hash))
        .collect()
}

/// Every route's weights by destination: `VirtualService/<name>/<route>` and
/// `HTTPRoute/<name>/<rule>`.
fn route_weights(objects: &Objects) -> Vec<(String, Vec<(String, i64)>)> {
    let mut out = Vec::new();
    for ((kind, name), o) in objects {
        match kind.as_str() {
            "VirtualService" => {
                for (i, http) in array(&o["spec"]["http"]).iter().enumerate() {
                    let routes = array(&http["route"]);
                    if routes.len() < 2 {
                        continue;
                    }
                    let route_name = http["name"].as_str().map_or(i.to_string(), String::from);
                    let weights = routes
                        .iter()
                        .map(|r| {
                            let d = &r["destination"];
                            let dest = match d["subset"].as_str() {
                                Some(subset) => subset.to_string(),
                                None => d["host"].as_str().unwrap_or_default().to_string(),
                            };
                            (dest, r["weight"].as_i64().unwrap_or(0))
                        })
                        .collect();
                    out.push((format!("VirtualService/{name}/{route_name}"), weights));
                }
            }
            "HTTPRoute" => {
                for (i, rule) in array(&o["spec"]["rules"]).iter().enumerate() {
                    let backends = array(&rule["backendRefs"]);
                    if backends.len() < 2 {
                        continue;
                    }
                    let rule_name = rule["name"].as_str().map_or(i.to_string(), String::from);
                    let weights = backends
                        .iter()
                        .map(|b| {
                            (
                                b["name"].as_str().unwrap_or_default().to_string(),
                                b["weight"].as_i64().unwrap_or(1),
                            )
                        })
                        .collect();
                    out.push((format!("HTTPRoute/{name}/{rule_name}"), weights));
                }
            }
            _ => {}
        }
    }
    out
}

fn array(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn short_host(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

fn service_hash(objects: &Objects, service: &str) -> Option<String> {
    objects
        .get(&("Service".to_string(), service.to_string()))
        .and_then(|s| s["spec"]["selector"][HASH_LABEL].as_str())
        .map(String::from)
}

/// (where, revision, weight) for every destination pinned to a revision: VirtualService
/// subsets (through their DestinationRule) and hosts, HTTPRoute backends, and the active
/// Service of a blue-green Rollout (which takes all traffic). A blue-green preview Service is
/// left out: it points at the new revision as it starts, before its pods are up, and carries
/// no user traffic.
fn routed_revisions(objects: &Objects) -> Vec<(String, String, i64)> {
    let previews: Vec<String> = objects
        .iter()
        .filter(|((k, _), _)| k == "Rollout")
        .filter_map(|(_, o)| o["spec"]["strategy"]["blueGreen"]["previewService"].as_str())
        .map(String::from)
        .collect();
    let user_traffic = |service: &str| !previews.iter().any(|p| p == service);
    let mut out = Vec::new();
    for ((kind, name), o) in objects {
        match kind.as_str() {
            "VirtualService" => {
                for http in array(&o["spec"]["http"]) {
                    let routes = array(&http["route"]);
                    let lone = routes.len() == 1;
                    for r in routes {
                        let d = &r["destination"];
                        let host = short_host(d["host"].as_str().unwrap_or_default());
                        let weight = r["weight"].as_i64().unwrap_or(if lone { 100 } else { 0 });
                        let hash = match d["subset"].as_str() {
                            Some(subset) => subset_hash(objects, host, subset),
                            None => service_hash(objects, host),
                        };
                        if let Some(hash) = hash.filter(|_| user_traffic(host)) {
                            out.push((format!("VirtualService/{name} -> {host}"), hash, weight));
                        }
                    }
                }
            }
            "HTTPRoute" => {
                for rule in array(&o["spec"]["rules"]) {
                    for b in array(&rule["backendRefs"]) {
                        let service = b["name"].as_str().unwrap_or_default();
                        if let Some(hash) =
                            service_hash(objects, service).filter(|_| user_traffic(service))
                        {
                            let weight = b["weight"].as_i64().unwrap_or(1);
                            out.push((format!("HTTPRoute/{name} -> {service}"), hash, weight));
                        }
                    }
                }
            }
            "Rollout" => {
                if let Some(active) = o["spec"]["strategy"]["blueGreen"]["activeService"].as_str()
                    && let Some(hash) = service_hash(objects, active)
                {
                    out.push((format!("Service/{active} (active)"), hash, 100));
                }
            }
            _ => {}
        }
    }
    out
}

fn subset_hash(objects: &Objects, host: &str, subset: &str) -> Option<String> {
    objects
        .iter()
        .filter(|((k, _), o)| {
            k == "DestinationRule" && short_host(o["spec"]["host"].as_str().unwrap_or("")) == host
        })
        .flat_map(|(_, o)| array(&o["spec"]["subsets"]))
        .find(|s| s["name"].as_str() == Some(subset))
        .and_then(|s| s["labels"][HASH_LABEL].as_str().map(String::from))
}

fn available(objects: &Objects, hash: &str) -> bool {
    objects.iter().any(|((k, _), rs)| {
        k == "ReplicaSet"
            && rs["metadata"]["labels"][HASH_LABEL].as_str() == Some(hash)
            && rs["status"]["availableReplicas"].as_i64().unwrap_or(0) > 0
    })
}

/// Reads everything fresh from the apiserver, ReplicaSets first and last: a violation only
/// when the revision had no available pods both before and after the routes were read, and
/// the routes still sent it traffic.
async fn confirm_unavailable(
    client: &Client,
    namespace: &str,
    route: &str,
    hash: &str,
    weight: i64,
) -> Option<String> {
    let list = |kind: &'static str, resource: ApiResource| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        async move {
            api.list(&ListParams::default()).await.ok().map(|l| {
                l.items
                    .into_iter()
                    .map(|o| ((kind.to_string(), o.name_any()), object_json(&o)))
                    .collect::<Vec<_>>()
            })
        }
    };
    let all = kinds();
    let (rs_kind, rs_resource) = all[0].clone();
    let before: Objects = list(rs_kind, rs_resource.clone())
        .await?
        .into_iter()
        .collect();
    if available(&before, hash) {
        return None;
    }
    let mut view = Objects::new();
    for (kind, resource) in all.iter().skip(1) {
        view.extend(list(kind, resource.clone()).await?);
    }
    let after: Objects = list(rs_kind, rs_resource).await?.into_iter().collect();
    if available(&after, hash) {
        return None;
    }
    // With no revision available at all (the first one starting), there was nothing better
    // to route to.
    let any_available = after
        .values()
        .any(|rs| rs["status"]["availableReplicas"].as_i64().unwrap_or(0) > 0);
    if !any_available {
        return None;
    }
    let still_routed = routed_revisions(&view)
        .into_iter()
        .any(|(_, h, w)| h == hash && w > 0);
    still_routed.then(|| {
        format!("{route}: weight {weight} to revision {hash}, which has no available pods")
    })
}

/// Transition Events that must appear at most once per release: a duplicate means a
/// decision was carried out twice (for example once before and once after a kill).
const ONCE: &[&str] = &[
    "ReleaseStarted",
    "StepCompleted",
    "Promoted",
    "PromotedFull",
    "AnalysisFailed",
    "AbortedByUser",
    "AbortedByErrorBudget",
    "RolledBackByErrorBudget",
    "StagePromoted",
];

/// Events in `namespace` recorded more than once for the same object, reason and message.
pub async fn duplicate_events(client: &Client, namespace: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    let events = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let mut counts: BTreeMap<(String, String, String), i32> = BTreeMap::new();
    for e in events {
        let reason = e.reason.clone().unwrap_or_default();
        if !ONCE.contains(&reason.as_str()) {
            continue;
        }
        let key = (
            e.involved_object.name.clone().unwrap_or_default(),
            reason,
            e.message.clone().unwrap_or_default(),
        );
        let series = e.series.as_ref().and_then(|s| s.count);
        *counts.entry(key).or_default() += series.or(e.count).unwrap_or(1).max(1);
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|((object, reason, message), n)| format!("{object} {reason} x{n}: {message}"))
        .collect()
}
