//! Training: data and batches.

pub mod data;

pub use data::{BatchSampler, ByteTokenizer, Corpus};
