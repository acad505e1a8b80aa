//! LayerNorm and RMSNorm (src/ops/norm.rs), with and without the fused residual add, forward
//! and backward, against f64 references computed from the exact input values, on every device and
//! dtype, for widths that take the kernels' 16-byte and one-element paths; the reference backward
//! against finite differences of the reference forward; parameter-gradient accumulation and
//! run-to-run bit identity; and the argument errors.

#[macro_use]
mod common;

use common::{assert_close, assert_close_at_scale, assert_invalid, bytes, norm, uniform, uniform_in, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use tessera::ops::norm::MAX_NORM_WIDTH;
use tessera::ops::{
    norm_backward_into, norm_forward, norm_forward_into, NormConfig, NormGrads, NormKind, NormParams, NormStats,
};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_norm,
    layer_norm_all_dtypes,
    rms_norm_all_dtypes,
    widest_rows,
    large_offsets_and_constant_rows,
    accumulate_adds_to_the_gradients,
    repeated_backward_is_bit_identical,
    errors_name_the_argument,
);

/// f64 reference of the forward from the normalised values `s`: (y, mean, rstd).
fn forward_reference(
    kind: NormKind,
    eps: f64,
    s: &[f64],
    width: usize,
    w: &[f64],
    b: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = s.len() / width;
    let (mut y, mut means, mut rstds) = (vec![0.0; s.len()], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &s[r * width..(r + 1) * width];
        let (mean, rstd) = match kind {
            NormKind::LayerNorm => {
                let mean = row.iter().sum::<f64>() / width as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / width as f64;
                (mean, 1.0 / (var + eps).sqrt())
            }
            NormKind::RmsNorm => (
                0.0,
                1.0 / (row.iter().map(|v| v * v).sum::<f64>() / width as f64 + eps).sqrt(),
            ),
        };
        for c in 0..width {
            y[r * width + c] = (row[c] - mean) * rstd * w[c] + b.map_or(0.0, |b| b[c]);
        }
        means[r] = mean;
        rstds[r] = rstd;
    }
    (y, means, rstds)
}

/// f64 reference of the backward: (d_input, d_weight, d_bias, scale of d_weight's terms).
fn backward_reference(
    kind: NormKind,
    eps: f64,
    s: &[f64],
    width: usize,
    w: &[f64],
    dy: &[f64],
    skip: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
    let (_, means, rstds) = forward_reference(kind, eps, s, width, w, None);
    let rows = s.len() / width;
    let mut dx = vec![0.0; s.len()];
    let (mut dw, mut db, mut dw_abs) = (vec![0.0; width], vec![0.0; width], vec![0.0; width]);
    for r in 0..rows {
        let (mean, rstd) = (means[r], rstds[r]);
        let at = |c: usize| r * width + c;
        let xhat = |c: usize| (s[at(c)] - mean) * rstd;
        let mean_dyw = match kind {
            NormKind::LayerNorm => (0..width).map(|c| dy[at(c)] * w[c]).sum::<f64>() / width as f64,
            NormKind::RmsNorm => 0.0,
        };
        let mean_dyw_xhat = (0..width).map(|c| dy[at(c)] * w[c] * xhat(c)).sum::<f64>() / width as f64;
        for c in 0..width {
            dx[at(c)] = rstd * (dy[at(c)] * w[c] - mean_dyw - xhat(c) * mean_dyw_xhat) + skip.map_or(0.0, |k| k[at(c)]);
            dw[c] += dy[at(c)] * xhat(c);
            dw_abs[c] += (dy[at(c)] * xhat(c)).abs();
            db[c] += dy[at(c)];
        }
    }
    (dx, dw, db, norm(dw_abs))
}

