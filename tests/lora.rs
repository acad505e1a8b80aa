//! Fused LoRA (src/ops/lora.rs, kernels/lora.cu) against f64 references computed on the host from
//! the exact input values, on every device: forward and backward for every dtype and odd token
//! counts, batches of many adapters with mixed ranks (padding filled with NaN, which must never be
//! read), finite differences, merge/unmerge, SLoPe's lazy adapters, VeLoRA and argument errors;
//! the same over a 2:4 sparse base (SLoPe's sparse + low-rank, `dX` through `W_dp`).

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, bytes, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::lora::{set_blas_rows, DEFAULT_BLAS_ROWS, MAX_RANK};
use tessera::ops::sparse::stored_index;
use tessera::ops::{
    lora_backward, lora_forward, lora_forward_into, lora_merge, lora_merged_weight, lora_unmerge, matmul,
    sparse24_compress, sparse24_double_prune, sparse_linear_forward, LoraAdapters, LoraBase, LoraRouting,
    MatmulOptions, Sparse24, Velora,
};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_lora_forward,
    small_lora_backward,
    small_lora_merge,
    small_velora,
    forward_f32,
    forward_bf16,
    forward_f16,
    forward_odd_token_counts,
    forward_one_adapter_full_rank,
    many_adapters_mixed_ranks,
    sixty_four_adapters,
    backward_f32,
    backward_bf16,
    backward_f16,
    backward_many_adapters,
    finite_differences,
    merge_unmerge_round_trip,
    lazy_adapters_leave_the_output_unchanged,
    velora_fixture,
    velora_one_value_per_group_is_exact,
    velora_compress_and_rebuild,
    velora_weight_gradient_identity,
    into_form_writes_a_poisoned_output,
    errors_name_the_argument,
    errors_leave_outputs_unchanged,
    replaced_adapter_tensors_are_refused,
    one_adapter_on_either_path,
    small_sparse_base_forward,
    small_sparse_base_backward,
    sparse_base_forward_dtypes,
    sparse_base_odd_token_counts,
    sparse_base_many_adapters_mixed_ranks,
    sparse_base_one_adapter_full_rank,
    sparse_base_lazy_adapters,
    sparse_base_merged_weight,
    sparse_base_errors,
);

// ---- cases, inputs and references ----------------------------------------------------------

#[derive(Clone, Debug)]
struct Case {
    m: usize,
    d_in: usize,
    d_out: usize,
    max_rank: usize,
    ranks: Vec<usize>,
    scales: Vec<f32>,
    ids: Vec<u32>,
}

impl Case {
    /// One adapter of rank `rank` (padded to `max_rank`) for every row.
    fn single(m: usize, d_in: usize, d_out: usize, rank: usize, max_rank: usize) -> Case {
        Case {
            m,
            d_in,
            d_out,
            max_rank,
            ranks: vec![rank],
            scales: vec![0.75 / (rank as f32).sqrt()],
            ids: vec![0; m],
        }
    }

    /// `count` adapters of random ranks up to `max_rank`, random ids (the last adapter unused
    /// when `count > 1`, so that its gradients must be zero).
    fn mixed(rng: &mut StdRng, m: usize, d_in: usize, d_out: usize, count: usize, max_rank: usize) -> Case {
        let ranks: Vec<usize> = (0..count).map(|_| rng.random_range(1..=max_rank)).collect();
        let scales = ranks
            .iter()
            .map(|&r| rng.random_range(0.5..1.5f32) / (r as f32).sqrt())
            .collect();
        let used = if count > 1 { count - 1 } else { 1 } as u32;
        let ids = (0..m).map(|_| rng.random_range(0..used)).collect();
        Case {
            m,
            d_in,
            d_out,
            max_rank,
            ranks,
            scales,
            ids,
        }
    }

    fn count(&self) -> usize {
        self.ranks.len()
    }
}

/// The inputs of a case as values of `T`, padding of A and B filled with NaN.
struct Data<T> {
    x: Vec<T>,
    w: Vec<T>,
    bias: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
}

fn data<T: Float>(rng: &mut StdRng, c: &Case) -> Data<T> {
    let nan = T::from_f32(f32::NAN);
    let mut a: Vec<T> = uniform(rng, c.count() * c.max_rank * c.d_in);
    let mut b: Vec<T> = uniform(rng, c.count() * c.d_out * c.max_rank);
    for (adapter, &rank) in c.ranks.iter().enumerate() {
        for j in rank..c.max_rank {
            for k in 0..c.d_in {
                a[(adapter * c.max_rank + j) * c.d_in + k] = nan;
            }
            for o in 0..c.d_out {
                b[(adapter * c.d_out + o) * c.max_rank + j] = nan;
            }
        }
    }
    Data {
        x: uniform(rng, c.m * c.d_in),
        w: uniform(rng, c.d_out * c.d_in),
        bias: uniform(rng, c.d_out),
        a,
        b,
    }
}

struct Tensors {
    x: Tensor,
    w: Tensor,
    bias: Tensor,
    adapters: LoraAdapters,
    routing: LoraRouting,
}

fn tensors<T: Float>(c: &Case, d: &Data<T>, device: &Device) -> Tensors {
    let a = Tensor::from_slice(&d.a, &[c.count(), c.max_rank, c.d_in], device).unwrap();
    let b = Tensor::from_slice(&d.b, &[c.count(), c.d_out, c.max_rank], device).unwrap();
    Tensors {
        x: Tensor::from_slice(&d.x, &[c.m, c.d_in], device).unwrap(),
        w: Tensor::from_slice(&d.w, &[c.d_out, c.d_in], device).unwrap(),
        bias: Tensor::from_slice(&d.bias, &[c.d_out], device).unwrap(),
        adapters: LoraAdapters::new(a, b, &c.ranks, &c.scales).unwrap(),
        routing: LoraRouting::per_row(&c.ids, device).unwrap(),
    }
}

/// f64 views of the inputs.
struct Exact {
    x: Vec<f64>,
    w: Vec<f64>,
    bias: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
}

fn exact<T: Float>(d: &Data<T>) -> Exact {
    let f = |v: &[T]| v.iter().map(|e| e.to_f64()).collect();
    Exact {
        x: f(&d.x),
        w: f(&d.w),
        bias: f(&d.bias),
        a: f(&d.a),
        b: f(&d.b),
    }
}

impl Case {
    fn a(&self, e: &Exact, adapter: usize, j: usize, k: usize) -> f64 {
        e.a[(adapter * self.max_rank + j) * self.d_in + k]
    }

    fn b(&self, e: &Exact, adapter: usize, o: usize, j: usize) -> f64 {
        e.b[(adapter * self.d_out + o) * self.max_rank + j]
    }

    /// `t[i][j] = Σ_k x[i,k]·A[a_i, j, k]` for j below row i's rank.
    fn t(&self, e: &Exact, x: &[f64]) -> Vec<Vec<f64>> {
        (0..self.m)
            .map(|i| {
                let a = self.ids[i] as usize;
                (0..self.ranks[a])
                    .map(|j| (0..self.d_in).map(|k| x[i * self.d_in + k] * self.a(e, a, j, k)).sum())
                    .collect()
            })
            .collect()
    }

    /// `Y = X·Wᵀ + s·T·Bᵀ (+ bias)`, in f64.
    fn forward(&self, e: &Exact, with_bias: bool) -> Vec<f64> {
        let t = self.t(e, &e.x);
        let mut y = vec![0.0; self.m * self.d_out];
        for i in 0..self.m {
            let a = self.ids[i] as usize;
            for o in 0..self.d_out {
                let base: f64 = (0..self.d_in)
                    .map(|k| e.x[i * self.d_in + k] * e.w[o * self.d_in + k])
                    .sum();
                let lora: f64 = (0..self.ranks[a]).map(|j| t[i][j] * self.b(e, a, o, j)).sum();
                y[i * self.d_out + o] = base + self.scales[a] as f64 * lora + if with_bias { e.bias[o] } else { 0.0 };
            }
        }
        y
    }

