//! The key/value cache: prefill plus decode steps give the logits of the full forward at those
//! positions, for both families, every mask, with and without wavelet mixing, batches of
//! different prompts, one-token prompts, prompts longer than one prefill pass, up to the context
//! exactly; generation with the cache equals generation without it; the tensor views the cache
//! is built on; and every invalid argument. The capturable decode step (on every device) against
//! the eager one, past odd prompts and across a second prefill; on a GPU, its CUDA graph against
//! it bit for bit, for dense, binary-packed and 2:4 models with and without adapters.

#[macro_use]
mod common;

use rand::rngs::StdRng;
use rand::Rng;
use tessera::model::generate::{generate_decoding, generate_with, Sampling};
use tessera::model::kv_cache::PREFILL_CHUNK;
use tessera::model::{
    Activation, Attention, DecodeMode, Family, Gpt, GptConfig, GptParams, LinearSpec, LinearVariants, LoraSpec, Norm,
    Positions, Variant,
};
use tessera::{DType, Device, Tensor};

fn config(family: Family, attention: Attention, wavelet: bool, context: usize) -> GptConfig {
    let gpt2 = family == Family::Gpt2;
    GptConfig {
        family,
        vocab: 19,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        width: 32,
        ffn_width: 40,
        context,
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
        attention,
        wavelet,
    }
}

/// Every family, mask and wavelet setting.
fn every_config(context: usize) -> Vec<GptConfig> {
    let masks = [
        Attention::Causal,
        Attention::Window { size: 3 },
        Attention::Lambda { global: 2, window: 3 },
    ];
    let mut configs = Vec::new();
    for family in [Family::Gpt2, Family::Llama] {
        for attention in masks {
            for wavelet in [false, true] {
                configs.push(config(family, attention, wavelet, context));
            }
        }
    }
    configs
}

/// Parameters with every value random (gains near 1), so that each one matters.
fn random_params(config: &GptConfig, device: &Device, rng: &mut StdRng) -> GptParams {
    let mut params = GptParams::init(config, device, 1).unwrap();
    for p in &mut params.params {
        let n: usize = p.spec.shape.iter().product();
        let gain =
            p.spec.name.ends_with("norm.weight") || p.spec.name.contains("ln_") && p.spec.name.ends_with(".weight");
        let values: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-0.4f32..0.4) + if gain { 1.0 } else { 0.0 })
            .collect();
        p.value = Tensor::from_vec(values.clone(), &p.spec.shape, device).unwrap();
        if let Some(compute) = &mut p.compute {
            let bf16: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            *compute = Tensor::from_vec(bf16, &p.spec.shape, device).unwrap();
        }
    }
    params
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect(),
        DType::BF16 => t.to_vec::<half::bf16>().unwrap().iter().map(|v| v.to_f64()).collect(),
        other => panic!("unexpected logits dtype {other}"),
    }
}

/// f32 on the CPU; bf16 activations and weights on a GPU, where the two paths round differently
/// (matmuls of other shapes, attention over other tiles).
fn tolerance(device: &Device) -> f64 {
    if device.is_cuda() {
        3e-2
    } else {
        1e-5
    }
}

