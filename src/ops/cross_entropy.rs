//! Softmax cross-entropy over the vocabulary, fused with its gradient in one pass per row.
//!
//! For logits `x` of shape (..., V) and integer targets of shape (...): each row's loss is
//! `logsumexp(x) - x[target]` (0 for a row whose target is the ignore index), the mean loss is
//! the sum over the rows not ignored divided by their count (NaN when every row is ignored, as in
//! PyTorch), and the gradient of `grad_scale · mean loss` with respect to the logits is
//! `grad_scale · (softmax(x) - onehot(target)) / count` (zero on ignored rows). The gradient is
//! written over the logits ([`cross_entropy_fused_in_place`]) or into a separate tensor
//! ([`cross_entropy_fused_into`]); no probability tensor is ever stored beside the logits.
//!
//! Logits are f32, bf16 or f16; all arithmetic is f32, with the row max subtracted before any
//! exponential, so that logits of any finite size are safe. Targets are u32. On the CPU a target
//! outside the vocabulary (and not the ignore index) is an error before anything is written; on a
//! GPU, where checking would need a synchronisation, that row's loss and gradient are NaN (and so
//! is the mean), which a training loop sees at once.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::support::{expect_like, expect_tensor, new_output, rows_and_width};
use crate::tensor::Tensor;

/// Options of the loss. The default ignores no target and scales the gradient by 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows whose target equals this value contribute neither loss nor gradient.
    pub ignore_index: Option<u32>,
    /// The gradient is that of `grad_scale · mean loss` (for example `1 / accumulation_steps`).
    pub grad_scale: f32,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: None,
            grad_scale: 1.0,
        }
    }
}

/// Where the losses go: `losses`, f32 of the targets' shape, one per row (0 on ignored rows);
/// `mean`, an f32 tensor of shape [1].
pub struct CrossEntropyOutputs<'a> {
    pub losses: &'a mut Tensor,
    pub mean: &'a mut Tensor,
}

/// The logits, and where the gradient goes.
enum Logits<'a> {
    /// Loss only.
    Read(&'a Tensor),
    /// Logits read, gradient written into the second tensor.
    Into(&'a Tensor, &'a mut Tensor),
    /// Gradient written over the logits.
    InPlace(&'a mut Tensor),
}

impl Logits<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            Logits::Read(x) | Logits::Into(x, _) => x,
            Logits::InPlace(x) => x,
        }
    }
}

/// Validates everything and returns (rows, vocab).
fn validate(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    outputs: &CrossEntropyOutputs<'_>,
    d_logits: Option<&Tensor>,
) -> Result<(usize, usize)> {
    let (rows, vocab) = rows_and_width(op, "logits", logits)?;
    let device = logits.device();
    let row_shape = &logits.shape()[..logits.shape().len() - 1];
    expect_tensor(op, "targets", targets, row_shape, DType::U32, &device)?;
    expect_tensor(op, "losses", outputs.losses, row_shape, DType::F32, &device)?;
    expect_tensor(op, "mean", outputs.mean, &[1], DType::F32, &device)?;
    if let Some(d_logits) = d_logits {
        expect_like(op, "d_logits", d_logits, logits)?;
    }
    if !options.grad_scale.is_finite() {
        return Err(Error::invalid(
            op,
            "options.grad_scale",
            "a finite number",
            options.grad_scale,
        ));
    }
    if vocab > i32::MAX as usize {
        return Err(Error::invalid(op, "logits", "a vocabulary below 2^31", vocab));
    }
    if device == Device::Cpu {
        let targets = targets.host_slice::<u32>()?;
        if let Some((row, &t)) = targets
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab && Some(t) != options.ignore_index)
        {
            return Err(Error::invalid(
                op,
                "targets",
                format!("every target below the vocabulary size {vocab} or the ignore index"),
                format!("{t} at row {row}"),
            ));
        }
    }
    Ok((rows, vocab))
}

/// The per-row losses and their mean (no gradient), as new tensors.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, options: &CrossEntropyOptions) -> Result<(Tensor, Tensor)> {
    let (_, _) = rows_and_width("cross_entropy", "logits", logits)?;
    let row_shape = &logits.shape()[..logits.shape().len() - 1];
    let mut losses = new_output(row_shape, DType::F32, &logits.device())?;
    let mut mean = new_output(&[1], DType::F32, &logits.device())?;
    cross_entropy_into(
        logits,
        targets,
        options,
        CrossEntropyOutputs {
            losses: &mut losses,
            mean: &mut mean,
        },
    )?;
    Ok((losses, mean))
}

