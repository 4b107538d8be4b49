//! The layout rules of `src/` (issue 19), checked on every `cargo test` and
//! by `scripts/check-layout.sh`:
//! - no import cycle between the modules of `src/`: between files (each file
//!   is a module), and between top-level modules (`src/doc/` as one);
//! - no source file over 700 lines, not counting its `#[cfg(test)]` items;
//! - every TLS client of the node (src/ and mergeflow-tools) installs the
//!   rustls crypto provider before it is built.
//!
//! Imports are read from the source text: `use` trees and qualified paths
//! (`crate::`, `super::`, `self::`, and paths from a child module), with
//! comments, strings and `#[cfg(test)]` items left out. A name that a
//! module only re-exports (`pub use child::Name`) resolves to the file that
//! defines it, and a module's re-exports of its own children are not
//! imports: a parent that merely lists its children's names is not in a
//! circle with them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest a source file may be, not counting its `#[cfg(test)]` items.
const MAX_LINES: usize = 700;

#[test]
fn no_import_cycles_between_the_modules_of_src() {
    let tree = Tree::read(&repo().join("src"));
    let report = tree.cycles();
    assert!(report.is_empty(), "import cycles in src/:\n{report}");
}

#[test]
fn no_source_file_is_over_700_lines_without_its_tests() {
    let tree = Tree::read(&repo().join("src"));
    let over: Vec<String> = tree
        .files
        .values()
        .filter(|f| f.lines > MAX_LINES)
        .map(|f| format!("  {} has {} lines (not counting tests)", f.rel, f.lines))
        .collect();
    assert!(
        over.is_empty(),
        "files over {MAX_LINES} lines in src/; split them by concern:\n{}",
        over.join("\n")
    );
}

/// Where the node builds a TLS client that takes rustls' process-wide
/// crypto provider (reqwest is built without one of its own, and so is
/// rumqttc's simple TLS setup). Test builds give reqwest a provider through
/// a dev-dependency, so a client built without
/// `http_allow::install_tls_provider()` works in every test and fails only
/// in the node binary: this rule is the check.
const TAKES_DEFAULT_PROVIDER: [&str; 6] = [
    "Client::builder()",
    "Client::new()",
    "ClientBuilder::new()",
    "reqwest::get(",
    "ClientConfig::builder()",
    "TlsConfiguration::Simple",
];

