//! Per-tenant request rate limiting on the request path (`TenantRt::admit`), by
//! `governor`'s GCRA (one atomic "theoretical arrival time", no lock) on its quanta clock.
//!
//! `rate_per_sec = r` with `burst = b` lets `b` requests through at once, then one every
//! `1/r` s; a refused request learns how long until one would pass (the `Retry-After`).
//! No `rate_per_sec` means no limit; `rate_per_sec = 0` counts as 1 per second and a
//! missing `burst` is the rate itself (at least 1).
//!
//! Why governor rather than the hand-written GCRA this replaced (now kept only in
//! `benches/limiter.rs`): it is cheaper. Criterion medians of one admit, 2-core VM,
//! `cargo bench --bench limiter -- --warm-up-time 1 --measurement-time 3`:
//!
//! | admit | hand-written GCRA (`Instant`) | governor 0.10 (quanta), this `Limiter` |
//! | --- | --- | --- |
//! | allowed, 1 thread | 29.0 ns | 9.3 ns |
//! | refused (with the retry-after), 1 thread | 29.6 ns | 18.3 ns |
//! | allowed, 2 threads on one limiter | 48.1 ns | 36.0 ns |
//!
//! (An earlier run, beside other builds: 29.7/9.9, 32.9/23.3 and 93.2/36.1 ns.)
//!
//! The same algorithm; the difference is mostly the clock (`Instant::now` against a TSC
//! read).

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// One tenant's rate limit.
pub struct Limiter<C: Clock = DefaultClock> {
    rl: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    let one = NonZeroU32::MIN;
    Quota::per_second(NonZeroU32::new(per_sec).unwrap_or(one))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(one))
}

impl Limiter {
    /// `per_sec` requests a second (0 counts as 1), `burst` at once (0 counts as 1).
    pub fn new(per_sec: u32, burst: u32) -> Limiter {
        Limiter {
            rl: RateLimiter::direct(quota(per_sec, burst)),
        }
    }

    /// The limiter for a tenant's `rate_per_sec` and `burst`: none without a rate.
    pub fn for_limits(rate_per_sec: Option<u32>, burst: Option<u32>) -> Option<Limiter> {
        rate_per_sec.map(|r| Limiter::new(r, burst.unwrap_or(r.max(1))))
    }
}

impl<C: Clock> Limiter<C> {
    /// `Ok` if allowed, else how long until a request would be.
    pub fn check(&self) -> Result<(), Duration> {
        self.rl
            .check()
            .map_err(|n| n.wait_time_from(self.rl.clock().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn fake(per_sec: u32, burst: u32) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        clock.advance(Duration::from_secs(7));
        let rl = RateLimiter::direct_with_clock(quota(per_sec, burst), clock.clone());
        (Limiter { rl }, clock)
    }

    fn passed<C: Clock>(g: &Limiter<C>, n: usize) -> usize {
        (0..n).filter(|_| g.check().is_ok()).count()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_passes_then_the_next_waits_one_interval() {
        let (g, clock) = fake(10, 5);
        assert_eq!(passed(&g, 5), 5);
        // 10 per second: the next one in 100 ms
        assert_eq!(g.check(), Err(100 * MS));
        clock.advance(40 * MS);
        assert_eq!(g.check(), Err(60 * MS));
    }

    #[test]
    fn the_rate_refills_over_time() {
        let (g, clock) = fake(10, 5);
        assert_eq!(passed(&g, 5), 5);
        assert!(g.check().is_err());
        // one interval later, one more; the one after it waits again
        clock.advance(100 * MS);
        assert!(g.check().is_ok());
        assert_eq!(g.check(), Err(100 * MS));
        // a quiet while refills the whole burst, never more
        clock.advance(Duration::from_secs(2));
        assert_eq!(passed(&g, 20), 5);
        // steady traffic at the rate passes: 10 a second for 2 s
        clock.advance(Duration::from_secs(2));
        let ok = (0..20)
            .filter(|_| {
                let ok = g.check().is_ok();
                clock.advance(100 * MS);
                ok
            })
            .count();
        assert_eq!(ok, 20);
    }

    #[test]
    fn defaults_no_rate_is_no_limit_and_zeros_count_as_one() {
        assert!(Limiter::for_limits(None, Some(3)).is_none());
        // no burst: the rate itself
        let g = Limiter::for_limits(Some(4), None).unwrap();
        assert_eq!(passed(&g, 10), 4);
        let wait = g.check().unwrap_err();
        assert!(wait > 200 * MS && wait <= 250 * MS, "{wait:?}");
        // rate 0 counts as 1 per second, burst 0 as 1
        let g = Limiter::for_limits(Some(0), None).unwrap();
        assert_eq!(passed(&g, 10), 1);
        let wait = g.check().unwrap_err();
        assert!(wait > 900 * MS && wait <= 1000 * MS, "{wait:?}");
        let (g, _) = fake(100, 0);
        assert_eq!(passed(&g, 10), 1);
        // a rate over a billion a second is not "every request refused"
        let (g, clock) = fake(u32::MAX, 1);
        assert!(g.check().is_ok());
        clock.advance(Duration::from_nanos(1));
        assert!(g.check().is_ok());
    }

    #[test]
    fn the_real_clock_refills() {
        let g = Limiter::new(20, 1);
        assert!(g.check().is_ok());
        let wait = g.check().unwrap_err();
        assert!(wait <= 50 * MS, "{wait:?}");
        std::thread::sleep(wait + 5 * MS);
        assert!(g.check().is_ok());
    }

    #[test]
    fn threads_racing_for_a_burst_get_exactly_the_burst() {
        let (g, _clock) = fake(1, 1000);
        let g = std::sync::Arc::new(g);
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || passed(&g, 1000))
            })
            .collect();
        let total: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1000);
    }
}
