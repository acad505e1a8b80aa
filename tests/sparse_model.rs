//! `nm` layers of the GPT through the sparse tensor-core kernels (src/model/sparse_layers.rs):
//! the transpose that builds their compressed copies, the copies against the masked weights
//! through training and at every refresh point, the sparse path against the masked dense one
//! (losses, gradients, logits, cached generation, with and without adapters), and the GPU's
//! sparse model against the CPU's masked dense one.

#[macro_use]
mod common;

use rand::Rng;
use tessera::model::params::Layout;
use tessera::model::sparse_layers::{export_sparse24, qualifies, sparse24_names, transpose, transpose_into};
use tessera::model::{
    Activation, Attention, Family, Gpt, GptConfig, GptParams, LinearSpec, LinearVariants, LoraSpec, Norm, Positions,
    SafeTensors, Variant,
};
use tessera::ops::{sparse24_decompress, AdamWConfig, NmPattern};
use tessera::train::trainer::Trainer;
use tessera::{DType, Device, Tensor};

/// Dimensions that the sparse format takes (multiples of 64), except Llama's key and value
/// projections (64 -> 32), which stay masked dense beside the sparse ones.
fn config(family: Family) -> GptConfig {
    let gpt2 = family == Family::Gpt2;
    GptConfig {
        family,
        vocab: 61,
        layers: 2,
        heads: 4,
        kv_heads: if gpt2 { 4 } else { 2 },
        width: 64,
        ffn_width: 128,
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

fn nm_variants(n: usize, m: usize, adapters: bool) -> LinearVariants {
    LinearVariants::all(LinearSpec {
        variant: Variant::Nm { n, m, prune_step: 0 },
        lora: adapters.then_some(LoraSpec {
            rank: 4,
            alpha: 8.0,
            frozen_base: false,
        }),
    })
}

/// Host values of a float tensor as f32.
fn floats(t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap(),
        DType::BF16 => t.to_vec::<half::bf16>().unwrap().iter().map(|v| v.to_f32()).collect(),
        DType::F16 => t.to_vec::<half::f16>().unwrap().iter().map(|v| v.to_f32()).collect(),
        other => panic!("not a float tensor: {other}"),
    }
}

fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// Random values for every parameter (norm gains near 1), adapters' B included, so that the
/// adapters contribute. The values are exact in bf16, so that a GPU's bf16 copies order the
/// magnitudes as the f32 master does and both paths prune the same entries: the comparisons
/// then see the GEMMs' rounding alone.
fn randomise(params: &mut GptParams, rng: &mut impl Rng) {
    for index in 0..params.params.len() {
        let spec = &params.params[index].spec;
        let gain = spec.name.ends_with("norm.weight") || spec.name.contains("ln_") && spec.name.ends_with(".weight");
        let n: usize = spec.shape.iter().product();
        // Never exactly 0: a kept weight of 0 leaves its group's kept positions ambiguous to
        // an export, whose metadata the tests compare with the mask.
        let values = (0..n)
            .map(|_| loop {
                let v = half::bf16::from_f32(rng.random_range(-0.4f32..0.4) + if gain { 1.0 } else { 0.0 }).to_f32();
                if v != 0.0 {
                    break v;
                }
            })
            .collect();
        params.set_value(index, values).unwrap();
    }
}

/// Parameters with `variants` holding `source`'s values, initialised with `source`'s seed (so
/// that they prune alike), with the sparse kernels `sparse`.
fn twin(source: &GptParams, seed: u64, variants: &LinearVariants, device: &Device, sparse: bool) -> GptParams {
    let mut params = GptParams::init_with_variants(&source.config, variants, device, seed).unwrap();
    params.set_sparse_kernels(sparse).unwrap();
    for (index, p) in source.params.iter().enumerate() {
        params.set_value(index, p.value.to_vec::<f32>().unwrap()).unwrap();
    }
    for (&index, mask) in &source.masks {
        assert_eq!(
            mask.mask.to_u8().unwrap().to_vec::<u8>().unwrap(),
            params.masks[&index].mask.to_u8().unwrap().to_vec::<u8>().unwrap(),
            "twins prune alike"
        );
    }
    params
}

fn tokens(config: &GptConfig, rng: &mut impl Rng, count: usize) -> Vec<u32> {
    (0..count).map(|_| rng.random_range(0..config.vocab as u32)).collect()
}

/// Loss and gradients on `inputs.len() / seq` sequences of `seq` tokens.
fn loss_and_grads(params: GptParams, inputs: &[u32], targets: &[u32], seq: usize) -> (f32, Vec<Vec<f32>>, GptParams) {
    let (b, s) = (inputs.len() / seq, seq);
    let mut model = Gpt::new(params, b, s).unwrap();
    model.params.zero_grads().unwrap();
    let loss = model.forward_backward(inputs, targets, b, s, 1.0).unwrap();
    let grads = model.params.params.iter().map(|p| floats(&p.grad)).collect();
    (loss, grads, model.params)
}

/// The naive N:M pruning of a row-major (rows, cols) matrix along its rows: per group, the `n`
/// largest magnitudes, the lower index on a tie.
fn prune_rows(values: &[f32], rows: usize, cols: usize, n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for g in (0..cols).step_by(m) {
            let mut order: Vec<usize> = (g..g + m).collect();
            order.sort_by(|&a, &b| {
                let (x, y) = (values[r * cols + a].abs(), values[r * cols + b].abs());
                y.partial_cmp(&x).unwrap().then(a.cmp(&b))
            });
            for &c in &order[..n] {
                out[r * cols + c] = values[r * cols + c];
            }
        }
    }
    out
}