fn tolerance<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => 1e-5,
        DType::BF16 => 4e-3,
        _ => 1e-3,
    }
}

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut t = Tensor::zeros(shape, dtype, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

#[derive(Clone, Copy, Debug)]
struct Case {
    kind: NormKind,
    rows: usize,
    width: usize,
    residual: bool,
    bias: bool,
    skip: bool,
    /// Inputs are drawn from [offset - spread, offset + spread].
    offset: f32,
    spread: f32,
}

fn case(kind: NormKind, rows: usize, width: usize) -> Case {
    Case {
        kind,
        rows,
        width,
        residual: false,
        bias: true,
        skip: false,
        offset: 0.0,
        spread: 2.0,
    }
}

/// Runs the forward and the backward of one case and checks every output.
fn check<T: Float>(device: &Device, rng: &mut StdRng, c: Case) {
    let (rows, width) = (c.rows, c.width);
    let n = rows * width;
    let eps = 1e-5f32;
    let config = NormConfig { kind: c.kind, eps };
    let x: Vec<T> = uniform_in(rng, n, c.offset - c.spread, c.offset + c.spread);
    let residual: Vec<T> = uniform(rng, n);
    let w: Vec<T> = uniform_in(rng, width, 0.5, 1.5);
    let b: Vec<T> = uniform(rng, width);
    let dy: Vec<T> = uniform(rng, n);
    let skip: Vec<T> = uniform(rng, n);
    // What the op normalises: x, or x + residual added in f32 and rounded to T.
    let s: Vec<T> = if c.residual {
        x.iter()
            .zip(&residual)
            .map(|(a, r)| T::from_f32((a.to_f64() as f32) + (r.to_f64() as f32)))
            .collect()
    } else {
        x.clone()
    };
    let shape = [rows, width];
    let t = |data: &[T], shape: &[usize]| Tensor::from_slice(data, shape, device).unwrap();
    let (x_t, residual_t, w_t, b_t) = (t(&x, &shape), t(&residual, &shape), t(&w, &[width]), t(&b, &[width]));
    let params = NormParams {
        weight: &w_t,
        bias: c.bias.then_some(&b_t),
    };
    let mut out = poisoned(&shape, T::DTYPE, device);
    let mut sum = poisoned(&shape, T::DTYPE, device);
    let mut stats = NormStats::new(rows, device).unwrap();
    stats.mean.fill_bytes(0xFF).unwrap();
    stats.rstd.fill_bytes(0xFF).unwrap();
    let fused = c.residual.then_some((&residual_t, &mut sum));
    norm_forward_into(&config, &x_t, fused, params, &mut out, &mut stats).unwrap();

    let what = format!("{} {c:?}", T::DTYPE);
    // Far from zero, the f32 mean itself is rounded at the offset's scale: x - mean carries an
    // error of a few units in the last place of the offset, relative to the spread. (A one-pass
    // E[x²] - E[x]² would lose the variance entirely at an offset of 1000.)
    let offset_error = 8.0 * (f32::EPSILON as f64 / 2.0) * (c.offset / c.spread) as f64;
    let y_tolerance = tolerance::<T>().max(offset_error);
    let (s64, w64, b64) = (common::to_f64(&s), common::to_f64(&w), common::to_f64(&b));
    if c.residual {
        assert!(
            bytes(&sum) == bytes(&t(&s, &shape)),
            "sum {what}: not x + residual rounded once"
        );
    }
    let (y, means, rstds) = forward_reference(c.kind, eps as f64, &s64, width, &w64, c.bias.then_some(&b64[..]));
    assert_close(&format!("y {what}"), &values::<T>(&out), &y, y_tolerance);
    // The mean is measured against the size of the values, the rstd relative to itself.
    let scale = norm(s64.iter().copied()) / (width as f64).sqrt();
    assert_close_at_scale(
        &format!("mean {what}"),
        &values::<f32>(&stats.mean),
        &means,
        1e-5,
        scale,
    );
    assert_close(&format!("rstd {what}"), &values::<f32>(&stats.rstd), &rstds, 1e-5);

    let input = if c.residual { &sum } else { &x_t };
    let (dy_t, skip_t) = (t(&dy, &shape), t(&skip, &shape));
    let mut d_input = poisoned(&shape, T::DTYPE, device);
    let mut d_weight = poisoned(&[width], DType::F32, device);
    let mut d_bias = poisoned(&[width], DType::F32, device);
    let grads = NormGrads {
        d_input: &mut d_input,
        d_weight: &mut d_weight,
        d_bias: Some(&mut d_bias),
        accumulate: false,
    };
    norm_backward_into(&config, &dy_t, c.skip.then_some(&skip_t), input, params, &stats, grads).unwrap();
    let skip64 = common::to_f64(&skip);
    let (dx, dw, db, dw_scale) = backward_reference(
        c.kind,
        eps as f64,
        &s64,
        width,
        &w64,
        &common::to_f64(&dy),
        c.skip.then_some(&skip64[..]),
    );
    // The input gradient cancels terms of size rstd·|dy·w|: measure against them.
    let terms = norm(rstds.iter().flat_map(|r| std::iter::repeat_n(r * 1.5, width)));
    assert_close_at_scale(
        &format!("d_input {what}"),
        &values::<T>(&d_input),
        &dx,
        y_tolerance,
        terms,
    );
    // Parameter gradients are f32 sums of exact products: f32 tolerance at every dtype.
    let sum_tolerance = (1e-5 * (rows as f64).sqrt().max(1.0)).max(offset_error);
    assert_close_at_scale(
        &format!("d_weight {what}"),
        &values::<f32>(&d_weight),
        &dw,
        sum_tolerance,
        dw_scale,
    );
    let db_scale = norm((0..width).map(|c| (0..rows).map(|r| dy[r * width + c].to_f64().abs()).sum::<f64>()));
    assert_close_at_scale(
        &format!("d_bias {what}"),
        &values::<f32>(&d_bias),
        &db,
        sum_tolerance,
        db_scale,
    );
}

fn shapes() -> Vec<(usize, usize)> {
    vec![
        (1, 1),
        (3, 7),
        (5, 17),
        (2, 113),
        (7, 768),
        (3, 1023),
        (4, 1025),
        (65, 64),
        (1030, 24),
    ]
}

fn all_variants<T: Float>(device: &Device, rng: &mut StdRng, kind: NormKind) {
    for (rows, width) in shapes() {
        for (residual, bias, skip) in [(false, true, false), (true, false, true), (true, true, false)] {
            let c = Case {
                residual,
                bias,
                skip,
                ..case(kind, rows, width)
            };
            check::<T>(device, rng, c);
        }
    }
}

/// The kernels' smallest cases, for compute-sanitizer: both kinds, both paths, fused or not.
fn small_norm(device: &Device) {
    let mut rng = common::rng();
    for kind in [NormKind::LayerNorm, NormKind::RmsNorm] {
        check::<bf16>(device, &mut rng, case(kind, 3, 64));
        check::<f32>(
            device,
            &mut rng,
            Case {
                residual: true,
                skip: true,
                ..case(kind, 5, 7)
            },
        );
        check::<f16>(
            device,
            &mut rng,
            Case {
                residual: true,
                bias: false,
                ..case(kind, 2, 24)
            },
        );
    }
}

fn layer_norm_all_dtypes(device: &Device) {
    let mut rng = common::rng();
    all_variants::<f32>(device, &mut rng, NormKind::LayerNorm);
    all_variants::<bf16>(device, &mut rng, NormKind::LayerNorm);
    all_variants::<f16>(device, &mut rng, NormKind::LayerNorm);
}

fn rms_norm_all_dtypes(device: &Device) {
    let mut rng = common::rng();
    all_variants::<f32>(device, &mut rng, NormKind::RmsNorm);
    all_variants::<bf16>(device, &mut rng, NormKind::RmsNorm);
    all_variants::<f16>(device, &mut rng, NormKind::RmsNorm);
}

/// The documented limit: rows of MAX_NORM_WIDTH (the backward's shared memory beyond 48 KiB).
fn widest_rows(device: &Device) {
    let mut rng = common::rng();
    check::<bf16>(
        device,
        &mut rng,
        Case {
            residual: true,
            ..case(NormKind::LayerNorm, 3, MAX_NORM_WIDTH)
        },
    );
    check::<f32>(device, &mut rng, case(NormKind::RmsNorm, 2, MAX_NORM_WIDTH - 1));
}

/// Rows far from zero (the two-pass variance loses nothing to cancellation) and constant rows
/// (variance 0: y is the bias, finite thanks to eps).
fn large_offsets_and_constant_rows(device: &Device) {
    let mut rng = common::rng();
    check::<f32>(
        device,
        &mut rng,
        Case {
            offset: 1000.0,
            spread: 1.0,
            ..case(NormKind::LayerNorm, 9, 300)
        },
    );
    check::<f32>(
        device,
        &mut rng,
        Case {
            offset: 1000.0,
            spread: 1.0,
            ..case(NormKind::RmsNorm, 9, 300)
        },
    );
    let x = Tensor::from_vec(vec![3.0f32; 2 * 16], &[2, 16], device).unwrap();
    let w = Tensor::from_vec(vec![2.0f32; 16], &[16], device).unwrap();
    let b = Tensor::from_vec(vec![0.5f32; 16], &[16], device).unwrap();
    let params = NormParams {
        weight: &w,
        bias: Some(&b),
    };
    let (y, _, stats) = norm_forward(&NormConfig::layer_norm(1e-5), &x, None, params).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![0.5; 32]);
    assert!(stats
        .rstd
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .all(|r| (*r as f64 - 1e5f64.sqrt()).abs() < 1.0));
}

