//! Attention, forward and backward, on caller tensors: masks (none, causal, sliding window,
//! LM-Infinite's Λ), grouped-query heads, packed variable-length batches and RoPE applied inside.

use crate::handle::{self, TesseraTensor};
use crate::status::{guard, require, FfiError, FfiResult, TesseraStatus};
use crate::wavelet::expect_output;
use tessera_core::ops::{self, AttentionMask, AttentionOptions, AttentionRope, RopeConfig, RopeConvention, Varlen};
use tessera_core::DType;

/// Which keys a query sees (`int32_t mask` in `TesseraAttentionOptions`). Positions are aligned
/// bottom-right: query `i` of `seq_q` sits at `p = i + seq_k - seq_q`.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraAttentionMask {
    /// Every key.
    None = 0,
    /// Keys `j <= p`.
    Causal = 1,
    /// Keys `p - window_left <= j <= p + window_right` (`window_left = w - 1`, `window_right = 0`
    /// is a causal sliding window of `w` tokens).
    Window = 2,
    /// Causal, and either among the first `lambda_global` keys or within the `lambda_window`
    /// most recent ones (LM-Infinite).
    Lambda = 3,
}

/// Pairs of dimensions RoPE rotates (`int32_t rope_convention`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraRopeConvention {
    /// `(i, i + head_dim/2)`: Llama and Hugging Face.
    RotateHalf = 0,
    /// `(2i, 2i + 1)`: GPT-J.
    Interleaved = 1,
}

/// Options of `tessera_attention_forward` and `_backward`; `tessera_attention_options_default()`
/// is unmasked attention with scale `1/sqrt(head_dim)`, no varlen, no RoPE. The arrays it points
/// to are read during the call only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraAttentionOptions {
    /// A `TesseraAttentionMask` code.
    pub mask: i32,
    /// `TESSERA_ATTENTION_MASK_WINDOW`: keys this far before and after the query's position.
    pub window_left: usize,
    pub window_right: usize,
    /// `TESSERA_ATTENTION_MASK_LAMBDA`: the always-visible first keys and the local window (>= 1).
    pub lambda_global: usize,
    pub lambda_window: usize,
    /// The softmax scale; 0 means `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Packed variable-length sequences: `varlen_count` sequences, sequence `b` holding queries
    /// `cu_seqlens_q[b] .. cu_seqlens_q[b+1]` and keys `cu_seqlens_k[b] .. cu_seqlens_k[b+1]`
    /// (arrays of `varlen_count + 1` offsets from 0 to the token count). 0: no varlen, and the
    /// arrays are not read.
    pub varlen_count: usize,
    pub cu_seqlens_q: *const usize,
    pub cu_seqlens_k: *const usize,
    /// RoPE inside attention: `rope_base_count` bases (one for all heads, or one per key/value
    /// head group: the count must divide `heads_kv`); 0: no RoPE, and the rest is not read.
    pub rope_base_count: usize,
    pub rope_bases: *const f64,
    /// A `TesseraRopeConvention` code.
    pub rope_convention: i32,
    /// LM-Infinite's distance ceiling: relative distances beyond it count as it; 0: none.
    pub rope_distance_ceiling: usize,
}

/// Unmasked attention, scale `1/sqrt(head_dim)`, no varlen, no RoPE.
///
/// Ownership: returned by value. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_attention_options_default() -> TesseraAttentionOptions {
    TesseraAttentionOptions {
        mask: TesseraAttentionMask::None as i32,
        window_left: 0,
        window_right: 0,
        lambda_global: 0,
        lambda_window: 0,
        scale: 0.0,
        varlen_count: 0,
        cu_seqlens_q: std::ptr::null(),
        cu_seqlens_k: std::ptr::null(),
        rope_base_count: 0,
        rope_bases: std::ptr::null(),
        rope_convention: TesseraRopeConvention::RotateHalf as i32,
        rope_distance_ceiling: 0,
    }
}

fn convention(op: &str, arg: &str, code: i32) -> FfiResult<RopeConvention> {
    match code {
        0 => Ok(RopeConvention::RotateHalf),
        1 => Ok(RopeConvention::Interleaved),
        other => Err(FfiError::invalid(
            op,
            arg,
            "a TesseraRopeConvention code, 0 (ROTATE_HALF) or 1 (INTERLEAVED)",
            other,
        )),
    }
}

