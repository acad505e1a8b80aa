//! SLTrain (ALGORITHMS.md §5): a linear layer whose weight is a low-rank product plus a sparse
//! matrix on a random support fixed at initialisation, `W = (α/r)·B·A + S`, `Y = X·Wᵀ + b`.
//!
//! `S` is stored compactly: its values `s` (nnz) and their sorted row-major flat indices (u32,
//! `row·d_in + col`), `nnz = floor(δ·d_out·d_in)` drawn uniformly without replacement from a seed
//! and never changed. Forward and backward follow the reference (§5.3): `W` is materialised
//! (cuBLASLt or the CPU GEMM for `c·B·A`, then a scatter-add of `s`), and
//! `G = dYᵀX`, `dX = dY·W`, `dB = c·G·Aᵀ`, `dA = c·Bᵀ·G`, `ds = G[idx]`, `db = Σ_n dY[n,:]`.
//! Initialisation as in the reference code (§5.2): `A` and `s` uniform in ±1/√d_in, `B = 0`, the
//! bias uniform in ±1/√d_out.
//!
//! # A 2:4 support ([`SlTrainSupport::TwoFour`])
//! The support may instead be 2:4 along both dimensions: in every 4×4 block of `W`, two positions
//! in each row and in each column, one of the 90 such patterns drawn per block from the seed
//! (density 1/2, `d_out` and `d_in` multiples of 64). `S` is then exactly a [`Sparse24`] along
//! `d_in`, and `Sᵀ` one along `d_out` (its double-pruned transpose drops nothing), so the sparse
//! product runs on the sparse tensor cores and `W` is never materialised (§5.3's memory-lean
//! form): `Y = c·(X·Aᵀ)·Bᵀ + X·Sᵀ + b`, `dX = c·(dY·B)·A + dY·S`, `dB = c·dYᵀ·(X·Aᵀ)`,
//! `dA = c·(dY·B)ᵀ·X`, `ds` and `db` from the sparse layer's backward (`dYᵀ·X` on the support
//! only). The values `s` are then stored in the compressed format's value order (see
//! [`crate::ops::sparse`]), and the support lists each value's flat index in that order.

use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ops::matmul::{matmul, matmul_into, MatmulOptions};
use crate::ops::sparse::{
    meta_location, sparse24_double_prune, sparse_linear_backward, sparse_linear_forward, stored_index, Sparse24,
    SplitMix64, COL_BLOCK,
};
use crate::tensor::Tensor;

/// One SLTrain layer: trainable `a` (r, d_in), `b` (d_out, r), `s` (nnz) and `bias` (d_out), all
/// of one float dtype on one device, and the fixed support.
pub struct SlTrainLayer {
    pub a: Tensor,
    pub b: Tensor,
    pub s: Tensor,
    pub bias: Option<Tensor>,
    support: Tensor,
    /// With a 2:4 support: the compressed format's metadata of `S` (u32).
    meta: Option<Tensor>,
    d_out: usize,
    d_in: usize,
    rank: usize,
    scale: f32,
}

/// How the sparse support of an [`SlTrainLayer`] is drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlTrainSupport {
    /// `floor(δ·d_out·d_in)` positions uniformly without replacement (the spec's support).
    #[default]
    Random,
    /// 2:4 along both dimensions, drawn per 4×4 block (see the module documentation): density
    /// 1/2, `d_out` and `d_in` multiples of 64, bf16 or f16 on a GPU.
    TwoFour,
}

/// The shape and hyper-parameters of an [`SlTrainLayer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlTrainConfig {
    pub d_out: usize,
    pub d_in: usize,
    pub rank: usize,
    /// δ: the fraction of `W`'s entries on the sparse support.
    pub density: f64,
    /// α; the low-rank product is scaled by α/r.
    pub alpha: f32,
    pub bias: bool,
    pub support: SlTrainSupport,
}

