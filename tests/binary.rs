//! Binarized linear layers and the distillation loss (src/ops/binary.rs, ALGORITHMS.md §1) against
//! f64 references computed on the host from the exact input values: the spec's hand fixture, the
//! training form's forward (dense `X·(α⊙S+β)ᵀ + b`) and every gradient (the spec's formulas and
//! central finite differences), the straight-through `dW = α·G` without clipping, the β term, the
//! xnor init, sign(0) on both forms, pack/unpack, the packed forward on every path (GEMV token
//! tiles of 8 and 16, GEMM, vector and scalar loads, several k phases), the distillation loss
//! with and without the next-token mix, large logits, and the argument errors; and the model's
//! entry points (`binary_linear_forward_layout_into`, `binary_linear_backward_add`): GPT-2's
//! (in, out) weights and gradients added to what they hold.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, bytes, uniform, uniform_in, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::binary::{packed_words, GEMV_MAX_TOKENS, TRAIN_CHUNK_ROWS};
use tessera::ops::{
    binary_init, binary_linear_backward, binary_linear_backward_into, binary_linear_forward,
    binary_linear_forward_into, binary_pack, binary_packed_forward, binary_packed_forward_into, binary_unpack,
    distill_loss, distill_loss_into, BinaryLinear, BinaryLinearGrads, PackedBinaryLinear,
};
use tessera::ops::{
    binary_linear_backward_add, binary_linear_forward_layout_into, BinaryGradTargets, BinaryWeightLayout,
};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_pack_unpack,
    small_packed_gemv,
    small_packed_gemm,
    small_distill_loss,
    pack_matches_reference_on_odd_shapes,
    packed_forward_gemv_bf16,
    packed_forward_gemv_f16,
    packed_forward_gemm_bf16,
    packed_forward_gemm_f16,
    packed_forward_f32_on_cpu,
    packed_forward_long_rows,
    packed_matches_training_form,
    sign_zero_convention,
    distill_loss_f32,
    distill_loss_bf16,
    distill_loss_f16,
    distill_loss_large_logits,
    distill_one_hot_teacher_is_cross_entropy,
    distill_wide_vocabulary,
    xnor_init_on_device,
    training_form_device_support,
    small_training_form,
    training_hand_fixture,
    training_form_bf16,
    training_form_f16,
    training_form_f32_on_cpu,
    training_form_many_tokens,
    training_finite_differences,
    training_errors,
    errors_name_the_argument,
    errors_leave_outputs_unchanged,
    small_training_layout_accumulate,
    training_layout_accumulate,
    training_layout_errors,
);

fn tensor<T: tessera::Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Tensor {
    Tensor::from_vec(data, shape, device).expect("tensor")
}