#[test]
fn every_tls_client_of_the_node_installs_the_provider_first() {
    let mut files = Vec::new();
    walk(&repo().join("src"), &mut files);
    walk(&repo().join("tools/mergeflow-tools/src"), &mut files);
    let mut found = 0;
    let mut bad = Vec::new();
    for path in files {
        let src = std::fs::read_to_string(&path).expect("readable source");
        let (code, _) = drop_test_items(&blank(&src));
        let lines: Vec<&str> = code.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !TAKES_DEFAULT_PROVIDER.iter().any(|p| line.contains(p)) {
                continue;
            }
            found += 1;
            let before = &lines[i.saturating_sub(3)..i];
            if !before.iter().any(|l| l.contains("install_tls_provider()")) {
                bad.push(format!("  {}:{}: {}", path.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        found >= 2,
        "the check found no client at all: is it still reading src/?"
    );
    assert!(
        bad.is_empty(),
        "TLS clients built without `crate::http_allow::install_tls_provider()` in the 3 lines \
         before (the node binary has no other provider):\n{}",
        bad.join("\n")
    );
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Which crate a file belongs to: the library (`lib.rs` and its modules) or
/// the binary (`main.rs` and the modules it declares).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Krate {
    Lib,
    Bin,
}

/// A module's place: its crate and path from the crate root.
type ModPath = (Krate, Vec<String>);

struct File {
    /// Path relative to the tree's root, for messages.
    rel: String,
    /// Source lines, not counting `#[cfg(test)]` items.
    lines: usize,
    /// Source with comments, strings and test items blanked.
    code: String,
}

struct Tree {
    /// By module path.
    files: BTreeMap<ModPath, File>,
}

/// One import: the file it resolves to and the name it came by.
type Edges = BTreeMap<ModPath, BTreeMap<ModPath, BTreeSet<String>>>;

impl Tree {
    fn read(src: &Path) -> Tree {
        let mut paths = Vec::new();
        walk(src, &mut paths);
        let main = std::fs::read_to_string(src.join("main.rs")).unwrap_or_default();
        let bin_mods: BTreeSet<String> = declared_mods(&blank(&main));
        let mut files = BTreeMap::new();
        for path in paths {
            let rel = path.strip_prefix(src).expect("under src").to_path_buf();
            let mut segs: Vec<String> = rel
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            let last = segs.pop().expect("a file name");
            let stem = last.trim_end_matches(".rs").to_string();
            let krate = match (segs.first(), stem.as_str()) {
                (None, "main") => Krate::Bin,
                (None, s) if bin_mods.contains(s) => Krate::Bin,
                (Some(top), _) if bin_mods.contains(top) => Krate::Bin,
                _ => Krate::Lib,
            };
            if !(segs.is_empty() && matches!(stem.as_str(), "lib" | "main") || stem == "mod") {
                segs.push(stem);
            }
            let text = std::fs::read_to_string(&path).expect("readable source");
            let stripped = blank(&text);
            let (code, test_lines) = drop_test_items(&stripped);
            files.insert(
                (krate, segs),
                File {
                    rel: format!("src/{}", rel.display()),
                    lines: text.lines().count() - test_lines,
                    code,
                },
            );
        }
        Tree { files }
    }

    /// Every import between files, resolved through re-exports.
    fn edges(&self) -> Edges {
        let exports: BTreeMap<&ModPath, BTreeMap<String, Vec<String>>> = self
            .files
            .iter()
            .map(|(m, f)| (m, self.reexports(m, &f.code)))
            .collect();
        let mut edges = Edges::new();
        for (from, f) in &self.files {
            for (path, reexport) in self.paths(from, &f.code) {
                let Some(to) = self.resolve(from.0, path.clone(), &exports, 0) else {
                    continue;
                };
                // A module re-exporting its own descendants imports nothing.
                let own_child = to.0 == from.0 && to.1.starts_with(&from.1);
                if &to == from || (reexport && own_child) {
                    continue;
                }
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(format!("crate::{}", path.join("::")));
            }
        }
        edges
    }

    /// The file an absolute path names, following re-exports of the name
    /// after the module part.
    fn resolve(
        &self,
        krate: Krate,
        path: Vec<String>,
        exports: &BTreeMap<&ModPath, BTreeMap<String, Vec<String>>>,
        depth: usize,
    ) -> Option<ModPath> {
        let n = (0..=path.len())
            .rev()
            .find(|&n| self.files.contains_key(&(krate, path[..n].to_vec())))?;
        let module = (krate, path[..n].to_vec());
        if let Some(name) = path.get(n)
            && depth < 16
            && let Some(target) = exports.get(&module).and_then(|e| e.get(name))
        {
            let mut next = target.clone();
            next.extend(path[n + 1..].iter().cloned());
            return self.resolve(krate, next, exports, depth + 1);
        }
        Some(module)
    }

    /// What `module` re-exports: name -> absolute path of the target.
    fn reexports(&self, module: &ModPath, code: &str) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (is_pub, tree) in use_trees(code) {
            if !is_pub {
                continue;
            }
            for (path, alias) in expand(&tree) {
                if path.last().map(String::as_str) == Some("*") {
                    continue;
                }
                if let Some(abs) = self.absolute(module, &path) {
                    let name = alias.unwrap_or_else(|| path.last().expect("a name").clone());
                    out.insert(name, abs);
                }
            }
        }
        out
    }

    /// Paths in `code` that name something in this crate, absolute, each with
    /// whether it came from a re-export (`pub use`).
    fn paths(&self, module: &ModPath, code: &str) -> Vec<(Vec<String>, bool)> {
        let mut out = Vec::new();
        for (is_pub, tree) in use_trees(code) {
            for (path, _) in expand(&tree) {
                let path: Vec<String> = path.into_iter().filter(|s| s != "*").collect();
                if let Some(abs) = self.absolute(module, &path) {
                    out.push((abs, is_pub));
                }
            }
        }
        for path in qualified_paths(code) {
            if let Some(abs) = self.absolute(module, &path) {
                out.push((abs, false));
            }
        }
        out
    }

    /// `path` as written in `module`, from its crate's root; `None` for a
    /// path into another crate.
    fn absolute(&self, module: &ModPath, path: &[String]) -> Option<Vec<String>> {
        let (krate, here) = module;
        let first = path.first()?;
        let mut base = here.clone();
        let mut rest = path;
        match first.as_str() {
            "crate" => {
                base.clear();
                rest = &path[1..];
            }
            "self" => rest = &path[1..],
            "super" => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            "mergeflow" if *krate == Krate::Bin => return None,
            name => {
                // A child module of this one (2018 paths), else another crate.
                let mut child = here.clone();
                child.push(name.to_string());
                if !self.files.contains_key(&(*krate, child)) {
                    return None;
                }
            }
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// Every cycle, between files and between top-level modules, as text
    /// (empty if none).
    fn cycles(&self) -> String {
        let edges = self.edges();
        let mut report = String::new();
        let names = |m: &ModPath| self.files[m].rel.clone();
        for scc in strongly_connected(&edges) {
            report.push_str("circle between files:\n");
            for from in &scc {
                for (to, via) in edges.get(from).into_iter().flatten() {
                    if scc.contains(to) {
                        let via: Vec<&str> = via.iter().map(String::as_str).take(4).collect();
                        report.push_str(&format!(
                            "  {} -> {}: {}\n",
                            names(from),
                            names(to),
                            via.join(", ")
                        ));
                    }
                }
            }
        }
        // The same, with each top-level module (src/doc/ ...) as one node.
        let top = |m: &ModPath| -> ModPath { (m.0, m.1.iter().take(1).cloned().collect()) };
        let mut coarse = Edges::new();
        for (from, tos) in &edges {
            for (to, via) in tos {
                let (a, b) = (top(from), top(to));
                if a != b && !a.1.is_empty() && !b.1.is_empty() {
                    let e = coarse.entry(a).or_default().entry(b).or_default();
                    e.extend(via.iter().map(|v| format!("{} uses {v}", names(from))));
                }
            }
        }
        for scc in strongly_connected(&coarse) {
            report.push_str("circle between top-level modules:\n");
            for from in &scc {
                for (to, via) in coarse.get(from).into_iter().flatten() {
                    if scc.contains(to) {
                        let via: Vec<&str> = via.iter().map(String::as_str).take(3).collect();
                        report.push_str(&format!(
                            "  {} -> {}: {}\n",
                            from.1.join("::"),
                            to.1.join("::"),
                            via.join("; ")
                        ));
                    }
                }
            }
        }
        report
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("readable dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments, string and char literals replaced by spaces
/// (newlines kept, so line numbers stay).
fn blank(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let keep = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(keep(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_char_before(&b, i)
        {
            // A raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(keep(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(keep(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), else a lifetime.
            let end = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&j| b[j] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    for _ in i..=e {
                        out.push(' ');
                    }
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_char_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// `code` without its `#[cfg(test)]` items, and how many lines they took.
fn drop_test_items(code: &str) -> (String, usize) {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    let mut test_lines = 0;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        // The item ends at its first `;` or at the brace closing its block.
        let mut depth = 0usize;
        let mut end = item.len();
        for (j, ch) in item.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        let dropped = &item[..end];
        let newlines = dropped.matches('\n').count();
        // The lines the item covers, its first and last included.
        test_lines += newlines + 1;
        out.extend(std::iter::repeat_n('\n', newlines));
        rest = &item[end..];
        if let Some(nl) = rest.find('\n') {
            // The rest of the item's last line goes with it.
            if rest[..nl].trim().is_empty() {
                rest = &rest[nl..];
                out.push('\n');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    (out, test_lines)
}

/// Names of `mod x;` declarations.
fn declared_mods(code: &str) -> BTreeSet<String> {
    let toks = tokens(code);
    let mut out = BTreeSet::new();
    for w in toks.windows(3) {
        if w[0] == "mod" && w[2] == ";" {
            out.insert(w[1].clone());
        }
    }
    out
}

/// Identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_alphanumeric() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            out.push(b[s..i].iter().collect());
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

/// A parsed `use` tree: a path prefix, then a name (with its alias), a
/// glob, or a group of trees.
enum UseTree {
    Path(Vec<String>, Option<String>),
    Group(Vec<String>, Vec<UseTree>),
}

/// Every `use` item: whether it is a re-export (`pub`, `pub(crate)` ...)
/// and its tree.
fn use_trees(code: &str) -> Vec<(bool, UseTree)> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let at_item = i == 0 || matches!(toks[i - 1].as_str(), ";" | "}" | "{" | "]" | ")");
        let is_pub = toks[i] == "pub";
        let mut j = i;
        if is_pub {
            j += 1;
            if toks.get(j).map(String::as_str) == Some("(") {
                while j < toks.len() && toks[j] != ")" {
                    j += 1;
                }
                j += 1;
            }
        }
        if toks.get(j).map(String::as_str) == Some("use") && (at_item || is_pub) {
            let mut k = j + 1;
            if let Some(tree) = parse_tree(&toks, &mut k) {
                out.push((is_pub, tree));
            }
            i = k;
        } else {
            i += 1;
        }
    }
    out
}

fn parse_tree(toks: &[String], k: &mut usize) -> Option<UseTree> {
    let mut path = Vec::new();
    if toks.get(*k).map(String::as_str) == Some("::") {
        *k += 1;
    }
    loop {
        let t = toks.get(*k)?;
        if t == "{" {
            *k += 1;
            let mut group = Vec::new();
            while toks.get(*k).map(String::as_str) != Some("}") {
                group.push(parse_tree(toks, k)?);
                if toks.get(*k).map(String::as_str) == Some(",") {
                    *k += 1;
                }
            }
            *k += 1;
            return Some(UseTree::Group(path, group));
        }
        path.push(t.clone());
        *k += 1;
        match toks.get(*k).map(String::as_str) {
            Some("::") => *k += 1,
            Some("as") => {
                let alias = toks.get(*k + 1).cloned();
                *k += 2;
                return Some(UseTree::Path(path, alias));
            }
            _ => return Some(UseTree::Path(path, None)),
        }
    }
}

/// The paths of a use tree, each with its alias; `self` in a group names
/// the group's prefix.
fn expand(tree: &UseTree) -> Vec<(Vec<String>, Option<String>)> {
    match tree {
        UseTree::Path(p, alias) => vec![(p.clone(), alias.clone())],
        UseTree::Group(prefix, trees) => trees
            .iter()
            .flat_map(expand)
            .map(|(p, alias)| {
                let mut full = prefix.clone();
                full.extend(p.into_iter().filter(|s| s != "self"));
                (full, alias)
            })
            .collect(),
    }
}

/// Paths in code (outside `use` items) that start with `crate`, `super` or
/// `self`: `crate::a::b::Name`.
fn qualified_paths(code: &str) -> Vec<Vec<String>> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let starts = matches!(toks[i].as_str(), "crate" | "super" | "self")
            && toks.get(i + 1).map(String::as_str) == Some("::")
            && (i == 0 || toks[i - 1] != "::");
        let in_use = (i.saturating_sub(6)..i).any(|j| toks[j] == "use");
        if starts && !in_use {
            let mut path = vec![toks[i].clone()];
            let mut j = i + 1;
            while toks.get(j).map(String::as_str) == Some("::")
                && toks
                    .get(j + 1)
                    .is_some_and(|t| t.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                path.push(toks[j + 1].clone());
                j += 2;
            }
            out.push(path);
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The strongly connected components of more than one node (Tarjan).
fn strongly_connected(edges: &Edges) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        edges: &'a Edges,
        index: BTreeMap<ModPath, usize>,
        low: BTreeMap<ModPath, usize>,
        stack: Vec<ModPath>,
        on_stack: BTreeSet<ModPath>,
        out: Vec<Vec<ModPath>>,
    }
    fn visit(s: &mut State, v: &ModPath) {
        let n = s.index.len();
        s.index.insert(v.clone(), n);
        s.low.insert(v.clone(), n);
        s.stack.push(v.clone());
        s.on_stack.insert(v.clone());
        let next: Vec<ModPath> = s
            .edges
            .get(v)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for w in next {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = s.stack.pop().expect("on the stack");
                s.on_stack.remove(&w);
                scc.push(w.clone());
                if &w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.out.push(scc);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: Vec<ModPath> = edges.keys().cloned().collect();
    for v in nodes {
        if !s.index.contains_key(&v) {
            visit(&mut s, &v);
        }
    }
    s.out
}

/// The checker on small trees, so that it is itself tested.
mod checker {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let t = Tree::read(dir.path());
        (dir, t)
    }

    #[test]
    fn a_cycle_between_two_files_is_reported_with_its_names() {
        let (_d, t) = tree(&[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "use crate::b::Bee;\npub struct Ay;\n"),
            ("b.rs", "pub struct Bee(crate::a::Ay);\n"),
        ]);
        let r = t.cycles();
        assert!(r.contains("src/a.rs -> src/b.rs: crate::b::Bee"), "{r}");
        assert!(r.contains("src/b.rs -> src/a.rs: crate::a::Ay"), "{r}");
        assert!(r.contains("circle between top-level modules"), "{r}");
    }

    #[test]
    fn a_reexport_through_mod_rs_is_followed_to_the_defining_file() {
        // doc/mod.rs re-exports its children; b uses a's type through it:
        // b -> a only, no circle with mod.rs.
        let (_d, t) = tree(&[
            ("lib.rs", "pub mod doc;\npub use doc::{Ay, Bee};\n"),
            (
                "doc/mod.rs",
                "mod a;\nmod b;\npub use a::Ay;\npub use b::Bee;\npub enum DocError {}\n",
            ),
            ("doc/a.rs", "pub struct Ay(super::DocError);\n"),
            (
                "doc/b.rs",
                "use super::Ay;\npub struct Bee(Ay, crate::Ay);\n",
            ),
            ("other.rs", "use crate::Bee;\n"),
        ]);
        assert_eq!(t.cycles(), "");
        let e = t.edges();
        let key = |s: &[&str]| (Krate::Lib, s.iter().map(|x| x.to_string()).collect());
        let from_b = &e[&key(&["doc", "b"])];
        assert!(from_b.contains_key(&key(&["doc", "a"])), "{from_b:?}");
        assert!(!from_b.contains_key(&key(&["doc"])), "{from_b:?}");
        assert!(e[&key(&["doc", "a"])].contains_key(&key(&["doc"])));
    }

    #[test]
    fn comments_strings_and_test_items_import_nothing() {
        let (_d, t) = tree(&[
            ("lib.rs", "mod a;\nmod b;\n"),
            (
                "a.rs",
                "// use crate::b::X;\n/* crate::b::X */\nconst S: &str = \"crate::b::X\";\n\
                 const R: &str = r#\"crate::b::X\"#;\npub struct Ay;\n\
                 #[cfg(test)]\nmod tests {\n    use crate::b::Bee;\n}\n",
            ),
            ("b.rs", "pub struct Bee(crate::a::Ay);\n"),
        ]);
        assert_eq!(t.cycles(), "");
        let a = &t.files[&(Krate::Lib, vec!["a".to_string()])];
        assert_eq!(a.lines, 5, "the test module's 4 lines are not counted");
    }

    #[test]
    fn a_circle_through_a_third_file_and_group_imports_is_found() {
        let (_d, t) = tree(&[
            ("lib.rs", "mod x;\n"),
            ("x/mod.rs", "mod a;\nmod b;\nmod c;\n"),
            ("x/a.rs", "use super::{b::{self, Bee}, c as see};\n"),
            ("x/b.rs", "pub struct Bee;\nuse super::c::Sea;\n"),
            (
                "x/c.rs",
                "pub struct Sea;\nfn f() { let _ = super::a::g; }\n",
            ),
        ]);
        let r = t.cycles();
        assert!(r.contains("src/x/c.rs -> src/x/a.rs"), "{r}");
        assert!(r.contains("src/x/b.rs -> src/x/c.rs"), "{r}");
    }
}
