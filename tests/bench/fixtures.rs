//! The objects of one benchmark Rollout, shaped like production ones: a pod template of about
//! 8 KB (two containers, env, probes, resources, volumes), its routing objects, and five old
//! ReplicaSets of revision history.

use serde_json::{Value, json};

/// The label every benchmark object carries (watches and clean-up select on it).
pub const RUN_LABEL: &str = "bench.sluice.dev/run";

/// How a Rollout ships: the mix is half Istio canary, a quarter Gateway API canary
/// and a quarter blue-green.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    IstioCanary,
    GatewayCanary,
    BlueGreen,
}

impl Kind {
    pub fn of(index: usize) -> Self {
        match index % 4 {
            0 | 1 => Self::IstioCanary,
            2 => Self::GatewayCanary,
            _ => Self::BlueGreen,
        }
    }
}

/// The Rollout's steps: the pause between 20% and 50% is what the step latency is timed on.
pub const STEP_PAUSE_SECONDS: u64 = 3;

/// Every canary's background analysis asks this same query (a service-wide figure, with no
/// per-release variable), so identical queries can be counted: Prometheus should be asked
/// about once per interval, not once per canary. It always has a value (it counts scrape
/// targets, 0 or more), so the analysis passes and never holds a step.
pub const SHARED_QUERY: &str = "count(up)";
/// The background analysis interval.
pub const ANALYSIS_INTERVAL_SECONDS: u64 = 5;
/// The metric that fails on purpose in the benchmark's last round.
pub const DEADLINE_METRIC: &str = "deadline";

/// A canary's background analysis: the shared query, and with `deadline = Some((index,
/// fail_at))` a metric that fails from `fail_at` (seconds since the epoch) on. Its query,
/// `time()`, answers with the moment Prometheus evaluated it, so the failing measurement's
/// value says when it was taken, to the millisecond; `+ 0 * index` makes it one query per
/// Rollout, never a shared answer that could be older than the Rollout's own question.
pub fn analysis(deadline: Option<(usize, f64)>) -> Value {
    let mut metrics = vec![
        json!({"name": "targets", "prometheus": {"query": SHARED_QUERY},
                                  "successCondition": "result >= 0"}),
    ];
    if let Some((index, fail_at)) = deadline {
        metrics.push(json!({"name": DEADLINE_METRIC,
                            "prometheus": {"query": format!("time() + 0 * {index}")},
                            "failureCondition": format!("result >= {fail_at:.3}")}));
    }
    json!({"interval": format!("{ANALYSIS_INTERVAL_SECONDS}s"), "metrics": metrics})
}

fn container(name: &str, image: &str, port: i64) -> Value {
    let env: Vec<Value> = (0..30)
        .map(|i| {
            json!({"name": format!("{}_SETTING_{i:02}", name.to_uppercase()),
                   "value": format!("value-{i:02}-of-a-realistic-configuration-entry-for-{name}")})
        })
        .collect();
    let probe = |path: &str| {
        json!({"httpGet": {"path": path, "port": port}, "initialDelaySeconds": 5,
               "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3})
    };
    json!({
        "name": name, "image": image,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "1", "memory": "512Mi"}},
        "readinessProbe": probe("/ready"),
        "livenessProbe": probe("/healthz"),
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"},
                         {"name": "cache", "mountPath": "/var/cache/app"}],
        "securityContext": {"runAsNonRoot": true, "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]}},
    })
}

/// The pod template: about 8 KB of JSON.
pub fn template(app: &str, image: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": app, "team": "payments", "tier": "backend"},
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"}},
        "spec": {
            "containers": [container("web", image, 8080), container("proxy", "proxy:1.4", 9090)],
            "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config")}},
                        {"name": "cache", "emptyDir": {"sizeLimit": "256Mi"}}],
            "terminationGracePeriodSeconds": 30,
            "serviceAccountName": "default",
        }
    })
}

fn metadata(namespace: &str, name: &str) -> Value {
    json!({"name": name, "namespace": namespace, "labels": {RUN_LABEL: "1"}})
}

