//! Response scanning: buffers the whole response body, sends it to a scanning service
//! with `proxy_http_call` from `on_http_response_body`, and waits. A 200 from the
//! scanner replaces the body with the scanner's answer (a redacted copy); anything else
//! answers 451 instead of the response. With `hold_head`, the response head waits for
//! the verdict too, so the scanner's status is added as `x-scanned` and a refusal
//! replaces the whole response; without it the head goes out at once (its
//! `Content-Length` removed, since the body's length will change) and a refusal can only
//! cut the response off.
//!
//! Plugin configuration (JSON): `{"upstream": "scanner", "hold_head": true,
//! "keep_length": false}`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::rc::Rc;
use std::time::Duration;

#[derive(Deserialize)]
struct Config {
    upstream: String,
    #[serde(default)]
    hold_head: bool,
    /// Leave `Content-Length` as the upstream sent it (a scanner that must not change
    /// the length; a changed body is then cut off by the gateway).
    #[serde(default)]
    keep_length: bool,
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) => {
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("body-scan: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Scan {
            config: self.config.clone()?,
            size: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Scan {
    config: Rc<Config>,
    size: usize,
}

impl HttpContext for Scan {
    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        if eos {
            return Action::Continue;
        }
        if self.config.hold_head {
            return Action::Pause;
        }
        if !self.config.keep_length {
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause; // buffer until the whole body is in
        }
        self.size = size;
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        let headers = vec![
            (":method", "POST"),
            (":path", "/scan"),
            (":authority", "scanner"),
            ("content-type", "application/octet-stream"),
        ];
        let timeout = Duration::from_secs(5);
        match self.dispatch_http_call(&self.config.upstream, headers, Some(&body), vec![], timeout)
        {
            Ok(_) => Action::Pause,
            Err(e) => {
                log::warn!("body-scan: scanner not called: {e:?}");
                Action::Continue
            }
        }
    }
}

impl Context for Scan {
    fn on_http_call_response(&mut self, _token: u32, _n: usize, body_size: usize, _t: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        if status != "200" {
            self.send_http_response(451, vec![("x-scanned", "refused")], Some(b"refused by the scanner"));
            return;
        }
        let verdict = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        if self.config.hold_head {
            self.set_http_response_header("x-scanned", Some(&status));
            self.set_http_response_header("content-length", None);
        }
        self.set_http_response_body(0, self.size, &verdict);
        self.resume_http_response();
    }
}
