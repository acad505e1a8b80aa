//! Wavelet mixing (WaveletGPT, ALGORITHMS.md §3): selected embedding coordinates are replaced by
//! their causal mean over the previous `k_i` tokens, the others pass through bit for bit.
//!
//! `x` is (batch, seq, dim). For a mixed coordinate `i` with window `k`:
//! `out[b,t,i] = (1/div(t)) · Σ_{s=t-k+1..t} x[b,s,i]` with `x[b,s<0,i] = 0` and `div(t) = k`
//! ([`WaveletDivisor::Window`], a causal box convolution) or `min(k, t+1)`
//! ([`WaveletDivisor::Available`], the mean of the tokens that exist). The backward is the
//! adjoint, a suffix-window sum. The learnable variant replaces the box by a per-coordinate causal
//! FIR kernel `w_i` of length `k_i`: `out[t] = Σ_u w_i[u] · x[t-u]`, initialised to `1/k_i`.
//!
//! Windows follow the spec's exponential rule by default ([`WaveletConfig::exponential`]) and can
//! be given one by one ([`WaveletConfig::from_windows`]). All arithmetic is f32; inputs and
//! outputs are f32, bf16 or f16.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

/// The largest window any coordinate may have. Windows are also bounded by the context length
/// given to [`WaveletConfig::exponential`]; this bounds explicit ones.
pub const MAX_WINDOW: usize = 1 << 20;

/// Which CUDA kernel runs the box window (forward and backward); the CPU has one implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveletKernel {
    /// One warp per (256-row segment, 8 coordinates); windows longer than a segment add sums
    /// that earlier segments publish (the default).
    Segments,
    /// One block per (sequence, 64 coordinates) walking the whole sequence, chunks staged
    /// through a shared-memory ring with cp.async (needs 106 KiB of shared memory per block;
    /// sequences over 2^30 tokens take `Segments`).
    Tiles,
}

static KERNEL: AtomicU8 = AtomicU8::new(0);

/// Chooses the box-window kernel for every later call in this process, on every GPU.
pub fn set_wavelet_kernel(kernel: WaveletKernel) {
    KERNEL.store(kernel as u8, Ordering::Relaxed);
}

/// The box-window kernel that [`set_wavelet_kernel`] chose ([`WaveletKernel::Segments`] until then).
pub fn wavelet_kernel() -> WaveletKernel {
    match KERNEL.load(Ordering::Relaxed) {
        0 => WaveletKernel::Segments,
        _ => WaveletKernel::Tiles,
    }
}

/// What a window's sum is divided by near the start of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveletDivisor {
    /// Always `k`: the first `k-1` tokens average over zeros (a causal box convolution).
    Window,
    /// `min(k, t+1)`: the mean of the tokens that exist.
    Available,
}

/// Which coordinates are mixed, with which windows, and how the boundary is divided.
#[derive(Clone, Debug)]
pub struct WaveletConfig {
    /// Window per coordinate of the embedding, 0 for a coordinate that passes through.
    windows: Vec<u32>,
    divisor: WaveletDivisor,
    /// The windows and tap offsets uploaded once per GPU, so that a call costs no copy.
    #[cfg(feature = "cuda")]
    on_device: cuda::TableCache,
}

impl PartialEq for WaveletConfig {
    fn eq(&self, other: &Self) -> bool {
        self.windows == other.windows && self.divisor == other.divisor
    }
}

impl Eq for WaveletConfig {}

const OP: &str = "wavelet";

impl WaveletConfig {
    /// The spec's [PROPOSAL] rule over the coordinates `mixed` of a `dim`-wide embedding: with
    /// `E_w = mixed.len()` and `n = ceil(log2(k_max / k_min)) + 1` levels, the `j`-th mixed
    /// coordinate gets `k = min(k_min · 2^floor(j·n / E_w), k_max)`. `k_max` may not exceed
    /// `context`, the longest sequence the windows are meant for.
    pub fn exponential(
        dim: usize,
        mixed: Range<usize>,
        k_min: usize,
        k_max: usize,
        context: usize,
        divisor: WaveletDivisor,
    ) -> Result<WaveletConfig> {
        const OP: &str = "WaveletConfig::exponential";
        if dim == 0 {
            return Err(Error::invalid(OP, "dim", "at least 1", dim));
        }
        if mixed.start >= mixed.end || mixed.end > dim {
            return Err(Error::invalid(
                OP,
                "mixed",
                format!("a non-empty range within 0..{dim}"),
                format!("{mixed:?}"),
            ));
        }
        if k_min == 0 || k_min > k_max {
            return Err(Error::invalid(
                OP,
                "k_min",
                format!("between 1 and k_max = {k_max}"),
                k_min,
            ));
        }
        if k_max > context.min(MAX_WINDOW) {
            return Err(Error::invalid(
                OP,
                "k_max",
                format!("at most the context length {context} (and {MAX_WINDOW})"),
                k_max,
            ));
        }
        let mixed_count = mixed.len();
        // Levels: the smallest n with k_min · 2^(n-1) >= k_max.
        let mut levels = 1usize;
        while k_min << (levels - 1) < k_max {
            levels += 1;
        }
        let windows = (0..mixed_count)
            .map(|j| {
                let level = j * levels / mixed_count;
                (k_min << level).min(k_max)
            })
            .collect();
        WaveletConfig::from_windows(dim, mixed.start, windows, divisor)
    }

