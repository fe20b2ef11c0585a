//! A `distill-serve serve` process on loopback for the benches; killed on drop.

// The benches talk HTTP only; the launcher also reports the gRPC address.
#[allow(dead_code)]
#[path = "../../tests/common/launch.rs"]
mod launch;

use anyhow::Result;

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

    /// The server's process id.
    // Each bench compiles this file; only the overload bench reads memory by pid.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self._process.child.id()
    }
}
