//! Drives a route's hook chain through the proxy phases: leases VMs, runs the Proxy-Wasm
//! callbacks in order (response phases in reverse, like Envoy's encoder filters), makes
//! the HTTP callouts guests ask for, and applies each module's failure policy.

use crate::wasm::abi::BufferType;
use crate::wasm::{
    CallResponse, Failure, FailurePolicy, HookChain, Lease, LocalResponse, Outcome, PendingCall,
    RequestInfo, RootEvent, View,
};
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Longest a request waits on its VM's root context to resume it (see
/// [`Until::Root`]); then the module fails with `paused_too_long`.
pub const MAX_ROOT_WAIT: Duration = Duration::from_secs(10);

/// Per-request hook state, kept in the proxy's CTX.
pub struct HookState {
    /// One lease per module of the chain; `None` once a module failed open (`allow`).
    pub leases: Vec<Option<Lease>>,
    pub info: RequestInfo,
    pub req_body: Vec<u8>,
    pub resp_body: Vec<u8>,
    /// Body that replaces the upstream's (a local response sent in a response phase).
    pub replace_body: Option<Bytes>,
    /// Most response body the modules may hold back (`[limits]
    /// max_buffered_response_bytes`).
    pub max_buffered_response: usize,
    /// The request head went upstream before its body (Pingora streams bodies over 64 KiB
    /// or of unknown length): body callbacks can no longer change its headers.
    pub head_sent: bool,
    /// The module whose `on_request_headers` paused to wait for the body: as in Envoy,
    /// the modules after it see the request only once it continues.
    pub held: Option<usize>,
    /// Set when the held module continued: the chain resumes at this module.
    resume_at: Option<usize>,
    /// A body callback of this module made callouts: the chain waits for them.
    waiting: Option<(usize, Vec<PendingCall>)>,
    /// The response (the upstream's, or a local reply) has gone through the response
    /// callbacks: a reply made from now on is sent as it is.
    response_started: bool,
    /// The module whose `on_response_headers` paused to wait for the body: the modules
    /// after it see the response once it continues.
    resp_held: Option<usize>,
    /// The response head while a module holds it (the client has not got it yet); the
    /// proxy sends it once the holding module continues (see [`HookState::head_ready`]).
    pub held_head: Option<Box<ResponseHeader>>,
    /// The status of a reply that replaced the response after Pingora took its head.
    pub replaced_status: Option<u16>,
    /// Where the walk through the response body callbacks stands.
    walk: Walk,
    /// A response callback made callouts at the body's end: the response waits for them
    /// (see [`HookState::response_body_wait`]).
    resp_waiting: Option<(usize, Vec<PendingCall>)>,
    /// Callouts made from a response body chunk before the body's end, per module: sent
    /// and awaited when the body ends, unless the module let the body go on meanwhile.
    resp_early_calls: Vec<(usize, PendingCall)>,
}

/// The walk through the response callbacks once the body is in: `on_response_body` for
/// the modules below `Body(n)` (last first), or, after a module that held the head let
/// go (`Headers(h, n)`), `on_response_headers` on the held head for the modules below `n`.
#[derive(Debug, Clone, Copy)]
enum Walk {
    Body(usize),
    Headers(usize, usize),
}

/// What the proxy does after a phase's hooks ran.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// Buffer: hold the body chunk and wait for more.
    Buffer,
    /// Answer the client with this response and stop.
    Respond(LocalResponse),
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// A request id unique in this process.
pub fn request_id() -> u64 {
    REQUEST_IDS.fetch_add(1, Ordering::Relaxed)
}

/// The answer a failed module's policy gives (`code` in its JSON body for `deny`), or
/// `None` to fail open.
pub fn policy_answer(policy: &FailurePolicy, route: &str, code: &str) -> Option<LocalResponse> {
    let json = |status: u16, code: &str| LocalResponse {
        status,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: super::respond::error_body(code, Some(route)).to_vec(),
        grpc_status: -1,
    };
    match policy {
        FailurePolicy::Allow => None,
        FailurePolicy::Deny(s) => Some(json(*s, code)),
        FailurePolicy::Respond(s, body) => Some(LocalResponse {
            status: *s,
            headers: Vec::new(),
            body: body.clone().into_bytes(),
            grpc_status: -1,
        }),
    }
}

/// The head a local reply shows the response callbacks: its headers, a `content-type`
/// (text/plain when it has a body and none was given, as Envoy's) and its length.
pub fn reply_head(r: &LocalResponse) -> pingora::Result<ResponseHeader> {
    let default_type = (!r.body.is_empty()).then_some("text/plain");
    super::respond::local_head(r.status, &r.headers, default_type, Some(r.body.len()))
}

