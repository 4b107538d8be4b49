//! A checked definition made ready to run: its expressions compiled, its
//! trigger's path glob built, and the target docs of `write` steps parsed.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::def::{self, Action, DefError, Origin, Workflow};
use super::expr::{Expr, Sandbox};
use crate::doc::{DocId, Pointer};
use crate::feed::ChangeEvent;

/// A workflow ready to run.
#[derive(Debug)]
pub struct Plan {
    /// The definition.
    pub def: Workflow,
    /// Where it came from (a file path).
    pub source_name: String,
    /// The definition's text, to tell a changed file from an unchanged one.
    pub text: String,
    /// The trigger's condition.
    pub when: Option<Expr>,
    path: Option<globset::GlobMatcher>,
    /// One per step of `def.steps`, in the same order.
    pub steps: Vec<StepPlan>,
}

/// One step ready to run.
#[derive(Debug)]
pub struct StepPlan {
    /// The step's condition.
    pub when: Option<Expr>,
    /// `derive` and `write`: where each value goes, and its expression.
    pub set: Vec<(Pointer, Expr)>,
    /// `write`: the doc written to.
    pub target: Option<DocId>,
    /// `resolve`: the JSON Pointer glob of the places it resolves.
    pub glob: Option<globset::GlobMatcher>,
    /// `write`: the merge patch's expression.
    pub merge: Option<Expr>,
    /// `http`: the body's expression.
    pub body: Option<Expr>,
    /// `http`: the query's expression.
    pub query: Option<Expr>,
    /// The steps it needs, directly or through others (indices into
    /// `def.steps`, in order): their outputs are what its expressions see
    /// as `steps`.
    pub upstream: Vec<usize>,
    /// The effect steps among `upstream`: a step after an effect runs only
    /// where that effect ran (it may use the effect's answer).
    pub after_effects: Vec<usize>,
}

impl Plan {
    /// Parses, checks and compiles a definition.
    ///
    /// # Errors
    /// What is wrong, naming the file, the step and the key (and for
    /// expressions, the line and position).
    pub fn load(sandbox: &Sandbox, source_name: &str, text: &str) -> Result<Arc<Plan>, DefError> {
        let def = def::parse(source_name, text)?;
        let err = |what: String| DefError {
            source_name: source_name.to_string(),
            what,
        };
        let compile = |what: &str, src: &Option<String>| -> Result<Option<Expr>, DefError> {
            src.as_deref()
                .map(|s| sandbox.compile(s))
                .transpose()
                .map_err(|e| err(format!("{what}: {e}")))
        };
        let when = compile("[on] when", &def.trigger.when)?;
        let path = match &def.trigger.path {
            None => None,
            Some(p) => Some(pointer_glob(p).map_err(|e| err(format!("[on] path {p:?}: {e}")))?),
        };
        let index: BTreeMap<&str, usize> = def
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut steps: Vec<StepPlan> = Vec::with_capacity(def.steps.len());
        for s in &def.steps {
            let at = |key: &str| format!("step {:?}: {key}", s.id);
            if def.trigger.doc.is_none()
                && matches!(s.action, Action::Derive { .. } | Action::Resolve { .. })
            {
                return Err(err(format!(
                    "step {:?}: kind {} works on the triggering doc; a schedule-only workflow has none \
                     (use write, http or exec, or add [on] doc)",
                    s.id,
                    kind_name(&s.action)
                )));
            }
            let when = compile(&at("when"), &s.when)?;
            let (set, target) = match &s.action {
                Action::Derive { set } => (set, None),
                Action::Write { doc, set, .. } => {
                    let target =
                        DocId::new(doc.as_str()).map_err(|e| err(format!("{}: {e}", at("doc"))))?;
                    (set, Some(target))
                }
                Action::Http { .. } | Action::Exec { .. } | Action::Resolve { .. } => {
                    (&BTreeMap::new(), None)
                }
            };
            let glob = match &s.action {
                Action::Resolve { path, .. } => {
                    Some(pointer_glob(path).map_err(|e| err(format!("{}: {e}", at("path"))))?)
                }
                _ => None,
            };
            let mut compiled = Vec::with_capacity(set.len());
            for (pointer, src) in set {
                let key = at(&format!("set {pointer:?}"));
                let ptr = Pointer::parse(pointer).map_err(|e| err(format!("{key}: {e}")))?;
                if ptr.is_root() {
                    return Err(err(format!("{key}: cannot replace the whole document")));
                }
                let expr = sandbox
                    .compile(src)
                    .map_err(|e| err(format!("{key}: {e}")))?;
                compiled.push((ptr, expr));
            }
            let (merge, body, query) = match &s.action {
                Action::Write { merge, .. } => (compile(&at("merge"), merge)?, None, None),
                Action::Http { body, query, .. } => (
                    None,
                    compile(&at("body"), body)?,
                    compile(&at("query"), query)?,
                ),
                _ => (None, None, None),
            };
            // Steps come after those they need: their closures are known.
            let mut upstream: Vec<usize> = Vec::new();
            for n in &s.needs {
                let j = index[n.as_str()];
                upstream.push(j);
                upstream.extend_from_slice(&steps[j].upstream);
            }
            upstream.sort_unstable();
            upstream.dedup();
            let after_effects = upstream
                .iter()
                .copied()
                .filter(|&j| def.steps[j].action.is_effect())
                .collect();
            steps.push(StepPlan {
                when,
                set: compiled,
                target,
                glob,
                merge,
                body,
                query,
                upstream,
                after_effects,
            });
        }
        Ok(Arc::new(Plan {
            def,
            source_name: source_name.to_string(),
            text: text.to_string(),
            when,
            path,
            steps,
        }))
    }

