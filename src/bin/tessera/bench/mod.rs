//! `tessera bench`: times each GPU op with CUDA events after a warm-up, takes the median over many
//! runs on inputs larger than the L2 cache, and reports it beside the ceilings measured in the
//! same run: device-to-device copy bandwidth and cuBLAS bf16 GEMM throughput. The JSON it writes
//! is what benches/torch_compare.py reads to run PyTorch on exactly the same cases.

mod activation;
mod adamw;
mod attention;
mod attention_decode;
mod binary;
mod columns;
mod cross_entropy;
mod embedding;
mod generate;
mod grad_norm;
mod lora;
mod matmul;
mod norm;
mod sampling;
mod sparse;
mod train;
mod wavelet;

use rayon::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;
use tessera::cuda::CudaBackend;
use tessera::{DType, Device, Tensor};

pub type Result<T> = std::result::Result<T, String>;

/// Input sets are rotated until one pass over them exceeds this, so that no run reads a cache.
pub const ROTATION_BYTES: usize = 256 << 20;

/// How many distinct input sets of `set_bytes` each a timing loop rotates through.
pub fn input_sets(set_bytes: usize) -> usize {
    ROTATION_BYTES.div_ceil(set_bytes.max(1)).clamp(1, 8)
}

pub struct Settings {
    pub warmup: usize,
    pub iterations: usize,
}

/// The op families, in the order they run. Each returns its result rows; a family module owns
/// its shapes, its timing loop and the JSON fields torch_compare.py reads for the same cases.
const FAMILIES: &[(&str, Family)] = &[
    ("matmul", matmul::run),
    ("adamw", adamw::run),
    ("wavelet", wavelet::run),
    ("columns", columns::run),
    ("sparse", sparse::run),
    ("lora", lora::run),
    ("attention", attention::run),
    ("activation", activation::run),
    ("norm", norm::run),
    ("cross_entropy", cross_entropy::run),
    ("embedding", embedding::run),
    ("grad_norm", grad_norm::run),
    ("sampling", sampling::run),
    ("binary", binary::run),
    ("train", train::run),
    ("generate", generate::run),
    ("attention_decode", attention_decode::run),
];

type Family = fn(&mut Context) -> Result<Vec<Value>>;

/// What every family needs: the device, the timing settings and the ceilings measured so far.
pub struct Context {
    pub gpu: Arc<CudaBackend>,
    pub device: Device,
    pub settings: Settings,
    /// Small shapes and few iterations: a smoke run, not a measurement.
    pub quick: bool,
    /// Device-to-device copy bandwidth (bytes read + written), measured first.
    pub copy_gbps: f64,
    /// The first bf16 cuBLASLt GEMM's TFLOP/s, when the matmul family ran.
    pub gemm_tflops: f64,
}

impl Context {
    /// Times `work` (given the iteration number) with CUDA events and returns the median in ms.
    pub fn median_ms(&self, work: impl FnMut(usize) -> tessera::Result<()>) -> Result<f64> {
        let samples = self
            .gpu
            .time_ms(self.settings.warmup, self.settings.iterations, work)
            .map_err(|e| e.to_string())?;
        Ok(median(samples))
    }

    /// `gbps` as a percentage of the copy bandwidth.
    pub fn pct_of_copy(&self, gbps: f64) -> f64 {
        100.0 * gbps / self.copy_gbps
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut json_path = None;
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut rest = args.iter();
    let names: Vec<&str> = FAMILIES.iter().map(|(name, _)| *name).collect();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--json" => json_path = Some(rest.next().ok_or("--json needs a file name")?.clone()),
            "--quick" => quick = true,
            "--only" => {
                let kinds = rest
                    .next()
                    .ok_or_else(|| format!("--only needs a list of kinds ({})", names.join(",")))?;
                let kinds: Vec<String> = kinds.split(',').map(str::to_string).collect();
                if let Some(unknown) = kinds.iter().find(|k| !names.contains(&k.as_str())) {
                    return Err(format!("--only: unknown kind `{unknown}` (kinds: {})", names.join(",")));
                }
                only = Some(kinds);
            }
            other => return Err(format!("bench: unknown argument `{other}`")),
        }
    }
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

    let mut context = Context {
        gpu: gpu.clone(),
        device: device.clone(),
        settings,
        quick,
        copy_gbps: f64::NAN,
        gemm_tflops: f64::NAN,
    };
    // The copy ceiling is always measured; the op families only when selected.
    let copy = bench_copy(&context, if quick { 256 << 20 } else { 2 << 30 })?;
    context.copy_gbps = copy["gbps"].as_f64().unwrap_or(f64::NAN);
    let mut results = vec![copy];
    for (name, family) in FAMILIES {
        if only.as_ref().is_none_or(|kinds| kinds.iter().any(|k| k == name)) {
            results.extend(family(&mut context)?);
        }
    }

    let report = json!({
        "tool": "tessera",
        "version": env!("CARGO_PKG_VERSION"),
        "device": gpu.name(),
        "compute_capability": format!("{major}.{minor}"),
        "kernel_image": gpu.kernel_image().map(|i| i.name()).unwrap_or("none"),
        "ceilings": { "copy_gbps": context.copy_gbps, "bf16_gemm_tflops": context.gemm_tflops },
        "warmup": context.settings.warmup,
        "iterations": context.settings.iterations,
        "results": results,
    });
    print_table(&report);
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

pub fn median(mut samples: Vec<f32>) -> f64 {
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

pub fn random_tensor(shape: &[usize], dtype: DType, seed: u64, low: f32, high: f32, device: &Device) -> Result<Tensor> {
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

fn bench_copy(context: &Context, bytes: usize) -> Result<Value> {
    let source = random_tensor(&[bytes / 4], DType::F32, 1, -1.0, 1.0, &context.device)?;
    let mut target = Tensor::zeros(&[bytes / 4], DType::F32, &context.device).map_err(|e| e.to_string())?;
    let ms = context.median_ms(|_| target.copy_from(&source))?;
    let moved = 2 * bytes;
    Ok(json!({
        "name": format!("copy {} MiB device to device", bytes >> 20),
        "kind": "copy",
        "bytes": bytes,
        "ms": ms,
        "gbps": moved as f64 / (ms * 1e6),
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