    /// The spec's defaults for a `dim`-wide model with context `context`: the first `dim/2`
    /// coordinates mixed, windows from 2 to `context`, divided by the window.
    pub fn paper_default(dim: usize, context: usize) -> Result<WaveletConfig> {
        WaveletConfig::exponential(dim, 0..dim / 2, 2, context, context, WaveletDivisor::Window)
    }

    /// Explicit windows for the coordinates `first..first + windows.len()`; each between 1 and
    /// [`MAX_WINDOW`].
    pub fn from_windows(
        dim: usize,
        first: usize,
        windows: Vec<usize>,
        divisor: WaveletDivisor,
    ) -> Result<WaveletConfig> {
        const OP: &str = "WaveletConfig::from_windows";
        if dim == 0 {
            return Err(Error::invalid(OP, "dim", "at least 1", dim));
        }
        if windows.is_empty() || first.checked_add(windows.len()).is_none_or(|end| end > dim) {
            return Err(Error::invalid(
                OP,
                "windows",
                format!(
                    "1 to {} windows starting at coordinate {first} of {dim}",
                    dim.saturating_sub(first)
                ),
                format!("{} windows", windows.len()),
            ));
        }
        if let Some((j, &k)) = windows.iter().enumerate().find(|(_, &k)| k == 0 || k > MAX_WINDOW) {
            return Err(Error::invalid(
                OP,
                "windows",
                format!("every window between 1 and {MAX_WINDOW}"),
                format!("{k} for coordinate {}", first + j),
            ));
        }
        // The learnable variant addresses its taps with u32 offsets.
        let taps: usize = windows.iter().sum();
        if taps > u32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "windows",
                format!("windows summing to at most {} taps", u32::MAX),
                format!("{taps} taps"),
            ));
        }
        let mut per_coordinate = vec![0u32; dim];
        for (j, &k) in windows.iter().enumerate() {
            per_coordinate[first + j] = k as u32;
        }
        Ok(WaveletConfig {
            windows: per_coordinate,
            divisor,
            #[cfg(feature = "cuda")]
            on_device: Default::default(),
        })
    }

    /// The same mixing for `copies` embeddings side by side, `copies · dim` wide: `copies`
    /// sequences stored position-major, (seq, copies, dim), mix in one call seen as
    /// (1, seq, copies · dim), each column exactly as it would alone.
    pub fn tiled(&self, copies: usize) -> Result<WaveletConfig> {
        if copies == 0
            || self
                .windows
                .len()
                .checked_mul(copies)
                .is_none_or(|n| n > i32::MAX as usize)
        {
            return Err(Error::invalid(
                "WaveletConfig::tiled",
                "copies",
                format!("1 to {} copies", i32::MAX as usize / self.windows.len()),
                copies,
            ));
        }
        Ok(WaveletConfig {
            windows: self.windows.repeat(copies),
            divisor: self.divisor,
            #[cfg(feature = "cuda")]
            on_device: Default::default(),
        })
    }

    /// The embedding width this configuration is for.
    pub fn dim(&self) -> usize {
        self.windows.len()
    }

    /// Window per coordinate; 0 for a coordinate that passes through.
    pub fn windows(&self) -> &[u32] {
        &self.windows
    }

    pub fn divisor(&self) -> WaveletDivisor {
        self.divisor
    }

    /// Number of taps of the learnable variant: the sum of the windows.
    pub fn tap_count(&self) -> usize {
        self.windows.iter().map(|&k| k as usize).sum()
    }

    /// Offset of each coordinate's taps in the flat tap tensor (coordinates in order; a
    /// pass-through coordinate has none).
    pub fn tap_offsets(&self) -> Vec<u32> {
        let mut offset = 0u32;
        self.windows
            .iter()
            .map(|&k| {
                let here = offset;
                offset += k;
                here
            })
            .collect()
    }

    fn check_input(&self, op: &'static str, arg: &'static str, x: &Tensor) -> Result<(usize, usize)> {
        x.expect_rank(op, arg, 3)?;
        x.expect_dtype(op, arg, &[DType::F32, DType::BF16, DType::F16])?;
        let (batch, seq, dim) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        if dim != self.dim() {
            return Err(Error::invalid(
                op,
                arg,
                format!("shape (batch, seq, {}) for this configuration", self.dim()),
                format!("shape {:?}", x.shape()),
            ));
        }
        if batch == 0 || seq == 0 {
            return Err(Error::invalid(
                op,
                arg,
                "batch and seq of at least 1",
                format!("shape {:?}", x.shape()),
            ));
        }
        if seq > i32::MAX as usize || batch > i32::MAX as usize {
            return Err(Error::invalid(
                op,
                arg,
                "batch and seq below 2^31",
                format!("shape {:?}", x.shape()),
            ));
        }
        Ok((batch, seq))
    }
}

