//! N:M structured sparsity (ALGORITHMS.md §2, SLoPe): magnitude pruning along the input
//! dimension, the 2:4 compressed format that the sparse tensor cores read, and the sparse linear
//! layer with SLoPe's double-pruned backward.
//!
//! Pruning keeps, in every group of `M` consecutive elements of a row, the `N` of largest
//! magnitude; equal magnitudes go to the lower index (the spec's tie rule). Magnitudes are
//! compared as the integer bit patterns of `|w|`, which orders every finite value as the floats
//! do and puts NaN above infinity, so that exactly `N` are kept in every group and the CPU and the
//! GPU agree bit for bit.
//!
//! # The compressed format ([`Sparse24`])
//! A `(rows, cols)` matrix with at most 2 non-zeros in each group of 4 columns, `rows` a multiple
//! of 16 and `cols` a multiple of 64, is stored as
//! * `values`: `(rows, cols/2)` of the matrix's dtype, the two kept values of each group, lower
//!   column first, in *tensor-core order*: the 32 kept values of each 64-column block of a row
//!   (compressed columns `c = 0..32`, group `c/2`) sit at `8·t + 4·s + 2·h + e` where
//!   `s = c/16`, `h = c%16/8`, `t = c%8/2`, `e = c%2`. Lane `4g + t` of a warp then finds, with
//!   one 16-byte load from row `g` (and one from row `g + 8`), its A registers of
//!   `mma.sp.m16n8k32` for both 32-column steps of the block: words 0 and 1 are `a0a1` and `a4a5`
//!   of step 0, words 2 and 3 those of step 1.
//! * `meta`: u32, 32 words per 16-row, 64-column tile, tiles row-major (tile number
//!   `(row/16)·(cols/64) + col/64`): word `32·tile + 4g + 2s + h` is the metadata register of
//!   lane `4g + 2s + h` for step `s` (sparsity selector `s`), covering columns `32s + 16h ..+16`
//!   of rows `g` (bits 0..16) and `g + 8` (bits 16..32); each group of 4 columns `j` has the
//!   nibble at bit `4j`, `idx0 | idx1 << 2`, the positions of its two kept values with
//!   `idx0 < idx1`. A group with fewer than two non-zeros stores zeros at its lowest free
//!   positions.
//!
//! 1:2 sparsity is stored in the same format: each pair keeps one, so every group of 4 keeps
//! one of its first two and one of its last two.
//!
//! # The sparse linear layer
//! Forward `Y = X·W_sᵀ + b` with `W_s` compressed along the input dimension. Backward as SLoPe
//! does it: `dX = dY·W_dp` through the double-pruned weight, stored as `W_dpᵀ` (the transpose of
//! `W_s` pruned 2:4 along its rows, [`sparse24_double_prune`]); `dW = M_f ⊙ (dYᵀ·X)` only at the
//! kept positions, in the layout of `values` (f32); `db = Σ_n dY[n,:]` (f32).
//!
//! # The GPU kernels
//! Up to 64 tokens the product runs on a memory-bound `mma.sp` kernel that reads the compressed
//! weight once. Above that, [`SparseKernel`] chooses between the `mma.sp` GEMM (sm_80+) and the
//! sm_90a GEMM on `wgmma.mma_async.sp` (kernels/sparse_nm_hopper.cu). Both read this format as it
//! is: per warp, `wgmma.mma_async.sp.m64nNk32` takes its A registers and its metadata register
//! exactly as `mma.sp.m16n8k32` does (the PTX ISA's sparse wgmma fragments: warp `w` of the
//! warpgroup supplies rows `16w..16w+16`), so one 16-byte load per row gives a lane both k-steps
//! of a 64-column block there too.

use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Rows of the compressed format come in blocks of this many (one `mma.sp` tile).
pub const ROW_BLOCK: usize = 16;
/// Columns of the compressed format come in blocks of this many (two `mma.sp` k-steps).
pub const COL_BLOCK: usize = 64;
/// Metadata words per 16-row, 64-column tile: one per lane.
const META_WORDS_PER_TILE: usize = 32;

/// Keep `n` of every `m` consecutive elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmPattern {
    n: usize,
    m: usize,
}

/// The largest group size of general N:M pruning.
pub const MAX_GROUP: usize = 64;

impl NmPattern {
    /// 2:4, the pattern of the sparse tensor cores.
    pub const TWO_FOUR: NmPattern = NmPattern { n: 2, m: 4 };
    /// 1:2, stored in the 2:4 format.
    pub const ONE_TWO: NmPattern = NmPattern { n: 1, m: 2 };

    /// `n` of every `m`, with `1 <= n <= m <= MAX_GROUP`.
    pub fn new(n: usize, m: usize) -> Result<NmPattern> {
        if m == 0 || m > MAX_GROUP {
            return Err(Error::invalid(
                "NmPattern::new",
                "m",
                format!("a group size between 1 and {MAX_GROUP}"),
                m,
            ));
        }
        if n == 0 || n > m {
            return Err(Error::invalid(
                "NmPattern::new",
                "n",
                format!("between 1 and m = {m}"),
                n,
            ));
        }
        Ok(NmPattern { n, m })
    }

    pub fn n(self) -> usize {
        self.n
    }

    pub fn m(self) -> usize {
        self.m
    }

    /// True for the patterns that the compressed format and the GPU kernels hold: 2:4 and 1:2.
    pub fn is_tensor_core(self) -> bool {
        self == NmPattern::TWO_FOUR || self == NmPattern::ONE_TWO
    }
}

impl std::fmt::Display for NmPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.n, self.m)
    }
}

/// A 2:4-sparse matrix in the compressed format of the module documentation.
pub struct Sparse24 {
    values: Tensor,
    meta: Tensor,
    rows: usize,
    cols: usize,
}

impl Sparse24 {
    /// The kept values, `(rows, cols/2)`, in tensor-core order.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// The metadata, u32 `(rows/16 · cols/64 · 32)`.
    pub fn meta(&self) -> &Tensor {
        &self.meta
    }

    /// Rows of the dense matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the dense matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> DType {
        self.values.dtype()
    }

    pub fn device(&self) -> Device {
        self.values.device()
    }

    /// Bytes of values and metadata: 9/16 of the dense matrix's for 16-bit values.
    pub fn size_in_bytes(&self) -> usize {
        self.values.size_in_bytes() + self.meta.size_in_bytes()
    }

    /// A copy on `device` (a plain copy when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Sparse24> {
        check_gpu_dtype("Sparse24::to_device", "self", self.dtype(), device)?;
        Ok(Sparse24 {
            values: self.values.to_device(device)?,
            meta: self.meta.to_device(device)?,
            rows: self.rows,
            cols: self.cols,
        })
    }

    /// A matrix from parts that the crate built itself in the right shapes and layout (no host
    /// check of the metadata).
    pub(crate) fn from_trusted_parts(values: Tensor, meta: Tensor, rows: usize, cols: usize) -> Sparse24 {
        Sparse24 {
            values,
            meta,
            rows,
            cols,
        }
    }

    /// Reassembles a matrix from parts (as read from a checkpoint), checking their shapes, dtypes
    /// and devices, and that every metadata nibble names two positions `idx0 < idx1`.
    pub fn from_parts(values: Tensor, meta: Tensor, rows: usize, cols: usize) -> Result<Sparse24> {
        const OP: &str = "Sparse24::from_parts";
        check_format_dims(OP, "rows", rows, cols)?;
        values.expect_dtype(OP, "values", &[DType::F32, DType::BF16, DType::F16])?;
        values.expect_shape(OP, "values", &[rows, cols / 2])?;
        meta.expect_dtype(OP, "meta", &[DType::U32])?;
        meta.expect_shape(OP, "meta", &[meta_len(rows, cols)])?;
        values.device().expect_same(&meta.device(), OP, "meta")?;
        check_gpu_dtype(OP, "values", values.dtype(), &values.device())?;
        let words = meta.to_vec::<u32>()?;
        for row in 0..rows {
            for group in 0..cols / 4 {
                let (word, shift) = meta_location(row, group, cols);
                let nibble = (words[word] >> shift) & 0xF;
                if nibble & 3 >= nibble >> 2 {
                    return Err(Error::invalid(
                        OP,
                        "meta",
                        "every nibble idx0 | idx1 << 2 with idx0 < idx1",
                        format!("{nibble:#06b} for row {row}, columns {}..{}", 4 * group, 4 * group + 4),
                    ));
                }
            }
        }
        Ok(Sparse24 {
            values,
            meta,
            rows,
            cols,
        })
    }
}

