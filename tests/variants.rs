//! Per-layer linear variants in the GPT: their configuration (JSON, TOML, validation), and the
//! masked variants (`nm`, `unstructured`) against the dense model whose weights are the masked
//! weights, their fixed masks through training, densifying, checkpoints and resuming, and the GPU
//! against the CPU.

#[macro_use]
mod common;
#[path = "common/gpt_reference.rs"]
mod reference;

use rand::Rng;
use std::path::PathBuf;
use tessera::model::params::{config_json, linear_summary, mask_name, parse_config_json, Layout};
use tessera::model::{
    Activation, Attention, Family, Gpt, GptConfig, GptParams, LinearSpec, LinearVariants, LoraSpec, Norm, Positions,
    SafeTensors, Variant,
};
use tessera::train::config::{configuration, run_configuration};
use tessera::train::trainer::{TrainOptions, Trainer};
use tessera::train::Corpus;
use tessera::{DType, Device, Tensor};

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
            Positions::Rope { bases: vec![10000.0] }
        },
        tied_embeddings: gpt2,
        attention: Attention::Causal,
        wavelet: false,
    }
}

fn nm(prune_step: u64) -> LinearSpec {
    LinearSpec {
        variant: Variant::Nm { n: 2, m: 4, prune_step },
        lora: None,
    }
}

fn unstructured(density: f64) -> LinearSpec {
    LinearSpec {
        variant: Variant::Unstructured { density, seed: 11 },
        lora: None,
    }
}

/// Unstructured attention, 2:4 MLP.
fn mixed(prune_step: u64) -> LinearVariants {
    LinearVariants {
        default: unstructured(0.5),
        overrides: vec![("mlp".into(), nm(prune_step))],
    }
}

#[test]
fn variants_round_trip_through_json_and_dense_stays_unchanged() {
    let variants = LinearVariants {
        default: unstructured(0.25),
        overrides: vec![
            ("attention".into(), nm(3)),
            (
                "h.1.mlp.c_proj".into(),
                LinearSpec {
                    variant: Variant::Dense,
                    lora: Some(LoraSpec {
                        rank: 4,
                        alpha: 8.0,
                        frozen_base: true,
                    }),
                },
            ),
            (
                "up".into(),
                LinearSpec {
                    variant: Variant::SparseLowRank {
                        rank: 8,
                        density: 0.03,
                        alpha: 32.0,
                        seed: 5,
                    },
                    lora: None,
                },
            ),
            (
                "c_fc".into(),
                LinearSpec {
                    variant: Variant::Binary,
                    lora: None,
                },
            ),
        ],
    };
    let config = small(Family::Gpt2);
    let text = config_json(&config, &variants);
    assert_eq!(parse_config_json(&text).unwrap(), (config.clone(), variants));
    // All dense: the JSON is the configuration's own, and one without `linears` is all dense.
    assert_eq!(config_json(&config, &LinearVariants::dense()), config.to_json());
    assert_eq!(
        parse_config_json(&config.to_json()).unwrap(),
        (config, LinearVariants::dense())
    );
}

#[test]
fn selectors_pick_layers_by_kind_group_and_name() {
    let variants = LinearVariants {
        default: unstructured(0.5),
        overrides: vec![
            ("mlp".into(), nm(0)),
            ("k_proj".into(), LinearSpec::DENSE),
            ("layers.1.mlp.down_proj".into(), LinearSpec::DENSE),
        ],
    };
    let layers = linear_summary(&small(Family::Llama), &variants).unwrap();
    let variant_of = |name: &str| layers.iter().find(|l| l.name == name).unwrap().spec.variant.name();
    assert_eq!(variant_of("model.layers.0.self_attn.q_proj"), "unstructured");
    assert_eq!(variant_of("model.layers.0.self_attn.k_proj"), "dense");
    assert_eq!(variant_of("model.layers.1.self_attn.k_proj"), "dense");
    assert_eq!(variant_of("model.layers.0.mlp.gate_proj"), "nm");
    assert_eq!(variant_of("model.layers.0.mlp.down_proj"), "nm");
    assert_eq!(variant_of("model.layers.1.mlp.down_proj"), "dense");
    let q = layers
        .iter()
        .find(|l| l.name == "model.layers.0.self_attn.q_proj")
        .unwrap();
    assert_eq!((q.parameters, q.kept), (32 * 32, 512));
    assert_eq!(q.bytes, 4 * 32 * 32 + 4 * 32);
    // GPT-2's `c_proj` is in attention and in the MLP: the group decides.
    let gpt2 = LinearVariants {
        default: LinearSpec::DENSE,
        overrides: vec![("attn.c_proj".into(), nm(0))],
    };
    let layers = linear_summary(&small(Family::Gpt2), &gpt2).unwrap();
    let nm_layers: Vec<&str> = layers
        .iter()
        .filter(|l| l.spec.variant.name() == "nm")
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(
        nm_layers,
        ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    );
}

#[test]
fn bad_variants_are_errors_naming_the_field() {
    let config = small(Family::Gpt2);
    let check = |variants: LinearVariants, arg: &str, needles: &[&str]| {
        let error = GptParams::init_with_variants(&config, &variants, &Device::Cpu, 1)
            .map(|_| ())
            .unwrap_err();
        common::assert_invalid::<()>(Err(error), "LinearVariants", arg, needles);
    };
    // The MLP's 40-wide layers do not split into groups of 16.
    check(
        LinearVariants::all(LinearSpec {
            variant: Variant::Nm {
                n: 2,
                m: 16,
                prune_step: 0,
            },
            lora: None,
        }),
        "nm.m",
        &["mlp.c_fc", "-> 40"],
    );
    check(
        LinearVariants::all(unstructured(0.0)),
        "unstructured.density",
        &["(0, 1]"],
    );
    check(LinearVariants::all(unstructured(1.5)), "unstructured.density", &["1.5"]);
    check(
        LinearVariants {
            default: LinearSpec::DENSE,
            overrides: vec![("c_fcc".into(), nm(0))],
        },
        "overrides.select",
        &["`c_fcc`"],
    );
    check(
        LinearVariants::all(LinearSpec {
            variant: Variant::Dense,
            lora: Some(LoraSpec {
                rank: 0,
                alpha: 1.0,
                frozen_base: false,
            }),
        }),
        "lora.rank",
        &["between 1"],
    );
    check(
        LinearVariants::all(LinearSpec {
            variant: Variant::Dense,
            lora: Some(LoraSpec {
                rank: 65,
                alpha: 1.0,
                frozen_base: false,
            }),
        }),
        "lora.rank",
        &["64", "65"],
    );
    let error = GptParams::init_with_variants(
        &config,
        &LinearVariants::all(LinearSpec {
            variant: Variant::Nm {
                n: 3,
                m: 2,
                prune_step: 0,
            },
            lora: None,
        }),
        &Device::Cpu,
        1,
    )
    .map(|_| ())
    .unwrap_err();
    assert!(error.to_string().contains("NmPattern::new"), "{error}");
    check(
        LinearVariants::all(LinearSpec {
            variant: Variant::SparseLowRank {
                rank: 33,
                density: 0.1,
                alpha: 8.0,
                seed: 0,
            },
            lora: None,
        }),
        "sparse_low_rank.rank",
        &["33"],
    );
    let json = config.to_json().replace(
        "\"wavelet\"",
        "\"linears\": {\"default\": {\"variant\": \"nm\", \"n\": 2}}, \"wavelet\"",
    );
    common::assert_invalid(parse_config_json(&json), "LinearVariants", "m", &["nothing"]);
    let json = config.to_json().replace(
        "\"wavelet\"",
        "\"linears\": {\"default\": {\"variant\": \"sparse\"}}, \"wavelet\"",
    );
    common::assert_invalid(parse_config_json(&json), "LinearVariants", "variant", &["\"sparse\""]);
    let json = config.to_json().replace(
        "\"wavelet\"",
        "\"linears\": {\"default\": {\"variant\": \"dense\", \"density\": 0.5}}, \"wavelet\"",
    );
    common::assert_invalid(parse_config_json(&json), "LinearVariants", "linears", &["`density`"]);
}

