//! The training loop: batches, gradient accumulation, clipping, AdamW with warm-up and cosine
//! decay, validation, checkpoints that resume exactly, and a stop with a clear message when the
//! loss stops being a number.
//!
//! A checkpoint is a directory `step-NNNNNNNN` under the output directory holding
//! `model.safetensors` (the parameters, Hugging Face names), `config.json` when Hugging Face
//! transformers has the architecture (so that `from_pretrained(dir)` loads it), and
//! `trainer.safetensors` (AdamW's
//! moments as `exp_avg.<name>` and `exp_avg_sq.<name>`, Fast Forward's copy of the adapters as
//! `fast_forward.prev.<name>` when a stage is due at the next step, and in its metadata the step, the
//! sampler's position and the options). It is written under a temporary name and renamed when
//! complete, then the file `latest` is replaced (temporary file, rename) to name it, so a crash at
//! any point leaves `latest` naming a whole checkpoint.

use super::data::{splitmix64, validation_windows, BatchSampler, Corpus};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::safetensors::{self, SafeTensors};
use crate::model::{Gpt, GptParams};
use crate::model::{GptConfig, LinearVariants, Variant};
use crate::ops::AdamWConfig;
use crate::optim::WarmupCosine;
use crate::tensor::Tensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

const OP: &str = "train";
const TRAINER_KEY: &str = "tessera.trainer";
/// The prefix of Fast Forward's adapter copies in `trainer.safetensors`.
const FAST_FORWARD_PREFIX: &str = "fast_forward.prev.";

/// How to train.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence (at most the model's context).
    pub seq: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accumulation: usize,
    pub steps: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Clip the global gradient norm to this; `None` never clips.
    pub grad_clip: Option<f32>,
    /// Validate every this many steps, and after the last (0: only after the last).
    pub eval_every: u64,
    /// Windows of validation text each validation reads (0: all of it).
    pub eval_windows: usize,
    /// Save a checkpoint every this many steps, and after the last (0: only after the last).
    pub checkpoint_every: u64,
    pub seed: u64,
    /// GrowLength (ALGORITHMS.md §8.2): the first stage's sequence length `L_0` (0: off). The
    /// run is split into stages of equal token budget with `L_s = L_0 · 2^s` up to `seq`, and
    /// `batch · seq` tokens per micro-batch throughout (`B_s = batch · seq / L_s`).
    pub grow_from: usize,
    /// Active forgetting (§10.1): re-draw the token embedding and reset its AdamW state after
    /// every this many steps (0: off).
    pub forget_every: u64,
    /// GAP (§10.2): gradient-ascent updates of a post-training run.
    pub gap_steps: u64,
    /// GAP's constant learning rate.
    pub gap_lr: f32,
    /// GAP's text sample length in tokens (capped at the model's context).
    pub gap_tokens: usize,
    /// FBI-LLM's autoregressive distillation (ALGORITHMS.md §1.6): the teacher checkpoint (a
    /// tessera run or a Hugging Face GPT-2/Llama directory with the same vocabulary), whose
    /// softmax replaces the next-token targets. `None` trains on the targets alone.
    pub distill_from: Option<String>,
    /// With a teacher: the weight `w` of the ordinary next-token loss in
    /// `(1 − w)·distillation + w·next-token` (0: pure distillation, the paper's default).
    pub distill_ce_weight: f32,
    /// The step from which the model's LoRA adapters train (0: from the start). Before it they
    /// are off; at its start they are drawn as SLoPe's lazy adapters (ALGORITHMS.md §2.5: A from
    /// N(0, 1), B zero, so the outputs do not change) and switched on.
    pub adapters_from: u64,
    /// SPDF's dense fine-tuning (ALGORITHMS.md §11): from this step on the masked layers
    /// (`nm`, `unstructured`) drop their masks, so their pruned weights (at exactly 0) learn from
    /// their dense gradients (0: never).
    pub densify_from: u64,
    /// Fast Forward (ALGORITHMS.md §7): after the burn-in, every this many optimizer steps
    /// (`T_interval`; the paper's 6) the last step's update of the LoRA adapters is applied again
    /// and again while the loss on the tiny set improves (0: off; else at least 2). The model must
    /// have adapters, on from the start.
    pub fast_forward_every: u64,
    /// Fast Forward's burn-in: optimizer steps before its bookkeeping starts (the paper's 50).
    pub fast_forward_burn_in: u64,
    /// Fast Forward's tiny set: the first this many validation windows (the paper's 32), which
    /// ordinary validation skips while Fast Forward is on.
    pub fast_forward_tiny: usize,
    /// `false` (the crate's behaviour): a stage compares its first step with the tiny-set loss
    /// before the stage and undoes the step that did not improve. `true`: the authors' code, which
    /// always takes two steps or more and keeps the step that made the loss worse.
    pub fast_forward_reference_compat: bool,
    /// Start from this checkpoint's weights (a tessera run or a Hugging Face directory of the same
    /// configuration, with dense linear layers) instead of a fresh initialisation, with fresh
    /// optimizer state; the run's adapters are added to it. `None`: a fresh model.
    pub init_from: Option<String>,
}

impl TrainOptions {
    /// The defaults of the `tiny` preset: a few minutes on two CPU cores.
    pub fn tiny() -> TrainOptions {
        TrainOptions {
            batch: 16,
            seq: 128,
            accumulation: 1,
            steps: 600,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup: 30,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: Some(1.0),
            eval_every: 100,
            eval_windows: 64,
            checkpoint_every: 0,
            seed: 1337,
            grow_from: 0,
            forget_every: 0,
            gap_steps: 15,
            gap_lr: 5e-5,
            gap_tokens: 512,
            distill_from: None,
            distill_ce_weight: 0.0,
            adapters_from: 0,
            densify_from: 0,
            fast_forward_every: 0,
            fast_forward_burn_in: 50,
            fast_forward_tiny: 32,
            fast_forward_reference_compat: false,
            init_from: None,
        }
    }

