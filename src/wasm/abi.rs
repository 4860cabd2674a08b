//! Proxy-Wasm v0.2.1 wire details that need no runtime: status codes, enum values,
//! and the serialized header-map format. Pure functions, so they are unit-tested and
//! fuzzed directly with guest-controlled bytes.

/// `proxy_status_t` values returned by every host call: the ABI's error type (`Ok`
/// only ever travels as the status word itself). Displayed by its ABI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{self:?}")]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

pub type HostResult<T = ()> = Result<T, Status>;

/// Folds a host call's result into the status the guest receives.
pub fn status(r: HostResult) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
    GrpcReceiveInitialMetadata,
    GrpcReceiveTrailingMetadata,
}

impl MapType {
    pub fn from_i32(v: i32) -> HostResult<MapType> {
        Ok(match v {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            4 => MapType::GrpcReceiveInitialMetadata,
            5 => MapType::GrpcReceiveTrailingMetadata,
            _ => return Err(Status::BadArgument),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    HttpCallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    /// The result of a `wasmgate.kv.*` foreign function, in `on_foreign_function`.
    CallData,
}

impl BufferType {
    pub fn from_i32(v: i32) -> HostResult<BufferType> {
        Ok(match v {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            2 | 3 => return Err(Status::Unimplemented), // L4 data
            _ => return Err(Status::BadArgument),
        })
    }
}

/// `proxy_action_t` returned by stream callbacks.
pub const ACTION_CONTINUE: i32 = 0;

/// Serializes header pairs the way SDKs read them: count, (name len, value len) per
/// pair, then each name and value followed by a NUL byte. All integers little-endian u32.
pub fn serialize_map<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let mut count = 0u32;
    let mut size = 4;
    for (k, v) in pairs.clone() {
        count += 1;
        size += 8 + k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialized map from guest memory. Every length is checked against the
/// buffer; nothing a guest writes can make this read out of bounds or allocate more
/// than the buffer's size.
pub fn deserialize_map(bytes: &[u8]) -> HostResult<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    // Each pair needs at least 8 bytes of sizes and 2 NULs: reject impossible counts early.
    if count > (bytes.len() - 4) / 10 {
        return Err(Status::SerializationFailure);
    }
    let mut sizes = 4usize;
    let mut data = 4 + count * 8;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let klen = read_u32(bytes, sizes)? as usize;
        let vlen = read_u32(bytes, sizes + 4)? as usize;
        sizes += 8;
        let k = take(bytes, data, klen)?;
        data += klen + 1;
        let v = take(bytes, data, vlen)?;
        data += vlen + 1;
        out.push((k, v));
    }
    // Nothing may follow the last pair: a map is exactly what its sizes say
    // (found by fuzzing: trailing bytes were accepted and silently ignored).
    if data != bytes.len() {
        return Err(Status::SerializationFailure);
    }
    Ok(out)
}

fn read_u32(b: &[u8], at: usize) -> HostResult<u32> {
    let s = b
        .get(at..at.checked_add(4).ok_or(Status::SerializationFailure)?)
        .ok_or(Status::SerializationFailure)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// `len` bytes at `at`, followed by the NUL terminator the format requires.
fn take(b: &[u8], at: usize, len: usize) -> HostResult<&[u8]> {
    let end = at.checked_add(len).ok_or(Status::SerializationFailure)?;
    match b.get(end) {
        Some(0) => Ok(&b[at..end]),
        _ => Err(Status::SerializationFailure),
    }
}

/// Range `[ptr, ptr+len)` of a guest memory of `mem_len` bytes, or the ABI's error.
pub fn guest_range(mem_len: usize, ptr: i32, len: i32) -> HostResult<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    if end > mem_len {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

/// The upstream a serialized `envoy.config.core.v3.GrpcService` names, as Envoy's
/// `proxy_grpc_call` takes it: `envoy_grpc` (field 1) with its `cluster_name` (1) and
/// optional `authority` (2). Anything else (a `google_grpc` service, bytes that are not
/// such a message) is `ParseFailure`, Envoy's answer when it cannot use the argument.
pub fn grpc_service_cluster(bytes: &[u8]) -> HostResult<(&[u8], Option<&[u8]>)> {
    let mut envoy_grpc = None;
    for_each_field(bytes, |field, value| {
        if field == 1 {
            envoy_grpc = Some(value.ok_or(Status::ParseFailure)?);
        }
        Ok(())
    })?;
    let inner = envoy_grpc.ok_or(Status::ParseFailure)?;
    let (mut cluster, mut authority) = (None, None);
    for_each_field(inner, |field, value| {
        match field {
            1 => cluster = Some(value.ok_or(Status::ParseFailure)?),
            2 => authority = Some(value.ok_or(Status::ParseFailure)?),
            _ => {}
        }
        Ok(())
    })?;
    match cluster {
        Some(c) if !c.is_empty() => Ok((c, authority.filter(|a| !a.is_empty()))),
        _ => Err(Status::ParseFailure),
    }
}

/// Walks a protobuf message's fields: `f(field number, Some(bytes))` for length-delimited
/// ones, `None` for the others (skipped). Every length is checked against the buffer.
fn for_each_field<'a>(
    mut b: &'a [u8],
    mut f: impl FnMut(u64, Option<&'a [u8]>) -> HostResult,
) -> HostResult {
    fn varint(b: &mut &[u8]) -> HostResult<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = b.split_first().ok_or(Status::ParseFailure)?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Status::ParseFailure)
    }
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err(Status::ParseFailure);
        }
        let skip = |b: &mut &'a [u8], n: usize| -> HostResult<&'a [u8]> {
            if b.len() < n {
                return Err(Status::ParseFailure);
            }
            let (v, rest) = b.split_at(n);
            *b = rest;
            Ok(v)
        };
        match wire {
            0 => {
                varint(&mut b)?;
                f(field, None)?;
            }
            1 => {
                skip(&mut b, 8)?;
                f(field, None)?;
            }
            2 => {
                let n = usize::try_from(varint(&mut b)?).map_err(|_| Status::ParseFailure)?;
                let v = skip(&mut b, n)?;
                f(field, Some(v))?;
            }
            5 => {
                skip(&mut b, 4)?;
                f(field, None)?;
            }
            _ => return Err(Status::ParseFailure),
        }
    }
    Ok(())
}

