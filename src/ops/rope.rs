//! Rotary position embedding (RoPE), forward and backward, with one base for all heads or a base
//! per head (HARPE, ALGORITHMS.md §9), in the rotate-half (LLaMA) or interleaved (GPT-J) pairing.
//!
//! `x` is (..., heads, head_dim) with a position per token (every index before the heads):
//! `positions` has the shape of `x` without its last two dimensions, u32. Pair `i` of head `h`
//! at position `p` is rotated by the angle `p·θ_{h,i}`, `θ_{h,i} = b_h^(-2i/head_dim)`:
//! `(a, b) -> (a·cos − b·sin, b·cos + a·sin)`. The backward is the transposed rotation (by `−p·θ`).
//!
//! Positions are given, not implied, so that packed sequences (each starting at 0) and
//! LM-Infinite's fixed query position can be expressed. Angles are formed and reduced modulo 2π in
//! f64 before the f32 sine and cosine, so that positions up to 2^32 lose no precision; the
//! rotation itself is f32. Inputs and outputs are f32, bf16 or f16.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const OP: &str = "rope";

/// The largest head dimension the op accepts.
pub const MAX_HEAD_DIM: usize = 1024;

/// Which coordinates form a rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeConvention {
    /// `(i, i + head_dim/2)`: LLaMA and Hugging Face.
    RotateHalf,
    /// `(2i, 2i + 1)`: GPT-J.
    Interleaved,
}

/// The bases of HARPE's Table 2 (Llama-2-7B, 32 heads, `b_min = 1e6`, `b_max = 5e6`, stride 30k),
/// head 0 first.
pub const HARPE_TABLE2_BASES: [f64; 32] = [
    1.00e6, 1.15e6, 1.30e6, 1.45e6, 2.17e6, 2.20e6, 2.23e6, 2.47e6, 2.50e6, 2.65e6, 2.68e6, 2.71e6, 2.74e6, 2.80e6,
    2.83e6, 2.92e6, 3.01e6, 3.04e6, 3.10e6, 3.13e6, 3.16e6, 3.22e6, 3.43e6, 3.46e6, 3.61e6, 3.88e6, 4.09e6, 4.15e6,
    4.39e6, 4.45e6, 4.51e6, 4.54e6,
];

/// A rotary embedding: the head dimension, the pairing and the bases.
///
/// With `n` bases for a tensor of `heads` heads (`n` must divide `heads`), head `h` uses base
/// `h·n/heads`: one base for all heads, one per head, or one per group of heads (for GQA, give one
/// per key/value head and use the same configuration for queries and keys, so that query heads
/// sharing a key/value head share its base).
#[derive(Clone, Debug)]
pub struct RopeConfig {
    head_dim: usize,
    bases: Vec<f64>,
    convention: RopeConvention,
    #[cfg(feature = "cuda")]
    on_device: cuda::FrequencyCache,
}

impl PartialEq for RopeConfig {
    fn eq(&self, other: &Self) -> bool {
        self.head_dim == other.head_dim && self.bases == other.bases && self.convention == other.convention
    }
}

