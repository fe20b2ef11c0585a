//! GPU execution providers, each failing loudly instead of silently falling back to the CPU,
//! and the CUDA libraries their provider needs: preloaded from the folder `scripts/setup.sh
//! --gpu` fills (NVIDIA's PyPI wheels), so no `LD_LIBRARY_PATH` is needed; libraries not there
//! are left to the system's loader, and one that is missing everywhere is named in the error.

use std::ffi::c_void;
use std::path::Path;
use std::sync::OnceLock;

use ort::session::builder::SessionBuilder;

use super::EngineError;

/// The CUDA and cuDNN libraries ONNX Runtime's CUDA provider loads, in load order
/// (dependencies first; the list `ort` keeps for its own preloading).
pub const CUDA_LIBRARIES: &[&str] = &[
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libnvrtc.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
    "libcudnn_graph.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_adv.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
];

pub use crate::paths::{cuda_libraries, default_cuda_libraries, set_cuda_libraries};

static PRELOADED: OnceLock<Result<Vec<&'static str>, String>> = OnceLock::new();

/// Loads, once per process, each CUDA library the folder holds; returns those it loaded.
pub fn preload_cuda_libraries() -> Result<&'static [&'static str], EngineError> {
    let loaded = PRELOADED.get_or_init(|| preload_from(&cuda_libraries()));
    match loaded {
        Ok(names) => Ok(names),
        Err(message) => Err(EngineError::Runtime(message.clone())),
    }
}

/// Loads every library of [`CUDA_LIBRARIES`] that `folder` holds, in order.
fn preload_from(folder: &Path) -> Result<Vec<&'static str>, String> {
    let mut loaded = Vec::new();
    for &name in CUDA_LIBRARIES {
        let path = folder.join(name);
        if !path.is_file() {
            continue;
        }
        // SAFETY: loading a library runs its initialisers; these are NVIDIA's CUDA libraries,
        // which ONNX Runtime's CUDA provider would load itself. The handle is kept for good
        // (the loader then finds the library by its soname when the provider asks for it).
        let library = unsafe { libloading::Library::new(&path) }
            .map_err(|e| format!("loading the CUDA library {}: {e}", path.display()))?;
        std::mem::forget(library);
        loaded.push(name);
    }
    Ok(loaded)
}

/// The CUDA runtime's `cudaMemcpy(dst, src, bytes, kind)`.
type CudaMemcpy = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i32) -> i32;

static CUDA_MEMCPY: OnceLock<Result<CudaMemcpy, String>> = OnceLock::new();

/// `cudaMemcpyDefault`: the runtime tells host and device pointers apart (unified addressing).
const MEMCPY_DEFAULT: i32 = 4;

/// Copies `bytes` from `src` to `dst`, either or both in a GPU's memory, with the CUDA runtime
/// (loaded on first use): how a slot cache in GPU memory moves its rows.
///
/// # Safety
/// `src` and `dst` must each address `bytes` valid bytes, in host or GPU memory.
pub unsafe fn copy_memory(dst: *mut c_void, src: *const c_void, bytes: usize) -> Result<(), EngineError> {
    let memcpy = CUDA_MEMCPY.get_or_init(|| {
        // The runtime from setup's folder when there is one, else the system's.
        let _ = preload_cuda_libraries();
        // SAFETY: NVIDIA's CUDA runtime, which ONNX Runtime's CUDA provider loads anyway; the
        // handle is kept for good, so the function pointer stays valid.
        let library = unsafe { libloading::Library::new("libcudart.so.13") }
            .map_err(|e| format!("loading the CUDA runtime (libcudart.so.13): {e}"))?;
        // SAFETY: `cudaMemcpy` has this signature in every CUDA runtime.
        let symbol = unsafe { library.get::<CudaMemcpy>(b"cudaMemcpy\0") }
            .map(|f| *f)
            .map_err(|e| format!("libcudart.so.13 has no cudaMemcpy: {e}"))?;
        std::mem::forget(library);
        Ok(symbol)
    });
    let memcpy = memcpy.as_ref().map_err(|e| EngineError::Runtime(e.clone()))?;
    // SAFETY: the caller vouches for both ranges.
    match unsafe { memcpy(dst, src, bytes, MEMCPY_DEFAULT) } {
        0 => Ok(()),
        status => Err(EngineError::Runtime(format!(
            "cudaMemcpy failed with CUDA error {status}"
        ))),
    }
}

/// The CUDA provider on GPU `device`, after preloading its libraries.
#[cfg(feature = "cuda")]
pub fn cuda(builder: SessionBuilder, device: u32) -> Result<SessionBuilder, EngineError> {
    preload_cuda_libraries()?;
    Ok(builder.with_execution_providers([cuda_on(device)?.build().error_on_failure()])?)
}

/// CUDA's provider settings for GPU `device`.
#[cfg(feature = "cuda")]
fn cuda_on(device: u32) -> Result<ort::ep::CUDA, EngineError> {
    Ok(ort::ep::CUDA::default().with_device_id(device_index(device)?))
}

/// `device` as the providers take it.
#[cfg(feature = "cuda")]
fn device_index(device: u32) -> Result<i32, EngineError> {
    i32::try_from(device).map_err(|_| EngineError::Input(format!("device_id {device} is out of range")))
}

/// Refused: this build has no CUDA provider.
#[cfg(not(feature = "cuda"))]
pub fn cuda(_: SessionBuilder, _: u32) -> Result<SessionBuilder, EngineError> {
    Err(EngineError::Unavailable(
        "execution provider `cuda` needs a build with `--features cuda`".into(),
    ))
}

/// The TensorRT provider on GPU `device`, with CUDA for what TensorRT does not take.
#[cfg(feature = "tensorrt")]
pub fn tensorrt(builder: SessionBuilder, device: u32) -> Result<SessionBuilder, EngineError> {
    preload_cuda_libraries()?;
    Ok(builder.with_execution_providers([
        ort::ep::TensorRT::default()
            .with_device_id(device_index(device)?)
            .build()
            .error_on_failure(),
        cuda_on(device)?.build(),
    ])?)
}

/// Refused: this build has no TensorRT provider.
#[cfg(not(feature = "tensorrt"))]
pub fn tensorrt(_: SessionBuilder, _: u32) -> Result<SessionBuilder, EngineError> {
    Err(EngineError::Unavailable(
        "execution provider `tensorrt` needs a build with `--features tensorrt`".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU the copy is an error that names CUDA, never a crash; with one, it copies.
    #[test]
    fn a_memory_copy_copies_or_names_what_is_missing() {
        let src = [1u8, 2, 3, 4];
        let mut dst = [0u8; 4];
        // SAFETY: two host arrays of four bytes.
        match unsafe { copy_memory(dst.as_mut_ptr().cast(), src.as_ptr().cast(), 4) } {
            Ok(()) => assert_eq!(dst, src),
            Err(e) => assert!(e.to_string().contains("CUDA") || e.to_string().contains("cuda"), "{e}"),
        }
    }

    #[test]
    fn only_the_libraries_the_folder_holds_are_loaded_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(preload_from(dir.path()).unwrap(), Vec::<&str>::new());
        std::fs::write(dir.path().join("libcurand.so.10"), b"not an ELF file").unwrap();
        let err = preload_from(dir.path()).unwrap_err();
        assert!(err.contains("libcurand.so.10"), "{err}");
    }
}
