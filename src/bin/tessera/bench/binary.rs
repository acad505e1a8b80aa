//! The packed binary linear forward (bf16 activations, 1-bit weights) beside tessera's dense bf16
//! matmul (cuBLASLt) on the same shapes: GEMV for 1 and 16 tokens, GEMM for 256 and 4096. GB/s
//! counts the packed weight bytes once (what bounds the GEMV), against the copy ceiling.

use super::{input_sets, random_tensor, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use tessera::ops::{self, MatmulOptions, PackedBinaryLinear};
use tessera::{DType, Tensor};

const SHAPES: [(usize, usize); 4] = [(4096, 4096), (14336, 4096), (8192, 8192), (4096, 14336)];
const TOKENS: [usize; 4] = [1, 16, 256, 4096];

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let cases: Vec<(usize, usize, usize)> = if context.quick {
        vec![(1, 1024, 1024), (16, 1024, 1024), (256, 1024, 1024)]
    } else {
        SHAPES
            .iter()
            .flat_map(|&(n, k)| TOKENS.iter().map(move |&m| (m, n, k)))
            .collect()
    };
    let mut results = Vec::new();
    for (m, n, k) in cases {
        results.extend(bench_binary(context, m, n, k)?);
    }
    Ok(results)
}

/// Random sign words, so that the bits need no f32 weight to exist on the host.
fn random_bits(len: usize, seed: u64) -> Vec<u32> {
    (0..len)
        .into_par_iter()
        .map(|i| {
            let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u32
        })
        .collect()
}

/// Two rows: the packed binary layer (with the dense time beside it), then the dense bf16 layer
/// of the same shape, so that the printed table shows both; PyTorch's dense layer anchors both.
fn bench_binary(context: &Context, m: usize, n: usize, k: usize) -> Result<Vec<Value>> {
    let device = &context.device;
    let err = |e: tessera::Error| e.to_string();
    let words = ops::binary::packed_words(k);
    let packed_bytes = n * words * 4;
    let dense_bytes = n * k * 2;
    let x_bytes = m * k * 2;

    // The binary layer, rotated over enough sets that no run reads its bits from L2.
    let sets = input_sets(packed_bytes + x_bytes);
    let layers: Vec<(Tensor, Tensor)> = (0..sets as u64)
        .map(|s| {
            let bits = Tensor::from_vec(random_bits(n * words, 900 + s), &[n, words], device).map_err(err)?;
            Ok((random_tensor(&[m, k], DType::BF16, 1000 + s, -1.0, 1.0, device)?, bits))
        })
        .collect::<Result<_>>()?;
    let alpha = random_tensor(&[k], DType::F32, 1100, 0.01, 0.03, device)?;
    let beta = random_tensor(&[k], DType::F32, 1101, -0.01, 0.01, device)?;
    let mut y = Tensor::zeros(&[m, n], DType::BF16, device).map_err(err)?;
    let ms = context.median_ms(|i| {
        let (x, bits) = &layers[i % sets];
        let layer = PackedBinaryLinear {
            bits,
            alpha: &alpha,
            beta: &beta,
            bias: None,
            d_in: k,
        };
        ops::binary_packed_forward_into(x, layer, &mut y)
    })?;
    drop(layers);

    // The dense bf16 layer of the same shape: x·Wᵀ through cuBLASLt.
    let dense_sets = input_sets(dense_bytes + x_bytes);
    let dense: Vec<(Tensor, Tensor)> = (0..dense_sets as u64)
        .map(|s| {
            Ok((
                random_tensor(&[m, k], DType::BF16, 1200 + s, -1.0, 1.0, device)?,
                random_tensor(&[n, k], DType::BF16, 1300 + s, -0.03, 0.03, device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let dense_ms = context.median_ms(|i| {
        let (x, w) = &dense[i % dense_sets];
        ops::matmul_into(x, w, None, &mut y, MatmulOptions::linear())
    })?;

    let gbps = packed_bytes as f64 / (ms * 1e6);
    let flops = 2.0 * (m * n * k) as f64;
    let dense_gbps = (dense_bytes + x_bytes) as f64 / (dense_ms * 1e6);
    let binary = json!({
        "name": format!("binary bf16 m={m} {n}x{k}"),
        "kind": "binary",
        "variant": "packed",
        "dtype": "bf16",
        "m": m, "n": n, "k": k,
        "input_sets": sets,
        "packed_bytes": packed_bytes,
        "ms": ms,
        "gbps": gbps,
        "pct_of_copy": context.pct_of_copy(gbps),
        "tflops": flops / (ms * 1e9),
        "dense_ms": dense_ms,
        "speedup_vs_dense": dense_ms / ms,
    });
    let dense = json!({
        "name": format!("  dense bf16 (cuBLASLt) m={m} {n}x{k}"),
        "kind": "binary",
        "variant": "dense",
        "dtype": "bf16",
        "m": m, "n": n, "k": k,
        "input_sets": dense_sets,
        "ms": dense_ms,
        "gbps": dense_gbps,
        "pct_of_copy": context.pct_of_copy(dense_gbps),
        "tflops": flops / (dense_ms * 1e9),
    });
    Ok(vec![binary, dense])
}
