//! Per-tenant metering and logs, fed from the hook path without contended locks:
//! usage counters are atomics; a background pass (off the request path) folds them into
//! time buckets for billing queries. Tenant log lines go to a bounded ring and a
//! broadcast channel: a slow follower drops lines (counted), it never blocks a request.

use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counters kept per tenant and module.
pub const FIELDS: [&str; 9] = [
    "invocations",
    "wasm_cpu_us",
    "bytes_in",
    "bytes_out",
    "budget_overruns",
    "traps",
    "local_responses",
    "http_callouts",
    "peak_memory_bytes",
];
const PEAK: usize = 8;

#[derive(Default)]
pub struct Usage {
    pub counters: [AtomicU64; 9],
    /// (unix second, counters added during the interval that ended then)
    buckets: Mutex<VecDeque<(u64, [u64; 9])>>,
    folded: Mutex<[u64; 9]>,
    /// All fuel billed; `wasm_cpu_us` follows it, so requests of less than a microsecond
    /// each still add up instead of rounding to zero one by one.
    fuel: AtomicU64,
    /// Buckets ever added, so persistence can tell whether there is anything new to save.
    pushed: AtomicU64,
}

/// One tenant's module's folded usage as persisted across restarts (`data_dir/control/usage.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedUsage {
    pub tenant: String,
    pub module: String,
    /// (unix second, counters added during the interval that ended then), oldest first.
    pub buckets: Vec<(u64, [u64; 9])>,
}

/// How long usage buckets are kept.
const KEEP_SECS: u64 = 7 * 24 * 3600;

impl Usage {
    pub fn add(&self, field: usize, n: u64) {
        self.counters[field].fetch_add(n, Ordering::Relaxed);
    }

    /// Bills `fuel` as wasm CPU time ([`super::FUEL_PER_US`] units per microsecond).
    pub fn add_fuel(&self, fuel: u64) {
        let before = self.fuel.fetch_add(fuel, Ordering::Relaxed);
        let per = super::FUEL_PER_US;
        let us = (before + fuel) / per - before / per;
        if us > 0 {
            self.add(CPU_US, us);
        }
    }

    pub fn peak(&self, bytes: u64) {
        self.counters[PEAK].fetch_max(bytes, Ordering::Relaxed);
    }

    pub fn totals(&self) -> [u64; 9] {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    /// Folds what was counted since the last fold into a bucket stamped `now`.
    fn fold(&self, now: u64) {
        let totals = self.totals();
        let mut last = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        let mut delta: [u64; 9] = std::array::from_fn(|i| totals[i].saturating_sub(last[i]));
        delta[PEAK] = totals[PEAK]; // a peak is not additive
        if delta[..PEAK].iter().any(|d| *d > 0) {
            let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            b.push_back((now, delta));
            self.pushed.fetch_add(1, Ordering::Relaxed);
            while b.front().is_some_and(|(t, _)| *t + KEEP_SECS < now) {
                b.pop_front();
            }
        }
        *last = totals;
    }

    /// Usage in `(from, to]` (unix seconds), folded up to now first.
    pub fn between(&self, from: u64, to: u64) -> [u64; 9] {
        self.fold(now_secs());
        let b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = [0u64; 9];
        for (t, d) in b.iter().filter(|(t, _)| *t > from && *t <= to) {
            let _ = t;
            for i in 0..9 {
                if i == PEAK {
                    out[i] = out[i].max(d[i]);
                } else {
                    out[i] += d[i];
                }
            }
        }
        out
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A tenant's recent log lines and its live followers.
pub struct TenantLog {
    ring: Mutex<VecDeque<String>>,
    tx: tokio::sync::broadcast::Sender<String>,
    pub dropped: AtomicU64,
}

const RING_LINES: usize = 1000;

impl Default for TenantLog {
    fn default() -> Self {
        TenantLog {
            ring: Mutex::new(VecDeque::with_capacity(64)),
            tx: tokio::sync::broadcast::channel(1024).0,
            dropped: AtomicU64::new(0),
        }
    }
}

impl TenantLog {
    pub fn push(&self, module: &str, level: &str, msg: &str) {
        let line = serde_json::json!({
            "ts_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "module": module,
            "level": level,
            "message": msg,
        })
        .to_string();
        {
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() == RING_LINES {
                r.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            r.push_back(line.clone());
        }
        let _ = self.tx.send(line);
    }

    pub fn recent(&self) -> Vec<String> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.tx.subscribe()
    }
}

/// Every tenant's usage and logs.
#[derive(Default)]
pub struct Meter {
    usage: DashMap<(String, String), Arc<Usage>>,
    logs: DashMap<String, Arc<TenantLog>>,
}

impl Meter {
    pub fn usage(&self, tenant: &str, module: &str) -> Arc<Usage> {
        self.usage
            .entry((tenant.to_string(), module.to_string()))
            .or_default()
            .clone()
    }

    pub fn log(&self, tenant: &str) -> Arc<TenantLog> {
        self.logs.entry(tenant.to_string()).or_default().clone()
    }

    /// Usage of every module of `tenant`, between `from` and `to`.
    pub fn tenant_usage(&self, tenant: &str, from: u64, to: u64) -> Vec<(String, [u64; 9])> {
        let mut out: Vec<(String, [u64; 9])> = self
            .usage
            .iter()
            .filter(|e| e.key().0 == tenant)
            .map(|e| (e.key().1.clone(), e.value().between(from, to)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Folds every counter into its buckets; the background metering pass.
    pub fn fold_all(&self) {
        let now = now_secs();
        for e in self.usage.iter() {
            e.value().fold(now);
        }
    }

    /// How many buckets were ever folded: unchanged means nothing new to persist.
    pub fn buckets_pushed(&self) -> u64 {
        self.usage
            .iter()
            .map(|e| e.value().pushed.load(Ordering::Relaxed))
            .sum()
    }

    /// Every bucket of every tenant and module, folded up to now, for persistence.
    pub fn save(&self) -> Vec<SavedUsage> {
        self.fold_all();
        let mut out: Vec<SavedUsage> = self
            .usage
            .iter()
            .map(|e| SavedUsage {
                tenant: e.key().0.clone(),
                module: e.key().1.clone(),
                buckets: e
                    .value()
                    .buckets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .collect(),
            })
            .filter(|u| !u.buckets.is_empty())
            .collect();
        out.sort_by(|a, b| (&a.tenant, &a.module).cmp(&(&b.tenant, &b.module)));
        out
    }

    /// Puts back what [`Meter::save`] returned before a restart, ahead of anything
    /// counted since; buckets past the retention are dropped.
    pub fn restore(&self, saved: Vec<SavedUsage>) {
        let oldest = now_secs().saturating_sub(KEEP_SECS);
        for u in saved {
            let usage = self.usage(&u.tenant, &u.module);
            let mut b = usage.buckets.lock().unwrap_or_else(|e| e.into_inner());
            let mut old: VecDeque<(u64, [u64; 9])> = u
                .buckets
                .into_iter()
                .filter(|(t, _)| *t >= oldest)
                .collect();
            old.extend(b.drain(..));
            *b = old;
        }
    }
}

pub const INVOCATIONS: usize = 0;
pub const CPU_US: usize = 1;
pub const BYTES_IN: usize = 2;
pub const BYTES_OUT: usize = 3;
pub const OVERRUNS: usize = 4;
pub const TRAPS: usize = 5;
pub const LOCAL_RESPONSES: usize = 6;
pub const CALLOUTS: usize = 7;
