//! One rule file: from TOML text to validated [`AchievementRule`]s and
//! [`VoucherPool`]s.
//!
//! A rule is read key by key, every key a measure, window, scope or limit
//! can bring included, before anything is checked. A key written where the
//! rule's other settings give it no meaning (a `value` on a `count`, a
//! `group_by` without `scope = "group"`) is then reported as such, which
//! says more than "unknown key" to someone who copied it from another
//! rule. Every CEL expression of the file is compiled in one go at the
//! end, so a broken one is reported together with everything else.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use crate::cel_check::{self, CelProblem};
use crate::defaults;
use crate::diagnostic::{ConfigErrors, Diags, Invalid, Source};
use crate::model::{
    AchievementRule, Every, Limits, Measure, Rate, Referral, Scope, Step, Tier, Voucher,
    VoucherPool, Window,
};
use crate::offers::RateKind;
use crate::paths;
use crate::reader::{
    self, check_id, Dur, Id, Kind, Node, NonEmpty, Number, PositiveDur, Setting, StrList, Table,
};
use crate::units::format_duration;

/// Validates rule file `text` that was read from `path`. Voucher pools the
/// file defines are checked but not returned, and a tier may name a pool
/// of another file: [`crate::load_rules`] resolves pools across the
/// bundle.
pub fn parse_rules(text: &str, path: &Path) -> Result<Vec<AchievementRule>, ConfigErrors> {
    Ok(parse_rules_located(text, path)?
        .rules
        .into_iter()
        .map(|r| r.rule)
        .collect())
}

/// What one rule file holds, with the places checks across files need.
pub(crate) struct RuleFile {
    pub rules: Vec<LocatedRule>,
    pub pools: Vec<LocatedPool>,
}

/// A parsed rule and where its id and its voucher references are.
pub(crate) struct LocatedRule {
    pub rule: AchievementRule,
    pub index: usize,
    pub id_line: usize,
    pub id_column: usize,
    pub pool_refs: Vec<PoolRef>,
}

/// A tier's `voucher = { pool = ".." }`, for the check that the pool exists.
pub(crate) struct PoolRef {
    pub pool: String,
    pub field: String,
    pub line: usize,
    pub column: usize,
}

/// A parsed voucher pool and where its id and codes path are.
pub(crate) struct LocatedPool {
    pub pool: VoucherPool,
    pub index: usize,
    pub id_line: usize,
    pub id_column: usize,
    pub codes_line: usize,
    pub codes_column: usize,
}

pub(crate) fn parse_rules_located(text: &str, path: &Path) -> Result<RuleFile, ConfigErrors> {
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
    pool_refs: Vec<(String, String, Range<usize>)>,
}

/// A CEL expression to compile, with its place; collected from every
/// rule, valid or not, so a broken expression is reported together with
/// the rule's other problems.
struct Expression {
    span: Range<usize>,
    field: String,
    text: String,
}

fn read_file(
    d: &mut Diags<'_, '_>,
    doc: &toml::Spanned<toml::de::DeTable<'_>>,
    path: &Path,
) -> Result<RuleFile, Invalid> {
    let file = paths::absolute(path);
    let mut root = Table::root(doc);
    let tables = root.tables(d, "achievement");
    let pool_tables = root.tables(d, "voucher_pool");
    root.finish(d);

    let mut read = Vec::new();
    let mut expressions = Vec::new();
    let mut ok = true;
    if let Some(tables) = tables? {
        for (index, t) in tables.value.into_iter().enumerate() {
            match read_achievement(d, t, &file, index, &mut expressions) {
                Ok(r) => read.push(r),
                Err(Invalid) => ok = false,
            }
        }
    }
    ok &= d.unique_ids(
        "rule",
        read.iter().map(|r| {
            let id = r.rule.id.as_str();
            (id, r.rule.line, r.id_span.clone(), r.id_field.as_str())
        }),
    );
    let pools = match pool_tables {
        Ok(Some(tables)) => read_pools(d, tables.value, &file),
        Ok(None) => Ok(Vec::new()),
        Err(Invalid) => Err(Invalid),
    };

    ok &= check_expressions(d, expressions);
    let pools = pools?;
    if !ok {
        return Err(Invalid);
    }
    let src = d.source();
    let rules = read
        .into_iter()
        .map(|r| {
            let (id_line, id_column) = src.position(r.id_span.start);
            let pool_refs = r
                .pool_refs
                .into_iter()
                .map(|(pool, field, span)| {
                    let (line, column) = src.position(span.start);
                    PoolRef {
                        pool,
                        field,
                        line,
                        column,
                    }
                })
                .collect();
            LocatedRule {
                rule: r.rule,
                index: r.index,
                id_line,
                id_column,
                pool_refs,
            }
        })
        .collect();
    Ok(RuleFile { rules, pools })
}

