//! Workflows triggered by merges: derive on a cluster, loops stopped by the
//! depth limit, states taken after a restart, dead runs retried and skipped,
//! and bad definitions listed as invalid while the others run.

mod common;

use common::flows::{full_mesh_running, local_node, path_of, write_def};
use common::until;

use std::time::Duration;

use mergeflow::workflow::{Run, RunStatus};
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

const FAHRENHEIT: &str = r#"
name = "fahrenheit"
[on]
doc = "sensors/*"
path = "/celsius"
when = "doc.celsius != ()"

[[steps]]
id = "convert"
kind = "derive"
set = { "/fahrenheit" = "doc.celsius * 9.0 / 5.0 + 32.0" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derive_on_three_nodes_writes_each_value_once_and_everywhere() {
    let seed = common::seed(5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    write_def(&defs, "fahrenheit.toml", FAHRENHEIT);
    let tweak = |c: &mut mergeflow::config::Config| c.workflow.dir = defs.clone();
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr.clone()], tweak).await;
    let c = common::p2p_node(&dir.path().join("c"), vec![a_addr], tweak).await;
    let nodes = [&a, &b, &c];
    until("peers to connect", || async {
        (a.status().await.peers >= 2).then_some(())
    })
    .await;

    let writes = 6;
    for i in 0..writes {
        let celsius = 10 + 5 * i;
        let on = nodes[rng.random_range(0..3)];
        on.doc("sensors/s1")
            .unwrap()
            .patch(json!({ "celsius": celsius }))
            .await
            .unwrap();
        let want = json!(celsius as f64 * 9.0 / 5.0 + 32.0);
        for n in nodes {
            until("the derived value on every node", || async {
                let f = path_of(n, "sensors/s1", "/fahrenheit").await;
                let c = path_of(n, "sensors/s1", "/celsius").await;
                (f.as_ref() == Some(&want) && c == Some(json!(celsius))).then_some(())
            })
            .await;
        }
    }

    // Every node ends with the same history. Each trigger state has one
    // derived change, bar concurrent identical writes (same deps); no
    // derived change was made on top of another one (a sequential duplicate).
    until("identical histories", || async {
        let h: Vec<Vec<String>> = futures_util::future::join_all(nodes.iter().map(|n| async {
            let mut h: Vec<String> = n
                .doc("sensors/s1")
                .unwrap()
                .history()
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.hash)
                .collect();
            h.sort();
            h
        }))
        .await;
        (h[0] == h[1] && h[1] == h[2]).then_some(())
    })
    .await;
    let entries = a.doc("sensors/s1").unwrap().history().await.unwrap();
    let derived: Vec<_> = entries
        .iter()
        .filter(|e| {
            e.message
                .as_deref()
                .is_some_and(|m| m.starts_with("workflow fahrenheit depth 1 "))
        })
        .collect();
    // For each derived change, the trigger writes in its causal past: two
    // derived changes with the same ones are for the same trigger state,
    // and then they must be concurrent (neither in the other's past).
    let deps: std::collections::HashMap<&str, &Vec<String>> =
        entries.iter().map(|e| (e.hash.as_str(), &e.deps)).collect();
    let past = |from: &str| {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack: Vec<&str> = deps[from].iter().map(String::as_str).collect();
        while let Some(h) = stack.pop() {
            if seen.insert(h) {
                stack.extend(deps[h].iter().map(String::as_str));
            }
        }
        seen
    };
    let derived_set: std::collections::BTreeSet<&str> =
        derived.iter().map(|e| e.hash.as_str()).collect();
    let mut by_state: std::collections::BTreeMap<Vec<&str>, Vec<&str>> = Default::default();
    for d in &derived {
        let triggers: Vec<&str> = past(&d.hash)
            .into_iter()
            .filter(|h| !derived_set.contains(h))
            .collect();
        by_state.entry(triggers).or_default().push(&d.hash);
    }
    for same in by_state.values() {
        for x in same {
            for y in same {
                assert!(!past(y).contains(x), "{y} was derived again on top of {x}");
            }
        }
    }
    assert_eq!(
        by_state.len(),
        writes,
        "one derived state per write: {derived:#?}"
    );
    println!(
        "{} derived changes for {writes} writes on 3 nodes",
        derived.len()
    );

    // Every node ran the workflow on every state it saw; the runs on the
    // nodes that did not write found the value there.
    for n in nodes {
        until("every run done", || async {
            let runs = n.workflows().runs(Some("fahrenheit"), None, 1000).unwrap();
            (!runs.is_empty() && runs.iter().all(|r| r.status == RunStatus::Done)).then_some(())
        })
        .await;
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

const PING: &str = r#"
name = "ping"
[on]
doc = "loop/a"
[[steps]]
id = "bump"
kind = "write"
doc = "loop/b"
set = { "/n" = "doc.n + 1" }
"#;

const PONG: &str = r#"
name = "pong"
[on]
doc = "loop/b"
[[steps]]
id = "bump"
kind = "write"
doc = "loop/a"
set = { "/n" = "doc.n + 1" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_depth_limit_stops_a_loop_between_two_workflows() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    write_def(&defs, "ping.toml", PING);
    write_def(&defs, "pong.toml", PONG);
    let node = local_node(&dir.path().join("n"), &defs, |c| c.workflow.max_depth = 4).await;
    until("both workflows loaded", || async {
        (node.workflows().list().len() == 2).then_some(())
    })
    .await;
    node.doc("loop/a")
        .unwrap()
        .patch(json!({"n": 0}))
        .await
        .unwrap();
    let dead: Run = until("a dead run", || async {
        node.workflows()
            .runs(None, Some(RunStatus::Dead), 10)
            .unwrap()
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(dead.workflow, "ping");
    assert_eq!(dead.depth, 5);
    assert!(
        dead.error
            .as_deref()
            .unwrap()
            .contains("workflow.max_depth = 4"),
        "{dead:?}"
    );
    // Depths 1..4 ran: ping wrote b = 1 and 3, pong wrote a = 2 and 4.
    assert_eq!(path_of(&node, "loop/b", "/n").await, Some(json!(3)));
    assert_eq!(path_of(&node, "loop/a", "/n").await, Some(json!(4)));
    // Runs of data steps are recorded as they finish: wait for all four.
    let done = until("the runs at depths 1..4 recorded", || async {
        let done = node
            .workflows()
            .runs(None, Some(RunStatus::Done), 100)
            .unwrap();
        (done.len() >= 4).then_some(done)
    })
    .await;
    assert_eq!(done.len(), 4, "{done:#?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_merged_before_a_workflow_loaded_are_taken_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let defs = dir.path().join("workflows");
    std::fs::create_dir_all(&defs).unwrap();
    {
        let node = local_node(&data, &defs, |_| {}).await;
        for i in 0..5 {
            node.doc(&format!("sensors/s{i}"))
                .unwrap()
                .patch(json!({ "celsius": i }))
                .await
                .unwrap();
        }
        node.doc("other/x")
            .unwrap()
            .patch(json!({"celsius": 1}))
            .await
            .unwrap();
        node.shutdown().await.unwrap();
    }
    write_def(&defs, "fahrenheit.toml", FAHRENHEIT);
    {
        let node = local_node(&data, &defs, |_| {}).await;
        for i in 0..5 {
            let want = json!(i as f64 * 9.0 / 5.0 + 32.0);
            until("derived values of docs written earlier", || async {
                (path_of(&node, &format!("sensors/s{i}"), "/fahrenheit").await
                    == Some(want.clone()))
                .then_some(())
            })
            .await;
        }
        assert_eq!(path_of(&node, "other/x", "/fahrenheit").await, None);
        let runs = until("the runs to finish", || async {
            let runs = node.workflows().runs(None, None, 100).unwrap();
            (runs.len() >= 5 && runs.iter().all(|r| r.status == RunStatus::Done)).then_some(runs)
        })
        .await;
        assert_eq!(runs.len(), 5, "{runs:#?}");
        assert!(runs.iter().all(|r| r.trigger == "startup"), "{runs:#?}");
        node.shutdown().await.unwrap();
    }
    // A restart finds nothing new: no state runs twice.
    let node = local_node(&data, &defs, |_| {}).await;
    node.doc("sensors/s0")
        .unwrap()
        .patch(json!({"celsius": 100}))
        .await
        .unwrap();
    until("the new write's run", || async {
        (path_of(&node, "sensors/s0", "/fahrenheit").await == Some(json!(212.0))).then_some(())
    })
    .await;
    let runs = until("the run to finish", || async {
        let runs = node.workflows().runs(None, None, 100).unwrap();
        (runs.len() >= 6 && runs.iter().all(|r| r.status == RunStatus::Done)).then_some(runs)
    })
    .await;
    assert_eq!(runs.len(), 6, "{runs:#?}");
    // The write may land before the engine follows the feed; then the
    // startup scan takes it. Either way, once.
    assert!(["change", "startup"].contains(&runs[0].trigger.as_str()));
    node.shutdown().await.unwrap();
}

/// Issue 18 item 15: a doc written before its workflow existed, while the
/// node runs, gets a run labelled `definition` (not `startup`: the node
/// did not restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_loaded_while_running_labels_its_runs_definition() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    // A workflow of other docs, there from the start: once it is listed, the
    // engine's load at start is over, and what it loads next is not
    // `startup` (the engine starts its task in the background).
    let other = FAHRENHEIT
        .replace("\"fahrenheit\"", "\"other\"")
        .replace("sensors/*", "other/*");
    write_def(&defs, "other.toml", &other);
    let node = local_node(&dir.path().join("n"), &defs, |_| {}).await;
    until("the load at start", || async {
        (node.workflows().list().len() == 1).then_some(())
    })
    .await;
    node.doc("sensors/old")
        .unwrap()
        .patch(json!({ "celsius": 10 }))
        .await
        .unwrap();
    write_def(&defs, "fahrenheit.toml", FAHRENHEIT);
    let runs = until("the run of the older doc", || async {
        let runs = node.workflows().runs(None, None, 10).unwrap();
        (runs.len() == 1 && runs[0].status == RunStatus::Done).then_some(runs)
    })
    .await;
    assert_eq!(runs[0].doc, "sensors/old");
    // The engine may follow the write's feed event only after the
    // definition loaded (a loaded machine): then the run is the change's.
    // Never `startup`: the node did not restart.
    assert!(
        ["definition", "change"].contains(&runs[0].trigger.as_str()),
        "{runs:#?}"
    );
    assert_eq!(
        path_of(&node, "sensors/old", "/fahrenheit").await,
        Some(json!(50.0))
    );
    node.shutdown().await.unwrap();
}

const TOTAL: &str = r#"
name = "total"
[on]
doc = "orders/*"
path = "/price"
[[steps]]
id = "sum"
kind = "derive"
set = { "/total" = "doc.price * doc.qty" }
[[steps]]
id = "flag"
kind = "derive"
needs = ["sum"]
when = "doc.total > 100"
set = { "/big" = "true" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_runs_say_why_and_can_be_retried_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    write_def(&defs, "total.toml", TOTAL);
    write_def(
        &defs,
        "broken.toml",
        "name = \"broken\"\n[on]\ndoc = \"x\"\n[[steps]]\nid = \"a\"\nkind = \"derive\"\nset = { \"/y\" = \"doc.x +\" }\n",
    );
    let node = local_node(&dir.path().join("n"), &defs, |_| {}).await;
    let list = until("definitions loaded", || async {
        let l = node.workflows().list();
        (l.len() == 2).then_some(l)
    })
    .await;
    let broken = list.iter().find(|w| !w.valid).unwrap();
    assert!(broken.file.ends_with("broken.toml"));
    let err = broken.error.as_deref().unwrap();
    assert!(
        err.contains("step \"a\": set \"/y\"") && err.contains("line 1"),
        "{err}"
    );
    assert!(list.iter().any(|w| w.valid && w.name == "total"));

    let wf = node.workflows();
    node.doc("orders/1")
        .unwrap()
        .patch(json!({"price": "ten", "qty": 2}))
        .await
        .unwrap();
    node.doc("orders/2")
        .unwrap()
        .patch(json!({"price": "ten", "qty": 2}))
        .await
        .unwrap();
    let dead = until("two dead runs", || async {
        let d = wf.runs(Some("total"), Some(RunStatus::Dead), 10).unwrap();
        (d.len() == 2).then_some(d)
    })
    .await;
    for d in &dead {
        let e = d.error.as_deref().unwrap();
        assert!(e.starts_with("step \"sum\": set \"/total\""), "{e}");
        assert_eq!(d.steps[0].attempts, 1, "expression errors are not retried");
        assert_eq!(
            d.steps[1].error.as_deref(),
            Some("needs \"sum\", which failed")
        );
    }
    let d1 = dead.iter().find(|d| d.doc == "orders/1").unwrap();
    let d2 = dead.iter().find(|d| d.doc == "orders/2").unwrap();

    // Fixing the data is a new state, and a new run; a retry then runs the
    // dead run again on the current state, where it finds nothing to write.
    node.doc("orders/1")
        .unwrap()
        .patch(json!({"price": 2, "qty": 60}))
        .await
        .unwrap();
    until("the new state's run", || async {
        let total = path_of(&node, "orders/1", "/total").await;
        let big = path_of(&node, "orders/1", "/big").await;
        (total == Some(json!(120)) && big == Some(json!(true))).then_some(())
    })
    .await;
    let retried = wf.retry(d1.id).await.unwrap();
    assert_eq!(retried.status, RunStatus::Queued);
    let after = until("the retried run to finish", || async {
        let r = wf.run(d1.id).unwrap();
        (r.status == RunStatus::Done).then_some(r)
    })
    .await;
    assert_eq!(after.trigger, "retry");
    assert_eq!(
        after.steps[0].output.as_ref().unwrap()["wrote"],
        json!([]),
        "already there"
    );

    let skipped = wf.skip(d2.id).await.unwrap();
    assert_eq!(skipped.status, RunStatus::Skipped);
    let again = wf.skip(d2.id).await.unwrap_err().to_string();
    assert_eq!(
        again,
        format!(
            "run {} was skipped; only a dead run can be retried or skipped",
            d2.id
        )
    );
    assert!(
        wf.retry(999_999)
            .await
            .unwrap_err()
            .to_string()
            .contains("no run 999999")
    );
    node.shutdown().await.unwrap();
}

/// A local HTTP receiver for effects: counts answered deliveries per
/// idempotency key; in hang mode it takes the next request and never
/// answers it (the owner "dies" mid-delivery).
#[derive(Default)]
struct Receiver {
    delivered: std::collections::HashMap<String, u32>,
    /// The node that made each answered delivery, by key.
    by: std::collections::HashMap<String, String>,
    hung: Vec<(String, String)>,
    hang_next: bool,
}

async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Receiver>>) {
    use axum::routing::post;
    let state: std::sync::Arc<std::sync::Mutex<Receiver>> = Default::default();
    let s = state.clone();
    let app = axum::Router::new().route(
        "/alerts",
        post(
            move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                let s = s.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_string();
                    assert_eq!(body["run"]["idempotency_key"], key);
                    let node = body["run"]["node"].as_str().unwrap().to_string();
                    let hang = {
                        let mut r = s.lock().unwrap();
                        if r.hang_next {
                            r.hang_next = false;
                            r.hung.push((key.clone(), node));
                            true
                        } else {
                            *r.delivered.entry(key.clone()).or_default() += 1;
                            r.by.insert(key, node);
                            false
                        }
                    };
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_effect_is_delivered_once_per_key_even_when_its_owner_dies() {
    let seed = common::seed(7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (url, recv) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let alert = format!(
        "name = \"alert\"\n[on]\ndoc = \"sensors/*\"\npath = \"/celsius\"\n[[steps]]\nid = \"post\"\nkind = \"http\"\nurl = \"{url}\"\ntimeout = \"60s\"\nretry = {{ attempts = 10, initial = \"100ms\", max = \"1s\" }}\n"
    );
    write_def(&defs, "alert.toml", &alert);
    let tweak = |c: &mut mergeflow::config::Config| c.workflow.dir = defs.clone();
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr.clone()], tweak).await;
    let c = common::p2p_node(&dir.path().join("c"), vec![a_addr], tweak).await;
    let nodes = vec![a, b, c];
    full_mesh_running(&nodes, &["alert"]).await;

    let writes = 5;
    for i in 0..writes {
        let before = recv.lock().unwrap().delivered.len();
        nodes[rng.random_range(0..3)]
            .doc("sensors/s1")
            .unwrap()
            .patch(json!({ "celsius": i }))
            .await
            .unwrap();
        until("the delivery of the new state", || async {
            (recv.lock().unwrap().delivered.len() > before).then_some(())
        })
        .await;
    }
    // Every node finishes its run of every state: one delivered it, the
    // others saw its marker.
    for n in &nodes {
        until("every run done", || async {
            let runs = n.workflows().runs(Some("alert"), None, 100).unwrap();
            // A node may fold a state into the next one (triggers fire on
            // state), so it may have fewer runs; none is left waiting.
            let ok = !runs.is_empty() && runs.iter().all(|r| r.status == RunStatus::Done);
            ok.then_some(())
        })
        .await;
    }

    // The owner of the next state takes the request and dies before it
    // answers; another node delivers it.
    recv.lock().unwrap().hang_next = true;
    nodes[rng.random_range(0..3)]
        .doc("sensors/s1")
        .unwrap()
        .patch(json!({ "celsius": 99 }))
        .await
        .unwrap();
    let (key, owner) = until("the owner to take the request", || async {
        recv.lock().unwrap().hung.first().cloned()
    })
    .await;
    let dead = nodes
        .iter()
        .position(|n| n.peer_id().to_string() == owner)
        .unwrap();
    nodes[dead].shutdown().await.unwrap();
    until("another node to deliver it", || async {
        recv.lock()
            .unwrap()
            .delivered
            .contains_key(&key)
            .then_some(())
    })
    .await;

    {
        let r = recv.lock().unwrap();
        assert_eq!(
            r.delivered.len(),
            writes + 1,
            "every trigger state delivered: {:?}",
            r.delivered
        );
        assert!(
            r.delivered.values().all(|n| *n == 1),
            "each key once: {:?}",
            r.delivered
        );
    }
    for (i, n) in nodes.iter().enumerate() {
        if i != dead {
            n.shutdown().await.unwrap();
        }
    }
}

/// A local HTTP receiver that refuses deliveries (503) while `down`, and
/// counts every request it gets (answered or refused) per idempotency
/// key, with the node that made each.
#[derive(Default)]
struct Switch {
    down: bool,
    hits: Vec<(String, String)>,
}

async fn switch_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Switch>>) {
    use axum::routing::post;
    let state: std::sync::Arc<std::sync::Mutex<Switch>> = Default::default();
    let s = state.clone();
    let app = axum::Router::new().route(
        "/alerts",
        post(
            move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                let s = s.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_string();
                    let node = body["run"]["node"].as_str().unwrap().to_string();
                    let mut r = s.lock().unwrap();
                    r.hits.push((key, node));
                    if r.down {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                    } else {
                        (axum::http::StatusCode::OK, "ok")
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

/// Each node's run of run key `key` (workflow `alert`), if it has one.
fn runs_of_key(nodes: &[mergeflow::Node], key: &str) -> Vec<Option<Run>> {
    nodes
        .iter()
        .map(|n| {
            n.workflows()
                .runs(Some("alert"), None, 1000)
                .unwrap()
                .into_iter()
                .find(|r| r.key == key)
        })
        .collect()
}

/// Waits until every node has a run of `key` in `status`.
async fn all_in(nodes: &[mergeflow::Node], key: &str, status: RunStatus) -> Vec<Run> {
    until(&format!("every node's run of {key} {status:?}"), || async {
        let runs = runs_of_key(nodes, key);
        runs.iter()
            .all(|r| r.as_ref().is_some_and(|r| r.status == status))
            .then(|| runs.into_iter().flatten().collect())
    })
    .await
}

/// Issue 18 item 9: a dead-lettered effect is a decision for the whole
/// cluster. The owner retries it and gives up; the others follow its
/// marker (dead, under the same run key) instead of taking it over after
/// `workflow.effect_wait_ms`; `runs retry` or `runs skip` on any node
/// applies everywhere, and the effect is attempted by one node only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_effect_is_one_decision_for_the_cluster() {
    let (url, recv) = switch_receiver().await;
    recv.lock().unwrap().down = true;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let attempts = 4;
    let alert = format!(
        "name = \"alert\"\n[on]\ndoc = \"sensors/*\"\n[[steps]]\nid = \"post\"\nkind = \"http\"\nurl = \"{url}\"\nretry = {{ attempts = {attempts}, backoff = \"fixed\", initial = \"1s\" }}\n"
    );
    write_def(&defs, "alert.toml", &alert);
    // The owner retries for 3 s; the others would take over after 2 s.
    let tweak = |c: &mut mergeflow::config::Config| {
        c.workflow.dir = defs.clone();
        c.workflow.effect_wait_ms = 2_000;
    };
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr.clone()], tweak).await;
    let c = common::p2p_node(&dir.path().join("c"), vec![a_addr], tweak).await;
    let nodes = vec![a, b, c];
    full_mesh_running(&nodes, &["alert"]).await;
    let index_of = |peer: &str| {
        nodes
            .iter()
            .position(|n| n.peer_id().to_string() == peer)
            .unwrap()
    };
    let hits_of = |key: &str| -> Vec<String> {
        recv.lock()
            .unwrap()
            .hits
            .iter()
            .filter(|(k, _)| k.starts_with(key))
            .map(|(_, by)| by.clone())
            .collect()
    };

    // One state per round; each is dead-lettered on every node, then
    // retried on its owner, retried on another node, or skipped elsewhere.
    for (round, action) in ["retry on the owner", "retry elsewhere", "skip elsewhere"]
        .into_iter()
        .enumerate()
    {
        recv.lock().unwrap().down = true;
        let seen = recv.lock().unwrap().hits.len();
        nodes[round % 3]
            .doc("sensors/s1")
            .unwrap()
            .patch(json!({ "celsius": round }))
            .await
            .unwrap();
        let effect_key = until("the first attempt", || async {
            let r = recv.lock().unwrap();
            r.hits.get(seen).map(|(k, _)| k.clone())
        })
        .await;
        let key = effect_key.trim_end_matches("-post").to_string();
        let dead = all_in(&nodes, &key, RunStatus::Dead).await;
        let hits = hits_of(&key);
        assert_eq!(
            hits.len(),
            attempts,
            "{action}: one node attempts the effect, {attempts} times: {hits:?}"
        );
        let owner = hits[0].clone();
        assert!(hits.iter().all(|h| *h == owner), "{hits:?}");
        for r in &dead {
            let e = r.error.as_deref().unwrap();
            assert!(e.contains("503"), "{action}: {e}");
        }
        let other = (index_of(&owner) + 1) % 3;
        let on = if action == "retry on the owner" {
            index_of(&owner)
        } else {
            other
        };
        let id = dead[on].id; // in node order
        if action == "skip elsewhere" {
            nodes[on].workflows().skip(id).await.unwrap();
            all_in(&nodes, &key, RunStatus::Skipped).await;
            assert_eq!(hits_of(&key).len(), attempts, "a skip delivers nothing");
        } else {
            recv.lock().unwrap().down = false;
            nodes[on].workflows().retry(id).await.unwrap();
            let done = all_in(&nodes, &key, RunStatus::Done).await;
            let hits = hits_of(&key);
            let retrier = nodes[on].peer_id().to_string();
            assert_eq!(
                &hits[attempts..],
                std::slice::from_ref(&retrier),
                "{action}: delivered once, by the node asked to retry"
            );
            for r in done {
                let out = r.steps[0].output.as_ref().unwrap();
                if let Some(by) = out.get("delivered_by") {
                    assert_eq!(by, &json!(retrier), "{action}");
                }
            }
        }
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// Effects of workflows that only local or only remote changes trigger are
/// delivered by a node the state triggered: the writer for `local`, one of
/// the others for `remote` (never the writer, which does not run it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_only_effects_are_delivered_by_a_triggered_node() {
    let seed = common::seed(11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (url, recv) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    for (name, origin) in [("mine", "local"), ("theirs", "remote")] {
        let def = format!(
            "name = \"{name}\"\n[on]\ndoc = \"{name}/*\"\norigin = \"{origin}\"\n[[steps]]\nid = \"post\"\nkind = \"http\"\nurl = \"{url}\"\n"
        );
        write_def(&defs, &format!("{name}.toml"), &def);
    }
    // No taking over: the node that owns the effect must be one that runs it.
    let tweak = |c: &mut mergeflow::config::Config| {
        c.workflow.dir = defs.clone();
        c.workflow.effect_wait_ms = 600_000;
    };
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr.clone()], tweak).await;
    let c = common::p2p_node(&dir.path().join("c"), vec![a_addr], tweak).await;
    let nodes = vec![a, b, c];
    full_mesh_running(&nodes, &["mine", "theirs"]).await;

    let writes = 4;
    for i in 0..writes {
        for doc in ["mine/x", "theirs/y"] {
            let seen: Vec<String> = recv.lock().unwrap().by.keys().cloned().collect();
            let writer = nodes[rng.random_range(0..3)].peer_id().to_string();
            let node = nodes.iter().find(|n| n.peer_id().to_string() == writer);
            node.unwrap()
                .doc(doc)
                .unwrap()
                .patch(json!({ "n": i }))
                .await
                .unwrap();
            let what = format!("{doc} state {i} delivered (seed {seed})");
            let from = until(&what, || async {
                let r = recv.lock().unwrap();
                r.by.iter()
                    .find(|(k, _)| !seen.contains(k))
                    .map(|(_, from)| from.clone())
            })
            .await;
            if doc.starts_with("mine/") {
                assert_eq!(
                    from, writer,
                    "seed {seed}: a local-only effect runs on its writer"
                );
            } else {
                assert_ne!(
                    from, writer,
                    "seed {seed}: the writer of a remote-only state does not run it"
                );
            }
        }
    }
    for n in &nodes {
        until("every run done, none waiting", || async {
            let runs = n.workflows().runs(None, None, 100).unwrap();
            runs.iter()
                .all(|r| r.status == RunStatus::Done)
                .then_some(())
        })
        .await;
    }
    let delivered = recv.lock().unwrap().delivered.clone();
    assert_eq!(delivered.len(), 2 * writes, "seed {seed}: {delivered:?}");
    assert!(
        delivered.values().all(|n| *n == 1),
        "seed {seed}: each key once: {delivered:?}"
    );
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

const POLICIES: &str = r#"
name = "policies"
[on]
doc = "shared/*"
[[steps]]
id = "ts"
kind = "resolve"
path = "/ts"
policy = "timestamp"
[[steps]]
id = "prio"
kind = "resolve"
path = "/prio"
policy = "priority"
[[steps]]
id = "ver"
kind = "resolve"
path = "/ver"
policy = "version"
[[steps]]
id = "idem"
kind = "resolve"
path = "/idem"
policy = "idempotent"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_conflict_policy_makes_three_peers_converge_on_its_winner() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    write_def(&defs, "policies.toml", POLICIES);
    let priority = [1, 3, 5]; // a, b, c
    let data = |i: usize| dir.path().join(["a", "b", "c"][i]);
    // Offline, one after another in time (a, then c, then b), each node
    // writes every place: concurrent writes, as far as the docs know.
    for (i, (ts, ver, idem, key)) in [
        (0, ("a", 3, "same-op", Some("K"))),
        (2, ("c", 7, "other-op", None)),
        (1, ("b", 5, "same-op", Some("K"))),
    ] {
        let node = local_node(&data(i), &defs, |c| c.node.priority = priority[i]).await;
        let id = mergeflow::DocId::new("shared/x").unwrap();
        let docs = node.docs();
        let value = json!({ "ts": ts, "prio": ts });
        docs.write(
            id.clone(),
            mergeflow::testing::runtime::Change::Patch(value),
        )
        .await
        .unwrap();
        // A record compared as a whole is set explicitly: objects a merge
        // patch creates at once merge key by key (see the README).
        let ver = json!([{"op": "set", "path": "/ver", "value": { "version": ver, "by": ts }}]);
        let ver = mergeflow::testing::runtime::Change::Ops(serde_json::from_value(ver).unwrap());
        docs.write(id.clone(), ver).await.unwrap();
        let idem = mergeflow::testing::runtime::Change::Patch(json!({ "idem": idem }));
        match key {
            Some(k) => docs
                .write_idempotent(id, idem, false, k.into())
                .await
                .unwrap(),
            None => docs.write(id, idem).await.unwrap(),
        };
        node.shutdown().await.unwrap();
    }
    // Online: they sync, see the conflicts, and each resolves them.
    let tweak = |i: usize| {
        let defs = defs.clone();
        move |c: &mut mergeflow::config::Config| {
            c.workflow.dir = defs;
            c.node.priority = priority[i];
        }
    };
    let a = common::p2p_node(&data(0), vec![], tweak(0)).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&data(1), vec![a_addr.clone()], tweak(1)).await;
    let c = common::p2p_node(&data(2), vec![a_addr], tweak(2)).await;
    let want = json!({
        "ts": "b",                             // the latest clock
        "prio": "c",                           // the highest priority
        "ver": { "version": 7, "by": "c" },    // the highest version
        "idem": "other-op",                    // K counts once, at its first (oldest) use
    });
    for n in [&a, &b, &c] {
        until("every node to read the policies' winners", || async {
            let v = n.doc("shared/x").unwrap().get().await.ok()?;
            (v == want).then_some(())
        })
        .await;
    }
    // Where reads returned a loser, a node wrote the winner; where they
    // already returned the winner, nothing was written. No run failed. (Runs
    // of data steps are recorded as they finish, so poll for the writer's.)
    let wrote = until("every resolve run done, a winner written", || async {
        let mut wrote = 0;
        for n in [&a, &b, &c] {
            let runs = n.workflows().runs(Some("policies"), None, 100).unwrap();
            if runs.is_empty() || runs.iter().any(|r| r.status != RunStatus::Done) {
                return None;
            }
            for r in runs {
                for s in r.steps {
                    let w = s
                        .output
                        .as_ref()
                        .map(|o| o["wrote"].as_array().map_or(0, Vec::len));
                    wrote += w.unwrap_or(0);
                }
            }
        }
        (wrote >= 1).then_some(wrote)
    })
    .await;
    assert!(wrote >= 1, "some winner had to be written");
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_with_an_idempotency_key_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = mergeflow::Node::builder()
        .data_dir(dir.path().join("n"))
        .api("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let url = format!("http://{}/v1/docs/orders%2F1/ops", node.api_addr().unwrap());
    let http = reqwest::Client::new();
    let send = |key: &'static str| {
        http.post(&url)
            .header("Idempotency-Key", key)
            .json(&json!([{ "op": "increment", "path": "/n", "by": 5 }]))
            .send()
    };
    node.doc("orders/1")
        .unwrap()
        .ops(vec![mergeflow::doc::Op::Set {
            path: "/n".into(),
            value: json!(0),
            kind: Some(mergeflow::doc::ValueKind::Counter),
        }])
        .await
        .unwrap();
    let first: Value = send("req-1").await.unwrap().json().await.unwrap();
    let again: Value = send("req-1").await.unwrap().json().await.unwrap();
    let other: Value = send("req-2").await.unwrap().json().await.unwrap();
    assert_eq!(first["changed"], true);
    assert_eq!(again["changed"], false, "a retry is not applied twice");
    assert_eq!(again["heads"], first["heads"]);
    assert_eq!(other["changed"], true);
    assert_eq!(path_of(&node, "orders/1", "/n").await, Some(json!(10)));
    let bad = http
        .post(&url)
        .header("Idempotency-Key", "a b")
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // System docs are written by the workflow API only.
    let sys = format!(
        "http://{}/v1/docs/_mergeflow%2Fworkflows%2Fx",
        node.api_addr().unwrap()
    );
    let refused = http
        .patch(&sys)
        .json(&json!({"text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    node.shutdown().await.unwrap();
}

fn sh(script: String) -> String {
    format!("command = [\"sh\", \"-c\", {}]", toml_string(&script))
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string is a valid TOML basic string
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_an_exec_step_on_its_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let out = dir.path().join("ticks.txt");
    let def = format!(
        "name = \"tick\"\n[on]\nschedule = \"every 1s\"\n[[steps]]\nid = \"log\"\nkind = \"exec\"\n{}\n",
        sh(format!(
            "cat > /dev/null; echo \"$MERGEFLOW_RUN_KEY $MERGEFLOW_STEP\" >> {}",
            out.display()
        ))
    );
    write_def(&defs, "tick.toml", &def);
    let node = local_node(&dir.path().join("n"), &defs, |_| {}).await;
    let lines = until("two ticks", || async {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert_ne!(lines[0], lines[1], "each tick has its own key");
    assert!(lines.iter().all(|l| l.ends_with(" log")));
    let runs = node.workflows().runs(Some("tick"), None, 10).unwrap();
    assert!(runs.iter().all(|r| r.trigger == "schedule"));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_step_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let data = dir.path().join("n");
    let hold = dir.path().join("hold");
    let out = dir.path().join("out.txt");
    std::fs::write(&hold, "").unwrap();
    // The step hangs while `hold` exists, then records the doc it was given.
    let script = format!(
        "while [ -f {hold} ]; do sleep 0.05; done; cat >> {out}; echo >> {out}",
        hold = hold.display(),
        out = out.display()
    );
    let def = format!(
        "name = \"slow\"\n[on]\ndoc = \"jobs/*\"\n[[steps]]\nid = \"work\"\nkind = \"exec\"\ntimeout = \"60s\"\n{}\n",
        sh(script)
    );
    write_def(&defs, "slow.toml", &def);
    let node = local_node(&data, &defs, |_| {}).await;
    until("the workflow loaded", || async {
        (!node.workflows().list().is_empty()).then_some(())
    })
    .await;
    node.doc("jobs/1")
        .unwrap()
        .patch(json!({"n": 1}))
        .await
        .unwrap();
    let run = until("the step to be running", || async {
        let r = node
            .workflows()
            .runs(Some("slow"), None, 10)
            .unwrap()
            .into_iter()
            .next()?;
        (r.status == RunStatus::Running
            && r.steps[0].state == mergeflow::workflow::StepState::Running)
            .then_some(r)
    })
    .await;
    node.shutdown().await.unwrap(); // the run dies with the node, mid-step
    drop(node);
    assert!(!out.exists(), "the step never finished");
    std::fs::remove_file(&hold).unwrap();

    let node = local_node(&data, &defs, |_| {}).await;
    let done = until("the run to resume and finish", || async {
        let r = node.workflows().run(run.id).unwrap();
        (r.status == RunStatus::Done).then_some(r)
    })
    .await;
    assert_eq!(done.key, run.key, "the same run, same idempotency key");
    assert_eq!(done.steps[0].attempts, 2, "one attempt died with the node");
    let text = std::fs::read_to_string(&out).unwrap();
    let got: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(got["doc"], json!({"n": 1}));
    assert_eq!(got["run"]["key"], run.key);
    // Resumed, not triggered again: one run for the one state.
    assert_eq!(
        node.workflows().runs(Some("slow"), None, 10).unwrap().len(),
        1
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_effect_is_retried_then_dead_lettered() {
    use axum::routing::post;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/fail",
        post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "down for maintenance",
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/fail", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let alerts = dir.path().join("alerts.jsonl");
    let def = format!(
        "name = \"hook\"\n[on]\ndoc = \"jobs/*\"\n[[steps]]\nid = \"post\"\nkind = \"http\"\nurl = \"{url}\"\nretry = {{ attempts = 3, backoff = \"fixed\", initial = \"50ms\" }}\n[on_failure]\nkind = \"exec\"\n{}\n",
        sh(format!(
            "cat >> {}; echo >> {}",
            alerts.display(),
            alerts.display()
        ))
    );
    write_def(&defs, "hook.toml", &def);
    let node = local_node(&dir.path().join("n"), &defs, |_| {}).await;
    let mut runs_feed = Box::pin(node.subscribe_runs("jobs/*").unwrap());
    until("the workflow loaded", || async {
        (!node.workflows().list().is_empty()).then_some(())
    })
    .await;
    node.doc("jobs/1")
        .unwrap()
        .patch(json!({"n": 1}))
        .await
        .unwrap();
    let dead = until("the run dead-lettered", || async {
        node.workflows()
            .runs(Some("hook"), Some(RunStatus::Dead), 10)
            .unwrap()
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(dead.steps[0].attempts, 3);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3);
    let e = dead.error.clone().unwrap();
    assert!(
        e.contains("503") && e.contains("down for maintenance"),
        "{e}"
    );
    // The on_failure effect got the dead run.
    let alert: Value = until("the on_failure alert", || async {
        let text = std::fs::read_to_string(&alerts).ok()?;
        serde_json::from_str(text.lines().next()?).ok()
    })
    .await;
    assert_eq!(alert["run"]["id"], dead.id);
    assert_eq!(alert["run"]["status"], "dead");
    // The run's updates were on the feed, ending dead.
    use futures_util::StreamExt;
    let mut statuses = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(10), runs_feed.next()).await {
        statuses.push(e.status.clone());
        if e.status == "dead" {
            break;
        }
    }
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("running"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("dead"),
        "{statuses:?}"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_workflow_reaches_every_node_and_disabling_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-workflows");
    let tweak = |c: &mut mergeflow::config::Config| c.workflow.dir = empty.clone();
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], tweak).await;
    until("peers to connect", || async {
        (a.status().await.peers >= 1).then_some(())
    })
    .await;

    a.workflows().apply(FAHRENHEIT).await.unwrap();
    until("b to run the applied workflow", || async {
        let w = b.workflows().get("fahrenheit").ok()?;
        (w.state == "active").then_some(())
    })
    .await;
    b.doc("sensors/x")
        .unwrap()
        .patch(json!({"celsius": 100}))
        .await
        .unwrap();
    until("b to derive", || async {
        (path_of(&b, "sensors/x", "/fahrenheit").await == Some(json!(212.0))).then_some(())
    })
    .await;

    a.workflows()
        .set_enabled("fahrenheit", false)
        .await
        .unwrap();
    until("b to see it disabled", || async {
        let w = b.workflows().get("fahrenheit").ok()?;
        (w.state == "disabled").then_some(())
    })
    .await;
    b.doc("sensors/y")
        .unwrap()
        .patch(json!({"celsius": 0}))
        .await
        .unwrap();
    // The write has reached a, which runs nothing either.
    until("the write on a", || async {
        (path_of(&a, "sensors/y", "/celsius").await == Some(json!(0))).then_some(())
    })
    .await;
    assert_eq!(path_of(&b, "sensors/y", "/fahrenheit").await, None);
    assert_eq!(
        b.workflows()
            .runs(None, None, 10)
            .unwrap()
            .iter()
            .filter(|r| r.doc == "sensors/y")
            .count(),
        0
    );

    // A bad definition is refused before it is stored; so is one that
    // would run commands on every node.
    let wf = a.workflows();
    let err = wf.apply("name = \"x\"\n").await.unwrap_err().to_string();
    assert!(err.contains("request body"), "{err}");
    let exec = "name = \"x\"\n[on]\ndoc = \"d/*\"\n[[steps]]\nid = \"s\"\nkind = \"exec\"\ncommand = [\"true\"]\n";
    let err = wf.apply(exec).await.unwrap_err().to_string();
    assert!(err.contains("workflow.allow_applied_exec"), "{err}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_runs_only_on_nodes_whose_labels_it_selects() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    write_def(
        &defs,
        "f.toml",
        &FAHRENHEIT.replace(
            "name = \"fahrenheit\"",
            "name = \"fahrenheit\"\nnodes = { role = \"gateway\" }",
        ),
    );
    let sensor = local_node(&dir.path().join("s"), &defs, |c| {
        c.node.labels.insert("role".into(), "sensor".into());
    })
    .await;
    let gateway = local_node(&dir.path().join("g"), &defs, |c| {
        c.node.labels.insert("role".into(), "gateway".into());
    })
    .await;
    let state = |n: &mergeflow::Node| n.workflows().get("fahrenheit").map(|w| w.state);
    until("both to load it", || async {
        (state(&sensor).is_ok() && state(&gateway).is_ok()).then_some(())
    })
    .await;
    assert_eq!(state(&sensor).unwrap(), "not for this node (labels)");
    assert_eq!(state(&gateway).unwrap(), "active");
    for n in [sensor, gateway] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_fold_states_differently_still_finish_their_effects() {
    let (url, recv) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let alert = format!(
        "name = \"alert\"\n[on]\ndoc = \"sensors/*\"\npath = \"/celsius\"\n[[steps]]\nid = \"post\"\nkind = \"http\"\nurl = \"{url}\"\nwhen = \"doc.celsius != ()\"\n"
    );
    write_def(&defs, "alert.toml", &alert);
    // Nobody may fall back on taking over: effects must finish by the owner.
    let tweak = |c: &mut mergeflow::config::Config| {
        c.workflow.dir = defs.clone();
        c.workflow.effect_wait_ms = 600_000;
    };
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], tweak).await;
    for (n, m) in [(&a, &b), (&b, &a)] {
        let doc = format!("_mergeflow/nodes/{}", m.peer_id());
        until("membership docs", || async {
            (path_of(n, &doc, "/workflows/alert").await == Some(json!(true))).then_some(())
        })
        .await;
    }
    // A burst of concurrent writes: each node folds the states as they
    // reach it.
    for i in 0..8 {
        let on = if i % 2 == 0 { &a } else { &b };
        on.doc("sensors/s1")
            .unwrap()
            .patch(json!({ "celsius": i }))
            .await
            .unwrap();
    }
    for n in [&a, &b] {
        until("every run done, none waiting", || async {
            let runs = n.workflows().runs(Some("alert"), None, 100).unwrap();
            (!runs.is_empty() && runs.iter().all(|r| r.status == RunStatus::Done)).then_some(())
        })
        .await;
    }
    {
        let r = recv.lock().unwrap();
        assert!(!r.delivered.is_empty(), "the newest state was delivered");
        assert!(
            r.delivered.values().all(|n| *n == 1),
            "each key once: {:?}",
            r.delivered
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_log_is_pruned_to_keep_runs() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    write_def(&defs, "fahrenheit.toml", FAHRENHEIT);
    let node = local_node(&dir.path().join("n"), &defs, |c| c.workflow.keep_runs = 3).await;
    until("the workflow loaded", || async {
        (!node.workflows().list().is_empty()).then_some(())
    })
    .await;
    for i in 0..20 {
        node.doc(&format!("sensors/s{i}"))
            .unwrap()
            .patch(json!({ "celsius": i }))
            .await
            .unwrap();
    }
    until("the last derived value", || async {
        (path_of(&node, "sensors/s19", "/fahrenheit").await.is_some()).then_some(())
    })
    .await;
    // Pruned every 3 runs to the newest 3 finished (plus the runs since):
    // each poll adds a run, so a prune comes after the others finished.
    let mut extra = 0;
    let kept = until("the log pruned", || {
        extra += 1;
        let doc = format!("sensors/extra-{extra}");
        let node = &node;
        async move {
            let runs = node.workflows().runs(None, None, 100).unwrap();
            if runs.len() <= 6 {
                return Some(runs);
            }
            node.doc(&doc)
                .unwrap()
                .patch(json!({ "celsius": 1 }))
                .await
                .unwrap();
            None
        }
    })
    .await;
    assert!(kept.len() <= 6, "{}", kept.len());
    node.shutdown().await.unwrap();
}

/// A user applies a definition and disables it at once, before the runner
/// has loaded it: that works, and the workflow ends up loaded and disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_can_be_disabled_right_after_it_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let node = local_node(&dir.path().join("n"), &dir.path().join("defs"), |_| {}).await;
    let engine = node.workflows();
    for i in 0..20 {
        let text = PING.replace("name = \"ping\"", &format!("name = \"quick-{i}\""));
        let applied = engine.apply(&text).await.unwrap();
        assert_eq!(applied.name, format!("quick-{i}"));
        let off = engine.set_enabled(&applied.name, false).await.unwrap();
        assert_eq!(off.state, "disabled");
    }
    until("all twenty loaded, disabled", || async {
        let list = engine.list();
        (list.len() == 20 && list.iter().all(|w| w.state == "disabled")).then_some(())
    })
    .await;
    assert!(matches!(
        engine.set_enabled("never-applied", false).await,
        Err(mergeflow::workflow::WorkflowError::NoWorkflow(_))
    ));
    node.shutdown().await.unwrap();
}
