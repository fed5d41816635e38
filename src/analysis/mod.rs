//! Analysis: measuring a release with metric providers and judging it with CEL conditions.
//!
//! `run` is the pure state machine; `provider` is the trait every source of measurements
//! implements (`prometheus`, `errorbudget`); `condition` and `template` are the
//! small languages users write in.

pub mod answers;
pub mod condition;
pub mod errorbudget;
pub mod narrow;
pub mod pool;
pub mod prometheus;
pub mod provider;
pub mod run;
pub mod template;
