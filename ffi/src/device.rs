//! Devices: the CPU, or a CUDA GPU with its context and stream.

use crate::handle::{self, Object, TesseraDevice};
use crate::status::{guard, write_out, TesseraStatus};
use tessera_core::Device;

/// Writes NULL through a handle out-pointer before any work, so that it is NULL on failure.
pub(crate) fn clear_out<H>(out: *mut *mut H) {
    if !out.is_null() {
        // SAFETY: non-null; the caller promises a writable `H*` slot (header).
        unsafe { out.write(std::ptr::null_mut()) };
    }
}

/// Creates a handle for the host CPU.
///
/// Ownership: `*out` receives a new handle, released with `tessera_device_free`.
/// Thread-safety: any thread; a device handle may be used from several threads at once.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` when `out` is NULL. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_device_new_cpu(out: *mut *mut TesseraDevice) -> TesseraStatus {
    const OP: &str = "tessera_device_new_cpu";
    clear_out(out);
    guard(OP, || {
        crate::status::require(OP, "out", out)?;
        write_out(OP, "out", out, handle::register(Object::Device(Device::Cpu)))
    })
}

/// Creates a handle for the CUDA GPU with the given ordinal. Two handles for one ordinal share
/// one CUDA context, stream and set of loaded kernels.
///
/// Ownership: `*out` receives a new handle, released with `tessera_device_free`.
/// Thread-safety: any thread; a device handle may be used from several threads at once, and ops
/// on one GPU run in call order on its one stream.
/// Errors: `TESSERA_STATUS_NO_CUDA` with the reason (library built without CUDA, no driver, no
/// GPU, ordinal out of range); `TESSERA_STATUS_INVALID_ARGUMENT` when `out` is NULL. On failure
/// `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_device_new_cuda(ordinal: usize, out: *mut *mut TesseraDevice) -> TesseraStatus {
    const OP: &str = "tessera_device_new_cuda";
    clear_out(out);
    guard(OP, || {
        crate::status::require(OP, "out", out)?;
        let device = Device::cuda(ordinal)?;
        write_out(OP, "out", out, handle::register(Object::Device(device)))
    })
}

/// Releases a device handle. NULL is accepted and does nothing. Tensors created on the device
/// stay valid: they keep the device alive.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; a call using the
/// device on another thread at the same time finishes normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live device handle (freed
/// already, for instance); nothing is released then.
#[no_mangle]
pub unsafe extern "C" fn tessera_device_free(device: *mut TesseraDevice) -> TesseraStatus {
    const OP: &str = "tessera_device_free";
    guard(OP, || handle::release(OP, "device", device, "a device handle"))
}

/// The number of CUDA GPUs tessera can use: 0 when the library was built without CUDA, or
/// there is no driver or no GPU.
///
/// Ownership: none. Thread-safety: any thread. Errors: none (0 on any failure).
#[no_mangle]
pub extern "C" fn tessera_device_cuda_count() -> usize {
    let mut count = 0;
    guard("tessera_device_cuda_count", || {
        count = Device::cuda_device_count();
        Ok(())
    });
    count
}

/// Whether a device is a CUDA GPU (`*out = true`) or the CPU (`false`).
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live device handle,
/// `TESSERA_STATUS_INVALID_ARGUMENT` when a pointer is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_device_is_cuda(device: *const TesseraDevice, out: *mut bool) -> TesseraStatus {
    const OP: &str = "tessera_device_is_cuda";
    guard(OP, || {
        let device = handle::device(OP, "device", device)?;
        write_out(OP, "out", out, device.is_cuda())
    })
}

/// Waits until all work queued on the device has finished, and reports an error that work
/// raised. Returns at once for the CPU, whose ops finish before they return.
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE`; `TESSERA_STATUS_CUDA` when queued work failed.
#[no_mangle]
pub unsafe extern "C" fn tessera_device_synchronize(device: *const TesseraDevice) -> TesseraStatus {
    const OP: &str = "tessera_device_synchronize";
    guard(OP, || Ok(handle::device(OP, "device", device)?.synchronize()?))
}
