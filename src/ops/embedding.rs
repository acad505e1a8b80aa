//! Token and learned position embeddings: `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`
//! (the position table is optional: Llama-style models use RoPE instead), and the backward that
//! scatter-adds the output gradient into f32 table gradients, deterministically.
//!
//! Tables and output share one dtype (f32, bf16 or f16); the sum is taken in f32 and rounded
//! once. The backward needs no float atomics: an [`EmbeddingGradPlan`], built on the host from
//! the batch's tokens (which the data loader holds there anyway), groups the positions by token
//! with a stable counting sort, and each token's gradient rows are summed in position order, on
//! both devices alike (the CPU and GPU sums are the same f32 additions in the same order).
//!
//! On the CPU a token outside the vocabulary is an error before anything is written; on a GPU,
//! where checking device tokens would need a synchronisation, its output row is NaN. Plans are
//! validated when built.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::support::{expect_tensor, new_output};
use crate::tensor::Tensor;

const FORWARD: &str = "embedding_forward";
/// The widest embedding the backward takes: 65535 blocks of 256 columns (CUDA's grid y limit).
pub const MAX_WIDTH: usize = 65535 * 256;
const BACKWARD: &str = "embedding_backward";

/// Validates the forward's arguments; returns (batch, seq, vocab, width).
fn check_forward(tokens: &Tensor, wte: &Tensor, wpe: Option<&Tensor>) -> Result<(usize, usize, usize, usize)> {
    tokens.expect_dtype(FORWARD, "tokens", &[DType::U32])?;
    tokens.expect_rank(FORWARD, "tokens", 2)?;
    wte.expect_rank(FORWARD, "wte", 2)?;
    wte.expect_dtype(FORWARD, "wte", &[DType::F32, DType::BF16, DType::F16])?;
    let (batch, seq) = (tokens.shape()[0], tokens.shape()[1]);
    let (vocab, width) = (wte.shape()[0], wte.shape()[1]);
    let device = wte.device();
    device.expect_same(&tokens.device(), FORWARD, "tokens")?;
    if vocab == 0 || width == 0 || vocab > i32::MAX as usize || width > i32::MAX as usize {
        return Err(Error::invalid(
            FORWARD,
            "wte",
            "a (vocab, width) table with both between 1 and 2^31-1",
            format!("shape {:?}", wte.shape()),
        ));
    }
    if batch.checked_mul(seq).is_none_or(|n| n > i32::MAX as usize) {
        return Err(Error::invalid(
            FORWARD,
            "tokens",
            "fewer than 2^31 tokens",
            format!("shape {:?}", tokens.shape()),
        ));
    }
    if let Some(wpe) = wpe {
        wpe.expect_rank(FORWARD, "wpe", 2)?;
        wpe.expect_dtype(FORWARD, "wpe", &[wte.dtype()])?;
        device.expect_same(&wpe.device(), FORWARD, "wpe")?;
        if wpe.shape()[1] != width || wpe.shape()[0] < seq {
            return Err(Error::invalid(
                FORWARD,
                "wpe",
                format!("a (context >= {seq}, {width}) table"),
                format!("shape {:?}", wpe.shape()),
            ));
        }
    }
    if device == Device::Cpu {
        let vocab_u32 = vocab as u32;
        if let Some((n, &t)) = tokens
            .host_slice::<u32>()?
            .iter()
            .enumerate()
            .find(|(_, &t)| t >= vocab_u32)
        {
            return Err(Error::invalid(
                FORWARD,
                "tokens",
                format!("every token below the vocabulary size {vocab}"),
                format!("{t} at index {n}"),
            ));
        }
    }
    Ok((batch, seq, vocab, width))
}

/// The embeddings of `tokens` ((batch, seq) u32) as a new (batch, seq, width) tensor.
pub fn embedding_forward(tokens: &Tensor, wte: &Tensor, wpe: Option<&Tensor>) -> Result<Tensor> {
    let (batch, seq, _, width) = check_forward(tokens, wte, wpe)?;
    let mut out = new_output(&[batch, seq, width], wte.dtype(), &wte.device())?;
    embedding_forward_into(tokens, wte, wpe, &mut out)?;
    Ok(out)
}

