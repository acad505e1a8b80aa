//! Cross-entropy fused with its gradient, in place over bf16 logits, at GPT-2 small's training
//! shape (16384 tokens x 50304), against the copy ceiling.

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, CrossEntropyOptions, CrossEntropyOutputs};
use tessera::{DType, Device, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let (rows, vocab) = if context.quick { (1024, 50304) } else { (16384, 50304) };
    let mut result = bench(context, rows, vocab)?;
    let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
    result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
    Ok(vec![result])
}

/// GB/s counts one read and one write of the logits (the least a fused loss-and-gradient can
/// move); the kernel reads them twice.
fn bench(context: &Context, rows: usize, vocab: usize) -> Result<Value> {
    let device = &context.device;
    let e = |e: tessera::Error| e.to_string();
    // One logits tensor (1.6 GB at the full shape, far past the L2 cache), rewritten in place by
    // every run: from the second run on, the kernel reads gradients, which are as good logits.
    let mut logits = random_tensor(&[rows, vocab], DType::BF16, 1100, -4.0, 4.0, device)?;
    let targets: Vec<u32> = (0..rows as u64)
        .map(|r| ((r * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    let targets = Tensor::from_vec(targets, &[rows], &Device::Cpu)
        .and_then(|t| t.to_device(device))
        .map_err(e)?;
    let mut losses = Tensor::zeros(&[rows], DType::F32, device).map_err(e)?;
    let mut mean = Tensor::zeros(&[1], DType::F32, device).map_err(e)?;
    let options = CrossEntropyOptions::default();
    let ms = context.median_ms(|_| {
        let outputs = CrossEntropyOutputs {
            losses: &mut losses,
            mean: &mut mean,
        };
        ops::cross_entropy_fused_in_place(&mut logits, &targets, &options, outputs)
    })?;
    let bytes = 2 * rows * vocab * 2;
    Ok(json!({
        "name": format!("cross_entropy fused in place bf16 {rows}x{vocab}"),
        "kind": "cross_entropy",
        "rows": rows,
        "vocab": vocab,
        "bytes": bytes,
        "ms": ms,
        "gbps": bytes as f64 / (ms * 1e6),
    }))
}
