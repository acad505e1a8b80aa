//! Generation with the key/value cache: a prefill of 128-token prompts, then 127 decode steps,
//! for 128 greedy tokens per sequence, at batch 1 and 8, for the tiny preset (its context raised
//! to 256 so that prompt and continuation fit) and GPT-2 small, bf16, random weights. Each step
//! reads the logits back and picks the next tokens on the host, as `tessera generate` does.
//! Reported as generated tokens/s, with the prefill's and one decode step's times.
//!
//! Beside each preset's dense rows, at batch 1 and with their tokens/s over the dense model's
//! (`speedup_vs_dense`):
//! - FBI-LLM's binary model (`generate_binary`): every block linear binary and packed
//!   (`GptParams::pack_binary`, the form `tessera export --packed` writes; the embedding and head
//!   stay dense bf16); issue 9 asks >= 3.
//! - SLoPe's 2:4 model (`generate_sparse`): every block linear through the sparse GEMM, alone and
//!   with rank-8 adapters added unmerged.
//!
//! Every row records the bytes a decode step reads.

use super::{Context, Result};
use serde_json::{json, Value};
use tessera::model::params::linear_summary;
use tessera::model::{DecodeMode, Gpt, GptConfig, GptParams, KvCache, LinearSpec, LinearVariants, LoraSpec, Variant};

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
        // The dense batch-1 tokens/s, eager and with the graph: each form's row is compared with
        // the dense row of the same decode mode.
        let mut dense_tokens_per_s = [None, None];
        for batch in [1, 8] {
            for graph in [false, true] {
                let row = case(context, &model, preset, batch, Form::Dense, graph)?;
                if batch == 1 {
                    dense_tokens_per_s[graph as usize] = row["tokens_per_s"].as_f64();
                }
                rows.push(row);
            }
        }
        drop(model);
        let binary = LinearVariants::all(LinearSpec {
            variant: Variant::Binary,
            lora: None,
        });
        let mut params =
            GptParams::init_with_variants(&config, &binary, &context.device, 1).map_err(|e| e.to_string())?;
        params.pack_binary().map_err(|e| e.to_string())?;
        let model = Gpt::new(params, 1, 1).map_err(|e| e.to_string())?;
        for graph in [false, true] {
            rows.push(beside_dense(
                case(context, &model, preset, 1, Form::BinaryPacked, graph)?,
                dense_tokens_per_s[graph as usize],
            ));
        }
        drop(model);
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
            let params =
                GptParams::init_with_variants(&config, &variants, &context.device, 1).map_err(|e| e.to_string())?;
            let model = Gpt::new(params, 1, 1).map_err(|e| e.to_string())?;
            for graph in [false, true] {
                let mut row = beside_dense(
                    case(context, &model, preset, 1, Form::Sparse24(rank), graph)?,
                    dense_tokens_per_s[graph as usize],
                );
                row["adapter_rank"] = rank.map_or(Value::Null, Value::from);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The model a generation row runs.
#[derive(Clone, Copy)]
enum Form {
    Dense,
    BinaryPacked,
    /// 2:4 block linears, with adapters of this rank when given.
    Sparse24(Option<usize>),
}

/// `row` with its tokens/s over the dense model's at the same batch.
fn beside_dense(mut row: Value, dense_tokens_per_s: Option<f64>) -> Value {
    if let (Some(dense), Some(here)) = (dense_tokens_per_s, row["tokens_per_s"].as_f64()) {
        row["speedup_vs_dense"] = json!(here / dense);
    }
    row
}

/// Bytes one decode step reads: the block linears as inference holds them (bf16, or packed
/// bits with f32 α, β and bias), the bf16 head, and the mean key/value cache of the run.
fn bytes_per_token(model: &Gpt) -> Result<f64> {
    let params = &model.params;
    let config = &params.config;
    let linears: usize = linear_summary(config, &params.variants)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|l| l.inference_bytes)
        .sum();
    let head = 2 * config.vocab * config.width;
    let mean_keys = (PROMPT + NEW_TOKENS / 2) as f64;
    let cache = mean_keys * (config.layers * 2 * config.kv_heads * config.head_dim() * 2) as f64;
    Ok((linears + head) as f64 + cache)
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

/// One generation case; with `graph`, the decode steps replay a CUDA graph of the step.
fn case(context: &Context, model: &Gpt, preset: &str, batch: usize, form: Form, graph: bool) -> Result<Value> {
    let config = &model.params.config;
    let vocab = config.vocab as u64;
    let prompts: Vec<u32> = (0..batch * PROMPT)
        .map(|i| (tessera::train::data::splitmix64(i as u64) % vocab) as u32)
        .collect();
    let mut cache: KvCache = model.kv_cache(batch).map_err(|e| e.to_string())?;
    if graph {
        cache.set_decode_mode(DecodeMode::Graph).map_err(|e| e.to_string())?;
    }
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
    let (form, kind) = match form {
        Form::Dense => ("bf16".to_string(), "generate"),
        Form::BinaryPacked => ("binary packed".to_string(), "generate_binary"),
        Form::Sparse24(None) => ("2:4 bf16".to_string(), "generate_sparse"),
        Form::Sparse24(Some(rank)) => (format!("2:4 bf16 + rank-{rank} adapters"), "generate_sparse"),
    };
    Ok(json!({
        "name": format!(
            "generate {preset} batch {batch}, {PROMPT}+{NEW_TOKENS} {form}{}",
            if graph { ", graph" } else { "" }
        ),
        "kind": kind,
        "preset": preset,
        "config": serde_json::from_str::<Value>(&config.to_json()).map_err(|e| e.to_string())?,
        "batch": batch,
        "graph": graph,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "ms": total,
        "prefill_ms": prefill,
        "decode_step_ms": (total - prefill) / (NEW_TOKENS - 1) as f64,
        "tokens_per_s": tokens / (total * 1e-3),
        "bytes_per_token": bytes_per_token(model)?,
        "tflops": flops / (total * 1e9),
    }))
}
