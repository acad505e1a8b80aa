//! Wavelet mixing (src/ops/wavelet.rs, ALGORITHMS.md §3) against f64 references computed on the
//! host from the exact input values (bf16 and f16 widened exactly), on every device: the spec's
//! fixtures and k_i table, the box forward (direct double loop) and backward (suffix windows) for
//! both divisors, the fused residual, bit-exact pass-through, causality, constant input,
//! adjointness, finite differences, the learnable variant, the `_into` forms and the argument
//! errors.
//!
//! On a GPU each test runs once with each box-window kernel (`ops::WaveletKernel`).
//!
//! Two checks per result: the project's norm-relative error (`assert_close`), which sees small
//! errors spread over the whole tensor, and an element-wise bound (output rounding plus an f32
//! arithmetic allowance relative to the size of the summed terms), which sees a few wrong
//! elements that the norm would dilute.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, bytes, norm, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::Mutex;
use tessera::ops::wavelet::MAX_WINDOW;
use tessera::ops::{
    set_wavelet_kernel, wavelet_backward, wavelet_backward_into, wavelet_forward, wavelet_forward_into,
    wavelet_learnable_backward, wavelet_learnable_forward, wavelet_taps_init, WaveletConfig, WaveletDivisor,
    WaveletKernel,
};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_wavelet,
    small_ring_wraps,
    spec_fixtures,
    forward_f32,
    forward_bf16,
    forward_f16,
    long_sequences,
    ring_and_far_windows,
    many_sequences,
    residual_is_added_before_mixing,
    pass_through_is_bit_identical,
    causality_by_perturbation,
    constant_input,
    backward_is_the_adjoint,
    backward_f32,
    backward_bf16,
    backward_f16,
    finite_differences,
    learnable_init_matches_the_box,
    learnable_random_taps_f32,
    learnable_random_taps_bf16,
    learnable_random_taps_f16,
    learnable_window_beyond_grid_limits,
    into_forms_write_poisoned_outputs,
    errors_name_the_argument,
    errors_leave_outputs_unchanged,
);

/// Runs `body` on `device`; on a GPU once with each box-window kernel, holding a lock so that no
/// other test of this file changes the process-wide choice meanwhile. The kernel is named on
/// stderr first, so that a failure says which one failed.
fn each_kernel(device: &Device, body: fn(&Device)) {
    static CHOICE: Mutex<()> = Mutex::new(());
    if !device.is_cuda() {
        return body(device);
    }
    let _choice = CHOICE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for kernel in [WaveletKernel::Segments, WaveletKernel::Tiles] {
        set_wavelet_kernel(kernel);
        eprintln!("box-window kernel: {kernel:?}");
        body(device);
    }
    set_wavelet_kernel(WaveletKernel::Segments);
}

/// Every device test: `name => body`, the body run by [`each_kernel`].
macro_rules! each_kernel_tests {
    ($($name:ident => $body:ident),+ $(,)?) => {
        $(fn $name(device: &Device) {
            each_kernel(device, $body)
        })+
    };
}

each_kernel_tests!(
    small_wavelet => small_wavelet_body,
    small_ring_wraps => small_ring_wraps_body,
    spec_fixtures => spec_fixtures_body,
    forward_f32 => forward_f32_body,
    forward_bf16 => forward_bf16_body,
    forward_f16 => forward_f16_body,
    long_sequences => long_sequences_body,
    ring_and_far_windows => ring_and_far_windows_body,
    many_sequences => many_sequences_body,
    residual_is_added_before_mixing => residual_is_added_before_mixing_body,
    pass_through_is_bit_identical => pass_through_is_bit_identical_body,
    causality_by_perturbation => causality_by_perturbation_body,
    constant_input => constant_input_body,
    backward_is_the_adjoint => backward_is_the_adjoint_body,
    backward_f32 => backward_f32_body,
    backward_bf16 => backward_bf16_body,
    backward_f16 => backward_f16_body,
    finite_differences => finite_differences_body,
    learnable_init_matches_the_box => learnable_init_matches_the_box_body,
    learnable_random_taps_f32 => learnable_random_taps_f32_body,
    learnable_random_taps_bf16 => learnable_random_taps_bf16_body,
    learnable_random_taps_f16 => learnable_random_taps_f16_body,
    learnable_window_beyond_grid_limits => learnable_window_beyond_grid_limits_body,
    into_forms_write_poisoned_outputs => into_forms_write_poisoned_outputs_body,
    errors_name_the_argument => errors_name_the_argument_body,
    errors_leave_outputs_unchanged => errors_leave_outputs_unchanged_body,
);

const DIVISORS: [WaveletDivisor; 2] = [WaveletDivisor::Window, WaveletDivisor::Available];

// ---- shapes, references and checks --------------------------------------------------------

/// (batch, seq, dim) of a token tensor, row-major.
#[derive(Clone, Copy, Debug)]
struct Shape {
    batch: usize,
    seq: usize,
    dim: usize,
}

fn shape(batch: usize, seq: usize, dim: usize) -> Shape {
    Shape { batch, seq, dim }
}

impl Shape {
    fn numel(&self) -> usize {
        self.batch * self.seq * self.dim
    }

    fn dims(&self) -> [usize; 3] {
        [self.batch, self.seq, self.dim]
    }

    fn at(&self, b: usize, t: usize, i: usize) -> usize {
        (b * self.seq + t) * self.dim + i
    }

    /// (b, t, i) of a flat index, for messages.
    fn position(&self, n: usize) -> (usize, usize, usize) {
        (n / (self.seq * self.dim), n / self.dim % self.seq, n % self.dim)
    }

    /// The values of coordinate `i` of sequence `b`, in time order.
    fn column(&self, values: &[f64], b: usize, i: usize) -> Vec<f64> {
        (0..self.seq).map(|t| values[self.at(b, t, i)]).collect()
    }
}

/// The divisor of the spec at token `t` for window `k`: `k`, or the number of tokens that exist.
fn divisor_value(divisor: WaveletDivisor, k: usize, t: usize) -> f64 {
    match divisor {
        WaveletDivisor::Window => k as f64,
        WaveletDivisor::Available => k.min(t + 1) as f64,
    }
}

/// For every element of a mixed coordinate (window `k > 0`), the sum of the window of `k` tokens
/// ending at `t`, tokens before the start counting 0: a direct double loop in f64. Pass-through
/// elements (window 0) are the input.
fn window_sums(x: &[f64], s: Shape, windows: &[u32]) -> Vec<f64> {
    let mut sums = x.to_vec();
    for b in 0..s.batch {
        for (i, &k) in windows.iter().enumerate() {
            let k = k as usize;
            if k == 0 {
                continue;
            }
            let column = s.column(x, b, i);
            for t in 0..s.seq {
                // x[t-k+1] + ... + x[t], the terms before the start left out (zeros).
                let window = &column[(t + 1).saturating_sub(k)..=t];
                sums[s.at(b, t, i)] = window.iter().sum::<f64>();
            }
        }
    }
    sums
}

/// Window sums divided by the divisor at each token: the forward of the spec.
fn divided(sums: &[f64], s: Shape, windows: &[u32], divisor: WaveletDivisor) -> Vec<f64> {
    let mut out = sums.to_vec();
    for b in 0..s.batch {
        for t in 0..s.seq {
            for (i, &k) in windows.iter().enumerate() {
                if k != 0 {
                    out[s.at(b, t, i)] /= divisor_value(divisor, k as usize, t);
                }
            }
        }
    }
    out
}

/// The spec's backward (§3.3), in f64: `d_x[s0] = Σ_{t=s0..min(T-1, s0+k-1)} d_out[t] / div(t)`
/// for a mixed coordinate, `d_out` for the others.
fn backward_reference(d_out: &[f64], s: Shape, windows: &[u32], divisor: WaveletDivisor) -> Vec<f64> {
    let mut d_x = d_out.to_vec();
    for b in 0..s.batch {
        for (i, &k) in windows.iter().enumerate() {
            let k = k as usize;
            if k == 0 {
                continue;
            }
            // d_out[t] / div(t), summed over t = s0 ..= min(T-1, s0+k-1).
            let scaled: Vec<f64> = (0..s.seq)
                .map(|t| d_out[s.at(b, t, i)] / divisor_value(divisor, k, t))
                .collect();
            for s0 in 0..s.seq {
                let window = &scaled[s0..(s0 + k).min(s.seq)];
                d_x[s.at(b, s0, i)] = window.iter().sum::<f64>();
            }
        }
    }
    d_x
}

/// The size of the terms behind each element of the box forward or backward, for the
/// element-wise tolerance. Both run one f32 window sum along the sequence (forward from the start,
/// backward from the end), whose rounding errors are carried to later tokens: so the scale of
/// token t is the largest window sum of absolute values (|x|, or |d_out|/div for the backward)
/// met so far in the scan's direction, divided as the output is. From prefix sums, which for
/// these all-positive terms are accurate enough and fast.
fn box_scale(values: &[f64], s: Shape, windows: &[u32], divisor: WaveletDivisor, backward: bool) -> Vec<f64> {
    let mut out = abs(values);
    for b in 0..s.batch {
        for (i, &k) in windows.iter().enumerate() {
            let k = k as usize;
            if k == 0 {
                continue;
            }
            let column = s.column(values, b, i);
            let mut prefix = vec![0.0; s.seq + 1];
            for t in 0..s.seq {
                let term = if backward {
                    column[t].abs() / divisor_value(divisor, k, t)
                } else {
                    column[t].abs()
                };
                prefix[t + 1] = prefix[t] + term;
            }
            let mut largest = 0.0f64;
            for step in 0..s.seq {
                let t = if backward { s.seq - 1 - step } else { step };
                out[s.at(b, t, i)] = if backward {
                    largest = largest.max(prefix[(t + k).min(s.seq)] - prefix[t]);
                    largest
                } else {
                    largest = largest.max(prefix[t + 1] - prefix[(t + 1).saturating_sub(k)]);
                    largest / divisor_value(divisor, k, t)
                };
            }
        }
    }
    out
}

