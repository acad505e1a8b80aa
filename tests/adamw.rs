//! Fused AdamW against an f64 reference of the formula documented in src/ops/adamw.rs (PyTorch's
//! fused AdamW step), on every device, over lists of tensors of awkward sizes that mix gradient
//! dtypes, weight decay and bf16 copies; and its argument errors, which must leave every tensor
//! as it was.

#[macro_use]
mod common;

use common::{assert_close, assert_close_at_scale, assert_invalid, bytes, norm, uniform, uniform_in, values};
use half::bf16;
use rand::rngs::StdRng;
use tessera::ops::{adamw_step, AdamWConfig, AdamWTensor};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_adamw,
    default_config_is_pytorchs,
    several_steps_over_a_mixed_list,
    other_hyperparameters,
    zero_learning_rate_keeps_the_weights,
    empty_list_is_ok,
    errors_in_hyperparameters,
    errors_in_list_entries,
);

/// The CUDA kernel works in blocks of this many elements: 16-byte vectors for whole blocks, a
/// scalar loop for the last, partial one.
const BLOCK: usize = 4096;

/// Sizes around the block size and a few blocks with a tail; 0 is an empty tensor in the list.
const SIZES: [usize; 8] = [1, 3, 17, 4095, 4096, 4097, 3 * BLOCK + 5, 0];

/// One parameter and its state, owned, from which an `AdamWTensor` is borrowed for each call.
struct Slot {
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    copy: Option<Tensor>,
    weight_decay: bool,
}

/// How to make one slot.
#[derive(Clone, Copy, Debug)]
struct Spec {
    numel: usize,
    grad_bf16: bool,
    weight_decay: bool,
    copy: bool,
}

impl Slot {
    /// Random weights in [-1, 1], moments with m in [-0.1, 0.1] and v in [0, 0.01] (as after
    /// some training), and a random gradient.
    fn new(device: &Device, rng: &mut StdRng, spec: Spec) -> Slot {
        let n = spec.numel;
        let f32_tensor = |data: Vec<f32>| Tensor::from_vec(data, &[n], device).unwrap();
        let param = f32_tensor(uniform(rng, n));
        let exp_avg = f32_tensor(uniform_in(rng, n, -0.1, 0.1));
        let exp_avg_sq = f32_tensor(uniform_in(rng, n, 0.0, 0.01));
        let copy = spec.copy.then(|| Tensor::zeros(&[n], DType::BF16, device).unwrap());
        let mut slot = Slot {
            param,
            grad: Tensor::zeros(&[n], DType::F32, device).unwrap(),
            exp_avg,
            exp_avg_sq,
            copy,
            weight_decay: spec.weight_decay,
        };
        slot.new_grad(device, rng, spec.grad_bf16);
        slot
    }

    /// A fresh random gradient in [-1, 1], of f32 or bf16.
    fn new_grad(&mut self, device: &Device, rng: &mut StdRng, bf16_grad: bool) {
        let n = self.param.numel();
        self.grad = if bf16_grad {
            Tensor::from_vec(uniform::<bf16>(rng, n), &[n], device).unwrap()
        } else {
            Tensor::from_vec(uniform::<f32>(rng, n), &[n], device).unwrap()
        };
    }

    fn entry(&mut self) -> AdamWTensor<'_> {
        AdamWTensor {
            param: &mut self.param,
            grad: &self.grad,
            exp_avg: &mut self.exp_avg,
            exp_avg_sq: &mut self.exp_avg_sq,
            param_bf16: self.copy.as_mut(),
            weight_decay: self.weight_decay,
        }
    }

    /// Every byte of every tensor of the slot.
    fn snapshot(&self) -> Vec<Vec<u8>> {
        let mut all = vec![
            bytes(&self.param),
            bytes(&self.grad),
            bytes(&self.exp_avg),
            bytes(&self.exp_avg_sq),
        ];
        all.extend(self.copy.as_ref().map(bytes));
        all
    }

    fn grad_values(&self) -> Vec<f64> {
        match self.grad.dtype() {
            DType::BF16 => values::<bf16>(&self.grad),
            _ => values::<f32>(&self.grad),
        }
    }
}

fn run(slots: &mut [Slot], config: &AdamWConfig, step: u64, grad_scale: f32) -> tessera::Result<()> {
    let mut entries: Vec<AdamWTensor<'_>> = slots.iter_mut().map(Slot::entry).collect();
    adamw_step(&mut entries, config, step, grad_scale)
}

