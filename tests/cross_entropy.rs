//! Fused softmax cross-entropy (src/ops/cross_entropy.rs) against an f64 reference computed from
//! the exact input values, on every device and dtype: per-row losses, their mean and the
//! gradient, written in place, into a separate tensor or not at all; vocabularies of awkward
//! sizes (odd ones take the kernel's one-element path, multiples of 8 the 16-byte path); the
//! ignore index; huge logits; finite differences of the f64 loss; and the argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_close_at_scale, assert_invalid, bytes, uniform_in, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::{
    cross_entropy, cross_entropy_fused_in_place, cross_entropy_fused_into, cross_entropy_into, CrossEntropyOptions,
    CrossEntropyOutputs,
};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_cross_entropy,
    all_forms_all_dtypes,
    ignore_index,
    every_row_ignored,
    huge_logits_are_safe,
    gpt2_vocabulary,
    gradient_matches_finite_differences,
    repeated_runs_are_bit_identical,
    out_of_range_targets,
    errors_name_the_argument,
);

/// The f64 reference: (per-row losses, mean, gradient of grad_scale·mean).
fn reference(x: &[f64], targets: &[u32], vocab: usize, options: &CrossEntropyOptions) -> (Vec<f64>, f64, Vec<f64>) {
    let ignored = |t: u32| options.ignore_index == Some(t);
    let count = targets.iter().filter(|&&t| !ignored(t)).count();
    let mut losses = vec![0.0; targets.len()];
    let mut grad = vec![0.0; x.len()];
    for (r, &t) in targets.iter().enumerate() {
        if ignored(t) {
            continue;
        }
        let row = &x[r * vocab..(r + 1) * vocab];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        losses[r] = lse - row[t as usize];
        for (i, v) in row.iter().enumerate() {
            let onehot = if i == t as usize { 1.0 } else { 0.0 };
            grad[r * vocab + i] = ((v - lse).exp() - onehot) * options.grad_scale as f64 / count as f64;
        }
    }
    let mean = losses.iter().sum::<f64>() / count as f64;
    (losses, mean, grad)
}

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut t = Tensor::zeros(shape, dtype, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    LossOnly,
    Into,
    InPlace,
}

fn grad_tolerance<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => 1e-5,
        DType::BF16 => 4e-3,
        _ => 1e-3,
    }
}

struct Case {
    rows: usize,
    vocab: usize,
    low: f32,
    high: f32,
    options: CrossEntropyOptions,
    /// Fraction of rows whose target is the ignore index.
    ignored: f64,
}

/// Runs one form on random logits and targets and checks every output against the reference.
fn check<T: Float>(device: &Device, rng: &mut StdRng, case: &Case, form: Form) {
    let Case { rows, vocab, .. } = *case;
    let x: Vec<T> = uniform_in(rng, rows * vocab, case.low, case.high);
    let targets: Vec<u32> = (0..rows)
        .map(|_| match case.options.ignore_index {
            Some(ignore) if rng.random_bool(case.ignored) => ignore,
            _ => rng.random_range(0..vocab as u32),
        })
        .collect();
    let xs = common::to_f64(&x);
    let (ref_losses, ref_mean, ref_grad) = reference(&xs, &targets, vocab, &case.options);
    let mut logits = Tensor::from_slice(&x, &[rows, vocab], device).unwrap();
    let targets_t = Tensor::from_slice(&targets, &[rows], device).unwrap();
    let mut losses = poisoned(&[rows], DType::F32, device);
    let mut mean = poisoned(&[1], DType::F32, device);
    let outputs = CrossEntropyOutputs {
        losses: &mut losses,
        mean: &mut mean,
    };
    let what = format!("{} {rows}x{vocab} {form:?} {:?}", T::DTYPE, case.options);
    let grad = match form {
        Form::LossOnly => {
            cross_entropy_into(&logits, &targets_t, &case.options, outputs).unwrap();
            assert_eq!(values::<T>(&logits), xs, "{what}: the logits changed");
            None
        }
        Form::Into => {
            let mut d = poisoned(&[rows, vocab], T::DTYPE, device);
            cross_entropy_fused_into(&logits, &targets_t, &case.options, outputs, &mut d).unwrap();
            assert_eq!(values::<T>(&logits), xs, "{what}: the logits changed");
            Some(values::<T>(&d))
        }
        Form::InPlace => {
            cross_entropy_fused_in_place(&mut logits, &targets_t, &case.options, outputs).unwrap();
            Some(values::<T>(&logits))
        }
    };
    // Losses are f32 arithmetic on exact inputs: far under 1e-4 relative to the log of the
    // vocabulary (their size), also where a loss is near 0.
    let scale = (vocab as f64).ln().max(1.0) * (rows as f64).sqrt();
    assert_close_at_scale(
        &format!("losses {what}"),
        &values::<f32>(&losses),
        &ref_losses,
        1e-5,
        scale,
    );
    let got_mean = values::<f32>(&mean)[0];
    assert!(
        (got_mean - ref_mean).abs() <= 1e-5 * ref_mean.abs().max((vocab as f64).ln()),
        "mean {what}: got {got_mean}, expected {ref_mean}"
    );
    if let Some(grad) = grad {
        // Each row's gradient sums to 0: measure against the size of its largest term.
        let grad_scale = case.options.grad_scale.abs() as f64 / rows as f64;
        assert_close_at_scale(
            &format!("gradient {what}"),
            &grad,
            &ref_grad,
            grad_tolerance::<T>(),
            grad_scale,
        );
    }
}

