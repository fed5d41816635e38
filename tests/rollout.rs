//! The Rollout controller, run in-process against the local cluster, Prometheus and the
//! traffic simulator. `make test` runs these with `--ignored`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice::api::rollout::{Rollout, RolloutPhase};
use support::*;
use tokio::sync::watch;

/// Starts the Rollout controller; it stops when the returned sender is dropped or set.
async fn start_controller() -> watch::Sender<bool> {
    let client = client().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let health = Arc::new(sluice::server::Health::new(
        sluice::telemetry::Metrics::new(),
    ));
    let settings = sluice::operator::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        lease: None,
        prometheus_address: Some(prometheus_url()),
    };
    let ctx = Arc::new(sluice::operator::Context {
        client,
        health,
        settings,
    });
    tokio::spawn(sluice::rollout::run(ctx, stop_rx));
    stop_tx
}

fn rollout(ns: &str, image: &str, annotations: Value, analysis: Value, steps: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}, "annotations": annotations},
                         "spec": {"containers": [{"name": "web", "image": image}]}},
            "strategy": {"canary": {
                "trafficRouting": {"istio": {
                    "virtualService": {"name": "web", "routes": ["primary"]},
                    "destinationRule": {"name": "web", "stableSubset": "stable", "canarySubset": "canary"}}},
                "steps": steps,
                "analysis": analysis,
                "scaleDownDelay": "2s",
                "abortScaleDownDelay": "2s"
            }}
        }
    })
}

async fn routing(ns: &TestNamespace) {
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

async fn canary_weight(ns: &TestNamespace) -> Option<i64> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &virtual_service_resource());
    let vs = api.get("web").await.ok()?;
    vs.data["spec"]["http"][0]["route"][1]["weight"].as_i64()
}

async fn status(api: &Api<Rollout>) -> Option<sluice::api::rollout::RolloutStatus> {
    api.get("web").await.ok()?.status
}

async fn set_template(api: &Api<Rollout>, image: &str, annotations: Value) {
    let patch = json!({"spec": {"template": {"metadata": {"annotations": annotations},
                                             "spec": {"containers": [{"name": "web", "image": image}]}}}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn canary_happy_path_moves_weights_step_by_step_and_promotes() {
    let ns = TestNamespace::new("happy").await;
    let _controller = start_controller().await;
    routing(&ns).await;
    let steps = json!([{"setWeight": 10}, {"pause": {"duration": "1s"}}, {"setWeight": 25}, {"pause": {"duration": "1s"}},
                       {"setWeight": 50}, {"pause": {"duration": "1s"}}, {"setWeight": 75}, {"pause": {"duration": "1s"}}]);
    create(
        &ns,
        &rollout(&ns.name, "web:1", json!({}), json!(null), steps),
    )
    .await
    .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let first = wait_for(
        "first revision Healthy",
        Duration::from_secs(60),
        || async {
            let s = status(&api).await?;
            (s.phase == Some(RolloutPhase::Healthy)).then_some(s.stable_revision?)
        },
    )
    .await;

    set_template(&api, "web:2", json!({})).await;
    let mut seen: Vec<i64> = Vec::new();
    let started = Instant::now();
    let second = loop {
        if let Some(w) = canary_weight(&ns).await
            && seen.last() != Some(&w)
        {
            seen.push(w);
        }
        let s = status(&api).await.unwrap_or_default();
        if let Some(stable) = s.stable_revision.filter(|r| *r != first) {
            break stable;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not promoted; weights seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "promoted in {:?}; canary weights seen: {seen:?}",
        started.elapsed()
    );
    let ordered: Vec<i64> = [10, 25, 50, 75, 100]
        .into_iter()
        .filter(|w| seen.contains(w))
        .collect();
    assert_eq!(ordered, vec![10, 25, 50, 75, 100], "weights seen {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0] || w[1] == 0),
        "weights went backwards: {seen:?}"
    );
    wait_for(
        "all traffic on the new stable",
        Duration::from_secs(30),
        || async { (canary_weight(&ns).await? == 0).then_some(()) },
    )
    .await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        "old ReplicaSet scaled to zero",
        Duration::from_secs(60),
        || async {
            let old = rs_api.get(&format!("web-{first}")).await.ok()?;
            (old.spec?.replicas? == 0).then_some(())
        },
    )
    .await;
    let new = rs_api.get(&format!("web-{second}")).await.unwrap();
    assert_eq!(new.spec.unwrap().replicas, Some(4));
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_bad_canary_is_rolled_back_by_analysis() {
    let ns = TestNamespace::new("bad").await;
    let _controller = start_controller().await;
    routing(&ns).await;
    let window = "[10s]";
    let query = format!(
        r#"sum(rate(istio_requests_total{{destination_service_namespace="{{{{rollout.namespace}}}}",destination_version="{{{{canary.revision}}}}",response_code=~"5.."}}{window}))
           / sum(rate(istio_requests_total{{destination_service_namespace="{{{{rollout.namespace}}}}",destination_version="{{{{canary.revision}}}}"}}{window}))"#
    );
    let analysis = json!({"interval": "3s", "initialDelay": "4s", "failureLimit": 0, "inconclusiveLimit": 20,
                          "metrics": [{"name": "error-rate", "prometheus": {"query": query}, "successCondition": "result < 0.05"}]});
    let steps = json!([{"setWeight": 30}, {"pause": {}}]);
    create(&ns, &rollout(&ns.name, "web:1", json!({}), analysis, steps))
        .await
        .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let stable = wait_for(
        "first revision Healthy",
        Duration::from_secs(60),
        || async {
            let s = status(&api).await?;
            (s.phase == Some(RolloutPhase::Healthy)).then_some(s.stable_revision?)
        },
    )
    .await;

    set_template(&api, "web:2", json!({"sim.sluice.dev/error-rate": "0.3"})).await;
    wait_for("30% on the canary", Duration::from_secs(60), || async {
        (canary_weight(&ns).await? == 30).then_some(())
    })
    .await;
    let aborted = wait_for("the release aborted", Duration::from_secs(90), || async {
        let s = status(&api).await?;
        s.aborted_at.is_some().then_some(s)
    })
    .await;
    wait_for("weights back to 100/0", Duration::from_secs(10), || async {
        (canary_weight(&ns).await? == 0).then_some(())
    })
    .await;
    let failed_at = aborted
        .analysis_runs
        .iter()
        .find(|r| r.name == "background")
        .and_then(|r| r.finished_at.clone())
        .unwrap();
    println!(
        "failing measurement at {}, aborted at {}",
        failed_at.0,
        aborted.aborted_at.clone().unwrap().0
    );
    assert_eq!(aborted.phase, Some(RolloutPhase::Degraded));
    assert_eq!(aborted.stable_revision, Some(stable));
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "AnalysisFailed"),
        "events: {reasons:?}"
    );
    // Aborted stays aborted: no re-promotion without a person.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(canary_weight(&ns).await, Some(0));
    assert!(status(&api).await.unwrap().aborted_at.is_some());
    let _ = PostParams::default();
    ns.delete().await;
}
