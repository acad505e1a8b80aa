//! N:M sparsity (src/ops/sparse.rs, ALGORITHMS.md §2) against f64 references computed on the host
//! from the exact input values, on every device: the spec's pruning fixture and tie rule, general
//! N:M on the CPU, mask validation naming the first bad group, the compressed format read back
//! the way the PTX ISA says `mma.sp.m16n8k32` reads it, the sparse linear forward on odd token
//! counts, SLoPe's double-pruned backward, its density, finite differences, and the argument
//! errors; the same format read the way the PTX ISA says `wgmma.mma_async.sp.m64nNk32` reads it
//! through the Hopper kernel's tiles, and that kernel forced on every class of shape it serves.

#[macro_use]
mod common;

use common::{assert_close, assert_invalid, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::sparse::{MagnitudeKey, COL_BLOCK, ROW_BLOCK};
use tessera::ops::{
    nm_check, nm_mask, nm_prune, sparse24_compress, sparse24_decompress, sparse24_double_prune,
    sparse24_prune_compress, sparse_linear_backward, sparse_linear_forward, sparse_linear_forward_into, NmPattern,
    Sparse24,
};
use tessera::ops::{set_sparse_kernel, sparse_kernel, with_sparse_kernel, SparseKernel};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_sparse_prune_compress,
    small_sparse_forward,
    small_sparse_backward,
    spec_fixture,
    prune_general_patterns,
    prune_ties_follow_the_index,
    mask_has_the_spec_polarity,
    check_names_the_first_bad_group,
    compress_round_trip,
    compress_keeps_zero_valued_picks,
    layout_is_what_mma_sp_reads,
    devices_agree_bit_for_bit,
    forward_f32,
    forward_bf16,
    forward_f16,
    forward_many_tokens,
    double_prune_matches_reference,
    double_pruned_density,
    backward_bf16,
    backward_f32,
    gradient_check,
    errors_name_the_argument,
    layout_is_what_wgmma_sp_reads,
    small_sparse_hopper,
    hopper_forward,
    hopper_accumulate,
    hopper_backward,
    sparse_kernel_choice_is_scoped,
);

// ---- references ---------------------------------------------------------------------------

/// The spec's tie rule in the test's own words: sort a group's indices by (-|w|, index) and keep
/// the first `n`; |w| compared through the same bit-pattern key as the op (NaN above infinity).
fn reference_kept<T: MagnitudeKey>(group: &[T], n: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(group[i].magnitude_key()), i));
    let mut kept = vec![false; group.len()];
    for &i in order.iter().take(n) {
        kept[i] = true;
    }
    kept
}

/// Prunes each row of a row-major (rows, cols) matrix N:M.
fn reference_prune<T: MagnitudeKey>(w: &[T], cols: usize, n: usize, m: usize) -> Vec<T> {
    let mut out = w.to_vec();
    for row in out.chunks_mut(cols) {
        for group in row.chunks_mut(m) {
            let kept = reference_kept(group, n);
            for (v, k) in group.iter_mut().zip(kept) {
                if !k {
                    *v = T::from_f32(0.0);
                }
            }
        }
    }
    out
}

fn transpose<T: Copy>(w: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len());
    for c in 0..cols {
        for r in 0..rows {
            out.push(w[r * cols + c]);
        }
    }
    out
}

/// `a (m, k) · bᵀ` with b (n, k), in f64.
fn matmul_nt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
        }
    }
    out
}

fn tensor<T: Float>(data: Vec<T>, shape: &[usize], device: &Device) -> Tensor {
    Tensor::from_vec(data, shape, device).unwrap()
}

/// A random (rows, cols) 2:4-pruned matrix (by the reference), compressed by the op, and its
/// dense f64 values.
fn random_sparse<T: Float + MagnitudeKey>(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    device: &Device,
) -> (Sparse24, Vec<f64>) {
    let w: Vec<T> = uniform(rng, rows * cols);
    let s = sparse24_prune_compress(&tensor(w.clone(), &[rows, cols], device), NmPattern::TWO_FOUR).unwrap();
    let dense = common::to_f64(&reference_prune(&w, cols, 2, 4));
    (s, dense)
}

/// True (after checking the error) when `device` is a GPU and `T` is f32: the sparse tensor cores
/// take 16-bit inputs only, so the format refuses f32 there.
fn gpu_refuses_f32<T: Float + MagnitudeKey>(rng: &mut StdRng, device: &Device) -> bool {
    if !(device.is_cuda() && T::DTYPE == DType::F32) {
        return false;
    }
    let w = tensor(uniform::<T>(rng, 16 * 64), &[16, 64], device);
    assert_invalid(
        sparse24_prune_compress(&w, NmPattern::TWO_FOUR),
        "sparse24_prune_compress",
        "w",
        &["bf16 or f16", "f32"],
    );
    true
}

/// The kept-position mask of a compressed matrix, from its metadata alone: the decompression of
/// the same metadata with every value 1.
fn kept_mask(s: &Sparse24) -> Vec<f64> {
    let ones = Tensor::from_vec(
        vec![1.0f32; s.rows() * s.cols() / 2],
        &[s.rows(), s.cols() / 2],
        &Device::Cpu,
    )
    .unwrap();
    let meta = s.meta().to_device(&Device::Cpu).unwrap();
    let probe = Sparse24::from_parts(ones, meta, s.rows(), s.cols()).unwrap();
    values::<f32>(&sparse24_decompress(&probe).unwrap())
}

/// f32 values in the layout of `s`'s values, scattered to dense through its metadata.
fn scatter_like(s: &Sparse24, stored: &Tensor) -> Vec<f64> {
    let stored = stored.to_device(&Device::Cpu).unwrap();
    let meta = s.meta().to_device(&Device::Cpu).unwrap();
    let probe = Sparse24::from_parts(stored, meta, s.rows(), s.cols()).unwrap();
    values::<f32>(&sparse24_decompress(&probe).unwrap())
}

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut out = Tensor::zeros(shape, dtype, device).unwrap();
    out.fill_bytes(0xFF).unwrap();
    out
}

// ---- pruning ------------------------------------------------------------------------------

