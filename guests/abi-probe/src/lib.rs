//! Exercises every host call of the Proxy-Wasm v0.2.1 ABI that wasmgate offers and
//! checks each result from inside the guest. The answer lists what failed, so the test
//! through the real gateway asserts on an empty list.
//!
//! - `GET /probe`: headers, properties, shared data, queues, metrics, logging, time,
//!   an HTTP callout to the `echo` upstream, unsupported calls; answers with a local
//!   response `{"failed": [...], "checks": N, "ticks": T}`.
//! - `POST /probe/body`: buffers the request body and replaces it, then changes response
//!   headers and body: the client gets `{"upstream": <echo>, "failed": [...]}`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { vm_ok: false }) });
}}

struct Root {
    vm_ok: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, size: usize) -> bool {
        let cfg = self.get_vm_configuration().unwrap_or_default();
        self.vm_ok = cfg == b"probe-vm" && size == cfg.len();
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let cfg = self.get_plugin_configuration().unwrap_or_default();
        if cfg.len() != size || !cfg.starts_with(b"{") {
            return false;
        }
        self.set_tick_period(Duration::from_millis(20));
        self.register_shared_queue("probe-ready");
        self.vm_ok
    }

    fn on_tick(&mut self) {
        let (v, cas) = self.get_shared_data("ticks");
        let n = v
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let _ = self.set_shared_data("ticks", Some((n + 1).to_string().as_bytes()), cas);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut n = 0;
        while let Ok(Some(_)) = self.dequeue_shared_queue(queue_id) {
            n += 1;
        }
        let (v, cas) = self.get_shared_data("queue_ready_items");
        let seen = v
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let _ = self.set_shared_data(
            "queue_ready_items",
            Some((seen + n).to_string().as_bytes()),
            cas,
        );
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            failed: Vec::new(),
            checks: 0,
            body_mode: false,
            upstream_body: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    failed: Vec<String>,
    checks: u32,
    body_mode: bool,
    upstream_body: Vec<u8>,
}

impl Probe {
    fn check(&mut self, name: &str, ok: bool) {
        self.checks += 1;
        if !ok {
            self.failed.push(name.to_string());
        }
    }

    fn prop(&self, path: &str) -> Option<String> {
        self.get_property(path.split('.').collect())
            .and_then(|b| String::from_utf8(b).ok())
    }

    fn report(&self) -> String {
        let failed: Vec<String> = self.failed.iter().map(|f| format!("\"{f}\"")).collect();
        let ticks = self
            .get_shared_data("ticks")
            .0
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_else(|| "0".into());
        let queued = self
            .get_shared_data("queue_ready_items")
            .0
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_else(|| "0".into());
        format!(
            "{{\"failed\":[{}],\"checks\":{},\"ticks\":{},\"queue_ready_items\":{}}}",
            failed.join(","),
            self.checks,
            ticks,
            queued
        )
    }

