//! A key/value cache for generation: [`Gpt::prefill`] runs the prompts once and keeps every
//! layer's keys and values, then each [`Gpt::decode`] runs one new token per sequence against
//! them, so that a generated token costs one query per layer instead of a forward over the
//! whole sequence.
//!
//! Layout: position-major. Row `i · batch + b` of every activation is position `i` of sequence
//! `b`, and a layer's keys (values alike) are one `(context, batch · kv_heads · head_dim)`
//! allocation whose first `n` rows hold the `n` positions seen so far. That prefix is contiguous,
//! so attention reads it in place as a single sequence, `(1, n, batch · kv_heads, head_dim)`, with
//! the batch folded into the heads: query head `b · heads + h` reads key head
//! `(b · heads + h) / group = b · kv_heads + h / group`, the key head of its own sequence, and the
//! RoPE bases are repeated once per sequence for the same reason. Bottom-right alignment puts the
//! new queries at positions `n − t .. n`, as in the full forward. All sequences of a batch have
//! the same length.
//!
//! Masks: every key is kept (causal, window and Λ alike); attention skips the key tiles a window
//! hides, so a windowed model reads only its window (and Λ's globals) per token.
//!
//! WaveletGPT's mixing between blocks is causal along the sequence with windows up to the
//! context, so the cache also keeps, per mixing layer, every position's two mixed inputs (the
//! block's MLP output and its residual stream), and runs the mixing over the whole prefix (seen
//! as one sequence of `batch · width` columns) to read the new positions' rows: the same
//! arithmetic as the full forward, at a cost linear in the prefix, as attention's.
//!
//! Everything is allocated by [`Gpt::kv_cache`]. An eager step still allocates what the ops
//! allocate: attention's output and log-sum-exp (and, on a GPU with RoPE, the rotated copies of
//! the queries and keys and their position tables; on the CPU, attention's f32 copies of its
//! operands), the adapters' intermediates, plus the host-to-device copy of the new tokens.
//!
//! Decode modes ([`DecodeMode`]): a decode step can also run in a capturable form, which queues
//! no allocation, no host copy and no synchronisation: the new tokens go to a device buffer
//! before the step (their position too, after a prefill; the step's last kernel then advances
//! it, [`ops::decode_positions_advance`]), and every kernel that depends on the position (the position
//! embedding, the cache row written, the keys attention reads) reads it from there
//! ([`ops::attention_decode_into`], [`ops::kv_append_into`]). On a GPU, [`DecodeMode::Graph`]
//! runs that step once eagerly (which loads the kernels and plans the GEMMs), captures the next
//! into a CUDA graph, and replays the graph for every further token: one launch per step instead
//! of one per kernel. The capturable step serves models with learned positions (or none) and
//! without wavelet mixing; RoPE inside attention and the mixing's prefix-long pass are not
//! captured.

use super::config::Positions;
use super::gpt::{linear_forward, linear_forward_with, norm_params, Gpt};
use super::params::{Block, Qkv};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{self, AttentionOptions, AttentionRope, MatmulOptions, NormStats, RopeConfig, WaveletConfig};
use crate::tensor::Tensor;

const OP: &str = "KvCache";

/// How [`Gpt::decode`] runs a step; [`Gpt::prefill`] always runs eagerly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeMode {
    /// The ops one after the other, as the prefill runs them.
    #[default]
    Eager,
    /// The capturable step (see the module documentation), launched op by op: what a graph
    /// records, on any device.
    Capturable,
    /// The capturable step captured once into a CUDA graph and replayed (CUDA devices only).
    Graph,
}

/// The most positions one pass of a prefill runs: longer prompts go in chunks, which bounds the
/// step's buffers at `batch · PREFILL_CHUNK` rows.
pub const PREFILL_CHUNK: usize = 256;

/// Keys, values and mixing inputs of `batch` sequences, up to the model's context, with the
/// buffers one step needs. Made by [`Gpt::kv_cache`] for that model.
pub struct KvCache {
    batch: usize,
    /// Positions held, the same in every sequence.
    len: usize,
    /// The model it was made for, checked on every call.
    config: super::GptConfig,
    /// Per layer, (context, batch · kv_width), the first `len` rows filled.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Per mixing layer (before blocks 1.. and before the final norm), when the model mixes.
    mixing: Vec<MixHistory>,
    /// The model's attention options with RoPE's bases repeated for each sequence.
    attention: AttentionOptions,
    /// The model's mixing, repeated for each sequence.
    wavelet: Option<WaveletConfig>,
    step: Step,
    /// The next-token logits of the last position of each sequence, (batch, vocab).
    logits: Tensor,
    mode: DecodeMode,
    /// The capturable step's own buffers, made when a mode other than eager is chosen.
    capturable: Option<Capturable>,
}

