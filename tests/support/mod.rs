//! Helpers for the cluster tests: clients, namespaces, objects, waiting, Prometheus.
#![allow(dead_code)]

pub mod receiver;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use sluice::api::rollout::{Rollout, RolloutPhase};
use std::sync::Arc;
use tokio::sync::watch;

pub async fn client() -> Client {
    sluice::install_crypto_provider();
    Client::try_default()
        .await
        .expect("KUBECONFIG points at the local cluster (make cluster-up)")
}

/// `kubectl` matching the cluster: `$KUBECTL`, else the one on PATH.
pub fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

pub fn prometheus_url() -> String {
    std::env::var("SLUICE_PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:19090".into())
}

/// The canary's error ratio over 10 s, as Istio's metrics give it (0 while it has requests
/// and no errors; no data while it has no requests).
pub const CANARY_ERROR_RATE: &str = r#"(sum(rate(istio_requests_total{destination_service_namespace="{{rollout.namespace}}",reporter="destination",destination_canonical_revision="{{canary.revision}}",response_code=~"5.."}[10s])) or vector(0)) / sum(rate(istio_requests_total{destination_service_namespace="{{rollout.namespace}}",reporter="destination",destination_canonical_revision="{{canary.revision}}"}[10s]))"#;

/// A namespace of its own for each test.
/// Deleted when the test is done, even when it panics (see `Drop`).
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    deleted: std::sync::atomic::AtomicBool,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        let client = client().await;
        let suffix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000;
        let name = format!("t-{prefix}-{suffix}");
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([("sluice.dev/test".into(), "true".into())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        Self {
            name,
            client,
            deleted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub async fn delete(&self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
        self.deleted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for TestNamespace {
    /// A test that panicked never reached `delete`: remove its namespace anyway (without
    /// waiting), so a failed run does not leave objects behind for the next.
    fn drop(&mut self) {
        if !self.deleted.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::process::Command::new(kubectl())
                .args(["delete", "namespace", &self.name, "--wait=false"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn resource_for(object: &Value) -> ApiResource {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or_default();
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

/// Creates any object; `Err` carries the apiserver's message.
pub async fn create(ns: &TestNamespace, object: &Value) -> Result<(), String> {
    let resource = resource_for(object);
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or(&ns.name)
        .to_string();
    if object["kind"] == "Namespace" {
        return Ok(());
    }
    let cluster_scoped = matches!(
        object["kind"].as_str(),
        Some(
            "ClusterRole"
                | "ClusterRoleBinding"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding"
        )
    );
    let api: Api<DynamicObject> = if cluster_scoped {
        Api::all_with(ns.client.clone(), &resource)
    } else {
        Api::namespaced_with(ns.client.clone(), &namespace, &resource)
    };
    let mut object = object.clone();
    if !cluster_scoped {
        object["metadata"]["namespace"] = json!(namespace);
    }
    let dynamic: DynamicObject = serde_json::from_value(object).map_err(|e| e.to_string())?;
    match api.create(&PostParams::default(), &dynamic).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(e) => Err(e.to_string()),
    }
}

pub fn virtual_service_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "networking.istio.io",
        "v1",
        "VirtualService",
    ))
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_seen(what, timeout, || {
        let checked = check();
        async move { checked.await.ok_or_else(String::new) }
    })
    .await
}

/// As [`wait_for`], for a check that says what it saw while the wait goes on (`Err`): the
/// timeout names the last thing seen, so a failure shows how far off it was.
pub async fn wait_for_seen<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}{}{seen}",
            if seen.is_empty() { "" } else { "; last seen: " }
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of an instant query with one result.
pub async fn prometheus_value(query: &str) -> Option<f64> {
    sluice::install_crypto_provider();
    let client = prometheus_http_query::Client::try_from(prometheus_url().as_str()).ok()?;
    let response = client.query(query).get().await.ok()?;
    let vector = response.data().as_vector()?;
    let value = vector.first()?.sample().value();
    value.is_finite().then_some(value)
}

pub fn pod_template(app: &str, annotations: &[(&str, &str)], image: &str) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: app.into(),
                image: Some(image.into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

/// A bare ReplicaSet of `app` at revision `hash` (pods labelled as Sluice labels them).
pub fn replica_set(
    namespace: &str,
    app: &str,
    hash: &str,
    replicas: i32,
    annotations: &[(&str, &str)],
) -> ReplicaSet {
    let labels = BTreeMap::from([
        ("app".to_string(), app.to_string()),
        ("sluice.dev/pod-template-hash".to_string(), hash.to_string()),
    ]);
    let mut template = pod_template(app, annotations, "registry.example/web:1");
    template.metadata.as_mut().unwrap().labels = Some(labels.clone());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{app}-{hash}")),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            },
            template: Some(template),
            ..ReplicaSetSpec::default()
        }),
        status: None,
    }
}

pub fn service(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
           "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

pub fn destination_rule(namespace: &str, host: &str, stable: &str, canary: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
           "metadata": {"name": host, "namespace": namespace},
           "spec": {"host": host, "subsets": [
               {"name": "stable", "labels": {"app": host, "sluice.dev/pod-template-hash": stable}},
               {"name": "canary", "labels": {"app": host, "sluice.dev/pod-template-hash": canary}}]}})
}

pub fn virtual_service(namespace: &str, host: &str, stable_weight: i32) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"name": host, "namespace": namespace},
           "spec": {"hosts": [host], "http": [{"name": "primary", "route": [
               {"destination": {"host": host, "subset": "stable"}, "weight": stable_weight},
               {"destination": {"host": host, "subset": "canary"}, "weight": 100 - stable_weight}]}]}})
}

