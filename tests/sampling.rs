//! Sampling (src/ops/sampling.rs) on every device and dtype: tokens against an f64 reference
//! that implements the documented definitions another way (by sorting), for many rows and
//! vocabularies; greedy ties; frequencies of many draws against the softmax (with and without
//! top-k and top-p); determinism in the seed and freshness in the offset; the documented RNG
//! bits; and the argument errors.

#[macro_use]
mod common;

use common::{assert_invalid, uniform_in, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::{sample, sample_into, sampling_uniform, SamplingOptions};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_sampling,
    matches_the_sorting_reference,
    greedy_takes_the_lowest_index_among_ties,
    frequencies_follow_the_softmax,
    seeds_and_offsets,
    errors_name_the_argument,
);

/// The documented definitions, by sorting, in f64: the token for one row.
fn reference(x: &[f64], options: &SamplingOptions, row: usize) -> u32 {
    let vocab = x.len();
    if options.temperature == 0.0 {
        let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        return x.iter().position(|&v| v == max).unwrap() as u32;
    }
    let mut sorted = x.to_vec();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let max = sorted[0];
    let t = options.temperature as f64;
    let weight = |v: f64| ((v - max) / t).exp();
    let mut keep: Vec<bool> = if options.top_k > 0 && options.top_k < vocab {
        let threshold = sorted[options.top_k - 1];
        x.iter().map(|&v| v >= threshold).collect()
    } else {
        vec![true; vocab]
    };
    if options.top_p < 1.0 {
        // Walk the kept tokens from the most probable down, a group of equal logits at a time:
        // each group sees the mass of the groups before it.
        let total: f64 = (0..vocab).filter(|&i| keep[i]).map(|i| weight(x[i])).sum();
        let limit = options.top_p as f64 * total;
        let mut order: Vec<usize> = (0..vocab).filter(|&i| keep[i]).collect();
        order.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap());
        let mut nucleus = vec![false; vocab];
        let mut above = 0.0;
        let mut start = 0;
        while start < order.len() {
            let end = start + order[start..].iter().take_while(|&&i| x[i] == x[order[start]]).count();
            if above < limit {
                for &i in &order[start..end] {
                    nucleus[i] = true;
                }
            }
            above += order[start..end].iter().map(|&i| weight(x[i])).sum::<f64>();
            start = end;
        }
        keep = nucleus;
    }
    let mass: f64 = (0..vocab).filter(|&i| keep[i]).map(|i| weight(x[i])).sum();
    let target = sampling_uniform(options.seed, options.offset, row as u64) as f64 * mass;
    let mut running = 0.0;
    let mut last = 0;
    for i in (0..vocab).filter(|&i| keep[i]) {
        running += weight(x[i]);
        last = i as u32;
        if running > target {
            return i as u32;
        }
    }
    last
}

fn options(temperature: f32, top_k: usize, top_p: f32) -> SamplingOptions {
    SamplingOptions {
        temperature,
        top_k,
        top_p,
        seed: 1234,
        offset: 7,
    }
}

/// Samples `rows` random rows and counts disagreements with the reference; f32 sums and the
/// reference's f64 ones may round a boundary differently, which random inputs essentially never
/// meet: at most one row in a thousand may differ.
fn check<T: Float>(device: &Device, rng: &mut StdRng, rows: usize, vocab: usize, o: SamplingOptions) {
    let x: Vec<T> = uniform_in(rng, rows * vocab, -6.0, 6.0);
    let logits = Tensor::from_slice(&x, &[rows, vocab], device).unwrap();
    let mut out = Tensor::zeros(&[rows], DType::U32, device).unwrap();
    out.fill_bytes(0xFF).unwrap();
    sample_into(&logits, &o, &mut out).unwrap();
    let got = out.to_vec::<u32>().unwrap();
    let xs = common::to_f64(&x);
    let differ = (0..rows)
        .filter(|&r| got[r] != reference(&xs[r * vocab..(r + 1) * vocab], &o, r))
        .count();
    assert!(
        got.iter().all(|&t| (t as usize) < vocab),
        "a token out of range: {got:?}"
    );
    assert!(
        differ * 1000 <= rows.max(1000) && (rows >= 1000 || differ == 0),
        "{} {rows}x{vocab} {o:?}: {differ} rows differ from the reference",
        T::DTYPE
    );
}

