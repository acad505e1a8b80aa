//! Criterion benchmarks of 2:4 sparsity on the CPU (and on the GPU when one is present; the
//! CUDA-event benchmark beside cuBLAS and cuSPARSELt is `tessera bench --only sparse`): pruning
//! and compressing a bf16 weight, the sparse linear forward and SLoPe's backward, with the dense
//! matmul of the same shape beside them; and an SLTrain layer's forward+backward with a 2:4
//! support (the sparse product) beside the same layer with an unstructured support.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops::{self, MatmulOptions, NmPattern};
use tessera::{Device, Tensor};

fn values(len: usize, seed: u32) -> Vec<bf16> {
    (0..len as u32)
        .map(|i| bf16::from_f32((i.wrapping_add(seed).wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0))
        .collect()
}

fn bench_sparse(c: &mut Criterion, group_name: &str, device: &Device, m: usize, d: usize) {
    let w = Tensor::from_vec(values(d * d, 1), &[d, d], device).expect("weight");
    let x = Tensor::from_vec(values(m * d, 2), &[m, d], device).expect("input");
    let dy = Tensor::from_vec(values(m * d, 3), &[m, d], device).expect("gradient");
    let sparse = ops::sparse24_prune_compress(&w, NmPattern::TWO_FOUR).expect("compress");
    let w_dp_t = ops::sparse24_double_prune(&sparse).expect("double prune");
    let dense = ops::sparse24_decompress(&sparse).expect("decompress");
    let mut y = Tensor::zeros(&[m, d], x.dtype(), device).expect("output");
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements((2 * m * d * d) as u64));
    group.bench_function(format!("forward_m{m}_d{d}"), |bencher| {
        bencher.iter(|| {
            ops::sparse_linear_forward_into(&x, &sparse, None, &mut y).expect("forward");
            device.synchronize().expect("synchronize");
        })
    });
    group.bench_function(format!("dense_forward_m{m}_d{d}"), |bencher| {
        bencher.iter(|| {
            ops::matmul_into(&x, &dense, None, &mut y, MatmulOptions::linear()).expect("dense");
            device.synchronize().expect("synchronize");
        })
    });
    group.bench_function(format!("backward_m{m}_d{d}"), |bencher| {
        bencher.iter(|| {
            ops::sparse_linear_backward(&dy, &x, &sparse, &w_dp_t, true).expect("backward");
            device.synchronize().expect("synchronize");
        })
    });
    group.throughput(Throughput::Elements((d * d) as u64));
    group.bench_function(format!("prune_compress_d{d}"), |bencher| {
        bencher.iter(|| {
            ops::sparse24_prune_compress(&w, NmPattern::TWO_FOUR).expect("compress");
            device.synchronize().expect("synchronize");
        })
    });
    group.bench_function(format!("double_prune_d{d}"), |bencher| {
        bencher.iter(|| {
            ops::sparse24_double_prune(&sparse).expect("double prune");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn bench_sltrain(c: &mut Criterion, group_name: &str, device: &Device, m: usize, d: usize, rank: usize) {
    let x = Tensor::from_vec(values(m * d, 4), &[m, d], device).expect("input");
    let dy = Tensor::from_vec(values(m * d, 5), &[m, d], device).expect("gradient");
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements((6 * m * d * d) as u64));
    for (name, support) in [
        ("two_four", ops::SlTrainSupport::TwoFour),
        ("unstructured", ops::SlTrainSupport::Random),
    ] {
        let config = ops::SlTrainConfig {
            d_out: d,
            d_in: d,
            rank,
            density: 0.5,
            alpha: 16.0,
            bias: true,
            support,
        };
        let layer = ops::SlTrainLayer::new(config, tessera::DType::BF16, 7, device).expect("layer");
        group.bench_function(format!("sltrain_{name}_m{m}_d{d}_r{rank}"), |bencher| {
            bencher.iter(|| {
                ops::sltrain_forward(&x, &layer).expect("forward");
                ops::sltrain_backward(&dy, &x, &layer).expect("backward");
                device.synchronize().expect("synchronize");
            })
        });
    }
    group.finish();
}

/// The tiny preset's block linears (in, out) in f32 on the CPU, at its training batch (16 x 128
/// tokens) and at one decoded token: the CPU sparse kernel against the masked dense GEMM, which
/// decides the CPU path of the model's `nm` layers (src/model/sparse_layers.rs).
fn bench_tiny_model_shapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("sparse_cpu_tiny_model");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (input, output) in [(128, 384), (128, 128), (128, 512), (512, 128)] {
        let w: Vec<f32> = values(output * input, 1).iter().map(|v| v.to_f32()).collect();
        let w = Tensor::from_vec(w, &[output, input], &Device::Cpu).expect("weight");
        let sparse = ops::sparse24_prune_compress(&w, NmPattern::TWO_FOUR).expect("compress");
        let masked = ops::sparse24_decompress(&sparse).expect("decompress");
        for m in [2048, 1] {
            let x: Vec<f32> = values(m * input, 2).iter().map(|v| v.to_f32()).collect();
            let x = Tensor::from_vec(x, &[m, input], &Device::Cpu).expect("input");
            let mut y = Tensor::zeros(&[m, output], x.dtype(), &Device::Cpu).expect("output");
            group.throughput(Throughput::Elements((2 * m * input * output) as u64));
            group.bench_function(format!("sparse_m{m}_{input}x{output}"), |bencher| {
                bencher.iter(|| ops::sparse_linear_forward_into(&x, &sparse, None, &mut y).expect("forward"))
            });
            group.bench_function(format!("masked_dense_m{m}_{input}x{output}"), |bencher| {
                bencher.iter(|| ops::matmul_into(&x, &masked, None, &mut y, MatmulOptions::linear()).expect("dense"))
            });
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_tiny_model_shapes(c);
    bench_sparse(c, "sparse_cpu", &Device::Cpu, 64, 1024);
    bench_sltrain(c, "sltrain_cpu", &Device::Cpu, 64, 1024, 64);
    if let Ok(gpu) = Device::cuda(0) {
        bench_sparse(c, "sparse_gpu", &gpu, 4096, 4096);
        bench_sltrain(c, "sltrain_gpu", &gpu, 4096, 4096, 256);
    }
}

criterion_group!(sparse, benches);
criterion_main!(sparse);