/// Where each coordinate's taps start in the flat tap vector (coordinates in order).
fn tap_starts(windows: &[u32]) -> Vec<usize> {
    let mut starts = Vec::with_capacity(windows.len());
    let mut next = 0;
    for &k in windows {
        starts.push(next);
        next += k as usize;
    }
    starts
}

/// The learnable forward in f64: `out[t] = Σ_{u<k} w[u]·x[t-u]` (x before the start is 0).
fn fir_reference(x: &[f64], s: Shape, windows: &[u32], taps: &[f64]) -> Vec<f64> {
    let starts = tap_starts(windows);
    let mut out = x.to_vec();
    for b in 0..s.batch {
        for (i, &k) in windows.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let w = &taps[starts[i]..starts[i] + k as usize];
            let column = s.column(x, b, i);
            for t in 0..s.seq {
                let mut sum = 0.0;
                for (u, &w) in w.iter().enumerate().take(t + 1) {
                    sum += w * column[t - u];
                }
                out[s.at(b, t, i)] = sum;
            }
        }
    }
    out
}

/// The learnable backward in f64: `d_x[s0] = Σ_{u<k} w[u]·d_out[s0+u]` (inside the sequence) and
/// `d_w[u] = Σ_{b, t>=u} d_out[b,t]·x[b,t-u]`.
fn fir_backward_reference(d_out: &[f64], x: &[f64], s: Shape, windows: &[u32], taps: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let starts = tap_starts(windows);
    let mut d_x = d_out.to_vec();
    let mut d_taps = vec![0.0; taps.len()];
    for b in 0..s.batch {
        for (i, &k) in windows.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let w = &taps[starts[i]..starts[i] + k as usize];
            let d_column = s.column(d_out, b, i);
            let x_column = s.column(x, b, i);
            for s0 in 0..s.seq {
                let mut sum = 0.0;
                for (u, &w) in w.iter().enumerate().take(s.seq - s0) {
                    sum += w * d_column[s0 + u];
                }
                d_x[s.at(b, s0, i)] = sum;
            }
            for u in 0..(k as usize).min(s.seq) {
                let mut sum = 0.0;
                for t in u..s.seq {
                    sum += d_column[t] * x_column[t - u];
                }
                d_taps[starts[i] + u] += sum;
            }
        }
    }
    (d_x, d_taps)
}

fn abs(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| v.abs()).collect()
}

/// Norm-relative tolerance of an output of dtype `T` (the project's method): f32 1e-5, 2e-5 past
/// 1024 steps (the GPU's running f32 window sum drifts like sqrt(steps)·eps); bf16 1e-2; f16 2e-3.
fn tolerance<T: Float>(steps: usize) -> f64 {
    match T::DTYPE {
        DType::F32 if steps > 1024 => 2e-5,
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        _ => 2e-3,
    }
}

/// Largest relative rounding error of one rounding to `T` (half an ulp over the value).
fn unit_roundoff<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-11),
    }
}

/// Element-wise allowance for f32 arithmetic, relative to the size of the terms summed: a running
/// f32 sum over `steps` steps drifts like sqrt(steps)·eps (this is ~10 standard deviations).
fn arithmetic_allowance(steps: usize) -> f64 {
    2e-6 + 5e-7 * (steps as f64).sqrt()
}

/// Checks `out` (a result of dtype `T`) against `reference`: every element finite and within one
/// rounding to `T` plus `arithmetic_allowance(steps)·scale` (scale: the same op applied to the
/// absolute values, the size of the terms), and the whole within `tolerance::<T>(steps)` of the
/// norm.
fn check_values<T: Float>(what: &str, s: Shape, out: &[f64], reference: &[f64], scale: &[f64], steps: usize) {
    assert_eq!(out.len(), reference.len(), "{what}: length");
    let rel = unit_roundoff::<T>();
    let allowance = arithmetic_allowance(steps);
    // Half the spacing of T's subnormals: rounding error of results that small.
    let floor = match T::DTYPE {
        DType::F16 => 2f64.powi(-25),
        DType::BF16 => 2f64.powi(-134),
        _ => 2f64.powi(-150),
    };
    for (n, ((&o, &r), &scale)) in out.iter().zip(reference).zip(scale).enumerate() {
        let bound = rel * r.abs() + allowance * scale + floor;
        assert!(
            o.is_finite() && (o - r).abs() <= bound,
            "{what}: element {n} (b, t, i) = {:?} is {o}, expected {r} (difference {:.3e}, bound {bound:.3e})",
            s.position(n),
            (o - r).abs()
        );
    }
    assert_close(what, out, reference, tolerance::<T>(steps));
}

fn tensor<T: Float>(data: &[T], s: Shape, device: &Device) -> Tensor {
    Tensor::from_slice(data, &s.dims(), device).unwrap()
}

/// A NaN-filled tensor of shape `s` and dtype `dtype`, for `_into` outputs.
fn poisoned(s: Shape, dtype: DType, device: &Device) -> Tensor {
    let mut out = Tensor::zeros(&s.dims(), dtype, device).unwrap();
    out.fill_bytes(0xFF).unwrap();
    out
}

fn f64s<T: Float>(data: &[T]) -> Vec<f64> {
    common::to_f64(data)
}

fn bits_equal<T: Float>(a: T, b: T) -> bool {
    bytemuck::bytes_of(&a) == bytemuck::bytes_of(&b)
}

/// Pass-through coordinates of `out` hold exactly `x` (no residual) or `x + residual` rounded once
/// to `T` (the f64 sum of the two widened values, which is exact, rounded to f32 then to `T`).
fn check_pass_through<T: Float>(what: &str, s: Shape, windows: &[u32], x: &[T], residual: Option<&[T]>, out: &Tensor) {
    let out = out.to_vec::<T>().unwrap();
    for b in 0..s.batch {
        for t in 0..s.seq {
            for (i, &k) in windows.iter().enumerate() {
                if k != 0 {
                    continue;
                }
                let n = s.at(b, t, i);
                let expected = match residual {
                    None => x[n],
                    Some(r) => T::from_f32((x[n].to_f64() + r[n].to_f64()) as f32),
                };
                assert!(
                    bits_equal(out[n], expected),
                    "{what}: pass-through element (b, t, i) = {:?} is {:?}, expected {:?} bit for bit",
                    (b, t, i),
                    out[n],
                    expected
                );
            }
        }
    }
}

fn config(dim: usize, first: usize, windows: &[usize], divisor: WaveletDivisor) -> WaveletConfig {
    WaveletConfig::from_windows(dim, first, windows.to_vec(), divisor)
        .unwrap_or_else(|e| panic!("from_windows({dim}, {first}, {windows:?}): {e}"))
}

