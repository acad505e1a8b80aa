//! The GPT and its trainer: the loss against an independent f64 model, every gradient against
//! that model's finite differences, in both families (GPT-2: LayerNorm, GELU, learned positions,
//! fused c_attn, tied head; Llama: RMSNorm, SwiGLU, RoPE, grouped queries, untied head);
//! training that lowers the loss, is bit-for-bit repeatable, resumes exactly and stops cleanly
//! on NaN; and the GPU against the CPU.

#[macro_use]
mod common;
#[path = "common/gpt_reference.rs"]
mod reference;

use rand::Rng;
use std::path::PathBuf;
use tessera::model::{Activation, Attention, Family, Gpt, GptConfig, GptParams, Norm, Positions};
use tessera::train::trainer::{TrainOptions, Trainer};
use tessera::train::Corpus;
use tessera::{DType, Device, Error, Tensor};

fn small(family: Family) -> GptConfig {
    let gpt2 = family == Family::Gpt2;
    GptConfig {
        family,
        vocab: 19,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        width: 32,
        ffn_width: 40,
        context: 8,
        norm: if gpt2 { Norm::LayerNorm } else { Norm::RmsNorm },
        norm_eps: 1e-5,
        activation: if gpt2 { Activation::Gelu } else { Activation::SwiGlu },
        positions: if gpt2 {
            Positions::Learned
        } else {
            Positions::Rope {
                bases: vec![10000.0, 500.0],
            }
        },
        tied_embeddings: gpt2,
        attention: Attention::Causal,
        wavelet: false,
    }
}

/// Parameters with every value random (biases and gains included, so that each one matters).
fn random_params(config: &GptConfig, device: &Device, rng: &mut impl Rng) -> GptParams {
    let mut params = GptParams::init(config, device, 1).unwrap();
    for p in &mut params.params {
        let n: usize = p.spec.shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let v = rng.random_range(-0.4f32..0.4);
                if p.spec.name.ends_with("norm.weight")
                    || p.spec.name.contains("ln_") && p.spec.name.ends_with(".weight")
                {
                    1.0 + v
                } else {
                    v
                }
            })
            .collect();
        p.value = Tensor::from_vec(values.clone(), &p.spec.shape, device).unwrap();
        if let Some(compute) = &mut p.compute {
            let bf16: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            *compute = Tensor::from_vec(bf16, &p.spec.shape, device).unwrap();
        }
    }
    params
}

fn weights(params: &GptParams) -> reference::Weights {
    params
        .params
        .iter()
        .map(|p| {
            let values = p.value.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect();
            (p.spec.name.clone(), values)
        })
        .collect()
}

fn grad_f64(tensor: &Tensor) -> Vec<f64> {
    match tensor.dtype() {
        DType::F32 => tensor.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect(),
        DType::BF16 => tensor
            .to_vec::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f64())
            .collect(),
        other => panic!("unexpected gradient dtype {other}"),
    }
}

fn gradients_match_finite_differences(device: &Device, config: GptConfig) {
    let mut rng = common::rng();
    let family = config.family;
    let (batch, seq) = (2, 7);
    let params = random_params(&config, device, &mut rng);
    let inputs: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..config.vocab as u32))
        .collect();
    let targets: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..config.vocab as u32))
        .collect();
    let w = weights(&params);
    let mut model = Gpt::new(params, batch, seq).unwrap();
    model.params.zero_grads().unwrap();
    let loss = model.forward_backward(&inputs, &targets, batch, seq, 1.0).unwrap() as f64;
    let expected = reference::loss(&config, &w, &inputs, &targets, batch, seq);
    // f32 on the CPU; bf16 activations and weights on a GPU.
    let (loss_tolerance, grad_tolerance) = if device.is_cuda() { (2e-2, 6e-2) } else { (1e-5, 2e-3) };
    assert!(
        ((loss - expected) / expected).abs() < loss_tolerance,
        "{family:?}: loss {loss} vs the f64 reference {expected}"
    );

    // Every tensor's gradient at a few random entries, by central differences of the reference.
    let h = 1e-5;
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for p in &model.params.params {
        let grad = grad_f64(&p.grad);
        let picks = 6.min(grad.len());
        for _ in 0..picks {
            let i = rng.random_range(0..grad.len());
            let mut plus = w.clone();
            plus.get_mut(&p.spec.name).unwrap()[i] += h;
            let mut minus = w.clone();
            minus.get_mut(&p.spec.name).unwrap()[i] -= h;
            let fd = (reference::loss(&config, &plus, &inputs, &targets, batch, seq)
                - reference::loss(&config, &minus, &inputs, &targets, batch, seq))
                / (2.0 * h);
            assert!(grad[i].is_finite(), "{}[{i}] gradient is {}", p.spec.name, grad[i]);
            diff += (grad[i] - fd).powi(2);
            norm += fd * fd;
            let scale = fd.abs().max(1e-2);
            assert!(
                (grad[i] - fd).abs() <= 10.0 * grad_tolerance * scale,
                "{}[{i}]: gradient {} vs finite difference {fd}",
                p.spec.name,
                grad[i]
            );
        }
    }
    let relative = (diff / norm).sqrt();
    assert!(relative < grad_tolerance, "relative gradient error {relative}");
}

fn gpt2_gradients(device: &Device) {
    gradients_match_finite_differences(device, small(Family::Gpt2));
}

fn llama_gradients(device: &Device) {
    gradients_match_finite_differences(device, small(Family::Llama));
}

/// WaveletGPT's mixing between blocks, with a sliding-window mask.
fn wavelet_window_gradients(device: &Device) {
    let config = GptConfig {
        wavelet: true,
        attention: Attention::Window { size: 3 },
        ..small(Family::Gpt2)
    };
    gradients_match_finite_differences(device, config);
}

