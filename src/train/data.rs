//! Training data: the embedded corpus or a user's text file, tokenized, the train/validation
//! split and a batch sampler whose position can be saved and restored.

use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The Jargon File 4.4.7 (public domain; see data/README.md), gzip-compressed.
const EMBEDDED_CORPUS: &[u8] = include_bytes!("../../data/jargon-4.4.7.txt.gz");

/// The share of a corpus, at its end, held out for validation.
pub const VALIDATION_FRACTION: f64 = 0.1;

/// A tokenized corpus split into training and validation tokens.
pub struct Corpus {
    pub name: String,
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
}

impl Corpus {
    /// The embedded Jargon File, tokenized as bytes.
    pub fn embedded() -> Result<Corpus> {
        Corpus::embedded_with(&Tokenizer::Bytes)
    }

    /// The embedded Jargon File, tokenized by `tokenizer`.
    pub fn embedded_with(tokenizer: &Tokenizer) -> Result<Corpus> {
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(EMBEDDED_CORPUS)
            .read_to_end(&mut text)
            .map_err(|e| Error::file("embedded corpus", format!("cannot decompress: {e}")))?;
        Corpus::tokenize("Jargon File 4.4.7 (embedded)", &text, tokenizer)
    }

    /// A user's text file, tokenized by `tokenizer`.
    pub fn from_file(path: impl AsRef<Path>, tokenizer: &Tokenizer) -> Result<Corpus> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::file(path.display(), format!("cannot read: {e}")))?;
        Corpus::tokenize(&path.display().to_string(), &bytes, tokenizer)
    }

    /// `bytes` as byte tokens, split into training and validation text.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Corpus> {
        Corpus::tokenize(name, bytes, &Tokenizer::Bytes)
    }

    /// `bytes` tokenized by `tokenizer` and split; both parts must hold at least two tokens.
    pub fn tokenize(name: &str, bytes: &[u8], tokenizer: &Tokenizer) -> Result<Corpus> {
        let tokens = tokenizer
            .encode(bytes)
            .map_err(|e| Error::file(name, format!("cannot tokenize: {e}")))?;
        let split = tokens.len() - (tokens.len() as f64 * VALIDATION_FRACTION).round() as usize;
        if split < 2 || tokens.len() - split < 2 {
            return Err(Error::file(
                name,
                format!(
                    "a corpus of {} bytes is too small to split into training and validation text",
                    tokens.len()
                ),
            ));
        }
        let validation = tokens[split..].to_vec();
        let mut train = tokens;
        train.truncate(split);
        Ok(Corpus {
            name: name.to_string(),
            train,
            validation,
        })
    }

    /// The validation cross-entropy (nats per token) of the best model that ignores context:
    /// the training text's token frequencies (add-one smoothed). A trained model must beat it.
    pub fn unigram_loss(&self, vocab: usize) -> f64 {
        let mut counts = vec![1.0f64; vocab];
        for &t in &self.train {
            if let Some(count) = counts.get_mut(t as usize) {
                *count += 1.0;
            }
        }
        let total: f64 = counts.iter().sum();
        let loss: f64 = self
            .validation
            .iter()
            .map(|&t| -(counts.get(t as usize).copied().unwrap_or(1.0) / total).ln())
            .sum();
        loss / self.validation.len() as f64
    }
}

/// Draws training batches of `batch` windows of `seq + 1` tokens at random offsets (inputs and
/// the next-token targets), from a counter-based generator: the state is one counter, so a
/// checkpoint stores it and a resumed run draws exactly the batches an uninterrupted run would.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSampler {
    pub seed: u64,
    /// How many windows have been drawn so far.
    pub drawn: u64,
}

impl BatchSampler {
    pub fn new(seed: u64) -> BatchSampler {
        BatchSampler { seed, drawn: 0 }
    }

