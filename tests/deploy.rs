//! The deployment files under `docker/`: both Dockerfiles pass hadolint, the Kubernetes
//! manifests validate against the Kubernetes schemas offline (and the custom resources against
//! schemas of our own), and the binary starts with each Dockerfile's own environment, as the
//! container runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::repo_file;
use common::server::{TestServer, add_version};

/// Runs `program` with `args`; its status and output.
fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (scripts/setup.sh installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_dockerfiles_pass_hadolint() {
    for name in ["docker/Dockerfile", "docker/Dockerfile.cuda"] {
        let (ok, out) = run("hadolint", &[repo_file(name).to_str().unwrap()]);
        assert!(ok, "hadolint {name}:\n{out}");
    }
    // The linter is alive: a Dockerfile with a known fault fails it.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian:latest\nRUN cd /tmp && apt-get install curl\n").unwrap();
    assert!(
        !run("hadolint", &[bad.to_str().unwrap()]).0,
        "hadolint passed a faulty Dockerfile"
    );
}

#[test]
fn the_kubernetes_manifests_validate_offline() {
    let yaml_in = |dir: &str| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo_file(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        files
    };
    let mut files = yaml_in("docker/kubernetes");
    files.extend(yaml_in("docker/kubernetes/gpu"));
    assert!(files.len() >= 9, "{files:?}");
    let names: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    let mut args = vec!["--strict"];
    args.extend(&names);
    let (ok, out) = run("kubernetes-validate", &args);
    assert!(ok, "kubernetes-validate:\n{out}");
    // Only the ServiceMonitor (a custom resource) goes unchecked there; the next test checks it.
    let unchecked: Vec<&str> = out.lines().filter(|l| l.contains("Couldn't find schema")).collect();
    assert!(
        unchecked.len() == 1 && unchecked[0].contains("servicemonitor.yaml"),
        "{out}"
    );
    // And it refuses a manifest with a misspelt field.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  prots:\n    - port: 80\n",
    )
    .unwrap();
    assert!(!run("kubernetes-validate", &["--strict", bad.to_str().unwrap()]).0);
}