/// Splits a property path (`request\0path`) into its segments.
pub fn property_path(bytes: &[u8]) -> Vec<&[u8]> {
    bytes.split(|b| *b == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/x"), (b"x-a", b""), (b"k", b"v\xff")];
        let bytes = serialize_map(pairs.iter().copied());
        assert_eq!(deserialize_map(&bytes).unwrap(), pairs);
        assert_eq!(deserialize_map(&[]).unwrap(), vec![]);
    }

    #[test]
    fn hostile_maps_are_rejected() {
        // count says a billion pairs
        assert_eq!(
            deserialize_map(&[0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(Status::SerializationFailure)
        );
        // sizes point past the end
        let mut b = serialize_map([(&b"a"[..], &b"b"[..])]);
        b[4] = 200;
        assert_eq!(deserialize_map(&b), Err(Status::SerializationFailure));
        // missing NUL terminator
        let mut b = serialize_map([(&b"a"[..], &b"b"[..])]);
        let n = b.len();
        b[n - 1] = 1;
        assert_eq!(deserialize_map(&b), Err(Status::SerializationFailure));
        assert_eq!(deserialize_map(&[1, 0]), Err(Status::SerializationFailure));
    }

    /// Inputs the fuzzers found, kept as regressions (`fuzz/regressions/`): each must be
    /// handled without panicking, and a map that decodes must encode back identically.
    #[test]
    fn fuzz_regressions() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/abi_decode");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            if let Ok(pairs) = deserialize_map(&data) {
                assert_eq!(serialize_map(pairs.iter().copied()), data);
            }
            n += 1;
        }
        assert!(n >= 1);
        assert_eq!(
            deserialize_map(&[0, 0, 0, 0, 4]),
            Err(Status::SerializationFailure)
        );
    }

    #[test]
    fn grpc_service_protos() {
        // GrpcService { envoy_grpc { cluster_name: "auth", authority: "a.b" }, timeout {seconds: 1} }
        let msg = [
            0x0a, 0x0b, 0x0a, 0x04, b'a', b'u', b't', b'h', 0x12, 0x03, b'a', b'.', b'b', 0x1a,
            0x02, 0x08, 0x01,
        ];
        assert_eq!(
            grpc_service_cluster(&msg),
            Ok((&b"auth"[..], Some(&b"a.b"[..])))
        );
        // only a cluster name
        assert_eq!(
            grpc_service_cluster(&[0x0a, 0x03, 0x0a, 0x01, b'x']),
            Ok((&b"x"[..], None))
        );
        // google_grpc, plain text, truncated and hostile lengths
        assert!(grpc_service_cluster(&[0x12, 0x00]).is_err());
        assert!(grpc_service_cluster(b"auth").is_err());
        assert!(grpc_service_cluster(&[0x0a, 0x05, 0x0a]).is_err());
        assert!(grpc_service_cluster(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(grpc_service_cluster(&[]).is_err());
    }

    #[test]
    fn guest_ranges_are_checked() {
        assert_eq!(guest_range(100, 10, 20), Ok(10..30));
        assert_eq!(guest_range(100, 90, 20), Err(Status::InvalidMemoryAccess));
        assert_eq!(guest_range(100, -1, -1), Err(Status::InvalidMemoryAccess));
        assert_eq!(guest_range(100, 100, 0), Ok(100..100));
    }
}
