//! CEL expressions of rules (`when`, `value`, `key`, `group_by`,
//! `credit`): compiled once at load, evaluated per event.
//!
//! Expressions in the plain part of CEL (fields compared with literals,
//! `&&`, `in` a list, ...) run natively over the event's JSON
//! ([`native`]); the interpreter runs the rest, and decides wherever the
//! native plan cannot (see there).
//!
//! Building a CEL root context registers every built-in function (tens of
//! microseconds), so the engine builds one at load and evaluates in a cheap
//! child scope per event. The child scope's variables borrow the event
//! (strings and map keys are not copied) and are built at most once per
//! event, only when some expression needs the interpreter, holding only
//! the variables the event's matching rules reference, and shared by
//! every rule the event meets.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use cel::{Context, Program, Value};

use super::native::{self, Plan, Val as Native};
use crate::event::Event;

/// Which variables a predicate (or a set of them) reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    pub data: bool,
    pub event: bool,
    pub profile: bool,
}

impl Needs {
    pub(crate) fn union(self, other: Needs) -> Needs {
        Needs {
            data: self.data || other.data,
            event: self.event || other.event,
            profile: self.profile || other.profile,
        }
    }
}

/// A compiled `when` expression.
pub(crate) struct Predicate {
    program: Program,
    plan: Option<Plan>,
    pub needs: Needs,
}

/// A compiled expression yielding a value (`value`, `key`, `group_by`,
/// `credit`).
pub(crate) struct Expr {
    program: Program,
    plan: Option<Plan>,
    pub needs: Needs,
}

/// Why a predicate did not yield `true` or `false`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EvalError {
    #[error("{0}")]
    Execution(String),
    #[error("returned {0}, not a bool")]
    NotBool(String),
    #[error("evaluation panicked")]
    Panicked,
    #[error("returned {0}, not a number")]
    NotNumber(String),
    #[error("returned {0}, not a string, number or bool")]
    NotKey(String),
}

fn needs_of(program: &Program) -> Needs {
    let refs = program.references();
    Needs {
        data: refs.has_variable("data"),
        event: refs.has_variable("event"),
        profile: refs.has_variable("profile"),
    }
}

/// Runs `program`, turning an interpreter panic into an error. Offers'
/// expressions run through here too.
pub(crate) fn run(program: &Program, scope: &Context<'_, '_>) -> Result<Value, EvalError> {
    // The interpreter is third-party code running on input we do not
    // control; a panic in it must not take the writer thread down.
    catch_unwind(AssertUnwindSafe(|| program.execute(scope)))
        .map_err(|_| EvalError::Panicked)?
        .map_err(|e| EvalError::Execution(e.to_string()))
}

impl Expr {
    /// Compiles `source` (on a thread with a deep stack, like predicates).
    pub(crate) fn compile(source: &str) -> Result<Expr, String> {
        let program = Program::compile(source).map_err(|e| e.to_string())?;
        let needs = needs_of(&program);
        let plan = Plan::compile(program.expression());
        Ok(Expr {
            program,
            plan,
            needs,
        })
    }

    /// The result as a finite number (`int`, `uint` or `double`).
    pub(crate) fn number(&self, vars: &Vars<'_, '_>) -> Result<f64, EvalError> {
        match self.plan.as_ref().and_then(|p| p.eval(&vars.input)) {
            Some(Native::Int(i)) => return Ok(i as f64),
            Some(Native::UInt(u)) => return Ok(u as f64),
            Some(Native::Double(f)) if f.is_finite() => return Ok(f),
            _ => {}
        }
        match run(&self.program, vars.cel())? {
            Value::Int(i) => Ok(i as f64),
            Value::UInt(u) => Ok(u as f64),
            Value::Float(f) if f.is_finite() => Ok(f),
            other => Err(EvalError::NotNumber(format!("{other:?}"))),
        }
    }

    /// The result as a key: strings as they are, numbers and bools in
    /// their canonical text (`1` and `1.0` are the same key).
    pub(crate) fn key(&self, vars: &Vars<'_, '_>) -> Result<String, EvalError> {
        if let Some(native) = self.plan.as_ref().and_then(|p| p.eval(&vars.input)) {
            let key = match native {
                Native::Str(s) => Some(s.to_owned()),
                Native::Int(i) => Some(i.to_string()),
                Native::UInt(u) => Some(u.to_string()),
                Native::Double(f) => float_key(f),
                Native::Bool(b) => Some(b.to_string()),
                Native::Null | Native::Composite(_) => None,
            };
            if let Some(key) = key {
                return Ok(key);
            }
        }
        match run(&self.program, vars.cel())? {
            Value::String(s) => Ok(s.as_str().to_string()),
            Value::Int(i) => Ok(i.to_string()),
            Value::UInt(u) => Ok(u.to_string()),
            Value::Float(f) => {
                float_key(f).ok_or_else(|| EvalError::NotKey(format!("{:?}", Value::Float(f))))
            }
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(EvalError::NotKey(format!("{other:?}"))),
        }
    }
}

