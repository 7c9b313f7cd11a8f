//! Next-best-action configuration: `[[offer]]` tables in rule files and
//! the site's `[nba]` policy, from TOML to validated [`Offer`]s and
//! [`NbaPolicy`].
//!
//! Offers are read with the same table reader as achievements, so an
//! operator gets every problem of a file at once, each naming file, line
//! and field. Checks that span keys (an escalation's fields must be numbers
//! in the payload, its caps must not be below their starting values) are
//! made here rather than at run time, where a bad offer would only show up
//! as a silent non-offer in the middle of a match.
//!
//! A rule file holds either achievements or offers: [`crate::load_rules`]
//! hands a file whose top level has `offer` to this reader and every other
//! file to the achievement reader, which knows no `offer` key.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use crate::cel_check::{self, CelProblem};
use crate::diagnostic::{ConfigErrors, Diags, Invalid, Source};
use crate::model::{
    Amount, BetaPrior, Channel, Contact, Conversion, Escalate, NbaPolicy, Offer, OnExpiry,
    PayloadValue, Rate,
};
use crate::paths;
use crate::reader::{
    self, check_id, Dur, Id, Kind, Node, NonEmpty, Number, PositiveDur, Setting, StrList, Table,
};
use crate::units;

/// The default of every optional offer and `[nba]` setting; the model's
/// doc comments state the same values.
pub mod defaults {
    use std::time::Duration;

    use crate::model::{BetaPrior, Channel, OnExpiry, Rate};

    /// `[[offer]] version`.
    pub const OFFER_VERSION: u32 = 1;
    /// `[[offer]] channel`.
    pub const CHANNEL: Channel = Channel::App;
    /// `[[offer]] contact.cooldown`.
    pub const COOLDOWN: Duration = Duration::ZERO;
    /// `[[offer]] conversion.window`.
    pub const CONVERSION_WINDOW: Duration = Duration::from_secs(24 * 3600);

    /// `nba.max_per_customer`: three offers per hour.
    pub const MAX_PER_CUSTOMER: Rate = Rate {
        count: 3,
        per: Duration::from_secs(3600),
    };
    /// `nba.quiet_after_accept`.
    pub const QUIET_AFTER_ACCEPT: Duration = Duration::from_secs(10 * 60);
    /// `nba.top_k`.
    pub const TOP_K: u32 = 1;
    /// Largest `nba.top_k`: more offers per moment than this is spam.
    pub const TOP_K_MAX: u32 = 16;
    /// `nba.control_share`.
    pub const CONTROL_SHARE: f64 = 0.05;
    /// `nba.on_expiry`.
    pub const ON_EXPIRY: OnExpiry = OnExpiry::Ignore;
    /// `nba.prior`: uniform.
    pub const PRIOR: BetaPrior = BetaPrior {
        alpha: 1.0,
        beta: 1.0,
    };
    /// `nba.exploration`.
    pub const EXPLORATION: f64 = 0.05;
    /// The learner segment when no `segment` expression is configured.
    pub const SEGMENT: &str = "all";
}

impl Default for NbaPolicy {
    fn default() -> NbaPolicy {
        NbaPolicy {
            max_per_customer: defaults::MAX_PER_CUSTOMER,
            quiet_after_accept: defaults::QUIET_AFTER_ACCEPT,
            top_k: defaults::TOP_K,
            control_share: defaults::CONTROL_SHARE,
            control_salt: None,
            on_expiry: defaults::ON_EXPIRY,
            prior: defaults::PRIOR,
            exploration: defaults::EXPLORATION,
            segment: None,
        }
    }
}

/// Payload nesting beyond this is refused: no app needs it, and the
/// reader recurses per level.
const PAYLOAD_MAX_DEPTH: usize = 32;

/// Validates offer file `text` that was read from `path`.
pub fn parse_offers(text: &str, path: &Path) -> Result<Vec<Offer>, ConfigErrors> {
    Ok(parse_offers_located(text, path)?
        .into_iter()
        .map(|o| o.offer)
        .collect())
}

/// A parsed offer and where its id is, for checks across files.
pub(crate) struct LocatedOffer {
    pub offer: Offer,
    pub index: usize,
    pub id_line: usize,
    pub id_column: usize,
}

pub(crate) fn parse_offers_located(
    text: &str,
    path: &Path,
) -> Result<Vec<LocatedOffer>, ConfigErrors> {
    let src = Source::new(path, text);
    let mut d = Diags::new(&src);
    let result = reader::parse(&mut d).and_then(|doc| read_file(&mut d, &doc, path));
    d.conclude(result)
}

/// A CEL expression to compile, with its place; collected from every
/// offer, valid or not, so a broken expression is reported together with
/// the offer's other problems.
struct Expression {
    span: Range<usize>,
    field: String,
    text: String,
}

/// An offer read from the file, with what the file-level checks need.
struct Read {
    offer: Offer,
    index: usize,
    id_span: Range<usize>,
    id_field: String,
}

