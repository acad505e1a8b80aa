//! The CUDA backend: one context and one stream per GPU, kernels loaded lazily from the images
//! embedded at build time, device buffers, and the cuBLASLt handle.
//!
//! cudarc loads libcuda dynamically and panics when it is missing, so every entry point here
//! probes for the driver first and turns its absence into [`Error::NoCuda`].

pub mod blaslt;
pub mod kernels;
pub(crate) mod tensor_map;

use crate::error::{Error, Result};
use cudarc::driver::{
    result as driver, sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchArgs,
};
use std::cell::Cell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Adds a context to a cudarc error.
pub(crate) trait CudaContextExt<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Display> CudaContextExt<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::cuda(what, e))
    }
}

/// Loads the driver and counts GPUs, or says why it cannot.
pub(crate) fn device_count() -> Result<usize> {
    // SAFETY: only tries to open the shared library; no CUDA call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoCuda(
            "the CUDA driver library (libcuda.so) was not found on this machine".into(),
        ));
    }
    driver::init().map_err(|e| Error::NoCuda(format!("the CUDA driver failed to initialise: {e}")))?;
    let count = driver::device::get_count().context("cuDeviceGetCount")?;
    Ok(count.max(0) as usize)
}

/// Everything tessera keeps per GPU.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    total_memory: usize,
    multiprocessors: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blaslt: Mutex<Option<blaslt::BlasLt>>,
    matmul_autotune: AtomicBool,
    /// Scratch buffers that ops keep from one call to the next, by name (see
    /// [`CudaBackend::with_scratch`]).
    scratch: Mutex<HashMap<&'static str, CudaSlice<u8>>>,
    /// The stream graphs are captured on, made on first capture: capturing on a stream of its
    /// own leaves `stream` free for what other threads queue meanwhile.
    capture_stream: OnceLock<Arc<CudaStream>>,
    /// Held for the whole of a capture, so that two threads never capture on `capture_stream` at
    /// once.
    capture_lock: Mutex<()>,
}

thread_local! {
    /// Device allocations this thread has made (see [`CudaBackend::thread_allocations`]).
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// The ordinal of the device whose work this thread is capturing into a graph, if any: its
    /// launches, copies and cuBLASLt calls go to that device's capture stream meanwhile.
    static CAPTURING: Cell<Option<usize>> = const { Cell::new(None) };
}

fn count_allocation() {
    ALLOCATIONS.set(ALLOCATIONS.get() + 1);
}

