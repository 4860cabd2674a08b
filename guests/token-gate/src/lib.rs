//! Token gate: the root context fetches a token from an upstream and requests wait for
//! it, the pattern token and JWKS fetchers use. It exercises what only the root context
//! can do:
//!
//! - callouts from `on_configure` and `on_tick`, answered on the root context;
//! - resuming a paused request from the root (`proxy_set_effective_context` to the
//!   request's context, then a header change and `proxy_continue_stream`), or answering
//!   it from there (a local reply when the token cannot be had);
//! - resuming a request from `on_queue_ready` when another request enqueues to the
//!   gate's queue.
//!
//! Requests whose path ends in `/kick` enqueue an item; a path containing `/queue` waits
//! for that item; every other request waits for a token and goes upstream with it in
//! `x-token`. Responses carry `x-fetches` (token answers the root got, over all VMs) and
//! `x-bad-context` (what switching to an unknown context answered: 2 is BadArgument).
//!
//! Plugin configuration (JSON): `{"upstream": "tokens", "path": "/token",
//! "tick_ms": 1000, "queue": "gate"}`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    upstream: String,
    path: String,
    tick_ms: u64,
    queue: String,
}

/// What the root context and the request contexts of one VM share.
#[derive(Default)]
struct Shared {
    token: RefCell<Option<String>>,
    /// Requests waiting for a token, and for a queue item.
    waiting: RefCell<Vec<u32>>,
    waiting_queue: RefCell<Vec<u32>>,
    bad_context: Cell<i32>,
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: Config::default(), shared: Rc::default(), queue: 0 })
    });
}}

struct Root {
    config: Config,
    shared: Rc<Shared>,
    queue: u32,
}

impl Root {
    fn fetch(&self) {
        let c = &self.config;
        let headers = vec![
            (":method", "GET"),
            (":path", c.path.as_str()),
            (":authority", "tokens"),
        ];
        if let Err(e) =
            self.dispatch_http_call(&c.upstream, headers, None, vec![], Duration::from_secs(1))
        {
            log::warn!("token-gate: fetch not sent: {e:?}");
        }
    }

    fn count_fetch(&self) -> u64 {
        loop {
            let (v, cas) = self.get_shared_data("fetches");
            let n = v
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            if self
                .set_shared_data("fetches", Some(n.to_string().as_bytes()), cas)
                .is_ok()
            {
                return n;
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _t: usize) {
        let ok = self.get_http_call_response_header(":status").as_deref() == Some("200");
        let waiting = std::mem::take(&mut *self.shared.waiting.borrow_mut());
        if ok {
            let n = self.count_fetch();
            let token = format!("t{n}");
            *self.shared.token.borrow_mut() = Some(token.clone());
            for id in waiting {
                // the request's context: its headers, then on its way
                if hostcalls::set_effective_context(id).is_ok() {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-token", Some(&token));
                    let _ = hostcalls::resume_http_request();
                }
            }
        } else {
            for id in waiting {
                if hostcalls::set_effective_context(id).is_ok() {
                    let _ = hostcalls::send_http_response(
                        503,
                        vec![("x-gate", "no-token")],
                        Some(b"no token\n"),
                    );
                }
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) => self.config = c,
            Err(e) => {
                log::error!("token-gate: bad configuration: {e}");
                return false;
            }
        }
        if self.config.tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(self.config.tick_ms));
        }
        if !self.config.queue.is_empty() {
            self.queue = self.register_shared_queue(&self.config.queue);
        }
        self.fetch();
        true
    }

    fn on_tick(&mut self) {
        // no such context: BadArgument, and the root stays the effective context
        let r = hostcalls::set_effective_context(9_999);
        self.shared
            .bad_context
            .set(if r == Err(Status::BadArgument) { 2 } else { -1 });
        self.fetch();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = self.dequeue_shared_queue(queue_id) {
            let waiting = std::mem::take(&mut *self.shared.waiting_queue.borrow_mut());
            for id in waiting {
                if hostcalls::set_effective_context(id).is_ok() {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-token", Some("queued"));
                    let _ = hostcalls::resume_http_request();
                }
            }
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Gate {
            id,
            shared: self.shared.clone(),
            queue: self.config.queue.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Gate {
    id: u32,
    shared: Rc<Shared>,
    queue: String,
}

impl Context for Gate {}

impl HttpContext for Gate {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.ends_with("/kick") {
            if let Ok(Some(q)) = hostcalls::resolve_shared_queue("", &self.queue) {
                let _ = self.enqueue_shared_queue(q, Some(b"open"));
            }
            return Action::Continue;
        }
        if path.contains("/queue") {
            self.shared.waiting_queue.borrow_mut().push(self.id);
            return Action::Pause;
        }
        let token = self.shared.token.borrow().clone();
        match token {
            Some(t) => {
                self.set_http_request_header("x-token", Some(&t));
                Action::Continue
            }
            None => {
                self.shared.waiting.borrow_mut().push(self.id);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let fetches = self
            .get_shared_data("fetches")
            .0
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default();
        self.set_http_response_header("x-fetches", Some(&fetches));
        let bad = self.shared.bad_context.get().to_string();
        self.set_http_response_header("x-bad-context", Some(&bad));
        Action::Continue
    }
}
