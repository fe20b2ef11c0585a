//! A `distill-serve serve` process on loopback for the benches; killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

/// A running server.
pub struct Server {
    child: Child,
    /// `http://host:port` of its HTTP listener.
    pub base: String,
}

impl Server {
    /// Starts the bench's `distill-serve` binary with `args` (after `serve` and loopback
    /// addresses) and `RUST_LOG=rust_log`; `on_line` sees every other log line.
    pub fn start(args: &[&str], rust_log: &str, on_line: impl Fn(&str) + Send + 'static) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_distill-serve"))
            .args(["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining the log, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match line.split("HTTP listening addr=").nth(1) {
                    Some(addr) => {
                        let _ = tx.send(addr.trim().to_string());
                    }
                    None => on_line(&line),
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .context("server did not start")?;
        Ok(Self {
            child,
            base: format!("http://{addr}"),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
