//! The admin API from the command line: `wasmgate tenants`, `deploy`, `modules`,
//! `functions`, `routes`, `logs`, `usage`, `token`.
//! A blocking `ureq` client; the admin API is plain HTTP on loopback.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::io::{BufRead, BufReader, Read};

pub struct Client {
    pub addr: String,
    pub token: String,
}

pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Everything but the unreserved characters of RFC 3986 (`A-Z a-z 0-9 - _ . ~`).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `%XX`-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

fn io_err(e: ureq::Error) -> std::io::Error {
    match e {
        ureq::Error::Io(e) => e,
        e => std::io::Error::other(e),
    }
}

impl Client {
    fn open(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<ureq::http::Response<ureq::Body>> {
        let addr = self
            .addr
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                // every answer is for the caller to read, errors too
                .http_status_as_error(false)
                // loopback: no HTTP_PROXY detour
                .proxy(None)
                .build(),
        );
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {}", self.token))
            .body(body)
            .map_err(std::io::Error::other)?;
        agent.run(req).map_err(io_err)
    }

    fn read_all(r: ureq::http::Response<ureq::Body>) -> std::io::Result<String> {
        let mut body = String::new();
        r.into_body().into_reader().read_to_string(&mut body)?;
        Ok(body)
    }

    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Answer> {
        let r = self.open(method, path, body)?;
        let status = r.status().as_u16();
        Ok(Answer {
            status,
            body: Self::read_all(r)?,
        })
    }

    /// Follows a server-sent event stream, calling `each` with every data line.
    pub fn follow(&self, path: &str, mut each: impl FnMut(&str)) -> std::io::Result<u16> {
        let r = self.open("GET", path, b"")?;
        let status = r.status().as_u16();
        if status != 200 {
            each(&Self::read_all(r)?);
            return Ok(status);
        }
        let mut lines = BufReader::new(r.into_body().into_reader());
        let mut line = String::new();
        while lines.read_line(&mut line)? > 0 {
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                each(d);
            }
            line.clear();
        }
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn encode_keeps_only_unreserved_characters() {
        assert_eq!(super::encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(
            super::encode(r#"{"k": "v/w?x&y=z"} é"#),
            "%7B%22k%22%3A%20%22v%2Fw%3Fx%26y%3Dz%22%7D%20%C3%A9"
        );
    }
}
