//! Reads the whole request body and answers it uppercased (ASCII).
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::StreamError;

struct Echo;

impl wasi::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let mut input = Vec::new();
        if let Ok(body) = request.consume() {
            let stream = body.stream().expect("stream taken once");
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => input.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(_)) => break,
                }
            }
            drop(stream);
            let _ = IncomingBody::finish(body);
        }
        input.make_ascii_uppercase();
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("body taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("stream taken once");
        // blocking_write_and_flush takes at most 4096 bytes a call.
        for chunk in input.chunks(4096) {
            stream.blocking_write_and_flush(chunk).expect("write body");
        }
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}

wasi::http::proxy::export!(Echo);