fn service(namespace: &str, name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata(namespace, name),
           "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

/// The Rollout and the objects it routes through, in creation order.
pub fn objects(namespace: &str, name: &str, kind: Kind) -> Vec<Value> {
    let steps = json!([{"setWeight": 20}, {"pause": {"duration": format!("{STEP_PAUSE_SECONDS}s")}},
                       {"setWeight": 50}, {"pause": {}}]);
    let canary = |routing: Value| {
        let mut c = json!({"steps": steps, "scaleDownDelay": "5s", "abortScaleDownDelay": "5s",
                           "trafficRouting": routing, "analysis": analysis(None)});
        if kind == Kind::GatewayCanary {
            c["stableService"] = json!(format!("{name}-stable"));
            c["canaryService"] = json!(format!("{name}-canary"));
        }
        json!({"canary": c})
    };
    let (strategy, mut routing) = match kind {
        Kind::IstioCanary => (
            canary(json!({"istio": {
                "virtualService": {"name": name, "routes": ["primary"]},
                "destinationRule": {"name": name, "stableSubset": "stable", "canarySubset": "canary"}}})),
            vec![
                service(namespace, name, name),
                json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                       "metadata": metadata(namespace, name),
                       "spec": {"host": name, "subsets": [
                           {"name": "stable", "labels": {"app": name}},
                           {"name": "canary", "labels": {"app": name}}]}}),
                json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                       "metadata": metadata(namespace, name),
                       "spec": {"hosts": [name], "http": [{"name": "primary", "route": [
                           {"destination": {"host": name, "subset": "stable"}, "weight": 100},
                           {"destination": {"host": name, "subset": "canary"}, "weight": 0}]}]}}),
            ],
        ),
        Kind::GatewayCanary => (
            canary(json!({"gatewayAPI": {"httpRoute": {"name": name, "rules": ["main"]}}})),
            vec![
                service(namespace, &format!("{name}-stable"), name),
                service(namespace, &format!("{name}-canary"), name),
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                       "metadata": metadata(namespace, name),
                       "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"name": "main",
                           "backendRefs": [{"name": format!("{name}-stable"), "port": 80, "weight": 100},
                                           {"name": format!("{name}-canary"), "port": 80, "weight": 0}]}]}}),
            ],
        ),
        Kind::BlueGreen => (
            json!({"blueGreen": {"activeService": name, "previewService": format!("{name}-preview"),
                                 "scaleDownDelay": "5s"}}),
            vec![
                service(namespace, name, name),
                service(namespace, &format!("{name}-preview"), name),
            ],
        ),
    };
    routing.push(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
        "metadata": metadata(namespace, name),
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": template(name, "web:1"), "strategy": strategy}
    }));
    routing
}

/// Old revision `n` (1..=5) of a Rollout: scaled to zero, owned by it, as Sluice leaves them.
pub fn old_replica_set(namespace: &str, rollout: &str, uid: &str, n: usize) -> Value {
    let hash = format!("old{n}");
    let mut pod = template(rollout, &format!("web:0.{n}"));
    pod["metadata"]["labels"]["sluice.dev/pod-template-hash"] = json!(hash);
    let declared = template(rollout, &format!("web:0.{n}")).to_string();
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": format!("{rollout}-{hash}"), "namespace": namespace,
            "labels": {RUN_LABEL: "1", "sluice.dev/rollout": rollout,
                       "sluice.dev/pod-template-hash": hash},
            "annotations": {"sluice.dev/revision": n.to_string(), "sluice.dev/template": declared},
            "ownerReferences": [{"apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
                                 "name": rollout, "uid": uid, "controller": true,
                                 "blockOwnerDeletion": true}],
        },
        "spec": {"replicas": 0,
                 "selector": {"matchLabels": {"app": rollout, "sluice.dev/pod-template-hash": hash}},
                 "template": pod},
    })
}

/// A kwok Node with room for `pods` pods (the local cluster's three hold 110 each).
pub fn node(name: &str, pods: usize) -> Value {
    let capacity = json!({"cpu": "1000", "memory": "4Ti", "pods": pods.to_string()});
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name,
                     "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                     "labels": {RUN_LABEL: "1", "type": "kwok", "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"allocatable": capacity, "capacity": capacity,
                   "addresses": [{"type": "InternalIP", "address": "127.0.2.1"}]},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_template_is_about_eight_kilobytes() {
        let size = template("r-0001", "web:1").to_string().len();
        assert!((7_000..10_000).contains(&size), "{size} bytes");
    }
}