/// The measure named in `measure`, before its keys are gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MeasureKind {
    Count,
    Sum,
    Distinct,
    Max,
    Min,
    Streak,
    Sequence,
}

const MEASURES: &[(&str, MeasureKind)] = &[
    ("count", MeasureKind::Count),
    ("sum", MeasureKind::Sum),
    ("distinct", MeasureKind::Distinct),
    ("max", MeasureKind::Max),
    ("min", MeasureKind::Min),
    ("streak", MeasureKind::Streak),
    ("sequence", MeasureKind::Sequence),
];

impl MeasureKind {
    fn name(self) -> &'static str {
        MEASURES
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("?", |(n, _)| n)
    }
    fn has_value(self) -> bool {
        matches!(self, MeasureKind::Sum | MeasureKind::Max | MeasureKind::Min)
    }
    /// Measures a shared scope or a referral can add up.
    fn additive(self) -> bool {
        matches!(self, MeasureKind::Count | MeasureKind::Sum)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScopeKind {
    Customer,
    Group,
    Venue,
}

fn read_achievement(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    file: &Path,
    index: usize,
    expressions: &mut Vec<Expression>,
) -> Result<Read, Invalid> {
    let id = t.req::<Id>(d, "id");
    let name = t.req::<NonEmpty>(d, "name");
    let version = t.or::<u32>(d, "version", defaults::RULE_VERSION);
    let on = t.opt::<StrList>(d, "on");
    let when = t.opt::<String>(d, "when");
    let kind = t.choice(d, "measure", "measure", MEASURES, None);
    let value = t.opt::<String>(d, "value");
    let key = t.opt::<String>(d, "key");
    let every = opt_choice(
        d,
        &mut t,
        "every",
        "streak instance",
        &[("period", Every::Period), ("day", Every::Day)],
    );
    let allow_gaps = t.opt::<u32>(d, "allow_gaps");
    let steps = t.tables(d, "steps");
    let within = t.opt::<PositiveDur>(d, "within");
    let window = t.req::<WindowKind>(d, "window");
    let lateness = t.or::<Dur>(d, "lateness", defaults::RULE_LATENESS);
    let scope = t.choice(
        d,
        "scope",
        "scope",
        &[
            ("customer", ScopeKind::Customer),
            ("group", ScopeKind::Group),
            ("venue", ScopeKind::Venue),
        ],
        Some(ScopeKind::Customer),
    );
    let group_by = t.opt::<String>(d, "group_by");
    let min_contribution = t.opt::<Number>(d, "min_contribution");
    let limits = t.table(d, "limits");
    let sources = t.opt::<StrList>(d, "sources");
    let referral = t.table(d, "referral");
    let tiers = t.tables(d, "tiers");
    t.finish(d);

    let mut ok = true;
    let kind_known = kind.as_ref().ok().map(|k| k.value);
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

    // `on` and `when`: a sequence takes both from its steps.
    let is_sequence = kind_known == Some(MeasureKind::Sequence);
    let on = match on {
        Ok(Some(on)) if is_sequence => {
            d.error(
                t.span_of(&on),
                &t.field("on"),
                "measure `sequence` takes its event types from `steps`; move them to the steps, e.g. steps = [ { on = [\"ticket.scanned\"] }, ... ]",
            );
            ok = false;
            Ok(Vec::new())
        }
        Ok(Some(on)) => {
            ok &= check_event_types(d, &t, "on", &on);
            Ok(on.value.into_iter().map(|s| s.value).collect())
        }
        Ok(None) if is_sequence || kind_known.is_none() => Ok(Vec::new()),
        Ok(None) => Err(t.missing(d, "on")),
        Err(Invalid) => Err(Invalid),
    };
    let when = match when {
        Ok(Some(when)) if is_sequence => {
            d.error(
                t.span_of(&when),
                &t.field("when"),
                "measure `sequence` has a `when` per step; move the condition to the step it belongs to",
            );
            ok = false;
            Ok(None)
        }
        Ok(when) => Ok(expression(d, &t, "when", when, expressions, &mut ok)),
        Err(Invalid) => Err(Invalid),
    };

    let measure = match kind {
        Ok(kind) => read_measure_keys(
            d,
            &t,
            kind,
            MeasureKeys {
                value,
                key,
                every,
                allow_gaps,
                steps,
                within,
            },
            expressions,
        ),
        Err(Invalid) => Err(Invalid),
    };

    if let (Ok(w), Some(kind)) = (&window, kind_known) {
        ok &= check_window(d, &t, w, kind);
    }
    if let Ok(lateness) = &lateness {
        if lateness.value > defaults::RULE_LATENESS_MAX {
            d.error(
                t.span_of(lateness),
                &t.field("lateness"),
                format!(
                    "{} is longer than the most allowed, {}",
                    format_duration(lateness.value),
                    format_duration(defaults::RULE_LATENESS_MAX)
                ),
            );
            ok = false;
        }
    }
    let scope = match scope {
        Ok(scope) => read_scope(
            d,
            &t,
            scope,
            group_by,
            min_contribution,
            kind_known,
            window.as_ref().ok().map(|w| w.value),
            expressions,
        ),
        Err(Invalid) => Err(Invalid),
    };
    let limits = match limits {
        Ok(Some(l)) => read_limits(d, l, kind_known),
        Ok(None) => Ok(Limits::default()),
        Err(Invalid) => Err(Invalid),
    };
    let sources = match sources {
        Ok(Some(s)) => check_sources(d, &t, s).map(Some),
        Ok(None) => Ok(None),
        Err(Invalid) => Err(Invalid),
    };
    let shared_scope = scope.as_ref().is_ok_and(|s| *s != Scope::Customer);
    let referral = match referral {
        Ok(Some(r)) => read_referral(d, r, kind_known, shared_scope, expressions).map(Some),
        Ok(None) => Ok(None),
        Err(Invalid) => Err(Invalid),
    };
    // With an invalid measure the tiers are still checked, minus what
    // depends on the measure.
    let mut pool_refs = Vec::new();
    let tiers = match tiers {
        Ok(Some(tiers)) => read_tiers(d, &t, tiers, kind_known, &mut pool_refs),
        Ok(None) => Err(t.missing(d, "tiers")),
        Err(Invalid) => Err(Invalid),
    };

    let line = d.source().position(t.span().start).0;
    let id = id?;
    let id_span = t.span_of(&id);
    let rule = AchievementRule {
        id: id.value,
        name: name?.value,
        version: version?.value,
        on: on?,
        when: when?,
        measure: measure?,
        window: window?.value,
        lateness: lateness?.value,
        scope: scope?,
        limits: limits?,
        sources: sources?,
        referral: referral?,
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
        pool_refs,
    })
}

