//! The packed binary linear forward (bf16 activations, 1-bit weights) beside tessera's dense bf16
//! matmul (cuBLASLt) on the same shapes: GEMV for 1 and 16 tokens, GEMM for 256 and 4096. GB/s
//! counts the packed weight bytes once (what bounds the GEMV), against the copy ceiling. Then
//! the training form's forward and backward (bf16, 4096 tokens) beside the dense layer's GEMMs,
//! and the fused distillation loss at training shapes, whose GB/s count the two logit tensors
//! read once.

use super::{input_sets, random_tensor, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use tessera::ops::{self, BinaryLinear, BinaryLinearGrads, MatmulOptions, PackedBinaryLinear};
use tessera::{DType, Device, Tensor};

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
    let training: &[(usize, usize, usize)] = if context.quick {
        &[(256, 1024, 1024)]
    } else {
        &[(4096, 4096, 4096), (4096, 14336, 4096)]
    };
    for &(m, n, k) in training {
        results.extend(bench_training(context, m, n, k)?);
    }
    let distill: &[(usize, usize, f32)] = if context.quick {
        &[(1024, 32000, 0.0)]
    } else {
        &[
            (8 * 1024, 32000, 0.0),
            (8 * 1024, 50304, 0.0),
            (16 * 1024, 32000, 0.0),
            (16 * 1024, 50304, 0.0),
            (8 * 1024, 32000, 0.5),
        ]
    };
    for &(rows, vocab, ce_weight) in distill {
        results.push(bench_distill(context, rows, vocab, ce_weight)?);
    }
    Ok(results)
}

/// The training form at m tokens: forward, then backward (all five gradients), bf16 activations,
/// f32 parameters; beside them the dense bf16 layer's GEMMs (forward x·Wᵀ; backward dY·W and
/// dYᵀ·x into f32) on the same shape. TFLOP/s count the GEMMs' 2·m·n·k per product.
fn bench_training(context: &Context, m: usize, n: usize, k: usize) -> Result<Vec<Value>> {
    let device = &context.device;
    let err = |e: tessera::Error| e.to_string();
    let w = random_tensor(&[n, k], DType::F32, 1400, -0.05, 0.05, device)?;
    let (alpha, beta) = ops::binary_init(&w).map_err(err)?;
    let bias = random_tensor(&[n], DType::F32, 1401, -0.1, 0.1, device)?;
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: Some(&bias),
    };
    let x = random_tensor(&[m, k], DType::BF16, 1402, -1.0, 1.0, device)?;
    let dy = random_tensor(&[m, n], DType::BF16, 1403, -1.0, 1.0, device)?;
    let zeros = |shape: &[usize], dtype: DType| Tensor::zeros(shape, dtype, device).map_err(err);
    let mut y = zeros(&[m, n], DType::BF16)?;
    let mut grads = BinaryLinearGrads {
        d_x: zeros(&[m, k], DType::BF16)?,
        d_weight: zeros(&[n, k], DType::F32)?,
        d_alpha: zeros(&[k], DType::F32)?,
        d_beta: zeros(&[k], DType::F32)?,
        d_bias: Some(zeros(&[n], DType::F32)?),
    };
    let forward_ms = context.median_ms(|_| ops::binary_linear_forward_into(&x, layer, &mut y))?;
    let backward_ms = context.median_ms(|_| ops::binary_linear_backward_into(&dy, &x, layer, &mut grads))?;

    let w_dense = random_tensor(&[n, k], DType::BF16, 1404, -0.05, 0.05, device)?;
    let dense_forward_ms =
        context.median_ms(|_| ops::matmul_into(&x, &w_dense, None, &mut y, MatmulOptions::linear()))?;
    let mut d_w = zeros(&[n, k], DType::F32)?;
    let transposed = MatmulOptions {
        trans_a: true,
        ..Default::default()
    };
    let dense_backward_ms = context.median_ms(|_| {
        ops::matmul_into(&dy, &w_dense, None, &mut grads.d_x, MatmulOptions::default())?;
        ops::matmul_into(&dy, &x, None, &mut d_w, transposed)
    })?;
    let flops = 2.0 * (m * n * k) as f64;
    let row = |direction: &str, variant: &str, ms: f64, products: f64, dense_ms: Option<f64>| {
        let mut row = json!({
            "name": format!("{}binary training {direction} bf16 m={m} {n}x{k}", if variant == "dense" { "  dense " } else { "" }),
            "kind": "binary_train",
            "variant": variant,
            "direction": direction,
            "dtype": "bf16",
            "m": m, "n": n, "k": k,
            "ms": ms,
            "tflops": products * flops / (ms * 1e9),
        });
        if let Some(dense_ms) = dense_ms {
            row["dense_ms"] = json!(dense_ms);
            row["speedup_vs_dense"] = json!(dense_ms / ms);
        }
        row
    };
    Ok(vec![
        row("forward", "binary", forward_ms, 1.0, Some(dense_forward_ms)),
        row("forward", "dense", dense_forward_ms, 1.0, None),
        row("backward", "binary", backward_ms, 2.0, Some(dense_backward_ms)),
        row("backward", "dense", dense_backward_ms, 2.0, None),
    ])
}

/// The distillation loss and its gradient over bf16 logits `[rows, vocab]` (student and teacher
/// each read, the gradient written); `ce_weight > 0` mixes in the next-token cross-entropy.
fn bench_distill(context: &Context, rows: usize, vocab: usize, ce_weight: f32) -> Result<Value> {
    let device = &context.device;
    let err = |e: tessera::Error| e.to_string();
    // Each tensor is 0.5-1.6 GB, far past the L2 cache: one set.
    let student = random_tensor(&[rows, vocab], DType::BF16, 1500, -4.0, 4.0, device)?;
    let teacher = random_tensor(&[rows, vocab], DType::BF16, 1501, -4.0, 4.0, device)?;
    let labels: Vec<u32> = (0..rows as u64)
        .map(|r| ((r * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, &[rows], &Device::Cpu)
        .and_then(|t| t.to_device(device))
        .map_err(err)?;
    let labels = (ce_weight > 0.0).then_some(&labels);
    let mut loss = Tensor::zeros(&[1], DType::F32, device).map_err(err)?;
    let mut grad = Tensor::zeros(&[rows, vocab], DType::BF16, device).map_err(err)?;
    let ms =
        context.median_ms(|_| ops::distill_loss_into(&student, &teacher, labels, ce_weight, &mut loss, &mut grad))?;
    let read = 2 * rows * vocab * 2;
    let gbps = read as f64 / (ms * 1e6);
    Ok(json!({
        "name": format!("distill_loss bf16 {rows}x{vocab} w={ce_weight}"),
        "kind": "distill",
        "dtype": "bf16",
        "rows": rows,
        "vocab": vocab,
        "ce_weight": ce_weight,
        "bytes": read,
        "bytes_written": rows * vocab * 2,
        "ms": ms,
        "gbps": gbps,
        "pct_of_copy": context.pct_of_copy(gbps),
    }))
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