fn case(rows: usize, vocab: usize) -> Case {
    Case {
        rows,
        vocab,
        low: -4.0,
        high: 4.0,
        options: CrossEntropyOptions::default(),
        ignored: 0.0,
    }
}

/// The kernel's smallest cases, for compute-sanitizer: both paths, in place and not.
fn small_cross_entropy(device: &Device) {
    let mut rng = common::rng();
    check::<bf16>(device, &mut rng, &case(3, 64), Form::InPlace);
    check::<f32>(device, &mut rng, &case(2, 7), Form::Into);
    check::<f16>(device, &mut rng, &case(2, 40), Form::LossOnly);
}

fn all_forms_all_dtypes(device: &Device) {
    let mut rng = common::rng();
    for (rows, vocab) in [
        (1, 1),
        (1, 2),
        (7, 17),
        (3, 113),
        (5, 256),
        (2, 1023),
        (3, 1025),
        (17, 4096),
        (2, 9000),
    ] {
        for form in [Form::LossOnly, Form::Into, Form::InPlace] {
            check::<f32>(device, &mut rng, &case(rows, vocab), form);
            check::<bf16>(device, &mut rng, &case(rows, vocab), form);
            check::<f16>(device, &mut rng, &case(rows, vocab), form);
        }
    }
}

fn ignore_index(device: &Device) {
    let mut rng = common::rng();
    for ignore in [0u32, 5, u32::MAX] {
        let mut c = case(33, 120);
        c.options = CrossEntropyOptions {
            ignore_index: Some(ignore),
            grad_scale: 0.25,
        };
        c.ignored = 0.3;
        for form in [Form::Into, Form::InPlace] {
            check::<f32>(device, &mut rng, &c, form);
            check::<bf16>(device, &mut rng, &c, form);
        }
    }
}

/// All rows ignored: losses 0, mean NaN (0/0, as PyTorch), gradient all zeros.
fn every_row_ignored(device: &Device) {
    let options = CrossEntropyOptions {
        ignore_index: Some(7),
        grad_scale: 1.0,
    };
    let mut logits = Tensor::from_vec(vec![1.5f32; 3 * 10], &[3, 10], device).unwrap();
    let targets = Tensor::from_vec(vec![7u32; 3], &[3], device).unwrap();
    let mut losses = poisoned(&[3], DType::F32, device);
    let mut mean = poisoned(&[1], DType::F32, device);
    let outputs = CrossEntropyOutputs {
        losses: &mut losses,
        mean: &mut mean,
    };
    cross_entropy_fused_in_place(&mut logits, &targets, &options, outputs).unwrap();
    assert_eq!(losses.to_vec::<f32>().unwrap(), vec![0.0; 3]);
    assert!(mean.to_vec::<f32>().unwrap()[0].is_nan());
    assert_eq!(logits.to_vec::<f32>().unwrap(), vec![0.0; 30]);
}

