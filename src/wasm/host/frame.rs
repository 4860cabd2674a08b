//! The request state a callback reaches, lent by the proxy for exactly one callback.
//!
//! This is the only unsafe code of the Proxy-Wasm host. A [`Frame`] holds pointers to
//! the request's header maps, body, facts and the callout answer being delivered, made
//! from the borrows of a [`View`]. [`with_frame`] is the only way to set them: it takes
//! the view by value, runs the callback, and clears every pointer before it returns (or
//! unwinds), so no pointer outlives the borrow it was made from. The accessors take
//! `&self` or `&mut self`, so the borrow checker enforces what the view's borrows did: a
//! `&mut` to a header map is unique while it lives, and shared reads of the frame cannot
//! overlap a write through it.

use super::{CallResponse, Host, RequestInfo};
use crate::wasm::abi::{BufferType, HostResult, Status};
use http::HeaderMap;
use pingora::http::{RequestHeader, ResponseHeader};
use std::ptr::NonNull;
use wasmtime::Store;

/// What the proxy lends a callback. `req`/`resp` are writable, `req_ro`/`resp_ro` the
/// same heads read-only (a phase that may no longer change them).
#[derive(Default)]
pub struct View<'a> {
    pub req: Option<&'a mut RequestHeader>,
    pub req_ro: Option<&'a RequestHeader>,
    pub resp: Option<&'a mut ResponseHeader>,
    /// The response head, read-only (`on_log`).
    pub resp_ro: Option<&'a ResponseHeader>,
    pub resp_trailers: Option<&'a mut HeaderMap>,
    pub body: Option<(BufferType, &'a mut Vec<u8>)>,
    pub info: Option<&'a mut RequestInfo>,
    pub call: Option<&'a CallResponse>,
    /// A root-context callback run while the request waits: the guest reaches the
    /// request only after `proxy_set_effective_context` to its HTTP context.
    pub root: bool,
    /// `on_log`: a header map that is not there reads as `NotFound`, not `BadArgument`.
    pub log: bool,
}

impl<'a> View<'a> {
    /// A request's view that reaches its [`RequestInfo`] and nothing else yet.
    pub fn of(info: &'a mut RequestInfo) -> Self {
        View {
            info: Some(info),
            ..View::default()
        }
    }
}

/// Pointers into the proxy's request state, valid during one callback (see the module
/// doc). Not `Clone`: at most one frame holds a writable pointer.
#[derive(Default)]
pub(crate) struct Frame {
    req: Option<NonNull<RequestHeader>>,
    req_writable: bool,
    resp: Option<NonNull<ResponseHeader>>,
    resp_writable: bool,
    resp_trailers: Option<NonNull<HeaderMap>>,
    body: Option<(BufferType, NonNull<Vec<u8>>)>,
    info: Option<NonNull<RequestInfo>>,
    call: Option<NonNull<CallResponse>>,
    log: bool,
}

// SAFETY: a `Store<Host>` sits in a VM that a request leases, and Pingora keeps the
// request's state (its `CTX`) in futures that must be `Send + Sync`; the store is only
// `Send`/`Sync` when `Host` is. The pointers in a frame are dereferenced only through
// the accessors below, by the thread running the callback (which holds `&mut Store`),
// while `with_frame` keeps the borrows they were made from alive; between callbacks the
// frame is empty. So sending or sharing an (empty or in-use) frame never lets two
// threads reach the pointees.
unsafe impl Send for Frame {}
unsafe impl Sync for Frame {}

impl Frame {
    fn from_view(v: View<'_>) -> Frame {
        Frame {
            req_writable: v.req.is_some(),
            req: v.req.map(NonNull::from).or(v.req_ro.map(NonNull::from)),
            resp_writable: v.resp.is_some(),
            resp: v.resp.map(NonNull::from).or(v.resp_ro.map(NonNull::from)),
            resp_trailers: v.resp_trailers.map(NonNull::from),
            body: v.body.map(|(t, b)| (t, NonNull::from(b))),
            info: v.info.map(NonNull::from),
            call: v.call.map(NonNull::from),
            log: v.log,
        }
    }

    /// What a call on a header map the callback does not have answers, as Envoy: the map
    /// "is not currently available" (`BadArgument`), except in `on_log`, where maps may
    /// be missing (`NotFound`).
    pub(crate) fn absent(&self) -> Status {
        if self.log {
            Status::NotFound
        } else {
            Status::BadArgument
        }
    }

    /// A frame that reaches only the callout answer being delivered: what a root
    /// callback sees before it switches to the request's context.
    pub(crate) fn answer_only(&self) -> Frame {
        Frame {
            call: self.call,
            ..Frame::default()
        }
    }

