//! One rate-limit admit on the request path: `TenantRt::admit`'s limiter (governor's
//! GCRA, `wasmgate::control::limit::Limiter`) against the hand-written lock-free GCRA it
//! replaced (kept here as the reference), allowed and refused, on one thread and with 2
//! threads on one tenant's limiter. The numbers are quoted in `src/control/limit.rs`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use wasmgate::control::limit::Limiter;

/// The hand-written limiter the gateway had: one atomic "theoretical arrival time" on
/// `Instant` (with governor's burst semantics, as its unit tests had them).
struct Gcra {
    interval_ns: u64,
    tolerance_ns: u64,
    tat: AtomicU64,
    epoch: Instant,
}

impl Gcra {
    fn new(per_sec: u32, burst: u32) -> Gcra {
        let interval_ns = (1_000_000_000 / per_sec.max(1) as u64).max(1);
        Gcra {
            interval_ns,
            tolerance_ns: interval_ns * (burst.max(1) - 1) as u64,
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn check(&self) -> Result<(), Duration> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            if base - now > self.tolerance_ns {
                return Err(Duration::from_nanos(base - now - self.tolerance_ns));
            }
            match self.tat.compare_exchange_weak(
                tat,
                base + self.interval_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(t) => tat = t,
            }
        }
    }
}

/// Never refuses: a billion a second, a large burst.
const OPEN: (u32, u32) = (1_000_000_000, 1_000_000);
/// Refuses after the first: one a second.
const SHUT: (u32, u32) = (1, 1);

/// `iters` admits on each of 2 threads at once: time per admit (per thread).
fn contended(iters: u64, admit: impl Fn() -> bool + Sync) -> Duration {
    let b = Barrier::new(2);
    let mut total = Duration::ZERO;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    b.wait();
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(admit());
                    }
                    t.elapsed()
                })
            })
            .collect();
        for h in hs {
            total += h.join().unwrap();
        }
    });
    total / 2
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");
    for (name, (rate, burst)) in [("allowed", OPEN), ("refused", SHUT)] {
        let ours = Gcra::new(rate, burst);
        let theirs = Limiter::new(rate, burst);
        let _ = (ours.check(), theirs.check());
        g.bench_function(format!("gcra_{name}"), |b| {
            b.iter(|| black_box(ours.check()))
        });
        g.bench_function(format!("governor_{name}"), |b| {
            b.iter(|| black_box(theirs.check()))
        });
    }
    let ours = Arc::new(Gcra::new(OPEN.0, OPEN.1));
    let theirs = Arc::new(Limiter::new(OPEN.0, OPEN.1));
    g.bench_function("gcra_allowed_2_threads", |b| {
        b.iter_custom(|n| contended(n, || ours.check().is_ok()))
    });
    g.bench_function("governor_allowed_2_threads", |b| {
        b.iter_custom(|n| contended(n, || theirs.check().is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