/// A finite double as a key: whole numbers as integers (`1.0` is `1`).
fn float_key(f: f64) -> Option<String> {
    if !f.is_finite() {
        None
    } else if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Some((f as i64).to_string())
    } else {
        Some(f.to_string())
    }
}

impl Predicate {
    /// Compiles `source`. Deeply nested input needs a deep stack; callers
    /// run this on a thread that has one.
    pub(crate) fn compile(source: &str) -> Result<Predicate, String> {
        let program = Program::compile(source).map_err(|e| e.to_string())?;
        let needs = needs_of(&program);
        let plan = Plan::compile(program.expression());
        Ok(Predicate {
            program,
            plan,
            needs,
        })
    }

    /// Evaluates against an event's variables.
    pub(crate) fn eval(&self, vars: &Vars<'_, '_>) -> Result<bool, EvalError> {
        if let Some(Native::Bool(b)) = self.plan.as_ref().and_then(|p| p.eval(&vars.input)) {
            return Ok(b);
        }
        match run(&self.program, vars.cel())? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError::NotBool(format!("{other:?}"))),
        }
    }
}

/// The root context every evaluation scope derives from.
pub(crate) fn root() -> Context<'static, 'static> {
    Context::default()
}

/// An event's variables for the rules it meets: read natively where an
/// expression allows, and as a CEL scope built on first need.
pub(crate) struct Vars<'r, 'e> {
    root: &'r Context<'static, 'static>,
    input: native::Input<'e>,
    needs: Needs,
    cel: OnceCell<Context<'r, 'e>>,
}

impl<'r, 'e> Vars<'r, 'e> {
    /// `needs` says which variables the CEL scope must hold, should an
    /// expression need it.
    pub(crate) fn new(
        root: &'r Context<'static, 'static>,
        event: &'e Event,
        profile: Option<&'e serde_json::Map<String, serde_json::Value>>,
        needs: Needs,
    ) -> Vars<'r, 'e> {
        Vars {
            root,
            input: native::Input { event, profile },
            needs,
            cel: OnceCell::new(),
        }
    }

    fn cel(&self) -> &Context<'r, 'e> {
        self.cel.get_or_init(|| {
            let native::Input { event, profile } = self.input;
            scope(self.root, event, profile, self.needs)
        })
    }
}

/// A child scope of `root` holding the variables in `needs`, borrowing
/// from `event` and the customer's `profile` (an empty map when there is
/// none, so `has(profile.x)` is well-defined).
pub(crate) fn scope<'r, 'e>(
    root: &'r Context<'static, 'static>,
    event: &'e Event,
    profile: Option<&'e serde_json::Map<String, serde_json::Value>>,
    needs: Needs,
) -> Context<'r, 'e> {
    // A context is covariant in the lifetime of the data it borrows, so the
    // 'static root can parent a scope that borrows the event.
    let root: &'r Context<'r, 'e> = root;
    let mut scope = root.new_inner_scope();
    if needs.data {
        scope.add_variable_as_val("data", json(&event.data));
    }
    if needs.event {
        scope.add_variable_as_val("event", event_map(event));
    }
    if needs.profile {
        let profile: Box<dyn Val + 'e> = match profile {
            Some(fields) => object(fields),
            None => Box::new(CelMap::default()),
        };
        scope.add_variable_as_val("profile", profile);
    }
    scope
}

/// The event's attributes: `id`, `source`, `type`, `subject` (null when
/// absent) and `time` (RFC 3339, UTC).
pub(crate) fn event_map(event: &Event) -> Box<dyn Val + '_> {
    let mut map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = HashMap::with_capacity(5);
    map.insert("id".into(), Box::new(CelString::from(event.id.as_str())));
    map.insert(
        "source".into(),
        Box::new(CelString::from(event.source.as_str())),
    );
    map.insert(
        "type".into(),
        Box::new(CelString::from(event.kind.as_str())),
    );
    let subject: Box<dyn Val> = match &event.subject {
        Some(s) => Box::new(CelString::from(s.as_str())),
        None => Box::new(CelNull),
    };
    map.insert("subject".into(), subject);
    map.insert(
        "time".into(),
        Box::new(CelString::from(
            crate::clock::rfc3339(event.time_ms).unwrap_or_default(),
        )),
    );
    Box::new(CelMap::from(map))
}

