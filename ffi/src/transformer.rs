//! The transformer's elementwise and loss ops on caller tensors: GELU and SwiGLU, softmax
//! cross-entropy (fused with its gradient), and the global gradient norm with clipping.

use crate::handle::{self, SharedTensor, TesseraTensor};
use crate::status::{guard, require, FfiError, FfiResult, TesseraStatus};
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};
use tessera_core::ops::{self, CrossEntropyOptions};
use tessera_core::{DType, Tensor};

/// Which activation (`int32_t activation` arguments).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraActivation {
    /// GELU, tanh approximation (GPT-2), elementwise over any shape.
    Gelu = 0,
    /// SwiGLU (Llama): rows of `[gate | up]`, each half as wide; `silu(gate)·up`.
    Swiglu = 1,
}

fn activation(op: &str, code: i32) -> FfiResult<TesseraActivation> {
    match code {
        0 => Ok(TesseraActivation::Gelu),
        1 => Ok(TesseraActivation::Swiglu),
        other => Err(FfiError::invalid(
            op,
            "activation",
            "TESSERA_ACTIVATION_GELU (0) or TESSERA_ACTIVATION_SWIGLU (1)",
            other,
        )),
    }
}

/// The activation of `x` into `out`: for GELU `out` has the shape of `x`; for SwiGLU `x` has
/// rows `[gate | up]` and `out` the shape of `x` with the last dimension halved. F32, BF16 or
/// F16, one dtype and device; f32 arithmetic.
///
/// Ownership: nothing is taken; `out` must not be or overlap `x`. Thread-safety: any thread;
/// `out` may not be used by another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (activation code, shapes, dtypes, devices,
/// aliasing), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_activation_forward(
    activation_code: i32,
    x: *const TesseraTensor,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_activation_forward";
    guard(OP, || {
        let kind = activation(OP, activation_code)?;
        let x = handle::tensor(OP, "x", x)?;
        let out = handle::tensor(OP, "out", out)?;
        handle::expect_other_handles(OP, "out", &out, &[("x", &x)])?;
        let x = handle::read(OP, "x", &x)?;
        let mut out = handle::write(OP, "out", &out)?;
        handle::expect_no_overlap(OP, "out", &out, &[("x", &x)])?;
        match kind {
            TesseraActivation::Gelu => ops::gelu_forward_into(&x, &mut out)?,
            TesseraActivation::Swiglu => ops::swiglu_forward_into(&x, &mut out)?,
        }
        Ok(())
    })
}

/// The gradient of `tessera_activation_forward` with respect to `x` into `d_x` (the shape of
/// `x`), given the forward's input `x` and the gradient `d_out` of its output.
///
/// Ownership: nothing is taken; `d_x` must not be or overlap an input. Thread-safety: as
/// `tessera_activation_forward`. Errors: as `tessera_activation_forward`; on error `d_x` is
/// unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_activation_backward(
    activation_code: i32,
    x: *const TesseraTensor,
    d_out: *const TesseraTensor,
    d_x: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_activation_backward";
    guard(OP, || {
        let kind = activation(OP, activation_code)?;
        let x = handle::tensor(OP, "x", x)?;
        let d_out = handle::tensor(OP, "d_out", d_out)?;
        let d_x = handle::tensor(OP, "d_x", d_x)?;
        handle::expect_other_handles(OP, "d_x", &d_x, &[("x", &x), ("d_out", &d_out)])?;
        let x = handle::read(OP, "x", &x)?;
        let d_out = handle::read(OP, "d_out", &d_out)?;
        let mut d_x = handle::write(OP, "d_x", &d_x)?;
        handle::expect_no_overlap(OP, "d_x", &d_x, &[("x", &x), ("d_out", &d_out)])?;
        match kind {
            TesseraActivation::Gelu => ops::gelu_backward_into(&x, &d_out, &mut d_x)?,
            TesseraActivation::Swiglu => ops::swiglu_backward_into(&x, &d_out, &mut d_x)?,
        }
        Ok(())
    })
}

