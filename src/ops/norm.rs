//! LayerNorm and RMSNorm, each optionally fused with the residual add that precedes it in a
//! pre-norm transformer block, forward and backward, for f32, bf16 and f16 activations.
//!
//! Forward, per row of width `C` (the last dimension): `s = x` (or, fused, `s = x + residual`,
//! rounded to the activation dtype and written out: the new residual stream), then
//! - LayerNorm: `y = (s - mean(s)) · rstd · weight + bias`, `rstd = 1/√(var(s) + eps)` (biased
//!   variance, as PyTorch);
//! - RMSNorm: `y = s · rstd · weight (+ bias)`, `rstd = 1/√(mean(s²) + eps)`.
//!
//! The forward saves each row's mean (0 for RMSNorm) and rstd in f32 ([`NormStats`]) for the
//! backward, which writes `d_input` (the gradient of `s`, plus `d_skip`, the gradient that
//! reaches `s` through the skip connection, when given: the gradient of both `x` and
//! `residual`), and `d_weight` and `d_bias` in f32, summed over rows in a fixed order (so
//! bit-identical from run to run) and optionally added to what they hold (gradient
//! accumulation). Weight and bias have the activations' dtype. All arithmetic is f32.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::support::{expect_like, expect_tensor, new_output, rows_and_width};
use crate::tensor::Tensor;

/// The widest row the norms accept: the backward keeps two f32 partial sums per column in
/// shared memory (64 KiB at this width).
pub const MAX_NORM_WIDTH: usize = 8192;

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

/// A normalisation and its epsilon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormConfig {
    pub kind: NormKind,
    /// Added to the variance (or mean square) before the square root; finite and >= 0.
    pub eps: f32,
}

impl NormConfig {
    /// LayerNorm with `eps` (GPT-2 uses 1e-5).
    pub fn layer_norm(eps: f32) -> NormConfig {
        NormConfig {
            kind: NormKind::LayerNorm,
            eps,
        }
    }

    /// RMSNorm with `eps` (Llama uses 1e-5 or 1e-6).
    pub fn rms_norm(eps: f32) -> NormConfig {
        NormConfig {
            kind: NormKind::RmsNorm,
            eps,
        }
    }

    #[cfg(feature = "cuda")]
    fn prefix(&self) -> &'static str {
        match self.kind {
            NormKind::LayerNorm => "layer_norm",
            NormKind::RmsNorm => "rms_norm",
        }
    }
}

/// The learned gain (`weight`, shape [C]) and optional `bias` ([C]), of the activations' dtype.
#[derive(Clone, Copy)]
pub struct NormParams<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

/// What the forward saves for the backward: each row's mean (0 for RMSNorm) and reciprocal
/// standard deviation, f32 tensors of shape [rows].
#[derive(Debug)]
pub struct NormStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl NormStats {
    /// Statistics for `rows` rows on `device`, to be filled by a forward.
    pub fn new(rows: usize, device: &Device) -> Result<NormStats> {
        Ok(NormStats {
            mean: new_output(&[rows], DType::F32, device)?,
            rstd: new_output(&[rows], DType::F32, device)?,
        })
    }
}

/// The backward's outputs: `d_input` of the activations' shape and dtype, `d_weight` and
/// `d_bias` f32 of shape [C]; with `accumulate`, the parameter gradients are added to what
/// `d_weight` and `d_bias` hold instead of overwriting it.
pub struct NormGrads<'a> {
    pub d_input: &'a mut Tensor,
    pub d_weight: &'a mut Tensor,
    pub d_bias: Option<&'a mut Tensor>,
    pub accumulate: bool,
}

/// Checks the configuration, the activations and the parameters; returns (rows, width).
fn check_common(op: &'static str, config: &NormConfig, x: &Tensor, params: &NormParams<'_>) -> Result<(usize, usize)> {
    if !(config.eps.is_finite() && config.eps >= 0.0) {
        return Err(Error::invalid(op, "config.eps", "a finite number >= 0", config.eps));
    }
    let (rows, width) = rows_and_width(op, "x", x)?;
    if width > MAX_NORM_WIDTH {
        return Err(Error::invalid(
            op,
            "x",
            format!("a last dimension of at most {MAX_NORM_WIDTH}"),
            format!("shape {:?}", x.shape()),
        ));
    }
    let device = x.device();
    expect_tensor(op, "params.weight", params.weight, &[width], x.dtype(), &device)?;
    if let Some(bias) = params.bias {
        expect_tensor(op, "params.bias", bias, &[width], x.dtype(), &device)?;
    }
    Ok((rows, width))
}

