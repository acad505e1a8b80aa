//! Attention, forward and backward, flash-style: the score matrix is never materialised. Masks:
//! none, causal, sliding window and LM-Infinite's Λ shape (ALGORITHMS.md §4), with RoPE applied
//! inside (one base or per-head bases, §9) and LM-Infinite's distance ceiling; multi-, grouped- and
//! multi-query heads; query length different from key length; packed variable-length batches.
//!
//! Layout: `q` is (batch, seq_q, heads_q, head_dim), `k` and `v` are (batch, seq_k, heads_kv,
//! head_dim), `heads_q` a multiple of `heads_kv` (query head `h` reads key/value head
//! `h / (heads_q / heads_kv)`). With [`Varlen`] offsets the batch dimension goes: `q` is
//! (total_q, heads_q, head_dim) holding the sequences end to end, `k` and `v` likewise.
//!
//! Positions are aligned bottom-right: query `i` of a sequence with `seq_q` queries and `seq_k`
//! keys sits at position `p_i = i + seq_k − seq_q`, so the last query sees the last key. A key `j`
//! is visible from `p` when
//! - `AttentionMask::None`: always;
//! - `AttentionMask::Causal`: `j ≤ p`;
//! - `AttentionMask::Window`: `p − left ≤ j ≤ p + right`;
//! - `AttentionMask::Lambda`: `j ≤ p` and (`p − j < window` or `j < global`) (§4.2).
//!
//! `out_i = Σ_j softmax_j(scale·s_ij)·v_j` over visible keys, `s_ij = q_i·k_j`, with the softmax
//! statistics and all sums in f32. The forward also returns `lse_i = ln Σ_j exp(scale·s_ij)` (f32,
//! one per query row and head), which the backward uses to recompute the probabilities. A row that
//! sees no key has output 0 and `lse = −∞` (never NaN), and contributes no gradient.
//!
//! RoPE inside ([`AttentionRope`]): `q` and `k` are given un-rotated; query `i` is rotated to its
//! position `p_i`, key `j` to `j`, each rounded to the input dtype (as applying [`rope_forward`]
//! first would). The distance ceiling `D` implements the spec's general statement (§4.3,
//! [PROPOSAL]): the relative distance is `δ_ij = min(p_i − j, D)`. For pairs with `p_i − j > D`
//! the score is `(R(D)·q_i)·k_j` with the key un-rotated, exactly the LM-Infinite code's
//! "stationary" branch; with the default `D = window` under the Λ mask these are exactly the
//! global keys beyond the window, and the code's `D' = min(D, seq_k − 1)` changes nothing (no pair
//! is further apart than `seq_k − 1`). The backward routes each pair's gradient through its branch
//! (§4.4, two-branch form).
//!
//! The CPU implementation works in key tiles of 64 with an online softmax per query row and skips
//! tiles the mask hides entirely; its backward recomputes the probabilities from `lse` and sums
//! each gradient in a fixed order (deterministic). Inputs are f32, bf16 or f16 on the CPU, bf16 or
//! f16 on CUDA.
//!
//! On CUDA, RoPE is applied by the standalone op before the kernels (and its transpose after the
//! backward). With a ceiling that some pair exceeds, the forward runs the ceiling instantiation,
//! which visits the key tiles holding pairs beyond the ceiling (`R(D)·q` against the raw keys) and
//! those holding pairs within it (`R(p)·q` against `R(j)·k`) under one online softmax, each pair
//! in exactly one branch; the backward runs the dQ and dK/dV passes once per branch into f32
//! partial gradients, rotates them back (`R(p)ᵀ`, `R(D)ᵀ`, `R(j)ᵀ`) and rounds each sum once.
//!
//! [`rope_forward`]: crate::ops::rope_forward

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::rope::RopeConfig;
use crate::ops::support::new_output;
use crate::tensor::Tensor;

const OP: &str = "attention";
const OP_BWD: &str = "attention_backward";

/// The largest head dimension; every multiple of 8 up to it is supported.
pub const MAX_HEAD_DIM: usize = 256;

/// Window sizes, global counts, ceilings and token counts stay below this (kernels index in i32).
pub const MAX_EXTENT: usize = i32::MAX as usize;

/// Which keys a query sees (positions aligned bottom-right; see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionMask {
    /// Every key.
    #[default]
    None,
    /// Keys at or before the query's position.
    Causal,
    /// Keys from `left` before the query's position to `right` after it (`left = w − 1, right = 0`
    /// is a causal sliding window of `w` tokens).
    Window { left: usize, right: usize },
    /// LM-Infinite's Λ shape: causal, and either among the first `global` keys or within the
    /// `window` most recent ones (the query's own position included; `window ≥ 1`).
    Lambda { global: usize, window: usize },
}

/// Packed variable-length sequences: sequence `b` holds queries `cu_seqlens_q[b]..cu_seqlens_q[b+1]`
/// and keys `cu_seqlens_k[b]..cu_seqlens_k[b+1]`. Both start at 0, never decrease, end at the
/// total token count, and have one more entry than there are sequences.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Varlen {
    pub cu_seqlens_q: Vec<usize>,
    pub cu_seqlens_k: Vec<usize>,
}

/// RoPE applied inside attention, with LM-Infinite's distance ceiling when `distance_ceiling` is
/// set. The configuration's bases must divide `heads_kv` (query heads sharing a key/value head
/// share its base).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionRope {
    pub config: RopeConfig,
    pub distance_ceiling: Option<usize>,
}

/// Options of [`attention_forward`] and [`attention_backward`]; the default is unmasked dense
/// attention with scale `1/√head_dim`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    pub mask: AttentionMask,
    /// Softmax scale; `None` is `1/√head_dim`.
    pub scale: Option<f32>,
    pub varlen: Option<Varlen>,
    pub rope: Option<AttentionRope>,
}

/// Which CUDA kernels compute the forward and the backward. Every choice gives the same results up
/// to rounding, and the CPU ignores it. With [`AttentionKernel::Hopper`] the backward runs
/// kernels/attention_hopper_bwd.cu, which serves bf16 and f16, head dims 64 and 128, masks none
/// and causal, batches of equal lengths, no RoPE inside; any other backward is then an
/// [`Error::Unsupported`] that says why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// tessera's choice, which is the mma.sync kernels for now. It becomes the Hopper kernel on
    /// devices that load the sm_90a image, for the calls that kernel serves, once a GPU run has
    /// shown that kernel correct and faster there (benches/NOTES.md).
    #[default]
    Auto,
    /// The sm_80+ mma.sync kernels (kernels/attention.cu), for every call.
    MmaSync,
    /// The sm_90a kernel (kernels/attention_hopper.cu: TMA, mbarriers, wgmma), which serves bf16
    /// and f16, head dims 64 and 128, every mask, dense and packed batches, no RoPE inside (so no
    /// distance ceiling), on a device that loads the sm_90a image; a packed batch needs at least
    /// one key. Any other CUDA call is an [`Error::Unsupported`] that says why.
    Hopper,
}

impl AttentionKernel {
    fn code(self) -> u8 {
        match self {
            AttentionKernel::Auto => 0,
            AttentionKernel::MmaSync => 1,
            AttentionKernel::Hopper => 2,
        }
    }

    fn from_code(code: u8) -> AttentionKernel {
        match code {
            1 => AttentionKernel::MmaSync,
            2 => AttentionKernel::Hopper,
            _ => AttentionKernel::Auto,
        }
    }
}

static PROCESS_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

thread_local! {
    static THREAD_KERNEL: std::cell::Cell<Option<AttentionKernel>> = const { std::cell::Cell::new(None) };
}

/// Sets the attention kernels for the whole process (threads inside [`with_attention_kernel`] keep
/// theirs): the benchmark measures both kernels with it.
pub fn set_attention_kernel(kernel: AttentionKernel) {
    PROCESS_KERNEL.store(kernel.code(), std::sync::atomic::Ordering::Relaxed);
}

/// The attention kernels in force on this thread: the innermost [`with_attention_kernel`], else the
/// process-wide [`set_attention_kernel`] (by default [`AttentionKernel::Auto`]).
pub fn attention_kernel() -> AttentionKernel {
    THREAD_KERNEL
        .get()
        .unwrap_or_else(|| AttentionKernel::from_code(PROCESS_KERNEL.load(std::sync::atomic::Ordering::Relaxed)))
}

/// Runs `f` with `kernel` as this thread's attention kernels, and restores the previous choice after
/// it (also when `f` unwinds). Other threads are not affected, so that tests running in parallel
/// can force different kernels.
pub fn with_attention_kernel<R>(kernel: AttentionKernel, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<AttentionKernel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_KERNEL.set(self.0);
        }
    }
    let _restore = Restore(THREAD_KERNEL.replace(Some(kernel)));
    f()
}

/// The validated geometry of one call.
#[derive(Clone, Debug)]
pub(crate) struct Problem {
    /// Query and key offsets per sequence (batch + 1 entries).
    pub cu_q: Vec<usize>,
    pub cu_k: Vec<usize>,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub mask: AttentionMask,
    pub rope: Option<AttentionRope>,
}

impl Problem {
    pub fn batch(&self) -> usize {
        self.cu_q.len() - 1
    }

    pub fn seq_q(&self, b: usize) -> usize {
        self.cu_q[b + 1] - self.cu_q[b]
    }

    pub fn seq_k(&self, b: usize) -> usize {
        self.cu_k[b + 1] - self.cu_k[b]
    }

    pub fn total_q(&self) -> usize {
        self.cu_q[self.batch()]
    }

    pub fn total_k(&self) -> usize {
        self.cu_k[self.batch()]
    }

    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    pub fn ceiling(&self) -> Option<usize> {
        self.rope.as_ref().and_then(|r| r.distance_ceiling)
    }
}

