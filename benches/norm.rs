//! Criterion benchmarks of LayerNorm with the fused residual add and of RMSNorm, forward and
//! backward, bf16, width 768, on the CPU (and on the GPU when one is present).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops::{self, NormConfig, NormGrads, NormParams, NormStats};
use tessera::{DType, Device, Tensor};

fn filled(shape: &[usize], device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<bf16> = (0..n as u32)
        .map(|i| bf16::from_f32((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    Tensor::from_vec(values, shape, device).expect("benchmark input")
}

fn bench_device(c: &mut Criterion, name: &str, device: &Device, rows: usize) {
    let width = 768;
    let shape = [rows, width];
    let (x, residual, d_out) = (filled(&shape, device), filled(&shape, device), filled(&shape, device));
    let (weight, bias) = (filled(&[width], device), filled(&[width], device));
    let (mut out, mut sum, mut d_input) = (filled(&shape, device), filled(&shape, device), filled(&shape, device));
    let mut stats = NormStats::new(rows, device).expect("stats");
    let mut d_weight = Tensor::zeros(&[width], DType::F32, device).expect("d_weight");
    let mut d_bias = Tensor::zeros(&[width], DType::F32, device).expect("d_bias");
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for config in [NormConfig::layer_norm(1e-5), NormConfig::rms_norm(1e-5)] {
        let params = NormParams {
            weight: &weight,
            bias: Some(&bias),
        };
        let kind = format!("{:?}", config.kind).to_lowercase();
        group.throughput(Throughput::Bytes((4 * rows * width * 2) as u64));
        group.bench_function(format!("{kind}_residual_forward_{rows}x{width}"), |b| {
            b.iter(|| {
                ops::norm_forward_into(&config, &x, Some((&residual, &mut sum)), params, &mut out, &mut stats)
                    .expect("norm");
                device.synchronize().expect("synchronize");
            })
        });
        group.throughput(Throughput::Bytes((3 * rows * width * 2) as u64));
        group.bench_function(format!("{kind}_backward_{rows}x{width}"), |b| {
            b.iter(|| {
                let grads = NormGrads {
                    d_input: &mut d_input,
                    d_weight: &mut d_weight,
                    d_bias: Some(&mut d_bias),
                    accumulate: false,
                };
                ops::norm_backward_into(&config, &d_out, None, &sum, params, &stats, grads).expect("norm backward");
                device.synchronize().expect("synchronize");
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, "norm_cpu", &Device::Cpu, 2048);
    if let Ok(gpu) = Device::cuda(0) {
        bench_device(c, "norm_gpu", &gpu, 16384);
    }
}

criterion_group!(norm, benches);
criterion_main!(norm);
