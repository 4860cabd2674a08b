//! Per-tenant metering and logs, fed from the hook path without contended locks:
//! usage counters are atomics; a background pass (off the request path) folds them into
//! time buckets for billing queries. Tenant log lines go to a bounded ring and a
//! broadcast channel: a slow follower drops lines (counted), it never blocks a request.

use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// What a module's usage counts, as the usage API and records name it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub invocations: u64,
    pub wasm_cpu_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub budget_overruns: u64,
    pub traps: u64,
    pub local_responses: u64,
    pub http_callouts: u64,
    /// Not additive: the largest linear memory seen.
    pub peak_memory_bytes: u64,
    /// State store calls: reads (get, list) and writes (set, cas, incr, delete).
    pub state_reads: u64,
    pub state_writes: u64,
}

/// Counters in a persisted bucket: [`Tally`]'s fields in declaration order. Records
/// written before the state counters (9 fields) read with those as 0.
const FIELDS: usize = 11;

impl Tally {
    /// `self` then `other`, as one window: counts add up, the peak is the larger.
    pub fn merge(&mut self, other: &Tally) {
        *self = Tally {
            peak_memory_bytes: self.peak_memory_bytes.max(other.peak_memory_bytes),
            ..self.zip(other, u64::saturating_add)
        };
    }

    /// What was counted since `before` (the peak as it is now).
    fn since(&self, before: &Tally) -> Tally {
        Tally {
            peak_memory_bytes: self.peak_memory_bytes,
            ..self.zip(before, u64::saturating_sub)
        }
    }

    /// `f` of each field of `self` and the same field of `other`.
    fn zip(&self, other: &Tally, f: impl Fn(u64, u64) -> u64) -> Tally {
        let (a, b) = (self.to_array(), other.to_array());
        Tally::from_array(std::array::from_fn(|i| f(a[i], b[i])))
    }

    /// Anything but the peak was counted.
    fn counted(&self) -> bool {
        Tally {
            peak_memory_bytes: 0,
            ..*self
        } != Tally::default()
    }

    /// The persisted form: the fields in declaration order (the format of
    /// `usage.json` since it was introduced; new fields go last).
    fn to_array(self) -> [u64; FIELDS] {
        [
            self.invocations,
            self.wasm_cpu_us,
            self.bytes_in,
            self.bytes_out,
            self.budget_overruns,
            self.traps,
            self.local_responses,
            self.http_callouts,
            self.peak_memory_bytes,
            self.state_reads,
            self.state_writes,
        ]
    }

    /// Reads a persisted bucket of any length: missing fields are 0, extra ones (from a
    /// newer gateway) are ignored.
    fn from_slice(v: &[u64]) -> Tally {
        Tally::from_array(std::array::from_fn(|i| v.get(i).copied().unwrap_or(0)))
    }

    fn from_array(a: [u64; FIELDS]) -> Tally {
        let [invocations, wasm_cpu_us, bytes_in, bytes_out, budget_overruns, traps, local_responses, http_callouts, peak_memory_bytes, state_reads, state_writes] =
            a;
        Tally {
            invocations,
            wasm_cpu_us,
            bytes_in,
            bytes_out,
            budget_overruns,
            traps,
            local_responses,
            http_callouts,
            peak_memory_bytes,
            state_reads,
            state_writes,
        }
    }
}

/// One module's live counters, bumped on the hook path (relaxed atomics, no lock), and
/// the time buckets a background pass folds them into.
#[derive(Default)]
pub struct Usage {
    pub invocations: AtomicU64,
    wasm_cpu_us: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub budget_overruns: AtomicU64,
    pub traps: AtomicU64,
    pub local_responses: AtomicU64,
    pub http_callouts: AtomicU64,
    peak_memory_bytes: AtomicU64,
    pub state_reads: AtomicU64,
    pub state_writes: AtomicU64,
    /// (unix second, what was counted during the interval that ended then)
    buckets: Mutex<VecDeque<(u64, Tally)>>,
    folded: Mutex<Tally>,
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
    /// (unix second, counters added during the interval that ended then), oldest first;
    /// the counters in [`Tally`]'s field order.
    pub buckets: Vec<(u64, Vec<u64>)>,
}

