//! Generation with the key/value cache: a prefill of 128-token prompts, then 127 decode steps,
//! for 128 greedy tokens per sequence, at batch 1 and 8, for the tiny preset (its context raised
//! to 256 so that prompt and continuation fit) and GPT-2 small, bf16, random weights. Each step
//! reads the logits back and picks the next tokens on the host, as `tessera generate` does.
//! Reported as generated tokens/s, with the prefill's and one decode step's times. Beside each
//! preset's dense rows, its 2:4 model (SLoPe: every block linear through the sparse GEMM) at
//! batch 1, alone and with rank-8 adapters added unmerged, with the speed-up over the dense
//! model at batch 1.

use super::{Context, Result};
use serde_json::{json, Value};
use tessera::model::{Gpt, GptConfig, GptParams, KvCache, LinearSpec, LinearVariants, LoraSpec, Variant};
use tessera::Tensor;

const PROMPT: usize = 128;
const NEW_TOKENS: usize = 128;

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let tiny = GptConfig {
        context: 256,
        ..GptConfig::tiny()
    };
    let presets = if context.quick {
        vec![("tiny", tiny)]
    } else {
        vec![("tiny", tiny), ("gpt2-small", GptConfig::gpt2_small())]
    };
    let mut rows = Vec::new();
    for (preset, config) in presets {
        let params = GptParams::init(&config, &context.device, 1).map_err(|e| e.to_string())?;
        let model = Gpt::new(params, 1, 1).map_err(|e| e.to_string())?;
        for batch in [1, 8] {
            rows.push(case(context, &model, preset, batch)?);
        }
        drop(model);
        let dense_ms = rows[rows.len() - 2]["ms"].as_f64().unwrap_or(f64::NAN);
        rows.extend(slope_rows(context, preset, &config, dense_ms)?);
    }
    Ok(rows)
}

/// The 2:4 model of `config` at batch 1, without and with rank-8 adapters (on, as initialised:
/// their products run whatever B holds), beside the dense model's `dense_ms`.
fn slope_rows(context: &Context, preset: &str, config: &GptConfig, dense_ms: f64) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for rank in [None, Some(8)] {
        let variants = LinearVariants::all(LinearSpec {
            variant: Variant::Nm {
                n: 2,
                m: 4,
                prune_step: 0,
            },
            lora: rank.map(|rank| LoraSpec {
                rank,
                alpha: 2.0 * rank as f32,
                frozen_base: false,
            }),
        });
        let params = GptParams::init_with_variants(config, &variants, &context.device, 1).map_err(|e| e.to_string())?;
        let model = Gpt::new(params, 1, 1).map_err(|e| e.to_string())?;
        let label = match rank {
            None => format!("{preset} 2:4"),
            Some(rank) => format!("{preset} 2:4 + rank-{rank} adapters"),
        };
        let mut row = case(context, &model, &label, 1)?;
        row["preset"] = Value::from(preset);
        row["variant"] = Value::from("nm 2:4");
        row["adapter_rank"] = rank.map_or(Value::Null, Value::from);
        row["dense_ms"] = Value::from(dense_ms);
        row["speedup_vs_dense"] = Value::from(dense_ms / row["ms"].as_f64().unwrap_or(f64::NAN));
        rows.push(row);
    }
    Ok(rows)
}

/// The greedy next token of each row of (batch, vocab) logits.
fn argmax(logits: &Tensor) -> tessera::Result<Vec<u32>> {
    let vocab = logits.shape()[1];
    let values: Vec<f32> = logits.to_vec::<half::bf16>()?.iter().map(|v| v.to_f32()).collect();
    Ok(values
        .chunks(vocab)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                )
                .0 as u32
        })
        .collect())
}

fn case(context: &Context, model: &Gpt, preset: &str, batch: usize) -> Result<Value> {
    let config = &model.params.config;
    let vocab = config.vocab as u64;
    let prompts: Vec<u32> = (0..batch * PROMPT)
        .map(|i| (tessera::train::data::splitmix64(i as u64) % vocab) as u32)
        .collect();
    let mut cache: KvCache = model.kv_cache(batch).map_err(|e| e.to_string())?;
    let iterations = if context.quick { 2 } else { 5 };
    let prefill = super::median(
        context
            .gpu
            .time_ms(1, iterations, |_| {
                model.prefill(&mut cache, &prompts).and_then(argmax).map(|_| ())
            })
            .map_err(|e| e.to_string())?,
    );
    let total = super::median(
        context
            .gpu
            .time_ms(1, iterations, |_| {
                let mut next = argmax(model.prefill(&mut cache, &prompts)?)?;
                for _ in 1..NEW_TOKENS {
                    next = argmax(model.decode(&mut cache, &next)?)?;
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?,
    );
    let tokens = (batch * NEW_TOKENS) as f64;
    // Forward FLOPs per generated token: 2 per parameter and the attention over the keys so far.
    let mean_keys = (PROMPT + NEW_TOKENS / 2) as f64;
    let flops =
        tokens * (2.0 * config.parameter_count() as f64 + 4.0 * (config.layers * config.width) as f64 * mean_keys);
    Ok(json!({
        "name": format!("generate {preset} batch {batch}, {PROMPT}+{NEW_TOKENS} bf16"),
        "kind": "generate",
        "preset": preset,
        "config": serde_json::from_str::<Value>(&config.to_json()).map_err(|e| e.to_string())?,
        "batch": batch,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "ms": total,
        "prefill_ms": prefill,
        "decode_step_ms": (total - prefill) / (NEW_TOKENS - 1) as f64,
        "tokens_per_s": tokens / (total * 1e-3),
        "tflops": flops / (total * 1e9),
    }))
}
