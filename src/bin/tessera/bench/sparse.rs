//! 2:4 sparse linear forward (mma.sp) beside tessera's dense cuBLASLt GEMM on the same inputs,
//! for the shapes, and one sparse linear layer's training step (forward, SLoPe's input
//! gradient through the double-pruned weight, the masked weight gradient, the bias gradient)
//! beside its dense twin; and one SLTrain layer's step (forward and backward, rank 256) with a 2:4
//! support on the sparse GEMM beside the same layer with an unstructured support of the same
//! density (W materialised, dense GEMMs). torch_compare.py adds cuSPARSELt (`to_sparse_semi_structured`) and
//! dense `torch.matmul` for the same cases.
//!
//! On a Hopper GPU (sm_90a image) the cases above 64 tokens and the training step run a second
//! time with the sm_90a `wgmma.mma_async.sp` GEMM forced (rows named `... sm90`, field `kernel`);
//! at 64 tokens or fewer both choices run the same few-token kernel, so those have one row.

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::cuda::kernels::ImageKind;
use tessera::ops::{self, MatmulOptions, NmPattern, Sparse24, SparseKernel};
use tessera::{DType, Tensor};

/// Threshold of the few-token kernel: larger calls run the kernel that `SparseKernel` picks.
const FEW_TOKENS: usize = 64;

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let (tokens, shapes): (&[usize], &[(usize, usize)]) = if context.quick {
        (&[1, 16, 512], &[(1024, 1024)])
    } else {
        (
            &[1, 16, 4096],
            &[(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)],
        )
    };
    let hopper = context.gpu.kernel_image().map_err(err)? == ImageKind::Sm90a;
    let mut results = Vec::new();
    for &(n, k) in shapes {
        // The weights are shared by every token count: the sets are sized for the smallest, where
        // the compressed weight is all the traffic.
        let weights = Weights::new(context, n, k)?;
        for &m in tokens {
            results.push(bench_forward(context, &weights, m, SparseKernel::MmaSp)?);
            if hopper && m > FEW_TOKENS {
                results.push(bench_forward(context, &weights, m, SparseKernel::Hopper)?);
            }
        }
    }
    let (m, d) = if context.quick { (512, 1024) } else { (4096, 4096) };
    results.push(bench_step(context, m, d, SparseKernel::MmaSp)?);
    if hopper {
        results.push(bench_step(context, m, d, SparseKernel::Hopper)?);
    }
    let rank = if context.quick { 64 } else { 256 };
    results.push(bench_sltrain(context, m, d, rank)?);
    Ok(results)
}

fn err(e: tessera::Error) -> String {
    e.to_string()
}

/// The row name's suffix and the `kernel` field of a sparse GEMM choice.
fn kernel_label(kernel: SparseKernel) -> (&'static str, &'static str) {
    match kernel {
        SparseKernel::Hopper => (" sm90", "sm90"),
        _ => ("", "mma.sp"),
    }
}

/// Rotating sets of one (n, k) bf16 weight: dense, and pruned 2:4 and compressed.
struct Weights {
    n: usize,
    k: usize,
    dense: Vec<Tensor>,
    sparse: Vec<Sparse24>,
}

impl Weights {
    fn new(context: &Context, n: usize, k: usize) -> Result<Weights> {
        let sets = input_sets(n * k * 9 / 8);
        let mut dense = Vec::with_capacity(sets);
        let mut sparse = Vec::with_capacity(sets);
        for s in 0..sets as u64 {
            let w = random_tensor(&[n, k], DType::BF16, 700 + s, -1.0, 1.0, &context.device)?;
            let compressed = ops::sparse24_prune_compress(&w, NmPattern::TWO_FOUR).map_err(err)?;
            // The dense GEMM multiplies the same pruned weight (the values do not change its
            // speed, but the comparison is then of one product).
            dense.push(ops::sparse24_decompress(&compressed).map_err(err)?);
            sparse.push(compressed);
        }
        Ok(Weights { n, k, dense, sparse })
    }
}

