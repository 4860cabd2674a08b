//! Tenant tokens: HS256 JWTs signed with the gateway's own secret (created on first start
//! in `data_dir/admin.key`, readable only by its owner). Claims: `sub` (the tenant),
//! `ops` (deploy, logs, usage), `exp`, `jti` (for revocation).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const OPS: [&str; 3] = ["deploy", "logs", "usage"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub ops: Vec<String>,
    pub exp: u64,
    pub jti: String,
}

pub fn load_or_create_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    if let Ok(s) = std::fs::read(path) {
        if s.len() >= 32 {
            return Ok(s);
        }
    }
    use ring::rand::SecureRandom;
    let mut key = vec![0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    std::fs::write(path, &key)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(key)
}

pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Checks signature and expiry; the reason is safe to show the caller.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<Claims, &'static str> {
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed token");
    };
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| "malformed token")?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, format!("{head}.{body}").as_bytes(), &sig)
        .map_err(|_| "bad signature")?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("malformed claims")?;
    if now >= claims.exp {
        return Err("token expired");
    }
    Ok(claims)
}

/// Constant-time comparison for the operator token.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_fail_for_the_right_reasons() {
        let c = Claims {
            sub: "acme".into(),
            ops: vec!["deploy".into()],
            exp: 100,
            jti: "j1".into(),
        };
        let t = sign(b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1", &c);
        assert_eq!(verify(b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1", &t, 99), Ok(c));
        assert_eq!(
            verify(b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1", &t, 100),
            Err("token expired")
        );
        assert_eq!(
            verify(b"other-secret-other-secret-000000", &t, 1),
            Err("bad signature")
        );
        assert_eq!(verify(b"k", "a.b", 1), Err("malformed token"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
