//! Attention (src/ops/attention.rs, ALGORITHMS.md §4) on every device against a naive f64
//! reference that builds every score with the explicit mask: the issue's (seq_q, seq_k) pairs,
//! head dims 64, 128 and 72, every mask, MHA/GQA/MQA, packed variable-length batches, RoPE inside
//! with per-head bases and LM-Infinite's distance ceiling, fully masked rows, causality by
//! perturbation, the spec's mask fixture, and the argument errors.
//!
//! Pass rule of the reference flash-attention suite: the largest error against the f64 reference
//! is at most 2x (output) and 3x (gradients) the largest error of a straightforward implementation
//! that rounds to the input dtype where such an implementation would (scaled queries, scores,
//! probabilities, each product), plus the rounding of the reference's magnitude to the dtype.

#[macro_use]
mod common;

use common::{assert_invalid, uniform, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::rope::{RopeConfig, RopeConvention};
use tessera::ops::{attention_backward, attention_forward, AttentionMask, AttentionOptions, AttentionRope, Varlen};
use tessera::ops::{attention_forward_into, attention_kernel, with_attention_kernel, AttentionKernel};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_attention,
    small_attention_ceiling,
    issue_shapes_bf16,
    issue_shapes_f16,
    masks_and_heads,
    head_dims,
    varlen_packed,
    rope_inside,
    lambda_distance_ceiling,
    distance_ceiling_shapes,
    fully_masked_rows,
    causality_by_perturbation,
    lambda_mask_fixture,
    backward_is_deterministic,
    errors_name_the_argument,
    small_attention_hopper,
    hopper_forward,
    hopper_forward_long,
    hopper_masks,
    hopper_varlen,
    hopper_varlen_isolated,
    hopper_refuses_other_calls,
    small_attention_hopper_backward,
    hopper_backward,
    hopper_backward_long,
    hopper_backward_is_deterministic,
    hopper_backward_refuses_other_calls,
);

// ---- cases and the f64 reference -----------------------------------------------------------

#[derive(Clone, Debug)]
struct Case {
    /// Per sequence (seq_q, seq_k); packed when `packed`, else all equal.
    seqs: Vec<(usize, usize)>,
    packed: bool,
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    mask: AttentionMask,
    scale: Option<f32>,
    rope: Option<AttentionRope>,
}

impl Case {
    fn dense(
        batch: usize,
        sq: usize,
        sk: usize,
        heads_q: usize,
        heads_kv: usize,
        d: usize,
        mask: AttentionMask,
    ) -> Case {
        Case {
            seqs: vec![(sq, sk); batch],
            packed: false,
            heads_q,
            heads_kv,
            d,
            mask,
            scale: None,
            rope: None,
        }
    }

    fn cu(&self) -> (Vec<usize>, Vec<usize>) {
        let mut q = vec![0];
        let mut k = vec![0];
        for &(sq, sk) in &self.seqs {
            q.push(q.last().unwrap() + sq);
            k.push(k.last().unwrap() + sk);
        }
        (q, k)
    }

    fn total(&self) -> (usize, usize) {
        let (q, k) = self.cu();
        (*q.last().unwrap(), *k.last().unwrap())
    }

    fn options(&self) -> AttentionOptions {
        let (cu_seqlens_q, cu_seqlens_k) = self.cu();
        AttentionOptions {
            mask: self.mask,
            scale: self.scale,
            varlen: self.packed.then_some(Varlen {
                cu_seqlens_q,
                cu_seqlens_k,
            }),
            rope: self.rope.clone(),
        }
    }

    fn q_shape(&self) -> Vec<usize> {
        let (tq, _) = self.total();
        if self.packed {
            vec![tq, self.heads_q, self.d]
        } else {
            vec![self.seqs.len(), self.seqs[0].0, self.heads_q, self.d]
        }
    }

    fn k_shape(&self) -> Vec<usize> {
        let (_, tk) = self.total();
        if self.packed {
            vec![tk, self.heads_kv, self.d]
        } else {
            vec![self.seqs.len(), self.seqs[0].1, self.heads_kv, self.d]
        }
    }

    fn scale(&self) -> f64 {
        self.scale.map_or(1.0 / (self.d as f64).sqrt(), |s| s as f64)
    }
}

fn visible(mask: AttentionMask, p: i64, j: i64) -> bool {
    match mask {
        AttentionMask::None => true,
        AttentionMask::Causal => j <= p,
        AttentionMask::Window { left, right } => p - j <= left as i64 && j - p <= right as i64,
        AttentionMask::Lambda { global, window } => j <= p && (p - j < window as i64 || j < global as i64),
    }
}

/// Rotates one head vector by `position` in f64 (transposed: by `-position`).
fn rotate(x: &mut [f64], position: f64, base: f64, convention: RopeConvention, transpose: bool) {
    let d = x.len();
    for i in 0..d / 2 {
        let theta = base.powf(-2.0 * i as f64 / d as f64);
        let (s, c) = (position * theta).sin_cos();
        let s = if transpose { -s } else { s };
        let (a, b) = match convention {
            RopeConvention::RotateHalf => (i, i + d / 2),
            RopeConvention::Interleaved => (2 * i, 2 * i + 1),
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * c - xb * s;
        x[b] = xb * c + xa * s;
    }
}

/// Inputs, all f64 (exact widenings of the dtype's values).
struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_out: Vec<f64>,
}

/// Output, log-sum-exp and gradients.
#[derive(Clone, Debug, Default)]
struct Results {
    out: Vec<f64>,
    lse: Vec<f64>,
    d_q: Vec<f64>,
    d_k: Vec<f64>,
    d_v: Vec<f64>,
}

/// How a straightforward implementation rounds: `None` for exact f64, else a rounding function
/// applied where an eager implementation in the input dtype rounds.
type Round = Option<fn(f64) -> f64>;

fn round_with(round: Round, x: f64) -> f64 {
    match round {
        Some(r) => r(x),
        None => x,
    }
}

/// The naive forward and backward: every score of every (sequence, head) with the explicit mask,
/// the RoPE branches formed per pair from the spec (local: `R(p)q·R(j)k`; beyond the ceiling:
/// `R(D)q·k`), gradients by the textbook formulas routed back through each branch's rotation.
/// With `round`, scaled queries, scores, probabilities and every product are rounded.
fn naive(case: &Case, x: &Inputs, round: Round) -> Results {
    let (cu_q, cu_k) = case.cu();
    let (hq, hkv, d) = (case.heads_q, case.heads_kv, case.d);
    let group = hq / hkv;
    let scale = case.scale();
    let (tq, tk) = case.total();
    let mut r = Results {
        out: vec![0.0; tq * hq * d],
        lse: vec![f64::NEG_INFINITY; tq * hq],
        d_q: vec![0.0; tq * hq * d],
        d_k: vec![0.0; tk * hkv * d],
        d_v: vec![0.0; tk * hkv * d],
    };
    let at = |row: usize, h: usize, heads: usize| (row * heads + h) * d;
    let rope_of = |g: usize| {
        case.rope.as_ref().map(|rope| {
            let bases = rope.config.bases();
            (
                bases[g * bases.len() / hkv],
                rope.config.convention(),
                rope.distance_ceiling,
            )
        })
    };
    // The vectors of each branch, formed once: rotated to the true position, and (for the
    // ceiling branch) the query rotated to the ceiling; keys rotated and raw.
    let rotated = |x: &[f64], heads: usize, positions: &dyn Fn(usize) -> f64| -> Vec<f64> {
        let mut y = x.to_vec();
        if case.rope.is_some() {
            for (n, head) in y.chunks_mut(d).enumerate() {
                let (base, conv, _) = rope_of((n % heads) / (heads / hkv)).unwrap();
                rotate(head, positions(n / heads), base, conv, false);
                if let Some(f) = round {
                    head.iter_mut().for_each(|x| *x = f(*x));
                }
            }
        }
        y
    };
    let mut q_pos = vec![0.0; tq];
    let mut k_pos = vec![0.0; tk];
    for (b, &(sq, sk)) in case.seqs.iter().enumerate() {
        for i in 0..sq {
            q_pos[cu_q[b] + i] = i as f64 + sk as f64 - sq as f64;
        }
        for j in 0..sk {
            k_pos[cu_k[b] + j] = j as f64;
        }
    }
    let ceiling = case.rope.as_ref().and_then(|r| r.distance_ceiling);
    let q_rot = rotated(&x.q, hq, &|t| q_pos[t]);
    let k_rot = rotated(&x.k, hkv, &|t| k_pos[t]);
    let q_lim = rotated(&x.q, hq, &|_| ceiling.unwrap_or(0) as f64);
    let k_raw = &x.k;
    let mut gq_lim = vec![0.0; r.d_q.len()];
    let mut gk_raw = vec![0.0; r.d_k.len()];
    for (b, &(sq, sk)) in case.seqs.iter().enumerate() {
        for h in 0..hq {
            let g = h / group;
            let branch = |i: usize, j: usize| -> (&[f64], &[f64], bool) {
                let p = i as i64 + sk as i64 - sq as i64;
                let (qa, ka) = (at(cu_q[b] + i, h, hq), at(cu_k[b] + j, g, hkv));
                match ceiling {
                    Some(c) if p - j as i64 > c as i64 => (&q_lim[qa..qa + d], &k_raw[ka..ka + d], true),
                    _ => (&q_rot[qa..qa + d], &k_rot[ka..ka + d], false),
                }
            };
            for i in 0..sq {
                let p = i as i64 + sk as i64 - sq as i64;
                let row = cu_q[b] + i;
                let keys: Vec<usize> = (0..sk).filter(|&j| visible(case.mask, p, j as i64)).collect();
                if keys.is_empty() {
                    continue;
                }
                let vectors: Vec<_> = keys.iter().map(|&j| branch(i, j)).collect();
                let scores: Vec<f64> = vectors
                    .iter()
                    .map(|(qv, kv, _)| {
                        let s: f64 = qv
                            .iter()
                            .zip(kv.iter())
                            .map(|(a, b)| round_with(round, a * scale) * b)
                            .sum();
                        round_with(round, s)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                r.lse[row * hq + h] = max + sum.ln();
                let probs: Vec<f64> = scores
                    .iter()
                    .map(|s| round_with(round, (s - max).exp() / sum))
                    .collect();
                let o = at(row, h, hq);
                for (c, &j) in keys.iter().enumerate() {
                    let va = at(cu_k[b] + j, g, hkv);
                    for e in 0..d {
                        r.out[o + e] += probs[c] * x.v[va + e];
                    }
                }
                for e in 0..d {
                    r.out[o + e] = round_with(round, r.out[o + e]);
                }
                // Backward of this row.
                let d_o = &x.d_out[o..o + d];
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let va = at(cu_k[b] + j, g, hkv);
                        round_with(round, (0..d).map(|e| d_o[e] * x.v[va + e]).sum())
                    })
                    .collect();
                let delta: f64 = probs.iter().zip(&dp).map(|(p, q)| p * q).sum();
                for (c, &j) in keys.iter().enumerate() {
                    let ds = round_with(round, probs[c] * (dp[c] - delta)) * scale;
                    let (qv, kv, limited) = &vectors[c];
                    let ka = at(cu_k[b] + j, g, hkv);
                    for (x, &y) in r.d_v[ka..ka + d].iter_mut().zip(d_o) {
                        *x += probs[c] * y;
                    }
                    // Gradients with respect to the branch's vectors; rotated back at the end.
                    let (gq, gk) = if *limited {
                        (&mut gq_lim, &mut gk_raw)
                    } else {
                        (&mut r.d_q, &mut r.d_k)
                    };
                    for e in 0..d {
                        gq[o + e] += ds * kv[e];
                        gk[ka + e] += ds * qv[e];
                    }
                }
            }
        }
    }
    if case.rope.is_some() {
        let back = |values: &mut [f64], heads: usize, positions: &dyn Fn(usize) -> f64| {
            for (n, head) in values.chunks_mut(d).enumerate() {
                let (base, conv, _) = rope_of((n % heads) / (heads / hkv)).unwrap();
                rotate(head, positions(n / heads), base, conv, true);
            }
        };
        back(&mut r.d_q, hq, &|t| q_pos[t]);
        back(&mut r.d_k, hkv, &|t| k_pos[t]);
        back(&mut gq_lim, hq, &|_| ceiling.unwrap_or(0) as f64);
        r.d_q.iter_mut().zip(&gq_lim).for_each(|(x, y)| *x += y);
        r.d_k.iter_mut().zip(&gk_raw).for_each(|(x, y)| *x += y);
    }
    if round.is_some() {
        for values in [&mut r.d_q, &mut r.d_k, &mut r.d_v] {
            values.iter_mut().for_each(|x| *x = round_with(round, *x));
        }
    }
    r
}

