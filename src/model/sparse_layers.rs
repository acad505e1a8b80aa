//! `nm` linear layers (2:4 and 1:2, SLoPe, ALGORITHMS.md §2) through the sparse tensor-core
//! kernels of [`crate::ops::sparse`].
//!
//! A masked layer keeps its dense f32 master weight with a fixed mask (see
//! [`super::params::LinearMask`]); where the sparse kernels take the layer, it also keeps two
//! compressed copies of its masked compute weight ([`SparseCopies`]): `W_s`, (out, in) pruned
//! along the input dimension, for the forward `Y = X·W_sᵀ + b`, and `W_dpᵀ`, (in, out) pruned
//! again along the output dimension, for the input gradient `dX = dY·W_dp`. The weight gradient
//! stays the dense `dYᵀ·X` masked, since the master weight, its gradient and its AdamW moments are
//! dense tensors (the op's `sparse24_weight_grad` runs the same dense GEMM and would add a
//! scatter back into the dense layout).
//!
//! # Layout
//! GPT-2's Conv1D weights are stored (in, out), Llama's nn.Linear ones (out, in). The compressed
//! format groups along rows, so each copy is built from the orientation whose rows run along its
//! groups: `W_s` from the (out, in) view and `W_dpᵀ` from the (in, out) view. One of the two is
//! the compute copy itself and the other its transpose ([`transpose`], one bandwidth-bound
//! kernel on a GPU). Both copies are pruned by magnitude from the masked weight: `W_s` keeps
//! exactly the mask's entries (the pruned ones are 0, the kept ones are not; were a kept value
//! exactly 0, the product would be the same), and `W_dpᵀ` is SLoPe's second pruning with the
//! layer's pattern along the output dimension.
//!
//! # When
//! A layer qualifies when its pattern is one the sparse kernels take (2:4, 1:2) and both of its
//! dimensions are multiples of 64 (the format's column block, on either copy); other `nm` layers
//! run as masked dense matmuls. The copies are used on a GPU by default. On the CPU the masked
//! dense GEMM is the faster (its kernel is blocked and vectorised; the CPU sparse kernel is a
//! scalar gather per kept value, which does half the multiply-adds at a fraction of the rate: see
//! benches/NOTES.md), so the CPU keeps the dense path unless asked
//! ([`super::GptParams::set_sparse_kernels`]), which the tests use to check one path against the
//! other.
//!
//! # Refresh
//! The copies are rebuilt from the compute copy wherever it changes, which is inside
//! [`super::GptParams`]' own methods only: after every AdamW step, when a parameter is set, when
//! a layer is pruned and when a checkpoint is loaded (which adopts its masks). Each rebuild is
//! stream-ordered on the GPU (transpose, two prune-compress passes; no host round trip) and
//! allocates the copies anew.

use super::params::Layout;
use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::ops::{self, NmPattern, Sparse24};
use crate::tensor::Tensor;

/// The compressed copies of one `nm` layer's masked compute weight.
pub struct SparseCopies {
    /// `W_s`, (out, in), pruned along the input dimension: the forward's weight.
    pub w_s: Sparse24,
    /// `W_dpᵀ`, (in, out), the masked weight pruned again along the output dimension: the input
    /// gradient's weight.
    pub w_dp_t: Sparse24,
}

/// Whether a layer with `pattern` and these dimensions runs through the sparse kernels.
pub fn qualifies(pattern: NmPattern, input: usize, output: usize) -> bool {
    pattern.is_tensor_core() && input.is_multiple_of(ops::sparse::COL_BLOCK) && output.is_multiple_of(ops::sparse::COL_BLOCK)
}

/// Builds the copies from `weight`, a layer's masked compute weight in its stored `layout`.
pub(crate) fn build(weight: &Tensor, layout: Layout, pattern: NmPattern) -> Result<SparseCopies> {
    let transposed = transpose(weight)?;
    let (output_major, input_major) = match layout {
        Layout::InputMajor => (&transposed, weight),
        _ => (weight, &transposed),
    };
    Ok(SparseCopies {
        w_s: ops::sparse24_prune_compress(output_major, pattern)?,
        w_dp_t: ops::sparse24_prune_compress(input_major, pattern)?,
    })
}

/// `out = x·W_sᵀ (+ bias)`.
pub(crate) fn forward(copies: &SparseCopies, x: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    ops::sparse_linear_forward_into(x, &copies.w_s, bias, out)
}

