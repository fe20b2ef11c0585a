//! Our own CUDA kernels: CUDA C sources from `kernels/`, embedded in the binary and compiled at
//! run time by NVRTC through `cudarc` (feature `cuda-native`; dynamic loading: building needs
//! no CUDA toolkit, and a machine without CUDA runs everything else). PTX is compiled once per
//! source, architecture and NVRTC version, and kept on disk. The sampling kernel's CPU
//! reference ([`reference`]) runs the same algorithm and is always built: the native engine's
//! CPU backend samples with it, and the kernels' logic is tested where no GPU is.

#[cfg(feature = "cuda-native")]
pub mod device;
#[cfg(feature = "cuda-native")]
mod nvrtc;
pub mod philox;
pub mod reference;
pub mod sampling;

#[cfg(feature = "cuda-native")]
pub use nvrtc::{compile, default_ptx_cache, nvrtc_version};

/// One kernel source file of `kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file's stem, e.g. `sampling`.
    pub name: &'static str,
    /// The CUDA C text.
    pub source: &'static str,
    /// The `extern "C"` entry points it defines.
    pub entry_points: &'static [&'static str],
    /// Its NVRTC flags beyond the architecture.
    pub options: &'static [&'static str],
}

/// Every kernel source the binary carries.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "sampling",
        source: include_str!("../../kernels/sampling.cu"),
        entry_points: &["sample_rows"],
        // No fused multiply-add: the device rounds each operation as the CPU reference does, so
        // the same seed picks the same token on both.
        options: &["--fmad=false"],
    },
    KernelSource {
        name: "decoder",
        source: include_str!("../../kernels/decoder.cu"),
        entry_points: &[
            "embed",
            "rms_norm",
            "linear_f16",
            "linear_bf16",
            "linear_i8",
            "rope",
            "kv_append",
            "attention",
            "silu_mul",
            "add_in_place",
            "gather_rows",
        ],
        options: &[],
    },
];

/// The embedded source named `name` (the stem of its file in `kernels/`).
pub fn source(name: &str) -> Result<&'static KernelSource, KernelError> {
    SOURCES
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| KernelError::Invalid(format!("kernels/{name}.cu is not embedded")))
}

/// The oldest GPU architecture the kernels target (T4, compute capability 7.5).
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (7, 5);

/// What can go wrong finding CUDA, compiling kernels or running them.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// NVRTC cannot be loaded.
    #[error(
        "the NVRTC library (libnvrtc.so) was not found in {folder} or by the system's loader: run `scripts/setup.sh`, or install the CUDA toolkit"
    )]
    NvrtcMissing { folder: String },
    /// A kernel source did not compile.
    #[error("NVRTC could not compile kernels/{kernel}.cu for {arch}: {log}")]
    Compile { kernel: String, arch: String, log: String },
    /// No CUDA driver library.
    #[error("no CUDA driver (libcuda.so) on this machine")]
    NoDriver,
    /// The driver has no such GPU.
    #[error("no CUDA GPU with ordinal {ordinal} (the driver sees {count})")]
    NoDevice { ordinal: usize, count: usize },
    /// The GPU is older than the kernels' oldest target.
    #[error("GPU {name} has compute capability {major}.{minor}; the kernels need 7.5 (T4) or newer")]
    UnsupportedArchitecture { name: String, major: u32, minor: u32 },
    /// The driver failed a call (out of memory, a failed launch, ...).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A call with arguments that do not fit together.
    #[error("{0}")]
    Invalid(String),
}

#[cfg(feature = "cuda-native")]
impl From<cudarc::driver::DriverError> for KernelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(e.to_string())
    }
}

/// The NVRTC architecture name of a compute capability, e.g. `sm_75`.
pub fn arch_name(major: u32, minor: u32) -> String {
    format!("sm_{major}{minor}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_in_its_source() {
        for kernel in SOURCES {
            for entry in kernel.entry_points {
                assert!(
                    kernel
                        .source
                        .contains(&format!("void __launch_bounds__(THREADS) {entry}("))
                        || kernel.source.contains(&format!("void {entry}(")),
                    "{} lacks {entry}",
                    kernel.name
                );
            }
        }
    }
}
