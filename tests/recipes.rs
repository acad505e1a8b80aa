//! The model-agnostic training recipes as trainer options: GrowLength (§8.2), active forgetting
//! (§10.1), GAP (§10.2) and Fast Forward (§7) with fine-tuning from a checkpoint. Each changes what it should and nothing else (checked bit for bit
//! against AdamW applied by hand to the state before the step), resumes exactly, and trains.

#[macro_use]
mod common;

use std::path::PathBuf;
use tessera::model::{
    Activation, Attention, Family, Gpt, GptConfig, GptParams, LinearSpec, LinearVariants, LoraSpec, Norm, Positions,
    Variant,
};
use tessera::ops::{self, AdamWConfig, AdamWTensor};
use tessera::optim::WarmupCosine;
use tessera::train::trainer::{checkpoint_dir, forget_seed, TrainOptions, Trainer};
use tessera::train::Corpus;
use tessera::{DType, Device, Tensor};

fn config(family: Family) -> GptConfig {
    let gpt2 = family == Family::Gpt2;
    GptConfig {
        family,
        vocab: 256,
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
        // GPT-2 ties the head to the embedding, Llama does not: forgetting resets the head
        // only in the first.
        tied_embeddings: gpt2,
        attention: Attention::Causal,
        wavelet: false,
    }
}

fn options(steps: u64) -> TrainOptions {
    TrainOptions {
        batch: 2,
        seq: 8,
        steps,
        warmup: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        eval_every: 0,
        eval_windows: 4,
        gap_tokens: 8,
        ..TrainOptions::tiny()
    }
}

fn corpus() -> Corpus {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    Corpus::from_bytes("test", text.as_bytes()).unwrap()
}

