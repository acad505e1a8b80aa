//! Criterion benchmarks of the fused LoRA forward and backward: bf16, 64 tokens, d = 512, rank 16,
//! one adapter and 8 adapters, over a dense and over a 2:4 sparse base, on the CPU; the issue's
//! d = 4096 forward on the GPU when one is present (the CUDA-event benchmark beside PyTorch is
//! `tessera bench`).

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use std::time::Duration;
use tessera::ops::{
    lora_backward, lora_forward_into, sparse24_double_prune, sparse24_prune_compress, LoraAdapters, LoraBase,
    LoraRouting, NmPattern,
};
use tessera::{Device, Tensor};

fn values(n: usize, seed: u32, amplitude: f32) -> Vec<bf16> {
    (0..n as u32)
        .map(|i| {
            bf16::from_f32(((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 * amplitude - amplitude)
        })
        .collect()
}

fn bench_lora(c: &mut Criterion, group_name: &str, device: &Device, m: usize, d: usize, backward: bool) {
    let rank = 16;
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let x = Tensor::from_vec(values(m * d, 1, 1.0), &[m, d], device).expect("x");
    let w = Tensor::from_vec(values(d * d, 2, 0.02), &[d, d], device).expect("w");
    let dy = Tensor::from_vec(values(m * d, 3, 1.0), &[m, d], device).expect("dy");
    let mut out = Tensor::zeros(&[m, d], x.dtype(), device).expect("out");
    let w_s = sparse24_prune_compress(&w, NmPattern::TWO_FOUR).expect("sparse base");
    let w_dp_t = sparse24_double_prune(&w_s).expect("double-pruned transpose");
    let bases = [
        ("", LoraBase::Dense(&w)),
        ("sparse24_", LoraBase::Sparse24(&w_s, Some(&w_dp_t))),
    ];
    for ((base_name, base), count) in bases.into_iter().flat_map(|b| [(b, 1usize), (b, 8)]) {
        let a = Tensor::from_vec(values(count * rank * d, 4, 0.02), &[count, rank, d], device).expect("a");
        let b = Tensor::from_vec(values(count * d * rank, 5, 0.02), &[count, d, rank], device).expect("b");
        let adapters = LoraAdapters::new(a, b, &vec![rank; count], &vec![0.125; count]).expect("adapters");
        let ids: Vec<u32> = (0..m).map(|i| (i % count) as u32).collect();
        let routing = LoraRouting::per_row(&ids, device).expect("routing");
        group.bench_function(
            format!("forward_{base_name}m{m}_d{d}_r{rank}_{count}_adapters"),
            |bencher| {
                bencher.iter(|| {
                    lora_forward_into(&x, base, None, &adapters, &routing, &mut out).expect("forward");
                    device.synchronize().expect("synchronize");
                })
            },
        );
        if backward {
            group.bench_function(
                format!("backward_{base_name}m{m}_d{d}_r{rank}_{count}_adapters"),
                |bencher| {
                    bencher.iter(|| {
                        lora_backward(&dy, &x, base, &adapters, &routing, false).expect("backward");
                        device.synchronize().expect("synchronize");
                    })
                },
            );
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_lora(c, "lora_cpu", &Device::Cpu, 64, 512, true);
    if let Ok(gpu) = Device::cuda(0) {
        bench_lora(c, "lora_gpu", &gpu, 16, 4096, false);
    }
}

criterion_group!(lora, benches);
criterion_main!(lora);
