//! `distill-serve doctor`: what this machine and build can run — the ONNX Runtime library, the
//! execution providers compiled in, the NVIDIA driver and its GPUs, the CUDA libraries,
//! TensorRT, our own kernels (NVRTC, and the sampling kernel on GPU 0) — and whether each provider the configuration asks for loads and runs a graph. The
//! exit status says whether the configured providers can run; a machine without a GPU is a
//! finding, not a failure, unless a GPU provider is configured.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::engine::{self, ExecutionProvider};
use crate::repository::{self, ModelSettings};

/// What `doctor` checks.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DoctorArgs {
    /// The ONNX Runtime library [default: the one scripts/setup.sh installs; in a build with
    /// the `cuda` feature, its GPU build when `setup.sh --gpu` installed it].
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
    /// Folder of CUDA libraries to preload [default: the one `setup.sh --gpu` fills].
    #[arg(long, env = "DISTILL_SERVE_CUDA_LIBRARIES")]
    pub cuda_libraries: Option<PathBuf>,
    /// The server's execution provider, for models whose `model.toml` names none
    /// [default: cpu].
    #[arg(long, env = "DISTILL_SERVE_EXECUTION_PROVIDER", value_enum)]
    pub execution_provider: Option<ExecutionProvider>,
    /// A model repository: the provider each of its models asks for is checked too.
    #[arg(long, env = "DISTILL_SERVE_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
}

/// The findings, and the configured providers that cannot run.
#[derive(Debug, Default)]
pub struct Report {
    /// One finding a line, for people.
    pub lines: Vec<String>,
    /// Why a configured provider cannot run; empty when all can.
    pub failures: Vec<String>,
}

/// One NVIDIA GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub name: String,
    pub memory_mib: u64,
    pub compute_capability: String,
    pub driver: String,
}

/// Runs every check.
pub fn check(args: &DoctorArgs) -> Report {
    let mut report = Report::default();
    let configured = configured_providers(args, &mut report);

    let library = args.ort_library.clone().unwrap_or_else(engine::default_library_path);
    let runtime = engine::environment(Some(&library));
    match &runtime {
        Ok(_) => {
            let version =
                ort::util::probe(&library).map_or_else(|| "of unknown version".into(), |minor| format!("1.{minor}"));
            report
                .lines
                .push(format!("ONNX Runtime {version}: {}", library.display()));
        }
        Err(e) => report.lines.push(format!("ONNX Runtime: cannot load: {e}")),
    }
    let built: Vec<&str> = [
        Some("cpu"),
        cfg!(feature = "cuda").then_some("cuda"),
        cfg!(feature = "tensorrt").then_some("tensorrt"),
        cfg!(feature = "cuda-native").then_some("native-cuda"),
    ]
    .into_iter()
    .flatten()
    .collect();
    report
        .lines
        .push(format!("execution providers in this build: {}", built.join(", ")));

    match nvidia_smi() {
        Ok((cuda, gpus)) => {
            report.lines.push(format!("NVIDIA driver: CUDA {cuda}"));
            for (i, gpu) in gpus.iter().enumerate() {
                report.lines.push(format!(
                    "GPU {i}: {}, {} MiB, compute capability {}, driver {}",
                    gpu.name, gpu.memory_mib, gpu.compute_capability, gpu.driver
                ));
            }
        }
        Err(why) => report.lines.push(format!("GPU: none ({why})")),
    }

    let folder = args
        .cuda_libraries
        .clone()
        .unwrap_or_else(engine::gpu::default_cuda_libraries);
    engine::gpu::set_cuda_libraries(folder.clone());
    let system = system_libraries();
    let (mut in_folder, mut in_system, mut missing) = (0, 0, Vec::new());
    for name in engine::gpu::CUDA_LIBRARIES {
        if folder.join(name).is_file() {
            in_folder += 1;
        } else if system.contains_key(*name) {
            in_system += 1;
        } else {
            missing.push(*name);
        }
    }
    report.lines.push(format!(
        "CUDA libraries: {in_folder} in {}, {in_system} from the system, {} missing{}",
        folder.display(),
        missing.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(" ({})", missing.join(", "))
        }
    ));
    report.lines.push(match tensorrt_version() {
        Ok(version) => format!("TensorRT: {version}"),
        Err(why) => format!("TensorRT: not found ({why})"),
    });
    #[cfg(feature = "cuda-native")]
    report.lines.push(native_kernels());

    let probe = std::env::temp_dir().join(format!("distill-serve-probe-{}.onnx", std::process::id()));
    let written = crate::export::write_probe_model(&probe);
    for provider in [
        ExecutionProvider::Cpu,
        ExecutionProvider::Cuda,
        ExecutionProvider::Tensorrt,
        ExecutionProvider::NativeCuda,
        ExecutionProvider::NativeCpu,
    ] {
        let name = provider_name(provider);
        let wanted_by = configured.get(&name);
        if !built.contains(&name) && wanted_by.is_none() {
            continue;
        }
        let outcome = match (&runtime, &written) {
            _ if provider.is_native() => native_probe(provider),
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(format!("writing the probe graph: {e:#}")),
            (Ok(_), Ok(())) => engine::run_probe(&probe, provider).map_err(|e| e.to_string()),
        };
        let users = wanted_by.map_or(String::new(), |who| format!(" (configured for {})", who.join(", ")));
        match outcome {
            Ok(()) => report.lines.push(format!("provider {name}: runs{users}")),
            Err(e) => {
                report.lines.push(format!("provider {name}: cannot run{users}: {e}"));
                if wanted_by.is_some() {
                    report.failures.push(format!("{name}{users}: {e}"));
                }
            }
        }
    }
    let _ = std::fs::remove_file(&probe);
    report
}

