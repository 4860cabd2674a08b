//! Calls `http://<authority>/` with wasi:http/outgoing-handler, where the authority is the
//! incoming request's query (`/?upstream.example`), and answers "status N" with the upstream's
//! status, or "error E" with the error code the host gave (e.g. HttpRequestDenied).
use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};

struct Fetch;

fn call(authority: &str) -> String {
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&Scheme::Http)).expect("scheme");
    request.set_authority(Some(authority)).expect("authority");
    request.set_path_with_query(Some("/")).expect("path");
    match outgoing_handler::handle(request, None) {
        Err(e) => format!("error {e:?}\n"),
        Ok(future) => {
            future.subscribe().block();
            match future.get() {
                Some(Ok(Ok(response))) => format!("status {}\n", response.status()),
                Some(Ok(Err(e))) => format!("error {e:?}\n"),
                other => format!("error {other:?}\n"),
            }
        }
    }
}

impl wasi::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let authority = path.split_once('?').map(|(_, q)| q).unwrap_or("");
        let text = call(authority);
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("body taken once");
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().expect("stream taken once");
        stream.blocking_write_and_flush(text.as_bytes()).expect("write body");
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish body");
    }
}

wasi::http::proxy::export!(Fetch);
