//! Criterion benchmarks of fused AdamW: 16M parameters on the CPU (one tensor, f32 gradients),
//! and 256M on the GPU when one is present. Throughput counts 28 bytes per parameter (param, m, v
//! read and written, the gradient read), the convention the PyTorch anchor is quoted in; beside
//! it, an in-place parallel pass measures the CPU's memory ceiling in the same run.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use std::time::Duration;
use tessera::ops::{adamw_step, AdamWConfig, AdamWTensor};
use tessera::{Device, Tensor};

fn filled(n: usize, scale: f32, offset: f32, device: &Device) -> Tensor {
    let values: Vec<f32> = (0..n as u32)
        .map(|i| offset + scale * ((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    Tensor::from_vec(values, &[n], device).expect("benchmark input")
}

fn bench_adamw(c: &mut Criterion, group_name: &str, device: &Device, n: usize) {
    let mut param = filled(n, 1.0, 0.0, device);
    let grad = filled(n, 1e-2, 0.0, device);
    let mut exp_avg = filled(n, 1e-3, 0.0, device);
    let mut exp_avg_sq = filled(n, 1e-6, 1e-6, device);
    let config = AdamWConfig::default();
    let mut step = 0;
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Bytes(28 * n as u64));
    group.bench_function(format!("{}M_f32_grad", n >> 20), |bencher| {
        bencher.iter(|| {
            step += 1;
            let mut tensors = [AdamWTensor {
                param: &mut param,
                grad: &grad,
                exp_avg: &mut exp_avg,
                exp_avg_sq: &mut exp_avg_sq,
                param_bf16: None,
                weight_decay: true,
            }];
            adamw_step(&mut tensors, &config, step, 1.0).expect("adamw");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

/// The CPU's memory ceiling, measured in the same run: one parallel in-place pass over 256 MiB
/// that reads and writes every element, counting 8 bytes per element. In place, like AdamW's own
/// traffic, so that neither pays the extra read a cache line costs when it is only written.
fn bench_memory_ceiling(c: &mut Criterion) {
    let n = 64 << 20;
    let mut values: Vec<f32> = (0..n as u32).map(|i| i as f32).collect();
    let mut group = c.benchmark_group("adamw_cpu");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(8 * n as u64));
    group.bench_function("memory_ceiling", |bencher| {
        bencher.iter(|| {
            values.par_chunks_mut(1 << 16).for_each(|chunk| {
                for value in chunk {
                    *value = *value * 0.999_999 + 1e-7;
                }
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_memory_ceiling(c);
    bench_adamw(c, "adamw_cpu", &Device::Cpu, 16 << 20);
    if let Ok(gpu) = Device::cuda(0) {
        bench_adamw(c, "adamw_gpu", &gpu, 256 << 20);
    }
}

criterion_group!(adamw, benches);
criterion_main!(adamw);
