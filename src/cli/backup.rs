//! `mergeflow backup`, `restore`, `export` and `import`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mergeflow::backup::{self, Manifest, RestoreReport};
use mergeflow::client::{Client, ClientError};
use mergeflow::config::{Config, Overrides};

use mergeflow::cli_support::progress_bar as bar;

/// How a single doc is exported or imported.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Format {
    /// The doc's JSON value.
    Json,
    /// The doc's Automerge save (all its history).
    Automerge,
}

impl Format {
    /// `format`, or by `path`'s extension: `.json` is JSON, anything else
    /// Automerge; JSON without a path.
    fn pick(format: Option<Format>, path: Option<&Path>) -> Format {
        format.unwrap_or_else(|| match path.and_then(|p| p.extension()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            Some(_) => Format::Automerge,
            None => Format::Json,
        })
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Checks the backup file at `path` whole, with a progress bar over docs.
async fn check(path: &Path) -> Result<Manifest> {
    let path = path.to_path_buf();
    let bar = bar(None, "{spinner} checking {pos} docs {msg}");
    let shown = bar.clone();
    let manifest = tokio::task::spawn_blocking(move || -> Result<Manifest> {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        backup::read(std::io::BufReader::new(file), |_, _, _| {
            shown.inc(1);
            Ok(())
        })
        .with_context(|| format!("{} is not a usable backup", path.display()))
    })
    .await??;
    bar.finish_and_clear();
    Ok(manifest)
}

/// `mergeflow backup --to FILE`: downloads, checks, then renames into place.
pub async fn backup(client: &Client, to: &Path) -> Result<()> {
    let started = Instant::now();
    let partial = backup::partial_path(to);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let bar = bar(
        None,
        "{spinner} backing up: {bytes} received ({bytes_per_sec})",
    );
    let shown = bar.clone();
    let got = client.backup(&mut file, |n| shown.set_position(n)).await;
    bar.finish_and_clear();
    let result = match got {
        Ok(_) => file.sync_all().await.map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    let manifest = match result {
        Ok(()) => check(&partial)
            .await
            .context("the node's backup ended early or is damaged (the node's log says why)"),
        Err(e) => Err(e),
    };
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, to)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), to.display()))?;
    let size = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    println!(
        "backup of {} docs ({} deleted) from {} written to {} ({:.1} MiB, checked) in {:.1}s",
        manifest.docs.len(),
        manifest.deleted.len(),
        manifest.node,
        to.display(),
        mib(size),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where `mergeflow restore` merges into.
pub struct Offline {
    /// The data dir (of a stopped node), if given.
    pub data_dir: Option<PathBuf>,
    /// That node's config file, if given.
    pub config: Option<PathBuf>,
}

/// `mergeflow restore FILE`: into a running node through its API, or with
/// `--data-dir`/`--config` straight into a stopped node's data dir.
pub async fn restore(client: &Client, file: &Path, offline: Offline, json: bool) -> Result<()> {
    let started = Instant::now();
    // Refuse a bad file here, before sending or opening anything.
    let manifest = check(file).await?;
    let report = if offline.data_dir.is_some() || offline.config.is_some() {
        restore_offline(file, offline, manifest.docs.len() as u64).await?
    } else {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let bar = bar(
            Some(size),
            "{spinner} sending [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}), then merging",
        );
        let shown = bar.clone();
        let report = client.restore(file, move |n| shown.set_position(n)).await;
        bar.finish_and_clear();
        report.map_err(restore_error)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, started.elapsed());
    }
    if !report.failed.is_empty() {
        bail!(
            "{} docs could not be merged (listed above)",
            report.failed.len()
        );
    }
    Ok(())
}

fn restore_error(e: ClientError) -> anyhow::Error {
    match &e {
        ClientError::Api { code, .. } if code == "bad_backup" => {
            anyhow::Error::from(e).context("the node refused the backup")
        }
        _ => e.into(),
    }
}

async fn restore_offline(file: &Path, offline: Offline, total: u64) -> Result<RestoreReport> {
    let flags = Overrides {
        data_dir: offline.data_dir,
        ..Overrides::default()
    };
    let config = Config::load(offline.config.as_deref(), std::env::vars(), &flags)?;
    let dir = config.node.data_dir.clone();
    // No workflows run here: the node runs them over the restored docs
    // when it starts.
    let node = mergeflow::Node::builder()
        .config(config)
        .workflows(false)
        .start()
        .await
        .with_context(|| {
            format!(
                "restore into {} (to restore into a running node, leave out --data-dir and --config)",
                dir.display()
            )
        })?;
    let bar = bar(
        Some(total),
        "{spinner} merging [{bar:30}] {pos}/{len} docs ({per_sec})",
    );
    let watch = {
        let (node, bar) = (node.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                if let Some(t) = node.tasks().list().first() {
                    bar.set_position(t.done);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let report = node.restore_file(file).await;
    watch.abort();
    bar.finish_and_clear();
    node.shutdown().await?;
    drop(node);
    Ok(report?)
}

fn print_report(r: &RestoreReport, took: Duration) {
    println!(
        "restored a backup of {} docs from {}: {} changed, {} already up to date, in {:.1}s",
        r.docs,
        r.from_node,
        r.changed,
        r.unchanged,
        took.as_secs_f64()
    );
    if r.tombstones_skipped > 0 {
        println!(
            "{} deleted docs in the backup were not deleted here (a restore only adds)",
            r.tombstones_skipped
        );
    }
    for id in &r.deleted_here {
        println!("left deleted (deleted on this node): {id}");
    }
    for f in &r.failed {
        println!("failed: {}: {}", f.id, f.error);
    }
}

/// `mergeflow export DOC`: its JSON or its Automerge save, to a file or
/// stdout.
pub async fn export(
    client: &Client,
    id: &str,
    format: Option<Format>,
    to: Option<&Path>,
) -> Result<()> {
    let bytes = match Format::pick(format, to) {
        Format::Json => {
            let mut v = serde_json::to_vec_pretty(&client.get(id, None).await?)?;
            v.push(b'\n');
            v
        }
        Format::Automerge => client.save(id).await?,
    };
    match to {
        Some(path) => std::fs::write(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

/// `mergeflow import DOC FILE`: Automerge bytes are merged into the doc;
/// JSON makes the doc equal to it, in one change.
pub async fn import(client: &Client, id: &str, file: &Path, format: Option<Format>) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let result = match Format::pick(format, Some(file)) {
        Format::Automerge => client.merge(id, bytes).await?,
        Format::Json => {
            let target: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            if !target.is_object() {
                bail!(
                    "{} holds a JSON {}, but a doc is an object",
                    file.display(),
                    kind(&target)
                );
            }
            let current = match client.get(id, None).await {
                Ok(v) => v,
                Err(ClientError::Api { status: 404, .. }) => serde_json::json!({}),
                Err(e) => return Err(e.into()),
            };
            let ops = mergeflow::doc::ops_to_match(&current, &target);
            if ops.is_empty() {
                println!("{id}: already equal to {}", file.display());
                return Ok(());
            }
            client.ops(id, &ops).await?
        }
    };
    println!(
        "{id}: {} (heads {})",
        if result.changed {
            "imported"
        } else {
            "unchanged: it held every change already"
        },
        result.heads.join(",")
    );
    Ok(())
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Array(_) => "array",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Null => "null",
        serde_json::Value::Object(_) => "object",
    }
}