impl RopeConfig {
    /// A configuration for heads of `head_dim` (even, 2 to [`MAX_HEAD_DIM`]) with the given bases
    /// (at least one, each finite and above 1).
    pub fn new(head_dim: usize, bases: Vec<f64>, convention: RopeConvention) -> Result<RopeConfig> {
        const OP: &str = "RopeConfig::new";
        if head_dim < 2 || !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
            return Err(Error::invalid(
                OP,
                "head_dim",
                format!("an even number from 2 to {MAX_HEAD_DIM}"),
                head_dim,
            ));
        }
        if bases.is_empty() {
            return Err(Error::invalid(OP, "bases", "at least one base", "none"));
        }
        if let Some((h, b)) = bases.iter().enumerate().find(|(_, b)| !(b.is_finite() && **b > 1.0)) {
            return Err(Error::invalid(
                OP,
                "bases",
                "finite bases above 1",
                format!("{b} for head group {h}"),
            ));
        }
        Ok(RopeConfig {
            head_dim,
            bases,
            convention,
            #[cfg(feature = "cuda")]
            on_device: Default::default(),
        })
    }

    /// One base for every head.
    pub fn single(head_dim: usize, base: f64, convention: RopeConvention) -> Result<RopeConfig> {
        RopeConfig::new(head_dim, vec![base], convention)
    }

    /// HARPE's uniform assignment (§9.2, eq. 9): `n` bases from `b_min` to `b_max`, evenly spaced,
    /// ascending (`n = 1` gives `b_min`).
    pub fn uniform_bases(n: usize, b_min: f64, b_max: f64) -> Vec<f64> {
        (0..n)
            .map(|h| {
                if n == 1 {
                    b_min
                } else {
                    b_min + h as f64 * (b_max - b_min) / (n - 1) as f64
                }
            })
            .collect()
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn bases(&self) -> &[f64] {
        &self.bases
    }

    pub fn convention(&self) -> RopeConvention {
        self.convention
    }

    /// `θ_{g,i} = b_g^(-2i/head_dim)` for every base `g` and pair `i`, row-major, in f64.
    pub fn frequencies(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        self.bases
            .iter()
            .flat_map(|&b| (0..half).map(move |i| b.powf(-2.0 * i as f64 / self.head_dim as f64)))
            .collect()
    }

    /// The base index of head `h` of `heads`.
    pub(crate) fn group_of(&self, h: usize, heads: usize) -> usize {
        h * self.bases.len() / heads
    }

    /// Checks `x` against this configuration; returns (tokens, heads).
    pub(crate) fn check(&self, op: &'static str, arg: &'static str, x: &Tensor) -> Result<(usize, usize)> {
        x.expect_dtype(op, arg, &[DType::F32, DType::BF16, DType::F16])?;
        let rank = x.shape().len();
        if rank < 2 {
            return Err(Error::invalid(
                op,
                arg,
                "a tensor of shape (..., heads, head_dim)",
                format!("shape {:?}", x.shape()),
            ));
        }
        let (heads, head_dim) = (x.shape()[rank - 2], x.shape()[rank - 1]);
        if head_dim != self.head_dim {
            return Err(Error::invalid(
                op,
                arg,
                format!("last dimension head_dim = {}", self.head_dim),
                format!("shape {:?}", x.shape()),
            ));
        }
        if heads == 0 || !heads.is_multiple_of(self.bases.len()) {
            return Err(Error::invalid(
                op,
                arg,
                format!("a number of heads that is a multiple of the {} bases", self.bases.len()),
                format!("shape {:?}", x.shape()),
            ));
        }
        let tokens = x.shape()[..rank - 2].iter().product::<usize>();
        if tokens
            .checked_mul(heads * head_dim / 2)
            .is_none_or(|n| n > u32::MAX as usize)
        {
            return Err(Error::invalid(
                op,
                arg,
                "at most 2^32 rotated pairs",
                format!("shape {:?}", x.shape()),
            ));
        }
        Ok((tokens, heads))
    }
}

/// Checks the positions tensor: u32, one per token of `x`, on its device.
fn check_positions(op: &'static str, positions: &Tensor, x: &Tensor) -> Result<()> {
    positions.expect_dtype(op, "positions", &[DType::U32])?;
    let rank = x.shape().len();
    positions.expect_shape(op, "positions", &x.shape()[..rank - 2])?;
    x.device().expect_same(&positions.device(), op, "positions")
}

fn new_like(x: &Tensor) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => Tensor::zeros(x.shape(), x.dtype(), &Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => Tensor::uninit_cuda(x.shape(), x.dtype(), &backend),
    }
}

/// Rotates `x` by its tokens' positions: `R(p)·x` per head.
pub fn rope_forward(x: &Tensor, positions: &Tensor, config: &RopeConfig) -> Result<Tensor> {
    rotate(OP, "x", x, positions, config, false)
}

/// The gradient of [`rope_forward`]: `R(p)ᵀ·d_y` per head (the rotation is orthogonal).
pub fn rope_backward(d_y: &Tensor, positions: &Tensor, config: &RopeConfig) -> Result<Tensor> {
    rotate("rope_backward", "d_y", d_y, positions, config, true)
}

fn rotate(
    op: &'static str,
    arg: &'static str,
    x: &Tensor,
    positions: &Tensor,
    config: &RopeConfig,
    transpose: bool,
) -> Result<Tensor> {
    let (tokens, heads) = config.check(op, arg, x)?;
    check_positions(op, positions, x)?;
    let mut out = new_like(x)?;
    match x.device() {
        Device::Cpu => cpu::rotate(x, positions, config, tokens, heads, transpose, &mut out)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::rotate(x, positions, config, tokens, heads, transpose, &mut out)?,
    }
    Ok(out)
}

/// `(cos, sin)` of `p·θ` in f32: the angle in half-turns, reduced to [-1, 1] in f64 and rounded
/// to f32, as the CUDA kernel forms it before its `sincospif`.
#[inline]
pub(crate) fn cos_sin(position: f64, theta: f64) -> (f32, f32) {
    let half_turns = position * theta / std::f64::consts::PI;
    let reduced = (half_turns - 2.0 * (0.5 * half_turns).round()) as f32;
    let (s, c) = (reduced as f64 * std::f64::consts::PI).sin_cos();
    (c as f32, s as f32)
}

/// Index of the two elements of pair `i` within a head.
#[inline]
pub(crate) fn pair(convention: RopeConvention, head_dim: usize, i: usize) -> (usize, usize) {
    match convention {
        RopeConvention::RotateHalf => (i, i + head_dim / 2),
        RopeConvention::Interleaved => (2 * i, 2 * i + 1),
    }
}

