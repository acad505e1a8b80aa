//! SPDF's static mask (src/ops/spdf.rs, ALGORITHMS.md §11) on every device: the exact pruned
//! count, reproducibility from the seed, the mask applied in place bit for bit, masked AdamW
//! training that keeps pruned weights exactly 0 with weight decay on, densifying, and the
//! argument errors.

#[macro_use]
mod common;

use common::{assert_invalid, uniform, Float};
use half::{bf16, f16};
use tessera::ops::{adamw_step, matmul, spdf_apply_mask, AdamWConfig, AdamWTensor, MatmulOptions, StaticMask};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_spdf_mask,
    exact_count_and_seeded,
    apply_f32,
    apply_bf16,
    apply_f16,
    masked_training_keeps_zeros,
    densify_lets_pruned_weights_learn,
    errors_name_the_argument,
);

fn kept(mask: &StaticMask) -> Vec<u8> {
    mask.to_u8().unwrap().to_vec::<u8>().unwrap()
}

fn small_spdf_mask(device: &Device) {
    check_apply::<bf16>(device, 5, 70, 0.5);
}

fn exact_count_and_seeded(device: &Device) {
    for (rows, cols) in [(1, 1), (7, 45), (64, 33), (113, 128)] {
        for sparsity in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let mask = StaticMask::random(rows, cols, sparsity, 42, device).unwrap();
            let flags = kept(&mask);
            let pruned = flags.iter().filter(|&&k| k == 0).count();
            let expected = (sparsity * (rows * cols) as f64).round() as usize;
            assert_eq!(pruned, expected, "{rows}x{cols} at {sparsity}");
            assert_eq!(mask.pruned_count(), expected);
            assert_eq!(mask.bits().shape(), &[rows, cols.div_ceil(32)]);
            // The same seed gives the same mask on the CPU; another seed another one.
            let again = StaticMask::random(rows, cols, sparsity, 42, &Device::Cpu).unwrap();
            assert_eq!(kept(&again), flags);
            if rows * cols > 100 && sparsity == 0.5 {
                let other = StaticMask::random(rows, cols, sparsity, 43, device).unwrap();
                assert_ne!(kept(&other), flags);
            }
        }
    }
}

fn check_apply<T: Float>(device: &Device, rows: usize, cols: usize, sparsity: f64) {
    let mut rng = common::rng();
    let values: Vec<T> = uniform(&mut rng, rows * cols);
    let mask = StaticMask::random(rows, cols, sparsity, 7, device).unwrap();
    let mut t = Tensor::from_vec(values.clone(), &[rows, cols], device).unwrap();
    spdf_apply_mask(&mut t, &mask).unwrap();
    let got = common::bytes(&t);
    let expected: Vec<T> = values
        .iter()
        .zip(kept(&mask))
        .map(|(&v, k)| if k == 1 { v } else { T::from_f32(0.0) })
        .collect();
    let expected = common::bytes(&Tensor::from_vec(expected, &[rows, cols], &Device::Cpu).unwrap());
    assert_eq!(got, expected, "{} {rows}x{cols}", T::DTYPE);
}

fn apply_f32(device: &Device) {
    check_apply::<f32>(device, 17, 1025, 0.75);
}

fn apply_bf16(device: &Device) {
    check_apply::<bf16>(device, 113, 64, 0.5);
}

fn apply_f16(device: &Device) {
    check_apply::<f16>(device, 1, 7, 0.5);
}