/// Options of `tessera_cross_entropy`; `tessera_cross_entropy_options_default()` ignores no
/// target and scales the gradient by 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraCrossEntropyOptions {
    /// 1: rows whose target is `ignore_index` contribute neither loss nor gradient; 0: none is
    /// ignored.
    pub use_ignore_index: i32,
    pub ignore_index: u32,
    /// The gradient is that of `grad_scale · mean loss`.
    pub grad_scale: f32,
}

/// No ignored target, gradient scale 1.
///
/// Ownership: returned by value. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_cross_entropy_options_default() -> TesseraCrossEntropyOptions {
    TesseraCrossEntropyOptions {
        use_ignore_index: 0,
        ignore_index: 0,
        grad_scale: 1.0,
    }
}

/// Softmax cross-entropy of `logits` (..., vocab; F32, BF16 or F16) against `targets` (U32,
/// the logits' shape without the last dimension): each row's loss `logsumexp(x) - x[target]`
/// into `losses` (F32, the targets' shape), their mean over the rows not ignored into `mean`
/// (F32, shape (1); NaN when every row is ignored), and, when `d_logits` is not NULL, the
/// gradient of `grad_scale · mean` into it (the logits' shape and dtype). `options` may be NULL.
/// On the CPU a target past the vocabulary is an error; on a GPU its row is NaN.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs.
/// Thread-safety: any thread; the outputs may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, targets, option values,
/// aliasing), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_cross_entropy(
    logits: *const TesseraTensor,
    targets: *const TesseraTensor,
    options: *const TesseraCrossEntropyOptions,
    losses: *mut TesseraTensor,
    mean: *mut TesseraTensor,
    d_logits: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_cross_entropy";
    guard(OP, || {
        let options = if options.is_null() {
            tessera_cross_entropy_options_default()
        } else {
            // SAFETY: non-null; the caller promises a readable options struct (header).
            unsafe { options.read() }
        };
        let use_ignore = crate::matmul::flag(OP, "options.use_ignore_index", options.use_ignore_index)?;
        let options = CrossEntropyOptions {
            ignore_index: use_ignore.then_some(options.ignore_index),
            grad_scale: options.grad_scale,
        };
        let logits = handle::tensor(OP, "logits", logits)?;
        let targets = handle::tensor(OP, "targets", targets)?;
        let losses = handle::tensor(OP, "losses", losses)?;
        let mean = handle::tensor(OP, "mean", mean)?;
        let d_logits = (!d_logits.is_null())
            .then(|| handle::tensor(OP, "d_logits", d_logits))
            .transpose()?;
        let inputs = [("logits", &logits), ("targets", &targets)];
        let mut written = vec![("losses", &losses), ("mean", &mean)];
        written.extend(d_logits.as_ref().map(|d| ("d_logits", d)));
        for (index, (arg, tensor)) in written.iter().enumerate() {
            handle::expect_other_handles(OP, arg, tensor, &[inputs.as_slice(), &written[index + 1..]].concat())?;
        }
        let logits = handle::read(OP, "logits", &logits)?;
        let targets = handle::read(OP, "targets", &targets)?;
        let mut losses = handle::write(OP, "losses", &losses)?;
        let mut mean = handle::write(OP, "mean", &mean)?;
        let mut d_logits = d_logits
            .as_ref()
            .map(|d| handle::write(OP, "d_logits", d))
            .transpose()?;
        let inputs = [("logits", &*logits), ("targets", &*targets)];
        handle::expect_no_overlap(
            OP,
            "losses",
            &losses,
            &[inputs.as_slice(), &[("mean", &*mean)]].concat(),
        )?;
        handle::expect_no_overlap(OP, "mean", &mean, &inputs)?;
        if let Some(d_logits) = &d_logits {
            let others = [inputs.as_slice(), &[("losses", &*losses), ("mean", &*mean)]].concat();
            handle::expect_no_overlap(OP, "d_logits", d_logits, &others)?;
        }
        let outputs = ops::CrossEntropyOutputs {
            losses: &mut losses,
            mean: &mut mean,
        };
        match &mut d_logits {
            Some(d_logits) => ops::cross_entropy_fused_into(&logits, &targets, &options, outputs, d_logits)?,
            None => ops::cross_entropy_into(&logits, &targets, &options, outputs)?,
        }
        Ok(())
    })
}

