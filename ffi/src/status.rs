//! Status codes, the thread-local error message, and the guard every exported function runs in.

use std::cell::RefCell;
use std::ffi::CString;
use std::fmt;
use std::os::raw::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a call returns: `TESSERA_STATUS_OK` (0) or the kind of failure, with a readable message
/// from `tessera_last_error()`.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraStatus {
    /// Success.
    Ok = 0,
    /// An argument cannot be accepted: NULL where a pointer is required, a size, shape, dtype
    /// code, device or value out of range. Nothing was written.
    InvalidArgument = 1,
    /// A handle that is not live: freed already, never returned by tessera, or of another kind
    /// (a tensor handle where a device handle belongs).
    InvalidHandle = 2,
    /// A CUDA device was asked for and cannot be had (no `cuda` build, no driver, no GPU, or the
    /// ordinal is out of range); the message says which.
    NoCuda = 3,
    /// A CUDA driver, cuBLASLt or kernel-loading call failed.
    Cuda = 4,
    /// The operation exists but not for this combination (device, dtype, strides).
    Unsupported = 5,
    /// A tensor is being written by a call on another thread, or read by one while this call
    /// would write it. Nothing was done; retry once that call has returned.
    Busy = 6,
    /// A defect inside tessera (a caught panic). The library stays usable; please report it.
    Internal = 7,
    /// A file could not be read or written, or is not what it claims to be (a truncated or
    /// corrupt checkpoint, a missing tensor, a shape that does not match).
    File = 8,
    /// Training stopped because the loss or the gradients stopped being finite numbers.
    Diverged = 9,
}

/// A failure on its way to the caller: the status code and the message for `tessera_last_error`.
#[derive(Debug)]
pub struct FfiError {
    pub status: TesseraStatus,
    pub message: String,
}

pub type FfiResult<T> = Result<T, FfiError>;

impl FfiError {
    /// An argument error, worded as the Rust crate words its own:
    /// `{op}: argument `{arg}`: expected {expected}, got {got}`.
    pub fn invalid(op: &str, arg: &str, expected: impl fmt::Display, got: impl fmt::Display) -> FfiError {
        FfiError {
            status: TesseraStatus::InvalidArgument,
            message: format!("{op}: argument `{arg}`: expected {expected}, got {got}"),
        }
    }

    /// A handle that is not live or not of the expected kind.
    pub fn handle(op: &str, arg: &str, expected: &str, got: impl fmt::Display) -> FfiError {
        FfiError {
            status: TesseraStatus::InvalidHandle,
            message: format!("{op}: argument `{arg}`: expected {expected}, got {got}"),
        }
    }

    pub fn with_status(status: TesseraStatus, message: String) -> FfiError {
        FfiError { status, message }
    }
}

impl From<tessera_core::Error> for FfiError {
    fn from(error: tessera_core::Error) -> FfiError {
        use tessera_core::Error;
        let status = match &error {
            Error::InvalidArgument { .. } => TesseraStatus::InvalidArgument,
            Error::NoCuda(_) => TesseraStatus::NoCuda,
            Error::Cuda { .. } => TesseraStatus::Cuda,
            Error::Unsupported { .. } => TesseraStatus::Unsupported,
            Error::File { .. } => TesseraStatus::File,
            Error::Diverged(_) => TesseraStatus::Diverged,
        };
        FfiError {
            status,
            message: error.to_string(),
        }
    }
}

thread_local! {
    /// The message of the last failed call on this thread; empty after a successful one.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message never holds NUL in practice; if one did, it would end the C string early.
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

fn clear_last_error() {
    LAST_ERROR.with(|last| {
        if !last.borrow().as_bytes().is_empty() {
            *last.borrow_mut() = CString::default();
        }
    });
}

/// Runs the body of an exported function: clears the thread's message, runs `body`, and turns
/// its error (or a panic, where the build unwinds) into a status code and a message.
pub fn guard(op: &str, body: impl FnOnce() -> FfiResult<()>) -> TesseraStatus {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => TesseraStatus::Ok,
        Ok(Err(error)) => {
            set_last_error(&error.message);
            error.status
        }
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            set_last_error(&format!("{op}: internal error: {reason}"));
            TesseraStatus::Internal
        }
    }
}

/// The message of the last call on this thread that failed, or "" when the last call succeeded.
///
/// Ownership: the string belongs to the library; do not free it. It stays valid until the next
/// tessera call on the same thread (copy it to keep it). Thread-safety: each thread has its own
/// message; a call on one thread never changes another thread's. Errors: none; never NULL.
#[no_mangle]
pub extern "C" fn tessera_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// A static name for a status code ("TESSERA_STATUS_OK", ...; "TESSERA_STATUS_UNKNOWN" for a
/// value that is not one).
///
/// Ownership: static; do not free. Thread-safety: any thread. Errors: none; never NULL.
#[no_mangle]
pub extern "C" fn tessera_status_name(status: i32) -> *const c_char {
    let name: &'static str = match status {
        0 => "TESSERA_STATUS_OK\0",
        1 => "TESSERA_STATUS_INVALID_ARGUMENT\0",
        2 => "TESSERA_STATUS_INVALID_HANDLE\0",
        3 => "TESSERA_STATUS_NO_CUDA\0",
        4 => "TESSERA_STATUS_CUDA\0",
        5 => "TESSERA_STATUS_UNSUPPORTED\0",
        6 => "TESSERA_STATUS_BUSY\0",
        7 => "TESSERA_STATUS_INTERNAL\0",
        8 => "TESSERA_STATUS_FILE\0",
        9 => "TESSERA_STATUS_DIVERGED\0",
        _ => "TESSERA_STATUS_UNKNOWN\0",
    };
    name.as_ptr().cast()
}

/// Writes `value` through an out-pointer, or fails when the pointer is NULL.
pub(crate) fn write_out<T>(op: &str, arg: &str, out: *mut T, value: T) -> FfiResult<()> {
    if out.is_null() {
        return Err(FfiError::invalid(
            op,
            arg,
            "a non-NULL pointer to write the result to",
            "NULL",
        ));
    }
    // SAFETY: non-null; the caller promises (header) that it points to writable storage for T.
    unsafe { out.write(value) };
    Ok(())
}

/// Fails when a required pointer is NULL.
pub(crate) fn require<T>(op: &str, arg: &str, pointer: *const T) -> FfiResult<()> {
    if pointer.is_null() {
        Err(FfiError::invalid(op, arg, "a non-NULL pointer", "NULL"))
    } else {
        Ok(())
    }
}
