//! Upstreams: load-balanced targets with timeouts, keepalive, optional TLS, and active
//! health checks that run for as long as the snapshot owning the upstream is alive.

pub mod client;

use crate::metrics::UpstreamMetrics;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use std::sync::{Arc, Weak};
use std::time::Duration;

pub enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    /// Consistent hashing of what [`HashKey`] names.
    Hash(LoadBalancer<Consistent>, HashKey),
}

/// What the hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Path,
    Header(http::HeaderName),
}

#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub sni: String,
    pub verify: bool,
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
    pub http2: bool,
}

/// How long a connection to an upstream may take to open, to answer a read, to take a
/// write, and may stay idle in the pool.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

/// An upstream as the conf declares it, with the state the gateway keeps for it.
pub struct Upstream {
    /// Its name in the conf, in metrics and in log lines.
    pub name: Arc<str>,
    /// Which target serves the next request (and which are healthy).
    pub balancer: Balancer,
    pub connect: Connect,
    /// How many other targets a request may try after a connect failure.
    pub retries: usize,
    /// How often its targets' health is checked; `None`: never.
    pub health_interval: Option<Duration>,
    pub metrics: UpstreamMetrics,
}

/// How the gateway connects to an upstream's targets: the same for each of them.
pub struct Connect {
    pub timeouts: Timeouts,
    /// `None`: plain TCP.
    pub tls: Option<UpstreamTls>,
    /// Keeps pooled connections of different upstreams apart even when they share a
    /// target and SNI (Pingora's pool key does not include the trusted CAs).
    pub pool_key: u64,
}

impl Upstream {
    /// Whether its targets are asked for HTTP/2 (through ALPN).
    pub fn wants_h2(&self) -> bool {
        self.connect.tls.as_ref().is_some_and(|t| t.http2)
    }
}

impl Balancer {
    /// Round robin over `addrs`, or consistent hashing of `hash`.
    pub fn new(addrs: &[String], hash: Option<HashKey>) -> std::io::Result<Balancer> {
        Ok(match hash {
            Some(key) => Balancer::Hash(LoadBalancer::try_from_iter(addrs)?, key),
            None => Balancer::RoundRobin(LoadBalancer::try_from_iter(addrs)?),
        })
    }

    /// How many targets there are, healthy or not.
    pub fn targets(&self) -> usize {
        match self {
            Balancer::RoundRobin(lb) => lb.backends().get_backend().len(),
            Balancer::Hash(lb, _) => lb.backends().get_backend().len(),
        }
    }

    /// What requests are hashed by; `None`: round robin.
    pub fn hash_key(&self) -> Option<&HashKey> {
        match self {
            Balancer::RoundRobin(_) => None,
            Balancer::Hash(_, key) => Some(key),
        }
    }

    /// A healthy target, skipping those in `avoid` (targets this request already failed on).
    fn select(&self, key: &[u8], avoid: &[String]) -> Option<Backend> {
        let accept =
            |b: &Backend, healthy: bool| healthy && !avoid.iter().any(|a| *a == b.addr.to_string());
        match self {
            Balancer::RoundRobin(lb) if avoid.is_empty() => lb.select(key, 256),
            Balancer::Hash(lb, _) if avoid.is_empty() => lb.select(key, 256),
            Balancer::RoundRobin(lb) => lb.select_with(key, 256, accept),
            Balancer::Hash(lb, _) => lb.select_with(key, 256, accept),
        }
    }

    pub fn set_health_check(&mut self, hc: Box<dyn HealthCheck + Send + Sync>) {
        match self {
            Balancer::RoundRobin(lb) => lb.set_health_check(hc),
            Balancer::Hash(lb, _) => lb.set_health_check(hc),
        }
    }

    async fn run_health_check(&self) {
        match self {
            Balancer::RoundRobin(lb) => lb.backends().run_health_check(true).await,
            Balancer::Hash(lb, _) => lb.backends().run_health_check(true).await,
        }
    }
}

/// Builds the health check an upstream's conf asks for.
pub fn health_check(
    kind_http: bool,
    host: &str,
    path: &str,
    timeout: Duration,
    healthy: usize,
    unhealthy: usize,
    tls: Option<&UpstreamTls>,
) -> Box<dyn HealthCheck + Send + Sync> {
    if kind_http {
        let mut hc = HttpHealthCheck::new(host, tls.is_some());
        hc.req = pingora::http::RequestHeader::build("GET", path.as_bytes(), None)
            .expect("validated path");
        let _ = hc.req.insert_header("Host", host);
        hc.peer_template.options.connection_timeout = Some(timeout);
        hc.peer_template.options.read_timeout = Some(timeout);
        if let Some(t) = tls {
            hc.peer_template.sni = t.sni.clone();
            hc.peer_template.options.verify_cert = t.verify;
            hc.peer_template.options.verify_hostname = t.verify;
            hc.peer_template.options.ca = t.ca.clone();
        }
        hc.consecutive_success = healthy;
        hc.consecutive_failure = unhealthy;
        Box::new(hc)
    } else {
        let mut hc = TcpHealthCheck::new();
        hc.peer_template.options.connection_timeout = Some(timeout);
        hc.consecutive_success = healthy;
        hc.consecutive_failure = unhealthy;
        hc
    }
}

impl Upstream {
    /// Picks a healthy target and describes how to reach it. `key` feeds the hash balancer.
    pub fn peer(&self, key: &[u8]) -> Option<Box<HttpPeer>> {
        self.peer_avoiding(key, &[])
    }

    /// Like [`Upstream::peer`], never one of the `avoid` targets (a retry goes elsewhere).
    pub fn peer_avoiding(&self, key: &[u8], avoid: &[String]) -> Option<Box<HttpPeer>> {
        let backend = self.balancer.select(key, avoid)?;
        let c = &self.connect;
        let (tls, sni) = match &c.tls {
            Some(t) => (true, t.sni.clone()),
            None => (false, String::new()),
        };
        let mut peer = Box::new(HttpPeer::new(backend, tls, sni));
        peer.group_key = c.pool_key;
        let o = &mut peer.options;
        let t = c.timeouts;
        o.connection_timeout = Some(t.connect);
        o.read_timeout = Some(t.read);
        o.write_timeout = Some(t.write);
        o.idle_timeout = Some(t.idle);
        if let Some(t) = &c.tls {
            o.verify_cert = t.verify;
            o.verify_hostname = t.verify;
            o.ca = t.ca.clone();
            if t.http2 {
                o.alpn = pingora::protocols::ALPN::H2H1;
            }
        }
        Some(peer)
    }

    /// Runs health checks every interval until the upstream is dropped (its snapshot
    /// was replaced and the last request using it finished).
    pub fn spawn_health_checks(self: &Arc<Self>) {
        let Some(interval) = self.health_interval else {
            return;
        };
        let weak: Weak<Upstream> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match weak.upgrade() {
                    Some(up) => up.balancer.run_health_check().await,
                    None => return,
                }
                tokio::time::sleep(interval).await;
            }
        });
    }
}
