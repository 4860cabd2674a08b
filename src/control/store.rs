//! What the control plane keeps on disk: `data_dir/control.json`, one versioned record
//! of the tenants created through the API, their modules and versions, function
//! bindings, route attachments and revoked tokens. These types are the stored schema:
//! they share nothing with the conf's file structs, and a change to them is a new
//! [`STORE_VERSION`].

use crate::tenant::TenantLimits;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The version of `control.json` this gateway writes. A file without a version is the
/// first layout, which version 1 reads unchanged; a newer one is refused rather than
/// misread.
pub const STORE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct VersionRec {
    pub version: u32,
    pub digest: String,
    pub size: u64,
    pub uploaded_at: u64,
    pub uploaded_by: String,
    pub exports: Vec<String>,
    pub compile_ms: u64,
    pub config: String,
    pub budget_us: u64,
    pub memory_mb: u64,
    /// `filter` (Proxy-Wasm) or `function` (a WASI-HTTP component); records written
    /// before functions existed are filters.
    #[serde(default = "filter")]
    pub kind: String,
    /// A function's requests per instance (1: fresh instances); 1 for filters.
    #[serde(default = "one")]
    pub requests_per_instance: u32,
}

fn one() -> u32 {
    1
}

fn filter() -> String {
    "filter".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ModuleRec {
    pub versions: Vec<VersionRec>,
    pub active: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionRec {
    pub module: String,
    pub upstream: Option<String>,
}

/// What the control plane persists.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Stored {
    /// The record's layout ([`STORE_VERSION`]; 0 in files written before it was kept).
    #[serde(default)]
    pub version: u32,
    /// Tenants created through the API (conf tenants live in the conf).
    pub tenants: BTreeMap<String, TenantLimits>,
    pub modules: BTreeMap<String, BTreeMap<String, ModuleRec>>,
    pub functions: BTreeMap<String, BTreeMap<String, FunctionRec>>,
    pub revoked: BTreeSet<String>,
    /// Modules a tenant attached to conf routes it owns: tenant -> route -> modules.
    #[serde(default)]
    pub route_hooks: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// In a cluster: the shared record's sequence number this one is (0 standalone).
    #[serde(default)]
    pub seq: u64,
}

impl Stored {
    /// Reads `path`; an absent file is an empty record.
    pub fn load(path: &Path) -> anyhow::Result<Stored> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::default()),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        Stored::parse(&bytes, &path.display().to_string()).map_err(anyhow::Error::msg)
    }

    /// A record from its JSON (`whence` names where it came from in the error); a newer
    /// layout is refused rather than misread.
    pub fn parse(bytes: &[u8], whence: &str) -> Result<Stored, String> {
        let s: Stored = serde_json::from_slice(bytes)
            .map_err(|e| format!("{whence} is not a control record: {e}"))?;
        if s.version > STORE_VERSION {
            return Err(format!(
                "{whence} is version {}, newer than this gateway's {STORE_VERSION}",
                s.version
            ));
        }
        Ok(s)
    }

    /// Writes the record to `path` atomically (a temporary file, then a rename), as the
    /// current [`STORE_VERSION`].
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let record = Stored {
            version: STORE_VERSION,
            ..self.clone()
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        write_whole(path, &bytes)
    }
}

/// Writes `bytes` to `path` whole: a temporary file of this writer's own, then a rename,
/// so a reader (another thread, a change being applied) sees the old file or the new one.
pub fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_a_version_reads_as_the_first_layout_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.json");
        std::fs::write(
            &path,
            r#"{"tenants":{"acme":{"rate_per_sec":5,"burst":null,"max_budget_us":null,
               "max_memory_mb":null,"max_module_bytes":null,"max_concurrency":null}},
               "modules":{},"functions":{},"revoked":[]}"#,
        )
        .unwrap();
        let s = Stored::load(&path).unwrap();
        assert_eq!(s.tenants["acme"].rate_per_sec, Some(5));
        s.save(&path).unwrap();
        let again = Stored::load(&path).unwrap();
        assert_eq!(again.version, STORE_VERSION);
        assert_eq!(again.tenants, s.tenants);

        std::fs::write(
            &path,
            r#"{"version":99,"tenants":{},"modules":{},"functions":{},"revoked":[]}"#,
        )
        .unwrap();
        let e = Stored::load(&path).unwrap_err().to_string();
        assert!(e.contains("version 99, newer than this gateway's 1"), "{e}");
    }
}
