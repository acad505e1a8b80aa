//! A binary (FBI-LLM) model's packed inference form (`GptParams::pack_binary`, `tessera export
//! --packed`): its logits against the training form's, through the full forward and the key/value
//! cache's prefill and decode (the packed GEMM and GEMV on a GPU), greedy generation, the
//! checkpoint round trip, corrupt and truncated files, the refusal to train, `tessera info`'s
//! bytes at inference, and the command line (export, generate, eval).

#[macro_use]
mod common;

use rand::Rng;
use std::path::PathBuf;
use tessera::model::generate::{generate, Sampling};
use tessera::model::params::{linear_summary, packed_name, PACKED_KEY};
use tessera::model::{
    Activation, Attention, Family, Gpt, GptConfig, GptParams, LinearSpec, LinearVariants, Norm, Positions, SafeTensors,
};
use tessera::{DType, Device, Error, Tensor};

on_each_device!(
    packed_logits_equal_the_training_form,
    packed_generation_equals_the_training_form,
    packed_checkpoints_round_trip,
    packed_models_do_not_train,
);

/// GPT-2 (Conv1D (in, out) weights with biases, GELU) or Llama (nn.Linear (out, in), SwiGLU);
/// an MLP width that is not a multiple of 32, so that the down projection's rows of bits end in
/// padding.
fn config(family: Family, vocab: usize) -> GptConfig {
    let gpt2 = family == Family::Gpt2;
    GptConfig {
        family,
        vocab,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        width: 64,
        ffn_width: 72,
        context: 24,
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

fn binary() -> LinearVariants {
    LinearVariants::all(LinearSpec {
        variant: tessera::model::Variant::Binary,
        lora: None,
    })
}

/// A binary model with every value random (no latent weight exactly 0: the forms then agree).
fn model(family: Family, vocab: usize, device: &Device, rng: &mut impl Rng) -> GptParams {
    let mut params = GptParams::init_with_variants(&config(family, vocab), &binary(), device, 7).unwrap();
    for index in 0..params.params.len() {
        let spec = &params.params[index].spec;
        let gain = spec.name.ends_with("norm.weight") || spec.name.contains("ln_") && spec.name.ends_with(".weight");
        let n: usize = spec.shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let v = rng.random_range(0.01f32..0.4) * if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                v + if gain { 1.0 } else { 0.0 }
            })
            .collect();
        params.set_value(index, values).unwrap();
    }
    params
}

/// A copy of `params` (values only, same variants) on `device`.
fn copy(params: &GptParams, device: &Device) -> GptParams {
    let mut out = GptParams::init_with_variants(&params.config, &params.variants, device, 7).unwrap();
    for (index, p) in params.params.iter().enumerate() {
        out.set_value(index, p.value.to_vec::<f32>().unwrap()).unwrap();
    }
    out
}

fn host(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect(),
        DType::BF16 => t.to_vec::<half::bf16>().unwrap().iter().map(|v| v.to_f64()).collect(),
        other => panic!("logits of dtype {other}"),
    }
}

/// The relative tolerance between two forms' logits: f32 sums in another order on the CPU;
/// bf16 activations rounded at different places on a GPU.
fn tolerance(device: &Device) -> f64 {
    if device.is_cuda() {
        3e-2
    } else {
        1e-5
    }
}

fn logits(params: GptParams, inputs: &[u32], batch: usize, seq: usize) -> (Vec<f64>, GptParams) {
    let mut model = Gpt::new(params, batch, seq).unwrap();
    let logits = host(model.logits(inputs, batch, seq).unwrap());
    (logits, model.params)
}

/// The packed model's logits are the training form's: the full forward (40 tokens: the GPU's
/// packed GEMM), and the cache's prefill and one-token decodes (its GEMV).
fn packed_logits_equal_the_training_form(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let params = model(family, 37, device, &mut rng);
        let (batch, seq) = (2, 20);
        let inputs: Vec<u32> = (0..batch * seq).map(|_| rng.random_range(0..37)).collect();
        let (want, mut params) = logits(params, &inputs, batch, seq);
        assert!(want.iter().all(|v| v.is_finite()));
        let reference = copy(&params, device);
        params.pack_binary().unwrap();
        assert!(params.is_packed());
        assert_eq!(params.packed.len(), params.layout.linears().len());
        let (got, params) = logits(params, &inputs, batch, seq);
        common::assert_close(
            &format!("{family:?} packed logits on {device}"),
            &got,
            &want,
            tolerance(device),
        );

        // Prefill 5 tokens, then decode one at a time, on both forms.
        let prompt = &inputs[..5];
        let mut steps = vec![prompt.to_vec()];
        steps.extend(inputs[5..12].iter().map(|&t| vec![t]));
        let run = |params: GptParams| {
            let model = Gpt::new(params, 1, 1).unwrap();
            let mut cache = model.kv_cache(1).unwrap();
            let mut out = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                let logits = match i {
                    0 => model.prefill(&mut cache, step).unwrap(),
                    _ => model.decode(&mut cache, step).unwrap(),
                };
                out.extend(host(logits));
            }
            out
        };
        let want = run(reference);
        let got = run(params);
        common::assert_close(
            &format!("{family:?} cached packed logits on {device}"),
            &got,
            &want,
            tolerance(device),
        );
    }
}

