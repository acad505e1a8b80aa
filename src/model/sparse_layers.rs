//! `nm` linear layers (2:4 and 1:2, SLoPe, ALGORITHMS.md §2) through the sparse tensor-core
//! kernels of [`crate::ops::sparse`].
//!
//! A masked layer keeps its dense f32 master weight with a fixed mask (see
//! [`super::params::LinearMask`]); where the sparse kernels take the layer, it also keeps two
//! compressed copies of its masked compute weight ([`SparseCopies`]): `W_s`, (out, in) pruned
//! along the input dimension, for the forward `Y = X·W_sᵀ + b`, and `W_dpᵀ`, (in, out) pruned
//! again along the output dimension, for the input gradient `dX = dY·W_dp`. The weight gradient
//! stays the dense `dYᵀ·X` masked, since the master weight, its gradient and its AdamW moments are
//! dense tensors (the op's `sparse24_weight_grad` runs the same dense GEMM and would add a
//! scatter back into the dense layout).
//!
//! # Layout
//! GPT-2's Conv1D weights are stored (in, out), Llama's nn.Linear ones (out, in). The compressed
//! format groups along rows, so each copy is built from the orientation whose rows run along its
//! groups: `W_s` from the (out, in) view and `W_dpᵀ` from the (in, out) view. One of the two is
//! the compute copy itself and the other its transpose ([`transpose`], one bandwidth-bound
//! kernel on a GPU). Both copies are pruned by magnitude from the masked weight: `W_s` keeps
//! exactly the mask's entries (the pruned ones are 0, the kept ones are not; were a kept value
//! exactly 0, the product would be the same), and `W_dpᵀ` is SLoPe's second pruning with the
//! layer's pattern along the output dimension.
//!
//! # When
//! A layer qualifies when its pattern is one the sparse kernels take (2:4, 1:2) and both of its
//! dimensions are multiples of 64 (the format's column block, on either copy); other `nm` layers
//! run as masked dense matmuls. The copies are used on a GPU by default. On the CPU the masked
//! dense GEMM is the faster (its kernel is blocked and vectorised; the CPU sparse kernel is a
//! scalar gather per kept value, which does half the multiply-adds at a fraction of the rate: see
//! benches/NOTES.md), so the CPU keeps the dense path unless asked
//! ([`super::GptParams::set_sparse_kernels`]), which the tests use to check one path against the
//! other.
//!
//! # Refresh
//! The copies are rebuilt from the compute copy wherever it changes, which is inside
//! [`super::GptParams`]' own methods only: after every AdamW step, when a parameter is set, when
//! a layer is pruned and when a checkpoint is loaded (which adopts its masks). Each rebuild is
//! stream-ordered on the GPU (transpose, two prune-compress passes; no host round trip) and
//! writes into the copies' own buffers, so that a training step allocates nothing for them.

use super::config::GptConfig;
use super::params::{cast, GptParams, Layout, Linear, ModelLayout, ADAPTERS_KEY, CONFIG_KEY};
use super::safetensors::{self, SafeTensors};
use super::variants::{LinearVariants, Variant};
use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ops::{self, NmPattern, Sparse24, StaticMask};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// The compressed copies of one `nm` layer's masked compute weight.
pub struct SparseCopies {
    /// `W_s`, (out, in), pruned along the input dimension: the forward's weight.
    pub w_s: Sparse24,
    /// `W_dpᵀ`, (in, out), the masked weight pruned again along the output dimension: the input
    /// gradient's weight.
    pub w_dp_t: Sparse24,
    /// The compute weight's transpose, kept between refreshes so that they allocate nothing.
    transposed: Tensor,
}

/// Whether a layer with `pattern` and these dimensions runs through the sparse kernels.
pub fn qualifies(pattern: NmPattern, input: usize, output: usize) -> bool {
    pattern.is_tensor_core()
        && input.is_multiple_of(ops::sparse::COL_BLOCK)
        && output.is_multiple_of(ops::sparse::COL_BLOCK)
}

