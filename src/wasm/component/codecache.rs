//! Cranelift's incremental compilation cache for components, kept in memory.
//!
//! Why: every JavaScript component carries the same StarlingMonkey engine and every Python
//! component the same CPython; only their data (the snapshotted script) differs. Compiling
//! a 13 MB JavaScript component takes ~5 s here, almost all of it on functions the last
//! JavaScript deploy already compiled. With this cache Cranelift reuses a function's code
//! whenever its body and environment hash the same, so deploying a second function in a
//! language the node has seen compiles only what is new.
//!
//! Bounded: past [`MAX_BYTES`] nothing more is kept (what is cached stays valid; new code
//! compiles as before). Compiles run off the request path, so a plain mutex is enough.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

/// Compiled-function bytes kept at most.
pub const MAX_BYTES: usize = 512 << 20;

#[derive(Debug, Default)]
pub struct CodeCache {
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
}

impl wasmtime::CacheStore for CodeCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let entries = self.inner.lock().ok()?;
        entries.map.get(key).map(|v| Cow::Owned(v.clone()))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let Ok(mut entries) = self.inner.lock() else {
            return false;
        };
        let size = key.len() + value.len();
        if entries.bytes + size > MAX_BYTES {
            return false;
        }
        entries.bytes += size;
        entries.map.insert(key.to_vec(), value);
        true
    }
}
