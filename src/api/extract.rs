//! Request helpers every handler group shares: the result type, the doc id
//! and body extractors' errors, JSON parsing, and `Link` paging headers.

use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::Serialize;

use super::error::{ApiError, WrappedRejection};
use crate::doc::DocId;

pub(super) type ApiResult<T> = Result<T, ApiError>;

pub(super) fn doc_id(path: Result<Path<String>, PathRejection>) -> ApiResult<DocId> {
    let Path(id) = path.map_err(|r| WrappedRejection(r, None))?;
    Ok(DocId::new(id)?)
}

pub(super) fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|r| {
        let msg = (r.status() == StatusCode::PAYLOAD_TOO_LARGE)
            .then(|| "request body is larger than api.max_body_bytes".to_string());
        WrappedRejection(r, msg).into()
    })
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(b: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(b).map_err(ApiError::bad_json)
}

/// Adds `Link: <path?query>; rel="next"` to a listing's response: where
/// its next page is.
pub(super) fn link_next(resp: &mut Response, path: &str, query: &impl Serialize) {
    let qs = serde_urlencoded::to_string(query).expect("a query serializes");
    if let Ok(v) = header::HeaderValue::from_str(&format!("<{path}?{qs}>; rel=\"next\"")) {
        resp.headers_mut().insert(header::LINK, v);
    }
}
