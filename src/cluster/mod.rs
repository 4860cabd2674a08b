//! Many nodes, one platform: what nodes share through Redis (`[cluster]`), and the shared
//! rate limits. This room speaks Redis and knows nothing of the control plane's records:
//! it stores bytes under names, compares and swaps a sequence number, leases rate-limit
//! tokens and keeps the list of nodes. `control::cluster` decides what those bytes are.
//!
//! Layout (every key under `{prefix}:cluster:`):
//! - `control`: a hash — `rec` (the control record, JSON), `seq` (bumped by every
//!   change), `at` (when, ms), `by` (which node), `mac` (HMAC-SHA256 of `seq` and `rec`
//!   under a key derived from the cluster key). Changed only by [`Cluster::cas`] (a
//!   compare-and-swap on `seq`) and [`Cluster::restore`] (after Redis lost it). A record
//!   whose `mac` does not verify is never served: whoever can write to Redis without the
//!   cluster key cannot deploy code, un-revoke a token or roll a tenant back.
//! - `mod:{sha256}`: a module's bytes, by digest.
//! - `secrets`: a hash, tenant → a counter bumped when one of its secrets changes.
//! - `nodes`: a hash, node id → its last heartbeat (JSON).
//! - `rl:{tenant}`: a tenant's shared rate limit (GCRA: the theoretical arrival time, µs).
//! - channel `events`: a poke after each change; nodes also poll (`sync_interval_ms`).

pub mod lease;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// The environment variable that carries the cluster key by default.
pub const KEY_ENV: &str = "WASMGATE_CLUSTER_KEY";
/// A node not heard from for this long is no longer counted among the live ones.
pub const NODE_ALIVE: Duration = Duration::from_secs(5);
/// How often a node writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// `[cluster]` as the process runs with it.
#[derive(Clone)]
pub struct ClusterConf {
    /// `redis://…`
    pub url: String,
    pub prefix: String,
    /// The shared secret every node has (32 bytes or more): tenant tokens are signed
    /// with a key derived from it, and so are tenant secrets (unless
    /// `WASMGATE_SECRET_KEY` is set).
    pub key: Arc<Vec<u8>>,
    /// How often a node checks for changes it may have missed.
    pub sync_interval: Duration,
    /// Longest one Redis call may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for ClusterConf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the key
        f.debug_struct("ClusterConf")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("sync_interval", &self.sync_interval)
            .finish_non_exhaustive()
    }
}

/// A key derived from the cluster key for one purpose (HKDF-SHA256).
pub fn derive_key(cluster_key: &[u8], purpose: &str) -> [u8; 32] {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"wasmgate cluster");
    let prk = salt.extract(cluster_key);
    let info = [purpose.as_bytes()];
    let okm = prk
        .expand(&info, Len)
        .expect("32 bytes is a valid HKDF length");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("32 bytes is a valid HKDF length");
    out
}

/// Why a cluster call failed: Redis did not answer (or answered an error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis: {0}")]
pub struct Unavailable(pub String);

pub type Result<T> = std::result::Result<T, Unavailable>;

/// The shared control record as Redis holds it.
pub struct Remote {
    pub seq: u64,
    /// When it was written (ms since the epoch) and by which node.
    pub at_ms: u64,
    pub by: String,
    pub record: Vec<u8>,
}

/// The answer to a compare-and-swap.
#[derive(Debug, PartialEq, Eq)]
pub enum Cas {
    /// Written as this sequence number.
    Done(u64),
    /// Someone else wrote first: Redis is at this sequence number.
    Conflict(u64),
}

/// What a node says about itself every [`HEARTBEAT`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeBeat {
    pub node: String,
    /// The gateway's version.
    pub version: String,
    /// The control record's sequence number the node serves.
    pub seq: u64,
    /// When it said so (ms since the epoch).
    pub seen_ms: u64,
    /// Its admin API, if it runs one.
    pub admin: String,
    /// This process (random per start): two processes with one node id tell apart.
    #[serde(default)]
    pub instance: String,
    /// A fingerprint of its cluster key: nodes with different keys cannot share.
    #[serde(default)]
    pub key_id: String,
}

