//! Rotary position embedding (src/ops/rope.rs, ALGORITHMS.md §9) against an f64 reference on every
//! device: both pairings, one base and per-head bases (HARPE), positions up to 2^31, the
//! transposed rotation, round trips, the relative-position property, the base helpers and the
//! argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::rope::{RopeConfig, RopeConvention, HARPE_TABLE2_BASES};
use tessera::ops::{rope_backward, rope_forward};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_rope,
    forward_f32,
    forward_bf16,
    forward_f16,
    backward_matches_the_transpose,
    round_trip_at_large_positions,
    equal_bases_match_one_base_bit_for_bit,
    scores_depend_on_relative_position_only,
    harpe_table_and_uniform_bases,
    errors_name_the_argument,
);

const CONVENTIONS: [RopeConvention; 2] = [RopeConvention::RotateHalf, RopeConvention::Interleaved];

/// `R(p)·x` (or `R(p)ᵀ·x`) in f64, pair by pair, from the spec's formula.
fn reference(
    x: &[f64],
    positions: &[u32],
    heads: usize,
    d: usize,
    bases: &[f64],
    convention: RopeConvention,
    transpose: bool,
) -> Vec<f64> {
    let mut out = x.to_vec();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = bases[h * bases.len() / heads];
            for i in 0..d / 2 {
                let theta = base.powf(-2.0 * i as f64 / d as f64);
                let (s, c) = (p as f64 * theta).sin_cos();
                let s = if transpose { -s } else { s };
                let (ia, ib) = match convention {
                    RopeConvention::RotateHalf => (i, i + d / 2),
                    RopeConvention::Interleaved => (2 * i, 2 * i + 1),
                };
                let at = (t * heads + h) * d;
                let (a, b) = (x[at + ia], x[at + ib]);
                out[at + ia] = a * c - b * s;
                out[at + ib] = b * c + a * s;
            }
        }
    }
    out
}

fn positions_tensor(positions: &[u32], shape: &[usize], device: &Device) -> Tensor {
    Tensor::from_slice(positions, shape, device).unwrap()
}

/// Random positions below `limit`, plus 0 and `limit - 1`.
fn random_positions(rng: &mut StdRng, n: usize, limit: u32) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n).map(|_| rng.random_range(0..limit)).collect();
    p[0] = 0;
    if n > 1 {
        p[n - 1] = limit - 1;
    }
    p
}

/// Tolerance of one rotation rounded to `T`: the output rounding plus f32 arithmetic.
fn tolerance<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => 2e-6,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn check_forward<T: Float>(device: &Device) {
    let mut rng = common::rng();
    for &(batch, seq, heads, d, groups) in &[
        (1, 1, 1, 2, 1),
        (2, 17, 4, 64, 4),
        (1, 113, 6, 128, 3),
        (3, 7, 2, 34, 1),
        (1, 5, 32, 128, 32),
    ] {
        for convention in CONVENTIONS {
            let bases: Vec<f64> = if groups == 32 {
                HARPE_TABLE2_BASES.to_vec()
            } else {
                (0..groups).map(|_| rng.random_range(2.0..1e6)).collect()
            };
            let config = RopeConfig::new(d, bases.clone(), convention).unwrap();
            let x: Vec<T> = uniform(&mut rng, batch * seq * heads * d);
            let positions = random_positions(&mut rng, batch * seq, 1 << 17);
            let xt = Tensor::from_slice(&x, &[batch, seq, heads, d], device).unwrap();
            let pt = positions_tensor(&positions, &[batch, seq], device);
            let out = values::<T>(&rope_forward(&xt, &pt, &config).unwrap());
            let expected = reference(&common::to_f64(&x), &positions, heads, d, &bases, convention, false);
            let what = format!(
                "rope {:?} {batch}x{seq}x{heads}x{d} {groups} bases {}",
                convention,
                T::DTYPE
            );
            assert_close(&what, &out, &expected, tolerance::<T>());
        }
    }
}

fn small_rope(device: &Device) {
    let mut rng = common::rng();
    let config = RopeConfig::new(16, vec![10000.0, 500.0], RopeConvention::RotateHalf).unwrap();
    let x: Vec<bf16> = uniform(&mut rng, 3 * 4 * 16);
    let positions = [0u32, 5, 1 << 20];
    let xt = Tensor::from_slice(&x, &[3, 4, 16], device).unwrap();
    let pt = positions_tensor(&positions, &[3], device);
    let out = values::<bf16>(&rope_forward(&xt, &pt, &config).unwrap());
    let expected = reference(
        &common::to_f64(&x),
        &positions,
        4,
        16,
        config.bases(),
        RopeConvention::RotateHalf,
        false,
    );
    assert_close("small rope bf16", &out, &expected, 1e-2);
}

