//! `tessera bench`: times each GPU op with CUDA events after a warm-up, takes the median over many
//! runs on inputs larger than the L2 cache, and reports it beside the ceilings measured in the
//! same run: device-to-device copy bandwidth and cuBLAS bf16 GEMM throughput. The JSON it writes
//! is what benches/torch_compare.py reads to run PyTorch on exactly the same cases.

use rayon::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;
use tessera::cuda::CudaBackend;
use tessera::ops::{self, AdamWConfig, AdamWTensor, MatmulOptions, WaveletConfig};
use tessera::{DType, Device, Tensor};

type Result<T> = std::result::Result<T, String>;

/// Bytes AdamW must move per parameter with f32 gradients: param, m and v read and written, the
/// gradient read (the convention PyTorch's number is quoted in).
const ADAMW_BYTES_PER_PARAM: usize = 28;

/// Input sets are rotated until one pass over them exceeds this, so that no run reads a cache.
const ROTATION_BYTES: usize = 256 << 20;

struct Settings {
    warmup: usize,
    iterations: usize,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut json_path = None;
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--json" => json_path = Some(rest.next().ok_or("--json needs a file name")?.clone()),
            "--quick" => quick = true,
            "--only" => {
                let kinds = rest
                    .next()
                    .ok_or("--only needs a list of kinds (matmul,adamw,wavelet)")?;
                only = Some(kinds.split(',').map(str::to_string).collect());
            }
            other => return Err(format!("bench: unknown argument `{other}`")),
        }
    }
    // The copy ceiling is always measured; the op families only when selected.
    let selected = |kind: &str| only.as_ref().is_none_or(|kinds| kinds.iter().any(|k| k == kind));
    let device = Device::cuda(0).map_err(|e| e.to_string())?;
    let Device::Cuda(gpu) = &device else {
        return Err("bench needs a CUDA device".into());
    };
    let settings = if quick {
        Settings {
            warmup: 2,
            iterations: 5,
        }
    } else {
        Settings {
            warmup: 10,
            iterations: 50,
        }
    };
    let (major, minor) = gpu.compute_capability();
    eprintln!("benchmarking on {} (compute capability {major}.{minor})", gpu.name());

    let mut results = Vec::new();
    let copy = bench_copy(gpu, &device, &settings, if quick { 256 << 20 } else { 2 << 30 })?;
    let copy_gbps = copy["gbps"].as_f64().unwrap_or(f64::NAN);
    results.push(copy);

    let gemm_shapes: &[(DType, usize, usize, usize)] = if quick {
        &[(DType::BF16, 1024, 1024, 1024)]
    } else {
        &[
            (DType::BF16, 8192, 8192, 8192),
            (DType::BF16, 4096, 4096, 4096),
            (DType::BF16, 4096, 11008, 4096),
            (DType::F16, 4096, 4096, 4096),
            (DType::F32, 4096, 4096, 4096),
        ]
    };
    let mut gemm_ceiling = f64::NAN;
    for &(dtype, m, n, k) in gemm_shapes.iter().filter(|_| selected("matmul")) {
        let mut result = bench_matmul(gpu, &device, &settings, dtype, m, n, k)?;
        let tflops = result["tflops"].as_f64().unwrap_or(f64::NAN);
        if dtype == DType::BF16 && gemm_ceiling.is_nan() {
            gemm_ceiling = tflops;
        }
        result["pct_of_gemm_ceiling"] = json!(100.0 * tflops / gemm_ceiling);
        results.push(result);
        if dtype == DType::BF16 {
            gpu.set_matmul_autotune(true);
            let mut tuned = bench_matmul(gpu, &device, &settings, dtype, m, n, k);
            gpu.set_matmul_autotune(false);
            if let Ok(tuned) = &mut tuned {
                tuned["name"] = json!(format!("{} autotuned", tuned["name"].as_str().unwrap_or("matmul")));
                tuned["autotune"] = json!(true);
                let tflops = tuned["tflops"].as_f64().unwrap_or(f64::NAN);
                tuned["pct_of_gemm_ceiling"] = json!(100.0 * tflops / gemm_ceiling);
            }
            results.push(tuned?);
        }
    }

    let big = if quick { 1 << 24 } else { 256 << 20 };
    let adamw_cases: Vec<(String, Vec<usize>, DType, bool)> = vec![
        (
            format!("adamw {}M params, f32 grad", big >> 20),
            vec![big],
            DType::F32,
            false,
        ),
        (
            format!("adamw {}M params, bf16 grad, bf16 copy", big >> 20),
            vec![big],
            DType::BF16,
            true,
        ),
        (
            "adamw gpt2-small (148 tensors), f32 grad".into(),
            gpt2_small_sizes(),
            DType::F32,
            false,
        ),
    ];
    for (name, sizes, grad, copy) in adamw_cases.into_iter().filter(|_| selected("adamw")) {
        let mut result = bench_adamw(gpu, &device, &settings, &name, &sizes, grad, copy)?;
        let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
        result["pct_of_copy"] = json!(100.0 * gbps / copy_gbps);
        results.push(result);
    }

    let wavelet_shapes: &[(usize, usize, usize)] = if quick {
        &[(2, 512, 256)]
    } else {
        &[(8, 4096, 1024), (16, 2048, 768)]
    };
    for &(batch, seq, dim) in wavelet_shapes.iter().filter(|_| selected("wavelet")) {
        for direction in [Direction::Forward, Direction::Backward] {
            let mut result = bench_wavelet(gpu, &device, &settings, batch, seq, dim, direction)?;
            let gbps = result["gbps"].as_f64().unwrap_or(f64::NAN);
            result["pct_of_copy"] = json!(100.0 * gbps / copy_gbps);
            results.push(result);
        }
    }

    let report = json!({
        "tool": "tessera",
        "version": env!("CARGO_PKG_VERSION"),
        "device": gpu.name(),
        "compute_capability": format!("{major}.{minor}"),
        "kernel_image": gpu.kernel_image().map(|i| i.name()).unwrap_or("none"),
        "ceilings": { "copy_gbps": copy_gbps, "bf16_gemm_tflops": gemm_ceiling },
        "warmup": settings.warmup,
        "iterations": settings.iterations,
        "results": results,
    });
    print_table(&report);
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

