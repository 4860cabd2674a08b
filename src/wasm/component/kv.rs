//! The tenant's state for functions: `wasi:keyvalue` (store, atomics, batch;
//! 0.2.0-draft) bound to the tenant's namespace of the state store, and `wasi:config`
//! (0.2.0-rc.1) answering the tenant's secrets. Both are granted per request through
//! [`super::Io`]; a function of a gateway without them (or a test) opens no bucket
//! (`access-denied`) and reads no configuration.
//!
//! The store calls are async host calls: the guest's task waits for the store (the
//! embedded file on tokio's blocking pool, or Redis over the network) without holding
//! a proxy thread, and that wait is not charged as CPU (only the deadline counts it).

use super::state::Host;
use crate::state::{Page, StateError, Written};
use bytes::Bytes;
use wasmtime::component::{Linker, Resource};

mod generated {
    wasmtime::component::bindgen!({
        path: "wit/host",
        world: "wasmgate:host/state",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
    });
}

use generated::wasi::config::store as config;
use generated::wasi::keyvalue::{atomics, batch, store};

/// An open bucket: the tenant's namespace (there is one).
pub struct Bucket;

/// Keys one `list-keys` page holds.
const PAGE: usize = 1000;

pub fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    store::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    atomics::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    batch::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    config::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    Ok(())
}

/// A store failure as the guest sees it: `other("CODE: reason")`.
impl From<StateError> for store::Error {
    fn from(e: StateError) -> store::Error {
        store::Error::Other(format!("{}: {e}", e.code()))
    }
}

type R<T> = wasmtime::Result<Result<T, store::Error>>;

impl Host {
    /// The tenant's store handle for one call (`access-denied` when none was granted).
    /// Each method below is `Ok(async { … }.await)`: the inner block's `?` answers the
    /// guest an `error`, the outer `Ok` says the host itself did not fail.
    fn kv(&self) -> Result<crate::state::TenantState, store::Error> {
        self.grants.state.clone().ok_or(store::Error::AccessDenied)
    }
}

impl store::Host for Host {
    async fn open(&mut self, identifier: String) -> R<Resource<Bucket>> {
        if let Err(e) = self.kv() {
            return Ok(Err(e));
        }
        if !(identifier.is_empty() || identifier == "default") {
            // say why in the tenant's log: a component written for another host names
            // its own buckets
            (self.sink)(
                super::Stdio::Stderr,
                &format!("wasmgate: wasi:keyvalue has no bucket `{identifier}`: the tenant's store is `default` (or \"\"); open answered no-such-store"),
            );
            return Ok(Err(store::Error::NoSuchStore));
        }
        Ok(Ok(self.table.push(Bucket)?))
    }
}

impl store::HostBucket for Host {
    async fn get(&mut self, _: Resource<Bucket>, key: String) -> R<Option<Vec<u8>>> {
        let kv = self.kv();
        Ok(async { Ok(kv?.get(&key).await?.map(|e| e.value.to_vec())) }.await)
    }

    async fn set(&mut self, _: Resource<Bucket>, key: String, value: Vec<u8>) -> R<()> {
        let kv = self.kv();
        Ok(async {
            kv?.set(&key, Bytes::from(value), None, None).await?;
            Ok(())
        }
        .await)
    }

    async fn delete(&mut self, _: Resource<Bucket>, key: String) -> R<()> {
        let kv = self.kv();
        Ok(async {
            kv?.delete(&key, None).await?;
            Ok(())
        }
        .await)
    }

    async fn exists(&mut self, _: Resource<Bucket>, key: String) -> R<bool> {
        let kv = self.kv();
        Ok(async { Ok(kv?.get(&key).await?.is_some()) }.await)
    }

    async fn list_keys(
        &mut self,
        _: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> R<store::KeyResponse> {
        let kv = self.kv();
        Ok(async {
            let kv = kv?;
            // the cursor is how many keys were listed before; each page starts after the
            // last key of the one before, found again by listing up to it
            let skip = cursor.unwrap_or(0) as usize;
            let mut after: Option<String> = None;
            let mut seen = 0usize;
            while seen < skip {
                let keys = kv
                    .list(Page::new("", after.as_deref(), (skip - seen).min(PAGE)))
                    .await?;
                if keys.is_empty() {
                    break;
                }
                seen += keys.len();
                after = keys.last().cloned();
            }
            let keys = kv.list(Page::new("", after.as_deref(), PAGE)).await?;
            let cursor = (keys.len() == PAGE).then(|| (skip + keys.len()) as u64);
            Ok(store::KeyResponse { keys, cursor })
        }
        .await)
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

/// Compare-and-swap rounds one increment may take under contention before it gives up.
const INCREMENT_ROUNDS: usize = 64;

impl atomics::Host for Host {
    /// The interface's counter is a u64 (decimal text, absent: 0), which the store's own
    /// `incr` (an i64) cannot cover: a compare-and-swap on the entry's version instead,
    /// so a value that is not a u64, or a sum past u64::MAX, is an error that writes
    /// nothing (as in wasmtime's own implementation).
    async fn increment(&mut self, _: Resource<Bucket>, key: String, delta: u64) -> R<u64> {
        let kv = self.kv();
        let other = |why: &str| store::Error::Other(why.into());
        Ok(async {
            let kv = kv?;
            for _ in 0..INCREMENT_ROUNDS {
                let (n, version) = match kv.get(&key).await? {
                    None => (0, 0),
                    Some(e) => {
                        let n = std::str::from_utf8(&e.value)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                            .ok_or_else(|| {
                                other("not_a_number: the value is not an unsigned decimal integer")
                            })?;
                        (n, e.version)
                    }
                };
                let next = n
                    .checked_add(delta)
                    .ok_or_else(|| other("overflow incrementing value"))?;
                let value = Bytes::from(next.to_string());
                if let Written::Done(_) = kv.set(&key, value, Some(version), None).await? {
                    return Ok(next);
                }
            }
            Err(other("contention: the key changed on every try"))
        }
        .await)
    }
}

impl batch::Host for Host {
    async fn get_many(
        &mut self,
        _: Resource<Bucket>,
        keys: Vec<String>,
    ) -> R<Vec<Option<(String, Vec<u8>)>>> {
        let kv = self.kv();
        Ok(async {
            let kv = kv?;
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                let e = kv.get(&k).await?;
                out.push(e.map(|e| (k, e.value.to_vec())));
            }
            Ok(out)
        }
        .await)
    }

    async fn set_many(&mut self, _: Resource<Bucket>, pairs: Vec<(String, Vec<u8>)>) -> R<()> {
        let kv = self.kv();
        Ok(async {
            let kv = kv?;
            for (k, v) in pairs {
                kv.set(&k, Bytes::from(v), None, None).await?;
            }
            Ok(())
        }
        .await)
    }

    async fn delete_many(&mut self, _: Resource<Bucket>, keys: Vec<String>) -> R<()> {
        let kv = self.kv();
        Ok(async {
            let kv = kv?;
            for k in keys {
                kv.delete(&k, None).await?;
            }
            Ok(())
        }
        .await)
    }
}

impl config::Host for Host {
    async fn get(
        &mut self,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, config::Error>> {
        Ok(Ok(self
            .grants
            .config
            .as_ref()
            .and_then(|c| c.get(&key).cloned())))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, config::Error>> {
        Ok(Ok(self
            .grants
            .config
            .as_ref()
            .map(|c| c.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()))
    }
}
