//! Expressions in workflow definitions (`when`, the values of `set`), in
//! [Rhai](https://rhai.rs).
//!
//! Why Rhai: it is a well-kept, pure-Rust embedded language whose engine can
//! be sandboxed from the host: no file, network or process access unless the
//! host registers it, and limits on operations, call depth, string, array
//! and map sizes. Its syntax reads like the expressions users already write
//! (`doc.celsius * 9.0 / 5.0 + 32.0`, `doc.fahrenheit > 100`), and `()`
//! stands for "no value", so `doc.celsius != ()` tests for a missing key.
//!
//! An expression sees five constants:
//! - `doc`: the document as JSON (maps, arrays, strings, integers, floats,
//!   booleans; null and a missing key read as `()`),
//! - `id`: the doc id,
//! - `changed`: the JSON Pointers the triggering change touched,
//! - `node`: this node's labels (a map of strings),
//! - `steps`: the outputs of the steps this one needs, directly or through
//!   others, by step id (`steps.fetch.body`, or `steps["my-step"]` for an
//!   id with a `-`); empty for a trigger's `when`.
//!
//! Sandbox: `import` is not compiled in (no modules), `eval` is disabled,
//! `print` and `debug` go nowhere, there is no clock, and each evaluation is
//! cut off after [`MAX_OPERATIONS`] operations or [`MAX_TIME`], whichever
//! comes first. Derived values must be the same on every peer, so prefer the
//! operation limit: it cuts off at the same point everywhere.

use std::cell::Cell;
use std::time::{Duration, Instant};

use rhai::{AST, Dynamic, Engine, Scope};
use serde_json::Value as Json;

/// Most operations one evaluation may run.
pub const MAX_OPERATIONS: u64 = 200_000;
/// Longest one evaluation may run.
pub const MAX_TIME: Duration = Duration::from_millis(100);
/// Longest string an expression may build, in bytes.
const MAX_STRING: usize = 1 << 20;
/// Most elements in an array or map an expression may build.
const MAX_COLLECTION: usize = 100_000;

thread_local! {
    /// When the evaluation running on this thread must stop.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The sandboxed engine. Build once; cheap to share.
pub struct Sandbox {
    engine: Engine,
}

/// What an expression sees.
pub struct Input<'a> {
    /// The document as JSON.
    pub doc: &'a Json,
    /// Its id.
    pub id: &'a str,
    /// Paths the triggering change touched.
    pub changed: &'a [String],
    /// This node's labels.
    pub node: &'a std::collections::BTreeMap<String, String>,
}

/// One compiled expression and its source.
#[derive(Clone)]
pub struct Expr {
    source: String,
    ast: AST,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

/// The prepared constants for one document state: converted to Rhai values
/// once, then shared by every expression evaluated on that state.
pub struct Bound {
    scope: Scope<'static>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// The engine with its sandbox limits set.
    pub fn new() -> Sandbox {
        let mut engine = Engine::new();
        engine.set_max_operations(MAX_OPERATIONS);
        engine.set_max_call_levels(32);
        engine.set_max_expr_depths(64, 32);
        engine.set_max_string_size(MAX_STRING);
        engine.set_max_array_size(MAX_COLLECTION);
        engine.set_max_map_size(MAX_COLLECTION);
        engine.disable_symbol("eval");
        engine.on_print(|_| {});
        engine.on_debug(|_, _, _| {});
        engine.on_progress(|ops| {
            if ops % 1024 != 0 {
                return None;
            }
            let late = DEADLINE.with(|d| d.get().is_some_and(|d| Instant::now() > d));
            late.then(|| Dynamic::from(format!("ran longer than {MAX_TIME:?}")))
        });
        Sandbox { engine }
    }

    /// Compiles `source`.
    ///
    /// # Errors
    /// The parse error, with its line and position.
    pub fn compile(&self, source: &str) -> Result<Expr, String> {
        let ast = self
            .engine
            .compile(source)
            .map_err(|e| format!("{source:?} does not parse: {e}"))?;
        Ok(Expr {
            source: source.to_string(),
            ast,
        })
    }

