//! Logging (JSON or text) and the operator's own Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable text, for terminals.
    Text,
}

/// Installs the global tracing subscriber. `filter` uses `RUST_LOG` syntax (e.g. `info`,
/// `sluice=debug,kube=info`).
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()?,
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init()?,
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// The operator's metrics. Controllers add their own families to `registry` when they start.
pub struct Metrics {
    pub registry: Registry,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "Sluice build information", build_info);
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica is the active (leader) controller",
            leader.clone(),
        );
        Self { registry, leader }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_build_info_and_leader() {
        let metrics = Metrics::new();
        metrics.leader.set(1);
        let text = metrics.encode().unwrap();
        assert!(text.contains(&format!(
            "sluice_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("sluice_leader 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
