//! The GPT model: its configuration, its parameters and checkpoints, its forward and backward,
//! and generation.

mod binary_layers;
pub mod config;
pub mod generate;
pub mod gpt;
pub mod kv_cache;
pub mod params;
pub mod safetensors;
pub mod sparse_layers;
pub mod variants;

pub use config::{Activation, Attention, Family, GptConfig, Norm, Positions};
pub use gpt::Gpt;
pub use kv_cache::{DecodeMode, KvCache};
pub use params::{GptParams, ModelLayout, Parameter};
pub use safetensors::SafeTensors;
pub use variants::{LinearKind, LinearSpec, LinearVariants, LoraSpec, Variant};
