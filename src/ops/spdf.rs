//! SPDF (ALGORITHMS.md §11): sparse pretraining with an unstructured static mask, then dense
//! fine-tuning.
//!
//! [`StaticMask::random`] prunes exactly `round(s·numel)` entries of a (rows, cols) weight, chosen
//! by a seeded random permutation (the spec's [PROPOSAL]), and keeps the choice as a bitmask
//! `u32 (rows, ceil(cols/32))`, bit `col % 32` of word `col / 32` set where the weight is kept.
//! [`spdf_apply_mask`] zeroes the pruned entries of a tensor in place: of the weight after its
//! dense initialisation (`W ← M ⊙ W`), and of every gradient (`dW ← M ⊙ dW`). With pruned weights
//! and moments at 0 and pruned gradients at 0, AdamW (weight decay included) leaves the pruned
//! weights exactly 0: `p - lr·wd·p = 0`, `m` and `v` stay 0, and the step `m/(√v + ε)` is 0.
//! Densifying is dropping the mask: the layer is an ordinary dense linear again, its pruned
//! weights start at exactly 0 and learn from the dense gradient.

use crate::device::Device;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ops::sparse::SplitMix64;
use crate::tensor::Tensor;

const OP: &str = "spdf_apply_mask";

/// A fixed unstructured mask of a (rows, cols) weight.
pub struct StaticMask {
    bits: Tensor,
    rows: usize,
    cols: usize,
    pruned: usize,
}

impl StaticMask {
    /// Prunes `round(sparsity · rows · cols)` entries chosen by a random permutation drawn from
    /// `seed` (the same seed gives the same mask on every device), for `sparsity` in [0, 1].
    pub fn random(rows: usize, cols: usize, sparsity: f64, seed: u64, device: &Device) -> Result<StaticMask> {
        const OP: &str = "StaticMask::random";
        let numel = rows
            .checked_mul(cols)
            .filter(|&n| n > 0 && n <= u32::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    "rows",
                    "a non-empty matrix of at most 2^32 - 1 elements",
                    format!("{rows}x{cols}"),
                )
            })?;
        if !(0.0..=1.0).contains(&sparsity) {
            return Err(Error::invalid(OP, "sparsity", "a fraction in [0, 1]", sparsity));
        }
        let pruned = (sparsity * numel as f64).round() as usize;
        // The first `pruned` entries of a partial Fisher-Yates shuffle of 0..numel.
        let mut order: Vec<u32> = (0..numel as u32).collect();
        let mut rng = SplitMix64::new(seed);
        for i in 0..pruned {
            let j = i + rng.below((numel - i) as u64) as usize;
            order.swap(i, j);
        }
        let words_per_row = cols.div_ceil(32);
        let mut bits = vec![0u32; rows * words_per_row];
        for row in 0..rows {
            for col in 0..cols {
                bits[row * words_per_row + col / 32] |= 1 << (col % 32);
            }
        }
        for &flat in &order[..pruned] {
            let (row, col) = (flat as usize / cols, flat as usize % cols);
            bits[row * words_per_row + col / 32] &= !(1 << (col % 32));
        }
        Ok(StaticMask {
            bits: Tensor::from_vec(bits, &[rows, words_per_row], device)?,
            rows,
            cols,
            pruned,
        })
    }

    /// The mask of `kept` (u8 (rows, cols) on any device, non-zero = kept), on `device`: how a
    /// mask chosen otherwise (N:M by magnitude) takes this form.
    pub fn from_kept(kept: &Tensor, device: &Device) -> Result<StaticMask> {
        const OP: &str = "StaticMask::from_kept";
        kept.expect_dtype(OP, "kept", &[DType::U8])?;
        kept.expect_rank(OP, "kept", 2)?;
        let (rows, cols) = (kept.shape()[0], kept.shape()[1]);
        let flags = kept.to_vec::<u8>()?;
        let words_per_row = cols.div_ceil(32);
        let mut bits = vec![0u32; rows * words_per_row];
        let mut pruned = 0;
        for (i, &flag) in flags.iter().enumerate() {
            let (row, col) = (i / cols, i % cols);
            if flag != 0 {
                bits[row * words_per_row + col / 32] |= 1 << (col % 32);
            } else {
                pruned += 1;
            }
        }
        Ok(StaticMask {
            bits: Tensor::from_vec(bits, &[rows, words_per_row], device)?,
            rows,
            cols,
            pruned,
        })
    }

    /// Reassembles a mask from [`StaticMask::bits`] (as read from a checkpoint) of a (rows, cols)
    /// weight, on the bits' device; padding bits past `cols` must be 0.
    pub fn from_bits(bits: Tensor, rows: usize, cols: usize) -> Result<StaticMask> {
        const OP: &str = "StaticMask::from_bits";
        let words_per_row = cols.div_ceil(32);
        bits.expect_dtype(OP, "bits", &[DType::U32])?;
        bits.expect_shape(OP, "bits", &[rows, words_per_row])?;
        let words = bits.to_vec::<u32>()?;
        let mut kept = 0;
        for (i, &word) in words.iter().enumerate() {
            let valid = (cols - (i % words_per_row) * 32).min(32);
            let padding = if valid == 32 { 0 } else { !0u32 << valid };
            if word & padding != 0 {
                return Err(Error::invalid(
                    OP,
                    "bits",
                    format!("no bits set past column {cols}"),
                    format!("word {word:#010x} of row {}", i / words_per_row),
                ));
            }
            kept += word.count_ones() as usize;
        }
        Ok(StaticMask {
            bits,
            rows,
            cols,
            pruned: rows * cols - kept,
        })
    }

    /// The bitmask, u32 (rows, ceil(cols/32)), 1 = kept.
    pub fn bits(&self) -> &Tensor {
        &self.bits
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// How many entries the mask prunes.
    pub fn pruned_count(&self) -> usize {
        self.pruned
    }

    /// The fraction of entries kept.
    pub fn density(&self) -> f64 {
        1.0 - self.pruned as f64 / (self.rows * self.cols) as f64
    }

    /// The mask as u8 (rows, cols) on the host, 1 = kept.
    pub fn to_u8(&self) -> Result<Tensor> {
        let bits = self.bits.to_vec::<u32>()?;
        let words_per_row = self.cols.div_ceil(32);
        let flags: Vec<u8> = (0..self.rows * self.cols)
            .map(|i| {
                let (row, col) = (i / self.cols, i % self.cols);
                ((bits[row * words_per_row + col / 32] >> (col % 32)) & 1) as u8
            })
            .collect();
        Tensor::from_vec(flags, &[self.rows, self.cols], &Device::Cpu)
    }
}