/// Whether key `j` is visible from query position `p`.
#[inline]
pub(crate) fn visible(mask: AttentionMask, p: i64, j: i64) -> bool {
    match mask {
        AttentionMask::None => true,
        AttentionMask::Causal => j <= p,
        AttentionMask::Window { left, right } => j >= p - left as i64 && j <= p + right as i64,
        AttentionMask::Lambda { global, window } => j <= p && (p - j < window as i64 || j < global as i64),
    }
}

/// The key ranges (at most two, within `0..seq_k`) that any query position in `p_lo..=p_hi` may
/// see: everything outside them is hidden from the whole tile, which is skipped.
pub(crate) fn visible_ranges(mask: AttentionMask, p_lo: i64, p_hi: i64, seq_k: usize) -> [(usize, usize); 2] {
    let clamp = |lo: i64, hi: i64| {
        let (lo, hi) = (lo.clamp(0, seq_k as i64), hi.clamp(0, seq_k as i64));
        (lo as usize, hi.max(lo) as usize)
    };
    match mask {
        AttentionMask::None => [clamp(0, seq_k as i64), (0, 0)],
        AttentionMask::Causal => [clamp(0, p_hi + 1), (0, 0)],
        AttentionMask::Window { left, right } => [clamp(p_lo - left as i64, p_hi + right as i64 + 1), (0, 0)],
        AttentionMask::Lambda { global, window } => {
            let local = clamp(p_lo - window as i64 + 1, p_hi + 1);
            let global = clamp(0, (global as i64).min(p_hi + 1));
            if global.1 >= local.0 {
                // Overlapping or touching: one range.
                [(global.0.min(local.0), local.1.max(global.1)), (0, 0)]
            } else {
                [global, local]
            }
        }
    }
}

/// The query positions (inclusive bounds, possibly beyond the sequence) that may see some key in
/// `j_lo..=j_hi`: the backward's key tiles visit only these rows.
pub(crate) fn seeing_positions(mask: AttentionMask, j_lo: i64, j_hi: i64) -> (i64, i64) {
    match mask {
        AttentionMask::None => (i64::MIN, i64::MAX),
        AttentionMask::Causal => (j_lo, i64::MAX),
        AttentionMask::Window { left, right } => (j_lo - right as i64, j_hi + left as i64),
        AttentionMask::Lambda { global, window } => {
            if j_lo < global as i64 {
                (j_lo, i64::MAX)
            } else {
                (j_lo, j_hi + window as i64 - 1)
            }
        }
    }
}

fn bad_shape(op: &'static str, arg: &'static str, expected: impl std::fmt::Display, t: &Tensor) -> Error {
    Error::invalid(op, arg, expected, format!("shape {:?}", t.shape()))
}

/// Validates everything about the inputs of either direction; returns the geometry.
fn check_inputs(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<Problem> {
    let on_cuda = q.device().is_cuda();
    let dtypes: &[DType] = if on_cuda {
        &[DType::BF16, DType::F16]
    } else {
        &[DType::F32, DType::BF16, DType::F16]
    };
    q.expect_dtype(op, "q", dtypes)?;
    k.expect_dtype(op, "k", &[q.dtype()])?;
    v.expect_dtype(op, "v", &[q.dtype()])?;
    q.device().expect_same(&k.device(), op, "k")?;
    q.device().expect_same(&v.device(), op, "v")?;
    let rank = if options.varlen.is_some() { 3 } else { 4 };
    q.expect_rank(op, "q", rank)?;
    k.expect_rank(op, "k", rank)?;
    v.expect_rank(op, "v", rank)?;
    let (qs, ks) = (q.shape(), k.shape());
    let head_dim = qs[rank - 1];
    let (heads_q, heads_kv) = (qs[rank - 2], ks[rank - 2]);
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(bad_shape(
            op,
            "q",
            format!("a head dimension that is a multiple of 8 from 8 to {MAX_HEAD_DIM}"),
            q,
        ));
    }
    if ks[rank - 1] != head_dim {
        return Err(bad_shape(op, "k", format!("head dimension {head_dim}, as q's"), k));
    }
    if heads_kv == 0 || heads_q == 0 || !heads_q.is_multiple_of(heads_kv) {
        return Err(bad_shape(
            op,
            "q",
            format!("a number of heads that is a positive multiple of k's {heads_kv}"),
            q,
        ));
    }
    if options.varlen.is_none() && ks[0] != qs[0] {
        return Err(bad_shape(op, "k", format!("batch {} (as q's)", qs[0]), k));
    }
    v.expect_shape(op, "v", ks)?;
    let (cu_q, cu_k) = match &options.varlen {
        None => {
            let (batch, seq_q, seq_k) = (qs[0], qs[1], ks[1]);
            if batch == 0 || seq_q == 0 {
                return Err(bad_shape(op, "q", "batch and seq_q of at least 1", q));
            }
            if seq_k == 0 || ks[0] != batch {
                return Err(bad_shape(
                    op,
                    "k",
                    format!("batch {batch} (as q's) and seq_k of at least 1"),
                    k,
                ));
            }
            if batch.checked_mul(seq_q.max(seq_k)).is_none_or(|n| n > MAX_EXTENT) {
                return Err(bad_shape(op, "q", format!("at most {MAX_EXTENT} tokens"), q));
            }
            (
                (0..=batch).map(|b| b * seq_q).collect::<Vec<_>>(),
                (0..=batch).map(|b| b * seq_k).collect::<Vec<_>>(),
            )
        }
        Some(varlen) => {
            check_offsets(op, "cu_seqlens_q", &varlen.cu_seqlens_q, qs[0])?;
            check_offsets(op, "cu_seqlens_k", &varlen.cu_seqlens_k, ks[0])?;
            if varlen.cu_seqlens_k.len() != varlen.cu_seqlens_q.len() {
                return Err(Error::invalid(
                    op,
                    "cu_seqlens_k",
                    format!("{} offsets, as cu_seqlens_q", varlen.cu_seqlens_q.len()),
                    varlen.cu_seqlens_k.len(),
                ));
            }
            (varlen.cu_seqlens_q.clone(), varlen.cu_seqlens_k.clone())
        }
    };
    let scale = options.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(op, "scale", "a finite positive softmax scale", scale));
    }
    match options.mask {
        AttentionMask::Window { left, right } if left > MAX_EXTENT || right > MAX_EXTENT => {
            return Err(Error::invalid(
                op,
                "mask",
                format!("window sides of at most {MAX_EXTENT}"),
                format!("{:?}", options.mask),
            ));
        }
        AttentionMask::Lambda { global, window } if window == 0 || window > MAX_EXTENT || global > MAX_EXTENT => {
            return Err(Error::invalid(
                op,
                "mask",
                format!("a Λ window from 1 to {MAX_EXTENT} and at most {MAX_EXTENT} global tokens"),
                format!("{:?}", options.mask),
            ));
        }
        _ => {}
    }
    if let Some(rope) = &options.rope {
        if rope.config.head_dim() != head_dim || !heads_kv.is_multiple_of(rope.config.bases().len()) {
            return Err(Error::invalid(
                op,
                "rope",
                format!("head_dim {head_dim} and a number of bases dividing heads_kv = {heads_kv}"),
                format!(
                    "head_dim {} with {} bases",
                    rope.config.head_dim(),
                    rope.config.bases().len()
                ),
            ));
        }
        if rope.distance_ceiling.is_some_and(|d| d > MAX_EXTENT) {
            return Err(Error::invalid(
                op,
                "rope",
                format!("a distance ceiling of at most {MAX_EXTENT}"),
                format!("{:?}", rope.distance_ceiling),
            ));
        }
        if let Some(b) = (0..cu_q.len() - 1).find(|&b| cu_q[b + 1] - cu_q[b] > cu_k[b + 1] - cu_k[b]) {
            return Err(Error::invalid(
                op,
                "q",
                "no more queries than keys in any sequence when RoPE is applied (query positions start at seq_k − seq_q)",
                format!("sequence {b} with {} queries and {} keys", cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]),
            ));
        }
    }
    Ok(Problem {
        cu_q,
        cu_k,
        heads_q,
        heads_kv,
        head_dim,
        scale,
        mask: options.mask,
        rope: options.rope.clone(),
    })
}

fn check_offsets(op: &'static str, arg: &'static str, offsets: &[usize], total: usize) -> Result<()> {
    let ok = offsets.len() >= 2
        && offsets[0] == 0
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && offsets.last() == Some(&total)
        && total <= MAX_EXTENT;
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            arg,
            format!("offsets from 0, never decreasing, ending at the {total} packed tokens (at most {MAX_EXTENT})"),
            format!("{offsets:?}"),
        ))
    }
}

/// Shape of the log-sum-exp: q's without the head dimension.
fn lse_shape(q: &Tensor) -> Vec<usize> {
    q.shape()[..q.shape().len() - 1].to_vec()
}

/// Returns `(out, lse)`: `out` shaped and typed as `q`, `lse` f32 shaped as `q` without its last
/// dimension.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<(Tensor, Tensor)> {
    let problem = check_inputs(OP, q, k, v, options)?;
    let mut out = new_output(q.shape(), q.dtype(), &q.device())?;
    let mut lse = new_output(&lse_shape(q), DType::F32, &q.device())?;
    forward_checked(&problem, q, k, v, &mut out, &mut lse)?;
    Ok((out, lse))
}

/// [`attention_forward`] into existing tensors: `out` shaped and typed as `q`, `lse` f32 shaped as
/// `q` without its last dimension, both on `q`'s device. Every element of both is written.
pub fn attention_forward_into(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    let problem = check_inputs(OP, q, k, v, options)?;
    out.expect_dtype(OP, "out", &[q.dtype()])?;
    out.expect_shape(OP, "out", q.shape())?;
    q.device().expect_same(&out.device(), OP, "out")?;
    lse.expect_dtype(OP, "lse", &[DType::F32])?;
    lse.expect_shape(OP, "lse", &lse_shape(q))?;
    q.device().expect_same(&lse.device(), OP, "lse")?;
    forward_checked(&problem, q, k, v, out, lse)
}

