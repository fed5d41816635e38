//! Sluice: progressive delivery for Kubernetes.
//!
//! `api` is the public contract (the CRD types); `operator` wires the `sluice controller`
//! process; `controllers` holds the reconcilers it runs.

pub mod analysis;
pub mod api;
pub mod conditions;
pub mod controllers;
pub mod crdgen;
pub mod leader;
pub mod operator;
pub mod plugin;
pub mod rollout;
pub mod server;
pub mod telemetry;
pub mod traffic;

/// The field manager Sluice uses for every server-side apply, so ownership stays stable
/// across restarts and versions.
pub const FIELD_MANAGER: &str = "sluice";

/// The version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Selects ring as the process-wide TLS crypto provider (kube and the Prometheus client share
/// it). Call once at the start of every binary; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
