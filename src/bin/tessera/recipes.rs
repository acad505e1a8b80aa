//! `tessera bench recipes`: trains the `tiny` preset on the embedded corpus once per training
//! recipe, every run with the same token budget, seed and data order, and prints one table beside
//! the dense baseline: final validation loss, tokens/s, step time, peak memory and the bytes of
//! the weights at inference. Two rows fine-tune the dense row's model instead (LoRA, and LoRA
//! with Fast Forward) and compare with it on the same validation windows. It answers "what does
//! each recipe cost and what does it buy at this scale", not "does it reproduce the paper": a tiny
//! model trained for a minute is far from the papers' regimes, and the table says what it
//! measured.

use crate::args::Args;
use crate::train::Failure;
use serde_json::{json, Value};
use std::time::Instant;
use tessera::model::params::linear_sites;
use tessera::model::{GptConfig, LinearSpec, LinearVariants, LoraSpec, Variant};
use tessera::train::trainer::{FastForwardStage, TrainOptions, Trainer};
use tessera::train::Corpus;
use tessera::{Device, Error};

pub const USAGE: &str = "usage: tessera bench recipes [options]

Trains the tiny preset on the embedded corpus with each training recipe for the same number of
steps (same tokens, seed and data order) and prints final validation loss, tokens/s, step time,
peak memory and inference weight bytes beside the dense baseline.

options:
  --device DEVICE    cpu or cuda (default: cuda when a GPU is usable, else cpu)
  --steps N          optimizer steps per recipe (default 300: about a minute each on 2 CPU cores)
  --only NAME,...    only these recipes (the dense baseline always runs first)
  --json FILE        also write the table and every run's settings as JSON";

/// One row of the report: how a run differs from the dense baseline.
struct Recipe {
    name: &'static str,
    /// What the row changes, for the table's last column.
    what: &'static str,
    options: fn(&mut TrainOptions),
    /// The block linear layers' variants.
    variants: fn() -> LinearVariants,
    /// Distils from the dense baseline's final model instead of the next tokens (FBI-LLM).
    teacher: bool,
    /// Fine-tunes the dense baseline's final model (its weights, fresh optimizer state) instead
    /// of training from scratch; validated, like the dense model it starts from, on the windows
    /// after Fast Forward's tiny set.
    base: bool,
    /// A post-training phase run on the trained model (GAP).
    post: Option<Post>,
}

/// Every block linear layer `variant`, without an adapter.
fn every(variant: Variant) -> LinearVariants {
    LinearVariants::all(LinearSpec { variant, lora: None })
}

#[derive(Clone, Copy)]
enum Post {
    Gap,
}

fn recipes() -> Vec<Recipe> {
    vec![
        Recipe {
            name: "dense",
            what: "the baseline: AdamW, warmup and cosine decay",
            options: |_| {},
            variants: LinearVariants::dense,
            teacher: false,
            base: false,
            post: None,
        },
        Recipe {
            name: "growlength",
            what: "GrowLength: seq 32, 64, 128 in equal token stages, tokens per step constant",
            options: |o| o.grow_from = 32,
            variants: LinearVariants::dense,
            teacher: false,
            base: false,
            post: None,
        },
        Recipe {
            name: "forgetting",
            what: "active forgetting: token embedding re-drawn at 40% and 80% of the steps",
            // Not a divisor of the run: a reset on the last step would leave nothing relearned.
            options: |o| o.forget_every = (o.steps * 2 / 5).max(1),
            variants: LinearVariants::dense,
            teacher: false,
            base: false,
            post: None,
        },
        Recipe {
            name: "gap",
            what: "dense, then GAP: 15 ascent steps on one sample, best validation kept",
            options: |_| {},
            variants: LinearVariants::dense,
            teacher: false,
            base: false,
            post: Some(Post::Gap),
        },
        Recipe {
            name: "slope",
            what: "SLoPe: every block linear 2:4 by magnitude at init, double-pruned backward, \
                   masked AdamW; rank-8 lazy adapters for the last 1% of steps",
            options: |o| o.adapters_from = o.steps - o.steps / 100,
            variants: || {
                LinearVariants::all(LinearSpec {
                    variant: Variant::Nm {
                        n: 2,
                        m: 4,
                        prune_step: 0,
                    },
                    lora: Some(LoraSpec {
                        rank: 8,
                        alpha: 16.0,
                        frozen_base: false,
                    }),
                })
            },
            teacher: false,
            base: false,
            post: None,
        },
        Recipe {
            name: "spdf",
            what: "SPDF's sparse phase: every block linear at a fixed random 50% mask \
                   (the dense fine-tuning phase is not part of this run)",
            options: |_| {},
            variants: || every(Variant::Unstructured { density: 0.5, seed: 11 }),
            teacher: false,
            base: false,
            post: None,
        },
        Recipe {
            name: "sltrain",
            what: "SLTrain: every block linear (alpha/r)·B·A + S, rank 32, 3% random support, alpha 32",
            options: |_| {},
            variants: || {
                every(Variant::SparseLowRank {
                    rank: 32,
                    density: 0.03,
                    alpha: 32.0,
                    seed: 11,
                })
            },
            teacher: false,
            base: false,
            post: None,
        },
        Recipe {
            name: "fbi-llm",
            what: "FBI-LLM: every block linear binarized (α·sign(W)+β), trained from scratch by \
                   pure distillation from the dense row's model",
            options: |_| {},
            variants: || every(Variant::Binary),
            teacher: true,
            base: false,
            post: None,
        },
        Recipe {
            name: "lora",
            what: "LoRA fine-tuning of the dense row's model: rank-8 adapters (alpha 16) on every \
                   block linear, frozen base, fresh AdamW, on the corpus the base was trained on \
                   (all this scale allows); vs dense = against the base model on the same windows",
            options: |_| {},
            variants: lora_on_dense,
            teacher: false,
            base: true,
            post: None,
        },
        Recipe {
            name: "fastforward",
            what: "the lora row plus Fast Forward every 6 steps after a 50-step burn-in, tiny set = \
                   the first 32 validation windows (not validated on); the same optimizer steps",
            options: |o| o.fast_forward_every = 6,
            variants: lora_on_dense,
            teacher: false,
            base: true,
            post: None,
        },
    ]
}

