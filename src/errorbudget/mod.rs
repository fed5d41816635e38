//! The ErrorBudget controller: evaluates each budget from Prometheus on its interval (and at
//! once on a spec change) and publishes the figures, the phase and the action in force.
//!
//! Observe (the budget, Prometheus's answers per window, whether the targets exist) -> plan
//! (pure, in `plan`) -> write the status. It writes only ErrorBudget status: the Rollout
//! controller reads that status and applies the policy to its own Rollouts.

pub mod plan;
pub mod policy;
pub mod slo;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::analysis::condition::MeasuredValue;
use crate::analysis::prometheus::query_prometheus;
use crate::analysis::provider::ProviderContext;
use crate::analysis::run::ProviderFailure;
use crate::analysis::template::{self, TemplateVars};
use crate::api::errorbudget::ErrorBudget;
use crate::api::rollout::Rollout;
use crate::context::Context;
use slo::Rates;

const CONTROLLER: &str = "errorbudget";
/// One evaluation (every window's queries, run together) gets at most this long.
const EVALUATION_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Runs the ErrorBudget controller until `stop`.
pub async fn run(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    let budgets: Api<ErrorBudget> =
        crate::k8s::scoped(&ctx.client, ctx.settings.namespace.as_deref());
    Controller::new(budgets, watcher::Config::default())
        .with_config(ctx.settings.controller_config())
        .graceful_shutdown_on(crate::k8s::stopped(stop))
        .run(reconcile, error_policy, ctx)
        .for_each(crate::k8s::log_loop_error)
        .await;
}

fn key(budget: &ErrorBudget) -> String {
    format!(
        "ErrorBudget/{}/{}",
        budget.namespace().unwrap_or_default(),
        budget.name_any()
    )
}

