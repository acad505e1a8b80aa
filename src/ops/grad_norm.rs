//! The global L2 norm of many gradient tensors, `‖g‖ = √(Σ_tensors Σ_i g_i²)`, in one launch,
//! and clipping by a maximum norm in place (PyTorch's `clip_grad_norm_`: every gradient is
//! multiplied by `min(1, max_norm / (‖g‖ + 1e-6))`).
//!
//! Gradients are f32, bf16 or f16; squares are summed within fixed blocks of 4096 elements (f32
//! on the GPU, f64 on the CPU) and the block sums in f64, in a fixed order on both devices (deterministic). The
//! norm lands in an f32 tensor of shape [1] on the tensors' device, so that a training step
//! needs no synchronisation; a non-finite norm leaves the gradients unchanged (the norm tells
//! the caller to skip the step).

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Elements per block of the partial sums; must match BLOCK_ELEMENTS in kernels/grad_norm.cu.
const BLOCK_ELEMENTS: usize = 4096;

fn validate(op: &'static str, tensors: &[&Tensor], norm: &Tensor) -> Result<()> {
    let device = norm.device();
    norm.expect_dtype(op, "norm", &[DType::F32])?;
    norm.expect_shape(op, "norm", &[1])?;
    for (index, t) in tensors.iter().enumerate() {
        let indexed = |e: Error| match e {
            Error::InvalidArgument { op, expected, got, .. } => Error::InvalidArgument {
                op,
                arg: "tensors",
                expected,
                got: format!("{got} (tensors[{index}])"),
            },
            other => other,
        };
        t.expect_dtype(op, "tensors", &[DType::F32, DType::BF16, DType::F16])
            .map_err(indexed)?;
        device.expect_same(&t.device(), op, "tensors").map_err(indexed)?;
    }
    let blocks: usize = tensors.iter().map(|t| t.numel().div_ceil(BLOCK_ELEMENTS)).sum();
    if blocks > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            "tensors",
            format!("at most {} elements in all", i32::MAX as usize * BLOCK_ELEMENTS),
            format!("{blocks} blocks of {BLOCK_ELEMENTS}"),
        ));
    }
    Ok(())
}

