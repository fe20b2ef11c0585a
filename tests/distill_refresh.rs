//! Distillation refresh end to end, with real processes on loopback: one distill-serve serves
//! a "teacher" (a different tiny student with the same tokenizer), a second serves the student
//! and refreshes it from the first through its admin API.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::server::{ADMIN_TOKEN, TestServer, add_trainable_form, add_trainable_version, add_version};
use distill_serve::checkpoint::Family;
use distill_serve::engine::{DecoderSession, SessionOptions};
use distill_serve::export::{self, ExternalData, Precision};
use distill_serve::export::{Attention, Form};
use distill_serve::tiny::{TinySpec, write_tiny};
use reqwest::Method;
use serde_json::{Value, json};

/// A server over a fresh repository holding `name` version 1 with its checkpoint, exported with
/// fused attention (as `distill-serve export` writes by default).
fn student_server(name: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    let fused = Form {
        attention: Attention::Gqa,
        ..Form::default()
    };
    add_trainable_form(&repo, name, 1, 1, fused);
    TestServer::start_with_repo(dir, repo, &[])
}

fn teacher_server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "teacher", 1, 7);
    TestServer::start_with_repo(dir, repo, &[])
}

/// Clinical-sounding prompts, all different.
fn prompts(n: usize) -> String {
    let findings = [
        "chest pain",
        "type 2 diabetes",
        "a fractured femur",
        "asthma",
        "high blood pressure",
        "a migraine",
    ];
    let ages = ["young", "older", "pregnant", "elderly"];
    (0..n)
        .map(|i| {
            let line =
                json!({"prompt": format!("A {} patient {i} with {} needs a code.", ages[i % 4], findings[i % 6])});
            format!("{line}\n")
        })
        .collect()
}

