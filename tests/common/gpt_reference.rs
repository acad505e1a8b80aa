//! A straightforward GPT in f64, written from the architectures' definitions and Hugging Face's
//! tensor names (not from tessera's model code), for the model tests: its loss is compared with
//! tessera's, and its finite differences with tessera's gradients.
#![allow(dead_code)]

use std::collections::HashMap;
use tessera::model::{Activation, Attention, Family, GptConfig, Norm, Positions};

/// Parameters by Hugging Face name, in f64.
pub type Weights = HashMap<String, Vec<f64>>;

/// The mean next-token cross-entropy of `inputs` against `targets`, `batch` rows of `seq`.
pub fn loss(config: &GptConfig, w: &Weights, inputs: &[u32], targets: &[u32], batch: usize, seq: usize) -> f64 {
    let logits = logits(config, w, inputs, batch, seq);
    let v = config.vocab;
    let mut total = 0.0;
    for (row, &target) in targets.iter().enumerate() {
        let z = &logits[row * v..(row + 1) * v];
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|x| (x - max).exp()).sum();
        total += max + sum.ln() - z[target as usize];
    }
    total / targets.len() as f64
}

/// Logits (batch · seq, vocab).
pub fn logits(config: &GptConfig, w: &Weights, inputs: &[u32], batch: usize, seq: usize) -> Vec<f64> {
    let (c, v) = (config.width, config.vocab);
    let gpt2 = config.family == Family::Gpt2;
    let get = |name: &str| -> &Vec<f64> { w.get(name).unwrap_or_else(|| panic!("reference: no tensor {name}")) };
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
    let wte = get(&format!("{embed}.weight"));
    let mut out = Vec::with_capacity(batch * seq * v);
    for b in 0..batch {
        let tokens = &inputs[b * seq..(b + 1) * seq];
        // x: (seq, c)
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .enumerate()
            .map(|(t, &token)| {
                let mut row = wte[token as usize * c..(token as usize + 1) * c].to_vec();
                if config.positions == Positions::Learned {
                    let wpe = get(&format!("{positions}.weight"));
                    for (value, p) in row.iter_mut().zip(&wpe[t * c..(t + 1) * c]) {
                        *value += p;
                    }
                }
                row
            })
            .collect();
        for l in 0..config.layers {
            let p = format!("{layer}.{l}");
            let (n1, n2) = if gpt2 {
                (format!("{p}.ln_1"), format!("{p}.ln_2"))
            } else {
                (format!("{p}.input_layernorm"), format!("{p}.post_attention_layernorm"))
            };
            let h: Vec<Vec<f64>> = x.iter().map(|row| norm(config, w, &n1, row)).collect();
            let attention = attention(config, w, &p, &h);
            let projected: Vec<Vec<f64>> = attention
                .iter()
                .map(|row| {
                    if gpt2 {
                        linear(w, &format!("{p}.attn.c_proj"), row, true)
                    } else {
                        linear(w, &format!("{p}.self_attn.o_proj"), row, false)
                    }
                })
                .collect();
            for (row, add) in x.iter_mut().zip(&projected) {
                for (value, a) in row.iter_mut().zip(add) {
                    *value += a;
                }
            }
            let h: Vec<Vec<f64>> = x.iter().map(|row| norm(config, w, &n2, row)).collect();
            for (row, input) in x.iter_mut().zip(&h) {
                let mlp = mlp(config, w, &p, input);
                for (value, a) in row.iter_mut().zip(&mlp) {
                    *value += a;
                }
            }
            if config.wavelet {
                x = wavelet(config, &x);
            }
        }
        let head = if config.tied_embeddings {
            wte
        } else {
            get("lm_head.weight")
        };
        for row in &x {
            let h = norm(config, w, final_norm, row);
            for token in 0..v {
                out.push(dot(&h, &head[token * c..(token + 1) * c]));
            }
        }
    }
    out
}

/// WaveletGPT's mixing as ALGORITHMS.md §3.2 writes it: coordinate `i < E/2` replaced by the
/// zero-padded causal mean over `k_i = min(2^level(i), L)` tokens, `level(i) = 1 + floor(i·n/E_w)`,
/// `n = log2(L)` with `L` the context.
fn wavelet(config: &GptConfig, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mixed = config.width / 2;
    let levels = (config.context as f64).log2().ceil() as usize;
    let mut out = x.to_vec();
    for i in 0..mixed {
        let k = (1usize << (1 + i * levels / mixed)).min(config.context);
        for (t, row) in out.iter_mut().enumerate() {
            let start = (t + 1).saturating_sub(k);
            row[i] = (start..=t).map(|s| x[s][i]).sum::<f64>() / k as f64;
        }
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(config: &GptConfig, w: &Weights, prefix: &str, x: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let eps = config.norm_eps as f64;
    let gain = &w[&format!("{prefix}.weight")];
    match config.norm {
        Norm::LayerNorm => {
            let bias = &w[&format!("{prefix}.bias")];
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps).sqrt();
            x.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) * rstd * gain[i] + bias[i])
                .collect()
        }
        Norm::RmsNorm => {
            let rstd = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / n + eps).sqrt();
            x.iter().enumerate().map(|(i, v)| v * rstd * gain[i]).collect()
        }
    }
}

