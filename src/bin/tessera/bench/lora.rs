//! Fused LoRA forward, bf16, d = 4096: the base GEMM alone and the base plus adapter, for ranks 8,
//! 16 and 64 and 1, 16 and 4096 tokens (the adapter's cost as a percentage of the base), and 64
//! tokens with 64 distinct adapters against 64 tokens with one. The same ranks and token counts
//! over a 2:4 sparse base (SLoPe's sparse + low-rank): the adapter's cost against the sparse GEMM
//! alone and against the dense base GEMM.

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, LoraAdapters, LoraBase, LoraRouting, MatmulOptions, NmPattern, Sparse24};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let d = if context.quick { 1024 } else { 4096 };
    let tokens: &[usize] = if context.quick { &[1, 64] } else { &[1, 16, 4096] };
    let ranks: &[usize] = if context.quick { &[16] } else { &[8, 16, 64] };
    // The weights rotate so that no timed run finds the base weight in L2.
    let sets = input_sets(d * d * 2);
    let weights: Vec<Tensor> = (0..sets as u64)
        .map(|s| random_tensor(&[d, d], DType::BF16, 900 + s, -0.02, 0.02, &context.device))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for &m in tokens {
        for &rank in ranks {
            results.push(bench_lora(context, &weights, m, rank, 1)?);
        }
    }
    // One adapter through the kernels instead of cuBLASLt, to place the threshold between them.
    let large = *tokens.last().unwrap_or(&1);
    ops::lora::set_blas_rows(usize::MAX);
    let kernels = [64, large].map(|m| bench_lora(context, &weights, m, 16, 1));
    ops::lora::set_blas_rows(ops::lora::DEFAULT_BLAS_ROWS);
    for result in kernels {
        let mut result = result?;
        result["name"] = json!(format!("{} (kernels)", result["name"].as_str().unwrap_or("lora")));
        result["path"] = json!("kernels");
        results.push(result);
    }
    let serving = if context.quick { 16 } else { 64 };
    results.push(bench_lora(context, &weights, serving, 16, 1)?);
    let mut many = bench_lora(context, &weights, serving, 16, serving)?;
    let single_ms = results.last().and_then(|r| r["ms"].as_f64()).unwrap_or(f64::NAN);
    many["vs_one_adapter"] = json!(many["ms"].as_f64().unwrap_or(f64::NAN) / single_ms);
    results.push(many);
    let sparse: Vec<Sparse24> = weights
        .iter()
        .map(|w| ops::sparse24_prune_compress(w, NmPattern::TWO_FOUR))
        .collect::<tessera::Result<_>>()
        .map_err(|e| e.to_string())?;
    for &m in tokens {
        for &rank in ranks {
            results.push(bench_sparse(context, &weights, &sparse, m, rank)?);
        }
    }
    Ok(results)
}

/// Per input set: x (m, d) and `adapters` adapters of rank `rank`, scale 2/r.
fn inputs(
    context: &Context,
    d: usize,
    sets: usize,
    m: usize,
    rank: usize,
    adapters: usize,
) -> Result<Vec<(Tensor, LoraAdapters)>> {
    let device = &context.device;
    (0..sets as u64)
        .map(|s| {
            let x = random_tensor(&[m, d], DType::BF16, 1000 + s, -1.0, 1.0, device)?;
            let a = random_tensor(&[adapters, rank, d], DType::BF16, 2000 + s, -0.02, 0.02, device)?;
            let b = random_tensor(&[adapters, d, rank], DType::BF16, 3000 + s, -0.02, 0.02, device)?;
            let set = LoraAdapters::new(a, b, &vec![rank; adapters], &vec![2.0 / rank as f32; adapters])
                .map_err(|e| e.to_string())?;
            Ok((x, set))
        })
        .collect()
}

