//! Tensor: an owned, contiguous, row-major array of one dtype on one device.
//!
//! The allocation may hold more rows (entries of the leading dimension) than the shape shows
//! ([`Tensor::set_leading_dim`]): a buffer that grows, such as a key/value cache, reserves its
//! capacity once and shows ops the filled prefix. Every access sees only the shape's elements.

use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;
use std::ptr::NonNull;

/// The alignment, in bytes, that [`Tensor::from_device_ptr`] requires of caller device memory:
/// what `cudaMalloc` guarantees, and more than any kernel's vector access needs.
pub const DEVICE_ALIGNMENT: usize = 256;

/// Host memory, typed so that every view of it is correctly aligned for its dtype.
pub(crate) enum HostBuffer {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    /// Memory the tensor does not own, wrapped by [`Tensor::from_host_ptr`].
    External(ExternalHost),
}

/// A caller's host memory: aligned for the tensor's dtype, never freed by tessera.
pub(crate) struct ExternalHost {
    data: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the creator of the tensor promised (in `Tensor::from_host_ptr`) that the memory stays
// valid for the tensor's life and is accessed only through it, so it can move between threads and
// be read from several as an owned vector can; writes need `&mut Tensor`, as for owned storage.
unsafe impl Send for ExternalHost {}
unsafe impl Sync for ExternalHost {}

macro_rules! each_host_buffer {
    ($buffer:expr, $vec:ident => $body:expr, $external:ident => $external_body:expr) => {
        match $buffer {
            HostBuffer::F32($vec) => $body,
            HostBuffer::BF16($vec) => $body,
            HostBuffer::F16($vec) => $body,
            HostBuffer::U8($vec) => $body,
            HostBuffer::U16($vec) => $body,
            HostBuffer::U32($vec) => $body,
            HostBuffer::External($external) => $external_body,
        }
    };
}

impl HostBuffer {
    /// `len` zeros, or an error (not an abort) when the host cannot hold them.
    fn zeros(dtype: DType, len: usize) -> Result<HostBuffer> {
        fn zeroed<T: Clone>(len: usize, zero: T) -> Result<Vec<T>> {
            let mut values = Vec::new();
            values.try_reserve_exact(len).map_err(|e| {
                Error::invalid(
                    "Tensor",
                    "shape",
                    "a tensor that fits in host memory",
                    format!("{len} elements: {e}"),
                )
            })?;
            values.resize(len, zero);
            Ok(values)
        }
        Ok(match dtype {
            DType::F32 => HostBuffer::F32(zeroed(len, 0.0)?),
            DType::BF16 => HostBuffer::BF16(zeroed(len, bf16::ZERO)?),
            DType::F16 => HostBuffer::F16(zeroed(len, f16::ZERO)?),
            DType::U8 => HostBuffer::U8(zeroed(len, 0)?),
            DType::U16 => HostBuffer::U16(zeroed(len, 0)?),
            DType::U32 => HostBuffer::U32(zeroed(len, 0)?),
        })
    }

    /// Wraps a vector without copying it. `T::DTYPE` names `T` exactly, so the cast is an
    /// identity and cannot fail; the error arm exists only so that no path panics.
    fn from_vec<T: Element>(data: Vec<T>) -> Result<HostBuffer> {
        fn cast<T: Element, U: bytemuck::Pod>(data: Vec<T>) -> Result<Vec<U>> {
            bytemuck::allocation::try_cast_vec(data).map_err(|(e, _)| Error::Unsupported {
                op: "Tensor::from_vec",
                reason: format!("element cast failed: {e}"),
            })
        }
        Ok(match T::DTYPE {
            DType::F32 => HostBuffer::F32(cast(data)?),
            DType::BF16 => HostBuffer::BF16(cast(data)?),
            DType::F16 => HostBuffer::F16(cast(data)?),
            DType::U8 => HostBuffer::U8(cast(data)?),
            DType::U16 => HostBuffer::U16(cast(data)?),
            DType::U32 => HostBuffer::U32(cast(data)?),
        })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        each_host_buffer!(
            self,
            v => bytemuck::cast_slice(v),
            // SAFETY: valid for reads of `bytes` bytes for the tensor's life (from_host_ptr).
            e => unsafe { std::slice::from_raw_parts(e.data.as_ptr(), e.bytes) }
        )
    }