fn transpose_naive(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|k| values[(k % rows) * cols + k / rows]).collect()
}

/// The number of `nm` layers that run through the sparse kernels, after checking each one's
/// copies against its masked compute weight: `W_s` is that weight as (out, in), `W_dpᵀ` the
/// (in, out) view pruned again along its rows, bit for bit.
fn check_copies(params: &GptParams, pattern: (usize, usize)) -> usize {
    let mut checked = 0;
    for linear in params.layout.linears() {
        let p = &params.params[linear.weight];
        let expected = qualifies(
            NmPattern::new(pattern.0, pattern.1).unwrap(),
            linear.input,
            linear.output,
        );
        let Some(copies) = params.sparse_copies(linear.weight) else {
            assert!(!expected || !params.sparse_kernels(), "{}: no copies", p.spec.name);
            continue;
        };
        assert!(expected, "{}: copies for a layer the kernels do not take", p.spec.name);
        assert!(
            params.masks[&linear.weight].double_pruned.is_none(),
            "{}: no dense double-pruned copy beside the compressed one",
            p.spec.name
        );
        let weight = floats(p.compute.as_ref().unwrap_or(&p.value));
        let (input, output) = (linear.input, linear.output);
        let (output_major, input_major) = match linear.layout {
            Layout::InputMajor => (transpose_naive(&weight, input, output), weight.clone()),
            _ => (weight.clone(), transpose_naive(&weight, output, input)),
        };
        let w_s = floats(&sparse24_decompress(&copies.w_s).unwrap());
        assert_eq!(w_s, output_major, "{}: W_s is the masked weight", p.spec.name);
        let w_dp_t = floats(&sparse24_decompress(&copies.w_dp_t).unwrap());
        let want = prune_rows(&input_major, input, output, pattern.0, pattern.1);
        assert_eq!(w_dp_t, want, "{}: W_dpᵀ is the double pruning", p.spec.name);
        checked += 1;
    }
    checked
}

