//! matmul and matmul_into against an f64 reference computed on the host from the exact input
//! values (bf16 and f16 inputs widened exactly), on every device; and their argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, bytes, to_f64, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::{matmul, matmul_into, MatmulOptions};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_matmul,
    options_defaults_and_linear,
    transposes_and_bias_f32,
    transposes_and_bias_bf16,
    transposes_and_bias_f16,
    alpha_and_beta_f32,
    alpha_and_beta_bf16,
    alpha_and_beta_f16,
    awkward_sizes_f32,
    awkward_sizes_bf16,
    awkward_sizes_f16,
    allocating_matches_in_place,
    repeated_shapes_use_the_new_operands,
    errors_name_the_argument,
    errors_leave_out_unchanged,
    half_operands_into_f32_out,
);

/// One product: `out = alpha·op(A)·op(B) + beta·out + bias`.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    bias: bool,
    alpha: f32,
    beta: f32,
    /// `matmul_into` (with a NaN-poisoned `out` when beta is 0) rather than `matmul`.
    into: bool,
}

impl Case {
    fn new(m: usize, n: usize, k: usize) -> Case {
        Case {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            bias: false,
            alpha: 1.0,
            beta: 0.0,
            into: true,
        }
    }

    fn trans(self, trans_a: bool, trans_b: bool) -> Case {
        Case {
            trans_a,
            trans_b,
            ..self
        }
    }

    fn bias(self, bias: bool) -> Case {
        Case { bias, ..self }
    }

    fn scale(self, alpha: f32, beta: f32) -> Case {
        Case { alpha, beta, ..self }
    }

    fn allocating(self) -> Case {
        Case { into: false, ..self }
    }

    fn options(&self) -> MatmulOptions {
        MatmulOptions {
            trans_a: self.trans_a,
            trans_b: self.trans_b,
            alpha: self.alpha,
            beta: self.beta,
        }
    }

    fn a_shape(&self) -> [usize; 2] {
        if self.trans_a {
            [self.k, self.m]
        } else {
            [self.m, self.k]
        }
    }

    fn b_shape(&self) -> [usize; 2] {
        if self.trans_b {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        }
    }
}

/// `alpha·op(A)·op(B) + beta·out + bias` in f64, from row-major A and B as stored; `out` is only
/// read when beta is not 0.
fn reference(c: &Case, a: &[f64], b: &[f64], bias: Option<&[f64]>, out: Option<&[f64]>) -> Vec<f64> {
    let (m, n, k) = (c.m, c.n, c.k);
    // op(A) as (m, k) rows and op(B) as (n, k) rows, so that the inner loop is a plain dot.
    let mut a_rows = vec![0.0; m * k];
    let mut b_cols = vec![0.0; n * k];
    for i in 0..m {
        for p in 0..k {
            a_rows[i * k + p] = if c.trans_a { a[p * m + i] } else { a[i * k + p] };
        }
    }
    for j in 0..n {
        for p in 0..k {
            b_cols[j * k + p] = if c.trans_b { b[j * k + p] } else { b[p * n + j] };
        }
    }
    let mut result = vec![0.0; m * n];
    for i in 0..m {
        let row = &a_rows[i * k..(i + 1) * k];
        for j in 0..n {
            let col = &b_cols[j * k..(j + 1) * k];
            let mut dot = 0.0;
            for p in 0..k {
                dot += row[p] * col[p];
            }
            let mut value = c.alpha as f64 * dot;
            if c.beta != 0.0 {
                value += c.beta as f64 * out.expect("out is read when beta != 0")[i * n + j];
            }
            if let Some(bias) = bias {
                value += bias[j];
            }
            result[i * n + j] = value;
        }
    }
    result
}