impl CudaBackend {
    /// The backend of GPU `ordinal`, created on first use and shared afterwards.
    pub(crate) fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
        let count = device_count()?;
        if count == 0 {
            return Err(Error::NoCuda("the CUDA driver reports no GPU".into()));
        }
        if ordinal >= count {
            return Err(Error::NoCuda(format!(
                "GPU {ordinal} was asked for but the machine has {count} (ordinals 0..{count})"
            )));
        }
        let backends = BACKENDS.get_or_init(Default::default);
        let mut backends = backends.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(backend) = backends.get(&ordinal) {
            return Ok(backend.clone());
        }
        let backend = Arc::new(CudaBackend::new(ordinal)?);
        backends.insert(ordinal, backend.clone());
        Ok(backend)
    }

    fn new(ordinal: usize) -> Result<CudaBackend> {
        let context = CudaContext::new(ordinal).context("creating the CUDA context")?;
        // All of tessera's work goes through one stream per device, in order, so cudarc's
        // per-buffer event tracking (made for several streams) would only add overhead.
        // SAFETY: no buffer is ever used on another stream than `stream` below.
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream().context("creating the CUDA stream")?;
        let compute_capability = context.compute_capability().context("reading the compute capability")?;
        let multiprocessors = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("reading the multiprocessor count")?;
        Ok(CudaBackend {
            ordinal,
            name: context.name().context("reading the device name")?,
            compute_capability,
            total_memory: context.total_mem().context("reading the device memory size")?,
            multiprocessors: multiprocessors.max(1) as usize,
            context,
            stream,
            modules: Mutex::new(HashMap::new()),
            blaslt: Mutex::new(None),
            matmul_autotune: AtomicBool::new(false),
            scratch: Mutex::new(HashMap::new()),
            capture_stream: OnceLock::new(),
            capture_lock: Mutex::new(()),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device name, as the driver reports it (`NVIDIA H200`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Device memory in bytes.
    pub fn total_memory(&self) -> usize {
        self.total_memory
    }

    /// Device memory in use now, by this process and any other, in bytes.
    pub fn memory_in_use(&self) -> Result<usize> {
        let (free, total) = self.context.mem_get_info().context("cuMemGetInfo")?;
        Ok(total - free)
    }

    /// Streaming multiprocessors.
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// The stream all of tessera's work on this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Which embedded image this device loads: the sm_90a cubin on Hopper, the sm_80 cubin on
    /// other 8.x GPUs, the compute_80 PTX (JIT-compiled by the driver) on newer ones.
    pub fn kernel_image(&self) -> Result<kernels::ImageKind> {
        kernels::ImageKind::for_compute_capability(self.compute_capability)
    }

    /// Whether matmuls pick their cuBLASLt algorithm by timing the heuristic's candidates on the
    /// first call of each shape (off by default). Autotuning can be faster, but which algorithm
    /// wins may differ from run to run, and with it the rounding of the results: with it off,
    /// results are bit-identical across runs.
    pub fn set_matmul_autotune(&self, on: bool) {
        self.matmul_autotune.store(on, Ordering::Relaxed);
    }

    pub(crate) fn matmul_autotune(&self) -> bool {
        self.matmul_autotune.load(Ordering::Relaxed)
    }

    /// Waits for all queued work and reports any error it raised.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("a synchronisation")?;
        self.stream.synchronize().context("synchronizing the stream")
    }

    /// Runs `work` `warmup` times, then `iterations` times between a pair of CUDA events each,
    /// and returns each timed run's milliseconds. `work` gets the iteration number, so that it
    /// can rotate between input sets larger than the L2 cache.
    pub fn time_ms(
        &self,
        warmup: usize,
        iterations: usize,
        mut work: impl FnMut(usize) -> Result<()>,
    ) -> Result<Vec<f32>> {
        for i in 0..warmup {
            work(i)?;
        }
        let new_event = || {
            self.context
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .context("creating a timing event")
        };
        let events: Vec<_> = (0..iterations)
            .map(|_| Ok((new_event()?, new_event()?)))
            .collect::<Result<_>>()?;
        for (i, (start, end)) in events.iter().enumerate() {
            start.record(&self.stream).context("recording a timing event")?;
            work(i)?;
            end.record(&self.stream).context("recording a timing event")?;
        }
        self.synchronize()?;
        events
            .iter()
            .map(|(start, end)| start.elapsed_ms(end).context("reading a timing event"))
            .collect()
    }

    /// A kernel function from the embedded module `file` (the stem of `kernels/<file>.cu`).
    /// Each module is loaded once per device, on first use.
    pub(crate) fn function(&self, file: &'static str, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match modules.get(file) {
                Some(module) => module.clone(),
                None => {
                    let image = kernels::image(file, self.kernel_image()?)?;
                    let module = self
                        .context
                        .load_module(image)
                        .context(&format!("loading kernels/{file}.cu on {}", self.name))?;
                    modules.insert(file, module.clone());
                    module
                }
            }
        };
        module
            .load_function(name)
            .context(&format!("finding kernel `{name}` in kernels/{file}.cu"))
    }

    /// Lets `function` launch with `bytes` of dynamic shared memory (more than the default 48 KiB
    /// needs this opt-in).
    pub(crate) fn allow_shared_memory(&self, function: &CudaFunction, bytes: usize) -> Result<()> {
        self.context.bind_to_thread().context("binding the CUDA context")?;
        let bytes = i32::try_from(bytes).map_err(|e| Error::cuda("cuFuncSetAttribute", e))?;
        function
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .context(&format!("allowing {bytes} bytes of dynamic shared memory"))
    }

    /// Starts a launch of `function` on this device's stream (on its capture stream while this
    /// thread captures a graph).
    pub(crate) fn launch_builder<'a>(&'a self, function: &'a CudaFunction) -> LaunchArgs<'a> {
        self.queue().launch_builder(function)
    }

    /// The stream this thread's work on the device goes to: the capture stream while this thread
    /// captures a graph of this device, the device's stream otherwise.
    pub(crate) fn queue(&self) -> &Arc<CudaStream> {
        match (CAPTURING.with(Cell::get), self.capture_stream.get()) {
            (Some(ordinal), Some(capture)) if ordinal == self.ordinal => capture,
            _ => &self.stream,
        }
    }

    /// An error when this thread is capturing a graph of this device: `what` (an allocation, a
    /// copy from or to the host, a synchronisation) cannot be part of a graph replayed later.
    fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if CAPTURING.with(Cell::get) == Some(self.ordinal) {
            return Err(Error::Unsupported {
                op: "CUDA graph capture",
                reason: format!("{what} inside a captured step"),
            });
        }
        Ok(())
    }

    /// Captures the work `f` queues on this device into a graph and instantiates it, without
    /// running anything. `f` must queue kernels, device-to-device copies and cuBLASLt calls only:
    /// an allocation, a host copy or a synchronisation inside it is an error that names it.
    ///
    /// The capture runs on a stream of its own in `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`: other
    /// threads may keep queueing work on the device's stream meanwhile (global mode would make
    /// their unsafe calls, such as a synchronous copy, fail the capture), and the checks above
    /// already keep this thread's own calls capturable.
    pub fn capture_graph(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        let _only = self
            .capture_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let capture = match self.capture_stream.get() {
            Some(stream) => stream.clone(),
            None => {
                let stream = self.context.new_stream().context("creating the capture stream")?;
                self.capture_stream.get_or_init(|| stream).clone()
            }
        };
        capture
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("beginning a graph capture")?;
        /// Sends this thread's work back to the device's stream when dropped, also when `f`
        /// panics; a capture left open by a panic only blocks the capture stream, which nothing
        /// else uses.
        struct Capturing;
        impl Drop for Capturing {
            fn drop(&mut self) {
                CAPTURING.with(|c| c.set(None));
            }
        }
        let capturing = Capturing;
        CAPTURING.with(|c| c.set(Some(self.ordinal)));
        let queued = f();
        drop(capturing);
        // The capture is ended whatever `f` returned, so that the stream leaves capture mode.
        let graph = capture.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        let graph = graph
            .context("ending the graph capture and instantiating it")?
            .ok_or_else(|| Error::cuda("cuStreamEndCapture", "the capture produced no graph"))?;
        Ok(CudaGraph { graph })
    }

    /// Queues one replay of `graph` on this device's stream, after the work queued before it.
    pub fn launch_graph(&self, graph: &CudaGraph) -> Result<()> {
        self.refuse_in_capture("a graph launch")?;
        self.context.bind_to_thread().context("binding the CUDA context")?;
        // SAFETY: the executable graph is alive (owned by `graph`) and was captured from work of
        // this device; the buffers it reads and writes are kept alive by its owner.
        unsafe { driver::graph::launch(graph.graph.cu_graph_exec(), self.stream.cu_stream()) }.context("cuGraphLaunch")
    }

    /// Lets `function` use `bytes` of dynamic shared memory (above the default 48 KiB).
    pub(crate) fn allow_dynamic_shared(&self, function: &CudaFunction, bytes: usize) -> Result<()> {
        self.context.bind_to_thread().context("binding the CUDA context")?;
        function
            .set_attribute(
                sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .context(&format!("allowing a kernel {bytes} bytes of dynamic shared memory"))
    }

    /// Runs `f` with this device's cuBLASLt handle, creating it on first use.
    pub(crate) fn with_blaslt<T>(&self, f: impl FnOnce(&mut blaslt::BlasLt) -> Result<T>) -> Result<T> {
        let mut guard = self.blaslt.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            *guard = Some(blaslt::BlasLt::new(self)?);
        }
        match guard.as_mut() {
            Some(handle) => {
                handle.use_stream(self.queue());
                f(handle)
            }
            None => Err(Error::cuda("cuBLASLt", "the handle could not be created")),
        }
    }

    /// How many device allocations the calling thread has made on any GPU: every tensor's and
    /// every growth of an op's scratch buffer (not cuBLASLt's workspace, made once per device).
    /// Two readings around some work tell whether it allocated, e.g. a training step after the
    /// first; other threads' work does not count.
    pub fn thread_allocations() -> u64 {
        ALLOCATIONS.get()
    }

    /// Runs `f` with the address of the scratch buffer `name`, at least `bytes` long, whose first
    /// `prefix.len()` bytes hold `prefix` (copied in stream order before `f`'s work); the rest is
    /// uninitialised. The buffer is kept for the next call with that name and only grows (the old
    /// one freed in stream order), so a repeated call allocates nothing. Every use is queued on
    /// this backend's one stream, so a later call's writes come after this call's kernels; the
    /// lock, held while `f` runs, keeps threads that share the backend from interleaving their
    /// uses. So `f` must queue all its work on the buffer before it returns, and must not ask
    /// for scratch itself (the lock is not reentrant).
    pub(crate) fn with_scratch<T>(
        &self,
        name: &'static str,
        bytes: usize,
        prefix: &[u8],
        f: impl FnOnce(u64) -> Result<T>,
    ) -> Result<T> {
        if prefix.len() > bytes {
            return Err(Error::invalid(
                "CudaBackend::with_scratch",
                "prefix",
                format!("at most the {bytes} bytes asked for"),
                prefix.len(),
            ));
        }
        // Its allocation and its host copy cannot be captured; no captured step asks for scratch.
        self.refuse_in_capture(&format!("the scratch buffer `{name}`"))?;
        let mut buffers = self.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let bytes = bytes.max(1);
        if buffers.get(name).is_none_or(|b| b.len() < bytes) {
            // SAFETY: uninitialised scratch; callers write what they read (the prefix below).
            let slice = unsafe { self.stream.alloc::<u8>(bytes) }.context(&format!(
                "allocating {bytes} bytes of scratch `{name}` on {}",
                self.name
            ))?;
            count_allocation();
            buffers.insert(name, slice);
        }
        let buffer = buffers
            .get_mut(name)
            .ok_or_else(|| Error::cuda("scratch", format!("buffer `{name}` missing after its allocation")))?;
        if !prefix.is_empty() {
            let mut head = buffer.slice_mut(..prefix.len());
            self.stream
                .memcpy_htod(prefix, &mut head)
                .context("copying host to device")?;
        }
        let (address, _sync) = buffer.device_ptr(&self.stream);
        f(address)
    }

    /// `bytes` of uninitialised device memory.
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        self.refuse_in_capture(&format!("an allocation of {bytes} bytes"))?;
        count_allocation();
        // SAFETY: the memory is uninitialised; every op writes its output before it is read, and
        // tensors created for the user are zeroed or copied into first.
        let slice =
            unsafe { self.stream.alloc::<u8>(bytes) }.context(&format!("allocating {bytes} bytes on {}", self.name))?;
        Ok(DeviceBuffer {
            slice: ManuallyDrop::new(slice),
            backend: self.clone(),
            owned: true,
        })
    }

    /// A buffer over `bytes` of device memory at `address` that tessera does not own: dropping
    /// the buffer never frees it. The driver is asked first (`cuPointerGetAttribute`) that the
    /// whole range lies in one allocation of device (or managed) memory of this GPU; `op` names
    /// the caller in the error.
    ///
    /// # Safety
    ///
    /// For the buffer's life, the range must stay allocated, and must not be written other than
    /// through the buffer while work queued on this device's stream uses it.
    pub(crate) unsafe fn wrap(self: &Arc<Self>, op: &'static str, address: u64, bytes: usize) -> Result<DeviceBuffer> {
        self.check_device_range(op, address, bytes)?;
        // SAFETY: the range is device memory of this GPU (checked above) that stays valid for
        // the buffer's life (the caller's promise); the buffer leaks rather than frees it.
        let slice = unsafe { self.stream.upgrade_device_ptr::<u8>(address, bytes) };
        Ok(DeviceBuffer {
            slice: ManuallyDrop::new(slice),
            backend: self.clone(),
            owned: false,
        })
    }

    /// Checks with the driver that `address..address + bytes` lies in one allocation of device
    /// or managed memory on this GPU.
    fn check_device_range(&self, op: &'static str, address: u64, bytes: usize) -> Result<()> {
        use sys::CUpointer_attribute as Attribute;
        self.context.bind_to_thread().context("binding the CUDA context")?;
        let expected = format!("device memory of cuda:{} allocated with CUDA", self.ordinal);
        let unknown = |e: String| {
            Error::invalid(
                op,
                "data",
                expected.clone(),
                format!("{address:#x}, which the CUDA driver does not know as device memory ({e})"),
            )
        };
        // SAFETY: each query writes one value of the attribute's documented type into a local.
        let memory_type: u32 =
            unsafe { pointer_attribute(Attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, address) }.map_err(unknown)?;
        let device_types = [
            sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32,
            sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32,
        ];
        if !device_types.contains(&memory_type) {
            return Err(Error::invalid(
                op,
                "data",
                expected,
                format!("{address:#x}, memory of CUDA memory type {memory_type} (1 is host memory)"),
            ));
        }
        // SAFETY: as above.
        let ordinal: i32 =
            unsafe { pointer_attribute(Attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, address) }.map_err(unknown)?;
        if usize::try_from(ordinal).ok() != Some(self.ordinal) {
            return Err(Error::invalid(
                op,
                "data",
                expected,
                format!("{address:#x}, memory of cuda:{ordinal}"),
            ));
        }
        // SAFETY: as above.
        let start: u64 =
            unsafe { pointer_attribute(Attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, address) }.map_err(unknown)?;
        // SAFETY: as above.
        let size: usize =
            unsafe { pointer_attribute(Attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE, address) }.map_err(unknown)?;
        let end = start.checked_add(size as u64);
        let wanted_end = address.checked_add(bytes as u64);
        match (end, wanted_end) {
            (Some(end), Some(wanted_end)) if start <= address && wanted_end <= end => Ok(()),
            _ => Err(Error::invalid(
                op,
                "bytes",
                format!("{bytes} bytes from {address:#x} inside its allocation"),
                format!("an allocation of {size} bytes at {start:#x}"),
            )),
        }
    }

    /// `bytes` of zeroed device memory.
    pub(crate) fn alloc_zeroed(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let mut buffer = self.alloc(bytes)?;
        buffer.fill_bytes(0, bytes)?;
        Ok(buffer)
    }

    /// A device copy of `bytes`.
    pub(crate) fn upload(self: &Arc<Self>, bytes: &[u8]) -> Result<DeviceBuffer> {
        let mut buffer = self.alloc(bytes.len())?;
        self.stream
            .memcpy_htod(bytes, &mut *buffer.slice)
            .context("copying host to device")?;
        Ok(buffer)
    }
}

