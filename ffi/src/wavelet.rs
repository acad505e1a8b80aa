//! Wavelet mixing (WaveletGPT): configurations as handles, the box-window forward and backward,
//! and the learnable-kernel variant.

use crate::device::clear_out;
use crate::handle::{self, Object, TesseraTensor, TesseraWaveletConfig};
use crate::status::{guard, require, write_out, FfiError, FfiResult, TesseraStatus};
use std::sync::Arc;
use tessera_core::ops::{self, WaveletConfig, WaveletDivisor};
use tessera_core::{DType, Device, Tensor};

/// What a window's sum is divided by near the start of the sequence (`int32_t divisor`
/// arguments).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraWaveletDivisor {
    /// Always the window `k` (a causal box convolution over zeros before the start).
    Window = 0,
    /// `min(k, t + 1)`: the mean of the tokens that exist.
    Available = 1,
}

fn divisor(op: &str, code: i32) -> FfiResult<WaveletDivisor> {
    match code {
        0 => Ok(WaveletDivisor::Window),
        1 => Ok(WaveletDivisor::Available),
        other => Err(FfiError::invalid(
            op,
            "divisor",
            "TESSERA_WAVELET_DIVISOR_WINDOW (0) or TESSERA_WAVELET_DIVISOR_AVAILABLE (1)",
            other,
        )),
    }
}

fn register(out: *mut *mut TesseraWaveletConfig, op: &str, config: WaveletConfig) -> FfiResult<()> {
    write_out(
        op,
        "out",
        out,
        handle::register(Object::WaveletConfig(Arc::new(config))),
    )
}

/// The spec's exponential windows over the coordinates `mixed_start..mixed_end` of a `dim`-wide
/// embedding: windows from `k_min` doubling up to `k_max` (at most `context`, the longest
/// sequence they are meant for).
///
/// Ownership: `*out` receives a new handle, released with `tessera_wavelet_config_free`.
/// Thread-safety: any thread; a config may be used by several calls at once.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (empty or out-of-range coordinates, windows out of
/// order or range, bad divisor code, NULL `out`). On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_config_new_exponential(
    dim: usize,
    mixed_start: usize,
    mixed_end: usize,
    k_min: usize,
    k_max: usize,
    context: usize,
    divisor_code: i32,
    out: *mut *mut TesseraWaveletConfig,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_config_new_exponential";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let divisor = divisor(OP, divisor_code)?;
        let config = WaveletConfig::exponential(dim, mixed_start..mixed_end, k_min, k_max, context, divisor)?;
        register(out, OP, config)
    })
}

/// The spec's defaults for a `dim`-wide model with context `context`: the first `dim / 2`
/// coordinates mixed, windows from 2 to `context`, divided by the window.
///
/// Ownership: `*out` receives a new handle, released with `tessera_wavelet_config_free`.
/// Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (`dim` below 2,
/// `context` below 2 or above the largest window, NULL `out`). On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_config_new_paper_default(
    dim: usize,
    context: usize,
    out: *mut *mut TesseraWaveletConfig,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_config_new_paper_default";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        register(out, OP, WaveletConfig::paper_default(dim, context)?)
    })
}

/// Explicit windows for the coordinates `first .. first + count` of a `dim`-wide embedding:
/// `windows` points to `count` windows, each from 1 to 2^20; the other coordinates pass through.
///
/// Ownership: `windows` is read during the call only; `*out` receives a new handle, released
/// with `tessera_wavelet_config_free`. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL pointers, `count` 0 or past `dim`, a window
/// out of range, bad divisor code). On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_config_new_windows(
    dim: usize,
    first: usize,
    windows: *const usize,
    count: usize,
    divisor_code: i32,
    out: *mut *mut TesseraWaveletConfig,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_config_new_windows";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let divisor = divisor(OP, divisor_code)?;
        if count == 0 || first.checked_add(count).is_none_or(|end| end > dim) {
            return Err(FfiError::invalid(
                OP,
                "count",
                format!(
                    "1 to {} windows starting at coordinate {first} of {dim}",
                    dim.saturating_sub(first)
                ),
                count,
            ));
        }
        require(OP, "windows", windows)?;
        // SAFETY: non-null, and the caller promises `count` readable windows (header).
        let windows = unsafe { std::slice::from_raw_parts(windows, count) }.to_vec();
        register(out, OP, WaveletConfig::from_windows(dim, first, windows, divisor)?)
    })
}

/// Releases a wavelet config handle. NULL is accepted and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; calls using the
/// config on other threads finish normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live wavelet config.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_config_free(config: *mut TesseraWaveletConfig) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_config_free";
    guard(OP, || handle::release(OP, "config", config, "a wavelet config handle"))
}

