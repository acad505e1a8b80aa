//! Decode attention against the cache and the cache row write (src/ops/attention_decode.rs)
//! against f64 references computed on the host from the exact input values, on every device:
//! every mask, grouped heads, head dims from 8 to 256, positions from 0 to the last row, key
//! counts that are not multiples of the kernel's 32 key groups, NaN-poisoned outputs checked
//! element by element, and the argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::{attention_decode_into, decode_positions_advance, kv_append_into, AttentionMask, AttentionOptions};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_decode,
    every_mask_f32,
    every_mask_bf16,
    every_mask_f16,
    head_dims_and_groups,
    positions_up_to_the_last_row,
    append_writes_one_row,
    positions_advance_by_one,
    errors_name_the_argument,
);

/// The keys position `p` sees under `mask` (module documentation's runs).
fn visible(mask: AttentionMask, p: usize) -> Vec<usize> {
    (0..=p)
        .filter(|&j| match mask {
            AttentionMask::None | AttentionMask::Causal => true,
            AttentionMask::Window { left, .. } => j + left >= p,
            AttentionMask::Lambda { global, window } => j < global || p - j < window,
        })
        .collect()
}

/// The f64 reference: softmax over the visible keys of `scale · q·k`, per query head.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    heads: usize,
    heads_kv: usize,
    d: usize,
    p: usize,
    mask: AttentionMask,
) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    let row = heads_kv * d;
    let keys = visible(mask, p);
    let mut out = vec![0.0; heads * d];
    for h in 0..heads {
        let kv = h / (heads / heads_kv);
        let scores: Vec<f64> = keys
            .iter()
            .map(|&j| (0..d).map(|i| q[h * d + i] * k[j * row + kv * d + i]).sum::<f64>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (w, &j) in weights.iter().zip(&keys) {
            for i in 0..d {
                out[h * d + i] += w / total * v[j * row + kv * d + i];
            }
        }
    }
    out
}

/// One call on random inputs with a NaN-poisoned output, checked against the reference.
#[allow(clippy::too_many_arguments)]
fn check<T: Float>(
    device: &Device,
    rng: &mut StdRng,
    heads: usize,
    heads_kv: usize,
    d: usize,
    capacity: usize,
    p: usize,
    mask: AttentionMask,
) {
    let q: Vec<T> = uniform(rng, heads * d);
    let k: Vec<T> = uniform(rng, capacity * heads_kv * d);
    let v: Vec<T> = uniform(rng, capacity * heads_kv * d);
    let to = |x: &[T], shape: &[usize]| Tensor::from_slice(x, shape, device).unwrap();
    let (qt, kt, vt) = (
        to(&q, &[heads, d]),
        to(&k, &[capacity, heads_kv * d]),
        to(&v, &[capacity, heads_kv * d]),
    );
    let position = Tensor::from_vec(vec![p as u32, 7], &[2], device).unwrap();
    let mut out = Tensor::from_vec(vec![T::from_f32(f32::NAN); heads * d], &[heads, d], device).unwrap();
    let options = AttentionOptions {
        mask,
        ..AttentionOptions::default()
    };
    attention_decode_into(&qt, &kt, &vt, &position, &options, &mut out).unwrap();
    let expected = reference(
        &common::to_f64(&q),
        &common::to_f64(&k),
        &common::to_f64(&v),
        heads,
        heads_kv,
        d,
        p,
        mask,
    );
    let got = values::<T>(&out);
    assert!(got.iter().all(|x| x.is_finite()), "unwritten or NaN output");
    let tolerance = if T::DTYPE == DType::F32 { 1e-5 } else { 8e-3 };
    let what = format!("{:?} heads {heads}/{heads_kv} d {d} p {p} {mask:?}", T::DTYPE);
    assert_close(&what, &got, &expected, tolerance);
    // Element-wise: each output is a convex combination of values in [-1, 1].
    let bound = if T::DTYPE == DType::F32 { 1e-5 } else { 1e-2 };
    for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() <= bound, "{what}: element {i}: {a} vs {b}");
    }
}

