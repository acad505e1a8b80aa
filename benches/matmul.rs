//! Criterion benchmarks of dense matmul: f32 on the CPU at 1024³ and 2048³ (compared with
//! OpenBLAS through numpy by scripts/cpu-bench), bf16 on the CPU at 512³, and bf16 on the GPU
//! when one is present (the CUDA-event benchmark beside PyTorch is `tessera bench`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tessera::ops::{matmul_into, MatmulOptions};
use tessera::{DType, Device, Tensor};

fn random(shape: &[usize], dtype: DType, seed: u32, device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n as u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let tensor = match dtype {
        DType::BF16 => Tensor::from_vec(values.into_iter().map(half::bf16::from_f32).collect(), shape, device),
        DType::F16 => Tensor::from_vec(values.into_iter().map(half::f16::from_f32).collect(), shape, device),
        _ => Tensor::from_vec(values, shape, device),
    };
    tensor.expect("benchmark input")
}

fn bench_square(c: &mut Criterion, group_name: &str, device: &Device, dtype: DType, sizes: &[usize]) {
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for &n in sizes {
        let a = random(&[n, n], dtype, 1, device);
        let b = random(&[n, n], dtype, 2, device);
        let mut out = Tensor::zeros(&[n, n], dtype, device).expect("output");
        group.throughput(Throughput::Elements(2 * (n * n * n) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bencher, _| {
            bencher.iter(|| {
                matmul_into(&a, &b, None, &mut out, MatmulOptions::default()).expect("matmul");
                device.synchronize().expect("synchronize");
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_square(c, "matmul_cpu_f32", &Device::Cpu, DType::F32, &[1024, 2048]);
    bench_square(c, "matmul_cpu_bf16", &Device::Cpu, DType::BF16, &[512]);
    if let Ok(gpu) = Device::cuda(0) {
        bench_square(c, "matmul_gpu_bf16", &gpu, DType::BF16, &[4096, 8192]);
    }
}

criterion_group!(matmul, benches);
criterion_main!(matmul);
