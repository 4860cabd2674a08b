//! A function using its tenant's state: `wasi:keyvalue` (the tenant's store) and
//! `wasi:config` (the tenant's secrets), as wasmgate grants them.
//!
//! Paths (after any prefix the route keeps):
//! - `GET /kv/KEY` reads a key (404 when absent); `PUT /kv/KEY` stores the body;
//!   `DELETE /kv/KEY` deletes it; `POST /incr/KEY` adds 1 and answers the count;
//!   `GET /list` lists the keys, one per line; `GET /time/KEY` reads a key and answers
//!   how long the read took inside the guest, in nanoseconds (the benchmark's figure);
//! - `GET /bucket/NAME` opens a bucket by name (only `default` exists);
//! - `GET /config/NAME` answers a configuration value (a secret), 404 when absent;
//! - anything else answers "plain" without touching the store (the benchmark baseline).
//!
//! A store error answers 503 with the error.

mod bindings {
    wit_bindgen::generate!({
        path: "../../../wit/host",
        world: "wasmgate:host/state",
        generate_all,
    });
}

use bindings::wasi::config::store as config;
use bindings::wasi::keyvalue::{atomics, store};
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Kv;

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .expect("valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("body taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = outgoing.write().expect("stream taken once");
    for chunk in body.chunks(4096) {
        stream.blocking_write_and_flush(chunk).expect("write body");
    }
    drop(stream);
    OutgoingBody::finish(outgoing, None).expect("finish body");
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("body consumed once");
    let stream = body.stream().expect("stream taken once");
    let mut all = Vec::new();
    while let Ok(chunk) = stream.blocking_read(64 * 1024) {
        all.extend_from_slice(&chunk);
    }
    all
}

fn fail(out: ResponseOutparam, e: store::Error) {
    let text = match e {
        store::Error::NoSuchStore => "no-such-store".to_string(),
        store::Error::AccessDenied => "access-denied".to_string(),
        store::Error::Other(s) => s,
    };
    respond(out, 503, text.as_bytes());
}

impl wasi::exports::http::incoming_handler::Guest for Kv {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        // the route may keep a prefix: the action is the first known word in the path
        let path = request.path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or("").to_string();
        let words = ["kv/", "incr/", "config/", "list", "time/", "bucket/"];
        let at = words
            .iter()
            .filter_map(|w| path.find(&format!("/{w}")).map(|i| i + 1))
            .min()
            .unwrap_or(path.len());
        let segs: Vec<&str> = path[at..].splitn(2, '/').filter(|s| !s.is_empty()).collect();
        let method = request.method();
        if let ["bucket", name] = segs.as_slice() {
            return match store::open(name) {
                Ok(_) => respond(out, 200, b"opened"),
                Err(e) => fail(out, e),
            };
        }
        if let ["config", name] = segs.as_slice() {
            return match config::get(name) {
                Ok(Some(v)) => respond(out, 200, v.as_bytes()),
                Ok(None) => respond(out, 404, b"not set"),
                Err(_) => respond(out, 503, b"config error"),
            };
        }
        if !matches!(segs.as_slice(), ["kv", _] | ["incr", _] | ["list"] | ["time", _]) {
            return respond(out, 200, b"plain");
        }
        let bucket = match store::open("default") {
            Ok(b) => b,
            Err(e) => return fail(out, e),
        };
        match (segs.as_slice(), method) {
            (["kv", key], Method::Get) => match bucket.get(key) {
                Ok(Some(v)) => respond(out, 200, &v),
                Ok(None) => respond(out, 404, b"absent"),
                Err(e) => fail(out, e),
            },
            (["kv", key], Method::Put) => {
                let body = read_body(&request);
                match bucket.set(key, &body) {
                    Ok(()) => respond(out, 204, b""),
                    Err(e) => fail(out, e),
                }
            }
            (["kv", key], Method::Delete) => match bucket.delete(key) {
                Ok(()) => respond(out, 204, b""),
                Err(e) => fail(out, e),
            },
            (["incr", key], _) => match atomics::increment(&bucket, key, 1) {
                Ok(n) => respond(out, 200, n.to_string().as_bytes()),
                Err(e) => fail(out, e),
            },
            (["time", key], _) => {
                // how long one read of the store takes, seen from the guest (ns)
                let start = wasi::clocks::monotonic_clock::now();
                match bucket.get(key) {
                    Ok(_) => {
                        let ns = wasi::clocks::monotonic_clock::now() - start;
                        respond(out, 200, ns.to_string().as_bytes())
                    }
                    Err(e) => fail(out, e),
                }
            }
            (["list"], _) => match bucket.list_keys(None) {
                Ok(r) => respond(out, 200, r.keys.join("\n").as_bytes()),
                Err(e) => fail(out, e),
            },
            _ => respond(out, 405, b"method not allowed"),
        }
    }
}

wasi::http::proxy::export!(Kv);
