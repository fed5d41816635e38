//! The Pipeline controller: admits releases to stages once their gates pass.
//!
//! Observe (the stages' Rollouts, the gated ErrorBudgets, all read fresh) -> plan (pure, in
//! `plan`) -> write the Pipeline's status. It writes nothing else: the Rollout controller reads
//! the admitted release of each stage through a watch and holds what is not admitted yet.

pub mod plan;
pub mod windows;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, PartialObjectMeta,
    PartialObjectMetaExt,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::api::errorbudget::ErrorBudget;
use crate::api::pipeline::Pipeline;
use crate::api::rollout::{Rollout, RolloutPhase};
use crate::context::Context;
use crate::k8s::touched;
use plan::{ObservedRollout, RolloutState};

const CONTROLLER: &str = "pipeline";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// `namespace/name`
fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Every `(pipeline, stage)` that lists the Rollout `namespace/name`.
pub fn stages_listing(
    pipelines: &[Arc<Pipeline>],
    namespace: &str,
    name: &str,
) -> Vec<(Arc<Pipeline>, String)> {
    pipelines
        .iter()
        .flat_map(|p| {
            p.spec
                .stages
                .iter()
                .filter(|s| {
                    s.rollouts
                        .iter()
                        .any(|r| r.namespace == namespace && r.name == name)
                })
                .map(|s| (p.clone(), s.name.clone()))
        })
        .collect()
}