fn transpose_matches_naive(device: &Device) {
    let mut rng = common::rng();
    let dtypes: &[DType] = if device.is_cuda() {
        &[DType::BF16, DType::F16]
    } else {
        &[DType::F32, DType::BF16, DType::F16]
    };
    for &dtype in dtypes {
        for (rows, cols) in [
            (1, 1),
            (1, 7),
            (7, 1),
            (17, 113),
            (113, 17),
            (64, 1025),
            (1023, 33),
            (32, 32),
        ] {
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let host = Tensor::from_vec(values, &[rows, cols], &Device::Cpu).unwrap();
            let w = match dtype {
                DType::F32 => host,
                DType::BF16 => Tensor::from_vec(
                    floats(&host).into_iter().map(half::bf16::from_f32).collect(),
                    &[rows, cols],
                    &Device::Cpu,
                )
                .unwrap(),
                _ => Tensor::from_vec(
                    floats(&host).into_iter().map(half::f16::from_f32).collect(),
                    &[rows, cols],
                    &Device::Cpu,
                )
                .unwrap(),
            };
            let want = transpose_naive(&floats(&w), rows, cols);
            let w = w.to_device(device).unwrap();
            let got = transpose(&w).unwrap();
            assert_eq!(got.shape(), &[cols, rows]);
            assert_eq!(got.dtype(), dtype);
            let got = floats(&got);
            assert!(got.iter().all(|v| v.is_finite()), "{dtype} {rows}x{cols}");
            assert_eq!(got, want, "{dtype} {rows}x{cols}");
            // Into a NaN-poisoned output: every element written.
            let mut out = poisoned(&[cols, rows], dtype, device);
            transpose_into(&w, &mut out).unwrap();
            assert_eq!(floats(&out), want, "{dtype} {rows}x{cols} into");
        }
    }
    let w = Tensor::from_vec(vec![half::bf16::ONE; 6], &[2, 3], device).unwrap();
    for (shape, dtype, mention) in [
        (vec![2, 3], DType::BF16, "shape"),
        (vec![3, 2], DType::F16, "dtype"),
        (vec![6], DType::BF16, "shape"),
    ] {
        let mut out = poisoned(&shape, dtype, device);
        common::assert_invalid(
            transpose_into(&w, &mut out),
            "sparse_layers::transpose",
            "out",
            &[mention],
        );
        assert!(floats(&out).iter().all(|v| v.is_nan()), "out left as it was");
    }
    let vector = Tensor::from_vec(vec![1.0f32; 4], &[4], device).unwrap();
    common::assert_invalid(transpose(&vector), "sparse_layers::transpose", "w", &["2-d"]);
    if device.is_cuda() {
        let f32_matrix = Tensor::from_vec(vec![1.0f32; 4], &[2, 2], device).unwrap();
        common::assert_invalid(transpose(&f32_matrix), "sparse_layers::transpose", "w", &["f32"]);
    }
}

/// A tensor of NaNs.
fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let host = match dtype {
        DType::F32 => Tensor::from_vec(vec![f32::NAN; n], shape, &Device::Cpu),
        DType::BF16 => Tensor::from_vec(vec![half::bf16::NAN; n], shape, &Device::Cpu),
        _ => Tensor::from_vec(vec![half::f16::NAN; n], shape, &Device::Cpu),
    };
    host.unwrap().to_device(device).unwrap()
}

/// A small transpose with partial tiles at both edges, for compute-sanitizer.
fn small_transpose(device: &Device) {
    let (rows, cols) = (37, 70);
    // Integers below 256 are exact in bf16.
    let value = |i: usize| (i % 251) as f32;
    let values: Vec<half::bf16> = (0..rows * cols).map(|i| half::bf16::from_f32(value(i))).collect();
    let w = Tensor::from_vec(values, &[rows, cols], device).unwrap();
    let mut out = poisoned(&[cols, rows], DType::BF16, device);
    transpose_into(&w, &mut out).unwrap();
    let want: Vec<f32> = (0..rows * cols).map(|k| value((k % rows) * cols + k / rows)).collect();
    assert_eq!(floats(&out), want);
}

