//! The GPT model: its configuration and its checkpoints.

pub mod config;
pub mod gpt;
pub mod params;
pub mod safetensors;

pub use config::{Activation, Family, GptConfig, Norm, Positions};
pub use gpt::{GptParams, Parameter};
pub use safetensors::SafeTensors;
