//! Errors that point at the spot in a file an operator has to fix.
//!
//! Every problem found in a config or rule file becomes a [`Diagnostic`]
//! naming the file, the 1-based line and column and the dotted field path.
//! Parsing collects all of them before giving up, so one `touchline check`
//! run shows everything that is wrong instead of one error per attempt.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::paths;

/// One problem in a config or rule file.
///
/// Displays as `{file}:{line}:{column}: {field}: {message}`, the shape
/// editors and terminals turn into a link. `field` is the dotted path of
/// the value (`ingest.mqtt.url`, `achievement[2].tiers[1].at`; array
/// indexes count from 0). Problems with a whole file (unreadable, not
/// UTF-8) name field `file` at line 1, column 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {field}: {message}", file.display())]
pub struct Diagnostic {
    /// The file as the operator knows it: relative to the working
    /// directory when it lies below it, else absolute.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    pub field: String,
    pub message: String,
}

/// Everything wrong with a config or rule set, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl ConfigErrors {
    /// A single problem with a whole file (it cannot be read, for example).
    pub(crate) fn file(path: &Path, message: impl Into<String>) -> ConfigErrors {
        ConfigErrors(vec![Diagnostic {
            file: paths::shown(path),
            line: 1,
            column: 1,
            field: "file".to_owned(),
            message: message.into(),
        }])
    }
}

impl fmt::Display for ConfigErrors {
    /// One diagnostic per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The text of one file, able to turn byte offsets into line and column.
pub(crate) struct Source<'a> {
    /// As shown in diagnostics.
    shown: PathBuf,
    text: &'a str,
    /// Byte offset of the start of every line.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub(crate) fn new(path: &Path, text: &'a str) -> Source<'a> {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            shown: paths::shown(path),
            text,
            line_starts,
        }
    }

    pub(crate) fn text(&self) -> &'a str {
        self.text
    }

    /// 1-based (line, column) of a byte offset; the column counts
    /// characters so it matches what editors show.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let column = self.text[start..offset].chars().count() + 1;
        (line, column)
    }
}

/// Marks a value whose problem was already reported: callers stop
/// building on it but keep checking the rest of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

/// Collects the diagnostics of one file.
pub(crate) struct Diags<'s, 'a> {
    src: &'s Source<'a>,
    found: Vec<Diagnostic>,
}

impl<'s, 'a> Diags<'s, 'a> {
    pub(crate) fn new(src: &'s Source<'a>) -> Diags<'s, 'a> {
        Diags {
            src,
            found: Vec::new(),
        }
    }

    pub(crate) fn source(&self) -> &'s Source<'a> {
        self.src
    }

    /// Records a problem with the value at `span`; returns [`Invalid`] so
    /// callers can `return Err(d.error(..))`.
    pub(crate) fn error(
        &mut self,
        span: Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> Invalid {
        self.error_at_offset(span.start, field, message)
    }

    pub(crate) fn error_at_offset(
        &mut self,
        offset: usize,
        field: &str,
        message: impl Into<String>,
    ) -> Invalid {
        let (line, column) = self.src.position(offset);
        self.found.push(Diagnostic {
            file: self.src.shown.clone(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
        Invalid
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Reports every item whose id an earlier item of the file already
    /// used; `items` are (id, line of the item, span and field of its
    /// id), `what` names them (`"rule"`, `"offer"`). False if any was.
    pub(crate) fn unique_ids<'i>(
        &mut self,
        what: &str,
        items: impl IntoIterator<Item = (&'i str, usize, Range<usize>, &'i str)>,
    ) -> bool {
        let mut seen: Vec<(&str, usize)> = Vec::new();
        let mut ok = true;
        for (id, line, span, field) in items {
            match seen.iter().find(|(s, _)| *s == id) {
                Some(&(_, first)) => {
                    self.error(
                        span,
                        field,
                        format!("duplicate {what} id `{id}`: already used by the {what} at line {first}"),
                    );
                    ok = false;
                }
                None => seen.push((id, line)),
            }
        }
        ok
    }

    /// The outcome of reading a file: the value when nothing was found
    /// wrong, else every diagnostic.
    pub(crate) fn conclude<T>(self, result: Result<T, Invalid>) -> Result<T, ConfigErrors> {
        match result {
            Ok(value) if self.is_empty() => Ok(value),
            _ => {
                let file = self.src.shown.clone();
                let mut found = self.into_sorted();
                if found.is_empty() {
                    // Every `Invalid` comes from a reported error; this
                    // only guards against a reader forgetting to report.
                    found.push(Diagnostic {
                        file,
                        line: 1,
                        column: 1,
                        field: "file".to_owned(),
                        message: "invalid".to_owned(),
                    });
                }
                Err(ConfigErrors(found))
            }
        }
    }

    /// The diagnostics in file order (stable: problems at one spot keep
    /// the order they were found in).
    pub(crate) fn into_sorted(self) -> Vec<Diagnostic> {
        let mut found = self.found;
        found.sort_by_key(|d| (d.line, d.column));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let src = Source::new(Path::new("/x/a.toml"), "ab\nçé = 1\n\nz");
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(2), (1, 3));
        assert_eq!(src.position(3), (2, 1));
        // "çé" is four bytes, two characters: offset 7 is the space.
        assert_eq!(src.position(7), (2, 3));
        assert_eq!(src.position(12), (3, 1));
        assert_eq!(src.position(13), (4, 1));
        // Past the end clamps to the end; inside a character rounds down.
        assert_eq!(src.position(999), (4, 2));
        assert_eq!(src.position(4), (2, 1));
    }

    #[test]
    fn display_is_one_line_per_diagnostic() {
        let d = |line| Diagnostic {
            file: PathBuf::from("/etc/touchline/site.toml"),
            line,
            column: 7,
            field: "site.id".to_owned(),
            message: "bad".to_owned(),
        };
        let errors = ConfigErrors(vec![d(1), d(2)]);
        assert_eq!(
            errors.to_string(),
            "/etc/touchline/site.toml:1:7: site.id: bad\n/etc/touchline/site.toml:2:7: site.id: bad"
        );
    }
}
