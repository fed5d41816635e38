//! The Pipeline controller: admits releases to stages once their gates pass.

pub mod plan;
