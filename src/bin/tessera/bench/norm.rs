//! LayerNorm (with the fused residual add, GPT-2's shape: 16384 tokens x 768) and RMSNorm (16384 x
//! 4096), forward and backward, bf16, against the copy ceiling.

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, NormConfig, NormGrads, NormKind, NormParams, NormStats};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let rows = if context.quick { 1024 } else { 16384 };
    let mut results = Vec::new();
    for (kind, width, residual) in [(NormKind::LayerNorm, 768, true), (NormKind::RmsNorm, 4096, false)] {
        for backward in [false, true] {
            let mut result = bench(context, kind, rows, width, residual, backward)?;
            let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
            result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
            results.push(result);
        }
    }
    Ok(results)
}

/// GB/s counts the activation bytes that must move: forward reads x (and the residual) and
/// writes y (and the sum); backward reads d_out and the input and writes d_input.
fn bench(
    context: &Context,
    kind: NormKind,
    rows: usize,
    width: usize,
    residual: bool,
    backward: bool,
) -> Result<Value> {
    let device = &context.device;
    let e = |e: tessera::Error| e.to_string();
    let shape = [rows, width];
    let tensor_bytes = rows * width * 2;
    let sets = input_sets(3 * tensor_bytes);
    let inputs: Vec<(Tensor, Tensor, Tensor)> = (0..sets as u64)
        .map(|s| {
            Ok((
                random_tensor(&shape, DType::BF16, 900 + s, -2.0, 2.0, device)?,
                random_tensor(&shape, DType::BF16, 950 + s, -2.0, 2.0, device)?,
                random_tensor(&shape, DType::BF16, 980 + s, -1.0, 1.0, device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let weight = random_tensor(&[width], DType::BF16, 990, 0.5, 1.5, device)?;
    let bias = random_tensor(&[width], DType::BF16, 991, -0.5, 0.5, device)?;
    let layer = kind == NormKind::LayerNorm;
    let params = NormParams {
        weight: &weight,
        bias: layer.then_some(&bias),
    };
    let config = NormConfig { kind, eps: 1e-5 };
    let mut out = Tensor::zeros(&shape, DType::BF16, device).map_err(e)?;
    let mut sum = Tensor::zeros(&shape, DType::BF16, device).map_err(e)?;
    let mut stats = NormStats::new(rows, device).map_err(e)?;
    let mut d_input = Tensor::zeros(&shape, DType::BF16, device).map_err(e)?;
    let mut d_weight = Tensor::zeros(&[width], DType::F32, device).map_err(e)?;
    let mut d_bias = Tensor::zeros(&[width], DType::F32, device).map_err(e)?;
    ops::norm_forward_into(&config, &inputs[0].0, None, params, &mut out, &mut stats).map_err(e)?;
    let ms = context.median_ms(|i| {
        let (x, r, d_out) = &inputs[i % sets];
        if backward {
            let grads = NormGrads {
                d_input: &mut d_input,
                d_weight: &mut d_weight,
                d_bias: layer.then_some(&mut d_bias),
                accumulate: false,
            };
            ops::norm_backward_into(&config, d_out, None, x, params, &stats, grads)
        } else if residual {
            ops::norm_forward_into(&config, x, Some((r, &mut sum)), params, &mut out, &mut stats)
        } else {
            ops::norm_forward_into(&config, x, None, params, &mut out, &mut stats)
        }
    })?;
    let tensors = match (backward, residual) {
        (true, _) => 3,
        (false, true) => 4,
        (false, false) => 2,
    };
    let bytes = tensors * tensor_bytes;
    let name = if layer { "layer_norm" } else { "rms_norm" };
    let direction = if backward { "backward" } else { "forward" };
    Ok(json!({
        "name": format!("{name}{} {direction} bf16 {rows}x{width}", if residual && !backward { "+residual" } else { "" }),
        "kind": "norm",
        "norm": name,
        "direction": direction,
        "residual": residual,
        "rows": rows,
        "width": width,
        "input_sets": sets,
        "bytes": bytes,
        "ms": ms,
        "gbps": bytes as f64 / (ms * 1e6),
    }))
}
