//! Training: data and batches, and the training loop.

pub mod data;
pub mod trainer;

pub use data::{BatchSampler, ByteTokenizer, Corpus};
