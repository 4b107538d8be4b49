//! The two outside services of the ETL example (`examples/etl/run.sh`), on
//! loopback: a product catalog (the source the node pulls from) and a
//! reporting service (where the node pushes each summary).
//!
//! - `GET /products`: `{"products": [{"sku", "name", "price"}, ...]}`, with
//!   `Authorization: Bearer <SOURCE_TOKEN>` (401 without);
//! - `POST /products/{sku}/price?to=P`: changes a price (the "upstream"
//!   system changing its data);
//! - `POST /reports`: takes a summary (JSON) with its `Idempotency-Key`,
//!   appends `{"key", "summary"}` to `reports.jsonl` in the current
//!   directory and answers 200; a key seen before is answered 200 again and
//!   not appended (the receiver deduplicates).
//!
//! Prints `source=<url> reports=<url>` once listening, then serves until
//! killed. Env: `SOURCE_TOKEN` (default `demo-token`).
//!
//! `etl_services set-price <source url> <sku> <price>` changes a price at a
//! running source and exits (so the example needs no curl).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
struct Shop {
    prices: BTreeMap<String, (String, f64)>,
    keys: HashSet<String>,
}

type Shared = Arc<Mutex<Shop>>;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, url, sku, price] = args.as_slice()
        && cmd == "set-price"
    {
        let resp = reqwest::Client::new()
            .post(format!("{url}/products/{sku}/price?to={price}"))
            .send()
            .await
            .expect("the source answers");
        assert!(resp.status().is_success(), "set-price: {}", resp.status());
        return;
    }
    let token = std::env::var("SOURCE_TOKEN").unwrap_or_else(|_| "demo-token".into());
    let mut shop = Shop::default();
    for (sku, name, price) in [
        ("A-100", "kettle", 24.0),
        ("A-200", "toaster", 31.5),
        ("B-300", "lamp", 12.25),
        ("C-400", "fan", 45.0),
    ] {
        shop.prices.insert(sku.into(), (name.into(), price));
    }
    let shared: Shared = Arc::new(Mutex::new(shop));
    let want = format!("Bearer {token}");
    let source = axum::Router::new()
        .route(
            "/products",
            get(move |State(s): State<Shared>, h: HeaderMap| {
                let want = want.clone();
                async move {
                    if h.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
                        return (StatusCode::UNAUTHORIZED, "a bearer token is needed").into_response();
                    }
                    let shop = s.lock().unwrap();
                    let products: Vec<Value> = shop
                        .prices
                        .iter()
                        .map(|(sku, (name, price))| json!({ "sku": sku, "name": name, "price": price }))
                        .collect();
                    axum::Json(json!({ "products": products })).into_response()
                }
            }),
        )
        .route(
            "/products/{sku}/price",
            post(
                |State(s): State<Shared>, Path(sku): Path<String>, q: Query<BTreeMap<String, f64>>| async move {
                    let mut shop = s.lock().unwrap();
                    match (shop.prices.get_mut(&sku), q.get("to")) {
                        (Some(p), Some(to)) => {
                            p.1 = *to;
                            StatusCode::OK
                        }
                        _ => StatusCode::NOT_FOUND,
                    }
                },
            ),
        )
        .with_state(shared.clone());
    let reports = axum::Router::new()
        .route(
            "/reports",
            post(
                |State(s): State<Shared>, h: HeaderMap, body: axum::Json<Value>| async move {
                    let key = h
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let mut shop = s.lock().unwrap();
                    if shop.keys.insert(key.clone()) {
                        let line = json!({ "key": key, "summary": body.0 });
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open("reports.jsonl")
                            .expect("reports.jsonl opens");
                        writeln!(f, "{line}").expect("reports.jsonl is written");
                    }
                    "ok"
                },
            ),
        )
        .with_state(shared);
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!(
        "source=http://{} reports=http://{}",
        a.local_addr().unwrap(),
        b.local_addr().unwrap()
    );
    let _ = std::io::stdout().flush();
    tokio::select! {
        r = axum::serve(a, source) => r.unwrap(),
        r = axum::serve(b, reports) => r.unwrap(),
    }
}
