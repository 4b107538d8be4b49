//! The catalog: the workflow definitions loaded on this node, from the
//! files in the workflow directory and the definitions applied through the
//! API (their system docs), each checked and sorted into running here,
//! inactive (disabled, or labels for other nodes) or invalid.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use super::effect::SYSTEM_PREFIX;
use super::expr::Sandbox;
use super::plan::Plan;
use crate::doc::{DocError, DocId};
use crate::runtime::Docs;

/// A definition applied through the API, as its system doc holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    /// The TOML text (absent when only the enabled flag was set, e.g. to
    /// disable a workflow defined by a file).
    pub text: Option<String>,
    /// False: the workflow does not run, wherever it is defined.
    pub enabled: bool,
}

/// The system doc of an applied definition.
pub fn applied_doc(name: &str) -> String {
    format!("{SYSTEM_PREFIX}workflows/{name}")
}

#[derive(Default)]
pub(super) struct Catalog {
    /// Workflows running here, by name.
    pub(super) plans: BTreeMap<String, Arc<Plan>>,
    /// Valid workflows not running here, with why.
    pub(super) inactive: BTreeMap<String, (Arc<Plan>, &'static str)>,
    /// The applied definitions the catalog was built with.
    pub(super) applied: BTreeMap<String, Applied>,
    /// Files that do not load: (file, error).
    pub(super) invalid: Vec<(String, String)>,
    /// (file, modified, length) of every file read, to notice changes.
    pub(super) seen: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

/// True if the workflow runs commands (an exec step or exec on_failure).
pub(super) fn runs_commands(plan: &Plan) -> bool {
    plan.runs_commands()
}

/// The applied definitions, from their system docs.
pub(super) async fn read_applied(docs: &Docs) -> Result<BTreeMap<String, Applied>, DocError> {
    let prefix = applied_doc("");
    let mut out = BTreeMap::new();
    for d in docs
        .list()
        .await?
        .into_iter()
        .filter(|d| d.id.starts_with(&prefix))
    {
        let name = d.id[prefix.len()..].to_string();
        let Ok(id) = DocId::new(d.id.as_str()) else {
            continue;
        };
        let Ok(j) = docs.get(id, None).await else {
            continue;
        };
        out.insert(
            name,
            Applied {
                text: j["text"].as_str().map(str::to_string),
                enabled: j["enabled"].as_bool().unwrap_or(true),
            },
        );
    }
    Ok(out)
}

/// Rebuilds the catalog from the workflow directory and the applied
/// definitions, if a file changed since the last read or `applied`
/// differs from what the catalog holds. Returns the workflows that are
/// newly active here or whose text changed, and whether anything changed.
pub(super) fn reload(
    catalog: &RwLock<Catalog>,
    dir: &Path,
    sandbox: &Sandbox,
    labels: &BTreeMap<String, String>,
    allow_applied_exec: bool,
    http_allow: &crate::http_allow::HttpAllow,
    applied: &BTreeMap<String, Applied>,
) -> (Vec<Arc<Plan>>, bool) {
    let mut files: Vec<(PathBuf, Option<SystemTime>, u64)> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| {
                let m = std::fs::metadata(&p).ok();
                let modified = m.as_ref().and_then(|m| m.modified().ok());
                (p, modified, m.map_or(0, |m| m.len()))
            })
            .collect(),
        Err(_) => vec![], // No directory: no workflows.
    };
    files.sort();
    {
        let catalog = read(catalog);
        if files == catalog.seen && *applied == catalog.applied {
            return (vec![], false);
        }
    }
    let mut sources: Vec<(String, Result<String, String>)> = files
        .iter()
        .map(|(path, _, _)| {
            let name = path.display().to_string();
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"));
            (name, text)
        })
        .collect();
    sources.extend(applied.iter().filter_map(|(name, a)| {
        let text = a.text.clone()?;
        Some((format!("applied:{name}"), Ok(text)))
    }));
    let mut plans = BTreeMap::new();
    let mut invalid = Vec::new();
    let mut inactive = BTreeMap::new();
    let mut origin: HashMap<String, String> = HashMap::new();
    for (source, text) in sources {
        let loaded =
            text.and_then(|text| Plan::load(sandbox, &source, &text).map_err(|e| e.to_string()));
        let plan = match loaded {
            Ok(plan) => plan,
            Err(e) => {
                tracing::error!(source = %source, err = %e, "workflow definition does not load; other workflows keep running");
                invalid.push((source, e));
                continue;
            }
        };
        let name = plan.name().to_string();
        if source.starts_with("applied:") && runs_commands(&plan) && !allow_applied_exec {
            invalid.push((
                source.clone(),
                format!(
                    "workflow {source}: exec steps in applied definitions are off on this node \
                     (workflow.allow_applied_exec); put the file in the workflow dir instead"
                ),
            ));
            continue;
        }
        if source.starts_with("applied:")
            && let Some(why) = plan.refused_url(http_allow)
        {
            invalid.push((source.clone(), format!("workflow {source}: {why}")));
            continue;
        }
        if let Some(first) = origin.get(&name) {
            invalid.push((
                source.clone(),
                format!("workflow {source}: name {name:?} is already used by {first}"),
            ));
            continue;
        }
        origin.insert(name.clone(), source);
        let enabled = applied.get(&name).is_none_or(|a| a.enabled);
        let here = plan.def.nodes.iter().all(|(k, v)| labels.get(k) == Some(v));
        if !enabled {
            inactive.insert(name, (plan, "disabled"));
        } else if !here {
            inactive.insert(name, (plan, "not for this node (labels)"));
        } else {
            plans.insert(name, plan);
        }
    }
    let mut catalog = catalog.write().unwrap_or_else(|p| p.into_inner());
    let fresh: Vec<Arc<Plan>> = plans
        .values()
        .filter(|p| {
            catalog
                .plans
                .get(p.name())
                .is_none_or(|old| old.text != p.text)
        })
        .cloned()
        .collect();
    for p in &fresh {
        tracing::info!(workflow = %p.name(), source = %p.source_name, "workflow loaded");
    }
    for name in catalog.plans.keys().filter(|n| !plans.contains_key(*n)) {
        tracing::info!(workflow = %name, "workflow unloaded");
    }
    catalog.plans = plans;
    catalog.inactive = inactive;
    catalog.invalid = invalid;
    catalog.seen = files;
    catalog.applied = applied.clone();
    (fresh, true)
}

fn read(catalog: &RwLock<Catalog>) -> RwLockReadGuard<'_, Catalog> {
    catalog.read().unwrap_or_else(|p| p.into_inner())
}
