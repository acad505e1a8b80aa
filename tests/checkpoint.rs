//! safetensors: round trips of every dtype, agreement with Hugging Face's writer, atomic saves,
//! and a clear error for every kind of damaged file.

#[macro_use]
mod common;

use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tessera::model::safetensors::{self, SafeTensors};
use tessera::{DType, Device, Tensor};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-checkpoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

fn round_trip(device: &Device) {
    let mut rng = common::rng();
    let a: Vec<f32> = common::uniform(&mut rng, 17 * 3);
    let tensors = [
        ("a.f32", Tensor::from_vec(a.clone(), &[17, 3], device).unwrap()),
        (
            "b.bf16",
            Tensor::from_vec(a.iter().map(|&v| bf16::from_f32(v)).collect(), &[51], device).unwrap(),
        ),
        (
            "c.f16",
            Tensor::from_vec(a.iter().map(|&v| f16::from_f32(v)).collect(), &[3, 17], device).unwrap(),
        ),
        ("d.u8", Tensor::from_vec(vec![1u8, 2, 3], &[3], device).unwrap()),
        ("e.u16", Tensor::from_vec(vec![7u16; 5], &[5, 1], device).unwrap()),
        ("f.u32", Tensor::from_vec(vec![u32::MAX, 0], &[2], device).unwrap()),
        ("g.scalar", Tensor::from_vec(vec![4.5f32], &[], device).unwrap()),
    ];
    let dir = scratch_dir("round-trip");
    let path = dir.join("model.safetensors");
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    safetensors::save(&path, &list, &metadata()).unwrap();
    let loaded = SafeTensors::load(&path).unwrap();
    assert_eq!(loaded.metadata(), &metadata());
    assert_eq!(loaded.names().count(), tensors.len());
    for (name, tensor) in &tensors {
        let back = loaded.get(name).unwrap();
        assert_eq!(back.shape(), tensor.shape(), "{name}");
        assert_eq!(back.dtype(), tensor.dtype(), "{name}");
        assert_eq!(back.to_bytes().unwrap(), tensor.to_bytes().unwrap(), "{name}");
    }
    // Only the checkpoint is left in the directory: the temporary file was renamed over it.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

on_each_device!(round_trip);

fn fixture() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-written.safetensors"
    ))
    .unwrap()
}

#[test]
fn agrees_with_hugging_faces_writer() {
    let file = SafeTensors::from_bytes(&fixture(), "fixture").unwrap();
    let weight = file.get("transformer.wte.weight").unwrap();
    assert_eq!(weight.shape(), &[3, 4]);
    let expected: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    assert_eq!(weight.to_vec::<f32>().unwrap(), expected);
    let halves: Vec<f32> = file
        .get("b16")
        .unwrap()
        .to_vec::<f16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(halves, vec![1.0, 2.0, 3.0]);
    assert_eq!(file.get("idx").unwrap().to_vec::<u8>().unwrap(), vec![7, 8]);
    assert_eq!(file.metadata(), &metadata());

    // The same tensors give the same bytes as Hugging Face's writer.
    let names: Vec<&str> = file.names().collect();
    let list: Vec<(&str, &Tensor)> = names.iter().map(|&n| (n, file.get(n).unwrap())).collect();
    assert_eq!(safetensors::to_bytes(&list, &metadata()).unwrap(), fixture());
}

#[test]
fn take_checks_dtype_and_shape() {
    let mut file = SafeTensors::from_bytes(&fixture(), "fixture").unwrap();
    let error = file
        .take("transformer.wte.weight", DType::F32, &[4, 3])
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("transformer.wte.weight") && error.contains("[4, 3]"),
        "{error}"
    );
    let error = file.take("b16", DType::BF16, &[3]).err().unwrap().to_string();
    assert!(error.contains("expected bf16"), "{error}");
    let error = file.take("missing", DType::F32, &[1]).err().unwrap().to_string();
    assert!(error.contains("no tensor named `missing`"), "{error}");
    assert!(file.take("idx", DType::U8, &[2]).is_ok());
    assert!(file.get("idx").is_err(), "take removes the tensor");
}

fn expect_corrupt(bytes: &[u8], needle: &str) {
    let error = SafeTensors::from_bytes(bytes, "damaged.safetensors")
        .err()
        .map(|e| e.to_string());
    let error = error.unwrap_or_else(|| panic!("a damaged file loaded (expected an error about {needle:?})"));
    assert!(error.starts_with("damaged.safetensors: "), "{error}");
    assert!(error.contains(needle), "{error} (expected {needle:?})");
}

/// A file with the given header and data, with a correct length prefix.
fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn damaged_files_are_clear_errors() {
    let good = fixture();
    // Every truncation, from nothing to one byte short.
    for len in 0..good.len() {
        assert!(
            SafeTensors::from_bytes(&good[..len], "t").is_err(),
            "truncated to {len} bytes loaded"
        );
    }
    expect_corrupt(&good[..4], "shorter than the 8-byte header length");
    expect_corrupt(&good[..100], "truncated");
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_corrupt(&huge, "the header claims");
    expect_corrupt(&with_header("[1, 2]", &[]), "not a JSON object");
    expect_corrupt(&with_header("{\"a\": ", &[]), "not JSON");
    expect_corrupt(
        &with_header(r#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8]),
        "unsupported dtype",
    );
    expect_corrupt(
        &with_header(r#"{"a":{"dtype":"F32","shape":[1]}}"#, &[0; 4]),
        "has no `data_offsets`",
    );
    expect_corrupt(
        &with_header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4]),
        "claims bytes 0..4",
    );
    expect_corrupt(
        &with_header(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 8]),
        "cover 4 of 8",
    );
    expect_corrupt(
        &with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0; 8],
        ),
        "overlap or gap",
    );
    expect_corrupt(
        &with_header(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, &[0; 4]),
        "not a list of integers",
    );
    expect_corrupt(
        &with_header(r#"{"__metadata__":{"k":1}}"#, &[]),
        "metadata `k` is not a string",
    );
}

#[test]
fn failed_saves_keep_the_previous_file() {
    let dir = scratch_dir("failed-save");
    let path = dir.join("model.safetensors");
    let old = Tensor::from_vec(vec![1.0f32, 2.0], &[2], &Device::Cpu).unwrap();
    safetensors::save(&path, &[("w", &old)], &BTreeMap::new()).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Duplicate names are refused before anything is written.
    let error = safetensors::save(&path, &[("w", &old), ("w", &old)], &BTreeMap::new()).unwrap_err();
    assert!(error.to_string().contains("unique names"), "{error}");
    // A save into a directory that does not exist fails and leaves nothing behind.
    let error = safetensors::save(dir.join("missing/model.safetensors"), &[("w", &old)], &BTreeMap::new());
    assert!(error.unwrap_err().to_string().contains("cannot save"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