impl HookState {
    /// Leases one VM per module of the chain.
    pub async fn start(chain: &HookChain, info: RequestInfo) -> Result<HookState, Failure> {
        let mut leases = Vec::with_capacity(chain.plugins.len());
        for p in &chain.plugins {
            match p.lease().await {
                Ok(l) => leases.push(Some(l)),
                Err(f) => {
                    p.report(&f);
                    return Err(f);
                }
            }
        }
        Ok(HookState {
            leases,
            info,
            req_body: Vec::new(),
            resp_body: Vec::new(),
            replace_body: None,
            held: None,
            resume_at: None,
            waiting: None,
            response_started: false,
            resp_held: None,
            held_head: None,
            head_sent: false,
            max_buffered_response: usize::MAX,
            replaced_status: None,
            walk: Walk::Body(0),
            resp_waiting: None,
            resp_early_calls: Vec::new(),
        })
    }

    /// Module `i` broke the ABI's rules (`cause`, logged and counted against it in
    /// `callback`): its policy applies.
    fn misbehaved(&mut self, i: usize, callback: &'static str, cause: &'static str) -> Flow {
        if let Some(l) = self.leases[i].as_mut() {
            l.misbehaved(callback, cause);
        }
        self.on_failure(i)
    }

    /// Module `i` failed (`Outcome::Failed`), or answered `out` where that breaks the
    /// rules (`cause`, in `callback`): its policy applies. `Some` is the reply that ends
    /// the request; `None` goes on without the module.
    fn give_up(
        &mut self,
        i: usize,
        out: &Outcome,
        callback: &'static str,
        cause: &'static str,
    ) -> Option<LocalResponse> {
        let flow = match out {
            Outcome::Failed(_) => self.on_failure(i),
            _ => self.misbehaved(i, callback, cause),
        };
        match flow {
            Flow::Respond(r) => Some(r),
            _ => None,
        }
    }

    /// Applies module `i`'s policy to its failure.
    fn on_failure(&mut self, i: usize) -> Flow {
        let Some(lease) = self.leases[i].take() else {
            return Flow::Continue;
        };
        match policy_answer(&lease.plugin().spec.policy, &self.info.route, "hook_failed") {
            Some(resp) => {
                self.leases[i] = Some(lease);
                Flow::Respond(resp)
            }
            None => Flow::Continue, // fail open: the module is skipped from now on
        }
    }

    /// `on_request_headers` through the chain, with callouts awaited in between. A module
    /// that pauses with a body still to come holds the request (`Flow::Buffer`) until its
    /// body callback continues.
    pub async fn request_headers(
        &mut self,
        req: &mut RequestHeader,
        end_of_stream: bool,
        caller: &Callouts,
    ) -> Flow {
        self.request_headers_from(0, req, end_of_stream, caller)
            .await
    }

    /// `on_request_headers` from module `start` on.
    pub async fn request_headers_from(
        &mut self,
        start: usize,
        req: &mut RequestHeader,
        end_of_stream: bool,
        caller: &Callouts,
    ) -> Flow {
        for i in start..self.leases.len() {
            let Some(lease) = self.leases[i].as_mut() else {
                continue;
            };
            let mut out = lease.on_request_headers(req, &mut self.info, end_of_stream);
            let mut waited = false;
            loop {
                match out {
                    Outcome::Continue => break,
                    Outcome::Respond(r) => return Flow::Respond(r),
                    Outcome::Failed(_) => match self.on_failure(i) {
                        Flow::Continue => break,
                        other => return other,
                    },
                    Outcome::Pause if !end_of_stream => {
                        // waits for the body (a buffering auth or WAF filter)
                        self.held = Some(i);
                        return Flow::Buffer;
                    }
                    Outcome::Pause if !std::mem::replace(&mut waited, true) => {
                        // no body to come: only its root context can resume the request
                        let lease = self.leases[i].as_mut().expect("lease present");
                        let at = CallSite {
                            req: Some(&mut *req),
                            ..CallSite::default()
                        };
                        out = caller
                            .resolve(lease, at, &mut self.info, Vec::new(), Until::Root)
                            .await;
                    }
                    Outcome::Pause => {
                        match self.misbehaved(i, "on_request_headers", "paused_without_resume") {
                            Flow::Continue => break,
                            other => return other,
                        }
                    }
                    Outcome::Wait(calls) => {
                        let lease = self.leases[i].as_mut().expect("lease present");
                        let at = CallSite {
                            req: Some(&mut *req),
                            ..CallSite::default()
                        };
                        out = caller
                            .resolve(lease, at, &mut self.info, calls, Until::Answers)
                            .await;
                    }
                }
            }
        }
        Flow::Continue
    }

