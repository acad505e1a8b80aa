//! Streams. Every op on a device is queued on that device's one stream, in call order, whatever
//! thread calls it; a stream handle names that stream so that C code can wait for tessera's work
//! (before reading or freeing memory a tensor wraps) or order its own CUDA work after it. It adds
//! no concurrency: two stream handles of one device name the same stream.

use crate::device::clear_out;
use crate::handle::{self, Object, TesseraDevice, TesseraStream};
use crate::status::{guard, require, write_out, TesseraStatus};
use std::os::raw::c_void;
use tessera_core::Device;

/// Creates a handle for the stream that ops on `device` run on: the GPU's one stream, or, for the
/// CPU, a stream on which every op has finished when its call returns.
///
/// Ownership: `*out` receives a new handle, released with `tessera_stream_free`; it keeps the
/// device alive. Thread-safety: any thread; a stream handle may be used from several threads.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `out`), `..._INVALID_HANDLE`. On failure
/// `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_stream_new(
    device: *const TesseraDevice,
    out: *mut *mut TesseraStream,
) -> TesseraStatus {
    const OP: &str = "tessera_stream_new";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        write_out(OP, "out", out, handle::register(Object::Stream(device)))
    })
}

/// Waits until all work queued on the stream (by any thread) has finished, and reports an error
/// that work raised; returns at once for the CPU. Wait here before the host reads, or frees,
/// memory that a GPU tensor wraps.
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE`, `TESSERA_STATUS_INVALID_ARGUMENT` (NULL),
/// `TESSERA_STATUS_CUDA` when queued work failed.
#[no_mangle]
pub unsafe extern "C" fn tessera_stream_synchronize(stream: *const TesseraStream) -> TesseraStatus {
    const OP: &str = "tessera_stream_synchronize";
    guard(OP, || Ok(handle::stream(OP, "stream", stream)?.synchronize()?))
}

/// The driver's handle of the stream (a `CUstream`, valid as long as the library is loaded) into
/// `*out`, or NULL for the CPU: C code may queue its own work on it, or record an event on it to
/// wait for tessera's work without blocking the host. It must not be destroyed, nor captured
/// into a CUDA graph.
///
/// Ownership: the CUDA stream stays tessera's. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE`, `TESSERA_STATUS_INVALID_ARGUMENT` (NULL). `*out` is
/// NULL on failure.
#[no_mangle]
pub unsafe extern "C" fn tessera_stream_native(stream: *const TesseraStream, out: *mut *mut c_void) -> TesseraStatus {
    const OP: &str = "tessera_stream_native";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::stream(OP, "stream", stream)?;
        write_out(OP, "out", out, native(&device))
    })
}

fn native(device: &Device) -> *mut c_void {
    match device {
        Device::Cpu => std::ptr::null_mut(),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => backend.stream().cu_stream().cast(),
    }
}

/// Releases a stream handle (the stream itself stays, as the device's). NULL is accepted and
/// does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live stream.
#[no_mangle]
pub unsafe extern "C" fn tessera_stream_free(stream: *mut TesseraStream) -> TesseraStatus {
    const OP: &str = "tessera_stream_free";
    guard(OP, || handle::release(OP, "stream", stream, "a stream handle"))
}
