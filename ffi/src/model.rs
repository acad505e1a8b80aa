//! Models: load a checkpoint, run the forward pass to logits or to the loss, generate tokens.

use crate::device::clear_out;
use crate::handle::{self, Object, TesseraDevice, TesseraModel, TesseraTensor};
use crate::status::{guard, require, write_out, FfiError, FfiResult, TesseraStatus};
use std::ffi::CStr;
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tessera_core::model::generate::{generate, Sampling};
use tessera_core::model::{Gpt, GptConfig, GptParams};
use tessera_core::train::trainer::checkpoint_dir;
use tessera_core::{DType, Device, Tensor};

/// A NUL-terminated path argument (any bytes but NUL, as the system takes them).
pub(crate) fn path_arg<'a>(op: &str, arg: &str, path: *const c_char) -> FfiResult<&'a Path> {
    require(op, arg, path)?;
    // SAFETY: non-null; the caller promises a NUL-terminated string that outlives the call.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    if bytes.is_empty() {
        return Err(FfiError::invalid(op, arg, "a non-empty path", "\"\""));
    }
    Ok(Path::new(std::ffi::OsStr::from_bytes(bytes)))
}

/// A NUL-terminated UTF-8 text argument.
pub(crate) fn text_arg<'a>(op: &str, arg: &str, text: *const c_char) -> FfiResult<&'a str> {
    require(op, arg, text)?;
    // SAFETY: non-null; the caller promises a NUL-terminated string that outlives the call.
    unsafe { CStr::from_ptr(text) }
        .to_str()
        .map_err(|e| FfiError::invalid(op, arg, "UTF-8 text", e))
}

/// `count` token ids at `tokens` (which may be NULL only when `count` is 0).
pub(crate) fn tokens_arg<'a>(op: &str, arg: &str, tokens: *const u32, count: usize) -> FfiResult<&'a [u32]> {
    if count == 0 {
        return Ok(&[]);
    }
    require(op, arg, tokens)?;
    if !(tokens as usize).is_multiple_of(std::mem::align_of::<u32>()) {
        return Err(FfiError::invalid(
            op,
            arg,
            "a 4-byte aligned pointer",
            format!("{tokens:p}"),
        ));
    }
    // SAFETY: non-null and aligned; the caller promises `count` readable ids (header).
    Ok(unsafe { std::slice::from_raw_parts(tokens, count) })
}

/// `batch · seq`, or an error when it overflows.
pub(crate) fn token_count(op: &str, batch: usize, seq: usize) -> FfiResult<usize> {
    batch.checked_mul(seq).ok_or_else(|| {
        FfiError::invalid(
            op,
            "batch",
            "batch · seq that fits in size_t",
            format!("{batch} · {seq}"),
        )
    })
}

/// How `tessera_model_generate` draws each token. `tessera_sampling_default()` is greedy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraSampling {
    /// Divides the logits before sampling; 0 takes the most likely token (greedy). Finite, >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1];
    /// 1 keeps all.
    pub top_p: f32,
}

/// Greedy decoding: temperature 0, no top-k, top-p 1.
///
/// Ownership: returned by value. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_sampling_default() -> TesseraSampling {
    TesseraSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    }
}

/// A model's shape, as `tessera_model_info` gives it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraModelInfo {
    /// Token ids are below `vocab`; logits rows have `vocab` entries.
    pub vocab: usize,
    /// The longest sequence the model takes.
    pub context: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub width: usize,
    /// The number of parameters (tied embeddings counted once).
    pub parameters: usize,
}

pub(crate) fn model_info(config: &GptConfig) -> TesseraModelInfo {
    TesseraModelInfo {
        vocab: config.vocab,
        context: config.context,
        layers: config.layers,
        heads: config.heads,
        kv_heads: config.kv_heads,
        width: config.width,
        parameters: config.parameter_count(),
    }
}