async fn upload(server: &TestServer, dataset: &str, n: usize) {
    let r = server
        .admin(Method::POST, &format!("/admin/v1/datasets/{dataset}"))
        .body(prompts(n))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn token_job(teacher: &TestServer, steps: usize) -> Value {
    json!({
        "dataset": "notes",
        "teacher": {"url": teacher.url("/v1"), "model": "teacher", "mode": "token", "top_logprobs": 5,
                    "max_tokens": 12, "temperature": 0.0, "concurrency": 4},
        // nice 0: the default (10) lets training yield to everything else on a busy test box.
        "train": {"steps": steps, "batch_size": 8, "learning_rate": 0.003, "warmup_steps": 5, "alpha": 0.7, "nice": 0},
        "eval_fraction": 0.25,
        "eval_max_new_tokens": 8
    })
}

async fn job(server: &TestServer, id: &str) -> Value {
    server.admin_get(&format!("/admin/v1/jobs/{id}")).await
}

async fn serving_version(server: &TestServer, model: &str) -> u64 {
    let list = server.admin_get("/admin/v1/models").await;
    list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .unwrap()["version"]
        .as_u64()
        .unwrap()
}

/// Reads the job's server-sent events until `finished`; returns their names.
async fn event_names(server: &TestServer, id: &str) -> Vec<String> {
    let mut response = server
        .admin(Method::GET, &format!("/admin/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (mut buffer, mut names) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(240);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), response.chunk())
        .await
        .unwrap_or(Ok(None))
    {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(name) = block.lines().find_map(|l| l.strip_prefix("event: ")) {
                names.push(name.to_string());
            }
        }
        if names.last().is_some_and(|n| n == "finished") {
            break;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_brings_the_student_closer_to_the_teacher_and_swaps_it_in_under_load() {
    let teacher = teacher_server();
    let student = student_server("coder");
    upload(&student, "notes", 120).await;

    // Clients keep asking the student while the refresh runs and the swap happens.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (url, stop, ok, failed) = (
            student.url("/v1/chat/completions"),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let started = Instant::now();
            // Bounded in count and time; paced, so the clients outlast the job.
            for i in 0..20_000 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(300) {
                    break;
                }
                let body = json!({"model": "coder", "max_tokens": 8,
                    "messages": [{"role": "user", "content": format!("client {c} request {i}")}]});
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    let id = student.start_refresh("coder", &token_job(&teacher, 80)).await;
    let names = event_names(&student, &id).await;
    let j = student.finished_job(&id, Duration::from_secs(240)).await;
    let served_during = ok.load(Ordering::Relaxed);
    // Some requests after the swap too.
    let after = Instant::now();
    while ok.load(Ordering::Relaxed) < served_during + 20 && after.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    assert_eq!(j["state"], "succeeded", "{j}");
    let r = &j["result"];
    let (cur, cand) = (&r["evaluation"]["current"], &r["evaluation"]["candidate"]);
    eprintln!("held-out evaluation: {}", r["evaluation"]);
    let kl = |e: &Value| e["kl"].as_f64().unwrap();
    let agreement = |e: &Value| e["agreement"].as_f64().unwrap();
    assert!(
        kl(cand) < kl(cur),
        "held-out KL did not fall: {} -> {}",
        kl(cur),
        kl(cand)
    );
    assert!(
        agreement(cand) > agreement(cur),
        "held-out greedy agreement did not rise: {} -> {}",
        agreement(cur),
        agreement(cand)
    );
    assert_eq!(
        (r["previous_version"].as_u64(), r["version"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(r["losses"].as_array().unwrap().len(), 80);
    assert_eq!(serving_version(&student, "coder").await, 2);
    assert!(student.repo.join("coder/2/checkpoint/model.safetensors").is_file());
    // The candidate keeps the served graph's form.
    let v2 = DecoderSession::open(&student.repo.join("coder/2/model.onnx"), SessionOptions::default()).unwrap();
    assert!(v2.fused_attention(), "the refreshed version lost its fused attention");
    assert_eq!(r["teacher"]["done"], r["teacher"]["total"], "{}", r["teacher"]);
    // Events from the training stage on (earlier ones may pass before the stream opens).
    for stage in ["stage", "step", "evaluation", "gate", "finished"] {
        assert!(names.iter().any(|n| n == stage), "no {stage} event in {names:?}");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the refresh");
    assert!(
        ok.load(Ordering::Relaxed) >= served_during + 20,
        "too few requests after the swap"
    );
    assert_eq!(
        student
            .metric("distill_serve_refresh_jobs_total{model=\"coder\",outcome=\"succeeded\"}")
            .await,
        1.0
    );

    // A gate that cannot pass leaves version 2 serving; the teacher is not asked again.
    let mut strict = token_job(&teacher, 5);
    strict["gate"] = json!({"min_agreement_gain": 1.0});
    let id = student.start_refresh("coder", &strict).await;
    let j = student.finished_job(&id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "rejected", "{j}");
    assert!(j["error"].as_str().unwrap().contains("agreement"), "{j}");
    let t = &j["result"]["teacher"];
    assert_eq!(t["cached"], t["total"], "{t}");
    assert_eq!(serving_version(&student, "coder").await, 2);
    assert!(!student.repo.join("coder/3").exists());

    // Rollback returns to version 1, and there is nothing before it.
    let r = student
        .admin(Method::POST, "/admin/v1/models/coder/rollback")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["version"].as_u64(), body["rolled_back_from"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(serving_version(&student, "coder").await, 1);
    let r = student
        .admin(Method::POST, "/admin/v1/models/coder/rollback")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

/// A teacher whose tokenizer differs from the students' (a BPE of another size).
fn foreign_teacher_server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    let work = dir.path().join("work");
    let mut spec = TinySpec::new(Family::Qwen2, 7);
    spec.tokenizer_vocab_size = 300;
    write_tiny(&spec, &work).unwrap();
    export::export(
        &work,
        &repo.join("teacher/1"),
        Precision::DEFAULT_INT8,
        ExternalData::Never,
    )
    .unwrap();
    std::fs::write(repo.join("teacher/model.toml"), "name = \"teacher\"\n").unwrap();
    TestServer::start_with_repo(dir, repo, &["--api-key", "teacher-key"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_teacher_fails_the_job_clearly_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_trainable_version(&repo, "coder", 1, 1);
    let env = [("TEACHER_WRONG_KEY", "nope"), ("TEACHER_KEY", "teacher-key")];
    let student = TestServer::start_with_env(dir, repo, &[], &env);
    let teacher = foreign_teacher_server();
    upload(&student, "notes", 12).await;
    // Nothing listens on port 9 of loopback.
    let mut job = json!({"dataset": "notes", "train": {"steps": 2},
        "teacher": {"url": "http://127.0.0.1:9/v1", "model": "t", "max_retries": 1, "timeout_ms": 2000}});
    let id = student.start_refresh("coder", &job).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (j["state"].as_str(), j["stage"].as_str()),
        (Some("failed"), Some("teacher")),
        "{j}"
    );
    let error = j["error"].as_str().unwrap();
    assert!(error.contains("http://127.0.0.1:9/v1/chat/completions"), "{error}");

    job["teacher"]["api_key_env"] = json!("TEACHER_DISTILL_SERVE_TEST_NO_SUCH_KEY");
    let id = student.start_refresh("coder", &job).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("TEACHER_DISTILL_SERVE_TEST_NO_SUCH_KEY"),
        "{j}"
    );

    // The teacher's /v1 routes want its API key; its health routes do not.
    let anonymous = teacher
        .post(
            "/v1/completions",
            &json!({"model": "teacher", "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        reqwest::get(teacher.url("/v2/health/ready")).await.unwrap().status(),
        200
    );

    // A wrong key: the teacher's 401, not retried.
    let mut keyed = token_job(&teacher, 2);
    keyed["teacher"]["api_key_env"] = json!("TEACHER_WRONG_KEY");
    let id = student.start_refresh("coder", &keyed).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "failed");
    assert!(j["error"].as_str().unwrap().contains("(401)"), "{j}");

    // The right key, but token-level KD from a teacher with another tokenizer.
    keyed["teacher"]["api_key_env"] = json!("TEACHER_KEY");
    let id = student.start_refresh("coder", &keyed).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (j["state"].as_str(), j["stage"].as_str()),
        (Some("failed"), Some("teacher")),
        "{j}"
    );
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("must share the student's tokenizer"),
        "{j}"
    );

    // Serving is untouched.
    assert_eq!(serving_version(&student, "coder").await, 1);
    let r = student
        .post(
            "/v1/completions",
            &json!({"model": "coder", "prompt": "E11", "max_tokens": 4}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(!student.repo.join("coder/2").exists());

    // A job that makes no sense is refused before it starts.
    let bad = json!({"dataset": "notes", "teacher": {"url": "ftp://x", "model": "t"}});
    let r = student
        .admin(Method::POST, "/admin/v1/models/coder/refresh")
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = student
        .admin(Method::POST, "/admin/v1/models/nope/refresh")
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = student
        .admin(Method::GET, "/admin/v1/jobs/job-missing")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_training_leaves_no_half_version_and_the_job_failed() {
    let teacher = teacher_server();
    let student = student_server("coder");
    upload(&student, "notes", 16).await;
    let mut long = token_job(&teacher, 1_000_000);
    long["teacher"]["mode"] = json!("sequence");
    let id = student.start_refresh("coder", &long).await;
    let training = TestServer::wait_for(Duration::from_secs(60), || async {
        let j = job(&student, &id).await;
        j["stage"] == "training" && j["result"]["training"]["step"].as_u64().unwrap_or(0) > 2
    })
    .await;
    assert!(training, "the job never reached training");
    let (dir, repo) = student.crash();
    let staging: Vec<_> = std::fs::read_dir(repo.join("coder"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".staging-") && !n.ends_with(".lock"))
        .collect();
    assert_eq!(staging.len(), 1, "the candidate is built in a staging folder");

    // Restarted with a terminology, so the next job's gate can count coverage.
    let icd = format!(
        "icd=icd10cm-xml:{}/tests/fixtures/terminology/icd10cm_tabular_small.xml",
        env!("CARGO_MANIFEST_DIR")
    );
    let student = TestServer::start_with_repo(dir, repo, &["--terminology", &icd]);
    let j = job(&student, &id).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("interrupted"), "{j}");
    assert_eq!(serving_version(&student, "coder").await, 1);
    let names: Vec<String> = std::fs::read_dir(student.repo.join("coder"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".staging-") || n == "2"),
        "{names:?}"
    );

    // Sequence-level KD on the same store then runs to the end; a cancelled job stops.
    let mut short = long.clone();
    short["train"]["steps"] = json!(4);
    short["gate"] = json!({"min_agreement_gain": -1.0, "max_kl_ratio": 100.0, "min_coverage": 0.0});
    short["terminology"] = json!("icd");
    let id = student.start_refresh("coder", &short).await;
    let j = student.finished_job(&id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let candidate = &j["result"]["evaluation"]["candidate"];
    assert!(candidate["kl"].is_null(), "sequence-level KD has no KL");
    let coverage = candidate["coverage"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&coverage), "{candidate}");
    assert_eq!(serving_version(&student, "coder").await, 2);

    let id = student.start_refresh("coder", &long).await;
    let r = student
        .admin(Method::POST, &format!("/admin/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(serving_version(&student, "coder").await, 2);
}

#[tokio::test]
async fn refresh_routes_reject_missing_and_wrong_tokens() {
    let server = TestServer::start(&[]);
    let routes = [
        (Method::POST, "/admin/v1/models/tiny/refresh"),
        (Method::POST, "/admin/v1/models/tiny/rollback"),
        (Method::GET, "/admin/v1/jobs"),
        (Method::GET, "/admin/v1/jobs/x"),
        (Method::GET, "/admin/v1/jobs/x/events"),
        (Method::POST, "/admin/v1/jobs/x/cancel"),
        (Method::GET, "/admin/v1/datasets"),
        (Method::POST, "/admin/v1/datasets/d"),
    ];
    let http = reqwest::Client::new();
    for (method, path) in routes {
        let r = http.request(method.clone(), server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {path} without a token");
        let r = http
            .request(method.clone(), server.url(path))
            .bearer_auth(format!("{ADMIN_TOKEN}x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path} with a wrong token");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["message"].is_string());
    }
    // With the token, a bad upload is a 400 naming the line.
    let r = server
        .admin(Method::POST, "/admin/v1/datasets/d")
        .body("{\"prompt\": \"ok\"}\n{\"promt\": 1}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with("line 2"),
        "{body}"
    );
}

#[tokio::test]
async fn prompts_are_captured_redacted_only_where_capture_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "open", 1, 1);
    add_version(&repo, "private", 1, 2);
    std::fs::write(
        repo.join("private/model.toml"),
        "name = \"private\"\ncapture = true\ncapture_redact = ['\\b\\d{3}-\\d{2}-\\d{4}\\b']\n",
    )
    .unwrap();
    let server = TestServer::start_with_repo(dir, repo, &[]);
    for model in ["open", "private"] {
        let chat = json!({"model": model, "max_tokens": 2,
            "messages": [{"role": "user", "content": "Patient SSN 123-45-6789 has chest pain."}]});
        assert_eq!(server.post("/v1/chat/completions", &chat).await.status(), 200);
        let raw = json!({"model": model, "max_tokens": 2, "prompt": "Follow-up for 987-65-4321."});
        assert_eq!(server.post("/v1/completions", &raw).await.status(), 200);
    }
    // Capture is off the request path: give it a moment.
    let mut prompts = Value::Null;
    for _ in 0..100 {
        let r = server
            .admin(Method::GET, "/admin/v1/datasets/capture/private")
            .send()
            .await
            .unwrap();
        prompts = r.json::<Value>().await.unwrap()["prompts"].clone();
        if prompts.as_array().is_some_and(|p| p.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(prompts.as_array().map(Vec::len), Some(2), "{prompts}");
    let mut texts: Vec<&str> = prompts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["messages"][0]["content"].as_str().unwrap())
        .collect();
    texts.sort_unstable();
    assert_eq!(
        texts,
        ["Follow-up for [REDACTED].", "Patient SSN [REDACTED] has chest pain."]
    );
    let r = server
        .admin(Method::GET, "/admin/v1/datasets/capture/open")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_uploads_refreshes_with_progress_and_rolls_back() {
    let teacher = teacher_server();
    let student = student_server("coder");
    let dir = tempfile::tempdir().unwrap();
    let (data, job_file) = (dir.path().join("notes.jsonl"), dir.path().join("job.json"));
    std::fs::write(&data, prompts(16)).unwrap();
    let mut job = token_job(&teacher, 4);
    job["gate"] = json!({"min_agreement_gain": -1.0, "max_kl_ratio": 100.0});
    std::fs::write(&job_file, job.to_string()).unwrap();
    let cli = |args: &[&str], token: &str| {
        let (base, args) = (
            student.base.clone(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        let token = token.to_string();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(common::binary())
                    .args(["distill", "--server", &base, "--admin-token", &token])
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = cli(&["upload", "notes", data.to_str().unwrap()], ADMIN_TOKEN).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["added"], 16);

    let out = cli(&["refresh", "coder", job_file.to_str().unwrap()], ADMIN_TOKEN).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} {stderr}", out.status);
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (done["state"].as_str(), done["result"]["version"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{done}"
    );
    // Stages before the event stream opened may be missed; the last one never is.
    assert!(stderr.contains("stage: promote"), "{stderr}");

    let out = cli(&["rollback", "coder"], ADMIN_TOKEN).await;
    assert!(out.status.success());
    assert_eq!(serving_version(&student, "coder").await, 1);

    let out = cli(&["jobs"], "wrong-token").await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A teacher on loopback that answers every request with `response` (raw HTTP/1.1), counting
/// the requests.
async fn scripted_teacher(response: &'static str) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        // Bounded: a job makes a handful of requests.
        for _ in 0..50 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 64 * 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await;
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (url, count)
}

/// Teachers are called only where the operator allows, with only `TEACHER_*` keys, and a
/// teacher's bad answers (a negative Retry-After, a redirect elsewhere) end the job cleanly:
/// it fails naming the answer, and the model is free for the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teachers_are_called_only_where_allowed_and_their_bad_answers_end_jobs_cleanly() {
    let student = student_server("coder");
    upload(&student, "notes", 8).await;
    let job = |url: &str| {
        json!({"dataset": "notes", "train": {"steps": 1},
               "teacher": {"url": url, "model": "t", "max_retries": 2, "timeout_ms": 5000, "concurrency": 1}})
    };
    let mut refused = Vec::new();
    let mut with_key = job("http://127.0.0.1:9/v1");
    with_key["teacher"]["api_key_env"] = json!("HOME");
    let mut crawling = job("http://127.0.0.1:9/v1");
    crawling["teacher"]["requests_per_second"] = json!(1e-300);
    for (body, reason) in [
        (job("https://api.example.com/v1"), "--teacher-allow"),
        (job("http://10.1.2.3/v1"), "--teacher-allow"),
        (job("http://169.254.169.254/latest"), "--teacher-allow"),
        (with_key, "TEACHER_"),
        (crawling, "requests_per_second"),
    ] {
        let r = student
            .admin(Method::POST, "/admin/v1/models/coder/refresh")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        refused.push(status);
        assert!(text.contains(reason), "{reason}: {text}");
    }
    assert_eq!(refused, [400; 5]);

    let (url, asked) = scripted_teacher(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: -1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let id = student.start_refresh("coder", &job(&url)).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (j["state"].as_str(), j["stage"].as_str()),
        (Some("failed"), Some("teacher")),
        "{j}"
    );
    assert!(j["error"].as_str().unwrap().contains("(429)"), "{j}");
    assert_eq!(asked.load(Ordering::SeqCst), 3, "one request and two retries");
    // The job's start and its end are in the audit log, by the admin who started it (the end
    // is written just after the job's record, on the audit writer's thread: it may trail).
    let read = || {
        let audit = std::fs::read_to_string(student.repo.join(".distill/audit.jsonl")).unwrap_or_default();
        let lines: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (audit, lines)
    };
    let ended = TestServer::wait_for(Duration::from_secs(5), || {
        std::future::ready(read().1.iter().any(|l| l["action"] == "refresh_finish"))
    })
    .await;
    assert!(ended, "no refresh_finish line: {}", read().0);
    let (audit, lines) = read();
    let finish = lines
        .iter()
        .find(|l| l["action"] == "refresh_finish")
        .expect("a refresh_finish line");
    assert_eq!(
        (
            finish["actor"].as_str(),
            finish["target"].as_str(),
            finish["outcome"].as_str()
        ),
        (Some("admin"), Some("coder"), Some("failed"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "refresh" && l["outcome"] == "failed: 400"),
        "{audit}"
    );

    let (url, _) = scripted_teacher(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://10.1.2.3/v1/chat/completions\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let id = student.start_refresh("coder", &job(&url)).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("(307)"),
        "the redirect was followed: {j}"
    );
}

/// Two replicas over one shared repository (each with its own store, as the Kubernetes
/// manifests run them): a refresh on one, a replica starting while the candidate is built
/// leaves it alone, and a `reload` on the other serves the new version; no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_on_one_replica_is_served_by_another_after_a_reload() {
    let teacher = teacher_server();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_trainable_version(&repo, "coder", 1, 1);
    let stores = tempfile::tempdir().unwrap();
    let store = |name: &str| stores.path().join(name).to_str().unwrap().to_string();
    let (store_a, store_b) = (store("a.sqlite3"), store("b.sqlite3"));
    let a = TestServer::start_with_repo(dir, repo.clone(), &["--store", &store_a]);
    upload(&a, "notes", 120).await;
    let id = a.start_refresh("coder", &token_job(&teacher, 80)).await;
    // Replica B starts while A's candidate folder is being written.
    let model_dir = repo.join("coder");
    let building = TestServer::wait_for(Duration::from_secs(120), || {
        let staged = std::fs::read_dir(&model_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .any(|e| e.path().is_dir() && e.file_name().to_string_lossy().starts_with(".staging-"))
            })
            .unwrap_or(false);
        std::future::ready(staged)
    })
    .await;
    assert!(building, "never saw the candidate folder: {}", job(&a, &id).await);
    let b = TestServer::start_with_repo(tempfile::tempdir().unwrap(), repo, &["--store", &store_b]);

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let client = {
        let (url, stop, failed) = (b.url("/v1/completions"), stop.clone(), failed.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            // Bounded in count and time.
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = json!({"model": "coder", "prompt": format!("request {i}"), "max_tokens": 4});
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let j = a.finished_job(&id, Duration::from_secs(240)).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(serving_version(&a, "coder").await, 2);
    assert_eq!(serving_version(&b, "coder").await, 1, "B changes only when told");
    let reload = b
        .admin(Method::POST, "/admin/v1/models/coder/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap());
    assert_eq!(serving_version(&b, "coder").await, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed on B");
}

/// Uploads `lines` (one prompt each) as `dataset`.
async fn upload_texts(server: &TestServer, dataset: &str, lines: impl Iterator<Item = String>) {
    let body: String = lines.map(|l| format!("{}\n", json!({"prompt": l}))).collect();
    let r = server
        .admin(Method::POST, &format!("/admin/v1/datasets/{dataset}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// The drift check runs before any teacher is asked: prompts unlike the reference traffic are
/// refused by a gate with `max_drift_kl`; prompts like it pass and the job goes on.
#[tokio::test]
async fn a_job_whose_prompts_drift_from_the_traffic_is_gated_before_the_teacher() {
    let student = student_server("coder");
    let teacher = teacher_server();
    upload(&student, "notes", 40).await;
    let quotes = (0..40).map(|i| format!("TICKER{} {}.{} +{}%", i % 7, 1000 + i * 37, i % 10, i % 5));
    upload_texts(&student, "quotes", quotes).await;
    // The same generator as "notes", other numbers: what the model serves.
    let lines = prompts(80);
    let traffic: Vec<String> = lines
        .lines()
        .skip(40)
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    upload_texts(&student, "traffic", traffic.into_iter()).await;

    let mut job = token_job(&teacher, 2);
    job["gate"] = json!({"max_drift_kl": 1.0, "min_agreement_gain": -1.0, "max_kl_ratio": 1000.0});
    job["drift_reference"] = json!("quotes");
    let id = student.start_refresh("coder", &job).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (j["state"].as_str(), j["stage"].as_str()),
        (Some("rejected"), Some("prepare")),
        "{j}"
    );
    assert!(j["error"].as_str().unwrap().contains("drift: unigram KL"), "{j}");
    let far = j["result"]["drift"]["unigram_kl"].as_f64().unwrap();
    assert!(far > 1.0, "{j}");
    assert!(j["result"]["teacher"].is_null(), "the teacher was asked: {j}");

    job["drift_reference"] = json!("traffic");
    let id = student.start_refresh("coder", &job).await;
    let j = student.finished_job(&id, Duration::from_secs(120)).await;
    let near = j["result"]["drift"]["unigram_kl"].as_f64().unwrap();
    assert!(near < 0.2 && near * 10.0 < far, "{near} vs {far}: {j}");
    assert_eq!(j["state"], "succeeded", "{j}");

    // A gate that asks for the check needs reference prompts.
    job["drift_reference"] = json!("nothing-here");
    let id = student.start_refresh("coder", &job).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("holds no prompts"), "{j}");
}

/// The teacher is scored on the labelled held-out prompts before any training: a teacher that
/// answers "I10" to everything is right on half of prompts labelled I10 / E11.9 alternately; a
/// gate asking for 85% rejects the job at the teacher stage, one asking for 30% lets it train.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teacher_below_the_accuracy_bar_on_labelled_prompts_stops_the_job_before_training() {
    let student = student_server("coder");
    let lines = (0..40).map(|i| {
        let label = if i % 2 == 0 { "I10" } else { "E11.9" };
        json!({"prompt": format!("Patient {i}: which code?"), "label": label}).to_string() + "\n"
    });
    let r = student
        .admin(Method::POST, "/admin/v1/datasets/coded")
        .body(lines.collect::<String>())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (url, asked) = constant_teacher("I10").await;
    let job = |min: f64| {
        json!({"dataset": "coded", "eval_fraction": 0.25, "eval_max_new_tokens": 4,
               "teacher": {"url": url, "model": "t", "concurrency": 2},
               "train": {"steps": 2, "batch_size": 4, "nice": 0},
               "gate": {"min_teacher_accuracy": min, "min_agreement_gain": -1.0, "max_kl_ratio": 1000.0}})
    };
    let id = student.start_refresh("coder", &job(0.85)).await;
    let j = student.finished_job(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (j["state"].as_str(), j["stage"].as_str()),
        (Some("rejected"), Some("teacher")),
        "{j}"
    );
    assert!(j["error"].as_str().unwrap().contains("teacher accuracy"), "{j}");
    let scored = &j["result"]["teacher_accuracy"];
    let (labelled, correct) = (
        scored["labelled"].as_u64().unwrap(),
        scored["correct"].as_u64().unwrap(),
    );
    assert!(labelled >= 4 && correct > 0 && correct < labelled, "{j}");
    assert!(j["result"]["training"].is_null(), "no training step ran: {j}");
    assert_eq!(asked.load(Ordering::SeqCst), 40, "one answer per prompt");

    // Answers are cached: the next job asks nobody and trains.
    let id = student.start_refresh("coder", &job(0.3)).await;
    let j = student.finished_job(&id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["result"]["training"]["step"], 2, "{j}");
    assert_eq!(j["result"]["teacher_accuracy"], *scored, "{j}");
    assert_eq!(asked.load(Ordering::SeqCst), 40);
}

/// A scripted OpenAI-compatible teacher that answers `content` to every chat request.
async fn constant_teacher(content: &str) -> (String, Arc<AtomicUsize>) {
    let answer = json!({"id": "x", "object": "chat.completion", "created": 0, "model": "t",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]})
    .to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    scripted_teacher(Box::leak(response.into_boxed_str())).await
}

/// The forgetting guard. Version 2 learns to code 48 clinical prompts as I10 (from a teacher
/// that always answers so); a job on unrelated prompts with that set as its regression set is
/// rejected when its candidate forgets the answer, and accepted when half of each batch replays
/// the set's training prompts. The second names no dataset: it guards the held-out split of
/// the last succeeded job, the same set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forgetting_guard_rejects_a_candidate_that_forgets_and_accepts_one_with_replay() {
    let student = student_server("coder");
    let old: String = (0..48)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("Code finding {i}: hypertension."), "label": "I10"})
            )
        })
        .collect();
    let r = student
        .admin(Method::POST, "/admin/v1/datasets/old")
        .body(old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (coder, _) = constant_teacher("I10").await;
    let learn = json!({"dataset": "old", "eval_fraction": 0.25, "eval_max_new_tokens": 4,
        "teacher": {"url": coder, "model": "t", "concurrency": 2},
        "train": {"steps": 40, "batch_size": 8, "learning_rate": 0.005, "warmup_steps": 2, "nice": 0},
        "gate": {"min_agreement_gain": -1.0, "max_kl_ratio": 1000.0}});
    // Nothing succeeded yet: a guard without a dataset has no split to guard.
    let mut unguarded = learn.clone();
    unguarded["regression"] = json!({});
    let id = student.start_refresh("coder", &unguarded).await;
    let j = student.finished_job(&id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("no succeeded job"), "{j}");
    let id = student.start_refresh("coder", &learn).await;
    let j = student.finished_job(&id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let learnt = j["result"]["evaluation"]["candidate"]["exact_match"].as_f64().unwrap();
    assert!(learnt >= 0.75, "version 2 codes the set: {learnt}");

    let teacher = teacher_server();
    let unrelated = (0..48).map(|i| format!("TICKER{} closes at {}.{}", i % 7, 1000 + i * 37, i % 10));
    upload_texts(&student, "quotes", unrelated).await;
    let job = |regression: Value| {
        json!({"dataset": "quotes", "eval_fraction": 0.25, "eval_max_new_tokens": 4,
               "teacher": {"url": teacher.url("/v1"), "model": "teacher", "mode": "token", "top_logprobs": 5,
                           "max_tokens": 12, "temperature": 0.0, "concurrency": 4},
               "train": {"steps": 40, "batch_size": 8, "learning_rate": 0.005, "warmup_steps": 2, "nice": 0},
               "gate": {"min_agreement_gain": -1.0, "max_kl_ratio": 1000.0},
               "regression": regression})
    };
    let scores = |j: &Value| {
        let e = &j["result"]["regression_evaluation"];
        (
            e["current"]["exact_match"].as_f64().unwrap(),
            e["candidate"]["exact_match"].as_f64().unwrap(),
        )
    };
    let id = student
        .start_refresh(
            "coder",
            &job(json!({"dataset": "old", "max_exact_match_drop": 0.25, "replay": 0.0})),
        )
        .await;
    let forgot = student.finished_job(&id, Duration::from_secs(180)).await;
    println!(
        "regression exact match (current, candidate) without replay: {:?}",
        scores(&forgot)
    );
    assert_eq!(forgot["state"], "rejected", "{forgot}");
    assert!(forgot["error"].as_str().unwrap().contains("forgetting"), "{forgot}");
    assert_eq!(forgot["result"]["regression"]["replayed"], 0);

    let id = student
        .start_refresh("coder", &job(json!({"max_exact_match_drop": 0.25, "replay": 0.5})))
        .await;
    let kept = student.finished_job(&id, Duration::from_secs(180)).await;
    println!("with replay: {:?}", scores(&kept));
    assert_eq!(kept["result"]["regression"]["dataset"], "old", "{kept}");
    assert_eq!(
        kept["result"]["regression"]["held_out"], forgot["result"]["regression"]["held_out"],
        "the same split: {kept}"
    );
    assert!(kept["result"]["regression"]["replayed"].as_u64().unwrap() > 0, "{kept}");
    assert_eq!(kept["state"], "succeeded", "{kept}");
    assert_eq!(serving_version(&student, "coder").await, 3);
}
