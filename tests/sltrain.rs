//! SLTrain (src/ops/sltrain.rs, ALGORITHMS.md §5) against f64 references on every device: the
//! support (unique, sorted, of size floor(δ·numel), reproducible), the spec's initialisation,
//! forward and backward on random parameters, the first step's dA = 0, finite differences, and
//! the argument errors; the 2:4 support (its structure in both dimensions, and the sparse
//! tensor-core path against the same references as the unstructured form, by finite differences
//! too).

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::{sltrain_backward, sltrain_forward, sltrain_weight, SlTrainConfig, SlTrainLayer, SlTrainSupport};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_sltrain,
    support_and_init,
    forward_backward_f32,
    forward_backward_bf16,
    forward_backward_f16,
    first_step_leaves_a_still,
    gradient_check,
    errors_name_the_argument,
    small_sltrain_two_four,
    two_four_support,
    two_four_forward_backward,
    two_four_gradient_check,
    two_four_errors,
);

fn two_four(d_out: usize, d_in: usize, rank: usize, bias: bool) -> SlTrainConfig {
    SlTrainConfig {
        support: SlTrainSupport::TwoFour,
        ..config(d_out, d_in, rank, 0.5, bias)
    }
}

fn config(d_out: usize, d_in: usize, rank: usize, density: f64, bias: bool) -> SlTrainConfig {
    SlTrainConfig {
        d_out,
        d_in,
        rank,
        density,
        alpha: 32.0,
        bias,
        support: SlTrainSupport::Random,
    }
}

/// A layer with every trainable tensor random (B too, so that the low-rank product is tested).
fn random_layer<T: Float>(rng: &mut StdRng, c: SlTrainConfig, device: &Device) -> SlTrainLayer {
    let mut layer = SlTrainLayer::new(c, T::DTYPE, 5, device).unwrap();
    let t = |rng: &mut StdRng, shape: &[usize]| {
        Tensor::from_vec(uniform::<T>(rng, shape.iter().product()), shape, device).unwrap()
    };
    layer.a = t(rng, &[c.rank, c.d_in]);
    layer.b = t(rng, &[c.d_out, c.rank]);
    layer.s = t(rng, &[layer.nnz()]);
    if c.bias {
        layer.bias = Some(t(rng, &[c.d_out]));
    }
    layer
}

/// W = c·B·A + S in f64 from the layer's exact values.
fn reference_weight<T: Float>(layer: &SlTrainLayer) -> Vec<f64> {
    let (d_out, d_in, r) = (layer.d_out(), layer.d_in(), layer.rank());
    let (a, b, s) = (values::<T>(&layer.a), values::<T>(&layer.b), values::<T>(&layer.s));
    let c = layer.scale() as f64;
    let mut w = vec![0.0; d_out * d_in];
    for i in 0..d_out {
        for j in 0..d_in {
            w[i * d_in + j] = c * (0..r).map(|p| b[i * r + p] * a[p * d_in + j]).sum::<f64>();
        }
    }
    for (&at, v) in layer.support().to_vec::<u32>().unwrap().iter().zip(s) {
        w[at as usize] += v;
    }
    w
}

fn matmul_nt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
        }
    }
    out
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows).map(|i| a[(i % rows) * cols + i / rows]).collect()
}

fn small_sltrain(device: &Device) {
    check::<bf16>(device, 5, config(16, 24, 4, 0.1, true));
}