/// The tensors behind `count` handles at `tensors`, each distinct.
fn tensor_list(op: &str, tensors: *const *const TesseraTensor, count: usize) -> FfiResult<Vec<SharedTensor>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    require(op, "tensors", tensors)?;
    // SAFETY: non-null; the caller promises `count` readable handles (header).
    let handles = unsafe { std::slice::from_raw_parts(tensors, count) };
    let list = handles
        .iter()
        .map(|&h| handle::tensor(op, "tensors", h))
        .collect::<FfiResult<Vec<_>>>()?;
    for (i, a) in list.iter().enumerate() {
        if let Some(j) = list[..i].iter().position(|b| Arc::ptr_eq(a, b)) {
            return Err(FfiError::invalid(
                op,
                "tensors",
                "distinct tensor handles",
                format!("the same handle at {j} and {i}"),
            ));
        }
    }
    Ok(list)
}

/// The global L2 norm `sqrt(Σ_tensors Σ_i g_i²)` of `count` tensors (F32, BF16 or F16, any
/// shapes, one device; `tensors` may be NULL when `count` is 0, whose norm is 0) into `norm`
/// (F32, shape (1), on their device). Summed in a fixed order: deterministic.
///
/// Ownership: nothing is taken; `norm` must not be one of the tensors. Thread-safety: any
/// thread; `norm` may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL, repeated handles, dtypes, devices, `norm`'s
/// shape), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `norm` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_grad_norm(
    tensors: *const *const TesseraTensor,
    count: usize,
    norm: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_grad_norm";
    guard(OP, || {
        let list = tensor_list(OP, tensors, count)?;
        let norm = handle::tensor(OP, "norm", norm)?;
        let named: Vec<(&str, &SharedTensor)> = list.iter().map(|t| ("tensors", t)).collect();
        handle::expect_other_handles(OP, "norm", &norm, &named)?;
        let guards = list
            .iter()
            .map(|t| handle::read(OP, "tensors", t))
            .collect::<FfiResult<Vec<RwLockReadGuard<'_, Tensor>>>>()?;
        let mut norm = handle::write(OP, "norm", &norm)?;
        let refs: Vec<&Tensor> = guards.iter().map(|g| &**g).collect();
        let named: Vec<(&str, &Tensor)> = refs.iter().map(|&t| ("tensors", t)).collect();
        handle::expect_no_overlap(OP, "norm", &norm, &named)?;
        ops::grad_norm_into(&refs, &mut norm)?;
        Ok(())
    })
}

/// `tessera_grad_norm` into `norm`, then every tensor scaled in place by
/// `min(1, max_norm / (norm + 1e-6))` (PyTorch's `clip_grad_norm_`; nothing is scaled when the
/// norm is not finite, which tells the caller to skip the step). `max_norm` is finite and >= 0.
///
/// Ownership: nothing is taken; the tensors are changed in place and must not overlap one
/// another or `norm`. Thread-safety: any thread; none of the tensors may be used by another call
/// meanwhile. Errors: as `tessera_grad_norm`, and `TESSERA_STATUS_INVALID_ARGUMENT` for
/// `max_norm`. On error nothing is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_clip_grad_norm(
    tensors: *const *mut TesseraTensor,
    count: usize,
    max_norm: f32,
    norm: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_clip_grad_norm";
    guard(OP, || {
        let list = tensor_list(OP, tensors.cast(), count)?;
        let norm = handle::tensor(OP, "norm", norm)?;
        let named: Vec<(&str, &SharedTensor)> = list.iter().map(|t| ("tensors", t)).collect();
        handle::expect_other_handles(OP, "norm", &norm, &named)?;
        let mut guards = list
            .iter()
            .map(|t| handle::write(OP, "tensors", t))
            .collect::<FfiResult<Vec<RwLockWriteGuard<'_, Tensor>>>>()?;
        let mut norm = handle::write(OP, "norm", &norm)?;
        for i in 0..guards.len() {
            let others: Vec<(&str, &Tensor)> = guards[i + 1..].iter().map(|g| ("tensors", &**g)).collect();
            handle::expect_no_overlap(OP, "tensors", &guards[i], &others)?;
        }
        let named: Vec<(&str, &Tensor)> = guards.iter().map(|g| ("tensors", &**g)).collect();
        handle::expect_no_overlap(OP, "norm", &norm, &named)?;
        let mut refs: Vec<&mut Tensor> = guards.iter_mut().map(|g| &mut **g).collect();
        ops::clip_grad_norm(&mut refs, max_norm, &mut norm)?;
        Ok(())
    })
}