/// What the capturable step needs beside [`Step`]: the position in device memory, attention's
/// output, the adapters' intermediate, and the graph once captured.
struct Capturable {
    /// (1, batch) u32: the new position, the same in every sequence (the embedding reads it as
    /// tokens of the position table; attention and the cache writes read its first element).
    /// The step's last kernel adds 1 to it.
    positions: Tensor,
    /// The position `positions` holds, when known: after a prefill, an eager step or a failed
    /// one it is uploaded again before the next step.
    device_position: Option<usize>,
    /// (batch · heads, head_dim).
    attended: Tensor,
    /// (batch, largest adapter rank), when some layer has an adapter.
    adapter: Option<Tensor>,
    /// Whether a capturable step has run since the mode was chosen for this model: the first
    /// runs eagerly, so that nothing inside a capture loads a module or plans a GEMM.
    warm: Option<ModelKey>,
    #[cfg(feature = "cuda")]
    graph: Option<(ModelKey, crate::cuda::CudaGraph)>,
}

/// Where the capturable step is: the block (none before and after them) and the op.
#[derive(Default)]
struct Place {
    block: Option<usize>,
    op: &'static str,
}

impl Place {
    fn set(&mut self, block: Option<usize>, op: &'static str) {
        *self = Place { block, op };
    }

    /// `error` with the op it came from, when it is one that capture raises (an allocation, a
    /// host copy or a synchronisation refused, a CUDA call failed).
    fn name(&self, error: Error) -> Error {
        let place = match self.block {
            Some(block) => format!("{} of block {block}", self.op),
            None => self.op.to_string(),
        };
        match error {
            Error::Unsupported { op, reason } => Error::Unsupported {
                op,
                reason: format!("{reason} (in {place} of the decode step)"),
            },
            Error::Cuda { context, message } => Error::Cuda {
                context: format!("{context} (in {place} of the decode step)"),
                message,
            },
            other => other,
        }
    }
}

/// Which model a captured graph was recorded for: the address of its parameters and whether
/// its adapters were on, since both decide what the graph launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelKey {
    parameters: u64,
    adapters: bool,
}

/// The mixing's inputs at every position so far and its output, (context, batch · width).
struct MixHistory {
    x: Tensor,
    residual: Tensor,
    out: Tensor,
}

/// One step's activations, for up to `batch · PREFILL_CHUNK` rows, shown with the step's rows.
struct Step {
    /// (1, rows) u32: the new tokens and, with learned positions, their positions.
    tokens: Tensor,
    positions: Option<Tensor>,
    /// The token embeddings, and the position embeddings added to them by the first norm.
    embedded: Tensor,
    position_embedded: Option<Tensor>,
    /// The residual stream entering a block (or the final norm), and after attention.
    input: Tensor,
    middle: Tensor,
    normed: Tensor,
    stats: NormStats,
    qkv: Option<Tensor>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projected: Tensor,
    gate: Option<Tensor>,
    up: Option<Tensor>,
    pre_activation: Tensor,
    activated: Tensor,
    mlp: Tensor,
    /// The final norm's output at the last new position of each sequence, (batch, width).
    last: Tensor,
}

/// Shows `shape` of `t`'s allocation, whatever shape it showed before (so that a step that
/// failed halfway leaves nothing a later step depends on).
fn view(t: &mut Tensor, shape: &[usize]) -> Result<()> {
    let numel = t.numel();
    t.reshape_in_place(&[numel])?;
    t.set_leading_dim(shape.iter().product())?;
    t.reshape_in_place(shape)
}

impl Step {
    /// Shows every activation of the step with `rows` rows (one per new token of each sequence).
    fn view_rows(&mut self, config: &super::GptConfig, rows: usize) -> Result<()> {
        let (c, f) = (config.width, config.ffn_width);
        let kv = config.kv_heads * config.head_dim();
        for (tensor, width) in [
            (&mut self.embedded, c),
            (&mut self.input, c),
            (&mut self.middle, c),
            (&mut self.normed, c),
            (&mut self.q, c),
            (&mut self.k, kv),
            (&mut self.v, kv),
            (&mut self.projected, c),
            (&mut self.activated, f),
            (&mut self.mlp, c),
        ] {
            view(tensor, &[rows, width])?;
        }
        for (tensor, width) in [
            (&mut self.position_embedded, c),
            (&mut self.qkv, c + 2 * kv),
            (&mut self.gate, f),
            (&mut self.up, f),
        ] {
            if let Some(tensor) = tensor {
                view(tensor, &[rows, width])?;
            }
        }
        let pre_width = if self.gate.is_some() { 2 * f } else { f };
        view(&mut self.pre_activation, &[rows, pre_width])?;
        view(&mut self.stats.mean, &[rows])?;
        view(&mut self.stats.rstd, &[rows])
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvCache({} sequences, {} of {} positions, {})",
            self.batch,
            self.len,
            self.config.context,
            self.logits.device()
        )
    }
}