fn small_sparse_prune_compress(device: &Device) {
    let mut rng = common::rng();
    let w: Vec<bf16> = uniform(&mut rng, 16 * 64);
    let t = tensor(w.clone(), &[16, 64], device);
    for pattern in [NmPattern::TWO_FOUR, NmPattern::ONE_TWO] {
        let s = sparse24_prune_compress(&t, pattern).unwrap();
        let dense = values::<bf16>(&sparse24_decompress(&s).unwrap());
        let expected = common::to_f64(&reference_prune(&w, 64, pattern.n(), pattern.m()));
        assert_eq!(dense, expected, "{pattern}");
        assert_eq!(values::<bf16>(&nm_prune(&t, pattern).unwrap()), expected, "{pattern}");
    }
}

fn spec_fixture(device: &Device) {
    let w = tensor(vec![0.1f32, -0.5, 0.3, 0.2, 1.0, -1.0, 0.0, 2.0], &[1, 8], device);
    let pruned = nm_prune(&w, NmPattern::TWO_FOUR).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(pruned, vec![0.0, -0.5, 0.3, 0.0, 1.0, 0.0, 0.0, 2.0]);
}

fn prune_general_patterns(device: &Device) {
    let mut rng = common::rng();
    let patterns = [(2, 4), (1, 2), (2, 8), (3, 8), (1, 4), (4, 16), (5, 7)];
    for (n, m) in patterns {
        let pattern = NmPattern::new(n, m).unwrap();
        for (rows, groups) in [(1, 1), (7, 3), (33, 17)] {
            let cols = groups * m;
            let w: Vec<f32> = uniform(&mut rng, rows * cols);
            let result = nm_prune(&tensor(w.clone(), &[rows, cols], device), pattern);
            if device.is_cuda() && !pattern.is_tensor_core() {
                assert_invalid(result, "nm_prune", "pattern", &["2:4 or 1:2"]);
                continue;
            }
            let out = result.unwrap().to_vec::<f32>().unwrap();
            assert_eq!(out, reference_prune(&w, cols, n, m), "{pattern} on {rows}x{cols}");
            for group in out.chunks(m) {
                assert_eq!(group.iter().filter(|v| **v != 0.0).count(), n, "{pattern}");
            }
        }
    }
}

fn prune_ties_follow_the_index(device: &Device) {
    let mut rng = common::rng();
    // Few distinct magnitudes of both signs: most groups have ties.
    let choices = [-2.0f32, -1.0, 1.0, 2.0, -0.0, 0.0];
    let (rows, cols) = (32, 128);
    let w: Vec<f16> = (0..rows * cols)
        .map(|_| f16::from_f32(choices[rng.random_range(0..choices.len())]))
        .collect();
    let t = tensor(w.clone(), &[rows, cols], device);
    for pattern in [NmPattern::TWO_FOUR, NmPattern::ONE_TWO] {
        let expected = reference_prune(&w, cols, pattern.n(), pattern.m());
        let bits = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let out = nm_prune(&t, pattern).unwrap().to_vec::<f16>().unwrap();
        assert_eq!(bits(&out), bits(&expected), "{pattern}");
        // The compressed form records the picks even where the pick is a zero.
        let s = sparse24_prune_compress(&t, pattern).unwrap();
        let mask = kept_mask(&s);
        for (row, group) in (0..rows).flat_map(|r| (0..cols / 4).map(move |g| (r, g))) {
            let start = row * cols + 4 * group;
            let picks: Vec<bool> = match pattern.m() {
                4 => reference_kept(&w[start..start + 4], 2),
                _ => [
                    reference_kept(&w[start..start + 2], 1),
                    reference_kept(&w[start + 2..start + 4], 1),
                ]
                .concat(),
            };
            let got: Vec<bool> = mask[start..start + 4].iter().map(|&v| v == 1.0).collect();
            assert_eq!(got, picks, "{pattern}: row {row}, group {group}");
        }
    }
}

fn mask_has_the_spec_polarity(device: &Device) {
    let mut rng = common::rng();
    let w: Vec<bf16> = uniform(&mut rng, 9 * 24);
    let t = tensor(w.clone(), &[9, 24], device);
    let pattern = NmPattern::new(2, 8).unwrap();
    let mask = nm_mask(&t, pattern).unwrap();
    assert_eq!(mask.dtype(), DType::U8);
    assert_eq!(mask.device(), *device);
    let expected: Vec<u8> = reference_prune(&w, 24, 2, 8)
        .iter()
        .map(|v| (v.to_f64() != 0.0) as u8)
        .collect();
    assert_eq!(mask.to_vec::<u8>().unwrap(), expected);
}

fn check_names_the_first_bad_group(device: &Device) {
    let mut rng = common::rng();
    let (rows, cols) = (32, 64);
    let w: Vec<bf16> = uniform(&mut rng, rows * cols);
    let mut pruned = reference_prune(&w, cols, 2, 4);
    nm_check(&tensor(pruned.clone(), &[rows, cols], device), NmPattern::TWO_FOUR).unwrap();
    sparse24_compress(&tensor(pruned.clone(), &[rows, cols], device)).unwrap();
    // Three non-zeros in row 2, columns 8..12, and a later bad group in row 5.
    for c in 8..11 {
        pruned[2 * cols + c] = bf16::from_f32(0.5);
    }
    for c in 0..4 {
        pruned[5 * cols + c] = bf16::from_f32(0.25);
    }
    let bad = tensor(pruned, &[rows, cols], device);
    assert_invalid(
        nm_check(&bad, NmPattern::TWO_FOUR),
        "nm_check",
        "w",
        &["row 2, columns 8..12", "non-zeros", "2:4"],
    );
    assert_invalid(
        sparse24_compress(&bad),
        "sparse24_compress",
        "w",
        &["row 2, columns 8..12"],
    );
    // A 2:4 matrix is not 1:2 wherever a pair keeps both.
    let ones = tensor(vec![1.0f32, 1.0, 0.0, 0.0], &[1, 4], device);
    assert_invalid(
        nm_check(&ones, NmPattern::ONE_TWO),
        "nm_check",
        "w",
        &["row 0, columns 0..2"],
    );
}

