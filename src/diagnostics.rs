//! Diagnostics for operator-written files: every error at once, each with file,
//! line, column and a hint.
//!
//! serde stops at the first error. [`deserialize_collecting`] gets all of them:
//! it deserializes, records the error, blanks the offending key-value pair in a
//! copy of the text (spaces, so every byte offset stays valid) and tries again,
//! until the text deserializes or nothing more can be blanked. Semantic checks
//! (references to fields, models and files) then add their own diagnostics to
//! the same list through [`Diagnostics::error_at`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place in the file.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )?;
        } else {
            write!(f, "{}: error: {}", self.file.display(), self.message)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every diagnostic found in one validation pass.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostics {
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.errors.extend(other.errors);
    }

    /// An error at a byte span of `source` (the text of `file`).
    pub fn error_at(
        &mut self,
        source: &SourceText,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let (line, column) = source.line_column(span.start);
        self.errors.push(Diagnostic {
            file: source.path.clone(),
            line,
            column,
            message: message.into(),
            hint,
        });
    }

    /// An error with no place in a file (a missing file, an environment variable).
    pub fn error(&mut self, file: &Path, message: impl Into<String>, hint: Option<String>) {
        self.errors.push(Diagnostic {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
            hint,
        });
    }

    pub fn into_result<T>(self, value: T) -> Result<T, Diagnostics> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// A file's path and text, for turning byte offsets into lines and columns.
#[derive(Debug, Clone)]
pub struct SourceText {
    pub path: PathBuf,
    pub text: String,
}

impl SourceText {
    pub fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        (line, before[line_start..].chars().count() + 1)
    }
}

/// Deserializes `source` into `T`, collecting every serde error (unknown keys,
/// wrong types, missing fields) instead of stopping at the first.
pub fn deserialize_collecting<T: DeserializeOwned>(source: &SourceText) -> Result<T, Diagnostics> {
    match deserialize_recovering(source) {
        (Some(value), diagnostics) if diagnostics.is_empty() => Ok(value),
        (_, diagnostics) => Err(diagnostics),
    }
}

/// Like [`deserialize_collecting`], but also returns the value deserialized
/// from the text with the offending pairs blanked, when there is one, so that
/// later checks (references, files) can report their errors in the same pass.
pub fn deserialize_recovering<T: DeserializeOwned>(
    source: &SourceText,
) -> (Option<T>, Diagnostics) {
    let mut diagnostics = Diagnostics::default();
    let (_, syntax_errors) = DeTable::parse_recoverable(&source.text);
    if !syntax_errors.is_empty() {
        for error in syntax_errors {
            let span = error.span().unwrap_or(0..0);
            diagnostics.error_at(
                source,
                span,
                first_line(error.message()),
                Some("this is not valid TOML".into()),
            );
        }
        return (None, diagnostics);
    }
    let mut working = source.text.clone();
    let mut blanked_keys: Vec<String> = Vec::new();
    for _ in 0..100 {
        match toml::from_str::<T>(&working) {
            Ok(value) => return (Some(value), diagnostics),
            Err(error) => {
                let message = first_line(error.message());
                let span = error.span();
                let located = span
                    .clone()
                    .and_then(|span| key_value_containing(&working, span));
                // a missing field that we blanked ourselves is a consequence, not a new error
                let consequence = blanked_keys
                    .iter()
                    .any(|key| message == format!("missing field `{key}`"));
                if !consequence {
                    let message = match &located {
                        Some((_, key)) if !message.contains(&format!("`{key}`")) => {
                            format!("`{key}`: {message}")
                        }
                        _ => message.clone(),
                    };
                    diagnostics.error_at(
                        source,
                        span.clone().unwrap_or(0..0),
                        message.clone(),
                        hint_for(&first_line(error.message())),
                    );
                }
                let Some((range, key)) = located else { break };
                let blanked: String = working[range.clone()]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' })
                    .collect();
                working.replace_range(range, &blanked);
                blanked_keys.push(key);
            }
        }
    }
    (None, diagnostics)
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or("").trim().to_string()
}