impl KvCache {
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions held per sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions a sequence may reach: the model's context.
    pub fn capacity(&self) -> usize {
        self.config.context
    }

    /// The next-token logits of the last call, (batch, vocab) in the compute dtype.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// How decode steps run.
    pub fn decode_mode(&self) -> DecodeMode {
        self.mode
    }

    /// Chooses how decode steps run. [`DecodeMode::Capturable`] and [`DecodeMode::Graph`] need a
    /// model without RoPE and without wavelet mixing, and `Graph` a CUDA device; otherwise an
    /// [`Error::Unsupported`] that says why, and the mode stays as it was. Allocates the
    /// capturable step's buffers on first use.
    pub fn set_decode_mode(&mut self, mode: DecodeMode) -> Result<()> {
        if mode != DecodeMode::Eager {
            let refuse = |reason: &str| {
                Err(Error::Unsupported {
                    op: OP,
                    reason: format!("{mode:?} decoding: {reason}"),
                })
            };
            if self.attention.rope.is_some() {
                return refuse("RoPE inside attention is not served by the capturable step");
            }
            if self.wavelet.is_some() {
                return refuse(
                    "wavelet mixing runs over the whole prefix, whose length the step cannot read from the device",
                );
            }
            if mode == DecodeMode::Graph && matches!(self.logits.device(), Device::Cpu) {
                return refuse("CUDA graphs need a CUDA device");
            }
            if self.capturable.is_none() {
                let device = self.logits.device();
                let (heads, d) = (self.config.heads, self.config.head_dim());
                self.capturable = Some(Capturable {
                    positions: Tensor::zeros(&[1, self.batch], DType::U32, &device)?,
                    device_position: None,
                    attended: Tensor::zeros(&[self.batch * heads, d], self.logits.dtype(), &device)?,
                    adapter: None,
                    warm: None,
                    #[cfg(feature = "cuda")]
                    graph: None,
                });
            }
        }
        self.mode = mode;
        Ok(())
    }
}

