//! The control plane in a cluster: the record every node serves is the one in Redis.
//!
//! - **Change.** An admin action on any node first brings the node's record up to date
//!   with Redis's ([`Control::catch_up`]), changes it, then writes it back with a
//!   compare-and-swap on its sequence number ([`Control::save`]). Two nodes changing at
//!   the same instant: one wins, the other answers 409 `conflict` and keeps nothing.
//!   Redis away: 503 `cluster_unavailable`, nothing changes.
//! - **Propagation.** The write announces itself on a channel; every node also compares
//!   sequence numbers every `sync_interval_ms` (a missed announcement, a reconnect). A
//!   node that sees a newer record builds what changed on a blocking thread (module bytes
//!   from its own files or, by digest, from Redis; compiled code from its artifact
//!   cache), then swaps it in; requests never wait for it.
//! - **Fail static.** Without Redis a node serves the record it has, and starts from its
//!   own copy (`control.json`) if Redis is away when it starts.
//! - **Lost data.** A Redis that comes back empty (restarted without persistence), or
//!   with an older record than a node serves, is given back the record by the first node
//!   that notices, with the module bytes it holds, at the sequence number it had; nodes
//!   never drop tenants because Redis has none, nor go back in time because Redis did.
//! - **Authenticated.** The record carries an HMAC under a key derived from the cluster
//!   key; one that does not verify is never served (see `crate::cluster`).

use super::{ApiError, ApiResult, Control, Installed, ModuleRec, Stored};
use crate::cluster::{now_ms, Cas, Cluster, NodeBeat};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        503,
        "cluster_unavailable",
        format!("the cluster's Redis cannot be used now, so nothing can change: {e} (if Redis received a change before failing, it was made: read before retrying)"),
    )
}

/// The shared record as this gateway reads it, with Redis's sequence number.
fn parse(remote: &crate::cluster::Remote) -> Result<Stored, String> {
    let s = Stored::parse(&remote.record, "the shared control record")?;
    Ok(Stored {
        seq: remote.seq,
        ..s
    })
}

