//! Attention for one decode step against a key/value cache, with the step's position read from
//! a tensor rather than from the call: on a GPU the kernels read it from device memory and their
//! grid does not depend on it, so that one launch, captured into a CUDA graph, serves every step.
//!
//! Layout (that of [`crate::model::KvCache`]): `q` is (heads, head_dim), one row per query head
//! with the batch folded into the heads; the cache's `keys` and `values` are (capacity,
//! heads_kv · head_dim), row `j` holding position `j` of every key head; query head `h` reads key
//! head `h / (heads / heads_kv)`. `position` (u32, its first element `p`) is the new query's
//! position: it sees the keys `0..=p` that its mask keeps (causal: all of them; a window from
//! `p − left`; Λ: the first `global` and the last `window`), with the scale and the f32 online
//! softmax of [`attention_forward`](super::attention_forward). RoPE inside and packed batches are
//! not served here.
//!
//! [`kv_append_into`] writes a step's new keys (or values) into row `p` of the cache, the same
//! way, and [`decode_positions_advance`] moves the positions on by one at the end of a step, so
//! that a replayed step needs no copy of them from the host.

use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ops::attention::{AttentionMask, AttentionOptions, MAX_HEAD_DIM};
use crate::tensor::Tensor;

const OP: &str = "attention_decode";
const OP_APPEND: &str = "kv_append";
const OP_ADVANCE: &str = "decode_positions_advance";

/// Validated geometry of one decode attention call.
struct Decode {
    heads: usize,
    heads_kv: usize,
    head_dim: usize,
    capacity: usize,
    scale: f32,
    mask: AttentionMask,
}

impl Decode {
    /// The visible keys of position `p` as two runs, `[0, first)` and `[second, p + 1)`.
    fn runs(&self, p: usize) -> (usize, usize) {
        let n = p + 1;
        match self.mask {
            AttentionMask::None | AttentionMask::Causal => (0, 0),
            AttentionMask::Window { left, .. } => (0, p.saturating_sub(left)),
            AttentionMask::Lambda { global, window } => {
                let first = global.min(n);
                (first, first.max((p + 1).saturating_sub(window)))
            }
        }
    }
}

fn check_position(op: &'static str, position: &Tensor, device: &Device) -> Result<()> {
    position.expect_dtype(op, "position", &[DType::U32])?;
    if position.numel() == 0 {
        return Err(Error::invalid(op, "position", "at least one element", "none"));
    }
    device.expect_same(&position.device(), op, "position")
}

fn check(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    position: &Tensor,
    options: &AttentionOptions,
    out: &Tensor,
) -> Result<Decode> {
    q.expect_rank(OP, "q", 2)?;
    q.expect_dtype(OP, "q", &[DType::F32, DType::BF16, DType::F16])?;
    let device = q.device();
    let (heads, head_dim) = (q.shape()[0], q.shape()[1]);
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid(
            OP,
            "q",
            format!("a head dimension that is a multiple of 8 up to {MAX_HEAD_DIM}"),
            head_dim,
        ));
    }
    if heads == 0 || heads > i32::MAX as usize {
        return Err(Error::invalid(OP, "q", "1 to 2^31 - 1 query heads", heads));
    }
    keys.expect_rank(OP, "keys", 2)?;
    keys.expect_dtype(OP, "keys", &[q.dtype()])?;
    device.expect_same(&keys.device(), OP, "keys")?;
    let (capacity, width) = (keys.shape()[0], keys.shape()[1]);
    let heads_kv = width / head_dim;
    if capacity == 0
        || capacity > i32::MAX as usize
        || !width.is_multiple_of(head_dim)
        || heads_kv == 0
        || !heads.is_multiple_of(heads_kv)
    {
        return Err(Error::invalid(
            OP,
            "keys",
            format!("(1 to 2^31 - 1 positions, heads_kv · {head_dim}) with heads_kv dividing the {heads} query heads"),
            format!("{:?}", keys.shape()),
        ));
    }
    values.expect_dtype(OP, "values", &[q.dtype()])?;
    values.expect_shape(OP, "values", keys.shape())?;
    device.expect_same(&values.device(), OP, "values")?;
    check_position(OP, position, &device)?;
    out.expect_dtype(OP, "out", &[q.dtype()])?;
    out.expect_shape(OP, "out", q.shape())?;
    device.expect_same(&out.device(), OP, "out")?;
    if options.varlen.is_some() || options.rope.is_some() {
        return Err(Error::Unsupported {
            op: OP,
            reason: "packed batches and RoPE inside attention are served by attention_forward only".into(),
        });
    }
    let limit = i32::MAX as usize;
    let within = match options.mask {
        AttentionMask::None | AttentionMask::Causal => true,
        AttentionMask::Window { left, .. } => left <= limit,
        AttentionMask::Lambda { global, window } => global <= limit && (1..=limit).contains(&window),
    };
    if !within {
        return Err(Error::invalid(
            OP,
            "mask",
            "window sizes and global counts below 2^31, a Λ window of at least 1",
            format!("{:?}", options.mask),
        ));
    }
    let scale = options.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::invalid(OP, "scale", "a finite number", scale));
    }
    if q.dtype() == DType::F32 && !matches!(device, Device::Cpu) {
        return Err(Error::invalid(OP, "q", "bf16 or f16 on CUDA", q.dtype()));
    }
    Ok(Decode {
        heads,
        heads_kv,
        head_dim,
        capacity,
        scale,
        mask: options.mask,
    })
}

