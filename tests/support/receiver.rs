//! A local HTTP receiver that plays Slack, Microsoft Teams, PagerDuty and a CloudEvents sink
//! for the notification tests, and the Notifiers that send to it.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{TestNamespace, create};

/// The secret part of every webhook URL and key in these tests: it must appear nowhere but
/// in the requests the receiver gets.
pub const TOKEN: &str = "T0KEN-5ecret-d0-not-leak";

#[derive(Clone, Debug)]
pub struct Received {
    pub channel: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct Receiver {
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Answer 500 to this many requests before answering 200 again (`u32::MAX`: always).
    fail_next: Arc<Mutex<u32>>,
}

impl Receiver {
    /// Serves on 127.0.0.1: POST /<channel>/<token> records the request.
    pub async fn start() -> (Self, String) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/{channel}/{token}", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, address)
    }

    pub fn of(&self, channel: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.channel == channel)
            .cloned()
            .collect()
    }

    pub fn fail(&self, requests: u32) {
        *self.fail_next.lock().unwrap() = requests;
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    Path((channel, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    {
        let mut fail = receiver.fail_next.lock().unwrap();
        if *fail > 0 {
            *fail = fail.saturating_sub(if *fail == u32::MAX { 0 } else { 1 });
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    // PagerDuty's endpoint is public; its key travels in the body (checked by the test).
    if token != TOKEN && channel != "pagerduty" {
        return StatusCode::UNAUTHORIZED;
    }
    receiver.received.lock().unwrap().push(Received {
        channel,
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
    });
    StatusCode::OK
}

/// A Secret with one key, and a Notifier of `channel` (`spec` is the channel's own fields and
/// any filters) in `ns`.
pub async fn notifier(ns: &TestNamespace, name: &str, secret_value: &str, spec: Value) {
    create(
        ns,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": ns.name},
                "stringData": {"value": secret_value}}),
    )
    .await
    .unwrap();
    create(
        ns,
        &json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Notifier",
                "metadata": {"name": name, "namespace": ns.name}, "spec": spec}),
    )
    .await
    .unwrap();
}

pub fn secret_ref(name: &str) -> Value {
    json!({"name": name, "key": "value"})
}
