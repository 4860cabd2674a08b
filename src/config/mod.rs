//! Loading the conf file: parse (serde, `deny_unknown_fields`), validate with
//! file:line:column errors, and lower everything into one immutable [`Snapshot`].
//!
//! A snapshot is built completely (upstreams, router, TLS certificates, compiled wasm
//! modules) before it is published, so a reload either swaps in a conf that works or
//! leaves the old one serving.

pub mod file;
mod lower;

pub use lower::*;

use std::fmt;
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

/// One problem in a conf file, pointing at where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place in the file (e.g. a missing file).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found in a conf file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfErrors(pub Vec<ConfError>);

impl fmt::Display for ConfErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfErrors {}

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