/// Rotates one head's vector in place (f32), by `+angle` or, transposed, by `−angle`.
pub(crate) fn rotate_head(
    values: &mut [f32],
    position: f64,
    frequencies: &[f64],
    convention: RopeConvention,
    transpose: bool,
) {
    let head_dim = values.len();
    for (i, &theta) in frequencies.iter().enumerate() {
        let (c, s) = cos_sin(position, theta);
        let s = if transpose { -s } else { s };
        let (ia, ib) = pair(convention, head_dim, i);
        let (a, b) = (values[ia], values[ib]);
        values[ia] = a * c - b * s;
        values[ib] = b * c + a * s;
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    fn rotate_typed<T: Float>(
        x: &Tensor,
        positions: &Tensor,
        config: &RopeConfig,
        heads: usize,
        transpose: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        let x = x.host_slice::<T>()?;
        let positions = positions.host_slice::<u32>()?;
        let out = out.host_slice_mut::<T>()?;
        let d = config.head_dim;
        let frequencies = config.frequencies();
        out.par_chunks_mut(heads * d)
            .zip(x.par_chunks(heads * d))
            .zip(positions.par_iter())
            .for_each(|((out, x), &p)| {
                let mut head = vec![0.0f32; d];
                for h in 0..heads {
                    let g = config.group_of(h, heads);
                    for (v, &e) in head.iter_mut().zip(&x[h * d..(h + 1) * d]) {
                        *v = e.to_f32();
                    }
                    let theta = &frequencies[g * d / 2..(g + 1) * d / 2];
                    rotate_head(&mut head, p as f64, theta, config.convention, transpose);
                    for (o, &v) in out[h * d..(h + 1) * d].iter_mut().zip(&head) {
                        *o = T::from_f32(v);
                    }
                }
            });
        Ok(())
    }

    pub(super) fn rotate(
        x: &Tensor,
        positions: &Tensor,
        config: &RopeConfig,
        _tokens: usize,
        heads: usize,
        transpose: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        with_float_type!(x.dtype(), OP, "x", T => rotate_typed::<T>(x, positions, config, heads, transpose, out))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, DeviceBuffer, LaunchConfig, PushKernelArg};
    use std::sync::{Arc, Mutex};

    const THREADS: u32 = 256;

    /// A device table and the ordinal of its GPU.
    type OnDevice = (usize, Arc<DeviceBuffer>);

    /// The frequency table (f64, bases × head_dim/2) uploaded once per GPU.
    #[derive(Clone, Default)]
    pub(super) struct FrequencyCache(Arc<Mutex<Vec<OnDevice>>>);

    impl std::fmt::Debug for FrequencyCache {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FrequencyCache")
        }
    }

    fn table(config: &RopeConfig, backend: &Arc<CudaBackend>) -> Result<Arc<DeviceBuffer>> {
        let mut cache = config.on_device.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, table)) = cache.iter().find(|(ordinal, _)| *ordinal == backend.ordinal()) {
            return Ok(table.clone());
        }
        let table = Arc::new(backend.upload(bytemuck::cast_slice(&config.frequencies()))?);
        cache.push((backend.ordinal(), table.clone()));
        Ok(table)
    }

    pub(super) fn rotate(
        x: &Tensor,
        positions: &Tensor,
        config: &RopeConfig,
        tokens: usize,
        heads: usize,
        transpose: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let table = table(config, &backend)?;
        let (x_address, positions_address, out_address, table_address) = (
            x_buffer.address(),
            positions.device_buffer()?.address(),
            out.device_buffer()?.address(),
            table.address(),
        );
        // Validation bounds tokens·heads·head_dim/2 by 2^32.
        let pairs = (tokens * heads * config.head_dim / 2) as u64;
        if pairs == 0 {
            return Ok(());
        }
        let (heads, head_dim, groups) = (heads as u32, config.head_dim as u32, config.bases.len() as u32);
        let (interleaved, sign) = (
            (config.convention == RopeConvention::Interleaved) as u32,
            if transpose { -1.0f32 } else { 1.0f32 },
        );
        let blocks = pairs
            .div_ceil(THREADS as u64)
            .min(backend.multiprocessors() as u64 * 32) as u32;
        let name = format!("rope_{}", x.dtype().name());
        let function = backend.function("rope", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&x_address)
            .arg(&out_address)
            .arg(&positions_address)
            .arg(&table_address)
            .arg(&pairs)
            .arg(&heads)
            .arg(&head_dim)
            .arg(&groups)
            .arg(&interleaved)
            .arg(&sign);
        let launch = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x and out are (tokens, heads, head_dim) of one dtype on this device, positions
        // holds a u32 per token, the table holds groups × head_dim/2 f64 values, and the kernel
        // loops over exactly `pairs` pairs.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
