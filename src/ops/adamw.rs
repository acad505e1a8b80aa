//! Fused AdamW: one pass over each parameter updates the f32 master weight and both f32 moments
//! from an f32 or bf16 gradient, with decoupled weight decay and bias correction, optionally
//! writing a bf16 copy of the new weight; any number of tensors go in one CUDA launch.
//!
//! The arithmetic is PyTorch's fused AdamW step, in f32, on both devices:
//! `p -= lr·wd·p; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²; p -= (lr/bc1)·m / (√v/√bc2 + ε)`,
//! with `g` the gradient times `grad_scale`, `bc1 = 1-β1^t` and `bc2 = 1-β2^t` at step `t`.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use half::bf16;

const OP: &str = "adamw_step";

/// AdamW's hyper-parameters. The default is PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to the tensors whose `weight_decay` flag is set.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One parameter and its optimizer state, all of the same shape and on the same device.
pub struct AdamWTensor<'a> {
    /// f32 master weight, updated in place.
    pub param: &'a mut Tensor,
    /// f32 or bf16 gradient.
    pub grad: &'a Tensor,
    /// f32 first moment, updated in place.
    pub exp_avg: &'a mut Tensor,
    /// f32 second moment, updated in place.
    pub exp_avg_sq: &'a mut Tensor,
    /// Optional bf16 tensor that receives the updated weight, rounded to nearest even.
    pub param_bf16: Option<&'a mut Tensor>,
    /// Whether weight decay applies (commonly off for biases and norm gains).
    pub weight_decay: bool,
}

/// Derived per-step constants, shared by both devices.
#[derive(Clone, Copy, Debug)]
struct StepConstants {
    step_size: f32,
    bias_correction2_sqrt: f32,
}

fn validate(tensors: &[AdamWTensor<'_>], config: &AdamWConfig, step: u64, grad_scale: f32) -> Result<StepConstants> {
    let finite_at_least = |arg: &'static str, value: f32, low: f32| {
        if value.is_finite() && value >= low {
            Ok(())
        } else {
            Err(Error::invalid(OP, arg, format!("a finite number >= {low}"), value))
        }
    };
    finite_at_least("config.lr", config.lr, 0.0)?;
    finite_at_least("config.weight_decay", config.weight_decay, 0.0)?;
    finite_at_least("grad_scale", grad_scale, f32::MIN)?;
    if !(config.eps.is_finite() && config.eps > 0.0) {
        return Err(Error::invalid(OP, "config.eps", "a finite number > 0", config.eps));
    }
    for (arg, beta) in [("config.beta1", config.beta1), ("config.beta2", config.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::invalid(OP, arg, "a number in [0, 1)", beta));
        }
    }
    if step == 0 {
        return Err(Error::invalid(OP, "step", "the 1-based step number (>= 1)", 0));
    }
    let device = tensors.first().map(|t| t.param.device());
    for (index, t) in tensors.iter().enumerate() {
        let named = |arg: &'static str| move |e: Error| with_index(e, arg, index);
        let shape = t.param.shape();
        t.param
            .expect_dtype(OP, "param", &[DType::F32])
            .map_err(named("param"))?;
        t.grad
            .expect_dtype(OP, "grad", &[DType::F32, DType::BF16])
            .map_err(named("grad"))?;
        t.exp_avg
            .expect_dtype(OP, "exp_avg", &[DType::F32])
            .map_err(named("exp_avg"))?;
        t.exp_avg_sq
            .expect_dtype(OP, "exp_avg_sq", &[DType::F32])
            .map_err(named("exp_avg_sq"))?;
        t.grad.expect_shape(OP, "grad", shape).map_err(named("grad"))?;
        t.exp_avg.expect_shape(OP, "exp_avg", shape).map_err(named("exp_avg"))?;
        t.exp_avg_sq
            .expect_shape(OP, "exp_avg_sq", shape)
            .map_err(named("exp_avg_sq"))?;
        if let Some(copy) = &t.param_bf16 {
            copy.expect_dtype(OP, "param_bf16", &[DType::BF16])
                .map_err(named("param_bf16"))?;
            copy.expect_shape(OP, "param_bf16", shape)
                .map_err(named("param_bf16"))?;
        }
        if let Some(device) = &device {
            let others = [
                ("param", t.param.device()),
                ("grad", t.grad.device()),
                ("exp_avg", t.exp_avg.device()),
                ("exp_avg_sq", t.exp_avg_sq.device()),
            ];
            for (arg, other) in others
                .into_iter()
                .chain(t.param_bf16.as_ref().map(|c| ("param_bf16", c.device())))
            {
                device.expect_same(&other, OP, arg).map_err(named(arg))?;
            }
        }
    }
    let bias_correction1 = 1.0 - (config.beta1 as f64).powf(step as f64);
    let bias_correction2 = 1.0 - (config.beta2 as f64).powf(step as f64);
    Ok(StepConstants {
        step_size: (config.lr as f64 / bias_correction1) as f32,
        bias_correction2_sqrt: bias_correction2.sqrt() as f32,
    })
}

