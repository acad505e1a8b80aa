//! `tessera export`: a checkpoint rewritten in an inference form, one flag per form, which
//! `tessera generate` and `tessera eval` read like any checkpoint and training refuses.

use crate::args::Args;
use crate::train::Failure;
use std::path::Path;
use tessera::model::sparse_layers::export_sparse24;
use tessera::model::{GptConfig, GptParams};
use tessera::train::trainer::checkpoint_dir;
use tessera::Device;

pub const USAGE: &str = "usage: tessera export (--packed | --sparse24) --checkpoint DIR --out DIR [options]

Writes OUT/model.safetensors in an inference form (and copies the checkpoint's tokenizer.json,
when it has one). generate and eval run it; train refuses it.

forms (name one):
  --packed           each binary linear layer as 1 bit per weight plus its f32 alpha, beta and
                     bias, without the latent f32 weight; run by the packed kernels
  --sparse24         2:4 (and 1:2) layers as their compressed values and tensor-core metadata
                     only (9/16 of the dense bf16 bytes), every other tensor in bf16, LoRA
                     adapters unmerged; for models whose block linears are dense or pruned nm
                     layers with both dimensions multiples of 64

options:
  --checkpoint DIR   a checkpoint directory, or a training --out directory (its latest)
  --out DIR          where to write the export
  --preset NAME      the configuration of a checkpoint that does not record one";

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let packed = args.flag("--packed");
    let sparse24 = args.flag("--sparse24");
    let checkpoint = args
        .value("--checkpoint")
        .map_err(usage)?
        .ok_or(Failure::Usage("--checkpoint is required".into()))?;
    let out = args
        .value("--out")
        .map_err(usage)?
        .ok_or(Failure::Usage("--out is required".into()))?;
    let preset = args.value("--preset").map_err(usage)?;
    args.finish().map_err(usage)?;
    if packed == sparse24 {
        return Err(Failure::Usage(format!(
            "name one form to export: --packed or --sparse24\n\n{USAGE}"
        )));
    }

    let dir = checkpoint_dir(Path::new(&checkpoint))?;
    let config = preset.as_deref().map(GptConfig::preset).transpose()?;
    let source = dir.join("model.safetensors");
    let out = Path::new(&out);
    let fail = |what: &str, e: std::io::Error| Failure::Other(format!("{}: cannot {what}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(|e| fail("create the directory", e))?;
    let file = out.join("model.safetensors");
    if packed {
        let mut params = GptParams::load_inference(&source, config.as_ref(), &Device::Cpu)?;
        if !params.layout.linears().iter().any(|l| l.binary.is_some()) {
            return Err(Failure::Usage(format!(
                "{checkpoint}: the model has no binary linear layers to pack"
            )));
        }
        params.pack_binary()?;
        params.save(&file)?;
        let layers = tessera::model::params::linear_summary(&params.config, &params.variants)?;
        let inference: usize = layers.iter().map(|l| l.inference_bytes).sum();
        println!("the block linear layers read {inference} B per forward");
    } else {
        let params = GptParams::load(&source, config.as_ref(), &Device::Cpu)?;
        export_sparse24(&params, &file)?;
    }
    for tokenizer in [dir.join("tokenizer.json"), dir.join("../tokenizer.json")] {
        if tokenizer.is_file() {
            std::fs::copy(&tokenizer, out.join("tokenizer.json")).map_err(|e| fail("copy tokenizer.json", e))?;
            break;
        }
    }
    let bytes = std::fs::metadata(&file)
        .map_err(|e| fail("read back the file", e))?
        .len();
    println!("wrote {} ({bytes} B)", file.display());
    Ok(())
}