fn median(mut samples: Vec<f32>) -> f64 {
    samples.sort_by(f32::total_cmp);
    let mid = samples.len() / 2;
    if samples.len() % 2 == 1 {
        samples[mid] as f64
    } else {
        (samples[mid - 1] as f64 + samples[mid] as f64) / 2.0
    }
}

/// Uniform values in [low, high), from a per-chunk SplitMix64 stream (fast, and never all zeros).
fn random_f32(len: usize, seed: u64, low: f32, high: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, values)| {
        let mut state = seed ^ (chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for value in values {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            *value = low + (high - low) * unit;
        }
    });
    out
}

fn random_tensor(shape: &[usize], dtype: DType, seed: u64, low: f32, high: f32, device: &Device) -> Result<Tensor> {
    let values = random_f32(shape.iter().product(), seed, low, high);
    let tensor = match dtype {
        DType::F32 => Tensor::from_vec(values, shape, device),
        DType::BF16 => Tensor::from_vec(
            values.into_par_iter().map(half::bf16::from_f32).collect(),
            shape,
            device,
        ),
        DType::F16 => Tensor::from_vec(values.into_par_iter().map(half::f16::from_f32).collect(), shape, device),
        other => return Err(format!("no random {other} tensors")),
    };
    tensor.map_err(|e| e.to_string())
}

