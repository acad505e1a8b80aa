//! Opaque handles. A handle is a token that names a live object in one process-wide table, never
//! an address: tokens are not reused, so a handle used after its `_free` (or one tessera never
//! returned) is found missing and reported as `TESSERA_STATUS_INVALID_HANDLE` instead of
//! touching freed memory. An object lives while its handle is live or a call is using it, so
//! freeing a handle on one thread while another thread's call uses it is safe.
//!
//! A new kind of handle (attention plan, model, trainer) adds a variant to [`Object`], an opaque
//! struct, and `register`/`lookup` calls as in `tensor.rs`.

use crate::status::{FfiError, FfiResult};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use tessera_core::model::Gpt;
use tessera_core::ops::{LoraAdapters, LoraRouting, Sparse24, WaveletConfig};
use tessera_core::train::trainer::Trainer;
use tessera_core::{Device, Tensor};

/// A device (the CPU or one CUDA GPU, with its context and stream). Opaque: created by
/// `tessera_device_new_*`, released by `tessera_device_free`.
pub struct TesseraDevice {
    _opaque: [u8; 0],
}

/// A tensor: owned by tessera or wrapping caller memory. Opaque: created by `tessera_tensor_*`
/// constructors, released by `tessera_tensor_free`.
pub struct TesseraTensor {
    _opaque: [u8; 0],
}

/// A wavelet-mixing configuration (windows per coordinate, boundary divisor). Opaque: created by
/// `tessera_wavelet_config_new_*`, released by `tessera_wavelet_config_free`.
pub struct TesseraWaveletConfig {
    _opaque: [u8; 0],
}

/// A language model loaded from a checkpoint, with its activations. Opaque: created by
/// `tessera_model_load`, released by `tessera_model_free`.
pub struct TesseraModel {
    _opaque: [u8; 0],
}

/// A training run: a model, its optimizer state, the schedule and the data position. Opaque:
/// created by `tessera_trainer_new` or `tessera_trainer_resume`, released by
/// `tessera_trainer_free`.
pub struct TesseraTrainer {
    _opaque: [u8; 0],
}

/// A weight matrix in the 2:4 compressed format of the sparse tensor cores (values and
/// metadata). Opaque: created by `tessera_sparse24_*` constructors, released by
/// `tessera_sparse24_free`; never changed once made.
pub struct TesseraSparse24 {
    _opaque: [u8; 0],
}

/// A set of LoRA adapters (padded `A` and `B`, each adapter's rank and scale), owned by tessera.
/// Opaque: created by `tessera_lora_adapters_new`, released by `tessera_lora_adapters_free`.
pub struct TesseraLoraAdapters {
    _opaque: [u8; 0],
}

/// Which LoRA adapter each token row uses, grouped for the kernels. Opaque: created by
/// `tessera_lora_routing_new_*`, released by `tessera_lora_routing_free`; never changed once made.
pub struct TesseraLoraRouting {
    _opaque: [u8; 0],
}

/// The weight LoRA adapters sit beside (dense today). Opaque: created by
/// `tessera_lora_base_new_*`, released by `tessera_lora_base_free`.
pub struct TesseraLoraBase {
    _opaque: [u8; 0],
}

/// A device's stream as C sees it. Opaque: created by `tessera_stream_new`, released by
/// `tessera_stream_free`.
pub struct TesseraStream {
    _opaque: [u8; 0],
}

/// A model or trainer shared between its handle and the call using it. Every call on one
/// changes its activations, so one call at a time has it; another call meanwhile fails with
/// `TESSERA_STATUS_BUSY` instead of waiting.
pub type Exclusive<T> = Arc<Mutex<T>>;

/// A tensor shared between its handle and the calls using it. Readers share it; a writer has it
/// alone; a call that cannot get its access at once fails with `TESSERA_STATUS_BUSY`, so that no
/// two calls ever wait on each other.
pub type SharedTensor = Arc<RwLock<Tensor>>;