/// Dense block linear layers with frozen rank-8 LoRA adapters.
fn lora_on_dense() -> LinearVariants {
    LinearVariants::all(LinearSpec {
        variant: Variant::Dense,
        lora: Some(LoraSpec {
            rank: 8,
            alpha: 16.0,
            frozen_base: true,
        }),
    })
}

/// What one run measured.
struct Measured {
    validation: f32,
    tokens_per_s: f64,
    step_ms: f64,
    peak_bytes: Option<u64>,
    inference_bytes: usize,
    steps: u64,
    tokens: usize,
    post: Option<Value>,
    /// The loss `vs dense` compares with when it is not the dense row's (a fine-tuning row's
    /// base model on its validation windows).
    baseline: Option<f32>,
    /// What the run measured beyond the columns, appended to the table's last column.
    note: Option<String>,
}

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let device = crate::device_option(&mut args)?;
    let steps: u64 = args.parsed("--steps").map_err(usage)?.unwrap_or(300);
    let only = args.value("--only").map_err(usage)?;
    let json_path = args.value("--json").map_err(usage)?;
    args.finish().map_err(usage)?;
    if steps == 0 {
        return Err(Failure::Usage("--steps must be at least 1".into()));
    }
    let all = recipes();
    let selected: Vec<&Recipe> = match &only {
        None => all.iter().collect(),
        Some(list) => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            if let Some(unknown) = names.iter().find(|n| !all.iter().any(|r| r.name == **n)) {
                let known: Vec<&str> = all.iter().map(|r| r.name).collect();
                return Err(Failure::Usage(format!(
                    "--only: unknown recipe `{unknown}` (recipes: {})",
                    known.join(",")
                )));
            }
            all.iter()
                .filter(|r| r.name == "dense" || names.contains(&r.name))
                .collect()
        }
    };
    let corpus = Corpus::embedded()?;
    let config = GptConfig::tiny();
    eprintln!(
        "recipes: tiny preset ({} parameters), {steps} steps each on {}",
        config.parameter_count(),
        device_name(&device)
    );
    let teacher_dir = std::env::temp_dir().join(format!("tessera-recipes-teacher-{}", std::process::id()));
    let result = run_all(&selected, &config, steps, &corpus, &device, &teacher_dir);
    let _ = std::fs::remove_dir_all(&teacher_dir);
    let rows = result?;
    report(&rows, &config, steps, &device, json_path)
}

type Row<'a> = (&'a Recipe, TrainOptions, Measured);

fn run_all<'a>(
    selected: &[&'a Recipe],
    config: &GptConfig,
    steps: u64,
    corpus: &Corpus,
    device: &Device,
    teacher_dir: &std::path::Path,
) -> Result<Vec<Row<'a>>, Failure> {
    let mut rows = Vec::new();
    for &recipe in selected {
        let mut options = TrainOptions {
            steps,
            warmup: (steps / 20).max(1),
            eval_every: 0,
            ..TrainOptions::tiny()
        };
        (recipe.options)(&mut options);
        if recipe.teacher {
            options.distill_from = Some(teacher_dir.display().to_string());
        }
        if recipe.base {
            options.init_from = Some(teacher_dir.display().to_string());
        }
        eprintln!("recipes: {} ...", recipe.name);
        let saved = (recipe.name == "dense").then_some(teacher_dir);
        let measured = train(
            config,
            &(recipe.variants)(),
            &options,
            recipe.post,
            corpus,
            device,
            saved,
        )?;
        rows.push((recipe, options, measured));
    }
    Ok(rows)
}