impl SparseCopies {
    /// Builds the copies from `weight`, a layer's masked compute weight in its stored `layout`.
    pub(crate) fn build(weight: &Tensor, layout: Layout, pattern: NmPattern) -> Result<SparseCopies> {
        let transposed = transpose(weight)?;
        let (output_major, input_major) = match layout {
            Layout::InputMajor => (&transposed, weight),
            _ => (weight, &transposed),
        };
        Ok(SparseCopies {
            w_s: ops::sparse24_prune_compress(output_major, pattern)?,
            w_dp_t: ops::sparse24_prune_compress(input_major, pattern)?,
            transposed,
        })
    }

    /// Rebuilds the copies in place from `weight` (as [`SparseCopies::build`] was given it, with
    /// new values): a transpose and two prune-compress passes, nothing allocated on a GPU.
    pub(crate) fn refresh(&mut self, weight: &Tensor, layout: Layout, pattern: NmPattern) -> Result<()> {
        transpose_into(weight, &mut self.transposed)?;
        let (output_major, input_major) = match layout {
            Layout::InputMajor => (&self.transposed, weight),
            _ => (weight, &self.transposed),
        };
        ops::sparse::sparse24_prune_compress_into(output_major, pattern, &mut self.w_s)?;
        ops::sparse::sparse24_prune_compress_into(input_major, pattern, &mut self.w_dp_t)
    }
}

/// `out = x·W_sᵀ (+ bias)`.
pub(crate) fn forward(copies: &SparseCopies, x: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    ops::sparse_linear_forward_into(x, &copies.w_s, bias, out)
}

/// `dx = dy·W_dp`, or `dx += dy·W_dp` with `accumulate` (in the GEMM's epilogue on a GPU).
pub(crate) fn input_grad(copies: &SparseCopies, dy: &Tensor, dx: &mut Tensor, accumulate: bool) -> Result<()> {
    if !accumulate {
        return ops::sparse_linear_forward_into(dy, &copies.w_dp_t, None, dx);
    }
    match dy.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => ops::sparse::sparse_linear_accumulate_into(dy, &copies.w_dp_t, None, dx),
        _ => {
            let product = ops::sparse_linear_forward(dy, &copies.w_dp_t, None)?;
            match dx.dtype() {
                DType::BF16 => add_host::<half::bf16>(dx, &product),
                DType::F16 => add_host::<half::f16>(dx, &product),
                _ => add_host::<f32>(dx, &product),
            }
        }
    }
}

const OP_TRANSPOSE: &str = "sparse_layers::transpose";

/// The transpose of a matrix `w` (rows, cols): (cols, rows), same dtype and device. Any float
/// dtype on the CPU; bf16 or f16 on a GPU, where one kernel moves 32x32 tiles through shared
/// memory.
pub fn transpose(w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = check_transpose(w)?;
    let mut out = Tensor::zeros(&[cols, rows], w.dtype(), &w.device())?;
    transpose_into(w, &mut out)?;
    Ok(out)
}

