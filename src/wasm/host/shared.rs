//! Shared data and queues: `proxy_{get,set}_shared_data`,
//! `proxy_{register,resolve}_shared_queue`, `proxy_{enqueue,dequeue}_shared_queue`.
//! Both are shared by every VM of the gateway and scoped by tenant: a key or queue name
//! of one tenant never reaches another's. Each tenant's bytes and queues are capped by
//! its quota.

use super::call::{give, read, run, run_alloc, write_u32, Ret, C};
use super::Host;
use crate::wasm::abi::{HostResult, Status};
use crate::wasm::{Plugin, Queue, TenantQuota, MAX_QUEUE_NAME_BYTES, SHARED_ENTRY_OVERHEAD};
use dashmap::mapref::entry::Entry;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wasmtime::Linker;

pub(super) fn add_to_linker(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    link!(
        l,
        get_shared_data,
        set_shared_data,
        register_shared_queue,
        resolve_shared_queue,
        enqueue_shared_queue,
        dequeue_shared_queue
    )
}

fn get_shared_data(mut c: C, kp: i32, kn: i32, ret_p: i32, ret_n: i32, ret_cas: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let found = read(c, kp, kn).and_then(|key| {
            let p = &c.data().plugin;
            p.shared
                .data
                .get(&(p.spec.tenant.clone(), key))
                .map(|e| e.value().clone())
                .ok_or(Status::NotFound)
        });
        let v = found.and_then(|(v, cas)| write_u32(c, ret_cas, cas).map(|_| v));
        give(c, v, ret_p, ret_n)
    })
}

fn set_shared_data(mut c: C, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32) -> Ret {
    run(&mut c, |c| {
        let k = read(c, kp, kn)?;
        let v = read(c, vp, vn)?;
        let p = c.data().plugin.clone();
        set_shared(&p, k, v, cas as u32)
    })
}

fn register_shared_queue(mut c: C, np: i32, nn: i32, ret: i32) -> Ret {
    run(&mut c, |c| {
        let p = c.data().plugin.clone();
        // Names are kept for the gateway's life: an unbounded one is a leak.
        if nn as u32 as usize > MAX_QUEUE_NAME_BYTES {
            p.quota_exceeded("queue_name_too_long", || {
                format!("a queue name of {} bytes", nn as u32)
            });
            return Err(Status::BadArgument);
        }
        let name = read(c, np, nn)?;
        let tenant = p.spec.tenant.clone();
        let id = match p.shared.queue_ids.entry((tenant.clone(), name)) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let max = p.quota.limits().queues;
                if !TenantQuota::reserve(&p.quota.queues, 1, max) {
                    p.quota_exceeded("queue_full", || format!("{max} queues registered"));
                    return Err(Status::InternalFailure);
                }
                *e.insert(p.shared.next_queue.fetch_add(1, Ordering::Relaxed) + 1)
            }
        };
        // (re-)registering makes this plugin the one notified, e.g. after a reload
        let mut q = p.shared.queues.entry(id).or_insert_with(|| Queue {
            tenant,
            items: Default::default(),
            bytes: 0,
            owner: std::sync::Weak::new(),
        });
        q.owner = Arc::downgrade(&p);
        drop(q);
        p.has_queues.store(true, Ordering::Relaxed);
        write_u32(c, ret, id)
    })
}

fn resolve_shared_queue(mut c: C, _vp: i32, _vn: i32, np: i32, nn: i32, ret: i32) -> Ret {
    run(&mut c, |c| {
        // Queues are scoped by tenant; the vm_id argument cannot reach another's.
        let name = read(c, np, nn)?;
        let p = c.data().plugin.clone();
        let id = *p
            .shared
            .queue_ids
            .get(&(p.spec.tenant.clone(), name))
            .ok_or(Status::NotFound)?;
        write_u32(c, ret, id)
    })
}