/// The forward of random `x` (plus a random residual when asked) for both divisors, through
/// `wavelet_forward_into` on a poisoned output or `wavelet_forward`, against the reference.
fn check_forward<T: Float>(
    device: &Device,
    rng: &mut StdRng,
    s: Shape,
    first: usize,
    windows: &[usize],
    residual: bool,
    into: bool,
) {
    let x = uniform::<T>(rng, s.numel());
    let r = residual.then(|| uniform::<T>(rng, s.numel()));
    let input: Vec<f64> = match &r {
        None => f64s(&x),
        Some(r) => x.iter().zip(r).map(|(x, r)| x.to_f64() + r.to_f64()).collect(),
    };
    let x_t = tensor(&x, s, device);
    let r_t = r.as_ref().map(|r| tensor(r, s, device));
    let per_coordinate = config(s.dim, first, windows, WaveletDivisor::Window).windows().to_vec();
    let sums = window_sums(&input, s, &per_coordinate);
    for divisor in DIVISORS {
        let config = config(s.dim, first, windows, divisor);
        let what = format!(
            "{} forward on {device}, {s:?}, windows {windows:?} from {first}, {divisor:?}, residual {residual}, \
             into {into}",
            T::DTYPE
        );
        let out = if into {
            let mut out = poisoned(s, T::DTYPE, device);
            wavelet_forward_into(&x_t, r_t.as_ref(), &config, &mut out).unwrap_or_else(|e| panic!("{what}: {e}"));
            out
        } else {
            wavelet_forward(&x_t, r_t.as_ref(), &config).unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        assert_eq!(out.shape(), &s.dims(), "{what}");
        assert_eq!(out.dtype(), T::DTYPE, "{what}");
        assert_eq!(out.device(), *device, "{what}");
        let expected = divided(&sums, s, &per_coordinate, divisor);
        let scale = box_scale(&input, s, &per_coordinate, divisor, false);
        check_values::<T>(&what, s, &values::<T>(&out), &expected, &scale, s.seq);
        check_pass_through(&what, s, &per_coordinate, &x, r.as_deref(), &out);
    }
}

/// The backward of a random `d_out` for both divisors, through `wavelet_backward_into` on a
/// poisoned output or `wavelet_backward`, against the reference.
fn check_backward<T: Float>(device: &Device, rng: &mut StdRng, s: Shape, first: usize, windows: &[usize], into: bool) {
    let d_out = uniform::<T>(rng, s.numel());
    let d_out_t = tensor(&d_out, s, device);
    let d_out64 = f64s(&d_out);
    for divisor in DIVISORS {
        let config = config(s.dim, first, windows, divisor);
        let what = format!(
            "{} backward on {device}, {s:?}, windows {windows:?} from {first}, {divisor:?}, into {into}",
            T::DTYPE
        );
        let d_x = if into {
            let mut d_x = poisoned(s, T::DTYPE, device);
            wavelet_backward_into(&d_out_t, &config, &mut d_x).unwrap_or_else(|e| panic!("{what}: {e}"));
            d_x
        } else {
            wavelet_backward(&d_out_t, &config).unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        assert_eq!(d_x.shape(), &s.dims(), "{what}");
        assert_eq!(d_x.dtype(), T::DTYPE, "{what}");
        assert_eq!(d_x.device(), *device, "{what}");
        let expected = backward_reference(&d_out64, s, config.windows(), divisor);
        let scale = box_scale(&d_out64, s, config.windows(), divisor, true);
        check_values::<T>(&what, s, &values::<T>(&d_x), &expected, &scale, s.seq);
        check_pass_through(&what, s, config.windows(), &d_out, None, &d_x);
    }
}

/// The learnable forward and backward with random taps in [-1, 1] against the references, for a
/// configuration of each divisor (the learnable variant has no divisor: both give the FIR).
fn check_learnable<T: Float>(device: &Device, rng: &mut StdRng, s: Shape, first: usize, windows: &[usize]) {
    let x = uniform::<T>(rng, s.numel());
    let d_out = uniform::<T>(rng, s.numel());
    let (x_t, d_out_t) = (tensor(&x, s, device), tensor(&d_out, s, device));
    let (x64, d_out64) = (f64s(&x), f64s(&d_out));
    let per_coordinate = config(s.dim, first, windows, WaveletDivisor::Window).windows().to_vec();
    let count: usize = windows.iter().sum();
    let taps = uniform::<f32>(rng, count);
    let taps_t = Tensor::from_slice(&taps, &[count], device).unwrap();
    let taps64 = f64s(&taps);
    let abs_taps = abs(&taps64);
    let longest = (*windows.iter().max().unwrap()).min(s.seq);

    let expected = fir_reference(&x64, s, &per_coordinate, &taps64);
    let scale = fir_reference(&abs(&x64), s, &per_coordinate, &abs_taps);
    let (expected_d_x, expected_d_taps) = fir_backward_reference(&d_out64, &x64, s, &per_coordinate, &taps64);
    let scale_d_x = fir_backward_reference(&abs(&d_out64), &x64, s, &per_coordinate, &abs_taps).0;
    let scale_d_taps = fir_backward_reference(&abs(&d_out64), &abs(&x64), s, &per_coordinate, &abs_taps).1;
    for divisor in DIVISORS {
        let config = config(s.dim, first, windows, divisor);
        assert_eq!(config.tap_count(), count);
        let what = format!(
            "{} learnable on {device}, {s:?}, windows {windows:?} from {first}, {divisor:?}",
            T::DTYPE
        );
        let out = wavelet_learnable_forward(&x_t, &taps_t, &config).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(out.shape(), &s.dims(), "{what}");
        assert_eq!(out.dtype(), T::DTYPE, "{what}");
        assert_eq!(out.device(), *device, "{what}");
        check_values::<T>(
            &format!("{what}: out"),
            s,
            &values::<T>(&out),
            &expected,
            &scale,
            longest,
        );
        check_pass_through(&what, s, &per_coordinate, &x, None, &out);

        let (d_x, d_taps) =
            wavelet_learnable_backward(&d_out_t, &x_t, &taps_t, &config).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(d_x.shape(), &s.dims(), "{what}");
        assert_eq!(d_x.dtype(), T::DTYPE, "{what}");
        assert_eq!(d_taps.shape(), &[count], "{what}");
        assert_eq!(d_taps.dtype(), DType::F32, "{what}");
        assert_eq!(d_taps.device(), *device, "{what}");
        check_values::<T>(
            &format!("{what}: d_x"),
            s,
            &values::<T>(&d_x),
            &expected_d_x,
            &scale_d_x,
            longest,
        );
        check_pass_through(&what, s, &per_coordinate, &d_out, None, &d_x);
        // d_taps is f32 whatever T: sums of exact products over batch·seq rows.
        let tap_shape = shape(1, 1, count);
        let d_taps = values::<f32>(&d_taps);
        let rows = s.batch * s.seq;
        check_values::<f32>(
            &format!("{what}: d_taps"),
            tap_shape,
            &d_taps,
            &expected_d_taps,
            &scale_d_taps,
            rows,
        );
    }
}

/// Windows of every awkward kind for `count` coordinates of a `seq`-long sequence: 1, 2, 3, the
/// sequence length and its neighbours, sizes around the GPU's 32·ROWS-row steps, and windows far
/// beyond the sequence. `offset` rotates the list.
fn awkward_windows(count: usize, seq: usize, offset: usize) -> Vec<usize> {
    let kinds = [
        1,
        2,
        seq,
        3,
        seq + 1,
        seq.saturating_sub(1).max(1),
        5,
        2 * seq + 3,
        8,
        17,
        63,
        64,
        65,
        255,
        256,
        257,
        1000,
        4097,
        MAX_WINDOW,
    ];
    (0..count).map(|j| kinds[(j + offset) % kinds.len()]).collect()
}

/// `count` windows in runs of 8 equal ones (the GPU's vector path needs a whole group of 8
/// coordinates with one window), cycling through `kinds`.
fn grouped_windows(count: usize, kinds: &[usize]) -> Vec<usize> {
    (0..count).map(|j| kinds[j / 8 % kinds.len()]).collect()
}

// ---- configuration (no device) --------------------------------------------------------------

/// §3.5.6: E = 128, L = 512: coordinates 0-7 k = 2, ..., 57-63 k = 512, the rest pass through;
/// level(i) = 1 + floor(i·9/64), k = 2^level.
#[test]
fn paper_default_k_table() {
    let config = WaveletConfig::paper_default(128, 512).unwrap();
    assert_eq!(config.dim(), 128);
    assert_eq!(config.divisor(), WaveletDivisor::Window);
    let windows = config.windows();
    assert_eq!(windows.len(), 128);
    for (i, &k) in windows.iter().enumerate() {
        let expected = if i < 64 { 1u32 << (1 + i * 9 / 64) } else { 0 };
        assert_eq!(k, expected, "coordinate {i}");
    }
    assert!(windows[..8].iter().all(|&k| k == 2), "{windows:?}");
    assert_eq!(windows[8], 4);
    assert_eq!(windows[56], 256);
    assert!(windows[57..64].iter().all(|&k| k == 512), "{windows:?}");
    assert!(windows[64..].iter().all(|&k| k == 0), "{windows:?}");
    // Every level 1..=9 is used, by 7 or 8 coordinates each.
    for level in 1..=9 {
        let count = windows.iter().filter(|&&k| k == 1 << level).count();
        assert!((7..=8).contains(&count), "level {level}: {count} coordinates");
    }
    assert_eq!(
        config,
        WaveletConfig::exponential(128, 0..64, 2, 512, 512, WaveletDivisor::Window).unwrap()
    );
    // The learnable variant's taps: the sum of the windows, laid out coordinate after coordinate.
    let total: usize = windows.iter().map(|&k| k as usize).sum();
    assert_eq!(config.tap_count(), total);
    let offsets = config.tap_offsets();
    assert_eq!(offsets.len(), 128);
    for (i, &offset) in offsets.iter().enumerate() {
        let before: u32 = windows[..i].iter().sum();
        assert_eq!(offset, before, "tap offset of coordinate {i}");
    }
}

/// The spec's rule with `n_lvl = ceil(log2 L)` when the context is not a power of two, an odd dim
/// (its first dim/2 coordinates), and a small model.
#[test]
fn paper_default_other_sizes() {
    // L = 1000: ten levels, 2 ... 512 then min(1024, 1000).
    let windows = WaveletConfig::paper_default(128, 1000).unwrap().windows().to_vec();
    for (i, &k) in windows.iter().enumerate() {
        let expected = if i < 64 {
            (1u32 << (1 + i * 10 / 64)).min(1000)
        } else {
            0
        };
        assert_eq!(k, expected, "coordinate {i}");
    }
    assert_eq!(windows[63], 1000);
    // dim 9: the first 4 coordinates, context 8: 3 levels.
    let windows = WaveletConfig::paper_default(9, 8).unwrap().windows().to_vec();
    assert_eq!(windows, [2, 2, 4, 8, 0, 0, 0, 0, 0]);
    // Context 2: a single level.
    let windows = WaveletConfig::paper_default(4, 2).unwrap().windows().to_vec();
    assert_eq!(windows, [2, 2, 0, 0]);
}

/// `exponential` over other ranges: a range not starting at 0, k_min above 2, k_max not a power of
/// two, a mixed count that is not a multiple of the level count, fewer coordinates than levels.
#[test]
fn exponential_other_ranges() {
    let window = WaveletDivisor::Window;
    let available = WaveletDivisor::Available;
    // 10 coordinates 2..12, k 3 -> 10: levels 3, 6, min(12, 10); j·3/10 -> 4, 3, 3 coordinates.
    let config = WaveletConfig::exponential(12, 2..12, 3, 10, 16, available).unwrap();
    assert_eq!(config.windows(), [0, 0, 3, 3, 3, 3, 6, 6, 6, 10, 10, 10]);
    assert_eq!(config.divisor(), available);
    assert_eq!(config.dim(), 12);
    // A range inside the embedding, both ends: 5 coordinates 1..6 of 8, k 2 -> 16 (4 levels).
    let config = WaveletConfig::exponential(8, 1..6, 2, 16, 16, window).unwrap();
    assert_eq!(config.windows(), [0, 2, 2, 4, 8, 16, 0, 0]);
    // Fewer coordinates than levels: 3 coordinates, k 1 -> 8 (levels 1, 2, 4, 8): 8 is never reached.
    let config = WaveletConfig::exponential(3, 0..3, 1, 8, 8, window).unwrap();
    assert_eq!(config.windows(), [1, 2, 4]);
    // k_min = k_max: one level; k_max below the context.
    let config = WaveletConfig::exponential(7, 1..6, 5, 5, 100, window).unwrap();
    assert_eq!(config.windows(), [0, 5, 5, 5, 5, 5, 0]);
    let config = WaveletConfig::exponential(2, 0..2, 1, 1, 1, window).unwrap();
    assert_eq!(config.windows(), [1, 1]);
    // The whole embedding mixed, 100 coordinates, k 2 -> 100 (7 levels, the last min(128, 100)).
    let config = WaveletConfig::exponential(100, 0..100, 2, 100, 4096, window).unwrap();
    for (j, &k) in config.windows().iter().enumerate() {
        assert_eq!(k, (2u32 << (j * 7 / 100)).min(100), "coordinate {j}");
    }
    // The largest window allowed.
    let config = WaveletConfig::exponential(4, 2..4, MAX_WINDOW / 2, MAX_WINDOW, usize::MAX, window).unwrap();
    assert_eq!(config.windows(), [0, 0, MAX_WINDOW as u32 / 2, MAX_WINDOW as u32]);
}

/// `from_windows` places the windows, the accessors report them, and the taps follow them.
#[test]
fn from_windows_and_accessors() {
    let config = WaveletConfig::from_windows(7, 2, vec![1, 5, MAX_WINDOW, 3], WaveletDivisor::Available).unwrap();
    assert_eq!(config.dim(), 7);
    assert_eq!(config.windows(), [0, 0, 1, 5, MAX_WINDOW as u32, 3, 0]);
    assert_eq!(config.divisor(), WaveletDivisor::Available);
    assert_eq!(config.tap_count(), 1 + 5 + MAX_WINDOW + 3);
    let m = MAX_WINDOW as u32;
    assert_eq!(config.tap_offsets(), [0, 0, 0, 1, 6, 6 + m, 9 + m]);
    let whole = WaveletConfig::from_windows(3, 0, vec![4, 4, 4], WaveletDivisor::Window).unwrap();
    assert_eq!(whole.windows(), [4, 4, 4]);
    assert_eq!(whole.tap_offsets(), [0, 4, 8]);
    assert_ne!(
        whole,
        WaveletConfig::from_windows(3, 0, vec![4, 4, 4], WaveletDivisor::Available).unwrap()
    );
}

/// Every configuration that the constructors accept has tap offsets that say where each
/// coordinate's taps start: 4097 windows of MAX_WINDOW sum to 4097·2^20 > u32::MAX taps, which
/// the u32 offsets cannot address, so `from_windows` must refuse them.
#[test]
fn tap_offsets_fit_every_accepted_config() {
    match WaveletConfig::from_windows(4097, 0, vec![MAX_WINDOW; 4097], WaveletDivisor::Window) {
        Err(error) => {
            assert!(matches!(error, tessera::Error::InvalidArgument { .. }), "{error:?}");
        }
        Ok(config) => {
            let offsets = config.tap_offsets();
            let mut start = 0u64;
            for (i, (&offset, &k)) in offsets.iter().zip(config.windows()).enumerate() {
                assert_eq!(offset as u64, start, "tap offset of coordinate {i}");
                start += k as u64;
            }
            assert_eq!(start, config.tap_count() as u64);
        }
    }
}

/// Bad configurations: an argument error naming the constructor and the argument.
#[test]
fn config_errors_name_the_argument() {
    let w = WaveletDivisor::Window;
    let exp = "WaveletConfig::exponential";
    let from = "WaveletConfig::from_windows";
    assert_invalid(WaveletConfig::exponential(0, 0..0, 2, 4, 4, w), exp, "dim", &["0"]);
    assert_invalid(WaveletConfig::exponential(8, 3..3, 2, 4, 4, w), exp, "mixed", &["3..3"]);
    let (start, end) = (5, 2);
    assert_invalid(
        WaveletConfig::exponential(8, start..end, 2, 4, 4, w),
        exp,
        "mixed",
        &["5..2"],
    );
    assert_invalid(WaveletConfig::exponential(8, 2..9, 2, 4, 4, w), exp, "mixed", &["2..9"]);
    assert_invalid(WaveletConfig::exponential(8, 8..9, 2, 4, 4, w), exp, "mixed", &["8..9"]);
    assert_invalid(WaveletConfig::exponential(8, 0..4, 0, 4, 4, w), exp, "k_min", &["0"]);
    assert_invalid(WaveletConfig::exponential(8, 0..4, 8, 4, 16, w), exp, "k_min", &["8"]);
    assert_invalid(
        WaveletConfig::exponential(8, 0..4, 2, 16, 8, w),
        exp,
        "k_max",
        &["16", "8"],
    );
    assert_invalid(
        WaveletConfig::exponential(8, 0..4, 2, MAX_WINDOW + 1, usize::MAX, w),
        exp,
        "k_max",
        &[&(MAX_WINDOW + 1).to_string()],
    );
    assert_invalid(WaveletConfig::paper_default(1, 512), exp, "mixed", &[]);
    assert_invalid(WaveletConfig::paper_default(128, 1), exp, "k_min", &[]);

    assert_invalid(WaveletConfig::from_windows(0, 0, vec![2], w), from, "dim", &["0"]);
    assert_invalid(
        WaveletConfig::from_windows(4, 0, vec![], w),
        from,
        "windows",
        &["0 windows"],
    );
    assert_invalid(
        WaveletConfig::from_windows(4, 2, vec![2, 2, 2], w),
        from,
        "windows",
        &["3 windows"],
    );
    assert_invalid(WaveletConfig::from_windows(4, 4, vec![2], w), from, "windows", &[]);
    assert_invalid(
        WaveletConfig::from_windows(4, usize::MAX, vec![2], w),
        from,
        "windows",
        &[],
    );
    assert_invalid(
        WaveletConfig::from_windows(4, 1, vec![2, 0], w),
        from,
        "windows",
        &["coordinate 2"],
    );
    assert_invalid(
        WaveletConfig::from_windows(4, 0, vec![MAX_WINDOW + 1], w),
        from,
        "windows",
        &[&(MAX_WINDOW + 1).to_string()],
    );
}

// ---- device tests ---------------------------------------------------------------------------

/// Few elements, for compute-sanitizer: every dtype, both divisors, forward (with and without the
/// residual, allocating and into a poisoned output), backward, and the learnable forward and
/// backward; a scalar-path dim (3), a vector-path dim (16, a whole group of 8 with one window and
/// a group mixing windows and pass-through), windows beyond the sequence.
fn small_wavelet_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    fn all<T: Float>(device: &Device, rng: &mut StdRng) {
        let scalar = (shape(2, 5, 3), 1, vec![2, 7]);
        let vector = (shape(2, 5, 16), 0, vec![3, 3, 3, 3, 3, 3, 3, 3, 1, 6, 2]);
        for (s, first, windows) in [scalar, vector] {
            check_forward::<T>(device, rng, s, first, &windows, false, true);
            check_forward::<T>(device, rng, s, first, &windows, true, false);
            check_backward::<T>(device, rng, s, first, &windows, true);
            check_learnable::<T>(device, rng, s, first, &windows);
        }
    }
    all::<f32>(device, rng);
    all::<bf16>(device, rng);
    all::<f16>(device, rng);
}

/// Few elements again, for compute-sanitizer, but more chunks than the GPU tile kernel's ring
/// holds (13), so that buffers are reused, with windows read from the ring and from global
/// memory: f32 with the residual (16-row chunks, ring reach 96 rows), bf16 and f16 (64-row
/// chunks, reach 384), and the element path (dim 13).
fn small_ring_wraps_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let windows = [5, 96, 97, 250, 1, 40, 16, 17];
    check_forward::<f32>(device, rng, shape(1, 300, 16), 0, &windows, true, true);
    check_backward::<f32>(device, rng, shape(1, 300, 13), 2, &windows, true);
    let windows = [3, 384, 385, 700, 64, 65, 2, 1000];
    check_forward::<bf16>(device, rng, shape(1, 900, 16), 8, &windows, false, true);
    check_backward::<f16>(device, rng, shape(1, 900, 16), 0, &grouped_windows(16, &[385, 7]), true);
}

