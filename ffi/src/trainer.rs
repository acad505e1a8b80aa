//! Training: a run created from a preset (and TOML overrides) or resumed from a checkpoint,
//! trained on caller tokens or a text file, validated, saved.

use crate::device::clear_out;
use crate::handle::{self, Object, TesseraDevice, TesseraTrainer};
use crate::model::{model_info, path_arg, text_arg, tokens_arg, TesseraModelInfo};
use crate::status::{guard, require, write_out, FfiError, FfiResult, TesseraStatus};
use std::os::raw::c_char;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tessera_core::train::config::configuration;
use tessera_core::train::trainer::{StepRecord, Trainer};
use tessera_core::train::{Corpus, Tokenizer};

/// What the last of a call's training steps did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraStepRecord {
    /// Steps completed, counting this one (a resumed run continues its count).
    pub step: u64,
    /// The mean training loss over the step's micro-batches (nats per token).
    pub loss: f32,
    /// The learning rate the step used.
    pub lr: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens the step trained on.
    pub tokens: usize,
}

fn record(r: StepRecord) -> TesseraStepRecord {
    TesseraStepRecord {
        step: r.step,
        loss: r.loss,
        lr: r.lr,
        grad_norm: r.grad_norm,
        tokens: r.tokens,
    }
}

fn register(out: *mut *mut TesseraTrainer, op: &str, trainer: Trainer) -> FfiResult<()> {
    write_out(
        op,
        "out",
        out,
        handle::register(Object::Trainer(Arc::new(Mutex::new(trainer)))),
    )
}

/// A new training run on a device: the preset's model (`"tiny"`, `"llama-tiny"`,
/// `"gpt2-small"`), freshly initialised from the options' seed, and its training options, with
/// the fields of the TOML document's `[model]` and `[train]` tables laid over them (the format
/// of `tessera train --config`). The TOML comes as text in `config_toml` or from the file
/// `config_path`; both NULL uses the preset as it is; not both.
///
/// Ownership: the strings are read during the call only; `*out` receives a new handle, released
/// with `tessera_trainer_free`. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL `preset` or `out`, unknown preset, bad TOML,
/// unknown or mistyped fields, sizes that do not fit together, both TOML arguments given),
/// `TESSERA_STATUS_FILE` (unreadable `config_path`), `..._INVALID_HANDLE`, `..._CUDA`. On
/// failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_new(
    device: *const TesseraDevice,
    preset: *const c_char,
    config_toml: *const c_char,
    config_path: *const c_char,
    out: *mut *mut TesseraTrainer,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_new";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let preset = text_arg(OP, "preset", preset)?;
        let toml = match (config_toml.is_null(), config_path.is_null()) {
            (true, true) => None,
            (false, true) => Some(text_arg(OP, "config_toml", config_toml)?.to_string()),
            (true, false) => {
                let path = path_arg(OP, "config_path", config_path)?;
                let bytes = std::fs::read(path).map_err(|e| {
                    FfiError::with_status(
                        TesseraStatus::File,
                        format!("{}: cannot read the configuration: {e}", path.display()),
                    )
                })?;
                Some(String::from_utf8(bytes).map_err(|e| {
                    FfiError::with_status(TesseraStatus::File, format!("{}: not UTF-8 text: {e}", path.display()))
                })?)
            }
            (false, false) => {
                return Err(FfiError::invalid(
                    OP,
                    "config_path",
                    "NULL when `config_toml` is given",
                    "both",
                ))
            }
        };
        let (config, options) = configuration(preset, toml.as_deref())?;
        register(out, OP, Trainer::new(&config, options, &device)?)
    })
}

/// Continues a training run saved by `tessera_trainer_save` (or `tessera train`): `dir` is the
/// run's directory (the checkpoint its `latest` file names) or a checkpoint directory. The
/// model, the optimizer's moments, the step, the data position and the options are restored,
/// so the next steps are those the saved run would have taken.
///
/// Ownership: `dir` is read during the call only; `*out` receives a new handle, released with
/// `tessera_trainer_free`. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_FILE` (no checkpoint, missing or corrupt files),
/// `TESSERA_STATUS_INVALID_ARGUMENT` (NULL pointers), `..._INVALID_HANDLE`, `..._CUDA`. On
/// failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_resume(
    device: *const TesseraDevice,
    dir: *const c_char,
    out: *mut *mut TesseraTrainer,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_resume";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let dir = path_arg(OP, "dir", dir)?;
        register(out, OP, Trainer::resume(dir, &device)?)
    })
}

