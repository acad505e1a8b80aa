//! Criterion benchmark of attention_decode: one query per head (12 heads of 64) against 128 and
//! 1024 cached keys, f32 on the CPU and bf16 on the GPU when one is present. Throughput counts
//! the keys and values read once.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use tessera::ops::{attention_decode_into, AttentionMask, AttentionOptions};
use tessera::{DType, Device, Tensor};

fn bench_decode(c: &mut Criterion, group_name: &str, device: &Device, dtype: DType) {
    let (heads, d) = (12, 64);
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for keys in [128, 1024] {
        let values = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 2_654_435_761 + salt) % 1999) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let tensor = |n: usize, salt: usize, shape: &[usize]| {
            let values = values(n, salt);
            match dtype {
                DType::F32 => Tensor::from_vec(values, shape, device),
                _ => Tensor::from_vec(values.into_iter().map(half::bf16::from_f32).collect(), shape, device),
            }
            .expect("input")
        };
        let q = tensor(heads * d, 1, &[heads, d]);
        let k = tensor(keys * heads * d, 2, &[keys, heads * d]);
        let v = tensor(keys * heads * d, 3, &[keys, heads * d]);
        let position = Tensor::from_vec(vec![(keys - 1) as u32], &[1], device).expect("position");
        let mut out = Tensor::zeros(&[heads, d], dtype, device).expect("output");
        let options = AttentionOptions {
            mask: AttentionMask::Causal,
            ..AttentionOptions::default()
        };
        group.throughput(Throughput::Bytes((2 * keys * heads * d * dtype.size_in_bytes()) as u64));
        group.bench_function(format!("keys_{keys}"), |bencher| {
            bencher.iter(|| {
                attention_decode_into(&q, &k, &v, &position, &options, &mut out).expect("decode");
                device.synchronize().expect("synchronize");
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_decode(c, "attention_decode_cpu", &Device::Cpu, DType::F32);
    if let Ok(gpu) = Device::cuda(0) {
        bench_decode(c, "attention_decode_gpu", &gpu, DType::BF16);
    }
}

criterion_group!(attention_decode, benches);
criterion_main!(attention_decode);
