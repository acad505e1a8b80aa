//! Binarized linear layers (FBI-LLM): the packed 1-bit inference form, the training form with its
//! straight-through backward, the xnor initialisation, and the autoregressive distillation loss.

use crate::handle::{self, SharedTensor, TesseraTensor};
use crate::status::{guard, FfiError, TesseraStatus};
use crate::wavelet::expect_output;
use tessera_core::ops::{self, binary::packed_words, BinaryLinear, PackedBinaryLinear};
use tessera_core::DType;

/// Packs the signs of a latent weight `weight` (F32, (d_out, d_in)) into `bits` (U32,
/// (d_out, ceil(d_in / 32)), on the weight's device): bit `j % 32` of word `j / 32` of row `i` is
/// 1 when `weight[i][j] < 0` (0, -0 and NaN pack as +1); padding bits past `d_in` are 0.
///
/// Ownership: nothing is taken; `bits` must not be or overlap `weight`. Thread-safety: any
/// thread; `bits` may not be used by another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, aliasing, NULL),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `bits` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_binary_pack(weight: *const TesseraTensor, bits: *mut TesseraTensor) -> TesseraStatus {
    const OP: &str = "tessera_binary_pack";
    guard(OP, || {
        let weight = handle::tensor(OP, "weight", weight)?;
        let bits = handle::tensor(OP, "bits", bits)?;
        handle::expect_other_handles(OP, "bits", &bits, &[("weight", &weight)])?;
        let weight = handle::read(OP, "weight", &weight)?;
        let mut bits = handle::write(OP, "bits", &bits)?;
        handle::expect_no_overlap(OP, "bits", &bits, &[("weight", &weight)])?;
        let packed = ops::binary_pack(&weight)?;
        let d_out = weight.shape()[0];
        let words = packed_words(weight.shape()[1]);
        expect_output(OP, "bits", &bits, &[d_out, words], DType::U32, &weight.device())?;
        bits.copy_from(&packed)?;
        Ok(())
    })
}

/// The packed inference form `y[n,i] = Σ_j s_ij·alpha_j·x[n,j] + Σ_j beta_j·x[n,j] + bias_i`
/// with `s_ij = ±1` from `bits` (U32, (d_out, ceil(d_in / 32)), as `tessera_binary_pack` writes
/// them), written into `y`. `x` is (tokens, d_in) of F32, BF16 or F16 on the CPU, BF16 or F16 on
/// a GPU; `alpha` and `beta` are F32 (d_in); `bias` is F32 (d_out) or NULL; `y` is (tokens,
/// d_out) of x's dtype; all on one device. `d_in` (1 to 2^30) is needed because the bits round it
/// up to 32. f32 accumulation; on a GPU up to 16 tokens take a streaming GEMV, more a tensor-core
/// GEMM, queued on the device's stream.
///
/// Ownership: nothing is taken; `y` must not be or overlap an input. Thread-safety: any thread;
/// inputs may be read by other calls meanwhile; `y` may not be used by another call
/// (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, `d_in` not matching the
/// bits, aliasing, NULL), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `y` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_binary_packed_forward(
    x: *const TesseraTensor,
    bits: *const TesseraTensor,
    alpha: *const TesseraTensor,
    beta: *const TesseraTensor,
    bias: *const TesseraTensor,
    d_in: usize,
    y: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_binary_packed_forward";
    guard(OP, || {
        let x = handle::tensor(OP, "x", x)?;
        let bits = handle::tensor(OP, "bits", bits)?;
        let alpha = handle::tensor(OP, "alpha", alpha)?;
        let beta = handle::tensor(OP, "beta", beta)?;
        let bias = handle::optional_tensor(OP, "bias", bias)?;
        let y = handle::tensor(OP, "y", y)?;
        let mut inputs = vec![("x", &x), ("bits", &bits), ("alpha", &alpha), ("beta", &beta)];
        inputs.extend(bias.as_ref().map(|b| ("bias", b)));
        handle::expect_other_handles(OP, "y", &y, &inputs)?;
        let x = handle::read(OP, "x", &x)?;
        let bits = handle::read(OP, "bits", &bits)?;
        let alpha = handle::read(OP, "alpha", &alpha)?;
        let beta = handle::read(OP, "beta", &beta)?;
        let bias = bias.as_ref().map(|b| handle::read(OP, "bias", b)).transpose()?;
        let mut y = handle::write(OP, "y", &y)?;
        let mut others = vec![("x", &*x), ("bits", &*bits), ("alpha", &*alpha), ("beta", &*beta)];
        others.extend(bias.as_deref().map(|b| ("bias", b)));
        handle::expect_no_overlap(OP, "y", &y, &others)?;
        let layer = PackedBinaryLinear {
            bits: &bits,
            alpha: &alpha,
            beta: &beta,
            bias: bias.as_deref(),
            d_in,
        };
        ops::binary_packed_forward_into(&x, layer, &mut y)?;
        Ok(())
    })
}

