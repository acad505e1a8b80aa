//! The training step's promises beyond its numbers: the trainer's step, which waits for the
//! device once (the last micro-batch's loss is read after the gradient norm is queued), gives
//! bitwise the loss, gradient norm and parameters of the same step spelled out with a readback
//! after every call; and after its first step a training step allocates no device memory.

#[macro_use]
mod common;

use tessera::model::GptConfig;
use tessera::ops::AdamWConfig;
use tessera::train::data::BatchSampler;
use tessera::train::trainer::{TrainOptions, Trainer};
use tessera::train::Corpus;
use tessera::Device;

/// The tiny preset with GPT-2's head width (64), so that the step runs the kernels GPT-2
/// small's does.
fn config() -> GptConfig {
    GptConfig {
        heads: 2,
        kv_heads: 2,
        ..GptConfig::tiny()
    }
}

fn options(accumulation: usize) -> TrainOptions {
    TrainOptions {
        batch: 3,
        seq: 37,
        steps: 10,
        warmup: 2,
        eval_every: 0,
        accumulation,
        ..TrainOptions::tiny()
    }
}

fn corpus() -> Corpus {
    let text = "a training step reads the device back once; the rest is queued. ".repeat(30);
    Corpus::from_bytes("test", text.as_bytes()).unwrap()
}

/// Every parameter's f32 master, in order.
fn masters(trainer: &Trainer) -> Vec<Vec<u32>> {
    trainer
        .model
        .params
        .params
        .iter()
        .map(|p| p.value.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// Three trainer steps against a twin model stepped by hand: the same batches (a sampler with
/// the same seed), `forward_backward` (which reads each loss back at once), `grad_norm` (which
/// reads the norm back), the clipping factor and AdamW with the step's learning rate.
fn step_matches_the_spelled_out_step(device: &Device, accumulation: usize) {
    let corpus = corpus();
    let options = options(accumulation);
    let mut trainer = Trainer::new(&config(), options.clone(), device).unwrap();
    let mut twin = Trainer::new(&config(), options.clone(), device).unwrap();
    assert_eq!(masters(&trainer), masters(&twin), "the same seed gives the same model");
    let mut sampler = BatchSampler::new(options.seed);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for step in 1..=3u64 {
        let record = trainer.train_step(&corpus).unwrap();
        let (batch, seq) = (options.batch, options.seq);
        let params = &mut twin.model.params;
        params.zero_grads().unwrap();
        let mut loss = 0.0f64;
        for _ in 0..accumulation {
            sampler
                .next_batch(&corpus.train, batch, seq, &mut inputs, &mut targets)
                .unwrap();
            let scale = 1.0 / accumulation as f32;
            loss += twin
                .model
                .forward_backward(&inputs, &targets, batch, seq, scale)
                .unwrap() as f64;
        }
        let loss = (loss / accumulation as f64) as f32;
        let params = &mut twin.model.params;
        let grad_norm = params.grad_norm().unwrap();
        let clip = options
            .grad_clip
            .filter(|&c| grad_norm > c)
            .map_or(1.0, |c| c / grad_norm);
        let adamw = AdamWConfig {
            lr: record.lr,
            beta1: options.beta1,
            beta2: options.beta2,
            eps: 1e-8,
            weight_decay: options.weight_decay,
        };
        params.adamw_step(&adamw, step, clip).unwrap();
        assert!(
            loss.is_finite() && grad_norm > 0.0,
            "step {step}: loss {loss}, norm {grad_norm}"
        );
        assert_eq!(record.loss.to_bits(), loss.to_bits(), "step {step}: loss");
        assert_eq!(
            record.grad_norm.to_bits(),
            grad_norm.to_bits(),
            "step {step}: gradient norm"
        );
        assert_eq!(masters(&trainer), masters(&twin), "step {step}: parameters");
    }
}

fn one_micro_batch(device: &Device) {
    step_matches_the_spelled_out_step(device, 1);
}

fn three_micro_batches(device: &Device) {
    step_matches_the_spelled_out_step(device, 3);
}

on_each_device!(one_micro_batch, three_micro_batches);

/// After the first step (which makes the kept buffers: the gradient norm's result, the ops'
/// scratch), a step of a GPT-2-shaped model allocates no device memory: activations, attention's
/// outputs and gradients, the norms' partials, the cross entropy's, gradient norm's and AdamW's
/// tables are all kept from step to step. Counted on this thread, so other tests running beside
/// it do not disturb the count.
#[cfg(feature = "cuda")]
#[test]
fn gpu_train_step_allocates_nothing_after_the_first() {
    use tessera::cuda::CudaBackend;
    let Some(gpu) = common::gpu() else { return };
    let corpus = corpus();
    for accumulation in [1, 2] {
        let mut trainer = Trainer::new(&config(), options(accumulation), &gpu).unwrap();
        trainer.train_step(&corpus).unwrap();
        let before = CudaBackend::thread_allocations();
        for _ in 0..3 {
            trainer.train_step(&corpus).unwrap();
        }
        let made = CudaBackend::thread_allocations() - before;
        assert_eq!(
            made, 0,
            "{made} device allocations in three steps ({accumulation} micro-batches)"
        );
    }
}

/// Threads sharing one GPU take turns with the ops' kept scratch buffers: four threads, each
/// with gradients of its own sizes (so that the gradient norm's scratch grows at different
/// moments), compute the global norm 25 times each, every result checked against an f64 sum of
/// the same values. A thread that saw another's table or partials would get another's norm.
#[cfg(feature = "cuda")]
#[test]
fn gpu_threads_share_the_scratch_buffers() {
    use tessera::ops::grad_norm_into;
    use tessera::{DType, Tensor};
    let Some(gpu) = common::gpu() else { return };
    let mut rng = common::rng();
    let sets: Vec<Vec<Vec<f32>>> = (0..4)
        .map(|thread| {
            (0..3 + 2 * thread)
                .map(|i| common::uniform::<f32>(&mut rng, 1 + 4099 * (thread + 1) + 313 * i))
                .collect()
        })
        .collect();
    std::thread::scope(|scope| {
        for values in &sets {
            let gpu = gpu.clone();
            scope.spawn(move || {
                let tensors: Vec<Tensor> = values
                    .iter()
                    .map(|v| Tensor::from_vec(v.clone(), &[v.len()], &gpu).unwrap())
                    .collect();
                let refs: Vec<&Tensor> = tensors.iter().collect();
                let expected = common::norm(values.iter().flatten().map(|&x| x as f64));
                for round in 0..25 {
                    let mut norm = Tensor::zeros(&[1], DType::F32, &gpu).unwrap();
                    norm.fill_bytes(0xFF).unwrap();
                    grad_norm_into(&refs, &mut norm).unwrap();
                    let got = norm.to_vec::<f32>().unwrap()[0] as f64;
                    assert!(
                        (got - expected).abs() <= 1e-6 * expected,
                        "round {round}: norm {got}, expected {expected}"
                    );
                }
            });
        }
    });
}
