//! N:M structured sparsity: magnitude pruning, the 2:4 compressed format of the sparse tensor
//! cores as a handle, and the sparse linear layer with SLoPe's double-pruned backward.

use crate::device::clear_out;
use crate::handle::{self, Object, TesseraSparse24, TesseraTensor};
use crate::status::{guard, write_out, FfiResult, TesseraStatus};
use crate::tensor::dtype_code;
use crate::wavelet::expect_output;
use std::sync::Arc;
use tessera_core::ops::{self, NmPattern, Sparse24};
use tessera_core::DType;

fn pattern(n: usize, m: usize) -> FfiResult<NmPattern> {
    Ok(NmPattern::new(n, m)?)
}

fn register(out: *mut *mut TesseraSparse24, op: &str, matrix: Sparse24) -> FfiResult<()> {
    write_out(op, "out", out, handle::register(Object::Sparse24(Arc::new(matrix))))
}

/// `w` (rows, cols) pruned N:M along each row into `out` (same shape, dtype and device): in every
/// group of `m` consecutive elements the `n` of largest magnitude are kept (ties to the lower
/// index), the others set to 0. Any `1 <= n <= m <= 64` with `m` dividing `cols` on the CPU; 2:4
/// and 1:2 on a GPU.
///
/// Ownership: nothing is taken; `out` must not be or overlap `w`. Thread-safety: any thread;
/// `out` may not be used by another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (pattern, shapes, dtypes, devices, aliasing),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_nm_prune(
    w: *const TesseraTensor,
    n: usize,
    m: usize,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_nm_prune";
    guard(OP, || {
        let pattern = pattern(n, m)?;
        let w = handle::tensor(OP, "w", w)?;
        let out = handle::tensor(OP, "out", out)?;
        handle::expect_other_handles(OP, "out", &out, &[("w", &w)])?;
        let w = handle::read(OP, "w", &w)?;
        let mut out = handle::write(OP, "out", &out)?;
        handle::expect_no_overlap(OP, "out", &out, &[("w", &w)])?;
        expect_output(OP, "out", &out, w.shape(), w.dtype(), &w.device())?;
        out.copy_from(&ops::nm_prune(&w, pattern)?)?;
        Ok(())
    })
}

/// Prunes `w` (rows, cols: rows a multiple of 16, cols of 64) by magnitude with the pattern `n:m`
/// (2:4 or 1:2) and compresses it into a new 2:4 matrix (F32, BF16 or F16 on the CPU; BF16 or F16
/// on a GPU), on `w`'s device. The kept positions are those the magnitudes chose, even where a
/// kept value is 0.
///
/// Ownership: `*out` receives a new handle, released with `tessera_sparse24_free`.
/// Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (pattern, shape, dtype,
/// NULL `out`), `..._INVALID_HANDLE`, `..._BUSY` (`w` being written), `..._CUDA`. On failure
/// `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse24_prune_compress(
    w: *const TesseraTensor,
    n: usize,
    m: usize,
    out: *mut *mut TesseraSparse24,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse24_prune_compress";
    clear_out(out);
    guard(OP, || {
        crate::status::require(OP, "out", out)?;
        let pattern = pattern(n, m)?;
        let w = handle::tensor(OP, "w", w)?;
        let w = handle::read(OP, "w", &w)?;
        register(out, OP, ops::sparse24_prune_compress(&w, pattern)?)
    })
}

/// Compresses `w`, which must already be 2:4-sparse (at most 2 non-zeros in each group of 4
/// columns; the message names the first group that is not), into a new 2:4 matrix. Shapes and
/// dtypes as `tessera_sparse24_prune_compress`.
///
/// Ownership: `*out` receives a new handle, released with `tessera_sparse24_free`.
/// Thread-safety: any thread. Errors: as `tessera_sparse24_prune_compress`. On failure `*out` is
/// NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse24_compress(
    w: *const TesseraTensor,
    out: *mut *mut TesseraSparse24,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse24_compress";
    clear_out(out);
    guard(OP, || {
        crate::status::require(OP, "out", out)?;
        let w = handle::tensor(OP, "w", w)?;
        let w = handle::read(OP, "w", &w)?;
        register(out, OP, ops::sparse24_compress(&w)?)
    })
}