/// §3.5.7: x = [1, 2, 3, 4, 5] (batch 1, seq 5, dim 1). Every value is exact in every dtype.
fn spec_fixtures_body(device: &Device) {
    fn run<T: Float>(device: &Device) {
        let s = shape(1, 5, 1);
        let x = tensor(&[1.0f32, 2.0, 3.0, 4.0, 5.0].map(T::from_f32), s, device);
        let ones = tensor(&[T::from_f32(1.0); 5], s, device);
        let cases: [(usize, WaveletDivisor, [f64; 5], [f64; 5]); 4] = [
            (
                2,
                WaveletDivisor::Window,
                [0.5, 1.5, 2.5, 3.5, 4.5],
                [1.0, 1.0, 1.0, 1.0, 0.5],
            ),
            (
                4,
                WaveletDivisor::Window,
                [0.25, 0.75, 1.5, 2.5, 3.5],
                [1.0, 1.0, 0.75, 0.5, 0.25],
            ),
            (
                2,
                WaveletDivisor::Available,
                [1.0, 1.5, 2.5, 3.5, 4.5],
                [1.5, 1.0, 1.0, 1.0, 0.5],
            ),
            (
                4,
                WaveletDivisor::Available,
                [1.0, 1.5, 2.0, 2.5, 3.5],
                [25.0 / 12.0, 16.0 / 12.0, 10.0 / 12.0, 0.5, 0.25],
            ),
        ];
        for (k, divisor, forward, backward) in cases {
            let what = format!("{} fixture k={k} {divisor:?} on {device}", T::DTYPE);
            let config = WaveletConfig::from_windows(1, 0, vec![k], divisor).unwrap();
            assert_eq!(
                values::<T>(&wavelet_forward(&x, None, &config).unwrap()),
                forward,
                "{what}: forward"
            );
            let d_x = values::<T>(&wavelet_backward(&ones, &config).unwrap());
            if k == 4 && divisor == WaveletDivisor::Available {
                // Sums of 1/1, 1/2, 1/3, 1/4: not exact, so within T's rounding.
                check_values::<T>(&what, s, &d_x, &backward, &backward, 5);
            } else {
                assert_eq!(d_x, backward, "{what}: backward");
            }
        }
    }
    run::<f32>(device);
    run::<bf16>(device);
    run::<f16>(device);
}

