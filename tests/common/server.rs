//! A real `distill-serve serve` process on loopback, over a model repository of tiny students.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distill_serve::checkpoint::Family;
use distill_serve::export::{self, ExternalData, Form, Precision};
use distill_serve::tiny::{BertHeadArg, ShapePreset, TinySpec, write_tiny};
use tempfile::TempDir;

/// Admin token the test servers use.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Writes version `version` of model `name` (a tiny qwen2 of `seed`) into `repo`.
pub fn add_version(repo: &Path, name: &str, version: u32, seed: u64) {
    add_shaped_version(repo, name, version, seed, ShapePreset::Tiny);
}

/// As [`add_version`], with the student's dimensions from `shape` (`Mid`: the 16M-parameter
/// student, where a decode step costs milliseconds and batching pays as for real students).
pub fn add_shaped_version(repo: &Path, name: &str, version: u32, seed: u64, shape: ShapePreset) {
    add_exported_version(
        repo,
        name,
        version,
        (seed, shape),
        Precision::DEFAULT_INT8,
        Form::default(),
    );
}

/// Writes version `version` of model `name`: the qwen2 student of `(seed, shape)` exported at
/// `precision` in `form`.
pub fn add_exported_version(
    repo: &Path,
    name: &str,
    version: u32,
    (seed, shape): (u64, ShapePreset),
    precision: Precision,
    form: Form,
) {
    let work = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::new(Family::Qwen2, seed);
    spec.shape = shape;
    spec.init_std = (shape == ShapePreset::Tiny).then_some(0.3);
    write_tiny(&spec, work.path()).unwrap();
    let out = repo.join(name).join(version.to_string());
    export::export_form(work.path(), &out, precision, ExternalData::Never, form).unwrap();
    let toml = repo.join(name).join("model.toml");
    if !toml.exists() {
        std::fs::write(toml, format!("name = \"{name}\"\n")).unwrap();
    }
}

/// Writes version `version` of model `name` with its training checkpoint kept in
/// `<version>/checkpoint`, as refresh jobs need.
pub fn add_trainable_version(repo: &Path, name: &str, version: u32, seed: u64) {
    add_trainable_form(repo, name, version, seed, Form::default());
}

/// As [`add_trainable_version`], exported in `form`.
pub fn add_trainable_form(repo: &Path, name: &str, version: u32, seed: u64, form: Form) {
    let out = repo.join(name).join(version.to_string());
    let checkpoint = out.join("checkpoint");
    let mut spec = TinySpec::new(Family::Qwen2, seed);
    spec.init_std = Some(0.3);
    write_tiny(&spec, &checkpoint).unwrap();
    export::export_form(&checkpoint, &out, Precision::DEFAULT_INT8, ExternalData::Never, form).unwrap();
    std::fs::write(repo.join(name).join("model.toml"), format!("name = \"{name}\"\n")).unwrap();
}

/// An encoder version to write with [`add_encoder`].
pub struct EncoderSpec<'a> {
    pub family: Family,
    pub head: BertHeadArg,
    /// Written into `config.json` as `id2label` (not for an embedding model).
    pub labels: &'a [&'a str],
    pub multi_label: bool,
    pub precision: Precision,
}

/// Writes version 1 of encoder `name`: a tiny student of `spec` (seed 7, wide initial weights
/// so that outputs differ between inputs), exported.
pub fn add_encoder(repo: &Path, name: &str, spec: &EncoderSpec) {
    let work = tempfile::tempdir().unwrap();
    let mut tiny = TinySpec::new(spec.family, 7);
    tiny.bert_head = spec.head;
    tiny.num_labels = spec.labels.len();
    tiny.init_std = Some(0.2);
    write_tiny(&tiny, work.path()).unwrap();
    let config_path = work.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    if spec.head != BertHeadArg::Embedding {
        let id2label: serde_json::Map<String, serde_json::Value> = spec
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), (*l).into()))
            .collect();
        config["id2label"] = id2label.into();
    }
    if spec.multi_label {
        config["problem_type"] = "multi_label_classification".into();
    }
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = repo.join(name).join("1");
    export::export(work.path(), &out, spec.precision, ExternalData::Never).unwrap();
    std::fs::write(repo.join(name).join("model.toml"), format!("name = \"{name}\"\n")).unwrap();
}