fn offsets(op: &str, arg: &str, pointer: *const usize, count: usize) -> FfiResult<Vec<usize>> {
    require(op, arg, pointer)?;
    let len = count
        .checked_add(1)
        .ok_or_else(|| FfiError::invalid(op, "varlen_count", "a count of sequences", count))?;
    // SAFETY: non-null; the caller promises `varlen_count + 1` readable offsets (header).
    Ok(unsafe { std::slice::from_raw_parts(pointer, len) }.to_vec())
}

/// RoPE's settings, read before the tensors are known; `head_dim` completes them.
struct RopeArgs {
    bases: Vec<f64>,
    convention: RopeConvention,
    ceiling: Option<usize>,
}

/// The options of a C options pointer (NULL: the defaults), every code checked, and RoPE's
/// settings when it is on.
fn read_options(op: &str, options: *const TesseraAttentionOptions) -> FfiResult<(AttentionOptions, Option<RopeArgs>)> {
    let options = if options.is_null() {
        tessera_attention_options_default()
    } else {
        // SAFETY: non-null; the caller promises a readable options struct (header).
        unsafe { options.read() }
    };
    let mask = match options.mask {
        0 => AttentionMask::None,
        1 => AttentionMask::Causal,
        2 => AttentionMask::Window {
            left: options.window_left,
            right: options.window_right,
        },
        3 => AttentionMask::Lambda {
            global: options.lambda_global,
            window: options.lambda_window,
        },
        other => {
            return Err(FfiError::invalid(
                op,
                "options.mask",
                "a TesseraAttentionMask code from 0 (NONE) to 3 (LAMBDA)",
                other,
            ))
        }
    };
    let scale = (options.scale != 0.0).then_some(options.scale);
    let varlen = if options.varlen_count == 0 {
        None
    } else {
        Some(Varlen {
            cu_seqlens_q: offsets(op, "options.cu_seqlens_q", options.cu_seqlens_q, options.varlen_count)?,
            cu_seqlens_k: offsets(op, "options.cu_seqlens_k", options.cu_seqlens_k, options.varlen_count)?,
        })
    };
    let rope = if options.rope_base_count == 0 {
        None
    } else {
        let convention = convention(op, "options.rope_convention", options.rope_convention)?;
        require(op, "options.rope_bases", options.rope_bases)?;
        // SAFETY: non-null; the caller promises `rope_base_count` readable bases (header).
        let bases = unsafe { std::slice::from_raw_parts(options.rope_bases, options.rope_base_count) }.to_vec();
        Some(RopeArgs {
            bases,
            convention,
            ceiling: (options.rope_distance_ceiling != 0).then_some(options.rope_distance_ceiling),
        })
    };
    let options = AttentionOptions {
        mask,
        scale,
        varlen,
        rope: None,
    };
    Ok((options, rope))
}

/// The options with RoPE for heads of `head_dim` (the last dimension of `q`).
fn with_rope(mut options: AttentionOptions, rope: Option<RopeArgs>, head_dim: usize) -> FfiResult<AttentionOptions> {
    if let Some(rope) = rope {
        options.rope = Some(AttentionRope {
            config: RopeConfig::new(head_dim, rope.bases, rope.convention)?,
            distance_ceiling: rope.ceiling,
        });
    }
    Ok(options)
}

fn lse_shape(q: &[usize]) -> Vec<usize> {
    q[..q.len().saturating_sub(1)].to_vec()
}

