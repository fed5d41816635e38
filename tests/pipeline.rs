//! The Pipeline controller with the Rollout and ErrorBudget controllers, cluster-wide, against
//! the local cluster, Prometheus, the simulator and the approval admission policy. `make test`
//! runs this binary on its own (its controllers watch every namespace).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice::api::errorbudget::{BudgetPhase, ErrorBudget};
use sluice::api::pipeline::{HistoryAction, Pipeline, PipelineStatus, StagePhase, StageStatus};
use sluice::api::rollout::{PauseReason, Rollout, RolloutPhase};
use support::*;

async fn pipeline_status(api: &Api<Pipeline>) -> Option<PipelineStatus> {
    api.get("web").await.ok()?.status
}

fn stage<'a>(status: &'a PipelineStatus, name: &str) -> Option<&'a StageStatus> {
    status.stages.iter().find(|s| s.name == name)
}

fn image(tag: u32) -> String {
    format!("web:{tag}")
}

/// The release (images) a stage runs, as one string.
fn runs(status: &PipelineStatus, name: &str) -> Option<String> {
    stage(status, name)?
        .release
        .as_ref()
        .map(|r| r.images.join(","))
}

/// Waits until the stage `name` satisfies `check`.
async fn stage_is(
    api: &Api<Pipeline>,
    name: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&StageStatus) -> bool,
) -> StageStatus {
    let last = std::sync::Mutex::new(None);
    let found = tokio::time::timeout(
        within,
        wait_for(&format!("stage {name}: {what}"), within * 2, || async {
            let status = pipeline_status(api).await?;
            *last.lock().unwrap() = Some(status.clone());
            stage(&status, name).filter(|s| check(s)).cloned()
        }),
    )
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out after {within:?} waiting for stage {name}: {what}; last seen {:#?}",
            last.lock().unwrap()
        )
    })
}

async fn whoami(client: &kube::Client) -> String {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    api.create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap()
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap()
}

