//! The generated CRD schemas accept every shipped sample and refuse the obvious mistakes,
//! with the message a user will see from the apiserver.
//!
//! Structure (types, enums, ranges, patterns, required fields) is checked with a JSON-schema
//! validator; the CEL `x-kubernetes-validations` rules with kube's client-side CEL engine. The
//! cluster tests repeat the rule cases against a real apiserver.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;
use sluice::api::{ErrorBudget, Notifier, Pipeline, Rollout};

mod common;
use common::{cases, sample, samples};

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
            "Notifier" => serde_json::from_value::<Notifier>(object.clone()).map(|_| ()),
            other => panic!("{file}: unexpected kind {other}"),
        };
        parsed.unwrap_or_else(|e| panic!("{file}: {e}"));
    }
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
    fn collect(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                let rules = map
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array);
                for rule in rules.into_iter().flatten() {
                    out.extend(rule["message"].as_str().map(str::to_string));
                }
                map.values().for_each(|v| collect(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut rules = Vec::new();
    for crd in sluice::crdgen::all() {
        collect(&serde_json::to_value(&crd).unwrap(), &mut rules);
    }
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
