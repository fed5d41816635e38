//! The ErrorBudget metric provider: `[burn rate, remaining percent]` of an ErrorBudget.
//!
//! With `maxBurnRate`, the burn rate is the canary's own: the budget's indicator queries are
//! narrowed to the canary's revision (every selector gets the revision label, through the
//! PromQL syntax tree) and measured over the metric's window. Otherwise it is the shortest
//! burn window the budget publishes for the whole service.

use std::time::Duration;

use futures::future::BoxFuture;
use kube::Api;

use super::condition::MeasuredValue;
use super::narrow::narrow;
use super::prometheus::query_prometheus;
use super::provider::{MetricProvider, ProviderContext};
use super::run::ProviderFailure;
use super::template::{self, TemplateVars};
use crate::api::analysis::ErrorBudgetMetric;
use crate::api::errorbudget::{BudgetPhase, ErrorBudget, ErrorBudgetSpec, Objective};

/// The label Istio reports a workload's canonical revision in.
pub const DEFAULT_REVISION_LABEL: &str = "destination_canonical_revision";
const DEFAULT_CANARY_WINDOW: Duration = Duration::from_secs(60);

impl MetricProvider for ErrorBudgetMetric {
    fn measure<'a>(
        &'a self,
        ctx: &'a ProviderContext<'a>,
        vars: &'a TemplateVars,
        // The budget's status is read fresh each time; its burn-rate query shares only
        // while in flight.
        _fresh_for: std::time::Duration,
    ) -> BoxFuture<'a, Result<MeasuredValue, ProviderFailure>> {
        Box::pin(async move {
            let budget = fetch(ctx, self).await?;
            if self.max_burn_rate.is_none() {
                return budget_value(&budget);
            }
            let burn = canary_burn(ctx, self, &budget, &vars.canary_revision).await?;
            let remaining = match (
                budget.status.as_ref().and_then(|s| s.remaining_percent),
                self.min_remaining_percent,
            ) {
                (Some(remaining), _) => remaining,
                // Not asked about: any number passes `result[1]`-free conditions.
                (None, None) => 100.0,
                (None, Some(_)) => {
                    return Err(ProviderFailure::NoData(
                        "the ErrorBudget publishes no remaining budget yet".into(),
                    ));
                }
            };
            Ok(MeasuredValue::List(vec![burn, remaining]))
        })
    }
}

/// The budget's indicator narrowed to one revision over `window`: (bad or good query, total
/// query, whether the first counts good events).
pub fn canary_queries(
    spec: &ErrorBudgetSpec,
    window: Duration,
    label: &str,
    revision: &str,
) -> Result<(String, String, bool), String> {
    let vars = TemplateVars {
        window: Some(crate::api::Duration::from_std(window).to_string()),
        ..TemplateVars::default()
    };
    let ready = |query: &str| -> Result<String, String> {
        let rendered = template::render(query, &vars).map_err(|e| e.to_string())?;
        narrow(&rendered, label, revision)
    };
    let ratio = &spec.indicator.ratio;
    let (events, good) = match (&ratio.errors, &ratio.good) {
        (Some(errors), _) => (errors, false),
        (None, Some(good)) => (good, true),
        (None, None) => return Err("the ratio names neither errors nor good".into()),
    };
    Ok((ready(events)?, ready(&ratio.total)?, good))
}

