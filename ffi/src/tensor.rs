//! Tensors: created by tessera (zeros, or a copy of host data) or wrapping caller-owned host
//! memory without a copy; copies in and out; metadata.

use crate::device::clear_out;
use crate::handle::{self, Object, TesseraDevice, TesseraTensor};
use crate::status::{guard, require, write_out, FfiError, FfiResult, TesseraStatus};
use crate::TESSERA_MAX_RANK;
use std::os::raw::c_void;
use std::sync::{Arc, RwLock};
use tessera_core::{DType, Tensor};

/// Element type codes, as `int32_t dtype` arguments take them and `tessera_tensor_dtype` gives
/// them.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraDtype {
    F32 = 0,
    BF16 = 1,
    F16 = 2,
    U8 = 3,
    U16 = 4,
    U32 = 5,
}

pub(crate) fn dtype_from_code(op: &str, arg: &str, code: i32) -> FfiResult<DType> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::BF16,
        2 => DType::F16,
        3 => DType::U8,
        4 => DType::U16,
        5 => DType::U32,
        other => {
            return Err(FfiError::invalid(
                op,
                arg,
                "a TesseraDtype code from 0 (F32) to 5 (U32)",
                other,
            ))
        }
    })
}

pub(crate) fn dtype_code(dtype: DType) -> TesseraDtype {
    match dtype {
        DType::F32 => TesseraDtype::F32,
        DType::BF16 => TesseraDtype::BF16,
        DType::F16 => TesseraDtype::F16,
        DType::U8 => TesseraDtype::U8,
        DType::U16 => TesseraDtype::U16,
        DType::U32 => TesseraDtype::U32,
    }
}

/// Reads `rank` dimensions from `shape` (which may be NULL only when `rank` is 0).
fn read_shape(op: &str, shape: *const usize, rank: usize) -> FfiResult<Vec<usize>> {
    if rank > TESSERA_MAX_RANK {
        return Err(FfiError::invalid(
            op,
            "rank",
            format!("at most TESSERA_MAX_RANK = {TESSERA_MAX_RANK}"),
            rank,
        ));
    }
    if rank == 0 {
        return Ok(Vec::new());
    }
    require(op, "shape", shape)?;
    // SAFETY: non-null, and the caller promises `rank` readable elements (header).
    Ok(unsafe { std::slice::from_raw_parts(shape, rank) }.to_vec())
}

/// Checks caller strides (in elements, NULL for row-major contiguous) against the row-major
/// contiguous layout that tessera tensors have. Dimensions of size 1 may have any stride, and
/// an empty tensor any strides, as no element's address depends on them.
fn check_strides(op: &str, shape: &[usize], strides: *const i64) -> FfiResult<()> {
    if strides.is_null() || shape.contains(&0) {
        return Ok(());
    }
    // SAFETY: non-null, and the caller promises `rank` readable elements (header).
    let strides = unsafe { std::slice::from_raw_parts(strides, shape.len()) };
    let mut expected = vec![0i64; shape.len()];
    let mut step = 1i64;
    for axis in (0..shape.len()).rev() {
        expected[axis] = step;
        step = step.saturating_mul(i64::try_from(shape[axis]).unwrap_or(i64::MAX));
    }
    let contiguous = shape
        .iter()
        .zip(strides.iter().zip(&expected))
        .all(|(&dim, (&got, &want))| dim == 1 || got == want);
    if contiguous {
        Ok(())
    } else {
        Err(FfiError::with_status(
            TesseraStatus::Unsupported,
            format!(
                "{op}: argument `strides`: expected row-major contiguous strides {expected:?} for shape {shape:?} \
                 (tessera tensors are contiguous; copy the data into a contiguous buffer first), got {strides:?}"
            ),
        ))
    }
}

fn register(tensor: Tensor) -> *mut TesseraTensor {
    handle::register(Object::Tensor(Arc::new(RwLock::new(tensor))))
}

/// Creates a tensor of zeros of the given dtype and shape on a device.
///
/// `shape` points to `rank` dimensions (NULL when `rank` is 0: a scalar); `rank` is at most
/// `TESSERA_MAX_RANK`; a dimension may be 0.
/// Ownership: `*out` receives a new handle, released with `tessera_tensor_free`; tessera owns the
/// memory. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL pointer, bad dtype code, rank, a size that
/// overflows or does not fit in memory), `TESSERA_STATUS_INVALID_HANDLE`, `TESSERA_STATUS_CUDA`.
/// On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_new_zeros(
    device: *const TesseraDevice,
    dtype: i32,
    shape: *const usize,
    rank: usize,
    out: *mut *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_new_zeros";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let dtype = dtype_from_code(OP, "dtype", dtype)?;
        let shape = read_shape(OP, shape, rank)?;
        let tensor = Tensor::zeros(&shape, dtype, &device)?;
        write_out(OP, "out", out, register(tensor))
    })
}