    /// (dX, dA, dB, dW) in f64; dA and dB zero at padded ranks and for unused adapters.
    fn backward(&self, e: &Exact, x: &[f64], dy: &[f64]) -> [Vec<f64>; 4] {
        let (m, di, dout, r) = (self.m, self.d_in, self.d_out, self.max_rank);
        let t = self.t(e, x);
        let u: Vec<Vec<f64>> = (0..m)
            .map(|i| {
                let a = self.ids[i] as usize;
                (0..self.ranks[a])
                    .map(|j| (0..dout).map(|o| dy[i * dout + o] * self.b(e, a, o, j)).sum())
                    .collect()
            })
            .collect();
        let mut dx = vec![0.0; m * di];
        let mut da = vec![0.0; self.count() * r * di];
        let mut db = vec![0.0; self.count() * dout * r];
        let mut dw = vec![0.0; dout * di];
        for i in 0..m {
            let a = self.ids[i] as usize;
            let s = self.scales[a] as f64;
            for k in 0..di {
                let base: f64 = (0..dout).map(|o| dy[i * dout + o] * e.w[o * di + k]).sum();
                let lora: f64 = (0..self.ranks[a]).map(|j| u[i][j] * self.a(e, a, j, k)).sum();
                dx[i * di + k] = base + s * lora;
            }
            for j in 0..self.ranks[a] {
                for k in 0..di {
                    da[(a * r + j) * di + k] += s * u[i][j] * x[i * di + k];
                }
                for o in 0..dout {
                    db[(a * dout + o) * r + j] += s * dy[i * dout + o] * t[i][j];
                }
            }
            for o in 0..dout {
                for k in 0..di {
                    dw[o * di + k] += dy[i * dout + o] * x[i * di + k];
                }
            }
        }
        [dx, da, db, dw]
    }
}

fn check_forward<T: Float>(device: &Device, rng: &mut StdRng, c: &Case, what: &str) {
    let d = data::<T>(rng, c);
    let t = tensors(c, &d, device);
    let e = exact(&d);
    for with_bias in [false, true] {
        let y = lora_forward(
            &t.x,
            LoraBase::Dense(&t.w),
            with_bias.then_some(&t.bias),
            &t.adapters,
            &t.routing,
        )
        .unwrap();
        assert_eq!(y.shape(), &[c.m, c.d_out]);
        assert_close(
            &format!("{what} forward (bias {with_bias})"),
            &values::<T>(&y),
            &c.forward(&e, with_bias),
            T::MATMUL_TOLERANCE,
        );
    }
}

fn check_backward<T: Float>(device: &Device, rng: &mut StdRng, c: &Case, what: &str) {
    let d = data::<T>(rng, c);
    let t = tensors(c, &d, device);
    let e = exact(&d);
    let dy: Vec<T> = uniform(rng, c.m * c.d_out);
    let dy_tensor = Tensor::from_slice(&dy, &[c.m, c.d_out], device).unwrap();
    let g = lora_backward(&dy_tensor, &t.x, LoraBase::Dense(&t.w), &t.adapters, &t.routing, true).unwrap();
    let [dx, da, db, dw] = c.backward(&e, &e.x, &common::to_f64(&dy));
    let tolerance = T::MATMUL_TOLERANCE;
    assert_close(&format!("{what} d_x"), &values::<T>(&g.d_x), &dx, tolerance);
    assert_close(&format!("{what} d_a"), &values::<T>(&g.d_a), &da, tolerance);
    assert_close(&format!("{what} d_b"), &values::<T>(&g.d_b), &db, tolerance);
    assert_close(
        &format!("{what} d_w"),
        &values::<T>(g.d_w.as_ref().unwrap()),
        &dw,
        tolerance,
    );
    // Padded ranks and unused adapters: exactly zero.
    let (got_a, got_b) = (values::<T>(&g.d_a), values::<T>(&g.d_b));
    for (i, (&got, &want)) in got_a.iter().zip(&da).enumerate() {
        assert!(
            want != 0.0 || got == 0.0,
            "{what}: d_a[{i}] = {got}, expected exactly 0"
        );
    }
    for (i, (&got, &want)) in got_b.iter().zip(&db).enumerate() {
        assert!(
            want != 0.0 || got == 0.0,
            "{what}: d_b[{i}] = {got}, expected exactly 0"
        );
    }
    let without = lora_backward(&dy_tensor, &t.x, LoraBase::Dense(&t.w), &t.adapters, &t.routing, false).unwrap();
    assert!(without.d_w.is_none());
}

// ---- small cases (also the compute-sanitizer set) ----------------------------------------------

fn small_lora_forward(device: &Device) {
    let mut rng = common::rng();
    let c = Case::mixed(&mut rng, 19, 24, 20, 3, 8);
    check_forward::<bf16>(device, &mut rng, &c, "small mixed");
    check_forward::<f32>(device, &mut rng, &Case::single(70, 16, 12, 4, 4), "small full rank");
}

fn small_lora_backward(device: &Device) {
    let mut rng = common::rng();
    let c = Case::mixed(&mut rng, 19, 24, 20, 3, 8);
    check_backward::<bf16>(device, &mut rng, &c, "small mixed");
}

fn small_lora_merge(device: &Device) {
    merge_round_trip::<bf16>(device, 12, 20, 3, 8);
}

fn small_velora(device: &Device) {
    let mut rng = common::rng();
    velora_check::<bf16>(device, &mut rng, 9, 24, 3);
}

// ---- forward ------------------------------------------------------------------------------

fn forward_dtype<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, d_in, d_out, rank, max_rank) in [(1, 64, 48, 8, 8), (7, 40, 72, 16, 16), (33, 17, 23, 5, 8)] {
        let c = Case::single(m, d_in, d_out, rank, max_rank);
        check_forward::<T>(
            device,
            rng,
            &c,
            &format!("m={m} d_in={d_in} d_out={d_out} r={rank}/{max_rank}"),
        );
    }
    let c = Case::mixed(rng, 45, 32, 24, 4, MAX_RANK);
    check_forward::<T>(device, rng, &c, "mixed ranks up to 64");
}

fn forward_f32(device: &Device) {
    forward_dtype::<f32>(device);
}

fn forward_bf16(device: &Device) {
    forward_dtype::<bf16>(device);
}

fn forward_f16(device: &Device) {
    forward_dtype::<f16>(device);
}

fn forward_odd_token_counts(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for m in [1, 7, 113, 1025] {
        check_forward::<bf16>(
            device,
            rng,
            &Case::single(m, 48, 40, 16, 16),
            &format!("m={m} one adapter"),
        );
        let c = Case::mixed(rng, m, 48, 40, 5, 16);
        check_forward::<bf16>(device, rng, &c, &format!("m={m} mixed"));
    }
}

/// One adapter of full padded rank from 64 rows on: the cuBLASLt adapter path on the GPU.
fn forward_one_adapter_full_rank(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, rank) in [(64, 8), (200, 16), (129, 64)] {
        check_forward::<bf16>(
            device,
            rng,
            &Case::single(m, 96, 80, rank, rank),
            &format!("m={m} r={rank}"),
        );
        check_forward::<f32>(
            device,
            rng,
            &Case::single(m, 96, 80, rank, rank),
            &format!("m={m} r={rank}"),
        );
    }
    // The same adapter, second in a set of three: its offset inside the adapter tensors.
    let mut c = Case::single(100, 64, 64, 16, 16);
    c.ranks = vec![16, 16, 16];
    c.scales = vec![0.3, 0.2, 0.1];
    c.ids = vec![1; 100];
    check_forward::<bf16>(device, rng, &c, "adapter 1 of 3");
}

fn many_adapters_mixed_ranks(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, count, max_rank) in [(1, 7, 16), (17, 3, 64), (113, 9, 32), (300, 17, 8)] {
        let c = Case::mixed(rng, m, 40, 56, count, max_rank);
        check_forward::<bf16>(device, rng, &c, &format!("m={m} {count} adapters up to r={max_rank}"));
        check_forward::<f16>(device, rng, &c, &format!("m={m} {count} adapters up to r={max_rank}"));
    }
}

