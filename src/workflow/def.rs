//! Workflow definitions: one TOML file per workflow, parsed and checked
//! before anything runs, with errors that name the file, the step and the
//! key.
//!
//! ```toml
//! name = "fahrenheit"
//! [on]
//! doc = "sensors/*"
//! path = "/celsius"
//! origin = "any"
//!
//! [[steps]]
//! id = "convert"
//! kind = "derive"
//! set = { "/fahrenheit" = "doc.celsius * 9 / 5 + 32" }
//!
//! [[steps]]
//! id = "alert"
//! kind = "http"
//! needs = ["convert"]
//! when = "doc.fahrenheit > 100"
//! url = "http://127.0.0.1:9000/alerts"
//! retry = { attempts = 5, backoff = "exponential", initial = "200ms", max = "30s" }
//! ```
//!
//! Expressions (`when`, the values of `set`) are kept as text here; the
//! expression engine checks them when it compiles the workflow.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value as Json;

use super::request::{Method, check_headers};
use crate::doc::conflict::ConflictValue;
use crate::feed::DocGlob;

/// A definition that cannot be used: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("workflow {source_name}: {what}")]
pub struct DefError {
    /// The file (or API request) the definition came from.
    pub source_name: String,
    /// What is wrong, naming the step and key.
    pub what: String,
}

/// Which merges a trigger takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Writes made on this node.
    Local,
    /// Changes merged from peers.
    Remote,
    /// Both.
    #[default]
    Any,
}

/// A conflict policy of a `resolve` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Highest hybrid logical clock wins.
    Timestamp,
    /// Higher version field, or the causally later write, wins.
    Version,
    /// The value from the node with the higher configured priority wins.
    Priority,
    /// Operations with the same idempotency key apply once.
    Idempotent,
}

impl Policy {
    /// The value `policy` keeps among conflicting ones; ties go to the higher
    /// clock, then to the higher actor and op counter, so every peer picks the
    /// same.
    pub fn pick(self, values: &[ConflictValue]) -> Option<&ConflictValue> {
        let order = |v: &ConflictValue| (v.stamp.hlc, v.actor.clone(), v.counter);
        match self {
            Policy::Timestamp => values.iter().max_by_key(|v| order(v)),
            Policy::Priority => values.iter().max_by_key(|v| (v.stamp.prio, order(v))),
            Policy::Version => {
                let version = |v: &ConflictValue| v.value.get("version").and_then(Json::as_f64);
                values.iter().max_by(|a, b| {
                    let (va, vb) = (version(a), version(b));
                    va.partial_cmp(&vb)
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then_with(|| order(a).cmp(&order(b)))
                })
            }
            Policy::Idempotent => {
                // Values written by changes with one idempotency key are one
                // operation applied more than once: only its first application
                // (lowest clock) counts. Among distinct operations the latest wins.
                let mut first: BTreeMap<&str, &ConflictValue> = BTreeMap::new();
                let mut distinct: Vec<&ConflictValue> = Vec::new();
                for v in values {
                    match v.stamp.idem.as_deref() {
                        None => distinct.push(v),
                        Some(k) => {
                            let e = first.entry(k).or_insert(v);
                            if order(v) < order(e) {
                                *e = v;
                            }
                        }
                    }
                }
                distinct.extend(first.into_values());
                distinct.into_iter().max_by_key(|v| order(v))
            }
        }
    }
}

/// How retries wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// The same wait each time.
    Fixed,
    /// Doubling waits, up to the maximum.
    Exponential,
}