fn sign(w: f64) -> f64 {
    if w > 0.0 {
        1.0
    } else if w < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The packed form's sign: bit 1 (−1) for w < 0, +1 otherwise (zero included).
fn packed_sign(w: f64) -> f64 {
    if w < 0.0 {
        -1.0
    } else {
        1.0
    }
}

/// `X·W~ᵀ + b` with `W~ = α·sign(W) + β` materialised densely, in f64.
#[allow(clippy::too_many_arguments)]
fn dense_forward(
    x: &[f64],
    w: &[f64],
    alpha: &[f64],
    beta: &[f64],
    bias: Option<&[f64]>,
    tokens: usize,
    d_out: usize,
    d_in: usize,
    sign: fn(f64) -> f64,
) -> Vec<f64> {
    let w_tilde: Vec<f64> = (0..d_out * d_in)
        .map(|e| alpha[e % d_in] * sign(w[e]) + beta[e % d_in])
        .collect();
    let mut y = vec![0.0; tokens * d_out];
    for n in 0..tokens {
        for i in 0..d_out {
            let mut sum = bias.map_or(0.0, |b| b[i]);
            for j in 0..d_in {
                sum += x[n * d_in + j] * w_tilde[i * d_in + j];
            }
            y[n * d_out + i] = sum;
        }
    }
    y
}

/// A layer's random parameters: latent weights in [-w_range, w_range], α in [0.5, 1.5], β in
/// [-0.5, 0.5], bias in [-1, 1].
struct Params {
    w: Vec<f32>,
    alpha: Vec<f32>,
    beta: Vec<f32>,
    bias: Option<Vec<f32>>,
    d_out: usize,
    d_in: usize,
}

impl Params {
    fn random(rng: &mut StdRng, d_out: usize, d_in: usize, with_bias: bool, w_range: f32) -> Params {
        Params {
            w: uniform_in(rng, d_out * d_in, -w_range, w_range),
            alpha: uniform_in(rng, d_in, 0.5, 1.5),
            beta: uniform_in(rng, d_in, -0.5, 0.5),
            bias: with_bias.then(|| uniform(rng, d_out)),
            d_out,
            d_in,
        }
    }

    fn f64s(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
        let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        (
            wide(&self.w),
            wide(&self.alpha),
            wide(&self.beta),
            self.bias.as_deref().map(wide),
        )
    }

    fn tensors(&self, device: &Device) -> (Tensor, Tensor, Tensor, Option<Tensor>) {
        (
            tensor(self.w.clone(), &[self.d_out, self.d_in], device),
            tensor(self.alpha.clone(), &[self.d_in], device),
            tensor(self.beta.clone(), &[self.d_in], device),
            self.bias.clone().map(|b| tensor(b, &[self.d_out], device)),
        )
    }
}

// ---- training form (CPU) ------------------------------------------------------------------

#[test]
fn spec_hand_fixture() {
    let cpu = Device::Cpu;
    let w = tensor(vec![0.3f32, -0.2, -0.1, 0.4], &[2, 2], &cpu);
    let alpha = tensor(vec![1.0f32, 2.0], &[2], &cpu);
    let beta = tensor(vec![0.5f32, -0.5], &[2], &cpu);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let x = tensor(vec![1.0f32, 2.0], &[1, 2], &cpu);
    let y = binary_linear_forward(&x, layer).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![-3.5, 2.5]);
    let dy = tensor(vec![1.0f32, 1.0], &[1, 2], &cpu);
    let grads = binary_linear_backward(&dy, &x, layer).unwrap();
    assert_eq!(grads.d_x.to_vec::<f32>().unwrap(), vec![1.0, -1.0]);
    assert_eq!(grads.d_alpha.to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
    assert_eq!(grads.d_beta.to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
    assert_eq!(grads.d_weight.to_vec::<f32>().unwrap(), vec![1.0, 4.0, 1.0, 4.0]);
    assert!(grads.d_bias.is_none());
    let (a, b) = binary_init(&w).unwrap();
    let (a, b) = (values::<f32>(&a), values::<f32>(&b));
    for (got, want) in a.iter().zip([0.2, 0.3]).chain(b.iter().zip([0.1, 0.1])) {
        assert!((got - want).abs() < 1e-7, "init: got {got}, expected {want}");
    }
}

/// The spec's backward in f64: (dX, dα, dβ, dW, db).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn backward_reference(
    dy: &[f64],
    x: &[f64],
    w: &[f64],
    alpha: &[f64],
    beta: &[f64],
    tokens: usize,
    d_out: usize,
    d_in: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut g = vec![0.0; d_out * d_in];
    for i in 0..d_out {
        for j in 0..d_in {
            g[i * d_in + j] = (0..tokens).map(|n| dy[n * d_out + i] * x[n * d_in + j]).sum();
        }
    }
    let mut d_x = vec![0.0; tokens * d_in];
    for n in 0..tokens {
        for j in 0..d_in {
            d_x[n * d_in + j] = (0..d_out)
                .map(|i| dy[n * d_out + i] * (alpha[j] * sign(w[i * d_in + j]) + beta[j]))
                .sum();
        }
    }
    let d_alpha = (0..d_in)
        .map(|j| (0..d_out).map(|i| g[i * d_in + j] * sign(w[i * d_in + j])).sum())
        .collect();
    let d_beta = (0..d_in).map(|j| (0..d_out).map(|i| g[i * d_in + j]).sum()).collect();
    let d_w = (0..d_out * d_in).map(|e| alpha[e % d_in] * g[e]).collect();
    let d_b = (0..d_out)
        .map(|i| (0..tokens).map(|n| dy[n * d_out + i]).sum())
        .collect();
    (d_x, d_alpha, d_beta, d_w, d_b)
}

#[test]
fn training_forward_and_backward_match_reference() {
    let mut rng = common::rng();
    let cpu = Device::Cpu;
    for &(tokens, d_out, d_in, with_bias) in &[
        (1, 1, 1, true),
        (3, 4, 8, false),
        (7, 17, 33, true),
        (17, 113, 7, true),
        (5, 64, 1025, false),
        (2, 1023, 17, true),
    ] {
        let p = Params::random(&mut rng, d_out, d_in, with_bias, 1.0);
        let (w, alpha, beta, bias) = p.tensors(&cpu);
        let layer = BinaryLinear {
            weight: &w,
            alpha: &alpha,
            beta: &beta,
            bias: bias.as_ref(),
        };
        let x_values: Vec<f32> = uniform(&mut rng, tokens * d_in);
        let dy_values: Vec<f32> = uniform(&mut rng, tokens * d_out);
        let x = tensor(x_values.clone(), &[tokens, d_in], &cpu);
        let dy = tensor(dy_values.clone(), &[tokens, d_out], &cpu);
        let (w64, a64, b64, bias64) = p.f64s();
        let (x64, dy64) = (common::to_f64(&x_values), common::to_f64(&dy_values));
        let what = format!("tokens={tokens} d_out={d_out} d_in={d_in}");

        let y = binary_linear_forward(&x, layer).unwrap();
        let reference = dense_forward(&x64, &w64, &a64, &b64, bias64.as_deref(), tokens, d_out, d_in, sign);
        assert_close(&format!("forward {what}"), &values::<f32>(&y), &reference, 1e-5);

        let grads = binary_linear_backward(&dy, &x, layer).unwrap();
        let (d_x, d_alpha, d_beta, d_w, d_b) = backward_reference(&dy64, &x64, &w64, &a64, &b64, tokens, d_out, d_in);
        assert_close(&format!("dX {what}"), &values::<f32>(&grads.d_x), &d_x, 1e-5);
        assert_close(&format!("dα {what}"), &values::<f32>(&grads.d_alpha), &d_alpha, 1e-5);
        assert_close(&format!("dβ {what}"), &values::<f32>(&grads.d_beta), &d_beta, 1e-5);
        assert_close(&format!("dW {what}"), &values::<f32>(&grads.d_weight), &d_w, 1e-5);
        match (&grads.d_bias, with_bias) {
            (Some(db), true) => assert_close(&format!("db {what}"), &values::<f32>(db), &d_b, 1e-5),
            (None, false) => {}
            (got, _) => panic!("d_bias is {got:?} for a layer with bias = {with_bias}"),
        }
    }
}

/// Central differences of `L = Σ dY ⊙ Y(X, α, β, b)` in f64, on every element of every input in
/// which the layer is differentiable (it is linear in all four, so the difference is exact up to
/// rounding), against the backward.
#[test]
fn finite_differences() {
    let mut rng = common::rng();
    let (tokens, d_out, d_in) = (3, 4, 8);
    let p = Params::random(&mut rng, d_out, d_in, true, 1.0);
    let cpu = Device::Cpu;
    let (w, alpha, beta, bias) = p.tensors(&cpu);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
    };
    let x_values: Vec<f32> = uniform(&mut rng, tokens * d_in);
    let dy_values: Vec<f32> = uniform(&mut rng, tokens * d_out);
    let grads = binary_linear_backward(
        &tensor(dy_values.clone(), &[tokens, d_out], &cpu),
        &tensor(x_values.clone(), &[tokens, d_in], &cpu),
        layer,
    )
    .unwrap();
    let (w64, a64, b64, bias64) = p.f64s();
    let (x64, dy64) = (common::to_f64(&x_values), common::to_f64(&dy_values));
    let loss = |x: &[f64], a: &[f64], b: &[f64], bias: &[f64]| -> f64 {
        dense_forward(x, &w64, a, b, Some(bias), tokens, d_out, d_in, sign)
            .iter()
            .zip(&dy64)
            .map(|(y, g)| y * g)
            .sum()
    };
    let h = 1e-6;
    let mut inputs = [x64, a64, b64, bias64.unwrap()];
    let analytic = [
        values::<f32>(&grads.d_x),
        values::<f32>(&grads.d_alpha),
        values::<f32>(&grads.d_beta),
        values::<f32>(grads.d_bias.as_ref().unwrap()),
    ];
    for (which, name) in ["x", "alpha", "beta", "bias"].iter().enumerate() {
        let mut numeric = Vec::new();
        for e in 0..inputs[which].len() {
            let keep = inputs[which][e];
            inputs[which][e] = keep + h;
            let up = loss(&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
            inputs[which][e] = keep - h;
            let down = loss(&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
            inputs[which][e] = keep;
            numeric.push((up - down) / (2.0 * h));
        }
        assert_close(
            &format!("finite differences of {name}"),
            &analytic[which],
            &numeric,
            1e-5,
        );
    }
}

/// The straight-through estimator is the identity, not clipped: `dW = α·G` exactly, also where
/// |W| > 1.
#[test]
fn straight_through_without_clipping() {
    let mut rng = common::rng();
    let (tokens, d_out, d_in) = (4, 9, 13);
    let p = Params::random(&mut rng, d_out, d_in, false, 4.0);
    assert!(p.w.iter().filter(|w| w.abs() > 1.0).count() > d_out * d_in / 2);
    let cpu = Device::Cpu;
    let (w, alpha, beta, _) = p.tensors(&cpu);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let x_values: Vec<f32> = uniform(&mut rng, tokens * d_in);
    let dy_values: Vec<f32> = uniform(&mut rng, tokens * d_out);
    let grads = binary_linear_backward(
        &tensor(dy_values.clone(), &[tokens, d_out], &cpu),
        &tensor(x_values.clone(), &[tokens, d_in], &cpu),
        layer,
    )
    .unwrap();
    let d_w = values::<f32>(&grads.d_weight);
    for i in 0..d_out {
        for j in 0..d_in {
            let g: f64 = (0..tokens)
                .map(|n| dy_values[n * d_out + i] as f64 * x_values[n * d_in + j] as f64)
                .sum();
            let want = p.alpha[j] as f64 * g;
            let got = d_w[i * d_in + j];
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "dW[{i},{j}] = {got}, expected α·G = {want} (|W| = {})",
                p.w[i * d_in + j].abs()
            );
            assert!(got != 0.0 || want == 0.0, "dW[{i},{j}] clipped to 0");
        }
    }
}

/// With α = 0 the binary part vanishes: every output channel of a token is `r[n] = Σ β_j x_j`
/// (plus its bias), on both forms.
#[test]
fn beta_term_alone() {
    let mut rng = common::rng();
    let (tokens, d_out, d_in) = (5, 11, 37);
    let cpu = Device::Cpu;
    let mut p = Params::random(&mut rng, d_out, d_in, false, 1.0);
    p.alpha = vec![0.0; d_in];
    let (w, alpha, beta, _) = p.tensors(&cpu);
    let x_values: Vec<f32> = uniform(&mut rng, tokens * d_in);
    let x = tensor(x_values.clone(), &[tokens, d_in], &cpu);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let y = values::<f32>(&binary_linear_forward(&x, layer).unwrap());
    let bits = binary_pack(&w).unwrap();
    let packed = PackedBinaryLinear {
        bits: &bits,
        alpha: &alpha,
        beta: &beta,
        bias: None,
        d_in,
    };
    let y_packed = values::<f32>(&binary_packed_forward(&x, packed).unwrap());
    for n in 0..tokens {
        let r: f64 = (0..d_in)
            .map(|j| p.beta[j] as f64 * x_values[n * d_in + j] as f64)
            .sum();
        let expected = vec![r; d_out];
        // r is a sum of terms of both signs: measured against the size of its terms.
        let terms: f64 = (0..d_in)
            .map(|j| (p.beta[j] as f64 * x_values[n * d_in + j] as f64).abs())
            .sum();
        let scale = terms * (d_out as f64).sqrt();
        let rows = n * d_out..(n + 1) * d_out;
        common::assert_close_at_scale(&format!("token {n}"), &y[rows.clone()], &expected, 1e-5, scale);
        common::assert_close_at_scale(&format!("packed token {n}"), &y_packed[rows], &expected, 1e-5, scale);
    }
}

#[test]
fn xnor_init_matches_column_statistics() {
    let mut rng = common::rng();
    for &(d_out, d_in) in &[(1, 1), (7, 3), (113, 17), (64, 1025)] {
        let w: Vec<f32> = uniform_in(&mut rng, d_out * d_in, -0.05, 0.05);
        let (alpha, beta) = binary_init(&tensor(w.clone(), &[d_out, d_in], &Device::Cpu)).unwrap();
        let mean: Vec<f64> = (0..d_in)
            .map(|j| (0..d_out).map(|i| w[i * d_in + j] as f64).sum::<f64>() / d_out as f64)
            .collect();
        let spread: Vec<f64> = (0..d_in)
            .map(|j| {
                (0..d_out)
                    .map(|i| (w[i * d_in + j] as f64 - mean[j]).abs())
                    .sum::<f64>()
                    / d_out as f64
            })
            .collect();
        assert_close("beta", &values::<f32>(&beta), &mean, 1e-6);
        assert_close("alpha", &values::<f32>(&alpha), &spread, 1e-6);
    }
}

// ---- on every device ----------------------------------------------------------------------

/// The host reference of the packed bits.
fn reference_bits(w: &[f32], d_out: usize, d_in: usize) -> Vec<u32> {
    let words = packed_words(d_in);
    let mut bits = vec![0u32; d_out * words];
    for i in 0..d_out {
        for j in 0..d_in {
            if w[i * d_in + j] < 0.0 {
                bits[i * words + j / 32] |= 1 << (j % 32);
            }
        }
    }
    bits
}

fn check_pack(device: &Device, rng: &mut StdRng, d_out: usize, d_in: usize) {
    let w: Vec<f32> = uniform(rng, d_out * d_in);
    let bits = binary_pack(&tensor(w.clone(), &[d_out, d_in], device)).unwrap();
    assert_eq!(bits.shape(), &[d_out, packed_words(d_in)]);
    assert_eq!(
        bits.to_vec::<u32>().unwrap(),
        reference_bits(&w, d_out, d_in),
        "bits of {d_out}x{d_in} (padding bits must be 0)"
    );
    let signs = binary_unpack(&bits, d_in).unwrap().to_vec::<f32>().unwrap();
    let expected: Vec<f32> = w.iter().map(|&v| packed_sign(v as f64) as f32).collect();
    assert_eq!(signs, expected, "unpacked signs of {d_out}x{d_in}");
}

fn small_pack_unpack(device: &Device) {
    check_pack(device, &mut common::rng(), 5, 70);
}

fn pack_matches_reference_on_odd_shapes(device: &Device) {
    let mut rng = common::rng();
    for &(d_out, d_in) in &[
        (1, 1),
        (1, 31),
        (2, 32),
        (3, 33),
        (17, 113),
        (7, 1023),
        (9, 1025),
        (300, 4096),
    ] {
        check_pack(device, &mut rng, d_out, d_in);
    }
}

/// Packs random weights and runs the packed forward on `tokens` tokens of dtype `T`, against the
/// f64 reference from the exact inputs; the output is poisoned first.
fn check_packed<T: Float>(device: &Device, rng: &mut StdRng, tokens: usize, d_out: usize, d_in: usize, bias: bool) {
    let p = Params::random(rng, d_out, d_in, bias, 1.0);
    let (w, alpha, beta, bias_t) = p.tensors(device);
    let bits = binary_pack(&w).unwrap();
    let x_values: Vec<T> = uniform(rng, tokens * d_in);
    let x = tensor(x_values.clone(), &[tokens, d_in], device);
    let layer = PackedBinaryLinear {
        bits: &bits,
        alpha: &alpha,
        beta: &beta,
        bias: bias_t.as_ref(),
        d_in,
    };
    let mut y = Tensor::zeros(&[tokens, d_out], T::DTYPE, device).unwrap();
    y.fill_bytes(0xFF).unwrap();
    binary_packed_forward_into(&x, layer, &mut y).unwrap();
    let (w64, a64, b64, bias64) = p.f64s();
    let reference = dense_forward(
        &common::to_f64(&x_values),
        &w64,
        &a64,
        &b64,
        bias64.as_deref(),
        tokens,
        d_out,
        d_in,
        packed_sign,
    );
    let got = values::<T>(&y);
    let what = format!("{} tokens={tokens} d_out={d_out} d_in={d_in} on {device}", T::DTYPE);
    assert_close(&what, &got, &reference, T::MATMUL_TOLERANCE);
    // Element-wise: within the tolerance of the size of the terms summed into each output.
    for n in 0..tokens {
        let scale: f64 = (0..d_in)
            .map(|j| ((a64[j] + b64[j].abs()) * x_values[n * d_in + j].to_f64()).powi(2))
            .sum::<f64>()
            .sqrt();
        for i in 0..d_out {
            let e = n * d_out + i;
            let bound = 4.0 * T::MATMUL_TOLERANCE * (reference[e].abs() + scale) + 1e-6;
            assert!(
                (got[e] - reference[e]).abs() <= bound,
                "{what}: y[{n},{i}] = {}, expected {} (bound {bound})",
                got[e],
                reference[e]
            );
        }
    }
}

fn small_packed_gemv(device: &Device) {
    let mut rng = common::rng();
    check_packed::<bf16>(device, &mut rng, 3, 40, 200, true);
    check_packed::<f16>(device, &mut rng, 12, 33, 256, false);
}

fn small_packed_gemm(device: &Device) {
    let mut rng = common::rng();
    check_packed::<bf16>(device, &mut rng, 130, 140, 72, true);
}

/// Token counts around both GEMV token tiles (8 and 16), shapes with and without whole 128-bit
/// rows of bits, rows not a multiple of the block's 32.
fn gemv_cases<T: Float>(device: &Device) {
    let mut rng = common::rng();
    for &tokens in &[1, 2, 7, 8, 9, 15, GEMV_MAX_TOKENS] {
        for &(d_out, d_in) in &[(1, 1), (7, 33), (33, 128), (65, 512), (40, 1025), (97, 4096)] {
            check_packed::<T>(device, &mut rng, tokens, d_out, d_in, tokens % 2 == 1);
        }
    }
}

fn packed_forward_gemv_bf16(device: &Device) {
    gemv_cases::<bf16>(device);
}

fn packed_forward_gemv_f16(device: &Device) {
    gemv_cases::<f16>(device);
}

/// Token counts past the GEMV, tiles of 128 partly filled, k with and without whole vectors of 8.
fn gemm_cases<T: Float>(device: &Device) {
    let mut rng = common::rng();
    for &tokens in &[GEMV_MAX_TOKENS + 1, 113, 128, 129, 300] {
        for &(d_out, d_in) in &[(1, 1), (7, 33), (129, 64), (200, 1025), (256, 520)] {
            check_packed::<T>(device, &mut rng, tokens, d_out, d_in, tokens % 2 == 0);
        }
    }
}

fn packed_forward_gemm_bf16(device: &Device) {
    gemm_cases::<bf16>(device);
}

fn packed_forward_gemm_f16(device: &Device) {
    gemm_cases::<f16>(device);
}

/// f32 activations: the CPU computes with them; a GPU takes bf16 or f16 only.
fn packed_forward_f32_on_cpu(device: &Device) {
    let mut rng = common::rng();
    if device.is_cuda() {
        let p = Params::random(&mut rng, 4, 8, false, 1.0);
        let (w, alpha, beta, _) = p.tensors(device);
        let bits = binary_pack(&w).unwrap();
        let x = tensor(uniform::<f32>(&mut rng, 16), &[2, 8], device);
        let layer = PackedBinaryLinear {
            bits: &bits,
            alpha: &alpha,
            beta: &beta,
            bias: None,
            d_in: 8,
        };
        assert_invalid(
            binary_packed_forward(&x, layer),
            "binary_packed_forward",
            "x",
            &["bf16", "f32"],
        );
        return;
    }
    for &(tokens, d_out, d_in) in &[(1, 5, 9), (20, 33, 100), (3, 64, 1025)] {
        check_packed::<f32>(device, &mut rng, tokens, d_out, d_in, true);
    }
}

/// Several phases of 4096 k in the GEMV, a partial last phase, a long GEMM reduction, and more
/// output rows than 32 per SM, where 9..16 tokens take the GEMV's 64-row blocks.
fn packed_forward_long_rows(device: &Device) {
    let mut rng = common::rng();
    check_packed::<bf16>(device, &mut rng, 16, 4500, 520, true);
    check_packed::<f16>(device, &mut rng, 9, 4350, 4200, false);
    check_packed::<bf16>(device, &mut rng, 1, 70, 4096 * 2 + 640, true);
    check_packed::<f16>(device, &mut rng, 16, 33, 12_321, false);
    check_packed::<bf16>(device, &mut rng, 40, 96, 9000, true);
}

/// The packed forward equals the training form's forward for weights without zeros.
fn packed_matches_training_form(device: &Device) {
    let mut rng = common::rng();
    let cpu = Device::Cpu;
    for &(tokens, d_out, d_in) in &[(4, 48, 300), (33, 20, 96)] {
        let p = Params::random(&mut rng, d_out, d_in, true, 1.0);
        assert!(p.w.iter().all(|&w| w != 0.0));
        let x_values: Vec<bf16> = uniform(&mut rng, tokens * d_in);
        let x_f32: Vec<f32> = x_values.iter().map(|v| v.to_f32()).collect();
        let (w, alpha, beta, bias) = p.tensors(&cpu);
        let training = binary_linear_forward(
            &tensor(x_f32, &[tokens, d_in], &cpu),
            BinaryLinear {
                weight: &w,
                alpha: &alpha,
                beta: &beta,
                bias: bias.as_ref(),
            },
        )
        .unwrap();
        let (w, alpha, beta, bias) = p.tensors(device);
        let bits = binary_pack(&w).unwrap();
        let packed = binary_packed_forward(
            &tensor(x_values, &[tokens, d_in], device),
            PackedBinaryLinear {
                bits: &bits,
                alpha: &alpha,
                beta: &beta,
                bias: bias.as_ref(),
                d_in,
            },
        )
        .unwrap();
        assert_close(
            &format!("packed vs training form, {tokens} tokens on {device}"),
            &values::<bf16>(&packed),
            &values::<f32>(&training),
            bf16::MATMUL_TOLERANCE,
        );
    }
}

/// sign(0): the training form gives a zero weight β_j alone, the packed form α_j + β_j.
fn sign_zero_convention(device: &Device) {
    let cpu = Device::Cpu;
    // Row 0 is all zeros (+0 and -0), row 1 has no zeros.
    let w = vec![0.0f32, -0.0, 0.0, 0.5, -0.5, 0.25];
    let alpha = vec![1.0f32, 2.0, 4.0];
    let beta = vec![0.5f32, 0.25, -0.125];
    let x = vec![1.0f32, 1.0, 1.0];
    let t = |v: &Vec<f32>, shape: &[usize], d: &Device| tensor(v.clone(), shape, d);
    let training = binary_linear_forward(
        &t(&x, &[1, 3], &cpu),
        BinaryLinear {
            weight: &t(&w, &[2, 3], &cpu),
            alpha: &t(&alpha, &[3], &cpu),
            beta: &t(&beta, &[3], &cpu),
            bias: None,
        },
    )
    .unwrap()
    .to_vec::<f32>()
    .unwrap();
    // Row 0: Σ β = 0.625; row 1: (1+0.5) + (−2+0.25) + (4−0.125) = 3.625.
    assert_eq!(training, vec![0.625, 3.625]);
    let bits = binary_pack(&t(&w, &[2, 3], device)).unwrap();
    assert_eq!(bits.to_vec::<u32>().unwrap(), vec![0b000, 0b010], "zeros pack to +1");
    let x_half: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let packed = binary_packed_forward(
        &tensor(x_half, &[1, 3], device),
        PackedBinaryLinear {
            bits: &bits,
            alpha: &t(&alpha, &[3], device),
            beta: &t(&beta, &[3], device),
            bias: None,
            d_in: 3,
        },
    )
    .unwrap();
    // Row 0: Σ (α + β) = 7.625 (exact in bf16); row 1 as in the training form.
    assert_eq!(values::<bf16>(&packed), vec![7.625, 3.625]);
}

/// The distillation loss and gradient in f64 from the exact logits:
/// `L = (1/R) Σ_r [(1−w)·(−Σ_c p_T log p_S) + w·(−log p_S[label])]`.
fn distill_reference(
    student: &[f64],
    teacher: &[f64],
    labels: Option<&[u32]>,
    ce_weight: f64,
    rows: usize,
    vocab: usize,
) -> (f64, Vec<f64>) {
    let log_softmax = |z: &[f64]| -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - lse).collect()
    };
    let mut loss = 0.0;
    let mut grad = vec![0.0; rows * vocab];
    for r in 0..rows {
        let ls = log_softmax(&student[r * vocab..(r + 1) * vocab]);
        let lt = log_softmax(&teacher[r * vocab..(r + 1) * vocab]);
        let mut ad = 0.0;
        for c in 0..vocab {
            let p_t = lt[c].exp();
            if p_t > 0.0 {
                ad -= p_t * ls[c];
            }
        }
        let label = labels.map(|l| l[r] as usize);
        let ce = label.map_or(0.0, |l| -ls[l]);
        loss += (1.0 - ce_weight) * ad + ce_weight * ce;
        for c in 0..vocab {
            let (p_s, p_t) = (ls[c].exp(), lt[c].exp());
            let hot = if label == Some(c) { 1.0 } else { 0.0 };
            grad[r * vocab + c] = ((1.0 - ce_weight) * (p_s - p_t) + ce_weight * (p_s - hot)) / rows as f64;
        }
    }
    (loss / rows as f64, grad)
}

