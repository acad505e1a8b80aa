//! LoRA: adapter sets, routings and bases as handles; the fused forward `Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ
//! (+ bias)` with per-row adapters, its backward, and merging an adapter into its base.

use crate::device::clear_out;
use crate::handle::{
    self, LoraBaseObject, Object, SharedTensor, TesseraDevice, TesseraLoraAdapters, TesseraLoraBase,
    TesseraLoraRouting, TesseraTensor,
};
use crate::status::{guard, require, write_out, FfiError, FfiResult, TesseraStatus};
use crate::tensor::dtype_code;
use crate::wavelet::expect_output;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tessera_core::ops::{self, LoraAdapters, LoraBase, LoraRouting};
use tessera_core::Tensor;

/// The most rows a routing may name: the kernels index rows with i32.
const MAX_ROWS: usize = i32::MAX as usize;

/// Reads `count` elements that the caller promises at `values` (NULL is refused unless `count`
/// is 0).
fn read_array<T: Copy>(op: &str, arg: &str, values: *const T, count: usize) -> FfiResult<Vec<T>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    require(op, arg, values)?;
    // SAFETY: non-null, and the caller promises `count` readable elements (header).
    Ok(unsafe { std::slice::from_raw_parts(values, count) }.to_vec())
}

/// A base, locked for reading for the length of a call.
enum LockedBase<'a> {
    Dense(RwLockReadGuard<'a, Tensor>),
}

impl LockedBase<'_> {
    fn base(&self) -> LoraBase<'_> {
        match self {
            LockedBase::Dense(w) => LoraBase::Dense(w),
        }
    }

    /// The base's caller-visible tensor, which an output must not overlap.
    fn tensor(&self) -> &Tensor {
        match self {
            LockedBase::Dense(w) => w,
        }
    }
}

fn base_handle(object: &LoraBaseObject) -> &SharedTensor {
    match object {
        LoraBaseObject::Dense(w) => w,
    }
}

fn lock_base<'a>(op: &str, object: &'a LoraBaseObject) -> FfiResult<LockedBase<'a>> {
    match object {
        LoraBaseObject::Dense(w) => Ok(LockedBase::Dense(handle::read(op, "base", w)?)),
    }
}

fn read_adapters<'a>(op: &str, adapters: &'a RwLock<LoraAdapters>) -> FfiResult<RwLockReadGuard<'a, LoraAdapters>> {
    handle::read_shared(op, "adapters", "adapter set", adapters)
}

fn write_adapters<'a>(op: &str, adapters: &'a RwLock<LoraAdapters>) -> FfiResult<RwLockWriteGuard<'a, LoraAdapters>> {
    handle::write_shared(op, "adapters", "adapter set", adapters)
}

/// Creates a set of `count` adapters from copies of `a` (count, max_rank, d_in) and `b`
/// (count, d_out, max_rank), of one dtype (F32, BF16 or F16) on one device, `count` at most 2^20,
/// `max_rank` at most 64. Adapter `i` uses the first `ranks[i]` (1 to max_rank) rows of `a[i]`
/// and columns of `b[i]` with the finite scale `scales[i]`; the padding is ignored whatever it
/// holds.
///
/// Ownership: `a`, `b`, `ranks` and `scales` are read during the call only (the set keeps its
/// own copies of `a` and `b`: change them with `tessera_lora_adapters_set_weights`); `*out`
/// receives a new handle, released with `tessera_lora_adapters_free`. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, `count` not the first
/// dimension of `a`, a rank or scale out of range, NULL), `..._INVALID_HANDLE`, `..._BUSY`,
/// `..._CUDA`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_adapters_new(
    a: *const TesseraTensor,
    b: *const TesseraTensor,
    ranks: *const usize,
    scales: *const f32,
    count: usize,
    out: *mut *mut TesseraLoraAdapters,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_adapters_new";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let a = handle::tensor(OP, "a", a)?;
        let b = handle::tensor(OP, "b", b)?;
        let ranks = read_array(OP, "ranks", ranks, count)?;
        let scales = read_array(OP, "scales", scales, count)?;
        let a = handle::read(OP, "a", &a)?;
        let b = handle::read(OP, "b", &b)?;
        if a.shape().first() != Some(&count) {
            return Err(FfiError::invalid(
                OP,
                "count",
                format!("the adapter count of `a`, shape {:?}", a.shape()),
                count,
            ));
        }
        let adapters = LoraAdapters::new(a.to_device(&a.device())?, b.to_device(&b.device())?, &ranks, &scales)
            .map_err(|e| rename(OP, e))?;
        write_out(
            OP,
            "out",
            out,
            handle::register(Object::LoraAdapters(Arc::new(RwLock::new(adapters)))),
        )
    })
}

