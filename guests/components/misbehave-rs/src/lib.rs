//! Hostile, by path: `/panic` panics (a trap), `/silent` returns without setting a response.
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Misbehave;

impl wasi::exports::http::incoming_handler::Guest for Misbehave {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        match request.path_with_query().unwrap_or_default().as_str() {
            "/panic" => panic!("misbehave-rs panics on purpose"),
            _ => drop(out),
        }
    }
}

wasi::http::proxy::export!(Misbehave);