/// One decode step of attention into `out` (q's shape and dtype): see the module documentation.
/// A position at or past the cache's capacity reads the keys of the last row it holds (the
/// kernels never read out of bounds); the cache's owner keeps positions below it.
pub fn attention_decode_into(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    position: &Tensor,
    options: &AttentionOptions,
    out: &mut Tensor,
) -> Result<()> {
    let problem = check(q, keys, values, position, options, out)?;
    match q.device() {
        Device::Cpu => {
            let p = (position.host_slice::<u32>()?[0] as usize).min(problem.capacity - 1);
            with_float_type!(q.dtype(), OP, "q", T => cpu::decode::<T>(&problem, q, keys, values, p, out))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::decode(&problem, q, keys, values, position, out),
    }
}

/// Writes `new` (1, width) into row `position[0]` of `store` (capacity, width), same dtype and
/// device; nothing when that row is past the capacity.
pub fn kv_append_into(new: &Tensor, store: &mut Tensor, position: &Tensor) -> Result<()> {
    store.expect_rank(OP_APPEND, "store", 2)?;
    store.expect_dtype(OP_APPEND, "store", &[DType::F32, DType::BF16, DType::F16])?;
    let device = store.device();
    let (capacity, width) = (store.shape()[0], store.shape()[1]);
    if capacity > i32::MAX as usize {
        return Err(Error::invalid(OP_APPEND, "store", "fewer than 2^31 rows", capacity));
    }
    new.expect_dtype(OP_APPEND, "new", &[store.dtype()])?;
    new.expect_shape(OP_APPEND, "new", &[1, width])?;
    device.expect_same(&new.device(), OP_APPEND, "new")?;
    check_position(OP_APPEND, position, &device)?;
    if store.dtype() == DType::F32 && !matches!(device, Device::Cpu) {
        return Err(Error::invalid(OP_APPEND, "store", "bf16 or f16 on CUDA", store.dtype()));
    }
    match device {
        Device::Cpu => {
            let p = position.host_slice::<u32>()?[0] as usize;
            if p < capacity {
                store.copy_rows_from(p, new, 0, 1)?;
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::append(new, store, position, capacity, width),
    }
}

/// Adds 1 to every element of `positions` (u32, at most 2^31 − 1 of them), in place.
pub fn decode_positions_advance(positions: &mut Tensor) -> Result<()> {
    positions.expect_dtype(OP_ADVANCE, "positions", &[DType::U32])?;
    let n = positions.numel();
    if n > i32::MAX as usize {
        return Err(Error::invalid(OP_ADVANCE, "positions", "fewer than 2^31 elements", n));
    }
    match positions.device() {
        Device::Cpu => {
            for p in positions.host_slice_mut::<u32>()? {
                *p = p.wrapping_add(1);
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::advance(positions, n),
    }
}

mod cpu {
    use super::*;

    pub(super) fn decode<T: Float>(
        problem: &Decode,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        p: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        let (q, k, v) = (q.host_slice::<T>()?, keys.host_slice::<T>()?, values.host_slice::<T>()?);
        let d = problem.head_dim;
        let row = problem.heads_kv * d;
        let group = problem.heads / problem.heads_kv;
        let scale_log2 = problem.scale * std::f32::consts::LOG2_E;
        let (first, second) = problem.runs(p);
        let visible: Vec<usize> = (0..first).chain(second..=p).collect();
        let mut result = vec![T::from_f32(0.0); problem.heads * d];
        let mut acc = vec![0.0f32; d];
        for head in 0..problem.heads {
            let kv_head = head / group;
            let query = &q[head * d..(head + 1) * d];
            let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
            acc.fill(0.0);
            for &j in &visible {
                let base = j * row + kv_head * d;
                let dot: f32 = query
                    .iter()
                    .zip(&k[base..base + d])
                    .map(|(a, b)| a.to_f32() * b.to_f32())
                    .sum();
                let s = dot * scale_log2;
                let m_new = m.max(s);
                let correction = (m - m_new).exp2();
                let weight = (s - m_new).exp2();
                l = l * correction + weight;
                for (a, x) in acc.iter_mut().zip(&v[base..base + d]) {
                    *a = *a * correction + weight * x.to_f32();
                }
                m = m_new;
            }
            for (o, a) in result[head * d..(head + 1) * d].iter_mut().zip(&acc) {
                *o = T::from_f32(if l > 0.0 { a / l } else { 0.0 });
            }
        }
        out.host_slice_mut::<T>()?.copy_from_slice(&result);
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    /// Threads of a decode block (kernels/attention_decode.cu's THREADS).
    const THREADS: u32 = 256;

    fn suffix(dtype: DType) -> &'static str {
        if dtype == DType::BF16 {
            "bf16"
        } else {
            "f16"
        }
    }

    pub(super) fn decode(
        problem: &Decode,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        position: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let buffer = q.device_buffer()?;
        let backend = buffer.backend().clone();
        let (mask_kind, left, global, window) = match problem.mask {
            AttentionMask::None => (0i32, 0i32, 0i32, 0i32),
            AttentionMask::Causal => (1, 0, 0, 0),
            AttentionMask::Window { left, .. } => (2, left as i32, 0, 0),
            AttentionMask::Lambda { global, window } => (3, 0, global as i32, window as i32),
        };
        let name = format!("attention_decode_{}", suffix(q.dtype()));
        let function = backend.function("attention_decode", &name)?;
        let (q_address, k_address, v_address) = (
            buffer.address(),
            keys.device_buffer()?.address(),
            values.device_buffer()?.address(),
        );
        let out_address = out.device_buffer()?.address();
        let position_address = position.device_buffer()?.address();
        let group = (problem.heads / problem.heads_kv) as i32;
        let head_dim = problem.head_dim as i32;
        let row = (problem.heads_kv * problem.head_dim) as i64;
        let capacity = problem.capacity as i32;
        let scale_log2 = problem.scale * std::f32::consts::LOG2_E;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&q_address)
            .arg(&k_address)
            .arg(&v_address)
            .arg(&out_address)
            .arg(&position_address)
            .arg(&group)
            .arg(&head_dim)
            .arg(&row)
            .arg(&capacity)
            .arg(&scale_log2)
            .arg(&mask_kind)
            .arg(&left)
            .arg(&global)
            .arg(&window);
        let config = LaunchConfig {
            grid_dim: (problem.heads as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes (q and out [heads, head_dim], keys and values [capacity, row]),
        // head_dim a multiple of 8 so that every 16-byte access is aligned within 256-byte
        // aligned allocations; the kernel clamps the position below the capacity.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    pub(super) fn advance(positions: &mut Tensor, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let buffer = positions.device_buffer()?;
        let backend = buffer.backend().clone();
        let function = backend.function("attention_decode", "decode_advance")?;
        let address = buffer.address();
        let count = n as i32;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&address).arg(&count);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 1024) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `positions` holds n u32 values; the kernel's grid-stride loop stays below n.
        unsafe { builder.launch(config) }.context("launching decode_advance")?;
        Ok(())
    }

    pub(super) fn append(
        new: &Tensor,
        store: &mut Tensor,
        position: &Tensor,
        capacity: usize,
        width: usize,
    ) -> Result<()> {
        let buffer = new.device_buffer()?;
        let backend = buffer.backend().clone();
        let name = format!("kv_append_{}", suffix(new.dtype()));
        let function = backend.function("attention_decode", &name)?;
        let (src, dst) = (buffer.address(), store.device_buffer()?.address());
        let position_address = position.device_buffer()?.address();
        let row = width as i64;
        let capacity = capacity as i32;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&src)
            .arg(&dst)
            .arg(&position_address)
            .arg(&row)
            .arg(&capacity);
        let blocks = width.div_ceil(THREADS as usize).clamp(1, 1024) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `new` holds `row` elements and `store` capacity × row; the kernel writes row
        // `position[0]` only when it lies below the capacity.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
