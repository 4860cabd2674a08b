//! Decoding what a guest controls: serialized header maps, memory ranges from pointer and
//! length, property paths. No input may panic or read out of bounds; a map that decodes
//! must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/wasm/abi.rs"]
mod abi;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = abi::deserialize_map(data) {
        let again = abi::serialize_map(pairs.iter().copied());
        if !data.is_empty() {
            assert_eq!(again.as_slice(), data, "round trip changed the map");
        }
    }
    if data.len() >= 12 {
        let n = |i: usize| i32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let (mem, ptr, len) = (n(0) as u32 as usize, n(4), n(8));
        if let Ok(r) = abi::guest_range(mem, ptr, len) {
            assert!(r.start <= r.end && r.end <= mem);
        }
    }
    let _ = abi::property_path(data);
    let _ = abi::MapType::from_i32(data.first().copied().unwrap_or(0) as i32);
    let _ = abi::BufferType::from_i32(data.first().copied().unwrap_or(0) as i32);
});