    /// One chunk of the request body through the chain (see [`Self::request_body_from`]);
    /// when a module that held the request continues, the modules after it get
    /// `on_request_headers`, then the body buffered so far.
    pub async fn request_body(
        &mut self,
        req: &mut RequestHeader,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
        caller: &Callouts,
    ) -> Flow {
        let eos = end_of_stream;
        let mut flow = self.request_body_from(0, req, chunk, eos);
        loop {
            if let Some((i, calls)) = self.waiting.take() {
                // a body callback made callouts: wait for them, then go on past it
                let lease = self.leases[i].as_mut().expect("lease present");
                let body = Some((BufferType::RequestBody, &mut self.req_body));
                let at = if self.head_sent {
                    CallSite {
                        req_ro: Some(&*req),
                        body,
                        ..CallSite::default()
                    }
                } else {
                    CallSite {
                        req: Some(&mut *req),
                        body,
                        ..CallSite::default()
                    }
                };
                let out = if eos {
                    caller
                        .resolve(lease, at, &mut self.info, calls, Until::Root)
                        .await
                } else {
                    caller
                        .resolve(lease, at, &mut self.info, calls, Until::Answers)
                        .await
                };
                match out {
                    Outcome::Continue => {}
                    Outcome::Respond(r) => return Flow::Respond(r),
                    Outcome::Pause if !eos => return Flow::Buffer,
                    out @ (Outcome::Pause | Outcome::Wait(_) | Outcome::Failed(_)) => {
                        if let Some(r) =
                            self.give_up(i, &out, "on_request_body", "paused_without_resume")
                        {
                            return Flow::Respond(r);
                        }
                    }
                }
                flow = if self.release(i) {
                    Flow::Continue
                } else {
                    self.request_body_from(i + 1, req, None, eos)
                };
                continue;
            }
            if let (Flow::Continue, Some(k)) = (&flow, self.resume_at.take()) {
                match self.request_headers_from(k, req, false, caller).await {
                    Flow::Continue => flow = self.request_body_from(k, req, None, eos),
                    other => return other, // held again further on, or answered
                }
                continue;
            }
            return flow;
        }
    }

    /// `on_request_body` from module `start` on, up to a module holding the request.
    /// `chunk` is appended to the buffered body; on `Flow::Continue` the whole buffered
    /// body is ready in `self.req_body`.
    pub fn request_body_from(
        &mut self,
        start: usize,
        req: &mut RequestHeader,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
    ) -> Flow {
        if let Some(c) = chunk {
            self.req_body.extend_from_slice(c);
        }
        let end = self.held.map_or(self.leases.len(), |h| h + 1);
        for i in start..end {
            let Some(lease) = self.leases[i].as_mut() else {
                continue;
            };
            let sent = self.head_sent;
            match lease.on_request_body(
                req,
                sent,
                &mut self.info,
                &mut self.req_body,
                end_of_stream,
            ) {
                Outcome::Continue if self.held == Some(i) => {
                    self.held = None;
                    self.resume_at = Some(i + 1);
                    return Flow::Continue;
                }
                Outcome::Continue => {}
                Outcome::Pause if !end_of_stream => return Flow::Buffer,
                Outcome::Respond(r) => return Flow::Respond(r),
                Outcome::Wait(calls) => {
                    self.waiting = Some((i, calls));
                    return Flow::Buffer;
                }
                Outcome::Pause if end_of_stream && lease.root_can_wake() => {
                    // the whole body is in: only its root context can resume the request
                    self.waiting = Some((i, Vec::new()));
                    return Flow::Buffer;
                }
                out @ (Outcome::Pause | Outcome::Failed(_)) => {
                    let cause = "paused_without_resume";
                    if let Some(r) = self.give_up(i, &out, "on_request_body", cause) {
                        return Flow::Respond(r);
                    }
                    if self.release(i) {
                        return Flow::Continue;
                    }
                }
            }
        }
        Flow::Continue
    }

    /// A holding module that failed open lets the request go on past it.
    fn release(&mut self, i: usize) -> bool {
        if self.held != Some(i) {
            return false;
        }
        self.held = None;
        self.resume_at = Some(i + 1);
        true
    }

