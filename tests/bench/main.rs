//! `make bench`: the operator at scale on the local cluster, measured.
//!
//! Creates N Rollouts shaped like production ones (`fixtures.rs`), starts the operator, and
//! measures memory, CPU, apiserver requests and status writes while idle, reconcile latency,
//! a restart with every Rollout present, and 100 (at most N/2) canaries released at once:
//! step due -> weight written, and abort -> all traffic on stable. Writes `bench-N.json`,
//! `bench-N.md` and `steps-N.tsv` (each timed step: Rollout, due, weight seen, in seconds since
//! the epoch) under `SLUICE_BENCH_OUT` (default `target/bench`).
//!
//! Settings: `SLUICE_BENCH_N` (default 100), `SLUICE_BENCH_IDLE_SECONDS` (default 20; `make
//! bench` uses 320 to span the 300 s idle resync), `SLUICE_BENCH_OPERATOR` (the binary; default
//! the test build), `SLUICE_BENCH_KEEP` (leave the objects, to look at them),
//! `SLUICE_BENCH_CLUSTER_PIDS` (the local cluster's pid files, to say where the machine's CPU
//! went in the idle window and the releases). The run asserts what the
//! run must do (every Rollout healthy, every release stepped and aborted), never a timing.

mod audit;
mod fixtures;
mod probe;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::analysis::MeasurementPhase;
use sluice::api::rollout::{Rollout, RolloutPhase};

use fixtures::{ANALYSIS_INTERVAL_SECONDS, DEADLINE_METRIC, Kind, RUN_LABEL, STEP_PAUSE_SECONDS};
use probe::{MachineCpu, Metrics, Operator, fixed_work_cpu_ms, memory_by_process, percentile};

/// Rollouts per namespace, as teams group their services.
const PER_NAMESPACE: usize = 100;
/// Requests in flight while creating objects.
const PARALLEL: usize = 32;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn namespace_of(index: usize) -> String {
    format!("sluice-bench-{:03}", index / PER_NAMESPACE)
}

fn name_of(index: usize) -> String {
    format!("r-{index:05}")
}

fn api_for(client: &Client, object: &Value) -> Api<DynamicObject> {
    let (group, version) = match object["apiVersion"]
        .as_str()
        .unwrap_or("v1")
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), "v1".to_string()),
    };
    let kind = object["kind"].as_str().unwrap_or_default();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, kind));
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// Creates `object`, or leaves it when it exists; returns its uid.
async fn create(client: &Client, object: Value) -> String {
    let api = api_for(client, &object);
    let dynamic: DynamicObject = serde_json::from_value(object).expect("a valid object");
    for attempt in 0.. {
        match api.create(&PostParams::default(), &dynamic).await {
            Ok(created) => return created.uid().unwrap_or_default(),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = api.get(&dynamic.name_any()).await.expect("read it back");
                return existing.uid().unwrap_or_default();
            }
            Err(e) if attempt < 20 => {
                tracing_free_log(&format!("create {}: {e}; again", dynamic.name_any()));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("create {}: {e}", dynamic.name_any()),
        }
    }
    unreachable!()
}

fn tracing_free_log(line: &str) {
    eprintln!("bench: {line}");
}

/// Deletes the run's namespaces one by one (namespaces have no `deletecollection`).
async fn delete_namespaces(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let by_run = ListParams::default().labels(RUN_LABEL);
    for ns in namespaces
        .list(&by_run)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let _ = namespaces
            .delete(&ns.name_any(), &DeleteParams::background())
            .await;
    }
}

/// Deletes what an interrupted run left (no operator runs yet, so its finalizers go by
/// hand) and waits until it is gone.
async fn remove_leftovers(client: &Client) {
    let by_run = ListParams::default().labels(RUN_LABEL);
    let rollouts: Api<Rollout> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let started = Instant::now();
    while namespaces
        .list(&by_run)
        .await
        .is_ok_and(|l| !l.items.is_empty())
    {
        for r in rollouts
            .list(&by_run)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let api: Api<Rollout> =
                Api::namespaced(client.clone(), &r.namespace().unwrap_or_default());
            let clear = json!({"metadata": {"finalizers": null}});
            let _ = api
                .patch(
                    &r.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&clear),
                )
                .await;
        }
        delete_namespaces(client).await;
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the namespaces of an earlier run were not deleted"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The Rollouts of the run that are Healthy, out of those that exist.
async fn healthy_count(client: &Client) -> (usize, usize) {
    let api: Api<Rollout> = Api::all(client.clone());
    let mut healthy = 0;
    let mut total = 0;
    let mut params = ListParams::default().labels(RUN_LABEL).limit(500);
    loop {
        let Ok(page) = api.list(&params).await else {
            return (healthy, total);
        };
        total += page.items.len();
        healthy += page
            .items
            .iter()
            .filter(|r| {
                r.status.as_ref().is_some_and(|s| {
                    s.phase == Some(RolloutPhase::Healthy)
                        && s.observed_generation == r.metadata.generation
                })
            })
            .count();
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return (healthy, total),
        }
    }
}