/// [`transpose`] into `out`, (cols, rows) of `w`'s dtype on its device; on an error `out` is
/// left as it was.
pub fn transpose_into(w: &Tensor, out: &mut Tensor) -> Result<()> {
    let (rows, cols) = check_transpose(w)?;
    out.expect_dtype(OP_TRANSPOSE, "out", &[w.dtype()])?;
    out.expect_shape(OP_TRANSPOSE, "out", &[cols, rows])?;
    w.device().expect_same(&out.device(), OP_TRANSPOSE, "out")?;
    match w.device() {
        Device::Cpu => match w.dtype() {
            DType::F32 => transpose_host::<f32>(w, out, rows, cols),
            DType::BF16 => transpose_host::<half::bf16>(w, out, rows, cols),
            _ => transpose_host::<half::f16>(w, out, rows, cols),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => match rows * cols {
            0 => Ok(()),
            _ => cuda::transpose(w, out, rows, cols),
        },
    }
}

/// Checks `w` for a transpose on its device; returns (rows, cols).
fn check_transpose(w: &Tensor) -> Result<(usize, usize)> {
    w.expect_rank(OP_TRANSPOSE, "w", 2)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    match w.device() {
        Device::Cpu => w.expect_dtype(OP_TRANSPOSE, "w", &[DType::F32, DType::BF16, DType::F16])?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            w.expect_dtype(OP_TRANSPOSE, "w", &[DType::BF16, DType::F16])?;
            if rows.div_ceil(cuda::TILE) > cuda::MAX_GRID_Y {
                return Err(Error::invalid(
                    OP_TRANSPOSE,
                    "w",
                    format!("at most {} rows on a GPU", cuda::MAX_GRID_Y * cuda::TILE),
                    format!("shape {:?}", w.shape()),
                ));
            }
        }
    }
    Ok((rows, cols))
}

/// The metadata key that marks a checkpoint exported for inference and names its form.
pub const EXPORT_KEY: &str = "tessera.export";

/// [`EXPORT_KEY`]'s value for [`export_sparse24`]'s files.
pub const SPARSE24_FORM: &str = "sparse24";

/// The checkpoint names of an exported layer's compressed `W_s`: its values
/// (`tessera.<layer>.sparse24_values`, bf16 (out, in/2)) and metadata
/// (`tessera.<layer>.sparse24_meta`, u32), in [`crate::ops::sparse`]'s format.
pub fn sparse24_names(weight_name: &str) -> (String, String) {
    let layer = weight_name.strip_suffix(".weight").unwrap_or(weight_name);
    (
        format!("tessera.{layer}.sparse24_values"),
        format!("tessera.{layer}.sparse24_meta"),
    )
}

const OP_EXPORT: &str = "export_sparse24";

/// The pattern of `linear` when the export stores it compressed; an error naming the layer when
/// the export cannot store it (only dense layers and pruned 2:4 or 1:2 layers whose dimensions
/// the format takes have an inference form here).
fn export_pattern(params: &GptParams, linear: &Linear) -> Result<Option<NmPattern>> {
    let name = &params.params[linear.weight].spec.name;
    let refuse = |why: &str| {
        Err(Error::invalid(
            OP_EXPORT,
            "params",
            "dense layers and pruned 2:4 or 1:2 nm layers with both dimensions multiples of 64",
            format!("{name}: {} ({why})", linear.spec.variant),
        ))
    };
    match linear.spec.variant {
        Variant::Dense => Ok(None),
        Variant::Nm { n, m, .. } => {
            let pattern = NmPattern::new(n, m)?;
            if !qualifies(pattern, linear.input, linear.output) {
                refuse("the compressed format does not take it")
            } else if !params.masks.contains_key(&linear.weight) {
                refuse("not pruned yet")
            } else {
                Ok(Some(pattern))
            }
        }
        _ => refuse("no compressed inference form in this export"),
    }
}

