//! Properties: `proxy_get_property`, `proxy_set_property`. Paths are Envoy's
//! attributes (`request.path`, `source.address`, `node.id`, …), read from the request's
//! head and facts; a guest's own properties (set with `proxy_set_property`) shadow them
//! and are seen by the later modules of the chain.

use super::call::{give, read, run, run_alloc, Ret, C};
use super::headers::{host_header, map_get, map_pairs, path_and_query};
use super::Host;
use crate::wasm::abi::{self, HostResult, MapType, Status};
use pingora::http::ResponseHeader;
use wasmtime::Linker;

/// Properties one request's modules may set.
const MAX_SET_PROPERTIES: usize = 64;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(l, get_property, set_property)
}

fn get_property(mut c: C, pp: i32, pn: i32, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let v = read(c, pp, pn).and_then(|p| property(c.data(), &p));
        give(c, v, ret_p, ret_n)
    })
}

fn set_property(mut c: C, pp: i32, pn: i32, vp: i32, vn: i32) -> Ret {
    run(&mut c, |c| {
        let p = read(c, pp, pn)?;
        let v = read(c, vp, vn)?;
        let info = c.data_mut().frame.info_mut().ok_or(Status::NotFound)?;
        if let Some(slot) = info.props.iter_mut().find(|(k, _)| *k == p) {
            slot.1 = v;
        } else if info.props.len() < MAX_SET_PROPERTIES {
            info.props.push((p, v));
        } else {
            return Err(Status::BadArgument);
        }
        Ok(())
    })
}