impl std::fmt::Debug for Sparse24 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sparse24({}x{}, {}, {})",
            self.rows,
            self.cols,
            self.dtype(),
            self.device()
        )
    }
}

/// Metadata words of a `(rows, cols)` matrix.
fn meta_len(rows: usize, cols: usize) -> usize {
    rows / ROW_BLOCK * (cols / COL_BLOCK) * META_WORDS_PER_TILE
}

/// Where kept value `slot` (0 = lower column) of group `group` of a row sits among the row's
/// `cols/2` stored values.
pub fn stored_index(group: usize, slot: usize) -> usize {
    let c = 2 * group + slot;
    let (block, u) = (c / 32, c % 32);
    let (step, half, lane, e) = (u / 16, u % 16 / 8, u % 8 / 2, u % 2);
    block * 32 + lane * 8 + step * 4 + half * 2 + e
}

/// The metadata word and bit shift of the nibble of group `group` (columns `4·group..+4`) of
/// `row` in a matrix of `cols` columns.
pub fn meta_location(row: usize, group: usize, cols: usize) -> (usize, u32) {
    let col = 4 * group;
    let (block, within) = (col / COL_BLOCK, col % COL_BLOCK);
    let (step, half, j) = (within / 32, within % 32 / 16, within % 16 / 4);
    let lane = 4 * (row % 8) + 2 * step + half;
    let tile = row / ROW_BLOCK * (cols / COL_BLOCK) + block;
    let shift = if row % ROW_BLOCK >= 8 { 16 } else { 0 } + 4 * j as u32;
    (tile * META_WORDS_PER_TILE + lane, shift)
}

/// SplitMix64: the seeded generator behind the random masks and supports of this family (small,
/// fast, and the same sequence on every machine).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in 0..n (n > 0), by the multiply-shift map (bias below 2^-32 for n < 2^32).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A value uniform in [low, high).
    pub(crate) fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// The magnitude key of the tie rule: `|w|`'s bit pattern (larger key = larger magnitude).
pub trait MagnitudeKey: Float {
    fn magnitude_key(self) -> u32;
}

impl MagnitudeKey for f32 {
    fn magnitude_key(self) -> u32 {
        self.to_bits() & 0x7FFF_FFFF
    }
}

impl MagnitudeKey for half::bf16 {
    fn magnitude_key(self) -> u32 {
        (self.to_bits() & 0x7FFF) as u32
    }
}

impl MagnitudeKey for half::f16 {
    fn magnitude_key(self) -> u32 {
        (self.to_bits() & 0x7FFF) as u32
    }
}

/// Which of a group's elements N:M pruning keeps: element `i` is kept when fewer than `n`
/// elements beat it, `j` beating `i` when its key is larger, or equal with `j < i`.
fn kept_in_group(keys: &[u32], n: usize) -> u64 {
    let mut kept = 0u64;
    for (i, &key) in keys.iter().enumerate() {
        let beaten_by = keys
            .iter()
            .enumerate()
            .filter(|&(j, &other)| other > key || (other == key && j < i))
            .count();
        if beaten_by < n {
            kept |= 1 << i;
        }
    }
    kept
}

/// Checks that `w` is a 2-d float matrix whose rows split into groups of `m`; returns (rows, cols).
fn check_matrix(op: &'static str, arg: &'static str, w: &Tensor, m: usize) -> Result<(usize, usize)> {
    w.expect_rank(op, arg, 2)?;
    w.expect_dtype(op, arg, &[DType::F32, DType::BF16, DType::F16])?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    if rows == 0 || cols == 0 {
        return Err(Error::invalid(
            op,
            arg,
            "at least one row and one column",
            format!("shape {:?}", w.shape()),
        ));
    }
    if !cols.is_multiple_of(m) {
        return Err(Error::invalid(
            op,
            arg,
            format!("a column count that is a multiple of the group size {m}"),
            format!("shape {:?}", w.shape()),
        ));
    }
    Ok((rows, cols))
}

/// Checks the dimensions of the compressed format.
fn check_format_dims(op: &'static str, arg: &'static str, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || !rows.is_multiple_of(ROW_BLOCK) || cols == 0 || !cols.is_multiple_of(COL_BLOCK) {
        return Err(Error::invalid(
            op,
            arg,
            format!("a matrix of rows a multiple of {ROW_BLOCK} and columns a multiple of {COL_BLOCK}"),
            format!("{rows} rows, {cols} columns"),
        ));
    }
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            arg,
            "rows and columns below 2^31",
            format!("{rows}x{cols}"),
        ));
    }
    Ok(())
}