/// What `/metrics` and `wasmgate cluster status` show about this node.
#[derive(Default)]
pub struct Status {
    pub connected: AtomicBool,
    /// The control record's sequence number this node serves.
    pub seq: AtomicU64,
    /// When this node last compared its record with Redis's (ms since the epoch).
    pub last_sync_ms: AtomicU64,
    /// From a change's commit on some node to this node serving it (ms), last change.
    pub lag_ms: AtomicU64,
    /// Nodes heard from within [`NODE_ALIVE`] (this one included).
    pub nodes: AtomicUsize,
    /// Changes this node could not apply (a module that would not build): it serves the
    /// version it had.
    pub apply_errors: AtomicU64,
    /// Why the last comparison with Redis failed (None: it worked).
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// Compare-and-swap of the control record. KEYS: control. ARGV: expected seq, record,
/// now (ms), node, channel, mac. Answers {1, new seq} | {0, current seq}.
const CAS: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local seq = cur + 1
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'seq', seq, 'at', ARGV[3], 'by', ARGV[4], 'mac', ARGV[6])
redis.call('PUBLISH', ARGV[5], 'control ' .. seq)
return {1, seq}
"#;

/// Puts back a record Redis lost (or holds an older one of), unless Redis holds one at
/// least as new. KEYS: control. ARGV: seq, record, now, node, channel, mac. Answers
/// {1, seq} if restored, else {0, current seq}.
const RESTORE: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if cur >= tonumber(ARGV[1]) then return {0, cur} end
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'seq', ARGV[1], 'at', ARGV[3], 'by', ARGV[4], 'mac', ARGV[6])
redis.call('PUBLISH', ARGV[5], 'control ' .. ARGV[1])
return {1, tonumber(ARGV[1])}
"#;

/// Deletes a module's bytes unless the control record still names its digest.
/// KEYS: control, module. ARGV: digest.
const FORGET: &str = r#"
local rec = redis.call('HGET', KEYS[1], 'rec') or ''
if string.find(rec, ARGV[1], 1, true) then return 0 end
return redis.call('DEL', KEYS[2])
"#;

/// A lease of rate-limit tokens from a tenant's shared GCRA. KEYS: the tenant's TAT.
/// ARGV: tokens wanted, rate per second, burst. Answers {granted, retry after ms}.
const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = 1000000 / tonumber(ARGV[2])
local burst = tonumber(ARGV[3]) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + burst - tat) / interval)
local grant = math.min(tonumber(ARGV[1]), room)
if grant < 0 then grant = 0 end
if grant > 0 then
  tat = tat + grant * interval
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  return {grant, 0}
end
return {0, math.ceil((tat + interval - now - burst) / 1000)}
"#;

static CAS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CAS));
static RESTORE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RESTORE));
static FORGET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FORGET));
static LEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE));

/// One node's link to the cluster: its Redis connections, its own small runtime (the
/// control plane calls it from synchronous code, the request path hands it lease
/// refills), and its status.
pub struct Cluster {
    pub conf: ClusterConf,
    /// This process, for heartbeats ([`NodeBeat::instance`]).
    pub instance: String,
    /// [`NodeBeat::key_id`] of this node.
    pub key_id: String,
    /// Node ids already warned about (a shared id, another key): once each.
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Authenticates the control record.
    record_key: ring::hmac::Key,
    pub node: String,
    client: redis::Client,
    /// Control calls and leases on separate connections: a large module upload does not
    /// hold up a lease.
    control: ConnectionManager,
    leases: ConnectionManager,
    pub status: Status,
    rt: Option<tokio::runtime::Runtime>,
    /// The live tenants' shared limits, so a change in the number of nodes re-sizes
    /// their fallback share.
    limits: dashmap::DashMap<String, std::sync::Weak<lease::Lease>>,
}

/// Whether a call failed before its request left: the write found the connection broken.
pub(crate) fn unsent(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() && e.to_string().to_ascii_lowercase().contains("broken pipe")
}

fn unavailable(e: impl std::fmt::Display) -> Unavailable {
    Unavailable(e.to_string())
}

pub(crate) use crate::state::now_ms;