/// Logits far beyond exp's range in f32 (and, for bf16, near its largest values' spacing):
/// the max subtraction keeps everything finite.
fn huge_logits_are_safe(device: &Device) {
    let mut rng = common::rng();
    for (low, high) in [(1e4, 1e4 + 30.0), (-1e4 - 30.0, -1e4), (-60.0, 60.0)] {
        let mut c = case(9, 333);
        (c.low, c.high) = (low, high);
        check::<f32>(device, &mut rng, &c, Form::Into);
    }
    let mut c = case(9, 336);
    (c.low, c.high) = (3e4, 3e4 + 2000.0);
    check::<bf16>(device, &mut rng, &c, Form::InPlace);
}

/// GPT-2's padded vocabulary on a few rows: the shape the trainer runs.
fn gpt2_vocabulary(device: &Device) {
    let mut rng = common::rng();
    check::<bf16>(device, &mut rng, &case(4, 50304), Form::InPlace);
    check::<f32>(device, &mut rng, &case(2, 50257), Form::Into);
}

/// The reference gradient is the derivative of the reference mean loss (central differences in
/// f64), so the kernels checked against it compute the true gradient.
fn gradient_matches_finite_differences(device: &Device) {
    let mut rng = common::rng();
    let (rows, vocab) = (3, 11);
    let options = CrossEntropyOptions {
        ignore_index: Some(4),
        grad_scale: 2.0,
    };
    let x: Vec<f64> = (0..rows * vocab).map(|_| rng.random_range(-2.0..2.0)).collect();
    let targets = [3u32, 4, 10];
    let (_, _, grad) = reference(&x, &targets, vocab, &options);
    let h = 1e-6;
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            let mut plus = x.clone();
            plus[i] += h;
            let mut minus = x.clone();
            minus[i] -= h;
            let f = |v: &[f64]| reference(v, &targets, vocab, &options).1 * options.grad_scale as f64;
            (f(&plus) - f(&minus)) / (2.0 * h)
        })
        .collect();
    assert_close("reference gradient vs finite differences", &grad, &numeric, 1e-6);
    // And the op on this device, in f32, against both.
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let logits = Tensor::from_vec(x32, &[rows, vocab], device).unwrap();
    let targets_t = Tensor::from_slice(&targets, &[rows], device).unwrap();
    let (mut losses, mut mean) = cross_entropy(&logits, &targets_t, &options).unwrap();
    let mut d = poisoned(&[rows, vocab], DType::F32, device);
    let outputs = CrossEntropyOutputs {
        losses: &mut losses,
        mean: &mut mean,
    };
    cross_entropy_fused_into(&logits, &targets_t, &options, outputs, &mut d).unwrap();
    assert_close("op gradient vs finite differences", &values::<f32>(&d), &numeric, 1e-5);
}

fn repeated_runs_are_bit_identical(device: &Device) {
    let mut rng = common::rng();
    let x: Vec<bf16> = uniform_in(&mut rng, 37 * 5000, -8.0, 8.0);
    let targets: Vec<u32> = (0..37).map(|_| rng.random_range(0..5000)).collect();
    let logits = Tensor::from_slice(&x, &[37, 5000], device).unwrap();
    let targets = Tensor::from_slice(&targets, &[37], device).unwrap();
    let run = || {
        let mut losses = poisoned(&[37], DType::F32, device);
        let mut mean = poisoned(&[1], DType::F32, device);
        let mut d = poisoned(&[37, 5000], DType::BF16, device);
        let outputs = CrossEntropyOutputs {
            losses: &mut losses,
            mean: &mut mean,
        };
        cross_entropy_fused_into(&logits, &targets, &CrossEntropyOptions::default(), outputs, &mut d).unwrap();
        (bytes(&losses), bytes(&mean), bytes(&d))
    };
    assert!(run() == run(), "two runs differ");
}

