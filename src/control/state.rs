//! Admin actions on tenant state: the key-value store (for debugging a tenant's data) and
//! secrets (set, list by name, delete; never read back), and the key rotation.

use super::{ApiError, ApiResult, Control};
use crate::state::{secrets, Page, Services, StateError, Written};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        let status = match e {
            StateError::Unavailable(_) => 503,
            StateError::RateLimited => 429,
            StateError::OverQuota(_) | StateError::ValueTooLarge(_) => 413,
            StateError::BadKey(_) | StateError::NotANumber => 400,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// The answer to key change `op` of tenant `t`: when done, logged (without its value) and
/// answered with the key and `answer` (given the new version); 409 when the key was not at
/// the version the caller expected.
fn changed(
    written: Written,
    (t, key, by): (&str, &str, &str),
    op: &str,
    answer: impl FnOnce(u64) -> Value,
) -> ApiResult<Value> {
    match written {
        Written::Done(v) => {
            tracing::info!(tenant = t, key, by, op, "admin: kv change");
            let mut answer = answer(v);
            answer["key"] = key.into();
            Ok(answer)
        }
        Written::Conflict(now) => Err(ApiError::new(
            409,
            "conflict",
            format!("`{key}` is at version {now}"),
        )),
    }
}

fn unavailable(reason: String) -> ApiError {
    ApiError::new(503, "unavailable", reason)
}

impl Control {
    fn services(&self) -> ApiResult<Arc<Services>> {
        self.live
            .wasm
            .state()
            .cloned()
            .ok_or_else(|| unavailable("this gateway has no state store".into()))
    }

    /// `{"found", "value" | "value_base64", "version"}`.
    pub async fn kv_get(&self, t: &str, key: &str) -> ApiResult<Value> {
        let s = self.services()?;
        Ok(match s.store.tenant(t, None).get(key).await? {
            None => json!({ "key": key, "found": false }),
            Some(e) => match std::str::from_utf8(&e.value) {
                Ok(v) => json!({ "key": key, "found": true, "value": v, "version": e.version }),
                Err(_) => json!({
                    "key": key, "found": true, "version": e.version,
                    "value_base64": base64::engine::general_purpose::STANDARD.encode(&e.value),
                }),
            },
        })
    }

    /// Stores `value` (only at `version`, if given); 409 on a conflict.
    pub async fn kv_put(
        &self,
        t: &str,
        key: &str,
        value: Vec<u8>,
        version: Option<u64>,
        ttl: Option<Duration>,
        by: &str,
    ) -> ApiResult<Value> {
        let s = self.services()?;
        let tenant = s.store.tenant(t, None);
        let written = tenant.set(key, Bytes::from(value), version, ttl).await?;
        changed(written, (t, key, by), "put", |v| json!({ "version": v }))
    }

    pub async fn kv_delete(
        &self,
        t: &str,
        key: &str,
        version: Option<u64>,
        by: &str,
    ) -> ApiResult<Value> {
        let s = self.services()?;
        let written = s.store.tenant(t, None).delete(key, version).await?;
        changed(
            written,
            (t, key, by),
            "delete",
            |_| json!({ "deleted": true }),
        )
    }

    pub async fn kv_list(
        &self,
        t: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> ApiResult<Value> {
        let s = self.services()?;
        let kv = s.store.tenant(t, None);
        // one more than asked tells whether there are more
        let limit = limit.clamp(1, 999);
        let mut keys = kv.list(Page::new(prefix, after, limit + 1)).await?;
        let more = keys.len() > limit;
        keys.truncate(limit);
        let bytes = kv.bytes_used().await?;
        Ok(json!({ "keys": keys, "more": more, "bytes_stored": bytes }))
    }

    /// Sets a secret, then gives the tenant's filters that name it their new
    /// configuration (functions read it on their next request).
    pub async fn secret_set(
        &self,
        t: &str,
        name: &str,
        value: &[u8],
        by: &str,
    ) -> ApiResult<Value> {
        let s = self.services()?;
        let value = std::str::from_utf8(value)
            .map_err(|_| ApiError::new(400, "bad_secret", "a secret is UTF-8 text"))?
            .trim_end_matches(['\n', '\r']);
        if !secrets::valid_name(name) || value.len() > secrets::MAX_VALUE {
            return Err(ApiError::new(
                400,
                "bad_secret",
                format!(
                    "a secret's name is 1 to {} letters, digits, `_`, `-` or `.`, its value at most {} bytes",
                    secrets::MAX_NAME,
                    secrets::MAX_VALUE
                ),
            ));
        }
        // the store did not answer: the write may or may not have reached it
        s.secrets.set(t, name, value).await.map_err(|e| {
            unavailable(format!(
                "{e} (if the store received it before failing, the secret is set: list to check)"
            ))
        })?;
        tracing::info!(tenant = t, secret = name, by, "admin: secret set");
        self.announce_secrets(t).await;
        let stale = self.reconfigure_filters(t);
        Ok(json!({ "tenant": t, "secret": name, "set": true, "filters_not_reconfigured": stale }))
    }

    /// Deletes a secret, unless a filter's configuration names it: a running filter
    /// would keep the value it was configured with, and fail to load on the next start.
    /// (To revoke a leaked value, set a new one: the filters are reconfigured with it.)
    pub async fn secret_delete(&self, t: &str, name: &str, by: &str) -> ApiResult<Value> {
        let s = self.services()?;
        let users: Vec<String> = self
            .tenant_filters(t)
            .iter()
            .filter(|p| secrets::names_secret(&p.spec.config, name))
            .map(|p| p.spec.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(super::in_use(
"secret_in_use",
                format!(
                    "secret `{name}` is named by the configuration of {}; change or remove them first (to replace a leaked value, set a new one)",
                    users.join(", ")
                ),
            ));
        }
        let existed = s.secrets.delete(t, name).await.map_err(unavailable)?;
        if !existed {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("secret `{name}` is not set"),
            ));
        }
        tracing::info!(tenant = t, secret = name, by, "admin: secret deleted");
        self.announce_secrets(t).await;
        let stale = self.reconfigure_filters(t);
        Ok(
            json!({ "tenant": t, "secret": name, "deleted": true, "filters_not_reconfigured": stale }),
        )
    }

    /// Names and update times; never values.
    pub async fn secret_list(&self, t: &str) -> ApiResult<Value> {
        let s = self.services()?;
        let list = s.secrets.list(t).await.map_err(unavailable)?;
        Ok(json!({ "tenant": t, "secrets": list }))
    }

    /// A new secret key; every secret re-sealed with it.
    pub async fn rotate_secret_key(&self, by: &str) -> ApiResult<Value> {
        let s = self.services()?;
        let (n, unreadable) = s
            .secrets
            .rotate()
            .await
            .map_err(|e| ApiError::new(409, "cannot_rotate", e))?;
        tracing::info!(
            by,
            resealed = n,
            unreadable = unreadable.len(),
            "admin: secret key rotated"
        );
        Ok(json!({ "rotated": true, "resealed": n, "unreadable": unreadable }))
    }

    /// Gives every filter of tenant `t` whose configuration names a secret its
    /// configuration with the secrets as they are now. A filter whose configuration names
    /// a secret that is gone keeps the configuration it had: it is listed (and logged).
    pub(super) fn reconfigure_filters(&self, t: &str) -> Vec<String> {
        let wasm = &self.live.wasm;
        let mut stale = Vec::new();
        for p in self.tenant_filters(t) {
            if !secrets::names_secrets(&p.spec.config) {
                continue;
            }
            match wasm.configuration(t, &p.spec.config) {
                Ok(config) => p.reconfigure(config),
                Err(e) => {
                    tracing::error!(tenant = t, module = %p.spec.name, "filter keeps its configuration: {e}");
                    stale.push(p.spec.name.clone());
                }
            }
        }
        stale
    }

    /// Tenant `t`'s filters: deployed ones and the conf's.
    fn tenant_filters(&self, t: &str) -> Vec<Arc<crate::wasm::Plugin>> {
        let mut plugins: Vec<Arc<crate::wasm::Plugin>> = self
            .plugins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((tenant, _), _)| tenant == t)
            .filter_map(|(_, i)| match &i.deployed {
                super::Deployed::Filter(p) => Some(p.clone()),
                super::Deployed::Function(_) => None,
            })
            .collect();
        plugins.extend(
            self.live
                .load()
                .plugins
                .values()
                .filter(|p| p.spec.tenant == t)
                .cloned(),
        );
        plugins
    }
}
