//! The GPT: an explicit forward that keeps what the backward needs, and an explicit backward,
//! llm.c-style, on activations allocated once for a batch shape (no allocation inside a
//! training step once the shape is set).
//!
//! One block, pre-norm, with the residual adds fused into the normalisations:
//! ```text
//! h = norm1(x)                       (fused: x = previous block's residual + its MLP output)
//! q, k, v = h·Wq, h·Wk, h·Wv         (GPT-2: one fused c_attn GEMM, then split)
//! a = attention(q, k, v)             (causal; RoPE inside when the model uses it)
//! s = x + a·Wo;  m = norm2(s)        (the add is fused into norm2)
//! y = down(act(up(m)))               (GELU, or SwiGLU with a gate)
//! ```
//! then `logits = norm_f(x_L)·Eᵀ` and the fused softmax cross-entropy, which writes the logits'
//! gradient over them. Activations and weights are in the compute dtype (f32 on the CPU, bf16 on
//! a GPU); sums, norms' statistics and the loss are f32.
//!
//! Every block projection goes through `linear_forward` / `linear_backward`, which apply the
//! layer's variant ([`super::variants`]): masked weights (`nm` with its double-pruned input
//! gradient, `unstructured`), `binary` (the binary op's training form), `sparse_low_rank` (the
//! materialised weight, SLTrain's backward) and a LoRA adapter on top. Where a variant allocates
//! inside a step: the adapter's (tokens × rank) products, the binary op's scratch (its ±1 GEMM
//! operands and partial sums), SLTrain's gradients (added on the host), and after every
//! update the host-side recomputation of double-pruned and SLTrain weights (on a GPU, an `nm`
//! layer that the sparse kernels take rebuilds its compressed copies on the device instead).

use super::binary_layers;
use super::config::{Activation, Attention, GptConfig, Norm, Positions};
use super::params::{cast, Block, GptParams, Layout, Linear, LoraIndex, NormIndex, Qkv};
use super::sparse_layers;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{
    self, AttentionMask, AttentionOptions, AttentionRope, CrossEntropyOptions, CrossEntropyOutputs, EmbeddingGradPlan,
    MatmulOptions, NormConfig, NormGrads, NormParams, NormStats, RopeConfig, RopeConvention, WaveletConfig,
};
use crate::tensor::Tensor;

const OP: &str = "Gpt";

/// What the forward keeps of one block for the backward.
struct BlockActivations {
    /// The block's input residual stream (M, C): the embedding for the first block, else the
    /// sum written by this block's fused norm1.
    input: Tensor,
    norm1: Tensor,
    stats1: NormStats,
    /// Queries (M, C), keys and values (M, kv), un-rotated (attention applies RoPE inside).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention's output (M, C) and log-sum-exp per query row and head (batch, seq, heads).
    attention: Tensor,
    lse: Tensor,
    /// `input + attention·Wo` (M, C), written by the fused norm2.
    middle: Tensor,
    norm2: Tensor,
    stats2: NormStats,
    /// The activation's input: GELU's (M, F), or SwiGLU's [gate | up] (M, 2F).
    pre_activation: Tensor,
    /// The activation's output (M, F).
    activated: Tensor,
}

/// Buffers reused by every block, forward and backward.
struct Scratch {
    /// GPT-2's fused query-key-value output (M, C + 2·kv), and its gradient.
    qkv: Option<Tensor>,
    /// SwiGLU's gate and up projections before they are joined (M, F) each, and their gradients.
    gate: Option<Tensor>,
    up: Option<Tensor>,
    /// A block's attention projection and MLP output (M, C).
    projected: Tensor,
    mlp: Tensor,
    /// The gradient of a norm's output (M, C).
    d_normed: Tensor,
    /// Gradients of the attention output (M, C), the pre-activation and the activation.
    d_attention: Tensor,
    d_pre_activation: Tensor,
    d_activated: Tensor,
    /// Attention's input gradients: queries (M, C), keys and values (M, kv).
    d_q: Tensor,
    d_k: Tensor,
    d_v: Tensor,
    /// Ones (M, 1): a bias's gradient is 1ᵀ·dY.
    ones: Tensor,
}

/// Everything that depends on the batch shape.
struct Activations {
    batch: usize,
    seq: usize,
    /// (batch, seq) u32.
    tokens: Tensor,
    targets: Tensor,
    /// The training batch's tokens grouped for the embedding's deterministic backward.
    embedding_plan: EmbeddingGradPlan,
    blocks: Vec<BlockActivations>,
    /// The final residual stream (M, C), written by the fused final norm, and the norm's output.
    last: Tensor,
    final_normed: Tensor,
    final_stats: NormStats,
    /// (M, V); after a training forward, their gradient.
    logits: Tensor,
    /// What the backward scales the logits' gradient by: 1 when the fused cross-entropy scaled
    /// it already, the loss scale when distillation wrote it.
    logits_grad_scale: f32,
    /// Distillation's gradient (M, V), allocated on its first use; it trades places with
    /// `logits` so that the backward reads the gradient where it always does.
    distill_grad: Option<Tensor>,
    losses: Tensor,
    mean_loss: Tensor,
    /// Gradients with respect to the residual stream (M, C), two used in turn.
    d_stream: [Tensor; 2],
    scratch: Scratch,
}

