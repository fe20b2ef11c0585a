//! Terminologies as a service over the wire: constrained answers inside SNOMED CT expression
//! constraints and ICD-10-CM ranges (a property test over random students and subsets), the
//! FHIR terminology operations, and a release switched under load.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Lcg;
use common::server::{TestServer, add_version};
use distill_serve::constrain::{SubsetText, Terminologies, TerminologySpec};
use serde_json::{Value, json};

const SCT_VERSION: &str = "http://snomed.info/sct/9990000001/version/20260301";

fn icd_fixture() -> PathBuf {
    common::repo_file("tests/fixtures/terminology/icd10cm_tabular_small.xml")
}

fn specs() -> [String; 2] {
    [
        format!("icd=icd10cm-xml:{}", icd_fixture().display()),
        format!(
            "sct=snomed-rf2:{}",
            common::repo_file("tests/fixtures/snomed").display()
        ),
    ]
}

/// A server over `students` tiny models (`s0`, `s1`, ...; random weights of different seeds)
/// with the ICD-10-CM and SNOMED CT fixtures loaded.
fn server(students: u64) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    for i in 0..students {
        add_version(&repo, &format!("s{i}"), 1, 100 + i);
    }
    let [icd, sct] = specs();
    TestServer::start_with_repo(dir, repo, &["--terminology", &icd, "--terminology", &sct])
}

/// The codes of `subset`, as the library selects them (billable ones: what answers may be).
fn members(terminologies: &Terminologies, name: &str, subset: &str) -> BTreeSet<String> {
    let selected = terminologies
        .select(name, Some(&SubsetText::One(subset.into())))
        .unwrap();
    selected
        .members
        .iter()
        .map(|&i| &selected.terminology.entries[i])
        .filter(|e| e.billable)
        .map(|e| e.code.clone())
        .collect()
}

/// A random subset of one of the fixtures: (terminology, subset).
fn random_subset(rng: &mut Lcg) -> (&'static str, String) {
    const CONCEPTS: [&str; 8] = [
        "1000010", "1000020", "1000030", "1000040", "1000080", "1000100", "1000110", "1000070",
    ];
    if rng.below(2) == 0 {
        let op = rng.pick(&["<<", "<", "<!"]);
        let a = format!("{op} {}", rng.pick(&CONCEPTS));
        let subset = match rng.below(4) {
            0 => a,
            1 => format!("{a} OR ^ {}", rng.pick(&["1000300", "1000310"])),
            2 => format!("{a} MINUS {}", rng.pick(&CONCEPTS)),
            _ => format!("{a} OR {}", rng.pick(&CONCEPTS)),
        };
        ("sct", subset)
    } else {
        let subset = rng.pick(&[
            "E11-E11.9",
            "I20-I25",
            "E11.6, I21",
            "chapter:4",
            "chapter:9",
            "S72-T88",
            "E08-E13",
        ]);
        ("icd", subset.to_string())
    }
}