fn round_to<T: Float>(x: f64) -> f64 {
    T::from_f32(x as f32).to_f64()
}

fn random_inputs<T: Float>(rng: &mut StdRng, case: &Case) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
    let (tq, tk) = case.total();
    (
        uniform(rng, tq * case.heads_q * case.d),
        uniform(rng, tk * case.heads_kv * case.d),
        uniform(rng, tk * case.heads_kv * case.d),
        uniform(rng, tq * case.heads_q * case.d),
    )
}

fn max_error(out: &[f64], reference: &[f64]) -> Result<f64, String> {
    if out.len() != reference.len() {
        return Err(format!("{} elements, expected {}", out.len(), reference.len()));
    }
    let mut worst = 0.0f64;
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        if o.is_nan() || (o.is_infinite() && o != r) {
            return Err(format!("element {i} is {o}, expected {r}"));
        }
        if o != r {
            worst = worst.max((o - r).abs());
        }
    }
    Ok(worst)
}

fn max_abs(values: &[f64]) -> f64 {
    values.iter().filter(|x| x.is_finite()).fold(0.0, |m, x| m.max(x.abs()))
}

/// The pass rule: `error(ours) ≤ factor·error(straightforward) + slack`, both against f64.
fn check_rule(what: &str, ours: &[f64], straightforward: &[f64], exact: &[f64], factor: f64, unit: f64) {
    let ours_error = max_error(ours, exact).unwrap_or_else(|e| panic!("{what}: {e}"));
    let base_error = max_error(straightforward, exact).unwrap_or_else(|e| panic!("{what} (straightforward): {e}"));
    // The dtype's rounding of the largest reference value: what any result must be allowed. In
    // f32 the straightforward implementation's only rounding may be the last one, so the slack
    // there is an f32 accumulation allowance (still far under 1e-3).
    let slack = if unit < 1e-6 {
        1e-5 * max_abs(exact)
    } else {
        2.0 * unit * max_abs(exact) + 1e-7
    };
    let bound = factor * base_error + slack;
    assert!(
        ours_error <= bound,
        "{what}: max error {ours_error:.3e} exceeds {factor}x the straightforward {base_error:.3e} + {slack:.1e}"
    );
    eprintln!("{what}: max error {ours_error:.2e}, straightforward {base_error:.2e}");
}

