//! The Rollout controller: observe -> plan (pure, in `plan`) -> apply.
//!
//! The shell reads the world into an [`Observed`], plans once before measuring (so a person's
//! request never waits for Prometheus), takes the measurements that are due, plans again, and
//! carries out the plan's writes in the order the plan lists them.

pub mod bluegreen;
mod cached;
pub mod canary;
pub mod events;
pub mod model;
mod owned;
pub mod plan;
pub mod policy;
pub mod release;
pub mod revision;
mod routes;
pub mod runs;
mod slots;
pub mod steps;
mod unrecorded;
mod written;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{ObjectReference, PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::analysis::provider::{self, ProviderContext};
use crate::analysis::run as analysis;
use crate::api::errorbudget::{BudgetAction, ErrorBudget};
use crate::api::pipeline::Pipeline;
use crate::api::rollout::{Rollout, RolloutStatus};
use crate::context::Context;
use crate::k8s::events::PlannedEvent as Report;
use crate::k8s::labels::{
    HASH_LABEL, ISTIO_CANONICAL_REVISION_LABEL, REVISION_ANNOTATION, ROLLOUT_LABEL,
    SCALE_DOWN_AT_ANNOTATION, TEMPLATE_ANNOTATION,
};
use crate::k8s::touched::Touched;
use crate::traffic::{Cluster, Router, RouterError, RoutingCache, Targets};
use cached::{CachedRollout, TemplateFacts};
use model::{
    BudgetHold, Observed, ObservedLeftover, ObservedReplicaSet, ObservedService, ObservedTraffic,
    Plan, ReplicaSetIntent, TrafficWrite, WriteOrder,
};
use owned::OwnedReplicaSets;
use routes::Referrers;
use slots::{Slot, Slots};
use unrecorded::Unrecorded;
use written::{Source, Written};

const FINALIZER: &str = "sluice.dev/traffic";
/// The controller's name in metrics.
const CONTROLLER: &str = "rollout";
/// Every due measurement of one reconcile together gets at most this long (each query also
/// has its own timeout, 10 s unless the spec sets one).
const MEASUREMENT_DEADLINE: Duration = Duration::from_secs(15);
/// How often a reconcile that is measuring looks for a person's request in the watch cache.
const INTENT_POLL: Duration = Duration::from_millis(50);

/// Failures a person can act on, counted by kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("traffic routing: {0}")]
    Router(#[from] RouterError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("the cache is behind the cluster: {0}")]
    CacheBehind(String),
    #[error("the cached Rollout cannot be decoded: {0}")]
    CacheUnreadable(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Router(_) => "router",
            Error::Finalizer(_) => "finalizer",
            Error::CacheBehind(_) => "conflict",
            Error::CacheUnreadable(_) => "cache",
        }
    }
}

/// What the Rollout reconciler gets: the shared context and the controller's own cache of
/// Rollouts (to notice a person's request while measurements are in flight).
pub struct State {
    pub ctx: Arc<Context>,
    /// The client, with the routing objects' cache in front of its reads.
    cluster: Cluster,
    rollouts: Store<CachedRollout>,
    /// ErrorBudgets, to apply their policy to the Rollouts they target.
    budgets: Store<ErrorBudget>,
    /// Pipelines, to hold a release until the Rollout's stage admits it.
    pipelines: Store<Pipeline>,
    /// Sluice's own status writes the Rollout cache has not shown yet, with their answers.
    written: Arc<Written>,
    /// Every Rollout's ReplicaSets, from one watch.
    owned: Arc<OwnedReplicaSets>,
    /// The bound on reconciles at work at once (not measuring): see slots.rs.
    slots: Slots,
    /// Passing measurements not written yet (unrecorded.rs).
    unrecorded: Unrecorded,
}

/// How long a reconcile waits for the Pipeline, ErrorBudget and ReplicaSet caches after a
/// start before it gives its slot back and comes again: until they are filled, nothing is
/// released (a hold could be missed).
const CACHE_WAIT: Duration = Duration::from_secs(5);
/// Every this long without the caches filled, the operator says so.
const CACHES_SLOW: Duration = Duration::from_secs(60);

/// Objects per page when the Rollouts and ReplicaSets are listed (a start, a relist).
const PAGE: u32 = 50;

/// Objects per page when the routing objects and Services are listed.
const ROUTING_PAGE: u32 = 100;