fn scratch(name: &str, device: &Device) -> PathBuf {
    let kind = if device.is_cuda() { "gpu" } else { "cpu" };
    let dir = std::env::temp_dir().join(format!("tessera-recipes-{name}-{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every parameter's value, compute copy and moments, as bytes.
#[derive(Clone, Debug, PartialEq)]
struct State {
    value: Vec<u8>,
    compute: Option<Vec<u8>>,
    exp_avg: Vec<u8>,
    exp_avg_sq: Vec<u8>,
}

fn state(trainer: &Trainer) -> Vec<State> {
    trainer
        .model
        .params
        .params
        .iter()
        .map(|p| State {
            value: p.value.to_bytes().unwrap(),
            compute: p.compute.as_ref().map(|c| c.to_bytes().unwrap()),
            exp_avg: p.exp_avg.to_bytes().unwrap(),
            exp_avg_sq: p.exp_avg_sq.to_bytes().unwrap(),
        })
        .collect()
}

/// `before`'s parameter `index` after one AdamW update with the gradient the trainer holds now.
fn adamw_by_hand(
    trainer: &Trainer,
    before: &State,
    index: usize,
    config: &AdamWConfig,
    step: u64,
    device: &Device,
) -> State {
    let p = &trainer.model.params.params[index];
    let shape = &p.spec.shape;
    let f32_tensor = |bytes: &[u8]| Tensor::from_bytes(bytes, DType::F32, shape, device).unwrap();
    let (mut value, mut exp_avg, mut exp_avg_sq) = (
        f32_tensor(&before.value),
        f32_tensor(&before.exp_avg),
        f32_tensor(&before.exp_avg_sq),
    );
    let mut compute = before
        .compute
        .as_ref()
        .map(|bytes| Tensor::from_bytes(bytes, DType::BF16, shape, device).unwrap());
    let mut tensors = [AdamWTensor {
        param: &mut value,
        grad: &p.grad,
        exp_avg: &mut exp_avg,
        exp_avg_sq: &mut exp_avg_sq,
        param_bf16: compute.as_mut(),
        weight_decay: p.spec.weight_decay,
    }];
    ops::adamw_step(&mut tensors, config, step, 1.0).unwrap();
    State {
        value: value.to_bytes().unwrap(),
        compute: compute.map(|c| c.to_bytes().unwrap()),
        exp_avg: exp_avg.to_bytes().unwrap(),
        exp_avg_sq: exp_avg_sq.to_bytes().unwrap(),
    }
}

fn adamw(options: &TrainOptions, lr: f32) -> AdamWConfig {
    AdamWConfig {
        lr,
        beta1: options.beta1,
        beta2: options.beta2,
        eps: 1e-8,
        weight_decay: options.weight_decay,
    }
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len() as f32
}

/// Stages 2, 4, 8 over 9 steps: three steps each, 16 tokens per micro-batch throughout.
fn grow_length_steps_have_the_planned_shapes(device: &Device) {
    let corpus = corpus();
    let grow = TrainOptions {
        grow_from: 2,
        accumulation: 2,
        ..options(9)
    };
    assert_eq!(grow.stages(), vec![2, 4, 8]);
    assert_eq!(options(9).stages(), vec![8]);
    let mut trainer = Trainer::new(&config(Family::Gpt2), grow, device).unwrap();
    let shapes: Vec<(usize, usize, usize)> = (0..9)
        .map(|_| {
            let r = trainer.train_step(&corpus).unwrap();
            assert!(r.loss.is_finite());
            (r.batch, r.seq, r.tokens)
        })
        .collect();
    let planned = [(8, 2), (8, 2), (8, 2), (4, 4), (4, 4), (4, 4), (2, 8), (2, 8), (2, 8)];
    for (step, ((batch, seq, tokens), (b, l))) in shapes.iter().zip(planned).enumerate() {
        assert_eq!((*batch, *seq), (b, l), "step {}", step + 1);
        assert_eq!(*tokens, 2 * 16, "step {}: tokens per step", step + 1);
    }
    // Uneven splits give stages step counts that differ by at most one, lengths up to seq.
    let uneven = TrainOptions {
        grow_from: 1,
        ..options(10)
    };
    let lengths: Vec<usize> = (1..=10).map(|s| uneven.batch_shape(s).1).collect();
    assert_eq!(lengths, [1, 1, 1, 2, 2, 4, 4, 4, 8, 8]);
    assert!((1..=10).all(|s| {
        let (b, l) = uneven.batch_shape(s);
        b * l == 16
    }));
    let bad = TrainOptions {
        grow_from: 3,
        ..options(9)
    };
    common::assert_invalid(
        Trainer::new(&config(Family::Gpt2), bad, device).map(|_| ()),
        "train",
        "grow_from",
        &["power of two"],
    );
}

/// Every step of a run with a reset every 3 steps, against AdamW by hand: the body's update is
/// the ordinary one at the global step and learning rate; the embedding's uses its episode step
/// (bias correction restarts) and the schedule replayed within the episode; after steps 3, 6 and
/// 9 the embedding is the seeded fresh draw with zero moments, and nothing else differs.
fn forgetting_resets_exactly_the_embedding(device: &Device) {
    let corpus = corpus();
    for family in [Family::Gpt2, Family::Llama] {
        let config = config(family);
        let forget = TrainOptions {
            forget_every: 3,
            grad_clip: None,
            ..options(9)
        };
        let schedule = WarmupCosine::new(forget.lr, forget.min_lr, forget.warmup, forget.steps).unwrap();
        let mut trainer = Trainer::new(&config, forget.clone(), device).unwrap();
        let embedding = trainer.model.params.layout.token_embedding;
        for step in 1..=9u64 {
            let before = state(&trainer);
            let record = trainer.train_step(&corpus).unwrap();
            let after = state(&trainer);
            assert_eq!(record.lr, schedule.lr(step));
            let episode_step = (step - 1) % 3 + 1;
            for (i, (old, new)) in before.iter().zip(&after).enumerate() {
                let name = &trainer.model.params.params[i].spec.name;
                if i == embedding && step.is_multiple_of(3) {
                    let mut fresh = GptParams::init(&config, device, forget.seed).unwrap();
                    fresh.redraw(embedding, forget_seed(forget.seed, step)).unwrap();
                    let p = &fresh.params[embedding];
                    assert_eq!(new.value, p.value.to_bytes().unwrap(), "step {step}: {name} redrawn");
                    assert_ne!(new.value, old.value, "step {step}: {name} changed");
                    assert_eq!(new.compute, p.compute.as_ref().map(|c| c.to_bytes().unwrap()));
                    assert!(new.exp_avg.iter().chain(&new.exp_avg_sq).all(|&b| b == 0));
                    continue;
                }
                let expected = if i == embedding {
                    // Positions 3, 6, 9 of 9 steps: the schedule sampled every steps/K = 3 steps.
                    adamw_by_hand(
                        &trainer,
                        old,
                        i,
                        &adamw(&forget, schedule.lr(episode_step * 3)),
                        episode_step,
                        device,
                    )
                } else {
                    adamw_by_hand(&trainer, old, i, &adamw(&forget, record.lr), step, device)
                };
                assert_eq!(*new, expected, "{family:?} step {step}: {name}");
            }
        }
        // The redraw is N(0, 0.02²) and depends on the step.
        let values = trainer.model.params.params[embedding].value.to_vec::<f32>().unwrap();
        let m = mean(&values);
        let sd = (values.iter().map(|v| (v - m).powi(2)).sum::<f32>() / values.len() as f32).sqrt();
        assert!(m.abs() < 2e-3 && (sd - 0.02).abs() < 2e-3, "mean {m}, sd {sd}");
        assert_ne!(forget_seed(forget.seed, 3), forget_seed(forget.seed, 6));
    }
    let bad = TrainOptions {
        forget_every: 10,
        ..options(9)
    };
    common::assert_invalid(
        Trainer::new(&config(Family::Gpt2), bad, device).map(|_| ()),
        "train",
        "forget_every",
        &["at most steps (9)"],
    );
}

/// A run with each recipe on, interrupted mid-stage and mid-episode, repeats the uninterrupted one.
fn resume_equals_uninterrupted_with_each_recipe(device: &Device) {
    let corpus = corpus();
    let recipes = [
        TrainOptions {
            grow_from: 2,
            ..options(9)
        },
        TrainOptions {
            forget_every: 3,
            ..options(9)
        },
        TrainOptions {
            grow_from: 4,
            forget_every: 2,
            ..options(9)
        },
    ];
    for (n, recipe) in recipes.into_iter().enumerate() {
        let mut straight = Trainer::new(&config(Family::Llama), recipe.clone(), device).unwrap();
        let expected: Vec<f32> = (0..9).map(|_| straight.train_step(&corpus).unwrap().loss).collect();
        let dir = scratch(&format!("resume-{n}"), device);
        let mut first = Trainer::new(&config(Family::Llama), recipe.clone(), device).unwrap();
        let mut got: Vec<f32> = (0..4).map(|_| first.train_step(&corpus).unwrap().loss).collect();
        first.save(&dir).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&dir, device).unwrap();
        assert_eq!(resumed.options, recipe, "the options are restored");
        got.extend((0..5).map(|_| resumed.train_step(&corpus).unwrap().loss));
        assert_eq!(got, expected, "{recipe:?}");
        assert_eq!(state(&resumed), state(&straight));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// GrowLength and active forgetting train: the loss falls and validation beats the unigram model.
fn recipes_lower_the_loss(device: &Device) {
    let corpus = corpus();
    let recipes = [
        TrainOptions {
            grow_from: 2,
            ..options(60)
        },
        TrainOptions {
            forget_every: 40,
            ..options(60)
        },
    ];
    for recipe in recipes {
        let fast = TrainOptions {
            batch: 4,
            lr: 1e-2,
            min_lr: 1e-3,
            ..recipe
        };
        let mut trainer = Trainer::new(&config(Family::Gpt2), fast.clone(), device).unwrap();
        let initial = trainer.validate(&corpus).unwrap();
        let losses: Vec<f32> = (0..60).map(|_| trainer.train_step(&corpus).unwrap().loss).collect();
        let (start, end) = (mean(&losses[..3]), mean(&losses[57..]));
        assert!(end < 0.7 * start, "{fast:?}: loss went from {start} to {end}");
        let validation = trainer.validate(&corpus).unwrap();
        assert!(
            validation < initial && validation < corpus.unigram_loss(256) as f32,
            "{fast:?}: validation {initial} -> {validation}"
        );
    }
}

/// A GAP step is an ordinary AdamW step (GAP's settings) on the negated gradient, and raises
/// the loss on its sample.
fn gap_step_is_a_negated_step(device: &Device) {
    let corpus = corpus();
    for family in [Family::Gpt2, Family::Llama] {
        // A learning rate that moves bf16 weights on a GPU (5e-5 is below their rounding step).
        let small = TrainOptions {
            gap_lr: 1e-3,
            ..options(5)
        };
        let mut gap = Trainer::new(&config(family), small.clone(), device).unwrap();
        let mut plain = Trainer::new(&config(family), small, device).unwrap();
        for _ in 0..5 {
            gap.train_step(&corpus).unwrap();
            plain.train_step(&corpus).unwrap();
        }
        let (inputs, targets) = gap.gap_sample(&corpus).unwrap();
        assert_eq!(inputs.len(), 8);
        assert_eq!(inputs[1..], targets[..7]);
        let before = gap.model.loss(&inputs, &targets, 1, 8).unwrap();
        let loss = gap.gap_step(&inputs, &targets, 1).unwrap();
        assert_eq!(loss, before);
        let after = gap.model.loss(&inputs, &targets, 1, 8).unwrap();
        assert!(after > before, "{family:?}: sample loss {before} -> {after}");

        plain.model.params.zero_grads().unwrap();
        plain.model.forward_backward(&inputs, &targets, 1, 8, 1.0).unwrap();
        for p in &mut plain.model.params.params {
            let negated: Vec<f32> = p.grad.to_vec::<f32>().unwrap().iter().map(|g| -g).collect();
            p.grad = Tensor::from_vec(negated, &p.spec.shape, device).unwrap();
        }
        let defaults = TrainOptions::tiny().gap_adamw();
        assert_eq!(
            (defaults.lr, defaults.beta1, defaults.beta2, defaults.weight_decay),
            (5e-5, 0.9, 0.98, 0.0)
        );
        let config = AdamWConfig { lr: 1e-3, ..defaults };
        assert_eq!(plain.options.gap_adamw(), config);
        plain.model.params.adamw_step(&config, 1, 1.0).unwrap();
        assert_eq!(state(&gap), state(&plain), "{family:?}");
    }
}

/// A GAP run: the sample's loss rises update after update, the kept parameters are those of the
/// step with the lowest validation loss, and the run is repeatable.
fn gap_keeps_the_best_step(device: &Device) {
    let corpus = corpus();
    let trained = |steps| {
        let options = TrainOptions {
            gap_steps: 6,
            gap_lr: 1e-3,
            ..options(steps)
        };
        let mut trainer = Trainer::new(&config(Family::Gpt2), options, device).unwrap();
        for _ in 0..steps {
            trainer.train_step(&corpus).unwrap();
        }
        trainer
    };
    let mut trainer = trained(20);
    let report = trainer.gap(&corpus).unwrap();
    assert_eq!(report.steps.len(), 6);
    assert_eq!(report.sample_tokens, 8);
    let sample: Vec<f32> = report.steps.iter().map(|s| s.sample_loss).collect();
    assert!(
        sample.windows(2).all(|w| w[1] > w[0]) && report.sample_loss_after > sample[0],
        "sample losses {sample:?}, after {}",
        report.sample_loss_after
    );
    let best = report.steps.iter().map(|s| s.validation).fold(f32::INFINITY, f32::min);
    assert_eq!(report.steps[report.best].validation, best);
    assert_eq!(
        trainer.validate(&corpus).unwrap(),
        best,
        "the best step's parameters are kept"
    );
    assert_eq!(trainer.step(), 20);
    assert_eq!(trained(20).gap(&corpus).unwrap(), report);

    let dir = scratch("gap", device);
    trainer.save_model(&dir).unwrap();
    let loaded = GptParams::load(dir.join("model.safetensors"), None, device).unwrap();
    for (a, b) in loaded.params.iter().zip(&trainer.model.params.params) {
        assert_eq!(a.value.to_bytes().unwrap(), b.value.to_bytes().unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();

    trainer.options.gap_lr = 0.0;
    common::assert_invalid(trainer.gap(&corpus).map(|_| ()), "train", "gap_lr", &["> 0"]);
}

/// Every parameter's gradient, as f32.
fn grads(model: &Gpt) -> Vec<Vec<f32>> {
    model
        .params
        .params
        .iter()
        .map(|p| p.grad.to_vec::<f32>().unwrap())
        .collect()
}

fn model(family: Family, seed: u64, device: &Device) -> Gpt {
    let params = GptParams::init(&config(family), device, seed).unwrap();
    Gpt::new(params, 2, 8).unwrap()
}

fn tokens(seed: u64) -> Vec<u32> {
    (0..16).map(|i| (splitmix(seed + i) % 256) as u32).collect()
}

fn splitmix(x: u64) -> u64 {
    tessera::train::data::splitmix64(x)
}

/// FBI-LLM's distillation with the next-token weight at 1 is next-token training: the same loss
/// and the same gradients, whatever the teacher says; at a loss scale of ½ the gradients halve.
fn distillation_at_ce_weight_one_is_next_token_training(device: &Device) {
    let tolerance = if device.is_cuda() { 2e-2 } else { 1e-4 };
    for family in [Family::Gpt2, Family::Llama] {
        let (inputs, targets) = (tokens(1), tokens(2));
        let mut teacher = model(family, 99, device);
        let teacher_logits = teacher.logits(&inputs, 2, 8).unwrap();
        for scale in [1.0f32, 0.5] {
            let mut plain = model(family, 5, device);
            plain.params.zero_grads().unwrap();
            let expected = plain.forward_backward(&inputs, &targets, 2, 8, scale).unwrap();
            let mut distilled = model(family, 5, device);
            distilled.params.zero_grads().unwrap();
            let got = distilled
                .forward_backward_distill(&inputs, &targets, teacher_logits, 1.0, 2, 8, scale)
                .unwrap();
            assert!(
                (got - expected).abs() <= tolerance * expected.abs(),
                "{family:?}: {got} vs {expected}"
            );
            for (index, (g, e)) in grads(&distilled).iter().zip(grads(&plain)).enumerate() {
                let norm = e.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
                assert!(norm > 0.0, "{family:?} parameter {index} has no gradient");
                for (a, b) in g.iter().zip(&e) {
                    assert!(
                        (a - b).abs() <= tolerance * norm,
                        "{family:?} scale {scale} parameter {index}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// A student distilled from itself (pure distillation) has nothing to learn: every gradient is 0,
/// and the loss is the teacher's entropy, between 0 and ln(vocab).
fn self_distillation_has_no_gradient(device: &Device) {
    for family in [Family::Gpt2, Family::Llama] {
        let inputs = tokens(3);
        let mut teacher = model(family, 5, device);
        let teacher_logits = teacher.logits(&inputs, 2, 8).unwrap();
        let mut student = model(family, 5, device);
        student.params.zero_grads().unwrap();
        let loss = student
            .forward_backward_distill(&inputs, &tokens(4), teacher_logits, 0.0, 2, 8, 1.0)
            .unwrap();
        assert!(loss > 0.0 && loss < (256f32).ln() + 1e-3, "{family:?}: entropy {loss}");
        for (index, g) in grads(&student).iter().enumerate() {
            let largest = g.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!(largest <= 1e-6, "{family:?} parameter {index}: gradient {largest}");
        }
    }
}

/// A student trained by distillation from a trained teacher learns (its validation loss falls
/// below the unigram model's), resumes exactly with its teacher, and a teacher with another
/// vocabulary is refused.
fn distillation_trains_and_resumes(device: &Device) {
    let corpus = corpus();
    let teacher_dir = scratch("teacher", device);
    let fast = TrainOptions {
        batch: 4,
        lr: 1e-2,
        min_lr: 1e-3,
        ..options(40)
    };
    let mut teacher = Trainer::new(&config(Family::Gpt2), fast.clone(), device).unwrap();
    for _ in 0..40 {
        teacher.train_step(&corpus).unwrap();
    }
    teacher.save(&teacher_dir).unwrap();
    let distill = TrainOptions {
        distill_from: Some(teacher_dir.to_str().unwrap().into()),
        seed: 7,
        ..fast
    };
    // The student may differ from its teacher in everything but the vocabulary.
    let mut student = Trainer::new(&config(Family::Llama), distill.clone(), device).unwrap();
    let initial = student.validate(&corpus).unwrap();
    for _ in 0..40 {
        student.train_step(&corpus).unwrap();
    }
    let validation = student.validate(&corpus).unwrap();
    assert!(
        validation < initial && validation < corpus.unigram_loss(256) as f32,
        "validation {initial} -> {validation}"
    );

    let short = TrainOptions {
        steps: 6,
        ..distill.clone()
    };
    let mut straight = Trainer::new(&config(Family::Llama), short.clone(), device).unwrap();
    let expected: Vec<f32> = (0..6).map(|_| straight.train_step(&corpus).unwrap().loss).collect();
    let dir = scratch("distill-resume", device);
    let mut first = Trainer::new(&config(Family::Llama), short.clone(), device).unwrap();
    let mut got: Vec<f32> = (0..3).map(|_| first.train_step(&corpus).unwrap().loss).collect();
    first.save(&dir).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&dir, device).unwrap();
    assert_eq!(resumed.options, short);
    got.extend((0..3).map(|_| resumed.train_step(&corpus).unwrap().loss));
    assert_eq!(got, expected);

    let other_vocab = GptConfig {
        vocab: 300,
        ..config(Family::Llama)
    };
    let refused = Trainer::new(&other_vocab, distill, device)
        .err()
        .expect("a teacher of another vocabulary");
    assert!(refused.to_string().contains("vocabulary"), "{refused}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&teacher_dir).unwrap();
}

/// Dense block linear layers with rank-4 LoRA adapters.
fn lora(frozen_base: bool) -> LinearVariants {
    LinearVariants::all(LinearSpec {
        variant: Variant::Dense,
        lora: Some(LoraSpec {
            rank: 4,
            alpha: 8.0,
            frozen_base,
        }),
    })
}

/// Fast Forward every 3 steps after a 2-step burn-in: the adapters are copied after steps 4 and
/// 7, and stages follow steps 5 and 8; a tiny set of 4 windows.
fn fast_forward_options(steps: u64, compat: bool) -> TrainOptions {
    TrainOptions {
        fast_forward_every: 3,
        fast_forward_burn_in: 2,
        fast_forward_tiny: 4,
        fast_forward_reference_compat: compat,
        lr: 1e-2,
        min_lr: 1e-3,
        ..options(steps)
    }
}

fn adapter_values(trainer: &Trainer) -> Vec<Vec<f32>> {
    trainer
        .adapter_indices()
        .into_iter()
        .map(|i| trainer.model.params.params[i].value.to_vec::<f32>().unwrap())
        .collect()
}

/// `p + times·Δ`, adding `Δ` one step at a time in f32 as the trainer does.
fn forwarded(p: &[Vec<f32>], delta: &[Vec<f32>], times: u32) -> Vec<Vec<f32>> {
    p.iter()
        .zip(delta)
        .map(|(p, d)| {
            p.iter()
                .zip(d)
                .map(|(&p, &d)| (0..times).fold(p, |v, _| v + d))
                .collect()
        })
        .collect()
}

/// A Fast Forward stage, against a twin run without it (identical up to the stage): Δ is the
/// twin's last AdamW update of the adapters; the stage's recorded tiny-set losses are those of
/// the adapters at `P + j·Δ` (evaluated on the twin); it stops where the spec says (the crate's
/// default: at the first loss above the previous one, the pre-stage loss included, undone;
/// reference_compat: no pre-stage loss, the worse step kept, two steps at least); the adapters end
/// at `P + kept·Δ` exactly; every other master, every compute copy but the adapters', all AdamW
/// moments, the step counter and the schedule are those of the twin, bit for bit.
fn fast_forward_moves_only_the_adapters(device: &Device) {
    let corpus = corpus();
    let mut stages_with_kept_steps = 0;
    for family in [Family::Gpt2, Family::Llama] {
        for compat in [false, true] {
            let ff = fast_forward_options(8, compat);
            let mut trainer = Trainer::with_variants(&config(family), &lora(true), ff.clone(), device).unwrap();
            let plain = TrainOptions {
                fast_forward_every: 0,
                ..ff.clone()
            };
            let mut twin = Trainer::with_variants(&config(family), &lora(true), plain, device).unwrap();
            let adapters = trainer.adapter_indices();
            assert_eq!(adapters.len(), 2 * trainer.model.params.layout.linears().len());
            for step in 1..=8u64 {
                let previous = adapter_values(&trainer);
                let record = trainer.train_step(&corpus).unwrap();
                let twin_record = twin.train_step(&corpus).unwrap();
                assert_eq!(
                    (record.loss, record.lr),
                    (twin_record.loss, twin_record.lr),
                    "step {step}"
                );
                assert_eq!(trainer.step(), step);
                let Some(count) = record.fast_forward else {
                    assert!(![5, 8].contains(&step), "a stage after step {step}");
                    assert_eq!(state(&trainer), state(&twin), "step {step}");
                    continue;
                };
                assert!([5, 8].contains(&step), "no stage after step {step}");
                let stage = trainer.fast_forward_log().last().unwrap().clone();
                assert_eq!((stage.step, stage.count), (step, count));
                let p = adapter_values(&twin);
                let delta: Vec<Vec<f32>> = p
                    .iter()
                    .zip(&previous)
                    .map(|(p, q)| p.iter().zip(q).map(|(p, q)| p - q).collect())
                    .collect();
                assert!(delta.iter().flatten().any(|&d| d != 0.0), "the step moved the adapters");
                // The recorded losses are the tiny-set losses along the update direction.
                let mut probe = Trainer::with_variants(&config(family), &lora(true), ff.clone(), device).unwrap();
                for (index, p) in twin.model.params.params.iter().enumerate() {
                    let value = p.value.to_vec::<f32>().unwrap();
                    probe.model.params.set_value(index, value).unwrap();
                }
                let mut along = |j: u32| {
                    let values = forwarded(&p, &delta, j);
                    for (i, &index) in adapters.iter().enumerate() {
                        probe.model.params.set_value(index, values[i].clone()).unwrap();
                    }
                    probe.fast_forward_loss(&corpus).unwrap()
                };
                assert_eq!(stage.before, (!compat).then(|| along(0)), "{family:?} compat {compat}");
                for (j, &loss) in stage.losses.iter().enumerate() {
                    assert_eq!(
                        loss,
                        along(j as u32 + 1),
                        "{family:?} compat {compat} FF step {}",
                        j + 1
                    );
                }
                let taken = stage.losses.len() as u32;
                assert_eq!(count.taken, taken);
                let compared: Vec<f32> = stage.before.into_iter().chain(stage.losses.iter().copied()).collect();
                let rises = compared.windows(2).position(|w| w[1] > w[0]);
                let last_rise = compared.len() - 2;
                assert!(stage.losses.iter().all(|l| l.is_finite()));
                assert_eq!(rises, Some(last_rise), "{family:?} compat {compat}: {stage:?}");
                if compat {
                    assert!(taken >= 2, "{stage:?}");
                    assert_eq!(count.kept, taken, "reference_compat keeps the worse step");
                    assert_eq!(count.evaluations, taken);
                } else {
                    assert!(taken >= 1);
                    assert_eq!(count.kept, taken - 1, "the worse step is undone");
                    assert_eq!(count.evaluations, taken + 1);
                }
                stages_with_kept_steps += usize::from(count.kept > usize::from(compat) as u32);
                let expected = forwarded(&p, &delta, count.kept);
                assert_eq!(adapter_values(&trainer), expected, "{family:?} compat {compat}");
                let (got, want) = (state(&trainer), state(&twin));
                for (index, (got, want)) in got.iter().zip(&want).enumerate() {
                    let name = &trainer.model.params.params[index].spec.name;
                    assert_eq!(
                        (&got.exp_avg, &got.exp_avg_sq),
                        (&want.exp_avg, &want.exp_avg_sq),
                        "{name}: moments"
                    );
                    if !adapters.contains(&index) {
                        assert_eq!(got, want, "{name}");
                    }
                }
                // The adapters' compute copies follow their masters.
                for (i, &index) in adapters.iter().enumerate() {
                    let p = &trainer.model.params.params[index];
                    if let Some(compute) = &p.compute {
                        let rounded: Vec<half::bf16> = expected[i].iter().map(|&v| half::bf16::from_f32(v)).collect();
                        assert_eq!(compute.to_vec::<half::bf16>().unwrap(), rounded, "{}", p.spec.name);
                    }
                }
                // The twin continues from the stage's parameters.
                for (i, &index) in adapters.iter().enumerate() {
                    twin.model.params.set_value(index, expected[i].clone()).unwrap();
                }
            }
        }
    }
    assert!(
        stages_with_kept_steps > 0,
        "no stage kept an FF step beyond the minimum"
    );
}

/// A run with Fast Forward checkpointed between the adapters' copy and the stage (and one after
/// the stage) repeats the uninterrupted run: losses, parameters, moments and the stages.
fn fast_forward_resumes_exactly(device: &Device) {
    let corpus = corpus();
    for stop in [4u64, 5] {
        let ff = fast_forward_options(9, false);
        let variants = lora(false);
        let mut straight = Trainer::with_variants(&config(Family::Llama), &variants, ff.clone(), device).unwrap();
        let expected: Vec<f32> = (0..9).map(|_| straight.train_step(&corpus).unwrap().loss).collect();
        let dir = scratch(&format!("ff-resume-{stop}"), device);
        let mut first = Trainer::with_variants(&config(Family::Llama), &variants, ff.clone(), device).unwrap();
        let mut got: Vec<f32> = (0..stop).map(|_| first.train_step(&corpus).unwrap().loss).collect();
        first.save(&dir).unwrap();
        let stages_before: Vec<_> = first.fast_forward_log().to_vec();
        drop(first);
        let mut resumed = Trainer::resume(&dir, device).unwrap();
        assert_eq!(resumed.options, ff);
        got.extend((stop..9).map(|_| resumed.train_step(&corpus).unwrap().loss));
        assert_eq!(got, expected, "stopped after step {stop}");
        assert_eq!(state(&resumed), state(&straight));
        let stages: Vec<_> = stages_before
            .into_iter()
            .chain(resumed.fast_forward_log().to_vec())
            .collect();
        assert_eq!(stages, straight.fast_forward_log(), "stopped after step {stop}");
        assert_eq!(stages.iter().map(|s| s.step).collect::<Vec<_>>(), [5, 8]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Fast Forward needs adapters on from the start and an interval of 2 or more.
fn fast_forward_refuses_what_it_cannot_do(device: &Device) {
    let ff = fast_forward_options(8, false);
    common::assert_invalid(
        Trainer::new(&config(Family::Gpt2), ff.clone(), device).map(|_| ()),
        "train",
        "fast_forward_every",
        &["adapters"],
    );
    let every_step = TrainOptions {
        fast_forward_every: 1,
        ..ff.clone()
    };
    common::assert_invalid(
        Trainer::with_variants(&config(Family::Gpt2), &lora(true), every_step, device).map(|_| ()),
        "train",
        "fast_forward_every",
        &["at least 2"],
    );
    let lazy = TrainOptions {
        adapters_from: 3,
        ..ff.clone()
    };
    common::assert_invalid(
        Trainer::with_variants(&config(Family::Gpt2), &lora(true), lazy, device).map(|_| ()),
        "train",
        "fast_forward_every",
        &["adapters_from"],
    );
    let no_tiny = TrainOptions {
        fast_forward_tiny: 0,
        ..ff.clone()
    };
    common::assert_invalid(
        Trainer::with_variants(&config(Family::Gpt2), &lora(true), no_tiny, device).map(|_| ()),
        "train",
        "fast_forward_tiny",
        &["positive"],
    );
    // A tiny set that leaves no validation text is refused at the first stage.
    let corpus = corpus();
    let huge = TrainOptions {
        fast_forward_tiny: 1000,
        ..ff
    };
    let mut trainer = Trainer::with_variants(&config(Family::Gpt2), &lora(true), huge, device).unwrap();
    common::assert_invalid(
        trainer.check_fast_forward_corpus(&corpus),
        "train",
        "fast_forward_tiny",
        &["1000"],
    );
    common::assert_invalid(
        trainer.fast_forward_loss(&corpus),
        "train",
        "fast_forward_tiny",
        &["1000"],
    );
}

/// LoRA fine-tuning of a trained dense model from its checkpoint (`init_from`) with Fast Forward:
/// the fine-tuned model starts as its base (B = 0), the base stays frozen, the stages run, the
/// loss falls; a checkpoint of another configuration, or a model with non-dense layers, is refused.
fn fine_tuning_with_fast_forward_lowers_the_loss(device: &Device) {
    let corpus = corpus();
    let base_dir = scratch("ff-base", device);
    let fast = TrainOptions {
        batch: 4,
        lr: 1e-2,
        min_lr: 1e-3,
        ..options(20)
    };
    let mut base = Trainer::new(&config(Family::Gpt2), fast.clone(), device).unwrap();
    for _ in 0..20 {
        base.train_step(&corpus).unwrap();
    }
    base.save(&base_dir).unwrap();
    let tune = TrainOptions {
        init_from: Some(base_dir.to_str().unwrap().into()),
        fast_forward_every: 4,
        fast_forward_burn_in: 3,
        fast_forward_tiny: 4,
        steps: 30,
        seed: 5,
        ..fast
    };
    let base_loss = base.validate_windows(&corpus, 4, 4).unwrap();
    let mut tuned = Trainer::with_variants(&config(Family::Gpt2), &lora(true), tune.clone(), device).unwrap();
    let initial = tuned.validate(&corpus).unwrap();
    assert_eq!(initial, base_loss, "B = 0: the fine-tuned model starts as its base");
    let frozen: Vec<Vec<u8>> = tuned
        .model
        .params
        .layout
        .linears()
        .iter()
        .map(|l| tuned.model.params.params[l.weight].value.to_bytes().unwrap())
        .collect();
    let losses: Vec<f32> = (0..30).map(|_| tuned.train_step(&corpus).unwrap().loss).collect();
    let (start, end) = (mean(&losses[..3]), mean(&losses[27..]));
    assert!(end < start, "loss went from {start} to {end}");
    let validation = tuned.validate(&corpus).unwrap();
    assert!(validation < initial, "validation {initial} -> {validation}");
    let stages = tuned.fast_forward_log();
    assert_eq!(
        stages.iter().map(|s| s.step).collect::<Vec<_>>(),
        [7, 11, 15, 19, 23, 27]
    );
    for (linear, before) in tuned.model.params.layout.linears().iter().zip(&frozen) {
        assert_eq!(
            &tuned.model.params.params[linear.weight].value.to_bytes().unwrap(),
            before
        );
    }

    // A checkpoint that records no configuration (as Hugging Face writes them) takes the run's,
    // and gives the same starting model.
    let foreign_dir = scratch("ff-foreign", device);
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let base_checkpoint = checkpoint_dir(&base_dir).unwrap().join("model.safetensors");
    let saved = GptParams::load(base_checkpoint, None, &Device::Cpu).unwrap();
    let tensors: Vec<(&str, &Tensor)> = saved.params.iter().map(|p| (p.spec.name.as_str(), &p.value)).collect();
    let metadata = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    tessera::model::safetensors::save(foreign_dir.join("model.safetensors"), &tensors, &metadata).unwrap();
    let from_foreign = TrainOptions {
        init_from: Some(foreign_dir.to_str().unwrap().into()),
        ..tune.clone()
    };
    let mut foreign = Trainer::with_variants(&config(Family::Gpt2), &lora(true), from_foreign.clone(), device).unwrap();
    assert_eq!(foreign.validate(&corpus).unwrap(), base_loss);
    // Read as another family's checkpoint, its tensors are not the model's.
    let refused = Trainer::with_variants(&config(Family::Llama), &lora(true), from_foreign, device)
        .err()
        .expect("a GPT-2 checkpoint read as a Llama one");
    assert!(refused.to_string().contains("no tensor named"), "{refused}");
    std::fs::remove_dir_all(&foreign_dir).unwrap();

    let other = GptConfig {
        ffn_width: 48,
        ..config(Family::Gpt2)
    };
    common::assert_invalid(
        Trainer::with_variants(&other, &lora(true), tune.clone(), device).map(|_| ()),
        "train",
        "init_from",
        &["configuration"],
    );
    let masked = LinearVariants::all(LinearSpec {
        variant: Variant::Unstructured { density: 0.5, seed: 1 },
        lora: None,
    });
    let plain = TrainOptions {
        fast_forward_every: 0,
        ..tune
    };
    common::assert_invalid(
        Trainer::with_variants(&config(Family::Gpt2), &masked, plain, device).map(|_| ()),
        "train",
        "init_from",
        &["unstructured"],
    );
    std::fs::remove_dir_all(&base_dir).unwrap();
}

on_each_device!(
    fast_forward_moves_only_the_adapters,
    fast_forward_resumes_exactly,
    fast_forward_refuses_what_it_cannot_do,
    fine_tuning_with_fast_forward_lowers_the_loss,
    distillation_at_ce_weight_one_is_next_token_training,
    self_distillation_has_no_gradient,
    distillation_trains_and_resumes,
    grow_length_steps_have_the_planned_shapes,
    forgetting_resets_exactly_the_embedding,
    resume_equals_uninterrupted_with_each_recipe,
    recipes_lower_the_loss,
    gap_step_is_a_negated_step,
    gap_keeps_the_best_step,
);

/// The options travel through JSON (checkpoints, the TOML [train] table); a checkpoint written
/// before the recipes existed reads with them off.
#[test]
fn recipe_options_round_trip_through_json() {
    let recipe = TrainOptions {
        grow_from: 16,
        forget_every: 1000,
        gap_steps: 7,
        gap_lr: 2e-5,
        gap_tokens: 256,
        distill_from: Some("runs/teacher".into()),
        distill_ce_weight: 0.5,
        fast_forward_every: 6,
        fast_forward_burn_in: 7,
        fast_forward_tiny: 9,
        fast_forward_reference_compat: true,
        init_from: Some("runs/base".into()),
        ..TrainOptions::tiny()
    };
    assert_eq!(TrainOptions::from_json(&recipe.to_json()), Some(recipe));
    let mut old = TrainOptions::tiny().to_json();
    for key in [
        "grow_from",
        "forget_every",
        "gap_steps",
        "gap_lr",
        "gap_tokens",
        "distill_from",
        "distill_ce_weight",
        "fast_forward_every",
        "fast_forward_burn_in",
        "fast_forward_tiny",
        "fast_forward_reference_compat",
        "init_from",
    ] {
        old.as_object_mut().unwrap().remove(key);
    }
    assert_eq!(TrainOptions::from_json(&old), Some(TrainOptions::tiny()));
    let mut wrong = TrainOptions::tiny().to_json();
    wrong["forget_every"] = serde_json::json!("often");
    assert_eq!(TrainOptions::from_json(&wrong), None);
    let mut wrong = TrainOptions::tiny().to_json();
    wrong["fast_forward_reference_compat"] = serde_json::json!(1);
    assert_eq!(TrainOptions::from_json(&wrong), None);
}

/// Fast Forward's schedule (ALGORITHMS.md §7.4, test 5): with the paper's interval and burn-in,
/// stages follow steps 56, 62, 68, ... and the adapters are copied after the step before each.
#[test]
fn fast_forward_stages_follow_the_burn_in() {
    let ff = TrainOptions {
        fast_forward_every: 6,
        ..TrainOptions::tiny()
    };
    assert_eq!(ff.fast_forward_burn_in, 50);
    assert_eq!(ff.fast_forward_tiny, 32);
    let stages: Vec<u64> = (1..=75).filter(|&s| ff.fast_forward_stage(s)).collect();
    let copies: Vec<u64> = (1..=75).filter(|&s| ff.fast_forward_copy(s)).collect();
    assert_eq!(stages, [56, 62, 68, 74]);
    assert_eq!(copies, [55, 61, 67, 73]);
    assert_eq!(ff.validation_skip(), 32);
    assert_eq!(TrainOptions::tiny().validation_skip(), 0);
    assert!(
        !(1..=1000).any(|s| TrainOptions::tiny().fast_forward_stage(s) || TrainOptions::tiny().fast_forward_copy(s))
    );
}

/// LoRA fine-tuning with Fast Forward from the command line: a dense run, then `--init-from` it
/// with adapters from the config and `--fast-forward-*` flags; the log reports the stages and the
/// checkpoint records the options.
#[test]
fn fast_forward_runs_from_the_command_line() {
    let tessera = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), log)
    };
    let dir = scratch("ff-cli", &Device::Cpu);
    std::fs::create_dir_all(&dir).unwrap();
    let model = "[model]\nlayers = 1\nheads = 2\nkv_heads = 2\nwidth = 32\nffn_width = 64\ncontext = 16\n";
    let train = "[train]\nbatch = 2\nseq = 16\nsteps = 6\nwarmup = 1\neval_windows = 2\n";
    let base_config = dir.join("base.toml");
    std::fs::write(&base_config, format!("{model}\n{train}")).unwrap();
    let tune_config = dir.join("tune.toml");
    std::fs::write(
        &tune_config,
        format!("{model}\n[model.linears.default]\nvariant = \"dense\"\nlora = {{ rank = 4, alpha = 8.0, frozen_base = true }}\n\n{train}"),
    )
    .unwrap();
    let (base, tuned) = (dir.join("base"), dir.join("tuned"));
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (code, log) = tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&base_config),
        "--out",
        &path(&base),
    ]);
    assert_eq!(code, Some(0), "{log}");
    let (code, log) = tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&tune_config),
        "--init-from",
        &path(&base),
        "--fast-forward-every",
        "2",
        "--fast-forward-burn-in",
        "1",
        "--fast-forward-tiny",
        "2",
        "--fast-forward-reference-compat",
        "--out",
        &path(&tuned),
    ]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("fast forward: 2 stages"), "{log}");
    let resumed = Trainer::resume(&tuned, &Device::Cpu).unwrap();
    let o = &resumed.options;
    assert_eq!(
        (
            o.fast_forward_every,
            o.fast_forward_burn_in,
            o.fast_forward_tiny,
            o.fast_forward_reference_compat
        ),
        (2, 1, 2, true)
    );
    assert_eq!(o.init_from, Some(path(&base)));
    // A tiny set larger than the validation text is refused before the first step.
    let (code, log) = tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&tune_config),
        "--init-from",
        &path(&base),
        "--fast-forward-every",
        "2",
        "--fast-forward-tiny",
        "100000000",
        "--out",
        &path(&dir.join("too-big")),
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("fast_forward_tiny") && !log.contains("step 1/"), "{log}");
    // Without adapters Fast Forward is a usage error naming the option.
    let (code, log) = tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&base_config),
        "--fast-forward-every",
        "6",
        "--out",
        &path(&dir.join("refused")),
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("fast_forward_every"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The recipes from the command line: GrowLength and active forgetting from the [train] table,
/// then GAP on the run's checkpoint, whose output generate reads.
#[test]
fn recipes_run_from_the_command_line() {
    let tessera = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "tessera {args:?}: {log}");
        log
    };
    let dir = scratch("cli", &Device::Cpu);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("recipes.toml");
    std::fs::write(
        &config,
        "[model]\nlayers = 1\nheads = 2\nkv_heads = 2\nwidth = 32\nffn_width = 64\ncontext = 16\n\n\
         [train]\nbatch = 2\nseq = 16\nsteps = 4\nwarmup = 1\neval_windows = 2\ngrow_from = 4\nforget_every = 2\n",
    )
    .unwrap();
    let gap_config = dir.join("gap.toml");
    std::fs::write(&gap_config, "[train]\ngap_steps = 2\ngap_tokens = 16\n").unwrap();
    let (run, gap) = (dir.join("run"), dir.join("gap"));
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&config),
        "--out",
        &path(&run),
    ]);
    let resumed = Trainer::resume(&run, &Device::Cpu).unwrap();
    assert_eq!((resumed.options.grow_from, resumed.options.forget_every), (4, 2));
    let student = dir.join("student");
    tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        &path(&config),
        "--distill-from",
        &path(&run),
        "--out",
        &path(&student),
    ]);
    let distilled = Trainer::resume(&student, &Device::Cpu).unwrap();
    assert_eq!(distilled.options.distill_from, Some(path(&run)));
    let log = tessera(&[
        "train",
        "--device",
        "cpu",
        "--gap",
        &path(&run),
        "--config",
        &path(&gap_config),
        "--out",
        &path(&gap),
    ]);
    assert!(log.contains("GAP step 2 |") && log.contains("kept GAP step"), "{log}");
    let sample = tessera(&[
        "generate",
        "--device",
        "cpu",
        "--checkpoint",
        &path(&gap),
        "--prompt",
        "fox",
        "--tokens",
        "5",
    ]);
    assert!(sample.starts_with("fox"), "{sample}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "--device", "cpu", "--gap", &path(&run), "--out", &path(&run)])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "GAP never writes into the run it reads");
    let default_out = tessera(&[
        "train",
        "--device",
        "cpu",
        "--gap",
        &path(&run),
        "--config",
        &path(&gap_config),
    ]);
    assert!(default_out.contains(&format!("{}-gap", path(&run))), "{default_out}");
    assert!(dir.join("run-gap").join("model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}