fn check_stats(op: &'static str, stats: &NormStats, rows: usize, device: &Device) -> Result<()> {
    expect_tensor(op, "stats.mean", &stats.mean, &[rows], DType::F32, device)?;
    expect_tensor(op, "stats.rstd", &stats.rstd, &[rows], DType::F32, device)
}

/// The forward as new tensors: `(y, s, stats)`, with `s = x + residual` when a residual is
/// given (else `None`: `s` is `x`).
pub fn norm_forward(
    config: &NormConfig,
    x: &Tensor,
    residual: Option<&Tensor>,
    params: NormParams<'_>,
) -> Result<(Tensor, Option<Tensor>, NormStats)> {
    let (rows, _) = check_common("norm_forward", config, x, &params)?;
    let device = x.device();
    let mut out = new_output(x.shape(), x.dtype(), &device)?;
    let mut stats = NormStats::new(rows, &device)?;
    let sum = match residual {
        Some(residual) => {
            let mut sum = new_output(x.shape(), x.dtype(), &device)?;
            norm_forward_into(config, x, Some((residual, &mut sum)), params, &mut out, &mut stats)?;
            Some(sum)
        }
        None => {
            norm_forward_into(config, x, None, params, &mut out, &mut stats)?;
            None
        }
    };
    Ok((out, sum, stats))
}

/// The forward into existing tensors. `residual`, when given, is `(residual, sum)`: the tensor
/// added to `x` and where the sum goes (both of the shape and dtype of `x`); `out` has the shape
/// and dtype of `x`; `stats` holds [rows] f32 tensors.
pub fn norm_forward_into(
    config: &NormConfig,
    x: &Tensor,
    residual: Option<(&Tensor, &mut Tensor)>,
    params: NormParams<'_>,
    out: &mut Tensor,
    stats: &mut NormStats,
) -> Result<()> {
    const OP: &str = "norm_forward";
    let (rows, width) = check_common(OP, config, x, &params)?;
    if let Some((residual, sum)) = &residual {
        expect_like(OP, "residual", residual, x)?;
        expect_like(OP, "sum", sum, x)?;
    }
    expect_like(OP, "out", out, x)?;
    check_stats(OP, stats, rows, &x.device())?;
    match x.device() {
        Device::Cpu => cpu::forward(config, x, residual, &params, out, stats, width),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(config, x, residual, &params, out, stats, rows, width),
    }
}