    /// `on_response_headers`, last module first. A local response replaces the upstream's.
    /// `hold`: a module may pause the head until it has seen the body (where the proxy can
    /// keep the head back: an upstream's answer to an HTTP/1.1 client, a function's answer
    /// to any client); elsewhere a pausing module lets the head through as it is.
    pub async fn response_headers(
        &mut self,
        req: &RequestHeader,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
        hold: bool,
        caller: &Callouts,
    ) -> Flow {
        self.info.response_code = resp.status.as_u16();
        self.response_started = true;
        for i in (0..self.leases.len()).rev() {
            let Some(lease) = self.leases[i].as_mut() else {
                continue;
            };
            let mut out = lease.on_response_headers(req, resp, &mut self.info, end_of_stream);
            if let Outcome::Wait(calls) = out {
                // callouts from the response headers (enrichment, signing): the response
                // waits for them, as in Envoy
                let at = CallSite {
                    req_ro: Some(req),
                    resp: Some(&mut *resp),
                    ..CallSite::default()
                };
                out = caller
                    .resolve(lease, at, &mut self.info, calls, Until::Answers)
                    .await;
            }
            match out {
                Outcome::Continue => {}
                Outcome::Respond(r) => return Flow::Respond(r),
                Outcome::Pause if !end_of_stream && hold => {
                    // waits for the body (response inspection): the head is held
                    self.resp_held = Some(i);
                    return Flow::Buffer;
                }
                Outcome::Pause if !end_of_stream => {}
                out @ (Outcome::Pause | Outcome::Wait(_) | Outcome::Failed(_)) => {
                    if let Some(r) =
                        self.give_up(i, &out, "on_response_headers", "paused_in_response")
                    {
                        return Flow::Respond(r);
                    }
                }
            }
        }
        Flow::Continue
    }

    /// A local reply through the response callbacks, last module first, as Envoy sends
    /// its local replies down the encoder filters: every module that saw the request (its
    /// context exists and has not failed), the answering one included, gets
    /// `on_response_headers` and, when there is a body, `on_response_body` with the whole
    /// body at end of stream; so CORS or security-header filters apply to denials and to
    /// the gateway's own errors. A module that pauses its headers gets the body at once
    /// (it is all there). A reply made while this one goes through the chain, or once the
    /// upstream's response did, is sent as it is (Envoy's direct local reply).
    pub async fn local_reply(
        &mut self,
        req: &RequestHeader,
        r: LocalResponse,
        caller: &Callouts,
    ) -> LocalResponse {
        if self.response_started {
            return r;
        }
        self.response_started = true;
        let Ok(mut head) = reply_head(&r) else {
            return r;
        };
        let grpc_status = r.grpc_status;
        let mut body = r.body;
        self.info.response_code = r.status;
        for i in (0..self.leases.len()).rev() {
            if !self.leases[i].as_ref().is_some_and(Lease::is_live) {
                continue;
            }
            let eos = body.is_empty();
            let lease = self.leases[i].as_mut().expect("checked above");
            let mut out = lease.on_response_headers(req, &mut head, &mut self.info, eos);
            if let Outcome::Wait(calls) = out {
                let at = CallSite {
                    req_ro: Some(req),
                    resp: Some(&mut head),
                    ..CallSite::default()
                };
                out = caller
                    .resolve(lease, at, &mut self.info, calls, Until::Answers)
                    .await;
            }
            let ok = match out {
                Outcome::Continue => true,
                Outcome::Pause if !eos => true, // waits for the body: it is all here
                Outcome::Respond(r) => return r,
                Outcome::Pause | Outcome::Wait(_) => {
                    lease.misbehaved("on_response_headers", "paused_in_response");
                    false
                }
                Outcome::Failed(_) => false,
            };
            if ok && !eos {
                let mut out =
                    lease.on_response_body(req, Some(&mut head), &mut self.info, &mut body, true);
                if let Outcome::Wait(calls) = out {
                    let at = CallSite {
                        req_ro: Some(req),
                        resp: Some(&mut head),
                        body: Some((BufferType::ResponseBody, &mut body)),
                        ..CallSite::default()
                    };
                    out = caller
                        .resolve(lease, at, &mut self.info, calls, Until::Answers)
                        .await;
                }
                match out {
                    Outcome::Continue => continue,
                    Outcome::Respond(r) => return r,
                    Outcome::Pause | Outcome::Wait(_) => {
                        lease.misbehaved("on_response_body", "paused_in_response");
                    }
                    Outcome::Failed(_) => {}
                }
            } else if ok {
                continue;
            }
            if let Flow::Respond(r) = self.on_failure(i) {
                return r;
            }
        }
        LocalResponse {
            status: head.status.as_u16(),
            headers: head
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body,
            grpc_status,
        }
    }

    /// A module held the response head but the client's protocol cannot wait for it
    /// (HTTP/2, HTTP/1.0): the module fails with `paused_in_response`.
    pub fn cannot_hold(&mut self) -> Flow {
        let Some(i) = self.resp_held.take() else {
            return Flow::Continue;
        };
        self.misbehaved(i, "on_response_headers", "paused_in_response")
    }

    /// The held head, once no module holds it any more: the proxy sends it now.
    pub fn head_ready(&mut self) -> Option<Box<ResponseHeader>> {
        if self.resp_held.is_some() {
            return None;
        }
        self.held_head.take()
    }

