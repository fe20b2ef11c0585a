//! The one error every protocol answers with. Each protocol maps an [`ErrorKind`] to its own
//! status once (HTTP in `api::error`, gRPC in `api::grpc`); nothing here knows either.

use crate::auth::{AuthError, Refusal};
use crate::repository::RepositoryError;
use crate::scheduler::{RequestError, SubmitError};

/// What went wrong, independent of the protocol that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or out of range (HTTP 400, `INVALID_ARGUMENT`).
    Invalid,
    /// No or unknown credentials (HTTP 401, `UNAUTHENTICATED`).
    Unauthenticated,
    /// Credentials that do not allow this (HTTP 403, `PERMISSION_DENIED`).
    PermissionDenied,
    /// The model (or job, dataset, terminology) does not exist (HTTP 404, `NOT_FOUND`).
    NotFound,
    /// The operation does not fit the current state (HTTP 409, `ABORTED`).
    Conflict,
    /// The request is well formed but cannot be carried out, e.g. a model that fails to load
    /// (HTTP 422, `FAILED_PRECONDITION`).
    Unprocessable,
    /// The request is larger than a limit of the server allows (HTTP 413, `OUT_OF_RANGE`).
    TooLarge,
    /// Admission refused it; retry later (HTTP 429, `RESOURCE_EXHAUSTED`).
    Overloaded,
    /// The model is not serving now (HTTP 503, `UNAVAILABLE`).
    Unavailable,
    /// Its deadline passed (HTTP 504, `DEADLINE_EXCEEDED`).
    DeadlineExceeded,
    /// A fault of the server (HTTP 500, `INTERNAL`).
    Internal,
}

impl ErrorKind {
    /// The kind's name in error bodies and in the `outcome` label of request metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid_request_error",
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::PermissionDenied => "forbidden",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unprocessable => "unprocessable",
            ErrorKind::TooLarge => "payload_too_large",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Internal => "internal_error",
        }
    }
}

/// An error answered to a client, whatever the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InferError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// Seconds the client should wait before retrying.
    pub retry_after: Option<u64>,
}

impl InferError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// An invalid request, naming the field at fault.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(ErrorKind::Invalid, message)
        }
    }

    /// An invalid request as a whole (e.g. an unparsable body).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// A fault of the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The same error, asking the client to retry after `seconds`.
    pub fn retry_after(self, seconds: u64) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }
}

impl From<AuthError> for InferError {
    fn from(e: AuthError) -> Self {
        let kind = match e.refusal {
            Refusal::Unauthenticated => ErrorKind::Unauthenticated,
            Refusal::Forbidden => ErrorKind::PermissionDenied,
            Refusal::Limited => ErrorKind::Overloaded,
            Refusal::TooLarge => ErrorKind::Invalid,
        };
        Self {
            retry_after: e.retry_after,
            ..Self::new(kind, e.message)
        }
    }
}

impl From<RepositoryError> for InferError {
    fn from(e: RepositoryError) -> Self {
        match e {
            RepositoryError::NotFound(_) => Self {
                param: Some("model"),
                ..Self::new(ErrorKind::NotFound, e.to_string())
            },
            RepositoryError::NotReady { .. } => Self::new(ErrorKind::Unavailable, e.to_string()).retry_after(5),
            RepositoryError::Invalid(_) => Self::internal(e.to_string()),
            RepositoryError::Conflict(_) => Self::new(ErrorKind::Conflict, e.to_string()),
            RepositoryError::BadName(_) | RepositoryError::WrongKind(_) => Self::invalid("model", e.to_string()),
        }
    }
}

impl From<SubmitError> for InferError {
    fn from(e: SubmitError) -> Self {
        let (kind, retry_after) = match e {
            SubmitError::QueueTime { retry_after, .. } | SubmitError::Deadline { retry_after, .. } => {
                (ErrorKind::Overloaded, retry_after)
            }
            SubmitError::QueueFull(_) | SubmitError::QueuedTokens(_) | SubmitError::TooManyRequests(_) => {
                (ErrorKind::Overloaded, 1)
            }
            SubmitError::Closed => (ErrorKind::Unavailable, 1),
        };
        Self::new(kind, e.to_string()).retry_after(retry_after)
    }
}

impl From<RequestError> for InferError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::DeadlineExceeded => Self::new(ErrorKind::DeadlineExceeded, e.to_string()),
            RequestError::Failed(_) => Self::internal(e.to_string()),
        }
    }
}