/// [`embedding_forward`] into `out`, (batch, seq, width) of the tables' dtype. `wte` is
/// (vocab, width); `wpe`, when given, is (context, width) with context >= seq, and position `t`
/// of every sequence adds its row `t`.
pub fn embedding_forward_into(tokens: &Tensor, wte: &Tensor, wpe: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    let (batch, seq, vocab, width) = check_forward(tokens, wte, wpe)?;
    expect_tensor(FORWARD, "out", out, &[batch, seq, width], wte.dtype(), &wte.device())?;
    match wte.device() {
        Device::Cpu => cpu::forward(tokens, wte, wpe, out, seq, vocab, width),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(tokens, wte, wpe, out, batch * seq, seq, vocab, width),
    }
}

/// A batch's token positions grouped by token, in position order within each group: the order
/// in which [`embedding_backward_into`] sums each token's gradient rows. Built on the host from
/// the same tokens the forward saw; [`EmbeddingGradPlan::update`] refills it for the next batch
/// of the same shape without allocating.
pub struct EmbeddingGradPlan {
    batch: usize,
    seq: usize,
    vocab: usize,
    /// Distinct tokens in the batch.
    segments: usize,
    /// `starts[segments + 1]`, `tokens[segments]`, `positions[batch·seq]` in one u32 array of
    /// capacity `2·batch·seq + 1 + batch·seq` (the unused tail of the first two parts is zero).
    table: Tensor,
    counts: Vec<u32>,
}

impl std::fmt::Debug for EmbeddingGradPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EmbeddingGradPlan({}x{} tokens, {} distinct of {})",
            self.batch, self.seq, self.segments, self.vocab
        )
    }
}

impl EmbeddingGradPlan {
    /// The plan for `tokens` (row-major (batch, seq), each below `vocab`) on `device`.
    pub fn new(tokens: &[u32], batch: usize, seq: usize, vocab: usize, device: &Device) -> Result<EmbeddingGradPlan> {
        const OP: &str = "EmbeddingGradPlan::new";
        let count = batch.checked_mul(seq).filter(|&n| n <= i32::MAX as usize / 3);
        let Some(count) = count else {
            return Err(Error::invalid(
                OP,
                "batch",
                "batch·seq below 2^31/3",
                format!("{batch}x{seq}"),
            ));
        };
        if vocab == 0 || vocab > i32::MAX as usize {
            return Err(Error::invalid(OP, "vocab", "between 1 and 2^31-1", vocab));
        }
        let mut plan = EmbeddingGradPlan {
            batch,
            seq,
            vocab,
            segments: 0,
            table: Tensor::zeros(&[3 * count + 1], DType::U32, device)?,
            counts: Vec::new(),
        };
        plan.fill(OP, tokens)?;
        Ok(plan)
    }

    /// Refills the plan from the next batch's `tokens`, of the same shape; on error the plan is
    /// unchanged.
    pub fn update(&mut self, tokens: &[u32]) -> Result<()> {
        self.fill("EmbeddingGradPlan::update", tokens)
    }