/// The per-row losses and their mean, without the gradient (one read of the logits).
pub fn cross_entropy_into(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    outputs: CrossEntropyOutputs<'_>,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    let (rows, vocab) = validate(OP, logits, targets, options, &outputs, None)?;
    run(Logits::Read(logits), targets, options, outputs, rows, vocab)
}

/// The losses, their mean and the gradient of `grad_scale · mean` written into `d_logits` (of
/// the logits' shape and dtype).
pub fn cross_entropy_fused_into(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    outputs: CrossEntropyOutputs<'_>,
    d_logits: &mut Tensor,
) -> Result<()> {
    const OP: &str = "cross_entropy_fused";
    let (rows, vocab) = validate(OP, logits, targets, options, &outputs, Some(d_logits))?;
    run(Logits::Into(logits, d_logits), targets, options, outputs, rows, vocab)
}

/// The losses, their mean and the gradient of `grad_scale · mean`, written over the logits:
/// the training step's usual form, which needs no second tensor of the logits' size.
pub fn cross_entropy_fused_in_place(
    logits: &mut Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    outputs: CrossEntropyOutputs<'_>,
) -> Result<()> {
    const OP: &str = "cross_entropy_fused_in_place";
    let (rows, vocab) = validate(OP, logits, targets, options, &outputs, None)?;
    run(Logits::InPlace(logits), targets, options, outputs, rows, vocab)
}