/// A GPT ready to run: its parameters and the activations of one batch shape.
pub struct Gpt {
    pub params: GptParams,
    activations: Activations,
    pub(super) attention: AttentionOptions,
    pub(super) norm: NormConfig,
    /// WaveletGPT's mixing between blocks, when the model uses it.
    pub(super) wavelet: Option<WaveletConfig>,
}

impl Gpt {
    /// The model of `params`, with activations for batches of `batch` sequences of `seq` tokens.
    pub fn new(params: GptParams, batch: usize, seq: usize) -> Result<Gpt> {
        let config = &params.config;
        check_batch_shape(config, batch, seq)?;
        let norm = match config.norm {
            Norm::LayerNorm => NormConfig::layer_norm(config.norm_eps),
            Norm::RmsNorm => NormConfig::rms_norm(config.norm_eps),
        };
        let (mask, ceiling) = match config.attention {
            Attention::Causal => (AttentionMask::Causal, None),
            Attention::Window { size } => (
                AttentionMask::Window {
                    left: size - 1,
                    right: 0,
                },
                None,
            ),
            // LM-Infinite caps relative distances at the local window (§4.3).
            Attention::Lambda { global, window } => (AttentionMask::Lambda { global, window }, Some(window)),
        };
        let rope = match &config.positions {
            Positions::Learned => None,
            Positions::Rope { bases } => Some(AttentionRope {
                config: RopeConfig::new(
                    config.head_dim(),
                    bases.iter().map(|&b| b as f64).collect(),
                    RopeConvention::RotateHalf,
                )?,
                distance_ceiling: ceiling,
            }),
        };
        let attention = AttentionOptions {
            mask,
            scale: None,
            varlen: None,
            rope,
        };
        let wavelet = if config.wavelet {
            Some(WaveletConfig::paper_default(config.width, config.context)?)
        } else {
            None
        };
        let activations = Activations::new(&params, batch, seq)?;
        Ok(Gpt {
            params,
            activations,
            attention,
            norm,
            wavelet,
        })
    }

