//! The committed header, read back by bindgen, against the Rust source it was generated from:
//! every exported function with the same parameter and return types, every `#[repr(C)]` struct
//! with the same fields, every status/dtype/divisor code with the same value, every constant and
//! opaque handle type; and nothing in the header that the library does not export.
//!
//! Needs libclang at run time (bindgen loads it); scripts/install-capi-tools installs it.

use quote::ToTokens;
use std::collections::BTreeMap;
use std::path::Path;

/// A type or value as tokens, with the spellings that differ between bindgen and the source
/// made equal: `::std::os::raw::c_char` and `c_char`.
fn normalise(tokens: impl ToTokens) -> String {
    let text = tokens.to_token_stream().to_string();
    let mut text = text.replace(' ', "");
    for prefix in ["::std::os::raw::", "std::os::raw::", "::core::ffi::", "core::ffi::"] {
        text = text.replace(prefix, "");
    }
    text
}

#[derive(Default, Debug)]
struct Items {
    /// name -> (parameter types, return type)
    functions: BTreeMap<String, (Vec<String>, String)>,
    /// struct name -> fields (name, type); opaque structs have none
    structs: BTreeMap<String, Vec<(String, String)>>,
    /// constant name -> value
    constants: BTreeMap<String, String>,
}

fn signature(inputs: impl Iterator<Item = String>, output: &syn::ReturnType) -> (Vec<String>, String) {
    let output = match output {
        syn::ReturnType::Default => "()".to_string(),
        syn::ReturnType::Type(_, ty) => normalise(ty),
    };
    (inputs.collect(), output)
}

fn fields(fields: &syn::Fields) -> Vec<(String, String)> {
    fields
        .iter()
        .filter_map(|f| Some((f.ident.as_ref()?.to_string(), normalise(&f.ty))))
        .filter(|(name, _)| !name.starts_with('_'))
        .collect()
}

fn has_attribute(attrs: &[syn::Attribute], name: &str) -> bool {
    attrs
        .iter()
        .any(|a| a.to_token_stream().to_string().replace(' ', "").contains(name))
}

/// cbindgen's SCREAMING_SNAKE_CASE: a word starts at an upper-case letter after a lower-case one
/// (`InvalidArgument` -> `INVALID_ARGUMENT`, `BF16` -> `BF16`).
fn screaming(name: &str) -> String {
    let mut out = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if c.is_uppercase() && previous_lower {
            out.push('_');
        }
        previous_lower = c.is_lowercase();
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The exported items of the crate's source.
fn from_source(dir: &Path) -> Items {
    let mut items = Items::default();
    let mut paths: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        let file = syn::parse_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for item in file.items {
            match item {
                syn::Item::Fn(f) if has_attribute(&f.attrs, "no_mangle") => {
                    assert!(
                        f.sig.abi.as_ref().and_then(|a| a.name.as_ref()).map(|n| n.value()) == Some("C".into()),
                        "{} is #[no_mangle] but not extern \"C\"",
                        f.sig.ident
                    );
                    let inputs = f.sig.inputs.iter().map(|input| match input {
                        syn::FnArg::Typed(t) => normalise(&t.ty),
                        syn::FnArg::Receiver(_) => panic!("exported method {}", f.sig.ident),
                    });
                    items
                        .functions
                        .insert(f.sig.ident.to_string(), signature(inputs, &f.sig.output));
                }
                syn::Item::Struct(s) if s.ident.to_string().starts_with("Tessera") => {
                    let repr_c = has_attribute(&s.attrs, "repr(C)");
                    items
                        .structs
                        .insert(s.ident.to_string(), if repr_c { fields(&s.fields) } else { Vec::new() });
                }
                syn::Item::Enum(e) if has_attribute(&e.attrs, "repr(i32)") => {
                    let prefix = screaming(&e.ident.to_string());
                    for variant in &e.variants {
                        let (_, value) = variant.discriminant.as_ref().expect("explicit discriminants");
                        let name = format!("{prefix}_{}", screaming(&variant.ident.to_string()));
                        items.constants.insert(name, normalise(value));
                    }
                }
                syn::Item::Const(c) if c.ident.to_string().starts_with("TESSERA_") => {
                    items.constants.insert(c.ident.to_string(), normalise(&c.expr));
                }
                _ => {}
            }
        }
    }
    items
}

/// The items bindgen reads from the header.
fn from_header(header: &Path) -> Items {
    let bindings = bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_function("tessera_.*")
        .allowlist_type("Tessera.*")
        .allowlist_var("TESSERA_.*")
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()
        .expect("bindgen reads include/tessera.h (is libclang installed?)")
        .to_string();
    let file = syn::parse_file(&bindings).unwrap();
    let mut items = Items::default();
    for item in file.items {
        match item {
            syn::Item::ForeignMod(block) => {
                for f in block.items {
                    if let syn::ForeignItem::Fn(f) = f {
                        let inputs = f.sig.inputs.iter().map(|input| match input {
                            syn::FnArg::Typed(t) => normalise(&t.ty),
                            syn::FnArg::Receiver(_) => unreachable!(),
                        });
                        items
                            .functions
                            .insert(f.sig.ident.to_string(), signature(inputs, &f.sig.output));
                    }
                }
            }
            syn::Item::Struct(s) => {
                items.structs.insert(s.ident.to_string(), fields(&s.fields));
            }
            syn::Item::Const(c) => {
                items.constants.insert(c.ident.to_string(), normalise(&c.expr));
            }
            _ => {}
        }
    }
    items
}

#[test]
fn header_matches_the_exported_items() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = from_source(&root.join("src"));
    let header = from_header(&root.join("include/tessera.h"));

    assert!(source.functions.len() >= 30, "found only {:?}", source.functions.keys());
    assert_eq!(
        header.functions.keys().collect::<Vec<_>>(),
        source.functions.keys().collect::<Vec<_>>(),
        "functions in the header vs exported ones"
    );
    for (name, signature) in &source.functions {
        assert_eq!(&header.functions[name], signature, "signature of {name}");
    }
    for (name, fields) in &source.structs {
        let declared = header
            .structs
            .get(name)
            .unwrap_or_else(|| panic!("struct {name} missing from the header"));
        assert_eq!(declared, fields, "fields of {name}");
    }
    for (name, value) in &source.constants {
        assert_eq!(header.constants.get(name), Some(value), "constant {name}");
    }
    eprintln!(
        "header matches: {} functions, {} structs, {} constants",
        source.functions.len(),
        source.structs.len(),
        source.constants.len()
    );
}
