//! Rewrites paths and headers from rules in its plugin configuration:
//!
//! ```json
//! {"request":  {"prefix_from": "/old", "prefix_to": "/new",
//!               "set_headers": {"x-a": "1"}, "remove_headers": ["x-b"]},
//!  "response": {"set_headers": {"x-c": "2"}, "remove_headers": ["server"]}}
//! ```

use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::rc::Rc;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Rules {
    prefix_from: Option<String>,
    prefix_to: Option<String>,
    set_headers: BTreeMap<String, String>,
    remove_headers: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    request: Rules,
    response: Rules,
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: Rc::default() }) });
}}

struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) => {
                self.config = Rc::new(c);
                true
            }
            Err(e) => {
                log::error!("rewrite: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Rewrite {
    config: Rc<Config>,
}

impl Context for Rewrite {}

impl HttpContext for Rewrite {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let r = &self.config.request;
        if let (Some(from), Some(to)) = (&r.prefix_from, &r.prefix_to) {
            if let Some(path) = self.get_http_request_header(":path") {
                if let Some(rest) = path.strip_prefix(from.as_str()) {
                    let new = format!("{to}{rest}");
                    self.set_http_request_header(":path", Some(&new));
                }
            }
        }
        for h in &r.remove_headers {
            self.set_http_request_header(h, None);
        }
        for (k, v) in &r.set_headers {
            self.set_http_request_header(k, Some(v));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let r = &self.config.response;
        for h in &r.remove_headers {
            self.set_http_response_header(h, None);
        }
        for (k, v) in &r.set_headers {
            self.set_http_response_header(k, Some(v));
        }
        Action::Continue
    }
}
