//! API-key auth: lets a request through only if its key header holds one of the keys in
//! the plugin configuration; answers 401 otherwise.
//!
//! Plugin configuration (JSON): `{"keys": ["k1", "k2"], "header": "x-api-key"}`.

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Default)]
struct Config {
    keys: Vec<String>,
    #[serde(default = "default_header")]
    header: String,
}

fn default_header() -> String {
    "x-api-key".into()
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: Rc::new(Config::default()) }) });
}}

struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            log::error!("api-key-auth: missing plugin configuration");
            return false;
        };
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) if !c.keys.is_empty() => {
                self.config = Rc::new(c);
                true
            }
            Ok(_) => {
                log::error!("api-key-auth: configuration has no keys");
                false
            }
            Err(e) => {
                log::error!("api-key-auth: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Check {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Check {
    config: Rc<Config>,
}

impl Context for Check {}

impl HttpContext for Check {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        match self.get_http_request_header(&self.config.header) {
            Some(k) if self.config.keys.iter().any(|allowed| *allowed == k) => Action::Continue,
            got => {
                let reason = if got.is_some() {
                    "invalid_api_key"
                } else {
                    "missing_api_key"
                };
                log::info!("api-key-auth: denied ({reason})");
                self.send_http_response(
                    401,
                    vec![
                        ("content-type", "application/json"),
                        ("www-authenticate", "ApiKey"),
                    ],
                    Some(format!("{{\"error\":\"{reason}\"}}").as_bytes()),
                );
                Action::Pause
            }
        }
    }
}