fn error_policy(budget: Arc<ErrorBudget>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics().reconcile_errors(CONTROLLER, "kube");
    let delay = ctx.backoff.failed(&key(&budget));
    tracing::warn!(error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[tracing::instrument(skip(cached, ctx), fields(budget = %cached.name_any(), namespace = cached.namespace().unwrap_or_default()))]
async fn reconcile(cached: Arc<ErrorBudget>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = evaluate(&cached, &ctx).await;
    ctx.metrics()
        .observe_reconcile(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.backoff.succeeded(&key(&cached));
    }
    result
}

async fn evaluate(cached: &ErrorBudget, ctx: &Context) -> Result<Action, Error> {
    let namespace = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    let api: Api<ErrorBudget> = Api::namespaced(ctx.client.clone(), &namespace);
    // Fresh: the cache can lag our own last status write, which says when we last evaluated.
    let Some(budget) = api.get_opt(&name).await? else {
        let published = cached.status.as_ref().map(|s| s.burn_rates.keys());
        ctx.metrics()
            .forget_budget(&namespace, &name, published.into_iter().flatten());
        return Ok(Action::await_change());
    };
    let status = budget.status.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let due = plan::due(&budget.spec, &status, budget.metadata.generation, now);
    let (answers, coverage, missing_targets) = if due {
        let (answers, coverage) = ask_prometheus(ctx, &budget).await;
        (
            Some(answers),
            coverage,
            Some(missing_targets(ctx, &budget).await?),
        )
    } else {
        (None, None, None)
    };
    let o = plan::Observed {
        generation: budget.metadata.generation,
        spec: budget.spec.clone(),
        status: status.clone(),
        answers,
        coverage,
        missing_targets,
        now: k8s_openapi::jiff::Timestamp::now(),
    };
    let plan = plan::plan(&o);
    crate::k8s::status::apply(&api, &budget, Some(&status), &plan.status).await?;
    let reference: ObjectReference = budget.object_ref(&());
    ctx.events.hand_over_on(&reference, &plan.events).await;
    ctx.metrics().budget_state(&namespace, &name, &plan.status);
    Ok(Action::requeue(plan.requeue_after))
}

/// Targets that do not exist, as `namespace/name`.
async fn missing_targets(ctx: &Context, budget: &ErrorBudget) -> Result<Vec<String>, Error> {
    let own = budget.namespace().unwrap_or_default();
    let mut missing = Vec::new();
    for target in &budget.spec.targets {
        let namespace = target.namespace.clone().unwrap_or_else(|| own.clone());
        let rollouts: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
        if rollouts.get_opt(&target.rollout).await?.is_none() {
            missing.push(format!("{namespace}/{}", target.rollout));
        }
    }
    Ok(missing)
}

/// Asks Prometheus for the bad and total rates of every window, and how much of the window
/// has data, all at once.
async fn ask_prometheus(
    ctx: &Context,
    budget: &ErrorBudget,
) -> (BTreeMap<Duration, plan::Answer>, Option<f64>) {
    let namespace = budget.namespace().unwrap_or_default();
    let config = budget.spec.prometheus.clone().unwrap_or_default();
    let timeout = crate::analysis::pool::query_timeout(None, &config);
    let provider_ctx = ProviderContext {
        client: &ctx.client,
        namespace: &namespace,
        default_prometheus: ctx.settings.prometheus_address.as_deref(),
        pool: &ctx.prometheus,
        metrics: ctx.metrics(),
    };
    let ratio = &budget.spec.indicator.ratio;
    let asks = plan::windows(&budget.spec).into_iter().map(|window| {
        let provider_ctx = &provider_ctx;
        let config = &config;
        async move {
            let vars = TemplateVars {
                window: Some(plan::window_text(window)),
                ..TemplateVars::default()
            };
            let rate = |query: &str| {
                let rendered = template::render(query, &vars);
                async move {
                    let rendered = rendered.map_err(|e| e.to_string())?;
                    match query_prometheus(provider_ctx, config, &rendered, timeout).await {
                        Ok(MeasuredValue::Number(v)) => Ok(v),
                        // No series: no such events (no 5xx yet, or no traffic at all).
                        Err(ProviderFailure::NoData(_)) => Ok(0.0),
                        Ok(MeasuredValue::List(values)) => Err(format!(
                            "the query returns {} series; aggregate it with sum(...)",
                            values.len()
                        )),
                        Err(ProviderFailure::Error(e)) => Err(e),
                    }
                }
            };
            let total = rate(&ratio.total);
            let answer = match (&ratio.errors, &ratio.good) {
                (Some(errors), _) => {
                    let (bad, total) = futures::join!(rate(errors), total);
                    bad.and_then(|bad| total.map(|total| Rates { bad, total }))
                }
                (None, Some(good)) => {
                    let (good, total) = futures::join!(rate(good), total);
                    good.and_then(|good| {
                        total.map(|total| Rates {
                            bad: total - good,
                            total,
                        })
                    })
                }
                (None, None) => Err("the ratio names neither errors nor good".to_string()),
            };
            (window, answer)
        }
    });
    let coverage = async {
        let step = TemplateVars {
            window: Some(plan::window_text(plan::coverage_step(&budget.spec))),
            ..TemplateVars::default()
        };
        let total = template::render(&ratio.total, &step).ok()?;
        let (query, points) = plan::coverage_query(&budget.spec, &total);
        match query_prometheus(&provider_ctx, &config, &query, timeout).await {
            Ok(MeasuredValue::Number(answered)) => Some(answered / points as f64),
            Err(ProviderFailure::NoData(_)) => Some(0.0),
            _ => None,
        }
    };
    let all = futures::future::join(futures::future::join_all(asks), coverage);
    match tokio::time::timeout(EVALUATION_DEADLINE, all).await {
        Ok((answers, coverage)) => (answers.into_iter().collect(), coverage),
        Err(_) => (
            plan::windows(&budget.spec)
                .into_iter()
                .map(|w| {
                    (
                        w,
                        Err(format!(
                            "no answer within {}",
                            crate::api::Duration::from_std(EVALUATION_DEADLINE)
                        )),
                    )
                })
                .collect(),
            None,
        ),
    }
}
