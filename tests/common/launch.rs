//! Starting a `distill-serve serve` process on loopback ports chosen by the system, for the
//! integration tests, the benches and the loadtest crate's tests (they include this file by
//! path). The server says where it listens through `--ready-file`; its log is drained so it
//! never blocks on a full pipe. Needs only `std` and `serde_json`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(90);

/// A started server process; killed on drop.
pub struct Launched {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh path for one server's ready file, in the system's temporary folder.
fn ready_path() -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("distill-serve-ready-{}-{n}.json", std::process::id()))
}

/// The two addresses of a ready file, once it is complete.
fn read_ready(path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let addr = |key: &str| json.get(key)?.as_str()?.parse().ok();
    Some((addr("http")?, addr("grpc")?))
}

/// Starts `binary serve` on loopback port 0 with `args` and `env`, and waits until it listens;
/// `on_line` sees every log line. Fails with the log's tail when the process exits first.
pub fn launch(
    binary: &Path,
    args: &[&OsStr],
    env: &[(&str, &str)],
    on_line: impl Fn(&str) + Send + 'static,
) -> Result<Launched, String> {
    let ready = ready_path();
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .args(args)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tail_tx, tail_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            on_line(&line);
            let _ = tail_tx.send(line);
        }
    });
    let started = Instant::now();
    let mut tail = Vec::new();
    loop {
        tail.extend(tail_rx.try_iter());
        if let Some((http, grpc)) = read_ready(&ready) {
            let _ = std::fs::remove_file(&ready);
            return Ok(Launched { child, http, grpc });
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || started.elapsed() > START_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            tail.extend(tail_rx.try_iter());
            let last: Vec<String> = tail.iter().rev().take(20).rev().cloned().collect();
            let why = match exited {
                Some(status) => format!("exited with {status}"),
                None => format!("did not listen within {START_LIMIT:?}"),
            };
            return Err(format!("the server {why}; its log ends:\n{}", last.join("\n")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
