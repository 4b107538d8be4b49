//! The client's side of `GET /v1/events`: the request, and a small parser
//! of Server-Sent Events (the format is a few line rules; the feed's
//! events are one `data` line each).

use std::time::Duration;

use serde_json::Value as Json;

use super::{Client, ClientError, LONG_OPERATION, root_cause};
use crate::api::Include;

/// What [`Client::events`] asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsRequest {
    /// Only docs whose id matches this glob (`?doc=`; the node's default
    /// is `**`, every doc).
    pub doc: Option<String>,
    /// What each `change` event carries besides the feed's fields
    /// (`?include=doc|paths`).
    pub include: Option<Include>,
    /// Resume after this event id, sent as the `Last-Event-ID` header: the
    /// node replays what came after it while it still holds it, or sends a
    /// `missed` event.
    pub last_event_id: Option<String>,
}

/// How a [`Client::events`] stream ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsEnd {
    /// The node ended it (it shut down).
    Node,
    /// The caller's callback returned false.
    Caller,
}

/// Longest the stream may stay silent: the node sends a comment every 15 s
/// while it has no events, so a longer silence is a dead connection.
const IDLE: Duration = Duration::from_secs(60);

impl Client {
    /// `GET /v1/events`: the change feed (and run events) as they happen;
    /// `on` gets each event's name (`change`, `missed`, `run`), its id if
    /// it has one (change events), and its data. Returns when the node ends
    /// the stream or `on` returns false.
    ///
    /// # Errors
    /// [`ClientError`]; a broken stream, or one silent for 60 s, is
    /// [`ClientError::Protocol`].
    pub async fn events(
        &self,
        req: &EventsRequest,
        mut on: impl FnMut(&str, Option<&str>, Json) -> bool,
    ) -> Result<EventsEnd, ClientError> {
        use futures_util::StreamExt;
        let mut q: Vec<(&str, &str)> = Vec::new();
        q.extend(req.doc.as_deref().map(|d| ("doc", d)));
        q.extend(req.include.map(|i| ("include", i.as_str())));
        let mut http = self
            .http
            .get(format!("{}/v1/events", self.base))
            .query(&q)
            .timeout(LONG_OPERATION);
        if let Some(id) = &req.last_event_id {
            http = http.header("last-event-id", id);
        }
        let resp = self.send_raw(http).await?;
        let url = resp.url().to_string();
        let broken = |reason: String| ClientError::Protocol {
            url: url.clone(),
            reason,
        };
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        loop {
            let chunk = match tokio::time::timeout(IDLE, body.next()).await {
                Err(_) => {
                    return Err(broken(format!(
                        "the event stream was silent for {} s",
                        IDLE.as_secs()
                    )));
                }
                Ok(None) => return Ok(EventsEnd::Node),
                Ok(Some(chunk)) => chunk.map_err(|e| broken(root_cause(&e)))?,
            };
            for event in parser.push(&chunk) {
                let data = serde_json::from_str(&event.data)
                    .map_err(|e| broken(format!("event data is not JSON: {e}")))?;
                let name = event.name.as_deref().unwrap_or("message");
                if !on(name, event.id.as_deref(), data) {
                    return Ok(EventsEnd::Caller);
                }
            }
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (none: the default, `message`).
    pub name: Option<String>,
    /// `id:` of this event. Unlike a browser's `EventSource`, an event
    /// without one has none, rather than the previous event's.
    pub id: Option<String>,
    /// Its `data:` lines, joined by `\n`.
    pub data: String,
}

/// Splits a Server-Sent Events byte stream into events, chunk by chunk:
/// lines end in `\n` or `\r\n` (a lone `\r` is not taken as an end), a
/// blank line ends an event, `field: value` sets a field (one space after
/// the colon is dropped), comments (`:...`) and unknown fields are skipped,
/// and an event without data is not one (a keep-alive).
#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
    event: SseEvent,
    has_data: bool,
}

impl SseParser {
    /// The events that `bytes`, after what came before, complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(n) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let line = &self.pending[start..start + n];
            start += n + 1;
            let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
            if line.is_empty() {
                let event = std::mem::take(&mut self.event);
                if std::mem::take(&mut self.has_data) {
                    out.push(event);
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&*line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event.name = Some(value.to_string()),
                "id" => self.event.id = Some(value.to_string()),
                "data" => {
                    if self.has_data {
                        self.event.data.push('\n');
                    }
                    self.event.data.push_str(value);
                    self.has_data = true;
                }
                _ => {} // a comment (empty field) or a field we do not use
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: Option<&str>, id: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            name: name.map(str::to_string),
            id: id.map(str::to_string),
            data: data.to_string(),
        }
    }

    #[test]
    fn events_split_across_chunks_and_line_ends() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: change\r\nid: 1-").is_empty());
        assert!(p.push(b"4\ndata: {\"a\"").is_empty());
        let got = p.push(b":1}\r\n\r\nevent: missed\ndata: {}\n\n");
        assert_eq!(
            got,
            [
                event(Some("change"), Some("1-4"), "{\"a\":1}"),
                event(Some("missed"), None, "{}"),
            ]
        );
        assert!(p.push(b"data: x").is_empty(), "no line end yet");
        assert_eq!(p.push(b"\n\n"), [event(None, None, "x")]);
    }

    #[test]
    fn comments_keep_alives_and_unknown_fields_are_skipped() {
        let mut p = SseParser::default();
        assert!(p.push(b":\n\n: keep-alive\n\n").is_empty());
        assert!(
            p.push(b"retry: 10\nevent: change\n\n").is_empty(),
            "no data"
        );
        // The name of an event without data does not leak into the next.
        assert_eq!(p.push(b"data: 1\n\n"), [event(None, None, "1")]);
    }

    #[test]
    fn data_lines_join_and_a_colon_without_a_space_counts() {
        let mut p = SseParser::default();
        let got = p.push(b"data:a\ndata: b:c\ndata\nid:7\n\n");
        assert_eq!(got, [event(None, Some("7"), "a\nb:c\n")]);
    }
}
