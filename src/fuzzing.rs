//! Entry points for the fuzz targets: cargo-fuzz (libFuzzer, nightly) runs them under
//! `fuzz/`, and `tests/fuzz_corpus.rs` replays the committed corpus through them on stable in
//! every `make test`. Each takes arbitrary bytes, must never panic, and asserts what must hold
//! for any input. Inputs are split at newlines into the parts a target needs.

use serde_json::Value;

use crate::analysis::condition::{Condition, MeasuredValue};
use crate::analysis::template::{TemplateVars, render};
use crate::traffic::{gateway_api, istio};

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Query templating and PromQL narrowing: a query (first line) with every variable set to
/// the second line.
pub fn query_template(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let (query, value) = text.split_once('\n').unwrap_or((text, "web"));
    let vars = TemplateVars {
        rollout_name: value.into(),
        rollout_namespace: value.into(),
        canary_revision: value.into(),
        stable_revision: value.into(),
        window: Some(value.into()),
    };
    if let Ok(rendered) = render(query, &vars) {
        if !query.contains("{{") {
            assert_eq!(rendered, query, "a query without variables is left alone");
        }
        // A value can never end a PromQL string early, whatever it holds.
        let quoted = render("\"{{rollout.name}}\"", &vars).unwrap_or_default();
        let inner = &quoted[1..quoted.len() - 1];
        let mut escaped = false;
        for c in inner.chars() {
            assert!(escaped || c != '"', "unescaped quote in {quoted:?}");
            escaped = !escaped && c == '\\';
        }
        if let Ok(narrowed) = crate::analysis::narrow::narrow(&rendered, "revision", value) {
            // What narrowing prints parses again.
            assert!(
                promql_parser::parser::parse(&narrowed).is_ok(),
                "narrowing {rendered:?} printed {narrowed:?}, which does not parse"
            );
        }
    }
}

/// A CEL condition (first line) evaluated on the numbers of the second line (a list when
/// there are several; `NaN` and `inf` included).
pub fn condition(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let (source, numbers) = text.split_once('\n').unwrap_or((text, "0"));
    let Ok(condition) = Condition::compile(source) else {
        return;
    };
    let values: Vec<f64> = numbers
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let value = match values.as_slice() {
        [one] => MeasuredValue::Number(*one),
        many => MeasuredValue::List(many.to_vec()),
    };
    let _ = condition.evaluate(&value);
}

/// Durations (`1h30m`) and SLO objectives (`99.9`).
pub fn durations(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(duration) = text.parse::<crate::api::duration::Duration>() {
        let again: crate::api::duration::Duration = text
            .parse()
            .unwrap_or_else(|e| panic!("{text:?} parsed once, then not: {e}"));
        assert_eq!(duration, again);
    }
    if let Ok(objective) = crate::api::errorbudget::Objective::parse(text) {
        let budget = objective.budget();
        assert!(
            budget > 0.0 && budget < 1.0,
            "{text:?} gave a budget of {budget}"
        );
    }
}

/// The weight a fuzz input asks for, from its first byte, and the JSON document after it.
fn weight_and_document(data: &[u8]) -> Option<(i32, Value)> {
    let (first, rest) = data.split_first()?;
    let document = serde_json::from_slice(rest).ok()?;
    Some((i32::from(*first % 101), document))
}

/// Setting weights in any VirtualService spec: it either refuses with a message or leaves
/// every managed route at exactly the weight it was asked for.
pub fn virtual_service(data: &[u8]) {
    let Some((weight, spec)) = weight_and_document(data) else {
        return;
    };
    let keys = [
        istio::DestinationKey::Subset {
            stable: "stable".into(),
            canary: "canary".into(),
        },
        istio::DestinationKey::Host {
            stable: "web-stable".into(),
            canary: "web-canary".into(),
        },
    ];
    for names in [vec![], vec!["primary".to_string()]] {
        for key in &keys {
            let mut edited = spec.clone();
            if istio::set_weights(&mut edited, &names, key, weight, "web").is_ok() {
                let read = istio::read_canary_weight(&edited, &names, key, "web");
                assert!(
                    matches!(read, Ok(Some(w)) if w == weight),
                    "set {weight}, read {read:?} from {edited}"
                );
            }
        }
    }
}

/// Setting weights in any HTTPRoute spec, as for the VirtualService.
pub fn http_route(data: &[u8]) {
    let Some((weight, spec)) = weight_and_document(data) else {
        return;
    };
    let backends = gateway_api::Backends {
        stable: "web-stable",
        canary: "web-canary",
        namespace: "shop",
    };
    for names in [vec![], vec!["main".to_string()]] {
        let mut edited = spec.clone();
        if gateway_api::set_weights(&mut edited, &names, &backends, weight, "web").is_ok() {
            let read = gateway_api::read_canary_weight(&edited, &names, &backends, "web");
            assert!(
                matches!(read, Ok(Some(w)) if w == weight),
                "set {weight}, read {read:?} from {edited}"
            );
        }
    }
}

/// The plugin's `NAMESPACE/NAME` arguments.
pub fn plugin_names(data: &[u8]) {
    let Some(text) = text(data) else { return };
    for parse in [
        crate::plugin::object_reference,
        crate::plugin::pipeline_reference,
    ] {
        if let Ok((namespace, name)) = parse(text, None, "default") {
            assert!(!namespace.is_empty() && !name.is_empty(), "{text:?}");
            assert!(!name.contains('/') && !namespace.contains('/'), "{text:?}");
        }
    }
}
