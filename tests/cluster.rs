//! Tests against the real local cluster (kube-apiserver, etcd, kwok nodes, Prometheus, the
//! traffic simulator). `make test` brings it all up, runs these with `--ignored`, and tears
//! it down; by hand: `make cluster-up`, then `make cluster-test`.

mod common;
mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use sluice::api::rollout::Rollout;
use support::*;

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn crds_apply_with_plain_kubectl_apply() {
    let output = std::process::Command::new(kubectl())
        .args(["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds")])
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "client-side apply of crds/ failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = client().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    for crd in sluice::crdgen::all() {
        let name = crd.metadata.name.clone().unwrap();
        let live = crds.get(&name).await.unwrap();
        let established = live
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn samples_are_accepted_and_bad_specs_refused_by_the_apiserver() {
    let ns = TestNamespace::new("admission").await;
    for (file, mut object) in common::samples() {
        object["metadata"]["namespace"] = json!(ns.name);
        create(&ns, &object)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let mut failures = Vec::new();
    for (i, case) in common::cases().iter().enumerate() {
        let mut object = common::sample(case.file, case.kind);
        (case.edit)(&mut object);
        object["metadata"]["namespace"] = json!(ns.name);
        object["metadata"]["name"] = json!(format!("bad-{i}"));
        match create(&ns, &object).await {
            Ok(()) => failures.push(format!("{}: accepted", case.name)),
            Err(message)
                if !message.contains(case.expect)
                    && !case.expect.contains("does not match")
                    && !case.expect.contains("greater than")
                    && !case.expect.contains("less than")
                    && !case.expect.contains("is not one of")
                    && !case.expect.contains("required property")
                    && !case.expect.contains("has less than") =>
            {
                failures.push(format!("{}: refused, but with {message:?}", case.name));
            }
            Err(_) => {}
        }
    }
    ns.delete().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_replicaset_gets_ready_pods_from_kwok() {
    let ns = TestNamespace::new("kwok").await;
    let rs = replica_set(&ns.name, "web", "aaa", 2, &[]);
    let api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    api.create(&PostParams::default(), &rs).await.unwrap();
    wait_for("2 ready pods", Duration::from_secs(60), || async {
        let rs = api.get("web-aaa").await.ok()?;
        (rs.status?.ready_replicas? == 2).then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn istio_and_gateway_api_crds_accept_routing_objects() {
    let ns = TestNamespace::new("routing").await;
    for object in [
        destination_rule(&ns.name, "web", "aaa", "bbb"),
        virtual_service(&ns.name, "web", 100),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": ns.name},
            "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"name": "main", "backendRefs": [
                {"name": "web-stable", "port": 80, "weight": 90},
                {"name": "web-canary", "port": 80, "weight": 10}]}]}
        }),
    ] {
        create(&ns, &object)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", object["kind"]));
    }
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn prometheus_sees_traffic_split_by_the_virtual_service_weights() {
    let ns = TestNamespace::new("traffic").await;
    let api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &replica_set(&ns.name, "web", "aaa", 2, &[]),
    )
    .await
    .unwrap();
    let bad = [("sim.sluice.dev/error-rate", "0.5")];
    api.create(
        &PostParams::default(),
        &replica_set(&ns.name, "web", "bbb", 1, &bad),
    )
    .await
    .unwrap();
    create(&ns, &service(&ns.name, "web")).await.unwrap();
    create(&ns, &destination_rule(&ns.name, "web", "aaa", "bbb"))
        .await
        .unwrap();
    create(&ns, &virtual_service(&ns.name, "web", 80))
        .await
        .unwrap();

    let share = format!(
        r#"sum(rate(istio_requests_total{{destination_service_namespace="{0}",destination_version="bbb"}}[10s]))
           / sum(rate(istio_requests_total{{destination_service_namespace="{0}"}}[10s]))"#,
        ns.name
    );
    let errors = format!(
        r#"sum(rate(istio_requests_total{{destination_service_namespace="{0}",destination_version="bbb",response_code=~"5.."}}[10s]))
           / sum(rate(istio_requests_total{{destination_service_namespace="{0}",destination_version="bbb"}}[10s]))"#,
        ns.name
    );
    wait_for("20% of traffic on bbb", Duration::from_secs(60), || async {
        let v = prometheus_value(&share).await?;
        ((v - 0.2).abs() < 0.03).then_some(())
    })
    .await;
    // A 10 s rate over series only seconds old is extrapolated from a few samples, and the
    // 5xx series starts apart from the total, so one early reading can be off by 0.1 (CI saw
    // 0.596): wait for the window to fill. The simulator's counts are exact, so it settles.
    wait_for_seen(
        "bbb error rate near 0.5",
        Duration::from_secs(60),
        || async {
            match prometheus_value(&errors).await {
                Some(rate) if (rate - 0.5).abs() < 0.05 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Move the weights: the split follows within a few scrapes.
    let vs_api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &virtual_service_resource());
    let mut vs = vs_api.get("web").await.unwrap();
    vs.data["spec"]["http"][0]["route"][0]["weight"] = json!(50);
    vs.data["spec"]["http"][0]["route"][1]["weight"] = json!(50);
    vs_api
        .replace("web", &PostParams::default(), &vs)
        .await
        .unwrap();
    wait_for("50% of traffic on bbb", Duration::from_secs(60), || async {
        let v = prometheus_value(&share).await?;
        ((v - 0.5).abs() < 0.03).then_some(())
    })
    .await;
    ns.delete().await;
}

/// Two requests in a row, with no operator to act on the first: both stay in the status.
#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_second_request_does_not_erase_a_first_one_not_yet_handled() {
    let ns = TestNamespace::new("requests").await;
    create(
        &ns,
        &WebRollout::canary(&ns.name, json!([{"setWeight": 50}])).json(),
    )
    .await
    .unwrap();
    let target = format!("{}/web", ns.name);
    plugin(&["abort", &target]);
    plugin(&["pause", &target]);
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let status = api
        .get_status("web")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    assert!(status.abort.is_some(), "the abort was erased by the pause");
    assert!(status.pause.is_some());
    ns.delete().await;
}
