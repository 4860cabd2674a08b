//! A JSON API backend with no upstream: answers `GET /hello/{name}` itself, counts
//! greetings in shared data, and answers 404 for anything else.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Hello) });
}}

struct Hello;

impl Context for Hello {}

fn json_escape(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl HttpContext for Hello {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let path = path.split('?').next().unwrap_or("");
        // Routes may mount the function anywhere: look for the `hello/{name}` segment pair.
        let mut segs = path.split('/').filter(|s| !s.is_empty());
        let name = loop {
            match segs.next() {
                Some("hello") => break segs.next(),
                Some(_) => continue,
                None => break None,
            }
        };
        match name {
            Some(name) if !name.is_empty() => {
                let count = bump(self);
                let body = format!("{{\"hello\":{},\"greetings\":{count}}}", json_escape(name));
                self.send_http_response(
                    200,
                    vec![
                        ("content-type", "application/json"),
                        ("x-served-by", "wasm"),
                    ],
                    Some(body.as_bytes()),
                );
            }
            _ => self.send_http_response(
                404,
                vec![("content-type", "application/json")],
                Some(b"{\"error\":\"try /hello/{name}\"}"),
            ),
        }
        Action::Pause
    }
}

/// Increments the shared greeting counter with compare-and-swap, retrying on conflict.
fn bump(ctx: &dyn Context) -> u64 {
    for _ in 0..8 {
        let (value, cas) = ctx.get_shared_data("greetings");
        let n = value
            .and_then(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
            })
            .unwrap_or(0)
            + 1;
        if ctx
            .set_shared_data("greetings", Some(n.to_string().as_bytes()), cas)
            .is_ok()
        {
            return n;
        }
    }
    0
}
