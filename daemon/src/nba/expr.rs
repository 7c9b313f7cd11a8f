//! The CEL expressions of offers (`audience`, `weight`, `segment`,
//! `escalate.when`, `conversion.when`), compiled once when offers load and
//! evaluated on the store's writer thread.
//!
//! Offers need what achievement predicates do not: the customer's profile
//! (`profile.team == data.team`), and one trigger evaluated for many
//! customers (a venue-wide moment fans out to every present fan). So the
//! scope is built in two layers: the trigger's `data` and `event` once per
//! event, then a thin child scope per customer holding only `profile` and
//! `progress` (the customer's achievement progress, read only for offer
//! sets that mention it). Converting the trigger's JSON once is what
//! keeps a 100,000-customer fan-out affordable.

use std::collections::BTreeSet;

use cel::common::ast::{EntryExpr, Expr as Ast, IdedEntryExpr, IdedExpr};
use cel::common::types::CelMap;
use cel::{Context, Program, Value};
use serde_json::Map;

use crate::engine::predicate::{self, event_map, json, object, EvalError};
use crate::event::Event;

/// A compiled offer expression.
pub struct Expr {
    program: Program,
    source: String,
    /// The profile fields the expression reads, when it reads the
    /// customer only through `profile.<field>`; `None` when it reads more
    /// (the whole `profile`, an index into it, or `progress`). Customers
    /// alike in these fields get the same result for the same trigger,
    /// which is what lets a fan-out evaluate once per kind of customer.
    profile_fields: Option<BTreeSet<String>>,
    /// Whether the expression mentions `progress`: reading a customer's
    /// progress costs a state read, so it is done only when needed.
    reads_progress: bool,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

/// Why an expression did not give a usable value; the caller counts it
/// and treats the offer as not matching.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    #[error("`{expr}` failed: {detail}")]
    Execution { expr: String, detail: String },
    #[error("`{expr}` returned {found}, not {wanted}")]
    WrongType {
        expr: String,
        found: String,
        wanted: &'static str,
    },
}

impl Expr {
    /// Compiles `source`. The config reader compiled it already, so an
    /// error here means the two disagree; deep nesting needs a deep stack
    /// and the caller compiles on one.
    pub fn compile(source: &str) -> Result<Expr, String> {
        let program = Program::compile(source).map_err(|e| e.to_string())?;
        let mut fields = BTreeSet::new();
        let profile_fields = customer_reads(program.expression(), &mut fields).then_some(fields);
        let reads_progress = mentions(program.expression(), "progress");
        Ok(Expr {
            program,
            source: source.to_owned(),
            profile_fields,
            reads_progress,
        })
    }

    /// See [`Expr::reads_progress`](Expr#structfield.reads_progress).
    pub fn reads_progress(&self) -> bool {
        self.reads_progress
    }

    /// See [`Expr::profile_fields`](Expr#structfield.profile_fields).
    pub fn profile_fields(&self) -> Option<&BTreeSet<String>> {
        self.profile_fields.as_ref()
    }

    fn eval(&self, scope: &Context<'_, '_>) -> Result<Value, ExprError> {
        predicate::run(&self.program, scope).map_err(|e| ExprError::Execution {
            expr: self.source.clone(),
            detail: match e {
                EvalError::Execution(detail) => detail,
                other => other.to_string(),
            },
        })
    }

    fn wrong(&self, found: &Value, wanted: &'static str) -> ExprError {
        ExprError::WrongType {
            expr: self.source.clone(),
            found: format!("{found:?}"),
            wanted,
        }
    }

    pub fn eval_bool(&self, scope: &Context<'_, '_>) -> Result<bool, ExprError> {
        match self.eval(scope)? {
            Value::Bool(b) => Ok(b),
            other => Err(self.wrong(&other, "a bool")),
        }
    }

    /// A number: int, uint or double.
    pub fn eval_f64(&self, scope: &Context<'_, '_>) -> Result<f64, ExprError> {
        match self.eval(scope)? {
            Value::Float(f) => Ok(f),
            Value::Int(i) => Ok(i as f64),
            Value::UInt(u) => Ok(u as f64),
            other => Err(self.wrong(&other, "a number")),
        }
    }

