//! Metric families, registered once in one registry and exported on `/metrics`.
//!
//! Label lookups (`with_label_values`) hash and take a read lock, so the hot path never
//! does them: routes and upstreams resolve their children once when a snapshot is built
//! and keep them ([`RouteMetrics`], [`UpstreamMetrics`]).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
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
    pub reloads: IntCounterVec,
    pub generation: IntGauge,
    pub access_log_dropped: IntCounter,
    pub hook_events: IntCounterVec,
    pub hook_invocations: IntCounterVec,
    pub hook_cpu: HistogramVec,
    pub hook_fuel: IntCounterVec,
    pub guest_metrics: IntCounterVec,
    pub guest_gauges: prometheus::IntGaugeVec,
}

/// Status classes used as label values, indexed by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("wasmgate".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by route and status class",
            ),
            &["route", "status"],
        )
        .unwrap();
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "upstream_latency_seconds",
                "Time from sending the request upstream to its response header",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["upstream"],
        )
        .unwrap();
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Failed upstream exchanges, by kind",
            ),
            &["upstream", "kind"],
        )
        .unwrap();
        let inflight = IntGauge::new("inflight_requests", "Requests being served now").unwrap();
        let connections = IntGauge::new(
            "open_connections",
            "Downstream connections currently open on the proxy listeners",
        )
        .unwrap();
        let connections_accepted = IntCounter::new(
            "connections_accepted_total",
            "Downstream connections accepted on the proxy listeners",
        )
        .unwrap();
        let responses_aborted = IntCounter::new(
            "responses_aborted_total",
            "Responses cut off after their head was sent: the client connection was dropped \
             without completing the body, so the client sees a truncated response",
        )
        .unwrap();
        let heads_too_large = IntCounter::new(
            "request_heads_too_large_total",
            "Request heads refused with 431 while being read, over max_request_header_bytes",
        )
        .unwrap();
        let reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Conf reload attempts, by result"),
            &["result"],
        )
        .unwrap();
        let generation =
            IntGauge::new("config_generation", "Generation of the conf serving now").unwrap();
        let access_log_dropped = IntCounter::new(
            "access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
        )
        .unwrap();
        let hook_events = IntCounterVec::new(
            Opts::new(
                "hook_failures_total",
                "Hook callbacks that overran their budget, trapped or misbehaved",
            ),
            &["tenant", "module", "cause"],
        )
        .unwrap();
        let hook_invocations = IntCounterVec::new(
            Opts::new(
                "hook_invocations_total",
                "Requests that ran a module's hooks",
            ),
            &["tenant", "module"],
        )
        .unwrap();
        let hook_fuel = IntCounterVec::new(
            Opts::new(
                "hook_fuel_total",
                "Fuel burned by a module's callbacks (about one unit per wasm instruction)",
            ),
            &["tenant", "module"],
        )
        .unwrap();
        let hook_cpu = HistogramVec::new(
            HistogramOpts::new(
                "hook_cpu_seconds",
                "Wasm CPU per request and module, from fuel burned (1000 units = 1 us)",
            )
            .buckets(vec![
                0.000_001, 0.000_002, 0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025,
                0.0005, 0.001, 0.005, 0.01,
            ]),
            &["tenant", "module"],
        )
        .unwrap();
        let guest_metrics = IntCounterVec::new(
            Opts::new(
                "guest_counter",
                "Counters and histograms samples defined by guests",
            ),
            &["tenant", "module", "name"],
        )
        .unwrap();
        let guest_gauges = prometheus::IntGaugeVec::new(
            Opts::new("guest_gauge", "Gauges defined by guests"),
            &["tenant", "module", "name"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream_latency.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(inflight.clone()),
            Box::new(connections.clone()),
            Box::new(connections_accepted.clone()),
            Box::new(responses_aborted.clone()),
            Box::new(heads_too_large.clone()),
            Box::new(reloads.clone()),
            Box::new(generation.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(hook_events.clone()),
            Box::new(hook_invocations.clone()),
            Box::new(hook_cpu.clone()),
            Box::new(hook_fuel.clone()),
            Box::new(guest_metrics.clone()),
            Box::new(guest_gauges.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            unrouted: RouteMetrics {
                by_class: CLASSES.map(|c| requests.with_label_values(&["-", c])),
            },
            requests,
            upstream_latency,
            upstream_errors,
            inflight,
            connections,
            connections_accepted,
            responses_aborted,
            heads_too_large,
            reloads,
            generation,
            access_log_dropped,
            hook_events,
            hook_invocations,
            hook_cpu,
            hook_fuel,
            guest_metrics,
            guest_gauges,
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