impl std::fmt::Debug for StaticMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StaticMask({}x{}, density {:.4})",
            self.rows,
            self.cols,
            self.density()
        )
    }
}

/// Zeroes, in place, the entries of `t` (rows, cols; f32, bf16 or f16) that `mask` prunes.
pub fn spdf_apply_mask(t: &mut Tensor, mask: &StaticMask) -> Result<()> {
    t.expect_dtype(OP, "t", &[DType::F32, DType::BF16, DType::F16])?;
    t.expect_shape(OP, "t", &[mask.rows, mask.cols])?;
    t.device().expect_same(&mask.bits.device(), OP, "mask")?;
    match t.device() {
        Device::Cpu => with_float_type!(t.dtype(), OP, "t", T => apply_cpu::<T>(t, mask)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::apply(t, mask),
    }
}

fn apply_cpu<T: Float>(t: &mut Tensor, mask: &StaticMask) -> Result<()> {
    let bits = mask.bits.host_slice::<u32>()?.to_vec();
    let words_per_row = mask.cols.div_ceil(32);
    for (row, values) in t.host_slice_mut::<T>()?.chunks_mut(mask.cols).enumerate() {
        for (col, v) in values.iter_mut().enumerate() {
            if (bits[row * words_per_row + col / 32] >> (col % 32)) & 1 == 0 {
                *v = T::from_f32(0.0);
            }
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{CudaContextExt, LaunchConfig, PushKernelArg};

    pub(super) fn apply(t: &mut Tensor, mask: &StaticMask) -> Result<()> {
        let buffer = t.device_buffer()?;
        let backend = buffer.backend().clone();
        let name = format!("spdf_mask_apply_{}", t.dtype().name());
        let function = backend.function("sparse_nm", &name)?;
        let (t_address, bits_address) = (buffer.address(), mask.bits.device_buffer()?.address());
        let (rows, cols, words) = (mask.rows as i64, mask.cols as i64, mask.cols.div_ceil(32) as i64);
        let total = mask.rows * mask.cols;
        let mut builder = backend.launch_builder(&function);
        builder
            .arg(&t_address)
            .arg(&bits_address)
            .arg(&rows)
            .arg(&cols)
            .arg(&words);
        let launch = LaunchConfig {
            grid_dim: (
                total.div_ceil(256).clamp(1, backend.multiprocessors() * 16) as u32,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: t is (rows, cols) of the kernel's dtype and the bitmask (rows, ceil(cols/32))
        // u32 (validated); the grid-stride loop covers rows·cols elements.
        unsafe { builder.launch(launch) }.context(&format!("launching {name}"))?;
        Ok(())
    }
}