    /// GPT-2 small's recipe at 16 x 1024 tokens per micro-batch.
    pub fn gpt2_small() -> TrainOptions {
        TrainOptions {
            batch: 16,
            seq: 1024,
            accumulation: 1,
            steps: 5000,
            lr: 6e-4,
            min_lr: 6e-5,
            warmup: 700,
            eval_every: 250,
            eval_windows: 20,
            checkpoint_every: 1000,
            ..TrainOptions::tiny()
        }
    }

    fn validate(&self, config: &GptConfig) -> Result<WarmupCosine> {
        for (arg, value) in [
            ("batch", self.batch),
            ("seq", self.seq),
            ("accumulation", self.accumulation),
        ] {
            if value == 0 {
                return Err(Error::invalid(OP, arg, "a positive number", 0));
            }
        }
        if self.seq > config.context {
            return Err(Error::invalid(
                OP,
                "seq",
                format!("at most the model's context ({})", config.context),
                self.seq,
            ));
        }
        if let Some(clip) = self.grad_clip {
            if !(clip.is_finite() && clip > 0.0) {
                return Err(Error::invalid(OP, "grad_clip", "a finite norm > 0", clip));
            }
        }
        if let Some(ratio) = self.seq.checked_div(self.grow_from) {
            if !(self.seq.is_multiple_of(self.grow_from) && ratio.is_power_of_two()) {
                return Err(Error::invalid(
                    OP,
                    "grow_from",
                    format!("0, or seq ({}) divided by a power of two", self.seq),
                    self.grow_from,
                ));
            }
        }
        if self.densify_from > self.steps {
            return Err(Error::invalid(
                OP,
                "densify_from",
                format!("0, or at most steps ({})", self.steps),
                self.densify_from,
            ));
        }
        if self.forget_every > self.steps {
            return Err(Error::invalid(
                OP,
                "forget_every",
                format!("0, or at most steps ({})", self.steps),
                self.forget_every,
            ));
        }
        if !(self.gap_lr.is_finite() && self.gap_lr > 0.0) {
            return Err(Error::invalid(OP, "gap_lr", "a finite learning rate > 0", self.gap_lr));
        }
        if self.gap_tokens == 0 {
            return Err(Error::invalid(OP, "gap_tokens", "a positive number", 0));
        }
        if !(0.0..=1.0).contains(&self.distill_ce_weight) {
            return Err(Error::invalid(
                OP,
                "distill_ce_weight",
                "a weight in [0, 1]",
                self.distill_ce_weight,
            ));
        }
        if self.fast_forward_every == 1 {
            return Err(Error::invalid(
                OP,
                "fast_forward_every",
                "0 (off) or at least 2 (a stage's update is the step after the copy)",
                1,
            ));
        }
        if self.fast_forward_every > 0 {
            if self.fast_forward_tiny == 0 {
                return Err(Error::invalid(
                    OP,
                    "fast_forward_tiny",
                    "a positive number of validation windows",
                    0,
                ));
            }
            if self.adapters_from > 0 {
                return Err(Error::invalid(
                    OP,
                    "fast_forward_every",
                    "adapters on from the start (adapters_from = 0)",
                    format!("adapters_from = {}", self.adapters_from),
                ));
            }
        }
        WarmupCosine::new(self.lr, self.min_lr, self.warmup.min(self.steps), self.steps.max(1))
    }

    /// Whether Fast Forward copies the adapters after the 1-based `step` (the step before a
    /// stage's).
    pub fn fast_forward_copy(&self, step: u64) -> bool {
        let every = self.fast_forward_every;
        every > 0 && step > self.fast_forward_burn_in && (step - self.fast_forward_burn_in) % every == every - 1
    }

    /// Whether a Fast Forward stage follows the 1-based `step`: the `every`-th, `2·every`-th, ...
    /// step after the burn-in.
    pub fn fast_forward_stage(&self, step: u64) -> bool {
        let every = self.fast_forward_every;
        every > 0 && step > self.fast_forward_burn_in && (step - self.fast_forward_burn_in).is_multiple_of(every)
    }

    /// The validation windows that ordinary validation skips: Fast Forward's tiny set while it
    /// is on.
    pub fn validation_skip(&self) -> usize {
        if self.fast_forward_every > 0 {
            self.fast_forward_tiny
        } else {
            0
        }
    }

    /// GrowLength's stage lengths, shortest first: `grow_from · 2^s` up to `seq` (just `seq`
    /// when GrowLength is off).
    pub fn stages(&self) -> Vec<usize> {
        if self.grow_from == 0 || self.grow_from > self.seq {
            return vec![self.seq];
        }
        std::iter::successors(Some(self.grow_from), |&l| {
            (l < self.seq).then_some((2 * l).min(self.seq))
        })
        .collect()
    }

    /// The (sequences, tokens per sequence) of the 1-based `step`'s micro-batches. With
    /// GrowLength the stages split the steps, hence the tokens, equally, and the tokens per
    /// micro-batch stay `batch · seq`.
    pub fn batch_shape(&self, step: u64) -> (usize, usize) {
        let stages = self.stages();
        let count = stages.len() as u128;
        let stage = (u128::from(step.max(1) - 1) * count / u128::from(self.steps.max(1))).min(count - 1);
        let seq = stages[stage as usize];
        (self.batch * self.seq / seq, seq)
    }