/// Runs one case on `device` with random inputs and checks it against the f64 reference.
fn check<T: Float>(device: &Device, rng: &mut StdRng, case: Case) {
    let what = format!("{} matmul on {device}: {case:?}", T::DTYPE);
    let a = uniform::<T>(rng, case.m * case.k);
    let b = uniform::<T>(rng, case.k * case.n);
    let bias = case.bias.then(|| uniform::<T>(rng, case.n));
    let a_t = Tensor::from_slice(&a, &case.a_shape(), device).unwrap();
    let b_t = Tensor::from_slice(&b, &case.b_shape(), device).unwrap();
    let bias_t = bias
        .as_ref()
        .map(|bias| Tensor::from_slice(bias, &[case.n], device).unwrap());
    let (out, previous) = if case.into {
        let (mut out, previous) = if case.beta != 0.0 {
            let previous = uniform::<T>(rng, case.m * case.n);
            let out = Tensor::from_slice(&previous, &[case.m, case.n], device).unwrap();
            (out, Some(to_f64(&previous)))
        } else {
            // Poisoned: beta = 0 must ignore the NaNs, and an element left unwritten fails.
            let mut out = Tensor::zeros(&[case.m, case.n], T::DTYPE, device).unwrap();
            out.fill_bytes(0xFF).unwrap();
            (out, None)
        };
        matmul_into(&a_t, &b_t, bias_t.as_ref(), &mut out, case.options()).unwrap_or_else(|e| panic!("{what}: {e}"));
        (out, previous)
    } else {
        let out = matmul(&a_t, &b_t, bias_t.as_ref(), case.options()).unwrap_or_else(|e| panic!("{what}: {e}"));
        (out, None)
    };
    assert_eq!(out.shape(), &[case.m, case.n], "{what}");
    assert_eq!(out.dtype(), T::DTYPE, "{what}");
    assert_eq!(out.device(), *device, "{what}");
    // `matmul` allocates a fresh output: its beta is ignored.
    let effective = if case.into { case } else { case.scale(case.alpha, 0.0) };
    let expected = reference(
        &effective,
        &to_f64(&a),
        &to_f64(&b),
        bias.as_deref().map(to_f64).as_deref(),
        previous.as_deref(),
    );
    assert_close(&what, &values::<T>(&out), &expected, T::MATMUL_TOLERANCE);
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

/// Few elements and few launches, for compute-sanitizer: each dtype, with and without bias and
/// transposes, into a poisoned and into an accumulated output.
fn small_matmul(device: &Device) {
    let mut rng = common::rng();
    let plain = Case::new(3, 5, 4);
    let linear = Case::new(2, 3, 7).trans(false, true).bias(true).scale(1.0, 1.0);
    let transposed = Case::new(5, 2, 3).trans(true, false).allocating();
    for case in [plain, linear, transposed] {
        check::<f32>(device, &mut rng, case);
        check::<bf16>(device, &mut rng, case);
        check::<f16>(device, &mut rng, case);
    }
}

fn options_defaults_and_linear(device: &Device) {
    let default = MatmulOptions::default();
    assert_eq!(
        default,
        MatmulOptions {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0
        }
    );
    assert_eq!(
        MatmulOptions::linear(),
        MatmulOptions {
            trans_b: true,
            ..default
        }
    );
    // A linear layer: X (batch, in) times W (out, in) transposed, plus a bias (out).
    let mut rng = common::rng();
    let (batch, inputs, outputs) = (9, 17, 7);
    let x = uniform::<f32>(&mut rng, batch * inputs);
    let w = uniform::<f32>(&mut rng, outputs * inputs);
    let bias = uniform::<f32>(&mut rng, outputs);
    let y = matmul(
        &Tensor::from_slice(&x, &[batch, inputs], device).unwrap(),
        &Tensor::from_slice(&w, &[outputs, inputs], device).unwrap(),
        Some(&Tensor::from_slice(&bias, &[outputs], device).unwrap()),
        MatmulOptions::linear(),
    )
    .unwrap();
    assert_eq!(y.shape(), &[batch, outputs]);
    let mut expected = vec![0.0f64; batch * outputs];
    for r in 0..batch {
        for o in 0..outputs {
            expected[r * outputs + o] = bias[o] as f64
                + (0..inputs)
                    .map(|i| x[r * inputs + i] as f64 * w[o * inputs + i] as f64)
                    .sum::<f64>();
        }
    }
    assert_close("linear", &values::<f32>(&y), &expected, 1e-5);
}

fn transposes_and_bias<T: Float>(device: &Device) {
    let mut rng = common::rng();
    for (trans_a, trans_b) in TRANSPOSES {
        for bias in [false, true] {
            check::<T>(
                device,
                &mut rng,
                Case::new(17, 113, 64).trans(trans_a, trans_b).bias(bias),
            );
        }
    }
}

fn transposes_and_bias_f32(device: &Device) {
    transposes_and_bias::<f32>(device);
}

fn transposes_and_bias_bf16(device: &Device) {
    transposes_and_bias::<bf16>(device);
}

fn transposes_and_bias_f16(device: &Device) {
    transposes_and_bias::<f16>(device);
}

/// beta = 0 ignores a NaN-poisoned out, beta = 1 accumulates, other scales scale.
fn alpha_and_beta<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let shape = Case::new(64, 17, 113);
    for (alpha, beta) in [
        (1.0, 0.0),
        (1.0, 1.0),
        (0.5, 0.0),
        (0.5, 1.0),
        (-2.0, 0.25),
        (0.0, 1.0),
        (0.0, 0.0),
    ] {
        for (i, (trans_a, trans_b)) in TRANSPOSES.into_iter().enumerate() {
            let bias = (i + (alpha == 0.5) as usize) % 2 == 1;
            check::<T>(
                device,
                &mut rng,
                shape.trans(trans_a, trans_b).bias(bias).scale(alpha, beta),
            );
        }
    }
    // The allocating form ignores beta, and still scales by alpha.
    check::<T>(device, &mut rng, shape.scale(0.5, 1.0).bias(true).allocating());
}

