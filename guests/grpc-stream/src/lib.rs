//! A gRPC stream client in the rate-limit / ext-authz style: `on_http_request_headers`
//! opens a bidirectional stream to the `streamer` upstream (`test.Streamer/Chat`), sends
//! two messages and pauses; the stream's events are noted as they come (initial and
//! trailing metadata, each message), a reply `echo:ping:2` is answered with `bye` and
//! the end of the guest's side, and the stream's close decides the request: status 0
//! resumes it with the events in `x-stream-log`, any other status denies it (403, the
//! same log, the status and message from `proxy_get_status`). With `x-half-close` the
//! guest ends its side with `close_grpc_stream` instead of `bye`.
//!
//! `x-mode` picks other behaviours, for tests: `refused` opens a stream to an upstream the
//! module was not granted; `send-errors` tries `proxy_grpc_send` on a call's token and on
//! unknown stream tokens; `cancel` cancels the stream at its initial metadata and answers
//! after a unary call, so any later event of the stream would show in the log; `hold`
//! opens a stream the upstream never ends; `deny` one the upstream refuses at once;
//! `limits` opens streams until one is refused, then sends a message over 1 MiB.
//! With the plugin configuration `root`, the root context has a stream of its own (see
//! [`Root`]); `x-mode: root-log` answers with what it saw.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

const UPSTREAM: &str = "streamer";
const SERVICE: &str = "test.Streamer";

const ROOT_LOG: &str = "grpc-stream-root-log";

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { opened: false })
    });
}}

/// With the plugin configuration `root`, the root context opens a stream of its own on
/// its first `on_tick`, talks on it as the HTTP contexts do, and keeps its log in shared
/// data (`x-mode: root-log` answers with it).
struct Root {
    opened: bool,
}

impl Root {
    fn note(&self, line: String) {
        let (old, _) = self.get_shared_data(ROOT_LOG);
        let mut log = old.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if !log.is_empty() {
            log.push(',');
        }
        log.push_str(&line);
        let _ = self.set_shared_data(ROOT_LOG, Some(log.as_bytes()), None);
    }
}

