//! Optimizer-level pieces above the fused AdamW kernel: learning-rate schedules.

pub mod schedule;

pub use schedule::WarmupCosine;