/// The serving case of the benchmark, small: 64 distinct adapters in 64 rows.
fn sixty_four_adapters(device: &Device) {
    let mut rng = common::rng();
    let mut c = Case::mixed(&mut rng, 64, 64, 48, 64, 16);
    c.ids = (0..64).rev().collect();
    check_forward::<bf16>(device, &mut rng, &c, "64 adapters, one row each");
    check_backward::<bf16>(device, &mut rng, &c, "64 adapters, one row each");
}

// ---- backward -----------------------------------------------------------------------------

fn backward_dtype<T: Float>(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, d_in, d_out, rank, max_rank) in [(1, 32, 24, 8, 8), (7, 40, 17, 3, 8), (113, 24, 40, 16, 16)] {
        let c = Case::single(m, d_in, d_out, rank, max_rank);
        check_backward::<T>(
            device,
            rng,
            &c,
            &format!("m={m} d_in={d_in} d_out={d_out} r={rank}/{max_rank}"),
        );
    }
}

fn backward_f32(device: &Device) {
    backward_dtype::<f32>(device);
}

fn backward_bf16(device: &Device) {
    backward_dtype::<bf16>(device);
}

fn backward_f16(device: &Device) {
    backward_dtype::<f16>(device);
}

fn backward_many_adapters(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, count, max_rank) in [(1, 2, 4), (65, 6, 64), (1025, 5, 16)] {
        let c = Case::mixed(rng, m, 24, 32, count, max_rank);
        check_backward::<f32>(device, rng, &c, &format!("m={m} {count} adapters up to r={max_rank}"));
        check_backward::<bf16>(device, rng, &c, &format!("m={m} {count} adapters up to r={max_rank}"));
    }
}

/// `L = Σ G ⊙ Y` is linear in each of X, W, A and B (the others fixed), so a central difference
/// with a large step is exact up to f32 rounding: each gradient of `lora_backward` (with dY = G)
/// against it, on a tiny shape with two adapters.
fn finite_differences(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let mut c = Case::mixed(rng, 3, 8, 4, 2, 3);
    c.ids = vec![0, 1, 1];
    let d = data::<f32>(rng, &c);
    let g: Vec<f32> = uniform(rng, c.m * c.d_out);
    let g_tensor = Tensor::from_slice(&g, &[c.m, c.d_out], device).unwrap();
    let loss = |d: &Data<f32>| -> f64 {
        let t = tensors(&c, d, device);
        let y = lora_forward(&t.x, LoraBase::Dense(&t.w), None, &t.adapters, &t.routing).unwrap();
        values::<f32>(&y).iter().zip(&g).map(|(y, g)| y * *g as f64).sum()
    };
    let t = tensors(&c, &d, device);
    let grads = lora_backward(&g_tensor, &t.x, LoraBase::Dense(&t.w), &t.adapters, &t.routing, true).unwrap();
    let analytic = [
        values::<f32>(&grads.d_x),
        values::<f32>(&grads.d_a),
        values::<f32>(&grads.d_b),
        values::<f32>(grads.d_w.as_ref().unwrap()),
    ];
    let step = 0.25f32;
    for (which, name) in ["x", "a", "b", "w"].iter().enumerate() {
        let len = field(&mut clone_data(&d), which).len();
        let mut numeric = vec![0.0f64; len];
        for (i, slot) in numeric.iter_mut().enumerate() {
            let (mut plus, mut minus) = (clone_data(&d), clone_data(&d));
            if field(&mut plus, which)[i].is_nan() {
                continue; // padding: no gradient, and the analytic one must be 0
            }
            field(&mut plus, which)[i] += step;
            field(&mut minus, which)[i] -= step;
            *slot = (loss(&plus) - loss(&minus)) / (2.0 * step as f64);
        }
        assert_close(
            &format!("finite differences d_{name}"),
            &analytic[which],
            &numeric,
            1e-4,
        );
    }
}

/// The input that finite difference `which` perturbs: x, A, B, W.
fn field<T: Float>(d: &mut Data<T>, which: usize) -> &mut Vec<T> {
    match which {
        0 => &mut d.x,
        1 => &mut d.a,
        2 => &mut d.b,
        _ => &mut d.w,
    }
}

fn clone_data<T: Float>(d: &Data<T>) -> Data<T> {
    Data {
        x: d.x.clone(),
        w: d.w.clone(),
        bias: d.bias.clone(),
        a: d.a.clone(),
        b: d.b.clone(),
    }
}

// ---- merge, lazy adapters --------------------------------------------------------------------

fn merge_round_trip<T: Float>(device: &Device, d_out: usize, d_in: usize, count: usize, max_rank: usize) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::mixed(rng, 21, d_in, d_out, count, max_rank);
    let d = data::<T>(rng, &c);
    let e = exact(&d);
    let mut t = tensors(&c, &d, device);
    let adapter = count - 2;
    lora_merge(&mut t.w, &t.adapters, adapter).unwrap();
    let merged = values::<T>(&t.w);
    let s = c.scales[adapter] as f64;
    let expected: Vec<f64> = (0..d_out * d_in)
        .map(|i| {
            let (o, k) = (i / d_in, i % d_in);
            e.w[i]
                + s * (0..c.ranks[adapter])
                    .map(|j| c.b(&e, adapter, o, j) * c.a(&e, adapter, j, k))
                    .sum::<f64>()
        })
        .collect();
    // Each element rounded once from its f32 value.
    for (i, (&got, &want)) in merged.iter().zip(&expected).enumerate() {
        let bound = T::MATMUL_TOLERANCE * want.abs().max(1e-3) + 1e-5 * (want.abs() + 1.0);
        assert!((got - want).abs() <= bound, "merged w[{i}] = {got}, expected {want}");
    }
    // A plain linear layer with the merged weight gives the adapter's output for its rows.
    let routing = LoraRouting::single(c.m, adapter as u32, device).unwrap();
    let fused = lora_forward(
        &t.x,
        LoraBase::Dense(&tensors(&c, &d, device).w),
        None,
        &t.adapters,
        &routing,
    )
    .unwrap();
    let plain = matmul(&t.x, &t.w, None, MatmulOptions::linear()).unwrap();
    assert_close(
        "merged linear vs fused adapter",
        &values::<T>(&plain),
        &values::<T>(&fused),
        2.0 * T::MATMUL_TOLERANCE,
    );
    lora_unmerge(&mut t.w, &t.adapters, adapter).unwrap();
    let restored = values::<T>(&t.w);
    for (i, (&got, &want)) in restored.iter().zip(&e.w).enumerate() {
        let delta = (merged[i] - want).abs();
        let bound = 2.0 * T::MATMUL_TOLERANCE * (want.abs() + delta) + 1e-6;
        assert!((got - want).abs() <= bound, "unmerged w[{i}] = {got}, was {want}");
    }
}

fn merge_unmerge_round_trip(device: &Device) {
    merge_round_trip::<f32>(device, 40, 24, 3, 16);
    merge_round_trip::<bf16>(device, 17, 33, 4, 64);
    merge_round_trip::<f16>(device, 24, 40, 2, 8);
}