    /// (batch, seq, vocab) this plan is for.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.batch, self.seq, self.vocab)
    }

    /// How many distinct tokens the batch holds.
    pub fn distinct_tokens(&self) -> usize {
        self.segments
    }

    fn fill(&mut self, op: &'static str, tokens: &[u32]) -> Result<()> {
        let count = self.batch * self.seq;
        if tokens.len() != count {
            return Err(Error::invalid(
                op,
                "tokens",
                format!("{count} tokens ({}x{})", self.batch, self.seq),
                format!("{} tokens", tokens.len()),
            ));
        }
        if let Some((n, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= self.vocab) {
            return Err(Error::invalid(
                op,
                "tokens",
                format!("every token below the vocabulary size {}", self.vocab),
                format!("{t} at index {n}"),
            ));
        }
        // Stable counting sort by token.
        self.counts.clear();
        self.counts.resize(self.vocab, 0);
        for &t in tokens {
            self.counts[t as usize] += 1;
        }
        let mut host = vec![0u32; 3 * count + 1];
        let (starts, rest) = host.split_at_mut(count + 1);
        let (segment_tokens, positions) = rest.split_at_mut(count);
        let mut segments = 0;
        let mut offset = 0u32;
        for (token, n) in self.counts.iter_mut().enumerate() {
            if *n > 0 {
                starts[segments] = offset;
                segment_tokens[segments] = token as u32;
                segments += 1;
                let here = offset;
                offset += *n;
                // From here on, `counts` holds each token's next free slot.
                *n = here;
            }
        }
        starts[segments] = offset;
        for (position, &t) in tokens.iter().enumerate() {
            let slot = &mut self.counts[t as usize];
            positions[*slot as usize] = position as u32;
            *slot += 1;
        }
        let host = Tensor::from_vec(host, &[3 * count + 1], &Device::Cpu)?;
        self.table.copy_from(&host)?;
        self.segments = segments;
        Ok(())
    }

    /// The u32 offsets of the three parts of the table.
    fn layout(&self) -> (usize, usize, usize) {
        let count = self.batch * self.seq;
        (0, count + 1, 2 * count + 1)
    }
}

/// The backward: with `d_out` the (batch, seq, width) gradient of the forward's output,
/// `d_wte[v, :] (+)= Σ_{positions p holding token v} d_out[p, :]` and, when given,
/// `d_wpe[t, :] (+)= Σ_b d_out[b, t, :]` (rows t >= seq get nothing). The table gradients are
/// f32; with `accumulate` the sums are added to what they hold (a tied token table receives the
/// output projection's gradient too), else they are overwritten (rows of absent tokens become 0).
pub fn embedding_backward_into(
    d_out: &Tensor,
    plan: &EmbeddingGradPlan,
    d_wte: &mut Tensor,
    d_wpe: Option<&mut Tensor>,
    accumulate: bool,
) -> Result<()> {
    d_out.expect_dtype(BACKWARD, "d_out", &[DType::F32, DType::BF16, DType::F16])?;
    d_out.expect_rank(BACKWARD, "d_out", 3)?;
    let width = d_out.shape()[2];
    let device = d_out.device();
    let (batch, seq, vocab) = plan.shape();
    if d_out.shape()[..2] != [batch, seq] || width == 0 || width > MAX_WIDTH {
        return Err(Error::invalid(
            BACKWARD,
            "d_out",
            format!("shape ({batch}, {seq}, width) for this plan, width between 1 and {MAX_WIDTH}"),
            format!("shape {:?}", d_out.shape()),
        ));
    }
    device.expect_same(&plan.table.device(), BACKWARD, "plan")?;
    expect_tensor(BACKWARD, "d_wte", d_wte, &[vocab, width], DType::F32, &device)?;
    if let Some(d_wpe) = &d_wpe {
        d_wpe.expect_dtype(BACKWARD, "d_wpe", &[DType::F32])?;
        d_wpe.expect_rank(BACKWARD, "d_wpe", 2)?;
        device.expect_same(&d_wpe.device(), BACKWARD, "d_wpe")?;
        if d_wpe.shape()[1] != width || d_wpe.shape()[0] < seq {
            return Err(Error::invalid(
                BACKWARD,
                "d_wpe",
                format!("a (context >= {seq}, {width}) f32 table"),
                format!("shape {:?}", d_wpe.shape()),
            ));
        }
    }
    if !accumulate {
        d_wte.fill_bytes(0)?;
    }
    let mut d_wpe = d_wpe;
    if let (Some(d_wpe), false) = (d_wpe.as_deref_mut(), accumulate) {
        d_wpe.fill_bytes(0)?;
    }
    match device {
        Device::Cpu => cpu::backward(d_out, plan, d_wte, d_wpe, width),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(d_out, plan, d_wte, d_wpe, width),
    }
}

mod cpu {
    use super::*;
    use crate::dtype::Float;
    use rayon::prelude::*;

