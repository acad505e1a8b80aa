//! Dense GEMM through cuBLASLt, default heuristic and autotuned; its first bf16 case is the GEMM
//! ceiling other families compare with.

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, MatmulOptions};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let shapes: &[(DType, usize, usize, usize)] = if context.quick {
        &[(DType::BF16, 1024, 1024, 1024)]
    } else {
        &[
            (DType::BF16, 8192, 8192, 8192),
            (DType::BF16, 4096, 4096, 4096),
            (DType::BF16, 4096, 11008, 4096),
            (DType::F16, 4096, 4096, 4096),
            (DType::F32, 4096, 4096, 4096),
        ]
    };
    let mut results = Vec::new();
    for &(dtype, m, n, k) in shapes {
        let mut result = bench_matmul(context, dtype, m, n, k)?;
        let tflops = result["tflops"].as_f64().unwrap_or(f64::NAN);
        if dtype == DType::BF16 && context.gemm_tflops.is_nan() {
            context.gemm_tflops = tflops;
        }
        result["pct_of_gemm_ceiling"] = json!(100.0 * tflops / context.gemm_tflops);
        results.push(result);
        if dtype == DType::BF16 {
            context.gpu.set_matmul_autotune(true);
            let tuned = bench_matmul(context, dtype, m, n, k);
            context.gpu.set_matmul_autotune(false);
            let mut tuned = tuned?;
            tuned["name"] = json!(format!("{} autotuned", tuned["name"].as_str().unwrap_or("matmul")));
            tuned["autotune"] = json!(true);
            let tflops = tuned["tflops"].as_f64().unwrap_or(f64::NAN);
            tuned["pct_of_gemm_ceiling"] = json!(100.0 * tflops / context.gemm_tflops);
            results.push(tuned);
        }
    }
    Ok(results)
}

fn bench_matmul(context: &Context, dtype: DType, m: usize, n: usize, k: usize) -> Result<Value> {
    let device = &context.device;
    let sets = input_sets((m * k + k * n) * dtype.size_in_bytes());
    let inputs: Vec<(Tensor, Tensor)> = (0..sets as u64)
        .map(|s| {
            Ok((
                random_tensor(&[m, k], dtype, 10 + s, -1.0, 1.0, device)?,
                random_tensor(&[k, n], dtype, 100 + s, -1.0, 1.0, device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut out = Tensor::zeros(&[m, n], dtype, device).map_err(|e| e.to_string())?;
    let ms = context.median_ms(|i| {
        let (a, b) = &inputs[i % sets];
        ops::matmul_into(a, b, None, &mut out, MatmulOptions::default())
    })?;
    Ok(json!({
        "name": format!("matmul {dtype} {m}x{n}x{k}"),
        "kind": "matmul",
        "dtype": dtype.name(),
        "m": m, "n": n, "k": k,
        "input_sets": sets,
        "ms": ms,
        "tflops": 2.0 * (m * n * k) as f64 / (ms * 1e9),
    }))
}
