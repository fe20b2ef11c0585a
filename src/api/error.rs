//! Errors of the HTTP API, mapped to status codes in one place: an OpenAI-style JSON body
//! `{"error": {"message", "type", "param", "code"}}`, and `Retry-After` on overload.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::repository::RepositoryError;
use crate::scheduler::{RequestError, SubmitError};

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Machine-readable kind: `invalid_request_error`, `not_found_error`, `overloaded`, ...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// Seconds the client should wait before retrying.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            retry_after: None,
        }
    }

    /// A 400 about the request as a whole (e.g. unparsable JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// An error with an explicit status and kind.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
}

impl From<RepositoryError> for ApiError {
    fn from(e: RepositoryError) -> Self {
        match e {
            RepositoryError::NotFound(_) => Self {
                param: Some("model"),
                ..Self::new(StatusCode::NOT_FOUND, "not_found_error", e.to_string())
            },
            RepositoryError::NotReady { .. } => Self {
                retry_after: Some(5),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
            },
            RepositoryError::Invalid(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string())
            }
            RepositoryError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(_) | SubmitError::TooManyRequests(_) => Self {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", e.to_string())
            },
            SubmitError::Closed => Self {
                retry_after: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
            },
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::DeadlineExceeded => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", e.to_string())
            }
            RequestError::Failed(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