/// Retries of a failed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// How waits grow.
    pub backoff: Backoff,
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 3,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Values computed from expressions, written at JSON Pointers of the
    /// triggering doc when they differ (on every peer).
    Derive {
        /// JSON Pointer -> expression.
        set: BTreeMap<String, String>,
    },
    /// A conflict policy applied to conflicting values at `path`.
    Resolve {
        /// JSON Pointer glob.
        path: String,
        /// Which value wins.
        policy: Policy,
    },
    /// Values written into another doc (e.g. an aggregate).
    Write {
        /// The doc written to.
        doc: String,
        /// JSON Pointer (in `doc`) -> expression.
        set: BTreeMap<String, String>,
        /// An expression whose value (a JSON object) is merged into `doc`
        /// as a JSON merge patch (RFC 7386): keyed records land key by key.
        merge: Option<String>,
    },
    /// A request to `url` (on one owner peer): by default a POST of the doc
    /// and run metadata; the answer is the step's output.
    Http {
        /// http:// or https:// address.
        url: String,
        /// Longest wait for an answer.
        timeout: Duration,
        /// GET, POST (the default), PUT, PATCH or DELETE.
        method: Method,
        /// Extra headers; `${NAME}` in a value is environment variable
        /// `NAME` of the node that sends it.
        headers: BTreeMap<String, String>,
        /// An expression whose value is sent as the JSON body (POST, PUT,
        /// PATCH), instead of the run and the doc.
        body: Option<String>,
        /// An expression whose value (an object of strings, numbers and
        /// booleans) is added to the URL's query.
        query: Option<String>,
    },
    /// A command with the JSON on stdin (on one owner peer).
    Exec {
        /// Program and arguments (no shell).
        command: Vec<String>,
        /// Longest run.
        timeout: Duration,
    },
}

impl Action {
    /// True for the kinds that act outside the node (`http`, `exec`): they
    /// run on one owner peer, with an idempotency key.
    pub fn is_effect(&self) -> bool {
        matches!(self, Action::Http { .. } | Action::Exec { .. })
    }
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Unique within the workflow.
    pub id: String,
    /// Steps that must succeed first.
    pub needs: Vec<String>,
    /// Condition; the step is skipped when false.
    pub when: Option<String>,
    /// What it does.
    pub action: Action,
    /// Retries when it fails.
    pub retry: Retry,
}

/// When a workflow runs.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// Doc id glob (None: no doc trigger, a schedule only).
    pub doc: Option<(String, DocGlob)>,
    /// JSON Pointer glob on the changed paths.
    pub path: Option<String>,
    /// Condition on the doc.
    pub when: Option<String>,
    /// Which merges count.
    pub origin: Origin,
    /// Run every this long (on one owner peer).
    pub every: Option<Duration>,
    /// Run at the times of this cron expression, in UTC (on one owner peer).
    pub cron: Option<croner::Cron>,
}

/// A checked workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// Unique name, `[a-z0-9-]+`.
    pub name: String,
    /// Runs only on nodes carrying all these labels (`node.labels`).
    pub nodes: BTreeMap<String, String>,
    /// When it runs.
    pub trigger: Trigger,
    /// Its steps, in an order where every step comes after those it needs.
    pub steps: Vec<Step>,
    /// An effect (`http` or `exec`) run when a run is dead-lettered, with
    /// the run record as its input: for alerting.
    pub on_failure: Option<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    #[serde(default)]
    nodes: BTreeMap<String, String>,
    on: RawTrigger,
    #[serde(default)]
    steps: Vec<RawStep>,
    on_failure: Option<RawFailure>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailure {
    kind: String,
    url: Option<String>,
    command: Option<Vec<String>>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    doc: Option<String>,
    path: Option<String>,
    when: Option<String>,
    #[serde(default)]
    origin: Origin,
    schedule: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    kind: String,
    #[serde(default)]
    needs: Vec<String>,
    when: Option<String>,
    set: Option<BTreeMap<String, String>>,
    path: Option<String>,
    policy: Option<String>,
    doc: Option<String>,
    merge: Option<String>,
    url: Option<String>,
    method: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    body: Option<String>,
    query: Option<String>,
    command: Option<Vec<String>>,
    timeout: Option<String>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    backoff: Option<String>,
    initial: Option<String>,
    max: Option<String>,
}

/// Parses `text`, a workflow definition from `source_name`, and checks it.
///
/// # Errors
/// The first problem found, naming the step and key.
pub fn parse(source_name: &str, text: &str) -> Result<Workflow, DefError> {
    let err = |what: String| DefError {
        source_name: source_name.to_string(),
        what,
    };
    let raw: RawWorkflow = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    check(raw).map_err(err)
}

