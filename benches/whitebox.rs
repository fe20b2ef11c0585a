//! White-box distillation ablation: one student, one budget, one dataset, three refresh jobs
//! from the same serving version — output-only token KD, + hidden-state transfer, + hidden and
//! attention transfer — from a wider local teacher that is also the black-box teacher (its
//! `/v1` on the same server). Every job's gate rejects on purpose, so each starts from the same
//! version; the table is the held-out evaluation of each candidate (agreement with the
//! teacher's tokens, KL to its top-k) beside the serving version's.
//!
//! ```sh
//! cargo bench --bench whitebox                     # 120 steps, 96 prompts
//! cargo bench --bench whitebox -- --steps 300
//! ```

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use distill_serve::checkpoint::Family;
use distill_serve::export::{self, ExternalData, Form, Precision};
use distill_serve::tiny::{TinySpec, write_tiny};
use serde_json::{Value, json};

const TOKEN: &str = "bench-admin-token";

#[derive(clap::Parser)]
struct Options {
    /// Training steps of each job.
    #[arg(long, default_value_t = 120)]
    steps: usize,
    /// Prompts in the dataset (a quarter held out).
    #[arg(long, default_value_t = 96)]
    prompts: usize,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Version 1 of `name`: a qwen2 student of `hidden` width and `layers` layers, with its
/// training checkpoint.
fn add(repo: &Path, name: &str, seed: u64, hidden: usize, layers: usize) -> Result<()> {
    let out = repo.join(name).join("1");
    let checkpoint = out.join("checkpoint");
    let mut spec = TinySpec::new(Family::Qwen2, seed);
    (spec.hidden_size, spec.num_layers, spec.init_std) = (Some(hidden), Some(layers), Some(0.3));
    spec.intermediate_size = Some(hidden * 2);
    write_tiny(&spec, &checkpoint)?;
    export::export_form(
        &checkpoint,
        &out,
        Precision::DEFAULT_INT8,
        ExternalData::Never,
        Form::default(),
    )?;
    std::fs::write(repo.join(name).join("model.toml"), format!("name = \"{name}\"\n"))?;
    Ok(())
}

/// Runs a job to its end and returns it.
async fn job(server: &common::Server, body: &Value) -> Result<Value> {
    let path = "/admin/v1/models/student/refresh";
    let started = server
        .admin(TOKEN, reqwest::Method::POST, path, Some(body.to_string()))
        .await?;
    let id = started["id"].as_str().context("no job id")?.to_string();
    let start = Instant::now();
    loop {
        let j = server
            .admin(TOKEN, reqwest::Method::GET, &format!("/admin/v1/jobs/{id}"), None)
            .await?;
        if ["succeeded", "rejected", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or_default()) {
            return Ok(j);
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("job {id} still running after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::parse();
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("models");
    add(&repo, "student", 1, 64, 4)?;
    add(&repo, "teacher", 9, 128, 4)?;
    let folder = repo.to_str().context("repository path is not UTF-8")?;
    let server = common::Server::start(&["--admin-token", TOKEN, "--model-repository", folder], "warn", |_| {})?;
    let base = server.base.clone();
    let findings = [
        "chest pain",
        "type 2 diabetes",
        "a fractured femur",
        "asthma",
        "hypertension",
        "a migraine",
    ];
    let prompts: String = (0..o.prompts)
        .map(|i| {
            let text = format!("A patient {i} with {} needs a code.", findings[i % findings.len()]);
            format!("{}\n", json!({"prompt": text}))
        })
        .collect();
    server
        .admin(TOKEN, reqwest::Method::POST, "/admin/v1/datasets/notes", Some(prompts))
        .await?;
    println!(
        "student 64 wide x 4 layers, teacher 128 wide x 4 layers (random, init std 0.3); {} prompts, {} steps of 8, seed 0\n",
        o.prompts, o.steps
    );
    println!("| transfer | candidate agreement | candidate KL | serving agreement | serving KL | seconds |");
    println!("|---|---|---|---|---|---|");
    for (name, white_box) in [
        ("output only (token KD)", Value::Null),
        (
            "+ hidden states (last 2 layers)",
            json!({"teacher_model": "teacher", "layers": 2, "attention_weight": 0.0}),
        ),
        (
            "+ hidden states + attention maps (last 2 layers)",
            json!({"teacher_model": "teacher", "layers": 2}),
        ),
    ] {
        let body = json!({"dataset": "notes", "eval_fraction": 0.25, "eval_max_new_tokens": 8,
            "teacher": {"url": format!("{base}/v1"), "model": "teacher", "mode": "token", "top_logprobs": 5,
                        "max_tokens": 12, "temperature": 0.0, "concurrency": 4},
            "train": {"steps": o.steps, "batch_size": 8, "learning_rate": 0.003, "warmup_steps": 10, "nice": 0, "seed": 0},
            // Rejected on purpose: every job starts from version 1.
            "gate": {"min_agreement_gain": 10.0},
            "white_box": white_box});
        let started = Instant::now();
        let j = job(&server, &body).await?;
        if j["state"] != "rejected" {
            bail!("{name}: {j}");
        }
        let e = &j["result"]["evaluation"];
        let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} |",
            f(&e["candidate"]["agreement"]),
            f(&e["candidate"]["kl"]),
            f(&e["current"]["agreement"]),
            f(&e["current"]["kl"]),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