    /// The mean next-token loss of `inputs` against `targets` (each `batch · seq` tokens), with
    /// the gradients of `loss_scale · loss` added to the parameters' gradients.
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        loss_scale: f32,
    ) -> Result<f32> {
        self.forward_backward_queued(inputs, targets, batch, seq, loss_scale)?;
        self.mean_loss()
    }

    /// [`Gpt::forward_backward`] without reading the loss back: the work is only queued, and
    /// [`Gpt::last_loss`] reads the loss later, so that a training step can wait for the device
    /// once, after its gradient norm.
    pub fn forward_backward_queued(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        loss_scale: f32,
    ) -> Result<()> {
        self.forward(inputs, Some(targets), batch, seq, Some(loss_scale))?;
        self.backward()
    }

    /// The mean loss of the last forward with targets (it waits for the device).
    pub fn last_loss(&self) -> Result<f32> {
        self.mean_loss()
    }

    /// FBI-LLM's autoregressive distillation (ALGORITHMS.md §1.6): the loss
    /// `(1 − w)·L_AD + w·CE` of the model's logits against `teacher_logits` (batch · seq, vocab),
    /// in the compute dtype, and the teacher's softmax as targets, `w = ce_weight`, with the
    /// gradients of `loss_scale · loss` added to the parameters' gradients. `targets` are read
    /// only when `w > 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_distill(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        teacher_logits: &Tensor,
        ce_weight: f32,
        batch: usize,
        seq: usize,
        loss_scale: f32,
    ) -> Result<f32> {
        let m = batch * seq;
        check_tokens("targets", targets, m, self.params.config.vocab)?;
        teacher_logits.expect_shape(OP, "teacher_logits", &[m, self.params.config.vocab])?;
        self.forward(inputs, None, batch, seq, None)?;
        let acts = &mut self.activations;
        acts.targets
            .copy_from(&Tensor::from_slice(targets, &[m], &Device::Cpu)?)?;
        acts.embedding_plan.update(inputs)?;
        let grad = match &mut acts.distill_grad {
            Some(grad) => grad,
            empty => empty.insert(Tensor::zeros(
                acts.logits.shape(),
                acts.logits.dtype(),
                &acts.logits.device(),
            )?),
        };
        let labels = (ce_weight > 0.0).then_some(&acts.targets);
        ops::distill_loss_into(
            &acts.logits,
            teacher_logits,
            labels,
            ce_weight,
            &mut acts.mean_loss,
            grad,
        )?;
        std::mem::swap(&mut acts.logits, grad);
        acts.logits_grad_scale = loss_scale;
        self.backward()?;
        self.mean_loss()
    }

    /// The mean next-token loss, without gradients.
    pub fn loss(&mut self, inputs: &[u32], targets: &[u32], batch: usize, seq: usize) -> Result<f32> {
        self.forward(inputs, Some(targets), batch, seq, None)?;
        self.mean_loss()
    }

    /// The logits (batch · seq, vocab) of `inputs`, in the compute dtype.
    pub fn logits(&mut self, inputs: &[u32], batch: usize, seq: usize) -> Result<&Tensor> {
        self.forward(inputs, None, batch, seq, None)?;
        Ok(&self.activations.logits)
    }

    fn mean_loss(&self) -> Result<f32> {
        Ok(self.activations.mean_loss.to_vec::<f32>()?[0])
    }

    /// Runs the model on `inputs`; with `targets`, the loss too, and with `loss_scale` the
    /// logits' gradient written over them for [`Gpt::backward`].
    fn forward(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        batch: usize,
        seq: usize,
        loss_scale: Option<f32>,
    ) -> Result<()> {
        let config = &self.params.config;
        let m = batch * seq;
        check_batch_shape(config, batch, seq)?;
        check_tokens("inputs", inputs, m, config.vocab)?;
        if let Some(targets) = targets {
            check_tokens("targets", targets, m, config.vocab)?;
        }
        if (self.activations.batch, self.activations.seq) != (batch, seq) {
            self.activations = Activations::new(&self.params, batch, seq)?;
        }
        let params = &self.params;
        let acts = &mut self.activations;
        let s = &mut acts.scratch;
        acts.tokens
            .copy_from(&Tensor::from_slice(inputs, &[batch, seq], &Device::Cpu)?)?;
        if let Some(targets) = targets {
            acts.targets
                .copy_from(&Tensor::from_slice(targets, &[m], &Device::Cpu)?)?;
        }
        if loss_scale.is_some() {
            acts.embedding_plan.update(inputs)?;
        }
        acts.logits_grad_scale = 1.0;

        let layout = &params.layout;
        embed(params, &acts.tokens, &mut acts.blocks[0].input, batch, seq)?;
        for (index, block) in layout.blocks.iter().enumerate() {
            let (done, rest) = acts.blocks.split_at_mut(index);
            let here = &mut rest[0];
            // norm1, fused with the residual add that ends the previous block, or reading the
            // wavelet mixing of that sum.
            match (done.last_mut(), &self.wavelet) {
                (Some(previous), None) => ops::norm_forward_into(
                    &self.norm,
                    &s.mlp,
                    Some((&previous.middle, &mut here.input)),
                    norm_params(params, block.norm1),
                    &mut here.norm1,
                    &mut here.stats1,
                )?,
                (previous, wavelet) => {
                    if let (Some(previous), Some(wavelet)) = (previous, wavelet) {
                        mix(wavelet, &mut s.mlp, &mut previous.middle, &mut here.input, batch, seq)?;
                    }
                    ops::norm_forward_into(
                        &self.norm,
                        &here.input,
                        None,
                        norm_params(params, block.norm1),
                        &mut here.norm1,
                        &mut here.stats1,
                    )?
                }
            }
            attention_forward(params, block, &self.attention, here, s, batch, seq)?;
            linear_forward(params, &block.out, &here.attention, &mut s.projected)?;
            ops::norm_forward_into(
                &self.norm,
                &s.projected,
                Some((&here.input, &mut here.middle)),
                norm_params(params, block.norm2),
                &mut here.norm2,
                &mut here.stats2,
            )?;
            mlp_forward(params, block, here, s)?;
        }
        let last_block = &mut acts.blocks[layout.blocks.len() - 1];
        match &self.wavelet {
            None => ops::norm_forward_into(
                &self.norm,
                &s.mlp,
                Some((&last_block.middle, &mut acts.last)),
                norm_params(params, layout.final_norm),
                &mut acts.final_normed,
                &mut acts.final_stats,
            )?,
            Some(wavelet) => {
                mix(wavelet, &mut s.mlp, &mut last_block.middle, &mut acts.last, batch, seq)?;
                ops::norm_forward_into(
                    &self.norm,
                    &acts.last,
                    None,
                    norm_params(params, layout.final_norm),
                    &mut acts.final_normed,
                    &mut acts.final_stats,
                )?
            }
        }
        let head = layout.head.unwrap_or(layout.token_embedding);
        ops::matmul_into(
            &acts.final_normed,
            params.weight(head),
            None,
            &mut acts.logits,
            MatmulOptions::linear(),
        )?;
        if targets.is_some() {
            let outputs = CrossEntropyOutputs {
                losses: &mut acts.losses,
                mean: &mut acts.mean_loss,
            };
            match loss_scale {
                Some(grad_scale) => {
                    let options = CrossEntropyOptions {
                        ignore_index: None,
                        grad_scale,
                    };
                    ops::cross_entropy_fused_in_place(&mut acts.logits, &acts.targets, &options, outputs)?;
                }
                None => ops::cross_entropy_into(&acts.logits, &acts.targets, &CrossEntropyOptions::default(), outputs)?,
            }
        }
        Ok(())
    }

    /// Adds the gradients of the last training forward to the parameters' gradients.
    fn backward(&mut self) -> Result<()> {
        let params = &mut self.params;
        let acts = &mut self.activations;
        let layout = params.layout.clone();
        let (batch, seq) = (acts.batch, acts.seq);
        let s = &mut acts.scratch;
        let [d_a, d_b] = &mut acts.d_stream;
        let (mut d_stream, mut d_other) = (d_a, d_b);

        // logits = final_normed·Eᵀ: the head's gradient, and that of the final norm's output.
        let head = layout.head.unwrap_or(layout.token_embedding);
        let alpha = acts.logits_grad_scale;
        weight_grad_scaled(
            params,
            head,
            Layout::OutputMajor,
            &acts.final_normed,
            &acts.logits,
            alpha,
        )?;
        ops::matmul_into(
            &acts.logits,
            params.weight(head),
            None,
            &mut s.d_normed,
            MatmulOptions {
                alpha,
                ..MatmulOptions::default()
            },
        )?;
        norm_backward(
            params,
            &self.norm,
            layout.final_norm,
            &s.d_normed,
            None,
            &acts.last,
            &acts.final_stats,
            d_stream,
        )?;

        for (index, block) in layout.blocks.iter().enumerate().rev() {
            // With wavelet mixing, d_stream is the gradient of the mixed block output; the
            // mixing's adjoint gives that of the output itself.
            if let Some(wavelet) = &self.wavelet {
                unmix(wavelet, d_stream, d_other, batch, seq)?;
                std::mem::swap(&mut d_stream, &mut d_other);
            }
            let here = &mut acts.blocks[index];
            // d_stream is the gradient of the block's output, `middle + mlp`.
            mlp_backward(params, block, here, s, d_stream)?;
            // `middle` is norm2's input and reaches the output through the skip connection too.
            norm_backward(
                params,
                &self.norm,
                block.norm2,
                &s.d_normed,
                Some(d_stream),
                &here.middle,
                &here.stats2,
                d_other,
            )?;
            std::mem::swap(&mut d_stream, &mut d_other);
            // `middle = input + attention·Wo`: d_stream is also the projection's output gradient.
            linear_backward(
                params,
                &block.out,
                &here.attention,
                d_stream,
                Some(&mut s.d_attention),
                false,
                &s.ones,
            )?;
            attention_backward(params, block, &self.attention, here, s, batch, seq)?;
            norm_backward(
                params,
                &self.norm,
                block.norm1,
                &s.d_normed,
                Some(d_stream),
                &here.input,
                &here.stats1,
                d_other,
            )?;
            std::mem::swap(&mut d_stream, &mut d_other);
        }
        embed_backward(params, &acts.embedding_plan, d_stream, batch, seq)
    }
}