/// Puts the C function's name in place of the Rust one in an argument error.
fn rename(op: &str, error: tessera_core::Error) -> FfiError {
    let mut error = FfiError::from(error);
    if error.status == TesseraStatus::InvalidArgument {
        if let Some((_, rest)) = error.message.split_once(": ") {
            error.message = format!("{op}: {rest}");
        }
    }
    error
}

/// Releases an adapter set. NULL is accepted and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; calls using the set on
/// other threads finish normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live adapter set.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_adapters_free(adapters: *mut TesseraLoraAdapters) -> TesseraStatus {
    const OP: &str = "tessera_lora_adapters_free";
    guard(OP, || {
        handle::release(OP, "adapters", adapters, "a LoRA adapters handle")
    })
}

/// The adapter count, padded rank, `d_in`, `d_out` and `TesseraDtype` code of an adapter set;
/// any pointer may be NULL to skip it.
///
/// Ownership: none. Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE`, `..._BUSY` (the set being written by another call).
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_adapters_info(
    adapters: *const TesseraLoraAdapters,
    count: *mut usize,
    max_rank: *mut usize,
    d_in: *mut usize,
    d_out: *mut usize,
    dtype: *mut i32,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_adapters_info";
    guard(OP, || {
        let adapters = handle::lora_adapters(OP, "adapters", adapters)?;
        let adapters = read_adapters(OP, &adapters)?;
        let fields = [
            ("count", count, adapters.count()),
            ("max_rank", max_rank, adapters.max_rank()),
            ("d_in", d_in, adapters.d_in()),
            ("d_out", d_out, adapters.d_out()),
        ];
        for (arg, pointer, value) in fields {
            if !pointer.is_null() {
                write_out(OP, arg, pointer, value)?;
            }
        }
        if !dtype.is_null() {
            write_out(OP, "dtype", dtype, dtype_code(adapters.a().dtype()) as i32)?;
        }
        Ok(())
    })
}

/// Overwrites the set's `A` and `B` with the values of `a` and `b`, which must have exactly their
/// shapes, dtype and device (see `tessera_lora_adapters_info`): how a training loop hands the
/// set the weights an optimizer step (`tessera_adamw_step`) has updated. Ranks and scales stay.
///
/// Ownership: `a` and `b` are read during the call only. Thread-safety: any thread; the set may
/// not be used by another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, NULL),
/// `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error the set is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_adapters_set_weights(
    adapters: *mut TesseraLoraAdapters,
    a: *const TesseraTensor,
    b: *const TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_adapters_set_weights";
    guard(OP, || {
        let adapters = handle::lora_adapters(OP, "adapters", adapters)?;
        let a = handle::tensor(OP, "a", a)?;
        let b = handle::tensor(OP, "b", b)?;
        let a = handle::read(OP, "a", &a)?;
        let b = handle::read(OP, "b", &b)?;
        let mut adapters = write_adapters(OP, &adapters)?;
        let (own_a, own_b) = adapters.parameters_mut();
        expect_output(OP, "a", &a, own_a.shape(), own_a.dtype(), &own_a.device())?;
        expect_output(OP, "b", &b, own_b.shape(), own_b.dtype(), &own_b.device())?;
        own_a.copy_from(&a)?;
        own_b.copy_from(&b)?;
        Ok(())
    })
}

