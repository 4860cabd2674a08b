//! Route matching: host, then path, then method, in O(1) in the number of routes.
//!
//! Hosts are looked up in hash maps (exact names, then `*.suffix` wildcards from the most
//! specific suffix, then routes without a host); paths in a `matchit` radix tree per host
//! pattern, so static segments beat `{param}` segments, which beat prefixes. Routes that
//! can never be told apart (same host pattern, same path pattern and kind, overlapping
//! methods) are rejected when the table is built.

use http::Method;
use std::collections::{BTreeMap, HashMap};

/// Name of the catch-all parameter used to express prefix routes in the radix tree.
const REST: &str = "__wg_rest";

/// How a route matches the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Exact path, possibly with `{param}` segments.
    Exact(String),
    /// Segment prefix: matches the prefix itself and anything below it.
    Prefix(String),
}

impl PathPattern {
    /// More specific patterns sort first among routes on the same tree node.
    fn rank(&self) -> u8 {
        match self {
            PathPattern::Exact(_) => 0,
            PathPattern::Prefix(_) => 1,
        }
    }
}

/// What the table needs to know about one route.
#[derive(Debug, Clone)]
pub struct RouteKey {
    pub host: Option<String>,
    pub path: PathPattern,
    /// Empty means every method.
    pub methods: Vec<Method>,
}

#[derive(Debug, Clone)]
struct Candidate {
    rank: u8,
    methods: Vec<Method>,
    route: usize,
}

#[derive(Default)]
struct PathTable {
    tree: matchit::Router<Vec<Candidate>>,
}

/// Matched route index plus the `{param}` values of its path.
#[derive(Debug, PartialEq, Eq)]
pub struct Match<'a> {
    pub route: usize,
    pub params: Vec<(&'a str, &'a str)>,
}

/// Outcome of a lookup that found no route for the method but one for the path.
#[derive(Debug, PartialEq, Eq)]
pub enum Miss {
    NoRoute,
    /// The path matched this route (the most specific), but none there takes the method.
    MethodNotAllowed(usize),
}

#[derive(Default)]
pub struct Router {
    exact: HashMap<String, PathTable>,
    /// Keyed by the suffix after `*`, including its leading dot: `.example.com`.
    wildcard: HashMap<String, PathTable>,
    any: PathTable,
    routes: usize,
}

/// A route that could not be put in the table, by index, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    pub route: usize,
    pub message: String,
}

impl Router {
    /// Builds the table; every conflict is reported, not just the first.
    pub fn build(keys: &[RouteKey], names: &[String]) -> Result<Router, Vec<BuildError>> {
        // Group candidates by (host pattern, tree path) first: the radix tree takes each
        // path once, and conflicts are found within a group.
        let mut groups: BTreeMap<(Option<String>, String), Vec<Candidate>> = BTreeMap::new();
        let mut errors = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let host = key.host.as_ref().map(|h| h.to_ascii_lowercase());
            let cand = Candidate {
                rank: key.path.rank(),
                methods: key.methods.clone(),
                route: i,
            };
            for tree_path in tree_paths(&key.path) {
                let group = groups.entry((host.clone(), tree_path)).or_default();
                if let Some(other) = group
                    .iter()
                    .find(|c| c.rank == cand.rank && methods_overlap(&c.methods, &cand.methods))
                {
                    if !errors.iter().any(|e: &BuildError| e.route == i) {
                        errors.push(BuildError {
                            route: i,
                            message: format!(
                                "route `{}` can never be told apart from route `{}`: same host, path and overlapping methods",
                                names[i], names[other.route]
                            ),
                        });
                    }
                    continue;
                }
                group.push(cand.clone());
            }
        }
        let mut router = Router {
            routes: keys.len(),
            ..Router::default()
        };
        for ((host, path), mut cands) in groups {
            // Exact before prefix; method-specific before any-method.
            cands.sort_by_key(|c| (c.rank, c.methods.is_empty(), c.route));
            let first = cands[0].route;
            let table = match host {
                None => &mut router.any,
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => router.wildcard.entry(suffix.to_string()).or_default(),
                    None => router.exact.entry(h).or_default(),
                },
            };
            if let Err(e) = table.tree.insert(path.clone(), cands) {
                let message = match &e {
                    matchit::InsertError::Conflict { with } => {
                        format!("path `{path}` conflicts with `{with}` of another route on the same host")
                    }
                    other => format!("path `{path}` is not a valid pattern: {other}"),
                };
                if !errors.iter().any(|e: &BuildError| e.route == first) {
                    errors.push(BuildError {
                        route: first,
                        message,
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(router)
        } else {
            errors.sort_by_key(|e| e.route);
            Err(errors)
        }
    }

    pub fn len(&self) -> usize {
        self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }

    /// Finds the most specific route for `host` (without port, any case), `path`, `method`.
    pub fn find<'a>(
        &'a self,
        host: &str,
        path: &'a str,
        method: &Method,
    ) -> Result<Match<'a>, Miss> {
        let mut miss = Miss::NoRoute;
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(table) = self.exact.get(host) {
            match table.find(path, method) {
                Ok(m) => return Ok(m),
                Err(m) => miss = miss.max(m),
            }
        }
        if !self.wildcard.is_empty() {
            // Most specific suffix first: for a.b.example.com try .b.example.com, .example.com, .com
            for (i, b) in host.bytes().enumerate() {
                if b == b'.' {
                    if let Some(table) = self.wildcard.get(&host[i..]) {
                        match table.find(path, method) {
                            Ok(m) => return Ok(m),
                            Err(m) => miss = miss.max(m),
                        }
                    }
                }
            }
        }
        match self.any.find(path, method) {
            Ok(m) => Ok(m),
            Err(m) => Err(miss.max(m)),
        }
    }
}

