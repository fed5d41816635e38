//! The operator's HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::telemetry::Metrics;

/// What the endpoints report on.
pub struct Health {
    pub metrics: Metrics,
    /// Set once the operator has reached the apiserver and is serving (as leader or standby).
    pub ready: AtomicBool,
}

impl Health {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            ready: AtomicBool::new(false),
        }
    }
}

/// The routes, separate from the listener so tests can call them directly.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for /healthz, /readyz and /metrics: {e}")
    })?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, router(health))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(health: &Arc<Health>, path: &str) -> (StatusCode, String) {
        let response = router(health.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readyz_follows_the_ready_flag() {
        let health = Arc::new(Health::new(Metrics::new()));
        assert_eq!(get(&health, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&health, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&health, "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text() {
        let health = Arc::new(Health::new(Metrics::new()));
        let (status, body) = get(&health, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("sluice_build_info"));
    }
}