/// Runs the loss on logits `center + uniform(−spread, spread)` and checks it, its gradient
/// (poisoned first) and, for pure distillation, the identity `L_AD = KL(p_T‖p_S) + H(p_T)`.
#[allow(clippy::too_many_arguments)]
fn check_distill<T: Float>(
    device: &Device,
    rng: &mut StdRng,
    rows: usize,
    vocab: usize,
    ce_weight: f32,
    center: f32,
    spread: f32,
    tolerance: f64,
) {
    let student: Vec<T> = uniform_in(rng, rows * vocab, center - spread, center + spread);
    let teacher: Vec<T> = uniform_in(rng, rows * vocab, center - spread, center + spread);
    let labels: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
    let s = tensor(student.clone(), &[rows, vocab], device);
    let t = tensor(teacher.clone(), &[rows, vocab], device);
    let l = tensor(labels.clone(), &[rows], device);
    let with_labels = ce_weight > 0.0 || rows.is_multiple_of(2);
    let mut loss = Tensor::zeros(&[1], DType::F32, device).unwrap();
    let mut grad = Tensor::zeros(&[rows, vocab], T::DTYPE, device).unwrap();
    loss.fill_bytes(0xFF).unwrap();
    grad.fill_bytes(0xFF).unwrap();
    distill_loss_into(&s, &t, with_labels.then_some(&l), ce_weight, &mut loss, &mut grad).unwrap();
    let (s64, t64) = (common::to_f64(&student), common::to_f64(&teacher));
    let (want_loss, want_grad) = distill_reference(
        &s64,
        &t64,
        with_labels.then_some(&labels[..]),
        ce_weight as f64,
        rows,
        vocab,
    );
    let what = format!(
        "{} rows={rows} vocab={vocab} w={ce_weight} logits {center}±{spread} on {device}",
        T::DTYPE
    );
    let got_loss = values::<f32>(&loss)[0];
    assert!(
        (got_loss - want_loss).abs() <= tolerance * want_loss.abs().max(1.0),
        "{what}: loss {got_loss}, expected {want_loss}"
    );
    // The gradient is a difference of probabilities: compared at the size of the probabilities.
    let scale = 1.0 / rows as f64 * (rows as f64).sqrt();
    common::assert_close_at_scale(
        &format!("grad {what}"),
        &values::<T>(&grad),
        &want_grad,
        tolerance,
        scale,
    );
    if ce_weight == 0.0 {
        // Cross-entropy = KL + entropy, row by row, in f64 from the exact logits.
        let mut kl_plus_h = 0.0;
        for r in 0..rows {
            let row = |z: &[f64]| -> Vec<f64> {
                let z = &z[r * vocab..(r + 1) * vocab];
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                z.iter().map(|v| v - lse).collect()
            };
            let (ls, lt) = (row(&s64), row(&t64));
            for c in 0..vocab {
                let p = lt[c].exp();
                kl_plus_h += p * (lt[c] - ls[c]) - p * lt[c];
            }
        }
        kl_plus_h /= rows as f64;
        assert!(
            (got_loss - kl_plus_h).abs() <= tolerance * kl_plus_h.abs().max(1.0),
            "{what}: loss {got_loss} is not KL + H = {kl_plus_h}"
        );
    }
}

