//! One full training step of GPT-2 small (124M parameters, context 1024) on 16 x 1024 tokens:
//! forward, backward, gradient norm and AdamW, bf16 activations with f32 master weights, as
//! `tessera train` runs it. Reported as tokens/s, model TFLOP/s and MFU. Beside it, the same
//! model with every block linear 2:4 (SLoPe: the sparse tensor-core GEMMs for the forward and the
//! double-pruned input gradient, the dense weight gradient masked), with its speed-up over the
//! dense step (model FLOPs counted as dense, so that MFU compares like with like).

use super::{Context, Result};
use serde_json::{json, Value};
use tessera::model::{GptConfig, LinearSpec, LinearVariants, Variant};
use tessera::train::trainer::{TrainOptions, Trainer};
use tessera::train::Corpus;

/// Dense bf16 tensor-core peak of an H100 or H200 SXM, for MFU.
const PEAK_BF16_TFLOPS: f64 = 989.4;

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let (config, batch, seq) = if context.quick {
        (GptConfig::tiny(), 4, 128)
    } else {
        (GptConfig::gpt2_small(), 16, 1024)
    };
    let options = TrainOptions {
        batch,
        seq,
        steps: 1 << 20,
        ..TrainOptions::gpt2_small()
    };
    let corpus = Corpus::embedded().map_err(|e| e.to_string())?;
    let ms = step_ms(context, &config, &LinearVariants::dense(), &options, &corpus)?;
    let tokens = (batch * seq) as f64;
    let flops = flops_per_token(&config, seq) * tokens;
    let tflops = flops / (ms * 1e9);
    let dense = json!({
        "name": format!("train step gpt2 {}M, {batch}x{seq} bf16", config.parameter_count() / 1_000_000),
        "kind": "train",
        "config": serde_json::from_str::<Value>(&config.to_json()).map_err(|e| e.to_string())?,
        "batch": batch,
        "seq": seq,
        "ms": ms,
        "tokens_per_s": tokens / (ms * 1e-3),
        "tflops": tflops,
        "mfu_pct": 100.0 * tflops / PEAK_BF16_TFLOPS,
        "flops_per_token": flops / tokens,
    });
    let slope = slope_row(context, &config, &options, &corpus, ms)?;
    Ok(vec![dense, slope])
}

/// The median time of one training step (after two warm-up steps) of a fresh model with
/// `variants`, dropped before returning so that the next model has the memory.
fn step_ms(
    context: &Context,
    config: &GptConfig,
    variants: &LinearVariants,
    options: &TrainOptions,
    corpus: &Corpus,
) -> Result<f64> {
    let mut trainer =
        Trainer::with_variants(config, variants, options.clone(), &context.device).map_err(|e| e.to_string())?;
    // The loss is read back every step (as training does), so each timed step ends synchronised.
    let iterations = if context.quick { 3 } else { 10 };
    let settings = super::Settings { warmup: 2, iterations };
    let samples = context
        .gpu
        .time_ms(settings.warmup, settings.iterations, |_| {
            trainer.train_step(corpus).map(|_| ())
        })
        .map_err(|e| e.to_string())?;
    Ok(super::median(samples))
}

/// The 2:4 (SLoPe) model's step, every block linear pruned 2:4 at initialisation, no adapters.
fn slope_row(
    context: &Context,
    config: &GptConfig,
    options: &TrainOptions,
    corpus: &Corpus,
    dense_ms: f64,
) -> Result<Value> {
    let variants = LinearVariants::all(LinearSpec {
        variant: Variant::Nm {
            n: 2,
            m: 4,
            prune_step: 0,
        },
        lora: None,
    });
    let ms = step_ms(context, config, &variants, options, corpus)?;
    let (batch, seq) = (options.batch, options.seq);
    let tokens = (batch * seq) as f64;
    let flops = flops_per_token(config, seq) * tokens;
    let tflops = flops / (ms * 1e9);
    Ok(json!({
        "name": format!(
            "train step gpt2 {}M 2:4 (SLoPe), {batch}x{seq} bf16",
            config.parameter_count() / 1_000_000
        ),
        "kind": "train_sparse",
        "config": serde_json::from_str::<Value>(&config.to_json()).map_err(|e| e.to_string())?,
        "batch": batch,
        "seq": seq,
        "ms": ms,
        "tokens_per_s": tokens / (ms * 1e-3),
        "tflops": tflops,
        "mfu_pct": 100.0 * tflops / PEAK_BF16_TFLOPS,
        "flops_per_token": flops / tokens,
        "dense_ms": dense_ms,
        "speedup_vs_dense": dense_ms / ms,
    }))
}

/// Training FLOPs per token: 6 per parameter (forward and backward matmuls) plus attention's
/// scores and weighted sums, 12·layers·width·seq (PaLM's and llm.c's convention).
pub fn flops_per_token(config: &GptConfig, seq: usize) -> f64 {
    6.0 * config.parameter_count() as f64 + 12.0 * (config.layers * config.width * seq) as f64
}