/// The 90 4×4 patterns with two positions in each row and each column, as 4-bit row masks.
fn transposable_patterns() -> Vec<[u8; 4]> {
    let pairs: Vec<u8> = (0u8..16).filter(|m| m.count_ones() == 2).collect();
    let mut patterns = Vec::with_capacity(90);
    for &r0 in &pairs {
        for &r1 in &pairs {
            for &r2 in &pairs {
                for &r3 in &pairs {
                    let rows = [r0, r1, r2, r3];
                    if (0..4).all(|c| rows.iter().filter(|&&r| r >> c & 1 == 1).count() == 2) {
                        patterns.push(rows);
                    }
                }
            }
        }
    }
    patterns
}

/// A 2:4 support in both dimensions drawn from `rng`: the flat index of every value in the
/// compressed format's value order, and the format's metadata.
fn two_four_support(rng: &mut SplitMix64, d_out: usize, d_in: usize) -> (Vec<u32>, Vec<u32>) {
    let patterns = transposable_patterns();
    let half = d_in / 2;
    let mut support = vec![0u32; d_out * half];
    let mut meta = vec![0u32; d_out / 16 * (d_in / COL_BLOCK) * 32];
    for block_row in 0..d_out / 4 {
        for group in 0..d_in / 4 {
            let pattern = patterns[rng.below(patterns.len() as u64) as usize];
            for (r, &mask) in pattern.iter().enumerate() {
                let row = 4 * block_row + r;
                // The two kept columns of this row's group, lower first.
                let lo = mask.trailing_zeros();
                let hi = 7 - mask.leading_zeros();
                for (slot, column) in [lo, hi].into_iter().enumerate() {
                    support[row * half + stored_index(group, slot)] = (row * d_in + 4 * group) as u32 + column;
                }
                let (word, shift) = meta_location(row, group, d_in);
                meta[word] |= (lo | hi << 2) << shift;
            }
        }
    }
    (support, meta)
}

