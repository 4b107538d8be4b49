//! `GET /v1/events`: the change feed as Server-Sent Events.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::WrappedRejection;
use super::extract::ApiResult;
use crate::access::Access;
use crate::node::Node;

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Doc id glob (default `**`: every doc).
    pub doc: Option<String>,
    /// Resume after this event id (as the `Last-Event-ID` header does).
    pub after: Option<String>,
}

/// Server-Sent Events: `event: change` with a [`crate::feed::ChangeEvent`] as
/// data and its id as the event id, for every durable change of a matching
/// doc; `event: missed` (data `{"count": n|null}`) when events were lost to
/// this client (it fell behind, or resumed from an id no longer held): re-read
/// the docs it follows. A comment line every 15 s keeps proxies from closing
/// the stream. The stream ends when the node shuts down.
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
    let changes = feed.map(|item| {
        let event = match item {
            crate::feed::FeedItem::Change(e) => Event::default()
                .event("change")
                .id(e.id.clone())
                .json_data(&*e),
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