    /// Converts `input` to the constants expressions see.
    ///
    /// # Errors
    /// A document that Rhai cannot represent (should not happen for JSON).
    pub fn bind(&self, input: &Input<'_>) -> Result<Bound, String> {
        let conv = |v: &Json| rhai::serde::to_dynamic(v).map_err(|e| e.to_string());
        let mut scope = Scope::new();
        scope.push_constant_dynamic("doc", conv(input.doc)?);
        scope.push_constant("id", input.id.to_string());
        let changed: rhai::Array = input.changed.iter().map(|p| p.clone().into()).collect();
        scope.push_constant("changed", changed);
        let node: rhai::Map = input
            .node
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.clone().into()))
            .collect();
        scope.push_constant("node", node);
        scope.push_constant("steps", rhai::Map::new());
        Ok(Bound { scope })
    }

    /// `bound` with `steps` (a JSON object: step id -> output) in place of
    /// the empty one.
    ///
    /// # Errors
    /// As [`bind`](Self::bind).
    pub fn with_steps(&self, bound: &Bound, steps: &Json) -> Result<Bound, String> {
        let mut scope = bound.scope.clone();
        let value = rhai::serde::to_dynamic(steps).map_err(|e| e.to_string())?;
        scope.push_constant_dynamic("steps", value); // shadows the empty one
        Ok(Bound { scope })
    }

    /// Evaluates `expr` on `bound`; `()` comes back as `None`.
    ///
    /// # Errors
    /// A runtime error (type mismatch, a limit hit), or a value with no JSON
    /// form (a NaN or infinite float).
    pub fn eval(&self, expr: &Expr, bound: &Bound) -> Result<Option<Json>, String> {
        // Rhai lets a script assign into a constant map (`doc.x = 1`); each
        // expression gets its own copy so that none sees another's edits.
        let mut scope = bound.scope.clone();
        DEADLINE.with(|d| d.set(Some(Instant::now() + MAX_TIME)));
        let out = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut scope, &expr.ast);
        DEADLINE.with(|d| d.set(None));
        let value = out.map_err(|e| match *e {
            rhai::EvalAltResult::ErrorTerminated(..) => {
                format!("{:?}: stopped after running {MAX_TIME:?}", expr.source)
            }
            e => format!("{:?}: {e}", expr.source),
        })?;
        if value.is_unit() {
            return Ok(None);
        }
        if let Ok(f) = value.as_float()
            && !f.is_finite()
        {
            return Err(format!("{:?}: {f} has no JSON form", expr.source));
        }
        rhai::serde::from_dynamic::<Json>(&value)
            .map(Some)
            .map_err(|e| format!("{:?}: the value has no JSON form: {e}", expr.source))
    }

    /// Evaluates a condition: true or false; `()` counts as false.
    ///
    /// # Errors
    /// As [`eval`](Self::eval), or a value that is not a boolean.
    pub fn test(&self, expr: &Expr, bound: &Bound) -> Result<bool, String> {
        match self.eval(expr, bound)? {
            None => Ok(false),
            Some(Json::Bool(b)) => Ok(b),
            Some(other) => Err(format!(
                "{:?} must be true or false, not {other}",
                expr.source
            )),
        }
    }
}

impl Expr {
    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(src: &str, doc: Json) -> Result<Option<Json>, String> {
        let e = Sandbox::new();
        let expr = e.compile(src)?;
        let labels = [("zone".to_string(), "north".to_string())].into();
        let changed = vec!["/celsius".to_string()];
        let input = Input {
            doc: &doc,
            id: "sensors/a",
            changed: &changed,
            node: &labels,
        };
        let b = e.bind(&input)?;
        e.eval(&expr, &b)
    }

    /// `doc` bound as doc "d", with no changed paths and no labels.
    fn bind(e: &Sandbox, doc: &Json) -> Bound {
        let labels = Default::default();
        let input = Input {
            doc,
            id: "d",
            changed: &[],
            node: &labels,
        };
        e.bind(&input).unwrap()
    }