async fn wait_all_healthy(client: &Client, n: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (healthy, total) = healthy_count(client).await;
        if healthy == n && total == n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "only {healthy} of {n} Rollouts Healthy after {limit:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// What the watches saw, timed on this machine's clock.
#[derive(Default)]
struct Seen {
    /// Canary weight changes per `namespace/name`.
    weights: HashMap<String, Vec<(SystemTime, i64)>>,
    /// When each Rollout's timed pause (step 1) started, by its own status.
    pause_started: HashMap<String, SystemTime>,
    /// When each Rollout's failing measurement was taken (Prometheus's clock, which is this
    /// machine's), from the value of its `deadline` metric.
    failed_at: HashMap<String, SystemTime>,
    /// Lists after the first and watch errors, per watch: a relist skips what happened
    /// in between, so a missed step shows up here.
    relists: BTreeMap<&'static str, usize>,
    watch_errors: BTreeMap<&'static str, usize>,
}

/// Follows `api` for the run's objects, handing each one seen to `seen` (watch errors are
/// retried with backoff, never the end of it); returns once the first list is in.
async fn follow<K>(
    api: Api<K>,
    what: &'static str,
    record: Arc<Mutex<Seen>>,
    mut seen: impl FnMut(K) + Send + 'static,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    use kube::runtime::WatchStreamExt;
    let (listed, mut ready) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default().labels(RUN_LABEL)).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let count = |map: fn(&mut Seen) -> &mut BTreeMap<&'static str, usize>| {
            let mut seen = record.lock().unwrap_or_else(|p| p.into_inner());
            *map(&mut seen).entry(what).or_default() += 1;
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => seen(o),
                Ok(watcher::Event::Init) if *listed.borrow() => count(|s| &mut s.relists),
                Ok(watcher::Event::InitDone) => {
                    listed.send_replace(true);
                }
                Ok(_) => {}
                Err(e) => {
                    count(|s| &mut s.watch_errors);
                    eprintln!("bench: {what} watch error, retrying: {e}");
                }
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r)).await;
}

/// Records what the releases do: each VirtualService's canary weight as it changes, and
/// when each Rollout's timed pause started. Returns once both watches have listed.
async fn watch_releases(client: &Client, seen: Arc<Mutex<Seen>>) {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "networking.istio.io",
        "v1",
        "VirtualService",
    ));
    let sink = seen.clone();
    follow(
        Api::<DynamicObject>::all_with(client.clone(), &resource),
        "VirtualService",
        seen.clone(),
        move |vs| {
            let Some(weight) = vs.data["spec"]["http"][0]["route"][1]["weight"].as_i64() else {
                return;
            };
            let key = format!("{}/{}", vs.namespace().unwrap_or_default(), vs.name_any());
            let mut seen = sink.lock().unwrap_or_else(|p| p.into_inner());
            let list = seen.weights.entry(key).or_default();
            if list.last().map(|(_, w)| *w) != Some(weight) {
                list.push((SystemTime::now(), weight));
            }
        },
    )
    .await;
    let record = seen.clone();
    follow(
        Api::<Rollout>::all(client.clone()),
        "Rollout",
        record,
        move |r| {
            let Some(status) = r.status else { return };
            let key = format!(
                "{}/{}",
                r.metadata.namespace.unwrap_or_default(),
                r.metadata.name.unwrap_or_default()
            );
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            if status.current_step_index == Some(1)
                && status.canary_revision.is_some()
                && let Some(at) = status.current_step_started_at
            {
                let at = SystemTime::UNIX_EPOCH
                    + Duration::from_micros(at.0.as_microsecond().max(0) as u64);
                seen.pause_started.entry(key.clone()).or_insert(at);
            }
            let failed = status
                .analysis_runs
                .iter()
                .flat_map(|run| &run.metrics)
                .filter(|m| m.name == DEADLINE_METRIC)
                .flat_map(|m| &m.measurements)
                .find(|m| m.phase == MeasurementPhase::Failed)
                .and_then(|m| m.value.as_deref()?.parse::<f64>().ok())
                .filter(|secs| secs.is_finite() && *secs > 0.0);
            if let Some(secs) = failed {
                let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs);
                seen.failed_at.entry(key).or_insert(at);
            }
        },
    )
    .await;
}

