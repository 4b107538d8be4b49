//! A typed HTTP client of the node's API, used by the CLI, the benchmark and tests.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use crate::api::{CreateRequest, DeleteResponse, ErrorBody};
use crate::doc::Op;
use crate::runtime::{DocInfo, HistoryEntry, WriteResult};
use crate::status::Status;

mod events;
mod workflows;

pub use events::{EventsEnd, EventsRequest, SseEvent, SseParser};

/// Errors of the client, each a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node could not be reached.
    #[error(
        "cannot reach a mergeflow node at {url}: {reason} (is `mergeflow start` running? set --api or MERGEFLOW_API)"
    )]
    Unreachable {
        /// The API base URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The node answered with an error.
    #[error("{message} ({status} {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: String,
        /// Error message from the body.
        message: String,
    },
    /// The node's answer was not what the client expected.
    #[error("unexpected response from {url}: {reason}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// A client of one node.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// Percent-encodes a doc id for a URL path segment (`/` becomes `%2F`).
pub fn encode_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How long a backup or restore request may take.
const LONG_OPERATION: Duration = Duration::from_secs(24 * 3600);

/// A reqwest client for the node's API: `Authorization: Bearer <token>`
/// when a token is given, no proxy (the nodes are local or on the
/// cluster's own network).
///
/// # Panics
/// If `token` holds characters a header cannot (control characters).
pub fn http_client(
    token: Option<&str>,
    connect_timeout: Duration,
    timeout: Duration,
) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .expect("an API token is printable text");
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    crate::http_allow::install_tls_provider();
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .expect("reqwest client builds")
}

/// The CLI's timeouts: to connect, and for a whole request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The innermost cause of an error, which names what went wrong.
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        reason = s.to_string();
        src = s.source();
    }
    reason
}

impl Client {
    /// A client for the API at `base` (`http://127.0.0.1:7700` or `127.0.0.1:7700`).
    pub fn new(base: &str) -> Client {
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let http = http_client(None, CONNECT_TIMEOUT, REQUEST_TIMEOUT);
        Client { base, http }
    }

