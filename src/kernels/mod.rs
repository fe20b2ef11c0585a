//! Our own CUDA kernels: CUDA C sources from `kernels/`, embedded in the binary and compiled at
//! run time by NVRTC through `cudarc` (dynamic loading: building needs no CUDA toolkit, and a
//! machine without CUDA runs everything else). PTX is compiled once per source, architecture
//! and NVRTC version, and kept on disk. Each kernel has a CPU reference ([`reference`]) that
//! runs the same algorithm, so the kernels' logic is tested where no GPU is.

pub mod device;
pub mod philox;
pub mod reference;
pub mod sampling;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

/// One kernel source file of `kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file's stem, e.g. `sampling`.
    pub name: &'static str,
    /// The CUDA C text.
    pub source: &'static str,
    /// The `extern "C"` entry points it defines.
    pub entry_points: &'static [&'static str],
}

/// Every kernel source the binary carries.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "sampling",
        source: include_str!("../../kernels/sampling.cu"),
        entry_points: &["sample_rows"],
    },
    KernelSource {
        name: "decoder",
        source: include_str!("../../kernels/decoder.cu"),
        entry_points: &[
            "embed",
            "rms_norm",
            "linear_f16",
            "linear_i8",
            "rope",
            "kv_append",
            "attention",
            "silu_mul",
            "add_in_place",
            "gather_rows",
        ],
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
    #[error(
        "the NVRTC library (libnvrtc.so) was not found in {folder} or by the system's loader: run `scripts/setup.sh`, or install the CUDA toolkit"
    )]
    NvrtcMissing { folder: String },
    #[error("NVRTC could not compile kernels/{kernel}.cu for {arch}: {log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("no CUDA driver (libcuda.so) on this machine")]
    NoDriver,
    #[error("no CUDA GPU with ordinal {ordinal} (the driver sees {count})")]
    NoDevice { ordinal: usize, count: usize },
    #[error("GPU {name} has compute capability {major}.{minor}; the kernels need 7.5 (T4) or newer")]
    UnsupportedArchitecture { name: String, major: u32, minor: u32 },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<cudarc::driver::DriverError> for KernelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(e.to_string())
    }
}

/// The NVRTC libraries `scripts/setup.sh` unpacks, loaded by path before `cudarc` looks them up by
/// name (the loader then finds them by soname); builtins first, as NVRTC opens it by name.
const NVRTC_LIBRARIES: &[&str] = &["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"];

static NVRTC: OnceLock<Result<(u32, u32), String>> = OnceLock::new();

/// Makes NVRTC loadable (from the CUDA library folder, else the system) and returns its version.
pub fn nvrtc_version() -> Result<(u32, u32), KernelError> {
    let folder = crate::paths::cuda_libraries();
    let loaded = NVRTC.get_or_init(|| load_nvrtc(&folder));
    loaded.clone().map_err(|_| KernelError::NvrtcMissing {
        folder: folder.display().to_string(),
    })
}

fn load_nvrtc(folder: &Path) -> Result<(u32, u32), String> {
    for name in NVRTC_LIBRARIES {
        let path = folder.join(name);
        if path.is_file() {
            // SAFETY: NVIDIA's NVRTC library, whose initialisers are what cudarc would run when it
            // loads the same file by name; the handle is kept for the process.
            match unsafe { libloading::Library::new(&path) } {
                Ok(library) => std::mem::forget(library),
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
    }
    // SAFETY: only probes whether the library can be opened (cudarc would panic otherwise).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("not found".into());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the out-pointers are valid.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion: {status:?}"));
    }
    Ok((major as u32, minor as u32))
}

/// The NVRTC architecture name of a compute capability, e.g. `sm_75`.
pub fn arch_name(major: u32, minor: u32) -> String {
    format!("sm_{major}{minor}")
}

/// Where compiled PTX is kept: `<setup cache>/ptx`.
pub fn default_ptx_cache() -> PathBuf {
    crate::paths::setup_cache_dir().join("ptx")
}

/// Compiles `kernel` to PTX for `arch` (e.g. `sm_75`), or reads it from `cache` where the same
/// source, architecture and NVRTC version were compiled before. A cache that cannot be written
/// costs a recompilation next time, nothing else.
pub fn compile(kernel: &KernelSource, arch: &str, cache: Option<&Path>) -> Result<Ptx, KernelError> {
    let (major, minor) = nvrtc_version()?;
    let options = compile_options(arch);
    let key = fnv1a(
        [
            kernel.source,
            arch,
            &format!("nvrtc {major}.{minor}"),
            &options.join(" "),
        ]
        .join("\0")
        .as_bytes(),
    );
    let cached = cache.map(|dir| dir.join(format!("{}-{arch}-{key:016x}.ptx", kernel.name)));
    if let Some(text) = cached.as_ref().and_then(|path| std::fs::read_to_string(path).ok()) {
        return Ok(Ptx::from_src(text));
    }
    let compiled = cudarc::nvrtc::compile_ptx_with_opts(
        kernel.source,
        CompileOptions {
            options,
            name: Some(format!("{}.cu", kernel.name)),
            ..Default::default()
        },
    )
    .map_err(|e| KernelError::Compile {
        kernel: kernel.name.to_string(),
        arch: arch.to_string(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })?;
    let text = compiled.to_src();
    if let Some(path) = cached {
        let written = path.parent().map(std::fs::create_dir_all).transpose().and_then(|_| {
            let partial = path.with_extension(format!("{}.partial", std::process::id()));
            std::fs::write(&partial, &text)?;
            std::fs::rename(&partial, &path)
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled PTX");
        }
    }
    Ok(Ptx::from_src(text))
}

/// NVRTC flags: no fused multiply-add, so the device rounds each operation as the CPU
/// reference does and the same seed picks the same token on both.
fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--std=c++17".into(),
    ]
}

/// 64-bit FNV-1a: a hash that stays the same across Rust releases, for cache file names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_are_stable_and_distinct() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a(b"sm_75"), fnv1a(b"sm_90"));
    }

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
