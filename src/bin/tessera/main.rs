//! The tessera command line: `info` describes this machine's devices and the embedded kernels;
//! `bench` times the GPU ops against the ceilings measured in the same run.

#[cfg(feature = "cuda")]
mod bench;

use std::process::ExitCode;
use tessera::Device;

const USAGE: &str = "usage: tessera <command>

commands:
  info                       devices, compute capability, memory, embedded kernel images
  bench [--json FILE] [--quick] [--only KIND,...]
                             time the GPU ops (CUDA events, medians) beside the copy-bandwidth
                             and bf16-GEMM ceilings measured in the same run";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") => info(),
        Some("bench") => bench(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tessera: {message}");
            ExitCode::FAILURE
        }
    }
}

fn info() -> Result<(), String> {
    let features: &[&str] = if cfg!(feature = "cuda") { &["cuda"] } else { &[] };
    println!(
        "tessera {} (features: {})",
        env!("CARGO_PKG_VERSION"),
        if features.is_empty() {
            "none".into()
        } else {
            features.join(", ")
        }
    );
    println!("cpu: {} threads", rayon::current_num_threads());
    match Device::cuda(0) {
        Err(e) => println!(
            "cuda: not available: {}",
            e.to_string().trim_start_matches("no CUDA device: ")
        ),
        Ok(_) => {
            let count = Device::cuda_device_count();
            println!("cuda: {count} device(s)");
            #[cfg(feature = "cuda")]
            for ordinal in 0..count {
                if let Ok(Device::Cuda(gpu)) = Device::cuda(ordinal) {
                    let (major, minor) = gpu.compute_capability();
                    let image = gpu
                        .kernel_image()
                        .map(|i| i.name().to_string())
                        .unwrap_or_else(|e| e.to_string());
                    println!(
                        "  cuda:{ordinal}  {}  compute capability {major}.{minor}  {} SMs  {:.1} GiB  loads: {image}",
                        gpu.name(),
                        gpu.multiprocessors(),
                        gpu.total_memory() as f64 / (1u64 << 30) as f64
                    );
                }
            }
        }
    }
    #[cfg(feature = "cuda")]
    {
        use tessera::cuda::kernels;
        println!("embedded kernels:");
        for file in kernels::files() {
            println!(
                "  kernels/{}.cu: sm_90a cubin {} B, sm_80 cubin {} B, compute_80 PTX {} B",
                file.name,
                file.sm_90a.len(),
                file.sm_80.len(),
                file.compute_80.len()
            );
        }
        for k in kernels::resource_report() {
            println!(
                "    {:<28} {:<7} {:>3} registers  {:>6} B smem  {} B stack  {}/{} B spill st/ld",
                k.function, k.arch, k.registers, k.shared_bytes, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes
            );
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!("embedded kernels: none (built without the `cuda` feature)");
    Ok(())
}

#[cfg(feature = "cuda")]
fn bench(args: &[String]) -> Result<(), String> {
    bench::run(args)
}

#[cfg(not(feature = "cuda"))]
fn bench(_args: &[String]) -> Result<(), String> {
    Err("`bench` times GPU ops and needs a build with `--features cuda`; the CPU benchmarks are `cargo bench`".into())
}