/// A TCP forwarder to Prometheus that a test can stop and start again on the same port,
/// so the operator sees Prometheus go away and come back. Stopping also cuts the connections
/// already open (the operator keeps connections alive), as a Prometheus that goes down does.
pub struct Outage {
    pub port: u16,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Outage {
    pub async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the Prometheus forwarder");
        let port = listener.local_addr().unwrap().port();
        let upstream = prometheus_url().trim_start_matches("http://").to_string();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut accept_stopped = stopped.clone();
            loop {
                tokio::select! {
                    _ = accept_stopped.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        let upstream = upstream.clone();
                        let mut connection_stopped = stopped.clone();
                        tokio::spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                    _ = connection_stopped.changed() => {}
                                }
                            }
                        });
                    }
                }
            }
        });
        Self {
            port,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Prometheus goes away: the listener closes, open connections are cut, new ones refused.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// A Prometheus that accepts connections and never answers: every query hangs until the
/// client gives up.
pub struct Hang {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Hang {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the hanging listener");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Self { port, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `kubectl sluice ARGS` (the plugin built with the tests) and returns its stdout.
pub fn plugin(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-sluice"))
        .args(args)
        .output()
        .expect("plugin runs");
    assert!(
        output.status.success(),
        "kubectl sluice {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The median and the maximum of some durations.
pub fn median_max(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    (median, samples.last().copied().unwrap_or_default())
}

// The Rollout controller in-process, and a canary Rollout through Istio with its routing.

/// Starts the Rollout controller; it stops when the returned sender is dropped or set.
/// Each test's controller watches only its own namespace, so parallel tests never share one.
pub async fn start_controller(ns: &str) -> watch::Sender<bool> {
    start_controller_with(ns, prometheus_url()).await
}

pub async fn start_controller_with(ns: &str, prometheus: String) -> watch::Sender<bool> {
    start_controller_as(ns, prometheus, client().await).await
}

pub async fn start_controller_as(
    ns: &str,
    prometheus: String,
    client: kube::Client,
) -> watch::Sender<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = sluice::context::Settings::local(Some(ns.to_string()), Some(prometheus));
    let ctx = Arc::new(sluice::context::Context::for_tests(client, settings));
    tokio::spawn(sluice::rollout::run(ctx, stop_rx, None));
    stop_tx
}

/// Starts the Rollout, ErrorBudget and Pipeline controllers and the notifications, sharing one
/// context, as the operator runs them, watching `ns` (`None`: the whole cluster).
pub async fn start_controllers_in(ns: Option<&str>, prometheus: String) -> watch::Sender<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = sluice::context::Settings::local(ns.map(String::from), Some(prometheus));
    let ctx = Arc::new(sluice::context::Context::for_tests(
        client().await,
        settings,
    ));
    tokio::spawn(sluice::controllers::run(ctx, stop_rx));
    stop_tx
}

/// [`start_controllers_in`] one namespace.
pub async fn start_controllers(ns: &str, prometheus: String) -> watch::Sender<bool> {
    start_controllers_in(Some(ns), prometheus).await
}

/// How a test Rollout routes traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Istio, subset-level: the `web` VirtualService's `primary` route and the `web`
    /// DestinationRule's `stable` and `canary` subsets (what [`routing`] creates).
    IstioSubsets,
    /// Istio, host-level: the `primary` route between the `web-stable` and `web-canary`
    /// Services.
    IstioHosts,
    /// The Gateway API: the `main` rule of the `web` HTTPRoute, between `web-stable` and
    /// `web-canary`.
    GatewayApi,
    /// No router: the weight follows replica counts.
    None,
}

/// The `web` Rollout of a cluster test, said by what it is (strategy, routing, analysis)
/// rather than patched by JSON path. `json()` gives the object to create.
#[derive(Clone, Debug)]
pub struct WebRollout {
    namespace: String,
    replicas: i32,
    strategy: Value,
}

impl WebRollout {
    /// A canary Rollout of 4 replicas at `web:1`, through Istio subsets, without analysis,
    /// scaling old revisions down 2 s after traffic leaves them.
    pub fn canary(ns: &str, steps: Value) -> Self {
        Self {
            namespace: ns.to_string(),
            replicas: 4,
            strategy: json!({"canary": {
                "steps": steps, "scaleDownDelay": "2s", "abortScaleDownDelay": "2s"}}),
        }
        .routing(Routing::IstioSubsets)
    }

    /// A blue-green Rollout of 3 replicas at `web:1`, active `web`, preview `web-preview`,
    /// with `settings` added to (or replacing) the strategy's defaults.
    pub fn blue_green(ns: &str, settings: Value) -> Self {
        let mut blue_green = json!({"activeService": "web", "previewService": "web-preview", "scaleDownDelay": "4s"});
        for (k, v) in settings.as_object().cloned().unwrap_or_default() {
            blue_green[k] = v;
        }
        Self {
            namespace: ns.to_string(),
            replicas: 3,
            strategy: json!({"blueGreen": blue_green}),
        }
    }

    /// The canary's background analysis.
    pub fn analysis(mut self, analysis: Value) -> Self {
        self.strategy["canary"]["analysis"] = analysis;
        self
    }

    /// How the canary routes traffic.
    pub fn routing(mut self, routing: Routing) -> Self {
        let canary = &mut self.strategy["canary"];
        let hosts = |c: &mut Value| {
            c["stableService"] = json!("web-stable");
            c["canaryService"] = json!("web-canary");
        };
        if let Some(c) = canary.as_object_mut() {
            for key in ["trafficRouting", "stableService", "canaryService"] {
                c.remove(key);
            }
        }
        match routing {
            Routing::IstioSubsets => {
                canary["trafficRouting"] = json!({"istio": {
                    "virtualService": {"name": "web", "routes": ["primary"]},
                    "destinationRule": {"name": "web", "stableSubset": "stable", "canarySubset": "canary"}}});
            }
            Routing::IstioHosts => {
                hosts(canary);
                canary["trafficRouting"] =
                    json!({"istio": {"virtualService": {"name": "web", "routes": ["primary"]}}});
            }
            Routing::GatewayApi => {
                hosts(canary);
                canary["trafficRouting"] =
                    json!({"gatewayAPI": {"httpRoute": {"name": "web", "rules": ["main"]}}});
            }
            Routing::None => {}
        }
        self
    }

    /// Blue-green through a router (Gateway API or Istio), instead of Service selectors.
    pub fn blue_green_routing(mut self, routing: Value) -> Self {
        self.strategy["blueGreen"]["trafficRouting"] = routing;
        self
    }

    pub fn json(&self) -> Value {
        json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": self.namespace},
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
                "strategy": self.strategy
            }
        })
    }
}

