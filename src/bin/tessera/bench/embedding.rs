//! Token + position embedding forward and backward, bf16 tables and activations, f32 table
//! gradients, GPT-2 small's shapes (16384 tokens, vocab 50304, width 768), against the copy
//! ceiling.

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, EmbeddingGradPlan};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let (batch, seq) = if context.quick { (1, 1024) } else { (16, 1024) };
    let mut results = Vec::new();
    for backward in [false, true] {
        let mut result = bench(context, batch, seq, 50304, 768, backward)?;
        let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
        result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
        results.push(result);
    }
    Ok(results)
}

/// Tokens drawn from a Zipf-like law (a few very frequent ones, as in text), the same on both
/// sides.
pub fn tokens(count: usize, vocab: usize) -> Vec<u32> {
    (0..count as u64)
        .map(|i| {
            let h = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
            ((vocab as f64).powf(h) as usize - 1).min(vocab - 1) as u32
        })
        .collect()
}

/// GB/s: forward reads a token row and a position row and writes an output row per token;
/// backward reads d_out once, writes the zeroed f32 token-table gradient (vocab x width) and the
/// position gradient.
fn bench(context: &Context, batch: usize, seq: usize, vocab: usize, width: usize, backward: bool) -> Result<Value> {
    let device = &context.device;
    let e = |e: tessera::Error| e.to_string();
    let count = batch * seq;
    let host_tokens = tokens(count, vocab);
    let token_tensor = Tensor::from_slice(&host_tokens, &[batch, seq], device).map_err(e)?;
    let wte = random_tensor(&[vocab, width], DType::BF16, 1200, -0.1, 0.1, device)?;
    let wpe = random_tensor(&[1024, width], DType::BF16, 1201, -0.1, 0.1, device)?;
    let d_out = random_tensor(&[batch, seq, width], DType::BF16, 1202, -1.0, 1.0, device)?;
    let mut out = Tensor::zeros(&[batch, seq, width], DType::BF16, device).map_err(e)?;
    let mut d_wte = Tensor::zeros(&[vocab, width], DType::F32, device).map_err(e)?;
    let mut d_wpe = Tensor::zeros(&[1024, width], DType::F32, device).map_err(e)?;
    let plan = EmbeddingGradPlan::new(&host_tokens, batch, seq, vocab, device).map_err(e)?;
    let ms = context.median_ms(|_| {
        if backward {
            ops::embedding_backward_into(&d_out, &plan, &mut d_wte, Some(&mut d_wpe), false)
        } else {
            ops::embedding_forward_into(&token_tensor, &wte, Some(&wpe), &mut out)
        }
    })?;
    let bytes = if backward {
        count * width * 2 + vocab * width * 4 + seq * width * 4
    } else {
        3 * count * width * 2
    };
    let direction = if backward { "backward" } else { "forward" };
    Ok(json!({
        "name": format!("embedding {direction} bf16 {count}x{width}, vocab {vocab}"),
        "kind": "embedding",
        "direction": direction,
        "batch": batch,
        "seq": seq,
        "vocab": vocab,
        "width": width,
        "distinct_tokens": plan.distinct_tokens(),
        "bytes": bytes,
        "ms": ms,
        "gbps": bytes as f64 / (ms * 1e6),
    }))
}