    /// What `p` points at, shared: the borrow of `self` keeps any `&mut` from
    /// [`Frame::lent_mut`] out while it lives.
    fn lent<T>(&self, p: Option<NonNull<T>>) -> HostResult<&T> {
        // SAFETY: see the module doc: `p` is one of this frame's pointers, valid while
        // the frame is set; the returned borrow cannot outlive `&self`.
        p.map(|p| unsafe { p.as_ref() }).ok_or(Status::NotFound)
    }

    /// What `p` points at, writable when the view lent it mutably (`BadArgument` when
    /// it was lent read-only): `&mut self` makes the returned borrow the only one.
    fn lent_mut<T>(&mut self, p: Option<NonNull<T>>, writable: bool) -> HostResult<&mut T> {
        match p {
            // SAFETY: as in `lent`; writable pointers were made from `&mut` borrows.
            Some(mut p) if writable => Ok(unsafe { p.as_mut() }),
            Some(_) => Err(Status::BadArgument),
            None => Err(Status::NotFound),
        }
    }

    /// The request head (a missing one: [`Frame::absent`]).
    pub(crate) fn req(&self) -> HostResult<&RequestHeader> {
        self.lent(self.req).map_err(|_| self.absent())
    }

    /// The request head, when the phase may still change it.
    /// Changes to a missing or read-only head are `BadArgument` (Envoy: no map to change).
    pub(crate) fn req_mut(&mut self) -> HostResult<&mut RequestHeader> {
        self.lent_mut(self.req, self.req_writable)
            .map_err(|_| Status::BadArgument)
    }

    pub(crate) fn resp(&self) -> HostResult<&ResponseHeader> {
        self.lent(self.resp).map_err(|_| self.absent())
    }

    /// The response head, when the phase may still change it.
    pub(crate) fn resp_mut(&mut self) -> HostResult<&mut ResponseHeader> {
        self.lent_mut(self.resp, self.resp_writable)
            .map_err(|_| Status::BadArgument)
    }

    pub(crate) fn resp_trailers(&self) -> HostResult<&HeaderMap> {
        self.lent(self.resp_trailers).map_err(|_| self.absent())
    }

    /// Trailers are only ever lent mutably.
    pub(crate) fn resp_trailers_mut(&mut self) -> HostResult<&mut HeaderMap> {
        self.lent_mut(self.resp_trailers, true)
            .map_err(|_| Status::BadArgument)
    }

    /// The body buffer lent to this callback, if it is of type `t`.
    pub(crate) fn body(&self, t: BufferType) -> HostResult<&Vec<u8>> {
        self.lent(self.body.filter(|(bt, _)| *bt == t).map(|(_, p)| p))
    }

    /// The body buffer lent to this callback (bodies are only ever lent mutably):
    /// `NotFound` without one, `BadArgument` when it is not of type `t`.
    pub(crate) fn body_mut(&mut self, t: BufferType) -> HostResult<&mut Vec<u8>> {
        let (p, right_type) = match self.body {
            Some((bt, p)) => (Some(p), bt == t),
            None => (None, false),
        };
        self.lent_mut(p, right_type)
    }

    pub(crate) fn info(&self) -> Option<&RequestInfo> {
        self.lent(self.info).ok()
    }

    /// Request facts are only ever lent mutably.
    pub(crate) fn info_mut(&mut self) -> Option<&mut RequestInfo> {
        self.lent_mut(self.info, true).ok()
    }

    /// The callout answer being delivered. Answers are only ever lent shared, so the
    /// copies of this pointer [`Frame::answer_only`] makes never alias a `&mut`.
    pub(crate) fn call(&self) -> HostResult<&CallResponse> {
        self.lent(self.call)
    }
}

/// Runs `f` (one callback) with `view` lent to the guest: as the HTTP context's frame,
/// or, for a root callback (`view.root`), parked until the guest switches to the
/// request's context, with only the answer being delivered in reach. Both frames are
/// empty again when this returns, whether `f` returned or unwound.
pub(crate) fn with_frame<R>(
    store: &mut Store<Host>,
    view: View<'_>,
    f: impl FnOnce(&mut Store<Host>) -> R,
) -> R {
    struct Clear<'s>(&'s mut Store<Host>);
    impl Drop for Clear<'_> {
        fn drop(&mut self) {
            let h = self.0.data_mut();
            h.frame = Frame::default();
            h.parked = Frame::default();
        }
    }
    let root = view.root;
    let frame = Frame::from_view(view);
    let h = store.data_mut();
    if root {
        h.frame = frame.answer_only();
        h.parked = frame;
    } else {
        h.frame = frame;
    }
    let guard = Clear(store);
    f(&mut *guard.0)
}
