//! `GET /v1/events`: the change feed as Server-Sent Events.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::error::{ApiError, WrappedRejection};
use super::extract::ApiResult;
use crate::access::Access;
use crate::doc::DocId;
use crate::feed::ChangeEvent;
use crate::node::Node;

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Doc id glob (default `**`: every doc).
    pub doc: Option<String>,
    /// Resume after this event id (as the `Last-Event-ID` header does).
    pub after: Option<String>,
    /// What of the changed doc each `change` event carries besides the
    /// feed's fields (default: nothing).
    pub include: Option<Include>,
}

/// `include` of `GET /v1/events`: what of the changed doc a `change` event
/// carries, read as `GET /v1/docs/{id}` reads it, at the event's heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Include {
    /// `value`: the whole doc right after the change.
    Doc,
    /// `values`: `{pointer: value}` for each of the event's `paths`, `null`
    /// where the change removed what was there.
    Paths,
}

impl Include {
    /// As in the query: `doc` or `paths`.
    pub fn as_str(self) -> &'static str {
        match self {
            Include::Doc => "doc",
            Include::Paths => "paths",
        }
    }
}

impl TryFrom<String> for Include {
    type Error = String;

    fn try_from(s: String) -> Result<Include, String> {
        match s.as_str() {
            "doc" => Ok(Include::Doc),
            "paths" => Ok(Include::Paths),
            _ => Err(format!(
                "must be `doc` (the doc's JSON) or `paths` (the values at the \
                 changed paths), got {s:?}"
            )),
        }
    }
}

/// A `change` event's data with what `include` asked for.
#[derive(Serialize)]
struct Included<'a> {
    #[serde(flatten)]
    event: &'a ChangeEvent,
    #[serde(flatten)]
    extra: serde_json::Map<String, Json>,
}

/// What `include` adds to change event `e`: `value` (the doc) or `values`
/// (`{pointer: value}`), with `read_at` `"heads"` (the doc at the event's
/// heads: right after the change) or `"current"` (a head is not in the doc
/// any more: its state when the event is sent). When the doc cannot be
/// read (deleted by this change or since, a store failure) `value` /
/// `values` is `null` and `read_error` says why, as `{"code", "message"}`
/// of an API error.
async fn include(node: &Node, e: &ChangeEvent, what: Include) -> serde_json::Map<String, Json> {
    let key = match what {
        Include::Doc => "value",
        Include::Paths => "values",
    };
    let read = if e.deleted {
        Err(ApiError::new(
            axum::http::StatusCode::GONE,
            "deleted",
            format!("this change deleted doc {:?}", e.doc),
        ))
    } else {
        let paths = (what == Include::Paths).then(|| e.paths.clone());
        match DocId::new(e.doc.clone()) {
            Ok(id) => node
                .docs()
                .get_at(id, e.heads.clone(), paths)
                .await
                .map_err(|err| super::read_error(node, err)),
            Err(err) => Err(err.into()),
        }
    };
    let mut extra = serde_json::Map::new();
    match read {
        Ok((value, at)) => {
            extra.insert(key.into(), value);
            extra.insert("read_at".into(), serde_json::json!(at));
        }
        Err(err) => {
            extra.insert(key.into(), Json::Null);
            extra.insert(
                "read_error".into(),
                serde_json::json!({"code": err.code, "message": err.message}),
            );
        }
    }
    extra
}

/// Server-Sent Events: `event: change` with a [`crate::feed::ChangeEvent`] as
/// data and its id as the event id, for every durable change of a matching
/// doc; `event: missed` (data `{"count": n|null}`) when events were lost to
/// this client (it fell behind, or resumed from an id no longer held): re-read
/// the docs it follows. A comment line every 15 s keeps proxies from closing
/// the stream. The stream ends when the node shuts down.
///
/// With `include` (see [`Include`]) each change event's data also carries
/// the doc or the values at its paths, read when the event is sent, at the
/// event's heads (see `include` below for the fields). Events are read one
/// after the other, in order; a client that reads slower than the node
/// changes gets `missed` as any slow client does.
pub(super) async fn events(
    State(node): State<Node>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;
    let Query(q) = query.map_err(|r| WrappedRejection(r, None))?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let after = q.after.or(last);
    let glob = q.doc.as_deref().unwrap_or("**");
    let feed = node.subscribe_after(glob, after.as_deref())?;
    let runs = node.subscribe_runs(glob)?;
    let stop = node.shutdown_token().cancelled_owned();
    // A scoped token follows the docs it may read, and no workflow runs.
    let scoped = matches!(access, Access::Scoped(_));
    let readable = access.clone();
    let feed = feed.filter(move |item| {
        let keep = match item {
            crate::feed::FeedItem::Change(e) => readable.can_read(&e.doc),
            crate::feed::FeedItem::Missed { .. } => true,
        };
        std::future::ready(keep)
    });
    let runs = runs.filter(move |_| std::future::ready(!scoped));
    let (reader, what) = (node.clone(), q.include);
    let changes = feed.then(move |item| {
        let node = reader.clone();
        async move {
            let crate::feed::FeedItem::Change(e) = &item else {
                return (item, None);
            };
            let extra = match what {
                Some(what) => Some(include(&node, e, what).await),
                None => None,
            };
            (item, extra)
        }
    });
    let changes = changes.map(|(item, extra)| {
        let event = match item {
            crate::feed::FeedItem::Change(e) => {
                let event = Event::default().event("change").id(e.id.clone());
                match extra {
                    Some(extra) => event.json_data(Included { event: &e, extra }),
                    None => event.json_data(&*e),
                }
            }
            crate::feed::FeedItem::Missed { count } => Event::default()
                .event("missed")
                .json_data(serde_json::json!({ "count": count })),
        };
        event.unwrap_or_else(|e| Event::default().comment(e.to_string()))
    });
    let runs = runs.map(|e| {
        Event::default()
            .event("run")
            .json_data(&*e)
            .unwrap_or_else(|e| Event::default().comment(e.to_string()))
    });
    let stream = futures_util::stream::select(changes, runs)
        .take_until(stop)
        .map(Ok::<_, axum::Error>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}
