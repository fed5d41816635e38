//! The Rollout controller, run in-process against the local cluster, Prometheus and the
//! traffic simulator. `make test` runs these with `--ignored`.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use sluice::api::rollout::{Rollout, RolloutPhase};
use support::*;

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn canary_happy_path_moves_weights_step_by_step_and_promotes() {
    let ns = TestNamespace::new("happy").await;
    let _controller = start_controller(&ns.name).await;
    routing(&ns).await;
    let steps = json!([{"setCanaryScale": {"replicas": 4}}, {"setWeight": 10}, {"pause": {"duration": "1s"}},
                       {"setWeight": 25}, {"pause": {"duration": "1s"}},
                       {"setWeight": 50}, {"pause": {"duration": "1s"}}, {"setWeight": 75}, {"pause": {"duration": "1s"}}]);
    create(&ns, &WebRollout::canary(&ns.name, steps).json())
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

    // Every version of the VirtualService, from a watch: short-lived weights are not missed.
    let changes = watch_weights(&ns).await;
    let indexes = watch_step_indexes(&api).await;
    let started = Instant::now();
    set_template(&api, "web:2", json!({})).await;
    let second = wait_for(
        "the new revision promoted",
        Duration::from_secs(120),
        || async { status(&api).await?.stable_revision.filter(|r| *r != first) },
    )
    .await;
    wait_for(
        "all traffic on the new stable",
        Duration::from_secs(30),
        || async { (canary_weight(&ns).await? == 0).then_some(()) },
    )
    .await;
    let changes = changes.lock().unwrap().clone();
    let seen: Vec<i64> = changes.iter().map(|(_, w)| *w).collect();
    println!(
        "promoted in {:?}; canary weights seen: {seen:?}",
        started.elapsed()
    );
    assert_eq!(seen, vec![0, 10, 25, 50, 75, 100, 0], "weights seen");
    // A weight step that a pause follows is recorded done, with the pause begun, in the one
    // status write after its route write: no version of the status stands at it once its
    // pods are there (at step 1 the release's first status does, before the canary's pods).
    let indexes = indexes.lock().unwrap().clone();
    println!("step indexes seen: {indexes:?}");
    for weight_step in [3, 5, 7] {
        assert!(
            !indexes.contains(&weight_step),
            "a status stood at step {weight_step}: {indexes:?}"
        );
    }
    for pause_step in [2, 4, 6, 8] {
        assert!(
            indexes.contains(&pause_step),
            "no status at pause {pause_step}: {indexes:?}"
        );
    }
    // Each of 25, 50, 75 and 100 follows a 1s pause: what is left is the time from the pause
    // ending (the step falling due) to the new weight being written, seen from outside.
    let lags: Vec<Duration> = changes[1..6]
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).saturating_sub(Duration::from_secs(1)))
        .collect();
    let (median, max) = median_max(lags.clone());
    println!(
        "MEASURE step due -> weight written: median {median:?}, max {max:?} over {} steps ({lags:?})",
        lags.len()
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
    let _controller = start_controller(&ns.name).await;
    routing(&ns).await;
    let query = CANARY_ERROR_RATE;
    let analysis = json!({"interval": "3s", "initialDelay": "4s", "failureLimit": 0, "inconclusiveLimit": 20,
                          "metrics": [{"name": "error-rate", "prometheus": {"query": query}, "successCondition": "result < 0.05"}]});
    let steps = json!([{"setWeight": 30}, {"pause": {}}]);
    create(
        &ns,
        &WebRollout::canary(&ns.name, steps)
            .analysis(analysis)
            .json(),
    )
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
    let mut reaction = Vec::new();
    for cycle in 0..3 {
        wait_for("30% on the canary", Duration::from_secs(60), || async {
            (canary_weight(&ns).await? == 30).then_some(())
        })
        .await;
        // Poll both the verdict and the route: from the failing measurement being recorded to
        // the route back at 100/0.
        let mut failed_seen: Option<Instant> = None;
        let deadline = Instant::now() + Duration::from_secs(90);
        let stable_at = loop {
            assert!(Instant::now() < deadline, "cycle {cycle}: not rolled back");
            // The route is read before the status: status is written before traffic moves, so
            // a route seen at 0% is followed by a status that shows the verdict. (Read the
            // other way round, both writes could land between the two reads.)
            let weight = canary_weight(&ns).await;
            let at = Instant::now();
            if failed_seen.is_none()
                && let Some(s) = status(&api).await
                && s.analysis_runs
                    .iter()
                    .any(|r| r.phase == sluice::api::analysis::AnalysisPhase::Failed)
            {
                failed_seen = Some(at);
            }
            if weight == Some(0) {
                break at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let failed_seen =
            failed_seen.unwrap_or_else(|| panic!("cycle {cycle}: the failed run was not seen"));
        reaction.push(stable_at.saturating_duration_since(failed_seen));
        let aborted = status(&api).await.unwrap();
        assert!(aborted.aborted_at.is_some(), "cycle {cycle}: not aborted");
        assert_eq!(aborted.phase, Some(RolloutPhase::Degraded));
        assert_eq!(aborted.stable_revision.as_deref(), Some(stable.as_str()));
        // Aborted stays aborted: no re-promotion without a person.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_canary_weight(&ns, 0).await;
        assert!(status(&api).await.unwrap().aborted_at.is_some());
        if cycle < 2 {
            plugin(&["retry", &format!("{}/web", ns.name)]);
        }
    }
    let (median, max) = median_max(reaction.clone());
    println!(
        "MEASURE failing measurement -> 100% stable: median {median:?}, max {max:?} over {} aborts ({reaction:?})",
        reaction.len()
    );
    expect_events(&ns, &["AnalysisFailed", "Retried"]).await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn abort_does_not_wait_for_a_prometheus_that_never_answers() {
    let ns = TestNamespace::new("hang").await;
    let prometheus = Hang::start().await;
    let _controller = start_controller_with(&ns.name, prometheus.url()).await;
    routing(&ns).await;
    // The step analysis asks a Prometheus that accepts and never answers, with a 30 s timeout.
    let hanging = json!({"metrics": [{"name": "hangs",
        "prometheus": {"query": "vector(0)", "timeout": "30s"}, "successCondition": "result < 1"}]});
    let steps = json!([{"setWeight": 30}, {"pause": {"duration": "1s"}}, {"analysis": hanging}]);
    let (api, _) = healthy_rollout(&ns, steps).await;
    set_template(&api, "web:2", json!({})).await;
    let mut took = Vec::new();
    for cycle in 0..3 {
        wait_for(
            "the step analysis measuring",
            Duration::from_secs(60),
            || async {
                let s = status(&api).await?;
                // After a retry the aborted release's run is still listed until Sluice
                // resets it.
                let measuring = s.analysis_runs.iter().any(|r| {
                    r.name == "step-2" && r.phase == sluice::api::analysis::AnalysisPhase::Running
                });
                (s.aborted_at.is_none() && measuring).then_some(())
            },
        )
        .await;
        assert_canary_weight(&ns, 30).await;
        // Let the reconcile get well into waiting for the answer.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let asked = Instant::now();
        plugin(&["abort", &format!("{}/web", ns.name)]);
        while canary_weight(&ns).await != Some(0) {
            assert!(
                asked.elapsed() < Duration::from_secs(20),
                "cycle {cycle}: abort never took effect"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        took.push(asked.elapsed());
        if cycle < 2 {
            plugin(&["retry", &format!("{}/web", ns.name)]);
        }
    }
    let (median, max) = median_max(took.clone());
    println!(
        "MEASURE abort -> 100% stable with Prometheus hanging: median {median:?}, max {max:?} ({took:?})"
    );
    assert!(
        max < Duration::from_secs(1),
        "abort waited for Prometheus: {took:?}"
    );
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn undo_brings_back_the_old_revision_itself() {
    let ns = TestNamespace::new("undo").await;
    let _controller = start_controller(&ns.name).await;
    routing(&ns).await;
    let steps = json!([{"setWeight": 50}, {"pause": {}}]);
    let (api, first) = healthy_rollout(&ns, steps).await;
    let target = format!("{}/web", ns.name);
    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    plugin(&["promote", "--full", &target]);
    let second = wait_for("web:2 stable", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        let stable = s.stable_revision?;
        (stable != first && s.phase == Some(RolloutPhase::Healthy)).then_some(stable)
    })
    .await;

    plugin(&["undo", &target]);
    at_step(&api, 1, RolloutPhase::Paused).await;
    let s = status(&api).await.unwrap();
    assert_eq!(
        s.canary_revision.as_deref(),
        Some(first.as_str()),
        "undo releases the first revision itself, not a copy"
    );
    plugin(&["promote", "--full", &target]);
    wait_for("web:1 stable again", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        (s.stable_revision.as_deref() == Some(first.as_str())
            && s.phase == Some(RolloutPhase::Healthy))
        .then_some(())
    })
    .await;
    let sets: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let names: Vec<String> = sets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|rs| rs.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names.len(), 2, "the old ReplicaSet is reused: {names:?}");
    assert!(names.contains(&format!("web-{first}")) && names.contains(&format!("web-{second}")));
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn removing_traffic_routing_takes_back_the_revision_labels() {
    let ns = TestNamespace::new("unroute").await;
    let _controller = start_controller(&ns.name).await;
    routing(&ns).await;
    let steps = json!([{"setWeight": 50}, {"pause": {}}]);
    let (api, stable) = healthy_rollout(&ns, steps).await;
    let rules: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "networking.istio.io",
            "v1",
            "DestinationRule",
        )),
    );
    let pinned = |dr: &DynamicObject| -> Vec<Option<String>> {
        dr.data["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s["labels"]["sluice.dev/pod-template-hash"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    };
    wait_for("subsets pinned", Duration::from_secs(30), || async {
        let dr = rules.get("web").await.ok()?;
        (pinned(&dr) == vec![Some(stable.clone()), Some(stable.clone())]).then_some(())
    })
    .await;
    // The user stops routing through Istio.
    let patch = json!({"spec": {"strategy": {"canary": {"trafficRouting": null}}}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for("the labels taken back", Duration::from_secs(30), || async {
        let dr = rules.get("web").await.ok()?;
        let s = status(&api).await?;
        (pinned(&dr) == vec![None, None] && s.routed_objects.is_empty()).then_some(())
    })
    .await;
    let dr = rules.get("web").await.unwrap();
    assert_eq!(
        dr.data["spec"]["subsets"][0]["name"], "stable",
        "the rest is left alone"
    );
    assert_eq!(dr.data["spec"]["subsets"][0]["labels"]["app"], "web");
    ns.delete().await;
}

fn background_analysis(interval: &str) -> Value {
    let query = CANARY_ERROR_RATE;
    json!({"interval": interval, "failureLimit": 0, "inconclusiveLimit": 50, "consecutiveErrorLimit": 2,
           "metrics": [{"name": "error-rate", "prometheus": {"query": query}, "successCondition": "result < 0.05"}]})
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn prometheus_outage_pauses_the_release_and_promote_continues_it() {
    let ns = TestNamespace::new("outage").await;
    let mut prometheus = Outage::start(0).await;
    let _controller = start_controller_with(&ns.name, prometheus.url()).await;
    routing(&ns).await;
    let steps =
        json!([{"setWeight": 20}, {"pause": {"duration": "3s"}}, {"setWeight": 50}, {"pause": {}}]);
    create(
        &ns,
        &WebRollout::canary(&ns.name, steps)
            .analysis(background_analysis("2s"))
            .json(),
    )
    .await
    .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let stable = healthy(&api).await;
    set_template(&api, "web:2", json!({})).await;
    wait_for("20% on the canary", Duration::from_secs(60), || async {
        (canary_weight(&ns).await? == 20).then_some(())
    })
    .await;

    prometheus.stop();
    wait_for(
        "paused as inconclusive",
        Duration::from_secs(60),
        || async {
            let s = status(&api).await?;
            s.pause_conditions
                .iter()
                .any(|p| p.reason == sluice::api::rollout::PauseReason::InconclusiveAnalysis)
                .then_some(())
        },
    )
    .await;
    // Nothing promotes and nothing rolls back while Prometheus is away.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = status(&api).await.unwrap();
    assert_eq!(s.phase, Some(RolloutPhase::Paused), "{:?}", s.message);
    assert!(s.aborted_at.is_none());
    assert_eq!(s.stable_revision.as_deref(), Some(stable.as_str()));
    assert!(
        s.current_step_index.unwrap() <= 1,
        "moved on without analysis: {:?}",
        s.current_step_index
    );
    assert_canary_weight(&ns, 20).await;

    let mut prometheus = Outage::start(prometheus.port).await;
    plugin(&["promote", &format!("{}/web", ns.name)]);
    at_step(&api, 3, RolloutPhase::Paused).await;
    assert_canary_weight(&ns, 50).await;
    plugin(&["promote", "--full", &format!("{}/web", ns.name)]);
    wait_for("promoted", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        (s.stable_revision? != stable && s.phase == Some(RolloutPhase::Healthy)).then_some(())
    })
    .await;
    prometheus.stop();
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn the_operator_restarted_mid_step_resumes_where_it_was() {
    let ns = TestNamespace::new("restart").await;
    let controller = start_controller(&ns.name).await;
    routing(&ns).await;
    let steps =
        json!([{"setWeight": 25}, {"pause": {"duration": "6s"}}, {"setWeight": 60}, {"pause": {}}]);
    create(&ns, &WebRollout::canary(&ns.name, steps).json())
        .await
        .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    healthy(&api).await;
    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    let pause_seen = Instant::now();
    let before = status(&api).await.unwrap();
    controller.send_replace(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // While it is down nothing moves.
    assert_eq!(status(&api).await.unwrap().current_step_index, Some(1));
    let _controller = start_controller(&ns.name).await;
    at_step(&api, 3, RolloutPhase::Paused).await;
    let after = status(&api).await.unwrap();
    assert_eq!(after.canary_revision, before.canary_revision);
    assert_eq!(after.stable_revision, before.stable_revision);
    assert!(
        pause_seen.elapsed() >= Duration::from_secs(4),
        "the timed pause restarted or was skipped"
    );
    assert_canary_weight(&ns, 60).await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn people_steer_the_release_with_the_plugin() {
    let ns = TestNamespace::new("plugin").await;
    let _controller = start_controller(&ns.name).await;
    routing(&ns).await;
    let steps = json!([{"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]);
    create(&ns, &WebRollout::canary(&ns.name, steps).json())
        .await
        .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let first = healthy(&api).await;
    let name = format!("{}/web", ns.name);
    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    let text = plugin(&["status", &name]);
    assert!(text.contains("  =>  2. pause until promoted"), "{text}");

    plugin(&["promote", &name]);
    at_step(&api, 3, RolloutPhase::Paused).await;
    assert_canary_weight(&ns, 50).await;

    plugin(&["abort", &name, "--reason", "looks wrong"]);
    wait_for("back on stable", Duration::from_secs(30), || async {
        (canary_weight(&ns).await? == 0).then_some(())
    })
    .await;
    // A person's abort moves traffic before it is recorded: the status follows.
    wait_for("Degraded", Duration::from_secs(15), || async {
        (status(&api).await?.phase == Some(RolloutPhase::Degraded)).then_some(())
    })
    .await;

    plugin(&["retry", &name]);
    at_step(&api, 1, RolloutPhase::Paused).await;
    assert_canary_weight(&ns, 25).await;

    // A template change mid-release supersedes the canary.
    let superseded = status(&api).await.unwrap().canary_revision.unwrap();
    set_template(&api, "web:3", json!({})).await;
    let third = wait_for("a new canary", Duration::from_secs(30), || async {
        let c = status(&api).await?.canary_revision?;
        (c != superseded).then_some(c)
    })
    .await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        "superseded canary scaled down",
        Duration::from_secs(30),
        || async {
            (rs_api
                .get(&format!("web-{superseded}"))
                .await
                .ok()?
                .spec?
                .replicas?
                == 0)
                .then_some(())
        },
    )
    .await;

    plugin(&["promote", "--full", &name]);
    wait_for("promoted", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        (s.stable_revision.as_deref() == Some(third.as_str())
            && s.phase == Some(RolloutPhase::Healthy))
        .then_some(())
    })
    .await;
    assert_ne!(third, first);
    let list = plugin(&["list", "-n", &ns.name]);
    assert!(list.contains("Healthy"), "{list}");
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn host_level_routing_leaves_other_routes_alone_and_puts_drift_back() {
    let ns = TestNamespace::new("host").await;
    let _controller = start_controller(&ns.name).await;
    web_services(&ns, &["web-stable", "web-canary"]).await;
    let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": ns.name},
        "spec": {"hosts": ["web"], "http": [
            {"name": "header", "match": [{"headers": {"x-canary": {"exact": "yes"}}}],
             "route": [{"destination": {"host": "web-canary"}}], "timeout": "3s"},
            {"name": "reviews", "route": [{"destination": {"host": "reviews", "port": {"number": 9080}}, "weight": 100}],
             "retries": {"attempts": 3, "perTryTimeout": "2s"}},
            {"name": "primary", "route": [{"destination": {"host": "web-stable"}, "weight": 100},
                                          {"destination": {"host": "web-canary"}, "weight": 0}]}]}});
    create(&ns, &vs).await.unwrap();
    let r = WebRollout::canary(&ns.name, json!([{"setWeight": 30}, {"pause": {}}]))
        .routing(Routing::IstioHosts);
    create(&ns, &r.json()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let stable = healthy(&api).await;
    let vs_api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &virtual_service_resource());
    let weight = || async {
        let vs = vs_api.get("web").await.ok()?;
        vs.data["spec"]["http"][2]["route"][1]["weight"].as_i64()
    };
    let others = vs_api.get("web").await.unwrap().data["spec"]["http"]
        .as_array()
        .unwrap()[..2]
        .to_vec();

    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    wait_for("30% on the canary", Duration::from_secs(15), || async {
        (weight().await? == 30).then_some(())
    })
    .await;
    let canary = status(&api).await.unwrap().canary_revision.unwrap();
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let selector = |svc: k8s_openapi::api::core::v1::Service| svc.spec.unwrap().selector.unwrap();
    assert_eq!(
        selector(services.get("web-stable").await.unwrap()).get("sluice.dev/pod-template-hash"),
        Some(&stable)
    );
    assert_eq!(
        selector(services.get("web-canary").await.unwrap()).get("sluice.dev/pod-template-hash"),
        Some(&canary)
    );
    assert_eq!(
        selector(services.get("web-canary").await.unwrap())
            .get("app")
            .map(String::as_str),
        Some("web")
    );
    let live = vs_api.get("web").await.unwrap();
    assert_eq!(
        live.data["spec"]["http"].as_array().unwrap()[..2].to_vec(),
        others,
        "other routes changed"
    );

    // Someone edits the weights by hand: Sluice puts its own back.
    let mut edited = vs_api.get("web").await.unwrap();
    edited.data["spec"]["http"][2]["route"][0]["weight"] = json!(50);
    edited.data["spec"]["http"][2]["route"][1]["weight"] = json!(50);
    vs_api
        .replace("web", &PostParams::default(), &edited)
        .await
        .unwrap();
    let drift_fixed = Instant::now();
    wait_for("drift corrected", Duration::from_secs(20), || async {
        (weight().await? == 30).then_some(())
    })
    .await;
    println!("MEASURE drift corrected in {:?}", drift_fixed.elapsed());

    // Deleting the Rollout puts all traffic back on stable first.
    api.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for(
        "weights back to stable on deletion",
        Duration::from_secs(30),
        || async { (weight().await? == 0).then_some(()) },
    )
    .await;
    let live = vs_api.get("web").await.unwrap();
    assert_eq!(
        live.data["spec"]["http"].as_array().unwrap()[..2].to_vec(),
        others,
        "other routes changed"
    );
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn gateway_api_canary_sets_backend_weights_and_leaves_the_rest() {
    let ns = TestNamespace::new("gateway").await;
    let _controller = start_controller(&ns.name).await;
    web_services(&ns, &["web-stable", "web-canary"]).await;
    let route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": ns.name},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [
            {"name": "admin", "matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-admin", "value": "1"}]}}],
             "backendRefs": [{"name": "admin", "port": 80}]},
            {"name": "main",
             "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-served-by", "value": "web"}]}}],
             "backendRefs": [{"name": "web-stable", "port": 80, "weight": 100}, {"name": "web-canary", "port": 80, "weight": 0}]}]}});
    create(&ns, &route).await.unwrap();
    let r = WebRollout::canary(&ns.name, json!([{"setWeight": 30}, {"pause": {}}]))
        .routing(Routing::GatewayApi);
    create(&ns, &r.json()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let first = healthy(&api).await;
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ));
    let routes: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let weights = || async {
        let r = routes.get("web").await.ok()?;
        let refs = r.data["spec"]["rules"][1]["backendRefs"]
            .as_array()?
            .clone();
        Some((refs[0]["weight"].as_i64()?, refs[1]["weight"].as_i64()?))
    };
    let untouched = |r: &DynamicObject| {
        (
            r.data["spec"]["rules"][0].clone(),
            r.data["spec"]["rules"][1]["filters"].clone(),
            r.data["spec"]["parentRefs"].clone(),
        )
    };
    let before = untouched(&routes.get("web").await.unwrap());

    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    wait_for("70/30 on the route", Duration::from_secs(15), || async {
        (weights().await? == (70, 30)).then_some(())
    })
    .await;
    plugin(&["promote", "--full", &format!("{}/web", ns.name)]);
    wait_for("promoted", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        (s.stable_revision? != first && s.phase == Some(RolloutPhase::Healthy)).then_some(())
    })
    .await;
    wait_for(
        "all traffic on the new stable",
        Duration::from_secs(20),
        || async { (weights().await? == (100, 0)).then_some(()) },
    )
    .await;
    assert_eq!(
        untouched(&routes.get("web").await.unwrap()),
        before,
        "other rules, filters or parents changed"
    );
    ns.delete().await;
}

