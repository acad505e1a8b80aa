//! GELU (tanh) and SwiGLU forward and backward, bf16, at GPT-2 small's MLP width (16384 tokens x
//! 3072) and a Llama-style SwiGLU (16384 x 2 x 2048), against the copy ceiling.

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops;
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let rows = if context.quick { 1024 } else { 16384 };
    let mut results = Vec::new();
    for (op, width) in [("gelu", 3072), ("swiglu", 2048)] {
        for backward in [false, true] {
            let mut result = bench(context, op, rows, width, backward)?;
            let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
            result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
            results.push(result);
        }
    }
    Ok(results)
}

/// GB/s counts the bytes the op must move: GELU reads x (and d_out) and writes one tensor;
/// SwiGLU reads [gate | up] (and d_out) and writes out (or both halves of d_x).
fn bench(context: &Context, op: &str, rows: usize, width: usize, backward: bool) -> Result<Value> {
    let device = &context.device;
    let in_width = if op == "swiglu" { 2 * width } else { width };
    let x_shape = [rows, in_width];
    let out_shape = [rows, width];
    let set_bytes = rows * (in_width + width) * 2;
    let sets = input_sets(set_bytes);
    let inputs: Vec<(Tensor, Tensor)> = (0..sets as u64)
        .map(|s| {
            Ok((
                random_tensor(&x_shape, DType::BF16, 700 + s, -3.0, 3.0, device)?,
                random_tensor(&out_shape, DType::BF16, 800 + s, -1.0, 1.0, device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let e = |e: tessera::Error| e.to_string();
    let mut out = Tensor::zeros(&out_shape, DType::BF16, device).map_err(e)?;
    let mut d_x = Tensor::zeros(&x_shape, DType::BF16, device).map_err(e)?;
    let ms = context.median_ms(|i| {
        let (x, d_out) = &inputs[i % sets];
        match (op, backward) {
            ("gelu", false) => ops::gelu_forward_into(x, &mut out),
            ("gelu", true) => ops::gelu_backward_into(x, d_out, &mut d_x),
            (_, false) => ops::swiglu_forward_into(x, &mut out),
            (_, true) => ops::swiglu_backward_into(x, d_out, &mut d_x),
        }
    })?;
    let bytes = 2 * if backward {
        2 * rows * in_width + rows * width
    } else {
        rows * (in_width + width)
    };
    let direction = if backward { "backward" } else { "forward" };
    Ok(json!({
        "name": format!("{op} {direction} bf16 {rows}x{in_width}"),
        "kind": "activation",
        "op": op,
        "direction": direction,
        "rows": rows,
        "width": width,
        "input_sets": sets,
        "bytes": bytes,
        "ms": ms,
        "gbps": bytes as f64 / (ms * 1e6),
    }))
}
