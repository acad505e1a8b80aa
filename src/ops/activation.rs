//! GELU (tanh approximation, as GPT-2 uses it) and SwiGLU (as Llama uses it), forward and
//! backward, for f32, bf16 and f16 tensors; all arithmetic in f32 on both devices.
//!
//! - GELU: `y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, elementwise over any shape.
//! - SwiGLU: `x` has rows of `[gate | up]`, each half `width` wide (the output of one fused
//!   gate-and-up projection); `y[r, j] = silu(gate[r, j])·up[r, j]` with `silu(g) = g·σ(g)`, so
//!   `y` has the shape of `x` with the last dimension halved.
//!
//! The backward forms take the forward's input and the gradient of its output and write the
//! gradient of its input (for SwiGLU, both halves).

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::support::{expect_like, expect_tensor, new_output, rows_and_width};
use crate::tensor::Tensor;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// GELU, tanh approximation, in f32 (the formula of kernels/activation.cu).
#[inline(always)]
pub(crate) fn gelu_f32(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// d GELU(x) / dx, in f32.
#[inline(always)]
pub(crate) fn gelu_grad_f32(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gelu,
    Swiglu,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gelu => "gelu",
            Kind::Swiglu => "swiglu",
        }
    }
}

/// Validates `x` and returns (rows, width of the output's last dimension).
fn check_input(op: &'static str, kind: Kind, x: &Tensor) -> Result<(usize, usize)> {
    let (rows, last) = rows_and_width(op, "x", x)?;
    match kind {
        Kind::Gelu => Ok((rows, last)),
        Kind::Swiglu if last % 2 == 0 => Ok((rows, last / 2)),
        Kind::Swiglu => Err(Error::invalid(
            op,
            "x",
            "an even last dimension (rows of [gate | up])",
            format!("shape {:?}", x.shape()),
        )),
    }
}

fn output_shape(kind: Kind, x: &Tensor, width: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    if kind == Kind::Swiglu {
        if let Some(last) = shape.last_mut() {
            *last = width;
        }
    }
    shape
}

fn forward_into(op: &'static str, kind: Kind, x: &Tensor, out: &mut Tensor) -> Result<()> {
    let (rows, width) = check_input(op, kind, x)?;
    expect_tensor(op, "out", out, &output_shape(kind, x, width), x.dtype(), &x.device())?;
    match x.device() {
        Device::Cpu => cpu::forward(kind, x, out, rows, width),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::launch(kind, x, None, out, rows, width),
    }
}

fn backward_into(op: &'static str, kind: Kind, x: &Tensor, d_out: &Tensor, d_x: &mut Tensor) -> Result<()> {
    let (rows, width) = check_input(op, kind, x)?;
    expect_tensor(
        op,
        "d_out",
        d_out,
        &output_shape(kind, x, width),
        x.dtype(),
        &x.device(),
    )?;
    expect_like(op, "d_x", d_x, x)?;
    match x.device() {
        Device::Cpu => cpu::backward(kind, x, d_out, d_x, rows, width),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::launch(kind, x, Some(d_out), d_x, rows, width),
    }
}

/// `gelu(x)`, a new tensor of the shape and dtype of `x`.
pub fn gelu_forward(x: &Tensor) -> Result<Tensor> {
    check_input("gelu_forward", Kind::Gelu, x)?;
    let mut out = new_output(x.shape(), x.dtype(), &x.device())?;
    gelu_forward_into(x, &mut out)?;
    Ok(out)
}

/// [`gelu_forward`] into `out`, of the shape, dtype and device of `x`.
pub fn gelu_forward_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    forward_into("gelu_forward", Kind::Gelu, x, out)
}

/// `d_x = d_out · gelu'(x)`, given the forward's input `x`.
pub fn gelu_backward(x: &Tensor, d_out: &Tensor) -> Result<Tensor> {
    check_input("gelu_backward", Kind::Gelu, x)?;
    let mut d_x = new_output(x.shape(), x.dtype(), &x.device())?;
    gelu_backward_into(x, d_out, &mut d_x)?;
    Ok(d_x)
}

/// [`gelu_backward`] into `d_x`, of the shape, dtype and device of `x`.
pub fn gelu_backward_into(x: &Tensor, d_out: &Tensor, d_x: &mut Tensor) -> Result<()> {
    backward_into("gelu_backward", Kind::Gelu, x, d_out, d_x)
}

/// `silu(gate)·up` for `x` of rows `[gate | up]`: a new tensor with the last dimension halved.
pub fn swiglu_forward(x: &Tensor) -> Result<Tensor> {
    let (_, width) = check_input("swiglu_forward", Kind::Swiglu, x)?;
    let mut out = new_output(&output_shape(Kind::Swiglu, x, width), x.dtype(), &x.device())?;
    swiglu_forward_into(x, &mut out)?;
    Ok(out)
}

/// [`swiglu_forward`] into `out`, of the shape of `x` with the last dimension halved.
pub fn swiglu_forward_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    forward_into("swiglu_forward", Kind::Swiglu, x, out)
}

/// The gradient of [`swiglu_forward`] with respect to `x`, of the shape of `x`:
/// `d_gate = d_out·up·σ(g)·(1 + g·(1 - σ(g)))`, `d_up = d_out·silu(g)`.
pub fn swiglu_backward(x: &Tensor, d_out: &Tensor) -> Result<Tensor> {
    check_input("swiglu_backward", Kind::Swiglu, x)?;
    let mut d_x = new_output(x.shape(), x.dtype(), &x.device())?;
    swiglu_backward_into(x, d_out, &mut d_x)?;
    Ok(d_x)
}