#[test]
fn toml_model_table_sets_the_variants() {
    let toml = r#"
[model]
layers = 2

[model.linears.default]
variant = "unstructured"
density = 0.5
seed = 7

[[model.linears.overrides]]
select = "mlp"
variant = "nm"
n = 2
m = 4
prune_step = 10

[[model.linears.overrides]]
select = "h.1.attn.c_attn"
variant = "dense"
"#;
    let (config, variants, _) = run_configuration("tiny", Some(toml)).unwrap();
    assert_eq!(config.layers, 2);
    assert_eq!(
        variants,
        LinearVariants {
            default: LinearSpec {
                variant: Variant::Unstructured { density: 0.5, seed: 7 },
                lora: None,
            },
            overrides: vec![("mlp".into(), nm(10)), ("h.1.attn.c_attn".into(), LinearSpec::DENSE)],
        }
    );
    // The two-value form refuses what it would drop.
    common::assert_invalid(
        configuration("tiny", Some(toml)),
        "train configuration",
        "toml",
        &["linears"],
    );
    let (_, variants, _) = run_configuration("tiny", Some("[model]\nlayers = 2\n")).unwrap();
    assert!(variants.is_dense());
    let typo = "[model.linears.default]\nvariant = \"nm\"\nn = 2\nm = 4\nprune = 3\n";
    common::assert_invalid(
        run_configuration("tiny", Some(typo)),
        "LinearVariants",
        "linears",
        &["`prune`"],
    );
}

/// `params`' every value random in ±0.4 (gains around 1), through `set_value`, which masks.
fn randomise(params: &mut GptParams, rng: &mut impl Rng) {
    for index in 0..params.params.len() {
        if params.sltrain.contains_key(&index) {
            continue;
        }
        let spec = &params.params[index].spec;
        let gain = spec.name.ends_with("norm.weight") || spec.name.contains("ln_") && spec.name.ends_with(".weight");
        let n: usize = spec.shape.iter().product();
        let values = (0..n)
            .map(|_| rng.random_range(-0.4f32..0.4) + if gain { 1.0 } else { 0.0 })
            .collect();
        params.set_value(index, values).unwrap();
    }
}

/// Dense parameters with `params`' values (adapters left out).
fn dense_twin(params: &GptParams) -> GptParams {
    let mut dense = GptParams::init(&params.config, &params.device, 1).unwrap();
    for index in 0..dense.params.len() {
        let name = dense.params[index].spec.name.clone();
        let value = params.get(&name).unwrap().value.to_vec::<f32>().unwrap();
        dense.set_value(index, value).unwrap();
    }
    dense
}

fn kept(params: &GptParams, index: usize) -> Vec<u8> {
    params.masks[&index].mask.to_u8().unwrap().to_vec::<u8>().unwrap()
}

fn batch(config: &GptConfig, rng: &mut impl Rng, tokens: usize) -> (Vec<u32>, Vec<u32>) {
    let draw = |rng: &mut dyn rand::RngCore| {
        (0..tokens)
            .map(|_| rng.random_range(0..config.vocab as u32))
            .collect::<Vec<_>>()
    };
    (draw(rng), draw(rng))
}

/// Loss and gradients of `params` on one batch.
fn loss_and_grads(params: GptParams, inputs: &[u32], targets: &[u32]) -> (f32, Vec<Vec<f32>>, GptParams) {
    let (b, s) = (2, inputs.len() / 2);
    let mut model = Gpt::new(params, b, s).unwrap();
    model.params.zero_grads().unwrap();
    let loss = model.forward_backward(inputs, targets, b, s, 1.0).unwrap();
    let grads = model
        .params
        .params
        .iter()
        .map(|p| p.grad.to_vec::<f32>().unwrap())
        .collect();
    let params = model.params;
    (loss, grads, params)
}

/// The masked model's loss and gradients are the dense model's, on the masked weights, with the
/// masked weights' gradients masked: bit for bit, since both run the same products.
fn assert_equals_dense_twin(params: GptParams, inputs: &[u32], targets: &[u32], label: &str) {
    let dense = dense_twin(&params);
    let (loss, grads, params) = loss_and_grads(params, inputs, targets);
    let (dense_loss, dense_grads, _) = loss_and_grads(dense, inputs, targets);
    assert!(loss.is_finite());
    assert_eq!(
        loss.to_bits(),
        dense_loss.to_bits(),
        "{label}: loss {loss} vs dense {dense_loss}"
    );
    for (index, (got, want)) in grads.iter().zip(&dense_grads).enumerate() {
        let name = &params.params[index].spec.name;
        let want: Vec<f32> = match params.masks.get(&index) {
            Some(_) => want
                .iter()
                .zip(kept(&params, index))
                .map(|(&g, k)| if k == 1 { g } else { 0.0 })
                .collect(),
            None => want.clone(),
        };
        assert!(
            got.iter().all(|g| g.is_finite()),
            "{label}: {name} has a non-finite gradient"
        );
        assert_eq!(got, &want, "{label}: gradient of {name}");
    }
}

fn unstructured_equals_dense_on_masked_weights(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let variants = LinearVariants::all(unstructured(0.3));
        let mut params = GptParams::init_with_variants(&config, &variants, device, 5).unwrap();
        assert_eq!(params.masks.len(), params.layout.linears().len());
        randomise(&mut params, &mut rng);
        for (&index, mask) in &params.masks {
            let numel = params.params[index].value.numel();
            assert_eq!(mask.mask.pruned_count(), (0.7 * numel as f64).round() as usize);
            let values = params.params[index].value.to_vec::<f32>().unwrap();
            let kept = kept(&params, index);
            assert!(values.iter().zip(&kept).all(|(&v, &k)| (k == 1) == (v != 0.0)));
        }
        let (inputs, targets) = batch(&config, &mut rng, 14);
        assert_equals_dense_twin(params, &inputs, &targets, &format!("{family:?} unstructured"));
    }
}

/// A 2:4 mask along both dimensions (rows `4a, 4a+1` keep columns `4b, 4b+1`, rows `4a+2, 4a+3`
/// keep `4b+2, 4b+3`): the double-pruned weight is the pruned weight itself, so the model is the
/// dense one exactly. Values make the magnitudes choose that mask.
fn nm_with_a_two_way_pattern_equals_dense(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let mut params = GptParams::init_with_variants(&config, &LinearVariants::all(nm(4)), device, 5).unwrap();
        assert!(params.masks.is_empty(), "pruned at step 4, not before");
        randomise(&mut params, &mut rng);
        let weights: Vec<usize> = params.layout.linears().iter().map(|l| l.weight).collect();
        let mut expected = Vec::new();
        for &index in &weights {
            let shape = params.params[index].spec.shape.clone();
            let (rows, cols) = (shape[0], shape[1]);
            let pattern: Vec<u8> = (0..rows * cols)
                .map(|i| u8::from((i / cols % 4 < 2) == (i % cols % 4 < 2)))
                .collect();
            let values = pattern
                .iter()
                .map(|&k| {
                    let magnitude = if k == 1 {
                        rng.random_range(0.2f32..0.4)
                    } else {
                        rng.random_range(0.0f32..0.1)
                    };
                    if rng.random_bool(0.5) {
                        magnitude
                    } else {
                        -magnitude
                    }
                })
                .collect();
            params.set_value(index, values).unwrap();
            expected.push(pattern);
        }
        assert_eq!(params.prune_due(3).unwrap(), 0);
        assert_eq!(params.prune_due(4).unwrap(), weights.len());
        assert_eq!(params.prune_due(4).unwrap(), 0, "a mask is chosen once");
        for (&index, pattern) in weights.iter().zip(&expected) {
            assert_eq!(&kept(&params, index), pattern, "{}", params.params[index].spec.name);
        }
        let (inputs, targets) = batch(&config, &mut rng, 14);
        assert_equals_dense_twin(params, &inputs, &targets, &format!("{family:?} two-way 2:4"));
    }
}

/// `values` (rows, cols) pruned N:M along dimension 0 (columns) or 1 (rows) by magnitude, lower
/// index first on ties.
fn prune_naive(values: &[f32], rows: usize, cols: usize, n: usize, m: usize, along_rows: bool) -> Vec<f32> {
    let mut out = values.to_vec();
    let (lines, length) = if along_rows { (rows, cols) } else { (cols, rows) };
    let at = |line: usize, i: usize| if along_rows { line * cols + i } else { i * cols + line };
    for line in 0..lines {
        for group in (0..length).step_by(m) {
            for i in group..group + m {
                let beaten = (group..group + m)
                    .filter(|&j| {
                        let (a, b) = (values[at(line, j)].abs(), values[at(line, i)].abs());
                        a > b || (a == b && j < i)
                    })
                    .count();
                if beaten >= n {
                    out[at(line, i)] = 0.0;
                }
            }
        }
    }
    out
}

