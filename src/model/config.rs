//! The GPT configuration: the architecture's choices, named presets and their validation.

use crate::error::{Error, Result};
use serde_json::{json, Value};

const OP: &str = "GptConfig";

/// Which library's layout and names the model follows (see [`super::params`]): GPT-2's (biases
/// on every linear layer, one fused query-key-value projection, Conv1D weights stored (in, out))
/// or Llama's (no biases, separate projections, weights stored (out, in)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
}

/// The normalisation before attention, before the MLP and at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// GPT-2's LayerNorm with gain and bias.
    LayerNorm,
    /// Llama's RMSNorm with a gain only.
    RmsNorm,
}

/// The MLP's non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// GPT-2: `down(gelu_tanh(up(x)))`.
    Gelu,
    /// Llama: `down(silu(gate(x)) * up(x))`.
    SwiGlu,
}

/// How token positions enter the model.
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    /// GPT-2's learned position table of `context` rows.
    Learned,
    /// Rotary embeddings on queries and keys; one base for every head, or one per head (HARPE).
    Rope { bases: Vec<f32> },
}

/// Which keys each query attends to (always causal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// Every earlier key.
    Causal,
    /// The `size` most recent keys, the query's own included.
    Window { size: usize },
    /// LM-Infinite's Λ shape: the first `global` keys and the `window` most recent ones; with
    /// RoPE, relative distances are capped at `window` (the distance ceiling).
    Lambda { global: usize, window: usize },
}

/// A decoder-only transformer's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub family: Family,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads: `heads` for multi-head attention, fewer for GQA, 1 for MQA.
    pub kv_heads: usize,
    /// The residual stream's width; `width / heads` is the head dimension.
    pub width: usize,
    pub ffn_width: usize,
    /// The longest sequence the model is trained on.
    pub context: usize,
    pub norm: Norm,
    /// The normalisations' epsilon (GPT-2: 1e-5; Llama: 1e-5 or 1e-6, from its config).
    pub norm_eps: f32,
    pub activation: Activation,
    pub positions: Positions,
    /// The output projection shares the token embedding's weights.
    pub tied_embeddings: bool,
    pub attention: Attention,
    /// WaveletGPT: after every block, the first half of the coordinates replaced by causal
    /// averages over windows from 2 to the context (ALGORITHMS.md §3, the spec's defaults).
    pub wavelet: bool,
}

impl GptConfig {
    /// The default preset: a byte-level model small enough to train in minutes on two CPU cores.
    pub fn tiny() -> GptConfig {
        GptConfig {
            family: Family::Gpt2,
            vocab: 256,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            width: 128,
            ffn_width: 512,
            context: 128,
            norm: Norm::LayerNorm,
            norm_eps: 1e-5,
            activation: Activation::Gelu,
            positions: Positions::Learned,
            tied_embeddings: true,
            attention: Attention::Causal,
            wavelet: false,
        }
    }

    /// GPT-2 small, 124M parameters, with the vocabulary padded to 50304 (a multiple of 128).
    pub fn gpt2_small() -> GptConfig {
        GptConfig {
            family: Family::Gpt2,
            vocab: 50304,
            layers: 12,
            heads: 12,
            kv_heads: 12,
            width: 768,
            ffn_width: 3072,
            context: 1024,
            norm: Norm::LayerNorm,
            norm_eps: 1e-5,
            activation: Activation::Gelu,
            positions: Positions::Learned,
            tied_embeddings: true,
            attention: Attention::Causal,
            wavelet: false,
        }
    }

    /// `tiny` in the Llama family: RMSNorm, SwiGLU, RoPE (base 10000), untied output projection.
    pub fn llama_tiny() -> GptConfig {
        GptConfig {
            family: Family::Llama,
            ffn_width: 344,
            norm: Norm::RmsNorm,
            activation: Activation::SwiGlu,
            positions: Positions::Rope { bases: vec![10000.0] },
            tied_embeddings: false,
            ..GptConfig::tiny()
        }
    }

