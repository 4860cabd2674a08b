//! Hostile: spins forever without answering. The host's CPU budget must stop it.
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Spin;

impl wasi::exports::http::incoming_handler::Guest for Spin {
    fn handle(_request: IncomingRequest, _out: ResponseOutparam) {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

wasi::http::proxy::export!(Spin);