fn unit_roundoff<T: Float>() -> f64 {
    match T::DTYPE {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

fn poisoned_like(t: &Tensor) -> Tensor {
    let mut p = Tensor::zeros(t.shape(), t.dtype(), &t.device()).unwrap();
    p.fill_bytes(0xFF).unwrap();
    p
}

fn read<T: Float>(t: &Tensor) -> Vec<f64> {
    common::values::<T>(t)
}

/// The forward's pass rule for `out` and `lse` against the exact and the straightforward
/// references; returns our results, both references and the case's description.
fn check_forward<T: Float>(
    case: &Case,
    inputs: &Inputs,
    out: &Tensor,
    lse: &Tensor,
) -> (Results, Results, Results, String) {
    let exact = naive(case, inputs, None);
    let rounded = naive(
        case,
        inputs,
        (T::DTYPE != DType::F32).then_some(round_to::<T> as fn(f64) -> f64),
    );
    let what = format!(
        "{} {:?} h{}/{} d{} {:?}{}{}",
        T::DTYPE,
        &case.seqs[..case.seqs.len().min(3)],
        case.heads_q,
        case.heads_kv,
        case.d,
        case.mask,
        if case.packed { " packed" } else { "" },
        match &case.rope {
            Some(AttentionRope {
                distance_ceiling: Some(c),
                ..
            }) => format!(" rope, ceiling {c}"),
            Some(_) => " rope".to_string(),
            None => String::new(),
        }
    );
    let unit = unit_roundoff::<T>();
    let ours = Results {
        out: read::<T>(out),
        lse: lse.to_vec::<f32>().unwrap().iter().map(|&x| x as f64).collect(),
        ..Default::default()
    };
    check_rule(&format!("out {what}"), &ours.out, &rounded.out, &exact.out, 2.0, unit);
    // LSE is f32 on every path: compare it directly (−∞ must match exactly).
    let lse_error = max_error(&ours.lse, &exact.lse).unwrap_or_else(|e| panic!("lse {what}: {e}"));
    assert!(
        lse_error <= 1e-3 + 4.0 * unit * max_abs(&exact.lse),
        "lse {what}: error {lse_error:.3e}"
    );
    (ours, exact, rounded, what)
}

/// Runs forward and backward on `device` and checks every result against the references.
fn check<T: Float>(device: &Device, rng: &mut StdRng, case: &Case, backward: bool) -> Results {
    let (q, k, v, d_o) = random_inputs::<T>(rng, case);
    let tensor = |data: &[T], shape: Vec<usize>| Tensor::from_slice(data, &shape, device).unwrap();
    let (qt, kt, vt, dot) = (
        tensor(&q, case.q_shape()),
        tensor(&k, case.k_shape()),
        tensor(&v, case.k_shape()),
        tensor(&d_o, case.q_shape()),
    );
    let options = case.options();
    let (out, lse) = attention_forward(&qt, &kt, &vt, &options).unwrap();
    let inputs = Inputs {
        q: common::to_f64(&q),
        k: common::to_f64(&k),
        v: common::to_f64(&v),
        d_out: common::to_f64(&d_o),
    };
    let (ours, exact, rounded, what) = check_forward::<T>(case, &inputs, &out, &lse);
    let unit = unit_roundoff::<T>();
    if !backward {
        return ours;
    }
    // The backward, into poisoned inputs' look-alikes: its outputs are fresh tensors, but the
    // poisoned `out` copy checks that it reads what it is given.
    let mut out_copy = poisoned_like(&out);
    out_copy.copy_from(&out).unwrap();
    let (dq, dk, dv) = attention_backward(&dot, &qt, &kt, &vt, &out_copy, &lse, &options).unwrap();
    let ours = Results {
        d_q: read::<T>(&dq),
        d_k: read::<T>(&dk),
        d_v: read::<T>(&dv),
        ..ours
    };
    check_rule(&format!("d_q {what}"), &ours.d_q, &rounded.d_q, &exact.d_q, 3.0, unit);
    check_rule(&format!("d_k {what}"), &ours.d_k, &rounded.d_k, &exact.d_k, 3.0, unit);
    check_rule(&format!("d_v {what}"), &ours.d_v, &rounded.d_v, &exact.d_v, 3.0, unit);
    ours
}

/// One sequence of one head for the big shapes on the CPU, whose tests run unoptimised (GQA and
/// batches are covered by the smaller shapes there).
fn shrink(device: &Device, case: Case) -> Case {
    let (sq, sk) = case.seqs[0];
    if device.is_cuda() || sq * sk < 60_000 {
        return case;
    }
    Case {
        seqs: vec![(sq, sk)],
        heads_q: 1,
        heads_kv: 1,
        ..case
    }
}

const PAIRS: [(usize, usize); 9] = [
    (1, 239),
    (113, 203),
    (128, 217),
    (108, 256),
    (256, 512),
    (512, 256),
    (1023, 1024),
    (1024, 1023),
    (2048, 2048),
];

fn masks() -> [AttentionMask; 5] {
    [
        AttentionMask::None,
        AttentionMask::Causal,
        AttentionMask::Window { left: 100, right: 17 },
        AttentionMask::Window { left: 63, right: 0 },
        AttentionMask::Lambda { global: 4, window: 96 },
    ]
}

/// Every issue pair, each with a head dimension, mask and head layout taken in turn, so that the
/// list covers every value of each.
fn issue_shapes<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let heads = [(2, 2), (4, 2), (3, 1)];
    let dims = [64, 128, 72];
    for (n, &(sq, sk)) in PAIRS.iter().enumerate() {
        // The CPU's f16 path differs from its bf16 path only in rounding: the big pairs run once.
        if !device.is_cuda() && T::DTYPE == DType::F16 && sq * sk >= 60_000 {
            continue;
        }
        let (hq, hkv) = heads[n % 3];
        let case = Case::dense(2, sq, sk, hq, hkv, dims[(n / 3 + n) % 3], masks()[n % 5]);
        let case = shrink(device, case);
        // On the CPU the largest pairs run forward only; the GPU runs every backward.
        check::<T>(device, &mut rng, &case, device.is_cuda() || sq * sk <= 300_000);
    }
}

fn issue_shapes_bf16(device: &Device) {
    issue_shapes::<bf16>(device);
}

fn issue_shapes_f16(device: &Device) {
    issue_shapes::<f16>(device);
}

fn small_attention(device: &Device) {
    let mut rng = common::rng();
    for mask in [AttentionMask::Causal, AttentionMask::Lambda { global: 3, window: 20 }] {
        let case = Case::dense(1, 37, 70, 2, 1, 64, mask);
        check::<bf16>(device, &mut rng, &case, true);
    }
    let case = Case::dense(1, 33, 33, 1, 1, 128, AttentionMask::Window { left: 5, right: 40 });
    check::<f16>(device, &mut rng, &case, true);
    // Packed sequences (the offsets path) and the padded general head dimension (split dK/dV).
    let case = Case {
        seqs: vec![(5, 9), (20, 17), (0, 3)],
        packed: true,
        heads_q: 2,
        heads_kv: 1,
        d: 200,
        mask: AttentionMask::Causal,
        scale: None,
        rope: None,
    };
    check::<bf16>(device, &mut rng, &case, true);
}

/// Two backward runs on the same inputs give the same bits (no atomics, fixed summation order).
fn backward_is_deterministic(device: &Device) {
    let mut rng = common::rng();
    let (b, sq, sk, hq, hkv, d) = (2, 150, 190, 4, 2, 64);
    let q: Vec<bf16> = uniform(&mut rng, b * sq * hq * d);
    let k: Vec<bf16> = uniform(&mut rng, b * sk * hkv * d);
    let v: Vec<bf16> = uniform(&mut rng, b * sk * hkv * d);
    let d_o: Vec<bf16> = uniform(&mut rng, b * sq * hq * d);
    let tensor = |x: &[bf16], shape: &[usize]| Tensor::from_slice(x, shape, device).unwrap();
    let (qt, kt, vt, dot) = (
        tensor(&q, &[b, sq, hq, d]),
        tensor(&k, &[b, sk, hkv, d]),
        tensor(&v, &[b, sk, hkv, d]),
        tensor(&d_o, &[b, sq, hq, d]),
    );
    let options = AttentionOptions {
        mask: AttentionMask::Lambda { global: 3, window: 70 },
        ..Default::default()
    };
    let run = || {
        let (out, lse) = attention_forward(&qt, &kt, &vt, &options).unwrap();
        let (dq, dk, dv) = attention_backward(&dot, &qt, &kt, &vt, &out, &lse, &options).unwrap();
        [out, dq, dk, dv].map(|t| t.to_vec::<bf16>().unwrap())
    };
    assert_eq!(run(), run());
}

/// Every mask with every head layout on shapes that cross tile edges; f32 too on the CPU.
fn masks_and_heads(device: &Device) {
    let mut rng = common::rng();
    for mask in masks() {
        for (hq, hkv) in [(2, 2), (6, 2), (4, 1)] {
            let shapes: &[(usize, usize)] = if device.is_cuda() {
                &[(113, 203), (203, 113), (65, 65)]
            } else {
                &[(113, 203), (65, 65)]
            };
            for &(sq, sk) in shapes {
                let batch = if device.is_cuda() { 2 } else { 1 };
                let case = Case::dense(batch, sq, sk, hq, hkv, 64, mask);
                check::<bf16>(device, &mut rng, &case, true);
                if !device.is_cuda() && sq == 65 {
                    check::<f32>(device, &mut rng, &case, true);
                }
            }
        }
    }
    // Scale other than the default.
    let mut case = Case::dense(1, 77, 130, 2, 1, 64, AttentionMask::Causal);
    case.scale = Some(0.3);
    check::<f16>(device, &mut rng, &case, true);
}

/// Every supported head dimension class: the fast ones and several of the general path.
fn head_dims(device: &Device) {
    let mut rng = common::rng();
    for d in [8, 16, 24, 40, 64, 72, 96, 128, 160, 200, 256] {
        for mask in [AttentionMask::None, AttentionMask::Causal] {
            let case = Case::dense(1, 70, 131, 2, 1, d, mask);
            check::<bf16>(device, &mut rng, &case, true);
        }
    }
}

fn varlen_packed(device: &Device) {
    let mut rng = common::rng();
    let seqs = vec![(1, 1), (113, 203), (0, 5), (64, 64), (200, 129), (7, 0), (17, 300)];
    for mask in masks() {
        let case = Case {
            seqs: seqs.clone(),
            packed: true,
            heads_q: 4,
            heads_kv: 2,
            d: 64,
            mask,
            scale: None,
            rope: None,
        };
        check::<bf16>(device, &mut rng, &case, true);
    }
}

fn rope_config(d: usize, bases: Vec<f64>, convention: RopeConvention) -> RopeConfig {
    RopeConfig::new(d, bases, convention).unwrap()
}

fn rope_inside(device: &Device) {
    let mut rng = common::rng();
    for convention in [RopeConvention::RotateHalf, RopeConvention::Interleaved] {
        let mut case = Case::dense(2, 100, 150, 4, 2, 64, AttentionMask::Causal);
        case.rope = Some(AttentionRope {
            config: rope_config(64, vec![10000.0, 5e5], convention),
            distance_ceiling: None,
        });
        check::<bf16>(device, &mut rng, &case, true);
    }
}

/// A RoPE configuration with one base per key/value head (HARPE) and LM-Infinite's ceiling.
fn with_ceiling(mut case: Case, ceiling: usize, convention: RopeConvention) -> Case {
    let bases = RopeConfig::uniform_bases(case.heads_kv, 1e4, 1e6);
    case.rope = Some(AttentionRope {
        config: rope_config(case.d, bases, convention),
        distance_ceiling: Some(ceiling),
    });
    case
}

/// Every dtype the device runs: f32 and bf16 on the CPU (its f16 path differs only in rounding),
/// bf16 and f16 on CUDA.
fn check_dtypes(device: &Device, rng: &mut StdRng, case: &Case, backward: bool) {
    if device.is_cuda() {
        check::<bf16>(device, rng, case, backward);
        check::<f16>(device, rng, case, backward);
    } else {
        check::<f32>(device, rng, case, backward);
        check::<bf16>(device, rng, case, backward);
    }
}

fn lambda_distance_ceiling(device: &Device) {
    let mut rng = common::rng();
    let lambda = AttentionMask::Lambda { global: 5, window: 40 };
    for (mask, ceiling) in [
        (lambda, 40),
        (lambda, 25),
        (AttentionMask::Causal, 30),
        (AttentionMask::None, 50),
    ] {
        let case = Case::dense(1, 150, 170, 2, 2, 64, mask);
        let case = with_ceiling(case, ceiling, RopeConvention::RotateHalf);
        check_dtypes(device, &mut rng, &case, true);
    }
    if device.is_cuda() {
        // The identities below compare f32 results exactly; CUDA runs bf16 and f16 only.
        return;
    }
    // With the sequence inside the window, the Λ mask with its ceiling is causal RoPE attention.
    let rope = AttentionRope {
        config: rope_config(64, vec![10000.0], RopeConvention::Interleaved),
        distance_ceiling: Some(64),
    };
    let mut lam = Case::dense(1, 50, 60, 1, 1, 64, AttentionMask::Lambda { global: 4, window: 64 });
    lam.rope = Some(rope.clone());
    let mut causal = Case::dense(1, 50, 60, 1, 1, 64, AttentionMask::Causal);
    causal.rope = Some(AttentionRope {
        distance_ceiling: None,
        ..rope.clone()
    });
    let seed_rng = common::seed();
    let a = check::<f32>(device, &mut rand::SeedableRng::seed_from_u64(seed_rng), &lam, true);
    let b = check::<f32>(device, &mut rand::SeedableRng::seed_from_u64(seed_rng), &causal, true);
    assert_eq!(a.out, b.out);
    assert_eq!(a.d_q, b.d_q);
    // A global key beyond the window: its score does not depend on the query's true distance.
    // Shift the query by one token (one more key in the middle): the probability ratio of the
    // global key to the last key is unchanged, since both keep their relative treatment.
    let d = 64;
    let config = rope_config(d, vec![10000.0], RopeConvention::RotateHalf);
    let q: Vec<f32> = uniform(&mut rng, d);
    let k0: Vec<f32> = uniform(&mut rng, d);
    let mut logits = Vec::new();
    for seq in [30usize, 31] {
        // Keys: k0 at 0, zeros elsewhere except the query's own position holding k0 as well;
        // values: one-hot on key 0, so out[0] is the probability of key 0.
        let mut k = vec![0.0f32; seq * d];
        k[..d].copy_from_slice(&k0);
        k[(seq - 1) * d..].copy_from_slice(&k0);
        let mut v = vec![0.0f32; seq * d];
        v[0] = 1.0;
        let qt = Tensor::from_vec(q.clone(), &[1, 1, 1, d], device).unwrap();
        let kt = Tensor::from_vec(k, &[1, seq, 1, d], device).unwrap();
        let vt = Tensor::from_vec(v, &[1, seq, 1, d], device).unwrap();
        let options = AttentionOptions {
            mask: AttentionMask::Lambda { global: 1, window: 8 },
            rope: Some(AttentionRope {
                config: config.clone(),
                distance_ceiling: Some(8),
            }),
            ..Default::default()
        };
        let (out, _) = attention_forward(&qt, &kt, &vt, &options).unwrap();
        logits.push(out.to_vec::<f32>().unwrap()[0]);
    }
    assert!((logits[0] - logits[1]).abs() < 1e-6, "{logits:?}");
}

/// The ceiling against the f64 reference over the kernels' tile boundaries: the Λ mask at its
/// default ceiling (D = window) and below it, causal and sliding windows with D below the window,
/// D = 0, a ceiling beyond every distance (nothing changes), GQA/MQA, packed sequences with empty
/// and single-token ones, seq_q ≠ seq_k, lengths 1, 17, 113 and 1025, every head-dim family.
fn distance_ceiling_shapes(device: &Device) {
    let mut rng = common::rng();
    let lambda = AttentionMask::Lambda { global: 4, window: 96 };
    let cases = [
        (
            Case::dense(2, 113, 203, 4, 2, 128, AttentionMask::Window { left: 100, right: 17 }),
            37,
        ),
        (
            Case::dense(1, 17, 17, 3, 1, 72, AttentionMask::Window { left: 63, right: 0 }),
            0,
        ),
        (Case::dense(2, 1, 239, 2, 2, 256, AttentionMask::Causal), 100),
        (Case::dense(1, 1025, 1025, 2, 1, 64, lambda), 96),
        (Case::dense(1, 1025, 1025, 2, 2, 64, lambda), 70),
        (Case::dense(1, 100, 150, 2, 1, 64, AttentionMask::Causal), 149),
        (
            Case::dense(2, 128, 217, 2, 2, 64, AttentionMask::Lambda { global: 70, window: 33 }),
            64,
        ),
    ];
    for (n, (case, ceiling)) in cases.into_iter().enumerate() {
        let convention = [RopeConvention::RotateHalf, RopeConvention::Interleaved][n % 2];
        let case = with_ceiling(shrink(device, case), ceiling, convention);
        let (sq, sk) = case.seqs[0];
        // On the CPU, whose tests run unoptimised, the largest pairs run forward only.
        check_dtypes(device, &mut rng, &case, device.is_cuda() || sq * sk <= 300_000);
    }
    let packed = Case {
        seqs: vec![(1, 1), (17, 40), (0, 9), (113, 113), (5, 200)],
        packed: true,
        heads_q: 4,
        heads_kv: 2,
        d: 64,
        mask: AttentionMask::Lambda { global: 3, window: 20 },
        scale: None,
        rope: None,
    };
    for ceiling in [20, 11] {
        let case = with_ceiling(packed.clone(), ceiling, RopeConvention::RotateHalf);
        check_dtypes(device, &mut rng, &case, true);
    }
}

/// A small grid of every ceiling kernel (forward, dQ, dK/dV, the split dK/dV of the general head
/// dimension, the partial sums) for compute-sanitizer.
fn small_attention_ceiling(device: &Device) {
    let mut rng = common::rng();
    let case = Case::dense(1, 37, 70, 2, 1, 64, AttentionMask::Lambda { global: 3, window: 20 });
    check::<bf16>(
        device,
        &mut rng,
        &with_ceiling(case, 10, RopeConvention::RotateHalf),
        true,
    );
    let case = Case {
        seqs: vec![(5, 9), (20, 37), (0, 3)],
        packed: true,
        heads_q: 2,
        heads_kv: 2,
        d: 200,
        mask: AttentionMask::Window { left: 30, right: 2 },
        scale: None,
        rope: None,
    };
    check::<f16>(
        device,
        &mut rng,
        &with_ceiling(case, 7, RopeConvention::Interleaved),
        true,
    );
}

fn fully_masked_rows(device: &Device) {
    let mut rng = common::rng();
    // Causal with more queries than keys: the first seq_q − seq_k rows see nothing; a window
    // entirely in the future hides every key from the early rows.
    for (sq, sk, mask) in [
        (100, 40, AttentionMask::Causal),
        (64, 64, AttentionMask::Window { left: 0, right: 0 }),
        (80, 20, AttentionMask::Lambda { global: 2, window: 3 }),
    ] {
        let case = Case::dense(1, sq, sk, 2, 1, 64, mask);
        let r = check::<bf16>(device, &mut rng, &case, true);
        let hidden = sq.saturating_sub(sk);
        for row in 0..hidden * 2 {
            assert_eq!(r.lse[row], f64::NEG_INFINITY);
            assert!(r.out[row * 64..(row + 1) * 64].iter().all(|&x| x == 0.0));
            assert!(r.d_q[row * 64..(row + 1) * 64].iter().all(|&x| x == 0.0));
        }
    }
}

/// Changing key/value `j` moves no output of a query that cannot see it.
fn causality_by_perturbation(device: &Device) {
    let mut rng = common::rng();
    let (sq, sk, h, d) = (90, 130, 2, 64);
    for mask in [
        AttentionMask::Causal,
        AttentionMask::Window { left: 20, right: 5 },
        AttentionMask::Lambda { global: 3, window: 16 },
    ] {
        let q: Vec<bf16> = uniform(&mut rng, sq * h * d);
        let k: Vec<bf16> = uniform(&mut rng, sk * h * d);
        let v: Vec<bf16> = uniform(&mut rng, sk * h * d);
        let options = AttentionOptions {
            mask,
            ..Default::default()
        };
        let run = |k: &[bf16], v: &[bf16]| {
            let qt = Tensor::from_slice(&q, &[1, sq, h, d], device).unwrap();
            let kt = Tensor::from_slice(k, &[1, sk, h, d], device).unwrap();
            let vt = Tensor::from_slice(v, &[1, sk, h, d], device).unwrap();
            attention_forward(&qt, &kt, &vt, &options)
                .unwrap()
                .0
                .to_vec::<bf16>()
                .unwrap()
        };
        let base = run(&k, &v);
        for j in [0usize, 2, 3, 57, 100, sk - 1] {
            let (mut k2, mut v2) = (k.clone(), v.clone());
            for e in 0..h * d {
                k2[j * h * d + e] = bf16::from_f32(rng.random_range(-3.0..3.0));
                v2[j * h * d + e] = bf16::from_f32(rng.random_range(-3.0..3.0));
            }
            let moved = run(&k2, &v2);
            let (mut any_visible_moved, mut seen) = (false, false);
            for i in 0..sq {
                let p = i as i64 + (sk - sq) as i64;
                let row = &moved[i * h * d..(i + 1) * h * d];
                let before = &base[i * h * d..(i + 1) * h * d];
                if visible(mask, p, j as i64) {
                    seen = true;
                    any_visible_moved |= row != before;
                } else {
                    assert_eq!(row, before, "{mask:?}: query {i} moved when key {j} changed");
                }
            }
            assert!(any_visible_moved || !seen, "{mask:?}: no query that sees key {j} moved");
        }
    }
}

/// §4.7 test 7: T=8, W=3, G=2: row 2 sees {0,1,2}, row 3 sees {0,1,2,3}, row 6 sees {0,1,4,5,6}.
fn lambda_mask_fixture(device: &Device) {
    let (t, d) = (8, 8);
    // One-hot values: out[i][j] is the probability of key j. Zero queries: uniform over visible.
    let q = vec![0.0f32; t * d];
    let k = vec![0.5f32; t * d];
    let mut v = vec![0.0f32; t * d];
    for j in 0..t {
        v[j * d + j] = 1.0;
    }
    let options = AttentionOptions {
        mask: AttentionMask::Lambda { global: 2, window: 3 },
        ..Default::default()
    };
    if device.is_cuda() {
        return fixture_on_gpu(device, &options);
    }
    let tensor = |x: &[f32]| Tensor::from_slice(x, &[1, t, 1, d], device).unwrap();
    let (out, _) = attention_forward(&tensor(&q), &tensor(&k), &tensor(&v), &options).unwrap();
    let out = out.to_vec::<f32>().unwrap();
    for (row, seen) in [
        (2usize, vec![0usize, 1, 2]),
        (3, vec![0, 1, 2, 3]),
        (6, vec![0, 1, 4, 5, 6]),
    ] {
        for j in 0..t {
            let expected = if seen.contains(&j) {
                1.0 / seen.len() as f32
            } else {
                0.0
            };
            assert!(
                (out[row * d + j] - expected).abs() < 1e-6,
                "row {row} key {j}: {}",
                out[row * d + j]
            );
        }
    }
}

fn fixture_on_gpu(device: &Device, options: &AttentionOptions) {
    let (t, d) = (8, 8);
    let q = vec![bf16::ZERO; t * d];
    let k = vec![bf16::from_f32(0.5); t * d];
    let mut v = vec![bf16::ZERO; t * d];
    for j in 0..t {
        v[j * d + j] = bf16::ONE;
    }
    let tensor = |x: &[bf16]| Tensor::from_slice(x, &[1, t, 1, d], device).unwrap();
    let (out, _) = attention_forward(&tensor(&q), &tensor(&k), &tensor(&v), options).unwrap();
    let out = common::values::<bf16>(&out);
    for (row, seen) in [
        (2usize, vec![0usize, 1, 2]),
        (3, vec![0, 1, 2, 3]),
        (6, vec![0, 1, 4, 5, 6]),
    ] {
        for j in 0..t {
            let expected = if seen.contains(&j) {
                1.0 / seen.len() as f64
            } else {
                0.0
            };
            assert!(
                (out[row * d + j] - expected).abs() < 4e-3,
                "row {row} key {j}: {}",
                out[row * d + j]
            );
        }
    }
}

fn errors_name_the_argument(device: &Device) {
    let dtype_ok = |shape: &[usize]| Tensor::zeros(shape, DType::BF16, device).unwrap();
    let q = dtype_ok(&[2, 10, 4, 64]);
    let k = dtype_ok(&[2, 12, 2, 64]);
    let v = dtype_ok(&[2, 12, 2, 64]);
    let default = AttentionOptions::default();
    let (fwd, bwd) = ("attention", "attention_backward");
    assert_invalid(
        attention_forward(&dtype_ok(&[2, 10, 4, 60]), &k, &v, &default),
        fwd,
        "q",
        &["multiple of 8", "[2, 10, 4, 60]"],
    );
    assert_invalid(
        attention_forward(&dtype_ok(&[2, 10, 4, 264]), &k, &v, &default),
        fwd,
        "q",
        &["256"],
    );
    assert_invalid(
        attention_forward(&dtype_ok(&[2, 10, 3, 64]), &k, &v, &default),
        fwd,
        "q",
        &["multiple", "2"],
    );
    assert_invalid(
        attention_forward(&q, &dtype_ok(&[2, 12, 2, 32]), &v, &default),
        fwd,
        "k",
        &["64"],
    );
    assert_invalid(
        attention_forward(&q, &dtype_ok(&[3, 12, 2, 64]), &v, &default),
        fwd,
        "k",
        &["batch 2"],
    );
    assert_invalid(
        attention_forward(&q, &k, &dtype_ok(&[2, 11, 2, 64]), &default),
        fwd,
        "v",
        &["[2, 12, 2, 64]"],
    );
    assert_invalid(
        attention_forward(&dtype_ok(&[10, 4, 64]), &k, &v, &default),
        fwd,
        "q",
        &["4-d"],
    );
    let f16_k = Tensor::zeros(&[2, 12, 2, 64], DType::F16, device).unwrap();
    assert_invalid(attention_forward(&q, &f16_k, &v, &default), fwd, "k", &["bf16", "f16"]);
    let ints = Tensor::zeros(&[2, 10, 4, 64], DType::U16, device).unwrap();
    assert_invalid(attention_forward(&ints, &k, &v, &default), fwd, "q", &["u16"]);
    if device.is_cuda() {
        let f32_q = Tensor::zeros(&[2, 10, 4, 64], DType::F32, device).unwrap();
        assert_invalid(
            attention_forward(&f32_q, &k, &v, &default),
            fwd,
            "q",
            &["bf16 or f16", "f32"],
        );
        let host_k = Tensor::zeros(&[2, 12, 2, 64], DType::BF16, &Device::Cpu).unwrap();
        assert_invalid(attention_forward(&q, &host_k, &v, &default), fwd, "k", &["cpu"]);
    }
    let with = |mask| AttentionOptions {
        mask,
        ..Default::default()
    };
    assert_invalid(
        attention_forward(&q, &k, &v, &with(AttentionMask::Lambda { global: 2, window: 0 })),
        fwd,
        "mask",
        &["window"],
    );
    assert_invalid(
        attention_forward(
            &q,
            &k,
            &v,
            &with(AttentionMask::Window {
                left: usize::MAX,
                right: 0,
            }),
        ),
        fwd,
        "mask",
        &["2147483647"],
    );
    let scaled = AttentionOptions {
        scale: Some(f32::NAN),
        ..Default::default()
    };
    assert_invalid(attention_forward(&q, &k, &v, &scaled), fwd, "scale", &["NaN"]);
    // Varlen offsets out of range.
    let packed_q = dtype_ok(&[20, 4, 64]);
    let packed_k = dtype_ok(&[24, 2, 64]);
    let varlen = |cu_q: Vec<usize>, cu_k: Vec<usize>| AttentionOptions {
        varlen: Some(Varlen {
            cu_seqlens_q: cu_q,
            cu_seqlens_k: cu_k,
        }),
        ..Default::default()
    };
    for (cu_q, cu_k, arg) in [
        (vec![0, 10, 21], vec![0, 12, 24], "cu_seqlens_q"),
        (vec![1, 10, 20], vec![0, 12, 24], "cu_seqlens_q"),
        (vec![0, 12, 10, 20], vec![0, 1, 2, 24], "cu_seqlens_q"),
        (vec![0, 10, 20], vec![0, 12, 23], "cu_seqlens_k"),
        (vec![0, 10, 20], vec![0, 24], "cu_seqlens_k"),
        (vec![0], vec![0], "cu_seqlens_q"),
    ] {
        assert_invalid(
            attention_forward(&packed_q, &packed_k, &packed_k, &varlen(cu_q, cu_k)),
            fwd,
            arg,
            &[],
        );
    }
    // RoPE that does not fit.
    let rope = |bases: usize, d: usize| AttentionOptions {
        rope: Some(AttentionRope {
            config: RopeConfig::new(d, vec![1e4; bases], RopeConvention::RotateHalf).unwrap(),
            distance_ceiling: None,
        }),
        ..Default::default()
    };
    assert_invalid(
        attention_forward(&q, &k, &v, &rope(4, 64)),
        fwd,
        "rope",
        &["heads_kv = 2"],
    );
    assert_invalid(
        attention_forward(&q, &k, &v, &rope(1, 32)),
        fwd,
        "rope",
        &["head_dim 64"],
    );
    let long_q = dtype_ok(&[2, 13, 4, 64]);
    assert_invalid(
        attention_forward(&long_q, &k, &v, &rope(1, 64)),
        fwd,
        "q",
        &["13 queries"],
    );
    // Backward: the extra tensors.
    let (out, lse) = attention_forward(&q, &k, &v, &default).unwrap();
    assert_invalid(
        attention_backward(&k, &q, &k, &v, &out, &lse, &default),
        bwd,
        "d_out",
        &["[2, 10, 4, 64]"],
    );
    assert_invalid(
        attention_backward(&out, &q, &k, &v, &k, &lse, &default),
        bwd,
        "out",
        &["[2, 12, 2, 64]"],
    );
    let short_lse = Tensor::zeros(&[2, 10, 3], DType::F32, device).unwrap();
    assert_invalid(
        attention_backward(&out, &q, &k, &v, &out, &short_lse, &default),
        bwd,
        "lse",
        &["[2, 10, 4]"],
    );
    assert_invalid(
        attention_backward(&out, &q, &k, &v, &out, &out, &default),
        bwd,
        "lse",
        &["f32"],
    );
    assert_invalid(
        attention_backward(&out, &dtype_ok(&[2, 10, 4, 60]), &k, &v, &out, &lse, &default),
        bwd,
        "q",
        &["60"],
    );
}

// ---- the Hopper (sm_90a) forward ------------------------------------------------------------

/// Whether `device` loads the sm_90a image, the only one the Hopper kernel runs from.
#[cfg(feature = "cuda")]
fn is_hopper(device: &Device) -> bool {
    match device {
        Device::Cuda(backend) => backend
            .kernel_image()
            .is_ok_and(|image| image == tessera::cuda::kernels::ImageKind::Sm90a),
        Device::Cpu => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn is_hopper(_device: &Device) -> bool {
    false
}

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut t = Tensor::zeros(shape, dtype, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

/// The forward of `case` on these inputs with the Hopper kernel forced, into NaN-poisoned `out`
/// and `lse`.
fn run_hopper<T: Float>(device: &Device, case: &Case, q: &[T], k: &[T], v: &[T]) -> (Tensor, Tensor) {
    let tensor = |data: &[T], shape: Vec<usize>| Tensor::from_slice(data, &shape, device).unwrap();
    let (qt, kt, vt) = (
        tensor(q, case.q_shape()),
        tensor(k, case.k_shape()),
        tensor(v, case.k_shape()),
    );
    let mut out = poisoned(&case.q_shape(), T::DTYPE, device);
    let lse_shape = case.q_shape()[..case.q_shape().len() - 1].to_vec();
    let mut lse = poisoned(&lse_shape, DType::F32, device);
    with_attention_kernel(AttentionKernel::Hopper, || {
        assert_eq!(attention_kernel(), AttentionKernel::Hopper);
        attention_forward_into(&qt, &kt, &vt, &case.options(), &mut out, &mut lse)
    })
    .unwrap();
    (out, lse)
}

/// The forward with the Hopper kernel forced, into NaN-poisoned `out` and `lse`, checked
/// element by element against the references; returns our results.
fn check_hopper<T: Float>(device: &Device, rng: &mut StdRng, case: &Case) -> Results {
    let (q, k, v, d_o) = random_inputs::<T>(rng, case);
    let (out, lse) = run_hopper(device, case, &q, &k, &v);
    let inputs = Inputs {
        q: common::to_f64(&q),
        k: common::to_f64(&k),
        v: common::to_f64(&v),
        d_out: common::to_f64(&d_o),
    };
    check_forward::<T>(case, &inputs, &out, &lse).0
}

/// Where the Hopper kernel does not run: on the CPU the choice changes nothing (the CPU path,
/// checked against the references, and the thread's choice restored afterwards); on another GPU
/// forcing it is an `Unsupported` error that names the image.
fn hopper_elsewhere(device: &Device, rng: &mut StdRng) {
    let case = Case::dense(2, 17, 33, 2, 1, 64, AttentionMask::Causal);
    let before = attention_kernel();
    if device.is_cuda() {
        let q = Tensor::from_slice(&uniform::<bf16>(rng, 2 * 17 * 2 * 64), &case.q_shape(), device).unwrap();
        let k = Tensor::from_slice(&uniform::<bf16>(rng, 2 * 33 * 64), &case.k_shape(), device).unwrap();
        let result = with_attention_kernel(AttentionKernel::Hopper, || {
            attention_forward(&q, &k, &k, &case.options())
        });
        match result {
            Err(tessera::Error::Unsupported { reason, .. }) => assert!(reason.contains("sm_90a"), "{reason}"),
            other => panic!("forcing the Hopper kernel off Hopper: expected Unsupported, got {other:?}"),
        }
    } else {
        check_hopper::<bf16>(device, rng, &case);
    }
    assert_eq!(attention_kernel(), before);
}

/// A small grid for compute-sanitizer: one partial tile, two query tiles with fully masked rows
/// (causal, seq_q > seq_k), MQA, both dtypes and both head dims.
fn small_attention_hopper(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_elsewhere(device, &mut rng);
    }
    check_hopper::<bf16>(
        device,
        &mut rng,
        &Case::dense(2, 17, 33, 2, 1, 64, AttentionMask::Causal),
    );
    check_hopper::<f16>(
        device,
        &mut rng,
        &Case::dense(1, 70, 70, 1, 1, 128, AttentionMask::None),
    );
    check_hopper::<bf16>(
        device,
        &mut rng,
        &Case::dense(1, 130, 100, 2, 2, 128, AttentionMask::Causal),
    );
    check_hopper::<f16>(
        device,
        &mut rng,
        &Case::dense(1, 200, 260, 2, 1, 64, AttentionMask::Window { left: 40, right: 9 }),
    );
    check_hopper::<bf16>(
        device,
        &mut rng,
        &Case::dense(
            1,
            150,
            300,
            2,
            1,
            128,
            AttentionMask::Lambda {
                global: 130,
                window: 20,
            },
        ),
    );
    // Packed: the first sequence's second key tile runs into the second sequence (whose V rows
    // the consumers zero), the second's only tile past the last token.
    check_hopper::<bf16>(
        device,
        &mut rng,
        &Case {
            seqs: vec![(17, 130), (70, 33)],
            packed: true,
            ..Case::dense(1, 1, 1, 2, 1, 64, AttentionMask::Lambda { global: 1, window: 50 })
        },
    );
}

/// The dense cases the Hopper kernels are checked on: one key or query, partial tiles, several
/// tiles, seq_q ≠ seq_k both ways (plus `more` (seq_q, seq_k) pairs), none and causal, head dims
/// 64 and 128, with MHA, GQA and MQA taken in turn.
fn hopper_dense_cases(more: &[(usize, usize)]) -> Vec<Case> {
    let heads = [(2, 2), (4, 2), (3, 1)];
    let pairs = [
        (1, 1),
        (17, 17),
        (113, 113),
        (1, 239),
        (17, 300),
        (113, 203),
        (203, 113),
        (300, 17),
        (256, 256),
        (129, 128),
    ];
    let mut cases = Vec::new();
    for &(sq, sk) in pairs.iter().chain(more) {
        for mask in [AttentionMask::None, AttentionMask::Causal] {
            for d in [64, 128] {
                let (hq, hkv) = heads[cases.len() % heads.len()];
                cases.push(Case::dense(2, sq, sk, hq, hkv, d, mask));
            }
        }
    }
    cases
}

/// The Hopper kernel forced on every class of shape it serves: one key or query, partial tiles,
/// several tiles, seq_q ≠ seq_k both ways, none and causal, MHA/GQA/MQA, head dims 64 and 128,
/// bf16 and f16; and the rows that causal attention with seq_q > seq_k hides, which must be
/// exactly 0 with an lse of −∞.
fn hopper_forward(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_elsewhere(device, &mut rng);
    }
    for case in hopper_dense_cases(&[]) {
        check_hopper::<bf16>(device, &mut rng, &case);
        check_hopper::<f16>(device, &mut rng, &case);
    }
    for d in [64, 128] {
        let (sq, sk, hq) = (200, 60, 2);
        let r = check_hopper::<bf16>(
            device,
            &mut rng,
            &Case::dense(1, sq, sk, hq, 1, d, AttentionMask::Causal),
        );
        for row in 0..(sq - sk) * hq {
            assert_eq!(r.lse[row], f64::NEG_INFINITY, "row {row}");
            assert!(r.out[row * d..(row + 1) * d].iter().all(|&x| x == 0.0), "row {row}");
        }
    }
}

/// Long sequences: many key tiles through the ring (each stage reused many times, so every
/// mbarrier phase flips), lengths one past a tile.
fn hopper_forward_long(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_elsewhere(device, &mut rng);
    }
    for (n, &(sq, sk)) in [(1025, 1025), (4097, 4097), (1025, 4097), (4097, 1025)]
        .iter()
        .enumerate()
    {
        for mask in [AttentionMask::None, AttentionMask::Causal] {
            let d = if n % 2 == 0 { 128 } else { 64 };
            // The f64 reference is single-threaded: one head beyond a million pairs.
            let heads_q = if sq * sk > 1 << 20 { 1 } else { 2 };
            let case = Case::dense(1, sq, sk, heads_q, 1, d, mask);
            if mask == AttentionMask::None {
                check_hopper::<bf16>(device, &mut rng, &case);
            } else {
                check_hopper::<f16>(device, &mut rng, &case);
            }
        }
    }
}

/// The sliding-window and Λ masks on the Hopper kernel: lengths 1, 17, 113, 1025 and 4097,
/// seq_q ≠ seq_k both ways, windows shorter than, as long as and longer than the sequence, a
/// right side wider than the left (the CTAs then run first to last), 0, 1, 4 and 130 global
/// tokens (130 crosses a key tile), MHA/GQA/MQA, head dims 64 and 128, bf16 and f16; and the rows
/// that see no key, which must be exactly 0 with an lse of −∞.
fn hopper_masks(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_elsewhere(device, &mut rng);
    }
    let heads = [(2, 2), (4, 2), (3, 1)];
    let pairs = [
        (1, 1),
        (17, 17),
        (113, 113),
        (1, 239),
        (17, 300),
        (300, 17),
        (113, 1025),
        (1025, 113),
        (1025, 1025),
    ];
    let mut n = 0;
    for &(sq, sk) in &pairs {
        let masks = [
            AttentionMask::Window { left: 63, right: 0 },
            AttentionMask::Window { left: sk - 1, right: 0 },
            AttentionMask::Window {
                left: 2 * sk + 5,
                right: 3,
            },
            AttentionMask::Window { left: 5, right: 140 },
            AttentionMask::Lambda { global: 0, window: 33 },
            AttentionMask::Lambda { global: 1, window: sk },
            AttentionMask::Lambda {
                global: 4,
                window: 2 * sk + 1,
            },
            AttentionMask::Lambda {
                global: 130,
                window: 100,
            },
        ];
        for mask in masks {
            let (hq, hkv) = heads[n % heads.len()];
            let d = if n % 2 == 0 { 128 } else { 64 };
            n += 1;
            // One head on the largest pair: the f64 reference is single-threaded.
            let (hq, hkv) = if sq * sk > 1 << 20 { (hq / hkv, 1) } else { (hq, hkv) };
            let case = Case::dense(2, sq, sk, hq, hkv, d, mask);
            check_hopper::<bf16>(device, &mut rng, &case);
            if sq * sk < 1 << 17 || n % 3 == 0 {
                check_hopper::<f16>(device, &mut rng, &case);
            }
        }
    }
    // Long sequences: many tiles skipped between the global run and the window, the window's
    // first tile masked element by element.
    for (sq, sk, d, mask) in [
        (4097, 4097, 128, AttentionMask::Window { left: 4095, right: 0 }),
        (
            4097,
            4097,
            64,
            AttentionMask::Lambda {
                global: 4,
                window: 1000,
            },
        ),
        (
            1025,
            4097,
            128,
            AttentionMask::Lambda {
                global: 130,
                window: 700,
            },
        ),
        (4097, 1025, 64, AttentionMask::Window { left: 300, right: 20 }),
    ] {
        let case = Case::dense(1, sq, sk, 1, 1, d, mask);
        if d == 128 {
            check_hopper::<bf16>(device, &mut rng, &case);
        } else {
            check_hopper::<f16>(device, &mut rng, &case);
        }
    }
    // seq_q > seq_k: the first 140 queries sit before key 0 and see nothing.
    for (d, mask) in [
        (64, AttentionMask::Window { left: 3, right: 0 }),
        (128, AttentionMask::Lambda { global: 4, window: 8 }),
    ] {
        let (sq, sk, hq) = (200, 60, 2);
        let r = check_hopper::<bf16>(device, &mut rng, &Case::dense(1, sq, sk, hq, 1, d, mask));
        for row in 0..(sq - sk) * hq {
            assert_eq!(r.lse[row], f64::NEG_INFINITY, "{mask:?} row {row}");
            assert!(
                r.out[row * d..(row + 1) * d].iter().all(|&x| x == 0.0),
                "{mask:?} row {row}"
            );
        }
    }
}