    /// With active forgetting, the 1-based `step`'s place in its episode of `forget_every`
    /// steps: the embedding's own AdamW step number, restarted by every reset.
    pub fn embedding_step(&self, step: u64) -> u64 {
        match self.forget_every {
            0 => step,
            k => (step.max(1) - 1) % k + 1,
        }
    }

    /// GAP's optimizer: Adam with β = (0.9, 0.98) at a constant learning rate, no weight decay.
    pub fn gap_adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.gap_lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    fn adamw(&self, lr: f32) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        }
    }

    /// The options as a JSON object (checkpoints record them; config files override them).
    pub fn to_json(&self) -> Value {
        json!({
            "batch": self.batch, "seq": self.seq, "accumulation": self.accumulation, "steps": self.steps,
            "lr": self.lr, "min_lr": self.min_lr, "warmup": self.warmup, "weight_decay": self.weight_decay,
            "beta1": self.beta1, "beta2": self.beta2, "grad_clip": self.grad_clip,
            "eval_every": self.eval_every, "eval_windows": self.eval_windows,
            "checkpoint_every": self.checkpoint_every, "seed": self.seed,
            "grow_from": self.grow_from, "forget_every": self.forget_every,
            "gap_steps": self.gap_steps, "gap_lr": self.gap_lr, "gap_tokens": self.gap_tokens,
            "distill_from": self.distill_from, "distill_ce_weight": self.distill_ce_weight,
            "adapters_from": self.adapters_from, "densify_from": self.densify_from,
            "fast_forward_every": self.fast_forward_every,
            "fast_forward_burn_in": self.fast_forward_burn_in,
            "fast_forward_tiny": self.fast_forward_tiny,
            "fast_forward_reference_compat": self.fast_forward_reference_compat,
            "init_from": self.init_from,
        })
    }

    /// Parses [`TrainOptions::to_json`]'s output; `None` when a field is missing or mistyped.
    /// The recipe fields may be missing (checkpoints written before they existed): they take
    /// [`TrainOptions::tiny`]'s values, which leave the recipes off.
    pub fn from_json(value: &Value) -> Option<TrainOptions> {
        let size = |key: &str| value.get(key)?.as_u64();
        let number = |key: &str| value.get(key)?.as_f64().map(|v| v as f32);
        let defaults = TrainOptions::tiny();
        let optional_size = |key: &str, default: u64| match value.get(key) {
            None => Some(default),
            Some(v) => v.as_u64(),
        };
        Some(TrainOptions {
            batch: size("batch")? as usize,
            seq: size("seq")? as usize,
            accumulation: size("accumulation")? as usize,
            steps: size("steps")?,
            lr: number("lr")?,
            min_lr: number("min_lr")?,
            warmup: size("warmup")?,
            weight_decay: number("weight_decay")?,
            beta1: number("beta1")?,
            beta2: number("beta2")?,
            grad_clip: match value.get("grad_clip")? {
                Value::Null => None,
                clip => Some(clip.as_f64()? as f32),
            },
            eval_every: size("eval_every")?,
            eval_windows: size("eval_windows")? as usize,
            checkpoint_every: size("checkpoint_every")?,
            seed: size("seed")?,
            grow_from: optional_size("grow_from", defaults.grow_from as u64)? as usize,
            forget_every: optional_size("forget_every", defaults.forget_every)?,
            gap_steps: optional_size("gap_steps", defaults.gap_steps)?,
            gap_lr: match value.get("gap_lr") {
                None => defaults.gap_lr,
                Some(v) => v.as_f64()? as f32,
            },
            gap_tokens: optional_size("gap_tokens", defaults.gap_tokens as u64)? as usize,
            distill_from: match value.get("distill_from") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_str()?.to_string()),
            },
            distill_ce_weight: match value.get("distill_ce_weight") {
                None => defaults.distill_ce_weight,
                Some(v) => v.as_f64()? as f32,
            },
            adapters_from: optional_size("adapters_from", defaults.adapters_from)?,
            densify_from: optional_size("densify_from", defaults.densify_from)?,
            fast_forward_every: optional_size("fast_forward_every", defaults.fast_forward_every)?,
            fast_forward_burn_in: optional_size("fast_forward_burn_in", defaults.fast_forward_burn_in)?,
            fast_forward_tiny: optional_size("fast_forward_tiny", defaults.fast_forward_tiny as u64)? as usize,
            fast_forward_reference_compat: match value.get("fast_forward_reference_compat") {
                None => defaults.fast_forward_reference_compat,
                Some(v) => v.as_bool()?,
            },
            init_from: match value.get("init_from") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_str()?.to_string()),
            },
        })
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    /// The mean training loss over the step's micro-batches.
    pub loss: f32,
    pub lr: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    pub tokens: usize,
    /// Sequences per micro-batch (GrowLength changes it).
    pub batch: usize,
    /// Tokens per sequence (GrowLength changes it).
    pub seq: usize,
    /// The Fast Forward stage that followed the step, if one did.
    pub fast_forward: Option<FastForwardCount>,
}

/// How many Fast Forward steps a stage took and kept, and the tiny-set losses it evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastForwardCount {
    /// `P += Δ` applied (an undone step included).
    pub taken: u32,
    /// Of those, the ones left in the parameters: a stage ends at `P + kept·Δ`, with `P` the
    /// adapters after the optimizer step.
    pub kept: u32,
    /// Forward passes over the tiny set: `taken`, plus the loss before the stage unless in
    /// reference_compat mode.
    pub evaluations: u32,
}

/// One Fast Forward stage (ALGORITHMS.md §7.1).
#[derive(Clone, Debug, PartialEq)]
pub struct FastForwardStage {
    /// The optimizer step it followed.
    pub step: u64,
    /// The tiny-set loss before the first FF step (`None` in reference_compat mode, which
    /// compares only FF steps with each other).
    pub before: Option<f32>,
    /// The tiny-set loss after each FF step taken, in order.
    pub losses: Vec<f32>,
    pub count: FastForwardCount,
}