fn check_batch_shape(config: &GptConfig, batch: usize, seq: usize) -> Result<()> {
    if batch == 0 || seq == 0 || seq > config.context {
        return Err(Error::invalid(
            OP,
            "batch shape",
            format!("batch >= 1 and 1 <= seq <= context ({})", config.context),
            format!("batch {batch}, seq {seq}"),
        ));
    }
    Ok(())
}

fn check_tokens(arg: &'static str, tokens: &[u32], expected: usize, vocab: usize) -> Result<()> {
    if tokens.len() != expected {
        return Err(Error::invalid(
            OP,
            arg,
            format!("{expected} tokens (batch · seq)"),
            tokens.len(),
        ));
    }
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(Error::invalid(
            OP,
            arg,
            format!("token ids below the vocabulary ({vocab})"),
            bad,
        )),
        None => Ok(()),
    }
}

impl Activations {
    fn new(params: &GptParams, batch: usize, seq: usize) -> Result<Activations> {
        let config = &params.config;
        let device = &params.device;
        let dtype = params.dtype;
        let m = batch * seq;
        let (c, f, v) = (config.width, config.ffn_width, config.vocab);
        let kv = config.kv_heads * config.head_dim();
        let swiglu = config.activation == Activation::SwiGlu;
        let fused_qkv = params.layout.blocks.iter().any(|b| matches!(b.qkv, Qkv::Fused(_)));
        let pre_width = if swiglu { 2 * f } else { f };
        let tensor = |columns: usize| Tensor::zeros(&[m, columns], dtype, device);
        let stats = || NormStats::new(m, device);
        let blocks = (0..config.layers)
            .map(|_| {
                Ok(BlockActivations {
                    input: tensor(c)?,
                    norm1: tensor(c)?,
                    stats1: stats()?,
                    q: tensor(c)?,
                    k: tensor(kv)?,
                    v: tensor(kv)?,
                    attention: tensor(c)?,
                    lse: Tensor::zeros(&[batch, seq, config.heads], DType::F32, device)?,
                    middle: tensor(c)?,
                    norm2: tensor(c)?,
                    stats2: stats()?,
                    pre_activation: tensor(pre_width)?,
                    activated: tensor(f)?,
                })
            })
            .collect::<Result<_>>()?;
        let ones = Tensor::from_vec(vec![1.0f32; m], &[m, 1], device)?;
        let scratch = Scratch {
            qkv: if fused_qkv { Some(tensor(c + 2 * kv)?) } else { None },
            gate: if swiglu { Some(tensor(f)?) } else { None },
            up: if swiglu { Some(tensor(f)?) } else { None },
            projected: tensor(c)?,
            mlp: tensor(c)?,
            d_normed: tensor(c)?,
            d_attention: tensor(c)?,
            d_pre_activation: tensor(pre_width)?,
            d_activated: tensor(f)?,
            d_q: tensor(c)?,
            d_k: tensor(kv)?,
            d_v: tensor(kv)?,
            ones: cast(&ones, dtype)?,
        };
        Ok(Activations {
            batch,
            seq,
            tokens: Tensor::zeros(&[batch, seq], DType::U32, device)?,
            targets: Tensor::zeros(&[m], DType::U32, device)?,
            embedding_plan: EmbeddingGradPlan::new(&vec![0; m], batch, seq, v, device)?,
            blocks,
            last: tensor(c)?,
            final_normed: tensor(c)?,
            final_stats: stats()?,
            logits: tensor(v)?,
            logits_grad_scale: 1.0,
            distill_grad: None,
            losses: Tensor::zeros(&[m], DType::F32, device)?,
            mean_loss: Tensor::zeros(&[1], DType::F32, device)?,
            d_stream: [tensor(c)?, tensor(c)?],
            scratch,
        })
    }
}