#[tokio::test]
async fn every_answer_is_a_member_of_its_subset() {
    let server = server(3);
    let [icd, sct] = specs().map(|s| s.parse::<TerminologySpec>().unwrap());
    let library = Terminologies::load(&[icd, sct]).unwrap();
    let mut rng = Lcg(2026);
    let (mut answered, mut multi) = (0, 0);
    for case in 0..30 {
        let (terminology, subset) = random_subset(&mut rng);
        let expected = members(&library, terminology, &subset);
        let max_items = 1 + rng.below(3);
        let model = format!("s{}", rng.below(3));
        let body = json!({"model": model, "prompt": "Codes:", "max_tokens": 200, "temperature": 1.0,
                          "seed": case, "constraint": {"terminology": terminology, "subset": subset,
                          "max_items": max_items, "separator": "; "}});
        let r = server.post("/v1/completions", &body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        if expected.is_empty() {
            assert_eq!(status, 400, "{subset}: {v}");
            assert_eq!(v["error"]["param"], "constraint.subset", "{v}");
            continue;
        }
        assert_eq!(status, 200, "{terminology} {subset}: {v}");
        let text = v["choices"][0]["text"].as_str().unwrap();
        let items: Vec<&str> = text.split("; ").collect();
        assert!((1..=max_items).contains(&items.len()), "{subset}: {text:?}");
        for item in &items {
            assert!(
                expected.contains(*item),
                "{subset} ({model}): {item:?} is not a member of {expected:?}"
            );
        }
        let named = &v["terminologies"][0];
        assert_eq!(named["terminology"], terminology, "{v}");
        let release = if terminology == "sct" { SCT_VERSION } else { "2026" };
        assert_eq!(named["release"], release, "{v}");
        assert!(named["subset"].is_string(), "{v}");
        answered += 1;
        multi += usize::from(items.len() > 1);
    }
    assert!(
        answered >= 15 && multi >= 3,
        "{answered} answered, {multi} with several items"
    );
}

#[tokio::test]
async fn grpc_and_streams_name_the_release() {
    let server = server(1);
    let body = json!({"model": "s0", "prompt": "Code:", "max_tokens": 40, "stream": true,
                      "constraint": {"terminology": "sct", "subset": "<< 1000020 |Disorder of heart|"}});
    let text = server.post("/v1/completions", &body).await.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["terminologies"][0]["release"], SCT_VERSION, "{last}");
    assert_eq!(last["terminologies"][0]["subset"], "<< 1000020");
    assert!(chunks[0].get("terminologies").is_none(), "{}", chunks[0]);

    use distill_serve::api::grpc::proto::generate::{Constraint, GenerateRequest, generate_client::GenerateClient};
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let request = GenerateRequest {
        model: "s0".into(),
        prompt: "Code:".into(),
        max_tokens: Some(40),
        constraint: Some(Constraint {
            terminology: "icd".into(),
            subset: vec!["I10-I25".into(), "E11.6".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = client.generate(request).await.unwrap().into_inner();
    let release = &answer.terminologies[0];
    assert_eq!(
        (release.terminology.as_str(), release.release.as_str()),
        ("icd", "2026")
    );
    assert_eq!(release.subset, "E116,I10-I25");
}

async fn get(server: &TestServer, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(server.url(path))
        .query(query)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers()["content-type"], "application/fhir+json", "{path} {query:?}");
    (status, r.json().await.unwrap())
}

/// The value of parameter `name` of a FHIR `Parameters` resource.
fn parameter<'a>(parameters: &'a Value, name: &str) -> Option<&'a Value> {
    parameters["parameter"].as_array()?.iter().find(|p| p["name"] == name)
}

fn outcome(v: &Value, code: &str) -> String {
    assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
    assert_eq!(v["issue"][0]["code"], code, "{v}");
    v["issue"][0]["diagnostics"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn fhir_validate_code_and_lookup() {
    let server = server(1);
    let icd = "http://hl7.org/fhir/sid/icd-10-cm";
    let validate = "/fhir/CodeSystem/$validate-code";
    let (status, v) = get(&server, validate, &[("url", icd), ("code", "E11.9")]).await;
    assert_eq!(status, 200);
    assert_eq!(v["resourceType"], "Parameters");
    assert_eq!(parameter(&v, "result").unwrap()["valueBoolean"], true, "{v}");
    assert_eq!(parameter(&v, "version").unwrap()["valueString"], "2026");
    assert_eq!(
        parameter(&v, "display").unwrap()["valueString"],
        "Type 2 diabetes mellitus without complications"
    );
    let (_, v) = get(&server, validate, &[("url", icd), ("code", "E11.99")]).await;
    assert_eq!(parameter(&v, "result").unwrap()["valueBoolean"], false, "{v}");
    assert!(
        parameter(&v, "message").unwrap()["valueString"]
            .as_str()
            .unwrap()
            .contains("Unknown code")
    );
    let (_, v) = get(
        &server,
        validate,
        &[("url", "icd"), ("code", "E11.9"), ("display", "Diabetes")],
    )
    .await;
    assert_eq!(parameter(&v, "result").unwrap()["valueBoolean"], false, "{v}");
    let (status, v) = get(
        &server,
        validate,
        &[("url", icd), ("code", "E11.9"), ("version", "2019")],
    )
    .await;
    assert_eq!(status, 404);
    assert!(outcome(&v, "not-found").contains("no release `2019`"));
    let (status, v) = get(&server, validate, &[("url", "http://loinc.org"), ("code", "1-8")]).await;
    assert_eq!(status, 404);
    outcome(&v, "not-found");
    let (status, v) = get(&server, validate, &[("url", icd)]).await;
    assert_eq!(status, 400);
    assert!(outcome(&v, "required").contains("`code`"));

    let lookup = "/fhir/CodeSystem/$lookup";
    let (status, v) = get(
        &server,
        lookup,
        &[("system", "http://snomed.info/sct"), ("code", "1000070")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        parameter(&v, "display").unwrap()["valueString"],
        "Cardiopulmonary disorder (disorder)"
    );
    assert_eq!(parameter(&v, "version").unwrap()["valueString"], SCT_VERSION);
    let designation = parameter(&v, "designation").unwrap();
    assert_eq!(designation["part"][0]["valueString"], "Heart and lung disorder");
    let parents: BTreeSet<&str> = v["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "property" && p["part"][0]["valueCode"] == "parent")
        .map(|p| p["part"][1]["valueCode"].as_str().unwrap())
        .collect();
    assert_eq!(parents, BTreeSet::from(["1000020", "1000030"]));
    let (status, v) = get(&server, lookup, &[("system", "sct"), ("code", "1000130")]).await;
    assert_eq!(status, 404, "a concept with no active description is unknown: {v}");
    assert!(outcome(&v, "not-found").contains("1000130"));
    let (_, v) = get(&server, lookup, &[("system", "icd"), ("code", "E11")]).await;
    let billable = v["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["part"][0]["valueCode"] == "billable")
        .unwrap();
    assert_eq!(billable["part"][1]["valueBoolean"], false, "{v}");
    // The tabular tree: a category sits in its block, and holds its codes.
    let related = |v: &Value, kind: &str| -> BTreeSet<String> {
        v["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "property" && p["part"][0]["valueCode"] == kind)
            .map(|p| p["part"][1]["valueCode"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(related(&v, "parent"), BTreeSet::from(["E08-E13".to_string()]));
    assert_eq!(
        related(&v, "child"),
        BTreeSet::from(["E11.6".to_string(), "E11.9".to_string()])
    );
}

#[tokio::test]
async fn fhir_expand_pages_through_a_value_set() {
    let server = server(1);
    let expand = "/fhir/ValueSet/$expand";
    let url = "http://snomed.info/sct?fhir_vs=ecl/< 1000010 |Clinical finding|";
    let (status, whole) = get(&server, expand, &[("url", url)]).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["expansion"]["total"], 9);
    let all: Vec<String> = whole["expansion"]["contains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(all.len(), 9);
    assert_eq!(whole["expansion"]["contains"][0]["version"], SCT_VERSION);
    // Pages of 4 put together give the whole expansion, in order.
    let mut paged = Vec::new();
    for offset in ["0", "4", "8"] {
        let (_, page) = get(&server, expand, &[("url", url), ("offset", offset), ("count", "4")]).await;
        assert_eq!(page["expansion"]["total"], 9);
        assert_eq!(page["expansion"]["offset"], offset.parse::<u64>().unwrap());
        paged.extend(
            page["expansion"]["contains"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["code"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(paged, all);
    let (_, isa) = get(
        &server,
        expand,
        &[("url", "http://snomed.info/sct?fhir_vs=isa/1000040")],
    )
    .await;
    assert_eq!(isa["expansion"]["total"], 3);
    let (_, refset) = get(
        &server,
        expand,
        &[("url", "http://snomed.info/sct?fhir_vs=refset/1000300")],
    )
    .await;
    assert_eq!(refset["expansion"]["total"], 3);
    let (_, filtered) = get(&server, expand, &[("url", url), ("filter", "HEART")]).await;
    let codes: BTreeSet<&str> = filtered["expansion"]["contains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        BTreeSet::from(["1000020", "1000040", "1000050", "1000070", "1000140"])
    );
    let (_, icd) = get(&server, expand, &[("system", "icd"), ("subset", "E11.6")]).await;
    // E11.6 and E11.65: a subset holds categories as well as billable codes.
    assert_eq!(icd["expansion"]["total"], 2, "{icd}");

    let bad = "http://snomed.info/sct?fhir_vs=ecl/< 1000010 : 9990000100 = 1000040";
    let (status, v) = get(&server, expand, &[("url", bad)]).await;
    assert_eq!(status, 400);
    assert!(outcome(&v, "invalid").contains("refinements"));
    let (status, v) = get(&server, expand, &[("url", "http://snomed.info/sct?fhir_vs=ecl/<< 42")]).await;
    assert_eq!(status, 400);
    assert!(outcome(&v, "invalid").contains("concept 42 is not in this release"));
    let (status, v) = get(&server, expand, &[("url", url), ("count", "5000")]).await;
    assert_eq!(status, 400);
    outcome(&v, "too-costly");
}

#[tokio::test]
async fn a_release_switched_under_load_fails_no_request() {
    let server = Arc::new(server(1));
    // Next year's release: the same tabular list under another version.
    let dir = tempfile::tempdir().unwrap();
    let next = dir.path().join("icd10cm_tabular_2027.xml");
    let text = std::fs::read_to_string(icd_fixture()).unwrap();
    std::fs::write(
        &next,
        text.replace("<version>2026</version>", "<version>2027</version>"),
    )
    .unwrap();

    let switched = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..4u64 {
        let (server, switched) = (Arc::clone(&server), Arc::clone(&switched));
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let started = Instant::now();
            // Bounded: until a few answers after the switch, at most 200 requests or 60 s.
            let mut after = 0;
            for i in 0..200u64 {
                if after >= 5 || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let was_switched = switched.load(Ordering::SeqCst);
                let body = json!({"model": "s0", "prompt": "Code:", "max_tokens": 30, "temperature": 1.0,
                                  "seed": client * 1000 + i, "constraint": {"terminology": "icd", "subset": "E11"}});
                let r = server.post("/v1/completions", &body).await;
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                let release = v["terminologies"][0]["release"].as_str().unwrap().to_string();
                // A request sent after the switch answered is compiled from the new release.
                if was_switched {
                    assert_eq!(release, "2027", "{v}");
                    after += 1;
                }
                seen.push(release);
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = server
        .admin(reqwest::Method::PUT, "/admin/v1/terminologies/icd")
        .json(&json!({"kind": "icd10cm-xml", "path": next}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["terminology"]["release"]["version"], "2027", "{v}");
    assert_eq!(v["replaced"]["release"]["version"], "2026", "{v}");
    switched.store(true, Ordering::SeqCst);
    let mut before = 0;
    for client in clients {
        let seen = client.await.unwrap();
        // Each client moves from the old release to the new one once, never back.
        let first_new = seen.iter().position(|r| r == "2027").unwrap();
        assert!(seen[first_new..].iter().all(|r| r == "2027"), "{seen:?}");
        before += first_new;
    }
    assert!(before > 0, "no request was answered before the switch");
    let listed = server.admin_get("/admin/v1/terminologies").await;
    let icd = listed["terminologies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "icd")
        .unwrap();
    assert_eq!(icd["release"]["version"], "2027");
    assert_eq!(icd["path"], next.display().to_string());

    // A release that fails to load leaves the served one in place.
    let r = server
        .admin(reqwest::Method::PUT, "/admin/v1/terminologies/icd")
        .json(&json!({"kind": "icd10cm-xml", "path": dir.path().join("missing.xml")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("missing.xml"), "{v}");
    let listed = server.admin_get("/admin/v1/terminologies").await;
    assert!(listed.to_string().contains("\"version\":\"2027\""), "{listed}");
}
