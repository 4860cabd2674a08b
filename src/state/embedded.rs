//! The embedded backend: one redb file, `data_dir/state.redb`.
//!
//! Why redb rather than SQLite: both are crash-safe with a durable commit (redb's
//! `Durability::Immediate` fsyncs before `commit` returns; copy-on-write pages, so a
//! `kill -9` mid-write leaves the last committed state). redb is pure Rust (no C build
//! step on a fresh machine), its reads are MVCC snapshots that never wait for a writer,
//! and a read is a B-tree lookup with no SQL layer. The measured figures are in the
//! README (state section) and `benches/state.rs`.
//!
//! Every call runs on tokio's blocking pool, never on a proxy thread. Writes are one
//! transaction each, committed durably before the call answers. The file is opened in
//! redb's multi-writer mode, so the old and the new process of a graceful upgrade share
//! it (their write transactions take turns).

use super::{
    counter, expiry, now_ms, Backend, Entry, Page, Result, StateError, WriteOpts, Written,
};
use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

/// `ns \0 key` → `version (u64 LE) | expires at, ms (u64 LE, 0: never) | value`.
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// `ns` → (bytes stored, last version given).
const META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("meta");

pub struct Embedded {
    db: Arc<Database>,
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn full_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + 1 + key.len());
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// A stored record: version, expiry, value.
struct Rec<'a> {
    version: u64,
    expires: u64,
    value: &'a [u8],
}

impl<'a> Rec<'a> {
    fn parse(raw: &'a [u8]) -> Rec<'a> {
        let n = |r: &[u8]| u64::from_le_bytes(r.try_into().unwrap_or([0; 8]));
        Rec {
            version: n(raw.get(0..8).unwrap_or(&[])),
            expires: n(raw.get(8..16).unwrap_or(&[])),
            value: raw.get(16..).unwrap_or(&[]),
        }
    }

    fn live(&self, now: u64) -> bool {
        self.expires == 0 || self.expires > now
    }

    fn encode(version: u64, expires: u64, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + value.len());
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&expires.to_le_bytes());
        v.extend_from_slice(value);
        v
    }
}

impl Embedded {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Embedded> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // a graceful upgrade runs the old and the new gateway side by side on one data
        // dir: both keep the file open for writing, one write transaction at a time
        let db = Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| anyhow::anyhow!("cannot open the state store {}: {e}", path.display()))?;
        // create the tables so readers never see them missing
        let tx = db.begin_write().map_err(|e| anyhow::anyhow!("{e}"))?;
        tx.open_table(KV).map_err(|e| anyhow::anyhow!("{e}"))?;
        tx.open_table(META).map_err(|e| anyhow::anyhow!("{e}"))?;
        tx.commit().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Embedded { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }

    /// One write transaction: `f` sees the namespace's (bytes, version) and the entry's
    /// current live record, and returns what to do; committed durably.
    fn write<T>(
        db: &Database,
        ns: &str,
        key: &str,
        f: impl FnOnce(Option<Rec>, u64, u64) -> Result<(Action, T)>,
    ) -> Result<T> {
        let k = full_key(ns, key);
        let tx = db.begin_write().map_err(unavailable)?;
        let out = {
            let mut kv = tx.open_table(KV).map_err(unavailable)?;
            let mut meta = tx.open_table(META).map_err(unavailable)?;
            let (mut bytes, seq) = meta
                .get(ns)
                .map_err(unavailable)?
                .map_or((0, 0), |g| g.value());
            let old = kv
                .get(k.as_slice())
                .map_err(unavailable)?
                .map(|g| g.value().to_vec());
            let now = now_ms();
            let (cur, old_size) = match &old {
                Some(raw) => {
                    let r = Rec::parse(raw);
                    let size = (key.len() + r.value.len()) as u64;
                    (r.live(now).then_some(r), size)
                }
                None => (None, 0),
            };
            // an expired entry is not there for `f`; its bytes are released when the
            // transaction commits
            let expired = old.is_some() && cur.is_none();
            let live_bytes = bytes.saturating_sub(if expired { old_size } else { 0 });
            let (action, out) = f(cur, live_bytes, seq)?;
            match action {
                Action::Keep if expired => {
                    kv.remove(k.as_slice()).map_err(unavailable)?;
                    bytes = bytes.saturating_sub(old_size);
                    meta.insert(ns, (bytes, seq)).map_err(unavailable)?;
                }
                Action::Keep => return Ok(out), // nothing changed: no commit needed
                Action::Put { expires, value } => {
                    let version = seq + 1;
                    let new_size = (key.len() + value.len()) as u64;
                    bytes = bytes.saturating_sub(old_size) + new_size;
                    kv.insert(
                        k.as_slice(),
                        Rec::encode(version, expires, &value).as_slice(),
                    )
                    .map_err(unavailable)?;
                    meta.insert(ns, (bytes, version)).map_err(unavailable)?;
                }
                Action::Remove => {
                    kv.remove(k.as_slice()).map_err(unavailable)?;
                    bytes = bytes.saturating_sub(old_size);
                    meta.insert(ns, (bytes, seq)).map_err(unavailable)?;
                }
            }
            out
        };
        tx.commit().map_err(unavailable)?;
        Ok(out)
    }
}