fn alpha_and_beta_f32(device: &Device) {
    alpha_and_beta::<f32>(device);
}

fn alpha_and_beta_bf16(device: &Device) {
    alpha_and_beta::<bf16>(device);
}

fn alpha_and_beta_f16(device: &Device) {
    alpha_and_beta::<f16>(device);
}

/// Sizes that are not multiples of any tile: 1, 2, 7, 17, 113, 1023, 1025, and one power of two;
/// each case cycles through the transposes, bias, beta and the allocating form.
fn awkward_sizes<T: Float>(device: &Device, sizes: &[(usize, usize, usize)]) {
    let mut rng = common::rng();
    for (i, &(m, n, k)) in sizes.iter().enumerate() {
        let (trans_a, trans_b) = TRANSPOSES[i % 4];
        let mut case = Case::new(m, n, k)
            .trans(trans_a, trans_b)
            .bias(i % 3 != 1)
            .scale(1.0, if i % 2 == 0 { 0.0 } else { 1.0 });
        if i % 5 == 4 {
            case = case.allocating();
        }
        check::<T>(device, &mut rng, case);
    }
}

/// Every size of {1, 2, 7, 17, 64, 113, 1023, 1025} appears as m, as n and as k; m·n·k stays
/// under 2e7 so that debug builds stay quick.
const AWKWARD: [(usize, usize, usize); 12] = [
    (1025, 17, 113),
    (1, 1023, 64),
    (113, 1025, 7),
    (17, 17, 17),
    (64, 64, 64),
    (2, 7, 1025),
    (1023, 1, 2),
    (7, 113, 1023),
    (1, 1, 1),
    (1025, 2, 1),
    (64, 1023, 113),
    (17, 1025, 1025),
];

fn awkward_sizes_f32(device: &Device) {
    awkward_sizes::<f32>(device, &AWKWARD);
}

fn awkward_sizes_bf16(device: &Device) {
    awkward_sizes::<bf16>(device, &AWKWARD[..11]);
}

fn awkward_sizes_f16(device: &Device) {
    awkward_sizes::<f16>(device, &AWKWARD[..11]);
}

/// matmul and matmul_into give the same bits for the same operands.
fn allocating_matches_in_place(device: &Device) {
    let mut rng = common::rng();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let a = Tensor::from_vec(uniform::<f32>(&mut rng, 7 * 33), &[7, 33], &Device::Cpu);
        let b = Tensor::from_vec(uniform::<f32>(&mut rng, 33 * 65), &[33, 65], &Device::Cpu);
        let bias = Tensor::from_vec(uniform::<f32>(&mut rng, 65), &[65], &Device::Cpu);
        let (a, b, bias) = match dtype {
            DType::F32 => (a.unwrap(), b.unwrap(), bias.unwrap()),
            _ => {
                let convert = |t: Tensor| convert(&t, dtype);
                (convert(a.unwrap()), convert(b.unwrap()), convert(bias.unwrap()))
            }
        };
        let (a, b, bias) = (
            a.to_device(device).unwrap(),
            b.to_device(device).unwrap(),
            bias.to_device(device).unwrap(),
        );
        let options = MatmulOptions {
            alpha: 0.75,
            ..MatmulOptions::default()
        };
        let allocated = matmul(&a, &b, Some(&bias), options).unwrap();
        let mut into = Tensor::zeros(&[7, 65], dtype, device).unwrap();
        into.fill_bytes(0xFF).unwrap();
        matmul_into(&a, &b, Some(&bias), &mut into, options).unwrap();
        assert_eq!(bytes(&allocated), bytes(&into), "{dtype} on {device}");
        assert!(
            values_any(&allocated).iter().all(|x| x.is_finite()),
            "{dtype} on {device}"
        );
    }
}