/// Greedy generation with the packed model is the training form's. On a GPU the two forms round
/// bf16 activations at different places, so a step may pick another token only where the
/// training form's two best logits lie within the tolerance; on the CPU the texts are equal.
fn packed_generation_equals_the_training_form(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let params = model(family, 37, device, &mut rng);
        let prompt: Vec<u32> = (0..4).map(|_| rng.random_range(0..37)).collect();
        let mut training = Gpt::new(params, 1, 1).unwrap();
        let want = generate(&mut training, &prompt, 16, &Sampling::greedy(), 0).unwrap();
        let mut packed_params = copy(&training.params, device);
        packed_params.pack_binary().unwrap();
        let mut packed = Gpt::new(packed_params, 1, 1).unwrap();
        let got = generate(&mut packed, &prompt, 16, &Sampling::greedy(), 0).unwrap();
        if device.is_cuda() {
            if let Some(t) = (0..want.len()).find(|&t| want[t] != got[t]) {
                let mut window = prompt.clone();
                window.extend(&want[..t]);
                let all = host(training.logits(&window, 1, window.len()).unwrap());
                let last = &all[(window.len() - 1) * 37..];
                let scale = last.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let gap = last[want[t] as usize] - last[got[t] as usize];
                assert!(
                    gap <= tolerance(device) * scale,
                    "{family:?}: step {t} picks {} where the training form picks {} by {gap}",
                    got[t],
                    want[t]
                );
            }
        } else {
            assert_eq!(got, want, "{family:?}: packed generation");
        }
    }
}

