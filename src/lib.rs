//! Sluice: progressive delivery for Kubernetes.
//!
//! Layers, bottom up: `api` (the CRD types, the public contract); `k8s`, `conditions`
//! and `telemetry` (small shared helpers); `analysis` and `traffic` (metric providers
//! and traffic routers); `context` (what every reconcile gets); the controllers (`rollout`);
//! and on top `controllers` and `operator` (the `sluice controller` process), `plugin` and
//! `crdgen`.

pub mod analysis;
pub mod api;
pub mod conditions;
pub mod context;
pub mod controllers;
pub mod crdgen;
pub mod errorbudget;
pub mod fence;
#[doc(hidden)]
pub mod fuzzing;
pub mod k8s;
pub mod leader;
pub mod notify;
pub mod operator;
pub mod pipeline;
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
