//! The `loadtest` binary against a real `distill-serve` on loopback, at small scale: its reports
//! must show no errors and counts that add up, over HTTP and gRPC, closed and open loop.
//!
//! `distill-serve` is found beside `loadtest` in the target folder: `cargo nextest run
//! --workspace` (the README's test command) builds both.

#[path = "../../tests/common/launch.rs"]
mod launch;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn loadtest() -> &'static str {
    env!("CARGO_BIN_EXE_loadtest")
}

fn server_binary() -> PathBuf {
    let path = Path::new(loadtest()).with_file_name(format!("distill-serve{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the workspace (`cargo nextest run --workspace` does)",
        path.display()
    );
    path
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A server over a repository with one tiny INT8 student named `tiny`; killed on drop.
struct Server {
    _process: launch::Launched,
    http: String,
    grpc: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint");
        let version = dir.path().join("models/tiny/1");
        let bin = server_binary();
        run_ok(
            Command::new(&bin)
                .args(["tiny", "--family", "qwen2", "--out"])
                .arg(&checkpoint),
        );
        run_ok(
            Command::new(&bin)
                .args(["export", "--int8", "--checkpoint"])
                .arg(&checkpoint)
                .arg("--out")
                .arg(&version),
        );
        std::fs::write(dir.path().join("models/tiny/model.toml"), "name = \"tiny\"\n").unwrap();
        let repo = dir.path().join("models");
        let args = ["--model-repository".as_ref(), repo.as_os_str()];
        let process = launch::launch(&bin, &args, &[("RUST_LOG", "info")], |_| {}).unwrap();
        Self {
            http: format!("http://{}", process.http),
            grpc: format!("http://{}", process.grpc),
            _process: process,
            _dir: dir,
        }
    }
}

fn report(args: &[&str]) -> Value {
    let out = tempfile::tempdir().unwrap();
    let stdout = run_ok(Command::new(loadtest()).args(args).arg("--out").arg(out.path()));
    assert!(stdout.contains("| load | sent | ok |"), "no Markdown table:\n{stdout}");
    let svg = std::fs::read_to_string(out.path().join("report.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("throughput"), "bad plot");
    assert_eq!(
        std::fs::read_to_string(out.path().join("report.md")).unwrap().trim(),
        stdout.trim()
    );
    serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap()).unwrap()
}

/// Every level sent `requests` requests, all answered, and the counts add up.
fn check_levels(report: &Value, requests: u64, streamed: bool) {
    let levels = report["levels"].as_array().unwrap();
    assert!(!levels.is_empty());
    for level in levels {
        let sent = level["sent"].as_u64().unwrap();
        let ok = level["ok"].as_u64().unwrap();
        let failed: u64 = level["errors"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(sent, requests, "{level}");
        assert_eq!((ok, failed), (sent, 0), "{level}");
        assert_eq!(level["latency_ms"]["count"].as_u64(), Some(ok), "{level}");
        assert!(level["completion_tokens"].as_u64().unwrap() >= ok, "{level}");
        assert!(level["prompt_tokens"].as_u64().unwrap() >= ok, "{level}");
        let p = &level["latency_ms"];
        assert!(p["p50"].as_f64() <= p["p99"].as_f64() && p["p99"].as_f64() <= p["max"].as_f64());
        assert_eq!(level["first_token_ms"].is_object(), streamed, "{level}");
    }
}

#[test]
fn closed_loop_over_http_reports_every_request_and_the_server_batches() {
    let server = Server::start();
    let r = report(&[
        "run",
        "--url",
        &server.http,
        "--model",
        "tiny",
        "--concurrency",
        "1,6",
        "--requests",
        "12",
        "--max-tokens",
        "8",
    ]);
    check_levels(&r, 12, false);
    let levels = r["levels"].as_array().unwrap();
    assert_eq!(
        levels[1]["load"],
        serde_json::json!({"mode": "closed", "concurrency": 6})
    );
    let stats = &levels[1]["server"];
    assert!(stats["prefill_batches"].as_u64().unwrap() >= 1, "{stats}");
    assert!(
        stats["mean_decode_batch"].as_f64().unwrap() > 1.0,
        "six clients never batched: {stats}"
    );
}

#[test]
fn open_loop_streamed_over_grpc_and_chat_report_first_tokens() {
    let server = Server::start();
    let r = report(&[
        "run",
        "--url",
        &server.grpc,
        "--protocol",
        "grpc",
        "--stream",
        "--model",
        "tiny",
        "--rate",
        "40",
        "--requests",
        "10",
        "--max-tokens",
        "8",
    ]);
    check_levels(&r, 10, true);
    let level = &r["levels"][0];
    assert!(
        level["service_ms"].is_object(),
        "open loop reports uncorrected latency too"
    );
    assert!(level["latency_ms"]["max"].as_f64() >= level["service_ms"]["max"].as_f64());
    let r = report(&[
        "run",
        "--url",
        &server.http,
        "--protocol",
        "chat",
        "--stream",
        "--model",
        "tiny",
        "--concurrency",
        "2",
        "--requests",
        "6",
        "--max-tokens",
        "8",
    ]);
    check_levels(&r, 6, true);
}

#[test]
fn the_10x_scenario_compares_a_baseline_with_ten_times_it() {
    let server = Server::start();
    let r = report(&[
        "10x",
        "--url",
        &server.http,
        "--model",
        "tiny",
        "--baseline",
        "1",
        "--requests",
        "20",
        "--max-tokens",
        "8",
    ]);
    check_levels(&r, 20, false);
    assert_eq!(r["levels"][1]["load"]["concurrency"], 10);
    let t = &r["ten_x"];
    assert_eq!(t["errors_at_10x"], 0);
    assert!(t["throughput_ratio"].as_f64().unwrap() > 0.0, "{t}");
}

#[test]
fn a_remote_target_is_refused_and_failures_are_counted() {
    let out = Command::new(loadtest())
        .args(["run", "--url", "http://192.0.2.1:8080", "--requests", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
    // Nothing listens on port 9 of loopback: every request fails, and is counted, not lost.
    let r = report(&[
        "run",
        "--url",
        "http://127.0.0.1:9",
        "--concurrency",
        "2",
        "--requests",
        "5",
        "--warmup",
        "0",
    ]);
    let level = &r["levels"][0];
    assert_eq!((level["sent"].as_u64(), level["ok"].as_u64()), (Some(5), Some(0)));
    assert_eq!(level["errors"]["connect"], 5, "{level}");
}
