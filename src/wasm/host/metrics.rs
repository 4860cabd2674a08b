//! Metrics: `proxy_define_metric`, `proxy_increment_metric`, `proxy_record_metric`,
//! `proxy_get_metric`. A guest's metrics are exported on the metrics listener with its
//! tenant and module as labels; histograms are kept as a count and a sum.

use super::call::{read, run, write_u32, write_u64, Ret, C};
use super::{GuestMetric, Host};
use crate::wasm::abi::Status;
use wasmtime::Linker;

/// Metrics one module may define.
const MAX_METRICS: usize = 256;
/// Longest metric name.
const MAX_METRIC_NAME: usize = 128;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(
        l,
        define_metric,
        increment_metric,
        record_metric,
        get_metric
    )
}

fn define_metric(mut c: C, kind: i32, np: i32, nn: i32, ret: i32) -> Ret {
    run(&mut c, |c| {
        let name = String::from_utf8(read(c, np, nn)?).map_err(|_| Status::BadArgument)?;
        if name.is_empty() || name.len() > MAX_METRIC_NAME || !(0..=2).contains(&kind) {
            return Err(Status::BadArgument);
        }
        let p = c.data().plugin.clone();
        let key = format!("{kind}:{name}");
        let id = match p.metric_ids.get(&key) {
            Some(id) => *id,
            None => {
                if p.metric_ids.len() >= MAX_METRICS {
                    return Err(Status::InternalFailure);
                }
                let labels = [p.spec.tenant.as_str(), p.spec.name.as_str(), name.as_str()];
                let m = match kind {
                    0 => GuestMetric::Counter(p.metrics.guest_counters.with_label_values(&labels)),
                    1 => GuestMetric::Gauge(p.metrics.guest_gauges.with_label_values(&labels)),
                    _ => {
                        let count = format!("{name}_count");
                        let sum = format!("{name}_sum");
                        let l2 = |n: &str| {
                            p.metrics.guest_counters.with_label_values(&[
                                p.spec.tenant.as_str(),
                                p.spec.name.as_str(),
                                n,
                            ])
                        };
                        GuestMetric::Histogram(l2(&count), l2(&sum))
                    }
                };
                let id = p.next_metric_id();
                p.guest_metrics.insert(id, m);
                p.metric_ids.insert(key, id);
                id
            }
        };
        write_u32(c, ret, id)
    })
}

fn increment_metric(mut c: C, id: i32, off: i64) -> Ret {
    run(&mut c, |c| {
        let p = &c.data().plugin;
        match p.guest_metrics.get(&(id as u32)).as_deref() {
            Some(GuestMetric::Counter(m)) if off >= 0 => m.inc_by(off as u64),
            Some(GuestMetric::Gauge(m)) => m.add(off),
            Some(_) => return Err(Status::BadArgument),
            None => return Err(Status::NotFound),
        }
        Ok(())
    })
}

fn record_metric(mut c: C, id: i32, v: i64) -> Ret {
    run(&mut c, |c| {
        let p = &c.data().plugin;
        match p.guest_metrics.get(&(id as u32)).as_deref() {
            Some(GuestMetric::Counter(m)) => {
                // a counter only goes up: recording sets it to at least `v`
                let cur = m.get();
                if (v as u64) < cur {
                    return Err(Status::BadArgument);
                }
                m.inc_by(v as u64 - cur);
            }
            Some(GuestMetric::Gauge(m)) => m.set(v),
            Some(GuestMetric::Histogram(count, sum)) => {
                count.inc();
                sum.inc_by(v as u64);
            }
            None => return Err(Status::NotFound),
        }
        Ok(())
    })
}

fn get_metric(mut c: C, id: i32, ret: i32) -> Ret {
    run(&mut c, |c| {
        let v = match c.data().plugin.guest_metrics.get(&(id as u32)).as_deref() {
            Some(GuestMetric::Counter(m)) => m.get(),
            Some(GuestMetric::Gauge(m)) => m.get() as u64,
            Some(GuestMetric::Histogram(count, _)) => count.get(),
            None => return Err(Status::NotFound),
        };
        write_u64(c, ret, v)
    })
}