fn enqueue_shared_queue(mut c: C, id: i32, vp: i32, vn: i32) -> Ret {
    run(&mut c, |c| {
        let v = read(c, vp, vn)?;
        let p = c.data().plugin.clone();
        let owner = {
            let mut q = p
                .shared
                .queues
                .get_mut(&(id as u32))
                .ok_or(Status::NotFound)?;
            if q.tenant != p.spec.tenant {
                return Err(Status::NotFound);
            }
            let lim = p.quota.limits();
            let n = v.len() as u64;
            if n > lim.queue_bytes.min(lim.tenant_queue_bytes) {
                p.quota_exceeded("queue_full", || format!("an item of {n} bytes"));
                return Err(Status::BadArgument);
            }
            if q.items.len() as u64 >= lim.queue_items || q.bytes + n > lim.queue_bytes {
                p.quota_exceeded("queue_full", || {
                    format!(
                        "queue {id} holds {} items, {} bytes",
                        q.items.len(),
                        q.bytes
                    )
                });
                return Err(Status::InternalFailure);
            }
            if !TenantQuota::reserve(&p.quota.queue_bytes, n, lim.tenant_queue_bytes) {
                p.quota_exceeded("queue_full", || {
                    format!("{} bytes queued in all queues", lim.tenant_queue_bytes)
                });
                return Err(Status::InternalFailure);
            }
            q.bytes += n;
            q.items.push_back(v);
            q.owner.upgrade()
        };
        if let Some(owner) = owner {
            owner.queue_ready(id as u32);
        }
        Ok(())
    })
}

fn dequeue_shared_queue(mut c: C, id: i32, ret_p: i32, ret_n: i32) -> Ret {
    run_alloc(&mut c, |c| {
        let item = dequeue(&c.data().plugin, id as u32);
        give(c, item, ret_p, ret_n)
    })
}

/// `proxy_set_shared_data` within the tenant's byte quota. A write that can never fit
/// is `BadArgument`; one that does not fit now is `InternalFailure`, the status this
/// host gives for its other full tables (the ABI has no "resource exhausted"; Envoy sets
/// no cap at all, Kong traps the guest).
fn set_shared(p: &Plugin, k: Vec<u8>, v: Vec<u8>, cas: u32) -> HostResult {
    let max = p.quota.limits().data_bytes;
    let size = |k: &[u8], v: &[u8]| k.len() as u64 + v.len() as u64 + SHARED_ENTRY_OVERHEAD;
    let new = size(&k, &v);
    if new > max {
        p.quota_exceeded("shared_data_full", || {
            format!("a key and value of {new} bytes")
        });
        return Err(Status::BadArgument);
    }
    let full = || {
        p.quota_exceeded("shared_data_full", || {
            format!("{max} bytes of shared data stored")
        });
        Err(Status::InternalFailure)
    };
    match p.shared.data.entry((p.spec.tenant.clone(), k)) {
        Entry::Occupied(mut e) => {
            if cas != 0 && cas != e.get().1 {
                return Err(Status::CasMismatch);
            }
            let old = size(&e.key().1, &e.get().0);
            if new > old {
                if !TenantQuota::reserve(&p.quota.data_bytes, new - old, max) {
                    return full();
                }
            } else {
                p.quota.data_bytes.fetch_sub(old - new, Ordering::Relaxed);
            }
            let slot = e.get_mut();
            slot.0 = v;
            slot.1 = slot.1.wrapping_add(1).max(1);
        }
        Entry::Vacant(e) => {
            if cas != 0 {
                return Err(Status::CasMismatch);
            }
            if !TenantQuota::reserve(&p.quota.data_bytes, new, max) {
                return full();
            }
            e.insert((v, 1));
        }
    }
    Ok(())
}

/// Takes a queue's oldest item: `NotFound` for a queue that is not the tenant's,
/// `Empty` for an empty one.
fn dequeue(p: &Plugin, id: u32) -> HostResult<Vec<u8>> {
    let mut q = p.shared.queues.get_mut(&id).ok_or(Status::NotFound)?;
    if q.tenant != p.spec.tenant {
        return Err(Status::NotFound);
    }
    let v = q.items.pop_front().ok_or(Status::Empty)?;
    q.bytes -= v.len() as u64;
    p.quota
        .queue_bytes
        .fetch_sub(v.len() as u64, Ordering::Relaxed);
    Ok(v)
}
