//! Fused LoRA linear: `Y = X·Wᵀ + s_a·(X·A_aᵀ)·B_aᵀ (+ bias)`, its backward with the base frozen
//! (or trainable), batches where every token row names its adapter, merge/unmerge, SLoPe's lazy
//! adapter initialisation (ALGORITHMS.md §2.5) and VeLoRA's rank-1 compression of the saved input
//! (§6). Fast Forward (§7) is in `crate::optim::fast_forward`.
//!
//! Layout: `x` is (m, d_in); the base weight `W` is (d_out, d_in), the PyTorch layout; a set of
//! adapters is stored padded in two tensors, `A` (count, max_rank, d_in) and `B` (count, d_out,
//! max_rank), adapter `a` using the first `rank_a` rows of `A[a]` and columns of `B[a]` (the rest
//! is ignored, whatever it holds) with scale `s_a`. A [`LoraRouting`] names each row's adapter.
//!
//! The base is a [`LoraBase`]: a dense weight, or SLoPe's sparse + low-rank (§2.5), a 2:4 sparse
//! `W_s` in the compressed format of [`crate::ops::sparse`] (`Y = X·W_sᵀ + b + s·(X·Aᵀ)·Bᵀ`).
//! Over a sparse base the backward is SLoPe's: `dX = dY·W_dp + s·(dY·B)·A`, the base's part through
//! the double-pruned transpose `W_dpᵀ` as §2.3 specifies for the sparse layer (adapters add their
//! term, §2.5, and change nothing in the base's), so `dX` is deliberately not the exact gradient of
//! the forward; `dA`, `dB` are exact, and `dW`, when asked for, is the masked gradient at the kept
//! positions. Adding a dense `B·A` to `W_s` would break its 2:4 pattern: an adapter merges into a
//! sparse base only as a dense copy, [`lora_merged_weight`]; [`lora_merge`] and [`lora_unmerge`]
//! change dense weights in place.
//!
//! All arithmetic is f32; inputs and outputs are f32, bf16 or f16 (a sparse base on a GPU: bf16,
//! f16). On the GPU the dense base product is cuBLASLt, the sparse one the mma.sp GEMMs of
//! kernels/sparse_nm.cu (through [`crate::ops::sparse_linear_forward_into`]). One adapter over
//! many rows (see [`blas_rows`]) runs its two products in cuBLASLt too, writing `s·T·Bᵀ` (+ bias)
//! into `Y` before the base GEMM accumulates onto it (cuBLASLt's beta = 1, or the accumulating
//! epilogue of the sparse GEMM, which reads `Y` where it writes it). Other
//! batches run the hand-written kernels of kernels/lora.cu: `T = X·Aᵀ` per row's adapter on a
//! side stream beside the base GEMM (dense or sparse), then `s·T·Bᵀ` added onto its output. The
//! backward mirrors this (cuBLASLt for one adapter over many rows, the kernels otherwise; the
//! sparse base's `dY·W_dp` is the same sparse GEMM on `W_dpᵀ`) and recomputes `T`.
//!
//! The adapter's expand is its own launch. Fused into the sparse GEMM's epilogue (`T` ready
//! before it, `B_a`'s rows read per output tile), it would save the write of `s·T·Bᵀ` and its read
//! back: at m = 4096, d = 4096 bf16 64 MiB of traffic (≈ 20 µs on an H100 beside a sparse GEMM of
//! ≈ 0.15..0.3 ms), and at m ≤ 16 one launch (a few µs beside a sparse GEMM of ≈ 6 µs), where
//! the shrink would also have to finish before the GEMM instead of running beside it.

use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ops::matmul::{matmul, MatmulOptions};
use crate::ops::sparse::{self, sparse24_decompress, sparse24_double_prune, Sparse24};
use crate::ops::support::new_output;
use crate::tensor::Tensor;

const OP: &str = "lora";

/// The largest adapter rank (padded rank of an adapter set) the kernels accept.
pub const MAX_RANK: usize = 64;

/// The most adapters in one set, and so the bound on a routing's ids: a routing keeps a row
/// count per id up to the largest, which a stray id near 2^32 must not turn into gigabytes.
pub const MAX_ADAPTERS: usize = 1 << 20;

/// From this many rows on (by default), a GPU batch whose rows all use one adapter of full padded
/// rank runs its adapter products in cuBLASLt (tensor cores, three plain GEMMs); smaller batches
/// and mixed batches run the hand-written kernels beside the base GEMM.
pub const DEFAULT_BLAS_ROWS: usize = 64;

static BLAS_ROWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(DEFAULT_BLAS_ROWS);

/// Sets the batch size from which one adapter runs in cuBLASLt on the GPU (see
/// [`DEFAULT_BLAS_ROWS`]; `usize::MAX` keeps every batch on the kernels), for the whole process:
/// the benchmark measures both paths with it. Results agree to rounding either way.
pub fn set_blas_rows(rows: usize) {
    BLAS_ROWS.store(rows, std::sync::atomic::Ordering::Relaxed);
}

/// The current threshold of [`set_blas_rows`].
pub fn blas_rows() -> usize {
    BLAS_ROWS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The frozen (or trainable) weight that the adapters sit beside.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum LoraBase<'a> {
    /// A dense weight (d_out, d_in) of the input's dtype.
    Dense(&'a Tensor),
    /// SLoPe's sparse base (ALGORITHMS.md §2.5): `W_s`, (d_out, d_in) 2:4-sparse along d_in in
    /// the input's dtype (bf16 or f16 on a GPU), and optionally its double-pruned transpose
    /// `W_dpᵀ` ([`sparse24_double_prune`]), through which the backward's `dX` goes (§2.3).
    /// Without it each backward computes it from `W_s` (the spec's reference semantics; that
    /// needs d_out to be a multiple of 64); the forward never reads it. A training loop that
    /// keeps `W_s` frozen computes it once and passes it.
    Sparse24(&'a Sparse24, Option<&'a Sparse24>),
}

impl LoraBase<'_> {
    fn check(&self, op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
        match self {
            LoraBase::Dense(w) => {
                w.expect_rank(op, "base", 2)?;
                w.expect_dtype(op, "base", &[x.dtype()])?;
                x.device().expect_same(&w.device(), op, "base")?;
                let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
                if d_out == 0 || d_in == 0 {
                    return Err(Error::invalid(
                        op,
                        "base",
                        "a weight of at least one row and column",
                        format!("shape {:?}", w.shape()),
                    ));
                }
                Ok((d_out, d_in))
            }
            LoraBase::Sparse24(w, transposed) => {
                if w.dtype() != x.dtype() {
                    return Err(Error::invalid(
                        op,
                        "base",
                        format!("a sparse weight of the input's dtype {}", x.dtype()),
                        format!("dtype {}", w.dtype()),
                    ));
                }
                x.device().expect_same(&w.device(), op, "base")?;
                if let Some(t) = transposed {
                    if t.rows() != w.cols() || t.cols() != w.rows() || t.dtype() != w.dtype() {
                        return Err(Error::invalid(
                            op,
                            "base",
                            format!("a double-pruned transpose of {}x{} {}", w.cols(), w.rows(), w.dtype()),
                            format!("{}x{} {}", t.rows(), t.cols(), t.dtype()),
                        ));
                    }
                    x.device().expect_same(&t.device(), op, "base")?;
                }
                let m = x.shape()[0];
                if x.device().is_cuda() && m > sparse::GPU_MAX_TOKENS {
                    return Err(Error::invalid(
                        op,
                        "x",
                        format!("at most {} rows over a sparse base on a GPU", sparse::GPU_MAX_TOKENS),
                        format!("shape {:?}", x.shape()),
                    ));
                }
                Ok((w.rows(), w.cols()))
            }
        }
    }
}

/// The double-pruned transpose of a sparse base given without one.
fn double_prune_for(op: &'static str, w: &Sparse24) -> Result<Sparse24> {
    if !w.rows().is_multiple_of(sparse::COL_BLOCK) {
        return Err(Error::invalid(
            op,
            "base",
            format!(
                "its double-pruned transpose, or d_out a multiple of {} to compute it",
                sparse::COL_BLOCK
            ),
            format!("d_out = {} and no transpose", w.rows()),
        ));
    }
    sparse24_double_prune(w)
}

/// A set of adapters in one padded pair of tensors, with each adapter's rank and scale.
#[derive(Debug)]
pub struct LoraAdapters {
    a: Tensor,
    b: Tensor,
    ranks: Vec<usize>,
    scales: Vec<f32>,
    /// Ranks (u32) then scales (f32 bits), on the adapters' device, for the kernels.
    #[cfg(feature = "cuda")]
    table: Option<Tensor>,
}