impl Gpt {
    /// A cache for `batch` sequences of up to the model's context, allocated once.
    pub fn kv_cache(&self, batch: usize) -> Result<KvCache> {
        let params = &self.params;
        let config = &params.config;
        if batch == 0 {
            return Err(Error::invalid(OP, "batch", "at least 1 sequence", batch));
        }
        let (c, f, d) = (config.width, config.ffn_width, config.head_dim());
        let kv = config.kv_heads * d;
        let context = config.context;
        let rows = batch
            .checked_mul(context.min(PREFILL_CHUNK))
            .filter(|&r| r <= i32::MAX as usize)
            .ok_or_else(|| Error::invalid(OP, "batch", "fewer than 2^31 rows a step", batch))?;
        let (device, dtype) = (&params.device, params.dtype);
        let tensor = |rows: usize, width: usize| Tensor::zeros(&[rows, width], dtype, device);
        let fused = matches!(params.layout.blocks.first().map(|b| &b.qkv), Some(Qkv::Fused(_)));
        let swiglu = params.layout.blocks.first().is_some_and(|b| b.gate.is_some());
        let learned = matches!(config.positions, Positions::Learned);
        let layers = config.layers;
        let history = || tensor(context, batch * c);
        let step = Step {
            tokens: Tensor::zeros(&[1, rows], DType::U32, device)?,
            positions: if learned {
                Some(Tensor::zeros(&[1, rows], DType::U32, device)?)
            } else {
                None
            },
            embedded: tensor(rows, c)?,
            position_embedded: if learned { Some(tensor(rows, c)?) } else { None },
            input: tensor(rows, c)?,
            middle: tensor(rows, c)?,
            normed: tensor(rows, c)?,
            stats: NormStats::new(rows, device)?,
            qkv: if fused { Some(tensor(rows, c + 2 * kv)?) } else { None },
            q: tensor(rows, c)?,
            k: tensor(rows, kv)?,
            v: tensor(rows, kv)?,
            projected: tensor(rows, c)?,
            gate: if swiglu { Some(tensor(rows, f)?) } else { None },
            up: if swiglu { Some(tensor(rows, f)?) } else { None },
            pre_activation: tensor(rows, if swiglu { 2 * f } else { f })?,
            activated: tensor(rows, f)?,
            mlp: tensor(rows, c)?,
            last: tensor(batch, c)?,
        };
        let attention = AttentionOptions {
            rope: match &self.attention.rope {
                None => None,
                Some(rope) => Some(AttentionRope {
                    config: RopeConfig::new(d, rope.config.bases().repeat(batch), rope.config.convention())?,
                    distance_ceiling: rope.distance_ceiling,
                }),
            },
            ..self.attention.clone()
        };
        let wavelet = self.wavelet.as_ref().map(|w| w.tiled(batch)).transpose()?;
        let mixing = if wavelet.is_some() {
            (0..layers)
                .map(|_| {
                    Ok(MixHistory {
                        x: history()?,
                        residual: history()?,
                        out: history()?,
                    })
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(KvCache {
            batch,
            len: 0,
            config: config.clone(),
            keys: (0..layers)
                .map(|_| tensor(context, batch * kv))
                .collect::<Result<_>>()?,
            values: (0..layers)
                .map(|_| tensor(context, batch * kv))
                .collect::<Result<_>>()?,
            mixing,
            attention,
            wavelet,
            step,
            logits: tensor(batch, config.vocab)?,
            mode: DecodeMode::Eager,
            capturable: None,
        })
    }

    /// Empties `cache` and runs `prompts` (the cache's `batch` sequences of equal length, one
    /// after the other) through the model, keeping their keys and values. Returns the logits of
    /// each sequence's last token, (batch, vocab).
    pub fn prefill<'a>(&self, cache: &'a mut KvCache, prompts: &[u32]) -> Result<&'a Tensor> {
        self.check_cache(cache)?;
        let batch = cache.batch;
        let seq = prompts.len() / batch;
        if prompts.is_empty() || !prompts.len().is_multiple_of(batch) {
            return Err(Error::invalid(
                OP,
                "prompts",
                format!("{batch} prompts of equal length, at least 1 token each"),
                format!("{} tokens", prompts.len()),
            ));
        }
        if seq > cache.capacity() {
            return Err(Error::invalid(
                OP,
                "prompts",
                format!("at most the context of {} tokens per sequence", cache.capacity()),
                format!("{seq} tokens per sequence"),
            ));
        }
        self.check_tokens(prompts)?;
        cache.len = 0;
        let chunk = PREFILL_CHUNK.min(cache.capacity());
        let mut gathered = Vec::with_capacity(chunk * batch);
        for first in (0..seq).step_by(chunk) {
            let t = chunk.min(seq - first);
            gathered.clear();
            gathered.extend((first..first + t).flat_map(|i| (0..batch).map(move |b| prompts[b * seq + i])));
            if let Err(e) = self.step(cache, &gathered, t) {
                cache.len = 0;
                return Err(e);
            }
        }
        Ok(&cache.logits)
    }

    /// Runs one new token per sequence (`tokens[b]` continues sequence `b`) against the cache,
    /// which keeps it. Returns the next-token logits, (batch, vocab). An error when the
    /// sequences already hold the model's context.
    pub fn decode<'a>(&self, cache: &'a mut KvCache, tokens: &[u32]) -> Result<&'a Tensor> {
        self.check_cache(cache)?;
        if tokens.len() != cache.batch {
            return Err(Error::invalid(
                OP,
                "tokens",
                format!("one token per sequence ({})", cache.batch),
                tokens.len(),
            ));
        }
        if cache.len >= cache.capacity() {
            return Err(Error::invalid(
                OP,
                "tokens",
                format!(
                    "room in the cache: the sequences already hold the context of {} tokens",
                    cache.capacity()
                ),
                format!("position {}", cache.len),
            ));
        }
        self.check_tokens(tokens)?;
        match cache.mode {
            DecodeMode::Eager => self.step(cache, tokens, 1)?,
            mode => self.capturable_step(cache, tokens, mode)?,
        }
        Ok(&cache.logits)
    }

    /// The capturable form of a decode step: the tokens and the position go to device memory
    /// first, then the step runs eagerly (`Capturable`, and the first `Graph` step for a model),
    /// is captured and launched (the second), or replays its graph (every further one).
    fn capturable_step(&self, cache: &mut KvCache, tokens: &[u32], mode: DecodeMode) -> Result<()> {
        let params = &self.params;
        let key = ModelKey {
            parameters: match params.weight(params.layout.token_embedding).device() {
                Device::Cpu => 0,
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => params.weight(params.layout.token_embedding).device_buffer()?.address(),
            },
            adapters: params.adapters_on(),
        };
        self.prepare_capturable(cache)?;
        let batch = cache.batch;
        let position = cache.len as u32;
        let s = &mut cache.step;
        view(&mut s.tokens, &[1, batch])?;
        s.tokens
            .copy_from(&Tensor::from_slice(tokens, &[1, batch], &Device::Cpu)?)?;
        let Some(state) = cache.capturable.as_mut() else {
            return Err(Error::invalid(OP, "mode", "the capturable step's buffers", "none"));
        };
        if state.device_position != Some(cache.len) {
            state
                .positions
                .copy_from(&Tensor::from_slice(&vec![position; batch], &[1, batch], &Device::Cpu)?)?;
        }
        // Unknown until the step has queued without error.
        state.device_position = None;
        match mode {
            #[cfg(feature = "cuda")]
            DecodeMode::Graph if state.warm == Some(key) => {
                let backend = match cache.logits.device() {
                    Device::Cuda(backend) => backend,
                    Device::Cpu => return Err(Error::invalid(OP, "mode", "a CUDA device for graphs", "the CPU")),
                };
                if !matches!(&state.graph, Some((captured, _)) if *captured == key) {
                    state.graph = None;
                    let graph = backend.capture_graph(|| self.queue_capturable(cache))?;
                    match cache.capturable.as_mut() {
                        Some(state) => state.graph = Some((key, graph)),
                        None => return Err(Error::invalid(OP, "mode", "the capturable step's buffers", "none")),
                    }
                }
                if let Some((_, graph)) = cache.capturable.as_ref().and_then(|c| c.graph.as_ref()) {
                    backend.launch_graph(graph)?;
                }
            }
            _ => {
                self.queue_capturable(cache)?;
                if let Some(state) = cache.capturable.as_mut() {
                    state.warm = Some(key);
                }
            }
        }
        cache.len += 1;
        if let Some(state) = cache.capturable.as_mut() {
            state.device_position = Some(cache.len);
        }
        Ok(())
    }

    /// Shows every buffer of the capturable step at its one-token shape and makes the adapters'
    /// intermediate when the model needs one, so that the step itself only queues work.
    fn prepare_capturable(&self, cache: &mut KvCache) -> Result<()> {
        let params = &self.params;
        let config = &params.config;
        let batch = cache.batch;
        let kv = config.kv_heads * config.head_dim();
        cache.step.view_rows(config, batch)?;
        for store in cache.keys.iter_mut().chain(cache.values.iter_mut()) {
            view(store, &[config.context, batch * kv])?;
        }
        let rank = params
            .layout
            .blocks
            .iter()
            .flat_map(|b| {
                let qkv: Vec<&super::params::Linear> = match &b.qkv {
                    Qkv::Fused(linear) => vec![linear],
                    Qkv::Separate { q, k, v } => vec![q, k, v],
                };
                qkv.into_iter().chain([&b.out, &b.up, &b.down]).chain(b.gate.as_ref())
            })
            .filter_map(|linear| linear.lora.map(|index| params.weight(index.a).shape()[0]))
            .max();
        let Some(state) = cache.capturable.as_mut() else {
            return Err(Error::invalid(OP, "mode", "the capturable step's buffers", "none"));
        };
        if let Some(rank) = rank {
            if state.adapter.as_ref().is_none_or(|t| t.numel() < batch * rank) {
                state.adapter = Some(Tensor::zeros(&[batch, rank], params.dtype, &params.device)?);
            }
        }
        Ok(())
    }

    /// Queues the capturable step: one token per sequence, every per-step value read from the
    /// cache's device buffers (the tokens filled by [`Gpt::capturable_step`], the position moved
    /// on by the step's last kernel); nothing here allocates, copies from or to the host, or
    /// waits. The caller advances the cache's length.
    fn queue_capturable(&self, cache: &mut KvCache) -> Result<()> {
        let mut at = Place::default();
        self.queue_capturable_at(cache, &mut at).map_err(|e| at.name(e))
    }

    /// [`Gpt::queue_capturable`], keeping in `at` the op it queues, which an error names.
    fn queue_capturable_at(&self, cache: &mut KvCache, at: &mut Place) -> Result<()> {
        let params = &self.params;
        let config = &params.config;
        let layout = &params.layout;
        let batch = cache.batch;
        let (c, d) = (config.width, config.head_dim());
        let kv = config.kv_heads * d;
        let (s, keys, values) = (&mut cache.step, &mut cache.keys, &mut cache.values);
        let Some(state) = cache.capturable.as_mut() else {
            return Err(Error::invalid(OP, "mode", "the capturable step's buffers", "none"));
        };
        let mut scratch = state.adapter.as_mut();

        let embedded = if s.position_embedded.is_some() {
            &mut s.embedded
        } else {
            &mut s.input
        };
        view(embedded, &[1, batch, c])?;
        at.set(None, "the token embedding");
        ops::embedding_forward_into(&s.tokens, params.weight(layout.token_embedding), None, embedded)?;
        view(embedded, &[batch, c])?;
        if let (Some(embedded), Some(index)) = (&mut s.position_embedded, layout.positions) {
            view(embedded, &[1, batch, c])?;
            at.set(None, "the position embedding");
            ops::embedding_forward_into(&state.positions, params.weight(index), None, embedded)?;
            view(embedded, &[batch, c])?;
        }

        for (index, block) in layout.blocks.iter().enumerate() {
            at.set(Some(index), "the first norm");
            let norm1 = norm_params(params, block.norm1);
            match (index, &s.position_embedded) {
                (0, Some(positions)) => ops::norm_forward_into(
                    &self.norm,
                    &s.embedded,
                    Some((positions, &mut s.input)),
                    norm1,
                    &mut s.normed,
                    &mut s.stats,
                )?,
                (0, None) => ops::norm_forward_into(&self.norm, &s.input, None, norm1, &mut s.normed, &mut s.stats)?,
                _ => ops::norm_forward_into(
                    &self.norm,
                    &s.mlp,
                    Some((&s.middle, &mut s.input)),
                    norm1,
                    &mut s.normed,
                    &mut s.stats,
                )?,
            }

            match &block.qkv {
                Qkv::Fused(linear) => {
                    let qkv = s
                        .qkv
                        .as_mut()
                        .ok_or_else(|| Error::invalid(OP, "layout", "a fused qkv buffer", "none"))?;
                    at.set(Some(index), "the qkv linear");
                    linear_forward_with(params, linear, &s.normed, qkv, scratch.as_deref_mut())?;
                    at.set(Some(index), "copy_columns of q, k and v");
                    ops::copy_columns(qkv, 0, &mut s.q, 0, c)?;
                    ops::copy_columns(qkv, c, &mut s.k, 0, kv)?;
                    ops::copy_columns(qkv, c + kv, &mut s.v, 0, kv)?;
                }
                Qkv::Separate { q, k, v } => {
                    at.set(Some(index), "the q, k and v linears");
                    linear_forward_with(params, q, &s.normed, &mut s.q, scratch.as_deref_mut())?;
                    linear_forward_with(params, k, &s.normed, &mut s.k, scratch.as_deref_mut())?;
                    linear_forward_with(params, v, &s.normed, &mut s.v, scratch.as_deref_mut())?;
                }
            }
            for (store, new) in [(&mut keys[index], &mut s.k), (&mut values[index], &mut s.v)] {
                view(new, &[1, batch * kv])?;
                at.set(Some(index), "kv_append");
                ops::kv_append_into(new, store, &state.positions)?;
                view(new, &[batch, kv])?;
            }
            view(&mut s.q, &[batch * config.heads, d])?;
            at.set(Some(index), "attention_decode");
            ops::attention_decode_into(
                &s.q,
                &keys[index],
                &values[index],
                &state.positions,
                &cache.attention,
                &mut state.attended,
            )?;
            view(&mut s.q, &[batch, c])?;
            view(&mut state.attended, &[batch, c])?;
            at.set(Some(index), "the output linear");
            let projected = linear_forward_with(
                params,
                &block.out,
                &state.attended,
                &mut s.projected,
                scratch.as_deref_mut(),
            );
            view(&mut state.attended, &[batch * config.heads, d])?;
            projected?;
            self.norm_and_mlp(block, s, scratch.as_deref_mut(), |op| at.set(Some(index), op))?;
        }

        at.set(None, "the final norm");
        ops::norm_forward_into(
            &self.norm,
            &s.mlp,
            Some((&s.middle, &mut s.input)),
            norm_params(params, layout.final_norm),
            &mut s.normed,
            &mut s.stats,
        )?;
        let head = layout.head.unwrap_or(layout.token_embedding);
        at.set(None, "the head matmul");
        ops::matmul_into(
            &s.normed,
            params.weight(head),
            None,
            &mut cache.logits,
            MatmulOptions::linear(),
        )?;
        at.set(None, "decode_positions_advance");
        ops::decode_positions_advance(&mut state.positions)
    }

    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        if cache.config != self.params.config {
            return Err(Error::invalid(
                OP,
                "cache",
                "a cache made by this model's kv_cache",
                "a cache of another configuration",
            ));
        }
        if cache.logits.device() != self.params.device || cache.logits.dtype() != self.params.dtype {
            return Err(Error::invalid(
                OP,
                "cache",
                format!("a cache of {} on {}", self.params.dtype, self.params.device),
                format!("{} on {}", cache.logits.dtype(), cache.logits.device()),
            ));
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.params.config.vocab;
        match tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            Some((i, &t)) => Err(Error::invalid(
                OP,
                "tokens",
                format!("tokens below the vocabulary size {vocab}"),
                format!("{t} at index {i}"),
            )),
            None => Ok(()),
        }
    }

    /// A block's second norm (with the residual add) on `s.projected` and its MLP into `s.mlp`,
    /// for the eager and the capturable step alike; `scratch` holds the adapters' intermediate
    /// (see [`linear_forward_with`]) and `at` hears the name of each op before it runs.
    fn norm_and_mlp(
        &self,
        block: &Block,
        s: &mut Step,
        mut scratch: Option<&mut Tensor>,
        mut at: impl FnMut(&'static str),
    ) -> Result<()> {
        let params = &self.params;
        let f = params.config.ffn_width;
        at("the second norm");
        ops::norm_forward_into(
            &self.norm,
            &s.projected,
            Some((&s.input, &mut s.middle)),
            norm_params(params, block.norm2),
            &mut s.normed,
            &mut s.stats,
        )?;
        match &block.gate {
            None => {
                at("the up linear");
                linear_forward_with(
                    params,
                    &block.up,
                    &s.normed,
                    &mut s.pre_activation,
                    scratch.as_deref_mut(),
                )?;
                at("gelu");
                ops::gelu_forward_into(&s.pre_activation, &mut s.activated)?;
            }
            Some(gate) => {
                let (Some(gate_out), Some(up_out)) = (s.gate.as_mut(), s.up.as_mut()) else {
                    return Err(Error::invalid(OP, "layout", "SwiGLU buffers", "none"));
                };
                at("the gate and up linears");
                linear_forward_with(params, gate, &s.normed, gate_out, scratch.as_deref_mut())?;
                linear_forward_with(params, &block.up, &s.normed, up_out, scratch.as_deref_mut())?;
                at("copy_columns of gate and up");
                ops::copy_columns(gate_out, 0, &mut s.pre_activation, 0, f)?;
                ops::copy_columns(up_out, 0, &mut s.pre_activation, f, f)?;
                at("swiglu");
                ops::swiglu_forward_into(&s.pre_activation, &mut s.activated)?;
            }
        }
        at("the down linear");
        linear_forward_with(params, &block.down, &s.activated, &mut s.mlp, scratch)
    }

    /// Runs `t` new positions of every sequence (`tokens` position-major: row `i · batch + b`),
    /// appending their keys, values and mixing inputs, and writes the last position's logits.
    /// The cache's length moves only on success.
    fn step(&self, cache: &mut KvCache, tokens: &[u32], t: usize) -> Result<()> {
        let params = &self.params;
        let config = &params.config;
        let layout = &params.layout;
        let batch = cache.batch;
        let (start, end, rows) = (cache.len, cache.len + t, t * batch);
        let (c, d) = (config.width, config.head_dim());
        let kv = config.kv_heads * d;
        let s = &mut cache.step;
        s.view_rows(config, rows)?;
        view(&mut s.tokens, &[1, rows])?;
        s.tokens
            .copy_from(&Tensor::from_slice(tokens, &[1, rows], &Device::Cpu)?)?;

        // The embeddings; learned positions are looked up as tokens of the position table and
        // added by the first norm (the same f32 sum, rounded once, as the embedding op's).
        // Without them the stream starts as the token embeddings.
        let embedded = if s.position_embedded.is_some() {
            &mut s.embedded
        } else {
            &mut s.input
        };
        view(embedded, &[1, rows, c])?;
        ops::embedding_forward_into(&s.tokens, params.weight(layout.token_embedding), None, embedded)?;
        view(embedded, &[rows, c])?;
        let position_table = layout.positions.map(|index| params.weight(index));
        if let (Some(positions), Some(embedded), Some(table)) =
            (&mut s.positions, &mut s.position_embedded, position_table)
        {
            let ids: Vec<u32> = (start..end)
                .flat_map(|p| std::iter::repeat_n(p as u32, batch))
                .collect();
            view(positions, &[1, rows])?;
            positions.copy_from(&Tensor::from_slice(&ids, &[1, rows], &Device::Cpu)?)?;
            view(embedded, &[1, rows, c])?;
            ops::embedding_forward_into(positions, table, None, embedded)?;
            view(embedded, &[rows, c])?;
        }

        for (index, block) in layout.blocks.iter().enumerate() {
            let norm1 = norm_params(params, block.norm1);
            match (index, &s.position_embedded, &cache.wavelet) {
                (0, Some(positions), _) => ops::norm_forward_into(
                    &self.norm,
                    &s.embedded,
                    Some((positions, &mut s.input)),
                    norm1,
                    &mut s.normed,
                    &mut s.stats,
                )?,
                (0, None, _) => ops::norm_forward_into(&self.norm, &s.input, None, norm1, &mut s.normed, &mut s.stats)?,
                (_, _, None) => ops::norm_forward_into(
                    &self.norm,
                    &s.mlp,
                    Some((&s.middle, &mut s.input)),
                    norm1,
                    &mut s.normed,
                    &mut s.stats,
                )?,
                (_, _, Some(wavelet)) => {
                    mix(wavelet, &mut cache.mixing[index - 1], s, start, t, batch, c)?;
                    ops::norm_forward_into(&self.norm, &s.input, None, norm1, &mut s.normed, &mut s.stats)?
                }
            }

            view(&mut s.q, &[rows, c])?;
            view(&mut s.k, &[rows, kv])?;
            view(&mut s.v, &[rows, kv])?;
            match &block.qkv {
                Qkv::Fused(linear) => {
                    let qkv = s
                        .qkv
                        .as_mut()
                        .ok_or_else(|| Error::invalid(OP, "layout", "a fused qkv buffer", "none"))?;
                    linear_forward(params, linear, &s.normed, qkv)?;
                    ops::copy_columns(qkv, 0, &mut s.q, 0, c)?;
                    ops::copy_columns(qkv, c, &mut s.k, 0, kv)?;
                    ops::copy_columns(qkv, c + kv, &mut s.v, 0, kv)?;
                }
                Qkv::Separate { q, k, v } => {
                    linear_forward(params, q, &s.normed, &mut s.q)?;
                    linear_forward(params, k, &s.normed, &mut s.k)?;
                    linear_forward(params, v, &s.normed, &mut s.v)?;
                }
            }
            let (keys, values) = (&mut cache.keys[index], &mut cache.values[index]);
            for (store, new) in [(&mut *keys, &mut s.k), (&mut *values, &mut s.v)] {
                view(store, &[end, batch * kv])?;
                view(new, &[t, batch * kv])?;
                store.copy_rows_from(start, new, 0, t)?;
                view(store, &[1, end, batch * config.kv_heads, d])?;
            }
            view(&mut s.q, &[1, t, batch * config.heads, d])?;
            let (attended, _lse) = ops::attention_forward(&s.q, keys, values, &cache.attention)?;
            let attended = attended.reshape(&[rows, c])?;
            linear_forward(params, &block.out, &attended, &mut s.projected)?;
            self.norm_and_mlp(block, s, None, |_| {})?;
        }

        let final_norm = norm_params(params, layout.final_norm);
        match &cache.wavelet {
            None => ops::norm_forward_into(
                &self.norm,
                &s.mlp,
                Some((&s.middle, &mut s.input)),
                final_norm,
                &mut s.normed,
                &mut s.stats,
            )?,
            Some(wavelet) => {
                let last_mixing = layout.blocks.len() - 1;
                mix(wavelet, &mut cache.mixing[last_mixing], s, start, t, batch, c)?;
                ops::norm_forward_into(&self.norm, &s.input, None, final_norm, &mut s.normed, &mut s.stats)?
            }
        }
        s.last.copy_rows_from(0, &s.normed, (t - 1) * batch, batch)?;
        let head = layout.head.unwrap_or(layout.token_embedding);
        ops::matmul_into(
            &s.last,
            params.weight(head),
            None,
            &mut cache.logits,
            MatmulOptions::linear(),
        )?;
        cache.len = end;
        Ok(())
    }
}

/// The mixing of the step's `mlp + middle` into `input`: appends both to the history, mixes the
/// whole prefix, and reads back the new rows.
fn mix(
    config: &WaveletConfig,
    history: &mut MixHistory,
    s: &mut Step,
    start: usize,
    t: usize,
    batch: usize,
    c: usize,
) -> Result<()> {
    let end = start + t;
    for (store, new) in [(&mut history.x, &mut s.mlp), (&mut history.residual, &mut s.middle)] {
        view(store, &[end, batch * c])?;
        view(new, &[t, batch * c])?;
        store.copy_rows_from(start, new, 0, t)?;
        view(new, &[t * batch, c])?;
        view(store, &[1, end, batch * c])?;
    }
    view(&mut history.out, &[1, end, batch * c])?;
    ops::wavelet_forward_into(&history.x, Some(&history.residual), config, &mut history.out)?;
    view(&mut history.out, &[end, batch * c])?;
    view(&mut s.input, &[t, batch * c])?;
    s.input.copy_rows_from(0, &history.out, start, t)?;
    view(&mut s.input, &[t * batch, c])
}