/// What a write transaction does to the entry.
enum Action {
    Keep,
    Put { expires: u64, value: Vec<u8> },
    Remove,
}

#[async_trait]
impl Backend for Embedded {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Entry>> {
        let k = full_key(ns, key);
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let kv = tx.open_table(KV).map_err(unavailable)?;
            let Some(raw) = kv.get(k.as_slice()).map_err(unavailable)? else {
                return Ok(None);
            };
            let raw = raw.value();
            let r = Rec::parse(raw);
            Ok(r.live(now_ms()).then(|| Entry {
                value: Bytes::copy_from_slice(r.value),
                version: r.version,
            }))
        })
        .await
    }

    async fn set(&self, ns: &str, key: &str, value: Bytes, opts: WriteOpts) -> Result<Written> {
        let (ns, key) = (ns.to_string(), key.to_string());
        self.blocking(move |db| {
            Embedded::write(db, &ns, &key, |cur, bytes, seq| {
                let version = cur.as_ref().map_or(0, |r| r.version);
                if opts.expect.is_some_and(|e| e != version) {
                    return Ok((Action::Keep, Written::Conflict(version)));
                }
                let old = cur.map_or(0, |r| (key.len() + r.value.len()) as u64);
                let after = bytes.saturating_sub(old) + (key.len() + value.len()) as u64;
                if after > opts.quota {
                    return Err(StateError::OverQuota(opts.quota));
                }
                let put = Action::Put {
                    expires: expiry(opts.ttl),
                    value: value.to_vec(),
                };
                Ok((put, Written::Done(seq + 1)))
            })
        })
        .await
    }

    async fn delete(&self, ns: &str, key: &str, expect: Option<u64>) -> Result<Written> {
        let (ns, key) = (ns.to_string(), key.to_string());
        self.blocking(move |db| {
            Embedded::write(db, &ns, &key, |cur, _, _| {
                let version = cur.as_ref().map_or(0, |r| r.version);
                if expect.is_some_and(|e| e != version) {
                    return Ok((Action::Keep, Written::Conflict(version)));
                }
                let action = if cur.is_some() {
                    Action::Remove
                } else {
                    Action::Keep
                };
                Ok((action, Written::Done(0)))
            })
        })
        .await
    }

    async fn incr(&self, ns: &str, key: &str, delta: i64, quota: u64) -> Result<i64> {
        let (ns, key) = (ns.to_string(), key.to_string());
        self.blocking(move |db| {
            Embedded::write(db, &ns, &key, |cur, bytes, _| {
                let n = counter(cur.as_ref().map(|r| r.value))?
                    .checked_add(delta)
                    .ok_or(StateError::NotANumber)?;
                let value = n.to_string().into_bytes();
                let old = cur
                    .as_ref()
                    .map_or(0, |r| (key.len() + r.value.len()) as u64);
                if bytes.saturating_sub(old) + (key.len() + value.len()) as u64 > quota {
                    return Err(StateError::OverQuota(quota));
                }
                // a counter keeps its TTL
                let expires = cur.map_or(0, |r| r.expires);
                Ok((Action::Put { expires, value }, n))
            })
        })
        .await
    }

    async fn list(&self, ns: &str, page: Page<'_>) -> Result<Vec<String>> {
        let (prefix, after, limit) = (page.prefix, page.after, page.limit);
        let start = match after {
            Some(a) if a >= prefix => {
                let mut k = full_key(ns, a);
                k.push(0); // strictly after
                k
            }
            _ => full_key(ns, prefix),
        };
        let head = full_key(ns, prefix);
        let skip = ns.len() + 1;
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let kv = tx.open_table(KV).map_err(unavailable)?;
            let now = now_ms();
            let mut keys = Vec::new();
            for item in kv.range(start.as_slice()..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let k = k.value();
                if !k.starts_with(&head) || keys.len() >= limit {
                    break;
                }
                if Rec::parse(v.value()).live(now) {
                    keys.push(String::from_utf8_lossy(&k[skip..]).into_owned());
                }
            }
            Ok(keys)
        })
        .await
    }

    async fn bytes_used(&self, ns: &str) -> Result<u64> {
        let ns = ns.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let meta = tx.open_table(META).map_err(unavailable)?;
            Ok(meta
                .get(ns.as_str())
                .map_err(unavailable)?
                .map_or(0, |g| g.value().0))
        })
        .await
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}
