//! The public contract: the `sluice.dev/v1alpha1` custom resources.
//!
//! Every field's doc comment becomes `kubectl explain` text. Validation that the apiserver can
//! do (ranges, patterns, CEL rules) lives in the schema so bad input is refused at admission.

// kube's `printcolumn(name = .., type_ = ..)` repeats the same keys once per column by design.
#![allow(clippy::duplicated_attributes)]

pub mod analysis;
pub mod common;
pub mod duration;
pub mod errorbudget;
pub mod notifier;
pub mod pipeline;
pub mod rollout;

pub use duration::Duration;
pub use errorbudget::{ErrorBudget, ErrorBudgetSpec, ErrorBudgetStatus};
pub use notifier::{Notifier, NotifierSpec, NotifierStatus};
pub use pipeline::{Pipeline, PipelineSpec, PipelineStatus};
pub use rollout::{Rollout, RolloutSpec, RolloutStatus};