/// Writes `params` for inference (SLoPe's deliverable): every 2:4 (or 1:2) layer as its
/// compressed `W_s` only (values and metadata under [`sparse24_names`], no dense weight, no mask:
/// the metadata holds the kept positions; a kept weight that is exactly 0 may be recorded at
/// another position of its group, which computes the same product), every other tensor (LoRA adapters unmerged included)
/// in bf16 under its usual name, and [`EXPORT_KEY`] in the metadata. The bytes are the ones the
/// recipes report counts at inference: 2 per dense weight, 9/16 of that for a 2:4 layer. Errs,
/// naming the layer, on layers other than dense and pruned 2:4 or 1:2 nm layers that the format
/// takes. [`GptParams::load`] reads the file for generation and evaluation; training cannot start
/// from it (no f32 master weights, no optimizer state).
pub fn export_sparse24(params: &GptParams, path: impl AsRef<Path>) -> Result<()> {
    let mut compressed = BTreeMap::new();
    for linear in params.layout.linears() {
        if let Some(pattern) = export_pattern(params, linear)? {
            compressed.insert(linear.weight, (*linear, pattern));
        }
    }
    let mut owned: Vec<(String, Tensor)> = Vec::new();
    for (index, p) in params.params.iter().enumerate() {
        let host = p.value.to_device(&Device::Cpu)?;
        let bf16 = cast(&host, DType::BF16)?;
        match compressed.get(&index) {
            Some((linear, pattern)) => {
                let output_major = match linear.layout {
                    Layout::InputMajor => transpose(&bf16)?,
                    _ => bf16,
                };
                let w_s = ops::sparse24_prune_compress(&output_major, *pattern)?;
                let (values, meta) = sparse24_names(&p.spec.name);
                owned.push((values, w_s.values().to_device(&Device::Cpu)?));
                owned.push((meta, w_s.meta().to_device(&Device::Cpu)?));
            }
            None => owned.push((p.spec.name.clone(), bf16)),
        }
    }
    let list: Vec<(&str, &Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (CONFIG_KEY.to_string(), params.config_json()),
        (EXPORT_KEY.to_string(), SPARSE24_FORM.to_string()),
    ]);
    if params.has_adapters() {
        let on = if params.adapters_on() { "on" } else { "off" };
        metadata.insert(ADAPTERS_KEY.to_string(), on.to_string());
    }
    safetensors::save(path, &list, &metadata)
}

/// Reads an [`export_sparse24`] file (already opened as `file`, its configuration parsed) onto
/// `device`: compressed layers decompressed into their masked weights with the masks their
/// metadata records, every other tensor widened from bf16. The parameters are marked as an
/// inference export ([`GptParams::is_inference_export`]).
pub(crate) fn load_sparse24(
    file: &mut SafeTensors,
    path: &Path,
    config: GptConfig,
    variants: LinearVariants,
    device: &Device,
) -> Result<GptParams> {
    let layout = ModelLayout::with_variants(&config, &variants);
    let mut kept_by_weight = BTreeMap::new();
    let mut values = Vec::with_capacity(layout.specs.len());
    let linears: Vec<Linear> = layout.linears().into_iter().copied().collect();
    for (index, spec) in layout.specs.iter().enumerate() {
        let linear = linears.iter().find(|l| l.weight == index);
        let compressed = match linear.map(|l| l.spec.variant) {
            Some(Variant::Nm { n, m, .. }) => Some(NmPattern::new(n, m)?),
            _ => None,
        };
        let value = match (linear, compressed) {
            (Some(linear), Some(pattern)) => {
                if !qualifies(pattern, linear.input, linear.output) {
                    return Err(Error::file(
                        path.display(),
                        format!(
                            "`{}` is {pattern} but its dimensions do not fit the compressed format",
                            spec.name
                        ),
                    ));
                }
                let (values_name, meta_name) = sparse24_names(&spec.name);
                let (rows, cols) = (linear.output, linear.input);
                let stored = file.take(&values_name, DType::BF16, &[rows, cols / 2])?;
                let words = rows / ops::sparse::ROW_BLOCK * (cols / ops::sparse::COL_BLOCK) * 32;
                let meta = file.take(&meta_name, DType::U32, &[words])?;
                let w_s = Sparse24::from_parts(stored, meta, rows, cols).map_err(|e| Error::file(path.display(), e))?;
                let dense = ops::sparse24_decompress(&w_s)?;
                let kept = kept_positions(&w_s)?;
                let (dense, kept) = match linear.layout {
                    Layout::InputMajor => (transpose(&dense)?, transpose_u8(&kept, rows, cols)),
                    _ => (dense, kept),
                };
                kept_by_weight.insert(index, Tensor::from_vec(kept, &spec.shape, &Device::Cpu)?);
                widen(&dense)?
            }
            _ => widen(&file.take(&spec.name, DType::BF16, &spec.shape)?)?,
        };
        values.push(value.to_device(device)?);
    }
    let mut params = GptParams::from_values(config, variants, layout, values, device)?;
    for linear in &linears {
        if let Some(kept) = kept_by_weight.remove(&linear.weight) {
            params.adopt_mask(linear, StaticMask::from_kept(&kept, device)?)?;
        }
    }
    params.set_adapters_on(match file.metadata().get(ADAPTERS_KEY).map(String::as_str) {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err(Error::file(
                path.display(),
                format!("metadata `{ADAPTERS_KEY}`: expected \"on\" or \"off\", got {other:?}"),
            ))
        }
    });
    params.mark_inference_export();
    Ok(params)
}

