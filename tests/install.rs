//! Installing Sluice the two supported ways, against the local cluster: the Helm chart
//! (lint, a matrix of values the apiserver accepts, the restricted Pod Security Standard) and
//! the kustomize bases in `config/` (applied with kubectl's built-in kustomize, then the
//! controller runs as the ServiceAccount they create). Also the CRD upgrade from the previous
//! CRDs to the current ones. `make test` runs these first, one at a time: the upgrade test puts
//! older CRDs in place for a moment.

mod common;
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use sluice::api::rollout::{Rollout, RolloutPhase};
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn helm() -> PathBuf {
    Path::new(&kubectl()).with_file_name("helm")
}

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tool runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `helm template` of the chart as release `release` in `namespace` with `--set` values.
fn render_chart(release: &str, namespace: &str, set: &[&str]) -> Vec<Value> {
    let chart = format!("{ROOT}/charts/sluice");
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    for s in set {
        args.extend(["--set", s]);
    }
    let out = run(helm(), &args, None);
    assert!(
        out.status.success(),
        "helm template {set:?}: {}",
        text(&out)
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// A Pod from a Deployment's pod template, to put before Pod Security admission (without its
/// ServiceAccount, which is not there).
fn pod_of(deployment: &Value, name: &str) -> Value {
    let mut spec = deployment["spec"]["template"]["spec"].clone();
    spec.as_object_mut().unwrap().remove("serviceAccountName");
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

/// Server-side dry-run create in `namespace`: what admission says, without writing.
fn dry_run_create(namespace: &str, object: &Value) -> Output {
    run(
        kubectl(),
        &["create", "--dry-run=server", "-n", namespace, "-f", "-"],
        Some(&serde_json::to_string(object).unwrap()),
    )
}

#[test]
#[ignore = "needs the tools of the local cluster: make test"]
fn helm_lint_accepts_the_chart_and_refuses_typos_and_wrong_types() {
    let chart = format!("{ROOT}/charts/sluice");
    let lint = |set: &[&str]| {
        let mut args = vec![
            "lint",
            "--strict",
            &chart,
            "--set",
            "image.repository=r/sluice",
        ];
        for s in set {
            args.extend(["--set", s]);
        }
        run(helm(), &args, None)
    };
    let ok = lint(&[]);
    assert!(ok.status.success(), "{}", text(&ok));
    for (set, says) in [
        ("replica=3", "additional properties 'replica' not allowed"),
        ("replicas=two", "replicas"),
        ("logFormat=xml", "logFormat"),
        ("image.pullpolicy=Always", "'pullpolicy' not allowed"),
        ("image.digest=latest", "digest"),
        ("metrics.port=0", "port"),
        // --set makes 1 a number; an env var's value must be a string.
        ("extraEnv[0].name=A,extraEnv[0].value=1", "value"),
    ] {
        let refused = lint(&[set]);
        assert!(!refused.status.success(), "{set} was accepted");
        assert!(text(&refused).contains(says), "{set}: {}", text(&refused));
    }
}

/// Each set of values renders objects the apiserver accepts (server-side dry-run: schema,
/// defaulting and admission, without writing).
#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn every_values_set_renders_objects_the_apiserver_accepts() {
    let ns = TestNamespace::new("chart").await;
    let watched = TestNamespace::new("chart-watched").await;
    let digest = format!("image.digest=sha256:{}", "a".repeat(64));
    let watch = format!("watchNamespace={}", watched.name);
    let matrix: Vec<(&str, Vec<&str>)> = vec![
        ("defaults", vec![]),
        ("by digest", vec![&digest]),
        (
            "one namespace, one replica",
            vec![
                &watch,
                "replicas=1",
                "topologySpread.enabled=false",
                "podDisruptionBudget.enabled=false",
            ],
        ),
        (
            "everything on",
            vec![
                "metrics.serviceMonitor.enabled=true",
                "metrics.port=9090",
                "prometheusAddress=http://prometheus.monitoring:9090",
                "priorityClassName=system-cluster-critical",
                "extraArgs[0]=--lease-duration-seconds=20",
                "extraEnv[0].name=RUST_BACKTRACE",
                "extraEnv[0].value=full",
                "podAnnotations.team=platform",
                "nodeSelector.kubernetes\\.io/os=linux",
                "tolerations[0].operator=Exists",
                "serviceAccount.annotations.owner=platform",
                "imagePullSecrets[0].name=regcred",
                "topologySpread.whenUnsatisfiable=DoNotSchedule",
                "approvalPolicy.enabled=false",
                "dashboards.enabled=true",
            ],
        ),
    ];
    for (name, mut set) in matrix {
        set.push("image.repository=registry.example.com/sluice");
        let objects = render_chart("sluice", &ns.name, &set);
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        // Without the prometheus-operator CRDs here, the ServiceMonitor is checked by shape.
        let monitors = of_kind(&objects, "ServiceMonitor");
        let deployment = of_kind(&objects, "Deployment")[0];
        match name {
            "one namespace, one replica" => {
                assert!(
                    kinds.contains(&"Role") && !kinds.contains(&"ClusterRoleBinding"),
                    "{name}: {kinds:?}"
                );
                let role = objects
                    .iter()
                    .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "sluice-controller")
                    .unwrap();
                assert_eq!(role["metadata"]["namespace"], watched.name.as_str());
                assert!(!kinds.contains(&"PodDisruptionBudget"), "{name}: {kinds:?}");
            }
            "everything on" => {
                assert_eq!(monitors.len(), 1, "{name}: {kinds:?}");
                assert_eq!(monitors[0]["spec"]["endpoints"][0]["port"], "http");
                assert!(!kinds.contains(&"ValidatingAdmissionPolicy"), "{kinds:?}");
                let dashboards = of_kind(&objects, "ConfigMap");
                assert_eq!(dashboards.len(), 4, "one ConfigMap per dashboard");
                assert_eq!(
                    dashboards[0]["metadata"]["labels"]["grafana_dashboard"],
                    "1"
                );
                let container = &deployment["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(container["ports"][0]["containerPort"], 9090);
                assert_eq!(
                    container["args"],
                    json!(["controller", "--lease-duration-seconds=20"])
                );
            }
            "by digest" => assert_eq!(
                deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                format!("registry.example.com/sluice@sha256:{}", "a".repeat(64))
            ),
            _ => {
                assert!(kinds.contains(&"ClusterRole") && kinds.contains(&"PodDisruptionBudget"));
                assert!(monitors.is_empty());
            }
        }
        let rest: Vec<Value> = objects
            .iter()
            .filter(|o| o["kind"] != "ServiceMonitor")
            .cloned()
            .collect();
        let out = run(
            kubectl(),
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--dry-run=server",
                "--field-manager=sluice-chart-test",
                "-f",
                "-",
            ],
            Some(&to_yaml(&rest)),
        );
        assert!(out.status.success(), "{name}: {}", text(&out));
    }
    watched.delete().await;
    ns.delete().await;
}

/// The operator's pods (the chart's, its `helm test` pod, and kustomize's) are admitted in a
/// namespace that enforces the restricted Pod Security Standard; the same pod without its
/// security context is refused there (the check can fail).
#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn the_operator_pods_meet_the_restricted_pod_security_standard() {
    let ns = TestNamespace::new("restricted").await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ns.client.clone());
    namespaces
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"}}})),
        )
        .await
        .unwrap();
    let chart = render_chart("sluice", &ns.name, &["image.repository=r/sluice"]);
    let kustomized = kustomize(&format!("{ROOT}/config/default"));
    let mut pods = vec![
        ("chart", pod_of(of_kind(&chart, "Deployment")[0], "chart")),
        (
            "kustomize",
            pod_of(of_kind(&kustomized, "Deployment")[0], "kustomize"),
        ),
    ];
    let mut probe = of_kind(&chart, "Pod")[0].clone();
    probe["metadata"] = json!({"name": "probe"});
    pods.push(("helm test", probe));
    for (name, pod) in &pods {
        let out = dry_run_create(&ns.name, pod);
        assert!(out.status.success(), "{name}: {}", text(&out));
    }
    let mut bare = pods[0].1.clone();
    bare["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("securityContext");
    let refused = dry_run_create(&ns.name, &bare);
    assert!(
        !refused.status.success() && text(&refused).contains("violates PodSecurity"),
        "{}",
        text(&refused)
    );
    ns.delete().await;
}