/// The reference backward is the derivative of the reference forward (f64 central differences of
/// Σ y·dy, for both kinds, with respect to s, weight and bias), so the ops checked against it
/// compute the true gradients; and with `accumulate` the parameter gradients add up.
fn accumulate_adds_to_the_gradients(device: &Device) {
    let mut rng = common::rng();
    let (rows, width) = (3, 6);
    let s: Vec<f64> = uniform::<f32>(&mut rng, rows * width)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let w: Vec<f64> = uniform_in::<f32>(&mut rng, width, 0.5, 1.5)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let b: Vec<f64> = uniform::<f32>(&mut rng, width).iter().map(|&v| v as f64).collect();
    let dy: Vec<f64> = uniform::<f32>(&mut rng, rows * width)
        .iter()
        .map(|&v| v as f64)
        .collect();
    for kind in [NormKind::LayerNorm, NormKind::RmsNorm] {
        let loss = |s: &[f64], w: &[f64], b: &[f64]| {
            let (y, _, _) = forward_reference(kind, 1e-5, s, width, w, Some(b));
            y.iter().zip(&dy).map(|(y, g)| y * g).sum::<f64>()
        };
        let h = 1e-6;
        let numeric = |values: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
            (0..values.len())
                .map(|i| {
                    let (mut plus, mut minus) = (values.to_vec(), values.to_vec());
                    plus[i] += h;
                    minus[i] -= h;
                    (f(&plus) - f(&minus)) / (2.0 * h)
                })
                .collect()
        };
        let (dx, dw, db, _) = backward_reference(kind, 1e-5, &s, width, &w, &dy, None);
        assert_close(
            "d_input by finite differences",
            &dx,
            &numeric(&s, &|v| loss(v, &w, &b)),
            1e-6,
        );
        assert_close(
            "d_weight by finite differences",
            &dw,
            &numeric(&w, &|v| loss(&s, v, &b)),
            1e-6,
        );
        assert_close(
            "d_bias by finite differences",
            &db,
            &numeric(&b, &|v| loss(&s, &w, v)),
            1e-6,
        );

        // Accumulation: two backward calls on top of a start value give start + 2·gradient.
        let t = |data: &[f64], shape: &[usize]| {
            Tensor::from_vec(data.iter().map(|&v| v as f32).collect::<Vec<_>>(), shape, device).unwrap()
        };
        let (s_t, w_t, b_t, dy_t) = (
            t(&s, &[rows, width]),
            t(&w, &[width]),
            t(&b, &[width]),
            t(&dy, &[rows, width]),
        );
        let config = NormConfig { kind, eps: 1e-5 };
        let params = NormParams {
            weight: &w_t,
            bias: Some(&b_t),
        };
        let (_, _, stats) = norm_forward(&config, &s_t, None, params).unwrap();
        let start = [0.25f64; 6];
        let mut d_weight = t(&start, &[width]);
        let mut d_bias = t(&start, &[width]);
        let mut d_input = poisoned(&[rows, width], DType::F32, device);
        for _ in 0..2 {
            let grads = NormGrads {
                d_input: &mut d_input,
                d_weight: &mut d_weight,
                d_bias: Some(&mut d_bias),
                accumulate: true,
            };
            norm_backward_into(&config, &dy_t, None, &s_t, params, &stats, grads).unwrap();
        }
        let twice = |g: &[f64]| g.iter().map(|v| 0.25 + 2.0 * v).collect::<Vec<_>>();
        assert_close("accumulated d_weight", &values::<f32>(&d_weight), &twice(&dw), 1e-5);
        assert_close("accumulated d_bias", &values::<f32>(&d_bias), &twice(&db), 1e-5);
    }
}

