//! Criterion benchmarks of GELU (tanh) and SwiGLU, forward and backward, bf16, on the CPU (and on
//! the GPU when one is present). Throughput counts the bytes each must move.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::Duration;
use tessera::ops;
use tessera::{Device, Tensor};

fn filled(shape: &[usize], device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<bf16> = (0..n as u32)
        .map(|i| bf16::from_f32((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 500.0 - 2.0))
        .collect();
    Tensor::from_vec(values, shape, device).expect("benchmark input")
}

fn bench_device(c: &mut Criterion, name: &str, device: &Device, rows: usize) {
    let width = 3072;
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let x = filled(&[rows, width], device);
    let mut out = filled(&[rows, width], device);
    let d_out = filled(&[rows, width], device);
    let mut d_x = filled(&[rows, width], device);
    group.throughput(Throughput::Bytes((4 * rows * width) as u64));
    group.bench_function(format!("gelu_forward_{rows}x{width}"), |b| {
        b.iter(|| {
            ops::gelu_forward_into(&x, &mut out).expect("gelu");
            device.synchronize().expect("synchronize");
        })
    });
    group.throughput(Throughput::Bytes((6 * rows * width) as u64));
    group.bench_function(format!("gelu_backward_{rows}x{width}"), |b| {
        b.iter(|| {
            ops::gelu_backward_into(&x, &d_out, &mut d_x).expect("gelu backward");
            device.synchronize().expect("synchronize");
        })
    });
    let half = width / 2;
    let mut swiglu_out = filled(&[rows, half], device);
    let swiglu_d_out = filled(&[rows, half], device);
    group.throughput(Throughput::Bytes((3 * rows * width) as u64));
    group.bench_function(format!("swiglu_forward_{rows}x{width}"), |b| {
        b.iter(|| {
            ops::swiglu_forward_into(&x, &mut swiglu_out).expect("swiglu");
            device.synchronize().expect("synchronize");
        })
    });
    group.throughput(Throughput::Bytes((5 * rows * width) as u64));
    group.bench_function(format!("swiglu_backward_{rows}x{width}"), |b| {
        b.iter(|| {
            ops::swiglu_backward_into(&x, &swiglu_d_out, &mut d_x).expect("swiglu backward");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, "activation_cpu", &Device::Cpu, 512);
    if let Ok(gpu) = Device::cuda(0) {
        bench_device(c, "activation_gpu", &gpu, 16384);
    }
}

criterion_group!(activation, benches);
criterion_main!(activation);
