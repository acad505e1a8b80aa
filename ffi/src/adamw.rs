//! Fused AdamW over a list of tensors.

use crate::handle::{self, SharedTensor, TesseraTensor};
use crate::matmul::flag;
use crate::status::{guard, require, FfiError, TesseraStatus};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};
use tessera_core::ops::{self, AdamWConfig, AdamWTensor};
use tessera_core::Tensor;

/// AdamW's hyper-parameters. `tessera_adamw_config_default()` gives PyTorch's defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TesseraAdamWConfig {
    /// Learning rate, finite and >= 0.
    pub lr: f32,
    /// First-moment decay, in [0, 1).
    pub beta1: f32,
    /// Second-moment decay, in [0, 1).
    pub beta2: f32,
    /// Added to the denominator, finite and > 0.
    pub eps: f32,
    /// Decoupled weight decay, finite and >= 0, applied to tensors whose `weight_decay` is 1.
    pub weight_decay: f32,
}

/// One parameter and its optimizer state for `tessera_adamw_step`: all of one shape and on one
/// device.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TesseraAdamWTensor {
    /// F32 master weight, updated in place.
    pub param: *mut TesseraTensor,
    /// F32 or BF16 gradient, read only.
    pub grad: *const TesseraTensor,
    /// F32 first moment, updated in place.
    pub exp_avg: *mut TesseraTensor,
    /// F32 second moment, updated in place.
    pub exp_avg_sq: *mut TesseraTensor,
    /// Optional (may be NULL) BF16 tensor that receives the updated weight.
    pub param_bf16: *mut TesseraTensor,
    /// 1: apply weight decay; 0: do not (biases, norm gains).
    pub weight_decay: i32,
}

/// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
///
/// Ownership: returned by value. Thread-safety: any thread. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_adamw_config_default() -> TesseraAdamWConfig {
    let c = AdamWConfig::default();
    TesseraAdamWConfig {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
    }
}

/// The handles of one entry, looked up.
struct Entry {
    param: SharedTensor,
    grad: SharedTensor,
    exp_avg: SharedTensor,
    exp_avg_sq: SharedTensor,
    param_bf16: Option<SharedTensor>,
    weight_decay: bool,
}

/// The locks of one entry, held for the step.
struct Locked<'a> {
    param: RwLockWriteGuard<'a, Tensor>,
    grad: RwLockReadGuard<'a, Tensor>,
    exp_avg: RwLockWriteGuard<'a, Tensor>,
    exp_avg_sq: RwLockWriteGuard<'a, Tensor>,
    param_bf16: Option<RwLockWriteGuard<'a, Tensor>>,
}

