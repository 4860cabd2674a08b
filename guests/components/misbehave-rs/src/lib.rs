//! Hostile, by the path's last segment: `/panic` panics (a trap), `/silent` (and anything unknown) returns
//! without setting a response. For the reuse mode, the instance's own state shows:
//! `/count` answers how many requests this instance has seen (1 on a fresh instance),
//! `/leak` answers but keeps its response body open past the call (a resource of the
//! request left in the table), `/grow?MIB` keeps MIB more MiB of linear memory and answers. `/huge?MIB`
//! streams MIB MiB of body (no Content-Length); `/huge-declared?MIB` declares it first.
use std::sync::atomic::{AtomicU32, Ordering};
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

static SEEN: AtomicU32 = AtomicU32::new(0);
static mut KEPT: Vec<Vec<u8>> = Vec::new();

struct Misbehave;

fn answer(out: ResponseOutparam, text: &str) -> OutgoingBody {
    let headers = Fields::new();
    let response = OutgoingResponse::new(headers);
    let body = response.body().expect("body taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().expect("stream taken once");
    stream
        .blocking_write_and_flush(text.as_bytes())
        .expect("write body");
    drop(stream);
    body
}

impl wasi::exports::http::incoming_handler::Guest for Misbehave {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let seen = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
        let path = request.path_with_query().unwrap_or_default();
        drop(request);
        let (path, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
        match (path.rsplit('/').next().unwrap_or_default(), query) {
            ("panic", _) => panic!("misbehave-rs panics on purpose"),
            ("count", _) => {
                OutgoingBody::finish(answer(out, &seen.to_string()), None).expect("finish")
            }
            ("leak", _) => {
                // the response body is written but never finished nor dropped
                std::mem::forget(answer(out, "leaked"));
            }
            ("grow", mib) => {
                let mib: usize = mib.parse().unwrap_or(1);
                // SAFETY: one request at a time runs in an instance (wasm is single-threaded).
                #[allow(static_mut_refs)]
                unsafe {
                    KEPT.push(vec![1u8; mib << 20])
                };
                OutgoingBody::finish(answer(out, "grown"), None).expect("finish")
            }
            (which @ ("huge" | "huge-declared"), mib) => {
                let len = mib.parse::<u64>().unwrap_or(1) << 20;
                let headers = Fields::new();
                if which == "huge-declared" {
                    let value = len.to_string().into_bytes();
                    headers.append("content-length", &value).expect("header");
                }
                let response = OutgoingResponse::new(headers);
                let body = response.body().expect("body taken once");
                ResponseOutparam::set(out, Ok(response));
                let stream = body.write().expect("stream taken once");
                let chunk = vec![b'x'; 4096]; // blocking-write-and-flush takes at most 4096 bytes
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if stream.blocking_write_and_flush(&chunk[..n]).is_err() {
                        return; // the host stopped reading
                    }
                    left -= n as u64;
                }
                drop(stream);
                let _ = OutgoingBody::finish(body, None);
            }
            _ => drop(out),
        }
    }
}

wasi::http::proxy::export!(Misbehave);
