//! `tessera train`: trains a GPT on the embedded corpus or a text file, on the GPU when there is
//! one, with a progress line, validation, checkpoints and a generated sample at the end.

use crate::args::Args;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera::model::generate::{generate, Sampling};
use tessera::model::{GptConfig, LinearVariants};
use tessera::train::trainer::{TrainOptions, Trainer};
use tessera::train::{Corpus, Tokenizer};
use tessera::Error;

pub const USAGE: &str = "usage: tessera train [options]

Trains a GPT and saves checkpoints (safetensors, Hugging Face names) under --out.
With no options: the `tiny` preset on the embedded Jargon File, a few minutes on a laptop CPU.

options:
  --preset NAME      tiny (default), llama-tiny or gpt2-small
  --config FILE      a TOML file: a [model] and a [train] table overriding the preset's fields
  --data FILE        train on this text file instead of the embedded corpus
  --tokenizer FILE   a Hugging Face tokenizer.json (feature hf-tokenizer; default: bytes as
                     tokens); copied into --out, where generate and eval find it
  --device DEVICE    cpu or cuda (default: cuda when a GPU is usable, else cpu)
  --steps N          optimizer steps (default: the preset's)
  --seed N           initialisation and data order
  --out DIR          checkpoint directory (default: runs/<preset>)
  --distill-from CHECKPOINT
                     FBI-LLM's autoregressive distillation: train on the softmax of this
                     teacher (a tessera run or a Hugging Face GPT-2/Llama directory with the
                     same vocabulary) instead of the next tokens; [train] distill_ce_weight = w
                     mixes in w times the next-token loss
  --init-from CHECKPOINT
                     start from this checkpoint's weights (a tessera run or a Hugging Face
                     directory of the same configuration, dense layers) with fresh optimizer
                     state; the config's LoRA adapters are added to it (fine-tuning)
  --fast-forward-every N
                     Fast Forward (needs LoRA adapters): after the burn-in, every N steps
                     (the paper's 6) repeat the last update of the adapters while the loss on
                     the tiny set improves
  --fast-forward-burn-in N
                     steps before Fast Forward starts (default 50)
  --fast-forward-tiny N
                     the tiny set: the first N validation windows (default 32), which
                     validation then skips
  --fast-forward-reference-compat
                     stop Fast Forward as the authors' code does (two steps or more, the
                     step that made the loss worse kept)
  --resume           continue from the latest checkpoint in --out
  --gap CHECKPOINT   GAP post-training of CHECKPOINT instead of training: gap_steps updates of
                     gradient ascent on one random text sample, validating after each, the
                     best step's parameters written to --out (default: CHECKPOINT-gap; see
                     [train] gap_steps, gap_lr, gap_tokens: --config overrides them, --seed
                     picks another sample)