    /// True if the workflow runs commands (an `exec` step or an `exec`
    /// `[on_failure]`): `apply` refuses it unless
    /// `workflow.allow_applied_exec` is set.
    pub fn runs_commands(&self) -> bool {
        self.def
            .steps
            .iter()
            .chain(&self.def.on_failure)
            .any(|s| matches!(s.action, super::def::Action::Exec { .. }))
    }

    /// The URLs of its `http` steps (its `on_failure` too).
    pub fn http_urls(&self) -> impl Iterator<Item = &str> {
        self.def
            .steps
            .iter()
            .chain(&self.def.on_failure)
            .filter_map(|s| match &s.action {
                super::def::Action::Http { url, .. } => Some(url.as_str()),
                _ => None,
            })
    }

    /// The first `http` step URL that `allow` refuses.
    pub fn refused_url(&self, allow: &crate::http_allow::HttpAllow) -> Option<String> {
        self.http_urls().find_map(|u| allow.check_url(u).err())
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// True if a change event triggers this workflow: its doc, its origin
    /// and (with an `[on] path`) one of its changed paths match. A deleted
    /// doc triggers nothing.
    pub fn matches(&self, e: &ChangeEvent) -> bool {
        let Some((_, glob)) = &self.def.trigger.doc else {
            return false;
        };
        let origin_ok = match self.def.trigger.origin {
            Origin::Any => true,
            Origin::Local => e.local,
            Origin::Remote => !e.local,
        };
        origin_ok && !e.deleted && glob.matches(&e.doc) && self.path_matches(e)
    }

    /// True if the event touched the trigger's path glob: a changed path or
    /// one of its parents matches, or a changed path is a parent of what the
    /// glob names (the whole subtree was replaced), or the event lists only
    /// some of its paths.
    fn path_matches(&self, e: &ChangeEvent) -> bool {
        let (Some(glob), Some(pattern)) = (&self.path, &self.def.trigger.path) else {
            return true;
        };
        if e.paths_truncated {
            return true;
        }
        e.paths.iter().any(|p| {
            let mut at = p.as_str();
            loop {
                if glob.is_match(at) {
                    return true;
                }
                match at.rfind('/') {
                    Some(0) | None => break,
                    Some(i) => at = &at[..i],
                }
            }
            p == "/" || pattern.starts_with(&format!("{p}/"))
        })
    }
}

/// A JSON Pointer glob: `*` within a `/` segment, `**` across.
fn pointer_glob(pattern: &str) -> Result<globset::GlobMatcher, globset::Error> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
}