fn random_tokens(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Prefills `batch` random prompts of `prompt` tokens, decodes `steps` more tokens per sequence,
/// and compares every returned row of logits with the full forward's at that position.
fn check_against_full_forward(device: &Device, config: &GptConfig, batch: usize, prompt: usize, steps: usize) {
    let mut rng = common::rng();
    let vocab = config.vocab;
    let total = prompt + steps;
    let tokens = random_tokens(&mut rng, batch * total, vocab);
    let params = random_params(config, device, &mut rng);
    let mut full = Gpt::new(params, batch, total).unwrap();
    let name = format!(
        "{:?} {:?} wavelet {} batch {batch} prompt {prompt} +{steps}",
        config.family, config.attention, config.wavelet
    );
    let reference = to_f64(full.logits(&tokens, batch, total).unwrap());
    let row = |b: usize, position: usize| {
        let at = (b * total + position) * vocab;
        &reference[at..at + vocab]
    };
    let expected = |position: usize| -> Vec<f64> { (0..batch).flat_map(|b| row(b, position).to_vec()).collect() };

    let mut cache = full.kv_cache(batch).unwrap();
    let prompts: Vec<u32> = (0..batch)
        .flat_map(|b| tokens[b * total..b * total + prompt].to_vec())
        .collect();
    let logits = to_f64(full.prefill(&mut cache, &prompts).unwrap());
    common::assert_close(
        &format!("{name}: prefill"),
        &logits,
        &expected(prompt - 1),
        tolerance(device),
    );
    assert_eq!(cache.len(), prompt);
    for step in 0..steps {
        let position = prompt + step;
        let next: Vec<u32> = (0..batch).map(|b| tokens[b * total + position]).collect();
        let logits = to_f64(full.decode(&mut cache, &next).unwrap());
        common::assert_close(
            &format!("{name}: decode at position {position}"),
            &logits,
            &expected(position),
            tolerance(device),
        );
    }
    assert_eq!(cache.len(), total);
}

/// Every family, mask and wavelet setting, two different prompts, decoding up to the context
/// exactly; then one token more is an error that leaves the cache as it was.
fn cached_logits_equal_the_full_forward(device: &Device) {
    let context = 10;
    for config in every_config(context) {
        check_against_full_forward(device, &config, 2, 4, context - 4);
        let mut rng = common::rng();
        let model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
        let mut cache = model.kv_cache(2).unwrap();
        model
            .prefill(&mut cache, &random_tokens(&mut rng, 2 * context, config.vocab))
            .unwrap();
        assert_eq!(cache.len(), cache.capacity());
        common::assert_invalid(
            model.decode(&mut cache, &[1, 2]),
            "KvCache",
            "tokens",
            &["context of 10"],
        );
        assert_eq!(cache.len(), context);
    }
}

/// One-token prompts, a single sequence and three at once.
fn one_token_prompts(device: &Device) {
    for config in every_config(6) {
        check_against_full_forward(device, &config, 1, 1, 5);
        check_against_full_forward(device, &config, 3, 1, 3);
    }
}

/// A prompt longer than one prefill pass runs in chunks and still matches.
fn long_prompts_prefill_in_chunks(device: &Device) {
    let context = PREFILL_CHUNK + 20;
    for family in [Family::Gpt2, Family::Llama] {
        for (attention, wavelet) in [(Attention::Causal, true), (Attention::Window { size: 7 }, false)] {
            let config = config(family, attention, wavelet, context);
            check_against_full_forward(device, &config, 2, PREFILL_CHUNK + 13, 3);
        }
    }
}

/// A second prefill starts over: the cache holds only the new prompts.
fn prefill_restarts_the_cache(device: &Device) {
    let mut rng = common::rng();
    let config = config(Family::Llama, Attention::Causal, true, 8);
    let params = random_params(&config, device, &mut rng);
    let model = Gpt::new(params, 1, 1).unwrap();
    let mut cache = model.kv_cache(1).unwrap();
    model
        .prefill(&mut cache, &random_tokens(&mut rng, 7, config.vocab))
        .unwrap();
    let prompt = random_tokens(&mut rng, 3, config.vocab);
    let again = to_f64(model.prefill(&mut cache, &prompt).unwrap());
    assert_eq!(cache.len(), 3);
    let mut fresh = model.kv_cache(1).unwrap();
    let expected = to_f64(model.prefill(&mut fresh, &prompt).unwrap());
    assert_eq!(again, expected);
}

/// Every argument the cache checks.
fn invalid_arguments(device: &Device) {
    let mut rng = common::rng();
    let config = config(Family::Gpt2, Attention::Causal, false, 8);
    let model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
    common::assert_invalid(model.kv_cache(0), "KvCache", "batch", &["at least 1"]);
    let mut cache = model.kv_cache(2).unwrap();
    common::assert_invalid(model.prefill(&mut cache, &[]), "KvCache", "prompts", &["2 prompts"]);
    common::assert_invalid(
        model.prefill(&mut cache, &[1, 2, 3]),
        "KvCache",
        "prompts",
        &["3 tokens"],
    );
    common::assert_invalid(
        model.prefill(&mut cache, &[1; 18]),
        "KvCache",
        "prompts",
        &["context of 8", "9 tokens"],
    );
    common::assert_invalid(
        model.prefill(&mut cache, &[1, 19]),
        "KvCache",
        "tokens",
        &["19 at index 1"],
    );
    assert!(cache.is_empty());
    model.prefill(&mut cache, &[1, 2, 3, 4]).unwrap();
    common::assert_invalid(
        model.decode(&mut cache, &[1]),
        "KvCache",
        "tokens",
        &["one token per sequence"],
    );
    common::assert_invalid(
        model.decode(&mut cache, &[1, 25]),
        "KvCache",
        "tokens",
        &["25 at index 1"],
    );
    assert_eq!(cache.len(), 2);
    let other = Gpt::new(
        random_params(&GptConfig { vocab: 23, ..config }, device, &mut rng),
        1,
        1,
    )
    .unwrap();
    common::assert_invalid(
        other.decode(&mut cache, &[1, 2]),
        "KvCache",
        "cache",
        &["another configuration"],
    );
    assert_eq!(cache.len(), 2);
}

/// The views the cache is built on: a prefix of the leading dimension, grown and shrunk within
/// the allocation without losing data, and rows copied between tensors (small, so that
/// compute-sanitizer checks the device copies).
fn small_leading_views_and_row_copies(device: &Device) {
    let mut rng = common::rng();
    let values: Vec<f32> = (0..7 * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut t = Tensor::from_vec(values.clone(), &[7, 3], device).unwrap();
    assert_eq!(t.leading_capacity(), 7);
    t.set_leading_dim(2).unwrap();
    assert_eq!(t.shape(), &[2, 3]);
    assert_eq!(t.to_vec::<f32>().unwrap(), values[..6]);
    let copy = t.to_device(&Device::Cpu).unwrap();
    assert_eq!(copy.to_vec::<f32>().unwrap(), values[..6]);
    common::assert_invalid(t.set_leading_dim(8), "Tensor::set_leading_dim", "rows", &["7", "8"]);
    t.set_leading_dim(7).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), values);

    let source_values: Vec<f32> = (0..4 * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
    let source = Tensor::from_vec(source_values.clone(), &[4, 3], device).unwrap();
    t.set_leading_dim(5).unwrap();
    t.copy_rows_from(3, &source, 1, 2).unwrap();
    t.set_leading_dim(7).unwrap();
    let mut expected = values.clone();
    expected[9..15].copy_from_slice(&source_values[3..9]);
    assert_eq!(t.to_vec::<f32>().unwrap(), expected);

    // A short view copies and fills only what it shows.
    t.set_leading_dim(1).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t.copy_from(&Tensor::from_vec(vec![5.0f32; 3], &[1, 3], device).unwrap())
        .unwrap();
    t.set_leading_dim(7).unwrap();
    let all = t.to_vec::<f32>().unwrap();
    assert_eq!(all[..3], [5.0; 3]);
    assert_eq!(all[3..], expected[3..]);

    t.set_leading_dim(4).unwrap();
    common::assert_invalid(
        t.copy_rows_from(3, &source, 0, 2),
        "Tensor::copy_rows_from",
        "start",
        &["4"],
    );
    common::assert_invalid(
        t.copy_rows_from(0, &source, 3, 2),
        "Tensor::copy_rows_from",
        "source_start",
        &["4"],
    );
    let wide = Tensor::zeros(&[2, 4], DType::F32, device).unwrap();
    common::assert_invalid(
        t.copy_rows_from(0, &wide, 0, 1),
        "Tensor::copy_rows_from",
        "source",
        &["3 elements"],
    );
    let half = Tensor::zeros(&[2, 3], DType::BF16, device).unwrap();
    common::assert_invalid(
        t.copy_rows_from(0, &half, 0, 1),
        "Tensor::copy_rows_from",
        "source",
        &["f32"],
    );
    t.set_leading_dim(7).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap()[3..], expected[3..]);
}

