//! ptxas's resource report, recorded at build time for every kernel: every kernel file is
//! compiled for both cubin targets, and no kernel uses local memory (a stack frame or register
//! spills) unless kernels/local-memory-allowlist.txt names it with a reason.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use tessera::cuda::kernels::{files, resource_report, KernelResources};

/// The cubin targets that build.rs compiles every kernel file for.
const ARCHS: [&str; 2] = ["sm_90a", "sm_80"];

const ALLOWLIST: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/kernels/local-memory-allowlist.txt"
));

/// The allow-list: function name -> reason. Errs on an entry without a reason or a duplicate.
fn parse_allowlist(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut entries = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (function, reason) = line
            .split_once(char::is_whitespace)
            .map(|(f, r)| (f, r.trim()))
            .unwrap_or((line, ""));
        if reason.is_empty() {
            return Err(format!(
                "kernels/local-memory-allowlist.txt line {}: `{function}` has no reason; every \
                 entry needs one",
                number + 1
            ));
        }
        if entries.insert(function.to_string(), reason.to_string()).is_some() {
            return Err(format!(
                "kernels/local-memory-allowlist.txt line {}: `{function}` is listed twice",
                number + 1
            ));
        }
    }
    Ok(entries)
}

fn allowlist() -> BTreeMap<String, String> {
    parse_allowlist(ALLOWLIST).unwrap_or_else(|e| panic!("{e}"))
}

fn print_table(report: &[KernelResources]) {
    eprintln!(
        "{:<12} {:<7} {:<32} {:>5} {:>7} {:>6} {:>7} {:>7}",
        "file", "arch", "function", "regs", "smem B", "stack", "spill>", "spill<"
    );
    for k in report {
        eprintln!(
            "{:<12} {:<7} {:<32} {:>5} {:>7} {:>6} {:>7} {:>7}{}",
            k.file,
            k.arch,
            k.function,
            k.registers,
            k.shared_bytes,
            k.stack_bytes,
            k.spill_store_bytes,
            k.spill_load_bytes,
            if k.uses_local_memory() { "  LOCAL MEMORY" } else { "" }
        );
    }
}

#[test]
fn every_kernel_file_is_reported_for_every_arch() {
    let report = resource_report();
    print_table(&report);
    assert!(!report.is_empty(), "the ptxas resource report is empty");
    assert!(!files().is_empty(), "no kernel file is embedded");
    for file in files() {
        assert!(!file.sm_90a.is_empty(), "{}: empty sm_90a cubin", file.name);
        assert!(!file.sm_80.is_empty(), "{}: empty sm_80 cubin", file.name);
        assert!(!file.compute_80.is_empty(), "{}: empty PTX", file.name);
        for arch in ARCHS {
            let kernels: Vec<&KernelResources> = report
                .iter()
                .filter(|k| k.file == file.name && k.arch == arch)
                .collect();
            assert!(
                !kernels.is_empty(),
                "kernels/{}.cu has no entry for {arch} in the resource report",
                file.name
            );
        }
    }
    for k in &report {
        assert!(
            files().iter().any(|f| f.name == k.file) && ARCHS.contains(&k.arch.as_str()),
            "report entry for an unknown file or arch: {k:?}"
        );
        assert!(!k.function.is_empty(), "unnamed function: {k:?}");
    }
    // Every kernel of a file exists for both archs, and some kernel of each file was parsed
    // fully (ptxas reports registers for every entry function).
    for file in files() {
        let names = |arch: &str| -> Vec<&str> {
            let mut names: Vec<&str> = report
                .iter()
                .filter(|k| k.file == file.name && k.arch == arch)
                .map(|k| k.function.as_str())
                .collect();
            names.sort_unstable();
            names
        };
        assert_eq!(names(ARCHS[0]), names(ARCHS[1]), "kernels/{}.cu", file.name);
        assert!(
            report.iter().any(|k| k.file == file.name && k.registers > 0),
            "kernels/{}.cu: no register count was read from the report",
            file.name
        );
    }
}

#[test]
fn no_kernel_uses_local_memory_unless_allowed() {
    let report = resource_report();
    let allowed = allowlist();
    let offenders: Vec<String> = report
        .iter()
        .filter(|k| k.uses_local_memory() && !allowed.contains_key(&k.function))
        .map(|k| {
            format!(
                "{} in kernels/{}.cu for {}: {} bytes stack frame, {} bytes spill stores, {} bytes \
                 spill loads",
                k.function, k.file, k.arch, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes
            )
        })
        .collect();
    if !offenders.is_empty() {
        print_table(&report);
    }
    assert!(
        offenders.is_empty(),
        "kernels use local memory without an entry in kernels/local-memory-allowlist.txt:\n  {}",
        offenders.join("\n  ")
    );
    for (function, reason) in &allowed {
        assert!(
            report.iter().any(|k| &k.function == function && k.uses_local_memory()),
            "kernels/local-memory-allowlist.txt lists `{function}` ({reason}), which no longer uses \
             local memory (or no longer exists): remove the entry"
        );
    }
}

#[test]
fn allowlist_format() {
    let parsed = parse_allowlist(
        "# comment\n\n  kernel_a   spills in the epilogue, measured harmless\nkernel_b\tstack for printf\n",
    )
    .unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed["kernel_a"], "spills in the epilogue, measured harmless");
    assert_eq!(parsed["kernel_b"], "stack for printf");
    let error = parse_allowlist("# header\nkernel_without_reason\n").unwrap_err();
    assert!(error.contains("line 2") && error.contains("no reason"), "{error}");
    let error = parse_allowlist("k one\nk  two\n").unwrap_err();
    assert!(error.contains("twice"), "{error}");
    // The shipped list parses.
    allowlist();
}
