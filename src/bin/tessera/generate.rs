//! `tessera generate`: text from a checkpoint, with temperature, top-k and top-p sampling.

use crate::args::Args;
use crate::eval::{load_model, load_tokenizer};
use crate::train::Failure;
use std::path::Path;
use tessera::model::generate::{generate_decoding, Sampling};
use tessera::model::DecodeMode;

pub const USAGE: &str = "usage: tessera generate --checkpoint DIR [options]

options:
  --checkpoint DIR   a checkpoint directory, or a training --out directory (its latest)
  --preset NAME      the configuration of a checkpoint that does not record one (Hugging Face's)
  --tokenizer FILE   a tokenizer.json (default: the run's own, else bytes as tokens)
  --prompt TEXT      the text to continue (default: \"The \")
  --tokens N         tokens to generate (default 200)
  --temperature T    0 is greedy (default 0.8)
  --top-k K          sample among the K most likely tokens (default 40; 0: all)
  --top-p P          sample within the smallest set of probability >= P (default 1: all)
  --seed N           the sampler's seed (default 0)
  --graph            replay each decode step as one CUDA graph (models with learned positions
                     and no wavelet mixing; CUDA only)
  --device DEVICE    cpu or cuda (default: cuda when a GPU is usable)";

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let checkpoint = args
        .value("--checkpoint")
        .map_err(usage)?
        .ok_or(Failure::Usage("--checkpoint is required".into()))?;
    let preset = args.value("--preset").map_err(usage)?;
    let tokenizer = args.value("--tokenizer").map_err(usage)?;
    let prompt = args.value("--prompt").map_err(usage)?.unwrap_or_else(|| "The ".into());
    let tokens: usize = args.parsed("--tokens").map_err(usage)?.unwrap_or(200);
    let temperature: f32 = args.parsed("--temperature").map_err(usage)?.unwrap_or(0.8);
    let top_k: usize = args.parsed("--top-k").map_err(usage)?.unwrap_or(40);
    let top_p: f32 = args.parsed("--top-p").map_err(usage)?.unwrap_or(1.0);
    let seed: u64 = args.parsed("--seed").map_err(usage)?.unwrap_or(0);
    let graph = args.flag("--graph");
    let device = crate::device_option(&mut args)?;
    args.finish().map_err(usage)?;

    // Activations for one token: the cache does the work, and a window longer than the context
    // reshapes them when it comes.
    let mut model = load_model(Path::new(&checkpoint), preset.as_deref(), &device, 1, Some(1))?;
    let sampling = Sampling {
        temperature,
        top_k: (top_k > 0).then_some(top_k),
        top_p: (top_p < 1.0).then_some(top_p),
    };
    let tokenizer = load_tokenizer(Path::new(&checkpoint), tokenizer.as_deref())?;
    let prompt_tokens = tokenizer.encode(prompt.as_bytes())?;
    let started = std::time::Instant::now();
    let mode = if graph { DecodeMode::Graph } else { DecodeMode::Eager };
    let out = generate_decoding(&mut model, &prompt_tokens, tokens, &sampling, seed, Some(mode))?;
    let seconds = started.elapsed().as_secs_f64();
    println!("{}{}", prompt, tokenizer.decode(&out)?);
    eprintln!(
        "{} tokens in {seconds:.2} s: {:.1} tokens/s (prompt of {} tokens)",
        out.len(),
        out.len() as f64 / seconds.max(1e-9),
        prompt_tokens.len()
    );
    Ok(())
}