impl PartialOrd for Miss {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Miss {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let r = |m: &Miss| matches!(m, Miss::MethodNotAllowed(_)) as u8;
        r(self).cmp(&r(other))
    }
}

impl PathTable {
    fn find<'a>(&'a self, path: &'a str, method: &Method) -> Result<Match<'a>, Miss> {
        let m = self.tree.at(path).map_err(|_| Miss::NoRoute)?;
        let cand = m
            .value
            .iter()
            .find(|c| c.methods.is_empty() || c.methods.contains(method))
            .ok_or(Miss::MethodNotAllowed(m.value[0].route))?;
        let params = m.params.iter().filter(|(k, _)| *k != REST).collect();
        Ok(Match {
            route: cand.route,
            params,
        })
    }
}

/// The radix-tree paths a pattern occupies.
fn tree_paths(p: &PathPattern) -> Vec<String> {
    match p {
        PathPattern::Exact(path) => vec![path.clone()],
        PathPattern::Prefix(prefix) => {
            let base = prefix.trim_end_matches('/');
            if base.is_empty() {
                vec!["/".into(), format!("/{{*{REST}}}")]
            } else {
                // a catch-all needs one byte at least: `{base}/` is its own entry, or
                // `/hooked/` would skip a `/hooked` prefix route
                vec![
                    base.to_string(),
                    format!("{base}/"),
                    format!("{base}/{{*{REST}}}"),
                ]
            }
        }
    }
}

/// Two method sets clash when a request could match both with neither more specific:
/// both "any method", or both listing a common method. A route listing methods is more
/// specific than one that takes any.
fn methods_overlap(a: &[Method], b: &[Method]) -> bool {
    (a.is_empty() && b.is_empty()) || a.iter().any(|m| b.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: Option<&str>, path: PathPattern, methods: &[&str]) -> RouteKey {
        RouteKey {
            host: host.map(String::from),
            path,
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}")).collect()
    }

    #[test]
    fn precedence_host_path_method() {
        use PathPattern::*;
        let keys = vec![
            key(None, Prefix("/".into()), &[]),                       // 0
            key(None, Prefix("/api".into()), &[]),                    // 1
            key(None, Exact("/api/users/{id}".into()), &[]),          // 2
            key(None, Exact("/api/users/me".into()), &[]),            // 3
            key(Some("*.example.com"), Prefix("/api".into()), &[]),   // 4
            key(Some("a.example.com"), Prefix("/api".into()), &[]),   // 5
            key(None, Exact("/api/users/{id}".into()), &["DELETE"]),  // 6
            key(Some("*.b.example.com"), Prefix("/api".into()), &[]), // 7
        ];
        let r = Router::build(&keys, &names(keys.len())).unwrap();
        let get = Method::GET;
        assert_eq!(r.find("x.org", "/", &get).unwrap().route, 0);
        assert_eq!(r.find("x.org", "/apix", &get).unwrap().route, 0);
        assert_eq!(r.find("x.org", "/api", &get).unwrap().route, 1);
        assert_eq!(r.find("x.org", "/api/", &get).unwrap().route, 1);
        assert_eq!(r.find("x.org", "/api/other/deep", &get).unwrap().route, 1);
        let m = r.find("x.org", "/api/users/42", &get).unwrap();
        assert_eq!((m.route, m.params), (2, vec![("id", "42")]));
        assert_eq!(r.find("x.org", "/api/users/me", &get).unwrap().route, 3);
        assert_eq!(
            r.find("x.org", "/api/users/42", &Method::DELETE)
                .unwrap()
                .route,
            6
        );
        assert_eq!(r.find("z.example.com", "/api/x", &get).unwrap().route, 4);
        assert_eq!(r.find("A.Example.COM", "/api/x", &get).unwrap().route, 5);
        assert_eq!(r.find("c.b.example.com", "/api", &get).unwrap().route, 7);
        // a host-specific table without a path match falls through to less specific hosts
        assert_eq!(r.find("a.example.com", "/other", &get).unwrap().route, 0);
    }

    #[test]
    fn method_not_allowed_is_told_apart() {
        use PathPattern::*;
        let keys = vec![key(None, Exact("/only-post".into()), &["POST"])];
        let r = Router::build(&keys, &names(1)).unwrap();
        assert_eq!(
            r.find("h", "/only-post", &Method::GET),
            Err(Miss::MethodNotAllowed(0))
        );
        assert_eq!(r.find("h", "/nothing", &Method::GET), Err(Miss::NoRoute));
    }

    #[test]
    fn indistinguishable_routes_are_errors() {
        use PathPattern::*;
        let keys = vec![
            key(None, Exact("/a".into()), &["GET"]),
            key(None, Exact("/a".into()), &["GET", "POST"]),
            key(None, Exact("/a".into()), &["PUT"]),
            key(None, Exact("/u/{id}".into()), &[]),
            key(None, Exact("/u/{name}".into()), &[]),
        ];
        let Err(errs) = Router::build(&keys, &names(keys.len())) else {
            panic!("conflicting routes were accepted");
        };
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].route, 1);
        assert!(errs[0]
            .message
            .contains("`r1` can never be told apart from route `r0`"));
        assert!(errs[1].message.contains("conflicts"), "{errs:?}");
    }
}