#[derive(Clone)]
pub enum Object {
    Device(Device),
    Tensor(SharedTensor),
    WaveletConfig(Arc<WaveletConfig>),
    Sparse24(Arc<Sparse24>),
    Model(Exclusive<Gpt>),
    Trainer(Exclusive<Trainer>),
    LoraAdapters(Arc<RwLock<LoraAdapters>>),
    LoraRouting(Arc<LoraRouting>),
    LoraBase(Arc<LoraBaseObject>),
    Stream(Device),
}

/// What a LoRA base handle refers to. A new kind of base (a 2:4 sparse weight) is a new variant
/// and a new `tessera_lora_base_new_*` constructor; the ops take the handle, so their signatures
/// stay as they are.
pub enum LoraBaseObject {
    /// A dense weight tensor, shared with its tensor handle: the base sees the tensor's current
    /// values at every call.
    Dense(SharedTensor),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Device(_) => "a device handle",
            Object::Tensor(_) => "a tensor handle",
            Object::WaveletConfig(_) => "a wavelet config handle",
            Object::Sparse24(_) => "a sparse 2:4 matrix handle",
            Object::Model(_) => "a model handle",
            Object::Trainer(_) => "a trainer handle",
            Object::LoraAdapters(_) => "a LoRA adapters handle",
            Object::LoraRouting(_) => "a LoRA routing handle",
            Object::LoraBase(_) => "a LoRA base handle",
            Object::Stream(_) => "a stream handle",
        }
    }
}

struct Table {
    next: usize,
    objects: HashMap<usize, Object>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        next: 1,
        objects: HashMap::new(),
    })
});

fn table() -> std::sync::MutexGuard<'static, Table> {
    // The table is never left half-updated (each change is one insert or remove), so a lock
    // poisoned by a panic elsewhere is still consistent.
    TABLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Tokens step by 16 so that they look like (and are never mistaken for) small integers; they
/// cannot run out in the life of a process.
const TOKEN_STEP: usize = 16;

/// Adds `object` to the table and returns its token as a handle pointer.
pub fn register<H>(object: Object) -> *mut H {
    let mut table = table();
    let token = table.next * TOKEN_STEP;
    table.next += 1;
    table.objects.insert(token, object);
    token as *mut H
}

/// Removes a handle. NULL is accepted and does nothing; a handle that is not live is an error.
/// The object is dropped after the table is unlocked, once no call is using it.
pub fn release<H>(op: &str, arg: &str, handle: *const H, expected: &str) -> FfiResult<()> {
    if handle.is_null() {
        return Ok(());
    }
    let token = handle as usize;
    let removed = {
        let mut table = table();
        match table.objects.get(&token) {
            Some(object) if object.kind() == expected => table.objects.remove(&token),
            Some(object) => return Err(FfiError::handle(op, arg, expected, object.kind())),
            None => None,
        }
    };
    match removed {
        Some(object) => {
            drop(object);
            Ok(())
        }
        None => Err(stale(op, arg, expected, token)),
    }
}

fn stale(op: &str, arg: &str, expected: &str, token: usize) -> FfiError {
    FfiError::handle(
        op,
        arg,
        &format!("{expected} that is live"),
        format!("{token:#x}, which was freed already or never returned by tessera"),
    )
}

fn lookup(op: &str, arg: &str, token: usize, expected: &str) -> FfiResult<Object> {
    if token == 0 {
        return Err(FfiError::invalid(op, arg, expected, "NULL"));
    }
    let object = table()
        .objects
        .get(&token)
        .cloned()
        .ok_or_else(|| stale(op, arg, expected, token))?;
    if object.kind() == expected {
        Ok(object)
    } else {
        Err(FfiError::handle(op, arg, expected, object.kind()))
    }
}

/// The device behind a handle.
pub fn device(op: &str, arg: &str, handle: *const TesseraDevice) -> FfiResult<Device> {
    match lookup(op, arg, handle as usize, "a device handle")? {
        Object::Device(device) => Ok(device),
        other => Err(FfiError::handle(op, arg, "a device handle", other.kind())),
    }
}

/// The tensor behind a handle, not yet locked.
pub fn tensor(op: &str, arg: &str, handle: *const TesseraTensor) -> FfiResult<SharedTensor> {
    match lookup(op, arg, handle as usize, "a tensor handle")? {
        Object::Tensor(tensor) => Ok(tensor),
        other => Err(FfiError::handle(op, arg, "a tensor handle", other.kind())),
    }
}

