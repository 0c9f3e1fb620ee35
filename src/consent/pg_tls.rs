//! TLS to PostgreSQL (`consent.postgres.sslmode`, `consent.postgres.ca_file`):
//! rustls with the aws-lc-rs provider, as every other TLS in consentgate.
//!
//! - `disable`: plain TCP (the default, as before TLS was supported).
//! - `require`: encrypted, the server's certificate not verified (as libpq's
//!   `require`): protects against a passive listener, not against someone who
//!   can redirect the connection. The handshake signature is still checked, and
//!   SCRAM channel binding (`tls-server-end-point`) is offered, so with password
//!   authentication a man in the middle still fails to log in.
//! - `verify-full`: the chain is verified against `ca_file` (else the Mozilla
//!   roots of `webpki-roots`) and the host name of the URL against the
//!   certificate, as libpq's `verify-full`.
//!
//! The connector is handed to tokio-postgres for every connection (feed,
//! writers, `db migrate`); with `disable` tokio-postgres never calls it.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;

pub(crate) use crate::model::PgSslMode;

/// The TLS connector for tokio-postgres (`None`: TLS off).
#[derive(Clone)]
pub(crate) struct PgTls {
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("enabled", &self.config.is_some())
            .finish()
    }
}

impl PgTls {
    /// Build the connector for `mode`; `ca_file` (PEM) is the trust anchor of
    /// `verify-full`. Errors name `consent.postgres.ca_file`.
    pub(crate) fn new(mode: PgSslMode, ca_file: Option<&Path>) -> Result<PgTls, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("consent.postgres TLS: {e}"))?;
        let mut config = match mode {
            PgSslMode::Disable => return Ok(PgTls { config: None }),
            PgSslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
            PgSslMode::VerifyFull => {
                let mut roots = RootCertStore::empty();
                match ca_file {
                    Some(path) => {
                        let err =
                            |e: String| format!("consent.postgres.ca_file {}: {e}", path.display());
                        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
                        let certs = CertificateDer::pem_slice_iter(&pem)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| err(format!("not PEM: {e}")))?;
                        if certs.is_empty() {
                            return Err(err("no CERTIFICATE in the file".into()));
                        }
                        for c in certs {
                            roots
                                .add(c)
                                .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
                        }
                    }
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        // PostgreSQL 17's direct TLS negotiation requires this ALPN; older
        // servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(PgTls {
            config: Some(Arc::new(config)),
        })
    }

    #[cfg(test)]
    pub(crate) fn enabled(&self) -> bool {
        self.config.is_some()
    }
}

/// `require`: any certificate is accepted, but the handshake must still be
/// signed by the key of the certificate presented.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl MakeTlsConnect<Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        // Called for every connection, TLS or not: problems surface in
        // `connect`, which only runs when TLS is used.
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain.to_string()).ok(),
        })
    }
}

pub(crate) struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: Option<ServerName<'static>>,
}

impl TlsConnect<Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<PgTlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS to the database is disabled"))?;
            let name = self.name.ok_or_else(|| {
                io::Error::other("the database host is not a valid TLS server name")
            })?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(s))
        })
    }
}

pub(crate) struct PgTlsStream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for PgTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for PgTlsStream {
    /// `tls-server-end-point` (RFC 5929 §4.1): the hash of the server's
    /// certificate, with the hash of its signature algorithm (SHA-256 for MD5
    /// and SHA-1). A certificate whose algorithm names no single hash (e.g.
    /// Ed25519, RSA-PSS) gets no binding, which SCRAM then does without.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        match end_point_hash(cert) {
            Some(h) => ChannelBinding::tls_server_end_point(h),
            None => ChannelBinding::none(),
        }
    }
}

fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let oid = parsed.signature_algorithm.algorithm.to_id_string();
    let hash = match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert).to_vec(),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert).to_vec(),
        // md5/sha1/sha224/sha256 with RSA, ecdsa-with-SHA1/SHA224/SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.14"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.1"
        | "1.2.840.10045.4.3.2" => sha2::Sha256::digest(cert).to_vec(),
        _ => return None,
    };
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(
            PgSslMode::parse("verify-full").unwrap(),
            PgSslMode::VerifyFull
        );
        assert_eq!(PgSslMode::parse("require").unwrap(), PgSslMode::Require);
        assert!(PgSslMode::parse("prefer")
            .unwrap_err()
            .contains("plain text"));
        assert!(PgSslMode::parse("bogus").is_err());
    }

    #[test]
    fn ca_file_errors_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.pem");
        std::fs::write(&p, "not a certificate").unwrap();
        let e = PgTls::new(PgSslMode::VerifyFull, Some(&p)).unwrap_err();
        assert!(e.contains("consent.postgres.ca_file"), "{e}");
        assert!(PgTls::new(PgSslMode::VerifyFull, None).unwrap().enabled());
        assert!(!PgTls::new(PgSslMode::Disable, None).unwrap().enabled());
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(end_point_hash(cert.der()).unwrap().len(), 48);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            end_point_hash(cert.der()).unwrap(),
            sha2::Sha256::digest(cert.der()).to_vec()
        );
    }
}
