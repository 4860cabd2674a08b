//! A tenant's limits: what a conf's `[tenants.NAME]` lowers to, what the admin API
//! takes, and what the control plane stores for the tenants it creates (in
//! `control.json`, see [`crate::control::store`]). The conf's file struct is separate,
//! so renaming a conf key never breaks stored control data; renaming a field here is a
//! change of the stored record's version.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Largest per-callback budget a module of this tenant may ask for (µs).
    pub max_budget_us: Option<u64>,
    /// Largest memory a module of this tenant may ask for (MiB).
    pub max_memory_mb: Option<u64>,
    /// Largest module accepted (bytes).
    pub max_module_bytes: Option<u64>,
    /// Requests per second across the tenant's functions, with a burst.
    pub rate_per_sec: Option<u32>,
    pub burst: Option<u32>,
    /// Requests of this tenant's functions served at once; more wait briefly, then 503.
    pub max_concurrency: Option<u32>,
    /// Upstreams this tenant's functions may guard (bind with an upstream).
    #[serde(default)]
    pub allowed_upstreams: Vec<String>,
}