pub(super) fn property(h: &Host, path: &[u8]) -> HostResult<Vec<u8>> {
    let plugin = &h.plugin;
    let info = h.frame.info();
    if let Some(i) = info {
        if let Some((_, v)) = i.props.iter().find(|(k, _)| k == path) {
            return Ok(v.clone());
        }
    }
    let parts = abi::property_path(path);
    let s = |v: &str| Ok(v.as_bytes().to_vec());
    let int = |v: i64| Ok(v.to_le_bytes().to_vec());
    match parts.as_slice() {
        [b"plugin_name"] => s(&plugin.spec.name),
        [b"plugin_root_id"] => s(&plugin.spec.root_id),
        [b"plugin_vm_id"] | [b"tenant"] => s(&plugin.spec.tenant),
        // one header's value (Envoy's `request.headers['name']`)
        [b"request", b"headers", name] => one_header(h, MapType::RequestHeaders, name),
        [b"request", b"time"] => {
            // nanoseconds since the Unix epoch, as Envoy's timestamps reach guests
            let t = info.and_then(|i| i.start).ok_or(Status::NotFound)?;
            let ns = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| Status::NotFound)?
                .as_nanos();
            int(ns as i64)
        }
        [b"request", b"duration"] => {
            let t = info.and_then(|i| i.start).ok_or(Status::NotFound)?;
            int(t.elapsed().unwrap_or_default().as_nanos() as i64)
        }
        [b"request", b"size"] => {
            // as Envoy: the declared length when there is one, else the bytes received
            let declared = h
                .frame
                .req()
                .ok()
                .and_then(|r| r.headers.get(http::header::CONTENT_LENGTH));
            match declared {
                Some(v) => int(std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .ok_or(Status::NotFound)?),
                None => int(info.map_or(0, |i| i.request_body_bytes) as i64),
            }
        }
        [b"request", b"total_size"] => {
            // body bytes received plus the head's names and values (Envoy's byteSize)
            let head: usize = map_pairs(h, MapType::RequestHeaders)
                .map(|p| p.iter().map(|(k, v)| k.len() + v.len()).sum())
                .unwrap_or(0);
            int((info.map_or(0, |i| i.request_body_bytes) + head as u64) as i64)
        }
        [b"connection", b"id"] | [b"connection_id"] => {
            let id = info.map_or(0, |i| i.connection_id);
            if id == 0 {
                return Err(Status::NotFound);
            }
            Ok(id.to_le_bytes().to_vec())
        }
        [b"connection", b"mtls"] => Ok(vec![info
            .and_then(|i| i.tls.as_ref())
            .is_some_and(|t| t.peer_cert) as u8]),
        [b"connection", b"requested_server_name"] => Ok(info
            .and_then(|i| i.tls.as_ref())
            .and_then(|t| t.sni.as_deref())
            .unwrap_or("")
            .as_bytes()
            .to_vec()),
        [b"connection", b"tls_version"] => s(&info
            .and_then(|i| i.tls.as_ref())
            .ok_or(Status::NotFound)?
            .version),
        [b"connection", b"uri_san_peer_certificate"] => s(info
            .and_then(|i| i.tls.as_ref())
            .and_then(|t| t.uri_san.as_deref())
            .ok_or(Status::NotFound)?),
        [b"response", b"code_details"] => s(info
            .and_then(|i| i.code_details.as_deref())
            .ok_or(Status::NotFound)?),
        [b"response", b"flags"] => int(info.map_or(0, |i| i.response_flags) as i64),
        [b"response", b"size"] => int(info.map_or(0, |i| i.response_body_bytes) as i64),
        [b"response", b"total_size"] => {
            let head = match h.frame.resp() {
                Ok(r) => response_head_bytes(r),
                Err(_) => info.and_then(|i| i.response_header_bytes).unwrap_or(0),
            };
            int((info.map_or(0, |i| i.response_body_bytes) + head) as i64)
        }
        [b"node"] => Ok(plugin.shared.node().to_protobuf()),
        [b"node", b"id"] => s(&plugin.shared.node().id),
        [b"node", b"cluster"] => s(&plugin.shared.node().cluster),
        [b"node", b"metadata"] => {
            let node = plugin.shared.node();
            Ok(abi::serialize_map(
                node.metadata
                    .iter()
                    .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            ))
        }
        [b"node", b"metadata", key] => {
            let node = plugin.shared.node();
            let key = std::str::from_utf8(key).map_err(|_| Status::NotFound)?;
            Ok(node
                .metadata
                .get(key)
                .ok_or(Status::NotFound)?
                .as_bytes()
                .to_vec())
        }
        [b"request", field] => {
            let r = h.frame.req().map_err(unset)?;
            match *field {
                b"referer" => r
                    .headers
                    .get(http::header::REFERER)
                    .map(|v| v.as_bytes().to_vec())
                    .ok_or(Status::NotFound),
                b"path" => s(path_and_query(r)),
                b"url_path" => s(r.uri.path()),
                b"query" => s(r.uri.query().unwrap_or("")),
                b"method" => s(r.method.as_str()),
                b"host" => Ok(host_header(r).to_vec()),
                b"scheme" => s(info.map(|i| i.scheme).unwrap_or("http")),
                b"protocol" => s(info.map(|i| i.protocol).unwrap_or("HTTP/1.1")),
                b"id" => s(&format!("{:016x}", info.ok_or(Status::NotFound)?.id)),
                b"useragent" => Ok(r
                    .headers
                    .get(http::header::USER_AGENT)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default()),
                b"headers" => {
                    let pairs = map_pairs(h, MapType::RequestHeaders).map_err(unset)?;
                    Ok(abi::serialize_map(
                        pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
                    ))
                }
                _ => Err(Status::NotFound),
            }
        }
        [b"response", b"code"] => {
            let code = match h.frame.resp() {
                Ok(r) => r.status.as_u16(),
                Err(_) => info
                    .map(|i| i.response_code)
                    .filter(|c| *c != 0)
                    .ok_or(Status::NotFound)?,
            };
            int(code as i64)
        }
        [b"response", b"headers", name] => one_header(h, MapType::ResponseHeaders, name),
        [b"response", b"headers"] => {
            let pairs = map_pairs(h, MapType::ResponseHeaders).map_err(unset)?;
            Ok(abi::serialize_map(
                pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
            ))
        }
        [peer @ (b"source" | b"destination" | b"upstream"), part @ (b"address" | b"port")] => {
            let addr = info
                .and_then(|i| match *peer {
                    b"source" => i.source,
                    b"destination" => i.destination,
                    _ => i.upstream_address,
                })
                .ok_or(Status::NotFound)?;
            match *part {
                b"port" => int(addr.port() as i64),
                _ => s(&addr.to_string()),
            }
        }
        [b"route_name"] => s(&info.ok_or(Status::NotFound)?.route),
        [b"cluster_name"] | [b"upstream", b"name"] => s(info
            .and_then(|i| i.upstream.as_deref())
            .ok_or(Status::NotFound)?),
        _ => Err(Status::NotFound),
    }
}

/// A response head's size as Envoy counts it for `response.total_size`: `:status` and
/// its value, plus every header's name and value.
pub fn response_head_bytes(r: &ResponseHeader) -> u64 {
    (":status".len() + 3) as u64
        + r.headers
            .iter()
            .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
            .sum::<u64>()
}

/// One header's value, as `proxy_get_header_map_value` reads it; a name no header can have
/// is simply not found.
fn one_header(h: &Host, map: MapType, name: &[u8]) -> HostResult<Vec<u8>> {
    map_get(h, map, name).map_err(unset)
}

/// A property whose header map the callback does not have is unset (`NotFound`), not a
/// bad argument as the header-map calls answer; other statuses pass through.
fn unset(s: Status) -> Status {
    match s {
        Status::BadArgument => Status::NotFound,
        other => other,
    }
}
