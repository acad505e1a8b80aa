//! The transformer's elementwise and loss ops on caller tensors: GELU and SwiGLU, softmax
//! cross-entropy (fused with its gradient), and the global gradient norm with clipping.

use crate::handle::{self, SharedTensor, TesseraTensor};
use crate::status::{guard, require, FfiError, FfiResult, TesseraStatus};
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};
use tessera_core::ops::{self, CrossEntropyOptions};
use tessera_core::Tensor;

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
