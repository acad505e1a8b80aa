//! Gives the shared library the soname `libtessera.so.<ABI version>`, so that a program linked
//! against one ABI never loads a library of another.

fn main() {
    println!("cargo:rerun-if-changed=src/lib.rs");
    let source = std::fs::read_to_string("src/lib.rs").unwrap_or_default();
    let abi = source
        .lines()
        .find_map(|line| line.trim().strip_prefix("pub const TESSERA_ABI_VERSION: u32 = "))
        .and_then(|rest| rest.strip_suffix(';'))
        .and_then(|n| n.parse::<u32>().ok());
    match abi {
        Some(abi) => {
            if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
                println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtessera.so.{abi}");
            }
        }
        None => panic!("src/lib.rs must define `pub const TESSERA_ABI_VERSION: u32 = N;`"),
    }
}
