//! Effects: steps that act outside the node (`http`, `exec`), and who runs
//! them.
//!
//! The effects of one (workflow, doc) execute on one owner: rendezvous
//! hashing of the pair over the live nodes that run the workflow (this node,
//! and each connected peer whose membership doc lists the workflow). Per
//! doc, not per state, because nodes may fold a doc's states differently;
//! the owner's handling of a later state stands for the earlier ones. The
//! highest ranked live node always sees itself as owner, so some node
//! executes it; when the owner goes away the next in rank takes over. An
//! effect is at-least-once: it carries a stable idempotency key
//! (`<run key>-<step id>`, the same on every node for the same state), and
//! the owner records what it handled in a marker doc that the other nodes
//! wait for.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Prefix of the system docs (membership, effect markers); never triggers.
pub use crate::doc::SYSTEM_PREFIX;
/// Most bytes of an answer or of a command's output kept in the run record.
const MAX_OUTPUT: usize = 16 * 1024;
/// Markers kept per (workflow, doc) marker doc.
pub const MAX_MARKERS: usize = 64;

/// Why an effect failed: `Final` failures would fail the same way again.
pub enum Failure {
    /// Do not retry (e.g. HTTP 4xx).
    Final(String),
    /// Retry with backoff (timeouts, connection errors, 5xx, exit codes).
    Retry(String),
}

/// The membership doc of node `peer`: which workflows it runs.
pub fn member_doc(peer: &str) -> String {
    format!("{SYSTEM_PREFIX}nodes/{peer}")
}

/// The doc holding delivery markers of `workflow`'s effects on `doc`.
pub fn marker_doc(workflow: &str, doc: &str) -> String {
    let h = Sha256::digest(doc.as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{SYSTEM_PREFIX}effects/{workflow}/{hex}")
}

/// The key of one effect in the marker docs and its `Idempotency-Key`:
/// `<run key>-<step id>`, the same on every node for the same state.
pub fn effect_key(run_key: &str, step: &str) -> String {
    format!("{run_key}-{step}")
}

/// What a marker says about one effect key (see [`effect_key`]).
///
/// A marker without a `state` field records that its `by` node handled the
/// effect: delivered it, or skipped it because its `when` was false
/// (`skipped: true`). The other states record a decision that every node
/// follows for that key, so that all show the same status for it:
///
/// - `trying`: node `by` is working on it (its first attempt failed and it
///   retries, or a user asked it to retry); the others wait for it while it
///   is connected and do not take it over.
/// - `dead`: node `by` gave up after the last attempt; the others mark
///   their run of that key dead too, and nobody takes it over.
/// - `skipped`: a user skipped the dead run on node `by`; the others mark
///   their run of that key skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    /// Delivered (or skipped as its owner, `when` false) by `by`.
    Handled {
        /// The node.
        by: String,
        /// True if its `when` was false.
        when_false: bool,
    },
    /// Node `by` is attempting it.
    Trying {
        /// The node.
        by: String,
    },
    /// Dead-lettered by `by`, with the last error.
    Dead {
        /// The node.
        by: String,
        /// The last attempt's error.
        error: String,
    },
    /// Skipped by a user on node `by` after it was dead-lettered.
    Skipped {
        /// The node.
        by: String,
    },
}

impl Marker {
    /// Reads a marker entry; `None` if it has no `by`.
    pub fn parse(m: &Json) -> Option<Marker> {
        let by = m["by"].as_str()?.to_string();
        Some(match m["state"].as_str() {
            Some("trying") => Marker::Trying { by },
            Some("dead") => Marker::Dead {
                by,
                error: m["error"].as_str().unwrap_or("failed").to_string(),
            },
            Some("skipped") => Marker::Skipped { by },
            _ => Marker::Handled {
                by,
                when_false: m["skipped"] == Json::Bool(true),
            },
        })
    }