/// `out = softmax(scale · q·kᵀ + mask) · v` per head, flash-style (the score matrix is never
/// stored), and `lse` (may be NULL), the log-sum-exp of each query row's scaled scores, which the
/// backward needs.
///
/// `q` is (batch, seq_q, heads_q, head_dim), `k` and `v` (batch, seq_k, heads_kv, head_dim) with
/// `heads_q` a multiple of `heads_kv` (grouped-query attention: query head `h` reads key/value
/// head `h / (heads_q / heads_kv)`); with varlen the batch dimension goes ((total, heads,
/// head_dim)). `head_dim` is a multiple of 8 up to 256. One dtype: F32, BF16 or F16 on the CPU,
/// BF16 or F16 on a GPU; one device. `out` has `q`'s shape and dtype; `lse` is F32 shaped as `q`
/// without its last dimension. A row that sees no key gets 0 and `lse = -inf`. `options` may be
/// NULL for the defaults. The result is computed in tessera's memory and copied into the outputs.
///
/// Ownership: nothing is taken. Thread-safety: any thread; the outputs may not be used by another
/// call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, head counts, mask sizes,
/// scale, varlen offsets, RoPE bases, codes, aliasing), `..._INVALID_HANDLE`, `..._BUSY`,
/// `..._CUDA`. On error the outputs are unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_attention_forward(
    q: *const TesseraTensor,
    k: *const TesseraTensor,
    v: *const TesseraTensor,
    options: *const TesseraAttentionOptions,
    out: *mut TesseraTensor,
    lse: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_attention_forward";
    guard(OP, || {
        let (options, rope) = read_options(OP, options)?;
        let q = handle::tensor(OP, "q", q)?;
        let k = handle::tensor(OP, "k", k)?;
        let v = handle::tensor(OP, "v", v)?;
        let out = handle::tensor(OP, "out", out)?;
        let lse = (!lse.is_null()).then(|| handle::tensor(OP, "lse", lse)).transpose()?;
        let inputs = [("q", &q), ("k", &k), ("v", &v)];
        let mut others = inputs.to_vec();
        others.extend(lse.as_ref().map(|l| ("lse", l)));
        handle::expect_other_handles(OP, "out", &out, &others)?;
        if let Some(lse) = &lse {
            handle::expect_other_handles(OP, "lse", lse, &inputs)?;
        }
        let q = handle::read(OP, "q", &q)?;
        let k = handle::read(OP, "k", &k)?;
        let v = handle::read(OP, "v", &v)?;
        let mut out = handle::write(OP, "out", &out)?;
        let mut lse = lse.as_ref().map(|l| handle::write(OP, "lse", l)).transpose()?;
        let inputs = [("q", &*q), ("k", &*k), ("v", &*v)];
        let mut others = inputs.to_vec();
        others.extend(lse.as_deref().map(|l| ("lse", l)));
        handle::expect_no_overlap(OP, "out", &out, &others)?;
        if let Some(lse) = &lse {
            handle::expect_no_overlap(OP, "lse", lse, &inputs)?;
        }
        let options = with_rope(options, rope, q.shape().last().copied().unwrap_or(0))?;
        expect_output(OP, "out", &out, q.shape(), q.dtype(), &q.device())?;
        if let Some(lse) = &lse {
            expect_output(OP, "lse", lse, &lse_shape(q.shape()), DType::F32, &q.device())?;
        }
        let (result, result_lse) = ops::attention_forward(&q, &k, &v, &options)?;
        out.copy_from(&result)?;
        if let Some(lse) = &mut lse {
            lse.copy_from(&result_lse)?;
        }
        Ok(())
    })
}

/// The gradients of `tessera_attention_forward` into `d_q`, `d_k`, `d_v` (shaped and typed as
/// `q`, `k`, `v`), given `d_out` and the forward's inputs, options, `out` and `lse` (not NULL
/// here). Deterministic: every sum runs in a fixed order.
///
/// Ownership: nothing is taken; the three outputs must be distinct and not overlap the inputs.
/// Thread-safety: as `tessera_attention_forward`. Errors: as `tessera_attention_forward`; on
/// error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_attention_backward(
    d_out: *const TesseraTensor,
    q: *const TesseraTensor,
    k: *const TesseraTensor,
    v: *const TesseraTensor,
    out: *const TesseraTensor,
    lse: *const TesseraTensor,
    options: *const TesseraAttentionOptions,
    d_q: *mut TesseraTensor,
    d_k: *mut TesseraTensor,
    d_v: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_attention_backward";
    guard(OP, || {
        let (options, rope) = read_options(OP, options)?;
        let d_out = handle::tensor(OP, "d_out", d_out)?;
        let q = handle::tensor(OP, "q", q)?;
        let k = handle::tensor(OP, "k", k)?;
        let v = handle::tensor(OP, "v", v)?;
        let out = handle::tensor(OP, "out", out)?;
        let lse = handle::tensor(OP, "lse", lse)?;
        let d_q = handle::tensor(OP, "d_q", d_q)?;
        let d_k = handle::tensor(OP, "d_k", d_k)?;
        let d_v = handle::tensor(OP, "d_v", d_v)?;
        let inputs = [
            ("d_out", &d_out),
            ("q", &q),
            ("k", &k),
            ("v", &v),
            ("out", &out),
            ("lse", &lse),
        ];
        handle::expect_other_handles(
            OP,
            "d_q",
            &d_q,
            &[inputs.as_slice(), &[("d_k", &d_k), ("d_v", &d_v)]].concat(),
        )?;
        handle::expect_other_handles(OP, "d_k", &d_k, &[inputs.as_slice(), &[("d_v", &d_v)]].concat())?;
        handle::expect_other_handles(OP, "d_v", &d_v, &inputs)?;
        let d_out = handle::read(OP, "d_out", &d_out)?;
        let q = handle::read(OP, "q", &q)?;
        let k = handle::read(OP, "k", &k)?;
        let v = handle::read(OP, "v", &v)?;
        let out = handle::read(OP, "out", &out)?;
        let lse = handle::read(OP, "lse", &lse)?;
        let mut d_q = handle::write(OP, "d_q", &d_q)?;
        let mut d_k = handle::write(OP, "d_k", &d_k)?;
        let mut d_v = handle::write(OP, "d_v", &d_v)?;
        let inputs = [
            ("d_out", &*d_out),
            ("q", &*q),
            ("k", &*k),
            ("v", &*v),
            ("out", &*out),
            ("lse", &*lse),
        ];
        handle::expect_no_overlap(
            OP,
            "d_q",
            &d_q,
            &[inputs.as_slice(), &[("d_k", &*d_k), ("d_v", &*d_v)]].concat(),
        )?;
        handle::expect_no_overlap(OP, "d_k", &d_k, &[inputs.as_slice(), &[("d_v", &*d_v)]].concat())?;
        handle::expect_no_overlap(OP, "d_v", &d_v, &inputs)?;
        let options = with_rope(options, rope, q.shape().last().copied().unwrap_or(0))?;
        expect_output(OP, "d_q", &d_q, q.shape(), q.dtype(), &q.device())?;
        expect_output(OP, "d_k", &d_k, k.shape(), k.dtype(), &k.device())?;
        expect_output(OP, "d_v", &d_v, v.shape(), v.dtype(), &v.device())?;
        let (grad_q, grad_k, grad_v) = ops::attention_backward(&d_out, &q, &k, &v, &out, &lse, &options)?;
        d_q.copy_from(&grad_q)?;
        d_k.copy_from(&grad_k)?;
        d_v.copy_from(&grad_v)?;
        Ok(())
    })
}

