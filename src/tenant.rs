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
    /// Bytes (keys and values) the tenant may keep in the state store.
    #[serde(default)]
    pub state_max_bytes: Option<u64>,
    /// State operations a second (0: no limit).
    #[serde(default)]
    pub state_ops_per_sec: Option<u32>,
    #[serde(default)]
    pub state_max_key_bytes: Option<u64>,
    #[serde(default)]
    pub state_max_value_bytes: Option<u64>,
}

impl TenantLimits {
    /// The tenant's state limits: its own where set, `defaults` elsewhere.
    pub fn state(&self, defaults: crate::state::StateLimits) -> crate::state::StateLimits {
        let size =
            |v: Option<u64>, d: usize| v.map_or(d, |v| usize::try_from(v).unwrap_or(usize::MAX));
        crate::state::StateLimits {
            max_key_bytes: size(self.state_max_key_bytes, defaults.max_key_bytes),
            max_value_bytes: size(self.state_max_value_bytes, defaults.max_value_bytes),
            max_total_bytes: self.state_max_bytes.unwrap_or(defaults.max_total_bytes),
            ops_per_sec: self.state_ops_per_sec.unwrap_or(defaults.ops_per_sec),
        }
    }
}