/// [`swiglu_backward`] into `d_x`, of the shape, dtype and device of `x`.
pub fn swiglu_backward_into(x: &Tensor, d_out: &Tensor, d_x: &mut Tensor) -> Result<()> {
    backward_into("swiglu_backward", Kind::Swiglu, x, d_out, d_x)
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    const CHUNK: usize = 1 << 14;

    fn forward_typed<T: Float>(kind: Kind, x: &Tensor, out: &mut Tensor, width: usize) -> Result<()> {
        let x = x.host_slice::<T>()?;
        let out = out.host_slice_mut::<T>()?;
        match kind {
            Kind::Gelu => out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = T::from_f32(gelu_f32(x.to_f32()));
                }
            }),
            Kind::Swiglu => out
                .par_chunks_mut(width)
                .zip(x.par_chunks(2 * width))
                .for_each(|(o, x)| {
                    let (gate, up) = x.split_at(width);
                    for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                        let g = g.to_f32();
                        *o = T::from_f32(g * sigmoid(g) * u.to_f32());
                    }
                }),
        }
        Ok(())
    }

    pub(super) fn forward(kind: Kind, x: &Tensor, out: &mut Tensor, rows: usize, width: usize) -> Result<()> {
        debug_assert_eq!(out.numel(), rows * width);
        with_float_type!(x.dtype(), kind.name(), "x", T => forward_typed::<T>(kind, x, out, width))
    }

    fn backward_typed<T: Float>(kind: Kind, x: &Tensor, d_out: &Tensor, d_x: &mut Tensor, width: usize) -> Result<()> {
        let x = x.host_slice::<T>()?;
        let d_out = d_out.host_slice::<T>()?;
        let d_x = d_x.host_slice_mut::<T>()?;
        match kind {
            Kind::Gelu => d_x
                .par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(d_out.par_chunks(CHUNK)))
                .for_each(|(d, (x, g))| {
                    for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                        *d = T::from_f32(g.to_f32() * gelu_grad_f32(x.to_f32()));
                    }
                }),
            Kind::Swiglu => d_x
                .par_chunks_mut(2 * width)
                .zip(x.par_chunks(2 * width).zip(d_out.par_chunks(width)))
                .for_each(|(d, (x, g))| {
                    let (d_gate, d_up) = d.split_at_mut(width);
                    for j in 0..width {
                        let (gate, up, g) = (x[j].to_f32(), x[width + j].to_f32(), g[j].to_f32());
                        let s = sigmoid(gate);
                        d_gate[j] = T::from_f32(g * up * s * (1.0 + gate * (1.0 - s)));
                        d_up[j] = T::from_f32(g * gate * s);
                    }
                }),
        }
        Ok(())
    }

    pub(super) fn backward(
        kind: Kind,
        x: &Tensor,
        d_out: &Tensor,
        d_x: &mut Tensor,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        debug_assert_eq!(d_out.numel(), rows * width);
        with_float_type!(x.dtype(), kind.name(), "x", T => backward_typed::<T>(kind, x, d_out, d_x, width))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::support::cuda::{aligned16, grid_stride_blocks};

    /// Must match THREADS in kernels/activation.cu.
    const THREADS: u32 = 256;

    /// Runs the forward (`d_out` absent: `x` -> `out`) or the backward (`x`, `d_out` -> `out`).
    pub(super) fn launch(
        kind: Kind,
        x: &Tensor,
        d_out: Option<&Tensor>,
        out: &mut Tensor,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let x_address = x_buffer.address();
        let d_out_address = match d_out {
            Some(d) => d.device_buffer()?.address(),
            None => 0,
        };
        let out_address = out.device_buffer()?.address();
        let vector = 16 / x.dtype().size_in_bytes();
        // A vector never straddles a row: SwiGLU's halves must hold whole vectors, GELU's
        // flat length too.
        let length = match kind {
            Kind::Gelu => x.numel(),
            Kind::Swiglu => width,
        };
        let vectorised = length.is_multiple_of(vector) && aligned16(&[x_address, d_out_address, out_address]);
        let direction = if d_out.is_some() { "bwd" } else { "fwd" };
        let name = format!(
            "{}_{direction}_{}{}",
            kind.name(),
            if vectorised { "vec_" } else { "" },
            x.dtype().name()
        );
        let blocks = match kind {
            Kind::Gelu => grid_stride_blocks(
                &backend,
                x.numel(),
                THREADS as usize * if vectorised { vector } else { 1 },
            ),
            Kind::Swiglu => grid_stride_blocks(&backend, rows, 1),
        };
        let function = backend.function("activation", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&x_address);
        if d_out.is_some() {
            builder.arg(&d_out_address);
        }
        builder.arg(&out_address);
        let (n, rows, width) = (x.numel() as i64, rows as i64, width as i64);
        match kind {
            Kind::Gelu => builder.arg(&n),
            Kind::Swiglu => builder.arg(&rows).arg(&width),
        };
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the tensors were validated to have the shapes the kernel reads and writes (for
        // SwiGLU, rows of 2·width inputs and width outputs), one dtype, on this device; the
        // vector kernels run only on 16-byte aligned buffers whose rows hold whole vectors.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