/// Checks that `other` matches `x` in shape, dtype and device.
fn expect_like(op: &'static str, arg: &'static str, other: &Tensor, x: &Tensor) -> Result<()> {
    other.expect_dtype(op, arg, &[x.dtype()])?;
    other.expect_shape(op, arg, x.shape())?;
    x.device().expect_same(&other.device(), op, arg)
}

fn new_like(x: &Tensor) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => Tensor::zeros(x.shape(), x.dtype(), &Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => Tensor::uninit_cuda(x.shape(), x.dtype(), &backend),
    }
}

/// Which way a window runs: the forward averages the past; the backward, its adjoint, sums the
/// future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
}

/// `out = wavelet(x + residual)`: the causal multi-scale average of `x` (plus `residual`, when
/// given, added in f32 on the fly: the sum that precedes the mixing in the model, never written).
pub fn wavelet_forward(x: &Tensor, residual: Option<&Tensor>, config: &WaveletConfig) -> Result<Tensor> {
    config.check_input(OP, "x", x)?;
    let mut out = new_like(x)?;
    wavelet_forward_into(x, residual, config, &mut out)?;
    Ok(out)
}

/// [`wavelet_forward`] into an existing `out` of the shape, dtype and device of `x`.
pub fn wavelet_forward_into(
    x: &Tensor,
    residual: Option<&Tensor>,
    config: &WaveletConfig,
    out: &mut Tensor,
) -> Result<()> {
    let (batch, seq) = config.check_input(OP, "x", x)?;
    if let Some(residual) = residual {
        expect_like(OP, "residual", residual, x)?;
    }
    expect_like(OP, "out", out, x)?;
    let dims = Dims::new(batch, seq, config.dim());
    match x.device() {
        Device::Cpu => cpu::window(dims, x, residual, config, out, Direction::Forward),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::window(dims, x, residual, config, out, Direction::Forward),
    }
}

/// The gradient of [`wavelet_forward`] with respect to its input (and to `residual`, which is
/// the same): `d_x[s] = Σ_{t=s..s+k-1} d_out[t] / div(t)` for a mixed coordinate, `d_out` for the
/// others.
pub fn wavelet_backward(d_out: &Tensor, config: &WaveletConfig) -> Result<Tensor> {
    config.check_input("wavelet_backward", "d_out", d_out)?;
    let mut d_x = new_like(d_out)?;
    wavelet_backward_into(d_out, config, &mut d_x)?;
    Ok(d_x)
}

/// [`wavelet_backward`] into an existing `d_x`.
pub fn wavelet_backward_into(d_out: &Tensor, config: &WaveletConfig, d_x: &mut Tensor) -> Result<()> {
    const OP: &str = "wavelet_backward";
    let (batch, seq) = config.check_input(OP, "d_out", d_out)?;
    expect_like(OP, "d_x", d_x, d_out)?;
    let dims = Dims::new(batch, seq, config.dim());
    match d_out.device() {
        Device::Cpu => cpu::window(dims, d_out, None, config, d_x, Direction::Backward),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::window(dims, d_out, None, config, d_x, Direction::Backward),
    }
}

/// Taps of the learnable variant at their initial value: `1/k_i` for each of coordinate `i`'s
/// `k_i` taps, laid out as [`WaveletConfig::tap_offsets`] says, f32.
pub fn wavelet_taps_init(config: &WaveletConfig, device: &Device) -> Result<Tensor> {
    let taps: Vec<f32> = config
        .windows
        .iter()
        .flat_map(|&k| std::iter::repeat_n(1.0 / k as f32, k as usize))
        .collect();
    let count = taps.len();
    Tensor::from_vec(taps, &[count], device)
}