/// Copies the set's `A` and `B` into `a` and `b`, which must have exactly their shapes, dtype
/// and device (see `tessera_lora_adapters_info`).
///
/// Ownership: nothing is taken; `a` and `b` must be distinct. Thread-safety: any thread; `a` and
/// `b` may not be used by another call meanwhile.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, NULL, `a` and `b` the
/// same), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error neither output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_adapters_get_weights(
    adapters: *const TesseraLoraAdapters,
    a: *mut TesseraTensor,
    b: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_adapters_get_weights";
    guard(OP, || {
        let adapters = handle::lora_adapters(OP, "adapters", adapters)?;
        let a = handle::tensor(OP, "a", a)?;
        let b = handle::tensor(OP, "b", b)?;
        handle::expect_distinct_outputs(OP, &[("a", &a), ("b", &b)], &[])?;
        let adapters = read_adapters(OP, &adapters)?;
        let mut a = handle::write(OP, "a", &a)?;
        let mut b = handle::write(OP, "b", &b)?;
        handle::expect_disjoint_outputs(OP, &[("a", &*a), ("b", &*b)], &[])?;
        let (own_a, own_b) = (adapters.a(), adapters.b());
        expect_output(OP, "a", &a, own_a.shape(), own_a.dtype(), &own_a.device())?;
        expect_output(OP, "b", &b, own_b.shape(), own_b.dtype(), &own_b.device())?;
        a.copy_from(own_a)?;
        b.copy_from(own_b)?;
        Ok(())
    })
}

fn register_routing(op: &str, out: *mut *mut TesseraLoraRouting, routing: LoraRouting) -> FfiResult<()> {
    write_out(op, "out", out, handle::register(Object::LoraRouting(Arc::new(routing))))
}

fn expect_rows(op: &str, arg: &str, rows: usize) -> FfiResult<()> {
    if rows == 0 || rows > MAX_ROWS {
        return Err(FfiError::invalid(op, arg, format!("1 to {MAX_ROWS} rows"), rows));
    }
    Ok(())
}

/// A routing in which token row `i` (of `rows`, 1 to 2^31 - 1) uses adapter `ids[i]`, for ops on
/// `device`. Ids are checked against an adapter set when the routing is used with it. Build it
/// once per batch and use it for every LoRA layer.
///
/// Ownership: `ids` is read during the call only; `*out` receives a new handle, released with
/// `tessera_lora_routing_free`. Thread-safety: any thread; a routing may be used by several calls
/// at once.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (`rows` out of range, an id of 2^20 or more: the
/// most adapters a set holds, NULL), `..._INVALID_HANDLE`, `..._CUDA`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_routing_new_per_row(
    device: *const TesseraDevice,
    ids: *const u32,
    rows: usize,
    out: *mut *mut TesseraLoraRouting,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_routing_new_per_row";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        expect_rows(OP, "rows", rows)?;
        let ids = read_array(OP, "ids", ids, rows)?;
        let routing = LoraRouting::per_row(&ids, &device).map_err(|e| rename(OP, e))?;
        register_routing(OP, out, routing)
    })
}

/// A routing for `sequences` sequences of `seq_len` rows each (rows `i·seq_len ..` use adapter
/// `ids[i]`), for ops on `device`; `sequences · seq_len` is 1 to 2^31 - 1.
///
/// Ownership: `ids` (`sequences` of them) is read during the call only; `*out` receives a new
/// handle, released with `tessera_lora_routing_free`. Thread-safety: any thread.
/// Errors: as `tessera_lora_routing_new_per_row`. On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_routing_new_per_sequence(
    device: *const TesseraDevice,
    ids: *const u32,
    sequences: usize,
    seq_len: usize,
    out: *mut *mut TesseraLoraRouting,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_routing_new_per_sequence";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        let rows = sequences.saturating_mul(seq_len);
        expect_rows(OP, "sequences", rows)?;
        let ids = read_array(OP, "ids", ids, sequences)?;
        let routing = LoraRouting::per_sequence(&ids, seq_len, &device).map_err(|e| rename(OP, e))?;
        register_routing(OP, out, routing)
    })
}