The [model] table's `linears` give the block linear layers variants (nm, unstructured,
sparse_low_rank, binary) and LoRA adapters ([train] adapters_from = S switches
them on at step S; densify_from = S drops the masks at step S, SPDF's dense fine-tuning): see
README.md, \"Linear variants\".

The [train] table also turns on the recipes: grow_from = L0 (GrowLength: sequence lengths
L0, 2·L0, ... up to seq, tokens per step constant) and forget_every = K (active forgetting:
the token embedding and its AdamW state reset every K steps).";

/// Why `train` stopped, as the process's exit code says it.
pub enum Failure {
    /// Bad arguments or input: exit code 2.
    Usage(String),
    /// The loss or gradients stopped being finite: exit code 3.
    Diverged(String),
    /// Anything else: exit code 1.
    Other(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        match error {
            Error::Diverged(_) => Failure::Diverged(error.to_string()),
            Error::InvalidArgument { .. } | Error::File { .. } => Failure::Usage(error.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let preset = args.value("--preset").map_err(usage)?.unwrap_or_else(|| "tiny".into());
    let config_file = args.value("--config").map_err(usage)?;
    let data = args.value("--data").map_err(usage)?;
    let tokenizer_file = args.value("--tokenizer").map_err(usage)?;
    let device = crate::device_option(&mut args)?;
    let steps: Option<u64> = args.parsed("--steps").map_err(usage)?;
    let seed: Option<u64> = args.parsed("--seed").map_err(usage)?;
    let out_arg = args.value("--out").map_err(usage)?;
    let resume = args.flag("--resume");
    let gap = args.value("--gap").map_err(usage)?;
    let distill_from = args.value("--distill-from").map_err(usage)?;
    let init_from = args.value("--init-from").map_err(usage)?;
    let ff_every: Option<u64> = args.parsed("--fast-forward-every").map_err(usage)?;
    let ff_burn_in: Option<u64> = args.parsed("--fast-forward-burn-in").map_err(usage)?;
    let ff_tiny: Option<usize> = args.parsed("--fast-forward-tiny").map_err(usage)?;
    let ff_compat = args.flag("--fast-forward-reference-compat");
    args.finish().map_err(usage)?;
    let starts_a_run =
        init_from.is_some() || ff_every.is_some() || ff_burn_in.is_some() || ff_tiny.is_some() || ff_compat;
    // GAP writes a model directory of its own, never into the run it starts from.
    let out = PathBuf::from(match (&out_arg, &gap) {
        (Some(out), _) => out.clone(),
        (None, Some(from)) => format!("{}-gap", from.trim_end_matches('/')),
        (None, None) => format!("runs/{preset}"),
    });
    if let Some(from) = &gap {
        let same = match (Path::new(from).canonicalize(), out.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => Path::new(from) == out,
        };
        if same {
            return Err(Failure::Usage(format!(
                "--out must differ from the --gap checkpoint ({from})"
            )));
        }
    }

    // A run keeps its tokenizer beside its checkpoints, so that resuming, generate and eval
    // tokenize as training did.
    let kept_tokenizer = out.join("tokenizer.json");
    let tokenizer = match &tokenizer_file {
        Some(path) => Tokenizer::from_file(path)?,
        None if resume && kept_tokenizer.is_file() => Tokenizer::from_file(&kept_tokenizer)?,
        None if gap
            .as_ref()
            .is_some_and(|from| Path::new(from).join("tokenizer.json").is_file()) =>
        {
            Tokenizer::from_file(Path::new(gap.as_deref().unwrap_or_default()).join("tokenizer.json"))?
        }
        None => Tokenizer::Bytes,
    };
    let corpus = match &data {
        Some(path) => Corpus::from_file(path, &tokenizer)?,
        None => Corpus::embedded_with(&tokenizer)?,
    };

    if let Some(from) = gap {
        if resume || steps.is_some() {
            return Err(Failure::Usage(
                "--gap takes its number of updates from [train] gap_steps, and does not resume".into(),
            ));
        }
        return post_train(
            &PathBuf::from(from),
            &out,
            &corpus,
            config_file.as_deref(),
            seed,
            &device,
        );
    }

    if resume && distill_from.is_some() {
        return Err(Failure::Usage(
            "--distill-from starts a run; a resumed run keeps the teacher its checkpoint names".into(),
        ));
    }
    if resume && starts_a_run {
        return Err(Failure::Usage(
            "--init-from and --fast-forward-* start a run; a resumed run keeps its checkpoint's options".into(),
        ));
    }
    let mut trainer = if resume {
        let trainer = Trainer::resume(&out, &device)?;
        eprintln!("resuming at step {} from {}", trainer.step(), out.display());
        trainer
    } else {
        let (mut config, variants, mut options) = configuration(&preset, config_file.as_deref())?;
        if tokenizer_file.is_some() {
            config.vocab = tokenizer.vocab_size();
        }
        if let Some(steps) = steps {
            options.steps = steps;
        }
        if let Some(seed) = seed {
            options.seed = seed;
        }
        if distill_from.is_some() {
            options.distill_from = distill_from;
        }
        if init_from.is_some() {
            options.init_from = init_from;
        }
        if let Some(every) = ff_every {
            options.fast_forward_every = every;
        }
        if let Some(burn_in) = ff_burn_in {
            options.fast_forward_burn_in = burn_in;
        }
        if let Some(tiny) = ff_tiny {
            options.fast_forward_tiny = tiny;
        }
        if ff_compat {
            options.fast_forward_reference_compat = true;
        }
        if config.vocab < tokenizer.vocab_size() {
            return Err(Failure::Usage(format!(
                "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
                config.vocab,
                tokenizer.vocab_size()
            )));
        }
        let trainer = Trainer::with_variants(&config, &variants, options, &device)?;
        if let Some(path) = &tokenizer_file {
            std::fs::create_dir_all(&out).map_err(|e| Failure::Other(format!("{}: {e}", out.display())))?;
            std::fs::copy(path, &kept_tokenizer)
                .map_err(|e| Failure::Other(format!("copying {path} to {}: {e}", kept_tokenizer.display())))?;
        }
        trainer
    };

    let options = trainer.options.clone();
    let config = trainer.model.params.config.clone();
    let unigram = corpus.unigram_loss(config.vocab);
    eprintln!(
        "training {} parameters ({} layers, width {}) on {} ({} training tokens), {device}, {} steps of {} tokens",
        config.parameter_count(),
        config.layers,
        config.width,
        corpus.name,
        corpus.train.len(),
        options.steps,
        options.batch * options.seq * options.accumulation,
    );
    if options.fast_forward_every > 0 {
        trainer.check_fast_forward_corpus(&corpus)?;
    }
    let mut progress = Progress::new(options.steps, trainer.step());
    let mut last_validation = None;
    while trainer.step() < options.steps {
        let record = match trainer.train_step(&corpus) {
            Ok(record) => record,
            Err(error @ Error::Diverged(_)) => {
                progress.finish();
                let kept = tessera::train::trainer::checkpoint_dir(&out)
                    .map(|dir| format!("the last good checkpoint is {}", dir.display()))
                    .unwrap_or_else(|_| "no checkpoint was saved before it".into());
                return Err(Failure::Diverged(format!("{error}; {kept}")));
            }
            Err(error) => return Err(error.into()),
        };
        let step = record.step;
        let last = step == options.steps;
        if last || (options.eval_every > 0 && step.is_multiple_of(options.eval_every)) {
            last_validation = Some(trainer.validate(&corpus)?);
        }
        progress.update(record.loss, last_validation, record.tokens);
        if last || (options.checkpoint_every > 0 && step.is_multiple_of(options.checkpoint_every)) {
            trainer.save(&out)?;
        }
    }
    progress.finish();
    let stages = trainer.fast_forward_log();
    if !stages.is_empty() {
        let sum = |f: fn(&tessera::train::trainer::FastForwardStage) -> u32| stages.iter().map(f).sum::<u32>();
        eprintln!(
            "fast forward: {} stages, {} FF steps taken, {} kept, {} tiny-set forward passes ({} windows each)",
            stages.len(),
            sum(|s| s.count.taken),
            sum(|s| s.count.kept),
            sum(|s| s.count.evaluations),
            options.fast_forward_tiny
        );
    }
    let validation = match last_validation {
        Some(loss) => loss,
        None => trainer.validate(&corpus)?,
    };
    let saved = trainer.save(&out)?;
    println!(
        "validation loss {validation:.4} nats/token ({:.3} bits/byte); unigram baseline {unigram:.4}",
        validation / std::f32::consts::LN_2
    );
    println!("checkpoint: {}", saved.display());

    let prompt = tokenizer.encode(b"The ")?;
    let sampling = Sampling {
        temperature: 0.8,
        top_k: Some(40),
        top_p: None,
    };
    let sample = generate(&mut trainer.model, &prompt, 200, &sampling, options.seed)?;
    println!("sample: The {}", tokenizer.decode(&sample)?);
    Ok(())
}

/// The preset, with a TOML file's [model] and [train] tables laid over it.
pub fn configuration(preset: &str, file: Option<&str>) -> Result<(GptConfig, LinearVariants, TrainOptions), Failure> {
    let text = file
        .map(|path| std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("{path}: {e}"))))
        .transpose()?;
    tessera::train::config::run_configuration(preset, text.as_deref()).map_err(|e| match file {
        Some(path) => Failure::Usage(format!("{path}: {e}")),
        None => Failure::from(e),
    })
}

/// Lays the TOML table `key` over the JSON object `target`, whose fields it may only replace.
fn overlay(target: &mut serde_json::Value, key: &str, value: &toml::Value, path: &str) -> Result<(), Failure> {
    let toml::Value::Table(fields) = value else {
        return Err(Failure::Usage(format!("{path}: `{key}` must be a table")));
    };
    for (field, value) in fields {
        if target.get(field).is_none() {
            return Err(Failure::Usage(format!("{path}: unknown field `{field}` in [{key}]")));
        }
        target[field] = serde_json::to_value(value).map_err(|e| Failure::Usage(format!("{path}: {field}: {e}")))?;
    }
    Ok(())
}

/// `tessera train --gap FROM`: GAP on the checkpoint FROM, with its recorded options under a
/// config file's [train] table; the kept parameters go to `out`.
fn post_train(
    from: &Path,
    out: &Path,
    corpus: &Corpus,
    file: Option<&str>,
    seed: Option<u64>,
    device: &tessera::Device,
) -> Result<(), Failure> {
    let mut trainer = Trainer::resume(from, device)?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("{path}: {e}")))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| Failure::Usage(format!("{path}: {e}")))?;
        let mut train = trainer.options.to_json();
        for (key, value) in &table {
            match key.as_str() {
                "train" => overlay(&mut train, key, value, path)?,
                other => {
                    return Err(Failure::Usage(format!(
                        "{path}: [{other}] does not apply to GAP (only [train] does)"
                    )))
                }
            }
        }
        trainer.options = TrainOptions::from_json(&train)
            .ok_or_else(|| Failure::Usage(format!("{path}: a field of [train] has the wrong type")))?;
    }
    if let Some(seed) = seed {
        trainer.options.seed = seed;
    }
    let report = trainer.gap(corpus)?;
    eprintln!(
        "GAP on {} ({} sample tokens, lr {}): validation loss {:.4} before",
        from.display(),
        report.sample_tokens,
        trainer.options.gap_lr,
        report.initial_validation
    );
    for step in &report.steps {
        eprintln!(
            "GAP step {} | sample loss {:.4} | val {:.4}",
            step.step, step.sample_loss, step.validation
        );
    }
    let best = report.steps[report.best];
    trainer.save_model(out)?;
    let kept_tokenizer = from.join("tokenizer.json");
    if kept_tokenizer.is_file() {
        std::fs::copy(&kept_tokenizer, out.join("tokenizer.json"))
            .map_err(|e| Failure::Other(format!("copying {}: {e}", kept_tokenizer.display())))?;
    }
    println!(
        "kept GAP step {}: validation loss {:.4} (before: {:.4}); model: {}",
        best.step,
        best.validation,
        report.initial_validation,
        out.display()
    );
    Ok(())
}

