//! Training: data and batches, and the training loop.

pub mod config;
pub mod data;
pub mod tokenizer;
pub mod trainer;

pub use data::{BatchSampler, Corpus};
pub use tokenizer::Tokenizer;
