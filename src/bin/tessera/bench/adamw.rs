//! The fused AdamW step: one big tensor, the same with bf16 gradients and a bf16 weight copy, and
//! GPT-2 small's 148 tensors in one launch.

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, AdamWConfig, AdamWTensor};
use tessera::{DType, Tensor};

/// Bytes AdamW must move per parameter with f32 gradients: param, m and v read and written, the
/// gradient read (the convention PyTorch's number is quoted in).
const ADAMW_BYTES_PER_PARAM: usize = 28;

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let big = if context.quick { 1 << 24 } else { 256 << 20 };
    let cases: Vec<(String, Vec<usize>, DType, bool)> = vec![
        (
            format!("adamw {}M params, f32 grad", big >> 20),
            vec![big],
            DType::F32,
            false,
        ),
        (
            format!("adamw {}M params, bf16 grad, bf16 copy", big >> 20),
            vec![big],
            DType::BF16,
            true,
        ),
        (
            "adamw gpt2-small (148 tensors), f32 grad".into(),
            gpt2_small_sizes(),
            DType::F32,
            false,
        ),
    ];
    let mut results = Vec::new();
    for (name, sizes, grad, copy) in cases {
        let mut result = bench_adamw(context, &name, &sizes, grad, copy)?;
        let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
        result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
        results.push(result);
    }
    Ok(results)
}

/// GPT-2 small's parameter tensors in Hugging Face order: 124M parameters in 148 tensors.
pub fn gpt2_small_sizes() -> Vec<usize> {
    let (vocab, context, width) = (50257, 1024, 768);
    let mut sizes = vec![vocab * width, context * width];
    for _ in 0..12 {
        sizes.extend([width, width, width * 3 * width, 3 * width, width * width, width]);
        sizes.extend([width, width, width * 4 * width, 4 * width, 4 * width * width, width]);
    }
    sizes.extend([width, width]);
    sizes
}

struct AdamWState {
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param_bf16: Option<Tensor>,
}

fn bench_adamw(context: &Context, name: &str, sizes: &[usize], grad: DType, copy: bool) -> Result<Value> {
    let device = &context.device;
    let mut states: Vec<AdamWState> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let seed = 1000 + 4 * i as u64;
            Ok(AdamWState {
                param: random_tensor(&[n], DType::F32, seed, -1.0, 1.0, device)?,
                grad: random_tensor(&[n], grad, seed + 1, -1e-2, 1e-2, device)?,
                exp_avg: random_tensor(&[n], DType::F32, seed + 2, -1e-3, 1e-3, device)?,
                exp_avg_sq: random_tensor(&[n], DType::F32, seed + 3, 0.0, 1e-5, device)?,
                param_bf16: if copy {
                    Some(Tensor::zeros(&[n], DType::BF16, device).map_err(|e| e.to_string())?)
                } else {
                    None
                },
            })
        })
        .collect::<Result<_>>()?;
    let config = AdamWConfig::default();
    let mut step = 0u64;
    let ms = context.median_ms(|_| {
        step += 1;
        let mut tensors: Vec<AdamWTensor> = states
            .iter_mut()
            .map(|s| AdamWTensor {
                param: &mut s.param,
                grad: &s.grad,
                exp_avg: &mut s.exp_avg,
                exp_avg_sq: &mut s.exp_avg_sq,
                param_bf16: s.param_bf16.as_mut(),
                weight_decay: true,
            })
            .collect();
        ops::adamw_step(&mut tensors, &config, step, 1.0)
    })?;
    let params: usize = sizes.iter().sum();
    let moved = params * (24 + grad.size_in_bytes() + if copy { 2 } else { 0 });
    Ok(json!({
        "name": name,
        "kind": "adamw",
        "sizes": sizes,
        "params": params,
        "tensors": sizes.len(),
        "grad_dtype": grad.name(),
        "bf16_copy": copy,
        "ms": ms,
        "gbps": (params * ADAMW_BYTES_PER_PARAM) as f64 / (ms * 1e6),
        "gbps_moved": moved as f64 / (ms * 1e6),
    }))
}
