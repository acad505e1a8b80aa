//! Where tensors live and ops run: the CPU always, a CUDA GPU when the crate is built with the
//! `cuda` feature and the machine has a driver and a GPU. Probing never panics.

use crate::error::{Error, Result};
use std::fmt;

#[cfg(feature = "cuda")]
use std::sync::Arc;

/// A device that holds tensors and runs ops.
///
/// Cloning is cheap: a CUDA device is shared by reference, and every clone uses the same context,
/// stream and loaded kernels.
#[derive(Clone)]
pub enum Device {
    /// The host CPU: always available.
    Cpu,
    /// A CUDA GPU (only with the `cuda` feature).
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaBackend>),
}

impl Device {
    /// The CUDA GPU with the given ordinal.
    ///
    /// Returns [`Error::NoCuda`] with a one-line reason when the crate was built without the
    /// `cuda` feature, when the CUDA driver library is missing, when the machine has no GPU, or
    /// when the ordinal is out of range. Never panics. Asking twice for the same ordinal returns
    /// the same device (one context, one stream, kernels loaded once).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::CudaBackend::get(ordinal).map(Device::Cuda)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::NoCuda(
                "tessera was built without the `cuda` feature (rebuild with `--features cuda`)".into(),
            ))
        }
    }

    /// The first CUDA GPU if there is one, else the CPU.
    pub fn cuda_if_available() -> Device {
        Device::cuda(0).unwrap_or(Device::Cpu)
    }

    /// How many CUDA GPUs can be used; 0 when none can (no feature, no driver, no GPU).
    pub fn cuda_device_count() -> usize {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::device_count().unwrap_or(0)
        }
        #[cfg(not(feature = "cuda"))]
        {
            0
        }
    }

    /// True for a CUDA device.
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Device::Cpu)
    }

    /// Waits until all work queued on this device has finished and reports any error it raised.
    /// A no-op on the CPU, whose ops are synchronous.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => cuda.synchronize(),
        }
    }

    /// Checks that `self` and `other` are the same device, naming the op and argument otherwise.
    pub(crate) fn expect_same(&self, other: &Device, op: &'static str, arg: &'static str) -> Result<()> {
        if self == other {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                arg,
                format!("a tensor on {self}"),
                format!("one on {other}"),
            ))
        }
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            #[cfg(feature = "cuda")]
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal() == b.ordinal(),
            #[cfg(feature = "cuda")]
            _ => false,
        }
    }
}

impl Eq for Device {}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => write!(f, "cuda:{}", cuda.ordinal()),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
