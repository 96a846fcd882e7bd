//! Diagnostics with a file position: every config problem names file, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A position in a config file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl Origin {
    /// Position of byte `offset` in `text`.
    pub fn at(file: &Path, text: &str, offset: usize) -> Origin {
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        Origin {
            file: file.to_path_buf(),
            line,
            col,
        }
    }
}

/// Line starts of a text, so that positioning many items of a large file costs a binary
/// search each instead of a scan from the start.
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        LineIndex {
            starts: std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        }
    }

    /// [`Origin::at`], for the text this index was built from.
    pub fn origin(&self, file: &Path, text: &str, offset: usize) -> Origin {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        Origin {
            file: file.to_path_buf(),
            line,
            col: text[start..offset].chars().count() + 1,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub origin: Origin,
    pub severity: Severity,
    /// The domain the problem belongs to, if any; only that domain is skipped.
    pub domain: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {sev}: ", self.origin)?;
        if let Some(d) = &self.domain {
            write!(f, "domain {d:?}: ")?;
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_counts_lines_and_columns() {
        let o = Origin::at(Path::new("f"), "ab\ncdé\nx", 7);
        let t = "ab\ncdé\nx";
        let ix = LineIndex::new(t);
        for off in 0..=t.len() {
            if t.is_char_boundary(off) {
                assert_eq!(
                    ix.origin(Path::new("f"), t, off),
                    Origin::at(Path::new("f"), t, off)
                );
            }
        }
        assert_eq!((o.line, o.col), (2, 4));
        assert_eq!(Origin::at(Path::new("f"), "abc", 0).to_string(), "f:1:1");
    }
}
