//! The response body handed to the caller: the guest's body, whose end waits for the
//! instance's end so a body cut short by a trap, an overrun or the deadline ends with an
//! error, never as a clean (truncated) end of stream.
//!
//! Why: wasmtime-wasi-http ends the body cleanly when the instance is dropped without the
//! guest calling `outgoing-body.finish` (its finish channel is closed, which it reads as
//! done), so a client would take half a response for a whole one.

use super::{Failure, HyperOutgoingBody};
use bytes::Bytes;
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;
use wasmtime_wasi_http::Error;

pub struct Guarded {
    inner: HyperOutgoingBody,
    inner_done: bool,
    /// How the instance ended; `None` once read.
    ended: Option<oneshot::Receiver<Result<(), Failure>>>,
}

impl Guarded {
    pub fn new(inner: HyperOutgoingBody, ended: oneshot::Receiver<Result<(), Failure>>) -> Self {
        Guarded {
            inner,
            inner_done: false,
            ended: Some(ended),
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if !this.inner_done {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(None) => this.inner_done = true,
                other => return other,
            }
        }
        // The guest's body has ended: it is complete only if the instance ended well.
        let Some(ended) = this.ended.as_mut() else {
            return Poll::Ready(None);
        };
        let result = match Pin::new(ended).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        this.ended = None;
        match result {
            Ok(Ok(())) => Poll::Ready(None),
            Ok(Err(failure)) => {
                Poll::Ready(Some(Err(Error::InternalError(Some(failure.to_string())))))
            }
            Err(_) => Poll::Ready(Some(Err(Error::InternalError(Some(
                "the instance ended without a result".into(),
            ))))),
        }
    }
}
