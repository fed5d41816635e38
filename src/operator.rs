//! The `sluice controller` process: connects to the cluster, serves health and metrics,
//! campaigns for leadership, and runs the controllers while it leads.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderValue;
use http::header::USER_AGENT;
use kube::client::ClientBuilder;
use kube::{Client, Config};
use tokio::sync::watch;

use crate::context::{Context, Lanes};
use crate::fence::{Fence, FenceLayer};
use crate::k8s::lanes::{Gate, Lane};
use crate::k8s::requests::{CountingLayer, RequestCounts};
use crate::leader;
use crate::server::{self, Health};
use crate::telemetry::Metrics;

pub use crate::context::Settings;

/// Runs until SIGTERM/SIGINT (graceful: the Lease is released) or until leadership is lost.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let identity = settings.lease.as_ref().map(|l| l.identity.as_str());
    let config = client_config(identity).await?;
    // The controllers write through the fence; the election loop (which must keep renewing
    // and reading the Lease) through a plain client.
    let fence = match settings.lease {
        Some(_) => Fence::closed(),
        None => Fence::always_open(),
    };
    let requests = RequestCounts::default();
    // Five lanes (k8s/lanes.rs). Four share one bound on requests in flight: the status that
    // starts a timed pause first (within a quarter), what a moving release waits on next,
    // bookkeeping after, and the record of what the routes already show once no route is
    // moving. Route reads and writes have as many places again of their own.
    let gate = Gate::new(settings.kube_requests_in_flight);
    let lane = |lane: Lane| -> anyhow::Result<Client> {
        Ok(ClientBuilder::try_from(config.clone())?
            .with_layer(&FenceLayer(fence.clone()))
            .with_layer(&CountingLayer(requests.clone()))
            .with_layer(&gate.lane(lane))
            .build())
    };
    let client = lane(Lane::Usual)?;
    let lanes = Lanes {
        route: lane(Lane::Route)?,
        urgent: lane(Lane::Urgent)?,
        progress: lane(Lane::Progress)?,
        record: lane(Lane::Record)?,
    };
    let election_client = Client::try_from(config)?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes apiserver: {e}"))?;
    tracing::info!(apiserver = %version.git_version, "connected");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    tokio::spawn(stop_on_signal(stop_tx.clone()));

    let mut metrics = Metrics::new();
    metrics.registry.register(
        "fenced_writes",
        "Writes this replica refused to send because its leader Lease may have lapsed",
        fence.refused_writes(),
    );
    metrics.registry.register(
        "kube_request_wait_seconds",
        "Time a request to the Kubernetes apiserver waited for a place under --kube-requests-in-flight, by lane",
        gate.waits(),
    );
    metrics.registry.register(
        "kube_requests",
        "Requests the controllers sent to the Kubernetes apiserver, by verb and resource",
        requests,
    );
    let health = Arc::new(Health::new(metrics));
    let server = tokio::spawn(server::serve(
        settings.listen,
        health.clone(),
        stop_rx.clone(),
    ));
    health.ready.store(true, Ordering::Relaxed);

    let (leading_tx, mut leading_rx) = watch::channel(settings.lease.is_none());
    let campaign = match settings.lease.clone() {
        Some(lease) => {
            tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "campaigning for leadership");
            tokio::spawn(leader::campaign(
                election_client,
                lease,
                fence,
                leading_tx,
                stop_rx.clone(),
            ))
        }
        None => {
            tracing::info!("leader election disabled: acting as the only replica");
            tokio::spawn(async { Ok(()) })
        }
    };

    let mut stop = stop_rx.clone();
    let became_leader = tokio::select! {
        led = leading_rx.wait_for(|leading| *leading) => led.is_ok(),
        _ = stop.wait_for(|stop| *stop) => false,
    };
    let result = if became_leader {
        health.metrics.leader.set(1);
        let context = Arc::new(Context::new(client, health.clone(), settings).with_lanes(lanes));
        let mut lost = leading_rx.clone();
        tokio::select! {
            result = crate::controllers::run(context, stop_rx.clone()) => result,
            _ = lost.wait_for(|leading| !*leading) => Err(anyhow::anyhow!("leadership lost; stopping so that a single replica acts")),
        }
    } else {
        Ok(())
    };
    health.metrics.leader.set(0);
    health.ready.store(false, Ordering::Relaxed);
    // Whatever ended the controllers, every task must see the stop.
    stop_tx.send_replace(true);
    finish(campaign, server).await;
    result
}

/// The cluster connection (in-cluster, or KUBECONFIG), with a User-Agent that names this
/// replica, so the apiserver's audit log tells replicas apart.
async fn client_config(identity: Option<&str>) -> anyhow::Result<Config> {
    let mut config = Config::infer().await.map_err(|e| {
        anyhow::anyhow!("cannot build a Kubernetes client (in-cluster, or KUBECONFIG): {e}")
    })?;
    let agent = match identity {
        Some(identity) => format!("sluice/{} ({identity})", crate::VERSION),
        None => format!("sluice/{}", crate::VERSION),
    };
    if let Ok(value) = HeaderValue::from_str(&agent) {
        config.headers.push((USER_AGENT, value));
    }
    Ok(config)
}

/// Waits (bounded) for the campaign to release the Lease and the server to drain.
async fn finish(
    campaign: tokio::task::JoinHandle<anyhow::Result<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let drain = async {
        if let Ok(Err(e)) = campaign.await {
            tracing::warn!(error = %e, "leader election ended with an error");
        }
        if let Ok(Err(e)) = server.await {
            tracing::warn!(error = %e, "health server ended with an error");
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("shutdown took longer than 10s; exiting anyway");
    }
}

async fn stop_on_signal(stop: Arc<watch::Sender<bool>>) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("interrupted; shutting down"),
        _ = terminate => tracing::info!("SIGTERM; shutting down"),
    }
    stop.send_replace(true);
}