fn bench_forward(context: &Context, weights: &Weights, m: usize, kernel: SparseKernel) -> Result<Value> {
    let (n, k) = (weights.n, weights.k);
    let sets = weights.sparse.len();
    let device = &context.device;
    let xs: Vec<Tensor> = (0..sets as u64)
        .map(|s| random_tensor(&[m, k], DType::BF16, 900 + s, -1.0, 1.0, device))
        .collect::<Result<_>>()?;
    let mut y = Tensor::zeros(&[m, n], DType::BF16, device).map_err(err)?;
    let sparse_ms = ops::with_sparse_kernel(kernel, || {
        context.median_ms(|i| ops::sparse_linear_forward_into(&xs[i % sets], &weights.sparse[i % sets], None, &mut y))
    })?;
    let dense_ms = context.median_ms(|i| {
        ops::matmul_into(
            &xs[i % sets],
            &weights.dense[i % sets],
            None,
            &mut y,
            MatmulOptions::linear(),
        )
    })?;
    let flops = 2.0 * (m * n * k) as f64;
    let sparse_bytes = weights.sparse[0].size_in_bytes() + 2 * (m * k + m * n);
    let dense_bytes = 2 * (n * k + m * k + m * n);
    let (suffix, label) = kernel_label(kernel);
    Ok(json!({
        "name": format!("sparse 2:4 bf16 m={m} {n}x{k}{suffix}"),
        "kind": "sparse",
        "kernel": label,
        "dtype": "bf16",
        "m": m, "n": n, "k": k,
        "input_sets": sets,
        "ms": sparse_ms,
        // Dense-equivalent rate: the products a dense GEMM of this shape does.
        "tflops": flops / (sparse_ms * 1e9),
        "gbps": sparse_bytes as f64 / (sparse_ms * 1e6),
        "pct_of_copy": context.pct_of_copy(sparse_bytes as f64 / (sparse_ms * 1e6)),
        "dense_ms": dense_ms,
        "dense_tflops": flops / (dense_ms * 1e9),
        "dense_gbps": dense_bytes as f64 / (dense_ms * 1e6),
        "speedup_vs_dense": dense_ms / sparse_ms,
    }))
}