fn read_file(
    d: &mut Diags<'_, '_>,
    doc: &toml::Spanned<toml::de::DeTable<'_>>,
    path: &Path,
) -> Result<Vec<LocatedOffer>, Invalid> {
    let file = paths::absolute(path);
    let mut root = Table::root(doc);
    let tables = root.tables(d, "offer");
    root.finish(d);
    let Some(tables) = tables? else {
        return Ok(Vec::new());
    };

    let mut read: Vec<Read> = Vec::new();
    let mut expressions = Vec::new();
    let mut ok = true;
    for (index, t) in tables.value.into_iter().enumerate() {
        match read_offer(d, t, &file, index, &mut expressions) {
            Ok(r) => read.push(r),
            Err(Invalid) => ok = false,
        }
    }
    ok &= d.unique_ids(
        "offer",
        read.iter().map(|r| {
            let id = r.offer.id.as_str();
            (id, r.offer.line, r.id_span.clone(), r.id_field.as_str())
        }),
    );
    ok &= check_expressions(d, expressions);
    if !ok {
        return Err(Invalid);
    }
    let src = d.source();
    Ok(read
        .into_iter()
        .map(|r| {
            let (id_line, id_column) = src.position(r.id_span.start);
            LocatedOffer {
                offer: r.offer,
                index: r.index,
                id_line,
                id_column,
            }
        })
        .collect())
}

fn read_offer(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    file: &Path,
    index: usize,
    expressions: &mut Vec<Expression>,
) -> Result<Read, Invalid> {
    let id = t.req::<Id>(d, "id");
    let version = t.or::<u32>(d, "version", defaults::OFFER_VERSION);
    let on = t.req::<StrList>(d, "on");
    let audience = t.opt::<String>(d, "audience");
    let consent = t.req::<Id>(d, "consent");
    let value = t.req::<Number>(d, "value");
    let weight = t.opt::<String>(d, "weight");
    let channel = t.choice(
        d,
        "channel",
        "channel",
        &[("app", Channel::App)],
        Some(defaults::CHANNEL),
    );
    let expires_after = t.req::<PositiveDur>(d, "expires_after");
    let payload = read_payload(d, &mut t);
    let escalate = t.table(d, "escalate");
    let contact = t.table(d, "contact");
    let conversion = t.table(d, "conversion");
    let reward = read_points_table(d, &mut t, "reward");
    let referral = read_points_table(d, &mut t, "referral");
    let segment = t.opt::<String>(d, "segment");
    t.finish(d);

    let mut ok = true;
    if let Ok(version) = &version {
        if version.value == 0 {
            d.error(
                t.span_of(version),
                &t.field("version"),
                "must be at least 1",
            );
            ok = false;
        }
    }
    if let Ok(on) = &on {
        ok &= check_event_types(d, &t.field("on"), t.span_of(on), &on.value);
    }
    if let Ok(value) = &value {
        if value.value <= 0.0 {
            d.error(
                t.span_of(value),
                &t.field("value"),
                format!(
                    "must be greater than 0 (it multiplies the score); got {}",
                    value.value
                ),
            );
            ok = false;
        }
    }
    for (key, setting) in [
        ("audience", &audience),
        ("weight", &weight),
        ("segment", &segment),
    ] {
        if let Ok(Some(expression)) = setting {
            ok &= collect_expression(d, &t, key, expression, expressions);
        }
    }
    let escalate = match escalate {
        Ok(Some(e)) => read_escalate(d, e, payload.as_ref().ok(), expressions).map(Some),
        Ok(None) => Ok(None),
        Err(Invalid) => Err(Invalid),
    };
    let contact = match contact {
        Ok(Some(c)) => read_contact(d, c),
        Ok(None) => Ok(Contact::default()),
        Err(Invalid) => Err(Invalid),
    };
    let conversion = match conversion {
        Ok(Some(c)) => read_conversion(d, c, expressions).map(Some),
        Ok(None) => Ok(None),
        Err(Invalid) => Err(Invalid),
    };

    let line = d.source().position(t.span().start).0;
    let id = id?;
    let id_span = t.span_of(&id);
    let offer = Offer {
        id: id.value,
        version: version?.value,
        on: on?.value.into_iter().map(|s| s.value).collect(),
        audience: audience?.map(|s| s.value),
        consent: consent?.value,
        value: value?.value,
        weight: weight?.map(|s| s.value),
        channel: channel?.value,
        expires_after: expires_after?.value,
        payload: payload?,
        escalate: escalate?,
        contact: contact?,
        conversion: conversion?,
        reward: reward?,
        referral: referral?,
        segment: segment?.map(|s| s.value),
        file: file.to_path_buf(),
        line,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(Read {
        offer,
        index,
        id_span,
        id_field: t.field("id"),
    })
}

/// Queues a CEL expression for compilation; an empty one is an error
/// right away (leave the key out instead).
fn collect_expression(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    key: &str,
    expression: &Setting<String>,
    expressions: &mut Vec<Expression>,
) -> bool {
    if expression.value.trim().is_empty() {
        d.error(
            t.span_of(expression),
            &t.field(key),
            format!("must not be empty; leave `{key}` out instead"),
        );
        return false;
    }
    expressions.push(Expression {
        span: t.span_of(expression),
        field: t.field(key),
        text: expression.value.clone(),
    });
    true
}

/// Event types: at least one, each non-empty, without whitespace and
/// listed once.
fn check_event_types(
    d: &mut Diags<'_, '_>,
    field: &str,
    span: Range<usize>,
    types: &[Setting<String>],
) -> bool {
    if types.is_empty() {
        d.error(
            span,
            field,
            "at least one event type is needed, e.g. [\"match.chance_missed\"]",
        );
        return false;
    }
    let mut ok = true;
    for (i, ty) in types.iter().enumerate() {
        let problem = if ty.value.is_empty() {
            Some("event type must not be empty".to_owned())
        } else if ty.value.chars().any(char::is_whitespace) {
            Some(format!("event type `{}` contains whitespace", ty.value))
        } else if types[..i].iter().any(|prev| prev.value == ty.value) {
            Some(format!("event type `{}` is listed twice", ty.value))
        } else {
            None
        };
        if let Some(problem) = problem {
            let at = ty.span.clone().unwrap_or_else(|| span.clone());
            d.error(at, &format!("{field}[{i}]"), problem);
            ok = false;
        }
    }
    ok
}

/// `payload`: any table, kept as written for the app.
fn read_payload(
    d: &mut Diags<'_, '_>,
    t: &mut Table<'_, '_>,
) -> Result<BTreeMap<String, PayloadValue>, Invalid> {
    match t.table(d, "payload")? {
        Some(table) => read_payload_table(d, table, 1),
        None => Ok(BTreeMap::new()),
    }
}

fn read_payload_table(
    d: &mut Diags<'_, '_>,
    mut table: Table<'_, '_>,
    depth: usize,
) -> Result<BTreeMap<String, PayloadValue>, Invalid> {
    let mut out = BTreeMap::new();
    let mut ok = true;
    let entries: Vec<_> = table.entries().collect();
    for (key, node) in entries {
        let name: &str = key.get_ref();
        match read_payload_value(d, &table.field(name), node, depth) {
            Ok(value) => {
                out.insert(name.to_owned(), value);
            }
            Err(Invalid) => ok = false,
        }
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(out)
}

fn read_payload_value(
    d: &mut Diags<'_, '_>,
    field: &str,
    node: &Node<'_>,
    depth: usize,
) -> Result<PayloadValue, Invalid> {
    use toml::de::DeValue;
    if depth > PAYLOAD_MAX_DEPTH {
        return Err(d.error(
            node.span(),
            field,
            format!("payload is nested more than {PAYLOAD_MAX_DEPTH} levels deep"),
        ));
    }
    match node.get_ref() {
        DeValue::String(_) => String::read(d, field, node).map(PayloadValue::String),
        DeValue::Integer(_) => i64::read(d, field, node).map(PayloadValue::Integer),
        DeValue::Float(_) => Number::read(d, field, node).map(PayloadValue::Float),
        DeValue::Boolean(b) => Ok(PayloadValue::Boolean(*b)),
        DeValue::Datetime(_) => Err(d.error(
            node.span(),
            field,
            "dates are not supported in a payload; write the date as a string",
        )),
        DeValue::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match read_payload_value(d, &format!("{field}[{i}]"), item, depth + 1) {
                    Ok(v) => out.push(v),
                    Err(Invalid) => ok = false,
                }
            }
            if !ok {
                return Err(Invalid);
            }
            Ok(PayloadValue::Array(out))
        }
        DeValue::Table(_) => {
            let table = Table::of(d, field.to_owned(), node)?;
            read_payload_table(d, table, depth + 1).map(PayloadValue::Table)
        }
    }
}