/// The spec's xnor initialisation of a latent weight `weight` (F32, (d_out, d_in)): per input
/// column `beta_j = mean_i W_ij` into `beta` and `alpha_j = mean_i |W_ij - beta_j|` into `alpha`,
/// both F32 (d_in) on the weight's device (a GPU weight is read back to the host once).
///
/// Ownership: nothing is taken; `alpha` and `beta` must be distinct and not overlap `weight`.
/// Thread-safety: any thread; `alpha` and `beta` may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, aliasing, NULL),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error neither output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_binary_init(
    weight: *const TesseraTensor,
    alpha: *mut TesseraTensor,
    beta: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_binary_init";
    guard(OP, || {
        let weight = handle::tensor(OP, "weight", weight)?;
        let alpha = handle::tensor(OP, "alpha", alpha)?;
        let beta = handle::tensor(OP, "beta", beta)?;
        handle::expect_distinct_outputs(OP, &[("alpha", &alpha), ("beta", &beta)], &[("weight", &weight)])?;
        let weight = handle::read(OP, "weight", &weight)?;
        let mut alpha = handle::write(OP, "alpha", &alpha)?;
        let mut beta = handle::write(OP, "beta", &beta)?;
        handle::expect_disjoint_outputs(OP, &[("alpha", &*alpha), ("beta", &*beta)], &[("weight", &*weight)])?;
        let (new_alpha, new_beta) = ops::binary_init(&weight)?;
        let device = weight.device();
        expect_output(OP, "alpha", &alpha, new_alpha.shape(), DType::F32, &device)?;
        expect_output(OP, "beta", &beta, new_beta.shape(), DType::F32, &device)?;
        alpha.copy_from(&new_alpha)?;
        beta.copy_from(&new_beta)?;
        Ok(())
    })
}

/// The training form's forward `y = x·W~ᵀ + bias` with `W~ = alpha·sign(weight) + beta`
/// (sign(0) = 0), computed without forming `W~`: `weight` F32 (d_out, d_in), `alpha` and `beta`
/// F32 (d_in), `bias` F32 (d_out) or NULL, `x` (tokens, d_in), `y` (tokens, d_out) of x's dtype.
/// Runs where the Rust op does (the CPU with F32 `x` today; a GPU call is
/// `TESSERA_STATUS_UNSUPPORTED` until the library's training form supports it). The result is
/// computed in tessera's memory and then copied into `y`.
///
/// Ownership: nothing is taken; `y` must not be or overlap an input. Thread-safety: as
/// `tessera_binary_packed_forward`.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, aliasing, NULL),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._UNSUPPORTED`, `..._CUDA`. On error `y` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_binary_linear_forward(
    x: *const TesseraTensor,
    weight: *const TesseraTensor,
    alpha: *const TesseraTensor,
    beta: *const TesseraTensor,
    bias: *const TesseraTensor,
    y: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_binary_linear_forward";
    guard(OP, || {
        let x = handle::tensor(OP, "x", x)?;
        let weight = handle::tensor(OP, "weight", weight)?;
        let alpha = handle::tensor(OP, "alpha", alpha)?;
        let beta = handle::tensor(OP, "beta", beta)?;
        let bias = handle::optional_tensor(OP, "bias", bias)?;
        let y = handle::tensor(OP, "y", y)?;
        let mut inputs = vec![("x", &x), ("weight", &weight), ("alpha", &alpha), ("beta", &beta)];
        inputs.extend(bias.as_ref().map(|b| ("bias", b)));
        handle::expect_other_handles(OP, "y", &y, &inputs)?;
        let x = handle::read(OP, "x", &x)?;
        let weight = handle::read(OP, "weight", &weight)?;
        let alpha = handle::read(OP, "alpha", &alpha)?;
        let beta = handle::read(OP, "beta", &beta)?;
        let bias = bias.as_ref().map(|b| handle::read(OP, "bias", b)).transpose()?;
        let mut y = handle::write(OP, "y", &y)?;
        let mut others = vec![("x", &*x), ("weight", &*weight), ("alpha", &*alpha), ("beta", &*beta)];
        others.extend(bias.as_deref().map(|b| ("bias", b)));
        handle::expect_no_overlap(OP, "y", &y, &others)?;
        let layer = BinaryLinear {
            weight: &weight,
            alpha: &alpha,
            beta: &beta,
            bias: bias.as_deref(),
        };
        let result = ops::binary_linear_forward(&x, layer)?;
        expect_output(OP, "y", &y, result.shape(), x.dtype(), &x.device())?;
        y.copy_from(&result)?;
        Ok(())
    })
}

