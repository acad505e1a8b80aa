//! The one error type of tessera: every failure names where it happened and what was wrong.

use std::fmt;

/// Every fallible tessera call returns this.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong. Argument errors name the op, the argument, what was expected and what came,
/// so that a message read out of context still says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed an argument that the op cannot accept (shape, dtype, device, value).
    #[error("{op}: argument `{arg}`: expected {expected}, got {got}")]
    InvalidArgument {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: String,
    },

    /// A CUDA device was asked for and cannot be had; the message says why.
    #[error("no CUDA device: {0}")]
    NoCuda(String),

    /// A CUDA driver, cuBLASLt or module-loading call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda { context: String, message: String },

    /// A file could not be read or written, or its contents are not what they claim to be
    /// (a truncated or corrupt checkpoint, a missing tensor, a shape that does not match).
    #[error("{path}: {message}")]
    File { path: String, message: String },

    /// Training stopped because a loss or gradient stopped being a finite number.
    #[error("training diverged: {0}")]
    Diverged(String),

    /// The op exists but not for this combination (device, dtype, compute capability).
    #[error("{op}: not supported: {reason}")]
    Unsupported { op: &'static str, reason: String },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, arg: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// Shorthand for [`Error::File`].
    pub fn file(path: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::File {
            path: path.to_string(),
            message: message.to_string(),
        }
    }

    /// Shorthand for [`Error::Cuda`].
    pub fn cuda(context: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Cuda {
            context: context.to_string(),
            message: message.to_string(),
        }
    }
}