fn load(path: &Path, preset: Option<&str>, device: &Device) -> FfiResult<Gpt> {
    let config = preset.map(GptConfig::preset).transpose()?;
    let file = if path.is_file() {
        path.to_path_buf()
    } else {
        checkpoint_dir(path)?.join("model.safetensors")
    };
    let params = GptParams::load(file, config.as_ref(), device)?;
    let context = params.config.context;
    Ok(Gpt::new(params, 1, context)?)
}

/// Loads a model on a device from `path`: a `model.safetensors` file, a checkpoint directory
/// holding one, or a training run's directory (the checkpoint its `latest` file names).
/// `preset` (`"tiny"`, `"llama-tiny"`, `"gpt2-small"`) gives the configuration of a checkpoint
/// that does not record one (a Hugging Face one); NULL uses the checkpoint's own.
///
/// Ownership: the strings are read during the call only; `*out` receives a new handle, released
/// with `tessera_model_free`. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_FILE` (missing, unreadable or corrupt checkpoint, tensor names or
/// shapes that do not match the configuration, no configuration and no preset),
/// `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `path` or `out`, unknown preset, non-UTF-8 preset),
/// `TESSERA_STATUS_INVALID_HANDLE`, `TESSERA_STATUS_CUDA`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_model_load(
    device: *const TesseraDevice,
    path: *const c_char,
    preset: *const c_char,
    out: *mut *mut TesseraModel,
) -> TesseraStatus {
    const OP: &str = "tessera_model_load";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let path = path_arg(OP, "path", path)?;
        let preset = (!preset.is_null())
            .then(|| text_arg(OP, "preset", preset))
            .transpose()?;
        let model = load(path, preset, &device)?;
        write_out(
            OP,
            "out",
            out,
            handle::register(Object::Model(Arc::new(Mutex::new(model)))),
        )
    })
}

/// Releases a model handle. NULL is accepted and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; a call using the
/// model on another thread finishes normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live model handle.
#[no_mangle]
pub unsafe extern "C" fn tessera_model_free(model: *mut TesseraModel) -> TesseraStatus {
    const OP: &str = "tessera_model_free";
    guard(OP, || handle::release(OP, "model", model, "a model handle"))
}

/// The model's shape into `*info`.
///
/// Ownership: none. Thread-safety: any thread; `TESSERA_STATUS_BUSY` while another call runs
/// the model. Errors: `TESSERA_STATUS_INVALID_HANDLE`, `TESSERA_STATUS_INVALID_ARGUMENT` (NULL
/// `info`), `TESSERA_STATUS_BUSY`; `*info` is unchanged on error.
#[no_mangle]
pub unsafe extern "C" fn tessera_model_info(model: *const TesseraModel, info: *mut TesseraModelInfo) -> TesseraStatus {
    const OP: &str = "tessera_model_info";
    guard(OP, || {
        let model = handle::model(OP, "model", model)?;
        require(OP, "info", info)?;
        let model = handle::exclusive(OP, "model", &model)?;
        write_out(OP, "info", info, model_info(&model.params.config))
    })
}

/// The logits of `tokens` (`batch · seq` ids, row-major (batch, seq), each below the
/// vocabulary; `seq` at most the context) into `logits`: an F32 tensor of shape
/// (batch · seq, vocab) on any device (wrap a host buffer with `tessera_tensor_wrap_host` to
/// receive them in caller memory). Row `b · seq + t` scores the token after `tokens[b, t]`.
///
/// Ownership: `tokens` is read during the call only. Thread-safety: any thread; one call at a
/// time per model (`TESSERA_STATUS_BUSY`), and `logits` may not be used by another call.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL or misaligned `tokens`, sizes, token ids,
/// `logits`' shape or dtype), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `logits`
/// is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_model_logits(
    model: *const TesseraModel,
    tokens: *const u32,
    batch: usize,
    seq: usize,
    logits: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_model_logits";
    guard(OP, || {
        let model = handle::model(OP, "model", model)?;
        let out = handle::tensor(OP, "logits", logits)?;
        let count = token_count(OP, batch, seq)?;
        let tokens = tokens_arg(OP, "tokens", tokens, count)?;
        let mut model = handle::exclusive(OP, "model", &model)?;
        let mut out = handle::write(OP, "logits", &out)?;
        let vocab = model.params.config.vocab;
        let shape = [count, vocab];
        if out.shape() != shape || out.dtype() != DType::F32 {
            return Err(FfiError::invalid(
                OP,
                "logits",
                format!("shape {shape:?} of f32"),
                format!("shape {:?} of {}", out.shape(), out.dtype()),
            ));
        }
        let result = model.logits(tokens, batch, seq)?;
        let values: Vec<f32> = match result.dtype() {
            DType::F32 => result.to_vec::<f32>()?,
            DType::BF16 => result.to_vec::<half::bf16>()?.iter().map(|v| v.to_f32()).collect(),
            DType::F16 => result.to_vec::<half::f16>()?.iter().map(|v| v.to_f32()).collect(),
            other => return Err(FfiError::invalid(OP, "model", "float logits", other)),
        };
        out.copy_from(&Tensor::from_vec(values, &shape, &Device::Cpu)?)?;
        Ok(())
    })
}

