//! Header maps: `proxy_{get,set}_header_map_pairs`, `proxy_get_header_map_value`,
//! `proxy_{add,replace,remove}_header_map_value`. The request's pseudo-headers
//! (`:method`, `:path`, `:authority`, `:scheme`) and the response's `:status` read and
//! write the head's fields, as Envoy shows them; HTTP/1's `Host` is `:authority`.

use super::call::{give, read, run, run_alloc, Ret, C};
use super::Host;
use crate::headers::HeaderTarget;
use crate::wasm::abi::{self, HostResult, MapType, Status};
use http::header::HeaderMap;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use wasmtime::Linker;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Replace,
    Remove,
}

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(
        l,
        get_header_map_pairs,
        set_header_map_pairs,
        get_header_map_value,
        replace_header_map_value,
        add_header_map_value,
        remove_header_map_value
    )
}

fn get_header_map_pairs(mut c: C, t: i32, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let bytes = MapType::from_i32(t).map(|t| {
            // as Envoy: a map the callback does not have reads as empty, and an empty
            // map is no bytes at all (a null pointer), not a serialized zero count
            let pairs = map_pairs(c.data(), t).unwrap_or_default();
            if pairs.is_empty() {
                return Vec::new();
            }
            abi::serialize_map(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
        });
        give(c, bytes, ret_p, ret_n)
    })
}

fn set_header_map_pairs(mut c: C, t: i32, p: i32, n: i32) -> Ret {
    run(&mut c, |c| {
        let t = MapType::from_i32(t)?;
        let bytes = read(c, p, n)?;
        set_pairs(c.data_mut(), t, &abi::deserialize_map(&bytes)?)
    })
}

fn get_header_map_value(mut c: C, t: i32, kp: i32, kn: i32, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let v = match read(c, kp, kn)
            .and_then(|k| MapType::from_i32(t).and_then(|t| map_get(c.data(), t, &k)))
        {
            // as Envoy answers v0.1.0 modules: a missing header is an empty value
            Err(Status::NotFound) if c.data().abi01 => Ok(Vec::new()),
            v => v,
        };
        give(c, v, ret_p, ret_n)
    })
}

fn remove_header_map_value(mut c: C, t: i32, kp: i32, kn: i32) -> Ret {
    run(&mut c, |c| {
        let k = read(c, kp, kn)?;
        map_change(c.data_mut(), MapType::from_i32(t)?, &k, b"", Op::Remove)
    })
}

fn replace_header_map_value(c: C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32) -> Ret {
    change_value(c, t, (kp, kn), (vp, vn), Op::Replace)
}

fn add_header_map_value(c: C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32) -> Ret {
    change_value(c, t, (kp, kn), (vp, vn), Op::Add)
}

fn change_value(mut c: C, t: i32, (kp, kn): (i32, i32), (vp, vn): (i32, i32), op: Op) -> Ret {
    run(&mut c, |c| {
        let k = read(c, kp, kn)?;
        let v = read(c, vp, vn)?;
        map_change(c.data_mut(), MapType::from_i32(t)?, &k, &v, op)
    })
}