fn small_distill_loss(device: &Device) {
    let mut rng = common::rng();
    check_distill::<f32>(device, &mut rng, 3, 700, 0.5, 0.0, 4.0, 1e-5);
}

fn distill_loss_f32(device: &Device) {
    let mut rng = common::rng();
    for &(rows, vocab) in &[(1, 1), (1, 7), (2, 33), (5, 1023), (7, 1025), (3, 32_000)] {
        for ce_weight in [0.0, 0.5, 1.0] {
            check_distill::<f32>(device, &mut rng, rows, vocab, ce_weight, 0.0, 8.0, 1e-5);
        }
    }
}

fn distill_loss_bf16(device: &Device) {
    let mut rng = common::rng();
    for &(rows, vocab) in &[(1, 17), (4, 513), (6, 32_000)] {
        check_distill::<bf16>(device, &mut rng, rows, vocab, 0.0, 0.0, 8.0, 1e-2);
        check_distill::<bf16>(device, &mut rng, rows, vocab, 0.5, 0.0, 8.0, 1e-2);
    }
}

fn distill_loss_f16(device: &Device) {
    let mut rng = common::rng();
    for &(rows, vocab) in &[(1, 17), (4, 513), (6, 32_000)] {
        check_distill::<f16>(device, &mut rng, rows, vocab, 0.0, 0.0, 8.0, 2e-3);
        check_distill::<f16>(device, &mut rng, rows, vocab, 0.5, 0.0, 8.0, 2e-3);
    }
}

/// Logits far beyond exp's f32 range (e^89 overflows): the running maxima keep every exponent
/// at most 0.
fn distill_loss_large_logits(device: &Device) {
    let mut rng = common::rng();
    check_distill::<f32>(device, &mut rng, 4, 2000, 0.0, 3000.0, 20.0, 1e-5);
    check_distill::<f32>(device, &mut rng, 4, 2000, 0.5, -3000.0, 60.0, 1e-5);
    check_distill::<bf16>(device, &mut rng, 3, 4000, 0.5, 200.0, 30.0, 1e-2);
    check_distill::<f16>(device, &mut rng, 3, 4000, 0.0, 1000.0, 30.0, 2e-3);
}