/// The reference state of one tensor, in f64.
struct State {
    param: Vec<f64>,
    exp_avg: Vec<f64>,
    exp_avg_sq: Vec<f64>,
}

/// One AdamW step in f64, exactly as documented: with g = grad·grad_scale,
/// `p -= lr·wd·p; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²; p -= (lr/bc1)·m / (√v/√bc2 + ε)`,
/// `bc1 = 1-β1^t`, `bc2 = 1-β2^t`. The hyper-parameters are the f32 values, widened exactly.
fn reference_step(
    state: &State,
    grad: &[f64],
    config: &AdamWConfig,
    weight_decay: bool,
    step: u64,
    grad_scale: f32,
) -> State {
    let lr = config.lr as f64;
    let beta1 = config.beta1 as f64;
    let beta2 = config.beta2 as f64;
    let eps = config.eps as f64;
    let wd = if weight_decay { config.weight_decay as f64 } else { 0.0 };
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2 = 1.0 - beta2.powi(step as i32);
    let n = grad.len();
    let mut next = State {
        param: Vec::with_capacity(n),
        exp_avg: Vec::with_capacity(n),
        exp_avg_sq: Vec::with_capacity(n),
    };
    for (i, &grad) in grad.iter().enumerate() {
        let g = grad * grad_scale as f64;
        let mut p = state.param[i];
        p -= lr * wd * p;
        let m = beta1 * state.exp_avg[i] + (1.0 - beta1) * g;
        let v = beta2 * state.exp_avg_sq[i] + (1.0 - beta2) * g * g;
        p -= (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps);
        next.param.push(p);
        next.exp_avg.push(m);
        next.exp_avg_sq.push(v);
    }
    next
}

/// Relative tolerance of an f32 state against the f64 reference after one step (f32 arithmetic
/// gives a few 1e-8).
const TOLERANCE: f64 = 1e-5;
/// Relative tolerance of the update `p_new − p_old`, which is small next to p: measured against
/// ‖p_old‖·UPDATE_FLOOR at least, since f32's rounding of p is relative to p, not to the update.
const UPDATE_TOLERANCE: f64 = 1e-3;
const UPDATE_FLOOR: f64 = 1e-3;

/// Runs one step over all `slots` (the bf16 copies NaN-poisoned first) and checks every tensor
/// against the f64 reference step taken from the same starting values.
///
/// Errors are relative to the norm of the result or of the terms it was computed from, whichever
/// is larger, so that a tensor of one or three elements whose result cancels to nearly zero does
/// not fail by chance.
fn step_and_check(slots: &mut [Slot], config: &AdamWConfig, step: u64, grad_scale: f32) {
    let before: Vec<(State, Vec<f64>)> = slots
        .iter()
        .map(|slot| {
            let state = State {
                param: values::<f32>(&slot.param),
                exp_avg: values::<f32>(&slot.exp_avg),
                exp_avg_sq: values::<f32>(&slot.exp_avg_sq),
            };
            (state, slot.grad_values())
        })
        .collect();
    for slot in slots.iter_mut() {
        if let Some(copy) = slot.copy.as_mut() {
            copy.fill_bytes(0xFF).unwrap();
        }
    }
    run(slots, config, step, grad_scale).unwrap();
    for (i, (slot, (state, grad))) in slots.iter().zip(&before).enumerate() {
        let what = |name: &str| {
            format!(
                "{name} of tensors[{i}] ({} elements, {} grad, weight decay {}) at step {step} \
                 on {}, {config:?}, grad_scale {grad_scale}",
                grad.len(),
                slot.grad.dtype(),
                slot.weight_decay,
                slot.param.device()
            )
        };
        let expected = reference_step(state, grad, config, slot.weight_decay, step, grad_scale);
        let param = values::<f32>(&slot.param);
        let param_scale = norm(state.param.iter().copied());
        assert_close_at_scale(&what("param"), &param, &expected.param, TOLERANCE, param_scale);
        // m = β1·m + (1-β1)·g: its terms can cancel.
        let beta1 = config.beta1 as f64;
        let m_scale = beta1 * norm(state.exp_avg.iter().copied())
            + (1.0 - beta1) * grad_scale.abs() as f64 * norm(grad.iter().copied());
        assert_close_at_scale(
            &what("exp_avg"),
            &values::<f32>(&slot.exp_avg),
            &expected.exp_avg,
            TOLERANCE,
            m_scale,
        );
        // v is a sum of non-negative terms.
        assert_close(
            &what("exp_avg_sq"),
            &values::<f32>(&slot.exp_avg_sq),
            &expected.exp_avg_sq,
            TOLERANCE,
        );
        let update = |p: &[f64]| -> Vec<f64> { p.iter().zip(&state.param).map(|(p, q)| p - q).collect() };
        assert_close_at_scale(
            &what("update"),
            &update(&param),
            &update(&expected.param),
            UPDATE_TOLERANCE,
            UPDATE_FLOOR * param_scale,
        );
        if let Some(copy) = &slot.copy {
            check_copy(&what("param_bf16"), copy, &slot.param);
        }
    }
}