fn compress_round_trip(device: &Device) {
    let mut rng = common::rng();
    for (rows, cols) in [(16, 64), (48, 192), (128, 320)] {
        let w: Vec<bf16> = uniform(&mut rng, rows * cols);
        let mut pruned = reference_prune(&w, cols, 2, 4);
        // Groups with one and with no non-zero, as the double-pruned weight has.
        for (i, v) in pruned.iter_mut().enumerate() {
            if i % 11 == 0 || (i / 4) % 7 == 3 {
                *v = bf16::ZERO;
            }
        }
        let s = sparse24_compress(&tensor(pruned.clone(), &[rows, cols], device)).unwrap();
        assert_eq!(s.values().shape(), &[rows, cols / 2]);
        assert_eq!(s.meta().shape(), &[rows / 16 * (cols / 64) * 32]);
        assert_eq!(s.size_in_bytes() * 16, rows * cols * 2 * 9);
        let back = sparse24_decompress(&s).unwrap().to_vec::<bf16>().unwrap();
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&pruned), "{rows}x{cols}");
        // Zeros fill the lowest free positions: the mask of a zero group is its first two.
        let mask = kept_mask(&s);
        for (g, group) in pruned.chunks(4).enumerate() {
            let nonzero: Vec<bool> = group.iter().map(|v| v.to_f64() != 0.0).collect();
            let mut filled = nonzero.clone();
            let mut count = filled.iter().filter(|&&k| k).count();
            for k in filled.iter_mut() {
                if count < 2 && !*k {
                    *k = true;
                    count += 1;
                }
            }
            let got: Vec<bool> = mask[4 * g..4 * g + 4].iter().map(|&v| v == 1.0).collect();
            assert_eq!(got, filled, "group {g}");
        }
    }
}

fn compress_keeps_zero_valued_picks(device: &Device) {
    // Group 0 keeps 0.0 (index 1, beating -0.0 at 2 and 3 by index) beside 3.0; the metadata must say
    // position 1, not "lowest free".
    let mut w = vec![bf16::ZERO; 16 * 64];
    w[0] = bf16::from_f32(3.0);
    w[2] = bf16::NEG_ZERO;
    w[3] = bf16::NEG_ZERO;
    let s = sparse24_prune_compress(&tensor(w, &[16, 64], device), NmPattern::TWO_FOUR).unwrap();
    let mask = kept_mask(&s);
    assert_eq!(&mask[..4], &[1.0, 1.0, 0.0, 0.0]);
}

/// Reads the compressed format as the PTX ISA describes the operands of
/// `mma.sp.sync.aligned.m16n8k32.row.col` for 16-bit types, independently of the op's own
/// layout functions: lane `4g + t` holds, for k-step `s` of a 16x32 tile, `a0a1` = the two kept
/// values of row `g`, columns `4t..4t+4` (of the step), `a2a3` the same of row `g + 8`, `a4a5`
/// and `a6a7` those of columns `16 + 4t..`; the metadata register of lane `4g + 2s + h` (sparsity
/// selector `s`) holds in bits `4j..4j+4` the positions of the kept pair of row `g`, columns
/// `16h + 4j..`, and in bits `16 + 4j..` those of row `g + 8`.
fn layout_is_what_mma_sp_reads(device: &Device) {
    let mut rng = common::rng();
    let (rows, cols) = (32, 128);
    let w: Vec<bf16> = uniform(&mut rng, rows * cols);
    let dense = reference_prune(&w, cols, 2, 4);
    let s = sparse24_prune_compress(&tensor(w, &[rows, cols], device), NmPattern::TWO_FOUR).unwrap();
    let stored = s.values().to_vec::<bf16>().unwrap();
    let meta = s.meta().to_vec::<u32>().unwrap();
    // The kept (position, value) pairs of the group of `row` starting at column `col`.
    let pair = |row: usize, col: usize| -> [(usize, bf16); 2] {
        let group = &dense[row * cols + col..row * cols + col + 4];
        let kept: Vec<usize> = (0..4).filter(|&i| group[i].to_f64() != 0.0).collect();
        assert_eq!(kept.len(), 2, "random inputs have no zeros");
        [(kept[0], group[kept[0]]), (kept[1], group[kept[1]])]
    };
    let tiles_per_row = cols / COL_BLOCK;
    for row_tile in 0..rows / ROW_BLOCK {
        for block in 0..tiles_per_row {
            let tile = row_tile * tiles_per_row + block;
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                for step in 0..2 {
                    let col0 = block * COL_BLOCK + 32 * step;
                    // The 16-byte load of lane t from rows g and g + 8 of this block.
                    for (reg_row, row) in [(0, row_tile * 16 + g), (1, row_tile * 16 + g + 8)] {
                        let at = row * cols / 2 + block * 32 + 8 * t;
                        let load = &stored[at..at + 8];
                        for (half, words) in [
                            (0, &load[4 * step..4 * step + 2]),
                            (1, &load[4 * step + 2..4 * step + 4]),
                        ] {
                            let expected = pair(row, col0 + 16 * half + 4 * t);
                            assert_eq!(
                                [words[0].to_bits(), words[1].to_bits()],
                                [expected[0].1.to_bits(), expected[1].1.to_bits()],
                                "a{} of lane {lane}, step {step}, rows {reg_row}, tile {tile}",
                                4 * half + 2 * reg_row
                            );
                        }
                    }
                }
                let (step, h) = (t / 2, t % 2);
                let word = meta[32 * tile + lane];
                for (shift, row) in [(0, row_tile * 16 + g), (16, row_tile * 16 + g + 8)] {
                    for j in 0..4 {
                        let p = pair(row, block * COL_BLOCK + 32 * step + 16 * h + 4 * j);
                        let nibble = (word >> (shift + 4 * j)) & 0xF;
                        assert_eq!(
                            nibble as usize,
                            p[0].0 | p[1].0 << 2,
                            "metadata of lane {lane}, tile {tile}, row {row}, chunk {j}"
                        );
                    }
                }
            }
        }
    }
}

