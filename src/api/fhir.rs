//! A light FHIR R4 terminology endpoint over the loaded releases, so EHR tooling can check
//! codes against exactly what constrained answers use: `GET /fhir/CodeSystem/$validate-code`,
//! `GET /fhir/CodeSystem/$lookup` and `GET /fhir/ValueSet/$expand` (paged). Answers are FHIR
//! JSON (`application/fhir+json`); errors are `OperationOutcome` resources.
//!
//! A code system is named by its canonical URL (`http://hl7.org/fhir/sid/icd-10-cm`,
//! `http://snomed.info/sct`) or by the terminology's name on this server; `version` picks
//! among releases of one system. `$expand` takes SNOMED CT's implicit value sets
//! (`http://snomed.info/sct?fhir_vs=ecl/<< 404684003`, `?fhir_vs=isa/X`, `?fhir_vs=refset/X`,
//! `?fhir_vs`) and, for any terminology, `system` with a `subset` (an ICD-10-CM range or ECL).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use crate::constrain::{ConstraintError, Entry, SourceKind, SubsetText, Terminology, TerminologySummary};

/// Codes an `$expand` page holds unless `count` says otherwise.
pub const DEFAULT_EXPAND_COUNT: usize = 100;

/// Most codes one `$expand` page may hold.
pub const MAX_EXPAND_COUNT: usize = 1000;

const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
const SNOMED: &str = "http://snomed.info/sct";

/// The canonical URL of a terminology's code system.
fn system_of(t: &TerminologySummary) -> String {
    match t.kind {
        SourceKind::Icd10cmXml | SourceKind::Icd10cmOrder => ICD10CM.into(),
        SourceKind::SnomedRf2 => SNOMED.into(),
        SourceKind::Tsv => format!("urn:distill-serve:terminology:{}", t.name),
    }
}

/// A FHIR error: an `OperationOutcome` with one issue, and its HTTP status.
struct Outcome {
    status: StatusCode,
    code: &'static str,
    diagnostics: String,
}

impl Outcome {
    fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            status,
            code,
            diagnostics: diagnostics.into(),
        }
    }

    fn required(param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "required",
            format!("parameter `{param}` is required"),
        )
    }
}

impl From<ConstraintError> for Outcome {
    fn from(e: ConstraintError) -> Self {
        match e {
            ConstraintError::UnknownTerminology { .. } => Self::new(StatusCode::NOT_FOUND, "not-found", e.to_string()),
            ConstraintError::Invalid(_) => Self::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
        }
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": self.code, "diagnostics": self.diagnostics}],
        });
        fhir(self.status, body)
    }
}

fn fhir(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/fhir+json"),
    );
    response
}

type Params = Query<HashMap<String, String>>;

/// The loaded terminology `system` names (a canonical URL or a name), the release `version`
/// names where several share the system.
fn resolve(state: &AppState, system: &str, version: Option<&str>) -> Result<TerminologySummary, Outcome> {
    let all = state.terminologies.summaries();
    let matching: Vec<TerminologySummary> = all
        .into_iter()
        .filter(|t| t.name == system || system_of(t) == system)
        .collect();
    if matching.is_empty() {
        return Err(Outcome::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no code system `{system}` is loaded"),
        ));
    }
    match version {
        None => Ok(matching.into_iter().next().expect("not empty")),
        Some(v) => {
            let known: Vec<String> = matching.iter().map(|t| t.release.version.clone()).collect();
            matching.into_iter().find(|t| t.release.version == v).ok_or_else(|| {
                Outcome::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!(
                        "code system `{system}` has no release `{v}` here (loaded: {})",
                        known.join(", ")
                    ),
                )
            })
        }
    }
}

fn entry<'a>(entries: &'a [Entry], code: &str) -> Option<&'a Entry> {
    entries
        .binary_search_by(|e| e.code.as_str().cmp(code))
        .ok()
        .map(|i| &entries[i])
}

