//! Sampling the next token from each row of logits: greedy when the temperature is 0, else from
//! `softmax(logits / temperature)` restricted by top-k and top-p, with one uniform number per row
//! from a counter-based generator, so that the CPU and the GPU draw the same number for the same
//! (seed, offset, row) and, up to the rounding of f32 sums, the same token.
//!
//! Definitions (the same on both devices):
//! - greedy: the largest logit, the lowest index among equal ones;
//! - top-k (`top_k > 0`): keep every token whose logit is at least the k-th largest (ties at the
//!   boundary are all kept, as in Hugging Face's warper);
//! - top-p (`top_p < 1`): of those, keep every token whose strictly more probable tokens hold
//!   less than `top_p` of the kept probability mass;
//! - the token is the first kept index (in index order) at which the running sum of kept
//!   `exp((x - max) / temperature)` (each weight f32, the sums f64) exceeds
//!   `u · (their total)`, with
//!   `u = `[`sampling_uniform`]`(seed, offset, row)`.
//!
//! Use a new `offset` for every generated token (its position, say) so that each step draws
//! fresh numbers. Logits are f32, bf16 or f16 and must be finite; the output is u32.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::support::{expect_tensor, new_output, rows_and_width};
use crate::tensor::Tensor;

/// How to sample. [`SamplingOptions::greedy`] takes the most likely token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 for greedy, else finite and > 0.
    pub temperature: f32,
    /// Keep only the tokens whose logit is at least the k-th largest; 0 keeps all.
    pub top_k: usize,
    /// Nucleus sampling: in (0, 1]; 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
    /// A counter (for example the position being generated): each value gives fresh numbers.
    pub offset: u64,
}

impl SamplingOptions {
    /// Always the most likely token.
    pub fn greedy() -> SamplingOptions {
        SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            offset: 0,
        }
    }
}