fn run(
    logits: Logits<'_>,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    outputs: CrossEntropyOutputs<'_>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    match logits.tensor().device() {
        Device::Cpu => cpu::run(logits, targets, options, outputs, rows, vocab),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => cuda::run(&backend, logits, targets, options, outputs, rows, vocab),
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    /// Row statistics: (max, log of the sum of exp(x - max), loss), all f32. Differences from the
    /// max are exact, so large logits lose no digits (the kernel computes the same way).
    fn row_stats<T: Float>(x: &[T], target: u32, skip: bool) -> (f32, f32, f32) {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f32()));
        let sum: f32 = if max == f32::NEG_INFINITY {
            0.0
        } else {
            x.iter().map(|v| (v.to_f32() - max).exp()).sum()
        };
        let log_sum = sum.ln();
        let loss = if skip {
            0.0
        } else {
            (max - x[target as usize].to_f32()) + log_sum
        };
        (max, log_sum, loss)
    }

    #[inline(always)]
    fn gradient(value: f32, is_target: bool, (max, log_sum): (f32, f32), scale: f32) -> f32 {
        (((value - max) - log_sum).exp() - if is_target { 1.0 } else { 0.0 }) * scale
    }

    fn run_typed<T: Float>(
        logits: Logits<'_>,
        targets: &[u32],
        options: &CrossEntropyOptions,
        losses: &mut [f32],
        vocab: usize,
    ) -> Result<()> {
        let ignored = |t: u32| options.ignore_index == Some(t);
        let count = targets.iter().filter(|&&t| !ignored(t)).count();
        let scale = if count > 0 {
            options.grad_scale / count as f32
        } else {
            0.0
        };
        let row_scale = |t: u32| if ignored(t) { 0.0 } else { scale };
        match logits {
            Logits::Read(x) => {
                let x = x.host_slice::<T>()?;
                losses
                    .par_iter_mut()
                    .zip(x.par_chunks(vocab).zip(targets.par_iter()))
                    .for_each(|(loss, (x, &t))| *loss = row_stats(x, t, ignored(t)).2);
            }
            Logits::Into(x, d_x) => {
                let x = x.host_slice::<T>()?;
                let d_x = d_x.host_slice_mut::<T>()?;
                losses
                    .par_iter_mut()
                    .zip(
                        x.par_chunks(vocab)
                            .zip(d_x.par_chunks_mut(vocab))
                            .zip(targets.par_iter()),
                    )
                    .for_each(|(loss, ((x, d_x), &t))| {
                        let (max, log_sum, row_loss) = row_stats(x, t, ignored(t));
                        *loss = row_loss;
                        let scale = row_scale(t);
                        for (i, (d, v)) in d_x.iter_mut().zip(x).enumerate() {
                            *d = T::from_f32(gradient(v.to_f32(), i == t as usize, (max, log_sum), scale));
                        }
                    });
            }
            Logits::InPlace(x) => {
                let x = x.host_slice_mut::<T>()?;
                losses
                    .par_iter_mut()
                    .zip(x.par_chunks_mut(vocab).zip(targets.par_iter()))
                    .for_each(|(loss, (x, &t))| {
                        let (max, log_sum, row_loss) = row_stats(x, t, ignored(t));
                        *loss = row_loss;
                        let scale = row_scale(t);
                        for (i, v) in x.iter_mut().enumerate() {
                            *v = T::from_f32(gradient(v.to_f32(), i == t as usize, (max, log_sum), scale));
                        }
                    });
            }
        }
        Ok(())
    }

    pub(super) fn run(
        logits: Logits<'_>,
        targets: &Tensor,
        options: &CrossEntropyOptions,
        outputs: CrossEntropyOutputs<'_>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let targets = targets.host_slice::<u32>()?;
        debug_assert_eq!(targets.len(), rows);
        let losses = outputs.losses.host_slice_mut::<f32>()?;
        let dtype = logits.tensor().dtype();
        with_float_type!(dtype, "cross_entropy", "logits", T => run_typed::<T>(logits, targets, options, losses, vocab))?;
        let count = targets.iter().filter(|&&t| options.ignore_index != Some(t)).count();
        let sum: f32 = losses.iter().sum();
        outputs.mean.host_slice_mut::<f32>()?[0] = sum / count as f32;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::support::cuda::aligned16;
    use std::sync::Arc;

    /// Must match MAX_THREADS in kernels/cross_entropy.cu.
    const MAX_THREADS: usize = 1024;
    /// Bytes of `CrossEntropyScratch` in kernels/cross_entropy.cu.
    const SCRATCH_BYTES: usize = 8;

    pub(super) fn run(
        backend: &Arc<CudaBackend>,
        logits: Logits<'_>,
        targets: &Tensor,
        options: &CrossEntropyOptions,
        outputs: CrossEntropyOutputs<'_>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let dtype = logits.tensor().dtype();
        let x_address = logits.tensor().device_buffer()?.address();
        let grad_address = match &logits {
            Logits::Read(_) => 0,
            Logits::Into(_, d_x) => d_x.device_buffer()?.address(),
            Logits::InPlace(_) => x_address,
        };
        let targets_address = targets.device_buffer()?.address();
        let losses_address = outputs.losses.device_buffer()?.address();
        let mean_address = outputs.mean.device_buffer()?.address();
        // A scratch buffer kept from call to call: no allocation per call.
        backend.with_scratch("cross_entropy", SCRATCH_BYTES, &[], |scratch_address| {
            let (rows_i, vocab_i) = (rows as i32, vocab as i32);
            let (ignore_index, has_ignore) = (options.ignore_index.unwrap_or(0), options.ignore_index.is_some() as i32);

            let count = backend.function("cross_entropy", "cross_entropy_count")?;
            let mut builder = backend.launch_builder(&count);
            builder
                .arg(&targets_address)
                .arg(&rows_i)
                .arg(&ignore_index)
                .arg(&has_ignore)
                .arg(&options.grad_scale)
                .arg(&scratch_address);
            let single = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (MAX_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `targets` holds `rows` u32 values; the scratch holds one CrossEntropyScratch.
            unsafe { builder.launch(single) }.context("launching cross_entropy_count")?;

            if rows > 0 {
                let vector = 16 / dtype.size_in_bytes();
                let vectorised = vocab.is_multiple_of(vector) && aligned16(&[x_address, grad_address]);
                let per_thread = if vectorised { vector } else { 1 };
                // At least four loads in flight per thread before the block grows past a warp.
                let threads = (vocab.div_ceil(per_thread * 4).next_multiple_of(32)).clamp(32, MAX_THREADS) as u32;
                let name = format!(
                    "cross_entropy_rows_{}{}",
                    if vectorised { "vec_" } else { "" },
                    dtype.name()
                );
                let function = backend.function("cross_entropy", &name)?;
                let mut builder = backend.launch_builder(&function);
                builder
                    .arg(&x_address)
                    .arg(&grad_address)
                    .arg(&targets_address)
                    .arg(&losses_address)
                    .arg(&scratch_address)
                    .arg(&rows_i)
                    .arg(&vocab_i)
                    .arg(&ignore_index)
                    .arg(&has_ignore);
                let config = LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: validated shapes: `rows` rows of `vocab` logits (and gradients, the same
                // array when in place), `rows` targets and losses; the kernel checks each target
                // against the vocabulary before reading the logit it names.
                unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
            }

            let mean = backend.function("cross_entropy", "cross_entropy_mean")?;
            let mut builder = backend.launch_builder(&mean);
            builder
                .arg(&losses_address)
                .arg(&rows_i)
                .arg(&scratch_address)
                .arg(&mean_address);
            // SAFETY: `losses` holds `rows` f32 values, `mean` one; the scratch was written above.
            unsafe { builder.launch(single) }.context("launching cross_entropy_mean")?;
            Ok(())
        })
    }
}
