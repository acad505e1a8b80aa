//! Sampling a token per row (temperature 0.8, top-k 50, top-p 0.9) from bf16 logits over GPT-2's
//! vocabulary, for a decoding batch of 16 rows: a latency number (ms per call).

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, SamplingOptions};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let mut results = Vec::new();
    for (rows, greedy) in [(16, false), (16, true)] {
        results.push(bench(context, rows, 50304, greedy)?);
    }
    Ok(results)
}

fn bench(context: &Context, rows: usize, vocab: usize, greedy: bool) -> Result<Value> {
    let device = &context.device;
    let e = |e: tessera::Error| e.to_string();
    let logits = random_tensor(&[rows, vocab], DType::BF16, 1400, -8.0, 8.0, device)?;
    let mut out = Tensor::zeros(&[rows], DType::U32, device).map_err(e)?;
    let base = if greedy {
        SamplingOptions::greedy()
    } else {
        SamplingOptions {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9,
            seed: 7,
            offset: 0,
        }
    };
    let ms = context.median_ms(|i| {
        let options = SamplingOptions {
            offset: i as u64,
            ..base
        };
        ops::sample_into(&logits, &options, &mut out)
    })?;
    let bytes = rows * vocab * 2;
    Ok(json!({
        "name": format!("sample {} bf16 {rows}x{vocab}", if greedy { "greedy" } else { "t0.8 k50 p0.9" }),
        "kind": "sampling",
        "rows": rows,
        "vocab": vocab,
        "greedy": greedy,
        "temperature": base.temperature,
        "top_k": base.top_k,
        "top_p": base.top_p,
        "ms": ms,
        "gbps": bytes as f64 / (ms * 1e6),
    }))
}
