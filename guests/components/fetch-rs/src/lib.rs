//! Calls `http://<authority>/` with wasi:http/outgoing-handler, where the authority is the
//! incoming request's query (`/?upstream.example`), and answers "status N" with the upstream's
//! status, or "error E" with the error code the host gave (e.g. HttpRequestDenied).
//!
//! A POST is passed on: its body goes to `http://<authority>/posted` as the body of a POST
//! (with `x-from: fetch-rs`), and the answer is "status N" followed by the upstream's
//! response body.
use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};
use wasi::io::streams::{InputStream, StreamError};

struct Fetch;

/// Everything left in `stream`.
fn read_all(stream: &InputStream) -> Vec<u8> {
    let mut all = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => all.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return all,
            Err(StreamError::LastOperationFailed(e)) => {
                all.extend_from_slice(format!("\nread failed: {}", e.to_debug_string()).as_bytes());
                return all;
            }
        }
    }
}

fn call(authority: &str, post: Option<Vec<u8>>) -> String {
    let headers = Fields::new();
    if post.is_some() {
        headers.append("x-from", b"fetch-rs").expect("header");
    }
    let request = OutgoingRequest::new(headers);
    request.set_scheme(Some(&Scheme::Http)).expect("scheme");
    request.set_authority(Some(authority)).expect("authority");
    let path = if post.is_some() { "/posted" } else { "/" };
    request.set_path_with_query(Some(path)).expect("path");
    let body = match &post {
        Some(_) => {
            request.set_method(&Method::Post).expect("method");
            Some(request.body().expect("body taken once"))
        }
        None => None,
    };
    let future = match outgoing_handler::handle(request, None) {
        Err(e) => return format!("error {e:?}\n"),
        Ok(future) => future,
    };
    // the body goes out after the request was handed over: it streams to the upstream
    if let (Some(body), Some(bytes)) = (body, post) {
        let stream = body.write().expect("stream taken once");
        for chunk in bytes.chunks(4096) {
            stream.blocking_write_and_flush(chunk).expect("write body");
        }
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(response))) => {
            let mut text = format!("status {}\n", response.status());
            if path == "/posted" {
                let body = response.consume().expect("body taken once");
                let stream = body.stream().expect("stream taken once");
                text.push_str(&String::from_utf8_lossy(&read_all(&stream)));
                drop(stream);
                drop(IncomingBody::finish(body));
            }
            text
        }
        Some(Ok(Err(e))) => format!("error {e:?}\n"),
        other => format!("error {other:?}\n"),
    }
}

impl wasi::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let authority = path.split_once('?').map(|(_, q)| q).unwrap_or("").to_string();
        let post = matches!(request.method(), Method::Post).then(|| {
            let body = request.consume().expect("body taken once");
            let stream = body.stream().expect("stream taken once");
            let all = read_all(&stream);
            drop(stream);
            drop(IncomingBody::finish(body));
            all
        });
        let text = call(&authority, post);
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("body taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("stream taken once");
        for chunk in text.as_bytes().chunks(4096) {
            stream.blocking_write_and_flush(chunk).expect("write body");
        }
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}

wasi::http::proxy::export!(Fetch);