pub(super) fn norm_params(params: &GptParams, index: NormIndex) -> NormParams<'_> {
    NormParams {
        weight: params.weight(index.weight),
        bias: index.bias.map(|b| params.weight(b)),
    }
}

/// A norm's backward: `d_input` gets the gradient of its input (plus `d_skip`), and the gain's
/// and bias's gradients are added to theirs.
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    params: &mut GptParams,
    config: &NormConfig,
    index: NormIndex,
    d_out: &Tensor,
    d_skip: Option<&Tensor>,
    input: &Tensor,
    stats: &NormStats,
    d_input: &mut Tensor,
) -> Result<()> {
    let (weight, bias) = match index.bias {
        None => (&mut params.params[index.weight], None),
        Some(b) => {
            let [weight, bias] = params
                .params
                .get_disjoint_mut([index.weight, b])
                .map_err(|e| Error::invalid(OP, "layout", "distinct norm parameters", e))?;
            (weight, Some(bias))
        }
    };
    let gain = weight.compute.as_ref().unwrap_or(&weight.value);
    ops::norm_backward_into(
        config,
        d_out,
        d_skip,
        input,
        NormParams {
            weight: gain,
            bias: None,
        },
        stats,
        NormGrads {
            d_input,
            d_weight: &mut weight.grad,
            d_bias: bias.map(|b| &mut b.grad),
            accumulate: true,
        },
    )
}

/// `out = x·W (+ b)` in the weight's layout, plus the LoRA adapter's `s·(x·Aᵀ)·Bᵀ` when it is on:
/// the one place a block projection runs, whatever its variant. A masked layer (`nm`,
/// `unstructured`) multiplies by its masked dense weight (its pruned entries are exactly 0), but
/// an `nm` layer that the sparse kernels take runs the sparse GEMM on its compressed weight
/// (on a GPU; see [`super::sparse_layers`]); a `binary` one runs the binary op's training form
/// ([`super::binary_layers`]); a
/// `sparse_low_rank` one multiplies by its materialised `W = c·B·A + S`.
pub(super) fn linear_forward(params: &GptParams, linear: &Linear, x: &Tensor, out: &mut Tensor) -> Result<()> {
    linear_forward_with(params, linear, x, out, None)
}

/// [`linear_forward`] with the adapter's (tokens × rank) intermediate in `scratch` (whose
/// allocation holds at least that many elements) instead of a tensor of its own, so that the
/// call allocates nothing: a captured decode step needs that.
pub(super) fn linear_forward_with(
    params: &GptParams,
    linear: &Linear,
    x: &Tensor,
    out: &mut Tensor,
    scratch: Option<&mut Tensor>,
) -> Result<()> {
    let options = match linear.layout {
        Layout::OutputMajor => MatmulOptions::linear(),
        _ => MatmulOptions::default(),
    };
    let bias = linear.bias.map(|b| params.weight(b));
    match linear.binary {
        Some(index) => binary_layers::forward(params, linear, index, x, out)?,
        None => match params.sparse_copies(linear.weight) {
            Some(copies) => sparse_layers::forward(copies, x, bias, out)?,
            None => ops::matmul_into(x, params.weight(linear.weight), bias, out, options)?,
        },
    }
    match adapter(params, linear) {
        Some((index, scale)) => {
            let options = MatmulOptions {
                trans_b: true,
                alpha: scale,
                beta: 1.0,
                ..MatmulOptions::default()
            };
            match scratch {
                Some(t) => {
                    let (tokens, rank) = (x.shape()[0], params.weight(index.a).shape()[0]);
                    let numel = t.numel();
                    t.reshape_in_place(&[numel])?;
                    t.set_leading_dim(tokens * rank)?;
                    t.reshape_in_place(&[tokens, rank])?;
                    ops::matmul_into(x, params.weight(index.a), None, t, MatmulOptions::linear())?;
                    ops::matmul_into(t, params.weight(index.b), None, out, options)
                }
                None => {
                    let t = adapter_input(params, index, x)?;
                    ops::matmul_into(&t, params.weight(index.b), None, out, options)
                }
            }
        }
        None => Ok(()),
    }
}

/// The layer's adapter and its scale, when it has one and adapters are on.
fn adapter(params: &GptParams, linear: &Linear) -> Option<(LoraIndex, f32)> {
    match (linear.lora, linear.spec.lora) {
        (Some(index), Some(spec)) if params.adapters_on() => Some((index, spec.scale())),
        _ => None,
    }
}

/// `T = x·Aᵀ` (tokens, rank), in a tensor of its own: the adapter's products allocate their
/// (tokens × rank) intermediates, so that `linear_forward` keeps the signature every caller
/// (training, prefill, decoding) shares.
fn adapter_input(params: &GptParams, index: LoraIndex, x: &Tensor) -> Result<Tensor> {
    let a = params.weight(index.a);
    let mut t = Tensor::zeros(&[x.shape()[0], a.shape()[0]], x.dtype(), &x.device())?;
    ops::matmul_into(x, a, None, &mut t, MatmulOptions::linear())?;
    Ok(t)
}