/// Every kustomize base in config/ builds, and holds what its name says.
#[test]
#[ignore = "needs the tools of the local cluster: make test"]
fn every_kustomize_base_builds() {
    for (base, kinds) in [
        ("crd", &["CustomResourceDefinition"][..]),
        (
            "rbac",
            &[
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ],
        ),
        ("manager", &["Deployment", "Service", "PodDisruptionBudget"]),
        (
            "approvals",
            &[
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ],
        ),
        ("prometheus", &["ServiceMonitor"]),
        ("grafana", &["ConfigMap"]),
        (
            "samples",
            &["Namespace", "Rollout", "ErrorBudget", "Pipeline"],
        ),
        (
            "default",
            &[
                "Namespace",
                "CustomResourceDefinition",
                "Deployment",
                "ClusterRole",
            ],
        ),
    ] {
        let objects = kustomize(&format!("{ROOT}/config/{base}"));
        for kind in kinds {
            assert!(
                !of_kind(&objects, kind).is_empty(),
                "config/{base} has no {kind}"
            );
        }
    }
}

fn kustomize(dir: &str) -> Vec<Value> {
    let out = run(kubectl(), &["kustomize", dir], None);
    assert!(out.status.success(), "kustomize {dir}: {}", text(&out));
    documents(&String::from_utf8_lossy(&out.stdout))
}