/// The embedding width `dim` and the learnable variant's tap count (the sum of the windows);
/// either pointer may be NULL to skip it.
///
/// Ownership: none. Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_config_info(
    config: *const TesseraWaveletConfig,
    dim: *mut usize,
    tap_count: *mut usize,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_config_info";
    guard(OP, || {
        let config = handle::wavelet_config(OP, "config", config)?;
        if !dim.is_null() {
            write_out(OP, "dim", dim, config.dim())?;
        }
        if !tap_count.is_null() {
            write_out(OP, "tap_count", tap_count, config.tap_count())?;
        }
        Ok(())
    })
}

/// `out = wavelet(x + residual)`: the causal multi-scale average of `x` (plus `residual`, which
/// may be NULL, added in f32 on the fly), written into `out`.
///
/// `x`, `residual` and `out` are (batch, seq, dim) with `dim` the config's, batch and seq at
/// least 1, of one dtype (F32, BF16 or F16) and on one device.
/// Ownership: nothing is taken; `out` must not be or overlap an input. Thread-safety: any
/// thread; `out` may not be used by another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, aliasing),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_forward(
    x: *const TesseraTensor,
    residual: *const TesseraTensor,
    config: *const TesseraWaveletConfig,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_forward";
    guard(OP, || {
        let config = handle::wavelet_config(OP, "config", config)?;
        let x = handle::tensor(OP, "x", x)?;
        let residual = (!residual.is_null())
            .then(|| handle::tensor(OP, "residual", residual))
            .transpose()?;
        let out = handle::tensor(OP, "out", out)?;
        let mut inputs = vec![("x", &x)];
        inputs.extend(residual.as_ref().map(|r| ("residual", r)));
        handle::expect_other_handles(OP, "out", &out, &inputs)?;
        let x = handle::read(OP, "x", &x)?;
        let residual = residual.as_ref().map(|r| handle::read(OP, "residual", r)).transpose()?;
        let mut out = handle::write(OP, "out", &out)?;
        let mut others = vec![("x", &*x)];
        others.extend(residual.as_deref().map(|r| ("residual", r)));
        handle::expect_no_overlap(OP, "out", &out, &others)?;
        ops::wavelet_forward_into(&x, residual.as_deref(), &config, &mut out)?;
        Ok(())
    })
}

/// The gradient of `tessera_wavelet_forward` with respect to `x` (and `residual`, the same),
/// written into `d_x`: (batch, seq, dim) like `d_out`, same dtype and device.
///
/// Ownership: nothing is taken; `d_x` must not be or overlap `d_out`. Thread-safety: as
/// `tessera_wavelet_forward`. Errors: as `tessera_wavelet_forward`; on error `d_x` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_backward(
    d_out: *const TesseraTensor,
    config: *const TesseraWaveletConfig,
    d_x: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_backward";
    guard(OP, || {
        let config = handle::wavelet_config(OP, "config", config)?;
        let d_out = handle::tensor(OP, "d_out", d_out)?;
        let d_x = handle::tensor(OP, "d_x", d_x)?;
        handle::expect_other_handles(OP, "d_x", &d_x, &[("d_out", &d_out)])?;
        let d_out = handle::read(OP, "d_out", &d_out)?;
        let mut d_x = handle::write(OP, "d_x", &d_x)?;
        handle::expect_no_overlap(OP, "d_x", &d_x, &[("d_out", &d_out)])?;
        ops::wavelet_backward_into(&d_out, &config, &mut d_x)?;
        Ok(())
    })
}

/// Checks, before any work, that `out` can receive a result of this shape, dtype and device.
pub(crate) fn expect_output(
    op: &str,
    arg: &str,
    out: &Tensor,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> FfiResult<()> {
    if out.shape() != shape || out.dtype() != dtype || out.device() != *device {
        return Err(FfiError::invalid(
            op,
            arg,
            format!("shape {shape:?} of {dtype} on {device}"),
            format!("shape {:?} of {} on {}", out.shape(), out.dtype(), out.device()),
        ));
    }
    Ok(())
}

/// Writes the learnable variant's initial taps (`1/k_i` for each of coordinate `i`'s `k_i`
/// taps) into `taps`: F32, shape (tap_count), on any device.
///
/// Ownership: nothing is taken. Thread-safety: any thread; `taps` may not be used by another
/// call meanwhile. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shape, dtype),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `taps` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_taps_init(
    config: *const TesseraWaveletConfig,
    taps: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_taps_init";
    guard(OP, || {
        let config = handle::wavelet_config(OP, "config", config)?;
        let taps = handle::tensor(OP, "taps", taps)?;
        let mut taps = handle::write(OP, "taps", &taps)?;
        let expected = [config.tap_count()];
        if taps.shape() != expected || taps.dtype() != DType::F32 {
            return Err(FfiError::invalid(
                OP,
                "taps",
                format!("shape {expected:?} of f32"),
                format!("shape {:?} of {}", taps.shape(), taps.dtype()),
            ));
        }
        let initial = ops::wavelet_taps_init(&config, &taps.device())?;
        taps.copy_from(&initial)?;
        Ok(())
    })
}

