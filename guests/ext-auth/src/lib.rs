//! External auth: asks an auth upstream (with `proxy_http_call`) whether the request's
//! `authorization` header is good, pausing the request until it answers. 2xx lets the
//! request through (with the auth service's `x-user`, if any); anything else is 403.
//!
//! Plugin configuration (JSON): `{"upstream": "auth", "path": "/check", "timeout_ms": 500}`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::rc::Rc;
use std::time::Duration;

#[derive(Deserialize)]
struct Config {
    upstream: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
}

fn default_path() -> String {
    "/check".into()
}
fn default_timeout() -> u64 {
    1000
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
                log::error!("ext-auth: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ExtAuth {
            config: self.config.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ExtAuth {
    config: Rc<Config>,
}

impl HttpContext for ExtAuth {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let auth = self
            .get_http_request_header("authorization")
            .unwrap_or_default();
        let c = self.config.clone();
        match self.dispatch_http_call(
            &c.upstream,
            vec![
                (":method", "GET"),
                (":path", &c.path),
                (":authority", "auth"),
                ("authorization", &auth),
            ],
            None,
            vec![],
            Duration::from_millis(c.timeout_ms),
        ) {
            Ok(_) => Action::Pause,
            Err(e) => {
                log::error!("ext-auth: cannot call {}: {e:?}", c.upstream);
                self.send_http_response(
                    503,
                    vec![("content-type", "application/json")],
                    Some(b"{\"error\":\"auth_unavailable\"}"),
                );
                Action::Pause
            }
        }
    }
}

impl Context for ExtAuth {
    fn on_http_call_response(&mut self, _token: u32, n_headers: usize, _body: usize, _t: usize) {
        if n_headers == 0 {
            self.send_http_response(
                503,
                vec![("content-type", "application/json")],
                Some(b"{\"error\":\"auth_unavailable\"}"),
            );
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        if status.starts_with('5') {
            // the auth service failed or could not be reached (the host synthesizes 503
            // for a refused connection and 504 for a timeout, as Envoy does)
            let body = format!("{{\"error\":\"auth_unavailable\",\"status\":{status}}}");
            self.send_http_response(
                503,
                vec![("content-type", "application/json")],
                Some(body.as_bytes()),
            );
            return;
        }
        if status.starts_with('2') {
            if let Some(user) = self.get_http_call_response_header("x-user") {
                self.set_http_request_header("x-user", Some(&user));
            }
            self.resume_http_request();
        } else {
            self.send_http_response(
                403,
                vec![("content-type", "application/json")],
                Some(b"{\"error\":\"forbidden\"}"),
            );
        }
    }
}
