//! Typed reading of a parsed TOML document, keeping every value's place.
//!
//! Config and rule files are walked table by table over the parser's
//! spanned tree instead of going through serde derives: serde stops at the
//! first problem and loses the field path, while an operator wants every
//! problem at once with its line and field. A [`Table`] remembers which keys
//! were asked for, so whatever is left over is reported as unknown; a
//! [`Kind`] turns one TOML value into a typed one or reports why it can't.
//! New config sections and rule fields are one more `t.or::<Kind>(..)` line.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use crate::diagnostic::{Diags, Invalid};
use crate::units;

/// A value in the tree, with its byte span in the file.
pub(crate) type Node<'i> = Spanned<DeValue<'i>>;

/// A typed value and where it was written; `span` is `None` when the key
/// was absent and the default applies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Setting<T> {
    pub value: T,
    pub span: Option<Range<usize>>,
}

impl<T> Setting<T> {
    pub(crate) fn written(value: T, span: Range<usize>) -> Setting<T> {
        Setting {
            value,
            span: Some(span),
        }
    }

    pub(crate) fn defaulted(value: T) -> Setting<T> {
        Setting { value, span: None }
    }
}

/// One TOML table being read, with the dotted path used in messages.
pub(crate) struct Table<'t, 'i> {
    path: String,
    span: Range<usize>,
    entries: &'t DeTable<'i>,
    known: Vec<&'static str>,
    /// Keys are data (a `points` map), so none is unknown.
    open: bool,
}

impl<'t, 'i> Table<'t, 'i> {
    /// The document itself.
    pub(crate) fn root(doc: &'t Spanned<DeTable<'i>>) -> Table<'t, 'i> {
        Table {
            path: String::new(),
            span: doc.span(),
            entries: doc.get_ref(),
            known: Vec::new(),
            open: false,
        }
    }

    /// A section the file leaves out, read as empty so every default
    /// applies; errors about it point at `span` (the parent table).
    pub(crate) fn absent(
        path: String,
        span: Range<usize>,
        empty: &'t DeTable<'i>,
    ) -> Table<'t, 'i> {
        Table {
            path,
            span,
            entries: empty,
            known: Vec::new(),
            open: false,
        }
    }

    /// `node` as a table at `path`, or a type error.
    pub(crate) fn of(
        d: &mut Diags<'_, '_>,
        path: String,
        node: &'t Node<'i>,
    ) -> Result<Table<'t, 'i>, Invalid> {
        match node.get_ref() {
            DeValue::Table(entries) => Ok(Table {
                path,
                span: node.span(),
                entries,
                known: Vec::new(),
                open: false,
            }),
            other => Err(d.error(
                node.span(),
                &path,
                format!("expected a table, found {}", other.type_str()),
            )),
        }
    }

    /// Where the table starts: its header, or its opening brace.
    pub(crate) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// The dotted path of the table itself.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The dotted path of `key` in this table.
    pub(crate) fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Where an error about `setting` goes: the value when it was written,
    /// else the table (the default was taken from there).
    pub(crate) fn span_of<T>(&self, setting: &Setting<T>) -> Range<usize> {
        setting.span.clone().unwrap_or_else(|| self.span())
    }

    fn take(&mut self, key: &'static str) -> Option<&'t Node<'i>> {
        self.known.push(key);
        self.entries.get(key)
    }

    /// An optional key without default.
    pub(crate) fn opt<K: Kind>(
        &mut self,
        d: &mut Diags<'_, '_>,
        key: &'static str,
    ) -> Result<Option<Setting<K::Out>>, Invalid> {
        let Some(node) = self.take(key) else {
            return Ok(None);
        };
        let value = K::read(d, &self.field(key), node)?;
        Ok(Some(Setting::written(value, node.span())))
    }

    /// An optional key with a default.
    pub(crate) fn or<K: Kind>(
        &mut self,
        d: &mut Diags<'_, '_>,
        key: &'static str,
        default: K::Out,
    ) -> Result<Setting<K::Out>, Invalid> {
        Ok(self
            .opt::<K>(d, key)?
            .unwrap_or_else(|| Setting::defaulted(default)))
    }

    /// A required key.
    pub(crate) fn req<K: Kind>(
        &mut self,
        d: &mut Diags<'_, '_>,
        key: &'static str,
    ) -> Result<Setting<K::Out>, Invalid> {
        match self.opt::<K>(d, key)? {
            Some(setting) => Ok(setting),
            None => Err(self.missing(d, key)),
        }
    }