/// The kernel's smallest cases, for compute-sanitizer: greedy, top-k and top-p, both scans.
fn small_sampling(device: &Device) {
    let mut rng = common::rng();
    check::<f32>(device, &mut rng, 3, 7, SamplingOptions::greedy());
    check::<bf16>(device, &mut rng, 2, 600, options(0.8, 5, 0.9));
    check::<f16>(device, &mut rng, 2, 33, options(1.0, 0, 1.0));
}

fn matches_the_sorting_reference(device: &Device) {
    let mut rng = common::rng();
    for (rows, vocab) in [(1, 1), (5, 2), (7, 17), (3, 113), (4, 1023), (2, 1025), (2, 50304)] {
        for o in [
            SamplingOptions::greedy(),
            options(1.0, 0, 1.0),
            options(0.7, 1, 1.0),
            options(1.3, 10, 1.0),
            options(0.9, 0, 0.5),
            options(0.6, 40, 0.95),
            // top_k at and beyond the vocabulary keeps everything.
            options(1.0, vocab, 1.0),
            options(1.0, vocab + 5, 0.999),
        ] {
            check::<f32>(device, &mut rng, rows, vocab, o);
            check::<bf16>(device, &mut rng, rows, vocab, o);
        }
    }
    check::<f16>(device, &mut rng, 300, 64, options(0.8, 20, 0.9));
}

fn greedy_takes_the_lowest_index_among_ties(device: &Device) {
    let x = vec![0.0f32, 3.0, 1.0, 3.0, -1.0, 2.0, 3.0, 3.0];
    let logits = Tensor::from_vec(x, &[2, 4], device).unwrap();
    let tokens = sample(&logits, &SamplingOptions::greedy()).unwrap();
    assert_eq!(tokens.to_vec::<u32>().unwrap(), vec![1, 2]);
    // top_k = 1 keeps both tied maxima and draws between them.
    let tie = Tensor::from_vec(vec![5.0f32, 1.0, 5.0], &[1, 3], device).unwrap();
    let mut seen = [0usize; 3];
    for offset in 0..200 {
        let o = SamplingOptions {
            offset,
            ..options(1.0, 1, 1.0)
        };
        seen[sample(&tie, &o).unwrap().to_vec::<u32>().unwrap()[0] as usize] += 1;
    }
    assert!(
        seen[1] == 0 && seen[0] > 50 && seen[2] > 50,
        "top-1 among a tie: {seen:?}"
    );
}

/// 40000 draws (one per row of identical rows) against the restricted softmax: every
/// frequency within 5 standard deviations of its probability.
fn frequencies_follow_the_softmax(device: &Device) {
    let x = [1.0f64, 0.5, -0.3, 2.0, 0.0, 1.2];
    let rows = 40000;
    let logits: Vec<f32> = (0..rows).flat_map(|_| x.iter().map(|&v| v as f32)).collect();
    let logits = Tensor::from_vec(logits, &[rows, 6], device).unwrap();
    for o in [options(0.8, 0, 1.0), options(1.0, 3, 1.0), options(1.0, 0, 0.7)] {
        let tokens = sample(&logits, &o).unwrap().to_vec::<u32>().unwrap();
        let mut counts = [0usize; 6];
        for &t in &tokens {
            counts[t as usize] += 1;
        }
        // The restricted distribution: the reference's kept set with weights.
        let mut sorted = x.to_vec();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let w: Vec<f64> = x
            .iter()
            .map(|&v| ((v - sorted[0]) / o.temperature as f64).exp())
            .collect();
        let kept: Vec<bool> = (0..6)
            .map(|i| {
                let by_k = o.top_k == 0 || x[i] >= sorted[o.top_k - 1];
                let total: f64 = w.iter().sum();
                let above: f64 = (0..6).filter(|&j| x[j] > x[i]).map(|j| w[j]).sum();
                by_k && (o.top_p >= 1.0 || above < o.top_p as f64 * total)
            })
            .collect();
        let mass: f64 = (0..6).filter(|&i| kept[i]).map(|i| w[i]).sum();
        for i in 0..6 {
            let p = if kept[i] { w[i] / mass } else { 0.0 };
            let expected = p * rows as f64;
            let sigma = (rows as f64 * p * (1.0 - p)).sqrt().max(1.0);
            assert!(
                (counts[i] as f64 - expected).abs() <= 5.0 * sigma,
                "{o:?}: token {i} drawn {} times, expected {expected:.0} ± {sigma:.0}; counts {counts:?}",
                counts[i]
            );
        }
    }
}