/// The canary's burn rate: its error ratio over the metric's window, divided by the budget.
async fn canary_burn(
    ctx: &ProviderContext<'_>,
    metric: &ErrorBudgetMetric,
    budget: &ErrorBudget,
    revision: &str,
) -> Result<f64, ProviderFailure> {
    let spec = &budget.spec;
    let window = metric
        .window
        .as_ref()
        .map_or(DEFAULT_CANARY_WINDOW, |d| d.as_std());
    let label = metric
        .revision_label
        .as_deref()
        .unwrap_or(DEFAULT_REVISION_LABEL);
    let error_budget = Objective::parse(&spec.objective)
        .map_err(ProviderFailure::Error)?
        .budget();
    let (events, total, good) = canary_queries(spec, window, label, revision)
        .map_err(|e| ProviderFailure::Error(format!("ErrorBudget {}: {e}", metric.name)))?;
    let config = spec.prometheus.clone().unwrap_or_default();
    let timeout = super::pool::query_timeout(None, &config);
    let rate = |query: String| {
        let config = &config;
        async move {
            match query_prometheus(ctx, config, &query, timeout).await {
                Ok(MeasuredValue::Number(v)) => Ok(Some(v)),
                Ok(MeasuredValue::List(values)) => Err(ProviderFailure::Error(format!(
                    "the narrowed query returns {} series; aggregate it with sum(...)",
                    values.len()
                ))),
                Err(ProviderFailure::NoData(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    };
    let (events, total) = futures::join!(rate(events), rate(total));
    let total = total?.filter(|t| *t > 0.0).ok_or_else(|| {
        ProviderFailure::NoData(format!(
            "the canary {revision} had no traffic in the last {}",
            crate::api::Duration::from_std(window)
        ))
    })?;
    let events = events?.unwrap_or(0.0);
    let bad = if good { total - events } else { events };
    let ratio = bad / total;
    if !ratio.is_finite() || !(-1e-9..=1.0 + 1e-9).contains(&ratio) {
        return Err(ProviderFailure::Error(format!(
            "the canary's error ratio {ratio} is not between 0 and 1: check the indicator"
        )));
    }
    Ok(ratio.max(0.0) / error_budget)
}

async fn fetch(
    ctx: &ProviderContext<'_>,
    metric: &ErrorBudgetMetric,
) -> Result<ErrorBudget, ProviderFailure> {
    let namespace = metric.namespace.as_deref().unwrap_or(ctx.namespace);
    let budgets: Api<ErrorBudget> = Api::namespaced(ctx.client.clone(), namespace);
    budgets
        .get_opt(&metric.name)
        .await
        .map_err(|e| {
            ProviderFailure::Error(format!(
                "cannot read ErrorBudget {namespace}/{}: {e}",
                metric.name
            ))
        })?
        .ok_or_else(|| {
            ProviderFailure::Error(format!("ErrorBudget {namespace}/{} not found", metric.name))
        })
}

/// The service-wide figures an ErrorBudget publishes: `[shortest-window burn, remaining]`.
pub fn budget_value(budget: &ErrorBudget) -> Result<MeasuredValue, ProviderFailure> {
    let status = budget.status.as_ref();
    match status.and_then(|s| s.phase) {
        None | Some(BudgetPhase::Unknown) | Some(BudgetPhase::InsufficientData) => {
            return Err(ProviderFailure::NoData(
                "the ErrorBudget has not been evaluated yet".into(),
            ));
        }
        _ => {}
    }
    let status = status.ok_or_else(|| ProviderFailure::NoData("no status".into()))?;
    let shortest_burn = status
        .burn_rates
        .iter()
        .filter_map(|(window, rate)| {
            window
                .parse::<crate::api::Duration>()
                .ok()
                .map(|w| (w.as_std(), *rate))
        })
        .min_by_key(|(window, _)| *window)
        .map(|(_, rate)| rate);
    match (shortest_burn, status.remaining_percent) {
        (Some(burn), Some(remaining)) => Ok(MeasuredValue::List(vec![burn, remaining])),
        _ => Err(ProviderFailure::NoData(
            "the ErrorBudget publishes no burn rate or remaining budget yet".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::errorbudget::{ErrorBudgetSpec, ErrorBudgetStatus};

    fn budget(status: Option<ErrorBudgetStatus>) -> ErrorBudget {
        let spec: ErrorBudgetSpec = serde_json::from_value(serde_json::json!({
            "objective": "99.9", "window": "30d",
            "indicator": {"ratio": {"errors": "e", "total": "t"}}
        }))
        .unwrap();
        let mut b = ErrorBudget::new("b", spec);
        b.status = status;
        b
    }

    #[test]
    fn the_canary_queries_are_the_indicator_narrowed_to_its_revision() {
        let spec: ErrorBudgetSpec = serde_json::from_value(serde_json::json!({
            "objective": "99.9", "window": "30d",
            "indicator": {"ratio": {
                "errors": "sum(rate(req{code=~\"5..\"}[{{window}}]))",
                "total": "sum(rate(req[{{window}}]))"}}
        }))
        .unwrap();
        let (bad, total, good) =
            canary_queries(&spec, Duration::from_secs(60), "rev", "bbb").unwrap();
        assert!(!good);
        assert!(
            bad.contains(r#"rev="bbb""#) && bad.contains("[1m]"),
            "{bad}"
        );
        assert!(
            total.contains(r#"rev="bbb""#) && total.contains("[1m]"),
            "{total}"
        );
    }

    #[test]
    fn error_budget_value_is_shortest_burn_rate_and_remaining() {
        assert!(matches!(
            budget_value(&budget(None)),
            Err(ProviderFailure::NoData(_))
        ));
        let status = ErrorBudgetStatus {
            phase: Some(BudgetPhase::Healthy),
            remaining_percent: Some(57.9),
            burn_rates: [
                ("1h".to_string(), 1.1),
                ("5m".to_string(), 0.8),
                ("3d".to_string(), 1.0),
            ]
            .into(),
            ..ErrorBudgetStatus::default()
        };
        assert_eq!(
            budget_value(&budget(Some(status))),
            Ok(MeasuredValue::List(vec![0.8, 57.9]))
        );
    }
}