/// A release and a person's abort through Istio in `ns`, by a controller that authenticates
/// as `as_operator`; then the Rollout's deletion runs its finalizer as it.
async fn release_and_abort_as(ns: &TestNamespace, as_operator: kube::Client) {
    let _controller = start_controller_as(&ns.name, prometheus_url(), as_operator).await;
    routing(ns).await;
    create(
        ns,
        &WebRollout::canary(&ns.name, json!([{"setWeight": 40}, {"pause": {}}])).json(),
    )
    .await
    .unwrap();
    let api: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    healthy(&api).await;
    set_template(&api, "web:2", json!({})).await;
    at_step(&api, 1, RolloutPhase::Paused).await;
    assert_canary_weight(ns, 40).await;
    plugin(&["abort", &format!("{}/web", ns.name)]);
    wait_for("back on stable", Duration::from_secs(30), || async {
        (canary_weight(ns).await? == 0).then_some(())
    })
    .await;
    expect_events(ns, &["AbortedByUser"]).await;
    api.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for("Rollout gone", Duration::from_secs(30), || async {
        api.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
}

/// Takes and renews the leader Lease `namespace/name` as `client`.
async fn leads_as(client: kube::Client, namespace: &str, name: &str) {
    let settings = sluice::leader::LeaseSettings {
        name: name.into(),
        namespace: namespace.into(),
        identity: "install-test".into(),
        lease_duration: Duration::from_secs(15),
        retry_period: Duration::from_secs(2),
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, namespace);
    for what in ["take", "renew"] {
        assert!(
            sluice::leader::try_lead(&leases, &settings).await.unwrap(),
            "{what} the Lease"
        );
    }
}

/// The Helm chart's RBAC is enough: the chart is rendered with the real helm, applied, and the
/// controller runs as its ServiceAccount (a token from the TokenRequest API) through a release,
/// an abort and the leader Lease.
#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn the_helm_charts_rbac_is_all_the_controller_needs() {
    let ns = TestNamespace::new("rbac").await;
    let release = format!("sluice-{}", ns.name);
    let objects = render_chart(
        &release,
        &ns.name,
        &["image.repository=example.invalid/sluice"],
    );
    // Everything but the pods (no image to run here): the RBAC, the Service, the budget.
    for object in objects
        .iter()
        .filter(|o| o["kind"] != "Deployment" && o["kind"] != "Pod")
    {
        match create(&ns, object).await {
            Ok(()) => {}
            // The approval policy and the approver role are cluster-wide, one per cluster.
            Err(e) if e.contains("already exists") => {}
            Err(e) => panic!("{}: {e}", object["kind"]),
        }
    }
    let as_operator = client_as(&release, &ns.name).await;
    leads_as(
        as_operator.clone(),
        &ns.name,
        &format!("{release}-controller"),
    )
    .await;
    release_and_abort_as(&ns, as_operator).await;
    for kind in ["clusterrolebinding", "clusterrole"] {
        let _ = run(
            kubectl(),
            &["delete", kind, &format!("{release}-controller")],
            None,
        );
    }
    ns.delete().await;
}

/// `kubectl apply -k config/default` (with an image reference, as a user's overlay sets it)
/// installs everything in sluice-system: the Deployment's pods pass the namespace's restricted
/// Pod Security admission, and the controller, running as the ServiceAccount it creates, takes
/// the Lease and carries a release and an abort.
#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn kustomize_default_installs_and_its_service_account_runs_a_release() {
    let ns = TestNamespace::new("kustomize").await;
    let overlay = Path::new(ROOT).join("target/install-test/overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources: [../../../config/default]\n\
         images: [{name: sluice, newName: registry.example.com/sluice, newTag: test}]\n",
    )
    .unwrap();
    let out = run(
        kubectl(),
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-k",
            &overlay.to_string_lossy(),
        ],
        None,
    );
    assert!(out.status.success(), "apply -k: {}", text(&out));
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), "sluice-system");
    let deployment = deployments.get("sluice").await.unwrap();
    let spec = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("registry.example.com/sluice:test")
    );
    // The ReplicaSet controller creates both pods: restricted admission let them in.
    wait_for(
        "the Deployment's two pods",
        Duration::from_secs(60),
        || async {
            let status = deployments.get("sluice").await.ok()?.status?;
            (status.replicas == Some(2)).then_some(())
        },
    )
    .await;
    let as_operator = client_as("sluice", "sluice-system").await;
    leads_as(as_operator.clone(), "sluice-system", "sluice-controller").await;
    release_and_abort_as(&ns, as_operator).await;
    let _ = deployments.delete("sluice", &DeleteParams::default()).await;
    for kind in ["clusterrolebinding", "clusterrole"] {
        let _ = run(kubectl(), &["delete", kind, "sluice-controller"], None);
    }
    ns.delete().await;
}