fn check(raw: RawWorkflow) -> Result<Workflow, String> {
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(format!(
            "name {:?}: use 1 to 64 of a-z, 0-9 and -",
            raw.name
        ));
    }
    let trigger = check_trigger(raw.on)?;
    if raw.steps.is_empty() {
        return Err("no [[steps]]: a workflow needs at least one".into());
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    for s in raw.steps {
        let id = s.id.clone();
        steps.push(check_step(s).map_err(|e| format!("step {id:?}: {e}"))?);
    }
    let steps = order(steps)?;
    let on_failure = match raw.on_failure {
        None => None,
        Some(f) => {
            if f.kind != "http" && f.kind != "exec" {
                return Err(format!("[on_failure] kind {:?}: http or exec", f.kind));
            }
            let step = RawStep {
                id: "on_failure".into(),
                kind: f.kind,
                needs: vec![],
                when: None,
                set: None,
                path: None,
                policy: None,
                doc: None,
                merge: None,
                url: f.url,
                method: None,
                headers: None,
                body: None,
                query: None,
                command: f.command,
                timeout: f.timeout,
                retry: None,
            };
            Some(check_step(step).map_err(|e| format!("[on_failure]: {e}"))?)
        }
    };
    Ok(Workflow {
        on_failure,
        name: raw.name,
        nodes: raw.nodes,
        trigger,
        steps,
    })
}

fn check_trigger(on: RawTrigger) -> Result<Trigger, String> {
    let doc = match on.doc {
        Some(p) => Some((
            p.clone(),
            DocGlob::new(&p).map_err(|e| format!("[on] doc: {e}"))?,
        )),
        None => None,
    };
    if let Some(p) = &on.path
        && !p.starts_with('/')
    {
        return Err(format!("[on] path {p:?}: a JSON Pointer starts with /"));
    }
    let (every, cron) = match on.schedule.as_deref() {
        None => (None, None),
        Some(s) if s.starts_with("every ") => (
            Some(parse_every(s).map_err(|e| format!("[on] schedule {s:?}: {e}"))?),
            None,
        ),
        Some(s) => {
            let cron = <croner::Cron as std::str::FromStr>::from_str(s).map_err(|e| {
                format!(
                    "[on] schedule {s:?}: neither \"every <duration>\" nor a cron expression: {e}"
                )
            })?;
            (None, Some(cron))
        }
    };
    if doc.is_none() && every.is_none() && cron.is_none() {
        return Err("[on] needs doc (a doc id glob) or schedule".into());
    }
    Ok(Trigger {
        doc,
        path: on.path,
        when: on.when,
        origin: on.origin,
        every,
        cron,
    })
}

/// `every <duration>`.
fn parse_every(s: &str) -> Result<Duration, String> {
    let Some(d) = s.strip_prefix("every ") else {
        return Err("use \"every <duration>\", e.g. \"every 30s\"".into());
    };
    let d = parse_duration(d.trim())?;
    if d < Duration::from_secs(1) {
        return Err("at least 1s".into());
    }
    Ok(d)
}

/// `250ms`, `30s`, `5m`, `2h` (shared with the config: [`crate::duration`]).
pub use crate::duration::parse as parse_duration;

