//! One CUDA GPU opened for our kernels: the checks that turn a missing driver, a missing GPU or
//! too old an architecture into an error instead of a `cudarc` panic, and module loading.

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaStream};

use super::{KernelError, KernelSource, MIN_COMPUTE_CAPABILITY, arch_name, compile};

/// A GPU with its context and the stream our kernels run on.
pub struct CudaDevice {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (u32, u32),
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Fails, never panics, where there is no driver, no such GPU, or one
    /// older than [`MIN_COMPUTE_CAPABILITY`].
    pub fn open(ordinal: usize) -> Result<Self, KernelError> {
        // SAFETY: only probes whether libcuda can be opened; cudarc panics on first use otherwise.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::NoDriver);
        }
        cudarc::driver::result::init()?;
        let count = cudarc::driver::result::device::get_count()? as usize;
        if ordinal >= count {
            return Err(KernelError::NoDevice { ordinal, count });
        }
        let context = CudaContext::new(ordinal)?;
        let name = context.name()?;
        let (major, minor) = context.compute_capability()?;
        let compute_capability = (major as u32, minor as u32);
        if compute_capability < MIN_COMPUTE_CAPABILITY {
            return Err(KernelError::UnsupportedArchitecture {
                name,
                major: compute_capability.0,
                minor: compute_capability.1,
            });
        }
        // Our work runs on one stream of our own: CUDA graphs cannot be captured on the legacy
        // default stream. With one stream there is nothing for cudarc's per-buffer events to
        // order, and waits on events recorded outside a capture would break the capture.
        // SAFETY: every buffer of this context is used on `stream` only.
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream()?;
        Ok(Self {
            context,
            stream,
            name,
            compute_capability,
        })
    }

    /// The GPU's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its compute capability, e.g. (9, 0).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// Free device memory in bytes.
    pub fn free_memory(&self) -> Result<usize, KernelError> {
        Ok(self.context.mem_get_info()?.0)
    }

    /// The stream kernels are launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Compiles (or reads from `cache`) `kernel` for this GPU's architecture and loads it.
    pub fn load(&self, kernel: &KernelSource, cache: Option<&Path>) -> Result<Arc<CudaModule>, KernelError> {
        let (major, minor) = self.compute_capability;
        let ptx = compile(kernel, &arch_name(major, minor), cache)?;
        Ok(self.context.load_module(ptx)?)
    }
}