fn repeated_backward_is_bit_identical(device: &Device) {
    let mut rng = common::rng();
    let (rows, width) = (3000, 768);
    let x = Tensor::from_vec(uniform::<bf16>(&mut rng, rows * width), &[rows, width], device).unwrap();
    let dy = Tensor::from_vec(uniform::<bf16>(&mut rng, rows * width), &[rows, width], device).unwrap();
    let w = Tensor::from_vec(uniform::<bf16>(&mut rng, width), &[width], device).unwrap();
    let config = NormConfig::layer_norm(1e-5);
    let params = NormParams { weight: &w, bias: None };
    let (_, _, stats) = norm_forward(&config, &x, None, params).unwrap();
    let run = || {
        let mut d_input = poisoned(&[rows, width], DType::BF16, device);
        let mut d_weight = poisoned(&[width], DType::F32, device);
        let mut d_bias = poisoned(&[width], DType::F32, device);
        let grads = NormGrads {
            d_input: &mut d_input,
            d_weight: &mut d_weight,
            d_bias: Some(&mut d_bias),
            accumulate: false,
        };
        norm_backward_into(&config, &dy, None, &x, params, &stats, grads).unwrap();
        (bytes(&d_input), bytes(&d_weight), bytes(&d_bias))
    };
    assert!(run() == run(), "two backward runs differ");
}

