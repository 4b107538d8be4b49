//! `mergeflow workflow ...` and `mergeflow runs ...`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::ClientArgs;
use super::output::print_json;

#[derive(Subcommand)]
pub(crate) enum WorkflowCmd {
    /// List the node's workflows, the invalid ones with their error.
    List,
    /// Show one workflow.
    Show {
        /// Its name.
        name: String,
    },
    /// Check a definition file here, without a node: prints what it loads
    /// as, or what is wrong and where (exit code 1).
    Validate {
        /// The TOML file.
        file: PathBuf,
    },
    /// Store a definition on the node; it syncs, and every node whose labels
    /// match runs it (a workflow-dir file of the same name wins on its node).
    Apply {
        /// The TOML file.
        file: PathBuf,
    },
    /// Let a workflow run again, on every node.
    Enable {
        /// Its name.
        name: String,
    },
    /// Stop a workflow from running, on every node (runs in flight finish).
    Disable {
        /// Its name.
        name: String,
    },
    /// Remove a workflow applied with `apply`, on every node (runs in
    /// flight finish). A file in a node's workflow dir is not touched.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum RunsCmd {
    /// Show one run: each step's state, attempts, timings, output and error.
    Show {
        /// Run id.
        id: u64,
    },
    /// Run a dead run again from its failed step, on the doc's current state.
    Retry {
        /// Run id.
        id: u64,
    },
    /// Mark a dead run skipped.
    Skip {
        /// Run id.
        id: u64,
    },
}