impl LoraAdapters {
    /// Adapters `A` (count, max_rank, d_in) and `B` (count, d_out, max_rank) of one float dtype on
    /// one device, with `ranks[a]` in 1..=max_rank and finite `scales[a]` for each of the `count`
    /// adapters; `max_rank` is at most [`MAX_RANK`].
    pub fn new(a: Tensor, b: Tensor, ranks: &[usize], scales: &[f32]) -> Result<LoraAdapters> {
        const OP: &str = "LoraAdapters::new";
        a.expect_rank(OP, "a", 3)?;
        b.expect_rank(OP, "b", 3)?;
        a.expect_dtype(OP, "a", &[DType::F32, DType::BF16, DType::F16])?;
        b.expect_dtype(OP, "b", &[a.dtype()])?;
        a.device().expect_same(&b.device(), OP, "b")?;
        let (count, max_rank, d_in) = (a.shape()[0], a.shape()[1], a.shape()[2]);
        if count == 0 || max_rank == 0 || d_in == 0 || count > MAX_ADAPTERS {
            return Err(Error::invalid(
                OP,
                "a",
                format!("(count, max_rank, d_in) all at least 1, count at most {MAX_ADAPTERS}"),
                format!("shape {:?}", a.shape()),
            ));
        }
        if max_rank > MAX_RANK {
            return Err(Error::invalid(
                OP,
                "a",
                format!("a padded rank of at most {MAX_RANK}"),
                format!("shape {:?}", a.shape()),
            ));
        }
        let d_out = b.shape()[1];
        if b.shape()[0] != count || b.shape()[2] != max_rank || d_out == 0 {
            return Err(Error::invalid(
                OP,
                "b",
                format!("shape ({count}, d_out >= 1, {max_rank}) to match a"),
                format!("shape {:?}", b.shape()),
            ));
        }
        if ranks.len() != count {
            return Err(Error::invalid(
                OP,
                "ranks",
                format!("{count} ranks, one per adapter"),
                ranks.len(),
            ));
        }
        if let Some((i, &r)) = ranks.iter().enumerate().find(|(_, &r)| r == 0 || r > max_rank) {
            return Err(Error::invalid(
                OP,
                "ranks",
                format!("every rank between 1 and the maximum {max_rank}"),
                format!("{r} for adapter {i}"),
            ));
        }
        if scales.len() != count {
            return Err(Error::invalid(
                OP,
                "scales",
                format!("{count} scales, one per adapter"),
                scales.len(),
            ));
        }
        if let Some((i, s)) = scales.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(Error::invalid(
                OP,
                "scales",
                "finite scales",
                format!("{s} for adapter {i}"),
            ));
        }
        if [count, max_rank, d_in, d_out].iter().any(|&v| v > i32::MAX as usize) {
            return Err(Error::invalid(OP, "a", "sizes below 2^31", format!("{:?}", a.shape())));
        }
        #[cfg(feature = "cuda")]
        let table = match a.device() {
            Device::Cpu => None,
            device => {
                let mut words: Vec<u32> = ranks.iter().map(|&r| r as u32).collect();
                words.extend(scales.iter().map(|s| s.to_bits()));
                Some(Tensor::from_vec(words, &[2 * count], &device)?)
            }
        };
        Ok(LoraAdapters {
            a,
            b,
            ranks: ranks.to_vec(),
            scales: scales.to_vec(),
            #[cfg(feature = "cuda")]
            table,
        })
    }

    /// SLoPe's lazy adapters (§2.5), initialised for any base of shape (d_out, d_in): `count`
    /// adapters of rank `rank`, `A` drawn from N(0, 1) (a seeded, deterministic stream), `B` zero,
    /// scale `1/rank`. Since `B = 0`, adding them leaves the layer's output unchanged.
    pub fn lazy_init(
        count: usize,
        rank: usize,
        d_in: usize,
        d_out: usize,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<LoraAdapters> {
        const OP: &str = "LoraAdapters::lazy_init";
        if count == 0 || rank == 0 || rank > MAX_RANK || d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                OP,
                "rank",
                format!("count, d_in, d_out at least 1 and a rank between 1 and {MAX_RANK}"),
                format!("count={count}, rank={rank}, d_in={d_in}, d_out={d_out}"),
            ));
        }
        let numel = count
            .checked_mul(rank)
            .and_then(|v| v.checked_mul(d_in))
            .ok_or_else(|| Error::invalid(OP, "d_in", "sizes whose product fits in usize", d_in))?;
        let mut normal = NormalStream::new(seed);
        let a: Vec<f32> = (0..numel).map(|_| normal.next()).collect();
        let a = with_float_type!(dtype, OP, "dtype", T => {
            Tensor::from_vec(a.into_iter().map(T::from_f32).collect::<Vec<T>>(), &[count, rank, d_in], device)
        })?;
        let b = Tensor::zeros(&[count, d_out, rank], dtype, device)?;
        LoraAdapters::new(a, b, &vec![rank; count], &vec![1.0 / rank as f32; count])
    }

    /// `A`: (count, max_rank, d_in).
    pub fn a(&self) -> &Tensor {
        &self.a
    }

    /// `B`: (count, d_out, max_rank).
    pub fn b(&self) -> &Tensor {
        &self.b
    }

    /// `A` and `B` for an optimizer to update in place; ops refuse adapters whose tensors no
    /// longer have the shapes, dtype and device they were created with.
    pub fn parameters_mut(&mut self) -> (&mut Tensor, &mut Tensor) {
        (&mut self.a, &mut self.b)
    }

    pub fn count(&self) -> usize {
        self.ranks.len()
    }

    /// The padded rank (0 when `A` was replaced by a tensor of another rank, which ops refuse).
    pub fn max_rank(&self) -> usize {
        self.a.shape().get(1).copied().unwrap_or(0)
    }

    pub fn d_in(&self) -> usize {
        self.a.shape().get(2).copied().unwrap_or(0)
    }

    pub fn d_out(&self) -> usize {
        self.b.shape().get(1).copied().unwrap_or(0)
    }

    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    fn check(&self, op: &'static str, x: &Tensor, d_in: usize, d_out: usize) -> Result<()> {
        self.a.expect_dtype(op, "adapters", &[x.dtype()])?;
        x.device().expect_same(&self.a.device(), op, "adapters")?;
        if self.d_in() != d_in || self.d_out() != d_out {
            return Err(Error::invalid(
                op,
                "adapters",
                format!("adapters for d_in={d_in}, d_out={d_out}"),
                format!("d_in={}, d_out={}", self.d_in(), self.d_out()),
            ));
        }
        self.check_consistent(op)
    }

    /// `parameters_mut` hands out the tensors themselves: checks that they still agree with each
    /// other and with the ranks, which the kernels index by.
    fn check_consistent(&self, op: &'static str) -> Result<()> {
        let (count, max_rank, d_in, d_out) = (self.ranks.len(), self.max_rank(), self.d_in(), self.d_out());
        if self.a.shape() != [count, max_rank, d_in]
            || self.b.shape() != [count, d_out, max_rank]
            || self.b.dtype() != self.a.dtype()
            || self.b.device() != self.a.device()
        {
            return Err(Error::invalid(
                op,
                "adapters",
                format!("A ({count}, r, d_in) and B ({count}, d_out, r) of one dtype and device"),
                format!("A {:?} and B {:?}", self.a, self.b),
            ));
        }
        Ok(())
    }
}

/// Rows per tile of the routing: every tile holds rows of one adapter.
const TILE_ROWS: usize = 16;

/// Which adapter each token row uses, grouped for the kernels: rows ordered by adapter, cut into
/// tiles of at most 16 rows of one adapter, and each adapter's run of rows. Build it once per
/// batch and use it in every LoRA layer of the model.
#[derive(Debug)]
pub struct LoraRouting {
    ids: Vec<u32>,
    /// Rows ordered by adapter (stable).
    order: Vec<u32>,
    /// (adapter, first position in `order`, rows) per tile; read by the kernels only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tiles: Vec<[u32; 3]>,
    /// First position in `order` and row count of adapters 0..=max id.
    segments: Vec<[u32; 2]>,
    device: Device,
    /// `order`, then `tiles`, then `segments`, as u32 words on the GPU.
    #[cfg(feature = "cuda")]
    table: Option<Tensor>,
}

impl LoraRouting {
    /// Row `i` uses adapter `ids[i]`; `ids` is not empty. Ids are checked against the adapters
    /// when the routing is used.
    pub fn per_row(ids: &[u32], device: &Device) -> Result<LoraRouting> {
        const OP: &str = "LoraRouting::per_row";
        if ids.is_empty() || ids.len() > i32::MAX as usize {
            return Err(Error::invalid(OP, "ids", "between 1 and 2^31 - 1 rows", ids.len()));
        }
        let max_id = ids.iter().copied().max().unwrap_or(0) as usize;
        if max_id >= MAX_ADAPTERS {
            return Err(Error::invalid(
                OP,
                "ids",
                format!("adapter ids below {MAX_ADAPTERS} (MAX_ADAPTERS)"),
                max_id,
            ));
        }
        let mut counts = vec![0u32; max_id + 1];
        for &id in ids {
            counts[id as usize] += 1;
        }
        let mut segments = Vec::with_capacity(max_id + 1);
        let mut start = 0u32;
        for &c in &counts {
            segments.push([start, c]);
            start += c;
        }
        let mut next: Vec<u32> = segments.iter().map(|s| s[0]).collect();
        let mut order = vec![0u32; ids.len()];
        for (row, &id) in ids.iter().enumerate() {
            order[next[id as usize] as usize] = row as u32;
            next[id as usize] += 1;
        }
        let mut tiles = Vec::new();
        for (adapter, &[start, count]) in segments.iter().enumerate() {
            let mut offset = 0;
            while offset < count {
                let rows = (count - offset).min(TILE_ROWS as u32);
                tiles.push([adapter as u32, start + offset, rows]);
                offset += rows;
            }
        }
        #[cfg(feature = "cuda")]
        let table = match device {
            Device::Cpu => None,
            device => {
                let mut words = order.clone();
                words.extend(tiles.iter().flatten());
                words.extend(segments.iter().flatten());
                let len = words.len();
                Some(Tensor::from_vec(words, &[len], device)?)
            }
        };
        Ok(LoraRouting {
            ids: ids.to_vec(),
            order,
            tiles,
            segments,
            device: device.clone(),
            #[cfg(feature = "cuda")]
            table,
        })
    }