/// Packed (varlen) batches on the Hopper kernel: sequences of 1, 17, 128 and 300 tokens, seq_q ≠
/// seq_k within a sequence, empty sequences, every mask, GQA/MQA, head dims 64 and 128, bf16 and
/// f16, and equal lengths given as offsets (served as a dense batch).
fn hopper_varlen(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_elsewhere(device, &mut rng);
    }
    let layouts: [Vec<(usize, usize)>; 5] = [
        vec![(1, 1), (17, 17), (128, 128), (300, 300)],
        vec![(300, 300), (128, 128), (17, 17), (1, 1)],
        vec![(17, 300), (300, 17), (1, 128), (128, 1)],
        vec![(0, 5), (17, 17), (3, 0), (128, 300)],
        vec![(128, 128), (128, 128), (128, 128)],
    ];
    let masks = [
        AttentionMask::None,
        AttentionMask::Causal,
        AttentionMask::Window { left: 20, right: 5 },
        AttentionMask::Lambda { global: 4, window: 64 },
        AttentionMask::Lambda {
            global: 130,
            window: 17,
        },
    ];
    let heads = [(2, 2), (4, 2), (3, 1)];
    let mut n = 0;
    for seqs in &layouts {
        for mask in masks {
            let (hq, hkv) = heads[n % heads.len()];
            let d = if n % 2 == 0 { 64 } else { 128 };
            n += 1;
            let case = Case {
                seqs: seqs.clone(),
                packed: true,
                ..Case::dense(1, 1, 1, hq, hkv, d, mask)
            };
            check_hopper::<bf16>(device, &mut rng, &case);
            check_hopper::<f16>(device, &mut rng, &case);
        }
    }
}