    pub(crate) fn as_bytes_mut(&mut self) -> &mut [u8] {
        each_host_buffer!(
            self,
            v => bytemuck::cast_slice_mut(v),
            // SAFETY: valid for writes and accessed only through this tensor (from_host_ptr).
            e => unsafe { std::slice::from_raw_parts_mut(e.data.as_ptr(), e.bytes) }
        )
    }
}

pub(crate) enum Storage {
    Host(HostBuffer),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::DeviceBuffer),
}

/// An owned, contiguous, row-major array of one [`DType`] on one [`Device`].
///
/// Constructors check that the data matches the shape; ops check shapes, dtypes and devices of
/// all their arguments before any work starts, and return [`Error::InvalidArgument`] otherwise.
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

/// Number of elements of a shape, or an error when the product overflows.
fn checked_numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::invalid(
                op,
                "shape",
                "a shape whose element count fits in usize",
                format!("{shape:?}"),
            )
        })
}

/// Element count and byte size of a shape, or an error when the bytes exceed what one allocation
/// can hold (`isize::MAX`), so that no size computation can wrap.
fn checked_size(op: &'static str, shape: &[usize], dtype: DType) -> Result<(usize, usize)> {
    let numel = checked_numel(op, shape)?;
    numel
        .checked_mul(dtype.size_in_bytes())
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .map(|bytes| (numel, bytes))
        .ok_or_else(|| {
            Error::invalid(
                op,
                "shape",
                "a tensor of at most isize::MAX bytes",
                format!("{shape:?} of {dtype}"),
            )
        })
}