fn check_step(s: RawStep) -> Result<Step, String> {
    let id_ok = !s.id.is_empty()
        && s.id.len() <= 64
        && s.id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !id_ok {
        return Err("id: use 1 to 64 of A-Z, a-z, 0-9, _ and -".into());
    }
    // Each kind takes its own keys; any other key is a mistake worth naming.
    let given = [
        ("set", s.set.is_some()),
        ("path", s.path.is_some()),
        ("policy", s.policy.is_some()),
        ("doc", s.doc.is_some()),
        ("merge", s.merge.is_some()),
        ("url", s.url.is_some()),
        ("method", s.method.is_some()),
        ("headers", s.headers.is_some()),
        ("body", s.body.is_some()),
        ("query", s.query.is_some()),
        ("command", s.command.is_some()),
        ("timeout", s.timeout.is_some()),
    ];
    let takes: &[&str] = match s.kind.as_str() {
        "derive" => &["set"],
        "resolve" => &["path", "policy"],
        "write" => &["doc", "set", "merge"],
        "http" => &["url", "timeout", "method", "headers", "body", "query"],
        "exec" => &["command", "timeout"],
        k => {
            return Err(format!(
                "kind {k:?}: one of derive, resolve, write, http, exec"
            ));
        }
    };
    for (key, present) in given {
        if present && !takes.contains(&key) {
            return Err(format!("kind {} does not take {key}", s.kind));
        }
    }
    let need =
        |v: Option<String>, key: &str| v.ok_or_else(|| format!("kind {} needs {key}", s.kind));
    let timeout = match &s.timeout {
        Some(t) => parse_duration(t).map_err(|e| format!("timeout: {e}"))?,
        None => Duration::from_secs(10),
    };
    let pointers = |set: Option<BTreeMap<String, String>>| -> Result<_, String> {
        let set = set.ok_or_else(|| match s.kind.as_str() {
            "write" => "kind write needs set or merge".to_string(),
            k => format!("kind {k} needs set"),
        })?;
        if set.is_empty() {
            return Err("set is empty".into());
        }
        if let Some(p) = set.keys().find(|p| !p.starts_with('/')) {
            return Err(format!("set {p:?}: a JSON Pointer starts with /"));
        }
        Ok(set)
    };
    let action = match s.kind.as_str() {
        "derive" => Action::Derive {
            set: pointers(s.set)?,
        },
        "resolve" => {
            let path = need(s.path, "path")?;
            if !path.starts_with('/') {
                return Err(format!("path {path:?}: a JSON Pointer starts with /"));
            }
            let policy = match need(s.policy, "policy")?.as_str() {
                "timestamp" => Policy::Timestamp,
                "version" => Policy::Version,
                "priority" => Policy::Priority,
                "idempotent" => Policy::Idempotent,
                p => {
                    return Err(format!(
                        "policy {p:?}: one of timestamp, version, priority, idempotent"
                    ));
                }
            };
            Action::Resolve { path, policy }
        }
        "write" => {
            let doc = need(s.doc, "doc")?;
            let set = match (s.set, &s.merge) {
                (Some(_), Some(_)) => return Err("set or merge, not both".into()),
                (None, Some(_)) => BTreeMap::new(),
                (set, None) => pointers(set)?,
            };
            Action::Write {
                doc,
                set,
                merge: s.merge,
            }
        }
        "http" => {
            let url = need(s.url, "url")?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("url {url:?}: http:// or https://"));
            }
            let method = s
                .method
                .as_deref()
                .map_or(Ok(Method::Post), Method::parse)?;
            if s.body.is_some() && !method.has_body() {
                return Err(format!(
                    "body: a {} request has none (POST, PUT and PATCH do)",
                    method.as_str()
                ));
            }
            let headers = s.headers.unwrap_or_default();
            check_headers(&headers)?;
            Action::Http {
                url,
                timeout,
                method,
                headers,
                body: s.body,
                query: s.query,
            }
        }
        _ => {
            let command = s.command.ok_or("kind exec needs command")?;
            if command.is_empty() {
                return Err("command is empty".into());
            }
            Action::Exec { command, timeout }
        }
    };
    let retry = match s.retry {
        None => Retry::default(),
        Some(r) => check_retry(r).map_err(|e| format!("retry: {e}"))?,
    };
    Ok(Step {
        id: s.id,
        needs: s.needs,
        when: s.when,
        action,
        retry,
    })
}

fn check_retry(r: RawRetry) -> Result<Retry, String> {
    let d = Retry::default();
    let attempts = r.attempts.unwrap_or(d.attempts);
    if attempts == 0 {
        return Err("attempts: at least 1".into());
    }
    let backoff = match r.backoff.as_deref() {
        None => d.backoff,
        Some("fixed") => Backoff::Fixed,
        Some("exponential") => Backoff::Exponential,
        Some(b) => return Err(format!("backoff {b:?}: fixed or exponential")),
    };
    let initial = r.initial.as_deref().map_or(Ok(d.initial), parse_duration)?;
    let max = r.max.as_deref().map_or(Ok(d.max), parse_duration)?;
    if max < initial {
        return Err("max is shorter than initial".into());
    }
    Ok(Retry {
        attempts,
        backoff,
        initial,
        max,
    })
}

