//! Request targets and hosts as the router sees them, and as the upstream gets them.
//!
//! A request must route the way its upstream will read it: a backend that decodes
//! `/%68ooked/x` or resolves `/x/../hooked/x` serves `/hooked/x`, so the gateway must
//! match that same path, or an auth hook on `/hooked` is skipped. The rules (nginx's,
//! plus the ones decoding backends need):
//!
//! - the target is origin-form (`/…`) or absolute-form (`http://host/…`, whose authority
//!   replaces `Host`); anything else (`hooked/x`, `%20/x`, `*`) is 400;
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, the
//!   others kept with upper-case hex; a malformed escape or `%00` is 400;
//! - an escaped slash or backslash (`%2F`, `%5C`) is 400: routing it as one segment while
//!   a decoding backend sees two is the bypass, and decoding it changes what an API that
//!   means a literal `%2F` receives, so the gateway refuses to guess. A raw `\` is 400 too;
//! - repeated slashes are merged, `.` and `..` segments removed (never above the root);
//! - path parameters (`;p=1` in a segment) are ignored for matching, as Java servlet
//!   containers ignore them (`/x/..;/hooked` is `/hooked` there), and kept in what is
//!   forwarded.
//!
//! The normalized path (with its parameters and the original query) is what the upstream
//! and the hooks get; the parameter-free form is what routes match. Both are computed in
//! one pass, and nothing is allocated for a path that is already normal.

use std::borrow::Cow;

/// Why a request target or host is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Not origin-form or absolute-form.
    Form,
    /// A `%` not followed by two hex digits, or `%00`.
    Escape,
    /// `%2F`, `%5C` or a raw `\`.
    Slash,
    /// Host missing (HTTP/1.1), repeated, or not a valid host.
    Host,
}

impl TargetError {
    pub fn reason(self) -> &'static str {
        match self {
            TargetError::Form => "the request target is not origin-form or absolute-form",
            TargetError::Escape => "the path has a malformed or NUL percent-escape",
            TargetError::Slash => "the path has an escaped slash or a backslash",
            TargetError::Host => "the Host header is missing, repeated or invalid",
        }
    }
}

/// A path after normalization.
#[derive(Debug, PartialEq, Eq)]
pub struct Normal<'a> {
    /// What is forwarded (and what hooks see as `:path`), without the query.
    pub path: Cow<'a, str>,
    /// What routes match: `path` without `;` parameters.
    pub key: Cow<'a, str>,
}

