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

use super::request::Method;

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

/// One request of an `http` step.
pub struct Request<'a> {
    /// Its method.
    pub method: Method,
    /// Where to.
    pub url: &'a str,
    /// Longest wait for the whole answer.
    pub timeout: Duration,
    /// Extra headers, `${NAME}` standing for environment variables.
    pub headers: &'a BTreeMap<String, String>,
    /// The JSON body, for methods that send one.
    pub body: Option<&'a Json>,
    /// Added to the URL's query (checked: strings, numbers, booleans).
    pub query: &'a [(String, String)],
    /// Sent as `Idempotency-Key`.
    pub key: &'a str,
    /// Most bytes of the answer's body kept (`workflow.max_step_output`).
    pub max_output: u64,
}

/// Sends `req`. 2xx is success, with `{"status", "body"}` as the output:
/// the body parsed as JSON when it is JSON, else its text. 408, 429 and 5xx
/// are retried; other answers are final, as is a body over `max_output` or
/// a header naming an environment variable this node does not have.
pub async fn http(client: &reqwest::Client, req: Request<'_>) -> Result<Json, Failure> {
    let what = format!("{} {}", req.method.as_str(), req.url);
    let mut builder = client
        .request(req.method.to_reqwest(), req.url)
        .timeout(req.timeout)
        .header("Idempotency-Key", req.key);
    if !req.query.is_empty() {
        builder = builder.query(req.query);
    }
    for (name, template) in req.headers {
        let value = super::request::expand(template, |n| std::env::var(n).ok())
            .map_err(|e| Failure::Final(format!("{what}: header {name}: {e}")))?;
        builder = builder.header(name.as_str(), value);
    }
    if let Some(body) = req.body {
        builder = builder.json(body);
    }
    let failed = |e: reqwest::Error| {
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason = format!("{reason}: {s}");
            src = s.source();
        }
        Failure::Retry(format!("{what}: {reason}"))
    };
    let mut resp = builder.send().await.map_err(failed)?;
    let status = resp.status();
    let too_big = |n: u64| {
        Failure::Final(format!(
            "{what}: the answer's body is {n} bytes or more, over workflow.max_step_output \
             ({} bytes): raise it, or ask the source for less (a page at a time)",
            req.max_output
        ))
    };
    if let Some(n) = resp.content_length()
        && n > req.max_output
        && status.is_success()
    {
        return Err(too_big(n));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > req.max_output {
            if status.is_success() {
                return Err(too_big(bytes.len() as u64));
            }
            break; // an error's text: the start says enough
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    if status.is_success() {
        return Ok(json!({ "status": status.as_u16(), "body": parse_output(&bytes) }));
    }
    let msg = format!("{what}: HTTP {status}: {}", cut(&text));
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(Failure::Retry(msg))
    } else {
        Err(Failure::Final(msg))
    }
}

/// A step's output text as later steps see it: JSON when it parses as
/// JSON, else the text (null when empty).
fn parse_output(bytes: &[u8]) -> Json {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Json::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Reads `r` to its end, keeping the first `cap` bytes and discarding the
/// rest (a command that writes a lot must not block on a full pipe);
/// returns them and how many bytes there were in all.
async fn read_capped(r: &mut (impl tokio::io::AsyncRead + Unpin), cap: u64) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, total),
            Ok(n) => {
                total += n as u64;
                let room = (cap as usize).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Runs `command` (no shell) with `input` as JSON on stdin and `env` added
/// to its environment; kills it after `timeout`. Exit code 0 is success,
/// with `{"status": 0, "stdout", "stderr"}` as the output: stdout parsed as
/// JSON when it is JSON, else its text. Stdout over `max_output` bytes
/// fails the step for good.
pub async fn exec(
    command: &[String],
    timeout: Duration,
    input: &Json,
    env: &BTreeMap<&str, String>,
    cwd: &std::path::Path,
    max_output: u64,
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
            read_capped(&mut stdout, max_output),
            read_capped(&mut stderr, MAX_OUTPUT as u64),
            child.wait()
        );
        (status, out, err)
    };
    let (status, out, err) = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| Failure::Retry(format!("{program:?} ran longer than {timeout:?}; killed")))?;
    let status = status.map_err(|e| Failure::Retry(format!("{program:?}: {e}")))?;
    let ((out, out_len), (err, _)) = (out, err);
    let stderr = cut(&String::from_utf8_lossy(&err));
    if status.success() && out_len > max_output {
        return Err(Failure::Final(format!(
            "{program:?} wrote {out_len} bytes to stdout, over workflow.max_step_output \
             ({max_output} bytes): raise it, or have it write less"
        )));
    }
    if status.success() {
        let stdout = parse_output(&out);
        Ok(json!({ "exit": 0, "status": 0, "stdout": stdout, "stderr": stderr }))
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

    const CAP: u64 = 1 << 20;

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
            CAP,
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
            CAP,
        )
        .await
        {
            Err(Failure::Retry(e)) => {
                assert!(e.contains("exit status: 3") && e.contains("bad"), "{e}")
            }
            _ => panic!("exit 3 is a failure"),
        }
        // Far more output than a pipe holds: read to the end, not blocked,
        // and refused as over the cap rather than cut.
        let loud = [
            "sh".to_string(),
            "-c".into(),
            "head -c 2000000 /dev/zero | tr '\\0' x".into(),
        ];
        match exec(
            &loud,
            Duration::from_secs(20),
            &json!({}),
            &env,
            std::path::Path::new("."),
            CAP,
        )
        .await
        {
            Err(Failure::Final(e)) => assert!(
                e.contains("2000000 bytes") && e.contains("workflow.max_step_output"),
                "{e}"
            ),
            _ => panic!("over the cap is a failure"),
        }
        // JSON on stdout is the output's value.
        let object = ["sh".to_string(), "-c".into(), "echo '{\"n\": 3}'".into()];
        let out = exec(
            &object,
            Duration::from_secs(10),
            &json!({}),
            &env,
            ".".as_ref(),
            CAP,
        )
        .await
        .ok()
        .unwrap();
        assert_eq!(out["stdout"], json!({"n": 3}));
        assert_eq!(out["status"], 0);
        let slow = ["sleep".to_string(), "30".into()];
        match exec(
            &slow,
            Duration::from_millis(200),
            &json!({}),
            &env,
            std::path::Path::new("."),
            CAP,
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
                std::path::Path::new("."),
                CAP,
            )
            .await,
            Err(Failure::Retry(_))
        ));
    }
}
