//! `tessera train`: trains a GPT on the embedded corpus or a text file, on the GPU when there is
//! one, with a progress line, validation, checkpoints and a generated sample at the end.

use crate::args::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;
use tessera::model::generate::{generate, Sampling};
use tessera::model::GptConfig;
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
  --resume           continue from the latest checkpoint in --out";

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
    let out = PathBuf::from(
        args.value("--out")
            .map_err(usage)?
            .unwrap_or_else(|| format!("runs/{preset}")),
    );
    let resume = args.flag("--resume");
    args.finish().map_err(usage)?;

    // A run keeps its tokenizer beside its checkpoints, so that resuming, generate and eval
    // tokenize as training did.
    let kept_tokenizer = out.join("tokenizer.json");
    let tokenizer = match &tokenizer_file {
        Some(path) => Tokenizer::from_file(path)?,
        None if resume && kept_tokenizer.is_file() => Tokenizer::from_file(&kept_tokenizer)?,
        None => Tokenizer::Bytes,
    };
    let corpus = match &data {
        Some(path) => Corpus::from_file(path, &tokenizer)?,
        None => Corpus::embedded_with(&tokenizer)?,
    };

    let mut trainer = if resume {
        let trainer = Trainer::resume(&out, &device)?;
        eprintln!("resuming at step {} from {}", trainer.step(), out.display());
        trainer
    } else {
        let (mut config, mut options) = configuration(&preset, config_file.as_deref())?;
        if tokenizer_file.is_some() {
            config.vocab = tokenizer.vocab_size();
        }
        if let Some(steps) = steps {
            options.steps = steps;
        }
        if let Some(seed) = seed {
            options.seed = seed;
        }
        if config.vocab < tokenizer.vocab_size() {
            return Err(Failure::Usage(format!(
                "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
                config.vocab,
                tokenizer.vocab_size()
            )));
        }
        let trainer = Trainer::new(&config, options, &device)?;
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
        if last || (options.eval_every > 0 && step % options.eval_every == 0) {
            last_validation = Some(trainer.validate(&corpus)?);
        }
        progress.update(record.loss, last_validation, record.tokens);
        if last || (options.checkpoint_every > 0 && step % options.checkpoint_every == 0) {
            trainer.save(&out)?;
        }
    }
    progress.finish();
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
fn configuration(preset: &str, file: Option<&str>) -> Result<(GptConfig, TrainOptions), Failure> {
    let text = file
        .map(|path| std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("{path}: {e}"))))
        .transpose()?;
    tessera::train::config::configuration(preset, text.as_deref()).map_err(|e| match file {
        Some(path) => Failure::Usage(format!("{path}: {e}")),
        None => Failure::from(e),
    })
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
        } else if self.step % every == 0 || self.step == self.total {
            eprintln!("{line}");
        }
    }

    fn finish(&mut self) {
        if self.terminal {
            eprintln!();
        }
    }
}
