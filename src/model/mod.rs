//! The GPT model: its configuration and its checkpoints.

pub mod config;
pub mod params;
pub mod safetensors;

pub use config::{Activation, Family, GptConfig, Norm, Positions};
pub use safetensors::SafeTensors;