/// LM-Infinite's Λ mask with the distance ceiling on RoPE, and wavelet mixing.
fn lambda_gradients(device: &Device) {
    let config = GptConfig {
        attention: Attention::Lambda { global: 1, window: 2 },
        wavelet: true,
        ..small(Family::Llama)
    };
    gradients_match_finite_differences(device, config);
}

fn options(steps: u64) -> TrainOptions {
    TrainOptions {
        batch: 4,
        seq: 8,
        steps,
        warmup: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        eval_every: 0,
        eval_windows: 4,
        ..TrainOptions::tiny()
    }
}

fn corpus() -> Corpus {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    Corpus::from_bytes("test", text.as_bytes()).unwrap()
}

fn byte_config() -> GptConfig {
    GptConfig {
        vocab: 256,
        ..small(Family::Gpt2)
    }
}

fn losses(trainer: &mut Trainer, corpus: &Corpus, steps: u64) -> Vec<f32> {
    (0..steps).map(|_| trainer.train_step(corpus).unwrap().loss).collect()
}

fn training_lowers_the_loss_repeatably(device: &Device) {
    let corpus = corpus();
    let fast = TrainOptions {
        lr: 1e-2,
        min_lr: 1e-3,
        ..options(60)
    };
    let mut first = Trainer::new(&byte_config(), fast.clone(), device).unwrap();
    let a = losses(&mut first, &corpus, 60);
    let mut second = Trainer::new(&byte_config(), fast, device).unwrap();
    let b = losses(&mut second, &corpus, 60);
    assert_eq!(a, b, "the same seed on the same device gives the same losses");
    let start = a[..3].iter().sum::<f32>() / 3.0;
    let end = a[57..].iter().sum::<f32>() / 3.0;
    assert!(end < 0.55 * start, "loss went from {start} to {end}");
    let validation = first.validate(&corpus).unwrap();
    assert!(validation < corpus.unigram_loss(256) as f32, "validation {validation}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn resume_equals_uninterrupted(device: &Device) {
    let corpus = corpus();
    let mut straight = Trainer::new(&byte_config(), options(8), device).unwrap();
    let expected = losses(&mut straight, &corpus, 8);
    let dir = scratch(if device.is_cuda() { "resume-gpu" } else { "resume-cpu" });
    let mut first = Trainer::new(&byte_config(), options(8), device).unwrap();
    let mut got = losses(&mut first, &corpus, 3);
    first.save(&dir).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&dir, device).unwrap();
    assert_eq!(resumed.step(), 3);
    got.extend(losses(&mut resumed, &corpus, 5));
    assert_eq!(got, expected);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn nan_stops_training_and_keeps_the_checkpoint(device: &Device) {
    let corpus = corpus();
    let dir = scratch(if device.is_cuda() { "nan-gpu" } else { "nan-cpu" });
    let mut trainer = Trainer::new(&byte_config(), options(8), device).unwrap();
    losses(&mut trainer, &corpus, 2);
    let saved = trainer.save(&dir).unwrap();
    let before = std::fs::read(saved.join("model.safetensors")).unwrap();
    let p = &mut trainer.model.params.params[0];
    let n = p.value.numel();
    p.value = Tensor::from_vec(vec![f32::NAN; n], &p.spec.shape, device).unwrap();
    if let Some(compute) = &mut p.compute {
        *compute = Tensor::from_vec(vec![half::bf16::NAN; n], &p.spec.shape, device).unwrap();
    }
    match trainer.train_step(&corpus) {
        Err(Error::Diverged(message)) => assert!(message.contains("step 3"), "{message}"),
        other => panic!("expected a divergence error, got {:?}", other.map(|r| r.loss)),
    }
    assert_eq!(trainer.step(), 2, "the failed step is not counted");
    assert_eq!(std::fs::read(saved.join("model.safetensors")).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bad_batches_are_errors(device: &Device) {
    let params = GptParams::init(&small(Family::Gpt2), device, 3).unwrap();
    let mut model = Gpt::new(params, 2, 4).unwrap();
    let tokens = vec![1u32; 8];
    common::assert_invalid(
        model.loss(&tokens, &tokens, 2, 9),
        "Gpt",
        "batch shape",
        &["context (8)"],
    );
    common::assert_invalid(model.loss(&tokens[..7], &tokens, 2, 4), "Gpt", "inputs", &["8 tokens"]);
    let bad = vec![19u32; 8];
    common::assert_invalid(
        model.loss(&bad, &tokens, 2, 4),
        "Gpt",
        "inputs",
        &["below the vocabulary (19)"],
    );
    common::assert_invalid(model.loss(&tokens, &bad, 2, 4), "Gpt", "targets", &["(19)"]);
    // A refused call leaves the model usable.
    assert!(model.loss(&tokens, &tokens, 2, 4).unwrap().is_finite());
}

on_each_device!(
    gpt2_gradients,
    llama_gradients,
    wavelet_window_gradients,
    lambda_gradients,
    training_lowers_the_loss_repeatably,
    resume_equals_uninterrupted,
    nan_stops_training_and_keeps_the_checkpoint,
    bad_batches_are_errors,
);

/// Ten training steps on the GPU (bf16) follow the CPU's (f32) to bf16 tolerance.
#[test]
fn gpu_training_follows_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let corpus = corpus();
    let mut cpu = Trainer::new(&byte_config(), options(10), &Device::Cpu).unwrap();
    let mut on_gpu = Trainer::new(&byte_config(), options(10), &gpu).unwrap();
    let (a, b) = (losses(&mut cpu, &corpus, 10), losses(&mut on_gpu, &corpus, 10));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 3e-2 * x.abs(),
            "step {}: CPU loss {x}, GPU loss {y}",
            step + 1
        );
    }
}