/// `dx = dy·W_dp`, or `dx += dy·W_dp` with `accumulate` (in the GEMM's epilogue on a GPU).
pub(crate) fn input_grad(copies: &SparseCopies, dy: &Tensor, dx: &mut Tensor, accumulate: bool) -> Result<()> {
    if !accumulate {
        return ops::sparse_linear_forward_into(dy, &copies.w_dp_t, None, dx);
    }
    match dy.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => ops::sparse::sparse_linear_accumulate_into(dy, &copies.w_dp_t, None, dx),
        _ => {
            let product = ops::sparse_linear_forward(dy, &copies.w_dp_t, None)?;
            match dx.dtype() {
                DType::BF16 => add_host::<half::bf16>(dx, &product),
                DType::F16 => add_host::<half::f16>(dx, &product),
                _ => add_host::<f32>(dx, &product),
            }
        }
    }
}

/// The transpose of a matrix `w` (rows, cols): (cols, rows), same dtype and device. Any float
/// dtype on the CPU; bf16 or f16 on a GPU, where one kernel moves 32x32 tiles through shared
/// memory.
pub fn transpose(w: &Tensor) -> Result<Tensor> {
    const OP: &str = "sparse_layers::transpose";
    w.expect_rank(OP, "w", 2)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    match w.device() {
        Device::Cpu => match w.dtype() {
            DType::F32 => transpose_host::<f32>(w, rows, cols),
            DType::BF16 => transpose_host::<half::bf16>(w, rows, cols),
            DType::F16 => transpose_host::<half::f16>(w, rows, cols),
            other => Err(crate::error::Error::invalid(OP, "w", "a float tensor", other)),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => {
            w.expect_dtype(OP, "w", &[DType::BF16, DType::F16])?;
            if rows.div_ceil(cuda::TILE) > cuda::MAX_GRID_Y {
                return Err(crate::error::Error::invalid(
                    OP,
                    "w",
                    format!("at most {} rows on a GPU", cuda::MAX_GRID_Y * cuda::TILE),
                    format!("shape {:?}", w.shape()),
                ));
            }
            let mut out = Tensor::uninit_cuda(&[cols, rows], w.dtype(), &backend)?;
            if rows * cols > 0 {
                cuda::transpose(w, &mut out, rows, cols)?;
            }
            Ok(out)
        }
    }
}

/// `dx += product`, both host tensors of `T` with as many elements (the sparse GEMM's output is
/// dx's shape), rounded once.
fn add_host<T: Float>(dx: &mut Tensor, product: &Tensor) -> Result<()> {
    let add = product.host_slice::<T>()?;
    for (d, &a) in dx.host_slice_mut::<T>()?.iter_mut().zip(add) {
        *d = T::from_f32(d.to_f32() + a.to_f32());
    }
    Ok(())
}

fn transpose_host<T: Float>(w: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let src = w.host_slice::<T>()?;
    let values: Vec<T> = (0..rows * cols).map(|k| src[(k % rows) * cols + k / rows]).collect();
    Tensor::from_vec(values, &[cols, rows], &Device::Cpu)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    /// Must match kernels/sparse_layers.cu.
    pub(super) const TILE: usize = 32;
    const ROWS_PER_PASS: u32 = 8;
    pub(super) const MAX_GRID_Y: usize = 65535;

    pub(super) fn transpose(w: &Tensor, out: &mut Tensor, rows: usize, cols: usize) -> Result<()> {
        let source = w.device_buffer()?;
        let backend = source.backend().clone();
        let function = backend.function("sparse_layers", "transpose16")?;
        let (src, dst) = (source.address(), out.device_buffer()?.address());
        let (rows_i, cols_i) = (rows as i64, cols as i64);
        let mut launch = backend.launch_builder(&function);
        launch.arg(&src).arg(&dst).arg(&rows_i).arg(&cols_i);
        let config = LaunchConfig {
            grid_dim: (cols.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1),
            block_dim: (TILE as u32, ROWS_PER_PASS, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: w is (rows, cols) and out (cols, rows), both of a 16-bit dtype on this device;
        // the kernel reads and writes only inside those bounds.
        unsafe { launch.launch(config) }.context("launching transpose16")?;
        Ok(())
    }
}
