//! A route as the proxy uses it: where to send the request, what to change on the way,
//! and which hooks run. Built once per snapshot; read-only afterwards.

use crate::headers::HeaderTarget;
use crate::metrics::RouteMetrics;
use crate::upstream::Upstream;
use crate::wasm::{FunctionBackend, HookChain};
use http::{HeaderName, HeaderValue};
use std::sync::Arc;

pub struct Route {
    /// The route's `name`, or `route[N]` (0-based position in the file).
    pub name: Arc<str>,
    pub upstream: Option<Arc<Upstream>>,
    pub rewrite: Option<Rewrite>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub hooks: HookChain,
    /// The function (a WASI-HTTP component) that answers the request after the hooks,
    /// on a route without an upstream.
    pub backend: Option<Arc<FunctionBackend>>,
    pub max_request_body: u64,
    pub metrics: RouteMetrics,
    /// The tenant that may attach modules to this route through the admin API.
    pub tenant: Option<String>,
}

/// Header operations, parsed and validated when the conf is loaded.
#[derive(Debug, Default, Clone)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Removes, then sets, then adds: a header both removed and added ends up added.
    /// A map at capacity keeps what it has (the `http` crate's limit is far above any
    /// conf's ops).
    pub fn apply(&self, target: &mut impl HeaderTarget) {
        for n in &self.remove {
            target.remove(n);
        }
        for (n, v) in &self.set {
            let _ = target.set(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            let _ = target.add(n.clone(), v.clone());
        }
    }
}

/// Path rewrite applied before the request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Replace the leading `from` (the route's prefix) with `to` (possibly empty).
    Prefix { from: String, to: String },
    /// A new path built from literal parts and the route's `{param}` values.
    Template(Vec<TemplatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Param(String),
}

impl Rewrite {
    /// Parses `/users/{id}/x` into parts; `known` are the params the route's path defines.
    pub fn template(t: &str, known: &[String]) -> Result<Rewrite, String> {
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in rewrite path `{t}`"))?;
            let name = &rest[open + 1..open + close];
            if !known.iter().any(|k| k == name) {
                return Err(format!(
                    "rewrite path `{t}` uses `{{{name}}}`, which the route's path does not define"
                ));
            }
            parts.push(TemplatePart::Param(name.to_string()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_string()));
        }
        Ok(Rewrite::Template(parts))
    }

    /// The rewritten path and query for `path` (without query) and its optional `query`.
    pub fn apply(&self, path: &str, query: Option<&str>, params: &[(&str, &str)]) -> String {
        let mut out = String::with_capacity(path.len() + 16);
        match self {
            Rewrite::Prefix { from, to } => {
                let rest = path.strip_prefix(from.as_str()).unwrap_or(path);
                out.push_str(to);
                if !rest.starts_with('/') && !out.ends_with('/') {
                    out.push('/');
                }
                out.push_str(rest);
            }
            Rewrite::Template(parts) => {
                for p in parts {
                    match p {
                        TemplatePart::Literal(l) => out.push_str(l),
                        TemplatePart::Param(n) => {
                            let v = params.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
                            out.push_str(v.unwrap_or(""));
                        }
                    }
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// Names of the `{param}` segments of a path pattern.
pub fn path_params(pattern: &str) -> Vec<String> {
    pattern
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|s| s.trim_start_matches('*').to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites() {
        let strip = Rewrite::Prefix {
            from: "/api".into(),
            to: String::new(),
        };
        assert_eq!(strip.apply("/api/users", Some("a=1"), &[]), "/users?a=1");
        assert_eq!(strip.apply("/api", None, &[]), "/");
        let replace = Rewrite::Prefix {
            from: "/api".into(),
            to: "/v2".into(),
        };
        assert_eq!(replace.apply("/api/users", None, &[]), "/v2/users");
    }

    #[test]
    fn template_rewrites() {
        let t = Rewrite::template("/internal/{id}/profile", &["id".into()]).unwrap();
        assert_eq!(t.apply("/u/7", None, &[("id", "7")]), "/internal/7/profile");
        let err = Rewrite::template("/x/{nope}", &["id".into()]).unwrap_err();
        assert!(err.contains("`{nope}`"), "{err}");
    }
}
