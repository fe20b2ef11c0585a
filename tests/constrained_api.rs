//! Terminology constraints over the wire: a real server with the test ICD-10-CM extract loaded
//! answers only with members of it, through both OpenAI routes; bad constraints are 400s.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::server::{ADMIN_TOKEN, TestServer};
use distill_serve::constrain::load_icd10cm_xml;
use serde_json::{Value, json};

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/terminology/icd10cm_tabular_small.xml")
        .display()
        .to_string()
}

fn server() -> TestServer {
    TestServer::start(&["--terminology", &format!("icd=icd10cm-xml:{}", fixture())])
}

/// Billable codes and their terms in the fixture.
fn members() -> (BTreeSet<String>, BTreeSet<String>) {
    let t = load_icd10cm_xml(Path::new(&fixture())).unwrap();
    let billable: Vec<_> = t.entries.iter().filter(|e| e.billable).collect();
    let codes = billable.iter().map(|e| e.code.clone()).collect();
    let terms = billable
        .iter()
        .flat_map(|e| std::iter::once(e.description.clone()).chain(e.synonyms.iter().cloned()))
        .collect();
    (codes, terms)
}

async fn complete(server: &TestServer, constraint: Value, seed: u64, temperature: f32) -> (String, String) {
    let body = json!({"model": "tiny", "prompt": "Code for the patient:", "max_tokens": 400,
                      "temperature": temperature, "seed": seed, "constraint": constraint});
    let r = server.post("/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let choice = &v["choices"][0];
    (
        choice["text"].as_str().unwrap().to_string(),
        choice["finish_reason"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn constrained_answers_are_members_of_the_terminology() {
    let server = server();
    let (codes, terms) = members();
    for seed in 0..6 {
        let temperature = if seed == 0 { 0.0 } else { 1.0 };
        let (text, reason) = complete(&server, json!({"terminology": "icd"}), seed, temperature).await;
        assert!(codes.contains(&text), "{text:?} is not a billable code");
        assert_eq!(reason, "stop");
        let (text, _) = complete(
            &server,
            json!({"terminology": "icd", "match": "term"}),
            seed,
            temperature,
        )
        .await;
        assert!(terms.contains(&text), "{text:?} is not a term");
        let constraint = json!({"terminology": "icd", "max_items": 3, "separator": "; ", "code_format": "compact"});
        let (text, _) = complete(&server, constraint, seed, temperature).await;
        let items: Vec<&str> = text.split("; ").collect();
        assert!((1..=3).contains(&items.len()), "{text:?}");
        let compact: BTreeSet<String> = codes.iter().map(|c| c.replace('.', "")).collect();
        assert!(items.iter().all(|item| compact.contains(*item)), "{text:?}");
    }
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Code?"}], "max_tokens": 50,
                      "temperature": 0.8, "seed": 1, "constraint": {"terminology": "icd"}});
    let v: Value = server.post("/v1/chat/completions", &body).await.json().await.unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(codes.contains(text), "{text:?}");
}

#[tokio::test]
async fn bad_constraints_are_400_naming_the_problem() {
    let server = server();
    let cases = [
        (
            json!({"terminology": "snomed"}),
            "unknown terminology `snomed` (loaded: icd)",
        ),
        (json!({"terminology": "icd", "max_items": 0}), "max_items"),
        (
            json!({"terminology": "icd", "max_items": 2, "separator": ""}),
            "separator",
        ),
        (
            json!({"terminology": "icd", "match": "everything"}),
            "unknown variant `everything`",
        ),
        (json!({"terminology": "icd", "colour": "red"}), "colour"),
        // Each distinct separator caches a start mask: their length is bounded (issue 13).
        (
            json!({"terminology": "icd", "max_items": 2, "separator": "; ".repeat(17)}),
            "at most 32 bytes",
        ),
        (
            json!({"terminology": "icd", "subset": "<< 404684003"}),
            "subset part `<< 404684003` is not an ICD-10-CM code or range",
        ),
        (
            json!({"terminology": "icd", "subset": "chapter:2"}),
            "this release has no such chapter (it has: 4, 9, 19)",
        ),
        (
            json!({"terminology": "icd", "subset": ["I25-I20"]}),
            "its start comes after its end",
        ),
        (
            json!({"terminology": "icd", "subset": "A00-A09"}),
            "has nothing in this subset to match",
        ),
    ];
    for (constraint, needle) in cases {
        let body = json!({"model": "tiny", "prompt": "x", "constraint": constraint});
        let r = server.post("/v1/completions", &body).await;
        assert_eq!(r.status(), 400, "{constraint}");
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{constraint}: {message}");
    }
}

/// Answers constrained to a subset (a range, a category, a list) are members of it, as codes and
/// as terms; the same subset without it would allow the others.
#[tokio::test]
async fn subset_constraints_answer_only_codes_of_the_subset() {
    let server = server();
    let t = load_icd10cm_xml(Path::new(&fixture())).unwrap();
    let billable: Vec<_> = t.entries.iter().filter(|e| e.billable).collect();
    // Independently of the server's subset matching: the categories by their first letters.
    let injuries: BTreeSet<&str> = billable
        .iter()
        .filter(|e| e.code.starts_with('S'))
        .map(|e| e.code.as_str())
        .collect();
    let metabolic: BTreeSet<&str> = billable
        .iter()
        .filter(|e| e.code.starts_with("E11") || e.code == "I10")
        .map(|e| e.code.as_str())
        .collect();
    let injury_terms: BTreeSet<String> = billable
        .iter()
        .filter(|e| e.code.starts_with('S'))
        .flat_map(|e| std::iter::once(e.description.clone()).chain(e.synonyms.iter().cloned()))
        .collect();
    // Each subset leaves out codes the terminology has.
    assert!(injuries.len() > 1 && injuries.len() < billable.len());
    assert!(metabolic.len() > 1 && metabolic.len() < billable.len());
    for seed in 0..6 {
        let temperature = if seed == 0 { 0.0 } else { 1.0 };
        let (text, reason) = complete(
            &server,
            json!({"terminology": "icd", "subset": "S00-T88"}),
            seed,
            temperature,
        )
        .await;
        assert!(injuries.contains(text.as_str()), "{text:?} is not in S00-T88");
        assert_eq!(reason, "stop");
        let subset = json!({"terminology": "icd", "subset": ["E11", "I10"], "max_items": 2, "separator": "; "});
        let (text, _) = complete(&server, subset, seed, temperature).await;
        assert!(
            text.split("; ").all(|c| metabolic.contains(c)),
            "{text:?} is not in E11, I10"
        );
        let (text, _) = complete(
            &server,
            json!({"terminology": "icd", "subset": "chapter:9"}),
            seed,
            temperature,
        )
        .await;
        assert_eq!(text, "I10", "chapter 9 of the fixture has one billable code");
        let terms = json!({"terminology": "icd", "subset": "S06-S72.9", "match": "term"});
        let (text, _) = complete(&server, terms, seed, temperature).await;
        assert!(injury_terms.contains(&text), "{text:?} is not a term of S06-S72.9");
    }
}

#[tokio::test]
async fn the_admin_api_lists_loaded_terminologies() {
    let server = server();
    let v: Value = reqwest::Client::new()
        .get(server.url("/admin/v1/terminologies"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = &v["terminologies"][0];
    assert_eq!(t["name"], "icd");
    assert_eq!(t["kind"], "icd10cm-xml");
    assert_eq!(
        (t["stats"]["codes"].as_u64(), t["stats"]["billable"].as_u64()),
        (Some(28), Some(15))
    );
}

#[tokio::test]
async fn grpc_generate_takes_the_same_constraint() {
    use distill_serve::api::grpc::proto::generate::{Constraint, GenerateRequest, generate_client::GenerateClient};
    let server = server();
    let (codes, _) = members();
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let request = |constraint: Constraint, seed: u64| GenerateRequest {
        model: "tiny".into(),
        prompt: "Code:".into(),
        max_tokens: Some(100),
        temperature: Some(1.0),
        seed: Some(seed),
        constraint: Some(constraint),
        ..Default::default()
    };
    for seed in 0..4 {
        let constraint = Constraint {
            terminology: "icd".into(),
            ..Default::default()
        };
        let answer = client.generate(request(constraint, seed)).await.unwrap().into_inner();
        assert!(codes.contains(&answer.text), "{:?}", answer.text);
        let constraint = Constraint {
            terminology: "icd".into(),
            subset: vec!["S00-T88".into()],
            ..Default::default()
        };
        let answer = client.generate(request(constraint, seed)).await.unwrap().into_inner();
        assert!(
            answer.text.starts_with('S') && codes.contains(&answer.text),
            "{:?}",
            answer.text
        );
    }
    let bad = Constraint {
        terminology: "icd".into(),
        r#match: "everything".into(),
        ..Default::default()
    };
    let status = client.generate(request(bad, 0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("everything"), "{}", status.message());
    let bad = Constraint {
        terminology: "icd".into(),
        subset: vec!["<< 404684003".into()],
        ..Default::default()
    };
    let status = client.generate(request(bad, 0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("not an ICD-10-CM code"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn knowledge_coverage_counts_code_mentions_that_exist() {
    let server = server();
    let text = "Assessment: E11.9 and I10, rule out E11.99; fracture S72001A.";
    let r = server
        .post("/v1/terminologies/icd/coverage", &json!({"text": text}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["mentions"].as_u64(), v["matched"].as_u64()),
        (Some(4), Some(3)),
        "{v}"
    );
    assert_eq!(v["items"][2]["text"], "E11.99");
    assert!(v["items"][2]["code"].is_null());
    assert_eq!(v["items"][3]["code"], "S72.001A");
    let r = server
        .post("/v1/terminologies/snomed/coverage", &json!({"text": text}))
        .await;
    assert_eq!(r.status(), 404);
    let r = server
        .post("/v1/terminologies/icd/coverage", &json!({"txt": text}))
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn json_schema_records_hold_valid_codes() {
    let server = server();
    let (codes, terms) = members();
    let schema = json!({"type": "object", "properties": {
        "diagnosis": {"type": "string", "x-terminology": "icd"},
        "description": {"type": "string", "x-terminology": "icd", "x-match": "term"},
        "confirmed": {"type": "boolean"},
        "other_codes": {"type": "array", "items": {"type": "string", "x-terminology": "icd"}, "maxItems": 2},
        "injury": {"type": "string", "x-terminology": "icd", "x-subset": ["S00-T88"]}
    }});
    let format = json!({"type": "json_schema", "json_schema": {"name": "coding", "schema": schema, "strict": true}});
    for seed in 0..5 {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Code this."}],
                          "max_tokens": 400, "temperature": 1.0, "seed": seed, "response_format": format});
        let r = server.post("/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let record: serde_json::Map<String, Value> =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let keys: Vec<&str> = record.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["diagnosis", "description", "confirmed", "other_codes", "injury"],
            "{text}"
        );
        assert!(codes.contains(record["diagnosis"].as_str().unwrap()), "{text}");
        assert!(terms.contains(record["description"].as_str().unwrap()), "{text}");
        assert!(record["confirmed"].is_boolean());
        let others = record["other_codes"].as_array().unwrap();
        assert!((1..=2).contains(&others.len()), "{text}");
        assert!(others.iter().all(|c| codes.contains(c.as_str().unwrap())), "{text}");
        let injury = record["injury"].as_str().unwrap();
        assert!(injury.starts_with('S') && codes.contains(injury), "{text}");
    }
    let bad = json!({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"x": {"type": "number"}}}}});
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": bad});
    let r = server.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("property `x`"), "{v}");
}