/// An optional string key that must be one of `choices`.
fn opt_choice<T: Clone>(
    d: &mut Diags<'_, '_>,
    t: &mut Table<'_, '_>,
    key: &'static str,
    what: &str,
    choices: &[(&str, T)],
) -> Result<Option<Setting<T>>, Invalid> {
    let Some(written) = t.opt::<String>(d, key)? else {
        return Ok(None);
    };
    match choices.iter().find(|(name, _)| *name == written.value) {
        Some((_, value)) => Ok(Some(Setting {
            value: value.clone(),
            span: written.span,
        })),
        None => {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
            Err(d.error(
                t.span_of(&written),
                &t.field(key),
                format!(
                    "unknown {what} `{}`; supported: {}",
                    written.value,
                    names.join(", ")
                ),
            ))
        }
    }
}

/// A CEL expression key: non-empty, queued for compilation. `None` when
/// absent or empty (an empty one is reported and clears `ok`).
fn expression(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    key: &str,
    written: Option<Setting<String>>,
    expressions: &mut Vec<Expression>,
    ok: &mut bool,
) -> Option<String> {
    let written = written?;
    if written.value.trim().is_empty() {
        let hint = if key == "when" {
            "must not be empty; leave `when` out to count every event of the types in `on`"
        } else {
            "must not be empty"
        };
        d.error(t.span_of(&written), &t.field(key), hint);
        *ok = false;
        return None;
    }
    expressions.push(Expression {
        span: t.span_of(&written),
        field: t.field(key),
        text: written.value.clone(),
    });
    Some(written.value)
}

/// Reports `key` as having no meaning here; always false.
fn not_here<T>(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    key: &str,
    setting: &Setting<T>,
    why: String,
) -> bool {
    d.error(t.span_of(setting), &t.field(key), why);
    false
}

/// The keys only some measures use, as read from the rule.
struct MeasureKeys<'t, 'i> {
    value: Result<Option<Setting<String>>, Invalid>,
    key: Result<Option<Setting<String>>, Invalid>,
    every: Result<Option<Setting<Every>>, Invalid>,
    allow_gaps: Result<Option<Setting<u32>>, Invalid>,
    steps: Result<Option<Setting<Vec<Table<'t, 'i>>>>, Invalid>,
    within: Result<Option<Setting<Duration>>, Invalid>,
}