/// Adds which tensor of the list an argument error is about.
fn with_index(error: Error, arg: &'static str, index: usize) -> Error {
    match error {
        Error::InvalidArgument { op, expected, got, .. } => Error::InvalidArgument {
            op,
            arg,
            expected,
            got: format!("{got} (tensors[{index}])"),
        },
        other => other,
    }
}

/// One AdamW step over every tensor in `tensors`, at 1-based step number `step`, with gradients
/// multiplied by `grad_scale` first (1 for none; a clipping factor or an inverse loss scale).
///
/// All tensors must be on one device. Validation happens before anything is written, so an
/// error leaves every tensor as it was.
pub fn adamw_step(tensors: &mut [AdamWTensor<'_>], config: &AdamWConfig, step: u64, grad_scale: f32) -> Result<()> {
    let constants = validate(tensors, config, step, grad_scale)?;
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    match first.param.device() {
        Device::Cpu => cpu::adamw_step(tensors, config, constants, grad_scale),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => cuda::adamw_step(&backend, tensors, config, constants, grad_scale),
    }
}

mod cpu {
    use super::*;
    use rayon::prelude::*;

    /// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
    const CHUNK: usize = 1 << 14;

    /// Everything one element's update needs besides its own values.
    #[derive(Clone, Copy)]
    struct Rule {
        config: AdamWConfig,
        constants: StepConstants,
        weight_decay: f32,
    }

    impl Rule {
        #[inline(always)]
        fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
            let (config, c) = (&self.config, &self.constants);
            *p -= config.lr * self.weight_decay * *p;
            *m = config.beta1 * *m + (1.0 - config.beta1) * g;
            *v = config.beta2 * *v + (1.0 - config.beta2) * g * g;
            let denom = v.sqrt() / c.bias_correction2_sqrt + config.eps;
            *p -= c.step_size * *m / denom;
        }
    }

    /// One parallel task: matching chunks of a tensor and its state.
    struct Chunk<'a, G> {
        param: &'a mut [f32],
        grad: &'a [G],
        exp_avg: &'a mut [f32],
        exp_avg_sq: &'a mut [f32],
        param_bf16: Option<&'a mut [bf16]>,
    }

    impl<G: Copy> Chunk<'_, G> {
        fn update(self, rule: &Rule, grad_to_f32: impl Fn(G) -> f32) {
            for i in 0..self.param.len() {
                let g = grad_to_f32(self.grad[i]);
                rule.update(&mut self.param[i], g, &mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            }
            if let Some(copy) = self.param_bf16 {
                for (dst, &src) in copy.iter_mut().zip(self.param.iter()) {
                    *dst = bf16::from_f32(src);
                }
            }
        }
    }

    fn update_tensor<G: crate::dtype::Element>(
        t: &mut AdamWTensor<'_>,
        grad: &[G],
        rule: Rule,
        grad_to_f32: impl Fn(G) -> f32 + Sync,
    ) -> Result<()> {
        let mut copies: Vec<Option<&mut [bf16]>> = match t.param_bf16.as_deref_mut() {
            Some(copy) => copy.host_slice_mut::<bf16>()?.chunks_mut(CHUNK).map(Some).collect(),
            None => Vec::new(),
        };
        copies.resize_with(grad.len().div_ceil(CHUNK), || None);
        let chunks: Vec<Chunk<G>> = t
            .param
            .host_slice_mut::<f32>()?
            .chunks_mut(CHUNK)
            .zip(grad.chunks(CHUNK))
            .zip(t.exp_avg.host_slice_mut::<f32>()?.chunks_mut(CHUNK))
            .zip(t.exp_avg_sq.host_slice_mut::<f32>()?.chunks_mut(CHUNK))
            .zip(copies)
            .map(|((((param, grad), exp_avg), exp_avg_sq), param_bf16)| Chunk {
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                param_bf16,
            })
            .collect();
        chunks
            .into_par_iter()
            .for_each(|chunk| chunk.update(&rule, &grad_to_f32));
        Ok(())
    }

    pub(super) fn adamw_step(
        tensors: &mut [AdamWTensor<'_>],
        config: &AdamWConfig,
        constants: StepConstants,
        grad_scale: f32,
    ) -> Result<()> {
        for t in tensors.iter_mut() {
            let rule = Rule {
                config: *config,
                constants,
                weight_decay: if t.weight_decay { config.weight_decay } else { 0.0 },
            };
            let grad = t.grad;
            match grad.dtype() {
                DType::BF16 => update_tensor(t, grad.host_slice::<bf16>()?, rule, |g| g.to_f32() * grad_scale)?,
                _ => update_tensor(t, grad.host_slice::<f32>()?, rule, |g| g * grad_scale)?,
            }
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, LaunchConfig, PushKernelArg};
    use cudarc::driver::DeviceRepr;
    use std::sync::Arc;

    /// Must match kernels/adamw.cu.
    const THREADS: u32 = 256;
    const BLOCK_ELEMENTS: u64 = 4096;
    const GRAD_IS_BF16: u32 = 1;
    const VECTOR_ALIGNED: u32 = 2;

    /// Layout shared with `AdamWSegment` in kernels/adamw.cu.
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct AdamWSegment {
        param: u64,
        grad: u64,
        exp_avg: u64,
        exp_avg_sq: u64,
        param_bf16: u64,
        numel: u64,
        first_block: u64,
        weight_decay: f32,
        flags: u32,
    }

    /// Layout shared with `AdamWHyper` in kernels/adamw.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct AdamWHyper {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        step_size: f32,
        bias_correction2_sqrt: f32,
        grad_scale: f32,
        segment_count: u32,
    }

    // SAFETY: a plain #[repr(C)] struct of scalars, laid out as the kernel declares it.
    unsafe impl DeviceRepr for AdamWHyper {}

    pub(super) fn adamw_step(
        backend: &Arc<CudaBackend>,
        tensors: &mut [AdamWTensor<'_>],
        config: &AdamWConfig,
        c: StepConstants,
        grad_scale: f32,
    ) -> Result<()> {
        let mut segments = Vec::with_capacity(tensors.len());
        let mut blocks = 0u64;
        for t in tensors.iter().filter(|t| t.param.numel() > 0) {
            let param = t.param.device_buffer()?.address();
            let grad = t.grad.device_buffer()?.address();
            let exp_avg = t.exp_avg.device_buffer()?.address();
            let exp_avg_sq = t.exp_avg_sq.device_buffer()?.address();
            let param_bf16 = match &t.param_bf16 {
                Some(copy) => copy.device_buffer()?.address(),
                None => 0,
            };
            // 16-byte accesses need 16-byte aligned f32 arrays and 8-byte aligned bf16 ones.
            let aligned = [param, exp_avg, exp_avg_sq].iter().all(|a| a % 16 == 0)
                && [grad, param_bf16].iter().all(|a| a % 8 == 0)
                && (t.grad.dtype() == DType::BF16 || grad % 16 == 0);
            let numel = t.param.numel() as u64;
            segments.push(AdamWSegment {
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                param_bf16,
                numel,
                first_block: blocks,
                weight_decay: if t.weight_decay { config.weight_decay } else { 0.0 },
                flags: if t.grad.dtype() == DType::BF16 { GRAD_IS_BF16 } else { 0 }
                    | if aligned { VECTOR_ALIGNED } else { 0 },
            });
            blocks += numel.div_ceil(BLOCK_ELEMENTS);
        }
        if segments.is_empty() {
            return Ok(());
        }
        let grid = u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "tensors",
                    format!("at most {} elements in all", i32::MAX as u64 * BLOCK_ELEMENTS),
                    format!("{blocks} blocks of {BLOCK_ELEMENTS}"),
                )
            })?;
        let hyper = AdamWHyper {
            lr: config.lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            step_size: c.step_size,
            bias_correction2_sqrt: c.bias_correction2_sqrt,
            grad_scale,
            segment_count: segments.len() as u32,
        };
        let table_bytes: &[u8] = bytemuck::cast_slice(&segments);
        let function = backend.function("adamw", "adamw_step")?;
        // The table goes into a scratch buffer kept from step to step: no allocation per step.
        backend.with_scratch("adamw", table_bytes.len(), table_bytes, |table| {
            let mut launch = backend.launch_builder(&function);
            launch.arg(&table).arg(&hyper);
            let config = LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the table describes live device tensors validated to have `numel` elements
            // each, copied into the scratch ahead of the kernel on the same stream.
            unsafe { launch.launch(config) }.context("launching adamw_step")?;
            Ok(())
        })
    }
}