/// `GET /fhir/CodeSystem/$validate-code?url=&code=[&version=&display=]`: a `Parameters`
/// resource with `result` (false, with a `message`, for a code the release lacks or a display
/// that is none of its terms).
pub async fn validate_code(State(state): State<AppState>, Query(params): Params) -> Response {
    let answer = || -> Result<Value, Outcome> {
        let (t, terminology, code) = named_code(&state, &params, "url")?;
        let (system, version) = (system_of(&t), &terminology.release.version);
        let mut out = vec![];
        match entry(&terminology.entries, code) {
            None => {
                out.push(json!({"name": "result", "valueBoolean": false}));
                out.push(json!({"name": "message", "valueString": format!("Unknown code `{code}` in {system} release {version}")}));
            }
            Some(e) => {
                let display_ok = params
                    .get("display")
                    .is_none_or(|d| *d == e.description || e.synonyms.contains(d));
                out.push(json!({"name": "result", "valueBoolean": display_ok}));
                if !display_ok {
                    out.push(json!({"name": "message", "valueString": format!("`{}` is not a display of code `{code}`", params["display"])}));
                }
                out.push(json!({"name": "display", "valueString": e.description}));
            }
        }
        out.push(json!({"name": "system", "valueUri": system}));
        out.push(json!({"name": "version", "valueString": version}));
        Ok(json!({"resourceType": "Parameters", "parameter": out}))
    };
    respond(answer())
}

/// The terminology (its summary and the release it serves now) and the code a request names:
/// the system in parameter `system_param` (`$validate-code` also takes `system`), the code in
/// `code`, the release in an optional `version`.
fn named_code<'a>(
    state: &AppState,
    params: &'a HashMap<String, String>,
    system_param: &str,
) -> Result<(TerminologySummary, Arc<Terminology>, &'a str), Outcome> {
    let system = params
        .get(system_param)
        .or_else(|| params.get("system"))
        .ok_or_else(|| Outcome::required(system_param))?;
    let code = params.get("code").ok_or_else(|| Outcome::required("code"))?;
    let t = resolve(state, system, params.get("version").map(String::as_str))?;
    let terminology = state.terminologies.get(&t.name).ok_or_else(|| {
        Outcome::from(ConstraintError::UnknownTerminology {
            name: t.name.clone(),
            loaded: "changed while answering".into(),
        })
    })?;
    Ok((t, terminology, code))
}

fn respond(answer: Result<Value, Outcome>) -> Response {
    match answer {
        Ok(body) => fhir(StatusCode::OK, body),
        Err(outcome) => outcome.into_response(),
    }
}

/// `GET /fhir/CodeSystem/$lookup?system=&code=[&version=]`: the code's display, its other
/// terms as designations, and properties (`parent` and `child` from a hierarchy, `billable`
/// for ICD-10-CM); 404 with an `OperationOutcome` for a code the release lacks.
pub async fn lookup(State(state): State<AppState>, Query(params): Params) -> Response {
    let answer = || -> Result<Value, Outcome> {
        let (t, terminology, code) = named_code(&state, &params, "system")?;
        let e = entry(&terminology.entries, code).ok_or_else(|| {
            Outcome::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!(
                    "Unknown code `{code}` in {} release {}",
                    system_of(&t),
                    terminology.release.version
                ),
            )
        })?;
        let mut out = vec![
            json!({"name": "name", "valueString": t.name}),
            json!({"name": "version", "valueString": terminology.release.version}),
            json!({"name": "display", "valueString": e.description}),
        ];
        for synonym in &e.synonyms {
            out.push(json!({"name": "designation", "part": [{"name": "value", "valueString": synonym}]}));
        }
        let property = |code: &str, value: Value| json!({"name": "property", "part": [{"name": "code", "valueCode": code}, value]});
        if let Some(hierarchy) = &terminology.hierarchy {
            for parent in hierarchy.parents_of(code) {
                out.push(property("parent", json!({"name": "value", "valueCode": parent})));
            }
            for child in hierarchy.children_of(code) {
                out.push(property("child", json!({"name": "value", "valueCode": child})));
            }
        }
        if matches!(t.kind, SourceKind::Icd10cmXml | SourceKind::Icd10cmOrder) {
            out.push(property(
                "billable",
                json!({"name": "value", "valueBoolean": e.billable}),
            ));
        }
        Ok(json!({"resourceType": "Parameters", "parameter": out}))
    };
    respond(answer())
}