/// A packed sequence's key tiles that run into the next sequence read its rows: infinities
/// there (in q, k and v) must not reach this sequence's output, as they could through 0 · ∞ if
/// its masked keys' values were multiplied rather than zeroed.
fn hopper_varlen_isolated(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_elsewhere(device, &mut rng);
    }
    for (d, mask) in [(64, AttentionMask::None), (128, AttentionMask::Causal)] {
        let case = Case {
            seqs: vec![(70, 100), (60, 90)],
            packed: true,
            ..Case::dense(1, 1, 1, 2, 1, d, mask)
        };
        let (mut q, mut k, mut v, _) = random_inputs::<bf16>(&mut rng, &case);
        let (sq0, sk0) = case.seqs[0];
        let infinity = bf16::from_f32(f32::INFINITY);
        q[sq0 * 2 * d..].fill(infinity);
        k[sk0 * d..].fill(infinity);
        v[sk0 * d..].fill(infinity);
        let (out, lse) = run_hopper(device, &case, &q, &k, &v);
        // The first sequence alone, as a dense case on its own rows.
        let first = Case::dense(1, sq0, sk0, 2, 1, d, mask);
        let inputs = Inputs {
            q: common::to_f64(&q[..sq0 * 2 * d]),
            k: common::to_f64(&k[..sk0 * d]),
            v: common::to_f64(&v[..sk0 * d]),
            d_out: vec![0.0; sq0 * 2 * d],
        };
        let exact = naive(&first, &inputs, None);
        let rounded = naive(&first, &inputs, Some(round_to::<bf16> as fn(f64) -> f64));
        let ours_out = read::<bf16>(&out)[..sq0 * 2 * d].to_vec();
        let ours_lse: Vec<f64> = lse.to_vec::<f32>().unwrap()[..sq0 * 2]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let unit = unit_roundoff::<bf16>();
        check_rule(
            &format!("isolated out d{d} {mask:?}"),
            &ours_out,
            &rounded.out,
            &exact.out,
            2.0,
            unit,
        );
        let lse_error = max_error(&ours_lse, &exact.lse).unwrap_or_else(|e| panic!("isolated lse: {e}"));
        assert!(
            lse_error <= 1e-3 + 4.0 * unit * max_abs(&exact.lse),
            "isolated lse: {lse_error:.3e}"
        );
    }
}