/// Which layers get copies: 2:4 and 1:2 with both dimensions multiples of 64, on a GPU by
/// default and on the CPU when asked; other patterns and shapes, and everything after densifying,
/// stay masked dense.
fn copies_exist_where_the_kernels_take_the_layer(device: &Device) {
    for family in [Family::Gpt2, Family::Llama] {
        let config = config(family);
        for (n, m) in [(2, 4), (1, 2), (2, 8)] {
            let mut params = GptParams::init_with_variants(&config, &nm_variants(n, m, false), device, 3).unwrap();
            assert_eq!(params.sparse_kernels(), device.is_cuda());
            params.set_sparse_kernels(true).unwrap();
            let checked = check_copies(&params, (n, m));
            let qualifying = params
                .layout
                .linears()
                .iter()
                .filter(|l| qualifies(NmPattern::new(n, m).unwrap(), l.input, l.output))
                .count();
            assert_eq!(checked, qualifying, "{family:?} {n}:{m}");
            if m == 8 {
                assert_eq!(checked, 0);
            } else {
                // Llama's key and value projections (64 -> 32) stay dense.
                let expected = if family == Family::Gpt2 { 8 } else { 10 };
                assert_eq!(checked, expected, "{family:?} {n}:{m}");
            }
            params.set_sparse_kernels(false).unwrap();
            assert!(params.masks.values().all(|m| m.sparse.is_none()));
            assert!(params.masks.values().all(|m| m.double_pruned.is_some()));
            params.set_sparse_kernels(true).unwrap();
            params.densify();
            assert!(params
                .layout
                .linears()
                .iter()
                .all(|l| params.sparse_copies(l.weight).is_none()));
        }
    }
}

/// The sparse path's loss and gradients are the masked dense path's (same weights, same masks,
/// the same double pruning), with and without adapters: the loss and all gradients together
/// within `tolerance`, each gradient tensor within `per_tensor` (a bias's gradient, a sum over
/// tokens of both signs, loses more of its relative precision in bf16).
fn sparse_path_equals_masked_dense(device: &Device) {
    let mut rng = common::rng();
    let (tolerance, per_tensor): (f64, f64) = if device.is_cuda() { (1e-2, 5e-2) } else { (1e-4, 1e-4) };
    for family in [Family::Gpt2, Family::Llama] {
        let config = config(family);
        // 32 tokens take the few-token GEMM, 112 the many-token one (with a partial block).
        for (adapters, batch) in [(false, 2), (false, 7), (true, 2), (true, 7)] {
            let variants = nm_variants(2, 4, adapters);
            let mut source = GptParams::init_with_variants(&config, &variants, device, 3).unwrap();
            randomise(&mut source, &mut rng);
            let sparse = twin(&source, 3, &variants, device, true);
            assert!(check_copies(&sparse, (2, 4)) > 0);
            let dense = twin(&source, 3, &variants, device, false);
            assert!(dense
                .layout
                .linears()
                .iter()
                .all(|l| dense.sparse_copies(l.weight).is_none()));
            let inputs = tokens(&config, &mut rng, batch * config.context);
            let targets = tokens(&config, &mut rng, batch * config.context);
            let (a, grads_a, sparse) = loss_and_grads(sparse, &inputs, &targets, config.context);
            let (b, grads_b, _) = loss_and_grads(dense, &inputs, &targets, config.context);
            let label = format!("{family:?}, adapters {adapters}, {} tokens", inputs.len());
            assert!(
                a.is_finite() && ((a - b).abs() as f64) <= tolerance * b.abs() as f64,
                "{label}: loss {a} vs {b}"
            );
            for (index, (got, want)) in grads_a.iter().zip(&grads_b).enumerate() {
                let name = &sparse.params[index].spec.name;
                assert!(got.iter().all(|g| g.is_finite()), "{label}: {name}");
                common::assert_close(
                    &format!("{label}: gradient of {name}"),
                    &to_f64(got),
                    &to_f64(want),
                    per_tensor,
                );
                if let Some(mask) = sparse.masks.get(&index) {
                    let kept = mask.mask.to_u8().unwrap().to_vec::<u8>().unwrap();
                    assert!(
                        got.iter().zip(&kept).all(|(&g, &k)| k == 1 || g == 0.0),
                        "{label}: {name} masked"
                    );
                }
            }
            let flat = |g: &[Vec<f32>]| g.iter().flatten().map(|&v| v as f64).collect::<Vec<_>>();
            common::assert_close(
                &format!("{label}: all gradients"),
                &flat(&grads_a),
                &flat(&grads_b),
                tolerance,
            );
        }
    }
}

