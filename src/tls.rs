//! TLS material: certificates chosen by SNI for listeners, CA bundles for upstreams.

use crate::config::ListenerTls;
use pingora::listeners::tls::TlsSettings;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Picks a certificate by the client's SNI: exact name, then `*.suffix`, then the first.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    pub fn new(tls: &ListenerTls) -> Result<SniResolver, String> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for c in &tls.certs {
            let key = Arc::new(load_certified_key(&c.cert, &c.key)?);
            default.get_or_insert_with(|| key.clone());
            for name in &c.sni {
                match name.strip_prefix('*') {
                    Some(suffix) => wildcard.insert(suffix.to_string(), key.clone()),
                    None => exact.insert(name.clone(), key.clone()),
                };
            }
        }
        Ok(SniResolver {
            exact,
            wildcard,
            default: default.ok_or("no certificate")?,
        })
    }

    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = name {
            let name = name.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return k.clone();
            }
            if let Some(dot) = name.find('.') {
                if let Some(k) = self.wildcard.get(&name[dot..]) {
                    return k.clone();
                }
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Reads a PEM certificate chain and private key into a signing key, with a clear error.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    pingora::tls::install_default_crypto_provider();
    let certs = read_pem(cert)?
        .into_iter()
        .filter_map(|i| match i {
            rustls_pemfile::Item::X509Certificate(c) => Some(c),
            _ => None,
        })
        .collect::<Vec<_>>();
    if certs.is_empty() {
        return Err(format!("no certificate found in `{}`", cert.display()));
    }
    let key_der = read_pem(key)?
        .into_iter()
        .find_map(|i| match i {
            rustls_pemfile::Item::Pkcs8Key(k) => Some(k.into()),
            rustls_pemfile::Item::Pkcs1Key(k) => Some(k.into()),
            rustls_pemfile::Item::Sec1Key(k) => Some(k.into()),
            _ => None,
        })
        .ok_or_else(|| format!("no private key found in `{}`", key.display()))?;
    let provider =
        rustls::crypto::CryptoProvider::get_default().ok_or("no TLS crypto provider installed")?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("private key `{}` is not usable: {e}", key.display()))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// Reads a CA bundle for verifying an upstream.
pub fn load_ca(path: &Path) -> Result<Arc<pingora::protocols::tls::CaType>, String> {
    use pingora::utils::tls::WrappedX509;
    let certs: Vec<WrappedX509> = read_pem(path)?
        .into_iter()
        .filter_map(|i| match i {
            rustls_pemfile::Item::X509Certificate(c) => Some(WrappedX509::new(
                c.to_vec(),
                pingora::utils::tls::parse_x509,
            )),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(format!("no CA certificate found in `{}`", path.display()));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

fn read_pem(path: &Path) -> Result<Vec<rustls_pemfile::Item>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    rustls_pemfile::read_all(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not valid PEM: {e}", path.display()))
}

/// Listener TLS settings: SNI-selected certificates, ALPN h2 when asked.
pub fn listener_settings(tls: &ListenerTls) -> Result<TlsSettings, String> {
    let resolver = SniResolver::new(tls)?;
    // The resolver supplies the certificates.
    let mut settings = TlsSettings::with_callbacks(Box::new(KeepFacts))
        .map_err(|e| format!("TLS settings: {e}"))?;
    settings.set_cert_resolver(Arc::new(resolver));
    if tls.http2 {
        settings.enable_h2();
    }
    Ok(settings)
}

/// What the gateway keeps of a client connection's TLS handshake, attached to the
/// session's TLS digest: its id and the facts guests read as `connection.*`.
#[derive(Debug)]
pub struct TlsFacts {
    pub id: u64,
    pub tls: Arc<crate::wasm::ConnTls>,
}

/// Records [`TlsFacts`] when a handshake completes. Listeners request no client
/// certificates, so none is ever presented (`connection.mtls` is false).
struct KeepFacts;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for KeepFacts {
    async fn handshake_complete_callback(
        &self,
        ssl: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        Some(Arc::new(TlsFacts {
            id: crate::proxy::conn::next_connection_id(),
            tls: Arc::new(crate::wasm::ConnTls {
                version: tls_version_name(ssl.version().unwrap_or_default()),
                sni: ssl.server_name().map(str::to_string),
                peer_cert: ssl.peer_certificate_der().is_some(),
                uri_san: None,
            }),
        }))
    }
}

/// A TLS version as Envoy (and OpenSSL) names it, `TLSv1.3`: rustls says `TLSv1_3`.
pub fn tls_version_name(v: &str) -> String {
    v.replace('_', ".")
}