impl Control {
    /// [`Cluster::run`] when this node is in a cluster.
    fn on_cluster<T: Send + 'static, F: std::future::Future<Output = T> + Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Cluster>) -> F,
    ) -> Option<T> {
        Some(self.cluster.as_ref()?.run(f))
    }

    /// At start: the record to serve. In a cluster, Redis's (the local one when Redis
    /// does not answer; the local one is given to a Redis that has none).
    pub(super) fn join(&self, local: Stored) -> Stored {
        let Some(remote) = self.on_cluster(|c| async move { c.pull().await }) else {
            return local;
        };
        match remote {
            Ok(Some(r)) => match parse(&r) {
                Ok(s) => {
                    tracing::info!(seq = s.seq, by = %r.by, "joined the cluster: serving its control record");
                    s
                }
                Err(e) => {
                    tracing::error!("{e}; serving this node's own record until it can be read");
                    local
                }
            },
            Ok(None) => {
                let mut local = local;
                self.republish(&mut local);
                local
            }
            Err(e) => {
                tracing::warn!(
                    seq = local.seq,
                    "the cluster's record cannot be read ({e}): serving this node's last known record until it can"
                );
                local
            }
        }
    }

    /// Brings `s` up to date with the shared record (a cluster only).
    pub(super) fn catch_up(&self, s: &mut Stored) -> ApiResult<()> {
        let Some(c) = self.cluster.clone() else {
            return Ok(());
        };
        let seq = s.seq;
        let remote = c
            .run(|c| async move {
                match c.seq().await? {
                    n if n == seq && n != 0 => Ok(None),
                    _ => c.pull().await.map(Some),
                }
            })
            .map_err(unavailable)?;
        c.status.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        match remote {
            None => {}
            // Redis went back in time (restored from an old dump, or written by hand)
            Some(Some(r)) if r.seq < s.seq => {
                tracing::warn!(
                    redis = r.seq,
                    node = s.seq,
                    "Redis holds an older control record than this node serves: giving it this node's"
                );
                self.republish(s);
            }
            Some(Some(r)) => match parse(&r) {
                Ok(new) => {
                    self.apply(s, new);
                    c.status
                        .lag_ms
                        .store(now_ms().saturating_sub(r.at_ms), Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!("{e}");
                    return Err(ApiError::new(500, "internal", e));
                }
            },
            // Redis has no record: a new cluster, or one that lost its data
            Some(None) => self.republish(s),
        }
        Ok(())
    }

    /// Gives Redis this node's record (and the module bytes it holds) when Redis has
    /// none, at the sequence number the node had (at least 1).
    fn republish(&self, s: &mut Stored) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        if s.seq == 0 && s.tenants.is_empty() && s.modules.is_empty() && s.revoked.is_empty() {
            return;
        }
        let mut modules = Vec::new();
        for (t, mods) in &s.modules {
            for (m, rec) in mods {
                for v in &rec.versions {
                    modules.push(self.module_file(t, m, &v.digest));
                }
            }
        }
        let seq = s.seq.max(1);
        let record = match serde_json::to_vec(&*s) {
            Ok(r) => r,
            Err(e) => return tracing::error!("cannot encode the control record: {e}"),
        };
        let restored = c.run(|c| async move {
            for path in modules {
                let Some(digest) = path.file_stem().and_then(|d| d.to_str()) else {
                    continue;
                };
                if !c.has_module(digest).await? {
                    if let Ok(bytes) = tokio::fs::read(&path).await {
                        c.put_module(digest, &bytes).await?;
                    }
                }
            }
            c.restore(seq, &record).await
        });
        match restored {
            Ok(true) => {
                tracing::warn!(
                    seq,
                    "the cluster's Redis had no control record: this node gave it its own"
                );
                s.seq = seq;
                let _ = self.persist(s);
                c.status.seq.store(seq, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot give Redis this node's control record: {e}"),
        }
    }

    /// Stores a changed record: in a cluster, first in Redis (a compare-and-swap on the
    /// sequence number, which moves on), then in `data_dir/control.json`. A failure
    /// leaves the record as it was before the change.
    pub(super) fn save(&self, s: &mut Stored) -> ApiResult<()> {
        if let Some(c) = self.cluster.clone() {
            let record = serde_json::to_vec(&Stored {
                version: super::store::STORE_VERSION,
                ..s.clone()
            })
            .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
            let expect = s.seq;
            let written = c.run(|c| async move { c.cas(expect, &record).await });
            let fail = match written {
                Ok(Cas::Done(seq)) => {
                    s.seq = seq;
                    c.status.seq.store(seq, Ordering::Relaxed);
                    c.status.lag_ms.store(0, Ordering::Relaxed);
                    None
                }
                Ok(Cas::Conflict(_)) => Some(ApiError::new(
                    409,
                    "conflict",
                    "another node changed the control record at the same moment; retry",
                )),
                Err(e) => Some(unavailable(e)),
            };
            if let Some(e) = fail {
                // the change never happened: back to the record as stored
                *s = Stored::load(&self.data_dir.join("control.json")).unwrap_or_default();
                return Err(e);
            }
        }
        self.persist(s)
    }

    /// Serves `new`: builds the module versions it activates that this node does not
    /// serve yet (a version that does not build is logged and the one before keeps
    /// serving), retires the ones it no longer names, stores it, and publishes the
    /// request path's view.
    pub(super) fn apply(&self, s: &mut Stored, new: Stored) {
        let current = self
            .plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let tenants = self.all_tenants(&new);
        let mut next = HashMap::new();
        for (t, mods) in &new.modules {
            for (m, rec) in mods {
                let Some(v) = rec
                    .active
                    .and_then(|a| rec.versions.iter().find(|v| v.version == a))
                else {
                    continue;
                };
                let key = (t.clone(), m.clone());
                if let Some(i) = current.get(&key).filter(|i| i.version == *v) {
                    next.insert(key, i.clone());
                    continue;
                }
                let limits = tenants.get(t).cloned().unwrap_or_default();
                match self.build_plugin(t, m, v, &limits) {
                    Ok(deployed) => {
                        next.insert(
                            key,
                            Installed {
                                version: v.clone(),
                                deployed,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(tenant = %t, module = %m, version = v.version, "cannot serve this version (the one before keeps serving): {}", e.reason);
                        if let Some(c) = &self.cluster {
                            c.status.apply_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(old) = current.get(&key) {
                            next.insert(key, old.clone());
                        }
                    }
                }
            }
        }
        let old = std::mem::replace(
            &mut *self.plugins.lock().unwrap_or_else(|e| e.into_inner()),
            next.clone(),
        );
        let same = |a: Option<&Installed>, b: &Installed| a.is_some_and(|a| a.version == b.version);
        for (k, i) in &old {
            if !same(next.get(k), i) {
                i.deployed.retire();
            }
        }
        if self.started.load(Ordering::Acquire) {
            for (k, i) in &next {
                if !same(old.get(k), i) {
                    i.deployed.start();
                }
            }
        }
        // tenants deleted elsewhere: their secrets leave this node's memory
        if let Some(state) = self.live.wasm.state() {
            for t in s.tenants.keys().filter(|t| !new.tenants.contains_key(*t)) {
                state.secrets.forget_cached(t);
            }
        }
        // the bytes of modules the record no longer has
        for (t, mods) in &s.modules {
            for m in mods.keys() {
                if !new.modules.get(t).is_some_and(|n| n.contains_key(m)) {
                    let _ = std::fs::remove_dir_all(self.data_dir.join("tenants").join(t).join(m));
                }
            }
        }
        *s = new;
        if let Err(e) = self.persist(s) {
            tracing::error!("{}", e.reason);
        }
        self.publish(s);
        if let Some(c) = &self.cluster {
            c.status.seq.store(s.seq, Ordering::Relaxed);
        }
    }

    /// A module's bytes: this node's copy, else (in a cluster) Redis's, checked
    /// against the digest and kept.
    pub(super) fn module_bytes(&self, t: &str, m: &str, digest: &str) -> ApiResult<Vec<u8>> {
        let path = self.module_file(t, m, digest);
        let local = std::fs::read(&path);
        let Some(c) = self.cluster.clone() else {
            return local
                .map_err(|e| ApiError::new(500, "internal", format!("module bytes missing: {e}")));
        };
        if let Ok(b) = local {
            return Ok(b);
        }
        let d = digest.to_string();
        let bytes = c
            .run(|c| async move { c.get_module(&d).await })
            .map_err(unavailable)?
            .ok_or_else(|| {
                ApiError::new(
                    500,
                    "internal",
                    format!("module bytes {digest} are in neither this node nor Redis"),
                )
            })?;
        if hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)) != digest {
            return Err(ApiError::new(
                500,
                "internal",
                format!("the bytes Redis holds for {digest} do not match their digest"),
            ));
        }
        let _ = super::store::write_whole(&path, &bytes);
        Ok(bytes)
    }

    /// Puts a deployed module's bytes where every node finds them (a cluster only).
    pub(super) fn share_module(&self, digest: &str, bytes: &[u8]) -> ApiResult<()> {
        let (d, b) = (digest.to_string(), bytes.to_vec());
        self.on_cluster(|c| async move { c.put_module(&d, &b).await })
            .unwrap_or(Ok(()))
            .map_err(unavailable)
    }

    /// Drops from Redis the bytes of deleted modules that no version still names.
    pub(super) fn forget_modules<'a>(&self, modules: impl IntoIterator<Item = &'a ModuleRec>) {
        let digests: Vec<String> = modules
            .into_iter()
            .flat_map(|m| m.versions.iter().map(|v| v.digest.clone()))
            .collect();
        let done = self.on_cluster(|c| async move {
            for d in digests {
                c.forget_module(&d).await?;
            }
            Ok::<_, crate::cluster::Unavailable>(())
        });
        if let Some(Err(e)) = done {
            tracing::warn!("module bytes of a deleted module stay in Redis: {e}");
        }
    }

    /// Tells the other nodes that tenant `t`'s secrets changed.
    pub(super) async fn announce_secrets(&self, t: &str) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        let t2 = t.to_string();
        let r = c.on(|c| async move { c.secrets_changed(&t2).await }).await;
        if let Err(e) = r {
            tracing::warn!(
                tenant = t,
                "other nodes learn of this secret change within their next sync only: {e}"
            );
        }
    }

    /// One comparison with Redis: the control record, then the secrets' versions
    /// (`seen` holds the ones this node has read). Runs on a blocking thread.
    fn sync(&self, seen: &mut HashMap<String, u64>, full: bool) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        let synced = self.catch_up(&mut self.lock());
        // logged when it changes, not every sync
        let now = synced.as_ref().err().map(|e| e.reason.clone());
        let mut last = c
            .status
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let recovered = last.is_some() && now.is_none();
        if *last != now {
            match &now {
                Some(e) => {
                    tracing::warn!("cluster sync failed; serving the last known record: {e}")
                }
                None => tracing::info!("cluster sync works again"),
            }
            *last = now;
        }
        drop(last);
        if synced.is_err() {
            return;
        }
        let Some(state) = self.live.wasm.state().cloned() else {
            return;
        };
        // every so often, and after Redis was away, every tenant's secrets are read
        // again: a change whose announcement was lost (Redis failing mid-write) is seen
        if full || recovered {
            let secrets = state.secrets.clone();
            if state.wait(async move { secrets.load_all().await }).is_ok() {
                for t in seen.keys().cloned().collect::<Vec<_>>() {
                    self.reconfigure_filters(&t);
                }
            }
        }
        let versions = match c.run(|c| async move { c.secret_versions().await }) {
            Ok(v) => v,
            Err(_) => return,
        };
        // tenants whose secrets this node holds but Redis has no trace of: Redis lost
        // its data (or a change was never announced); the secrets go back, sealed
        let lost: Vec<String> = state
            .secrets
            .cached_tenants()
            .into_iter()
            .filter(|t| !versions.contains_key(t))
            .collect();
        if !lost.is_empty() {
            let secrets = state.secrets.clone();
            match state.wait(async move { secrets.restore_cached().await }) {
                Ok(n) => {
                    if n > 0 {
                        tracing::warn!(
                            secrets = n,
                            "secrets missing from the store written back from this node's memory"
                        );
                    }
                    for t in lost {
                        let _ = c.run(|c| async move { c.secrets_changed(&t).await });
                    }
                }
                Err(e) => tracing::warn!("cannot write secrets back: {e}"),
            }
        }
        for (t, n) in versions {
            if seen.get(&t) == Some(&n) {
                continue;
            }
            let (secrets, t2) = (state.secrets.clone(), t.clone());
            match state.wait(async move { secrets.refresh(&t2).await }) {
                Ok(()) => {
                    self.reconfigure_filters(&t);
                    seen.insert(t, n);
                }
                Err(e) => tracing::warn!(tenant = %t, "cannot read changed secrets: {e}"),
            }
        }
    }

    /// This node's heartbeat (never waits for the record's lock: a change being built
    /// may hold it for seconds).
    fn beat(&self, c: &Cluster) -> NodeBeat {
        let snap = self.live.load();
        NodeBeat {
            node: snap.node.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            seq: c.status.seq.load(Ordering::Relaxed),
            seen_ms: now_ms(),
            admin: snap.admin.listen.clone(),
            instance: c.instance.clone(),
            key_id: c.key_id.clone(),
        }
    }

    fn export_metrics(&self, c: &Cluster) {
        let m = &self.metrics.cluster;
        let st = &c.status;
        m.connected.set(st.connected.load(Ordering::Relaxed) as i64);
        m.seq.set(st.seq.load(Ordering::Relaxed) as i64);
        m.last_sync_ms
            .set(st.last_sync_ms.load(Ordering::Relaxed) as i64);
        m.lag_ms.set(st.lag_ms.load(Ordering::Relaxed) as i64);
        m.nodes.set(st.nodes.load(Ordering::Relaxed) as i64);
        m.apply_errors
            .set(st.apply_errors.load(Ordering::Relaxed) as i64);
    }

    /// `GET /v1/cluster`: this node and every node heard from.
    pub async fn cluster_status(&self) -> ApiResult<serde_json::Value> {
        let Some(c) = self.cluster.clone() else {
            return Ok(serde_json::json!({ "cluster": false }));
        };
        let st = &c.status;
        let nodes = c.on(|c| async move { c.nodes().await }).await;
        let now = now_ms();
        let (nodes, nodes_error) = match nodes {
            Ok(n) => (
                serde_json::json!(n
                    .iter()
                    .map(|n| {
                        let age = now.saturating_sub(n.seen_ms);
                        serde_json::json!({
                            "node": n.node, "version": n.version, "seq": n.seq,
                            "seen_ms_ago": age,
                            "alive": age <= crate::cluster::NODE_ALIVE.as_millis() as u64,
                            "admin": n.admin,
                            "key_id": n.key_id,
                            "same_key": n.key_id == c.key_id,
                        })
                    })
                    .collect::<Vec<_>>()),
                None,
            ),
            Err(e) => (serde_json::Value::Null, Some(e.to_string())),
        };
        let last_sync = st.last_sync_ms.load(Ordering::Relaxed);
        Ok(serde_json::json!({
            "cluster": true,
            "node": c.node,
            "connected": st.connected.load(Ordering::Relaxed),
            "seq": st.seq.load(Ordering::Relaxed),
            "key_id": c.key_id,
            "last_sync_ms_ago": (last_sync > 0).then(|| now.saturating_sub(last_sync)),
            "propagation_lag_ms": st.lag_ms.load(Ordering::Relaxed),
            "apply_errors": st.apply_errors.load(Ordering::Relaxed),
            "last_error": st.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "nodes": nodes,
            "nodes_error": nodes_error,
        }))
    }
}

