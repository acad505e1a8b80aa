//! Criterion benchmarks of wavelet mixing (the spec's defaults: first half of the coordinates,
//! windows 2..seq), forward and backward: bf16 (2, 1024, 512) on the CPU, and the issue's
//! (8, 4096, 1024) on the GPU when one is present, with each box-window kernel (the CUDA-event
//! benchmark beside PyTorch is `tessera bench`). Throughput counts each element read once and
//! written once.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops::{set_wavelet_kernel, wavelet_backward_into, wavelet_forward_into, WaveletConfig, WaveletKernel};
use tessera::{Device, Tensor};

fn bench_wavelet(c: &mut Criterion, group_name: &str, device: &Device, shape: [usize; 3]) {
    let [batch, seq, dim] = shape;
    let config = WaveletConfig::paper_default(dim, seq).expect("config");
    let n = batch * seq * dim;
    let values: Vec<bf16> = (0..n as u32)
        .map(|i| bf16::from_f32((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    let x = Tensor::from_vec(values, &shape, device).expect("input");
    let mut out = Tensor::zeros(&shape, x.dtype(), device).expect("output");
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(4 * n as u64));
    group.bench_function(format!("forward_{batch}x{seq}x{dim}"), |bencher| {
        bencher.iter(|| {
            wavelet_forward_into(&x, None, &config, &mut out).expect("forward");
            device.synchronize().expect("synchronize");
        })
    });
    group.bench_function(format!("backward_{batch}x{seq}x{dim}"), |bencher| {
        bencher.iter(|| {
            wavelet_backward_into(&x, &config, &mut out).expect("backward");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_wavelet(c, "wavelet_cpu", &Device::Cpu, [2, 1024, 512]);
    if let Ok(gpu) = Device::cuda(0) {
        set_wavelet_kernel(WaveletKernel::Segments);
        bench_wavelet(c, "wavelet_gpu_segments", &gpu, [8, 4096, 1024]);
        set_wavelet_kernel(WaveletKernel::Tiles);
        bench_wavelet(c, "wavelet_gpu_tiles", &gpu, [8, 4096, 1024]);
        set_wavelet_kernel(WaveletKernel::Segments);
    }
}

criterion_group!(wavelet, benches);
criterion_main!(wavelet);
