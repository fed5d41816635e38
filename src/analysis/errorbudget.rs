//! The ErrorBudget metric provider: reads an ErrorBudget's published status.

use futures::future::BoxFuture;
use kube::Api;

use super::condition::MeasuredValue;
use super::provider::{MetricProvider, ProviderContext};
use super::run::ProviderFailure;
use super::template::TemplateVars;
use crate::api::analysis::ErrorBudgetMetric;
use crate::api::errorbudget::{BudgetPhase, ErrorBudget};

impl MetricProvider for ErrorBudgetMetric {
    fn measure<'a>(
        &'a self,
        ctx: &'a ProviderContext<'a>,
        _vars: &'a TemplateVars,
    ) -> BoxFuture<'a, Result<MeasuredValue, ProviderFailure>> {
        Box::pin(read_error_budget(ctx, self))
    }
}

/// Reads an ErrorBudget's status: `[burn rate of the shortest window, remaining percent]`.
pub async fn read_error_budget(
    ctx: &ProviderContext<'_>,
    metric: &ErrorBudgetMetric,
) -> Result<MeasuredValue, ProviderFailure> {
    let namespace = metric.namespace.as_deref().unwrap_or(ctx.namespace);
    let budgets: Api<ErrorBudget> = Api::namespaced(ctx.client.clone(), namespace);
    let budget = budgets
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
        })?;
    budget_value(&budget)
}

/// The pure half of [`read_error_budget`].
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