/// RoPE on its own, forward (`backward` = 0: rotate `x` by `R(p)`) or backward (1: the
/// transposed rotation `R(p)ᵀ`, the gradient of the forward), into `out` (the shape and dtype of
/// `x`). `x` is (..., heads, head_dim) of F32, BF16 or F16 (head_dim even, at most 1024);
/// `positions` U32 with the shape of `x` without its last two dimensions, one per token;
/// `base_count` bases at `bases` (1 for every head, or one per head); `convention_code` a
/// `TesseraRopeConvention`. Angles are reduced in f64, so positions up to 2^32 keep precision.
///
/// Ownership: `bases` is read during the call only; `out` must not be or overlap an input.
/// Thread-safety: any thread; `out` may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (codes, bases, shapes, dtypes, devices, aliasing),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged. The result is
/// computed in tessera's memory and copied into `out`.
#[no_mangle]
pub unsafe extern "C" fn tessera_rope(
    x: *const TesseraTensor,
    positions: *const TesseraTensor,
    bases: *const f64,
    base_count: usize,
    convention_code: i32,
    backward: i32,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_rope";
    guard(OP, || {
        let convention = convention(OP, "convention", convention_code)?;
        let backward = crate::matmul::flag(OP, "backward", backward)?;
        if base_count == 0 {
            return Err(FfiError::invalid(OP, "base_count", "at least 1", 0));
        }
        require(OP, "bases", bases)?;
        // SAFETY: non-null; the caller promises `base_count` readable bases (header).
        let bases = unsafe { std::slice::from_raw_parts(bases, base_count) }.to_vec();
        let x = handle::tensor(OP, "x", x)?;
        let positions = handle::tensor(OP, "positions", positions)?;
        let out = handle::tensor(OP, "out", out)?;
        handle::expect_other_handles(OP, "out", &out, &[("x", &x), ("positions", &positions)])?;
        let x = handle::read(OP, "x", &x)?;
        let positions = handle::read(OP, "positions", &positions)?;
        let mut out = handle::write(OP, "out", &out)?;
        handle::expect_no_overlap(OP, "out", &out, &[("x", &x), ("positions", &positions)])?;
        expect_output(OP, "out", &out, x.shape(), x.dtype(), &x.device())?;
        let config = RopeConfig::new(x.shape().last().copied().unwrap_or(0), bases, convention)?;
        let result = if backward {
            ops::rope_backward(&x, &positions, &config)?
        } else {
            ops::rope_forward(&x, &positions, &config)?
        };
        out.copy_from(&result)?;
        Ok(())
    })
}