/// A latency's p50 and p99, in milliseconds, under `keys`.
fn record_latencies(
    report: &mut BTreeMap<&str, Value>,
    keys: [&'static str; 2],
    values: &[Duration],
) {
    report.insert(keys[0], millis(percentile(values, 0.5)));
    report.insert(keys[1], millis(percentile(values, 0.99)));
}

/// The Rollout controller's reconcile p50 and p99 between two scrapes, under `keys` (the
/// upper bound of the histogram bucket; above its last bound, 10.24 s, `null`).
fn record_reconcile_quantiles(
    report: &mut BTreeMap<&str, Value>,
    keys: [&'static str; 2],
    now: &Metrics,
    before: &Metrics,
) {
    for (q, key) in [0.5, 0.99].into_iter().zip(keys) {
        let value = now
            .quantile(
                before,
                "sluice_reconcile_duration_seconds",
                &["controller=\"rollout\""],
                q,
            )
            .filter(|v| v.is_finite());
        report.insert(key, json!(value));
    }
}

/// The operator's lanes to the apiserver (`sluice_kube_request_wait_seconds`), in the order
/// the report lists them.
const LANES: [&str; 5] = ["route", "urgent", "progress", "usual", "record"];

/// How long the operator's requests waited for a place during the releases, p99 by lane
/// (the upper bound of the bucket; past the last bound, 16.384 s, `">16.384"`; `null` for a
/// lane that sent nothing), as `lane: seconds`.
fn record_lane_waits(report: &mut BTreeMap<&str, Value>, now: &Metrics, before: &Metrics) {
    let waits: serde_json::Map<String, Value> = LANES
        .into_iter()
        .map(|lane| {
            let label = format!("lane=\"{lane}\"");
            let p99 =
                match now.quantile(before, "sluice_kube_request_wait_seconds", &[&label], 0.99) {
                    Some(v) if v.is_finite() => json!(v),
                    Some(_) => json!(">16.384"),
                    None => Value::Null,
                };
            (lane.to_string(), p99)
        })
        .collect();
    report.insert("release_lane_wait_p99_seconds", Value::Object(waits));
}

/// Waits until `total` canaries show `weight` (`count_at` counts them), failing after `limit`.
async fn wait_all_at(count_at: &impl Fn(i64) -> usize, weight: i64, total: usize, limit: Duration) {
    let waited = Instant::now();
    while count_at(weight) < total {
        assert!(
            waited.elapsed() < limit,
            "only {} of {total} canaries at {weight}% after {limit:?}",
            count_at(weight)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Releases `image` on every one of `released` at once; `strategy(i)` is merged into the
/// `i`th one's strategy in the same patch.
async fn release_all(
    client: &Client,
    released: &[(String, String)],
    image: &str,
    strategy: impl Fn(usize) -> Value,
) {
    futures::stream::iter(released.iter().cloned().enumerate())
        .map(|(index, (ns, name))| {
            let api: Api<Rollout> = Api::namespaced(client.clone(), &ns);
            // A merge patch replaces the container list: send both, the first at `image`.
            let containers = fixtures::template(&name, image)["spec"]["containers"].clone();
            let patch = json!({"spec": {"template": {"spec": {"containers": containers}},
                                        "strategy": strategy(index)}});
            async move {
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await
        .unwrap_or_else(|e| panic!("release {image} on every canary: {e}"));
}

/// The last round: the released canaries shipped again (`web:3`), each with a metric that
/// fails from one moment on, set late enough (`margin`) for most of them to reach 50% first.
/// Each is timed from when its failing measurement was taken to its VirtualService showing 0%.
/// Returns the latencies, and how many went back without a timing (failed before any traffic
/// moved, so there was nothing to take back).
async fn fail_releases(
    client: &Client,
    seen: &Arc<Mutex<Seen>>,
    released: &[(String, String)],
    margin: Duration,
) -> (Vec<Duration>, usize) {
    let key = |(ns, name): &(String, String)| format!("{ns}/{name}");
    let weights_before: HashMap<String, usize> = {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        released
            .iter()
            .map(|r| (key(r), seen.weights.get(&key(r)).map_or(0, Vec::len)))
            .collect()
    };
    let fail_at = (SystemTime::now() + margin)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    release_all(
        client,
        released,
        "web:3",
        |index| json!({"canary": {"analysis": fixtures::analysis(Some((index, fail_at)))}}),
    )
    .await;
    // Done: the failure is recorded and the VirtualService is at 0%.
    let back = |seen: &Seen, r: &(String, String)| {
        seen.failed_at.contains_key(&key(r))
            && seen
                .weights
                .get(&key(r))
                .is_some_and(|w| w.last().map(|x| x.1) == Some(0))
    };
    let waited = Instant::now();
    let limit = margin + Duration::from_secs(300);
    loop {
        let done = {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            released.iter().filter(|r| back(&seen, r)).count()
        };
        if done == released.len() {
            break;
        }
        assert!(
            waited.elapsed() < limit,
            "only {done} of {} failing canaries back on stable after {limit:?}",
            released.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let mut latencies = Vec::new();
    for r in released {
        let failed = seen.failed_at[&key(r)];
        let since_release = seen.weights[&key(r)]
            .get(weights_before[&key(r)]..)
            .unwrap_or_default();
        // The weight this release went back to 0 from, if it moved at all.
        if let Some((at, _)) = since_release.iter().rev().find(|(_, w)| *w == 0)
            && since_release.iter().any(|(_, w)| *w > 0)
        {
            latencies.push(at.duration_since(failed).unwrap_or(Duration::ZERO));
        }
    }
    let untimed = released.len() - latencies.len();
    (latencies, untimed)
}

/// Prometheus's own count of the instant queries it answered (from its `/metrics`), or NaN
/// when it cannot be read.
async fn prometheus_queries(url: &str) -> f64 {
    let address = url.trim_start_matches("http://").trim_end_matches('/');
    probe::http_get(address, "/metrics")
        .await
        .map_or(f64::NAN, |text| {
            Metrics::parse(&text).sum(
                "prometheus_http_requests_total",
                &["handler=\"/api/v1/query\""],
            )
        })
}

/// Cores by process, most first, as a JSON list of `[process, cores]` (a list keeps the order).
fn cores_json(cores: Vec<(String, f64)>) -> Value {
    Value::Array(
        cores
            .into_iter()
            .map(|(name, c)| json!([name, c]))
            .collect(),
    )
}

/// "kube-apiserver 2310 (4087), etcd ..." from `idle_end_memory_mib`: MiB now (at the highest).
fn memory_text(memory: &Value) -> String {
    let text: Vec<String> = memory
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let (name, now, peak) = (entry.get(0)?, entry.get(1)?, entry.get(2)?);
            Some(format!("{} {now} ({peak})", name.as_str()?))
        })
        .collect();
    listed(text)
}

/// The parts joined with commas, or "-" for none.
fn listed(parts: Vec<String>) -> String {
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// "kube-apiserver 1.08, kube-scheduler 0.38, ..." from `cores_json`.
fn cores_text(cores: &Value) -> String {
    let text: Vec<String> = cores
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| Some(format!("{} {}", pair.get(0)?.as_str()?, pair.get(1)?)))
        .collect();
    listed(text)
}

fn millis(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

fn ms_text(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |ms| format!("{ms} ms"))
}

#[tokio::test]
#[ignore = "needs the local cluster: make bench"]
async fn scale() {
    let n = setting("SLUICE_BENCH_N", 100) as usize;
    let idle = Duration::from_secs(setting("SLUICE_BENCH_IDLE_SECONDS", 20));
    let releases = (n / 2).min(100);
    let out = std::env::var("SLUICE_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../bench"));
    std::fs::create_dir_all(&out).expect("the output directory");
    let binary = std::env::var("SLUICE_BENCH_OPERATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_sluice")));
    let prometheus =
        std::env::var("SLUICE_PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:19090".into());
    let client = Client::try_default().await.expect("a kubeconfig");
    let cluster_pids = std::env::var("SLUICE_BENCH_CLUSTER_PIDS")
        .ok()
        .map(PathBuf::from);
    let machine_cpu = |operator: &Operator| MachineCpu::read(cluster_pids.as_deref(), operator);
    let mut report: BTreeMap<&str, Value> = BTreeMap::new();
    report.insert("rollouts", json!(n));
    report.insert("operator", json!(binary.display().to_string()));
    // The operator inherits the environment: a run with one of its bounds set (0: none) says
    // so in its report.
    for (key, variable) in [
        ("kube_requests_in_flight", "SLUICE_KUBE_REQUESTS_IN_FLIGHT"),
        (
            "max_concurrent_reconciles",
            "SLUICE_MAX_CONCURRENT_RECONCILES",
        ),
    ] {
        let value = std::env::var(variable).unwrap_or_else(|_| "default".into());
        report.insert(key, json!(value));
    }

    remove_leftovers(&client).await;

    // Room for every pod: kwok Nodes of 1,000 pods each, beside the cluster's three.
    let nodes = n.div_ceil(800);
    for i in 0..nodes {
        create(&client, fixtures::node(&format!("sluice-bench-{i}"), 1000)).await;
    }

    // The machine's speed before anything runs, and again at the end (below).
    let speed_at_start = fixed_work_cpu_ms().await;

    // The objects, before the operator runs: each Rollout, its routing, then its history.
    let created = Instant::now();
    for ns in (0..n).step_by(PER_NAMESPACE).map(namespace_of) {
        create(
            &client,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": {RUN_LABEL: "1"}}}),
        )
        .await;
    }
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let (ns, name) = (namespace_of(i), name_of(i));
                let mut uid = String::new();
                for object in fixtures::objects(&ns, &name, Kind::of(i)) {
                    uid = create(&client, object).await;
                }
                for k in 1..=5 {
                    create(&client, fixtures::old_replica_set(&ns, &name, &uid, k)).await;
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
    let creation = created.elapsed();
    println!("MEASURE created {n} Rollouts with their objects in {creation:?}");
    report.insert("create_seconds", json!(creation.as_secs_f64()));

    // First start: every Rollout creates its ReplicaSet, its pod turns Ready, it is Healthy.
    let log = out.join(format!("operator-{n}.log"));
    let _ = std::fs::remove_file(&log);
    let mut operator = Operator::new(binary, &prometheus, &log);
    operator.start();
    // Measured: 360 s for 1,000 on 2 cores, bound by the scheduler and kwok making pods.
    let limit = Duration::from_secs(120 + n as u64 / 2);
    let first = wait_all_healthy(&client, n, limit).await;
    println!("MEASURE first start -> all {n} Healthy: {first:?}");
    report.insert(
        "first_start_all_healthy_seconds",
        json!(first.as_secs_f64()),
    );

    // Idle: nothing changes; the operator should cost little and write nothing.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (before_cpu, before) = (operator.cpu_seconds(), operator.metrics().await);
    let idle_machine = machine_cpu(&operator);
    tokio::time::sleep(idle).await;
    let (after_cpu, after) = (operator.cpu_seconds(), operator.metrics().await);
    report.insert(
        "idle_machine_cores",
        cores_json(machine_cpu(&operator).cores_since(&idle_machine, idle)),
    );
    report.insert(
        "idle_end_memory_mib",
        Value::Array(
            memory_by_process(cluster_pids.as_deref(), &operator)
                .into_iter()
                .map(|(name, now, peak)| json!([name, now, peak]))
                .collect(),
        ),
    );
    let (rss, peak) = operator.memory_mib();
    let idle_cpu = after_cpu - before_cpu;
    let reconciles = |m: &Metrics| {
        m.sum(
            "sluice_reconcile_duration_seconds_count",
            &["controller=\"rollout\""],
        )
    };
    let idle_reconciles = reconciles(&after) - reconciles(&before);
    let status_writes = |m: &Metrics| {
        m.requests()
            .iter()
            .filter(|((verb, resource), _)| {
                resource == "rollouts/status" && verb != "get" && verb != "list"
            })
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let idle_status_writes = status_writes(&after) - status_writes(&before);
    let idle_requests: BTreeMap<String, Value> = after
        .requests_since(&before)
        .into_iter()
        .map(|(k, n)| (k, json!((n / idle.as_secs_f64() * 1000.0).round() / 1000.0)))
        .collect();
    println!(
        "MEASURE idle {idle:?}: RSS {rss:.1} MiB (peak {peak:.1}), CPU {idle_cpu:.2} s \
         ({:.2}% of a core), {idle_reconciles} reconciles, {idle_status_writes} status writes",
        idle_cpu / idle.as_secs_f64() * 100.0
    );
    report.insert("idle_seconds", json!(idle.as_secs()));
    report.insert("rss_steady_mib", json!(rss));
    report.insert("rss_peak_mib", json!(peak));
    report.insert(
        "idle_cpu_seconds_per_minute",
        json!(idle_cpu / idle.as_secs_f64() * 60.0),
    );
    report.insert(
        "idle_cpu_percent_of_a_core",
        json!(idle_cpu / idle.as_secs_f64() * 100.0),
    );
    report.insert("idle_reconciles", json!(idle_reconciles));
    report.insert("idle_status_writes", json!(idle_status_writes));
    report.insert("idle_requests_per_second", json!(idle_requests));
    let zero = Metrics::default();
    record_reconcile_quantiles(
        &mut report,
        [
            "first_start_reconcile_p50_seconds",
            "first_start_reconcile_p99_seconds",
        ],
        &after,
        &zero,
    );

    // A restart with every Rollout present: until each was reconciled once.
    operator.kill();
    let restarted = Instant::now();
    operator.start();
    loop {
        let m = operator.metrics().await;
        if reconciles(&m) >= n as f64 {
            break;
        }
        assert!(
            restarted.elapsed() < limit,
            "the restart did not reconcile every Rollout"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cold = restarted.elapsed();
    let (_, restart_peak) = operator.memory_mib();
    println!(
        "MEASURE restart -> all {n} reconciled once: {cold:?} (peak RSS {restart_peak:.1} MiB)"
    );
    report.insert("restart_all_reconciled_seconds", json!(cold.as_secs_f64()));
    report.insert("restart_rss_peak_mib", json!(restart_peak));
    wait_all_healthy(&client, n, limit).await;

    // Releases: `releases` Istio canaries at once, to 50% after the timed pause, then aborted.
    let seen = Arc::new(Mutex::new(Seen::default()));
    watch_releases(&client, seen.clone()).await;
    let released: Vec<(String, String)> = (0..n)
        .filter(|i| Kind::of(*i) == Kind::IstioCanary)
        .take(releases)
        .map(|i| (namespace_of(i), name_of(i)))
        .collect();
    let release_start = operator.metrics().await;
    let release_machine = machine_cpu(&operator);
    let (release_started, prometheus_start) =
        (Instant::now(), prometheus_queries(&prometheus).await);
    let releases_sent = Instant::now();
    release_all(&client, &released, "web:2", |_| json!({})).await;
    // How long the apiserver took to take the releases themselves (spec patches, PARALLEL at
    // a time): a floor under what the operator's own writes can do on this machine.
    report.insert(
        "release_requests_ms",
        json!(releases_sent.elapsed().as_millis() as u64),
    );
    let key = |(ns, name): &(String, String)| format!("{ns}/{name}");
    let reached = |weight: i64| {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        released
            .iter()
            .filter(|r| {
                seen.weights
                    .get(&key(r))
                    .is_some_and(|w| w.last().map(|x| x.1) == Some(weight))
            })
            .count()
    };
    wait_all_at(&reached, 50, released.len(), Duration::from_secs(300)).await;
    let all_at_half = release_started.elapsed();
    // A timed step writes its route before its status, and on a busy apiserver this watch of
    // the Rollouts can lag the one of the routes by seconds: the status that started a pause
    // may arrive after the route that ended it. Wait for it (a relist may have skipped it).
    let waited = Instant::now();
    let all_pauses_seen = || {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        released
            .iter()
            .all(|r| seen.pause_started.contains_key(&key(r)))
            || seen.relists.values().sum::<usize>() > 0
    };
    while !all_pauses_seen() && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let steps: Vec<(String, SystemTime, SystemTime)> = {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        released
            .iter()
            .filter_map(|r| {
                let due =
                    *seen.pause_started.get(&key(r))? + Duration::from_secs(STEP_PAUSE_SECONDS);
                let written = seen.weights.get(&key(r))?.iter().find(|(_, w)| *w == 50)?.0;
                Some((key(r), due, written))
            })
            .collect()
    };
    // Each step as timed, to be read against the apiserver's audit log (when the operator's
    // route write arrived and was answered): where a slow step spent its time.
    let unix = |t: &SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let rows: String = steps
        .iter()
        .map(|(key, due, written)| format!("{key}\t{:.3}\t{:.3}\n", unix(due), unix(written)))
        .collect();
    std::fs::write(out.join(format!("steps-{n}.tsv")), rows).expect("write the steps");
    let step_latencies: Vec<Duration> = steps
        .iter()
        .map(|(_, due, written)| written.duration_since(*due).unwrap_or(Duration::ZERO))
        .collect();
    if step_latencies.len() != released.len() {
        // Why not: what the watches went through, and one untimed Rollout as it is now.
        let (untimed, relisted): (Vec<&(String, String)>, usize) = {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!(
                "bench: relists {:?}, watch errors {:?}",
                seen.relists, seen.watch_errors
            );
            let untimed = released
                .iter()
                .filter(|r| !seen.pause_started.contains_key(&key(r)))
                .collect();
            (untimed, seen.relists.values().sum())
        };
        eprintln!(
            "bench: {} of {} steps untimed",
            untimed.len(),
            released.len()
        );
        if let Some((ns, name)) = untimed.first() {
            let api: Api<Rollout> = Api::namespaced(client.clone(), ns);
            if let Ok(r) = api.get(name).await {
                eprintln!("bench: {ns}/{name} now: {:?}", r.status);
            }
        }
        // A relist shows each object as it is now and skips the states in between: a pause
        // that began and ended meanwhile is the watch's loss, reported, not the operator's.
        assert!(
            relisted > 0,
            "every step is timed unless the watch relisted: {} of {} untimed",
            untimed.len(),
            released.len()
        );
    }
    report.insert("steps_timed", json!(step_latencies.len()));

    // Abort them all at once, as `kubectl sluice abort` does. Each is timed from the moment
    // the apiserver stored its request (100 requests at once take a while to all land).
    let aborts_sent = Instant::now();
    let requested: HashMap<String, SystemTime> = futures::stream::iter(released.clone())
        .map(|(ns, name)| {
            let api: Api<Rollout> = Api::namespaced(client.clone(), &ns);
            let intent =
                sluice::plugin::new_intent(jiff::Timestamp::now(), Some("bench".into()), None);
            let body = sluice::plugin::intent_patch(sluice::plugin::RolloutIntent::Abort, &intent);
            async move {
                api.patch_status(
                    &name,
                    &PatchParams::apply("kubectl-sluice").force(),
                    &Patch::Apply(body),
                )
                .await
                .map(|_| (format!("{ns}/{name}"), SystemTime::now()))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await
        .expect("abort every canary");
    // The same for the abort requests (status applies, as the operator's own status writes
    // are): each abort needs one of those from the operator, and a route update.
    report.insert(
        "abort_requests_ms",
        json!(aborts_sent.elapsed().as_millis() as u64),
    );
    wait_all_at(&reached, 0, released.len(), Duration::from_secs(120)).await;
    let abort_latencies: Vec<Duration> = {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        released
            .iter()
            .filter_map(|r| {
                let back = seen
                    .weights
                    .get(&key(r))?
                    .iter()
                    .rev()
                    .find(|(_, w)| *w == 0)?
                    .0;
                Some(
                    back.duration_since(*requested.get(&key(r))?)
                        .unwrap_or(Duration::ZERO),
                )
            })
            .collect()
    };
    let release_end = operator.metrics().await;
    // The canaries' background analyses all ask the same query: how often Prometheus was
    // asked, by the operator's count and by Prometheus's own.
    let releasing = release_started.elapsed();
    report.insert(
        "release_machine_cores",
        cores_json(machine_cpu(&operator).cores_since(&release_machine, releasing)),
    );
    let answers = |how: &str| {
        let label = format!("answer=\"{how}\"");
        release_end.sum("sluice_prometheus_queries_total", &[&label])
            - release_start.sum("sluice_prometheus_queries_total", &[&label])
    };
    let (asked, shared) = (answers("asked"), answers("shared"));
    let prometheus_answered = prometheus_queries(&prometheus).await - prometheus_start;
    let intervals = releasing.as_secs_f64() / ANALYSIS_INTERVAL_SECONDS as f64;
    println!(
        "MEASURE shared query over {releasing:?} ({intervals:.1} intervals of \
         {ANALYSIS_INTERVAL_SECONDS} s), {} canaries measuring: {asked} asked, {shared} shared; \
         Prometheus answered {prometheus_answered} instant queries",
        released.len()
    );
    assert!(
        released.len() < 2 || shared > 0.0,
        "{} canaries measured the same query and none shared an answer",
        released.len()
    );
    report.insert("analysis_queries_asked", json!(asked));
    report.insert("analysis_queries_shared", json!(shared));
    report.insert("prometheus_instant_queries", json!(prometheus_answered));
    report.insert("analysis_queries_per_interval", json!(asked / intervals));
    record_reconcile_quantiles(
        &mut report,
        [
            "release_reconcile_p50_seconds",
            "release_reconcile_p99_seconds",
        ],
        &release_end,
        &release_start,
    );
    record_lane_waits(&mut report, &release_end, &release_start);
    report.insert("releases", json!(released.len()));
    record_latencies(
        &mut report,
        ["step_to_weight_p50_ms", "step_to_weight_p99_ms"],
        &step_latencies,
    );
    record_latencies(
        &mut report,
        ["abort_to_stable_p50_ms", "abort_to_stable_p99_ms"],
        &abort_latencies,
    );
    let release_requests = release_end.requests_since(&release_start);
    report.insert("release_requests", json!(release_requests));
    println!(
        "MEASURE {} releases: step -> weight p50 {:?} p99 {:?}; abort -> stable p50 {:?} p99 {:?}",
        released.len(),
        percentile(&step_latencies, 0.5),
        percentile(&step_latencies, 0.99),
        percentile(&abort_latencies, 0.5),
        percentile(&abort_latencies, 0.99)
    );

    // Failing measurements: released again, each failing from a moment twice as far off as
    // the first round took to reach 50% (plus 10 s).
    let (failing_latencies, failing_untimed) = fail_releases(
        &client,
        &seen,
        &released,
        all_at_half * 2 + Duration::from_secs(10),
    )
    .await;
    report.insert("failures_timed", json!(failing_latencies.len()));
    report.insert("failures_untimed", json!(failing_untimed));
    record_latencies(
        &mut report,
        ["failing_to_stable_p50_ms", "failing_to_stable_p99_ms"],
        &failing_latencies,
    );
    println!(
        "MEASURE {} failing measurements ({failing_untimed} before any traffic moved): \
         failing -> stable p50 {:?} p99 {:?}",
        released.len(),
        percentile(&failing_latencies, 0.5),
        percentile(&failing_latencies, 0.99)
    );

    // The steps again, to the apiserver's answer to the operator's route write, from its audit
    // log: the weight written, without the watch's delivery of it to the bench. Read once
    // every timing is taken (the log is large, and reading it takes the bench's CPU).
    let to_written = std::env::var("SLUICE_BENCH_AUDIT_LOGS")
        .ok()
        .and_then(|dir| audit::step_to_written(Path::new(&dir), &steps))
        .unwrap_or_default();
    report.insert("steps_written_timed", json!(to_written.len()));
    record_latencies(
        &mut report,
        ["step_to_written_p50_ms", "step_to_written_p99_ms"],
        &to_written,
    );
    println!(
        "MEASURE {} steps to the route write's answer (audit log): p50 {:?} p99 {:?}",
        to_written.len(),
        percentile(&to_written, 0.5),
        percentile(&to_written, 0.99)
    );

    report.insert(
        "fixed_work_cpu_ms",
        json!([speed_at_start, fixed_work_cpu_ms().await]),
    );

    // The report: JSON for machines, a Markdown table for docs/performance.md.
    let json_path = out.join(format!("bench-{n}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
    .expect("write the JSON report");
    let fmt = |key: &str| match report.get(key) {
        Some(Value::Number(x)) => x.as_f64().map_or(x.to_string(), |f| {
            if f.fract() == 0.0 {
                format!("{f}")
            } else {
                format!("{f:.2}")
            }
        }),
        Some(v) => v.to_string(),
        None => "-".into(),
    };
    let mut md = format!("| Measure (N = {n}) | Result |\n| --- | --- |\n");
    let speed = |i: usize| ms_text(&report["fixed_work_cpu_ms"][i]);
    for (label, value) in [
        (
            "The machine's speed: CPU for a fixed task, at the start / the end (lower is faster)",
            format!("{} / {}", speed(0), speed(1)),
        ),
        ("Create all objects (s)", fmt("create_seconds")),
        (
            "First start -> all Healthy (s)",
            fmt("first_start_all_healthy_seconds"),
        ),
        (
            "RSS steady / peak (MiB)",
            format!("{} / {}", fmt("rss_steady_mib"), fmt("rss_peak_mib")),
        ),
        ("Idle CPU (% of a core)", fmt("idle_cpu_percent_of_a_core")),
        (
            "Idle window (s) / reconciles in it",
            format!("{} / {}", fmt("idle_seconds"), fmt("idle_reconciles")),
        ),
        ("Status writes while idle", fmt("idle_status_writes")),
        (
            "Reconcile p50 / p99 from the first start (s, bucket bound)",
            format!(
                "{} / {}",
                fmt("first_start_reconcile_p50_seconds"),
                fmt("first_start_reconcile_p99_seconds")
            ),
        ),
        (
            "Reconcile p50 / p99 during the releases (s, bucket bound)",
            format!(
                "{} / {}",
                fmt("release_reconcile_p50_seconds"),
                fmt("release_reconcile_p99_seconds")
            ),
        ),
        (
            "Wait for a place during the releases, p99 by lane (s, bucket bound)",
            LANES
                .iter()
                .map(|lane| format!("{lane} {}", report["release_lane_wait_p99_seconds"][*lane]))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "The machine's CPU in the idle window, cores by process",
            cores_text(&report["idle_machine_cores"]),
        ),
        (
            "Resident memory at the end of the idle window, MiB by process (highest so far)",
            memory_text(&report["idle_end_memory_mib"]),
        ),
        (
            "Restart -> all reconciled once (s)",
            fmt("restart_all_reconciled_seconds"),
        ),
        (
            "Concurrent releases / steps timed",
            format!("{} / {}", fmt("releases"), fmt("steps_timed")),
        ),
        (
            "Step due -> weight p50 / p99",
            format!(
                "{} / {}",
                ms_text(&report["step_to_weight_p50_ms"]),
                ms_text(&report["step_to_weight_p99_ms"])
            ),
        ),
        (
            "Step due -> weight written, from the audit log: p50 / p99 (steps timed)",
            format!(
                "{} / {} ({})",
                ms_text(&report["step_to_written_p50_ms"]),
                ms_text(&report["step_to_written_p99_ms"]),
                fmt("steps_written_timed")
            ),
        ),
        (
            "Shared analysis query: asked / shared (per interval asked)",
            format!(
                "{} / {} ({})",
                fmt("analysis_queries_asked"),
                fmt("analysis_queries_shared"),
                fmt("analysis_queries_per_interval")
            ),
        ),
        (
            "The bench's own requests: releases / aborts, first sent -> last answered (ms)",
            format!(
                "{} / {}",
                fmt("release_requests_ms"),
                fmt("abort_requests_ms")
            ),
        ),
        (
            "The machine's CPU in the releases (release -> abort -> stable), cores by process",
            cores_text(&report["release_machine_cores"]),
        ),
        (
            "Abort -> stable p50 / p99",
            format!(
                "{} / {}",
                ms_text(&report["abort_to_stable_p50_ms"]),
                ms_text(&report["abort_to_stable_p99_ms"])
            ),
        ),
        (
            "Failing measurement -> stable p50 / p99 (timed / before traffic moved)",
            format!(
                "{} / {} ({} / {})",
                ms_text(&report["failing_to_stable_p50_ms"]),
                ms_text(&report["failing_to_stable_p99_ms"]),
                fmt("failures_timed"),
                fmt("failures_untimed")
            ),
        ),
    ] {
        md.push_str(&format!("| {label} | {value} |\n"));
    }
    md.push_str("\nIdle requests per second (verb resource: rate):\n\n");
    for (k, v) in &idle_requests {
        md.push_str(&format!("- {k}: {v}\n"));
    }
    if idle_requests.is_empty() {
        md.push_str("- none\n");
    }
    std::fs::write(out.join(format!("bench-{n}.md")), &md).expect("write the Markdown report");
    println!("{md}\nreports in {}", out.display());

    if std::env::var("SLUICE_BENCH_KEEP").is_ok() {
        println!("SLUICE_BENCH_KEEP: the objects stay (the next run removes them)");
        return;
    }
    // Clean up while the operator runs: it takes each Rollout's finalizer off once its
    // traffic is back on stable, so the namespaces can go.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let by_run = ListParams::default().labels(RUN_LABEL);
    delete_namespaces(&client).await;
    let cleaning = Instant::now();
    while namespaces
        .list(&by_run)
        .await
        .is_ok_and(|l| !l.items.is_empty())
    {
        assert!(
            cleaning.elapsed() < limit,
            "the benchmark namespaces were not deleted"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!("MEASURE clean-up: {:?}", cleaning.elapsed());
    operator.kill();
    let node_api: Api<Node> = Api::all(client.clone());
    let _ = node_api
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(RUN_LABEL),
        )
        .await;
}
