//! Reading and writing safetensors files, the checkpoint format of Hugging Face's libraries.
//!
//! A file is an 8-byte little-endian header length, a JSON header mapping each tensor's name to
//! its dtype, shape and byte range in the data section (plus an optional `__metadata__` object
//! of strings), and the data section. Loading checks everything the header claims against the
//! file before any tensor is built, so a truncated or corrupt file is an [`Error::File`] that
//! says what is wrong, never a panic or a half-loaded model. Saving is atomic: the file is
//! written beside its destination, synced, then renamed over it, so a crash leaves either the
//! old file or the new one.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Header lengths above this are refused before allocating (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The tensors and string metadata of one safetensors file, on the host.
#[derive(Default)]
pub struct SafeTensors {
    source: String,
    tensors: BTreeMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
}

fn dtype_code(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::U8 => "U8",
        DType::U16 => "U16",
        DType::U32 => "U32",
    }
}

fn dtype_from_code(code: &str) -> Option<DType> {
    Some(match code {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "U8" => DType::U8,
        "U16" => DType::U16,
        "U32" => DType::U32,
        _ => return None,
    })
}

impl SafeTensors {
    /// Reads and checks a whole file.
    pub fn load(path: impl AsRef<Path>) -> Result<SafeTensors> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| Error::file(path.display(), format!("cannot read: {e}")))?;
        SafeTensors::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses the bytes of a file; `source` names it in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<SafeTensors> {
        let corrupt = |message: String| Error::file(source, format!("not a valid safetensors file: {message}"));
        let Some((length, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(corrupt(format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            )));
        };
        let header_len = u64::from_le_bytes(*length);
        if header_len > MAX_HEADER_BYTES || header_len > rest.len() as u64 {
            return Err(corrupt(format!(
                "the header claims {header_len} bytes but {} follow (truncated?)",
                rest.len()
            )));
        }
        let (header, data) = rest.split_at(header_len as usize);
        let header: Map<String, Value> = match serde_json::from_slice(header) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(corrupt("the header is not a JSON object".into())),
            Err(e) => return Err(corrupt(format!("the header is not JSON: {e}"))),
        };

        let mut metadata = BTreeMap::new();
        let mut entries = Vec::new();
        for (name, entry) in &header {
            if name == "__metadata__" {
                let Value::Object(fields) = entry else {
                    return Err(corrupt("`__metadata__` is not an object".into()));
                };
                for (key, value) in fields {
                    let Value::String(value) = value else {
                        return Err(corrupt(format!("metadata `{key}` is not a string")));
                    };
                    metadata.insert(key.clone(), value.clone());
                }
                continue;
            }
            let field = |key: &str| {
                entry
                    .get(key)
                    .ok_or_else(|| corrupt(format!("tensor `{name}` has no `{key}`")))
            };
            let dtype = field("dtype")?
                .as_str()
                .and_then(dtype_from_code)
                .ok_or_else(|| corrupt(format!("tensor `{name}` has an unsupported dtype {}", entry["dtype"])))?;
            let numbers = |key: &str| -> Result<Vec<usize>> {
                field(key)?
                    .as_array()
                    .and_then(|items| items.iter().map(|v| v.as_u64().map(|v| v as usize)).collect())
                    .ok_or_else(|| corrupt(format!("tensor `{name}`: `{key}` is not a list of integers")))
            };
            let shape = numbers("shape")?;
            let offsets = numbers("data_offsets")?;
            let &[begin, end] = offsets.as_slice() else {
                return Err(corrupt(format!("tensor `{name}`: `data_offsets` is not [begin, end]")));
            };
            let expected = shape
                .iter()
                .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| corrupt(format!("tensor `{name}`: shape {shape:?} overflows")))?;
            if begin > end || end > data.len() || end - begin != expected {
                return Err(corrupt(format!(
                    "tensor `{name}` ({dtype}, shape {shape:?}, {expected} bytes) claims bytes {begin}..{end} \
                     of a {}-byte data section",
                    data.len()
                )));
            }
            entries.push((name.clone(), dtype, shape, begin, end));
        }
        // The format requires the tensors to tile the data section exactly: no gaps, no overlaps.
        entries.sort_by_key(|entry| entry.3);
        let mut covered = 0;
        for (name, _, _, begin, end) in &entries {
            if *begin != covered {
                return Err(corrupt(format!(
                    "tensor `{name}` starts at byte {begin}, expected {covered} (overlap or gap)"
                )));
            }
            covered = *end;
        }
        if covered != data.len() {
            return Err(corrupt(format!(
                "the tensors cover {covered} of {} data bytes",
                data.len()
            )));
        }

        let mut tensors = BTreeMap::new();
        for (name, dtype, shape, begin, end) in entries {
            let tensor = Tensor::from_bytes(&data[begin..end], dtype, &shape, &Device::Cpu)?;
            tensors.insert(name, tensor);
        }
        Ok(SafeTensors {
            source: source.to_string(),
            tensors,
            metadata,
        })
    }

    /// The names of the tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The string metadata (`__metadata__`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The tensor called `name`, or an error naming the file and the missing tensor.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::file(&self.source, format!("no tensor named `{name}`")))
    }

    /// Removes and returns the tensor called `name`, checking its dtype and shape.
    pub fn take(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.get(name)?;
        if tensor.dtype() != dtype || tensor.shape() != shape {
            return Err(Error::file(
                &self.source,
                format!(
                    "tensor `{name}` is {} {:?}, expected {dtype} {shape:?}",
                    tensor.dtype(),
                    tensor.shape()
                ),
            ));
        }
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::file(&self.source, format!("no tensor named `{name}`")))
    }
}