    /// A string; numbers and bools are written out (a segment of `tier`
    /// 2 is the segment "2").
    pub fn eval_string(&self, scope: &Context<'_, '_>) -> Result<String, ExprError> {
        match self.eval(scope)? {
            Value::String(s) => Ok(s.as_str().to_owned()),
            Value::Int(i) => Ok(i.to_string()),
            Value::UInt(u) => Ok(u.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(self.wrong(&other, "a string")),
        }
    }
}

/// Collects the `profile.<field>` selections of `e` into `fields`; false
/// when `e` reads the customer in any other way.
fn customer_reads(e: &IdedExpr, fields: &mut BTreeSet<String>) -> bool {
    // A loop variable named like a customer variable would hide it; rare
    // enough to just give up on.
    let shadows = |v: &str| v == "profile" || v == "progress";
    match &e.expr {
        Ast::Ident(name) => !shadows(name),
        Ast::Select(select) if matches!(&select.operand.expr, Ast::Ident(n) if n == "profile") => {
            fields.insert(select.field.clone());
            true
        }
        Ast::Comprehension(c)
            if shadows(&c.iter_var)
                || c.iter_var2.as_deref().is_some_and(shadows)
                || shadows(&c.accu_var) =>
        {
            false
        }
        _ => children(e).into_iter().all(|x| customer_reads(x, fields)),
    }
}

/// Whether identifier `name` occurs anywhere in `e` (a loop variable of
/// that name counts too: erring towards yes only costs a read).
fn mentions(e: &IdedExpr, name: &str) -> bool {
    match &e.expr {
        Ast::Ident(n) => n == name,
        Ast::Comprehension(c) if c.iter_var == name || c.accu_var == name => true,
        _ => children(e).into_iter().any(|x| mentions(x, name)),
    }
}

/// The direct sub-expressions of `e`.
fn children(e: &IdedExpr) -> Vec<&IdedExpr> {
    fn entries(entries: &[IdedEntryExpr]) -> Vec<&IdedExpr> {
        entries
            .iter()
            .flat_map(|x| match &x.expr {
                EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
                EntryExpr::StructField(f) => vec![&f.value],
            })
            .collect()
    }
    match &e.expr {
        Ast::Select(select) => vec![&*select.operand],
        Ast::Call(call) => call
            .target
            .as_deref()
            .into_iter()
            .chain(&call.args)
            .collect(),
        Ast::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Ast::List(list) => list.elements.iter().collect(),
        Ast::Map(map) => entries(&map.entries),
        Ast::Struct(st) => entries(&st.entries),
        Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => Vec::new(),
    }
}

/// The root every scope derives from; built once per offer set (it
/// registers every built-in function, which is the expensive part).
pub fn root() -> Context<'static, 'static> {
    predicate::root()
}

/// The trigger's layer: `data` and `event`.
pub fn event_scope<'r, 'e>(
    root: &'r Context<'static, 'static>,
    event: &'e Event,
) -> Context<'r, 'e> {
    // A context is covariant in the lifetime of what it borrows, so the
    // 'static root can parent a scope that borrows the event.
    let root: &'r Context<'r, 'e> = root;
    let mut scope = root.new_inner_scope();
    scope.add_variable_as_val("data", json(&event.data));
    scope.add_variable_as_val("event", event_map(event));
    scope
}

/// The customer's layer on top of an event scope: `profile` and
/// `progress` (rule id → value in the instance the trigger falls in; an
/// empty map when no expression of the offer set reads it).
pub fn customer_scope<'s, 'v>(
    parent: &'s Context<'s, 'v>,
    profile: &'v Map<String, serde_json::Value>,
    progress: &'v Map<String, serde_json::Value>,
) -> Context<'s, 'v> {
    let mut scope = parent.new_inner_scope();
    scope.add_variable_as_val("profile", object(profile));
    if progress.is_empty() {
        // Keeps `has(progress.x)` well-defined without converting a map.
        scope.add_variable_as_val("progress", Box::new(CelMap::default()));
    } else {
        scope.add_variable_as_val("progress", object(progress));
    }
    scope
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(data: serde_json::Value) -> Event {
        Event {
            id: "e1".into(),
            source: "test".into(),
            kind: "match.chance_missed".into(),
            subject: None,
            time_ms: 1_700_000_000_000,
            data,
        }
    }

    fn profile(v: serde_json::Value) -> Map<String, serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn one_event_scope_serves_many_customers() {
        let root = root();
        let ev = event(json!({ "team": "A", "minute": 85 }));
        let scope = event_scope(&root, &ev);
        let audience = Expr::compile("profile.team == data.team").unwrap_or_else(|e| panic!("{e}"));
        let weight =
            Expr::compile("data.minute > 80 ? 1.5 : 1.0").unwrap_or_else(|e| panic!("{e}"));
        let a = profile(json!({ "team": "A" }));
        let b = profile(json!({ "team": "B" }));
        let none = Map::new();
        assert_eq!(
            audience.eval_bool(&customer_scope(&scope, &a, &none)),
            Ok(true)
        );
        assert_eq!(
            audience.eval_bool(&customer_scope(&scope, &b, &none)),
            Ok(false)
        );
        assert_eq!(weight.eval_f64(&customer_scope(&scope, &a, &none)), Ok(1.5));
        let segment = Expr::compile("profile.team").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            segment.eval_string(&customer_scope(&scope, &a, &none)),
            Ok("A".to_owned())
        );
    }