/// The learnable variant's forward, `out[b,t,i] = Σ_u taps_i[u] · x[b,t-u,i]` for mixed
/// coordinates and `x` for the others, written into `out` (shape, dtype and device of `x`).
/// `taps` is F32 (tap_count) on `x`'s device. The result is computed in tessera's memory and
/// then copied into `out`.
///
/// Ownership: nothing is taken; `out` must not be or overlap an input. Thread-safety: as
/// `tessera_wavelet_forward`. Errors: as `tessera_wavelet_forward`; on error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_learnable_forward(
    x: *const TesseraTensor,
    taps: *const TesseraTensor,
    config: *const TesseraWaveletConfig,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_learnable_forward";
    guard(OP, || {
        let config = handle::wavelet_config(OP, "config", config)?;
        let x = handle::tensor(OP, "x", x)?;
        let taps = handle::tensor(OP, "taps", taps)?;
        let out = handle::tensor(OP, "out", out)?;
        handle::expect_other_handles(OP, "out", &out, &[("x", &x), ("taps", &taps)])?;
        let x = handle::read(OP, "x", &x)?;
        let taps = handle::read(OP, "taps", &taps)?;
        let mut out = handle::write(OP, "out", &out)?;
        handle::expect_no_overlap(OP, "out", &out, &[("x", &x), ("taps", &taps)])?;
        expect_output(OP, "out", &out, x.shape(), x.dtype(), &x.device())?;
        let result = ops::wavelet_learnable_forward(&x, &taps, &config)?;
        out.copy_from(&result)?;
        Ok(())
    })
}

/// The learnable variant's backward: `d_x[s] = Σ_u taps_i[u] · d_out[s+u]` into `d_x` (shape,
/// dtype and device of `d_out`) and the F32 tap gradient into `d_taps` (tap_count, on that
/// device; summed in a fixed order, so deterministic). `x` is the forward's input.
///
/// Ownership: nothing is taken; `d_x` and `d_taps` must be distinct and not overlap the inputs.
/// Thread-safety: as `tessera_wavelet_forward`. Errors: as `tessera_wavelet_forward`; on error
/// neither output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_wavelet_learnable_backward(
    d_out: *const TesseraTensor,
    x: *const TesseraTensor,
    taps: *const TesseraTensor,
    config: *const TesseraWaveletConfig,
    d_x: *mut TesseraTensor,
    d_taps: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_wavelet_learnable_backward";
    guard(OP, || {
        let config = handle::wavelet_config(OP, "config", config)?;
        let d_out = handle::tensor(OP, "d_out", d_out)?;
        let x = handle::tensor(OP, "x", x)?;
        let taps = handle::tensor(OP, "taps", taps)?;
        let d_x = handle::tensor(OP, "d_x", d_x)?;
        let d_taps = handle::tensor(OP, "d_taps", d_taps)?;
        let inputs = [("d_out", &d_out), ("x", &x), ("taps", &taps)];
        handle::expect_other_handles(OP, "d_x", &d_x, &[inputs.as_slice(), &[("d_taps", &d_taps)]].concat())?;
        handle::expect_other_handles(OP, "d_taps", &d_taps, &inputs)?;
        let d_out = handle::read(OP, "d_out", &d_out)?;
        let x = handle::read(OP, "x", &x)?;
        let taps = handle::read(OP, "taps", &taps)?;
        let mut d_x = handle::write(OP, "d_x", &d_x)?;
        let mut d_taps = handle::write(OP, "d_taps", &d_taps)?;
        let inputs = [("d_out", &*d_out), ("x", &*x), ("taps", &*taps)];
        handle::expect_no_overlap(OP, "d_x", &d_x, &[inputs.as_slice(), &[("d_taps", &*d_taps)]].concat())?;
        handle::expect_no_overlap(OP, "d_taps", &d_taps, &inputs)?;
        expect_output(OP, "d_x", &d_x, d_out.shape(), d_out.dtype(), &d_out.device())?;
        expect_output(
            OP,
            "d_taps",
            &d_taps,
            &[config.tap_count()],
            DType::F32,
            &d_out.device(),
        )?;
        let (grad_x, grad_taps) = ops::wavelet_learnable_backward(&d_out, &x, &taps, &config)?;
        d_x.copy_from(&grad_x)?;
        d_taps.copy_from(&grad_taps)?;
        Ok(())
    })
}
