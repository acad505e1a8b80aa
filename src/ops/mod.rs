//! The public ops. Each validates its arguments once, then dispatches to its CPU implementation
//! or its CUDA launcher, which may assume valid input.

pub mod adamw;
pub mod matmul;
pub mod wavelet;

pub use adamw::{adamw_step, AdamWConfig, AdamWTensor};
pub use matmul::{matmul, matmul_into, MatmulOptions};
pub use wavelet::{
    wavelet_backward, wavelet_backward_into, wavelet_forward, wavelet_forward_into, wavelet_learnable_backward,
    wavelet_learnable_forward, wavelet_taps_init, WaveletConfig, WaveletDivisor,
};
