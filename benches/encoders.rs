//! Encoder throughput: sequences per second of a BERT classifier (the mid shape: 512 hidden,
//! 4 layers, INT8) served over HTTP `/predict` on a lognormal length mix (median 40 tokens,
//! tail to 510), with the default length buckets against one bucket (every batch padded to its
//! longest input, as TEI pads), same binary; the padding share of each from the server's
//! metrics; a bare ONNX Runtime loop over the same inputs in batches of 32, in arrival order
//! (the baseline) and sorted by length (the least padding possible); and the Python pipeline
//! users write around ONNX Runtime (`benches/peers/ort_pipeline.py`: HF tokenizers + an
//! InferenceSession, batches of 32 padded to the longest, as optimum's ORTModel pipeline runs;
//! `onnxruntime` and `tokenizers` are installed by scripts/setup.sh).
//!
//! ```sh
//! cargo bench --bench encoders                  # 600 inputs, 32 clients
//! cargo bench --bench encoders -- --inputs 300 --clients 16
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use distill_serve::checkpoint::Family;
use distill_serve::engine::{EncoderSession, SessionOptions};
use distill_serve::export::{self, ExternalData, MODEL_FILE, Precision};
use distill_serve::tiny::{BertHeadArg, ShapePreset, TinySpec, write_tiny};
use loadtest::workload::WORDS;
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};

#[derive(clap::Parser)]
struct Options {
    /// Inputs sent (each once, bounded).
    #[arg(long, default_value_t = 600)]
    inputs: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Writes the mid-shape BERT classifier to `dir/models/enc/1` (INT8).
fn repository(dir: &Path) -> Result<PathBuf> {
    let work = dir.join("checkpoint");
    let mut spec = TinySpec::new(Family::Bert, 0);
    spec.shape = ShapePreset::Mid;
    spec.bert_head = BertHeadArg::Sequence;
    write_tiny(&spec, &work)?;
    let repo = dir.join("models");
    export::export(&work, &repo.join("enc/1"), Precision::DEFAULT_INT8, ExternalData::Never)?;
    std::fs::write(repo.join("enc/model.toml"), "name = \"enc\"\n")?;
    Ok(repo)
}

/// `n` texts whose token counts follow a lognormal of median 40 (at most 510 tokens).
fn texts(tokenizer: &tokenizers::Tokenizer, n: usize) -> Result<Vec<(String, usize)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(40);
    let lengths = LogNormal::new(40f64.ln(), 0.8)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let target = (lengths.sample(&mut rng).round() as usize).clamp(4, 510);
        let mut text = String::new();
        let mut k = i;
        let mut tokens = 0;
        while tokens < target {
            text.push_str(WORDS[k % WORDS.len()]);
            text.push(' ');
            k = k.wrapping_mul(31).wrapping_add(7);
            tokens = tokenizer.encode(text.as_str(), true).map_err(anyhow::Error::msg)?.len();
        }
        out.push((text, tokens));
    }
    Ok(out)
}

/// A counter's value in a Prometheus text page.
fn metric(page: &str, prefix: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Sends every text to `/predict` from `clients` concurrent clients; sequences/s and the
/// padding share of the computed tokens.
async fn serve(repo: &Path, extra: &[&str], texts: &[(String, usize)], clients: usize) -> Result<(f64, f64)> {
    let folder = repo.display().to_string();
    let mut args = vec!["--model-repository", &folder];
    args.extend_from_slice(extra);
    let server = common::Server::start(&args, "warn", |_| {})?;
    let http = reqwest::Client::new();
    let url = format!("{}/predict", server.base);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let workers = (0..clients).map(|_| async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((text, _)) = texts.get(i) else {
                return Ok::<_, anyhow::Error>(());
            };
            let body = serde_json::json!({"model": "enc", "inputs": text});
            let r = http
                .post(&url)
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{}: {}", r.status(), r.text().await?);
        }
    });
    for result in futures::future::join_all(workers).await {
        result?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let page = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await?
        .text()
        .await?;
    let real = metric(&page, "distill_serve_prompt_tokens_total{model=\"enc\"}");
    let padding = metric(&page, "distill_serve_padding_tokens_total{model=\"enc\"}");
    Ok((texts.len() as f64 / elapsed, padding / (real + padding).max(1.0)))
}