    /// Sequence `i` of `seq_len` rows (rows `i·seq_len ..`) uses adapter `ids[i]`.
    pub fn per_sequence(ids: &[u32], seq_len: usize, device: &Device) -> Result<LoraRouting> {
        if seq_len == 0
            || ids
                .len()
                .checked_mul(seq_len)
                .is_none_or(|rows| rows > i32::MAX as usize)
        {
            return Err(Error::invalid(
                "LoraRouting::per_sequence",
                "seq_len",
                "at least 1, with fewer than 2^31 rows in all",
                format!("{} sequences of {seq_len}", ids.len()),
            ));
        }
        let rows: Vec<u32> = ids.iter().flat_map(|&id| std::iter::repeat_n(id, seq_len)).collect();
        LoraRouting::per_row(&rows, device)
    }

    /// Every one of `rows` rows uses adapter `adapter`.
    pub fn single(rows: usize, adapter: u32, device: &Device) -> Result<LoraRouting> {
        LoraRouting::per_row(&vec![adapter; rows], device)
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The adapter of every row, when all rows use the same one.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn uniform(&self) -> Option<usize> {
        let first = self.ids[0];
        self.ids.iter().all(|&id| id == first).then_some(first as usize)
    }

    fn check(&self, op: &'static str, x: &Tensor, m: usize, adapters: &LoraAdapters) -> Result<()> {
        x.device().expect_same(&self.device, op, "routing")?;
        if self.rows() != m {
            return Err(Error::invalid(
                op,
                "routing",
                format!("an adapter id for each of the {m} rows"),
                format!("{} ids", self.rows()),
            ));
        }
        let max_id = self.segments.len() - 1;
        if max_id >= adapters.count() {
            return Err(Error::invalid(
                op,
                "routing",
                format!("adapter ids below the adapter count {}", adapters.count()),
                format!("id {max_id}"),
            ));
        }
        Ok(())
    }
}

/// Checks `x` (m, d_in), the base, bias, adapters and routing; returns (m, d_in, d_out).
fn check_forward(
    op: &'static str,
    x: &Tensor,
    base: &LoraBase,
    bias: Option<&Tensor>,
    adapters: &LoraAdapters,
    routing: &LoraRouting,
) -> Result<(usize, usize, usize)> {
    x.expect_rank(op, "x", 2)?;
    x.expect_dtype(op, "x", &[DType::F32, DType::BF16, DType::F16])?;
    let m = x.shape()[0];
    let (d_out, d_in) = base.check(op, x)?;
    if x.shape()[1] != d_in || m == 0 || m > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            "x",
            format!("shape (m, {d_in}) with 1 <= m < 2^31, to match the base"),
            format!("shape {:?}", x.shape()),
        ));
    }
    if let Some(bias) = bias {
        bias.expect_dtype(op, "bias", &[x.dtype()])?;
        bias.expect_shape(op, "bias", &[d_out])?;
        x.device().expect_same(&bias.device(), op, "bias")?;
    }
    adapters.check(op, x, d_in, d_out)?;
    routing.check(op, x, m, adapters)?;
    Ok((m, d_in, d_out))
}

/// `Y = X·Wᵀ + s_a·(X·A_aᵀ)·B_aᵀ (+ bias)`, row `i` using adapter `a = routing.ids()[i]`.
pub fn lora_forward(
    x: &Tensor,
    base: LoraBase,
    bias: Option<&Tensor>,
    adapters: &LoraAdapters,
    routing: &LoraRouting,
) -> Result<Tensor> {
    let (m, _, d_out) = check_forward(OP, x, &base, bias, adapters, routing)?;
    let mut out = new_output(&[m, d_out], x.dtype(), &x.device())?;
    lora_forward_into(x, base, bias, adapters, routing, &mut out)?;
    Ok(out)
}