/// One linear layer's training step at m tokens, d -> d, bf16, with bias: sparse (forward
/// through W_s, dX through W_dp, dW masked to W_s's support, db) and its dense twin (three
/// cuBLASLt GEMMs and the same bias gradient by a fourth, ones·dY).
fn bench_step(context: &Context, m: usize, d: usize, kernel: SparseKernel) -> Result<Value> {
    let device = &context.device;
    let w = random_tensor(&[d, d], DType::BF16, 1100, -1.0, 1.0, device)?;
    let sparse = ops::sparse24_prune_compress(&w, NmPattern::TWO_FOUR).map_err(err)?;
    let w_dp_t = ops::sparse24_double_prune(&sparse).map_err(err)?;
    let dense = ops::sparse24_decompress(&sparse).map_err(err)?;
    let bias = random_tensor(&[d], DType::BF16, 1101, -1.0, 1.0, device)?;
    let x = random_tensor(&[m, d], DType::BF16, 1102, -1.0, 1.0, device)?;
    let dy = random_tensor(&[m, d], DType::BF16, 1103, -1.0, 1.0, device)?;
    let ones = Tensor::from_vec(vec![half::bf16::ONE; m], &[1, m], device).map_err(err)?;
    let mut y = Tensor::zeros(&[m, d], DType::BF16, device).map_err(err)?;
    let mut dx = Tensor::zeros(&[m, d], DType::BF16, device).map_err(err)?;
    let mut dw = Tensor::zeros(&[d, d], DType::BF16, device).map_err(err)?;
    let mut db = Tensor::zeros(&[1, d], DType::BF16, device).map_err(err)?;
    let sparse_ms = ops::with_sparse_kernel(kernel, || {
        context.median_ms(|_| {
            ops::sparse_linear_forward_into(&x, &sparse, Some(&bias), &mut y)?;
            ops::sparse_linear_backward(&dy, &x, &sparse, &w_dp_t, true).map(drop)
        })
    })?;
    let double_prune_ms = context.median_ms(|_| ops::sparse24_double_prune(&sparse).map(drop))?;
    let dense_ms = context.median_ms(|_| {
        ops::matmul_into(&x, &dense, Some(&bias), &mut y, MatmulOptions::linear())?;
        ops::matmul_into(&dy, &dense, None, &mut dx, MatmulOptions::default())?;
        let transposed = MatmulOptions {
            trans_a: true,
            ..Default::default()
        };
        ops::matmul_into(&dy, &x, None, &mut dw, transposed)?;
        ops::matmul_into(&ones, &dy, None, &mut db, MatmulOptions::default())
    })?;
    let flops = 3.0 * 2.0 * (m * d * d) as f64;
    let (suffix, label) = kernel_label(kernel);
    Ok(json!({
        "name": format!("sparse step bf16 m={m} d={d}{suffix}"),
        "kind": "sparse_step",
        "kernel": label,
        "dtype": "bf16",
        "m": m, "d": d,
        "input_sets": 1,
        "ms": sparse_ms,
        "tflops": flops / (sparse_ms * 1e9),
        "double_prune_ms": double_prune_ms,
        "dense_ms": dense_ms,
        "dense_tflops": flops / (dense_ms * 1e9),
        "speedup_vs_dense": dense_ms / sparse_ms,
    }))
}

/// One SLTrain layer's forward and backward at m tokens, d -> d, bf16, with bias: the 2:4 support
/// (sparse GEMM, W never materialised) beside an unstructured support of density 1/2.
fn bench_sltrain(context: &Context, m: usize, d: usize, rank: usize) -> Result<Value> {
    let device = &context.device;
    let config = |support| ops::SlTrainConfig {
        d_out: d,
        d_in: d,
        rank,
        density: 0.5,
        alpha: 16.0,
        bias: true,
        support,
    };
    let layer = |support, seed| {
        let mut layer = ops::SlTrainLayer::new(config(support), DType::BF16, seed, device).map_err(err)?;
        // B = 0 at initialisation; random values keep the low-rank product honest.
        layer.b = random_tensor(&[d, rank], DType::BF16, seed + 1, -0.05, 0.05, device)?;
        Ok::<_, String>(layer)
    };
    let two_four = layer(ops::SlTrainSupport::TwoFour, 1200)?;
    let random = layer(ops::SlTrainSupport::Random, 1210)?;
    let x = random_tensor(&[m, d], DType::BF16, 1220, -1.0, 1.0, device)?;
    let dy = random_tensor(&[m, d], DType::BF16, 1221, -1.0, 1.0, device)?;
    let step = |layer: &ops::SlTrainLayer| {
        context.median_ms(|_| {
            ops::sltrain_forward(&x, layer)?;
            ops::sltrain_backward(&dy, &x, layer).map(drop)
        })
    };
    let ms = step(&two_four)?;
    let unstructured_ms = step(&random)?;
    // The dense twin's products (forward, dX, dW); the low-rank terms are extra work on top.
    let flops = 3.0 * 2.0 * (m * d * d) as f64;
    Ok(json!({
        "name": format!("sltrain step 2:4 bf16 m={m} d={d} r={rank}"),
        "kind": "sltrain",
        "dtype": "bf16",
        "m": m, "d": d, "rank": rank, "density": 0.5, "alpha": 16.0,
        "input_sets": 1,
        "ms": ms,
        "tflops": flops / (ms * 1e9),
        "unstructured_ms": unstructured_ms,
        "speedup_vs_unstructured": unstructured_ms / ms,
    }))
}