/// Writes an approval of `tag` for prod as `client`, claiming to be `claimed`.
async fn approve_as(
    client: &kube::Client,
    namespace: &str,
    tag: u32,
    claimed: &str,
) -> Result<(), String> {
    let api: Api<Pipeline> = Api::namespaced(client.clone(), namespace);
    let patch = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Pipeline",
        "status": {"approvals": [{
            "stage": "prod", "release": {"images": [image(tag)]},
            "intent": {"id": format!("forged-{claimed}"), "requestedAt": "2026-01-01T00:00:00Z",
                       "requestedBy": claimed}
        }]}
    });
    api.patch_status(
        "web",
        &PatchParams::apply("someone-else").force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

async fn set_error_rate(ns: &TestNamespace, rate: &str) {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let patch = json!({"metadata": {"annotations": {"sim.sluice.dev/error-rate": rate}}});
    for pod in pods.list(&ListParams::default()).await.unwrap() {
        let name = pod.metadata.name.unwrap_or_default();
        let _ = pods
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
}

/// The release starts in `api`'s Rollout: `tag` is its canary, or already its stable.
async fn release_started(api: &Api<Rollout>, tag: u32, within: Duration) -> Instant {
    let want = {
        let rollout = api.get("web").await.unwrap();
        sluice::rollout::revision::template_hash(&rollout.spec.template)
    };
    let image_now = api
        .get("web")
        .await
        .unwrap()
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone();
    assert_eq!(image_now, Some(image(tag)));
    wait_for(&format!("{} released", image(tag)), within, || async {
        let s = status(api).await?;
        (s.canary_revision.as_deref() == Some(&want) || s.stable_revision.as_deref() == Some(&want))
            .then(Instant::now)
    })
    .await
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_release_moves_dev_staging_prod_behind_soak_budget_and_a_verified_approval() {
    let controllers = start_controllers_in(None, prometheus_url()).await;
    let home = TestNamespace::new("pl").await;
    let dev = TestNamespace::new("pl-dev").await;
    let staging = TestNamespace::new("pl-staging").await;
    let prod = TestNamespace::new("pl-prod").await;
    for ns in [&dev, &staging, &prod] {
        routing(ns).await;
    }
    // The Pipeline's transitions, as CloudEvents to a local receiver.
    let (receiver, address) = receiver::Receiver::start().await;
    receiver::notifier(
        &home,
        "events",
        &format!("{address}/events/{}", receiver::TOKEN),
        json!({"webhook": {"urlSecretRef": receiver::secret_ref("events")},
               "kinds": ["Pipeline"],
               "events": ["StagePromoted", "StageWaitingForApproval", "Approved"]}),
    )
    .await;
    let quick = json!([{"setWeight": 50}, {"pause": {"duration": "1s"}}]);
    let (dev_api, _) = healthy_rollout(&dev, quick.clone()).await;
    let (staging_api, _) = healthy_rollout(
        &staging,
        json!([{"setWeight": 50}, {"pause": {"duration": "4s"}}]),
    )
    .await;
    let (prod_api, _) = healthy_rollout(&prod, quick).await;
    let rollouts = [&dev_api, &staging_api, &prod_api];
    let set_all = |tag: u32| async move {
        for api in rollouts {
            set_template(api, &image(tag), json!({})).await;
        }
    };

    // prod's budget: 90% over 20 s, so it freezes and thaws within the test.
    let (errors, total) = ratio_queries(&prod.name);
    let slo = json!({"window": "20s", "burnRateWindows": ["10s"], "targets": []});
    create(&prod, &budget(&prod.name, "avail", &errors, &total, slo))
        .await
        .unwrap();
    let budgets: Api<ErrorBudget> = Api::namespaced(prod.client.clone(), &prod.name);
    wait_for("prod budget Healthy", Duration::from_secs(60), || async {
        let s = budgets.get("avail").await.ok()?.status?;
        (s.phase == Some(BudgetPhase::Healthy)).then_some(())
    })
    .await;

    let admin = whoami(&home.client).await;
    let pipeline = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Pipeline",
        "metadata": {"name": "web", "namespace": home.name},
        "spec": {"stages": [
            {"name": "dev", "rollouts": [{"namespace": dev.name, "name": "web"}]},
            {"name": "staging", "rollouts": [{"namespace": staging.name, "name": "web"}],
             "gates": {"soak": "8s"}},
            {"name": "prod", "rollouts": [{"namespace": prod.name, "name": "web"}],
             "gates": {"soak": "5s",
                       "approval": {"required": true, "approvers": {"users": [admin]}},
                       "errorBudgets": [{"namespace": prod.name, "name": "avail",
                                         "minRemainingPercent": 20}]}}
        ]}
    });
    create(&home, &pipeline).await.unwrap();
    let pipelines: Api<Pipeline> = Api::namespaced(home.client.clone(), &home.name);
    // What already runs is adopted.
    for name in ["dev", "staging", "prod"] {
        stage_is(
            &pipelines,
            name,
            "Healthy on web:1",
            Duration::from_secs(30),
            |s| {
                s.phase == StagePhase::Healthy
                    && s.release.as_ref().map(|r| r.images.clone()) == Some(vec![image(1)])
            },
        )
        .await;
    }

    // Git declares web:2 everywhere at once. dev releases at once; staging waits.
    set_all(2).await;
    let held = wait_for(
        "staging held by the Pipeline",
        Duration::from_secs(30),
        || async {
            let s = status(&staging_api).await?;
            s.pause_conditions
                .iter()
                .any(|c| c.reason == PauseReason::PipelineGate)
                .then_some(s.message?)
        },
    )
    .await;
    assert!(held.contains(&format!("{}/web", home.name)), "{held}");
    let dev_healthy = stage_is(
        &pipelines,
        "dev",
        "Healthy on web:2",
        Duration::from_secs(60),
        |s| {
            s.phase == StagePhase::Healthy
                && s.release.as_ref().map(|r| r.images.clone()) == Some(vec![image(2)])
        },
    )
    .await;
    let soak_from = dev_healthy.since.clone().unwrap();

    // The operator restarts in the middle of staging's soak: the soak keeps its start.
    controllers.send_replace(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let controllers = start_controllers_in(None, prometheus_url()).await;
    let soaking = stage_is(
        &pipelines,
        "staging",
        "soaking",
        Duration::from_secs(10),
        |s| s.phase == StagePhase::Soaking,
    )
    .await;
    assert!(
        soaking.gates.iter().any(|g| g.gate == "soak" && !g.passed),
        "{:?}",
        soaking.gates
    );
    assert_eq!(
        stage(&pipeline_status(&pipelines).await.unwrap(), "dev")
            .unwrap()
            .since,
        Some(soak_from.clone()),
        "dev's Healthy time survives the restart"
    );
    release_started(&staging_api, 2, Duration::from_secs(30)).await;
    let history = pipeline_status(&pipelines).await.unwrap().history;
    let admitted = history
        .iter()
        .rev()
        .find(|h| h.stage == "staging" && h.action == HistoryAction::Promoted)
        .expect("staging admission recorded");
    let soaked = admitted.time.0.duration_since(soak_from.0).as_secs_f64();
    assert!(
        (8.0..11.0).contains(&soaked),
        "admitted {soaked}s after dev became Healthy (soak 8s)"
    );

    // prod: soaked, budget fine, waiting for a person.
    stage_is(
        &pipelines,
        "prod",
        "waiting for approval",
        Duration::from_secs(60),
        |s| s.phase == StagePhase::WaitingForApproval,
    )
    .await;
    assert_eq!(status(&prod_api).await.unwrap().canary_revision, None);

    // Refused by the apiserver: a name that is not the caller's, a caller without the verb,
    // and a caller with the verb whom the stage does not name.
    let forged = approve_as(&home.client, &home.name, 2, "mallory").await;
    assert!(
        forged
            .as_ref()
            .is_err_and(|e| e.contains("not a name the client chooses")),
        "{forged:?}"
    );
    for sa in ["intruder", "approver"] {
        create(
            &home,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                               "metadata": {"name": sa, "namespace": home.name}}),
        )
        .await
        .unwrap();
    }
    create(
        &home,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "status-writer", "namespace": home.name},
        "rules": [{"apiGroups": ["sluice.dev"], "resources": ["pipelines", "pipelines/status"],
                   "verbs": ["get", "patch"]}]}),
    )
    .await
    .unwrap();
    let bind = |name: &str, kind: &str, role: &str, sa: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": name, "namespace": home.name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
               "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": home.name}]})
    };
    create(
        &home,
        &bind("intruder", "Role", "status-writer", "intruder"),
    )
    .await
    .unwrap();
    create(
        &home,
        &bind(
            "approver",
            "ClusterRole",
            "sluice-pipeline-approver",
            "approver",
        ),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let intruder = client_as("intruder", &home.name).await;
    let name = format!("system:serviceaccount:{}:intruder", home.name);
    let refused = approve_as(&intruder, &home.name, 2, &name).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("may not approve stages")),
        "{refused:?}"
    );
    let approver = client_as("approver", &home.name).await;
    let name = format!("system:serviceaccount:{}:approver", home.name);
    let refused = approve_as(&approver, &home.name, 2, &name).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("the stage names its approvers")),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&prod_api).await.unwrap().canary_revision, None);

    // The named approver approves, through the plugin: the apiserver's name is recorded.
    let asked = Instant::now();
    let out = plugin(&[
        "approve",
        &format!("pipeline/{}/web", home.name),
        "--stage",
        "prod",
        "--reason",
        "canary looked fine",
    ]);
    assert!(out.contains(&admin), "{out}");
    let started = release_started(&prod_api, 2, Duration::from_secs(30)).await;
    println!(
        "MEASURE approval written -> prod Rollout starts the release: {:?}",
        started.duration_since(asked)
    );
    let history = pipeline_status(&pipelines).await.unwrap().history;
    assert!(
        history.iter().any(|h| h.stage == "prod"
            && h.action == HistoryAction::Approved
            && h.by.as_deref() == Some(admin.as_str())),
        "{history:?}"
    );
    stage_is(
        &pipelines,
        "prod",
        "Healthy on web:2",
        Duration::from_secs(60),
        |s| s.phase == StagePhase::Healthy,
    )
    .await;
    // The notifications of web:2's way to prod: staging admitted, prod waiting for a person,
    // approved by them, admitted; each once and in that order.
    let sent = || -> Vec<(String, String)> {
        receiver
            .of("events")
            .iter()
            .map(|e| {
                let data = &e.body["data"]["sluice"];
                let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (text(&data["event"]), text(&data["message"]))
            })
            .filter(|(_, message)| message.contains(&image(2)))
            .collect()
    };
    wait_for(
        "prod's admission notified",
        Duration::from_secs(30),
        || async {
            sent()
                .iter()
                .any(|(e, m)| e == "StagePromoted" && m.contains("stage prod"))
                .then_some(())
        },
    )
    .await;
    let order: Vec<(String, String)> = sent()
        .into_iter()
        .filter(|(_, m)| m.contains("stage staging") || m.contains("stage prod"))
        .collect();
    let events: Vec<&str> = order.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        events,
        [
            "StagePromoted",
            "StageWaitingForApproval",
            "Approved",
            "StagePromoted"
        ],
        "{order:#?}"
    );
    assert!(order[0].1.contains("stage staging") && order[3].1.contains("stage prod"));
    assert!(order[2].1.contains(&admin), "{}", order[2].1);

    // web:3, then web:4 while staging soaks web:3: the soak starts over, web:3 never enters
    // staging.
    set_all(3).await;
    stage_is(
        &pipelines,
        "staging",
        "soaking web:3",
        Duration::from_secs(60),
        |s| {
            s.phase == StagePhase::Soaking
                && s.pending.as_ref().map(|r| r.images.clone()) == Some(vec![image(3)])
                && s.gates.iter().any(|g| {
                    g.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("soaked"))
                })
        },
    )
    .await;
    set_all(4).await;
    stage_is(
        &pipelines,
        "staging",
        "admitted web:4",
        Duration::from_secs(90),
        |s| s.release.as_ref().map(|r| r.images.clone()) == Some(vec![image(4)]),
    )
    .await;
    let history = pipeline_status(&pipelines).await.unwrap().history;
    assert!(
        !history.iter().any(|h| h.stage == "staging"
            && h.action == HistoryAction::Promoted
            && h.release.images == vec![image(3)]),
        "web:3 entered staging: {history:?}"
    );

    // prod waits for an approval of web:4: the one for web:2 does not carry over.
    stage_is(
        &pipelines,
        "prod",
        "waiting for approval of web:4",
        Duration::from_secs(90),
        |s| {
            s.phase == StagePhase::WaitingForApproval
                && s.pending.as_ref().map(|r| r.images.clone()) == Some(vec![image(4)])
        },
    )
    .await;

    // prod's budget burns: the stage shows Frozen even once approved; it thaws by itself.
    set_error_rate(&prod, "0.5").await;
    wait_for("prod budget spent", Duration::from_secs(60), || async {
        let s = budgets.get("avail").await.ok()?.status?;
        matches!(s.phase, Some(BudgetPhase::Exhausted | BudgetPhase::Frozen)).then_some(())
    })
    .await;
    let frozen = wait_for("prod Frozen", Duration::from_secs(30), || async {
        let status = pipeline_status(&pipelines).await?;
        let prod = stage(&status, "prod")?;
        if prod.phase != StagePhase::Frozen {
            println!("prod is {:?}: {:?}", prod.phase, prod.message);
        }
        (prod.phase == StagePhase::Frozen).then_some(prod.clone())
    })
    .await;
    assert!(
        frozen
            .message
            .as_deref()
            .is_some_and(|m| m.contains("avail")),
        "{:?}",
        frozen.message
    );
    plugin(&[
        "approve",
        &format!("pipeline/{}/web", home.name),
        "--stage",
        "prod",
    ]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = pipeline_status(&pipelines).await.unwrap();
    assert_eq!(stage(&still, "prod").unwrap().phase, StagePhase::Frozen);
    assert_eq!(
        runs(&pipeline_status(&pipelines).await.unwrap(), "prod"),
        Some(image(2))
    );
    set_error_rate(&prod, "0").await;
    let thawed = stage_is(
        &pipelines,
        "prod",
        "admitted web:4",
        Duration::from_secs(90),
        |s| s.release.as_ref().map(|r| r.images.clone()) == Some(vec![image(4)]),
    )
    .await;
    assert_ne!(thawed.phase, StagePhase::Frozen);

    // web:5 fails in staging: it never reaches prod.
    set_all(5).await;
    release_started(&staging_api, 5, Duration::from_secs(90)).await;
    plugin(&["abort", &format!("{}/web", staging.name)]);
    stage_is(
        &pipelines,
        "staging",
        "Failed",
        Duration::from_secs(30),
        |s| s.phase == StagePhase::Failed,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status_now = pipeline_status(&pipelines).await.unwrap();
    assert_eq!(
        runs(&status_now, "prod"),
        Some(image(4)),
        "web:5 reached prod"
    );
    assert_eq!(status(&prod_api).await.unwrap().canary_revision, None);
    let rollout_prod = status(&prod_api).await.unwrap();
    assert_eq!(rollout_prod.phase, Some(RolloutPhase::Paused));
    let view = plugin(&["pipeline", &format!("{}/web", home.name)]);
    assert!(
        view.contains("staging") && view.contains("Failed"),
        "{view}"
    );

    drop(controllers);
    for ns in [&dev, &staging, &prod, &home] {
        ns.delete().await;
    }
}

/// The `web` Application in `namespace` as ArgoCD would report it: Synced, Healthy, `images`.
async fn application(ns: &TestNamespace, deploys_to: &str, images: &[String]) {
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "argoproj.io",
        "v1alpha1",
        "Application",
    ));
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let app = json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
        "metadata": {"name": "web-prod", "namespace": ns.name},
        "spec": {"project": "default",
                 "destination": {"server": "https://kubernetes.default.svc", "namespace": deploys_to},
                 "source": {"repoURL": "https://example.invalid/deploy.git", "path": "prod"}},
        "status": {"sync": {"status": "Synced"}, "health": {"status": "Healthy"},
                   "summary": {"images": images}}
    });
    api.patch(
        "web-prod",
        &PatchParams::apply("argocd-application-controller").force(),
        &Patch::Apply(&app),
    )
    .await
    .unwrap();
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_deny_window_holds_a_release_until_it_ends_and_argocd_must_report_it() {
    let _controllers = start_controllers_in(None, prometheus_url()).await;
    let home = TestNamespace::new("plw").await;
    let dev = TestNamespace::new("plw-dev").await;
    let prod = TestNamespace::new("plw-prod").await;
    for ns in [&dev, &prod] {
        routing(ns).await;
    }
    let steps = json!([{"setWeight": 50}]);
    let (dev_api, _) = healthy_rollout(&dev, steps.clone()).await;
    let (prod_api, _) = healthy_rollout(&prod, steps).await;
    application(&home, &prod.name, &[image(1)]).await;

    // A deny window open now (this minute, UTC) that ends 25 s from now.
    let now = k8s_openapi::jiff::Timestamp::now();
    let zoned = now.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
    let into_minute = zoned.second() as i64;
    // The window opened at the start of this minute and lasts `into_minute + 25` whole seconds.
    let ends = k8s_openapi::jiff::Timestamp::from_second(now.as_second() + 25).unwrap();
    let pipeline = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Pipeline",
        "metadata": {"name": "web", "namespace": home.name},
        "spec": {"stages": [
            {"name": "dev", "rollouts": [{"namespace": dev.name, "name": "web"}]},
            {"name": "prod", "rollouts": [{"namespace": prod.name, "name": "web"}],
             "gates": {
                "windows": [{"kind": "deny",
                             "schedule": format!("{} {} * * *", zoned.minute(), zoned.hour()),
                             "duration": format!("{}s", into_minute + 25)}],
                "argoCD": {"application": "web-prod", "namespace": home.name}}}
        ]}
    });
    create(&home, &pipeline).await.unwrap();
    let pipelines: Api<Pipeline> = Api::namespaced(home.client.clone(), &home.name);
    for name in ["dev", "prod"] {
        stage_is(
            &pipelines,
            name,
            "adopted web:1",
            Duration::from_secs(30),
            |s| s.phase == StagePhase::Healthy,
        )
        .await;
    }
    for api in [&dev_api, &prod_api] {
        set_template(api, &image(2), json!({})).await;
    }
    let held = stage_is(
        &pipelines,
        "prod",
        "held by the window",
        Duration::from_secs(30),
        |s| s.pending.is_some() && s.gates.iter().any(|g| g.gate == "windows" && !g.passed),
    )
    .await;
    let windows = held.gates.iter().find(|g| g.gate == "windows").unwrap();
    assert!(
        windows
            .message
            .as_deref()
            .is_some_and(|m| m.contains("inside a deny window until") && m.contains("UTC")),
        "{windows:?}"
    );
    // ArgoCD has synced web:2 (as it would, from git).
    let argo = held
        .gates
        .iter()
        .find(|g| g.gate.starts_with("argoCD/"))
        .unwrap();
    assert!(!argo.passed, "{argo:?}");
    application(&home, &prod.name, &[image(2)]).await;

    let started = release_started(&prod_api, 2, Duration::from_secs(60)).await;
    let now = k8s_openapi::jiff::Timestamp::now();
    let after_end = now.duration_since(ends).as_secs_f64() - started.elapsed().as_secs_f64();
    assert!(
        after_end >= 0.0,
        "released {after_end}s before the window ended"
    );
    println!("MEASURE deny window ends -> prod Rollout starts the release: {after_end:.2}s");
    let admitted = pipeline_status(&pipelines).await.unwrap();
    let gates = &stage(&admitted, "prod").unwrap().gates;
    assert!(gates.iter().all(|g| g.passed), "{gates:?}");
    for ns in [&dev, &prod, &home] {
        ns.delete().await;
    }
}
