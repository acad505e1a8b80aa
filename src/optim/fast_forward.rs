//! Fast Forward (ALGORITHMS.md §7) for low-rank (adapter) training: every `interval` optimizer
//! steps, the last update `Δ = P_t − P_{t−1}` of the adapter parameters is applied again and again
//! while the loss on a tiny validation set improves. Optimizer state is never touched.
//!
//! The parameters are f32 master tensors on any device; the stage works on host copies (a few
//! copies per repeated step, cheap beside the validation forward passes it is paced by).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// When stages run and how they stop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastForwardConfig {
    /// One stage every this many optimizer steps (at least 2: the step before a stage takes the
    /// snapshot that `Δ` is measured from).
    pub interval: usize,
    /// Optimizer steps before the bookkeeping starts.
    pub burn_in: usize,
    /// Reproduce the reference code exactly: no comparison with the loss before the stage (so at
    /// least two steps), and the step that made the loss worse is kept. Off: the first step is
    /// compared with the pre-stage loss and a step that makes it worse is undone.
    pub reference_compat: bool,
    /// The most repeated steps in one stage.
    pub max_steps: usize,
}

impl Default for FastForwardConfig {
    /// The reference defaults: every 6 steps after 50 steps of burn-in.
    fn default() -> Self {
        FastForwardConfig {
            interval: 6,
            burn_in: 50,
            reference_compat: false,
            max_steps: 1000,
        }
    }
}

/// What one stage did.
#[derive(Clone, Debug, PartialEq)]
pub struct FastForwardStage {
    /// The optimizer step (counted from 1) after which the stage ran.
    pub after_step: usize,
    /// Repeated updates left applied in the parameters.
    pub steps_applied: usize,
    /// Every tiny-set loss evaluated, in order (the pre-stage loss first unless in compat mode).
    pub losses: Vec<f32>,
}

/// The Fast Forward schedule and the snapshot it measures the last update from.
#[derive(Debug)]
pub struct FastForward {
    config: FastForwardConfig,
    steps: usize,
    snapshot: Option<Vec<Vec<f32>>>,
}

const OP: &str = "FastForward";

impl FastForward {
    pub fn new(config: FastForwardConfig) -> Result<FastForward> {
        if config.interval < 2 {
            return Err(Error::invalid(OP, "config.interval", "at least 2", config.interval));
        }
        if config.max_steps == 0 {
            return Err(Error::invalid(OP, "config.max_steps", "at least 1", config.max_steps));
        }
        Ok(FastForward {
            config,
            steps: 0,
            snapshot: None,
        })
    }

    pub fn config(&self) -> &FastForwardConfig {
        &self.config
    }

    /// Call after every optimizer step with the adapter parameters (f32, the same list every
    /// time) and the tiny-set loss of the parameters it is given. Takes the snapshot on the step
    /// before a stage, runs the stage on the stage's step, and returns what the stage did.
    pub fn after_step(
        &mut self,
        params: &mut [&mut Tensor],
        mut loss: impl FnMut(&[&mut Tensor]) -> Result<f32>,
    ) -> Result<Option<FastForwardStage>> {
        for param in params.iter() {
            param.expect_dtype(OP, "params", &[DType::F32])?;
        }
        self.steps += 1;
        let Some(k) = self.steps.checked_sub(self.config.burn_in).filter(|&k| k > 0) else {
            return Ok(None);
        };
        let phase = k % self.config.interval;
        if phase == self.config.interval - 1 {
            self.snapshot = Some(read(params)?);
            return Ok(None);
        }
        if phase != 0 {
            return Ok(None);
        }
        let Some(previous) = self.snapshot.take() else {
            return Ok(None);
        };
        if previous.len() != params.len() || previous.iter().zip(params.iter()).any(|(p, t)| p.len() != t.numel()) {
            return Err(Error::invalid(
                OP,
                "params",
                "the same parameter list at every step",
                "a list that changed since the snapshot",
            ));
        }
        let mut current = read(params)?;
        let delta: Vec<Vec<f32>> = current
            .iter()
            .zip(&previous)
            .map(|(now, before)| now.iter().zip(before).map(|(n, b)| n - b).collect())
            .collect();
        let mut losses = Vec::new();
        let mut best = if self.config.reference_compat {
            None
        } else {
            let l = loss(params)?;
            losses.push(l);
            Some(l)
        };
        let mut applied = 0;
        while applied < self.config.max_steps {
            let accepted = current.clone();
            for (values, delta) in current.iter_mut().zip(&delta) {
                values.iter_mut().zip(delta).for_each(|(v, d)| *v += d);
            }
            write(params, &current)?;
            applied += 1;
            let l = loss(params)?;
            losses.push(l);
            // Strictly worse stops; an equal loss goes on.
            if best.is_some_and(|b| l > b) {
                if !self.config.reference_compat {
                    write(params, &accepted)?;
                    applied -= 1;
                }
                break;
            }
            best = Some(l);
        }
        Ok(Some(FastForwardStage {
            after_step: self.steps,
            steps_applied: applied,
            losses,
        }))
    }
}

fn read(params: &[&mut Tensor]) -> Result<Vec<Vec<f32>>> {
    params.iter().map(|p| p.to_vec::<f32>()).collect()
}

fn write(params: &mut [&mut Tensor], values: &[Vec<f32>]) -> Result<()> {
    for (param, values) in params.iter_mut().zip(values) {
        let host = Tensor::from_slice(values, param.shape(), &crate::Device::Cpu)?;
        param.copy_from(&host)?;
    }
    Ok(())
}