fn git(args: &[&str]) -> String {
    let out = run("git", &[&["-C", ROOT], args].concat(), None);
    assert!(
        out.status.success(),
        "git {args:?} (the upgrade test needs the repository's history): {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every field path of a CRD's schemas, per version (`v1alpha1 .spec.strategy.canary`).
fn field_paths(crd: &Value) -> std::collections::BTreeSet<String> {
    fn walk(schema: &Value, at: String, out: &mut std::collections::BTreeSet<String>) {
        out.insert(at.clone());
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in props {
                walk(v, format!("{at}.{k}"), out);
            }
        }
        if schema["items"].is_object() {
            walk(&schema["items"], format!("{at}[]"), out);
        }
    }
    let mut out = std::collections::BTreeSet::new();
    for version in crd["spec"]["versions"].as_array().into_iter().flatten() {
        let name = version["name"].as_str().unwrap_or_default();
        if version["served"] == true {
            walk(
                &version["schema"]["openAPIV3Schema"],
                name.to_string(),
                &mut out,
            );
        }
    }
    out
}

/// Helm installs `crds/` only once, so upgrades apply them first: from the CRDs of the last
/// commit that changed them to the current ones, the change is additive (no served version or
/// field goes away), objects created under the old CRDs stay readable, and the current samples
/// pass the new schemas.
#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn crds_upgrade_additively_from_their_previous_version() {
    let changes = git(&["log", "--format=%H", "-n", "2", "--", "crds/"]);
    let previous = changes
        .lines()
        .nth(1)
        .expect("crds/ has a previous version in the history");
    let ns = TestNamespace::new("upgrade").await;
    let mut old_crds = Vec::new();
    for entry in std::fs::read_dir(format!("{ROOT}/crds")).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        let current: Value =
            serde_yaml::from_str(&std::fs::read_to_string(format!("{ROOT}/crds/{file}")).unwrap())
                .unwrap();
        let out = run(
            "git",
            &["-C", ROOT, "show", &format!("{previous}:crds/{file}")],
            None,
        );
        if !out.status.success() {
            continue; // a CRD new since then
        }
        let old: Value = serde_yaml::from_slice(&out.stdout).unwrap();
        let lost: Vec<String> = field_paths(&old)
            .difference(&field_paths(&current))
            .cloned()
            .collect();
        assert!(
            lost.is_empty(),
            "{file}: fields or versions removed since {previous}: {lost:?}"
        );
        old_crds.push(old);
    }
    assert!(!old_crds.is_empty(), "no CRD at {previous}");

    let apply = |yaml: String| {
        let out = run(
            kubectl(),
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&yaml),
        );
        assert!(out.status.success(), "apply: {}", text(&out));
    };
    let wait_established = || {
        let out = run(
            kubectl(),
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/rollouts.sluice.dev",
                "crd/errorbudgets.sluice.dev",
                "crd/pipelines.sluice.dev",
            ],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
    };
    apply(to_yaml(&old_crds));
    wait_established();
    // The samples of that commit, created under its CRDs.
    let mut created = Vec::new();
    for file in git(&["ls-tree", "--name-only", previous, "config/samples/"]).lines() {
        let yaml = git(&["show", &format!("{previous}:{file}")]);
        for mut object in documents(&yaml) {
            if object["apiVersion"] != "sluice.dev/v1alpha1" {
                continue;
            }
            object["metadata"]["namespace"] = json!(ns.name);
            create(&ns, &object).await.unwrap();
            created.push((
                object["kind"].as_str().unwrap_or_default().to_lowercase(),
                object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
    assert!(!created.is_empty(), "no sample at {previous}");

    let current: Vec<Value> = std::fs::read_dir(format!("{ROOT}/crds"))
        .unwrap()
        .flat_map(|e| documents(&std::fs::read_to_string(e.unwrap().path()).unwrap()))
        .collect();
    apply(to_yaml(&current));
    wait_established();
    for (kind, name) in &created {
        let out = run(
            kubectl(),
            &[
                "get",
                "-n",
                &ns.name,
                &format!("{kind}.sluice.dev/{name}"),
                "-o",
                "name",
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{kind}/{name} after the upgrade: {}",
            text(&out)
        );
    }
    for (file, mut object) in common::samples() {
        object["metadata"]["namespace"] = json!(ns.name);
        let out = run(
            kubectl(),
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(&serde_json::to_string(&object).unwrap()),
        );
        assert!(out.status.success(), "{file}: {}", text(&out));
    }
    ns.delete().await;
}

/// Whether an ELF executable asks for a program interpreter (a dynamic loader): a static
/// binary does not (PT_INTERP is program header type 3).
fn wants_interpreter(elf: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let u64_at = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&elf[at..at + 8]);
        u64::from_le_bytes(bytes) as usize
    };
    assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let (offset, size, count) = (u64_at(32), u16_at(54), u16_at(56));
    (0..count).any(|i| {
        let at = offset + i * size;
        u32::from_le_bytes([elf[at], elf[at + 1], elf[at + 2], elf[at + 3]]) == 3
    })
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .unwrap()
}

/// The image `make image` writes (`make test` builds a debug one first): its config, its one
/// layer's files, the `docker load` tarball and the SBOM; the binary from the layer is static,
/// prints its version, and runs as the operator against the local cluster (a Rollout goes
/// Healthy, and its own `probe` finds /readyz and /metrics answering).
#[tokio::test]
#[ignore = "needs the local cluster and the image: make test"]
async fn the_image_is_complete_and_its_binary_runs_the_operator() {
    let dir = std::env::var("SLUICE_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(ROOT).join("target/image"));
    assert!(
        dir.join("oci/index.json").exists(),
        "no image in {dir:?}: run `make image` (or e2e/image.sh)"
    );
    let version = env!("CARGO_PKG_VERSION");
    let blob = |digest: &Value| {
        let digest = digest.as_str().unwrap().trim_start_matches("sha256:");
        dir.join("oci/blobs/sha256").join(digest)
    };
    let index = json_file(&dir.join("oci/index.json"));
    let manifest = json_file(&blob(&index["manifests"][0]["digest"]));
    let config = json_file(&blob(&manifest["config"]["digest"]));
    assert_eq!(
        (
            &config["os"],
            &config["architecture"],
            &config["config"]["User"],
            &config["config"]["Entrypoint"]
        ),
        (
            &json!("linux"),
            &json!("amd64"),
            &json!("65532:65532"),
            &json!(["/sluice"])
        )
    );
    let labels = &config["config"]["Labels"];
    let revision = git(&["rev-parse", "HEAD"]);
    for (key, want) in [
        ("revision", revision.trim()),
        ("version", version),
        ("licenses", "Apache-2.0"),
    ] {
        let key = format!("org.opencontainers.image.{key}");
        assert_eq!(labels[&key], want, "label {key}");
        assert_eq!(manifest["annotations"][&key], want, "annotation {key}");
    }
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer");

    // The layer's files.
    let rootfs = Path::new(ROOT).join("target/install-test/rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs).unwrap();
    let layer = blob(&layers[0]["digest"]);
    let out = run(
        "tar",
        &[
            "-xzf",
            &layer.to_string_lossy(),
            "-C",
            &rootfs.to_string_lossy(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    let certs = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(certs.matches("BEGIN CERTIFICATE").count() > 10);
    let binary = rootfs.join("sluice");
    assert!(
        !wants_interpreter(&std::fs::read(&binary).unwrap()),
        "the image's binary is statically linked"
    );
    let printed = run(&binary, &["version"], None);
    assert_eq!(text(&printed).trim(), format!("sluice {version}"));

    // The `docker load` tarball: the same config, tagged sluice:<version>.
    let tarball = dir.join(format!("sluice-{version}.tar"));
    let out = run(
        "tar",
        &["-xOf", &tarball.to_string_lossy(), "manifest.json"],
        None,
    );
    let loaded: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(loaded[0]["RepoTags"], json!([format!("sluice:{version}")]));
    assert_eq!(loaded[0]["Config"], manifest["config"]["digest"]);

    // The SBOM.
    let sbom = json_file(&dir.join(format!("sluice-{version}.cdx.json")));
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    let names: Vec<&str> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.len() > 100
            && ["kube", "tokio", "rustls"]
                .iter()
                .all(|n| names.contains(n)),
        "{} components",
        names.len()
    );

    // The operator, from the image's binary.
    let ns = TestNamespace::new("image").await;
    let listen = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let mut operator = Command::new(&binary)
        .args([
            "controller",
            "--leader-election=false",
            "--listen",
            &listen.to_string(),
            "--watch-namespace",
            &ns.name,
            "--prometheus-address",
            &prometheus_url(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    routing(&ns).await;
    healthy_rollout(&ns, json!([{"setWeight": 50}, {"pause": {}}])).await;
    let probed = run(
        &binary,
        &[
            "probe",
            &format!("http://{listen}/readyz"),
            &format!("http://{listen}/metrics"),
        ],
        None,
    );
    let _ = operator.kill();
    let _ = operator.wait();
    assert!(probed.status.success(), "{}", text(&probed));
    ns.delete().await;
}
