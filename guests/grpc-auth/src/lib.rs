//! External auth over gRPC: asks an auth service (a unary `proxy_grpc_call`) about the
//! request's `x-token` header, pausing the request until it answers. The reply message
//! `allow:<user>` lets the request through with `x-user: <user>`; any other message, or a
//! failed call (its gRPC status and message from `proxy_get_status`), denies it with a
//! JSON answer. A request carrying `x-grpc-reply` is answered at once with
//! `send_grpc_response` (PERMISSION_DENIED).
//!
//! Plugin configuration (JSON): `{"upstream": "authz", "service": "test.Auth",
//! "method": "Check", "timeout_ms": 500, "as_grpc_service": false}`; with
//! `as_grpc_service` the upstream is named the way Envoy filters do, by a serialized
//! `GrpcService { envoy_grpc { cluster_name } }`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::rc::Rc;
use std::time::Duration;

#[derive(Deserialize)]
struct Config {
    upstream: String,
    #[serde(default = "default_service")]
    service: String,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default)]
    as_grpc_service: bool,
}

fn default_service() -> String {
    "test.Auth".into()
}
fn default_method() -> String {
    "Check".into()
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
                log::error!("grpc-auth: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GrpcAuth {
            config: self.config.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct GrpcAuth {
    config: Rc<Config>,
}

/// `GrpcService { envoy_grpc { cluster_name: name } }`, serialized (names under 128 bytes).
fn grpc_service(name: &str) -> String {
    let inner_len = name.len() + 2;
    let mut b = vec![0x0a, inner_len as u8, 0x0a, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    String::from_utf8(b).unwrap_or_default()
}

fn json_reply(ctx: &dyn HttpContext, status: u32, body: serde_json::Value) {
    ctx.send_http_response(
        status,
        vec![("content-type", "application/json")],
        Some(body.to_string().as_bytes()),
    );
}

impl HttpContext for GrpcAuth {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header("x-grpc-reply").is_some() {
            self.send_grpc_response(
                GrpcStatusCode::PermissionDenied,
                Some("denied: café 100%"),
                vec![("x-extra", b"1")],
            );
            return Action::Pause;
        }
        let token = self.get_http_request_header("x-token").unwrap_or_default();
        let c = self.config.clone();
        let upstream = if c.as_grpc_service {
            grpc_service(&c.upstream)
        } else {
            c.upstream.clone()
        };
        match self.dispatch_grpc_call(
            &upstream,
            &c.service,
            &c.method,
            vec![("x-client", b"wasm")],
            Some(token.as_bytes()),
            Duration::from_millis(c.timeout_ms),
        ) {
            Ok(_) => Action::Pause,
            Err(e) => {
                json_reply(
                    self,
                    503,
                    serde_json::json!({"error": "grpc_call_failed", "status": format!("{e:?}")}),
                );
                Action::Pause
            }
        }
    }
}

impl Context for GrpcAuth {
    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, size: usize) {
        if status_code == 0 {
            let reply = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            let reply = String::from_utf8_lossy(&reply).into_owned();
            if let Some(user) = reply.strip_prefix("allow:") {
                self.set_http_request_header("x-user", Some(user));
                self.resume_http_request();
            } else {
                json_reply(
                    self,
                    403,
                    serde_json::json!({"error": "denied", "reply": reply}),
                );
            }
            return;
        }
        let (code, message) = self.get_grpc_status();
        json_reply(
            self,
            if code == 7 { 403 } else { 503 },
            serde_json::json!({
                "error": "auth_failed",
                "callback_status": status_code,
                "grpc_status": code,
                "message": message,
            }),
        );
    }
}
