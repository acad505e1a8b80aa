//! `tessera export --packed`: a checkpoint's inference form, with its binary layers packed.

use crate::args::Args;
use crate::train::Failure;
use std::path::Path;
use tessera::model::{GptConfig, GptParams};
use tessera::train::trainer::checkpoint_dir;
use tessera::Device;

pub const USAGE: &str = "usage: tessera export --packed --checkpoint DIR --out DIR [options]

Writes OUT/model.safetensors (and the checkpoint's tokenizer.json, when it has one) for
inference: with --packed each binary linear layer keeps 1 bit per weight plus its f32 alpha,
beta and bias, without the latent f32 weight. generate and eval run such a checkpoint with the
packed kernels; train refuses it.

options:
  --packed           pack the binary layers (the one export form)
  --checkpoint DIR   a checkpoint directory, or a training --out directory (its latest)
  --out DIR          where to write the exported checkpoint
  --preset NAME      the configuration of a checkpoint that does not record one";

pub fn run(args: &[String]) -> Result<(), Failure> {
    let mut args = Args::new(args);
    let usage = Failure::Usage;
    let packed = args.flag("--packed");
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
    if !packed {
        return Err(Failure::Usage(format!(
            "export writes the packed inference form: pass --packed\n\n{USAGE}"
        )));
    }

    let dir = checkpoint_dir(Path::new(&checkpoint))?;
    let config = preset.as_deref().map(GptConfig::preset).transpose()?;
    let mut params = GptParams::load_inference(dir.join("model.safetensors"), config.as_ref(), &Device::Cpu)?;
    if !params.layout.linears().iter().any(|l| l.binary.is_some()) {
        return Err(Failure::Usage(format!(
            "{checkpoint}: the model has no binary linear layers to pack"
        )));
    }
    params.pack_binary()?;
    let out = Path::new(&out);
    let fail = |what: &str, e: std::io::Error| Failure::Other(format!("{}: cannot {what}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(|e| fail("create the directory", e))?;
    let file = out.join("model.safetensors");
    params.save(&file)?;
    for tokenizer in [dir.join("tokenizer.json"), dir.join("../tokenizer.json")] {
        if tokenizer.is_file() {
            std::fs::copy(&tokenizer, out.join("tokenizer.json")).map_err(|e| fail("copy tokenizer.json", e))?;
            break;
        }
    }
    let layers = tessera::model::params::linear_summary(&params.config, &params.variants)?;
    let inference: usize = layers.iter().map(|l| l.inference_bytes).sum();
    let bytes = std::fs::metadata(&file)
        .map_err(|e| fail("read back the file", e))?
        .len();
    println!(
        "wrote {} ({bytes} B; the block linear layers read {inference} B per forward)",
        file.display()
    );
    Ok(())
}
