//! The serving benchmark: one server binary under the `loadtest` 10x scenario (closed loop at a
//! baseline concurrency C, then 10C) in three configurations, then the bare engine on the same
//! batch shapes. Bounded in count and time; every figure is a ratio within this one run.
//!
//! - batching: the defaults (length buckets, continuous decode batching);
//! - off: `--max-batch-size 1`;
//! - FIFO: one bucket (`--buckets <context>`): plain first-come batches padded to the longest;
//! - engine: `DecoderSession` alone, static batches of 10C prompts of the same mix sorted by
//!   length, greedy, every row decoding `max_tokens` steps: the ceiling the server's generated
//!   tokens/s is compared against (serving efficiency).
//!
//! ```sh
//! cargo bench --bench serve                                 # the mid (16M) student
//! cargo bench --bench serve -- --shape tiny --baseline 4
//! ```
//! Flags: `--shape tiny|mid`, `--baseline C` (default 2), `--requests N` per level (default
//! 200), `--max-tokens N` (default 32), `--lengths weight:median:sigma,...` (words).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use distill_serve::checkpoint::Family;
use distill_serve::engine::{DecoderSession, SessionOptions};
use distill_serve::export::{self, ExternalData, Precision};
use distill_serve::tiny::{ShapePreset, TinySpec, write_tiny};
use loadtest::{Bounds, Client, Load, Plan, Protocol, Report, Sampling, TenX, Workload, workload};
use ndarray::{Array2, s};

struct Options {
    shape: ShapePreset,
    baseline: usize,
    requests: u64,
    max_tokens: u32,
    lengths: String,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        shape: ShapePreset::Mid,
        baseline: 2,
        requests: 200,
        max_tokens: 32,
        // Words; the tiny BPE spends about 3 tokens per word, and the context is 512.
        lengths: "0.6:6:0.5,0.3:24:0.4,0.1:80:0.3".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--shape" => {
                o.shape = match value()?.as_str() {
                    "tiny" => ShapePreset::Tiny,
                    "mid" => ShapePreset::Mid,
                    other => bail!("unknown shape {other} (tiny, mid)"),
                }
            }
            "--baseline" => o.baseline = value()?.parse()?,
            "--requests" => o.requests = value()?.parse()?,
            "--max-tokens" => o.max_tokens = value()?.parse()?,
            "--lengths" => o.lengths = value()?,
            // `cargo bench` passes `--bench` to every bench target.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

const MAX_WORDS: usize = 130;

/// A `distill-serve serve` process on loopback; killed on drop.
struct Server(Child, String);