/// Whether the native engine can run on `provider`: the CPU reference always; CUDA where the
/// decoder kernels compile and load on GPU 0.
fn native_probe(provider: ExecutionProvider) -> Result<(), String> {
    if provider == ExecutionProvider::NativeCpu {
        return Ok(());
    }
    #[cfg(feature = "cuda-native")]
    {
        let device = crate::kernels::device::CudaDevice::open(0).map_err(|e| e.to_string())?;
        crate::engine::cuda::device::CudaBackend::new(device, Some(&crate::kernels::default_ptx_cache()))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "cuda-native"))]
    Err("this build has no native CUDA engine (feature cuda-native)".into())
}

/// Whether our own kernels (kernels/) compile and load: NVRTC's version, then the sampling
/// kernel on GPU 0 where there is one.
#[cfg(feature = "cuda-native")]
fn native_kernels() -> String {
    use crate::kernels::{device::CudaDevice, nvrtc_version, sampling::DeviceSampler};
    let nvrtc = match nvrtc_version() {
        Ok((major, minor)) => format!("NVRTC {major}.{minor}"),
        Err(e) => return format!("native CUDA kernels: cannot compile: {e}"),
    };
    let gpu = CudaDevice::open(0).and_then(|device| {
        DeviceSampler::new(&device, Some(&crate::kernels::default_ptx_cache()))?;
        Ok(format!(
            "sampling kernel loads on {} (compute capability {}.{})",
            device.name(),
            device.compute_capability().0,
            device.compute_capability().1
        ))
    });
    match gpu {
        Ok(loaded) => format!("native CUDA kernels: {nvrtc}; {loaded}"),
        Err(e) => format!("native CUDA kernels: {nvrtc}; not run: {e}"),
    }
}

/// The providers the configuration asks for, each with who asks (the server default, models).
fn configured_providers(args: &DoctorArgs, report: &mut Report) -> BTreeMap<&'static str, Vec<String>> {
    let default = args.execution_provider.unwrap_or_default();
    let mut wanted: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    wanted
        .entry(provider_name(default))
        .or_default()
        .push("the server default".into());
    let Some(root) = &args.model_repository else {
        return wanted;
    };
    let models = match repository::models_in(root) {
        Ok(models) => models,
        Err(e) => {
            report.failures.push(e.to_string());
            return wanted;
        }
    };
    for (name, folder) in models {
        match ModelSettings::read(&folder) {
            Ok(settings) => {
                let provider = settings.limits.execution_provider.unwrap_or(default);
                wanted
                    .entry(provider_name(provider))
                    .or_default()
                    .push(format!("model {name}"));
            }
            Err(e) => report.failures.push(format!("model {name}: {e}")),
        }
    }
    wanted
}

