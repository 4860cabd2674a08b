//! Streams: sets the response at once, then writes "event N\n" three times, 100 ms apart
//! (like a server-sent-events function). The host must deliver each event as written.
//! The body ends with a trailer, `x-events: 3`.
use wasi::clocks::monotonic_clock::subscribe_duration;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

const EVENTS: u32 = 3;
const GAP_NS: u64 = 100_000_000;

struct Stream;

impl wasi::exports::http::incoming_handler::Guest for Stream {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let headers = Fields::from_list(&[("content-type".into(), b"text/event-stream".to_vec())])
            .expect("valid header");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("body taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("stream taken once");
        for i in 0..EVENTS {
            if i > 0 {
                subscribe_duration(GAP_NS).block();
            }
            stream
                .blocking_write_and_flush(format!("event {i}\n").as_bytes())
                .expect("write body");
        }
        drop(stream);
        let trailers = Fields::from_list(&[("x-events".into(), EVENTS.to_string().into_bytes())])
            .expect("valid trailer");
        OutgoingBody::finish(body, Some(trailers)).expect("finish body");
    }
}

wasi::http::proxy::export!(Stream);