/// A linear layer's backward: `dx` (added to what it holds with `accumulate`) and the weight's
/// and bias's gradients, added to theirs. An `nm` layer's `dx` goes through its double-pruned
/// weight (SLoPe; the sparse GEMM on its compressed `W_dpᵀ` where the sparse kernels take the
/// layer), a masked layer's weight gradient is masked, and a frozen base (an adapter on
/// with `frozen_base`) gets none; a `sparse_low_rank` layer's goes to its factors and sparse
/// values (SLTrain's backward, whose `dX = dY·W` is the plain product). With its adapter on, with `T = x·Aᵀ` and `dT = dY·B`:
/// `dA += s·dTᵀ·x`, `dB += s·dYᵀ·T`, `dx += s·dT·A`.
fn linear_backward(
    params: &mut GptParams,
    linear: &Linear,
    x: &Tensor,
    dy: &Tensor,
    mut dx: Option<&mut Tensor>,
    accumulate: bool,
    ones: &Tensor,
) -> Result<()> {
    if let Some(index) = linear.binary {
        let lora = adapter(params, linear);
        let train_base = !(lora.is_some() && linear.spec.lora.is_some_and(|l| l.frozen_base));
        binary_layers::backward(params, linear, index, x, dy, dx.as_deref_mut(), accumulate, train_base)?;
        if let Some((index, scale)) = lora {
            adapter_backward(params, index, scale, x, dy, dx)?;
        }
        return Ok(());
    }
    if let Some(dx) = dx.as_deref_mut() {
        match params.sparse_copies(linear.weight) {
            Some(copies) => sparse_layers::input_grad(copies, dy, dx, accumulate)?,
            None => {
                let options = MatmulOptions {
                    trans_b: linear.layout == Layout::InputMajor,
                    beta: if accumulate { 1.0 } else { 0.0 },
                    ..MatmulOptions::default()
                };
                ops::matmul_into(dy, params.input_grad_weight(linear.weight), None, dx, options)?;
            }
        }
    }
    if let Some((index, scale)) = adapter(params, linear) {
        adapter_backward(params, index, scale, x, dy, dx)?;
        if linear.spec.lora.is_some_and(|l| l.frozen_base) {
            return Ok(());
        }
    }
    match linear.sltrain {
        Some(_) => params.sltrain_grads(linear, x, dy)?,
        None => {
            weight_grad(params, linear.weight, linear.layout, x, dy)?;
            params.mask_grad(linear.weight)?;
        }
    }
    if let Some(bias) = linear.bias {
        // db = 1ᵀ·dY, as a (1, n) product into the (n) gradient.
        let grad = &mut params.params[bias].grad;
        let n = grad.numel();
        grad.reshape_in_place(&[1, n])?;
        let options = MatmulOptions {
            trans_a: true,
            beta: 1.0,
            ..MatmulOptions::default()
        };
        let result = ops::matmul_into(ones, dy, None, grad, options);
        grad.reshape_in_place(&[n])?;
        result?;
    }
    Ok(())
}

/// The adapter's part of [`linear_backward`], after the base's `dx`.
fn adapter_backward(
    params: &mut GptParams,
    index: LoraIndex,
    scale: f32,
    x: &Tensor,
    dy: &Tensor,
    dx: Option<&mut Tensor>,
) -> Result<()> {
    let t = adapter_input(params, index, x)?;
    let b = params.weight(index.b);
    let mut d_t = Tensor::zeros(t.shape(), t.dtype(), &t.device())?;
    ops::matmul_into(dy, b, None, &mut d_t, MatmulOptions::default())?;
    let accumulate_product = MatmulOptions {
        trans_a: true,
        alpha: scale,
        beta: 1.0,
        ..MatmulOptions::default()
    };
    ops::matmul_into(dy, &t, None, &mut params.params[index.b].grad, accumulate_product)?;
    ops::matmul_into(&d_t, x, None, &mut params.params[index.a].grad, accumulate_product)?;
    if let Some(dx) = dx {
        let options = MatmulOptions {
            alpha: scale,
            beta: 1.0,
            ..MatmulOptions::default()
        };
        ops::matmul_into(&d_t, params.weight(index.a), None, dx, options)?;
    }
    Ok(())
}

/// Adds a weight's gradient: (in, out) `xᵀ·dY`, or (out, in) `dYᵀ·x`.
fn weight_grad(params: &mut GptParams, index: usize, layout: Layout, x: &Tensor, dy: &Tensor) -> Result<()> {
    weight_grad_scaled(params, index, layout, x, dy, 1.0)
}

/// [`weight_grad`] of `alpha · dY`.
fn weight_grad_scaled(
    params: &mut GptParams,
    index: usize,
    layout: Layout,
    x: &Tensor,
    dy: &Tensor,
    alpha: f32,
) -> Result<()> {
    let options = MatmulOptions {
        trans_a: true,
        beta: 1.0,
        alpha,
        ..MatmulOptions::default()
    };
    let grad = &mut params.params[index].grad;
    match layout {
        Layout::InputMajor => ops::matmul_into(x, dy, None, grad, options),
        _ => ops::matmul_into(dy, x, None, grad, options),
    }
}