    /// `on_response_body`, last module first, buffering while a module pauses. While a
    /// module holds the head, only the modules before it (in response order) see the
    /// body; when it continues, the modules after it get `on_response_headers` on the
    /// held head, then the body.
    ///
    /// Callouts made at the body's end set [`HookState::waiting_on_callouts`] and return
    /// `Flow::Buffer`: Pingora's response body phase is synchronous, so the proxy awaits
    /// them with [`HookState::response_body_wait`] elsewhere. Callouts made from an
    /// earlier chunk are sent when the body ends (the module is paused until then).
    pub fn response_body(&mut self, req: &RequestHeader, chunk: Option<&[u8]>, eos: bool) -> Flow {
        if let Some(c) = chunk {
            self.resp_body.extend_from_slice(c);
        }
        self.walk = Walk::Body(self.leases.len());
        self.response_walk(req, eos)
    }

    /// A response callback is waiting on callouts (see [`HookState::response_body`]).
    pub fn waiting_on_callouts(&self) -> bool {
        self.resp_waiting.is_some()
    }

    /// Sends and awaits the callouts a response callback made at the body's end, then
    /// walks on through the chain (which may wait again).
    pub async fn response_body_wait(&mut self, req: &RequestHeader, caller: &Callouts) -> Flow {
        let mut flow = Flow::Continue;
        while let Some((i, calls)) = self.resp_waiting.take() {
            let headers = matches!(self.walk, Walk::Headers(..));
            let Some(lease) = self.leases[i].as_mut() else {
                continue;
            };
            let at = CallSite {
                req_ro: Some(req),
                resp: self.held_head.as_deref_mut(),
                body: (!headers).then_some((BufferType::ResponseBody, &mut self.resp_body)),
                ..CallSite::default()
            };
            let callback = if headers {
                "on_response_headers"
            } else {
                "on_response_body"
            };
            match caller
                .resolve(lease, at, &mut self.info, calls, Until::Answers)
                .await
            {
                Outcome::Continue => {}
                Outcome::Respond(r) => return Flow::Respond(r),
                Outcome::Pause if headers => {
                    // holds the head again: the modules it holds from see the body first
                    if let Walk::Headers(h, _) = self.walk {
                        self.resp_held = Some(i);
                        self.walk = Walk::Body(h);
                    }
                }
                out @ (Outcome::Pause | Outcome::Wait(_) | Outcome::Failed(_)) => {
                    if let Some(r) = self.give_up(i, &out, callback, "paused_in_response") {
                        return Flow::Respond(r);
                    }
                }
            }
            flow = self.response_walk(req, true);
        }
        flow
    }

    /// [`HookState::response_body_wait`] where no client connection can hold the
    /// response (HTTP/2): on a work-stealing runtime the worker thread waits, handing its
    /// other tasks to another thread (see [`wait_in_sync_phase`]); elsewhere a waiting
    /// module fails with `callout_in_http2_response_body` and its failure policy applies.
    pub fn response_body_wait_here(&mut self, req: &RequestHeader, caller: &Callouts) -> Flow {
        if let Some(flow) = wait_in_sync_phase(self.response_body_wait(req, caller)) {
            return flow;
        }
        let mut flow = Flow::Continue;
        while let Some((i, _)) = self.resp_waiting.take() {
            let failed = self.misbehaved(i, "on_response_body", "callout_in_http2_response_body");
            if let Flow::Respond(r) = failed {
                return Flow::Respond(r);
            }
            flow = self.response_walk(req, true);
        }
        flow
    }

