//! `tessera export`: a checkpoint rewritten in an inference form, one flag per form, which
//! `tessera generate` and `tessera eval` read like any checkpoint and training refuses.

use crate::args::Args;
use crate::train::Failure;
use std::path::Path;
use tessera::model::sparse_layers::export_sparse24;
use tessera::model::GptParams;
use tessera::train::trainer::checkpoint_dir;
use tessera::Device;

pub const USAGE: &str = "usage: tessera export --sparse24 --checkpoint DIR --out DIR

Writes DIR/model.safetensors in an inference form (and copies the run's tokenizer.json).

forms:
  --sparse24         2:4 (and 1:2) layers as their compressed values and tensor-core metadata
                     only (9/16 of the dense bf16 bytes), every other tensor in bf16, LoRA
                     adapters unmerged; for models whose block linears are dense or pruned nm
                     layers with both dimensions multiples of 64

options:
  --checkpoint DIR   a checkpoint directory, or a training --out directory (its latest)
  --out DIR          where to write the export";

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let sparse24 = args.flag("--sparse24");
    let checkpoint = args
        .value("--checkpoint")
        .map_err(usage)?
        .ok_or(Failure::Usage("--checkpoint is required".into()))?;
    let out = args
        .value("--out")
        .map_err(usage)?
        .ok_or(Failure::Usage("--out is required".into()))?;
    args.finish().map_err(usage)?;
    if !sparse24 {
        return Err(Failure::Usage(format!("name the form to export\n\n{USAGE}")));
    }
    sparse24_export(Path::new(&checkpoint), Path::new(&out))
}

/// `--sparse24`: the checkpoint's parameters through [`export_sparse24`], read on the CPU.
fn sparse24_export(checkpoint: &Path, out: &Path) -> Result<(), Failure> {
    let dir = checkpoint_dir(checkpoint)?;
    let params = GptParams::load(dir.join("model.safetensors"), None, &Device::Cpu)?;
    std::fs::create_dir_all(out).map_err(|e| Failure::Other(format!("{}: {e}", out.display())))?;
    let path = out.join("model.safetensors");
    export_sparse24(&params, &path)?;
    for candidate in [dir.join("tokenizer.json"), dir.join("../tokenizer.json")] {
        if candidate.is_file() {
            std::fs::copy(&candidate, out.join("tokenizer.json"))
                .map_err(|e| Failure::Other(format!("{}: {e}", candidate.display())))?;
            break;
        }
    }
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MiB)",
        path.display(),
        bytes as f64 / (1u64 << 20) as f64
    );
    Ok(())
}