/// Queries, keys and values from norm1's output, then attention.
fn attention_forward(
    params: &GptParams,
    block: &Block,
    options: &AttentionOptions,
    here: &mut BlockActivations,
    s: &mut Scratch,
    batch: usize,
    seq: usize,
) -> Result<()> {
    let config = &params.config;
    let (c, kv) = (config.width, config.kv_heads * config.head_dim());
    match &block.qkv {
        Qkv::Fused(linear) => {
            let qkv = s
                .qkv
                .as_mut()
                .ok_or_else(|| Error::invalid(OP, "layout", "a fused qkv buffer", "none"))?;
            linear_forward(params, linear, &here.norm1, qkv)?;
            ops::copy_columns(qkv, 0, &mut here.q, 0, c)?;
            ops::copy_columns(qkv, c, &mut here.k, 0, kv)?;
            ops::copy_columns(qkv, c + kv, &mut here.v, 0, kv)?;
        }
        Qkv::Separate { q, k, v } => {
            linear_forward(params, q, &here.norm1, &mut here.q)?;
            linear_forward(params, k, &here.norm1, &mut here.k)?;
            linear_forward(params, v, &here.norm1, &mut here.v)?;
        }
    }
    let heads = HeadShapes::new(params, batch, seq);
    heads.split(&mut here.q, &mut here.k, &mut here.v)?;
    here.attention.reshape_in_place(&heads.q)?;
    let result = ops::attention_forward_into(&here.q, &here.k, &here.v, options, &mut here.attention, &mut here.lse);
    heads.join(&mut here.q, &mut here.k, &mut here.v)?;
    here.attention.reshape_in_place(&[batch * seq, c])?;
    result
}

/// Attention's backward from `s.d_attention`, then the query-key-value projections' backward
/// into `s.d_normed` (the gradient of norm1's output).
fn attention_backward(
    params: &mut GptParams,
    block: &Block,
    options: &AttentionOptions,
    here: &mut BlockActivations,
    s: &mut Scratch,
    batch: usize,
    seq: usize,
) -> Result<()> {
    let config = &params.config;
    let (c, kv, m) = (config.width, config.kv_heads * config.head_dim(), batch * seq);
    let heads = HeadShapes::new(params, batch, seq);
    heads.split(&mut here.q, &mut here.k, &mut here.v)?;
    heads.split(&mut s.d_q, &mut s.d_k, &mut s.d_v)?;
    here.attention.reshape_in_place(&heads.q)?;
    s.d_attention.reshape_in_place(&heads.q)?;
    let result = ops::attention_backward_into(
        &s.d_attention,
        &here.q,
        &here.k,
        &here.v,
        &here.attention,
        &here.lse,
        options,
        &mut s.d_q,
        &mut s.d_k,
        &mut s.d_v,
    );
    heads.join(&mut here.q, &mut here.k, &mut here.v)?;
    heads.join(&mut s.d_q, &mut s.d_k, &mut s.d_v)?;
    here.attention.reshape_in_place(&[m, c])?;
    s.d_attention.reshape_in_place(&[m, c])?;
    result?;
    let (d_q, d_k, d_v) = (&s.d_q, &s.d_k, &s.d_v);
    match &block.qkv {
        Qkv::Fused(linear) => {
            let d_qkv = s
                .qkv
                .as_mut()
                .ok_or_else(|| Error::invalid(OP, "layout", "a fused qkv buffer", "none"))?;
            ops::copy_columns(d_q, 0, d_qkv, 0, c)?;
            ops::copy_columns(d_k, 0, d_qkv, c, kv)?;
            ops::copy_columns(d_v, 0, d_qkv, c + kv, kv)?;
            linear_backward(
                params,
                linear,
                &here.norm1,
                d_qkv,
                Some(&mut s.d_normed),
                false,
                &s.ones,
            )
        }
        Qkv::Separate { q, k, v } => {
            linear_backward(params, q, &here.norm1, d_q, Some(&mut s.d_normed), false, &s.ones)?;
            linear_backward(params, k, &here.norm1, d_k, Some(&mut s.d_normed), true, &s.ones)?;
            linear_backward(params, v, &here.norm1, d_v, Some(&mut s.d_normed), true, &s.ones)
        }
    }
}

/// The (batch, seq, heads, head_dim) shapes attention reads, and the (tokens, width) ones the
/// matmuls write.
struct HeadShapes {
    q: [usize; 4],
    kv: [usize; 4],
    flat_q: [usize; 2],
    flat_kv: [usize; 2],
}

impl HeadShapes {
    fn new(params: &GptParams, batch: usize, seq: usize) -> HeadShapes {
        let config = &params.config;
        let d = config.head_dim();
        HeadShapes {
            q: [batch, seq, config.heads, d],
            kv: [batch, seq, config.kv_heads, d],
            flat_q: [batch * seq, config.heads * d],
            flat_kv: [batch * seq, config.kv_heads * d],
        }
    }

    fn split(&self, q: &mut Tensor, k: &mut Tensor, v: &mut Tensor) -> Result<()> {
        q.reshape_in_place(&self.q)?;
        k.reshape_in_place(&self.kv)?;
        v.reshape_in_place(&self.kv)
    }

    fn join(&self, q: &mut Tensor, k: &mut Tensor, v: &mut Tensor) -> Result<()> {
        q.reshape_in_place(&self.flat_q)?;
        k.reshape_in_place(&self.flat_kv)?;
        v.reshape_in_place(&self.flat_kv)
    }
}