/// The system and subset an `$expand` asks for: SNOMED CT's implicit value set URLs, or a
/// `system` (or `url` naming a code system) with an optional `subset`.
fn value_set(params: &HashMap<String, String>) -> Result<(String, Option<String>), Outcome> {
    if let Some(url) = params.get("url")
        && let Some((system, query)) = url.split_once('?')
    {
        let Some(vs) = query.strip_prefix("fhir_vs") else {
            return Err(Outcome::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!("value set `{url}`: only implicit value sets (`?fhir_vs=...`) are known here"),
            ));
        };
        let ecl = match vs.strip_prefix('=') {
            None if vs.is_empty() => None,
            Some(rest) => Some(if let Some(ecl) = rest.strip_prefix("ecl/") {
                ecl.to_string()
            } else if let Some(id) = rest.strip_prefix("isa/") {
                format!("<< {id}")
            } else if let Some(id) = rest.strip_prefix("refset/") {
                format!("^ {id}")
            } else {
                return Err(Outcome::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!("`fhir_vs={rest}`: supported are `ecl/`, `isa/` and `refset/`"),
                ));
            }),
            _ => {
                return Err(Outcome::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("value set `{url}` is malformed"),
                ));
            }
        };
        return Ok((system.to_string(), ecl));
    }
    let system = params
        .get("system")
        .or_else(|| params.get("url"))
        .ok_or_else(|| Outcome::required("url"))?;
    Ok((system.clone(), params.get("subset").cloned()))
}

fn number(params: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, Outcome> {
    params.get(name).map_or(Ok(default), |v| {
        v.parse().map_err(|_| {
            Outcome::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("`{name}` must be a whole number, got `{v}`"),
            )
        })
    })
}

/// `GET /fhir/ValueSet/$expand?url=[&version=&filter=&offset=&count=]`: a `ValueSet` whose
/// `expansion` holds `total` and one page of `contains` (in code order).
pub async fn expand(State(state): State<AppState>, Query(params): Params) -> Response {
    let terminologies = state.terminologies.clone();
    let answer = move || -> Result<Value, Outcome> {
        let (system, subset) = value_set(&params)?;
        let offset = number(&params, "offset", 0)?;
        let count = number(&params, "count", DEFAULT_EXPAND_COUNT)?;
        if count > MAX_EXPAND_COUNT {
            return Err(Outcome::new(
                StatusCode::BAD_REQUEST,
                "too-costly",
                format!("`count` may be at most {MAX_EXPAND_COUNT}, got {count}; page with `offset`"),
            ));
        }
        let t = resolve(&state, &system, params.get("version").map(String::as_str))?;
        let selected = terminologies.select(&t.name, subset.map(SubsetText::One).as_ref())?;
        let filter = params.get("filter").map(|f| f.to_lowercase());
        let entries = &selected.terminology.entries;
        let matching: Vec<&Entry> = selected
            .members
            .iter()
            .map(|&i| &entries[i])
            .filter(|e| {
                filter.as_ref().is_none_or(|f| {
                    std::iter::once(&e.description)
                        .chain(&e.synonyms)
                        .any(|term| term.to_lowercase().contains(f.as_str()))
                })
            })
            .collect();
        let system_url = system_of(&t);
        let version = &selected.terminology.release.version;
        let contains: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(count)
            .map(|e| json!({"system": system_url, "version": version, "code": e.code, "display": e.description}))
            .collect();
        let mut parameter = vec![
            json!({"name": "version", "valueUri": format!("{system_url}|{version}")}),
            json!({"name": "offset", "valueInteger": offset}),
            json!({"name": "count", "valueInteger": count}),
        ];
        if let Some(subset) = &selected.provenance.subset {
            parameter.push(json!({"name": "subset", "valueString": subset}));
        }
        Ok(json!({
            "resourceType": "ValueSet",
            "status": "active",
            "expansion": {
                "timestamp": crate::audit::rfc3339(std::time::SystemTime::now()),
                "total": matching.len(),
                "offset": offset,
                "parameter": parameter,
                "contains": contains,
            },
        }))
    };
    // Expanding a large release walks its hierarchy: off the async executor.
    match tokio::task::spawn_blocking(answer).await {
        Ok(answer) => respond(answer),
        Err(e) => Outcome::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", e.to_string()).into_response(),
    }
}