impl SlTrainLayer {
    /// A layer initialised as the spec says, its support and values drawn from `seed`.
    pub fn new(config: SlTrainConfig, dtype: DType, seed: u64, device: &Device) -> Result<SlTrainLayer> {
        const OP: &str = "SlTrainLayer::new";
        let SlTrainConfig {
            d_out,
            d_in,
            rank,
            density,
            alpha,
            bias,
            support: kind,
        } = config;
        let numel = d_out
            .checked_mul(d_in)
            .filter(|&n| n > 0 && n <= u32::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "config.d_out",
                    "a non-empty weight of at most 2^32 - 1 elements",
                    format!("{d_out}x{d_in}"),
                )
            })?;
        if rank == 0 || rank > d_out.min(d_in) {
            return Err(Error::invalid(
                OP,
                "config.rank",
                format!("between 1 and min(d_out, d_in) = {}", d_out.min(d_in)),
                rank,
            ));
        }
        if !(0.0..=1.0).contains(&density) {
            return Err(Error::invalid(OP, "config.density", "a fraction in [0, 1]", density));
        }
        if !alpha.is_finite() {
            return Err(Error::invalid(OP, "config.alpha", "a finite number", alpha));
        }
        if !dtype.is_float() {
            return Err(Error::invalid(OP, "dtype", "f32, bf16 or f16", dtype));
        }
        let mut rng = SplitMix64::new(seed);
        let (support, meta) = match kind {
            SlTrainSupport::Random => {
                let nnz = (density * numel as f64).floor() as usize;
                let mut order: Vec<u32> = (0..numel as u32).collect();
                for i in 0..nnz {
                    let j = i + rng.below((numel - i) as u64) as usize;
                    order.swap(i, j);
                }
                let mut support = order[..nnz].to_vec();
                support.sort_unstable();
                (support, None)
            }
            SlTrainSupport::TwoFour => {
                for (arg, size) in [("config.d_out", d_out), ("config.d_in", d_in)] {
                    if !size.is_multiple_of(COL_BLOCK) {
                        return Err(Error::invalid(OP, arg, "a multiple of 64 for a 2:4 support", size));
                    }
                }
                if density != 0.5 {
                    return Err(Error::invalid(OP, "config.density", "0.5 for a 2:4 support", density));
                }
                if device.is_cuda() && dtype == DType::F32 {
                    return Err(Error::invalid(
                        OP,
                        "dtype",
                        "bf16 or f16 for a 2:4 support on a GPU (the sparse tensor cores take no f32)",
                        dtype,
                    ));
                }
                let (support, meta) = two_four_support(&mut rng, d_out, d_in);
                (support, Some(meta))
            }
        };
        let nnz = support.len();
        let bound_in = 1.0 / (d_in as f64).sqrt();
        let bound_out = 1.0 / (d_out as f64).sqrt();
        let mut draw =
            |len: usize, bound: f64| -> Vec<f32> { (0..len).map(|_| rng.uniform(-bound, bound) as f32).collect() };
        let a = draw(rank * d_in, bound_in);
        let s = draw(nnz, bound_in);
        let bias_values = bias.then(|| draw(d_out, bound_out));
        let to_tensor = |values: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
            with_float_type!(dtype, OP, "dtype", T => Tensor::from_vec(
                values.into_iter().map(T::from_f32).collect::<Vec<T>>(), shape, device))
        };
        Ok(SlTrainLayer {
            a: to_tensor(a, &[rank, d_in])?,
            b: Tensor::zeros(&[d_out, rank], dtype, device)?,
            s: to_tensor(s, &[nnz])?,
            bias: bias_values.map(|b| to_tensor(b, &[d_out])).transpose()?,
            support: Tensor::from_vec(support, &[nnz], device)?,
            meta: meta
                .map(|m| Tensor::from_vec(m.clone(), &[m.len()], device))
                .transpose()?,
            d_out,
            d_in,
            rank,
            scale: alpha / rank as f32,
        })
    }

    /// The support: u32 (nnz) flat indices `row·d_in + col`, sorted (for a 2:4 support, in the
    /// compressed format's value order), one per element of `s`.
    pub fn support(&self) -> &Tensor {
        &self.support
    }

    /// How the support was drawn.
    pub fn support_kind(&self) -> SlTrainSupport {
        if self.meta.is_some() {
            SlTrainSupport::TwoFour
        } else {
            SlTrainSupport::Random
        }
    }

    /// `S` in the compressed 2:4 format (copies of `s` and the metadata), for a 2:4 support.
    fn sparse24(&self, meta: &Tensor) -> Result<Sparse24> {
        let device = self.s.device();
        let values = self.s.to_device(&device)?.reshape(&[self.d_out, self.d_in / 2])?;
        Ok(Sparse24::from_trusted_parts(
            values,
            meta.to_device(&device)?,
            self.d_out,
            self.d_in,
        ))
    }

    pub fn nnz(&self) -> usize {
        self.support.numel()
    }

    /// c = α/r.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    pub fn d_out(&self) -> usize {
        self.d_out
    }

    pub fn d_in(&self) -> usize {
        self.d_in
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Checks the trainable tensors (public fields a caller may have replaced).
    fn check(&self, op: &'static str) -> Result<()> {
        let dtype = self.a.dtype();
        let device = self.support.device();
        let expect = |arg: &'static str, t: &Tensor, shape: &[usize]| -> Result<()> {
            t.expect_dtype(op, arg, &[dtype])?;
            t.expect_shape(op, arg, shape)?;
            device.expect_same(&t.device(), op, arg)
        };
        self.a
            .expect_dtype(op, "layer.a", &[DType::F32, DType::BF16, DType::F16])?;
        expect("layer.a", &self.a, &[self.rank, self.d_in])?;
        expect("layer.b", &self.b, &[self.d_out, self.rank])?;
        expect("layer.s", &self.s, &[self.nnz()])?;
        if let Some(bias) = &self.bias {
            expect("layer.bias", bias, &[self.d_out])?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SlTrainLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SlTrainLayer({}x{}, rank {}, nnz {}, {})",
            self.d_out,
            self.d_in,
            self.rank,
            self.nnz(),
            self.a.dtype()
        )
    }
}

