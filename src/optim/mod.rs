//! Optimizer-level procedures that sit beside the fused optimizer ops of `crate::ops`.

pub mod fast_forward;

pub use fast_forward::{FastForward, FastForwardConfig, FastForwardStage};
