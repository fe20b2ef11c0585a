//! Admin routes of distillation refresh: datasets, refresh jobs (start, follow, cancel) and
//! rollback. All sit behind the admin bearer token.

use std::convert::Infallible;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ErrorKind, InferError};
use super::limits::MAX_UPLOAD_LINES;
use crate::distill::job::{RefreshSpec, parse_prompts_jsonl};
use crate::distill::service::DistillError;
use crate::distill::store::JobState;

impl From<DistillError> for InferError {
    fn from(e: DistillError) -> Self {
        match e {
            DistillError::Invalid(m) => InferError::bad_request(m),
            DistillError::NotFound(m) => InferError::new(ErrorKind::NotFound, m),
            DistillError::Conflict(m) => InferError::new(ErrorKind::Conflict, m),
            DistillError::Repository(e) => e.into(),
            DistillError::Store(e) => InferError::internal(e.to_string()),
        }
    }
}

fn store_error(e: impl std::fmt::Display) -> InferError {
    InferError::internal(e.to_string())
}

/// Runs `work` (SQLite, the filesystem) on a blocking worker, off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, InferError> + Send + 'static,
) -> Result<T, InferError> {
    tokio::task::spawn_blocking(work).await.map_err(store_error)?
}

/// `POST /admin/v1/models/{name}/refresh`: starts a refresh job; 202 with its id.
pub async fn refresh(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, InferError> {
    let spec: RefreshSpec =
        serde_json::from_slice(&body).map_err(|e| InferError::bad_request(format!("invalid refresh job: {e}")))?;
    // Starting writes the job (and any inline prompts) to SQLite: off the async threads.
    let (distiller, model) = (state.distiller.clone(), name.clone());
    let caller = crate::auth::current().unwrap_or_else(|| crate::auth::Caller::anonymous(None));
    let actor = (caller.name.to_string(), caller.client);
    let id = tokio::task::spawn_blocking(move || distiller.start(&model, spec, actor))
        .await
        .map_err(store_error)??;
    let links = json!({"self": format!("/admin/v1/jobs/{id}"), "events": format!("/admin/v1/jobs/{id}/events")});
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "model": name, "state": JobState::Queued, "links": links})),
    )
        .into_response())
}

/// `GET /admin/v1/jobs`: the newest jobs first.
pub async fn jobs(State(state): State<AppState>) -> Result<Json<Value>, InferError> {
    let store = state.distiller.store().clone();
    let jobs = blocking(move || store.jobs(100).map_err(store_error)).await?;
    Ok(Json(json!({"jobs": jobs})))
}

/// `GET /admin/v1/jobs/{id}`: stage, progress, losses, evaluation and outcome.
pub async fn job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, InferError> {
    let distiller = state.distiller.clone();
    let record = blocking(move || Ok(distiller.job(&id)?)).await?;
    Ok(Json(json!(record)))
}

/// `POST /admin/v1/jobs/{id}/cancel`: asks a running job to stop; 202.
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, InferError> {
    let (distiller, job) = (state.distiller.clone(), id.clone());
    blocking(move || Ok(distiller.cancel(&job)?)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id, "cancelling": true}))).into_response())
}