/// Creates the `web` Rollout at `web:1` with these canary steps and no analysis, and waits
/// until it is Healthy: its Api and its stable revision.
pub async fn healthy_rollout(ns: &TestNamespace, steps: Value) -> (Api<Rollout>, String) {
    create(ns, &WebRollout::canary(&ns.name, steps).json())
        .await
        .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let stable = healthy(&api).await;
    (api, stable)
}

/// The error and total rates of the `web` Service's requests in namespace `ns`.
pub fn ratio_queries(ns: &str) -> (String, String) {
    let selector = format!(r#"destination_service_namespace="{ns}",reporter="destination""#);
    (
        format!(
            r#"sum(rate(istio_requests_total{{{selector},response_code=~"5.."}}[{{{{window}}}}]))"#
        ),
        format!(r#"sum(rate(istio_requests_total{{{selector}}}[{{{{window}}}}]))"#),
    )
}

/// A fresh namespace with the `web` routing objects, watched by both controllers (running
/// until the returned sender is dropped or set).
pub async fn routed_namespace(prefix: &str) -> (TestNamespace, tokio::sync::watch::Sender<bool>) {
    let ns = TestNamespace::new(prefix).await;
    let controllers = start_controllers(&ns.name, prometheus_url()).await;
    routing(&ns).await;
    (ns, controllers)
}

/// The share of the test budget (10% over one minute) consumed, as Prometheus computes it.
pub async fn consumed_in_prometheus(errors: &str, total: &str) -> Option<f64> {
    let window = |q: &str| q.replace("{{window}}", "1m");
    let bad = prometheus_value(&window(errors)).await.unwrap_or(0.0);
    let all = prometheus_value(&window(total)).await?;
    Some(bad / all / 0.10)
}

/// Waits for Prometheus's own figure to cross 95% consumed, and says when it did.
pub async fn past_95_percent(errors: &str, total: &str) -> Instant {
    wait_for("Prometheus past 95%", Duration::from_secs(90), || async {
        (consumed_in_prometheus(errors, total).await? >= 0.95).then(Instant::now)
    })
    .await
}

/// A 90% objective (a 10% budget) over one minute, evaluated every 2 s.
pub fn budget(ns: &str, name: &str, errors: &str, total: &str, extra: Value) -> Value {
    let mut budget = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "ErrorBudget",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "objective": "90", "window": "1m", "evaluationInterval": "2s",
            "burnRateWindows": ["10s"],
            "indicator": {"ratio": {"errors": errors, "total": total}},
            "targets": [{"rollout": "web"}]
        }
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        budget["spec"][k] = v;
    }
    budget
}