/// With random weights the input gradient goes through the double-pruned weight: the loss and the
/// gradients of the last layer's weight are the dense model's, those upstream are not.
fn nm_input_gradient_goes_through_the_double_pruned_weight(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let variants = LinearVariants::all(nm(1));
        let mut params = GptParams::init_with_variants(&config, &variants, device, 5).unwrap();
        randomise(&mut params, &mut rng);
        params.prune_due(1).unwrap();
        let linears: Vec<_> = params.layout.linears().into_iter().copied().collect();
        for linear in &linears {
            let p = &params.params[linear.weight];
            let (rows, cols) = (p.spec.shape[0], p.spec.shape[1]);
            let input_major = linear.layout == Layout::InputMajor;
            let values = p.value.to_vec::<f32>().unwrap();
            // Groups along the input dimension: the rows of an (out, in) weight, the columns of
            // an (in, out) one; the double pruning runs along the other dimension.
            let pruned = prune_naive(&values, rows, cols, 2, 4, !input_major);
            assert_eq!(values, pruned, "{}: pruned 2:4 along the input", p.spec.name);
            let double = prune_naive(&values, rows, cols, 2, 4, input_major);
            let mask = &params.masks[&linear.weight];
            let double_pruned = mask.double_pruned.as_ref().unwrap();
            let got: Vec<f32> = match double_pruned.dtype() {
                DType::F32 => double_pruned.to_vec::<f32>().unwrap(),
                _ => double_pruned
                    .to_vec::<half::bf16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            };
            let want: Vec<f32> = if device.is_cuda() {
                double.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
            } else {
                double
            };
            assert_eq!(got, want, "{}: double-pruned weight", p.spec.name);
            let density = want.iter().filter(|&&v| v != 0.0).count() as f64 / want.len() as f64;
            assert!(density < 0.5, "{}: double-pruned density {density}", p.spec.name);
        }
        let (inputs, targets) = batch(&config, &mut rng, 14);
        let dense = dense_twin(&params);
        let last_down = params.layout.blocks.last().unwrap().down.weight;
        let first_norm = params.layout.blocks[0].norm1.weight;
        let (loss, grads, params) = loss_and_grads(params, &inputs, &targets);
        let (dense_loss, dense_grads, _) = loss_and_grads(dense, &inputs, &targets);
        assert_eq!(loss.to_bits(), dense_loss.to_bits(), "{family:?}: loss");
        let masked: Vec<f32> = dense_grads[last_down]
            .iter()
            .zip(kept(&params, last_down))
            .map(|(&g, k)| if k == 1 { g } else { 0.0 })
            .collect();
        assert_eq!(grads[last_down], masked, "{family:?}: last down projection's gradient");
        assert_ne!(
            grads[first_norm], dense_grads[first_norm],
            "{family:?}: upstream gradients see the double pruning"
        );
    }
}

