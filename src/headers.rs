//! Header changes on Pingora's request and response heads and on plain maps
//! (trailers), written once for the conf's header ops and the guests' header calls.

use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

/// Headers that describe one connection, never passed from the upstream's to the
/// client's (RFC 9110 §7.6.1), besides those the `Connection` header names.
pub const HOP_BY_HOP: [&str; 5] = ["keep-alive", "proxy-connection", "te", "trailer", "upgrade"];

/// A header that belongs to one connection, not to the message (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case("connection")
        || name.eq_ignore_ascii_case("transfer-encoding")
        || HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// A header map is at its capacity (the `http` crate's limit): the change was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFull;

/// Header maps changes apply to.
pub trait HeaderTarget {
    /// Replaces every value of `name` with `value`.
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), MapFull>;
    /// Adds `value` after any values `name` has.
    fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), MapFull>;
    fn remove(&mut self, name: &HeaderName);
}

macro_rules! pingora_head {
    ($t:ty) => {
        impl HeaderTarget for $t {
            fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), MapFull> {
                self.insert_header(name, value).map_err(|_| MapFull)
            }
            fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), MapFull> {
                self.append_header(name, value)
                    .map(drop)
                    .map_err(|_| MapFull)
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
        }
    };
}
pingora_head!(RequestHeader);
pingora_head!(ResponseHeader);

impl HeaderTarget for HeaderMap {
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), MapFull> {
        self.try_insert(name, value).map(drop).map_err(|_| MapFull)
    }
    fn add(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), MapFull> {
        self.try_append(name, value).map(drop).map_err(|_| MapFull)
    }
    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }
}
