//! Authentication on every protocol: named API keys from a file (reloaded on change) with
//! per-key limits and a tenant label on the request metrics, the admin token from a file, an
//! audit line for every admin action and failed authentication, and `/metrics` protected on
//! request.

mod common;

use std::path::Path;
use std::time::Duration;

use common::server::TestServer;
use distill_serve::api::grpc::proto::generate::{GenerateRequest, generate_client::GenerateClient};
use serde_json::{Value, json};
use tonic::Code;

const QUIET: &str = "sk-quiet-0123456789abcdef";
const NOISY: &str = "sk-noisy-0123456789abcdef";
const LATE: &str = "sk-late-0123456789abcdef";

fn keys_file(path: &Path, extra: &str) {
    let text = format!(
        "[[keys]]\nname = \"quiet\"\nkey = \"{QUIET}\"\n\n\
         [[keys]]\nname = \"noisy\"\nkey = \"{NOISY}\"\nrequests_per_second = 1\n{extra}"
    );
    std::fs::write(path, text).unwrap();
}

async fn complete(server: &TestServer, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(server.url("/v1/completions")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

fn small() -> Value {
    json!({"model": "tiny", "prompt": "The patient", "max_tokens": 2})
}

#[tokio::test]
async fn tenants_from_a_keys_file_are_limited_one_by_one_labelled_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    keys_file(&keys, "");
    let server = TestServer::start(&["--api-keys-file", keys.to_str().unwrap()]);

    // Five requests of the noisy key at once: its one request per second lets one through and
    // refuses the rest; the quiet key, at the same time, is served every time.
    let body = small();
    let noisy = futures::future::join_all((0..5).map(|_| complete(&server, Some(NOISY), &body))).await;
    let quiet = futures::future::join_all((0..3).map(|_| complete(&server, Some(QUIET), &body))).await;
    assert!(quiet.iter().all(|a| a.status() == 200));
    let statuses: Vec<u16> = noisy.iter().map(|a| a.status().as_u16()).collect();
    assert!(statuses.contains(&200) && statuses.contains(&429), "{statuses:?}");
    for answer in noisy.into_iter().filter(|a| a.status() == 429) {
        assert!(answer.headers().contains_key("retry-after"));
        let body: Value = answer.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("noisy") && message.contains("requests_per_second"),
            "{message}"
        );
    }
    for key in [None, Some("sk-wrong-0123456789abcdef")] {
        let answer = complete(&server, key, &small()).await;
        assert_eq!(answer.status(), 401, "{key:?}");
        assert_eq!(answer.headers()["www-authenticate"], "Bearer");
    }
    let quiet_served =
        "distill_serve_requests_total{endpoint=\"completions\",model=\"tiny\",outcome=\"success\",tenant=\"quiet\"}";
    assert_eq!(server.metric(quiet_served).await, 3.0);

    // gRPC asks the same keys.
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let generate = |key: Option<&str>| {
        let mut request = tonic::Request::new(GenerateRequest {
            model: "tiny".into(),
            prompt: "The patient".into(),
            max_tokens: Some(2),
            ..Default::default()
        });
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        request
    };
    assert_eq!(
        client.generate(generate(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert!(client.generate(generate(Some(QUIET))).await.is_ok());
    let grpc_served =
        "distill_serve_requests_total{endpoint=\"generate\",model=\"tiny\",outcome=\"success\",tenant=\"quiet\"}";
    assert_eq!(server.metric(grpc_served).await, 1.0);

    // A new key works once the file changes, without a restart.
    keys_file(&keys, &format!("\n[[keys]]\nname = \"late\"\nkey = \"{LATE}\"\n"));
    let reloaded = TestServer::wait_for(Duration::from_secs(10), || async {
        complete(&server, Some(LATE), &small()).await.status() == 200
    })
    .await;
    assert!(reloaded, "the new key was not accepted after the file changed");
    // A broken file keeps the keys in force.
    std::fs::write(&keys, "[[keys]]\nname = \"x\"\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(complete(&server, Some(LATE), &small()).await.status(), 200);
}

#[tokio::test]
async fn a_key_is_held_to_its_concurrency_and_tokens_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let text = format!(
        "[[keys]]\nname = \"one\"\nkey = \"{QUIET}\"\nmax_concurrent_requests = 1\n\n\
         [[keys]]\nname = \"budget\"\nkey = \"{NOISY}\"\ntokens_per_minute = 60\n"
    );
    std::fs::write(&keys, text).unwrap();
    let server = TestServer::start(&["--api-keys-file", keys.to_str().unwrap()]);

    // A long stream holds the key's one place; a second request is refused while it runs.
    let long =
        json!({"model": "tiny", "prompt": "The patient", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let mut stream = complete(&server, Some(QUIET), &long).await;
    assert_eq!(stream.status(), 200);
    stream.chunk().await.unwrap().expect("a first event");
    let refused = complete(&server, Some(QUIET), &small()).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrent_requests"),
        "{body}"
    );
    drop(stream);
    let freed = TestServer::wait_for(Duration::from_secs(10), || async {
        complete(&server, Some(QUIET), &small()).await.status() == 200
    })
    .await;
    assert!(freed, "the place was not given back when the stream was dropped");

    // 60 tokens a minute: a request that may use more is refused outright (400, no retry
    // helps); then requests of ~25 tokens pass twice and the third waits (429).
    let too_big = complete(
        &server,
        Some(NOISY),
        &json!({"model": "tiny", "prompt": "x", "max_tokens": 100}),
    )
    .await;
    assert_eq!(too_big.status(), 400);
    let body: Value = too_big.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("tokens_per_minute"),
        "{body}"
    );
    let quarter = json!({"model": "tiny", "prompt": "x", "max_tokens": 24});
    let statuses = [
        complete(&server, Some(NOISY), &quarter).await.status().as_u16(),
        complete(&server, Some(NOISY), &quarter).await.status().as_u16(),
        complete(&server, Some(NOISY), &quarter).await.status().as_u16(),
    ];
    assert_eq!(statuses, [200, 200, 429]);
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn admin_actions_and_failed_logins_are_audited_and_the_admin_token_file_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let (token_file, audit) = (dir.path().join("admin-token"), dir.path().join("audit.jsonl"));
    let token = "admin-0123456789abcdef";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let server = TestServer::start(&[
        "--admin-token-file",
        token_file.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
        "--api-key",
        QUIET,
    ]);
    let http = reqwest::Client::new();
    let admin = |path: &str, token: Option<&str>| {
        let mut request = http.post(server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
    };
    let steps = [
        ("/admin/v1/models/tiny/unload", Some(token), "", 200),
        ("/admin/v1/models/tiny/load", Some(token), "", 200),
        ("/admin/v1/models/tiny/reload", Some(token), "", 200),
        (
            "/admin/v1/datasets/notes",
            Some(token),
            "{\"prompt\": \"hello\"}\n",
            200,
        ),
        ("/admin/v1/jobs/job-nope/cancel", Some(token), "", 404),
        ("/admin/v1/models/tiny/unload", None, "", 401),
        ("/admin/v1/models/tiny/unload", Some("not-the-token"), "", 403),
    ];
    for (path, token, body, status) in steps {
        let answer = admin(path, token).body(body).send().await.unwrap();
        assert_eq!(answer.status(), status, "{path}: {}", answer.text().await.unwrap());
    }
    assert_eq!(complete(&server, Some("sk-wrong"), &small()).await.status(), 401);

    let expected = [
        ("admin", "unload", "tiny", "success"),
        ("admin", "load", "tiny", "success"),
        ("admin", "reload", "tiny", "success"),
        ("admin", "dataset_upload", "notes", "success"),
        ("admin", "job_cancel", "job-nope", "failed: 404"),
        (
            "anonymous",
            "authenticate",
            "/admin/v1/models/tiny/unload",
            "denied: missing admin token",
        ),
        (
            "anonymous",
            "authenticate",
            "/admin/v1/models/tiny/unload",
            "denied: wrong admin token",
        ),
        (
            "anonymous",
            "authenticate",
            "/v1/completions",
            "denied: unknown API key",
        ),
    ];
    let mut lines = Vec::new();
    TestServer::wait_for(Duration::from_secs(5), || {
        lines = audit_lines(&audit);
        std::future::ready(lines.len() >= expected.len())
    })
    .await;
    let seen: Vec<(&str, &str, &str, &str)> = lines
        .iter()
        .map(|l| {
            let field = |k: &str| l[k].as_str().unwrap_or("");
            (field("actor"), field("action"), field("target"), field("outcome"))
        })
        .collect();
    assert_eq!(seen, expected);
    for line in &lines {
        assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z') && line["request_id"].is_string());
        assert!(
            !line.to_string().contains("hello"),
            "an uploaded prompt reached the audit log: {line}"
        );
    }

    // Rotating the token file changes the token without a restart.
    let rotated = "admin-rotated-0123456789";
    std::fs::write(&token_file, rotated).unwrap();
    let switched = TestServer::wait_for(Duration::from_secs(10), || async {
        let list = http
            .get(server.url("/admin/v1/models"))
            .bearer_auth(rotated)
            .send()
            .await
            .unwrap();
        list.status() == 200
    })
    .await;
    assert!(switched, "the rotated admin token was not accepted");
    let old = http
        .get(server.url("/admin/v1/models"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 403);
}

#[tokio::test]
async fn protected_metrics_ask_for_a_key_and_probes_stay_open() {
    let server = TestServer::start(&["--api-key", QUIET, "--protect-metrics"]);
    let http = reqwest::Client::new();
    assert_eq!(http.get(server.url("/metrics")).send().await.unwrap().status(), 401);
    let with_key = http
        .get(server.url("/metrics"))
        .bearer_auth(QUIET)
        .send()
        .await
        .unwrap();
    assert_eq!(with_key.status(), 200);
    assert!(with_key.text().await.unwrap().contains("distill_serve_"));
    let with_admin = http
        .get(server.url("/metrics"))
        .bearer_auth(common::server::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(with_admin.status(), 200);
    for probe in [
        "/v2/health/live",
        "/v2/health/ready",
        "/health",
        "/v2/models/tiny/ready",
    ] {
        assert_eq!(
            http.get(server.url(probe)).send().await.unwrap().status(),
            200,
            "{probe}"
        );
    }
}

/// Admin routes take model names, never paths: `..%2F` and absolute paths are refused and
/// nothing outside the repository is loaded or shown.
#[tokio::test]
async fn model_names_cannot_reach_outside_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    common::server::add_version(&repo, "tiny", 1, 1);
    common::server::add_version(dir.path(), "outside", 1, 2);
    let outside = dir.path().join("outside");
    // Without a declared name, any folder name would pass the name check of model.toml.
    std::fs::write(outside.join("model.toml"), "").unwrap();
    let absolute = outside.to_str().unwrap().replace('/', "%2F");
    let server = TestServer::start_with_repo(dir, repo, &[]);
    let http = reqwest::Client::new();
    for name in ["..%2Foutside", absolute.as_str(), "..", ".hidden", "a%20b"] {
        for verb in ["load", "reload"] {
            let r = http
                .post(server.url(&format!("/admin/v1/models/{name}/{verb}")))
                .bearer_auth(common::server::ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            assert!(status == 400 || status == 404, "{name} {verb}: {status} {body}");
            if status == 400 {
                assert!(
                    body["error"]["message"].as_str().unwrap().contains("model folder name"),
                    "{body}"
                );
            }
        }
    }
    for listing in ["/v1/models", "/metrics"] {
        let text = http
            .get(server.url(listing))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains("outside") && !text.contains(".."), "{listing}: {text}");
    }
}

/// The dataset store (captured prompts, teacher outputs) is its owner's only; the admin API
/// reads it a page at a time, deletes datasets, and can be kept from reading it at all.
#[tokio::test]
async fn datasets_are_private_paged_deletable_and_reading_them_can_be_turned_off() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start(&[]);
    let store = server.repo.join(".distill");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("store.sqlite3")), 0o600);
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str| {
        http.request(method, server.url(path))
            .bearer_auth(common::server::ADMIN_TOKEN)
    };
    let lines: String = (0..5).map(|i| format!("{{\"prompt\": \"note {i}\"}}\n")).collect();
    let upload = admin(reqwest::Method::POST, "/admin/v1/datasets/notes")
        .body(lines.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let page = |query: &'static str| {
        let request = admin(reqwest::Method::GET, &format!("/admin/v1/datasets/notes{query}"));
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = page("?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(
        (first["total"].as_u64(), first["next_offset"].as_u64()),
        (Some(5), Some(2))
    );
    assert_eq!(first["prompts"].as_array().unwrap().len(), 2);
    let (_, last) = page("?offset=4&limit=2").await;
    assert_eq!(last["prompts"].as_array().unwrap().len(), 1);
    assert!(last["next_offset"].is_null());
    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?page=2"] {
        assert_eq!(page(bad).await.0, 400, "{bad}");
    }
    let deleted = admin(reqwest::Method::DELETE, "/admin/v1/datasets/notes")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.json::<Value>().await.unwrap()["deleted"], 5);
    assert_eq!(page("").await.0, 404);
    // The audit writer appends on its own thread: the lines may trail the answers.
    let audited = |lines: &[Value]| {
        lines
            .iter()
            .any(|l| l["action"] == "dataset_delete" && l["outcome"] == "success")
            && lines
                .iter()
                .any(|l| l["action"] == "dataset_read" && l["actor"] == "admin")
    };
    let seen = TestServer::wait_for(Duration::from_secs(5), || {
        std::future::ready(audited(&audit_lines(&store.join("audit.jsonl"))))
    })
    .await;
    assert!(seen, "{:?}", audit_lines(&store.join("audit.jsonl")));

    let closed = TestServer::start(&["--no-dataset-read"]);
    let upload = http
        .post(closed.url("/admin/v1/datasets/notes"))
        .bearer_auth(common::server::ADMIN_TOKEN)
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let read = http
        .get(closed.url("/admin/v1/datasets/notes"))
        .bearer_auth(common::server::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 403);
}