fn forward_f32(device: &Device) {
    check_forward::<f32>(device);
}

fn forward_bf16(device: &Device) {
    check_forward::<bf16>(device);
}

fn forward_f16(device: &Device) {
    check_forward::<f16>(device);
}

fn backward_matches_the_transpose(device: &Device) {
    let mut rng = common::rng();
    for convention in CONVENTIONS {
        let config = RopeConfig::new(64, vec![10000.0, 1e6], convention).unwrap();
        let g: Vec<f32> = uniform(&mut rng, 2 * 9 * 4 * 64);
        let positions = random_positions(&mut rng, 18, 4096);
        let gt = Tensor::from_slice(&g, &[2, 9, 4, 64], device).unwrap();
        let pt = positions_tensor(&positions, &[2, 9], device);
        let out = values::<f32>(&rope_backward(&gt, &pt, &config).unwrap());
        let expected = reference(&common::to_f64(&g), &positions, 4, 64, config.bases(), convention, true);
        assert_close(&format!("rope backward {convention:?}"), &out, &expected, 2e-6);
    }
}

fn round_trip_at_large_positions(device: &Device) {
    let mut rng = common::rng();
    for convention in CONVENTIONS {
        let config = RopeConfig::new(128, HARPE_TABLE2_BASES[..4].to_vec(), convention).unwrap();
        let x: Vec<f32> = uniform(&mut rng, 64 * 4 * 128);
        // Up to 131072 as the spec asks, and far beyond, where f32 angles would fail.
        let mut positions = random_positions(&mut rng, 64, 131073);
        positions[1] = u32::MAX;
        positions[2] = 1 << 31;
        let xt = Tensor::from_slice(&x, &[64, 4, 128], device).unwrap();
        let pt = positions_tensor(&positions, &[64], device);
        let rotated = rope_forward(&xt, &pt, &config).unwrap();
        let back = values::<f32>(&rope_backward(&rotated, &pt, &config).unwrap());
        assert_close(
            &format!("rope round trip {convention:?}"),
            &back,
            &common::to_f64(&x),
            1e-6,
        );
        // The forward at these positions also matches the f64 formula.
        let expected = reference(
            &common::to_f64(&x),
            &positions,
            4,
            128,
            config.bases(),
            convention,
            false,
        );
        assert_close("rope at large positions", &values::<f32>(&rotated), &expected, 2e-6);
    }
}

fn equal_bases_match_one_base_bit_for_bit(device: &Device) {
    let mut rng = common::rng();
    let x: Vec<bf16> = uniform(&mut rng, 5 * 8 * 64);
    let positions = random_positions(&mut rng, 5, 1000);
    let xt = Tensor::from_slice(&x, &[5, 8, 64], device).unwrap();
    let pt = positions_tensor(&positions, &[5], device);
    let one = RopeConfig::single(64, 10000.0, RopeConvention::RotateHalf).unwrap();
    let many = RopeConfig::new(64, vec![10000.0; 8], RopeConvention::RotateHalf).unwrap();
    let a = rope_forward(&xt, &pt, &one).unwrap().to_vec::<bf16>().unwrap();
    let b = rope_forward(&xt, &pt, &many).unwrap().to_vec::<bf16>().unwrap();
    assert_eq!(a, b);
}

fn scores_depend_on_relative_position_only(device: &Device) {
    let mut rng = common::rng();
    let d = 64;
    let config = RopeConfig::new(d, vec![10000.0, 5e5], RopeConvention::Interleaved).unwrap();
    let q: Vec<f32> = uniform(&mut rng, 2 * d);
    let k: Vec<f32> = uniform(&mut rng, 2 * d);
    // The same pair (m, n) shifted by several offsets: the score per head must not move.
    let shifts = [0u32, 1, 1000, 100_000];
    let mut scores = Vec::new();
    for shift in shifts {
        let (m, n) = (37 + shift, 5 + shift);
        let qt = Tensor::from_slice(&q, &[1, 2, d], device).unwrap();
        let kt = Tensor::from_slice(&k, &[1, 2, d], device).unwrap();
        let qr = rope_forward(&qt, &positions_tensor(&[m], &[1], device), &config)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let kr = rope_forward(&kt, &positions_tensor(&[n], &[1], device), &config)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let per_head: Vec<f64> = (0..2)
            .map(|h| (0..d).map(|i| qr[h * d + i] as f64 * kr[h * d + i] as f64).sum())
            .collect();
        scores.push(per_head);
    }
    for s in &scores[1..] {
        assert_close("score at a shifted pair", s, &scores[0], 1e-5);
    }
}