/// [`lora_forward`] into an existing `out` (m, d_out).
pub fn lora_forward_into(
    x: &Tensor,
    base: LoraBase,
    bias: Option<&Tensor>,
    adapters: &LoraAdapters,
    routing: &LoraRouting,
    out: &mut Tensor,
) -> Result<()> {
    let (m, d_in, d_out) = check_forward(OP, x, &base, bias, adapters, routing)?;
    out.expect_dtype(OP, "out", &[x.dtype()])?;
    out.expect_shape(OP, "out", &[m, d_out])?;
    x.device().expect_same(&out.device(), OP, "out")?;
    let dims = Dims { m, d_in, d_out };
    match x.device() {
        Device::Cpu => cpu::forward(dims, x, base, bias, adapters, routing, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(dims, x, base, bias, adapters, routing, out),
    }
}

/// Gradients of [`lora_forward`].
#[derive(Debug)]
pub struct LoraGrads {
    /// (m, d_in): `dY·W + s·(dY·B)·A`, per row's adapter; over a sparse base `dY·W_dp` in place
    /// of `dY·W` (SLoPe's double-pruned input gradient, §2.3).
    pub d_x: Tensor,
    /// Shaped like the adapters' `A`: `s_a·(dY·B_a)ᵀ·X` over adapter `a`'s rows; zero for padded
    /// ranks and for adapters no row uses.
    pub d_a: Tensor,
    /// Shaped like `B`: `s_a·dYᵀ·(X·A_aᵀ)` over adapter `a`'s rows; zero where `d_a` is.
    pub d_b: Tensor,
    /// When asked for (a trainable base): over a dense base `dYᵀ·X` (d_out, d_in) in the input's
    /// dtype; over a sparse base `dYᵀ·X` at the kept positions of `W_s` only, f32 in the layout
    /// of its values (d_out, d_in/2), what [`sparse_linear_backward`](crate::ops::sparse_linear_backward)
    /// gives for SLoPe's sparse AdamW.
    pub d_w: Option<Tensor>,
}

/// The operand `G` of the base's part of the input gradient, `dX = dY·G`: the dense weight, or
/// a sparse base's double-pruned transpose `W_dpᵀ` (so that `dY·G` is its sparse GEMM).
#[derive(Clone, Copy, Debug)]
enum InputGradient<'a> {
    Dense(&'a Tensor),
    Sparse(&'a Sparse24),
}

/// The backward of [`lora_forward`] given `d_y` (m, d_out) and the forward's input `x` (or its
/// VeLoRA rebuild, see [`Velora::rebuild`]); `X·Aᵀ` is recomputed, not saved.
pub fn lora_backward(
    d_y: &Tensor,
    x: &Tensor,
    base: LoraBase,
    adapters: &LoraAdapters,
    routing: &LoraRouting,
    base_gradient: bool,
) -> Result<LoraGrads> {
    const OP: &str = "lora_backward";
    let (m, d_in, d_out) = check_forward(OP, x, &base, None, adapters, routing)?;
    d_y.expect_dtype(OP, "d_y", &[x.dtype()])?;
    d_y.expect_shape(OP, "d_y", &[m, d_out])?;
    x.device().expect_same(&d_y.device(), OP, "d_y")?;
    let computed;
    let input_gradient = match base {
        LoraBase::Dense(w) => InputGradient::Dense(w),
        LoraBase::Sparse24(_, Some(t)) => InputGradient::Sparse(t),
        LoraBase::Sparse24(w, None) => {
            computed = double_prune_for(OP, w)?;
            InputGradient::Sparse(&computed)
        }
    };
    let device = x.device();
    let mut grads = LoraGrads {
        d_x: new_output(&[m, d_in], x.dtype(), &device)?,
        d_a: new_output(adapters.a.shape(), x.dtype(), &device)?,
        d_b: new_output(adapters.b.shape(), x.dtype(), &device)?,
        d_w: None,
    };
    let dims = Dims { m, d_in, d_out };
    match device {
        Device::Cpu => cpu::backward(dims, d_y, x, input_gradient, adapters, routing, &mut grads)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(dims, d_y, x, input_gradient, adapters, routing, &mut grads)?,
    }
    if base_gradient {
        grads.d_w = Some(match base {
            LoraBase::Dense(_) => matmul(
                d_y,
                x,
                None,
                MatmulOptions {
                    trans_a: true,
                    ..Default::default()
                },
            )?,
            LoraBase::Sparse24(w, _) => sparse::sparse24_weight_grad(d_y, x, w)?,
        });
    }
    Ok(grads)
}

fn check_merge(op: &'static str, w: &Tensor, adapters: &LoraAdapters, adapter: usize) -> Result<()> {
    adapters.check_consistent(op)?;
    w.expect_rank(op, "w", 2)?;
    w.expect_dtype(op, "w", &[adapters.a.dtype()])?;
    w.expect_shape(op, "w", &[adapters.d_out(), adapters.d_in()])?;
    w.device().expect_same(&adapters.a.device(), op, "adapters")?;
    if adapter >= adapters.count() {
        return Err(Error::invalid(
            op,
            "adapter",
            format!("an adapter index below {}", adapters.count()),
            adapter,
        ));
    }
    Ok(())
}

/// `W += s_a·B_a·A_a`, computed in f32 from W's value and rounded once: afterwards a plain
/// linear layer with `W` gives what the adapter gave.
pub fn lora_merge(w: &mut Tensor, adapters: &LoraAdapters, adapter: usize) -> Result<()> {
    check_merge("lora_merge", w, adapters, adapter)?;
    merge(w, adapters, adapter, 1.0)
}

/// `W -= s_a·B_a·A_a`: undoes [`lora_merge`] up to the dtype's rounding of each step.
pub fn lora_unmerge(w: &mut Tensor, adapters: &LoraAdapters, adapter: usize) -> Result<()> {
    check_merge("lora_unmerge", w, adapters, adapter)?;
    merge(w, adapters, adapter, -1.0)
}

/// A dense copy of the base with adapter `adapter` merged, `W + s_a·B_a·A_a` (d_out, d_in) in
/// the base's dtype, computed as [`lora_merge`] does. This is how an adapter merges into a sparse
/// base: adding the dense `B_a·A_a` to `W_s` would break its 2:4 pattern, so `W_s` is never
/// changed; the merged weight is the decompressed `W_s` plus the adapter, dense, and undoing the
/// merge is dropping the copy (`W_s` still holds the base).
pub fn lora_merged_weight(base: LoraBase, adapters: &LoraAdapters, adapter: usize) -> Result<Tensor> {
    const OP: &str = "lora_merged_weight";
    let mut w = match base {
        LoraBase::Dense(w) => {
            check_merge(OP, w, adapters, adapter)?;
            w.to_device(&w.device())?
        }
        LoraBase::Sparse24(w, _) => {
            adapters.check_consistent(OP)?;
            if w.dtype() != adapters.a.dtype() || w.rows() != adapters.d_out() || w.cols() != adapters.d_in() {
                return Err(Error::invalid(
                    OP,
                    "base",
                    format!(
                        "a {}x{} {} weight, as the adapters are",
                        adapters.d_out(),
                        adapters.d_in(),
                        adapters.a.dtype()
                    ),
                    format!("{}x{} {}", w.rows(), w.cols(), w.dtype()),
                ));
            }
            w.device().expect_same(&adapters.a.device(), OP, "adapters")?;
            if adapter >= adapters.count() {
                return Err(Error::invalid(
                    OP,
                    "adapter",
                    format!("an adapter index below {}", adapters.count()),
                    adapter,
                ));
            }
            sparse24_decompress(w)?
        }
    };
    merge(&mut w, adapters, adapter, 1.0)?;
    Ok(w)
}

fn merge(w: &mut Tensor, adapters: &LoraAdapters, adapter: usize, sign: f32) -> Result<()> {
    match w.device() {
        Device::Cpu => cpu::merge(w, adapters, adapter, sign),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::merge(w, adapters, adapter, sign),
    }
}

/// VeLoRA (§6): the input of a linear layer saved as one scalar per sub-token, its projection on a
/// fixed unit vector `v` of length `D/groups`, and rebuilt as `z·v` for the weight gradient.
#[derive(Debug)]
pub struct Velora {
    groups: usize,
    /// f32, (D/groups), unit norm, on the layer's device.
    v: Tensor,
}

impl Velora {
    /// The default initialisation, `batch_average_once`: `v` is the normalised mean of all
    /// sub-tokens of the first batch `x` (n, D), which `groups` must divide.
    pub fn batch_average_once(x: &Tensor, groups: usize) -> Result<Velora> {
        const OP: &str = "Velora::batch_average_once";
        let (n, dim) = velora_shape(OP, x, groups)?;
        let sub = dim / groups;
        let values: Vec<f32> = with_float_type!(x.dtype(), OP, "x", T => {
            x.to_vec::<T>().map(|v| v.into_iter().map(|e| e.to_f32()).collect())
        })?;
        let mut mean = vec![0.0f64; sub];
        for chunk in values.chunks_exact(sub) {
            for (acc, &e) in mean.iter_mut().zip(chunk) {
                *acc += e as f64;
            }
        }
        let count = (n * groups) as f64;
        mean.iter_mut().for_each(|e| *e /= count);
        let norm = mean.iter().map(|e| e * e).sum::<f64>().sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(Error::invalid(
                OP,
                "x",
                "sub-tokens whose mean is a finite non-zero vector",
                format!("a mean of norm {norm}"),
            ));
        }
        let v: Vec<f32> = mean.iter().map(|e| (e / norm) as f32).collect();
        Ok(Velora {
            groups,
            v: Tensor::from_vec(v, &[sub], &x.device())?,
        })
    }

    /// An explicit projection vector `v` (f32, length D/groups, non-zero), normalised here.
    pub fn from_vector(v: &[f32], groups: usize, device: &Device) -> Result<Velora> {
        const OP: &str = "Velora::from_vector";
        let norm = v.iter().map(|&e| (e as f64) * (e as f64)).sum::<f64>().sqrt();
        if groups == 0 || v.is_empty() || !(norm.is_finite() && norm > 0.0) {
            return Err(Error::invalid(
                OP,
                "v",
                "a finite non-zero vector and at least one group",
                format!("{} values of norm {norm}, {groups} groups", v.len()),
            ));
        }
        let v: Vec<f32> = v.iter().map(|&e| (e as f64 / norm) as f32).collect();
        let len = v.len();
        Ok(Velora {
            groups,
            v: Tensor::from_vec(v, &[len], device)?,
        })
    }

    /// The projection vector (f32, unit norm).
    pub fn vector(&self) -> &Tensor {
        &self.v
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// `z[n, g] = ⟨x[n, g·D' .. (g+1)·D'], v⟩`: (n, groups) in x's dtype, f32 sums.
    pub fn compress(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "Velora::compress";
        let (n, dim) = velora_shape(OP, x, self.groups)?;
        self.check_vector(OP, "x", x, dim)?;
        let mut z = new_output(&[n, self.groups], x.dtype(), &x.device())?;
        match x.device() {
            Device::Cpu => cpu::velora(x, &self.v, &mut z, true)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => cuda::velora(x, &self.v, &mut z, n, dim, true)?,
        }
        Ok(z)
    }

    /// `x̂[n, g·D' + u] = z[n, g]·v[u]`: (n, D) in z's dtype.
    pub fn rebuild(&self, z: &Tensor) -> Result<Tensor> {
        const OP: &str = "Velora::rebuild";
        z.expect_rank(OP, "z", 2)?;
        z.expect_dtype(OP, "z", &[DType::F32, DType::BF16, DType::F16])?;
        let n = z.shape()[0];
        if z.shape()[1] != self.groups || n == 0 || n > i32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "z",
                format!("shape (n >= 1, {})", self.groups),
                format!("shape {:?}", z.shape()),
            ));
        }
        let dim = self.groups * self.v.numel();
        self.check_vector(OP, "z", z, dim)?;
        let mut x = new_output(&[n, dim], z.dtype(), &z.device())?;
        match z.device() {
            Device::Cpu => cpu::velora(z, &self.v, &mut x, false)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => cuda::velora(z, &self.v, &mut x, n, dim, false)?,
        }
        Ok(x)
    }

    /// Bytes of the saved input of `tokens` rows of width `dim` in `dtype`: (uncompressed,
    /// compressed). The compressed form keeps `groups` values per row instead of `dim`.
    pub fn saved_bytes(&self, tokens: usize, dim: usize, dtype: DType) -> (usize, usize) {
        let size = dtype.size_in_bytes();
        (tokens * dim * size, tokens * self.groups * size)
    }

    fn check_vector(&self, op: &'static str, arg: &'static str, t: &Tensor, dim: usize) -> Result<()> {
        t.device().expect_same(&self.v.device(), op, "v")?;
        if self.groups * self.v.numel() != dim {
            return Err(Error::invalid(
                op,
                arg,
                format!(
                    "rows of {} values ({} groups of {})",
                    self.groups * self.v.numel(),
                    self.groups,
                    self.v.numel()
                ),
                format!("rows of {dim}"),
            ));
        }
        Ok(())
    }
}

fn velora_shape(op: &'static str, x: &Tensor, groups: usize) -> Result<(usize, usize)> {
    x.expect_rank(op, "x", 2)?;
    x.expect_dtype(op, "x", &[DType::F32, DType::BF16, DType::F16])?;
    let (n, dim) = (x.shape()[0], x.shape()[1]);
    if n == 0 || dim == 0 || n > i32::MAX as usize || dim > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            "x",
            "a non-empty (n, D) below 2^31",
            format!("shape {:?}", x.shape()),
        ));
    }
    if groups == 0 || !dim.is_multiple_of(groups) {
        return Err(Error::invalid(
            op,
            "groups",
            format!("a divisor of the width D = {dim}"),
            groups,
        ));
    }
    Ok((n, dim))
}

/// A seeded stream of N(0, 1) samples: splitmix64 words through Box-Muller, the same on every
/// machine.
struct NormalStream {
    state: u64,
    spare: Option<f32>,
}