/// bf16 and f16 operands into an f32 output (weight gradients accumulating in f32): every
/// transpose, with an f32 bias, into a poisoned output and accumulating onto one.
fn half_operands_into_f32_out(device: &Device) {
    let mut rng = common::rng();
    for dtype in [DType::BF16, DType::F16] {
        for (trans_a, trans_b) in TRANSPOSES {
            for (beta, bias) in [(0.0f32, false), (1.0, true)] {
                let case = Case::new(17, 24, 40)
                    .trans(trans_a, trans_b)
                    .bias(bias)
                    .scale(0.5, beta);
                let a = f32_tensor(&mut rng, &case.a_shape(), &Device::Cpu);
                let b = f32_tensor(&mut rng, &case.b_shape(), &Device::Cpu);
                let (a, b) = (convert(&a, dtype), convert(&b, dtype));
                let bias_t = f32_tensor(&mut rng, &[case.n], &Device::Cpu);
                let mut out = f32_tensor(&mut rng, &[case.m, case.n], &Device::Cpu);
                let previous = values::<f32>(&out);
                if beta == 0.0 {
                    out.fill_bytes(0xFF).unwrap();
                }
                let mut out = out.to_device(device).unwrap();
                let (a_d, b_d, bias_d) = (
                    a.to_device(device).unwrap(),
                    b.to_device(device).unwrap(),
                    bias_t.to_device(device).unwrap(),
                );
                matmul_into(&a_d, &b_d, bias.then_some(&bias_d), &mut out, case.options()).unwrap();
                assert_eq!(out.dtype(), DType::F32);
                let expected = reference(
                    &case,
                    &values_any(&a),
                    &values_any(&b),
                    bias.then(|| values::<f32>(&bias_t)).as_deref(),
                    Some(&previous),
                );
                // The operands are exactly representable; only the f32 accumulation rounds.
                assert_close(
                    &format!("{dtype} into f32 {case:?}"),
                    &values::<f32>(&out),
                    &expected,
                    1e-5,
                );
            }
        }
        // The bias of an f32 output is f32.
        let a = Tensor::zeros(&[2, 3], dtype, device).unwrap();
        let b = Tensor::zeros(&[3, 4], dtype, device).unwrap();
        let half_bias = Tensor::zeros(&[4], dtype, device).unwrap();
        let mut out = Tensor::zeros(&[2, 4], DType::F32, device).unwrap();
        let result = matmul_into(&a, &b, Some(&half_bias), &mut out, MatmulOptions::default());
        assert_invalid(result, "matmul", "bias", &["f32"]);
    }
}

/// An f32 host tensor rounded to `dtype`.
fn convert(tensor: &Tensor, dtype: DType) -> Tensor {
    let data = tensor.to_vec::<f32>().unwrap();
    match dtype {
        DType::BF16 => Tensor::from_vec(
            data.iter().map(|&x| bf16::from_f32(x)).collect(),
            tensor.shape(),
            &Device::Cpu,
        ),
        DType::F16 => Tensor::from_vec(
            data.iter().map(|&x| f16::from_f32(x)).collect(),
            tensor.shape(),
            &Device::Cpu,
        ),
        _ => Tensor::from_vec(data, tensor.shape(), &Device::Cpu),
    }
    .unwrap()
}

/// Values of a float tensor of any float dtype.
fn values_any(tensor: &Tensor) -> Vec<f64> {
    match tensor.dtype() {
        DType::F32 => values::<f32>(tensor),
        DType::BF16 => values::<bf16>(tensor),
        DType::F16 => values::<f16>(tensor),
        other => panic!("not a float dtype: {other}"),
    }
}