/// Randomises every parameter of `params` (gains near 1, adapters' B included, so that the
/// adapters change the logits) in place, keeping dtypes and devices.
fn randomize(params: &mut GptParams, rng: &mut StdRng) {
    let device = params.device.clone();
    for p in &mut params.params {
        let n: usize = p.spec.shape.iter().product();
        let gain =
            p.spec.name.ends_with("norm.weight") || p.spec.name.contains("ln_") && p.spec.name.ends_with(".weight");
        let values: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-0.2f32..0.2) + if gain { 1.0 } else { 0.0 })
            .collect();
        if p.value.dtype() == DType::F32 {
            p.value = Tensor::from_vec(values.clone(), &p.spec.shape, &device).unwrap();
        }
        if let Some(compute) = &mut p.compute {
            let bf16: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            *compute = Tensor::from_vec(bf16, &p.spec.shape, &device).unwrap();
        }
    }
}

/// Decodes `steps` tokens after a prompt of `prompt` tokens per sequence in two caches of
/// `model`, one eager and one in `mode`, feeding both the same tokens; checks the positions held
/// and the logits of every step (bit for bit with `exact`, else within the device's tolerance),
/// then prefills both again with a shorter odd prompt and checks three more steps.
fn compare_modes(model: &Gpt, batch: usize, prompt: usize, steps: usize, mode: DecodeMode, exact: Option<DecodeMode>) {
    let mut rng = common::rng();
    let vocab = model.params.config.vocab;
    let device = model.params.device.clone();
    let mut reference = model.kv_cache(batch).unwrap();
    if let Some(exact) = exact {
        reference.set_decode_mode(exact).unwrap();
    }
    let mut cache = model.kv_cache(batch).unwrap();
    cache.set_decode_mode(mode).unwrap();
    assert_eq!(cache.decode_mode(), mode);
    let what = |round: usize, step: usize| format!("{mode:?} batch {batch}, round {round}, step {step}");
    for (round, (prompt, steps)) in [(prompt, steps), ((prompt / 2) | 1, 3)].into_iter().enumerate() {
        let tokens = random_tokens(&mut rng, batch * prompt, vocab);
        let expected = to_f64(model.prefill(&mut reference, &tokens).unwrap());
        let got = to_f64(model.prefill(&mut cache, &tokens).unwrap());
        assert_eq!(got, expected, "{}", what(round, 0));
        for step in 1..=steps {
            let next = random_tokens(&mut rng, batch, vocab);
            let expected = to_f64(model.decode(&mut reference, &next).unwrap());
            let got = to_f64(model.decode(&mut cache, &next).unwrap());
            assert_eq!(cache.len(), prompt + step, "{}", what(round, step));
            assert_eq!(reference.len(), prompt + step, "{}", what(round, step));
            assert!(got.iter().all(|v| v.is_finite()), "{}", what(round, step));
            if exact.is_some() {
                assert!(got == expected, "{}: logits differ", what(round, step));
            } else {
                // On the CPU the two attentions sum in f32 in different orders; the binary
                // layers' sums of ±α·x (with cancellation) carry that rounding to ~1e-5 of the
                // logits' norm for some seeds.
                let tolerance = if device.is_cuda() { tolerance(&device) } else { 1e-4 };
                common::assert_close(&what(round, step), &got, &expected, tolerance);
            }
        }
    }
}

