//! Hostile: allocates (and touches) 1 MiB blocks until memory runs out. The host's memory
//! limit must stop it; the allocation failure aborts the guest (a trap).
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Bomb;

impl wasi::exports::http::incoming_handler::Guest for Bomb {
    fn handle(_request: IncomingRequest, _out: ResponseOutparam) {
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        loop {
            blocks.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&blocks);
        }
    }
}

wasi::http::proxy::export!(Bomb);
