//! A thin cuBLASLt wrapper: one handle and one workspace per device, and a cache of matmul plans
//! (descriptors, layouts and the heuristic's algorithm) so that a repeated shape costs one call.
//!
//! Matrices are row-major in tessera and column-major in cuBLAS. A row-major (m, n) output is a
//! column-major (n, m) one, so `out = op(A)·op(B)` is computed as `outᵀ = op(B)ᵀ·op(A)ᵀ`: B is
//! cuBLAS's first operand and A its second, and neither needs an explicit transpose.

use super::{CudaBackend, CudaContextExt};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::CudaSlice;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

/// How many of the heuristic's algorithms a plan keeps, for autotuning.
const CANDIDATES: usize = 8;

/// cuBLASLt's recommended workspace: 32 MiB on Hopper, 4 MiB before it.
fn workspace_bytes(compute_capability: (i32, i32)) -> usize {
    if compute_capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// One row-major matmul, as validated by the op: `out[m, n] = alpha·op(A)[m, k]·op(B)[k, n]
/// + beta·out + bias[n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct MatmulShape {
    /// The operands' dtype.
    pub dtype: DType,
    /// The output's (and bias's) dtype: the operands', or f32.
    pub out_dtype: DType,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub bias: bool,
}

/// Device addresses of the operands.
pub(crate) struct MatmulOperands {
    pub a: u64,
    pub b: u64,
    pub out: u64,
    pub bias: Option<u64>,
    pub alpha: f32,
    pub beta: f32,
}

pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_bytes: usize,
    plans: HashMap<MatmulShape, Plan>,
    context: std::sync::Arc<cudarc::driver::CudaContext>,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

// SAFETY: the handle is only used under the backend's mutex, one thread at a time.
unsafe impl Send for BlasLt {}

impl BlasLt {
    pub(crate) fn new(backend: &CudaBackend) -> Result<BlasLt> {
        // SAFETY: only tries to open the shared library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::cuda("cuBLASLt", "libcublasLt was not found on this machine"));
        }
        backend.context.bind_to_thread().context("binding the CUDA context")?;
        let workspace_bytes = workspace_bytes(backend.compute_capability);
        // SAFETY: the workspace is scratch memory for cuBLASLt; nobody reads it.
        let workspace =
            unsafe { backend.stream.alloc::<u8>(workspace_bytes) }.context("allocating the cuBLASLt workspace")?;
        let handle = result::create_handle().context("cublasLtCreate")?;
        Ok(BlasLt {
            handle,
            workspace,
            workspace_bytes,
            plans: HashMap::new(),
            context: backend.context.clone(),
            stream: backend.stream.clone(),
        })
    }

    /// Queues the following matmuls on `stream` (the device's stream, or its capture stream
    /// while a graph is captured).
    pub(crate) fn use_stream(&mut self, stream: &std::sync::Arc<cudarc::driver::CudaStream>) {
        if !std::sync::Arc::ptr_eq(&self.stream, stream) {
            self.stream = stream.clone();
        }
    }

    /// Queues one matmul on the device's stream. With `autotune`, the first call of a shape that
    /// overwrites its output (beta = 0) times each of the heuristic's candidate algorithms on the
    /// real operands and keeps the fastest for that shape; otherwise the heuristic's first choice
    /// runs, which keeps results bit-identical from run to run.
    pub(crate) fn matmul(&mut self, shape: MatmulShape, operands: &MatmulOperands, autotune: bool) -> Result<()> {
        self.context.bind_to_thread().context("binding the CUDA context")?;
        if !self.plans.contains_key(&shape) {
            let plan = Plan::new(self.handle, shape, self.workspace_bytes)?;
            self.plans.insert(shape, plan);
        }
        let (workspace, _sync) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, &self.stream);
        let call = Call {
            handle: self.handle,
            workspace,
            workspace_bytes: self.workspace_bytes,
            stream: self.stream.cu_stream() as sys::cudaStream_t,
        };
        let plan = self
            .plans
            .get_mut(&shape)
            .ok_or_else(|| Error::cuda("cuBLASLt", "matmul plan missing from its cache"))?;
        if let Some(bias) = operands.bias {
            // SAFETY: the descriptor is alive; the attribute is a device pointer of the right size.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            }
            .context("setting the bias pointer")?;
        }
        if autotune && plan.tuned.is_none() && operands.beta == 0.0 && plan.candidates.len() > 1 {
            plan.tuned = Some(tune(&call, plan, operands, &self.context)?);
        }
        let algo = &plan.candidates[plan.tuned.unwrap_or(0)];
        call.run(plan, algo, operands)
            .context(&format!("cublasLtMatmul {shape:?}"))
    }
}

/// What every cublasLtMatmul call of one handle shares.
struct Call {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_bytes: usize,
    stream: sys::cudaStream_t,
}

impl Call {
    fn run(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        operands: &MatmulOperands,
    ) -> std::result::Result<(), result::CublasError> {
        // SAFETY: the operands were validated against the plan's shape by the op and live on this
        // device; descriptors and algorithm come from the plan made for exactly this shape.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                &operands.alpha as *const f32 as *const c_void,
                &operands.beta as *const f32 as *const c_void,
                operands.b as *const c_void,
                plan.first_layout,
                operands.a as *const c_void,
                plan.second_layout,
                operands.out as *const c_void,
                plan.out_layout,
                operands.out as *mut c_void,
                plan.out_layout,
                algo,
                self.workspace as *mut c_void,
                self.workspace_bytes,
                self.stream,
            )
        }
    }
}