/// Short and medium sequences (1, 2, 3, 17, 64, 65, 256, 257, 1000), dims on the GPU's scalar path
/// (1, 3, 13, 100) and its vector path (8, 16, 24, 40, 64), awkward windows and grouped ones, the
/// paper's table, with and without residual, allocating and into.
fn forward_cases<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let cases: Vec<(Shape, usize, Vec<usize>)> = vec![
        (shape(3, 1, 13), 2, awkward_windows(9, 1, 0)),
        (shape(2, 2, 8), 0, awkward_windows(8, 2, 3)),
        (shape(2, 3, 3), 0, vec![3, 1, 2]),
        (shape(1, 3, 1), 0, vec![2]),
        (shape(1, 17, 1), 0, vec![17]),
        (shape(3, 17, 40), 5, awkward_windows(30, 17, 0)),
        (shape(2, 17, 40), 0, grouped_windows(32, &[1, 17, 2, 18])),
        (shape(2, 64, 16), 3, awkward_windows(10, 64, 5)),
        (shape(2, 65, 24), 0, grouped_windows(24, &[65, 3, 64])),
        (shape(1, 256, 100), 10, awkward_windows(80, 256, 2)),
        (
            shape(2, 257, 64),
            0,
            grouped_windows(64, &[256, 1, 257, 2, 255, 300, 4, 8]),
        ),
        (shape(2, 257, 13), 4, awkward_windows(7, 257, 11)),
        (shape(1, 1000, 24), 8, grouped_windows(16, &[1000, 5])),
        (shape(1, 1000, 13), 0, awkward_windows(13, 1000, 1)),
    ];
    for (n, (s, first, windows)) in cases.into_iter().enumerate() {
        check_forward::<T>(device, rng, s, first, &windows, n % 3 == 1, n % 2 == 0);
    }
    // The paper's configuration for E = 128, L = 512 on a short batch.
    let paper = WaveletConfig::paper_default(128, 512).unwrap();
    let windows: Vec<usize> = paper.windows()[..64].iter().map(|&k| k as usize).collect();
    check_forward::<T>(device, rng, shape(2, 40, 128), 0, &windows, false, true);
}

fn forward_f32_body(device: &Device) {
    forward_cases::<f32>(device);
}

fn forward_bf16_body(device: &Device) {
    forward_cases::<bf16>(device);
}

fn forward_f16_body(device: &Device) {
    forward_cases::<f16>(device);
}

/// 4097 steps, forward and backward: the running window sum over many GPU steps, windows from 1 to
/// past the sequence, a vector-path dim (24) and a scalar-path dim (13), every dtype.
fn long_sequences_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let seq = 4097;
    let vector = (shape(1, seq, 24), 0, grouped_windows(16, &[1, 600]));
    let scalar = (shape(1, seq, 13), 2, vec![2, 3, 64, 257, 1000, 4097, 5000, 1, 9]);
    for (s, first, windows) in [vector, scalar] {
        check_forward::<f32>(device, rng, s, first, &windows, false, true);
        check_backward::<f32>(device, rng, s, first, &windows, false);
    }
    let half_case = (shape(1, seq, 16), 3, vec![1, 2, 3, 100, 4097, 7, 8]);
    let (s, first, windows) = half_case;
    check_forward::<bf16>(device, rng, s, first, &windows, true, true);
    check_backward::<bf16>(device, rng, s, first, &windows, true);
    check_forward::<f16>(device, rng, s, first, &windows, false, false);
    check_backward::<f16>(device, rng, s, first, &windows, true);
}

/// Windows around the limits of the GPU tile kernel (ops::WaveletKernel::Tiles): its chunks are
/// 64 rows (bf16/f16), 32 (f32, or bf16/f16 with the residual) or 16 (f32 with the residual), its
/// ring keeps 6 chunks behind the current one (windows up to 384, 192 or 96 rows read their
/// leaving rows from shared memory, longer ones from global memory). Windows at and around each
/// of those sizes and chunk multiples, paired equal and unequal within a lane's two coordinates,
/// over several 64-coordinate strips (one partly and one wholly passing through), on the vector
/// path (dim 200) and the element path (dim 203), forward with and without the residual and
/// backward, every dtype, sequences of 1100 tokens.
fn ring_and_far_windows_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let kinds = [
        95, 96, 97, 127, 128, 129, 191, 192, 193, 383, 384, 385, 1000, 1099, 1100, 1101, 2, 15, 16, 17, 63, 64, 65,
    ];
    // The first 60 coordinates in equal pairs, the next 60 each its own window.
    let windows: Vec<usize> = (0..120)
        .map(|j| {
            if j < 60 {
                kinds[j / 2 % kinds.len()]
            } else {
                kinds[j % kinds.len()]
            }
        })
        .collect();
    for (dim, first) in [(200, 0), (203, 3)] {
        let s = shape(2, 1100, dim);
        check_forward::<f32>(device, rng, s, first, &windows, false, true);
        check_forward::<bf16>(device, rng, s, first, &windows, true, false);
        check_backward::<f16>(device, rng, s, first, &windows, true);
    }
    let s = shape(1, 1100, 200);
    check_forward::<f32>(device, rng, s, 0, &windows, true, true);
    check_forward::<f16>(device, rng, s, 0, &windows, false, false);
    check_backward::<bf16>(device, rng, s, 0, &windows, false);
    check_backward::<f32>(device, rng, s, 0, &windows, true);
}

/// More sequences than a CUDA grid's y or z dimension holds (65535), each short, forward (with
/// the residual too) and backward. (The learnable variant is left out: its tap gradient over
/// 131074 rows is an f32 sum whose rounding, ~1e-4 of the result, says nothing about the grid.)
fn many_sequences_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let s = shape(65537, 2, 3);
    check_forward::<bf16>(device, rng, s, 0, &[2, 1], false, true);
    check_forward::<f32>(device, rng, s, 1, &[2], true, false);
    check_backward::<f32>(device, rng, s, 1, &[3, 2], true);
}

/// `wavelet_forward(x, Some(r))` is the reference applied to x + r (summed exactly); pass-through
/// coordinates are round(x + r); every dtype, scalar and vector paths.
fn residual_is_added_before_mixing_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    fn run<T: Float>(device: &Device, rng: &mut StdRng) {
        check_forward::<T>(device, rng, shape(2, 33, 13), 2, &[1, 2, 3, 33, 34, 8, 5], true, true);
        check_forward::<T>(
            device,
            rng,
            shape(3, 70, 24),
            0,
            &grouped_windows(16, &[4, 70]),
            true,
            false,
        );
        check_forward::<T>(device, rng, shape(1, 300, 16), 8, &[8; 8], true, true);
        check_forward::<T>(device, rng, shape(2, 9, 8), 2, &[3, 3, 1], true, true);
    }
    run::<f32>(device, rng);
    run::<bf16>(device, rng);
    run::<f16>(device, rng);
}

/// Values of `T` that a bit-for-bit copy must keep: signed zeros, infinities, NaNs with payloads,
/// subnormals, the largest finite values.
trait Special: Float {
    fn specials() -> Vec<Self>;
}

impl Special for f32 {
    fn specials() -> Vec<Self> {
        [
            0x8000_0000u32,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_1234,
            0xFFA0_0001,
            0x0000_0001,
            0x807F_FFFF,
            0x7F7F_FFFF,
        ]
        .into_iter()
        .map(f32::from_bits)
        .collect()
    }
}

impl Special for bf16 {
    fn specials() -> Vec<Self> {
        [0x8000u16, 0x7F80, 0xFF80, 0x7FC5, 0xFFA1, 0x0001, 0x807F, 0x7F7F]
            .into_iter()
            .map(bf16::from_bits)
            .collect()
    }
}

impl Special for f16 {
    fn specials() -> Vec<Self> {
        [0x8000u16, 0x7C00, 0xFC00, 0x7E05, 0xFD01, 0x0001, 0x83FF, 0x7BFF]
            .into_iter()
            .map(f16::from_bits)
            .collect()
    }
}

/// Without a residual, pass-through coordinates are the input's bytes, even for special values
/// (which only pass-through coordinates hold), on the vector path (whole groups of 8 passing
/// through), the mixed-group path and the scalar path; in the forward, the backward and the
/// learnable variant.
fn pass_through_is_bit_identical_body(device: &Device) {
    fn run<T: Special>(device: &Device, rng: &mut StdRng) {
        let specials = T::specials();
        let cases = [
            (shape(2, 40, 32), 8, vec![2; 8]),
            (shape(2, 40, 32), 3, vec![5; 10]),
            (shape(3, 17, 13), 4, vec![1, 2, 3]),
        ];
        for (s, first, windows) in cases {
            let mut x = uniform::<T>(rng, s.numel());
            let mixed = first..first + windows.len();
            let mut n_special = 0;
            for b in 0..s.batch {
                for t in 0..s.seq {
                    for i in (0..s.dim).filter(|i| !mixed.contains(i)) {
                        if (t + i + b) % 3 == 0 {
                            x[s.at(b, t, i)] = specials[n_special % specials.len()];
                            n_special += 1;
                        }
                    }
                }
            }
            let x_t = tensor(&x, s, device);
            let taps = wavelet_taps_init(&config(s.dim, first, &windows, WaveletDivisor::Window), device).unwrap();
            for divisor in DIVISORS {
                let config = config(s.dim, first, &windows, divisor);
                let what = format!(
                    "{} pass-through on {device}, {s:?}, windows {windows:?} from {first}",
                    T::DTYPE
                );
                let mut out = poisoned(s, T::DTYPE, device);
                wavelet_forward_into(&x_t, None, &config, &mut out).unwrap();
                check_pass_through(&format!("{what}: forward"), s, config.windows(), &x, None, &out);
                let d_x = wavelet_backward(&x_t, &config).unwrap();
                check_pass_through(&format!("{what}: backward"), s, config.windows(), &x, None, &d_x);
                let fir = wavelet_learnable_forward(&x_t, &taps, &config).unwrap();
                check_pass_through(&format!("{what}: learnable"), s, config.windows(), &x, None, &fir);
                let fir_d_x = wavelet_learnable_backward(&x_t, &x_t, &taps, &config).unwrap().0;
                check_pass_through(
                    &format!("{what}: learnable backward"),
                    s,
                    config.windows(),
                    &x,
                    None,
                    &fir_d_x,
                );
                // The mixed coordinates saw only finite values and are finite.
                for result in [&out, &d_x, &fir, &fir_d_x] {
                    for (n, v) in values::<T>(result).iter().enumerate() {
                        let (_, _, i) = s.position(n);
                        assert!(!mixed.contains(&i) || v.is_finite(), "{what}: element {n} is {v}");
                    }
                }
            }
        }
    }
    let mut rng = common::rng();
    run::<f32>(device, &mut rng);
    run::<bf16>(device, &mut rng);
    run::<f16>(device, &mut rng);
}