/// Token embeddings plus (optionally) learned positions: `out[b, t, :] = wte[tokens[b, t], :]
/// (+ wpe[t, :])`. `tokens` is U32 (batch, seq), each below the vocabulary; `wte` (vocab, width)
/// and `wpe` (context >= seq, width; may be NULL) of one float dtype; `out` (batch, seq, width)
/// of that dtype; one device.
///
/// Ownership: nothing is taken; `out` must not be or overlap an input. Thread-safety: any
/// thread; `out` may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, token ids, aliasing),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_embedding_forward(
    tokens: *const TesseraTensor,
    wte: *const TesseraTensor,
    wpe: *const TesseraTensor,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_embedding_forward";
    guard(OP, || {
        let tokens = handle::tensor(OP, "tokens", tokens)?;
        let wte = handle::tensor(OP, "wte", wte)?;
        let wpe = (!wpe.is_null()).then(|| handle::tensor(OP, "wpe", wpe)).transpose()?;
        let out = handle::tensor(OP, "out", out)?;
        let mut inputs = vec![("tokens", &tokens), ("wte", &wte)];
        inputs.extend(wpe.as_ref().map(|w| ("wpe", w)));
        handle::expect_other_handles(OP, "out", &out, &inputs)?;
        let tokens = handle::read(OP, "tokens", &tokens)?;
        let wte = handle::read(OP, "wte", &wte)?;
        let wpe = wpe.as_ref().map(|w| handle::read(OP, "wpe", w)).transpose()?;
        let mut out = handle::write(OP, "out", &out)?;
        let mut others = vec![("tokens", &*tokens), ("wte", &*wte)];
        others.extend(wpe.as_deref().map(|w| ("wpe", w)));
        handle::expect_no_overlap(OP, "out", &out, &others)?;
        ops::embedding_forward_into(&tokens, &wte, wpe.as_deref(), &mut out)?;
        Ok(())
    })
}

/// The embedding's backward: with `d_out` the (batch, seq, width) gradient of its output and
/// `tokens` the forward's (U32 (batch, seq)), `d_wte[v, :] = Σ d_out[p, :]` over the positions
/// holding token `v` (F32 (vocab, width)) and, when `d_wpe` is not NULL, `d_wpe[t, :] =
/// Σ_b d_out[b, t, :]` (F32 (context >= seq, width); rows past `seq` get nothing). With
/// `accumulate` = 1 the sums are added to what the gradients hold, with 0 they replace it. Sums
/// run in a fixed order: deterministic.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs.
/// Thread-safety: any thread; the outputs may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, token ids, `accumulate`
/// not 0 or 1, aliasing), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error no output is
/// changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_embedding_backward(
    tokens: *const TesseraTensor,
    d_out: *const TesseraTensor,
    d_wte: *mut TesseraTensor,
    d_wpe: *mut TesseraTensor,
    accumulate: i32,
) -> TesseraStatus {
    const OP: &str = "tessera_embedding_backward";
    guard(OP, || {
        let accumulate = crate::matmul::flag(OP, "accumulate", accumulate)?;
        let tokens = handle::tensor(OP, "tokens", tokens)?;
        let d_out = handle::tensor(OP, "d_out", d_out)?;
        let d_wte = handle::tensor(OP, "d_wte", d_wte)?;
        let d_wpe = (!d_wpe.is_null())
            .then(|| handle::tensor(OP, "d_wpe", d_wpe))
            .transpose()?;
        let inputs = [("tokens", &tokens), ("d_out", &d_out)];
        let mut others = inputs.to_vec();
        others.extend(d_wpe.as_ref().map(|w| ("d_wpe", w)));
        handle::expect_other_handles(OP, "d_wte", &d_wte, &others)?;
        if let Some(d_wpe) = &d_wpe {
            handle::expect_other_handles(OP, "d_wpe", d_wpe, &inputs)?;
        }
        let tokens = handle::read(OP, "tokens", &tokens)?;
        let d_out = handle::read(OP, "d_out", &d_out)?;
        let mut d_wte = handle::write(OP, "d_wte", &d_wte)?;
        let mut d_wpe = d_wpe.as_ref().map(|w| handle::write(OP, "d_wpe", w)).transpose()?;
        let inputs = [("tokens", &*tokens), ("d_out", &*d_out)];
        let mut others = inputs.to_vec();
        others.extend(d_wpe.as_deref().map(|w| ("d_wpe", w)));
        handle::expect_no_overlap(OP, "d_wte", &d_wte, &others)?;
        if let Some(d_wpe) = &d_wpe {
            handle::expect_no_overlap(OP, "d_wpe", d_wpe, &inputs)?;
        }
        let (batch, seq) = match (tokens.dtype(), tokens.shape()) {
            (DType::U32, &[batch, seq]) => (batch, seq),
            _ => {
                return Err(FfiError::invalid(
                    OP,
                    "tokens",
                    "a (batch, seq) u32 tensor",
                    format!("shape {:?} of {}", tokens.shape(), tokens.dtype()),
                ))
            }
        };
        let vocab = d_wte.shape().first().copied().unwrap_or(0);
        let ids = tokens.to_vec::<u32>()?;
        let plan = ops::EmbeddingGradPlan::new(&ids, batch, seq, vocab, &d_out.device())?;
        ops::embedding_backward_into(&d_out, &plan, &mut d_wte, d_wpe.as_deref_mut(), accumulate)?;
        Ok(())
    })
}