fn new_on(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
    match device {
        Device::Cpu => Tensor::zeros(shape, dtype, &Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => Tensor::uninit_cuda(shape, dtype, backend),
    }
}

/// `w` (rows, cols) pruned N:M along each row: the kept values unchanged, the others 0. Any
/// N:M up to [`MAX_GROUP`] on the CPU; 2:4 and 1:2 on a GPU.
pub fn nm_prune(w: &Tensor, pattern: NmPattern) -> Result<Tensor> {
    const OP: &str = "nm_prune";
    let (rows, cols) = check_matrix(OP, "w", w, pattern.m)?;
    match w.device() {
        Device::Cpu => cpu::prune(w, pattern, rows, cols, false),
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => {
            if !pattern.is_tensor_core() {
                return Err(Error::invalid(OP, "pattern", "2:4 or 1:2 on a GPU", pattern));
            }
            let mut out = Tensor::uninit_cuda(w.shape(), w.dtype(), &backend)?;
            cuda::prune(w, pattern, &mut out)?;
            Ok(out)
        }
    }
}

/// The mask of [`nm_prune`]: u8, 1 where kept (the spec's polarity), 0 where pruned, on the
/// device of `w` (computed on the host: a mask is made once, when a layer is pruned).
pub fn nm_mask(w: &Tensor, pattern: NmPattern) -> Result<Tensor> {
    const OP: &str = "nm_mask";
    let (rows, cols) = check_matrix(OP, "w", w, pattern.m)?;
    let host = w.to_device(&Device::Cpu)?;
    cpu::prune(&host, pattern, rows, cols, true)?.to_device(&w.device())
}

/// Checks that every group of `pattern.m` consecutive elements of each row of `w` holds at most
/// `pattern.n` non-zeros; the error names the first group that does not. The check reads `w` on
/// the host (a copy for a GPU tensor): it is made once, when a mask is adopted.
pub fn nm_check(w: &Tensor, pattern: NmPattern) -> Result<()> {
    const OP: &str = "nm_check";
    check_matrix(OP, "w", w, pattern.m)?;
    let host = w.to_device(&Device::Cpu)?;
    cpu::check(OP, "w", &host, pattern)
}

/// Compresses `w`, which must be 2:4-sparse (at most 2 non-zeros per group of 4; the error names
/// the first group that is not; checked on the host), into the tensor-core format. The kept
/// positions are the non-zeros, completed with the lowest free positions.
pub fn sparse24_compress(w: &Tensor) -> Result<Sparse24> {
    const OP: &str = "sparse24_compress";
    let (rows, cols) = check_matrix(OP, "w", w, 4)?;
    check_format_dims(OP, "w", rows, cols)?;
    match w.device() {
        Device::Cpu => {
            cpu::check(OP, "w", w, NmPattern::TWO_FOUR)?;
            cpu::compress(w, None, rows, cols)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            check_gpu_dtype(OP, "w", w.dtype(), &w.device())?;
            let host = w.to_device(&Device::Cpu)?;
            cpu::check(OP, "w", &host, NmPattern::TWO_FOUR)?;
            cuda::compress(w, None, rows, cols)
        }
    }
}

/// Prunes `w` by magnitude with `pattern` (2:4 or 1:2) and compresses it, in one pass: the
/// metadata records the kept positions even where a kept value is 0, so that the mask stays what
/// the magnitudes chose.
pub fn sparse24_prune_compress(w: &Tensor, pattern: NmPattern) -> Result<Sparse24> {
    const OP: &str = "sparse24_prune_compress";
    if !pattern.is_tensor_core() {
        return Err(Error::invalid(OP, "pattern", "2:4 or 1:2", pattern));
    }
    let (rows, cols) = check_matrix(OP, "w", w, 4)?;
    check_format_dims(OP, "w", rows, cols)?;
    check_gpu_dtype(OP, "w", w.dtype(), &w.device())?;
    match w.device() {
        Device::Cpu => cpu::compress(w, Some(pattern), rows, cols),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::compress(w, Some(pattern), rows, cols),
    }
}

/// [`sparse24_prune_compress`] into `out`, a matrix of `w`'s shape, dtype and device, for copies
/// refreshed after every update: on a GPU nothing is allocated.
pub(crate) fn sparse24_prune_compress_into(w: &Tensor, pattern: NmPattern, out: &mut Sparse24) -> Result<()> {
    const OP: &str = "sparse24_prune_compress";
    if !pattern.is_tensor_core() {
        return Err(Error::invalid(OP, "pattern", "2:4 or 1:2", pattern));
    }
    let (rows, cols) = check_matrix(OP, "w", w, 4)?;
    check_format_dims(OP, "w", rows, cols)?;
    check_gpu_dtype(OP, "w", w.dtype(), &w.device())?;
    if (out.rows, out.cols) != (rows, cols) || out.dtype() != w.dtype() {
        return Err(Error::invalid(
            OP,
            "out",
            format!("a {rows}x{cols} {} matrix, as w is", w.dtype()),
            format!("{}x{} {}", out.rows, out.cols, out.dtype()),
        ));
    }
    w.device().expect_same(&out.device(), OP, "out")?;
    match w.device() {
        Device::Cpu => {
            let fresh = cpu::compress(w, Some(pattern), rows, cols)?;
            out.values.copy_from(&fresh.values)?;
            out.meta.copy_from(&fresh.meta)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::compress_into(w, Some(pattern), rows, cols, &mut out.values, &mut out.meta),
    }
}

/// The dense matrix of a compressed one: kept values in place, zeros elsewhere.
pub fn sparse24_decompress(s: &Sparse24) -> Result<Tensor> {
    let mut out = new_on(&s.device(), &[s.rows, s.cols], s.dtype())?;
    match s.device() {
        Device::Cpu => cpu::decompress(s, &mut out)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::decompress(s, &mut out)?,
    }
    Ok(out)
}

/// SLoPe's double-pruned transpose: `W_dpᵀ` of shape (cols, rows), the transpose of `s` pruned
/// 2:4 by magnitude along each of its rows (along `s`'s rows, the output dimension), compressed.
/// Needs `s.rows()` to be a multiple of 64 as well.
pub fn sparse24_double_prune(s: &Sparse24) -> Result<Sparse24> {
    const OP: &str = "sparse24_double_prune";
    check_format_dims(OP, "s", s.cols, s.rows)?;
    match s.device() {
        Device::Cpu => cpu::double_prune(s),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::double_prune(s),
    }
}

/// Checks `x` against a compressed weight: (tokens, w.cols()), same dtype and device; returns the
/// token count.
fn check_tokens(op: &'static str, arg: &'static str, x: &Tensor, features: usize, w: &Sparse24) -> Result<usize> {
    x.expect_rank(op, arg, 2)?;
    x.expect_dtype(op, arg, &[w.dtype()])?;
    w.device().expect_same(&x.device(), op, arg)?;
    let (m, k) = (x.shape()[0], x.shape()[1]);
    if k != features {
        return Err(Error::invalid(
            op,
            arg,
            format!("(tokens, {features}) to match the weight's {features} input features"),
            format!("shape {:?}", x.shape()),
        ));
    }
    if m == 0 || m > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            arg,
            "between 1 and 2^31 - 1 tokens",
            format!("shape {:?}", x.shape()),
        ));
    }
    Ok(m)
}

fn check_gpu_dtype(op: &'static str, arg: &'static str, dtype: DType, device: &Device) -> Result<()> {
    if device.is_cuda() && dtype == DType::F32 {
        return Err(Error::invalid(
            op,
            arg,
            "dtype bf16 or f16 on a GPU (the sparse tensor cores take no f32)",
            "dtype f32",
        ));
    }
    Ok(())
}

/// The sparse linear forward `y = x·W_sᵀ + bias`: `x` (tokens, w.cols()), `bias` (w.rows()),
/// `y` (tokens, w.rows()), all of `w`'s dtype and device; f32 accumulation.
pub fn sparse_linear_forward(x: &Tensor, w: &Sparse24, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "sparse_linear_forward";
    let m = check_tokens(OP, "x", x, w.cols, w)?;
    let mut y = new_on(&x.device(), &[m, w.rows], x.dtype())?;
    sparse_linear_forward_into(x, w, bias, &mut y)?;
    Ok(y)
}

/// Which CUDA kernel computes the sparse GEMMs of more than 64 tokens (the forward, and the input
/// gradient through `W_dp`). All give the same products up to the order of the f32 sums; calls of
/// at most 64 tokens always run the few-token `mma.sp` kernel, and the CPU ignores the choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SparseKernel {
    /// tessera's choice, which is the `mma.sp` GEMM for now. It becomes the Hopper kernel on
    /// devices that load the sm_90a image once a GPU run has shown that kernel correct and faster
    /// there (benches/NOTES.md).
    #[default]
    Auto,
    /// The sm_80+ `mma.sp` GEMM (kernels/sparse_nm.cu), for every call.
    MmaSp,
    /// The sm_90a GEMM (kernels/sparse_nm_hopper.cu: TMA, mbarriers, `wgmma.mma_async.sp`), on a
    /// device that loads the sm_90a image; elsewhere a call of more than 64 tokens is an
    /// [`Error::Unsupported`] that says why.
    Hopper,
}

impl SparseKernel {
    fn code(self) -> u8 {
        match self {
            SparseKernel::Auto => 0,
            SparseKernel::MmaSp => 1,
            SparseKernel::Hopper => 2,
        }
    }

    fn from_code(code: u8) -> SparseKernel {
        match code {
            1 => SparseKernel::MmaSp,
            2 => SparseKernel::Hopper,
            _ => SparseKernel::Auto,
        }
    }
}

static PROCESS_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

