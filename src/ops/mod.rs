//! The public ops. Each validates its arguments once, then dispatches to its CPU implementation
//! or its CUDA launcher, which may assume valid input.

/// Evaluates `$body` with the type alias `$T` naming the Rust type of the float dtype `$dtype`,
/// or returns the op's argument error for any other dtype.
macro_rules! with_float_type {
    ($dtype:expr, $op:expr, $arg:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => Err($crate::Error::invalid($op, $arg, "dtype f32, bf16 or f16", other)),
        }
    };
}

pub mod adamw;
pub mod binary;
pub mod matmul;
pub mod wavelet;

pub use adamw::{adamw_step, AdamWConfig, AdamWTensor};
pub use binary::{
    binary_init, binary_linear_backward, binary_linear_forward, binary_pack, binary_packed_forward,
    binary_packed_forward_into, binary_unpack, distill_loss, distill_loss_into, BinaryLinear, BinaryLinearGrads,
    PackedBinaryLinear,
};
pub use matmul::{matmul, matmul_into, MatmulOptions};
pub use wavelet::{
    wavelet_backward, wavelet_backward_into, wavelet_forward, wavelet_forward_into, wavelet_learnable_backward,
    wavelet_learnable_forward, wavelet_taps_init, WaveletConfig, WaveletDivisor,
};