/// The capturable step equals the eager one for every mask, batches of 1 and 3 past an odd
/// prompt, and after a second prefill.
fn capturable_decode_equals_eager(device: &Device) {
    let mut rng = common::rng();
    let masks = [
        Attention::Causal,
        Attention::Window { size: 3 },
        Attention::Lambda { global: 2, window: 3 },
    ];
    for attention in masks {
        let config = config(Family::Gpt2, attention, false, 40);
        let model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
        for batch in [1, 3] {
            compare_modes(&model, batch, 7, 20, DecodeMode::Capturable, None);
        }
    }
}

/// The modes the capturable step cannot serve are refused, and the mode stays eager.
fn capturable_modes_refuse_what_they_cannot_serve(device: &Device) {
    let mut rng = common::rng();
    for (family, wavelet) in [(Family::Llama, false), (Family::Gpt2, true)] {
        let config = config(family, Attention::Causal, wavelet, 8);
        let model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
        let mut cache = model.kv_cache(1).unwrap();
        for mode in [DecodeMode::Capturable, DecodeMode::Graph] {
            match cache.set_decode_mode(mode) {
                Err(tessera::Error::Unsupported { op, .. }) => assert_eq!(op, "KvCache"),
                other => panic!("{family:?} wavelet {wavelet}: expected Unsupported, got {other:?}"),
            }
            assert_eq!(cache.decode_mode(), DecodeMode::Eager);
        }
    }
    if !device.is_cuda() {
        let config = config(Family::Gpt2, Attention::Causal, false, 8);
        let model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
        let mut cache = model.kv_cache(1).unwrap();
        assert!(matches!(
            cache.set_decode_mode(DecodeMode::Graph),
            Err(tessera::Error::Unsupported { .. })
        ));
    }
}