/// One adapter of rank `rank` over the 2:4 sparse base `sparse` (the pruned `weights`): the fused
/// forward against the sparse GEMM alone and against the dense GEMM on the unpruned weights.
fn bench_sparse(context: &Context, weights: &[Tensor], sparse: &[Sparse24], m: usize, rank: usize) -> Result<Value> {
    let device = &context.device;
    let d = weights[0].shape()[0];
    let sets = weights.len();
    let inputs = inputs(context, d, sets, m, rank, 1)?;
    let routing = LoraRouting::single(m, 0, device).map_err(|e| e.to_string())?;
    let mut out = Tensor::zeros(&[m, d], DType::BF16, device).map_err(|e| e.to_string())?;
    let dense_ms = context.median_ms(|i| {
        ops::matmul_into(
            &inputs[i % sets].0,
            &weights[i % sets],
            None,
            &mut out,
            MatmulOptions::linear(),
        )
    })?;
    let base_ms = context
        .median_ms(|i| ops::sparse_linear_forward_into(&inputs[i % sets].0, &sparse[i % sets], None, &mut out))?;
    let ms = context.median_ms(|i| {
        let (x, adapters) = &inputs[i % sets];
        ops::lora_forward_into(
            x,
            LoraBase::Sparse24(&sparse[i % sets], None),
            None,
            adapters,
            &routing,
            &mut out,
        )
    })?;
    let overhead = 100.0 * (ms / base_ms - 1.0);
    let vs_dense = 100.0 * (ms / dense_ms - 1.0);
    eprintln!(
        "lora sparse base m={m} r={rank}: sparse {base_ms:.4} ms, dense {dense_ms:.4} ms, fused {ms:.4} ms, \
         +{overhead:.1}% over sparse, {vs_dense:+.1}% vs dense"
    );
    Ok(json!({
        "name": format!("lora fwd bf16 2:4 sparse base m={m} d={d} r={rank}"),
        "kind": "lora_sparse",
        "dtype": "bf16",
        "m": m, "d": d, "rank": rank, "adapters": 1,
        "scale": 2.0 / rank as f64,
        "input_sets": sets,
        "ms": ms,
        "base_ms": base_ms,
        "dense_base_ms": dense_ms,
        "overhead_pct": overhead,
        "vs_dense_base_pct": vs_dense,
        "tflops": 2.0 * (m * d * d) as f64 / (ms * 1e9),
    }))
}

/// `adapters` adapters of rank `rank` (row i uses adapter i mod adapters), scale 2/r.
fn bench_lora(context: &Context, weights: &[Tensor], m: usize, rank: usize, adapters: usize) -> Result<Value> {
    let device = &context.device;
    let d = weights[0].shape()[0];
    let sets = weights.len();
    let err = |e: tessera::Error| e.to_string();
    let inputs = inputs(context, d, sets, m, rank, adapters)?;
    let ids: Vec<u32> = (0..m).map(|i| (i % adapters) as u32).collect();
    let routing = LoraRouting::per_row(&ids, device).map_err(err)?;
    let mut out = Tensor::zeros(&[m, d], DType::BF16, device).map_err(err)?;
    let base_ms = context.median_ms(|i| {
        let (x, _) = &inputs[i % sets];
        ops::matmul_into(x, &weights[i % sets], None, &mut out, MatmulOptions::linear())
    })?;
    let ms = context.median_ms(|i| {
        let (x, adapters) = &inputs[i % sets];
        ops::lora_forward_into(
            x,
            LoraBase::Dense(&weights[i % sets]),
            None,
            adapters,
            &routing,
            &mut out,
        )
    })?;
    let overhead = 100.0 * (ms / base_ms - 1.0);
    eprintln!("lora m={m} r={rank} adapters={adapters}: base {base_ms:.4} ms, fused {ms:.4} ms, +{overhead:.1}%");
    let what = if adapters == 1 {
        "one adapter".to_string()
    } else {
        format!("{adapters} adapters")
    };
    Ok(json!({
        "name": format!("lora fwd bf16 m={m} d={d} r={rank} {what}"),
        "kind": "lora",
        "dtype": "bf16",
        "m": m, "d": d, "rank": rank, "adapters": adapters,
        "scale": 2.0 / rank as f64,
        "input_sets": sets,
        "ms": ms,
        "base_ms": base_ms,
        "overhead_pct": overhead,
        "tflops": 2.0 * (m * d * d) as f64 / (ms * 1e9),
    }))
}
