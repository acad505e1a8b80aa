//! The model's parameter tensors: their checkpoint names, shapes, layouts and initialisation.
//!
//! Names are Hugging Face's, so that checkpoints move between the libraries: a GPT-2-family
//! model uses GPT2LMHeadModel's names (`transformer.h.0.attn.c_attn.weight`, its Conv1D weights
//! stored input-major, (in, out)), a Llama-family model uses LlamaForCausalLM's
//! (`model.layers.0.self_attn.q_proj.weight`, nn.Linear weights stored (out, in)). Tensors that
//! neither library has (a SwiGLU gate in a GPT-2-family model, learned positions in a Llama-family
//! one) follow the same scheme under the names listed here, and tessera-only state (masks, packed
//! bits, adapters) goes under the `tessera.` prefix. A packed checkpoint (`tessera export
//! --packed`, metadata `tessera.packed = binary`) stores each binary layer's sign bits,
//! `tessera.<layer>.binary_bits` (u32 `[out, ceil(in/32)]`), in place of its latent weight.
//!
//! [`GptParams`] holds the values on one device with their gradients and AdamW's moments:
//! initialisation, the AdamW update and checkpoints.

use super::config::{Activation, Family, GptConfig, Norm, Positions};
use super::safetensors::{self, SafeTensors};
use super::sparse_layers::{self, SparseCopies};
use super::variants::{LinearKind, LinearSite, LinearSpec, LinearVariants, Variant};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{self, AdamWConfig, AdamWTensor, NmPattern, StaticMask};
use crate::tensor::Tensor;
use crate::train::data::splitmix64;
use std::collections::BTreeMap;
use std::path::Path;

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
    Zeros,
    Ones,
}

/// How a 2-D weight is stored, which decides the transposes of its matmuls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Not a matmul operand (biases, norm gains, embedding tables).
    Plain,
    /// (in, out), GPT-2's Conv1D: `y = x·W`.
    InputMajor,
    /// (out, in), nn.Linear: `y = x·Wᵀ`.
    OutputMajor,
}

/// One parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub init: Init,
    /// AdamW's weight decay applies to matrices, not to biases, gains or embeddings' positions.
    pub weight_decay: bool,
}

/// GPT-2's initialisation: N(0, 0.02), with the projections that write into the residual stream
/// scaled by 1/√(2·layers) so that the stream's variance does not grow with depth.
const STD: f32 = 0.02;

/// A linear layer: indices of its weight and bias in [`ModelLayout::specs`], and its variant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Linear {
    pub weight: usize,
    pub bias: Option<usize>,
    pub layout: Layout,
    pub input: usize,
    pub output: usize,
    pub spec: LinearSpec,
    /// The LoRA adapter's parameters, when the spec has one.
    pub lora: Option<LoraIndex>,
    /// A `binary` layer's scale and shift.
    pub binary: Option<BinaryIndex>,
    /// A `sparse_low_rank` layer's factors and sparse values.
    pub sltrain: Option<SlTrainIndex>,
}

/// A `sparse_low_rank` layer's trainable parameters (SLTrain, `W = (α/r)·B·A + S`): `a` (rank,
/// in), `b` (out, rank) and `s`, S's values on the fixed support (nnz), named
/// `tessera.<layer>.sltrain_a`, `_b`, `_s`. The layer's weight (its Hugging Face name) holds the
/// materialised `W`, recomputed after every update and never trained itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlTrainIndex {
    pub a: usize,
    pub b: usize,
    pub s: usize,
}

/// A `binary` layer's per-input-column scale α and shift β (FBI-LLM, `W~ = α·sign(W) + β`),
/// f32 (in), named `tessera.<layer>.binary_alpha` and `tessera.<layer>.binary_beta`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BinaryIndex {
    pub alpha: usize,
    pub beta: usize,
}

/// A LoRA adapter's parameters: `a` (rank, in) and `b` (out, rank), named
/// `tessera.<layer>.lora_a` and `tessera.<layer>.lora_b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraIndex {
    pub a: usize,
    pub b: usize,
}

/// A normalisation's gain and (LayerNorm) bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormIndex {
    pub weight: usize,
    pub bias: Option<usize>,
}

/// The query, key and value projections: GPT-2's one fused `c_attn`, or Llama's three.
// One per block, built once: three layers' indices and specs side by side cost nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Qkv {
    Fused(Linear),
    Separate { q: Linear, k: Linear, v: Linear },
}

/// One transformer block's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Block {
    pub norm1: NormIndex,
    pub qkv: Qkv,
    pub out: Linear,
    pub norm2: NormIndex,
    /// SwiGLU's gate projection; `None` with GELU.
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
}

/// Every parameter of a model and where each one is used.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelLayout {
    pub specs: Vec<ParamSpec>,
    pub token_embedding: usize,
    pub positions: Option<usize>,
    pub blocks: Vec<Block>,
    pub final_norm: NormIndex,
    /// The output projection, (vocab, width); `None` when tied to the token embedding.
    pub head: Option<usize>,
}

impl ModelLayout {
    /// The layout of `config`'s model with every linear layer dense, in the order the forward
    /// pass uses the parameters.
    pub fn new(config: &GptConfig) -> ModelLayout {
        ModelLayout::with_variants(config, &LinearVariants::dense())
    }

    /// The layout of `config`'s model with `variants`' linear layers (not validated here: see
    /// [`LinearVariants::validate`]).
    pub fn with_variants(config: &GptConfig, variants: &LinearVariants) -> ModelLayout {
        ModelLayout::build(config, variants).0
    }

    /// Every block linear layer, in forward order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut list = Vec::new();
        for block in &self.blocks {
            match &block.qkv {
                Qkv::Fused(qkv) => list.push(qkv),
                Qkv::Separate { q, k, v } => list.extend([q, k, v]),
            }
            list.push(&block.out);
            list.extend(block.gate.iter());
            list.extend([&block.up, &block.down]);
        }
        list
    }

    fn build(config: &GptConfig, variants: &LinearVariants) -> (ModelLayout, Vec<LinearSite>) {
        let mut builder = Builder {
            specs: Vec::new(),
            gpt2: config.family == Family::Gpt2,
            width: config.width,
            layer_norm: config.norm == Norm::LayerNorm,
            variants,
            sites: Vec::new(),
        };
        let (c, f, v) = (config.width, config.ffn_width, config.vocab);
        let kv = config.kv_heads * config.head_dim();
        let residual_std = STD / (2.0 * config.layers as f32).sqrt();
        let (embed, positions, layer, final_norm) = if builder.gpt2 {
            (
                "transformer.wte",
                "transformer.wpe",
                "transformer.h",
                "transformer.ln_f",
            )
        } else {
            (
                "model.embed_tokens",
                "model.embed_positions",
                "model.layers",
                "model.norm",
            )
        };
        let token_embedding = builder.push(
            format!("{embed}.weight"),
            vec![v, c],
            Layout::Plain,
            Init::Normal(STD),
            true,
        );
        let positions = (config.positions == Positions::Learned).then(|| {
            builder.push(
                format!("{positions}.weight"),
                vec![config.context, c],
                Layout::Plain,
                Init::Normal(STD),
                false,
            )
        });
        let swiglu = config.activation == Activation::SwiGlu;
        let blocks = (0..config.layers)
            .map(|i| {
                let p = format!("{layer}.{i}");
                if builder.gpt2 {
                    Block {
                        norm1: builder.norm(format!("{p}.ln_1")),
                        qkv: Qkv::Fused(builder.linear(
                            LinearKind::Qkv,
                            format!("{p}.attn.c_attn"),
                            c,
                            c + 2 * kv,
                            STD,
                        )),
                        out: builder.linear(LinearKind::Out, format!("{p}.attn.c_proj"), c, c, residual_std),
                        norm2: builder.norm(format!("{p}.ln_2")),
                        up: builder.linear(LinearKind::Up, format!("{p}.mlp.c_fc"), c, f, STD),
                        gate: swiglu.then(|| builder.linear(LinearKind::Gate, format!("{p}.mlp.c_gate"), c, f, STD)),
                        down: builder.linear(LinearKind::Down, format!("{p}.mlp.c_proj"), f, c, residual_std),
                    }
                } else {
                    Block {
                        norm1: builder.norm(format!("{p}.input_layernorm")),
                        qkv: Qkv::Separate {
                            q: builder.linear(LinearKind::Q, format!("{p}.self_attn.q_proj"), c, c, STD),
                            k: builder.linear(LinearKind::K, format!("{p}.self_attn.k_proj"), c, kv, STD),
                            v: builder.linear(LinearKind::V, format!("{p}.self_attn.v_proj"), c, kv, STD),
                        },
                        out: builder.linear(LinearKind::Out, format!("{p}.self_attn.o_proj"), c, c, residual_std),
                        norm2: builder.norm(format!("{p}.post_attention_layernorm")),
                        gate: swiglu.then(|| builder.linear(LinearKind::Gate, format!("{p}.mlp.gate_proj"), c, f, STD)),
                        up: builder.linear(LinearKind::Up, format!("{p}.mlp.up_proj"), c, f, STD),
                        down: builder.linear(LinearKind::Down, format!("{p}.mlp.down_proj"), f, c, residual_std),
                    }
                }
            })
            .collect();
        let final_norm = builder.norm(final_norm.to_string());
        let head = (!config.tied_embeddings).then(|| {
            builder.push(
                "lm_head.weight".into(),
                vec![v, c],
                Layout::OutputMajor,
                Init::Normal(STD),
                true,
            )
        });
        let layout = ModelLayout {
            specs: builder.specs,
            token_embedding,
            positions,
            blocks,
            final_norm,
            head,
        };
        (layout, builder.sites)
    }
}

