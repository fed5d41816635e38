//! The Prometheus metric provider: renders the query, asks Prometheus through a pooled
//! client (`pool`), and turns the answer into a value. Timeouts and refused connections are told
//! apart in the message, because a person fixes them differently.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::condition::MeasuredValue;
use super::pool::PrometheusPool;
use super::provider::{MetricProvider, ProviderContext};
use super::run::{PrometheusSource, ProviderFailure};
use super::template::{self, TemplateVars};
use crate::api::analysis::PrometheusConfig;

impl MetricProvider for PrometheusSource {
    fn measure<'a>(
        &'a self,
        ctx: &'a ProviderContext<'a>,
        vars: &'a TemplateVars,
        fresh_for: Duration,
    ) -> BoxFuture<'a, Result<MeasuredValue, ProviderFailure>> {
        Box::pin(async move {
            let query = template::render(&self.metric.query, vars)
                .map_err(|e| ProviderFailure::Error(e.to_string()))?;
            let timeout = super::pool::query_timeout(self.metric.timeout.as_ref(), &self.config);
            query_shared(ctx, &self.config, &query, timeout, fresh_for).await
        })
    }
}

/// Runs an (already rendered) PromQL instant query and turns the answer into a value. An
/// identical query in flight answers this one too.
pub async fn query_prometheus(
    ctx: &ProviderContext<'_>,
    config: &PrometheusConfig,
    query: &str,
    timeout: Duration,
) -> Result<MeasuredValue, ProviderFailure> {
    query_shared(ctx, config, query, timeout, Duration::ZERO).await
}

/// As [`query_prometheus`], also taking an identical query's answer younger than `window`.
async fn query_shared(
    ctx: &ProviderContext<'_>,
    config: &PrometheusConfig,
    query: &str,
    timeout: Duration,
    window: Duration,
) -> Result<MeasuredValue, ProviderFailure> {
    let address = config
        .address
        .as_deref()
        .or(ctx.default_prometheus)
        .ok_or_else(|| ProviderFailure::Error("no Prometheus address: set prometheus.address or the operator's --prometheus-address".into()))?;
    let client = ctx
        .pool
        .client(ctx.namespace, address, config, timeout)
        .await?;
    let key = PrometheusPool::answer_key(ctx.namespace, address, config, timeout, query);
    let ask = ask(client, address.to_string(), query.to_string(), timeout);
    let started = Instant::now();
    let (answer, how) = ctx.pool.answers.answer(key, window, ask).await;
    ctx.metrics.observe_query(started.elapsed(), how);
    answer
}

/// Sends one query to Prometheus.
async fn ask(
    client: prometheus_http_query::Client,
    address: String,
    query: String,
    timeout: Duration,
) -> Result<MeasuredValue, ProviderFailure> {
    let answer = tokio::time::timeout(timeout, client.query(query).get()).await;
    let response = match answer {
        Err(_) => {
            return Err(ProviderFailure::Error(format!(
                "Prometheus at {address}: timed out after {}",
                crate::api::Duration::from_std(timeout)
            )));
        }
        Ok(Err(e)) => {
            return Err(ProviderFailure::Error(format!(
                "Prometheus at {address}: {}",
                describe(&e)
            )));
        }
        Ok(Ok(response)) => response,
    };
    value_of(response.data())
}

/// A Prometheus client error in the words a person needs: the root cause of a transport
/// failure ("connection refused"), Prometheus's own message for a bad query.
fn describe(error: &prometheus_http_query::Error) -> String {
    use prometheus_http_query::Error;
    match error {
        Error::Client(client) => match client.inner() {
            Some(e) if e.is_timeout() => "timed out".to_string(),
            Some(e) => {
                let mut root: &dyn std::error::Error = e;
                while let Some(next) = root.source() {
                    root = next;
                }
                let cause = root.to_string();
                if e.is_connect() {
                    format!("cannot connect: {cause}")
                } else {
                    cause
                }
            }
            None => client.to_string(),
        },
        Error::Prometheus(e) => format!("query refused: {e}"),
        other => other.to_string(),
    }
}

/// The value of an instant query's answer.
pub fn value_of(
    data: &prometheus_http_query::response::Data,
) -> Result<MeasuredValue, ProviderFailure> {
    use prometheus_http_query::response::Data;
    match data {
        Data::Scalar(sample) => Ok(MeasuredValue::Number(sample.value())),
        Data::Vector(samples) => match samples.as_slice() {
            [] => Err(ProviderFailure::NoData(
                "the query returned no samples".into(),
            )),
            [one] => Ok(MeasuredValue::Number(one.sample().value())),
            many => Ok(MeasuredValue::List(
                many.iter().map(|s| s.sample().value()).collect(),
            )),
        },
        Data::Matrix(_) => Err(ProviderFailure::Error(
            "the query returned a range vector: use an instant query".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_http_query::response::Data;

    #[test]
    fn vectors_and_scalars_become_values() {
        let empty: Data =
            serde_json::from_value(serde_json::json!({"resultType": "vector", "result": []}))
                .unwrap();
        assert!(matches!(value_of(&empty), Err(ProviderFailure::NoData(_))));
        let one: Data = serde_json::from_value(serde_json::json!({"resultType": "vector",
            "result": [{"metric": {}, "value": [1700000000.0, "0.25"]}]}))
        .unwrap();
        assert_eq!(value_of(&one), Ok(MeasuredValue::Number(0.25)));
        let two: Data = serde_json::from_value(serde_json::json!({"resultType": "vector",
            "result": [{"metric": {"a": "1"}, "value": [1.0, "1"]}, {"metric": {"a": "2"}, "value": [1.0, "NaN"]}]})).unwrap();
        let Ok(MeasuredValue::List(values)) = value_of(&two) else {
            panic!("list")
        };
        assert_eq!(values[0], 1.0);
        assert!(values[1].is_nan());
        let scalar: Data = serde_json::from_value(
            serde_json::json!({"resultType": "scalar", "result": [1.0, "3"]}),
        )
        .unwrap();
        assert_eq!(value_of(&scalar), Ok(MeasuredValue::Number(3.0)));
    }
}