/// Greedy generation gives the same text with the capturable step as with the eager one on the
/// CPU (f32, where the two attentions differ by rounding far below any gap between logits), and
/// on a GPU the same text with the graph as with the capturable step (bit-identical logits).
fn generation_in_every_mode(device: &Device) {
    let mut rng = common::rng();
    let config = config(Family::Gpt2, Attention::Causal, false, 24);
    let mut model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
    let prompt = random_tokens(&mut rng, 5, config.vocab);
    let (reference, mode) = if device.is_cuda() {
        (DecodeMode::Capturable, DecodeMode::Graph)
    } else {
        (DecodeMode::Eager, DecodeMode::Capturable)
    };
    let greedy = Sampling::greedy();
    let expected = generate_decoding(&mut model, &prompt, 12, &greedy, 0, Some(reference)).unwrap();
    let got = generate_decoding(&mut model, &prompt, 12, &greedy, 0, Some(mode)).unwrap();
    assert_eq!(got.len(), 12);
    assert_eq!(got, expected, "{mode:?} against {reference:?}");
}

/// A small graph decode for compute-sanitizer: three graph steps on the GPU (the capturable
/// step on the CPU), against the eager step.
fn small_graph_decode(device: &Device) {
    let mut rng = common::rng();
    let config = config(Family::Gpt2, Attention::Causal, false, 12);
    let model = Gpt::new(random_params(&config, device, &mut rng), 1, 1).unwrap();
    let mode = if device.is_cuda() {
        DecodeMode::Graph
    } else {
        DecodeMode::Capturable
    };
    compare_modes(&model, 1, 3, 3, mode, None);
}

/// The models of the graph tests: GPT-2 tiny shapes (so that the 2:4 layers take the sparse
/// kernels), dense, binary packed, 2:4, and 2:4 with rank-8 adapters, all parameters random.
fn graph_models(device: &Device) -> Vec<(&'static str, Gpt)> {
    let mut rng = common::rng();
    let config = GptConfig {
        context: 48,
        ..GptConfig::tiny()
    };
    let nm = |lora: Option<LoraSpec>| {
        LinearVariants::all(LinearSpec {
            variant: Variant::Nm {
                n: 2,
                m: 4,
                prune_step: 0,
            },
            lora,
        })
    };
    let binary = LinearVariants::all(LinearSpec {
        variant: Variant::Binary,
        lora: None,
    });
    let binary_lora = LinearVariants::all(LinearSpec {
        variant: Variant::Binary,
        lora: Some(LoraSpec {
            rank: 4,
            alpha: 8.0,
            frozen_base: false,
        }),
    });
    let dense_lora = LinearVariants::all(LinearSpec {
        variant: Variant::Dense,
        lora: Some(LoraSpec {
            rank: 8,
            alpha: 16.0,
            frozen_base: false,
        }),
    });
    let lora = Some(LoraSpec {
        rank: 8,
        alpha: 16.0,
        frozen_base: false,
    });
    let mut models = Vec::new();
    for (name, variants, pack) in [
        ("dense", LinearVariants::dense(), false),
        ("dense + adapters", dense_lora, false),
        ("binary packed", binary, true),
        ("binary + adapters", binary_lora, false),
        ("2:4", nm(None), false),
        ("2:4 + adapters", nm(lora), false),
    ] {
        let mut params = GptParams::init_with_variants(&config, &variants, device, 1).unwrap();
        randomize(&mut params, &mut rng);
        if pack {
            params.pack_binary().unwrap();
        }
        models.push((name, Gpt::new(params, 1, 1).unwrap()));
    }
    models
}

/// The capturable step equals the eager one for dense, binary-packed and 2:4 models, with and
/// without adapters (whose intermediate lives in the cache), batches of 1 and 3.
fn capturable_decode_of_every_model_form(device: &Device) {
    for (name, model) in graph_models(device) {
        eprintln!("{name}");
        for batch in [1, 3] {
            compare_modes(&model, batch, 7, 6, DecodeMode::Capturable, None);
        }
    }
}

/// On a GPU: the graph's logits equal the capturable step's bit for bit for 20 steps past an
/// odd prompt and after a second prefill, and stay within bf16 tolerance of the eager step's,
/// for every model form, batches of 1 and 3.
#[test]
fn graph_decode_equals_the_capturable_step_bit_for_bit() {
    let Some(device) = common::gpu() else {
        return;
    };
    for (name, model) in graph_models(&device) {
        eprintln!("{name}");
        for batch in [1, 3] {
            compare_modes(&model, batch, 7, 20, DecodeMode::Graph, Some(DecodeMode::Capturable));
            compare_modes(&model, batch, 7, 20, DecodeMode::Graph, None);
        }
    }
}