    /// The fields this marker adds to the common ones (`by`, `at`, `step`,
    /// `heads`).
    pub fn fields(&self) -> serde_json::Map<String, Json> {
        let mut out = serde_json::Map::new();
        match self {
            Marker::Handled { when_false, .. } => {
                out.insert("skipped".into(), Json::Bool(*when_false));
            }
            Marker::Trying { .. } => {
                out.insert("state".into(), "trying".into());
            }
            Marker::Dead { error, .. } => {
                out.insert("state".into(), "dead".into());
                out.insert("error".into(), Json::String(cut(error)));
            }
            Marker::Skipped { .. } => {
                out.insert("state".into(), "skipped".into());
            }
        }
        out
    }
}

/// The workflow whose marker doc `id` is, if it is one.
pub fn marker_workflow(id: &str) -> Option<&str> {
    let rest = id.strip_prefix(SYSTEM_PREFIX)?.strip_prefix("effects/")?;
    Some(rest.split_once('/')?.0)
}

/// The node ranked first for `key` among `candidates` (rendezvous hashing).
pub fn owner<'a>(key: &str, candidates: &'a [String]) -> Option<&'a String> {
    candidates.iter().max_by_key(|peer| {
        let mut h = Sha256::new();
        h.update(key.as_bytes());
        h.update([0]);
        h.update(peer.as_bytes());
        let d = h.finalize();
        (
            u128::from_be_bytes(d[..16].try_into().expect("16 bytes")),
            (*peer).clone(),
        )
    })
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_OUTPUT {
        return s.to_string();
    }
    let mut end = MAX_OUTPUT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

/// POSTs `body` to `url` with `Idempotency-Key: key`. 2xx is success; 408,
/// 429 and 5xx are retried; other answers are final.
pub async fn http(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    body: &Json,
    key: &str,
) -> Result<Json, Failure> {
    let resp = client
        .post(url)
        .timeout(timeout)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .map_err(|e| {
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                reason = format!("{reason}: {s}");
                src = s.source();
            }
            Failure::Retry(format!("POST {url}: {reason}"))
        })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let answer = json!({ "status": status.as_u16(), "body": cut(&text) });
    if status.is_success() {
        return Ok(answer);
    }
    let msg = format!("POST {url}: HTTP {status}: {}", cut(&text));
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(Failure::Retry(msg))
    } else {
        Err(Failure::Final(msg))
    }
}