/// Runs the Pipeline controller until `stop`, woken also by each Rollout in
/// `rollouts_touched` (the Rollouts the Rollout controller's watch saw change: a watch of its
/// own would have the apiserver decode every Rollout written once more, see k8s/touched.rs).
pub async fn run(
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
    rollouts_touched: impl Stream<Item = touched::Name> + Send + 'static,
) {
    let client = ctx.client.clone();
    let namespace = ctx.settings.namespace.clone();
    let pipelines: Api<Pipeline> = crate::k8s::scoped(&client, namespace.as_deref());
    // Every trigger watch backs off on its own: see k8s/watch.rs.
    let (store, writer) = reflector::store();
    let controller = Controller::for_stream(
        crate::k8s::watch::reflected(pipelines, watcher::Config::default(), writer),
        store.clone(),
    );
    let by_rollout = store.clone();
    let by_budget = store.clone();
    // The mapper reads a Rollout's namespace and name alone.
    let rollouts = rollouts_touched.map(|(namespace, name)| {
        Ok::<_, watcher::Error>(
            ObjectMeta {
                namespace: Some(namespace),
                name: Some(name),
                ..ObjectMeta::default()
            }
            .into_request_partial::<Rollout>(),
        )
    });
    let budgets: Api<ErrorBudget> = crate::k8s::scoped(&client, namespace.as_deref());
    controller
        .watches_stream(rollouts, move |rollout: PartialObjectMeta<Rollout>| {
            let (ns, name) = (rollout.namespace().unwrap_or_default(), rollout.name_any());
            stages_listing(&by_rollout.state(), &ns, &name)
                .into_iter()
                .map(|(p, _)| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(
            crate::k8s::watch::trigger(budgets, watcher::Config::default()),
            move |budget| gating(&by_budget, &budget),
        )
        .with_config(ctx.settings.controller_config())
        .graceful_shutdown_on(crate::k8s::stopped(stop))
        .run(reconcile, error_policy, Arc::new(State { ctx, store }))
        .for_each(crate::k8s::log_loop_error)
        .await;
}

struct State {
    ctx: Arc<Context>,
    /// Every Pipeline, to tell a Rollout claimed by two of them.
    store: Store<Pipeline>,
}

/// The Pipelines with a gate on this budget.
fn gating(store: &Store<Pipeline>, budget: &ErrorBudget) -> Vec<ObjectRef<Pipeline>> {
    let key = key_of(&budget.namespace().unwrap_or_default(), &budget.name_any());
    store
        .state()
        .iter()
        .filter(|p| {
            let own = p.namespace().unwrap_or_default();
            p.spec.stages.iter().any(|s| {
                s.gates
                    .iter()
                    .flat_map(|g| &g.error_budgets)
                    .any(|g| plan::budget_key(&g.namespace, &g.name, &own) == key)
            })
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

fn backoff_key(pipeline: &Pipeline) -> String {
    format!(
        "Pipeline/{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    )
}

fn error_policy(pipeline: Arc<Pipeline>, error: &Error, state: Arc<State>) -> Action {
    state.ctx.metrics().reconcile_errors(CONTROLLER, "kube");
    let delay = state.ctx.backoff.failed(&backoff_key(&pipeline));
    tracing::warn!(error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[tracing::instrument(skip(cached, state), fields(pipeline = %cached.name_any(), namespace = cached.namespace().unwrap_or_default()))]
async fn reconcile(cached: Arc<Pipeline>, state: Arc<State>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = admit(&cached, &state).await;
    state
        .ctx
        .metrics()
        .observe_reconcile(CONTROLLER, started.elapsed());
    if result.is_ok() {
        state.ctx.backoff.succeeded(&backoff_key(&cached));
    }
    result
}

/// How a Rollout is doing with the release its template declares.
pub fn rollout_state(rollout: &Rollout) -> RolloutState {
    let status = rollout.status.clone().unwrap_or_default();
    let declared = crate::k8s::labels::template_hash(&rollout.spec.template);
    match status.phase {
        Some(RolloutPhase::Healthy) if status.stable_revision.as_deref() == Some(&declared) => {
            RolloutState::Healthy
        }
        Some(RolloutPhase::Degraded) => {
            RolloutState::Failed(status.message.unwrap_or_else(|| "Degraded".into()))
        }
        _ => RolloutState::Busy,
    }
}

async fn admit(cached: &Pipeline, state: &State) -> Result<Action, Error> {
    let ctx = state.ctx.as_ref();
    let namespace = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    let api: Api<Pipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    // Fresh: gates are judged from what is true now, not from a cache.
    let Some(pipeline) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let me = key_of(&namespace, &name);
    let all = state.store.state();
    let mut rollouts = Vec::new();
    for stage in &pipeline.spec.stages {
        let mut observed = Vec::new();
        for r in &stage.rollouts {
            let key = key_of(&r.namespace, &r.name);
            let claims: Vec<String> = stages_listing(&all, &r.namespace, &r.name)
                .into_iter()
                .map(|(p, s)| {
                    let owner = key_of(&p.namespace().unwrap_or_default(), &p.name_any());
                    format!("Pipeline {owner} stage {s}")
                })
                .filter(|c| *c != format!("Pipeline {me} stage {}", stage.name))
                .collect();
            let duplicate = stage
                .rollouts
                .iter()
                .filter(|o| o.namespace == r.namespace && o.name == r.name)
                .count()
                > 1;
            let found = Api::<Rollout>::namespaced(ctx.client.clone(), &r.namespace)
                .get_opt(&r.name)
                .await?;
            let state = match &found {
                None => RolloutState::Missing,
                Some(_) if duplicate => {
                    RolloutState::Claimed(format!("stage {} twice", stage.name))
                }
                Some(_) if !claims.is_empty() => RolloutState::Claimed(claims.join(", ")),
                Some(rollout) => rollout_state(rollout),
            };
            observed.push(ObservedRollout {
                key,
                declared: found.as_ref().map(|r| plan::release_of(&r.spec.template)),
                state,
            });
        }
        rollouts.push(observed);
    }
    let mut budgets = BTreeMap::new();
    for stage in &pipeline.spec.stages {
        for gate in stage.gates.iter().flat_map(|g| &g.error_budgets) {
            let key = plan::budget_key(&gate.namespace, &gate.name, &namespace);
            let budget_ns = gate.namespace.clone().unwrap_or_else(|| namespace.clone());
            let found = Api::<ErrorBudget>::namespaced(ctx.client.clone(), &budget_ns)
                .get_opt(&gate.name)
                .await?;
            budgets.insert(key, found.map(|b| b.status.unwrap_or_default()));
        }
    }
    let mut applications = BTreeMap::new();
    for gate in pipeline
        .spec
        .stages
        .iter()
        .filter_map(|s| s.gates.as_ref()?.argo_cd.as_ref())
    {
        let key = plan::application_key(gate);
        let seen = observe_application(ctx, gate).await?;
        applications.insert(key, seen);
    }
    let status = pipeline.status.clone().unwrap_or_default();
    let o = plan::Observed {
        generation: pipeline.metadata.generation,
        namespace: namespace.clone(),
        spec: pipeline.spec.clone(),
        status: status.clone(),
        rollouts,
        budgets,
        applications,
        now: Timestamp::now(),
    };
    let plan = plan::plan(&o);
    // Approvals belong to the plugin's field manager: not ours to compare or write.
    let mut current = status;
    current.approvals.clear();
    let mut desired = plan.status.clone();
    desired.approvals.clear();
    crate::k8s::status::apply(&api, &pipeline, Some(&current), &desired).await?;
    let reference: ObjectReference = pipeline.object_ref(&());
    ctx.events.hand_over_on(&reference, &plan.events).await;
    ctx.metrics()
        .pipeline_state(&namespace, &name, &plan.status.stages);
    for timing in &plan.timings {
        match timing {
            plan::Timing::ToStage { stage, seconds } => ctx
                .metrics()
                .observe_time_to_stage(&namespace, &name, stage, *seconds),
            plan::Timing::ApprovalWait { stage, seconds } => ctx
                .metrics()
                .observe_approval_wait(&namespace, &name, stage, *seconds),
        }
    }
    Ok(Action::requeue(
        plan.requeue_after.min(Duration::from_secs(300)),
    ))
}

/// An ArgoCD Application as the gate needs it: sync and health status, the images ArgoCD
/// reports, and the sync status of the Sluice Rollouts it manages.
async fn observe_application(
    ctx: &Context,
    gate: &crate::api::pipeline::ArgoCdGate,
) -> Result<plan::Application, Error> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "argoproj.io",
        "v1alpha1",
        "Application",
    ));
    let namespace = gate.namespace.as_deref().unwrap_or("argocd");
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), namespace, &resource);
    match api.get_opt(&gate.application).await {
        // A 404 for the object and one for the whole kind look alike: ask for the kind.
        Ok(None) => match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(plan::Application::Missing),
            Err(e) if crate::k8s::is_not_found(&e) => Ok(plan::Application::NotServed),
            Err(e) => Err(e.into()),
        },
        Ok(Some(app)) => {
            let status = &app.data["status"];
            let text = |v: &serde_json::Value| v.as_str().map(String::from);
            Ok(plan::Application::Seen {
                sync: text(&status["sync"]["status"]),
                health: text(&status["health"]["status"]),
                images: status["summary"]["images"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_str().map(String::from))
                    .collect(),
                rollouts: status["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["group"] == "sluice.dev" && r["kind"] == "Rollout")
                    .filter_map(|r| {
                        let key = format!("{}/{}", r["namespace"].as_str()?, r["name"].as_str()?);
                        Some((key, text(&r["status"]).unwrap_or_default()))
                    })
                    .collect(),
            })
        }
        Err(e) => Err(e.into()),
    }
}
