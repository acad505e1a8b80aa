//! tessera: hand-written CUDA kernels for training and running language models, each with a CPU
//! twin, behind one small API of devices, tensors and ops.
//!
//! ```
//! use tessera::{ops, Device, Tensor};
//! # fn main() -> tessera::Result<()> {
//! let device = Device::cuda_if_available();
//! let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], &device)?;
//! let b = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
//! let c = ops::matmul(&a, &b, None, ops::MatmulOptions::default())?;
//! assert_eq!(c.to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0]);
//! # Ok(())
//! # }
//! ```

pub mod device;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod optim;
pub mod tensor;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use device::Device;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use tensor::Tensor;
