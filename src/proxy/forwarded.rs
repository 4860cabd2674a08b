//! What the upstream is told about the client, per listener: `X-Forwarded-For`,
//! `X-Forwarded-Proto`, `X-Forwarded-Host` and the standard `Forwarded` (RFC 7239).
//!
//! - `append` (the default): a peer in `trusted_proxies` (a load balancer in front) has
//!   its headers kept and this hop's client address added at the end, as Envoy, Kong,
//!   Traefik and Caddy do; any other peer's headers are replaced, so a client cannot
//!   forge the address an upstream sees. With no trusted proxies, every request starts
//!   fresh with its peer's address.
//! - `replace`: always start afresh with this hop.
//! - `off`: pass what the client sent, add nothing.
//!
//! They are set before the hooks run, so filters see them too.

use crate::config::{ForwardedMode, Listener};
use pingora::proxy::Session;
use std::fmt::Write as _;
use std::net::IpAddr;

const XFF: &str = "x-forwarded-for";
const XF_PROTO: &str = "x-forwarded-proto";
const XF_HOST: &str = "x-forwarded-host";

pub fn apply(session: &mut Session, listener: Option<&Listener>) {
    let Some(l) = listener else { return };
    if l.forwarded.mode == ForwardedMode::Off {
        return;
    }
    let Some(peer) = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
    else {
        return;
    };
    let trusted = l.forwarded.mode == ForwardedMode::Append
        && l.forwarded.trusted.iter().any(|n| n.contains(&peer));
    let proto = if l.tls.is_some() { "https" } else { "http" };
    let req = session.req_header_mut();
    let joined = |name: &str| -> Option<String> {
        let mut out = String::new();
        for v in req.headers.get_all(name) {
            let v = v.to_str().ok()?.trim();
            if !v.is_empty() {
                if !out.is_empty() {
                    out.push_str(", ");
                }
                out.push_str(v);
            }
        }
        (!out.is_empty()).then_some(out)
    };
    // a cheap clone: header values share their bytes
    let host = req.headers.get(http::header::HOST).cloned();
    let mut xff = if trusted { joined(XFF) } else { None }.unwrap_or_default();
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    let _ = write!(xff, "{peer}");
    let mut fwd = if trusted { joined("forwarded") } else { None }.unwrap_or_default();
    if !fwd.is_empty() {
        fwd.push_str(", ");
    }
    match peer {
        IpAddr::V4(a) => {
            let _ = write!(fwd, "for={a}");
        }
        IpAddr::V6(a) => {
            let _ = write!(fwd, "for=\"[{a}]\"");
        }
    }
    let _ = write!(fwd, ";proto={proto}");
    if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok()) {
        // a quoted string: a host with a port is not a token (Host was validated: no
        // quote or backslash can be in it)
        let _ = write!(fwd, ";host=\"{h}\"");
    }
    let keep_proto = trusted && req.headers.contains_key(XF_PROTO);
    let keep_host = trusted && req.headers.contains_key(XF_HOST);
    // values built from a valid header and an IP address are valid header values
    let _ = req.insert_header(XFF, xff);
    let _ = req.insert_header("forwarded", fwd);
    if !keep_proto {
        let _ = req.insert_header(XF_PROTO, proto);
    }
    if !keep_host {
        match host {
            Some(h) => {
                let _ = req.insert_header(XF_HOST, h);
            }
            None => {
                req.remove_header(XF_HOST);
            }
        }
    }
}