/// Reads `r` to its end, keeping the first bytes (4 x [`MAX_OUTPUT`]) and
/// discarding the rest: a command that writes a lot must not block on a
/// full pipe.
async fn read_capped(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let cap = MAX_OUTPUT * 4;
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Runs `command` (no shell) with `input` as JSON on stdin and `env` added
/// to its environment; kills it after `timeout`. Exit code 0 is success.
pub async fn exec(
    command: &[String],
    timeout: Duration,
    input: &Json,
    env: &BTreeMap<&str, String>,
    cwd: &std::path::Path,
) -> Result<Json, Failure> {
    let (program, args) = command.split_first().expect("checked at load: not empty");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::Retry(format!("cannot start {program:?}: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let bytes = serde_json::to_vec(input).expect("JSON serializes");
    let run = async {
        // A command that does not read its stdin must not block us.
        let feed = async {
            let _ = stdin.write_all(&bytes).await;
            drop(stdin);
        };
        let (_, out, err, status) = tokio::join!(
            feed,
            read_capped(&mut stdout),
            read_capped(&mut stderr),
            child.wait()
        );
        (status, out, err)
    };
    let (status, out, err) = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| Failure::Retry(format!("{program:?} ran longer than {timeout:?}; killed")))?;
    let status = status.map_err(|e| Failure::Retry(format!("{program:?}: {e}")))?;
    let stdout = cut(&String::from_utf8_lossy(&out));
    let stderr = cut(&String::from_utf8_lossy(&err));
    if status.success() {
        Ok(json!({ "exit": 0, "stdout": stdout, "stderr": stderr }))
    } else {
        Err(Failure::Retry(format!(
            "{program:?} exited with {status}: {}",
            stderr.trim_end()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_owner_is_stable_and_moves_only_when_the_owner_leaves() {
        let peers: Vec<String> = (0..5).map(|i| format!("peer-{i}")).collect();
        let mut moved = 0;
        for k in 0..200 {
            let key = format!("key-{k}");
            let first = owner(&key, &peers).unwrap().clone();
            assert_eq!(owner(&key, &peers), Some(&first), "stable");
            let mut rest = peers.clone();
            rest.retain(|p| *p != "peer-0");
            let after = owner(&key, &rest).unwrap();
            if first != "peer-0" {
                assert_eq!(*after, first, "only keys owned by the leaver move");
            } else {
                moved += 1;
            }
        }
        // About a fifth of the keys were peer-0's.
        assert!((20..=70).contains(&moved), "{moved}");
        assert_eq!(owner("k", &[]), None);
    }

    #[test]
    fn markers_read_back_what_they_record() {
        let by = "peer-a".to_string();
        for m in [
            Marker::Handled {
                by: by.clone(),
                when_false: false,
            },
            Marker::Handled {
                by: by.clone(),
                when_false: true,
            },
            Marker::Trying { by: by.clone() },
            Marker::Dead {
                by: by.clone(),
                error: "HTTP 503".into(),
            },
            Marker::Skipped { by: by.clone() },
        ] {
            let mut j = json!({ "by": by, "at": 1, "step": "post", "heads": [] });
            for (k, v) in m.fields() {
                j[k.as_str()] = v;
            }
            assert_eq!(Marker::parse(&j), Some(m));
        }
        // Markers written before decisions existed read as deliveries.
        let old = json!({ "by": "p", "skipped": false });
        assert_eq!(
            Marker::parse(&old),
            Some(Marker::Handled {
                by: "p".into(),
                when_false: false
            })
        );
        assert_eq!(Marker::parse(&json!({})), None);
        assert_eq!(marker_workflow(&marker_doc("alert", "s/1")), Some("alert"));
        assert_eq!(marker_workflow(&member_doc("p")), None);
    }

    #[tokio::test]
    async fn exec_feeds_stdin_passes_env_and_reports_failures() {
        let env: BTreeMap<&str, String> = [("MERGEFLOW_RUN_KEY", "abc".to_string())].into();
        let cat = [
            "sh".to_string(),
            "-c".into(),
            "cat; echo \" $MERGEFLOW_RUN_KEY\"".into(),
        ];
        let out = exec(
            &cat,
            Duration::from_secs(10),
            &json!({"a": 1}),
            &env,
            std::path::Path::new("."),
        )
        .await
        .ok()
        .unwrap();
        assert_eq!(out["stdout"], "{\"a\":1} abc\n");
        let fail = ["sh".to_string(), "-c".into(), "echo bad >&2; exit 3".into()];
        match exec(
            &fail,
            Duration::from_secs(10),
            &json!({}),
            &env,
            std::path::Path::new("."),
        )
        .await
        {
            Err(Failure::Retry(e)) => {
                assert!(e.contains("exit status: 3") && e.contains("bad"), "{e}")
            }
            _ => panic!("exit 3 is a failure"),
        }
        // Far more output than a pipe holds: read and cut, not blocked.
        let loud = [
            "sh".to_string(),
            "-c".into(),
            "head -c 2000000 /dev/zero | tr '\\0' x".into(),
        ];
        let out = exec(
            &loud,
            Duration::from_secs(20),
            &json!({}),
            &env,
            std::path::Path::new("."),
        )
        .await
        .ok()
        .unwrap();
        assert!(out["stdout"].as_str().unwrap().contains("bytes in all"));
        let slow = ["sleep".to_string(), "30".into()];
        match exec(
            &slow,
            Duration::from_millis(200),
            &json!({}),
            &env,
            std::path::Path::new("."),
        )
        .await
        {
            Err(Failure::Retry(e)) => assert!(e.contains("killed"), "{e}"),
            _ => panic!("a timeout is a failure"),
        }
        let missing = ["/no/such/program".to_string()];
        assert!(matches!(
            exec(
                &missing,
                Duration::from_secs(1),
                &json!({}),
                &env,
                std::path::Path::new(".")
            )
            .await,
            Err(Failure::Retry(_))
        ));
    }
}
