//! Argument checks and launch helpers shared by the row-wise transformer ops (activation, norm,
//! cross entropy, embedding, gradient norm, sampling).

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Checks that `other` matches `x` in shape, dtype and device.
pub(crate) fn expect_like(op: &'static str, arg: &'static str, other: &Tensor, x: &Tensor) -> Result<()> {
    other.expect_dtype(op, arg, &[x.dtype()])?;
    other.expect_shape(op, arg, x.shape())?;
    x.device().expect_same(&other.device(), op, arg)
}

/// Checks that `other` has `shape` and `dtype` and lives on `device`.
pub(crate) fn expect_tensor(
    op: &'static str,
    arg: &'static str,
    other: &Tensor,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<()> {
    other.expect_dtype(op, arg, &[dtype])?;
    other.expect_shape(op, arg, shape)?;
    device.expect_same(&other.device(), op, arg)
}

/// An output tensor for an op that writes every element: zeros on the CPU, uninitialised memory
/// on a GPU.
pub(crate) fn new_output(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    match device {
        Device::Cpu => Tensor::zeros(shape, dtype, device),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => Tensor::uninit_cuda(shape, dtype, backend),
    }
}

/// Splits a float tensor of rank >= 1 into (rows, last dimension), with the last dimension at
/// least 1 and both below 2^31 (the kernels index rows and columns with 32-bit integers).
pub(crate) fn rows_and_width(op: &'static str, arg: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    x.expect_dtype(op, arg, &[DType::F32, DType::BF16, DType::F16])?;
    let Some(&width) = x.shape().last() else {
        return Err(Error::invalid(op, arg, "a tensor of rank 1 or more", "a scalar"));
    };
    let rows = x.numel().checked_div(width).unwrap_or(0);
    if width == 0 || width > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            arg,
            "a last dimension between 1 and 2^31-1 and fewer than 2^31 rows",
            format!("shape {:?}", x.shape()),
        ));
    }
    Ok((rows, width))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::*;
    use crate::cuda::CudaBackend;

    /// Blocks for a grid-stride kernel over `work` items with `per_block` items per block step:
    /// enough to fill the GPU, never more than the work needs, at least 1.
    pub(crate) fn grid_stride_blocks(backend: &CudaBackend, work: usize, per_block: usize) -> u32 {
        let cap = backend.multiprocessors() * 16;
        work.div_ceil(per_block.max(1)).clamp(1, cap) as u32
    }

    /// True when every address is a multiple of 16 (the 16-byte vector paths need it).
    pub(crate) fn aligned16(addresses: &[u64]) -> bool {
        addresses.iter().all(|a| a % 16 == 0)
    }

    /// The address of an optional tensor's buffer, 0 when absent.
    pub(crate) fn address_or_null(tensor: Option<&Tensor>) -> Result<u64> {
        match tensor {
            Some(t) => Ok(t.device_buffer()?.address()),
            None => Ok(0),
        }
    }
}