fn lazy_adapters_leave_the_output_unchanged(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let (m, d_in, d_out, rank) = (37, 64, 48, 4);
    let x = Tensor::from_vec(uniform::<bf16>(rng, m * d_in), &[m, d_in], device).unwrap();
    let w = Tensor::from_vec(uniform::<bf16>(rng, d_out * d_in), &[d_out, d_in], device).unwrap();
    let bias = Tensor::from_vec(uniform::<bf16>(rng, d_out), &[d_out], device).unwrap();
    let adapters = LoraAdapters::lazy_init(2, rank, d_in, d_out, DType::BF16, device, 7).unwrap();
    assert_eq!(adapters.scales(), &[0.25, 0.25]);
    assert!(values::<bf16>(adapters.b()).iter().all(|&v| v == 0.0));
    let a = values::<bf16>(adapters.a());
    let mean = a.iter().sum::<f64>() / a.len() as f64;
    let variance = a.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / a.len() as f64;
    assert!(
        mean.abs() < 0.1 && (variance - 1.0).abs() < 0.15,
        "A: mean {mean}, variance {variance}"
    );
    let same = LoraAdapters::lazy_init(2, rank, d_in, d_out, DType::BF16, device, 7).unwrap();
    assert_eq!(bytes(same.a()), bytes(adapters.a()), "the same seed draws the same A");
    let routing = LoraRouting::per_row(&(0..m as u32).map(|i| i % 2).collect::<Vec<_>>(), device).unwrap();
    let with = lora_forward(&x, LoraBase::Dense(&w), Some(&bias), &adapters, &routing).unwrap();
    let without = matmul(&x, &w, Some(&bias), MatmulOptions::linear()).unwrap();
    // Bit for bit on the GPU too: two adapters route through the kernels, whose base product is
    // the same cuBLASLt call as the plain matmul's, and B = 0 adds exact zeros.
    assert_eq!(
        bytes(&with),
        bytes(&without),
        "inserting lazy adapters changed the output"
    );
    // At insertion dA = 0 (B = 0) while dB is not: training starts from B.
    let dy = Tensor::from_vec(uniform::<bf16>(rng, m * d_out), &[m, d_out], device).unwrap();
    let g = lora_backward(&dy, &x, LoraBase::Dense(&w), &adapters, &routing, false).unwrap();
    assert!(values::<bf16>(&g.d_a).iter().all(|&v| v == 0.0));
    assert!(values::<bf16>(&g.d_b).iter().any(|&v| v != 0.0));
    assert_invalid(
        LoraAdapters::lazy_init(1, MAX_RANK + 1, d_in, d_out, DType::BF16, device, 1),
        "LoraAdapters::lazy_init",
        "rank",
        &["65"],
    );
}

// ---- VeLoRA -------------------------------------------------------------------------------

fn velora_fixture(device: &Device) {
    let x = Tensor::from_vec(vec![1.0f32, 1.0, 3.0, 3.0], &[1, 4], device).unwrap();
    let velora = Velora::batch_average_once(&x, 2).unwrap();
    let v = values::<f32>(velora.vector());
    let h = 0.5f64.sqrt();
    assert!(v.iter().all(|&e| (e - h).abs() < 1e-6), "v = {v:?}");
    let z = velora.compress(&x).unwrap();
    let z_values = values::<f32>(&z);
    assert!(
        (z_values[0] - 2f64.sqrt()).abs() < 1e-5 && (z_values[1] - 18f64.sqrt()).abs() < 1e-5,
        "z = {z_values:?}"
    );
    let rebuilt = values::<f32>(&velora.rebuild(&z).unwrap());
    assert_close("x̂ = x", &rebuilt, &[1.0, 1.0, 3.0, 3.0], 1e-6);
    let (full, compressed) = velora.saved_bytes(1, 4, DType::F32);
    assert_eq!((full, compressed), (16, 8));
}

/// With one value per group `v = ±1`, so compress and rebuild return x bit for bit.
fn velora_one_value_per_group_is_exact(device: &Device) {
    let mut rng = common::rng();
    let x = Tensor::from_vec(uniform::<bf16>(&mut rng, 7 * 24), &[7, 24], device).unwrap();
    let velora = Velora::batch_average_once(&x, 24).unwrap();
    let z = velora.compress(&x).unwrap();
    let rebuilt = velora.rebuild(&z).unwrap();
    assert_eq!(bytes(&rebuilt), bytes(&x));
}

fn velora_check<T: Float>(device: &Device, rng: &mut StdRng, n: usize, dim: usize, groups: usize) {
    let sub = dim / groups;
    // Rows built from a common direction plus noise, as real activations share a mean.
    let x: Vec<T> = uniform::<T>(rng, n * dim)
        .iter()
        .enumerate()
        .map(|(i, e)| T::from_f32((e.to_f64() * 0.3 + 1.0 + (i % sub) as f64 * 0.1) as f32))
        .collect();
    let x_tensor = Tensor::from_slice(&x, &[n, dim], device).unwrap();
    let velora = Velora::batch_average_once(&x_tensor, groups).unwrap();
    let xs = common::to_f64(&x);
    let mut mean = vec![0.0f64; sub];
    for chunk in xs.chunks(sub) {
        for (m, v) in mean.iter_mut().zip(chunk) {
            *m += v / (n * groups) as f64;
        }
    }
    let norm = common::norm(mean.iter().copied());
    let v_ref: Vec<f64> = mean.iter().map(|m| m / norm).collect();
    assert_close("v", &values::<f32>(velora.vector()), &v_ref, 1e-6);
    let v = values::<f32>(velora.vector());
    let z_ref: Vec<f64> = xs
        .chunks(sub)
        .map(|c| c.iter().zip(&v).map(|(x, v)| x * v).sum())
        .collect();
    let z = velora.compress(&x_tensor).unwrap();
    assert_eq!(z.shape(), &[n, groups]);
    assert_close("z", &values::<T>(&z), &z_ref, T::MATMUL_TOLERANCE);
    let z_exact = values::<T>(&z);
    let rebuilt_ref: Vec<f64> = (0..n * dim).map(|i| z_exact[i / sub] * v[i % sub]).collect();
    assert_close(
        "x̂",
        &values::<T>(&velora.rebuild(&z).unwrap()),
        &rebuilt_ref,
        T::MATMUL_TOLERANCE,
    );
    let error = common::relative_error(&rebuilt_ref, &xs).unwrap();
    eprintln!("VeLoRA reconstruction error with {groups} groups of {sub}: {error:.3e}");
}

fn velora_compress_and_rebuild(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    velora_check::<f32>(device, rng, 113, 64, 8);
    velora_check::<bf16>(device, rng, 1025, 48, 3);
    velora_check::<f16>(device, rng, 7, 40, 40);
    let x = Tensor::from_vec(vec![1.0f32; 2 * 10], &[2, 10], device).unwrap();
    assert_invalid(
        Velora::batch_average_once(&x, 3),
        "Velora::batch_average_once",
        "groups",
        &["10", "3"],
    );
    let velora = Velora::batch_average_once(&x, 5).unwrap();
    let wrong = Tensor::from_vec(vec![1.0f32; 2 * 12], &[2, 12], device).unwrap();
    assert_invalid(velora.compress(&wrong), "Velora::compress", "groups", &["12"]);
    let zeros = Tensor::zeros(&[2, 10], DType::F32, device).unwrap();
    assert_invalid(
        Velora::batch_average_once(&zeros, 5),
        "Velora::batch_average_once",
        "x",
        &["non-zero"],
    );
}

/// dX does not depend on the saved input; dW and dA from the rebuild equal the factorised
/// identity `dW[:, g·D' + u] = v_u·(dYᵀ·Z)[:, g]`.
fn velora_weight_gradient_identity(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::single(33, 24, 16, 4, 4);
    let d = data::<f32>(rng, &c);
    let t = tensors(&c, &d, device);
    let groups = 6;
    let sub = c.d_in / groups;
    let velora = Velora::batch_average_once(&t.x, groups).unwrap();
    let z = velora.compress(&t.x).unwrap();
    let rebuilt = velora.rebuild(&z).unwrap();
    let dy: Vec<f32> = uniform(rng, c.m * c.d_out);
    let dy_tensor = Tensor::from_slice(&dy, &[c.m, c.d_out], device).unwrap();
    let full = lora_backward(&dy_tensor, &t.x, LoraBase::Dense(&t.w), &t.adapters, &t.routing, true).unwrap();
    let compressed = lora_backward(
        &dy_tensor,
        &rebuilt,
        LoraBase::Dense(&t.w),
        &t.adapters,
        &t.routing,
        true,
    )
    .unwrap();
    assert_eq!(
        bytes(&full.d_x),
        bytes(&compressed.d_x),
        "d_x must not depend on the saved input"
    );
    let (z, v, dy) = (values::<f32>(&z), values::<f32>(velora.vector()), common::to_f64(&dy));
    let factorised: Vec<f64> = (0..c.d_out * c.d_in)
        .map(|i| {
            let (o, col) = (i / c.d_in, i % c.d_in);
            let (g, u) = (col / sub, col % sub);
            v[u] * (0..c.m).map(|n| dy[n * c.d_out + o] * z[n * groups + g]).sum::<f64>()
        })
        .collect();
    assert_close(
        "VeLoRA d_w",
        &values::<f32>(compressed.d_w.as_ref().unwrap()),
        &factorised,
        1e-5,
    );
    let [_, da, _, _] = c.backward(&exact(&d), &values::<f32>(&rebuilt), &dy);
    assert_close("VeLoRA d_a", &values::<f32>(&compressed.d_a), &da, 1e-5);
}