/// A client that authenticates as the ServiceAccount `name` in `namespace` (a token from the
/// TokenRequest API), to act as someone other than the test's admin.
pub async fn client_as(name: &str, namespace: &str) -> kube::Client {
    let token = std::process::Command::new(kubectl())
        .args(["create", "token", name, "-n", namespace])
        .output()
        .expect("kubectl runs");
    assert!(
        token.status.success(),
        "create token: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    let mut config = kube::Config::infer().await.unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(
            String::from_utf8(token.stdout)
                .unwrap()
                .trim()
                .to_string()
                .into(),
        ),
        ..Default::default()
    };
    kube::Client::try_from(config).unwrap()
}

pub async fn routing(ns: &TestNamespace) {
    create(ns, &service(&ns.name, "web")).await.unwrap();
    let mut dr = destination_rule(&ns.name, "web", "x", "x");
    for subset in dr["spec"]["subsets"].as_array_mut().unwrap() {
        subset["labels"]
            .as_object_mut()
            .unwrap()
            .remove("sluice.dev/pod-template-hash");
    }
    create(ns, &dr).await.unwrap();
    create(ns, &virtual_service(&ns.name, "web", 100))
        .await
        .unwrap();
}

pub async fn canary_weight(ns: &TestNamespace) -> Option<i64> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &virtual_service_resource());
    let vs = api.get("web").await.ok()?;
    vs.data["spec"]["http"][0]["route"][1]["weight"].as_i64()
}

/// Asserts that the `web` VirtualService's canary weight reaches `expected` within 15 s.
///
/// Sluice records its decision in the status before it moves traffic (so a crash in between
/// repeats the same move), so a test that has just seen the status may read the route a
/// moment before the write lands.
pub async fn assert_canary_weight(ns: &TestNamespace, expected: i64) {
    let start = Instant::now();
    loop {
        let seen = canary_weight(ns).await;
        if seen == Some(expected) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the canary weight stayed {seen:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records (time, canary weight) for every change of the `web` VirtualService.
pub async fn watch_weights(ns: &TestNamespace) -> Arc<std::sync::Mutex<Vec<(Instant, i64)>>> {
    use futures::StreamExt;
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &virtual_service_resource());
    let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = changes.clone();
    let stream = kube::runtime::watcher(
        api,
        kube::runtime::watcher::Config::default().fields("metadata.name=web"),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::applied_objects(stream));
        while let Some(Ok(vs)) = stream.next().await {
            if let Some(w) = vs.data["spec"]["http"][0]["route"][1]["weight"].as_i64() {
                let mut all = sink.lock().unwrap();
                if all.last().map(|(_, last)| *last) != Some(w) {
                    all.push((Instant::now(), w));
                }
            }
        }
    });
    // Let the watch start before anything changes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    changes
}

