//! `mergeflow events`: the change feed on stdout, one JSON object per line,
//! following the node across dropped connections and restarts.
//!
//! Each line is `{"event": "change"|"run"|"missed", "id": ID|null, "data": {...}}`:
//! `data` is the event's data as `GET /v1/events` sends it (a change
//! event's, with `--include`, carries `value` or `values`), `id` the event
//! id (change events only). When the stream drops the command reconnects
//! by itself, with `Last-Event-ID` set to the last id it printed, so the
//! node replays what it missed, or sends `missed` (then re-read what you
//! follow). It ends, with exit status 0, on Ctrl-C (or SIGTERM) and when
//! stdout closes (`mergeflow events | head -3`).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use mergeflow::api::Include;
use mergeflow::client::{Client, ClientError, EventsEnd, EventsRequest};

/// What `mergeflow events` follows.
#[derive(clap::Args)]
pub(crate) struct EventsArgs {
    /// Only docs whose id matches this glob, such as `sensors/**`.
    #[arg(long)]
    doc: Option<String>,
    /// Each change event carries the doc right after the change (`doc`:
    /// `data.value`) or the values at its changed paths (`paths`:
    /// `data.values`, JSON Pointer -> value).
    #[arg(long, value_parser = ["doc", "paths"])]
    include: Option<String>,
    /// Start after this event id (resume where an earlier run stopped).
    #[arg(long)]
    after: Option<String>,
}

/// First wait before a reconnect; it doubles up to [`MAX_BACKOFF`] while
/// attempts fail, and starts over after a connection that lasted.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection this long, or one that brought events, lasted.
const LASTED: Duration = Duration::from_secs(30);

/// `mergeflow events` (see the module doc).
pub(crate) async fn events(c: &Client, args: EventsArgs) -> Result<()> {
    let include = args
        .include
        .map(Include::try_from)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let req = EventsRequest {
        doc: args.doc,
        include,
        last_event_id: args.after,
    };
    let stop = super::start::shutdown_signal()?;
    tokio::select! {
        r = follow(c, req) => r,
        () = stop => Ok(()),
        () = stdout_closed() => Ok(()),
    }
}

/// Prints the feed, reconnecting when the stream drops, until stdout
/// closes. A refusal (a bad glob, a wrong token) is an error, and so is a
/// node that cannot be reached at the first attempt (a wrong `--api`).
async fn follow(c: &Client, mut req: EventsRequest) -> Result<()> {
    let mut backoff = MIN_BACKOFF;
    let mut connected_once = false;
    loop {
        let began = Instant::now();
        let mut last = req.last_event_id.clone();
        let mut got = false;
        let mut write_error = None;
        let result = c
            .events(&req, |event, id, data| {
                got = true;
                if let Some(id) = id {
                    last = Some(id.to_string());
                }
                let line = serde_json::json!({ "event": event, "id": id, "data": data });
                match print_line(&line.to_string()) {
                    Ok(()) => true,
                    Err(e) => {
                        write_error = Some(e);
                        false
                    }
                }
            })
            .await;
        req.last_event_id = last;
        match write_error {
            Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Some(e) => return Err(anyhow::Error::new(e).context("writing to stdout")),
            None => {}
        }
        let why = match result {
            Ok(EventsEnd::Caller) => return Ok(()),
            Ok(EventsEnd::Node) => "the node ended the event stream".to_string(),
            // Asking again would be refused again (a 4xx but a timeout or
            // a rate limit); a node never reached is likely a wrong --api.
            Err(e @ ClientError::Api { status, .. })
                if (400..500).contains(&status) && ![408, 429].contains(&status) =>
            {
                return Err(e.into());
            }
            Err(e @ ClientError::Unreachable { .. }) if !connected_once => return Err(e.into()),
            Err(e) => e.to_string(),
        };
        connected_once = true;
        if got || began.elapsed() >= LASTED {
            backoff = MIN_BACKOFF;
        }
        let resume = match &req.last_event_id {
            Some(id) => format!(", to resume after event {id}"),
            None => String::new(),
        };
        // Not eprintln!, which panics when stderr is closed.
        let _ = writeln!(
            std::io::stderr(),
            "mergeflow events: {why}; reconnecting in {} ms{resume}",
            backoff.as_millis()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Writes `line` and a newline to stdout at once.
fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Resolves when stdout is a pipe whose reader has gone (`| head -3`
/// exited): the next line would fail, but the feed may stay quiet for
/// long. Never resolves for a terminal or a file.
async fn stdout_closed() {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;
    // A copy of stdout's descriptor, watched for the error a pipe reports
    // once nobody reads it (nothing is read or written through it).
    let Ok(copy) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return std::future::pending().await;
    };
    // SAFETY: the `AsyncFd` owns `copy`, an `OwnedFd`: it stays open and
    // names the same file description until the `AsyncFd` drops it.
    let watched = unsafe { AsyncFd::register_with_interest(copy, Interest::ERROR) };
    // Files cannot be watched (epoll refuses them): nothing to wait for.
    if let Ok(fd) = watched
        && fd.ready(Interest::ERROR).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}
