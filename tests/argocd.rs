//! A real ArgoCD (built from its Go module, started by `make argocd-up`) syncs a Rollout and
//! its routing from a git repository on this machine, with automated sync, self-heal and
//! prune, while Sluice canaries each commit. `make test` runs this binary on its own, after
//! `make argocd-up` (see docs/gitops.md for the exact configuration).
//!
//! What it proves:
//! - with the `ignoreDifferences` and `RespectIgnoreDifferences=true` of docs/gitops.md, the
//!   Application never reports a routing object OutOfSync, and ArgoCD never writes the
//!   VirtualService after creating it (no reverted weight);
//! - the Application's health follows Sluice's Lua health checks (Progressing, Suspended at a
//!   pause, Healthy, Degraded after an abort);
//! - ArgoCD's resource actions `promote` and `abort` steer the release through the status;
//! - a Pipeline's `argoCD` gate reads this real Application before it admits a release.

#[path = "chaos/audit.rs"]
mod audit;
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use sluice::api::pipeline::{HistoryAction, Pipeline};
use sluice::api::rollout::{PauseReason, Rollout, RolloutPhase};
use support::*;

fn argocd_url() -> String {
    std::env::var("SLUICE_ARGOCD_URL").unwrap_or_else(|_| "http://127.0.0.1:18080".into())
}

fn repo_url() -> String {
    std::env::var("SLUICE_ARGOCD_REPO").unwrap_or_else(|_| {
        concat!(
            "file://",
            env!("CARGO_MANIFEST_DIR"),
            "/e2e/.work/argocd/repo.git"
        )
        .into()
    })
}

fn application_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "argoproj.io",
        "v1alpha1",
        "Application",
    ))
}

/// A clone of the test repository; each test writes only under its own directory.
struct Checkout {
    dir: PathBuf,
    path: String,
}

impl Checkout {
    fn new(path: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-argocd-{path}"));
        let _ = std::fs::remove_dir_all(&dir);
        git(
            &std::env::temp_dir(),
            &["clone", "-q", &repo_url(), dir.to_str().unwrap()],
        );
        Self {
            dir,
            path: path.to_string(),
        }
    }