/// The MLP from norm2's output into `s.mlp`.
fn mlp_forward(params: &GptParams, block: &Block, here: &mut BlockActivations, s: &mut Scratch) -> Result<()> {
    match &block.gate {
        None => {
            linear_forward(params, &block.up, &here.norm2, &mut here.pre_activation)?;
            ops::gelu_forward_into(&here.pre_activation, &mut here.activated)?;
        }
        Some(gate) => {
            let (gate_out, up_out) = swiglu_halves(s)?;
            let f = block.up.output;
            linear_forward(params, gate, &here.norm2, gate_out)?;
            linear_forward(params, &block.up, &here.norm2, up_out)?;
            ops::copy_columns(gate_out, 0, &mut here.pre_activation, 0, f)?;
            ops::copy_columns(up_out, 0, &mut here.pre_activation, f, f)?;
            ops::swiglu_forward_into(&here.pre_activation, &mut here.activated)?;
        }
    }
    linear_forward(params, &block.down, &here.activated, &mut s.mlp)
}

/// The MLP's backward from `d_out` (the gradient of its output) into `s.d_normed` (the
/// gradient of norm2's output).
fn mlp_backward(
    params: &mut GptParams,
    block: &Block,
    here: &BlockActivations,
    s: &mut Scratch,
    d_out: &Tensor,
) -> Result<()> {
    linear_backward(
        params,
        &block.down,
        &here.activated,
        d_out,
        Some(&mut s.d_activated),
        false,
        &s.ones,
    )?;
    match &block.gate {
        None => {
            ops::gelu_backward_into(&here.pre_activation, &s.d_activated, &mut s.d_pre_activation)?;
            linear_backward(
                params,
                &block.up,
                &here.norm2,
                &s.d_pre_activation,
                Some(&mut s.d_normed),
                false,
                &s.ones,
            )
        }
        Some(gate) => {
            ops::swiglu_backward_into(&here.pre_activation, &s.d_activated, &mut s.d_pre_activation)?;
            let f = block.up.output;
            let ones = &s.ones;
            let (d_gate, d_up) = match (s.gate.as_mut(), s.up.as_mut()) {
                (Some(g), Some(u)) => (g, u),
                _ => return Err(Error::invalid(OP, "layout", "SwiGLU buffers", "none")),
            };
            ops::copy_columns(&s.d_pre_activation, 0, d_gate, 0, f)?;
            ops::copy_columns(&s.d_pre_activation, f, d_up, 0, f)?;
            linear_backward(params, gate, &here.norm2, d_gate, Some(&mut s.d_normed), false, ones)?;
            linear_backward(params, &block.up, &here.norm2, d_up, Some(&mut s.d_normed), true, ones)
        }
    }
}

fn swiglu_halves(s: &mut Scratch) -> Result<(&mut Tensor, &mut Tensor)> {
    match (s.gate.as_mut(), s.up.as_mut()) {
        (Some(gate), Some(up)) => Ok((gate, up)),
        _ => Err(Error::invalid(OP, "layout", "SwiGLU buffers", "none")),
    }
}

/// The token (and learned position) embeddings of `tokens` into `out` (M, C).
fn embed(params: &GptParams, tokens: &Tensor, out: &mut Tensor, batch: usize, seq: usize) -> Result<()> {
    let layout = &params.layout;
    let c = params.config.width;
    let positions = layout.positions.map(|index| params.weight(index));
    out.reshape_in_place(&[batch, seq, c])?;
    let result = ops::embedding_forward_into(tokens, params.weight(layout.token_embedding), positions, out);
    out.reshape_in_place(&[batch * seq, c])?;
    result
}

/// Adds the embeddings' gradients from `d_out` (M, C), the gradient of the first block's input.
fn embed_backward(
    params: &mut GptParams,
    plan: &EmbeddingGradPlan,
    d_out: &mut Tensor,
    batch: usize,
    seq: usize,
) -> Result<()> {
    let layout = &params.layout;
    let c = params.config.width;
    let (tokens, positions) = match layout.positions {
        None => (&mut params.params[layout.token_embedding], None),
        Some(index) => {
            let [tokens, positions] = params
                .params
                .get_disjoint_mut([layout.token_embedding, index])
                .map_err(|e| Error::invalid(OP, "layout", "distinct embedding tables", e))?;
            (tokens, Some(positions))
        }
    };
    d_out.reshape_in_place(&[batch, seq, c])?;
    let result = ops::embedding_backward_into(d_out, plan, &mut tokens.grad, positions.map(|p| &mut p.grad), true);
    d_out.reshape_in_place(&[batch * seq, c])?;
    result
}

/// `out = wavelet(x + residual)` on (tokens, width) activations, seen as (batch, seq, width) for
/// the call.
fn mix(
    config: &WaveletConfig,
    x: &mut Tensor,
    residual: &mut Tensor,
    out: &mut Tensor,
    batch: usize,
    seq: usize,
) -> Result<()> {
    let c = config.dim();
    for t in [&mut *x, &mut *residual, &mut *out] {
        t.reshape_in_place(&[batch, seq, c])?;
    }
    let result = ops::wavelet_forward_into(x, Some(residual), config, out);
    for t in [x, residual, out] {
        t.reshape_in_place(&[batch * seq, c])?;
    }
    result
}

/// The mixing's adjoint: `d_x = waveletᵀ(d_out)`, on (tokens, width) gradients.
fn unmix(config: &WaveletConfig, d_out: &mut Tensor, d_x: &mut Tensor, batch: usize, seq: usize) -> Result<()> {
    let c = config.dim();
    for t in [&mut *d_out, &mut *d_x] {
        t.reshape_in_place(&[batch, seq, c])?;
    }
    let result = ops::wavelet_backward_into(d_out, config, d_x);
    for t in [d_out, d_x] {
        t.reshape_in_place(&[batch * seq, c])?;
    }
    result
}