/// Through AdamW steps, `set_value`, and a save and load, the copies stay the compressed masked
/// compute weight, the masks never change and the pruned master entries stay 0.
fn copies_follow_the_weights(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = config(family);
        let variants = nm_variants(2, 4, true);
        let mut params = GptParams::init_with_variants(&config, &variants, device, 3).unwrap();
        params.set_sparse_kernels(true).unwrap();
        randomise(&mut params, &mut rng);
        let masks: Vec<(usize, Vec<u8>)> = params
            .masks
            .iter()
            .map(|(&i, m)| (i, m.mask.to_u8().unwrap().to_vec::<u8>().unwrap()))
            .collect();
        let before = check_copies(&params, (2, 4));
        let (b, s) = (2, config.context);
        let mut model = Gpt::new(params, b, s).unwrap();
        let adamw = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut losses = Vec::new();
        let inputs = tokens(&config, &mut rng, b * s);
        let targets = tokens(&config, &mut rng, b * s);
        for step in 1..=5 {
            model.params.zero_grads().unwrap();
            losses.push(model.forward_backward(&inputs, &targets, b, s, 1.0).unwrap());
            model.params.adamw_step(&adamw, step, 1.0).unwrap();
            assert_eq!(check_copies(&model.params, (2, 4)), before, "{family:?}: step {step}");
        }
        assert!(
            losses.last().unwrap() < &losses[0],
            "{family:?}: the loss falls, {losses:?}"
        );
        let mut params = model.params;
        for (index, kept) in &masks {
            let mask = params.masks[index].mask.to_u8().unwrap().to_vec::<u8>().unwrap();
            assert_eq!(&mask, kept, "{family:?}: the mask never changes");
            let value = params.params[*index].value.to_vec::<f32>().unwrap();
            assert!(value.iter().zip(kept).all(|(&v, &k)| k == 1 || v.to_bits() == 0));
        }
        let linear = *params.layout.linears()[0];
        let n = linear.input * linear.output;
        params
            .set_value(linear.weight, (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect())
            .unwrap();
        assert_eq!(check_copies(&params, (2, 4)), before, "{family:?}: after set_value");
        let dir = std::env::temp_dir().join(format!("tessera-sparse-model-{}-{family:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        params.save(&path).unwrap();
        let mut loaded = GptParams::load(&path, None, device).unwrap();
        loaded.set_sparse_kernels(true).unwrap();
        assert_eq!(check_copies(&loaded, (2, 4)), before, "{family:?}: after loading");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Cached generation through the sparse path (adapters on, unmerged) against the masked dense
/// path: prefill and every decode step's logits within tolerance and the same greedy tokens.
/// The two paths are fed the same tokens, and a step whose two best dense logits are closer than
/// the tolerance allows is not asked to agree on its argmax (rounding may pick either).
fn sparse_generation_equals_masked_dense(device: &Device) {
    let mut rng = common::rng();
    let tolerance: f64 = if device.is_cuda() { 2e-2 } else { 1e-5 };
    let margin = if device.is_cuda() { 3e-2 } else { 1e-4 };
    for family in [Family::Gpt2, Family::Llama] {
        let config = config(family);
        let variants = nm_variants(2, 4, true);
        let mut source = GptParams::init_with_variants(&config, &variants, device, 3).unwrap();
        randomise(&mut source, &mut rng);
        let sparse = Gpt::new(twin(&source, 3, &variants, device, true), 1, 4).unwrap();
        let dense = Gpt::new(twin(&source, 3, &variants, device, false), 1, 4).unwrap();
        let prompt = tokens(&config, &mut rng, 5);
        let (mut cache_s, mut cache_d) = (sparse.kv_cache(1).unwrap(), dense.kv_cache(1).unwrap());
        let mut logits_s = floats(sparse.prefill(&mut cache_s, &prompt).unwrap());
        let mut logits_d = floats(dense.prefill(&mut cache_d, &prompt).unwrap());
        let mut agreed = 0;
        for step in 0..config.context - prompt.len() {
            let label = format!("{family:?}: step {step}");
            common::assert_close(&label, &to_f64(&logits_s), &to_f64(&logits_d), tolerance);
            let argmax = |l: &[f32]| {
                (0..l.len())
                    .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
                    .unwrap()
            };
            let best = argmax(&logits_d);
            let mut sorted = logits_d.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let scale = logits_d.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            if sorted[0] - sorted[1] > margin * scale {
                assert_eq!(argmax(&logits_s), best, "{label}: greedy token");
                agreed += 1;
            }
            let token = [best as u32];
            logits_s = floats(sparse.decode(&mut cache_s, &token).unwrap());
            logits_d = floats(dense.decode(&mut cache_d, &token).unwrap());
        }
        assert!(agreed >= 3, "{family:?}: only {agreed} steps had a clear greedy token");
        if !device.is_cuda() {
            let greedy = tessera::model::generate::Sampling::greedy();
            let (mut sparse, mut dense) = (sparse, dense);
            let a = tessera::model::generate::generate(&mut sparse, &prompt, 8, &greedy, 1).unwrap();
            let b = tessera::model::generate::generate(&mut dense, &prompt, 8, &greedy, 1).unwrap();
            assert_eq!(a, b, "{family:?}: greedy generation");
        }
    }
}

/// The GPU's model (bf16, 2:4 layers through the sparse kernels) follows the CPU's (f32,
/// masked dense): loss, gradients, and exact zeros at the pruned positions on both.
#[test]
fn gpu_sparse_model_follows_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        let config = config(family);
        let variants = nm_variants(2, 4, true);
        let mut cpu = GptParams::init_with_variants(&config, &variants, &Device::Cpu, 5).unwrap();
        randomise(&mut cpu, &mut rng);
        let on_gpu = twin(&cpu, 5, &variants, &gpu, true);
        assert!(check_copies(&on_gpu, (2, 4)) > 0);
        let inputs = tokens(&config, &mut rng, 7 * config.context);
        let targets = tokens(&config, &mut rng, 7 * config.context);
        let (a, grads_a, cpu) = loss_and_grads(cpu, &inputs, &targets, config.context);
        let (b, grads_b, _) = loss_and_grads(on_gpu, &inputs, &targets, config.context);
        assert!(
            (a - b).abs() <= 2e-2 * a.abs(),
            "{family:?}: CPU loss {a}, GPU loss {b}"
        );
        let flat = |g: &[Vec<f32>]| g.iter().flatten().map(|&v| v as f64).collect::<Vec<_>>();
        common::assert_close("gradients", &flat(&grads_b), &flat(&grads_a), 6e-2);
        for (&index, mask) in &cpu.masks {
            let kept = mask.mask.to_u8().unwrap().to_vec::<u8>().unwrap();
            assert!(grads_b[index].iter().zip(&kept).all(|(&g, &k)| k == 1 || g == 0.0));
        }
    }
}

fn logits_of(params: GptParams, inputs: &[u32]) -> (Vec<f32>, GptParams) {
    let (b, s) = (2, inputs.len() / 2);
    let mut model = Gpt::new(params, b, s).unwrap();
    let logits = floats(model.logits(inputs, b, s).unwrap());
    (logits, model.params)
}

/// The inference export: compressed layers without their dense weights, bf16 elsewhere, the
/// bytes the recipes report counts; read back, it computes what the model with bf16-rounded
/// weights computes (bit for bit, both paths read the same values), generates the same text,
/// and training refuses it.
fn export_round_trip(device: &Device) {
    let mut rng = common::rng();
    for family in [Family::Gpt2, Family::Llama] {
        // Every block linear takes the format (Llama's key and value projections 64 -> 64).
        let config = GptConfig {
            kv_heads: 4,
            ..config(family)
        };
        let variants = nm_variants(2, 4, true);
        let mut params = GptParams::init_with_variants(&config, &variants, device, 3).unwrap();
        randomise(&mut params, &mut rng);
        let dir = std::env::temp_dir().join(format!("tessera-sparse-export-{}-{family:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        export_sparse24(&params, &path).unwrap();

        let file = SafeTensors::load(&path).unwrap();
        let mut expected_bytes = 0;
        for (index, p) in params.params.iter().enumerate() {
            let numel: usize = p.spec.shape.iter().product();
            let (values, meta) = sparse24_names(&p.spec.name);
            if params.masks.contains_key(&index) {
                assert!(file.get(&p.spec.name).is_err(), "{}: no dense weight", p.spec.name);
                assert_eq!(file.get(&values).unwrap().dtype(), DType::BF16);
                assert_eq!(file.get(&meta).unwrap().dtype(), DType::U32);
                expected_bytes += numel + numel / 8;
            } else {
                assert_eq!(file.get(&p.spec.name).unwrap().dtype(), DType::BF16, "{}", p.spec.name);
                expected_bytes += 2 * numel;
            }
        }
        let bytes: usize = file.names().map(|n| file.get(n).unwrap().size_in_bytes()).sum();
        assert_eq!(bytes, expected_bytes, "{family:?}: exported bytes");

        let loaded = GptParams::load(&path, None, device).unwrap();
        assert!(loaded.is_inference_export());
        assert_eq!(loaded.masks.len(), params.masks.len());
        for (index, mask) in &params.masks {
            assert_eq!(
                loaded.masks[index].mask.to_u8().unwrap().to_vec::<u8>().unwrap(),
                mask.mask.to_u8().unwrap().to_vec::<u8>().unwrap(),
                "{family:?}: the metadata holds the mask"
            );
        }
        let mut rounded = GptParams::init_with_variants(&config, &variants, device, 3).unwrap();
        for (index, p) in params.params.iter().enumerate() {
            let values = p.value.to_vec::<f32>().unwrap();
            let values = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            rounded.set_value(index, values).unwrap();
        }
        let inputs = tokens(&config, &mut rng, 2 * config.context);
        let (want, rounded) = logits_of(rounded, &inputs);
        let (got, loaded) = logits_of(loaded, &inputs);
        assert!(got.iter().all(|v| v.is_finite()));
        assert_eq!(got, want, "{family:?}: logits of the export");

        let greedy = tessera::model::generate::Sampling::greedy();
        let prompt = tokens(&config, &mut rng, 4);
        let (mut a, mut b) = (Gpt::new(loaded, 1, 4).unwrap(), Gpt::new(rounded, 1, 4).unwrap());
        let from_export = tessera::model::generate::generate(&mut a, &prompt, 8, &greedy, 1).unwrap();
        let reference = tessera::model::generate::generate(&mut b, &prompt, 8, &greedy, 1).unwrap();
        assert_eq!(from_export, reference, "{family:?}: greedy generation from the export");

        let error = Trainer::resume(&dir, device).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("inference export"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Layers without a compressed form are refused by name: a pattern the format does not take,
/// dimensions it does not take, an nm layer not pruned yet, an unstructured layer.
#[test]
fn export_refuses_layers_without_a_compressed_form() {
    let gpt2 = GptConfig {
        kv_heads: 4,
        ..config(Family::Gpt2)
    };
    let path = std::env::temp_dir().join(format!(
        "tessera-sparse-export-refused-{}.safetensors",
        std::process::id()
    ));
    let cases = [
        (gpt2.clone(), nm_variants(2, 8, false), "2:8"),
        (config(Family::Llama), nm_variants(2, 4, false), "k_proj"),
        (
            gpt2.clone(),
            LinearVariants::all(LinearSpec {
                variant: Variant::Nm {
                    n: 2,
                    m: 4,
                    prune_step: 5,
                },
                lora: None,
            }),
            "not pruned yet",
        ),
        (
            gpt2,
            LinearVariants::all(LinearSpec {
                variant: Variant::Unstructured { density: 0.5, seed: 1 },
                lora: None,
            }),
            "unstructured",
        ),
    ];
    for (config, variants, mention) in cases {
        let params = GptParams::init_with_variants(&config, &variants, &Device::Cpu, 3).unwrap();
        common::assert_invalid(export_sparse24(&params, &path), "export_sparse24", "params", &[mention]);
        assert!(!path.exists(), "nothing written");
    }
}

on_each_device!(
    export_round_trip,
    transpose_matches_naive,
    small_transpose,
    copies_exist_where_the_kernels_take_the_layer,
    sparse_path_equals_masked_dense,
    copies_follow_the_weights,
    sparse_generation_equals_masked_dense,
);

/// `tessera export --sparse24` from a trained 2:4 run: generate and eval read the export, and
/// training refuses to resume from it (exit code 2, naming why).
#[test]
fn command_line_exports_generates_and_refuses_to_train() {
    let dir = std::env::temp_dir().join(format!("tessera-sparse-export-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("slope.toml");
    std::fs::write(
        &config,
        r#"
[model]
layers = 2
heads = 2
kv_heads = 2
width = 64
ffn_width = 128
context = 16

[model.linears.default]
variant = "nm"
n = 2
m = 4
lora = { rank = 2, alpha = 4.0, frozen_base = false }

[train]
batch = 2
seq = 16
steps = 3
warmup = 1
eval_windows = 2
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
        (output.status.code(), text)
    };
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (out, export) = (dir.join("run"), dir.join("export"));
    let (code, text) = run(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&config),
        "--out",
        &path(&out),
    ]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&["export", "--checkpoint", &path(&out), "--out", &path(&export)]);
    assert_eq!(code, Some(2), "no form named: {text}");
    let (code, text) = run(&[
        "export",
        "--sparse24",
        "--checkpoint",
        &path(&out),
        "--out",
        &path(&export),
    ]);
    assert_eq!(code, Some(0), "{text}");
    let file = SafeTensors::load(export.join("model.safetensors")).unwrap();
    assert!(file
        .names()
        .any(|n| n == "tessera.transformer.h.0.mlp.c_fc.sparse24_values"));
    assert!(file.names().all(|n| n != "transformer.h.0.mlp.c_fc.weight"));
    let (code, text) = run(&[
        "generate",
        "--device",
        "cpu",
        "--checkpoint",
        &path(&export),
        "--tokens",
        "5",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("5 tokens in"), "{text}");
    let data = dir.join("text.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap();
    let (code, text) = run(&[
        "eval",
        "--device",
        "cpu",
        "--checkpoint",
        &path(&export),
        "--data",
        &path(&data),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("perplexity"), "{text}");
    let (code, text) = run(&["train", "--device", "cpu", "--resume", "--out", &path(&export)]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("inference export"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