fn masked_training_keeps_zeros(device: &Device) {
    let mut rng = common::rng();
    let (rows, cols) = (16, 40);
    let mask = StaticMask::random(rows, cols, 0.75, 3, device).unwrap();
    let flags = kept(&mask);
    let mut w = Tensor::from_vec(uniform::<f32>(&mut rng, rows * cols), &[rows, cols], device).unwrap();
    spdf_apply_mask(&mut w, &mask).unwrap();
    let initial = w.to_vec::<f32>().unwrap();
    let mut m = Tensor::zeros(&[rows, cols], DType::F32, device).unwrap();
    let mut v = Tensor::zeros(&[rows, cols], DType::F32, device).unwrap();
    let config = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    for step in 1..=20 {
        let mut grad = Tensor::from_vec(uniform::<f32>(&mut rng, rows * cols), &[rows, cols], device).unwrap();
        spdf_apply_mask(&mut grad, &mask).unwrap();
        let mut tensors = [AdamWTensor {
            param: &mut w,
            grad: &grad,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            param_bf16: None,
            weight_decay: true,
        }];
        adamw_step(&mut tensors, &config, step, 1.0).unwrap();
        let now = w.to_vec::<f32>().unwrap();
        for (i, (&value, &k)) in now.iter().zip(&flags).enumerate() {
            if k == 0 {
                assert_eq!(value.to_bits(), 0, "pruned weight {i} moved at step {step}");
            }
        }
    }
    let trained = w.to_vec::<f32>().unwrap();
    let moved = trained
        .iter()
        .zip(&initial)
        .zip(&flags)
        .filter(|((a, b), &k)| k == 1 && a != b)
        .count();
    assert_eq!(
        moved,
        flags.iter().filter(|&&k| k == 1).count(),
        "every kept weight trains"
    );
}

fn densify_lets_pruned_weights_learn(device: &Device) {
    let mut rng = common::rng();
    let (m, rows, cols) = (9, 8, 24);
    let mask = StaticMask::random(rows, cols, 0.5, 11, device).unwrap();
    let flags = kept(&mask);
    let mut w = Tensor::from_vec(uniform::<f32>(&mut rng, rows * cols), &[rows, cols], device).unwrap();
    spdf_apply_mask(&mut w, &mask).unwrap();
    let x = Tensor::from_vec(uniform::<f32>(&mut rng, m * cols), &[m, cols], device).unwrap();
    let dy = Tensor::from_vec(uniform::<f32>(&mut rng, m * rows), &[m, rows], device).unwrap();
    // The sparse layer's forward is the dense one on the masked weight: after the switch the
    // output is the same, bit for bit.
    let sparse_y = matmul(&x, &w, None, MatmulOptions::linear()).unwrap();
    let dense_w = w.to_device(device).unwrap();
    let dense_y = matmul(&x, &dense_w, None, MatmulOptions::linear()).unwrap();
    assert_eq!(common::bytes(&sparse_y), common::bytes(&dense_y));
    // Sparse phase: the masked gradient is 0 at pruned positions; dense phase: it is not.
    let transposed = MatmulOptions {
        trans_a: true,
        ..Default::default()
    };
    let mut masked = matmul(&dy, &x, None, transposed).unwrap();
    spdf_apply_mask(&mut masked, &mask).unwrap();
    let dense = matmul(&dy, &x, None, transposed).unwrap().to_vec::<f32>().unwrap();
    let masked = masked.to_vec::<f32>().unwrap();
    for (i, &k) in flags.iter().enumerate() {
        if k == 0 {
            assert_eq!(masked[i], 0.0);
            assert_ne!(dense[i], 0.0, "pruned weight {i} gets a gradient once dense");
        } else {
            assert_eq!(masked[i], dense[i]);
        }
    }
}

fn errors_name_the_argument(device: &Device) {
    let op = "StaticMask::random";
    assert_invalid(
        StaticMask::random(4, 4, 1.5, 0, device),
        op,
        "sparsity",
        &["[0, 1]", "1.5"],
    );
    assert_invalid(StaticMask::random(4, 4, -0.1, 0, device), op, "sparsity", &["[0, 1]"]);
    assert_invalid(StaticMask::random(0, 4, 0.5, 0, device), op, "rows", &["0x4"]);
    let mask = StaticMask::random(4, 8, 0.5, 0, device).unwrap();
    let mut wrong = Tensor::zeros(&[4, 9], DType::F32, device).unwrap();
    assert_invalid(
        spdf_apply_mask(&mut wrong, &mask),
        "spdf_apply_mask",
        "t",
        &["[4, 8]", "[4, 9]"],
    );
    let mut bytes = Tensor::zeros(&[4, 8], DType::U8, device).unwrap();
    assert_invalid(spdf_apply_mask(&mut bytes, &mask), "spdf_apply_mask", "t", &["u8"]);
}
