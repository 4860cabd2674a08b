//! The Redis backend (`[state] backend = "redis"`): the same semantics as the embedded
//! store, kept by Lua scripts so each write is one atomic step on the server.
//!
//! Layout, with the namespace as a hash tag so one namespace's keys share a cluster slot:
//! - `{prefix}:{ns}:k:{key}`: a hash, `v` (value), `ver` (version), `exp` (ms, 0 never);
//! - `{prefix}:{ns}:m`: a hash, `bytes` (stored) and `seq` (last version given);
//! - `{prefix}:{ns}:i`: a sorted set of the keys (score 0), for listing by prefix.
//!
//! Connections: a few multiplexed connections per gateway (redis-rs's
//! `ConnectionManager`, pipelining every call in flight), taken in turn, each made lazily
//! and remade with backoff when it breaks, so the gateway starts and serves
//! while Redis is away; every call has a timeout and a failed one answers
//! [`StateError::Unavailable`]. Durability is Redis's own (`appendonly yes`,
//! `appendfsync always` for an acknowledged write to survive a Redis crash).

use super::{now_ms, Backend, Entry, Page, Result, StateError, WriteOpts, Written};
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

/// Reads the entry (`cur`), releases it if it has expired, and leaves `bytes`, `ver`
/// and `old` (the live entry's size) for the script that follows.
/// KEYS: entry, meta, index. ARGV[1]: the key; the last ARGV: now (ms).
const PROLOGUE: &str = r#"
local key = ARGV[1]
local now = tonumber(ARGV[#ARGV])
local cur = redis.call('HMGET', KEYS[1], 'ver', 'exp', 'v')
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
local ver, old = 0, 0
if cur[1] then
  local size = #key + #cur[3]
  local e = tonumber(cur[2])
  if e > 0 and e <= now then
    bytes = bytes - size
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[3], key)
    redis.call('HSET', KEYS[2], 'bytes', bytes)
  else
    ver = tonumber(cur[1])
    old = size
  end
end
"#;

/// ARGV: key, value, expect (-1: any), expires at, quota, now.
/// Answers {1, version} | {0, current version} (conflict) | {2, ''} (over quota).
const SET: &str = r#"
local value, expect, exp, quota = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if expect >= 0 and expect ~= ver then return {0, tostring(ver)} end
local after = bytes - old + #key + #value
if after > quota then return {2, ''} end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('HSET', KEYS[2], 'bytes', after)
redis.call('HSET', KEYS[1], 'v', value, 'ver', seq, 'exp', exp)
redis.call('ZADD', KEYS[3], 0, key)
return {1, tostring(seq)}
"#;

/// ARGV: key, expect (-1: any), now. Answers {1, '0'} | {0, current version}.
const DELETE: &str = r#"
local expect = tonumber(ARGV[2])
if expect >= 0 and expect ~= ver then return {0, tostring(ver)} end
if ver > 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], key)
  redis.call('HSET', KEYS[2], 'bytes', bytes - old)
end
return {1, '0'}
"#;

/// ARGV: key, delta, quota, now. Answers {1, new value} | {2, ''} (over quota) |
/// {3, ''} (not an integer, or the sum overflows). Redis's own HINCRBY does the 64-bit
/// arithmetic, so a counter is exact over the whole i64 range.
const INCR: &str = r#"
local quota = tonumber(ARGV[3])
if ver == 0 then redis.call('HSET', KEYS[1], 'v', '0', 'exp', 0) end
local r = redis.pcall('HINCRBY', KEYS[1], 'v', ARGV[2])
if type(r) == 'table' and r.err then
  if ver == 0 then redis.call('DEL', KEYS[1]) end
  return {3, ''}
end
local s = redis.call('HGET', KEYS[1], 'v')
local after = bytes - old + #key + #s
if after > quota then
  if ver == 0 then redis.call('DEL', KEYS[1]) else redis.call('HSET', KEYS[1], 'v', cur[3]) end
  return {2, ''}
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('HSET', KEYS[2], 'bytes', after)
redis.call('HSET', KEYS[1], 'ver', seq)
redis.call('ZADD', KEYS[3], 0, key)
return {1, s}
"#;

/// KEYS: entry-key prefix, index. ARGV: min, max (ZRANGEBYLEX bounds), limit, now.
/// Live keys only; pages through the index until `limit` live keys or its end.
const LIST: &str = r#"
local min, max, limit, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
while #out < limit do
  local keys = redis.call('ZRANGEBYLEX', KEYS[2], min, max, 'LIMIT', 0, limit)
  if #keys == 0 then break end
  for _, k in ipairs(keys) do
    local e = redis.call('HGET', KEYS[1] .. k, 'exp')
    if e and (tonumber(e) == 0 or tonumber(e) > now) and #out < limit then
      table.insert(out, k)
    end
  end
  min = '(' .. keys[#keys]
end
return out
"#;

static SET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&[PROLOGUE, SET].concat()));
static DELETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[PROLOGUE, DELETE].concat()));
static INCR_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&[PROLOGUE, INCR].concat()));
static LIST_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LIST));

/// Multiplexed connections kept to Redis: calls take them in turn, so one slow reply
/// does not hold up every call behind it.
const CONNECTIONS: usize = 4;

pub struct Redis {
    conns: Vec<ConnectionManager>,
    next: std::sync::atomic::AtomicUsize,
    prefix: String,
    timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!("redis: {e}"))
}

