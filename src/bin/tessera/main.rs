//! The tessera command line: `train`, `generate` and `eval` run models; `export` writes a
//! checkpoint's inference form (binary layers packed, 2:4 layers compressed); `info` describes this
//! machine's devices and the embedded kernels; `bench` times the GPU ops against the ceilings
//! measured in the same run.
//!
//! Exit codes: 0 success, 1 failure, 2 bad arguments or input, 3 training diverged.

mod args;
#[cfg(feature = "cuda")]
mod bench;
mod eval;
mod export;
mod generate;
mod recipes;
mod train;

use std::process::ExitCode;
use tessera::Device;
use train::Failure;

const USAGE: &str = "usage: tessera <command> [options]   (tessera <command> --help for its options)

commands:
  train                      train a GPT (default: a tiny model on the embedded corpus)
  generate                   sample text from a checkpoint
  eval                       loss and perplexity of a checkpoint on a text file
  export --packed | --sparse24
                             a checkpoint in an inference form: binary layers packed 1 bit
                             per weight, or 2:4 layers compressed (generate and eval run it;
                             train refuses it)
  info [--preset NAME] [--config FILE]
                             devices, compute capability, memory, embedded kernel images; with
                             a preset or a train config, the model's linear layers: each one's
                             variant, parameters, kept weights, checkpoint bytes and the
                             bytes inference reads (binary layers packed)
  bench [--json FILE] [--quick] [--only KIND,...]
                             time the GPU ops (CUDA events, medians) beside the copy-bandwidth
                             and bf16-GEMM ceilings measured in the same run
  bench recipes              train the tiny preset once per training recipe, same token budget,
                             and print one table beside the dense baseline (CPU or GPU)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str);
    let rest = args.get(1..).unwrap_or_default();
    let wants_help = rest.iter().any(|a| a == "-h" || a == "--help");
    let result = match command {
        Some("train") if wants_help => help(train::USAGE),
        Some("generate") if wants_help => help(generate::USAGE),
        Some("eval") if wants_help => help(eval::USAGE),
        Some("export") if wants_help => help(export::USAGE),
        Some("train") => train::run(rest),
        Some("generate") => generate::run(rest),
        Some("eval") => eval::run(rest),
        Some("export") => export::run(rest),
        Some("info") => info(rest),
        Some("bench") if rest.first().is_some_and(|a| a == "recipes") => match wants_help {
            true => help(recipes::USAGE),
            false => recipes::run(&rest[1..]),
        },
        Some("bench") => bench(rest).map_err(Failure::Other),
        Some("-h" | "--help" | "help") => help(USAGE),
        Some(other) => Err(Failure::Usage(format!("unknown command `{other}`\n\n{USAGE}"))),
        None => Err(Failure::Usage(USAGE.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("tessera: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Diverged(message)) => {
            eprintln!("tessera: {message}");
            ExitCode::from(3)
        }
        Err(Failure::Other(message)) => {
            eprintln!("tessera: {message}");
            ExitCode::FAILURE
        }
    }
}

fn help(text: &str) -> Result<(), Failure> {
    println!("{text}");
    Ok(())
}

/// `--device cpu|cuda`, or the GPU when one is usable and the CPU otherwise.
fn device_option(args: &mut args::Args) -> Result<Device, Failure> {
    match args.value("--device").map_err(Failure::Usage)?.as_deref() {
        None => Ok(Device::cuda_if_available()),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Ok(Device::cuda(0)?),
        Some(other) => Err(Failure::Usage(format!("--device {other}: expected cpu or cuda"))),
    }
}

fn info(rest: &[String]) -> Result<(), Failure> {
    let mut args = args::Args::new(rest);
    let preset = args.value("--preset").map_err(Failure::Usage)?;
    let config_file = args.value("--config").map_err(Failure::Usage)?;
    args.finish().map_err(Failure::Usage)?;
    machine_info().map_err(Failure::Other)?;
    if preset.is_some() || config_file.is_some() {
        let preset = preset.unwrap_or_else(|| "tiny".into());
        let (config, variants, _) = train::configuration(&preset, config_file.as_deref())?;
        model_info(&config, &variants)?;
    }
    Ok(())
}

/// The model's block linear layers: variant, trainable parameters, kept weights, checkpoint bytes,
/// and the bytes a forward reads at inference.
fn model_info(config: &tessera::model::GptConfig, variants: &tessera::model::LinearVariants) -> Result<(), Failure> {
    let layers = tessera::model::params::linear_summary(config, variants)?;
    println!(
        "model: {} parameters when dense, {} layers, width {}; block linear layers:",
        config.parameter_count(),
        config.layers,
        config.width
    );
    let (mut parameters, mut kept, mut bytes, mut inference) = (0, 0, 0, 0);
    for layer in &layers {
        println!(
            "  {:<36} {:>10} params {:>10} kept {:>11} B {:>11} B at inference  {}",
            layer.name, layer.parameters, layer.kept, layer.bytes, layer.inference_bytes, layer.spec
        );
        parameters += layer.parameters;
        kept += layer.kept;
        bytes += layer.bytes;
        inference += layer.inference_bytes;
    }
    println!(
        "  total: {parameters} params, {kept} kept weights, {bytes} B in a checkpoint, {inference} B read at \
         inference (bf16 weights; binary layers packed)"
    );
    Ok(())
}

fn machine_info() -> Result<(), String> {
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