fn masks() -> [AttentionMask; 5] {
    [
        AttentionMask::None,
        AttentionMask::Causal,
        AttentionMask::Window { left: 6, right: 0 },
        AttentionMask::Lambda { global: 3, window: 5 },
        AttentionMask::Lambda { global: 40, window: 1 },
    ]
}

fn small_decode(device: &Device) {
    let mut rng = common::rng();
    check::<bf16>(device, &mut rng, 4, 2, 16, 9, 7, AttentionMask::Causal);
}

fn every_mask<T: Float>(device: &Device) {
    let mut rng = common::rng();
    if device.is_cuda() && T::DTYPE == DType::F32 {
        return;
    }
    for mask in masks() {
        for p in [0, 1, 16, 33, 112] {
            check::<T>(device, &mut rng, 6, 3, 64, 113, p, mask);
        }
    }
}

fn every_mask_f32(device: &Device) {
    every_mask::<f32>(device);
}

fn every_mask_bf16(device: &Device) {
    every_mask::<bf16>(device);
}

fn every_mask_f16(device: &Device) {
    every_mask::<f16>(device);
}

/// Head dims from 8 to 256 (the kernel's one to four chunks per lane, partly filled), multi-,
/// grouped- and multi-query heads, one and seven query heads.
fn head_dims_and_groups(device: &Device) {
    let mut rng = common::rng();
    for d in [8, 24, 64, 72, 128, 200, 256] {
        for (heads, heads_kv) in [(1, 1), (7, 7), (6, 2), (7, 1)] {
            check::<bf16>(device, &mut rng, heads, heads_kv, d, 37, 36, AttentionMask::Causal);
        }
    }
}

/// Key counts around the kernel's rounds of 32, up to the last row of the cache; a position past
/// the cache reads up to its last row.
fn positions_up_to_the_last_row(device: &Device) {
    let mut rng = common::rng();
    for p in [30, 31, 32, 63, 64, 1022, 1024] {
        check::<bf16>(device, &mut rng, 2, 1, 64, 1025, p, AttentionMask::Causal);
    }
    let mut rng2 = common::rng();
    let d = 8;
    let q: Vec<bf16> = uniform(&mut rng2, d);
    let k: Vec<bf16> = uniform(&mut rng2, 5 * d);
    let v: Vec<bf16> = uniform(&mut rng2, 5 * d);
    let to = |x: &[bf16], shape: &[usize]| Tensor::from_slice(x, shape, device).unwrap();
    let run = |p: u32| {
        let position = Tensor::from_vec(vec![p], &[1], device).unwrap();
        let mut out = to(&[bf16::NAN; 8], &[1, d]);
        attention_decode_into(
            &to(&q, &[1, d]),
            &to(&k, &[5, d]),
            &to(&v, &[5, d]),
            &position,
            &AttentionOptions::default(),
            &mut out,
        )
        .unwrap();
        values::<bf16>(&out)
    };
    assert_eq!(run(9), run(4));
}

/// The row at the position is written, every other row is left as it was, and a position past
/// the cache writes nothing.
fn append_writes_one_row(device: &Device) {
    let mut rng = common::rng();
    let (capacity, width) = (17, 113);
    for dtype in [DType::F32, DType::BF16] {
        if device.is_cuda() && dtype == DType::F32 {
            continue;
        }
        let store: Vec<f32> = uniform(&mut rng, capacity * width);
        let new: Vec<f32> = uniform(&mut rng, width);
        for p in [0usize, 7, 16, 17, 100] {
            let mut s = Tensor::from_slice(&store, &[capacity, width], &Device::Cpu).unwrap();
            let mut n = Tensor::from_slice(&new, &[1, width], &Device::Cpu).unwrap();
            if dtype == DType::BF16 {
                s = Tensor::from_vec(
                    store.iter().map(|&x| bf16::from_f32(x)).collect(),
                    &[capacity, width],
                    &Device::Cpu,
                )
                .unwrap();
                n = Tensor::from_vec(
                    new.iter().map(|&x| bf16::from_f32(x)).collect(),
                    &[1, width],
                    &Device::Cpu,
                )
                .unwrap();
            }
            let before = common::bytes(&s);
            let mut s = s.to_device(device).unwrap();
            let n = n.to_device(device).unwrap();
            let position = Tensor::from_vec(vec![p as u32], &[1], device).unwrap();
            kv_append_into(&n, &mut s, &position).unwrap();
            let after = common::bytes(&s);
            let row = width * dtype.size_in_bytes();
            let new_bytes = common::bytes(&n);
            for r in 0..capacity {
                let range = r * row..(r + 1) * row;
                if r == p {
                    assert_eq!(after[range], new_bytes[..], "row {r}");
                } else {
                    assert_eq!(
                        after[range.clone()],
                        before[range],
                        "row {r} changed ({dtype:?}, p {p})"
                    );
                }
            }
        }
    }
}

