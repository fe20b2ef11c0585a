//! Compiling `kernels/` with NVRTC, found in the CUDA library folder setup fills or by the
//! system's loader, and the on-disk PTX cache.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::{KernelError, KernelSource};

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

/// Where compiled PTX is kept: `DISTILL_SERVE_PTX_CACHE`, else `<setup cache>/ptx`.
pub fn default_ptx_cache() -> PathBuf {
    std::env::var_os("DISTILL_SERVE_PTX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::paths::setup_cache_dir().join("ptx"))
}

/// Compiles `kernel` to PTX for `arch` (e.g. `sm_75`), or reads it from `cache` where the same
/// source, architecture and NVRTC version were compiled before. A cache that cannot be written
/// costs a recompilation next time, nothing else.
pub fn compile(kernel: &KernelSource, arch: &str, cache: Option<&Path>) -> Result<Ptx, KernelError> {
    let (major, minor) = nvrtc_version()?;
    let options = compile_options(kernel, arch);
    let key = crate::hash::fnv1a(
        [
            kernel.source,
            arch,
            &format!("nvrtc {major}.{minor}"),
            &options.join(" "),
        ]
        .join("\0")
        .bytes(),
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

/// NVRTC flags: the architecture, C++17, and the kernel's own.
fn compile_options(kernel: &KernelSource, arch: &str) -> Vec<String> {
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    options.extend(kernel.options.iter().map(|o| o.to_string()));
    options
}