    /// Sends `Authorization: Bearer <token>` with every request (for a node
    /// with `api.token`); `None` sends none.
    ///
    /// # Panics
    /// If `token` holds characters a header cannot (control characters).
    pub fn with_token(mut self, token: Option<&str>) -> Client {
        if token.is_some_and(|t| !t.is_empty()) {
            self.http = http_client(token, CONNECT_TIMEOUT, REQUEST_TIMEOUT);
        }
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn doc_url(&self, id: &str, suffix: &str) -> String {
        format!("{}/v1/docs/{}{suffix}", self.base, encode_id(id))
    }

    /// Sends `req`; an answer that is not a success becomes
    /// [`ClientError::Api`] with the node's error code and message.
    async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Protocol {
            url,
            reason: e.to_string(),
        })?;
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: "http".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        json_body(self.send_raw(req).await?).await
    }

    /// `GET /v1/backup`, written to `out` as it arrives; `progress` gets
    /// the bytes received so far. The caller checks the file (see
    /// [`crate::backup::read`]): a backup that failed on the node ends early.
    ///
    /// # Errors
    /// [`ClientError`]; writing to `out` failed ([`ClientError::Protocol`]).
    pub async fn backup(
        &self,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ClientError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let url = format!("{}/v1/backup", self.base);
        let resp = self
            .send_raw(self.http.get(&url).timeout(LONG_OPERATION))
            .await?;
        let mut stream = resp.bytes_stream();
        let mut received = 0u64;
        let broken = |reason: String| ClientError::Protocol {
            url: url.clone(),
            reason,
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| broken(format!("the backup stream broke: {e}")))?;
            out.write_all(&chunk)
                .await
                .map_err(|e| broken(format!("cannot write the backup: {e}")))?;
            received += chunk.len() as u64;
            progress(received);
        }
        out.flush()
            .await
            .map_err(|e| broken(format!("cannot write the backup: {e}")))?;
        Ok(received)
    }

    /// `POST /v1/restore` with the backup file at `path` as the body;
    /// `progress` gets the bytes sent so far.
    ///
    /// # Errors
    /// [`ClientError`]: `bad_backup` when the node refuses the file.
    pub async fn restore(
        &self,
        path: &std::path::Path,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<crate::backup::RestoreReport, ClientError> {
        use futures_util::StreamExt;
        let url = format!("{}/v1/restore", self.base);
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClientError::Protocol {
                url: url.clone(),
                reason: format!("cannot open {}: {e}", path.display()),
            })?;
        let mut sent = 0u64;
        let stream = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
            if let Ok(c) = &chunk {
                sent += c.len() as u64;
                progress(sent);
            }
            chunk
        });
        let req = self
            .http
            .post(&url)
            .timeout(LONG_OPERATION)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream));
        self.send(req).await
    }

    /// `GET /v1/docs/{id}/save`: the doc's Automerge save.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn save(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self
            .send_raw(self.http.get(self.doc_url(id, "/save")))
            .await?;
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Protocol {
            url,
            reason: e.to_string(),
        })?;
        Ok(bytes.to_vec())
    }

    /// `POST /v1/docs/{id}/merge`: merges Automerge bytes into the doc.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn merge(&self, id: &str, data: Vec<u8>) -> Result<WriteResult, ClientError> {
        let req = self
            .http
            .post(self.doc_url(id, "/merge"))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data);
        self.send(req).await
    }

    /// `POST /v1/docs`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn create(&self, id: Option<&str>, value: Json) -> Result<WriteResult, ClientError> {
        let body = CreateRequest {
            id: id.map(str::to_string),
            value,
        };
        self.send(self.http.post(format!("{}/v1/docs", self.base)).json(&body))
            .await
    }

    /// `GET /v1/docs/{id}` (with `?path=`).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn get(&self, id: &str, path: Option<&str>) -> Result<Json, ClientError> {
        let mut req = self.http.get(self.doc_url(id, ""));
        if let Some(p) = path {
            req = req.query(&[("path", p)]);
        }
        self.send(req).await
    }

    /// `PATCH /v1/docs/{id}` with a merge patch.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn patch(&self, id: &str, patch: &Json) -> Result<WriteResult, ClientError> {
        Ok(self
            .patch_with(id, patch, &WriteOptions::default())
            .await?
            .result)
    }

    /// `PATCH /v1/docs/{id}?replicas=&timeout_ms=` with `Idempotency-Key`
    /// as `opts` asks.
    ///
    /// # Errors
    /// [`ClientError`]; too few replicas in time is the node's 504
    /// `replicas_timeout`.
    pub async fn patch_with(
        &self,
        id: &str,
        patch: &Json,
        opts: &WriteOptions,
    ) -> Result<Written, ClientError> {
        let req = self
            .http
            .patch(self.doc_url(id, ""))
            .header("content-type", "application/merge-patch+json")
            .body(patch.to_string());
        self.send(opts.apply(req)).await
    }

    /// `POST /v1/docs/{id}/ops`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ops(&self, id: &str, ops: &[Op]) -> Result<WriteResult, ClientError> {
        Ok(self
            .ops_with(id, ops, &WriteOptions::default())
            .await?
            .result)
    }

    /// `POST /v1/docs/{id}/ops` as `opts` asks (see [`Client::patch_with`]).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ops_with(
        &self,
        id: &str,
        ops: &[Op],
        opts: &WriteOptions,
    ) -> Result<Written, ClientError> {
        let req = self.http.post(self.doc_url(id, "/ops")).json(ops);
        self.send(opts.apply(req)).await
    }

    /// `GET /v1/docs`, every page: the live docs but the node's system docs.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn list(&self) -> Result<Vec<DocInfo>, ClientError> {
        let mut q = crate::api::ListParams::default();
        let mut all = Vec::new();
        loop {
            let (page, more) = self.list_page(&q).await?;
            q.after = page.last().map(|d| d.id.clone());
            all.extend(page);
            if !more || q.after.is_none() {
                return Ok(all);
            }
        }
    }

    /// `GET /v1/docs?prefix=&after=&limit=&system=`: one page, and whether
    /// more follow (ask again with `after` = the last id).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn list_page(
        &self,
        q: &crate::api::ListParams,
    ) -> Result<(Vec<DocInfo>, bool), ClientError> {
        let req = self.http.get(format!("{}/v1/docs", self.base)).query(q);
        let resp = self.send_raw(req).await?;
        let more = resp.headers().contains_key(reqwest::header::LINK);
        Ok((json_body(resp).await?, more))
    }

    /// `GET /v1/docs/{id}/heads`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn heads(&self, id: &str) -> Result<Vec<String>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Heads {
            heads: Vec<String>,
        }
        let h: Heads = self.send(self.http.get(self.doc_url(id, "/heads"))).await?;
        Ok(h.heads)
    }

    /// `GET /v1/docs/{id}/url`: the doc's `automerge:` URL, for
    /// automerge-repo clients of `GET /v1/automerge`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn automerge_url(&self, id: &str) -> Result<String, ClientError> {
        #[derive(serde::Deserialize)]
        struct Url {
            url: String,
        }
        let u: Url = self.send(self.http.get(self.doc_url(id, "/url"))).await?;
        Ok(u.url)
    }

    /// `GET /v1/docs/{id}/history`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, ClientError> {
        self.send(self.http.get(self.doc_url(id, "/history"))).await
    }

    /// `DELETE /v1/docs/{id}`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn delete(&self, id: &str) -> Result<DeleteResponse, ClientError> {
        self.send(self.http.delete(self.doc_url(id, ""))).await
    }

    /// `GET /v1/peers`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn peers(&self) -> Result<Vec<crate::net::PeerInfo>, ClientError> {
        self.send(self.http.get(format!("{}/v1/peers", self.base)))
            .await
    }

    /// `POST /v1/peers/digest`: the node asks its peers whether they are
    /// in sync with it now; returns how many connected peers it asked.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ask_digests(&self) -> Result<usize, ClientError> {
        let r: crate::api::DigestAsked = self
            .send(self.http.post(format!("{}/v1/peers/digest", self.base)))
            .await?;
        Ok(r.peers)
    }

    /// `GET /v1/status`
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.send(self.http.get(format!("{}/v1/status", self.base)))
            .await
    }
}