    /// Walks the response callbacks from where [`Walk`] stands (see
    /// [`HookState::response_body`]).
    fn response_walk(&mut self, req: &RequestHeader, eos: bool) -> Flow {
        loop {
            match self.walk {
                Walk::Body(upper) => {
                    let lower = self.resp_held.unwrap_or(0);
                    for i in (lower..upper).rev() {
                        let Some(lease) = self.leases[i].as_mut() else {
                            continue;
                        };
                        let head = self.held_head.as_deref_mut();
                        let mut out = lease.on_response_body(
                            req,
                            head,
                            &mut self.info,
                            &mut self.resp_body,
                            eos,
                        );
                        if eos {
                            out = with_early_calls(out, &mut self.resp_early_calls, i);
                        }
                        match out {
                            Outcome::Continue => {}
                            Outcome::Wait(calls) if !eos => {
                                self.resp_early_calls
                                    .extend(calls.into_iter().map(|c| (i, c)));
                                return Flow::Buffer;
                            }
                            Outcome::Wait(calls) => {
                                self.walk = Walk::Body(i);
                                self.resp_waiting = Some((i, calls));
                                return Flow::Buffer;
                            }
                            Outcome::Pause
                                if !eos && self.resp_body.len() <= self.max_buffered_response =>
                            {
                                return Flow::Buffer
                            }
                            Outcome::Respond(r) => return Flow::Respond(r),
                            out @ (Outcome::Pause | Outcome::Failed(_)) => {
                                // before the end: holding more than the gateway lets a
                                // module hold
                                let cause = if eos {
                                    "paused_in_response"
                                } else {
                                    "response_body_too_large"
                                };
                                if let Some(r) = self.give_up(i, &out, "on_response_body", cause) {
                                    return Flow::Respond(r);
                                }
                            }
                        }
                    }
                    // the holding module (if any) let the response go on: the modules
                    // after it get the held head
                    let Some(h) = self.resp_held.take() else {
                        return Flow::Continue;
                    };
                    self.walk = Walk::Headers(h, h);
                }
                Walk::Headers(h, upper) => {
                    let Some(mut head) = self.held_head.take() else {
                        return Flow::Continue;
                    };
                    for i in (0..upper).rev() {
                        let Some(lease) = self.leases[i].as_mut() else {
                            continue;
                        };
                        match lease.on_response_headers(req, &mut head, &mut self.info, false) {
                            Outcome::Continue => {}
                            Outcome::Pause => {
                                self.resp_held = Some(i);
                                break;
                            }
                            Outcome::Respond(r) => return Flow::Respond(r),
                            Outcome::Wait(calls) => {
                                self.held_head = Some(head);
                                self.walk = Walk::Headers(h, i);
                                self.resp_waiting = Some((i, calls));
                                return Flow::Buffer;
                            }
                            Outcome::Failed(_) => {
                                if let Flow::Respond(r) = self.on_failure(i) {
                                    return Flow::Respond(r);
                                }
                            }
                        }
                    }
                    self.held_head = Some(head);
                    self.walk = Walk::Body(h);
                }
            }
        }
    }

    pub fn response_trailers(&mut self, req: &RequestHeader, trailers: &mut http::HeaderMap) {
        for i in (0..self.leases.len()).rev() {
            if let Some(lease) = self.leases[i].as_mut() {
                if let Outcome::Failed(_) =
                    lease.on_response_trailers(req, &mut self.info, trailers)
                {
                    self.on_failure(i);
                }
            }
        }
    }

    /// `on_done`, `on_log`, `on_delete` for every module; returns the VMs to their pools.
    /// `resp` is the head the client got, for `on_log` to read.
    pub fn finish(
        &mut self,
        req: &RequestHeader,
        resp: Option<&ResponseHeader>,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        self.info.response_code = status;
        for l in self.leases.iter_mut().flatten() {
            l.finish(Some(req), resp, &mut self.info);
            let u = &l.plugin().usage;
            u.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
            u.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        }
        self.leases.clear();
    }
}

/// At the body's end, module `i`'s callouts made from earlier chunks join what it asks
/// for now: sent if it still waits (paused or with callouts of its own), dropped if it
/// let the body go on or answered.
fn with_early_calls(out: Outcome, early: &mut Vec<(usize, PendingCall)>, i: usize) -> Outcome {
    if !early.iter().any(|(m, _)| *m == i) {
        return out;
    }
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(early)
        .into_iter()
        .partition(|(m, _)| *m == i);
    *early = rest;
    let mut mine: Vec<PendingCall> = mine.into_iter().map(|(_, c)| c).collect();
    match out {
        Outcome::Pause => Outcome::Wait(mine),
        Outcome::Wait(more) => {
            mine.extend(more);
            Outcome::Wait(mine)
        }
        other => other,
    }
}

/// Runs `wait` to its end from a synchronous proxy phase (Pingora's response body
/// filter). On a work-stealing runtime the worker thread hands its queue to another
/// thread first ([`tokio::task::block_in_place`]), so other requests go on while this
/// one waits. `None` on a runtime that cannot do that (`work_stealing = false`: one
/// single-threaded runtime per thread), where waiting would stall every request of the
/// thread.
fn wait_in_sync_phase<F: std::future::Future>(wait: F) -> Option<F::Output> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let handle = Handle::try_current().ok()?;
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return None;
    }
    Some(tokio::task::block_in_place(|| handle.block_on(wait)))
}

/// Where a callout was made: what its answer's callback may read and change.
#[derive(Default)]
pub struct CallSite<'a> {
    /// The request, while it has not gone upstream.
    pub req: Option<&'a mut RequestHeader>,
    /// The request, read-only, in the response phase.
    pub req_ro: Option<&'a RequestHeader>,
    /// The response head, in the response phase.
    pub resp: Option<&'a mut ResponseHeader>,
    /// The body buffered so far, when a body callback made the call: the answer's
    /// callback may read and replace it, as in Envoy.
    pub body: Option<(BufferType, &'a mut Vec<u8>)>,
}

/// The answer Envoy's async client makes up when a callout fails before a response.
fn synthesized(token: u32, status: u16, body: &str) -> CallResponse {
    CallResponse {
        token,
        status,
        headers: vec![
            ("content-length".into(), body.len().to_string().into_bytes()),
            ("content-type".into(), b"text/plain".to_vec()),
        ],
        body: body.as_bytes().to_vec(),
        trailers: Vec::new(),
        grpc: None,
        root: false,
        stream: None,
        foreign: false,
    }
}