/// The spec's "CPU == GPU mask bit-for-bit": pruning, compression (values and metadata) and the
/// double prune give the same bytes on this device as on the CPU, ties included.
fn devices_agree_bit_for_bit(device: &Device) {
    let mut rng = common::rng();
    let (rows, cols) = (64, 192);
    let choices = [-2.0f32, -1.0, 1.0, 2.0, 0.0, 0.5];
    let mut w: Vec<bf16> = uniform(&mut rng, rows * cols);
    for v in w.iter_mut().step_by(3) {
        *v = bf16::from_f32(choices[(v.to_bits() as usize) % choices.len()]);
    }
    let here = tensor(w.clone(), &[rows, cols], device);
    let cpu = tensor(w, &[rows, cols], &Device::Cpu);
    for pattern in [NmPattern::TWO_FOUR, NmPattern::ONE_TWO] {
        let (a, b) = (
            sparse24_prune_compress(&here, pattern).unwrap(),
            sparse24_prune_compress(&cpu, pattern).unwrap(),
        );
        assert_eq!(common::bytes(a.values()), common::bytes(b.values()), "{pattern} values");
        assert_eq!(common::bytes(a.meta()), common::bytes(b.meta()), "{pattern} metadata");
        assert_eq!(
            common::bytes(&nm_prune(&here, pattern).unwrap()),
            common::bytes(&nm_prune(&cpu, pattern).unwrap()),
            "{pattern} pruned"
        );
        let (dp_a, dp_b) = (sparse24_double_prune(&a).unwrap(), sparse24_double_prune(&b).unwrap());
        assert_eq!(
            common::bytes(dp_a.values()),
            common::bytes(dp_b.values()),
            "{pattern} W_dp values"
        );
        assert_eq!(
            common::bytes(dp_a.meta()),
            common::bytes(dp_b.meta()),
            "{pattern} W_dp metadata"
        );
        // Moving a compressed matrix moves both parts unchanged.
        let moved = b.to_device(device).unwrap();
        assert_eq!(common::bytes(moved.meta()), common::bytes(b.meta()));
        assert_eq!(
            common::bytes(&sparse24_decompress(&moved).unwrap()),
            common::bytes(&sparse24_decompress(&b).unwrap())
        );
    }
}

// ---- forward -----------------------------------------------------------------------------

fn check_forward<T: Float + MagnitudeKey>(device: &Device, m: usize, n: usize, k: usize, with_bias: bool) {
    let mut rng = common::rng();
    if gpu_refuses_f32::<T>(&mut rng, device) {
        return;
    }
    let (s, w) = random_sparse::<T>(&mut rng, n, k, device);
    let x: Vec<T> = uniform(&mut rng, m * k);
    let b: Vec<T> = uniform(&mut rng, n);
    let xt = tensor(x.clone(), &[m, k], device);
    let bt = tensor(b.clone(), &[n], device);
    let bias = with_bias.then_some(&bt);
    let mut y = poisoned(&[m, n], T::DTYPE, device);
    sparse_linear_forward_into(&xt, &s, bias, &mut y).unwrap();
    let mut expected = matmul_nt(&common::to_f64(&x), &w, m, n, k);
    if with_bias {
        for (i, v) in expected.iter_mut().enumerate() {
            *v += b[i % n].to_f64();
        }
    }
    let what = format!("forward {} m={m} n={n} k={k} bias={with_bias}", T::DTYPE);
    assert_close(&what, &values::<T>(&y), &expected, T::MATMUL_TOLERANCE);
    // The allocating form agrees bit for bit.
    let again = sparse_linear_forward(&xt, &s, bias).unwrap();
    assert_eq!(common::bytes(&again), common::bytes(&y), "{what}");
}

fn small_sparse_forward(device: &Device) {
    check_forward::<bf16>(device, 7, 32, 128, true);
    check_forward::<bf16>(device, 113, 32, 64, false);
    check_forward::<f16>(device, 20, 16, 64, true);
    check_forward::<bf16>(device, 40, 16, 128, false);
}

fn forward_f32(device: &Device) {
    for m in [1, 7, 113] {
        check_forward::<f32>(device, m, 48, 128, m % 2 == 1);
    }
}

fn forward_bf16(device: &Device) {
    for m in [1, 7, 16, 17, 64, 65, 113, 1025] {
        check_forward::<bf16>(device, m, 64, 192, true);
    }
    check_forward::<bf16>(device, 3, 16, 64, false);
    check_forward::<bf16>(device, 40, 272, 320, false);
}

fn forward_f16(device: &Device) {
    for m in [1, 16, 113, 1025] {
        check_forward::<f16>(device, m, 80, 128, m != 16);
    }
}

fn forward_many_tokens(device: &Device) {
    // Several token and weight tiles of the many-token kernel, with partial tiles on both sides.
    let m = if device.is_cuda() { 2100 } else { 300 };
    check_forward::<bf16>(device, m, 208, 384, true);
    check_forward::<f16>(device, m, 144, 256, false);
}

// ---- SLoPe backward ------------------------------------------------------------------------

fn double_prune_matches_reference(device: &Device) {
    let mut rng = common::rng();
    let (n, k) = (128, 192);
    let (s, w) = random_sparse::<bf16>(&mut rng, n, k, device);
    let dp = sparse24_double_prune(&s).unwrap();
    assert_eq!((dp.rows(), dp.cols()), (k, n));
    let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f64(v)).collect();
    let expected = common::to_f64(&reference_prune(&transpose(&w_bf16, n, k), n, 2, 4));
    assert_eq!(values::<bf16>(&sparse24_decompress(&dp).unwrap()), expected);
    // The picks follow the magnitudes even where a group has fewer than two non-zeros.
    let mask = kept_mask(&dp);
    let wt = transpose(&w_bf16, n, k);
    for (g, group) in wt.chunks(4).enumerate() {
        let kept = reference_kept(group, 2);
        let got: Vec<bool> = mask[4 * g..4 * g + 4].iter().map(|&v| v == 1.0).collect();
        assert_eq!(got, kept, "group {g}");
    }
}