    #[test]
    fn profile_fields_are_found_or_refused() {
        let fields = |src: &str| {
            Expr::compile(src)
                .unwrap_or_else(|e| panic!("{e}"))
                .profile_fields()
                .map(|f| f.iter().cloned().collect::<Vec<_>>())
        };
        assert_eq!(
            fields("profile.team == data.team"),
            Some(vec!["team".into()])
        );
        assert_eq!(
            fields("has(profile.tier) && profile.tier in ['gold'] || profile.age > 30"),
            Some(vec!["age".into(), "tier".into()])
        );
        assert_eq!(
            fields("data.minute > 80 ? 1.5 : 1.0"),
            Some(Vec::<String>::new())
        );
        assert_eq!(
            fields("[1, 2].exists(x, x == profile.n)"),
            Some(vec!["n".into()])
        );
        // Whole-profile reads and progress cannot be told apart by fields.
        assert_eq!(fields("profile['team'] == 'A'"), None);
        assert_eq!(fields("size(profile) > 2"), None);
        assert_eq!(fields("has(progress.loyal)"), None);
        assert_eq!(fields("[1].exists(profile, profile == 1)"), None);
    }

    #[test]
    fn progress_is_read_only_where_mentioned() {
        let reads = |src: &str| {
            Expr::compile(src)
                .unwrap_or_else(|e| panic!("{e}"))
                .reads_progress()
        };
        assert!(reads("progress.explorer >= 3.0"));
        assert!(reads("has(progress.loyal) && profile.team == 'A'"));
        assert!(reads("progress['early-bird'] == 0.0 || data.minute > 80"));
        assert!(reads("[1].exists(x, x < progress.explorer)"));
        assert!(!reads("profile.team == data.team"));
        assert!(!reads("data.progress > 1"));

        let root = root();
        let ev = event(json!({}));
        let scope = event_scope(&root, &ev);
        let fan = Map::new();
        let close = profile(json!({ "explorer": 4.0, "early-bird": 0.0 }));
        let none = Map::new();
        let audience = Expr::compile(
            "has(progress.explorer) && progress.explorer >= 4.0 && progress['early-bird'] == 0.0",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            audience.eval_bool(&customer_scope(&scope, &fan, &close)),
            Ok(true)
        );
        assert_eq!(
            audience.eval_bool(&customer_scope(&scope, &fan, &none)),
            Ok(false)
        );
    }

    #[test]
    fn errors_and_wrong_types_are_errors() {
        let root = root();
        let ev = event(json!({}));
        let scope = event_scope(&root, &ev);
        let empty = Map::new();
        let none = Map::new();
        let missing = Expr::compile("profile.team == 'A'").unwrap_or_else(|e| panic!("{e}"));
        assert!(missing
            .eval_bool(&customer_scope(&scope, &empty, &none))
            .is_err());
        let number = Expr::compile("1 + 1").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            number.eval_bool(&customer_scope(&scope, &empty, &none)),
            Err(ExprError::WrongType { .. })
        ));
        assert_eq!(
            number.eval_f64(&customer_scope(&scope, &empty, &none)),
            Ok(2.0)
        );
    }
}