    /// A preset by name: `tiny`, `llama-tiny` or `gpt2-small`.
    pub fn preset(name: &str) -> Result<GptConfig> {
        match name {
            "tiny" => Ok(GptConfig::tiny()),
            "llama-tiny" => Ok(GptConfig::llama_tiny()),
            "gpt2-small" => Ok(GptConfig::gpt2_small()),
            other => Err(Error::invalid(
                OP,
                "preset",
                "`tiny`, `llama-tiny` or `gpt2-small`",
                format!("`{other}`"),
            )),
        }
    }

    /// The head dimension.
    pub fn head_dim(&self) -> usize {
        self.width / self.heads.max(1)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab", self.vocab),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("width", self.width),
            ("ffn_width", self.ffn_width),
            ("context", self.context),
        ];
        for (arg, value) in positive {
            if value == 0 {
                return Err(Error::invalid(OP, arg, "a positive size", 0));
            }
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                OP,
                "width",
                format!("a multiple of heads ({})", self.heads),
                self.width,
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::invalid(
                OP,
                "kv_heads",
                format!("a divisor of heads ({})", self.heads),
                self.kv_heads,
            ));
        }
        let head_dim = self.head_dim();
        if !head_dim.is_multiple_of(8) || head_dim > 256 {
            return Err(Error::invalid(
                OP,
                "width",
                "width / heads a multiple of 8 up to 256 (the attention kernels' head dims)",
                format!("head dim {head_dim}"),
            ));
        }
        match self.attention {
            Attention::Causal => {}
            Attention::Window { size } if size >= 1 => {}
            Attention::Lambda { window, .. } if window >= 1 => {}
            other => {
                return Err(Error::invalid(
                    OP,
                    "attention",
                    "a window of at least 1 token",
                    format!("{other:?}"),
                ))
            }
        }
        if self.wavelet && self.context < 2 {
            return Err(Error::invalid(
                OP,
                "context",
                "at least 2 for wavelet mixing",
                self.context,
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(Error::invalid(OP, "norm_eps", "a finite number >= 0", self.norm_eps));
        }
        if let Positions::Rope { bases } = &self.positions {
            if !head_dim.is_multiple_of(2) {
                return Err(Error::invalid(OP, "positions", "an even head dim for RoPE", head_dim));
            }
            // Query heads that share a key/value head share its rotation, so bases go per KV head.
            if bases.len() != 1 && bases.len() != self.kv_heads {
                return Err(Error::invalid(
                    OP,
                    "positions.bases",
                    format!("1 base or one per key/value head ({})", self.kv_heads),
                    bases.len(),
                ));
            }
            if let Some(bad) = bases.iter().find(|b| !(b.is_finite() && **b > 1.0)) {
                return Err(Error::invalid(OP, "positions.bases", "finite bases > 1", bad));
            }
        }
        Ok(())
    }

    /// The configuration as a JSON object, as checkpoints record it.
    pub fn to_json(&self) -> String {
        let positions = match &self.positions {
            Positions::Learned => json!("learned"),
            Positions::Rope { bases } => json!({ "rope": bases }),
        };
        json!({
            "family": match self.family { Family::Gpt2 => "gpt2", Family::Llama => "llama" },
            "vocab": self.vocab,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "width": self.width,
            "ffn_width": self.ffn_width,
            "context": self.context,
            "norm": match self.norm { Norm::LayerNorm => "layernorm", Norm::RmsNorm => "rmsnorm" },
            "norm_eps": self.norm_eps,
            "activation": match self.activation { Activation::Gelu => "gelu", Activation::SwiGlu => "swiglu" },
            "positions": positions,
            "tied_embeddings": self.tied_embeddings,
            "attention": match self.attention {
                Attention::Causal => json!("causal"),
                Attention::Window { size } => json!({ "window": size }),
                Attention::Lambda { global, window } => json!({ "lambda": { "global": global, "window": window } }),
            },
            "wavelet": self.wavelet,
        })
        .to_string()
    }

    /// Parses [`GptConfig::to_json`]'s output; every field is required and checked.
    pub fn from_json(text: &str) -> Result<GptConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::invalid(OP, "json", "a JSON object", e))?;
        let field = |key: &'static str| {
            value
                .get(key)
                .ok_or_else(|| Error::invalid(OP, key, "a value", "nothing"))
        };
        let size = |key: &'static str| -> Result<usize> {
            let v = field(key)?;
            v.as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::invalid(OP, key, "a non-negative integer", v))
        };
        let word = |key: &'static str, choices: &[&str]| -> Result<usize> {
            let v = field(key)?;
            v.as_str()
                .and_then(|w| choices.iter().position(|c| *c == w))
                .ok_or_else(|| Error::invalid(OP, key, format!("one of {choices:?}"), v))
        };
        let positions = match field("positions")? {
            Value::String(s) if s == "learned" => Positions::Learned,
            Value::Object(map) => {
                let bases = map
                    .get("rope")
                    .and_then(Value::as_array)
                    .and_then(|b| {
                        b.iter()
                            .map(|v| v.as_f64().map(|v| v as f32))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        Error::invalid(OP, "positions", "{\"rope\": [bases]}", Value::Object(map.clone()))
                    })?;
                Positions::Rope { bases }
            }
            other => {
                return Err(Error::invalid(
                    OP,
                    "positions",
                    "\"learned\" or {\"rope\": [bases]}",
                    other,
                ))
            }
        };
        let tied = field("tied_embeddings")?;
        let number = |v: Option<&Value>| v.and_then(Value::as_u64).map(|v| v as usize);
        let attention = match field("attention")? {
            Value::String(s) if s == "causal" => Attention::Causal,
            v => match (number(v.get("window")), v.get("lambda")) {
                (Some(size), None) => Attention::Window { size },
                (None, Some(l)) => match (number(l.get("global")), number(l.get("window"))) {
                    (Some(global), Some(window)) => Attention::Lambda { global, window },
                    _ => {
                        return Err(Error::invalid(
                            OP,
                            "attention",
                            "{\"lambda\": {\"global\": g, \"window\": w}}",
                            v,
                        ))
                    }
                },
                _ => {
                    return Err(Error::invalid(
                        OP,
                        "attention",
                        "\"causal\", {\"window\": n} or {\"lambda\": {\"global\": g, \"window\": w}}",
                        v,
                    ))
                }
            },
        };
        let wavelet = field("wavelet")?;
        let config = GptConfig {
            family: [Family::Gpt2, Family::Llama][word("family", &["gpt2", "llama"])?],
            vocab: size("vocab")?,
            layers: size("layers")?,
            heads: size("heads")?,
            kv_heads: size("kv_heads")?,
            width: size("width")?,
            ffn_width: size("ffn_width")?,
            context: size("context")?,
            norm: [Norm::LayerNorm, Norm::RmsNorm][word("norm", &["layernorm", "rmsnorm"])?],
            norm_eps: {
                let v = field("norm_eps")?;
                v.as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| Error::invalid(OP, "norm_eps", "a number", v))?
            },
            activation: [Activation::Gelu, Activation::SwiGlu][word("activation", &["gelu", "swiglu"])?],
            positions,
            tied_embeddings: tied
                .as_bool()
                .ok_or_else(|| Error::invalid(OP, "tied_embeddings", "true or false", tied))?,
            attention,
            wavelet: wavelet
                .as_bool()
                .ok_or_else(|| Error::invalid(OP, "wavelet", "true or false", wavelet))?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` with which Hugging Face transformers loads this model (GPT2LMHeadModel
    /// or LlamaForCausalLM), or `None` when no transformers architecture matches it (a GPT-2
    /// with RoPE, a Llama with GELU, per-head RoPE bases, ...).
    pub fn hugging_face_json(&self) -> Option<String> {
        let rope_base = match &self.positions {
            Positions::Rope { bases } if bases.len() == 1 => Some(bases[0]),
            _ => None,
        };
        if self.attention != Attention::Causal || self.wavelet {
            return None;
        }
        let config = match (self.family, self.norm, self.activation, rope_base) {
            (Family::Gpt2, Norm::LayerNorm, Activation::Gelu, None)
                if self.positions == Positions::Learned && self.kv_heads == self.heads && self.tied_embeddings =>
            {
                json!({
                    "architectures": ["GPT2LMHeadModel"],
                    "model_type": "gpt2",
                    "vocab_size": self.vocab,
                    "n_positions": self.context,
                    "n_embd": self.width,
                    "n_layer": self.layers,
                    "n_head": self.heads,
                    "n_inner": self.ffn_width,
                    "activation_function": "gelu_new",
                    "layer_norm_epsilon": self.norm_eps,
                    "tie_word_embeddings": true,
                })
            }
            (Family::Llama, Norm::RmsNorm, Activation::SwiGlu, Some(base)) => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab,
                "hidden_size": self.width,
                "intermediate_size": self.ffn_width,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "max_position_embeddings": self.context,
                "rms_norm_eps": self.norm_eps,
                "rope_theta": base,
                "hidden_act": "silu",
                "attention_bias": false,
                "mlp_bias": false,
                "tie_word_embeddings": self.tied_embeddings,
            }),
            _ => return None,
        };
        Some(config.to_string())
    }

    /// Parameters of the model, counting a tied output projection once.
    pub fn parameter_count(&self) -> usize {
        super::params::parameters(self)
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_gpt2s_parameter_count() {
        // Hugging Face's GPT-2 has 124,439,808 parameters with its 50257-token vocabulary.
        let mut config = GptConfig::gpt2_small();
        config.vocab = 50257;
        assert_eq!(config.parameter_count(), 124_439_808);
    }

    #[test]
    fn presets_validate_and_bad_sizes_do_not() {
        GptConfig::tiny().validate().unwrap();
        GptConfig::gpt2_small().validate().unwrap();
        GptConfig::llama_tiny().validate().unwrap();
        let mut config = GptConfig::tiny();
        config.kv_heads = 3;
        assert!(config.validate().unwrap_err().to_string().contains("kv_heads"));
        let mut config = GptConfig::tiny();
        config.width = 100;
        assert!(config.validate().unwrap_err().to_string().contains("width"));
        assert!(GptConfig::preset("huge").is_err());
    }

    #[test]
    fn hugging_face_configs_only_for_their_architectures() {
        let gpt2 = GptConfig::tiny().hugging_face_json().unwrap();
        assert!(
            gpt2.contains("\"GPT2LMHeadModel\"") && gpt2.contains("\"n_inner\":512"),
            "{gpt2}"
        );
        let llama = GptConfig::llama_tiny().hugging_face_json().unwrap();
        assert!(
            llama.contains("\"LlamaForCausalLM\"") && llama.contains("\"rope_theta\":10000"),
            "{llama}"
        );
        let mut rotary_gpt2 = GptConfig::tiny();
        rotary_gpt2.positions = Positions::Rope { bases: vec![10000.0] };
        assert_eq!(rotary_gpt2.hugging_face_json(), None);
        let mut per_head = GptConfig::llama_tiny();
        per_head.positions = Positions::Rope {
            bases: vec![1e4, 2e4, 3e4, 4e4],
        };
        assert_eq!(per_head.hugging_face_json(), None);
    }

    #[test]
    fn json_round_trips_and_names_bad_fields() {
        let lambda = GptConfig {
            attention: Attention::Lambda { global: 4, window: 32 },
            wavelet: true,
            ..GptConfig::llama_tiny()
        };
        let window = GptConfig {
            attention: Attention::Window { size: 16 },
            ..GptConfig::tiny()
        };
        for config in [
            GptConfig::tiny(),
            GptConfig::llama_tiny(),
            GptConfig::gpt2_small(),
            lambda,
            window,
        ] {
            assert_eq!(GptConfig::from_json(&config.to_json()).unwrap(), config);
        }
        let text = GptConfig::tiny().to_json().replace("\"gelu\"", "\"relu\"");
        assert!(GptConfig::from_json(&text)
            .unwrap_err()
            .to_string()
            .contains("activation"));
        let text = GptConfig::tiny().to_json().replace("\"layers\":4", "\"layers\":-4");
        assert!(GptConfig::from_json(&text).unwrap_err().to_string().contains("layers"));
    }
}
