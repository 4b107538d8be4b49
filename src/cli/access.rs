//! `mergeflow access apply FILE | show | check FILE`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::ClientArgs;
use super::output::print_json;

#[derive(Subcommand)]
pub(crate) enum AccessCmd {
    /// Apply an access file for the whole network (run against a node in
    /// net.admins): its grants reach every node by sync.
    Apply {
        /// The TOML file (`[[grant]]` entries).
        file: PathBuf,
    },
    /// Show the admins and grants the node holds.
    Show,
    /// Check an access file here, without a node.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Give a stopped node a new identity (key rotation): prints the old
    /// and new peer ids. Update net.allow, net.admins and grants that name
    /// the old one.
    RotateKey {
        /// The node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

pub(crate) async fn access(client: ClientArgs, cmd: AccessCmd) -> Result<()> {
    let read = |file: &PathBuf| {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let parsed = mergeflow::grants::AccessFile::parse(&text, &file.display().to_string())
            .map_err(anyhow::Error::msg)?;
        for w in parsed.warnings() {
            eprintln!("warning: {}: {w}", file.display());
        }
        Ok::<_, anyhow::Error>(text)
    };
    match cmd {
        AccessCmd::Check { file } => {
            read(&file)?;
            println!("{}: ok", file.display());
        }
        AccessCmd::Apply { file } => {
            let r = client.client().access(Some(read(&file)?)).await?;
            if client.json {
                print_json(&r);
            } else {
                println!(
                    "applied {} grant(s) from {}; they reach every node as {} syncs",
                    r["grants"],
                    file.display(),
                    mergeflow::grants::ACCESS_DOC
                );
            }
        }
        AccessCmd::Show => print_json(&client.client().access(None).await?),
        AccessCmd::RotateKey { data_dir } => rotate_key(&data_dir, client.json).await?,
    }
    Ok(())
}

async fn rotate_key(dir: &std::path::Path, json: bool) -> Result<()> {
    let open = |new: bool| {
        let b = mergeflow::Node::builder().data_dir(dir).workflows(false);
        if new { b.new_identity() } else { b }
    };
    let context = || {
        format!(
            "open {} (stop the node that runs on it first)",
            dir.display()
        )
    };
    let node = open(false).start().await.with_context(context)?;
    let old = node.peer_id().to_string();
    node.shutdown().await?;
    drop(node);
    let node = open(true).start().await.with_context(context)?;
    let new = node.peer_id().to_string();
    node.shutdown().await?;
    if json {
        print_json(&serde_json::json!({ "old": old, "new": new }));
    } else {
        println!(
            "{}: peer id {old} -> {new}\nits earlier changes keep the old key's signatures; \
             put the new id where net.allow, net.admins or grants name the old one",
            dir.display()
        );
    }
    Ok(())
}