fn double_pruned_density(device: &Device) {
    let mut rng = common::rng();
    let d = 1024;
    // Gaussian weights by the Box-Muller transform.
    let w: Vec<f32> = (0..d * d)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
        })
        .map(|v| if v == 0.0 { 1e-9 } else { v })
        .collect();
    let w: Vec<bf16> = w.into_iter().map(bf16::from_f32).collect();
    let s = sparse24_prune_compress(&tensor(w, &[d, d], device), NmPattern::TWO_FOUR).unwrap();
    let forward = values::<bf16>(&sparse24_decompress(&s).unwrap());
    let forward_density = forward.iter().filter(|v| **v != 0.0).count() as f64 / (d * d) as f64;
    assert_eq!(forward_density, 0.5);
    let dp = sparse24_double_prune(&s).unwrap();
    let dense = values::<bf16>(&sparse24_decompress(&dp).unwrap());
    let density = dense.iter().filter(|v| **v != 0.0).count() as f64 / (d * d) as f64;
    eprintln!("double-pruned density {density:.5} (expected 0.40625)");
    assert!((density - 0.40625).abs() < 0.005, "double-pruned density {density}");
}

fn check_backward<T: Float + MagnitudeKey>(device: &Device, m: usize, n: usize, k: usize) {
    let mut rng = common::rng();
    if gpu_refuses_f32::<T>(&mut rng, device) {
        return;
    }
    let (s, w) = random_sparse::<T>(&mut rng, n, k, device);
    let dp = sparse24_double_prune(&s).unwrap();
    let x: Vec<T> = uniform(&mut rng, m * k);
    let dy: Vec<T> = uniform(&mut rng, m * n);
    let grads = sparse_linear_backward(
        &tensor(dy.clone(), &[m, n], device),
        &tensor(x.clone(), &[m, k], device),
        &s,
        &dp,
        true,
    )
    .unwrap();
    let (x64, dy64) = (common::to_f64(&x), common::to_f64(&dy));
    let what = |name: &str| format!("{name} {} m={m} n={n} k={k}", T::DTYPE);
    // dX through the double-pruned weight, built by the reference from the forward weight.
    let w_t: Vec<T> = transpose(&w, n, k)
        .iter()
        .map(|&v| <T as Float>::from_f32(v as f32))
        .collect();
    let w_dp_t = common::to_f64(&reference_prune(&w_t, n, 2, 4));
    let d_x_expected = matmul_nt(&dy64, &w_dp_t, m, k, n);
    let d_x = values::<T>(&grads.d_x);
    assert_close(&what("d_x"), &d_x, &d_x_expected, T::MATMUL_TOLERANCE);
    // ... which is not the exact gradient dY·W_s.
    let d_x_exact = matmul_nt(&dy64, &transpose(&w, n, k), m, k, n);
    let gap = common::relative_error(&d_x, &d_x_exact).unwrap();
    assert!(gap > 10.0 * T::MATMUL_TOLERANCE, "d_x equals dY·W_s ({gap:.2e})");
    // dW = dYᵀX at the kept positions only.
    let g = matmul_nt(&transpose(&dy64, m, n), &transpose(&x64, m, k), n, k, m);
    let mask = kept_mask(&s);
    let d_w_expected: Vec<f64> = g.iter().zip(&mask).map(|(g, k)| g * k).collect();
    assert_eq!(grads.d_values.dtype(), DType::F32);
    assert_eq!(grads.d_values.shape(), &[n, k / 2]);
    let d_w = scatter_like(&s, &grads.d_values);
    assert_close(
        &what("d_w"),
        &d_w,
        &d_w_expected,
        1e-5f64.max(T::MATMUL_TOLERANCE / 4.0),
    );
    let d_bias = grads.d_bias.expect("asked for the bias gradient");
    let d_bias_expected: Vec<f64> = (0..n).map(|j| (0..m).map(|i| dy64[i * n + j]).sum()).collect();
    assert_close(&what("d_bias"), &values::<f32>(&d_bias), &d_bias_expected, 1e-5);
}

fn small_sparse_backward(device: &Device) {
    check_backward::<bf16>(device, 9, 64, 64);
}

fn backward_bf16(device: &Device) {
    for m in [1, 7, 113, 1025] {
        check_backward::<bf16>(device, m, 64, 128);
    }
    check_backward::<f16>(device, 33, 128, 64);
}

fn backward_f32(device: &Device) {
    check_backward::<f32>(device, 17, 64, 128);
}

/// Central finite differences in f64 of `L = Σ R ⊙ (X·W_sᵀ + b)` with respect to every kept
/// weight and every bias, against the op's `d_values` and `d_bias` (f32 inputs, f32 results).
fn gradient_check(device: &Device) {
    if device.is_cuda() {
        // The GPU takes 16-bit inputs only, whose rounding hides 1e-6; backward_bf16 covers it.
        return;
    }
    let mut rng = common::rng();
    let (m, n, k) = (3, 64, 64);
    let (s, w) = random_sparse::<f32>(&mut rng, n, k, device);
    let dp = sparse24_double_prune(&s).unwrap();
    let x: Vec<f32> = uniform(&mut rng, m * k);
    let b: Vec<f64> = common::to_f64(&uniform::<f32>(&mut rng, n));
    let r: Vec<f32> = uniform(&mut rng, m * n);
    let (x64, r64) = (common::to_f64(&x), common::to_f64(&r));
    let loss = |w: &[f64], b: &[f64]| -> f64 {
        let y = matmul_nt(&x64, w, m, n, k);
        y.iter().enumerate().map(|(i, y)| (y + b[i % n]) * r64[i]).sum()
    };
    let grads = sparse_linear_backward(
        &tensor(r.clone(), &[m, n], device),
        &tensor(x, &[m, k], device),
        &s,
        &dp,
        true,
    )
    .unwrap();
    let d_w = scatter_like(&s, &grads.d_values);
    let mask = kept_mask(&s);
    let step = 1e-6;
    let mut fd = vec![0.0; n * k];
    for i in 0..n * k {
        if mask[i] == 0.0 {
            continue;
        }
        let (mut plus, mut minus) = (w.clone(), w.clone());
        plus[i] += step;
        minus[i] -= step;
        fd[i] = (loss(&plus, &b) - loss(&minus, &b)) / (2.0 * step);
    }
    assert_close("d_w by finite differences", &d_w, &fd, 1e-6);
    let mut fd_b = vec![0.0; n];
    for (j, fd) in fd_b.iter_mut().enumerate() {
        let (mut plus, mut minus) = (b.clone(), b.clone());
        plus[j] += step;
        minus[j] -= step;
        *fd = (loss(&w, &plus) - loss(&w, &minus)) / (2.0 * step);
    }
    let d_bias = values::<f32>(grads.d_bias.as_ref().unwrap());
    assert_close("d_bias by finite differences", &d_bias, &fd_b, 1e-6);
}

