//! The model's parameter tensors: their checkpoint names, shapes, layouts and initialisation.
//!
//! Names are Hugging Face's, so that checkpoints move between the libraries: a GPT-2-family
//! model uses GPT2LMHeadModel's names (`transformer.h.0.attn.c_attn.weight`, its Conv1D weights
//! stored input-major, (in, out)), a Llama-family model uses LlamaForCausalLM's
//! (`model.layers.0.self_attn.q_proj.weight`, nn.Linear weights stored (out, in)). Tensors that
//! neither library has (a SwiGLU gate in a GPT-2-family model, learned positions in a Llama-family
//! one) follow the same scheme under the names listed here, and tessera-only state (masks, packed
//! bits, adapters) goes under the `tessera.` prefix.

use super::config::{Activation, Family, GptConfig, Norm, Positions};

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

/// A linear layer: indices of its weight and bias in [`ModelLayout::specs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub weight: usize,
    pub bias: Option<usize>,
    pub layout: Layout,
    pub input: usize,
    pub output: usize,
}

/// A normalisation's gain and (LayerNorm) bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormIndex {
    pub weight: usize,
    pub bias: Option<usize>,
}

/// The query, key and value projections: GPT-2's one fused `c_attn`, or Llama's three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qkv {
    Fused(Linear),
    Separate { q: Linear, k: Linear, v: Linear },
}

/// One transformer block's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The layout of `config`'s model, in the order the forward pass uses the parameters.
    pub fn new(config: &GptConfig) -> ModelLayout {
        let mut builder = Builder {
            specs: Vec::new(),
            gpt2: config.family == Family::Gpt2,
            width: config.width,
            layer_norm: config.norm == Norm::LayerNorm,
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
                        qkv: Qkv::Fused(builder.linear(format!("{p}.attn.c_attn"), c, c + 2 * kv, STD)),
                        out: builder.linear(format!("{p}.attn.c_proj"), c, c, residual_std),
                        norm2: builder.norm(format!("{p}.ln_2")),
                        up: builder.linear(format!("{p}.mlp.c_fc"), c, f, STD),
                        gate: swiglu.then(|| builder.linear(format!("{p}.mlp.c_gate"), c, f, STD)),
                        down: builder.linear(format!("{p}.mlp.c_proj"), f, c, residual_std),
                    }
                } else {
                    Block {
                        norm1: builder.norm(format!("{p}.input_layernorm")),
                        qkv: Qkv::Separate {
                            q: builder.linear(format!("{p}.self_attn.q_proj"), c, c, STD),
                            k: builder.linear(format!("{p}.self_attn.k_proj"), c, kv, STD),
                            v: builder.linear(format!("{p}.self_attn.v_proj"), c, kv, STD),
                        },
                        out: builder.linear(format!("{p}.self_attn.o_proj"), c, c, residual_std),
                        norm2: builder.norm(format!("{p}.post_attention_layernorm")),
                        gate: swiglu.then(|| builder.linear(format!("{p}.mlp.gate_proj"), c, f, STD)),
                        up: builder.linear(format!("{p}.mlp.up_proj"), c, f, STD),
                        down: builder.linear(format!("{p}.mlp.down_proj"), f, c, residual_std),
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
        ModelLayout {
            specs: builder.specs,
            token_embedding,
            positions,
            blocks,
            final_norm,
            head,
        }
    }

    /// Whether parameter `index` is a normalisation's gain or bias (whose gradients the norm
    /// kernels sum in f32).
    pub fn is_norm(&self, index: usize) -> bool {
        let norms = self
            .blocks
            .iter()
            .flat_map(|b| [b.norm1, b.norm2])
            .chain([self.final_norm]);
        norms.into_iter().any(|n| n.weight == index || n.bias == Some(index))
    }
}

struct Builder {
    specs: Vec<ParamSpec>,
    gpt2: bool,
    width: usize,
    layer_norm: bool,
}

impl Builder {
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
    fn linear(&mut self, prefix: String, input: usize, output: usize, std: f32) -> Linear {
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
        Linear {
            weight,
            bias,
            layout,
            input,
            output,
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
}