/// Every position moves on by one (wrapping at 2^32, as the kernel's u32 add does), 1 to 1025
/// of them; an empty tensor is no error; another dtype is.
fn positions_advance_by_one(device: &Device) {
    for n in [0usize, 1, 7, 256, 1025] {
        let mut start: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        if n > 0 {
            start[n - 1] = u32::MAX;
        }
        let mut positions = Tensor::from_vec(start.clone(), &[n], device).unwrap();
        decode_positions_advance(&mut positions).unwrap();
        decode_positions_advance(&mut positions).unwrap();
        let expected: Vec<u32> = start.iter().map(|p| p.wrapping_add(2)).collect();
        assert_eq!(positions.to_vec::<u32>().unwrap(), expected, "{n} positions");
    }
    let mut wrong = Tensor::zeros(&[3], DType::F32, device).unwrap();
    assert_invalid(
        decode_positions_advance(&mut wrong),
        "decode_positions_advance",
        "positions",
        &[],
    );
}

fn errors_name_the_argument(device: &Device) {
    let t = |shape: &[usize], dtype: DType| Tensor::zeros(shape, dtype, device).unwrap();
    let dt = DType::BF16;
    let position = Tensor::from_vec(vec![0u32], &[1], device).unwrap();
    let options = AttentionOptions::default();
    let (q, k, v) = (t(&[4, 16], dt), t(&[9, 32], dt), t(&[9, 32], dt));
    let mut out = t(&[4, 16], dt);
    let op = "attention_decode";
    assert_invalid(
        attention_decode_into(&t(&[4, 12], dt), &k, &v, &position, &options, &mut t(&[4, 12], dt)),
        op,
        "q",
        &["multiple of 8"],
    );
    assert_invalid(
        attention_decode_into(&q, &t(&[9, 48], dt), &t(&[9, 48], dt), &position, &options, &mut out),
        op,
        "keys",
        &["heads_kv"],
    );
    assert_invalid(
        attention_decode_into(&q, &k, &t(&[8, 32], dt), &position, &options, &mut out),
        op,
        "values",
        &[],
    );
    assert_invalid(
        attention_decode_into(&q, &k, &v, &t(&[1], DType::F32), &options, &mut out),
        op,
        "position",
        &[],
    );
    assert_invalid(
        attention_decode_into(&q, &k, &v, &position, &options, &mut t(&[4, 8], dt)),
        op,
        "out",
        &[],
    );
    let lambda = AttentionOptions {
        mask: AttentionMask::Lambda { global: 1, window: 0 },
        ..AttentionOptions::default()
    };
    assert_invalid(
        attention_decode_into(&q, &k, &v, &position, &lambda, &mut out),
        op,
        "mask",
        &[],
    );
    let before = common::bytes(&out);
    assert!(attention_decode_into(&q, &k, &v, &t(&[0], DType::U32), &options, &mut out).is_err());
    assert_eq!(common::bytes(&out), before, "an error wrote the output");
    let mut store = t(&[9, 32], dt);
    assert_invalid(
        kv_append_into(&t(&[1, 31], dt), &mut store, &position),
        "kv_append",
        "new",
        &[],
    );
    assert_invalid(
        kv_append_into(&t(&[1, 32], DType::F16), &mut store, &position),
        "kv_append",
        "new",
        &[],
    );
    assert_invalid(
        kv_append_into(&t(&[1, 32], dt), &mut store, &t(&[1], DType::U16)),
        "kv_append",
        "position",
        &[],
    );
}