/// The mean next-token cross-entropy (nats per token) of `targets` given `inputs` (each
/// `batch · seq` ids, row-major (batch, seq)) into `*loss`; no gradients.
///
/// Ownership: the token arrays are read during the call only. Thread-safety: one call at a time
/// per model (`TESSERA_STATUS_BUSY`). Errors: as `tessera_model_logits`; `*loss` is unchanged on
/// error.
#[no_mangle]
pub unsafe extern "C" fn tessera_model_loss(
    model: *const TesseraModel,
    inputs: *const u32,
    targets: *const u32,
    batch: usize,
    seq: usize,
    loss: *mut f32,
) -> TesseraStatus {
    const OP: &str = "tessera_model_loss";
    guard(OP, || {
        let model = handle::model(OP, "model", model)?;
        require(OP, "loss", loss)?;
        let count = token_count(OP, batch, seq)?;
        let inputs = tokens_arg(OP, "inputs", inputs, count)?;
        let targets = tokens_arg(OP, "targets", targets, count)?;
        let mut model = handle::exclusive(OP, "model", &model)?;
        let value = model.loss(inputs, targets, batch, seq)?;
        write_out(OP, "loss", loss, value)
    })
}

/// Continues `prompt` (`prompt_len` ids, at least 1) by `count` tokens written to `out` (room
/// for `count` ids), drawn as `sampling` says (NULL: greedy); the same seed gives the same
/// tokens. Each token runs the model over the last `context` tokens.
///
/// Ownership: `prompt` is read during the call only. Thread-safety: one call at a time per
/// model (`TESSERA_STATUS_BUSY`). Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL pointers, an
/// empty prompt, ids past the vocabulary, sampling values out of range),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_model_generate(
    model: *const TesseraModel,
    prompt: *const u32,
    prompt_len: usize,
    count: usize,
    sampling: *const TesseraSampling,
    seed: u64,
    out: *mut u32,
) -> TesseraStatus {
    const OP: &str = "tessera_model_generate";
    guard(OP, || {
        let model = handle::model(OP, "model", model)?;
        let prompt = tokens_arg(OP, "prompt", prompt, prompt_len)?;
        if count > 0 {
            require(OP, "out", out)?;
        }
        let sampling = if sampling.is_null() {
            tessera_sampling_default()
        } else {
            // SAFETY: non-null; the caller promises a readable struct (header).
            unsafe { sampling.read() }
        };
        let sampling = Sampling {
            temperature: sampling.temperature,
            top_k: (sampling.top_k > 0).then_some(sampling.top_k),
            top_p: Some(sampling.top_p),
        };
        let mut model = handle::exclusive(OP, "model", &model)?;
        let tokens = generate(&mut model, prompt, count, &sampling, seed)?;
        if count > 0 {
            // SAFETY: non-null; the caller promises room for `count` ids (header), and
            // `generate` returns exactly `count`.
            unsafe { std::ptr::copy_nonoverlapping(tokens.as_ptr(), out, count.min(tokens.len())) };
        }
        Ok(())
    })
}
