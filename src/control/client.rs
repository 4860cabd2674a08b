//! The admin API from the command line: `wasmgate tenants`, `deploy`, `modules`,
//! `functions`, `routes`, `logs`, `usage`, `token`.
//! A small blocking HTTP/1.1 client; the admin API is plain HTTP on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

pub struct Client {
    pub addr: String,
    pub token: String,
}

pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `%XX`-encodes a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    fn open(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<BufReader<TcpStream>> {
        let addr = self
            .addr
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut s = TcpStream::connect(addr)?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.token,
            body.len()
        )?;
        s.write_all(body)?;
        Ok(BufReader::new(s))
    }

    fn head(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
        }
        Ok(status)
    }

    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Answer> {
        let mut r = self.open(method, path, body)?;
        let status = Self::head(&mut r)?;
        let mut body = String::new();
        r.read_to_string(&mut body)?;
        Ok(Answer { status, body })
    }

    /// Follows a server-sent event stream, calling `each` with every data line.
    pub fn follow(&self, path: &str, mut each: impl FnMut(&str)) -> std::io::Result<u16> {
        let mut r = self.open("GET", path, b"")?;
        let status = Self::head(&mut r)?;
        if status != 200 {
            let mut body = String::new();
            r.read_to_string(&mut body)?;
            each(&body);
            return Ok(status);
        }
        let mut line = String::new();
        while r.read_line(&mut line)? > 0 {
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                each(d);
            }
            line.clear();
        }
        Ok(status)
    }
}