fn errors_name_the_argument(device: &Device) {
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, device).unwrap();
    let x = zeros(&[4, 8], DType::BF16);
    let w = zeros(&[8], DType::BF16);
    let params = NormParams { weight: &w, bias: None };
    let config = NormConfig::rms_norm(1e-6);
    let mut out = zeros(&[4, 8], DType::BF16);
    let mut stats = NormStats::new(4, device).unwrap();
    let w32 = zeros(&[8], DType::F32);
    let bad = NormParams {
        weight: &w32,
        bias: None,
    };
    assert_invalid(
        norm_forward_into(&config, &x, None, bad, &mut out, &mut stats),
        "norm_forward",
        "params.weight",
        &["bf16"],
    );
    let w7 = zeros(&[7], DType::BF16);
    let bad = NormParams {
        weight: &w,
        bias: Some(&w7),
    };
    assert_invalid(
        norm_forward_into(&config, &x, None, bad, &mut out, &mut stats),
        "norm_forward",
        "params.bias",
        &["[8]"],
    );
    let negative = NormConfig::layer_norm(-1.0);
    assert_invalid(
        norm_forward_into(&negative, &x, None, params, &mut out, &mut stats),
        "norm_forward",
        "config.eps",
        &[">= 0"],
    );
    let r = zeros(&[4, 8], DType::F32);
    let mut sum = zeros(&[4, 8], DType::BF16);
    assert_invalid(
        norm_forward_into(&config, &x, Some((&r, &mut sum)), params, &mut out, &mut stats),
        "norm_forward",
        "residual",
        &["f32"],
    );
    let mut short = NormStats::new(3, device).unwrap();
    assert_invalid(
        norm_forward_into(&config, &x, None, params, &mut out, &mut short),
        "norm_forward",
        "stats.mean",
        &["[4]"],
    );
    let wide = zeros(&[1, MAX_NORM_WIDTH + 1], DType::BF16);
    let w_wide = zeros(&[MAX_NORM_WIDTH + 1], DType::BF16);
    assert_invalid(
        norm_forward(
            &config,
            &wide,
            None,
            NormParams {
                weight: &w_wide,
                bias: None,
            },
        ),
        "norm_forward",
        "x",
        &["8192"],
    );
    let mut d_input = zeros(&[4, 8], DType::BF16);
    let mut d_weight = zeros(&[8], DType::BF16);
    let grads = NormGrads {
        d_input: &mut d_input,
        d_weight: &mut d_weight,
        d_bias: None,
        accumulate: false,
    };
    assert_invalid(
        norm_backward_into(&config, &x, None, &x, params, &stats, grads),
        "norm_backward",
        "grads.d_weight",
        &["f32"],
    );
    let mut d_weight = zeros(&[8], DType::F32);
    let dy = zeros(&[4, 9], DType::BF16);
    let grads = NormGrads {
        d_input: &mut d_input,
        d_weight: &mut d_weight,
        d_bias: None,
        accumulate: false,
    };
    assert_invalid(
        norm_backward_into(&config, &dy, None, &x, params, &stats, grads),
        "norm_backward",
        "d_out",
        &["[4, 8]"],
    );
    assert_eq!(bytes(&out), vec![0u8; 64], "a failed call wrote its output");
    assert_eq!(bytes(&d_input), vec![0u8; 64], "a failed call wrote its output");
}
