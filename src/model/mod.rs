//! The GPT model: its configuration and its checkpoints.

pub mod config;
pub mod safetensors;

pub use config::{Activation, GptConfig, Norm, Positions};
pub use safetensors::SafeTensors;