/// How a write is sent: replicas to wait for, and an idempotency key.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Answer once this many peers confirmed they stored the write.
    pub replicas: Option<usize>,
    /// How long to wait for them, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Sent as `Idempotency-Key`: a retry with it is applied once.
    pub idempotency_key: Option<String>,
}

impl WriteOptions {
    fn apply(&self, mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(n) = self.replicas {
            req = req.query(&[("replicas", n)]);
        }
        if let Some(t) = self.timeout_ms {
            req = req.query(&[("timeout_ms", t)]);
        }
        if let Some(k) = &self.idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        req
    }
}

/// A write's answer, with the peers that confirmed it when replicas were
/// asked for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Written {
    /// The write's result.
    #[serde(flatten)]
    pub result: WriteResult,
    /// Peers that confirmed they stored it (with `replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Json>,
}

/// A response's JSON body.
async fn json_body<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let url = resp.url().to_string();
    let bytes = resp.bytes().await.map_err(|e| ClientError::Protocol {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
        url,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded_as_one_segment() {
        assert_eq!(encode_id("sensors/greenhouse-3"), "sensors%2Fgreenhouse-3");
        assert_eq!(encode_id("a:b.c_d"), "a%3Ab.c_d");
    }

    #[test]
    fn base_gets_a_scheme() {
        assert_eq!(
            Client::new("127.0.0.1:7700/").base(),
            "http://127.0.0.1:7700"
        );
        assert_eq!(Client::new("http://h:1").base(), "http://h:1");
    }
}
