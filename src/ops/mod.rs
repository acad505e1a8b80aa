//! The public ops. Each validates its arguments once, then dispatches to its CPU implementation
//! or its CUDA launcher, which may assume valid input.

pub mod adamw;
pub mod matmul;

pub use adamw::{adamw_step, AdamWConfig, AdamWTensor};
pub use matmul::{matmul, matmul_into, MatmulOptions};