/// Which normalisation (`int32_t kind` arguments).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraNormKind {
    /// `(x - mean)·rstd·weight + bias` (GPT-2).
    LayerNorm = 0,
    /// `x·rstd·weight`, rstd from the mean square (Llama).
    RmsNorm = 1,
}

fn norm_config(op: &str, kind: i32, eps: f32) -> FfiResult<ops::NormConfig> {
    match kind {
        0 => Ok(ops::NormConfig::layer_norm(eps)),
        1 => Ok(ops::NormConfig::rms_norm(eps)),
        other => Err(FfiError::invalid(
            op,
            "kind",
            "TESSERA_NORM_KIND_LAYER_NORM (0) or TESSERA_NORM_KIND_RMS_NORM (1)",
            other,
        )),
    }
}

/// The caller's `mean` and `rstd` tensors lent to a `NormStats` for one call, and put back when
/// it ends, whether the op succeeded or not.
struct LentStats<'a> {
    mean: &'a mut Tensor,
    rstd: &'a mut Tensor,
    stats: ops::NormStats,
}

impl<'a> LentStats<'a> {
    fn new(mean: &'a mut Tensor, rstd: &'a mut Tensor) -> FfiResult<LentStats<'a>> {
        let empty = || Tensor::zeros(&[0], DType::F32, &tessera_core::Device::Cpu);
        let (stand_in_mean, stand_in_rstd) = (empty()?, empty()?);
        let stats = ops::NormStats {
            mean: std::mem::replace(mean, stand_in_mean),
            rstd: std::mem::replace(rstd, stand_in_rstd),
        };
        Ok(LentStats { mean, rstd, stats })
    }
}

impl Drop for LentStats<'_> {
    fn drop(&mut self) {
        std::mem::swap(self.mean, &mut self.stats.mean);
        std::mem::swap(self.rstd, &mut self.stats.rstd);
    }
}