/// §3.5.2: changing x[:, t0, :] changes the output only at t >= t0, and for coordinate i only up
/// to t0 + k_i - 1, by delta / div(t) there. Inputs are multiples of 1/64 in [-1, 1] and the
/// changes too, so that every window sum is exact in f32 whatever the order of the additions, and
/// the outputs outside the window must keep their bits.
fn causality_by_perturbation_body(device: &Device) {
    let mut rng = common::rng();
    let cases = [
        (shape(2, 300, 24), 2, awkward_windows(20, 300, 0)),
        (shape(2, 300, 32), 0, grouped_windows(24, &[256, 5, 300])),
        (shape(1, 70, 13), 1, vec![1, 2, 3, 69, 70, 71, 5, 9, 33, 64]),
    ];
    for (s, first, windows) in cases {
        let dyadic = |rng: &mut StdRng| rng.random_range(-64..=64) as f32 / 64.0;
        let x: Vec<f32> = (0..s.numel()).map(|_| dyadic(&mut rng)).collect();
        let x_t = tensor(&x, s, device);
        for divisor in DIVISORS {
            let config = config(s.dim, first, &windows, divisor);
            let base = wavelet_forward(&x_t, None, &config).unwrap().to_vec::<f32>().unwrap();
            for t0 in [0, 1, s.seq / 2, s.seq - 1] {
                let what =
                    format!("causality on {device}, {s:?}, windows {windows:?} from {first}, {divisor:?}, t0 {t0}");
                let mut y = x.clone();
                let mut delta = vec![0.0f64; s.batch * s.dim];
                for b in 0..s.batch {
                    for i in 0..s.dim {
                        let change = rng.random_range(1..=64) as f32 / 64.0 * if rng.random() { 1.0 } else { -1.0 };
                        y[s.at(b, t0, i)] += change;
                        delta[b * s.dim + i] = change as f64;
                    }
                }
                let out = wavelet_forward(&tensor(&y, s, device), None, &config)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap();
                for b in 0..s.batch {
                    for t in 0..s.seq {
                        for (i, &k) in config.windows().iter().enumerate() {
                            let n = s.at(b, t, i);
                            let k = k as usize;
                            let last = t0 + k.max(1) - 1;
                            if t < t0 || t > last {
                                assert_eq!(
                                    out[n].to_bits(),
                                    base[n].to_bits(),
                                    "{what}: (b, t, i) = {:?} outside the window changed from {} to {}",
                                    (b, t, i),
                                    base[n],
                                    out[n]
                                );
                            } else {
                                let change = out[n] as f64 - base[n] as f64;
                                let div = if k == 0 { 1.0 } else { divisor_value(divisor, k, t) };
                                let expected = delta[b * s.dim + i] / div;
                                assert!(
                                    change != 0.0 && (change - expected).abs() <= 2f64.powi(-21),
                                    "{what}: (b, t, i) = {:?} inside the window changed by {change}, expected {expected}",
                                    (b, t, i)
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// §3.5.4: a constant input c gives c for t >= k_i - 1 and c·(t+1)/k_i before (Window divisor),
/// and c everywhere with the Available divisor; every dtype, scalar and vector paths.
fn constant_input_body(device: &Device) {
    fn run<T: Float>(device: &Device) {
        let cases = [
            (
                shape(2, 300, 16),
                3,
                vec![1, 2, 3, 5, 8, 64, 256, 257, 299, 300, 301, 4097],
            ),
            (shape(1, 300, 24), 0, grouped_windows(16, &[7, 300])),
        ];
        for (s, first, windows) in cases {
            for c in [0.3f32, -1.75] {
                let c = T::from_f32(c);
                let x = tensor(&vec![c; s.numel()], s, device);
                let c = c.to_f64();
                for divisor in DIVISORS {
                    let config = config(s.dim, first, &windows, divisor);
                    let what = format!(
                        "{} constant {c} on {device}, {s:?}, windows {windows:?}, {divisor:?}",
                        T::DTYPE
                    );
                    let mut expected = vec![c; s.numel()];
                    for b in 0..s.batch {
                        for t in 0..s.seq {
                            for (i, &k) in config.windows().iter().enumerate() {
                                let k = k as usize;
                                if divisor == WaveletDivisor::Window && k > 0 && t + 1 < k {
                                    expected[s.at(b, t, i)] = c * (t + 1) as f64 / k as f64;
                                }
                            }
                        }
                    }
                    let out = values::<T>(&wavelet_forward(&x, None, &config).unwrap());
                    check_values::<T>(&what, s, &out, &expected, &vec![c.abs(); s.numel()], s.seq);
                }
            }
        }
    }
    run::<f32>(device);
    run::<bf16>(device);
    run::<f16>(device);
}

/// §3.5.5: <A x, y> = <x, Aᵀ y> in f64 for random f32 x and y, with `wavelet_backward` as Aᵀ, both
/// divisors; and the same for the learnable variant with random taps.
fn backward_is_the_adjoint_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let cases = [
        (shape(2, 300, 24), 2, awkward_windows(20, 300, 4)),
        (shape(3, 17, 13), 0, awkward_windows(13, 17, 0)),
        (shape(2, 70, 16), 0, grouped_windows(16, &[8, 70])),
    ];
    let check = |what: &str, x: &[f64], ax: &[f64], y: &[f64], aty: &[f64]| {
        let lhs: f64 = ax.iter().zip(y).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(aty).map(|(a, b)| a * b).sum();
        let scale = norm(ax.iter().copied()) * norm(y.iter().copied());
        let error = (lhs - rhs).abs() / scale;
        assert!(
            error <= 1e-5,
            "{what}: <Ax, y> = {lhs}, <x, Aᵀy> = {rhs}, relative difference {error:.3e}"
        );
        eprintln!("relative difference {error:.2e}: {what}");
    };
    for (s, first, windows) in cases {
        let x = uniform::<f32>(rng, s.numel());
        let y = uniform::<f32>(rng, s.numel());
        let (x_t, y_t) = (tensor(&x, s, device), tensor(&y, s, device));
        let (x64, y64) = (f64s(&x), f64s(&y));
        for divisor in DIVISORS {
            let config = config(s.dim, first, &windows, divisor);
            let what = format!("adjoint on {device}, {s:?}, windows {windows:?} from {first}, {divisor:?}");
            let ax = values::<f32>(&wavelet_forward(&x_t, None, &config).unwrap());
            let aty = values::<f32>(&wavelet_backward(&y_t, &config).unwrap());
            check(&what, &x64, &ax, &y64, &aty);
        }
        // The learnable variant, with windows cut to a little past the sequence (the CPU's FIR
        // costs k per element whatever the sequence).
        let windows: Vec<usize> = windows.iter().map(|&k| k.min(s.seq + 3)).collect();
        let config = config(s.dim, first, &windows, WaveletDivisor::Window);
        let taps: Vec<f32> = uniform(rng, config.tap_count());
        let taps_t = Tensor::from_slice(&taps, &[taps.len()], device).unwrap();
        let ax = values::<f32>(&wavelet_learnable_forward(&x_t, &taps_t, &config).unwrap());
        let aty = values::<f32>(&wavelet_learnable_backward(&y_t, &x_t, &taps_t, &config).unwrap().0);
        check(
            &format!("learnable adjoint on {device}, {s:?}, windows {windows:?}"),
            &x64,
            &ax,
            &y64,
            &aty,
        );
    }
}

/// §3.3 against suffix-window sums, every dtype, awkward sizes; backward_into on a poisoned d_x
/// and the allocating form.
fn backward_cases<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let cases: Vec<(Shape, usize, Vec<usize>)> = vec![
        (shape(3, 1, 13), 2, awkward_windows(9, 1, 0)),
        (shape(2, 2, 8), 0, awkward_windows(8, 2, 3)),
        (shape(2, 3, 3), 0, vec![3, 1, 2]),
        (shape(3, 17, 40), 5, awkward_windows(30, 17, 0)),
        (shape(2, 17, 40), 0, grouped_windows(32, &[1, 17, 2, 18])),
        (shape(2, 65, 24), 0, grouped_windows(24, &[65, 3, 64])),
        (shape(1, 256, 100), 10, awkward_windows(80, 256, 2)),
        (
            shape(2, 257, 64),
            0,
            grouped_windows(64, &[256, 1, 257, 2, 255, 300, 4, 8]),
        ),
        (shape(1, 1000, 13), 0, awkward_windows(13, 1000, 1)),
    ];
    for (n, (s, first, windows)) in cases.into_iter().enumerate() {
        check_backward::<T>(device, rng, s, first, &windows, n % 2 == 0);
    }
}

fn backward_f32_body(device: &Device) {
    backward_cases::<f32>(device);
}

fn backward_bf16_body(device: &Device) {
    backward_cases::<bf16>(device);
}

fn backward_f16_body(device: &Device) {
    backward_cases::<f16>(device);
}

/// Central differences of L = Σ out·g (g random) on tiny f32 shapes: the box's d_x for both
/// divisors, and the learnable variant's d_x and d_taps. The op is linear in x and in the taps, so
/// a large step (the f32 step actually taken) is exact up to the rounding of the outputs.
fn finite_differences_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let s = shape(2, 6, 5);
    let (first, windows) = (1, vec![1, 3, 8]);
    let x = uniform::<f32>(rng, s.numel());
    let g = uniform::<f32>(rng, s.numel());
    let g64 = f64s(&g);
    let g_t = tensor(&g, s, device);
    let loss = |out: &Tensor| -> f64 { values::<f32>(out).iter().zip(&g64).map(|(o, g)| o * g).sum() };
    // d loss / d v[n] for every n, by central differences of `eval`.
    let numeric = |v: &[f32], eval: &dyn Fn(&[f32]) -> f64| -> Vec<f64> {
        (0..v.len())
            .map(|n| {
                let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
                plus[n] += 0.25;
                minus[n] -= 0.25;
                (eval(&plus) - eval(&minus)) / (plus[n] as f64 - minus[n] as f64)
            })
            .collect()
    };
    for divisor in DIVISORS {
        let config = config(s.dim, first, &windows, divisor);
        let analytic = values::<f32>(&wavelet_backward(&g_t, &config).unwrap());
        let numeric_d_x = numeric(&x, &|x| {
            loss(&wavelet_forward(&tensor(x, s, device), None, &config).unwrap())
        });
        assert_close(
            &format!("d_x by finite differences on {device}, {divisor:?}"),
            &analytic,
            &numeric_d_x,
            1e-5,
        );
    }
    let config = config(s.dim, first, &windows, WaveletDivisor::Window);
    let taps = uniform::<f32>(rng, config.tap_count());
    let taps_t = Tensor::from_slice(&taps, &[taps.len()], device).unwrap();
    let x_t = tensor(&x, s, device);
    let (d_x, d_taps) = wavelet_learnable_backward(&g_t, &x_t, &taps_t, &config).unwrap();
    let numeric_d_x = numeric(&x, &|x| {
        loss(&wavelet_learnable_forward(&tensor(x, s, device), &taps_t, &config).unwrap())
    });
    assert_close(
        &format!("learnable d_x by finite differences on {device}"),
        &values::<f32>(&d_x),
        &numeric_d_x,
        1e-5,
    );
    let numeric_d_taps = numeric(&taps, &|taps| {
        let taps_t = Tensor::from_slice(taps, &[taps.len()], device).unwrap();
        loss(&wavelet_learnable_forward(&x_t, &taps_t, &config).unwrap())
    });
    assert_close(
        &format!("learnable d_taps by finite differences on {device}"),
        &values::<f32>(&d_taps),
        &numeric_d_taps,
        1e-5,
    );
}

/// `wavelet_taps_init` gives 1/k_i for each of coordinate i's k_i taps (f32, laid out by
/// tap_offsets), and with them the learnable forward and backward equal the box with the Window
/// divisor up to f32 rounding; every dtype.
fn learnable_init_matches_the_box_body(device: &Device) {
    fn run<T: Float>(device: &Device, rng: &mut StdRng) {
        let cases = [
            (shape(2, 70, 20), 3, vec![1, 2, 3, 4, 5, 7, 8, 16, 17, 64, 65, 100]),
            (shape(2, 33, 24), 0, grouped_windows(16, &[4, 33])),
        ];
        for (s, first, windows) in cases {
            let config = config(s.dim, first, &windows, WaveletDivisor::Window);
            let taps = wavelet_taps_init(&config, device).unwrap();
            assert_eq!(taps.shape(), &[config.tap_count()]);
            assert_eq!(taps.dtype(), DType::F32);
            assert_eq!(taps.device(), *device);
            let tap_values = taps.to_vec::<f32>().unwrap();
            let offsets = config.tap_offsets();
            for (i, &k) in config.windows().iter().enumerate() {
                let start = offsets[i] as usize;
                for u in 0..k as usize {
                    assert_eq!(tap_values[start + u], 1.0 / k as f32, "tap {u} of coordinate {i}");
                }
            }
            let what = format!(
                "{} learnable with initial taps on {device}, {s:?}, windows {windows:?}",
                T::DTYPE
            );
            // Each against the f64 reference of the box, and the two against each other.
            let x = uniform::<T>(rng, s.numel());
            let x64 = f64s(&x);
            let x = tensor(&x, s, device);
            let windows = config.windows();
            let window = WaveletDivisor::Window;
            let expected = divided(&window_sums(&x64, s, windows), s, windows, window);
            let scale = box_scale(&x64, s, windows, window, false);
            let boxed = values::<T>(&wavelet_forward(&x, None, &config).unwrap());
            let fir = values::<T>(&wavelet_learnable_forward(&x, &taps, &config).unwrap());
            check_values::<T>(&format!("{what}: forward"), s, &fir, &expected, &scale, s.seq);
            assert_close(
                &format!("{what}: forward against the box"),
                &fir,
                &boxed,
                tolerance::<T>(s.seq),
            );
            let d_out = uniform::<T>(rng, s.numel());
            let d_out64 = f64s(&d_out);
            let d_out = tensor(&d_out, s, device);
            let expected = backward_reference(&d_out64, s, windows, window);
            let scale = box_scale(&d_out64, s, windows, window, true);
            let boxed = values::<T>(&wavelet_backward(&d_out, &config).unwrap());
            let fir = values::<T>(&wavelet_learnable_backward(&d_out, &x, &taps, &config).unwrap().0);
            check_values::<T>(&format!("{what}: backward"), s, &fir, &expected, &scale, s.seq);
            assert_close(
                &format!("{what}: backward against the box"),
                &fir,
                &boxed,
                tolerance::<T>(s.seq),
            );
        }
    }
    let mut rng = common::rng();
    run::<f32>(device, &mut rng);
    run::<bf16>(device, &mut rng);
    run::<f16>(device, &mut rng);
}

/// Random taps: forward, d_x and d_taps against f64 references, pass-through copied.
fn learnable_cases<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let cases: Vec<(Shape, usize, Vec<usize>)> = vec![
        (shape(1, 1, 3), 0, vec![1, 2, 5]),
        (shape(3, 17, 13), 2, vec![1, 2, 3, 17, 18, 20, 5, 8, 64]),
        (shape(2, 65, 16), 3, vec![1, 2, 3, 5, 8, 17, 64, 65]),
        (shape(2, 40, 24), 0, grouped_windows(24, &[4, 40, 1])),
        (shape(1, 300, 40), 0, grouped_windows(20, &[1, 2, 4, 8, 16, 32, 64])),
        (
            shape(2, 9, 70),
            1,
            awkward_windows(60, 9, 0).into_iter().map(|k| k.min(64)).collect(),
        ),
    ];
    for (s, first, windows) in cases {
        check_learnable::<T>(device, rng, s, first, &windows);
    }
}

fn learnable_random_taps_f32_body(device: &Device) {
    learnable_cases::<f32>(device);
}

fn learnable_random_taps_bf16_body(device: &Device) {
    learnable_cases::<bf16>(device);
}

fn learnable_random_taps_f16_body(device: &Device) {
    learnable_cases::<f16>(device);
}

/// A window of more than 65535 taps (more than a CUDA grid's y dimension) beside small ones, on a
/// short sequence: the taps beyond the sequence get a zero gradient.
fn learnable_window_beyond_grid_limits_body(device: &Device) {
    let mut rng = common::rng();
    check_learnable::<f32>(device, &mut rng, shape(2, 5, 3), 0, &[70_000, 2, 3]);
}

/// The `_into` forms write every element of a poisoned output and agree bit for bit with the
/// allocating forms; a second call into the same output takes the new input.
fn into_forms_write_poisoned_outputs_body(device: &Device) {
    fn run<T: Float>(device: &Device, rng: &mut StdRng) {
        for (s, first, windows) in [
            (shape(2, 33, 16), 2, vec![1, 2, 3, 33, 40, 8]),
            (shape(1, 5, 3), 0, vec![2, 9]),
            (shape(2, 20, 24), 0, grouped_windows(16, &[3, 20])),
        ] {
            for divisor in DIVISORS {
                let config = config(s.dim, first, &windows, divisor);
                let what = format!("{} into on {device}, {s:?}, windows {windows:?}, {divisor:?}", T::DTYPE);
                let mut out = poisoned(s, T::DTYPE, device);
                let mut d_x = poisoned(s, T::DTYPE, device);
                for round in 0..2 {
                    let x = tensor(&uniform::<T>(rng, s.numel()), s, device);
                    let r = tensor(&uniform::<T>(rng, s.numel()), s, device);
                    // Round 0 writes over NaNs, then each call over the previous call's result.
                    for residual in [None, Some(&r)] {
                        wavelet_forward_into(&x, residual, &config, &mut out).unwrap();
                        let allocated = wavelet_forward(&x, residual, &config).unwrap();
                        assert_eq!(bytes(&out), bytes(&allocated), "{what}: forward, round {round}");
                        let v = values::<T>(&out);
                        assert!(v.iter().all(|v| v.is_finite()), "{what}: forward not finite");
                    }
                    wavelet_backward_into(&x, &config, &mut d_x).unwrap();
                    let allocated = wavelet_backward(&x, &config).unwrap();
                    assert_eq!(bytes(&d_x), bytes(&allocated), "{what}: backward, round {round}");
                    assert!(
                        values::<T>(&d_x).iter().all(|v| v.is_finite()),
                        "{what}: backward not finite"
                    );
                }
            }
        }
    }
    let mut rng = common::rng();
    run::<f32>(device, &mut rng);
    run::<bf16>(device, &mut rng);
    run::<f16>(device, &mut rng);
}

fn f32_tensor(rng: &mut StdRng, dims: &[usize], device: &Device) -> Tensor {
    let numel = dims.iter().product();
    Tensor::from_vec(uniform::<f32>(rng, numel), dims, device).unwrap()
}

/// Bad tensors: an argument error naming the op and the argument.
fn errors_name_the_argument_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let config = WaveletConfig::from_windows(8, 1, vec![2, 3], WaveletDivisor::Window).unwrap();
    let x = f32_tensor(rng, &[2, 5, 8], device);
    let fwd = "wavelet";
    let bwd = "wavelet_backward";
    let lfwd = "wavelet_learnable_forward";
    let lbwd = "wavelet_learnable_backward";

    // x: rank, dim, empty batch or sequence, dtype.
    let rank2 = f32_tensor(rng, &[10, 8], device);
    assert_invalid(wavelet_forward(&rank2, None, &config), fwd, "x", &["3-d", "[10, 8]"]);
    let rank4 = f32_tensor(rng, &[1, 2, 5, 8], device);
    assert_invalid(wavelet_forward(&rank4, None, &config), fwd, "x", &["3-d"]);
    let wrong_dim = f32_tensor(rng, &[2, 5, 7], device);
    assert_invalid(
        wavelet_forward(&wrong_dim, None, &config),
        fwd,
        "x",
        &["8", "[2, 5, 7]"],
    );
    let no_batch = Tensor::zeros(&[0, 5, 8], DType::F32, device).unwrap();
    assert_invalid(wavelet_forward(&no_batch, None, &config), fwd, "x", &["[0, 5, 8]"]);
    let no_seq = Tensor::zeros(&[2, 0, 8], DType::F32, device).unwrap();
    assert_invalid(wavelet_forward(&no_seq, None, &config), fwd, "x", &["[2, 0, 8]"]);
    let bytes_x = Tensor::from_vec(vec![1u8; 80], &[2, 5, 8], device).unwrap();
    assert_invalid(wavelet_forward(&bytes_x, None, &config), fwd, "x", &["u8"]);
    let words_x = Tensor::from_vec(vec![1u32; 80], &[2, 5, 8], device).unwrap();
    assert_invalid(wavelet_forward(&words_x, None, &config), fwd, "x", &["u32"]);

    // residual: shape, dtype.
    let short = f32_tensor(rng, &[2, 4, 8], device);
    assert_invalid(
        wavelet_forward(&x, Some(&short), &config),
        fwd,
        "residual",
        &["[2, 5, 8]", "[2, 4, 8]"],
    );
    let bf16_residual = Tensor::from_vec(vec![bf16::ONE; 80], &[2, 5, 8], device).unwrap();
    assert_invalid(
        wavelet_forward(&x, Some(&bf16_residual), &config),
        fwd,
        "residual",
        &["f32", "bf16"],
    );

    // out: shape, dtype.
    let mut out = f32_tensor(rng, &[2, 5, 9], device);
    assert_invalid(
        wavelet_forward_into(&x, None, &config, &mut out),
        fwd,
        "out",
        &["[2, 5, 9]"],
    );
    let mut out = Tensor::zeros(&[2, 5, 8], DType::F16, device).unwrap();
    assert_invalid(
        wavelet_forward_into(&x, None, &config, &mut out),
        fwd,
        "out",
        &["f32", "f16"],
    );
    // x is checked first, in the _into form too.
    let mut out = f32_tensor(rng, &[2, 5, 8], device);
    assert_invalid(wavelet_forward_into(&wrong_dim, None, &config, &mut out), fwd, "x", &[]);

    // Backward: d_out and d_x.
    assert_invalid(wavelet_backward(&rank2, &config), bwd, "d_out", &["3-d"]);
    assert_invalid(wavelet_backward(&wrong_dim, &config), bwd, "d_out", &["[2, 5, 7]"]);
    assert_invalid(wavelet_backward(&no_seq, &config), bwd, "d_out", &[]);
    assert_invalid(wavelet_backward(&bytes_x, &config), bwd, "d_out", &["u8"]);
    let mut d_x = f32_tensor(rng, &[2, 6, 8], device);
    assert_invalid(wavelet_backward_into(&x, &config, &mut d_x), bwd, "d_x", &["[2, 6, 8]"]);
    let mut d_x = Tensor::zeros(&[2, 5, 8], DType::BF16, device).unwrap();
    assert_invalid(wavelet_backward_into(&x, &config, &mut d_x), bwd, "d_x", &["bf16"]);

    // Learnable: taps length and dtype, x and d_out.
    let taps = wavelet_taps_init(&config, device).unwrap();
    let long_taps = f32_tensor(rng, &[6], device);
    assert_invalid(
        wavelet_learnable_forward(&x, &long_taps, &config),
        lfwd,
        "taps",
        &["[5]", "[6]"],
    );
    let matrix_taps = f32_tensor(rng, &[1, 5], device);
    assert_invalid(
        wavelet_learnable_forward(&x, &matrix_taps, &config),
        lfwd,
        "taps",
        &["[1, 5]"],
    );
    let bf16_taps = Tensor::from_vec(vec![bf16::ONE; 5], &[5], device).unwrap();
    assert_invalid(
        wavelet_learnable_forward(&x, &bf16_taps, &config),
        lfwd,
        "taps",
        &["bf16"],
    );
    assert_invalid(wavelet_learnable_forward(&wrong_dim, &taps, &config), lfwd, "x", &[]);
    assert_invalid(wavelet_learnable_forward(&bytes_x, &taps, &config), lfwd, "x", &["u8"]);
    assert_invalid(
        wavelet_learnable_backward(&x, &x, &long_taps, &config),
        lbwd,
        "taps",
        &["[6]"],
    );
    assert_invalid(
        wavelet_learnable_backward(&x, &x, &bf16_taps, &config),
        lbwd,
        "taps",
        &["bf16"],
    );
    assert_invalid(
        wavelet_learnable_backward(&wrong_dim, &x, &taps, &config),
        lbwd,
        "d_out",
        &[],
    );
    assert_invalid(
        wavelet_learnable_backward(&x, &short, &taps, &config),
        lbwd,
        "x",
        &["[2, 4, 8]"],
    );
    assert_invalid(
        wavelet_learnable_backward(&x, &bf16_residual, &taps, &config),
        lbwd,
        "x",
        &["bf16"],
    );
    // The bf16 x with f32 taps is fine: taps are f32 whatever the dtype of x.
    wavelet_learnable_forward(&bf16_residual, &taps, &config).unwrap();

    // Tensors on another device than x (only where there is a second device).
    if device.is_cuda() {
        let cpu = Device::Cpu;
        let r_cpu = f32_tensor(rng, &[2, 5, 8], &cpu);
        assert_invalid(wavelet_forward(&x, Some(&r_cpu), &config), fwd, "residual", &["cpu"]);
        let mut out_cpu = f32_tensor(rng, &[2, 5, 8], &cpu);
        assert_invalid(
            wavelet_forward_into(&x, None, &config, &mut out_cpu),
            fwd,
            "out",
            &["cpu"],
        );
        assert_invalid(wavelet_backward_into(&x, &config, &mut out_cpu), bwd, "d_x", &["cpu"]);
        let taps_cpu = wavelet_taps_init(&config, &cpu).unwrap();
        assert_invalid(
            wavelet_learnable_forward(&x, &taps_cpu, &config),
            lfwd,
            "taps",
            &["cpu"],
        );
        assert_invalid(
            wavelet_learnable_backward(&x, &r_cpu, &taps, &config),
            lbwd,
            "x",
            &["cpu"],
        );
    }
}

/// A failed `_into` call writes nothing: the output keeps its bytes, whatever the error.
fn errors_leave_outputs_unchanged_body(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let config = WaveletConfig::from_windows(8, 0, vec![4; 8], WaveletDivisor::Available).unwrap();
    let x = f32_tensor(rng, &[2, 5, 8], device);
    let wrong_dim = f32_tensor(rng, &[2, 5, 7], device);
    let short = f32_tensor(rng, &[2, 4, 8], device);
    let bf16_residual = Tensor::from_vec(vec![bf16::ONE; 80], &[2, 5, 8], device).unwrap();
    let bytes_x = Tensor::from_vec(vec![1u8; 80], &[2, 5, 8], device).unwrap();
    let mut out = Tensor::zeros(&[2, 5, 8], DType::F32, device).unwrap();
    out.fill_bytes(0x5A).unwrap();
    let pattern = vec![0x5Au8; 2 * 5 * 8 * 4];
    let cases: [(&Tensor, Option<&Tensor>, &str); 4] = [
        (&wrong_dim, None, "x"),
        (&bytes_x, None, "x"),
        (&x, Some(&short), "residual"),
        (&x, Some(&bf16_residual), "residual"),
    ];
    for (x, residual, arg) in cases {
        assert_invalid(
            wavelet_forward_into(x, residual, &config, &mut out),
            "wavelet",
            arg,
            &[],
        );
        device.synchronize().unwrap();
        assert_eq!(bytes(&out), pattern, "out changed by a failed forward ({arg})");
    }
    // `short` is a valid d_out, but not of d_x's shape.
    for (d_out, arg) in [(&wrong_dim, "d_out"), (&bytes_x, "d_out"), (&short, "d_x")] {
        assert_invalid(
            wavelet_backward_into(d_out, &config, &mut out),
            "wavelet_backward",
            arg,
            &[],
        );
        device.synchronize().unwrap();
        assert_eq!(bytes(&out), pattern, "d_x changed by a failed backward ({arg})");
    }
    // A wrong output keeps its bytes too.
    let mut wide = Tensor::zeros(&[2, 5, 9], DType::F32, device).unwrap();
    wide.fill_bytes(0x5A).unwrap();
    assert_invalid(
        wavelet_forward_into(&x, None, &config, &mut wide),
        "wavelet",
        "out",
        &[],
    );
    assert_invalid(
        wavelet_backward_into(&x, &config, &mut wide),
        "wavelet_backward",
        "d_x",
        &[],
    );
    device.synchronize().unwrap();
    assert_eq!(
        bytes(&wide),
        vec![0x5Au8; 2 * 5 * 9 * 4],
        "a wrong-shaped output changed"
    );
    // The same calls with good arguments do write.
    wavelet_forward_into(&x, None, &config, &mut out).unwrap();
    assert_ne!(bytes(&out), pattern);
    out.fill_bytes(0x5A).unwrap();
    wavelet_backward_into(&x, &config, &mut out).unwrap();
    assert_ne!(bytes(&out), pattern);
}