pub(super) type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// All pairs of a map, pseudo-headers first, as the guest sees them.
pub(super) fn map_pairs(h: &Host, t: MapType) -> HostResult<Pairs> {
    let mut out = Vec::new();
    let push_map = |out: &mut Pairs, m: &HeaderMap| {
        for (k, v) in m {
            out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
    };
    let push_list = |out: &mut Pairs, m: &[(String, Vec<u8>)]| {
        for (k, v) in m {
            out.push((k.as_bytes().to_vec(), v.clone()));
        }
    };
    let f = &h.frame;
    match t {
        MapType::RequestHeaders => {
            let r = f.req()?;
            out.push((b":method".to_vec(), r.method.as_str().as_bytes().to_vec()));
            out.push((b":path".to_vec(), path_and_query(r).as_bytes().to_vec()));
            let authority = host_header(r);
            if !authority.is_empty() {
                out.push((b":authority".to_vec(), authority.to_vec()));
            }
            out.push((b":scheme".to_vec(), scheme(h).as_bytes().to_vec()));
            // as in Envoy, HTTP/1's Host is `:authority` and only that
            for (k, v) in &r.headers {
                if k != http::header::HOST {
                    out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
                }
            }
        }
        MapType::ResponseHeaders => {
            let r = f.resp()?;
            out.push((b":status".to_vec(), r.status.as_str().as_bytes().to_vec()));
            push_map(&mut out, &r.headers);
        }
        MapType::ResponseTrailers => push_map(&mut out, f.resp_trailers()?),
        // Pingora does not read request trailers: never there
        MapType::RequestTrailers => return Err(f.absent()),
        MapType::GrpcReceiveInitialMetadata => push_list(&mut out, &grpc_map(h)?.headers),
        MapType::GrpcReceiveTrailingMetadata => push_list(&mut out, &grpc_map(h)?.trailers),
        MapType::HttpCallResponseHeaders => {
            let call = http_map(h)?;
            out.push((b":status".to_vec(), call.status.to_string().into_bytes()));
            push_list(&mut out, &call.headers);
        }
        MapType::HttpCallResponseTrailers => push_list(&mut out, &http_map(h)?.trailers),
    }
    Ok(out)
}

/// The answer whose header maps the callback reads (a missing one: `Frame::absent`).
fn http_map(h: &Host) -> HostResult<&super::CallResponse> {
    http_answer(h).map_err(|_| h.frame.absent())
}

fn grpc_map(h: &Host) -> HostResult<&super::CallResponse> {
    grpc_answer(h).map_err(|_| h.frame.absent())
}

/// The answer being delivered, if it is an HTTP callout's.
pub(super) fn http_answer(h: &Host) -> HostResult<&super::CallResponse> {
    h.frame.call().and_then(|r| match r.grpc {
        None if !r.foreign => Ok(r),
        _ => Err(Status::NotFound),
    })
}

/// The answer being delivered, if it is a gRPC callout's.
pub(super) fn grpc_answer(h: &Host) -> HostResult<&super::CallResponse> {
    h.frame.call().and_then(|r| match r.grpc {
        Some(_) => Ok(r),
        None => Err(Status::NotFound),
    })
}

pub(super) fn scheme(h: &Host) -> &'static str {
    h.frame.info().map(|i| i.scheme).unwrap_or("http")
}

pub(super) fn host_header(req: &RequestHeader) -> &[u8] {
    req.headers
        .get(http::header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or(b"")
}

pub(super) fn path_and_query(r: &RequestHeader) -> &str {
    r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// One header's value (the first, for a repeated one).
pub(super) fn map_get(h: &Host, t: MapType, key: &[u8]) -> HostResult<Vec<u8>> {
    match t {
        MapType::RequestHeaders => {
            let r = h.frame.req()?;
            let v: &[u8] = match key {
                b":path" => path_and_query(r).as_bytes(),
                b":method" => r.method.as_str().as_bytes(),
                b":authority" | b"host" => Some(host_header(r))
                    .filter(|h| !h.is_empty())
                    .ok_or(Status::NotFound)?,
                b":scheme" => scheme(h).as_bytes(),
                _ => r
                    .headers
                    .get(header_name(key)?)
                    .ok_or(Status::NotFound)?
                    .as_bytes(),
            };
            Ok(v.to_vec())
        }
        MapType::ResponseHeaders => {
            let r = h.frame.resp()?;
            if key == b":status" {
                return Ok(r.status.as_str().as_bytes().to_vec());
            }
            let v = r.headers.get(header_name(key)?).ok_or(Status::NotFound)?;
            Ok(v.as_bytes().to_vec())
        }
        _ => map_pairs(h, t)?
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
            .ok_or(Status::NotFound),
    }
}

pub(super) fn header_name(key: &[u8]) -> HostResult<HeaderName> {
    HeaderName::from_bytes(key).map_err(|_| Status::BadArgument)
}

pub(super) fn header_value(v: &[u8]) -> HostResult<HeaderValue> {
    HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)
}

/// Replaces a whole map: regular headers go, pseudo-headers stay unless given.
fn set_pairs(h: &mut Host, t: MapType, pairs: &[(&[u8], &[u8])]) -> HostResult {
    let names: Vec<Vec<u8>> = map_pairs(h, t)?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.first() != Some(&b':'))
        .collect();
    for k in names {
        map_change(h, t, &k, b"", Op::Remove)?;
    }
    let has_authority = pairs.iter().any(|(k, _)| *k == b":authority");
    for (k, v) in pairs {
        if has_authority && k.eq_ignore_ascii_case(b"host") {
            continue; // the same header as :authority
        }
        let op = if k.first() == Some(&b':') {
            Op::Replace
        } else {
            Op::Add
        };
        map_change(h, t, k, v, op)?;
    }
    Ok(())
}

