//! Criterion benchmark of copy_columns: a fused query-key-value output split into its three
//! parts, bf16, 4096 x (3 x 768) on the CPU and GPT-2 small's 16384 rows on the GPU when one is
//! present. Throughput counts each byte read once and written once.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use tessera::ops::copy_columns;
use tessera::{DType, Device, Tensor};

fn bench_split(c: &mut Criterion, group_name: &str, device: &Device, rows: usize, part: usize) {
    let bytes: Vec<u8> = (0..rows * 3 * part * 2).map(|i| (i * 131 % 251) as u8).collect();
    let fused = Tensor::from_bytes(&bytes, DType::BF16, &[rows, 3 * part], device).expect("input");
    let mut parts: Vec<Tensor> = (0..3)
        .map(|_| Tensor::zeros(&[rows, part], DType::BF16, device).expect("output"))
        .collect();
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(2 * bytes.len() as u64));
    group.bench_function(format!("split_{rows}x3x{part}"), |bencher| {
        bencher.iter(|| {
            for (index, out) in parts.iter_mut().enumerate() {
                copy_columns(&fused, index * part, out, 0, part).expect("copy");
            }
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_split(c, "columns_cpu", &Device::Cpu, 4096, 768);
    if let Ok(gpu) = Device::cuda(0) {
        bench_split(c, "columns_gpu", &gpu, 16384, 768);
    }
}

criterion_group!(columns, benches);
criterion_main!(columns);