// ---- _into, errors -------------------------------------------------------------------------

fn into_form_writes_a_poisoned_output(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for c in [Case::mixed(rng, 23, 32, 40, 3, 16), Case::single(90, 32, 40, 16, 16)] {
        let d = data::<bf16>(rng, &c);
        let t = tensors(&c, &d, device);
        let mut out = Tensor::zeros(&[c.m, c.d_out], DType::BF16, device).unwrap();
        out.fill_bytes(0xFF).unwrap();
        lora_forward_into(
            &t.x,
            LoraBase::Dense(&t.w),
            Some(&t.bias),
            &t.adapters,
            &t.routing,
            &mut out,
        )
        .unwrap();
        assert_close(
            "forward into poisoned out",
            &values::<bf16>(&out),
            &c.forward(&exact(&d), true),
            1e-2,
        );
    }
}

fn errors_name_the_argument(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::mixed(rng, 5, 8, 6, 3, 4);
    let d = data::<f32>(rng, &c);
    let t = tensors(&c, &d, device);
    let base = LoraBase::Dense(&t.w);
    let forward =
        |x: &Tensor, bias: Option<&Tensor>, routing: &LoraRouting| lora_forward(x, base, bias, &t.adapters, routing);
    let out_of_range = LoraRouting::per_row(&[0, 1, 3, 0, 0], device).unwrap();
    assert_invalid(
        forward(&t.x, None, &out_of_range),
        "lora",
        "routing",
        &["id 3", "count 3"],
    );
    let short = LoraRouting::per_row(&[0, 1], device).unwrap();
    assert_invalid(forward(&t.x, None, &short), "lora", "routing", &["5 rows", "2 ids"]);
    let wrong_x = Tensor::zeros(&[5, 7], DType::F32, device).unwrap();
    assert_invalid(forward(&wrong_x, None, &t.routing), "lora", "x", &["(m, 8)", "[5, 7]"]);
    let wrong_dtype = Tensor::zeros(&[5, 8], DType::BF16, device).unwrap();
    assert_invalid(forward(&wrong_dtype, None, &t.routing), "lora", "base", &["f32"]);
    let wrong_bias = Tensor::zeros(&[5], DType::F32, device).unwrap();
    assert_invalid(forward(&t.x, Some(&wrong_bias), &t.routing), "lora", "bias", &["[6]"]);
    let wide = Tensor::zeros(&[6, 9], DType::F32, device).unwrap();
    assert_invalid(
        lora_forward(&t.x, LoraBase::Dense(&wide), None, &t.adapters, &t.routing),
        "lora",
        "x",
        &["(m, 9)"],
    );
    let other = Tensor::zeros(&[7, 8], DType::F32, device).unwrap();
    assert_invalid(
        lora_forward(&t.x, LoraBase::Dense(&other), None, &t.adapters, &t.routing),
        "lora",
        "adapters",
        &["d_out=7"],
    );
    let dy = Tensor::zeros(&[5, 5], DType::F32, device).unwrap();
    assert_invalid(
        lora_backward(&dy, &t.x, base, &t.adapters, &t.routing, false),
        "lora_backward",
        "d_y",
        &["[5, 6]"],
    );
    let mut w = Tensor::zeros(&[6, 8], DType::F32, device).unwrap();
    assert_invalid(
        lora_merge(&mut w, &t.adapters, 3),
        "lora_merge",
        "adapter",
        &["below 3"],
    );
    let mut w = Tensor::zeros(&[8, 6], DType::F32, device).unwrap();
    assert_invalid(lora_unmerge(&mut w, &t.adapters, 0), "lora_unmerge", "w", &["[6, 8]"]);
    // Adapter sets.
    let a = |shape: &[usize]| Tensor::zeros(shape, DType::F32, device).unwrap();
    let new = |a: Tensor, b: Tensor, ranks: &[usize], scales: &[f32]| LoraAdapters::new(a, b, ranks, scales);
    assert_invalid(
        new(a(&[2, 4, 8]), a(&[2, 6, 4]), &[4, 5], &[1.0, 1.0]),
        "LoraAdapters::new",
        "ranks",
        &["maximum 4", "5 for adapter 1"],
    );
    assert_invalid(
        new(a(&[2, 4, 8]), a(&[2, 6, 4]), &[4, 0], &[1.0, 1.0]),
        "LoraAdapters::new",
        "ranks",
        &["0 for adapter 1"],
    );
    assert_invalid(
        new(a(&[2, 4, 8]), a(&[2, 6, 4]), &[4], &[1.0, 1.0]),
        "LoraAdapters::new",
        "ranks",
        &["2 ranks"],
    );
    assert_invalid(
        new(a(&[2, 4, 8]), a(&[2, 6, 4]), &[4, 4], &[1.0, f32::NAN]),
        "LoraAdapters::new",
        "scales",
        &["finite"],
    );
    assert_invalid(
        new(a(&[2, 4, 8]), a(&[2, 6, 3]), &[4, 4], &[1.0, 1.0]),
        "LoraAdapters::new",
        "b",
        &["(2, d_out >= 1, 4)"],
    );
    assert_invalid(
        new(a(&[1, 65, 8]), a(&[1, 6, 65]), &[65], &[1.0]),
        "LoraAdapters::new",
        "a",
        &["at most 64"],
    );
    let bf = Tensor::zeros(&[2, 6, 4], DType::BF16, device).unwrap();
    assert_invalid(
        new(a(&[2, 4, 8]), bf, &[4, 4], &[1.0, 1.0]),
        "LoraAdapters::new",
        "b",
        &["dtype f32"],
    );
    assert_invalid(LoraRouting::per_row(&[], device), "LoraRouting::per_row", "ids", &["0"]);
    // A stray id is refused before anything is sized by it.
    let stray = [0, u32::MAX - 1, 1];
    assert_invalid(
        LoraRouting::per_row(&stray, device),
        "LoraRouting::per_row",
        "ids",
        &["4294967294"],
    );
    let limit = tessera::ops::MAX_ADAPTERS as u32;
    assert_invalid(
        LoraRouting::per_row(&[limit], device),
        "LoraRouting::per_row",
        "ids",
        &[&limit.to_string()],
    );
    assert!(LoraRouting::per_row(&[limit - 1, 0], device).is_ok());
    assert_invalid(
        LoraRouting::per_sequence(&[1, 2], 0, device),
        "LoraRouting::per_sequence",
        "seq_len",
        &["2 sequences of 0"],
    );
    let by_sequence = LoraRouting::per_sequence(&[2, 0, 1], 3, device).unwrap();
    assert_eq!(by_sequence.ids(), &[2, 2, 2, 0, 0, 0, 1, 1, 1]);
}