fn check_tokens(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    features: usize,
    layer: &SlTrainLayer,
) -> Result<usize> {
    t.expect_rank(op, arg, 2)?;
    t.expect_dtype(op, arg, &[layer.a.dtype()])?;
    layer.a.device().expect_same(&t.device(), op, arg)?;
    if t.shape()[1] != features || t.shape()[0] == 0 {
        return Err(Error::invalid(
            op,
            arg,
            format!("(tokens >= 1, {features})"),
            format!("shape {:?}", t.shape()),
        ));
    }
    Ok(t.shape()[0])
}

/// The dense weight `W = c·B·A + S`, (d_out, d_in).
pub fn sltrain_weight(layer: &SlTrainLayer) -> Result<Tensor> {
    layer.check("sltrain_weight")?;
    let mut w = matmul(
        &layer.b,
        &layer.a,
        None,
        MatmulOptions {
            alpha: layer.scale,
            ..Default::default()
        },
    )?;
    match w.device() {
        Device::Cpu => {
            with_float_type!(w.dtype(), "sltrain_weight", "layer.a", T => cpu::scatter_add::<T>(&mut w, &layer.s, &layer.support))?
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::flat_kernel("sltrain_scatter_add", &w, &layer.s, &layer.support)?,
    }
    Ok(w)
}

/// `y = x·Wᵀ + bias`, x (tokens, d_in).
pub fn sltrain_forward(x: &Tensor, layer: &SlTrainLayer) -> Result<Tensor> {
    const OP: &str = "sltrain_forward";
    layer.check(OP)?;
    check_tokens(OP, "x", x, layer.d_in, layer)?;
    if let Some(meta) = &layer.meta {
        // X·Sᵀ + b on the sparse tensor cores, then += c·(X·Aᵀ)·Bᵀ.
        let mut y = sparse_linear_forward(x, &layer.sparse24(meta)?, layer.bias.as_ref())?;
        let xa = matmul(x, &layer.a, None, MatmulOptions::linear())?;
        matmul_into(&xa, &layer.b, None, &mut y, accumulate(false, true, layer.scale))?;
        return Ok(y);
    }
    let w = sltrain_weight(layer)?;
    matmul(x, &w, layer.bias.as_ref(), MatmulOptions::linear())
}

/// `out = alpha·op(a)·op(b) + out`.
fn accumulate(trans_a: bool, trans_b: bool, alpha: f32) -> MatmulOptions {
    MatmulOptions {
        trans_a,
        trans_b,
        alpha,
        beta: 1.0,
    }
}

/// The gradients of an SLTrain layer.
#[derive(Debug)]
pub struct SlTrainGrads {
    pub d_x: Tensor,
    pub d_a: Tensor,
    pub d_b: Tensor,
    pub d_s: Tensor,
    /// f32, when the layer has a bias.
    pub d_bias: Option<Tensor>,
}

/// The backward of [`sltrain_forward`]: dy (tokens, d_out), x the forward's input.
pub fn sltrain_backward(dy: &Tensor, x: &Tensor, layer: &SlTrainLayer) -> Result<SlTrainGrads> {
    const OP: &str = "sltrain_backward";
    layer.check(OP)?;
    let m = check_tokens(OP, "dy", dy, layer.d_out, layer)?;
    let m_x = check_tokens(OP, "x", x, layer.d_in, layer)?;
    if m_x != m {
        return Err(Error::invalid(
            OP,
            "x",
            format!("{m} tokens, as dy has"),
            format!("shape {:?}", x.shape()),
        ));
    }
    if let Some(meta) = &layer.meta {
        return backward_two_four(dy, x, layer, meta);
    }
    let w = sltrain_weight(layer)?;
    let g = matmul(
        dy,
        x,
        None,
        MatmulOptions {
            trans_a: true,
            ..Default::default()
        },
    )?;
    let d_x = matmul(dy, &w, None, MatmulOptions::default())?;
    let scaled = |trans_a: bool, trans_b: bool| MatmulOptions {
        trans_a,
        trans_b,
        alpha: layer.scale,
        beta: 0.0,
    };
    let d_b = matmul(&g, &layer.a, None, scaled(false, true))?;
    let d_a = matmul(&layer.b, &g, None, scaled(true, false))?;
    let device = dy.device();
    let mut d_s = match &device {
        Device::Cpu => Tensor::zeros(&[layer.nnz()], dy.dtype(), &device)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => Tensor::uninit_cuda(&[layer.nnz()], dy.dtype(), backend)?,
    };
    let mut d_bias = match layer.bias {
        Some(_) => Some(Tensor::zeros(&[layer.d_out], DType::F32, &device)?),
        None => None,
    };
    match &device {
        Device::Cpu => with_float_type!(dy.dtype(), OP, "dy", T => {
            cpu::gather::<T>(&g, &layer.support, &mut d_s)?;
            if let Some(d_bias) = d_bias.as_mut() {
                cpu::bias_grad::<T>(dy, d_bias)?;
            }
            Ok::<(), Error>(())
        })?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            cuda::flat_kernel("sltrain_gather", &g, &d_s, &layer.support)?;
            if let Some(d_bias) = d_bias.as_mut() {
                cuda::bias_grad(dy, d_bias)?;
            }
        }
    }
    Ok(SlTrainGrads {
        d_x,
        d_a,
        d_b,
        d_s,
        d_bias,
    })
}