fn options(steps: u64) -> TrainOptions {
    TrainOptions {
        batch: 4,
        seq: 8,
        steps,
        warmup: 2,
        lr: 1e-2,
        min_lr: 1e-3,
        weight_decay: 0.1,
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

/// Masks, pruned weights and pruned moments of every masked layer.
fn masked_state(params: &GptParams) -> Vec<(Vec<u8>, bool)> {
    params
        .masks
        .keys()
        .map(|&index| {
            let p = &params.params[index];
            let kept = kept(params, index);
            let zero_where_pruned = [&p.value, &p.exp_avg, &p.exp_avg_sq, &p.grad].iter().all(|t| {
                t.to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .zip(&kept)
                    .all(|(&v, &k)| k == 1 || v.to_bits() == 0)
            });
            (kept, zero_where_pruned)
        })
        .collect()
}

fn masks_stay_fixed_and_pruned_weights_zero_until_densified(device: &Device) {
    let corpus = corpus();
    for family in [Family::Gpt2, Family::Llama] {
        let config = GptConfig {
            vocab: 256,
            ..small(family)
        };
        let mut trainer = Trainer::with_variants(&config, &mixed(0), options(12), device).unwrap();
        let start = masked_state(&trainer.model.params);
        assert_eq!(start.len(), trainer.model.params.layout.linears().len());
        let weights: Vec<usize> = trainer.model.params.masks.keys().copied().collect();
        let initial: Vec<Vec<f32>> = weights
            .iter()
            .map(|&i| trainer.model.params.params[i].value.to_vec::<f32>().unwrap())
            .collect();
        let mut losses = Vec::new();
        for _ in 0..6 {
            losses.push(trainer.train_step(&corpus).unwrap().loss);
            let now = masked_state(&trainer.model.params);
            for ((kept, zero), (kept0, _)) in now.iter().zip(&start) {
                assert_eq!(kept, kept0, "{family:?}: a mask changed");
                assert!(zero, "{family:?}: a pruned weight, moment or gradient is not exactly 0");
            }
        }
        assert!(losses[5] < losses[0], "{family:?}: {losses:?}");
        for (&index, before) in weights.iter().zip(&initial) {
            let after = trainer.model.params.params[index].value.to_vec::<f32>().unwrap();
            assert_ne!(&after, before, "kept weights train");
        }
        trainer.model.params.densify();
        assert!(trainer.model.params.masks.is_empty());
        trainer.train_step(&corpus).unwrap();
        for (k, &index) in weights.iter().enumerate() {
            let after = trainer.model.params.params[index].value.to_vec::<f32>().unwrap();
            let revived = after
                .iter()
                .zip(&start[k].0)
                .filter(|(&v, &kept)| kept == 0 && v != 0.0)
                .count();
            let pruned = start[k].0.iter().filter(|&&kept| kept == 0).count();
            assert!(
                revived > pruned / 2,
                "{family:?}: after densifying, {revived} of {pruned} pruned weights moved"
            );
        }
    }
}

fn nm_prunes_at_its_step_then_keeps_the_mask(device: &Device) {
    let corpus = corpus();
    let variants = LinearVariants::all(nm(3));
    let mut trainer = Trainer::with_variants(&byte_config(), &variants, options(8), device).unwrap();
    for _ in 0..2 {
        trainer.train_step(&corpus).unwrap();
        assert!(trainer.model.params.masks.is_empty());
    }
    trainer.train_step(&corpus).unwrap();
    let pruned = masked_state(&trainer.model.params);
    assert_eq!(pruned.len(), trainer.model.params.layout.linears().len());
    // The mask is that of the magnitudes after step 3's update.
    for &index in trainer.model.params.masks.keys() {
        let p = &trainer.model.params.params[index];
        let kept = kept(&trainer.model.params, index);
        let (rows, cols) = (p.spec.shape[0], p.spec.shape[1]);
        let per_group = |along_rows: bool| {
            let lines = if along_rows { rows } else { cols };
            let length = if along_rows { cols } else { rows };
            (0..lines).all(|line| {
                (0..length).step_by(4).all(|g| {
                    (g..g + 4)
                        .filter(|&i| kept[if along_rows { line * cols + i } else { i * cols + line }] == 1)
                        .count()
                        == 2
                })
            })
        };
        // GPT-2's (in, out) weights group their inputs down each column.
        assert!(per_group(false), "{}: 2 of every 4 inputs kept", p.spec.name);
    }
    for _ in 3..8 {
        trainer.train_step(&corpus).unwrap();
        let now = masked_state(&trainer.model.params);
        for ((kept, zero), (kept0, _)) in now.iter().zip(&pruned) {
            assert_eq!(kept, kept0);
            assert!(zero);
        }
    }
}

fn scratch(name: &str, device: &Device) -> PathBuf {
    let kind = if device.is_cuda() { "gpu" } else { "cpu" };
    let dir = std::env::temp_dir().join(format!("tessera-variants-{name}-{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn checkpoints_keep_masks_and_resume_exactly(device: &Device) {
    let corpus = corpus();
    let variants = mixed(2);
    let run = |steps: u64| {
        let mut t = Trainer::with_variants(&byte_config(), &variants, options(8), device).unwrap();
        let losses: Vec<f32> = (0..steps).map(|_| t.train_step(&corpus).unwrap().loss).collect();
        (t, losses)
    };
    let (straight, expected) = run(8);
    // Saved after the nm layers were pruned (step 2), and before (step 1).
    for saved_at in [1, 3] {
        let dir = scratch(&format!("resume-{saved_at}"), device);
        let (first, mut got) = run(saved_at);
        let saved = first.save(&dir).unwrap();
        let file = SafeTensors::load(saved.join("model.safetensors")).unwrap();
        let masks = first.model.params.masks.len();
        let names: Vec<String> = file
            .names()
            .filter(|n| n.ends_with(".mask"))
            .map(String::from)
            .collect();
        assert_eq!(names.len(), masks);
        let config = file.metadata().get("tessera.config").unwrap();
        assert_eq!(parse_config_json(config).unwrap().1, variants);
        drop(first);
        let mut resumed = Trainer::resume(&dir, device).unwrap();
        assert_eq!(resumed.model.params.variants, variants);
        assert_eq!(resumed.model.params.masks.len(), masks);
        got.extend((saved_at..8).map(|_| resumed.train_step(&corpus).unwrap().loss));
        assert_eq!(got, expected, "saved at step {saved_at}");
        assert_eq!(
            masked_state(&resumed.model.params),
            masked_state(&straight.model.params)
        );
        for (a, b) in resumed.model.params.params.iter().zip(&straight.model.params.params) {
            assert_eq!(common::bytes(&a.value), common::bytes(&b.value), "{}", a.spec.name);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A densified model saves no masks and loads dense.
    let dir = scratch("densified", device);
    let (mut trainer, _) = run(3);
    trainer.model.params.densify();
    trainer.save(&dir).unwrap();
    let resumed = Trainer::resume(&dir, device).unwrap();
    assert!(resumed.model.params.masks.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_masks_are_file_errors() {
    let config = small(Family::Llama);
    let params =
        GptParams::init_with_variants(&config, &LinearVariants::all(unstructured(0.5)), &Device::Cpu, 3).unwrap();
    let dir = scratch("corrupt", &Device::Cpu);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let name = mask_name("model.layers.0.self_attn.q_proj.weight");
    assert_eq!(name, "tessera.model.layers.0.self_attn.q_proj.mask");
    let values: Vec<(&str, &Tensor)> = params.params.iter().map(|p| (p.spec.name.as_str(), &p.value)).collect();
    let metadata = std::collections::BTreeMap::from([("tessera.config".to_string(), params.config_json())]);
    // A 32-column weight's bitmask is one word per row.
    let wrong_shape = Tensor::from_vec(vec![u32::MAX; 64], &[32, 2], &Device::Cpu).unwrap();
    let mut list = values.clone();
    list.push((name.as_str(), &wrong_shape));
    tessera::model::safetensors::save(&path, &list, &metadata).unwrap();
    let error = GptParams::load(&path, None, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(error.contains(&name) && error.contains("[32, 1]"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The GPU (bf16) model with masks follows the CPU's (f32): loss, and gradients that are exactly
/// 0 where pruned on both.
#[test]
fn gpu_masked_model_follows_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let mut cpu = GptParams::init_with_variants(&config, &mixed(0), &Device::Cpu, 5).unwrap();
        randomise(&mut cpu, &mut rng);
        let mut on_gpu = GptParams::init_with_variants(&config, &mixed(0), &gpu, 5).unwrap();
        for (index, p) in cpu.params.iter().enumerate() {
            on_gpu.set_value(index, p.value.to_vec::<f32>().unwrap()).unwrap();
        }
        for (&index, mask) in &cpu.masks {
            assert_eq!(
                mask.mask.to_u8().unwrap().to_vec::<u8>().unwrap(),
                kept(&on_gpu, index),
                "the same masks on both devices"
            );
        }
        let (inputs, targets) = batch(&config, &mut rng, 14);
        let (a, grads_a, cpu) = loss_and_grads(cpu, &inputs, &targets);
        let (b, grads_b, _) = loss_and_grads(on_gpu, &inputs, &targets);
        assert!(
            (a - b).abs() <= 2e-2 * a.abs(),
            "{family:?}: CPU loss {a}, GPU loss {b}"
        );
        let flat = |g: &[Vec<f32>]| g.iter().flatten().map(|&v| v as f64).collect::<Vec<_>>();
        common::assert_close("gradients", &flat(&grads_b), &flat(&grads_a), 6e-2);
        for &index in cpu.masks.keys() {
            let kept = kept(&cpu, index);
            assert!(grads_b[index].iter().zip(&kept).all(|(&g, &k)| k == 1 || g == 0.0));
        }
    }
}

fn lora(rank: usize, frozen_base: bool) -> Option<LoraSpec> {
    Some(LoraSpec {
        rank,
        alpha: 2.0 * rank as f32,
        frozen_base,
    })
}

/// Dense layers with adapters, and unstructured MLP layers with adapters: a trainable base.
fn with_adapters(frozen_base: bool) -> LinearVariants {
    LinearVariants {
        default: LinearSpec {
            variant: Variant::Dense,
            lora: lora(3, frozen_base),
        },
        overrides: vec![(
            "mlp".into(),
            LinearSpec {
                variant: Variant::Unstructured { density: 0.6, seed: 2 },
                lora: lora(2, frozen_base),
            },
        )],
    }
}

/// The f64 reference's weights: every layer with its adapter merged, `W + s·B·A` in the
/// weight's layout, and `delta` added to entry `i` of parameter `index` first.
fn merged_weights(params: &GptParams, delta: Option<(usize, usize, f64)>) -> reference::Weights {
    let mut values: Vec<Vec<f64>> = params
        .params
        .iter()
        .map(|p| p.value.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect())
        .collect();
    if let Some((index, i, h)) = delta {
        values[index][i] += h;
    }
    for linear in params.layout.linears() {
        let (Some(index), Some(spec)) = (linear.lora, linear.spec.lora) else {
            continue;
        };
        let (r, n_in, n_out) = (spec.rank, linear.input, linear.output);
        let scale = spec.scale() as f64;
        let (a, b) = (values[index.a].clone(), values[index.b].clone());
        let w = &mut values[linear.weight];
        for o in 0..n_out {
            for i in 0..n_in {
                let delta: f64 = (0..r).map(|k| b[o * r + k] * a[k * n_in + i]).sum();
                let at = if linear.layout == Layout::InputMajor {
                    i * n_out + o
                } else {
                    o * n_in + i
                };
                w[at] += scale * delta;
            }
        }
    }
    params
        .params
        .iter()
        .zip(values)
        .filter(|(p, _)| !p.spec.name.starts_with("tessera."))
        .map(|(p, v)| (p.spec.name.clone(), v))
        .collect()
}

/// The adapters' (and a trainable base's kept weights') gradients against central differences
/// of the f64 reference with each adapter merged into its weight.
#[test]
fn adapter_gradients_match_finite_differences() {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let mut params = GptParams::init_with_variants(&config, &with_adapters(false), &Device::Cpu, 3).unwrap();
        randomise(&mut params, &mut rng);
        let (batch, seq) = (2, 7);
        let (inputs, targets) = self::batch(&config, &mut rng, batch * seq);
        let expected = reference::loss(&config, &merged_weights(&params, None), &inputs, &targets, batch, seq);
        let (loss, grads, params) = loss_and_grads(params, &inputs, &targets);
        assert!(
            ((loss as f64 - expected) / expected).abs() < 1e-5,
            "{family:?}: loss {loss} vs the f64 reference {expected}"
        );
        let h = 1e-5;
        let (mut diff, mut norm, mut checked_adapters) = (0.0f64, 0.0f64, 0);
        for linear in params.layout.linears() {
            let index = linear.lora.unwrap();
            let masked = params.masks.get(&linear.weight).map(|_| kept(&params, linear.weight));
            for (which, tensor) in [(index.a, "A"), (index.b, "B"), (linear.weight, "W")] {
                let grad = &grads[which];
                for _ in 0..4 {
                    let i = rng.random_range(0..grad.len());
                    if tensor == "W" && masked.as_ref().is_some_and(|k| k[i] == 0) {
                        assert_eq!(grad[i], 0.0, "a pruned weight's gradient");
                        continue;
                    }
                    let at = |d: f64| {
                        reference::loss(
                            &config,
                            &merged_weights(&params, Some((which, i, d))),
                            &inputs,
                            &targets,
                            batch,
                            seq,
                        )
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    let g = grad[i] as f64;
                    let name = &params.params[which].spec.name;
                    assert!(
                        (g - fd).abs() <= 2e-2 * fd.abs().max(1e-2),
                        "{name}[{i}]: gradient {g} vs finite difference {fd}"
                    );
                    diff += (g - fd).powi(2);
                    norm += fd * fd;
                    checked_adapters += usize::from(tensor != "W");
                }
            }
        }
        assert!(checked_adapters > 0);
        let relative = (diff / norm).sqrt();
        assert!(relative < 2e-3, "{family:?}: relative gradient error {relative}");
    }
}

fn logits_of(params: GptParams, inputs: &[u32]) -> (Vec<f32>, GptParams) {
    let (b, s) = (2, inputs.len() / 2);
    let mut model = Gpt::new(params, b, s).unwrap();
    let logits = model.logits(inputs, b, s).unwrap();
    let values = match logits.dtype() {
        DType::F32 => logits.to_vec::<f32>().unwrap(),
        _ => logits
            .to_vec::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    };
    (values, model.params)
}

/// B = 0 (as initialised, and as SLoPe's lazy adapters start) gives the base's outputs.
fn zero_b_gives_the_base_output(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let mut params = GptParams::init_with_variants(&config, &with_adapters(true), device, 3).unwrap();
        randomise(&mut params, &mut rng);
        let (inputs, _) = batch(&config, &mut rng, 14);
        let (base, _) = logits_of(dense_twin(&params), &inputs);
        let (random_b, mut params) = logits_of(params, &inputs);
        assert_ne!(random_b, base, "{family:?}: a random B changes the outputs");
        params.start_adapters(9).unwrap();
        for linear in params.layout.linears() {
            let b = &params.params[linear.lora.unwrap().b];
            assert!(b.value.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
        }
        let (started, mut params) = logits_of(params, &inputs);
        assert_eq!(started, base, "{family:?}: adapters started with B = 0");
        let fresh = GptParams::init_with_variants(&config, &with_adapters(true), device, 3).unwrap();
        for linear in fresh.layout.linears() {
            let index = linear.lora.unwrap();
            let a = fresh.params[index.a].value.to_vec::<f32>().unwrap();
            assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0));
            assert!(fresh.params[index.b]
                .value
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .all(|&v| v == 0.0));
        }
        params.set_adapters_on(false);
        randomise_adapters(&mut params, &mut rng);
        let (off, _) = logits_of(params, &inputs);
        assert_eq!(off, base, "{family:?}: adapters off");
    }
}

fn randomise_adapters(params: &mut GptParams, rng: &mut impl Rng) {
    let linears: Vec<_> = params.layout.linears().into_iter().copied().collect();
    for linear in linears {
        let index = linear.lora.unwrap();
        for i in [index.a, index.b] {
            let n = params.params[i].value.numel();
            params
                .set_value(i, (0..n).map(|_| rng.random_range(-0.4f32..0.4)).collect())
                .unwrap();
        }
    }
}

fn values_of(params: &GptParams) -> Vec<Vec<f32>> {
    params.params.iter().map(|p| p.value.to_vec::<f32>().unwrap()).collect()
}

/// Adapters off until `adapters_from`, then drawn and on; a frozen base trains before and stands
/// still after, while the adapters, norms and embeddings train.
fn adapters_start_at_their_step_and_freeze_the_base(device: &Device) {
    let corpus = corpus();
    let options = TrainOptions {
        adapters_from: 3,
        ..options(6)
    };
    let mut trainer = Trainer::with_variants(&byte_config(), &with_adapters(true), options, device).unwrap();
    assert!(!trainer.model.params.adapters_on());
    let linears: Vec<_> = trainer.model.params.layout.linears().into_iter().copied().collect();
    let bases: Vec<usize> = linears
        .iter()
        .flat_map(|l| std::iter::once(l.weight).chain(l.bias))
        .collect();
    let adapters: Vec<usize> = linears
        .iter()
        .flat_map(|l| [l.lora.unwrap().a, l.lora.unwrap().b])
        .collect();
    let start = values_of(&trainer.model.params);
    trainer.train_step(&corpus).unwrap();
    trainer.train_step(&corpus).unwrap();
    let before = values_of(&trainer.model.params);
    for &i in &adapters {
        assert_eq!(before[i], start[i], "adapters off do not move");
    }
    for &i in &bases {
        assert_ne!(before[i], start[i], "the base trains before the adapters");
    }
    let mut last = before;
    for _ in 3..=6 {
        trainer.train_step(&corpus).unwrap();
        assert!(trainer.model.params.adapters_on());
        let now = values_of(&trainer.model.params);
        for &i in &bases {
            assert_eq!(
                now[i], last[i],
                "{}: a frozen base moved",
                trainer.model.params.params[i].spec.name
            );
        }
        for &i in &adapters {
            assert_ne!(
                now[i], last[i],
                "{}: an adapter did not train",
                trainer.model.params.params[i].spec.name
            );
        }
        let embedding = trainer.model.params.layout.token_embedding;
        assert_ne!(now[embedding], last[embedding]);
        last = now;
    }
}

fn adapters_resume_exactly(device: &Device) {
    let corpus = corpus();
    let options = TrainOptions {
        adapters_from: 4,
        ..options(7)
    };
    let variants = with_adapters(false);
    let run = |steps: u64| {
        let mut t = Trainer::with_variants(&byte_config(), &variants, options.clone(), device).unwrap();
        let losses: Vec<f32> = (0..steps).map(|_| t.train_step(&corpus).unwrap().loss).collect();
        (t, losses)
    };
    let (straight, expected) = run(7);
    for saved_at in [2, 5] {
        let dir = scratch(&format!("adapters-{saved_at}"), device);
        let (first, mut got) = run(saved_at);
        first.save(&dir).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&dir, device).unwrap();
        assert_eq!(resumed.model.params.adapters_on(), saved_at >= 4);
        got.extend((saved_at..7).map(|_| resumed.train_step(&corpus).unwrap().loss));
        assert_eq!(got, expected, "saved at step {saved_at}");
        assert_eq!(values_of(&resumed.model.params), values_of(&straight.model.params));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn binary_with_adapters() -> (LinearVariants, LinearVariants) {
    let binary = LinearVariants {
        default: LinearSpec {
            variant: Variant::Binary,
            lora: None,
        },
        overrides: vec![(
            "mlp".into(),
            LinearSpec {
                variant: Variant::Binary,
                lora: lora(2, false),
            },
        )],
    };
    let dense = LinearVariants {
        default: LinearSpec::DENSE,
        overrides: vec![(
            "mlp".into(),
            LinearSpec {
                variant: Variant::Dense,
                lora: lora(2, false),
            },
        )],
    };
    (binary, dense)
}

/// A binary model is the dense model whose weights are `α·sign(W) + β`: the same loss and
/// upstream gradients, and the straight-through gradients of W, α and β from that model's
/// weight gradient `G` (out, in): `dW = α_j·G`, `dα_j = Σ_i G_ij·sign(W_ij)`, `dβ_j = Σ_i G_ij`.
#[test]
fn binary_equals_dense_on_its_effective_weights() {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let (binary, dense_variants) = binary_with_adapters();
        let mut params = GptParams::init_with_variants(&config, &binary, &Device::Cpu, 3).unwrap();
        // binary_init: β the column mean, α the mean absolute deviation of the initial W.
        let first = *params.layout.linears()[0];
        let index = first.binary.unwrap();
        let w = params.params[first.weight].value.to_vec::<f32>().unwrap();
        let beta = params.params[index.beta].value.to_vec::<f32>().unwrap();
        let column = |j: usize| -> Vec<f32> {
            (0..first.output)
                .map(|o| match first.layout {
                    Layout::InputMajor => w[j * first.output + o],
                    _ => w[o * first.input + j],
                })
                .collect()
        };
        let mean = column(3).iter().sum::<f32>() / first.output as f32;
        assert!((beta[3] - mean).abs() < 1e-6, "{beta:?} vs {mean}");
        randomise(&mut params, &mut rng);
        let mut twin = GptParams::init_with_variants(&config, &dense_variants, &Device::Cpu, 3).unwrap();
        for index in 0..twin.params.len() {
            let name = twin.params[index].spec.name.clone();
            let value = params.get(&name).unwrap().value.to_vec::<f32>().unwrap();
            twin.set_value(index, value).unwrap();
        }
        let linears: Vec<_> = params.layout.linears().into_iter().copied().collect();
        for linear in &linears {
            let index = linear.binary.unwrap();
            let w = params.params[linear.weight].value.to_vec::<f32>().unwrap();
            let alpha = params.params[index.alpha].value.to_vec::<f32>().unwrap();
            let beta = params.params[index.beta].value.to_vec::<f32>().unwrap();
            let input_of = |k: usize| match linear.layout {
                Layout::InputMajor => k / linear.output,
                _ => k % linear.input,
            };
            let effective = w
                .iter()
                .enumerate()
                .map(|(k, &v)| {
                    let sign = if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    alpha[input_of(k)] * sign + beta[input_of(k)]
                })
                .collect();
            let twin_index = twin
                .params
                .iter()
                .position(|p| p.spec.name == params.params[linear.weight].spec.name);
            twin.set_value(twin_index.unwrap(), effective).unwrap();
        }
        let (inputs, targets) = batch(&config, &mut rng, 14);
        let (loss, grads, params) = loss_and_grads(params, &inputs, &targets);
        let (twin_loss, twin_grads, twin) = loss_and_grads(twin, &inputs, &targets);
        assert!(
            ((loss - twin_loss) / twin_loss).abs() < 1e-5,
            "{family:?}: loss {loss} vs the dense model's {twin_loss}"
        );
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        for (twin_index, p) in twin.params.iter().enumerate() {
            let index = params.params.iter().position(|q| q.spec.name == p.spec.name).unwrap();
            if linears.iter().any(|l| l.weight == index) {
                continue;
            }
            common::assert_close(&p.spec.name, &f64s(&grads[index]), &f64s(&twin_grads[twin_index]), 1e-4);
        }
        for linear in &linears {
            let name = &params.params[linear.weight].spec.name;
            let twin_index = twin.params.iter().position(|p| &p.spec.name == name).unwrap();
            let g = &twin_grads[twin_index];
            let index = linear.binary.unwrap();
            let w = params.params[linear.weight].value.to_vec::<f32>().unwrap();
            let alpha = params.params[index.alpha].value.to_vec::<f32>().unwrap();
            let (mut d_w, mut d_alpha, mut d_beta) = (
                vec![0.0f64; w.len()],
                vec![0.0f64; linear.input],
                vec![0.0f64; linear.input],
            );
            // dα and dβ sum terms of both signs: measured against the sizes of those terms.
            let mut terms = vec![0.0f64; linear.input];
            for (k, (&gk, &wk)) in g.iter().zip(&w).enumerate() {
                let j = match linear.layout {
                    Layout::InputMajor => k / linear.output,
                    _ => k % linear.input,
                };
                let sign = if wk > 0.0 {
                    1.0
                } else if wk < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                d_w[k] = alpha[j] as f64 * gk as f64;
                d_alpha[j] += gk as f64 * sign;
                d_beta[j] += gk as f64;
                terms[j] += (gk as f64).abs();
            }
            let scale = common::norm(terms);
            common::assert_close(&format!("d{name}"), &f64s(&grads[linear.weight]), &d_w, 1e-4);
            common::assert_close_at_scale(&format!("{name} dα"), &f64s(&grads[index.alpha]), &d_alpha, 1e-4, scale);
            common::assert_close_at_scale(&format!("{name} dβ"), &f64s(&grads[index.beta]), &d_beta, 1e-4, scale);
        }
    }
}

/// transformers' config.json only where transformers computes the same model.
#[test]
fn hugging_face_config_only_for_exportable_variants() {
    let config = small(Family::Llama);
    let with = |variants: &LinearVariants| GptParams::init_with_variants(&config, variants, &Device::Cpu, 1).unwrap();
    assert!(
        with(&mixed(0)).hugging_face_json().is_some(),
        "masked weights are weights"
    );
    assert!(with(&binary_with_adapters().0).hugging_face_json().is_none());
    let mut adapted = with(&with_adapters(false));
    assert!(adapted.hugging_face_json().is_none());
    adapted.set_adapters_on(false);
    assert!(adapted.hugging_face_json().is_some());
    let layers = linear_summary(&config, &binary_with_adapters().0).unwrap();
    let q = &layers[0];
    assert_eq!((q.parameters, q.bytes), (32 * 32 + 2 * 32, 4 * (32 * 32 + 2 * 32)));
    let up = layers.iter().find(|l| l.name.ends_with("up_proj")).unwrap();
    assert_eq!(up.parameters, 32 * 40 + 2 * 32 + 2 * (32 + 40));
    let layers = linear_summary(&config, &sltrain(4, None)).unwrap();
    let up = layers.iter().find(|l| l.name.ends_with("up_proj")).unwrap();
    let nnz = (0.1 * (32 * 40) as f64) as usize;
    assert_eq!(up.parameters, 4 * (32 + 40) + nnz);
    assert_eq!(up.bytes, 4 * up.parameters + 4 * nnz + 4 * 32 * 40);
    assert!(
        with(&sltrain(4, None)).hugging_face_json().is_some(),
        "the weight is materialised"
    );
}

/// A binary model trains on each device, next-token and distilled from a dense teacher
/// (`distill_from`, pure distillation): its loss falls within 8 steps.
fn binary_trains_and_distils(device: &Device) {
    let corpus = corpus();
    let (binary, _) = binary_with_adapters();
    let mut trainer = Trainer::with_variants(&byte_config(), &binary, options(8), device).unwrap();
    let losses: Vec<f32> = (0..8).map(|_| trainer.train_step(&corpus).unwrap().loss).collect();
    assert!(
        losses.iter().all(|l| l.is_finite()) && losses[7] < losses[0],
        "{losses:?}"
    );

    let dir = scratch("binary-teacher", device);
    let mut teacher = Trainer::new(&byte_config(), options(6), device).unwrap();
    for _ in 0..6 {
        teacher.train_step(&corpus).unwrap();
    }
    teacher.save(&dir).unwrap();
    let distilled = TrainOptions {
        distill_from: Some(dir.display().to_string()),
        ..options(8)
    };
    let mut student = Trainer::with_variants(&byte_config(), &binary, distilled, device).unwrap();
    let losses: Vec<f32> = (0..8).map(|_| student.train_step(&corpus).unwrap().loss).collect();
    assert!(
        losses.iter().all(|l| l.is_finite()) && losses[7] < losses[0],
        "{losses:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `values` as a tensor of the model's compute dtype on `device` (bf16 on a GPU).
fn compute_tensor(values: &[f32], shape: &[usize], device: &Device) -> Tensor {
    match device.is_cuda() {
        true => Tensor::from_vec(
            values.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(),
            shape,
            device,
        )
        .unwrap(),
        false => Tensor::from_slice(values, shape, device).unwrap(),
    }
}

/// The GPU's (bf16 activations, f32 masters into the binary op) binary model follows the CPU's
/// (f32) for both weight layouts (GPT-2's (in, out), Llama's (out, in)) with adapters on the
/// MLP: the loss and every gradient of a next-token step and of a distillation step, then the
/// losses of a few training steps.
#[test]
fn gpu_binary_model_follows_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let mut rng = common::rng();
    let (binary, _) = binary_with_adapters();
    let flat = |g: &[Vec<f32>]| g.iter().flatten().map(|&v| v as f64).collect::<Vec<_>>();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let mut cpu = GptParams::init_with_variants(&config, &binary, &Device::Cpu, 5).unwrap();
        randomise(&mut cpu, &mut rng);
        let mut on_gpu = GptParams::init_with_variants(&config, &binary, &gpu, 5).unwrap();
        for (index, p) in cpu.params.iter().enumerate() {
            on_gpu.set_value(index, p.value.to_vec::<f32>().unwrap()).unwrap();
        }
        let (inputs, targets) = batch(&config, &mut rng, 14);
        let (a, grads_a, cpu) = loss_and_grads(cpu, &inputs, &targets);
        let (b, grads_b, on_gpu) = loss_and_grads(on_gpu, &inputs, &targets);
        assert!(
            a.is_finite() && (a - b).abs() <= 2e-2 * a.abs(),
            "{family:?}: CPU loss {a}, GPU loss {b}"
        );
        common::assert_close("gradients", &flat(&grads_b), &flat(&grads_a), 6e-2);
        for linear in cpu.layout.linears() {
            let index = linear.binary.unwrap();
            for i in [linear.weight, index.alpha, index.beta] {
                let name = &cpu.params[i].spec.name;
                let (got, want) = (&grads_b[i], &grads_a[i]);
                assert!(want.iter().any(|&g| g != 0.0), "{name}: a gradient to compare");
                common::assert_close(
                    name,
                    &flat(std::slice::from_ref(got)),
                    &flat(std::slice::from_ref(want)),
                    6e-2,
                );
            }
        }

        // Distillation from a random teacher's logits (the same values on both devices).
        let (batch_size, seq) = (2, 7);
        let teacher: Vec<f32> = (0..14 * config.vocab).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let distill = |params: GptParams| {
            let device = params.device.clone();
            let teacher = compute_tensor(&teacher, &[14, config.vocab], &device);
            let mut model = Gpt::new(params, batch_size, seq).unwrap();
            model.params.zero_grads().unwrap();
            let loss = model
                .forward_backward_distill(&inputs, &targets, &teacher, 0.0, batch_size, seq, 1.0)
                .unwrap();
            let grads: Vec<Vec<f32>> = model
                .params
                .params
                .iter()
                .map(|p| p.grad.to_vec::<f32>().unwrap())
                .collect();
            (loss, grads)
        };
        let (a, grads_a) = distill(cpu);
        let (b, grads_b) = distill(on_gpu);
        assert!(
            a.is_finite() && (a - b).abs() <= 2e-2 * a.abs(),
            "{family:?}: CPU distillation loss {a}, GPU {b}"
        );
        common::assert_close("distillation gradients", &flat(&grads_b), &flat(&grads_a), 6e-2);
    }

    // Training: the same initialisation and batches on both devices.
    let corpus = corpus();
    let mut on_cpu = Trainer::with_variants(&byte_config(), &binary, options(4), &Device::Cpu).unwrap();
    let mut on_gpu = Trainer::with_variants(&byte_config(), &binary, options(4), &gpu).unwrap();
    for step in 0..4 {
        let a = on_cpu.train_step(&corpus).unwrap().loss;
        let b = on_gpu.train_step(&corpus).unwrap().loss;
        assert!(
            a.is_finite() && (a - b).abs() <= 2e-2 * a.abs(),
            "step {step}: CPU loss {a}, GPU loss {b}"
        );
    }
}

fn sltrain(rank: usize, lora: Option<LoraSpec>) -> LinearVariants {
    LinearVariants::all(LinearSpec {
        variant: Variant::SparseLowRank {
            rank,
            density: 0.1,
            alpha: 8.0,
            seed: 3,
        },
        lora,
    })
}

/// An SLTrain model is the dense model whose weights are `c·B·A + S`: the same loss and
/// upstream gradients, and `dB = c·G·Aᵀ`, `dA = c·Bᵀ·G`, `dS = G[support]` from that model's
/// weight gradient `G` (out, in).
fn sltrain_equals_dense_on_its_materialised_weights(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = small(family);
        let mut params = GptParams::init_with_variants(&config, &sltrain(4, None), device, 3).unwrap();
        let linears: Vec<_> = params.layout.linears().into_iter().copied().collect();
        let first = linears[0];
        let index = first.sltrain.unwrap();
        assert_eq!(
            params.params[index.s].value.numel(),
            (0.1 * (first.input * first.output) as f64) as usize
        );
        assert!(params.params[index.b]
            .value
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
        common::assert_invalid(
            params.set_value(first.weight, vec![0.0; first.input * first.output]),
            "GptParams::set_value",
            "index",
            &["derived"],
        );
        randomise(&mut params, &mut rng);
        let twin = dense_twin(&params);
        let (inputs, targets) = batch(&config, &mut rng, 14);
        // The materialised weight, in f64 from the master values.
        for linear in &linears {
            let index = linear.sltrain.unwrap();
            let (a, b, s) = (
                params.params[index.a].value.to_vec::<f32>().unwrap(),
                params.params[index.b].value.to_vec::<f32>().unwrap(),
                params.params[index.s].value.to_vec::<f32>().unwrap(),
            );
            let support = params.sltrain[&linear.weight].support().to_vec::<u32>().unwrap();
            assert!(support.windows(2).all(|w| w[0] < w[1]));
            let (r, n_in, n_out) = (4, linear.input, linear.output);
            let mut w = vec![0.0f64; n_out * n_in];
            for o in 0..n_out {
                for i in 0..n_in {
                    w[o * n_in + i] = 2.0
                        * (0..r)
                            .map(|k| b[o * r + k] as f64 * a[k * n_in + i] as f64)
                            .sum::<f64>();
                }
            }
            for (&flat, &v) in support.iter().zip(&s) {
                w[flat as usize] += v as f64;
            }
            let got: Vec<f64> = output_major(&params.params[linear.weight].value.to_vec::<f32>().unwrap(), linear);
            let tolerance = if device.is_cuda() { 1e-2 } else { 1e-6 };
            common::assert_close("materialised W", &got, &w, tolerance);
        }
        let (loss, grads, params) = loss_and_grads(params, &inputs, &targets);
        let (twin_loss, twin_grads, twin) = loss_and_grads(twin, &inputs, &targets);
        assert_eq!(loss.to_bits(), twin_loss.to_bits(), "{family:?}: loss");
        for (twin_index, p) in twin.params.iter().enumerate() {
            let index = params.params.iter().position(|q| q.spec.name == p.spec.name).unwrap();
            if linears.iter().any(|l| l.weight == index) {
                assert!(
                    grads[index].iter().all(|&g| g == 0.0),
                    "the materialised weight gets no gradient"
                );
                continue;
            }
            assert_eq!(grads[index], twin_grads[twin_index], "{family:?}: {}", p.spec.name);
        }
        let tolerance = if device.is_cuda() { 2e-2 } else { 1e-5 };
        for linear in &linears {
            let name = &params.params[linear.weight].spec.name;
            let twin_index = twin.params.iter().position(|p| &p.spec.name == name).unwrap();
            let g = output_major(&twin_grads[twin_index], linear);
            let index = linear.sltrain.unwrap();
            let a = params.params[index.a].value.to_vec::<f32>().unwrap();
            let b = params.params[index.b].value.to_vec::<f32>().unwrap();
            let support = params.sltrain[&linear.weight].support().to_vec::<u32>().unwrap();
            let (r, n_in, n_out, c) = (4, linear.input, linear.output, 2.0);
            let mut d_b = vec![0.0f64; n_out * r];
            let mut d_a = vec![0.0f64; r * n_in];
            for o in 0..n_out {
                for i in 0..n_in {
                    for k in 0..r {
                        d_b[o * r + k] += c * g[o * n_in + i] * a[k * n_in + i] as f64;
                        d_a[k * n_in + i] += c * b[o * r + k] as f64 * g[o * n_in + i];
                    }
                }
            }
            let d_s: Vec<f64> = support.iter().map(|&flat| g[flat as usize]).collect();
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            common::assert_close(&format!("{name} dB"), &f64s(&grads[index.b]), &d_b, tolerance);
            common::assert_close(&format!("{name} dA"), &f64s(&grads[index.a]), &d_a, tolerance);
            common::assert_close(&format!("{name} dS"), &f64s(&grads[index.s]), &d_s, tolerance);
        }
    }
}

/// `values` of `linear`'s weight in its stored layout, as (out, in), in f64.
fn output_major(values: &[f32], linear: &tessera::model::params::Linear) -> Vec<f64> {
    let (n_in, n_out) = (linear.input, linear.output);
    (0..n_out * n_in)
        .map(|k| {
            let (o, i) = (k / n_in, k % n_in);
            (match linear.layout {
                Layout::InputMajor => values[i * n_out + o],
                _ => values[k],
            }) as f64
        })
        .collect()
}

/// SLTrain with adapters trains; the support stays, the weight stays its factors' product; a
/// checkpoint resumes exactly and refuses a support its seed does not draw.
fn sltrain_trains_and_resumes(device: &Device) {
    let corpus = corpus();
    let variants = sltrain(4, lora(2, false));
    let run = |steps: u64| {
        let mut t = Trainer::with_variants(&byte_config(), &variants, options(6), device).unwrap();
        let losses: Vec<f32> = (0..steps).map(|_| t.train_step(&corpus).unwrap().loss).collect();
        (t, losses)
    };
    let (straight, expected) = run(6);
    assert!(expected[5] < expected[0], "{expected:?}");
    let first = straight.model.params.layout.linears()[0].sltrain.unwrap();
    assert!(straight.model.params.params[first.b]
        .value
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .any(|&v| v != 0.0));
    let dir = scratch("sltrain", device);
    let (saved, mut got) = run(2);
    let checkpoint = saved.save(&dir).unwrap();
    drop(saved);
    let mut resumed = Trainer::resume(&dir, device).unwrap();
    got.extend((2..6).map(|_| resumed.train_step(&corpus).unwrap().loss));
    assert_eq!(got, expected);
    assert_eq!(values_of(&resumed.model.params), values_of(&straight.model.params));
    // A support that is not the seed's is refused.
    let path = checkpoint.join("model.safetensors");
    let mut file = SafeTensors::load(&path).unwrap();
    let metadata = file.metadata().clone();
    let names: Vec<String> = file.names().map(String::from).collect();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in &names {
        let t = file.get(name).unwrap();
        let (dtype, shape) = (t.dtype(), t.shape().to_vec());
        let mut t = file.take(name, dtype, &shape).unwrap();
        if name.ends_with(".sltrain_support") && tensors.iter().all(|(n, _)| !n.ends_with(".sltrain_support")) {
            let mut support = t.to_vec::<u32>().unwrap();
            let last = support.len() - 1;
            support[last] ^= 1;
            t = Tensor::from_vec(support, &shape, &Device::Cpu).unwrap();
        }
        tensors.push((name.clone(), t));
    }
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tessera::model::safetensors::save(&path, &list, &metadata).unwrap();
    let error = GptParams::load(&path, None, device)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(error.contains("sltrain_support") && error.contains("seed"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SPDF from the trainer: `densify_from = 4` keeps the masks through step 3, drops them at the
/// start of step 4 so that the pruned weights learn, and a run resumed on either side of it
/// repeats the uninterrupted one.
fn densify_from_starts_dense_fine_tuning_and_resumes(device: &Device) {
    let corpus = corpus();
    let variants = LinearVariants::all(unstructured(0.5));
    let spdf = TrainOptions {
        densify_from: 4,
        ..options(7)
    };
    let new = || Trainer::with_variants(&byte_config(), &variants, spdf.clone(), device).unwrap();
    let mut straight = new();
    let start = masked_state(&straight.model.params);
    let mut expected = Vec::new();
    for step in 1..=7u64 {
        expected.push(straight.train_step(&corpus).unwrap().loss);
        assert_eq!(straight.model.params.masks.is_empty(), step >= 4, "step {step}");
        if step < 4 {
            let now = masked_state(&straight.model.params);
            for ((kept, zero), (kept0, _)) in now.iter().zip(&start) {
                assert!(
                    kept == kept0 && *zero,
                    "step {step}: a mask changed or a pruned weight moved"
                );
            }
        }
    }
    let revived: usize = straight
        .model
        .params
        .layout
        .linears()
        .iter()
        .zip(&start)
        .map(|(linear, (kept, _))| {
            let value = straight.model.params.params[linear.weight]
                .value
                .to_vec::<f32>()
                .unwrap();
            value.iter().zip(kept).filter(|(&v, &k)| k == 0 && v != 0.0).count()
        })
        .sum();
    assert!(revived > 0, "no pruned weight learned after densifying");
    for saved_at in [2u64, 5] {
        let dir = scratch(&format!("densify-{saved_at}"), device);
        let mut first = new();
        let mut got: Vec<f32> = (0..saved_at).map(|_| first.train_step(&corpus).unwrap().loss).collect();
        first.save(&dir).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&dir, device).unwrap();
        assert_eq!(resumed.options, spdf);
        got.extend((saved_at..7).map(|_| resumed.train_step(&corpus).unwrap().loss));
        assert_eq!(got, expected, "saved at step {saved_at}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let late = TrainOptions {
        densify_from: 8,
        ..options(7)
    };
    let refused = Trainer::with_variants(&byte_config(), &variants, late, device).err();
    assert!(refused.is_some_and(|e| e.to_string().contains("densify_from")));
}

on_each_device!(
    binary_trains_and_distils,
    densify_from_starts_dense_fine_tuning_and_resumes,
    sltrain_equals_dense_on_its_materialised_weights,
    sltrain_trains_and_resumes,
    zero_b_gives_the_base_output,
    adapters_start_at_their_step_and_freeze_the_base,
    adapters_resume_exactly,
    unstructured_equals_dense_on_masked_weights,
    nm_with_a_two_way_pattern_equals_dense,
    nm_input_gradient_goes_through_the_double_pruned_weight,
    masks_stay_fixed_and_pruned_weights_zero_until_densified,
    nm_prunes_at_its_step_then_keeps_the_mask,
    checkpoints_keep_masks_and_resume_exactly,
);

/// `tessera info` and `tessera train --config` with every runnable variant, on the CPU: the
/// checkpoint holds the masks, adapters and binary scales, and `eval` reads it back.
#[test]
fn command_line_trains_every_variant() {
    let dir = std::env::temp_dir().join(format!("tessera-variants-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("variants.toml");
    std::fs::write(
        &config,
        r#"
[model]
layers = 2
heads = 2
kv_heads = 2
width = 32
ffn_width = 64
context = 16

[model.linears.default]
variant = "unstructured"
density = 0.5

[[model.linears.overrides]]
select = "attn.c_proj"
variant = "nm"
n = 2
m = 4
lora = { rank = 2, alpha = 2.0, frozen_base = true }

[[model.linears.overrides]]
select = "h.1.mlp.c_fc"
variant = "binary"

[[model.linears.overrides]]
select = "h.0.mlp.c_proj"
variant = "sparse_low_rank"
rank = 4
density = 0.05
alpha = 8.0

[train]
batch = 2
seq = 16
steps = 3
warmup = 1
eval_windows = 2
adapters_from = 2
"#,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "tessera {args:?}: {text}");
        text
    };
    let config = config.to_str().unwrap();
    let info = run(&["info", "--config", config]);
    for needle in [
        "transformer.h.0.attn.c_attn",
        "unstructured density 0.5 seed 0",
        "nm 2:4 (pruned at step 0) + lora rank 2 alpha 2 (frozen base)",
        "transformer.h.1.mlp.c_fc",
        "binary",
        "sparse_low_rank rank 4 density 0.05 alpha 8 seed 0",
    ] {
        assert!(info.contains(needle), "`{needle}` not in\n{info}");
    }
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    run(&["train", "--device", "cpu", "--config", config, "--out", out]);
    let checkpoint = dir.join("run").join("step-00000003");
    let file = SafeTensors::load(checkpoint.join("model.safetensors")).unwrap();
    let names: Vec<&str> = file.names().collect();
    for needle in [
        "tessera.transformer.h.0.attn.c_attn.mask",
        "tessera.transformer.h.1.attn.c_proj.mask",
        "tessera.transformer.h.1.attn.c_proj.lora_b",
        "tessera.transformer.h.1.mlp.c_fc.binary_alpha",
        "tessera.transformer.h.0.mlp.c_proj.sltrain_support",
        "tessera.transformer.h.0.mlp.c_proj.sltrain_b",
    ] {
        assert!(names.contains(&needle), "{needle} not in {names:?}");
    }
    assert_eq!(file.metadata().get("tessera.adapters").map(String::as_str), Some("on"));
    assert!(
        !checkpoint.join("config.json").exists(),
        "no transformers config for binary layers"
    );
    let text = dir.join("text.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap();
    let eval = run(&[
        "eval",
        "--device",
        "cpu",
        "--checkpoint",
        out,
        "--data",
        text.to_str().unwrap(),
    ]);
    assert!(eval.contains("perplexity"), "{eval}");
    std::fs::remove_dir_all(&dir).unwrap();
}