/// A routing in which every one of `rows` rows (1 to 2^31 - 1) uses adapter `adapter`, for ops
/// on `device`.
///
/// Ownership: `*out` receives a new handle, released with `tessera_lora_routing_free`.
/// Thread-safety: any thread. Errors: as `tessera_lora_routing_new_per_row`. On failure `*out`
/// is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_routing_new_single(
    device: *const TesseraDevice,
    rows: usize,
    adapter: u32,
    out: *mut *mut TesseraLoraRouting,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_routing_new_single";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let device = handle::device(OP, "device", device)?;
        expect_rows(OP, "rows", rows)?;
        let routing = LoraRouting::single(rows, adapter, &device).map_err(|e| rename(OP, e))?;
        register_routing(OP, out, routing)
    })
}

/// Releases a routing. NULL is accepted and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; calls using the
/// routing on other threads finish normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live routing.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_routing_free(routing: *mut TesseraLoraRouting) -> TesseraStatus {
    const OP: &str = "tessera_lora_routing_free";
    guard(OP, || handle::release(OP, "routing", routing, "a LoRA routing handle"))
}

/// A dense base: the weight tensor `w` (d_out, d_in), the PyTorch layout, of the dtype of the
/// inputs it will be used with. The base refers to the tensor, not to a copy: every call sees its
/// current values, and `tessera_lora_merge` writes it.
///
/// Ownership: `*out` receives a new handle, released with `tessera_lora_base_free`; the tensor
/// lives while the base does, even after `tessera_tensor_free(w)` (for a wrapped tensor the
/// caller's memory must stay valid until both handles are freed). Thread-safety: any thread.
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (`w` not 2-d with both dimensions at least 1, NULL),
/// `..._INVALID_HANDLE`, `..._BUSY` (`w` being written). On failure `*out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_base_new_dense(
    w: *const TesseraTensor,
    out: *mut *mut TesseraLoraBase,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_base_new_dense";
    clear_out(out);
    guard(OP, || {
        require(OP, "out", out)?;
        let shared = handle::tensor(OP, "w", w)?;
        {
            let w = handle::read(OP, "w", &shared)?;
            if w.shape().len() != 2 || w.shape().contains(&0) {
                return Err(FfiError::invalid(
                    OP,
                    "w",
                    "a 2-d weight (d_out, d_in) of at least one row and column",
                    format!("shape {:?}", w.shape()),
                ));
            }
        }
        let base = LoraBaseObject::Dense(shared);
        write_out(OP, "out", out, handle::register(Object::LoraBase(Arc::new(base))))
    })
}

/// Releases a base handle (and, when it held the last reference, its tensor). NULL is accepted
/// and does nothing.
///
/// Ownership: the handle is invalid afterwards. Thread-safety: any thread; calls using the base
/// on other threads finish normally.
/// Errors: `TESSERA_STATUS_INVALID_HANDLE` for a handle that is not a live base.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_base_free(base: *mut TesseraLoraBase) -> TesseraStatus {
    const OP: &str = "tessera_lora_base_free";
    guard(OP, || handle::release(OP, "base", base, "a LoRA base handle"))
}