    /// Reports `key` as missing.
    pub(crate) fn missing(&self, d: &mut Diags<'_, '_>, key: &str) -> Invalid {
        let place = if self.path.is_empty() {
            "the file".to_owned()
        } else {
            format!("[{}]", self.path)
        };
        d.error(
            self.span(),
            &self.field(key),
            format!("required key is missing; add `{key} = ...` to {place}"),
        )
    }

    /// A string key that must be one of `choices`; `default` `None` makes
    /// it required.
    pub(crate) fn choice<T: Clone>(
        &mut self,
        d: &mut Diags<'_, '_>,
        key: &'static str,
        what: &str,
        choices: &[(&str, T)],
        default: Option<T>,
    ) -> Result<Setting<T>, Invalid> {
        let written = match default {
            Some(default) => match self.opt::<String>(d, key)? {
                Some(written) => written,
                None => return Ok(Setting::defaulted(default)),
            },
            None => self.req::<String>(d, key)?,
        };
        match choices.iter().find(|(name, _)| *name == written.value) {
            Some((_, value)) => Ok(Setting {
                value: value.clone(),
                span: written.span,
            }),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
                Err(d.error(
                    self.span_of(&written),
                    &self.field(key),
                    format!(
                        "unknown {what} `{}`; supported: {}",
                        written.value,
                        names.join(", ")
                    ),
                ))
            }
        }
    }

    /// A sub-table, `None` when absent.
    pub(crate) fn table(
        &mut self,
        d: &mut Diags<'_, '_>,
        key: &'static str,
    ) -> Result<Option<Table<'t, 'i>>, Invalid> {
        match self.take(key) {
            Some(node) => Table::of(d, self.field(key), node).map(Some),
            None => Ok(None),
        }
    }

    /// An array of tables (`[[key]]` or `key = [{..}, {..}]`), `None`
    /// when absent. Elements that are not tables are reported and skipped.
    pub(crate) fn tables(
        &mut self,
        d: &mut Diags<'_, '_>,
        key: &'static str,
    ) -> Result<Option<Setting<Vec<Table<'t, 'i>>>>, Invalid> {
        let Some(node) = self.take(key) else {
            return Ok(None);
        };
        let field = self.field(key);
        let DeValue::Array(items) = node.get_ref() else {
            return Err(d.error(
                node.span(),
                &field,
                format!(
                    "expected an array of tables ([[{key}]]), found {}",
                    node.get_ref().type_str()
                ),
            ));
        };
        let mut tables = Vec::with_capacity(items.len());
        let mut invalid = false;
        for (i, item) in items.iter().enumerate() {
            match Table::of(d, format!("{field}[{i}]"), item) {
                Ok(t) => tables.push(t),
                Err(Invalid) => invalid = true,
            }
        }
        if invalid {
            return Err(Invalid);
        }
        Ok(Some(Setting::written(tables, node.span())))
    }

    /// All entries, for tables whose keys are data; none of them counts
    /// as unknown.
    pub(crate) fn entries(
        &mut self,
    ) -> impl Iterator<Item = (&'t Spanned<DeString<'i>>, &'t Node<'i>)> + 't {
        self.open = true;
        self.entries.iter()
    }

    /// Reports every key nobody asked for (call after reading all keys).
    pub(crate) fn finish(&mut self, d: &mut Diags<'_, '_>) {
        if self.open {
            return;
        }
        for (key, _) in self.entries.iter() {
            let name: &str = key.get_ref();
            if !self.known.contains(&name) {
                let place = if self.path.is_empty() {
                    "at the top level".to_owned()
                } else {
                    format!("in [{}]", self.path)
                };
                d.error(
                    key.span(),
                    &self.field(name),
                    format!(
                        "unknown key `{name}` {place}; expected one of: {}",
                        self.known.join(", ")
                    ),
                );
            }
        }
    }
}

/// A kind of value a key can hold, and how to read it.
pub(crate) trait Kind {
    type Out;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<Self::Out, Invalid>;
}

fn wrong_type(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>, expected: &str) -> Invalid {
    d.error(
        node.span(),
        field,
        format!("expected {expected}, found {}", node.get_ref().type_str()),
    )
}

fn integer(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<i64, Invalid> {
    match node.get_ref() {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map_err(|_| d.error(node.span(), field, "integer out of range")),
        _ => Err(wrong_type(d, field, node, "an integer")),
    }
}

impl Kind for String {
    type Out = String;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<String, Invalid> {
        match node.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            _ => Err(wrong_type(d, field, node, "a string")),
        }
    }
}

/// A string that must not be empty.
pub(crate) struct NonEmpty;

