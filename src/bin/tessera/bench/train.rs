//! One full training step of GPT-2 small (124M parameters, context 1024) on 16 x 1024 tokens:
//! forward, backward, gradient norm and AdamW, bf16 activations with f32 master weights, as
//! `tessera train` runs it. Reported as tokens/s, model TFLOP/s and MFU. Beside it, the same
//! model with every block linear 2:4 (SLoPe: the sparse tensor-core GEMMs for the forward and the
//! double-pruned input gradient, the dense weight gradient masked), with its speed-up over the
//! dense step (model FLOPs counted as dense, so that MFU compares like with like).
//!
//! The dense row also gives the step's phases, each timed on its own between events: the forward
//! (with the loss, no gradients), forward and backward, and the optimizer (zeroing the
//! gradients, their norm, AdamW), and the bias gradients' `1ᵀ·dY` GEMMs on their own (field
//! `bias_grad_us`, per output width), which the budget counts as an avoidable cost. On a Hopper GPU (sm_90a image) the dense step runs a second
//! time with the sm_90a attention kernels forced (row `... sm90 attention`, kind `train_hopper`).
//! benches/NOTES.md has the step's time budget per kernel.

use super::{Context, Result};
use serde_json::{json, Value};
use tessera::cuda::kernels::ImageKind;
use tessera::model::{GptConfig, LinearSpec, LinearVariants, Variant};
use tessera::ops::{matmul_into, with_attention_kernel, AdamWConfig, AttentionKernel, MatmulOptions};
use tessera::train::data::BatchSampler;
use tessera::train::trainer::{TrainOptions, Trainer};
use tessera::train::Corpus;
use tessera::{DType, Tensor};

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
    let phases = phase_ms(context, &config, &options, &corpus)?;
    let bias_grads = bias_grad_us(context, &config, batch * seq)?;
    let tokens = (batch * seq) as f64;
    let flops = flops_per_token(&config, seq) * tokens;
    let tflops = flops / (ms * 1e9);
    let mut rows = Vec::new();
    rows.push(json!({
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
        "forward_ms": phases.forward,
        "backward_ms": phases.forward_backward - phases.forward,
        "optimizer_ms": phases.optimizer,
        "bias_grad_us": bias_grads,
    }));
    // The sm_90a kernels serve head widths 64 and 128 (GPT-2 small's is 64; the quick preset's 32).
    let hopper = context.gpu.kernel_image().map_err(|e| e.to_string())? == ImageKind::Sm90a;
    if hopper && matches!(config.head_dim(), 64 | 128) {
        // A failure of the sm_90a kernels is reported and leaves the other rows standing.
        match with_attention_kernel(AttentionKernel::Hopper, || {
            step_ms(context, &config, &LinearVariants::dense(), &options, &corpus)
        }) {
            Ok(hopper_ms) => rows.push(hopper_row(&config, batch, seq, hopper_ms, ms)?),
            Err(error) => eprintln!("train step with the sm_90a attention kernels failed: {error}"),
        }
    }
    rows.push(slope_row(context, &config, &options, &corpus, ms)?);
    Ok(rows)
}

/// The dense step's row with the sm_90a attention kernels forced, beside the default's `ms`.
fn hopper_row(config: &GptConfig, batch: usize, seq: usize, hopper_ms: f64, ms: f64) -> Result<Value> {
    let tokens = (batch * seq) as f64;
    let flops = flops_per_token(config, seq) * tokens;
    let tflops = flops / (hopper_ms * 1e9);
    Ok(json!({
        "name": format!(
            "train step gpt2 {}M, {batch}x{seq} bf16, sm90 attention",
            config.parameter_count() / 1_000_000
        ),
        "kind": "train_hopper",
        "kernel": "sm90",
        "config": serde_json::from_str::<Value>(&config.to_json()).map_err(|e| e.to_string())?,
        "batch": batch,
        "seq": seq,
        "ms": hopper_ms,
        "tokens_per_s": tokens / (hopper_ms * 1e-3),
        "tflops": tflops,
        "mfu_pct": 100.0 * tflops / PEAK_BF16_TFLOPS,
        "flops_per_token": flops / tokens,
        "mma_sync_ms": ms,
        "speedup_vs_mma_sync": ms / hopper_ms,
    }))
}

/// The bias gradients' `1ᵀ·dY` products as the backward makes them (an m = 1 cuBLASLt GEMM over
/// the tokens, accumulated into the f32 gradient), for each block linear's output width: µs and
/// GB/s of dY read, which the time budget in benches/NOTES.md predicts at ~50% of copy.
fn bias_grad_us(context: &Context, config: &GptConfig, tokens: usize) -> Result<Value> {
    let err = |e: tessera::Error| e.to_string();
    let device = &context.device;
    let ones = Tensor::from_vec(vec![half::bf16::ONE; tokens], &[tokens, 1], device).map_err(err)?;
    let mut widths = vec![config.width, 3 * config.width, config.ffn_width];
    widths.dedup();
    let mut rows = serde_json::Map::new();
    for (i, n) in widths.into_iter().enumerate() {
        let dy = super::random_tensor(&[tokens, n], DType::BF16, 40 + i as u64, -1.0, 1.0, device)?;
        let mut grad = Tensor::zeros(&[1, n], DType::F32, device).map_err(err)?;
        let options = MatmulOptions {
            trans_a: true,
            beta: 1.0,
            ..MatmulOptions::default()
        };
        let ms = context.median_ms(|_| matmul_into(&ones, &dy, None, &mut grad, options))?;
        let gbps = (tokens * n * 2) as f64 / (ms * 1e6);
        rows.insert(n.to_string(), json!({ "us": ms * 1e3, "gbps": gbps }));
    }
    Ok(Value::Object(rows))
}

/// Median milliseconds of the dense step's phases.
struct Phases {
    /// The forward with the loss (the cross entropy without writing its gradient).
    forward: f64,
    /// The forward, the logits' gradient and the backward.
    forward_backward: f64,
    /// Zeroing the gradients, their global norm and AdamW.
    optimizer: f64,
}

/// Each phase of the dense step timed on its own, on one batch of the corpus: the model's
/// forward and backward calls and the parameters' optimizer calls, as `train_step` makes them.
fn phase_ms(context: &Context, config: &GptConfig, options: &TrainOptions, corpus: &Corpus) -> Result<Phases> {
    let err = |e: tessera::Error| e.to_string();
    let mut trainer = Trainer::new(config, options.clone(), &context.device).map_err(err)?;
    let (batch, seq) = (options.batch, options.seq);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    BatchSampler::new(options.seed)
        .next_batch(&corpus.train, batch, seq, &mut inputs, &mut targets)
        .map_err(err)?;
    let model = &mut trainer.model;
    let forward = context.median_ms(|_| model.loss(&inputs, &targets, batch, seq).map(|_| ()))?;
    let forward_backward = context.median_ms(|_| model.forward_backward_queued(&inputs, &targets, batch, seq, 1.0))?;
    let adamw = AdamWConfig {
        lr: options.lr,
        beta1: options.beta1,
        beta2: options.beta2,
        eps: 1e-8,
        weight_decay: options.weight_decay,
    };
    let mut norm = Tensor::zeros(&[1], DType::F32, &context.device).map_err(err)?;
    let params = &mut trainer.model.params;
    let optimizer = context.median_ms(|i| {
        params.zero_grads()?;
        params.grad_norm_into(&mut norm)?;
        params.adamw_step(&adamw, i as u64 + 1, 1.0)
    })?;
    Ok(Phases {
        forward,
        forward_backward,
        optimizer,
    })
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
