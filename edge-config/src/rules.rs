//! One rule file: from TOML text to validated [`AchievementRule`]s.
//!
//! A rule is read key by key; `measure` and `window` each have their own
//! reader with the list of known names, so the richer measures and windows
//! (sum, distinct, streak, sequence; period, day, rolling) and the keys they
//! bring are additions there, not a new structure. Rule kinds other than
//! `[[achievement]]` become further top-level arrays next to it.

use std::ops::Range;
use std::path::Path;

use crate::cel_check::{self, CelProblem};
use crate::defaults;
use crate::diagnostic::{ConfigErrors, Diags, Invalid, Source};
use crate::model::{AchievementRule, Measure, Tier, Window};
use crate::paths;
use crate::reader::{self, check_id, Id, Kind, NonEmpty, Number, Setting, StrList, Table};

/// Validates rule file `text` that was read from `path`.
pub fn parse_rules(text: &str, path: &Path) -> Result<Vec<AchievementRule>, ConfigErrors> {
    Ok(parse_rules_located(text, path)?
        .into_iter()
        .map(|r| r.rule)
        .collect())
}

/// A parsed rule and where its id is, for checks across files.
pub(crate) struct LocatedRule {
    pub rule: AchievementRule,
    pub index: usize,
    pub id_line: usize,
    pub id_column: usize,
}

pub(crate) fn parse_rules_located(
    text: &str,
    path: &Path,
) -> Result<Vec<LocatedRule>, ConfigErrors> {
    let src = Source::new(path, text);
    let mut d = Diags::new(&src);
    let result = reader::parse(&mut d).and_then(|doc| read_file(&mut d, &doc, path));
    d.conclude(result)
}

/// A rule read from the file, with what the file-level checks need.
struct Read {
    rule: AchievementRule,
    index: usize,
    id_span: Range<usize>,
    id_field: String,
}

/// A `when` to compile, with its place; collected from every rule, valid
/// or not, so a broken predicate is reported together with the rule's
/// other problems.
struct Predicate {
    span: Range<usize>,
    field: String,
    expression: String,
}

fn read_file(
    d: &mut Diags<'_, '_>,
    doc: &toml::Spanned<toml::de::DeTable<'_>>,
    path: &Path,
) -> Result<Vec<LocatedRule>, Invalid> {
    let file = paths::absolute(path);
    let mut root = Table::root(doc);
    let tables = root.tables(d, "achievement");
    root.finish(d);
    let Some(tables) = tables? else {
        return Ok(Vec::new());
    };

    let mut read = Vec::new();
    let mut predicates = Vec::new();
    let mut ok = true;
    for (index, t) in tables.value.into_iter().enumerate() {
        match read_achievement(d, t, &file, index, &mut predicates) {
            Ok(r) => read.push(r),
            Err(Invalid) => ok = false,
        }
    }

    for (i, r) in read.iter().enumerate() {
        if let Some(first) = read[..i].iter().find(|f| f.rule.id == r.rule.id) {
            d.error(
                r.id_span.clone(),
                &r.id_field,
                format!(
                    "duplicate id `{}`: already used by the rule at line {}",
                    r.rule.id, first.rule.line
                ),
            );
            ok = false;
        }
    }

    ok &= check_predicates(d, predicates);
    if !ok {
        return Err(Invalid);
    }
    let src = d.source();
    Ok(read
        .into_iter()
        .map(|r| {
            let (id_line, id_column) = src.position(r.id_span.start);
            LocatedRule {
                rule: r.rule,
                index: r.index,
                id_line,
                id_column,
            }
        })
        .collect())
}