/// The training form's backward with the straight-through estimator: given `d_y` (tokens,
/// d_out) and the forward's `x`, `weight`, `alpha`, `beta`, writes `d_x` (tokens, d_in; x's
/// dtype) and the F32 `d_weight` (d_out, d_in), `d_alpha` and `d_beta` (d_in), and `d_bias`
/// (d_out; NULL skips it, and it needs the forward's `bias`, which is otherwise only checked).
/// Runs where the Rust op does, as `tessera_binary_linear_forward`. Computed in tessera's memory,
/// then copied into the outputs.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs.
/// Thread-safety: as `tessera_binary_packed_forward`.
/// Errors: as `tessera_binary_linear_forward`, and `TESSERA_STATUS_INVALID_ARGUMENT` when
/// `d_bias` is given without `bias`. On error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_binary_linear_backward(
    d_y: *const TesseraTensor,
    x: *const TesseraTensor,
    weight: *const TesseraTensor,
    alpha: *const TesseraTensor,
    beta: *const TesseraTensor,
    bias: *const TesseraTensor,
    d_x: *mut TesseraTensor,
    d_weight: *mut TesseraTensor,
    d_alpha: *mut TesseraTensor,
    d_beta: *mut TesseraTensor,
    d_bias: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_binary_linear_backward";
    guard(OP, || {
        let d_y = handle::tensor(OP, "d_y", d_y)?;
        let x = handle::tensor(OP, "x", x)?;
        let weight = handle::tensor(OP, "weight", weight)?;
        let alpha = handle::tensor(OP, "alpha", alpha)?;
        let beta = handle::tensor(OP, "beta", beta)?;
        let bias = handle::optional_tensor(OP, "bias", bias)?;
        let d_x = handle::tensor(OP, "d_x", d_x)?;
        let d_weight = handle::tensor(OP, "d_weight", d_weight)?;
        let d_alpha = handle::tensor(OP, "d_alpha", d_alpha)?;
        let d_beta = handle::tensor(OP, "d_beta", d_beta)?;
        let d_bias = handle::optional_tensor(OP, "d_bias", d_bias)?;
        if d_bias.is_some() && bias.is_none() {
            return Err(FfiError::invalid(
                OP,
                "d_bias",
                "NULL when the layer has no bias (`bias` is NULL)",
                "a tensor",
            ));
        }
        let mut inputs: Vec<(&str, &SharedTensor)> = vec![
            ("d_y", &d_y),
            ("x", &x),
            ("weight", &weight),
            ("alpha", &alpha),
            ("beta", &beta),
        ];
        inputs.extend(bias.as_ref().map(|b| ("bias", b)));
        let mut outputs: Vec<(&str, &SharedTensor)> = vec![
            ("d_x", &d_x),
            ("d_weight", &d_weight),
            ("d_alpha", &d_alpha),
            ("d_beta", &d_beta),
        ];
        outputs.extend(d_bias.as_ref().map(|b| ("d_bias", b)));
        handle::expect_distinct_outputs(OP, &outputs, &inputs)?;
        let d_y = handle::read(OP, "d_y", &d_y)?;
        let x = handle::read(OP, "x", &x)?;
        let weight = handle::read(OP, "weight", &weight)?;
        let alpha = handle::read(OP, "alpha", &alpha)?;
        let beta = handle::read(OP, "beta", &beta)?;
        let bias = bias.as_ref().map(|b| handle::read(OP, "bias", b)).transpose()?;
        let mut d_x = handle::write(OP, "d_x", &d_x)?;
        let mut d_weight = handle::write(OP, "d_weight", &d_weight)?;
        let mut d_alpha = handle::write(OP, "d_alpha", &d_alpha)?;
        let mut d_beta = handle::write(OP, "d_beta", &d_beta)?;
        let mut d_bias = d_bias.as_ref().map(|b| handle::write(OP, "d_bias", b)).transpose()?;
        {
            let mut inputs = vec![
                ("d_y", &*d_y),
                ("x", &*x),
                ("weight", &*weight),
                ("alpha", &*alpha),
                ("beta", &*beta),
            ];
            inputs.extend(bias.as_deref().map(|b| ("bias", b)));
            let mut outputs = vec![
                ("d_x", &*d_x),
                ("d_weight", &*d_weight),
                ("d_alpha", &*d_alpha),
                ("d_beta", &*d_beta),
            ];
            outputs.extend(d_bias.as_deref().map(|b| ("d_bias", b)));
            handle::expect_disjoint_outputs(OP, &outputs, &inputs)?;
        }
        let layer = BinaryLinear {
            weight: &weight,
            alpha: &alpha,
            beta: &beta,
            bias: bias.as_deref(),
        };
        let grads = ops::binary_linear_backward(&d_y, &x, layer)?;
        let device = x.device();
        expect_output(OP, "d_x", &d_x, grads.d_x.shape(), x.dtype(), &device)?;
        expect_output(OP, "d_weight", &d_weight, grads.d_weight.shape(), DType::F32, &device)?;
        expect_output(OP, "d_alpha", &d_alpha, grads.d_alpha.shape(), DType::F32, &device)?;
        expect_output(OP, "d_beta", &d_beta, grads.d_beta.shape(), DType::F32, &device)?;
        let d_bias_grad = match (&d_bias, &grads.d_bias) {
            (Some(out), Some(grad)) => {
                expect_output(OP, "d_bias", out, grad.shape(), DType::F32, &device)?;
                Some(grad)
            }
            _ => None,
        };
        d_x.copy_from(&grads.d_x)?;
        d_weight.copy_from(&grads.d_weight)?;
        d_alpha.copy_from(&grads.d_alpha)?;
        d_beta.copy_from(&grads.d_beta)?;
        if let (Some(out), Some(grad)) = (&mut d_bias, d_bias_grad) {
            out.copy_from(grad)?;
        }
        Ok(())
    })
}

