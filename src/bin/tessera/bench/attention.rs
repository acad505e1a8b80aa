//! Flash attention, bf16, on the shapes of the FlashAttention papers (batch × seq = 16k tokens,
//! heads × head_dim = 2048, seq 1k/4k/16k, head_dim 64/128, causal and not), forward and
//! forward+backward, and the sliding-window and Λ masks at seq 16k (1 × 16 heads × d128, window
//! 4096, 4 global tokens) beside dense causal. torch_compare.py runs SDPA's flash and cuDNN
//! backends on the dense cases and compiled flex_attention on the masked ones.
//!
//! On a Hopper GPU (sm_90a image) the forward cases without RoPE inside (dense, window and Λ) run
//! a second time with the sm_90a kernels forced (rows named `... sm90`, field `kernel`), and the
//! dense and causal ones forward+backward too, beside the default mma.sync rows and the same SDPA /
//! flex_attention anchors.
//!
//! The Λ mask also runs with RoPE inside and LM-Infinite's distance ceiling at the window (the
//! global keys beyond it scored from the query rotated to the ceiling and the un-rotated keys),
//! beside two compiled flex_attention passes (one per branch) merged by their log-sum-exp.
//!
//! FLOP convention of the papers: forward 4·B·H·S²·D, halved when causal (the window and Λ cases
//! are counted as causal, so their TFLOP/s shows what skipping tiles buys), forward+backward 3.5x.

use super::{random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::cuda::kernels::ImageKind;
use tessera::ops::{
    attention_backward, attention_forward, with_attention_kernel, AttentionKernel, AttentionMask, AttentionOptions,
    AttentionRope, RopeConfig, RopeConvention,
};
use tessera::DType;

/// Compute-bound cases of tens of milliseconds: few runs keep the family within its time budget.
const WARMUP: usize = 3;
const ITERATIONS: usize = 10;

#[derive(Clone, Copy)]
struct Case {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    mask: AttentionMask,
    /// RoPE inside (base 10⁴, rotate-half) with this distance ceiling.
    ceiling: Option<usize>,
}

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let mut cases = Vec::new();
    let dense_seqs: &[usize] = if context.quick { &[1024] } else { &[1024, 4096, 16384] };
    for &head_dim in &[64usize, 128] {
        for &seq in dense_seqs {
            for mask in [AttentionMask::None, AttentionMask::Causal] {
                cases.push(Case {
                    batch: 16384 / seq,
                    seq,
                    heads: 2048 / head_dim,
                    head_dim,
                    mask,
                    ceiling: None,
                });
            }
        }
    }
    let long = if context.quick { 2048 } else { 16384 };
    // Dense causal at this shape is among the cases above.
    let lambda = AttentionMask::Lambda {
        global: 4,
        window: 4096,
    };
    for (mask, ceiling) in [
        (AttentionMask::Window { left: 4095, right: 0 }, None),
        (lambda, None),
        (lambda, Some(4096)),
    ] {
        cases.push(Case {
            batch: 1,
            seq: long,
            heads: 16,
            head_dim: 128,
            mask,
            ceiling,
        });
    }
    let hopper = context.gpu.kernel_image().map_err(|e| e.to_string())? == ImageKind::Sm90a;
    let mut results = Vec::new();
    for case in cases {
        for backward in [false, true] {
            results.push(bench_attention(context, case, backward, AttentionKernel::MmaSync)?);
        }
        if hopper && case.ceiling.is_none() {
            results.push(bench_attention(context, case, false, AttentionKernel::Hopper)?);
            // The sm_90a backward serves the dense and causal masks only.
            if matches!(case.mask, AttentionMask::None | AttentionMask::Causal) {
                results.push(bench_attention(context, case, true, AttentionKernel::Hopper)?);
            }
        }
    }
    Ok(results)
}

fn mask_fields(mask: AttentionMask) -> (&'static str, usize, usize) {
    match mask {
        AttentionMask::None => ("none", 0, 0),
        AttentionMask::Causal => ("causal", 0, 0),
        AttentionMask::Window { left, .. } => ("window", left + 1, 0),
        AttentionMask::Lambda { global, window } => ("lambda", window, global),
    }
}

fn bench_attention(context: &Context, case: Case, backward: bool, kernel: AttentionKernel) -> Result<Value> {
    let device = &context.device;
    let Case {
        batch,
        seq,
        heads,
        head_dim,
        mask,
        ceiling,
    } = case;
    let shape = [batch, seq, heads, head_dim];
    let tensor = |seed| random_tensor(&shape, DType::BF16, seed, -1.0, 1.0, device);
    let (q, k, v, d_out) = (tensor(700)?, tensor(701)?, tensor(702)?, tensor(703)?);
    let rope = match ceiling {
        Some(_) => Some(AttentionRope {
            config: RopeConfig::single(head_dim, 1e4, RopeConvention::RotateHalf).map_err(|e| e.to_string())?,
            distance_ceiling: ceiling,
        }),
        None => None,
    };
    let options = AttentionOptions {
        mask,
        rope,
        ..Default::default()
    };
    let err = |e: tessera::Error| e.to_string();
    let samples = context
        .gpu
        .time_ms(WARMUP, ITERATIONS, |_| {
            with_attention_kernel(kernel, || {
                let (out, lse) = attention_forward(&q, &k, &v, &options)?;
                if backward {
                    attention_backward(&d_out, &q, &k, &v, &out, &lse, &options)?;
                }
                Ok(())
            })
        })
        .map_err(err)?;
    let ms = super::median(samples);
    let (mask_name, window, global) = mask_fields(mask);
    let mut flop = 4.0 * (batch * heads * head_dim) as f64 * (seq * seq) as f64;
    if mask != AttentionMask::None {
        flop /= 2.0;
    }
    if backward {
        flop *= 3.5;
    }
    let direction = if backward { "fwd+bwd" } else { "fwd" };
    let suffix = match kernel {
        AttentionKernel::Hopper => " sm90",
        _ => "",
    };
    // The ceiling's cases have their own PyTorch anchor (RoPE and two flex_attention passes).
    let (kind, label) = match ceiling {
        Some(d) => ("attention_ceiling", format!("{mask_name}+rope+ceiling{d}")),
        None => ("attention", mask_name.to_string()),
    };
    Ok(json!({
        "name": format!("attention {direction} {label} {batch}x{seq}x{heads}x{head_dim}{suffix}"),
        "kind": kind,
        "kernel": if suffix.is_empty() { "mma.sync" } else { "sm90" },
        "ceiling": ceiling,
        "direction": direction,
        "dtype": "bf16",
        "batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim,
        "mask": mask_name, "window": window, "global": global,
        "warmup": WARMUP, "iterations": ITERATIONS,
        "ms": ms,
        "tflops": flop / (ms * 1e9),
    }))
}
