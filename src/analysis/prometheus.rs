//! The Prometheus metric provider: renders the query, asks Prometheus through a pooled
//! client, and turns the answer into a value. Timeouts and refused connections are told
//! apart in the message, because a person fixes them differently.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::condition::MeasuredValue;
use super::provider::{MetricProvider, ProviderContext};
use super::run::{PrometheusSource, ProviderFailure};
use super::template::{self, TemplateVars};
use crate::api::analysis::PrometheusConfig;
use crate::api::common::SecretKeyRef;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pooled client (and the Secret values baked into it) is reused: a rotated token
/// is picked up within this bound, and idle connections are not kept forever.
const CLIENT_TTL: Duration = Duration::from_secs(60);
/// Pooled clients at most (distinct connection settings in use at once).
const POOL_LIMIT: usize = 256;

impl MetricProvider for PrometheusSource {
    fn measure<'a>(
        &'a self,
        ctx: &'a ProviderContext<'a>,
        vars: &'a TemplateVars,
    ) -> BoxFuture<'a, Result<MeasuredValue, ProviderFailure>> {
        Box::pin(async move {
            let query = template::render(&self.metric.query, vars)
                .map_err(|e| ProviderFailure::Error(e.to_string()))?;
            let timeout = self
                .metric
                .timeout
                .as_ref()
                .or(self.config.timeout.as_ref())
                .map_or(DEFAULT_TIMEOUT, |d| d.as_std());
            let started = Instant::now();
            let result = query_prometheus(ctx, &self.config, &query, timeout).await;
            ctx.metrics.observe_query(started.elapsed());
            result
        })
    }
}

/// Runs an (already rendered) PromQL instant query and turns the answer into a value.
pub async fn query_prometheus(
    ctx: &ProviderContext<'_>,
    config: &PrometheusConfig,
    query: &str,
    timeout: Duration,
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

/// Prometheus clients keyed by everything that shapes them (address, timeout, headers,
/// auth and TLS, and the namespace whose Secrets they read), reused for [`CLIENT_TTL`].
pub struct PrometheusPool {
    client: Client,
    clients: Mutex<HashMap<String, (prometheus_http_query::Client, Instant)>>,
}

impl PrometheusPool {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A pooled client for these settings, built (and Secrets read) only when none is fresh.
    pub async fn client(
        &self,
        namespace: &str,
        address: &str,
        config: &PrometheusConfig,
        timeout: Duration,
    ) -> Result<prometheus_http_query::Client, ProviderFailure> {
        let key = pool_key(namespace, address, config, timeout);
        if let Ok(clients) = self.clients.lock()
            && let Some((client, built)) = clients.get(&key)
            && built.elapsed() < CLIENT_TTL
        {
            return Ok(client.clone());
        }
        let http = http_client(&self.client, namespace, config, timeout).await?;
        let client = prometheus_http_query::Client::from(http, address).map_err(|e| {
            ProviderFailure::Error(format!("bad Prometheus address {address:?}: {e}"))
        })?;
        if let Ok(mut clients) = self.clients.lock() {
            clients.retain(|_, (_, built)| built.elapsed() < CLIENT_TTL);
            if clients.len() >= POOL_LIMIT {
                clients.clear();
            }
            clients.insert(key, (client.clone(), Instant::now()));
        }
        Ok(client)
    }

    /// Clients held now (for tests and the benchmark).
    pub fn len(&self) -> usize {
        self.clients.lock().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn pool_key(
    namespace: &str,
    address: &str,
    config: &PrometheusConfig,
    timeout: Duration,
) -> String {
    // Secrets are per namespace: the namespace is part of the key only when Secrets are read.
    let reads_secrets = config.auth.is_some()
        || config
            .tls
            .as_ref()
            .is_some_and(|t| t.ca_secret_ref.is_some());
    let shape = serde_json::json!({
        "namespace": if reads_secrets { namespace } else { "" },
        "address": address,
        "timeoutMillis": timeout.as_millis() as u64,
        "headers": config.headers,
        "auth": config.auth,
        "tls": config.tls,
    });
    shape.to_string()
}

async fn http_client(
    client: &Client,
    namespace: &str,
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
            format!(
                "Bearer {}",
                secret_value(client, namespace, token).await?.trim()
            )
        } else if let Some(basic) = &auth.basic {
            use base64::Engine;
            let user = secret_value(client, namespace, &basic.username_secret_ref).await?;
            let password = secret_value(client, namespace, &basic.password_secret_ref).await?;
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
            let pem = secret_value(client, namespace, ca).await?;
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
    client: &Client,
    namespace: &str,
    key: &SecretKeyRef,
) -> Result<String, ProviderFailure> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(&key.name)
        .await
        .map_err(|e| {
            ProviderFailure::Error(format!(
                "cannot read Secret {}/{}: {e}",
                namespace, key.name
            ))
        })?
        .ok_or_else(|| {
            ProviderFailure::Error(format!("Secret {}/{} not found", namespace, key.name))
        })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key.key))
        .ok_or_else(|| {
            ProviderFailure::Error(format!(
                "Secret {}/{} has no key {}",
                namespace, key.name, key.key
            ))
        })?;
    String::from_utf8(bytes.0.clone()).map_err(|_| {
        ProviderFailure::Error(format!(
            "Secret {}/{} key {} is not text",
            namespace, key.name, key.key
        ))
    })
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