/// `escalate = { on, when, add, max }`, checked against the payload the
/// offer starts with.
fn read_escalate(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    payload: Option<&BTreeMap<String, PayloadValue>>,
    expressions: &mut Vec<Expression>,
) -> Result<Escalate, Invalid> {
    let on = t.req::<StrList>(d, "on");
    let when = t.opt::<String>(d, "when");
    let add = t.table(d, "add").and_then(|a| match a {
        Some(a) => read_amounts(d, a).map(Some),
        None => Ok(None),
    });
    let max = t.table(d, "max").and_then(|m| match m {
        Some(m) => read_amounts(d, m).map(Some),
        None => Ok(None),
    });
    t.finish(d);

    let mut ok = true;
    if let Ok(on) = &on {
        ok &= check_event_types(d, &t.field("on"), t.span_of(on), &on.value);
    }
    if let Ok(Some(when)) = &when {
        ok &= collect_expression(d, &t, "when", when, expressions);
    }
    let add = match add {
        Ok(Some(add)) => add,
        Ok(None) => {
            return Err(t.missing(d, "add"));
        }
        Err(Invalid) => return Err(Invalid),
    };
    if add.is_empty() {
        d.error(
            t.span(),
            &t.field("add"),
            "at least one field is needed, e.g. add = { discount = 5 }",
        );
        ok = false;
    }
    for (name, (amount, span)) in &add {
        let field = format!("{}.{name}", t.field("add"));
        if amount.as_f64() <= 0.0 {
            d.error(
                span.clone(),
                &field,
                format!("must be greater than 0; got {}", amount.as_f64()),
            );
            ok = false;
        }
        if let Some(payload) = payload {
            match payload.get(name) {
                Some(PayloadValue::Integer(_) | PayloadValue::Float(_)) => {}
                Some(_) => {
                    d.error(
                        span.clone(),
                        &field,
                        format!("payload.{name} is not a number, so it cannot be raised"),
                    );
                    ok = false;
                }
                None => {
                    d.error(
                        span.clone(),
                        &field,
                        format!("payload has no field `{name}` to raise; add it to `payload`"),
                    );
                    ok = false;
                }
            }
        }
    }
    let max = match max {
        Ok(Some(max)) => max,
        Ok(None) => return Err(t.missing(d, "max")),
        Err(Invalid) => return Err(Invalid),
    };
    for name in add.keys() {
        if !max.contains_key(name) {
            d.error(
                t.span(),
                &format!("{}.{name}", t.field("max")),
                format!("every raised field needs a cap; add `{name} = ...` to `max`"),
            );
            ok = false;
        }
    }
    for (name, (cap, span)) in &max {
        let field = format!("{}.{name}", t.field("max"));
        if !add.contains_key(name) {
            d.error(
                span.clone(),
                &field,
                format!("`{name}` is not raised by `add`, so it needs no cap"),
            );
            ok = false;
            continue;
        }
        let start = payload.and_then(|p| match p.get(name) {
            Some(PayloadValue::Integer(i)) => Some(*i as f64),
            Some(PayloadValue::Float(f)) => Some(*f),
            _ => None,
        });
        if let Some(start) = start {
            if cap.as_f64() < start {
                d.error(
                    span.clone(),
                    &field,
                    format!(
                        "the cap {} is below the payload's starting value {start}",
                        cap.as_f64()
                    ),
                );
                ok = false;
            }
        }
    }

    let escalate = Escalate {
        on: on?.value.into_iter().map(|s| s.value).collect(),
        when: when?.map(|w| w.value),
        add: add.into_iter().map(|(k, (a, _))| (k, a)).collect(),
        max: max.into_iter().map(|(k, (a, _))| (k, a)).collect(),
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(escalate)
}

/// A table of field → number, keeping integers as integers.
fn read_amounts(
    d: &mut Diags<'_, '_>,
    mut table: Table<'_, '_>,
) -> Result<BTreeMap<String, (Amount, Range<usize>)>, Invalid> {
    use toml::de::DeValue;
    let mut out = BTreeMap::new();
    let mut ok = true;
    let entries: Vec<_> = table.entries().collect();
    for (key, node) in entries {
        let name: &str = key.get_ref();
        let field = table.field(name);
        let amount = match node.get_ref() {
            DeValue::Integer(_) => i64::read(d, &field, node).map(Amount::Integer),
            _ => Number::read(d, &field, node).map(Amount::Float),
        };
        match amount {
            Ok(amount) => {
                out.insert(name.to_owned(), (amount, node.span()));
            }
            Err(Invalid) => ok = false,
        }
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(out)
}

/// `contact = { max, cooldown, stop_after_ignores }`
fn read_contact(d: &mut Diags<'_, '_>, mut t: Table<'_, '_>) -> Result<Contact, Invalid> {
    let max = t.opt::<RateKind>(d, "max");
    let cooldown = t.or::<Dur>(d, "cooldown", defaults::COOLDOWN);
    let stop = t.opt::<u32>(d, "stop_after_ignores");
    t.finish(d);
    if let Ok(Some(stop)) = &stop {
        if stop.value == 0 {
            return Err(d.error(
                t.span_of(stop),
                &t.field("stop_after_ignores"),
                "must be at least 1; leave it out to never stop",
            ));
        }
    }
    Ok(Contact {
        max: max?.map(|m| m.value),
        cooldown: cooldown?.value,
        stop_after_ignores: stop?.map(|s| s.value),
    })
}

/// `conversion = { on, when, window }`
fn read_conversion(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    expressions: &mut Vec<Expression>,
) -> Result<Conversion, Invalid> {
    let on = t.req::<StrList>(d, "on");
    let when = t.opt::<String>(d, "when");
    let window = t.or::<PositiveDur>(d, "window", defaults::CONVERSION_WINDOW);
    t.finish(d);
    let mut ok = true;
    if let Ok(on) = &on {
        ok &= check_event_types(d, &t.field("on"), t.span_of(on), &on.value);
    }
    if let Ok(Some(when)) = &when {
        ok &= collect_expression(d, &t, "when", when, expressions);
    }
    let conversion = Conversion {
        on: on?.value.into_iter().map(|s| s.value).collect(),
        when: when?.map(|w| w.value),
        window: window?.value,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(conversion)
}

/// `key = { points = { category = amount } }`; categories are ids.
fn read_points_table(
    d: &mut Diags<'_, '_>,
    t: &mut Table<'_, '_>,
    key: &'static str,
) -> Result<BTreeMap<String, i64>, Invalid> {
    let mut points = BTreeMap::new();
    let Some(mut outer) = t.table(d, key)? else {
        return Ok(points);
    };
    let table = outer.table(d, "points");
    outer.finish(d);
    let Some(mut table) = table? else {
        return Err(outer.missing(d, "points"));
    };
    let mut ok = true;
    let entries: Vec<_> = table.entries().collect();
    for (name, node) in entries {
        let category: &str = name.get_ref();
        let field = table.field(category);
        if let Err(e) = check_id(category) {
            d.error(name.span(), &field, format!("point category {e}"));
            ok = false;
            continue;
        }
        match i64::read(d, &field, node) {
            Ok(amount) => {
                points.insert(category.to_owned(), amount);
            }
            Err(Invalid) => ok = false,
        }
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(points)
}

/// `"<n>/<window>"`, e.g. `"1/10m"`; achievement limits use it too.
pub(crate) struct RateKind;

impl Kind for RateKind {
    type Out = Rate;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<Rate, Invalid> {
        let s = String::read(d, field, node)?;
        parse_rate(&s).map_err(|e| d.error(node.span(), field, e))
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    let Some((count, per)) = s.split_once('/') else {
        return Err(format!(
            "`{s}` is not a rate; write \"<count>/<window>\", e.g. \"1/10m\""
        ));
    };
    let count = match count.trim().parse::<u32>() {
        Ok(0) => return Err(format!("`{s}`: the count must be at least 1")),
        Ok(n) => n,
        Err(_) => return Err(format!("`{s}`: `{}` is not a whole number", count.trim())),
    };
    let per = units::parse_duration(per.trim()).map_err(|e| format!("`{s}`: {e}"))?;
    if per.is_zero() {
        return Err(format!("`{s}`: the window must be greater than zero"));
    }
    Ok(Rate { count, per })
}

/// Compiles every collected expression on one compile thread; false when
/// any failed.
fn check_expressions(d: &mut Diags<'_, '_>, expressions: Vec<Expression>) -> bool {
    let results = cel_check::check_all(expressions.iter().map(|e| e.text.clone()).collect());
    let mut ok = true;
    for (e, result) in expressions.iter().zip(results) {
        if let Err(problem) = result {
            report_cel(d, e, problem);
            ok = false;
        }
    }
    ok
}

/// Puts a CEL problem on its own column when the expression is one line
/// written without escapes (the usual case), else on the value with the
/// position inside the expression spelled out.
fn report_cel(d: &mut Diags<'_, '_>, e: &Expression, problem: CelProblem) {
    let Some((line, column)) = problem.position else {
        d.error(e.span.clone(), &e.field, problem.message);
        return;
    };
    let raw = d.source().text().get(e.span.clone()).unwrap_or("");
    let verbatim = ['"', '\''].into_iter().any(|q| {
        raw.len() >= 2
            && raw.starts_with(q)
            && raw.ends_with(q)
            && raw.get(1..raw.len() - 1) == Some(e.text.as_str())
    });
    let within = e
        .text
        .char_indices()
        .nth(column - 1)
        .map(|(i, _)| i)
        .or_else(|| (e.text.chars().count() == column - 1).then_some(e.text.len()));
    match within {
        Some(within) if verbatim && line == 1 && !e.text.contains('\n') => {
            d.error_at_offset(e.span.start + 1 + within, &e.field, problem.message);
        }
        _ => {
            d.error(
                e.span.clone(),
                &e.field,
                format!(
                    "{} (at line {line}, column {column} of the expression)",
                    problem.message
                ),
            );
        }
    }
}

/// `[nba]` in the site config.
pub(crate) fn read_nba(d: &mut Diags<'_, '_>, mut t: Table<'_, '_>) -> Result<NbaPolicy, Invalid> {
    let max_per_customer = t.or::<RateKind>(d, "max_per_customer", defaults::MAX_PER_CUSTOMER);
    let quiet_after_accept = t.or::<Dur>(d, "quiet_after_accept", defaults::QUIET_AFTER_ACCEPT);
    let top_k = t.or::<u32>(d, "top_k", defaults::TOP_K);
    let control_share = t.or::<Number>(d, "control_share", defaults::CONTROL_SHARE);
    let control_salt = t.opt::<NonEmpty>(d, "control_salt");
    let on_expiry = t.choice(
        d,
        "on_expiry",
        "on_expiry policy",
        &[("ignore", OnExpiry::Ignore), ("neutral", OnExpiry::Neutral)],
        Some(defaults::ON_EXPIRY),
    );
    let prior = t
        .table(d, "prior")
        .and_then(|p| p.map(|p| read_prior(d, p)).transpose());
    let exploration = t.or::<Number>(d, "exploration", defaults::EXPLORATION);
    let segment = t.opt::<String>(d, "segment");
    t.finish(d);

    let mut ok = true;
    if let Ok(k) = &top_k {
        if k.value == 0 || k.value > defaults::TOP_K_MAX {
            d.error(
                t.span_of(k),
                &t.field("top_k"),
                format!("must be from 1 to {}; got {}", defaults::TOP_K_MAX, k.value),
            );
            ok = false;
        }
    }
    for (key, setting) in [
        ("control_share", &control_share),
        ("exploration", &exploration),
    ] {
        if let Ok(share) = setting {
            if !(0.0..1.0).contains(&share.value) {
                d.error(
                    t.span_of(share),
                    &t.field(key),
                    format!(
                        "must be a share from 0 up to, not including, 1 (0.05 is 5 %); got {}",
                        share.value
                    ),
                );
                ok = false;
            }
        }
    }
    if let Ok(Some(segment)) = &segment {
        let mut expressions = Vec::new();
        ok &= collect_expression(d, &t, "segment", segment, &mut expressions)
            && check_expressions(d, expressions);
    }

    let policy = NbaPolicy {
        max_per_customer: max_per_customer?.value,
        quiet_after_accept: quiet_after_accept?.value,
        top_k: top_k?.value,
        control_share: control_share?.value,
        control_salt: control_salt?.map(|s| s.value),
        on_expiry: on_expiry?.value,
        prior: prior?.unwrap_or(defaults::PRIOR),
        exploration: exploration?.value,
        segment: segment?.map(|s| s.value),
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(policy)
}

/// `prior = { alpha, beta }`
fn read_prior(d: &mut Diags<'_, '_>, mut t: Table<'_, '_>) -> Result<BetaPrior, Invalid> {
    let alpha = t.or::<Number>(d, "alpha", defaults::PRIOR.alpha);
    let beta = t.or::<Number>(d, "beta", defaults::PRIOR.beta);
    t.finish(d);
    let mut ok = true;
    for (key, setting) in [("alpha", &alpha), ("beta", &beta)] {
        if let Ok(v) = setting {
            if v.value <= 0.0 {
                d.error(
                    t.span_of(v),
                    &t.field(key),
                    format!("must be greater than 0; got {}", v.value),
                );
                ok = false;
            }
        }
    }
    let prior = BetaPrior {
        alpha: alpha?.value,
        beta: beta?.value,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(prior)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::diagnostic::Diagnostic;

    const PATH: &str = "/srv/rules/offers.toml";

    /// The offer from the issue, verbatim.
    const JERSEY: &str = r#"[[offer]]
id = "team-a-jersey"
version = 1
on = ["match.chance_missed"]          # trigger event types
audience = "profile.team == data.team" # CEL: profile, progress, trigger event
consent = "marketing"                  # required consent purpose
value = 25.0                           # business value of an accept
weight = "data.minute > 80 ? 1.5 : 1.0" # optional CEL context weight
channel = "app"
expires_after = "5m"                   # limbo timeout
payload = { title = "Team A jersey -10%", discount = 10 }
escalate = { on = ["match.goal"], when = "data.team == profile.team", add = { discount = 5 }, max = { discount = 25 } }
contact = { max = "1/10m", cooldown = "15m", stop_after_ignores = 3 }
"#;

    /// A valid offer to edit in tests, one key per line.
    const MINIMAL: &str = r#"[[offer]]
id = "o"
on = ["match.goal"]
consent = "marketing"
value = 1
expires_after = "1m"
"#;

    fn parse(text: &str) -> Result<Vec<Offer>, ConfigErrors> {
        parse_offers(text, Path::new(PATH))
    }

    fn ok(text: &str) -> Vec<Offer> {
        parse(text).unwrap_or_else(|e| panic!("offers should be valid, got:\n{e}"))
    }

    #[track_caller]
    fn only_error(text: &str, line: usize, field: &str, needle: &str) -> Diagnostic {
        let errs = match parse(text) {
            Ok(o) => panic!("offers should be invalid, parsed as {o:#?}"),
            Err(e) => e,
        };
        assert_eq!(errs.0.len(), 1, "expected one error, got:\n{errs}");
        let d = errs.0[0].clone();
        assert!(
            d.line == line && d.field == field && d.message.contains(needle),
            "expected line {line}, field `{field}`, message with {needle:?}; got:\n{d}"
        );
        assert_eq!(d.file, Path::new(PATH));
        assert!(d
            .to_string()
            .starts_with(&format!("{PATH}:{line}:{}: {field}: ", d.column)));
        d
    }

    #[test]
    fn the_issue_offer_parses() {
        let offers = ok(JERSEY);
        assert_eq!(offers.len(), 1);
        let o = &offers[0];
        assert_eq!(o.id, "team-a-jersey");
        assert_eq!(o.version, 1);
        assert_eq!(o.on, ["match.chance_missed"]);
        assert_eq!(o.audience.as_deref(), Some("profile.team == data.team"));
        assert_eq!(o.consent, "marketing");
        assert_eq!(o.value, 25.0);
        assert_eq!(o.weight.as_deref(), Some("data.minute > 80 ? 1.5 : 1.0"));
        assert_eq!(o.channel, Channel::App);
        assert_eq!(o.expires_after, Duration::from_secs(300));
        assert_eq!(
            o.payload,
            BTreeMap::from([
                (
                    "title".to_owned(),
                    PayloadValue::String("Team A jersey -10%".to_owned())
                ),
                ("discount".to_owned(), PayloadValue::Integer(10)),
            ])
        );
        let e = o.escalate.as_ref().expect("escalate");
        assert_eq!(e.on, ["match.goal"]);
        assert_eq!(e.when.as_deref(), Some("data.team == profile.team"));
        assert_eq!(e.add["discount"], Amount::Integer(5));
        assert_eq!(e.max["discount"], Amount::Integer(25));
        assert_eq!(
            o.contact,
            Contact {
                max: Some(Rate {
                    count: 1,
                    per: Duration::from_secs(600)
                }),
                cooldown: Duration::from_secs(900),
                stop_after_ignores: Some(3),
            }
        );
        assert_eq!(o.conversion, None);
        assert!(o.reward.is_empty() && o.referral.is_empty());
        assert_eq!(o.segment, None);
        assert_eq!(o.file, Path::new(PATH));
        assert_eq!(o.line, 1);
    }

    #[test]
    fn defaults_apply_and_optional_tables_parse() {
        let o = &ok(MINIMAL)[0];
        assert_eq!(o.version, defaults::OFFER_VERSION);
        assert_eq!(o.channel, defaults::CHANNEL);
        assert_eq!(o.contact, Contact::default());
        assert_eq!(o.contact.cooldown, defaults::COOLDOWN);
        assert!(o.payload.is_empty() && o.escalate.is_none() && o.audience.is_none());

        let text = format!(
            "{MINIMAL}conversion = {{ on = [\"shop.purchase\"], when = \"data.sku == 'jersey-a'\" }}\n\
             reward = {{ points = {{ xp = 20 }} }}\n\
             referral = {{ points = {{ referral = 50, xp = 5 }} }}\n\
             segment = \"profile.tier\"\n\
             payload = {{ items = [1, 2.5, \"x\", true, {{ deep = {{ k = \"v\" }} }}] }}\n"
        );
        let o = &ok(&text)[0];
        let c = o.conversion.as_ref().expect("conversion");
        assert_eq!(c.on, ["shop.purchase"]);
        assert_eq!(c.window, defaults::CONVERSION_WINDOW);
        assert_eq!(o.reward, BTreeMap::from([("xp".to_owned(), 20)]));
        assert_eq!(o.referral.len(), 2);
        assert_eq!(o.segment.as_deref(), Some("profile.tier"));
        let PayloadValue::Array(items) = &o.payload["items"] else {
            panic!("array expected");
        };
        assert_eq!(items.len(), 5);
        assert_eq!(items[1], PayloadValue::Float(2.5));
    }

    #[test]
    fn required_keys_are_named() {
        only_error(
            &MINIMAL.replace("consent = \"marketing\"\n", ""),
            1,
            "offer[0].consent",
            "required key is missing",
        );
        only_error(
            &MINIMAL.replace("expires_after = \"1m\"\n", ""),
            1,
            "offer[0].expires_after",
            "required key is missing",
        );
    }

    #[test]
    fn value_checks_name_line_and_field() {
        only_error(
            &MINIMAL.replace("value = 1", "value = 0"),
            5,
            "offer[0].value",
            "greater than 0",
        );
        only_error(
            &MINIMAL.replace("consent = \"marketing\"", "consent = \"mar keting\""),
            4,
            "offer[0].consent",
            "use only letters",
        );
        only_error(
            &format!("{MINIMAL}version = 0\n"),
            7,
            "offer[0].version",
            "at least 1",
        );
        only_error(
            &MINIMAL.replace(
                "on = [\"match.goal\"]",
                "on = [\"match.goal\", \"match.goal\"]",
            ),
            3,
            "offer[0].on[1]",
            "listed twice",
        );
        only_error(
            &format!("{MINIMAL}channel = \"sms\"\n"),
            7,
            "offer[0].channel",
            "unknown channel `sms`",
        );
        only_error(
            &format!("{MINIMAL}colour = \"red\"\n"),
            7,
            "offer[0].colour",
            "unknown key",
        );
        only_error(
            &format!("{MINIMAL}payload = {{ when = 1979-05-27 }}\n"),
            7,
            "offer[0].payload.when",
            "dates are not supported",
        );
    }

    #[test]
    fn contact_checks() {
        let d = only_error(
            &format!("{MINIMAL}contact = {{ max = \"1 per 10m\" }}\n"),
            7,
            "offer[0].contact.max",
            "not a rate",
        );
        assert_eq!(d.column, 19);
        only_error(
            &format!("{MINIMAL}contact = {{ max = \"0/10m\" }}\n"),
            7,
            "offer[0].contact.max",
            "at least 1",
        );
        only_error(
            &format!("{MINIMAL}contact = {{ max = \"2/0s\" }}\n"),
            7,
            "offer[0].contact.max",
            "greater than zero",
        );
        only_error(
            &format!("{MINIMAL}contact = {{ stop_after_ignores = 0 }}\n"),
            7,
            "offer[0].contact.stop_after_ignores",
            "at least 1",
        );
        only_error(
            &format!("{MINIMAL}contact = {{ cooldown = 15 }}\n"),
            7,
            "offer[0].contact.cooldown",
            "needs a unit",
        );
    }

    #[test]
    fn escalation_is_checked_against_the_payload() {
        let base = format!("{MINIMAL}payload = {{ title = \"t\", discount = 10 }}\n");
        only_error(
            &format!("{base}escalate = {{ on = [\"match.goal\"], add = {{ percent = 5 }}, max = {{ percent = 25 }} }}\n"),
            8,
            "offer[0].escalate.add.percent",
            "no field `percent`",
        );
        only_error(
            &format!("{base}escalate = {{ on = [\"match.goal\"], add = {{ title = 5 }}, max = {{ title = 25 }} }}\n"),
            8,
            "offer[0].escalate.add.title",
            "not a number",
        );
        only_error(
            &format!("{base}escalate = {{ on = [\"match.goal\"], add = {{ discount = 5 }}, max = {{ discount = 5 }} }}\n"),
            8,
            "offer[0].escalate.max.discount",
            "below the payload's starting value 10",
        );
        only_error(
            &format!("{base}escalate = {{ on = [\"match.goal\"], add = {{ discount = 5 }} }}\n"),
            8,
            "offer[0].escalate.max",
            "required key is missing",
        );
        only_error(
            &format!("{base}escalate = {{ on = [\"match.goal\"], add = {{ discount = -5 }}, max = {{ discount = 25 }} }}\n"),
            8,
            "offer[0].escalate.add.discount",
            "greater than 0",
        );
        only_error(
            &format!("{base}escalate = {{ on = [\"match.goal\"], add = {{ discount = 5 }}, max = {{ discount = 25, title = 1 }} }}\n"),
            8,
            "offer[0].escalate.max.title",
            "not raised by `add`",
        );
    }

    #[test]
    fn cel_errors_point_into_the_expression() {
        let text = MINIMAL.replace("value = 1\n", "value = 1\naudience = \"profile.team ==\"\n");
        let d = only_error(&text, 6, "offer[0].audience", "invalid CEL");
        // Just past `==`, inside the string.
        assert_eq!(d.column, 28);
        only_error(
            &format!("{MINIMAL}weight = \"\"\n"),
            7,
            "offer[0].weight",
            "must not be empty",
        );
        only_error(
            &format!(
                "{MINIMAL}conversion = {{ on = [\"shop.purchase\"], when = \"data.sku ==\" }}\n"
            ),
            7,
            "offer[0].conversion.when",
            "invalid CEL",
        );
    }

    #[test]
    fn ids_are_unique_within_a_file_and_other_keys_are_unknown() {
        let two = format!("{MINIMAL}\n{MINIMAL}");
        only_error(&two, 9, "offer[1].id", "duplicate offer id `o`");
        only_error(
            &format!("x = 1\n{MINIMAL}"),
            1,
            "x",
            "unknown key `x` at the top level",
        );
    }

    fn site(extra: &str) -> Result<crate::SiteConfig, ConfigErrors> {
        crate::parse_site_config(
            &format!("[site]\nid = \"arena-01\"\ndata_dir = \"data\"\n{extra}"),
            Path::new("/etc/touchline/site.toml"),
        )
    }

    #[test]
    fn nba_section_defaults_and_values() {
        let config = site("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.nba, NbaPolicy::default());
        assert_eq!(config.nba.top_k, 1);
        assert_eq!(config.nba.control_share, 0.05);
        assert_eq!(
            config.nba.prior,
            BetaPrior {
                alpha: 1.0,
                beta: 1.0
            }
        );

        let config = site(
            "[nba]\nmax_per_customer = \"2/30m\"\nquiet_after_accept = \"0s\"\ntop_k = 2\n\
             control_share = 0.1\ncontrol_salt = \"2025\"\non_expiry = \"neutral\"\n\
             prior = { alpha = 2, beta = 8.5 }\nexploration = 0\nsegment = \"profile.tier\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let nba = config.nba;
        assert_eq!(
            nba.max_per_customer,
            Rate {
                count: 2,
                per: Duration::from_secs(1800)
            }
        );
        assert_eq!(nba.quiet_after_accept, Duration::ZERO);
        assert_eq!(nba.top_k, 2);
        assert_eq!(nba.control_share, 0.1);
        assert_eq!(nba.control_salt.as_deref(), Some("2025"));
        assert_eq!(nba.on_expiry, OnExpiry::Neutral);
        assert_eq!(
            nba.prior,
            BetaPrior {
                alpha: 2.0,
                beta: 8.5
            }
        );
        assert_eq!(nba.exploration, 0.0);
        assert_eq!(nba.segment.as_deref(), Some("profile.tier"));
    }

    #[track_caller]
    fn site_error(extra: &str, line: usize, field: &str, needle: &str) {
        let errs = match site(extra) {
            Ok(c) => panic!("config should be invalid, parsed as {c:#?}"),
            Err(e) => e,
        };
        assert_eq!(errs.0.len(), 1, "expected one error, got:\n{errs}");
        let d = &errs.0[0];
        assert!(
            d.line == line && d.field == field && d.message.contains(needle),
            "expected line {line}, field `{field}`, message with {needle:?}; got:\n{d}"
        );
        assert!(d.to_string().starts_with("/etc/touchline/site.toml:"));
    }

    #[test]
    fn nba_section_errors_name_line_and_field() {
        site_error("[nba]\ntop_k = 0\n", 5, "nba.top_k", "from 1 to 16");
        site_error(
            "[nba]\ncontrol_share = 1.0\n",
            5,
            "nba.control_share",
            "up to, not including, 1",
        );
        site_error(
            "[nba]\nexploration = -0.1\n",
            5,
            "nba.exploration",
            "from 0",
        );
        site_error(
            "[nba]\non_expiry = \"forget\"\n",
            5,
            "nba.on_expiry",
            "unknown on_expiry policy",
        );
        site_error(
            "[nba]\nprior = { alpha = 0 }\n",
            5,
            "nba.prior.alpha",
            "greater than 0",
        );
        site_error(
            "[nba]\nmax_per_customer = \"3\"\n",
            5,
            "nba.max_per_customer",
            "not a rate",
        );
        site_error(
            "[nba]\nsegment = \"profile.\"\n",
            5,
            "nba.segment",
            "invalid CEL",
        );
        site_error("[nba]\ntopk = 2\n", 5, "nba.topk", "unknown key");
    }

    #[test]
    fn rule_files_route_offers_and_achievements() {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write");
        };
        write(
            "site.toml",
            "[site]\nid = \"s\"\ndata_dir = \"data\"\nrules = [\"rules/*.toml\"]\n",
        );
        std::fs::create_dir(dir.path().join("rules")).expect("mkdir");
        let achievement = "[[achievement]]\nid = \"a\"\nname = \"A\"\non = [\"fan.cheer\"]\n\
                           measure = \"count\"\nwindow = \"lifetime\"\ntiers = [ { at = 1 } ]\n";
        write("rules/a.toml", achievement);
        write("rules/b.toml", JERSEY);
        write("rules/c.toml", MINIMAL);
        let site = crate::load_site_config(&dir.path().join("site.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let bundle = crate::load_rules(&site).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bundle.achievements.len(), 1);
        let ids: Vec<&str> = bundle.offers.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, ["team-a-jersey", "o"]);
        assert_eq!(bundle.files.len(), 3);

        // The same offer id in two files.
        write("rules/d.toml", MINIMAL);
        let errs = crate::load_rules(&site).expect_err("duplicate");
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].field, "offer[0].id");
        assert!(errs.0[0].file.ends_with("rules/d.toml"));
        assert!(errs.0[0].message.contains("already defined at"), "{errs}");
        std::fs::remove_file(dir.path().join("rules/d.toml")).expect("rm");

        // Both kinds in one file.
        write("rules/e.toml", &format!("{achievement}\n{MINIMAL}"));
        let errs = crate::load_rules(&site).expect_err("mixed");
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].field, "offer");
        assert_eq!(errs.0[0].line, 9);
        assert!(errs.0[0].message.contains("file of their own"), "{errs}");
    }
}
