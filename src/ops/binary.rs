//! Binarized linear layers (FBI-LLM, ALGORITHMS.md §1): the training form with an f32 latent
//! weight, per-input-column scale α and shift β and an optional bias; its straight-through
//! backward; the xnor initialisation of α and β; the packed inference form (sign bits, 32 per
//! u32) with its fused GEMV/GEMM; and the autoregressive distillation loss.
//!
//! Forward, never materialising `W~ = α·sign(W) + β`:
//! `y[n,i] = Σ_j sign(W[i,j]) · (α_j x[n,j]) + r[n] + b_i`, with `r[n] = Σ_j β_j x[n,j]`.
//!
//! # sign(0)
//! The training form follows the reference (`torch.sign`): `sign(0) = 0`, so an exactly zero
//! latent weight contributes `β_j` alone. A packed bit cannot hold 0: [`binary_pack`] stores bit 1
//! for `w < 0` and bit 0 otherwise, so `0.0`, `-0.0` and NaN all pack to `+1` (contributing
//! `α_j + β_j`). Random latent weights are never exactly zero, and both forms then agree.
//!
//! # Packed layout
//! `bits` is u32 `[d_out, ceil(d_in / 32)]`: bit `j % 32` of word `j / 32` of row `i` is 1 when
//! `W[i,j] < 0`. Bits past `d_in` in a row's last word are padding: [`binary_pack`] writes 0, and
//! every reader ignores them.

use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ops::support::new_output;
use crate::tensor::Tensor;
use rayon::prelude::*;

const OP_FORWARD: &str = "binary_linear_forward";
const OP_BACKWARD: &str = "binary_linear_backward";
const OP_INIT: &str = "binary_init";
const OP_PACK: &str = "binary_pack";
const OP_UNPACK: &str = "binary_unpack";
const OP_PACKED: &str = "binary_packed_forward";
const OP_DISTILL: &str = "distill_loss";

/// The largest token count, `d_in`, `d_out` or vocabulary the ops accept: the kernels index
/// rows and columns with i32 and step past the end by up to one k phase.
pub const MAX_DIM: usize = 1 << 30;

/// The largest token count the GPU packed forward takes in one call (its GEMM grid has one row
/// of blocks per 128 tokens, at most 65535 rows).
pub const MAX_GPU_TOKENS: usize = 65535 * 128;

/// Token counts up to this take the GPU's streaming GEMV; larger ones its tensor-core GEMM.
pub const GEMV_MAX_TOKENS: usize = 16;

/// Tokens per partial sum in the GPU training backward's column reductions (dα, dβ, db): each
/// chunk's partial is summed by one thread in token order, then the chunks in chunk order.
pub const TRAIN_CHUNK_ROWS: usize = 64;

/// The largest token count the GPU training form takes in one call (one grid row per chunk of
/// [`TRAIN_CHUNK_ROWS`] tokens, at most 65535 rows).
pub const MAX_GPU_TRAIN_TOKENS: usize = 65535 * TRAIN_CHUNK_ROWS;

/// u32 words per packed row of `d_in` weights.
pub fn packed_words(d_in: usize) -> usize {
    d_in.div_ceil(32)
}

/// The training form's parameters: latent weight `[d_out, d_in]`, `alpha` and `beta` `[d_in]`,
/// optional `bias` `[d_out]`, all f32 on one device.
#[derive(Clone, Copy, Debug)]
pub struct BinaryLinear<'a> {
    pub weight: &'a Tensor,
    pub alpha: &'a Tensor,
    pub beta: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

/// The gradients of [`binary_linear_backward`], each shaped like what it is the gradient of.
#[derive(Debug)]
pub struct BinaryLinearGrads {
    pub d_x: Tensor,
    pub d_weight: Tensor,
    pub d_alpha: Tensor,
    pub d_beta: Tensor,
    /// Present when the layer has a bias.
    pub d_bias: Option<Tensor>,
}

/// The packed inference form: sign bits (see the module's layout), `alpha` and `beta` f32
/// `[d_in]`, optional f32 `bias` `[d_out]`, and `d_in`, which the bits alone do not say.
#[derive(Clone, Copy, Debug)]
pub struct PackedBinaryLinear<'a> {
    pub bits: &'a Tensor,
    pub alpha: &'a Tensor,
    pub beta: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub d_in: usize,
}

fn check_dim(op: &'static str, arg: &'static str, what: &str, value: usize) -> Result<()> {
    if value == 0 || value > MAX_DIM {
        return Err(Error::invalid(
            op,
            arg,
            format!("{what} between 1 and {MAX_DIM}"),
            value,
        ));
    }
    Ok(())
}

/// Checks a per-column or per-row f32 vector of `len` elements on `device`.
fn check_vector(op: &'static str, arg: &'static str, t: &Tensor, len: usize, device: &Device) -> Result<()> {
    t.expect_dtype(op, arg, &[DType::F32])?;
    t.expect_shape(op, arg, &[len])?;
    device.expect_same(&t.device(), op, arg)
}

/// Checks the latent weight; returns (d_out, d_in).
fn check_weight(op: &'static str, w: &Tensor) -> Result<(usize, usize)> {
    check_weight_layout(op, w, BinaryWeightLayout::OutputMajor)
}

/// Checks a latent weight stored in `layout`; returns (d_out, d_in).
fn check_weight_layout(op: &'static str, w: &Tensor, layout: BinaryWeightLayout) -> Result<(usize, usize)> {
    w.expect_rank(op, "weight", 2)?;
    w.expect_dtype(op, "weight", &[DType::F32])?;
    let (d_out, d_in) = match layout {
        BinaryWeightLayout::OutputMajor => (w.shape()[0], w.shape()[1]),
        BinaryWeightLayout::InputMajor => (w.shape()[1], w.shape()[0]),
    };
    check_dim(op, "weight", "d_out", d_out)?;
    check_dim(op, "weight", "d_in", d_in)?;
    Ok((d_out, d_in))
}

/// Checks the training-form layer; returns (d_out, d_in).
fn check_layer(op: &'static str, layer: &BinaryLinear<'_>) -> Result<(usize, usize)> {
    check_layer_layout(op, layer, BinaryWeightLayout::OutputMajor)
}

/// Checks the training-form layer with its weight in `layout`; returns (d_out, d_in).
fn check_layer_layout(
    op: &'static str,
    layer: &BinaryLinear<'_>,
    layout: BinaryWeightLayout,
) -> Result<(usize, usize)> {
    let (d_out, d_in) = check_weight_layout(op, layer.weight, layout)?;
    let device = layer.weight.device();
    check_vector(op, "alpha", layer.alpha, d_in, &device)?;
    check_vector(op, "beta", layer.beta, d_in, &device)?;
    if let Some(bias) = layer.bias {
        check_vector(op, "bias", bias, d_out, &device)?;
    }
    Ok((d_out, d_in))
}

/// Checks a token matrix `[tokens, cols]` of one of `dtypes` on `device`; returns the token count.
fn check_tokens(
    op: &'static str,
    arg: &'static str,
    x: &Tensor,
    cols: usize,
    dtypes: &[DType],
    device: &Device,
) -> Result<usize> {
    x.expect_rank(op, arg, 2)?;
    x.expect_dtype(op, arg, dtypes)?;
    device.expect_same(&x.device(), op, arg)?;
    if x.shape()[1] != cols {
        return Err(Error::invalid(
            op,
            arg,
            format!("shape (tokens, {cols})"),
            format!("shape {:?}", x.shape()),
        ));
    }
    check_dim(op, arg, "a token count", x.shape()[0])?;
    Ok(x.shape()[0])
}

/// The training form's activation dtypes on `device`: the CPU computes in f32 from any float
/// dtype; a GPU runs its GEMMs on bf16 or f16 tensor cores.
fn training_dtypes(device: &Device) -> &'static [DType] {
    if device.is_cuda() {
        &[DType::BF16, DType::F16]
    } else {
        &[DType::F32, DType::BF16, DType::F16]
    }
}

/// Validates a training-form forward; returns (tokens, d_out, d_in).
fn check_forward(x: &Tensor, layer: &BinaryLinear<'_>) -> Result<(usize, usize, usize)> {
    check_forward_layout(x, layer, BinaryWeightLayout::OutputMajor)
}

/// [`check_forward`] with the weight in `layout`.
fn check_forward_layout(
    x: &Tensor,
    layer: &BinaryLinear<'_>,
    layout: BinaryWeightLayout,
) -> Result<(usize, usize, usize)> {
    let (d_out, d_in) = check_layer_layout(OP_FORWARD, layer, layout)?;
    let device = layer.weight.device();
    let tokens = check_tokens(OP_FORWARD, "x", x, d_in, training_dtypes(&device), &device)?;
    check_gpu_tokens(OP_FORWARD, x, &device)?;
    Ok((tokens, d_out, d_in))
}

