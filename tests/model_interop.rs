//! Checkpoints move between tessera and Hugging Face transformers: tiny GPT-2 and Llama models
//! saved by transformers' `save_pretrained` (tests/fixtures, written by
//! scripts/hf-fixtures.py) load into tessera and give transformers' own logits, and tessera
//! writes them back under the same names and shapes.

#[macro_use]
mod common;

use tessera::model::safetensors::SafeTensors;
use tessera::model::{Activation, Attention, Family, Gpt, GptConfig, GptParams, Norm, Positions};
use tessera::{DType, Device};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The configurations scripts/hf-fixtures.py gives transformers.
fn config(family: Family) -> GptConfig {
    let gpt2 = family == Family::Gpt2;
    GptConfig {
        family,
        vocab: 64,
        layers: 2,
        heads: 4,
        kv_heads: if gpt2 { 4 } else { 2 },
        width: 32,
        ffn_width: if gpt2 { 128 } else { 48 },
        context: 16,
        norm: if gpt2 { Norm::LayerNorm } else { Norm::RmsNorm },
        norm_eps: 1e-5,
        activation: if gpt2 { Activation::Gelu } else { Activation::SwiGlu },
        positions: if gpt2 {
            Positions::Learned
        } else {
            Positions::Rope { bases: vec![10000.0] }
        },
        tied_embeddings: gpt2,
        attention: Attention::Causal,
        wavelet: false,
    }
}

fn logits_match(device: &Device, family: Family) {
    let folder = fixture(if family == Family::Gpt2 {
        "hf-gpt2-tiny"
    } else {
        "hf-llama-tiny"
    });
    let config = config(family);
    let params = GptParams::load(folder.join("model.safetensors"), Some(&config), device).unwrap();
    let expected = SafeTensors::load(folder.join("expected.safetensors")).unwrap();
    let inputs = expected.get("input_ids").unwrap();
    let (batch, seq) = (inputs.shape()[0], inputs.shape()[1]);
    let tokens = inputs.to_vec::<u32>().unwrap();
    let reference: Vec<f64> = expected
        .get("logits")
        .unwrap()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut model = Gpt::new(params, batch, seq).unwrap();
    let logits = model.logits(&tokens, batch, seq).unwrap();
    let got: Vec<f64> = match logits.dtype() {
        DType::F32 => logits.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect(),
        _ => logits
            .to_vec::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f64())
            .collect(),
    };
    // transformers computed in f64; tessera in f32 on the CPU, bf16 on a GPU.
    let tolerance = if device.is_cuda() { 3e-2 } else { 1e-5 };
    common::assert_close(&format!("{family:?} logits"), &got, &reference, tolerance);
}

fn gpt2_logits_match_transformers(device: &Device) {
    logits_match(device, Family::Gpt2);
}

fn llama_logits_match_transformers(device: &Device) {
    logits_match(device, Family::Llama);
}

on_each_device!(gpt2_logits_match_transformers, llama_logits_match_transformers);

/// Saving what was loaded gives transformers' tensors back, name for name and byte for byte
/// (tessera adds its configuration to the metadata).
#[test]
fn saves_the_same_tensors() {
    for (family, name) in [(Family::Gpt2, "hf-gpt2-tiny"), (Family::Llama, "hf-llama-tiny")] {
        let path = fixture(name).join("model.safetensors");
        let params = GptParams::load(&path, Some(&config(family)), &Device::Cpu).unwrap();
        let dir = std::env::temp_dir().join(format!("tessera-interop-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        params.save(dir.join("model.safetensors")).unwrap();
        let ours = SafeTensors::load(dir.join("model.safetensors")).unwrap();
        let theirs = SafeTensors::load(&path).unwrap();
        assert_eq!(ours.names().collect::<Vec<_>>(), theirs.names().collect::<Vec<_>>());
        for tensor in theirs.names() {
            let (a, b) = (ours.get(tensor).unwrap(), theirs.get(tensor).unwrap());
            assert_eq!(a.shape(), b.shape(), "{tensor}");
            assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap(), "{tensor}");
        }
        // Reloading needs no configuration: tessera recorded it.
        let again = GptParams::load(dir.join("model.safetensors"), None, &Device::Cpu).unwrap();
        assert_eq!(again.config, config(family));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A checkpoint whose tensors do not fit the configuration is an error naming the tensor.
#[test]
fn mismatched_checkpoints_name_the_tensor() {
    let path = fixture("hf-gpt2-tiny").join("model.safetensors");
    let wrong = GptConfig {
        ffn_width: 64,
        ..config(Family::Gpt2)
    };
    let error = GptParams::load(&path, Some(&wrong), &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("transformer.h.0.mlp.c_fc.weight") && error.contains("[32, 64]"),
        "{error}"
    );
    let llama = GptParams::load(&path, Some(&config(Family::Llama)), &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        error != llama && llama.contains("no tensor named `model.embed_tokens.weight`"),
        "{llama}"
    );
    // A truncated checkpoint is refused before anything is built.
    let bytes = std::fs::read(&path).unwrap();
    let dir = std::env::temp_dir().join(format!("tessera-interop-truncated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 1]).unwrap();
    let error = GptParams::load(dir.join("model.safetensors"), Some(&config(Family::Gpt2)), &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a valid safetensors file"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}