/// LayerNorm or RMSNorm over the last dimension (width at most 8192) of `x` into `out` (the
/// shape and dtype of `x`), with each row's mean (0 for RMSNorm) and reciprocal standard
/// deviation into `mean` and `rstd` (F32, (rows)) for the backward. `weight` and `bias` (may be
/// NULL; LayerNorm only adds it) are (width) of `x`'s dtype. With `residual` (not NULL), the op
/// normalises `x + residual` and writes that sum into `sum` (both of `x`'s shape and dtype;
/// `sum` must be NULL without `residual`). `eps` is finite and >= 0.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs.
/// Thread-safety: any thread; the outputs may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (kind code, eps, shapes, dtypes, devices, width,
/// aliasing), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_norm_forward(
    kind: i32,
    eps: f32,
    x: *const TesseraTensor,
    residual: *const TesseraTensor,
    sum: *mut TesseraTensor,
    weight: *const TesseraTensor,
    bias: *const TesseraTensor,
    out: *mut TesseraTensor,
    mean: *mut TesseraTensor,
    rstd: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_norm_forward";
    guard(OP, || {
        let config = norm_config(OP, kind, eps)?;
        if residual.is_null() != sum.is_null() {
            return Err(FfiError::invalid(
                OP,
                "sum",
                "a tensor exactly when `residual` is given",
                if sum.is_null() { "NULL" } else { "a tensor" },
            ));
        }
        let optional = |arg, h: *const TesseraTensor| (!h.is_null()).then(|| handle::tensor(OP, arg, h)).transpose();
        let x = handle::tensor(OP, "x", x)?;
        let residual = optional("residual", residual)?;
        let sum = optional("sum", sum)?;
        let weight = handle::tensor(OP, "weight", weight)?;
        let bias = optional("bias", bias)?;
        let out = handle::tensor(OP, "out", out)?;
        let mean = handle::tensor(OP, "mean", mean)?;
        let rstd = handle::tensor(OP, "rstd", rstd)?;
        let mut inputs = vec![("x", &x), ("weight", &weight)];
        inputs.extend(residual.as_ref().map(|r| ("residual", r)));
        inputs.extend(bias.as_ref().map(|b| ("bias", b)));
        let mut written = vec![("out", &out), ("mean", &mean), ("rstd", &rstd)];
        written.extend(sum.as_ref().map(|s| ("sum", s)));
        for (index, (arg, tensor)) in written.iter().enumerate() {
            handle::expect_other_handles(OP, arg, tensor, &[inputs.as_slice(), &written[index + 1..]].concat())?;
        }
        let x = handle::read(OP, "x", &x)?;
        let residual = residual.as_ref().map(|r| handle::read(OP, "residual", r)).transpose()?;
        let weight = handle::read(OP, "weight", &weight)?;
        let bias = bias.as_ref().map(|b| handle::read(OP, "bias", b)).transpose()?;
        let mut out = handle::write(OP, "out", &out)?;
        let mut mean = handle::write(OP, "mean", &mean)?;
        let mut rstd = handle::write(OP, "rstd", &rstd)?;
        let mut sum = sum.as_ref().map(|s| handle::write(OP, "sum", s)).transpose()?;
        let mut inputs = vec![("x", &*x), ("weight", &*weight)];
        inputs.extend(residual.as_deref().map(|r| ("residual", r)));
        inputs.extend(bias.as_deref().map(|b| ("bias", b)));
        let mut written = vec![("out", &*out), ("mean", &*mean), ("rstd", &*rstd)];
        written.extend(sum.as_deref().map(|s| ("sum", s)));
        for (index, (arg, tensor)) in written.iter().enumerate() {
            handle::expect_no_overlap(OP, arg, tensor, &[inputs.as_slice(), &written[index + 1..]].concat())?;
        }
        let params = ops::NormParams {
            weight: &weight,
            bias: bias.as_deref(),
        };
        let residual = match (residual.as_deref(), sum.as_deref_mut()) {
            (Some(residual), Some(sum)) => Some((residual, sum)),
            _ => None,
        };
        let mut lent = LentStats::new(&mut mean, &mut rstd)?;
        ops::norm_forward_into(&config, &x, residual, params, &mut out, &mut lent.stats)?;
        Ok(())
    })
}

