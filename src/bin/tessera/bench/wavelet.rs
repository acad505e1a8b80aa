//! Wavelet mixing forward and backward with the spec's defaults, bf16, against the copy ceiling:
//! each case with both box-window kernels (`ops::WaveletKernel`).

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops::{self, WaveletConfig, WaveletKernel};
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let shapes: &[(usize, usize, usize)] = if context.quick {
        &[(2, 512, 256)]
    } else {
        &[(8, 4096, 1024), (16, 2048, 768)]
    };
    let mut results = Vec::new();
    for &(batch, seq, dim) in shapes {
        for direction in [Direction::Forward, Direction::Backward] {
            for kernel in [WaveletKernel::Segments, WaveletKernel::Tiles] {
                ops::set_wavelet_kernel(kernel);
                let result = bench_wavelet(context, batch, seq, dim, direction, kernel);
                ops::set_wavelet_kernel(WaveletKernel::Segments);
                let mut result = result?;
                let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
                result["pct_of_copy"] = json!(context.pct_of_copy(gbps));
                results.push(result);
            }
        }
    }
    Ok(results)
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Forward,
    Backward,
}

/// Wavelet mixing with the spec's defaults (first half of the coordinates, windows 2..seq), bf16:
/// each element read once and written once, so GB/s counts 4 bytes per element.
fn bench_wavelet(
    context: &Context,
    batch: usize,
    seq: usize,
    dim: usize,
    direction: Direction,
    kernel: WaveletKernel,
) -> Result<Value> {
    let device = &context.device;
    let config = WaveletConfig::paper_default(dim, seq).map_err(|e| e.to_string())?;
    let shape = [batch, seq, dim];
    let bytes = batch * seq * dim * 2;
    let sets = input_sets(bytes);
    let inputs: Vec<Tensor> = (0..sets as u64)
        .map(|s| random_tensor(&shape, DType::BF16, 500 + s, -1.0, 1.0, device))
        .collect::<Result<_>>()?;
    let mut out = Tensor::zeros(&shape, DType::BF16, device).map_err(|e| e.to_string())?;
    let ms = context.median_ms(|i| match direction {
        Direction::Forward => ops::wavelet_forward_into(&inputs[i % sets], None, &config, &mut out),
        Direction::Backward => ops::wavelet_backward_into(&inputs[i % sets], &config, &mut out),
    })?;
    let name = if direction == Direction::Forward {
        "forward"
    } else {
        "backward"
    };
    let kernel_name = match kernel {
        WaveletKernel::Segments => "segments",
        WaveletKernel::Tiles => "tiles",
    };
    Ok(json!({
        "name": format!("wavelet {name} bf16 {batch}x{seq}x{dim} ({kernel_name})"),
        "kind": "wavelet",
        "direction": name,
        "kernel": kernel_name,
        "batch": batch, "seq": seq, "dim": dim,
        "windows": config.windows(),
        "input_sets": sets,
        "ms": ms,
        "gbps": (2 * bytes) as f64 / (ms * 1e6),
    }))
}
