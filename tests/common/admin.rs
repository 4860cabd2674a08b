//! The admin API as tests call it: the operator's token, tenant tokens, deploys.

use super::Gw;
use serde_json::Value;

/// The operator token test confs set in `[admin] token`.
pub const OP: &str = "operator-secret-for-tests";

/// A client of one gateway's admin API.
pub struct Admin {
    pub base: String,
    pub c: reqwest::Client,
}

impl Admin {
    pub fn new(gw: &Gw) -> Admin {
        Admin {
            base: gw.url("admin", ""),
            // a deploy compiles: a JavaScript or Python component takes seconds
            c: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.c.request(m, format!("{}{path}", self.base)).body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.unwrap();
        let s = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn json(&self, method: &str, path: &str, token: &str, v: Value) -> (u16, Value) {
        self.call(method, path, Some(token), v.to_string().into_bytes())
            .await
    }

    pub async fn token(&self, tenant: &str, ops: &[&str]) -> String {
        let (s, v) = self
            .json(
                "POST",
                &format!("/v1/tenants/{tenant}/tokens"),
                OP,
                serde_json::json!({ "ops": ops }),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    pub async fn tenant(&self, name: &str, limits: Value) {
        let (s, v) = self
            .json(
                "POST",
                "/v1/tenants",
                OP,
                serde_json::json!({ "name": name, "limits": limits }),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }

    pub async fn deploy(
        &self,
        tenant: &str,
        module: &str,
        token: &str,
        bytes: Vec<u8>,
    ) -> (u16, Value) {
        self.call(
            "PUT",
            &format!("/v1/tenants/{tenant}/modules/{module}"),
            Some(token),
            bytes,
        )
        .await
    }
}

/// A module answering every request with a fixed body.
pub fn fixed_answer(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 64) "{body}")
          (func (export "proxy_abi_version_0_2_1"))
          (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
          (func (export "proxy_on_context_create") (param i32 i32))
          (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 64) (i32.const {len}) (i32.const 0) (i32.const 0) (i32.const -1)))
            (i32.const 1)))"#,
        len = body.len()
    ))
    .unwrap()
}