/// The fused LoRA linear `out = x·Wᵀ + s_a·(x·A_aᵀ)·B_aᵀ (+ bias)`, row `i` using adapter
/// `a = ids[i]` of `routing`: `x` (m, d_in), `base` (d_out, d_in), `bias` (d_out) or NULL, `out`
/// (m, d_out), all of the adapters' dtype (F32, BF16 or F16) and on their device; the routing
/// has m rows, each id below the adapter count. f32 arithmetic; on a GPU queued on the device's
/// stream (the base product in cuBLASLt, the adapter products in cuBLASLt or tessera's kernels).
///
/// Ownership: nothing is taken; `out` must not be or overlap an input or the base.
/// Thread-safety: any thread; inputs may be read by other calls meanwhile; `out` may not be used
/// by another call (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, routing rows or ids,
/// aliasing, NULL), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error `out` is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_forward(
    x: *const TesseraTensor,
    base: *const TesseraLoraBase,
    bias: *const TesseraTensor,
    adapters: *const TesseraLoraAdapters,
    routing: *const TesseraLoraRouting,
    out: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_forward";
    guard(OP, || {
        let base = handle::lora_base(OP, "base", base)?;
        let adapters = handle::lora_adapters(OP, "adapters", adapters)?;
        let routing = handle::lora_routing(OP, "routing", routing)?;
        let x = handle::tensor(OP, "x", x)?;
        let bias = handle::optional_tensor(OP, "bias", bias)?;
        let out = handle::tensor(OP, "out", out)?;
        let mut inputs = vec![("x", &x), ("base", base_handle(&base))];
        inputs.extend(bias.as_ref().map(|b| ("bias", b)));
        handle::expect_other_handles(OP, "out", &out, &inputs)?;
        let x = handle::read(OP, "x", &x)?;
        let locked = lock_base(OP, &base)?;
        let bias = bias.as_ref().map(|b| handle::read(OP, "bias", b)).transpose()?;
        let adapters = read_adapters(OP, &adapters)?;
        let mut out = handle::write(OP, "out", &out)?;
        let mut others = vec![("x", &*x), ("base", locked.tensor())];
        others.extend(bias.as_deref().map(|b| ("bias", b)));
        handle::expect_no_overlap(OP, "out", &out, &others)?;
        ops::lora_forward_into(&x, locked.base(), bias.as_deref(), &adapters, &routing, &mut out)?;
        Ok(())
    })
}

/// The backward of `tessera_lora_forward` given `d_y` (m, d_out) and the forward's `x`, `base`,
/// `adapters` and `routing` (`x·Aᵀ` is recomputed): `d_x` (m, d_in) = `d_y·W + s·(d_y·B)·A` per
/// row's adapter; `d_a` and `d_b`, shaped like the set's `A` and `B`, the adapters' gradients
/// (zero for padded ranks and for adapters no row uses); and, when `d_w` is not NULL, the base's
/// gradient `d_yᵀ·x` (d_out, d_in) for a trainable base. All of the adapters' dtype and device.
/// Computed in tessera's memory, then copied into the outputs.
///
/// Ownership: nothing is taken; the outputs must be distinct and not overlap the inputs or the
/// base. Thread-safety: as `tessera_lora_forward`.
/// Errors: as `tessera_lora_forward`. On error no output is changed.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_backward(
    d_y: *const TesseraTensor,
    x: *const TesseraTensor,
    base: *const TesseraLoraBase,
    adapters: *const TesseraLoraAdapters,
    routing: *const TesseraLoraRouting,
    d_x: *mut TesseraTensor,
    d_a: *mut TesseraTensor,
    d_b: *mut TesseraTensor,
    d_w: *mut TesseraTensor,
) -> TesseraStatus {
    const OP: &str = "tessera_lora_backward";
    guard(OP, || {
        let base = handle::lora_base(OP, "base", base)?;
        let adapters = handle::lora_adapters(OP, "adapters", adapters)?;
        let routing = handle::lora_routing(OP, "routing", routing)?;
        let d_y = handle::tensor(OP, "d_y", d_y)?;
        let x = handle::tensor(OP, "x", x)?;
        let d_x = handle::tensor(OP, "d_x", d_x)?;
        let d_a = handle::tensor(OP, "d_a", d_a)?;
        let d_b = handle::tensor(OP, "d_b", d_b)?;
        let d_w = handle::optional_tensor(OP, "d_w", d_w)?;
        let inputs = [("d_y", &d_y), ("x", &x), ("base", base_handle(&base))];
        let mut outputs = vec![("d_x", &d_x), ("d_a", &d_a), ("d_b", &d_b)];
        outputs.extend(d_w.as_ref().map(|w| ("d_w", w)));
        handle::expect_distinct_outputs(OP, &outputs, &inputs)?;
        let d_y = handle::read(OP, "d_y", &d_y)?;
        let x = handle::read(OP, "x", &x)?;
        let locked = lock_base(OP, &base)?;
        let adapters = read_adapters(OP, &adapters)?;
        let mut d_x = handle::write(OP, "d_x", &d_x)?;
        let mut d_a = handle::write(OP, "d_a", &d_a)?;
        let mut d_b = handle::write(OP, "d_b", &d_b)?;
        let mut d_w = d_w.as_ref().map(|w| handle::write(OP, "d_w", w)).transpose()?;
        {
            let inputs = [("d_y", &*d_y), ("x", &*x), ("base", locked.tensor())];
            let mut outputs = vec![("d_x", &*d_x), ("d_a", &*d_a), ("d_b", &*d_b)];
            outputs.extend(d_w.as_deref().map(|w| ("d_w", w)));
            handle::expect_disjoint_outputs(OP, &outputs, &inputs)?;
        }
        let grads = ops::lora_backward(&d_y, &x, locked.base(), &adapters, &routing, d_w.is_some())?;
        let (dtype, device) = (x.dtype(), x.device());
        expect_output(OP, "d_x", &d_x, grads.d_x.shape(), dtype, &device)?;
        expect_output(OP, "d_a", &d_a, grads.d_a.shape(), dtype, &device)?;
        expect_output(OP, "d_b", &d_b, grads.d_b.shape(), dtype, &device)?;
        let d_w_grad = match (&d_w, &grads.d_w) {
            (Some(out), Some(grad)) => {
                expect_output(OP, "d_w", out, grad.shape(), dtype, &device)?;
                Some(grad)
            }
            _ => None,
        };
        d_x.copy_from(&grads.d_x)?;
        d_a.copy_from(&grads.d_a)?;
        d_b.copy_from(&grads.d_b)?;
        if let (Some(out), Some(grad)) = (&mut d_w, d_w_grad) {
            out.copy_from(grad)?;
        }
        Ok(())
    })
}