fn hint_for(message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest.split_once("expected ").map(|(_, e)| e.to_string());
        return Some(match expected {
            Some(expected) => format!("remove it or correct its spelling; expected {expected}"),
            None => "remove it or correct its spelling".into(),
        });
    }
    if message.starts_with("invalid type") {
        return Some("check the value's type against the reference in README.md".into());
    }
    if message.starts_with("missing field") {
        return Some("add it; the reference in README.md lists the required keys".into());
    }
    if message.starts_with("unknown variant") {
        return Some("use one of the values the message lists".into());
    }
    None
}

/// The innermost `key = value` pair whose key or value contains `span`: its
/// byte range and its key.
fn key_value_containing(text: &str, span: Range<usize>) -> Option<(Range<usize>, String)> {
    let table = DeTable::parse(text).ok()?;
    let mut best: Option<(Range<usize>, String)> = None;
    find_in_table(table.get_ref(), &span, &mut best);
    best
}

fn find_in_table(
    table: &DeTable<'_>,
    span: &Range<usize>,
    best: &mut Option<(Range<usize>, String)>,
) {
    for (key, value) in table.iter() {
        find_in_pair(key, value, span, best);
    }
}

fn find_in_pair(
    key: &Spanned<std::borrow::Cow<'_, str>>,
    value: &Spanned<DeValue<'_>>,
    span: &Range<usize>,
    best: &mut Option<(Range<usize>, String)>,
) {
    let key_span = key.span();
    let value_span = value.span();
    let whole = key_span.start.min(value_span.start)..key_span.end.max(value_span.end);
    let contains = |r: &Range<usize>| r.start <= span.start && span.end <= r.end.max(r.start + 1);
    // [table] headers and [[array]] items span the whole table; only a pair written
    // as `key = value` on its own can be blanked without blanking unrelated keys
    let inline_pair = key_span.end <= value_span.start && value_span.start - key_span.end < 16;
    if inline_pair && (contains(&key_span) || contains(&value_span)) {
        let narrower = best
            .as_ref()
            .map(|(r, _)| whole.len() < r.len())
            .unwrap_or(true);
        if narrower {
            *best = Some((whole.clone(), key.get_ref().to_string()));
        }
    }
    match value.get_ref() {
        DeValue::Table(inner) => find_in_table(inner, span, best),
        DeValue::Array(items) => {
            for item in items.iter() {
                if let DeValue::Table(inner) = item.get_ref() {
                    find_in_table(inner, span, best);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
        #[serde(default)]
        size: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        title: String,
        #[serde(default)]
        item: Vec<Inner>,
    }

    fn source(text: &str) -> SourceText {
        SourceText {
            path: "t.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn three_mistakes_give_three_errors_with_lines() {
        let text = "title = \"x\"\ncolour = 1\n[[item]]\nname = \"a\"\nsize = \"big\"\n[[item]]\nnmae = \"b\"\nname = \"c\"\n";
        let errors = deserialize_collecting::<Outer>(&source(text)).unwrap_err();
        let lines: Vec<usize> = errors.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 5, 7], "{errors}");
        assert!(
            errors.errors[0].message.contains("unknown field `colour`"),
            "{errors}"
        );
        assert!(
            errors.errors[1].message.contains("invalid type"),
            "{errors}"
        );
    }

    #[test]
    fn a_valid_file_deserializes() {
        let outer =
            deserialize_collecting::<Outer>(&source("title = \"x\"\n[[item]]\nname = \"a\"\n"))
                .unwrap();
        assert_eq!(outer.item.len(), 1);
    }

    #[test]
    fn syntax_errors_are_located() {
        let errors =
            deserialize_collecting::<Outer>(&source("title = \"x\"\nbroken = \n")).unwrap_err();
        assert_eq!(errors.errors[0].line, 2, "{errors}");
    }
}
