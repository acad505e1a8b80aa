//! With the `cuda` feature: compiles every kernels/*.cu with nvcc into an sm_90a cubin, an sm_80
//! cubin and compute_80 PTX, records ptxas's resource report, and writes `kernels.rs` into
//! OUT_DIR, which embeds them all (src/cuda/kernels.rs includes it). Without the feature it does
//! nothing, so the crate builds on machines with no CUDA toolkit. An image whose inputs (the
//! source, the shared headers in kernels/common, nvcc and its arguments) have not changed since
//! the last build is reused, so editing one kernel recompiles only that kernel.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

/// (file suffix, nvcc arguments) for each embedded image.
const TARGETS: [(&str, &[&str]); 3] = [
    ("sm_90a.cubin", &["-cubin", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("sm_80.cubin", &["-cubin", "-gencode=arch=compute_80,code=sm_80"]),
    ("compute_80.ptx", &["-ptx", "-arch=compute_80"]),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "TESSERA_CUDA_TOOLCHAIN", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let Some(nvcc) = find_nvcc() else {
        println!(
            "cargo::error=feature `cuda` needs nvcc: run `scripts/install-nvcc` (the pinned CUDA 13.0 \
             compiler from PyPI), or set NVCC or CUDA_HOME to an installed CUDA toolkit"
        );
        return;
    };
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = kernel_sources();
    for source in &sources {
        println!("cargo::rerun-if-changed={}", source.display());
    }
    let headers = shared_headers();
    let jobs: Vec<_> = sources
        .iter()
        .flat_map(|source| TARGETS.iter().map(move |target| (source.clone(), *target)))
        .map(|(source, (suffix, args))| {
            let nvcc = nvcc.clone();
            let out_dir = out_dir.clone();
            let headers = headers.clone();
            thread::spawn(move || compile(&nvcc, &source, &headers, &out_dir, suffix, args))
        })
        .collect();
    let mut report = String::new();
    let mut failures = Vec::new();
    for job in jobs {
        match job.join().expect("nvcc thread") {
            Ok(log) => report.push_str(&log),
            Err(message) => failures.push(message),
        }
    }
    if !failures.is_empty() {
        for failure in &failures {
            for line in failure.lines() {
                println!("cargo::warning={line}");
            }
        }
        println!(
            "cargo::error=nvcc failed on {} kernel target(s); its messages are above",
            failures.len()
        );
        return;
    }
    fs::write(out_dir.join("ptxas.txt"), report).expect("write ptxas report");
    fs::write(out_dir.join("kernels.rs"), embed(&sources, &out_dir)).expect("write kernels.rs");
}

/// nvcc from $NVCC, $CUDA_HOME or $CUDA_PATH, the project-local toolchain that
/// `scripts/install-nvcc` installs, or PATH, in that order.
fn find_nvcc() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(nvcc) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(nvcc));
    }
    for home in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(home) {
            candidates.push(Path::new(&home).join("bin/nvcc"));
        }
    }
    let cache = env::var_os("TESSERA_CUDA_TOOLCHAIN").map(PathBuf::from).or_else(|| {
        env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
            .map(|cache| cache.join("tessera/cuda-13.0.88"))
    });
    if let Some(cache) = cache {
        candidates.push(cache.join("nvidia/cu13/bin/nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.into_iter().find(|candidate| candidate.is_file())
}

fn kernel_sources() -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("read kernels/")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    sources
}

fn stem(source: &Path) -> String {
    source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("kernel file name is UTF-8")
        .to_string()
}

/// The contents of every file under kernels/common, which any kernel may include.
fn shared_headers() -> Vec<u8> {
    let mut paths: Vec<PathBuf> = fs::read_dir("kernels/common")
        .map(|dir| dir.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect())
        .unwrap_or_default();
    paths.sort();
    let mut bytes = Vec::new();
    for path in paths {
        bytes.extend(path.display().to_string().as_bytes());
        bytes.extend(fs::read(&path).unwrap_or_default());
    }
    bytes
}

/// Compiles one target; returns ptxas's report for cubins (empty for PTX), or nvcc's messages.
/// Reuses the previous image and report when nothing that goes into them has changed.
fn compile(
    nvcc: &Path,
    source: &Path,
    headers: &[u8],
    out_dir: &Path,
    suffix: &str,
    args: &[&str],
) -> Result<String, String> {
    let output_path = out_dir.join(format!("{}.{suffix}", stem(source)));
    let key_path = out_dir.join(format!("{}.{suffix}.key", stem(source)));
    let log_path = out_dir.join(format!("{}.{suffix}.log", stem(source)));
    let key = {
        let mut hasher = DefaultHasher::new();
        nvcc.hash(&mut hasher);
        args.hash(&mut hasher);
        headers.hash(&mut hasher);
        fs::read(source)
            .map_err(|e| format!("could not read {}: {e}", source.display()))?
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    };
    if output_path.is_file() && fs::read_to_string(&key_path).is_ok_and(|previous| previous == key) {
        if let Ok(log) = fs::read_to_string(&log_path) {
            return Ok(log);
        }
    }
    let mut command = Command::new(nvcc);
    command
        .args(args)
        .args([
            "-std=c++17",
            "-O3",
            "-lineinfo",
            "-Ikernels",
            "--Werror",
            "all-warnings",
        ])
        .arg("-o")
        .arg(&output_path)
        .arg(source);
    if suffix.ends_with("cubin") {
        command.arg("-Xptxas=-v,-warn-spills,-warn-lmem-usage");
    }
    let output = command
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!("nvcc {} ({suffix}):\n{log}", source.display()));
    }
    let report = if suffix.ends_with("cubin") {
        format!("== {} {}\n{log}", stem(source), suffix.trim_end_matches(".cubin"))
    } else {
        String::new()
    };
    fs::write(&log_path, &report).map_err(|e| format!("could not write {}: {e}", log_path.display()))?;
    fs::write(&key_path, key).map_err(|e| format!("could not write {}: {e}", key_path.display()))?;
    Ok(report)
}

fn embed(sources: &[PathBuf], out_dir: &Path) -> String {
    let path = |name: &str| format!("{:?}", out_dir.join(name).display().to_string());
    let mut code = String::from("pub(crate) static KERNEL_FILES: &[KernelFile] = &[\n");
    for source in sources {
        let stem = stem(source);
        code.push_str(&format!(
            "    KernelFile {{ name: {stem:?}, sm_90a: include_bytes!({}), sm_80: include_bytes!({}), \
             compute_80: include_str!({}) }},\n",
            path(&format!("{stem}.sm_90a.cubin")),
            path(&format!("{stem}.sm_80.cubin")),
            path(&format!("{stem}.compute_80.ptx")),
        ));
    }
    code.push_str("];\n");
    code.push_str(&format!(
        "pub(crate) static PTXAS_REPORT: &str = include_str!({});\n",
        path("ptxas.txt")
    ));
    code
}
