//! `mergeflow doc ...`.

use std::io::Read;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mergeflow::doc::Op;
use serde_json::Value as Json;

use super::ClientArgs;
use super::output::print_json;

/// How a write is sent (`doc patch`, `doc ops`).
#[derive(clap::Args)]
pub(crate) struct WriteArgs {
    /// Answer only once this many peers confirmed they stored the write.
    #[arg(long)]
    replicas: Option<usize>,
    /// How long to wait for --replicas, in milliseconds (default 5000).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Apply the write at most once per doc and key: a retry with the same
    /// key (after a lost answer) is not applied again.
    #[arg(long)]
    idempotency_key: Option<String>,
}

impl WriteArgs {
    fn options(self) -> mergeflow::client::WriteOptions {
        mergeflow::client::WriteOptions {
            replicas: self.replicas,
            timeout_ms: self.timeout_ms,
            idempotency_key: self.idempotency_key,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum DocCmd {
    /// Create a document from a JSON object (VALUE, or stdin when VALUE is - or absent).
    Create {
        /// Id such as sensors/greenhouse-3; generated when absent.
        #[arg(long)]
        id: Option<String>,
        /// JSON object.
        value: Option<String>,
    },
    /// Print a document, or the value at --path (a JSON Pointer).
    Get {
        /// Document id.
        id: String,
        /// JSON Pointer such as /readings/0.
        #[arg(long)]
        path: Option<String>,
    },
    /// Apply a JSON merge patch (RFC 7396); creates the document if absent.
    Patch {
        /// Document id.
        id: String,
        /// JSON object (or - for stdin).
        patch: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Apply a JSON list of ops as one change, all or nothing.
    Ops {
        /// Document id.
        id: String,
        /// JSON array such as [{"op":"increment","path":"/n"}] (or - for stdin).
        ops: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// List documents in id order (every page; the node's system docs
    /// only with --system).
    List {
        /// Only ids that start with this, such as `sensors/`.
        #[arg(long)]
        prefix: Option<String>,
        /// Only ids after this one (to go on where a --limit listing stopped).
        #[arg(long)]
        after: Option<String>,
        /// Print at most this many (1 to 10000), then the --after to go on with.
        #[arg(long)]
        limit: Option<usize>,
        /// Include the node's system docs (`_mergeflow/...`).
        #[arg(long)]
        system: bool,
    },
    /// Print a document's heads.
    Heads {
        /// Document id.
        id: String,
    },
    /// Print a document's change history.
    History {
        /// Document id.
        id: String,
    },
    /// Delete a document (it leaves a tombstone).
    Delete {
        /// Document id.
        id: String,
    },
}

/// Reads a JSON argument, or stdin when it is `-` or absent.
pub(crate) fn json_arg(arg: Option<String>, what: &str) -> Result<Json> {
    let text = match arg.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .with_context(|| format!("reading {what} from stdin"))?;
            s
        }
        Some(s) => s.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

pub(crate) async fn doc(args: ClientArgs, cmd: DocCmd) -> Result<()> {
    let c = args.client();
    let json = args.json;
    match cmd {
        DocCmd::Create { id, value } => {
            let value = json_arg(value, "VALUE")?;
            let r = c.create(id.as_deref(), value).await?;
            write_result(json, "created", &r)
        }
        DocCmd::Get { id, path } => {
            let v = c.get(&id, path.as_deref()).await?;
            print_json(&v);
            Ok(())
        }
        DocCmd::Patch { id, patch, write } => {
            let patch = json_arg(patch, "PATCH")?;
            let r = c.patch_with(&id, &patch, &write.options()).await?;
            written(json, "patched", &r)
        }
        DocCmd::Ops { id, ops, write } => {
            let ops: Vec<Op> = serde_json::from_value(json_arg(ops, "OPS")?)
                .context("OPS must be a JSON array of ops such as [{\"op\":\"set\",\"path\":\"/a\",\"value\":1}]")?;
            let r = c.ops_with(&id, &ops, &write.options()).await?;
            written(json, "applied", &r)
        }
        DocCmd::List {
            prefix,
            after,
            limit,
            system,
        } => {
            let mut q = mergeflow::api::ListParams {
                prefix,
                after,
                limit,
                system: system.then_some(true),
            };
            if !json {
                println!(
                    "{:<40} {:>6} {:>10}  UPDATED (unix ms)",
                    "ID", "HEADS", "BYTES"
                );
            }
            let mut all = Vec::new();
            loop {
                let (page, more) = c.list_page(&q).await?;
                let last = page.last().map(|d| d.id.clone());
                for d in page {
                    if json {
                        all.push(d);
                    } else {
                        println!(
                            "{:<40} {:>6} {:>10}  {}",
                            d.id,
                            d.heads.len(),
                            d.size_bytes,
                            d.updated_at
                        );
                    }
                }
                match (more, last) {
                    (true, Some(last)) if limit.is_some() => {
                        eprintln!("more docs follow: go on with --after {last}");
                        break;
                    }
                    (true, Some(last)) => q.after = Some(last),
                    _ => break,
                }
            }
            if json {
                print_json(&all);
            }
            Ok(())
        }
        DocCmd::Heads { id } => {
            let heads = c.heads(&id).await?;
            if json {
                print_json(&heads);
            } else {
                heads.iter().for_each(|h| println!("{h}"));
            }
            Ok(())
        }
        DocCmd::History { id } => {
            let h = c.history(&id).await?;
            if json {
                print_json(&h);
            } else {
                for e in h {
                    let who = e.peer_id.as_deref().unwrap_or("unknown peer");
                    println!(
                        "{}  {}  seq {:<4} t={}  {}  ({who})",
                        &e.hash[..12.min(e.hash.len())],
                        &e.actor[..8.min(e.actor.len())],
                        e.seq,
                        e.time,
                        e.message.unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        DocCmd::Delete { id } => {
            let r = c.delete(&id).await?;
            if json {
                print_json(&r);
            } else {
                println!("deleted {}", r.id);
            }
            Ok(())
        }
    }
}

/// As [`write_result`], with the replicas that confirmed, if asked for.
pub(crate) fn written(json: bool, verb: &str, w: &mergeflow::client::Written) -> Result<()> {
    if json {
        print_json(w);
        return Ok(());
    }
    write_result(false, verb, &w.result)?;
    if let Some(peers) = w.replicas.as_ref().and_then(|r| r.as_array()) {
        println!("confirmed by {} replicas", peers.len());
    }
    Ok(())
}

pub(crate) fn write_result(json: bool, verb: &str, r: &mergeflow::WriteResult) -> Result<()> {
    if json {
        print_json(r);
    } else if r.changed {
        println!("{verb} {} heads {}", r.id, r.heads.join(","));
    } else {
        println!("unchanged {} heads {}", r.id, r.heads.join(","));
    }
    if r.heads.is_empty() && r.changed {
        bail!("the node returned no heads for a write");
    }
    Ok(())
}