/// Creates a tensor on a device holding a copy of `bytes` bytes of host memory at `data`, which
/// must be exactly the byte size of the shape in the dtype (row-major, contiguous) and aligned to
/// the dtype's size.
///
/// Ownership: `data` is only read, during the call; `*out` receives a new handle, released with
/// `tessera_tensor_free`. Thread-safety: any thread.
/// Errors: as `tessera_tensor_new_zeros`, and `TESSERA_STATUS_INVALID_ARGUMENT` when `bytes` does
/// not match, `data` is misaligned, or `data` is NULL (allowed only for 0 bytes). On failure
/// `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_new_from_host(
    device: *const TesseraDevice,
    dtype: i32,
    shape: *const usize,
    rank: usize,
    data: *const c_void,
    bytes: usize,
    out: *mut *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_new_from_host";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let dtype = dtype_from_code(OP, "dtype", dtype)?;
        let shape = read_shape(OP, shape, rank)?;
        let mut tensor = Tensor::zeros(&shape, dtype, &device)?;
        copy_in(OP, &mut tensor, data, bytes)?;
        write_out(OP, "out", out, register(tensor))
    })
}

/// Creates a CPU tensor over caller-owned host memory, without copying it: ops read and write
/// the `bytes` bytes at `data` in place.
///
/// `data` must be aligned to the dtype's size and `bytes` must equal the shape's byte size.
/// `strides` (in elements, `rank` of them) may be NULL for row-major contiguous; otherwise they
/// must describe that layout (a dimension of size 1 may have any stride), since tessera tensors
/// are contiguous.
/// Ownership: the caller keeps ownership of the memory and must keep it valid, and not touch it
/// while a tessera call uses the tensor, until `tessera_tensor_free` has returned (and any call
/// still using the tensor on another thread has returned). Freeing the handle never frees the
/// memory. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `data` for a non-empty shape, misaligned
/// `data`, `bytes` mismatch, bad dtype code or rank); `TESSERA_STATUS_UNSUPPORTED` for strides
/// that are not row-major contiguous. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_wrap_host(
    data: *mut c_void,
    bytes: usize,
    dtype: i32,
    shape: *const usize,
    rank: usize,
    strides: *const i64,
    out: *mut *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_wrap_host";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let dtype = dtype_from_code(OP, "dtype", dtype)?;
        let shape = read_shape(OP, shape, rank)?;
        check_strides(OP, &shape, strides)?;
        // SAFETY: the caller's promise above (valid, untouched during calls, until freed) is
        // exactly what from_host_ptr requires; it checks size, alignment and NULL itself.
        let tensor = unsafe { Tensor::from_host_ptr(data.cast(), bytes, &shape, dtype) }.map_err(rename(OP))?;
        write_out(OP, "out", out, register(tensor))
    })
}

/// Creates a tensor over caller-owned CUDA device memory, without copying it: ops on `device`
/// read and write the `bytes` bytes at device address `data` in place.
///
/// `bytes` must equal the shape's byte size; `data` must be aligned to `TESSERA_DEVICE_ALIGNMENT`
/// (256) bytes, as `cudaMalloc` returns, because kernels access tensors with vector loads;
/// `strides` (in elements, `rank` of them) may be NULL for row-major contiguous, and otherwise
/// must describe that layout (a dimension of size 1 may have any stride). `device` must be a CUDA
/// device, and the driver must report `data .. data + bytes` as device (or managed) memory of that
/// GPU in one allocation (`cuPointerGetAttribute`); memory of another GPU, host memory (pinned or
/// not) and addresses CUDA does not know are refused. An empty shape needs no memory.
/// Ops queue their work on the device's stream (see `tessera_stream_new`), which does not wait
/// for other streams: finish writing the memory (synchronise your stream) before a tessera call
/// reads it, and call `tessera_stream_synchronize` before the host or another stream reads it,
/// or frees it, after one.
/// Ownership: the caller keeps ownership of the memory and must keep it allocated, and not touch
/// it while tessera's queued work uses it, until `tessera_tensor_free` has returned and the
/// stream has been synchronised. Freeing the handle never frees the memory. Thread-safety: any
/// thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `data` for a non-empty shape, misalignment,
/// `bytes` mismatch, a range that is not device memory of `device` or leaves its allocation, a CPU
/// device, bad dtype code or rank), `..._INVALID_HANDLE`, `..._CUDA`; `..._UNSUPPORTED` for
/// strides that are not row-major contiguous. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_wrap_device(
    device: *const TesseraDevice,
    data: *mut c_void,
    bytes: usize,
    dtype: i32,
    shape: *const usize,
    rank: usize,
    strides: *const i64,
    out: *mut *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_wrap_device";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let dtype = dtype_from_code(OP, "dtype", dtype)?;
        let shape = read_shape(OP, shape, rank)?;
        check_strides(OP, &shape, strides)?;
        // SAFETY: the caller's promise above (allocated, untouched while queued work uses it,
        // until freed and synchronised) is what from_device_ptr requires; it checks the rest.
        let tensor = unsafe { Tensor::from_device_ptr(&device, data as u64, bytes, &shape, dtype) }
            .map_err(rename(OP))
            .map_err(|mut e| {
                e.message = e.message.replace("Tensor::from_host_ptr", "tessera_tensor_wrap_host");
                e
            })?;
        write_out(OP, "out", out, register(tensor))
    })
}