/// Builds the measure from `kind` and the keys it needs; reports keys it
/// needs but lacks and keys it has no use for.
fn read_measure_keys(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    kind: Setting<MeasureKind>,
    keys: MeasureKeys<'_, '_>,
    expressions: &mut Vec<Expression>,
) -> Result<Measure, Invalid> {
    let k = kind.value;
    let name = k.name();
    let mut ok = true;
    let MeasureKeys {
        value,
        key,
        every,
        allow_gaps,
        steps,
        within,
    } = keys;
    let (value, key, every, allow_gaps, steps, within) =
        (value?, key?, every?, allow_gaps?, steps?, within?);

    // Keys this measure has no use for: (key, where it is set, whether
    // this measure uses it, which measures do).
    let span = |set: bool, s: Option<Range<usize>>| s.filter(|_| set);
    let unused = [
        (
            "value",
            span(!k.has_value(), value.as_ref().map(|v| t.span_of(v))),
            "`value` is only used with measure `sum`, `max` or `min`",
        ),
        (
            "key",
            span(
                k != MeasureKind::Distinct,
                key.as_ref().map(|v| t.span_of(v)),
            ),
            "`key` is only used with measure `distinct`",
        ),
        (
            "every",
            span(
                k != MeasureKind::Streak,
                every.as_ref().map(|v| t.span_of(v)),
            ),
            "`every` is only used with measure `streak`",
        ),
        (
            "allow_gaps",
            span(
                k != MeasureKind::Streak,
                allow_gaps.as_ref().map(|v| t.span_of(v)),
            ),
            "`allow_gaps` is only used with measure `streak`",
        ),
        (
            "steps",
            span(
                k != MeasureKind::Sequence,
                steps.as_ref().map(|v| t.span_of(v)),
            ),
            "`steps` are only used with measure `sequence`",
        ),
        (
            "within",
            span(
                k != MeasureKind::Sequence,
                within.as_ref().map(|v| t.span_of(v)),
            ),
            "`within` is only used with measure `sequence`",
        ),
    ];
    for (field, at, why) in unused {
        if let Some(at) = at {
            d.error(at, &t.field(field), format!("{why}, not `{name}`"));
            ok = false;
        }
    }

    let measure = match k {
        MeasureKind::Count => Some(Measure::Count),
        MeasureKind::Sum | MeasureKind::Max | MeasureKind::Min => match value {
            None => {
                d.error(
                        t.span_of(&kind),
                        &t.field("value"),
                        format!("measure `{name}` needs `value`, a CEL expression giving a number, e.g. value = \"data.amount\""),
                    );
                ok = false;
                None
            }
            Some(v) => {
                expression(d, t, "value", Some(v), expressions, &mut ok).map(|value| match k {
                    MeasureKind::Sum => Measure::Sum { value },
                    MeasureKind::Max => Measure::Max { value },
                    _ => Measure::Min { value },
                })
            }
        },
        MeasureKind::Distinct => match key {
            None => {
                d.error(
                    t.span_of(&kind),
                    &t.field("key"),
                    "measure `distinct` needs `key`, a CEL expression naming what must differ, e.g. key = \"data.zone\"",
                );
                ok = false;
                None
            }
            Some(v) => expression(d, t, "key", Some(v), expressions, &mut ok)
                .map(|key| Measure::Distinct { key }),
        },
        MeasureKind::Streak => {
            if let Some(gaps) = &allow_gaps {
                if gaps.value > defaults::STREAK_MAX_GAPS {
                    d.error(
                        t.span_of(gaps),
                        &t.field("allow_gaps"),
                        format!(
                            "{} is more than the most allowed, {}",
                            gaps.value,
                            defaults::STREAK_MAX_GAPS
                        ),
                    );
                    ok = false;
                }
            }
            match every {
                None => {
                    d.error(
                        t.span_of(&kind),
                        &t.field("every"),
                        "measure `streak` needs `every = \"period\"` or `every = \"day\"`: the instances that must follow each other",
                    );
                    ok = false;
                    None
                }
                Some(every) => Some(Measure::Streak {
                    every: every.value,
                    allow_gaps: allow_gaps.map_or(defaults::STREAK_ALLOW_GAPS, |g| g.value),
                }),
            }
        }
        MeasureKind::Sequence => match steps {
            None => {
                d.error(
                    t.span_of(&kind),
                    &t.field("steps"),
                    "measure `sequence` needs `steps`, e.g. steps = [ { on = [\"ticket.scanned\"] }, { on = [\"fan.cheer\"] } ]",
                );
                ok = false;
                None
            }
            Some(steps) => {
                read_steps(d, t, steps, expressions)
                    .ok()
                    .map(|steps| Measure::Sequence {
                        steps,
                        within: within.map(|w| w.value),
                    })
            }
        },
    };
    match measure {
        Some(m) if ok => Ok(m),
        _ => Err(Invalid),
    }
}

