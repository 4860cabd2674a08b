//! A filter that uses the tenant's key-value store (through the `wasmgate-kv` helper) and
//! its secrets (through its plugin configuration):
//!
//! - every request increments the counter `hits` and goes on with `x-hits: N` added;
//! - `x-kv-call: OP` with `x-kv-args: JSON` makes one `wasmgate.kv.OP` call and answers
//!   with its JSON result: 200 when ok, 409 on a conflict, 503 otherwise;
//! - `x-kv-config: 1` answers with the plugin configuration as the filter received it
//!   (secrets substituted);
//! - the root context counts its configurations in `configured`, from `on_configure`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { pending: None, config: Rc::new(Vec::new()) }) });
}}

struct Root {
    pending: Option<u32>,
    config: Rc<Vec<u8>>,
}

impl Context for Root {
    fn on_foreign_function(&mut self, token: u32, size: usize) {
        if self.pending == Some(token) {
            let n = wasmgate_kv::result(size).and_then(|r| r.number());
            log::info!("kv-demo: configured {n:?} times");
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = Rc::new(self.get_plugin_configuration().unwrap_or_default());
        self.pending = wasmgate_kv::incr("configured", 1).ok();
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Demo {
            pending: None,
            op: Op::Count,
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Op {
    Count,
    Call,
}

struct Demo {
    pending: Option<u32>,
    op: Op,
    config: Rc<Vec<u8>>,
}

impl Context for Demo {
    fn on_foreign_function(&mut self, token: u32, size: usize) {
        if self.pending != Some(token) {
            return;
        }
        let raw = wasmgate_kv::result_bytes(size).unwrap_or_default();
        let reply = serde_json::from_slice::<serde_json::Value>(&raw).map(wasmgate_kv::Reply);
        match self.op {
            Op::Count => match reply.ok().and_then(|r| r.number()) {
                Some(n) => {
                    self.set_http_request_header("x-hits", Some(&n.to_string()));
                    self.resume_http_request();
                }
                None => {
                    let body = String::from_utf8_lossy(&raw).into_owned();
                    self.send_http_response(503, vec![("content-type", "application/json")], Some(body.as_bytes()));
                }
            },
            Op::Call => {
                let status = match &reply {
                    Ok(r) if r.ok() => 200,
                    Ok(r) if r.error() == Some("conflict") => 409,
                    _ => 503,
                };
                self.send_http_response(status, vec![("content-type", "application/json")], Some(&raw));
            }
        }
    }
}

impl HttpContext for Demo {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header("x-kv-config").is_some() {
            let config = self.config.clone();
            self.send_http_response(200, vec![], Some(&config));
            return Action::Pause;
        }
        let call = match self.get_http_request_header("x-kv-call") {
            Some(op) => {
                self.op = Op::Call;
                let args = self.get_http_request_header("x-kv-args").unwrap_or_default();
                wasmgate_kv::raw(&op, args.as_bytes())
            }
            None => wasmgate_kv::incr("hits", 1),
        };
        match call {
            Ok(token) => {
                self.pending = Some(token);
                Action::Pause
            }
            Err(status) => {
                let body = format!("{{\"refused\":\"{status:?}\"}}");
                self.send_http_response(400, vec![], Some(body.as_bytes()));
                Action::Pause
            }
        }
    }
}