/// What a paused stream waits for (see [`Callouts::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Its callouts' answers.
    Answers,
    /// Also its VM's root context, for a request that nothing else can resume (it paused
    /// with no body to come): the root's own callouts, its `on_tick` and its
    /// `on_queue_ready` may switch to the request's context and continue or answer it
    /// (Envoy's "resume from the root"). At most [`MAX_ROOT_WAIT`]; `Pause` when nothing
    /// can wake the root at all.
    Root,
}

/// Makes `proxy_http_call` requests to upstreams through Pingora's pooled connector (and
/// `proxy_grpc_call`s through [`super::grpc`]).
pub struct Callouts {
    connector: pingora::connectors::http::Connector,
    grpc: super::grpc::GrpcClient,
}

impl Default for Callouts {
    fn default() -> Self {
        Callouts {
            connector: pingora::connectors::http::Connector::new(None),
            grpc: super::grpc::GrpcClient::default(),
        }
    }
}

impl Callouts {
    /// Makes the calls, then hands each answer to the guest, until it continues,
    /// responds, fails, or pauses with nothing left to wait for. Waits on the events of
    /// the context's open gRPC streams too (those not delivered when the wait ends are
    /// kept for the next one).
    ///
    /// Parallel calls are answered as each completes, not in dispatch order; once the
    /// guest continues or answers, the calls still out are dropped and their callbacks
    /// never run (the stream has moved on).
    pub async fn resolve(
        &self,
        lease: &mut Lease,
        at: CallSite<'_>,
        info: &mut RequestInfo,
        calls: Vec<PendingCall>,
        until: Until,
    ) -> Outcome {
        let mut events = futures::stream::SelectAll::new();
        events.extend(lease.take_stream_events());
        let root = until == Until::Root;
        let out = self.settle(lease, info, &mut events, at, calls, root).await;
        lease.park_stream_events(events);
        out
    }

    async fn settle(
        &self,
        lease: &mut Lease,
        info: &mut RequestInfo,
        events: &mut futures::stream::SelectAll<crate::wasm::StreamEvents>,
        mut at: CallSite<'_>,
        mut calls: Vec<PendingCall>,
        root: bool,
    ) -> Outcome {
        use futures::stream::{FuturesUnordered, StreamExt};
        use tokio::time::{sleep_until, Instant};
        if root {
            calls.extend(lease.take_root_calls());
        }
        let mut out: FuturesUnordered<_> = calls.into_iter().map(|c| self.call(c)).collect();
        let plugin = lease.plugin().clone();
        let _waiting = root.then(|| plugin.root_waiter());
        let deadline = Instant::now() + MAX_ROOT_WAIT;
        let tick = || {
            let ms = plugin.tick_ms.load(Ordering::Relaxed) as u64;
            (ms > 0).then(|| Instant::now() + Duration::from_millis(ms))
        };
        let mut next_tick = if root { tick() } else { None };
        let mut last = Outcome::Pause;
        loop {
            let woken = root && lease.root_can_wake();
            if out.is_empty() && !woken && events.is_empty() {
                return last;
            }
            let signal = plugin.queue_signal().notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            let queued = if root { plugin.pending_queue() } else { None };
            macro_rules! view {
                () => {
                    View {
                        req: at.req.as_deref_mut(),
                        req_ro: at.req_ro,
                        resp: at.resp.as_deref_mut(),
                        body: at.body.as_mut().map(|(t, b)| (*t, &mut **b)),
                        ..View::of(&mut *info)
                    }
                };
            }
            last = if let Some(id) = queued {
                lease.on_root_event(RootEvent::Queue(id), view!())
            } else {
                tokio::select! {
                    Some(a) = out.next(), if !out.is_empty() => {
                        lease.on_http_call_response(view!(), &a)
                    }
                    ev = events.next(), if !events.is_empty() => {
                        // None: the last stream ended; look again at what is left
                        let Some(ev) = ev else { continue };
                        lease.on_http_call_response(view!(), &ev)
                    }
                    _ = sleep_until(next_tick.unwrap_or(deadline)), if next_tick.is_some() => {
                        next_tick = tick();
                        lease.on_root_event(RootEvent::Tick, view!())
                    }
                    _ = &mut signal, if woken => continue,
                    // waiting on streams alone is bounded as waiting on the root is
                    _ = sleep_until(deadline), if root || out.is_empty() => {
                        return Outcome::Failed(lease.misbehaved("wait_on_root", "paused_too_long"));
                    }
                }
            };
            events.extend(lease.take_stream_events());
            match last {
                Outcome::Pause => continue,
                Outcome::Wait(more) => {
                    out.extend(more.into_iter().map(|c| self.call(c)));
                    last = Outcome::Pause;
                }
                _ => return last,
            }
        }
    }