/// Writes the global L2 norm of `tensors` into `norm` (f32, shape [1], on their device). An
/// empty list has norm 0.
pub fn grad_norm_into(tensors: &[&Tensor], norm: &mut Tensor) -> Result<()> {
    const OP: &str = "grad_norm";
    validate(OP, tensors, norm)?;
    match norm.device() {
        Device::Cpu => {
            let total = cpu::norm(tensors)?;
            norm.host_slice_mut::<f32>()?[0] = total;
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => cuda::run(&backend, tensors, norm, None),
    }
}

/// Writes the global L2 norm of `tensors` into `norm`, then scales every tensor in place by
/// `min(1, max_norm / (norm + 1e-6))` (nothing is written when that is 1, or when the norm is
/// not finite). `max_norm` is finite and >= 0.
pub fn clip_grad_norm(tensors: &mut [&mut Tensor], max_norm: f32, norm: &mut Tensor) -> Result<()> {
    const OP: &str = "clip_grad_norm";
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        return Err(Error::invalid(OP, "max_norm", "a finite number >= 0", max_norm));
    }
    let shared: Vec<&Tensor> = tensors.iter().map(|t| &**t).collect();
    validate(OP, &shared, norm)?;
    match norm.device() {
        Device::Cpu => {
            let total = cpu::norm(&shared)?;
            norm.host_slice_mut::<f32>()?[0] = total;
            let scale = clip_scale(total, max_norm);
            if scale != 1.0 {
                for t in tensors.iter_mut() {
                    cpu::scale(t, scale)?;
                }
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => cuda::run(&backend, &shared, norm, Some(max_norm)),
    }
}

/// The clipping factor, as kernels/grad_norm.cu computes it.
fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    if norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    /// Each block's sum of squares. The GPU sums a block as a tree of short f32 runs; a
    /// sequential f32 sum of 4096 terms would be less accurate, so the CPU sums in f64.
    fn partials_typed<T: Float>(t: &Tensor) -> Result<Vec<f64>> {
        Ok(t.host_slice::<T>()?
            .par_chunks(BLOCK_ELEMENTS)
            .map(|block| block.iter().map(|v| (v.to_f32() as f64).powi(2)).sum::<f64>())
            .collect())
    }

    /// Block sums added in f64 in block order.
    pub(super) fn norm(tensors: &[&Tensor]) -> Result<f32> {
        let mut total = 0.0f64;
        for t in tensors {
            let partials = with_float_type!(t.dtype(), "grad_norm", "tensors", T => partials_typed::<T>(t))?;
            total += partials.iter().sum::<f64>();
        }
        Ok(total.sqrt() as f32)
    }

    fn scale_typed<T: Float>(t: &mut Tensor, scale: f32) -> Result<()> {
        t.host_slice_mut::<T>()?
            .par_chunks_mut(BLOCK_ELEMENTS)
            .for_each(|block| block.iter_mut().for_each(|v| *v = T::from_f32(v.to_f32() * scale)));
        Ok(())
    }

    pub(super) fn scale(t: &mut Tensor, scale: f32) -> Result<()> {
        with_float_type!(t.dtype(), "clip_grad_norm", "tensors", T => scale_typed::<T>(t, scale))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, LaunchConfig, PushKernelArg};
    use std::sync::Arc;

    /// Must match kernels/grad_norm.cu.
    const THREADS: u32 = 256;
    const FINISH_THREADS: u32 = 1024;

    /// Layout shared with `GradSegment` in kernels/grad_norm.cu.
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct GradSegment {
        data: u64,
        numel: u64,
        first_block: u64,
        dtype: u32,
        padding: u32,
    }

    /// The norm (and, with `max_norm`, the clipping) of `tensors` on `backend`.
    pub(super) fn run(
        backend: &Arc<CudaBackend>,
        tensors: &[&Tensor],
        norm: &mut Tensor,
        max_norm: Option<f32>,
    ) -> Result<()> {
        let mut segments = Vec::with_capacity(tensors.len());
        let mut blocks = 0u64;
        for t in tensors.iter().filter(|t| t.numel() > 0) {
            segments.push(GradSegment {
                data: t.device_buffer()?.address(),
                numel: t.numel() as u64,
                first_block: blocks,
                dtype: match t.dtype() {
                    DType::F32 => 0,
                    DType::BF16 => 1,
                    _ => 2,
                },
                padding: 0,
            });
            blocks += t.numel().div_ceil(BLOCK_ELEMENTS) as u64;
        }
        let norm_address = norm.device_buffer()?.address();
        // One scratch buffer, kept from call to call: the segment table, then the partials and
        // the clipping scale in the last slot. The table's 32-byte records keep the partials
        // 4-byte aligned.
        let table_bytes: &[u8] = bytemuck::cast_slice(&segments);
        let scratch_bytes = table_bytes.len() + (blocks as usize + 1) * 4;
        backend.with_scratch("grad_norm", scratch_bytes, table_bytes, |scratch| {
            let table = scratch;
            let partials = scratch + table_bytes.len() as u64;
            let scale = partials + 4 * blocks;
            let segment_count = segments.len() as u32;
            if !segments.is_empty() {
                let function = backend.function("grad_norm", "grad_norm_partials")?;
                let mut builder = backend.launch_builder(&function);
                builder.arg(&table).arg(&segment_count).arg(&partials);
                let launch = LaunchConfig {
                    grid_dim: (blocks as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the table describes live device tensors of `numel` elements each, laid
                // end to end in `blocks` blocks; the partials hold one f32 per block.
                unsafe { builder.launch(launch) }.context("launching grad_norm_partials")?;
            }
            let function = backend.function("grad_norm", "grad_norm_finish")?;
            let count = blocks as u32;
            let max = max_norm.unwrap_or(-1.0);
            let mut builder = backend.launch_builder(&function);
            builder
                .arg(&partials)
                .arg(&count)
                .arg(&max)
                .arg(&norm_address)
                .arg(&scale);
            let launch = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (FINISH_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `count` partials were written above; norm and scale are one f32 each.
            unsafe { builder.launch(launch) }.context("launching grad_norm_finish")?;
            if !segments.is_empty() && max_norm.is_some() {
                let function = backend.function("grad_norm", "grad_clip_scale")?;
                let mut builder = backend.launch_builder(&function);
                builder.arg(&table).arg(&segment_count).arg(&scale);
                let launch = LaunchConfig {
                    grid_dim: (blocks as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: as for the partials; every element is scaled by the block that owns it.
                unsafe { builder.launch(launch) }.context("launching grad_clip_scale")?;
            }
            Ok(())
        })
    }
}
