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
pub mod attention;
pub mod attention_decode;
pub mod binary;
pub mod columns;
pub mod lora;
pub mod matmul;
pub mod rope;
pub mod sltrain;
pub mod sparse;
pub mod spdf;
pub mod wavelet;

pub use adamw::{adamw_step, AdamWConfig, AdamWTensor};
pub use attention::attention_backward_into;
pub use attention::{attention_backward, attention_forward, AttentionMask, AttentionOptions, AttentionRope, Varlen};
pub use attention::{
    attention_forward_into, attention_kernel, set_attention_kernel, with_attention_kernel, AttentionKernel,
};
pub use binary::{
    binary_init, binary_linear_backward, binary_linear_forward, binary_pack, binary_packed_forward,
    binary_packed_forward_into, binary_unpack, distill_loss, distill_loss_into, BinaryLinear, BinaryLinearGrads,
    PackedBinaryLinear,
};
pub use binary::{
    binary_linear_backward_add, binary_linear_forward_layout_into, BinaryGradTargets, BinaryWeightLayout,
};
pub use binary::{binary_linear_backward_into, binary_linear_forward_into};
pub use columns::copy_columns;
pub use lora::lora_merged_weight;
pub use lora::MAX_ADAPTERS;
pub use lora::{
    lora_backward, lora_forward, lora_forward_into, lora_merge, lora_unmerge, LoraAdapters, LoraBase, LoraGrads,
    LoraRouting, Velora,
};
pub use matmul::{matmul, matmul_into, MatmulOptions};
pub use rope::{rope_backward, rope_forward, RopeConfig, RopeConvention};
pub use sltrain::SlTrainSupport;
pub use sltrain::{sltrain_backward, sltrain_forward, sltrain_weight, SlTrainConfig, SlTrainGrads, SlTrainLayer};
pub use sparse::{
    nm_check, nm_mask, nm_prune, sparse24_compress, sparse24_decompress, sparse24_double_prune,
    sparse24_prune_compress, sparse_linear_backward, sparse_linear_forward, sparse_linear_forward_into, NmPattern,
    Sparse24, SparseLinearGrads,
};
pub use sparse::{set_sparse_kernel, sparse_kernel, with_sparse_kernel, SparseKernel};
pub use spdf::{spdf_apply_mask, StaticMask};
pub use wavelet::{set_wavelet_kernel, wavelet_kernel, WaveletKernel};
pub use wavelet::{
    wavelet_backward, wavelet_backward_into, wavelet_forward, wavelet_forward_into, wavelet_learnable_backward,
    wavelet_learnable_forward, wavelet_taps_init, WaveletConfig, WaveletDivisor,
};

pub mod activation;
pub(crate) mod support;

pub use activation::{
    gelu_backward, gelu_backward_into, gelu_forward, gelu_forward_into, swiglu_backward, swiglu_backward_into,
    swiglu_forward, swiglu_forward_into,
};

pub mod cross_entropy;

pub use cross_entropy::{
    cross_entropy, cross_entropy_fused_in_place, cross_entropy_fused_into, cross_entropy_into, CrossEntropyOptions,
    CrossEntropyOutputs,
};

pub mod norm;

pub use norm::{
    norm_backward_into, norm_forward, norm_forward_into, NormConfig, NormGrads, NormKind, NormParams, NormStats,
};

pub mod embedding;

pub use embedding::{embedding_backward_into, embedding_forward, embedding_forward_into, EmbeddingGradPlan};

pub mod grad_norm;

pub use grad_norm::{clip_grad_norm, grad_norm_into};

pub mod sampling;

pub use sampling::{sample, sample_into, sampling_uniform, SamplingOptions};

pub use attention_decode::{attention_decode_into, decode_positions_advance, kv_append_into};