/// Releases a trainer handle. NULL is accepted and does nothing. Unsaved progress is lost.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; a call using the
/// trainer on another thread finishes normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live trainer handle.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_free(trainer: *mut TesseraTrainer) -> TesseraStatus {
    const OP: &str = "tessera_trainer_free";
    guard(OP, || handle::release(OP, "trainer", trainer, "a trainer handle"))
}

/// The trainer's model shape into `*info` (either may be skipped with NULL) and the steps
/// completed into `*step`.
///
/// Ownership: none. Thread-safety: any thread; `TESSERA_STATUS_BUSY` while another call uses
/// the trainer. Errors: `TESSERA_STATUS_INVALID_HANDLE`, `TESSERA_STATUS_BUSY`; outputs are
/// unchanged on error.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_info(
    trainer: *const TesseraTrainer,
    info: *mut TesseraModelInfo,
    step: *mut u64,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_info";
    guard(OP, || {
        let trainer = handle::trainer(OP, "trainer", trainer)?;
        let trainer = handle::exclusive(OP, "trainer", &trainer)?;
        if !info.is_null() {
            write_out(OP, "info", info, model_info(&trainer.model.params.config))?;
        }
        if !step.is_null() {
            write_out(OP, "step", step, trainer.step())?;
        }
        Ok(())
    })
}

/// Runs `steps` steps on `corpus`, stopping at the first failure; the last record goes to
/// `*last` when it is not NULL.
fn train(op: &str, trainer: &mut Trainer, corpus: &Corpus, steps: u64, last: *mut TesseraStepRecord) -> FfiResult<()> {
    let mut latest = None;
    for _ in 0..steps {
        latest = Some(trainer.train_step(corpus)?);
    }
    match (latest, last.is_null()) {
        (Some(r), false) => write_out(op, "last", last, record(r)),
        _ => Ok(()),
    }
}

/// Checks every id against the model's vocabulary before any step, so that a bad id fails the
/// call before the first step changes anything.
fn check_vocab(op: &str, arg: &str, tokens: &[u32], vocab: usize) -> FfiResult<()> {
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(FfiError::invalid(
            op,
            arg,
            format!("token ids below the vocabulary ({vocab})"),
            format!("{} at index {i}", tokens[i]),
        )),
        None => Ok(()),
    }
}

/// Runs `steps` optimizer steps on windows drawn from `tokens` (`count` ids, each below the
/// vocabulary, more than the options' `seq`), as the trainer's options say (batch, sequence
/// length, accumulation, learning-rate schedule, clipping). `*last` (may be NULL) receives the
/// last step's record.
///
/// Ownership: `tokens` is read during the call only. Thread-safety: one call at a time per
/// trainer (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL or misaligned `tokens`, ids past the
/// vocabulary, too few tokens), `TESSERA_STATUS_DIVERGED` (a loss or gradient that is not
/// finite: the parameters stay those of the last good step, and the steps before it count),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. `*last` is unchanged on error.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_train_tokens(
    trainer: *const TesseraTrainer,
    tokens: *const u32,
    count: usize,
    steps: u64,
    last: *mut TesseraStepRecord,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_train_tokens";
    guard(OP, || {
        let trainer = handle::trainer(OP, "trainer", trainer)?;
        let tokens = tokens_arg(OP, "tokens", tokens, count)?;
        let mut trainer = handle::exclusive(OP, "trainer", &trainer)?;
        check_vocab(OP, "tokens", tokens, trainer.model.params.config.vocab)?;
        let seq = trainer.options.seq;
        if count <= seq {
            return Err(FfiError::invalid(
                OP,
                "count",
                format!("more than seq ({seq}) tokens"),
                count,
            ));
        }
        let corpus = Corpus {
            name: "tokens".into(),
            train: tokens.to_vec(),
            validation: Vec::new(),
        };
        train(OP, &mut trainer, &corpus, steps, last)
    })
}

/// A text file as byte tokens, split into training text and the last tenth held out for
/// validation.
fn byte_corpus(op: &str, path: &Path, vocab: usize) -> FfiResult<Corpus> {
    if vocab < 256 {
        return Err(FfiError::invalid(
            op,
            "trainer",
            "a model with a vocabulary of at least 256 for byte tokens",
            vocab,
        ));
    }
    Ok(Corpus::from_file(path, &Tokenizer::Bytes)?)
}

