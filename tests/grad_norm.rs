//! Global gradient norm and clipping (src/ops/grad_norm.rs) on every device: the norm of lists
//! mixing dtypes and awkward sizes against an f64 reference, clipping against the f64 scaled
//! values, no write when the norm is under the maximum or not finite, run-to-run bit identity,
//! and the argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, bytes, uniform, values};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::{clip_grad_norm, grad_norm_into};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_grad_norm,
    norm_of_mixed_lists,
    clipping_scales_every_tensor,
    no_clipping_under_the_maximum,
    non_finite_norm_leaves_gradients,
    repeated_runs_are_bit_identical,
    errors_name_the_argument,
);

/// Sizes around the 4096-element block, and an empty tensor.
const SIZES: [usize; 8] = [1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 0, 113];

fn random(device: &Device, rng: &mut StdRng, n: usize, dtype: DType) -> (Tensor, Vec<f64>) {
    match dtype {
        DType::F32 => {
            let v: Vec<f32> = uniform(rng, n);
            (Tensor::from_slice(&v, &[n], device).unwrap(), common::to_f64(&v))
        }
        DType::BF16 => {
            let v: Vec<bf16> = uniform(rng, n);
            (Tensor::from_slice(&v, &[n], device).unwrap(), common::to_f64(&v))
        }
        _ => {
            let v: Vec<f16> = uniform(rng, n);
            (Tensor::from_slice(&v, &[n], device).unwrap(), common::to_f64(&v))
        }
    }
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => values::<f32>(t),
        DType::BF16 => values::<bf16>(t),
        _ => values::<f16>(t),
    }
}

fn mixed_list(device: &Device, rng: &mut StdRng, sizes: &[usize]) -> (Vec<Tensor>, Vec<Vec<f64>>) {
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| random(device, rng, n, dtypes[i % 3]))
        .unzip()
}

fn reference_norm(values: &[Vec<f64>]) -> f64 {
    values.iter().flatten().map(|v| v * v).sum::<f64>().sqrt()
}