/// The backward. `input` is the tensor the forward normalised (`x`, or the sum it wrote when
/// fused), `d_out` the gradient of `y`, `d_skip` (optional) the gradient reaching `input`
/// through the skip connection, added to `d_input`. `params.bias` is not read (the bias does
/// not enter the input gradient); `grads.d_bias`, when given, receives the bias gradient.
pub fn norm_backward_into(
    config: &NormConfig,
    d_out: &Tensor,
    d_skip: Option<&Tensor>,
    input: &Tensor,
    params: NormParams<'_>,
    stats: &NormStats,
    grads: NormGrads<'_>,
) -> Result<()> {
    const OP: &str = "norm_backward";
    let (rows, width) = check_common(OP, config, input, &params)?;
    let device = input.device();
    expect_like(OP, "d_out", d_out, input)?;
    if let Some(d_skip) = d_skip {
        expect_like(OP, "d_skip", d_skip, input)?;
    }
    check_stats(OP, stats, rows, &device)?;
    expect_like(OP, "grads.d_input", grads.d_input, input)?;
    expect_tensor(OP, "grads.d_weight", grads.d_weight, &[width], DType::F32, &device)?;
    if let Some(d_bias) = &grads.d_bias {
        expect_tensor(OP, "grads.d_bias", d_bias, &[width], DType::F32, &device)?;
    }
    match device {
        Device::Cpu => cpu::backward(config, d_out, d_skip, input, &params, stats, grads, width),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(config, d_out, d_skip, input, &params, stats, grads, rows, width),
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    /// Rows per parallel task of the backward: each task sums its rows' parameter gradients,
    /// and the tasks' sums are added in order.
    const BACKWARD_ROWS: usize = 64;

    fn forward_typed<T: Float>(
        config: &NormConfig,
        x: &Tensor,
        residual: Option<(&Tensor, &mut Tensor)>,
        params: &NormParams<'_>,
        out: &mut Tensor,
        stats: &mut NormStats,
        width: usize,
    ) -> Result<()> {
        let rms = config.kind == NormKind::RmsNorm;
        let x = x.host_slice::<T>()?;
        let weight: Vec<f32> = params.weight.host_slice::<T>()?.iter().map(|v| v.to_f32()).collect();
        let bias: Option<Vec<f32>> = params
            .bias
            .map(|b| b.host_slice::<T>().map(|b| b.iter().map(|v| v.to_f32()).collect()))
            .transpose()?;
        let out = out.host_slice_mut::<T>()?;
        let NormStats { mean, rstd } = stats;
        let means = mean.host_slice_mut::<f32>()?;
        let rstds = rstd.host_slice_mut::<f32>()?;
        let (residual, sum) = match residual {
            Some((r, s)) => (Some(r.host_slice::<T>()?), Some(s.host_slice_mut::<T>()?)),
            None => (None, None),
        };
        let mut sum_rows: Vec<Option<&mut [T]>> = match sum {
            Some(s) => s.chunks_mut(width).map(Some).collect(),
            None => (0..means.len()).map(|_| None).collect(),
        };
        out.par_chunks_mut(width)
            .zip(means.par_iter_mut().zip(rstds.par_iter_mut()))
            .zip(sum_rows.par_iter_mut())
            .enumerate()
            .for_each(|(row, ((y, (mean_out, rstd_out)), sum_row))| {
                let base = row * width;
                let s: Vec<f32> = (0..width)
                    .map(|c| match residual {
                        Some(r) => T::from_f32(x[base + c].to_f32() + r[base + c].to_f32()).to_f32(),
                        None => x[base + c].to_f32(),
                    })
                    .collect();
                if let Some(sum_row) = sum_row {
                    for (dst, &v) in sum_row.iter_mut().zip(&s) {
                        *dst = T::from_f32(v);
                    }
                }
                let (mean, rstd) = if rms {
                    let squares: f32 = s.iter().map(|v| v * v).sum();
                    (0.0, 1.0 / (squares / width as f32 + config.eps).sqrt())
                } else {
                    // Sums of s - s[0] (as the kernel): a row far from zero keeps its mean's digits.
                    let shift = s[0];
                    let mean = shift + s.iter().map(|v| v - shift).sum::<f32>() / width as f32;
                    let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                    (mean, 1.0 / (var + config.eps).sqrt())
                };
                for (c, y) in y.iter_mut().enumerate() {
                    let b = bias.as_ref().map_or(0.0, |b| b[c]);
                    *y = T::from_f32((s[c] - mean) * rstd * weight[c] + b);
                }
                *mean_out = mean;
                *rstd_out = rstd;
            });
        Ok(())
    }

    pub(super) fn forward(
        config: &NormConfig,
        x: &Tensor,
        residual: Option<(&Tensor, &mut Tensor)>,
        params: &NormParams<'_>,
        out: &mut Tensor,
        stats: &mut NormStats,
        width: usize,
    ) -> Result<()> {
        with_float_type!(x.dtype(), "norm_forward", "x", T => forward_typed::<T>(config, x, residual, params, out, stats, width))
    }

    /// Adds the tasks' partial sums per column, in task order, into or over `target`.
    fn reduce(target: &mut [f32], partials: &[Vec<f32>], accumulate: bool) {
        for (c, t) in target.iter_mut().enumerate() {
            let sum = partials.iter().fold(0.0f32, |acc, p| acc + p[c]);
            *t = if accumulate { *t + sum } else { sum };
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_typed<T: Float>(
        config: &NormConfig,
        d_out: &Tensor,
        d_skip: Option<&Tensor>,
        input: &Tensor,
        params: &NormParams<'_>,
        stats: &NormStats,
        grads: NormGrads<'_>,
        width: usize,
    ) -> Result<()> {
        let rms = config.kind == NormKind::RmsNorm;
        let d_out = d_out.host_slice::<T>()?;
        let d_skip = d_skip.map(|d| d.host_slice::<T>()).transpose()?;
        let input = input.host_slice::<T>()?;
        let weight: Vec<f32> = params.weight.host_slice::<T>()?.iter().map(|v| v.to_f32()).collect();
        let means = stats.mean.host_slice::<f32>()?;
        let rstds = stats.rstd.host_slice::<f32>()?;
        let d_input = grads.d_input.host_slice_mut::<T>()?;
        // Each task: its rows' input gradients, and its partial parameter gradients.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = d_input
            .par_chunks_mut(width * BACKWARD_ROWS)
            .enumerate()
            .map(|(task, d_input)| {
                let mut d_weight = vec![0.0f32; width];
                let mut d_bias = vec![0.0f32; width];
                for (i, d_in) in d_input.chunks_mut(width).enumerate() {
                    let row = task * BACKWARD_ROWS + i;
                    let base = row * width;
                    let (mean, rstd) = (means[row], rstds[row]);
                    let mut sum_dyw = 0.0f32;
                    let mut sum_dyw_xhat = 0.0f32;
                    for c in 0..width {
                        let dy = d_out[base + c].to_f32();
                        let xhat = (input[base + c].to_f32() - mean) * rstd;
                        let dyw = dy * weight[c];
                        sum_dyw += dyw;
                        sum_dyw_xhat += dyw * xhat;
                        d_weight[c] += dy * xhat;
                        d_bias[c] += dy;
                    }
                    let mean_dyw = if rms { 0.0 } else { sum_dyw / width as f32 };
                    let mean_dyw_xhat = sum_dyw_xhat / width as f32;
                    for (c, d) in d_in.iter_mut().enumerate() {
                        let dy = d_out[base + c].to_f32();
                        let xhat = (input[base + c].to_f32() - mean) * rstd;
                        let skip = d_skip.map_or(0.0, |s| s[base + c].to_f32());
                        *d = T::from_f32(rstd * (dy * weight[c] - mean_dyw - xhat * mean_dyw_xhat) + skip);
                    }
                }
                (d_weight, d_bias)
            })
            .collect();
        let (weight_partials, bias_partials): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().unzip();
        reduce(
            grads.d_weight.host_slice_mut::<f32>()?,
            &weight_partials,
            grads.accumulate,
        );
        if let Some(d_bias) = grads.d_bias {
            reduce(d_bias.host_slice_mut::<f32>()?, &bias_partials, grads.accumulate);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        config: &NormConfig,
        d_out: &Tensor,
        d_skip: Option<&Tensor>,
        input: &Tensor,
        params: &NormParams<'_>,
        stats: &NormStats,
        grads: NormGrads<'_>,
        width: usize,
    ) -> Result<()> {
        with_float_type!(input.dtype(), "norm_backward", "input", T => backward_typed::<T>(config, d_out, d_skip, input, params, stats, grads, width))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::support::cuda::{address_or_null, aligned16};
    use cudarc::driver::sys::CUfunction_attribute;

    /// Must match kernels/norm.cu.
    const FWD_THREADS: u32 = 256;
    const FWD_ROWS_PER_BLOCK: usize = 8;
    const BWD_THREADS: u32 = 256;
    const PARAM_THREADS: usize = 256;
    /// Backward blocks per multiprocessor: enough to hide the latency of each block's walk over
    /// its rows; each writes 2·C f32 partials.
    const BWD_BLOCKS_PER_SM: usize = 4;
    /// Dynamic shared memory a kernel may use without opting in.
    const DEFAULT_SHARED_BYTES: usize = 48 << 10;

    fn vector_ok(width: usize, dtype: DType, addresses: &[u64]) -> bool {
        width.is_multiple_of(16 / dtype.size_in_bytes()) && aligned16(addresses)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        config: &NormConfig,
        x: &Tensor,
        residual: Option<(&Tensor, &mut Tensor)>,
        params: &NormParams<'_>,
        out: &mut Tensor,
        stats: &mut NormStats,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let x_address = x_buffer.address();
        let (residual_address, sum_address) = match &residual {
            Some((r, s)) => (r.device_buffer()?.address(), s.device_buffer()?.address()),
            None => (0, 0),
        };
        let weight = params.weight.device_buffer()?.address();
        let bias = address_or_null(params.bias)?;
        let out_address = out.device_buffer()?.address();
        let mean = stats.mean.device_buffer()?.address();
        let rstd = stats.rstd.device_buffer()?.address();
        let vectorised = vector_ok(
            width,
            x.dtype(),
            &[x_address, residual_address, sum_address, weight, bias, out_address],
        );
        let name = format!(
            "{}_fwd{}{}_{}",
            config.prefix(),
            if residual.is_some() { "_residual" } else { "" },
            if vectorised { "_vec" } else { "" },
            x.dtype().name()
        );
        let function = backend.function("norm", &name)?;
        let (rows_i, width_i) = (rows as i32, width as i32);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&x_address)
            .arg(&residual_address)
            .arg(&sum_address)
            .arg(&weight)
            .arg(&bias)
            .arg(&out_address)
            .arg(&mean)
            .arg(&rstd)
            .arg(&rows_i)
            .arg(&width_i)
            .arg(&config.eps);
        let launch = LaunchConfig {
            grid_dim: (rows.div_ceil(FWD_ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (FWD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes: `rows` rows of `width` for x, residual, sum and out, `width`
        // weights (and biases, or null), `rows` statistics; the vector kernel only on 16-byte
        // aligned buffers whose rows hold whole vectors. One warp per row, rows checked.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        config: &NormConfig,
        d_out: &Tensor,
        d_skip: Option<&Tensor>,
        input: &Tensor,
        params: &NormParams<'_>,
        stats: &NormStats,
        grads: NormGrads<'_>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let d_out_buffer = d_out.device_buffer()?;
        let backend = d_out_buffer.backend().clone();
        let d_out_address = d_out_buffer.address();
        let d_skip_address = address_or_null(d_skip)?;
        let input_address = input.device_buffer()?.address();
        let weight = params.weight.device_buffer()?.address();
        let mean = stats.mean.device_buffer()?.address();
        let rstd = stats.rstd.device_buffer()?.address();
        let d_input = grads.d_input.device_buffer()?.address();
        let d_weight = grads.d_weight.device_buffer()?.address();
        let d_bias = address_or_null(grads.d_bias.as_deref())?;

        // A fixed split of the rows into blocks (it depends only on the GPU's size), so that the
        // parameter gradients are summed in the same order every run.
        let target_blocks = (backend.multiprocessors() * BWD_BLOCKS_PER_SM).max(1);
        let rows_per_block = rows.div_ceil(target_blocks).max(1);
        let blocks = rows.div_ceil(rows_per_block);
        // The partials live in a scratch buffer kept from call to call: no allocation per call.
        let partial_bytes = (blocks * 2 * width).max(1) * 4;
        backend.with_scratch("norm_backward", partial_bytes, &[], |partials_address| {
            let (rows_i, width_i, rows_per_block_i, blocks_i) =
                (rows as i32, width as i32, rows_per_block as i32, blocks as i32);

            if blocks > 0 {
                let vectorised = vector_ok(
                    width,
                    input.dtype(),
                    &[d_out_address, d_skip_address, input_address, weight, d_input],
                );
                let name = format!(
                    "{}_bwd{}_{}",
                    config.prefix(),
                    if vectorised { "_vec" } else { "" },
                    input.dtype().name()
                );
                let function = backend.function("norm", &name)?;
                let shared = 2 * width * 4;
                if shared > DEFAULT_SHARED_BYTES {
                    function
                        .set_attribute(
                            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            shared as i32,
                        )
                        .context(&format!("allowing {shared} bytes of shared memory for {name}"))?;
                }
                let mut builder = backend.launch_builder(&function);
                builder
                    .arg(&d_out_address)
                    .arg(&d_skip_address)
                    .arg(&input_address)
                    .arg(&weight)
                    .arg(&mean)
                    .arg(&rstd)
                    .arg(&d_input)
                    .arg(&partials_address)
                    .arg(&rows_i)
                    .arg(&width_i)
                    .arg(&rows_per_block_i);
                let launch = LaunchConfig {
                    grid_dim: (blocks as u32, 1, 1),
                    block_dim: (BWD_THREADS, 1, 1),
                    shared_mem_bytes: shared as u32,
                };
                // SAFETY: validated shapes; `blocks` blocks of `rows_per_block` rows cover every
                // row once (the last block stops at `rows`); the partials hold 2·width f32 per block;
                // the shared memory holds 2·width f32.
                unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
            }

            let function = backend.function("norm", "norm_bwd_params")?;
            let accumulate = grads.accumulate as i32;
            let mut builder = backend.launch_builder(&function);
            builder
                .arg(&partials_address)
                .arg(&blocks_i)
                .arg(&width_i)
                .arg(&d_weight)
                .arg(&d_bias)
                .arg(&accumulate);
            let launch = LaunchConfig {
                grid_dim: (width.div_ceil(PARAM_THREADS) as u32, 1, 1),
                block_dim: (PARAM_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the partials of `blocks` blocks were written above; d_weight (and d_bias when
            // not null) hold `width` f32; one thread per column, columns checked.
            unsafe { builder.launch(launch) }.context("launching norm_bwd_params")?;
            Ok(())
        })
    }
}