/// Applies one header change to the map the frame lends mutably.
fn map_change(h: &mut Host, t: MapType, key: &[u8], value: &[u8], op: Op) -> HostResult {
    let f = &mut h.frame;
    match t {
        MapType::RequestHeaders => {
            let r = f.req_mut()?;
            if key.first() == Some(&b':') {
                return set_request_pseudo(r, key, value, op);
            }
            if key.eq_ignore_ascii_case(b"host") {
                // Envoy keeps `host` in the `:authority` slot: one header, never a second
                // Host line; an added value joins the one there with a comma
                let joined;
                let value = match (op, r.headers.get(http::header::HOST)) {
                    (Op::Add, Some(old)) => {
                        joined = [old.as_bytes(), b",", value].concat();
                        &joined[..]
                    }
                    _ => value,
                };
                let op = if op == Op::Add { Op::Replace } else { op };
                return change(r, key, value, op);
            }
            change(r, key, value, op)
        }
        MapType::ResponseHeaders => {
            let r = f.resp_mut()?;
            if key == b":status" {
                let s = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or(Status::BadArgument)?;
                return r.set_status(s).map_err(|_| Status::BadArgument);
            }
            change(r, key, value, op)
        }
        MapType::ResponseTrailers => change(f.resp_trailers_mut()?, key, value, op),
        _ => Err(Status::BadArgument), // read-only maps
    }
}

fn change(m: &mut impl HeaderTarget, key: &[u8], value: &[u8], op: Op) -> HostResult {
    let n = header_name(key)?;
    match op {
        Op::Remove => {
            m.remove(&n);
            Ok(())
        }
        Op::Replace => m.set(n, header_value(value)?),
        Op::Add => m.add(n, header_value(value)?),
    }
    .map_err(|_| Status::BadArgument)
}

fn set_request_pseudo(r: &mut RequestHeader, key: &[u8], value: &[u8], op: Op) -> HostResult {
    if op == Op::Remove {
        return Err(Status::BadArgument);
    }
    match key {
        b":path" => {
            let uri = http::Uri::try_from(value).map_err(|_| Status::BadArgument)?;
            if uri.scheme().is_some() || !value.starts_with(b"/") {
                return Err(Status::BadArgument);
            }
            r.set_uri(uri);
            Ok(())
        }
        b":method" => {
            let m = http::Method::from_bytes(value).map_err(|_| Status::BadArgument)?;
            r.set_method(m);
            Ok(())
        }
        b":authority" => r
            .insert_header(http::header::HOST, header_value(value)?)
            .map_err(|_| Status::BadArgument),
        // the scheme is the connection's; setting it to what it is already is accepted
        b":scheme" => Ok(()),
        _ => Err(Status::BadArgument),
    }
}