impl Kind for NonEmpty {
    type Out = String;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<String, Invalid> {
        let s = String::read(d, field, node)?;
        if s.trim().is_empty() {
            return Err(d.error(node.span(), field, "must not be empty"));
        }
        Ok(s)
    }
}

impl Kind for bool {
    type Out = bool;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<bool, Invalid> {
        match node.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(wrong_type(d, field, node, "true or false")),
        }
    }
}

impl Kind for i64 {
    type Out = i64;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<i64, Invalid> {
        integer(d, field, node)
    }
}

macro_rules! unsigned_kind {
    ($($t:ty),*) => {$(
        impl Kind for $t {
            type Out = $t;
            fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<$t, Invalid> {
                let i = integer(d, field, node)?;
                <$t>::try_from(i).map_err(|_| {
                    d.error(
                        node.span(),
                        field,
                        format!("{i} is out of range; expected 0 to {}", <$t>::MAX),
                    )
                })
            }
        }
    )*};
}

unsigned_kind!(u16, u32, usize);

/// An identifier: `[A-Za-z0-9._-]{1,64}`, safe in file names, metric
/// labels and record fields.
pub(crate) struct Id;

/// Longest [`Id`].
pub(crate) const ID_MAX_LEN: usize = 64;

impl Kind for Id {
    type Out = String;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<String, Invalid> {
        let s = String::read(d, field, node)?;
        if let Err(e) = check_id(&s) {
            return Err(d.error(node.span(), field, e));
        }
        Ok(s)
    }
}

