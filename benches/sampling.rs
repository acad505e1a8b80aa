//! Criterion benchmarks of sampling (greedy; temperature 0.8 with top-k 50 and top-p 0.9) from
//! bf16 logits over GPT-2's vocabulary, 16 rows, on the CPU (and on the GPU when one is present).

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use std::time::Duration;
use tessera::ops::{self, SamplingOptions};
use tessera::{DType, Device, Tensor};

fn bench_device(c: &mut Criterion, name: &str, device: &Device) {
    let (rows, vocab) = (16, 50304);
    let values: Vec<bf16> = (0..(rows * vocab) as u32)
        .map(|i| bf16::from_f32((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 125.0 - 8.0))
        .collect();
    let logits = Tensor::from_vec(values, &[rows, vocab], device).expect("logits");
    let mut out = Tensor::zeros(&[rows], DType::U32, device).expect("tokens");
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let nucleus = SamplingOptions {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        seed: 1,
        offset: 0,
    };
    for (label, options) in [("greedy", SamplingOptions::greedy()), ("t0.8_k50_p0.9", nucleus)] {
        let mut offset = 0;
        group.bench_function(format!("{label}_{rows}x{vocab}"), |b| {
            b.iter(|| {
                offset += 1;
                ops::sample_into(&logits, &SamplingOptions { offset, ..options }, &mut out).expect("sample");
                device.synchronize().expect("synchronize");
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, "sampling_cpu", &Device::Cpu);
    if let Ok(gpu) = Device::cuda(0) {
        bench_device(c, "sampling_gpu", &gpu);
    }
}

criterion_group!(sampling, benches);
criterion_main!(sampling);