/// SLoPe's double-pruned transpose of `s` (rows, cols; rows a multiple of 64 too): a new 2:4
/// matrix (cols, rows), the transpose of `s` pruned 2:4 by magnitude along its rows. The sparse
/// linear backward takes it; make it again whenever the weight changes.
///
/// Ownership: `*out` receives a new handle, released with `tessera_sparse24_free`.
/// Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (rows not a multiple of
/// 64, NULL `out`), `..._INVALID_HANDLE`, `..._CUDA`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse24_double_prune(
    s: *const TesseraSparse24,
    out: *mut *mut TesseraSparse24,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse24_double_prune";
    clear_out(out);
    guard(OP, || {
        crate::status::require(OP, "out", out)?;
        let s = handle::sparse24(OP, "s", s)?;
        register(out, OP, ops::sparse24_double_prune(&s)?)
    })
}

/// Releases a 2:4 matrix handle. NULL is accepted and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; calls using the
/// matrix on other threads finish normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live 2:4 matrix.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse24_free(s: *mut TesseraSparse24) -> TesseraStatus {
    const OP: &str = "tessera_sparse24_free";
    guard(OP, || handle::release(OP, "s", s, "a sparse 2:4 matrix handle"))
}

/// The dense shape (`rows`, `cols`) and the `TesseraDtype` code of a 2:4 matrix; any pointer may
/// be NULL to skip it.
///
/// Ownership: none. Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse24_info(
    s: *const TesseraSparse24,
    rows: *mut usize,
    cols: *mut usize,
    dtype: *mut i32,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse24_info";
    guard(OP, || {
        let s = handle::sparse24(OP, "s", s)?;
        if !rows.is_null() {
            write_out(OP, "rows", rows, s.rows())?;
        }
        if !cols.is_null() {
            write_out(OP, "cols", cols, s.cols())?;
        }
        if !dtype.is_null() {
            write_out(OP, "dtype", dtype, dtype_code(s.dtype()) as i32)?;
        }
        Ok(())
    })
}

/// The dense matrix of `s` into `out`: (rows, cols) of its dtype on its device, the kept values
/// in place and zeros elsewhere.
///
/// Ownership: nothing is taken. Thread-safety: any thread; `out` may not be used by another call
/// meanwhile. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shape, dtype, device),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse24_decompress(
    s: *const TesseraSparse24,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse24_decompress";
    guard(OP, || {
        let s = handle::sparse24(OP, "s", s)?;
        let out = handle::tensor(OP, "out", out)?;
        let mut out = handle::write(OP, "out", &out)?;
        expect_output(OP, "out", &out, &[s.rows(), s.cols()], s.dtype(), &s.device())?;
        out.copy_from(&ops::sparse24_decompress(&s)?)?;
        Ok(())
    })
}

/// The sparse linear layer `y = x·wᵀ + bias` with `w` a 2:4 matrix (out features, in features):
/// `x` (tokens, in features), `bias` (out features; may be NULL), `y` (tokens, out features),
/// all of `w`'s dtype and on its device; f32 accumulation (sparse tensor cores on a GPU).
///
/// Ownership: nothing is taken; `y` must not be or overlap an input. Thread-safety: any thread;
/// `y` may not be used by another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, aliasing),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `y` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse_linear_forward(
    x: *const TesseraTensor,
    w: *const TesseraSparse24,
    bias: *const TesseraTensor,
    y: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse_linear_forward";
    guard(OP, || {
        let w = handle::sparse24(OP, "w", w)?;
        let x = handle::tensor(OP, "x", x)?;
        let bias = (!bias.is_null())
            .then(|| handle::tensor(OP, "bias", bias))
            .transpose()?;
        let y = handle::tensor(OP, "y", y)?;
        let mut inputs = vec![("x", &x)];
        inputs.extend(bias.as_ref().map(|b| ("bias", b)));
        handle::expect_other_handles(OP, "y", &y, &inputs)?;
        let x = handle::read(OP, "x", &x)?;
        let bias = bias.as_ref().map(|b| handle::read(OP, "bias", b)).transpose()?;
        let mut y = handle::write(OP, "y", &y)?;
        let mut others = vec![("x", &*x)];
        others.extend(bias.as_deref().map(|b| ("bias", b)));
        handle::expect_no_overlap(OP, "y", &y, &others)?;
        ops::sparse_linear_forward_into(&x, &w, bias.as_deref(), &mut y)?;
        Ok(())
    })
}