struct Builder<'a> {
    specs: Vec<ParamSpec>,
    gpt2: bool,
    width: usize,
    layer_norm: bool,
    variants: &'a LinearVariants,
    sites: Vec<LinearSite>,
}

impl Builder<'_> {
    fn push(&mut self, name: String, shape: Vec<usize>, layout: Layout, init: Init, weight_decay: bool) -> usize {
        self.specs.push(ParamSpec {
            name,
            shape,
            layout,
            init,
            weight_decay,
        });
        self.specs.len() - 1
    }

    /// A linear layer from `input` to `output` features: GPT-2's Conv1D with a bias, or Llama's
    /// nn.Linear without one.
    fn linear(&mut self, kind: LinearKind, prefix: String, input: usize, output: usize, std: f32) -> Linear {
        let site = LinearSite {
            kind,
            name: prefix.clone(),
            input,
            output,
        };
        let spec = self.variants.spec_for(&site);
        self.sites.push(site);
        let (shape, layout) = if self.gpt2 {
            (vec![input, output], Layout::InputMajor)
        } else {
            (vec![output, input], Layout::OutputMajor)
        };
        let weight = self.push(format!("{prefix}.weight"), shape, layout, Init::Normal(std), true);
        let bias = self.gpt2.then(|| {
            self.push(
                format!("{prefix}.bias"),
                vec![output],
                Layout::Plain,
                Init::Zeros,
                false,
            )
        });
        // α and β are set from the initial latent weight by `binary_init` (§1.5).
        let binary = (spec.variant == Variant::Binary).then(|| BinaryIndex {
            alpha: self.push(
                format!("tessera.{prefix}.binary_alpha"),
                vec![input],
                Layout::Plain,
                Init::Ones,
                false,
            ),
            beta: self.push(
                format!("tessera.{prefix}.binary_beta"),
                vec![input],
                Layout::Plain,
                Init::Zeros,
                false,
            ),
        });
        // Values drawn by `SlTrainLayer::new` at initialisation (§5.2: A and S uniform, B zero).
        let sltrain = match spec.variant {
            Variant::SparseLowRank { rank, density, .. } => Some(SlTrainIndex {
                a: self.push(
                    format!("tessera.{prefix}.sltrain_a"),
                    vec![rank, input],
                    Layout::Plain,
                    Init::Zeros,
                    false,
                ),
                b: self.push(
                    format!("tessera.{prefix}.sltrain_b"),
                    vec![output, rank],
                    Layout::Plain,
                    Init::Zeros,
                    false,
                ),
                s: self.push(
                    format!("tessera.{prefix}.sltrain_s"),
                    vec![(density * (input * output) as f64).floor() as usize],
                    Layout::Plain,
                    Init::Zeros,
                    false,
                ),
            }),
            _ => None,
        };
        // A as PEFT's Kaiming-uniform draws it (the standard deviation of U(±1/√in)), B zero, so
        // that the adapter starts as nothing. No weight decay: an adapter that is not switched on
        // yet (no gradient, zero moments) then stays exactly as it is.
        let lora = spec.lora.map(|lora| LoraIndex {
            a: self.push(
                format!("tessera.{prefix}.lora_a"),
                vec![lora.rank, input],
                Layout::Plain,
                Init::Normal(1.0 / (3.0 * input as f32).sqrt()),
                false,
            ),
            b: self.push(
                format!("tessera.{prefix}.lora_b"),
                vec![output, lora.rank],
                Layout::Plain,
                Init::Zeros,
                false,
            ),
        });
        Linear {
            weight,
            bias,
            layout,
            input,
            output,
            spec,
            lora,
            binary,
            sltrain,
        }
    }

    fn norm(&mut self, prefix: String) -> NormIndex {
        let c = self.width;
        let weight = self.push(format!("{prefix}.weight"), vec![c], Layout::Plain, Init::Ones, false);
        let bias = self
            .layer_norm
            .then(|| self.push(format!("{prefix}.bias"), vec![c], Layout::Plain, Init::Zeros, false));
        NormIndex { weight, bias }
    }
}

/// Every parameter of the model, in the order the forward pass uses them.
pub fn parameters(config: &GptConfig) -> Vec<ParamSpec> {
    ModelLayout::new(config).specs
}

/// Every block linear layer of `config`'s model, as the variant selectors see them.
pub fn linear_sites(config: &GptConfig) -> Vec<LinearSite> {
    ModelLayout::build(config, &LinearVariants::dense()).1
}

/// The metadata key under which a checkpoint records the configuration it was saved with.
pub const CONFIG_KEY: &str = "tessera.config";

/// The metadata key under which a checkpoint with LoRA adapters records whether they are on.
pub const ADAPTERS_KEY: &str = "tessera.adapters";