fn seeds_and_offsets(device: &Device) {
    let mut rng = common::rng();
    let x: Vec<f32> = uniform_in(&mut rng, 64 * 100, -1.0, 1.0);
    let logits = Tensor::from_vec(x, &[64, 100], device).unwrap();
    let draw = |o: SamplingOptions| sample(&logits, &o).unwrap().to_vec::<u32>().unwrap();
    let base = options(1.0, 0, 1.0);
    assert_eq!(draw(base), draw(base), "the same seed and offset drew different tokens");
    assert_ne!(
        draw(base),
        draw(SamplingOptions { offset: 8, ..base }),
        "a new offset drew the same 64 tokens"
    );
    assert_ne!(
        draw(base),
        draw(SamplingOptions { seed: 99, ..base }),
        "a new seed drew the same 64 tokens"
    );
    // The generator's documented bits: splitmix64 chained as stated, top 24 bits.
    let splitmix = |z: u64| {
        let z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for (seed, offset, row) in [(0u64, 0u64, 0u64), (1234, 7, 3), (u64::MAX, 99, 1 << 40)] {
        let bits = splitmix(splitmix(seed ^ splitmix(offset)) ^ row) >> 40;
        assert_eq!(sampling_uniform(seed, offset, row), bits as f32 / 16_777_216.0);
    }
    assert!((0..10000)
        .map(|r| sampling_uniform(5, 6, r))
        .all(|u| (0.0..1.0).contains(&u)));
}

fn errors_name_the_argument(device: &Device) {
    let logits = Tensor::zeros(&[2, 5], DType::BF16, device).unwrap();
    for t in [-1.0, f32::NAN, f32::INFINITY] {
        assert_invalid(
            sample(&logits, &options(t, 0, 1.0)),
            "sample",
            "options.temperature",
            &[">= 0"],
        );
    }
    for p in [0.0, 1.5, f32::NAN] {
        assert_invalid(
            sample(&logits, &options(1.0, 0, p)),
            "sample",
            "options.top_p",
            &["(0, 1]"],
        );
    }
    let mut out = Tensor::zeros(&[3], DType::U32, device).unwrap();
    assert_invalid(
        sample_into(&logits, &options(1.0, 0, 1.0), &mut out),
        "sample",
        "out",
        &["[2]"],
    );
    let mut f32_out = Tensor::zeros(&[2], DType::F32, device).unwrap();
    assert_invalid(
        sample_into(&logits, &options(1.0, 0, 1.0), &mut f32_out),
        "sample",
        "out",
        &["u32"],
    );
    let ints = Tensor::zeros(&[2, 5], DType::U32, device).unwrap();
    assert_invalid(sample(&ints, &SamplingOptions::greedy()), "sample", "logits", &["u32"]);
    assert_eq!(
        out.to_vec::<u32>().unwrap(),
        vec![0; 3],
        "a failed call wrote its output"
    );
}
