//! Loading the conf file: parse (serde, `deny_unknown_fields`), validate with
//! file:line:column errors, and lower everything into one immutable [`Snapshot`].
//!
//! A snapshot is built completely (upstreams, router, TLS certificates, compiled wasm
//! modules) before it is published, so a reload either swaps in a conf that works or
//! leaves the old one serving.

pub mod file;
mod lower;

pub use lower::*;

use std::path::{Path, PathBuf};

/// Tenant names appear in function hosts (`{function}.{tenant}.<base_domain>`), so they
/// are DNS labels: 1-63 of a-z, 0-9 and `-`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// One problem in a conf file, pointing at where it is: `file:line:column: message`,
/// or `file: message` when the problem has no place in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), place(*line, *column))]
pub struct ConfError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place in the file (e.g. a missing file).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

fn place(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

/// Every problem found in a conf file, in file order, one `error: …` line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.iter().map(|e| format!("error: {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfErrors(pub Vec<ConfError>);

/// Maps byte offsets of the source to line and column for error messages.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn error(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfError {
        let (line, column) = if span.start == 0 && span.end == 0 {
            (0, 0)
        } else {
            let before = &self.text[..span.start.min(self.text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            (line, column)
        };
        ConfError {
            file: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}