/// `GET /admin/v1/jobs/{id}/events`: server-sent events — the job as it is now (`snapshot`),
/// then each change as it happens, until `finished`.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, InferError> {
    // Subscribe before reading the record, so no event falls between the two.
    let receiver = state.distiller.subscribe(&id);
    let distiller = state.distiller.clone();
    let record = blocking(move || Ok(distiller.job(&id)?)).await?;
    let stream = async_stream::stream! {
        let finished = record.is_finished();
        yield Ok(SseEvent::default().event("snapshot").data(json!(record).to_string()));
        match receiver {
            Some(mut rx) if !finished => loop {
                match rx.recv().await {
                    Ok(event) => {
                        let kind = event["type"].as_str().unwrap_or("progress").to_string();
                        yield Ok(SseEvent::default().event(kind.clone()).data(event.to_string()));
                        if kind == "finished" {
                            break;
                        }
                    }
                    // A slow reader missed events: the next ones still come.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            },
            _ => {
                let end = json!({"type": "finished", "state": record.state, "stage": record.stage,
                    "error": record.error, "result": record.result});
                yield Ok(SseEvent::default().event("finished").data(end.to_string()));
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `POST /admin/v1/models/{name}/rollback`: serves the version before the serving one.
pub async fn rollback(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, InferError> {
    let repository = state.repository.clone();
    let (from, model) = tokio::task::spawn_blocking(move || repository.rollback(&name))
        .await
        .map_err(store_error)??;
    Ok(Json(
        json!({"name": model.name(), "version": model.version(), "rolled_back_from": from}),
    ))
}

/// `POST /admin/v1/datasets/{name}`: adds the JSONL body's prompts (`{"prompt": ...}` or
/// `{"messages": [...]}`, optional `"label"`) to a dataset; a line that is already there is
/// kept once.
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, InferError> {
    let text = std::str::from_utf8(&body).map_err(|_| InferError::bad_request("the body is not UTF-8 JSONL"))?;
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    if lines > MAX_UPLOAD_LINES {
        return Err(InferError::new(
            ErrorKind::TooLarge,
            format!(
                "the upload has {lines} prompts; one upload may hold at most {MAX_UPLOAD_LINES} (send the rest in further uploads)"
            ),
        ));
    }
    let prompts = parse_prompts_jsonl(text).map_err(InferError::bad_request)?;
    let store = state.distiller.store().clone();
    let dataset = name.clone();
    let (added, total) = tokio::task::spawn_blocking(move || {
        let added = store.add_prompts(&dataset, &prompts)?;
        Ok::<_, crate::distill::store::StoreError>((added, store.prompts_page(&dataset, 0, 0)?.1))
    })
    .await
    .map_err(store_error)?
    .map_err(store_error)?;
    Ok(Json(json!({"dataset": name, "added": added, "total": total})))
}

/// `GET /admin/v1/datasets`: every dataset and its number of prompts.
pub async fn datasets(State(state): State<AppState>) -> Result<Json<Value>, InferError> {
    let store = state.distiller.store().clone();
    let list = blocking(move || store.datasets().map_err(store_error)).await?;
    let list: Vec<Value> = list
        .into_iter()
        .map(|(name, prompts)| json!({"name": name, "prompts": prompts}))
        .collect();
    Ok(Json(json!({"datasets": list})))
}

/// Prompts one page of `GET /admin/v1/datasets/{name}` holds at most.
pub const MAX_DATASET_PAGE: usize = 1000;

/// Which page of a dataset to read.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_page")]
    limit: usize,
}

fn default_page() -> usize {
    100
}

/// `GET /admin/v1/datasets/{name}?offset=0&limit=100`: a page of the dataset's prompts, oldest
/// first, with the total and the next page's offset. Off with `--no-dataset-read` (captured
/// prompts are patients' and clients' words).
pub async fn dataset(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, InferError> {
    if !state.dataset_read {
        return Err(InferError::new(
            ErrorKind::PermissionDenied,
            "reading datasets is turned off on this server (--no-dataset-read)",
        ));
    }
    if !(1..=MAX_DATASET_PAGE).contains(&page.limit) {
        return Err(InferError::invalid(
            "limit",
            format!("limit must be 1 to {MAX_DATASET_PAGE}"),
        ));
    }
    let store = state.distiller.store().clone();
    let dataset = name.clone();
    let (prompts, total) = blocking(move || {
        store
            .prompts_page(&dataset, page.offset, page.limit)
            .map_err(store_error)
    })
    .await?;
    if total == 0 {
        return Err(InferError::new(
            ErrorKind::NotFound,
            format!("dataset `{name}` has no prompts"),
        ));
    }
    let end = page.offset.saturating_add(prompts.len());
    let next = (end < total).then_some(end);
    Ok(Json(
        json!({"dataset": name, "total": total, "offset": page.offset, "next_offset": next, "prompts": prompts}),
    ))
}

/// `DELETE /admin/v1/datasets/{name}`: deletes the dataset's prompts and their teacher outputs.
pub async fn delete_dataset(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, InferError> {
    let store = state.distiller.store().clone();
    let dataset = name.clone();
    let deleted = blocking(move || store.delete_dataset(&dataset).map_err(store_error)).await?;
    if deleted == 0 {
        return Err(InferError::new(
            ErrorKind::NotFound,
            format!("dataset `{name}` has no prompts"),
        ));
    }
    Ok(Json(json!({"dataset": name, "deleted": deleted})))
}