/// SLoPe's backward of `tessera_sparse_linear_forward`: `d_x = dy·W_dp` through `w_dp_t`
/// (`tessera_sparse24_double_prune` of `w`) into `d_x` (tokens, in features; `dy`'s dtype);
/// `dy`ᵀ·`x` at the kept positions of `w`, in the layout of its compressed values, into
/// `d_values` (F32, (out features, in features / 2)); and the column sums of `dy` into `d_bias`
/// (F32, out features; NULL skips it). `dy` is (tokens, out features), `x` the forward's input.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs.
/// Thread-safety: as `tessera_sparse_linear_forward`. Errors: as
/// `tessera_sparse_linear_forward`, and `TESSERA_STATUS_INVALID_ARGUMENT` when `w_dp_t` is not
/// shaped as `w`'s transpose. On error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_sparse_linear_backward(
    dy: *const TesseraTensor,
    x: *const TesseraTensor,
    w: *const TesseraSparse24,
    w_dp_t: *const TesseraSparse24,
    d_x: *mut TesseraTensor,
    d_values: *mut TesseraTensor,
    d_bias: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_sparse_linear_backward";
    guard(OP, || {
        let w = handle::sparse24(OP, "w", w)?;
        let w_dp_t = handle::sparse24(OP, "w_dp_t", w_dp_t)?;
        let dy = handle::tensor(OP, "dy", dy)?;
        let x = handle::tensor(OP, "x", x)?;
        let d_x = handle::tensor(OP, "d_x", d_x)?;
        let d_values = handle::tensor(OP, "d_values", d_values)?;
        let d_bias = (!d_bias.is_null())
            .then(|| handle::tensor(OP, "d_bias", d_bias))
            .transpose()?;
        let inputs = [("dy", &dy), ("x", &x)];
        let mut later = vec![("d_values", &d_values)];
        later.extend(d_bias.as_ref().map(|b| ("d_bias", b)));
        handle::expect_other_handles(OP, "d_x", &d_x, &[inputs.as_slice(), &later].concat())?;
        let mut after_values = inputs.to_vec();
        after_values.extend(d_bias.as_ref().map(|b| ("d_bias", b)));
        handle::expect_other_handles(OP, "d_values", &d_values, &after_values)?;
        if let Some(d_bias) = &d_bias {
            handle::expect_other_handles(OP, "d_bias", d_bias, &inputs)?;
        }
        let dy = handle::read(OP, "dy", &dy)?;
        let x = handle::read(OP, "x", &x)?;
        let mut d_x = handle::write(OP, "d_x", &d_x)?;
        let mut d_values = handle::write(OP, "d_values", &d_values)?;
        let mut d_bias = d_bias.as_ref().map(|b| handle::write(OP, "d_bias", b)).transpose()?;
        let inputs = [("dy", &*dy), ("x", &*x)];
        let mut later = vec![("d_values", &*d_values)];
        later.extend(d_bias.as_deref().map(|b| ("d_bias", b)));
        handle::expect_no_overlap(OP, "d_x", &d_x, &[inputs.as_slice(), &later].concat())?;
        let mut after_values = inputs.to_vec();
        after_values.extend(d_bias.as_deref().map(|b| ("d_bias", b)));
        handle::expect_no_overlap(OP, "d_values", &d_values, &after_values)?;
        if let Some(d_bias) = &d_bias {
            handle::expect_no_overlap(OP, "d_bias", d_bias, &inputs)?;
        }
        let rows = dy.shape().first().copied().unwrap_or(0);
        let device = dy.device();
        expect_output(OP, "d_x", &d_x, &[rows, w.cols()], dy.dtype(), &device)?;
        expect_output(
            OP,
            "d_values",
            &d_values,
            &[w.rows(), w.cols() / 2],
            DType::F32,
            &device,
        )?;
        if let Some(d_bias) = &d_bias {
            expect_output(OP, "d_bias", d_bias, &[w.rows()], DType::F32, &device)?;
        }
        let grads = ops::sparse_linear_backward(&dy, &x, &w, &w_dp_t, d_bias.is_some())?;
        d_x.copy_from(&grads.d_x)?;
        d_values.copy_from(&grads.d_values)?;
        if let (Some(out), Some(grad)) = (&mut d_bias, &grads.d_bias) {
            out.copy_from(grad)?;
        }
        Ok(())
    })
}
