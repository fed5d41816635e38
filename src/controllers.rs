//! The set of controllers the leader runs.
//!
//! The Rollout, ErrorBudget and Pipeline controllers and the notifications, sharing one
//! context.

use std::sync::Arc;

use tokio::sync::watch;

use crate::context::Context;
use crate::k8s::touched::Touched;

/// Runs every controller until `stop` turns true.
pub async fn run(context: Arc<Context>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    tracing::info!("controllers started");
    // The Pipeline controller wakes on the Rollouts the Rollout controller's watch sees change.
    let rollouts_touched = Touched::default();
    futures::join!(
        crate::rollout::run(
            context.clone(),
            stop.clone(),
            Some(rollouts_touched.clone())
        ),
        crate::errorbudget::run(context.clone(), stop.clone()),
        crate::pipeline::run(context.clone(), stop.clone(), rollouts_touched.names()),
        crate::notify::run(context, stop),
    );
    Ok(())
}