/// The backward with a 2:4 support (the module documentation's memory-lean form).
fn backward_two_four(dy: &Tensor, x: &Tensor, layer: &SlTrainLayer, meta: &Tensor) -> Result<SlTrainGrads> {
    let s = layer.sparse24(meta)?;
    // The support is 2:4 along d_out as well: the double-pruned transpose is exactly Sᵀ.
    let s_t = sparse24_double_prune(&s)?;
    let sparse = sparse_linear_backward(dy, x, &s, &s_t, layer.bias.is_some())?;
    let mut d_x = sparse.d_x;
    let c = layer.scale;
    let dy_b = matmul(dy, &layer.b, None, MatmulOptions::default())?;
    matmul_into(&dy_b, &layer.a, None, &mut d_x, accumulate(false, false, c))?;
    let x_a = matmul(x, &layer.a, None, MatmulOptions::linear())?;
    let scaled_t = MatmulOptions {
        trans_a: true,
        alpha: c,
        ..Default::default()
    };
    let d_b = matmul(dy, &x_a, None, scaled_t)?;
    let d_a = matmul(&dy_b, x, None, scaled_t)?;
    // dYᵀ·X on the support, f32 in the values' order, rounded to the layer's dtype.
    let d_values = sparse.d_values.reshape(&[layer.nnz()])?;
    let d_s = match d_values.device() {
        Device::Cpu => with_float_type!(dy.dtype(), "sltrain_backward", "dy", T => cpu::round::<T>(&d_values))?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::round(&d_values, dy.dtype())?,
    };
    Ok(SlTrainGrads {
        d_x,
        d_a,
        d_b,
        d_s,
        d_bias: sparse.d_bias,
    })
}

mod cpu {
    use super::*;

    pub(super) fn round<T: Float>(values: &Tensor) -> Result<Tensor> {
        let rounded: Vec<T> = values.host_slice::<f32>()?.iter().map(|&v| T::from_f32(v)).collect();
        Tensor::from_vec(rounded, values.shape(), &Device::Cpu)
    }

    pub(super) fn scatter_add<T: Float>(w: &mut Tensor, s: &Tensor, support: &Tensor) -> Result<()> {
        let (s, support) = (s.host_slice::<T>()?, support.host_slice::<u32>()?);
        let w = w.host_slice_mut::<T>()?;
        for (&at, &v) in support.iter().zip(s) {
            let at = at as usize;
            w[at] = T::from_f32(w[at].to_f32() + v.to_f32());
        }
        Ok(())
    }