    /// Writes each object as `<path>/<file>.json`, commits and pushes.
    fn commit(&self, message: &str, objects: &[(&str, Value)]) {
        let root = self.dir.join(&self.path);
        std::fs::create_dir_all(&root).unwrap();
        for (file, object) in objects {
            let text = serde_json::to_string_pretty(object).unwrap();
            std::fs::write(root.join(format!("{file}.json")), text).unwrap();
        }
        git(&self.dir, &["add", "-A"]);
        git(
            &self.dir,
            &[
                "-c",
                "user.name=sluice-e2e",
                "-c",
                "user.email=e2e@sluice.invalid",
                "commit",
                "-q",
                "-m",
                message,
            ],
        );
        // Another test may have pushed meanwhile: rebase on it (different directories).
        for _ in 0..5 {
            if Command::new("git")
                .current_dir(&self.dir)
                .args(["push", "-q", "origin", "HEAD:main"])
                .status()
                .unwrap()
                .success()
            {
                return;
            }
            git(&self.dir, &["pull", "-q", "--rebase", "origin", "main"]);
        }
        panic!("could not push to {}", repo_url());
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("git is installed (make argocd-up installs it)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the Application said at one moment.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    sync: String,
    health: String,
    out_of_sync: BTreeSet<String>,
}

async fn application(api: &Api<DynamicObject>, name: &str) -> Option<Seen> {
    let app = api.get(name).await.ok()?;
    let status = &app.data["status"];
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    Some(Seen {
        sync: text(&status["sync"]["status"]),
        health: text(&status["health"]["status"]),
        out_of_sync: status["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["status"] == "OutOfSync")
            .map(|r| format!("{}/{}", text(&r["kind"]), text(&r["name"])))
            .collect(),
    })
}

/// Polls the Application every 100 ms and keeps every change.
fn record(api: Api<DynamicObject>, name: String) -> Arc<Mutex<Vec<(Instant, Seen)>>> {
    let seen = Arc::new(Mutex::new(Vec::<(Instant, Seen)>::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        loop {
            if let Some(now) = application(&api, &name).await {
                let mut all = sink.lock().unwrap();
                if all.last().map(|(_, last)| last) != Some(&now) {
                    all.push((Instant::now(), now));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    seen
}

/// Asks ArgoCD to look at git now rather than at its next poll.
async fn refresh(api: &Api<DynamicObject>, name: &str) {
    let patch = json!({"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn health_is(api: &Api<DynamicObject>, name: &str, health: &str) -> Instant {
    wait_for(
        &format!("Application {name} {health}"),
        Duration::from_secs(90),
        || async {
            let seen = application(api, name).await?;
            (seen.health == health && seen.sync == "Synced").then(Instant::now)
        },
    )
    .await
}

/// The ArgoCD API server's HTTP API (started with --disable-auth on loopback).
async fn argocd(method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let http = reqwest::Client::new();
    let mut request = http.request(method, format!("{}{path}", argocd_url()));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("the ArgoCD API server answers");
    let code = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(code.is_success(), "ArgoCD {path}: {code}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Which Rollout actions ArgoCD offers now, by name: enabled or not.
async fn offered_actions(app: &str, ns: &str) -> Vec<(String, bool)> {
    let listed = argocd(
        reqwest::Method::GET,
        &format!(
            "/api/v1/applications/{app}/resource/actions?appNamespace=argocd&namespace={ns}\
             &resourceName=web&version=v1alpha1&group=sluice.dev&kind=Rollout"
        ),
        None,
    )
    .await;
    let mut out: Vec<(String, bool)> = listed["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().to_string(),
                a["disabled"] != true,
            )
        })
        .collect();
    out.sort();
    out
}

/// Runs an ArgoCD resource action on the `web` Rollout, as the UI or `argocd app actions run`.
async fn run_action(app: &str, ns: &str, action: &str) {
    argocd(
        reqwest::Method::POST,
        &format!("/api/v1/applications/{app}/resource/actions/v2"),
        Some(json!({
            "name": app, "appNamespace": "argocd", "namespace": ns, "resourceName": "web",
            "version": "v1alpha1", "group": "sluice.dev", "kind": "Rollout", "action": action
        })),
    )
    .await;
}

fn manifests(ns: &str, image: &str) -> Vec<(&'static str, Value)> {
    // A timed pause (Progressing), then a pause that waits for a person (Suspended).
    let mut rollout = WebRollout::canary(
        ns,
        json!([{"setWeight": 20}, {"pause": {"duration": "3s"}}, {"setWeight": 50}, {"pause": {}}]),
    )
    .json();
    rollout["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
    let mut destination_rule = destination_rule(ns, "web", "x", "x");
    for subset in destination_rule["spec"]["subsets"].as_array_mut().unwrap() {
        subset["labels"]
            .as_object_mut()
            .unwrap()
            .remove("sluice.dev/pod-template-hash");
    }
    vec![
        ("rollout", rollout),
        ("service", service(ns, "web")),
        ("destinationrule", destination_rule),
        ("virtualservice", virtual_service(ns, "web", 100)),
    ]
}

#[tokio::test]
#[ignore = "needs the local cluster and ArgoCD: make test"]
async fn argocd_syncs_while_sluice_canaries_and_its_actions_and_health_follow_the_release() {
    let ns = TestNamespace::new("argocd").await;
    let name = ns.name.clone();
    let _controllers = start_controllers(&ns.name, prometheus_url()).await;
    let rollouts: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let apps: Api<DynamicObject> =
        Api::namespaced_with(ns.client.clone(), "argocd", &application_resource());

    // Git holds the Rollout at web:1 and its routing in the resting state (100/0, no hash).
    let checkout = Checkout::new(&name);
    checkout.commit("web:1", &manifests(&name, "web:1"));
    let application = json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
        "metadata": {"name": name, "namespace": "argocd"},
        "spec": {
            "project": "default",
            "source": {"repoURL": repo_url(), "targetRevision": "main", "path": name},
            // The local cluster as `argocd-up` registers it (ArgoCD runs outside it).
            "destination": {"name": "sluice-local", "namespace": name},
            // Exactly what docs/gitops.md tells users. Without it, ArgoCD v3.2 reports the
            // VirtualService OutOfSync during a release and self-heal puts git's weights back
            // (measured: 5 reverting patches in one release): its three-way JSON merge patch
            // replaces the `http` list whole.
            "ignoreDifferences": [
                {"group": "networking.istio.io", "kind": "VirtualService", "name": "web",
                 "jqPathExpressions": [".spec.http[].route[].weight"]},
                {"group": "networking.istio.io", "kind": "DestinationRule", "name": "web",
                 "jqPathExpressions": [".spec.subsets[].labels[\"sluice.dev/pod-template-hash\"]"]}
            ],
            "syncPolicy": {"automated": {"prune": true, "selfHeal": true},
                           "syncOptions": ["RespectIgnoreDifferences=true"]}
        }
    });
    let created = Instant::now();
    apps.create(
        &Default::default(),
        &serde_json::from_value(application).unwrap(),
    )
    .await
    .unwrap();
    let first_healthy = health_is(&apps, &name, "Healthy").await;
    println!(
        "first sync: Application Synced and Healthy {:?} after it was created",
        first_healthy - created
    );
    let stable = healthy(&rollouts).await;
    let after_first_sync = audit::now_us();
    let seen = record(apps.clone(), name.clone());

    // The prod stage's gate reads this Application. The Pipeline is not in the Application
    // itself: a gate that waits for an Application to be Healthy must not make it Progressing.
    let pipelines: Api<Pipeline> = Api::namespaced(ns.client.clone(), &ns.name);
    create(
        &ns,
        &json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Pipeline",
                "metadata": {"name": "web"},
                "spec": {"stages": [{"name": "prod", "rollouts": [{"namespace": name, "name": "web"}],
                                     "gates": {"argoCD": {"application": name, "namespace": "argocd"}}}]}}),
    )
    .await
    .unwrap();
    wait_for(
        "the stage adopts web:1",
        Duration::from_secs(30),
        || async {
            let status = pipelines.get("web").await.ok()?.status?;
            let stage = status.stages.first()?;
            (stage.release.as_ref()?.images == vec!["web:1".to_string()]).then_some(())
        },
    )
    .await;

    // Release web:2 by a commit. ArgoCD syncs the Rollout, the Pipeline holds it until its
    // gate sees the Application Synced and Healthy with web:2, then Sluice canaries it.
    let committed = Instant::now();
    checkout.commit("web:2", &manifests(&name, "web:2"));
    refresh(&apps, &name).await;
    let (admitted, reason) = wait_for("prod admits web:2", Duration::from_secs(90), || async {
        let status = pipelines.get("web").await.ok()?.status?;
        let entry = status.history.iter().find(|h| {
            h.stage == "prod"
                && h.action == HistoryAction::Promoted
                && h.release.images == vec!["web:2".to_string()]
        })?;
        Some((Instant::now(), entry.reason.clone().unwrap_or_default()))
    })
    .await;
    println!(
        "commit -> prod admitted web:2: {:?}; the gates said: {reason}",
        admitted - committed
    );
    // The admission records the verdicts that let it through.
    assert!(
        reason.contains(&format!("argocd/{name} is Synced and Healthy with web:2")),
        "the argoCD gate judged the real Application: {reason}"
    );
    at_step(&rollouts, 3, RolloutPhase::Paused).await;
    let suspended = health_is(&apps, &name, "Suspended").await;
    assert_canary_weight(&ns, 50).await;
    println!(
        "commit -> Application Suspended at the pause: {:?}",
        suspended - committed
    );

    // ArgoCD offers what applies at a pause, and `promote` releases it.
    let offered = offered_actions(&name, &name).await;
    assert_eq!(
        offered,
        vec![
            ("abort".to_string(), true),
            ("pause".to_string(), true),
            ("promote".to_string(), true),
            ("promote-full".to_string(), true),
            ("resume".to_string(), false),
            ("retry".to_string(), false),
        ]
    );
    let promoted = Instant::now();
    run_action(&name, &name, "promote").await;
    let released = wait_for("web:2 stable", Duration::from_secs(60), || async {
        let s = status(&rollouts).await?;
        (s.phase == Some(RolloutPhase::Healthy) && s.stable_revision.as_deref() != Some(&stable))
            .then(Instant::now)
    })
    .await;
    health_is(&apps, &name, "Healthy").await;
    assert_canary_weight(&ns, 0).await;
    let promote = rollouts.get("web").await.unwrap().status.unwrap().promote;
    assert_eq!(
        promote.and_then(|p| p.requested_by).as_deref(),
        Some("argocd"),
        "the action records ArgoCD, not the person"
    );
    println!("promote action -> web:2 stable: {:?}", released - promoted);

    // web:3 is aborted through ArgoCD at its pause: traffic back on web:2.
    checkout.commit("web:3", &manifests(&name, "web:3"));
    refresh(&apps, &name).await;
    at_step(&rollouts, 3, RolloutPhase::Paused).await;
    assert_canary_weight(&ns, 50).await;
    let abort = Instant::now();
    run_action(&name, &name, "abort").await;
    assert_canary_weight(&ns, 0).await;
    let on_stable = Instant::now();
    let degraded = health_is(&apps, &name, "Degraded").await;
    let s = status(&rollouts).await.unwrap();
    assert!(s.aborted_at.is_some());
    // ArgoCD records who ran the action in an Event on the Rollout.
    expect_events(&ns, &["ResourceActionRan"]).await;
    assert!(
        !s.pause_conditions
            .iter()
            .any(|p| p.reason == PauseReason::PipelineGate)
    );
    println!(
        "abort action -> canary weight 0: {:?}; -> Application Degraded: {:?}",
        on_stable - abort,
        degraded - abort
    );

    // Nothing Sluice owns ever showed as drift, and ArgoCD never wrote the VirtualService
    // after creating it, so no weight was reverted.
    // The recorder polls on its own: let it see the last state too.
    wait_for(
        "the recorder sees Degraded",
        Duration::from_secs(5),
        || async {
            let last = seen.lock().unwrap().last().map(|(_, s)| s.health.clone());
            (last.as_deref() == Some("Degraded")).then_some(())
        },
    )
    .await;
    let history = seen.lock().unwrap().clone();
    let drift: BTreeSet<String> = history
        .iter()
        .flat_map(|(_, s)| s.out_of_sync.iter().cloned())
        .collect();
    assert!(
        drift.iter().all(|r| r.starts_with("Rollout/")),
        "only git's own change (the Rollout) may be OutOfSync, saw {drift:?}"
    );
    let healths: Vec<&str> = history.iter().map(|(_, s)| s.health.as_str()).collect();
    println!("Application health after the first sync: {healths:?}; OutOfSync seen: {drift:?}");
    let mut order = healths.iter().copied().filter(|h| !h.is_empty());
    for expected in ["Progressing", "Suspended", "Healthy", "Degraded"] {
        assert!(
            order.any(|h| h == expected),
            "Application health went {healths:?}, expected Progressing, Suspended, Healthy, Degraded in that order"
        );
    }
    let writes: Vec<audit::Write> = audit::writes(&name, "")
        .into_iter()
        .filter(|w| w.resource == "virtualservices" && w.received_us > after_first_sync)
        .collect();
    let by_argocd = writes
        .iter()
        .filter(|w| w.user_agent.contains("argocd"))
        .count();
    println!(
        "VirtualService writes after the first sync: {} by Sluice, {by_argocd} by ArgoCD",
        writes.len() - by_argocd
    );
    if audit::enabled() {
        assert!(writes.len() - by_argocd >= 4, "Sluice moved the weights");
        assert_eq!(by_argocd, 0, "ArgoCD wrote the VirtualService: {writes:#?}");
    }

    let _ = apps.delete(&name, &Default::default()).await;
    ns.delete().await;
}