fn scratch(name: &str, device: &Device) -> PathBuf {
    let kind = if device.is_cuda() { "gpu" } else { "cpu" };
    let dir = std::env::temp_dir().join(format!("tessera-binary-model-{name}-{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A packed checkpoint holds the bits, α, β and biases under their names and no latent weight;
/// it loads for inference with the same bits and logits, and its configuration says it is
/// packed. `tessera info`'s bytes at inference are the bits plus the f32 α, β and bias.
fn packed_checkpoints_round_trip(device: &Device) {
    let mut rng = common::rng();
    let dir = scratch("round-trip", device);
    for family in [Family::Gpt2, Family::Llama] {
        let mut params = model(family, 37, device, &mut rng);
        params.pack_binary().unwrap();
        let path = dir.join(format!("{family:?}.safetensors"));
        params.save(&path).unwrap();
        let file = SafeTensors::load(&path).unwrap();
        assert_eq!(file.metadata().get(PACKED_KEY).map(String::as_str), Some("binary"));
        let names: Vec<&str> = file.names().collect();
        for linear in params.layout.linears() {
            let name = &params.params[linear.weight].spec.name;
            assert!(!names.contains(&name.as_str()), "{name}: no latent weight");
            let bits = file.get(&packed_name(name)).unwrap();
            assert_eq!(bits.dtype(), DType::U32);
            assert_eq!(bits.shape(), &[linear.output, linear.input.div_ceil(32)]);
            let index = linear.binary.unwrap();
            for i in [index.alpha, index.beta].into_iter().chain(linear.bias) {
                assert!(names.contains(&params.params[i].spec.name.as_str()));
            }
        }
        let loaded = GptParams::load_inference(&path, None, device).unwrap();
        assert_eq!(loaded.packed.len(), params.packed.len());
        for (index, bits) in &params.packed {
            assert_eq!(
                loaded.packed[index].to_vec::<u32>().unwrap(),
                bits.to_vec::<u32>().unwrap()
            );
        }
        let inputs: Vec<u32> = (0..14).map(|_| rng.random_range(0..37)).collect();
        let (want, _) = logits(params, &inputs, 2, 7);
        let (got, _) = logits(loaded, &inputs, 2, 7);
        common::assert_close(
            &format!("{family:?}: the loaded packed model's logits"),
            &got,
            &want,
            1e-6,
        );

        let layers = linear_summary(&config(family, 37), &binary()).unwrap();
        let down = layers
            .iter()
            .find(|l| l.name.ends_with("down_proj") || l.name.ends_with("mlp.c_proj"))
            .unwrap();
        let bias = if family == Family::Gpt2 { 64 } else { 0 };
        assert_eq!(
            down.inference_bytes,
            4 * 64 * 72usize.div_ceil(32) + 4 * (2 * 72 + bias)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A packed model runs no backward, and a packed checkpoint does not load for training: each
/// error says why.
fn packed_models_do_not_train(device: &Device) {
    let mut rng = common::rng();
    let mut params = model(Family::Gpt2, 37, device, &mut rng);
    params.pack_binary().unwrap();
    let dir = scratch("no-training", device);
    let path = dir.join("model.safetensors");
    params.save(&path).unwrap();
    let inputs: Vec<u32> = (0..14).map(|_| rng.random_range(0..37)).collect();
    let mut model = Gpt::new(params, 2, 7).unwrap();
    match model.forward_backward(&inputs, &inputs, 2, 7, 1.0) {
        Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("inference only"), "{reason}"),
        other => panic!("expected Unsupported, got {:?}", other.map(|_| ())),
    }
    let message = GptParams::load(&path, None, device).err().unwrap().to_string();
    assert!(message.contains("inference only"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Truncated and corrupt packed checkpoints are errors that name the tensor.
#[test]
fn corrupt_packed_checkpoints_are_errors_naming_the_tensor() {
    let mut rng = common::rng();
    let mut params = model(Family::Llama, 37, &Device::Cpu, &mut rng);
    params.pack_binary().unwrap();
    let dir = scratch("corrupt", &Device::Cpu);
    let path = dir.join("model.safetensors");
    params.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let message = GptParams::load_inference(&truncated, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("tensor `"), "{message}");

    // The bits of one layer with a row missing, then without that tensor at all.
    let linear = *params.layout.linears()[0];
    let name = packed_name(&params.params[linear.weight].spec.name);
    let file = SafeTensors::load(&path).unwrap();
    let words = linear.input.div_ceil(32);
    let short = Tensor::from_vec(
        vec![0u32; (linear.output - 1) * words],
        &[linear.output - 1, words],
        &Device::Cpu,
    )
    .unwrap();
    let write = |target: &std::path::Path, replace: Option<&Tensor>| {
        let list: Vec<(&str, &Tensor)> = file
            .names()
            .filter(|n| *n != name)
            .map(|n| (n, file.get(n).unwrap()))
            .chain(replace.map(|t| (name.as_str(), t)))
            .collect();
        let metadata = file.metadata().clone();
        tessera::model::safetensors::save(target, &list, &metadata).unwrap();
    };
    let wrong = dir.join("wrong-shape.safetensors");
    write(&wrong, Some(&short));
    let message = GptParams::load_inference(&wrong, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains(&name), "{message}");
    let missing = dir.join("missing.safetensors");
    write(&missing, None);
    let message = GptParams::load_inference(&missing, None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains(&name), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tessera(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap()
}

/// `tessera export --packed` writes the packed form; `generate` (greedy) and `eval` run it and
/// give what they give on the checkpoint it came from; `info` prints the bytes at inference;
/// export without `--packed`, or of a model without binary layers, is a usage error.
#[test]
fn command_line_exports_and_runs_the_packed_form() {
    let mut rng = common::rng();
    let dir = scratch("cli", &Device::Cpu);
    let (trained, packed) = (dir.join("trained"), dir.join("packed"));
    std::fs::create_dir_all(&trained).unwrap();
    model(Family::Gpt2, 256, &Device::Cpu, &mut rng)
        .save(trained.join("model.safetensors"))
        .unwrap();
    let run = |args: &[&str]| {
        let output = tessera(args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let (t, p) = (trained.to_str().unwrap(), packed.to_str().unwrap());
    let report = run(&["export", "--packed", "--checkpoint", t, "--out", p]);
    assert!(report.contains("read") && report.contains("per forward"), "{report}");
    let greedy = |checkpoint: &str| {
        run(&[
            "generate",
            "--checkpoint",
            checkpoint,
            "--prompt",
            "ab",
            "--tokens",
            "12",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ])
    };
    assert_eq!(greedy(p), greedy(t));
    let data = dir.join("data.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog. ".repeat(4)).unwrap();
    let eval = |checkpoint: &str| {
        let output = run(&[
            "eval",
            "--checkpoint",
            checkpoint,
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let loss = output
            .split("loss ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap();
        let loss: f64 = loss.parse().unwrap();
        (loss, output)
    };
    let ((a, text_a), (b, text_b)) = (eval(t), eval(p));
    assert!((a - b).abs() <= 1e-4 * a.abs(), "eval: {text_a} vs {text_b}");

    let refused = tessera(&["export", "--checkpoint", t, "--out", p]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--packed"));
    let dense = dir.join("dense");
    std::fs::create_dir_all(&dense).unwrap();
    GptParams::init(&config(Family::Gpt2, 256), &Device::Cpu, 1)
        .unwrap()
        .save(dense.join("model.safetensors"))
        .unwrap();
    let refused = tessera(&[
        "export",
        "--packed",
        "--checkpoint",
        dense.to_str().unwrap(),
        "--out",
        p,
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no binary"));

    let config_file = dir.join("binary.toml");
    std::fs::write(
        &config_file,
        "[model]\nlayers = 2\nheads = 2\nkv_heads = 2\nwidth = 32\nffn_width = 64\ncontext = 16\n\n[model.linears.default]\nvariant = \"binary\"\n",
    )
    .unwrap();
    let info = run(&["info", "--config", config_file.to_str().unwrap()]);
    assert!(info.contains("at inference"), "{info}");
    std::fs::remove_dir_all(&dir).unwrap();
}