/// The bf16 copy is the round-to-nearest bf16 of the new f32 weight, up to one ulp.
fn check_copy(what: &str, copy: &Tensor, param: &Tensor) {
    let copy = copy.to_vec::<bf16>().unwrap();
    let param = param.to_vec::<f32>().unwrap();
    for (i, (&c, &p)) in copy.iter().zip(&param).enumerate() {
        let rounded = bf16::from_f32(p);
        let ulps = |x: bf16| {
            // Bit patterns as a monotonic integer line: -0 and +0 meet at 0.
            let bits = x.to_bits() as i32;
            if bits & 0x8000 != 0 {
                -(bits & 0x7FFF)
            } else {
                bits
            }
        };
        assert!(
            c.is_finite() && (ulps(c) - ulps(rounded)).abs() <= 1,
            "{what}: element {i} is {c} (bits {:#06x}), but the weight {p} rounds to {rounded} \
             (bits {:#06x})",
            c.to_bits(),
            rounded.to_bits()
        );
    }
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

/// Few elements and one launch, for compute-sanitizer: one tiny f32-gradient tensor and one of a
/// whole block plus a tail with a bf16 gradient, both with a bf16 copy.
fn small_adamw(device: &Device) {
    let mut rng = common::rng();
    let mut slots = vec![
        Slot::new(
            device,
            &mut rng,
            Spec {
                numel: 5,
                grad_bf16: false,
                weight_decay: true,
                copy: true,
            },
        ),
        Slot::new(
            device,
            &mut rng,
            Spec {
                numel: BLOCK + 3,
                grad_bf16: true,
                weight_decay: false,
                copy: true,
            },
        ),
    ];
    step_and_check(&mut slots, &config(), 1, 0.5);
}

fn default_config_is_pytorchs(_device: &Device) {
    assert_eq!(
        AdamWConfig::default(),
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    );
}

/// Every size twice, with complementary gradient dtype, weight decay and copy, all in one call,
/// for three steps with fresh gradients and a gradient scale other than 1.
fn several_steps_over_a_mixed_list(device: &Device) {
    let mut rng = common::rng();
    let mut specs = Vec::new();
    for (i, &numel) in SIZES.iter().enumerate() {
        for flip in [false, true] {
            specs.push(Spec {
                numel,
                grad_bf16: (i % 2 == 0) != flip,
                weight_decay: (i % 3 == 0) != flip,
                copy: ((i / 2) % 2 == 0) != flip,
            });
        }
    }
    let mut slots: Vec<Slot> = specs.iter().map(|&spec| Slot::new(device, &mut rng, spec)).collect();
    let config = config();
    for (step, grad_scale) in [(1, 0.5), (2, 2.0), (3, 0.125)] {
        if step > 1 {
            for (slot, spec) in slots.iter_mut().zip(&specs) {
                slot.new_grad(device, &mut rng, spec.grad_bf16);
            }
        }
        step_and_check(&mut slots, &config, step, grad_scale);
    }
}

/// A large epsilon (so that its place in the formula shows), other betas, strong weight decay,
/// and step numbers far from 1 where the bias corrections approach 1.
fn other_hyperparameters(device: &Device) {
    let mut rng = common::rng();
    let config = AdamWConfig {
        lr: 0.05,
        beta1: 0.5,
        beta2: 0.9,
        eps: 0.05,
        weight_decay: 0.5,
    };
    let mut slots: Vec<Slot> = [(17, true), (BLOCK + 1, false), (2 * BLOCK, true)]
        .into_iter()
        .enumerate()
        .map(|(i, (numel, grad_bf16))| {
            let spec = Spec {
                numel,
                grad_bf16,
                weight_decay: i != 1,
                copy: i != 0,
            };
            Slot::new(device, &mut rng, spec)
        })
        .collect();
    for (step, grad_scale) in [(1, 3.0), (10, 0.25), (1000, 1.0)] {
        step_and_check(&mut slots, &config, step, grad_scale);
    }
    // beta1 = beta2 = 0: the moments are the last gradient.
    let plain = AdamWConfig {
        beta1: 0.0,
        beta2: 0.0,
        ..config
    };
    step_and_check(&mut slots, &plain, 4, -1.5);
}

/// lr = 0 moves nothing, weight decay included, while the moments still update.
fn zero_learning_rate_keeps_the_weights(device: &Device) {
    let mut rng = common::rng();
    let spec = Spec {
        numel: BLOCK + 7,
        grad_bf16: false,
        weight_decay: true,
        copy: true,
    };
    let mut slots = vec![Slot::new(device, &mut rng, spec)];
    let before = bytes(&slots[0].param);
    let m_before = bytes(&slots[0].exp_avg);
    let config = AdamWConfig { lr: 0.0, ..config() };
    step_and_check(&mut slots, &config, 1, 1.0);
    assert_eq!(bytes(&slots[0].param), before);
    assert_ne!(bytes(&slots[0].exp_avg), m_before);
}

/// No tensors, or only empty ones, is a valid call that does nothing.
fn empty_list_is_ok(device: &Device) {
    adamw_step(&mut [], &AdamWConfig::default(), 1, 1.0).unwrap();
    let mut rng = common::rng();
    let spec = Spec {
        numel: 0,
        grad_bf16: true,
        weight_decay: true,
        copy: true,
    };
    let mut slots = vec![Slot::new(device, &mut rng, spec), Slot::new(device, &mut rng, spec)];
    run(&mut slots, &config(), 1, 1.0).unwrap();
    device.synchronize().unwrap();
    assert!(slots
        .iter()
        .all(|slot| slot.param.numel() == 0 && slot.param.shape() == [0]));
}

/// Three valid slots on `device`: small, one block plus a tail, with a copy or not.
fn valid_slots(device: &Device, rng: &mut StdRng) -> Vec<Slot> {
    [(6, false, true), (BLOCK + 2, true, false), (6, false, true)]
        .into_iter()
        .map(|(numel, grad_bf16, copy)| {
            let spec = Spec {
                numel,
                grad_bf16,
                weight_decay: true,
                copy,
            };
            Slot::new(device, rng, spec)
        })
        .collect()
}

/// Runs a call that must fail with an argument error about `arg` of adamw_step, mentioning
/// `mentions`, and checks that every tensor of every slot kept its bytes.
fn expect_error_and_no_write(
    slots: &mut [Slot],
    config: &AdamWConfig,
    step: u64,
    grad_scale: f32,
    arg: &str,
    mentions: &[&str],
) {
    let before: Vec<Vec<Vec<u8>>> = slots.iter().map(Slot::snapshot).collect();
    let message = assert_invalid(run(slots, config, step, grad_scale), "adamw_step", arg, mentions);
    if let Some(first) = slots.first() {
        first.param.device().synchronize().unwrap();
    }
    for (i, (slot, before)) in slots.iter().zip(&before).enumerate() {
        assert!(
            slot.snapshot() == *before,
            "tensors[{i}] changed by a failed call: {message}"
        );
    }
}

fn errors_in_hyperparameters(device: &Device) {
    let mut rng = common::rng();
    let mut slots = valid_slots(device, &mut rng);
    let good = config();
    let cases: [(AdamWConfig, u64, f32, &str); 14] = [
        (good, 0, 1.0, "step"),
        (AdamWConfig { beta1: 1.0, ..good }, 1, 1.0, "config.beta1"),
        (AdamWConfig { beta1: -0.1, ..good }, 1, 1.0, "config.beta1"),
        (
            AdamWConfig {
                beta1: f32::NAN,
                ..good
            },
            1,
            1.0,
            "config.beta1",
        ),
        (AdamWConfig { beta2: 1.0, ..good }, 1, 1.0, "config.beta2"),
        (AdamWConfig { beta2: 1.5, ..good }, 1, 1.0, "config.beta2"),
        (AdamWConfig { eps: 0.0, ..good }, 1, 1.0, "config.eps"),
        (AdamWConfig { eps: -1e-8, ..good }, 1, 1.0, "config.eps"),
        (
            AdamWConfig {
                eps: f32::INFINITY,
                ..good
            },
            1,
            1.0,
            "config.eps",
        ),
        (AdamWConfig { lr: f32::NAN, ..good }, 1, 1.0, "config.lr"),
        (AdamWConfig { lr: -1e-3, ..good }, 1, 1.0, "config.lr"),
        (
            AdamWConfig {
                weight_decay: f32::INFINITY,
                ..good
            },
            1,
            1.0,
            "config.weight_decay",
        ),
        (good, 1, f32::NAN, "grad_scale"),
        (good, 1, f32::NEG_INFINITY, "grad_scale"),
    ];
    for (config, step, grad_scale, arg) in cases {
        expect_error_and_no_write(&mut slots, &config, step, grad_scale, arg, &[]);
    }
    // The same slots are accepted with valid arguments, and then do change.
    let before: Vec<Vec<Vec<u8>>> = slots.iter().map(Slot::snapshot).collect();
    run(&mut slots, &good, 1, 1.0).unwrap();
    let after: Vec<Vec<Vec<u8>>> = slots.iter().map(Slot::snapshot).collect();
    assert_ne!(before, after);
}

/// Each kind of bad tensor, in the last entry of a list of three, is named with its index, and
/// nothing in the list (the valid entries before it included) is written.
fn errors_in_list_entries(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let n = 6;
    let other = |shape: &[usize], dtype: DType, device: &Device| Tensor::zeros(shape, dtype, device).unwrap();
    type Break = Box<dyn Fn(&mut Slot)>;
    let mut cases: Vec<(Break, &str, Vec<&str>)> = vec![];
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.param = other(&[n], DType::BF16, &d)),
        "param",
        vec!["f32", "bf16"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.grad = other(&[n], DType::U8, &d)),
        "grad",
        vec!["u8"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.grad = other(&[n], DType::F16, &d)),
        "grad",
        vec!["f16"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.exp_avg = other(&[n], DType::BF16, &d)),
        "exp_avg",
        vec!["bf16"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.exp_avg_sq = other(&[n], DType::U32, &d)),
        "exp_avg_sq",
        vec!["u32"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.grad = other(&[n + 1], DType::F32, &d)),
        "grad",
        vec!["[6]", "[7]"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.grad = other(&[2, 3], DType::BF16, &d)),
        "grad",
        vec!["[2, 3]"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.exp_avg = other(&[n - 1], DType::F32, &d)),
        "exp_avg",
        vec!["[5]"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.exp_avg_sq = other(&[1, n], DType::F32, &d)),
        "exp_avg_sq",
        vec!["[1, 6]"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.copy = Some(other(&[n + 2], DType::BF16, &d))),
        "param_bf16",
        vec!["[8]"],
    ));
    let d = device.clone();
    cases.push((
        Box::new(move |s| s.copy = Some(other(&[n], DType::F32, &d))),
        "param_bf16",
        vec!["bf16", "f32"],
    ));
    if device.is_cuda() {
        let cpu = Device::Cpu;
        cases.push((
            Box::new(move |s| s.grad = other(&[n], DType::F32, &cpu)),
            "grad",
            vec!["cpu"],
        ));
        let cpu = Device::Cpu;
        cases.push((
            Box::new(move |s| s.copy = Some(other(&[n], DType::BF16, &cpu))),
            "param_bf16",
            vec!["cpu"],
        ));
    }
    for (index, (spoil, arg, mentions)) in cases.iter().enumerate() {
        let mut slots = valid_slots(device, rng);
        // Alternate between the last and the first entry: the index must be the right one.
        let bad = if index % 2 == 0 { 2 } else { 0 };
        spoil(&mut slots[bad]);
        let named = format!("tensors[{bad}]");
        let mut mentions = mentions.clone();
        mentions.push(&named);
        expect_error_and_no_write(&mut slots, &config(), 1, 1.0, arg, &mentions);
    }
}