/// One GAP update's record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GapStep {
    pub step: u64,
    /// The loss on the sample before this update.
    pub sample_loss: f32,
    /// The validation loss after it.
    pub validation: f32,
}

/// What a GAP run did.
#[derive(Clone, Debug, PartialEq)]
pub struct GapReport {
    /// The length of the text sample.
    pub sample_tokens: usize,
    /// The validation loss before the first update.
    pub initial_validation: f32,
    pub steps: Vec<GapStep>,
    /// The index in `steps` of the update whose parameters were kept.
    pub best: usize,
    /// The loss on the sample under the kept parameters.
    pub sample_loss_after: f32,
}

/// Separates GAP's sample draw from the training batches of the same seed.
const GAP_SALT: u64 = 0x4741_5020_5341_4d50;

/// The seed of active forgetting's re-draw after `step` in a run seeded by `seed`.
pub fn forget_seed(seed: u64, step: u64) -> u64 {
    splitmix64(seed ^ splitmix64(step ^ 0x464f_5247_4554))
}

/// A model, its optimizer state and where the data stream stands.
pub struct Trainer {
    pub model: Gpt,
    pub options: TrainOptions,
    schedule: WarmupCosine,
    sampler: BatchSampler,
    /// Steps completed.
    step: u64,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The gradient norm on the model's device, made by the first step and kept.
    grad_norm: Option<Tensor>,
    /// The frozen teacher of [`TrainOptions::distill_from`].
    teacher: Option<Gpt>,
    /// Fast Forward's copy of the adapters (f32 masters, in [`Trainer::adapter_indices`] order),
    /// held from the step before a stage until the stage.
    fast_forward_prev: Option<Vec<Vec<f32>>>,
    /// The Fast Forward stages since this trainer was made (or resumed).
    fast_forward_log: Vec<FastForwardStage>,
}

impl Trainer {
    /// A freshly initialised model.
    pub fn new(config: &GptConfig, options: TrainOptions, device: &Device) -> Result<Trainer> {
        Trainer::with_variants(config, &LinearVariants::dense(), options, device)
    }

    /// A freshly initialised model whose block linear layers follow `variants`.
    pub fn with_variants(
        config: &GptConfig,
        variants: &LinearVariants,
        options: TrainOptions,
        device: &Device,
    ) -> Result<Trainer> {
        let schedule = options.validate(config)?;
        let mut params = GptParams::init_with_variants(config, variants, device, options.seed)?;
        if let Some(from) = &options.init_from {
            load_base(&mut params, from)?;
        }
        params.set_adapters_on(options.adapters_from == 0);
        check_fast_forward(&options, &params)?;
        let (batch, seq) = options.batch_shape(1);
        let model = Gpt::new(params, batch, seq)?;
        let teacher = load_teacher(&options, config, device)?;
        Ok(Trainer {
            model,
            sampler: BatchSampler::new(options.seed),
            schedule,
            options,
            step: 0,
            inputs: Vec::new(),
            targets: Vec::new(),
            grad_norm: None,
            teacher,
            fast_forward_prev: None,
            fast_forward_log: Vec::new(),
        })
    }

