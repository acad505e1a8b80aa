//! The GPT's parameters and optimizer state on one device: initialisation, the AdamW update,
//! and checkpoints in Hugging Face's names.

use super::config::GptConfig;
use super::params::{parameters, Init, ParamSpec};
use super::safetensors::{self, SafeTensors};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{self, AdamWConfig, AdamWTensor};
use crate::tensor::Tensor;
use crate::train::data::splitmix64;
use std::collections::BTreeMap;
use std::path::Path;

/// The metadata key under which a checkpoint records the configuration it was saved with.
pub const CONFIG_KEY: &str = "tessera.config";

/// One parameter: its f32 master value, its gradient and AdamW's two moments.
pub struct Parameter {
    pub spec: ParamSpec,
    pub value: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The model's parameters, in the order of [`parameters`].
pub struct GptParams {
    pub config: GptConfig,
    pub device: Device,
    pub params: Vec<Parameter>,
}

impl GptParams {
    /// Freshly initialised parameters (GPT-2's scheme), the same for a given seed on every device.
    pub fn init(config: &GptConfig, device: &Device, seed: u64) -> Result<GptParams> {
        config.validate()?;
        let params = parameters(config)
            .into_iter()
            .map(|spec| {
                let numel: usize = spec.shape.iter().product();
                let values = match spec.init {
                    Init::Zeros => vec![0.0; numel],
                    Init::Ones => vec![1.0; numel],
                    Init::Normal(std) => normal(numel, std, seed ^ splitmix64(name_hash(&spec.name))),
                };
                let value = Tensor::from_vec(values, &spec.shape, device)?;
                Parameter::new(spec, value, device)
            })
            .collect::<Result<_>>()?;
        Ok(GptParams {
            config: config.clone(),
            device: device.clone(),
            params,
        })
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&Parameter> {
        self.params.iter().find(|p| p.spec.name == name)
    }

    /// Sets every gradient to zero, before a step's first micro-batch.
    pub fn zero_grads(&mut self) -> Result<()> {
        for p in &mut self.params {
            p.grad.fill_bytes(0)?;
        }
        Ok(())
    }

    /// One AdamW step over every parameter in one launch, with weight decay on the matrices only.
    pub fn adamw_step(&mut self, config: &AdamWConfig, step: u64, grad_scale: f32) -> Result<()> {
        let mut tensors: Vec<AdamWTensor<'_>> = self
            .params
            .iter_mut()
            .map(|p| AdamWTensor {
                param: &mut p.value,
                grad: &p.grad,
                exp_avg: &mut p.exp_avg,
                exp_avg_sq: &mut p.exp_avg_sq,
                param_bf16: None,
                weight_decay: p.spec.weight_decay,
            })
            .collect();
        ops::adamw_step(&mut tensors, config, step, grad_scale)
    }

    /// Writes the parameters to `path` (safetensors, Hugging Face names, the configuration in the
    /// metadata), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let list: Vec<(&str, &Tensor)> = self.params.iter().map(|p| (p.spec.name.as_str(), &p.value)).collect();
        let metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            (CONFIG_KEY.to_string(), self.config.to_json()),
        ]);
        safetensors::save(path, &list, &metadata)
    }

    /// Reads parameters saved by [`GptParams::save`] or by Hugging Face's libraries. The
    /// configuration is the checkpoint's own when it has one, else `config` (a Hugging Face
    /// checkpoint has none), and every tensor's name and shape is checked against it.
    pub fn load(path: impl AsRef<Path>, config: Option<&GptConfig>, device: &Device) -> Result<GptParams> {
        let path = path.as_ref();
        let mut file = SafeTensors::load(path)?;
        let config = match (file.metadata().get(CONFIG_KEY), config) {
            (Some(text), _) => GptConfig::from_json(text)
                .map_err(|e| Error::file(path.display(), format!("metadata `{CONFIG_KEY}`: {e}")))?,
            (None, Some(config)) => config.clone(),
            (None, None) => {
                return Err(Error::file(
                    path.display(),
                    "the checkpoint does not record its configuration; name a preset or a config file",
                ))
            }
        };
        config.validate()?;
        let params = parameters(&config)
            .into_iter()
            .map(|spec| {
                let value = file.take(&spec.name, DType::F32, &spec.shape)?.to_device(device)?;
                Parameter::new(spec, value, device)
            })
            .collect::<Result<_>>()?;
        Ok(GptParams {
            config,
            device: device.clone(),
            params,
        })
    }
}

impl Parameter {
    fn new(spec: ParamSpec, value: Tensor, device: &Device) -> Result<Parameter> {
        let zeros = || Tensor::zeros(&spec.shape, DType::F32, device);
        Ok(Parameter {
            grad: zeros()?,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            value,
            spec,
        })
    }
}

/// A stable 64-bit hash of a parameter name (FNV-1a), so that each parameter draws its own
/// stream of initial values however the list is ordered.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `len` draws from N(0, std²): Box-Muller over SplitMix64 counters.
fn normal(len: usize, std: f32, seed: u64) -> Vec<f32> {
    let unit = |i: u64| ((splitmix64(seed.wrapping_add(i)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (0..len)
        .map(|i| {
            let pair = (i / 2) as u64;
            let radius = (-2.0 * unit(2 * pair).ln()).sqrt();
            let angle = std::f64::consts::TAU * unit(2 * pair + 1);
            let z = if i % 2 == 0 {
                radius * angle.cos()
            } else {
                radius * angle.sin()
            };
            (z * std as f64) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_the_asked_moments() {
        let values = normal(100_000, 0.02, 3);
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 3e-4, "{}", var.sqrt());
    }

    #[test]
    fn save_then_load_gives_the_same_parameters() {
        let config = GptConfig::llama_tiny();
        let params = GptParams::init(&config, &Device::Cpu, 5).unwrap();
        let dir = std::env::temp_dir().join(format!("tessera-gpt-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        params.save(&path).unwrap();
        let loaded = GptParams::load(&path, None, &Device::Cpu).unwrap();
        assert_eq!(loaded.config, config);
        for (a, b) in params.params.iter().zip(&loaded.params) {
            assert_eq!(a.spec, b.spec);
            assert_eq!(
                a.value.to_bytes().unwrap(),
                b.value.to_bytes().unwrap(),
                "{}",
                a.spec.name
            );
        }
        // A checkpoint without a recorded configuration is checked against the one given.
        let mut other = config.clone();
        other.width = 256;
        let wrong = GptParams::init(&other, &Device::Cpu, 5).unwrap();
        let list: Vec<(&str, &Tensor)> = wrong.params.iter().map(|p| (p.spec.name.as_str(), &p.value)).collect();
        safetensors::save(&path, &list, &BTreeMap::new()).unwrap();
        let error = GptParams::load(&path, Some(&config), &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("model.embed_tokens.weight") && error.contains("[256, 256]"),
            "{error}"
        );
        let error = GptParams::load(&path, None, &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not record its configuration"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