pub(crate) fn check_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > ID_MAX_LEN {
        return Err(format!("`{s}` is longer than {ID_MAX_LEN} characters"));
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{s}` contains {bad:?}; use only letters A-Z a-z, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// A number (integer or float), finite.
pub(crate) struct Number;

impl Kind for Number {
    type Out = f64;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<f64, Invalid> {
        let value = match node.get_ref() {
            DeValue::Integer(_) => integer(d, field, node)? as f64,
            DeValue::Float(f) => f.as_str().parse::<f64>().unwrap_or(f64::NAN),
            _ => return Err(wrong_type(d, field, node, "a number")),
        };
        if !value.is_finite() {
            return Err(d.error(node.span(), field, "must be a finite number"));
        }
        Ok(value)
    }
}

/// A size in bytes, greater than zero: `"64KiB"` or a plain integer.
pub(crate) struct Size;

impl Kind for Size {
    type Out = u64;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<u64, Invalid> {
        let bytes = match node.get_ref() {
            DeValue::Integer(_) => {
                let i = integer(d, field, node)?;
                u64::try_from(i).map_err(|_| d.error(node.span(), field, "must not be negative"))?
            }
            DeValue::String(s) => {
                units::parse_size(s).map_err(|e| d.error(node.span(), field, e))?
            }
            _ => {
                return Err(wrong_type(
                    d,
                    field,
                    node,
                    "a size such as \"64KiB\" or a number of bytes",
                ))
            }
        };
        if bytes == 0 {
            return Err(d.error(node.span(), field, "must be greater than zero"));
        }
        Ok(bytes)
    }
}

/// A duration such as `"30s"`; zero is allowed here, callers that need
/// a positive one check.
pub(crate) struct Dur;

impl Kind for Dur {
    type Out = Duration;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<Duration, Invalid> {
        match node.get_ref() {
            DeValue::String(s) => {
                units::parse_duration(s).map_err(|e| d.error(node.span(), field, e))
            }
            DeValue::Integer(i) => Err(d.error(
                node.span(),
                field,
                format!(
                    "a duration needs a unit: write \"{}s\" or \"{}ms\" (units: ms, s, m, h, d)",
                    i.as_str(),
                    i.as_str()
                ),
            )),
            _ => Err(wrong_type(d, field, node, "a duration such as \"30s\"")),
        }
    }
}

/// A duration greater than zero.
pub(crate) struct PositiveDur;

impl Kind for PositiveDur {
    type Out = Duration;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<Duration, Invalid> {
        let value = Dur::read(d, field, node)?;
        if value.is_zero() {
            return Err(d.error(node.span(), field, "must be greater than zero"));
        }
        Ok(value)
    }
}

impl Kind for SocketAddr {
    type Out = SocketAddr;
    fn read(d: &mut Diags<'_, '_>, field: &str, node: &Node<'_>) -> Result<SocketAddr, Invalid> {
        let s = String::read(d, field, node)?;
        s.parse().map_err(|_| {
            d.error(
                node.span(),
                field,
                format!(
                    "`{s}` is not a socket address; write IP:port, e.g. \"127.0.0.1:8088\" or \"[::1]:8088\""
                ),
            )
        })
    }
}

/// An array of strings, each with its place (for per-element checks).
/// Elements that are not strings are reported and skipped.
pub(crate) struct StrList;

impl Kind for StrList {
    type Out = Vec<Setting<String>>;
    fn read(
        d: &mut Diags<'_, '_>,
        field: &str,
        node: &Node<'_>,
    ) -> Result<Vec<Setting<String>>, Invalid> {
        let DeValue::Array(items) = node.get_ref() else {
            return Err(wrong_type(d, field, node, "an array of strings"));
        };
        let mut out = Vec::with_capacity(items.len());
        let mut invalid = false;
        for (i, item) in items.iter().enumerate() {
            match String::read(d, &format!("{field}[{i}]"), item) {
                Ok(s) => out.push(Setting::written(s, item.span())),
                Err(Invalid) => invalid = true,
            }
        }
        if invalid {
            return Err(Invalid);
        }
        Ok(out)
    }
}

/// Parses `d`'s source as a TOML document. Syntax errors are all
/// reported (the parser recovers where it can), and then nothing else is
/// checked: a half-parsed file would only produce confusing follow-ups.
pub(crate) fn parse<'a>(d: &mut Diags<'_, 'a>) -> Result<Spanned<DeTable<'a>>, Invalid> {
    let (doc, errors) = DeTable::parse_recoverable(d.source().text());
    if errors.is_empty() {
        return Ok(doc);
    }
    let text = d.source().text();
    for e in errors {
        let span = e.span().unwrap_or(0..0);
        let field = path_at(&doc, span.start)
            .or_else(|| rejected_key_path(text, span.clone()))
            .unwrap_or_else(|| "syntax".to_owned());
        d.error_at_offset(span.start, &field, format!("invalid TOML: {}", e.message()));
    }
    Err(Invalid)
}

/// The path of a key the parser rejected (a key or table defined twice):
/// the table header above it plus the key. Found from the text because
/// the rejected key is not in the recovered tree.
fn rejected_key_path(text: &str, span: Range<usize>) -> Option<String> {
    let key = text.get(span.clone())?.trim();
    let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if key.is_empty() || !key.chars().all(bare) {
        return None;
    }
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[span.start..]
        .find('\n')
        .map_or(text.len(), |i| span.start + i);
    let lines_before = text[..line_start].lines();
    // The error is in a table header itself.
    if let Some(header) = header_path(&text[line_start..line_end], lines_before.clone()) {
        return Some(header);
    }
    let mut before: Vec<&str> = lines_before.collect();
    while let Some(line) = before.pop() {
        if let Some(table) = header_path(line, before.iter().copied()) {
            return Some(format!("{table}.{key}"));
        }
    }
    Some(key.to_owned())
}

/// The dotted path a `[table]` or `[[array]]` header line names, with the
/// index of an array element counted from the `earlier` lines.
fn header_path<'l>(line: &str, earlier: impl Iterator<Item = &'l str>) -> Option<String> {
    let name = |line: &str| -> Option<(bool, String)> {
        let line = line.trim_start();
        let (array, rest) = match line.strip_prefix("[[") {
            Some(rest) => (true, rest),
            None => (false, line.strip_prefix('[')?),
        };
        let inner = &rest[..rest.find(']')?];
        let parts: Vec<&str> = inner
            .split('.')
            .map(|p| p.trim().trim_matches(['"', '\'']))
            .collect();
        Some((array, parts.join(".")))
    };
    let (array, path) = name(line)?;
    if !array {
        return Some(path);
    }
    let index = earlier
        .filter(|l| name(l).is_some_and(|(a, p)| a && p == path))
        .count();
    Some(format!("{path}[{index}]"))
}

/// The dotted path of the innermost key whose value contains `offset`,
/// for syntax errors that happen inside a value.
pub(crate) fn path_at(doc: &Spanned<DeTable<'_>>, offset: usize) -> Option<String> {
    fn walk(entries: &DeTable<'_>, prefix: &str, offset: usize) -> Option<String> {
        for (key, node) in entries.iter() {
            let here = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            if let Some(found) = walk_node(node, &here, offset) {
                return Some(found);
            }
        }
        None
    }
    fn walk_node(node: &Node<'_>, here: &str, offset: usize) -> Option<String> {
        match node.get_ref() {
            DeValue::Table(t) => walk(t, here, offset),
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk_node(item, &format!("{here}[{i}]"), offset)),
            _ => {
                let span = node.span();
                (span.start <= offset && offset <= span.end).then(|| here.to_owned())
            }
        }
    }
    walk(doc.get_ref(), "", offset)
}