fn bench_copy(gpu: &Arc<CudaBackend>, device: &Device, settings: &Settings, bytes: usize) -> Result<Value> {
    let source = random_tensor(&[bytes / 4], DType::F32, 1, -1.0, 1.0, device)?;
    let mut target = Tensor::zeros(&[bytes / 4], DType::F32, device).map_err(|e| e.to_string())?;
    let samples = gpu
        .time_ms(settings.warmup, settings.iterations, |_| target.copy_from(&source))
        .map_err(|e| e.to_string())?;
    let ms = median(samples);
    let moved = 2 * bytes;
    Ok(json!({
        "name": format!("copy {} MiB device to device", bytes >> 20),
        "kind": "copy",
        "bytes": bytes,
        "ms": ms,
        "gbps": moved as f64 / (ms * 1e6),
    }))
}

fn bench_matmul(
    gpu: &Arc<CudaBackend>,
    device: &Device,
    settings: &Settings,
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
) -> Result<Value> {
    let set_bytes = (m * k + k * n) * dtype.size_in_bytes();
    let sets = ROTATION_BYTES.div_ceil(set_bytes).clamp(1, 8);
    let inputs: Vec<(Tensor, Tensor)> = (0..sets as u64)
        .map(|s| {
            Ok((
                random_tensor(&[m, k], dtype, 10 + s, -1.0, 1.0, device)?,
                random_tensor(&[k, n], dtype, 100 + s, -1.0, 1.0, device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut out = Tensor::zeros(&[m, n], dtype, device).map_err(|e| e.to_string())?;
    let samples = gpu
        .time_ms(settings.warmup, settings.iterations, |i| {
            let (a, b) = &inputs[i % sets];
            ops::matmul_into(a, b, None, &mut out, MatmulOptions::default())
        })
        .map_err(|e| e.to_string())?;
    let ms = median(samples);
    Ok(json!({
        "name": format!("matmul {dtype} {m}x{n}x{k}"),
        "kind": "matmul",
        "dtype": dtype.name(),
        "m": m, "n": n, "k": k,
        "input_sets": sets,
        "ms": ms,
        "tflops": 2.0 * (m * n * k) as f64 / (ms * 1e9),
    }))
}

/// GPT-2 small's parameter tensors in Hugging Face order: 124M parameters in 148 tensors.
fn gpt2_small_sizes() -> Vec<usize> {
    let (vocab, context, width) = (50257, 1024, 768);
    let mut sizes = vec![vocab * width, context * width];
    for _ in 0..12 {
        sizes.extend([width, width, width * 3 * width, 3 * width, width * width, width]);
        sizes.extend([width, width, width * 4 * width, 4 * width, 4 * width * width, width]);
    }
    sizes.extend([width, width]);
    sizes
}

struct AdamWState {
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param_bf16: Option<Tensor>,
}

fn bench_adamw(
    gpu: &Arc<CudaBackend>,
    device: &Device,
    settings: &Settings,
    name: &str,
    sizes: &[usize],
    grad: DType,
    copy: bool,
) -> Result<Value> {
    let mut states: Vec<AdamWState> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let seed = 1000 + 4 * i as u64;
            Ok(AdamWState {
                param: random_tensor(&[n], DType::F32, seed, -1.0, 1.0, device)?,
                grad: random_tensor(&[n], grad, seed + 1, -1e-2, 1e-2, device)?,
                exp_avg: random_tensor(&[n], DType::F32, seed + 2, -1e-3, 1e-3, device)?,
                exp_avg_sq: random_tensor(&[n], DType::F32, seed + 3, 0.0, 1e-5, device)?,
                param_bf16: if copy {
                    Some(Tensor::zeros(&[n], DType::BF16, device).map_err(|e| e.to_string())?)
                } else {
                    None
                },
            })
        })
        .collect::<Result<_>>()?;
    let config = AdamWConfig::default();
    let mut step = 0u64;
    let samples = gpu
        .time_ms(settings.warmup, settings.iterations, |_| {
            step += 1;
            let mut tensors: Vec<AdamWTensor> = states
                .iter_mut()
                .map(|s| AdamWTensor {
                    param: &mut s.param,
                    grad: &s.grad,
                    exp_avg: &mut s.exp_avg,
                    exp_avg_sq: &mut s.exp_avg_sq,
                    param_bf16: s.param_bf16.as_mut(),
                    weight_decay: true,
                })
                .collect();
            ops::adamw_step(&mut tensors, &config, step, 1.0)
        })
        .map_err(|e| e.to_string())?;
    let ms = median(samples);
    let params: usize = sizes.iter().sum();
    let moved = params * (24 + grad.size_in_bytes() + if copy { 2 } else { 0 });
    Ok(json!({
        "name": name,
        "kind": "adamw",
        "sizes": sizes,
        "params": params,
        "tensors": sizes.len(),
        "grad_dtype": grad.name(),
        "bf16_copy": copy,
        "ms": ms,
        "gbps": (params * ADAMW_BYTES_PER_PARAM) as f64 / (ms * 1e6),
        "gbps_moved": moved as f64 / (ms * 1e6),
    }))
}

fn print_table(report: &Value) {
    println!(
        "{:<48} {:>10} {:>10} {:>10} {:>8}",
        "case", "ms", "TFLOP/s", "GB/s", "% ceil"
    );
    for r in report["results"].as_array().into_iter().flatten() {
        let number = |key: &str| r[key].as_f64().map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let pct = r
            .get("pct_of_copy")
            .or_else(|| r.get("pct_of_gemm_ceiling"))
            .and_then(Value::as_f64);
        println!(
            "{:<48} {:>10.3} {:>10} {:>10} {:>8}",
            r["name"].as_str().unwrap_or("?"),
            r["ms"].as_f64().unwrap_or(f64::NAN),
            number("tflops"),
            number("gbps"),
            pct.map(|p| format!("{p:.1}")).unwrap_or_else(|| "-".into())
        );
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Forward,
    Backward,
}

/// Wavelet mixing with the spec's defaults (first half of the coordinates, windows 2..seq), bf16:
/// each element read once and written once, so GB/s counts 4 bytes per element.
fn bench_wavelet(
    gpu: &Arc<CudaBackend>,
    device: &Device,
    settings: &Settings,
    batch: usize,
    seq: usize,
    dim: usize,
    direction: Direction,
) -> Result<Value> {
    let config = WaveletConfig::paper_default(dim, seq).map_err(|e| e.to_string())?;
    let shape = [batch, seq, dim];
    let bytes = batch * seq * dim * 2;
    let sets = ROTATION_BYTES.div_ceil(bytes).clamp(1, 8);
    let inputs: Vec<Tensor> = (0..sets as u64)
        .map(|s| random_tensor(&shape, DType::BF16, 500 + s, -1.0, 1.0, device))
        .collect::<Result<_>>()?;
    let mut out = Tensor::zeros(&shape, DType::BF16, device).map_err(|e| e.to_string())?;
    let samples = gpu
        .time_ms(settings.warmup, settings.iterations, |i| match direction {
            Direction::Forward => ops::wavelet_forward_into(&inputs[i % sets], None, &config, &mut out),
            Direction::Backward => ops::wavelet_backward_into(&inputs[i % sets], &config, &mut out),
        })
        .map_err(|e| e.to_string())?;
    let ms = median(samples);
    let name = if direction == Direction::Forward {
        "forward"
    } else {
        "backward"
    };
    Ok(json!({
        "name": format!("wavelet {name} bf16 {batch}x{seq}x{dim}"),
        "kind": "wavelet",
        "direction": name,
        "batch": batch, "seq": seq, "dim": dim,
        "windows": config.windows(),
        "input_sets": sets,
        "ms": ms,
        "gbps": (2 * bytes) as f64 / (ms * 1e6),
    }))
}