/// One value of a pointer attribute.
///
/// # Safety
///
/// `T` must be the type the driver writes for `attribute` (unsigned int for the memory type, int
/// for the ordinal, CUdeviceptr for the range start, size_t for the range size).
unsafe fn pointer_attribute<T: Default>(
    attribute: sys::CUpointer_attribute,
    address: u64,
) -> std::result::Result<T, String> {
    let mut value = T::default();
    // SAFETY: `value` is a live local of the type the caller promised for this attribute.
    unsafe { sys::cuPointerGetAttribute((&mut value as *mut T).cast(), attribute, address) }
        .result()
        .map_err(|e| e.to_string())?;
    Ok(value)
}

/// Device memory of a tensor: owned (freed on its device's stream when dropped) or a caller's
/// allocation wrapped by [`CudaBackend::wrap`] (left alone when dropped).
pub(crate) struct DeviceBuffer {
    slice: ManuallyDrop<CudaSlice<u8>>,
    backend: Arc<CudaBackend>,
    owned: bool,
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and the buffer is never used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        if self.owned {
            drop(slice);
        } else {
            // Forgets the address without freeing it: the memory is the caller's.
            let _ = slice.leak();
        }
    }
}

impl DeviceBuffer {
    pub(crate) fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    /// The raw device address, for descriptor tables and library calls.
    pub(crate) fn address(&self) -> u64 {
        let (address, _sync) = self.slice.device_ptr(&self.backend.stream);
        address
    }