thread_local! {
    static THREAD_KERNEL: std::cell::Cell<Option<SparseKernel>> = const { std::cell::Cell::new(None) };
}

/// Sets the many-token sparse GEMM for the whole process (threads inside [`with_sparse_kernel`]
/// keep theirs): the benchmark measures both kernels with it.
pub fn set_sparse_kernel(kernel: SparseKernel) {
    PROCESS_KERNEL.store(kernel.code(), std::sync::atomic::Ordering::Relaxed);
}

/// The many-token sparse GEMM in force on this thread: the innermost [`with_sparse_kernel`], else
/// the process-wide [`set_sparse_kernel`] (by default [`SparseKernel::Auto`]).
pub fn sparse_kernel() -> SparseKernel {
    THREAD_KERNEL
        .get()
        .unwrap_or_else(|| SparseKernel::from_code(PROCESS_KERNEL.load(std::sync::atomic::Ordering::Relaxed)))
}

/// Runs `f` with `kernel` as this thread's many-token sparse GEMM, and restores the previous
/// choice after it (also when `f` unwinds). Other threads are not affected, so that tests running
/// in parallel can force different kernels.
pub fn with_sparse_kernel<R>(kernel: SparseKernel, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<SparseKernel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_KERNEL.set(self.0);
        }
    }
    let _restore = Restore(THREAD_KERNEL.replace(Some(kernel)));
    f()
}

/// [`sparse_linear_forward`] into an existing `y`.
pub fn sparse_linear_forward_into(x: &Tensor, w: &Sparse24, bias: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    const OP: &str = "sparse_linear_forward";
    check_forward_into(OP, x, w, bias, y)?;
    match x.device() {
        Device::Cpu => cpu::forward(x, w, bias, y),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(x, w, bias, y, x.shape()[0], false),
    }
}

/// `y = x·W_sᵀ (+ bias) + y` on a GPU: [`sparse_linear_forward_into`] adding its result onto what
/// `y` holds (read in the GEMM's epilogue, one rounding of the sum), for ops that write another
/// term into `y` first (the LoRA linear's adapter). Host tensors are an error.
pub fn sparse_linear_accumulate_into(x: &Tensor, w: &Sparse24, bias: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
    const OP: &str = "sparse_linear_accumulate";
    check_forward_into(OP, x, w, bias, y)?;
    match x.device() {
        Device::Cpu => Err(Error::invalid(OP, "x", "tensors on a GPU", "host tensors")),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(x, w, bias, y, x.shape()[0], true),
    }
}

/// Checks the arguments of the forward into `y`; returns the token count.
fn check_forward_into(op: &'static str, x: &Tensor, w: &Sparse24, bias: Option<&Tensor>, y: &Tensor) -> Result<usize> {
    let m = check_tokens(op, "x", x, w.cols, w)?;
    if let Some(bias) = bias {
        bias.expect_dtype(op, "bias", &[x.dtype()])?;
        bias.expect_shape(op, "bias", &[w.rows])?;
        x.device().expect_same(&bias.device(), op, "bias")?;
    }
    y.expect_dtype(op, "y", &[x.dtype()])?;
    y.expect_shape(op, "y", &[m, w.rows])?;
    x.device().expect_same(&y.device(), op, "y")?;
    Ok(m)
}

/// The gradients of the sparse linear layer.
#[derive(Debug)]
pub struct SparseLinearGrads {
    /// `dY·W_dp`, (tokens, in features), the dtype of `dy`.
    pub d_x: Tensor,
    /// `(dYᵀ·X)` at the kept positions of `W_s`, in the layout of its values, f32.
    pub d_values: Tensor,
    /// `Σ_n dY[n,:]`, (out features), f32, when asked for.
    pub d_bias: Option<Tensor>,
}

/// SLoPe's backward of [`sparse_linear_forward`]: `w_dp_t` is [`sparse24_double_prune`] of `w`
/// (refreshed by the caller whenever `w`'s values change); `dy` is (tokens, w.rows()), `x` the
/// forward's input.
pub fn sparse_linear_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Sparse24,
    w_dp_t: &Sparse24,
    with_bias: bool,
) -> Result<SparseLinearGrads> {
    const OP: &str = "sparse_linear_backward";
    let m = check_tokens(OP, "dy", dy, w.rows, w)?;
    let m_x = check_tokens(OP, "x", x, w.cols, w)?;
    if m_x != m {
        return Err(Error::invalid(
            OP,
            "x",
            format!("{m} tokens, as dy has"),
            format!("shape {:?}", x.shape()),
        ));
    }
    if w_dp_t.rows != w.cols || w_dp_t.cols != w.rows || w_dp_t.dtype() != w.dtype() {
        return Err(Error::invalid(
            OP,
            "w_dp_t",
            format!(
                "a {}x{} {} matrix, the double-pruned transpose of w",
                w.cols,
                w.rows,
                w.dtype()
            ),
            format!("{}x{} {}", w_dp_t.rows, w_dp_t.cols, w_dp_t.dtype()),
        ));
    }
    w.device().expect_same(&w_dp_t.device(), OP, "w_dp_t")?;
    let d_x = sparse_linear_forward(dy, w_dp_t, None)?;
    let device = dy.device();
    let mut d_values = new_on(&device, &[w.rows, w.cols / 2], DType::F32)?;
    let mut d_bias = if with_bias {
        Some(new_on(&device, &[w.rows], DType::F32)?)
    } else {
        None
    };
    match device {
        Device::Cpu => cpu::weight_grad(dy, x, w, &mut d_values, d_bias.as_mut())?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::weight_grad(dy, x, w, &mut d_values, d_bias.as_mut(), m)?,
    }
    Ok(SparseLinearGrads { d_x, d_values, d_bias })
}

/// The most tokens one GPU sparse GEMM takes (the many-token kernel's grid limit).
pub(crate) const GPU_MAX_TOKENS: usize = 65535 * 128;

/// `x·W_sᵀ` in f32 on the host: `x` is (m, w.cols()) f32, the result (m, w.rows()) f32. For ops
/// that add more terms before rounding once (the LoRA linear on a sparse base); `w` is on the host.
pub(crate) fn sparse24_product_f32(x: &[f32], w: &Sparse24) -> Result<Vec<f32>> {
    with_float_type!(w.dtype(), "sparse24_product", "w", T => cpu::product_f32::<T>(x, w))
}

/// The weight gradient of [`sparse_linear_backward`] alone: `dYᵀ·X` at the kept positions of
/// `w`, in the layout of its values, f32 (rows, cols/2). `dy` (m, w.rows()) and `x` (m, w.cols())
/// are validated by the caller to match `w` in dtype and device.
pub(crate) fn sparse24_weight_grad(dy: &Tensor, x: &Tensor, w: &Sparse24) -> Result<Tensor> {
    let mut d_values = new_on(&dy.device(), &[w.rows, w.cols / 2], DType::F32)?;
    match dy.device() {
        Device::Cpu => cpu::weight_grad(dy, x, w, &mut d_values, None)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::weight_grad(dy, x, w, &mut d_values, None, dy.shape()[0])?,
    }
    Ok(d_values)
}

mod cpu {
    use super::*;
    use rayon::prelude::*;