#[test]
fn the_service_monitor_and_the_gpu_deployment_hold_what_they_must() {
    let script = repo_file("tests/clients/check_manifests.py");
    let folder = repo_file("docker/kubernetes");
    let (ok, out) = run("python3", &[script.to_str().unwrap(), folder.to_str().unwrap()]);
    assert!(ok && out.trim() == "ok", "{out}");
    // The check has teeth: a GPU Deployment without its GPU, and a ServiceMonitor on a port
    // the Service lacks, fail it.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kubernetes");
    std::fs::create_dir_all(copy.join("gpu")).unwrap();
    for name in ["service.yaml", "deployment.yaml"] {
        std::fs::copy(folder.join(name), copy.join(name)).unwrap();
    }
    let gpu = std::fs::read_to_string(folder.join("gpu/deployment.yaml")).unwrap();
    std::fs::write(
        copy.join("gpu/deployment.yaml"),
        gpu.replace("nvidia.com/gpu: 1", "cpu: \"1\""),
    )
    .unwrap();
    let monitor = std::fs::read_to_string(folder.join("servicemonitor.yaml")).unwrap();
    std::fs::write(
        copy.join("servicemonitor.yaml"),
        monitor.replace("- port: http", "- port: web"),
    )
    .unwrap();
    let (ok, out) = run("python3", &[script.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(!ok && out.contains("nvidia.com/gpu") && out.contains("'web'"), "{out}");
}

/// The `ENV` settings of `dockerfile`'s final stage, as `(name, value)`.
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file(dockerfile)).unwrap();
    let joined = text.replace("\\\n", " ");
    let last_stage = joined.rsplit("\nFROM ").next().unwrap();
    last_stage
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Starts the binary with `dockerfile`'s environment, its paths moved under a temporary root
/// and the repository set to `repository` (a path inside the container); returns the server
/// (live) and the root.
async fn start_as_container(
    dockerfile: &str,
    repository: &str,
    add: impl FnOnce(&Path),
) -> (TestServer, tempfile::TempDir) {
    let env = dockerfile_env(dockerfile);
    let get = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the Dockerfile sets no {name}: {env:?}"))
    };
    assert_eq!(get("DISTILL_SERVE_MODEL_REPOSITORY"), "/models");
    assert_eq!(get("DISTILL_SERVE_HTTP_ADDR"), "0.0.0.0:8080");
    assert_eq!(get("DISTILL_SERVE_GRPC_ADDR"), "0.0.0.0:8081");
    // The container's paths, moved under a temporary root; the addresses moved to free
    // loopback ports (the launcher sets them); everything else as the image has it.
    let root = tempfile::tempdir().unwrap();
    let models = PathBuf::from(format!("{}{repository}", root.path().display()));
    add(&models);
    std::fs::create_dir_all(root.path().join("var/lib/distill-serve")).unwrap();
    let terminology = repo_file("tests/fixtures/terminology/icd10cm_tabular_small.xml");
    let moved: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.ends_with("_ADDR") && k != "ORT_DYLIB_PATH")
        .map(|(k, v)| {
            let v = match k.as_str() {
                "DISTILL_SERVE_TERMINOLOGIES" => format!("icd10cm=icd10cm-xml:{}", terminology.display()),
                "DISTILL_SERVE_MODEL_REPOSITORY" => models.display().to_string(),
                _ if v.starts_with('/') => format!("{}{v}", root.path().display()),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    let env_refs: Vec<(&str, &str)> = moved.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // No --model-repository flag: the repository comes from the environment, as in the image.
    let server = TestServer::start_in_env(tempfile::tempdir().unwrap(), models, &env_refs);
    (server, root)
}

/// Whether `server` is ready within a few seconds.
async fn becomes_ready(server: &TestServer) -> bool {
    TestServer::wait_for(Duration::from_secs(10), || async {
        reqwest::get(server.url("/v2/health/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
}

#[tokio::test]
async fn the_binary_serves_with_the_containers_environment() {
    let (server, root) = start_as_container("docker/Dockerfile", "/models", |models| {
        add_version(models, "tiny", 1, 1)
    })
    .await;
    assert!(
        becomes_ready(&server).await,
        "not ready with the container's environment"
    );
    let state = root.path().join("var/lib/distill-serve");
    assert!(state.join("store.sqlite3").is_file() && state.join("audit.jsonl").is_file());
}

/// The CUDA image's environment puts every model on the CUDA provider unless its `model.toml`
/// names another: in this build (no `cuda` feature, no GPU) such a model reports why it cannot
/// load, and one that asks for the CPU serves.
#[tokio::test]
async fn the_cuda_images_environment_puts_models_on_the_gpu_provider() {
    let env = dockerfile_env("docker/Dockerfile.cuda");
    assert!(
        env.contains(&("DISTILL_SERVE_EXECUTION_PROVIDER".into(), "cuda".into())),
        "{env:?}"
    );
    let (server, _root) = start_as_container("docker/Dockerfile.cuda", "/models", |models| {
        add_version(models, "gpu", 1, 1);
        add_version(models, "cpu", 1, 2);
        std::fs::write(models.join("cpu/model.toml"), "execution_provider = \"cpu\"\n").unwrap();
    })
    .await;
    let cpu_ready = TestServer::wait_for(Duration::from_secs(10), || async {
        reqwest::get(server.url("/v2/models/cpu/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(cpu_ready, "the model that asks for the CPU is not served");
    let r = reqwest::get(server.url("/v2/models/gpu/ready")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"].as_str().unwrap().to_lowercase();
    assert!(message.contains("cuda"), "{body}");
}

/// KServe's storage initializer puts one model's folder at `/mnt/models`: given as the
/// repository, it is served as that model.
#[tokio::test]
async fn a_single_model_folder_mounted_as_kserve_does_is_served() {
    let (server, _root) = start_as_container("docker/Dockerfile", "/mnt/models", |mount| {
        let parent = mount.parent().unwrap();
        add_version(parent, "models", 1, 1);
        std::fs::write(mount.join("model.toml"), "name = \"coder\"\n").unwrap();
    })
    .await;
    assert!(
        becomes_ready(&server).await,
        "not ready with the container's environment"
    );
    let list: serde_json::Value = reqwest::get(server.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], "coder", "{list}");
    let body = serde_json::json!({"model": "coder", "prompt": "The patient", "max_tokens": 2});
    assert_eq!(server.post("/v1/completions", &body).await.status(), 200);
    assert_eq!(
        reqwest::get(server.url("/v2/models/coder/ready"))
            .await
            .unwrap()
            .status(),
        200
    );
}

fn promtool() -> PathBuf {
    distill_serve::paths::setup_cache_dir().join("prometheus-2.42.0/promtool")
}

#[test]
fn the_alert_rules_pass_promtool() {
    let tool = promtool();
    let rules = repo_file("docker/prometheus/alerts.yaml");
    let (ok, out) = run(tool.to_str().unwrap(), &["check", "rules", rules.to_str().unwrap()]);
    assert!(ok && out.contains("SUCCESS"), "promtool:\n{out}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: rate(x[5m]\n",
    )
    .unwrap();
    assert!(!run(tool.to_str().unwrap(), &["check", "rules", bad.to_str().unwrap()]).0);
}

/// Every `distill_serve_*` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("distill_serve_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    common::server::add_trainable_version(&repo, "tiny", 1, 1);
    let server = TestServer::start_with_repo(dir, repo, &[]);
    let body = json!({"model": "tiny", "prompt": "The patient", "max_tokens": 4});
    assert_eq!(server.post("/v1/completions", &body).await.status(), 200);
    // A refresh job that fails at once (nothing listens on port 9) fills the job counter.
    let job = json!({"dataset": "notes", "prompts": [{"prompt": "x"}], "train": {"steps": 1},
                     "teacher": {"url": "http://127.0.0.1:9/v1", "model": "t", "max_retries": 0, "timeout_ms": 2000}});
    let started = server
        .admin(reqwest::Method::POST, "/admin/v1/models/tiny/refresh")
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202, "{}", started.text().await.unwrap());
    let id = started.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ended = TestServer::wait_for(Duration::from_secs(30), || async {
        server.admin_get(&format!("/admin/v1/jobs/{id}")).await["state"] == "failed"
    })
    .await;
    assert!(ended, "the job did not fail as expected");

    let exposition = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: std::collections::BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    let dashboard = std::fs::read_to_string(repo_file("docker/grafana/distill-serve.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).unwrap();
    let mut queries: Vec<String> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    queries.push(parsed["templating"]["list"][1]["query"].as_str().unwrap().to_string());
    queries.push(std::fs::read_to_string(repo_file("docker/prometheus/alerts.yaml")).unwrap());
    let wanted: std::collections::BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    assert!(wanted.len() >= 10, "{wanted:?}");
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{exposition}"
    );
}

#[test]
fn the_kserve_objects_hold_the_fields_kserve_defines() {
    let script = repo_file("tests/clients/check_kserve.py");
    let (runtime, service) = (
        repo_file("docker/kserve/servingruntime.yaml"),
        repo_file("docker/kserve/inferenceservice.yaml"),
    );
    let (ok, out) = run(
        "python3",
        &[
            script.to_str().unwrap(),
            runtime.to_str().unwrap(),
            service.to_str().unwrap(),
        ],
    );
    assert!(ok && out.trim() == "ok", "{out}");
    // The check has teeth: a runtime whose container KServe would not find fails it.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("runtime.yaml");
    let text = std::fs::read_to_string(&runtime)
        .unwrap()
        .replace("kserve-container", "server");
    std::fs::write(&bad, text).unwrap();
    let (ok, out) = run(
        "python3",
        &[
            script.to_str().unwrap(),
            bad.to_str().unwrap(),
            service.to_str().unwrap(),
        ],
    );
    assert!(!ok && out.contains("kserve-container"), "{out}");
}