/// JSON → CEL, borrowing strings. Integers that fit `i64` become `int`,
/// larger ones `uint`, others `double`. Depth is bounded by the JSON
/// parser's own recursion limit.
pub(crate) fn json(value: &serde_json::Value) -> Box<dyn Val + '_> {
    use serde_json::Value as J;
    match value {
        J::Null => Box::new(CelNull),
        J::Bool(b) => Box::new(CelBool::from(*b)),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        J::String(s) => Box::new(CelString::from(s.as_str())),
        J::Array(items) => Box::new(CelList::from(items.iter().map(json).collect::<Vec<_>>())),
        J::Object(fields) => object(fields),
    }
}

pub(crate) fn object(fields: &serde_json::Map<String, serde_json::Value>) -> Box<dyn Val + '_> {
    let map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = fields
        .iter()
        .map(|(k, v)| (CelMapKey::from(k.as_str()), json(v)))
        .collect();
    Box::new(CelMap::from(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(data: serde_json::Value) -> Event {
        Event {
            id: "e1".into(),
            source: "test".into(),
            kind: "fan.cheer".into(),
            subject: Some("fan-1".into()),
            time_ms: 1_700_000_000_000,
            data,
        }
    }

    fn eval(src: &str, data: serde_json::Value) -> Result<bool, EvalError> {
        let root = root();
        let p = Predicate::compile(src).unwrap();
        let ev = event(data);
        let vars = Vars::new(&root, &ev, None, p.needs);
        p.eval(&vars)
    }

    #[test]
    fn profile_and_value_expressions() {
        let root = root();
        let ev = event(json!({"amount": 12.5, "zone": 3}));
        let profile = json!({"section": "101", "team": "A"});
        let profile = profile.as_object();
        let p = Predicate::compile("profile.team == 'A'").unwrap();
        assert!(p.needs.profile);
        let sc = Vars::new(
            &root,
            &ev,
            profile,
            Needs {
                data: true,
                event: false,
                profile: true,
            },
        );
        assert!(p.eval(&sc).unwrap());
        assert_eq!(
            Expr::compile("data.amount").unwrap().number(&sc).unwrap(),
            12.5
        );
        assert_eq!(Expr::compile("data.zone").unwrap().key(&sc).unwrap(), "3");
        assert_eq!(
            Expr::compile("profile.section").unwrap().key(&sc).unwrap(),
            "101"
        );
        assert!(matches!(
            Expr::compile("profile.team").unwrap().number(&sc),
            Err(EvalError::NotNumber(_))
        ));
    }

    #[test]
    fn data_comparisons() {
        assert!(eval("data.intensity >= 2", json!({"intensity": 2})).unwrap());
        assert!(!eval("data.intensity >= 2", json!({"intensity": 1})).unwrap());
        assert!(eval("data.intensity >= 2", json!({"intensity": 2.5})).unwrap());
        assert!(eval("data.team == 'home'", json!({"team": "home"})).unwrap());
        assert!(eval("'x' in data.tags", json!({"tags": ["x", "y"]})).unwrap());
        assert!(eval("data.a.b.c == null", json!({"a": {"b": {"c": null}}})).unwrap());
        assert!(eval("has(data.x) || true", json!({})).unwrap());
    }

    #[test]
    fn event_and_profile_variables() {
        assert!(eval(
            "event.type == 'fan.cheer' && event.subject == 'fan-1'",
            json!(null)
        )
        .unwrap());
        assert!(eval("event.time.startsWith('2023-11-14T')", json!(null)).unwrap());
        assert!(eval("size(profile) == 0", json!(null)).unwrap());
    }

    #[test]
    fn errors_are_values() {
        assert!(matches!(
            eval("data.missing >= 2", json!({})),
            Err(EvalError::Execution(_))
        ));
        assert!(matches!(
            eval("data.intensity", json!({"intensity": 3})),
            Err(EvalError::NotBool(_))
        ));
        assert!(matches!(
            eval("data.s >= 2", json!({"s": "three"})),
            Err(EvalError::Execution(_))
        ));
    }

    #[test]
    fn needs_follow_references() {
        let p = Predicate::compile("data.x > 1").unwrap();
        assert_eq!(
            p.needs,
            Needs {
                data: true,
                event: false,
                profile: false
            }
        );
        let p = Predicate::compile("event.id != ''").unwrap();
        assert!(p.needs.event && !p.needs.data);
    }
}