fn provider_name(provider: ExecutionProvider) -> &'static str {
    match provider {
        ExecutionProvider::Cpu => "cpu",
        ExecutionProvider::Cuda => "cuda",
        ExecutionProvider::Tensorrt => "tensorrt",
        ExecutionProvider::NativeCuda => "native-cuda",
        ExecutionProvider::NativeCpu => "native-cpu",
    }
}

/// The CUDA version and GPUs the NVIDIA driver reports, through `nvidia-smi` (which the driver
/// installs, and the NVIDIA container toolkit mounts with the `utility` capability).
fn nvidia_smi() -> Result<(String, Vec<Gpu>), String> {
    let run = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("nvidia-smi")
            .args(args)
            .output()
            .map_err(|e| format!("no NVIDIA driver: nvidia-smi: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nvidia-smi failed: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let summary = run(&[])?;
    let query = run(&[
        "--query-gpu=name,memory.total,compute_cap,driver_version",
        "--format=csv,noheader,nounits",
    ])?;
    let gpus = parse_gpus(&query)?;
    if gpus.is_empty() {
        return Err("the NVIDIA driver sees no GPU".into());
    }
    Ok((
        parse_cuda_version(&summary).unwrap_or_else(|| "version unknown".into()),
        gpus,
    ))
}

/// The `CUDA Version: X.Y` of `nvidia-smi`'s summary.
fn parse_cuda_version(summary: &str) -> Option<String> {
    let rest = &summary[summary.find("CUDA Version:")? + "CUDA Version:".len()..];
    rest.split_whitespace().next().map(str::to_string)
}

/// `nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader,nounits`.
fn parse_gpus(csv: &str) -> Result<Vec<Gpu>, String> {
    csv.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [name, memory, capability, driver] = fields[..] else {
                return Err(format!("unexpected nvidia-smi line {line:?}"));
            };
            Ok(Gpu {
                name: name.to_string(),
                memory_mib: memory
                    .parse()
                    .map_err(|_| format!("unexpected memory in nvidia-smi line {line:?}"))?,
                compute_capability: capability.to_string(),
                driver: driver.to_string(),
            })
        })
        .collect()
}

/// Libraries the system's loader knows (`ldconfig -p`), by file name.
fn system_libraries() -> BTreeMap<String, PathBuf> {
    let Ok(out) = Command::new("/sbin/ldconfig").arg("-p").output() else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (name, path) = line.trim().split_once(" => ")?;
            let name = name.split_whitespace().next()?;
            Some((name.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// TensorRT's version, from `getInferLibVersion` of the `libnvinfer.so.10` the loader finds.
fn tensorrt_version() -> Result<String, String> {
    let name = "libnvinfer.so.10";
    // SAFETY: loads TensorRT's library (its initialisers run, as they would when the TensorRT
    // provider loads it) and calls `int32_t getInferLibVersion(void)`, its C entry point that
    // takes nothing and only returns the version number.
    let version = unsafe {
        let library = libloading::Library::new(name).map_err(|e| format!("{name}: {e}"))?;
        let get: libloading::Symbol<unsafe extern "C" fn() -> i32> =
            library.get(b"getInferLibVersion").map_err(|e| format!("{name}: {e}"))?;
        get()
    };
    Ok(tensorrt_version_string(version))
}

/// TensorRT 10 numbers its versions major·10000 + minor·100 + patch.
fn tensorrt_version_string(version: i32) -> String {
    format!("{}.{}.{}", version / 10_000, version / 100 % 100, version % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_output_is_read() {
        let summary = "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: 13.0     |";
        assert_eq!(parse_cuda_version(summary).as_deref(), Some("13.0"));
        let gpus = parse_gpus("NVIDIA H200, 143771, 9.0, 580.95.05\nTesla T4, 15360, 7.5, 580.95.05\n").unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            gpus[1],
            Gpu {
                name: "Tesla T4".into(),
                memory_mib: 15360,
                compute_capability: "7.5".into(),
                driver: "580.95.05".into()
            }
        );
        assert!(parse_gpus("garbage").is_err());
    }

    #[test]
    fn tensorrt_version_numbers_are_read() {
        assert_eq!(tensorrt_version_string(101303), "10.13.3");
    }
}
