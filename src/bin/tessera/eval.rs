//! `tessera eval`: the loss and perplexity of a checkpoint on a text file, and optionally the
//! logits of its first window as a .npy file, for comparison with other tools.

use crate::args::Args;
use crate::train::Failure;
use std::path::{Path, PathBuf};
use tessera::model::{Gpt, GptConfig, GptParams};
use tessera::train::data::validation_windows;
use tessera::train::trainer::checkpoint_dir;
use tessera::train::Tokenizer;
use tessera::{DType, Device, Tensor};

pub const USAGE: &str = "usage: tessera eval --checkpoint DIR --data FILE [options]

The mean next-token loss (nats per token) and perplexity of a checkpoint on a text file, over
consecutive windows of --seq tokens.

options:
  --checkpoint DIR   a checkpoint directory, or a training --out directory (its latest)
  --preset NAME      the configuration of a checkpoint that does not record one (Hugging Face's)
  --data FILE        the text to score
  --tokenizer FILE   a tokenizer.json (default: the run's own, else bytes as tokens)
  --seq N            tokens per window (default: the model's context)
  --batch N          windows per forward pass (default 8)
  --device DEVICE    cpu or cuda (default: cuda when a GPU is usable)
  --dump-logits FILE write the first window's logits, f32 (seq, vocab), to a .npy file";

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let checkpoint = args
        .value("--checkpoint")
        .map_err(usage)?
        .ok_or(Failure::Usage("--checkpoint is required".into()))?;
    let preset = args.value("--preset").map_err(usage)?;
    let data = args
        .value("--data")
        .map_err(usage)?
        .ok_or(Failure::Usage("--data is required".into()))?;
    let tokenizer = args.value("--tokenizer").map_err(usage)?;
    let seq: Option<usize> = args.parsed("--seq").map_err(usage)?;
    let batch: usize = args.parsed("--batch").map_err(usage)?.unwrap_or(8);
    let device = crate::device_option(&mut args)?;
    let dump: Option<PathBuf> = args.value("--dump-logits").map_err(usage)?.map(PathBuf::from);
    args.finish().map_err(usage)?;

    let mut model = load_model(Path::new(&checkpoint), preset.as_deref(), &device, batch.max(1), seq)?;
    let config = model.params.config.clone();
    let seq = seq.unwrap_or(config.context);
    let text = std::fs::read(&data).map_err(|e| Failure::Usage(format!("{data}: {e}")))?;
    let tokenizer = load_tokenizer(Path::new(&checkpoint), tokenizer.as_deref())?;
    let tokens = tokenizer.encode(&text)?;
    let windows: Vec<_> = validation_windows(&tokens, seq).collect();
    if windows.is_empty() {
        return Err(Failure::Usage(format!("{data}: fewer than {} tokens", seq + 1)));
    }
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in windows.chunks(batch.max(1)) {
        inputs.clear();
        targets.clear();
        for (x, y) in chunk {
            inputs.extend_from_slice(x);
            targets.extend_from_slice(y);
        }
        total += model.loss(&inputs, &targets, chunk.len(), seq)? as f64 * chunk.len() as f64;
        count += chunk.len();
    }
    let loss = total / count as f64;
    println!(
        "{data}: {} windows of {seq} tokens: loss {loss:.4} nats/token, perplexity {:.3}",
        count,
        loss.exp()
    );
    if let Some(path) = dump {
        let (x, _) = windows[0];
        let logits = model.logits(x, 1, seq)?;
        write_npy(&path, logits)?;
        println!(
            "logits of the first window: {} ({seq} x {})",
            path.display(),
            config.vocab
        );
    }
    Ok(())
}

/// The model in a checkpoint, with activations for `batch` sequences of `seq` (default: context).
pub fn load_model(
    checkpoint: &Path,
    preset: Option<&str>,
    device: &Device,
    batch: usize,
    seq: Option<usize>,
) -> Result<Gpt, Failure> {
    let dir = checkpoint_dir(checkpoint)?;
    let config = preset.map(GptConfig::preset).transpose()?;
    // A packed checkpoint (tessera export --packed) runs its binary layers packed.
    let params = GptParams::load_inference(dir.join("model.safetensors"), config.as_ref(), device)?;
    let seq = seq.unwrap_or(params.config.context);
    Ok(Gpt::new(params, batch, seq)?)
}

/// The tokenizer named, else the one a training run keeps beside its checkpoints (in the
/// checkpoint directory or the run directory above it), else bytes as tokens.
pub fn load_tokenizer(checkpoint: &Path, file: Option<&str>) -> Result<Tokenizer, Failure> {
    if let Some(file) = file {
        return Ok(Tokenizer::from_file(file)?);
    }
    let dir = checkpoint_dir(checkpoint)?;
    for candidate in [dir.join("tokenizer.json"), dir.join("../tokenizer.json")] {
        if candidate.is_file() {
            return Ok(Tokenizer::from_file(candidate)?);
        }
    }
    Ok(Tokenizer::Bytes)
}

/// Writes a 2-D tensor as f32 in NumPy's .npy format (version 1.0, little-endian, C order).
fn write_npy(path: &Path, tensor: &Tensor) -> Result<(), Failure> {
    let values: Vec<f32> = match tensor.dtype() {
        DType::F32 => tensor.to_vec::<f32>()?,
        DType::BF16 => tensor.to_vec::<half::bf16>()?.iter().map(|v| v.to_f32()).collect(),
        DType::F16 => tensor.to_vec::<half::f16>()?.iter().map(|v| v.to_f32()).collect(),
        other => return Err(Failure::Other(format!("cannot write {other} logits"))),
    };
    let shape: Vec<String> = tensor.shape().iter().map(usize::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        shape.join(", ")
    );
    // The magic, version and length take 10 bytes; the header pads to a multiple of 64 with a newline.
    let padded = (10 + header.len() + 1).next_multiple_of(64) - 10;
    header.push_str(&" ".repeat(padded - header.len() - 1));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| Failure::Other(format!("{}: {e}", path.display())))
}
