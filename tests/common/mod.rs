//! Shared by the schema tests and the cluster tests: the samples, and the bad specs with the
//! message each must be refused with.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{Value, json};

/// The Sluice objects in `config/samples/`, by file.
pub fn samples() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples");
    let mut found = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if value["apiVersion"] == "sluice.dev/v1alpha1" {
                found.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    value,
                ));
            }
        }
    }
    found
}

pub fn sample(file: &str, kind: &str) -> Value {
    samples()
        .into_iter()
        .find(|(f, v)| f == file && v["kind"] == kind)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

/// One bad spec: the sample it starts from, how it is broken, and a phrase of the message.
pub struct Case {
    pub name: &'static str,
    pub file: &'static str,
    pub kind: &'static str,
    pub edit: fn(&mut Value),
    pub expect: &'static str,
}

fn canary(v: &mut Value) -> &mut Value {
    &mut v["spec"]["strategy"]["canary"]
}

pub fn cases() -> Vec<Case> {
    const SUBSET: &str = "rollout-canary-istio-subset.yaml";
    const HOST: &str = "rollout-canary-host-level.yaml";
    const GATEWAY: &str = "rollout-canary-gateway-api.yaml";
    const BLUE_GREEN: &str = "rollout-bluegreen.yaml";
    const BUDGET: &str = "errorbudget.yaml";
    const PIPELINE: &str = "pipeline.yaml";
    const NOTIFIER: &str = "notifier.yaml";
    vec![
        Case {
            name: "both strategies",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| v["spec"]["strategy"]["blueGreen"] = json!({"activeService": "checkout"}),
            expect: "strategy needs exactly one of canary or blueGreen",
        },
        Case {
            name: "no strategy",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| v["spec"]["strategy"] = json!({}),
            expect: "strategy needs exactly one of canary or blueGreen",
        },
        Case {
            name: "weight over 100",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["steps"][0] = json!({"setWeight": 150}),
            expect: "150 is greater than the maximum of 100",
        },
        Case {
            name: "negative weight",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["steps"][0] = json!({"setWeight": -1}),
            expect: "-1 is less than the minimum of 0",
        },
        Case {
            name: "step with two actions",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["steps"][0] = json!({"setWeight": 10, "pause": {}}),
            expect: "a step sets exactly one of setWeight, pause, analysis or setCanaryScale",
        },
        Case {
            name: "empty step",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["steps"][0] = json!({}),
            expect: "a step sets exactly one of setWeight, pause, analysis or setCanaryScale",
        },
        Case {
            name: "duration that does not parse",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["steps"][1] = json!({"pause": {"duration": "5 minutes"}}),
            expect: "does not match",
        },
        Case {
            name: "metric without provider",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["analysis"]["metrics"][0] =
                    json!({"name": "x", "successCondition": "result < 1"})
            },
            expect: "a metric needs exactly one provider: prometheus or errorBudget",
        },
        Case {
            name: "prometheus metric without condition",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["analysis"]["metrics"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("successCondition");
            },
            expect: "a prometheus metric needs a successCondition or a failureCondition",
        },
        Case {
            name: "errorBudget metric without threshold",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["analysis"]["metrics"][2]["errorBudget"] =
                    json!({"name": "checkout-availability"})
            },
            expect: "an errorBudget metric needs maxBurnRate or minRemainingPercent",
        },
        Case {
            name: "metric name not a DNS label",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["analysis"]["metrics"][0]["name"] = json!("Error Rate"),
            expect: "does not match",
        },
        Case {
            name: "two routers",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["trafficRouting"]["gatewayAPI"] =
                    json!({"httpRoute": {"name": "checkout"}})
            },
            expect: "trafficRouting needs exactly one of istio or gatewayAPI",
        },
        Case {
            name: "subset- and host-level at once",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["stableService"] = json!("a");
                canary(v)["canaryService"] = json!("b");
            },
            expect: "istio routing needs either a destinationRule (subset-level) or stableService and canaryService (host-level), not both",
        },
        Case {
            name: "istio without either mode",
            file: HOST,
            kind: "Rollout",
            edit: |v| {
                let c = canary(v).as_object_mut().unwrap();
                c.remove("stableService");
                c.remove("canaryService");
            },
            expect: "istio routing needs either a destinationRule",
        },
        Case {
            name: "stable service without canary service",
            file: HOST,
            kind: "Rollout",
            edit: |v| {
                canary(v).as_object_mut().unwrap().remove("canaryService");
            },
            expect: "stableService and canaryService go together",
        },
        Case {
            name: "same service twice",
            file: HOST,
            kind: "Rollout",
            edit: |v| canary(v)["canaryService"] = json!("payments-stable"),
            expect: "stableService and canaryService must be different Services",
        },
        Case {
            name: "gateway API without services",
            file: GATEWAY,
            kind: "Rollout",
            edit: |v| {
                let c = canary(v).as_object_mut().unwrap();
                c.remove("stableService");
                c.remove("canaryService");
            },
            expect: "gatewayAPI routing needs stableService and canaryService",
        },
        Case {
            name: "analysis step without metrics anywhere",
            file: HOST,
            kind: "Rollout",
            edit: |v| canary(v)["steps"][1] = json!({"analysis": {}}),
            expect: "an analysis step without metrics needs metrics in the canary's analysis",
        },
        Case {
            name: "one subset for both",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["trafficRouting"]["istio"]["destinationRule"]["canarySubset"] =
                    json!("stable")
            },
            expect: "stableSubset and canarySubset must differ",
        },
        Case {
            name: "istio without a VirtualService",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["trafficRouting"]["istio"]
                    .as_object_mut()
                    .unwrap()
                    .remove("virtualService");
            },
            expect: "istio routing needs exactly one of virtualService or virtualServices",
        },
        Case {
            name: "canary scale two ways",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["steps"][0] = json!({"setCanaryScale": {"replicas": 2, "weight": 10}})
            },
            expect: "setCanaryScale sets exactly one of replicas, weight or matchTrafficWeight",
        },
        Case {
            name: "two kinds of Prometheus auth",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| {
                canary(v)["prometheus"] = json!({"auth": {
                "bearerTokenSecretRef": {"name": "t", "key": "k"},
                "basic": {"usernameSecretRef": {"name": "u", "key": "k"}, "passwordSecretRef": {"name": "p", "key": "k"}}}})
            },
            expect: "auth needs exactly one of bearerTokenSecretRef or basic",
        },
        Case {
            name: "Prometheus address without scheme",
            file: SUBSET,
            kind: "Rollout",
            edit: |v| canary(v)["prometheus"] = json!({"address": "prometheus:9090"}),
            expect: "does not match",
        },
        Case {
            name: "preview is the active service",
            file: BLUE_GREEN,
            kind: "Rollout",
            edit: |v| v["spec"]["strategy"]["blueGreen"]["previewService"] = json!("cart"),
            expect: "previewService and activeService must be different Services",
        },
        Case {
            name: "blue-green routing without preview",
            file: BLUE_GREEN,
            kind: "Rollout",
            edit: |v| {
                let bg = v["spec"]["strategy"]["blueGreen"].as_object_mut().unwrap();
                bg.remove("previewService");
                bg.insert(
                    "trafficRouting".into(),
                    json!({"gatewayAPI": {"httpRoute": {"name": "cart"}}}),
                );
            },
            expect: "blue-green trafficRouting needs a previewService",
        },
        Case {
            name: "blue-green without active service",
            file: BLUE_GREEN,
            kind: "Rollout",
            edit: |v| {
                v["spec"]["strategy"]["blueGreen"]
                    .as_object_mut()
                    .unwrap()
                    .remove("activeService");
            },
            expect: "\"activeService\" is a required property",
        },
        Case {
            name: "objective of 100",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| v["spec"]["objective"] = json!("100"),
            expect: "does not match",
        },
        Case {
            name: "objective of 0",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| v["spec"]["objective"] = json!("0"),
            expect: "objective is a percentage strictly between 0 and 100",
        },
        Case {
            name: "window in words",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| v["spec"]["window"] = json!("30 days"),
            expect: "does not match",
        },
        Case {
            name: "errors and good",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| v["spec"]["indicator"]["ratio"]["good"] = json!("sum(rate(x[1m]))"),
            expect: "ratio needs exactly one of errors or good",
        },
        Case {
            name: "rollback window on a freeze",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| {
                v["spec"]["policy"] = json!([{"whenConsumed": 80, "action": "FreezePromotions", "rollbackWindow": "1h"}])
            },
            expect: "rollbackWindow applies only to the Rollback action",
        },
        Case {
            name: "unknown policy action",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| v["spec"]["policy"][0]["action"] = json!("Explode"),
            expect: "is not one of",
        },
        Case {
            name: "policy over 100 percent",
            file: BUDGET,
            kind: "ErrorBudget",
            edit: |v| v["spec"]["policy"][0]["whenConsumed"] = json!(120),
            expect: "120 is greater than the maximum of 100",
        },
        Case {
            name: "window schedule in words",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| {
                v["spec"]["stages"][2]["gates"]["windows"][0]["schedule"] =
                    json!("weekdays at nine")
            },
            expect: "does not match",
        },
        Case {
            name: "window kind unknown",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| v["spec"]["stages"][2]["gates"]["windows"][0]["kind"] = json!("maybe"),
            expect: "is not one of",
        },
        Case {
            name: "no stages",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| v["spec"]["stages"] = json!([]),
            expect: "[] has less than 1 item",
        },
        Case {
            name: "stage name with capitals",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| v["spec"]["stages"][0]["name"] = json!("Dev"),
            expect: "does not match",
        },
        Case {
            name: "stage without rollouts",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| v["spec"]["stages"][0]["rollouts"] = json!([]),
            expect: "[] has less than 1 item",
        },
        Case {
            name: "budget gate over 100 percent",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| {
                v["spec"]["stages"][1]["gates"]["errorBudgets"][0]["minRemainingPercent"] =
                    json!(120)
            },
            expect: "120 is greater than the maximum of 100",
        },
        Case {
            name: "soak in words",
            file: PIPELINE,
            kind: "Pipeline",
            edit: |v| v["spec"]["stages"][1]["gates"]["soak"] = json!("a day"),
            expect: "does not match",
        },
        Case {
            name: "two channels",
            file: NOTIFIER,
            kind: "Notifier",
            edit: |v| {
                v["spec"]["webhook"] = json!({"urlSecretRef": {"name": "hook", "key": "url"}})
            },
            expect: "a Notifier has exactly one channel: slack, teams, pagerDuty or webhook",
        },
        Case {
            name: "no channel",
            file: NOTIFIER,
            kind: "Notifier",
            edit: |v| {
                v["spec"].as_object_mut().unwrap().remove("slack");
            },
            expect: "a Notifier has exactly one channel: slack, teams, pagerDuty or webhook",
        },
        Case {
            name: "unknown transition",
            file: NOTIFIER,
            kind: "Notifier",
            edit: |v| v["spec"]["events"] = json!(["Deployed"]),
            expect: "is not one of",
        },
    ]
}