/// Records the step index of every version of the `web` Rollout's status that has one, as
/// its watch delivers them (no version is skipped short of a relist).
pub async fn watch_step_indexes(api: &Api<Rollout>) -> Arc<std::sync::Mutex<Vec<i32>>> {
    use futures::StreamExt;
    let indexes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = indexes.clone();
    let stream = kube::runtime::watcher(
        api.clone(),
        kube::runtime::watcher::Config::default().fields("metadata.name=web"),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::applied_objects(stream));
        while let Some(Ok(rollout)) = stream.next().await {
            if let Some(index) = rollout.status.and_then(|s| s.current_step_index) {
                let mut all = sink.lock().unwrap();
                if all.last() != Some(&index) {
                    all.push(index);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    indexes
}

pub async fn status(api: &Api<Rollout>) -> Option<sluice::api::rollout::RolloutStatus> {
    api.get("web").await.ok()?.status
}

pub async fn set_template(api: &Api<Rollout>, image: &str, annotations: Value) {
    let patch = json!({"spec": {"template": {"metadata": {"annotations": annotations},
                                             "spec": {"containers": [{"name": "web", "image": image}]}}}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

pub async fn healthy(api: &Api<Rollout>) -> String {
    wait_for("Healthy", Duration::from_secs(60), || async {
        let s = status(api).await?;
        (s.phase == Some(RolloutPhase::Healthy)).then_some(s.stable_revision?)
    })
    .await
}

pub async fn at_step(api: &Api<Rollout>, index: i32, phase: RolloutPhase) {
    wait_for(
        &format!("step {index} {phase:?}"),
        Duration::from_secs(60),
        || async {
            let s = status(api).await?;
            (s.current_step_index == Some(index) && s.phase == Some(phase)).then_some(())
        },
    )
    .await;
}

// Shared by the Rollout, ErrorBudget and reliability tests.

/// Active and preview Services, each with a VirtualService so the simulator sends them
/// traffic (users on the active one, smoke tests on the preview one).
pub async fn blue_green_services(ns: &TestNamespace) {
    web_services(ns, &["web", "web-preview"]).await;
    for svc in ["web", "web-preview"] {
        let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": svc, "namespace": ns.name},
            "spec": {"hosts": [svc], "http": [{"route": [{"destination": {"host": svc}}]}]}});
        create(ns, &vs).await.unwrap();
    }
}

/// Services that select the `web` app; Sluice adds the revision to their selectors.
pub async fn web_services(ns: &TestNamespace, names: &[&str]) {
    for name in names {
        let mut svc = service(&ns.name, name);
        svc["spec"]["selector"] = json!({"app": "web"});
        create(ns, &svc).await.unwrap();
    }
}

pub async fn selects(ns: &TestNamespace, service: &str) -> Option<String> {
    let api: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ns.client.clone(), &ns.name);
    api.get(service)
        .await
        .ok()?
        .spec?
        .selector?
        .get("sluice.dev/pod-template-hash")
        .cloned()
}

/// Sets the simulator's error rate on the running pods of `web` at revision `hash`.
pub async fn fail_pods(ns: &TestNamespace, hash: &str, rate: &str) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let selector = format!("sluice.dev/pod-template-hash={hash}");
    let patch = json!({"metadata": {"annotations": {"sim.sluice.dev/error-rate": rate}}});
    for pod in pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .unwrap()
    {
        let name = pod.metadata.name.unwrap_or_default();
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
}

/// The revision the DestinationRule's stable subset selects.
pub async fn stable_subset(ns: &TestNamespace) -> Option<String> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "networking.istio.io",
        "v1",
        "DestinationRule",
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let dr = api.get("web").await.ok()?;
    dr.data["spec"]["subsets"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "stable")?["labels"]["sluice.dev/pod-template-hash"]
        .as_str()
        .map(String::from)
}

/// Waits (up to 15 s) until the namespace's Events include every reason in `wanted`, and
/// returns all their reasons. The operator publishes Events after its other writes, so one
/// may land after the change a test saw first.
pub async fn expect_events(ns: &TestNamespace, wanted: &[&str]) -> Vec<String> {
    let started = std::time::Instant::now();
    loop {
        let reasons = event_reasons(ns).await;
        let missing: Vec<&&str> = wanted
            .iter()
            .filter(|w| !reasons.iter().any(|r| r == *w))
            .collect();
        if missing.is_empty() {
            return reasons;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no {missing:?} Event in 15 s; reasons: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reasons of every Event in the namespace.
pub async fn event_reasons(ns: &TestNamespace) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(ns.client.clone(), &ns.name);
    events
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}