/// Runs `steps` optimizer steps on the text file at `path`, read as bytes (one token per byte,
/// so the model's vocabulary must be at least 256); the last tenth of the file is held out for
/// `tessera_trainer_validate_file`. `*last` (may be NULL) receives the last step's record.
///
/// Ownership: `path` is read during the call only. Thread-safety: as
/// `tessera_trainer_train_tokens`. Errors: as `tessera_trainer_train_tokens`, and
/// `TESSERA_STATUS_FILE` for a file that cannot be read or is too small to split.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_train_file(
    trainer: *const TesseraTrainer,
    path: *const c_char,
    steps: u64,
    last: *mut TesseraStepRecord,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_train_file";
    guard(OP, || {
        let trainer = handle::trainer(OP, "trainer", trainer)?;
        let path = path_arg(OP, "path", path)?;
        let mut trainer = handle::exclusive(OP, "trainer", &trainer)?;
        let corpus = byte_corpus(OP, path, trainer.model.params.config.vocab)?;
        train(OP, &mut trainer, &corpus, steps, last)
    })
}

/// The mean next-token loss (nats per token) over `tokens` (`count` ids, below the vocabulary,
/// more than the options' `seq`) cut into consecutive windows of `seq + 1` (at most the
/// options' `eval_windows` of them, when not 0), into `*loss`. No parameter changes.
///
/// Ownership: `tokens` is read during the call only. Thread-safety: as
/// `tessera_trainer_train_tokens`. Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (NULL pointers,
/// ids, too few tokens), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`; `*loss` is unchanged on
/// error.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_validate_tokens(
    trainer: *const TesseraTrainer,
    tokens: *const u32,
    count: usize,
    loss: *mut f32,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_validate_tokens";
    guard(OP, || {
        let trainer = handle::trainer(OP, "trainer", trainer)?;
        require(OP, "loss", loss)?;
        let tokens = tokens_arg(OP, "tokens", tokens, count)?;
        let mut trainer = handle::exclusive(OP, "trainer", &trainer)?;
        check_vocab(OP, "tokens", tokens, trainer.model.params.config.vocab)?;
        let corpus = Corpus {
            name: "tokens".into(),
            train: Vec::new(),
            validation: tokens.to_vec(),
        };
        let value = trainer.validate(&corpus)?;
        write_out(OP, "loss", loss, value)
    })
}

/// The mean next-token loss over the held-out last tenth of the text file at `path` (as
/// `tessera_trainer_train_file` splits it), into `*loss`.
///
/// Ownership: `path` is read during the call only. Thread-safety: as
/// `tessera_trainer_train_tokens`. Errors: as `tessera_trainer_validate_tokens`, and
/// `TESSERA_STATUS_FILE` for a file that cannot be read or is too small to split.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_validate_file(
    trainer: *const TesseraTrainer,
    path: *const c_char,
    loss: *mut f32,
) -> TesseraStatus {
    const OP: &str = "tessera_trainer_validate_file";
    guard(OP, || {
        let trainer = handle::trainer(OP, "trainer", trainer)?;
        require(OP, "loss", loss)?;
        let path = path_arg(OP, "path", path)?;
        let mut trainer = handle::exclusive(OP, "trainer", &trainer)?;
        let corpus = byte_corpus(OP, path, trainer.model.params.config.vocab)?;
        let value = trainer.validate(&corpus)?;
        write_out(OP, "loss", loss, value)
    })
}

/// Saves a checkpoint of the current step under the directory `dir` (created when missing) as
/// `dir/step-NNNNNNNN` and points `dir/latest` at it, atomically: `tessera_trainer_resume` and
/// `tessera_model_load` read `dir` back.
///
/// Ownership: `dir` is read during the call only. Thread-safety: as
/// `tessera_trainer_train_tokens`. Errors: `TESSERA_STATUS_FILE` (cannot create or write),
/// `TESSERA_STATUS_INVALID_ARGUMENT` (NULL or empty `dir`), `..._INVALID_HANDLE`, `..._BUSY`,
/// `..._CUDA`.
#[no_mangle]
pub unsafe extern "C" fn tessera_trainer_save(trainer: *const TesseraTrainer, dir: *const c_char) -> TesseraStatus {
    const OP: &str = "tessera_trainer_save";
    guard(OP, || {
        let trainer = handle::trainer(OP, "trainer", trainer)?;
        let dir = path_arg(OP, "dir", dir)?;
        let trainer = handle::exclusive(OP, "trainer", &trainer)?;
        trainer.save(dir)?;
        Ok(())
    })
}