    /// One callout. Failures answer as Envoy's async client does: a timeout is a
    /// synthesized `504` ("upstream request timeout"), a connection that could not be
    /// made a synthesized `503`; a connection lost mid-exchange is an answer with no
    /// headers (Envoy's `onHttpCallFailure`).
    async fn call(&self, c: PendingCall) -> CallResponse {
        let root = c.root;
        let mut r = self.call_once(c).await;
        r.root = root;
        r
    }

    async fn call_once(&self, mut c: PendingCall) -> CallResponse {
        if let Some(store) = c.store.take() {
            return CallResponse {
                token: c.token,
                status: 200,
                body: store.run(c.timeout).await,
                foreign: true,
                ..CallResponse::default()
            };
        }
        if c.grpc.is_some() {
            return self.grpc.call(c).await;
        }
        let token = c.token;
        match tokio::time::timeout(c.timeout, self.exchange(&c)).await {
            Ok(Ok(mut r)) => {
                r.token = token;
                r
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %c.upstream_name(), error = %e, "callout failed");
                use pingora::ErrorType::*;
                match e.etype() {
                    ConnectRefused | ConnectNoRoute | ConnectTimedout | ConnectError
                    | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | SocketError => {
                        synthesized(
                            token,
                            503,
                            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                        )
                    }
                    _ => CallResponse {
                        token,
                        ..CallResponse::default()
                    },
                }
            }
            Err(_) => synthesized(token, 504, "upstream request timeout"),
        }
    }

    async fn exchange(&self, c: &PendingCall) -> pingora::Result<CallResponse> {
        let peer = c.peer().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::ConnectNoRoute, "no healthy target")
        })?;
        let get = |n: &str| {
            c.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_slice())
        };
        let method = get(":method").unwrap_or(b"GET");
        let path = get(":path").unwrap_or(b"/");
        let mut req = RequestHeader::build(method, path, Some(c.headers.len()))?;
        if let Some(a) = get(":authority") {
            req.insert_header(http::header::HOST, a)?;
        }
        // the gateway frames the call: a guest's Host, Content-Length, Transfer-Encoding
        // or other hop-by-hop header would let it smuggle a second request upstream
        for (k, v) in &c.headers {
            let framing = k.eq_ignore_ascii_case("host")
                || k.eq_ignore_ascii_case("content-length")
                || super::framing::is_hop_by_hop(k);
            if !k.starts_with(':') && !framing {
                req.append_header(k.clone(), v.as_slice())?;
            }
        }
        req.insert_header(http::header::CONTENT_LENGTH, c.body.len())?;
        let (mut s, _reused) = self.connector.get_http_session(&*peer).await?;
        s.set_read_timeout(Some(c.timeout));
        s.write_request_header(Box::new(req)).await?;
        if !c.body.is_empty() {
            s.write_request_body(Bytes::from(c.body.clone()), true)
                .await?;
        }
        s.finish_request_body().await?;
        s.read_response_header().await?;
        let (status, headers) = {
            let h = s.response_header().ok_or_else(|| {
                pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "no response")
            })?;
            (
                h.status.as_u16(),
                h.headers
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect(),
            )
        };
        let mut body = Vec::new();
        while let Some(chunk) = s.read_response_body().await? {
            if body.len() + chunk.len() > 1 << 20 {
                tracing::warn!(
                    upstream = %c.upstream_name(),
                    "callout answer over 1 MiB: the guest gets it as a lost connection"
                );
                return Err(pingora::Error::explain(
                    pingora::ErrorType::InvalidHTTPHeader,
                    "callout response over 1 MiB",
                ));
            }
            body.extend_from_slice(&chunk);
        }
        self.connector
            .release_http_session(s, &*peer, Some(Duration::from_secs(60)))
            .await;
        Ok(CallResponse {
            token: c.token,
            status,
            headers,
            body,
            trailers: Vec::new(),
            grpc: None,
            root: false,
            stream: None,
            foreign: false,
        })
    }
}

impl crate::wasm::Dispatch for Callouts {
    fn dispatch(
        self: std::sync::Arc<Self>,
        call: PendingCall,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = CallResponse> + Send>> {
        Box::pin(async move { self.call(call).await })
    }

    fn open_stream(
        self: std::sync::Arc<Self>,
        call: PendingCall,
        cmds: tokio::sync::mpsc::UnboundedReceiver<crate::wasm::StreamCmd>,
        events: futures::channel::mpsc::Sender<CallResponse>,
    ) {
        tokio::spawn(async move { self.grpc.stream(call, cmds, events).await });
    }
}