impl Redis {
    /// A backend on `url` (`redis://host:port/db`); connects on first use, so a Redis
    /// that is down at start does not stop the gateway.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> anyhow::Result<Redis> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("[state] url `{url}`: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conns = (0..CONNECTIONS)
            .map(|_| client.get_connection_manager_lazy(config.clone()))
            .collect::<redis::RedisResult<Vec<_>>>()
            .map_err(|e| anyhow::anyhow!("[state] url `{url}`: {e}"))?;
        Ok(Redis {
            conns,
            next: Default::default(),
            prefix: prefix.to_string(),
            timeout,
        })
    }

    /// The next connection, in turn.
    fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }

    fn keys(&self, ns: &str, key: &str) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}:{{{ns}}}:k:{key}"),
            format!("{p}:{{{ns}}}:m"),
            format!("{p}:{{{ns}}}:i"),
        ]
    }

    /// A call with the timeout, on the next connection. A call whose request never left
    /// (the connection was found broken when writing: Redis restarted since its last
    /// use) is made once more, on the connection made anew.
    async fn bounded<T, F: std::future::Future<Output = redis::RedisResult<T>>>(
        &self,
        f: impl Fn(ConnectionManager) -> F,
    ) -> Result<T> {
        let conn = self.conn();
        let mut r = tokio::time::timeout(self.timeout, f(conn.clone())).await;
        if matches!(&r, Ok(Err(e)) if crate::cluster::unsent(e)) {
            r = tokio::time::timeout(self.timeout, f(conn)).await;
        }
        match r {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StateError::Unavailable("redis: timed out".into())),
        }
    }

    async fn script(
        &self,
        script: &Script,
        keys: &[String; 3],
        args: &[&[u8]],
    ) -> Result<(i64, String)> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        inv.arg(now_ms());
        self.bounded(|mut conn| {
            let inv = &inv;
            async move { inv.invoke_async(&mut conn).await }
        })
        .await
    }
}

fn written(code: i64, n: &str) -> Written {
    let v = n.parse().unwrap_or(0);
    if code == 0 {
        Written::Conflict(v)
    } else {
        Written::Done(v)
    }
}

#[async_trait]
impl Backend for Redis {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Entry>> {
        let [k, _, _] = self.keys(ns, key);
        let k = &k;
        let (v, ver, exp): (Option<Vec<u8>>, Option<u64>, Option<u64>) = self
            .bounded(|mut conn| async move {
                redis::cmd("HMGET")
                    .arg(k)
                    .arg("v")
                    .arg("ver")
                    .arg("exp")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let (Some(v), Some(version)) = (v, ver) else {
            return Ok(None);
        };
        let exp = exp.unwrap_or(0);
        Ok((exp == 0 || exp > now_ms()).then(|| Entry {
            value: Bytes::from(v),
            version,
        }))
    }

    async fn set(&self, ns: &str, key: &str, value: Bytes, opts: WriteOpts) -> Result<Written> {
        let expect = opts.expect.map_or(-1, |v| v as i64).to_string();
        let exp = super::expiry(opts.ttl).to_string();
        let quota = opts.quota.to_string();
        let args: [&[u8]; 5] = [
            key.as_bytes(),
            &value,
            expect.as_bytes(),
            exp.as_bytes(),
            quota.as_bytes(),
        ];
        let (code, n) = self.script(&SET_SCRIPT, &self.keys(ns, key), &args).await?;
        if code == 2 {
            return Err(StateError::OverQuota(opts.quota));
        }
        Ok(written(code, &n))
    }

    async fn delete(&self, ns: &str, key: &str, expect: Option<u64>) -> Result<Written> {
        let expect = expect.map_or(-1, |v| v as i64).to_string();
        let args: [&[u8]; 2] = [key.as_bytes(), expect.as_bytes()];
        let (code, n) = self
            .script(&DELETE_SCRIPT, &self.keys(ns, key), &args)
            .await?;
        Ok(written(code, &n))
    }

    async fn incr(&self, ns: &str, key: &str, delta: i64, quota: u64) -> Result<i64> {
        let (d, q) = (delta.to_string(), quota.to_string());
        let args: [&[u8]; 3] = [key.as_bytes(), d.as_bytes(), q.as_bytes()];
        let (code, n) = self
            .script(&INCR_SCRIPT, &self.keys(ns, key), &args)
            .await?;
        match code {
            1 => n.parse().map_err(|_| StateError::NotANumber),
            2 => Err(StateError::OverQuota(quota)),
            _ => Err(StateError::NotANumber),
        }
    }

    async fn list(&self, ns: &str, page: Page<'_>) -> Result<Vec<String>> {
        let (prefix, after, limit) = (page.prefix, page.after, page.limit);
        let [_, _, index] = self.keys(ns, "");
        let entry_prefix = format!("{}:{{{ns}}}:k:", self.prefix);
        let mut min = format!("[{prefix}").into_bytes();
        if let Some(a) = after.filter(|a| *a >= prefix) {
            min = format!("({a}").into_bytes();
        }
        // 0xff never occurs in UTF-8, so it bounds every key that starts with `prefix`
        let max: Vec<u8> = if prefix.is_empty() {
            b"+".to_vec()
        } else {
            [b"(", prefix.as_bytes(), &[0xff]].concat()
        };
        let mut inv = LIST_SCRIPT.prepare_invoke();
        inv.key(&entry_prefix).key(&index);
        inv.arg(min).arg(max).arg(limit.max(1)).arg(now_ms());
        self.bounded(|mut conn| {
            let inv = &inv;
            async move { inv.invoke_async(&mut conn).await }
        })
        .await
    }

    async fn bytes_used(&self, ns: &str) -> Result<u64> {
        let [_, meta, _] = self.keys(ns, "");
        let meta = &meta;
        let b: Option<u64> = self
            .bounded(|mut conn| async move {
                redis::cmd("HGET")
                    .arg(meta)
                    .arg("bytes")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(b.unwrap_or(0))
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn is_shared(&self) -> bool {
        true
    }
}