fn report(
    rows: &[Row<'_>],
    config: &GptConfig,
    steps: u64,
    device: &Device,
    json_path: Option<String>,
) -> Result<(), Failure> {
    let baseline = rows.first().map(|(_, _, m)| m.validation).unwrap_or(f32::NAN);
    println!(
        "| recipe | val loss | vs dense | tokens/s | step ms | peak memory | inference weights | what it changes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (recipe, _, m) in rows {
        println!(
            "| {} | {:.4} | {:+.4} | {:.0} | {:.1} | {} | {} | {}{} |",
            recipe.name,
            m.validation,
            m.validation - m.baseline.unwrap_or(baseline),
            m.tokens_per_s,
            m.step_ms,
            m.peak_bytes.map(mib).unwrap_or_else(|| "n/a".into()),
            mib(m.inference_bytes as u64),
            recipe.what,
            m.note.as_ref().map(|n| format!("; {n}")).unwrap_or_default()
        );
    }
    if let Some(path) = json_path {
        let report = json!({
            "tool": "tessera bench recipes",
            "version": env!("CARGO_PKG_VERSION"),
            "device": device_name(device),
            "preset": "tiny",
            "config": serde_json::from_str::<Value>(&config.to_json()).map_err(|e| Failure::Other(e.to_string()))?,
            "steps": steps,
            "rows": rows.iter().map(|(recipe, options, m)| json!({
                "recipe": recipe.name,
                "what": recipe.what,
                "options": options.to_json(),
                "validation_loss": m.validation,
                "validation_loss_vs_dense": m.validation - m.baseline.unwrap_or(baseline),
                "note": m.note,
                "tokens_per_s": m.tokens_per_s,
                "step_ms": m.step_ms,
                "peak_bytes": m.peak_bytes,
                "inference_weight_bytes": m.inference_bytes,
                "steps": m.steps,
                "tokens": m.tokens,
                "post": m.post,
            })).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&report).map_err(|e| Failure::Other(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Failure::Other(format!("writing {path}: {e}")))?;
    }
    Ok(())
}

/// Trains one recipe; `save` keeps the trained model there (the dense row's, a teacher).
fn train(
    config: &GptConfig,
    variants: &LinearVariants,
    options: &TrainOptions,
    post: Option<Post>,
    corpus: &Corpus,
    device: &Device,
    save: Option<&std::path::Path>,
) -> Result<Measured, Error> {
    let memory = PeakMemory::start(device);
    let mut trainer = Trainer::with_variants(config, variants, options.clone(), device)?;
    // A fine-tuning row and its base model are validated on the same windows: those after the
    // tiny set of the Fast Forward row (which never validates on its tiny set).
    let windows = options
        .init_from
        .is_some()
        .then_some((options.fast_forward_tiny, options.eval_windows));
    let base_validation = match windows {
        Some((skip, count)) => Some(trainer.validate_windows(corpus, skip, count)?),
        None => None,
    };
    let mut tokens = 0;
    let started = Instant::now();
    for _ in 0..options.steps {
        tokens += trainer.train_step(corpus)?.tokens;
        memory.sample();
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut validation = match windows {
        Some((skip, count)) => trainer.validate_windows(corpus, skip, count)?,
        None => trainer.validate(corpus)?,
    };
    let stages = trainer.fast_forward_log();
    let sum = |f: fn(&FastForwardStage) -> u32| stages.iter().map(f).sum::<u32>();
    let (taken, kept, evaluations) = (
        sum(|s| s.count.taken),
        sum(|s| s.count.kept),
        sum(|s| s.count.evaluations),
    );
    // Each evaluation is a forward pass over the tiny set; a training step is a forward and a
    // backward pass over its batch.
    let tiny_tokens = evaluations as usize * options.fast_forward_tiny * options.seq;
    let note = match (base_validation, stages.is_empty()) {
        (None, _) => None,
        (Some(base), true) => Some(format!("base model {base:.4} on these windows")),
        (Some(base), false) => Some(format!(
            "base model {base:.4} on these windows; {} stages took {taken} FF steps and kept {kept}, \
             costing {evaluations} forward passes over the tiny set ({tiny_tokens} tokens forward only, \
             {:.0}% of the run's {tokens} training tokens, which also run backward)",
            stages.len(),
            100.0 * tiny_tokens as f64 / tokens.max(1) as f64
        )),
    };
    let fast_forward = (!stages.is_empty()).then(|| {
        json!({
            "stages": stages.iter().map(|s| json!({
                "step": s.step,
                "before": s.before,
                "losses": s.losses,
                "taken": s.count.taken,
                "kept": s.count.kept,
            })).collect::<Vec<_>>(),
            "taken": taken,
            "kept": kept,
            "tiny_set_forward_passes": evaluations,
            "tiny_set_forward_tokens": tiny_tokens,
        })
    });
    if let Some(dir) = save {
        trainer.save(dir)?;
    }
    let post = match post {
        None => match (base_validation, fast_forward) {
            (None, None) => None,
            (base, fast_forward) => Some(json!({
                "base_validation": base,
                "validation_windows": windows.map(|(skip, count)| json!({"skip": skip, "count": count})),
                "fast_forward": fast_forward,
            })),
        },
        Some(Post::Gap) => {
            let report = trainer.gap(corpus)?;
            validation = report.steps[report.best].validation;
            Some(json!({
                "gap_initial_validation": report.initial_validation,
                "gap_best_step": report.steps[report.best].step,
                "gap_validation": report.steps.iter().map(|s| s.validation).collect::<Vec<_>>(),
            }))
        }
    };
    Ok(Measured {
        validation,
        tokens_per_s: tokens as f64 / seconds,
        step_ms: 1e3 * seconds / options.steps as f64,
        peak_bytes: memory.peak(),
        inference_bytes: inference_bytes(config, variants),
        steps: options.steps,
        tokens,
        post,
        baseline: base_validation,
        note,
    })
}

/// The bytes of the weights in the form inference would read them, at bf16 (the compute dtype on
/// a GPU): dense weights 2 bytes each; an N:M layer its kept values plus 2 bits of index each (the
/// 2:4 format, 9/16 of dense: the bytes `tessera export --sparse24` writes for a 2:4 layer); an
/// unstructured one its kept values plus a bitmap; SLTrain its
/// factors plus S's values with an i32 index each; a binary one a bit per weight plus α and β in
/// f32; LoRA adapters their factors (not merged, since merging would break a sparse pattern).
fn inference_bytes(config: &GptConfig, variants: &LinearVariants) -> usize {
    let mut bytes = 2 * config.parameter_count();
    for site in linear_sites(config) {
        let numel = site.input * site.output;
        let spec = variants.spec_for(&site);
        let form = match spec.variant {
            Variant::Dense => 2 * numel,
            Variant::Nm { n, m, .. } => (numel / m * n) * 9 / 4,
            Variant::Unstructured { density, .. } => 2 * (density * numel as f64).round() as usize + numel.div_ceil(8),
            Variant::SparseLowRank { rank, density, .. } => {
                2 * rank * (site.input + site.output) + 6 * (density * numel as f64).floor() as usize
            }
            Variant::Binary => numel.div_ceil(8) + 8 * site.input,
        };
        let adapter = spec.lora.map_or(0, |l| 2 * l.rank * (site.input + site.output));
        bytes = bytes - 2 * numel + form + adapter;
    }
    bytes
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => gpu.name().to_string(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The memory a run holds at its peak. On the CPU, the process's high-water resident set,
/// restarted before each run (Linux's clear_refs); on a GPU, the most device memory in use after
/// any step, less what was in use before the run started.
enum PeakMemory {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda {
        gpu: std::sync::Arc<tessera::cuda::CudaBackend>,
        before: u64,
        peak: std::cell::Cell<u64>,
    },
    Unknown,
}

impl PeakMemory {
    fn start(device: &Device) -> PeakMemory {
        match device {
            Device::Cpu => match std::fs::write("/proc/self/clear_refs", "5") {
                Ok(()) => PeakMemory::Cpu,
                Err(_) => PeakMemory::Unknown,
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(gpu) => match gpu.memory_in_use() {
                Ok(before) => PeakMemory::Cuda {
                    gpu: gpu.clone(),
                    before: before as u64,
                    peak: std::cell::Cell::new(before as u64),
                },
                Err(_) => PeakMemory::Unknown,
            },
        }
    }

    fn sample(&self) {
        #[cfg(feature = "cuda")]
        if let PeakMemory::Cuda { gpu, peak, .. } = self {
            if let Ok(now) = gpu.memory_in_use() {
                peak.set(peak.get().max(now as u64));
            }
        }
    }

    fn peak(&self) -> Option<u64> {
        match self {
            PeakMemory::Cpu => {
                let status = std::fs::read_to_string("/proc/self/status").ok()?;
                let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            }
            #[cfg(feature = "cuda")]
            PeakMemory::Cuda { before, peak, .. } => Some(peak.get() - before),
            PeakMemory::Unknown => None,
        }
    }
}
