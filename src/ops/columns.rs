//! Copies a block of columns between two matrices with the same rows:
//! `dst[r, dst_start + j] = src[r, src_start + j]` for `j < width`. A fused projection's output
//! is split into its parts with it, and parts are joined into one operand; the backward of
//! either is the same copy the other way.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const OP: &str = "copy_columns";

/// Copies columns `src_start..src_start + width` of `src` (rows, src_columns) into columns
/// `dst_start..dst_start + width` of `dst` (rows, dst_columns), leaving the rest of `dst` as it
/// was. Both are 2-D with the same rows, dtype and device; a tensor of more dimensions is seen
/// as (product of the leading dimensions, last dimension).
pub fn copy_columns(src: &Tensor, src_start: usize, dst: &mut Tensor, dst_start: usize, width: usize) -> Result<()> {
    let (rows, src_columns) = as_matrix(src, "src")?;
    let (dst_rows, dst_columns) = as_matrix(dst, "dst")?;
    if dst_rows != rows {
        return Err(Error::invalid(OP, "dst", format!("{rows} rows like src"), dst_rows));
    }
    if dst.dtype() != src.dtype() {
        return Err(Error::invalid(OP, "dst", format!("dtype {}", src.dtype()), dst.dtype()));
    }
    src.device().expect_same(&dst.device(), OP, "dst")?;
    for (arg, start, columns) in [
        ("src_start", src_start, src_columns),
        ("dst_start", dst_start, dst_columns),
    ] {
        if start.checked_add(width).is_none_or(|end| end > columns) {
            return Err(Error::invalid(
                OP,
                arg,
                format!("start + width ({width}) <= {columns} columns"),
                start,
            ));
        }
    }
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let element = src.dtype().size_in_bytes();
    let shape = Copy {
        rows,
        width: width * element,
        src_start: src_start * element,
        src_stride: src_columns * element,
        dst_start: dst_start * element,
        dst_stride: dst_columns * element,
    };
    match src.device() {
        Device::Cpu => {
            let source = src.host_bytes()?;
            let target = dst.host_bytes_mut()?;
            for r in 0..shape.rows {
                let from = r * shape.src_stride + shape.src_start;
                let to = r * shape.dst_stride + shape.dst_start;
                target[to..to + shape.width].copy_from_slice(&source[from..from + shape.width]);
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::copy_columns(src, dst, &shape),
    }
}

/// The copy in bytes.
struct Copy {
    rows: usize,
    width: usize,
    src_start: usize,
    src_stride: usize,
    dst_start: usize,
    dst_stride: usize,
}

fn as_matrix(tensor: &Tensor, arg: &'static str) -> Result<(usize, usize)> {
    match tensor.shape() {
        [] => Err(Error::invalid(
            OP,
            arg,
            "a tensor of at least one dimension",
            "a scalar",
        )),
        [leading @ .., last] => Ok((leading.iter().product(), *last)),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    const THREADS: u32 = 256;

    pub(super) fn copy_columns(src: &Tensor, dst: &mut Tensor, shape: &Copy) -> Result<()> {
        let source = src.device_buffer()?;
        let backend = source.backend().clone();
        let (src_address, dst_address) = (source.address(), dst.device_buffer()?.address());
        // The widest unit dividing every address, offset and length keeps each access aligned.
        let common = [
            src_address as usize + shape.src_start,
            dst_address as usize + shape.dst_start,
            shape.src_stride,
            shape.dst_stride,
            shape.width,
        ]
        .into_iter()
        .fold(0, |acc, v| acc | v);
        let unit = [16usize, 8, 4, 2].into_iter().find(|u| common % u == 0).unwrap_or(1);
        let name = format!("copy_columns_{unit}");
        let function = backend.function("columns", &name)?;
        let units = (shape.rows * shape.width / unit) as u64;
        let grid = units.div_ceil(THREADS as u64).min(1 << 20) as u32;
        let src_pointer = src_address + shape.src_start as u64;
        let dst_pointer = dst_address + shape.dst_start as u64;
        let (rows, width) = (shape.rows as u64, (shape.width / unit) as u64);
        let (src_stride, dst_stride) = ((shape.src_stride / unit) as u64, (shape.dst_stride / unit) as u64);
        let mut launch = backend.launch_builder(&function);
        launch
            .arg(&src_pointer)
            .arg(&dst_pointer)
            .arg(&rows)
            .arg(&width)
            .arg(&src_stride)
            .arg(&dst_stride);
        let config = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: both ranges were checked against the tensors' shapes, and the pointers are
        // aligned to the unit, which divides every offset and stride.
        unsafe { launch.launch(config) }.context("launching copy_columns")?;
        Ok(())
    }
}