    fn prune_typed<T: MagnitudeKey>(
        w: &Tensor,
        pattern: NmPattern,
        rows: usize,
        cols: usize,
        as_mask: bool,
    ) -> Result<Tensor> {
        let src = w.host_slice::<T>()?;
        let mut kept_flags = vec![0u8; rows * cols];
        kept_flags
            .par_chunks_mut(cols)
            .zip(src.par_chunks(cols))
            .for_each(|(flags, row)| {
                let mut keys = [0u32; MAX_GROUP];
                for (flags, group) in flags.chunks_mut(pattern.m).zip(row.chunks(pattern.m)) {
                    for (key, &v) in keys.iter_mut().zip(group) {
                        *key = v.magnitude_key();
                    }
                    let kept = kept_in_group(&keys[..pattern.m], pattern.n);
                    for (i, flag) in flags.iter_mut().enumerate() {
                        *flag = ((kept >> i) & 1) as u8;
                    }
                }
            });
        if as_mask {
            return Tensor::from_vec(kept_flags, &[rows, cols], &Device::Cpu);
        }
        let pruned: Vec<T> = src
            .iter()
            .zip(&kept_flags)
            .map(|(&v, &k)| if k == 1 { v } else { T::from_f32(0.0) })
            .collect();
        Tensor::from_vec(pruned, &[rows, cols], &Device::Cpu)
    }

    pub(super) fn prune(w: &Tensor, pattern: NmPattern, rows: usize, cols: usize, as_mask: bool) -> Result<Tensor> {
        with_float_type!(w.dtype(), "nm_prune", "w", T => prune_typed::<T>(w, pattern, rows, cols, as_mask))
    }

