//! Criterion benchmarks of generation on the CPU with the tiny preset (its context raised to 256):
//! the prefill of a 128-token prompt, one decode step after it (eager and capturable), and 32 greedy tokens with the
//! key/value cache and with the forward rerun over the whole text for each token (the GPU
//! numbers beside Hugging Face's are `tessera bench --only generate`).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::time::Duration;
use tessera::model::generate::{generate_with, Sampling};
use tessera::model::{DecodeMode, Gpt, GptConfig, GptParams};
use tessera::Device;

fn bench_generation(c: &mut Criterion) {
    let config = GptConfig {
        context: 256,
        ..GptConfig::tiny()
    };
    let params = GptParams::init(&config, &Device::Cpu, 1).expect("parameters");
    let mut model = Gpt::new(params, 1, 1).expect("model");
    let prompt: Vec<u32> = (0..128u32).map(|i| i.wrapping_mul(2_654_435_761) % 256).collect();
    let mut group = c.benchmark_group("kv_cache_tiny");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("prefill_128", |bencher| {
        let mut cache = model.kv_cache(1).expect("cache");
        bencher.iter(|| model.prefill(&mut cache, &prompt).expect("prefill").numel())
    });
    group.bench_function("decode_step_at_128", |bencher| {
        bencher.iter_batched(
            || {
                let mut cache = model.kv_cache(1).expect("cache");
                model.prefill(&mut cache, &prompt).expect("prefill");
                cache
            },
            |mut cache| model.decode(&mut cache, &[7]).expect("decode").numel(),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("decode_step_capturable_at_128", |bencher| {
        bencher.iter_batched(
            || {
                let mut cache = model.kv_cache(1).expect("cache");
                cache.set_decode_mode(DecodeMode::Capturable).expect("mode");
                model.prefill(&mut cache, &prompt).expect("prefill");
                cache
            },
            |mut cache| model.decode(&mut cache, &[7]).expect("decode").numel(),
            BatchSize::LargeInput,
        )
    });
    for (name, cached) in [("generate_32_cached", true), ("generate_32_full_forward", false)] {
        group.bench_function(name, |bencher| {
            bencher.iter(|| generate_with(&mut model, &prompt, 32, &Sampling::greedy(), 0, cached).expect("generate"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_generation);
criterion_main!(benches);