/// The wavelet configuration behind a handle.
pub fn wavelet_config(op: &str, arg: &str, handle: *const TesseraWaveletConfig) -> FfiResult<Arc<WaveletConfig>> {
    match lookup(op, arg, handle as usize, "a wavelet config handle")? {
        Object::WaveletConfig(config) => Ok(config),
        other => Err(FfiError::handle(op, arg, "a wavelet config handle", other.kind())),
    }
}

/// The compressed matrix behind a handle.
pub fn sparse24(op: &str, arg: &str, handle: *const TesseraSparse24) -> FfiResult<Arc<Sparse24>> {
    match lookup(op, arg, handle as usize, "a sparse 2:4 matrix handle")? {
        Object::Sparse24(matrix) => Ok(matrix),
        other => Err(FfiError::handle(op, arg, "a sparse 2:4 matrix handle", other.kind())),
    }
}

/// The model behind a handle, not yet locked.
pub fn model(op: &str, arg: &str, handle: *const TesseraModel) -> FfiResult<Exclusive<Gpt>> {
    match lookup(op, arg, handle as usize, "a model handle")? {
        Object::Model(model) => Ok(model),
        other => Err(FfiError::handle(op, arg, "a model handle", other.kind())),
    }
}

/// The trainer behind a handle, not yet locked.
pub fn trainer(op: &str, arg: &str, handle: *const TesseraTrainer) -> FfiResult<Exclusive<Trainer>> {
    match lookup(op, arg, handle as usize, "a trainer handle")? {
        Object::Trainer(trainer) => Ok(trainer),
        other => Err(FfiError::handle(op, arg, "a trainer handle", other.kind())),
    }
}

/// The LoRA adapters behind a handle, not yet locked.
pub fn lora_adapters(op: &str, arg: &str, handle: *const TesseraLoraAdapters) -> FfiResult<Arc<RwLock<LoraAdapters>>> {
    match lookup(op, arg, handle as usize, "a LoRA adapters handle")? {
        Object::LoraAdapters(adapters) => Ok(adapters),
        other => Err(FfiError::handle(op, arg, "a LoRA adapters handle", other.kind())),
    }
}

/// The LoRA routing behind a handle.
pub fn lora_routing(op: &str, arg: &str, handle: *const TesseraLoraRouting) -> FfiResult<Arc<LoraRouting>> {
    match lookup(op, arg, handle as usize, "a LoRA routing handle")? {
        Object::LoraRouting(routing) => Ok(routing),
        other => Err(FfiError::handle(op, arg, "a LoRA routing handle", other.kind())),
    }
}

/// The LoRA base behind a handle.
pub fn lora_base(op: &str, arg: &str, handle: *const TesseraLoraBase) -> FfiResult<Arc<LoraBaseObject>> {
    match lookup(op, arg, handle as usize, "a LoRA base handle")? {
        Object::LoraBase(base) => Ok(base),
        other => Err(FfiError::handle(op, arg, "a LoRA base handle", other.kind())),
    }
}

/// The device whose stream a stream handle names.
pub fn stream(op: &str, arg: &str, handle: *const TesseraStream) -> FfiResult<Device> {
    match lookup(op, arg, handle as usize, "a stream handle")? {
        Object::Stream(device) => Ok(device),
        other => Err(FfiError::handle(op, arg, "a stream handle", other.kind())),
    }
}

/// Sole access to a model or trainer, or `TESSERA_STATUS_BUSY` when another call has it.
pub fn exclusive<'a, T>(op: &str, arg: &str, object: &'a Exclusive<T>) -> FfiResult<MutexGuard<'a, T>> {
    match object.try_lock() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => Err(FfiError::with_status(
            crate::status::TesseraStatus::Busy,
            format!("{op}: argument `{arg}`: in use by another call; nothing was done"),
        )),
    }
}

fn busy(op: &str, arg: &str, what: &str, doing: &str) -> FfiError {
    FfiError::with_status(
        crate::status::TesseraStatus::Busy,
        format!("{op}: argument `{arg}`: the {what} is {doing} by another call; nothing was done"),
    )
}

