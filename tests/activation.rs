//! GELU (tanh) and SwiGLU (src/ops/activation.rs) against f64 references of their formulas, on
//! every device and dtype, forward and backward, on odd sizes that exercise both the 16-byte
//! vector path and the one-element path of the kernels, with poisoned outputs; the backward
//! against finite differences of the f64 forward; and the argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_close_at_scale, assert_invalid, norm, uniform_in, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::{
    gelu_backward, gelu_backward_into, gelu_forward, gelu_forward_into, swiglu_backward, swiglu_backward_into,
    swiglu_forward, swiglu_forward_into,
};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_activation,
    gelu_all_dtypes,
    swiglu_all_dtypes,
    large_inputs_stay_finite,
    backward_matches_finite_differences,
    errors_name_the_argument,
);

fn gelu(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

fn gelu_grad(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let t = (k * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// Output rounding of the dtype plus an f32 allowance.
fn tolerance<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => 2e-6,
        DType::BF16 => 4e-3,
        _ => 1e-3,
    }
}

fn tensor<T: Float>(data: &[T], shape: &[usize], device: &Device) -> Tensor {
    Tensor::from_slice(data, shape, device).unwrap()
}

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut t = Tensor::zeros(shape, dtype, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

fn check_gelu<T: Float>(device: &Device, rng: &mut StdRng, shape: &[usize], low: f32, high: f32) {
    let n: usize = shape.iter().product();
    let x: Vec<T> = uniform_in(rng, n, low, high);
    let d_out: Vec<T> = uniform_in(rng, n, -1.0, 1.0);
    let xs = common::to_f64(&x);
    let gs = common::to_f64(&d_out);
    let x_t = tensor(&x, shape, device);
    let mut out = poisoned(shape, T::DTYPE, device);
    gelu_forward_into(&x_t, &mut out).unwrap();
    let reference: Vec<f64> = xs.iter().map(|&x| gelu(x)).collect();
    // A single near-zero output (a negative x of one element) is measured against the size of
    // the input, so that the dtype's subnormal spacing does not count as a relative error.
    let what = format!("gelu forward {} {shape:?}", T::DTYPE);
    assert_close_at_scale(
        &what,
        &values::<T>(&out),
        &reference,
        tolerance::<T>(),
        norm(xs.iter().copied()),
    );
    let mut d_x = poisoned(shape, T::DTYPE, device);
    gelu_backward_into(&x_t, &tensor(&d_out, shape, device), &mut d_x).unwrap();
    let reference: Vec<f64> = xs.iter().zip(&gs).map(|(&x, &g)| g * gelu_grad(x)).collect();
    let what = format!("gelu backward {} {shape:?}", T::DTYPE);
    assert_close_at_scale(
        &what,
        &values::<T>(&d_x),
        &reference,
        tolerance::<T>(),
        norm(gs.iter().copied()),
    );
}

fn check_swiglu<T: Float>(device: &Device, rng: &mut StdRng, rows: usize, width: usize, low: f32, high: f32) {
    let x: Vec<T> = uniform_in(rng, rows * 2 * width, low, high);
    let d_out: Vec<T> = uniform_in(rng, rows * width, -1.0, 1.0);
    let xs = common::to_f64(&x);
    let gs = common::to_f64(&d_out);
    let x_t = tensor(&x, &[rows, 2 * width], device);
    let mut out = poisoned(&[rows, width], T::DTYPE, device);
    swiglu_forward_into(&x_t, &mut out).unwrap();
    let mut reference = vec![0.0; rows * width];
    let mut d_reference = vec![0.0; rows * 2 * width];
    for r in 0..rows {
        for j in 0..width {
            let (g, u, d) = (xs[r * 2 * width + j], xs[r * 2 * width + width + j], gs[r * width + j]);
            reference[r * width + j] = silu(g) * u;
            d_reference[r * 2 * width + j] = d * u * silu_grad(g);
            d_reference[r * 2 * width + width + j] = d * silu(g);
        }
    }
    let what = format!("swiglu forward {} {rows}x{width}", T::DTYPE);
    let scale = norm(xs.iter().map(|x| x * x)) / 4.0;
    assert_close_at_scale(&what, &values::<T>(&out), &reference, tolerance::<T>(), scale);
    let mut d_x = poisoned(&[rows, 2 * width], T::DTYPE, device);
    swiglu_backward_into(&x_t, &tensor(&d_out, &[rows, width], device), &mut d_x).unwrap();
    let what = format!("swiglu backward {} {rows}x{width}", T::DTYPE);
    assert_close_at_scale(&what, &values::<T>(&d_x), &d_reference, tolerance::<T>(), scale / 4.0);
}

/// The kernels' smallest cases, for compute-sanitizer: both the vector and the scalar paths.
fn small_activation(device: &Device) {
    let mut rng = common::rng();
    check_gelu::<bf16>(device, &mut rng, &[3, 16], -3.0, 3.0);
    check_gelu::<f32>(device, &mut rng, &[7], -3.0, 3.0);
    check_swiglu::<bf16>(device, &mut rng, 3, 8, -3.0, 3.0);
    check_swiglu::<f16>(device, &mut rng, 2, 5, -3.0, 3.0);
}

/// Lengths around the vector widths (4 f32, 8 half) and the 256-thread block.
const SHAPES: [&[usize]; 8] = [
    &[1],
    &[7],
    &[17],
    &[113],
    &[8, 128],
    &[1023],
    &[1025],
    &[3, 5, 2048 + 8],
];

fn gelu_all_dtypes(device: &Device) {
    let mut rng = common::rng();
    for shape in SHAPES {
        check_gelu::<f32>(device, &mut rng, shape, -5.0, 5.0);
        check_gelu::<bf16>(device, &mut rng, shape, -5.0, 5.0);
        check_gelu::<f16>(device, &mut rng, shape, -5.0, 5.0);
    }
}

fn swiglu_all_dtypes(device: &Device) {
    let mut rng = common::rng();
    for (rows, width) in [(1, 1), (1, 8), (7, 17), (3, 113), (5, 1024), (2, 1025), (17, 4096)] {
        check_swiglu::<f32>(device, &mut rng, rows, width, -5.0, 5.0);
        check_swiglu::<bf16>(device, &mut rng, rows, width, -5.0, 5.0);
        check_swiglu::<f16>(device, &mut rng, rows, width, -5.0, 5.0);
    }
}

/// Inputs far into both tails: tanh and exp saturate without producing NaN or infinity.
fn large_inputs_stay_finite(device: &Device) {
    let mut rng = common::rng();
    check_gelu::<f32>(device, &mut rng, &[1031], -80.0, 80.0);
    check_gelu::<bf16>(device, &mut rng, &[1031], -1e4, 1e4);
    check_swiglu::<f32>(device, &mut rng, 9, 33, -80.0, 80.0);
    check_swiglu::<bf16>(device, &mut rng, 9, 40, -1e4, 1e4);
}

/// The backward formulas (and so the kernels checked against them above) are the derivatives of
/// the forward: central differences of the f64 forward agree with the f64 backward reference,
/// and the f32 kernels agree with both.
fn backward_matches_finite_differences(device: &Device) {
    let mut rng = common::rng();
    let n = 257;
    let x: Vec<f32> = uniform_in(&mut rng, n, -4.0, 4.0);
    let h = 1e-6;
    let d_x = gelu_backward(&tensor(&x, &[n], device), &tensor(&vec![1.0f32; n], &[n], device)).unwrap();
    let numeric: Vec<f64> = x
        .iter()
        .map(|&x| (gelu(x as f64 + h) - gelu(x as f64 - h)) / (2.0 * h))
        .collect();
    assert_close("gelu' by finite differences", &values::<f32>(&d_x), &numeric, 1e-6);

    let x: Vec<f32> = uniform_in(&mut rng, 2 * n, -4.0, 4.0);
    let d_x = swiglu_backward(
        &tensor(&x, &[1, 2 * n], device),
        &tensor(&vec![1.0f32; n], &[1, n], device),
    )
    .unwrap();
    let mut numeric = vec![0.0; 2 * n];
    for j in 0..n {
        let (g, u) = (x[j] as f64, x[n + j] as f64);
        numeric[j] = (silu(g + h) - silu(g - h)) / (2.0 * h) * u;
        numeric[n + j] = ((silu(g) * (u + h)) - (silu(g) * (u - h))) / (2.0 * h);
    }
    assert_close("swiglu' by finite differences", &values::<f32>(&d_x), &numeric, 1e-6);
    // The allocating forms agree with the _into forms.
    let out = swiglu_forward(&tensor(&x, &[1, 2 * n], device)).unwrap();
    assert_eq!(out.shape(), &[1, n]);
    let out = gelu_forward(&tensor(&x, &[2, n], device)).unwrap();
    assert_eq!(out.shape(), &[2, n]);
}

fn errors_name_the_argument(device: &Device) {
    let x = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    let odd = Tensor::zeros(&[4, 5], DType::BF16, device).unwrap();
    let ints = Tensor::zeros(&[4, 6], DType::U32, device).unwrap();
    let mut out = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    let before = common::bytes(&out);
    assert_invalid(gelu_forward(&ints), "gelu_forward", "x", &["u32"]);
    let mut wrong = Tensor::zeros(&[4, 6], DType::F32, device).unwrap();
    assert_invalid(
        gelu_forward_into(&x, &mut wrong),
        "gelu_forward",
        "out",
        &["bf16", "f32"],
    );
    let mut short = Tensor::zeros(&[4, 5], DType::BF16, device).unwrap();
    assert_invalid(
        gelu_forward_into(&x, &mut short),
        "gelu_forward",
        "out",
        &["[4, 6]", "[4, 5]"],
    );
    assert_invalid(
        gelu_backward_into(&x, &odd, &mut out),
        "gelu_backward",
        "d_out",
        &["[4, 6]"],
    );
    assert_invalid(swiglu_forward(&odd), "swiglu_forward", "x", &["even"]);
    let mut half = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    assert_invalid(swiglu_forward_into(&x, &mut half), "swiglu_forward", "out", &["[4, 3]"]);
    assert_invalid(
        swiglu_backward_into(&x, &x, &mut out),
        "swiglu_backward",
        "d_out",
        &["[4, 3]"],
    );
    let scalar = Tensor::zeros(&[], DType::F32, device).unwrap();
    assert_invalid(gelu_forward(&scalar), "gelu_forward", "x", &["rank"]);
    assert_eq!(common::bytes(&out), before, "a failed call wrote its output");
    if device.is_cuda() {
        let host = Tensor::zeros(&[4, 6], DType::BF16, &Device::Cpu).unwrap();
        assert_invalid(gelu_backward_into(&x, &host, &mut out), "gelu_backward", "d_out", &[]);
    }
}
