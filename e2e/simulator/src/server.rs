//! `GET /metrics`, `GET /state` and `GET /healthz`.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::{CONTENT_TYPE, Metrics};

pub struct Shared {
    pub metrics: Metrics,
    /// The last tick as JSON.
    pub state: RwLock<String>,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        Self {
            metrics: Metrics::new(),
            state: RwLock::new("{\"tick\":0,\"routes\":[]}".to_string()),
        }
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/state", get(state))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.metrics.encode() {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn state(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let body = shared
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
}

/// Binds first (so a busy port fails at startup), then serves until `shutdown` turns true.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{RequestLabels, Sample};
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(shared: &Arc<Shared>, path: &str) -> (StatusCode, String, String) {
        let response = router(shared.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let ct = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, ct, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints() {
        let shared = Arc::new(Shared::new());
        let (status, _, body) = get(&shared, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));

        shared.metrics.record(&[Sample {
            labels: RequestLabels {
                reporter: "destination".into(),
                source_workload: "sluice-traffic-sim".into(),
                destination_workload: "demo".into(),
                destination_workload_namespace: "shop".into(),
                destination_service: "demo.shop.svc.cluster.local".into(),
                destination_service_name: "demo".into(),
                destination_service_namespace: "shop".into(),
                destination_version: "aaa".into(),
                destination_canonical_revision: "aaa".into(),
                request_protocol: "http".into(),
                response_code: "200".into(),
            },
            requests: 3,
            latencies: vec![(50.0, 3)],
        }]);
        let (status, ct, body) = get(&shared, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct, CONTENT_TYPE);
        assert!(body.contains("istio_requests_total{"), "{body}");

        let (status, ct, body) = get(&shared, "/state").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct, "application/json");
        serde_json::from_str::<serde_json::Value>(&body).unwrap();
    }
}