impl SavedUsage {
    /// What its buckets in `(from, to]` (unix seconds) add up to.
    pub fn between(&self, from: u64, to: u64) -> Tally {
        let mut out = Tally::default();
        for (_, d) in self.buckets.iter().filter(|(t, _)| *t > from && *t <= to) {
            out.merge(&Tally::from_slice(d));
        }
        out
    }
}

/// How long usage buckets are kept.
const KEEP_SECS: u64 = 7 * 24 * 3600;

impl Usage {
    /// Bills `fuel` as wasm CPU time ([`super::FUEL_PER_US`] units per microsecond).
    pub fn add_fuel(&self, fuel: u64) {
        let before = self.fuel.fetch_add(fuel, Ordering::Relaxed);
        let per = super::FUEL_PER_US;
        let us = (before + fuel) / per - before / per;
        if us > 0 {
            self.wasm_cpu_us.fetch_add(us, Ordering::Relaxed);
        }
    }

    pub fn peak(&self, bytes: u64) {
        self.peak_memory_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Everything counted so far.
    pub fn totals(&self) -> Tally {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tally {
            invocations: load(&self.invocations),
            wasm_cpu_us: load(&self.wasm_cpu_us),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            budget_overruns: load(&self.budget_overruns),
            traps: load(&self.traps),
            local_responses: load(&self.local_responses),
            http_callouts: load(&self.http_callouts),
            peak_memory_bytes: load(&self.peak_memory_bytes),
            state_reads: load(&self.state_reads),
            state_writes: load(&self.state_writes),
        }
    }

    /// Folds what was counted since the last fold into a bucket stamped `now`.
    fn fold(&self, now: u64) {
        let totals = self.totals();
        let mut last = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        let delta = totals.since(&last);
        if delta.counted() {
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
    pub fn between(&self, from: u64, to: u64) -> Tally {
        self.fold(now_secs());
        let b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Tally::default();
        for (_, d) in b.iter().filter(|(t, _)| *t > from && *t <= to) {
            out.merge(d);
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
    pub fn tenant_usage(&self, tenant: &str, from: u64, to: u64) -> Vec<(String, Tally)> {
        let mut out: Vec<(String, Tally)> = self
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
                    .map(|(t, d)| (*t, d.to_array().to_vec()))
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
            let mut old: VecDeque<(u64, Tally)> = u
                .buckets
                .into_iter()
                .filter(|(t, _)| *t >= oldest)
                .map(|(t, d)| (t, Tally::from_slice(&d)))
                .collect();
            old.extend(b.drain(..));
            *b = old;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_adds_counts_and_keeps_the_largest_peak() {
        let u = Usage::default();
        u.invocations.fetch_add(2, Ordering::Relaxed);
        u.peak(100);
        u.fold(10);
        u.invocations.fetch_add(3, Ordering::Relaxed);
        u.http_callouts.fetch_add(1, Ordering::Relaxed);
        u.peak(50);
        u.fold(20);
        let w = u.between(0, 30);
        assert_eq!(
            (w.invocations, w.http_callouts, w.peak_memory_bytes),
            (5, 1, 100)
        );
        assert_eq!(u.between(15, 30).invocations, 3);
        assert_eq!(u.between(30, 40), Tally::default(), "nothing counted then");
    }

    #[test]
    fn the_saved_form_keeps_its_field_order() {
        // usage.json written before the counters had names must read the same
        let t = Tally::from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!((t.invocations, t.wasm_cpu_us, t.bytes_out), (1, 2, 4));
        assert_eq!((t.http_callouts, t.peak_memory_bytes), (8, 9));
        assert_eq!((t.state_reads, t.state_writes), (0, 0));
        assert_eq!(t.to_array(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0]);
        let t = Tally::from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!((t.state_reads, t.state_writes), (10, 11));
    }
}