fn errors_leave_outputs_unchanged(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::mixed(rng, 5, 8, 6, 2, 4);
    let d = data::<f32>(rng, &c);
    let t = tensors(&c, &d, device);
    let mut out = Tensor::zeros(&[5, 6], DType::F32, device).unwrap();
    out.fill_bytes(0x5A).unwrap();
    let pattern = bytes(&out);
    let out_of_range = LoraRouting::per_row(&[0, 1, 2, 0, 0], device).unwrap();
    assert_invalid(
        lora_forward_into(&t.x, LoraBase::Dense(&t.w), None, &t.adapters, &out_of_range, &mut out),
        "lora",
        "routing",
        &[],
    );
    let mut wrong_out = Tensor::zeros(&[5, 7], DType::F32, device).unwrap();
    assert_invalid(
        lora_forward_into(
            &t.x,
            LoraBase::Dense(&t.w),
            None,
            &t.adapters,
            &t.routing,
            &mut wrong_out,
        ),
        "lora",
        "out",
        &["[5, 6]"],
    );
    device.synchronize().unwrap();
    assert_eq!(bytes(&out), pattern, "out changed by a failed forward");
    let mut w = Tensor::from_slice(&d.w, &[6, 8], device).unwrap();
    let before = bytes(&w);
    assert_invalid(lora_merge(&mut w, &t.adapters, 2), "lora_merge", "adapter", &[]);
    assert_eq!(bytes(&w), before, "w changed by a failed merge");
}

/// Adapter tensors replaced through `parameters_mut` by ones of another shape are refused.
fn replaced_adapter_tensors_are_refused(device: &Device) {
    let mut rng = common::rng();
    let c = Case::single(4, 8, 6, 2, 2);
    let d = data::<f32>(&mut rng, &c);
    let mut t = tensors(&c, &d, device);
    *t.adapters.parameters_mut().0 = Tensor::zeros(&[1, 3, 8], DType::F32, device).unwrap();
    assert_invalid(
        lora_forward(&t.x, LoraBase::Dense(&t.w), None, &t.adapters, &t.routing),
        "lora",
        "adapters",
        &["[1, 3, 8]"],
    );
    *t.adapters.parameters_mut().0 = Tensor::zeros(&[8], DType::F32, device).unwrap();
    assert_invalid(lora_merge(&mut t.w, &t.adapters, 0), "lora_merge", "adapters", &["[8]"]);
}

/// One adapter over many rows through the kernels (threshold raised) and through cuBLASLt (the
/// default). The threshold is process-wide: tests running meanwhile may take either path, which
/// changes nothing in what they check.
fn one_adapter_on_either_path(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::single(150, 72, 40, 16, 16);
    for rows in [usize::MAX, DEFAULT_BLAS_ROWS] {
        set_blas_rows(rows);
        check_forward::<bf16>(device, rng, &c, &format!("threshold {rows}"));
        check_backward::<f32>(device, rng, &c, &format!("threshold {rows}"));
    }
    set_blas_rows(DEFAULT_BLAS_ROWS);
}

// ---- a 2:4 sparse base (SLoPe's sparse + low-rank) ------------------------------------------

/// False where the sparse base cannot hold `T`: the sparse tensor cores take no f32.
fn sparse_supported<T: Float>(device: &Device) -> bool {
    !(device.is_cuda() && T::DTYPE == DType::F32)
}

/// Prunes `d.w` (d_out, d_in) 2:4 along d_in: each group of 4 keeps a random pair (made non-zero
/// so that compression keeps exactly it), or with `doubly` the pair with `(o + k) % 4 < 2`, which
/// is 2:4 along d_out as well, so that the double-pruned transpose is the plain one. Returns the
/// kept columns (within the group, ascending) of group `q` of row `o` at `o·d_in/4 + q`.
fn prune_24<T: Float>(rng: &mut StdRng, c: &Case, d: &mut Data<T>, doubly: bool) -> Vec<[usize; 2]> {
    let groups = c.d_in / 4;
    let mut kept = Vec::with_capacity(c.d_out * groups);
    for o in 0..c.d_out {
        for q in 0..groups {
            let pair = if doubly {
                let mut pair: Vec<usize> = (0..4).filter(|j| (o + 4 * q + j) % 4 < 2).collect();
                pair.sort_unstable();
                [pair[0], pair[1]]
            } else {
                let first = rng.random_range(0..3usize);
                [first, rng.random_range(first + 1..4)]
            };
            for j in 0..4 {
                let w = &mut d.w[o * c.d_in + 4 * q + j];
                if !pair.contains(&j) {
                    *w = T::from_f32(0.0);
                } else if w.to_f64() == 0.0 {
                    *w = T::from_f32(0.5);
                }
            }
            kept.push(pair);
        }
    }
    kept
}

fn sparse_weight<T: Float>(c: &Case, d: &Data<T>, device: &Device) -> Sparse24 {
    sparse24_compress(&Tensor::from_slice(&d.w, &[c.d_out, c.d_in], device).unwrap()).unwrap()
}

/// `W_dp` (d_out, d_in) of the pruned `w`: in each column, every group of 4 rows keeps its 2
/// largest magnitudes (equal ones: the lower row), the spec's double pruning (§2.2).
fn double_pruned(c: &Case, w: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; w.len()];
    for k in 0..c.d_in {
        for q in 0..c.d_out / 4 {
            let rows: Vec<usize> = (4 * q..4 * q + 4).collect();
            for &o in &rows {
                let key = w[o * c.d_in + k].abs();
                let beaten_by = rows
                    .iter()
                    .filter(|&&p| {
                        let other = w[p * c.d_in + k].abs();
                        other > key || (other == key && p < o)
                    })
                    .count();
                if beaten_by < 2 {
                    out[o * c.d_in + k] = w[o * c.d_in + k];
                }
            }
        }
    }
    out
}

fn exact_with_weight(e: &Exact, w: Vec<f64>) -> Exact {
    Exact {
        x: e.x.clone(),
        w,
        bias: e.bias.clone(),
        a: e.a.clone(),
        b: e.b.clone(),
    }
}

/// The dense `dYᵀ·X` (d_out, d_in) at the kept positions, in the layout of the values.
fn masked_weight_gradient(c: &Case, kept: &[[usize; 2]], dw: &[f64]) -> Vec<f64> {
    let groups = c.d_in / 4;
    let mut out = vec![0.0; c.d_out * c.d_in / 2];
    for o in 0..c.d_out {
        for q in 0..groups {
            for (slot, &j) in kept[o * groups + q].iter().enumerate() {
                out[o * c.d_in / 2 + stored_index(q, slot)] = dw[o * c.d_in + 4 * q + j];
            }
        }
    }
    out
}

fn check_sparse_forward<T: Float>(device: &Device, rng: &mut StdRng, c: &Case, what: &str) {
    let mut d = data::<T>(rng, c);
    prune_24(rng, c, &mut d, false);
    let t = tensors(c, &d, device);
    let w = sparse_weight(c, &d, device);
    let e = exact(&d);
    for with_bias in [false, true] {
        let mut out = Tensor::zeros(&[c.m, c.d_out], T::DTYPE, device).unwrap();
        out.fill_bytes(0xFF).unwrap();
        lora_forward_into(
            &t.x,
            LoraBase::Sparse24(&w, None),
            with_bias.then_some(&t.bias),
            &t.adapters,
            &t.routing,
            &mut out,
        )
        .unwrap();
        assert_close(
            &format!("{what} sparse-base forward (bias {with_bias})"),
            &values::<T>(&out),
            &c.forward(&e, with_bias),
            T::MATMUL_TOLERANCE,
        );
    }
}

