//! Reads the whole request body and answers it uppercased (ASCII). On a path ending in
//! `/stream` it answers at once and copies the body back as it arrives, unchanged (the
//! response is under way while the request body still comes in).
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::StreamError;

struct Echo;

/// Calls `each` with every chunk of the request body, in order.
fn read_body(request: IncomingRequest, mut each: impl FnMut(&[u8])) {
    if let Ok(body) = request.consume() {
        let stream = body.stream().expect("stream taken once");
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => each(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(_)) => break,
            }
        }
        drop(stream);
        let _ = IncomingBody::finish(body);
    }
}

impl wasi::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let streaming = request
            .path_with_query()
            .is_some_and(|p| p.ends_with("/stream"));
        let mut input = Vec::new();
        let request = if streaming {
            Some(request)
        } else {
            read_body(request, |chunk| input.extend_from_slice(chunk));
            input.make_ascii_uppercase();
            None
        };
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("body taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("stream taken once");
        // blocking_write_and_flush takes at most 4096 bytes a call.
        let write = |bytes: &[u8]| {
            for chunk in bytes.chunks(4096) {
                stream.blocking_write_and_flush(chunk).expect("write body");
            }
        };
        match request {
            Some(request) => read_body(request, write),
            None => write(&input),
        }
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}

wasi::http::proxy::export!(Echo);
