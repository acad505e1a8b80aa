//! Criterion benchmarks of attention (causal, bf16) forward and forward+backward, the Λ mask with
//! RoPE inside and LM-Infinite's distance ceiling, and RoPE:
//! (1, 512, 4, 64) on the CPU, (4, 2048, 16, 128) on the GPU when one is present (the
//! CUDA-event benchmark beside PyTorch is `tessera bench --only attention`).

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use std::time::Duration;
use tessera::ops::rope::{RopeConfig, RopeConvention};
use tessera::ops::{
    attention_backward, attention_forward, rope_forward, AttentionMask, AttentionOptions, AttentionRope,
};
use tessera::{Device, Tensor};

fn tensor(shape: &[usize], salt: u32, device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<bf16> = (0..n as u32)
        .map(|i| bf16::from_f32((i.wrapping_add(salt).wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    Tensor::from_vec(values, shape, device).expect("input")
}

fn bench_attention(c: &mut Criterion, group_name: &str, device: &Device, shape: [usize; 4]) {
    let [batch, seq, heads, head_dim] = shape;
    let (q, k, v, d_out) = (
        tensor(&shape, 1, device),
        tensor(&shape, 2, device),
        tensor(&shape, 3, device),
        tensor(&shape, 4, device),
    );
    let options = AttentionOptions {
        mask: AttentionMask::Causal,
        ..Default::default()
    };
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let name = format!("{batch}x{seq}x{heads}x{head_dim}");
    group.bench_function(format!("causal_forward_{name}"), |bencher| {
        bencher.iter(|| {
            attention_forward(&q, &k, &v, &options).expect("forward");
            device.synchronize().expect("synchronize");
        })
    });
    group.bench_function(format!("causal_forward_backward_{name}"), |bencher| {
        bencher.iter(|| {
            let (out, lse) = attention_forward(&q, &k, &v, &options).expect("forward");
            attention_backward(&d_out, &q, &k, &v, &out, &lse, &options).expect("backward");
            device.synchronize().expect("synchronize");
        })
    });
    let config = RopeConfig::single(head_dim, 10000.0, RopeConvention::RotateHalf).expect("rope");
    // LM-Infinite's shape at this length: a window of seq/4 with its ceiling, 4 global tokens.
    let ceiling = AttentionOptions {
        mask: AttentionMask::Lambda {
            global: 4,
            window: seq / 4,
        },
        rope: Some(AttentionRope {
            config: config.clone(),
            distance_ceiling: Some(seq / 4),
        }),
        ..Default::default()
    };
    group.bench_function(format!("lambda_ceiling_forward_backward_{name}"), |bencher| {
        bencher.iter(|| {
            let (out, lse) = attention_forward(&q, &k, &v, &ceiling).expect("forward");
            attention_backward(&d_out, &q, &k, &v, &out, &lse, &ceiling).expect("backward");
            device.synchronize().expect("synchronize");
        })
    });
    let positions: Vec<u32> = (0..batch * seq).map(|t| (t % seq) as u32).collect();
    let positions = Tensor::from_vec(positions, &[batch, seq], device).expect("positions");
    group.bench_function(format!("rope_{name}"), |bencher| {
        bencher.iter(|| {
            rope_forward(&q, &positions, &config).expect("rope");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_attention(c, "attention_cpu", &Device::Cpu, [1, 512, 4, 64]);
    if let Ok(gpu) = Device::cuda(0) {
        bench_attention(c, "attention_gpu", &gpu, [4, 2048, 16, 128]);
    }
}

criterion_group!(attention, benches);
criterion_main!(attention);