impl Tensor {
    /// A tensor holding `data`, which must have exactly as many elements as `shape` describes.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let numel = checked_numel("Tensor::from_vec", shape)?;
        if data.len() != numel {
            return Err(Error::invalid(
                "Tensor::from_vec",
                "data",
                format!("{numel} elements for shape {shape:?}"),
                format!("{} elements", data.len()),
            ));
        }
        let host = Tensor {
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            storage: Storage::Host(HostBuffer::from_vec(data)?),
        };
        host.into_device(device)
    }

    /// A host tensor over caller-owned memory, without a copy: ops read and write the `bytes`
    /// bytes at `data` in place, and dropping the tensor leaves the memory alone.
    ///
    /// `bytes` must equal the byte size of `shape` in `dtype`, and `data` must be non-null and
    /// aligned to the dtype's size (null is accepted for an empty tensor). Checked; an `Err` names
    /// what is wrong.
    ///
    /// # Safety
    ///
    /// For as long as the tensor (or anything moved out of it) lives, `data..data + bytes` must
    /// be valid for reads and writes, and must not be read or written other than through this
    /// tensor while a call that uses the tensor runs.
    pub unsafe fn from_host_ptr(data: *mut u8, bytes: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
        const OP: &str = "Tensor::from_host_ptr";
        let (numel, expected) = checked_size(OP, shape, dtype)?;
        if bytes != expected {
            return Err(Error::invalid(
                OP,
                "bytes",
                format!("{expected} bytes for shape {shape:?} of {dtype}"),
                format!("{bytes} bytes"),
            ));
        }
        let buffer = if numel == 0 {
            HostBuffer::zeros(dtype, 0)?
        } else {
            let data = NonNull::new(data).ok_or_else(|| Error::invalid(OP, "data", "a non-null pointer", "null"))?;
            let align = dtype.size_in_bytes();
            if !(data.as_ptr() as usize).is_multiple_of(align) {
                return Err(Error::invalid(
                    OP,
                    "data",
                    format!("an address aligned to {align} bytes for {dtype}"),
                    format!("{:p}", data.as_ptr()),
                ));
            }
            HostBuffer::External(ExternalHost { data, bytes })
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Host(buffer),
        })
    }

    /// A tensor over caller-owned CUDA device memory, without a copy: ops on `device` read and
    /// write the `bytes` bytes at device address `data` in place, and dropping the tensor never
    /// frees them.
    ///
    /// `bytes` must equal the byte size of `shape` in `dtype`; `data` must be non-zero and aligned
    /// to [`DEVICE_ALIGNMENT`] bytes (as `cudaMalloc` returns), since kernels read and write
    /// tensors with vector accesses that assume an allocation's alignment; `device` must be a
    /// CUDA device, and the CUDA driver must report the whole range as device (or managed)
    /// memory of that GPU, in one allocation. An empty shape needs no memory (`data` may be 0).
    /// Checked in that order; an `Err` names what is wrong.
    ///
    /// # Safety
    ///
    /// For as long as the tensor (or anything moved out of it) lives, the range must stay
    /// allocated, and must not be read or written other than through this tensor while work
    /// queued on the device's stream uses it: synchronise the device before the host or another
    /// stream touches it, and before freeing it.
    pub unsafe fn from_device_ptr(
        device: &Device,
        data: u64,
        bytes: usize,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        const OP: &str = "Tensor::from_device_ptr";
        let (numel, expected) = checked_size(OP, shape, dtype)?;
        if bytes != expected {
            return Err(Error::invalid(
                OP,
                "bytes",
                format!("{expected} bytes for shape {shape:?} of {dtype}"),
                format!("{bytes} bytes"),
            ));
        }
        if numel > 0 && (data == 0 || !data.is_multiple_of(DEVICE_ALIGNMENT as u64)) {
            return Err(Error::invalid(
                OP,
                "data",
                format!("a non-null device address aligned to {DEVICE_ALIGNMENT} bytes"),
                format!("{data:#x}"),
            ));
        }
        match device {
            Device::Cpu => Err(Error::invalid(
                OP,
                "device",
                "a CUDA device (host memory is wrapped by Tensor::from_host_ptr)",
                device,
            )),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) if numel == 0 => Tensor::zeros(shape, dtype, device),
            #[cfg(feature = "cuda")]
            Device::Cuda(backend) => Ok(Tensor {
                shape: shape.to_vec(),
                dtype,
                // SAFETY: the caller's promise above is what `wrap` requires.
                storage: Storage::Cuda(unsafe { backend.wrap(OP, data, bytes) }?),
            }),
        }
    }

    /// Whether the data of the two tensors overlap in memory: two views of one caller buffer
    /// from [`Tensor::from_host_ptr`], for instance. Empty tensors overlap nothing.
    pub fn shares_memory_with(&self, other: &Tensor) -> bool {
        let ((a, a_end), (b, b_end)) = (self.address_range(), other.address_range());
        a < a_end && b < b_end && a < b_end && b < a_end
    }

    /// Start and end of the data, host and device addresses told apart so that they never meet.
    fn address_range(&self) -> (u128, u128) {
        let bytes = self.size_in_bytes() as u128;
        match &self.storage {
            Storage::Host(host) => {
                let start = host.as_bytes().as_ptr() as usize as u128;
                (start, start + bytes)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(buffer) => {
                let start = (1u128 << 64) + buffer.address() as u128;
                (start, start + bytes)
            }
        }
    }

    /// A tensor copied from `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// A tensor whose elements are the little-endian `bytes`, which must be exactly the shape's
    /// element count times the dtype's size (the layout safetensors and the C API use).
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize], device: &Device) -> Result<Tensor> {
        let (numel, size) = checked_size("Tensor::from_bytes", shape, dtype)?;
        if bytes.len() != size {
            return Err(Error::invalid(
                "Tensor::from_bytes",
                "bytes",
                format!("{size} bytes ({numel} elements of {dtype})"),
                format!("{} bytes", bytes.len()),
            ));
        }
        let mut host = HostBuffer::zeros(dtype, numel)?;
        host.as_bytes_mut().copy_from_slice(bytes);
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Host(host),
        }
        .into_device(device)
    }

    /// The elements as little-endian bytes on the host, whatever the device.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match &self.storage {
            Storage::Host(host) => Ok(host.as_bytes()[..self.size_in_bytes()].to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Ok(self.to_device(&Device::Cpu)?.to_bytes()?),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (numel, bytes) = checked_size("Tensor::zeros", shape, dtype)?;
        let storage = match device {
            Device::Cpu => Storage::Host(HostBuffer::zeros(dtype, numel)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => Storage::Cuda(cuda.alloc_zeroed(bytes)?),
        };
        #[cfg(not(feature = "cuda"))]
        let _ = bytes;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage,
        })
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The size of the data in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The device that holds the data.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(buffer) => Device::Cuda(buffer.backend().clone()),
        }
    }

    /// Copies the data into a `Vec<T>` on the host; `T` must match the dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.expect_dtype("Tensor::to_vec", "T", &[T::DTYPE])?;
        let mut out = vec![T::zeroed(); self.numel()];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        match &self.storage {
            Storage::Host(host) => bytes.copy_from_slice(&host.as_bytes()[..self.size_in_bytes()]),
            #[cfg(feature = "cuda")]
            Storage::Cuda(buffer) => buffer.copy_to_host(bytes)?,
        }
        Ok(out)
    }

    /// A copy of this tensor on `device` (a plain copy when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Host(host), Device::Cpu) => {
                let mut copy = HostBuffer::zeros(self.dtype, self.numel())?;
                copy.as_bytes_mut()
                    .copy_from_slice(&host.as_bytes()[..self.size_in_bytes()]);
                Storage::Host(copy)
            }
            #[cfg(feature = "cuda")]
            (Storage::Host(host), Device::Cuda(cuda)) => {
                Storage::Cuda(cuda.upload(&host.as_bytes()[..self.size_in_bytes()])?)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(buffer), Device::Cpu) => {
                let mut copy = HostBuffer::zeros(self.dtype, self.numel())?;
                buffer.copy_to_host(copy.as_bytes_mut())?;
                Storage::Host(copy)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(buffer), Device::Cuda(cuda)) => Storage::Cuda(buffer.copy_to(cuda, self.size_in_bytes())?),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            storage,
        })
    }

    /// Copies `source`, of the same shape and dtype and on any device, into this tensor.
    pub fn copy_from(&mut self, source: &Tensor) -> Result<()> {
        const OP: &str = "Tensor::copy_from";
        source.expect_dtype(OP, "source", &[self.dtype])?;
        source.expect_shape(OP, "source", &self.shape)?;
        let bytes = self.size_in_bytes();
        match (&mut self.storage, &source.storage) {
            (Storage::Host(dst), Storage::Host(src)) => {
                dst.as_bytes_mut()[..bytes].copy_from_slice(&src.as_bytes()[..bytes])
            }
            #[cfg(feature = "cuda")]
            (Storage::Host(dst), Storage::Cuda(src)) => src.copy_to_host(&mut dst.as_bytes_mut()[..bytes])?,
            #[cfg(feature = "cuda")]
            (Storage::Cuda(dst), Storage::Host(src)) => dst.copy_from_host(&src.as_bytes()[..bytes])?,
            #[cfg(feature = "cuda")]
            (Storage::Cuda(dst), Storage::Cuda(src)) => dst.copy_range_from(0, src, 0, bytes)?,
        }
        Ok(())
    }

    /// Moves a host tensor to `device`, copying only when the device is not the CPU.
    fn into_device(self, device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(self),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => self.to_device(device),
        }
    }

    /// Overwrites every byte with `byte`. Tests use `0xFF` to poison outputs (NaN in every float
    /// dtype) so that an element a kernel failed to write cannot pass for a result.
    pub fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        let bytes = self.size_in_bytes();
        match &mut self.storage {
            Storage::Host(host) => host.as_bytes_mut()[..bytes].fill(byte),
            #[cfg(feature = "cuda")]
            Storage::Cuda(buffer) => buffer.fill_bytes(byte, bytes)?,
        }
        Ok(())
    }

    /// The same data seen with another shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        self.set_shape("Tensor::reshape", shape)?;
        Ok(self)
    }

    /// Gives the same data another shape of the same element count, in place: how a caller sees
    /// one buffer as (tokens, width) for a matmul and (batch, seq, heads, head_dim) for attention.
    pub fn reshape_in_place(&mut self, shape: &[usize]) -> Result<()> {
        self.set_shape("Tensor::reshape_in_place", shape)
    }

    /// How many entries of the leading dimension the allocation holds (the shape shows
    /// `shape()[0]` of them).
    pub fn leading_capacity(&self) -> usize {
        let row_bytes = self.shape[1..].iter().product::<usize>() * self.dtype.size_in_bytes();
        if row_bytes == 0 {
            return self.shape.first().copied().unwrap_or(0);
        }
        self.capacity_bytes() / row_bytes
    }

    /// Shows the first `rows` entries of the leading dimension of the allocation, up to
    /// [`Tensor::leading_capacity`]: entries beyond the shape keep their data (a growing buffer
    /// shows ops the part written so far, and grows without a copy).
    pub fn set_leading_dim(&mut self, rows: usize) -> Result<()> {
        const OP: &str = "Tensor::set_leading_dim";
        if self.shape.is_empty() {
            return Err(Error::invalid(OP, "self", "a tensor of rank at least 1", "a scalar"));
        }
        let capacity = self.leading_capacity();
        if rows > capacity {
            return Err(Error::invalid(
                OP,
                "rows",
                format!("at most the {capacity} the allocation holds"),
                rows,
            ));
        }
        self.shape[0] = rows;
        Ok(())
    }

    /// Copies entries `source_start..source_start + count` of `source`'s leading dimension into
    /// entries `start..start + count` of this tensor's. Both must lie within the shapes; the
    /// entries must have the same size and dtype, on the same device.
    pub fn copy_rows_from(&mut self, start: usize, source: &Tensor, source_start: usize, count: usize) -> Result<()> {
        const OP: &str = "Tensor::copy_rows_from";
        source.expect_dtype(OP, "source", &[self.dtype])?;
        self.device().expect_same(&source.device(), OP, "source")?;
        let row = |t: &Tensor| t.shape.get(1..).map(|r| r.iter().product::<usize>());
        let (Some(row_elements), Some(source_row)) = (row(self), row(source)) else {
            return Err(Error::invalid(OP, "self", "tensors of rank at least 1", "a scalar"));
        };
        if source_row != row_elements {
            return Err(Error::invalid(
                OP,
                "source",
                format!("entries of {row_elements} elements, as the destination's"),
                format!("shape {:?}", source.shape),
            ));
        }
        if source_start.checked_add(count).is_none_or(|end| end > source.shape[0]) {
            return Err(Error::invalid(
                OP,
                "source_start",
                format!("{count} entries within the source's {}", source.shape[0]),
                source_start,
            ));
        }
        if start.checked_add(count).is_none_or(|end| end > self.shape[0]) {
            return Err(Error::invalid(
                OP,
                "start",
                format!("{count} entries within the destination's {}", self.shape[0]),
                start,
            ));
        }
        let row_bytes = row_elements * self.dtype.size_in_bytes();
        let (from, to, bytes) = (source_start * row_bytes, start * row_bytes, count * row_bytes);
        match (&mut self.storage, &source.storage) {
            (Storage::Host(dst), Storage::Host(src)) => {
                dst.as_bytes_mut()[to..to + bytes].copy_from_slice(&src.as_bytes()[from..from + bytes])
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(dst), Storage::Cuda(src)) => dst.copy_range_from(to, src, from, bytes)?,
            #[cfg(feature = "cuda")]
            _ => {
                return Err(Error::invalid(
                    OP,
                    "source",
                    "a tensor on the same device",
                    "another device",
                ))
            }
        }
        Ok(())
    }

    /// Bytes the allocation holds.
    fn capacity_bytes(&self) -> usize {
        match &self.storage {
            Storage::Host(host) => host.as_bytes().len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(buffer) => buffer.len(),
        }
    }

    fn set_shape(&mut self, op: &'static str, shape: &[usize]) -> Result<()> {
        let numel = checked_numel(op, shape)?;
        if numel != self.numel() {
            return Err(Error::invalid(
                op,
                "shape",
                format!("a shape of {} elements", self.numel()),
                format!("{shape:?} ({numel} elements)"),
            ));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// Checks that the dtype is one of `allowed`.
    pub(crate) fn expect_dtype(&self, op: &'static str, arg: &'static str, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        Err(Error::invalid(
            op,
            arg,
            format!("dtype {}", names.join(" or ")),
            format!("dtype {}", self.dtype),
        ))
    }

    /// Checks that the shape is exactly `shape`.
    pub(crate) fn expect_shape(&self, op: &'static str, arg: &'static str, shape: &[usize]) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                arg,
                format!("shape {shape:?}"),
                format!("shape {:?}", self.shape),
            ))
        }
    }

    /// Checks that the tensor has `rank` dimensions.
    pub(crate) fn expect_rank(&self, op: &'static str, arg: &'static str, rank: usize) -> Result<()> {
        if self.shape.len() == rank {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                arg,
                format!("a {rank}-d tensor"),
                format!("shape {:?}", self.shape),
            ))
        }
    }

    /// Typed view of host data. Callers have validated the dtype; a mismatch is still an error.
    pub(crate) fn host_slice<T: Element>(&self) -> Result<&[T]> {
        match &self.storage {
            Storage::Host(host) if self.dtype == T::DTYPE => {
                Ok(bytemuck::cast_slice(&host.as_bytes()[..self.size_in_bytes()]))
            }
            _ => Err(self.not_host_of::<T>()),
        }
    }

    /// Typed mutable view of host data.
    pub(crate) fn host_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        if self.dtype != T::DTYPE || !matches!(self.storage, Storage::Host(_)) {
            return Err(self.not_host_of::<T>());
        }
        let bytes = self.size_in_bytes();
        match &mut self.storage {
            Storage::Host(host) => Ok(bytemuck::cast_slice_mut(&mut host.as_bytes_mut()[..bytes])),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::invalid(
                "Tensor::host_slice_mut",
                "self",
                "a host tensor",
                "a CUDA tensor",
            )),
        }
    }

    /// The bytes of host data, whatever the dtype.
    pub(crate) fn host_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Host(host) => Ok(&host.as_bytes()[..self.size_in_bytes()]),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::invalid(
                "Tensor::host_bytes",
                "self",
                "a host tensor",
                "a CUDA tensor",
            )),
        }
    }

    /// The bytes of host data, mutably, whatever the dtype.
    pub(crate) fn host_bytes_mut(&mut self) -> Result<&mut [u8]> {
        let bytes = self.size_in_bytes();
        match &mut self.storage {
            Storage::Host(host) => Ok(&mut host.as_bytes_mut()[..bytes]),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::invalid(
                "Tensor::host_bytes_mut",
                "self",
                "a host tensor",
                "a CUDA tensor",
            )),
        }
    }

    fn not_host_of<T: Element>(&self) -> Error {
        Error::invalid(
            "Tensor::host_slice",
            "self",
            format!("a host tensor of dtype {}", T::DTYPE),
            format!("a {} tensor on {}", self.dtype, self.device()),
        )
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.device())
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// The device buffer of a tensor that validation has placed on a GPU.
    pub(crate) fn device_buffer(&self) -> Result<&crate::cuda::DeviceBuffer> {
        match &self.storage {
            Storage::Cuda(buffer) => Ok(buffer),
            Storage::Host(_) => Err(Error::invalid(
                "Tensor::device_buffer",
                "self",
                "a CUDA tensor",
                "a host tensor",
            )),
        }
    }

    /// A tensor of uninitialised device memory, for op outputs that are written in full.
    pub(crate) fn uninit_cuda(
        shape: &[usize],
        dtype: DType,
        backend: &std::sync::Arc<crate::cuda::CudaBackend>,
    ) -> Result<Tensor> {
        let (_, bytes) = checked_size("Tensor::uninit", shape, dtype)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cuda(backend.alloc(bytes)?),
        })
    }
}
