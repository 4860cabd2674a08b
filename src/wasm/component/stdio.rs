//! A guest's stdout and stderr, cut into lines for the caller's sink (the tenant's log).
//!
//! Both streams of one request share a [`Lines`] buffer per stream; a complete line is handed
//! to the sink as soon as the guest writes its newline, a partial one when it grows past
//! [`MAX_LINE_BYTES`] or when the instance is dropped. Past [`MAX_BYTES_PER_REQUEST`] the
//! rest is dropped (and one marker line says so): a guest cannot flood the log.

use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A line longer than this is cut and handed over in pieces.
pub const MAX_LINE_BYTES: usize = 4 * 1024;
/// Output bytes kept per stream and request; the rest is dropped.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Which stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdio {
    Stdout,
    Stderr,
}

/// Where a request's output lines go (the caller turns them into tenant log lines).
pub type LineSink = Arc<dyn Fn(Stdio, &str) + Send + Sync>;

/// The line buffer of one stream of one request.
struct Lines {
    stream: Stdio,
    sink: LineSink,
    pending: Vec<u8>,
    written: usize,
}

impl Lines {
    fn write(&mut self, bytes: &[u8]) {
        let room = MAX_BYTES_PER_REQUEST.saturating_sub(self.written);
        if room == 0 {
            return;
        }
        let kept = &bytes[..bytes.len().min(room)];
        self.written += kept.len();
        for &b in kept {
            if b == b'\n' {
                self.emit();
            } else {
                self.pending.push(b);
                if self.pending.len() >= MAX_LINE_BYTES {
                    self.emit();
                }
            }
        }
        if self.written >= MAX_BYTES_PER_REQUEST {
            self.emit();
            (self.sink)(self.stream, "[output truncated]");
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.pending);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        (self.sink)(self.stream, line);
        self.pending.clear();
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.emit();
        }
    }
}

/// A `wasi:cli/stdout` (or stderr) implementation feeding a [`LineSink`]. Cloned handles
/// share one buffer, as WASI requires of every stream the guest opens on the same stdout.
#[derive(Clone)]
pub struct SinkStream(Arc<Mutex<Lines>>);

impl SinkStream {
    pub fn new(stream: Stdio, sink: LineSink) -> Self {
        SinkStream(Arc::new(Mutex::new(Lines {
            stream,
            sink,
            pending: Vec::new(),
            written: 0,
        })))
    }

    /// Points the stream at another request's sink (a reused instance): what the last
    /// request left unfinished goes to its own sink, and the new one starts with a full
    /// allowance.
    pub fn rebind(&self, sink: LineSink) {
        if let Ok(mut lines) = self.0.lock() {
            if !lines.pending.is_empty() {
                lines.emit();
            }
            lines.sink = sink;
            lines.written = 0;
        }
    }

    fn write_bytes(&self, bytes: &[u8]) {
        // A poisoned lock only means a sink panicked: keep the guest running, drop the output.
        if let Ok(mut lines) = self.0.lock() {
            lines.write(bytes);
        }
    }
}

impl IsTerminal for SinkStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for SinkStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for SinkStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready: output past the cap is dropped, never blocks the guest.
        Ok(MAX_LINE_BYTES)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for SinkStream {
    async fn ready(&mut self) {}
}

/// What `wasi:cli` hands the guest's async writers: like the p2 stream, never waits.
impl AsyncWrite for SinkStream {
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }
}