fn splitmix64(z: u64) -> u64 {
    let z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform number in [0, 1) (24 random bits) that row `row` draws for `seed` and `offset`:
/// `splitmix64(splitmix64(seed ^ splitmix64(offset)) ^ row) >> 40`, divided by 2^24. The CUDA
/// kernel computes the same bits.
pub fn sampling_uniform(seed: u64, offset: u64, row: u64) -> f32 {
    let bits = splitmix64(splitmix64(seed ^ splitmix64(offset)) ^ row) >> 40;
    bits as f32 * (1.0 / 16_777_216.0)
}

/// Maps an f32 to a u32 whose unsigned order is the float order.
fn order_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

const OP: &str = "sample";

fn validate(logits: &Tensor, options: &SamplingOptions) -> Result<(usize, usize)> {
    let (rows, vocab) = rows_and_width(OP, "logits", logits)?;
    if !(options.temperature.is_finite() && options.temperature >= 0.0) {
        return Err(Error::invalid(
            OP,
            "options.temperature",
            "a finite number >= 0",
            options.temperature,
        ));
    }
    if !(options.top_p > 0.0 && options.top_p <= 1.0) {
        return Err(Error::invalid(OP, "options.top_p", "a number in (0, 1]", options.top_p));
    }
    if options.top_k > i32::MAX as usize {
        return Err(Error::invalid(OP, "options.top_k", "at most 2^31-1", options.top_k));
    }
    Ok((rows, vocab))
}

/// One token per row of `logits` (shape (..., V)): a u32 tensor of the leading shape.
pub fn sample(logits: &Tensor, options: &SamplingOptions) -> Result<Tensor> {
    validate(logits, options)?;
    let mut out = new_output(
        &logits.shape()[..logits.shape().len() - 1],
        DType::U32,
        &logits.device(),
    )?;
    sample_into(logits, options, &mut out)?;
    Ok(out)
}

/// [`sample`] into `out`, u32 of the logits' shape without its last dimension.
pub fn sample_into(logits: &Tensor, options: &SamplingOptions, out: &mut Tensor) -> Result<()> {
    let (rows, vocab) = validate(logits, options)?;
    let row_shape = &logits.shape()[..logits.shape().len() - 1];
    expect_tensor(OP, "out", out, row_shape, DType::U32, &logits.device())?;
    match logits.device() {
        Device::Cpu => cpu::sample(logits, options, out, rows, vocab),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::sample(logits, options, out, rows, vocab),
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    /// The row's token, following the module's definitions step by step (the kernel's order).
    fn sample_row(x: &[f32], options: &SamplingOptions, row: usize) -> u32 {
        let vocab = x.len();
        let (mut max, mut argmax) = (f32::NEG_INFINITY, u32::MAX);
        for (i, &v) in x.iter().enumerate() {
            if v > max || (v == max && (i as u32) < argmax) {
                (max, argmax) = (v, i as u32);
            }
        }
        if options.temperature == 0.0 {
            return if (argmax as usize) < vocab { argmax } else { 0 };
        }
        let inv_t = 1.0 / options.temperature;
        // Weights in f32 (as the kernel), their sums in f64.
        let weight = |v: f32| ((v - max) * inv_t).exp() as f64;
        let mut kept = 0u32;
        if options.top_k > 0 && options.top_k < vocab {
            let (mut lo, mut hi) = (0u32, u32::MAX);
            while lo < hi {
                let mid = lo + (hi as u64 - lo as u64).div_ceil(2) as u32;
                let count = x.iter().filter(|&&v| order_key(v) >= mid).count();
                if count >= options.top_k {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            kept = lo;
        }
        if options.top_p < 1.0 {
            let total: f64 = x.iter().filter(|&&v| order_key(v) >= kept).map(|&v| weight(v)).sum();
            let limit = options.top_p as f64 * total;
            let (mut lo, mut hi) = (kept, u32::MAX);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let above: f64 = x
                    .iter()
                    .filter(|&&v| order_key(v) > mid && order_key(v) >= kept)
                    .map(|&v| weight(v))
                    .sum();
                if above < limit {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            kept = lo;
        }
        let mass: f64 = x.iter().filter(|&&v| order_key(v) >= kept).map(|&v| weight(v)).sum();
        let target = sampling_uniform(options.seed, options.offset, row as u64) as f64 * mass;
        let mut running = 0.0f64;
        let mut last = 0u32;
        for (i, &v) in x.iter().enumerate() {
            if order_key(v) >= kept {
                running += weight(v);
                last = i as u32;
                if running > target {
                    return i as u32;
                }
            }
        }
        last
    }

    fn sample_typed<T: Float>(
        logits: &Tensor,
        options: &SamplingOptions,
        out: &mut Tensor,
        vocab: usize,
    ) -> Result<()> {
        let x = logits.host_slice::<T>()?;
        out.host_slice_mut::<u32>()?
            .par_iter_mut()
            .zip(x.par_chunks(vocab))
            .enumerate()
            .for_each(|(row, (token, x))| {
                let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                *token = sample_row(&x, options, row);
            });
        Ok(())
    }

    pub(super) fn sample(
        logits: &Tensor,
        options: &SamplingOptions,
        out: &mut Tensor,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        debug_assert_eq!(out.numel(), rows);
        with_float_type!(logits.dtype(), OP, "logits", T => sample_typed::<T>(logits, options, out, vocab))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    /// Must match THREADS in kernels/sampling.cu.
    const THREADS: u32 = 512;

    pub(super) fn sample(
        logits: &Tensor,
        options: &SamplingOptions,
        out: &mut Tensor,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let buffer = logits.device_buffer()?;
        let backend = buffer.backend().clone();
        let (logits_address, out_address) = (buffer.address(), out.device_buffer()?.address());
        let name = format!("sample_{}", logits.dtype().name());
        let function = backend.function("sampling", &name)?;
        let (rows_i, vocab_i, top_k) = (rows as i32, vocab as i32, options.top_k as i32);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&logits_address)
            .arg(&out_address)
            .arg(&rows_i)
            .arg(&vocab_i)
            .arg(&options.temperature)
            .arg(&top_k)
            .arg(&options.top_p)
            .arg(&options.seed)
            .arg(&options.offset);
        let launch = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes: `rows` rows of `vocab` logits, `rows` u32 outputs; one block
        // per row, every read index below `vocab`.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