/// Every this many syncs, every tenant's secrets are read again (30 s at the default
/// interval): the backstop for an announcement Redis lost.
const FULL_SECRETS_EVERY: u64 = 60;

/// Background service of a cluster node: listens for changes, compares with Redis every
/// `sync_interval_ms`, and writes the node's heartbeat every second.
pub struct ClusterService {
    pub control: Arc<Control>,
}

/// Subscribes to the change channel and pokes `tx` for each announcement (and after
/// each reconnect); reconnects with backoff.
async fn listen(c: Arc<Cluster>, tx: tokio::sync::mpsc::Sender<()>) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match c.subscribe().await {
            Ok(mut stream) => {
                backoff = std::time::Duration::from_millis(100);
                let _ = tx.try_send(());
                while stream.next().await.is_some() {
                    let _ = tx.try_send(());
                }
                tracing::debug!("cluster channel closed; subscribing again");
            }
            Err(e) => tracing::debug!("cluster channel: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ClusterService {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let Some(c) = self.control.cluster.clone() else {
            return;
        };
        let (tx, mut pokes) = tokio::sync::mpsc::channel(1);
        let listener = c.handle().spawn(listen(c.clone(), tx));
        let mut tick = tokio::time::interval(c.conf.sync_interval);
        let mut beat = tokio::time::interval(crate::cluster::HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let seen = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let mut syncs = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    listener.abort();
                    return;
                }
                _ = beat.tick() => {
                    let b = self.control.beat(&c);
                    let _ = c.on(|c| async move { c.heartbeat(&b).await }).await;
                    self.control.export_metrics(&c);
                    continue;
                }
                _ = tick.tick() => {}
                Some(()) = pokes.recv() => {}
            }
            let (ctl, seen) = (self.control.clone(), seen.clone());
            syncs += 1;
            let full = syncs.is_multiple_of(FULL_SECRETS_EVERY);
            let _ = tokio::task::spawn_blocking(move || {
                ctl.sync(&mut seen.lock().unwrap_or_else(|e| e.into_inner()), full)
            })
            .await;
            self.control.export_metrics(&c);
        }
    }
}
