//! Tenant secrets: sealed with ChaCha20-Poly1305 (ring's AEAD) before they reach any
//! store, opened only in memory, never logged or returned by the API.
//!
//! - **Key.** 32 bytes: `WASMGATE_SECRET_KEY` (base64) when set, else `data_dir/secret.key`
//!   (created with mode 0600 on first start). Each sealed value names its key by an id
//!   (the first 8 hex digits of the key's SHA-256), so after a rotation the old key,
//!   kept in `secret.key.previous`, still opens values not yet re-sealed.
//! - **Sealed form.** `wg1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`, with the tenant and
//!   the secret's name as associated data: a sealed value copied to another tenant or
//!   name does not open.
//! - **Where.** In the state backend, namespace `s/TENANT`, one entry per name holding
//!   `{"updated_at": unix seconds, "sealed": "..."}`; so the embedded file or Redis never
//!   holds a secret in clear.

use super::{all_keys, Backend, StateError, WriteOpts, Written};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use dashmap::DashMap;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
#[cfg(test)]
use std::time::Duration;

/// The environment variable that carries the key (base64 of 32 bytes).
pub const KEY_ENV: &str = "WASMGATE_SECRET_KEY";
/// Longest secret name and value.
pub const MAX_NAME: usize = 128;
pub const MAX_VALUE: usize = 64 * 1024;

struct Key {
    id: String,
    key: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8]) -> anyhow::Result<Key> {
        anyhow::ensure!(
            bytes.len() == 32,
            "a secret key is 32 bytes, this one is {}",
            bytes.len()
        );
        let id = hex::encode(&ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()[..4]);
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| anyhow::anyhow!("bad key"))?,
        );
        Ok(Key { id, key })
    }
}

/// The current key and the previous ones still accepted for opening.
pub struct Keyring {
    current: Key,
    previous: Vec<Key>,
    /// Where the key lives (None: the environment), for rotation.
    file: Option<PathBuf>,
}

fn aad(tenant: &str, name: &str) -> Vec<u8> {
    [tenant.as_bytes(), b"\0", name.as_bytes()].concat()
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    SystemRandom::new()
        .fill(&mut k)
        .expect("the system's random source");
    k
}

fn decode_key(text: &str, whence: &str) -> anyhow::Result<Key> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| anyhow::anyhow!("{whence}: not base64: {e}"))?;
    Key::new(&bytes).map_err(|e| anyhow::anyhow!("{whence}: {e}"))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Keyring {
    /// The key from [`KEY_ENV`], else from `dir/secret.key` (made on first use), with the
    /// previous keys from `dir/secret.key.previous` (one per line).
    pub fn load(dir: &Path) -> anyhow::Result<Keyring> {
        let file = dir.join("secret.key");
        let (current, file) = match std::env::var(KEY_ENV) {
            Ok(v) if !v.trim().is_empty() => (decode_key(&v, KEY_ENV)?, None),
            _ => {
                let text = match std::fs::read_to_string(&file) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::create_dir_all(dir)?;
                        let t = B64.encode(random_key());
                        write_private(&file, &t)?;
                        t
                    }
                    Err(e) => anyhow::bail!("cannot read {}: {e}", file.display()),
                };
                (decode_key(&text, &file.display().to_string())?, Some(file))
            }
        };
        let prev_path = dir.join("secret.key.previous");
        let previous = match std::fs::read_to_string(&prev_path) {
            Ok(t) => t
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| decode_key(l, &prev_path.display().to_string()))
                .collect::<anyhow::Result<Vec<_>>>()?,
            Err(_) => Vec::new(),
        };
        Ok(Keyring {
            current,
            previous,
            file,
        })
    }

    /// The key every node of a cluster derives from the cluster key: no file, and a
    /// rotation is the cluster key's (see the README).
    pub fn shared(key: &[u8; 32]) -> anyhow::Result<Keyring> {
        Ok(Keyring {
            current: Key::new(key)?,
            previous: Vec::new(),
            file: None,
        })
    }

    pub fn seal(&self, tenant: &str, name: &str, value: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut buf = value.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(tenant, name)),
                &mut buf,
            )
            .expect("sealing cannot fail for a value this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("wg1:{}:{}", self.current.id, B64.encode(out))
    }

    pub fn open(&self, tenant: &str, name: &str, sealed: &str) -> Result<Vec<u8>, String> {
        let mut parts = sealed.splitn(3, ':');
        let (Some("wg1"), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("not a sealed secret".into());
        };
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| format!("sealed with key {id}, which this gateway does not have"))?;
        let raw = B64
            .decode(body)
            .map_err(|_| "not a sealed secret".to_string())?;
        if raw.len() < NONCE_LEN {
            return Err("not a sealed secret".into());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let mut buf = ct.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(aad(tenant, name)), &mut buf)
            .map_err(|_| {
                "the secret does not open with its key (tampered, or moved)".to_string()
            })?;
        Ok(plain.to_vec())
    }
}

