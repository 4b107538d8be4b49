//! Maps errors to HTTP: every error is `{"error": {"code", "message"}}` with a
//! fitting status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::doc::DocError;
use crate::store::StoreError;

/// An API error: status, stable machine-readable code, human message.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code such as `not_found`.
    pub code: &'static str,
    /// What went wrong and where.
    pub message: String,
}

/// The JSON body of an error response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: String,
    /// Human message.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 for a body that is not the JSON we expect.
    pub fn bad_json(e: serde_json::Error) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("request body: {e}"),
        )
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        let (status, code) = status_of(&e);
        if status.is_server_error() {
            tracing::error!(err = %e, code, "request failed");
        }
        ApiError::new(status, code, e.to_string())
    }
}

/// Status and code of a document error; an op's error takes its cause's.
fn status_of(e: &DocError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        DocError::InOp { source, .. } => status_of(source),
        DocError::InvalidId { .. } => (S::BAD_REQUEST, "invalid_doc_id"),
        DocError::NotFound(_) => (S::NOT_FOUND, "not_found"),
        DocError::Deleted(_) => (S::GONE, "deleted"),
        DocError::AlreadyExists(_) => (S::CONFLICT, "already_exists"),
        DocError::BadPath { .. } => (S::BAD_REQUEST, "bad_path"),
        DocError::PathNotFound(_) => (S::NOT_FOUND, "path_not_found"),
        DocError::TypeMismatch { .. } => (S::UNPROCESSABLE_ENTITY, "type_mismatch"),
        DocError::BadValue(_) => (S::UNPROCESSABLE_ENTITY, "bad_value"),
        DocError::ChangeTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "change_too_large"),
        DocError::DocTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "doc_too_large"),
        DocError::TooDeep { .. } => (S::UNPROCESSABLE_ENTITY, "doc_too_deep"),
        DocError::CounterOverflow { .. } => (S::UNPROCESSABLE_ENTITY, "counter_overflow"),
        DocError::Reserved { .. } => (S::FORBIDDEN, "reserved_doc"),
        DocError::Forbidden(_) => (S::FORBIDDEN, "forbidden"),
        DocError::IdempotencyKeyReused { .. } => {
            (S::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
        }
        DocError::Corrupt { .. } => (S::INTERNAL_SERVER_ERROR, "doc_corrupt"),
        DocError::Automerge(_) => (S::UNPROCESSABLE_ENTITY, "automerge"),
        DocError::Store(StoreError::Closed) => (S::SERVICE_UNAVAILABLE, "shutting_down"),
        DocError::Store(StoreError::Flush(_)) => (S::INSUFFICIENT_STORAGE, "flush_failed"),
        DocError::Store(StoreError::Write(_)) => (S::INSUFFICIENT_STORAGE, "write_failed"),
        DocError::Store(_) => (S::INTERNAL_SERVER_ERROR, "store_error"),
        DocError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Doc(d) => d.into(),
            crate::Error::Store(s) => DocError::Store(s).into(),
            crate::Error::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m),
            crate::Error::Backup(b @ crate::backup::BackupError::Io(_)) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backup_io",
                b.to_string(),
            ),
            crate::Error::Backup(b) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_backup", b.to_string())
            }
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl<R: axum::response::IntoResponse + std::fmt::Display> From<WrappedRejection<R>> for ApiError {
    fn from(r: WrappedRejection<R>) -> Self {
        let message = r.1.unwrap_or_else(|| r.0.to_string());
        let resp = r.0.into_response();
        let status = resp.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "bad_request",
        };
        ApiError::new(status, code, message)
    }
}

/// An axum extractor rejection, optionally with our own message.
pub struct WrappedRejection<R>(pub R, pub Option<String>);