/// The same shape twice (on a GPU, the second call reuses a cached plan) with other operands and
/// another bias: the second result must come from the second operands.
fn repeated_shapes_use_the_new_operands(device: &Device) {
    let mut rng = common::rng();
    let case = Case::new(33, 47, 21).trans(false, true).bias(true);
    for _ in 0..3 {
        check::<bf16>(device, &mut rng, case);
        check::<f32>(device, &mut rng, case);
    }
    // The same shape without a bias after one with it: no stale bias may be added.
    check::<bf16>(device, &mut rng, case.bias(false));
    check::<f32>(device, &mut rng, case.bias(false).scale(1.0, 1.0));
}

fn f32_tensor(rng: &mut StdRng, shape: &[usize], device: &Device) -> Tensor {
    let numel = shape.iter().product();
    Tensor::from_vec(uniform::<f32>(rng, numel), shape, device).unwrap()
}

fn errors_name_the_argument(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let a = f32_tensor(rng, &[2, 3], device);
    let b = f32_tensor(rng, &[3, 4], device);
    let default = MatmulOptions::default();
    let op = "matmul";

    // Rank.
    let a3 = f32_tensor(rng, &[2, 3, 1], device);
    assert_invalid(matmul(&a3, &b, None, default), op, "a", &["2-d", "[2, 3, 1]"]);
    let b1 = f32_tensor(rng, &[3], device);
    assert_invalid(matmul(&a, &b1, None, default), op, "b", &["2-d", "[3]"]);
    let scalar = f32_tensor(rng, &[], device);
    assert_invalid(matmul(&scalar, &b, None, default), op, "a", &["2-d"]);

    // Inner dimensions.
    let b43 = f32_tensor(rng, &[4, 3], device);
    assert_invalid(matmul(&a, &b43, None, default), op, "b", &["3", "4"]);
    let transposed = MatmulOptions {
        trans_a: true,
        ..default
    };
    assert_invalid(matmul(&a, &b, None, transposed), op, "b", &["trans_a=true"]);
    // (3, 4) as B transposed is (4, 3): k = 4 does not match 3 either.
    assert_invalid(matmul(&a, &b, None, MatmulOptions::linear()), op, "b", &[]);
    // ...while the right transposes make the same tensors valid.
    matmul(&a, &b43, None, MatmulOptions::linear()).unwrap();

    // Dtypes.
    let a_u8 = Tensor::from_vec(vec![1u8; 6], &[2, 3], device).unwrap();
    let b_u8 = Tensor::from_vec(vec![1u8; 12], &[3, 4], device).unwrap();
    assert_invalid(matmul(&a_u8, &b_u8, None, default), op, "a", &["u8"]);
    let b_bf16 = Tensor::from_vec(vec![bf16::ONE; 12], &[3, 4], device).unwrap();
    assert_invalid(matmul(&a, &b_bf16, None, default), op, "b", &["f32", "bf16"]);
    let a_f16 = Tensor::from_vec(vec![f16::ONE; 6], &[2, 3], device).unwrap();
    assert_invalid(matmul(&a_f16, &b_bf16, None, default), op, "b", &["f16", "bf16"]);
    let a_u32 = Tensor::from_vec(vec![1u32; 6], &[2, 3], device).unwrap();
    assert_invalid(matmul(&a_u32, &b, None, default), op, "a", &["u32"]);

    // Bias.
    let short = f32_tensor(rng, &[3], device);
    assert_invalid(matmul(&a, &b, Some(&short), default), op, "bias", &["[4]", "[3]"]);
    let matrix = f32_tensor(rng, &[1, 4], device);
    assert_invalid(matmul(&a, &b, Some(&matrix), default), op, "bias", &["[1, 4]"]);
    let bias_bf16 = Tensor::from_vec(vec![bf16::ONE; 4], &[4], device).unwrap();
    assert_invalid(matmul(&a, &b, Some(&bias_bf16), default), op, "bias", &["bf16"]);

    // Out.
    let mut out = f32_tensor(rng, &[4, 2], device);
    assert_invalid(
        matmul_into(&a, &b, None, &mut out, default),
        op,
        "out",
        &["[2, 4]", "[4, 2]"],
    );
    let mut out = Tensor::zeros(&[2, 4], DType::F16, device).unwrap();
    assert_invalid(matmul_into(&a, &b, None, &mut out, default), op, "out", &["f32", "f16"]);

    // Scales.
    for alpha in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let options = MatmulOptions { alpha, ..default };
        assert_invalid(matmul(&a, &b, None, options), op, "options.alpha", &["finite"]);
    }
    let options = MatmulOptions {
        beta: f32::NAN,
        ..default
    };
    let mut out = f32_tensor(rng, &[2, 4], device);
    assert_invalid(
        matmul_into(&a, &b, None, &mut out, options),
        op,
        "options.beta",
        &["finite"],
    );

    // Zero dimensions: m, n and k.
    let empty = |shape: &[usize]| Tensor::zeros(shape, DType::F32, device).unwrap();
    assert_invalid(matmul(&empty(&[0, 3]), &b, None, default), op, "a", &["m=0"]);
    assert_invalid(matmul(&a, &empty(&[3, 0]), None, default), op, "a", &["n=0"]);
    assert_invalid(
        matmul(&empty(&[2, 0]), &empty(&[0, 4]), None, default),
        op,
        "a",
        &["k=0"],
    );

    // Operands on different devices (only where there is a second device).
    if device.is_cuda() {
        let cpu = Device::Cpu;
        let b_cpu = b.to_device(&cpu).unwrap();
        assert_invalid(matmul(&a, &b_cpu, None, default), op, "b", &["cpu"]);
        let bias_cpu = f32_tensor(rng, &[4], &cpu);
        assert_invalid(matmul(&a, &b, Some(&bias_cpu), default), op, "bias", &["cpu"]);
        let mut out_cpu = f32_tensor(rng, &[2, 4], &cpu);
        assert_invalid(matmul_into(&a, &b, None, &mut out_cpu, default), op, "out", &["cpu"]);
    }
}