// ---- errors -------------------------------------------------------------------------------

fn errors_name_the_argument(device: &Device) {
    let mut rng = common::rng();
    let rng = &mut rng;
    let bf = |rng: &mut StdRng, shape: &[usize]| -> Tensor {
        tensor(uniform::<bf16>(rng, shape.iter().product()), shape, device)
    };
    // Group size and alignment.
    assert_invalid(
        nm_prune(&bf(rng, &[4, 6]), NmPattern::TWO_FOUR),
        "nm_prune",
        "w",
        &["multiple of the group size 4", "[4, 6]"],
    );
    assert_invalid(NmPattern::new(3, 2), "NmPattern::new", "n", &["between 1 and m = 2"]);
    assert_invalid(NmPattern::new(1, 0), "NmPattern::new", "m", &["group size"]);
    assert_invalid(
        sparse24_prune_compress(&bf(rng, &[8, 64]), NmPattern::TWO_FOUR),
        "sparse24_prune_compress",
        "w",
        &["multiple of 16", "8 rows"],
    );
    assert_invalid(
        sparse24_prune_compress(&bf(rng, &[16, 96]), NmPattern::TWO_FOUR),
        "sparse24_prune_compress",
        "w",
        &["multiple of 64", "96 columns"],
    );
    assert_invalid(
        sparse24_prune_compress(&bf(rng, &[16, 64]), NmPattern::new(2, 8).unwrap()),
        "sparse24_prune_compress",
        "pattern",
        &["2:4 or 1:2", "2:8"],
    );
    let words = Tensor::from_vec(vec![1u32; 16 * 64], &[16, 64], device).unwrap();
    assert_invalid(
        sparse24_prune_compress(&words, NmPattern::TWO_FOUR),
        "sparse24_prune_compress",
        "w",
        &["u32"],
    );
    // The double prune needs the output dimension in blocks of 64 too.
    let narrow = sparse24_prune_compress(&bf(rng, &[16, 64]), NmPattern::TWO_FOUR).unwrap();
    assert_invalid(
        sparse24_double_prune(&narrow),
        "sparse24_double_prune",
        "s",
        &["16 columns"],
    );

    // The linear layer: shapes, dtypes.
    let (n, k) = (64, 128);
    let s = sparse24_prune_compress(&bf(rng, &[n, k]), NmPattern::TWO_FOUR).unwrap();
    let dp = sparse24_double_prune(&s).unwrap();
    let fwd = "sparse_linear_forward";
    assert_invalid(
        sparse_linear_forward(&bf(rng, &[5, 64]), &s, None),
        fwd,
        "x",
        &["128", "[5, 64]"],
    );
    assert_invalid(
        sparse_linear_forward(&bf(rng, &[5, 2, 128]), &s, None),
        fwd,
        "x",
        &["2-d"],
    );
    let f16_x = tensor(uniform::<f16>(rng, 5 * k), &[5, k], device);
    assert_invalid(sparse_linear_forward(&f16_x, &s, None), fwd, "x", &["bf16", "f16"]);
    assert_invalid(
        sparse_linear_forward(&bf(rng, &[5, k]), &s, Some(&bf(rng, &[n + 1]))),
        fwd,
        "bias",
        &["[64]", "[65]"],
    );
    let no_tokens = Tensor::zeros(&[0, k], DType::BF16, device).unwrap();
    assert_invalid(sparse_linear_forward(&no_tokens, &s, None), fwd, "x", &["[0, 128]"]);
    let mut y = Tensor::zeros(&[5, n + 16], DType::BF16, device).unwrap();
    let before = common::bytes(&y);
    assert_invalid(
        sparse_linear_forward_into(&bf(rng, &[5, k]), &s, None, &mut y),
        fwd,
        "y",
        &["[5, 64]", "[5, 80]"],
    );
    assert_eq!(common::bytes(&y), before, "an error leaves y unchanged");
    let bwd = "sparse_linear_backward";
    assert_invalid(
        sparse_linear_backward(&bf(rng, &[5, n]), &bf(rng, &[6, k]), &s, &dp, false),
        bwd,
        "x",
        &["5 tokens", "[6, 128]"],
    );
    assert_invalid(
        sparse_linear_backward(&bf(rng, &[5, n]), &bf(rng, &[5, k]), &s, &s, false),
        bwd,
        "w_dp_t",
        &["128x64", "64x128"],
    );
    assert_invalid(
        sparse_linear_backward(&bf(rng, &[5, n + 1]), &bf(rng, &[5, k]), &s, &dp, false),
        bwd,
        "dy",
        &["[5, 65]"],
    );
    // Metadata that names a position twice is refused.
    let mut meta = s.meta().to_vec::<u32>().unwrap();
    meta[3] = (meta[3] & !0xF0) | 0x50;
    let meta = Tensor::from_vec(meta, &[s.meta().numel()], &Device::Cpu).unwrap();
    let values = s.values().to_device(&Device::Cpu).unwrap();
    assert_invalid(
        Sparse24::from_parts(values, meta, n, k),
        "Sparse24::from_parts",
        "meta",
        &["idx0 < idx1"],
    );
}

// ---- the Hopper (sm_90a) GEMM ------------------------------------------------------------------

