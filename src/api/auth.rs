//! The transports' side of [`crate::auth`]: an axum middleware for the HTTP router and a tower
//! layer for the gRPC server, both asking the same [`Authenticator`] and answering its refusals
//! in their protocol's shape (JSON error with 401/403/429, or a gRPC status). The HTTP side also
//! writes each admin action to the audit log once its answer is known.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::http::{Method, Response, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;

use super::AppState;
use super::error::InferError;
use crate::audit::Entry;
use crate::auth::{self, Authenticator};
use crate::transport::Peer;

/// Authenticates every HTTP request and serves it as its caller; audits admin actions.
pub async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> axum::response::Response {
    let client = request.extensions().get::<Peer>().map(|p| p.addr);
    let caller = match state.auth.check(request.uri().path(), request.headers(), client) {
        Ok(caller) => caller,
        Err(e) => return InferError::from(e).into_response(),
    };
    let action = admin_action(request.method(), request.uri().path());
    let response = auth::scope(caller.clone(), next.run(request)).await;
    if let Some((action, target)) = action {
        state.auth.audit().record(Entry {
            actor: caller.name.to_string(),
            client,
            action: action.into(),
            target,
            outcome: outcome(response.status()),
        });
    }
    response
}

/// The audited action of an admin route, and its target: every change, and reads of datasets
/// (they hold captured prompts).
fn admin_action(method: &Method, path: &str) -> Option<(&'static str, String)> {
    let rest = path.strip_prefix("/admin/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let action = match (method, parts.as_slice()) {
        (&Method::POST, ["models", name, verb]) => {
            let action = match *verb {
                "load" => "load",
                "reload" => "reload",
                "unload" => "unload",
                "refresh" => "refresh",
                "rollback" => "rollback",
                _ => return None,
            };
            (action, (*name).to_string())
        }
        (&Method::POST, ["jobs", id, "cancel"]) => ("job_cancel", (*id).to_string()),
        (&Method::PUT, ["terminologies", name]) => ("terminology_install", (*name).to_string()),
        (&Method::POST, ["datasets", name @ ..]) if !name.is_empty() => ("dataset_upload", name.join("/")),
        (&Method::GET, ["datasets", name @ ..]) if !name.is_empty() => ("dataset_read", name.join("/")),
        (&Method::DELETE, ["datasets", name @ ..]) if !name.is_empty() => ("dataset_delete", name.join("/")),
        _ => return None,
    };
    Some(action)
}

/// `success` for a 2xx answer, else `failed: <status>`.
pub fn outcome(status: StatusCode) -> String {
    if status.is_success() {
        "success".into()
    } else {
        format!("failed: {}", status.as_u16())
    }
}

/// Authenticates gRPC calls with the HTTP side's rules (see [`crate::auth::access`]).
#[derive(Clone)]
pub struct GrpcAuthLayer {
    auth: Authenticator,
}

impl GrpcAuthLayer {
    /// A layer asking `auth`.
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> tower_layer::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`GrpcAuthLayer`].
#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, B, R> tower_service::Service<axum::http::Request<B>> for GrpcAuth<S>
where
    S: tower_service::Service<axum::http::Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<Peer>();
        // A request arrived: the connection's header deadline is met.
        peer.inspect(|p| p.mark_request());
        let client = peer.map(|p| p.addr);
        match self.auth.check(request.uri().path(), request.headers(), client) {
            Ok(caller) => Box::pin(auth::scope(caller, self.inner.call(request))),
            Err(e) => {
                // A trailers-only answer: UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED.
                let status: tonic::Status = InferError::from(e).into();
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_changes_and_dataset_reads_are_audited_lists_are_not() {
        let post = &Method::POST;
        assert_eq!(
            admin_action(post, "/admin/v1/models/m/load"),
            Some(("load", "m".into()))
        );
        assert_eq!(
            admin_action(post, "/admin/v1/models/m/rollback"),
            Some(("rollback", "m".into()))
        );
        assert_eq!(
            admin_action(post, "/admin/v1/jobs/j/cancel"),
            Some(("job_cancel", "j".into()))
        );
        assert_eq!(
            admin_action(post, "/admin/v1/datasets/capture/m"),
            Some(("dataset_upload", "capture/m".into()))
        );
        assert_eq!(
            admin_action(&Method::GET, "/admin/v1/datasets/d"),
            Some(("dataset_read", "d".into()))
        );
        assert_eq!(
            admin_action(&Method::PUT, "/admin/v1/terminologies/icd"),
            Some(("terminology_install", "icd".into()))
        );
        assert_eq!(admin_action(&Method::GET, "/admin/v1/models"), None);
        assert_eq!(admin_action(&Method::GET, "/admin/v1/terminologies"), None);
        assert_eq!(admin_action(&Method::GET, "/admin/v1/jobs/j"), None);
        assert_eq!(outcome(StatusCode::ACCEPTED), "success");
        assert_eq!(outcome(StatusCode::CONFLICT), "failed: 409");
    }
}