fn error_rate_analysis(count: i32) -> Value {
    let query = CANARY_ERROR_RATE;
    json!({"interval": "2s", "initialDelay": "6s", "count": count, "inconclusiveLimit": 10,
           "metrics": [{"name": "error-rate", "prometheus": {"query": query}, "successCondition": "result < 0.05"}]})
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn blue_green_previews_checks_switches_and_switches_back() {
    let ns = TestNamespace::new("bluegreen").await;
    let _controller = start_controller(&ns.name).await;
    blue_green_services(&ns).await;
    let extra = json!({"prePromotionAnalysis": error_rate_analysis(2), "postPromotionAnalysis": error_rate_analysis(4)});
    create(&ns, &WebRollout::blue_green(&ns.name, extra).json())
        .await
        .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let v1 = healthy(&api).await;
    wait_for(
        "the active Service on v1",
        Duration::from_secs(15),
        || async { (selects(&ns, "web").await? == v1).then_some(()) },
    )
    .await;
    let name = format!("{}/web", ns.name);

    // A good release: previewed, checked, switched by a person, the old one kept briefly.
    set_template(&api, "web:2", json!({})).await;
    let v2 = wait_for(
        "v2 ready in preview, pre-promotion analysis passed",
        Duration::from_secs(90),
        || async {
            let s = status(&api).await?;
            let passed = s.analysis_runs.iter().any(|r| {
                r.name == "pre-promotion"
                    && r.phase == sluice::api::analysis::AnalysisPhase::Successful
            });
            (s.phase == Some(RolloutPhase::Paused) && passed).then_some(s.canary_revision?)
        },
    )
    .await;
    assert_eq!(
        selects(&ns, "web").await.as_deref(),
        Some(v1.as_str()),
        "users still on v1 before promotion"
    );
    assert_eq!(
        selects(&ns, "web-preview").await.as_deref(),
        Some(v2.as_str())
    );
    plugin(&["promote", &name]);
    wait_for("active switched to v2", Duration::from_secs(30), || async {
        (selects(&ns, "web").await? == v2).then_some(())
    })
    .await;
    let rs_api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    assert_eq!(
        rs_api
            .get(&format!("web-{v1}"))
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(3),
        "v1 kept warm"
    );
    wait_for(
        "post-promotion passed and v1 scaled down",
        Duration::from_secs(90),
        || async {
            let s = status(&api).await?;
            (s.previous_revision.is_none()
                && s.phase == Some(RolloutPhase::Healthy)
                && rs_api
                    .get(&format!("web-{v1}"))
                    .await
                    .ok()?
                    .spec?
                    .replicas?
                    == 0)
                .then_some(())
        },
    )
    .await;

    // A bad release forced past the pre-promotion check: post-promotion analysis fails and
    // traffic switches straight back to v2, which is still up.
    set_template(&api, "web:3", json!({"sim.sluice.dev/error-rate": "0.5"})).await;
    let v3 = wait_for("v3 in preview", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        s.canary_revision.filter(|c| *c != v2)
    })
    .await;
    wait_for("v3 ready", Duration::from_secs(60), || async {
        (rs_api
            .get(&format!("web-{v3}"))
            .await
            .ok()?
            .status?
            .available_replicas?
            >= 3)
            .then_some(())
    })
    .await;
    plugin(&["promote", "--full", &name]);
    wait_for("switched to v3", Duration::from_secs(30), || async {
        (selects(&ns, "web").await? == v3).then_some(())
    })
    .await;
    let switched = Instant::now();
    wait_for("switched back to v2", Duration::from_secs(60), || async {
        (selects(&ns, "web").await? == v2).then_some(())
    })
    .await;
    println!(
        "MEASURE blue-green: on v3 for {:?} before post-promotion analysis switched back",
        switched.elapsed()
    );
    let s = status(&api).await.unwrap();
    assert_eq!(s.stable_revision.as_deref(), Some(v2.as_str()));
    assert_eq!(s.phase, Some(RolloutPhase::Degraded));
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn blue_green_auto_promotes_after_the_delay_and_abort_keeps_the_active() {
    let ns = TestNamespace::new("autobg").await;
    let _controller = start_controller(&ns.name).await;
    blue_green_services(&ns).await;
    create(
        &ns,
        &WebRollout::blue_green(
            &ns.name,
            json!({"autoPromotion": {"enabled": true, "after": "3s"}}),
        )
        .json(),
    )
    .await
    .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let v1 = healthy(&api).await;
    set_template(&api, "web:2", json!({})).await;
    let v2 = wait_for("v2 in preview", Duration::from_secs(60), || async {
        status(&api).await?.canary_revision
    })
    .await;
    let previewing = Instant::now();
    wait_for("auto-promoted to v2", Duration::from_secs(60), || async {
        (selects(&ns, "web").await? == v2).then_some(())
    })
    .await;
    assert!(
        previewing.elapsed() >= Duration::from_secs(2),
        "promoted before the delay"
    );

    // Abort before the switch: the active revision stays.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"strategy": {"blueGreen": {"autoPromotion": null}}}})),
    )
    .await
    .unwrap();
    set_template(&api, "web:3", json!({})).await;
    wait_for("v3 in preview", Duration::from_secs(60), || async {
        status(&api).await?.canary_revision.filter(|c| *c != v2)
    })
    .await;
    plugin(&["abort", &format!("{}/web", ns.name)]);
    wait_for("aborted", Duration::from_secs(30), || async {
        status(&api).await?.aborted_at.map(|_| ())
    })
    .await;
    assert_eq!(selects(&ns, "web").await.as_deref(), Some(v2.as_str()));
    assert_ne!(v1, v2);
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn blue_green_through_a_gateway_api_route_switches_weights_at_once() {
    let ns = TestNamespace::new("bggw").await;
    let _controller = start_controller(&ns.name).await;
    web_services(&ns, &["web", "web-preview"]).await;
    let route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": ns.name},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"name": "main",
            "backendRefs": [{"name": "web", "port": 80, "weight": 100}, {"name": "web-preview", "port": 80, "weight": 0}]}]}});
    create(&ns, &route).await.unwrap();
    let r = WebRollout::blue_green(&ns.name, json!({}))
        .blue_green_routing(json!({"gatewayAPI": {"httpRoute": {"name": "web"}}}));
    create(&ns, &r.json()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let v1 = healthy(&api).await;
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ));
    let routes: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let preview_weight = || async {
        routes.get("web").await.ok()?.data["spec"]["rules"][0]["backendRefs"][1]["weight"].as_i64()
    };

    set_template(&api, "web:2", json!({})).await;
    let v2 = wait_for("v2 ready in preview", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        (s.phase == Some(RolloutPhase::Paused)).then_some(s.canary_revision?)
    })
    .await;
    assert_eq!(preview_weight().await, Some(0));
    // The preview Service moves after the status records the new revision.
    wait_for(
        "the preview Service on v2",
        Duration::from_secs(15),
        || async { (selects(&ns, "web-preview").await? == v2).then_some(()) },
    )
    .await;
    plugin(&["promote", &format!("{}/web", ns.name)]);
    wait_for(
        "switched: active Service on v2, all weight back on the active backend",
        Duration::from_secs(30),
        || async {
            let s = status(&api).await?;
            (s.stable_revision.as_deref() == Some(v2.as_str())
                && selects(&ns, "web").await? == v2
                && preview_weight().await? == 0)
                .then_some(())
        },
    )
    .await;
    assert_ne!(v1, v2);
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn without_a_router_the_weight_follows_replica_counts() {
    let ns = TestNamespace::new("norouter").await;
    let _controller = start_controller(&ns.name).await;
    let r = WebRollout::canary(&ns.name, json!([{"setWeight": 50}, {"pause": {}}]))
        .routing(Routing::None);
    create(&ns, &r.json()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let v1 = healthy(&api).await;
    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    let s = status(&api).await.unwrap();
    let v2 = s.canary_revision.clone().unwrap();
    let rs_api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let size = |hash: String| {
        let rs_api = rs_api.clone();
        async move {
            rs_api
                .get(&format!("web-{hash}"))
                .await
                .ok()?
                .spec?
                .replicas
        }
    };
    assert_eq!(
        size(v1.clone()).await,
        Some(2),
        "stable shrinks to make room"
    );
    assert_eq!(size(v2.clone()).await, Some(2));
    let weights = s.weights.unwrap();
    assert_eq!((weights.stable, weights.canary), (50, 50));
    plugin(&["promote", &format!("{}/web", ns.name)]);
    wait_for("promoted", Duration::from_secs(60), || async {
        let s = status(&api).await?;
        (s.stable_revision.as_deref() == Some(v2.as_str())
            && s.phase == Some(RolloutPhase::Healthy))
        .then_some(())
    })
    .await;
    assert_eq!(size(v2).await, Some(4));
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_missing_virtual_service_degrades_with_its_name() {
    let ns = TestNamespace::new("missing").await;
    let _controller = start_controller(&ns.name).await;
    create(&ns, &service(&ns.name, "web")).await.unwrap();
    create(
        &ns,
        &WebRollout::canary(&ns.name, json!([{"setWeight": 50}])).json(),
    )
    .await
    .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let message = wait_for("Degraded", Duration::from_secs(30), || async {
        let s = status(&api).await?;
        (s.phase == Some(RolloutPhase::Degraded)).then_some(s.message?)
    })
    .await;
    assert!(
        message.contains(&format!("VirtualService {}/web not found", ns.name)),
        "{message}"
    );
    // The stable revision still runs in full.
    let rs_api: Api<ReplicaSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let stable = status(&api).await.unwrap().stable_revision.unwrap();
    wait_for("stable pods", Duration::from_secs(30), || async {
        (rs_api
            .get(&format!("web-{stable}"))
            .await
            .ok()?
            .spec?
            .replicas?
            == 4)
            .then_some(())
    })
    .await;
    ns.delete().await;
}

/// The Rollout controller in-process with a client that counts its requests, and its context
/// (for the reconcile count).
async fn start_counted_controller(
    ns: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::sync::Arc<sluice::context::Context>,
    sluice::k8s::requests::RequestCounts,
) {
    let counts = sluice::k8s::requests::RequestCounts::default();
    let config = kube::Config::infer().await.unwrap();
    let client = kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&sluice::k8s::requests::CountingLayer(counts.clone()))
        .build();
    let settings = sluice::context::Settings::local(Some(ns.to_string()), Some(prometheus_url()));
    let ctx = std::sync::Arc::new(sluice::context::Context::for_tests(client, settings));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(sluice::rollout::run(ctx.clone(), stop_rx, None));
    (stop, ctx, counts)
}

/// The sum of a metric's series whose labels include `controller="rollout"`.
fn rollout_metric(ctx: &sluice::context::Context, name: &str) -> f64 {
    let text = ctx.metrics().encode().unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains("controller=\"rollout\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

fn reconciles(ctx: &sluice::context::Context) -> f64 {
    rollout_metric(ctx, "sluice_reconcile_duration_seconds_count{")
}

fn requests(counts: &sluice::k8s::requests::RequestCounts, verb: &str, resource: &str) -> u64 {
    counts
        .get_or_create(&sluice::k8s::requests::RequestLabels {
            verb: verb.into(),
            resource: resource.into(),
        })
        .get()
}

const ROUTED: [&str; 3] = ["virtualservices", "destinationrules", "services"];

fn routing_gets(counts: &sluice::k8s::requests::RequestCounts) -> Vec<u64> {
    ROUTED.iter().map(|r| requests(counts, "get", r)).collect()
}

/// Wakes the Rollout with a change that asks for no decision (an annotation, on the Rollout
/// or on its VirtualService) and waits until a reconcile has run.
async fn touch(ctx: &sluice::context::Context, object: &Api<DynamicObject>, n: usize) {
    let started = reconciles(ctx);
    let patch = Patch::Merge(json!({"metadata": {"annotations": {"touched": n.to_string()}}}));
    object
        .patch("web", &PatchParams::default(), &patch)
        .await
        .unwrap();
    wait_for("a reconcile", Duration::from_secs(30), || async {
        (reconciles(ctx) > started).then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_reconcile_with_nothing_to_do_reads_no_routing_object() {
    let ns = TestNamespace::new("quiet").await;
    let (_controller, ctx, counts) = start_counted_controller(&ns.name).await;
    // Host-level routing: the Rollout reads a VirtualService and two Services.
    web_services(&ns, &["web-stable", "web-canary"]).await;
    let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": ns.name},
        "spec": {"hosts": ["web"], "http": [{"name": "primary", "route": [
            {"destination": {"host": "web-stable"}, "weight": 100},
            {"destination": {"host": "web-canary"}, "weight": 0}]}]}});
    create(&ns, &vs).await.unwrap();
    let rollout = WebRollout::canary(&ns.name, json!([{"setWeight": 50}, {"pause": {}}]))
        .routing(Routing::IstioHosts);
    create(&ns, &rollout.json()).await.unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    healthy(&api).await;
    let rollout_api: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::erase::<Rollout>(&()),
    );
    let vs_api: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &virtual_service_resource());
    // Until the watches show Sluice's last writes, a read is rightly fresh: wake the Rollout
    // until one reconcile reads nothing.
    let mut warm = false;
    for n in 0..20 {
        let before = routing_gets(&counts);
        touch(&ctx, &rollout_api, n).await;
        if routing_gets(&counts) == before {
            warm = true;
            break;
        }
    }
    assert!(
        warm,
        "no reconcile of 20 ran without reading a routing object"
    );
    let (before, errors) = (
        routing_gets(&counts),
        rollout_metric(&ctx, "sluice_reconcile_errors_total{"),
    );
    for n in 100..106 {
        let object = if n % 2 == 0 { &rollout_api } else { &vs_api };
        touch(&ctx, object, n).await;
    }
    assert!(
        requests(&counts, "apply", "rollouts/status") > 0,
        "the client counts the controller's requests"
    );
    assert_eq!(
        rollout_metric(&ctx, "sluice_reconcile_errors_total{"),
        errors,
        "the reconciles ran to the end"
    );
    assert_eq!(
        routing_gets(&counts),
        before,
        "GETs of {ROUTED:?} during six reconciles with nothing to do"
    );
    // The copies are the cluster's: a weight or a selector changed by hand is put back.
    let mut changed = vs_api.get("web").await.unwrap();
    changed.data["spec"]["http"][0]["route"][0]["weight"] = json!(70);
    changed.data["spec"]["http"][0]["route"][1]["weight"] = json!(30);
    vs_api
        .replace("web", &PostParams::default(), &changed)
        .await
        .unwrap();
    wait_for("the weight put back", Duration::from_secs(30), || async {
        (canary_weight(&ns).await? == 0).then_some(())
    })
    .await;
    let selected = selects(&ns, "web-canary").await;
    assert!(
        selected.is_some(),
        "Sluice points the canary Service at a revision"
    );
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let patch =
        Patch::Merge(json!({"spec": {"selector": {"sluice.dev/pod-template-hash": "elsewhere"}}}));
    services
        .patch("web-canary", &PatchParams::default(), &patch)
        .await
        .unwrap();
    wait_for("the selector put back", Duration::from_secs(30), || async {
        (selects(&ns, "web-canary").await == selected).then_some(())
    })
    .await;
    ns.delete().await;
}