/// Orders steps so that each follows the steps it needs (file order where
/// free); an unknown need, a duplicate id or a cycle is an error.
fn order(steps: Vec<Step>) -> Result<Vec<Step>, String> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if index.insert(&s.id, i).is_some() {
            return Err(format!("step {:?}: id used twice", s.id));
        }
    }
    for s in &steps {
        if let Some(n) = s.needs.iter().find(|n| !index.contains_key(n.as_str())) {
            return Err(format!("step {:?}: needs {n:?}, which is not a step", s.id));
        }
    }
    let mut done = vec![false; steps.len()];
    let mut sorted = Vec::with_capacity(steps.len());
    while sorted.len() < steps.len() {
        let ready = (0..steps.len())
            .find(|&i| !done[i] && steps[i].needs.iter().all(|n| done[index[n.as_str()]]));
        let Some(i) = ready else {
            let stuck: Vec<&str> = (0..steps.len())
                .filter(|&i| !done[i])
                .map(|i| steps[i].id.as_str())
                .collect();
            return Err(format!(
                "steps {} need each other (a cycle through needs)",
                stuck.join(", ")
            ));
        };
        done[i] = true;
        sorted.push(i);
    }
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    Ok(sorted.into_iter().filter_map(|i| slots[i].take()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "fahrenheit"
[on]
doc = "sensors/*"
path = "/celsius"
when = "doc.celsius != ()"
origin = "any"

[[steps]]
id = "alert"
kind = "http"
needs = ["convert"]
when = "doc.fahrenheit > 100"
url = "http://127.0.0.1:9000/alerts"
retry = { attempts = 5, backoff = "exponential", initial = "200ms", max = "30s" }

[[steps]]
id = "convert"
kind = "derive"
set = { "/fahrenheit" = "doc.celsius * 9 / 5 + 32" }
"#;

    #[test]
    fn the_example_parses_and_orders_steps_by_needs() {
        let w = parse("fahrenheit.toml", EXAMPLE).unwrap();
        assert_eq!(w.name, "fahrenheit");
        assert!(w.trigger.doc.as_ref().unwrap().1.matches("sensors/a"));
        assert!(!w.trigger.doc.as_ref().unwrap().1.matches("sensors/a/b"));
        assert_eq!(w.trigger.origin, Origin::Any);
        let ids: Vec<&str> = w.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["convert", "alert"]);
        assert_eq!(w.steps[1].retry.attempts, 5);
        assert_eq!(w.steps[1].retry.initial, Duration::from_millis(200));
        assert!(
            matches!(&w.steps[1].action, Action::Http { timeout, .. } if *timeout == Duration::from_secs(10))
        );
    }

    fn error_of(text: &str) -> String {
        parse("w.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn each_mistake_is_named_with_its_step_and_key() {
        let base = "name = \"w\"\n[on]\ndoc = \"d/*\"\n";
        let cases: &[(&str, &str)] = &[
            (
                "name = \"Bad Name\"\n[on]\ndoc = \"d\"\n[[steps]]\nid = \"a\"\nkind = \"derive\"\nset = { \"/x\" = \"1\" }\n",
                "name \"Bad Name\"",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"teleport\"\n",
                "step \"a\": kind \"teleport\"",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"http\"\n",
                "step \"a\": kind http needs url",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"derive\"\nurl = \"http://x\"\nset = { \"/x\" = \"1\" }\n",
                "kind derive does not take url",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"derive\"\nset = { \"x\" = \"1\" }\n",
                "set \"x\": a JSON Pointer",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"resolve\"\npath = \"/v\"\npolicy = \"loudest\"\n",
                "policy \"loudest\"",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\ntimeout = \"5 parsecs\"\n",
                "timeout: duration",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\nneeds = [\"b\"]\n",
                "needs \"b\", which is not a step",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\nneeds = [\"b\"]\n[[steps]]\nid = \"b\"\nkind = \"exec\"\ncommand = [\"true\"]\nneeds = [\"a\"]\n",
                "steps a, b need each other",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n",
                "id used twice",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\nretry = { attempts = 0 }\n",
                "retry: attempts",
            ),
            (
                "[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\ncolour = \"red\"\n",
                "unknown field `colour`",
            ),
            ("", "no [[steps]]"),
        ];
        for (tail, want) in cases {
            let text = if tail.starts_with("name") {
                tail.to_string()
            } else {
                format!("{base}{tail}")
            };
            let got = error_of(&text);
            assert!(got.starts_with("workflow w.toml: "), "{got}");
            assert!(got.contains(want), "for {tail:?}: {got}");
        }
        assert!(
            error_of("name = \"w\"\n[on]\norigin = \"here\"\n").contains("unknown variant `here`")
        );
        assert!(error_of("name = \"w\"\n[on]\norigin = \"local\"\n[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n").contains("[on] needs doc"));
        assert!(error_of("name = \"w\"\n[on]\nschedule = \"every day\"\n[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n").contains("schedule \"every day\""));
        assert!(error_of("name = \"w\"\n[on]\nschedule = \"61 * * * *\"\n[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n").contains("nor a cron expression"));
        let cron = parse("c.toml", "name = \"w\"\n[on]\nschedule = \"*/5 * * * *\"\n[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n").unwrap();
        assert!(cron.trigger.cron.is_some());
    }

    #[test]
    fn schedules_and_durations() {
        let w = parse(
            "s.toml",
            "name = \"tick\"\n[on]\nschedule = \"every 30s\"\n[[steps]]\nid = \"a\"\nkind = \"exec\"\ncommand = [\"true\"]\n",
        )
        .unwrap();
        assert_eq!(w.trigger.every, Some(Duration::from_secs(30)));
        assert!(w.trigger.doc.is_none());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn http_steps_take_a_method_headers_and_a_body_and_writes_a_merge() {
        let head = "name = \"w\"\n[on]\nschedule = \"every 1m\"\n[[steps]]\nid = \"a\"\n";
        let http =
            |rest: &str| format!("{head}kind = \"http\"\nurl = \"https://src.example/x\"\n{rest}");
        let w = parse(
            "p.toml",
            &http("method = \"get\"\nheaders = { Authorization = \"Bearer ${TOKEN}\" }\n"),
        )
        .unwrap();
        match &w.steps[0].action {
            Action::Http {
                method,
                headers,
                body,
                ..
            } => {
                assert_eq!(*method, Method::Get);
                assert_eq!(headers["Authorization"], "Bearer ${TOKEN}");
                assert!(body.is_none());
            }
            other => panic!("{other:?}"),
        }
        let e = parse("p.toml", &http("method = \"GET\"\nbody = \"1\"\n")).unwrap_err();
        assert!(e.to_string().contains("a GET request has none"), "{e}");
        let e = parse("p.toml", &http("method = \"TRACE\"\n")).unwrap_err();
        assert!(e.to_string().contains("one of GET"), "{e}");
        let e = parse("p.toml", &http("headers = { X = \"${no-such}\" }\n")).unwrap_err();
        assert!(e.to_string().contains("headers \"X\""), "{e}");
        let write = |rest: &str| format!("{head}kind = \"write\"\ndoc = \"out\"\n{rest}");
        assert!(parse("p.toml", &write("merge = \"#{a: 1}\"\n")).is_ok());
        let e = parse(
            "p.toml",
            &write("merge = \"1\"\nset = { \"/a\" = \"1\" }\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("set or merge, not both"), "{e}");
        let e = parse("p.toml", &write("")).unwrap_err();
        assert!(e.to_string().contains("needs set or merge"), "{e}");
        let e = parse(
            "p.toml",
            &format!("{head}kind = \"exec\"\ncommand = [\"true\"]\nmethod = \"GET\"\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not take method"), "{e}");
    }
}