/// Writes `tensors` (from any device) and `metadata` to `path` atomically. Names must be unique
/// and must not be `__metadata__`. Tensors are laid out widest dtype first, then by name, as
/// Hugging Face's writer does: every tensor is aligned for its dtype when the file is mapped, and
/// the same tensors always give the same bytes.
pub fn save(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_bytes(tensors, metadata)?;
    let temporary = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let fail = |what: &str, e: std::io::Error| Error::file(path.display(), format!("cannot save: {what}: {e}"));
    let write = || -> std::result::Result<(), (&str, std::io::Error)> {
        let mut file = File::create(&temporary).map_err(|e| ("create", e))?;
        file.write_all(&bytes).map_err(|e| ("write", e))?;
        file.sync_all().map_err(|e| ("sync", e))?;
        fs::rename(&temporary, path).map_err(|e| ("rename", e))?;
        // The rename itself is durable only once the directory is synced.
        if let Some(directory) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(directory)
                .and_then(|d| d.sync_all())
                .map_err(|e| ("sync directory", e))?;
        }
        Ok(())
    };
    write().map_err(|(what, e)| {
        let _ = fs::remove_file(&temporary);
        fail(what, e)
    })
}

/// The bytes of a safetensors file holding `tensors` and `metadata`.
pub fn to_bytes(tensors: &[(&str, &Tensor)], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    const OP: &str = "safetensors::save";
    let mut sorted: Vec<&(&str, &Tensor)> = tensors.iter().collect();
    sorted.sort_by_key(|(name, tensor)| (std::cmp::Reverse(tensor.dtype().size_in_bytes()), *name));
    // The header is written by hand, in layout order with each entry's fields in the order
    // Hugging Face's writer uses, so that the same tensors give the same bytes in both libraries.
    let quote = |text: &str| serde_json::to_string(text).map_err(|e| Error::invalid(OP, "tensors", "a name", e));
    let mut fields = Vec::new();
    if !metadata.is_empty() {
        let pairs = metadata
            .iter()
            .map(|(k, v)| Ok(format!("{}:{}", quote(k)?, quote(v)?)))
            .collect::<Result<Vec<_>>>()?;
        fields.push(format!("\"__metadata__\":{{{}}}", pairs.join(",")));
    }
    let mut offset = 0usize;
    for (index, (name, tensor)) in sorted.iter().enumerate() {
        if *name == "__metadata__" || sorted[..index].iter().any(|(other, _)| other == name) {
            return Err(Error::invalid(
                OP,
                "tensors",
                "unique names other than `__metadata__`",
                name,
            ));
        }
        let end = offset + tensor.size_in_bytes();
        let shape: Vec<String> = tensor.shape().iter().map(usize::to_string).collect();
        fields.push(format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            quote(name)?,
            dtype_code(tensor.dtype()),
            shape.join(",")
        ));
        offset = end;
    }
    let mut header = format!("{{{}}}", fields.join(",")).into_bytes();
    // Readers that map the file expect the data section 8-byte aligned; the format pads with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for (_, tensor) in sorted {
        bytes.extend_from_slice(&tensor.to_bytes()?);
    }
    Ok(bytes)
}