    fn forward_typed<T: Float>(
        tokens: &Tensor,
        wte: &Tensor,
        wpe: Option<&Tensor>,
        out: &mut Tensor,
        seq: usize,
        width: usize,
    ) -> Result<()> {
        let tokens = tokens.host_slice::<u32>()?;
        let wte = wte.host_slice::<T>()?;
        let wpe = wpe.map(|w| w.host_slice::<T>()).transpose()?;
        out.host_slice_mut::<T>()?
            .par_chunks_mut(width)
            .zip(tokens.par_iter())
            .enumerate()
            .for_each(|(n, (row, &token))| {
                let e = &wte[token as usize * width..][..width];
                let t = n % seq;
                for (c, o) in row.iter_mut().enumerate() {
                    let p = wpe.map_or(0.0, |w| w[t * width + c].to_f32());
                    *o = T::from_f32(e[c].to_f32() + p);
                }
            });
        Ok(())
    }

    pub(super) fn forward(
        tokens: &Tensor,
        wte: &Tensor,
        wpe: Option<&Tensor>,
        out: &mut Tensor,
        seq: usize,
        vocab: usize,
        width: usize,
    ) -> Result<()> {
        debug_assert_eq!(wte.numel(), vocab * width);
        with_float_type!(wte.dtype(), FORWARD, "wte", T => forward_typed::<T>(tokens, wte, wpe, out, seq, width))
    }

    fn backward_typed<T: Float>(
        d_out: &Tensor,
        plan: &EmbeddingGradPlan,
        d_wte: &mut Tensor,
        d_wpe: Option<&mut Tensor>,
        width: usize,
    ) -> Result<()> {
        let d_out = d_out.host_slice::<T>()?;
        let table = plan.table.host_slice::<u32>()?;
        let (starts_at, tokens_at, positions_at) = plan.layout();
        let starts = &table[starts_at..starts_at + plan.segments + 1];
        let tokens = &table[tokens_at..tokens_at + plan.segments];
        let positions = &table[positions_at..];
        let d_wte = d_wte.host_slice_mut::<f32>()?;
        // Each distinct token's row is written by one task: the same additions, in the same
        // order, as the CUDA kernel.
        let mut rows: Vec<(usize, &mut [f32])> = Vec::with_capacity(plan.segments);
        let mut rest = d_wte;
        let mut consumed = 0;
        for (segment, &token) in tokens.iter().enumerate() {
            let (_, tail) = rest.split_at_mut((token as usize - consumed) * width);
            let (row, tail) = tail.split_at_mut(width);
            rows.push((segment, row));
            rest = tail;
            consumed = token as usize + 1;
        }
        rows.into_par_iter().for_each(|(segment, row)| {
            let mine = &positions[starts[segment] as usize..starts[segment + 1] as usize];
            for (c, r) in row.iter_mut().enumerate() {
                let mut sum = 0.0f32;
                for &p in mine {
                    sum += d_out[p as usize * width + c].to_f32();
                }
                *r += sum;
            }
        });
        if let Some(d_wpe) = d_wpe {
            let (batch, seq, _) = plan.shape();
            d_wpe.host_slice_mut::<f32>()?[..seq * width]
                .par_iter_mut()
                .enumerate()
                .for_each(|(i, g)| {
                    let mut sum = 0.0f32;
                    for b in 0..batch {
                        sum += d_out[b * seq * width + i].to_f32();
                    }
                    *g += sum;
                });
        }
        Ok(())
    }

    pub(super) fn backward(
        d_out: &Tensor,
        plan: &EmbeddingGradPlan,
        d_wte: &mut Tensor,
        d_wpe: Option<&mut Tensor>,
        width: usize,
    ) -> Result<()> {
        with_float_type!(d_out.dtype(), BACKWARD, "d_out", T => backward_typed::<T>(d_out, plan, d_wte, d_wpe, width))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};
    use crate::ops::support::cuda::{address_or_null, aligned16, grid_stride_blocks};