fn forward_checked(
    problem: &Problem,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    match q.device() {
        Device::Cpu => cpu::forward(problem, q, k, v, out, lse),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(problem, q, k, v, out, lse),
    }
}

/// The gradients `(d_q, d_k, d_v)` of [`attention_forward`] given `d_out`, from the same inputs
/// and options and the forward's `out` and `lse`. Deterministic.
pub fn attention_backward(
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    options: &AttentionOptions,
) -> Result<(Tensor, Tensor, Tensor)> {
    let problem = check_backward(d_out, q, k, v, out, lse, options)?;
    let mut d_q = new_output(q.shape(), q.dtype(), &q.device())?;
    let mut d_k = new_output(k.shape(), k.dtype(), &k.device())?;
    let mut d_v = new_output(v.shape(), v.dtype(), &v.device())?;
    backward_checked(&problem, d_out, q, k, v, out, lse, &mut d_q, &mut d_k, &mut d_v)?;
    Ok((d_q, d_k, d_v))
}

/// [`attention_backward`] into existing gradients: `d_q` shaped and typed as `q`, `d_k` and `d_v`
/// as `k` and `v`, all on `q`'s device. Every element of the three is written.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_into(
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    options: &AttentionOptions,
    d_q: &mut Tensor,
    d_k: &mut Tensor,
    d_v: &mut Tensor,
) -> Result<()> {
    let problem = check_backward(d_out, q, k, v, out, lse, options)?;
    for (arg, grad, like) in [("d_q", &*d_q, q), ("d_k", &*d_k, k), ("d_v", &*d_v, v)] {
        grad.expect_dtype(OP_BWD, arg, &[like.dtype()])?;
        grad.expect_shape(OP_BWD, arg, like.shape())?;
        q.device().expect_same(&grad.device(), OP_BWD, arg)?;
    }
    backward_checked(&problem, d_out, q, k, v, out, lse, d_q, d_k, d_v)
}

/// The backward's checks beyond the forward's: `d_out` and `out` like `q`, `lse` f32 like `q`
/// without its last dimension.
fn check_backward(
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    options: &AttentionOptions,
) -> Result<Problem> {
    let problem = check_inputs(OP_BWD, q, k, v, options)?;
    for (arg, t) in [("d_out", d_out), ("out", out)] {
        t.expect_dtype(OP_BWD, arg, &[q.dtype()])?;
        t.expect_shape(OP_BWD, arg, q.shape())?;
        q.device().expect_same(&t.device(), OP_BWD, arg)?;
    }
    lse.expect_dtype(OP_BWD, "lse", &[DType::F32])?;
    lse.expect_shape(OP_BWD, "lse", &lse_shape(q))?;
    q.device().expect_same(&lse.device(), OP_BWD, "lse")?;
    Ok(problem)
}

#[allow(clippy::too_many_arguments)]
fn backward_checked(
    problem: &Problem,
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_q: &mut Tensor,
    d_k: &mut Tensor,
    d_v: &mut Tensor,
) -> Result<()> {
    match q.device() {
        Device::Cpu => cpu::backward(problem, d_out, q, k, v, out, lse, d_q, d_k, d_v),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(problem, d_out, q, k, v, out, lse, d_q, d_k, d_v),
    }
}