fn support_and_init(device: &Device) {
    for (d_out, d_in, density) in [
        (1, 1, 1.0),
        (7, 45, 0.03),
        (64, 33, 0.05),
        (113, 128, 0.5),
        (16, 16, 0.0),
    ] {
        let c = config(d_out, d_in, 1, density, true);
        let layer = SlTrainLayer::new(c, DType::F32, 9, device).unwrap();
        let support = layer.support().to_vec::<u32>().unwrap();
        let numel = d_out * d_in;
        assert_eq!(support.len(), (density * numel as f64).floor() as usize);
        assert!(support.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        assert!(support.iter().all(|&i| (i as usize) < numel));
        let again = SlTrainLayer::new(c, DType::F32, 9, &Device::Cpu).unwrap();
        assert_eq!(again.support().to_vec::<u32>().unwrap(), support, "reproducible");
        assert_eq!(layer.scale(), 32.0);
        // B = 0; A and s in ±1/√d_in; the bias in ±1/√d_out.
        assert!(layer.b.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
        let bound_in = 1.0 / (d_in as f32).sqrt();
        let bound_out = 1.0 / (d_out as f32).sqrt();
        for v in layer
            .a
            .to_vec::<f32>()
            .unwrap()
            .into_iter()
            .chain(layer.s.to_vec::<f32>().unwrap())
        {
            assert!(v.abs() <= bound_in, "{v} outside ±{bound_in}");
        }
        for v in layer.bias.as_ref().unwrap().to_vec::<f32>().unwrap() {
            assert!(v.abs() <= bound_out, "{v} outside ±{bound_out}");
        }
        // Initially W = S.
        let w = sltrain_weight(&layer).unwrap().to_vec::<f32>().unwrap();
        let s = layer.s.to_vec::<f32>().unwrap();
        let mut expected = vec![0.0f32; numel];
        for (&at, &v) in support.iter().zip(&s) {
            expected[at as usize] = v;
        }
        assert_eq!(w, expected);
    }
    let large = SlTrainLayer::new(config(256, 512, 8, 0.03, false), DType::F32, 1, device).unwrap();
    let other = SlTrainLayer::new(config(256, 512, 8, 0.03, false), DType::F32, 2, device).unwrap();
    assert_ne!(
        large.support().to_vec::<u32>().unwrap(),
        other.support().to_vec::<u32>().unwrap()
    );
}

fn check<T: Float>(device: &Device, m: usize, c: SlTrainConfig) {
    let mut rng = common::rng();
    let layer = random_layer::<T>(&mut rng, c, device);
    let (d_out, d_in, r) = (c.d_out, c.d_in, c.rank);
    let x: Vec<T> = uniform(&mut rng, m * d_in);
    let dy: Vec<T> = uniform(&mut rng, m * d_out);
    let xt = Tensor::from_vec(x.clone(), &[m, d_in], device).unwrap();
    let dyt = Tensor::from_vec(dy.clone(), &[m, d_out], device).unwrap();
    let (x, dy) = (common::to_f64(&x), common::to_f64(&dy));
    let w = reference_weight::<T>(&layer);
    let tol = T::MATMUL_TOLERANCE;
    let what = |name: &str| format!("{name} {} m={m} {d_out}x{d_in} r={r}", T::DTYPE);
    let mut y = matmul_nt(&x, &w, m, d_out, d_in);
    if let Some(bias) = &layer.bias {
        let b = values::<T>(bias);
        for (i, v) in y.iter_mut().enumerate() {
            *v += b[i % d_out];
        }
    }
    // Two roundings (W, then Y) in 16-bit types.
    assert_close(
        &what("y"),
        &values::<T>(&sltrain_forward(&xt, &layer).unwrap()),
        &y,
        2.0 * tol,
    );
    let grads = sltrain_backward(&dyt, &xt, &layer).unwrap();
    let g = matmul_nt(&transpose(&dy, m, d_out), &transpose(&x, m, d_in), d_out, d_in, m);
    let c64 = layer.scale() as f64;
    let (a, b) = (values::<T>(&layer.a), values::<T>(&layer.b));
    let d_x = matmul_nt(&dy, &transpose(&w, d_out, d_in), m, d_in, d_out);
    assert_close(&what("d_x"), &values::<T>(&grads.d_x), &d_x, 2.0 * tol);
    let d_b: Vec<f64> = matmul_nt(&g, &a, d_out, r, d_in).iter().map(|v| c64 * v).collect();
    assert_close(&what("d_b"), &values::<T>(&grads.d_b), &d_b, 2.0 * tol);
    let d_a: Vec<f64> = matmul_nt(&transpose(&b, d_out, r), &transpose(&g, d_out, d_in), r, d_in, d_out)
        .iter()
        .map(|v| c64 * v)
        .collect();
    assert_close(&what("d_a"), &values::<T>(&grads.d_a), &d_a, 2.0 * tol);
    let support = layer.support().to_vec::<u32>().unwrap();
    let d_s: Vec<f64> = support.iter().map(|&i| g[i as usize]).collect();
    assert_close(&what("d_s"), &values::<T>(&grads.d_s), &d_s, tol);
    if c.bias {
        let d_bias: Vec<f64> = (0..d_out).map(|j| (0..m).map(|i| dy[i * d_out + j]).sum()).collect();
        assert_close(
            &what("d_bias"),
            &values::<f32>(grads.d_bias.as_ref().unwrap()),
            &d_bias,
            1e-5,
        );
    } else {
        assert!(grads.d_bias.is_none());
    }
}

fn forward_backward_f32(device: &Device) {
    for m in [1, 7, 113] {
        check::<f32>(device, m, config(48, 40, 8, 0.05, m != 7));
    }
}

fn forward_backward_bf16(device: &Device) {
    for m in [1, 17, 1025] {
        check::<bf16>(device, m, config(64, 96, 16, 0.03, true));
    }
}

fn forward_backward_f16(device: &Device) {
    check::<f16>(device, 33, config(40, 24, 4, 0.2, false));
}

fn first_step_leaves_a_still(device: &Device) {
    let mut rng = common::rng();
    let (m, d_out, d_in) = (6, 12, 20);
    let layer = SlTrainLayer::new(config(d_out, d_in, 3, 0.1, true), DType::F32, 4, device).unwrap();
    let x = Tensor::from_vec(uniform::<f32>(&mut rng, m * d_in), &[m, d_in], device).unwrap();
    let dy = Tensor::from_vec(uniform::<f32>(&mut rng, m * d_out), &[m, d_out], device).unwrap();
    let grads = sltrain_backward(&dy, &x, &layer).unwrap();
    assert!(
        grads.d_a.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0),
        "dA = 0 while B = 0"
    );
    assert!(grads.d_b.to_vec::<f32>().unwrap().iter().any(|&v| v != 0.0), "dB != 0");
}

/// Central finite differences in f64 of `L = Σ R ⊙ Y` for every parameter and input, against the
/// op's f32 gradients.
fn gradient_check(device: &Device) {
    finite_differences::<f32>(device, 3, config(4, 8, 2, 0.25, true), 1e-5);
}

/// [`gradient_check`] for any layer: the op's gradients in `T` against central differences in
/// f64 of the exact loss at the layer's (exactly widened) values.
fn finite_differences<T: Float>(device: &Device, m: usize, c: SlTrainConfig, tolerance: f64) {
    let mut rng = common::rng();
    let (d_out, d_in, r) = (c.d_out, c.d_in, c.rank);
    let layer = random_layer::<T>(&mut rng, c, device);
    let x: Vec<T> = uniform(&mut rng, m * d_in);
    let rw: Vec<T> = uniform(&mut rng, m * d_out);
    let xt = Tensor::from_vec(x.clone(), &[m, d_in], device).unwrap();
    let rt = Tensor::from_vec(rw.clone(), &[m, d_out], device).unwrap();
    let grads = sltrain_backward(&rt, &xt, &layer).unwrap();
    let support: Vec<usize> = layer
        .support()
        .to_vec::<u32>()
        .unwrap()
        .iter()
        .map(|&i| i as usize)
        .collect();
    let scale = layer.scale() as f64;
    let rw = common::to_f64(&rw);
    // Parameters as one vector: x, A, B, s, bias.
    let parts = [
        common::to_f64(&x),
        values::<T>(&layer.a),
        values::<T>(&layer.b),
        values::<T>(&layer.s),
        values::<T>(layer.bias.as_ref().unwrap()),
    ];
    let loss = |p: &[Vec<f64>]| -> f64 {
        let (x, a, b, s, bias) = (&p[0], &p[1], &p[2], &p[3], &p[4]);
        let mut w = vec![0.0; d_out * d_in];
        for i in 0..d_out {
            for j in 0..d_in {
                w[i * d_in + j] = scale * (0..r).map(|q| b[i * r + q] * a[q * d_in + j]).sum::<f64>();
            }
        }
        for (&at, v) in support.iter().zip(s) {
            w[at] += v;
        }
        let y = matmul_nt(x, &w, m, d_out, d_in);
        y.iter().enumerate().map(|(i, y)| (y + bias[i % d_out]) * rw[i]).sum()
    };
    let step = 1e-6;
    let got = [
        values::<T>(&grads.d_x),
        values::<T>(&grads.d_a),
        values::<T>(&grads.d_b),
        values::<T>(&grads.d_s),
        values::<f32>(grads.d_bias.as_ref().unwrap()),
    ];
    for (part, (name, got)) in ["d_x", "d_a", "d_b", "d_s", "d_bias"].iter().zip(&got).enumerate() {
        let fd: Vec<f64> = (0..parts[part].len())
            .map(|i| {
                let (mut plus, mut minus) = (parts.to_vec(), parts.to_vec());
                plus[part][i] += step;
                minus[part][i] -= step;
                (loss(&plus) - loss(&minus)) / (2.0 * step)
            })
            .collect();
        assert_close(&format!("{name} by finite differences"), got, &fd, tolerance);
    }
}

fn errors_name_the_argument(device: &Device) {
    let op = "SlTrainLayer::new";
    assert_invalid(
        SlTrainLayer::new(config(8, 8, 9, 0.1, false), DType::F32, 0, device),
        op,
        "config.rank",
        &["min(d_out, d_in) = 8", "9"],
    );
    assert_invalid(
        SlTrainLayer::new(config(8, 8, 0, 0.1, false), DType::F32, 0, device),
        op,
        "config.rank",
        &["0"],
    );
    assert_invalid(
        SlTrainLayer::new(config(8, 8, 2, 1.5, false), DType::F32, 0, device),
        op,
        "config.density",
        &["[0, 1]"],
    );
    assert_invalid(
        SlTrainLayer::new(config(0, 8, 2, 0.1, false), DType::F32, 0, device),
        op,
        "config.d_out",
        &["0x8"],
    );
    assert_invalid(
        SlTrainLayer::new(config(8, 8, 2, 0.1, false), DType::U8, 0, device),
        op,
        "dtype",
        &["u8"],
    );
    let mut layer = SlTrainLayer::new(config(8, 12, 2, 0.1, true), DType::F32, 0, device).unwrap();
    let x = Tensor::zeros(&[3, 11], DType::F32, device).unwrap();
    assert_invalid(sltrain_forward(&x, &layer), "sltrain_forward", "x", &["12", "[3, 11]"]);
    let x = Tensor::zeros(&[3, 12], DType::F32, device).unwrap();
    let dy = Tensor::zeros(&[4, 8], DType::F32, device).unwrap();
    assert_invalid(
        sltrain_backward(&dy, &x, &layer),
        "sltrain_backward",
        "x",
        &["4 tokens"],
    );
    let bf = Tensor::zeros(&[3, 12], DType::BF16, device).unwrap();
    assert_invalid(sltrain_forward(&bf, &layer), "sltrain_forward", "x", &["f32", "bf16"]);
    layer.b = Tensor::zeros(&[8, 3], DType::F32, device).unwrap();
    assert_invalid(
        sltrain_forward(&x, &layer),
        "sltrain_forward",
        "layer.b",
        &["[8, 2]", "[8, 3]"],
    );
}

fn small_sltrain_two_four(device: &Device) {
    check::<bf16>(device, 5, two_four(64, 128, 4, true));
}

/// The 2:4 support: two positions in every group of 4 along each row and along each column,
/// every position once, reproducible from the seed, different for another seed; W = S at first.
fn two_four_support(device: &Device) {
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    for (d_out, d_in) in [(64, 64), (128, 192), (320, 64)] {
        let c = two_four(d_out, d_in, 2, false);
        let layer = SlTrainLayer::new(c, dtype, 9, device).unwrap();
        let support = layer.support().to_vec::<u32>().unwrap();
        assert_eq!(support.len(), d_out * d_in / 2);
        assert_eq!(layer.nnz(), support.len());
        let mut kept = vec![0u8; d_out * d_in];
        for &at in &support {
            kept[at as usize] += 1;
        }
        assert!(kept.iter().all(|&k| k <= 1), "every position at most once");
        for row in 0..d_out {
            for group in 0..d_in / 4 {
                let n: u8 = (0..4).map(|j| kept[row * d_in + 4 * group + j]).sum();
                assert_eq!(n, 2, "row {row}, columns {}..+4", 4 * group);
            }
        }
        for col in 0..d_in {
            for group in 0..d_out / 4 {
                let n: u8 = (0..4).map(|i| kept[(4 * group + i) * d_in + col]).sum();
                assert_eq!(n, 2, "column {col}, rows {}..+4", 4 * group);
            }
        }
        let again = SlTrainLayer::new(c, dtype, 9, device).unwrap();
        assert_eq!(again.support().to_vec::<u32>().unwrap(), support, "reproducible");
        let other = SlTrainLayer::new(c, dtype, 10, device).unwrap();
        assert_ne!(other.support().to_vec::<u32>().unwrap(), support);
        assert_eq!(layer.support_kind(), SlTrainSupport::TwoFour);
        // B = 0 at first: the forward is X·Sᵀ alone, through the sparse product.
        let read = |t: &Tensor| {
            if device.is_cuda() {
                values::<bf16>(t)
            } else {
                values::<f32>(t)
            }
        };
        let w = read(&sltrain_weight(&layer).unwrap());
        let s = read(&layer.s);
        let mut expected = vec![0.0f64; d_out * d_in];
        for (&at, &v) in support.iter().zip(&s) {
            expected[at as usize] = v;
        }
        assert_eq!(w, expected);
    }
}

/// The 2:4 form against the same f64 references as the unstructured form (its support and
/// values), odd token counts, and against the unstructured computation (W materialised) on the
/// same layer.
fn two_four_forward_backward(device: &Device) {
    for m in [1, 7, 113, 1025] {
        let c = two_four(64, 128, 8, m != 7);
        if device.is_cuda() {
            check::<bf16>(device, m, c);
            check::<f16>(device, m, c);
        } else {
            check::<f32>(device, m, c);
            check::<bf16>(device, m, c);
        }
    }
    let mut rng = common::rng();
    let c = two_four(128, 64, 16, true);
    let layer = random_layer::<bf16>(&mut rng, c, device);
    let m = 17;
    let x = Tensor::from_vec(uniform::<bf16>(&mut rng, m * c.d_in), &[m, c.d_in], device).unwrap();
    let dense = tessera::ops::matmul(
        &x,
        &sltrain_weight(&layer).unwrap(),
        layer.bias.as_ref(),
        tessera::ops::MatmulOptions::linear(),
    )
    .unwrap();
    assert_close(
        "2:4 forward against the materialised weight",
        &values::<bf16>(&sltrain_forward(&x, &layer).unwrap()),
        &values::<bf16>(&dense),
        3.0 * bf16::MATMUL_TOLERANCE,
    );
}

fn two_four_gradient_check(device: &Device) {
    let c = two_four(64, 64, 2, true);
    if device.is_cuda() {
        finite_differences::<bf16>(device, 3, c, 2.0 * bf16::MATMUL_TOLERANCE);
    } else {
        finite_differences::<f32>(device, 3, c, 1e-5);
    }
}

fn two_four_errors(device: &Device) {
    let op = "SlTrainLayer::new";
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    assert_invalid(
        SlTrainLayer::new(two_four(64, 96, 2, false), dtype, 0, device),
        op,
        "config.d_in",
        &["multiple of 64", "96"],
    );
    assert_invalid(
        SlTrainLayer::new(two_four(48, 64, 2, false), dtype, 0, device),
        op,
        "config.d_out",
        &["multiple of 64", "48"],
    );
    let sparser = SlTrainConfig {
        density: 0.03,
        ..two_four(64, 64, 2, false)
    };
    assert_invalid(
        SlTrainLayer::new(sparser, dtype, 0, device),
        op,
        "config.density",
        &["0.5", "0.03"],
    );
    if device.is_cuda() {
        assert_invalid(
            SlTrainLayer::new(two_four(64, 64, 2, false), DType::F32, 0, device),
            op,
            "dtype",
            &["bf16 or f16", "f32"],
        );
    }
    let layer = SlTrainLayer::new(two_four(64, 64, 2, true), dtype, 0, device).unwrap();
    let x = Tensor::zeros(&[3, 60], dtype, device).unwrap();
    assert_invalid(sltrain_forward(&x, &layer), "sltrain_forward", "x", &["64", "[3, 60]"]);
    let x = Tensor::zeros(&[3, 64], dtype, device).unwrap();
    let dy = Tensor::zeros(&[4, 64], dtype, device).unwrap();
    assert_invalid(
        sltrain_backward(&dy, &x, &layer),
        "sltrain_backward",
        "x",
        &["4 tokens"],
    );
}
