//! The `sluice controller` process: connects to the cluster, serves health and metrics,
//! campaigns for leadership, and runs the controllers while it leads.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use crate::context::Context;
use crate::leader;
use crate::server::{self, Health};
use crate::telemetry::Metrics;

pub use crate::context::Settings;

/// Runs until SIGTERM/SIGINT (graceful: the Lease is released) or until leadership is lost.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot build a Kubernetes client (in-cluster, or KUBECONFIG): {e}")
    })?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes apiserver: {e}"))?;
    tracing::info!(apiserver = %version.git_version, "connected");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    tokio::spawn(stop_on_signal(stop_tx.clone()));

    let health = Arc::new(Health::new(Metrics::new()));
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
                client.clone(),
                lease,
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
        let context = Arc::new(Context::new(client, health.clone(), settings));
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