    /// Fills `inputs` and `targets` (each `batch · seq` tokens) from `tokens`.
    pub fn next_batch(
        &mut self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) -> Result<()> {
        if tokens.len() < seq + 1 {
            return Err(Error::invalid(
                "BatchSampler::next_batch",
                "seq",
                format!(
                    "at most {} (the text has {} tokens)",
                    tokens.len().saturating_sub(1),
                    tokens.len()
                ),
                seq,
            ));
        }
        inputs.clear();
        targets.clear();
        let starts = (tokens.len() - seq) as u64;
        for _ in 0..batch {
            let start = (splitmix64(self.seed ^ splitmix64(self.drawn)) % starts) as usize;
            self.drawn += 1;
            inputs.extend_from_slice(&tokens[start..start + seq]);
            targets.extend_from_slice(&tokens[start + 1..start + seq + 1]);
        }
        Ok(())
    }
}

/// The windows of `seq + 1` tokens that cover `tokens` in order, for validation: every token
/// after the first of a window is predicted once.
pub fn validation_windows(tokens: &[u32], seq: usize) -> impl Iterator<Item = (&[u32], &[u32])> {
    let count = tokens.len().saturating_sub(1).checked_div(seq).unwrap_or(0);
    (0..count).map(move |i| {
        let start = i * seq;
        (&tokens[start..start + seq], &tokens[start + 1..start + seq + 1])
    })
}

/// SplitMix64's output function: a well-mixed 64-bit hash of a counter.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_corpus_is_the_jargon_file() {
        let corpus = Corpus::embedded().unwrap();
        let text = Tokenizer::Bytes.decode(&corpus.train[..200]).unwrap();
        assert!(text.contains("The Jargon File"), "{text}");
        assert_eq!(corpus.train.len() + corpus.validation.len(), 1_681_817);
        // English text carries about 4.5 bits (3.1 nats) of unigram entropy per byte.
        let unigram = corpus.unigram_loss(256);
        assert!((2.5..4.0).contains(&unigram), "{unigram}");
    }

    #[test]
    fn batches_resume_where_they_left_off() {
        let tokens: Vec<u32> = (0..1000).map(|i| i % 251).collect();
        let (mut a_in, mut a_tg, mut b_in, mut b_tg) = (vec![], vec![], vec![], vec![]);
        let mut straight = BatchSampler::new(7);
        straight.next_batch(&tokens, 4, 16, &mut a_in, &mut a_tg).unwrap();
        straight.next_batch(&tokens, 4, 16, &mut a_in, &mut a_tg).unwrap();
        let mut first = BatchSampler::new(7);
        first.next_batch(&tokens, 4, 16, &mut b_in, &mut b_tg).unwrap();
        let mut resumed = BatchSampler {
            seed: first.seed,
            drawn: first.drawn,
        };
        resumed.next_batch(&tokens, 4, 16, &mut b_in, &mut b_tg).unwrap();
        assert_eq!((a_in, a_tg), (b_in.clone(), b_tg.clone()));
        // Targets are the inputs shifted by one token.
        for (x, y) in b_in.chunks(16).zip(b_tg.chunks(16)) {
            assert_eq!(&x[1..], &y[..15]);
        }
        assert!(BatchSampler::new(1)
            .next_batch(&tokens[..8], 1, 8, &mut b_in, &mut b_tg)
            .is_err());
    }

    #[test]
    fn validation_windows_predict_each_token_once() {
        let tokens: Vec<u32> = (0..10).collect();
        let windows: Vec<_> = validation_windows(&tokens, 4).collect();
        assert_eq!(windows.len(), 2);
        assert_eq!(windows[1], (&tokens[4..8], &tokens[5..9]));
        assert_eq!(validation_windows(&tokens, 0).count(), 0);
        assert_eq!(validation_windows(&tokens, 9).count(), 1);
        assert_eq!(validation_windows(&tokens, 10).count(), 0);
    }

    #[test]
    fn tiny_corpora_are_refused() {
        assert!(Corpus::from_bytes("x", b"abc").is_err());
        assert!(Corpus::from_bytes("x", &[b'a'; 100]).is_ok());
    }
}