/// One line on stderr, rewritten in place on a terminal and printed every tenth of the run
/// otherwise: step, loss, validation loss, tokens per second and the time left.
struct Progress {
    total: u64,
    step: u64,
    first_step: u64,
    start: Instant,
    tokens: usize,
    terminal: bool,
}

impl Progress {
    fn new(total: u64, step: u64) -> Progress {
        Progress {
            total,
            step,
            first_step: step,
            start: Instant::now(),
            tokens: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, loss: f32, validation: Option<f32>, tokens: usize) {
        self.step += 1;
        self.tokens += tokens;
        let elapsed = self.start.elapsed().as_secs_f64();
        let done = (self.step - self.first_step) as f64;
        let left = (self.total - self.step) as f64 * elapsed / done.max(1.0);
        let validation = validation.map(|v| format!(" | val {v:.3}")).unwrap_or_default();
        let line = format!(
            "step {}/{} | loss {loss:.3}{validation} | {:.1}k tok/s | ETA {}:{:02}",
            self.step,
            self.total,
            self.tokens as f64 / elapsed.max(1e-9) / 1e3,
            left as u64 / 60,
            left as u64 % 60
        );
        let every = (self.total / 10).max(1);
        if self.terminal {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        } else if self.step.is_multiple_of(every) || self.step == self.total {
            eprintln!("{line}");
        }
    }

    fn finish(&mut self) {
        if self.terminal {
            eprintln!();
        }
    }
}