    fn check_typed<T: Float>(op: &'static str, arg: &'static str, w: &Tensor, pattern: NmPattern) -> Result<()> {
        let cols = w.shape()[1];
        let src = w.host_slice::<T>()?;
        for (row, values) in src.chunks(cols).enumerate() {
            for (group, values) in values.chunks(pattern.m).enumerate() {
                let nonzeros = values.iter().filter(|v| v.to_f32() != 0.0).count();
                if nonzeros > pattern.n {
                    return Err(Error::invalid(
                        op,
                        arg,
                        format!(
                            "at most {} non-zeros in every group of {} ({pattern})",
                            pattern.n, pattern.m
                        ),
                        format!(
                            "{nonzeros} non-zeros in row {row}, columns {}..{} (the first bad group)",
                            group * pattern.m,
                            (group + 1) * pattern.m
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn check(op: &'static str, arg: &'static str, w: &Tensor, pattern: NmPattern) -> Result<()> {
        with_float_type!(w.dtype(), op, arg, T => check_typed::<T>(op, arg, w, pattern))
    }

    /// The kept positions (idx0 < idx1) of a group: by magnitude with `pattern`, or the non-zeros
    /// completed with the lowest free positions.
    pub(super) fn group_positions<T: MagnitudeKey>(group: &[T], pattern: Option<NmPattern>) -> (usize, usize) {
        let kept = match pattern {
            Some(p) => {
                let keys: Vec<u32> = group.iter().map(|v| v.magnitude_key()).collect();
                if p == NmPattern::ONE_TWO {
                    kept_in_group(&keys[..2], 1) | kept_in_group(&keys[2..], 1) << 2
                } else {
                    kept_in_group(&keys, 2)
                }
            }
            None => {
                let mut kept = 0u64;
                for (i, v) in group.iter().enumerate() {
                    if v.to_f32() != 0.0 && kept.count_ones() < 2 {
                        kept |= 1 << i;
                    }
                }
                for i in 0..4 {
                    if kept.count_ones() < 2 && kept & (1 << i) == 0 {
                        kept |= 1 << i;
                    }
                }
                kept
            }
        };
        let first = kept.trailing_zeros() as usize;
        let second = (kept & !(1 << first)).trailing_zeros() as usize;
        (first, second)
    }

    fn compress_typed<T: MagnitudeKey>(
        w: &Tensor,
        pattern: Option<NmPattern>,
        rows: usize,
        cols: usize,
    ) -> Result<Sparse24> {
        let src = w.host_slice::<T>()?;
        let mut values = vec![T::from_f32(0.0); rows * cols / 2];
        let mut meta = vec![0u32; meta_len(rows, cols)];
        for (row, (dense, stored)) in src.chunks(cols).zip(values.chunks_mut(cols / 2)).enumerate() {
            for (group, chunk) in dense.chunks(4).enumerate() {
                let (first, second) = group_positions(chunk, pattern);
                stored[stored_index(group, 0)] = chunk[first];
                stored[stored_index(group, 1)] = chunk[second];
                let (word, shift) = meta_location(row, group, cols);
                meta[word] |= ((first | second << 2) as u32) << shift;
            }
        }
        Ok(Sparse24 {
            values: Tensor::from_vec(values, &[rows, cols / 2], &Device::Cpu)?,
            meta: Tensor::from_vec(meta, &[meta_len(rows, cols)], &Device::Cpu)?,
            rows,
            cols,
        })
    }

    pub(super) fn compress(w: &Tensor, pattern: Option<NmPattern>, rows: usize, cols: usize) -> Result<Sparse24> {
        with_float_type!(w.dtype(), "sparse24_compress", "w", T => compress_typed::<T>(w, pattern, rows, cols))
    }

    /// Each row's kept (column, value) pairs in column order.
    fn kept_entries<T: Float>(s: &Sparse24) -> Result<Vec<Vec<(usize, T)>>> {
        let values = s.values.host_slice::<T>()?;
        let meta = s.meta.host_slice::<u32>()?;
        Ok((0..s.rows)
            .into_par_iter()
            .map(|row| {
                let stored = &values[row * s.cols / 2..(row + 1) * s.cols / 2];
                let mut entries = Vec::with_capacity(s.cols / 2);
                for group in 0..s.cols / 4 {
                    let (word, shift) = meta_location(row, group, s.cols);
                    let nibble = (meta[word] >> shift) as usize;
                    entries.push((4 * group + (nibble & 3), stored[stored_index(group, 0)]));
                    entries.push((4 * group + (nibble >> 2 & 3), stored[stored_index(group, 1)]));
                }
                entries
            })
            .collect())
    }

    fn decompress_typed<T: Float>(s: &Sparse24, out: &mut Tensor) -> Result<()> {
        let entries = kept_entries::<T>(s)?;
        let out = out.host_slice_mut::<T>()?;
        out.fill(T::from_f32(0.0));
        for (row, entries) in entries.iter().enumerate() {
            for &(col, v) in entries {
                out[row * s.cols + col] = v;
            }
        }
        Ok(())
    }

    pub(super) fn decompress(s: &Sparse24, out: &mut Tensor) -> Result<()> {
        with_float_type!(s.dtype(), "sparse24_decompress", "s", T => decompress_typed::<T>(s, out))
    }

    fn double_prune_typed<T: MagnitudeKey>(s: &Sparse24) -> Result<Sparse24> {
        let mut dense = Tensor::zeros(&[s.rows, s.cols], s.dtype(), &Device::Cpu)?;
        decompress_typed::<T>(s, &mut dense)?;
        let dense = dense.host_slice::<T>()?;
        let mut transposed = vec![T::from_f32(0.0); s.rows * s.cols];
        for (r, row) in dense.chunks(s.cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                transposed[c * s.rows + r] = v;
            }
        }
        let transposed = Tensor::from_vec(transposed, &[s.cols, s.rows], &Device::Cpu)?;
        compress_typed::<T>(&transposed, Some(NmPattern::TWO_FOUR), s.cols, s.rows)
    }

    pub(super) fn double_prune(s: &Sparse24) -> Result<Sparse24> {
        with_float_type!(s.dtype(), "sparse24_double_prune", "s", T => double_prune_typed::<T>(s))
    }

    fn forward_typed<T: Float>(x: &Tensor, w: &Sparse24, bias: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
        let entries = kept_entries::<T>(w)?;
        let entries: Vec<Vec<(usize, f32)>> = entries
            .into_iter()
            .map(|row| row.into_iter().map(|(c, v)| (c, v.to_f32())).collect())
            .collect();
        let bias = bias.map(|b| b.host_slice::<T>()).transpose()?;
        let x = x.host_slice::<T>()?;
        let (k, n) = (w.cols, w.rows);
        y.host_slice_mut::<T>()?
            .par_chunks_mut(n)
            .zip(x.par_chunks(k))
            .for_each(|(y, x)| {
                let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                for (j, (out, row)) in y.iter_mut().zip(&entries).enumerate() {
                    let mut sum = bias.map_or(0.0, |b| b[j].to_f32());
                    for &(c, v) in row {
                        sum += v * x[c];
                    }
                    *out = T::from_f32(sum);
                }
            });
        Ok(())
    }

    pub(super) fn product_f32<T: Float>(x: &[f32], w: &Sparse24) -> Result<Vec<f32>> {
        let entries = kept_entries::<T>(w)?;
        let entries: Vec<Vec<(usize, f32)>> = entries
            .into_iter()
            .map(|row| row.into_iter().map(|(c, v)| (c, v.to_f32())).collect())
            .collect();
        let (k, n) = (w.cols, w.rows);
        let mut y = vec![0.0f32; x.len() / k * n];
        y.par_chunks_mut(n).zip(x.par_chunks(k)).for_each(|(y, x)| {
            for (out, row) in y.iter_mut().zip(&entries) {
                *out = row.iter().map(|&(c, v)| v * x[c]).sum();
            }
        });
        Ok(y)
    }

    pub(super) fn forward(x: &Tensor, w: &Sparse24, bias: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
        with_float_type!(x.dtype(), "sparse_linear_forward", "x", T => forward_typed::<T>(x, w, bias, y))
    }

    fn weight_grad_typed<T: Float>(
        dy: &Tensor,
        x: &Tensor,
        w: &Sparse24,
        d_values: &mut Tensor,
        d_bias: Option<&mut Tensor>,
    ) -> Result<()> {
        let entries = kept_entries::<T>(w)?;
        let (n, k) = (w.rows, w.cols);
        let m = dy.shape()[0];
        // Columns of dY and X as f32, so that each kept entry is one contiguous dot product.
        let transpose = |t: &[T], cols: usize| -> Vec<f32> {
            let mut out = vec![0.0f32; t.len()];
            for (r, row) in t.chunks(cols).enumerate() {
                for (c, v) in row.iter().enumerate() {
                    out[c * m + r] = v.to_f32();
                }
            }
            out
        };
        let dy_t = transpose(dy.host_slice::<T>()?, n);
        let x_t = transpose(x.host_slice::<T>()?, k);
        d_values
            .host_slice_mut::<f32>()?
            .par_chunks_mut(k / 2)
            .enumerate()
            .for_each(|(row, out)| {
                let g = &dy_t[row * m..(row + 1) * m];
                for group in 0..k / 4 {
                    for slot in 0..2 {
                        let col = entries[row][2 * group + slot].0;
                        let xs = &x_t[col * m..(col + 1) * m];
                        out[stored_index(group, slot)] = g.iter().zip(xs).map(|(a, b)| a * b).sum();
                    }
                }
            });
        if let Some(d_bias) = d_bias {
            for (j, out) in d_bias.host_slice_mut::<f32>()?.iter_mut().enumerate() {
                *out = dy_t[j * m..(j + 1) * m].iter().sum();
            }
        }
        Ok(())
    }

    pub(super) fn weight_grad(
        dy: &Tensor,
        x: &Tensor,
        w: &Sparse24,
        d_values: &mut Tensor,
        d_bias: Option<&mut Tensor>,
    ) -> Result<()> {
        with_float_type!(dy.dtype(), "sparse_linear_backward", "dy", T => weight_grad_typed::<T>(dy, x, w, d_values, d_bias))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::*;
    use crate::cuda::{CudaBackend, CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::matmul::{matmul, MatmulOptions};
    use std::sync::Arc;

    const FILE: &str = "sparse_nm";
    /// Must match kernels/sparse_nm.cu.
    const ELEMENT_THREADS: u32 = 256;
    const GEMM_THREADS: u32 = 256;
    const SMALL_MAX_TOKENS: usize = 64;
    const BIG_ROWS: usize = 128;
    const BIG_TOKENS: usize = 128;
    const BIG_STAGES: usize = 3;
    const BIG_SHARED_BYTES: usize = BIG_STAGES * (BIG_ROWS * 64 + BIG_ROWS / 16 * 128 + BIG_TOKENS * 128);
    const MAX_GRID_Y: usize = 65535;

    /// Which positions the compress kernel keeps: kernels/sparse_nm.cu's PICK_*.
    fn pick_code(pattern: Option<NmPattern>) -> i32 {
        match pattern {
            None => 0,
            Some(p) if p == NmPattern::TWO_FOUR => 1,
            Some(_) => 2,
        }
    }

    /// Blocks for a grid-stride loop over `items`: enough to fill the GPU, no more.
    fn element_grid(items: usize, backend: &CudaBackend) -> u32 {
        items
            .div_ceil(ELEMENT_THREADS as usize)
            .clamp(1, backend.multiprocessors() * 16) as u32
    }

    fn element_launch(items: usize, backend: &CudaBackend) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (element_grid(items, backend), 1, 1),
            block_dim: (ELEMENT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The bias-gradient kernel's launch: a block of 8 warps per 32 columns.
    pub(crate) fn bias_launch(columns: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (columns.div_ceil(32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn backend_of(t: &Tensor) -> Result<Arc<CudaBackend>> {
        Ok(t.device_buffer()?.backend().clone())
    }

    pub(super) fn prune(w: &Tensor, pattern: NmPattern, out: &mut Tensor) -> Result<()> {
        let backend = backend_of(w)?;
        let kind = if pattern == NmPattern::TWO_FOUR {
            "prune24"
        } else {
            "prune12"
        };
        let name = format!("sparse_{kind}_{}", w.dtype().name());
        let groups = (w.numel() / pattern.m()) as i64;
        let (w_address, out_address) = (w.device_buffer()?.address(), out.device_buffer()?.address());
        let function = backend.function(FILE, &name)?;
        let mut builder = backend.launch_builder(&function);
        builder.arg(&w_address).arg(&out_address).arg(&groups);
        // SAFETY: w and out hold `groups · m` elements of the kernel's dtype (validated); the
        // grid-stride loop covers exactly the groups.
        unsafe { builder.launch(element_launch(groups as usize, &backend)) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    pub(super) fn compress(w: &Tensor, pattern: Option<NmPattern>, rows: usize, cols: usize) -> Result<Sparse24> {
        let backend = backend_of(w)?;
        let mut values = Tensor::uninit_cuda(&[rows, cols / 2], w.dtype(), &backend)?;
        let mut meta = Tensor::uninit_cuda(&[meta_len(rows, cols)], DType::U32, &backend)?;
        compress_into(w, pattern, rows, cols, &mut values, &mut meta)?;
        Ok(Sparse24 {
            values,
            meta,
            rows,
            cols,
        })
    }

    /// [`compress`] into `values` and `meta` of the format's sizes for (rows, cols).
    pub(super) fn compress_into(
        w: &Tensor,
        pattern: Option<NmPattern>,
        rows: usize,
        cols: usize,
        values: &mut Tensor,
        meta: &mut Tensor,
    ) -> Result<()> {
        let backend = backend_of(w)?;
        let words = meta_len(rows, cols);
        let name = format!("sparse24_compress_{}", w.dtype().name());
        let function = backend.function(FILE, &name)?;
        let (w_address, values_address, meta_address) = (
            w.device_buffer()?.address(),
            values.device_buffer()?.address(),
            meta.device_buffer()?.address(),
        );
        let (rows_i, cols_i, pick) = (rows as i64, cols as i64, pick_code(pattern));
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&w_address)
            .arg(&values_address)
            .arg(&meta_address)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&pick);
        // SAFETY: w is (rows, cols) with rows % 16 == 0 and cols % 64 == 0 (validated); values
        // and meta have the format's sizes; each thread writes the values and the metadata word
        // of one word's 8 groups, and the words cover the matrix once.
        unsafe { builder.launch(element_launch(words, &backend)) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    pub(super) fn decompress(s: &Sparse24, out: &mut Tensor) -> Result<()> {
        let backend = backend_of(&s.values)?;
        let name = format!("sparse24_decompress_{}", s.dtype().name());
        let function = backend.function(FILE, &name)?;
        let addresses = (
            s.values.device_buffer()?.address(),
            s.meta.device_buffer()?.address(),
            out.device_buffer()?.address(),
        );
        let (rows, cols) = (s.rows as i64, s.cols as i64);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&addresses.0)
            .arg(&addresses.1)
            .arg(&addresses.2)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: the format's sizes hold by construction; out is (rows, cols) of the dtype.
        unsafe { builder.launch(element_launch(s.meta.numel(), &backend)) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    pub(super) fn double_prune(s: &Sparse24) -> Result<Sparse24> {
        let backend = backend_of(&s.values)?;
        let (rows, cols) = (s.cols, s.rows);
        let values = Tensor::uninit_cuda(&[rows, cols / 2], s.dtype(), &backend)?;
        let words = meta_len(rows, cols);
        let meta = Tensor::uninit_cuda(&[words], DType::U32, &backend)?;
        let name = format!("sparse24_double_prune_{}", s.dtype().name());
        let function = backend.function(FILE, &name)?;
        let addresses = (
            s.values.device_buffer()?.address(),
            s.meta.device_buffer()?.address(),
            values.device_buffer()?.address(),
            meta.device_buffer()?.address(),
        );
        let (in_rows, in_cols) = (s.rows as i64, s.cols as i64);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&addresses.0)
            .arg(&addresses.1)
            .arg(&addresses.2)
            .arg(&addresses.3)
            .arg(&in_rows)
            .arg(&in_cols);
        // SAFETY: s has the format's sizes with both dimensions multiples of 64 (validated); the
        // outputs have the transposed format's sizes, each word written by one thread.
        unsafe { builder.launch(element_launch(words, &backend)) }.context(&format!("launching {name}"))?;
        Ok(Sparse24 {
            values,
            meta,
            rows,
            cols,
        })
    }

    /// `y = x·W_sᵀ (+ bias)`, plus `y`'s own values when `accumulate`.
    pub(super) fn forward(
        x: &Tensor,
        w: &Sparse24,
        bias: Option<&Tensor>,
        y: &mut Tensor,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        if m > SMALL_MAX_TOKENS && sparse_kernel() == SparseKernel::Hopper {
            return hopper::forward(x, w, bias, y, m, accumulate);
        }
        let backend = backend_of(x)?;
        let (n, k) = (w.rows, w.cols);
        let addresses = (
            w.values.device_buffer()?.address(),
            w.meta.device_buffer()?.address(),
            x.device_buffer()?.address(),
            match bias {
                Some(b) => b.device_buffer()?.address(),
                None => 0u64,
            },
            y.device_buffer()?.address(),
        );
        let (name, launch) = if m <= SMALL_MAX_TOKENS {
            let tiles = m.div_ceil(8).next_power_of_two();
            let name = format!("sparse24_gemm_small{tiles}_{}", x.dtype().name());
            // Row tiles per block: ROW_TILES of kernels/sparse_nm.cu's gemm_small.
            let row_tiles = if tiles <= 4 { 2 } else { 1 };
            let launch = LaunchConfig {
                grid_dim: ((n / ROW_BLOCK).div_ceil(row_tiles) as u32, 1, 1),
                block_dim: (GEMM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (name, launch)
        } else {
            let token_blocks = m.div_ceil(BIG_TOKENS);
            if token_blocks > MAX_GRID_Y {
                return Err(Error::invalid(
                    "sparse_linear_forward",
                    "x",
                    format!("at most {} tokens", MAX_GRID_Y * BIG_TOKENS),
                    format!("{m} tokens"),
                ));
            }
            let launch = LaunchConfig {
                grid_dim: (n.div_ceil(BIG_ROWS) as u32, token_blocks as u32, 1),
                block_dim: (GEMM_THREADS, 1, 1),
                shared_mem_bytes: BIG_SHARED_BYTES as u32,
            };
            (format!("sparse24_gemm_{}", x.dtype().name()), launch)
        };
        let function = backend.function(FILE, &name)?;
        if launch.shared_mem_bytes > 0 {
            backend.allow_dynamic_shared(&function, launch.shared_mem_bytes as usize)?;
        }
        let (m_i, n_i, k_i, accumulate) = (m as i32, n as i32, k as i32, accumulate as i32);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&addresses.0)
            .arg(&addresses.1)
            .arg(&addresses.2)
            .arg(&addresses.3)
            .arg(&addresses.4)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&k_i)
            .arg(&accumulate);
        // SAFETY: w has the format's sizes (n % 16 == 0, k % 64 == 0), x is (m, k), y (m, n) and
        // bias (n) or null, all of one 16-bit dtype on this device (validated). The kernels read
        // (y too, when accumulating) and write only inside those bounds: tokens past m are masked, rows come in whole tiles
        // of 16, and the many-token kernel clamps the tiles past n.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    /// The sm_90a many-token GEMM of kernels/sparse_nm_hopper.cu.
    mod hopper {
        use super::*;
        use crate::cuda::tensor_map::{self, Element, Swizzle, Tiled};

        /// Must match kernels/sparse_nm_hopper.cu: threads per CTA, rows of W_s and tokens per
        /// CTA, pipeline stages, and the bytes of one stage (x, values, metadata of a 64-column
        /// k-block).
        const THREADS: u32 = 384;
        const ROWS: usize = 256;
        const TOKENS: usize = 128;
        const STAGES: usize = 4;
        const STAGE_BYTES: usize = TOKENS * 128 + ROWS * 64 + ROWS / 16 * 128;
        /// The ring and room to align it to 1024 bytes (the 128-byte swizzle's period).
        const SHARED_BYTES: usize = STAGES * STAGE_BYTES + 1024;
        // A CTA may have 227 KiB, the kernel's 64 bytes of mbarriers (ptxas's report) included.
        const _: () = assert!(SHARED_BYTES <= 227 * 1024 - 64);

        /// Layout shared with `SparseHopperParams` in kernels/sparse_nm_hopper.cu.
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct HopperParams {
            bias: u64,
            y: u64,
            m: i32,
            n: i32,
            k: i32,
            accumulate: i32,
        }

        // SAFETY: a plain #[repr(C)] struct of scalars, laid out as the kernel declares it.
        unsafe impl cudarc::driver::DeviceRepr for HopperParams {}

        /// The geometry of the three maps of an (n, k) weight and m tokens, in the kernel's
        /// order: values (k/2, n) read as 32 kept values of 256 rows, metadata (32 words per
        /// k-block, n/16 row tiles) read as 16 tiles, x (k, m) read as 64 columns of 128 tokens
        /// with the 128-byte swizzle that the kernel's wgmma descriptor expects.
        struct Geometry {
            values: ([u64; 2], [u64; 1], [u32; 2]),
            meta: ([u64; 2], [u64; 1], [u32; 2]),
            x: ([u64; 2], [u64; 1], [u32; 2]),
            element: Element,
        }

        impl Geometry {
            fn new(element: Element, m: usize, n: usize, k: usize) -> Geometry {
                let words = (k / COL_BLOCK * META_WORDS_PER_TILE) as u64;
                Geometry {
                    // A row's 32 kept values of a k-block are 64 bytes.
                    values: ([(k / 2) as u64, n as u64], [k as u64], [32, ROWS as u32]),
                    meta: (
                        [words, (n / ROW_BLOCK) as u64],
                        [words * 4],
                        [META_WORDS_PER_TILE as u32, (ROWS / ROW_BLOCK) as u32],
                    ),
                    x: ([k as u64, m as u64], [2 * k as u64], [COL_BLOCK as u32, TOKENS as u32]),
                    element,
                }
            }

            fn values(&self) -> Tiled<'_> {
                let (dims, strides, boxes) = &self.values;
                Tiled {
                    element: self.element,
                    dims,
                    strides,
                    boxes,
                    swizzle: Swizzle::None,
                }
            }

            fn meta(&self) -> Tiled<'_> {
                let (dims, strides, boxes) = &self.meta;
                Tiled {
                    element: Element::U32,
                    dims,
                    strides,
                    boxes,
                    swizzle: Swizzle::None,
                }
            }

            fn x(&self) -> Tiled<'_> {
                let (dims, strides, boxes) = &self.x;
                Tiled {
                    element: self.element,
                    dims,
                    strides,
                    boxes,
                    swizzle: Swizzle::Bytes128,
                }
            }
        }

        pub(super) fn forward(
            x: &Tensor,
            w: &Sparse24,
            bias: Option<&Tensor>,
            y: &mut Tensor,
            m: usize,
            accumulate: bool,
        ) -> Result<()> {
            const OP: &str = "sparse_linear_forward";
            let backend = backend_of(x)?;
            let image = backend.kernel_image()?;
            if image != crate::cuda::kernels::ImageKind::Sm90a {
                return Err(Error::Unsupported {
                    op: OP,
                    reason: format!(
                        "the Hopper sparse kernel was asked for, and {} loads the {}, not the sm_90a image",
                        backend.name(),
                        image.name()
                    ),
                });
            }
            let token_blocks = m.div_ceil(TOKENS);
            if token_blocks > MAX_GRID_Y {
                return Err(Error::invalid(
                    OP,
                    "x",
                    format!("at most {} tokens", MAX_GRID_Y * TOKENS),
                    format!("{m} tokens"),
                ));
            }
            let (n, k) = (w.rows, w.cols);
            let element = if x.dtype() == DType::BF16 {
                Element::BF16
            } else {
                Element::F16
            };
            let geometry = Geometry::new(element, m, n, k);
            let map_values = tensor_map::encode(OP, "w", w.values.device_buffer()?.address(), &geometry.values())?;
            let map_meta = tensor_map::encode(OP, "w", w.meta.device_buffer()?.address(), &geometry.meta())?;
            let map_x = tensor_map::encode(OP, "x", x.device_buffer()?.address(), &geometry.x())?;
            // The epilogue writes 16-byte chunks of y (n is a multiple of 16); device allocations
            // are 256-byte aligned.
            let y_address = y.device_buffer()?.address();
            if !y_address.is_multiple_of(16) {
                return Err(Error::invalid(
                    OP,
                    "y",
                    "a 16-byte aligned device tensor",
                    format!("address {y_address:#x}"),
                ));
            }
            let params = HopperParams {
                bias: match bias {
                    Some(b) => b.device_buffer()?.address(),
                    None => 0,
                },
                y: y_address,
                m: m as i32,
                n: n as i32,
                k: k as i32,
                accumulate: i32::from(accumulate),
            };
            let name = format!("sparse24_gemm_sm90_{}", x.dtype().name());
            let function = backend.function("sparse_nm_hopper", &name)?;
            backend.allow_shared_memory(&function, SHARED_BYTES)?;
            let mut builder = backend.launch_builder(&function);
            builder.arg(&map_values).arg(&map_meta).arg(&map_x).arg(&params);
            let launch = LaunchConfig {
                grid_dim: (n.div_ceil(ROWS) as u32, token_blocks as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: SHARED_BYTES as u32,
            };
            // SAFETY: the tensor maps describe w's values (n, k/2) and metadata and x (m, k)
            // exactly, all validated (n % 16 == 0, k % 64 == 0, one 16-bit dtype, this device);
            // bias holds n elements or is null, y is (m, n). The kernel reads only through the
            // maps (zero fill past the edges) and reads (when accumulating) and writes y only
            // below m tokens and n features.
            unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
            Ok(())
        }

        #[cfg(test)]
        mod tests {
            use super::*;

            /// The kernel's mbarrier expects STAGE_BYTES per k-block: the three boxes must deliver
            /// exactly that (TMA writes whole boxes, edges included), for every shape the format
            /// allows (n a multiple of 16, k of 64) and any number of tokens; every map must be
            /// one TMA accepts.
            #[test]
            fn maps_deliver_what_the_barrier_expects() {
                for (m, n, k) in [(65, 16, 64), (4096, 4096, 4096), (1025, 11008, 4096), (17, 4096, 11008)] {
                    for element in [Element::BF16, Element::F16] {
                        let geometry = Geometry::new(element, m, n, k);
                        let maps = [geometry.values(), geometry.meta(), geometry.x()];
                        for map in &maps {
                            assert_eq!(map.check(), Ok(()), "({m}, {n}, {k}): {map:?}");
                        }
                        let delivered: u64 = maps.iter().map(|map| map.box_bytes()).sum();
                        assert_eq!(delivered, STAGE_BYTES as u64);
                    }
                }
            }
        }
    }

    pub(super) fn weight_grad(
        dy: &Tensor,
        x: &Tensor,
        w: &Sparse24,
        d_values: &mut Tensor,
        d_bias: Option<&mut Tensor>,
        m: usize,
    ) -> Result<()> {
        let backend = backend_of(dy)?;
        // The dense dYᵀ·X (cuBLASLt, f32 accumulation, rounded to the input dtype), then its
        // kept entries widened to f32.
        let g = matmul(
            dy,
            x,
            None,
            MatmulOptions {
                trans_a: true,
                ..Default::default()
            },
        )?;
        let name = format!("sparse24_gather_{}", dy.dtype().name());
        let function = backend.function(FILE, &name)?;
        let addresses = (
            g.device_buffer()?.address(),
            w.meta.device_buffer()?.address(),
            d_values.device_buffer()?.address(),
        );
        let (rows, cols) = (w.rows as i64, w.cols as i64);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&addresses.0)
            .arg(&addresses.1)
            .arg(&addresses.2)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: g is (rows, cols), d_values (rows, cols/2) f32, meta the format's words.
        unsafe { builder.launch(element_launch(w.meta.numel(), &backend)) }.context(&format!("launching {name}"))?;
        if let Some(d_bias) = d_bias {
            let name = format!("sparse_bias_grad_{}", dy.dtype().name());
            let function = backend.function(FILE, &name)?;
            let (dy_address, bias_address) = (dy.device_buffer()?.address(), d_bias.device_buffer()?.address());
            let (m_i, n_i) = (m as i64, w.rows as i64);
            let mut builder = backend.launch_builder(&function);
            builder.arg(&dy_address).arg(&bias_address).arg(&m_i).arg(&n_i);
            // SAFETY: dy is (m, n), d_bias (n) f32; a block per 32 columns.
            unsafe { builder.launch(bias_launch(w.rows)) }.context(&format!("launching {name}"))?;
        }
        Ok(())
    }
}
