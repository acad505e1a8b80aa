//! attention_decode: one decode step's attention against a GPT-2-small-shaped cache (12 query
//! heads of 64 per sequence, causal), batch 1 and 8, 128 and 1024 keys, against the copy ceiling:
//! the step reads every visible key and value once.

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, AttentionMask, AttentionOptions};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let device = context.device.clone();
    let (heads, d) = (12, 64);
    let cases: &[(usize, usize)] = if context.quick {
        &[(1, 128)]
    } else {
        &[(1, 128), (1, 1024), (8, 128), (8, 1024)]
    };
    let mut rows = Vec::new();
    for &(batch, keys) in cases {
        let width = batch * heads * d;
        let q = random_tensor(&[batch * heads, d], DType::BF16, 910, -1.0, 1.0, &device)?;
        let k = random_tensor(&[keys, width], DType::BF16, 911, -1.0, 1.0, &device)?;
        let v = random_tensor(&[keys, width], DType::BF16, 912, -1.0, 1.0, &device)?;
        let position = Tensor::from_vec(vec![(keys - 1) as u32], &[1], &device).map_err(|e| e.to_string())?;
        let mut out = Tensor::zeros(&[batch * heads, d], DType::BF16, &device).map_err(|e| e.to_string())?;
        let options = AttentionOptions {
            mask: AttentionMask::Causal,
            ..AttentionOptions::default()
        };
        let ms = context.median_ms(|_| ops::attention_decode_into(&q, &k, &v, &position, &options, &mut out))?;
        let bytes = 2 * keys * width * 2;
        let gbps = bytes as f64 / (ms * 1e6);
        rows.push(json!({
            "name": format!("attention_decode batch {batch}, {heads} heads of {d}, {keys} keys, causal bf16"),
            "kind": "attention_decode",
            "batch": batch,
            "heads": heads,
            "head_dim": d,
            "keys": keys,
            "ms": ms,
            "gbps": gbps,
            "pct_of_copy": context.pct_of_copy(gbps),
        }));
    }
    Ok(rows)
}
