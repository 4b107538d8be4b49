//! The change feed: one event per merged change (a local write, a change
//! merged from a peer, a delete), published in the order the writer applied
//! them, once the change is durable (a local write, or a merge a peer waits
//! to have confirmed) or stored (other merges from peers, flushed within
//! `store.remote_flush_ms`).
//!
//! Events carry a per-boot sequence number. The feed keeps the most recent
//! events in memory so that a subscriber that reconnects with the id of the
//! last event it saw (`Last-Event-ID` on `/v1/events`) gets what it missed; a
//! subscriber that fell further behind, or comes back after a restart, gets a
//! [`FeedItem::Missed`] and should re-read the docs it cares about.
//!
//! ```no_run
//! # async fn run(node: mergeflow::Node) -> anyhow::Result<()> {
//! use futures_util::StreamExt;
//! let mut events = std::pin::pin!(node.subscribe("sensors/*")?);
//! while let Some(item) = events.next().await {
//!     println!("{item:?}");
//! }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use serde::Serialize;
use tokio::sync::broadcast;

/// One merged change of one doc. On `GET /v1/events` it is a `change`
/// event's data; with `include` the data also carries the doc, or the
/// values at `paths`, as they were right after the change
/// ([`crate::api::Include`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeEvent {
    /// Event id: `<boot>-<seq>`, increasing within a boot.
    pub id: String,
    /// Sequence number within this boot.
    #[serde(skip)]
    pub seq: u64,
    /// The doc.
    pub doc: String,
    /// Its heads after the change (hex); empty for a delete.
    pub heads: Vec<String>,
    /// Peer id of the node the change came from (this node's own for a local write).
    pub origin: String,
    /// True for a write made on this node.
    pub local: bool,
    /// True if the doc was deleted.
    pub deleted: bool,
    /// JSON Pointers of what changed (at most [`MAX_PATHS`]; see `paths_truncated`).
    pub paths: Vec<String>,
    /// The list may be incomplete: more paths changed than are listed, or
    /// paths were not recorded (the change was made before anyone subscribed).
    pub paths_truncated: bool,
    /// The workflow run that wrote the change, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

/// A change written by a workflow: which, and how deep in a chain of
/// triggered runs (a run started by a user's write has depth 1). Stored as
/// the Automerge change message, so peers see it too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// The workflow's name.
    pub workflow: String,
    /// Runs in the chain up to and including the one that wrote it.
    pub depth: u32,
}

impl Cause {
    const PREFIX: &'static str = "workflow ";

    /// The change message that records this cause.
    pub fn message(&self) -> String {
        format!("{}{} depth {}", Self::PREFIX, self.workflow, self.depth)
    }

    /// The cause a change message records, if any.
    pub fn from_message(message: &str) -> Option<Cause> {
        let rest = message.strip_prefix(Self::PREFIX)?;
        let (workflow, depth) = rest.split_once(" depth ")?;
        let depth = depth.split(' ').next()?;
        Some(Cause {
            workflow: workflow.to_string(),
            depth: depth.parse().ok()?,
        })
    }
}

/// A workflow run that was created or changed state (see
/// `crate::workflow`): live only, not kept for resuming subscribers (the
/// run log is: `GET /v1/runs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEvent {
    /// Run id.
    pub run: u64,
    /// The workflow.
    pub workflow: String,
    /// The triggering doc (empty for a scheduled run).
    pub doc: String,
    /// `queued`, `running`, `done`, `dead` or `skipped`.
    pub status: String,
    /// Why it is dead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix ms of the update.
    pub at_ms: u64,
}

/// Most paths listed in one event.
pub const MAX_PATHS: usize = 64;

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedItem {
    /// A change.
    Change(Arc<ChangeEvent>),
    /// Events were lost to this subscriber (it fell behind, or resumed from an
    /// id the feed no longer holds): re-read the docs it follows.
    Missed {
        /// How many, when known.
        count: Option<u64>,
    },
}

/// A doc id glob: `*` matches within a `/`-separated segment, `**` across
/// segments, `?` one character, `{a,b}` alternatives.
#[derive(Debug, Clone)]
pub struct DocGlob(globset::GlobMatcher);

impl DocGlob {
    /// Parses `pattern`.
    ///
    /// # Errors
    /// A message naming what is wrong with the pattern.
    pub fn new(pattern: &str) -> Result<DocGlob, String> {
        globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map(|g| DocGlob(g.compile_matcher()))
            .map_err(|e| format!("invalid doc glob {pattern:?}: {e}"))
    }

    /// True if `doc` matches.
    pub fn matches(&self, doc: &str) -> bool {
        self.0.is_match(doc)
    }
}

/// Events kept for resuming subscribers.
const KEEP: usize = 8192;
/// Events a live subscriber may fall behind before it misses some.
const LIVE_CAPACITY: usize = 4096;

/// The feed of one node.
pub struct Feed {
    boot: u64,
    runs: broadcast::Sender<Arc<RunEvent>>,
    subscribed: std::sync::atomic::AtomicBool,
    tx: broadcast::Sender<Arc<ChangeEvent>>,
    recent: Mutex<Recent>,
}

struct Recent {
    next_seq: u64,
    events: VecDeque<Arc<ChangeEvent>>,
}

