//! Compute-bound: runs N rounds of a xorshift PRNG (N from the query, `/?n=1000000`) and
//! answers the final state. Measures what the CPU-budget mechanism costs guest code.
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Work;

fn rounds(path: &str) -> u64 {
    path.split_once("n=")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1_000_000)
}

impl wasi::exports::http::incoming_handler::Guest for Work {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let n = rounds(&request.path_with_query().unwrap_or_default());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("body taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("stream taken once");
        stream
            .blocking_write_and_flush(format!("{x}\n").as_bytes())
            .expect("write body");
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}

wasi::http::proxy::export!(Work);
