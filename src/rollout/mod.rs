//! The Rollout controller: observe -> plan (pure, in `plan`) -> apply.

pub mod bluegreen;
pub mod plan;
pub mod revision;
pub mod steps;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch, PatchParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::analysis::condition::MeasuredValue;
use crate::analysis::provider::{self, ProviderContext};
use crate::analysis::run::{self as analysis, ProviderFailure, ResolvedAnalysis, Source};
use crate::analysis::template::{self, TemplateVars};
use crate::api::analysis::{AnalysisPhase, AnalysisSpec};
use crate::api::rollout::{Rollout, RolloutStatus};
use crate::operator::Context;
use crate::traffic::{Router, RouterError, Targets};
use plan::{Observed, ObservedReplicaSet, ObservedTraffic, Plan};
use revision::{HASH_LABEL, REVISION_ANNOTATION, ROLLOUT_LABEL, SCALE_DOWN_AT_ANNOTATION};

const FINALIZER: &str = "sluice.dev/traffic";

/// Failures a person can act on, counted by kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("traffic routing: {0}")]
    Router(#[from] RouterError),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Router(_) => "router",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Runs the Rollout controller until `stop`.
pub async fn run(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let (rollouts, replica_sets): (Api<Rollout>, Api<ReplicaSet>) = match &ctx.settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let mut controller = Controller::new(rollouts, watcher::Config::default()).owns(
        replica_sets,
        watcher::Config::default().labels(ROLLOUT_LABEL),
    );
    let store = controller.store();
    for (group, kind) in [
        ("networking.istio.io", "VirtualService"),
        ("networking.istio.io", "DestinationRule"),
        ("gateway.networking.k8s.io", "HTTPRoute"),
    ] {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1", kind));
        if !served(&client, &resource, ctx.settings.namespace.as_deref()).await {
            tracing::info!(kind, "not served by this cluster; not watching it");
            continue;
        }
        let api: Api<DynamicObject> = match &ctx.settings.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let store = store.clone();
        let kind_name = kind.to_string();
        controller = controller.watches_with(
            api,
            resource,
            watcher::Config::default(),
            move |object: DynamicObject| {
                let name = object.name_any();
                let namespace = object.namespace().unwrap_or_default();
                store
                    .state()
                    .into_iter()
                    .filter(|r| refers_to(r, &kind_name, &name, &namespace))
                    .map(|r| ObjectRef::from_obj(&*r))
                    .collect::<Vec<_>>()
            },
        );
    }
    controller
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}

async fn served(client: &kube::Client, resource: &ApiResource, namespace: Option<&str>) -> bool {
    // Asked where Sluice will watch, so namespace-scoped RBAC is enough.
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    api.list(&ListParams::default().limit(1)).await.is_ok()
}

/// Whether a Rollout routes through the named VirtualService, DestinationRule or HTTPRoute.
fn refers_to(rollout: &Rollout, kind: &str, name: &str, namespace: &str) -> bool {
    let own_namespace = rollout.namespace().unwrap_or_default();
    let strategy = &rollout.spec.strategy;
    let routing = strategy
        .canary
        .as_ref()
        .and_then(|c| c.traffic_routing.as_ref())
        .or_else(|| {
            strategy
                .blue_green
                .as_ref()
                .and_then(|b| b.traffic_routing.as_ref())
        });
    let Some(routing) = routing else { return false };
    match (kind, &routing.istio, &routing.gateway_api) {
        ("VirtualService", Some(istio), _) => istio
            .virtual_service
            .iter()
            .chain(&istio.virtual_services)
            .any(|vs| {
                let (n, ns) = vs
                    .name
                    .split_once('.')
                    .unwrap_or((vs.name.as_str(), own_namespace.as_str()));
                n == name && ns == namespace
            }),
        ("DestinationRule", Some(istio), _) => istio
            .destination_rule
            .as_ref()
            .is_some_and(|dr| dr.name == name && own_namespace == namespace),
        ("HTTPRoute", _, Some(gateway)) => {
            gateway.http_route.name == name && own_namespace == namespace
        }
        _ => false,
    }
}

fn error_policy(_rollout: Arc<Rollout>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.health.metrics.reconcile_errors(error.metric_label());
    tracing::warn!(error = %error, "reconcile failed");
    match error {
        Error::Router(RouterError::Conflict(_)) => Action::requeue(Duration::from_millis(500)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

#[tracing::instrument(skip(rollout, ctx), fields(rollout = %rollout.name_any(), namespace = rollout.namespace().unwrap_or_default()))]
async fn reconcile(rollout: Arc<Rollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = rollout.namespace().unwrap_or_default();
    let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, rollout, |event| async {
        match event {
            Finalizer::Apply(rollout) => apply(rollout, ctx.clone()).await,
            Finalizer::Cleanup(rollout) => cleanup(rollout, ctx.clone()).await,
        }
    })
    .await;
    ctx.health.metrics.observe_reconcile(started.elapsed());
    result.map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// On deletion: all traffic back to stable before the Rollout (and its ReplicaSets) go.
async fn cleanup(rollout: Arc<Rollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = rollout.namespace().unwrap_or_default();
    ctx.health
        .metrics
        .forget_rollout(&namespace, &rollout.name_any());
    let status = rollout.status.clone().unwrap_or_default();
    if let (Some(canary), Some(stable)) = (
        rollout.spec.strategy.canary.as_ref(),
        status.stable_revision.clone(),
    ) && let Some(router) = Router::for_canary(&ctx.client, &namespace, canary)
    {
        match router
            .apply(
                &Targets {
                    stable: stable.clone(),
                    canary: stable,
                },
                0,
            )
            .await
        {
            Ok(()) | Err(RouterError::Misconfigured(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

async fn apply(cached: Arc<Rollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = cached.name_any();
    let namespace = cached.namespace().unwrap_or_default();
    // The watch cache can lag our own last status write (a VirtualService event may arrive
    // before the Rollout's); planning on a stale status would undo the last decision, so the
    // plan starts from a fresh read.
    let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(rollout) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let rollout = Arc::new(rollout);
    let now = Timestamp::now();
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = rollout.uid().unwrap_or_default();
    let owned: Vec<ReplicaSet> = rs_api
        .list(&ListParams::default().labels(&format!("{ROLLOUT_LABEL}={name}")))
        .await?
        .items
        .into_iter()
        .filter(|rs| rs.owner_references().iter().any(|o| o.uid == uid))
        .collect();
    let desired_hash = revision::template_hash(&rollout.spec.template, 0);
    let status = rollout.status.clone().unwrap_or_default();

    // Observe traffic.
    let strategy = &rollout.spec.strategy;
    let router = match (&strategy.canary, &strategy.blue_green) {
        (Some(canary), _) => Router::for_canary(&ctx.client, &namespace, canary),
        (None, Some(bg)) => bg.traffic_routing.as_ref().and_then(|routing| {
            let services = bg
                .preview_service
                .clone()
                .map(|preview| (bg.active_service.clone(), preview));
            Router::new(&ctx.client, &namespace, routing, services)
        }),
        (None, None) => None,
    };
    let stable = status
        .stable_revision
        .clone()
        .unwrap_or_else(|| desired_hash.clone());
    let targets = Targets {
        stable: stable.clone(),
        canary: status
            .canary_revision
            .clone()
            .unwrap_or_else(|| stable.clone()),
    };
    let traffic = match &router {
        None => ObservedTraffic::None,
        Some(router) => match router.observe(&targets).await {
            Ok(state) => ObservedTraffic::State(state),
            Err(RouterError::Misconfigured(why)) => ObservedTraffic::Failed(why),
            Err(e) => return Err(e.into()),
        },
    };

    // Measure what is due, and fold the results into the status the planner sees.
    let background = strategy.canary.as_ref().and_then(|c| {
        c.analysis
            .as_ref()
            .map(|a| analysis::resolve(a, None, c.prometheus.as_ref()))
    });
    let mut status = status;
    let provider_ctx = ProviderContext {
        client: ctx.client.clone(),
        namespace: namespace.clone(),
        default_prometheus: ctx.settings.prometheus_address.clone(),
    };
    let mut analysis_wakeups = Vec::new();
    for run in status.analysis_runs.iter_mut() {
        if !matches!(run.phase, AnalysisPhase::Pending | AnalysisPhase::Running) {
            continue;
        }
        let Some(resolved) = resolve_run(&run.name, strategy, background.as_ref()) else {
            continue;
        };
        // `{{canary.revision}}` is the revision being judged (after a blue-green switch, the
        // new active one).
        let vars = TemplateVars {
            rollout_name: name.clone(),
            rollout_namespace: namespace.clone(),
            canary_revision: run.revision.clone(),
            stable_revision: stable.clone(),
            window: None,
        };
        for metric in analysis::due(&resolved, run, now) {
            let outcome = measure(&provider_ctx, metric, &vars, &ctx).await;
            let measurement = analysis::judge(metric, outcome, now);
            ctx.health
                .metrics
                .measurement(&format!("{:?}", measurement.phase));
            analysis::record(run, &resolved, metric, measurement, now);
        }
        if run.phase == AnalysisPhase::Pending && now >= run.started_at.0 {
            run.phase = AnalysisPhase::Running;
        }
        analysis_wakeups.extend(analysis::earliest_due(&resolved, run));
    }

    let observed = Observed {
        generation: rollout.metadata.generation,
        spec: rollout.spec.clone(),
        status,
        desired_hash: desired_hash.clone(),
        replica_sets: owned.iter().map(observe_replica_set).collect(),
        traffic: traffic.clone(),
        background: background.clone(),
        now,
    };
    let mut plan = if strategy.canary.is_some() {
        plan::plan(&observed)
    } else {
        bluegreen::plan(&observed)
    };
    for run_name in std::mem::take(&mut plan.start_runs) {
        // Post-promotion analysis judges the new active revision; every other run the new one.
        let revision = if run_name == bluegreen::POST_PROMOTION {
            plan.status.stable_revision.clone()
        } else {
            plan.status.canary_revision.clone()
        };
        if let (Some(resolved), Some(revision)) = (
            resolve_run(&run_name, strategy, background.as_ref()),
            revision,
        ) {
            plan.status.analysis_runs.retain(|r| r.name != run_name);
            plan.status
                .analysis_runs
                .push(analysis::start(&run_name, &revision, &resolved, now));
            analysis_wakeups.push(now);
        }
    }

    apply_replica_sets(&ctx, &rollout, &owned, &plan, &desired_hash).await?;
    prune_history(&ctx, &rollout, &owned, &plan).await?;
    let selector = selector_string(&rollout.spec.selector);
    plan.status.selector = Some(selector);
    // The decision is recorded before traffic moves: a crash in between leaves a status from
    // which the next reconcile makes the same move.
    write_status(&ctx, &rollout, &plan.status).await?;
    if let Some(intent) = &plan.traffic {
        match (&router, &strategy.blue_green) {
            (Some(router), _) => {
                let current = match &traffic {
                    ObservedTraffic::State(s) => {
                        s.canary_weight == Some(intent.canary_weight) && s.targets_match
                    }
                    _ => false,
                };
                let lowering = matches!(&traffic, ObservedTraffic::State(s)
                    if s.canary_weight.is_some_and(|w| w > intent.canary_weight));
                // A superseded canary: lower its weight while the canary destination still
                // points at its pods, then re-point it, so traffic never reaches a revision
                // without pods in between. (A promotion re-points stable first instead.)
                if !current
                    && lowering
                    && intent.targets.stable == targets.stable
                    && intent.targets.canary != targets.canary
                {
                    match router.apply(&targets, intent.canary_weight).await {
                        Ok(()) | Err(RouterError::Misconfigured(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                if !current {
                    match router.apply(&intent.targets, intent.canary_weight).await {
                        Ok(()) => {
                            tracing::info!(weight = intent.canary_weight, "canary weight set")
                        }
                        Err(RouterError::Misconfigured(why)) => {
                            tracing::warn!(%why, "cannot route traffic")
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            // Blue-green without a router: the Services' selectors are the switch.
            (None, Some(bg)) => {
                let mut services =
                    vec![(bg.active_service.as_str(), intent.targets.stable.as_str())];
                if let Some(preview) = &bg.preview_service {
                    services.push((preview.as_str(), intent.targets.canary.as_str()));
                }
                for (service, hash) in services {
                    match crate::traffic::service_selects(&ctx.client, &namespace, service, hash)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            crate::traffic::point_service(&ctx.client, &namespace, service, hash)
                                .await?
                        }
                        Err(RouterError::Misconfigured(why)) => {
                            tracing::warn!(%why, "cannot switch Services")
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            (None, None) => {}
        }
    }
    if plan.events.iter().any(|e| e.reason == "Promoted")
        && let Some(released) = owned
            .iter()
            .find(|rs| rs.labels().get(HASH_LABEL) == plan.status.stable_revision.as_ref())
            .and_then(|rs| rs.metadata.creation_timestamp.as_ref())
    {
        let took = Duration::try_from(now.duration_since(released.0)).unwrap_or_default();
        ctx.health.metrics.observe_release(took);
    }
    publish_events(&ctx, &rollout, &plan).await;
    ctx.health.metrics.rollout_state(
        &namespace,
        &name,
        plan.status.phase,
        plan.traffic.as_ref().map_or(0, |t| t.canary_weight),
    );

    let next = analysis_wakeups
        .iter()
        .map(|at| Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO))
        .min()
        .map_or(plan.requeue_after, |d| d.min(plan.requeue_after))
        .max(Duration::from_millis(200));
    Ok(Action::requeue(next))
}

/// The resolved analysis of a run name: `background` or `step-<index>` (canary),
/// `pre-promotion` or `post-promotion` (blue-green).
fn resolve_run(
    name: &str,
    strategy: &crate::api::rollout::RolloutStrategy,
    background: Option<&ResolvedAnalysis>,
) -> Option<ResolvedAnalysis> {
    if let Some(bg) = &strategy.blue_green {
        let spec = match name {
            bluegreen::PRE_PROMOTION => bg.pre_promotion_analysis.as_ref()?,
            bluegreen::POST_PROMOTION => bg.post_promotion_analysis.as_ref()?,
            _ => return None,
        };
        // A gate must end: without a count, three measurements decide.
        return Some(analysis::resolve(spec, Some(3), bg.prometheus.as_ref()));
    }
    let canary = strategy.canary.as_ref()?;
    if name == plan::BACKGROUND {
        return background.cloned();
    }
    let index: usize = name.strip_prefix("step-")?.parse().ok()?;
    let step = canary.steps.get(index)?.analysis.as_ref()?;
    let base = canary.analysis.clone().unwrap_or_default();
    let spec = AnalysisSpec {
        metrics: if step.metrics.is_empty() {
            base.metrics.clone()
        } else {
            step.metrics.clone()
        },
        count: step.count,
        interval: step.interval.clone().or(base.interval.clone()),
        // A blocking step analysis starts measuring at once.
        initial_delay: None,
        ..base
    };
    Some(analysis::resolve(
        &spec,
        Some(3),
        canary.prometheus.as_ref(),
    ))
}

async fn measure(
    provider_ctx: &ProviderContext,
    metric: &analysis::ResolvedMetric,
    vars: &TemplateVars,
    ctx: &Context,
) -> Result<MeasuredValue, ProviderFailure> {
    match &metric.source {
        Source::Prometheus {
            metric: prom,
            config,
        } => {
            let query = template::render(&prom.query, vars)
                .map_err(|e| ProviderFailure::Error(e.to_string()))?;
            let started = Instant::now();
            let result = provider::query_prometheus(provider_ctx, prom, config, &query).await;
            ctx.health.metrics.observe_query(started.elapsed());
            result
        }
        Source::ErrorBudget(budget) => provider::read_error_budget(provider_ctx, budget).await,
    }
}

fn observe_replica_set(rs: &ReplicaSet) -> ObservedReplicaSet {
    let status = rs.status.clone().unwrap_or_default();
    ObservedReplicaSet {
        hash: rs.labels().get(HASH_LABEL).cloned().unwrap_or_default(),
        replicas: rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        scale_down_at: rs
            .annotations()
            .get(SCALE_DOWN_AT_ANNOTATION)
            .and_then(|s| s.parse().ok()),
    }
}

fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.clone().unwrap_or_default().join(",");
        parts.push(match expr.operator.as_str() {
            "In" => format!("{} in ({values})", expr.key),
            "NotIn" => format!("{} notin ({values})", expr.key),
            "Exists" => expr.key.clone(),
            _ => format!("!{}", expr.key),
        });
    }
    parts.join(",")
}

/// Deletes scaled-down ReplicaSets beyond `revisionHistoryLimit` (default 10).
async fn prune_history(
    ctx: &Context,
    rollout: &Rollout,
    owned: &[ReplicaSet],
    plan: &Plan,
) -> Result<(), Error> {
    let limit = rollout.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let entries: Vec<revision::HistoryEntry> = owned
        .iter()
        .map(|rs| revision::HistoryEntry {
            name: rs.name_any(),
            hash: rs.labels().get(HASH_LABEL).cloned().unwrap_or_default(),
            revision: rs
                .annotations()
                .get(REVISION_ANNOTATION)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            // What the plan leaves it at, not what it was.
            replicas: plan
                .replica_sets
                .iter()
                .find(|i| Some(&i.hash) == rs.labels().get(HASH_LABEL))
                .map_or(
                    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                    |i| i.replicas,
                ),
        })
        .collect();
    let keep: Vec<&str> = [
        &plan.status.stable_revision,
        &plan.status.canary_revision,
        &plan.status.previous_revision,
    ]
    .into_iter()
    .filter_map(|h| h.as_deref())
    .collect();
    let api: Api<ReplicaSet> =
        Api::namespaced(ctx.client.clone(), &rollout.namespace().unwrap_or_default());
    for name in revision::beyond_history_limit(&entries, limit, &keep) {
        tracing::info!(replica_set = %name, "deleting a revision beyond revisionHistoryLimit");
        match api
            .delete(&name, &kube::api::DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn apply_replica_sets(
    ctx: &Context,
    rollout: &Rollout,
    owned: &[ReplicaSet],
    plan: &Plan,
    desired_hash: &str,
) -> Result<(), Error> {
    let namespace = rollout.namespace().unwrap_or_default();
    let name = rollout.name_any();
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let next_revision = owned
        .iter()
        .filter_map(|rs| {
            rs.annotations()
                .get(REVISION_ANNOTATION)
                .and_then(|r| r.parse::<i64>().ok())
        })
        .max()
        .unwrap_or(0)
        + 1;
    for intent in &plan.replica_sets {
        let existing = owned
            .iter()
            .find(|rs| rs.labels().get(HASH_LABEL) == Some(&intent.hash));
        let scale_down = intent.scale_down_at.map(|t| t.to_string());
        match existing {
            // The desired template: server-side apply of the whole ReplicaSet we own.
            _ if intent.hash == desired_hash => {
                let revision = existing
                    .and_then(|rs| rs.annotations().get(REVISION_ANNOTATION).cloned())
                    .unwrap_or_else(|| next_revision.to_string());
                let rs = desired_replica_set(
                    rollout,
                    &intent.hash,
                    intent.replicas,
                    &revision,
                    scale_down,
                );
                let rs_name = rs.metadata.name.clone().unwrap_or_default();
                api.patch(
                    &rs_name,
                    &PatchParams::apply(crate::FIELD_MANAGER).force(),
                    &Patch::Apply(&rs),
                )
                .await?;
            }
            // An older revision: only its size and scale-down deadline change.
            Some(rs) => {
                let current = observe_replica_set(rs);
                if current.replicas == intent.replicas
                    && current.scale_down_at == intent.scale_down_at
                {
                    continue;
                }
                let patch = json!({
                    "metadata": {"annotations": {SCALE_DOWN_AT_ANNOTATION: scale_down}},
                    "spec": {"replicas": intent.replicas},
                });
                api.patch(
                    &rs.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            }
            None => {
                tracing::debug!(rollout = %name, hash = %intent.hash, "no ReplicaSet for an old revision; nothing to scale")
            }
        }
    }
    Ok(())
}

fn desired_replica_set(
    rollout: &Rollout,
    hash: &str,
    replicas: i32,
    revision: &str,
    scale_down_at: Option<String>,
) -> ReplicaSet {
    let name = rollout.name_any();
    let mut template = rollout.spec.template.clone();
    let metadata = template.metadata.get_or_insert_with(ObjectMeta::default);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut selector = rollout.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut annotations = BTreeMap::from([(REVISION_ANNOTATION.to_string(), revision.to_string())]);
    if let Some(at) = scale_down_at {
        annotations.insert(SCALE_DOWN_AT_ANNOTATION.into(), at);
    }
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(revision::replica_set_name(&name, hash)),
            namespace: rollout.namespace(),
            labels: Some(BTreeMap::from([
                (HASH_LABEL.into(), hash.into()),
                (ROLLOUT_LABEL.into(), name.clone()),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "sluice.dev/v1alpha1".into(),
                kind: "Rollout".into(),
                name,
                uid: rollout.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: rollout.spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    }
}

async fn write_status(
    ctx: &Context,
    rollout: &Rollout,
    status: &RolloutStatus,
) -> Result<(), Error> {
    let api: Api<Rollout> =
        Api::namespaced(ctx.client.clone(), &rollout.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "status": status,
    });
    api.patch_status(
        &rollout.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn publish_events(ctx: &Context, rollout: &Rollout, plan: &Plan) {
    if plan.events.is_empty() {
        return;
    }
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter {
            controller: "sluice".into(),
            instance: None,
        },
    );
    let reference: ObjectReference = rollout.object_ref(&());
    for event in &plan.events {
        tracing::info!(reason = event.reason, message = %event.message, "event");
        let published = recorder
            .publish(
                &Event {
                    type_: if event.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: event.reason.into(),
                    note: Some(event.message.chars().take(1024).collect()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        if let Err(e) = published {
            tracing::warn!(error = %e, "could not record an Event");
        }
    }
}
