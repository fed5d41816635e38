//! Metric providers: where a measurement's value comes from. One trait, one file per
//! provider (`prometheus`, `errorbudget`), and one line in [`provider_for`] to add another.

use std::time::Duration;

use futures::future::BoxFuture;
use kube::Client;

use super::condition::MeasuredValue;
use super::pool::PrometheusPool;
use super::run::{ProviderFailure, ResolvedMetric, Source};
use super::template::TemplateVars;
use crate::telemetry::Metrics;

/// Where a provider runs: the cluster (for Secrets and ErrorBudgets), the defaults, the
/// pooled Prometheus clients and the metrics to report query latency to.
pub struct ProviderContext<'a> {
    pub client: &'a Client,
    /// Namespace of the object whose metric is measured (Secrets are read from it).
    pub namespace: &'a str,
    /// The operator's `--prometheus-address`.
    pub default_prometheus: Option<&'a str>,
    pub pool: &'a PrometheusPool,
    pub metrics: &'a Metrics,
}

/// A source of measurements.
pub trait MetricProvider: Send + Sync {
    /// Takes one measurement. Errors are data: `NoData` is judged inconclusive, `Error` an
    /// error; neither ever passes a condition. An identical measurement taken less than
    /// `fresh_for` ago may answer (the metric's interval: the freshness it works at).
    fn measure<'a>(
        &'a self,
        ctx: &'a ProviderContext<'a>,
        vars: &'a TemplateVars,
        fresh_for: Duration,
    ) -> BoxFuture<'a, Result<MeasuredValue, ProviderFailure>>;
}

/// The provider of a metric's source.
pub fn provider_for(source: &Source) -> &dyn MetricProvider {
    match source {
        Source::Prometheus(prometheus) => prometheus.as_ref(),
        Source::ErrorBudget(budget) => budget,
    }
}

/// Takes the measurements of `metrics` at once, under one overall deadline: a provider that
/// never answers costs at most `deadline`, and the others still count. A measurement cut off
/// by the deadline is an error that says so.
pub async fn measure_all(
    ctx: &ProviderContext<'_>,
    metrics: &[(&ResolvedMetric, &TemplateVars)],
    deadline: Duration,
) -> Vec<Result<MeasuredValue, ProviderFailure>> {
    let measurements = metrics.iter().map(|(metric, vars)| async move {
        let measured = provider_for(&metric.source).measure(ctx, vars, metric.interval);
        match tokio::time::timeout(deadline, measured).await {
            Ok(result) => result,
            Err(_) => Err(ProviderFailure::Error(format!(
                "no answer within {}",
                crate::api::Duration::from_std(deadline)
            ))),
        }
    });
    futures::future::join_all(measurements).await
}