pub(crate) async fn workflow(client: ClientArgs, cmd: WorkflowCmd) -> Result<()> {
    let c = client.client();
    let cmd_kind = match &cmd {
        WorkflowCmd::Enable { .. } => "enable",
        _ => "disable",
    };
    match cmd {
        WorkflowCmd::List => {
            let list = c.workflows().await?;
            if client.json {
                print_json(&list);
                return Ok(());
            }
            println!("{:<24} {:<8} {:<24} STEPS / ERROR", "NAME", "VALID", "DOCS");
            for w in list {
                let steps: Vec<String> = w["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "{}:{}",
                            s["id"].as_str().unwrap_or(""),
                            s["kind"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                let valid = w["valid"].as_bool().unwrap_or(false);
                let tail = if valid {
                    steps.join(" -> ")
                } else {
                    w["error"].as_str().unwrap_or("").to_string()
                };
                println!(
                    "{:<24} {:<8} {:<24} {tail}",
                    w["name"].as_str().unwrap_or(""),
                    if valid { "yes" } else { "NO" },
                    w["doc"].as_str().unwrap_or("-"),
                );
            }
            Ok(())
        }
        WorkflowCmd::Show { name } => {
            print_json(&c.workflow(&name).await?);
            Ok(())
        }
        WorkflowCmd::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let w = c.apply_workflow(text).await?;
            if client.json {
                print_json(&w);
            } else {
                println!(
                    "applied workflow {}; it reaches every node as its doc syncs",
                    w["name"]
                );
            }
            Ok(())
        }
        WorkflowCmd::Enable { name } | WorkflowCmd::Disable { name } => {
            let on = matches!(cmd_kind, "enable");
            let w = c.set_workflow_enabled(&name, on).await?;
            if client.json {
                print_json(&w);
            } else {
                println!("{cmd_kind}d workflow {name:?} on every node");
            }
            Ok(())
        }
        WorkflowCmd::Delete { name } => {
            let d = c.delete_workflow(&name).await?;
            if client.json {
                print_json(&d);
            } else {
                println!("deleted workflow {name:?} on every node");
                if let Some(file) = d["file"].as_str() {
                    println!("note: the file {file} still defines it on this node");
                }
            }
            Ok(())
        }
        WorkflowCmd::Validate { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let sandbox = mergeflow::workflow::expr::Sandbox::new();
            let plan = mergeflow::workflow::plan::Plan::load(
                &sandbox,
                &file.display().to_string(),
                &text,
            )?;
            let order: Vec<&str> = plan.def.steps.iter().map(|s| s.id.as_str()).collect();
            println!(
                "{}: workflow {:?} is valid; steps run in the order {}",
                file.display(),
                plan.name(),
                order.join(" -> ")
            );
            if plan.runs_commands() {
                // Checked here without a node: its setting is unknown.
                println!(
                    "warning: it runs commands (exec): `workflow apply` is refused unless the \
                     node sets workflow.allow_applied_exec = true; as a file in the node's \
                     workflow dir it runs"
                );
            }
            Ok(())
        }
    }
}

pub(crate) async fn runs(
    client: ClientArgs,
    workflow: Option<String>,
    status: Option<String>,
    limit: usize,
    cmd: Option<RunsCmd>,
) -> Result<()> {
    let c = client.client();
    let (id, action) = match cmd {
        None => {
            let runs = c
                .runs(workflow.as_deref(), status.as_deref(), limit)
                .await?;
            if client.json {
                print_json(&runs);
                return Ok(());
            }
            println!(
                "{:>10} {:<8} {:<20} {:<28} {:<8} {:>5}  ERROR",
                "ID", "STATUS", "WORKFLOW", "DOC", "TRIGGER", "DEPTH"
            );
            for r in runs {
                println!(
                    "{:>10} {:<8} {:<20} {:<28} {:<8} {:>5}  {}",
                    r.id,
                    format!("{:?}", r.status).to_lowercase(),
                    r.workflow,
                    r.doc,
                    r.trigger,
                    r.depth,
                    r.error.as_deref().unwrap_or("")
                );
            }
            return Ok(());
        }
        Some(RunsCmd::Show { id }) => (id, None),
        Some(RunsCmd::Retry { id }) => (id, Some("retry")),
        Some(RunsCmd::Skip { id }) => (id, Some("skip")),
    };
    let run = match action {
        None => c.run(id).await?,
        Some(a) => c.run_action(id, a).await?,
    };
    if client.json {
        print_json(&run);
    } else {
        print!("{}", run_summary(&run));
    }
    Ok(())
}

/// `runs show` for people: the run, then one line per step (state,
/// attempts, time taken, who delivered an effect), then errors.
pub(crate) fn run_summary(run: &mergeflow::workflow::Run) -> String {
    use std::fmt::Write;
    let lower = |s: String| s.to_lowercase();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "run {}: {} of workflow {} on doc {}",
        run.id,
        lower(format!("{:?}", run.status)),
        run.workflow,
        run.doc
    );
    let _ = writeln!(
        o,
        "  trigger {}, depth {}, key {}",
        run.trigger, run.depth, run.key
    );
    let took = run.updated_ms.saturating_sub(run.created_ms);
    let _ = writeln!(
        o,
        "  created {} (unix ms), {took} ms to its last update",
        run.created_ms
    );
    if let Some(e) = &run.error {
        let _ = writeln!(o, "  error: {e}");
    }
    let _ = writeln!(o, "steps:");
    for s in &run.steps {
        let attempts = match s.attempts {
            1 => "1 attempt".to_string(),
            n => format!("{n} attempts"),
        };
        let took = match (s.started_ms, s.finished_ms) {
            (Some(a), Some(b)) => format!(", {} ms", b.saturating_sub(a)),
            _ => String::new(),
        };
        let _ = write!(
            o,
            "  {:<16} {:<8} {:<8} {attempts}{took}",
            s.id,
            s.kind,
            lower(format!("{:?}", s.state))
        );
        let out = s.output.as_ref();
        let who = |k: &str| out.and_then(|v| v[k].as_str()).map(str::to_string);
        if let Some(by) = who("delivered_by") {
            let _ = write!(o, ", delivered by {by}");
        } else if let Some(by) = who("dead_by") {
            let _ = write!(o, ", dead-lettered by {by}");
        } else if let Some(by) = who("skipped_by") {
            let _ = write!(o, ", skipped by {by}");
        } else if let Some(by) = who("waiting_for") {
            let _ = write!(o, ", waiting for {by}");
        }
        let _ = writeln!(o);
        if let Some(e) = &s.error {
            let _ = writeln!(o, "    error: {e}");
        }
    }
    o
}
