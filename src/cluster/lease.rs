//! One rate limit shared by every node, with no Redis round trip on the request path.
//!
//! The limit itself lives in Redis as one GCRA per tenant (`rl:{tenant}`, the rate and
//! burst of the tenant's limits). A node does not ask it per request: it takes tokens in
//! small leases (a chunk is 1/20 s of the tenant's rate, at least 1) and spends them
//! locally with one atomic decrement. When it holds half a chunk or less it takes the
//! next lease in the background, so a node serving below the limit never waits. A node
//! that runs out is answered 429 until its next lease comes (the limit is reached, or
//! nearly). Tokens a node holds but does not spend are the error against the rate: at
//! most one chunk per node, spent later rather than lost (measured in the cluster
//! tests: ±10% with three nodes under uneven load).
//!
//! While Redis does not answer, each node limits the tenant to its share: the rate and
//! burst divided by the number of live nodes it last saw.

use super::Cluster;
use crate::control::limit::Limiter;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a refill keeps asking for tokens the shared limit does not have yet.
const REFILL_PATIENCE: Duration = Duration::from_secs(2);

pub struct Lease {
    tenant: String,
    rate: u32,
    burst: u32,
    /// Tokens a lease asks for.
    chunk: i64,
    /// Tokens this node holds.
    tokens: AtomicI64,
    refilling: AtomicBool,
    /// The node's share while Redis is away.
    fallback: ArcSwap<Limiter>,
    cluster: Arc<Cluster>,
}

fn share(rate: u32, burst: u32, nodes: usize) -> Limiter {
    let n = nodes.max(1) as u32;
    Limiter::new((rate / n).max(1), (burst / n).max(1))
}

impl Lease {
    /// A tenant's shared limit; takes its first lease at once.
    pub fn new(cluster: &Arc<Cluster>, tenant: &str, rate: u32, burst: u32) -> Arc<Lease> {
        let nodes = cluster.status.nodes.load(Ordering::Relaxed);
        let lease = Arc::new(Lease {
            tenant: tenant.to_string(),
            rate: rate.max(1),
            burst: burst.max(1),
            chunk: (rate as i64 / 20).max(1),
            tokens: AtomicI64::new(0),
            refilling: AtomicBool::new(false),
            fallback: ArcSwap::from_pointee(share(rate, burst, nodes)),
            cluster: cluster.clone(),
        });
        cluster
            .limits
            .insert(tenant.to_string(), Arc::downgrade(&lease));
        lease.refill();
        lease
    }

    /// `Ok` if allowed, else how long until a request might be.
    pub fn admit(self: &Arc<Self>) -> Result<(), Duration> {
        if !self.cluster.status.connected.load(Ordering::Relaxed) {
            return self.fallback.load().check();
        }
        let mut t = self.tokens.load(Ordering::Acquire);
        loop {
            if t <= 0 {
                self.refill();
                return Err(Duration::from_secs_f64(1.0 / self.rate as f64));
            }
            match self
                .tokens
                .compare_exchange_weak(t, t - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if t - 1 <= self.chunk / 2 {
                        self.refill();
                    }
                    return Ok(());
                }
                Err(now) => t = now,
            }
        }
    }

    /// Tokens this node holds now.
    pub fn held(&self) -> i64 {
        self.tokens.load(Ordering::Relaxed)
    }

    pub(super) fn resize(&self, nodes: usize) {
        self.fallback
            .store(Arc::new(share(self.rate, self.burst, nodes)));
    }

    fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        self.cluster.handle().spawn(async move {
            me.fill().await;
            me.refilling.store(false, Ordering::Release);
        });
    }

    async fn fill(&self) {
        let patience = Instant::now() + REFILL_PATIENCE;
        loop {
            let have = self.tokens.load(Ordering::Acquire).max(0);
            if have > self.chunk / 2 {
                return;
            }
            let want = (self.chunk - have).max(1) as u64;
            match self
                .cluster
                .lease(&self.tenant, want, self.rate, self.burst)
                .await
            {
                Ok((granted, _)) if granted > 0 => {
                    self.tokens.fetch_add(granted as i64, Ordering::AcqRel);
                }
                Ok((_, retry_ms)) => {
                    if Instant::now() >= patience {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(retry_ms.clamp(1, 250))).await;
                }
                Err(e) => {
                    tracing::debug!(tenant = %self.tenant, "rate lease unavailable: {e}");
                    return;
                }
            }
        }
    }
}