/// The same inputs through one ONNX Runtime session, in batches of 32: in arrival order, or
/// sorted by length (the least padding any batcher could reach, knowing every input ahead).
fn bare(
    model: &Path,
    tokenizer: &tokenizers::Tokenizer,
    texts: &[(String, usize)],
    sorted: bool,
) -> Result<(f64, f64)> {
    let mut session = EncoderSession::open(model, SessionOptions::default())?;
    let encoded: Vec<Vec<i64>> = texts
        .iter()
        .map(|(t, _)| {
            let e = tokenizer.encode(t.as_str(), true).map_err(anyhow::Error::msg)?;
            Ok(e.get_ids().iter().map(|&i| i64::from(i)).collect())
        })
        .collect::<Result<_>>()?;
    let mut encoded: Vec<Vec<i64>> = encoded;
    if sorted {
        encoded.sort_by_key(Vec::len);
    }
    let (mut real, mut computed) = (0usize, 0usize);
    let started = Instant::now();
    for batch in encoded.chunks(32) {
        let longest = batch.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Array2::<i64>::zeros((batch.len(), longest));
        let mut mask = Array2::<i64>::zeros((batch.len(), longest));
        for (r, row) in batch.iter().enumerate() {
            for (c, &id) in row.iter().enumerate() {
                ids[[r, c]] = id;
                mask[[r, c]] = 1;
            }
        }
        session.forward(&ids, &mask)?;
        real += batch.iter().map(Vec::len).sum::<usize>();
        computed += batch.len() * longest;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((texts.len() as f64 / elapsed, 1.0 - real as f64 / computed as f64))
}

/// The Python peer on the same model and texts: (sequences/s, padding share), or why it did
/// not run.
fn python_pipeline(model: &Path, texts: &[(String, usize)], dir: &Path) -> Result<(f64, f64), String> {
    let file = dir.join("texts.json");
    let list: Vec<&str> = texts.iter().map(|(t, _)| t.as_str()).collect();
    std::fs::write(&file, serde_json::to_string(&list).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/ort_pipeline.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(&file)
        .arg("0")
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok((
        v["sequences_per_s"].as_f64().unwrap_or(0.0),
        v["padding_share"].as_f64().unwrap_or(0.0),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = Options::parse();
    let dir = tempfile::tempdir()?;
    let repo = repository(dir.path())?;
    let model = repo.join("enc/1");
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    let texts = texts(&tokenizer, options.inputs)?;
    let mut lengths: Vec<usize> = texts.iter().map(|(_, n)| *n).collect();
    lengths.sort_unstable();
    println!(
        "{} inputs: median {} tokens, p90 {}, max {}; {} clients",
        texts.len(),
        lengths[lengths.len() / 2],
        lengths[lengths.len() * 9 / 10],
        lengths[lengths.len() - 1],
        options.clients
    );
    let onnx = model.join(MODEL_FILE);
    let (bare_rate, bare_padding) =
        tokio::task::block_in_place(|| bare(&onnx, &tokenizer, &texts, false)).context("bare loop")?;
    let (sorted_rate, sorted_padding) =
        tokio::task::block_in_place(|| bare(&onnx, &tokenizer, &texts, true)).context("sorted loop")?;
    println!("\n| configuration | sequences/s | padding share | / bare loop |");
    println!("|---|---|---|---|");
    for (name, extra) in [
        ("length buckets (defaults)", &[][..]),
        ("one bucket (pad to longest)", &["--buckets", "512"][..]),
    ] {
        let (rate, padding) = serve(&repo, extra, &texts, options.clients).await?;
        println!(
            "| {name} | {rate:.1} | {:.0}% | {:.2} |",
            padding * 100.0,
            rate / bare_rate
        );
    }
    println!(
        "| bare ONNX Runtime, batches of 32 in arrival order | {bare_rate:.1} | {:.0}% | 1.00 |",
        bare_padding * 100.0
    );
    println!(
        "| bare ONNX Runtime, batches of 32 sorted by length (all inputs known ahead) | {sorted_rate:.1} | {:.0}% | {:.2} |",
        sorted_padding * 100.0,
        sorted_rate / bare_rate
    );
    match python_pipeline(&model, &texts, dir.path()) {
        Ok((rate, padding)) => println!(
            "| Python: tokenizers + onnxruntime, batches of 32 (optimum's pipeline; ORT's default threads; no HTTP) | {rate:.1} | {:.0}% | {:.2} |",
            padding * 100.0,
            rate / bare_rate
        ),
        Err(why) => println!("| Python pipeline: not run ({why}) | | | |"),
    }
    Ok(())
}