/// The Pipeline stage that lists `rollout`, with what it admitted; a Rollout listed by more
/// than one stage is held with the conflict named.
fn pipeline_gate(pipelines: &Store<Pipeline>, rollout: &Rollout) -> Option<model::PipelineGate> {
    let namespace = rollout.namespace().unwrap_or_default();
    let listing =
        crate::pipeline::stages_listing(&pipelines.state(), &namespace, &rollout.name_any());
    let name_of = |p: &Pipeline| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let (pipeline, stage) = listing.first()?;
    let conflict = (listing.len() > 1).then(|| {
        listing
            .iter()
            .map(|(p, s)| format!("Pipeline {} stage {s}", name_of(p)))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let stage_status = pipeline
        .status
        .as_ref()
        .and_then(|s| s.stages.iter().find(|st| &st.name == stage));
    Some(model::PipelineGate {
        pipeline: name_of(pipeline),
        stage: stage.clone(),
        admitted: stage_status.and_then(|s| s.release.clone()),
        waiting: stage_status.and_then(|s| s.message.clone()),
        conflict,
    })
}

/// Runs the Rollout controller until `stop`. Each Rollout its watch sees change is also noted
/// in `touched` once the cache serves it, for another controller to wake on without a watch
/// of its own.
pub async fn run(ctx: Arc<Context>, stop: watch::Receiver<bool>, touched: Option<Touched>) {
    let client = ctx.client.clone();
    let namespace = ctx.settings.namespace.clone();
    let rollouts: Api<Rollout> = crate::k8s::scoped(&client, namespace.as_deref());
    let replica_sets: Api<owned::Kept> = crate::k8s::scoped(&client, namespace.as_deref());
    // Every trigger watch backs off on its own: see k8s/watch.rs.
    let (store, writer) = reflector::store();
    let owned = Arc::new(OwnedReplicaSets::default());
    let referrers = Arc::new(Referrers::default());
    let written = Arc::new(Written::default());
    let mut controller = Controller::for_stream(
        crate::k8s::watch::reflected_into(
            rollouts,
            // Small pages: each Rollout of a page is decoded with its pod template before
            // the cache strips it, and that peak stays in the process's memory. At 1,000
            // Rollouts the relists of all the watches (about every ten minutes on an
            // apiserver without its watch cache) raised the RSS by about 16 MB with the
            // pages before `PAGE` and `ROUTING_PAGE`, 9 to 11 MB with them
            // (docs/performance.md).
            watcher::Config::default().page_size(PAGE),
            writer,
            {
                let referrers = referrers.clone();
                move |event| referrers.apply(event)
            },
            {
                // Once the cache serves it, and only what changed (a relist's unchanged
                // Rollouts are not told).
                let written = written.clone();
                move |event| {
                    written.seen(event);
                    if let Some(touched) = &touched {
                        touched.note(event);
                    }
                }
            },
        ),
        store.clone(),
    )
    .owns_stream(crate::k8s::watch::kept(
        replica_sets,
        // Small pages: a page's body is read whole before it is decoded (templates and
        // managedFields included), and that peak stays in the process's memory.
        watcher::Config::default()
            .labels(ROLLOUT_LABEL)
            .page_size(PAGE),
        |_| {},
        {
            let owned = owned.clone();
            move |event| owned.apply(event)
        },
    ));
    // The routing objects: kept (traffic/cache.rs), so a reconcile that changes nothing reads
    // none of them from the apiserver; each change also wakes the Rollouts that route through
    // the object (a weight or selector changed by hand is put back at once, not at the next
    // resync), found by one lookup in an index kept from the Rollout watch (routes.rs).
    let routing = Arc::new(RoutingCache::default());
    for resource in [
        crate::traffic::virtual_service(),
        crate::traffic::destination_rule(),
        crate::traffic::http_route(),
    ] {
        let api = crate::k8s::scoped_dynamic(&client, namespace.as_deref(), &resource);
        let kind = resource.kind.clone();
        // Asked where Sluice will watch, so namespace-scoped RBAC is enough.
        if api.list(&ListParams::default().limit(1)).await.is_err() {
            tracing::info!(kind, "not served by this cluster; not watching it");
            continue;
        }
        routing.watching(&kind);
        let (referrers, cache) = (referrers.clone(), routing.clone());
        let kept_kind = kind.clone();
        controller = controller.watches_stream_with(
            crate::k8s::watch::kept(
                api,
                // Pages of 100, not kube's 500: a routing object is decoded whole, as JSON
                // values, before the cache strips it.
                watcher::Config::default().page_size(ROUTING_PAGE),
                crate::traffic::cache::strip_route,
                move |event| cache.apply(&kept_kind, event),
            ),
            move |object: DynamicObject| {
                referrers.of(
                    &kind,
                    object.metadata.namespace.as_deref(),
                    &object.name_any(),
                )
            },
            resource,
        );
    }
    let services: Api<Service> = crate::k8s::scoped(&client, namespace.as_deref());
    routing.watching("Service");
    let cache = routing.clone();
    controller = controller.watches_stream(
        crate::k8s::watch::kept(
            services,
            watcher::Config::default().page_size(ROUTING_PAGE),
            |_| {},
            move |event| cache.apply_service(event),
        ),
        move |service| {
            referrers.of(
                "Service",
                service.metadata.namespace.as_deref(),
                &service.name_any(),
            )
        },
    );
    // ErrorBudgets: a cache to read their policy from, which also wakes the Rollouts a budget
    // targets when its status (or the budget itself) changes.
    let budget_api: Api<ErrorBudget> = crate::k8s::scoped(&client, namespace.as_deref());
    let (budgets, writer) = reflector::store();
    controller = controller.watches_stream(
        crate::k8s::watch::reflected(budget_api, watcher::Config::default(), writer),
        |budget| targets_of(&budget),
    );
    // Pipelines: a cache to read the admitted releases from, which also wakes the Rollouts a
    // Pipeline lists when it admits something.
    let pipeline_api: Api<Pipeline> = crate::k8s::scoped(&client, namespace.as_deref());
    let (pipelines, writer) = reflector::store();
    controller = controller.watches_stream(
        crate::k8s::watch::reflected(pipeline_api, watcher::Config::default(), writer),
        |pipeline| {
            pipeline
                .spec
                .stages
                .iter()
                .flat_map(|s| &s.rollouts)
                .map(|r| ObjectRef::new(&r.name).within(&r.namespace))
                .collect::<Vec<_>>()
        },
    );
    tokio::spawn(report_caches(
        budgets.clone(),
        pipelines.clone(),
        owned.readiness(),
    ));
    // Bounded by slots that a measurement gives back, not by kube's controller (slots.rs).
    let slots = Slots::new(ctx.settings.max_concurrent_reconciles);
    let state = Arc::new(State {
        // Route reads and writes are what a moving release waits on: a lane of their own.
        cluster: Cluster::new(ctx.route.clone(), routing),
        ctx,
        rollouts: store,
        budgets,
        pipelines,
        written,
        owned,
        slots,
        unrecorded: Unrecorded::default(),
    });
    controller
        .graceful_shutdown_on(crate::k8s::stopped(stop))
        .run(reconcile, error_policy, state)
        .for_each(crate::k8s::log_loop_error)
        .await;
}

/// Says when the caches every reconcile waits for are filled, and every minute until then
/// which one it waits for: a start at 10,000 Rollouts logged a warning (and counted a
/// failure) for each of 500 to 585 reconciles that waited, where waiting is what they should
/// do. Ends when the operator stops (a cache's watch ends).
async fn report_caches(
    budgets: Store<ErrorBudget>,
    pipelines: Store<Pipeline>,
    mut replica_sets: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let filled = async {
        budgets.wait_until_ready().await.ok()?;
        pipelines.wait_until_ready().await.ok()?;
        replica_sets.wait_for(|filled| *filled).await.ok()?;
        Some(())
    };
    tokio::pin!(filled);
    loop {
        match tokio::time::timeout(CACHES_SLOW, &mut filled).await {
            Ok(Some(())) => {
                tracing::info!(took = ?started.elapsed(), "caches filled: Rollouts are planned");
                return;
            }
            Ok(None) => return,
            Err(_) => {
                // The first one not filled, in the order they are waited for.
                let cache = if budgets.wait_until_ready().now_or_never().is_none() {
                    "ErrorBudget"
                } else if pipelines.wait_until_ready().now_or_never().is_none() {
                    "Pipeline"
                } else {
                    "ReplicaSet"
                };
                tracing::warn!(
                    waited = ?started.elapsed(),
                    cache,
                    "a cache is not filled yet, and no Rollout is planned until it is: can \
                     the operator list and watch its objects?"
                );
            }
        }
    }
}

/// The Rollouts an ErrorBudget targets.
fn targets_of(budget: &ErrorBudget) -> Vec<ObjectRef<CachedRollout>> {
    let own = budget.namespace().unwrap_or_default();
    budget
        .spec
        .targets
        .iter()
        .map(|t| ObjectRef::new(&t.rollout).within(t.namespace.as_deref().unwrap_or(&own)))
        .collect()
}

/// The policy actions in force from the budgets that target `rollout`.
fn budget_holds(budgets: &Store<ErrorBudget>, rollout: &Rollout) -> Vec<BudgetHold> {
    let me = cached::reference(rollout);
    let mut holds: Vec<BudgetHold> = budgets
        .state()
        .iter()
        .filter(|b| targets_of(b).contains(&me))
        .filter_map(|b| {
            let status = b.status.as_ref()?;
            let action = status.active_action?;
            let policy = if b.spec.policy.is_empty() {
                crate::errorbudget::policy::default_policy()
            } else {
                b.spec.policy.clone()
            };
            let rollback_window = policy
                .iter()
                .filter(|p| p.action == BudgetAction::Rollback)
                .find(|p| Some(p.when_consumed) == status.threshold_in_force)
                .or_else(|| policy.iter().find(|p| p.action == BudgetAction::Rollback))
                .and_then(|p| p.rollback_window.as_ref())
                .map_or(policy::DEFAULT_ROLLBACK_WINDOW, |w| w.as_std());
            Some(BudgetHold {
                budget: format!("{}/{}", b.namespace().unwrap_or_default(), b.name_any()),
                action,
                consumed_percent: status.consumed_percent,
                threshold: status.threshold_in_force,
                rollback_window,
            })
        })
        .collect();
    holds.sort_by(|a, b| a.budget.cmp(&b.budget));
    holds
}

fn backoff_key(rollout: &impl Resource) -> String {
    format!(
        "Rollout/{}/{}",
        rollout.namespace().unwrap_or_default(),
        rollout.name_any()
    )
}

fn error_policy(rollout: Arc<CachedRollout>, error: &Error, state: Arc<State>) -> Action {
    let ctx = &state.ctx;
    ctx.metrics()
        .reconcile_errors(CONTROLLER, error.metric_label());
    let conflict = matches!(error, Error::Router(RouterError::Conflict(_)))
        || matches!(error, Error::CacheBehind(_))
        || matches!(error, Error::Kube(e) if crate::k8s::is_conflict(e));
    // A conflict is someone else's write in between: read again soon, without backing off.
    if conflict {
        let delay = Duration::from_millis(500);
        tracing::debug!(error = %error, retry_in = ?delay, "reconcile raced another write");
        return Action::requeue(delay);
    }
    let delay = ctx.backoff.failed(&backoff_key(&*rollout));
    tracing::warn!(error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[tracing::instrument(skip(rollout, state), fields(rollout = %rollout.name_any(), namespace = rollout.namespace().unwrap_or_default()))]
async fn reconcile(rollout: Arc<CachedRollout>, state: Arc<State>) -> Result<Action, Error> {
    // Waiting for a slot, hold no copy of the Rollout (the cache may have moved on by the
    // turn of a reconcile queued in a start with thousands): take the cache's newest after.
    let cached = ObjectRef::from_obj(rollout.as_ref());
    // A person's abort goes before every other reconcile waiting for a slot. Known from the
    // copy that woke this reconcile: one already waiting when an abort arrives waits in its
    // turn (kube holds the abort's event until it ends) and then carries the abort out.
    let abort = rollout.abort_waiting();
    drop(rollout);
    let slot = if abort {
        state.slots.take_for_abort().await
    } else {
        state.slots.take().await
    };
    // The work is boxed, and made only once the slot is taken: its future holds the state of
    // every step (observations, plans, statuses), many kilobytes, and a start with thousands
    // of Rollouts queues one reconcile per Rollout for a slot.
    Box::pin(reconcile_in_slot(cached, state, slot)).await
}

async fn reconcile_in_slot(
    cached: ObjectRef<CachedRollout>,
    state: Arc<State>,
    slot: Slot,
) -> Result<Action, Error> {
    let Some(rollout) = state.rollouts.get(&cached) else {
        // Gone from the cache, so gone from the cluster: nothing left to do.
        return Ok(Action::await_change());
    };
    let rollout = Arc::new(
        rollout
            .rollout()
            .map_err(|e| Error::CacheUnreadable(e.to_string()))?,
    );
    let started = Instant::now();
    let namespace = rollout.namespace().unwrap_or_default();
    let key = backoff_key(&*rollout);
    let api: Api<Rollout> = Api::namespaced(state.ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, rollout, |event| async {
        match event {
            Finalizer::Apply(rollout) => apply(rollout, &state, &slot).await,
            Finalizer::Cleanup(rollout) => {
                let key = format!("{namespace}/{}", rollout.name_any());
                state.written.forget(&key);
                state.unrecorded.forget(&key);
                cleanup(rollout, &state).await
            }
        }
    })
    .await;
    state
        .ctx
        .metrics()
        .observe_reconcile(CONTROLLER, started.elapsed());
    let result = settle(result);
    if result.is_ok() {
        state.ctx.backoff.succeeded(&key);
    }
    result
}

/// What a reconcile's outcome, finalizer handling included, means for the controller: done,
/// or a failure of which kind.
fn settle(result: Result<Action, kube::runtime::finalizer::Error<Error>>) -> Result<Action, Error> {
    use kube::runtime::finalizer::Error as Failed;
    match result {
        Ok(action) => Ok(action),
        // Nothing left to take the finalizer off: the Rollout is gone (this reconcile ran on a
        // copy the cache held after the finalizer came off), or its namespace is (an object
        // left behind in a namespace deleted while it could not be seen; no request can change
        // it any more). Neither is a failure, and retrying cannot help.
        Err(Failed::RemoveFinalizer(e)) if crate::k8s::is_not_found(&e) => {
            tracing::debug!(error = %e, "nothing left to take the finalizer off");
            Ok(Action::await_change())
        }
        // The namespace is being deleted and refused a new object (a ReplicaSet its deletion
        // took away first). The Rollout's own deletion comes next and is reconciled then.
        Err(Failed::ApplyFailed(Error::Kube(e))) if crate::k8s::is_namespace_terminating(&e) => {
            tracing::info!("the namespace is being deleted: waiting for the Rollout's deletion");
            Ok(Action::await_change())
        }
        Err(Failed::ApplyFailed(e) | Failed::CleanupFailed(e)) => Err(e),
        // The finalizer patch tests the finalizers the cache showed: refused (422) when the
        // cache lags a finalizer just added. Someone else's write in between, as a conflict.
        Err(Failed::AddFinalizer(kube::Error::Api(e))) if e.code == 422 => {
            Err(Error::CacheBehind(e.message))
        }
        Err(other) => Err(Error::Finalizer(other.to_string())),
    }
}

/// On deletion: all traffic back to stable before the Rollout (and its ReplicaSets) go.
async fn cleanup(rollout: Arc<Rollout>, state: &State) -> Result<Action, Error> {
    let namespace = rollout.namespace().unwrap_or_default();
    state
        .ctx
        .metrics()
        .forget_rollout(&namespace, &rollout.name_any());
    let status = rollout.status.clone().unwrap_or_default();
    if let (Some(canary), Some(stable)) = (
        rollout.spec.strategy.canary.as_ref(),
        status.stable_revision.clone(),
    ) && let Some(router) = Router::for_canary(&state.cluster, &namespace, canary)
    {
        let targets = Targets {
            stable: stable.clone(),
            canary: stable,
        };
        match router.apply(&targets, 0).await {
            Ok(()) | Err(RouterError::Misconfigured(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

/// What one reconcile read from the cluster.
struct World {
    /// As cached (without its pod template) or, after a fresh read, whole.
    rollout: Arc<Rollout>,
    template: TemplateFacts,
    router: Option<Router>,
    observed: Observed,
}

/// Reads the Rollout (from the cache once it shows our last status write: planning on a
/// stale status would undo the last decision), its ReplicaSets and its traffic objects.
async fn observe(state: &State, cached: &Rollout) -> Result<Option<World>, Error> {
    let ctx = state.ctx.as_ref();
    let name = cached.name_any();
    let namespace = cached.namespace().unwrap_or_default();
    // A fresh read follows Sluice's own status write, mostly in a release in flight, and a
    // step or an abort waits on it: the urgent lane (a GET costs the apiserver little).
    let api: Api<Rollout> = Api::namespaced(ctx.urgent.clone(), &namespace);
    let key = format!("{namespace}/{name}");
    let reference = ObjectRef::new(&name).within(&namespace);
    let decoded = |c: &CachedRollout| {
        c.rollout()
            .map_err(|e| Error::CacheUnreadable(e.to_string()))
    };
    let rollout = match state.written.read(&state.rollouts, &reference, &key) {
        // The copy held since the reconcile began, unless the cache has moved since.
        Source::Cache(now) if now.resource_version() == cached.resource_version() => cached.clone(),
        Source::Cache(now) => decoded(&now)?,
        Source::Answer(answer) => decoded(&answer)?,
        Source::Apiserver => {
            let Some(fresh) = api.get_opt(&name).await? else {
                state.written.forget(&key);
                return Ok(None);
            };
            let cached_version = state
                .rollouts
                .get(&reference)
                .and_then(|c| c.resource_version());
            state.written.read_fresh(
                &key,
                fresh.resource_version().as_deref(),
                cached_version.as_deref(),
            );
            fresh
        }
    };
    let template = cached::facts(&rollout);
    let desired_hash = template.hash.clone();
    let mut status = rollout.status.clone().unwrap_or_default();
    // The runs as recorded: `measure` folds what it takes into `status` alone.
    let recorded_runs = state
        .unrecorded
        .merge(
            &key,
            &rollout.uid().unwrap_or_default(),
            &mut status.analysis_runs,
        )
        .unwrap_or_else(|| status.analysis_runs.clone());
    let strategy = &rollout.spec.strategy;
    let router = Router::for_strategy(&state.cluster, &namespace, strategy);
    let traffic = match &router {
        None => ObservedTraffic::None,
        Some(router) => {
            match router
                .observe(&release::current_targets(&status, &desired_hash))
                .await
            {
                Ok(state) => ObservedTraffic::State(state),
                Err(RouterError::Misconfigured(why)) => ObservedTraffic::Failed(why),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let services = match (&router, &strategy.blue_green) {
        (None, Some(bg)) => {
            let names = std::iter::once(&bg.active_service).chain(&bg.preview_service);
            let mut services = Vec::new();
            for service in names {
                services.push(observe_service(&state.cluster, &namespace, service).await?);
            }
            services
        }
        _ => Vec::new(),
    };
    let background = strategy.canary.as_ref().and_then(|c| {
        c.analysis
            .as_ref()
            .map(|a| analysis::resolve(a, None, c.prometheus.as_ref()))
    });
    let observed = Observed {
        generation: rollout.metadata.generation,
        spec: rollout.spec.clone(),
        status,
        desired_hash,
        // Copied from the cache only here, and not kept: a reconcile that measures holds its
        // World while it waits, and a start can have thousands waiting (carry_out reads
        // them again).
        replica_sets: state
            .owned
            .of(&namespace, &name, &rollout.uid().unwrap_or_default())
            .iter()
            .map(observe_replica_set)
            .collect(),
        traffic,
        background,
        services,
        budgets: budget_holds(&state.budgets, &rollout),
        leftovers: observe_leftovers(&state.cluster, &namespace, &rollout).await?,
        release: template.release.clone(),
        pipeline: pipeline_gate(&state.pipelines, &rollout),
        recorded_runs: Some(recorded_runs),
        passes_wait: ctx.settings.record_passes_within,
        now: Timestamp::now(),
    };
    Ok(Some(World {
        rollout: Arc::new(rollout),
        template,
        router,
        observed,
    }))
}

/// The objects Sluice marked that the spec no longer names, and whether they still carry
/// the revision label.
async fn observe_leftovers(
    cluster: &Cluster,
    namespace: &str,
    rollout: &Rollout,
) -> Result<Vec<ObservedLeftover>, Error> {
    let named = release::routed_objects(&rollout.spec);
    let recorded = rollout
        .status
        .as_ref()
        .map(|s| s.routed_objects.clone())
        .unwrap_or_default();
    let mut leftovers = Vec::new();
    for object in recorded.into_iter().filter(|o| !named.contains(o)) {
        let marked = match object.kind.as_str() {
            "DestinationRule" => {
                crate::traffic::destination_rule_pinned(cluster, namespace, &object.name)
                    .await?
                    .unwrap_or(false)
            }
            _ => match crate::traffic::selected_revision(cluster, namespace, &object.name).await {
                Ok(selects) => selects.is_some(),
                Err(RouterError::Misconfigured(_)) => false,
                Err(e) => return Err(e.into()),
            },
        };
        leftovers.push(ObservedLeftover { object, marked });
    }
    Ok(leftovers)
}

async fn observe_service(
    cluster: &Cluster,
    namespace: &str,
    service: &str,
) -> Result<ObservedService, Error> {
    let selected = crate::traffic::selected_revision(cluster, namespace, service).await;
    let (exists, selects) = match selected {
        Ok(selects) => (true, selects),
        Err(RouterError::Misconfigured(_)) => (false, None),
        Err(e) => return Err(e.into()),
    };
    Ok(ObservedService {
        name: service.to_string(),
        selects,
        exists,
    })
}

/// Which intents are in status, to notice a new one while measuring.
fn intent_ids(status: Option<&RolloutStatus>) -> Vec<Option<String>> {
    let status = status.cloned().unwrap_or_default();
    [
        status.abort.map(|i| i.id),
        status.promote.map(|i| i.id),
        status.promote_full.map(|i| i.id),
        status.retry.map(|i| i.id),
        status.pause.map(|i| i.id),
        status.resume.map(|i| i.id),
    ]
    .into()
}

/// Returns once the watch cache shows a request that was not there at `baseline`.
async fn intent_arrives(
    store: &Store<CachedRollout>,
    key: &ObjectRef<CachedRollout>,
    baseline: &[Option<String>],
) {
    // A cached Rollout is decoded only when it changed.
    let mut seen = None;
    loop {
        tokio::time::sleep(INTENT_POLL).await;
        let Some(cached) = store.get(key) else {
            continue;
        };
        if cached.resource_version() == seen {
            continue;
        }
        seen = cached.resource_version();
        if cached
            .rollout()
            .is_ok_and(|r| intent_ids(r.status.as_ref()) != baseline)
        {
            return;
        }
    }
}

/// Takes the measurements due now and folds them into the observed status. Returns false
/// when a person's request arrived meanwhile: the measurements are dropped (they are still
/// due next time) and the caller plans the request first.
async fn measure(ctx: &Context, store: &Store<CachedRollout>, world: &mut World) -> bool {
    let o = &mut world.observed;
    let name = world.rollout.name_any();
    let namespace = world.rollout.namespace().unwrap_or_default();
    let stable = release::current_targets(&o.status, &o.desired_hash).stable;
    let due = runs::due(
        &o.status,
        &o.spec.strategy,
        o.background.as_ref(),
        (&name, &namespace),
        &stable,
        o.now,
    );
    if due.is_empty() {
        return true;
    }
    let provider_ctx = ProviderContext {
        client: &ctx.client,
        namespace: &namespace,
        default_prometheus: ctx.settings.prometheus_address.as_deref(),
        pool: &ctx.prometheus,
        metrics: ctx.metrics(),
    };
    let asked: Vec<_> = due.iter().map(|d| (&d.metric, &d.vars)).collect();
    let baseline = intent_ids(Some(&o.status));
    let key = cached::reference(&world.rollout);
    let results = tokio::select! {
        results = provider::measure_all(&provider_ctx, &asked, MEASUREMENT_DEADLINE) => results,
        _ = intent_arrives(store, &key, &baseline) => {
            tracing::info!("a request arrived while measuring; acting on it first");
            return false;
        }
    };
    // Measured "now" is when the answers came back.
    o.now = Timestamp::now();
    let rollout_name = world.rollout.name_any();
    for (d, result) in due.iter().zip(&results) {
        let value = match result {
            Ok(crate::analysis::condition::MeasuredValue::Number(v)) => Some(*v),
            _ => None,
        };
        let threshold =
            |c: &Option<String>| c.as_deref().and_then(crate::analysis::condition::threshold);
        ctx.metrics().analysis(
            (&namespace, &rollout_name, &d.metric.name),
            value,
            [
                ("success", threshold(&d.metric.success_condition)),
                ("failure", threshold(&d.metric.failure_condition)),
            ],
        );
    }
    let measured = due.into_iter().zip(results).collect();
    for outcome in runs::record(
        &mut o.status,
        &o.spec.strategy,
        o.background.as_ref(),
        measured,
        o.now,
    ) {
        ctx.metrics().measurement(&format!("{outcome:?}"));
    }
    true
}

async fn apply(cached: Arc<Rollout>, state: &State, slot: &Slot) -> Result<Action, Error> {
    let ctx = state.ctx.as_ref();
    // Fail closed: without the budgets and Pipelines in cache, a hold could be missed.
    // Nor, without the ReplicaSets, the revision numbers.
    let caches = async {
        let _ = state.budgets.wait_until_ready().await;
        let _ = state.pipelines.wait_until_ready().await;
        state.owned.wait_until_ready().await;
    };
    if tokio::time::timeout(CACHE_WAIT, caches).await.is_err() {
        // Waiting is no failure: said once for all Rollouts (report_caches), not once each.
        tracing::debug!("waiting for the ErrorBudget, Pipeline and ReplicaSet caches");
        return Ok(Action::requeue(CACHE_WAIT));
    }
    // The steps' futures are boxed: each holds the state of its awaits, and inline they would
    // all be part of the reconcile's own (17 KB in a debug build), held while it waits.
    let Some(mut world) = Box::pin(observe(state, &cached)).await? else {
        return Ok(Action::await_change());
    };
    // A person's request (abort, promote, retry) is planned from the cluster as it is, before
    // any query is awaited: when the plan acts on one, it is carried out at once and the
    // measurements wait for the next reconcile, which follows immediately.
    let before = plan::plan(&world.observed);
    let handled = |status: &RolloutStatus| status.handled_intents.clone().unwrap_or_default();
    if handled(&before.status) != handled(&world.observed.status) {
        Box::pin(carry_out(state, &world, before)).await?;
        return Ok(Action::requeue(Duration::ZERO));
    }
    // Measuring holds no slot: another Rollout's abort never waits behind a measurement.
    let measured = slot
        .without(Box::pin(measure(ctx, &state.rollouts, &mut world)))
        .await;
    if !measured {
        return Ok(Action::requeue(Duration::ZERO));
    }
    let plan = plan::plan(&world.observed);
    // The plan's wake-up is a moment (its `now` plus the wait), not a wait from whenever the
    // writes end: the status write recording a pause takes 0.3 to 0.8 s on a busy apiserver,
    // and the step after the pause would start that much late whenever no other reconcile
    // came between to set the timer again.
    let wake_at = model::add(world.observed.now, plan.requeue_after);
    Box::pin(carry_out(state, &world, plan)).await?;
    Ok(Action::requeue(model::until(Timestamp::now(), wake_at)))
}

/// Makes the plan's writes, in its order: ReplicaSets that add pods, history, then the status
/// and the traffic in the order the plan says (the decision is recorded before traffic moves,
/// so a crash in between leaves a status from which the next reconcile makes the same move;
/// a person's abort and a timed pause that ran out move traffic first), then ReplicaSets that
/// add none; metrics last, and the Events handed over to be posted after (k8s/events.rs).
async fn carry_out(state: &State, world: &World, mut plan: Plan) -> Result<(), Error> {
    let ctx = state.ctx.as_ref();
    let rollout = world.rollout.as_ref();
    plan.status.selector = Some(selector_string(&rollout.spec.selector));
    let namespace = rollout.namespace().unwrap_or_default();
    // As the cache has them now: a moment newer than what was planned on, which only repeats
    // or skips a write already made (owned.rs).
    let owned = state.owned.of(
        &namespace,
        &rollout.name_any(),
        &rollout.uid().unwrap_or_default(),
    );
    apply_replica_sets(ctx, rollout, &owned, &plan.replica_sets, &world.template).await?;
    prune_history(ctx, rollout, &owned, &plan).await?;
    // The planner says what waits on the status write (plan::status_lane).
    let lane = ctx.lane(plan.status_lane);
    let api: Api<Rollout> = Api::namespaced(lane.clone(), &namespace);
    // Intents belong to the plugin's field manager: they are not ours to compare.
    let mut current = rollout.status.clone();
    if let Some(current) = current.as_mut() {
        current.clear_intents();
    }
    let traffic = || {
        write_traffic(
            &state.cluster,
            &namespace,
            world.router.as_ref(),
            &plan.traffic_writes,
        )
    };
    if plan.order == WriteOrder::TrafficFirst && !traffic().await? {
        if plan.status_needs_traffic {
            // The status counts a step done by the route just refused: it is not written,
            // and the next reconcile (after the back-off) observes the refusal and records it.
            return Err(Error::Router(RouterError::Misconfigured(
                "a route write was refused; the step it completes is not recorded".into(),
            )));
        }
        // A route refused as misconfigured was not written after all: not verified.
        if let Some(weights) = plan.status.weights.as_mut() {
            weights.verified = Some(false);
        }
    }
    let key = format!("{namespace}/{}", rollout.name_any());
    if plan.status_waits {
        let recorded = current.map(|s| s.analysis_runs).unwrap_or_default();
        let uid = rollout.uid().unwrap_or_default();
        state
            .unrecorded
            .keep(&key, &uid, recorded, plan.status.analysis_runs.clone());
    } else {
        // What comes before the write as it goes out: its answer is planned on only while the
        // cache shows one of these (written.rs).
        let cached = state
            .rollouts
            .get(&ObjectRef::new(&rollout.name_any()).within(&namespace))
            .and_then(|cached| cached.resource_version());
        let before = state.written.sending(&key, cached);
        if let Some(answer) =
            crate::k8s::status::apply(&api, rollout, current.as_ref(), &plan.status).await?
        {
            state.unrecorded.forget(&key);
            state.written.wrote(&key, before, answer);
        }
    }
    if plan.order == WriteOrder::StatusFirst {
        traffic().await?;
    }
    apply_replica_sets(
        ctx,
        rollout,
        &owned,
        &plan.replica_sets_after_traffic,
        &world.template,
    )
    .await?;
    if let Some(released) = plan.promoted.as_ref().and_then(|hash| {
        owned
            .iter()
            .find(|rs| rs.labels().get(HASH_LABEL) == Some(hash))
            .and_then(|rs| rs.metadata.creation_timestamp.as_ref())
    }) {
        let took =
            Duration::try_from(world.observed.now.duration_since(released.0)).unwrap_or_default();
        ctx.metrics().observe_release(took);
    }
    let reference: ObjectReference = rollout.object_ref(&());
    let mut events = Vec::new();
    for event in &plan.events {
        let report = |message: String| Report {
            warning: event.warning,
            reason: event.reason.as_str(),
            message,
        };
        events.push((reference.clone(), report(event.message.clone())));
        // A policy acting is recorded on the budgets too, naming the Rollout.
        if event.reason.is_budget_action() {
            for hold in world
                .observed
                .budgets
                .iter()
                .filter(|h| h.action != BudgetAction::Notify)
            {
                let (budget_namespace, budget) =
                    hold.budget.split_once('/').unwrap_or(("", &hold.budget));
                let on_budget = ObjectReference {
                    api_version: Some("sluice.dev/v1alpha1".into()),
                    kind: Some("ErrorBudget".into()),
                    name: Some(budget.to_string()),
                    namespace: Some(budget_namespace.to_string()),
                    ..ObjectReference::default()
                };
                let message = format!(
                    "Rollout {namespace}/{}: {}",
                    rollout.name_any(),
                    event.message
                );
                events.push((on_budget, report(message)));
            }
        }
    }
    let object = crate::k8s::events::object_key(&reference);
    ctx.events.hand_over(object, events).await;
    ctx.metrics().rollout_state(
        &namespace,
        &rollout.name_any(),
        plan.status.phase,
        plan.traffic.as_ref().map_or(0, |t| t.canary_weight),
    );
    Ok(())
}

/// Moves traffic: the plan's route, selector and release writes, in order. False when a
/// write was refused as misconfigured (logged; the next observation reports it).
async fn write_traffic(
    cluster: &Cluster,
    namespace: &str,
    router: Option<&Router>,
    writes: &[TrafficWrite],
) -> Result<bool, Error> {
    let mut all_written = true;
    for write in writes {
        let written = match (write, router) {
            (
                TrafficWrite::Route {
                    targets,
                    canary_weight,
                },
                Some(router),
            ) => router.apply(targets, *canary_weight).await,
            (TrafficWrite::Route { .. }, None) => Ok(()),
            (TrafficWrite::Selector { service, revision }, _) => {
                crate::traffic::point_service(cluster, namespace, service, revision).await
            }
            (TrafficWrite::Release(object), _) => {
                crate::traffic::release(cluster, namespace, &object.kind, &object.name).await
            }
        };
        match written {
            Ok(()) => tracing::info!(?write, "traffic written"),
            Err(RouterError::Misconfigured(why)) => {
                tracing::warn!(%why, "cannot route traffic");
                all_written = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(all_written)
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
    // Also the revision an ErrorBudget would roll back to, and one it rolled back.
    let status = &plan.status;
    let keep: Vec<&str> = [
        status.stable_revision.as_deref(),
        status.canary_revision.as_deref(),
        status.previous_revision.as_deref(),
        status.last_promotion.as_ref().map(|p| p.previous.as_str()),
        status.budget_rollback.as_ref().map(|r| r.revision.as_str()),
    ]
    .into_iter()
    .flatten()
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
            Err(e) if crate::k8s::is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn apply_replica_sets(
    ctx: &Context,
    rollout: &Rollout,
    owned: &[ReplicaSet],
    intents: &[ReplicaSetIntent],
    template: &TemplateFacts,
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
    for intent in intents {
        let existing = owned
            .iter()
            .find(|rs| rs.labels().get(HASH_LABEL) == Some(&intent.hash));
        let scale_down = intent.scale_down_at.map(|t| t.to_string());
        match existing {
            // The desired template: server-side apply of the whole ReplicaSet we own, unless
            // only its size or scale-down deadline is off.
            _ if intent.hash == template.hash => {
                let revision = existing
                    .and_then(|rs| rs.annotations().get(REVISION_ANNOTATION).cloned())
                    .unwrap_or_else(|| next_revision.to_string());
                let shape = desired_replica_set(
                    rollout,
                    &intent.hash,
                    intent.replicas,
                    &revision,
                    scale_down.clone(),
                    None,
                );
                if let Some(current) = existing {
                    match drift(current, &shape, &template.declared) {
                        Drift::None => continue,
                        Drift::Size => {
                            let name = current.name_any();
                            resize(&api, &name, intent.replicas, scale_down).await?;
                            continue;
                        }
                        Drift::More => {}
                    }
                }
                let whole = full_template(ctx, rollout, template).await?;
                let rs = desired_replica_set(
                    rollout,
                    &intent.hash,
                    intent.replicas,
                    &revision,
                    scale_down,
                    Some(&whole),
                );
                api.patch(
                    &shape.name_any(),
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
                resize(&api, &rs.name_any(), intent.replicas, scale_down).await?;
            }
            None => {
                tracing::debug!(rollout = %name, hash = %intent.hash, "no ReplicaSet for an old revision; nothing to scale")
            }
        }
    }
    Ok(())
}

/// Sets a ReplicaSet's size and scale-down deadline, and nothing else: a small patch, where
/// a whole apply would send (and the apiserver merge) the pod template again.
async fn resize(
    api: &Api<ReplicaSet>,
    name: &str,
    replicas: i32,
    scale_down: Option<String>,
) -> Result<(), Error> {
    let patch = json!({
        "metadata": {"annotations": {SCALE_DOWN_AT_ANNOTATION: scale_down}},
        "spec": {"replicas": replicas},
    });
    let params = PatchParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The Rollout's pod template, for a whole ReplicaSet write. The cache keeps none, so it is
/// read from the apiserver (a copy read fresh has it already). A template changed since the
/// cached copy is not written under the old hash: the reconcile is retried once the cache
/// has caught up.
async fn full_template(
    ctx: &Context,
    rollout: &Rollout,
    template: &TemplateFacts,
) -> Result<Arc<PodTemplateSpec>, Error> {
    if !cached::is_stripped(rollout) {
        return Ok(Arc::clone(&rollout.spec.template));
    }
    let namespace = rollout.namespace().unwrap_or_default();
    let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
    let fresh = api.get(&rollout.name_any()).await?;
    if revision::template_hash(&fresh.spec.template) != template.hash {
        return Err(Error::CacheBehind(format!(
            "the pod template of {namespace}/{} changed since the cached copy",
            rollout.name_any()
        )));
    }
    Ok(fresh.spec.template)
}

/// How a cached (stripped) ReplicaSet differs from what applying the desired one would make
/// it, in the fields Sluice sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drift {
    /// Nowhere: nothing to write (an idle resync writes nothing).
    None,
    /// Only in its size or scale-down deadline: resized.
    Size,
    /// Anywhere else: the whole ReplicaSet is applied again.
    More,
}

/// Compares `current` (as cached) with `desired` (built without its template). The pod
/// template is compared through the fingerprint of the declared-template annotation
/// (`declared`): the caches keep no template, and a new template is a new hash, so a new
/// ReplicaSet. (A template edited by hand on the ReplicaSet itself is therefore not put back
/// until Sluice writes it again.)
fn drift(current: &ReplicaSet, desired: &ReplicaSet, declared: &str) -> Drift {
    let annotation = |rs: &ReplicaSet, key: &str| rs.annotations().get(key).cloned();
    let identity_match = annotation(current, REVISION_ANNOTATION)
        == annotation(desired, REVISION_ANNOTATION)
        && annotation(current, TEMPLATE_ANNOTATION).as_deref() == Some(declared);
    let labels_match = desired
        .labels()
        .iter()
        .all(|(k, v)| current.labels().get(k) == Some(v));
    let owner_match = desired.owner_references().iter().all(|wanted| {
        current
            .owner_references()
            .iter()
            .any(|o| o.uid == wanted.uid && o.controller == wanted.controller)
    });
    let (spec_match, size_match) = match (&current.spec, &desired.spec) {
        (Some(c), Some(d)) => (
            c.min_ready_seconds == d.min_ready_seconds && c.selector == d.selector,
            c.replicas == d.replicas,
        ),
        _ => (false, false),
    };
    let deadline_match = annotation(current, SCALE_DOWN_AT_ANNOTATION)
        == annotation(desired, SCALE_DOWN_AT_ANNOTATION);
    match (
        identity_match && labels_match && owner_match && spec_match,
        size_match && deadline_match,
    ) {
        (true, true) => Drift::None,
        (true, false) => Drift::Size,
        (false, _) => Drift::More,
    }
}

/// The ReplicaSet of one revision as Sluice writes it; with `template: None` everything but
/// the pod template and its declared-template annotation (to compare with a cached one).
fn desired_replica_set(
    rollout: &Rollout,
    hash: &str,
    replicas: i32,
    revision: &str,
    scale_down_at: Option<String>,
    template: Option<&PodTemplateSpec>,
) -> ReplicaSet {
    let name = rollout.name_any();
    let pod_template = template.map(|declared| {
        let mut template = declared.clone();
        let metadata = template.metadata.get_or_insert_with(ObjectMeta::default);
        let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.insert(HASH_LABEL.into(), hash.into());
        // What a real mesh reports as `destination_canonical_revision`, unless the user chose.
        labels
            .entry(ISTIO_CANONICAL_REVISION_LABEL.into())
            .or_insert_with(|| hash.into());
        template
    });
    let mut selector = rollout.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut annotations = BTreeMap::from([(REVISION_ANNOTATION.to_string(), revision.to_string())]);
    if let Some(declared) = template {
        annotations.insert(TEMPLATE_ANNOTATION.into(), cached::declared_json(declared));
    }
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
            template: pod_template,
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
                     "strategy": {"canary": {"steps": []}}}
        }))
        .unwrap()
    }

    /// A reconcile's outcome, as the controller takes it: a Rollout or namespace already gone
    /// and a namespace being deleted are no failures; the rest keep their kind.
    #[test]
    fn a_reconcile_outcome_is_settled_by_what_failed() {
        use crate::k8s::test_errors::{api_error, namespace_terminating};
        use kube::runtime::finalizer::Error as Failed;
        let done = |r: Result<Action, Error>| matches!(r, Ok(a) if a == Action::await_change());
        let kind = |r: Result<Action, Error>| r.err().map(|e| e.metric_label());
        assert!(done(settle(Err(Failed::RemoveFinalizer(api_error(
            "NotFound", 404
        ))))));
        assert!(done(settle(Err(Failed::ApplyFailed(Error::Kube(
            namespace_terminating(403)
        ))))));
        assert_eq!(
            kind(settle(Err(Failed::RemoveFinalizer(api_error(
                "InternalError",
                500
            ))))),
            Some("finalizer")
        );
        // Refused for another reason, a create is a failure a person can act on.
        assert_eq!(
            kind(settle(Err(Failed::ApplyFailed(Error::Kube(api_error(
                "Forbidden",
                403
            )))))),
            Some("kube")
        );
        // While a namespace is deleted, a cleanup that fails is retried.
        assert_eq!(
            kind(settle(Err(Failed::CleanupFailed(Error::Kube(
                namespace_terminating(403)
            ))))),
            Some("kube")
        );
        assert_eq!(
            kind(settle(Err(Failed::AddFinalizer(api_error("Invalid", 422))))),
            Some("conflict")
        );
        assert!(matches!(
            settle(Ok(Action::requeue(Duration::from_secs(5)))),
            Ok(a) if a == Action::requeue(Duration::from_secs(5))
        ));
    }

    /// What a cached ReplicaSet needs: nothing, a resize, or a whole write.
    #[test]
    fn a_cached_replica_set_is_written_only_as_far_as_it_drifted() {
        let r = rollout();
        let declared = cached::TemplateFacts::of(&r.spec.template).declared;
        let whole = desired_replica_set(&r, "h1", 2, "3", None, Some(&r.spec.template));
        let shape = |r: &Rollout, replicas, revision, deadline: Option<&str>| {
            desired_replica_set(
                r,
                "h1",
                replicas,
                revision,
                deadline.map(String::from),
                None,
            )
        };
        // As read back: the apiserver added defaults and metadata of its own.
        let mut current = owned::as_cached(&whole);
        current.metadata.resource_version = Some("42".into());
        current
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("extra".into(), "kept".into());
        assert_eq!(
            drift(&current, &shape(&r, 2, "3", None), &declared),
            Drift::None
        );

        let deadline = Some("2026-12-02T10:00:00Z");
        assert_eq!(
            drift(&current, &shape(&r, 3, "3", None), &declared),
            Drift::Size
        );
        assert_eq!(
            drift(&current, &shape(&r, 2, "3", deadline), &declared),
            Drift::Size
        );
        // A deadline Sluice set earlier and no longer wants is written away.
        let with_deadline = owned::as_cached(&desired_replica_set(
            &r,
            "h1",
            2,
            "3",
            deadline.map(String::from),
            Some(&r.spec.template),
        ));
        assert_eq!(
            drift(&with_deadline, &shape(&r, 2, "3", None), &declared),
            Drift::Size
        );

        let mut other_owner = r.clone();
        other_owner.metadata.uid = Some("u-2".into());
        let mut other_template = r.clone();
        Arc::make_mut(&mut other_template.spec.template)
            .metadata
            .as_mut()
            .unwrap()
            .labels = Some(BTreeMap::from([
            ("app".into(), "web".into()),
            ("v".into(), "2".into()),
        ]));
        let other_declared = cached::TemplateFacts::of(&other_template.spec.template).declared;
        for (what, wanted, declared) in [
            ("revision", shape(&r, 2, "4", None), &declared),
            ("owner", shape(&other_owner, 2, "3", None), &declared),
            (
                "declared template",
                shape(&r, 2, "3", None),
                &other_declared,
            ),
        ] {
            assert_eq!(
                drift(&current, &wanted, declared),
                Drift::More,
                "{what} changed"
            );
        }
    }

    /// The cache keeps no template, yet a ReplicaSet written from a cached copy's facts is
    /// the one a full copy would write.
    #[test]
    fn a_stripped_rollout_compares_like_a_full_one() {
        let full = rollout();
        let mut stripped = full.clone();
        cached::strip(&mut stripped);
        let (a, b) = (cached::facts(&full), cached::facts(&stripped));
        assert_eq!(a, b);
        let whole = desired_replica_set(&full, &a.hash, 2, "1", None, Some(&full.spec.template));
        let current = owned::as_cached(&whole);
        let shape = desired_replica_set(&stripped, &b.hash, 2, "1", None, None);
        assert_eq!(drift(&current, &shape, &b.declared), Drift::None);
    }
}