fn norm_tensor(device: &Device) -> Tensor {
    let mut t = Tensor::zeros(&[1], DType::F32, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

fn check_norm(device: &Device, rng: &mut StdRng, sizes: &[usize]) {
    let (tensors, vals) = mixed_list(device, rng, sizes);
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let mut norm = norm_tensor(device);
    grad_norm_into(&refs, &mut norm).unwrap();
    assert_close(
        &format!("norm of {sizes:?}"),
        &values::<f32>(&norm),
        &[reference_norm(&vals)],
        1e-6,
    );
}

/// The kernels' smallest case, for compute-sanitizer: partial block, several segments, clipping.
fn small_grad_norm(device: &Device) {
    let mut rng = common::rng();
    check_norm(device, &mut rng, &[5, 4100]);
    let (mut tensors, _) = mixed_list(device, &mut rng, &[3, 4097]);
    let mut refs: Vec<&mut Tensor> = tensors.iter_mut().collect();
    let mut norm = norm_tensor(device);
    clip_grad_norm(&mut refs, 0.5, &mut norm).unwrap();
}

fn norm_of_mixed_lists(device: &Device) {
    let mut rng = common::rng();
    check_norm(device, &mut rng, &SIZES);
    check_norm(device, &mut rng, &[1 << 20, 3, 768 * 768 + 1]);
    check_norm(device, &mut rng, &[0]);
    let mut norm = norm_tensor(device);
    grad_norm_into(&[], &mut norm).unwrap();
    assert_eq!(norm.to_vec::<f32>().unwrap(), vec![0.0]);
}

fn clipping_scales_every_tensor(device: &Device) {
    let mut rng = common::rng();
    let (mut tensors, vals) = mixed_list(device, &mut rng, &SIZES);
    let total = reference_norm(&vals);
    let max_norm = (total / 3.0) as f32;
    let mut norm = norm_tensor(device);
    let mut refs: Vec<&mut Tensor> = tensors.iter_mut().collect();
    clip_grad_norm(&mut refs, max_norm, &mut norm).unwrap();
    assert_close("clip norm", &values::<f32>(&norm), &[total], 1e-6);
    let scale = max_norm as f64 / (total + 1e-6);
    for (t, v) in tensors.iter().zip(&vals) {
        let tolerance = match t.dtype() {
            DType::F32 => 1e-6,
            DType::BF16 => 4e-3,
            _ => 1e-3,
        };
        let expected: Vec<f64> = v.iter().map(|x| x * scale).collect();
        if !expected.is_empty() {
            assert_close(
                &format!("clipped {} x{}", t.dtype(), t.numel()),
                &as_f64(t),
                &expected,
                tolerance,
            );
        }
    }
    let after: Vec<Vec<f64>> = tensors.iter().map(as_f64).collect();
    assert!((reference_norm(&after) - max_norm as f64).abs() < 1e-2 * max_norm as f64);
}

fn no_clipping_under_the_maximum(device: &Device) {
    let mut rng = common::rng();
    let (mut tensors, vals) = mixed_list(device, &mut rng, &SIZES);
    let before: Vec<Vec<u8>> = tensors.iter().map(bytes).collect();
    let mut norm = norm_tensor(device);
    let mut refs: Vec<&mut Tensor> = tensors.iter_mut().collect();
    clip_grad_norm(&mut refs, (reference_norm(&vals) * 2.0) as f32, &mut norm).unwrap();
    let after: Vec<Vec<u8>> = tensors.iter().map(bytes).collect();
    assert!(before == after, "gradients under the maximum norm were changed");
}

fn non_finite_norm_leaves_gradients(device: &Device) {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut a = Tensor::from_vec(vec![1.0f32, bad, 2.0], &[3], device).unwrap();
        let mut b = Tensor::from_vec(vec![bf16::from_f32(3.0); 5], &[5], device).unwrap();
        let before = (bytes(&a), bytes(&b));
        let mut norm = norm_tensor(device);
        clip_grad_norm(&mut [&mut a, &mut b], 1.0, &mut norm).unwrap();
        let got = norm.to_vec::<f32>().unwrap()[0];
        assert!(!got.is_finite(), "norm with {bad} is {got}");
        assert!((bytes(&a), bytes(&b)) == before, "gradients changed with a {bad} norm");
    }
}

fn repeated_runs_are_bit_identical(device: &Device) {
    let mut rng = common::rng();
    let (tensors, _) = mixed_list(device, &mut rng, &[1 << 18, 12345, 7]);
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let run = || {
        let mut norm = norm_tensor(device);
        grad_norm_into(&refs, &mut norm).unwrap();
        bytes(&norm)
    };
    assert_eq!(run(), run());
}

fn errors_name_the_argument(device: &Device) {
    let mut a = Tensor::zeros(&[4], DType::F32, device).unwrap();
    let ints = Tensor::zeros(&[4], DType::U32, device).unwrap();
    let mut norm = norm_tensor(device);
    assert_invalid(
        grad_norm_into(&[&a, &ints], &mut norm),
        "grad_norm",
        "tensors",
        &["u32", "tensors[1]"],
    );
    let mut wide = Tensor::zeros(&[2], DType::F32, device).unwrap();
    assert_invalid(grad_norm_into(&[&a], &mut wide), "grad_norm", "norm", &["[1]"]);
    let mut half_norm = Tensor::zeros(&[1], DType::BF16, device).unwrap();
    assert_invalid(grad_norm_into(&[&a], &mut half_norm), "grad_norm", "norm", &["f32"]);
    for bad in [f32::NAN, -1.0, f32::INFINITY] {
        assert_invalid(
            clip_grad_norm(&mut [&mut a], bad, &mut norm),
            "clip_grad_norm",
            "max_norm",
            &[">= 0"],
        );
    }
    assert!(values::<f32>(&norm)[0].is_nan(), "a failed call wrote the norm");
    if device.is_cuda() {
        let host = Tensor::zeros(&[4], DType::F32, &Device::Cpu).unwrap();
        assert_invalid(
            grad_norm_into(&[&a, &host], &mut norm),
            "grad_norm",
            "tensors",
            &["tensors[1]"],
        );
    }
}
