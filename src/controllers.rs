//! The set of controllers the leader runs.
//!
//! The Rollout, ErrorBudget and Pipeline controllers register here as they are built; until
//! then the leader holds its Lease, serves health and metrics, and waits for shutdown.

use std::sync::Arc;

use tokio::sync::watch;

use crate::operator::Context;

/// Runs every controller until `stop` turns true.
pub async fn run(_context: Arc<Context>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    tracing::info!("controllers started");
    let _ = stop.wait_for(|stop| *stop).await;
    Ok(())
}