/// On a GPU the backward's column reductions take one grid row per [`TRAIN_CHUNK_ROWS`] tokens.
fn check_gpu_tokens(op: &'static str, x: &Tensor, device: &Device) -> Result<()> {
    if device.is_cuda() && x.shape()[0] > MAX_GPU_TRAIN_TOKENS {
        return Err(Error::invalid(
            op,
            "x",
            format!("at most {MAX_GPU_TRAIN_TOKENS} tokens per call on a GPU"),
            format!("shape {:?}", x.shape()),
        ));
    }
    Ok(())
}

/// Checks an output tensor's dtype, shape and device.
fn check_output(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    dtype: DType,
    shape: &[usize],
    device: &Device,
) -> Result<()> {
    t.expect_dtype(op, arg, &[dtype])?;
    t.expect_shape(op, arg, shape)?;
    device.expect_same(&t.device(), op, arg)
}

/// The training-form forward: `y = x·W~ᵀ + b` with `W~ = α·sign(W) + β` (sign(0) = 0), computed
/// in the fused form. `x` is `[tokens, d_in]`: f32, bf16 or f16 on the CPU (computed in f32),
/// bf16 or f16 on a GPU; returns `[tokens, d_out]` of x's dtype.
///
/// On a GPU: sign(W) is written in x's dtype (exact: ±1 and 0), α·x is rounded once to x's
/// dtype, and one tensor-core GEMM (cuBLASLt, f32 accumulation) computes the ±1 product. The β
/// term `r[n] = Σ_j β_j x[n,j]` (f32) and the bias enter the same f32 accumulator as extra k
/// columns, each split into a high and a low part of x's dtype multiplied by 1 (within ~2^-16 of
/// the f32 value in bf16, ~2^-22 in f16), so the output is rounded once.
pub fn binary_linear_forward(x: &Tensor, layer: BinaryLinear<'_>) -> Result<Tensor> {
    let (tokens, d_out, _) = check_forward(x, &layer)?;
    let mut y = new_output(&[tokens, d_out], x.dtype(), &x.device())?;
    binary_linear_forward_into(x, layer, &mut y)?;
    Ok(y)
}

/// [`binary_linear_forward`] into an existing `y` `[tokens, d_out]` of x's dtype and device.
pub fn binary_linear_forward_into(x: &Tensor, layer: BinaryLinear<'_>, y: &mut Tensor) -> Result<()> {
    let (tokens, d_out, d_in) = check_forward(x, &layer)?;
    check_output(OP_FORWARD, "y", y, x.dtype(), &[tokens, d_out], &x.device())?;
    match x.device() {
        Device::Cpu => {
            with_float_type!(x.dtype(), OP_FORWARD, "x", T => cpu::forward::<T>(x, &layer, tokens, d_out, d_in, y))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::train_forward(x, &layer, tokens, d_out, d_in, false, y),
    }
}

/// How a latent weight, and its gradient, is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryWeightLayout {
    /// `[d_out, d_in]`, nn.Linear's and the op's own.
    OutputMajor,
    /// `[d_in, d_out]`, GPT-2's Conv1D.
    InputMajor,
}

/// [`binary_linear_forward_into`] with the latent weight stored in `layout`: an input-major
/// weight is read transposed where its signs are taken (on a GPU, by the kernel that writes
/// them; on the CPU, from a transposed host copy), and nothing else changes.
pub fn binary_linear_forward_layout_into(
    x: &Tensor,
    layer: BinaryLinear<'_>,
    layout: BinaryWeightLayout,
    y: &mut Tensor,
) -> Result<()> {
    let (tokens, d_out, d_in) = check_forward_layout(x, &layer, layout)?;
    check_output(OP_FORWARD, "y", y, x.dtype(), &[tokens, d_out], &x.device())?;
    match (x.device(), layout) {
        (Device::Cpu, BinaryWeightLayout::OutputMajor) => {
            with_float_type!(x.dtype(), OP_FORWARD, "x", T => cpu::forward::<T>(x, &layer, tokens, d_out, d_in, y))
        }
        (Device::Cpu, BinaryWeightLayout::InputMajor) => {
            let weight = cpu::transposed(layer.weight, d_in, d_out)?;
            let layer = BinaryLinear {
                weight: &weight,
                ..layer
            };
            with_float_type!(x.dtype(), OP_FORWARD, "x", T => cpu::forward::<T>(x, &layer, tokens, d_out, d_in, y))
        }
        #[cfg(feature = "cuda")]
        (Device::Cuda(_), layout) => cuda::train_forward(
            x,
            &layer,
            tokens,
            d_out,
            d_in,
            layout == BinaryWeightLayout::InputMajor,
            y,
        ),
    }
}

/// Validates a training-form backward; returns (tokens, d_out, d_in).
fn check_backward(d_y: &Tensor, x: &Tensor, layer: &BinaryLinear<'_>) -> Result<(usize, usize, usize)> {
    let (d_out, d_in) = check_layer(OP_BACKWARD, layer)?;
    let device = layer.weight.device();
    let tokens = check_tokens(OP_BACKWARD, "x", x, d_in, training_dtypes(&device), &device)?;
    check_gpu_tokens(OP_BACKWARD, x, &device)?;
    check_tokens(OP_BACKWARD, "d_y", d_y, d_out, &[x.dtype()], &device)?;
    if d_y.shape()[0] != tokens {
        return Err(Error::invalid(
            OP_BACKWARD,
            "d_y",
            format!("shape [{tokens}, {d_out}] (the tokens of x)"),
            format!("shape {:?}", d_y.shape()),
        ));
    }
    Ok((tokens, d_out, d_in))
}

/// The training-form backward with the spec's straight-through estimator (identity, no
/// clipping): with `G = dYᵀX`, `dX = dY·W~`, `dα_j = Σ_i G_ij·sign(W_ij)`, `dβ_j = Σ_i G_ij`,
/// `dW_ij = α_j·G_ij`, `db_i = Σ_n dY[n,i]`. `d_y` is `[tokens, d_out]` of x's dtype, `x` the
/// forward's input (dtypes as in [`binary_linear_forward`]). `d_x` has x's dtype; `d_weight`,
/// `d_alpha`, `d_beta` and `d_bias` are f32.
///
/// On a GPU: `P = dY·sign(W)` and the row sums of dY come from one GEMM (f32 output, the sums
/// through a column of ones beside the signs), then `dX = α⊙P + β·rowsum` (rounded once),
/// `dα_j = Σ_n X[n,j]·P[n,j]` and `dβ_j = Σ_n X[n,j]·rowsum[n]`; `G = dYᵀX` is a GEMM written in
/// f32 straight into `d_weight`, then scaled by α in place. Every reduction has a fixed order.
pub fn binary_linear_backward(d_y: &Tensor, x: &Tensor, layer: BinaryLinear<'_>) -> Result<BinaryLinearGrads> {
    let (tokens, d_out, d_in) = check_backward(d_y, x, &layer)?;
    let device = x.device();
    let mut grads = BinaryLinearGrads {
        d_x: new_output(&[tokens, d_in], x.dtype(), &device)?,
        d_weight: new_output(&[d_out, d_in], DType::F32, &device)?,
        d_alpha: new_output(&[d_in], DType::F32, &device)?,
        d_beta: new_output(&[d_in], DType::F32, &device)?,
        d_bias: layer
            .bias
            .map(|_| new_output(&[d_out], DType::F32, &device))
            .transpose()?,
    };
    binary_linear_backward_into(d_y, x, layer, &mut grads)?;
    Ok(grads)
}