    pub(super) fn gather<T: Float>(g: &Tensor, support: &Tensor, d_s: &mut Tensor) -> Result<()> {
        let (g, support) = (g.host_slice::<T>()?, support.host_slice::<u32>()?);
        for (out, &at) in d_s.host_slice_mut::<T>()?.iter_mut().zip(support) {
            *out = g[at as usize];
        }
        Ok(())
    }

    pub(super) fn bias_grad<T: Float>(dy: &Tensor, d_bias: &mut Tensor) -> Result<()> {
        let n = dy.shape()[1];
        let dy = dy.host_slice::<T>()?;
        let d_bias = d_bias.host_slice_mut::<f32>()?;
        d_bias.fill(0.0);
        for row in dy.chunks(n) {
            for (sum, v) in d_bias.iter_mut().zip(row) {
                *sum += v.to_f32();
            }
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    fn launch(items: usize, multiprocessors: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (items.div_ceil(256).clamp(1, multiprocessors * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `sltrain_scatter_add` (`dense[idx[i]] += flat[i]`) or `sltrain_gather`
    /// (`flat[i] = dense[idx[i]]`), over the support.
    pub(super) fn flat_kernel(kernel: &str, dense: &Tensor, flat: &Tensor, support: &Tensor) -> Result<()> {
        let backend = dense.device_buffer()?.backend().clone();
        let name = format!("{kernel}_{}", dense.dtype().name());
        let function = backend.function("sparse_nm", &name)?;
        let (dense_address, flat_address, support_address) = (
            dense.device_buffer()?.address(),
            flat.device_buffer()?.address(),
            support.device_buffer()?.address(),
        );
        let nnz = support.numel() as i64;
        if nnz == 0 {
            return Ok(());
        }
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&dense_address)
            .arg(&flat_address)
            .arg(&support_address)
            .arg(&nnz);
        // SAFETY: the support holds nnz distinct indices below dense's element count (drawn so
        // at construction, never changed), flat holds nnz elements of dense's dtype.
        unsafe { builder.launch(launch(nnz as usize, backend.multiprocessors())) }
            .context(&format!("launching {name}"))?;
        Ok(())
    }

    /// `values` (f32) rounded to `dtype`.
    pub(super) fn round(values: &Tensor, dtype: DType) -> Result<Tensor> {
        let backend = values.device_buffer()?.backend().clone();
        let out = Tensor::uninit_cuda(values.shape(), dtype, &backend)?;
        let n = values.numel() as i64;
        if n == 0 {
            return Ok(out);
        }
        let name = format!("sltrain_round_{}", dtype.name());
        let function = backend.function("sparse_nm", &name)?;
        let (src, dst) = (values.device_buffer()?.address(), out.device_buffer()?.address());
        let mut builder = backend.launch_builder(&function);
        builder.arg(&src).arg(&dst).arg(&n);
        // SAFETY: `values` holds n f32 and `out` n elements of `dtype`; grid-stride below n.
        unsafe { builder.launch(launch(n as usize, backend.multiprocessors())) }
            .context(&format!("launching {name}"))?;
        Ok(out)
    }

    pub(super) fn bias_grad(dy: &Tensor, d_bias: &mut Tensor) -> Result<()> {
        let backend = dy.device_buffer()?.backend().clone();
        let name = format!("sparse_bias_grad_{}", dy.dtype().name());
        let function = backend.function("sparse_nm", &name)?;
        let (dy_address, bias_address) = (dy.device_buffer()?.address(), d_bias.device_buffer()?.address());
        let (m, n) = (dy.shape()[0] as i64, dy.shape()[1] as i64);
        let mut builder = backend.launch_builder(&function);
        builder.arg(&dy_address).arg(&bias_address).arg(&m).arg(&n);
        // SAFETY: dy is (m, n) and d_bias (n) f32; a block per 32 columns.
        unsafe { builder.launch(crate::ops::sparse::cuda::bias_launch(n as usize)) }
            .context(&format!("launching {name}"))?;
        Ok(())
    }
}
