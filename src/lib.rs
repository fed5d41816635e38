//! Sluice: progressive delivery for Kubernetes.
//!
//! `api` is the public contract (the CRD types); `operator` wires the `sluice controller`
//! process; `controllers` holds the reconcilers it runs.

pub mod analysis;
pub mod api;
pub mod controllers;
pub mod crdgen;
pub mod leader;
pub mod operator;
pub mod server;
pub mod telemetry;

/// The field manager Sluice uses for every server-side apply, so ownership stays stable
/// across restarts and versions.
pub const FIELD_MANAGER: &str = "sluice";

/// The version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
