//! The set of controllers the leader runs.
//!
//! The Rollout controller runs here; the ErrorBudget and Pipeline controllers join it as
//! they are built.

use std::sync::Arc;

use tokio::sync::watch;

use crate::context::Context;

/// Runs every controller until `stop` turns true.
pub async fn run(context: Arc<Context>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    tracing::info!("controllers started");
    crate::rollout::run(context, stop).await;
    Ok(())
}