/// A failed matmul_into writes nothing: `out` keeps its bytes whatever the error.
fn errors_leave_out_unchanged(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let a = f32_tensor(rng, &[5, 6], device);
    let b = f32_tensor(rng, &[6, 7], device);
    let good_bias = f32_tensor(rng, &[7], device);
    let bad_bias = f32_tensor(rng, &[6], device);
    let bf16_bias = Tensor::from_vec(vec![bf16::ONE; 7], &[7], device).unwrap();
    let bad_b = f32_tensor(rng, &[7, 6], device);
    let mut out = Tensor::zeros(&[5, 7], DType::F32, device).unwrap();
    out.fill_bytes(0x5A).unwrap();
    let pattern = vec![0x5Au8; 5 * 7 * 4];
    let default = MatmulOptions::default();
    let accumulate = MatmulOptions { beta: 1.0, ..default };
    let nan_alpha = MatmulOptions {
        alpha: f32::NAN,
        beta: 1.0,
        ..default
    };
    let cases: [(&Tensor, Option<&Tensor>, MatmulOptions, &str); 5] = [
        (&b, Some(&bad_bias), default, "bias"),
        (&b, Some(&bad_bias), accumulate, "bias"),
        (&b, Some(&bf16_bias), accumulate, "bias"),
        (&bad_b, Some(&good_bias), accumulate, "b"),
        (&b, Some(&good_bias), nan_alpha, "options.alpha"),
    ];
    for (b, bias, options, arg) in cases {
        assert_invalid(matmul_into(&a, b, bias, &mut out, options), "matmul", arg, &[]);
        device.synchronize().unwrap();
        assert_eq!(bytes(&out), pattern, "out changed by a failed call ({arg})");
    }
    // The same call with a good bias does write.
    matmul_into(&a, &b, Some(&good_bias), &mut out, default).unwrap();
    assert_ne!(bytes(&out), pattern);
}

/// With autotuning on, the first call of each shape times the heuristic's candidate algorithms on
/// the real operands (beta = 0 only); whichever wins, the results must be as correct as ever, and
/// accumulating calls (beta ≠ 0, never tuned) too.
#[cfg(feature = "cuda")]
mod gpu_autotune {
    use super::*;

    #[test]
    fn autotuned_matmul_is_correct() {
        let Some(device) = common::gpu() else { return };
        if let Device::Cuda(backend) = &device {
            backend.set_matmul_autotune(true);
        }
        let mut rng = common::rng();
        for (trans_a, trans_b) in TRANSPOSES {
            let case = Case::new(256, 384, 512).trans(trans_a, trans_b);
            check::<bf16>(&device, &mut rng, case.bias(true));
            check::<bf16>(&device, &mut rng, case.scale(0.5, 1.0));
            check::<f16>(&device, &mut rng, case);
            check::<f32>(&device, &mut rng, case.bias(true));
        }
        if let Device::Cuda(backend) = &device {
            backend.set_matmul_autotune(false);
        }
    }
}