fn read_steps(
    d: &mut Diags<'_, '_>,
    rule: &Table<'_, '_>,
    steps: Setting<Vec<Table<'_, '_>>>,
    expressions: &mut Vec<Expression>,
) -> Result<Vec<Step>, Invalid> {
    let count = steps.value.len();
    if count == 0 || count > defaults::SEQUENCE_MAX_STEPS {
        return Err(d.error(
            rule.span_of(&steps),
            &rule.field("steps"),
            format!(
                "a sequence has 1 to {} steps; got {count}",
                defaults::SEQUENCE_MAX_STEPS
            ),
        ));
    }
    let mut out = Vec::with_capacity(count);
    let mut ok = true;
    for mut s in steps.value {
        let on = s.req::<StrList>(d, "on");
        let when = s.opt::<String>(d, "when");
        s.finish(d);
        let on = on.map(|on| {
            ok &= check_event_types(d, &s, "on", &on);
            on.value.into_iter().map(|s| s.value).collect::<Vec<_>>()
        });
        let when = when.map(|w| expression(d, &s, "when", w, expressions, &mut ok));
        match (on, when) {
            (Ok(on), Ok(when)) => out.push(Step { on, when }),
            _ => ok = false,
        }
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(out)
}

/// `window`: `lifetime`, `period`, `day`, `rolling:<duration>` or
/// `tumbling:<duration>`.
struct WindowKind;

impl Kind for WindowKind {
    type Out = Window;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<Window, Invalid> {
        let s = String::read(d, field, node)?;
        parse_window(&s).map_err(|e| d.error(node.span(), field, e))
    }
}

fn parse_window(s: &str) -> Result<Window, String> {
    match s {
        "lifetime" => return Ok(Window::Lifetime),
        "period" => return Ok(Window::Period),
        "day" => return Ok(Window::Day),
        _ => {}
    }
    let sized = |length: &str| -> Result<Duration, String> {
        let length = crate::units::parse_duration(length).map_err(|e| format!("`{s}`: {e}"))?;
        if length < defaults::WINDOW_MIN {
            return Err(format!(
                "`{s}`: a window lasts at least {}",
                format_duration(defaults::WINDOW_MIN)
            ));
        }
        Ok(length)
    };
    if let Some(length) = s.strip_prefix("rolling:") {
        return sized(length).map(Window::Rolling);
    }
    if let Some(length) = s.strip_prefix("tumbling:") {
        return sized(length).map(Window::Tumbling);
    }
    Err(format!(
        "unknown window `{s}`; supported: `lifetime`, `period`, `day`, `rolling:<duration>` (e.g. \"rolling:10m\"), `tumbling:<duration>` (e.g. \"tumbling:1h\")"
    ))
}

/// Windows the measure can be kept over; false when reported.
fn check_window(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    window: &Setting<Window>,
    kind: MeasureKind,
) -> bool {
    let problem = match (kind, window.value) {
        (MeasureKind::Streak, Window::Lifetime) => None,
        (MeasureKind::Streak, _) => Some(
            "measure `streak` counts across instances of `every` and needs window = \"lifetime\""
                .to_owned(),
        ),
        (MeasureKind::Count | MeasureKind::Sum, Window::Rolling(_)) => None,
        (_, Window::Rolling(_)) => Some(format!(
            "a rolling window adds events up, so it works with measure `count` or `sum`, not `{}`",
            kind.name()
        )),
        _ => None,
    };
    match problem {
        Some(problem) => {
            d.error(t.span_of(window), &t.field("window"), problem);
            false
        }
        None => true,
    }
}

#[allow(clippy::too_many_arguments)]
fn read_scope(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    scope: Setting<ScopeKind>,
    group_by: Result<Option<Setting<String>>, Invalid>,
    min_contribution: Result<Option<Setting<f64>>, Invalid>,
    kind: Option<MeasureKind>,
    window: Option<Window>,
    expressions: &mut Vec<Expression>,
) -> Result<Scope, Invalid> {
    let (group_by, min_contribution) = (group_by?, min_contribution?);
    let mut ok = true;
    if scope.value != ScopeKind::Group {
        if let Some(g) = &group_by {
            ok &= not_here(
                d,
                t,
                "group_by",
                g,
                "`group_by` is only used with scope = \"group\"".to_owned(),
            );
        }
    }
    if scope.value == ScopeKind::Customer {
        if let Some(m) = &min_contribution {
            ok &= not_here(
                d,
                t,
                "min_contribution",
                m,
                "`min_contribution` is only used with scope = \"group\" or \"venue\"".to_owned(),
            );
        }
        return if ok {
            Ok(Scope::Customer)
        } else {
            Err(Invalid)
        };
    }
    let scope_name = if scope.value == ScopeKind::Group {
        "group"
    } else {
        "venue"
    };
    if let Some(kind) = kind {
        if !(kind.additive() || kind == MeasureKind::Distinct) {
            d.error(
                t.span_of(&scope),
                &t.field("scope"),
                format!(
                    "scope `{scope_name}` pools the events of many customers: it works with measure `count`, `sum` or `distinct`, not `{}`",
                    kind.name()
                ),
            );
            ok = false;
        }
    }
    if let Some(Window::Rolling(_)) = window {
        d.error(
            t.span_of(&scope),
            &t.field("scope"),
            format!("scope `{scope_name}` needs a window with instances: `lifetime`, `period`, `day` or `tumbling:<duration>`, not a rolling one"),
        );
        ok = false;
    }
    let min = match &min_contribution {
        Some(m) if m.value <= 0.0 => {
            d.error(
                t.span_of(m),
                &t.field("min_contribution"),
                format!("must be greater than 0; got {}", m.value),
            );
            ok = false;
            defaults::MIN_CONTRIBUTION
        }
        Some(m) => m.value,
        None => defaults::MIN_CONTRIBUTION,
    };
    let scope = if scope.value == ScopeKind::Group {
        match group_by {
            None => {
                d.error(
                    t.span_of(&scope),
                    &t.field("group_by"),
                    "scope `group` needs `group_by`, a CEL expression naming the group, e.g. group_by = \"profile.section\"",
                );
                ok = false;
                None
            }
            Some(g) => {
                expression(d, t, "group_by", Some(g), expressions, &mut ok).map(|group_by| {
                    Scope::Group {
                        group_by,
                        min_contribution: min,
                    }
                })
            }
        }
    } else {
        Some(Scope::Venue {
            min_contribution: min,
        })
    };
    match scope {
        Some(scope) if ok => Ok(scope),
        _ => Err(Invalid),
    }
}

/// `limits = { max_value, max_per_customer }`
fn read_limits(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    kind: Option<MeasureKind>,
) -> Result<Limits, Invalid> {
    let max_value = t.opt::<Number>(d, "max_value");
    let max_per_customer = t.opt::<RateKind>(d, "max_per_customer");
    t.finish(d);
    let mut ok = true;
    if let Ok(Some(max)) = &max_value {
        if let Some(kind) = kind.filter(|k| !k.has_value()) {
            ok &= not_here(
                d,
                &t,
                "max_value",
                max,
                format!(
                    "`max_value` bounds an event's `value`: it is only used with measure `sum`, `max` or `min`, not `{}`",
                    kind.name()
                ),
            );
        } else if max.value <= 0.0 {
            ok &= not_here(
                d,
                &t,
                "max_value",
                max,
                format!("must be greater than 0; got {}", max.value),
            );
        }
    }
    if let Ok(Some(rate)) = &max_per_customer {
        ok &= check_rate(d, &t, "max_per_customer", rate);
    }
    let limits = Limits {
        max_value: max_value?.map(|m| m.value),
        max_per_customer: max_per_customer?.map(|r| r.value),
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(limits)
}

/// A rate's count stays within what the engine keeps per customer.
fn check_rate(d: &mut Diags<'_, '_>, t: &Table<'_, '_>, key: &str, rate: &Setting<Rate>) -> bool {
    if rate.value.count <= defaults::RATE_MAX_COUNT {
        return true;
    }
    d.error(
        t.span_of(rate),
        &t.field(key),
        format!(
            "at most {} per span can be tracked; got {}",
            defaults::RATE_MAX_COUNT,
            rate.value.count
        ),
    );
    false
}

/// `referral = { credit, max_per_referrer }`
fn read_referral(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    kind: Option<MeasureKind>,
    shared_scope: bool,
    expressions: &mut Vec<Expression>,
) -> Result<Referral, Invalid> {
    let credit = t.req::<String>(d, "credit");
    let max_per_referrer = t.opt::<RateKind>(d, "max_per_referrer");
    t.finish(d);
    let mut ok = true;
    if let Some(kind) = kind.filter(|k| !k.additive()) {
        d.error(
            t.span(),
            t.path(),
            format!(
                "a referral adds the event to the referrer's progress: it works with measure `count` or `sum`, not `{}`",
                kind.name()
            ),
        );
        ok = false;
    }
    if shared_scope {
        d.error(
            t.span(),
            t.path(),
            "a referral credits one customer: it needs scope = \"customer\"",
        );
        ok = false;
    }
    if let Ok(Some(rate)) = &max_per_referrer {
        ok &= check_rate(d, &t, "max_per_referrer", rate);
    }
    let credit = credit.map(|c| expression(d, &t, "credit", Some(c), expressions, &mut ok));
    let referral = Referral {
        credit: credit?.ok_or(Invalid)?,
        max_per_referrer: max_per_referrer?.map(|r| r.value),
    };
    if !ok {
        return Err(Invalid);
    }
    Ok(referral)
}

/// `sources`: at least one, each non-empty, listed once, `*` only last.
fn check_sources(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    sources: Setting<Vec<Setting<String>>>,
) -> Result<Vec<String>, Invalid> {
    if sources.value.is_empty() {
        return Err(d.error(
            t.span_of(&sources),
            &t.field("sources"),
            "at least one source is needed; leave `sources` out to count events from every source",
        ));
    }
    let mut ok = true;
    for (i, s) in sources.value.iter().enumerate() {
        let problem = if s.value.trim().is_empty() {
            Some("must not be empty".to_owned())
        } else if s.value.find('*').is_some_and(|at| at + 1 != s.value.len()) {
            Some(format!(
                "`{}`: `*` is only allowed at the end (it matches any suffix)",
                s.value
            ))
        } else if sources.value[..i].iter().any(|p| p.value == s.value) {
            Some(format!("source `{}` is listed twice", s.value))
        } else {
            None
        };
        if let Some(problem) = problem {
            d.error(
                t.span_of(s),
                &format!("{}[{i}]", t.field("sources")),
                problem,
            );
            ok = false;
        }
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(sources.value.into_iter().map(|s| s.value).collect())
}

/// Event types (`on` of a rule or a step): at least one, each non-empty,
/// without whitespace and listed once.
fn check_event_types(
    d: &mut Diags<'_, '_>,
    t: &Table<'_, '_>,
    key: &str,
    on: &Setting<Vec<Setting<String>>>,
) -> bool {
    if on.value.is_empty() {
        d.error(
            t.span_of(on),
            &t.field(key),
            "at least one event type is needed, e.g. [\"fan.cheer\"]",
        );
        return false;
    }
    let mut ok = true;
    for (i, ty) in on.value.iter().enumerate() {
        let field = format!("{}[{i}]", t.field(key));
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
    kind: Option<MeasureKind>,
    pool_refs: &mut Vec<(String, String, Range<usize>)>,
) -> Result<Vec<Tier>, Invalid> {
    if tiers.value.is_empty() {
        return Err(d.error(
            rule.span_of(&tiers),
            &rule.field("tiers"),
            "at least one tier is needed, e.g. [ { at = 10, badge = \"bronze\" } ]",
        ));
    }
    let counts = kind.is_some_and(|k| {
        matches!(
            k,
            MeasureKind::Count
                | MeasureKind::Distinct
                | MeasureKind::Streak
                | MeasureKind::Sequence
        )
    });
    let descending = kind == Some(MeasureKind::Min);
    let mut out = Vec::with_capacity(tiers.value.len());
    let mut ok = true;
    let mut previous: Option<f64> = None;
    for mut t in tiers.value {
        let at = t.req::<Number>(d, "at");
        let badge = t.opt::<NonEmpty>(d, "badge");
        let points = read_points(d, &mut t);
        let voucher = t
            .table(d, "voucher")
            .and_then(|v| v.map(|v| read_voucher(d, v, pool_refs)).transpose());
        t.finish(d);

        if let Ok(at) = &at {
            let field = t.field("at");
            let span = t.span_of(at);
            let out_of_order = |prev: f64| {
                if descending {
                    at.value >= prev
                } else {
                    at.value <= prev
                }
            };
            let problem = if at.value <= 0.0 {
                Some(format!("must be greater than 0; got {}", at.value))
            } else if counts && at.value.fract() != 0.0 {
                let name = kind.map_or("?", MeasureKind::name);
                Some(format!(
                    "measure `{name}` reaches whole numbers only; got {}",
                    at.value
                ))
            } else if descending {
                previous.filter(|&prev| out_of_order(prev)).map(|prev| {
                    format!(
                        "measure `min` is reached at or below `at`, so tiers must be in strictly descending order of `at`; {} is not below the previous tier's {prev}",
                        at.value
                    )
                })
            } else {
                previous.filter(|&prev| out_of_order(prev)).map(|prev| {
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
        match (at, badge, points, voucher) {
            (Ok(at), Ok(badge), Ok(points), Ok(voucher)) => out.push(Tier {
                at: at.value,
                badge: badge.map(|b| b.value),
                points,
                voucher,
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

/// `voucher = { pool = "<id>" }` or `voucher = { template = "<text>" }`.
fn read_voucher(
    d: &mut Diags<'_, '_>,
    mut t: Table<'_, '_>,
    pool_refs: &mut Vec<(String, String, Range<usize>)>,
) -> Result<Voucher, Invalid> {
    let pool = t.opt::<Id>(d, "pool");
    let template = t.opt::<NonEmpty>(d, "template");
    t.finish(d);
    match (pool?, template?) {
        (Some(pool), None) => {
            pool_refs.push((pool.value.clone(), t.field("pool"), t.span_of(&pool)));
            Ok(Voucher::Pool(pool.value))
        }
        (None, Some(template)) => match check_template(&template.value) {
            Ok(()) => Ok(Voucher::Template(template.value)),
            Err(e) => Err(d.error(t.span_of(&template), &t.field("template"), e)),
        },
        (Some(_), Some(template)) => Err(d.error(
            t.span_of(&template),
            t.path(),
            "a voucher comes from either a `pool` or a `template`, not both",
        )),
        (None, None) => Err(d.error(
            t.span(),
            t.path(),
            "a voucher needs `pool = \"<voucher_pool id>\"` or `template = \"CODE-{customer}-{n}\"`",
        )),
    }
}

/// Placeholders a voucher template may use.
const TEMPLATE_PLACEHOLDERS: &[&str] = &["customer", "rule", "tier", "n"];

fn check_template(template: &str) -> Result<(), String> {
    if template.len() > defaults::VOUCHER_TEMPLATE_MAX {
        return Err(format!(
            "a template is at most {} bytes; got {}",
            defaults::VOUCHER_TEMPLATE_MAX,
            template.len()
        ));
    }
    let known = || {
        TEMPLATE_PLACEHOLDERS
            .iter()
            .map(|p| format!("{{{p}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        let tail = &rest[at..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err(format!(
                "`{template}`: unmatched `}}`; write `}}}}` for a literal brace"
            ));
        }
        let Some(end) = tail.find('}') else {
            return Err(format!(
                "`{template}`: unclosed `{{`; write `{{{{` for a literal brace"
            ));
        };
        let name = &tail[1..end];
        if !TEMPLATE_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "`{template}`: unknown placeholder `{{{name}}}`; known: {}",
                known()
            ));
        }
        rest = &tail[end + 1..];
    }
    Ok(())
}

/// `[[voucher_pool]]` tables: ids unique in the file, `codes` resolved
/// against the rule file's folder.
fn read_pools(
    d: &mut Diags<'_, '_>,
    tables: Vec<Table<'_, '_>>,
    file: &Path,
) -> Result<Vec<LocatedPool>, Invalid> {
    let base = paths::base_of(file);
    let mut out: Vec<LocatedPool> = Vec::new();
    let mut ok = true;
    for (index, mut t) in tables.into_iter().enumerate() {
        let id = t.req::<Id>(d, "id");
        let codes = t.req::<NonEmpty>(d, "codes");
        t.finish(d);
        let (Ok(id), Ok(codes)) = (id, codes) else {
            ok = false;
            continue;
        };
        let line = d.source().position(t.span().start).0;
        let (id_line, id_column) = d.source().position(t.span_of(&id).start);
        if let Some(first) = out.iter().find(|p| p.pool.id == id.value) {
            d.error(
                t.span_of(&id),
                &t.field("id"),
                format!(
                    "duplicate voucher pool id `{}`: already used by the pool at line {}",
                    id.value, first.pool.line
                ),
            );
            ok = false;
            continue;
        }
        let (codes_line, codes_column) = d.source().position(t.span_of(&codes).start);
        out.push(LocatedPool {
            pool: VoucherPool {
                id: id.value,
                codes: paths::resolve(&base, Path::new(&codes.value)),
                file: file.to_path_buf(),
                line,
            },
            index,
            id_line,
            id_column,
            codes_line,
            codes_column,
        });
    }
    if !ok {
        return Err(Invalid);
    }
    Ok(out)
}

/// Compiles every collected expression on one compile thread; false when
/// any failed.
fn check_expressions(d: &mut Diags<'_, '_>, expressions: Vec<Expression>) -> bool {
    let results = cel_check::check_all(expressions.iter().map(|e| e.text.clone()).collect());
    let mut ok = true;
    for (e, result) in expressions.iter().zip(results) {
        if let Err(problem) = result {
            report_cel(d, &e.span, &e.field, &e.text, problem);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("lifetime"), Ok(Window::Lifetime));
        assert_eq!(parse_window("period"), Ok(Window::Period));
        assert_eq!(parse_window("day"), Ok(Window::Day));
        assert_eq!(
            parse_window("rolling:10m"),
            Ok(Window::Rolling(Duration::from_secs(600)))
        );
        assert_eq!(
            parse_window("tumbling:1h"),
            Ok(Window::Tumbling(Duration::from_secs(3600)))
        );
        for (bad, needle) in [
            ("weekly", "unknown window `weekly`"),
            ("rolling:", "does not start with a number"),
            ("rolling:500ms", "at least 1s"),
            ("tumbling:10", "has no unit"),
        ] {
            let err = parse_window(bad).expect_err(bad);
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn templates() {
        for ok in [
            "CHEER-{customer}-{n}",
            "X{rule}/{tier}",
            "{{literal}}",
            "PLAIN",
        ] {
            assert_eq!(check_template(ok), Ok(()), "{ok}");
        }
        for (bad, needle) in [
            ("A-{who}", "unknown placeholder `{who}`"),
            ("A-{n", "unclosed `{`"),
            ("A-}", "unmatched `}`"),
        ] {
            let err = check_template(bad).expect_err(bad);
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let long = "x".repeat(defaults::VOUCHER_TEMPLATE_MAX + 1);
        assert!(check_template(&long).is_err());
    }
}