/// Position of query row `i` of sequence `b` (bottom-right alignment).
#[inline]
pub(crate) fn query_position(problem: &Problem, b: usize, i: usize) -> i64 {
    i as i64 + problem.seq_k(b) as i64 - problem.seq_q(b) as i64
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use crate::ops::rope::rotate_head;
    use rayon::prelude::*;

    /// Keys per tile, and query rows per task.
    const TILE: usize = 64;

    /// The inputs widened to f32 (RoPE applied and rounded to the input dtype), with the extra
    /// operands of the ceiling branch: `q_lim = R(D)·q` and the un-rotated keys.
    struct Operands {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        q_lim: Vec<f32>,
        k_raw: Vec<f32>,
    }

    fn widen<T: Float>(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.host_slice::<T>()?.iter().map(|x| x.to_f32()).collect())
    }

    /// Rotates every head of `x` ((tokens, heads, d) f32) by `position(token)`, rounding to `T`.
    fn rotate_all<T: Float>(
        x: &mut [f32],
        heads: usize,
        config: &RopeConfig,
        transpose: bool,
        round: bool,
        position: impl Fn(usize) -> f64 + Sync,
    ) {
        let d = config.head_dim();
        let frequencies = config.frequencies();
        x.par_chunks_mut(heads * d).enumerate().for_each(|(t, token)| {
            let p = position(t);
            for (h, head) in token.chunks_mut(d).enumerate() {
                let g = config.group_of(h, heads);
                rotate_head(
                    head,
                    p,
                    &frequencies[g * d / 2..(g + 1) * d / 2],
                    config.convention(),
                    transpose,
                );
                if round {
                    head.iter_mut().for_each(|x| *x = T::from_f32(*x).to_f32());
                }
            }
        });
    }

    /// Position of every packed query token, and the sequence of every token.
    fn token_positions(problem: &Problem) -> (Vec<f64>, Vec<f64>) {
        let mut q = vec![0.0; problem.total_q()];
        let mut k = vec![0.0; problem.total_k()];
        for b in 0..problem.batch() {
            for i in 0..problem.seq_q(b) {
                q[problem.cu_q[b] + i] = query_position(problem, b, i) as f64;
            }
            for j in 0..problem.seq_k(b) {
                k[problem.cu_k[b] + j] = j as f64;
            }
        }
        (q, k)
    }

    fn operands<T: Float>(problem: &Problem, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Operands> {
        let (mut qf, mut kf, vf) = (widen::<T>(q)?, widen::<T>(k)?, widen::<T>(v)?);
        let (mut q_lim, mut k_raw) = (Vec::new(), Vec::new());
        if let Some(rope) = &problem.rope {
            let (qp, kp) = token_positions(problem);
            if let Some(ceiling) = rope.distance_ceiling {
                q_lim = qf.clone();
                k_raw = kf.clone();
                rotate_all::<T>(&mut q_lim, problem.heads_q, &rope.config, false, true, |_| {
                    ceiling as f64
                });
            }
            rotate_all::<T>(&mut qf, problem.heads_q, &rope.config, false, true, |t| qp[t]);
            rotate_all::<T>(&mut kf, problem.heads_kv, &rope.config, false, true, |t| kp[t]);
        }
        Ok(Operands {
            q: qf,
            k: kf,
            v: vf,
            q_lim,
            k_raw,
        })
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Reads the operands of one (query row, key) pair through the right branch.
    struct Pairs<'a> {
        problem: &'a Problem,
        ops: &'a Operands,
        ceiling: Option<i64>,
    }

    impl Pairs<'_> {
        /// Row `row` (packed) of query head `h`, key row `key` (packed) of key head `g`, relative
        /// distance `distance`: the query and key vectors to multiply, and whether the pair goes
        /// through the ceiling branch.
        #[inline]
        fn operands(&self, row: usize, h: usize, key: usize, g: usize, distance: i64) -> (&[f32], &[f32], bool) {
            let d = self.problem.head_dim;
            let qa = (row * self.problem.heads_q + h) * d;
            let ka = (key * self.problem.heads_kv + g) * d;
            match self.ceiling {
                Some(c) if distance > c => (&self.ops.q_lim[qa..qa + d], &self.ops.k_raw[ka..ka + d], true),
                _ => (&self.ops.q[qa..qa + d], &self.ops.k[ka..ka + d], false),
            }
        }
    }

    /// One task: a tile of query rows of one head of one sequence.
    #[derive(Clone, Copy)]
    struct RowTile {
        b: usize,
        h: usize,
        first: usize,
        rows: usize,
    }

    fn row_tiles(problem: &Problem) -> Vec<RowTile> {
        let mut tiles = Vec::new();
        for b in 0..problem.batch() {
            for h in 0..problem.heads_q {
                for first in (0..problem.seq_q(b)).step_by(TILE) {
                    let rows = TILE.min(problem.seq_q(b) - first);
                    tiles.push(RowTile { b, h, first, rows });
                }
            }
        }
        tiles
    }

    /// The key tiles (start, end) that a tile of query positions `p_lo..=p_hi` must visit.
    fn key_tiles(problem: &Problem, b: usize, p_lo: i64, p_hi: i64) -> Vec<(usize, usize)> {
        let mut tiles = Vec::new();
        for (lo, hi) in visible_ranges(problem.mask, p_lo, p_hi, problem.seq_k(b)) {
            let mut start = lo;
            while start < hi {
                let end = (start + TILE).min(hi);
                tiles.push((start, end));
                start = end;
            }
        }
        tiles
    }

    /// Forward of one row tile: `(out, lse)` for its rows, f32.
    fn forward_tile(problem: &Problem, pairs: &Pairs, tile: RowTile) -> (Vec<f32>, Vec<f32>) {
        let d = problem.head_dim;
        let g = tile.h / problem.group();
        let (cq, ck) = (problem.cu_q[tile.b], problem.cu_k[tile.b]);
        let p_lo = query_position(problem, tile.b, tile.first);
        let keys = key_tiles(problem, tile.b, p_lo, p_lo + tile.rows as i64 - 1);
        let mut out = vec![0.0f32; tile.rows * d];
        let mut lse = vec![f32::NEG_INFINITY; tile.rows];
        let mut scores = vec![0.0f32; TILE];
        for (r, (out, lse)) in out.chunks_mut(d).zip(lse.iter_mut()).enumerate() {
            let p = p_lo + r as i64;
            let row = cq + tile.first + r;
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
            for &(start, end) in &keys {
                let mut tile_max = f32::NEG_INFINITY;
                for (j, s) in (start..end).zip(scores.iter_mut()) {
                    *s = if visible(problem.mask, p, j as i64) {
                        let (qv, kv, _) = pairs.operands(row, tile.h, ck + j, g, p - j as i64);
                        dot(qv, kv) * problem.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    tile_max = tile_max.max(*s);
                }
                if tile_max == f32::NEG_INFINITY {
                    continue;
                }
                let new_max = max.max(tile_max);
                let rescale = (max - new_max).exp();
                sum *= rescale;
                out.iter_mut().for_each(|o| *o *= rescale);
                for (j, &s) in (start..end).zip(scores.iter()) {
                    if s == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (s - new_max).exp();
                    sum += w;
                    let va = ((ck + j) * problem.heads_kv + g) * d;
                    for (o, &x) in out.iter_mut().zip(&pairs.ops.v[va..va + d]) {
                        *o += w * x;
                    }
                }
                max = new_max;
            }
            if sum > 0.0 {
                out.iter_mut().for_each(|o| *o /= sum);
                *lse = max + sum.ln();
            }
        }
        (out, lse)
    }

    fn forward_typed<T: Float>(
        problem: &Problem,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        let ops = operands::<T>(problem, q, k, v)?;
        let pairs = Pairs {
            problem,
            ops: &ops,
            ceiling: problem.ceiling().map(|c| c as i64),
        };
        let tiles = row_tiles(problem);
        let results: Vec<_> = tiles.par_iter().map(|&t| forward_tile(problem, &pairs, t)).collect();
        let (out, lse) = (out.host_slice_mut::<T>()?, lse.host_slice_mut::<f32>()?);
        let d = problem.head_dim;
        for (tile, (o, l)) in tiles.iter().zip(results) {
            for r in 0..tile.rows {
                let row = (problem.cu_q[tile.b] + tile.first + r) * problem.heads_q + tile.h;
                for (x, &y) in out[row * d..(row + 1) * d].iter_mut().zip(&o[r * d..(r + 1) * d]) {
                    *x = T::from_f32(y);
                }
                lse[row] = l[r];
            }
        }
        Ok(())
    }

    pub(super) fn forward(
        problem: &Problem,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        with_float_type!(q.dtype(), OP, "q", T => forward_typed::<T>(problem, q, k, v, out, lse))
    }

    /// The probability and score gradient of one visible pair: `(p, ds)` with `ds` already
    /// multiplied by the softmax scale.
    #[inline]
    fn pair_gradient(problem: &Problem, s: f32, lse: f32, dp: f32, delta: f32) -> (f32, f32) {
        let p = (s * problem.scale - lse).exp();
        (p, p * (dp - delta) * problem.scale)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_typed<T: Float>(
        problem: &Problem,
        d_out: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        d_q: &mut Tensor,
        d_k: &mut Tensor,
        d_v: &mut Tensor,
    ) -> Result<()> {
        let d = problem.head_dim;
        let (hq, hkv) = (problem.heads_q, problem.heads_kv);
        let ops = operands::<T>(problem, q, k, v)?;
        let ceiling = problem.ceiling().map(|c| c as i64);
        let pairs = Pairs {
            problem,
            ops: &ops,
            ceiling,
        };
        let d_o = widen::<T>(d_out)?;
        let o = widen::<T>(out)?;
        let lse = lse.host_slice::<f32>()?;
        // Δ_i = dO_i·O_i, the softmax backward's row term.
        let delta: Vec<f32> = d_o.chunks(d).zip(o.chunks(d)).map(|(a, b)| dot(a, b)).collect();

        // dQ: per row tile, over its key tiles, as the forward.
        let tiles = row_tiles(problem);
        let dq_tiles: Vec<(Vec<f32>, Vec<f32>)> = tiles
            .par_iter()
            .map(|tile| {
                let g = tile.h / problem.group();
                let (cq, ck) = (problem.cu_q[tile.b], problem.cu_k[tile.b]);
                let p_lo = query_position(problem, tile.b, tile.first);
                let keys = key_tiles(problem, tile.b, p_lo, p_lo + tile.rows as i64 - 1);
                let mut dq = vec![0.0f32; tile.rows * d];
                let mut dq_lim = vec![0.0f32; if ceiling.is_some() { tile.rows * d } else { 0 }];
                for r in 0..tile.rows {
                    let p = p_lo + r as i64;
                    let row = cq + tile.first + r;
                    let slot = row * hq + tile.h;
                    if lse[slot] == f32::NEG_INFINITY {
                        continue;
                    }
                    for &(start, end) in &keys {
                        for j in start..end {
                            if !visible(problem.mask, p, j as i64) {
                                continue;
                            }
                            let key = ck + j;
                            let (qv, kv, limited) = pairs.operands(row, tile.h, key, g, p - j as i64);
                            let va = (key * hkv + g) * d;
                            let dp = dot(&d_o[slot * d..(slot + 1) * d], &ops.v[va..va + d]);
                            let (_, ds) = pair_gradient(problem, dot(qv, kv), lse[slot], dp, delta[slot]);
                            let target = if limited { &mut dq_lim } else { &mut dq };
                            for (x, &y) in target[r * d..(r + 1) * d].iter_mut().zip(kv) {
                                *x += ds * y;
                            }
                        }
                    }
                }
                (dq, dq_lim)
            })
            .collect();

        // dK and dV: per key tile of one key/value head, over the query rows of every query head
        // of its group that can see it.
        let mut key_tasks = Vec::new();
        for b in 0..problem.batch() {
            for g in 0..hkv {
                for first in (0..problem.seq_k(b)).step_by(TILE) {
                    key_tasks.push((b, g, first, TILE.min(problem.seq_k(b) - first)));
                }
            }
        }
        let dkv_tiles: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = key_tasks
            .par_iter()
            .map(|&(b, g, first, count)| {
                let (cq, ck) = (problem.cu_q[b], problem.cu_k[b]);
                let mut dk = vec![0.0f32; count * d];
                let mut dk_raw = vec![0.0f32; if ceiling.is_some() { count * d } else { 0 }];
                let mut dv = vec![0.0f32; count * d];
                let (p_lo, p_hi) = seeing_positions(problem.mask, first as i64, (first + count) as i64 - 1);
                let shift = problem.seq_k(b) as i64 - problem.seq_q(b) as i64;
                let rows = (p_lo.saturating_sub(shift).max(0) as usize)
                    ..(p_hi
                        .saturating_sub(shift)
                        .saturating_add(1)
                        .clamp(0, problem.seq_q(b) as i64) as usize);
                for h in g * problem.group()..(g + 1) * problem.group() {
                    for i in rows.clone() {
                        let p = query_position(problem, b, i);
                        let row = cq + i;
                        let slot = row * hq + h;
                        if lse[slot] == f32::NEG_INFINITY {
                            continue;
                        }
                        let d_oi = &d_o[slot * d..(slot + 1) * d];
                        for c in 0..count {
                            let j = first + c;
                            if !visible(problem.mask, p, j as i64) {
                                continue;
                            }
                            let key = ck + j;
                            let (qv, kv, limited) = pairs.operands(row, h, key, g, p - j as i64);
                            let va = (key * hkv + g) * d;
                            let dp = dot(d_oi, &ops.v[va..va + d]);
                            let (prob, ds) = pair_gradient(problem, dot(qv, kv), lse[slot], dp, delta[slot]);
                            for (x, &y) in dv[c * d..(c + 1) * d].iter_mut().zip(d_oi) {
                                *x += prob * y;
                            }
                            let target = if limited { &mut dk_raw } else { &mut dk };
                            for (x, &y) in target[c * d..(c + 1) * d].iter_mut().zip(qv) {
                                *x += ds * y;
                            }
                        }
                    }
                }
                (dk, dk_raw, dv)
            })
            .collect();

        // Gather, then route the RoPE branches back through their rotations.
        let mut dq = vec![0.0f32; problem.total_q() * hq * d];
        let mut dq_lim = vec![0.0f32; if ceiling.is_some() { dq.len() } else { 0 }];
        for (tile, (t, t_lim)) in tiles.iter().zip(dq_tiles) {
            for r in 0..tile.rows {
                let at = ((problem.cu_q[tile.b] + tile.first + r) * hq + tile.h) * d;
                dq[at..at + d].copy_from_slice(&t[r * d..(r + 1) * d]);
                if !t_lim.is_empty() {
                    dq_lim[at..at + d].copy_from_slice(&t_lim[r * d..(r + 1) * d]);
                }
            }
        }
        let mut dk = vec![0.0f32; problem.total_k() * hkv * d];
        let mut dk_raw = vec![0.0f32; if ceiling.is_some() { dk.len() } else { 0 }];
        let mut dv = vec![0.0f32; dk.len()];
        for (&(b, g, first, count), (t_k, t_raw, t_v)) in key_tasks.iter().zip(dkv_tiles) {
            for c in 0..count {
                let at = ((problem.cu_k[b] + first + c) * hkv + g) * d;
                dk[at..at + d].copy_from_slice(&t_k[c * d..(c + 1) * d]);
                dv[at..at + d].copy_from_slice(&t_v[c * d..(c + 1) * d]);
                if !t_raw.is_empty() {
                    dk_raw[at..at + d].copy_from_slice(&t_raw[c * d..(c + 1) * d]);
                }
            }
        }
        if let Some(rope) = &problem.rope {
            let (qp, kp) = token_positions(problem);
            rotate_all::<T>(&mut dq, hq, &rope.config, true, false, |t| qp[t]);
            rotate_all::<T>(&mut dk, hkv, &rope.config, true, false, |t| kp[t]);
            if let Some(c) = rope.distance_ceiling {
                rotate_all::<T>(&mut dq_lim, hq, &rope.config, true, false, |_| c as f64);
                dq.iter_mut().zip(&dq_lim).for_each(|(x, y)| *x += y);
                dk.iter_mut().zip(&dk_raw).for_each(|(x, y)| *x += y);
            }
        }
        let store = |dst: &mut Tensor, src: &[f32]| -> Result<()> {
            for (x, &y) in dst.host_slice_mut::<T>()?.iter_mut().zip(src) {
                *x = T::from_f32(y);
            }
            Ok(())
        };
        store(d_q, &dq)?;
        store(d_k, &dk)?;
        store(d_v, &dv)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        problem: &Problem,
        d_out: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        d_q: &mut Tensor,
        d_k: &mut Tensor,
        d_v: &mut Tensor,
    ) -> Result<()> {
        with_float_type!(q.dtype(), OP_BWD, "q", T => backward_typed::<T>(problem, d_out, q, k, v, out, lse, d_q, d_k, d_v))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::tensor_map::{self, Element, Swizzle, TensorMap, Tiled};
    use crate::cuda::{CudaBackend, CudaContextExt, DeviceBuffer, LaunchConfig, PushKernelArg};
    use crate::ops::rope::{rope_backward, rope_forward};
    use std::sync::Arc;

    /// Must match kernels/attention.cu: threads per CTA, rows of a CTA's own tile, query rows per
    /// streamed tile of the dK/dV pass.
    const THREADS: u32 = 128;
    const ROWS: usize = 64;
    const DKV_QUERY_TILE: usize = 32;
    /// CUDA's grid y and z limit.
    const MAX_GRID_YZ: usize = 65535;
    /// The pairs a backward pass of the ceiling kernels sees (`Branch` in kernels/attention.cu):
    /// within the distance ceiling, or beyond it.
    const BRANCH_ROT: i32 = 1;
    const BRANCH_LIM: i32 = 2;

    /// Layout shared with `AttentionParams` in kernels/attention.cu.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct AttentionParams {
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
        d_out: u64,
        delta: u64,
        d_q: u64,
        d_k: u64,
        d_v: u64,
        cu_q: u64,
        cu_k: u64,
        batch: i32,
        seq_q: i32,
        seq_k: i32,
        heads_q: i32,
        heads_kv: i32,
        head_dim: i32,
        scale: f32,
        scale_log2: f32,
        mask_kind: i32,
        left: i32,
        right: i32,
        global: i32,
        window: i32,
        padding: i32,
        ceiling: i32,
        branch: i32,
        q_lim: u64,
        k_raw: u64,
    }

    // SAFETY: a plain #[repr(C)] struct of scalars, laid out as the kernel declares it.
    unsafe impl cudarc::driver::DeviceRepr for AttentionParams {}

    /// The padded head dimension of the instantiation that serves `head_dim`, and its key tile.
    fn padded(head_dim: usize) -> (usize, usize) {
        match head_dim {
            0..=64 => (64, 64),
            65..=128 => (128, 64),
            _ => (256, 32),
        }
    }

    /// Everything one call's launches share: the geometry as the kernels read it, and the device
    /// copies of the offsets, which live (and are freed in stream order) with it.
    struct Launch {
        backend: Arc<CudaBackend>,
        params: AttentionParams,
        _offsets: Option<(DeviceBuffer, DeviceBuffer)>,
        max_q: usize,
        max_k: usize,
        batch: usize,
        suffix: String,
    }

    fn address(t: &Tensor) -> Result<u64> {
        Ok(t.device_buffer()?.address())
    }

    fn setup(problem: &Problem, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Launch> {
        let backend = q.device_buffer()?.backend().clone();
        let batch = problem.batch();
        if batch > MAX_GRID_YZ || problem.heads_q > MAX_GRID_YZ {
            return Err(Error::invalid(
                OP,
                "q",
                format!("at most {MAX_GRID_YZ} sequences and heads on CUDA"),
                format!("{batch} sequences of {} heads", problem.heads_q),
            ));
        }
        let (mask_kind, left, right, global, window) = match problem.mask {
            AttentionMask::None => (0, 0, 0, 0, 0),
            AttentionMask::Causal => (1, 0, 0, 0, 0),
            AttentionMask::Window { left, right } => (2, left, right, 0, 0),
            AttentionMask::Lambda { global, window } => (3, 0, 0, global, window),
        };
        // Sequences of equal lengths are found by `b · seq` in the kernels; others need offsets.
        let uniform = (0..batch).all(|b| problem.seq_q(b) == problem.seq_q(0) && problem.seq_k(b) == problem.seq_k(0));
        let offsets = if !uniform {
            // Validation bounds every offset by MAX_EXTENT = i32::MAX.
            let to_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
            Some((
                backend.upload(bytemuck::cast_slice(&to_i32(&problem.cu_q)))?,
                backend.upload(bytemuck::cast_slice(&to_i32(&problem.cu_k)))?,
            ))
        } else {
            None
        };
        let (cu_q, cu_k) = match &offsets {
            Some((q, k)) => (q.address(), k.address()),
            None => (0, 0),
        };
        let max_q = (0..batch).map(|b| problem.seq_q(b)).max().unwrap_or(0);
        let max_k = (0..batch).map(|b| problem.seq_k(b)).max().unwrap_or(0);
        let (dp, _) = padded(problem.head_dim);
        let params = AttentionParams {
            q: address(q)?,
            k: address(k)?,
            v: address(v)?,
            cu_q,
            cu_k,
            batch: batch as i32,
            seq_q: problem.seq_q(0) as i32,
            seq_k: problem.seq_k(0) as i32,
            heads_q: problem.heads_q as i32,
            heads_kv: problem.heads_kv as i32,
            head_dim: problem.head_dim as i32,
            scale: problem.scale,
            scale_log2: problem.scale * std::f32::consts::LOG2_E,
            mask_kind,
            left: left as i32,
            right: right as i32,
            global: global as i32,
            window: window as i32,
            ..Default::default()
        };
        Ok(Launch {
            backend,
            params,
            _offsets: offsets,
            max_q,
            max_k,
            batch,
            suffix: format!("{}_d{dp}", q.dtype().name()),
        })
    }

    impl Launch {
        /// Launches `name` over (tiles of `rows`, heads, sequences) with `shared` bytes of dynamic
        /// shared memory.
        fn run(&self, name: &str, rows: usize, heads: usize, shared: usize) -> Result<()> {
            let tiles = rows.div_ceil(ROWS);
            if tiles == 0 {
                return Ok(());
            }
            let function = self.backend.function("attention", name)?;
            self.backend.allow_shared_memory(&function, shared)?;
            let mut builder = self.backend.launch_builder(&function);
            builder.arg(&self.params);
            let launch = LaunchConfig {
                grid_dim: (tiles as u32, heads as u32, self.batch as u32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            // SAFETY: the parameters point at validated tensors of the shapes the kernel reads
            // (rows of heads × head_dim elements, offsets within them), the offsets (when given)
            // are on this device and alive until the launch is queued, and every CTA exits early
            // when its tile lies past its sequence.
            unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
            Ok(())
        }

        /// Bytes of one shared-memory row (padded head dimension + 8 elements of 2 bytes) and the
        /// key tile of the instantiation.
        fn tile_bytes(&self, head_dim: usize) -> (usize, usize) {
            let (dp, bn) = padded(head_dim);
            (2 * (dp + 8), bn)
        }
    }

    /// Query and key positions (bottom-right aligned, per sequence) as u32 tensors for RoPE.
    fn positions(problem: &Problem, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let device = q.device();
        let mut qp = Vec::with_capacity(problem.total_q());
        let mut kp = Vec::with_capacity(problem.total_k());
        for b in 0..problem.batch() {
            // Validation ensures seq_q ≤ seq_k when RoPE is applied: positions are non-negative.
            qp.extend((0..problem.seq_q(b)).map(|i| query_position(problem, b, i) as u32));
            kp.extend((0..problem.seq_k(b)).map(|j| j as u32));
        }
        Ok((
            Tensor::from_vec(qp, &token_shape(q), &device)?,
            Tensor::from_vec(kp, &token_shape(k), &device)?,
        ))
    }

    /// The shape of `t` without its heads and head dimension: one entry per token.
    fn token_shape(t: &Tensor) -> Vec<usize> {
        t.shape()[..t.shape().len() - 2].to_vec()
    }

    /// The distance ceiling when some pair lies beyond it (`p − j` reaches `seq_k − 1` at most);
    /// otherwise it changes nothing and the plain kernels run.
    fn active_ceiling(problem: &Problem) -> Option<usize> {
        let max_k = (0..problem.batch()).map(|b| problem.seq_k(b)).max().unwrap_or(0);
        problem.ceiling().filter(|&d| d + 1 < max_k)
    }

    /// The operands of RoPE inside: the positions, `R(p)·q` and `R(j)·k`, and with a ceiling `D`,
    /// the ceiling's positions (every query at `D`) and `R(D)·q`, all rounded to the input dtype.
    struct Rotated {
        q_positions: Tensor,
        k_positions: Tensor,
        q_rot: Tensor,
        k_rot: Tensor,
        limited: Option<(usize, Tensor, Tensor)>,
    }

    fn rotated(problem: &Problem, rope: &AttentionRope, q: &Tensor, k: &Tensor) -> Result<Rotated> {
        let (q_positions, k_positions) = positions(problem, q, k)?;
        let q_rot = rope_forward(q, &q_positions, &rope.config)?;
        let k_rot = rope_forward(k, &k_positions, &rope.config)?;
        let limited = match active_ceiling(problem) {
            Some(ceiling) => {
                // Validation bounds the ceiling by MAX_EXTENT = i32::MAX: it fits a u32 position.
                let at_ceiling = vec![ceiling as u32; problem.total_q()];
                let positions = Tensor::from_vec(at_ceiling, &token_shape(q), &q.device())?;
                let q_lim = rope_forward(q, &positions, &rope.config)?;
                Some((ceiling, positions, q_lim))
            }
            None => None,
        };
        Ok(Rotated {
            q_positions,
            k_positions,
            q_rot,
            k_rot,
            limited,
        })
    }

    /// The forward kernel on `q` and `k` as given (rotated when RoPE is inside); with `limited`
    /// `(D, q_lim, k_raw)`, the ceiling's kernel.
    fn forward_kernels(
        problem: &Problem,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        limited: Option<(usize, &Tensor, &Tensor)>,
        out: &Tensor,
        lse: &Tensor,
    ) -> Result<()> {
        let mut launch = setup(problem, q, k, v)?;
        launch.params.out = address(out)?;
        launch.params.lse = address(lse)?;
        let (row_bytes, bn) = launch.tile_bytes(problem.head_dim);
        let (kind, q_rows) = match limited {
            None => ("", ROWS),
            Some((ceiling, q_lim, k_raw)) => {
                launch.params.q_lim = address(q_lim)?;
                launch.params.k_raw = address(k_raw)?;
                launch.params.ceiling = ceiling as i32;
                // The query tile is held twice: rotated to its positions and to the ceiling.
                ("ceiling_", 2 * ROWS)
            }
        };
        let shared = (q_rows + 4 * bn) * row_bytes;
        launch.run(
            &format!("attention_fwd_{kind}{}", launch.suffix),
            launch.max_q,
            problem.heads_q,
            shared,
        )
    }

    pub(super) fn forward(
        problem: &Problem,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        if attention_kernel() == AttentionKernel::Hopper {
            return hopper::forward(problem, q, k, v, out, lse);
        }
        match &problem.rope {
            None => forward_kernels(problem, q, k, v, None, out, lse),
            Some(rope) => {
                let r = rotated(problem, rope, q, k)?;
                let limited = r.limited.as_ref().map(|(ceiling, _, q_lim)| (*ceiling, q_lim, k));
                forward_kernels(problem, &r.q_rot, &r.k_rot, v, limited, out, lse)
            }
        }
    }

    /// Δ = rowsum(dO ∘ O) for every (token, head) row, f32, with the backward's shared parameters
    /// set in `launch`.
    /// The f32 bytes of Δ: one per (token, head) row.
    fn delta_bytes(problem: &Problem) -> usize {
        problem.total_q() * problem.heads_q * 4
    }

    /// Δ into `delta`, [`delta_bytes`] of device memory.
    fn delta_kernel(
        launch: &mut Launch,
        problem: &Problem,
        d_out: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        delta: u64,
    ) -> Result<()> {
        let rows = problem.total_q() * problem.heads_q;
        launch.params.out = address(out)?;
        launch.params.d_out = address(d_out)?;
        launch.params.lse = address(lse)?;
        launch.params.delta = delta;

        // One warp per (token, head) row.
        let name = format!("attention_bwd_delta_{}", out.dtype().name());
        let function = launch.backend.function("attention", &name)?;
        let mut builder = launch.backend.launch_builder(&function);
        let rows_arg = rows as i64;
        builder.arg(&launch.params).arg(&rows_arg);
        let blocks = (rows * 32).div_ceil(THREADS as usize);
        if blocks > 0 {
            let config = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `out` and `d_out` hold `rows` rows of head_dim elements and `delta` holds
            // `rows` floats; warps past the last row exit.
            unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        }
        Ok(())
    }

    /// The dQ pass and the dK/dV pass into the gradients `launch.params` points at; `kind` names
    /// the plain kernels ("") or the ceiling's ("ceiling_", one branch per call).
    fn gradient_kernels(launch: &Launch, problem: &Problem, kind: &str) -> Result<()> {
        let (row_bytes, bn) = launch.tile_bytes(problem.head_dim);
        let dq_shared = (2 * ROWS + 4 * bn) * row_bytes;
        launch.run(
            &format!("attention_bwd_dq_{kind}{}", launch.suffix),
            launch.max_q,
            problem.heads_q,
            dq_shared,
        )?;
        let dkv_shared = (2 * ROWS + 4 * DKV_QUERY_TILE) * row_bytes + 4 * 4 * DKV_QUERY_TILE;
        let (dp, _) = padded(problem.head_dim);
        if dp == 256 {
            for part in ["dv", "dk"] {
                let name = format!("attention_bwd_dkv_{kind}{part}_{}", launch.suffix);
                launch.run(&name, launch.max_k, problem.heads_kv, dkv_shared)?;
            }
        } else {
            let name = format!("attention_bwd_dkv_{kind}{}", launch.suffix);
            launch.run(&name, launch.max_k, problem.heads_kv, dkv_shared)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_kernels(
        problem: &Problem,
        d_out: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        d_q: &Tensor,
        d_k: &Tensor,
        d_v: &Tensor,
    ) -> Result<()> {
        let mut launch = setup(problem, q, k, v)?;
        let backend = launch.backend.clone();
        // Δ lives in a scratch buffer kept from call to call: no allocation per backward.
        backend.with_scratch("attention_delta", delta_bytes(problem), &[], |delta| {
            delta_kernel(&mut launch, problem, d_out, out, lse, delta)?;
            launch.params.d_q = address(d_q)?;
            launch.params.d_k = address(d_k)?;
            launch.params.d_v = address(d_v)?;
            gradient_kernels(&launch, problem, "")
        })
    }

    /// `out = a + b` (f32 partial gradients) rounded once to `out`'s dtype.
    fn sum_into(backend: &Arc<CudaBackend>, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
        // Every gradient holds rows of head_dim elements, a multiple of 8.
        let quads = out.numel() / 4;
        if quads == 0 {
            return Ok(());
        }
        let name = format!("attention_ceiling_sum_{}", out.dtype().name());
        let function = backend.function("attention", &name)?;
        let mut builder = backend.launch_builder(&function);
        let (pa, pb, po, n) = (address(a)?, address(b)?, address(out)?, quads as i64);
        builder.arg(&pa).arg(&pb).arg(&po).arg(&n);
        let config = LaunchConfig {
            grid_dim: (quads.div_ceil(THREADS as usize).min(8192) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `a` and `b` are f32 tensors of `out`'s element count, 4·quads, and the kernel's
        // grid-stride loop stays below `quads`.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    /// The backward with the distance ceiling (§4.4, two-branch form): one pass of the gradient
    /// kernels over the pairs within the ceiling (on `R(p)·q`, `R(j)·k`) and one over those beyond
    /// it (on `R(D)·q` and the raw keys), each into f32 partials; the query partials rotate back by
    /// `R(p)ᵀ` and `R(D)ᵀ`, the rotated keys' by `R(j)ᵀ`, and each gradient is their sum rounded
    /// once.
    #[allow(clippy::too_many_arguments)]
    fn backward_ceiling(
        problem: &Problem,
        rope: &AttentionRope,
        r: &Rotated,
        (ceiling, at_ceiling, q_lim): (usize, &Tensor, &Tensor),
        d_out: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        grads: (&Tensor, &Tensor, &Tensor),
    ) -> Result<()> {
        let mut launch = setup(problem, &r.q_rot, &r.k_rot, v)?;
        let backend = launch.backend.clone();
        backend.with_scratch("attention_delta", delta_bytes(problem), &[], |delta| {
            delta_kernel(&mut launch, problem, d_out, out, lse, delta)?;
            launch.params.ceiling = ceiling as i32;
            let partial = |t: &Tensor| Tensor::uninit_cuda(t.shape(), DType::F32, &launch.backend);
            let (dq_rot, dq_lim) = (partial(&r.q_rot)?, partial(&r.q_rot)?);
            let (dk_rot, dk_raw) = (partial(k)?, partial(k)?);
            let (dv_rot, dv_lim) = (partial(v)?, partial(v)?);
            for (branch, q, k, d_q, d_k, d_v) in [
                (BRANCH_ROT, &r.q_rot, &r.k_rot, &dq_rot, &dk_rot, &dv_rot),
                (BRANCH_LIM, q_lim, k, &dq_lim, &dk_raw, &dv_lim),
            ] {
                launch.params.branch = branch;
                launch.params.q = address(q)?;
                launch.params.k = address(k)?;
                launch.params.d_q = address(d_q)?;
                launch.params.d_k = address(d_k)?;
                launch.params.d_v = address(d_v)?;
                gradient_kernels(&launch, problem, "ceiling_")?;
            }
            let dq_rot = rope_backward(&dq_rot, &r.q_positions, &rope.config)?;
            let dq_lim = rope_backward(&dq_lim, at_ceiling, &rope.config)?;
            let dk_rot = rope_backward(&dk_rot, &r.k_positions, &rope.config)?;
            let (d_q, d_k, d_v) = grads;
            sum_into(&launch.backend, &dq_rot, &dq_lim, d_q)?;
            sum_into(&launch.backend, &dk_rot, &dk_raw, d_k)?;
            sum_into(&launch.backend, &dv_rot, &dv_lim, d_v)?;
            // The partials are freed in stream order, after the kernels that read them.
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        problem: &Problem,
        d_out: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        d_q: &mut Tensor,
        d_k: &mut Tensor,
        d_v: &mut Tensor,
    ) -> Result<()> {
        if attention_kernel() == AttentionKernel::Hopper {
            return hopper_bwd::backward(problem, d_out, q, k, v, out, lse, d_q, d_k, d_v);
        }
        match &problem.rope {
            None => backward_kernels(problem, d_out, q, k, v, out, lse, d_q, d_k, d_v),
            Some(rope) => {
                let r = rotated(problem, rope, q, k)?;
                if let Some((ceiling, at_ceiling, q_lim)) = &r.limited {
                    let limited = (*ceiling, at_ceiling, q_lim);
                    return backward_ceiling(problem, rope, &r, limited, d_out, k, v, out, lse, (d_q, d_k, d_v));
                }
                // The kernels see the rotated inputs; their query and key gradients are with
                // respect to those, and rotate back by the transpose.
                backward_kernels(problem, d_out, &r.q_rot, &r.k_rot, v, out, lse, d_q, d_k, d_v)?;
                *d_q = rope_backward(d_q, &r.q_positions, &rope.config)?;
                *d_k = rope_backward(d_k, &r.k_positions, &rope.config)?;
                Ok(())
            }
        }
    }

    /// The columns of one 128-byte swizzled block of a 16-bit row: the inner extent of every
    /// TMA box of kernels/attention_hopper.cu and attention_hopper_bwd.cu.
    const HOPPER_BLOCK_COLUMNS: u32 = 64;

    /// Why neither sm_90a attention module can serve this call (the image, dtype, head dim,
    /// RoPE and grid limits they share), or `None`.
    fn hopper_obstacle(problem: &Problem, q: &Tensor, backend: &CudaBackend) -> Result<Option<String>> {
        let image = backend.kernel_image()?;
        if image != crate::cuda::kernels::ImageKind::Sm90a {
            return Ok(Some(format!(
                "{} loads the {}, not the sm_90a image",
                backend.name(),
                image.name()
            )));
        }
        if !matches!(q.dtype(), DType::BF16 | DType::F16) {
            return Ok(Some(format!("dtype {} (bf16 and f16 only)", q.dtype().name())));
        }
        if !matches!(problem.head_dim, 64 | 128) {
            return Ok(Some(format!("head dim {} (64 and 128 only)", problem.head_dim)));
        }
        if problem.rope.is_some() {
            return Ok(Some("RoPE inside attention".into()));
        }
        if problem.batch() > MAX_GRID_YZ || problem.heads_q > MAX_GRID_YZ {
            return Ok(Some(format!("more than {MAX_GRID_YZ} sequences or heads")));
        }
        Ok(None)
    }

    /// The geometry of the 4-d map (head_dim, heads, seq, batch) of a (batch, seq, heads,
    /// head_dim) tensor of 16-bit elements, read in boxes of (64, 1, rows, 1) with the 128-byte
    /// swizzle that the kernels' wgmma descriptors expect.
    fn token_geometry(
        element: Element,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        rows: usize,
    ) -> ([u64; 4], [u64; 3], [u32; 4]) {
        let row = (head_dim as u64) * element.bytes();
        let dims = [head_dim as u64, heads as u64, seq as u64, batch as u64];
        let strides = [row, heads as u64 * row, (seq * heads) as u64 * row];
        (dims, strides, [HOPPER_BLOCK_COLUMNS, 1, rows as u32, 1])
    }

    /// The tensor map of `t` (`arg` of `op`) as [`token_geometry`] describes it.
    fn token_map(
        op: &'static str,
        t: &Tensor,
        arg: &'static str,
        batch: usize,
        seq: usize,
        heads: usize,
        rows: usize,
    ) -> Result<TensorMap> {
        let element = if t.dtype() == DType::BF16 {
            Element::BF16
        } else {
            Element::F16
        };
        let head_dim = t.shape()[t.shape().len() - 1];
        let (dims, strides, boxes) = token_geometry(element, batch, seq, heads, head_dim, rows);
        let geometry = Tiled {
            element,
            dims: &dims,
            strides: &strides,
            boxes: &boxes,
            swizzle: Swizzle::Bytes128,
        };
        tensor_map::encode(op, arg, address(t)?, &geometry)
    }

    /// The sm_90a forward of kernels/attention_hopper.cu.
    mod hopper {
        use super::*;

        /// Must match kernels/attention_hopper.cu: threads per CTA, query rows per CTA, keys per
        /// tile, and the pipeline depth per head dim.
        const THREADS: u32 = 384;
        pub(super) const ROWS: usize = 128;
        pub(super) const KEYS: usize = 128;

        fn stages(head_dim: usize) -> usize {
            if head_dim == 64 {
                4
            } else {
                3
            }
        }

        /// Dynamic shared memory: Q, the ring of K and V stages, and room to align the tiles to
        /// 1024 bytes.
        pub(super) fn shared_bytes(head_dim: usize) -> usize {
            ROWS * head_dim * 2 + stages(head_dim) * 2 * KEYS * head_dim * 2 + 1024
        }

        /// Layout shared with `HopperParams` in kernels/attention_hopper.cu.
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct HopperParams {
            out: u64,
            lse: u64,
            cu_q: u64,
            cu_k: u64,
            seq_q: i32,
            seq_k: i32,
            heads_q: i32,
            heads_kv: i32,
            scale_log2: f32,
            mask_kind: i32,
            left: i32,
            right: i32,
            global: i32,
            window: i32,
        }

        // SAFETY: a plain #[repr(C)] struct of scalars, laid out as the kernel declares it.
        unsafe impl cudarc::driver::DeviceRepr for HopperParams {}

        /// Why the kernel cannot serve this call, or `None` when it can.
        fn obstacle(problem: &Problem, q: &Tensor, backend: &CudaBackend) -> Result<Option<String>> {
            if let Some(reason) = hopper_obstacle(problem, q, backend)? {
                return Ok(Some(reason));
            }
            // The kernel indexes tokens in i32, a tile past the last one included; TMA cannot
            // describe a tensor without rows.
            let limit = MAX_EXTENT - KEYS.max(ROWS);
            if problem.total_q() > limit || problem.total_k() > limit {
                return Ok(Some(format!("more than {limit} tokens")));
            }
            if problem.total_k() == 0 && problem.total_q() > 0 {
                return Ok(Some("a packed batch without keys".into()));
            }
            Ok(None)
        }

        pub(super) fn forward(
            problem: &Problem,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            out: &mut Tensor,
            lse: &mut Tensor,
        ) -> Result<()> {
            let backend = q.device_buffer()?.backend().clone();
            if let Some(reason) = obstacle(problem, q, &backend)? {
                return Err(Error::Unsupported {
                    op: OP,
                    reason: format!("the Hopper attention kernel was asked for, and it does not serve {reason}"),
                });
            }
            if problem.total_q() == 0 {
                return Ok(());
            }
            let (batch, d) = (problem.batch(), problem.head_dim);
            // Sequences of equal lengths are dense 4-d maps, one sequence per batch coordinate,
            // whose out-of-bounds rows TMA zero-fills; others are one packed sequence of all
            // tokens to TMA, and the kernel finds each sequence by its offsets.
            let uniform =
                (0..batch).all(|b| problem.seq_q(b) == problem.seq_q(0) && problem.seq_k(b) == problem.seq_k(0));
            let (map_batch, map_q_rows, map_k_rows) = if uniform {
                (batch, problem.seq_q(0), problem.seq_k(0))
            } else {
                (1, problem.total_q(), problem.total_k())
            };
            let map_q = token_map(OP, q, "q", map_batch, map_q_rows, problem.heads_q, ROWS)?;
            let map_k = token_map(OP, k, "k", map_batch, map_k_rows, problem.heads_kv, KEYS)?;
            let map_v = token_map(OP, v, "v", map_batch, map_k_rows, problem.heads_kv, KEYS)?;
            // Validation and `obstacle` bound every offset by MAX_EXTENT = i32::MAX.
            let offsets = if uniform {
                None
            } else {
                let to_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
                Some((
                    backend.upload(bytemuck::cast_slice(&to_i32(&problem.cu_q)))?,
                    backend.upload(bytemuck::cast_slice(&to_i32(&problem.cu_k)))?,
                ))
            };
            let (cu_q, cu_k) = match &offsets {
                Some((q, k)) => (q.address(), k.address()),
                None => (0, 0),
            };
            let (mask_kind, left, right, global, window) = match problem.mask {
                AttentionMask::None => (0, 0, 0, 0, 0),
                AttentionMask::Causal => (1, 0, 0, 0, 0),
                AttentionMask::Window { left, right } => (2, left, right, 0, 0),
                AttentionMask::Lambda { global, window } => (3, 0, 0, global, window),
            };
            let max_q = (0..batch).map(|b| problem.seq_q(b)).max().unwrap_or(0);
            let params = HopperParams {
                out: address(out)?,
                lse: address(lse)?,
                cu_q,
                cu_k,
                seq_q: problem.seq_q(0) as i32,
                seq_k: problem.seq_k(0) as i32,
                heads_q: problem.heads_q as i32,
                heads_kv: problem.heads_kv as i32,
                scale_log2: problem.scale * std::f32::consts::LOG2_E,
                // Validation bounds the window sides and the global count by MAX_EXTENT.
                mask_kind,
                left: left as i32,
                right: right as i32,
                global: global as i32,
                window: window as i32,
            };
            let name = format!("attention_fwd_sm90_{}_d{d}", q.dtype().name());
            let function = backend.function("attention_hopper", &name)?;
            let shared = shared_bytes(d);
            backend.allow_shared_memory(&function, shared)?;
            let mut builder = backend.launch_builder(&function);
            builder.arg(&map_q).arg(&map_k).arg(&map_v).arg(&params);
            let launch = LaunchConfig {
                grid_dim: (max_q.div_ceil(ROWS) as u32, problem.heads_q as u32, batch as u32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            // SAFETY: the tensor maps describe the validated q, k and v exactly (batch · seq rows
            // of heads × head_dim elements, head_dim 64 or 128), so TMA reads only inside them;
            // `out` and `lse` hold total_q · heads_q rows; the offsets (when given) are on this
            // device and alive until the launch is queued; CTAs whose query tile lies past their
            // sequence exit, and the kernel stores only the rows of each sequence.
            unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
            // The offsets are freed in stream order, after the kernel that reads them.
            drop(offsets);
            Ok(())
        }
    }

    /// The sm_90a backward of kernels/attention_hopper_bwd.cu: a prep kernel (the log-sum-exp in
    /// base 2 and Δ per padded query row), the dK/dV kernel per key tile and the dQ kernel per
    /// query tile.
    mod hopper_bwd {
        use super::*;

        /// Must match kernels/attention_hopper_bwd.cu: threads per CTA of the gradient kernels and
        /// of the prep kernel, rows of every shared-memory tile (and of every TMA box), rows of a
        /// CTA's resident operand, and the pipeline depth per head dim.
        const THREADS: u32 = 384;
        const PREP_THREADS: u32 = 256;
        /// The prep kernel's grid cap: more rows than its warps are walked grid-stride.
        const PREP_BLOCKS: usize = 1 << 20;
        pub(super) const TILE: usize = 64;
        pub(super) const ROW_TILE: usize = 128;

        fn stages(head_dim: usize) -> usize {
            if head_dim == 64 {
                4
            } else {
                3
            }
        }

        /// Dynamic shared memory of the dK/dV and dQ kernels: two resident 128-row operands, the
        /// ring of stages of two 64-row tiles, and room to align the tiles to 1024 bytes.
        pub(super) fn shared_bytes(head_dim: usize) -> usize {
            2 * ROW_TILE * head_dim * 2 + stages(head_dim) * 2 * TILE * head_dim * 2 + 1024
        }

        /// Layout shared with `HopperBwdParams` in kernels/attention_hopper_bwd.cu.
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct HopperBwdParams {
            out: u64,
            d_out: u64,
            lse: u64,
            lse2: u64,
            delta: u64,
            d_q: u64,
            d_k: u64,
            d_v: u64,
            batch: i32,
            seq_q: i32,
            seq_k: i32,
            heads_q: i32,
            heads_kv: i32,
            padded_q: i32,
            scale: f32,
            scale_log2: f32,
            causal: i32,
        }

        // SAFETY: a plain #[repr(C)] struct of scalars, laid out as the kernel declares it.
        unsafe impl cudarc::driver::DeviceRepr for HopperBwdParams {}

        /// Why the backward kernels cannot serve this call, or `None` when they can.
        fn obstacle(problem: &Problem, q: &Tensor, backend: &CudaBackend) -> Result<Option<String>> {
            if let Some(reason) = hopper_obstacle(problem, q, backend)? {
                return Ok(Some(reason));
            }
            if !matches!(problem.mask, AttentionMask::None | AttentionMask::Causal) {
                return Ok(Some(format!("mask {:?} (none and causal only)", problem.mask)));
            }
            let batch = problem.batch();
            if (0..batch).any(|b| problem.seq_q(b) != problem.seq_q(0) || problem.seq_k(b) != problem.seq_k(0)) {
                return Ok(Some("sequences of different lengths".into()));
            }
            // A packed batch of equal lengths may have none: TMA cannot describe a tensor without
            // rows, and a grid cannot be empty.
            if problem.seq_q(0) == 0 || problem.seq_k(0) == 0 {
                return Ok(Some("sequences without queries or keys".into()));
            }
            // The kernels index keys and query rows in i32, a tile past the last one included.
            let limit = MAX_EXTENT - ROW_TILE;
            if problem.seq_q(0) > limit || problem.seq_k(0) > limit {
                return Ok(Some(format!("sequences longer than {limit}")));
            }
            Ok(None)
        }

        #[allow(clippy::too_many_arguments)]
        pub(super) fn backward(
            problem: &Problem,
            d_out: &Tensor,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            out: &Tensor,
            lse: &Tensor,
            d_q: &Tensor,
            d_k: &Tensor,
            d_v: &Tensor,
        ) -> Result<()> {
            let backend = q.device_buffer()?.backend().clone();
            if let Some(reason) = obstacle(problem, q, &backend)? {
                return Err(Error::Unsupported {
                    op: OP_BWD,
                    reason: format!(
                        "the Hopper attention kernel was asked for, and its backward does not serve {reason}"
                    ),
                });
            }
            let (batch, seq_q, seq_k, d) = (problem.batch(), problem.seq_q(0), problem.seq_k(0), problem.head_dim);
            let padded_q = seq_q.div_ceil(TILE) * TILE;
            let rows = batch * problem.heads_q * padded_q;
            let lse2 = Tensor::uninit_cuda(&[rows], DType::F32, &backend)?;
            let delta = Tensor::uninit_cuda(&[rows], DType::F32, &backend)?;
            let params = HopperBwdParams {
                out: address(out)?,
                d_out: address(d_out)?,
                lse: address(lse)?,
                lse2: address(&lse2)?,
                delta: address(&delta)?,
                d_q: address(d_q)?,
                d_k: address(d_k)?,
                d_v: address(d_v)?,
                batch: batch as i32,
                seq_q: seq_q as i32,
                seq_k: seq_k as i32,
                heads_q: problem.heads_q as i32,
                heads_kv: problem.heads_kv as i32,
                padded_q: padded_q as i32,
                scale: problem.scale,
                scale_log2: problem.scale * std::f32::consts::LOG2_E,
                causal: i32::from(problem.mask == AttentionMask::Causal),
            };
            let suffix = format!("{}_d{d}", q.dtype().name());

            // One warp per padded row, grid-stride beyond 2²⁰ blocks.
            let name = format!("attention_bwd_prep_sm90_{suffix}");
            let function = backend.function("attention_hopper_bwd", &name)?;
            let mut builder = backend.launch_builder(&function);
            builder.arg(&params);
            let config = LaunchConfig {
                grid_dim: (
                    (rows * 32).div_ceil(PREP_THREADS as usize).min(PREP_BLOCKS) as u32,
                    1,
                    1,
                ),
                block_dim: (PREP_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `out` and `d_out` hold batch · seq_q · heads_q rows of head_dim elements,
            // `lse` one float per such row, `lse2` and `delta` `rows` floats; the kernel's
            // grid-stride loop stays below `rows`.
            unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;

            let map_q = token_map(OP_BWD, q, "q", batch, seq_q, problem.heads_q, TILE)?;
            let map_k = token_map(OP_BWD, k, "k", batch, seq_k, problem.heads_kv, TILE)?;
            let map_v = token_map(OP_BWD, v, "v", batch, seq_k, problem.heads_kv, TILE)?;
            let map_do = token_map(OP_BWD, d_out, "d_out", batch, seq_q, problem.heads_q, TILE)?;
            let shared = shared_bytes(d);
            for (kind, tiles, heads) in [
                ("dkv", seq_k.div_ceil(ROW_TILE), problem.heads_kv),
                ("dq", seq_q.div_ceil(ROW_TILE), problem.heads_q),
            ] {
                let name = format!("attention_bwd_{kind}_sm90_{suffix}");
                let function = backend.function("attention_hopper_bwd", &name)?;
                backend.allow_shared_memory(&function, shared)?;
                let mut builder = backend.launch_builder(&function);
                builder.arg(&map_q).arg(&map_k).arg(&map_v).arg(&map_do).arg(&params);
                let launch = LaunchConfig {
                    grid_dim: (tiles as u32, heads as u32, batch as u32),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: shared as u32,
                };
                // SAFETY: the tensor maps describe the validated q, k, v and d_out exactly (dense
                // batches of equal lengths, head_dim 64 or 128); d_q, d_k and d_v have q's, k's
                // and v's shapes, and the kernels store only rows below seq_q and seq_k; `lse2`
                // and `delta` hold padded_q rows per (sequence, query head), and the dK/dV kernel
                // reads 64 of them from a multiple of 64 below seq_q.
                unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
            }
            // `lse2` and `delta` are freed in stream order, after the kernels that read them.
            drop((lse2, delta));
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// What one CTA may have: 227 KiB, the kernels' static shared memory included (mbarriers,
        /// and the backward's log-sum-exp and Δ rows per stage: at most 80 and 2128 bytes,
        /// ptxas's report).
        const SHARED_LIMIT: usize = 227 * 1024;

        /// Each Hopper kernel's mbarriers expect rows · d · 2 bytes per tile (Q_BYTES and
        /// KV_BYTES of the forward, TILE_BYTES of the backward): d / 64 boxes of its maps must
        /// deliver exactly that whatever the sequence's length (TMA writes whole boxes); every map
        /// must be one TMA accepts, shortest and longest sequences included; shared memory must
        /// fit.
        #[test]
        fn hopper_maps_deliver_what_the_barriers_expect() {
            type Shared = fn(usize) -> usize;
            let kernels: [(&str, &[usize], usize, Shared, usize); 2] = [
                (
                    "forward",
                    &[hopper::ROWS, hopper::KEYS],
                    MAX_EXTENT - hopper::KEYS,
                    hopper::shared_bytes,
                    80,
                ),
                (
                    "backward",
                    &[hopper_bwd::TILE],
                    MAX_EXTENT - hopper_bwd::ROW_TILE,
                    hopper_bwd::shared_bytes,
                    2128,
                ),
            ];
            for (kernel, tile_rows, longest, shared, static_bytes) in kernels {
                for d in [64, 128] {
                    for (batch, seq, heads) in [(1, 1, 1), (3, 1023, 16), (1, longest, 1)] {
                        for (&rows, element) in tile_rows.iter().flat_map(|r| [(r, Element::BF16), (r, Element::F16)]) {
                            let (dims, strides, boxes) = token_geometry(element, batch, seq, heads, d, rows);
                            let geometry = Tiled {
                                element,
                                dims: &dims,
                                strides: &strides,
                                boxes: &boxes,
                                swizzle: Swizzle::Bytes128,
                            };
                            assert_eq!(geometry.check(), Ok(()), "{kernel} d{d} seq {seq}");
                            assert_eq!(geometry.box_bytes() * (d as u64 / 64), (rows * d * 2) as u64);
                        }
                    }
                    assert!(
                        shared(d) + static_bytes <= SHARED_LIMIT,
                        "{kernel} d{d}: {} bytes",
                        shared(d)
                    );
                }
            }
        }
    }
}