/// The kept positions (1) of a compressed matrix, row-major (rows, cols), from its metadata:
/// the mask, kept positions whose value is 0 included.
fn kept_positions(s: &Sparse24) -> Result<Vec<u8>> {
    let words = s.meta().to_vec::<u32>()?;
    let (rows, cols) = (s.rows(), s.cols());
    let mut kept = vec![0u8; rows * cols];
    for row in 0..rows {
        for group in 0..cols / 4 {
            let (word, shift) = ops::sparse::meta_location(row, group, cols);
            let nibble = (words[word] >> shift) & 0xF;
            for index in [nibble & 3, nibble >> 2] {
                kept[row * cols + 4 * group + index as usize] = 1;
            }
        }
    }
    Ok(kept)
}

fn transpose_u8(values: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    (0..rows * cols).map(|k| values[(k % rows) * cols + k / rows]).collect()
}

/// A bf16 host tensor widened to f32.
fn widen(t: &Tensor) -> Result<Tensor> {
    let values: Vec<f32> = t.to_vec::<half::bf16>()?.iter().map(|v| v.to_f32()).collect();
    Tensor::from_vec(values, t.shape(), &Device::Cpu)
}

/// `dx += product`, both host tensors of `T` with as many elements (the sparse GEMM's output is
/// dx's shape), rounded once.
fn add_host<T: Float>(dx: &mut Tensor, product: &Tensor) -> Result<()> {
    let add = product.host_slice::<T>()?;
    for (d, &a) in dx.host_slice_mut::<T>()?.iter_mut().zip(add) {
        *d = T::from_f32(d.to_f32() + a.to_f32());
    }
    Ok(())
}

fn transpose_host<T: Float>(w: &Tensor, out: &mut Tensor, rows: usize, cols: usize) -> Result<()> {
    let src = w.host_slice::<T>()?;
    for (k, o) in out.host_slice_mut::<T>()?.iter_mut().enumerate() {
        *o = src[(k % rows) * cols + k / rows];
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    /// Must match kernels/sparse_layers.cu.
    pub(super) const TILE: usize = 32;
    const ROWS_PER_PASS: u32 = 8;
    pub(super) const MAX_GRID_Y: usize = 65535;

    pub(super) fn transpose(w: &Tensor, out: &mut Tensor, rows: usize, cols: usize) -> Result<()> {
        let source = w.device_buffer()?;
        let backend = source.backend().clone();
        let function = backend.function("sparse_layers", "transpose16")?;
        let (src, dst) = (source.address(), out.device_buffer()?.address());
        let (rows_i, cols_i) = (rows as i64, cols as i64);
        let mut launch = backend.launch_builder(&function);
        launch.arg(&src).arg(&dst).arg(&rows_i).arg(&cols_i);
        let config = LaunchConfig {
            grid_dim: (cols.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1),
            block_dim: (TILE as u32, ROWS_PER_PASS, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: w is (rows, cols) and out (cols, rows), both of a 16-bit dtype on this device;
        // the kernel reads and writes only inside those bounds.
        unsafe { launch.launch(config) }.context("launching transpose16")?;
        Ok(())
    }
}
