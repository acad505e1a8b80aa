//! Criterion benchmarks of the binarized linear layer and the distillation loss: the packed
//! forward (bf16, 1 and 16 tokens, 1024x4096) and the training-form forward and backward on the CPU, the
//! distillation loss (8 rows of a 32000 vocabulary, f32), and the packed forward at the issue's
//! 8192x8192 on the GPU when one is present (the CUDA-event benchmark beside cuBLAS is
//! `tessera bench`). Packed-forward throughput counts the packed weight bytes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops::binary::packed_words;
use tessera::ops::{
    binary_linear_backward_into, binary_linear_forward, binary_pack, binary_packed_forward_into, distill_loss_into,
    BinaryLinear, BinaryLinearGrads, PackedBinaryLinear,
};
use tessera::{DType, Device, Tensor};

/// Deterministic values in [-1, 1) without a random number generator.
fn values(len: usize, salt: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(salt).wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

fn bench_packed(c: &mut Criterion, name: &str, device: &Device, n: usize, k: usize) {
    let w = Tensor::from_vec(values(n * k, 1), &[n, k], device).expect("weight");
    let bits = binary_pack(&w).expect("pack");
    let alpha = Tensor::from_vec(vec![0.02f32; k], &[k], device).expect("alpha");
    let beta = Tensor::from_vec(vec![0.001f32; k], &[k], device).expect("beta");
    let layer = PackedBinaryLinear {
        bits: &bits,
        alpha: &alpha,
        beta: &beta,
        bias: None,
        d_in: k,
    };
    let mut group = group(c, name);
    group.throughput(Throughput::Bytes((n * packed_words(k) * 4) as u64));
    for m in [1, 16] {
        let x: Vec<bf16> = values(m * k, 2).into_iter().map(bf16::from_f32).collect();
        let x = Tensor::from_vec(x, &[m, k], device).expect("x");
        let mut y = Tensor::zeros(&[m, n], DType::BF16, device).expect("y");
        group.bench_function(format!("packed_forward_m{m}_{n}x{k}"), |bencher| {
            bencher.iter(|| {
                binary_packed_forward_into(&x, layer, &mut y).expect("forward");
                device.synchronize().expect("synchronize");
            })
        });
    }
    group.finish();
}

fn bench_cpu_training_and_loss(c: &mut Criterion) {
    let cpu = Device::Cpu;
    let (m, n, k) = (16, 1024, 1024);
    let w = Tensor::from_vec(values(n * k, 3), &[n, k], &cpu).expect("weight");
    let alpha = Tensor::from_vec(vec![0.02f32; k], &[k], &cpu).expect("alpha");
    let beta = Tensor::from_vec(vec![0.001f32; k], &[k], &cpu).expect("beta");
    let x = Tensor::from_vec(values(m * k, 4), &[m, k], &cpu).expect("x");
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let (rows, vocab) = (8, 32_000);
    let student = Tensor::from_vec(values(rows * vocab, 5), &[rows, vocab], &cpu).expect("student");
    let teacher = Tensor::from_vec(values(rows * vocab, 6), &[rows, vocab], &cpu).expect("teacher");
    let mut loss = Tensor::zeros(&[1], DType::F32, &cpu).expect("loss");
    let mut grad = Tensor::zeros(&[rows, vocab], DType::F32, &cpu).expect("grad");
    let mut group = group(c, "binary_cpu");
    group.bench_function(format!("training_forward_m{m}_{n}x{k}"), |bencher| {
        bencher.iter(|| binary_linear_forward(&x, layer).expect("forward"))
    });
    let dy = Tensor::from_vec(values(m * n, 7), &[m, n], &cpu).expect("dy");
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &cpu).expect("gradient");
    let mut grads = BinaryLinearGrads {
        d_x: zeros(&[m, k]),
        d_weight: zeros(&[n, k]),
        d_alpha: zeros(&[k]),
        d_beta: zeros(&[k]),
        d_bias: None,
    };
    group.bench_function(format!("training_backward_m{m}_{n}x{k}"), |bencher| {
        bencher.iter(|| binary_linear_backward_into(&dy, &x, layer, &mut grads).expect("backward"))
    });
    group.throughput(Throughput::Bytes((3 * rows * vocab * 4) as u64));
    group.bench_function(format!("distill_loss_f32_{rows}x{vocab}"), |bencher| {
        bencher.iter(|| distill_loss_into(&student, &teacher, None, 0.0, &mut loss, &mut grad).expect("loss"))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_packed(c, "binary_packed_cpu", &Device::Cpu, 1024, 4096);
    bench_cpu_training_and_loss(c);
    if let Ok(gpu) = Device::cuda(0) {
        bench_packed(c, "binary_packed_gpu", &gpu, 8192, 8192);
    }
}

criterion_group!(binary, benches);
criterion_main!(binary);
