//! The GPT model: its configuration, its parameters and checkpoints.

pub mod config;
pub mod params;
pub mod safetensors;

pub use config::{Activation, Family, GptConfig, Norm, Positions};
pub use params::{GptParams, ModelLayout, Parameter};
pub use safetensors::SafeTensors;