impl NormalStream {
    fn new(seed: u64) -> NormalStream {
        NormalStream {
            state: seed,
            spare: None,
        }
    }

    fn word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform in (0, 1], never 0 so that its logarithm is finite.
    fn uniform(&mut self) -> f64 {
        ((self.word() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f32 {
        if let Some(value) = self.spare.take() {
            return value;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((radius * angle.sin()) as f32);
        (radius * angle.cos()) as f32
    }
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    m: usize,
    d_in: usize,
    d_out: usize,
}

mod cpu {
    use super::*;
    use rayon::prelude::*;

    fn widen<T: Float>(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.host_slice::<T>()?.iter().map(|&v| v.to_f32()).collect())
    }

    fn store<T: Float>(t: &mut Tensor, values: &[f32]) -> Result<()> {
        for (dst, &v) in t.host_slice_mut::<T>()?.iter_mut().zip(values) {
            *dst = T::from_f32(v);
        }
        Ok(())
    }

    /// `op(a)·op(b)` of f32 host data through the CPU matmul.
    fn product(
        a: Vec<f32>,
        a_shape: [usize; 2],
        b: Vec<f32>,
        b_shape: [usize; 2],
        options: MatmulOptions,
    ) -> Result<Vec<f32>> {
        let a = Tensor::from_vec(a, &a_shape, &Device::Cpu)?;
        let b = Tensor::from_vec(b, &b_shape, &Device::Cpu)?;
        matmul(&a, &b, None, options)?.to_vec::<f32>()
    }

    /// Adapter views of one adapter: `A[a]` rows of d_in and `B[a]` rows of max_rank.
    struct Adapter<'s> {
        a: &'s [f32],
        b: &'s [f32],
        rank: usize,
        scale: f32,
    }

    struct Widened {
        a: Vec<f32>,
        b: Vec<f32>,
        max_rank: usize,
    }

    impl Widened {
        fn new<T: Float>(adapters: &LoraAdapters) -> Result<Widened> {
            Ok(Widened {
                a: widen::<T>(&adapters.a)?,
                b: widen::<T>(&adapters.b)?,
                max_rank: adapters.max_rank(),
            })
        }

        fn get<'s>(&'s self, adapters: &LoraAdapters, d: Dims, index: usize) -> Adapter<'s> {
            let (ra, rb) = (self.max_rank * d.d_in, d.d_out * self.max_rank);
            Adapter {
                a: &self.a[index * ra..(index + 1) * ra],
                b: &self.b[index * rb..(index + 1) * rb],
                rank: adapters.ranks[index],
                scale: adapters.scales[index],
            }
        }
    }

    /// `t[j] = Σ_k x[k]·A[j, k]` for j below the rank.
    fn shrink(x: &[f32], adapter: &Adapter, d_in: usize) -> Vec<f32> {
        (0..adapter.rank)
            .map(|j| {
                let row = &adapter.a[j * d_in..(j + 1) * d_in];
                row.iter().zip(x).map(|(a, x)| a * x).sum()
            })
            .collect()
    }

    fn forward_typed<T: Float>(
        d: Dims,
        x: &Tensor,
        base: LoraBase,
        bias: Option<&Tensor>,
        adapters: &LoraAdapters,
        routing: &LoraRouting,
        out: &mut Tensor,
    ) -> Result<()> {
        let xs = widen::<T>(x)?;
        let mut y = match base {
            LoraBase::Dense(w) => product(
                xs.clone(),
                [d.m, d.d_in],
                widen::<T>(w)?,
                [d.d_out, d.d_in],
                MatmulOptions::linear(),
            )?,
            LoraBase::Sparse24(w, _) => sparse::sparse24_product_f32(&xs, w)?,
        };
        let bias = bias.map(widen::<T>).transpose()?;
        let widened = Widened::new::<T>(adapters)?;
        let max_rank = widened.max_rank;
        y.par_chunks_mut(d.d_out).enumerate().for_each(|(i, y)| {
            let adapter = widened.get(adapters, d, routing.ids[i] as usize);
            let t = shrink(&xs[i * d.d_in..(i + 1) * d.d_in], &adapter, d.d_in);
            for (o, y) in y.iter_mut().enumerate() {
                let b = &adapter.b[o * max_rank..o * max_rank + adapter.rank];
                let lora: f32 = b.iter().zip(&t).map(|(b, t)| b * t).sum();
                *y += adapter.scale * lora + bias.as_ref().map_or(0.0, |bias| bias[o]);
            }
        });
        store::<T>(out, &y)
    }

    pub(super) fn forward(
        d: Dims,
        x: &Tensor,
        base: LoraBase,
        bias: Option<&Tensor>,
        adapters: &LoraAdapters,
        routing: &LoraRouting,
        out: &mut Tensor,
    ) -> Result<()> {
        with_float_type!(x.dtype(), OP, "x", T => forward_typed::<T>(d, x, base, bias, adapters, routing, out))
    }

    fn backward_typed<T: Float>(
        d: Dims,
        d_y: &Tensor,
        x: &Tensor,
        input_gradient: InputGradient,
        adapters: &LoraAdapters,
        routing: &LoraRouting,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let xs = widen::<T>(x)?;
        let dys = widen::<T>(d_y)?;
        let widened = Widened::new::<T>(adapters)?;
        let max_rank = widened.max_rank;
        // Per row: t = A·x and u = Bᵀ·dy (rank values each, padded to max_rank with zeros).
        let mut t = vec![0.0f32; d.m * max_rank];
        let mut u = vec![0.0f32; d.m * max_rank];
        t.par_chunks_mut(max_rank)
            .zip(u.par_chunks_mut(max_rank))
            .enumerate()
            .for_each(|(i, (t, u))| {
                let adapter = widened.get(adapters, d, routing.ids[i] as usize);
                let row = shrink(&xs[i * d.d_in..(i + 1) * d.d_in], &adapter, d.d_in);
                t[..adapter.rank].copy_from_slice(&row);
                let dy = &dys[i * d.d_out..(i + 1) * d.d_out];
                for (j, u) in u.iter_mut().enumerate().take(adapter.rank) {
                    *u = dy
                        .iter()
                        .enumerate()
                        .map(|(o, dy)| dy * adapter.b[o * max_rank + j])
                        .sum();
                }
            });
        let mut d_x = match input_gradient {
            InputGradient::Dense(w) => product(
                dys.clone(),
                [d.m, d.d_out],
                widen::<T>(w)?,
                [d.d_out, d.d_in],
                MatmulOptions::default(),
            )?,
            InputGradient::Sparse(w_dp_t) => sparse::sparse24_product_f32(&dys, w_dp_t)?,
        };
        d_x.par_chunks_mut(d.d_in).enumerate().for_each(|(i, d_x)| {
            let adapter = widened.get(adapters, d, routing.ids[i] as usize);
            let u = &u[i * max_rank..i * max_rank + adapter.rank];
            for (j, &u) in u.iter().enumerate() {
                let a = &adapter.a[j * d.d_in..(j + 1) * d.d_in];
                for (dx, a) in d_x.iter_mut().zip(a) {
                    *dx += adapter.scale * u * a;
                }
            }
        });
        store::<T>(&mut grads.d_x, &d_x)?;
        // Per adapter, sums over its rows in row order: deterministic.
        let (ra, rb) = (max_rank * d.d_in, d.d_out * max_rank);
        let mut d_a = vec![0.0f32; adapters.count() * ra];
        let mut d_b = vec![0.0f32; adapters.count() * rb];
        d_a.par_chunks_mut(ra)
            .zip(d_b.par_chunks_mut(rb))
            .enumerate()
            .for_each(|(index, (d_a, d_b))| {
                let Some(&[start, count]) = routing.segments.get(index) else {
                    return;
                };
                let (rank, scale) = (adapters.ranks[index], adapters.scales[index]);
                for &row in &routing.order[start as usize..(start + count) as usize] {
                    let row = row as usize;
                    let x = &xs[row * d.d_in..(row + 1) * d.d_in];
                    let dy = &dys[row * d.d_out..(row + 1) * d.d_out];
                    for j in 0..rank {
                        let u = scale * u[row * max_rank + j];
                        for (g, x) in d_a[j * d.d_in..(j + 1) * d.d_in].iter_mut().zip(x) {
                            *g += u * x;
                        }
                        let t = scale * t[row * max_rank + j];
                        for (o, dy) in dy.iter().enumerate() {
                            d_b[o * max_rank + j] += dy * t;
                        }
                    }
                }
            });
        store::<T>(&mut grads.d_a, &d_a)?;
        store::<T>(&mut grads.d_b, &d_b)
    }

    pub(super) fn backward(
        d: Dims,
        d_y: &Tensor,
        x: &Tensor,
        input_gradient: InputGradient,
        adapters: &LoraAdapters,
        routing: &LoraRouting,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        with_float_type!(x.dtype(), OP, "x", T => backward_typed::<T>(d, d_y, x, input_gradient, adapters, routing, grads))
    }