/// The backward over a sparse base against the f64 reference through `W_dp`, with the transpose
/// given (`given`) or computed by the backward.
fn check_sparse_backward<T: Float>(device: &Device, rng: &mut StdRng, c: &Case, given: bool, what: &str) {
    let mut d = data::<T>(rng, c);
    let kept = prune_24(rng, c, &mut d, false);
    let t = tensors(c, &d, device);
    let w = sparse_weight(c, &d, device);
    let w_dp_t = sparse24_double_prune(&w).unwrap();
    let base = LoraBase::Sparse24(&w, given.then_some(&w_dp_t));
    let dy: Vec<T> = uniform(rng, c.m * c.d_out);
    let dy_tensor = Tensor::from_slice(&dy, &[c.m, c.d_out], device).unwrap();
    let g = lora_backward(&dy_tensor, &t.x, base, &t.adapters, &t.routing, true).unwrap();
    let e = exact(&d);
    let dy64 = common::to_f64(&dy);
    let [dx, da, db, dw] = c.backward(&exact_with_weight(&e, double_pruned(c, &e.w)), &e.x, &dy64);
    let tolerance = T::MATMUL_TOLERANCE;
    assert_close(&format!("{what} sparse d_x"), &values::<T>(&g.d_x), &dx, tolerance);
    // The double-pruned input gradient is deliberately not the forward's exact one: tell them apart.
    let [exact_dx, _, _, _] = c.backward(&e, &e.x, &dy64);
    let apart = common::relative_error(&dx, &exact_dx).unwrap();
    assert!(apart > 0.05, "{what}: W_dp changed dX by only {apart}");
    assert_close(&format!("{what} sparse d_a"), &values::<T>(&g.d_a), &da, tolerance);
    assert_close(&format!("{what} sparse d_b"), &values::<T>(&g.d_b), &db, tolerance);
    let d_w = g.d_w.as_ref().unwrap();
    assert_eq!((d_w.shape(), d_w.dtype()), (&[c.d_out, c.d_in / 2][..], DType::F32));
    assert_close(
        &format!("{what} sparse masked d_w"),
        &values::<f32>(d_w),
        &masked_weight_gradient(c, &kept, &dw),
        tolerance,
    );
    for (name, got, want) in [("d_a", values::<T>(&g.d_a), &da), ("d_b", values::<T>(&g.d_b), &db)] {
        for (i, (&got, &want)) in got.iter().zip(want).enumerate() {
            assert!(
                want != 0.0 || got == 0.0,
                "{what}: {name}[{i}] = {got}, expected exactly 0"
            );
        }
    }
}

fn small_sparse_base_forward(device: &Device) {
    let mut rng = common::rng();
    let c = Case::mixed(&mut rng, 19, 64, 32, 3, 8);
    check_sparse_forward::<bf16>(device, &mut rng, &c, "small mixed");
    check_sparse_forward::<f16>(device, &mut rng, &Case::single(70, 128, 16, 8, 8), "small full rank");
}

fn small_sparse_base_backward(device: &Device) {
    let mut rng = common::rng();
    let c = Case::mixed(&mut rng, 19, 64, 64, 3, 8);
    check_sparse_backward::<bf16>(device, &mut rng, &c, false, "small mixed");
    check_sparse_backward::<f16>(
        device,
        &mut rng,
        &Case::single(70, 64, 64, 8, 8),
        true,
        "small full rank",
    );
}

fn sparse_base_forward_dtypes(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, d_in, d_out, rank, max_rank) in [(1, 64, 48, 8, 8), (7, 128, 16, 16, 16), (33, 192, 80, 5, 8)] {
        let c = Case::single(m, d_in, d_out, rank, max_rank);
        let what = format!("m={m} d_in={d_in} d_out={d_out} r={rank}/{max_rank}");
        if sparse_supported::<f32>(device) {
            check_sparse_forward::<f32>(device, rng, &c, &what);
        }
        check_sparse_forward::<bf16>(device, rng, &c, &what);
        check_sparse_forward::<f16>(device, rng, &c, &what);
    }
}

fn sparse_base_odd_token_counts(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for m in [1, 7, 113, 1025] {
        let single = Case::single(m, 128, 48, 16, 16);
        check_sparse_forward::<bf16>(device, rng, &single, &format!("m={m} one adapter"));
        let mixed = Case::mixed(rng, m, 128, 48, 5, 16);
        check_sparse_forward::<bf16>(device, rng, &mixed, &format!("m={m} mixed"));
        let mixed = Case::mixed(rng, m, 64, 64, 4, 16);
        check_sparse_backward::<bf16>(device, rng, &mixed, m % 2 == 1, &format!("m={m} mixed"));
    }
}

fn sparse_base_many_adapters_mixed_ranks(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, count, max_rank) in [(17, 3, 64), (64, 64, 16), (300, 9, 32)] {
        let c = Case::mixed(rng, m, 128, 64, count, max_rank);
        let what = format!("m={m} {count} adapters up to r={max_rank}");
        check_sparse_forward::<bf16>(device, rng, &c, &what);
        check_sparse_forward::<f16>(device, rng, &c, &what);
        check_sparse_backward::<bf16>(device, rng, &c, true, &what);
    }
}

/// One adapter of full rank from 64 rows on: cuBLASLt for the adapter beside the sparse GEMM.
fn sparse_base_one_adapter_full_rank(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    for (m, rank) in [(64, 8), (150, 16), (129, 64)] {
        let c = Case::single(m, 128, 64, rank, rank);
        let what = format!("m={m} r={rank}");
        check_sparse_forward::<bf16>(device, rng, &c, &what);
        check_sparse_backward::<bf16>(device, rng, &c, rank != 16, &what);
        if sparse_supported::<f32>(device) {
            check_sparse_backward::<f32>(device, rng, &c, true, &what);
        }
    }
}

/// `L = Σ G ⊙ Y` over a weight 2:4 along both dimensions (so that `W_dp = W_s` and `dX` is the
/// exact gradient): every gradient against central differences, `dW` at the kept positions. On
/// the host in f32 only: the sparse tensor cores take no f32, and bf16 rounding of `Y` would
/// swamp a difference quotient (the GPU's gradients meet the same f64 reference above).
#[test]
fn sparse_base_finite_differences() {
    let device = &Device::Cpu;
    let mut rng = common::rng();
    let rng = &mut rng;
    let mut c = Case::mixed(rng, 3, 64, 64, 2, 3);
    c.ids = vec![0, 1, 1];
    let mut d = data::<f32>(rng, &c);
    let kept = prune_24(rng, &c, &mut d, true);
    let g: Vec<f32> = uniform(rng, c.m * c.d_out);
    let g_tensor = Tensor::from_slice(&g, &[c.m, c.d_out], device).unwrap();
    let loss = |d: &Data<f32>| -> f64 {
        let t = tensors(&c, d, device);
        let w = sparse_weight(&c, d, device);
        let y = lora_forward(&t.x, LoraBase::Sparse24(&w, None), None, &t.adapters, &t.routing).unwrap();
        values::<f32>(&y).iter().zip(&g).map(|(y, g)| y * *g as f64).sum()
    };
    let t = tensors(&c, &d, device);
    let w = sparse_weight(&c, &d, device);
    let grads = lora_backward(
        &g_tensor,
        &t.x,
        LoraBase::Sparse24(&w, None),
        &t.adapters,
        &t.routing,
        true,
    )
    .unwrap();
    let step = 0.25f32;
    let numeric = |which: usize, skip: &dyn Fn(usize) -> bool| -> Vec<f64> {
        let len = field(&mut clone_data(&d), which).len();
        (0..len)
            .map(|i| {
                let (mut plus, mut minus) = (clone_data(&d), clone_data(&d));
                if skip(i) || field(&mut plus, which)[i].is_nan() {
                    return 0.0;
                }
                field(&mut plus, which)[i] += step;
                field(&mut minus, which)[i] -= step;
                (loss(&plus) - loss(&minus)) / (2.0 * step as f64)
            })
            .collect()
    };
    let keep_all = |_: usize| false;
    for (which, name, analytic) in [(0, "x", &grads.d_x), (1, "a", &grads.d_a), (2, "b", &grads.d_b)] {
        assert_close(
            &format!("sparse base finite differences d_{name}"),
            &values::<f32>(analytic),
            &numeric(which, &keep_all),
            1e-4,
        );
    }
    // W: only its kept entries move (a pruned one stays 0), the gradient in the values' layout.
    let groups = c.d_in / 4;
    let pruned = |i: usize| {
        let (o, k) = (i / c.d_in, i % c.d_in);
        !kept[o * groups + k / 4].contains(&(k % 4))
    };
    let dw = numeric(3, &pruned);
    assert_close(
        "sparse base finite differences d_w",
        &values::<f32>(grads.d_w.as_ref().unwrap()),
        &masked_weight_gradient(&c, &kept, &dw),
        1e-4,
    );
}

