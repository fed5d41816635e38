//! Analysis: measuring a release with metric providers and judging it with CEL conditions.
//!
//! `run` is the pure state machine; `provider` does the I/O; `condition` and `template` are the
//! small languages users write in.

pub mod condition;
pub mod provider;
pub mod run;
pub mod template;