    fn merge_typed<T: Float>(w: &mut Tensor, adapters: &LoraAdapters, index: usize, sign: f32) -> Result<()> {
        let d = Dims {
            m: 0,
            d_in: adapters.d_in(),
            d_out: adapters.d_out(),
        };
        let widened = Widened::new::<T>(adapters)?;
        let adapter = widened.get(adapters, d, index);
        let max_rank = widened.max_rank;
        w.host_slice_mut::<T>()?
            .par_chunks_mut(d.d_in)
            .enumerate()
            .for_each(|(o, row)| {
                let b = &adapter.b[o * max_rank..o * max_rank + adapter.rank];
                for (k, w) in row.iter_mut().enumerate() {
                    let delta: f32 = b.iter().enumerate().map(|(j, b)| b * adapter.a[j * d.d_in + k]).sum();
                    *w = T::from_f32(w.to_f32() + sign * adapter.scale * delta);
                }
            });
        Ok(())
    }

    pub(super) fn merge(w: &mut Tensor, adapters: &LoraAdapters, index: usize, sign: f32) -> Result<()> {
        with_float_type!(w.dtype(), OP, "w", T => merge_typed::<T>(w, adapters, index, sign))
    }

    fn velora_typed<T: Float>(input: &Tensor, v: &Tensor, out: &mut Tensor, compress: bool) -> Result<()> {
        let v = v.host_slice::<f32>()?;
        let sub = v.len();
        if compress {
            let x = input.host_slice::<T>()?;
            for (z, chunk) in out.host_slice_mut::<T>()?.iter_mut().zip(x.chunks_exact(sub)) {
                let dot: f32 = chunk.iter().zip(v).map(|(x, v)| x.to_f32() * v).sum();
                *z = T::from_f32(dot);
            }
        } else {
            let z = input.host_slice::<T>()?;
            for (chunk, z) in out.host_slice_mut::<T>()?.chunks_exact_mut(sub).zip(z) {
                for (x, v) in chunk.iter_mut().zip(v) {
                    *x = T::from_f32(z.to_f32() * v);
                }
            }
        }
        Ok(())
    }

    /// Compress `x` into `z`, or rebuild `x̂` (into `out`) from `z` (`input`).
    pub(super) fn velora(input: &Tensor, v: &Tensor, out: &mut Tensor, compress: bool) -> Result<()> {
        with_float_type!(input.dtype(), OP, "x", T => velora_typed::<T>(input, v, out, compress))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::blaslt::{MatmulOperands, MatmulShape};
    use crate::cuda::{CudaBackend, CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::sparse::{sparse_linear_accumulate_into, sparse_linear_forward_into};
    use cudarc::driver::CudaStream;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    /// Must match kernels/lora.cu.
    const SHRINK_WARPS: usize = 8;
    const K_CHUNK: usize = 256;
    const EXPAND_THREADS: usize = 128;
    const GRAD_THREADS: usize = 128;
    const ELEMENTWISE_THREADS: u32 = 256;

    /// Layout shared with `Routing` in kernels/lora.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct RoutingArg {
        order: u64,
        tiles: u64,
        segments: u64,
        segment_count: i32,
        padding: i32,
    }

    /// Layout shared with `AdapterTable` in kernels/lora.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct TableArg {
        ranks: u64,
        count: i32,
        padding: i32,
    }

    // SAFETY: plain #[repr(C)] structs of scalars, laid out as the kernels declare them.
    unsafe impl cudarc::driver::DeviceRepr for RoutingArg {}
    // SAFETY: as above.
    unsafe impl cudarc::driver::DeviceRepr for TableArg {}

