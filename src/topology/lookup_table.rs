//! Reference tables for `[[lookup]]`: a CSV file with a header row, read once
//! at start into a map from key to value.
//!
//! # Format
//! Comma-separated, one record per line, fields optionally in double quotes
//! (a doubled quote inside is a quote). Keys are compared as written, after
//! trimming spaces. A duplicate key is an error: the table must say one thing.

use rustc_hash::FxHashMap;
use std::path::Path;

use crate::record::Value;

/// Splits one CSV line into fields.
pub fn split_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                current.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if current.trim().is_empty() => {
                current.clear();
                quoted = true;
            }
            (',', false) => fields.push(std::mem::take(&mut current).trim().to_string()),
            (c, _) => current.push(c),
        }
    }
    fields.push(current.trim().to_string());
    fields
}

/// Reads `path` and maps `key_column` to `value_column`.
pub fn load(
    path: &Path,
    key_column: &str,
    value_column: &str,
    numeric: bool,
) -> Result<FxHashMap<String, Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(format!("{} is empty", path.display()));
    };
    let header = split_line(header);
    let column = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            format!(
                "{} has no column `{name}` (columns: {})",
                path.display(),
                header.join(", ")
            )
        })
    };
    let key_at = column(key_column)?;
    let value_at = column(value_column)?;
    let mut table = FxHashMap::default();
    for (line_index, line) in lines {
        let row = split_line(line);
        let line_number = line_index + 1;
        let (Some(key), Some(value)) = (row.get(key_at), row.get(value_at)) else {
            return Err(format!(
                "{}:{line_number}: {} fields, the header has {}",
                path.display(),
                row.len(),
                header.len()
            ));
        };
        let value = if numeric {
            match value.parse::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => Value::Num(value.parse::<f64>().map_err(|_| {
                    format!(
                        "{}:{line_number}: `{value}` is not a number",
                        path.display()
                    )
                })?),
            }
        } else {
            Value::Str(value.as_str().into())
        };
        if table.insert(key.clone(), value).is_some() {
            return Err(format!(
                "{}:{line_number}: key `{key}` appears twice",
                path.display()
            ));
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_and_escaped_quotes_split() {
        assert_eq!(
            split_line("a, \"b, c\" ,\"say \"\"hi\"\"\""),
            vec!["a", "b, c", "say \"hi\""]
        );
        assert_eq!(split_line(""), vec![""]);
    }

    #[test]
    fn duplicate_keys_and_missing_columns_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "state,region\nca,west\nny,northeast\n").unwrap();
        let table = load(&path, "state", "region", false).unwrap();
        assert_eq!(table["ca"], Value::Str("west".into()));
        assert!(
            load(&path, "state", "zone", false)
                .unwrap_err()
                .contains("no column `zone`")
        );
        assert!(
            load(&path, "state", "region", true)
                .unwrap_err()
                .contains("not a number")
        );
        std::fs::write(&path, "state,region\nca,west\nca,east\n").unwrap();
        assert!(
            load(&path, "state", "region", false)
                .unwrap_err()
                .contains("appears twice")
        );
    }
}