/// Shared access for reading.
pub fn read<'a>(op: &str, arg: &str, tensor: &'a SharedTensor) -> FfiResult<RwLockReadGuard<'a, Tensor>> {
    read_shared(op, arg, "tensor", tensor)
}

/// Sole access for writing.
pub fn write<'a>(op: &str, arg: &str, tensor: &'a SharedTensor) -> FfiResult<RwLockWriteGuard<'a, Tensor>> {
    write_shared(op, arg, "tensor", tensor)
}

/// Shared access for reading an object that calls may change (`what` names it in the message).
pub fn read_shared<'a, T>(op: &str, arg: &str, what: &str, object: &'a RwLock<T>) -> FfiResult<RwLockReadGuard<'a, T>> {
    match object.try_read() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => Err(busy(op, arg, what, "being written")),
    }
}

/// Sole access for writing an object that calls may read at the same time.
pub fn write_shared<'a, T>(
    op: &str,
    arg: &str,
    what: &str,
    object: &'a RwLock<T>,
) -> FfiResult<RwLockWriteGuard<'a, T>> {
    match object.try_write() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => Err(busy(op, arg, what, "in use")),
    }
}

/// Fails when the tensor a call writes is passed again as another of its arguments.
pub fn expect_other_handles(
    op: &str,
    arg: &str,
    written: &SharedTensor,
    others: &[(&str, &SharedTensor)],
) -> FfiResult<()> {
    match others.iter().find(|(_, other)| Arc::ptr_eq(written, other)) {
        Some((other_arg, _)) => Err(FfiError::invalid(
            op,
            arg,
            format!("a tensor other than `{other_arg}`"),
            "the same handle",
        )),
        None => Ok(()),
    }
}

/// Fails when the memory of a tensor a call writes overlaps that of another argument (two wraps
/// of one caller buffer): the op would read what it is writing.
pub fn expect_no_overlap(op: &str, arg: &str, written: &Tensor, others: &[(&str, &Tensor)]) -> FfiResult<()> {
    match others.iter().find(|(_, other)| written.shares_memory_with(other)) {
        Some((other_arg, _)) => Err(FfiError::invalid(
            op,
            arg,
            format!("memory that does not overlap `{other_arg}`'s"),
            "overlapping tensors",
        )),
        None => Ok(()),
    }
}

/// Fails when an output handle is also an input, or another output, of the same call.
pub fn expect_distinct_outputs(
    op: &str,
    outputs: &[(&str, &SharedTensor)],
    inputs: &[(&str, &SharedTensor)],
) -> FfiResult<()> {
    for (i, (arg, written)) in outputs.iter().enumerate() {
        let others: Vec<(&str, &SharedTensor)> = inputs.iter().chain(&outputs[i + 1..]).copied().collect();
        expect_other_handles(op, arg, written, &others)?;
    }
    Ok(())
}

/// Fails when the memory of an output overlaps an input's or another output's.
pub fn expect_disjoint_outputs(op: &str, outputs: &[(&str, &Tensor)], inputs: &[(&str, &Tensor)]) -> FfiResult<()> {
    for (i, (arg, written)) in outputs.iter().enumerate() {
        let others: Vec<(&str, &Tensor)> = inputs.iter().chain(&outputs[i + 1..]).copied().collect();
        expect_no_overlap(op, arg, written, &others)?;
    }
    Ok(())
}

/// The tensor behind a handle that may be NULL (an optional argument).
pub fn optional_tensor(op: &str, arg: &str, handle: *const TesseraTensor) -> FfiResult<Option<SharedTensor>> {
    (!handle.is_null()).then(|| tensor(op, arg, handle)).transpose()
}

/// The number of live handles of every kind in the process: what has been created and not yet
/// freed. A program (or a test) that has freed everything sees 0; a growing count is a leak.
///
/// Ownership: none. Thread-safety: any thread; the count is a snapshot. Errors: none.
#[no_mangle]
pub extern "C" fn tessera_live_handle_count() -> usize {
    table().objects.len()
}
