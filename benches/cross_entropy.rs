//! Criterion benchmarks of the fused cross-entropy (loss and gradient in place) over GPT-2's
//! vocabulary, bf16, on the CPU (and on the GPU when one is present). Throughput counts one read
//! and one write of the logits.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops::{self, CrossEntropyOptions, CrossEntropyOutputs};
use tessera::{DType, Device, Tensor};

fn bench_device(c: &mut Criterion, name: &str, device: &Device, rows: usize) {
    let vocab = 50304;
    let values: Vec<bf16> = (0..(rows * vocab) as u32)
        .map(|i| bf16::from_f32((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 250.0 - 4.0))
        .collect();
    let mut logits = Tensor::from_vec(values, &[rows, vocab], device).expect("logits");
    let targets: Vec<u32> = (0..rows as u32).map(|r| r.wrapping_mul(7919) % vocab as u32).collect();
    let targets = Tensor::from_vec(targets, &[rows], device).expect("targets");
    let mut losses = Tensor::zeros(&[rows], DType::F32, device).expect("losses");
    let mut mean = Tensor::zeros(&[1], DType::F32, device).expect("mean");
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((2 * rows * vocab * 2) as u64));
    group.bench_function(format!("fused_in_place_{rows}x{vocab}"), |b| {
        b.iter(|| {
            let outputs = CrossEntropyOutputs {
                losses: &mut losses,
                mean: &mut mean,
            };
            ops::cross_entropy_fused_in_place(&mut logits, &targets, &CrossEntropyOptions::default(), outputs)
                .expect("cross entropy");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, "cross_entropy_cpu", &Device::Cpu, 64);
    if let Ok(gpu) = Device::cuda(0) {
        bench_device(c, "cross_entropy_gpu", &gpu, 16384);
    }
}

criterion_group!(cross_entropy, benches);
criterion_main!(cross_entropy);
