//! The Grafana dashboards in config/grafana/dashboards (the chart ships the same files): only
//! current panel types, and every query parses, runs on the real Prometheus, and names only
//! metrics that the operator (scraped live) or the traffic simulator export.

#[path = "chaos/process.rs"]
#[allow(dead_code)]
mod process;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::*;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana/dashboards");

fn dashboards() -> Vec<(String, Value)> {
    let mut found: Vec<(String, Value)> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p:?}: {e}")),
            )
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Every PromQL query of a dashboard (panels and annotations), with Grafana's variables
/// replaced by what a user's selection could be.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((
                    panel["title"].as_str().unwrap_or("?").to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            out.push((
                format!("annotation {}", annotation["name"]),
                expr.to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["query"]["query"].as_str()
            && let Some(inner) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.to_string())
        {
            out.push((format!("variable {}", variable["name"]), inner));
        }
    }
    out.into_iter()
        .map(|(where_, q)| {
            let mut q = q.replace("$__rate_interval", "1m");
            for var in ["namespace", "rollout", "budget", "pipeline"] {
                q = q.replace(&format!("${var}"), ".*");
            }
            (where_, q)
        })
        .collect()
}

#[test]
fn the_chart_ships_the_dashboards_unchanged() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/sluice/dashboards");
    for (name, _) in dashboards() {
        assert_eq!(
            std::fs::read_to_string(Path::new(DIR).join(&name)).unwrap(),
            std::fs::read_to_string(Path::new(chart).join(&name)).unwrap_or_default(),
            "copy config/grafana/dashboards/{name} to charts/sluice/dashboards/"
        );
    }
    assert_eq!(
        std::fs::read_dir(chart).unwrap().count(),
        dashboards().len(),
        "charts/sluice/dashboards holds a file config/grafana/dashboards does not"
    );
}

#[test]
fn dashboards_use_only_current_panel_types_and_a_datasource_variable() {
    let current = ["timeseries", "stat", "table", "state-timeline"];
    let all = dashboards();
    assert_eq!(all.len(), 4, "Canary, SLO, Pipeline, Operator");
    for (name, dashboard) in all {
        assert!(
            dashboard["uid"]
                .as_str()
                .is_some_and(|u| u.starts_with("sluice-")),
            "{name}"
        );
        for panel in dashboard["panels"].as_array().unwrap() {
            let kind = panel["type"].as_str().unwrap_or_default();
            assert!(
                current.contains(&kind),
                "{name}: panel {} is {kind}",
                panel["title"]
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: {}",
                panel["title"]
            );
        }
    }
}

/// The exported sample names of an OpenMetrics text: counters as `_total`, histograms as
/// `_bucket`, `_sum` and `_count`.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The operator's metrics with one series in every family.
fn every_family() -> String {
    use sluice::api::errorbudget::{BudgetPhase, ErrorBudgetStatus};
    let m = sluice::telemetry::Metrics::new();
    let second = Duration::from_secs(1);
    m.observe_reconcile("rollout", second);
    m.reconcile_errors("rollout", "kube");
    m.measurement("Successful");
    m.notification("Slack", "delivered");
    m.analysis(
        ("ns", "web", "errors"),
        Some(0.01),
        [("success", Some(0.05)), ("failure", None)],
    );
    m.rollout_state(
        "ns",
        "web",
        Some(sluice::api::rollout::RolloutPhase::Healthy),
        0,
    );
    m.budget_state(
        "ns",
        "avail",
        &ErrorBudgetStatus {
            phase: Some(BudgetPhase::Healthy),
            remaining_percent: Some(90.0),
            consumed_percent: Some(10.0),
            burn_rates: [("1h".to_string(), 1.0)].into(),
            ..ErrorBudgetStatus::default()
        },
    );
    let stage: sluice::api::pipeline::StageStatus =
        serde_json::from_value(serde_json::json!({"name": "prod", "phase": "Healthy"})).unwrap();
    m.pipeline_state("ns", "web", &[stage]);
    m.observe_time_to_stage("ns", "web", "prod", 1.0);
    m.observe_approval_wait("ns", "web", "prod", 1.0);
    m.observe_release(second);
    m.observe_query(second, sluice::analysis::answers::Answered::Asked);
    m.observe_query(second, sluice::analysis::answers::Answered::Shared);
    m.encode().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local cluster: make test"]
async fn every_dashboard_query_runs_on_prometheus_and_names_exported_metrics() {
    let ns = TestNamespace::new("dashboards").await;
    // The operator, live, for the names it exports.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut operator = process::Operator::new(&ns.name, "dashboards", &prometheus_url(), 15);
    operator.listen = format!("127.0.0.1:{port}");
    let leases: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(ns.client.clone());
    let _ = leases
        .create(
            &Default::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": process::LEASE_NAMESPACE}}),
            )
            .unwrap(),
        )
        .await;
    operator.start();
    let http = reqwest::Client::new();
    let metrics = wait_for(
        "the operator's /metrics",
        Duration::from_secs(30),
        || async {
            let r = http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .ok()?;
            r.text().await.ok()
        },
    )
    .await;
    // A fresh operator exports only the families that have a series yet: every family of the
    // operator's metrics, each touched once, adds the rest, named as the encoder names them.
    let mut known = exported(&metrics);
    known.extend(exported(&every_family()));
    assert!(known.contains("sluice_rollout_canary_weight"), "{known:?}");
    // The simulator's, as Prometheus has them.
    let prometheus = prometheus_url();
    let names: Value = http
        .get(format!("{prometheus}/api/v1/label/__name__/values"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    known.extend(
        names["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str())
            .filter(|n| n.starts_with("istio_"))
            .map(String::from),
    );

    let mut problems = Vec::new();
    let mut checked = 0;
    for (file, dashboard) in dashboards() {
        for (where_, query) in queries(&dashboard) {
            checked += 1;
            match sluice::analysis::narrow::metric_names(&query) {
                Err(e) => problems.push(format!("{file} {where_}: {e}")),
                Ok(names) => {
                    for name in names.iter().filter(|n| !known.contains(*n)) {
                        problems.push(format!("{file} {where_}: {name} is exported by nobody"));
                    }
                }
            }
            let answer: Value = http
                .get(format!("{prometheus}/api/v1/query"))
                .query(&[("query", query.as_str())])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if answer["status"] != "success" {
                problems.push(format!(
                    "{file} {where_}: Prometheus says {}",
                    answer["error"]
                ));
            }
        }
    }
    drop(operator);
    ns.delete().await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!(
        "MEASURE dashboards: {checked} queries parsed, run on Prometheus, every metric exported"
    );
}
