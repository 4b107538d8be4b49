//! Step outputs and pulls from HTTP sources (issue 22): a step reads the
//! answers of the steps it needs; outputs live in the run record, so a run
//! killed between steps or retried sees the same values; a pull on three
//! nodes writes each batch once while its owner dies; bad sources give a
//! clear error and write nothing.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::flows::{full_mesh_running, local_node, path_of, write_def};
use common::until;

use mergeflow::client::Client;
use mergeflow::workflow::{Run, RunStatus, StepState};
use serde_json::{Value, json};

/// A local HTTP source: what it was asked, and what it holds back.
#[derive(Default)]
struct Source {
    /// Requests by path (with query), in order.
    asked: Vec<String>,
    /// Bodies and idempotency keys of the requests that sent them.
    sent: Vec<(String, Value, String)>,
    /// Requests whose path (with query) is listed here hang until the
    /// client gives up (the node asking "dies" mid-step).
    hang: Vec<String>,
}

type Shared = Arc<Mutex<Source>>;

/// Serves:
/// - `GET /price`: `{"price": 7}`;
/// - `GET /data`: `{"items": [1, 2, 3]}` with `Authorization: Bearer t0k`,
///   401 without;
/// - `GET /batch?n=N`: ten records of batch N;
/// - `PUT|POST /sink`: records what it was sent;
/// - `GET /garbage`: text that is not JSON; `GET /huge`: 50 MB;
///   `GET /hang`: never answers; `GET /broken`: 500.
async fn source() -> (String, Shared) {
    use axum::extract::{OriginalUri, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{any, get};
    let state: Shared = Default::default();
    async fn note(s: &Shared, uri: &OriginalUri) -> bool {
        let path = uri.0.to_string();
        let hang = {
            let mut s = s.lock().unwrap();
            s.asked.push(path.clone());
            s.hang.contains(&path)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        true
    }
    let app = axum::Router::new()
        .route(
            "/price",
            get(|State(s): State<Shared>, uri: OriginalUri| async move {
                note(&s, &uri).await;
                axum::Json(json!({"price": 7}))
            }),
        )
        .route(
            "/data",
            get(
                |State(s): State<Shared>, uri: OriginalUri, h: HeaderMap| async move {
                    note(&s, &uri).await;
                    match h.get("authorization").and_then(|v| v.to_str().ok()) {
                        Some("Bearer t0k") => {
                            axum::Json(json!({"items": [1, 2, 3]})).into_response()
                        }
                        _ => StatusCode::UNAUTHORIZED.into_response(),
                    }
                },
            ),
        )
        .route(
            "/batch",
            get(
                |State(s): State<Shared>,
                 uri: OriginalUri,
                 q: axum::extract::Query<HashMap<String, String>>| async move {
                    note(&s, &uri).await;
                    let n: u32 = q["n"].parse().unwrap();
                    let records: Vec<Value> = (0..10)
                        .map(|i| json!({"id": format!("{n}-{i}"), "v": n * 10 + i}))
                        .collect();
                    axum::Json(json!({ "batch": n, "records": records }))
                },
            ),
        )
        .route(
            "/sink",
            any(
                |State(s): State<Shared>, uri: OriginalUri, h: HeaderMap, body: String| async move {
                    note(&s, &uri).await;
                    let key = h["idempotency-key"].to_str().unwrap().to_string();
                    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    s.lock().unwrap().sent.push((uri.0.to_string(), body, key));
                    "ok"
                },
            ),
        )
        .route("/garbage", get(|| async { "<html>not json</html>" }))
        .route(
            "/huge",
            get(|| async {
                let chunk = vec![b'x'; 1 << 20];
                let body = futures_util::stream::iter(
                    (0..50).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                axum::body::Body::from_stream(body)
            }),
        )
        .route(
            "/hang",
            get(|| async {
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .route(
            "/broken",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "down for maintenance") }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

fn step<'a>(run: &'a Run, id: &str) -> &'a mergeflow::workflow::StepRun {
    run.steps.iter().find(|s| s.id == id).unwrap()
}

async fn last_run(node: &mergeflow::Node, workflow: &str, status: RunStatus) -> Run {
    until(&format!("a {status:?} run of {workflow}"), || async {
        let runs = node.workflows().runs(Some(workflow), None, 10).ok()?;
        runs.into_iter().find(|r| r.status == status)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_see_the_answers_of_the_steps_they_need() {
    let (src, seen) = source().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    let def = format!(
        r##"
name = "order"
[on]
doc = "orders/*"
path = "/qty"

[[steps]]
id = "fetch"
kind = "http"
method = "GET"
url = "{src}/price"

[[steps]]
id = "total"
kind = "derive"
needs = ["fetch"]
when = "steps.fetch.status == 200 && steps.fetch.state == \"done\""
set = {{ "/total" = "doc.qty * steps.fetch.body.price" }}

[[steps]]
id = "report"
kind = "exec"
needs = ["total"]
command = ["sh", "-c", "echo '{{\"n\": 3, \"ok\": true}}'"]

[[steps]]
id = "log"
kind = "write"
needs = ["report"]
doc = "reports/orders"
merge = "#{{ last: steps.report.stdout.n, price: steps.fetch.body.price, wrote: steps.total.wrote }}"

[[steps]]
id = "notify"
kind = "http"
method = "PUT"
needs = ["fetch"]
url = "{src}/sink"
query = "#{{ order: id, qty: doc.qty, skip: () }}"
body = "#{{ price: steps.fetch.body.price, order: id }}"
"##
    );
    write_def(&defs, "order.toml", &def);
    let node = local_node(&dir.path().join("n"), &defs, |_| {}).await;
    until("the workflow loaded", || async {
        (!node.workflows().list().is_empty()).then_some(())
    })
    .await;
    node.doc("orders/1")
        .unwrap()
        .patch(json!({"qty": 3}))
        .await
        .unwrap();
    let run = last_run(&node, "order", RunStatus::Done).await;
    assert_eq!(path_of(&node, "orders/1", "/total").await, Some(json!(21)));
    assert_eq!(
        node.doc("reports/orders").unwrap().get().await.unwrap(),
        json!({"last": 3, "price": 7, "wrote": ["/total"]})
    );
    // The run record keeps each answer as later steps saw it.
    let fetch = step(&run, "fetch");
    assert_eq!(fetch.output.as_ref().unwrap()["body"], json!({"price": 7}));
    assert_eq!(fetch.output.as_ref().unwrap()["status"], json!(200));
    assert_eq!(
        step(&run, "report").output.as_ref().unwrap()["stdout"],
        json!({"n": 3, "ok": true})
    );
    // The PUT carried its body expression and query, with the step's key.
    let sent = seen.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let (path, body, key) = &sent[0];
    assert_eq!(path, "/sink?order=orders%2F1&qty=3");
    assert_eq!(body, &json!({"price": 7, "order": "orders/1"}));
    assert_eq!(key, &format!("{}-notify", run.key));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_survive_a_kill_between_steps_and_a_retry() {
    let (src, seen) = source().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let hold = dir.path().join("hold");
    let fail = dir.path().join("fail");
    std::fs::write(&hold, "").unwrap();
    std::fs::write(&fail, "").unwrap();
    // fetch -> hold (waits while `hold` exists) -> gate (fails while
    // `fail` exists, no retries) -> save (writes what fetch got).
    let def = format!(
        r##"
name = "pull"
[on]
doc = "jobs/*"

[[steps]]
id = "fetch"
kind = "http"
method = "GET"
url = "{src}/data"
headers = {{ Authorization = "Bearer ${{SOURCE_TOKEN}}" }}

[[steps]]
id = "hold"
kind = "exec"
needs = ["fetch"]
timeout = "120s"
command = ["sh", "-c", "while [ -f {hold} ]; do sleep 0.05; done"]

[[steps]]
id = "gate"
kind = "exec"
needs = ["hold"]
command = ["sh", "-c", "test ! -f {fail}"]
retry = {{ attempts = 1 }}

[[steps]]
id = "save"
kind = "write"
needs = ["gate"]
doc = "results/pull"
merge = "#{{ items: steps.fetch.body.items, job: id }}"
"##,
        hold = hold.display(),
        fail = fail.display()
    );
    write_def(&data.join("workflows"), "pull.toml", &def);
    let env = [("SOURCE_TOKEN", "t0k")];
    let proc = common::NodeProc::try_start_env(&data, &[], &env).unwrap();
    let client = Client::new(&proc.api);
    client.patch("jobs/1", &json!({"n": 1})).await.unwrap();
    let running = until("the run to wait in its second step", || async {
        let runs = client.runs(Some("pull"), None, 10).await.ok()?;
        let r = runs.into_iter().next()?;
        (step(&r, "hold").state == StepState::Running && step(&r, "fetch").state == StepState::Done)
            .then_some(r)
    })
    .await;
    proc.kill9();
    std::fs::remove_file(&hold).unwrap();

    let proc = common::NodeProc::try_start_env(&data, &[], &env).unwrap();
    let client = Client::new(&proc.api);
    let dead = until("the resumed run to die at the gate", || async {
        let r = client.run(running.id).await.ok()?;
        (r.status == RunStatus::Dead).then_some(r)
    })
    .await;
    assert!(step(&dead, "gate").error.is_some(), "{dead:?}");
    std::fs::remove_file(&fail).unwrap();
    client.run_action(running.id, "retry").await.unwrap();
    let done = until("the retried run to finish", || async {
        let r = client.run(running.id).await.ok()?;
        (r.status == RunStatus::Done).then_some(r)
    })
    .await;
    assert_eq!(done.key, running.key);
    assert_eq!(
        client.get("results/pull", None).await.unwrap(),
        json!({"items": [1, 2, 3], "job": "jobs/1"})
    );
    // The source was asked once: the resumed and the retried run used
    // the answer kept in the run record.
    let asked = seen.lock().unwrap().asked.clone();
    assert_eq!(asked, ["/data"], "{asked:?}");
}

/// Polls until each of `nodes` holds `want` batches in `etl/log`, and
/// returns the batch numbers the first holds, in list order.
async fn batches(nodes: &[&mergeflow::Node], want: usize) -> Vec<u64> {
    let mut lists = Vec::new();
    for n in nodes {
        let list = until("every batch in the log", || async {
            let log = path_of(n, "etl/log", "/log").await?;
            let list = log.as_array()?.clone();
            (list.len() >= want).then_some(list)
        })
        .await;
        lists.push(list);
    }
    let first: Vec<u64> = lists[0]
        .iter()
        .map(|e| e["batch"].as_u64().unwrap())
        .collect();
    for l in &lists {
        assert_eq!(l, &lists[0], "every node holds the same log");
        for e in l {
            assert_eq!(e["records"].as_array().unwrap().len(), 10, "{e}");
        }
    }
    first
}

/// The node whose run of `doc` executes step `id` (its attempts count):
/// the effect's owner; the others wait for its marker.
async fn executing(nodes: &[&mergeflow::Node], doc: &str, id: &str) -> usize {
    until(&format!("the owner of {doc} to run {id}"), || async {
        for (i, n) in nodes.iter().enumerate() {
            let runs = n.workflows().runs(Some("etl"), None, 100).ok()?;
            if runs
                .iter()
                .any(|r| r.doc == doc && step(r, id).attempts > 0 && r.status.is_open())
            {
                return Some(i);
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_on_three_nodes_writes_each_batch_once_while_owners_die() {
    let (src, seen) = source().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    // A request doc per batch; the owner pulls it and appends it to the
    // log, then confirms to the source.
    let def = format!(
        r##"
name = "etl"
[on]
doc = "pulls/*"

[[steps]]
id = "fetch"
kind = "http"
method = "GET"
url = "{src}/batch"
query = "#{{ n: doc.n }}"
timeout = "120s"

[[steps]]
id = "save"
kind = "write"
needs = ["fetch"]
doc = "etl/log"
set = {{ "/log/-" = "steps.fetch.body" }}

[[steps]]
id = "confirm"
kind = "http"
needs = ["save"]
url = "{src}/sink"
body = "#{{ batch: doc.n }}"
timeout = "120s"
"##
    );
    write_def(&defs, "etl.toml", &def);
    let tweak = |c: &mut mergeflow::config::Config| c.workflow.dir = defs.clone();
    let a = common::p2p_node(&dir.path().join("a"), vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr.clone()], tweak).await;
    let c = common::p2p_node(&dir.path().join("c"), vec![a_addr], tweak).await;
    let mut nodes = vec![a, b, c];
    {
        let refs: Vec<&mergeflow::Node> = nodes.iter().collect();
        full_mesh_running(&nodes, &["etl"]).await;
        // The log exists before the first append, everywhere.
        nodes[0]
            .doc("etl/log")
            .unwrap()
            .patch(json!({"log": []}))
            .await
            .unwrap();
        for n in &refs {
            until("the empty log everywhere", || async {
                path_of(n, "etl/log", "/log").await.map(|_| ())
            })
            .await;
        }
        for n in 1..=2u64 {
            nodes[(n as usize) % 3]
                .doc(&format!("pulls/{n}"))
                .unwrap()
                .patch(json!({ "n": n }))
                .await
                .unwrap();
            batches(&refs, n as usize).await;
        }
    }

    // Batch 3: its owner dies while the source holds its request back;
    // another node pulls it.
    seen.lock().unwrap().hang.push("/batch?n=3".into());
    nodes[0]
        .doc("pulls/3")
        .unwrap()
        .patch(json!({"n": 3}))
        .await
        .unwrap();
    let owner = {
        let refs: Vec<&mergeflow::Node> = nodes.iter().collect();
        executing(&refs, "pulls/3", "fetch").await
    };
    seen.lock().unwrap().hang.clear();
    nodes.remove(owner).shutdown().await.unwrap();
    {
        let refs: Vec<&mergeflow::Node> = nodes.iter().collect();
        batches(&refs, 3).await;
    }

    // Batch 4: its owner appends it, and dies while confirming; the node
    // that takes over pulls again, and its append (same key) is a no-op.
    seen.lock().unwrap().hang.push("/sink".into());
    nodes[0]
        .doc("pulls/4")
        .unwrap()
        .patch(json!({"n": 4}))
        .await
        .unwrap();
    let owner = {
        let refs: Vec<&mergeflow::Node> = nodes.iter().collect();
        let owner = executing(&refs, "pulls/4", "confirm").await;
        // Its append reached the other node before it died.
        batches(&refs, 4).await;
        owner
    };
    seen.lock().unwrap().hang.clear();
    nodes.remove(owner).shutdown().await.unwrap();
    let last = &nodes[0];
    until("the survivor's run of batch 4 done", || async {
        let runs = last.workflows().runs(Some("etl"), None, 100).ok()?;
        runs.iter()
            .any(|r| r.doc == "pulls/4" && r.status == RunStatus::Done)
            .then_some(())
    })
    .await;
    let got = batches(&[last], 4).await;
    assert_eq!(got, [1, 2, 3, 4], "each batch once, none lost");
    // Batch 4 was pulled twice (the takeover), appended once.
    let asked = seen.lock().unwrap().asked.clone();
    let pulls_of_4 = asked.iter().filter(|p| *p == "/batch?n=4").count();
    assert_eq!(pulls_of_4, 2, "{asked:?}");
    last.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_give_clear_errors_and_write_nothing() {
    let (src, _seen) = source().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    for (name, path, timeout) in [
        ("garbage", "garbage", "10s"),
        ("huge", "huge", "30s"),
        ("hang", "hang", "300ms"),
        ("broken", "broken", "10s"),
        ("noenv", "data", "10s"),
    ] {
        let headers = match name {
            "noenv" => "headers = { Authorization = \"Bearer ${MERGEFLOW_TEST_NO_SUCH_VAR}\" }\n",
            _ => "",
        };
        let def = format!(
            "name = \"{name}\"\n[on]\ndoc = \"in/{name}\"\n[[steps]]\nid = \"fetch\"\nkind = \"http\"\n\
             method = \"GET\"\nurl = \"{src}/{path}\"\ntimeout = \"{timeout}\"\n{headers}\
             retry = {{ attempts = 2, initial = \"10ms\", max = \"10ms\" }}\n\
             [[steps]]\nid = \"save\"\nkind = \"write\"\nneeds = [\"fetch\"]\ndoc = \"out/{name}\"\n\
             merge = \"#{{ records: steps.fetch.body.records }}\"\n"
        );
        write_def(&defs, &format!("{name}.toml"), &def);
    }
    let node = local_node(&dir.path().join("n"), &defs, |c| {
        c.workflow.max_step_output = 1 << 20;
    })
    .await;
    until("the workflows loaded", || async {
        (node.workflows().list().len() == 5).then_some(())
    })
    .await;
    for name in ["garbage", "huge", "hang", "broken", "noenv"] {
        node.doc(&format!("in/{name}"))
            .unwrap()
            .patch(json!({"go": 1}))
            .await
            .unwrap();
    }
    // Not JSON: the body is text, and `records` of text is nothing: the
    // merge writes nothing and says so.
    let garbage = last_run(&node, "garbage", RunStatus::Dead).await;
    assert_eq!(
        step(&garbage, "fetch").output.as_ref().unwrap()["body"],
        json!("<html>not json</html>")
    );
    let e = step(&garbage, "save").error.clone().unwrap();
    assert!(e.contains("merge"), "{e}");
    // 50 MB against a 1 MiB cap: refused at once, not retried, not cut.
    let huge = last_run(&node, "huge", RunStatus::Dead).await;
    let f = step(&huge, "fetch");
    assert_eq!(f.attempts, 1, "final, not retried");
    let e = f.error.clone().unwrap();
    assert!(
        e.contains("workflow.max_step_output") && e.contains("GET"),
        "{e}"
    );
    // A source that never answers: timed out, retried, then dead.
    let hang = last_run(&node, "hang", RunStatus::Dead).await;
    let f = step(&hang, "fetch");
    assert_eq!(f.attempts, 2);
    assert!(f.error.as_deref().unwrap().contains("/hang"), "{f:?}");
    // 500: retried, then dead with the source's words.
    let broken = last_run(&node, "broken", RunStatus::Dead).await;
    let f = step(&broken, "fetch");
    assert_eq!(f.attempts, 2);
    assert!(
        f.error.as_deref().unwrap().contains("down for maintenance"),
        "{f:?}"
    );
    // A header naming a variable the node lacks: final, named, no value.
    let noenv = last_run(&node, "noenv", RunStatus::Dead).await;
    let e = step(&noenv, "fetch").error.clone().unwrap();
    assert!(e.contains("MERGEFLOW_TEST_NO_SUCH_VAR is not set"), "{e}");
    for name in ["garbage", "huge", "hang", "broken", "noenv"] {
        assert!(
            node.doc(&format!("out/{name}"))
                .unwrap()
                .get()
                .await
                .is_err(),
            "{name} wrote nothing"
        );
    }
    node.shutdown().await.unwrap();
}

/// Serves `app` over TLS on loopback with a fresh self-signed certificate
/// for 127.0.0.1; returns the base URL and the certificate's PEM.
async fn tls_source(app: axum::Router) -> (String, String) {
    use tokio_rustls::rustls;
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let pem = ck.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // a client that does not trust us
                };
                let io = hyper_util::rt::TokioIo::new(tls);
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (base, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sources_are_read_with_an_internal_ca_and_refused_without() {
    let app = axum::Router::new().route(
        "/price",
        axum::routing::get(|| async { axum::Json(json!({"price": 11})) }),
    );
    let (base, pem) = tls_source(app).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    let defs = dir.path().join("workflows");
    let def = format!(
        "name = \"tls\"\n[on]\ndoc = \"in/*\"\n[[steps]]\nid = \"fetch\"\nkind = \"http\"\n\
         method = \"GET\"\nurl = \"{base}/price\"\nretry = {{ attempts = 1 }}\n\
         [[steps]]\nid = \"save\"\nkind = \"derive\"\nneeds = [\"fetch\"]\n\
         set = {{ \"/price\" = \"steps.fetch.body.price\" }}\n"
    );
    write_def(&defs, "tls.toml", &def);
    // Trusting the internal CA: the answer lands in the doc.
    let node = local_node(&dir.path().join("a"), &defs, |c| c.workflow.tls_ca = ca).await;
    node.doc("in/1")
        .unwrap()
        .patch(json!({"go": 1}))
        .await
        .unwrap();
    last_run(&node, "tls", RunStatus::Done).await;
    assert_eq!(path_of(&node, "in/1", "/price").await, Some(json!(11)));
    node.shutdown().await.unwrap();
    // The system's CAs only: the certificate is refused, and said to be.
    let node = local_node(&dir.path().join("b"), &defs, |_| {}).await;
    node.doc("in/1")
        .unwrap()
        .patch(json!({"go": 1}))
        .await
        .unwrap();
    let dead = last_run(&node, "tls", RunStatus::Dead).await;
    let e = step(&dead, "fetch").error.clone().unwrap();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    assert_eq!(path_of(&node, "in/1", "/price").await, None);
    node.shutdown().await.unwrap();
}