    fn headers_and_properties(&mut self) {
        let h = |s: &Self, n: &str| s.get_http_request_header(n);
        let v = h(self, "x-probe");
        self.check("get_header", v.as_deref() == Some("1"));
        self.check("get_missing_header", h(self, "x-not-there").is_none());
        self.check(":method", h(self, ":method").as_deref() == Some("GET"));
        self.check(
            ":path",
            h(self, ":path").is_some_and(|p| p.starts_with("/probe")),
        );
        self.check(
            ":authority",
            h(self, ":authority").is_some_and(|a| !a.is_empty()),
        );
        self.check(":scheme", h(self, ":scheme").as_deref() == Some("http"));
        let pairs = self.get_http_request_headers();
        self.check(
            "get_pairs",
            pairs.iter().any(|(k, v)| k == "x-probe" && v == "1"),
        );
        // as in Envoy, HTTP/1's Host is only `:authority` in the map
        self.check(
            "host_is_authority",
            pairs.iter().any(|(k, _)| k == ":authority") && !pairs.iter().any(|(k, _)| k == "host"),
        );
        self.add_http_request_header("x-added", "a");
        self.check("add_header", h(self, "x-added").as_deref() == Some("a"));
        self.set_http_request_header("x-probe", Some("2"));
        self.check("replace_header", h(self, "x-probe").as_deref() == Some("2"));
        self.set_http_request_header("x-remove-me", None);
        self.check("remove_header", h(self, "x-remove-me").is_none());
        let mut all: Vec<(String, String)> = self.get_http_request_headers();
        all.push(("x-set-pairs".into(), "yes".into()));
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.set_http_request_headers(refs);
        self.check(
            "set_pairs",
            h(self, "x-set-pairs").as_deref() == Some("yes")
                && h(self, "x-added").as_deref() == Some("a"),
        );

        self.check(
            "prop request.path",
            self.prop("request.path")
                .is_some_and(|p| p.starts_with("/probe")),
        );
        self.check(
            "prop request.url_path",
            self.prop("request.url_path").as_deref() == Some("/probe"),
        );
        self.check(
            "prop request.method",
            self.prop("request.method").as_deref() == Some("GET"),
        );
        self.check(
            "prop request.host",
            self.prop("request.host").is_some_and(|p| !p.is_empty()),
        );
        self.check(
            "prop request.scheme",
            self.prop("request.scheme").as_deref() == Some("http"),
        );
        self.check(
            "prop request.protocol",
            self.prop("request.protocol")
                .is_some_and(|p| p.starts_with("HTTP/")),
        );
        self.check(
            "prop request.id",
            self.prop("request.id").is_some_and(|p| !p.is_empty()),
        );
        self.check(
            "prop request.headers",
            self.get_property(vec!["request", "headers"])
                .is_some_and(|b| b.len() > 8),
        );
        self.check(
            "prop source.address",
            self.prop("source.address")
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
        );
        self.check(
            "prop destination.address",
            self.prop("destination.address")
                .is_some_and(|p| p.contains(':')),
        );
        self.check(
            "prop plugin_name",
            self.prop("plugin_name").as_deref() == Some("probe"),
        );
        self.check(
            "prop plugin_root_id",
            self.prop("plugin_root_id").as_deref() == Some("probe-root"),
        );
        self.check(
            "prop unknown",
            self.get_property(vec!["no", "such"]).is_none(),
        );
        self.set_property(vec!["my", "prop"], Some(b"v"));
        self.check("set_property", self.prop("my.prop").as_deref() == Some("v"));
        self.check(
            "request.headers.<name>",
            self.get_property(vec!["request", "headers", "x-added"]).as_deref() == Some(&b"a"[..]),
        );
        self.check(
            "request.referer",
            self.get_property(vec!["request", "referer"]).as_deref()
                == Some(&b"https://from.example/"[..]),
        );
        let eight = |v: Option<Vec<u8>>| {
            v.and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_le_bytes)
                .unwrap_or(-1)
        };
        // after 2026-01-01, in nanoseconds
        self.check(
            "request.time",
            eight(self.get_property(vec!["request", "time"])) > 1_767_225_600_000_000_000,
        );
        self.check(
            "request.duration",
            eight(self.get_property(vec!["request", "duration"])) >= 0,
        );
        // no body on a GET: no declared length, nothing received
        self.check(
            "request.size",
            eight(self.get_property(vec!["request", "size"])) == 0,
        );
        self.check(
            "request.total_size",
            eight(self.get_property(vec!["request", "total_size"])) > 20,
        );
        self.check(
            "connection.id",
            eight(self.get_property(vec!["connection", "id"])) > 0,
        );
        self.check(
            "connection.mtls",
            self.get_property(vec!["connection", "mtls"]) == Some(vec![0]),
        );
        self.check(
            "connection.requested_server_name",
            // empty without TLS (the SDK reads an empty value as None)
            self.get_property(vec!["connection", "requested_server_name"])
                .unwrap_or_default()
                .is_empty(),
        );
        // plain HTTP here: no TLS facts
        self.check(
            "connection.tls_version",
            self.get_property(vec!["connection", "tls_version"]).is_none(),
        );
        self.check(
            "connection.uri_san_peer_certificate",
            self.get_property(vec!["connection", "uri_san_peer_certificate"]).is_none(),
        );
        // not chosen before the request goes upstream
        self.check(
            "upstream.address before",
            self.get_property(vec!["upstream", "address"]).is_none(),
        );
        self.check(
            "response.code_details before",
            self.get_property(vec!["response", "code_details"]).is_none(),
        );
        self.check(
            "response.flags",
            eight(self.get_property(vec!["response", "flags"])) == 0,
        );
        self.check("node.id", self.prop("node.id").as_deref() == Some("probe-node"));
        self.check(
            "node.cluster",
            self.prop("node.cluster").as_deref() == Some("edge"),
        );
        self.check(
            "node.metadata.<key>",
            self.get_property(vec!["node", "metadata", "zone"]).as_deref() == Some(&b"z1"[..]),
        );
        // the whole node is the protobuf message: id (field 1) first
        self.check(
            "node",
            self.get_property(vec!["node"])
                .is_some_and(|b| b.starts_with(b"\x0a\x0aprobe-node")),
        );
        self.check(
            "get_status outside a callout",
            hostcalls::get_grpc_status().is_ok_and(|(code, _)| code == 0),
        );
    }

    fn shared_queues_metrics_misc(&mut self) {
        let key = format!("k-{}", self.prop("request.id").unwrap_or_default());
        let set = self.set_shared_data(&key, Some(b"v1"), None);
        let (v, cas) = self.get_shared_data(&key);
        self.check(
            "shared set/get",
            set.is_ok() && v.as_deref() == Some(&b"v1"[..]) && cas.is_some(),
        );
        let stale = cas.map(|c| c.wrapping_add(7));
        self.check(
            "shared cas mismatch",
            self.set_shared_data(&key, Some(b"v2"), stale) == Err(Status::CasMismatch),
        );
        self.check(
            "shared cas ok",
            self.set_shared_data(&key, Some(b"v3"), cas).is_ok(),
        );
        self.check(
            "shared missing",
            self.get_shared_data("never-set-key").0.is_none(),
        );

        let q = self.register_shared_queue("probe-q");
        self.check(
            "queue resolve",
            self.resolve_shared_queue("any-vm", "probe-q") == Some(q),
        );
        self.check(
            "queue enqueue",
            self.enqueue_shared_queue(q, Some(b"item")).is_ok(),
        );
        self.check(
            "queue dequeue",
            self.dequeue_shared_queue(q) == Ok(Some(b"item".to_vec())),
        );
        self.check("queue empty", self.dequeue_shared_queue(q) == Ok(None));
        // the root context registered this one: it is told by on_queue_ready
        match self.resolve_shared_queue("any-vm", "probe-ready") {
            Some(ready) => self.check(
                "notify enqueue",
                self.enqueue_shared_queue(ready, Some(b"note")).is_ok(),
            ),
            None => self.check("notify queue registered", false),
        }

        match hostcalls::define_metric(MetricType::Counter, "probe_requests") {
            Ok(id) => {
                let before = hostcalls::get_metric(id).unwrap_or(u64::MAX);
                let inc = hostcalls::increment_metric(id, 3);
                self.check(
                    "metric counter",
                    inc.is_ok() && hostcalls::get_metric(id) == Ok(before + 3),
                );
            }
            Err(_) => self.check("metric define counter", false),
        }
        match hostcalls::define_metric(MetricType::Gauge, "probe_gauge") {
            Ok(id) => {
                let _ = hostcalls::record_metric(id, 42);
                self.check("metric gauge", hostcalls::get_metric(id) == Ok(42));
            }
            Err(_) => self.check("metric define gauge", false),
        }
        match hostcalls::define_metric(MetricType::Histogram, "probe_hist") {
            Ok(id) => self.check("metric histogram", hostcalls::record_metric(id, 5).is_ok()),
            Err(_) => self.check("metric define histogram", false),
        }
        for level in [
            LogLevel::Trace,
            LogLevel::Debug,
            LogLevel::Info,
            LogLevel::Warn,
            LogLevel::Error,
            LogLevel::Critical,
        ] {
            self.checks += 1;
            if hostcalls::log(level, "probe log line").is_err() {
                self.failed.push(format!("log {level:?}"));
            }
        }
        self.check("log level", hostcalls::get_log_level().is_ok());
        let now = self.get_current_time();
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.check("current time", secs > 1_600_000_000);
        self.check(
            "plugin config buffer",
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, 1)
                .ok()
                .flatten()
                .as_deref()
                == Some(&b"{"[..]),
        );
        self.check(
            "vm config buffer",
            hostcalls::get_buffer(BufferType::VmConfiguration, 0, 100)
                .ok()
                .flatten()
                .as_deref()
                == Some(&b"probe-vm"[..]),
        );
        self.check(
            "grpc call to an upstream not granted",
            self.dispatch_grpc_call("nope", "s", "m", vec![], None, Duration::from_secs(1))
                .is_err(),
        );
        self.check(
            "callout to unknown upstream",
            self.dispatch_http_call(
                "nope",
                vec![(":path", "/")],
                None,
                vec![],
                Duration::from_secs(1),
            )
            .is_err(),
        );
    }
}