/// One parameter: its f32 master value, the copy the model computes with when that is not f32,
/// its gradient and AdamW's two moments.
pub struct Parameter {
    pub spec: ParamSpec,
    pub value: Tensor,
    /// The value in the compute dtype (bf16 on a GPU), refreshed by every AdamW step; `None`
    /// when the model computes in f32 and uses `value` itself.
    pub compute: Option<Tensor>,
    /// f32 whatever the compute dtype: matmuls write bf16 operands' products into it, and
    /// micro-batches accumulate without bf16 rounding.
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The fixed mask of a masked linear layer (`nm`, `unstructured`): the master weight stays a
/// dense f32 tensor whose pruned entries, like their gradients and AdamW moments, are kept at
/// exactly 0, so that AdamW (weight decay included) never revives them.
pub struct LinearMask {
    /// 1 = kept, in the weight's stored (rows, cols) layout.
    pub mask: StaticMask,
    /// `nm`'s pattern, for the double-pruned input gradient; `None` for `unstructured`.
    pub pattern: Option<NmPattern>,
    /// `nm`: SLoPe's double-pruned weight `W_dp` (the masked weight pruned again N:M along the
    /// output dimension) in the compute dtype and the weight's layout, through which the input
    /// gradient goes; recomputed from the master weight after every update (the spec's reference
    /// semantics). The recomputation runs on the host: per layer and update it reads the weight
    /// back, prunes it and uploads the result, allocating host buffers (on a GPU the one part of
    /// a masked layer's training step that allocates; on the CPU `spdf_apply_mask` also copies
    /// the mask's bits on every call).
    pub double_pruned: Option<Tensor>,
    /// `nm` layers that the sparse kernels take, while they are on
    /// ([`GptParams::sparse_kernels`]): the compressed copies of the masked compute weight
    /// through which the forward and the input gradient go, rebuilt wherever the compute weight
    /// changes (then `double_pruned` is `None`: the input gradient needs no dense copy).
    pub sparse: Option<SparseCopies>,
    layout: Layout,
}

/// The model's parameters, in the order of [`ModelLayout::specs`].
pub struct GptParams {
    pub config: GptConfig,
    /// The block linear layers' variants ([`ModelLayout`]'s `Linear`s carry each one's spec).
    pub variants: LinearVariants,
    /// The masks of the masked linear layers, by weight index. An `nm` layer pruned at a later
    /// step has none until then, and [`GptParams::densify`] drops them all.
    pub masks: BTreeMap<usize, LinearMask>,
    pub layout: ModelLayout,
    pub device: Device,
    /// The dtype of activations and of the weights the matmuls read: f32 on the CPU, bf16 on a GPU.
    pub dtype: DType,
    pub params: Vec<Parameter>,
    /// Whether the LoRA adapters take part (forward, backward, updates); see
    /// [`GptParams::start_adapters`].
    adapters_on: bool,
    /// The `sparse_low_rank` layers as the SLTrain op holds them (compute-dtype copies of A, B
    /// and S's values beside the fixed support), by weight index.
    pub sltrain: BTreeMap<usize, ops::SlTrainLayer>,
    /// A packed model's `binary` layers: their sign bits (u32 `[out, ceil(in/32)]`, the binary
    /// op's layout), by weight index. Such a layer's latent weight is gone: its [`Parameter`]
    /// holds one zero, and the model runs inference only (see `GptParams::pack_binary`).
    pub packed: BTreeMap<usize, Tensor>,
    /// Whether `nm` layers that qualify run through the sparse kernels (see
    /// [`super::sparse_layers`]): on a GPU by default, off on the CPU.
    sparse_kernels: bool,
    /// Read from an inference export ([`super::sparse_layers::export_sparse24`]): no master
    /// weights or optimizer state to train from.
    inference_export: bool,
}

impl GptParams {
    /// Freshly initialised parameters (GPT-2's scheme), the same for a given seed on every device.
    pub fn init(config: &GptConfig, device: &Device, seed: u64) -> Result<GptParams> {
        GptParams::init_with_variants(config, &LinearVariants::dense(), device, seed)
    }