impl Server {
    fn start(repo: &Path, flags: &[&str]) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_distill-serve"))
            .args(["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(["--max-queue", "1024"])
            .args(flags)
            .arg("--model-repository")
            .arg(repo)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("HTTP listening addr=").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .context("server did not start")?;
        Ok(Self(child, format!("http://{addr}")))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn ten_x(o: &Options, workload: &Arc<Workload>, base: &str) -> Result<Report> {
    let sampling = Sampling {
        model: "bench".into(),
        max_tokens: o.max_tokens,
        temperature: 0.7,
        stream: false,
    };
    let plan = Plan {
        client: Client::new(Protocol::Completions, base, sampling.clone(), Duration::from_secs(120))?,
        target: base.to_string(),
        protocol: Protocol::Completions,
        sampling,
        workload: Arc::clone(workload),
        seed: 0,
        loads: vec![
            Load::Closed {
                concurrency: o.baseline,
            },
            Load::Closed {
                concurrency: o.baseline * 10,
            },
        ],
        bounds: Bounds {
            requests: o.requests,
            duration: Duration::from_secs(120),
            max_in_flight: 1024,
        },
        warmup: 4,
        metrics_url: Some(format!("{base}/metrics")),
    };
    let mut report = loadtest::execute(&plan).await;
    report.ten_x = Some(TenX::compare(o.baseline, &report.levels[0], &report.levels[1]));
    Ok(report)
}

/// Generated tokens/s of the bare engine, and its prefill padding: static batches of `batch`
/// prompts of similar length (left-padded to the longest), greedy, `max_tokens` steps each.
fn bare_engine(version: &Path, workload: &Workload, o: &Options, batch: usize) -> Result<(f64, f64)> {
    let tokenizer = tokenizers::Tokenizer::from_file(version.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    let mut session = DecoderSession::open(&version.join("model.onnx"), SessionOptions::default())?;
    let mut prompts: Vec<Vec<u32>> = (0..o.requests)
        .map(|i| {
            let encoding = tokenizer
                .encode(workload.prompt(0, i), false)
                .map_err(anyhow::Error::msg)?;
            Ok(encoding.get_ids().to_vec())
        })
        .collect::<Result<_>>()?;
    // Sorted by length, so batches are as little padded as batches can be.
    prompts.sort_by_key(Vec::len);
    let steps = o.max_tokens as usize;
    let (mut generated, mut padded, mut computed) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for group in prompts.chunks(batch) {
        let (n, longest) = (group.len(), group.iter().map(Vec::len).max().unwrap_or(1));
        let mut ids = Array2::<i64>::zeros((n, longest));
        let mut mask = Array2::<i64>::zeros((n, longest + steps));
        let mut positions = Array2::<i64>::zeros((n, longest));
        for (b, p) in group.iter().enumerate() {
            let pad = longest - p.len();
            for (i, &t) in p.iter().enumerate() {
                ids[[b, pad + i]] = i64::from(t);
                mask[[b, pad + i]] = 1;
                positions[[b, pad + i]] = i as i64;
            }
        }
        padded += n * longest - group.iter().map(Vec::len).sum::<usize>();
        computed += n * longest;
        let mut next: Vec<i64> = group.iter().map(|p| p.len() as i64).collect();
        let cache = session.empty_cache(n)?;
        let (mut logits, mut cache) =
            session.forward(&ids, &mask.slice(s![.., ..longest]).to_owned(), &positions, cache)?;
        for step in 0..steps {
            let last = logits.shape()[1] - 1;
            let tokens = Array2::from_shape_fn((n, 1), |(b, _)| {
                let row = logits.slice(s![b, last, ..]);
                row.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
                    .0 as i64
            });
            generated += n;
            if step + 1 == steps {
                break;
            }
            for b in 0..n {
                mask[[b, longest + step]] = 1;
            }
            let pos = Array2::from_shape_fn((n, 1), |(b, _)| next[b]);
            next.iter_mut().for_each(|p| *p += 1);
            let view = mask.slice(s![.., ..longest + step + 1]).to_owned();
            (logits, cache) = session.forward(&tokens, &view, &pos, cache)?;
        }
    }
    Ok((
        generated as f64 / started.elapsed().as_secs_f64(),
        padded as f64 / computed.max(1) as f64,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args()?;
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("checkpoint");
    let mut spec = TinySpec::new(Family::Qwen2, 0);
    spec.shape = o.shape;
    write_tiny(&spec, &ckpt)?;
    let repo = dir.path().join("models");
    let version = repo.join("bench/1");
    export::export(&ckpt, &version, Precision::DEFAULT_INT8, ExternalData::Auto)?;
    std::fs::write(repo.join("bench/model.toml"), "name = \"bench\"\n")?;
    let workload = Arc::new(Workload::Lognormal {
        modes: workload::parse_mix(&o.lengths)?,
        max_words: MAX_WORDS,
    });

    let configs: [(&str, &[&str]); 3] = [
        ("batching (buckets)", &[]),
        ("off (--max-batch-size 1)", &["--max-batch-size", "1"]),
        ("FIFO pad-to-longest (--buckets 512)", &["--buckets", "512"]),
    ];
    let mut rows = Vec::new();
    for (name, flags) in configs {
        let server = Server::start(&repo, flags)?;
        let report = ten_x(&o, &workload, &server.1).await?;
        println!("\n#### {name}\n\n{}", report.markdown());
        rows.push((name, report));
    }
    let (engine_tps, engine_padding) = bare_engine(&version, &workload, &o, o.baseline * 10)?;

    println!(
        "\n### serve: {:?} student, INT8, {} clients (10 x {}), max_tokens {}, {} requests per level\n",
        o.shape,
        o.baseline * 10,
        o.baseline,
        o.max_tokens,
        o.requests
    );
    println!(
        "| configuration | gen tok/s | x off | p50 ms | p99 ms | errors | mean decode batch | prefill padding | of engine |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let off_tps = rows[1].1.levels[1].tokens_per_s;
    for (name, report) in &rows {
        let l = &report.levels[1];
        let (p50, p99) = l.latency_ms.map_or((f64::NAN, f64::NAN), |p| (p.p50, p.p99));
        let (batch, padding) = l
            .server
            .map_or((f64::NAN, f64::NAN), |s| (s.mean_decode_batch, s.padding_ratio));
        println!(
            "| {name} | {:.0} | {:.2} | {p50:.1} | {p99:.1} | {} | {batch:.1} | {:.1}% | {:.0}% |",
            l.tokens_per_s,
            l.tokens_per_s / off_tps,
            l.failed(),
            padding * 100.0,
            100.0 * l.tokens_per_s / engine_tps
        );
    }
    println!(
        "| bare engine, static batches of {} | {engine_tps:.0} | {:.2} | - | - | - | {} | {:.1}% | 100% |",
        o.baseline * 10,
        engine_tps / off_tps,
        o.baseline * 10,
        engine_padding * 100.0
    );
    Ok(())
}