impl Context for Root {
    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, _n: u32) {
        let v = self
            .get_grpc_stream_initial_metadata_value("x-initial")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.note(format!("init:{v}"));
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let msg = self.get_grpc_stream_message(0, size).unwrap_or_default();
        let msg = String::from_utf8_lossy(&msg).into_owned();
        self.note(format!("msg:{msg}"));
        if msg == "echo:ping:2" {
            self.send_grpc_stream_message(token, Some(b"bye"), true);
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, _n: u32) {
        let v = self
            .get_grpc_stream_trailing_metadata_value("x-trailer")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.note(format!("trailers:{v}"));
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        let (code, msg) = self.get_grpc_status();
        self.note(format!("close:{status}:{code}:{}", msg.unwrap_or_default()));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        if self.get_plugin_configuration().unwrap_or_default() == b"root" {
            self.set_tick_period(Duration::from_millis(100));
        }
        true
    }

    fn on_tick(&mut self) {
        if self.opened {
            return;
        }
        self.opened = true;
        self.set_tick_period(Duration::from_secs(0));
        let meta = vec![("x-from", &b"root"[..]), ("x-want-status", &b"0"[..])];
        match self.open_grpc_stream(UPSTREAM, SERVICE, "Chat", meta) {
            Ok(t) => {
                self.note(format!("open:{}", t % 2));
                self.send_grpc_stream_message(t, Some(b"ping:1"), false);
                self.send_grpc_stream_message(t, Some(b"ping:2"), false);
            }
            Err(e) => self.note(format!("open:{e:?}")),
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            log: Vec::new(),
            mode: String::new(),
            stream: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    log: Vec<String>,
    mode: String,
    stream: u32,
}

impl Filter {
    fn log_header(&self) -> String {
        self.log.join(",")
    }
}

impl Context for Filter {
    fn on_grpc_stream_initial_metadata(&mut self, token: u32, _n: u32) {
        let v = self
            .get_grpc_stream_initial_metadata_value("x-initial")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.log.push(format!("init:{v}"));
        if self.mode == "cancel" && token == self.stream {
            self.cancel_grpc_stream(token);
            // a unary call answers the request later: by then any event of the
            // cancelled stream would have been noted
            let _ = self.dispatch_grpc_call(
                UPSTREAM,
                SERVICE,
                "Delay",
                vec![],
                Some(b"later"),
                Duration::from_secs(2),
            );
        }
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let msg = self.get_grpc_stream_message(0, size).unwrap_or_default();
        let msg = String::from_utf8_lossy(&msg).into_owned();
        self.log.push(format!("msg:{msg}"));
        if msg == "echo:ping:2" {
            if self.get_http_request_header("x-half-close").is_some() {
                self.close_grpc_stream(token);
            } else {
                self.send_grpc_stream_message(token, Some(b"bye"), true);
            }
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, _n: u32) {
        let v = self
            .get_grpc_stream_trailing_metadata_value("x-trailer")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.log.push(format!("trailers:{v}"));
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        let (code, msg) = self.get_grpc_status();
        let msg = msg.unwrap_or_default();
        self.log.push(format!("close:{status}:{code}:{msg}"));
        let log = self.log_header();
        if status == 0 {
            self.set_http_request_header("x-stream-log", Some(&log));
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![("x-stream-log", &log)], Some(b"denied\n"));
        }
    }

    fn on_grpc_call_response(&mut self, _token: u32, status: u32, _size: usize) {
        self.log.push(format!("call:{status}"));
        let log = self.log_header();
        self.send_http_response(200, vec![("x-stream-log", &log)], None);
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.mode = self.get_http_request_header("x-mode").unwrap_or_default();
        let want = self
            .get_http_request_header("x-want-status")
            .unwrap_or_else(|| "0".into());
        let meta = vec![("x-from", &b"guest"[..]), ("x-want-status", want.as_bytes())];
        match self.mode.as_str() {
            "root-log" => {
                let (log, _) = self.get_shared_data(ROOT_LOG);
                let log = log.map(|b| String::from_utf8_lossy(&b).into_owned());
                let log = log.unwrap_or_default();
                self.send_http_response(200, vec![("x-root-log", &log)], None);
                Action::Pause
            }
            "limits" => {
                // streams until the host refuses one, then a message over 1 MiB
                let mut open = Vec::new();
                let refused = loop {
                    match self.open_grpc_stream(UPSTREAM, SERVICE, "Hold", meta.clone()) {
                        Ok(t) => open.push(t),
                        Err(e) => break e,
                    }
                    if open.len() > 100 {
                        break Status::Ok;
                    }
                };
                let big = vec![0u8; (1 << 20) + 1];
                let sent = hostcalls::send_grpc_stream_message(open[0], Some(&big), false);
                let r = format!("{},{refused:?},{sent:?}", open.len());
                self.send_http_response(200, vec![("x-result", &r)], None);
                Action::Pause
            }
            "refused" => {
                let r = self.open_grpc_stream("other", SERVICE, "Chat", meta);
                self.send_http_response(200, vec![("x-result", &format!("{r:?}"))], None);
                Action::Pause
            }
            "send-errors" => {
                let call = self
                    .dispatch_grpc_call(
                        UPSTREAM,
                        SERVICE,
                        "Unary",
                        vec![],
                        Some(b"x"),
                        Duration::from_secs(1),
                    )
                    .unwrap_or(0);
                let on_call = hostcalls::send_grpc_stream_message(call, Some(b"x"), false);
                let unknown = hostcalls::send_grpc_stream_message(1000, Some(b"x"), false);
                let close = hostcalls::close_grpc_stream(1002);
                let cancel = hostcalls::cancel_grpc_stream(1004);
                let _ = hostcalls::cancel_grpc_call(call);
                let r = format!("{on_call:?},{unknown:?},{close:?},{cancel:?}");
                self.send_http_response(200, vec![("x-result", &r)], None);
                Action::Pause
            }
            mode => {
                let method = match mode {
                    "hold" => "Hold",
                    "deny" => "Deny",
                    _ => "Chat",
                };
                match self.open_grpc_stream(UPSTREAM, SERVICE, method, meta) {
                    Ok(t) => {
                        self.stream = t;
                        self.log.push(format!("open:{}", t % 2));
                        self.send_grpc_stream_message(t, Some(b"ping:1"), false);
                        self.send_grpc_stream_message(t, Some(b"ping:2"), false);
                        Action::Pause
                    }
                    Err(e) => {
                        let r = format!("{e:?}");
                        self.send_http_response(500, vec![("x-result", &r)], None);
                        Action::Pause
                    }
                }
            }
        }
    }
}
