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

/// Every parameter of the model, in the order the forward pass uses them.
pub fn parameters(config: &GptConfig) -> Vec<ParamSpec> {
    let (c, f, v) = (config.width, config.ffn_width, config.vocab);
    let kv = config.kv_heads * config.head_dim();
    let residual_std = STD / (2.0 * config.layers as f32).sqrt();
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, layout: Layout, init: Init, weight_decay: bool| {
        specs.push(ParamSpec {
            name,
            shape,
            layout,
            init,
            weight_decay,
        })
    };
    let gpt2 = config.family == Family::Gpt2;
    // A linear layer's weight (and bias, in the GPT-2 family) from `input` to `output` features.
    let linear = |push: &mut dyn FnMut(String, Vec<usize>, Layout, Init, bool),
                  prefix: String,
                  input: usize,
                  output: usize,
                  std: f32| {
        if gpt2 {
            push(
                format!("{prefix}.weight"),
                vec![input, output],
                Layout::InputMajor,
                Init::Normal(std),
                true,
            );
            push(
                format!("{prefix}.bias"),
                vec![output],
                Layout::Plain,
                Init::Zeros,
                false,
            );
        } else {
            push(
                format!("{prefix}.weight"),
                vec![output, input],
                Layout::OutputMajor,
                Init::Normal(std),
                true,
            );
        }
    };
    let norm = |push: &mut dyn FnMut(String, Vec<usize>, Layout, Init, bool), prefix: String| {
        push(format!("{prefix}.weight"), vec![c], Layout::Plain, Init::Ones, false);
        if config.norm == Norm::LayerNorm {
            push(format!("{prefix}.bias"), vec![c], Layout::Plain, Init::Zeros, false);
        }
    };

    let (embed, positions, layer, final_norm) = if gpt2 {
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
    push(
        format!("{embed}.weight"),
        vec![v, c],
        Layout::Plain,
        Init::Normal(STD),
        true,
    );
    if config.positions == Positions::Learned {
        push(
            format!("{positions}.weight"),
            vec![config.context, c],
            Layout::Plain,
            Init::Normal(STD),
            false,
        );
    }
    for i in 0..config.layers {
        let p = format!("{layer}.{i}");
        if gpt2 {
            norm(&mut push, format!("{p}.ln_1"));
            linear(&mut push, format!("{p}.attn.c_attn"), c, c + 2 * kv, STD);
            linear(&mut push, format!("{p}.attn.c_proj"), c, c, residual_std);
            norm(&mut push, format!("{p}.ln_2"));
            linear(&mut push, format!("{p}.mlp.c_fc"), c, f, STD);
            if config.activation == Activation::SwiGlu {
                linear(&mut push, format!("{p}.mlp.c_gate"), c, f, STD);
            }
            linear(&mut push, format!("{p}.mlp.c_proj"), f, c, residual_std);
        } else {
            norm(&mut push, format!("{p}.input_layernorm"));
            linear(&mut push, format!("{p}.self_attn.q_proj"), c, c, STD);
            linear(&mut push, format!("{p}.self_attn.k_proj"), c, kv, STD);
            linear(&mut push, format!("{p}.self_attn.v_proj"), c, kv, STD);
            linear(&mut push, format!("{p}.self_attn.o_proj"), c, c, residual_std);
            norm(&mut push, format!("{p}.post_attention_layernorm"));
            if config.activation == Activation::SwiGlu {
                linear(&mut push, format!("{p}.mlp.gate_proj"), c, f, STD);
            }
            linear(&mut push, format!("{p}.mlp.up_proj"), c, f, STD);
            linear(&mut push, format!("{p}.mlp.down_proj"), f, c, residual_std);
        }
    }
    norm(&mut push, final_norm.to_string());
    if !config.tied_embeddings {
        push(
            "lm_head.weight".into(),
            vec![v, c],
            Layout::OutputMajor,
            Init::Normal(STD),
            true,
        );
    }
    specs
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