/// Releases a tensor handle and, for a tensor tessera created, its memory (wrapped caller
/// memory is left alone). NULL is accepted and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; a call using the
/// tensor on another thread at the same time finishes first, and the memory is released then.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live tensor handle (freed
/// already, for instance); nothing is released then.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_free(tensor: *mut TesseraTensor) -> TesseraStatus {
    const OP: &str = "tessera_tensor_free";
    guard(OP, || handle::release(OP, "tensor", tensor, "a tensor handle"))
}

/// Puts the C function's name in place of the Rust one (`Tensor::from_host_ptr`, ...) in argument
/// errors, so that the message names what the caller called.
fn rename(op: &'static str) -> impl Fn(tessera_core::Error) -> FfiError {
    move |error| {
        let mut error = FfiError::from(error);
        if error.status == TesseraStatus::InvalidArgument {
            if let Some((_, rest)) = error.message.split_once(": ") {
                error.message = format!("{op}: {rest}");
            }
        }
        error
    }
}

/// Copies `bytes` of host memory at `data` into `tensor` (any device), after checking the size
/// and that the memory is not the tensor's own.
fn copy_in(op: &'static str, tensor: &mut Tensor, data: *const c_void, bytes: usize) -> FfiResult<()> {
    expect_bytes(op, tensor, bytes)?;
    if bytes > 0 {
        require(op, "data", data)?;
    }
    // SAFETY: the caller promises `bytes` readable bytes at `data` for the call (header); the
    // wrapping tensor is only read (it is the copy's source), and dropped before returning.
    // from_host_ptr checks alignment; an unaligned buffer is refused rather than copied.
    let source = unsafe { Tensor::from_host_ptr(data.cast_mut().cast(), bytes, tensor.shape(), tensor.dtype()) }
        .map_err(rename(op))?;
    handle::expect_no_overlap(op, "data", tensor, &[("tensor", &source)])?;
    tensor.copy_from(&source).map_err(rename(op))
}

fn expect_bytes(op: &str, tensor: &Tensor, bytes: usize) -> FfiResult<()> {
    if bytes == tensor.size_in_bytes() {
        Ok(())
    } else {
        Err(FfiError::invalid(
            op,
            "bytes",
            format!(
                "{} bytes for shape {:?} of {}",
                tensor.size_in_bytes(),
                tensor.shape(),
                tensor.dtype()
            ),
            format!("{bytes} bytes"),
        ))
    }
}

/// Copies a tensor's data (from any device) into `bytes` bytes of host memory at `data`, which
/// must be exactly the tensor's byte size and aligned to its dtype's size. Waits for queued GPU
/// work, so the data is there when the call returns.
///
/// Ownership: `data` stays the caller's; written during the call only.
/// Thread-safety: any thread; other calls may read the tensor at the same time.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL, size or alignment), `..._INVALID_HANDLE`,
/// `..._BUSY` (being written by another call), `..._CUDA`.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_copy_to_host(
    tensor: *const TesseraTensor,
    data: *mut c_void,
    bytes: usize,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_copy_to_host";
    guard(OP, || {
        let shared = handle::tensor(OP, "tensor", tensor)?;
        let tensor = handle::read(OP, "tensor", &shared)?;
        expect_bytes(OP, &tensor, bytes)?;
        if bytes > 0 {
            require(OP, "data", data)?;
        }
        // SAFETY: the caller promises `bytes` writable bytes at `data`, used by nothing else
        // during the call (header); the wrapper is dropped before returning.
        let mut destination =
            unsafe { Tensor::from_host_ptr(data.cast(), bytes, tensor.shape(), tensor.dtype()) }.map_err(rename(OP))?;
        handle::expect_no_overlap(OP, "data", &destination, &[("tensor", &tensor)])?;
        destination.copy_from(&tensor).map_err(rename(OP))
    })
}