/// Adapters inserted with B = 0 leave a sparse layer's output exactly as the sparse linear gives it.
fn sparse_base_lazy_adapters(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::single(37, 128, 48, 4, 4);
    let mut d = data::<bf16>(rng, &c);
    prune_24(rng, &c, &mut d, false);
    let t = tensors(&c, &d, device);
    let w = sparse_weight(&c, &d, device);
    let adapters = LoraAdapters::lazy_init(2, 4, c.d_in, c.d_out, DType::BF16, device, 11).unwrap();
    let routing = LoraRouting::per_row(&(0..c.m as u32).map(|i| i % 2).collect::<Vec<_>>(), device).unwrap();
    let with = lora_forward(&t.x, LoraBase::Sparse24(&w, None), None, &adapters, &routing).unwrap();
    let without = sparse_linear_forward(&t.x, &w, None).unwrap();
    assert_eq!(
        values::<bf16>(&with),
        values::<bf16>(&without),
        "inserting lazy adapters changed the sparse layer's output"
    );
}

/// Merging into a sparse base gives a dense copy; W_s is left as it was.
fn sparse_base_merged_weight(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::mixed(rng, 21, 128, 48, 3, 16);
    let mut d = data::<bf16>(rng, &c);
    prune_24(rng, &c, &mut d, false);
    let t = tensors(&c, &d, device);
    let w = sparse_weight(&c, &d, device);
    let (values_before, meta_before) = (bytes(w.values()), bytes(w.meta()));
    let adapter = 1;
    let merged = lora_merged_weight(LoraBase::Sparse24(&w, None), &t.adapters, adapter).unwrap();
    assert_eq!((merged.shape(), merged.dtype()), (&[c.d_out, c.d_in][..], DType::BF16));
    let e = exact(&d);
    let s = c.scales[adapter] as f64;
    let expected: Vec<f64> = (0..c.d_out * c.d_in)
        .map(|i| {
            let (o, k) = (i / c.d_in, i % c.d_in);
            e.w[i]
                + s * (0..c.ranks[adapter])
                    .map(|j| c.b(&e, adapter, o, j) * c.a(&e, adapter, j, k))
                    .sum::<f64>()
        })
        .collect();
    assert_close("merged dense copy", &values::<bf16>(&merged), &expected, 4e-3);
    let routing = LoraRouting::single(c.m, adapter as u32, device).unwrap();
    let fused = lora_forward(&t.x, LoraBase::Sparse24(&w, None), None, &t.adapters, &routing).unwrap();
    let plain = matmul(&t.x, &merged, None, MatmulOptions::linear()).unwrap();
    assert_close(
        "merged linear vs fused adapter on a sparse base",
        &values::<bf16>(&plain),
        &values::<bf16>(&fused),
        2e-2,
    );
    assert_eq!(bytes(w.values()), values_before, "merging changed W_s");
    assert_eq!(bytes(w.meta()), meta_before, "merging changed W_s's metadata");
    // A dense base: the same as lora_merge on a copy, and the base unchanged.
    let dense_before = bytes(&t.w);
    let copy = lora_merged_weight(LoraBase::Dense(&t.w), &t.adapters, adapter).unwrap();
    let mut in_place = Tensor::from_slice(&d.w, &[c.d_out, c.d_in], device).unwrap();
    lora_merge(&mut in_place, &t.adapters, adapter).unwrap();
    assert_eq!(bytes(&copy), bytes(&in_place));
    assert_eq!(bytes(&t.w), dense_before);
}

fn sparse_base_errors(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let c = Case::mixed(rng, 5, 64, 48, 3, 4);
    let mut d = data::<bf16>(rng, &c);
    prune_24(rng, &c, &mut d, false);
    let t = tensors(&c, &d, device);
    let w = sparse_weight(&c, &d, device);
    let base = LoraBase::Sparse24(&w, None);
    let x_f16 = Tensor::zeros(&[5, 64], DType::F16, device).unwrap();
    assert_invalid(
        lora_forward(&x_f16, base, None, &t.adapters, &t.routing),
        "lora",
        "base",
        &["f16", "bf16"],
    );
    let wide = Tensor::zeros(&[5, 128], DType::BF16, device).unwrap();
    assert_invalid(
        lora_forward(&wide, base, None, &t.adapters, &t.routing),
        "lora",
        "x",
        &["(m, 64)", "[5, 128]"],
    );
    let a = Tensor::zeros(&[1, 4, 64], DType::BF16, device).unwrap();
    let b = Tensor::zeros(&[1, 32, 4], DType::BF16, device).unwrap();
    let narrow = LoraAdapters::new(a, b, &[4], &[1.0]).unwrap();
    let routing = LoraRouting::single(5, 0, device).unwrap();
    assert_invalid(
        lora_forward(&t.x, base, None, &narrow, &routing),
        "lora",
        "adapters",
        &["d_out=48", "d_out=32"],
    );
    let a = Tensor::zeros(&[1, 4, 64], DType::F16, device).unwrap();
    let b = Tensor::zeros(&[1, 48, 4], DType::F16, device).unwrap();
    let half_adapters = LoraAdapters::new(a, b, &[4], &[1.0]).unwrap();
    assert_invalid(
        lora_forward(&t.x, base, None, &half_adapters, &routing),
        "lora",
        "adapters",
        &["bf16"],
    );
    let bias = Tensor::zeros(&[64], DType::BF16, device).unwrap();
    assert_invalid(
        lora_forward(&t.x, base, Some(&bias), &t.adapters, &t.routing),
        "lora",
        "bias",
        &["[48]"],
    );
    // A transpose that is not W_dpᵀ's shape: W_s itself.
    let wrong = LoraBase::Sparse24(&w, Some(&w));
    assert_invalid(
        lora_forward(&t.x, wrong, None, &t.adapters, &t.routing),
        "lora",
        "base",
        &["64x48", "48x64"],
    );
    let dy = Tensor::zeros(&[5, 48], DType::BF16, device).unwrap();
    assert_invalid(
        lora_backward(&dy, &t.x, wrong, &t.adapters, &t.routing, false),
        "lora_backward",
        "base",
        &["double-pruned"],
    );
    // d_out = 48: no double-pruned transpose can be computed, one must be given.
    assert_invalid(
        lora_backward(&dy, &t.x, base, &t.adapters, &t.routing, false),
        "lora_backward",
        "base",
        &["multiple of 64", "d_out = 48"],
    );
    assert_invalid(
        lora_merged_weight(base, &t.adapters, 3),
        "lora_merged_weight",
        "adapter",
        &["below 3"],
    );
    assert_invalid(
        lora_merged_weight(base, &narrow, 0),
        "lora_merged_weight",
        "base",
        &["32x64", "48x64"],
    );
    if device.is_cuda() {
        let host = sparse_weight(&c, &d, &Device::Cpu);
        assert_invalid(
            lora_forward(&t.x, LoraBase::Sparse24(&host, None), None, &t.adapters, &t.routing),
            "lora",
            "base",
            &[],
        );
    }
    // A failed forward leaves its output as it was.
    let mut out = Tensor::zeros(&[5, 48], DType::BF16, device).unwrap();
    out.fill_bytes(0x5A).unwrap();
    let pattern = bytes(&out);
    let out_of_range = LoraRouting::per_row(&[0, 1, 3, 0, 0], device).unwrap();
    assert_invalid(
        lora_forward_into(&t.x, base, None, &t.adapters, &out_of_range, &mut out),
        "lora",
        "routing",
        &[],
    );
    assert_invalid(
        lora_forward_into(&x_f16, base, None, &t.adapters, &t.routing, &mut out),
        "lora",
        "base",
        &[],
    );
    device.synchronize().unwrap();
    assert_eq!(bytes(&out), pattern, "out changed by a failed forward");
}
