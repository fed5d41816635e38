//! The generated CRD schemas accept every shipped sample and refuse the obvious mistakes,
//! with the message a user will see from the apiserver.
//!
//! Structure (types, enums, ranges, patterns, required fields) is checked with a JSON-schema
//! validator; the CEL `x-kubernetes-validations` rules with kube's client-side CEL engine. The
//! cluster tests repeat the rule cases against a real apiserver.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use sluice::api::{ErrorBudget, Pipeline, Rollout};

fn crd_for(kind: &str) -> CustomResourceDefinition {
    sluice::crdgen::all()
        .into_iter()
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn schema_for(kind: &str) -> Value {
    let crd = crd_for(kind);
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

/// Every message the apiserver would give for `object`, structural and CEL.
fn violations(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap();
    let schema = schema_for(kind);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .expect("the CRD schema is a valid JSON schema");
    let mut messages: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect();
    if let Err(errors) = kube::core::cel::Validator::new().validate(&schema, object, None) {
        messages.extend(errors.into_vec().into_iter().map(|e| e.to_string()));
    }
    messages
}

/// The Sluice objects in `config/samples/`, by file.
fn samples() -> Vec<(String, Value)> {
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

fn sample(file: &str, kind: &str) -> Value {
    samples()
        .into_iter()
        .find(|(f, v)| f == file && v["kind"] == kind)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

#[test]
fn every_sample_is_valid_and_parses_into_the_types() {
    let samples = samples();
    assert!(
        samples.len() >= 6,
        "expected a sample per example, found {}",
        samples.len()
    );
    for (file, object) in samples {
        let problems = violations(&object);
        assert!(problems.is_empty(), "{file}: {problems:#?}");
        let parsed = match object["kind"].as_str().unwrap() {
            "Rollout" => serde_json::from_value::<Rollout>(object.clone()).map(|_| ()),
            "ErrorBudget" => serde_json::from_value::<ErrorBudget>(object.clone()).map(|_| ()),
            "Pipeline" => serde_json::from_value::<Pipeline>(object.clone()).map(|_| ()),
            other => panic!("{file}: unexpected kind {other}"),
        };
        parsed.unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// One bad spec: the sample it starts from, how it is broken, and a phrase of the message.
struct Case {
    name: &'static str,
    file: &'static str,
    kind: &'static str,
    edit: fn(&mut Value),
    expect: &'static str,
}

fn canary(v: &mut Value) -> &mut Value {
    &mut v["spec"]["strategy"]["canary"]
}

fn cases() -> Vec<Case> {
    const SUBSET: &str = "rollout-canary-istio-subset.yaml";
    const HOST: &str = "rollout-canary-host-level.yaml";
    const GATEWAY: &str = "rollout-canary-gateway-api.yaml";
    const BLUE_GREEN: &str = "rollout-bluegreen.yaml";
    const BUDGET: &str = "errorbudget.yaml";
    const PIPELINE: &str = "pipeline.yaml";
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
    ]
}

#[test]
fn bad_specs_are_refused_with_a_clear_message() {
    let mut failures = Vec::new();
    for case in cases() {
        let mut object = sample(case.file, case.kind);
        (case.edit)(&mut object);
        let problems = violations(&object);
        if !problems.iter().any(|p| p.contains(case.expect)) {
            failures.push(format!(
                "{}: expected {:?}, got {:#?}",
                case.name, case.expect, problems
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A CEL rule added without a case here would go untested.
#[test]
fn every_cel_rule_has_a_case() {
    let rules: Vec<String> = sluice::crdgen::all()
        .iter()
        .flat_map(|crd| {
            let yaml = serde_yaml::to_string(crd).unwrap();
            yaml.lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("message: ")
                        .map(|m| m.trim_matches('\'').to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        rules.len() >= 15,
        "found only {} CEL rule messages",
        rules.len()
    );
    let expected: Vec<&str> = cases().iter().map(|c| c.expect).collect();
    for rule in rules {
        assert!(
            expected.iter().any(|e| rule.contains(e)),
            "CEL rule message {rule:?} has no bad-spec case"
        );
    }
}