impl Context for Probe {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        n_headers: usize,
        body_size: usize,
        _t: usize,
    ) {
        self.check("callout answered", n_headers > 0);
        self.check(
            "get_status of an answered callout",
            hostcalls::get_grpc_status().is_ok_and(|(code, _)| code == 0),
        );
        let status = self.get_http_call_response_header(":status");
        self.check("callout status", status.as_deref() == Some("200"));
        let hs = self.get_http_call_response_headers();
        self.check(
            "callout header pairs",
            hs.iter().any(|(k, _)| k == "x-upstream"),
        );
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        self.check(
            "callout body",
            String::from_utf8_lossy(&body).contains("callout-ping"),
        );
        let report = self.report();
        self.send_http_response(
            200,
            vec![("content-type", "application/json"), ("x-probe", "done")],
            Some(report.as_bytes()),
        );
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.starts_with("/probe/body") {
            self.body_mode = true;
            self.check("headers not end of stream", !eos);
            let size = self.get_property(vec!["request", "size"]);
            self.check("request.size declared", size == Some(10i64.to_le_bytes().to_vec()));
            return Action::Continue;
        }
        self.headers_and_properties();
        self.shared_queues_metrics_misc();
        match self.dispatch_http_call(
            "echo",
            vec![
                (":method", "POST"),
                (":path", "/callout"),
                (":authority", "echo"),
            ],
            Some(b"callout-ping"),
            vec![],
            Duration::from_secs(2),
        ) {
            Ok(_) => Action::Pause,
            Err(_) => {
                self.check("dispatch_http_call", false);
                let report = self.report();
                self.send_http_response(200, vec![], Some(report.as_bytes()));
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause; // buffer the whole body
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        self.check("request body buffered", body == b"hello body");
        self.set_http_request_body(0, size, b"REPLACED");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.body_mode {
            self.check(
                ":status",
                self.get_http_response_header(":status").as_deref() == Some("200"),
            );
            self.check(
                "response header",
                self.get_http_response_header("x-upstream").is_some(),
            );
            self.set_http_response_header("x-probe-response", Some("yes"));
            // the body will change length: drop Content-Length, as filters do in Envoy
            self.set_http_response_header("content-length", None);
            self.check(
                "prop response.code",
                self.get_property(vec!["response", "code"]) == Some(200i64.to_le_bytes().to_vec()),
            );
            self.check(
                "upstream.address",
                self.prop("upstream.address")
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
            );
            let port = self
                .get_property(vec!["upstream", "port"])
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_le_bytes);
            self.check(
                "upstream.port",
                port.is_some_and(|p| {
                    self.prop("upstream.address")
                        .is_some_and(|a| a.ends_with(&format!(":{p}")))
                }),
            );
            self.check(
                "response.code_details",
                self.prop("response.code_details").as_deref() == Some("via_upstream"),
            );
            self.check(
                "response.total_size",
                self.get_property(vec!["response", "total_size"])
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .is_some_and(|b| i64::from_le_bytes(b) > 20),
            );
            self.check(
                "request.size received",
                self.get_property(vec!["request", "size"]) == Some(10i64.to_le_bytes().to_vec()),
            );
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.body_mode {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        self.upstream_body = self.get_http_response_body(0, size).unwrap_or_default();
        let up = String::from_utf8_lossy(&self.upstream_body).to_string();
        self.check("upstream saw replaced body", up.contains("REPLACED"));
        let failed: Vec<String> = self.failed.iter().map(|f| format!("\"{f}\"")).collect();
        let new = format!("{{\"upstream\":{up},\"failed\":[{}]}}", failed.join(","));
        self.set_http_response_body(0, size, new.as_bytes());
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Ok(id) = hostcalls::define_metric(MetricType::Counter, "probe_logged") {
            let _ = hostcalls::increment_metric(id, 1);
        }
        // the sizes of what was sent are known once it is sent: counted when wrong
        let eight = |v: Option<Vec<u8>>| {
            v.and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_le_bytes)
                .unwrap_or(-1)
        };
        let size = eight(self.get_property(vec!["response", "size"]));
        let total = eight(self.get_property(vec!["response", "total_size"]));
        let details = self.prop("response.code_details");
        let ok = size > 0
            && total > size
            && (!self.body_mode || details.as_deref() == Some("via_upstream"));
        if let Ok(id) = hostcalls::define_metric(MetricType::Counter, "probe_log_wrong") {
            let _ = hostcalls::increment_metric(id, if ok { 0 } else { 1 });
        }
    }
}
