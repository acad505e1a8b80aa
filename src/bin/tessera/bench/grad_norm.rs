//! Global gradient norm with clipping over GPT-2 small's 148 f32 gradient tensors (124M
//! parameters), against the copy ceiling.

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops;
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let sizes = if context.quick {
        vec![1 << 20; 8]
    } else {
        super::adamw::gpt2_small_sizes()
    };
    let mut results = Vec::new();
    for clip in [false, true] {
        let mut result = bench(context, &sizes, clip)?;
        let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
        result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
        results.push(result);
    }
    Ok(results)
}

/// GB/s counts one read of every gradient (the norm); clipping that scales adds a read and a
/// write, so its max_norm is set below the norm.
fn bench(context: &Context, sizes: &[usize], clip: bool) -> Result<Value> {
    let device = &context.device;
    let e = |e: tessera::Error| e.to_string();
    let mut grads: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| random_tensor(&[n], DType::F32, 1300 + i as u64, -1e-3, 1e-3, device))
        .collect::<Result<_>>()?;
    let mut norm = Tensor::zeros(&[1], DType::F32, device).map_err(e)?;
    // Each clip scales by about 0.999: the gradients stay of one size over all runs.
    let params: usize = sizes.iter().sum();
    let max_norm = 0.999 * 1e-3 * (params as f32 / 3.0).sqrt();
    let ms = context.median_ms(|_| {
        if clip {
            let mut refs: Vec<&mut Tensor> = grads.iter_mut().collect();
            ops::clip_grad_norm(&mut refs, max_norm, &mut norm)
        } else {
            let refs: Vec<&Tensor> = grads.iter().collect();
            ops::grad_norm_into(&refs, &mut norm)
        }
    })?;
    let bytes = params * 4 * if clip { 3 } else { 1 };
    Ok(json!({
        "name": format!("{} gpt2-small grads ({} tensors), f32", if clip { "clip_grad_norm" } else { "grad_norm" }, sizes.len()),
        "kind": "grad_norm",
        "clip": clip,
        "max_norm": max_norm,
        "sizes": sizes,
        "params": params,
        "bytes": bytes,
        "ms": ms,
        "gbps": bytes as f64 / (ms * 1e6),
    }))
}
