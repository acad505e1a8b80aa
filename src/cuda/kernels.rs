//! The kernel images embedded at build time (see build.rs), the choice of image for a device,
//! and ptxas's resource report for every kernel.

use crate::error::{Error, Result};
use cudarc::nvrtc::Ptx;

/// The three images compiled from one `kernels/<name>.cu`.
pub struct KernelFile {
    /// The file stem, e.g. `adamw`.
    pub name: &'static str,
    /// Machine code for Hopper (compute capability 9.0), with its sm_90a-only instructions.
    pub sm_90a: &'static [u8],
    /// Machine code for compute capability 8.x.
    pub sm_80: &'static [u8],
    /// PTX that the driver compiles at load time for GPUs newer than both.
    pub compute_80: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The embedded kernel files.
pub fn files() -> &'static [KernelFile] {
    KERNEL_FILES
}

/// Which of a file's images a device loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Sm90a,
    Sm80,
    Compute80Ptx,
}

impl ImageKind {
    /// sm_90a cubins run only on 9.0 and sm_80 cubins only on 8.x; anything newer JIT-compiles
    /// the PTX; anything older than 8.0 lacks the bf16 tensor cores the kernels are written for.
    pub fn for_compute_capability((major, minor): (i32, i32)) -> Result<ImageKind> {
        match (major, minor) {
            (9, 0) => Ok(ImageKind::Sm90a),
            (8, _) => Ok(ImageKind::Sm80),
            (m, _) if m >= 9 => Ok(ImageKind::Compute80Ptx),
            _ => Err(Error::Unsupported {
                op: "kernel loading",
                reason: format!("compute capability {major}.{minor} is below 8.0, the oldest tessera supports"),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Sm90a => "sm_90a cubin",
            ImageKind::Sm80 => "sm_80 cubin",
            ImageKind::Compute80Ptx => "compute_80 PTX (JIT)",
        }
    }
}

pub(crate) fn image(file: &str, kind: ImageKind) -> Result<Ptx> {
    let entry = KERNEL_FILES
        .iter()
        .find(|entry| entry.name == file)
        .ok_or_else(|| Error::cuda("kernel loading", format!("no embedded kernel file `{file}`")))?;
    Ok(match kind {
        ImageKind::Sm90a => Ptx::from_binary(entry.sm_90a.to_vec()),
        ImageKind::Sm80 => Ptx::from_binary(entry.sm_80.to_vec()),
        ImageKind::Compute80Ptx => Ptx::from_src(entry.compute_80),
    })
}

/// What ptxas reported for one kernel on one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub file: String,
    pub arch: String,
    pub function: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

impl KernelResources {
    /// True when the kernel uses local memory: a stack frame or spills.
    pub fn uses_local_memory(&self) -> bool {
        self.stack_bytes > 0 || self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Every kernel's registers, shared memory, stack and spills, as ptxas reported them at build time.
pub fn resource_report() -> Vec<KernelResources> {
    parse_ptxas_report(PTXAS_REPORT)
}

/// The number just before `unit` in `line` ("86 registers" -> 86).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

fn parse_ptxas_report(report: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    let (mut file, mut arch) = (String::new(), String::new());
    for line in report.lines() {
        if let Some(header) = line.strip_prefix("== ") {
            let mut words = header.split_whitespace();
            file = words.next().unwrap_or_default().to_string();
            arch = words.next().unwrap_or_default().to_string();
        } else if let Some(name) = line.split("Function properties for ").nth(1) {
            kernels.push(KernelResources {
                file: file.clone(),
                arch: arch.clone(),
                function: name.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(kernel) = kernels.last_mut() {
            if line.contains("stack frame") {
                kernel.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                kernel.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                kernel.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                kernel.registers = number_before(line, "registers").unwrap_or(0);
                kernel.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let report = "== adamw sm_90a\nptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                      ptxas info    : Function properties for k\n    \
                      8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                      ptxas info    : Used 86 registers, used 1 barriers, 4 bytes smem\n";
        let kernels = parse_ptxas_report(report);
        assert_eq!(
            kernels,
            vec![KernelResources {
                file: "adamw".into(),
                arch: "sm_90a".into(),
                function: "k".into(),
                registers: 86,
                shared_bytes: 4,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12,
            }]
        );
        assert!(kernels[0].uses_local_memory());
    }
}