/// [`binary_linear_backward`] into existing gradients (each shaped like what it is the gradient
/// of, `d_x` of x's dtype and the rest f32, on x's device; `d_bias` present exactly when the
/// layer has a bias). They are overwritten, not accumulated into.
pub fn binary_linear_backward_into(
    d_y: &Tensor,
    x: &Tensor,
    layer: BinaryLinear<'_>,
    grads: &mut BinaryLinearGrads,
) -> Result<()> {
    let (tokens, d_out, d_in) = check_backward(d_y, x, &layer)?;
    let device = x.device();
    let op = OP_BACKWARD;
    check_output(op, "grads.d_x", &grads.d_x, x.dtype(), &[tokens, d_in], &device)?;
    check_output(
        op,
        "grads.d_weight",
        &grads.d_weight,
        DType::F32,
        &[d_out, d_in],
        &device,
    )?;
    check_output(op, "grads.d_alpha", &grads.d_alpha, DType::F32, &[d_in], &device)?;
    check_output(op, "grads.d_beta", &grads.d_beta, DType::F32, &[d_in], &device)?;
    match (&grads.d_bias, layer.bias) {
        (Some(d_bias), Some(_)) => check_output(op, "grads.d_bias", d_bias, DType::F32, &[d_out], &device)?,
        (None, None) => {}
        (got, _) => {
            return Err(Error::invalid(
                op,
                "grads.d_bias",
                if layer.bias.is_some() {
                    "a tensor, since the layer has a bias"
                } else {
                    "none, since the layer has no bias"
                },
                if got.is_some() { "a tensor" } else { "none" },
            ))
        }
    }
    match device {
        Device::Cpu => with_float_type!(x.dtype(), op, "x", T =>
            cpu::backward::<T>(d_y, x, &layer, tokens, d_out, d_in, grads)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let targets = BinaryGradTargets {
                d_x: Some(&mut grads.d_x),
                accumulate_d_x: false,
                d_weight: Some(&mut grads.d_weight),
                d_alpha: Some(&mut grads.d_alpha),
                d_beta: Some(&mut grads.d_beta),
                d_bias: grads.d_bias.as_mut(),
            };
            let shape = cuda::BackwardShape {
                tokens,
                d_out,
                d_in,
                input_major: false,
                accumulate: false,
            };
            cuda::train_backward(d_y, x, &layer, shape, targets)
        }
    }
}

/// The gradients [`binary_linear_backward_add`] adds to, borrowed from their owners (a model's
/// parameters). Each is optional: a layer whose parameters are frozen asks for `d_x` alone.
#[derive(Debug)]
pub struct BinaryGradTargets<'a> {
    /// `dX`, x's dtype `[tokens, d_in]`: added to with `accumulate_d_x` (in f32, rounded once),
    /// else overwritten.
    pub d_x: Option<&'a mut Tensor>,
    pub accumulate_d_x: bool,
    /// f32 and shaped like the weight (in its layout); added to.
    pub d_weight: Option<&'a mut Tensor>,
    /// f32 `[d_in]`; added to.
    pub d_alpha: Option<&'a mut Tensor>,
    pub d_beta: Option<&'a mut Tensor>,
    /// f32 `[d_out]`, only for a layer with a bias; added to.
    pub d_bias: Option<&'a mut Tensor>,
}

/// [`binary_linear_backward_into`] for a model: the latent weight stored in `layout`, and the
/// gradients added to those `targets` asks for (dX overwritten or added to), on the device.
/// On a GPU, dX's accumulation is fused into the kernel that writes it, dα, dβ and db into
/// their final column sums, and dW's into the kernel that scales `G` by α (an input-major
/// layer's `G` comes transposed straight from its GEMM, `Xᵀ·dY`). On the CPU the op's own
/// backward runs on a transposed host copy of the weight and the results are added.
pub fn binary_linear_backward_add(
    d_y: &Tensor,
    x: &Tensor,
    layer: BinaryLinear<'_>,
    layout: BinaryWeightLayout,
    targets: BinaryGradTargets<'_>,
) -> Result<()> {
    let op = OP_BACKWARD;
    let (d_out, d_in) = check_layer_layout(op, &layer, layout)?;
    let device = layer.weight.device();
    let tokens = check_tokens(op, "x", x, d_in, training_dtypes(&device), &device)?;
    check_gpu_tokens(op, x, &device)?;
    check_tokens(op, "d_y", d_y, d_out, &[x.dtype()], &device)?;
    if d_y.shape()[0] != tokens {
        return Err(Error::invalid(
            op,
            "d_y",
            format!("shape [{tokens}, {d_out}] (the tokens of x)"),
            format!("shape {:?}", d_y.shape()),
        ));
    }
    if let Some(d_x) = targets.d_x.as_deref() {
        check_output(op, "targets.d_x", d_x, x.dtype(), &[tokens, d_in], &device)?;
    }
    if let Some(d_weight) = targets.d_weight.as_deref() {
        check_output(
            op,
            "targets.d_weight",
            d_weight,
            DType::F32,
            layer.weight.shape(),
            &device,
        )?;
    }
    if let Some(d_alpha) = targets.d_alpha.as_deref() {
        check_output(op, "targets.d_alpha", d_alpha, DType::F32, &[d_in], &device)?;
    }
    if let Some(d_beta) = targets.d_beta.as_deref() {
        check_output(op, "targets.d_beta", d_beta, DType::F32, &[d_in], &device)?;
    }
    if let Some(d_bias) = targets.d_bias.as_deref() {
        if layer.bias.is_none() {
            return Err(Error::invalid(
                op,
                "targets.d_bias",
                "none, since the layer has no bias",
                "a tensor",
            ));
        }
        check_output(op, "targets.d_bias", d_bias, DType::F32, &[d_out], &device)?;
    }
    match device {
        Device::Cpu => {
            let transposed = match layout {
                BinaryWeightLayout::OutputMajor => None,
                BinaryWeightLayout::InputMajor => Some(cpu::transposed(layer.weight, d_in, d_out)?),
            };
            let layer = BinaryLinear {
                weight: transposed.as_ref().unwrap_or(layer.weight),
                ..layer
            };
            // In f32, so that dX is rounded once to x's dtype, after its sum with the prior.
            let x = with_float_type!(x.dtype(), op, "x", T => cpu::widened::<T>(x))?;
            let d_y = with_float_type!(d_y.dtype(), op, "d_y", T => cpu::widened::<T>(d_y))?;
            let mut grads = BinaryLinearGrads {
                d_x: Tensor::zeros(&[tokens, d_in], DType::F32, &device)?,
                d_weight: Tensor::zeros(&[d_out, d_in], DType::F32, &device)?,
                d_alpha: Tensor::zeros(&[d_in], DType::F32, &device)?,
                d_beta: Tensor::zeros(&[d_in], DType::F32, &device)?,
                d_bias: layer
                    .bias
                    .map(|_| Tensor::zeros(&[d_out], DType::F32, &device))
                    .transpose()?,
            };
            cpu::backward::<f32>(&d_y, &x, &layer, tokens, d_out, d_in, &mut grads)?;
            let dtype = targets.d_x.as_deref().map_or(DType::F32, Tensor::dtype);
            with_float_type!(dtype, op, "targets.d_x", T => cpu::add_grads::<T>(&grads, layout, targets))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let shape = cuda::BackwardShape {
                tokens,
                d_out,
                d_in,
                input_major: layout == BinaryWeightLayout::InputMajor,
                accumulate: true,
            };
            cuda::train_backward(d_y, x, &layer, shape, targets)
        }
    }
}

/// The spec's xnor initialisation from a latent weight `[d_out, d_in]` (f32): per input column,
/// `β_j = mean_i W_ij` and `α_j = mean_i |W_ij − β_j|`. Returns `(alpha, beta)`, f32 `[d_in]`,
/// on the weight's device (a GPU weight is read back to the host, once per layer).
pub fn binary_init(weight: &Tensor) -> Result<(Tensor, Tensor)> {
    let (d_out, d_in) = check_weight(OP_INIT, weight)?;
    let w = weight.to_vec::<f32>()?;
    let (alpha, beta) = cpu::xnor_init(&w, d_out, d_in);
    let device = weight.device();
    Ok((
        Tensor::from_vec(alpha, &[d_in], &device)?,
        Tensor::from_vec(beta, &[d_in], &device)?,
    ))
}