    /// Must match THREADS in kernels/embedding.cu.
    const THREADS: u32 = 256;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        tokens: &Tensor,
        wte: &Tensor,
        wpe: Option<&Tensor>,
        out: &mut Tensor,
        count: usize,
        seq: usize,
        vocab: usize,
        width: usize,
    ) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let wte_buffer = wte.device_buffer()?;
        let backend = wte_buffer.backend().clone();
        let (tokens_address, wte_address) = (tokens.device_buffer()?.address(), wte_buffer.address());
        let wpe_address = address_or_null(wpe)?;
        let out_address = out.device_buffer()?.address();
        let vectorised = width.is_multiple_of(16 / wte.dtype().size_in_bytes())
            && aligned16(&[wte_address, wpe_address, out_address]);
        let name = format!(
            "embedding_fwd_{}{}",
            if vectorised { "vec_" } else { "" },
            wte.dtype().name()
        );
        let function = backend.function("embedding", &name)?;
        let (count_i, seq_i, vocab_i, width_i) = (count as i32, seq as i32, vocab as i32, width as i32);
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&tokens_address)
            .arg(&wte_address)
            .arg(&wpe_address)
            .arg(&out_address)
            .arg(&count_i)
            .arg(&seq_i)
            .arg(&vocab_i)
            .arg(&width_i);
        let launch = LaunchConfig {
            grid_dim: (count as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: validated shapes: `count` tokens, a (vocab, width) token table, a position
        // table of at least `seq` rows (or null), a (count, width) output; the kernel checks each
        // token against the vocabulary before reading its row.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }

    pub(super) fn backward(
        d_out: &Tensor,
        plan: &EmbeddingGradPlan,
        d_wte: &mut Tensor,
        d_wpe: Option<&mut Tensor>,
        width: usize,
    ) -> Result<()> {
        let d_out_buffer = d_out.device_buffer()?;
        let backend = d_out_buffer.backend().clone();
        let d_out_address = d_out_buffer.address();
        let table = plan.table.device_buffer()?.address();
        let (starts_at, tokens_at, positions_at) = plan.layout();
        let (starts, tokens, positions) = (
            table + 4 * starts_at as u64,
            table + 4 * tokens_at as u64,
            table + 4 * positions_at as u64,
        );
        let d_wte_address = d_wte.device_buffer()?.address();
        let dtype = d_out.dtype().name();
        let width_i = width as i32;
        let column_blocks = width.div_ceil(THREADS as usize);
        if plan.segments > 0 {
            let name = format!("embedding_bwd_tokens_{dtype}");
            let function = backend.function("embedding", &name)?;
            let segments_i = plan.segments as i32;
            let mut builder = backend.launch_builder(&function);
            builder
                .arg(&d_out_address)
                .arg(&starts)
                .arg(&tokens)
                .arg(&positions)
                .arg(&d_wte_address)
                .arg(&segments_i)
                .arg(&width_i);
            let launch = LaunchConfig {
                grid_dim: (plan.segments.min(i32::MAX as usize) as u32, column_blocks as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the plan's table holds `segments + 1` starts, `segments` distinct tokens
            // below the vocabulary (checked when built) and batch·seq positions below batch·seq;
            // d_out is (batch·seq, width), d_wte (vocab, width) f32; one block per segment, each
            // segment's row written by its block alone.
            unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        }
        if let Some(d_wpe) = d_wpe {
            let (batch, seq, _) = plan.shape();
            let name = format!("embedding_bwd_positions_{dtype}");
            let function = backend.function("embedding", &name)?;
            let d_wpe_address = d_wpe.device_buffer()?.address();
            let (batch_i, seq_i) = (batch as i32, seq as i32);
            let mut builder = backend.launch_builder(&function);
            builder
                .arg(&d_out_address)
                .arg(&d_wpe_address)
                .arg(&batch_i)
                .arg(&seq_i)
                .arg(&width_i);
            let launch = LaunchConfig {
                grid_dim: (grid_stride_blocks(&backend, seq * width, THREADS as usize), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: d_out is (batch, seq, width), d_wpe at least (seq, width) f32; the kernel
            // loops over exactly seq·width elements.
            unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        }
        Ok(())
    }
}