fn read_achievement(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    file: &Path,
    index: usize,
    predicates: &mut Vec<Predicate>,
) -> Result<Read, Invalid> {
    let id = t.req::<Id>(d, "id");
    let name = t.req::<NonEmpty>(d, "name");
    let version = t.or::<u32>(d, "version", defaults::RULE_VERSION);
    let on = t.req::<StrList>(d, "on");
    let when = t.opt::<String>(d, "when");
    let measure = read_measure(d, &mut t);
    let window = read_window(d, &mut t);
    let tiers = t.tables(d, "tiers");
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
        ok &= check_event_types(d, &t, on);
    }
    if let Ok(Some(when)) = &when {
        if when.value.trim().is_empty() {
            d.error(
                t.span_of(when),
                &t.field("when"),
                "must not be empty; leave `when` out to count every event of the types in `on`",
            );
            ok = false;
        } else {
            predicates.push(Predicate {
                span: t.span_of(when),
                field: t.field("when"),
                expression: when.value.clone(),
            });
        }
    }
    // With an invalid measure the tiers are still checked, minus what
    // depends on the measure.
    let tiers = match tiers {
        Ok(Some(tiers)) => read_tiers(d, &t, tiers, measure.as_ref().ok()),
        Ok(None) => Err(t.missing(d, "tiers")),
        Err(Invalid) => Err(Invalid),
    };

    let line = d.source().position(t.span().start).0;
    let id = id?;
    let id_span = t.span_of(&id);
    let when = when?;
    let rule = AchievementRule {
        id: id.value,
        name: name?.value,
        version: version?.value,
        on: on?.value.into_iter().map(|s| s.value).collect(),
        when: when.map(|w| w.value),
        measure: measure?,
        window: window?,
        tiers: tiers?,
        file: file.to_path_buf(),
        line,
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(Read {
        rule,
        index,
        id_span,
        id_field: t.field("id"),
    })
}

/// `measure`: what a matching event adds to the customer's progress.
fn read_measure(d: &mut Diags<'_, '_>, t: &mut Table<'_, '_>) -> Result<Measure, Invalid> {
    t.choice(d, "measure", "measure", &[("count", Measure::Count)], None)
        .map(|s| s.value)
}

/// `window`: over which span of time progress accumulates.
fn read_window(d: &mut Diags<'_, '_>, t: &mut Table<'_, '_>) -> Result<Window, Invalid> {
    t.choice(
        d,
        "window",
        "window",
        &[("lifetime", Window::Lifetime)],
        None,
    )
    .map(|s| s.value)
}

/// `on`: at least one event type, each non-empty and listed once.
fn check_event_types(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    on: &Setting<Vec<Setting<String>>>,
) -> bool {
    if on.value.is_empty() {
        d.error(
            t.span_of(on),
            &t.field("on"),
            "at least one event type is needed, e.g. [\"fan.cheer\"]",
        );
        return false;
    }
    let mut ok = true;
    for (i, ty) in on.value.iter().enumerate() {
        let field = format!("{}[{i}]", t.field("on"));
        let problem = if ty.value.is_empty() {
            Some("event type must not be empty".to_owned())
        } else if ty.value.chars().any(char::is_whitespace) {
            Some(format!("event type `{}` contains whitespace", ty.value))
        } else if on.value[..i].iter().any(|prev| prev.value == ty.value) {
            Some(format!("event type `{}` is listed twice", ty.value))
        } else {
            None
        };
        if let Some(problem) = problem {
            d.error(t.span_of(ty), &field, problem);
            ok = false;
        }
    }
    ok
}

