//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! `ort` loads the library dynamically (`load-dynamic`): the setup script unpacks it from the
//! pinned PyPI `onnxruntime` wheel into a cache folder, and [`environment`] points `ort` at it.
//! ONNX Runtime allows one environment per process, even after the first is dropped, so it
//! lives in a `OnceLock`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use super::EngineError;

/// ONNX Runtime version the setup script installs.
pub const ORT_VERSION: &str = "1.32.0";

/// Version of the GPU build `scripts/setup.sh --gpu` installs.
pub const ORT_GPU_VERSION: &str = "1.31.1";

/// Where the setup script puts the library: `$XDG_CACHE_HOME` (or `~/.cache`) +
/// `distill-serve/onnxruntime-<version>/libonnxruntime.so.<version>`. A build with the `cuda`
/// feature takes the GPU build (`onnxruntime-gpu-<version>/`) when `setup.sh --gpu` installed it.
pub fn default_library_path() -> PathBuf {
    let cache = crate::paths::setup_cache_dir();
    let gpu = cache
        .join(format!("onnxruntime-gpu-{ORT_GPU_VERSION}"))
        .join(format!("libonnxruntime.so.{ORT_GPU_VERSION}"));
    if cfg!(feature = "cuda") && gpu.is_file() {
        return gpu;
    }
    cache
        .join(format!("onnxruntime-{ORT_VERSION}"))
        .join(format!("libonnxruntime.so.{ORT_VERSION}"))
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library from `library` (or
/// [`default_library_path`]) on first use. Later calls return the first result whatever path
/// they pass.
pub fn environment(library: Option<&Path>) -> Result<&'static Environment, EngineError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let path = library.map(Path::to_path_buf).unwrap_or_else(default_library_path);
        if !path.is_file() {
            return Err(format!(
                "ONNX Runtime library not found at {} (run scripts/setup.sh, or pass --ort-library)",
                path.display()
            ));
        }
        let builder = ort::init_from(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        builder
            .with_name("distill-serve")
            .build()
            .map_err(|e| format!("creating the ONNX Runtime environment: {e}"))
    });
    result.as_ref().map_err(|message| EngineError::Runtime(message.clone()))
}
