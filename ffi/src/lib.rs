//! The C API of tessera: opaque handles, integer status codes, a thread-local error message, and
//! no Rust panic across the boundary. `include/tessera.h` is generated from this crate by
//! cbindgen; README.md beside this crate's manifest says how to add an op.
//!
//! Every exported function runs its body through [`status::guard`], which validates handles and
//! pointers before use, turns every `tessera::Error` into a status code and a message, and (when
//! the library unwinds) catches a panic as `TESSERA_STATUS_INTERNAL`. Validation comes first so
//! that nothing relies on catching: a build with `panic = "abort"` stays safe for the inputs the
//! bad-input test feeds.

// Every exported function is `unsafe extern "C"`: its safety contract is its header comment (each
// pointer valid for what it says, handles from tessera), which cbindgen copies into tessera.h.
#![allow(clippy::missing_safety_doc)]

pub mod adamw;
pub mod attention;
pub mod binary;
pub mod device;
pub mod handle;
pub mod lora;
pub mod matmul;
pub mod model;
pub mod sparse;
pub mod status;
pub mod stream;
pub mod tensor;
pub mod trainer;
pub mod transformer;
pub mod wavelet;

use std::os::raw::c_char;

/// The ABI version of this header. It changes whenever a function, type or constant changes in
/// a way that breaks programs built against an earlier header; compare it with
/// `tessera_abi_version()` at run time.
pub const TESSERA_ABI_VERSION: u32 = 1;

/// The largest rank a tensor created through the C API may have.
pub const TESSERA_MAX_RANK: usize = 8;

/// The alignment, in bytes, that `tessera_tensor_wrap_device` requires of caller device memory
/// (what `cudaMalloc` returns).
pub const TESSERA_DEVICE_ALIGNMENT: usize = 256;

// A literal above, so that cbindgen writes it into the header; the library's value it must equal.
const _: () = assert!(TESSERA_DEVICE_ALIGNMENT == tessera_core::tensor::DEVICE_ALIGNMENT);

/// The library's version, "MAJOR.MINOR.PATCH", as a NUL-terminated static string.
///
/// Ownership: the string is static; do not free it. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version the library was built with; equal to `TESSERA_ABI_VERSION` when the header
/// and the library match.
///
/// Ownership: none. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_abi_version() -> u32 {
    TESSERA_ABI_VERSION
}

#[cfg(test)]
mod tests;