fn read_tiers(
    d: &mut Diags<'_, '_>,
    rule: &Table<'_, '_>,
    tiers: Setting<Vec<Table<'_, '_>>>,
    measure: Option<&Measure>,
) -> Result<Vec<Tier>, Invalid> {
    if tiers.value.is_empty() {
        return Err(d.error(
            rule.span_of(&tiers),
            &rule.field("tiers"),
            "at least one tier is needed, e.g. [ { at = 10, badge = \"bronze\" } ]",
        ));
    }
    let mut out = Vec::with_capacity(tiers.value.len());
    let mut ok = true;
    let mut previous: Option<f64> = None;
    for mut t in tiers.value {
        let at = t.req::<Number>(d, "at");
        let badge = t.opt::<NonEmpty>(d, "badge");
        let points = read_points(d, &mut t);
        t.finish(d);

        if let Ok(at) = &at {
            let field = t.field("at");
            let span = t.span_of(at);
            let problem = if at.value <= 0.0 {
                Some(format!("must be greater than 0; got {}", at.value))
            } else if matches!(measure, Some(Measure::Count)) && at.value.fract() != 0.0 {
                Some(format!(
                    "a count reaches whole numbers only; got {}",
                    at.value
                ))
            } else {
                previous.filter(|&prev| at.value <= prev).map(|prev| {
                    format!(
                        "tiers must be in strictly ascending order of `at`; {} does not exceed the previous tier's {prev}",
                        at.value
                    )
                })
            };
            if let Some(problem) = problem {
                d.error(span, &field, problem);
                ok = false;
            }
            previous = Some(at.value);
        }
        match (at, badge, points) {
            (Ok(at), Ok(badge), Ok(points)) => out.push(Tier {
                at: at.value,
                badge: badge.map(|b| b.value),
                points,
            }),
            _ => ok = false,
        }
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(out)
}

/// `points = { category = amount }`; categories are ids.
fn read_points(
    d: &mut Diags<'_, '_>,
    t: &mut Table<'_, '_>,
) -> Result<std::collections::BTreeMap<String, i64>, Invalid> {
    let mut points = std::collections::BTreeMap::new();
    let Some(mut table) = t.table(d, "points")? else {
        return Ok(points);
    };
    let mut ok = true;
    let entries: Vec<_> = table.entries().collect();
    for (key, node) in entries {
        let category: &str = key.get_ref();
        let field = table.field(category);
        if let Err(e) = check_id(category) {
            d.error(key.span(), &field, format!("point category {e}"));
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
    table.finish(d);
    if !ok {
        return Err(Invalid);
    }
    Ok(points)
}

/// Compiles every `when` of the file on one compile thread; false when
/// any failed.
fn check_predicates(d: &mut Diags<'_, '_>, predicates: Vec<Predicate>) -> bool {
    let results = cel_check::check_all(predicates.iter().map(|p| p.expression.clone()).collect());
    let mut ok = true;
    for (p, result) in predicates.iter().zip(results) {
        if let Err(problem) = result {
            report_cel(d, &p.span, &p.field, &p.expression, problem);
            ok = false;
        }
    }
    ok
}

/// Reports a CEL problem at its own place in the file when the string was
/// written without escapes (so expression positions map one to one), else
/// at the start of the value with the position inside the expression.
fn report_cel(
    d: &mut Diags<'_, '_>,
    span: &Range<usize>,
    field: &str,
    expression: &str,
    problem: CelProblem,
) {
    let Some((line, column)) = problem.position else {
        d.error(span.clone(), field, problem.message);
        return;
    };
    let text = d.source().text();
    match expression_offset(text, span, expression, line, column) {
        Some(offset) => {
            d.error_at_offset(offset, field, problem.message);
        }
        None => {
            d.error(
                span.clone(),
                field,
                format!(
                    "{} (at line {line}, column {column} of the expression)",
                    problem.message
                ),
            );
        }
    }
}

/// The file offset of (`line`, `column`) of `expression`, written as the
/// TOML string at `span`, if the string's source text is the expression
/// itself.
fn expression_offset(
    text: &str,
    span: &Range<usize>,
    expression: &str,
    line: usize,
    column: usize,
) -> Option<usize> {
    let raw = text.get(span.clone())?;
    let delimiter = ["\"\"\"", "'''", "\"", "'"]
        .into_iter()
        .find(|d| raw.starts_with(d) && raw.len() >= 2 * d.len() && raw.ends_with(d))?;
    let mut start = span.start + delimiter.len();
    let mut content = &raw[delimiter.len()..raw.len() - delimiter.len()];
    if delimiter.len() == 3 {
        // A newline right after the opening delimiter is not part of a
        // multi-line string.
        for newline in ["\r\n", "\n"] {
            if let Some(rest) = content.strip_prefix(newline) {
                start += newline.len();
                content = rest;
                break;
            }
        }
    }
    if content != expression {
        return None;
    }
    let mut line_start = 0;
    for _ in 1..line {
        line_start += content[line_start..].find('\n')? + 1;
    }
    let line_text = content[line_start..].split('\n').next()?;
    let within = match line_text.char_indices().nth(column - 1) {
        Some((i, _)) => i,
        // Errors "at the end" point just past the last character.
        None if line_text.chars().count() == column - 1 => line_text.len(),
        None => return None,
    };
    Some(start + line_start + within)
}
