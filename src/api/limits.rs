//! Size limits of request bodies, by route, and the JSON error shape for every client error
//! axum answers itself (its 413 and extractor refusals are plain text, which OpenAI clients
//! cannot read). The limits of a request's contents
//! (prompt, stop strings, constraint, schema) are in [`crate::infer`]'s validation.

use axum::Json;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ErrorBody, ErrorDetail, ErrorKind};

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

/// Gives every client error the JSON error shape: axum's own refusals (a body past the
/// route's limit, an unparsable query, a wrong method, an unknown path) are plain text or
/// empty, which OpenAI clients cannot read. A body past its limit is told the limit.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let limit = body_limit(request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        // FHIR routes answer errors as `OperationOutcome` resources.
        v.starts_with(b"application/json") || v.starts_with(b"application/fhir+json")
    });
    if !status.is_client_error() || is_json {
        return response;
    }
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("the request body is larger than this route's limit of {limit} bytes")
    } else {
        let (parts, body) = response.into_parts();
        let text = axum::body::to_bytes(body, MAX_REJECTION_TEXT).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        let reason = parts.status.canonical_reason().unwrap_or("client error").to_lowercase();
        if text.is_empty() { reason } else { text }
    };
    let kind = match status {
        StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated.as_str(),
        StatusCode::FORBIDDEN => ErrorKind::PermissionDenied.as_str(),
        StatusCode::NOT_FOUND => ErrorKind::NotFound.as_str(),
        StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge.as_str(),
        StatusCode::TOO_MANY_REQUESTS => ErrorKind::Overloaded.as_str(),
        _ => ErrorKind::Invalid.as_str(),
    };
    let body = ErrorBody {
        error: ErrorDetail {
            message: &message,
            kind,
            param: None,
            code: status.as_u16(),
        },
    };
    (status, Json(body)).into_response()
}

/// Longest refusal text of axum's kept in the message.
const MAX_REJECTION_TEXT: usize = 4096;
