//! Dense matmul: `out = alpha·op(a)·op(b) + beta·out + bias`.

use crate::handle::{self, TesseraTensor};
use crate::status::{guard, FfiError, FfiResult, TesseraStatus};
use tessera_core::ops::{self, MatmulOptions};

/// How `tessera_matmul` combines its operands. `tessera_matmul_options_default()` gives
/// `out = a·b`; set `trans_b = 1` for a linear layer's `x·wᵀ`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraMatmulOptions {
    /// 1: use aᵀ, with a stored (k, m); 0: a is (m, k).
    pub trans_a: i32,
    /// 1: use bᵀ, with b stored (n, k); 0: b is (k, n).
    pub trans_b: i32,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the previous contents of `out` (0 ignores them, NaN included; 1 accumulates).
    pub beta: f32,
}

/// The default options: no transposes, alpha 1, beta 0 (`out = a·b`).
///
/// Ownership: returned by value. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_matmul_options_default() -> TesseraMatmulOptions {
    let defaults = MatmulOptions::default();
    TesseraMatmulOptions {
        trans_a: defaults.trans_a as i32,
        trans_b: defaults.trans_b as i32,
        alpha: defaults.alpha,
        beta: defaults.beta,
    }
}

pub(crate) fn flag(op: &str, arg: &str, value: i32) -> FfiResult<bool> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(FfiError::invalid(op, arg, "0 or 1", other)),
    }
}

/// `out = alpha·op(a)·op(b) + beta·out + bias`, written into `out` in place.
///
/// `a` is (m, k) or, with `trans_a`, (k, m); `b` is (k, n) or, with `trans_b`, (n, k); `bias`
/// (may be NULL) is (n); `out` is (m, n). All have one dtype (F32, BF16 or F16) and one device;
/// every dimension is at least 1. Products accumulate in f32. `options` may be NULL for the
/// defaults. On a GPU the work is queued on the device's stream (see
/// `tessera_device_synchronize`); on the CPU it is done when the call returns.
/// Ownership: nothing is taken; `out` must be a tensor other than the inputs, and its memory must
/// not overlap theirs. Thread-safety: any thread; inputs may be read by other calls at the same
/// time; `out` may not be used by another call (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, flags other than 0/1,
/// `out` aliasing an input), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is
/// unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_matmul(
    a: *const TesseraTensor,
    b: *const TesseraTensor,
    bias: *const TesseraTensor,
    out: *mut TesseraTensor,
    options: *const TesseraMatmulOptions,
) -> TesseraStatus {
    const OP: &str = "tessera_matmul";
    guard(OP, || {
        let options = if options.is_null() {
            tessera_matmul_options_default()
        } else {
            // SAFETY: non-null; the caller promises a readable options struct (header).
            unsafe { options.read() }
        };
        let options = MatmulOptions {
            trans_a: flag(OP, "options.trans_a", options.trans_a)?,
            trans_b: flag(OP, "options.trans_b", options.trans_b)?,
            alpha: options.alpha,
            beta: options.beta,
        };
        let a = handle::tensor(OP, "a", a)?;
        let b = handle::tensor(OP, "b", b)?;
        let bias = (!bias.is_null())
            .then(|| handle::tensor(OP, "bias", bias))
            .transpose()?;
        let out = handle::tensor(OP, "out", out)?;
        let mut inputs = vec![("a", &a), ("b", &b)];
        inputs.extend(bias.as_ref().map(|bias| ("bias", bias)));
        handle::expect_other_handles(OP, "out", &out, &inputs)?;
        let a = handle::read(OP, "a", &a)?;
        let b = handle::read(OP, "b", &b)?;
        let bias = bias.as_ref().map(|bias| handle::read(OP, "bias", bias)).transpose()?;
        let mut out = handle::write(OP, "out", &out)?;
        let mut others = vec![("a", &*a), ("b", &*b)];
        others.extend(bias.as_deref().map(|bias| ("bias", bias)));
        handle::expect_no_overlap(OP, "out", &out, &others)?;
        ops::matmul_into(&a, &b, bias.as_deref(), &mut out, options)?;
        Ok(())
    })
}