    /// Steps completed so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// One optimizer step: `accumulation` micro-batches of forward and backward, clipping, AdamW
    /// (and the recipes the options turn on: GrowLength's batch shape, active forgetting's
    /// embedding update and reset, Fast Forward's copy and stage after the update). A loss or gradient that is not finite stops with an error
    /// before the update, so the parameters stay those of the last good step.
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepRecord> {
        let step = self.step + 1;
        let (batch, seq) = self.options.batch_shape(step);
        let micro = self.options.accumulation;
        if step == self.options.adapters_from && self.model.params.has_adapters() {
            self.model.params.start_adapters(self.options.seed ^ splitmix64(step))?;
        }
        // A checkpoint saved after this step has no masks, so a resumed run is dense already.
        if step == self.options.densify_from {
            self.model.params.densify();
        }
        self.model.params.zero_grads()?;
        let mut loss = 0.0f64;
        // The last micro-batch's loss is read after the gradient norm is queued, so that the
        // step waits for the device once for both.
        let mut loss_pending = false;
        for micro_batch in 0..micro {
            self.sampler
                .next_batch(&corpus.train, batch, seq, &mut self.inputs, &mut self.targets)?;
            // Each micro-batch's mean loss is scaled by 1/micro so the gradients sum to the mean.
            let scale = 1.0 / micro as f32;
            loss += match &mut self.teacher {
                None if micro_batch + 1 == micro => {
                    self.model
                        .forward_backward_queued(&self.inputs, &self.targets, batch, seq, scale)?;
                    loss_pending = true;
                    0.0
                }
                None => self
                    .model
                    .forward_backward(&self.inputs, &self.targets, batch, seq, scale)?,
                Some(teacher) => {
                    let teacher_logits = teacher.logits(&self.inputs, batch, seq)?;
                    self.model.forward_backward_distill(
                        &self.inputs,
                        &self.targets,
                        teacher_logits,
                        self.options.distill_ce_weight,
                        batch,
                        seq,
                        scale,
                    )?
                }
            } as f64;
        }
        let norm = match &mut self.grad_norm {
            Some(norm) => norm,
            empty => empty.insert(Tensor::zeros(&[1], DType::F32, &self.model.params.device)?),
        };
        self.model.params.grad_norm_into(norm)?;
        if loss_pending {
            loss += self.model.last_loss()? as f64;
        }
        let grad_norm = norm.to_vec::<f32>()?[0];
        let loss = (loss / micro as f64) as f32;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::Diverged(format!(
                "at step {step} the training loss is {loss} and the gradient norm {grad_norm}; \
                 the parameters were not updated"
            )));
        }
        let scale = match self.options.grad_clip {
            Some(clip) if grad_norm > clip => clip / grad_norm,
            _ => 1.0,
        };
        let lr = self.schedule.lr(step);
        match self.options.forget_every {
            0 => self.model.params.adamw_step(&self.options.adamw(lr), step, scale)?,
            every => {
                // The embedding replays the whole schedule in every episode, sampled every
                // steps/every steps, with its own bias-correction step (§10.1).
                let episode_step = self.options.embedding_step(step);
                let position = u128::from(episode_step) * u128::from(self.options.steps) / u128::from(every);
                let embedding_lr = self.schedule.lr(position as u64);
                self.model.params.adamw_step_apart(
                    &self.options.adamw(lr),
                    step,
                    scale,
                    self.model.params.layout.token_embedding,
                    &self.options.adamw(embedding_lr),
                    episode_step,
                )?;
            }
        }
        self.step = step;
        // SLoPe's masks chosen from the magnitudes the training has reached.
        self.model.params.prune_due(step)?;
        if self.options.forget_every > 0 && step.is_multiple_of(self.options.forget_every) {
            self.forget()?;
        }
        if self.options.fast_forward_copy(step) {
            self.fast_forward_prev = Some(self.adapter_values()?);
        }
        let fast_forward = if self.options.fast_forward_stage(step) {
            let stage = self.fast_forward(corpus)?;
            let count = stage.count;
            self.fast_forward_log.push(stage);
            Some(count)
        } else {
            None
        };
        Ok(StepRecord {
            step,
            loss,
            lr,
            grad_norm,
            tokens: batch * seq * micro,
            batch,
            seq,
            fast_forward,
        })
    }

    /// The parameter indices Fast Forward moves: every LoRA adapter's A and B, layer by layer.
    pub fn adapter_indices(&self) -> Vec<usize> {
        self.model
            .params
            .layout
            .linears()
            .iter()
            .filter_map(|l| l.lora)
            .flat_map(|l| [l.a, l.b])
            .collect()
    }

    fn adapter_values(&self) -> Result<Vec<Vec<f32>>> {
        self.adapter_indices()
            .into_iter()
            .map(|i| self.model.params.params[i].value.to_vec::<f32>())
            .collect()
    }

    fn set_adapter_values(&mut self, values: &[Vec<f32>]) -> Result<()> {
        for (index, values) in self.adapter_indices().into_iter().zip(values) {
            self.model.params.set_value(index, values.clone())?;
        }
        Ok(())
    }

    /// The Fast Forward stages since this trainer was made or resumed, oldest first.
    pub fn fast_forward_log(&self) -> &[FastForwardStage] {
        &self.fast_forward_log
    }

    /// The mean loss over Fast Forward's tiny set (the first `fast_forward_tiny` validation
    /// windows), forward only.
    pub fn fast_forward_loss(&mut self, corpus: &Corpus) -> Result<f32> {
        self.check_fast_forward_corpus(corpus)?;
        self.validate_windows(corpus, 0, self.options.fast_forward_tiny)
    }

    /// With Fast Forward on, an error unless `corpus`'s validation text holds the tiny set and at
    /// least one window more (a run can check before its burn-in rather than at its first stage).
    pub fn check_fast_forward_corpus(&self, corpus: &Corpus) -> Result<()> {
        let tiny = self.options.fast_forward_tiny;
        let available = validation_windows(&corpus.validation, self.options.seq).count();
        if tiny == 0 || tiny >= available {
            return Err(Error::invalid(
                OP,
                "fast_forward_tiny",
                format!(
                    "1 to {} (fewer than the validation text's windows)",
                    available.saturating_sub(1)
                ),
                tiny,
            ));
        }
        Ok(())
    }

    /// A Fast Forward stage (ALGORITHMS.md §7.1) after the optimizer step that followed the copy:
    /// `Δ = P − P_prev` over the adapters' f32 masters, then `P += Δ` (compute copies refreshed)
    /// while the tiny-set loss does not rise (strict `>`). Optimizer state, step and schedule
    /// are untouched. A step that makes the loss not finite, or that leaves every adapter value
    /// as it was, ends the stage (the loop would not end otherwise); a step undone is restored
    /// from its saved values, bit for bit.
    fn fast_forward(&mut self, corpus: &Corpus) -> Result<FastForwardStage> {
        let step = self.step;
        let previous = self.fast_forward_prev.take().ok_or_else(|| {
            Error::invalid(
                OP,
                "fast_forward_every",
                "the adapters copied after the step before the stage",
                format!("no copy at step {step}"),
            )
        })?;
        let mut current = self.adapter_values()?;
        let delta: Vec<Vec<f32>> = current
            .iter()
            .zip(&previous)
            .map(|(p, q)| p.iter().zip(q).map(|(p, q)| p - q).collect())
            .collect();
        let compat = self.options.fast_forward_reference_compat;
        let before = if compat {
            None
        } else {
            Some(self.fast_forward_loss(corpus)?)
        };
        let mut last = before;
        let mut losses = Vec::new();
        let mut kept = 0u32;
        loop {
            let next: Vec<Vec<f32>> = current
                .iter()
                .zip(&delta)
                .map(|(p, d)| p.iter().zip(d).map(|(p, d)| p + d).collect())
                .collect();
            let moved = next
                .iter()
                .zip(&current)
                .any(|(n, c)| n.iter().zip(c).any(|(n, c)| n.to_bits() != c.to_bits()));
            if !moved {
                break;
            }
            self.set_adapter_values(&next)?;
            let loss = self.fast_forward_loss(corpus)?;
            losses.push(loss);
            let worse = last.is_some_and(|l| loss > l);
            if !loss.is_finite() || (worse && !compat) {
                self.set_adapter_values(&current)?;
                break;
            }
            kept += 1;
            current = next;
            if worse {
                break;
            }
            last = Some(loss);
        }
        let taken = losses.len() as u32;
        Ok(FastForwardStage {
            step,
            before,
            losses,
            count: FastForwardCount {
                taken,
                kept,
                evaluations: taken + u32::from(before.is_some()),
            },
        })
    }

    /// Active forgetting's reset: the token embedding (and with it a tied head) re-drawn from
    /// N(0, 0.02²), seeded by the run's seed and the step, and its AdamW moments zeroed. The
    /// untied head, positions, norms and blocks are kept.
    pub fn forget(&mut self) -> Result<()> {
        let index = self.model.params.layout.token_embedding;
        self.model
            .params
            .redraw(index, forget_seed(self.options.seed, self.step))
    }

    /// GAP's text sample: `gap_tokens` consecutive training tokens (at most the context) at an
    /// offset drawn from the seed, as (inputs, targets).
    pub fn gap_sample(&self, corpus: &Corpus) -> Result<(Vec<u32>, Vec<u32>)> {
        let len = self
            .options
            .gap_tokens
            .min(self.model.params.config.context)
            .min(corpus.train.len().saturating_sub(1));
        if len == 0 {
            return Err(Error::invalid(
                OP,
                "corpus",
                "at least two training tokens",
                corpus.train.len(),
            ));
        }
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        BatchSampler::new(self.options.seed ^ GAP_SALT).next_batch(&corpus.train, 1, len, &mut inputs, &mut targets)?;
        Ok((inputs, targets))
    }

    /// One GAP update: the gradient of the loss on `inputs` (one sequence) negated, then Adam
    /// ([`TrainOptions::gap_adamw`]) at the 1-based `step`. Returns the loss before the update.
    pub fn gap_step(&mut self, inputs: &[u32], targets: &[u32], step: u64) -> Result<f32> {
        self.model.params.zero_grads()?;
        let loss = self.model.forward_backward(inputs, targets, 1, inputs.len(), -1.0)?;
        let grad_norm = self.model.params.grad_norm()?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::Diverged(format!(
                "at GAP step {step} the sample loss is {loss} and the gradient norm {grad_norm}; \
                 the parameters were not updated"
            )));
        }
        self.model.params.adamw_step(&self.options.gap_adamw(), step, 1.0)?;
        Ok(loss)
    }

    /// Gradient Ascent Post-training (§10.2): fresh Adam moments, then `gap_steps` ascent updates
    /// on one text sample ([`Trainer::gap_sample`]), validating after each, and the parameters of
    /// the step with the lowest validation loss kept. The step counter is unchanged.
    pub fn gap(&mut self, corpus: &Corpus) -> Result<GapReport> {
        self.options.validate(&self.model.params.config)?;
        if self.options.gap_steps == 0 {
            return Err(Error::invalid(OP, "gap_steps", "a positive number", 0));
        }
        let (inputs, targets) = self.gap_sample(corpus)?;
        for p in &mut self.model.params.params {
            p.exp_avg.fill_bytes(0)?;
            p.exp_avg_sq.fill_bytes(0)?;
        }
        let initial_validation = self.validate(corpus)?;
        let mut steps = Vec::new();
        let mut best: Option<(usize, Vec<Vec<f32>>)> = None;
        for step in 1..=self.options.gap_steps {
            let sample_loss = self.gap_step(&inputs, &targets, step)?;
            let validation = self.validate(corpus)?;
            steps.push(GapStep {
                step,
                sample_loss,
                validation,
            });
            let improved = best.as_ref().is_none_or(|(i, _)| validation < steps[*i].validation);
            if improved {
                let values = self
                    .model
                    .params
                    .params
                    .iter()
                    .map(|p| p.value.to_vec::<f32>())
                    .collect::<Result<Vec<_>>>()?;
                best = Some((steps.len() - 1, values));
            }
        }
        let (index, values) = best.ok_or_else(|| Error::invalid(OP, "gap_steps", "a positive number", 0))?;
        for (i, values) in values.into_iter().enumerate() {
            self.model.params.set_value(i, values)?;
        }
        let sample_loss_after = self.model.loss(&inputs, &targets, 1, inputs.len())?;
        Ok(GapReport {
            sample_tokens: inputs.len(),
            initial_validation,
            steps,
            best: index,
            sample_loss_after,
        })
    }

    /// Writes the parameters alone (`model.safetensors`, and `config.json` where transformers has
    /// the architecture) into `dir`, a directory that generate and eval read as a checkpoint.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| Error::file(dir.display(), format!("cannot create the directory: {e}")))?;
        self.model.params.save(dir.join("model.safetensors"))?;
        if let Some(config) = self.model.params.hugging_face_json() {
            fs::write(dir.join("config.json"), config)
                .map_err(|e| Error::file(dir.display(), format!("cannot write config.json: {e}")))?;
        }
        Ok(())
    }

    /// The mean loss over the validation text (or its first `eval_windows` windows), after the
    /// windows of Fast Forward's tiny set while it is on.
    pub fn validate(&mut self, corpus: &Corpus) -> Result<f32> {
        let limit = match self.options.eval_windows {
            0 => usize::MAX,
            n => n,
        };
        self.validate_windows(corpus, self.options.validation_skip(), limit)
    }

    /// The mean loss over at most `count` validation windows of `seq` tokens after the first
    /// `skip`, forward only.
    pub fn validate_windows(&mut self, corpus: &Corpus, skip: usize, count: usize) -> Result<f32> {
        let (batch, seq) = (self.options.batch, self.options.seq);
        let windows: Vec<_> = validation_windows(&corpus.validation, seq)
            .skip(skip)
            .take(count)
            .collect();
        let (mut total, mut count) = (0.0f64, 0usize);
        for chunk in windows.chunks(batch) {
            self.inputs.clear();
            self.targets.clear();
            for (x, y) in chunk {
                self.inputs.extend_from_slice(x);
                self.targets.extend_from_slice(y);
            }
            total += self.model.loss(&self.inputs, &self.targets, chunk.len(), seq)? as f64 * chunk.len() as f64;
            count += chunk.len();
        }
        if count == 0 {
            return Err(Error::invalid(
                OP,
                "seq",
                format!(
                    "at most {} (the validation text, after {skip} windows skipped)",
                    corpus.validation.len().saturating_sub(1)
                ),
                seq,
            ));
        }
        Ok((total / count as f64) as f32)
    }

    /// Writes a checkpoint of this step under `out` and points `out/latest` at it.
    pub fn save(&self, out: &Path) -> Result<PathBuf> {
        let fail = |what: &str, e: std::io::Error| {
            Error::file(out.display(), format!("cannot save a checkpoint: {what}: {e}"))
        };
        fs::create_dir_all(out).map_err(|e| fail("create the directory", e))?;
        let name = format!("step-{:08}", self.step);
        let final_dir = out.join(&name);
        let temporary = out.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&temporary);
        fs::create_dir_all(&temporary).map_err(|e| fail("create a temporary directory", e))?;
        self.model.params.save(temporary.join("model.safetensors"))?;
        // With transformers' config.json beside it, `from_pretrained(dir)` loads the checkpoint.
        if let Some(config) = self.model.params.hugging_face_json() {
            fs::write(temporary.join("config.json"), config).map_err(|e| fail("write config.json", e))?;
        }
        let params = &self.model.params.params;
        let mut moments: Vec<(String, &Tensor)> = Vec::with_capacity(2 * params.len());
        for p in params {
            moments.push((format!("exp_avg.{}", p.spec.name), &p.exp_avg));
            moments.push((format!("exp_avg_sq.{}", p.spec.name), &p.exp_avg_sq));
        }
        // The adapters' copy of a Fast Forward stage to come: a checkpoint between the copy and
        // the stage resumes it.
        let previous: Vec<(String, Tensor)> = match &self.fast_forward_prev {
            None => Vec::new(),
            Some(values) => self
                .adapter_indices()
                .into_iter()
                .zip(values)
                .map(|(i, v)| {
                    let spec = &params[i].spec;
                    let tensor = Tensor::from_vec(v.clone(), &spec.shape, &Device::Cpu)?;
                    Ok((format!("{FAST_FORWARD_PREFIX}{}", spec.name), tensor))
                })
                .collect::<Result<_>>()?,
        };
        let list: Vec<(&str, &Tensor)> = moments
            .iter()
            .map(|(n, t)| (n.as_str(), *t))
            .chain(previous.iter().map(|(n, t)| (n.as_str(), t)))
            .collect();
        let state = json!({
            "step": self.step,
            "sampler_seed": self.sampler.seed,
            "sampler_drawn": self.sampler.drawn,
            "options": self.options.to_json(),
        });
        let metadata = BTreeMap::from([(TRAINER_KEY.to_string(), state.to_string())]);
        safetensors::save(temporary.join("trainer.safetensors"), &list, &metadata)?;
        let _ = fs::remove_dir_all(&final_dir);
        fs::rename(&temporary, &final_dir).map_err(|e| fail("rename the checkpoint into place", e))?;
        let latest = out.join("latest");
        let latest_temporary = out.join(format!(".latest.tmp-{}", std::process::id()));
        fs::write(&latest_temporary, format!("{name}\n")).map_err(|e| fail("write `latest`", e))?;
        fs::rename(&latest_temporary, &latest).map_err(|e| fail("replace `latest`", e))?;
        Ok(final_dir)
    }

    /// Continues from the checkpoint `latest` names under `out` (or from `out` itself when it is a
    /// checkpoint directory), on `device`.
    pub fn resume(out: &Path, device: &Device) -> Result<Trainer> {
        let dir = checkpoint_dir(out)?;
        let params = GptParams::load(dir.join("model.safetensors"), None, device)?;
        if params.is_inference_export() {
            return Err(Error::file(
                dir.join("model.safetensors").display(),
                "an inference export (2:4 layers compressed, weights in bf16, no optimizer state): \
                 training cannot resume from it; resume from the checkpoint it was exported from",
            ));
        }
        let path = dir.join("trainer.safetensors");
        let mut file = SafeTensors::load(&path)?;
        let corrupt = |what: &str| Error::file(path.display(), format!("metadata `{TRAINER_KEY}`: {what}"));
        let state: Value = file
            .metadata()
            .get(TRAINER_KEY)
            .ok_or_else(|| corrupt("missing"))
            .and_then(|text| serde_json::from_str(text).map_err(|e| corrupt(&e.to_string())))?;
        let number = |key: &str| {
            state
                .get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| corrupt(&format!("no `{key}`")))
        };
        let (step, seed, drawn) = (number("step")?, number("sampler_seed")?, number("sampler_drawn")?);
        let options = state
            .get("options")
            .and_then(TrainOptions::from_json)
            .ok_or_else(|| corrupt("no valid `options`"))?;
        let schedule = options.validate(&params.config)?;
        let mut params = params;
        for p in &mut params.params {
            let shape = p.spec.shape.clone();
            p.exp_avg = file
                .take(&format!("exp_avg.{}", p.spec.name), DType::F32, &shape)?
                .to_device(device)?;
            p.exp_avg_sq = file
                .take(&format!("exp_avg_sq.{}", p.spec.name), DType::F32, &shape)?
                .to_device(device)?;
        }
        check_fast_forward(&options, &params)?;
        let adapters: Vec<usize> = params
            .layout
            .linears()
            .iter()
            .filter_map(|l| l.lora)
            .flat_map(|l| [l.a, l.b])
            .collect();
        let stored: Vec<String> = adapters
            .iter()
            .map(|&i| format!("{FAST_FORWARD_PREFIX}{}", params.params[i].spec.name))
            .collect();
        let present = stored
            .iter()
            .filter(|name| file.names().any(|n| n == name.as_str()))
            .count();
        let fast_forward_prev = match present {
            0 => None,
            n if n == stored.len() => Some(
                adapters
                    .iter()
                    .zip(&stored)
                    .map(|(&i, name)| {
                        file.take(name, DType::F32, &params.params[i].spec.shape)?
                            .to_vec::<f32>()
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            n => return Err(corrupt(&format!("{n} of the {} Fast Forward copies", stored.len()))),
        };
        let (batch, seq) = options.batch_shape(step + 1);
        let teacher = load_teacher(&options, &params.config, device)?;
        let model = Gpt::new(params, batch, seq)?;
        Ok(Trainer {
            model,
            sampler: BatchSampler { seed, drawn },
            schedule,
            options,
            step,
            inputs: Vec::new(),
            targets: Vec::new(),
            grad_norm: None,
            teacher,
            fast_forward_prev,
            fast_forward_log: Vec::new(),
        })
    }
}

/// Fast Forward needs adapters to move: an error naming the option when the model has none.
fn check_fast_forward(options: &TrainOptions, params: &GptParams) -> Result<()> {
    if options.fast_forward_every > 0 && !params.has_adapters() {
        return Err(Error::invalid(
            OP,
            "fast_forward_every",
            "0 (off), or a model with LoRA adapters ([model.linears] lora)",
            format!("{} on a model without adapters", options.fast_forward_every),
        ));
    }
    Ok(())
}

/// Replaces `params`' base weights by those of the checkpoint `from` (a tessera run or a Hugging
/// Face directory; `params.config` is its configuration when it records none): the same
/// configuration, dense linear layers, every tensor of the matching name and shape. The run's
/// adapters keep their fresh initialisation (B = 0: the model computes what the checkpoint
/// does), and the optimizer state is fresh.
fn load_base(params: &mut GptParams, from: &str) -> Result<()> {
    if let Some(linear) = params
        .layout
        .linears()
        .into_iter()
        .find(|l| !matches!(l.spec.variant, Variant::Dense))
    {
        return Err(Error::invalid(
            OP,
            "init_from",
            "a model whose block linear layers are dense (with or without LoRA adapters)",
            format!(
                "a `{}` layer ({})",
                linear.spec.variant.name(),
                params.params[linear.weight].spec.name
            ),
        ));
    }
    let dir = checkpoint_dir(Path::new(from))?;
    let base = GptParams::load(dir.join("model.safetensors"), Some(&params.config), &Device::Cpu)?;
    if base.config != params.config {
        return Err(Error::invalid(
            OP,
            "init_from",
            format!("a checkpoint of the run's configuration ({})", params.config.to_json()),
            format!("{from}: {}", base.config.to_json()),
        ));
    }
    if !base.variants.is_dense() {
        return Err(Error::invalid(
            OP,
            "init_from",
            "a checkpoint with dense linear layers",
            format!("{from}: {}", base.config_json()),
        ));
    }
    for p in &base.params {
        let index = params
            .params
            .iter()
            .position(|q| q.spec.name == p.spec.name && q.spec.shape == p.spec.shape)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "init_from",
                    "a checkpoint whose tensors the model has",
                    format!("{from}: {} {:?}", p.spec.name, p.spec.shape),
                )
            })?;
        params.set_value(index, p.value.to_vec::<f32>()?)?;
    }
    Ok(())
}