/// A running server; killed on drop.
pub struct TestServer {
    server: super::launch::Launched,
    pub base: String,
    /// `http://host:port` of the gRPC listener.
    pub grpc: String,
    pub repo: PathBuf,
    _dir: TempDir,
}

impl TestServer {
    /// Starts a server over a repository with one model `tiny` (version 1), passing `extra`
    /// flags.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models");
        add_version(&repo, "tiny", 1, 1);
        Self::start_with_repo(dir, repo, extra)
    }

    /// Starts a server over `repo` (inside `dir`, kept alive with the server).
    pub fn start_with_repo(dir: TempDir, repo: PathBuf, extra: &[&str]) -> Self {
        Self::start_with_env(dir, repo, extra, &[])
    }

    /// As [`TestServer::start_with_repo`], with extra environment variables.
    pub fn start_with_env(dir: TempDir, repo: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let folder = repo.clone();
        let mut args: Vec<&OsStr> = vec!["--model-repository".as_ref(), folder.as_os_str()];
        if !extra.contains(&"--admin-token-file") {
            args.extend(["--admin-token", ADMIN_TOKEN].map(OsStr::new));
        }
        args.extend(extra.iter().map(OsStr::new));
        Self::launch(dir, repo, &args, env)
    }

    /// Starts a server configured by `env` alone (no flags but the launcher's addresses), as a
    /// container runs it; `repo` is where that environment puts the repository.
    pub fn start_in_env(dir: TempDir, repo: PathBuf, env: &[(&str, &str)]) -> Self {
        Self::launch(dir, repo, &[], env)
    }

    /// Starts the binary with `args` and `env` (logging at info) and waits until it listens.
    fn launch(dir: TempDir, repo: PathBuf, args: &[&OsStr], env: &[(&str, &str)]) -> Self {
        let mut env = env.to_vec();
        env.push(("RUST_LOG", "info"));
        // The server's log goes to the test's stderr, which the test runner shows when it fails.
        let server = super::launch::launch(super::binary(), args, &env, |l| eprintln!("server: {l}")).unwrap();
        Self {
            base: format!("http://{}", server.http),
            grpc: format!("http://{}", server.grpc),
            server,
            repo,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs each body to `path` one after another and returns the HTTP statuses.
    pub async fn statuses(&self, path: &str, bodies: impl IntoIterator<Item = serde_json::Value>) -> Vec<u16> {
        let mut statuses = Vec::new();
        for body in bodies {
            statuses.push(self.post(path, &body).await.status().as_u16());
        }
        statuses
    }

    /// The value of a metric line (name with labels, as printed) in `/metrics`.
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Polls `check` every 50 ms for up to `limit`.
    pub async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while start.elapsed() < limit {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl TestServer {
    /// Kills the process at once (SIGKILL, as a crash) and hands back its folder.
    pub fn crash(mut self) -> (TempDir, PathBuf) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (dir, self.repo.clone())
    }

    /// Sends SIGTERM, as Kubernetes does on every rollout.
    pub fn terminate(&self) {
        let pid = self.server.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.server.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// An authorised admin request.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// Starts a refresh job of `model` with `job` (it must be accepted); its id.
    pub async fn start_refresh(&self, model: &str, job: &serde_json::Value) -> String {
        let r = self
            .admin(reqwest::Method::POST, &format!("/admin/v1/models/{model}/refresh"))
            .json(job)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        let v: serde_json::Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// Polls job `id` until it ends (at most `limit`); the job.
    pub async fn finished_job(&self, id: &str, limit: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let j = self.admin_get(&format!("/admin/v1/jobs/{id}")).await;
            if ["succeeded", "rejected", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()) {
                return j;
            }
            assert!(start.elapsed() < limit, "job still {} after {limit:?}: {j}", j["stage"]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GETs the admin route `path` and parses its JSON answer.
    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        self.admin(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}
