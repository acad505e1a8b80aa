//! Dense matmul `out = alpha·op(A)·op(B) + beta·out + bias`: cuBLASLt on the GPU (bf16, f16 and
//! f32 inputs, f32 accumulation, the bias fused as an epilogue) and the `gemm` crate on the CPU.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use half::{bf16, f16};

const OP: &str = "matmul";

/// How to combine the operands; the default is `out = A·B`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulOptions {
    /// Use Aᵀ: A is stored (k, m) instead of (m, k).
    pub trans_a: bool,
    /// Use Bᵀ: B is stored (n, k) instead of (k, n), as a linear layer's weight is.
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the previous contents of `out` (0 ignores them, NaN included; 1 accumulates).
    pub beta: f32,
}

impl Default for MatmulOptions {
    fn default() -> Self {
        MatmulOptions {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

impl MatmulOptions {
    /// `A·Bᵀ`: a linear layer's forward, `X·Wᵀ`.
    pub fn linear() -> Self {
        MatmulOptions {
            trans_b: true,
            ..Default::default()
        }
    }
}

/// The product of `a` and `b` (plus `bias`) in a new tensor; `options.beta` is ignored, since a
/// new output has nothing to accumulate into.
pub fn matmul(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, options: MatmulOptions) -> Result<Tensor> {
    let (m, n, _) = validate_operands(a, b, &options)?;
    validate_bias(bias, a.dtype(), n, &a.device())?;
    let options = MatmulOptions { beta: 0.0, ..options };
    let mut out = match a.device() {
        Device::Cpu => Tensor::zeros(&[m, n], a.dtype(), &Device::Cpu)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => Tensor::uninit_cuda(&[m, n], a.dtype(), &backend)?,
    };
    matmul_into(a, b, bias, &mut out, options)?;
    Ok(out)
}

/// `out = alpha·op(a)·op(b) + beta·out + bias`, in place.
///
/// `a` is (m, k) or, with `trans_a`, (k, m); `b` is (k, n) or, with `trans_b`, (n, k); `bias` is
/// (n); `out` is (m, n). `a` and `b` have the same dtype (f32, bf16 or f16); `out` and `bias`
/// have that dtype too, or f32 (bf16 or f16 operands into an f32 output: how weight gradients
/// accumulate in f32). All are on one device; every dimension is at least 1. Products
/// accumulate in f32 on both devices.
pub fn matmul_into(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    out: &mut Tensor,
    options: MatmulOptions,
) -> Result<()> {
    let (m, n, k) = validate_operands(a, b, &options)?;
    out.expect_dtype(OP, "out", &[a.dtype(), DType::F32])?;
    out.expect_shape(OP, "out", &[m, n])?;
    validate_bias(bias, out.dtype(), n, &a.device())?;
    a.device().expect_same(&out.device(), OP, "out")?;
    let shape = Shape {
        m,
        n,
        k,
        trans_a: options.trans_a,
        trans_b: options.trans_b,
    };
    match a.device() {
        Device::Cpu => cpu::matmul(shape, a, b, bias, out, options),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::matmul(shape, a, b, bias, out, options),
    }
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
}

/// Checks the operands and options; returns (m, n, k).
fn validate_operands(a: &Tensor, b: &Tensor, options: &MatmulOptions) -> Result<(usize, usize, usize)> {
    a.expect_rank(OP, "a", 2)?;
    b.expect_rank(OP, "b", 2)?;
    a.expect_dtype(OP, "a", &[DType::F32, DType::BF16, DType::F16])?;
    b.expect_dtype(OP, "b", &[a.dtype()])?;
    a.device().expect_same(&b.device(), OP, "b")?;
    let (m, k) = if options.trans_a {
        (a.shape()[1], a.shape()[0])
    } else {
        (a.shape()[0], a.shape()[1])
    };
    let (k_b, n) = if options.trans_b {
        (b.shape()[1], b.shape()[0])
    } else {
        (b.shape()[0], b.shape()[1])
    };
    if k != k_b {
        return Err(Error::invalid(
            OP,
            "b",
            format!(
                "{k} rows in op(b) to match the {k} columns of op(a) (a is {:?}, trans_a={})",
                a.shape(),
                options.trans_a
            ),
            format!("shape {:?} with trans_b={}, giving {k_b}", b.shape(), options.trans_b),
        ));
    }
    if m == 0 || n == 0 || k == 0 {
        return Err(Error::invalid(
            OP,
            "a",
            "every dimension m, n, k at least 1",
            format!("m={m}, n={n}, k={k}"),
        ));
    }
    for (arg, value) in [("options.alpha", options.alpha), ("options.beta", options.beta)] {
        if !value.is_finite() {
            return Err(Error::invalid(OP, arg, "a finite number", value));
        }
    }
    Ok((m, n, k))
}

/// The bias, when given, is (n) of the output's dtype, on the operands' device.
fn validate_bias(bias: Option<&Tensor>, dtype: DType, n: usize, device: &Device) -> Result<()> {
    if let Some(bias) = bias {
        bias.expect_dtype(OP, "bias", &[dtype])?;
        bias.expect_shape(OP, "bias", &[n])?;
        device.expect_same(&bias.device(), OP, "bias")?;
    }
    Ok(())
}

mod cpu {
    use super::*;

    /// Row and column strides of op(X) for a row-major X of `cols` columns.
    fn strides(transposed: bool, cols: usize) -> (isize, isize) {
        if transposed {
            (1, cols as isize)
        } else {
            (cols as isize, 1)
        }
    }

    /// f32 products on f32 slices, in the layout `shape` describes.
    fn gemm_f32(shape: Shape, a: &[f32], b: &[f32], out: &mut [f32], alpha: f32, beta: f32) {
        let Shape {
            m,
            n,
            k,
            trans_a,
            trans_b,
        } = shape;
        let (a_rs, a_cs) = strides(trans_a, if trans_a { m } else { k });
        let (b_rs, b_cs) = strides(trans_b, if trans_b { k } else { n });
        // SAFETY: the slices hold exactly m·k, k·n and m·n elements (validated), and the strides
        // stay inside them. gemm's own naming: dst = alpha·dst + beta·lhs·rhs.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                beta != 0.0,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                beta,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
    }

    fn add_bias(out: &mut [f32], bias: &[f32]) {
        for row in out.chunks_exact_mut(bias.len()) {
            for (value, b) in row.iter_mut().zip(bias) {
                *value += b;
            }
        }
    }

    /// Converts, multiplies and adds the bias in f32, and rounds once (into a `T` output) or
    /// not at all (into an f32 one).
    fn matmul_half<T: crate::dtype::Float>(
        shape: Shape,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
        options: MatmulOptions,
    ) -> Result<()> {
        let widen = |t: &Tensor| -> Result<Vec<f32>> {
            match t.dtype() {
                DType::F32 => Ok(t.host_slice::<f32>()?.to_vec()),
                _ => Ok(t.host_slice::<T>()?.iter().map(|&x| x.to_f32()).collect()),
            }
        };
        let (a, b) = (widen(a)?, widen(b)?);
        let mut acc = if options.beta != 0.0 {
            widen(out)?
        } else {
            vec![0.0; shape.m * shape.n]
        };
        gemm_f32(shape, &a, &b, &mut acc, options.alpha, options.beta);
        if let Some(bias) = bias {
            add_bias(&mut acc, &widen(bias)?);
        }
        if out.dtype() == DType::F32 {
            out.host_slice_mut::<f32>()?.copy_from_slice(&acc);
        } else {
            for (dst, value) in out.host_slice_mut::<T>()?.iter_mut().zip(acc) {
                *dst = T::from_f32(value);
            }
        }
        Ok(())
    }

    pub(super) fn matmul(
        shape: Shape,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
        options: MatmulOptions,
    ) -> Result<()> {
        match a.dtype() {
            DType::F32 => {
                let out = out.host_slice_mut::<f32>()?;
                gemm_f32(
                    shape,
                    a.host_slice()?,
                    b.host_slice()?,
                    out,
                    options.alpha,
                    options.beta,
                );
                if let Some(bias) = bias {
                    add_bias(out, bias.host_slice()?);
                }
                Ok(())
            }
            DType::BF16 => matmul_half::<bf16>(shape, a, b, bias, out, options),
            DType::F16 => matmul_half::<f16>(shape, a, b, bias, out, options),
            other => Err(Error::invalid(OP, "a", "dtype f32, bf16 or f16", other)),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::blaslt::{MatmulOperands, MatmulShape};

    pub(super) fn matmul(
        shape: Shape,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
        options: MatmulOptions,
    ) -> Result<()> {
        let operands = MatmulOperands {
            a: a.device_buffer()?.address(),
            b: b.device_buffer()?.address(),
            out: out.device_buffer()?.address(),
            bias: bias
                .map(|bias| bias.device_buffer().map(|buffer| buffer.address()))
                .transpose()?,
            alpha: options.alpha,
            beta: options.beta,
        };
        let key = MatmulShape {
            dtype: a.dtype(),
            out_dtype: out.dtype(),
            m: shape.m,
            n: shape.n,
            k: shape.k,
            trans_a: shape.trans_a,
            trans_b: shape.trans_b,
            bias: bias.is_some(),
        };
        let backend = a.device_buffer()?.backend();
        let autotune = backend.matmul_autotune();
        backend.with_blaslt(|blas| blas.matmul(key, &operands, autotune))
    }
}