/// The backward of `tessera_norm_forward`: `input` is what the forward normalised (`x`, or the
/// `sum` it wrote), `d_out` the gradient of its output, `d_skip` (may be NULL) a gradient reaching
/// `input` through the skip connection, added to `d_input`; `mean` and `rstd` the forward's.
/// Writes `d_input` (the shape and dtype of `input`), `d_weight` (F32, (width)) and `d_bias`
/// (F32, (width); may be NULL). With `accumulate` = 1 the parameter gradients are added to what
/// `d_weight` and `d_bias` hold; with 0 they replace it.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs.
/// Thread-safety: as `tessera_norm_forward`. Errors: as `tessera_norm_forward`, and
/// `TESSERA_STATUS_INVALID_ARGUMENT` for `accumulate` not 0 or 1. On error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_norm_backward(
    kind: i32,
    eps: f32,
    d_out: *const TesseraTensor,
    d_skip: *const TesseraTensor,
    input: *const TesseraTensor,
    weight: *const TesseraTensor,
    mean: *const TesseraTensor,
    rstd: *const TesseraTensor,
    d_input: *mut TesseraTensor,
    d_weight: *mut TesseraTensor,
    d_bias: *mut TesseraTensor,
    accumulate: i32,
) -> TesseraStatus {
    const OP: &str = "tessera_norm_backward";
    guard(OP, || {
        let config = norm_config(OP, kind, eps)?;
        let accumulate = crate::matmul::flag(OP, "accumulate", accumulate)?;
        let optional = |arg, h: *const TesseraTensor| (!h.is_null()).then(|| handle::tensor(OP, arg, h)).transpose();
        let d_out = handle::tensor(OP, "d_out", d_out)?;
        let d_skip = optional("d_skip", d_skip)?;
        let input = handle::tensor(OP, "input", input)?;
        let weight = handle::tensor(OP, "weight", weight)?;
        let mean = handle::tensor(OP, "mean", mean)?;
        let rstd = handle::tensor(OP, "rstd", rstd)?;
        let d_input = handle::tensor(OP, "d_input", d_input)?;
        let d_weight = handle::tensor(OP, "d_weight", d_weight)?;
        let d_bias = optional("d_bias", d_bias)?;
        let mut inputs = vec![
            ("d_out", &d_out),
            ("input", &input),
            ("weight", &weight),
            ("mean", &mean),
            ("rstd", &rstd),
        ];
        inputs.extend(d_skip.as_ref().map(|d| ("d_skip", d)));
        let mut written = vec![("d_input", &d_input), ("d_weight", &d_weight)];
        written.extend(d_bias.as_ref().map(|d| ("d_bias", d)));
        for (index, (arg, tensor)) in written.iter().enumerate() {
            handle::expect_other_handles(OP, arg, tensor, &[inputs.as_slice(), &written[index + 1..]].concat())?;
        }
        let d_out = handle::read(OP, "d_out", &d_out)?;
        let d_skip = d_skip.as_ref().map(|d| handle::read(OP, "d_skip", d)).transpose()?;
        let input = handle::read(OP, "input", &input)?;
        let weight = handle::read(OP, "weight", &weight)?;
        let mean = handle::read(OP, "mean", &mean)?;
        let rstd = handle::read(OP, "rstd", &rstd)?;
        let mut d_input = handle::write(OP, "d_input", &d_input)?;
        let mut d_weight = handle::write(OP, "d_weight", &d_weight)?;
        let mut d_bias = d_bias.as_ref().map(|d| handle::write(OP, "d_bias", d)).transpose()?;
        let mut inputs = vec![
            ("d_out", &*d_out),
            ("input", &*input),
            ("weight", &*weight),
            ("mean", &*mean),
            ("rstd", &*rstd),
        ];
        inputs.extend(d_skip.as_deref().map(|d| ("d_skip", d)));
        let mut written = vec![("d_input", &*d_input), ("d_weight", &*d_weight)];
        written.extend(d_bias.as_deref().map(|d| ("d_bias", d)));
        for (index, (arg, tensor)) in written.iter().enumerate() {
            handle::expect_no_overlap(OP, arg, tensor, &[inputs.as_slice(), &written[index + 1..]].concat())?;
        }
        // The backward reads the statistics only; copies stand in for the caller's tensors,
        // which stay shared with other readers.
        let stats = ops::NormStats {
            mean: mean.to_device(&mean.device())?,
            rstd: rstd.to_device(&rstd.device())?,
        };
        let params = ops::NormParams {
            weight: &weight,
            bias: None,
        };
        let grads = ops::NormGrads {
            d_input: &mut d_input,
            d_weight: &mut d_weight,
            d_bias: d_bias.as_deref_mut(),
            accumulate,
        };
        ops::norm_backward_into(&config, &d_out, d_skip.as_deref(), &input, params, &stats, grads)?;
        Ok(())
    })
}
