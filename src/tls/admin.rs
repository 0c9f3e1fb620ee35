//! The admin API's own TLS (SPEC §8 `admin.tls: {cert, key, client_ca}`): a
//! server certificate and key from PEM files, TLS 1.2 and 1.3 only (rustls,
//! aws-lc-rs), and with `client_ca` mutual TLS: a client without a certificate
//! signed by that CA does not complete the handshake. Every problem with these
//! files is reported naming its key, by `check` and at start.

use crate::config::AdminTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// Larger than any certificate chain or key an operator would configure;
/// refusing bigger files keeps a wrong path (a log, a disk image) from being read whole.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read_pem(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("admin.tls.{key}: {shown}: {e}"))?
        .len();
    if len > MAX_PEM_BYTES {
        return Err(format!(
            "admin.tls.{key}: {shown}: {len} bytes, more than a PEM file of certificates or a key holds"
        ));
    }
    std::fs::read(path).map_err(|e| format!("admin.tls.{key}: {shown}: {e}"))
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("admin.tls.{key}: {}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "admin.tls.{key}: {}: no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The rustls server configuration for the admin listener.
pub(crate) fn server_config(tls: &AdminTls) -> Result<Arc<ServerConfig>, String> {
    let certs = certificates("cert", &tls.cert)?;
    let key_pem = read_pem("key", &tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "admin.tls.key: {}: no usable private key (expected PEM \"PRIVATE KEY\", \
             \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\"): {e}",
            tls.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("admin.tls: {e}"))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("client_ca", ca)? {
                roots.add(c).map_err(|e| {
                    format!(
                        "admin.tls.client_ca: {}: not a usable CA certificate: {e}",
                        ca.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("admin.tls.client_ca: {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "admin.tls.key: {} does not go with admin.tls.cert {}: {e}",
            tls.key.display(),
            tls.cert.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
