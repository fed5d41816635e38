//! sluice-traffic-sim: pretends to be the Istio data plane on Sluice's local e2e cluster.
//!
//! Every tick it lists VirtualServices, DestinationRules, HTTPRoutes, Services and Pods, splits
//! each route's requests over its destinations by their live weights, then over the ready pods'
//! revisions, and exports Istio's standard request metrics for Prometheus at `/metrics`.
//! `/state` shows how the last tick resolved; `/healthz` answers `ok`.

mod cluster;
mod metrics;
mod model;
mod server;
mod sim;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use tokio::sync::watch;

use crate::cluster::{Cluster, SourceStatus};
use crate::server::Shared;
use crate::sim::{RouteReport, Simulator};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-traffic-sim",
    version,
    about = "Simulated Istio traffic and metrics for Sluice's e2e cluster"
)]
struct Args {
    /// Where to serve /metrics, /state and /healthz.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:19100")]
    listen: SocketAddr,
    /// Milliseconds between ticks.
    #[arg(long = "tick-ms", visible_alias = "tick", env = "SIM_TICK_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    tick_ms: u64,
    /// Requests per second of a route without a `sim.sluice.dev/rps` annotation.
    #[arg(long, env = "SIM_RPS", default_value_t = 50.0)]
    default_rps: f64,
}

/// The `/state` document.
#[derive(Serialize)]
struct StateDoc<'a> {
    tick: u64,
    unix_ms: u128,
    dt_seconds: f64,
    default_rps: f64,
    sources: BTreeMap<&'static str, SourceStatus>,
    routes: &'a [RouteReport],
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.default_rps.is_finite() && args.default_rps >= 0.0,
        "--default-rps must be a number >= 0"
    );

    let client = kube::Client::try_default()
        .await
        .context("no usable kubeconfig (set KUBECONFIG)")?;
    let shared = Arc::new(Shared::new());
    let listener = server::bind(args.listen).await?;
    tracing::info!(
        listen = %args.listen,
        tick_ms = args.tick_ms,
        default_rps = args.default_rps,
        "serving /metrics, /state and /healthz"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let server = tokio::spawn(server::serve(listener, shared.clone(), stop_rx.clone()));
    run(
        Cluster::new(client, args.default_rps),
        shared,
        Duration::from_millis(args.tick_ms),
        args.default_rps,
        stop_rx,
    )
    .await;
    server.await??;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(
    mut cluster: Cluster,
    shared: Arc<Shared>,
    tick: Duration,
    default_rps: f64,
    mut stop: watch::Receiver<bool>,
) {
    let mut sim = Simulator::new();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A stalled apiserver loses traffic rather than producing a burst afterwards.
    let max_dt = (tick * 5).max(Duration::from_secs(10));
    let list_timeout = tick.max(Duration::from_secs(10));
    let mut last = Instant::now();
    let mut ticks: u64 = 0;
    let mut last_summary = Instant::now();
    let mut window_requests: u64 = 0;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let world = tokio::select! {
            w = tokio::time::timeout(list_timeout, cluster.snapshot()) => match w {
                Ok(w) => w,
                Err(_) => {
                    tracing::warn!("listing the cluster timed out; skipping this tick");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let now = Instant::now();
        let dt = now.duration_since(last).min(max_dt).as_secs_f64();
        last = now;
        ticks += 1;

        let out = sim.step(&world, dt);
        shared.metrics.record(&out.samples);
        let requests: u64 = out.routes.iter().map(|r| r.requests_last_tick).sum();
        window_requests += requests;
        tracing::debug!(
            tick = ticks,
            dt,
            routes = out.routes.len(),
            requests,
            "tick"
        );
        if last_summary.elapsed() >= Duration::from_secs(60) {
            tracing::info!(
                routes = out.routes.len(),
                pods = world.pods.len(),
                requests = window_requests,
                "requests generated in the last minute"
            );
            last_summary = Instant::now();
            window_requests = 0;
        }

        let doc = StateDoc {
            tick: ticks,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            dt_seconds: dt,
            default_rps,
            sources: cluster.statuses(),
            routes: &out.routes,
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(json) => *shared.state.write().unwrap_or_else(|e| e.into_inner()) = json,
            Err(e) => tracing::warn!(error = %e, "cannot encode /state"),
        }
    }
}
