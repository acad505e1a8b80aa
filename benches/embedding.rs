//! Criterion benchmarks of the token + position embedding forward and backward (bf16 tables, f32
//! gradients, GPT-2's vocabulary and width), on the CPU (and on the GPU when one is present).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops::{self, EmbeddingGradPlan};
use tessera::{DType, Device, Tensor};

fn filled(shape: &[usize], device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<bf16> = (0..n as u32)
        .map(|i| bf16::from_f32((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    Tensor::from_vec(values, shape, device).expect("benchmark input")
}

fn bench_device(c: &mut Criterion, name: &str, device: &Device, batch: usize) {
    let (seq, vocab, width) = (1024, 50304, 768);
    let count = batch * seq;
    let host_tokens: Vec<u32> = (0..count as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % vocab as u32)
        .collect();
    let tokens = Tensor::from_slice(&host_tokens, &[batch, seq], device).expect("tokens");
    let (wte, wpe, d_out) = (
        filled(&[vocab, width], device),
        filled(&[seq, width], device),
        filled(&[batch, seq, width], device),
    );
    let mut out = filled(&[batch, seq, width], device);
    let mut d_wte = Tensor::zeros(&[vocab, width], DType::F32, device).expect("d_wte");
    let mut d_wpe = Tensor::zeros(&[seq, width], DType::F32, device).expect("d_wpe");
    let plan = EmbeddingGradPlan::new(&host_tokens, batch, seq, vocab, device).expect("plan");
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((3 * count * width * 2) as u64));
    group.bench_function(format!("forward_{count}x{width}"), |b| {
        b.iter(|| {
            ops::embedding_forward_into(&tokens, &wte, Some(&wpe), &mut out).expect("embedding");
            device.synchronize().expect("synchronize");
        })
    });
    group.throughput(Throughput::Bytes((count * width * 2 + vocab * width * 4) as u64));
    group.bench_function(format!("backward_{count}x{width}"), |b| {
        b.iter(|| {
            ops::embedding_backward_into(&d_out, &plan, &mut d_wte, Some(&mut d_wpe), false).expect("backward");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, "embedding_cpu", &Device::Cpu, 1);
    if let Ok(gpu) = Device::cuda(0) {
        bench_device(c, "embedding_gpu", &gpu, 16);
    }
}

criterion_group!(embedding, benches);
criterion_main!(embedding);
