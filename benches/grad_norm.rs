//! Criterion benchmarks of the global gradient norm and of clipping, over 16M f32 gradients in
//! 16 tensors on the CPU (124M in GPT-2 small's sizes on the GPU when one is present).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use tessera::ops;
use tessera::{DType, Device, Tensor};

fn bench_device(c: &mut Criterion, name: &str, device: &Device, sizes: &[usize]) {
    let mut grads: Vec<Tensor> = sizes
        .iter()
        .map(|&n| {
            let values: Vec<f32> = (0..n as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) % 2001) as f32 * 1e-6)
                .collect();
            Tensor::from_vec(values, &[n], device).expect("gradient")
        })
        .collect();
    let mut norm = Tensor::zeros(&[1], DType::F32, device).expect("norm");
    let params: usize = sizes.iter().sum();
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((4 * params) as u64));
    group.bench_function(format!("norm_{}M", params >> 20), |b| {
        b.iter(|| {
            let refs: Vec<&Tensor> = grads.iter().collect();
            ops::grad_norm_into(&refs, &mut norm).expect("norm");
            device.synchronize().expect("synchronize");
        })
    });
    // A maximum above the norm: the clipping call costs the norm and no write.
    group.bench_function(format!("clip_unscaled_{}M", params >> 20), |b| {
        b.iter(|| {
            let mut refs: Vec<&mut Tensor> = grads.iter_mut().collect();
            ops::clip_grad_norm(&mut refs, 1e9, &mut norm).expect("clip");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, "grad_norm_cpu", &Device::Cpu, &[1 << 20; 16]);
    if let Ok(gpu) = Device::cuda(0) {
        let mut sizes = vec![50257 * 768, 1024 * 768];
        sizes.extend(std::iter::repeat_n(768 * 3072, 48));
        bench_device(c, "grad_norm_gpu", &gpu, &sizes);
    }
}

criterion_group!(grad_norm, benches);
criterion_main!(grad_norm);
