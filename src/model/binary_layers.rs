//! The model's `binary` linear layers (FBI-LLM, ALGORITHMS.md §1): the binary op's training form
//! (forward, and the straight-through backward) on either device, with every gradient added on
//! the layer's device.
//!
//! # Precision
//! The op reads the f32 masters of the latent weight, α, β and the bias, never their bf16
//! compute copies: sign(W) is the same from either (bf16 keeps f32's exponent range), but α and
//! β enter `α⊙x` and the β term in f32 and are rounded once with the product, where a bf16 copy
//! would round each of them first (3 significant digits of every column's scale, every step).
//! Activations stay in the compute dtype (bf16 on a GPU, f32 on the CPU); the gradients are f32.
//!
//! # GPT-2's (in, out) weights
//! A Conv1D weight is stored (in, out), the op's weight (out, in). The op takes the layout
//! ([`ops::BinaryWeightLayout`]): on a GPU the kernel that writes sign(W) for the GEMMs reads the
//! weight transposed (one strided pass per call, where no transposed copy has to be kept in step
//! with every update), and dW comes transposed from its GEMM (`Xᵀ·dY`) before α scales it into
//! the gradient.
//!
//! # The packed inference form
//! [`GptParams::pack_binary`] replaces each binary layer's latent weight by its sign bits (the
//! op's `binary_pack`, `0 → +1`: see the op's notes on sign(0)); the forward then runs
//! `binary_packed_forward_into` (a GEMV streaming the bits at few tokens: decoding), and the
//! model runs inference only.

use super::params::{output_major, BinaryIndex, GptParams, Layout, Linear};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{self, BinaryGradTargets, BinaryLinear, BinaryWeightLayout, PackedBinaryLinear};
use crate::tensor::Tensor;

const OP: &str = "Gpt";

fn layout(linear: &Linear) -> BinaryWeightLayout {
    match linear.layout {
        Layout::InputMajor => BinaryWeightLayout::InputMajor,
        _ => BinaryWeightLayout::OutputMajor,
    }
}

/// `out = x·W~ᵀ + b` of a `binary` layer: the training form, or the packed one.
pub(super) fn forward(
    params: &GptParams,
    linear: &Linear,
    index: BinaryIndex,
    x: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    let value = |i: usize| &params.params[i].value;
    if let Some(bits) = params.packed.get(&linear.weight) {
        let layer = PackedBinaryLinear {
            bits,
            alpha: value(index.alpha),
            beta: value(index.beta),
            bias: linear.bias.map(value),
            d_in: linear.input,
        };
        return ops::binary_packed_forward_into(x, layer, out);
    }
    let layer = BinaryLinear {
        weight: value(linear.weight),
        alpha: value(index.alpha),
        beta: value(index.beta),
        bias: linear.bias.map(value),
    };
    ops::binary_linear_forward_layout_into(x, layer, layout(linear), out)
}

/// A `binary` layer's backward: `dx` (added to what it holds with `accumulate`) and, unless its
/// base is frozen (`train_base` false), the gradients of the latent weight, α, β and the bias
/// added to theirs.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    params: &mut GptParams,
    linear: &Linear,
    index: BinaryIndex,
    x: &Tensor,
    dy: &Tensor,
    dx: Option<&mut Tensor>,
    accumulate: bool,
    train_base: bool,
) -> Result<()> {
    if params.packed.contains_key(&linear.weight) {
        return Err(Error::Unsupported {
            op: OP,
            reason: format!(
                "`{}` is packed (1 bit per weight, no latent weight): a packed model runs inference only",
                params.params[linear.weight].spec.name
            ),
        });
    }
    let (mut weight, mut alpha, mut beta, mut bias) = (None, None, None, None);
    for (i, p) in params.params.iter_mut().enumerate() {
        let slot = if i == linear.weight {
            &mut weight
        } else if i == index.alpha {
            &mut alpha
        } else if i == index.beta {
            &mut beta
        } else if Some(i) == linear.bias {
            &mut bias
        } else {
            continue;
        };
        *slot = Some((&p.value, &mut p.grad));
    }
    let (Some(weight), Some(alpha), Some(beta)) = (weight, alpha, beta) else {
        return Err(Error::invalid(
            OP,
            "layout",
            "a binary layer's weight, alpha and beta among the parameters",
            "missing",
        ));
    };
    let layer = BinaryLinear {
        weight: weight.0,
        alpha: alpha.0,
        beta: beta.0,
        bias: bias.as_ref().map(|b| b.0),
    };
    let targets = BinaryGradTargets {
        d_x: dx,
        accumulate_d_x: accumulate,
        d_weight: train_base.then_some(weight.1),
        d_alpha: train_base.then_some(alpha.1),
        d_beta: train_base.then_some(beta.1),
        d_bias: bias.filter(|_| train_base).map(|b| b.1),
    };
    ops::binary_linear_backward_add(dy, x, layer, layout(linear), targets)
}

impl GptParams {
    /// Packs every `binary` layer for inference: its sign bits replace its latent weight (and
    /// that weight's gradient, moments and compute copy, which become one zero each). The
    /// training form's outputs are kept exactly wherever no latent weight is exactly 0 (a packed
    /// 0 is +1). Already packed layers stay as they are.
    pub fn pack_binary(&mut self) -> Result<()> {
        let linears: Vec<Linear> = self.layout.linears().into_iter().copied().collect();
        for linear in linears.iter().filter(|l| l.binary.is_some()) {
            if self.packed.contains_key(&linear.weight) {
                continue;
            }
            let weight = output_major(&self.params[linear.weight].value, linear)?;
            let bits = ops::binary_pack(&weight)?;
            let placeholder = || Tensor::zeros(&[1], DType::F32, &self.device);
            let p = &mut self.params[linear.weight];
            p.value = placeholder()?;
            p.grad = placeholder()?;
            p.exp_avg = placeholder()?;
            p.exp_avg_sq = placeholder()?;
            if p.compute.is_some() {
                p.compute = Some(Tensor::zeros(&[1], self.dtype, &self.device)?);
            }
            self.packed.insert(linear.weight, bits);
        }
        Ok(())
    }

    /// Whether any binary layer is packed (the model then runs inference only).
    pub fn is_packed(&self) -> bool {
        !self.packed.is_empty()
    }
}