/// Times each candidate algorithm (one warm-up, then three runs between CUDA events) and returns
/// the index of the fastest. Only called when beta = 0, so the repeated runs leave `out` as one
/// run would.
fn tune(
    call: &Call,
    plan: &Plan,
    operands: &MatmulOperands,
    context: &std::sync::Arc<cudarc::driver::CudaContext>,
) -> Result<usize> {
    let event = || {
        context
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .context("creating a timing event")
    };
    let (start, end) = (event()?, event()?);
    let mut best: Option<(usize, f32)> = None;
    for (index, algo) in plan.candidates.iter().enumerate() {
        // A candidate the library refuses for these operands is skipped, not an error.
        if call.run(plan, algo, operands).is_err() {
            continue;
        }
        record(&start, call.stream)?;
        let runs: std::result::Result<(), _> = (0..3).try_for_each(|_| call.run(plan, algo, operands));
        record(&end, call.stream)?;
        end.synchronize().context("waiting for a timing event")?;
        if runs.is_err() {
            continue;
        }
        let ms = start.elapsed_ms(&end).context("reading a timing event")?;
        if best.is_none_or(|(_, fastest)| ms < fastest) {
            best = Some((index, ms));
        }
    }
    Ok(best.map_or(0, |(index, _)| index))
}

/// Records `event` on a raw stream handle.
fn record(event: &cudarc::driver::CudaEvent, stream: sys::cudaStream_t) -> Result<()> {
    // SAFETY: the event and the stream belong to the same, current context.
    unsafe { cudarc::driver::result::event::record(event.cu_event(), stream as cudarc::driver::sys::CUstream) }
        .context("recording a timing event")
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle is alive and no plan refers to it any more. Errors cannot be
        // reported from a destructor and leave nothing to clean up.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// Descriptors and the chosen algorithm for one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    first_layout: sys::cublasLtMatrixLayout_t,
    second_layout: sys::cublasLtMatrixLayout_t,
    out_layout: sys::cublasLtMatrixLayout_t,
    /// The heuristic's algorithms for this shape, best guess first.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    /// Index into `candidates` chosen by timing, once tuned.
    tuned: Option<usize>,
}

fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
    match dtype {
        DType::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType::CUDA_R_16F),
        other => Err(Error::Unsupported {
            op: "matmul",
            reason: format!("cuBLASLt matmul of dtype {other}"),
        }),
    }
}

/// A column-major layout of `rows` x `cols` with leading dimension `rows`.
fn layout(dtype: sys::cudaDataType, rows: usize, cols: usize) -> Result<sys::cublasLtMatrixLayout_t> {
    result::create_matrix_layout(dtype, rows as u64, cols as u64, rows as i64).context("cublasLtMatrixLayoutCreate")
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attribute: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: the descriptor is alive and `value` has the size the attribute expects.
    unsafe { result::set_matmul_desc_attribute(desc, attribute, value as *const T as *const c_void, size_of::<T>()) }
        .context("cublasLtMatmulDescSetAttribute")
}

impl Plan {
    fn new(handle: sys::cublasLtHandle_t, shape: MatmulShape, workspace_bytes: usize) -> Result<Plan> {
        let dtype = data_type(shape.dtype)?;
        let (m, n, k) = (shape.m, shape.n, shape.k);
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .context("cublasLtMatmulDescCreate")?;
        // From here on, `plan`'s destructor frees whatever has been created if a step fails.
        let mut plan = Plan {
            desc,
            first_layout: std::ptr::null_mut(),
            second_layout: std::ptr::null_mut(),
            out_layout: std::ptr::null_mut(),
            candidates: Vec::new(),
            tuned: None,
        };
        // cublasOperation_t: 0 is "as stored", 1 is "transposed".
        let op = |transpose: bool| transpose as i32;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(shape.trans_b),
        )?;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(shape.trans_a),
        )?;
        let epilogue = if shape.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue,
        )?;
        // Column-major views: B is (n, k) as stored when transposed, else (k, n) seen as (n, k)
        // after cuBLAS's own transpose flag; likewise A.
        plan.first_layout = if shape.trans_b {
            layout(dtype, k, n)?
        } else {
            layout(dtype, n, k)?
        };
        plan.second_layout = if shape.trans_a {
            layout(dtype, m, k)?
        } else {
            layout(dtype, k, m)?
        };
        plan.out_layout = layout(data_type(shape.out_dtype)?, n, m)?;

        let preference = result::create_matmul_pref().context("cublasLtMatmulPreferenceCreate")?;
        let heuristic = (|| {
            // SAFETY: the preference is alive and the attribute is a usize.
            unsafe {
                result::set_matmul_pref_attribute(
                    preference,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &workspace_bytes as *const usize as *const c_void,
                    size_of::<usize>(),
                )
            }
            .context("cublasLtMatmulPreferenceSetAttribute")?;
            // SAFETY: all-zero heuristic results are plain data that the call overwrites.
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] = unsafe { std::mem::zeroed() };
            let mut count = 0;
            // SAFETY: all descriptors are alive and describe this shape; `results` has room for
            // the CANDIDATES results asked for.
            unsafe {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    desc,
                    plan.first_layout,
                    plan.second_layout,
                    plan.out_layout,
                    plan.out_layout,
                    preference,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
            }
            .result()
            .context("cublasLtMatmulAlgoGetHeuristic")?;
            Ok(results[..count.clamp(0, CANDIDATES as i32) as usize]
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect::<Vec<_>>())
        })();
        // SAFETY: the preference is alive and no longer needed.
        let _ = unsafe { result::destroy_matmul_pref(preference) };
        plan.candidates = heuristic?;
        if plan.candidates.is_empty() {
            return Err(Error::cuda("cuBLASLt", format!("no algorithm for {shape:?}")));
        }
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt and is freed once; null ones never existed.
        unsafe {
            for layout in [self.first_layout, self.second_layout, self.out_layout] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}