/// The autoregressive distillation loss `L = (1 - w)·L_AD + w·CE` with `w = ce_weight` in
/// [0, 1], `L_AD` the mean over rows of the cross-entropy of the student's softmax against the
/// teacher's, and `CE` the mean next-token cross-entropy of the student against `labels`.
/// `student` and `teacher` are logits (rows, vocab) of one dtype (F32, BF16 or F16); `labels` is
/// U32 (rows), every label below vocab, and may be NULL only when `ce_weight` is 0. Writes the
/// loss into `loss` (F32, shape (1)) and its gradient with respect to the student logits into
/// `grad` (like `student`). All on one device; deterministic.
///
/// Ownership: nothing is taken; `loss` and `grad` must be distinct and not overlap the inputs.
/// Thread-safety: any thread; `loss` and `grad` may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, `ce_weight` outside
/// [0, 1] or NaN, a label out of range, missing labels, aliasing, NULL), `..._INVALID_HANDLE`,
/// `..._BUSY`, `..._CUDA`. On error neither output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_distill_loss(
    student: *const TesseraTensor,
    teacher: *const TesseraTensor,
    labels: *const TesseraTensor,
    ce_weight: f32,
    loss: *mut TesseraTensor,
    grad: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_distill_loss";
    guard(OP, || {
        let student = handle::tensor(OP, "student", student)?;
        let teacher = handle::tensor(OP, "teacher", teacher)?;
        let labels = handle::optional_tensor(OP, "labels", labels)?;
        let loss = handle::tensor(OP, "loss", loss)?;
        let grad = handle::tensor(OP, "grad", grad)?;
        let mut inputs = vec![("student", &student), ("teacher", &teacher)];
        inputs.extend(labels.as_ref().map(|l| ("labels", l)));
        handle::expect_distinct_outputs(OP, &[("loss", &loss), ("grad", &grad)], &inputs)?;
        let student = handle::read(OP, "student", &student)?;
        let teacher = handle::read(OP, "teacher", &teacher)?;
        let labels = labels.as_ref().map(|l| handle::read(OP, "labels", l)).transpose()?;
        let mut loss = handle::write(OP, "loss", &loss)?;
        let mut grad = handle::write(OP, "grad", &grad)?;
        let mut inputs = vec![("student", &*student), ("teacher", &*teacher)];
        inputs.extend(labels.as_deref().map(|l| ("labels", l)));
        handle::expect_disjoint_outputs(OP, &[("loss", &*loss), ("grad", &*grad)], &inputs)?;
        ops::distill_loss_into(&student, &teacher, labels.as_deref(), ce_weight, &mut loss, &mut grad)?;
        Ok(())
    })
}