    fn routing_arg(routing: &LoraRouting) -> Result<RoutingArg> {
        let table = routing
            .table
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "routing", "a routing built on the GPU", "a host routing"))?;
        let base = table.device_buffer()?.address();
        let order = base;
        let tiles = order + 4 * routing.order.len() as u64;
        let segments = tiles + 12 * routing.tiles.len() as u64;
        Ok(RoutingArg {
            order,
            tiles,
            segments,
            segment_count: routing.segments.len() as i32,
            padding: 0,
        })
    }

    fn table_arg(adapters: &LoraAdapters) -> Result<TableArg> {
        let table = adapters
            .table
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "adapters", "adapters on the GPU", "host adapters"))?;
        Ok(TableArg {
            ranks: table.device_buffer()?.address(),
            count: adapters.count() as i32,
            padding: 0,
        })
    }

    fn backend_of(t: &Tensor) -> Result<Arc<CudaBackend>> {
        Ok(t.device_buffer()?.backend().clone())
    }

    fn address(t: &Tensor) -> Result<u64> {
        Ok(t.device_buffer()?.address())
    }

    fn grid(value: usize, what: &str) -> Result<u32> {
        u32::try_from(value)
            .ok()
            .filter(|&v| v <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "x",
                    "a problem small enough for one launch",
                    format!("{value} {what}"),
                )
            })
    }

    /// A matrix M_a of an adapter tensor: element (j, k) at `adapter·per_adapter + j·j_stride + k·k_stride`.
    struct Strided {
        base: u64,
        per_adapter: i64,
        first: i32,
        second: i32,
    }

    /// The f32 products `Σ_k input[row, k]·M_a[j, k]` of each 256-wide chunk of k, as
    /// `chunks` slices of (m, max_rank), summed in chunk order by the kernels that read them.
    struct Partials {
        _buffer: Tensor,
        address: u64,
        chunks: usize,
    }

    /// Queues the shrink kernel on `stream` (the device's stream, or the side stream bracketed by
    /// events): one block per (tile, chunk of k). The partials are allocated in the device's
    /// stream order before it.
    #[allow(clippy::too_many_arguments)]
    fn shrink(
        backend: &Arc<CudaBackend>,
        stream: &CudaStream,
        dtype: DType,
        input: u64,
        matrix: &Strided,
        routing: &LoraRouting,
        adapters: &LoraAdapters,
        k_len: usize,
    ) -> Result<Partials> {
        let m = routing.rows();
        let chunks = k_len.div_ceil(K_CHUNK);
        if chunks > 65535 {
            return Err(Error::invalid(
                OP,
                "x",
                format!("a reduction of at most {}", 65535 * K_CHUNK),
                k_len,
            ));
        }
        let buffer = scratch(backend, chunks * m * adapters.max_rank())?;
        let partials = Partials {
            address: address(&buffer)?,
            _buffer: buffer,
            chunks,
        };
        if !std::ptr::eq(stream, backend.stream().as_ref()) {
            // The side stream starts after everything queued so far, the allocation included.
            stream.join(backend.stream()).context("ordering the LoRA side stream")?;
        }
        let name = format!("lora_shrink_{}", dtype.name());
        let function = backend.function("lora", &name)?;
        let (routing_arg, table_arg) = (routing_arg(routing)?, table_arg(adapters)?);
        let (m_rows, k_len_arg, padded_rank) = (m as i32, k_len as i32, adapters.max_rank() as i32);
        let mut builder = stream.launch_builder(&function);
        builder
            .arg(&input)
            .arg(&matrix.base)
            .arg(&partials.address)
            .arg(&routing_arg)
            .arg(&table_arg)
            .arg(&m_rows)
            .arg(&k_len_arg)
            .arg(&padded_rank)
            .arg(&matrix.per_adapter)
            .arg(&matrix.first)
            .arg(&matrix.second);
        let launch = LaunchConfig {
            grid_dim: (grid(routing.tiles.len(), "tiles")?, chunks as u32, 1),
            block_dim: ((SHRINK_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes: `input` has m rows of k_len, the routing covers rows 0..m with
        // ids below the adapter count, the matrix strides address inside the adapter tensor, and
        // the partials hold chunks·m·max_rank f32, one block per (tile, chunk).
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(partials)
    }

    /// `out[row, n] = (out[row, n] +) s_a·Σ_j t[row, j]·M_a[n, j] (+ bias[n])`, t summed from the
    /// partials.
    #[allow(clippy::too_many_arguments)]
    fn expand(
        backend: &Arc<CudaBackend>,
        dtype: DType,
        t: &Partials,
        matrix: &Strided,
        bias: u64,
        out: u64,
        accumulate: bool,
        routing: &LoraRouting,
        adapters: &LoraAdapters,
        n_len: usize,
    ) -> Result<()> {
        let column_blocks = n_len.div_ceil(EXPAND_THREADS);
        if column_blocks > 65535 {
            return Err(Error::invalid(
                OP,
                "base",
                format!("at most {} output columns", 65535 * EXPAND_THREADS),
                n_len,
            ));
        }
        let name = format!("lora_expand_{}", dtype.name());
        let function = backend.function("lora", &name)?;
        let (routing_arg, table_arg) = (routing_arg(routing)?, table_arg(adapters)?);
        let (chunks, m_rows, n, padded_rank) = (
            t.chunks as i32,
            routing.rows() as i32,
            n_len as i32,
            adapters.max_rank() as i32,
        );
        let accumulate = accumulate as i32;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&t.address)
            .arg(&chunks)
            .arg(&matrix.base)
            .arg(&bias)
            .arg(&out)
            .arg(&accumulate)
            .arg(&routing_arg)
            .arg(&table_arg)
            .arg(&m_rows)
            .arg(&n)
            .arg(&padded_rank)
            .arg(&matrix.per_adapter)
            .arg(&matrix.first)
            .arg(&matrix.second);
        let launch = LaunchConfig {
            grid_dim: (grid(routing.tiles.len(), "tiles")?, column_blocks as u32, 1),
            block_dim: (EXPAND_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the partials hold chunks·m·max_rank f32 written by `shrink`; `out` has m rows
        // of n_len; the matrix strides address inside the adapter tensor; `bias` is 0 or n_len
        // values.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    /// `g_a[w, j] = s_a·Σ_{rows of a} p[row, w]·q[row, j]` for every adapter (zeros where unused).
    #[allow(clippy::too_many_arguments)]
    fn adapter_grad(
        backend: &Arc<CudaBackend>,
        dtype: DType,
        p: u64,
        q: &Partials,
        g: &Strided,
        routing: &LoraRouting,
        adapters: &LoraAdapters,
        p_len: usize,
    ) -> Result<()> {
        if adapters.count() > 65535 {
            return Err(Error::invalid(
                OP,
                "adapters",
                "at most 65535 adapters in a backward",
                adapters.count(),
            ));
        }
        let name = format!("lora_adapter_grad_{}", dtype.name());
        let function = backend.function("lora", &name)?;
        let (routing_arg, table_arg) = (routing_arg(routing)?, table_arg(adapters)?);
        let (chunks, m_rows, p_len_arg, padded_rank) = (
            q.chunks as i32,
            routing.rows() as i32,
            p_len as i32,
            adapters.max_rank() as i32,
        );
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&p)
            .arg(&q.address)
            .arg(&chunks)
            .arg(&g.base)
            .arg(&routing_arg)
            .arg(&table_arg)
            .arg(&m_rows)
            .arg(&p_len_arg)
            .arg(&padded_rank)
            .arg(&g.per_adapter)
            .arg(&g.first)
            .arg(&g.second);
        let launch = LaunchConfig {
            grid_dim: (
                grid(p_len.div_ceil(GRAD_THREADS), "blocks")?,
                adapters.count() as u32,
                1,
            ),
            block_dim: (GRAD_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `p` has m rows of p_len, the partials hold chunks·m·max_rank f32, `g` is an
        // adapter-shaped gradient the strides address inside; one block row per adapter.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    /// A device scratch of `floats` f32, freed in stream order after the launches using it.
    fn scratch(backend: &Arc<CudaBackend>, floats: usize) -> Result<Tensor> {
        Tensor::uninit_cuda(&[floats], DType::F32, backend)
    }

    fn blas(backend: &Arc<CudaBackend>, shape: MatmulShape, operands: MatmulOperands) -> Result<()> {
        let autotune = backend.matmul_autotune();
        backend.with_blaslt(|blas| blas.matmul(shape, &operands, autotune))
    }

    /// The adapter of a batch whose adapter products go to cuBLASLt: one adapter for every row,
    /// at least [`blas_rows`] rows, of full padded rank (so that its slices of A and B are plain
    /// matrices) and at 256-byte aligned offsets (what cuBLASLt's heuristic assumes).
    fn blas_adapter(d: Dims, adapters: &LoraAdapters, routing: &LoraRouting) -> Option<usize> {
        let a = routing.uniform()?;
        let (r, size) = (adapters.max_rank(), adapters.a.dtype().size_in_bytes());
        let aligned = ((a * r * d.d_in) * size).is_multiple_of(256) && ((a * d.d_out * r) * size).is_multiple_of(256);
        (d.m >= blas_rows() && adapters.ranks[a] == r && aligned).then_some(a)
    }

    /// `out = X·Wᵀ (+ bias) + beta·out`: the dense base product in cuBLASLt.
    fn dense_product(
        backend: &Arc<CudaBackend>,
        d: Dims,
        x: &Tensor,
        w: &Tensor,
        bias: Option<u64>,
        out: u64,
        beta: f32,
    ) -> Result<()> {
        blas(
            backend,
            MatmulShape {
                dtype: x.dtype(),
                out_dtype: x.dtype(),
                m: d.m,
                n: d.d_out,
                k: d.d_in,
                trans_a: false,
                trans_b: true,
                bias: bias.is_some(),
            },
            MatmulOperands {
                a: address(x)?,
                b: address(w)?,
                out,
                bias,
                alpha: 1.0,
                beta,
            },
        )
    }

    /// The base product overwriting `out`: `out = X·Wᵀ (+ bias)`, cuBLASLt for a dense base,
    /// the mma.sp GEMM of kernels/sparse_nm.cu for a sparse one.
    fn base_product(
        backend: &Arc<CudaBackend>,
        d: Dims,
        x: &Tensor,
        base: LoraBase,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()> {
        match base {
            LoraBase::Dense(w) => {
                let bias = bias.map(address).transpose()?;
                dense_product(backend, d, x, w, bias, address(out)?, 0.0)
            }
            LoraBase::Sparse24(w, _) => sparse_linear_forward_into(x, w, bias, out),
        }
    }

    /// A second stream per device for adapter work that overlaps the base GEMM. Every use is
    /// bracketed by events (it waits for the device's stream before, and the device's stream
    /// waits for it after), so buffers stay ordered with the device's stream, where they are
    /// allocated and freed.
    fn side_stream(backend: &Arc<CudaBackend>) -> Result<Arc<CudaStream>> {
        static STREAMS: OnceLock<Mutex<HashMap<usize, Arc<CudaStream>>>> = OnceLock::new();
        let mut streams = STREAMS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(stream) = streams.get(&backend.ordinal()) {
            return Ok(stream.clone());
        }
        let stream = backend.stream().fork().context("creating the LoRA side stream")?;
        streams.insert(backend.ordinal(), stream.clone());
        Ok(stream)
    }

    pub(super) fn forward(
        d: Dims,
        x: &Tensor,
        base: LoraBase,
        bias: Option<&Tensor>,
        adapters: &LoraAdapters,
        routing: &LoraRouting,
        out: &mut Tensor,
    ) -> Result<()> {
        let backend = backend_of(x)?;
        let dtype = x.dtype();
        let size = dtype.size_in_bytes() as u64;
        let r = adapters.max_rank();
        let (x_address, out_address) = (address(x)?, address(out)?);
        match blas_adapter(d, adapters, routing) {
            Some(a) => {
                // T = X·A_aᵀ (m, r) in the input dtype, then the base and s·T·B_aᵀ, all GEMMs.
                let t = Tensor::uninit_cuda(&[d.m, r], dtype, &backend)?;
                let t_address = address(&t)?;
                blas(
                    &backend,
                    MatmulShape {
                        dtype,
                        out_dtype: dtype,
                        m: d.m,
                        n: r,
                        k: d.d_in,
                        trans_a: false,
                        trans_b: true,
                        bias: false,
                    },
                    MatmulOperands {
                        a: x_address,
                        b: address(&adapters.a)? + (a * r * d.d_in) as u64 * size,
                        out: t_address,
                        bias: None,
                        alpha: 1.0,
                        beta: 0.0,
                    },
                )?;
                let expand = |bias: Option<u64>, beta: f32| {
                    blas(
                        &backend,
                        MatmulShape {
                            dtype,
                            out_dtype: dtype,
                            m: d.m,
                            n: d.d_out,
                            k: r,
                            trans_a: false,
                            trans_b: true,
                            bias: bias.is_some(),
                        },
                        MatmulOperands {
                            a: t_address,
                            b: address(&adapters.b)? + (a * d.d_out * r) as u64 * size,
                            out: out_address,
                            bias,
                            alpha: adapters.scales[a],
                            beta,
                        },
                    )
                };
                // out = s·T·B_aᵀ (+ bias), then the base GEMM accumulates onto it: beta = 1 in
                // cuBLASLt, the sparse GEMM's accumulating epilogue.
                match base {
                    LoraBase::Dense(w) => {
                        expand(bias.map(address).transpose()?, 0.0)?;
                        dense_product(&backend, d, x, w, None, out_address, 1.0)
                    }
                    LoraBase::Sparse24(w, _) => {
                        expand(None, 0.0)?;
                        sparse_linear_accumulate_into(x, w, bias, out)
                    }
                }
            }
            _ => {
                // The adapter's shrink runs on the side stream beside the base GEMM (which needs
                // all of the memory bandwidth, while the shrink is latency-bound), then the
                // expand adds s·T·Bᵀ onto the GEMM's output.
                let a_matrix = Strided {
                    base: address(&adapters.a)?,
                    per_adapter: (r * d.d_in) as i64,
                    first: d.d_in as i32,
                    second: 1,
                };
                let side = side_stream(&backend)?;
                let t = shrink(&backend, &side, dtype, x_address, &a_matrix, routing, adapters, d.d_in)?;
                base_product(&backend, d, x, base, bias, out)?;
                backend.stream().join(&side).context("joining the LoRA side stream")?;
                let b_matrix = Strided {
                    base: address(&adapters.b)?,
                    per_adapter: (d.d_out * r) as i64,
                    first: r as i32,
                    second: 1,
                };
                expand(
                    &backend,
                    dtype,
                    &t,
                    &b_matrix,
                    0,
                    out_address,
                    true,
                    routing,
                    adapters,
                    d.d_out,
                )
            }
        }
    }

    pub(super) fn backward(
        d: Dims,
        d_y: &Tensor,
        x: &Tensor,
        input_gradient: InputGradient,
        adapters: &LoraAdapters,
        routing: &LoraRouting,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let backend = backend_of(x)?;
        if let Some(a) = blas_adapter(d, adapters, routing) {
            return backward_blas(&backend, d, d_y, x, input_gradient, adapters, a, grads);
        }
        let dtype = x.dtype();
        let r = adapters.max_rank();
        let (x_address, d_y_address) = (address(x)?, address(d_y)?);
        let a_matrix = Strided {
            base: address(&adapters.a)?,
            per_adapter: (r * d.d_in) as i64,
            first: d.d_in as i32,
            second: 1,
        };
        // B_a read as (j, o): the rank index first.
        let b_by_rank = Strided {
            base: address(&adapters.b)?,
            per_adapter: (d.d_out * r) as i64,
            first: 1,
            second: r as i32,
        };
        let main = backend.stream().clone();
        let t = shrink(&backend, &main, dtype, x_address, &a_matrix, routing, adapters, d.d_in)?;
        let u = shrink(
            &backend,
            &main,
            dtype,
            d_y_address,
            &b_by_rank,
            routing,
            adapters,
            d.d_out,
        )?;
        // dX = s·U·A, then + dY·W (dense) or + dY·W_dp (sparse) from the base.
        let d_x_address = address(&grads.d_x)?;
        let a_by_column = Strided {
            base: a_matrix.base,
            per_adapter: a_matrix.per_adapter,
            first: 1,
            second: d.d_in as i32,
        };
        expand(
            &backend,
            dtype,
            &u,
            &a_by_column,
            0,
            d_x_address,
            false,
            routing,
            adapters,
            d.d_in,
        )?;
        base_input_gradient(&backend, d, d_y, input_gradient, &mut grads.d_x)?;
        // dA[a, j, k] = s·Σ U[row, j]·X[row, k]; dB[a, o, j] = s·Σ dY[row, o]·T[row, j].
        let d_a = Strided {
            base: address(&grads.d_a)?,
            per_adapter: (r * d.d_in) as i64,
            first: 1,
            second: d.d_in as i32,
        };
        adapter_grad(&backend, dtype, x_address, &u, &d_a, routing, adapters, d.d_in)?;
        let d_b = Strided {
            base: address(&grads.d_b)?,
            per_adapter: (d.d_out * r) as i64,
            first: r as i32,
            second: 1,
        };
        adapter_grad(&backend, dtype, d_y_address, &t, &d_b, routing, adapters, d.d_out)
    }

    /// `d_x = dY·G + d_x`: the base's part of the input gradient, accumulating (cuBLASLt with
    /// beta = 1, or the sparse GEMM on `W_dpᵀ` with its accumulating epilogue).
    fn base_input_gradient(
        backend: &Arc<CudaBackend>,
        d: Dims,
        d_y: &Tensor,
        input_gradient: InputGradient,
        d_x: &mut Tensor,
    ) -> Result<()> {
        match input_gradient {
            InputGradient::Dense(w) => blas(
                backend,
                MatmulShape {
                    dtype: d_y.dtype(),
                    out_dtype: d_y.dtype(),
                    m: d.m,
                    n: d.d_in,
                    k: d.d_out,
                    trans_a: false,
                    trans_b: false,
                    bias: false,
                },
                MatmulOperands {
                    a: address(d_y)?,
                    b: address(w)?,
                    out: address(d_x)?,
                    bias: None,
                    alpha: 1.0,
                    beta: 1.0,
                },
            ),
            InputGradient::Sparse(w_dp_t) => sparse_linear_accumulate_into(d_y, w_dp_t, None, d_x),
        }
    }

    /// The backward of one adapter `a` over many rows, every product in cuBLASLt: T = X·A_aᵀ and
    /// U = dY·B_a (m x r, input dtype), dX = s·U·A_a then + dY·W, dA_a = s·Uᵀ·X, dB_a = s·dYᵀ·T;
    /// the other adapters' gradients are zero.
    #[allow(clippy::too_many_arguments)]
    fn backward_blas(
        backend: &Arc<CudaBackend>,
        d: Dims,
        d_y: &Tensor,
        x: &Tensor,
        input_gradient: InputGradient,
        adapters: &LoraAdapters,
        a: usize,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let dtype = x.dtype();
        let size = dtype.size_in_bytes() as u64;
        let (r, s) = (adapters.max_rank(), adapters.scales[a]);
        let a_offset = (a * r * d.d_in) as u64 * size;
        let b_offset = (a * d.d_out * r) as u64 * size;
        let (a_address, b_address) = (address(&adapters.a)? + a_offset, address(&adapters.b)? + b_offset);
        let (x_address, d_y_address) = (address(x)?, address(d_y)?);
        let t = Tensor::uninit_cuda(&[d.m, r], dtype, backend)?;
        let u = Tensor::uninit_cuda(&[d.m, r], dtype, backend)?;
        let (t_address, u_address) = (address(&t)?, address(&u)?);
        let product =
            |m: usize, n: usize, k: usize, trans: (bool, bool), a: u64, b: u64, out: u64, alpha: f32, beta: f32| {
                blas(
                    backend,
                    MatmulShape {
                        dtype,
                        out_dtype: dtype,
                        m,
                        n,
                        k,
                        trans_a: trans.0,
                        trans_b: trans.1,
                        bias: false,
                    },
                    MatmulOperands {
                        a,
                        b,
                        out,
                        bias: None,
                        alpha,
                        beta,
                    },
                )
            };
        product(d.m, r, d.d_in, (false, true), x_address, a_address, t_address, 1.0, 0.0)?;
        product(
            d.m,
            r,
            d.d_out,
            (false, false),
            d_y_address,
            b_address,
            u_address,
            1.0,
            0.0,
        )?;
        let d_x_address = address(&grads.d_x)?;
        product(
            d.m,
            d.d_in,
            r,
            (false, false),
            u_address,
            a_address,
            d_x_address,
            s,
            0.0,
        )?;
        base_input_gradient(backend, d, d_y, input_gradient, &mut grads.d_x)?;
        grads.d_a.fill_bytes(0)?;
        grads.d_b.fill_bytes(0)?;
        product(
            r,
            d.d_in,
            d.m,
            (true, false),
            u_address,
            x_address,
            address(&grads.d_a)? + a_offset,
            s,
            0.0,
        )?;
        product(
            d.d_out,
            r,
            d.m,
            (true, false),
            d_y_address,
            t_address,
            address(&grads.d_b)? + b_offset,
            s,
            0.0,
        )
    }

    fn elementwise_grid(backend: &Arc<CudaBackend>, total: usize) -> u32 {
        total
            .div_ceil(ELEMENTWISE_THREADS as usize)
            .clamp(1, backend.multiprocessors() * 16) as u32
    }

    pub(super) fn merge(w: &mut Tensor, adapters: &LoraAdapters, index: usize, sign: f32) -> Result<()> {
        let backend = backend_of(w)?;
        let dtype = w.dtype();
        let size = dtype.size_in_bytes() as u64;
        let (d_out, d_in, r) = (adapters.d_out(), adapters.d_in(), adapters.max_rank());
        let name = format!("lora_merge_{}", dtype.name());
        let function = backend.function("lora", &name)?;
        let w_address = address(w)?;
        let a_address = address(&adapters.a)? + (index * r * d_in) as u64 * size;
        let b_address = address(&adapters.b)? + (index * d_out * r) as u64 * size;
        let (d_out_arg, d_in_arg, r_arg, rank) = (d_out as i32, d_in as i32, r as i32, adapters.ranks[index] as i32);
        let signed_scale = sign * adapters.scales[index];
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&w_address)
            .arg(&a_address)
            .arg(&b_address)
            .arg(&d_out_arg)
            .arg(&d_in_arg)
            .arg(&r_arg)
            .arg(&rank)
            .arg(&signed_scale);
        let launch = LaunchConfig {
            grid_dim: (elementwise_grid(&backend, d_out * d_in), 1, 1),
            block_dim: (ELEMENTWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `w` is (d_out, d_in) and the adapter offsets address adapter `index` of the
        // validated adapter tensors; the kernel's grid-stride loop stays below d_out·d_in.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    /// Compress (`input` = x (n, D), `out` = z (n, G)) or rebuild (`input` = z, `out` = x̂).
    pub(super) fn velora(
        input: &Tensor,
        v: &Tensor,
        out: &mut Tensor,
        n: usize,
        dim: usize,
        compress: bool,
    ) -> Result<()> {
        let backend = backend_of(input)?;
        let dtype = input.dtype();
        let sub = v.numel();
        let (kind, count) = if compress {
            ("compress", n * (dim / sub))
        } else {
            ("rebuild", n * dim)
        };
        let name = format!("velora_{kind}_{}", dtype.name());
        let function = backend.function("lora", &name)?;
        let (input_address, v_address, out_address) = (address(input)?, address(v)?, address(out)?);
        let (count_arg, sub_arg) = (count as i64, sub as i32);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&input_address)
            .arg(&v_address)
            .arg(&out_address)
            .arg(&count_arg)
            .arg(&sub_arg);
        let launch = LaunchConfig {
            grid_dim: (elementwise_grid(&backend, count), 1, 1),
            block_dim: (ELEMENTWISE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes: x is (n, D), z is (n, D/sub), v has `sub` f32; the kernel's
        // grid-stride loop covers exactly `count` outputs.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
