//! Helpers shared by the integration tests: the GPU probe, the macro that runs one test body on
//! every device, a seeded RNG, random inputs and the relative-error comparison.
//!
//! Each test file includes this module with `#[macro_use] mod common;`, and not every file uses
//! every helper.
#![allow(dead_code, unused_macros)]

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera::{Device, Element, Tensor};

/// The first GPU, or `None` (with a note on stderr) when there is none.
///
/// With `TESSERA_REQUIRE_GPU=1` a missing GPU panics instead, so that a run meant to exercise the
/// GPU cannot pass by skipping every GPU test.
pub fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            if require_gpu() {
                panic!("TESSERA_REQUIRE_GPU=1 but no GPU can be used: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// True when the environment says that a missing GPU is a failure.
pub fn require_gpu() -> bool {
    std::env::var("TESSERA_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1")
}

/// Runs each listed `fn name(device: &Device)` of the test file as two tests, `cpu::name` on the
/// CPU and `gpu::name` on the first GPU (skipped, see [`gpu`], when there is none). Use it once per
/// file, listing every device test; attributes before a name (`#[ignore = "why"]`) go on both.
macro_rules! on_each_device {
    ($($(#[$attribute:meta])* $name:ident),+ $(,)?) => {
        mod cpu {
            $(
                #[test]
                $(#[$attribute])*
                fn $name() {
                    super::$name(&tessera::Device::Cpu);
                }
            )+
        }

        mod gpu {
            $(
                #[test]
                $(#[$attribute])*
                fn $name() {
                    if let Some(device) = crate::common::gpu() {
                        super::$name(&device);
                    }
                }
            )+
        }
    };
}

/// The seed of this test's randomness: `TESSERA_SEED` when set, else a fresh one. It is printed, so
/// that a failing run can be repeated with `TESSERA_SEED=<seed>`.
pub fn seed() -> u64 {
    let seed = match std::env::var("TESSERA_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("TESSERA_SEED={text:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    };
    eprintln!("random seed: {seed} (rerun with TESSERA_SEED={seed} to repeat)");
    seed
}

/// A seeded RNG; see [`seed`].
pub fn rng() -> StdRng {
    StdRng::seed_from_u64(seed())
}

/// The floating-point element types, with exact conversions to f64 and rounding from f32.
pub trait Float: Element + Copy {
    /// Relative tolerance of a matmul whose output has this dtype (see the project's method:
    /// f32 accumulation; bf16 and f16 outputs are rounded once at the end).
    const MATMUL_TOLERANCE: f64;
    fn to_f64(self) -> f64;
    /// Round to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl Float for f32 {
    const MATMUL_TOLERANCE: f64 = 1e-5;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Float for bf16 {
    const MATMUL_TOLERANCE: f64 = 1e-2;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Float for f16 {
    const MATMUL_TOLERANCE: f64 = 2e-3;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// `len` values drawn uniformly from [-1, 1] and rounded to `T`; never all zero.
pub fn uniform<T: Float>(rng: &mut StdRng, len: usize) -> Vec<T> {
    uniform_in(rng, len, -1.0, 1.0)
}

/// `len` values drawn uniformly from [low, high] and rounded to `T`; never all zero.
pub fn uniform_in<T: Float>(rng: &mut StdRng, len: usize, low: f32, high: f32) -> Vec<T> {
    loop {
        let values: Vec<T> = (0..len).map(|_| T::from_f32(rng.random_range(low..=high))).collect();
        if len == 0 || values.iter().any(|v| v.to_f64() != 0.0) {
            return values;
        }
    }
}

/// Widens to f64, exactly.
pub fn to_f64<T: Float>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

/// A tensor's values widened to f64; panics when its dtype is not `T`.
pub fn values<T: Float>(tensor: &Tensor) -> Vec<f64> {
    to_f64(&tensor.to_vec::<T>().expect("to_vec"))
}

/// `‖out − reference‖₂ / ‖reference‖₂`, in f64 (the plain `‖out − reference‖₂` when the reference
/// is all zeros). Errs on a length mismatch and on the first non-finite element of `out`, so that
/// an element left unwritten in a NaN-poisoned output cannot pass.
pub fn relative_error(out: &[f64], reference: &[f64]) -> Result<f64, String> {
    relative_error_at_scale(out, reference, 0.0)
}

/// `‖out − reference‖₂ / max(‖reference‖₂, scale)`: as [`relative_error`], but measured against
/// at least `scale`, the size of the terms that the result was computed from, for results that
/// cancellation can make much smaller than their terms (a sum of terms of both signs).
pub fn relative_error_at_scale(out: &[f64], reference: &[f64], scale: f64) -> Result<f64, String> {
    if out.len() != reference.len() {
        return Err(format!(
            "{} elements, but the reference has {}",
            out.len(),
            reference.len()
        ));
    }
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        let bad = out.iter().filter(|x| !x.is_finite()).count();
        return Err(format!(
            "element {i} is {} (reference {}); {bad} of {} elements are not finite",
            out[i],
            reference[i],
            out.len()
        ));
    }
    if let Some(i) = reference.iter().position(|x| !x.is_finite()) {
        return Err(format!("the reference's element {i} is {}", reference[i]));
    }
    let diff = norm(out.iter().zip(reference).map(|(o, r)| o - r));
    let size = norm(reference.iter().copied()).max(scale);
    Ok(if size > 0.0 { diff / size } else { diff })
}

/// The Euclidean norm, in f64.
pub fn norm(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Panics unless `out` is finite and within `tolerance` relative error of `reference`; the message
/// names `what`, the error, and the element that differs most.
pub fn assert_close(what: &str, out: &[f64], reference: &[f64], tolerance: f64) {
    assert_close_at_scale(what, out, reference, tolerance, 0.0);
}

/// [`assert_close`] with the error measured by [`relative_error_at_scale`].
pub fn assert_close_at_scale(what: &str, out: &[f64], reference: &[f64], tolerance: f64, scale: f64) {
    match relative_error_at_scale(out, reference, scale) {
        Err(e) => panic!("{what}: {e}"),
        Ok(error) if error.is_nan() || error > tolerance => {
            let worst = out
                .iter()
                .zip(reference)
                .map(|(o, r)| (o - r).abs())
                .enumerate()
                .fold((0, 0.0f64), |best, (i, d)| if d > best.1 { (i, d) } else { best });
            panic!(
                "{what}: relative error {error:.3e} exceeds {tolerance:.1e}; the largest difference \
                 is at element {}: got {}, expected {}",
                worst.0, out[worst.0], reference[worst.0]
            );
        }
        Ok(error) => eprintln!("relative error {error:.2e} (tolerance {tolerance:.0e}): {what}"),
    }
}

/// The raw bytes of a tensor, whatever its dtype, for "left unchanged" checks.
pub fn bytes(tensor: &Tensor) -> Vec<u8> {
    use tessera::DType;
    match tensor.dtype() {
        DType::F32 => le_bytes(tensor.to_vec::<f32>().unwrap(), f32::to_le_bytes),
        DType::BF16 => le_bytes(tensor.to_vec::<bf16>().unwrap(), bf16::to_le_bytes),
        DType::F16 => le_bytes(tensor.to_vec::<f16>().unwrap(), f16::to_le_bytes),
        DType::U8 => tensor.to_vec::<u8>().unwrap(),
        DType::U16 => le_bytes(tensor.to_vec::<u16>().unwrap(), u16::to_le_bytes),
        DType::U32 => le_bytes(tensor.to_vec::<u32>().unwrap(), u32::to_le_bytes),
    }
}

fn le_bytes<T, const N: usize>(values: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(f).collect()
}

/// Asserts that `result` is an [`tessera::Error::InvalidArgument`] of `op` about `arg`, and that
/// its message names both and contains every string of `mentions`. Returns the message.
pub fn assert_invalid<T: std::fmt::Debug>(
    result: tessera::Result<T>,
    op: &str,
    arg: &str,
    mentions: &[&str],
) -> String {
    let error = match result {
        Ok(value) => panic!("expected an error about `{arg}` of {op}, got Ok({value:?})"),
        Err(error) => error,
    };
    let message = error.to_string();
    match &error {
        tessera::Error::InvalidArgument {
            op: got_op,
            arg: got_arg,
            ..
        } => {
            assert_eq!(*got_op, op, "wrong op in: {message}");
            assert_eq!(*got_arg, arg, "wrong argument in: {message}");
        }
        other => panic!("expected Error::InvalidArgument about `{arg}` of {op}, got {other:?}"),
    }
    assert!(message.contains(op), "message does not name {op}: {message}");
    assert!(
        message.contains(&format!("`{arg}`")),
        "message does not name `{arg}`: {message}"
    );
    for mention in mentions {
        assert!(
            message.contains(mention),
            "message does not mention {mention:?}: {message}"
        );
    }
    assert!(!message.contains('\n'), "message is not one line: {message}");
    message
}
