//! Where the project keeps what it downloads; a leaf module every other one may use.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Where `scripts/setup.sh` installs what the project downloads (the ONNX Runtime library, the
/// ICD-10-CM release): `${XDG_CACHE_HOME:-~/.cache}/distill-serve`.
pub fn setup_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("distill-serve")
}

/// Where `scripts/setup.sh` unpacks the CUDA libraries (NVRTC always, the rest with `--gpu`).
pub fn default_cuda_libraries() -> PathBuf {
    setup_cache_dir().join("cuda-13.0")
}

static CUDA_FOLDER: OnceLock<PathBuf> = OnceLock::new();

/// Takes the CUDA libraries from `folder` instead of [`default_cuda_libraries`]; only the first
/// call before the first GPU session counts.
pub fn set_cuda_libraries(folder: PathBuf) {
    let _ = CUDA_FOLDER.set(folder);
}

/// The CUDA library folder in use.
pub fn cuda_libraries() -> PathBuf {
    CUDA_FOLDER.get().cloned().unwrap_or_else(default_cuda_libraries)
}
