//! Optimizer-level pieces beside the fused optimizer ops of `crate::ops`: learning-rate
//! schedules and Fast Forward.

pub mod fast_forward;
pub mod schedule;

pub use fast_forward::{FastForward, FastForwardConfig, FastForwardStage};
pub use schedule::WarmupCosine;
