//! Backup, restore, and one doc's Automerge bytes.
//!
//! - `GET /v1/backup` streams a backup file (see [`crate::backup`]).
//! - `POST /v1/restore` takes one as the body: it is spooled to
//!   `<data_dir>/restore-tmp/`, checked whole, then merged; the spool (and
//!   the directory, once empty) is removed when the restore ends, and a
//!   spool left by a killed restore when the node next starts.
//! - `GET /v1/docs/{id}/save` is the doc's Automerge save;
//!   `POST /v1/docs/{id}/merge` merges Automerge bytes into the doc.

use std::io::{self, Write};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{ApiError, ApiResult, body, doc_id};
use crate::node::Node;

/// Bytes gathered before a chunk of the backup goes out.
const CHUNK: usize = 256 * 1024;

pub(super) fn routes() -> Router<Node> {
    Router::new()
        .route("/v1/backup", get(backup))
        .route(
            "/v1/restore",
            post(restore).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/docs/{id}/save", get(save))
        .route("/v1/docs/{id}/merge", post(merge))
}

/// Sends what the backup writes, in chunks, to the response body.
struct Chunks {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Chunks {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The backup as it is taken. A failure midway ends the body early: the
/// client then holds a file without its trailer, which no restore accepts.
async fn backup(State(node): State<Node>) -> Response {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let failed = tx.clone();
    let name = format!(
        "mergeflow-{}-{}.mfbackup",
        node.peer_id(),
        crate::doc::now_ms()
    );
    tokio::spawn(async move {
        let out = Chunks {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        if let Err(e) = node.backup(out).await {
            tracing::warn!(err = %e, "backup over the API failed");
            let _ = failed.send(Err(io::Error::other(e.to_string()))).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Spools the body to a file under the data dir, then restores it.
async fn restore(State(node): State<Node>, body: Body) -> ApiResult<Response> {
    let dir = node.data_dir().join(crate::backup::RESTORE_SPOOL);
    let path = dir.join(format!(
        "{}-{:016x}.mfbackup",
        crate::doc::now_ms(),
        rand::random::<u64>()
    ));
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "restore_failed",
            format!("{what} {}: {e}", path.display()),
        )
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| internal("cannot create", &e))?;
    let spooled = async {
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| internal("cannot create", &e))?;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("the request body ended badly: {e}"),
                )
            })?;
            file.write_all(&chunk)
                .await
                .map_err(|e| internal("cannot write", &e))?;
        }
        file.flush().await.map_err(|e| internal("cannot write", &e))
    }
    .await;
    let result = match spooled {
        Ok(()) => node.restore_file(&path).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&path).await;
    // The directory goes with the last spool; a restore running beside this
    // one keeps it (remove_dir refuses a directory that is not empty).
    let _ = tokio::fs::remove_dir(&dir).await;
    Ok(axum::Json(result?).into_response())
}

async fn save(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    let docs = node.docs().clone();
    let read = id.clone();
    let saved = tokio::task::spawn_blocking(move || docs.saved(&read))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    match saved {
        Some(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        // Which one: not found, or deleted (410).
        None => Err(node.docs().heads(id).await.err().map_or_else(
            || ApiError::new(StatusCode::NOT_FOUND, "not_found", "doc not found"),
            ApiError::from,
        )),
    }
}

async fn merge(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    crate::doc::user_writable(&id)?;
    let data = body(b)?;
    let result = node.docs().merge(id, data.to_vec()).await?;
    Ok(axum::Json(result).into_response())
}