/// A teacher whose softmax is one-hot (−∞ elsewhere) makes the distillation loss the ordinary
/// cross-entropy on that label.
fn distill_one_hot_teacher_is_cross_entropy(device: &Device) {
    let mut rng = common::rng();
    let (rows, vocab) = (5, 300);
    let student: Vec<f32> = uniform_in(&mut rng, rows * vocab, -6.0, 6.0);
    let labels: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut teacher = vec![f32::NEG_INFINITY; rows * vocab];
    for (r, &l) in labels.iter().enumerate() {
        teacher[r * vocab + l as usize] = 1.0;
    }
    let s = tensor(student, &[rows, vocab], device);
    let l = tensor(labels, &[rows], device);
    let (ad, ad_grad) = distill_loss(&s, &tensor(teacher, &[rows, vocab], device), None, 0.0).unwrap();
    let (ce, ce_grad) = distill_loss(&s, &s, Some(&l), 1.0).unwrap();
    let (ad, ce) = (values::<f32>(&ad)[0], values::<f32>(&ce)[0]);
    assert!(
        (ad - ce).abs() <= 1e-5 * ce.abs(),
        "one-hot distillation {ad} vs cross-entropy {ce}"
    );
    assert_close("gradients", &values::<f32>(&ad_grad), &values::<f32>(&ce_grad), 1e-5);
}

/// A vocabulary much wider than a block's threads, not a multiple of them.
fn distill_wide_vocabulary(device: &Device) {
    let mut rng = common::rng();
    check_distill::<bf16>(device, &mut rng, 2, 128_257, 0.5, 0.0, 10.0, 1e-2);
}

fn xnor_init_on_device(device: &Device) {
    let mut rng = common::rng();
    let (d_out, d_in) = (33, 17);
    let w: Vec<f32> = uniform(&mut rng, d_out * d_in);
    let (alpha, beta) = binary_init(&tensor(w.clone(), &[d_out, d_in], device)).unwrap();
    assert_eq!(alpha.device(), *device);
    let (alpha_cpu, beta_cpu) = binary_init(&tensor(w, &[d_out, d_in], &Device::Cpu)).unwrap();
    assert_eq!(bytes(&alpha), bytes(&alpha_cpu));
    assert_eq!(bytes(&beta), bytes(&beta_cpu));
}