/// A target beyond the vocabulary: an error on the CPU (nothing written), NaN loss and gradient
/// for that row on a GPU (documented), the other rows unaffected.
fn out_of_range_targets(device: &Device) {
    let logits = Tensor::from_vec(vec![0.5f32; 2 * 8], &[2, 8], device).unwrap();
    let targets = Tensor::from_vec(vec![3u32, 8], &[2], device).unwrap();
    let mut losses = poisoned(&[2], DType::F32, device);
    let mut mean = poisoned(&[1], DType::F32, device);
    let mut d = poisoned(&[2, 8], DType::F32, device);
    let outputs = CrossEntropyOutputs {
        losses: &mut losses,
        mean: &mut mean,
    };
    let result = cross_entropy_fused_into(&logits, &targets, &CrossEntropyOptions::default(), outputs, &mut d);
    if device.is_cuda() {
        result.unwrap();
        let losses = losses.to_vec::<f32>().unwrap();
        assert!((losses[0] as f64 - 8f64.ln()).abs() < 1e-5, "row 0: {}", losses[0]);
        assert!(losses[1].is_nan());
        assert!(mean.to_vec::<f32>().unwrap()[0].is_nan());
        let d = d.to_vec::<f32>().unwrap();
        assert!(d[..8].iter().all(|v| v.is_finite()) && d[8..].iter().all(|v| v.is_nan()));
    } else {
        assert_invalid(
            result,
            "cross_entropy_fused",
            "targets",
            &["8 at row 1", "vocabulary size 8"],
        );
        assert!(
            losses.to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()),
            "losses were written"
        );
        assert!(
            d.to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()),
            "d_logits was written"
        );
    }
}

fn errors_name_the_argument(device: &Device) {
    let logits = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    let targets = Tensor::zeros(&[4], DType::U32, device).unwrap();
    let options = CrossEntropyOptions::default();
    let mut losses = Tensor::zeros(&[4], DType::F32, device).unwrap();
    let mut mean = Tensor::zeros(&[1], DType::F32, device).unwrap();
    macro_rules! outputs {
        () => {
            CrossEntropyOutputs {
                losses: &mut losses,
                mean: &mut mean,
            }
        };
    }
    let bad_targets = Tensor::zeros(&[4], DType::F32, device).unwrap();
    assert_invalid(
        cross_entropy_into(&logits, &bad_targets, &options, outputs!()),
        "cross_entropy",
        "targets",
        &["u32", "f32"],
    );
    let short_targets = Tensor::zeros(&[3], DType::U32, device).unwrap();
    assert_invalid(
        cross_entropy_into(&logits, &short_targets, &options, outputs!()),
        "cross_entropy",
        "targets",
        &["[4]", "[3]"],
    );
    let mut bad_losses = Tensor::zeros(&[4], DType::BF16, device).unwrap();
    assert_invalid(
        cross_entropy_into(
            &logits,
            &targets,
            &options,
            CrossEntropyOutputs {
                losses: &mut bad_losses,
                mean: &mut mean,
            },
        ),
        "cross_entropy",
        "losses",
        &["f32"],
    );
    let mut bad_mean = Tensor::zeros(&[2], DType::F32, device).unwrap();
    assert_invalid(
        cross_entropy_into(
            &logits,
            &targets,
            &options,
            CrossEntropyOutputs {
                losses: &mut losses,
                mean: &mut bad_mean,
            },
        ),
        "cross_entropy",
        "mean",
        &["[1]"],
    );
    let mut d = Tensor::zeros(&[4, 6], DType::F32, device).unwrap();
    assert_invalid(
        cross_entropy_fused_into(&logits, &targets, &options, outputs!(), &mut d),
        "cross_entropy_fused",
        "d_logits",
        &["bf16"],
    );
    let nan_scale = CrossEntropyOptions {
        grad_scale: f32::NAN,
        ..options
    };
    let mut logits_mut = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    assert_invalid(
        cross_entropy_fused_in_place(&mut logits_mut, &targets, &nan_scale, outputs!()),
        "cross_entropy_fused_in_place",
        "options.grad_scale",
        &["finite"],
    );
    let ints = Tensor::zeros(&[4, 6], DType::U32, device).unwrap();
    assert_invalid(
        cross_entropy_into(&ints, &targets, &options, outputs!()),
        "cross_entropy",
        "logits",
        &["u32"],
    );
    assert_eq!(bytes(&losses), vec![0u8; 16], "a failed call wrote the losses");
    assert_eq!(bytes(&logits_mut), vec![0u8; 48], "a failed call wrote the logits");
    if device.is_cuda() {
        let host = Tensor::zeros(&[4], DType::U32, &Device::Cpu).unwrap();
        assert_invalid(
            cross_entropy_into(&logits, &host, &options, outputs!()),
            "cross_entropy",
            "targets",
            &[],
        );
    }
}