    #[test]
    fn steps_hold_the_outputs_given_and_scripts_can_reshape_them() {
        let e = Sandbox::new();
        let b = bind(&e, &json!({}));
        let none = e.compile("steps.fetch").unwrap();
        assert_eq!(e.eval(&none, &b), Ok(None), "no steps: ()");
        let outputs = json!({"fetch": {"status": 200, "state": "done", "body": {
            "prices": [{"sku": "a", "price": 3}, {"sku": "b", "price": 5}]
        }}});
        let b = e.with_steps(&b, &outputs).unwrap();
        let by_sku = e
            .compile("let m = #{}; for p in steps.fetch.body.prices { m[p.sku] = p.price; } #{ by_sku: m }")
            .unwrap();
        assert_eq!(
            e.eval(&by_sku, &b),
            Ok(Some(json!({"by_sku": {"a": 3, "b": 5}})))
        );
        let status = e.compile("steps.fetch.status == 200").unwrap();
        assert_eq!(e.test(&status, &b), Ok(true));
        // A constant: a script cannot change what the next one sees.
        let edit = e
            .compile("steps.fetch.status = 500; steps.fetch.status")
            .unwrap();
        assert!(e.eval(&edit, &b).is_err() || e.test(&status, &b) == Ok(true));
        assert_eq!(e.test(&status, &b), Ok(true));
    }

    #[test]
    fn expressions_see_doc_id_changed_and_node() {
        let doc = json!({"celsius": 37, "tags": ["a", "b"], "m": {"k": 1.5}});
        assert_eq!(
            run("doc.celsius * 9.0 / 5.0 + 32.0", doc.clone()),
            Ok(Some(json!(98.6)))
        );
        assert_eq!(run("doc.celsius * 2", doc.clone()), Ok(Some(json!(74))));
        assert_eq!(run("doc.missing == ()", doc.clone()), Ok(Some(json!(true))));
        assert_eq!(run("doc.missing", doc.clone()), Ok(None));
        assert_eq!(run("doc.tags.len()", doc.clone()), Ok(Some(json!(2))));
        assert_eq!(run("doc.m.k", doc.clone()), Ok(Some(json!(1.5))));
        assert_eq!(run("id", doc.clone()), Ok(Some(json!("sensors/a"))));
        assert_eq!(
            run("\"/celsius\" in changed", doc.clone()),
            Ok(Some(json!(true)))
        );
        assert_eq!(run("node.zone", doc.clone()), Ok(Some(json!("north"))));
        assert_eq!(
            run("#{ avg: (1 + 2) / 2, ok: true }", doc),
            Ok(Some(json!({"avg": 1, "ok": true})))
        );
    }

    #[test]
    fn parse_errors_name_the_expression_and_position() {
        let e = Sandbox::new();
        let err = e.compile("doc.celsius * ").unwrap_err();
        assert!(err.contains("\"doc.celsius * \" does not parse"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn the_sandbox_stops_runaway_and_forbidden_expressions() {
        let doc = json!({});
        let err = run("{ let x = 0; loop { x += 1; } }", doc.clone()).unwrap_err();
        assert!(
            err.contains("operations") || err.contains("stopped after"),
            "{err}"
        );
        assert!(Sandbox::new().compile("eval(\"1\")").is_err());
        assert!(Sandbox::new().compile("import \"x\" as y").is_err());
        let err = run("\"x\".pad(10000000, \"y\")", doc.clone()).unwrap_err();
        assert!(err.contains("ength") || err.contains("size"), "{err}");
        let e = Sandbox::new();
        let b = bind(&e, &doc);
        let set = e.eval(&e.compile("doc.x = 1").unwrap(), &b);
        let got = e.eval(&e.compile("doc.x").unwrap(), &b);
        assert_eq!(
            got,
            Ok(None),
            "one expression cannot change what the next sees ({set:?})"
        );
        assert!(run("1.0 / 0.0", doc).unwrap_err().contains("no JSON form"));
    }

    #[test]
    fn conditions_must_be_booleans() {
        let e = Sandbox::new();
        let doc = json!({"t": 5});
        let b = bind(&e, &doc);
        assert_eq!(e.test(&e.compile("doc.t > 3").unwrap(), &b), Ok(true));
        assert_eq!(e.test(&e.compile("doc.none").unwrap(), &b), Ok(false));
        let err = e.test(&e.compile("doc.t").unwrap(), &b).unwrap_err();
        assert!(err.contains("must be true or false"), "{err}");
    }
}
