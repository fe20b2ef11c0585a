//! A `distill-serve serve` process on loopback for the benches; killed on drop.

// The benches talk HTTP only; the launcher also reports the gRPC address.
#[allow(dead_code)]
#[path = "../../tests/common/launch.rs"]
mod launch;

use std::path::{Path, PathBuf};

use anyhow::Result;
use distill_serve::checkpoint::Family;
use distill_serve::export::{self, ExternalData, Precision};
use distill_serve::tiny::{ShapePreset, TinySpec, write_tiny};
use serde_json::Value;

/// Writes a model repository in `dir` with one model `bench`, version 1: a random student of
/// `shape` (seed 0), INT8. With `trainable`, its checkpoint stays in `1/checkpoint` (refresh
/// jobs fine-tune it). Returns the repository's folder.
// Each bench compiles this file; the encoders bench writes an encoder repository of its own.
#[allow(dead_code)]
pub fn student_repository(dir: &Path, shape: ShapePreset, trainable: bool) -> Result<PathBuf> {
    let repo = dir.join("models");
    let version = repo.join("bench/1");
    let checkpoint = if trainable {
        version.join("checkpoint")
    } else {
        dir.join("checkpoint")
    };
    let mut spec = TinySpec::new(Family::Qwen2, 0);
    spec.shape = shape;
    write_tiny(&spec, &checkpoint)?;
    export::export(&checkpoint, &version, Precision::DEFAULT_INT8, ExternalData::Auto)?;
    std::fs::write(repo.join("bench/model.toml"), "name = \"bench\"\n")?;
    Ok(repo)
}

/// Adds model `bench-gqa` to the repository [`student_repository`] wrote in `dir` (not
/// trainable): the same student exported with fused attention.
// Each bench compiles this file; only the serve bench compares attention graphs.
#[allow(dead_code)]
pub fn add_fused_export(dir: &Path) -> Result<()> {
    let repo = dir.join("models");
    export::export_with_attention(
        &dir.join("checkpoint"),
        &repo.join("bench-gqa/1"),
        Precision::DEFAULT_INT8,
        ExternalData::Auto,
        export::Attention::Gqa,
    )?;
    std::fs::write(repo.join("bench-gqa/model.toml"), "name = \"bench-gqa\"\n")?;
    Ok(())
}

/// A running server.
pub struct Server {
    _process: launch::Launched,
    /// `http://host:port` of its HTTP listener.
    pub base: String,
}

impl Server {
    /// Starts the bench's `distill-serve` binary with `args` (after `serve` and loopback
    /// addresses) and `RUST_LOG=rust_log`; `on_line` sees every log line.
    pub fn start(args: &[&str], rust_log: &str, on_line: impl Fn(&str) + Send + 'static) -> Result<Self> {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let binary = std::path::Path::new(env!("CARGO_BIN_EXE_distill-serve"));
        let process = launch::launch(binary, &args, &[("RUST_LOG", rust_log)], on_line).map_err(anyhow::Error::msg)?;
        Ok(Self {
            base: format!("http://{}", process.http),
            _process: process,
        })
    }

    /// An admin call with bearer `token` and `body` sent as is; the JSON answer, or an error
    /// naming the path and status.
    // Each bench compiles this file; only the refresh benches call admin routes.
    #[allow(dead_code)]
    pub async fn admin(&self, token: &str, method: reqwest::Method, path: &str, body: Option<String>) -> Result<Value> {
        let mut r = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.body(b);
        }
        let response = r.send().await?;
        let status = response.status();
        let v: Value = response.json().await?;
        if !status.is_success() {
            anyhow::bail!("{path}: {status}: {v}");
        }
        Ok(v)
    }

    /// The server's process id.
    // Each bench compiles this file; only the overload bench reads memory by pid.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self._process.child.id()
    }
}
