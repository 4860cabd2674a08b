//! Tenant tokens: HS256 JWTs signed with the gateway's own secret (created on first start
//! in `data_dir/admin.key`, readable only by its owner). Claims: `sub` (the tenant),
//! `ops` (deploy, logs, usage), `exp`, `jti` (for revocation).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use subtle::ConstantTimeEq;

pub const OPS: [&str; 5] = ["deploy", "logs", "usage", "kv", "secrets"];

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

fn validation() -> Validation {
    // expiry is checked here against the caller's clock, to the second and without leeway
    let mut v = Validation::new(Algorithm::HS256);
    v.validate_exp = false;
    v.leeway = 0;
    v
}

pub fn sign(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

/// Checks signature and expiry; the reason is safe to show the caller.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<Claims, &'static str> {
    use jsonwebtoken::errors::ErrorKind;
    let claims =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation())
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => "malformed claims",
                _ => "malformed token",
            })?
            .claims;
    if now >= claims.exp {
        return Err("token expired");
    }
    Ok(claims)
}

/// Constant-time comparison of secrets (the operator token).
pub fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
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

    /// A token signed before `jsonwebtoken` (header `{"alg":"HS256","typ":"JWT"}` in that
    /// order, HMAC-SHA256 over `head.body` with the same secret) still verifies.
    #[test]
    fn tokens_issued_before_still_verify() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let secret = b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1";
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD
            .encode(br#"{"sub":"acme","ops":["deploy","logs"],"exp":1000,"jti":"j2"}"#);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = ring::hmac::sign(&key, format!("{head}.{body}").as_bytes());
        let old = format!("{head}.{body}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        let c = verify(secret, &old, 999).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.exp, c.jti.as_str()),
            ("acme", 1000, "j2")
        );
        assert_eq!(c.ops, ["deploy", "logs"]);
        assert_eq!(verify(secret, &old, 1000), Err("token expired"));
        // and new tokens are the same kind: HS256, the same claim names
        let new = sign(secret, &c);
        let claims = URL_SAFE_NO_PAD
            .decode(new.split('.').nth(1).unwrap())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(v["sub"], "acme");
        assert_eq!(v["jti"], "j2");
        let h = URL_SAFE_NO_PAD
            .decode(new.split('.').next().unwrap())
            .unwrap();
        let h: serde_json::Value = serde_json::from_slice(&h).unwrap();
        assert_eq!(h["alg"], "HS256");
        // a token that says another algorithm is refused, whatever its signature
        let none = format!(
            "{}.{body}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
        );
        assert!(verify(secret, &none, 1).is_err());
    }
}