/// A path that needs no work: starts with `/`, no `%`, `\`, `;`, `//`, `/.` or `/..`.
fn already_normal(p: &[u8]) -> bool {
    if p.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for (i, &b) in p.iter().enumerate() {
        match b {
            b'%' | b'\\' | b';' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // "/." followed by end, "/" or ".(end|/)" is a dot segment
                let rest = &p[i + 1..];
                if rest.is_empty()
                    || rest[0] == b'/'
                    || (rest[0] == b'.' && (rest.len() == 1 || rest[1] == b'/'))
                {
                    return false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes unreserved escapes and upper-cases the others' hex; refuses bad escapes,
/// `%00` and escaped or raw slashes other than `/`.
fn decode_unreserved(p: &str) -> Result<String, TargetError> {
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (hi, lo) = match (
                    b.get(i + 1).and_then(|&c| hex(c)),
                    b.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(TargetError::Escape),
                };
                let v = hi << 4 | lo;
                match v {
                    0 => return Err(TargetError::Escape),
                    b'/' | b'\\' => return Err(TargetError::Slash),
                    v if unreserved(v) => out.push(v as char),
                    _ => {
                        out.push('%');
                        out.push(b"0123456789ABCDEF"[hi as usize] as char);
                        out.push(b"0123456789ABCDEF"[lo as usize] as char);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(TargetError::Slash),
            _ => {
                // copy a run of ordinary bytes at once (keeps multi-byte UTF-8 whole)
                let start = i;
                while i < b.len() && b[i] != b'%' && b[i] != b'\\' {
                    i += 1;
                }
                out.push_str(&p[start..i]);
            }
        }
    }
    Ok(out)
}

/// Normalizes an origin-form path (no query). See the module doc for the rules.
pub fn normalize_path(raw: &str) -> Result<Normal<'_>, TargetError> {
    if already_normal(raw.as_bytes()) {
        return Ok(Normal {
            path: Cow::Borrowed(raw),
            key: Cow::Borrowed(raw),
        });
    }
    if !raw.starts_with('/') {
        return Err(TargetError::Form);
    }
    let decoded = decode_unreserved(raw)?;
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    // segments as (forwarded, key) pairs; empty segments are merged slashes
    let mut segs: Vec<(&str, &str)> = Vec::new();
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        let key = seg.split(';').next().unwrap_or("");
        match key {
            "." => {}
            ".." => {
                segs.pop();
            }
            _ => segs.push((seg, key)),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    let mut key = String::with_capacity(decoded.len());
    for (s, k) in &segs {
        path.push('/');
        path.push_str(s);
        if !k.is_empty() {
            key.push('/');
            key.push_str(k);
        }
    }
    if trailing || segs.is_empty() {
        path.push('/');
        if !key.ends_with('/') {
            key.push('/');
        }
    }
    if key.is_empty() {
        key.push('/');
    }
    Ok(Normal {
        path: Cow::Owned(path),
        key: Cow::Owned(key),
    })
}

/// Lower-cases a host, drops its port and one trailing dot, and checks it: a DNS name
/// (letters, digits, `-`, `_`, `.`), an IPv4 address or a bracketed IPv6 literal, with an
/// optional numeric port.
pub fn normalize_host(raw: &str) -> Result<Cow<'_, str>, TargetError> {
    let (name, port) = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']').ok_or(TargetError::Host)?;
        let literal = &rest[..end];
        literal
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| TargetError::Host)?;
        (&raw[..end + 2], &rest[end + 1..])
    } else {
        match raw.rfind(':') {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (raw, ""),
        }
    };
    if let Some(p) = port.strip_prefix(':') {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TargetError::Host);
        }
    } else if !port.is_empty() {
        return Err(TargetError::Host);
    }
    if name.starts_with('[') {
        return Ok(Cow::Owned(name.to_ascii_lowercase()));
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty()
        || name.len() > 253
        || name.starts_with('.')
        || name.contains("..")
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(TargetError::Host);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> (String, String) {
        let n = normalize_path(p).unwrap();
        (n.path.into_owned(), n.key.into_owned())
    }

    #[test]
    fn spellings_of_one_path_normalize_to_it() {
        for p in [
            "/hooked/x",
            "/%68ooked/x",
            "//hooked/x",
            "/hooked//x",
            "/x/../hooked/x",
            "/./hooked/x",
            "/hooked/./x",
            "/a/b/../../hooked/x",
            "/../hooked/x",
            "/%2e%2e/hooked/x",
            "/x/%2E%2E/hooked/x",
        ] {
            assert_eq!(norm(p).1, "/hooked/x", "{p}");
        }
        // (spelling, path sent upstream, path routes and hooks match on)
        for (p, path, key) in [
            ("/hooked;p=1/x", "/hooked;p=1/x", "/hooked/x"),
            ("/x/..;/hooked/x", "/hooked/x", "/hooked/x"),
            ("/", "/", "/"),
            ("/a/", "/a/", "/a/"),
            ("/a/.", "/a/", "/a/"),
            ("/a/b/..", "/a/", "/a/"),
            ("/..", "/", "/"),
            ("/a%20b/%7e", "/a%20b/~", "/a%20b/~"),
            ("/caf%c3%a9", "/caf%C3%A9", "/caf%C3%A9"),
            ("/.well-known/x", "/.well-known/x", "/.well-known/x"),
            ("/a..b/c.", "/a..b/c.", "/a..b/c."),
        ] {
            assert_eq!(norm(p), (path.to_string(), key.to_string()), "{p}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/hooked/x", "/a.b/c..d/.well-known", "/a/b/"] {
            let n = normalize_path(p).unwrap();
            assert!(matches!(n.path, Cow::Borrowed(_)), "{p}");
            assert!(matches!(n.key, Cow::Borrowed(_)), "{p}");
        }
    }

    #[test]
    fn bad_targets_are_refused() {
        assert_eq!(normalize_path("hooked/x"), Err(TargetError::Form));
        assert_eq!(normalize_path("%20/hooked/x"), Err(TargetError::Form));
        assert_eq!(normalize_path("*"), Err(TargetError::Form));
        assert_eq!(normalize_path("/hooked%2fx"), Err(TargetError::Slash));
        assert_eq!(normalize_path("/hooked%2Fx"), Err(TargetError::Slash));
        assert_eq!(normalize_path("/hooked%5cx"), Err(TargetError::Slash));
        assert_eq!(normalize_path("/hooked\\x"), Err(TargetError::Slash));
        assert_eq!(normalize_path("/a%00"), Err(TargetError::Escape));
        assert_eq!(normalize_path("/a%zz"), Err(TargetError::Escape));
        assert_eq!(normalize_path("/a%4"), Err(TargetError::Escape));
    }

    #[test]
    fn hosts() {
        let h = |s| normalize_host(s).map(|c| c.into_owned());
        assert_eq!(h("admin.example.com.").unwrap(), "admin.example.com");
        assert_eq!(h("Admin.Example.COM:8080").unwrap(), "admin.example.com");
        assert_eq!(h("127.0.0.1:80").unwrap(), "127.0.0.1");
        assert_eq!(h("[::1]:8080").unwrap(), "[::1]");
        assert_eq!(h("localhost").unwrap(), "localhost");
        for bad in [
            "",
            "a b",
            "127.0.0.1/evil",
            "a:b",
            "x:",
            "[::1",
            "[zz]",
            ".",
            "a..b",
            "h:99999999",
        ] {
            assert_eq!(h(bad), Err(TargetError::Host), "{bad:?}");
        }
    }
}