/// Packs the signs of a latent weight f32 `[d_out, d_in]` into u32 `[d_out, ceil(d_in/32)]`
/// (bit 1 for `w < 0`; see the module's notes on sign(0) and layout), on its device.
pub fn binary_pack(weight: &Tensor) -> Result<Tensor> {
    let (d_out, d_in) = check_weight(OP_PACK, weight)?;
    let shape = [d_out, packed_words(d_in)];
    match weight.device() {
        Device::Cpu => {
            let mut bits = Tensor::zeros(&shape, DType::U32, &Device::Cpu)?;
            cpu::pack(weight.host_slice()?, d_in, bits.host_slice_mut()?);
            Ok(bits)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => {
            let mut bits = Tensor::uninit_cuda(&shape, DType::U32, &backend)?;
            cuda::pack(weight, d_out, d_in, &mut bits)?;
            Ok(bits)
        }
    }
}

/// Checks packed bits for `d_in` inputs; returns d_out.
fn check_bits(op: &'static str, bits: &Tensor, d_in: usize) -> Result<usize> {
    check_dim(op, "d_in", "d_in", d_in)?;
    bits.expect_rank(op, "bits", 2)?;
    bits.expect_dtype(op, "bits", &[DType::U32])?;
    let (d_out, words) = (bits.shape()[0], bits.shape()[1]);
    if words != packed_words(d_in) {
        return Err(Error::invalid(
            op,
            "bits",
            format!("{} u32 words per row for d_in = {d_in}", packed_words(d_in)),
            format!("shape {:?}", bits.shape()),
        ));
    }
    check_dim(op, "bits", "d_out", d_out)?;
    Ok(d_out)
}

/// The signs of packed bits as f32 ±1, `[d_out, d_in]`, on their device.
pub fn binary_unpack(bits: &Tensor, d_in: usize) -> Result<Tensor> {
    let d_out = check_bits(OP_UNPACK, bits, d_in)?;
    let shape = [d_out, d_in];
    match bits.device() {
        Device::Cpu => {
            let mut signs = Tensor::zeros(&shape, DType::F32, &Device::Cpu)?;
            cpu::unpack(bits.host_slice()?, d_in, signs.host_slice_mut()?);
            Ok(signs)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => {
            let mut signs = Tensor::uninit_cuda(&shape, DType::F32, &backend)?;
            cuda::unpack(bits, d_out, d_in, &mut signs)?;
            Ok(signs)
        }
    }
}

/// Validates a packed forward; returns (tokens, d_out).
fn check_packed(x: &Tensor, layer: &PackedBinaryLinear<'_>) -> Result<(usize, usize)> {
    let d_in = layer.d_in;
    let d_out = check_bits(OP_PACKED, layer.bits, d_in)?;
    let device = layer.bits.device();
    check_vector(OP_PACKED, "alpha", layer.alpha, d_in, &device)?;
    check_vector(OP_PACKED, "beta", layer.beta, d_in, &device)?;
    if let Some(bias) = layer.bias {
        check_vector(OP_PACKED, "bias", bias, d_out, &device)?;
    }
    let dtypes: &[DType] = if device.is_cuda() {
        &[DType::BF16, DType::F16]
    } else {
        &[DType::F32, DType::BF16, DType::F16]
    };
    let tokens = check_tokens(OP_PACKED, "x", x, d_in, dtypes, &device)?;
    if device.is_cuda() && tokens > MAX_GPU_TOKENS {
        return Err(Error::invalid(
            OP_PACKED,
            "x",
            format!("at most {MAX_GPU_TOKENS} tokens per call on a GPU"),
            format!("shape {:?}", x.shape()),
        ));
    }
    Ok((tokens, d_out))
}

/// The packed forward `y = Σ_j s_ij (α_j x_j) + Σ_j β_j x_j + b_i` per token: `x` `[tokens, d_in]`
/// (f32, bf16 or f16 on the CPU; bf16 or f16 on a GPU), returns `[tokens, d_out]` of x's dtype.
/// f32 accumulation. On a GPU, up to [`GEMV_MAX_TOKENS`] tokens stream the bits once through
/// a GEMV; more use a tensor-core GEMM.
pub fn binary_packed_forward(x: &Tensor, layer: PackedBinaryLinear<'_>) -> Result<Tensor> {
    let (tokens, d_out) = check_packed(x, &layer)?;
    let mut y = new_output(&[tokens, d_out], x.dtype(), &x.device())?;
    binary_packed_forward_into(x, layer, &mut y)?;
    Ok(y)
}

/// [`binary_packed_forward`] into an existing `y` `[tokens, d_out]` of x's dtype and device.
pub fn binary_packed_forward_into(x: &Tensor, layer: PackedBinaryLinear<'_>, y: &mut Tensor) -> Result<()> {
    let (tokens, d_out) = check_packed(x, &layer)?;
    y.expect_dtype(OP_PACKED, "y", &[x.dtype()])?;
    y.expect_shape(OP_PACKED, "y", &[tokens, d_out])?;
    x.device().expect_same(&y.device(), OP_PACKED, "y")?;
    match x.device() {
        Device::Cpu => {
            with_float_type!(x.dtype(), OP_PACKED, "x", T => cpu::packed_forward::<T>(x, &layer, tokens, d_out, y))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::packed_forward(x, &layer, tokens, d_out, y),
    }
}

/// Validates the distillation loss's arguments; returns (rows, vocab).
fn check_distill(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    ce_weight: f32,
) -> Result<(usize, usize)> {
    let op = OP_DISTILL;
    student.expect_rank(op, "student", 2)?;
    student.expect_dtype(op, "student", &[DType::F32, DType::BF16, DType::F16])?;
    let (rows, vocab) = (student.shape()[0], student.shape()[1]);
    check_dim(op, "student", "a row count", rows)?;
    check_dim(op, "student", "a vocabulary size", vocab)?;
    teacher.expect_dtype(op, "teacher", &[student.dtype()])?;
    teacher.expect_shape(op, "teacher", student.shape())?;
    let device = student.device();
    device.expect_same(&teacher.device(), op, "teacher")?;
    if !(0.0..=1.0).contains(&ce_weight) {
        return Err(Error::invalid(op, "ce_weight", "a number in [0, 1]", ce_weight));
    }
    match labels {
        None if ce_weight != 0.0 => {
            return Err(Error::invalid(
                op,
                "labels",
                format!("next-token labels, since ce_weight = {ce_weight} mixes in their cross-entropy"),
                "none",
            ))
        }
        None => {}
        Some(labels) => {
            labels.expect_dtype(op, "labels", &[DType::U32])?;
            labels.expect_shape(op, "labels", &[rows])?;
            device.expect_same(&labels.device(), op, "labels")?;
            // Read back (rows × 4 bytes) so that no out-of-range label reaches a kernel.
            if let Some((row, &label)) = labels
                .to_vec::<u32>()?
                .iter()
                .enumerate()
                .find(|(_, &l)| l as usize >= vocab)
            {
                return Err(Error::invalid(
                    op,
                    "labels",
                    format!("every label below the vocabulary size {vocab}"),
                    format!("{label} at row {row}"),
                ));
            }
        }
    }
    Ok((rows, vocab))
}

/// The autoregressive distillation loss with the optional next-token mix:
/// `L = (1 − w)·L_AD + w·CE`, `L_AD = −(1/R) Σ_r Σ_c softmax(teacher_r)_c · log softmax(student_r)_c`,
/// `CE = −(1/R) Σ_r log softmax(student_r)_{label_r}`, `w = ce_weight` (0 for pure AD; the spec's
/// ablation uses 0.5). `student` and `teacher` are logits `[rows, vocab]` of one dtype (rows =
/// batch × sequence); `labels` u32 `[rows]`, needed when `w > 0`. Returns the loss (f32 `[1]`)
/// and its gradient with respect to the student logits (`[rows, vocab]`, the student's dtype):
/// `((1 − w)(p_S − p_T) + w(p_S − onehot)) / R`. Each row is reduced in f32 with running maxima
/// (no overflow for large logits) and its gradient written directly: no probability tensor is
/// ever stored. Deterministic.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    ce_weight: f32,
) -> Result<(Tensor, Tensor)> {
    check_distill(student, teacher, labels, ce_weight)?;
    let device = student.device();
    let mut grad = new_output(student.shape(), student.dtype(), &device)?;
    let mut loss = Tensor::zeros(&[1], DType::F32, &device)?;
    distill_loss_into(student, teacher, labels, ce_weight, &mut loss, &mut grad)?;
    Ok((loss, grad))
}

/// [`distill_loss`] into an existing `loss` (f32 `[1]`) and `grad` (like `student`).
pub fn distill_loss_into(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    ce_weight: f32,
    loss: &mut Tensor,
    grad: &mut Tensor,
) -> Result<()> {
    let (rows, vocab) = check_distill(student, teacher, labels, ce_weight)?;
    let device = student.device();
    loss.expect_dtype(OP_DISTILL, "loss", &[DType::F32])?;
    loss.expect_shape(OP_DISTILL, "loss", &[1])?;
    device.expect_same(&loss.device(), OP_DISTILL, "loss")?;
    grad.expect_dtype(OP_DISTILL, "grad", &[student.dtype()])?;
    grad.expect_shape(OP_DISTILL, "grad", student.shape())?;
    device.expect_same(&grad.device(), OP_DISTILL, "grad")?;
    match device {
        Device::Cpu => with_float_type!(student.dtype(), OP_DISTILL, "student", T =>
            cpu::distill::<T>(student, teacher, labels, ce_weight, rows, vocab, loss, grad)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::distill(student, teacher, labels, ce_weight, rows, vocab, loss, grad),
    }
}

/// The running statistics of one row of the distillation loss, all f32: the student's maximum
/// and `Σ exp(z_S − m_S)`, the teacher's maximum and `Σ exp(z_T − m_T)`, and the cross term
/// `u = Σ exp(z_T − m_T)·(z_S − m_S)`, so that `L_AD = log s_S − u / s_T` needs no difference of
/// large numbers. The CUDA kernel keeps the same state and merges it the same way.
#[derive(Clone, Copy, Debug)]
struct RowStats {
    m_s: f32,
    s_s: f32,
    m_t: f32,
    s_t: f32,
    u: f32,
}

impl RowStats {
    const EMPTY: RowStats = RowStats {
        m_s: f32::NEG_INFINITY,
        s_s: 0.0,
        m_t: f32::NEG_INFINITY,
        s_t: 0.0,
        u: 0.0,
    };

    fn push(&mut self, z_s: f32, z_t: f32) {
        if z_s > self.m_s {
            // Re-centre the cross term on the new maximum: u -= Δ·s_T.
            if self.s_t > 0.0 {
                self.u -= (z_s - self.m_s) * self.s_t;
            }
            self.s_s = self.s_s * (self.m_s - z_s).exp() + 1.0;
            self.m_s = z_s;
        } else {
            self.s_s += (z_s - self.m_s).exp();
        }
        if z_t == f32::NEG_INFINITY {
            return;
        }
        if z_t > self.m_t {
            let scale = (self.m_t - z_t).exp();
            self.s_t = self.s_t * scale + 1.0;
            self.u = self.u * scale + (z_s - self.m_s);
            self.m_t = z_t;
        } else {
            let e = (z_t - self.m_t).exp();
            if e > 0.0 {
                self.s_t += e;
                self.u += e * (z_s - self.m_s);
            }
        }
    }

    /// `log s_S − u / s_T`: the row's −Σ p_T log p_S.
    fn distill(&self) -> f32 {
        self.s_s.ln() - self.u / self.s_t
    }
}

mod cpu {
    use super::*;

    #[inline(always)]
    fn sign(w: f32) -> f32 {
        if w > 0.0 {
            1.0
        } else if w < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    pub(super) fn forward<T: Float>(
        x: &Tensor,
        layer: &BinaryLinear<'_>,
        tokens: usize,
        d_out: usize,
        d_in: usize,
        y: &mut Tensor,
    ) -> Result<()> {
        let x = x.host_slice::<T>()?;
        let w = layer.weight.host_slice::<f32>()?;
        let alpha = layer.alpha.host_slice::<f32>()?;
        let beta = layer.beta.host_slice::<f32>()?;
        let bias = layer.bias.map(|b| b.host_slice::<f32>()).transpose()?;
        // The input scaled by α, and the rank-1 β term per token.
        let scaled: Vec<f32> = x
            .chunks_exact(d_in)
            .flat_map(|row| row.iter().zip(alpha).map(|(v, a)| v.to_f32() * a))
            .collect();
        let shift: Vec<f32> = x
            .chunks_exact(d_in)
            .map(|row| row.iter().zip(beta).map(|(v, b)| v.to_f32() * b).sum())
            .collect();
        // One output channel per task: the signs of its weight row, once, against every token.
        let columns: Vec<Vec<f32>> = (0..d_out)
            .into_par_iter()
            .map(|i| {
                let signs: Vec<f32> = w[i * d_in..(i + 1) * d_in].iter().map(|&v| sign(v)).collect();
                let b = bias.map_or(0.0, |b| b[i]);
                (0..tokens)
                    .map(|n| {
                        let a = &scaled[n * d_in..(n + 1) * d_in];
                        signs.iter().zip(a).map(|(s, a)| s * a).sum::<f32>() + shift[n] + b
                    })
                    .collect()
            })
            .collect();
        let y = y.host_slice_mut::<T>()?;
        for (i, column) in columns.iter().enumerate() {
            for (n, value) in column.iter().enumerate() {
                y[n * d_out + i] = T::from_f32(*value);
            }
        }
        Ok(())
    }

    pub(super) fn backward<T: Float>(
        d_y: &Tensor,
        x: &Tensor,
        layer: &BinaryLinear<'_>,
        tokens: usize,
        d_out: usize,
        d_in: usize,
        grads: &mut BinaryLinearGrads,
    ) -> Result<()> {
        let dy: Vec<f32> = d_y.host_slice::<T>()?.iter().map(|v| v.to_f32()).collect();
        let xs: Vec<f32> = x.host_slice::<T>()?.iter().map(|v| v.to_f32()).collect();
        let w = layer.weight.host_slice::<f32>()?;
        let alpha = layer.alpha.host_slice::<f32>()?;
        let beta = layer.beta.host_slice::<f32>()?;
        // P = dY·S and the row sums of dY carry dX, dα and dβ:
        // dX = α⊙P + β·rowsum, dα_j = Σ_n X[n,j] P[n,j], dβ_j = Σ_n X[n,j] rowsum[n].
        let row_sums: Vec<f32> = dy.chunks_exact(d_out).map(|row| row.iter().sum()).collect();
        let mut p = vec![0.0f32; tokens * d_in];
        p.par_chunks_mut(d_in).enumerate().for_each(|(n, p_row)| {
            for (i, &g) in dy[n * d_out..(n + 1) * d_out].iter().enumerate() {
                if g == 0.0 {
                    continue;
                }
                for (p, &v) in p_row.iter_mut().zip(&w[i * d_in..(i + 1) * d_in]) {
                    *p += g * sign(v);
                }
            }
        });
        grads
            .d_x
            .host_slice_mut::<T>()?
            .par_chunks_mut(d_in)
            .enumerate()
            .for_each(|(n, row)| {
                for (j, out) in row.iter_mut().enumerate() {
                    *out = T::from_f32(alpha[j] * p[n * d_in + j] + beta[j] * row_sums[n]);
                }
            });
        let d_alpha = grads.d_alpha.host_slice_mut::<f32>()?;
        let d_beta = grads.d_beta.host_slice_mut::<f32>()?;
        d_alpha.fill(0.0);
        d_beta.fill(0.0);
        for n in 0..tokens {
            for j in 0..d_in {
                let v = xs[n * d_in + j];
                d_alpha[j] += v * p[n * d_in + j];
                d_beta[j] += v * row_sums[n];
            }
        }
        // dW_ij = α_j G_ij with G = dYᵀX, one weight row per task.
        grads
            .d_weight
            .host_slice_mut::<f32>()?
            .par_chunks_mut(d_in)
            .enumerate()
            .for_each(|(i, row)| {
                row.fill(0.0);
                for n in 0..tokens {
                    let g = dy[n * d_out + i];
                    for (r, &v) in row.iter_mut().zip(&xs[n * d_in..(n + 1) * d_in]) {
                        *r += g * v;
                    }
                }
                for (r, a) in row.iter_mut().zip(alpha) {
                    *r *= a;
                }
            });
        if let Some(d_bias) = grads.d_bias.as_mut() {
            let db = d_bias.host_slice_mut::<f32>()?;
            db.fill(0.0);
            for row in dy.chunks_exact(d_out) {
                for (d, g) in db.iter_mut().zip(row) {
                    *d += g;
                }
            }
        }
        Ok(())
    }

    /// An f32 `[rows, cols]` host tensor transposed, `[cols, rows]`.
    pub(super) fn transposed(t: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
        let values = t.host_slice::<f32>()?;
        let out: Vec<f32> = (0..rows * cols).map(|k| values[(k % rows) * cols + k / rows]).collect();
        Tensor::from_vec(out, &[cols, rows], &Device::Cpu)
    }

    /// A float host tensor's values as f32.
    pub(super) fn widened<T: Float>(t: &Tensor) -> Result<Tensor> {
        let values: Vec<f32> = t.host_slice::<T>()?.iter().map(|v| v.to_f32()).collect();
        Tensor::from_vec(values, t.shape(), &Device::Cpu)
    }

    /// Adds the op's gradients (all f32, the weight's `[d_out, d_in]`) to `targets`, the
    /// weight's in `layout`; dX is added in f32 and rounded once to T, or overwritten.
    pub(super) fn add_grads<T: Float>(
        grads: &BinaryLinearGrads,
        layout: BinaryWeightLayout,
        targets: BinaryGradTargets<'_>,
    ) -> Result<()> {
        fn add(dst: &mut Tensor, src: &Tensor) -> Result<()> {
            let src = src.host_slice::<f32>()?;
            dst.host_slice_mut::<f32>()?
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d += s);
            Ok(())
        }
        if let Some(d_x) = targets.d_x {
            let src = grads.d_x.host_slice::<f32>()?;
            let accumulate = targets.accumulate_d_x;
            d_x.host_slice_mut::<T>()?.iter_mut().zip(src).for_each(|(d, &s)| {
                *d = T::from_f32(if accumulate { d.to_f32() + s } else { s });
            });
        }
        if let Some(d_weight) = targets.d_weight {
            match layout {
                BinaryWeightLayout::OutputMajor => add(d_weight, &grads.d_weight)?,
                BinaryWeightLayout::InputMajor => {
                    let (d_out, d_in) = (grads.d_weight.shape()[0], grads.d_weight.shape()[1]);
                    add(d_weight, &transposed(&grads.d_weight, d_out, d_in)?)?
                }
            }
        }
        for (target, grad) in [(targets.d_alpha, &grads.d_alpha), (targets.d_beta, &grads.d_beta)] {
            if let Some(target) = target {
                add(target, grad)?;
            }
        }
        if let (Some(target), Some(grad)) = (targets.d_bias, &grads.d_bias) {
            add(target, grad)?;
        }
        Ok(())
    }

    /// Column means in f64, rounded once to f32.
    pub(super) fn xnor_init(w: &[f32], d_out: usize, d_in: usize) -> (Vec<f32>, Vec<f32>) {
        let mut mean = vec![0.0f64; d_in];
        for row in w.chunks_exact(d_in) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        for m in &mut mean {
            *m /= d_out as f64;
        }
        let mut spread = vec![0.0f64; d_in];
        for row in w.chunks_exact(d_in) {
            for ((s, &v), m) in spread.iter_mut().zip(row).zip(&mean) {
                *s += (v as f64 - m).abs();
            }
        }
        let alpha = spread.iter().map(|s| (s / d_out as f64) as f32).collect();
        let beta = mean.iter().map(|&m| m as f32).collect();
        (alpha, beta)
    }

    pub(super) fn pack(w: &[f32], d_in: usize, bits: &mut [u32]) {
        let words = packed_words(d_in);
        bits.par_chunks_mut(words)
            .zip(w.par_chunks(d_in))
            .for_each(|(out, row)| {
                for (word, chunk) in out.iter_mut().zip(row.chunks(32)) {
                    *word = chunk
                        .iter()
                        .enumerate()
                        .fold(0u32, |acc, (b, &v)| acc | (((v < 0.0) as u32) << b));
                }
            });
    }

    pub(super) fn unpack(bits: &[u32], d_in: usize, signs: &mut [f32]) {
        let words = packed_words(d_in);
        signs
            .par_chunks_mut(d_in)
            .zip(bits.par_chunks(words))
            .for_each(|(row, bits)| {
                for (j, s) in row.iter_mut().enumerate() {
                    *s = if (bits[j / 32] >> (j % 32)) & 1 == 1 { -1.0 } else { 1.0 };
                }
            });
    }

    pub(super) fn packed_forward<T: Float>(
        x: &Tensor,
        layer: &PackedBinaryLinear<'_>,
        tokens: usize,
        d_out: usize,
        y: &mut Tensor,
    ) -> Result<()> {
        let d_in = layer.d_in;
        let words = packed_words(d_in);
        let x = x.host_slice::<T>()?;
        let bits = layer.bits.host_slice::<u32>()?;
        let alpha = layer.alpha.host_slice::<f32>()?;
        let beta = layer.beta.host_slice::<f32>()?;
        let bias = layer.bias.map(|b| b.host_slice::<f32>()).transpose()?;
        // α·x and the β term per token, then one output channel per task against every token:
        // each weight word is read once, and each bit flips the sign of its scaled input.
        let scaled: Vec<f32> = x
            .chunks_exact(d_in)
            .flat_map(|row| row.iter().zip(alpha).map(|(v, a)| v.to_f32() * a))
            .collect();
        let shift: Vec<f32> = x
            .chunks_exact(d_in)
            .map(|row| row.iter().zip(beta).map(|(v, b)| v.to_f32() * b).sum())
            .collect();
        let columns: Vec<Vec<f32>> = bits
            .par_chunks(words)
            .enumerate()
            .map(|(i, row_bits)| {
                let b = bias.map_or(0.0, |b| b[i]);
                (0..tokens)
                    .map(|n| {
                        let a = &scaled[n * d_in..(n + 1) * d_in];
                        let mut sum = 0.0f32;
                        for (word, a) in row_bits.iter().zip(a.chunks(32)) {
                            for (bit, &a) in a.iter().enumerate() {
                                sum += f32::from_bits(a.to_bits() ^ (((word >> bit) & 1) << 31));
                            }
                        }
                        sum + shift[n] + b
                    })
                    .collect()
            })
            .collect();
        let y = y.host_slice_mut::<T>()?;
        for (i, column) in columns.iter().enumerate() {
            for (n, value) in column.iter().enumerate() {
                y[n * d_out + i] = T::from_f32(*value);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn distill<T: Float>(
        student: &Tensor,
        teacher: &Tensor,
        labels: Option<&Tensor>,
        ce_weight: f32,
        rows: usize,
        vocab: usize,
        loss: &mut Tensor,
        grad: &mut Tensor,
    ) -> Result<()> {
        let s = student.host_slice::<T>()?;
        let t = teacher.host_slice::<T>()?;
        let labels = labels.map(|l| l.host_slice::<u32>()).transpose()?;
        let scale = 1.0 / rows as f32;
        let grad = grad.host_slice_mut::<T>()?;
        // One pass per row for the statistics, a second writing the row's gradient while the row
        // is still in cache: only the gradient is ever stored.
        let row_losses: Vec<f32> = grad
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(r, g)| {
                let (zs, zt) = (&s[r * vocab..(r + 1) * vocab], &t[r * vocab..(r + 1) * vocab]);
                let mut stats = RowStats::EMPTY;
                for (a, b) in zs.iter().zip(zt) {
                    stats.push(a.to_f32(), b.to_f32());
                }
                let label = labels.map(|l| l[r] as usize);
                let (inv_s, inv_t) = (1.0 / stats.s_s, 1.0 / stats.s_t);
                for (c, ((out, a), b)) in g.iter_mut().zip(zs).zip(zt).enumerate() {
                    let p_s = (a.to_f32() - stats.m_s).exp() * inv_s;
                    let p_t = (b.to_f32() - stats.m_t).exp() * inv_t;
                    let hot = if label == Some(c) { 1.0 } else { 0.0 };
                    *out = T::from_f32(scale * ((1.0 - ce_weight) * (p_s - p_t) + ce_weight * (p_s - hot)));
                }
                let ce = label.map_or(0.0, |l| stats.s_s.ln() - (zs[l].to_f32() - stats.m_s));
                (1.0 - ce_weight) * stats.distill() + ce_weight * ce
            })
            .collect();
        loss.host_slice_mut::<f32>()?[0] = row_losses.iter().sum::<f32>() * scale;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::MatmulOptions;
    use cudarc::driver::sys::CUfunction_attribute_enum;
    use std::sync::Arc;

    /// Must match kernels/binary.cu.
    const THREADS: u32 = 256;
    const GEMV_ROWS: usize = 32;
    const GEMV_PHASE_K: usize = 4096;
    const GEMM_TILE: usize = 128;
    const DISTILL_THREADS: u32 = 512;

    fn suffix(dtype: DType) -> &'static str {
        dtype.name()
    }

    fn grid(op: &'static str, arg: &'static str, blocks: usize) -> Result<u32> {
        u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::invalid(
                    op,
                    arg,
                    "a tensor small enough for one launch",
                    format!("{blocks} blocks"),
                )
            })
    }

    pub(super) fn pack(weight: &Tensor, d_out: usize, d_in: usize, bits: &mut Tensor) -> Result<()> {
        let buffer = weight.device_buffer()?;
        let backend = buffer.backend().clone();
        let (w, out) = (buffer.address(), bits.device_buffer()?.address());
        let warps = d_out * packed_words(d_in);
        let blocks = grid(OP_PACK, "weight", warps.div_ceil(THREADS as usize / 32))?;
        let (rows, cols) = (d_out as i32, d_in as i32);
        let function = backend.function("binary", "binary_pack")?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&w).arg(&out).arg(&rows).arg(&cols);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: w is f32 [rows, cols], out u32 [rows, ceil(cols/32)]; one warp per output word.
        unsafe { builder.launch(config) }.context("launching binary_pack")?;
        Ok(())
    }

    pub(super) fn unpack(bits: &Tensor, d_out: usize, d_in: usize, signs: &mut Tensor) -> Result<()> {
        let buffer = bits.device_buffer()?;
        let backend = buffer.backend().clone();
        let (b, out) = (buffer.address(), signs.device_buffer()?.address());
        let total = (d_out * d_in) as u64;
        let blocks = (total.div_ceil(THREADS as u64)).min(backend.multiprocessors() as u64 * 32) as u32;
        let (rows, cols) = (d_out as i32, d_in as i32);
        let function = backend.function("binary", "binary_unpack")?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&b).arg(&out).arg(&rows).arg(&cols);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bits is u32 [rows, ceil(cols/32)], out f32 [rows, cols]; a grid-stride loop
        // over exactly rows·cols elements.
        unsafe { builder.launch(config) }.context("launching binary_unpack")?;
        Ok(())
    }

    pub(super) fn packed_forward(
        x: &Tensor,
        layer: &PackedBinaryLinear<'_>,
        tokens: usize,
        d_out: usize,
        y: &mut Tensor,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let d_in = layer.d_in;
        let words = packed_words(d_in);
        let x_address = x_buffer.address();
        let bits = layer.bits.device_buffer()?.address();
        let alpha = layer.alpha.device_buffer()?.address();
        let beta = layer.beta.device_buffer()?.address();
        let bias = match layer.bias {
            Some(b) => b.device_buffer()?.address(),
            None => 0,
        };
        let y_address = y.device_buffer()?.address();
        let (m, n, k, w) = (tokens as i32, d_out as i32, d_in as i32, words as i32);
        let dtype = suffix(x.dtype());
        if tokens <= GEMV_MAX_TOKENS {
            // 128-bit loads of the bits need rows of whole 16-byte vectors, 16-byte aligned.
            let vector = words.is_multiple_of(4) && bits.is_multiple_of(16);
            let token_tiles = tokens.div_ceil(8);
            // 16 token slots allow one block per SM: when 32-row blocks would take more than one
            // wave, 64-row blocks stage the tokens half as often.
            let rows = if token_tiles == 2 && d_out.div_ceil(GEMV_ROWS) > backend.multiprocessors() {
                2 * GEMV_ROWS
            } else {
                GEMV_ROWS
            };
            let name = format!(
                "binary_gemv_{dtype}_t{}{}{}",
                8 * token_tiles,
                if rows == GEMV_ROWS { "" } else { "_r64" },
                if vector { "_vec" } else { "" }
            );
            let shared = (GEMV_PHASE_K * 16 * token_tiles) as u32;
            let function = backend.function("binary", &name)?;
            function
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .context(&format!("allowing {shared} bytes of shared memory for {name}"))?;
            let mut builder = backend.launch_builder(&function);
            builder
                .arg(&x_address)
                .arg(&bits)
                .arg(&alpha)
                .arg(&beta)
                .arg(&bias)
                .arg(&y_address)
                .arg(&m)
                .arg(&n)
                .arg(&k)
                .arg(&w);
            let config = LaunchConfig {
                grid_dim: (grid(OP_PACKED, "bits", d_out.div_ceil(rows))?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: shared,
            };
            // SAFETY: validated shapes (x [m, k], bits [n, w], alpha/beta [k], bias [n] or null,
            // y [m, n]), m <= 16 token slots staged, one block per `rows` output rows.
            unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
            return Ok(());
        }
        // Many tokens: the per-token β term first, then the tensor-core GEMM adds it.
        let shift = Tensor::uninit_cuda(&[tokens], DType::F32, &backend)?;
        let shift_address = shift.device_buffer()?.address();
        let name = format!("binary_token_shift_{dtype}");
        let function = backend.function("binary", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&x_address).arg(&beta).arg(&shift_address).arg(&m).arg(&k);
        let config = LaunchConfig {
            grid_dim: (grid(OP_PACKED, "x", tokens.div_ceil(THREADS as usize / 32))?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x [m, k], beta [k], shift [m]; one warp per token.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;

        let vector = d_in.is_multiple_of(8) && x_address.is_multiple_of(16);
        let name = format!("binary_gemm_{dtype}{}", if vector { "_vec" } else { "" });
        let function = backend.function("binary", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&x_address)
            .arg(&bits)
            .arg(&alpha)
            .arg(&shift_address)
            .arg(&bias)
            .arg(&y_address)
            .arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&w);
        let config = LaunchConfig {
            grid_dim: (
                grid(OP_PACKED, "bits", d_out.div_ceil(GEMM_TILE))?,
                tokens.div_ceil(GEMM_TILE) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes as above; tokens <= MAX_GPU_TOKENS keeps grid y <= 65535;
        // shift holds m f32 written by the launch before on the same stream.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        // `shift` is freed in stream order, after the GEMM has read it.
        drop(shift);
        Ok(())
    }

    /// Columns per row of the training form's GEMM operands: d_in, then the β term's or the
    /// row sums' two columns, the bias's two, zeros up to a multiple of 8 (16-byte rows).
    fn train_pitch(d_in: usize) -> usize {
        (d_in + 4).next_multiple_of(8)
    }

    fn config(grid: (u32, u32), threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Grid rows for a kernel that strides over `rows` rows.
    fn grid_rows(rows: usize) -> u32 {
        rows.min(65535) as u32
    }

    /// The signs of the latent weight in `dtype`, `[d_out, pitch]`: sign(W) (0 for 0), a column
    /// of ones twice, the bias split into high and low parts (zeros without a bias), zeros.
    fn train_signs(
        layer: &BinaryLinear<'_>,
        d_out: usize,
        d_in: usize,
        dtype: DType,
        with_bias: bool,
        input_major: bool,
    ) -> Result<Tensor> {
        let w_buffer = layer.weight.device_buffer()?;
        let backend = w_buffer.backend().clone();
        let pitch = train_pitch(d_in);
        let signs = Tensor::uninit_cuda(&[d_out, pitch], dtype, &backend)?;
        let w = w_buffer.address();
        let bias = match (with_bias, layer.bias) {
            (true, Some(b)) => b.device_buffer()?.address(),
            _ => 0,
        };
        let out = signs.device_buffer()?.address();
        let (rows, cols, p) = (d_out as i32, d_in as i32, pitch as i32);
        let input_major = input_major as i32;
        let name = format!("binary_train_signs_{}", suffix(dtype));
        let function = backend.function("binary", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&w)
            .arg(&bias)
            .arg(&out)
            .arg(&rows)
            .arg(&cols)
            .arg(&p)
            .arg(&input_major);
        let columns = grid(OP_FORWARD, "weight", (pitch / 2).div_ceil(THREADS as usize))?;
        // SAFETY: w is f32 [rows, cols] (input-major: [cols, rows]), bias f32 [rows] or null, out
        // [rows, pitch] of dtype with pitch even; each thread writes one aligned pair of columns
        // of the rows it strides over.
        unsafe { builder.launch(config((columns, grid_rows(d_out)), THREADS)) }
            .context(&format!("launching {name}"))?;
        Ok(signs)
    }

    /// `[rows, cols]` partial sums (one row per chunk of tokens) summed in chunk order into `out`
    /// (added to it with `accumulate`).
    fn finish_columns(
        backend: &Arc<CudaBackend>,
        partial: &Tensor,
        out: &mut Tensor,
        chunks: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (p, o) = (partial.device_buffer()?.address(), out.device_buffer()?.address());
        let (c, n, a) = (chunks as i32, cols as i32, accumulate as i32);
        let function = backend.function("binary", "binary_column_finish")?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&p).arg(&o).arg(&c).arg(&n).arg(&a);
        let blocks = grid(OP_BACKWARD, "x", cols.div_ceil(THREADS as usize))?;
        // SAFETY: partial is f32 [chunks, cols] written by the launch before, out f32 [cols].
        unsafe { builder.launch(config((blocks, 1), THREADS)) }.context("launching binary_column_finish")?;
        Ok(())
    }

    pub(super) fn train_forward(
        x: &Tensor,
        layer: &BinaryLinear<'_>,
        tokens: usize,
        d_out: usize,
        d_in: usize,
        input_major: bool,
        y: &mut Tensor,
    ) -> Result<()> {
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let dtype = x.dtype();
        let pitch = train_pitch(d_in);
        let signs = train_signs(layer, d_out, d_in, dtype, true, input_major)?;

        let scaled = Tensor::uninit_cuda(&[tokens, pitch], dtype, &backend)?;
        let (x_address, out) = (x_buffer.address(), scaled.device_buffer()?.address());
        let alpha = layer.alpha.device_buffer()?.address();
        let beta = layer.beta.device_buffer()?.address();
        let (cols, p) = (d_in as i32, pitch as i32);
        let name = format!("binary_train_scale_{}", suffix(dtype));
        let function = backend.function("binary", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&x_address)
            .arg(&alpha)
            .arg(&beta)
            .arg(&out)
            .arg(&cols)
            .arg(&p);
        let blocks = grid(OP_FORWARD, "x", tokens)?;
        // SAFETY: x [tokens, cols], alpha/beta f32 [cols], out [tokens, pitch] of x's dtype; one
        // block per token writes its whole row.
        unsafe { builder.launch(config((blocks, 1), THREADS)) }.context(&format!("launching {name}"))?;

        // y = [α⊙x | r_hi r_lo | 1 1 | 0…] · [S | 1 1 | b_hi b_lo | 0…]ᵀ, f32 accumulation.
        crate::ops::matmul_into(&scaled, &signs, None, y, MatmulOptions::linear())
    }

    /// The sizes of a training backward and how its weight and gradients are held.
    pub(super) struct BackwardShape {
        pub(super) tokens: usize,
        pub(super) d_out: usize,
        pub(super) d_in: usize,
        /// The weight and dW are `[d_in, d_out]`.
        pub(super) input_major: bool,
        /// dW, dα, dβ and db are added to (dX follows its own flag).
        pub(super) accumulate: bool,
    }

    pub(super) fn train_backward(
        d_y: &Tensor,
        x: &Tensor,
        layer: &BinaryLinear<'_>,
        shape: BackwardShape,
        targets: BinaryGradTargets<'_>,
    ) -> Result<()> {
        let BackwardShape {
            tokens,
            d_out,
            d_in,
            input_major,
            accumulate,
        } = shape;
        let x_buffer = x.device_buffer()?;
        let backend = x_buffer.backend().clone();
        let dtype = x.dtype();
        let pitch = train_pitch(d_in);
        let chunks = tokens.div_ceil(TRAIN_CHUNK_ROWS);
        let chunk_grid = grid(OP_BACKWARD, "x", chunks)?;

        // P' = dY·[S | 1 1 | 0…]: dY·S in columns 0..d_in, the row sums of dY in column d_in.
        let signs = train_signs(layer, d_out, d_in, dtype, false, input_major)?;
        let mut products = Tensor::uninit_cuda(&[tokens, pitch], DType::F32, &backend)?;
        crate::ops::matmul_into(d_y, &signs, None, &mut products, MatmulOptions::default())?;
        drop(signs);

        let partial_alpha = Tensor::uninit_cuda(&[chunks, d_in], DType::F32, &backend)?;
        let partial_beta = Tensor::uninit_cuda(&[chunks, d_in], DType::F32, &backend)?;
        let p = products.device_buffer()?.address();
        let x_address = x_buffer.address();
        let alpha = layer.alpha.device_buffer()?.address();
        let beta = layer.beta.device_buffer()?.address();
        let d_x = match targets.d_x.as_deref() {
            Some(d_x) => d_x.device_buffer()?.address(),
            None => 0,
        };
        let (pa, pb) = (
            partial_alpha.device_buffer()?.address(),
            partial_beta.device_buffer()?.address(),
        );
        let (m, cols, pt) = (tokens as i32, d_in as i32, pitch as i32);
        let accumulate_d_x = targets.accumulate_d_x as i32;
        let name = format!("binary_train_dx_{}", suffix(dtype));
        let function = backend.function("binary", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&p)
            .arg(&x_address)
            .arg(&alpha)
            .arg(&beta)
            .arg(&d_x)
            .arg(&pa)
            .arg(&pb)
            .arg(&m)
            .arg(&cols)
            .arg(&pt)
            .arg(&accumulate_d_x);
        let columns = grid(OP_BACKWARD, "x", d_in.div_ceil(THREADS as usize))?;
        // SAFETY: products f32 [m, pitch] (written by the GEMM before, pitch > cols), x and d_x
        // [m, cols] of one dtype (d_x may be null: not written), alpha/beta f32 [cols], partials
        // f32 [chunks, cols]; grid y = chunks <= 65535 (validated token count).
        unsafe { builder.launch(config((columns, chunk_grid), THREADS)) }.context(&format!("launching {name}"))?;
        if let Some(d_alpha) = targets.d_alpha {
            finish_columns(&backend, &partial_alpha, d_alpha, chunks, d_in, accumulate)?;
        }
        if let Some(d_beta) = targets.d_beta {
            finish_columns(&backend, &partial_beta, d_beta, chunks, d_in, accumulate)?;
        }
        drop((products, partial_alpha, partial_beta));

        if let Some(d_weight) = targets.d_weight {
            // G = dYᵀX [d_out, d_in] (input-major: Gᵀ = XᵀdY [d_in, d_out]) in f32, then dW = α⊙G:
            // in place in dW when it is overwritten in the op's layout, else from a scratch G.
            let (g_rows, g_cols) = if input_major { (d_in, d_out) } else { (d_out, d_in) };
            let transposed = MatmulOptions {
                trans_a: true,
                ..Default::default()
            };
            let (a, b) = if input_major { (x, d_y) } else { (d_y, x) };
            let scratch = if accumulate || input_major {
                let mut g = Tensor::uninit_cuda(&[g_rows, g_cols], DType::F32, &backend)?;
                crate::ops::matmul_into(a, b, None, &mut g, transposed)?;
                Some(g)
            } else {
                crate::ops::matmul_into(a, b, None, d_weight, transposed)?;
                None
            };
            let d_w = d_weight.device_buffer()?.address();
            let g = match &scratch {
                Some(g) => g.device_buffer()?.address(),
                None => d_w,
            };
            let (rows, cols) = (g_rows as i32, g_cols as i32);
            let (per_row, add) = (input_major as i32, accumulate as i32);
            let function = backend.function("binary", "binary_weight_grad")?;
            let mut builder = backend.launch_builder(&function);
            builder
                .arg(&d_w)
                .arg(&g)
                .arg(&alpha)
                .arg(&rows)
                .arg(&cols)
                .arg(&per_row)
                .arg(&add);
            let blocks = grid(OP_BACKWARD, "weight", g_cols.div_ceil(THREADS as usize))?;
            // SAFETY: d_w and g f32 [rows, cols] (g may be d_w: each element is read, then
            // written, by one thread), alpha f32 [d_in] indexed by row when input-major
            // (rows = d_in) else by column (cols = d_in); each thread one column of the rows
            // it strides over.
            unsafe { builder.launch(config((blocks, grid_rows(g_rows)), THREADS)) }
                .context("launching binary_weight_grad")?;
            // The scratch G is freed in stream order, after the kernel has read it.
            drop(scratch);
        }

        if let Some(d_bias) = targets.d_bias {
            let partial = Tensor::uninit_cuda(&[chunks, d_out], DType::F32, &backend)?;
            let (dy, pd) = (d_y.device_buffer()?.address(), partial.device_buffer()?.address());
            let (m, n) = (tokens as i32, d_out as i32);
            let name = format!("binary_column_sums_{}", suffix(dtype));
            let function = backend.function("binary", &name)?;
            let mut builder = backend.launch_builder(&function);
            builder.arg(&dy).arg(&pd).arg(&m).arg(&n);
            let columns = grid(OP_BACKWARD, "d_y", d_out.div_ceil(THREADS as usize))?;
            // SAFETY: dy [m, n] of x's dtype, partial f32 [chunks, n]; grid y = chunks.
            unsafe { builder.launch(config((columns, chunk_grid), THREADS)) }.context(&format!("launching {name}"))?;
            finish_columns(&backend, &partial, d_bias, chunks, d_out, accumulate)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn distill(
        student: &Tensor,
        teacher: &Tensor,
        labels: Option<&Tensor>,
        ce_weight: f32,
        rows: usize,
        vocab: usize,
        loss: &mut Tensor,
        grad: &mut Tensor,
    ) -> Result<()> {
        let s_buffer = student.device_buffer()?;
        let backend = s_buffer.backend().clone();
        let s = s_buffer.address();
        let t = teacher.device_buffer()?.address();
        let l = match labels {
            Some(labels) => labels.device_buffer()?.address(),
            None => 0,
        };
        let g = grad.device_buffer()?.address();
        let row_loss = Tensor::uninit_cuda(&[rows], DType::F32, &backend)?;
        let row_loss_address = row_loss.device_buffer()?.address();
        let (r, v) = (rows as i32, vocab as i32);
        let scale = 1.0f32 / rows as f32;
        let name = format!("distill_loss_rows_{}", suffix(student.dtype()));
        let function = backend.function("binary", &name)?;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&s)
            .arg(&t)
            .arg(&l)
            .arg(&g)
            .arg(&row_loss_address)
            .arg(&r)
            .arg(&v)
            .arg(&ce_weight)
            .arg(&scale);
        let config = LaunchConfig {
            grid_dim: (grid(OP_DISTILL, "student", rows)?, 1, 1),
            block_dim: (DISTILL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: student, teacher and grad are [rows, vocab] of one dtype, labels u32 [rows]
        // below vocab (validated) or null, row_loss f32 [rows]; one block per row.
        unsafe { builder.launch(config) }.context(&format!("launching {name}"))?;
        let loss_address = loss.device_buffer()?.address();
        let function = backend.function("binary", "distill_loss_sum")?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&row_loss_address).arg(&loss_address).arg(&r).arg(&scale);
        let config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (DISTILL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: row_loss holds rows f32 written by the launch before; loss is f32 [1].
        unsafe { builder.launch(config) }.context("launching distill_loss_sum")?;
        drop(row_loss);
        Ok(())
    }
}