    /// Bytes the buffer holds.
    pub(crate) fn len(&self) -> usize {
        self.slice.len()
    }

    /// Copies the buffer's first `out.len()` bytes (at most all it holds) to the host.
    pub(crate) fn copy_to_host(&self, out: &mut [u8]) -> Result<()> {
        let source = self.slice.try_slice(..out.len()).ok_or_else(|| {
            Error::invalid(
                "DeviceBuffer::copy_to_host",
                "out",
                format!("at most {} bytes", self.slice.len()),
                out.len(),
            )
        })?;
        self.backend.refuse_in_capture("a copy to the host")?;
        self.backend
            .stream
            .memcpy_dtoh(&source, out)
            .context("copying device to host")?;
        self.backend.synchronize()
    }

    /// Copies `bytes` bytes of `source` (on this or another GPU) from `source_offset` into this
    /// buffer at `offset`.
    pub(crate) fn copy_range_from(
        &mut self,
        offset: usize,
        source: &DeviceBuffer,
        source_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        let (dst_len, src_len) = (self.slice.len(), source.slice.len());
        let range = |start: usize, len: usize| start.checked_add(bytes).filter(|&end| end <= len).map(|end| start..end);
        let (Some(to), Some(from)) = (range(offset, dst_len), range(source_offset, src_len)) else {
            return Err(Error::invalid(
                "DeviceBuffer::copy_range_from",
                "bytes",
                format!("ranges within {src_len} source and {dst_len} destination bytes"),
                format!("{bytes} bytes from {source_offset} to {offset}"),
            ));
        };
        let source = source.slice.slice(from);
        let mut destination = self.slice.slice_mut(to);
        self.backend
            .queue()
            .memcpy_dtod(&source, &mut destination)
            .context("copying device to device")
    }