/// The training form takes f32 activations on the CPU only; a GPU runs it in bf16 or f16.
fn training_form_device_support(device: &Device) {
    let mut rng = common::rng();
    let p = Params::random(&mut rng, 3, 5, false, 1.0);
    let (w, alpha, beta, _) = p.tensors(device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let x = tensor(uniform::<f32>(&mut rng, 10), &[2, 5], device);
    let dy = tensor(uniform::<f32>(&mut rng, 6), &[2, 3], device);
    let forward = binary_linear_forward(&x, layer);
    let backward = binary_linear_backward(&dy, &x, layer);
    if device.is_cuda() {
        assert_invalid(forward, "binary_linear_forward", "x", &["bf16", "f32"]);
        assert_invalid(backward, "binary_linear_backward", "x", &["bf16", "f32"]);
    } else {
        assert_eq!(forward.unwrap().shape(), &[2, 3]);
        assert_eq!(backward.unwrap().d_weight.shape(), &[3, 5]);
    }
    let x_half = tensor(uniform::<bf16>(&mut rng, 10), &[2, 5], device);
    let y = binary_linear_forward(&x_half, layer).unwrap();
    assert_eq!(
        (y.shape(), y.dtype(), y.device()),
        (&[2usize, 3][..], DType::BF16, device.clone())
    );
}

/// A tensor whose every element is NaN (all bits set).
fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut t = Tensor::zeros(shape, dtype, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

/// Gradients for a layer of this shape, every element NaN.
fn poisoned_grads(
    dtype: DType,
    tokens: usize,
    d_out: usize,
    d_in: usize,
    bias: bool,
    device: &Device,
) -> BinaryLinearGrads {
    BinaryLinearGrads {
        d_x: poisoned(&[tokens, d_in], dtype, device),
        d_weight: poisoned(&[d_out, d_in], DType::F32, device),
        d_alpha: poisoned(&[d_in], DType::F32, device),
        d_beta: poisoned(&[d_in], DType::F32, device),
        d_bias: bias.then(|| poisoned(&[d_out], DType::F32, device)),
    }
}

/// `assert_close`, and every element within `4·tolerance` of the reference's size (its own
/// magnitude plus the output's root mean square), so that one wrong element cannot hide in a norm.
fn assert_each_close(what: &str, got: &[f64], want: &[f64], tolerance: f64) {
    assert_close(what, got, want, tolerance);
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    for (e, (g, w)) in got.iter().zip(want).enumerate() {
        let bound = 4.0 * tolerance * (w.abs() + rms) + 1e-30;
        assert!(
            (g - w).abs() <= bound,
            "{what}: element {e} is {g}, expected {w} (bound {bound})"
        );
    }
}

/// The training form's forward and backward on activations of dtype `T` (poisoned outputs)
/// against the f64 references from the exact inputs. `grad_tolerance` applies to the f32
/// gradients (dW, dα, dβ, db), whose products of T values are exact and summed in f32.
#[allow(clippy::too_many_arguments)]
fn check_training<T: Float>(
    device: &Device,
    rng: &mut StdRng,
    tokens: usize,
    d_out: usize,
    d_in: usize,
    with_bias: bool,
    w_range: f32,
    grad_tolerance: f64,
) {
    let p = Params::random(rng, d_out, d_in, with_bias, w_range);
    let (w, alpha, beta, bias) = p.tensors(device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
    };
    let x_values: Vec<T> = uniform(rng, tokens * d_in);
    let dy_values: Vec<T> = uniform(rng, tokens * d_out);
    let x = tensor(x_values.clone(), &[tokens, d_in], device);
    let dy = tensor(dy_values.clone(), &[tokens, d_out], device);
    let (w64, a64, b64, bias64) = p.f64s();
    let (x64, dy64) = (common::to_f64(&x_values), common::to_f64(&dy_values));
    let what = format!(
        "{} tokens={tokens} d_out={d_out} d_in={d_in} bias={with_bias} on {device}",
        T::DTYPE
    );

    let mut y = poisoned(&[tokens, d_out], T::DTYPE, device);
    binary_linear_forward_into(&x, layer, &mut y).unwrap();
    let reference = dense_forward(&x64, &w64, &a64, &b64, bias64.as_deref(), tokens, d_out, d_in, sign);
    assert_each_close(
        &format!("forward {what}"),
        &values::<T>(&y),
        &reference,
        T::MATMUL_TOLERANCE,
    );
    let allocated = binary_linear_forward(&x, layer).unwrap();
    assert_eq!(bytes(&allocated), bytes(&y), "allocating forward {what}");

    let mut grads = poisoned_grads(T::DTYPE, tokens, d_out, d_in, with_bias, device);
    binary_linear_backward_into(&dy, &x, layer, &mut grads).unwrap();
    let (d_x, d_alpha, d_beta, d_w, d_b) = backward_reference(&dy64, &x64, &w64, &a64, &b64, tokens, d_out, d_in);
    assert_each_close(
        &format!("dX {what}"),
        &values::<T>(&grads.d_x),
        &d_x,
        T::MATMUL_TOLERANCE,
    );
    assert_each_close(
        &format!("dW {what}"),
        &values::<f32>(&grads.d_weight),
        &d_w,
        grad_tolerance,
    );
    assert_each_close(
        &format!("dα {what}"),
        &values::<f32>(&grads.d_alpha),
        &d_alpha,
        grad_tolerance,
    );
    assert_each_close(
        &format!("dβ {what}"),
        &values::<f32>(&grads.d_beta),
        &d_beta,
        grad_tolerance,
    );
    if let Some(db) = &grads.d_bias {
        assert_each_close(&format!("db {what}"), &values::<f32>(db), &d_b, grad_tolerance);
    }
    let allocated = binary_linear_backward(&dy, &x, layer).unwrap();
    assert_eq!(
        bytes(&allocated.d_x),
        bytes(&grads.d_x),
        "allocating backward dX {what}"
    );
    assert_eq!(
        bytes(&allocated.d_weight),
        bytes(&grads.d_weight),
        "allocating backward dW {what}"
    );
    assert_eq!(allocated.d_bias.is_some(), with_bias);
}

/// The f32 gradients' tolerance for half-precision activations: exact products, f32 sums of up to
/// ~1000 terms (tensor cores included).
const HALF_GRAD_TOLERANCE: f64 = 2e-4;

fn small_training_form(device: &Device) {
    let mut rng = common::rng();
    check_training::<bf16>(device, &mut rng, 70, 9, 37, true, 1.0, HALF_GRAD_TOLERANCE);
}

/// The spec's hand fixture in bf16, where every value is exact: bit-for-bit on every device.
fn training_hand_fixture(device: &Device) {
    let w = tensor(vec![0.3f32, -0.2, -0.1, 0.4], &[2, 2], device);
    let alpha = tensor(vec![1.0f32, 2.0], &[2], device);
    let beta = tensor(vec![0.5f32, -0.5], &[2], device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let half = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let x = tensor(half(&[1.0, 2.0]), &[1, 2], device);
    let y = binary_linear_forward(&x, layer).unwrap();
    assert_eq!(values::<bf16>(&y), vec![-3.5, 2.5]);
    let dy = tensor(half(&[1.0, 1.0]), &[1, 2], device);
    let grads = binary_linear_backward(&dy, &x, layer).unwrap();
    assert_eq!(values::<bf16>(&grads.d_x), vec![1.0, -1.0]);
    assert_eq!(grads.d_alpha.to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
    assert_eq!(grads.d_beta.to_vec::<f32>().unwrap(), vec![2.0, 4.0]);
    assert_eq!(grads.d_weight.to_vec::<f32>().unwrap(), vec![1.0, 4.0, 1.0, 4.0]);
}

/// Odd shapes: 1, 7, 17, 113, 1023, 1025 in every dimension, rows of the GEMM operands padded
/// (d_in + 4 up to a multiple of 8), several token chunks of the column reductions, latent
/// weights beyond ±1 (no clipping).
fn training_cases<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let tolerance = HALF_GRAD_TOLERANCE;
    for &(tokens, d_out, d_in, bias, w_range) in &[
        (1, 1, 1, true, 1.0),
        (3, 4, 8, false, 1.0),
        (7, 17, 33, true, 4.0),
        (17, 113, 7, true, 1.0),
        (65, 64, 1025, false, 1.0),
        (130, 1023, 17, true, 1.0),
        (TRAIN_CHUNK_ROWS, 7, 1023, true, 4.0),
        (113, 1025, 113, false, 1.0),
    ] {
        check_training::<T>(device, &mut rng, tokens, d_out, d_in, bias, w_range, tolerance);
    }
}

fn training_form_bf16(device: &Device) {
    training_cases::<bf16>(device);
}

fn training_form_f16(device: &Device) {
    training_cases::<f16>(device);
}

fn training_form_f32_on_cpu(device: &Device) {
    if device.is_cuda() {
        return; // rejected on a GPU: training_form_device_support
    }
    let mut rng = common::rng();
    for &(tokens, d_out, d_in) in &[(1, 1, 1), (7, 17, 33), (130, 33, 1025)] {
        check_training::<f32>(device, &mut rng, tokens, d_out, d_in, true, 1.0, 1e-5);
    }
}

/// Enough tokens for many column-reduction chunks and a GEMM with a long token reduction (dW).
fn training_form_many_tokens(device: &Device) {
    let mut rng = common::rng();
    check_training::<bf16>(device, &mut rng, 1000, 96, 200, true, 1.0, HALF_GRAD_TOLERANCE);
}

/// Central differences in f64 of `L = Σ dY ⊙ Y(X, α, β, b)` at the exact f16 inputs, against the
/// backward on this device.
fn training_finite_differences(device: &Device) {
    let mut rng = common::rng();
    let (tokens, d_out, d_in) = (3, 4, 8);
    let p = Params::random(&mut rng, d_out, d_in, true, 1.0);
    let (w, alpha, beta, bias) = p.tensors(device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
    };
    let x_values: Vec<f16> = uniform(&mut rng, tokens * d_in);
    let dy_values: Vec<f16> = uniform(&mut rng, tokens * d_out);
    let grads = binary_linear_backward(
        &tensor(dy_values.clone(), &[tokens, d_out], device),
        &tensor(x_values.clone(), &[tokens, d_in], device),
        layer,
    )
    .unwrap();
    let (w64, a64, b64, bias64) = p.f64s();
    let (x64, dy64) = (common::to_f64(&x_values), common::to_f64(&dy_values));
    let loss = |x: &[f64], a: &[f64], b: &[f64], bias: &[f64]| -> f64 {
        dense_forward(x, &w64, a, b, Some(bias), tokens, d_out, d_in, sign)
            .iter()
            .zip(&dy64)
            .map(|(y, g)| y * g)
            .sum()
    };
    let h = 1e-6;
    let mut inputs = [x64, a64, b64, bias64.unwrap()];
    let analytic = [
        values::<f16>(&grads.d_x),
        values::<f32>(&grads.d_alpha),
        values::<f32>(&grads.d_beta),
        values::<f32>(grads.d_bias.as_ref().unwrap()),
    ];
    // dX is rounded to f16; the others are f32 sums of exact products.
    let tolerances = [f16::MATMUL_TOLERANCE, 1e-5, 1e-5, 1e-5];
    for (which, name) in ["x", "alpha", "beta", "bias"].iter().enumerate() {
        let mut numeric = Vec::new();
        for e in 0..inputs[which].len() {
            let keep = inputs[which][e];
            inputs[which][e] = keep + h;
            let up = loss(&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
            inputs[which][e] = keep - h;
            let down = loss(&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
            inputs[which][e] = keep;
            numeric.push((up - down) / (2.0 * h));
        }
        assert_close(
            &format!("finite differences of {name} on {device}"),
            &analytic[which],
            &numeric,
            tolerances[which],
        );
    }
}

/// The `_into` forms' outputs and the backward's inputs are validated, and a failed call leaves
/// every output as it was.
fn training_errors(device: &Device) {
    let mut rng = common::rng();
    let (tokens, d_out, d_in) = (3, 6, 40);
    let p = Params::random(&mut rng, d_out, d_in, true, 1.0);
    let (w, alpha, beta, bias) = p.tensors(device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
    };
    let x = tensor(uniform::<bf16>(&mut rng, tokens * d_in), &[tokens, d_in], device);
    let dy = tensor(uniform::<bf16>(&mut rng, tokens * d_out), &[tokens, d_out], device);
    let op = "binary_linear_forward";
    let mut y_f16 = tensor(uniform::<f16>(&mut rng, tokens * d_out), &[tokens, d_out], device);
    let before = bytes(&y_f16);
    assert_invalid(
        binary_linear_forward_into(&x, layer, &mut y_f16),
        op,
        "y",
        &["bf16", "f16"],
    );
    assert_eq!(bytes(&y_f16), before);
    let mut y_short = tensor(uniform::<bf16>(&mut rng, tokens * d_in), &[tokens, d_in], device);
    assert_invalid(
        binary_linear_forward_into(&x, layer, &mut y_short),
        op,
        "y",
        &["[3, 6]"],
    );

    let op = "binary_linear_backward";
    let dy_f16 = tensor(uniform::<f16>(&mut rng, tokens * d_out), &[tokens, d_out], device);
    assert_invalid(binary_linear_backward(&dy_f16, &x, layer), op, "d_y", &["bf16", "f16"]);
    let mut grads = poisoned_grads(DType::BF16, tokens, d_out, d_in, true, device);
    let snapshot = |g: &BinaryLinearGrads| {
        [&g.d_x, &g.d_weight, &g.d_alpha, &g.d_beta, g.d_bias.as_ref().unwrap()]
            .iter()
            .map(|t| bytes(t))
            .collect::<Vec<_>>()
    };
    let before = snapshot(&grads);
    let no_bias = BinaryLinear { bias: None, ..layer };
    assert_invalid(
        binary_linear_backward_into(&dy, &x, no_bias, &mut grads),
        op,
        "grads.d_bias",
        &["no bias"],
    );
    grads.d_alpha = tensor(vec![0.0f32; d_in + 1], &[d_in + 1], device);
    assert_invalid(
        binary_linear_backward_into(&dy, &x, layer, &mut grads),
        op,
        "grads.d_alpha",
        &["[40]", "[41]"],
    );
    grads.d_alpha = poisoned(&[d_in], DType::F32, device);
    grads.d_weight = tensor(uniform::<bf16>(&mut rng, d_out * d_in), &[d_out, d_in], device);
    assert_invalid(
        binary_linear_backward_into(&dy, &x, layer, &mut grads),
        op,
        "grads.d_weight",
        &["f32", "bf16"],
    );
    grads.d_weight = poisoned(&[d_out, d_in], DType::F32, device);
    let mut missing = BinaryLinearGrads { d_bias: None, ..grads };
    assert_invalid(
        binary_linear_backward_into(&dy, &x, layer, &mut missing),
        op,
        "grads.d_bias",
        &["has a bias"],
    );
    missing.d_bias = Some(poisoned(&[d_out], DType::F32, device));
    assert_eq!(snapshot(&missing), before, "a failed backward wrote into its outputs");
}

fn errors_name_the_argument(device: &Device) {
    let mut rng = common::rng();
    let (d_out, d_in) = (6, 40);
    let p = Params::random(&mut rng, d_out, d_in, true, 1.0);
    let (w, alpha, beta, bias) = p.tensors(device);
    let short = tensor(vec![1.0f32; d_in - 1], &[d_in - 1], device);
    let x = tensor(uniform::<f32>(&mut rng, 2 * d_in), &[2, d_in], device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
    };
    let op = "binary_linear_forward";
    assert_invalid(
        binary_linear_forward(&x, BinaryLinear { alpha: &short, ..layer }),
        op,
        "alpha",
        &["[40]", "[39]"],
    );
    assert_invalid(
        binary_linear_forward(&x, BinaryLinear { beta: &short, ..layer }),
        op,
        "beta",
        &["[40]"],
    );
    assert_invalid(
        binary_linear_forward(
            &x,
            BinaryLinear {
                bias: Some(&short),
                ..layer
            },
        ),
        op,
        "bias",
        &["[6]"],
    );
    let x_wide = tensor(uniform::<f32>(&mut rng, 2 * (d_in + 1)), &[2, d_in + 1], device);
    assert_invalid(binary_linear_forward(&x_wide, layer), op, "x", &["(tokens, 40)"]);
    let dy_bad = tensor(uniform::<f32>(&mut rng, 3 * d_out), &[3, d_out], device);
    assert_invalid(
        binary_linear_backward(&dy_bad, &x, layer),
        "binary_linear_backward",
        "d_y",
        &["[2, 6]"],
    );
    let w_half = tensor(uniform::<bf16>(&mut rng, d_out * d_in), &[d_out, d_in], device);
    assert_invalid(binary_pack(&w_half), "binary_pack", "weight", &["f32", "bf16"]);

    // Packed: bits of the wrong length, d_in inconsistent with the bits, α of the wrong length.
    let bits = binary_pack(&w).unwrap();
    let x_half = tensor(uniform::<bf16>(&mut rng, 2 * d_in), &[2, d_in], device);
    let packed = PackedBinaryLinear {
        bits: &bits,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
        d_in,
    };
    let op = "binary_packed_forward";
    let corrupt = tensor(vec![0u32; d_out * 3], &[d_out, 3], device);
    assert_invalid(
        binary_packed_forward(
            &x_half,
            PackedBinaryLinear {
                bits: &corrupt,
                ..packed
            },
        ),
        op,
        "bits",
        &["2 u32 words", "[6, 3]"],
    );
    let flat = tensor(vec![0u32; d_out * 2], &[d_out * 2], device);
    assert_invalid(
        binary_packed_forward(&x_half, PackedBinaryLinear { bits: &flat, ..packed }),
        op,
        "bits",
        &["2-d"],
    );
    assert_invalid(
        binary_packed_forward(&x_half, PackedBinaryLinear { d_in: 65, ..packed }),
        op,
        "bits",
        &["3 u32 words"],
    );
    assert_invalid(
        binary_packed_forward(
            &x_half,
            PackedBinaryLinear {
                alpha: &short,
                ..packed
            },
        ),
        op,
        "alpha",
        &["[40]"],
    );
    assert_invalid(
        binary_packed_forward(&x_half, PackedBinaryLinear { d_in: 0, ..packed }),
        op,
        "d_in",
        &["between 1"],
    );
    assert_invalid(binary_unpack(&corrupt, d_in), "binary_unpack", "bits", &["2 u32 words"]);
    let mut y_wrong = Tensor::zeros(&[2, d_out + 1], DType::BF16, device).unwrap();
    assert_invalid(
        binary_packed_forward_into(&x_half, packed, &mut y_wrong),
        op,
        "y",
        &["[2, 6]"],
    );

    // Distillation.
    let op = "distill_loss";
    let s = tensor(uniform::<f32>(&mut rng, 2 * 10), &[2, 10], device);
    let t_bad = tensor(uniform::<f32>(&mut rng, 2 * 11), &[2, 11], device);
    assert_invalid(distill_loss(&s, &t_bad, None, 0.0), op, "teacher", &["[2, 10]"]);
    let t_half = tensor(uniform::<bf16>(&mut rng, 2 * 10), &[2, 10], device);
    assert_invalid(distill_loss(&s, &t_half, None, 0.0), op, "teacher", &["f32", "bf16"]);
    assert_invalid(distill_loss(&s, &s, None, 0.5), op, "labels", &["ce_weight = 0.5"]);
    assert_invalid(distill_loss(&s, &s, None, 1.5), op, "ce_weight", &["[0, 1]"]);
    assert_invalid(distill_loss(&s, &s, None, f32::NAN), op, "ce_weight", &["NaN"]);
    let labels_far = tensor(vec![3u32, 10], &[2], device);
    assert_invalid(
        distill_loss(&s, &s, Some(&labels_far), 0.5),
        op,
        "labels",
        &["below", "10 at row 1"],
    );
    let labels_short = tensor(vec![3u32], &[1], device);
    assert_invalid(distill_loss(&s, &s, Some(&labels_short), 0.5), op, "labels", &["[2]"]);
}

/// A failed call writes nothing into its outputs.
fn errors_leave_outputs_unchanged(device: &Device) {
    let mut rng = common::rng();
    let (d_out, d_in) = (5, 20);
    let p = Params::random(&mut rng, d_out, d_in, false, 1.0);
    let (w, alpha, _, _) = p.tensors(device);
    let bits = binary_pack(&w).unwrap();
    let x = tensor(uniform::<bf16>(&mut rng, 3 * d_in), &[3, d_in], device);
    let short = tensor(vec![1.0f32; d_in - 1], &[d_in - 1], device);
    let mut y = tensor(uniform::<bf16>(&mut rng, 3 * d_out), &[3, d_out], device);
    let before = bytes(&y);
    let layer = PackedBinaryLinear {
        bits: &bits,
        alpha: &alpha,
        beta: &short,
        bias: None,
        d_in,
    };
    assert!(binary_packed_forward_into(&x, layer, &mut y).is_err());
    assert_eq!(bytes(&y), before);

    let s = tensor(uniform::<f32>(&mut rng, 2 * 10), &[2, 10], device);
    let labels = tensor(vec![3u32, 11], &[2], device);
    let mut loss = tensor(vec![7.0f32], &[1], device);
    let mut grad = tensor(uniform::<f32>(&mut rng, 20), &[2, 10], device);
    let (loss_before, grad_before) = (bytes(&loss), bytes(&grad));
    assert!(distill_loss_into(&s, &s, Some(&labels), 0.5, &mut loss, &mut grad).is_err());
    assert_eq!(bytes(&loss), loss_before);
    assert_eq!(bytes(&grad), grad_before);
}

// ---- the model's entry points: weight layout and accumulation --------------------------------

/// `[rows, cols]` row-major values transposed.
fn transpose<V: Copy>(v: &[V], rows: usize, cols: usize) -> Vec<V> {
    (0..rows * cols).map(|k| v[(k % rows) * cols + k / rows]).collect()
}

/// The forward with the weight in `layout`, and the backward adding to prior gradients (random,
/// so that a dropped or doubled prior shows): each against the f64 references. dX is added to
/// with `accumulate_d_x`, else overwritten (poisoned first); then a frozen layer's call (dX
/// alone) and a call asking for the parameters' gradients alone.
#[allow(clippy::too_many_arguments)]
fn check_layout_accumulate<T: Float>(
    device: &Device,
    rng: &mut StdRng,
    tokens: usize,
    d_out: usize,
    d_in: usize,
    with_bias: bool,
    layout: BinaryWeightLayout,
    accumulate_d_x: bool,
) {
    let p = Params::random(rng, d_out, d_in, with_bias, 1.0);
    let (_, alpha, beta, bias) = p.tensors(device);
    let input_major = layout == BinaryWeightLayout::InputMajor;
    let w = match input_major {
        true => tensor(transpose(&p.w, d_out, d_in), &[d_in, d_out], device),
        false => tensor(p.w.clone(), &[d_out, d_in], device),
    };
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: bias.as_ref(),
    };
    let x_values: Vec<T> = uniform(rng, tokens * d_in);
    let dy_values: Vec<T> = uniform(rng, tokens * d_out);
    let x = tensor(x_values.clone(), &[tokens, d_in], device);
    let dy = tensor(dy_values.clone(), &[tokens, d_out], device);
    let (w64, a64, b64, bias64) = p.f64s();
    let (x64, dy64) = (common::to_f64(&x_values), common::to_f64(&dy_values));
    let what = format!(
        "{} tokens={tokens} d_out={d_out} d_in={d_in} bias={with_bias} {layout:?} accumulate_d_x={accumulate_d_x} on {device}",
        T::DTYPE
    );

    let mut y = poisoned(&[tokens, d_out], T::DTYPE, device);
    binary_linear_forward_layout_into(&x, layer, layout, &mut y).unwrap();
    let reference = dense_forward(&x64, &w64, &a64, &b64, bias64.as_deref(), tokens, d_out, d_in, sign);
    assert_each_close(
        &format!("forward {what}"),
        &values::<T>(&y),
        &reference,
        T::MATMUL_TOLERANCE,
    );

    let (d_x, d_alpha, d_beta, d_w, d_b) = backward_reference(&dy64, &x64, &w64, &a64, &b64, tokens, d_out, d_in);
    let d_w = if input_major { transpose(&d_w, d_out, d_in) } else { d_w };
    let w_shape = w.shape().to_vec();
    let prior_x: Vec<T> = uniform(rng, tokens * d_in);
    let prior_w: Vec<f32> = uniform(rng, d_out * d_in);
    let prior_a: Vec<f32> = uniform(rng, d_in);
    let prior_b: Vec<f32> = uniform(rng, d_in);
    let prior_bias: Vec<f32> = uniform(rng, d_out);
    let mut t_x = match accumulate_d_x {
        true => tensor(prior_x.clone(), &[tokens, d_in], device),
        false => poisoned(&[tokens, d_in], T::DTYPE, device),
    };
    let mut t_w = tensor(prior_w.clone(), &w_shape, device);
    let mut t_a = tensor(prior_a.clone(), &[d_in], device);
    let mut t_b = tensor(prior_b.clone(), &[d_in], device);
    let mut t_bias = with_bias.then(|| tensor(prior_bias.clone(), &[d_out], device));
    let targets = BinaryGradTargets {
        d_x: Some(&mut t_x),
        accumulate_d_x,
        d_weight: Some(&mut t_w),
        d_alpha: Some(&mut t_a),
        d_beta: Some(&mut t_b),
        d_bias: t_bias.as_mut(),
    };
    binary_linear_backward_add(&dy, &x, layer, layout, targets).unwrap();
    let plus = |prior: Vec<f64>, add: &[f64]| prior.iter().zip(add).map(|(p, a)| p + a).collect::<Vec<_>>();
    let want_x = match accumulate_d_x {
        true => plus(common::to_f64(&prior_x), &d_x),
        false => d_x.clone(),
    };
    assert_each_close(&format!("dX {what}"), &values::<T>(&t_x), &want_x, T::MATMUL_TOLERANCE);
    let grad_tolerance = HALF_GRAD_TOLERANCE.max(T::MATMUL_TOLERANCE.min(1e-4));
    let f32_grads = [
        ("dW", &t_w, plus(common::to_f64(&prior_w), &d_w)),
        ("dα", &t_a, plus(common::to_f64(&prior_a), &d_alpha)),
        ("dβ", &t_b, plus(common::to_f64(&prior_b), &d_beta)),
    ];
    for (name, got, want) in f32_grads {
        assert_each_close(&format!("{name} {what}"), &values::<f32>(got), &want, grad_tolerance);
    }
    if let Some(t_bias) = &t_bias {
        let want = plus(common::to_f64(&prior_bias), &d_b);
        assert_each_close(&format!("db {what}"), &values::<f32>(t_bias), &want, grad_tolerance);
    }

    // A frozen layer: dX alone (overwritten).
    let mut only_x = poisoned(&[tokens, d_in], T::DTYPE, device);
    let targets = BinaryGradTargets {
        d_x: Some(&mut only_x),
        accumulate_d_x: false,
        d_weight: None,
        d_alpha: None,
        d_beta: None,
        d_bias: None,
    };
    binary_linear_backward_add(&dy, &x, layer, layout, targets).unwrap();
    assert_each_close(
        &format!("frozen dX {what}"),
        &values::<T>(&only_x),
        &d_x,
        T::MATMUL_TOLERANCE,
    );

    // The parameters' gradients alone, from zero.
    let mut t_w = tensor(vec![0.0f32; d_out * d_in], &w_shape, device);
    let mut t_a = tensor(vec![0.0f32; d_in], &[d_in], device);
    let targets = BinaryGradTargets {
        d_x: None,
        accumulate_d_x: false,
        d_weight: Some(&mut t_w),
        d_alpha: Some(&mut t_a),
        d_beta: None,
        d_bias: None,
    };
    binary_linear_backward_add(&dy, &x, layer, layout, targets).unwrap();
    assert_each_close(&format!("dW alone {what}"), &values::<f32>(&t_w), &d_w, grad_tolerance);
    assert_each_close(
        &format!("dα alone {what}"),
        &values::<f32>(&t_a),
        &d_alpha,
        grad_tolerance,
    );
}

fn small_training_layout_accumulate(device: &Device) {
    let mut rng = common::rng();
    check_layout_accumulate::<bf16>(device, &mut rng, 70, 9, 37, true, BinaryWeightLayout::InputMajor, true);
}

/// Both layouts, dX added to or overwritten, with and without a bias, odd sizes (one token, one
/// input, one output; 1025 inputs past a block's threads; more tokens than a chunk of the
/// column sums), bf16 and f16 activations (and f32 on the CPU).
fn training_layout_accumulate(device: &Device) {
    let mut rng = common::rng();
    let cases = [
        (1, 1, 1, false),
        (7, 17, 113, true),
        (70, 9, 37, true),
        (TRAIN_CHUNK_ROWS + 3, 113, 7, false),
        (17, 5, 1025, true),
    ];
    for layout in [BinaryWeightLayout::OutputMajor, BinaryWeightLayout::InputMajor] {
        for accumulate in [false, true] {
            for &(tokens, d_out, d_in, bias) in &cases {
                check_layout_accumulate::<bf16>(device, &mut rng, tokens, d_out, d_in, bias, layout, accumulate);
                check_layout_accumulate::<f16>(device, &mut rng, tokens, d_out, d_in, bias, layout, accumulate);
                if !device.is_cuda() {
                    check_layout_accumulate::<f32>(device, &mut rng, tokens, d_out, d_in, bias, layout, accumulate);
                }
            }
        }
    }
}

/// The layout's shapes are checked (an (out, in) gradient for an (in, out) weight, a bias's
/// gradient without a bias), naming the argument, and nothing is written on an error.
fn training_layout_errors(device: &Device) {
    let mut rng = common::rng();
    let (tokens, d_out, d_in) = (3, 5, 20);
    let p = Params::random(&mut rng, d_out, d_in, false, 1.0);
    let (_, alpha, beta, _) = p.tensors(device);
    let w = tensor(transpose(&p.w, d_out, d_in), &[d_in, d_out], device);
    let layer = BinaryLinear {
        weight: &w,
        alpha: &alpha,
        beta: &beta,
        bias: None,
    };
    let x = tensor(uniform::<bf16>(&mut rng, tokens * d_in), &[tokens, d_in], device);
    let dy = tensor(uniform::<bf16>(&mut rng, tokens * d_out), &[tokens, d_out], device);
    let mut y = tensor(uniform::<bf16>(&mut rng, tokens * d_out), &[tokens, d_out], device);
    let before = bytes(&y);
    // The (in, out) weight read as (out, in): x has d_out columns where d_in are expected.
    assert_invalid(
        binary_linear_forward_layout_into(&x, layer, BinaryWeightLayout::OutputMajor, &mut y),
        "binary_linear_forward",
        "alpha",
        &[],
    );
    assert_eq!(bytes(&y), before);

    let mut d_x = tensor(uniform::<bf16>(&mut rng, tokens * d_in), &[tokens, d_in], device);
    let mut wrong_w = tensor(uniform::<f32>(&mut rng, d_out * d_in), &[d_out, d_in], device);
    let mut d_a = tensor(uniform::<f32>(&mut rng, d_in), &[d_in], device);
    let (x_before, w_before, a_before) = (bytes(&d_x), bytes(&wrong_w), bytes(&d_a));
    let targets = BinaryGradTargets {
        d_x: Some(&mut d_x),
        accumulate_d_x: true,
        d_weight: Some(&mut wrong_w),
        d_alpha: Some(&mut d_a),
        d_beta: None,
        d_bias: None,
    };
    assert_invalid(
        binary_linear_backward_add(&dy, &x, layer, BinaryWeightLayout::InputMajor, targets),
        "binary_linear_backward",
        "targets.d_weight",
        &[],
    );
    let mut d_bias = tensor(uniform::<f32>(&mut rng, d_out), &[d_out], device);
    let targets = BinaryGradTargets {
        d_x: Some(&mut d_x),
        accumulate_d_x: true,
        d_weight: None,
        d_alpha: Some(&mut d_a),
        d_beta: None,
        d_bias: Some(&mut d_bias),
    };
    assert_invalid(
        binary_linear_backward_add(&dy, &x, layer, BinaryWeightLayout::InputMajor, targets),
        "binary_linear_backward",
        "targets.d_bias",
        &[],
    );
    assert_eq!(bytes(&d_x), x_before);
    assert_eq!(bytes(&wrong_w), w_before);
    assert_eq!(bytes(&d_a), a_before);
}