/// The teacher of `options.distill_from`, on `device`, checked against the student's `config`:
/// the same vocabulary, and a context that holds the training sequences.
fn load_teacher(options: &TrainOptions, config: &GptConfig, device: &Device) -> Result<Option<Gpt>> {
    let Some(from) = &options.distill_from else {
        return Ok(None);
    };
    let dir = checkpoint_dir(Path::new(from))?;
    let params = GptParams::load(dir.join("model.safetensors"), None, device)?;
    let teacher = &params.config;
    if teacher.vocab != config.vocab {
        return Err(Error::invalid(
            OP,
            "distill_from",
            format!("a teacher with the student's vocabulary ({})", config.vocab),
            format!("{from}: vocabulary {}", teacher.vocab),
        ));
    }
    if teacher.context < options.seq {
        return Err(Error::invalid(
            OP,
            "distill_from",
            format!("a teacher whose context holds seq ({})", options.seq),
            format!("{from}: context {}", teacher.context),
        ));
    }
    let (batch, seq) = options.batch_shape(1);
    Ok(Some(Gpt::new(params, batch, seq)?))
}

/// The checkpoint directory `out/latest` names, or `out` itself when it holds a model.
pub fn checkpoint_dir(out: &Path) -> Result<PathBuf> {
    if out.join("model.safetensors").is_file() {
        return Ok(out.to_path_buf());
    }
    let latest = out.join("latest");
    let name = fs::read_to_string(&latest).map_err(|e| {
        Error::file(
            out.display(),
            format!("not a checkpoint: no model.safetensors, and no `latest` ({e})"),
        )
    })?;
    let name = name.trim();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::file(latest.display(), format!("names no checkpoint: {name:?}")));
    }
    Ok(out.join(name))
}
