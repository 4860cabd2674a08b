//! JWT (HS256) verification: checks `authorization: Bearer <jwt>` against the shared
//! secret in the plugin configuration, rejects expired tokens, and passes the token's
//! `sub` upstream as `x-user`. Failures answer 401 with the reason.
//!
//! Plugin configuration (JSON): `{"secret": "…", "leeway_secs": 0}`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use serde::Deserialize;
use sha2::Sha256;
use std::rc::Rc;

#[derive(Deserialize)]
struct ConfigFile {
    secret: String,
    #[serde(default)]
    leeway_secs: u64,
}

struct Config {
    /// The HMAC keyed once (its inner and outer pads hashed) and cloned per request.
    mac: Hmac<Sha256>,
    leeway_secs: u64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let keyed = serde_json::from_slice::<ConfigFile>(&bytes)
            .ok()
            .filter(|c| !c.secret.is_empty())
            .and_then(|c| {
                Some((
                    Hmac::<Sha256>::new_from_slice(c.secret.as_bytes()).ok()?,
                    c.leeway_secs,
                ))
            });
        match keyed {
            Some((mac, leeway_secs)) => {
                self.config = Some(Rc::new(Config { mac, leeway_secs }));
                true
            }
            _ => {
                log::error!("jwt-auth: configuration needs a non-empty \"secret\"");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Jwt {
            config: self.config.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Jwt {
    config: Rc<Config>,
}

impl Context for Jwt {}

impl Jwt {
    fn verify(&self, now: u64) -> Result<Claims, &'static str> {
        let h = self
            .get_http_request_header("authorization")
            .ok_or("missing_token")?;
        let token = h.strip_prefix("Bearer ").ok_or("not_a_bearer_token")?;
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed_token");
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(head)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("malformed_token")?;
        if header.alg != "HS256" {
            return Err("unsupported_alg");
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| "malformed_token")?;
        let mut mac = self.config.mac.clone();
        mac.update(head.as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        mac.verify_slice(&sig).map_err(|_| "bad_signature")?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("malformed_claims")?;
        let leeway = self.config.leeway_secs;
        if claims.exp.is_some_and(|exp| now > exp + leeway) {
            return Err("token_expired");
        }
        if claims.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err("token_not_yet_valid");
        }
        Ok(claims)
    }
}

impl HttpContext for Jwt {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let now = self
            .get_current_time()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match self.verify(now) {
            Ok(claims) => {
                // never trust an x-user header the client sent itself
                self.set_http_request_header("x-user", claims.sub.as_deref());
                Action::Continue
            }
            Err(reason) => {
                self.send_http_response(
                    401,
                    vec![
                        ("content-type", "application/json"),
                        ("www-authenticate", "Bearer"),
                    ],
                    Some(format!("{{\"error\":\"{reason}\"}}").as_bytes()),
                );
                Action::Pause
            }
        }
    }
}