/// Merges (`add`) or unmerges an adapter into the base's weight.
fn merge(
    op: &'static str,
    base: *const TesseraLoraBase,
    adapters: *const TesseraLoraAdapters,
    adapter: usize,
    add: bool,
) -> TesseraStatus {
    guard(op, || {
        let base = handle::lora_base(op, "base", base)?;
        let adapters = handle::lora_adapters(op, "adapters", adapters)?;
        let adapters = read_adapters(op, &adapters)?;
        match &*base {
            LoraBaseObject::Dense(w) => {
                let mut w = handle::write(op, "base", w)?;
                if add {
                    ops::lora_merge(&mut w, &adapters, adapter)?;
                } else {
                    ops::lora_unmerge(&mut w, &adapters, adapter)?;
                }
            }
        }
        Ok(())
    })
}

/// `W += s_a·B_a·A_a` for adapter `adapter` of the set, into the base's weight in place (computed
/// in f32 and rounded once): afterwards the base alone gives what base and adapter gave. The
/// weight must be (d_out, d_in) of the adapters' dtype and on their device.
///
/// Ownership: nothing is taken. Thread-safety: any thread; the base's tensor may not be used by
/// another call meanwhile (`TESSERA_STATUS_BUSY`).
/// Errors: `TESSERA_STATUS_INVALID_ARGUMENT` (shapes, dtypes, devices, `adapter` not below the
/// count, NULL), `..._INVALID_HANDLE`, `..._BUSY`, `..._CUDA`. On error the weight is unchanged.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_merge(
    base: *mut TesseraLoraBase,
    adapters: *const TesseraLoraAdapters,
    adapter: usize,
) -> TesseraStatus {
    merge("tessera_lora_merge", base, adapters, adapter, true)
}

/// `W -= s_a·B_a·A_a`: undoes `tessera_lora_merge` up to the dtype's rounding of each step.
///
/// Ownership, thread-safety and errors: as `tessera_lora_merge`.
#[no_mangle]
pub unsafe extern "C" fn tessera_lora_unmerge(
    base: *mut TesseraLoraBase,
    adapters: *const TesseraLoraAdapters,
    adapter: usize,
) -> TesseraStatus {
    merge("tessera_lora_unmerge", base, adapters, adapter, false)
}