/// Forcing the Hopper kernel on a call it does not serve is an `Unsupported` error on a GPU
/// (it never silently runs another kernel); the CPU ignores the choice and computes.
fn hopper_refuses_other_calls(device: &Device) {
    let mut rng = common::rng();
    let rope = AttentionRope {
        config: rope_config(64, vec![10_000.0], RopeConvention::RotateHalf),
        distance_ceiling: None,
    };
    let ceiling = AttentionRope {
        distance_ceiling: Some(9),
        ..rope.clone()
    };
    let cases = [
        Case::dense(1, 40, 40, 2, 1, 72, AttentionMask::Causal),
        Case {
            rope: Some(rope),
            ..Case::dense(1, 40, 40, 2, 1, 64, AttentionMask::Causal)
        },
        Case {
            rope: Some(ceiling),
            ..Case::dense(1, 40, 40, 2, 1, 64, AttentionMask::Lambda { global: 2, window: 9 })
        },
    ];
    for case in &cases {
        let (q, k, v, _) = random_inputs::<bf16>(&mut rng, case);
        let tensor = |data: &[bf16], shape: Vec<usize>| Tensor::from_slice(data, &shape, device).unwrap();
        let (qt, kt, vt) = (
            tensor(&q, case.q_shape()),
            tensor(&k, case.k_shape()),
            tensor(&v, case.k_shape()),
        );
        let result = with_attention_kernel(AttentionKernel::Hopper, || {
            attention_forward(&qt, &kt, &vt, &case.options())
        });
        match (device.is_cuda(), result) {
            (false, Ok(_)) => {}
            (true, Err(tessera::Error::Unsupported { reason, .. })) => assert!(reason.contains("Hopper"), "{reason}"),
            (_, other) => panic!("{case:?}: unexpected {other:?}"),
        }
    }
}