fn check_taps(op: &'static str, taps: &Tensor, config: &WaveletConfig, x: &Tensor) -> Result<()> {
    taps.expect_dtype(op, "taps", &[DType::F32])?;
    taps.expect_shape(op, "taps", &[config.tap_count()])?;
    x.device().expect_same(&taps.device(), op, "taps")
}

/// The learnable variant's forward: `out[b,t,i] = Σ_{u<k_i} taps_i[u] · x[b,t-u,i]` for mixed
/// coordinates (`x` before the sequence start is 0), `x` for the others.
pub fn wavelet_learnable_forward(x: &Tensor, taps: &Tensor, config: &WaveletConfig) -> Result<Tensor> {
    const OP: &str = "wavelet_learnable_forward";
    let (batch, seq) = config.check_input(OP, "x", x)?;
    check_taps(OP, taps, config, x)?;
    let mut out = new_like(x)?;
    let dims = Dims::new(batch, seq, config.dim());
    match x.device() {
        Device::Cpu => cpu::fir(dims, x, taps, config, &mut out, Direction::Forward)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::fir(dims, x, taps, config, &mut out, Direction::Forward)?,
    }
    Ok(out)
}

/// The learnable variant's backward: returns `(d_x, d_taps)` with
/// `d_x[s] = Σ_u taps_i[u] · d_out[s+u]` and `d_taps_i[u] = Σ_{b,t} d_out[b,t,i] · x[b,t-u,i]`
/// (d_taps in f32, summed in a fixed order: deterministic).
pub fn wavelet_learnable_backward(
    d_out: &Tensor,
    x: &Tensor,
    taps: &Tensor,
    config: &WaveletConfig,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "wavelet_learnable_backward";
    let (batch, seq) = config.check_input(OP, "d_out", d_out)?;
    expect_like(OP, "x", x, d_out)?;
    check_taps(OP, taps, config, d_out)?;
    let mut d_x = new_like(d_out)?;
    let mut d_taps = Tensor::zeros(&[config.tap_count()], DType::F32, &d_out.device())?;
    let dims = Dims::new(batch, seq, config.dim());
    match d_out.device() {
        Device::Cpu => {
            cpu::fir(dims, d_out, taps, config, &mut d_x, Direction::Backward)?;
            cpu::tap_gradient(dims, d_out, x, config, &mut d_taps)?;
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            cuda::fir(dims, d_out, taps, config, &mut d_x, Direction::Backward)?;
            cuda::tap_gradient(dims, d_out, x, config, &mut d_taps)?;
        }
    }
    Ok((d_x, d_taps))
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
    dim: usize,
}

impl Dims {
    fn new(batch: usize, seq: usize, dim: usize) -> Dims {
        Dims { batch, seq, dim }
    }
}

