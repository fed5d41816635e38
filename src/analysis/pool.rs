//! Prometheus clients, pooled by connection settings: connections are reused across queries,
//! and the Secrets that hold credentials are read when a client is built, not per query.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::answers::SharedAnswers;
use super::run::ProviderFailure;
use crate::api::analysis::PrometheusConfig;
use crate::api::common::SecretKeyRef;

/// How long a pooled client (and the Secret values baked into it) is reused: a rotated token
/// is picked up within this bound, and idle connections are not kept forever.
const CLIENT_TTL: Duration = Duration::from_secs(60);
/// Pooled clients at most (distinct connection settings in use at once).
const POOL_LIMIT: usize = 256;
/// A query's timeout when neither the metric nor the Prometheus settings set one.
const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The timeout of a query: the metric's own, else the Prometheus settings', else 10 s.
pub fn query_timeout(metric: Option<&crate::api::Duration>, config: &PrometheusConfig) -> Duration {
    metric
        .or(config.timeout.as_ref())
        .map_or(DEFAULT_QUERY_TIMEOUT, |d| d.as_std())
}

/// Prometheus clients keyed by everything that shapes them (address, timeout, headers,
/// auth and TLS, and the namespace whose Secrets they read), reused for [`CLIENT_TTL`].
/// Also the answers identical queries share ([`SharedAnswers`]).
pub struct PrometheusPool {
    client: Client,
    clients: Mutex<HashMap<String, (prometheus_http_query::Client, Instant)>>,
    pub answers: SharedAnswers,
}

impl PrometheusPool {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            clients: Mutex::new(HashMap::new()),
            answers: SharedAnswers::default(),
        }
    }

    /// What makes two queries the same: the query text and everything that shapes the
    /// client that sends it (an answer got with one namespace's credentials is never given
    /// to another namespace).
    pub fn answer_key(
        namespace: &str,
        address: &str,
        config: &PrometheusConfig,
        timeout: Duration,
        query: &str,
    ) -> String {
        format!("{}\n{query}", pool_key(namespace, address, config, timeout))
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