// ---- the Hopper (sm_90a) backward -----------------------------------------------------------

/// Fills the device's memory pool with NaN where the backward's outputs will be allocated: it
/// allocates NaN-filled tensors of their sizes and frees them just before the call, so that the
/// stream-ordered allocator hands the same blocks back, and a gradient element the kernels never
/// write reads as NaN (which no check passes) instead of a stale correct value.
fn poison_gradients(case: &Case, dtype: DType, device: &Device) {
    if device.is_cuda() {
        let poison = [case.q_shape(), case.k_shape(), case.k_shape()].map(|shape| poisoned(&shape, dtype, device));
        drop(poison);
    }
}

/// The forward on the mma.sync kernels (checked against the references), then the backward with
/// the Hopper kernels forced into poisoned memory, checked element by element; returns our
/// results.
fn check_hopper_backward<T: Float>(device: &Device, rng: &mut StdRng, case: &Case) -> Results {
    let (q, k, v, d_o) = random_inputs::<T>(rng, case);
    let tensor = |data: &[T], shape: Vec<usize>| Tensor::from_slice(data, &shape, device).unwrap();
    let (qt, kt, vt, dot) = (
        tensor(&q, case.q_shape()),
        tensor(&k, case.k_shape()),
        tensor(&v, case.k_shape()),
        tensor(&d_o, case.q_shape()),
    );
    let options = case.options();
    let (out, lse) =
        with_attention_kernel(AttentionKernel::MmaSync, || attention_forward(&qt, &kt, &vt, &options)).unwrap();
    let inputs = Inputs {
        q: common::to_f64(&q),
        k: common::to_f64(&k),
        v: common::to_f64(&v),
        d_out: common::to_f64(&d_o),
    };
    let (ours, exact, rounded, what) = check_forward::<T>(case, &inputs, &out, &lse);
    poison_gradients(case, T::DTYPE, device);
    let (dq, dk, dv) = with_attention_kernel(AttentionKernel::Hopper, || {
        attention_backward(&dot, &qt, &kt, &vt, &out, &lse, &options)
    })
    .unwrap();
    let ours = Results {
        d_q: read::<T>(&dq),
        d_k: read::<T>(&dk),
        d_v: read::<T>(&dv),
        ..ours
    };
    let unit = unit_roundoff::<T>();
    let what = format!("{what} sm90");
    check_rule(&format!("d_q {what}"), &ours.d_q, &rounded.d_q, &exact.d_q, 3.0, unit);
    check_rule(&format!("d_k {what}"), &ours.d_k, &rounded.d_k, &exact.d_k, 3.0, unit);
    check_rule(&format!("d_v {what}"), &ours.d_v, &rounded.d_v, &exact.d_v, 3.0, unit);
    ours
}

/// Where the Hopper kernels do not run: on the CPU the choice changes nothing (the CPU backward,
/// checked against the references); on another GPU forcing them on the backward is an
/// `Unsupported` error that names the image.
fn hopper_backward_elsewhere(device: &Device, rng: &mut StdRng) {
    let case = Case::dense(2, 17, 33, 2, 1, 64, AttentionMask::Causal);
    let before = attention_kernel();
    if device.is_cuda() {
        let q = Tensor::from_slice(&uniform::<bf16>(rng, 2 * 17 * 2 * 64), &case.q_shape(), device).unwrap();
        let k = Tensor::from_slice(&uniform::<bf16>(rng, 2 * 33 * 64), &case.k_shape(), device).unwrap();
        let (out, lse) = attention_forward(&q, &k, &k, &case.options()).unwrap();
        let result = with_attention_kernel(AttentionKernel::Hopper, || {
            attention_backward(&out, &q, &k, &k, &out, &lse, &case.options())
        });
        match result {
            Err(tessera::Error::Unsupported { reason, .. }) => assert!(reason.contains("sm_90a"), "{reason}"),
            other => panic!("forcing the Hopper backward off Hopper: expected Unsupported, got {other:?}"),
        }
    } else {
        check_hopper_backward::<bf16>(device, rng, &case);
    }
    assert_eq!(attention_kernel(), before);
}

/// A small grid for compute-sanitizer: partial tiles, a key tile and a query tile whose second
/// 64-row half lies wholly past the sequence, fully masked rows (causal, seq_q > seq_k), GQA and
/// MQA, both dtypes and both head dims, several query tiles per key tile.
fn small_attention_hopper_backward(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_backward_elsewhere(device, &mut rng);
    }
    check_hopper_backward::<bf16>(
        device,
        &mut rng,
        &Case::dense(2, 17, 33, 2, 1, 64, AttentionMask::Causal),
    );
    check_hopper_backward::<f16>(
        device,
        &mut rng,
        &Case::dense(1, 70, 70, 2, 1, 128, AttentionMask::None),
    );
    check_hopper_backward::<bf16>(
        device,
        &mut rng,
        &Case::dense(1, 150, 100, 4, 2, 128, AttentionMask::Causal),
    );
}

