//! Metric providers: where a measurement's value comes from.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::condition::MeasuredValue;
use super::run::ProviderFailure;
use crate::api::analysis::{ErrorBudgetMetric, PrometheusConfig, PrometheusMetric};
use crate::api::common::SecretKeyRef;
use crate::api::errorbudget::{BudgetPhase, ErrorBudget};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a provider runs: the cluster (for Secrets and ErrorBudgets) and the defaults.
#[derive(Clone)]
pub struct ProviderContext {
    pub client: Client,
    /// Namespace of the object whose metric is measured (Secrets are read from it).
    pub namespace: String,
    /// The operator's `--prometheus-address`.
    pub default_prometheus: Option<String>,
}

/// Runs an (already rendered) PromQL query and turns the answer into a value.
pub async fn query_prometheus(
    ctx: &ProviderContext,
    metric: &PrometheusMetric,
    config: &PrometheusConfig,
    query: &str,
) -> Result<MeasuredValue, ProviderFailure> {
    let address = config
        .address
        .as_deref()
        .or(ctx.default_prometheus.as_deref())
        .ok_or_else(|| ProviderFailure::Error("no Prometheus address: set prometheus.address or the operator's --prometheus-address".into()))?;
    let timeout = metric
        .timeout
        .as_ref()
        .or(config.timeout.as_ref())
        .map_or(DEFAULT_TIMEOUT, |d| d.as_std());
    let http = http_client(ctx, config, timeout).await?;
    let client = prometheus_http_query::Client::from(http, address)
        .map_err(|e| ProviderFailure::Error(format!("bad Prometheus address {address:?}: {e}")))?;
    let response = client
        .query(query)
        .get()
        .await
        .map_err(|e| ProviderFailure::Error(format!("Prometheus at {address}: {e}")))?;
    value_of(response.data())
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

async fn http_client(
    ctx: &ProviderContext,
    config: &PrometheusConfig,
    timeout: Duration,
) -> Result<reqwest::Client, ProviderFailure> {
    let mut headers = HeaderMap::new();
    for header in &config.headers {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| ProviderFailure::Error(format!("bad header name {:?}", header.name)))?;
        let value = HeaderValue::from_str(&header.value)
            .map_err(|_| ProviderFailure::Error(format!("bad value for header {}", header.name)))?;
        headers.insert(name, value);
    }
    if let Some(auth) = &config.auth {
        let value = if let Some(token) = &auth.bearer_token_secret_ref {
            format!("Bearer {}", secret_value(ctx, token).await?.trim())
        } else if let Some(basic) = &auth.basic {
            use base64::Engine;
            let user = secret_value(ctx, &basic.username_secret_ref).await?;
            let password = secret_value(ctx, &basic.password_secret_ref).await?;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    user.trim(),
                    password.trim()
                ))
            )
        } else {
            String::new()
        };
        if !value.is_empty() {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ProviderFailure::Error(
                    "credentials contain characters not allowed in a header".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
    }
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .default_headers(headers);
    if let Some(tls) = &config.tls {
        if let Some(ca) = &tls.ca_secret_ref {
            let pem = secret_value(ctx, ca).await?;
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| {
                ProviderFailure::Error(format!("CA in Secret {}/{}: {e}", ca.name, ca.key))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        if tls.insecure_skip_verify == Some(true) {
            builder = builder.danger_accept_invalid_certs(true);
        }
    }
    builder
        .build()
        .map_err(|e| ProviderFailure::Error(format!("cannot build the HTTP client: {e}")))
}

async fn secret_value(
    ctx: &ProviderContext,
    key: &SecretKeyRef,
) -> Result<String, ProviderFailure> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = secrets
        .get_opt(&key.name)
        .await
        .map_err(|e| {
            ProviderFailure::Error(format!(
                "cannot read Secret {}/{}: {e}",
                ctx.namespace, key.name
            ))
        })?
        .ok_or_else(|| {
            ProviderFailure::Error(format!("Secret {}/{} not found", ctx.namespace, key.name))
        })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key.key))
        .ok_or_else(|| {
            ProviderFailure::Error(format!(
                "Secret {}/{} has no key {}",
                ctx.namespace, key.name, key.key
            ))
        })?;
    String::from_utf8(bytes.0.clone()).map_err(|_| {
        ProviderFailure::Error(format!(
            "Secret {}/{} key {} is not text",
            ctx.namespace, key.name, key.key
        ))
    })
}

/// Reads an ErrorBudget's status: `[burn rate of the shortest window, remaining percent]`.
pub async fn read_error_budget(
    ctx: &ProviderContext,
    metric: &ErrorBudgetMetric,
) -> Result<MeasuredValue, ProviderFailure> {
    let namespace = metric.namespace.as_deref().unwrap_or(&ctx.namespace);
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
