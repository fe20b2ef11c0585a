//! Size limits of request bodies, by route, and the JSON answer when one is passed (axum's own
//! 413 is plain text, which OpenAI clients cannot read). The limits of a request's contents
//! (prompt, stop strings, constraint, schema) are in [`crate::infer`]'s validation.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ErrorKind, InferError};

/// Body of a generation or coverage request (HTTP), and of a gRPC request message.
pub const MAX_REQUEST_BODY_BYTES: usize = 2 << 20;
/// Body of an admin request (a refresh job may carry its prompts inline).
pub const MAX_ADMIN_BODY_BYTES: usize = 8 << 20;
pub use crate::distill::store::{MAX_UPLOAD_BYTES, MAX_UPLOAD_LINES};

/// The body limit of the route at `path`.
pub fn body_limit(path: &str) -> usize {
    if path.starts_with("/admin/v1/datasets/") {
        MAX_UPLOAD_BYTES
    } else if path.starts_with("/admin/") {
        MAX_ADMIN_BODY_BYTES
    } else {
        MAX_REQUEST_BODY_BYTES
    }
}

/// Answers a body over its route's limit with the JSON error shape, naming the limit.
pub async fn json_too_large(request: Request, next: Next) -> Response {
    let limit = body_limit(request.uri().path());
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return InferError::new(
            ErrorKind::TooLarge,
            format!("the request body is larger than this route's limit of {limit} bytes"),
        )
        .into_response();
    }
    response
}