/// Copies `bytes` bytes of host memory at `data` into a tensor (on any device); `bytes` must be
/// exactly the tensor's byte size and `data` aligned to its dtype's size.
///
/// Ownership: `data` stays the caller's; read during the call only.
/// Thread-safety: any thread; fails with `TESSERA_STATUS_BUSY` while another call uses the
/// tensor.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL, size, alignment, or `data` inside the
/// tensor's own memory), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_copy_from_host(
    tensor: *mut TesseraTensor,
    data: *const c_void,
    bytes: usize,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_copy_from_host";
    guard(OP, || {
        let shared = handle::tensor(OP, "tensor", tensor)?;
        let mut tensor = handle::write(OP, "tensor", &shared)?;
        copy_in(OP, &mut tensor, data, bytes)
    })
}

/// Creates a copy of a tensor on another (or the same) device.
///
/// Ownership: `*out` receives a new handle, released with `tessera_tensor_free`.
/// Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_ARGUMENT`, `..._INVALID_HANDLE`,
/// `..._BUSY`, `..._CUDA`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_to_device(
    tensor: *const TesseraTensor,
    device: *const TesseraDevice,
    out: *mut *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_to_device";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let shared = handle::tensor(OP, "tensor", tensor)?;
        let device = handle::device(OP, "device", device)?;
        let copy = handle::read(OP, "tensor", &shared)?.to_device(&device)?;
        write_out(OP, "out", out, register(copy))
    })
}

/// Runs `read` on a tensor's metadata (shape, dtype and device never change after creation).
fn with_tensor(op: &str, tensor: *const TesseraTensor, read: impl FnOnce(&Tensor) -> FfiResult<()>) -> FfiResult<()> {
    let shared = handle::tensor(op, "tensor", tensor)?;
    let tensor = handle::read(op, "tensor", &shared)?;
    read(&tensor)
}

/// The tensor's element type as a `TesseraDtype` code.
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `out`), `..._INVALID_HANDLE`, `..._BUSY`.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_dtype(tensor: *const TesseraTensor, out: *mut i32) -> TesseraStatus {
    const OP: &str = "tessera_tensor_dtype";
    guard(OP, || {
        with_tensor(OP, tensor, |t| write_out(OP, "out", out, dtype_code(t.dtype()) as i32))
    })
}

/// The tensor's rank (number of dimensions).
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `out`), `..._INVALID_HANDLE`, `..._BUSY`.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_rank(tensor: *const TesseraTensor, out: *mut usize) -> TesseraStatus {
    const OP: &str = "tessera_tensor_rank";
    guard(OP, || {
        with_tensor(OP, tensor, |t| write_out(OP, "out", out, t.shape().len()))
    })
}

/// Writes the tensor's dimensions, outermost first, to `dims`, which has room for `capacity`
/// of them (at least the rank; `TESSERA_MAX_RANK` always suffices).
///
/// Ownership: `dims` stays the caller's. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `dims` for a non-scalar, `capacity` below
/// the rank), `..._INVALID_HANDLE`, `..._BUSY`.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_shape(
    tensor: *const TesseraTensor,
    dims: *mut usize,
    capacity: usize,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_shape";
    guard(OP, || {
        with_tensor(OP, tensor, |t| {
            let shape = t.shape();
            if capacity < shape.len() {
                return Err(FfiError::invalid(
                    OP,
                    "capacity",
                    format!("room for the rank, {}", shape.len()),
                    capacity,
                ));
            }
            if shape.is_empty() {
                return Ok(());
            }
            require(OP, "dims", dims)?;
            // SAFETY: non-null with room for `capacity` >= rank elements (header).
            unsafe { std::ptr::copy_nonoverlapping(shape.as_ptr(), dims, shape.len()) };
            Ok(())
        })
    })
}

/// The tensor's element count and its size in bytes (either pointer may be NULL to skip it).
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE`, `..._BUSY`.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_size(
    tensor: *const TesseraTensor,
    numel: *mut usize,
    bytes: *mut usize,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_size";
    guard(OP, || {
        with_tensor(OP, tensor, |t| {
            if !numel.is_null() {
                write_out(OP, "numel", numel, t.numel())?;
            }
            if !bytes.is_null() {
                write_out(OP, "bytes", bytes, t.size_in_bytes())?;
            }
            Ok(())
        })
    })
}

/// A new handle for the device that holds the tensor.
///
/// Ownership: `*out` receives a new handle, released with `tessera_device_free`.
/// Thread-safety: any thread. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `out`),
/// `..._INVALID_HANDLE`, `..._BUSY`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_tensor_device(
    tensor: *const TesseraTensor,
    out: *mut *mut TesseraDevice,
) -> TesseraStatus {
    const OP: &str = "tessera_tensor_device";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        with_tensor(OP, tensor, |t| {
            write_out(OP, "out", out, handle::register(Object::Device(t.device())))
        })
    })
}
