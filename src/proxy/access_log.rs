//! JSON-lines access log, written by its own thread so the request path only formats a
//! line and hands it over (never blocks: when the writer falls behind, lines are dropped
//! and counted in `wasmgate_access_log_dropped_total`).

use pingora::proxy::Session;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    dropped: prometheus::IntCounter,
}

impl AccessLog {
    /// Starts the writer: appends to `path`, or standard output.
    pub fn start(
        path: Option<&std::path::Path>,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, rx) = sync_channel::<String>(8192);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = std::io::BufWriter::new(&mut out);
                while let Ok(line) = rx.recv() {
                    let _ = buf.write_all(line.as_bytes());
                    // write what is queued, then flush once idle: lines show up promptly
                    // without a write per line (a line left in the buffer while the
                    // writer waits would show up only with the next request)
                    while let Ok(l) = rx.try_recv() {
                        let _ = buf.write_all(l.as_bytes());
                    }
                    let _ = buf.flush();
                }
            })?;
        Ok(AccessLog { tx, dropped })
    }

    pub fn record(
        &self,
        session: &Session,
        route: Option<&str>,
        status: u16,
        took: Duration,
        error: Option<&str>,
        details: Option<&str>,
    ) {
        let req = session.req_header();
        let mut line = serde_json::json!({
            "ts": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "client": session.client_addr().map(|a| a.to_string()),
            "method": req.method.as_str(),
            "host": req.headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).or(req.uri.host()),
            "path": req.uri.path(),
            "route": route,
            "status": status,
            "duration_us": took.as_micros() as u64,
        });
        if let Some(e) = error {
            line["error"] = e.into();
        }
        // why the answer is what it is, e.g. the details a guest gave its local reply
        if let Some(d) = details.filter(|d| !d.is_empty()) {
            line["details"] = d.into();
        }
        let mut s = line.to_string();
        s.push('\n');
        if let Err(TrySendError::Full(_)) = self.tx.try_send(s) {
            self.dropped.inc();
        }
    }
}
