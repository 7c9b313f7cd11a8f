//! Native evaluation of the plain part of CEL, straight over the event's
//! JSON, for rule expressions that use only that part.
//!
//! Most rule expressions are a field compared with a literal
//! (`data.intensity >= 2`, `data.zone in ['z1', 'z2']`,
//! `profile.team == data.team`) or a field read (`data.amount`). Through
//! the interpreter each needs the event's `data` turned into CEL values
//! (a map and a box per field) before anything is compared, which made
//! predicates a third of the engine's time. A [`Plan`] is compiled from
//! the same syntax tree at load and reads the JSON in place.
//!
//! A plan never changes a result. It decides only where the interpreter's
//! answer is certain from the operand kinds alone and the interpreter
//! would not fail; everything else (a missing field, a type mismatch, a
//! function call, arithmetic) is left undecided and the caller runs the
//! interpreter, which gives the answer and any error exactly as before.
//! The property test at the bottom holds the two to that, expression by
//! expression, over random data.

use std::cmp::Ordering;

use cel::common::ast::operators;
use cel::common::ast::{Expr as Ast, IdedExpr, LiteralValue};
use serde_json::{Map, Value as Json};

use crate::event::Event;

/// A compiled expression over `data`, `profile` and `event`.
#[derive(Debug)]
pub(crate) struct Plan(Node);

#[derive(Debug)]
enum Node {
    Literal(Literal),
    /// `data.a.b`, `profile.x`: fields below a JSON root.
    Path(Root, Box<[String]>),
    /// `event.type` and the other plain attributes.
    Attribute(Attribute),
    /// `has(<root>.<fields>.field)`.
    Has(Root, Box<[String]>, String),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Compare(Comparison, Box<Node>, Box<Node>),
    /// `x in [literal, ...]`.
    InList(Box<Node>, Box<[Literal]>),
    /// `c ? a : b`.
    Choose(Box<Node>, Box<Node>, Box<Node>),
}

#[derive(Debug, Clone, Copy)]
enum Root {
    Data,
    Profile,
}

#[derive(Debug, Clone, Copy)]
enum Attribute {
    Id,
    Source,
    Type,
    Subject,
}

#[derive(Debug, Clone, Copy)]
enum Comparison {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug)]
enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    String(String),
}

/// A value met while evaluating: scalars, or a JSON list or map the plan
/// can only pass along.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(&'a str),
    Composite(&'a Json),
}

/// What an expression reads.
#[derive(Clone, Copy)]
pub(crate) struct Input<'a> {
    pub event: &'a Event,
    /// The customer's profile; none reads as an empty map, as in the
    /// interpreter's scope.
    pub profile: Option<&'a Map<String, Json>>,
}

impl Plan {
    /// The plan of `expr`, or none when it uses anything beyond the plain
    /// part (then the interpreter runs every time).
    pub(crate) fn compile(expr: &IdedExpr) -> Option<Plan> {
        node(expr).map(Plan)
    }

    /// The expression's value, or none where the interpreter must decide.
    pub(crate) fn eval<'a>(&'a self, input: &Input<'a>) -> Option<Val<'a>> {
        eval(&self.0, input)
    }
}