fn harpe_table_and_uniform_bases(_device: &Device) {
    assert_eq!(RopeConfig::uniform_bases(5, 1e6, 5e6), vec![1e6, 2e6, 3e6, 4e6, 5e6]);
    assert_eq!(RopeConfig::uniform_bases(1, 1e6, 5e6), vec![1e6]);
    assert_eq!(HARPE_TABLE2_BASES.len(), 32);
    assert_eq!(
        (HARPE_TABLE2_BASES[0], HARPE_TABLE2_BASES[4], HARPE_TABLE2_BASES[31]),
        (1.00e6, 2.17e6, 4.54e6)
    );
    assert!(HARPE_TABLE2_BASES.windows(2).all(|w| w[0] < w[1]));
    // Per head, the base index follows the head order.
    let config = RopeConfig::new(4, HARPE_TABLE2_BASES.to_vec(), RopeConvention::RotateHalf).unwrap();
    let frequencies = config.frequencies();
    assert_eq!(frequencies.len(), 64);
    assert_eq!(frequencies[2 * 7], 1.0);
    assert_eq!(frequencies[2 * 7 + 1], 1.0 / HARPE_TABLE2_BASES[7].sqrt());
}

fn errors_name_the_argument(device: &Device) {
    let new = "RopeConfig::new";
    assert_invalid(
        RopeConfig::new(7, vec![1e4], RopeConvention::RotateHalf),
        new,
        "head_dim",
        &["even", "7"],
    );
    assert_invalid(
        RopeConfig::new(0, vec![1e4], RopeConvention::RotateHalf),
        new,
        "head_dim",
        &["0"],
    );
    assert_invalid(
        RopeConfig::new(2048, vec![1e4], RopeConvention::RotateHalf),
        new,
        "head_dim",
        &["1024"],
    );
    assert_invalid(
        RopeConfig::new(8, vec![], RopeConvention::RotateHalf),
        new,
        "bases",
        &["none"],
    );
    assert_invalid(
        RopeConfig::new(8, vec![1e4, f64::NAN], RopeConvention::RotateHalf),
        new,
        "bases",
        &["NaN", "1"],
    );
    assert_invalid(
        RopeConfig::new(8, vec![0.5], RopeConvention::RotateHalf),
        new,
        "bases",
        &["0.5"],
    );

    let config = RopeConfig::new(8, vec![1e4, 1e5], RopeConvention::RotateHalf).unwrap();
    let x = Tensor::from_vec(vec![0.5f32; 3 * 4 * 8], &[3, 4, 8], device).unwrap();
    let p = positions_tensor(&[0, 1, 2], &[3], device);
    let (fwd, bwd) = ("rope", "rope_backward");
    let wrong_dim = Tensor::from_vec(vec![0.5f32; 3 * 4 * 6], &[3, 4, 6], device).unwrap();
    assert_invalid(
        rope_forward(&wrong_dim, &p, &config),
        fwd,
        "x",
        &["head_dim = 8", "[3, 4, 6]"],
    );
    let odd_heads = Tensor::from_vec(vec![0.5f32; 3 * 3 * 8], &[3, 3, 8], device).unwrap();
    assert_invalid(
        rope_forward(&odd_heads, &p, &config),
        fwd,
        "x",
        &["2 bases", "[3, 3, 8]"],
    );
    let rank1 = Tensor::from_vec(vec![0.5f32; 8], &[8], device).unwrap();
    assert_invalid(rope_forward(&rank1, &p, &config), fwd, "x", &["[8]"]);
    let ints = Tensor::from_vec(vec![1u32; 96], &[3, 4, 8], device).unwrap();
    assert_invalid(rope_forward(&ints, &p, &config), fwd, "x", &["u32"]);
    let short = positions_tensor(&[0, 1], &[2], device);
    assert_invalid(rope_forward(&x, &short, &config), fwd, "positions", &["[3]", "[2]"]);
    let float_positions = Tensor::from_vec(vec![0.0f32; 3], &[3], device).unwrap();
    assert_invalid(
        rope_backward(&x, &float_positions, &config),
        bwd,
        "positions",
        &["u32", "f32"],
    );
    assert_invalid(rope_backward(&wrong_dim, &p, &config), bwd, "d_y", &["[3, 4, 6]"]);
    if device.is_cuda() {
        let host_positions = positions_tensor(&[0, 1, 2], &[3], &Device::Cpu);
        assert_invalid(rope_forward(&x, &host_positions, &config), fwd, "positions", &["cpu"]);
    }
}
