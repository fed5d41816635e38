//! The set of controllers the leader runs.
//!
//! The Rollout, ErrorBudget and Pipeline controllers and the notifications, sharing one
//! context.

use std::sync::Arc;

use tokio::sync::watch;

use crate::context::Context;

/// Runs every controller until `stop` turns true.
pub async fn run(context: Arc<Context>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    tracing::info!("controllers started");
    futures::join!(
        crate::rollout::run(context.clone(), stop.clone()),
        crate::errorbudget::run(context.clone(), stop.clone()),
        crate::pipeline::run(context.clone(), stop.clone()),
        crate::notify::run(context, stop),
    );
    Ok(())
}