fn node(e: &IdedExpr) -> Option<Node> {
    match &e.expr {
        Ast::Literal(l) => literal(l).map(Node::Literal),
        Ast::Select(select) if select.test => match path(&select.operand)? {
            Node::Path(root, fields) => Some(Node::Has(root, fields, select.field.clone())),
            _ => None,
        },
        Ast::Select(_) => match path(e)? {
            // A bare `profile` or `data` is a map the plan cannot pass on.
            Node::Path(_, fields) if fields.is_empty() => None,
            n => Some(n),
        },
        Ast::Call(call) if call.target.is_none() => {
            let arg = |i: usize| call.args.get(i).and_then(node).map(Box::new);
            match (call.func_name.as_str(), call.args.len()) {
                (operators::LOGICAL_NOT, 1) => Some(Node::Not(arg(0)?)),
                (operators::LOGICAL_AND, 2) => Some(Node::And(arg(0)?, arg(1)?)),
                (operators::LOGICAL_OR, 2) => Some(Node::Or(arg(0)?, arg(1)?)),
                (operators::CONDITIONAL, 3) => Some(Node::Choose(arg(0)?, arg(1)?, arg(2)?)),
                (operators::IN, 2) => {
                    let Ast::List(list) = &call.args.get(1)?.expr else {
                        return None;
                    };
                    if !list.optional_indices.is_empty() {
                        return None;
                    }
                    let items = list
                        .elements
                        .iter()
                        .map(|x| match &x.expr {
                            Ast::Literal(l) => literal(l),
                            _ => None,
                        })
                        .collect::<Option<Box<[Literal]>>>()?;
                    Some(Node::InList(arg(0)?, items))
                }
                (name, 2) => {
                    let op = match name {
                        operators::EQUALS => Comparison::Eq,
                        operators::NOT_EQUALS => Comparison::Ne,
                        operators::LESS => Comparison::Lt,
                        operators::LESS_EQUALS => Comparison::Le,
                        operators::GREATER => Comparison::Gt,
                        operators::GREATER_EQUALS => Comparison::Ge,
                        _ => return None,
                    };
                    Some(Node::Compare(op, arg(0)?, arg(1)?))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// `data.a.b`, `profile.x` or `event.<attribute>`.
fn path(e: &IdedExpr) -> Option<Node> {
    let mut fields = Vec::new();
    let mut at = e;
    let root = loop {
        match &at.expr {
            Ast::Select(select) if !select.test => {
                fields.push(select.field.clone());
                at = &select.operand;
            }
            Ast::Ident(name) => break name.as_str(),
            _ => return None,
        }
    };
    fields.reverse();
    match root {
        "data" => Some(Node::Path(Root::Data, fields.into())),
        "profile" => Some(Node::Path(Root::Profile, fields.into())),
        "event" => match fields.as_slice() {
            // `time` is formatted text; the interpreter formats it.
            [field] => Some(Node::Attribute(match field.as_str() {
                "id" => Attribute::Id,
                "source" => Attribute::Source,
                "type" => Attribute::Type,
                "subject" => Attribute::Subject,
                _ => return None,
            })),
            _ => None,
        },
        _ => None,
    }
}

fn literal(l: &LiteralValue) -> Option<Literal> {
    Some(match l {
        LiteralValue::Null => Literal::Null,
        LiteralValue::Boolean(b) => Literal::Bool(*b.inner()),
        LiteralValue::Int(i) => Literal::Int(*i.inner()),
        LiteralValue::UInt(u) => Literal::UInt(*u.inner()),
        LiteralValue::Double(d) => Literal::Double(*d.inner()),
        LiteralValue::String(s) => Literal::String(s.inner().to_owned()),
        LiteralValue::Bytes(_) => return None,
    })
}

impl Literal {
    fn val(&self) -> Val<'_> {
        match self {
            Literal::Null => Val::Null,
            Literal::Bool(b) => Val::Bool(*b),
            Literal::Int(i) => Val::Int(*i),
            Literal::UInt(u) => Val::UInt(*u),
            Literal::Double(d) => Val::Double(*d),
            Literal::String(s) => Val::Str(s),
        }
    }
}

/// JSON as the interpreter's scope converts it: integers that fit `i64`
/// are `int`, larger ones `uint`, other numbers `double`.
fn json(v: &Json) -> Val<'_> {
    match v {
        Json::Null => Val::Null,
        Json::Bool(b) => Val::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Val::Int(i),
            (None, Some(u)) => Val::UInt(u),
            (None, None) => Val::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Val::Str(s),
        Json::Array(_) | Json::Object(_) => Val::Composite(v),
    }
}

static EMPTY: std::sync::LazyLock<Map<String, Json>> = std::sync::LazyLock::new(Map::new);

fn eval<'a>(n: &'a Node, input: &Input<'a>) -> Option<Val<'a>> {
    match n {
        Node::Literal(l) => Some(l.val()),
        Node::Path(root, fields) => match resolve(input, *root, fields)? {
            Found::Json(v) => Some(json(v)),
            Found::Map(_) => None,
        },
        Node::Attribute(a) => {
            let e = input.event;
            Some(match a {
                Attribute::Id => Val::Str(&e.id),
                Attribute::Source => Val::Str(&e.source),
                Attribute::Type => Val::Str(&e.kind),
                Attribute::Subject => e.subject.as_deref().map_or(Val::Null, Val::Str),
            })
        }
        Node::Has(root, fields, field) => match resolve(input, *root, fields)? {
            Found::Json(Json::Object(m)) | Found::Map(m) => Some(Val::Bool(m.contains_key(field))),
            Found::Json(_) => None,
        },
        Node::Not(x) => match eval(x, input)? {
            Val::Bool(b) => Some(Val::Bool(!b)),
            _ => None,
        },
        // The interpreter forgives an error on the left when the right
        // decides (`error && false` is false); the plan leaves that case
        // to it.
        Node::And(l, r) => match eval(l, input)? {
            Val::Bool(false) => Some(Val::Bool(false)),
            Val::Bool(true) => boolean(eval(r, input)?),
            _ => None,
        },
        Node::Or(l, r) => match eval(l, input)? {
            Val::Bool(true) => Some(Val::Bool(true)),
            Val::Bool(false) => boolean(eval(r, input)?),
            _ => None,
        },
        Node::Choose(c, a, b) => match eval(c, input)? {
            Val::Bool(true) => eval(a, input),
            Val::Bool(false) => eval(b, input),
            _ => None,
        },
        Node::Compare(op, l, r) => {
            let (l, r) = (eval(l, input)?, eval(r, input)?);
            let b = match op {
                Comparison::Eq => equals(l, r)?,
                Comparison::Ne => !equals(l, r)?,
                Comparison::Lt => order(l, r)? == Ordering::Less,
                Comparison::Le => order(l, r)? != Ordering::Greater,
                Comparison::Gt => order(l, r)? == Ordering::Greater,
                Comparison::Ge => order(l, r)? != Ordering::Less,
            };
            Some(Val::Bool(b))
        }
        Node::InList(x, items) => {
            let x = eval(x, input)?;
            let mut found = false;
            for item in items.iter() {
                found |= equals(x, item.val())?;
            }
            Some(Val::Bool(found))
        }
    }
}

/// What a path leads to.
enum Found<'a> {
    Json(&'a Json),
    /// A root itself (`profile` with no fields).
    Map(&'a Map<String, Json>),
}

/// Follows `fields` from `root`; none where the interpreter would fail
/// (a missing key, a field of something not a map).
fn resolve<'a>(input: &Input<'a>, root: Root, fields: &[String]) -> Option<Found<'a>> {
    let mut at = match root {
        Root::Data => Found::Json(&input.event.data),
        Root::Profile => Found::Map(input.profile.unwrap_or(&*EMPTY)),
    };
    for f in fields {
        let map = match at {
            Found::Json(v) => v.as_object()?,
            Found::Map(m) => m,
        };
        at = Found::Json(map.get(f)?);
    }
    Some(at)
}

fn boolean(v: Val<'_>) -> Option<Val<'_>> {
    matches!(v, Val::Bool(_)).then_some(v)
}

/// CEL equality of scalars: numbers across kinds by value, other kinds
/// only with their own kind, and never equal across kinds (no error).
/// Lists and maps are left to the interpreter.
fn equals(l: Val<'_>, r: Val<'_>) -> Option<bool> {
    Some(match (l, r) {
        (Val::Composite(_), _) | (_, Val::Composite(_)) => return None,
        (Val::Null, Val::Null) => true,
        (Val::Bool(a), Val::Bool(b)) => a == b,
        (Val::Str(a), Val::Str(b)) => a == b,
        _ => match numeric_order(l, r) {
            Some(o) => o == Some(Ordering::Equal),
            None => false,
        },
    })
}

/// CEL ordering; none where the interpreter fails (kinds that do not
/// compare, NaN).
fn order(l: Val<'_>, r: Val<'_>) -> Option<Ordering> {
    match (l, r) {
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(&b)),
        (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
        _ => numeric_order(l, r)?,
    }
}

/// For two numbers, their order (none for NaN); none when either is not
/// a number.
fn numeric_order(l: Val<'_>, r: Val<'_>) -> Option<Option<Ordering>> {
    Some(match (l, r) {
        (Val::Int(a), Val::Int(b)) => Some(a.cmp(&b)),
        (Val::UInt(a), Val::UInt(b)) => Some(a.cmp(&b)),
        (Val::Int(a), Val::UInt(b)) => Some(u64::try_from(a).map_or(Ordering::Less, |a| a.cmp(&b))),
        (Val::UInt(a), Val::Int(b)) => {
            Some(i64::try_from(a).map_or(Ordering::Greater, |a| a.cmp(&b)))
        }
        (Val::Double(a), Val::Double(b)) => a.partial_cmp(&b),
        (Val::Int(a), Val::Double(b)) => (a as f64).partial_cmp(&b),
        (Val::UInt(a), Val::Double(b)) => (a as f64).partial_cmp(&b),
        (Val::Double(a), Val::Int(b)) => a.partial_cmp(&(b as f64)),
        (Val::Double(a), Val::UInt(b)) => a.partial_cmp(&(b as f64)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::predicate::{root, run, scope, Needs};
    use cel::{Program, Value};
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng};
    use serde_json::json;

    /// A seeded generator: the same cases in every run.
    struct Rng(StdRng);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0.random_range(0..n)
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    const OPERANDS: [&str; 30] = [
        "data.i",
        "data.f",
        "data.s",
        "data.b",
        "data.n",
        "data.u",
        "data.obj.x",
        "data.obj",
        "data.list",
        "data.missing",
        "profile.team",
        "profile.level",
        "profile.missing",
        "event.type",
        "event.subject",
        "event.source",
        "0",
        "2",
        "-3",
        "7u",
        "18446744073709551615u",
        "2.0",
        "2.5",
        "-0.5",
        "'a'",
        "'b'",
        "''",
        "true",
        "false",
        "null",
    ];
    const COMPARISONS: [&str; 6] = ["==", "!=", "<", "<=", ">", ">="];

    /// A random expression of the plain part, with mistakes in it (wrong
    /// kinds, missing fields) for the plan to leave to the interpreter.
    fn expr(rng: &mut Rng, depth: usize) -> String {
        let leaf = depth == 0 || rng.below(3) == 0;
        match if leaf { rng.below(3) } else { 3 + rng.below(6) } {
            0 => rng.pick(&OPERANDS).to_owned(),
            1 => format!(
                "{} {} {}",
                rng.pick(&OPERANDS),
                rng.pick(&COMPARISONS),
                rng.pick(&OPERANDS)
            ),
            2 => {
                let field = rng.pick(&["i", "s", "missing", "x", "team"]);
                format!(
                    "has({}.{field})",
                    rng.pick(&["data", "profile", "data.obj", "data.s"])
                )
            }
            3 => format!("!({})", expr(rng, depth - 1)),
            4 => format!("({}) && ({})", expr(rng, depth - 1), expr(rng, depth - 1)),
            5 => format!("({}) || ({})", expr(rng, depth - 1), expr(rng, depth - 1)),
            6 => format!(
                "({}) ? ({}) : ({})",
                expr(rng, depth - 1),
                expr(rng, depth - 1),
                expr(rng, depth - 1)
            ),
            7 => format!(
                "{} in [{}, {}]",
                rng.pick(&OPERANDS[..16]),
                rng.pick(&OPERANDS[16..]),
                rng.pick(&OPERANDS[16..])
            ),
            _ => format!(
                "{} {} {}",
                expr(rng, depth - 1),
                rng.pick(&COMPARISONS),
                rng.pick(&OPERANDS)
            ),
        }
    }

    /// Random data: each field absent or of a random kind.
    fn data(rng: &mut Rng) -> Json {
        let kinds = [
            json!(2),
            json!(-3),
            json!(2.0),
            json!(2.5),
            json!(u64::MAX),
            json!("a"),
            json!("b"),
            json!(true),
            json!(null),
            json!({"x": 1}),
            json!(["a", 2]),
        ];
        let mut m = Map::new();
        for k in ["i", "f", "s", "b", "n", "u", "obj", "list"] {
            if rng.below(5) > 0 {
                m.insert(k.into(), kinds[rng.below(kinds.len())].clone());
            }
        }
        if rng.below(10) == 0 {
            return Json::Array(Vec::new());
        }
        Json::Object(m)
    }

    fn same(native: Val<'_>, interpreted: &Value) -> bool {
        match (native, interpreted) {
            (Val::Null, Value::Null) => true,
            (Val::Bool(a), Value::Bool(b)) => a == *b,
            (Val::Int(a), Value::Int(b)) => a == *b,
            (Val::UInt(a), Value::UInt(b)) => a == *b,
            (Val::Double(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Val::Str(a), Value::String(b)) => a == b.as_str(),
            (Val::Composite(Json::Array(_)), Value::List(_)) => true,
            (Val::Composite(Json::Object(_)), Value::Map(_)) => true,
            _ => false,
        }
    }

    #[test]
    fn plans_agree_with_the_interpreter() {
        let root = root();
        let mut rng = Rng(StdRng::seed_from_u64(0x5EED_CAFE_F00D_1234));
        let needs = Needs {
            data: true,
            event: true,
            profile: true,
        };
        let (mut cases, mut planned, mut decided) = (0, 0, 0);
        for _ in 0..8_000 {
            let source = expr(&mut rng, 3);
            let Ok(program) = Program::compile(&source) else {
                continue;
            };
            cases += 1;
            let Some(plan) = Plan::compile(program.expression()) else {
                continue;
            };
            planned += 1;
            let event = Event {
                id: "e1".into(),
                source: "app/ios".into(),
                kind: rng.pick(&["a", "fan.cheer"]).into(),
                subject: (rng.below(4) > 0).then(|| "fan-1".into()),
                time_ms: 1_700_000_000_000,
                data: data(&mut rng),
            };
            let profile = json!({"team": rng.pick(&["a", "b"]), "level": rng.below(4)});
            let profile = profile.as_object().filter(|_| rng.below(4) > 0);
            let input = Input {
                event: &event,
                profile,
            };
            let Some(native) = plan.eval(&input) else {
                continue;
            };
            decided += 1;
            let interpreted = run(&program, &scope(&root, &event, profile, needs));
            assert!(
                interpreted.as_ref().is_ok_and(|v| same(native, v)),
                "`{source}` over {} with profile {profile:?}: plan {native:?}, interpreter {interpreted:?}",
                event.data
            );
        }
        // The generator must reach both sides, or the test tests nothing.
        assert!(planned * 10 > cases * 9, "{planned} of {cases} planned");
        assert!(decided * 3 > planned, "{decided} of {planned} decided");
        assert!(
            decided < planned,
            "the plan left nothing to the interpreter"
        );
    }

    #[test]
    fn what_is_not_planned() {
        for source in [
            "data.a + 1 > 2",
            "size(data.tags) > 0",
            "event.time > '2024'",
            "data.s.startsWith('a')",
            "data.tags.exists(t, t == 'x')",
            "profile",
            "progress.x > 1",
            "data.x in data.list",
        ] {
            let program = Program::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            assert!(Plan::compile(program.expression()).is_none(), "{source}");
        }
    }
}