/// The warpgroup form of the sparse tensor cores, written from the PTX ISA's section on
/// `wgmma.mma_async.sp.m64nNk32` with .f16/.bf16 (its text, and its fragment figures as CUTLASS's
/// `ALayout_64x32` and `ELayout_64x32` spell them out; the metadata figure is the one of
/// `mma.sp.m16n8k32`), checked against the bytes the Hopper kernel takes from its TMA tiles.
/// The ISA: warp `w` of the
/// warpgroup supplies the metadata (and, from registers, the A fragment) of rows `16w..16w+16`
/// of the 64-row A; register `i` of lane `4g + c` holds the two kept values of row
/// `16w + g + 8·(i % 2)`, columns `4c + 16·(i / 2)..+4` of the k32 step, lower column in the
/// low half; with sparsity selector `sel`, lanes `4g + 2·sel + h` supply the metadata, bits
/// `4j..4j+4` the 2-bit positions (first kept in the low pair) of row `16w + g`, columns
/// `16h + 4j..+4`, bits `16 + 4j..` those of row `16w + g + 8`. The kernel: a CTA of 256 rows,
/// k-blocks of 64 columns with k-step `s` on selector `s`; TMA's values box (32 stored values x
/// 256 rows) puts row `r` at `r · 64` bytes, its metadata box (32 words x 16 row tiles) tile `i`
/// at `32 · i` words; the lane of warp `w` in slice `sl` of consumer `cw` loads 16 bytes at row
/// `128·cw + 64·sl + 16·w + g` (+ 8), byte `16c`, words `2s` and `2s + 1` of each being registers
/// `0, 2` (row g) and `1, 3` (row g + 8) of step `s`, and the metadata word `32 · (8·cw + 4·sl + w)
/// + lane`.
fn layout_is_what_wgmma_sp_reads(device: &Device) {
    let mut rng = common::rng();
    // Two CTAs of rows (the second partial) and two k-blocks.
    let (rows, cols) = (272, 128);
    let w: Vec<f16> = uniform(&mut rng, rows * cols);
    let dense = reference_prune(&w, cols, 2, 4);
    let s = sparse24_prune_compress(&tensor(w, &[rows, cols], device), NmPattern::TWO_FOUR).unwrap();
    let stored: Vec<u16> = s
        .values()
        .to_vec::<f16>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let meta = s.meta().to_vec::<u32>().unwrap();
    let blocks = cols / COL_BLOCK;
    // The kept (position, bits) pairs of the group of `row` starting at column `col`.
    let pair = |row: usize, col: usize| -> [(u32, u16); 2] {
        let group = &dense[row * cols + col..row * cols + col + 4];
        let kept: Vec<usize> = (0..4).filter(|&i| group[i].to_f64() != 0.0).collect();
        assert_eq!(kept.len(), 2, "random inputs have no zeros");
        [
            (kept[0] as u32, group[kept[0]].to_bits()),
            (kept[1] as u32, group[kept[1]].to_bits()),
        ]
    };
    let mut checked_registers = 0;
    for cta in 0..rows.div_ceil(256) {
        let row0 = 256 * cta;
        for block in 0..blocks {
            // TMA's tiles of this k-block: rows past `rows` are zero fill.
            let value_tile = |r: usize, unit: usize| -> u32 {
                let row = row0 + r;
                if row >= rows {
                    return 0;
                }
                let at = row * cols / 2 + block * 32 + 2 * unit;
                stored[at] as u32 | (stored[at + 1] as u32) << 16
            };
            let meta_tile = |word: usize| -> Option<u32> {
                let tile = row0 / 16 + word / 32;
                (tile < rows / 16).then(|| meta[(tile * blocks + block) * 32 + word % 32])
            };
            for cw in 0..2 {
                for sl in 0..2 {
                    for warp in 0..4 {
                        let slice_row = 128 * cw + 64 * sl + 16 * warp;
                        if row0 + slice_row >= rows {
                            continue;
                        }
                        for lane in 0..32 {
                            let (g, c) = (lane / 4, lane % 4);
                            for step in 0..2 {
                                // The kernel's registers: 4-byte units of the 16-byte loads.
                                let lo = |word: usize| value_tile(slice_row + g, 4 * c + word);
                                let hi = |word: usize| value_tile(slice_row + g + 8, 4 * c + word);
                                let registers = [lo(2 * step), hi(2 * step), lo(2 * step + 1), hi(2 * step + 1)];
                                for (i, register) in registers.into_iter().enumerate() {
                                    let row = row0 + slice_row + g + 8 * (i % 2);
                                    let col = block * COL_BLOCK + 32 * step + 4 * c + 16 * (i / 2);
                                    let [first, second] = pair(row, col);
                                    assert_eq!(
                                        register,
                                        first.1 as u32 | (second.1 as u32) << 16,
                                        "a register {i} of warp {warp} lane {lane}, step {step}, row {row}, column {col}"
                                    );
                                    checked_registers += 1;
                                }
                            }
                            let word = meta_tile(slice_row / 16 * 32 + lane).expect("a live row tile");
                            // Lane 4g + 2·sel + h supplies selector sel = step.
                            let (step, h) = (c / 2, c % 2);
                            for (shift, r) in [(0, g), (16, g + 8)] {
                                let row = row0 + slice_row + r;
                                for j in 0..4 {
                                    let [first, second] = pair(row, block * COL_BLOCK + 32 * step + 16 * h + 4 * j);
                                    let nibble = (word >> (shift + 4 * j)) & 0xF;
                                    assert_eq!(
                                        nibble,
                                        first.0 | second.0 << 2,
                                        "metadata of warp {warp} lane {lane}, row {row}, chunk {j}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Every live warp (one per 16 rows), its 32 lanes, 2 k-steps of each block, 4 registers.
    assert_eq!(checked_registers, rows / 16 * 32 * blocks * 2 * 4);
}

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

/// The forward with the Hopper kernel forced: `check_forward` into a NaN-poisoned `y`, element by
/// element against the f64 reference on the pruned weight.
fn check_hopper<T: Float + MagnitudeKey>(device: &Device, m: usize, n: usize, k: usize, with_bias: bool) {
    with_sparse_kernel(SparseKernel::Hopper, || {
        assert_eq!(sparse_kernel(), SparseKernel::Hopper);
        check_forward::<T>(device, m, n, k, with_bias);
    });
}

/// Where the Hopper kernel does not run: on the CPU the choice changes nothing (the CPU path,
/// checked against the reference); on another GPU it serves the few-token calls as before and
/// refuses the others with an `Unsupported` error that names the image.
fn hopper_elsewhere(device: &Device) {
    check_hopper::<bf16>(device, 7, 32, 128, true);
    if device.is_cuda() {
        let mut rng = common::rng();
        let (s, _) = random_sparse::<bf16>(&mut rng, 32, 64, device);
        let x = tensor(uniform::<bf16>(&mut rng, 65 * 64), &[65, 64], device);
        match with_sparse_kernel(SparseKernel::Hopper, || sparse_linear_forward(&x, &s, None)) {
            Err(tessera::Error::Unsupported { reason, .. }) => assert!(reason.contains("sm_90a"), "{reason}"),
            other => panic!("forcing the Hopper kernel off Hopper: expected Unsupported, got {other:?}"),
        }
    } else {
        check_hopper::<f16>(device, 113, 272, 320, false);
        // The accumulating form is for GPU tensors only.
        let mut rng = common::rng();
        let (s, _) = random_sparse::<bf16>(&mut rng, 16, 64, device);
        let x = tensor(uniform::<bf16>(&mut rng, 3 * 64), &[3, 64], device);
        let mut y = tensor(uniform::<bf16>(&mut rng, 3 * 16), &[3, 16], device);
        assert_invalid(
            tessera::ops::sparse::sparse_linear_accumulate_into(&x, &s, None, &mut y),
            "sparse_linear_accumulate",
            "x",
            &["GPU", "host"],
        );
    }
}

/// A small grid for compute-sanitizer: the fewest tokens the kernel serves (65) and a partial
/// token tile, a partial row CTA with row tiles past n in both slices, one k-block and several,
/// both dtypes, bias and none, and the accumulating epilogue.
fn small_sparse_hopper(device: &Device) {
    if !is_hopper(device) {
        return hopper_elsewhere(device);
    }
    check_hopper::<bf16>(device, 65, 272, 128, true);
    check_hopper::<f16>(device, 130, 16, 64, false);
    check_accumulate::<bf16>(device, 65, 48, 192);
}

/// Token counts from one past the few-token threshold to several full token tiles (and those at
/// or below it, which stay on the few-token kernel), weights whose rows and columns are not
/// multiples of the CTA's 256 rows or of the pipeline's 4 stages of 64 columns.
fn hopper_forward(device: &Device) {
    if !is_hopper(device) {
        return hopper_elsewhere(device);
    }
    let shapes = [(272, 320), (256, 64), (16, 576), (528, 1088)];
    for m in [1, 7, 113, 1025, 4096] {
        for (i, &(n, k)) in shapes.iter().enumerate() {
            if m == 4096 && n * k > 272 * 320 {
                continue;
            }
            check_hopper::<bf16>(device, m, n, k, i % 2 == 0);
            check_hopper::<f16>(device, m, n, k, i % 2 == 1);
        }
    }
}

/// `y += x·W_sᵀ + bias` with the Hopper kernel forced: y holds random values first, and the
/// result is their sum with the product, checked element by element.
fn check_accumulate<T: Float + MagnitudeKey>(device: &Device, m: usize, n: usize, k: usize) {
    let mut rng = common::rng();
    let (s, w) = random_sparse::<T>(&mut rng, n, k, device);
    let x: Vec<T> = uniform(&mut rng, m * k);
    let b: Vec<T> = uniform(&mut rng, n);
    let y0: Vec<T> = uniform(&mut rng, m * n);
    let (xt, bt) = (tensor(x.clone(), &[m, k], device), tensor(b.clone(), &[n], device));
    let mut y = tensor(y0.clone(), &[m, n], device);
    with_sparse_kernel(SparseKernel::Hopper, || {
        tessera::ops::sparse::sparse_linear_accumulate_into(&xt, &s, Some(&bt), &mut y)
    })
    .unwrap();
    let mut expected = matmul_nt(&common::to_f64(&x), &w, m, n, k);
    for (i, v) in expected.iter_mut().enumerate() {
        *v += b[i % n].to_f64() + y0[i].to_f64();
    }
    let what = format!("accumulate {} m={m} n={n} k={k}", T::DTYPE);
    assert_close(&what, &values::<T>(&y), &expected, T::MATMUL_TOLERANCE);
}

fn hopper_accumulate(device: &Device) {
    if !is_hopper(device) {
        return hopper_elsewhere(device);
    }
    for (m, n, k) in [(113, 272, 320), (1025, 64, 128), (300, 528, 64)] {
        check_accumulate::<bf16>(device, m, n, k);
        check_accumulate::<f16>(device, m, n, k);
    }
}

/// SLoPe's backward with the Hopper kernel forced: dX = dY·W_dp runs on it (m > 64).
fn hopper_backward(device: &Device) {
    if !is_hopper(device) {
        return hopper_elsewhere(device);
    }
    with_sparse_kernel(SparseKernel::Hopper, || {
        check_backward::<bf16>(device, 1025, 64, 128);
        check_backward::<f16>(device, 300, 272, 192);
    });
}

/// The choice is per thread inside `with_sparse_kernel`, restored after it (also after a panic),
/// and process-wide outside it.
fn sparse_kernel_choice_is_scoped(_device: &Device) {
    let before = sparse_kernel();
    let inner = with_sparse_kernel(SparseKernel::MmaSp, || {
        let nested = with_sparse_kernel(SparseKernel::Hopper, sparse_kernel);
        (nested, sparse_kernel())
    });
    assert_eq!(inner, (SparseKernel::Hopper, SparseKernel::MmaSp));
    assert_eq!(sparse_kernel(), before);
    let unwound = std::panic::catch_unwind(|| with_sparse_kernel(SparseKernel::Hopper, || panic!("inside")));
    assert!(unwound.is_err());
    assert_eq!(sparse_kernel(), before);
    // Another thread sees the process-wide choice, not this thread's scoped one.
    with_sparse_kernel(SparseKernel::Hopper, || {
        let other = std::thread::spawn(sparse_kernel).join().unwrap();
        assert_eq!(other, before);
    });
    // The default is Auto; setting it process-wide keeps the scoped choice in force inside.
    assert_eq!(SparseKernel::default(), SparseKernel::Auto);
    set_sparse_kernel(SparseKernel::Auto);
    with_sparse_kernel(SparseKernel::MmaSp, || assert_eq!(sparse_kernel(), SparseKernel::MmaSp));
}