    /// Copies host bytes, at most as many as the buffer holds, into its start.
    pub(crate) fn copy_from_host(&mut self, bytes: &[u8]) -> Result<()> {
        self.backend.refuse_in_capture("a copy from pageable host memory")?;
        self.backend
            .stream
            .memcpy_htod(bytes, &mut *self.slice)
            .context("copying host to device")
    }

    /// A copy of the buffer's first `bytes` bytes on `backend`'s GPU.
    pub(crate) fn copy_to(&self, backend: &Arc<CudaBackend>, bytes: usize) -> Result<DeviceBuffer> {
        let mut copy = backend.alloc(bytes)?;
        let source = self.slice.try_slice(..bytes).ok_or_else(|| {
            Error::invalid(
                "DeviceBuffer::copy_to",
                "bytes",
                format!("at most {}", self.slice.len()),
                bytes,
            )
        })?;
        backend
            .stream
            .memcpy_dtod(&source, &mut *copy.slice)
            .context("copying device to device")?;
        Ok(copy)
    }

    /// Sets the buffer's first `len` bytes (at most all it holds) to `byte`.
    pub(crate) fn fill_bytes(&mut self, byte: u8, len: usize) -> Result<()> {
        self.backend
            .context
            .bind_to_thread()
            .context("binding the CUDA context")?;
        let stream = self.backend.queue();
        let len = len.min(self.slice.len());
        let (address, _sync) = self.slice.device_ptr(stream);
        // SAFETY: the range lies within this allocation, and the memset is ordered on its stream.
        unsafe { driver::memset_d8_async(address, byte, len, stream.cu_stream()) }.context("cuMemsetD8Async")
    }
}

/// An instantiated CUDA graph of one device's work, made by [`CudaBackend::capture_graph`] and
/// replayed by [`CudaBackend::launch_graph`].
pub struct CudaGraph {
    graph: cudarc::driver::CudaGraph,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaGraph")
    }
}
