//! Tokenizers: bytes as tokens (the default: no files, nothing unknown), or a Hugging Face
//! `tokenizer.json` (feature `hf-tokenizer`), such as GPT-2's or Llama's.

use crate::error::{Error, Result};
use std::path::Path;

#[cfg(feature = "hf-tokenizer")]
const OP: &str = "Tokenizer";

/// Turns text into token ids and back.
pub enum Tokenizer {
    /// Each byte is a token: a vocabulary of 256.
    Bytes,
    /// A Hugging Face tokenizer loaded from a `tokenizer.json`.
    #[cfg(feature = "hf-tokenizer")]
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// A Hugging Face `tokenizer.json`; without the `hf-tokenizer` feature, an error saying so.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        #[cfg(feature = "hf-tokenizer")]
        {
            tokenizers::Tokenizer::from_file(path)
                .map(|t| Tokenizer::HuggingFace(Box::new(t)))
                .map_err(|e| Error::file(path.display(), format!("not a usable tokenizer.json: {e}")))
        }
        #[cfg(not(feature = "hf-tokenizer"))]
        {
            Err(Error::file(
                path.display(),
                "tokenizer.json files need tessera built with the `hf-tokenizer` feature",
            ))
        }
    }

    /// How many token ids there are.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// The token ids of `bytes` (UTF-8 text for a Hugging Face tokenizer; any bytes otherwise).
    pub fn encode(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(bytes.iter().map(|&b| u32::from(b)).collect()),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| Error::invalid(OP, "text", "UTF-8 text for a tokenizer.json", e))?;
                t.encode(text, false)
                    .map(|encoding| encoding.get_ids().to_vec())
                    .map_err(|e| Error::invalid(OP, "text", "text the tokenizer can encode", e))
            }
        }
    }

    /// The text of `tokens`; bytes that are not UTF-8 (a sample may stop mid-character) become
    /// U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::HuggingFace(t) => t
                .decode(tokens, false)
                .map_err(|e| Error::invalid(OP, "tokens", "ids of this tokenizer", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_any_text() {
        let text = "naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢";
        let ids = Tokenizer::Bytes.encode(text.as_bytes()).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(Tokenizer::Bytes.decode(&ids).unwrap(), text);
        assert_eq!(Tokenizer::Bytes.vocab_size(), 256);
    }

    #[cfg(not(feature = "hf-tokenizer"))]
    #[test]
    fn tokenizer_files_need_the_feature() {
        let error = Tokenizer::from_file("tokenizer.json").err().unwrap().to_string();
        assert!(error.contains("hf-tokenizer"), "{error}");
    }

    #[cfg(feature = "hf-tokenizer")]
    #[test]
    fn a_trained_bpe_round_trips_and_compresses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bpe-512.json");
        let tokenizer = Tokenizer::from_file(path).unwrap();
        assert_eq!(tokenizer.vocab_size(), 512);
        let text = "The Jargon File is a hacker's dictionary.";
        let ids = tokenizer.encode(text.as_bytes()).unwrap();
        // A 512-entry BPE merges common pairs: clearly fewer tokens than bytes.
        assert!(
            ids.len() * 3 < text.len() * 2,
            "{} tokens for {} bytes",
            ids.len(),
            text.len()
        );
        assert!(ids.iter().all(|&id| id < 512));
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        let error = Tokenizer::from_file(file!()).err().unwrap().to_string();
        assert!(error.contains("not a usable tokenizer.json"), "{error}");
        assert!(tokenizer.encode(&[0xff, 0xfe]).is_err());
    }
}
