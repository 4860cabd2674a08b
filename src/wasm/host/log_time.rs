//! Logging, time and ticks: `proxy_log`, `proxy_get_log_level`,
//! `proxy_get_current_time_nanoseconds`, `proxy_set_tick_period_milliseconds`. Guest
//! lines go to the gateway's log with tenant and module fields, and to the tenant's
//! log ring that the admin API serves.

use super::call::{charge_fuel, read, run, write_u32, write_u64, Ret, C};
use super::Host;
use crate::wasm::{Plugin, LOG_LINE_FUEL};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};
use wasmtime::Linker;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(
        l,
        log,
        get_log_level,
        get_current_time_nanoseconds,
        set_tick_period_milliseconds
    )
}

fn log(mut c: C, level: i32, p: i32, n: i32) -> Ret {
    // a line costs more than a call: it is formatted and written out
    charge_fuel(&mut c, LOG_LINE_FUEL)?;
    run(&mut c, |c| {
        let msg = read(c, p, n)?;
        guest_log(&c.data().plugin, level, &String::from_utf8_lossy(&msg));
        Ok(())
    })
}

fn get_log_level(mut c: C, ret: i32) -> Ret {
    run(&mut c, |c| {
        let level = if tracing::enabled!(tracing::Level::TRACE) {
            0
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            1
        } else {
            2
        };
        write_u32(c, ret, level)
    })
}

fn get_current_time_nanoseconds(mut c: C, ret: i32) -> Ret {
    run(&mut c, |c| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        write_u64(c, ret, now)
    })
}

fn set_tick_period_milliseconds(mut c: C, ms: i32) -> Ret {
    run(&mut c, |c| {
        // 0 stops the ticks; any other period is at least the conf's minimum
        let p = &c.data().plugin;
        let ms = ms as u32;
        let ms = if ms == 0 {
            0
        } else {
            ms.max(p.spec.limits.min_tick.as_millis() as u32)
        };
        p.tick_ms.store(ms, Ordering::Relaxed);
        Ok(())
    })
}

/// A guest's `proxy_log` line, as a tracing event with tenant and module fields.
pub(crate) fn guest_log(p: &Plugin, level: i32, msg: &str) {
    let (t, m) = (p.spec.tenant.as_str(), p.spec.name.as_str());
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "critical"];
    p.log.push(m, LEVELS[level.clamp(0, 5) as usize], msg);
    match level {
        0 => tracing::trace!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        1 => tracing::debug!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        2 => tracing::info!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        3 => tracing::warn!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
        _ => tracing::error!(target: "wasmgate::guest", tenant = t, module = m, "{msg}"),
    }
}