/// One AdamW step over `count` tensors at 1-based step number `step`, with every gradient
/// multiplied by `grad_scale` first (1 for none). The arithmetic is PyTorch's fused AdamW in f32;
/// all tensors are updated in one pass (one launch on a GPU, queued on the device's stream).
///
/// `tensors` points to `count` entries (may be NULL when `count` is 0); `config` may be NULL for
/// the defaults. All tensors must be on one device; no tensor that is written (param, moments,
/// bf16 copy) may appear twice in the list or share memory with another.
/// Ownership: nothing is taken. Thread-safety: any thread; the written tensors may not be used by
/// another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (dtypes, shapes, devices, hyper-parameters, step 0,
/// a written tensor repeated), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. Validation happens
/// before anything is written, so on error every tensor is as it was.
#[no_mangle]
pub unsafe extern "C" fn tessera_adamw_step(
    tensors: *const TesseraAdamWTensor,
    count: usize,
    config: *const TesseraAdamWConfig,
    step: u64,
    grad_scale: f32,
) -> TesseraStatus {
    const OP: &str = "tessera_adamw_step";
    guard(OP, || {
        let config = if config.is_null() {
            tessera_adamw_config_default()
        } else {
            // SAFETY: non-null; the caller promises a readable config (header).
            unsafe { config.read() }
        };
        let config = AdamWConfig {
            lr: config.lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
        };
        let entries: &[TesseraAdamWTensor] = if count == 0 {
            &[]
        } else {
            require(OP, "tensors", tensors)?;
            // SAFETY: non-null, and the caller promises `count` readable entries (header).
            unsafe { std::slice::from_raw_parts(tensors, count) }
        };
        let entries = entries
            .iter()
            .map(|e| {
                Ok(Entry {
                    param: handle::tensor(OP, "tensors[].param", e.param)?,
                    grad: handle::tensor(OP, "tensors[].grad", e.grad)?,
                    exp_avg: handle::tensor(OP, "tensors[].exp_avg", e.exp_avg)?,
                    exp_avg_sq: handle::tensor(OP, "tensors[].exp_avg_sq", e.exp_avg_sq)?,
                    param_bf16: (!e.param_bf16.is_null())
                        .then(|| handle::tensor(OP, "tensors[].param_bf16", e.param_bf16))
                        .transpose()?,
                    weight_decay: flag(OP, "tensors[].weight_decay", e.weight_decay)?,
                })
            })
            .collect::<Result<Vec<_>, FfiError>>()?;

        // Every handle in the call, and which are written: a written one may appear only once.
        let mut all: Vec<(&str, &SharedTensor)> = Vec::new();
        for e in &entries {
            all.extend([
                ("param", &e.param),
                ("grad", &e.grad),
                ("exp_avg", &e.exp_avg),
                ("exp_avg_sq", &e.exp_avg_sq),
            ]);
            all.extend(e.param_bf16.as_ref().map(|c| ("param_bf16", c)));
        }
        for (index, (arg, written)) in all.iter().enumerate() {
            if *arg != "grad" {
                let others: Vec<_> = all
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, pair)| *pair)
                    .collect();
                handle::expect_other_handles(OP, arg, written, &others)?;
            }
        }

        let mut locked = entries
            .iter()
            .map(|e| {
                Ok(Locked {
                    param: handle::write(OP, "tensors[].param", &e.param)?,
                    grad: handle::read(OP, "tensors[].grad", &e.grad)?,
                    exp_avg: handle::write(OP, "tensors[].exp_avg", &e.exp_avg)?,
                    exp_avg_sq: handle::write(OP, "tensors[].exp_avg_sq", &e.exp_avg_sq)?,
                    param_bf16: e
                        .param_bf16
                        .as_ref()
                        .map(|c| handle::write(OP, "tensors[].param_bf16", c))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, FfiError>>()?;

        {
            let mut views: Vec<(&str, &Tensor, bool)> = Vec::new();
            for l in &locked {
                views.extend([
                    ("param", &*l.param, true),
                    ("grad", &*l.grad, false),
                    ("exp_avg", &*l.exp_avg, true),
                    ("exp_avg_sq", &*l.exp_avg_sq, true),
                ]);
                views.extend(l.param_bf16.as_deref().map(|c| ("param_bf16", c, true)));
            }
            for (index, (arg, tensor, written)) in views.iter().enumerate() {
                if *written {
                    let others: Vec<(&str, &Tensor)> = views
                        .iter()
                        .enumerate()
                        .filter(|(other, _)| *other != index)
                        .map(|(_, (arg, tensor, _))| (*arg, *tensor))
                        .collect();
                    handle::expect_no_overlap(OP, arg, tensor, &others)?;
                }
            }
        }

        let mut list: Vec<AdamWTensor<'_>> = locked
            .iter_mut()
            .zip(&entries)
            .map(|(l, e)| AdamWTensor {
                param: &mut l.param,
                grad: &l.grad,
                exp_avg: &mut l.exp_avg,
                exp_avg_sq: &mut l.exp_avg_sq,
                param_bf16: l.param_bf16.as_deref_mut(),
                weight_decay: e.weight_decay,
            })
            .collect();
        ops::adamw_step(&mut list, &config, step, grad_scale)?;
        Ok(())
    })
}