impl Feed {
    /// An empty feed for boot number `boot`.
    pub fn new(boot: u64) -> Feed {
        let (tx, _) = broadcast::channel(LIVE_CAPACITY);
        let (runs, _) = broadcast::channel(LIVE_CAPACITY);
        Feed {
            boot,
            runs,
            subscribed: Default::default(),
            tx,
            recent: Mutex::new(Recent {
                next_seq: 1,
                events: VecDeque::new(),
            }),
        }
    }

    /// True once anyone subscribed: until then nobody can need the changed
    /// paths, which cost Automerge a patch log per change.
    pub fn has_subscribed(&self) -> bool {
        self.subscribed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes events, in order, giving each its id and sequence number
    /// (whatever `id` and `seq` they carry are replaced).
    pub fn publish(&self, events: impl IntoIterator<Item = ChangeEvent>) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for mut e in events {
            let seq = recent.next_seq;
            recent.next_seq += 1;
            e.seq = seq;
            e.id = format!("{}-{seq}", self.boot);
            let event = Arc::new(e);
            if recent.events.len() == KEEP {
                recent.events.pop_front();
            }
            recent.events.push_back(event.clone());
            // Sent under the lock, so live order matches `recent`'s order.
            let _ = self.tx.send(event);
        }
    }

    /// Announces a run update to the run subscribers (nobody listening is fine).
    pub fn publish_run(&self, e: RunEvent) {
        let _ = self.runs.send(Arc::new(e));
    }

    /// Run updates from now on, of runs on docs matching `glob` (scheduled
    /// runs, which have no doc, only with `**`). A subscriber that falls
    /// more than 4,096 behind skips what it missed.
    pub fn subscribe_runs(
        &self,
        glob: DocGlob,
    ) -> impl Stream<Item = Arc<RunEvent>> + Send + use<> {
        let all = glob.matches("any/thing/at/all") && glob.matches("x");
        let rx = self.runs.subscribe();
        futures_util::stream::unfold((rx, glob), move |(mut rx, glob)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if (e.doc.is_empty() && all) || glob.matches(&e.doc) => {
                        return Some((e, (rx, glob)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// From now on, changes record the paths they touch (see
    /// [`has_subscribed`](Self::has_subscribed)).
    pub fn record_paths(&self) {
        self.subscribed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// As [`subscribe`](Self::subscribe), without asking for changed paths:
    /// events list paths only while another subscriber wants them (or after
    /// [`record_paths`](Self::record_paths)).
    pub fn subscribe_quiet(&self, glob: DocGlob) -> impl Stream<Item = FeedItem> + Send + use<> {
        self.stream(glob, None)
    }

    /// Events matching `glob` from now on, after those since `after` (an
    /// event id) if given.
    pub fn subscribe(
        &self,
        glob: DocGlob,
        after: Option<&str>,
    ) -> impl Stream<Item = FeedItem> + Send + use<> {
        self.record_paths();
        self.stream(glob, after)
    }

    fn stream(
        &self,
        glob: DocGlob,
        after: Option<&str>,
    ) -> impl Stream<Item = FeedItem> + Send + use<> {
        let (rx, backlog, last) = {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let rx = self.tx.subscribe();
            let last = recent.next_seq - 1;
            let backlog: VecDeque<FeedItem> = match after {
                None => VecDeque::new(),
                Some(id) => self
                    .since(&recent, id)
                    .into_iter()
                    .filter(|item| match item {
                        FeedItem::Change(e) => glob.matches(&e.doc),
                        FeedItem::Missed { .. } => true,
                    })
                    .collect(),
            };
            (rx, backlog, last)
        };
        let state = (rx, backlog, last, glob);
        futures_util::stream::unfold(state, |(mut rx, mut backlog, last, glob)| async move {
            loop {
                if let Some(item) = backlog.pop_front() {
                    return Some((item, (rx, backlog, last, glob)));
                }
                match rx.recv().await {
                    Ok(e) if e.seq <= last => {} // already in the backlog
                    Ok(e) if glob.matches(&e.doc) => {
                        return Some((FeedItem::Change(e), (rx, backlog, last, glob)));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let item = FeedItem::Missed { count: Some(n) };
                        return Some((item, (rx, backlog, last, glob)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// The kept events after event id `after`, led by a `Missed` when some
    /// are no longer kept or the id is from another boot.
    fn since(&self, recent: &Recent, after: &str) -> VecDeque<FeedItem> {
        let parsed = after
            .split_once('-')
            .and_then(|(b, s)| Some((b.parse::<u64>().ok()?, s.parse::<u64>().ok()?)));
        let Some((boot, seq)) = parsed else {
            return VecDeque::from([FeedItem::Missed { count: None }]);
        };
        let oldest = recent.events.front().map_or(recent.next_seq, |e| e.seq);
        let last = recent.next_seq - 1;
        if boot != self.boot || seq > last {
            // Another boot (or a future id): everything may have changed.
            return VecDeque::from([FeedItem::Missed { count: None }]);
        }
        let mut out = VecDeque::new();
        if seq + 1 < oldest {
            out.push_back(FeedItem::Missed {
                count: Some(oldest - seq - 1),
            });
        }
        out.extend(
            recent
                .events
                .iter()
                .filter(|e| e.seq > seq)
                .map(|e| FeedItem::Change(e.clone())),
        );
        out
    }
}