impl Cluster {
    /// Connects lazily (a Redis that is down at start is not an error: the node serves
    /// what it last knew and catches up when Redis answers).
    pub fn open(conf: ClusterConf, node: &str) -> anyhow::Result<Arc<Cluster>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wasmgate-cluster")
            .enable_all()
            .build()?;
        let client = redis::Client::open(conf.url.as_str())
            .map_err(|e| anyhow::anyhow!("[cluster] url `{}`: {e}", conf.url))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(conf.timeout))
            .set_response_timeout(Some(conf.timeout))
            .set_number_of_retries(1)
            // Redis back: every node reconnects within half a second
            .set_max_delay(Duration::from_millis(500));
        let (control, leases) = {
            let _in = rt.enter();
            let c = client.get_connection_manager_lazy(config.clone());
            let l = client.get_connection_manager_lazy(config);
            (c, l)
        };
        let map = |e: redis::RedisError| anyhow::anyhow!("[cluster] url `{}`: {e}", conf.url);
        let mut instance = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut instance)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        Ok(Arc::new(Cluster {
            instance: hex::encode(instance),
            key_id: hex::encode(&derive_key(&conf.key, "key id")[..4]),
            warned: Default::default(),
            record_key: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &derive_key(&conf.key, "control record"),
            ),
            node: node.to_string(),
            client,
            control: control.map_err(map)?,
            leases: leases.map_err(map)?,
            status: Status {
                nodes: AtomicUsize::new(1),
                ..Status::default()
            },
            rt: Some(rt),
            limits: Default::default(),
            conf,
        }))
    }

    fn key(&self, what: &str) -> String {
        format!("{}:cluster:{what}", self.conf.prefix)
    }

    /// The channel changes are announced on.
    pub fn channel(&self) -> String {
        self.key("events")
    }

    /// Runs `fut` on the cluster's runtime and waits for it from synchronous code.
    pub fn wait<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("the cluster runtime runs every task it is given")
    }

    /// [`Cluster::wait`] for a call on the cluster itself: `f` gets its own handle to it.
    pub fn run<T: Send + 'static, F: std::future::Future<Output = T> + Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Cluster>) -> F,
    ) -> T {
        self.wait(f(self.clone()))
    }

    /// The same from async code on another runtime: runs on the cluster's, awaited here.
    pub async fn on<T: Send + 'static, F: std::future::Future<Output = T> + Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Cluster>) -> F,
    ) -> T {
        self.handle()
            .spawn(f(self.clone()))
            .await
            .expect("the cluster runtime runs every task it is given")
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("the cluster runtime lives as long as the cluster")
            .handle()
    }

    /// A call with the timeout, on `conn`; its outcome sets `connected`. A call whose
    /// request never left (the connection was found broken when writing: Redis restarted
    /// since the last call) is made once more, on the connection made anew.
    async fn bounded<T, F: std::future::Future<Output = redis::RedisResult<T>>>(
        &self,
        conn: &ConnectionManager,
        f: impl Fn(ConnectionManager) -> F,
    ) -> Result<T> {
        let mut r = tokio::time::timeout(self.conf.timeout, f(conn.clone())).await;
        if matches!(&r, Ok(Err(e)) if unsent(e)) {
            r = tokio::time::timeout(self.conf.timeout, f(conn.clone())).await;
        }
        let r = match r {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(Unavailable("timed out".into())),
        };
        self.status.connected.store(r.is_ok(), Ordering::Relaxed);
        r
    }

    /// The sequence number of the shared record (0: there is none).
    pub async fn seq(&self) -> Result<u64> {
        let seq: Option<u64> = self
            .bounded(&self.control, |mut c| async move {
                redis::cmd("HGET")
                    .arg(self.key("control"))
                    .arg("seq")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(seq.unwrap_or(0))
    }

    /// The record's authentication: HMAC-SHA256 of its sequence number and bytes.
    fn mac(&self, seq: u64, record: &[u8]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.record_key);
        ctx.update(&seq.to_be_bytes());
        ctx.update(record);
        hex::encode(ctx.sign().as_ref())
    }

    /// The shared record; `None` when Redis has none (a new cluster, or lost data). A
    /// record that fails its authentication is an error: it is never served.
    pub async fn pull(&self) -> Result<Option<Remote>> {
        type Row = (
            Option<u64>,
            Option<Vec<u8>>,
            Option<u64>,
            Option<String>,
            Option<String>,
        );
        let (seq, rec, at, by, mac): Row = self
            .bounded(&self.control, |mut c| async move {
                redis::cmd("HMGET")
                    .arg(self.key("control"))
                    .arg(&["seq", "rec", "at", "by", "mac"][..])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let (Some(seq), Some(record)) = (seq, rec) else {
            return Ok(None);
        };
        let tag = mac.and_then(|m| hex::decode(m).ok()).unwrap_or_default();
        let signed = [&seq.to_be_bytes()[..], &record].concat();
        if ring::hmac::verify(&self.record_key, &signed, &tag).is_err() {
            return Err(Unavailable(format!(
                "the shared control record (seq {seq}, written by {}) fails its authentication: it was not written by a node with this cluster key; it is not served",
                by.unwrap_or_default()
            )));
        }
        Ok(Some(Remote {
            seq,
            at_ms: at.unwrap_or(0),
            by: by.unwrap_or_default(),
            record,
        }))
    }

    async fn record_script(
        &self,
        script: &Script,
        seq: u64,
        mac: String,
        record: &[u8],
    ) -> Result<(i64, u64)> {
        let mut inv = script.prepare_invoke();
        inv.key(self.key("control"))
            .arg(seq)
            .arg(record)
            .arg(now_ms())
            .arg(&self.node)
            .arg(self.channel())
            .arg(mac);
        self.bounded(&self.control, |mut c| {
            let inv = &inv;
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// Writes `record` if Redis is still at `expect`.
    pub async fn cas(&self, expect: u64, record: &[u8]) -> Result<Cas> {
        let mac = self.mac(expect + 1, record);
        let (done, seq) = self.record_script(&CAS_SCRIPT, expect, mac, record).await?;
        Ok(if done == 1 {
            Cas::Done(seq)
        } else {
            Cas::Conflict(seq)
        })
    }

    /// Puts back a record as sequence `seq` unless Redis holds one at least as new.
    pub async fn restore(&self, seq: u64, record: &[u8]) -> Result<bool> {
        let mac = self.mac(seq, record);
        let (n, _) = self
            .record_script(&RESTORE_SCRIPT, seq, mac, record)
            .await?;
        Ok(n == 1)
    }

    pub async fn put_module(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.bounded(&self.control, |mut c| async move {
            redis::cmd("SET")
                .arg(self.key(&format!("mod:{digest}")))
                .arg(bytes)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    pub async fn has_module(&self, digest: &str) -> Result<bool> {
        self.on_module("EXISTS", digest).await
    }

    pub async fn get_module(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.on_module("GET", digest).await
    }

    /// A one-key command on a module's bytes.
    async fn on_module<T: redis::FromRedisValue>(&self, cmd: &str, digest: &str) -> Result<T> {
        let key = self.key(&format!("mod:{digest}"));
        self.bounded(&self.control, |mut c| {
            let key = &key;
            async move { redis::cmd(cmd).arg(key).query_async(&mut c).await }
        })
        .await
    }

    /// Deletes a module's bytes unless the shared record names them.
    pub async fn forget_module(&self, digest: &str) -> Result<()> {
        let mut inv = FORGET_SCRIPT.prepare_invoke();
        inv.key(self.key("control"))
            .key(self.key(&format!("mod:{digest}")))
            .arg(digest);
        self.bounded(&self.control, |mut c| {
            let inv = &inv;
            async move { inv.invoke_async::<i64>(&mut c).await }
        })
        .await?;
        Ok(())
    }

    /// Records that one of `tenant`'s secrets changed, and pokes the other nodes.
    pub async fn secrets_changed(&self, tenant: &str) -> Result<()> {
        self.bounded(&self.control, |mut c| async move {
            redis::pipe()
                .cmd("HINCRBY")
                .arg(self.key("secrets"))
                .arg(tenant)
                .arg(1)
                .ignore()
                .cmd("PUBLISH")
                .arg(self.channel())
                .arg(format!("secrets {tenant}"))
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Tenant → how many times its secrets changed.
    pub async fn secret_versions(&self) -> Result<std::collections::HashMap<String, u64>> {
        self.bounded(&self.control, |mut c| async move {
            redis::cmd("HGETALL")
                .arg(self.key("secrets"))
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Writes this node's heartbeat, forgets nodes silent for an hour, and counts the
    /// live ones.
    pub async fn heartbeat(&self, beat: &NodeBeat) -> Result<Vec<NodeBeat>> {
        let before: Option<String> = self
            .bounded(&self.control, |mut c| async move {
                redis::cmd("HGET")
                    .arg(self.key("nodes"))
                    .arg(&beat.node)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let twin = before
            .and_then(|b| serde_json::from_str::<NodeBeat>(&b).ok())
            .filter(|b| b.instance != beat.instance && !b.instance.is_empty())
            .filter(|b| now_ms().saturating_sub(b.seen_ms) <= NODE_ALIVE.as_millis() as u64);
        if let Some(t) = twin {
            self.warn_once(&format!("twin {}", beat.node), || {
                tracing::error!(node = %beat.node, other_admin = %t.admin, "another running node uses this node's id: give every node its own [node] id (usage and status are kept per id)")
            });
        }
        let json = serde_json::to_string(beat).unwrap_or_default();
        let json = &json;
        self.bounded(&self.control, |mut c| async move {
            redis::cmd("HSET")
                .arg(self.key("nodes"))
                .arg(&beat.node)
                .arg(json)
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        let nodes = self.nodes().await?;
        let now = now_ms();
        let stale: Vec<&str> = nodes
            .iter()
            .filter(|n| now.saturating_sub(n.seen_ms) > 3_600_000)
            .map(|n| n.node.as_str())
            .collect();
        if !stale.is_empty() {
            let stale = &stale;
            let _ = self
                .bounded(&self.control, |mut c| async move {
                    redis::cmd("HDEL")
                        .arg(self.key("nodes"))
                        .arg(stale)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
        }
        let alive_now =
            |n: &&NodeBeat| now.saturating_sub(n.seen_ms) <= NODE_ALIVE.as_millis() as u64;
        for n in nodes.iter().filter(alive_now) {
            if !n.key_id.is_empty() && n.key_id != self.key_id {
                self.warn_once(&format!("key {}", n.node), || {
                    tracing::error!(node = %n.node, "a node on this Redis uses another cluster key: it cannot read this cluster's record, tokens or secrets")
                });
            }
        }
        let alive = nodes.iter().filter(alive_now).count().max(1);
        if self.status.nodes.swap(alive, Ordering::Relaxed) != alive {
            self.resize_fallbacks(alive);
        }
        Ok(nodes)
    }

    fn warn_once(&self, what: &str, log: impl FnOnce()) {
        if self
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(what.to_string())
        {
            log();
        }
    }

    /// Every node's last heartbeat.
    pub async fn nodes(&self) -> Result<Vec<NodeBeat>> {
        let all: std::collections::HashMap<String, String> = self
            .bounded(&self.control, |mut c| async move {
                redis::cmd("HGETALL")
                    .arg(self.key("nodes"))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut nodes: Vec<NodeBeat> = all
            .values()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    /// Subscribes to the change channel: a stream of pokes. Ends when the connection
    /// does; the caller subscribes again (with backoff).
    pub async fn subscribe(&self) -> Result<redis::aio::PubSubStream> {
        let mut ps = tokio::time::timeout(self.conf.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| Unavailable("timed out".into()))?
            .map_err(unavailable)?;
        ps.subscribe(self.channel()).await.map_err(unavailable)?;
        Ok(ps.into_on_message())
    }

    /// Takes up to `want` tokens of `tenant`'s shared rate: (granted, ms until one
    /// would be).
    pub async fn lease(
        &self,
        tenant: &str,
        want: u64,
        rate: u32,
        burst: u32,
    ) -> Result<(u64, u64)> {
        let mut inv = LEASE_SCRIPT.prepare_invoke();
        inv.key(self.key(&format!("rl:{tenant}")))
            .arg(want)
            .arg(rate.max(1))
            .arg(burst.max(1));
        self.bounded(&self.leases, |mut c| {
            let inv = &inv;
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    fn resize_fallbacks(&self, nodes: usize) {
        self.limits.retain(|_, l| match l.upgrade() {
            Some(l) => {
                l.resize(nodes);
                true
            }
            None => false,
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // may be dropped inside another runtime (tests): do not block on shutdown
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_purpose_and_key() {
        let a = derive_key(b"0123456789abcdef0123456789abcdef", "tokens");
        let b = derive_key(b"0123456789abcdef0123456789abcdef", "secrets");
        let c = derive_key(b"0123456789abcdef0123456789abcdeF", "tokens");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, derive_key(b"0123456789abcdef0123456789abcdef", "tokens"));
    }
}