/// The Hopper backward forced on every class of shape it serves: one key or query, partial
/// tiles, several tiles, seq_q ≠ seq_k both ways, none and causal, MHA/GQA/MQA, head dims 64 and
/// 128, bf16 and f16; and the rows that causal attention with seq_q > seq_k hides, whose query
/// gradient must be exactly 0.
fn hopper_backward(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_backward_elsewhere(device, &mut rng);
    }
    for case in hopper_dense_cases(&[(64, 193)]) {
        check_hopper_backward::<bf16>(device, &mut rng, &case);
        check_hopper_backward::<f16>(device, &mut rng, &case);
    }
    for d in [64, 128] {
        let (sq, sk, hq) = (200, 60, 2);
        let r = check_hopper_backward::<bf16>(
            device,
            &mut rng,
            &Case::dense(1, sq, sk, hq, 1, d, AttentionMask::Causal),
        );
        for row in 0..(sq - sk) * hq {
            assert!(r.d_q[row * d..(row + 1) * d].iter().all(|&x| x == 0.0), "row {row}");
        }
    }
}

/// Long sequences: many query tiles per key tile and many key tiles per query tile through the
/// rings (each stage reused many times, so that every mbarrier phase flips), lengths one past a
/// tile, GQA groups walked in one CTA.
fn hopper_backward_long(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_backward_elsewhere(device, &mut rng);
    }
    for (n, &(sq, sk)) in [(1025, 1025), (1025, 2049), (2049, 1025)].iter().enumerate() {
        for mask in [AttentionMask::None, AttentionMask::Causal] {
            let d = if n % 2 == 0 { 128 } else { 64 };
            // The f64 reference is single-threaded: one sequence of few heads.
            let case = Case::dense(1, sq, sk, 2, 1, d, mask);
            if mask == AttentionMask::None {
                check_hopper_backward::<bf16>(device, &mut rng, &case);
            } else {
                check_hopper_backward::<f16>(device, &mut rng, &case);
            }
        }
    }
}

/// Two Hopper backward runs on the same inputs give the same bits (no atomics; dK and dV sum the
/// query heads of a group and the query tiles in one fixed order).
fn hopper_backward_is_deterministic(device: &Device) {
    let mut rng = common::rng();
    if !is_hopper(device) {
        return hopper_backward_elsewhere(device, &mut rng);
    }
    for (d, mask) in [(64, AttentionMask::None), (128, AttentionMask::Causal)] {
        let (b, sq, sk, hq, hkv) = (2, 300, 420, 4, 2);
        let tensor = |shape: &[usize], rng: &mut StdRng| {
            let data: Vec<bf16> = uniform(rng, shape.iter().product());
            Tensor::from_slice(&data, shape, device).unwrap()
        };
        let q = tensor(&[b, sq, hq, d], &mut rng);
        let k = tensor(&[b, sk, hkv, d], &mut rng);
        let v = tensor(&[b, sk, hkv, d], &mut rng);
        let d_o = tensor(&[b, sq, hq, d], &mut rng);
        let options = AttentionOptions {
            mask,
            ..Default::default()
        };
        let (out, lse) = attention_forward(&q, &k, &v, &options).unwrap();
        let run = || {
            with_attention_kernel(AttentionKernel::Hopper, || {
                attention_backward(&d_o, &q, &k, &v, &out, &lse, &options)
            })
            .map(|(dq, dk, dv)| [dq, dk, dv].map(|t| t.to_vec::<bf16>().unwrap()))
            .unwrap()
        };
        assert_eq!(run(), run(), "d{d} {mask:?}");
    }
}

/// Forcing the Hopper kernels on a backward they do not serve is an `Unsupported` error on a GPU
/// (never another kernel run silently); the CPU ignores the choice and computes.
fn hopper_backward_refuses_other_calls(device: &Device) {
    let mut rng = common::rng();
    let rope = AttentionRope {
        config: rope_config(64, vec![10_000.0], RopeConvention::RotateHalf),
        distance_ceiling: None,
    };
    let cases = [
        Case::dense(1, 40, 40, 2, 1, 64, AttentionMask::Window { left: 7, right: 0 }),
        Case::dense(1, 40, 40, 2, 1, 64, AttentionMask::Lambda { global: 2, window: 9 }),
        Case::dense(1, 40, 40, 2, 1, 72, AttentionMask::Causal),
        Case::dense(1, 40, 40, 2, 1, 256, AttentionMask::None),
        Case {
            seqs: vec![(10, 12), (30, 28)],
            packed: true,
            ..Case::dense(1, 1, 1, 2, 1, 64, AttentionMask::Causal)
        },
        // Packed sequences of equal lengths without queries or keys: no tensor map describes
        // them.
        Case {
            seqs: vec![(0, 12), (0, 12)],
            packed: true,
            ..Case::dense(1, 1, 1, 2, 1, 64, AttentionMask::Causal)
        },
        Case {
            seqs: vec![(9, 0), (9, 0)],
            packed: true,
            ..Case::dense(1, 1, 1, 2, 1, 64, AttentionMask::None)
        },
        Case {
            rope: Some(rope),
            ..Case::dense(1, 40, 40, 2, 1, 64, AttentionMask::Causal)
        },
    ];
    for case in &cases {
        let (q, k, v, d_o) = random_inputs::<bf16>(&mut rng, case);
        let tensor = |data: &[bf16], shape: Vec<usize>| Tensor::from_slice(data, &shape, device).unwrap();
        let (qt, kt, vt, dot) = (
            tensor(&q, case.q_shape()),
            tensor(&k, case.k_shape()),
            tensor(&v, case.k_shape()),
            tensor(&d_o, case.q_shape()),
        );
        let options = case.options();
        let (out, lse) =
            with_attention_kernel(AttentionKernel::MmaSync, || attention_forward(&qt, &kt, &vt, &options)).unwrap();
        let result = with_attention_kernel(AttentionKernel::Hopper, || {
            attention_backward(&dot, &qt, &kt, &vt, &out, &lse, &options)
        });
        match (device.is_cuda(), result) {
            (false, Ok(_)) => {}
            (true, Err(tessera::Error::Unsupported { reason, .. })) => assert!(reason.contains("Hopper"), "{reason}"),
            (_, other) => panic!("{case:?}: unexpected {other:?}"),
        }
    }
}

/// `attention_backward_into` writes, into NaN-poisoned gradients, bitwise what
/// `attention_backward` returns (the same kernels; that form is checked against the references
/// above), with grouped heads and the causal mask, and refuses gradients of the wrong shape or
/// dtype without writing them.
fn backward_into_matches_backward<T: Float>(device: &Device) {
    use tessera::ops::attention_backward_into;
    let mut rng = common::rng();
    let (batch, seq, heads, kv_heads, d) = (2, 33, 4, 2, 64);
    let (q_shape, kv_shape) = ([batch, seq, heads, d], [batch, seq, kv_heads, d]);
    let tensor = |rng: &mut StdRng, shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(uniform::<T>(rng, n), shape, device).unwrap()
    };
    let (q, k, v) = (
        tensor(&mut rng, &q_shape),
        tensor(&mut rng, &kv_shape),
        tensor(&mut rng, &kv_shape),
    );
    let d_out = tensor(&mut rng, &q_shape);
    let options = AttentionOptions {
        mask: AttentionMask::Causal,
        ..Default::default()
    };
    let (out, lse) = attention_forward(&q, &k, &v, &options).unwrap();
    let (dq, dk, dv) = attention_backward(&d_out, &q, &k, &v, &out, &lse, &options).unwrap();
    let (mut dq_into, mut dk_into, mut dv_into) = (poisoned_like(&dq), poisoned_like(&dk), poisoned_like(&dv));
    attention_backward_into(
        &d_out,
        &q,
        &k,
        &v,
        &out,
        &lse,
        &options,
        &mut dq_into,
        &mut dk_into,
        &mut dv_into,
    )
    .unwrap();
    for (name, into, fresh) in [("d_q", &dq_into, &dq), ("d_k", &dk_into, &dk), ("d_v", &dv_into, &dv)] {
        let values = read::<T>(into);
        assert!(
            values.iter().all(|x| x.is_finite()),
            "{name}: an element left unwritten"
        );
        assert_eq!(common::bytes(into), common::bytes(fresh), "{name}");
    }
    let op = "attention_backward";
    let mut wrong_shape = poisoned(&q_shape, T::DTYPE, device);
    let result = attention_backward_into(
        &d_out,
        &q,
        &k,
        &v,
        &out,
        &lse,
        &options,
        &mut dq_into,
        &mut wrong_shape,
        &mut dv_into,
    );
    assert_invalid(result, op, "d_k", &["[2, 33, 2, 64]"]);
    let other = if T::DTYPE == DType::F32 {
        DType::BF16
    } else {
        DType::F32
    };
    let mut wrong_dtype = poisoned(&q_shape, other, device);
    let (mut dk_poisoned, mut dv_poisoned) = (poisoned_like(&dk), poisoned_like(&dv));
    let before = [common::bytes(&dk_poisoned), common::bytes(&dv_poisoned)];
    let result = attention_backward_into(
        &d_out,
        &q,
        &k,
        &v,
        &out,
        &lse,
        &options,
        &mut wrong_dtype,
        &mut dk_poisoned,
        &mut dv_poisoned,
    );
    assert_invalid(result, op, "d_q", &[T::DTYPE.name()]);
    let after = [common::bytes(&dk_poisoned), common::bytes(&dv_poisoned)];
    assert_eq!(after, before, "a refused call writes nothing");
}

#[test]
fn cpu_backward_into_matches_backward() {
    backward_into_matches_backward::<f32>(&Device::Cpu);
    backward_into_matches_backward::<bf16>(&Device::Cpu);
}

#[test]
fn gpu_backward_into_matches_backward() {
    if let Some(device) = common::gpu() {
        backward_into_matches_backward::<bf16>(&device);
        backward_into_matches_backward::<f16>(&device);
    }
}
