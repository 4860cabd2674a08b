//! Proxy-Wasm v0.2.1 wire details that need no runtime: status codes, enum values,
//! and the serialized header-map format. Pure functions, so they are unit-tested and
//! fuzzed directly with guest-controlled bytes.

/// `proxy_status_t` values returned by every host call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            4 | 5 => return Err(Status::Unimplemented), // gRPC metadata
            _ => return Err(Status::BadArgument),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    HttpCallResponseBody,
    VmConfiguration,
    PluginConfiguration,
}

impl BufferType {
    pub fn from_i32(v: i32) -> HostResult<BufferType> {
        Ok(match v {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::HttpCallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            2 | 3 | 5 | 8 => return Err(Status::Unimplemented), // L4 data, gRPC, call data
            _ => return Err(Status::BadArgument),
        })
    }
}

/// `proxy_action_t` returned by stream callbacks.
pub const ACTION_CONTINUE: i32 = 0;
pub const ACTION_PAUSE: i32 = 1;

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
    fn guest_ranges_are_checked() {
        assert_eq!(guest_range(100, 10, 20), Ok(10..30));
        assert_eq!(guest_range(100, 90, 20), Err(Status::InvalidMemoryAccess));
        assert_eq!(guest_range(100, -1, -1), Err(Status::InvalidMemoryAccess));
        assert_eq!(guest_range(100, 100, 0), Ok(100..100));
    }
}