on_each_device!(
    cached_logits_equal_the_full_forward,
    one_token_prompts,
    long_prompts_prefill_in_chunks,
    prefill_restarts_the_cache,
    invalid_arguments,
    small_leading_views_and_row_copies,
    capturable_decode_equals_eager,
    capturable_modes_refuse_what_they_cannot_serve,
    generation_in_every_mode,
    small_graph_decode,
    capturable_decode_of_every_model_form,
);

/// Greedy and sampled generation are the same with and without the cache, also past the
/// context, where generation slides its window and reruns the forward.
#[test]
fn generation_with_the_cache_equals_generation_without() {
    let mut rng = common::rng();
    for config in every_config(12) {
        let params = random_params(&config, &Device::Cpu, &mut rng);
        let mut model = Gpt::new(params, 1, 1).unwrap();
        let prompt = random_tokens(&mut rng, 3, config.vocab);
        let sampled = Sampling {
            temperature: 0.9,
            top_k: Some(8),
            top_p: Some(0.95),
        };
        for sampling in [Sampling::greedy(), sampled] {
            let seed = rng.random();
            let with = generate_with(&mut model, &prompt, 16, &sampling, seed, true).unwrap();
            let without = generate_with(&mut model, &prompt, 16, &sampling, seed, false).unwrap();
            assert_eq!(
                with, without,
                "{:?} {:?} wavelet {}",
                config.family, config.attention, config.wavelet
            );
        }
        // A prompt longer than the context never uses the cache, and still continues it.
        let long = random_tokens(&mut rng, 15, config.vocab);
        let with = generate_with(&mut model, &long, 2, &Sampling::greedy(), 0, true).unwrap();
        let without = generate_with(&mut model, &long, 2, &Sampling::greedy(), 0, false).unwrap();
        assert_eq!(with, without);
    }
}

/// On a GPU: a capture refuses an allocation, a host copy and a synchronisation with an error
/// that says which, leaves the device usable, and a captured op replays on new inputs.
#[cfg(feature = "cuda")]
#[test]
fn capture_refuses_what_a_graph_cannot_hold() {
    let Some(device) = common::gpu() else {
        return;
    };
    let Device::Cuda(backend) = &device else {
        return;
    };
    let small = Tensor::from_vec(vec![half::bf16::from_f32(1.5); 8], &[2, 4], &device).unwrap();
    type Body<'a> = Box<dyn Fn() -> tessera::Result<()> + 'a>;
    let refusals: [(&str, Body); 3] = [
        (
            "allocation",
            Box::new(|| Tensor::zeros(&[4], DType::BF16, &device).map(|_| ())),
        ),
        (
            "copy to the host",
            Box::new(|| small.to_vec::<half::bf16>().map(|_| ())),
        ),
        ("synchronisation", Box::new(|| device.synchronize())),
    ];
    for (what, body) in refusals {
        match backend.capture_graph(body) {
            Err(tessera::Error::Unsupported { reason, .. }) => assert!(reason.contains(what), "{what}: {reason}"),
            other => panic!("{what}: expected Unsupported, got {other:?}"),
        }
    }
    let mut source = Tensor::from_vec(vec![half::bf16::from_f32(2.0); 8], &[2, 4], &device).unwrap();
    let mut target = Tensor::from_vec(vec![half::bf16::NAN; 4], &[2, 2], &device).unwrap();
    let graph = backend
        .capture_graph(|| tessera::ops::copy_columns(&source, 1, &mut target, 0, 2))
        .unwrap();
    assert!(
        target.to_vec::<half::bf16>().unwrap().iter().all(|v| v.is_nan()),
        "capture ran the op"
    );
    backend.launch_graph(&graph).unwrap();
    let first: Vec<f32> = target
        .to_vec::<half::bf16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(first, vec![2.0; 4]);
    let values: Vec<half::bf16> = (0..8).map(|i| half::bf16::from_f32(i as f32)).collect();
    source
        .copy_from(&Tensor::from_vec(values, &[2, 4], &Device::Cpu).unwrap())
        .unwrap();
    backend.launch_graph(&graph).unwrap();
    let second: Vec<f32> = target
        .to_vec::<half::bf16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(second, vec![1.0, 2.0, 5.0, 6.0]);
}
