//! Text generation: the model's next-token distribution, sampled with temperature, top-k and
//! top-p, one token at a time over a window of at most the model's context.
//!
//! While the text fits the context, the prompt runs once and each new token runs alone against a
//! key/value cache ([`Gpt::prefill`], [`Gpt::decode`]); beyond it the window slides, which moves
//! every position, so each further token reruns the forward over the last `context` tokens.

use super::gpt::Gpt;
use super::kv_cache::DecodeMode;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::train::data::splitmix64;

const OP: &str = "generate";

/// How the next token is drawn from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits; 0 takes the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: Option<f32>,
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                OP,
                "temperature",
                "a finite number >= 0",
                self.temperature,
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid(OP, "top_k", "at least 1", 0));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(OP, "top_p", "a probability in (0, 1]", p));
            }
        }
        Ok(())
    }
}

/// `count` tokens continuing `prompt`, drawn with `sampling`; the same seed gives the same text.
/// Uses the key/value cache while the text fits the model's context.
pub fn generate(model: &mut Gpt, prompt: &[u32], count: usize, sampling: &Sampling, seed: u64) -> Result<Vec<u32>> {
    generate_with(model, prompt, count, sampling, seed, true)
}

/// [`generate`], with the cache or (`cached` false) rerunning the forward over the whole window
/// for every token: the reference the cached path must reproduce.
pub fn generate_with(
    model: &mut Gpt,
    prompt: &[u32],
    count: usize,
    sampling: &Sampling,
    seed: u64,
    cached: bool,
) -> Result<Vec<u32>> {
    generate_decoding(
        model,
        prompt,
        count,
        sampling,
        seed,
        cached.then_some(DecodeMode::Eager),
    )
}

/// [`generate`] with the cache's decode steps run in `mode` (see [`DecodeMode`]; `Graph` replays
/// one CUDA graph per token), or (`None`) without the cache.
pub fn generate_decoding(
    model: &mut Gpt,
    prompt: &[u32],
    count: usize,
    sampling: &Sampling,
    seed: u64,
    mode: Option<DecodeMode>,
) -> Result<Vec<u32>> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::invalid(OP, "prompt", "at least one token", "none"));
    }
    let (context, vocab) = (model.params.config.context, model.params.config.vocab);
    let mut cache = match mode {
        Some(mode) if count > 0 && prompt.len() <= context => {
            let mut cache = model.kv_cache(1)?;
            cache.set_decode_mode(mode)?;
            Some(cache)
        }
        _ => None,
    };
    let mut tokens = prompt.to_vec();
    for step in 0..count {
        let last = match cache.as_mut() {
            Some(cache) if tokens.len() <= context => {
                let logits = if cache.is_empty() {
                    model.prefill(cache, &tokens)?
                } else {
                    model.decode(cache, &tokens[tokens.len() - 1..])?
                };
                last_row(logits, vocab)?
            }
            _ => {
                let window = &tokens[tokens.len().saturating_sub(context)..];
                let logits = model.logits(window, 1, window.len())?;
                last_row(logits, vocab)?
            }
        };
        let draw = (splitmix64(seed ^ splitmix64(step as u64)) >> 11) as f64 / (1u64 << 53) as f64;
        tokens.push(sample(&last, sampling, draw) as u32);
    }
    Ok(tokens.split_off(prompt.len()))
}

/// The last row of (rows, vocab) logits, in f32 on the host.
fn last_row(logits: &crate::tensor::Tensor, vocab: usize) -> Result<Vec<f32>> {
    let rows = logits.numel() / vocab;
    let all: Vec<f32> = match logits.dtype() {
        DType::F32 => logits.to_vec::<f32>()?,
        DType::BF16 => logits.to_vec::<half::bf16>()?.iter().map(|v| v.to_f32()).collect(),
        DType::F16 => logits.to_vec::<half::f16>()?.iter().map(|v| v.to_f32()).collect(),
        other => return Err(Error::invalid(OP, "logits", "a float dtype", other)),
    };
    Ok(all[(rows - 1) * vocab..].to_vec())
}

/// The token index drawn from `logits` with `draw` uniform in [0, 1).
pub fn sample(logits: &[f32], sampling: &Sampling, draw: f64) -> usize {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |best, (i, &v)| if v > best.1 { (i, v) } else { best },
            )
            .0
    };
    if sampling.temperature == 0.0 {
        return argmax();
    }
    // Candidates by decreasing logit (ties by index), cut by top-k, then by top-p.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(sampling.top_k.unwrap_or(order.len()).max(1));
    let top = logits[order[0]] as f64;
    let mut weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / sampling.temperature as f64).exp())
        .collect();
    if let Some(p) = sampling.top_p {
        let total: f64 = weights.iter().sum();
        let mut mass = 0.0;
        let keep = weights
            .iter()
            .position(|w| {
                mass += w / total;
                mass >= p as f64
            })
            .map_or(weights.len(), |i| i + 1);
        weights.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = weights.iter().sum();
    let mut target = draw * total;
    for (&index, &weight) in order.iter().zip(&weights) {
        if target < weight {
            return index;
        }
        target -= weight;
    }
    order[order.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_temperature_top_k_and_top_p() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        assert_eq!(sample(&logits, &Sampling::greedy(), 0.9), 1);
        let top2 = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
        };
        // Only tokens 1 and 2 can come out, in proportion e^3 : e^2.
        let p1 = 1.0 / (1.0 + (-1.0f64).exp());
        assert_eq!(sample(&logits, &top2, p1 - 1e-9), 1);
        assert_eq!(sample(&logits, &top2, p1 + 1e-9), 2);
        assert_eq!(sample(&logits, &top2, 0.999_999), 2);
        // top-p 0.5: token 1 alone already holds more than half the mass.
        let nucleus = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
        };
        assert!((0..100).all(|i| sample(&logits, &nucleus, i as f64 / 100.0) == 1));
        // A high temperature reaches every token.
        let hot = Sampling {
            temperature: 100.0,
            top_k: None,
            top_p: None,
        };
        let mut seen = [false; 4];
        for i in 0..100 {
            seen[sample(&logits, &hot, i as f64 / 100.0)] = true;
        }
        assert_eq!(seen, [true; 4]);
        assert!(Sampling { top_k: Some(0), ..top2 }.validate().is_err());
        assert!(Sampling {
            top_p: Some(1.5),
            ..top2
        }
        .validate()
        .is_err());
        assert!(Sampling {
            temperature: -1.0,
            ..top2
        }
        .validate()
        .is_err());
    }
}
