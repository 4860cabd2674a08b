//! Metric families, registered once in one registry and exported on `/metrics`.
//!
//! Label lookups (`with_label_values`) hash and take a read lock, so the hot path never
//! does them: routes and upstreams resolve their children once when a snapshot is built
//! and keep them ([`RouteMetrics`], [`UpstreamMetrics`]).

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    /// `requests_total{route="-"}`: requests answered before a route was found.
    pub unrouted: RouteMetrics,
    pub upstream_latency: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub inflight: IntGauge,
    pub connections: IntGauge,
    pub connections_accepted: IntCounter,
    /// Responses cut off after their head was sent (the connection was dropped).
    pub responses_aborted: IntCounter,
    /// Request heads over `max_request_header_bytes`, refused while being read.
    pub heads_too_large: IntCounter,
    /// Requests the HTTP/1.1 fast path served (the rest went through Pingora's proxy).
    pub fast_path_requests: IntCounter,
    pub reloads: IntCounterVec,
    pub generation: IntGauge,
    pub access_log_dropped: IntCounter,
    pub hook_events: IntCounterVec,
    pub hook_invocations: IntCounterVec,
    pub hook_cpu: HistogramVec,
    pub hook_fuel: IntCounterVec,
    pub guest_metrics: IntCounterVec,
    pub guest_gauges: IntGaugeVec,
    pub cluster: ClusterMetrics,
}

/// A cluster node's view of the cluster (all 0 on a standalone node).
#[derive(Clone)]
pub struct ClusterMetrics {
    pub connected: IntGauge,
    pub seq: IntGauge,
    pub last_sync_ms: IntGauge,
    pub lag_ms: IntGauge,
    pub nodes: IntGauge,
    pub apply_errors: IntGauge,
}

/// Status classes used as label values, indexed by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Makes metric families and registers each as it is made.
struct Families(Registry);

impl Families {
    fn add<M: Collector + Clone + 'static>(&self, m: prometheus::Result<M>) -> M {
        let m = m.expect("valid metric");
        self.0
            .register(Box::new(m.clone()))
            .expect("metric registered once");
        m
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help))
    }

    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn histograms(&self, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels))
    }
}

/// Upstream latency buckets (seconds).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Wasm CPU buckets (seconds): hooks run for microseconds.
const WASM_CPU_BUCKETS: [f64; 12] = [
    0.000_001, 0.000_002, 0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.005, 0.01,
];

impl Metrics {
    pub fn new() -> Metrics {
        let f = Families(Registry::new_custom(Some("wasmgate".into()), None).expect("registry"));
        let requests = f.counters(
            "requests_total",
            "Requests answered, by route and status class",
            &["route", "status"],
        );
        let tm = &["tenant", "module"];
        Metrics {
            unrouted: RouteMetrics {
                by_class: CLASSES.map(|c| requests.with_label_values(&["-", c])),
            },
            requests,
            upstream_latency: f.histograms(
                "upstream_latency_seconds",
                "Time from sending the request upstream to its response header",
                &LATENCY_BUCKETS,
                &["upstream"],
            ),
            upstream_errors: f.counters(
                "upstream_errors_total",
                "Failed upstream exchanges, by kind",
                &["upstream", "kind"],
            ),
            inflight: f.gauge("inflight_requests", "Requests being served now"),
            connections: f.gauge(
                "open_connections",
                "Downstream connections currently open on the proxy listeners",
            ),
            connections_accepted: f.counter(
                "connections_accepted_total",
                "Downstream connections accepted on the proxy listeners",
            ),
            responses_aborted: f.counter(
                "responses_aborted_total",
                "Responses cut off after their head was sent: the client connection was dropped \
                 without completing the body, so the client sees a truncated response",
            ),
            heads_too_large: f.counter(
                "request_heads_too_large_total",
                "Request heads refused with 431 while being read, over max_request_header_bytes",
            ),
            fast_path_requests: f.counter(
                "fast_path_requests_total",
                "Requests served by the HTTP/1.1 fast path; the others went through Pingora's \
                 proxy (HTTP/2, upgrades, HTTP/1.0, odd framing, HTTP/2 upstreams, \
                 [server] fast_path = false)",
            ),
            reloads: f.counters(
                "config_reloads_total",
                "Conf reload attempts, by result",
                &["result"],
            ),
            generation: f.gauge("config_generation", "Generation of the conf serving now"),
            access_log_dropped: f.counter(
                "access_log_dropped_total",
                "Access log lines dropped because the writer fell behind",
            ),
            hook_events: f.counters(
                "hook_failures_total",
                "Hook callbacks that overran their budget, trapped or misbehaved",
                &["tenant", "module", "cause"],
            ),
            hook_invocations: f.counters(
                "hook_invocations_total",
                "Requests that ran a module's hooks",
                tm,
            ),
            hook_fuel: f.counters(
                "hook_fuel_total",
                "Fuel burned by a module's callbacks (about one unit per wasm instruction)",
                tm,
            ),
            hook_cpu: f.histograms(
                "hook_cpu_seconds",
                "Wasm CPU per request and module, from fuel burned (1000 units = 1 us)",
                &WASM_CPU_BUCKETS,
                tm,
            ),
            guest_metrics: f.counters(
                "guest_counter",
                "Counters and histograms samples defined by guests",
                &["tenant", "module", "name"],
            ),
            guest_gauges: f.gauges(
                "guest_gauge",
                "Gauges defined by guests",
                &["tenant", "module", "name"],
            ),
            cluster: ClusterMetrics {
                connected: f.gauge(
                    "cluster_connected",
                    "1 while this node reaches the cluster's Redis",
                ),
                seq: f.gauge(
                    "cluster_control_seq",
                    "Sequence number of the shared control record this node serves",
                ),
                last_sync_ms: f.gauge(
                    "cluster_last_sync_timestamp_ms",
                    "When this node last compared its control record with Redis's (ms since the epoch)",
                ),
                lag_ms: f.gauge(
                    "cluster_propagation_lag_ms",
                    "From the last change's commit on some node to this node serving it (ms)",
                ),
                nodes: f.gauge(
                    "cluster_nodes",
                    "Nodes heard from in the last 5 s, this one included",
                ),
                apply_errors: f.gauge(
                    "cluster_apply_errors",
                    "Shared changes this node could not apply (it serves what it had)",
                ),
            },
            registry: f.0,
        }
    }

    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            by_class: CLASSES.map(|c| self.requests.with_label_values(&[route, c])),
        }
    }

    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        let err = |kind: &str| self.upstream_errors.with_label_values(&[upstream, kind]);
        UpstreamMetrics {
            latency: self.upstream_latency.with_label_values(&[upstream]),
            refused: err("unreachable"),
            timeout: err("timeout"),
            other: err("protocol"),
        }
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
}

impl RouteMetrics {
    pub fn record(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[i].inc();
    }
}

#[derive(Clone)]
pub struct UpstreamMetrics {
    pub latency: Histogram,
    pub refused: IntCounter,
    pub timeout: IntCounter,
    pub other: IntCounter,
}