/// Replaces each `{{secret:NAME}}` in a filter's configuration with the tenant's secret
/// NAME, escaped for a JSON string (configurations are JSON nearly always, and the
/// placeholder sits inside a string: `"key": "{{secret:API_KEY}}"`). A name the tenant
/// has not set is an error naming it; a configuration without placeholders is returned
/// as it is.
pub fn substitute(
    config: &[u8],
    values: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>, String> {
    const OPEN: &[u8] = b"{{secret:";
    let mut out = Vec::with_capacity(config.len());
    let mut rest = config;
    while let Some(i) = find(rest, OPEN) {
        out.extend_from_slice(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let Some(end) = find(after, b"}}") else {
            return Err("a `{{secret:` in the configuration is not closed with `}}`".into());
        };
        let name = std::str::from_utf8(&after[..end]).unwrap_or("");
        let value = values
            .and_then(|v| v.get(name))
            .ok_or_else(|| format!("the configuration names secret `{name}`, which is not set"))?;
        let quoted = serde_json::to_string(value).unwrap_or_default();
        out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
        rest = &after[end + 2..];
    }
    out.extend_from_slice(rest);
    Ok(out)
}

/// Whether a configuration names the secret `name`.
pub fn names_secret(config: &[u8], name: &str) -> bool {
    find(config, format!("{{{{secret:{name}}}}}").as_bytes()).is_some()
}

/// Whether a configuration names any secret.
pub fn names_secrets(config: &[u8]) -> bool {
    find(config, b"{{secret:").is_some()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A secret as listed: never its value.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub updated_at: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    updated_at: u64,
    sealed: String,
}

/// Every tenant's secrets: sealed in the backend, opened into an in-memory map per tenant
/// (what guests read), which changes only through [`Secrets::set`] and
/// [`Secrets::delete`].
pub struct Secrets {
    backend: Arc<dyn Backend>,
    keys: RwLock<Arc<Keyring>>,
    open: DashMap<String, Arc<BTreeMap<String, String>>>,
    /// Held by a rotation: two at once would each seal with a key the other replaces.
    rotating: tokio::sync::Mutex<()>,
}

fn ns(tenant: &str) -> String {
    format!("s/{tenant}")
}

/// The namespace that lists the tenants that have (or had) secrets, one key each.
const INDEX: &str = "s-index";

/// Checks a secret's name: letters, digits, `_`, `-` and `.`, at most [`MAX_NAME`].
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Secrets {
    pub fn new(backend: Arc<dyn Backend>, keys: Keyring) -> Arc<Secrets> {
        Arc::new(Secrets {
            backend,
            keys: RwLock::new(Arc::new(keys)),
            open: DashMap::new(),
            rotating: tokio::sync::Mutex::new(()),
        })
    }

    fn keys(&self) -> Arc<Keyring> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn set(&self, tenant: &str, name: &str, value: &str) -> Result<(), String> {
        if !valid_name(name) {
            return Err(format!(
                "a secret's name is 1 to {MAX_NAME} letters, digits, `_`, `-` or `.`"
            ));
        }
        if value.len() > MAX_VALUE {
            return Err(format!("a secret's value is at most {MAX_VALUE} bytes"));
        }
        let stored = Stored {
            updated_at: crate::wasm::meter::now_secs(),
            sealed: self.keys().seal(tenant, name, value.as_bytes()),
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
        let opts = WriteOpts {
            quota: u64::MAX,
            ..WriteOpts::default()
        };
        self.backend
            .set(&ns(tenant), name, bytes.into(), opts)
            .await
            .map_err(|e| e.to_string())?;
        self.backend
            .set(INDEX, tenant, bytes::Bytes::new(), opts)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh(tenant).await
    }

    /// Deletes every secret of `tenant` (a deleted tenant: a new one of the same name
    /// must not find them); how many there were.
    pub async fn forget_tenant(&self, tenant: &str) -> Result<usize, String> {
        let names = all_keys(&*self.backend, &ns(tenant))
            .await
            .map_err(|e| e.to_string())?;
        for name in &names {
            self.backend
                .delete(&ns(tenant), name, None)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.backend
            .delete(INDEX, tenant, None)
            .await
            .map_err(|e| e.to_string())?;
        self.open.remove(tenant);
        Ok(names.len())
    }

    /// Tenants whose secrets this node holds open (at least one).
    pub fn cached_tenants(&self) -> Vec<String> {
        self.open
            .iter()
            .filter(|e| !e.value().is_empty())
            .map(|e| e.key().clone())
            .collect()
    }

    /// Drops a tenant's cached values (deleted on another node).
    pub fn forget_cached(&self, tenant: &str) {
        self.open.remove(tenant);
    }

    /// Writes back, sealed, the secrets this node holds open that the store lacks (a
    /// Redis that lost its data); how many. A secret the store has is left as it is.
    pub async fn restore_cached(&self) -> Result<usize, String> {
        let keys = self.keys();
        let open: Vec<(String, Arc<BTreeMap<String, String>>)> = self
            .open
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let mut n = 0;
        for (tenant, values) in open {
            for (name, value) in values.iter() {
                let stored = Stored {
                    updated_at: crate::wasm::meter::now_secs(),
                    sealed: keys.seal(&tenant, name, value.as_bytes()),
                };
                let bytes = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
                let only_if_absent = WriteOpts {
                    expect: Some(0),
                    quota: u64::MAX,
                    ..WriteOpts::default()
                };
                let w = self
                    .backend
                    .set(&ns(&tenant), name, bytes.into(), only_if_absent)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Written::Done(_) = w {
                    n += 1;
                    let any = WriteOpts {
                        quota: u64::MAX,
                        ..WriteOpts::default()
                    };
                    self.backend
                        .set(INDEX, &tenant, bytes::Bytes::new(), any)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(n)
    }

    /// Opens a tenant's secrets again (after a change, here or on another node). The
    /// cached values serve until the new ones are read.
    pub async fn refresh(&self, tenant: &str) -> Result<(), String> {
        let map = Arc::new(self.read(tenant).await?);
        self.open.insert(tenant.to_string(), map);
        Ok(())
    }

    /// Opens every tenant's secrets into memory; how many tenants have some.
    pub async fn load_all(&self) -> Result<usize, String> {
        let tenants = self.tenants().await?;
        for t in &tenants {
            self.refresh(t).await?;
        }
        Ok(tenants.len())
    }

    /// Tenants with secrets.
    pub async fn tenants(&self) -> Result<Vec<String>, String> {
        all_keys(&*self.backend, INDEX)
            .await
            .map_err(|e| e.to_string())
    }

    /// Deletes a secret; whether it existed.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<bool, String> {
        let existed = self
            .backend
            .get(&ns(tenant), name)
            .await
            .map_err(|e| e.to_string())?
            .is_some();
        self.backend
            .delete(&ns(tenant), name, None)
            .await
            .map_err(|e| e.to_string())?;
        self.refresh(tenant).await?;
        Ok(existed)
    }

    /// A tenant's sealed secrets, with their versions.
    async fn entries(&self, tenant: &str) -> Result<Vec<(String, Stored, u64)>, StateError> {
        let ns = ns(tenant);
        let mut out = Vec::new();
        for k in all_keys(&*self.backend, &ns).await? {
            if let Some(e) = self.backend.get(&ns, &k).await? {
                if let Ok(s) = serde_json::from_slice::<Stored>(&e.value) {
                    out.push((k, s, e.version));
                }
            }
        }
        Ok(out)
    }

    pub async fn list(&self, tenant: &str) -> Result<Vec<Listed>, String> {
        Ok(self
            .entries(tenant)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(name, s, _)| Listed {
                name,
                updated_at: s.updated_at,
            })
            .collect())
    }

    /// A tenant's secrets in clear (cached until one changes). A secret that does not open
    /// is left out and logged by name.
    pub async fn values(&self, tenant: &str) -> Result<Arc<BTreeMap<String, String>>, String> {
        if let Some(v) = self.open.get(tenant) {
            return Ok(v.clone());
        }
        let map = Arc::new(self.read(tenant).await?);
        self.open.insert(tenant.to_string(), map.clone());
        Ok(map)
    }

    async fn read(&self, tenant: &str) -> Result<BTreeMap<String, String>, String> {
        let keys = self.keys();
        let mut map = BTreeMap::new();
        for (name, s, _) in self.entries(tenant).await.map_err(|e| e.to_string())? {
            match keys.open(tenant, &name, &s.sealed) {
                Ok(v) => {
                    map.insert(name, String::from_utf8_lossy(&v).into_owned());
                }
                Err(e) => tracing::error!(tenant, secret = %name, "secret does not open: {e}"),
            }
        }
        Ok(map)
    }

    /// The cached values only (the request path: never waits for the store).
    pub fn cached(&self, tenant: &str) -> Option<Arc<BTreeMap<String, String>>> {
        self.open.get(tenant).map(|v| v.clone())
    }

    /// A new key, then every secret re-sealed with it. Rotations take turns. The keys
    /// change on disk first — the current key joins `secret.key.previous`, the new one
    /// replaces `secret.key` — and only then is anything sealed with the new one, so a
    /// crash at any point leaves every secret openable (sealed with the new key or with
    /// one still kept). A secret that changes meanwhile keeps its new value (each
    /// re-seal is a compare-and-swap). Refused when the key comes from the environment:
    /// rotate it there (set the new key, keep the old one in `secret.key.previous` until
    /// the secrets are set again). Answers how many were re-sealed, and the secrets that
    /// no kept key opens (named `tenant/NAME`; they were lost before).
    pub async fn rotate(&self) -> Result<(usize, Vec<String>), String> {
        let _one_at_a_time = self.rotating.lock().await;
        let old = self.keys();
        let Some(file) = old.file.clone() else {
            return Err(format!(
                "the key comes from {KEY_ENV} or the cluster key; rotate it there"
            ));
        };
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let err = |e: std::io::Error| e.to_string();
        let prev_path = dir.join("secret.key.previous");
        let current = std::fs::read_to_string(&file).map_err(err)?;
        let mut kept: Vec<String> = std::fs::read_to_string(&prev_path)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if !kept.iter().any(|k| k == current.trim()) {
            kept.push(current.trim().to_string());
        }
        write_private(&prev_path, &(kept.join("\n") + "\n")).map_err(err)?;
        write_private(&file, &B64.encode(random_key())).map_err(err)?;
        let keys = Arc::new(Keyring::load(&dir).map_err(|e| e.to_string())?);
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys.clone();

        let sealed_now = format!("wg1:{}:", keys.current.id);
        let (mut resealed, mut unreadable) = (0, Vec::new());
        for t in &self.tenants().await? {
            for (name, s, version) in self.entries(t).await.map_err(|e| e.to_string())? {
                if s.sealed.starts_with(&sealed_now) {
                    continue;
                }
                let value = match keys.open(t, &name, &s.sealed) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(tenant = %t, secret = %name, "rotation: secret does not open: {e}");
                        unreadable.push(format!("{t}/{name}"));
                        continue;
                    }
                };
                let stored = Stored {
                    updated_at: s.updated_at,
                    sealed: keys.seal(t, &name, &value),
                };
                let bytes = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
                let opts = WriteOpts {
                    expect: Some(version),
                    quota: u64::MAX,
                    ..WriteOpts::default()
                };
                // a conflict: set meanwhile, with a key that is kept
                if let Written::Done(_) = self
                    .backend
                    .set(&ns(t), &name, bytes.into(), opts)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    resealed += 1;
                }
            }
        }
        Ok((resealed, unreadable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_tenant_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::load(dir.path()).unwrap();
        let sealed = keys.seal("acme", "API_KEY", b"v4lue");
        assert!(sealed.starts_with("wg1:") && !sealed.contains("v4lue"));
        assert_eq!(keys.open("acme", "API_KEY", &sealed).unwrap(), b"v4lue");
        assert!(
            keys.open("other", "API_KEY", &sealed).is_err(),
            "moved to another tenant"
        );
        assert!(keys.open("acme", "OTHER", &sealed).is_err(), "renamed");
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(keys.open("acme", "API_KEY", &tampered).is_err());
        // the key file is private and is the same key on the next start
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secret.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Keyring::load(dir.path()).unwrap();
        assert_eq!(again.open("acme", "API_KEY", &sealed).unwrap(), b"v4lue");
    }

    #[test]
    fn placeholders_are_replaced_escaped_and_a_missing_secret_is_named() {
        let mut v = BTreeMap::new();
        v.insert("K".to_string(), "a\"b\\c".to_string());
        let out = substitute(br#"{"key":"{{secret:K}}","n":1}"#, Some(&v)).unwrap();
        assert_eq!(out, br#"{"key":"a\"b\\c","n":1}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["key"], "a\"b\\c");
        let e = substitute(b"{{secret:NOPE}}", Some(&v)).unwrap_err();
        assert!(e.contains("`NOPE`"), "{e}");
        assert!(substitute(b"{{secret:K", Some(&v)).is_err());
        assert_eq!(substitute(b"plain", None).unwrap(), b"plain");
        assert!(!names_secrets(b"plain") && names_secrets(b"x{{secret:K}}"));
    }

    fn secrets_in(dir: &Path) -> Arc<Secrets> {
        let backend =
            Arc::new(super::super::embedded::Embedded::open(&dir.join("s.redb")).unwrap());
        Secrets::new(backend, Keyring::load(dir).unwrap())
    }

    /// Rotations at once take turns, and one cut short at any point (as by a crash)
    /// leaves every secret openable by a gateway that starts from the files.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotations_at_once_or_cut_short_lose_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let s = secrets_in(dir.path());
        for i in 0..30 {
            s.set(
                &format!("t{}", i % 3),
                &format!("S{i}"),
                &format!("value-{i}"),
            )
            .await
            .unwrap();
        }
        let all = futures::future::join_all((0..4).map(|_| s.rotate())).await;
        for r in &all {
            assert!(r.as_ref().unwrap().1.is_empty(), "{r:?}");
        }
        for cut in [50u64, 200, 1000, 3000] {
            let _ = tokio::time::timeout(Duration::from_micros(cut), s.rotate()).await;
        }
        drop(s);
        // a new start: keys from the files, secrets from the store
        let again = secrets_in(dir.path());
        for t in 0..3 {
            let values = again.values(&format!("t{t}")).await.unwrap();
            assert_eq!(values.len(), 10, "tenant t{t}: {values:?}");
        }
        assert_eq!(again.values("t1").await.unwrap()["S1"], "value-1");
    }
}