    /// Freshly initialised parameters with `variants`' linear layers: masked layers get their
    /// mask now (`unstructured`, and `nm` pruned at step 0) and their weights masked.
    pub fn init_with_variants(
        config: &GptConfig,
        variants: &LinearVariants,
        device: &Device,
        seed: u64,
    ) -> Result<GptParams> {
        config.validate()?;
        variants.validate(config)?;
        let layout = ModelLayout::with_variants(config, variants);
        let values = layout
            .specs
            .iter()
            .map(|spec| {
                let numel: usize = spec.shape.iter().product();
                let values = match spec.init {
                    Init::Zeros => vec![0.0; numel],
                    Init::Ones => vec![1.0; numel],
                    Init::Normal(std) => normal(numel, std, seed ^ splitmix64(name_hash(&spec.name))),
                };
                Tensor::from_vec(values, &spec.shape, device)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut params = GptParams::from_values(config.clone(), variants.clone(), layout, values, device)?;
        params.attach_sltrain()?;
        let linears: Vec<Linear> = params.layout.linears().into_iter().copied().collect();
        for linear in &linears {
            match linear.spec.variant {
                Variant::Unstructured {
                    density,
                    seed: mask_seed,
                } => {
                    let (rows, cols) = stored_dims(&params.layout.specs[linear.weight]);
                    let name = &params.layout.specs[linear.weight].name;
                    let mask = StaticMask::random(
                        rows,
                        cols,
                        1.0 - density,
                        mask_seed ^ splitmix64(name_hash(name)),
                        device,
                    )?;
                    params.adopt_mask(linear, mask)?;
                }
                Variant::Nm { prune_step: 0, .. } => params.prune_nm(linear)?,
                Variant::Binary => params.binary_init(linear)?,
                Variant::SparseLowRank { .. } => {
                    // §5.2's initial values, drawn in f32 from the layer's own seed.
                    let drawn = sltrain_layer(&params.layout, linear, DType::F32, &Device::Cpu)?;
                    let index = linear
                        .sltrain
                        .ok_or_else(|| Error::invalid(OP_PARAMS, "layout", "SLTrain parameters", "none"))?;
                    params.set_value(index.a, drawn.a.to_vec::<f32>()?)?;
                    params.set_value(index.s, drawn.s.to_vec::<f32>()?)?;
                    if let (Some(bias), Some(values)) = (linear.bias, &drawn.bias) {
                        params.set_value(bias, values.to_vec::<f32>()?)?;
                    }
                }
                _ => {}
            }
        }
        Ok(params)
    }

    /// Wraps master values (f32, on `device`, in layout order) with their compute copies,
    /// gradients and zeroed moments.
    pub(crate) fn from_values(
        config: GptConfig,
        variants: LinearVariants,
        layout: ModelLayout,
        values: Vec<Tensor>,
        device: &Device,
    ) -> Result<GptParams> {
        let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
        let params = values
            .into_iter()
            .enumerate()
            .map(|(index, value)| {
                let spec = layout.specs[index].clone();
                // Shaped like the value: a packed layer's placeholder weight has one element.
                let zeros = |dtype| Tensor::zeros(value.shape(), dtype, device);
                let compute = if dtype == DType::F32 {
                    None
                } else {
                    Some(cast(&value, dtype)?)
                };
                Ok(Parameter {
                    compute,
                    grad: zeros(DType::F32)?,
                    exp_avg: zeros(DType::F32)?,
                    exp_avg_sq: zeros(DType::F32)?,
                    value,
                    spec,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GptParams {
            config,
            variants,
            masks: BTreeMap::new(),
            layout,
            device: device.clone(),
            dtype,
            params,
            adapters_on: true,
            sltrain: BTreeMap::new(),
            packed: BTreeMap::new(),
            sparse_kernels: device.is_cuda(),
            inference_export: false,
        })
    }

    /// The tensor the model computes with for parameter `index`.
    pub fn weight(&self, index: usize) -> &Tensor {
        let p = &self.params[index];
        p.compute.as_ref().unwrap_or(&p.value)
    }

    /// The weight through which a linear layer's input gradient goes: `nm`'s double-pruned
    /// weight, else [`GptParams::weight`].
    pub fn input_grad_weight(&self, index: usize) -> &Tensor {
        match self.masks.get(&index).and_then(|m| m.double_pruned.as_ref()) {
            Some(w) => w,
            None => self.weight(index),
        }
    }

    /// Makes `mask` linear layer `linear`'s: zeroes the pruned entries of its weight (and compute
    /// copy), gradient and moments, and (`nm`) computes its double-pruned weight.
    pub(crate) fn adopt_mask(&mut self, linear: &Linear, mask: StaticMask) -> Result<()> {
        let p = &mut self.params[linear.weight];
        for t in [&mut p.value, &mut p.grad, &mut p.exp_avg, &mut p.exp_avg_sq] {
            ops::spdf_apply_mask(t, &mask)?;
        }
        if let Some(compute) = &mut p.compute {
            ops::spdf_apply_mask(compute, &mask)?;
        }
        let pattern = match linear.spec.variant {
            Variant::Nm { n, m, .. } => Some(NmPattern::new(n, m)?),
            _ => None,
        };
        self.masks.insert(
            linear.weight,
            LinearMask {
                mask,
                pattern,
                double_pruned: None,
                sparse: None,
                layout: linear.layout,
            },
        );
        self.refresh_double_pruned(linear.weight)
    }

    /// Creates the SLTrain op's layers (their supports drawn from each layer's seed) and
    /// materialises their weights.
    fn attach_sltrain(&mut self) -> Result<()> {
        let linears: Vec<Linear> = self.layout.linears().into_iter().copied().collect();
        for linear in linears.iter().filter(|l| l.sltrain.is_some()) {
            let mut layer = sltrain_layer(&self.layout, linear, self.dtype, &self.device)?;
            // The bias is the model's own parameter, outside the op.
            layer.bias = None;
            self.sltrain.insert(linear.weight, layer);
            self.refresh_sltrain(linear)?;
        }
        Ok(())
    }

    /// Copies a `sparse_low_rank` layer's A, B and S values into its op layer and writes
    /// `W = c·B·A + S` (the op's `sltrain_weight`) into the layer's weight, in its layout: read
    /// back to the host to lay it out (allocating, once per layer and update).
    fn refresh_sltrain(&mut self, linear: &Linear) -> Result<()> {
        let (Some(index), Some(layer)) = (linear.sltrain, self.sltrain.get_mut(&linear.weight)) else {
            return Ok(());
        };
        fn weight(p: &Parameter) -> &Tensor {
            p.compute.as_ref().unwrap_or(&p.value)
        }
        layer.a.copy_from(weight(&self.params[index.a]))?;
        layer.b.copy_from(weight(&self.params[index.b]))?;
        layer.s.copy_from(weight(&self.params[index.s]))?;
        let w = host_f32(&ops::sltrain_weight(layer)?)?;
        let (n_in, n_out) = (linear.input, linear.output);
        let values: Vec<f32> = match linear.layout {
            Layout::InputMajor => (0..n_in * n_out).map(|k| w[(k % n_out) * n_in + k / n_out]).collect(),
            _ => w,
        };
        let p = &mut self.params[linear.weight];
        let host = Tensor::from_vec(values, &p.spec.shape, &Device::Cpu)?;
        if let Some(compute) = &mut p.compute {
            compute.copy_from(&cast(&host, self.dtype)?)?;
        }
        p.value.copy_from(&host)
    }

    /// Adds a `sparse_low_rank` layer's gradients (the op's `sltrain_backward`: `dB = c·G·Aᵀ`,
    /// `dA = c·Bᵀ·G`, `dS = G[support]` with `G = dYᵀ·x`) to A's, B's and S's; the op allocates
    /// them, and they are added on the host.
    pub(crate) fn sltrain_grads(&mut self, linear: &Linear, x: &Tensor, dy: &Tensor) -> Result<()> {
        let (Some(index), Some(layer)) = (linear.sltrain, self.sltrain.get(&linear.weight)) else {
            return Ok(());
        };
        let grads = ops::sltrain_backward(dy, x, layer)?;
        for (target, grad) in [(index.a, &grads.d_a), (index.b, &grads.d_b), (index.s, &grads.d_s)] {
            let add = host_f32(grad)?;
            let p = &mut self.params[target].grad;
            let mut sum = p.to_vec::<f32>()?;
            sum.iter_mut().zip(&add).for_each(|(s, a)| *s += a);
            p.copy_from(&Tensor::from_vec(sum, p.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Sets a `binary` layer's α and β from its latent weight (FBI-LLM §1.5: per input column,
    /// β the mean and α the mean absolute deviation).
    fn binary_init(&mut self, linear: &Linear) -> Result<()> {
        let Some(index) = linear.binary else {
            return Err(Error::invalid(
                "GptParams::binary_init",
                "linear",
                "a binary layer",
                linear.spec.variant,
            ));
        };
        let weight = output_major(&self.params[linear.weight].value, linear)?;
        let (alpha, beta) = ops::binary_init(&weight)?;
        self.set_value(index.alpha, alpha.to_vec::<f32>()?)?;
        self.set_value(index.beta, beta.to_vec::<f32>()?)
    }

    /// Prunes `nm` layer `linear` by the magnitudes of its weight now and fixes the mask.
    fn prune_nm(&mut self, linear: &Linear) -> Result<()> {
        let Variant::Nm { n, m, .. } = linear.spec.variant else {
            return Err(Error::invalid(
                "GptParams::prune",
                "linear",
                "an nm layer",
                linear.spec.variant,
            ));
        };
        let p = &self.params[linear.weight];
        let (rows, cols) = stored_dims(&p.spec);
        let values = p.value.to_vec::<f32>()?;
        // N:M groups run along the input dimension: the rows of an (out, in) weight.
        let kept = nm_kept(
            &values,
            rows,
            cols,
            NmPattern::new(n, m)?,
            linear.layout == Layout::OutputMajor,
        )?;
        let kept = Tensor::from_vec(kept, &[rows, cols], &Device::Cpu)?;
        let mask = StaticMask::from_kept(&kept, &self.device)?;
        self.adopt_mask(linear, mask)
    }

    /// Prunes the `nm` layers whose `prune_step` is `step` (after that step's update) and fixes
    /// their masks; returns how many were pruned.
    pub fn prune_due(&mut self, step: u64) -> Result<usize> {
        let due: Vec<Linear> = self
            .layout
            .linears()
            .into_iter()
            .filter(|l| {
                matches!(l.spec.variant, Variant::Nm { prune_step, .. } if prune_step == step)
                    && !self.masks.contains_key(&l.weight)
            })
            .copied()
            .collect();
        for linear in &due {
            self.prune_nm(linear)?;
        }
        Ok(due.len())
    }

    /// True when a layer has a LoRA adapter.
    pub fn has_adapters(&self) -> bool {
        self.layout.linears().iter().any(|l| l.lora.is_some())
    }

    /// Whether the adapters take part in the forward, the backward and the updates. While they
    /// are off the model is its base alone, the adapters keep their values and a frozen base
    /// trains.
    pub fn adapters_on(&self) -> bool {
        self.adapters_on
    }

    /// Turns the adapters on or off as they are.
    pub fn set_adapters_on(&mut self, on: bool) {
        self.adapters_on = on;
    }

    /// SLoPe's lazy adapters (ALGORITHMS.md §2.5): re-draws every adapter as
    /// [`ops::LoraAdapters::lazy_init`] does (A from N(0, 1), seeded by `seed` and the layer, B
    /// zero), zeroes their moments and turns them on. With B = 0 the model's outputs are what
    /// they were.
    pub fn start_adapters(&mut self, seed: u64) -> Result<()> {
        let linears: Vec<Linear> = self.layout.linears().into_iter().copied().collect();
        for linear in &linears {
            let (Some(index), Some(spec)) = (linear.lora, linear.spec.lora) else {
                continue;
            };
            let stream = seed ^ splitmix64(name_hash(&self.params[index.a].spec.name));
            let drawn = ops::LoraAdapters::lazy_init(
                1,
                spec.rank,
                linear.input,
                linear.output,
                DType::F32,
                &Device::Cpu,
                stream,
            )?;
            self.set_value(index.a, drawn.a().to_vec::<f32>()?)?;
            self.set_value(index.b, vec![0.0; linear.output * spec.rank])?;
            for i in [index.a, index.b] {
                let p = &mut self.params[i];
                p.exp_avg.fill_bytes(0)?;
                p.exp_avg_sq.fill_bytes(0)?;
            }
        }
        self.adapters_on = true;
        Ok(())
    }

    /// Which parameters AdamW leaves alone: the materialised weights of `sparse_low_rank` layers,
    /// and the base parameters (weight, bias, binary α and β, SLTrain's factors) of the layers
    /// whose adapter is on and freezes its base.
    pub fn frozen(&self) -> Vec<bool> {
        let mut frozen = vec![false; self.params.len()];
        for linear in self.layout.linears() {
            if linear.sltrain.is_some() {
                frozen[linear.weight] = true;
            }
        }
        if self.adapters_on {
            for linear in self.layout.linears() {
                if linear.spec.lora.is_some_and(|l| l.frozen_base) {
                    let binary = linear.binary.map(|b| vec![b.alpha, b.beta]);
                    let sltrain = linear.sltrain.map(|s| vec![s.a, s.b, s.s]);
                    for index in std::iter::once(linear.weight)
                        .chain(linear.bias)
                        .chain(binary.into_iter().flatten())
                        .chain(sltrain.into_iter().flatten())
                    {
                        frozen[index] = true;
                    }
                }
            }
        }
        frozen
    }

    /// SPDF's dense fine-tuning: drops every mask, so that the pruned weights (at exactly 0) learn
    /// from their dense gradients from now on.
    pub fn densify(&mut self) {
        self.masks.clear();
    }

    /// Recomputes what `nm` layer `index`'s input gradient goes through: its compressed copies
    /// from its compute weight where the sparse kernels take it, else its double-pruned weight
    /// from its master weight. Every method that changes a masked weight ends here.
    fn refresh_double_pruned(&mut self, index: usize) -> Result<()> {
        let Some(mask) = self.masks.get_mut(&index) else {
            return Ok(());
        };
        let Some(pattern) = mask.pattern else {
            return Ok(());
        };
        let p = &self.params[index];
        let (rows, cols) = stored_dims(&p.spec);
        if self.sparse_kernels && sparse_layers::qualifies(pattern, rows, cols) {
            let weight = p.compute.as_ref().unwrap_or(&p.value);
            match &mut mask.sparse {
                Some(copies) => copies.refresh(weight, mask.layout, pattern)?,
                None => mask.sparse = Some(SparseCopies::build(weight, mask.layout, pattern)?),
            }
            mask.double_pruned = None;
            return Ok(());
        }
        mask.sparse = None;
        let target = match &mut mask.double_pruned {
            Some(target) => target,
            slot => slot.insert(Tensor::zeros(&p.spec.shape, self.dtype, &self.device)?),
        };
        let mut values = p.value.to_vec::<f32>()?;
        // The second pruning runs along the output dimension: the rows of an (in, out) weight.
        let kept = nm_kept(&values, rows, cols, pattern, mask.layout == Layout::InputMajor)?;
        for (v, k) in values.iter_mut().zip(&kept) {
            if *k == 0 {
                *v = 0.0;
            }
        }
        let host = Tensor::from_vec(values, &[rows, cols], &Device::Cpu)?;
        target.copy_from(&cast(&host, self.dtype)?)
    }

    /// Recomputes what derives from the master weights beyond their compute copies (the
    /// double-pruned weights), after an update.
    fn refresh_derived(&mut self) -> Result<()> {
        let indices: Vec<usize> = self.masks.keys().copied().collect();
        for index in indices {
            self.refresh_double_pruned(index)?;
        }
        let linears: Vec<Linear> = self.layout.linears().into_iter().copied().collect();
        for linear in linears.iter().filter(|l| l.sltrain.is_some()) {
            self.refresh_sltrain(linear)?;
        }
        Ok(())
    }

    /// Whether `nm` layers that qualify run through the sparse kernels.
    pub fn sparse_kernels(&self) -> bool {
        self.sparse_kernels
    }

    /// Turns the sparse kernels on or off for the `nm` layers that qualify (2:4 or 1:2, both
    /// dimensions multiples of 64; on a GPU the weights are bf16, which they take), rebuilding
    /// what their input gradients go through. Off, such a layer is a masked dense matmul, as
    /// every other `nm` layer is.
    pub fn set_sparse_kernels(&mut self, on: bool) -> Result<()> {
        self.sparse_kernels = on;
        let indices: Vec<usize> = self.masks.keys().copied().collect();
        for index in indices {
            self.refresh_double_pruned(index)?;
        }
        Ok(())
    }

    /// Whether these parameters were read from an inference export (2:4 layers stored
    /// compressed, weights in bf16): generation and evaluation only.
    pub fn is_inference_export(&self) -> bool {
        self.inference_export
    }

    pub(crate) fn mark_inference_export(&mut self) {
        self.inference_export = true;
    }

    /// The compressed copies of linear weight `index`, when it runs through the sparse kernels.
    pub fn sparse_copies(&self, index: usize) -> Option<&SparseCopies> {
        self.masks.get(&index).and_then(|m| m.sparse.as_ref())
    }

    /// Zeroes the pruned entries of masked layers' gradients (`dW = M ⊙ dYᵀX`).
    pub(crate) fn mask_grad(&mut self, index: usize) -> Result<()> {
        match self.masks.get(&index) {
            Some(mask) => ops::spdf_apply_mask(&mut self.params[index].grad, &mask.mask),
            None => Ok(()),
        }
    }

    /// transformers' `config.json` for this model (see [`GptConfig::hugging_face_json`]), when
    /// transformers computes what it does from the saved weights: masked layers are ordinary
    /// weights with zeros, but a binary layer's saved weight is its latent one, and LoRA adapters
    /// on are not merged into the weights they sit beside, so neither is exported.
    pub fn hugging_face_json(&self) -> Option<String> {
        let exportable = self
            .layout
            .linears()
            .iter()
            .all(|l| l.binary.is_none() && (l.lora.is_none() || !self.adapters_on));
        exportable.then(|| self.config.hugging_face_json()).flatten()
    }

    /// The configuration JSON that checkpoints record: [`GptConfig::to_json`] with the
    /// variants' `linears` field when a layer is not dense.
    pub fn config_json(&self) -> String {
        config_json(&self.config, &self.variants)
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Parameter> {
        self.params.iter().find(|p| p.spec.name == name)
    }

    /// The global L2 norm of all gradients.
    pub fn grad_norm(&self) -> Result<f32> {
        let mut norm = Tensor::zeros(&[1], DType::F32, &self.device)?;
        self.grad_norm_into(&mut norm)?;
        Ok(norm.to_vec::<f32>()?[0])
    }

    /// The global L2 norm of all gradients into `norm` (one f32 on this model's device), without
    /// reading it back: on a GPU the work is only queued.
    pub fn grad_norm_into(&self, norm: &mut Tensor) -> Result<()> {
        let grads: Vec<&Tensor> = self.params.iter().map(|p| &p.grad).collect();
        ops::grad_norm_into(&grads, norm)
    }

    /// Sets every gradient to zero, before a step's first micro-batch.
    pub fn zero_grads(&mut self) -> Result<()> {
        for p in &mut self.params {
            p.grad.fill_bytes(0)?;
        }
        Ok(())
    }

    /// One AdamW step over every parameter in one launch, with weight decay on the matrices only
    /// (frozen parameters, see [`GptParams::frozen`], are left alone).
    pub fn adamw_step(&mut self, config: &AdamWConfig, step: u64, grad_scale: f32) -> Result<()> {
        let frozen = self.frozen();
        let mut tensors: Vec<AdamWTensor<'_>> = self
            .params
            .iter_mut()
            .zip(frozen)
            .filter(|(_, frozen)| !frozen)
            .map(|(p, _)| AdamWTensor {
                param: &mut p.value,
                grad: &p.grad,
                exp_avg: &mut p.exp_avg,
                exp_avg_sq: &mut p.exp_avg_sq,
                param_bf16: p.compute.as_mut(),
                weight_decay: p.spec.weight_decay,
            })
            .collect();
        ops::adamw_step(&mut tensors, config, step, grad_scale)?;
        self.refresh_derived()
    }

    /// AdamW as [`GptParams::adamw_step`] over every parameter but `apart`, and a second update
    /// of `apart` alone with its own configuration and step number (active forgetting gives the
    /// token embedding its own learning rate and bias correction). Each tensor's update is the
    /// one a single call would make with that tensor's configuration and step.
    pub fn adamw_step_apart(
        &mut self,
        config: &AdamWConfig,
        step: u64,
        grad_scale: f32,
        apart: usize,
        apart_config: &AdamWConfig,
        apart_step: u64,
    ) -> Result<()> {
        if apart >= self.params.len() {
            return Err(Error::invalid(
                "GptParams::adamw_step_apart",
                "apart",
                format!("a parameter index below {}", self.params.len()),
                apart,
            ));
        }
        let frozen = self.frozen();
        let (mut rest, mut alone): (Vec<_>, Vec<_>) = self
            .params
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !frozen[*i])
            .map(|(i, p)| {
                (
                    i,
                    AdamWTensor {
                        param: &mut p.value,
                        grad: &p.grad,
                        exp_avg: &mut p.exp_avg,
                        exp_avg_sq: &mut p.exp_avg_sq,
                        param_bf16: p.compute.as_mut(),
                        weight_decay: p.spec.weight_decay,
                    },
                )
            })
            .partition(|(i, _)| *i != apart);
        let mut rest: Vec<AdamWTensor<'_>> = rest.drain(..).map(|(_, t)| t).collect();
        let mut alone: Vec<AdamWTensor<'_>> = alone.drain(..).map(|(_, t)| t).collect();
        ops::adamw_step(&mut alone, apart_config, apart_step, grad_scale)?;
        ops::adamw_step(&mut rest, config, step, grad_scale)?;
        self.refresh_derived()
    }

    /// Re-draws parameter `index` from its initialisation (as [`GptParams::init`] would with
    /// `seed`) and zeroes its AdamW moments.
    pub fn redraw(&mut self, index: usize, seed: u64) -> Result<()> {
        let spec = self.check_index("GptParams::redraw", index)?.clone();
        let numel: usize = spec.shape.iter().product();
        let values = match spec.init {
            Init::Zeros => vec![0.0; numel],
            Init::Ones => vec![1.0; numel],
            Init::Normal(std) => normal(numel, std, seed ^ splitmix64(name_hash(&spec.name))),
        };
        self.set_value(index, values)?;
        let p = &mut self.params[index];
        p.exp_avg.fill_bytes(0)?;
        p.exp_avg_sq.fill_bytes(0)
    }

    /// Replaces parameter `index`'s master value (and its compute copy) by `values`, with a
    /// masked layer's mask applied (and a `sparse_low_rank` layer's weight recomputed when one of
    /// its factors changes).
    pub fn set_value(&mut self, index: usize, values: Vec<f32>) -> Result<()> {
        let spec = self.check_index("GptParams::set_value", index)?;
        if self.sltrain.contains_key(&index) {
            return Err(Error::invalid(
                "GptParams::set_value",
                "index",
                "a parameter (a sparse_low_rank layer's weight is derived from its factors)",
                &spec.name,
            ));
        }
        let numel: usize = spec.shape.iter().product();
        if values.len() != numel {
            return Err(Error::invalid(
                "GptParams::set_value",
                "values",
                format!("{numel} values for {}", spec.name),
                values.len(),
            ));
        }
        let mut value = Tensor::from_vec(values, &spec.shape, &self.device)?;
        if let Some(mask) = self.masks.get(&index) {
            ops::spdf_apply_mask(&mut value, &mask.mask)?;
        }
        let compute = match self.params[index].compute {
            Some(_) => Some(cast(&value, self.dtype)?),
            None => None,
        };
        let p = &mut self.params[index];
        p.value = value;
        p.compute = compute;
        self.refresh_double_pruned(index)?;
        let owner = self
            .layout
            .linears()
            .into_iter()
            .find(|l| l.sltrain.is_some_and(|s| [s.a, s.b, s.s].contains(&index)))
            .copied();
        match owner {
            Some(linear) => self.refresh_sltrain(&linear),
            None => Ok(()),
        }
    }

    fn check_index(&self, op: &'static str, index: usize) -> Result<&ParamSpec> {
        self.params.get(index).map(|p| &p.spec).ok_or_else(|| {
            Error::invalid(
                op,
                "index",
                format!("a parameter index below {}", self.params.len()),
                index,
            )
        })
    }

    /// Writes the parameters to `path` (safetensors, Hugging Face names, the configuration in the
    /// metadata), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mask_names: Vec<(String, &Tensor)> = self
            .masks
            .iter()
            .map(|(&index, mask)| (mask_name(&self.params[index].spec.name), mask.mask.bits()))
            .collect();
        let supports: Vec<(String, &Tensor)> = self
            .sltrain
            .iter()
            .map(|(&index, layer)| (support_name(&self.params[index].spec.name), layer.support()))
            .collect();
        let packed: Vec<(String, &Tensor)> = self
            .packed
            .iter()
            .map(|(&index, bits)| (packed_name(&self.params[index].spec.name), bits))
            .collect();
        let list: Vec<(&str, &Tensor)> = self
            .params
            .iter()
            .enumerate()
            .filter(|(index, _)| !self.packed.contains_key(index))
            .map(|(_, p)| (p.spec.name.as_str(), &p.value))
            .chain(mask_names.iter().map(|(name, bits)| (name.as_str(), *bits)))
            .chain(supports.iter().map(|(name, support)| (name.as_str(), *support)))
            .chain(packed.iter().map(|(name, bits)| (name.as_str(), *bits)))
            .collect();
        let mut metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            (CONFIG_KEY.to_string(), self.config_json()),
        ]);
        if !self.packed.is_empty() {
            metadata.insert(PACKED_KEY.to_string(), PACKED_BINARY.to_string());
        }
        if self.has_adapters() {
            let on = if self.adapters_on { "on" } else { "off" };
            metadata.insert(ADAPTERS_KEY.to_string(), on.to_string());
        }
        safetensors::save(path, &list, &metadata)
    }

    /// Reads parameters saved by [`GptParams::save`] or by Hugging Face's libraries. The
    /// configuration is the checkpoint's own when it has one, else `config` (a Hugging Face
    /// checkpoint has none), and every tensor's name and shape is checked against it. A packed
    /// checkpoint (`tessera export --packed`) is an error: it has no latent weights to train;
    /// [`GptParams::load_inference`] reads it.
    pub fn load(path: impl AsRef<Path>, config: Option<&GptConfig>, device: &Device) -> Result<GptParams> {
        GptParams::load_checkpoint(path.as_ref(), config, device, false)
    }

    /// [`GptParams::load`] for inference: a packed checkpoint too, whose binary layers then run
    /// the packed forward.
    pub fn load_inference(path: impl AsRef<Path>, config: Option<&GptConfig>, device: &Device) -> Result<GptParams> {
        GptParams::load_checkpoint(path.as_ref(), config, device, true)
    }

    fn load_checkpoint(path: &Path, config: Option<&GptConfig>, device: &Device, inference: bool) -> Result<GptParams> {
        let mut file = SafeTensors::load(path)?;
        let packed = match file.metadata().get(PACKED_KEY).map(String::as_str) {
            None => false,
            Some(PACKED_BINARY) if inference => true,
            Some(PACKED_BINARY) => {
                return Err(Error::file(
                    path.display(),
                    "a packed checkpoint (tessera export --packed) keeps 1 bit of each binary weight, not the \
                     latent f32 weights that training updates: it runs inference only (generate, eval); train \
                     from the checkpoint it was exported from",
                ))
            }
            Some(other) => {
                return Err(Error::file(
                    path.display(),
                    format!("metadata `{PACKED_KEY}`: expected \"{PACKED_BINARY}\", got {other:?}"),
                ))
            }
        };
        let (config, variants) = match (file.metadata().get(CONFIG_KEY), config) {
            (Some(text), _) => parse_config_json(text)
                .map_err(|e| Error::file(path.display(), format!("metadata `{CONFIG_KEY}`: {e}")))?,
            (None, Some(config)) => (config.clone(), LinearVariants::dense()),
            (None, None) => {
                return Err(Error::file(
                    path.display(),
                    "the checkpoint does not record its configuration; name a preset or a config file",
                ))
            }
        };
        config.validate()?;
        variants.validate(&config)?;
        match file.metadata().get(sparse_layers::EXPORT_KEY).map(String::as_str) {
            None => {}
            Some(sparse_layers::SPARSE24_FORM) => {
                return sparse_layers::load_sparse24(&mut file, path, config, variants, device)
            }
            Some(other) => {
                return Err(Error::file(
                    path.display(),
                    format!(
                        "metadata `{}`: an export form this build does not read: {other:?}",
                        sparse_layers::EXPORT_KEY
                    ),
                ))
            }
        }
        let layout = ModelLayout::with_variants(&config, &variants);
        let binary: Vec<Linear> = match packed {
            true => layout
                .linears()
                .into_iter()
                .filter(|l| l.binary.is_some())
                .copied()
                .collect(),
            false => Vec::new(),
        };
        let values = layout
            .specs
            .iter()
            .enumerate()
            .map(|(index, spec)| match binary.iter().any(|l| l.weight == index) {
                true => Tensor::zeros(&[1], DType::F32, device),
                false => file.take(&spec.name, DType::F32, &spec.shape)?.to_device(device),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut params = GptParams::from_values(config, variants, layout, values, device)?;
        for linear in &binary {
            let name = packed_name(&params.params[linear.weight].spec.name);
            let shape = [linear.output, ops::binary::packed_words(linear.input)];
            let bits = file.take(&name, DType::U32, &shape)?.to_device(device)?;
            params.packed.insert(linear.weight, bits);
        }
        params.attach_sltrain()?;
        // The support is fixed by the layer's seed; the stored one must be that one.
        for (&index, layer) in &params.sltrain {
            let name = support_name(&params.params[index].spec.name);
            let stored = file.take(&name, DType::U32, &[layer.nnz()])?.to_vec::<u32>()?;
            if stored != layer.support().to_vec::<u32>()? {
                return Err(Error::file(
                    path.display(),
                    format!("`{name}` is not the support that the layer's seed draws"),
                ));
            }
        }
        params.adapters_on = match file.metadata().get(ADAPTERS_KEY).map(String::as_str) {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(Error::file(
                    path.display(),
                    format!("metadata `{ADAPTERS_KEY}`: expected \"on\" or \"off\", got {other:?}"),
                ))
            }
        };
        // A masked layer without a mask in the file is dense: not pruned yet, or densified.
        let linears: Vec<Linear> = params.layout.linears().into_iter().copied().collect();
        for linear in linears.iter().filter(|l| l.spec.variant.is_masked()) {
            let spec = &params.layout.specs[linear.weight];
            let name = mask_name(&spec.name);
            if file.names().any(|n| n == name) {
                let (rows, cols) = stored_dims(spec);
                let bits = file.take(&name, DType::U32, &[rows, cols.div_ceil(32)])?;
                let mask = StaticMask::from_bits(bits.to_device(device)?, rows, cols)
                    .map_err(|e| Error::file(path.display(), e))?;
                params.adopt_mask(linear, mask)?;
            }
        }
        Ok(params)
    }
}

/// One block linear layer as `tessera info` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearSummary {
    /// The Hugging Face name without `.weight`.
    pub name: String,
    pub spec: LinearSpec,
    /// Trainable values: the weight's (or SLTrain's factors and sparse values), the bias's, a
    /// binary layer's α and β, the adapter's.
    pub parameters: usize,
    /// The weight's entries that are not fixed at 0 (all but a mask's pruned ones).
    pub kept: usize,
    /// Bytes in a checkpoint: the f32 trainable values, a mask's bits, an SLTrain layer's support
    /// and materialised weight.
    pub bytes: usize,
    /// Bytes that inference reads per forward: a binary layer's packed sign bits with its f32 α,
    /// β and bias (`tessera export --packed`); any other layer's weight and bias in bf16 (a
    /// GPU's compute dtype), its adapter included.
    pub inference_bytes: usize,
}

/// Every block linear layer of `config`'s model with `variants` (validated).
pub fn linear_summary(config: &GptConfig, variants: &LinearVariants) -> Result<Vec<LinearSummary>> {
    config.validate()?;
    variants.validate(config)?;
    let layout = ModelLayout::with_variants(config, variants);
    Ok(layout
        .linears()
        .into_iter()
        .map(|linear| {
            let spec = &layout.specs[linear.weight];
            let numel = linear.input * linear.output;
            let bias = linear.bias.map_or(0, |_| linear.output);
            let adapter = linear.spec.lora.map_or(0, |l| l.rank * (linear.input + linear.output))
                + linear.binary.map_or(0, |_| 2 * linear.input);
            // SLTrain trains its factors and S's values, and stores the support and the
            // materialised weight beside them.
            let (trained, extra_bytes) = match linear.sltrain {
                Some(index) => {
                    let factors = layout.specs[index.a].shape.iter().product::<usize>()
                        + layout.specs[index.b].shape.iter().product::<usize>();
                    let nnz = layout.specs[index.s].shape[0];
                    (factors + nnz, 4 * nnz + 4 * numel)
                }
                None => (numel, 0),
            };
            let (rows, cols) = stored_dims(spec);
            let (kept, mask_bytes) = match linear.spec.variant {
                Variant::Nm { n, m, .. } => (numel / m * n, 4 * rows * cols.div_ceil(32)),
                Variant::Unstructured { density, .. } => (
                    numel - ((1.0 - density) * numel as f64).round() as usize,
                    4 * rows * cols.div_ceil(32),
                ),
                _ => (numel, 0),
            };
            let inference_bytes = match linear.binary {
                Some(_) => 4 * linear.output * ops::binary::packed_words(linear.input) + 4 * (adapter + bias),
                None => 2 * (numel + bias + adapter),
            };
            LinearSummary {
                name: spec.name.strip_suffix(".weight").unwrap_or(&spec.name).to_string(),
                spec: linear.spec,
                parameters: trained + bias + adapter,
                kept,
                bytes: 4 * (trained + bias + adapter) + mask_bytes + extra_bytes,
                inference_bytes,
            }
        })
        .collect())
}

/// The checkpoint name of the SLTrain support of weight `weight_name`
/// (`tessera.<layer>.sltrain_support`).
pub fn support_name(weight_name: &str) -> String {
    format!(
        "tessera.{}.sltrain_support",
        weight_name.strip_suffix(".weight").unwrap_or(weight_name)
    )
}

/// The SLTrain op's layer of `linear` (a `sparse_low_rank` one) in `dtype` on `device`: its
/// support and initial values drawn from the variant's seed mixed with the layer's name.
fn sltrain_layer(layout: &ModelLayout, linear: &Linear, dtype: DType, device: &Device) -> Result<ops::SlTrainLayer> {
    let Variant::SparseLowRank {
        rank,
        density,
        alpha,
        seed,
    } = linear.spec.variant
    else {
        return Err(Error::invalid(
            OP_PARAMS,
            "linear",
            "a sparse_low_rank layer",
            linear.spec.variant,
        ));
    };
    let config = ops::SlTrainConfig {
        d_out: linear.output,
        d_in: linear.input,
        rank,
        density,
        alpha,
        bias: linear.bias.is_some(),
        support: ops::SlTrainSupport::Random,
    };
    let name = &layout.specs[linear.weight].name;
    ops::SlTrainLayer::new(config, dtype, seed ^ splitmix64(name_hash(name)), device)
}

/// A float tensor's values as f32 on the host.
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>(),
        DType::BF16 => Ok(t.to_vec::<half::bf16>()?.iter().map(|v| v.to_f32()).collect()),
        DType::F16 => Ok(t.to_vec::<half::f16>()?.iter().map(|v| v.to_f32()).collect()),
        other => Err(Error::invalid(OP_PARAMS, "tensor", "a float tensor", other)),
    }
}

const OP_PARAMS: &str = "GptParams";

/// The metadata key that marks a packed checkpoint, and its one value: binary layers packed.
pub const PACKED_KEY: &str = "tessera.packed";
pub const PACKED_BINARY: &str = "binary";

/// The checkpoint name of the packed sign bits of binary weight `weight_name`
/// (`tessera.<layer>.binary_bits`).
pub fn packed_name(weight_name: &str) -> String {
    format!(
        "tessera.{}.binary_bits",
        weight_name.strip_suffix(".weight").unwrap_or(weight_name)
    )
}

/// The checkpoint name of the mask of weight `weight_name` (`tessera.<layer>.mask`).
pub fn mask_name(weight_name: &str) -> String {
    format!(
        "tessera.{}.mask",
        weight_name.strip_suffix(".weight").unwrap_or(weight_name)
    )
}

/// [`GptConfig::to_json`] with `variants`' `linears` field when a layer is not dense.
pub fn config_json(config: &GptConfig, variants: &LinearVariants) -> String {
    let text = config.to_json();
    match (variants.to_json(), serde_json::from_str::<serde_json::Value>(&text)) {
        (Some(linears), Ok(mut object)) => {
            object["linears"] = linears;
            object.to_string()
        }
        _ => text,
    }
}

/// Parses [`config_json`]'s output: the configuration and its variants (all dense without a
/// `linears` field).
pub fn parse_config_json(text: &str) -> Result<(GptConfig, LinearVariants)> {
    let config = GptConfig::from_json(text)?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::invalid("GptConfig", "json", "a JSON object", e))?;
    let variants = match value.get("linears") {
        None => LinearVariants::dense(),
        Some(linears) => LinearVariants::from_json(linears)?,
    };
    variants.validate(&config)?;
    Ok((config, variants))
}

/// The (rows, cols) of a 2-D weight as stored.
fn stored_dims(spec: &ParamSpec) -> (usize, usize) {
    (spec.shape[0], spec.shape.get(1).copied().unwrap_or(1))
}

/// The kept flags (1 = kept) of `values` (rows, cols) pruned N:M by magnitude, with groups of
/// consecutive entries along each row (`along_rows`) or along each column.
fn nm_kept(values: &[f32], rows: usize, cols: usize, pattern: NmPattern, along_rows: bool) -> Result<Vec<u8>> {
    if along_rows {
        let w = Tensor::from_slice(values, &[rows, cols], &Device::Cpu)?;
        return ops::nm_mask(&w, pattern)?.to_vec::<u8>();
    }
    let transposed: Vec<f32> = (0..cols * rows).map(|i| values[(i % rows) * cols + i / rows]).collect();
    let w = Tensor::from_vec(transposed, &[cols, rows], &Device::Cpu)?;
    let kept_t = ops::nm_mask(&w, pattern)?.to_vec::<u8>()?;
    Ok((0..rows * cols).map(|i| kept_t[(i % cols) * rows + i / cols]).collect())
}

/// A layer's weight `value` (f32, in its stored layout) as (out, in): itself for an (out, in)
/// weight, a transposed host copy for an (in, out) one.
pub(crate) fn output_major(value: &Tensor, linear: &Linear) -> Result<Tensor> {
    let (input, output) = (linear.input, linear.output);
    let values = value.to_vec::<f32>()?;
    let values = match linear.layout {
        Layout::InputMajor => (0..output * input)
            .map(|k| values[(k % input) * output + k / input])
            .collect(),
        _ => values,
    };
    Tensor::from_vec(values, &[output, input], &value.device())
}

/// `tensor` (f32) converted to `dtype`, rounding to nearest even, on the same device.
pub(crate) fn cast(tensor: &Tensor, dtype: DType) -> Result<Tensor> {
    let values = tensor.to_vec::<f32>()?;
    let device = tensor.device();
    match dtype {
        DType::F32 => Tensor::from_vec(values, tensor.shape(), &device),
        DType::BF16 => Tensor::from_vec(
            values.into_iter().map(half::bf16::from_f32).collect(),
            tensor.shape(),
            &device,
        ),
        DType::F16 => Tensor::from_vec(
            values.into_iter().map(half::f16::from_f32).collect(),
            tensor.shape(),
            &device,
        ),
        other => Err(Error::invalid("cast", "dtype", "a float dtype", other)),
    }
}

/// A stable 64-bit hash of a parameter name (FNV-1a), so that each parameter draws its own
/// stream of initial values however the list is ordered.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `len` draws from N(0, std²): Box-Muller over SplitMix64 counters.
fn normal(len: usize, std: f32, seed: u64) -> Vec<f32> {
    let unit = |i: u64| ((splitmix64(seed.wrapping_add(i)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (0..len)
        .map(|i| {
            let pair = (i / 2) as u64;
            let radius = (-2.0 * unit(2 * pair).ln()).sqrt();
            let angle = std::f64::consts::TAU * unit(2 * pair + 1);
            let z = if i % 2 == 0 {
                radius * angle.cos()
            } else {
                radius * angle.sin()
            };
            (z * std as f64) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_matches_hugging_faces_tensors() {
        let mut config = GptConfig::gpt2_small();
        config.vocab = 50257;
        let specs = parameters(&config);
        // GPT2LMHeadModel's state dict without its tied lm_head and the attention-mask buffers.
        assert_eq!(specs.len(), 2 + 12 * 12 + 2);
        let total: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert_eq!(total, config.parameter_count());
        let find = |name: &str| specs.iter().find(|s| s.name == name).unwrap().shape.clone();
        assert_eq!(find("transformer.wte.weight"), vec![50257, 768]);
        assert_eq!(find("transformer.wpe.weight"), vec![1024, 768]);
        assert_eq!(find("transformer.h.11.attn.c_attn.weight"), vec![768, 2304]);
        assert_eq!(find("transformer.h.0.mlp.c_proj.weight"), vec![3072, 768]);
        assert_eq!(find("transformer.ln_f.bias"), vec![768]);
    }

    #[test]
    fn llama_family_uses_llama_names_and_counts() {
        let config = GptConfig {
            kv_heads: 2,
            tied_embeddings: false,
            ..GptConfig::llama_tiny()
        };
        let specs = parameters(&config);
        let total: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert_eq!(total, config.parameter_count());
        let find = |name: &str| specs.iter().find(|s| s.name == name).unwrap();
        let kv = 2 * config.head_dim();
        assert_eq!(
            find("model.layers.0.self_attn.k_proj.weight").shape,
            vec![kv, config.width]
        );
        assert_eq!(find("model.layers.0.mlp.gate_proj.weight").layout, Layout::OutputMajor);
        assert_eq!(find("lm_head.weight").shape, vec![config.vocab, config.width]);
        assert!(specs.iter().all(|s| !s.name.ends_with(".bias")));
    }

    #[test]
    fn normal_draws_have_the_asked_moments() {
        let values = normal(100_000, 0.02, 3);
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 3e-4, "{}", var.sqrt());
    }

    #[test]
    fn save_then_load_gives_the_same_parameters() {
        let config = GptConfig::llama_tiny();
        let params = GptParams::init(&config, &Device::Cpu, 5).unwrap();
        let dir = std::env::temp_dir().join(format!("tessera-gpt-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        params.save(&path).unwrap();
        let loaded = GptParams::load(&path, None, &Device::Cpu).unwrap();
        assert_eq!(loaded.config, config);
        for (a, b) in params.params.iter().zip(&loaded.params) {
            assert_eq!(a.spec, b.spec);
            assert_eq!(
                a.value.to_bytes().unwrap(),
                b.value.to_bytes().unwrap(),
                "{}",
                a.spec.name
            );
        }
        // A checkpoint without a recorded configuration is checked against the one given.
        let mut other = config.clone();
        other.width = 256;
        let wrong = GptParams::init(&other, &Device::Cpu, 5).unwrap();
        let list: Vec<(&str, &Tensor)> = wrong.params.iter().map(|p| (p.spec.name.as_str(), &p.value)).collect();
        safetensors::save(&path, &list, &BTreeMap::new()).unwrap();
        let error = GptParams::load(&path, Some(&config), &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("model.embed_tokens.weight") && error.contains("[256, 256]"),
            "{error}"
        );
        let error = GptParams::load(&path, None, &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not record its configuration"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