/// The name of a step's kind, as written in definitions.
pub fn kind_name(action: &Action) -> &'static str {
    match action {
        Action::Derive { .. } => "derive",
        Action::Resolve { .. } => "resolve",
        Action::Write { .. } => "write",
        Action::Http { .. } => "http",
        Action::Exec { .. } => "exec",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(doc: &str, local: bool, paths: &[&str]) -> ChangeEvent {
        ChangeEvent {
            id: String::new(),
            seq: 0,
            doc: doc.into(),
            heads: vec!["h".into()],
            origin: "p".into(),
            local,
            deleted: false,
            paths: paths.iter().map(|p| p.to_string()).collect(),
            paths_truncated: false,
            cause: None,
        }
    }

    const F: &str = r#"
name = "f"
[on]
doc = "sensors/*"
path = "/readings/*/celsius"
origin = "remote"
[[steps]]
id = "c"
kind = "derive"
set = { "/f" = "doc.c * 2" }
"#;

    #[test]
    fn triggers_match_doc_origin_and_path() {
        let p = Plan::load(&Sandbox::new(), "f.toml", F).unwrap();
        assert!(p.matches(&event("sensors/a", false, &["/readings/x/celsius"])));
        assert!(p.matches(&event("sensors/a", false, &["/readings/x/celsius/deep"])));
        assert!(
            p.matches(&event("sensors/a", false, &["/readings"])),
            "parent replaced"
        );
        assert!(!p.matches(&event("sensors/a", false, &["/readings/x/kelvin"])));
        assert!(!p.matches(&event("sensors/a", true, &["/readings/x/celsius"])));
        assert!(!p.matches(&event("rooms/a", false, &["/readings/x/celsius"])));
        let mut cut = event("sensors/a", false, &[]);
        cut.paths_truncated = true;
        assert!(p.matches(&cut));
        let mut gone = event("sensors/a", false, &["/readings/x/celsius"]);
        gone.deleted = true;
        assert!(!p.matches(&gone));
    }

    #[test]
    fn every_example_under_examples_workflows_loads_and_all_kinds_are_there() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows");
        let s = Sandbox::new();
        let mut n = 0;
        let mut kinds = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let plan = Plan::load(&s, &path.display().to_string(), &text).unwrap();
            kinds.extend(plan.def.steps.iter().map(|s| kind_name(&s.action)));
            n += 1;
        }
        assert!(n >= 3);
        let all = ["derive", "exec", "http", "resolve", "write"];
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            all,
            "an example of every step kind"
        );
    }

    #[test]
    fn bad_expressions_are_load_errors_and_steps_know_what_they_follow() {
        let s = Sandbox::new();
        let bad = F.replace("doc.c * 2", "doc.c * ");
        let err = Plan::load(&s, "f.toml", &bad).unwrap_err().to_string();
        assert!(
            err.contains("f.toml") && err.contains("step \"c\": set \"/f\""),
            "{err}"
        );
        assert!(err.contains("line 1"), "{err}");
        let http = "name = \"h\"\n[on]\ndoc = \"d\"\n[[steps]]\nid = \"a\"\nkind = \"http\"\nurl = \"https://example.org/\"\n";
        assert!(Plan::load(&s, "h.toml", http).is_ok(), "https is supported");
        // A body expression is compiled with the rest.
        let body = format!("{http}method = \"PUT\"\nbody = \"#{{ x: \"\n");
        let err = Plan::load(&s, "h.toml", &body).unwrap_err().to_string();
        assert!(err.contains("step \"a\": body"), "{err}");
        // Steps see what they need, through others too, and know the
        // effects they follow.
        let chain = format!(
            "{http}[[steps]]\nid = \"b\"\nkind = \"write\"\ndoc = \"out\"\nneeds = [\"a\"]\n\
             merge = \"steps.a.body\"\n[[steps]]\nid = \"c\"\nkind = \"write\"\ndoc = \"out\"\n\
             needs = [\"b\"]\nset = {{ \"/n\" = \"1\" }}\n[[steps]]\nid = \"d\"\nkind = \"write\"\n\
             doc = \"out\"\nset = {{ \"/m\" = \"1\" }}\n"
        );
        let p = Plan::load(&s, "h.toml", &chain).unwrap();
        let ids = |v: &[usize]| {
            v.iter()
                .map(|&i| p.def.steps[i].id.clone())
                .collect::<Vec<_>>()
        };
        let c = p.def.steps.iter().position(|s| s.id == "c").unwrap();
        let d = p.def.steps.iter().position(|s| s.id == "d").unwrap();
        assert_eq!(ids(&p.steps[c].upstream), ["a", "b"]);
        assert_eq!(ids(&p.steps[c].after_effects), ["a"]);
        assert!(p.steps[d].upstream.is_empty() && p.steps[d].after_effects.is_empty());
        let root = F.replace("\"/f\"", "\"\"");
        assert!(Plan::load(&s, "f.toml", &root).is_err());
    }
}