/// `value / div(t)` for window `k`, rounded as the CUDA kernel rounds it: a multiply by the
/// correctly rounded reciprocal of the divisor.
#[inline(always)]
fn divide(value: f32, divisor: WaveletDivisor, k: usize, t: usize) -> f32 {
    match divisor {
        WaveletDivisor::Available if t + 1 < k => value * (1.0 / (t + 1) as f32),
        _ => value * (1.0 / k as f32),
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    /// The box-window forward or backward for one element type. Each (batch, coordinate) column
    /// is one running f32 window sum along the sequence: add the newest value, drop the one `k`
    /// steps back. Pass-through coordinates are copied (or, with a residual, summed and rounded).
    fn window_typed<T: Float>(
        d: Dims,
        x: &Tensor,
        residual: Option<&Tensor>,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        let x = x.host_slice::<T>()?;
        let residual = residual.map(|r| r.host_slice::<T>()).transpose()?;
        let out = out.host_slice_mut::<T>()?;
        let value = |index: usize| x[index].to_f32() + residual.map_or(0.0, |r| r[index].to_f32());
        // `step` walks the sequence in the window's direction; `time(step)` is the token.
        let time = |step: usize| match direction {
            Direction::Forward => step,
            Direction::Backward => d.seq - 1 - step,
        };
        // Forward divides the window sum; backward divides each term by its token's divisor
        // before summing (the adjoint of dividing after).
        let term = |value: f32, k: usize, t: usize| match direction {
            Direction::Forward => value,
            Direction::Backward => divide(value, config.divisor, k, t),
        };
        out.par_chunks_mut(d.seq * d.dim).enumerate().for_each(|(b, out)| {
            let base = b * d.seq * d.dim;
            let mut sums = vec![0.0f32; d.dim];
            for step in 0..d.seq {
                let t = time(step);
                for (i, (&k, sum)) in config.windows.iter().zip(sums.iter_mut()).enumerate() {
                    let (k, index) = (k as usize, t * d.dim + i);
                    if k == 0 {
                        out[index] = match residual {
                            Some(_) => T::from_f32(value(base + index)),
                            None => x[base + index],
                        };
                        continue;
                    }
                    *sum += term(value(base + index), k, t);
                    if step >= k {
                        let gone = time(step - k);
                        *sum -= term(value(base + gone * d.dim + i), k, gone);
                    }
                    let result = match direction {
                        Direction::Forward => divide(*sum, config.divisor, k, t),
                        Direction::Backward => *sum,
                    };
                    out[index] = T::from_f32(result);
                }
            }
        });
        Ok(())
    }

    pub(super) fn window(
        d: Dims,
        x: &Tensor,
        residual: Option<&Tensor>,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        with_float_type!(x.dtype(), OP, "x", T => window_typed::<T>(d, x, residual, config, out, direction))
    }

    /// The learnable variant's FIR: forward `out[t] = Σ_u w[u]·x[t-u]`, backward
    /// `d_x[s] = Σ_u w[u]·d_out[s+u]`.
    fn fir_typed<T: Float>(
        d: Dims,
        x: &Tensor,
        taps: &Tensor,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        let x = x.host_slice::<T>()?;
        let taps = taps.host_slice::<f32>()?;
        let offsets = config.tap_offsets();
        out.host_slice_mut::<T>()?
            .par_chunks_mut(d.seq * d.dim)
            .enumerate()
            .for_each(|(b, out)| {
                let x = &x[b * d.seq * d.dim..(b + 1) * d.seq * d.dim];
                for (i, &k) in config.windows.iter().enumerate() {
                    let w = &taps[offsets[i] as usize..offsets[i] as usize + k as usize];
                    for t in 0..d.seq {
                        out[t * d.dim + i] = if k == 0 {
                            x[t * d.dim + i]
                        } else {
                            let mut sum = 0.0f32;
                            // Taps past either end of the sequence meet zeros: stop there.
                            let reach = match direction {
                                Direction::Forward => t + 1,
                                Direction::Backward => d.seq - t,
                            };
                            for (u, &w) in w.iter().take(reach).enumerate() {
                                let s = match direction {
                                    Direction::Forward => t - u,
                                    Direction::Backward => t + u,
                                };
                                sum += w * x[s * d.dim + i].to_f32();
                            }
                            T::from_f32(sum)
                        };
                    }
                }
            });
        Ok(())
    }

    pub(super) fn fir(
        d: Dims,
        x: &Tensor,
        taps: &Tensor,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        with_float_type!(x.dtype(), OP, "x", T => fir_typed::<T>(d, x, taps, config, out, direction))
    }

    fn tap_gradient_typed<T: Float>(
        d: Dims,
        d_out: &Tensor,
        x: &Tensor,
        config: &WaveletConfig,
        d_taps: &mut Tensor,
    ) -> Result<()> {
        let d_out = d_out.host_slice::<T>()?;
        let x = x.host_slice::<T>()?;
        let d_taps = d_taps.host_slice_mut::<f32>()?;
        // One task per coordinate: each owns its taps, so the sums have a fixed order.
        let mut per_coordinate: Vec<(usize, &mut [f32])> = Vec::new();
        let mut rest = d_taps;
        for (i, &k) in config.windows.iter().enumerate() {
            let (mine, tail) = rest.split_at_mut(k as usize);
            if k > 0 {
                per_coordinate.push((i, mine));
            }
            rest = tail;
        }
        per_coordinate.into_par_iter().for_each(|(i, grad)| {
            for (u, g) in grad.iter_mut().enumerate() {
                let mut sum = 0.0f32;
                for b in 0..d.batch {
                    let base = b * d.seq * d.dim;
                    for t in u..d.seq {
                        sum += d_out[base + t * d.dim + i].to_f32() * x[base + (t - u) * d.dim + i].to_f32();
                    }
                }
                *g = sum;
            }
        });
        Ok(())
    }

    pub(super) fn tap_gradient(
        d: Dims,
        d_out: &Tensor,
        x: &Tensor,
        config: &WaveletConfig,
        d_taps: &mut Tensor,
    ) -> Result<()> {
        with_float_type!(d_out.dtype(), OP, "d_out", T => tap_gradient_typed::<T>(d, d_out, x, config, d_taps))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, DeviceBuffer, LaunchConfig, PushKernelArg};
    use std::sync::{Arc, Mutex};

    /// Must match kernels/wavelet.cu.
    const WINDOW_WARPS: u32 = 2;
    const COORDS_PER_WARP: usize = 8;
    const TAP_COORDS: usize = 32;
    const TAP_THREADS: u32 = 256;
    const FIR_THREADS: u32 = 256;

    /// Per-GPU state of a configuration: its table (`dim` windows, then `dim` tap offsets, u32),
    /// and the scratch where the box-window kernel's segments publish their sums.
    #[derive(Clone, Default)]
    pub(super) struct TableCache(Arc<Mutex<Vec<DeviceState>>>);

    struct DeviceState {
        ordinal: usize,
        table: Arc<DeviceBuffer>,
        /// Zeroed when allocated: block counters (kept at 0 between launches by the kernel),
        /// flags, then sums.
        scratch: Option<DeviceBuffer>,
        scratch_slots: usize,
        /// The last launch's number; flags equal to it mark sums written by that launch.
        epoch: u32,
    }

    impl std::fmt::Debug for TableCache {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("TableCache")
        }
    }

    /// Runs `f` with the state of `config` on `backend`, creating it on first use.
    fn with_state<R>(
        config: &WaveletConfig,
        backend: &Arc<CudaBackend>,
        f: impl FnOnce(&mut DeviceState) -> Result<R>,
    ) -> Result<R> {
        let mut cache = config
            .on_device
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = match cache.iter().position(|state| state.ordinal == backend.ordinal()) {
            Some(index) => index,
            None => {
                let mut words = config.windows.clone();
                words.extend(config.tap_offsets());
                cache.push(DeviceState {
                    ordinal: backend.ordinal(),
                    table: Arc::new(backend.upload(bytemuck::cast_slice(&words))?),
                    scratch: None,
                    scratch_slots: 0,
                    epoch: 0,
                });
                cache.len() - 1
            }
        };
        f(&mut cache[index])
    }

    /// The device table of `config` on `backend`, uploaded on first use.
    fn table(config: &WaveletConfig, backend: &Arc<CudaBackend>) -> Result<Arc<DeviceBuffer>> {
        with_state(config, backend, |state| Ok(state.table.clone()))
    }

    /// Layout shared with `WaveletScratch` in kernels/wavelet.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct WaveletScratch {
        sums: u64,
        flags: u64,
        counters: u64,
        epoch: u32,
        padding: u32,
    }

    // SAFETY: a plain #[repr(C)] struct of scalars, laid out as the kernel declares it.
    unsafe impl cudarc::driver::DeviceRepr for WaveletScratch {}

    /// Bytes before the flags: the two block counters, padded.
    const COUNTER_BYTES: usize = 16;

    /// A scratch with room for `slots` segment sums, and the next launch's epoch. A new scratch
    /// (first use, more slots, or every epoch used) starts zeroed, so that no flag equals a
    /// future epoch.
    fn scratch(state: &mut DeviceState, backend: &Arc<CudaBackend>, slots: usize) -> Result<WaveletScratch> {
        let flag_bytes = |slots: usize| (4 * slots).next_multiple_of(16);
        if state.scratch.is_none() || state.scratch_slots < slots || state.epoch == u32::MAX {
            // Dropping the old scratch frees it in stream order, after the launches using it.
            state.scratch = None;
            state.scratch = Some(backend.alloc_zeroed(COUNTER_BYTES + flag_bytes(slots) + 32 * slots)?);
            state.scratch_slots = slots;
            state.epoch = 0;
        }
        let base = match &state.scratch {
            Some(buffer) => buffer.address(),
            None => return Err(Error::cuda("wavelet", "scratch missing after allocation")),
        };
        // Epoch 0 is the value of flags never written.
        state.epoch += 1;
        Ok(WaveletScratch {
            counters: base,
            flags: base + COUNTER_BYTES as u64,
            sums: base + (COUNTER_BYTES + flag_bytes(state.scratch_slots)) as u64,
            epoch: state.epoch,
            padding: 0,
        })
    }

    /// The window table's address, and the tap offsets' right after it.
    fn addresses(table: &DeviceBuffer, dim: usize) -> (u64, u64) {
        let windows = table.address();
        (windows, windows + 4 * dim as u64)
    }

    /// The largest grid y extent CUDA allows.
    const MAX_GRID_Y: u32 = 65535;

    /// A grid x extent, or an error for a problem too large for one launch.
    fn grid_size(blocks: usize) -> Result<u32> {
        u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "x",
                    "a tensor small enough for one launch",
                    format!("{blocks} blocks"),
                )
            })
    }

    fn suffix(dtype: DType) -> &'static str {
        dtype.name()
    }

    fn int(value: usize) -> i32 {
        // Validation bounds batch, seq and dim far below i32::MAX.
        value as i32
    }

    /// Rows per segment of the box-window kernel: 32 lanes x rows per lane (VECTOR_ROWS).
    fn segment_rows(dtype: DType, residual: bool) -> usize {
        let rows = if dtype.size_in_bytes() == 4 { 4 } else { 8 };
        32 * if residual { rows / 2 } else { rows }
    }

    /// The longest sequence the tile kernel takes (its chunk arithmetic is in i32).
    const TILE_MAX_SEQ: usize = 1 << 30;

    pub(super) fn window(
        d: Dims,
        x: &Tensor,
        residual: Option<&Tensor>,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        if wavelet_kernel() == WaveletKernel::Tiles && d.seq <= TILE_MAX_SEQ {
            tiles(d, x, residual, config, out, direction)
        } else {
            segments(d, x, residual, config, out, direction)
        }
    }

    /// Whether rows can be read as 16-byte vectors: every row starting 16-byte aligned, whole
    /// groups of 8 coordinates.
    fn vector_ok(d: Dims, dtype: DType, addresses: &[u64]) -> bool {
        d.dim.is_multiple_of(COORDS_PER_WARP)
            && (d.dim * dtype.size_in_bytes()).is_multiple_of(16)
            && addresses.iter().all(|a| a.is_multiple_of(16))
    }

    /// Must match kernels/wavelet.cu (TILE_COORDS, TILE_THREADS, TILE_SHARED_BYTES).
    const TILE_COORDS: usize = 64;
    const TILE_THREADS: u32 = 256;
    const TILE_SHARED_BYTES: u32 = 108_544;

    /// The tile kernel: one block per (sequence, strip of 64 coordinates).
    fn tiles(
        d: Dims,
        x: &Tensor,
        residual: Option<&Tensor>,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let (x_address, out_address) = (x_buffer.address(), out.device_buffer()?.address());
        let residual_address = match residual {
            Some(r) => r.device_buffer()?.address(),
            None => 0,
        };
        let vector = vector_ok(d, x.dtype(), &[x_address, out_address, residual_address]) as i32;
        let blocks = grid_size(d.batch * d.dim.div_ceil(TILE_COORDS))?;
        let (seq, dim, available) = (
            int(d.seq),
            int(d.dim),
            (config.divisor == WaveletDivisor::Available) as i32,
        );
        let name = match (direction, residual.is_some()) {
            (Direction::Forward, false) => format!("wavelet_tiles_fwd_{}", suffix(x.dtype())),
            (Direction::Forward, true) => format!("wavelet_tiles_fwd_residual_{}", suffix(x.dtype())),
            (Direction::Backward, _) => format!("wavelet_tiles_bwd_{}", suffix(x.dtype())),
        };
        let function = backend.function("wavelet", &name)?;
        backend.allow_dynamic_shared(&function, TILE_SHARED_BYTES as usize)?;
        let table = table(config, &backend)?;
        let (windows, _) = addresses(&table, d.dim);
        let mut builder = backend.launch_builder(&function);
        builder.arg(&x_address);
        if residual.is_some() {
            builder.arg(&residual_address);
        }
        builder
            .arg(&out_address)
            .arg(&windows)
            .arg(&seq)
            .arg(&dim)
            .arg(&vector)
            .arg(&available);
        let launch = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: TILE_SHARED_BYTES,
        };
        // SAFETY: the tensors were validated to be (batch, seq, dim) of one dtype on this device,
        // seq is at most 2^30, the table holds `dim` windows, and the grid has one block per
        // (sequence, 64 coordinates), each writing only its own rows and coordinates.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    /// The segment kernel: one warp per (segment of rows, 8 coordinates).
    fn segments(
        d: Dims,
        x: &Tensor,
        residual: Option<&Tensor>,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let (x_address, out_address) = (x_buffer.address(), out.device_buffer()?.address());
        let residual_address = match residual {
            Some(r) => r.device_buffer()?.address(),
            None => 0,
        };
        let vector_ok = vector_ok(d, x.dtype(), &[x_address, out_address, residual_address]);
        let groups = d.dim.div_ceil(COORDS_PER_WARP);
        let tiles = groups.div_ceil(WINDOW_WARPS as usize);
        let segments = d.seq.div_ceil(segment_rows(x.dtype(), residual.is_some()));
        let blocks = grid_size(tiles * d.batch * segments)?;
        let (batch, seq, dim, vector_ok, available) = (
            int(d.batch),
            int(d.seq),
            int(d.dim),
            vector_ok as i32,
            (config.divisor == WaveletDivisor::Available) as i32,
        );
        let name = match (direction, residual.is_some()) {
            (Direction::Forward, false) => format!("wavelet_window_fwd_{}", suffix(x.dtype())),
            (Direction::Forward, true) => format!("wavelet_window_fwd_residual_{}", suffix(x.dtype())),
            (Direction::Backward, _) => format!("wavelet_window_bwd_{}", suffix(x.dtype())),
        };
        let function = backend.function("wavelet", &name)?;
        // The state stays locked until the launch is queued: the epoch and scratch are this
        // launch's alone.
        with_state(config, &backend, |state| {
            let (windows, _) = addresses(&state.table, d.dim);
            let scratch = scratch(state, &backend, d.batch * groups * segments)?;
            let mut builder = backend.launch_builder(&function);
            builder.arg(&x_address);
            if residual.is_some() {
                builder.arg(&residual_address);
            }
            builder
                .arg(&out_address)
                .arg(&windows)
                .arg(&batch)
                .arg(&seq)
                .arg(&dim)
                .arg(&vector_ok)
                .arg(&available)
                .arg(&scratch);
            let launch = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (WINDOW_WARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the tensors were validated to be (batch, seq, dim) of one dtype on this
            // device, the table holds `dim` windows, the scratch has a slot per (sequence, group
            // of 8, segment) and zeroed counters, and the grid has a block per (segment,
            // sequence, 16 coordinates).
            unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
            Ok(())
        })
    }

    pub(super) fn fir(
        d: Dims,
        x: &Tensor,
        taps: &Tensor,
        config: &WaveletConfig,
        out: &mut Tensor,
        direction: Direction,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let table = table(config, &backend)?;
        let (windows, offsets) = addresses(&table, d.dim);
        let (x_address, taps_address, out_address) = (
            x_buffer.address(),
            taps.device_buffer()?.address(),
            out.device_buffer()?.address(),
        );
        let (batch, seq, dim) = (int(d.batch), int(d.seq), int(d.dim));
        let total = d.batch * d.seq * d.dim;
        let blocks = total.div_ceil(FIR_THREADS as usize).min(backend.multiprocessors() * 64) as u32;
        let name = match direction {
            Direction::Forward => format!("wavelet_fir_fwd_{}", suffix(x.dtype())),
            Direction::Backward => format!("wavelet_fir_bwd_{}", suffix(x.dtype())),
        };
        let function = backend.function("wavelet", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&x_address)
            .arg(&taps_address)
            .arg(&out_address)
            .arg(&windows)
            .arg(&offsets)
            .arg(&batch)
            .arg(&seq)
            .arg(&dim);
        let launch = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (FIR_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes; the taps tensor holds `tap_count` f32 values laid out by the
        // offsets in the table; the kernel loops over exactly batch·seq·dim elements.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    pub(super) fn tap_gradient(
        d: Dims,
        d_out: &Tensor,
        x: &Tensor,
        config: &WaveletConfig,
        d_taps: &mut Tensor,
    ) -> Result<()> {
        let max_window = config.windows.iter().copied().max().unwrap_or(0);
        if max_window == 0 {
            return Ok(());
        }
        let d_out_buffer = d_out.device_buffer()?;
        let backend = d_out_buffer.backend().clone();
        let table = table(config, &backend)?;
        let (windows, offsets) = addresses(&table, d.dim);
        let (d_out_address, x_address, d_taps_address) = (
            d_out_buffer.address(),
            x.device_buffer()?.address(),
            d_taps.device_buffer()?.address(),
        );
        let (batch, seq, dim) = (int(d.batch), int(d.seq), int(d.dim));
        let name = format!("wavelet_tap_grad_{}", suffix(d_out.dtype()));
        let function = backend.function("wavelet", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&d_out_address)
            .arg(&x_address)
            .arg(&d_taps_address)
            .arg(&windows)
            .arg(&offsets)
            .arg(&batch)
            .arg(&seq)
            .arg(&dim);
        builder.arg(&max_window);
        let launch = LaunchConfig {
            grid_dim: (grid_size(d.dim.div_ceil(TAP_COORDS))?, max_window.min(MAX_GRID_Y), 1),
            block_dim: (TAP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes; blocks over (32 coordinates, tap indices below the largest
        // window), each writing only the taps of its coordinates that exist.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