/// `y = x·W (+ b)`: GPT-2's Conv1D stores W as (in, out), nn.Linear as (out, in).
fn linear(w: &Weights, prefix: &str, x: &[f64], input_major: bool) -> Vec<f64> {
    let weight = &w[&format!("{prefix}.weight")];
    let input = x.len();
    let output = weight.len() / input;
    let mut y: Vec<f64> = (0..output)
        .map(|o| {
            (0..input)
                .map(|i| {
                    let wi = if input_major {
                        weight[i * output + o]
                    } else {
                        weight[o * input + i]
                    };
                    x[i] * wi
                })
                .sum()
        })
        .collect();
    if let Some(bias) = w.get(&format!("{prefix}.bias")) {
        for (value, b) in y.iter_mut().zip(bias) {
            *value += b;
        }
    }
    y
}

/// Causal attention over one sequence `h` (seq, c), RoPE (rotate-half) when configured.
fn attention(config: &GptConfig, w: &Weights, prefix: &str, h: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (c, heads, kv_heads, d) = (config.width, config.heads, config.kv_heads, config.head_dim());
    let kv = kv_heads * d;
    type Rows = Vec<Vec<f64>>;
    let (q, k, v): (Rows, Rows, Rows) = if config.family == Family::Gpt2 {
        let qkv: Vec<Vec<f64>> = h
            .iter()
            .map(|row| linear(w, &format!("{prefix}.attn.c_attn"), row, true))
            .collect();
        (
            qkv.iter().map(|r| r[..c].to_vec()).collect(),
            qkv.iter().map(|r| r[c..c + kv].to_vec()).collect(),
            qkv.iter().map(|r| r[c + kv..].to_vec()).collect(),
        )
    } else {
        let project = |name: &str| -> Vec<Vec<f64>> {
            h.iter()
                .map(|row| linear(w, &format!("{prefix}.self_attn.{name}"), row, false))
                .collect()
        };
        (project("q_proj"), project("k_proj"), project("v_proj"))
    };
    let rotate = |x: &[f64], position: usize, kv_head: usize| -> Vec<f64> {
        let Positions::Rope { bases } = &config.positions else {
            return x.to_vec();
        };
        let base = if bases.len() == 1 { bases[0] } else { bases[kv_head] } as f64;
        let half = d / 2;
        let mut out = x.to_vec();
        for i in 0..half {
            let angle = position as f64 * base.powf(-2.0 * i as f64 / d as f64);
            let (sin, cos) = angle.sin_cos();
            out[i] = x[i] * cos - x[i + half] * sin;
            out[i + half] = x[i + half] * cos + x[i] * sin;
        }
        out
    };
    let seq = h.len();
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![vec![0.0; c]; seq];
    // Which keys query i sees, and LM-Infinite's distance ceiling under the Λ mask.
    let visible = |i: usize, j: usize| match config.attention {
        Attention::Causal => j <= i,
        Attention::Window { size } => j <= i && i - j < size,
        Attention::Lambda { global, window } => j <= i && (i - j < window || j < global),
    };
    let ceiling = match config.attention {
        Attention::Lambda { window, .. } => Some(window),
        _ => None,
    };
    for head in 0..heads {
        let g = head / group;
        for i in 0..seq {
            let keys: Vec<usize> = (0..=i).filter(|&j| visible(i, j)).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let (qi, kj) = (&q[i][head * d..(head + 1) * d], &k[j][g * d..(g + 1) * d]);
                    match ceiling {
                        // Beyond the ceiling: the query rotated by the ceiling, the key not at all.
                        Some(ceiling) if i - j > ceiling => scale * dot(&rotate(qi, ceiling, g), kj),
                        _ => scale * dot(&rotate(qi, i, g), &rotate(kj, j, g)),
                    }
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            for (&j, weight) in keys.iter().zip(&weights) {
                for e in 0..d {
                    out[i][head * d + e] += weight / sum * v[j][g * d + e];
                }
            }
        }
    }
    out
}

fn mlp(config: &GptConfig, w: &Weights, prefix: &str, x: &[f64]) -> Vec<f64> {
    let gpt2 = config.family == Family::Gpt2;
    let (up, gate, down) = if gpt2 {
        ("mlp.c_fc", "mlp.c_gate", "mlp.c_proj")
    } else {
        ("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")
    };
    let u = linear(w, &format!("{prefix}.{up}"), x, gpt2);
    let a: Vec<f64> = match config.activation {
        Activation::Gelu => u
            .iter()
            .map(|&v| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh()))
            .collect(),
        Activation::SwiGlu => {
            let g = linear(w, &format!("{prefix}.{gate}"), x, gpt2);
            g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect()
        }
    };
    linear(w, &format!("{prefix}.{down}"), &a, gpt2)
}
