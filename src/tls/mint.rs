//! On-the-fly leaf certificates for intercepted hosts, and the TLS accept side.
//!
//! Design: rustls's `ResolvesServerCert` is synchronous while minting is not
//! free, so the accept path uses `tokio_rustls::LazyConfigAcceptor`: it reads
//! the ClientHello, takes the SNI (or the caller's fallback host, e.g. the
//! CONNECT authority), fetches or mints the host's entry, then completes the
//! handshake with that host's own `ServerConfig`. The cache entry holds both
//! the `CertifiedKey` and the ready-built `Arc<ServerConfig>` (a resolver that
//! always answers the host's key), so a cached handshake only clones an `Arc`.
//! All per-host configs share one TLS session store (rustls refuses to resume
//! a session whose SNI differs, so sharing is safe) and are built with an
//! explicit aws-lc-rs provider, never the process default.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{Acceptor, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::ca::{random_serial, LoadedCa};

/// Leaf validity after `notBefore`'s backdating: about a day.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// `notBefore` is set this far in the past, for clients with a slow clock.
const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// How long a minted leaf is served from the cache; well below its validity,
/// so a served certificate always has at least 12 hours left.
const CACHE_TTL: Duration = Duration::from_secs(12 * 3600);
/// Default maximum number of hosts kept in the cache.
const DEFAULT_CACHE_CAPACITY: u64 = 10_000;
/// Time allowed for reading the ClientHello and completing the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// ALPN protocols offered to intercepted clients, in server preference order.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Callback fed with the duration of every mint (for a histogram).
pub(crate) type MintObserver = Arc<dyn Fn(Duration) + Send + Sync>;
/// Callback told about every certificate that could not be minted
/// (`consentgate_tls_mint_failures_total`).
pub(crate) type MintFailureObserver = Arc<dyn Fn(&MintError) + Send + Sync>;

/// Errors minting a leaf certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MintError {
    #[error("invalid host name for a certificate: {0:?}")]
    InvalidHost(String),
    #[error("minting a certificate for {host}: {reason}")]
    Mint { host: String, reason: String },
    #[error(
        "{host} is outside the interception CA's name constraints: make a new CA that \
         permits it (consentgate ca init --force --permit {host}; see the CA rotation \
         procedure in docs/RUNBOOK.md)"
    )]
    NotPermitted { host: String },
}

/// Errors accepting an intercepted TLS connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error("TLS ClientHello has no server name (SNI) and no fallback host was given")]
    NoServerName,
    #[error(transparent)]
    Mint(#[from] MintError),
    #[error("TLS handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake did not complete within {0:?}")]
    Timeout(Duration),
}

/// A failed accept, with the server name the client asked for when it got that
/// far (for the log line: which host the app could not reach).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct HandshakeError {
    /// The ClientHello's SNI, if one was read.
    pub(crate) sni: Option<String>,
    pub(crate) error: AcceptError,
}

impl HandshakeError {
    /// The `reason` label of `consentgate_tls_handshake_failures_total{side="client"}`.
    pub(crate) fn reason(&self) -> &'static str {
        super::handshake::client_reason(&self.error)
    }
}

/// What the cache holds per host.
struct HostEntry {
    key: Arc<CertifiedKey>,
    config: Arc<ServerConfig>,
}

/// Mints, caches and serves leaf certificates signed by the interception CA.
pub struct CertMinter {
    ca: LoadedCa,
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    cache: moka::future::Cache<String, Arc<HostEntry>>,
    minted_total: AtomicU64,
    observer: RwLock<Option<MintObserver>>,
    failure_observer: RwLock<Option<MintFailureObserver>>,
}

impl std::fmt::Debug for CertMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertMinter")
            .field("ca", &self.ca)
            .field("minted_total", &self.minted_total())
            .field("cache_size", &self.cache_size())
            .finish_non_exhaustive()
    }
}

impl CertMinter {
    /// A minter with the default cache capacity ([`DEFAULT_CACHE_CAPACITY`]).
    pub fn new(ca: LoadedCa) -> Self {
        Self::with_capacity(ca, DEFAULT_CACHE_CAPACITY)
    }

    /// A minter caching at most `max_capacity` hosts.
    pub(crate) fn with_capacity(ca: LoadedCa, max_capacity: u64) -> Self {
        CertMinter {
            ca,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            sessions: ServerSessionMemoryCache::new(4096),
            cache: moka::future::Cache::builder()
                .max_capacity(max_capacity)
                .time_to_live(CACHE_TTL)
                .build(),
            minted_total: AtomicU64::new(0),
            observer: RwLock::new(None),
            failure_observer: RwLock::new(None),
        }
    }

    /// Install (or replace) the mint-duration observer.
    pub(crate) fn set_observer(&self, f: MintObserver) {
        let mut guard = self.observer.write().unwrap_or_else(|e| e.into_inner());
        *guard = Some(f);
    }

    /// Install (or replace) the observer of failed mints.
    pub(crate) fn set_failure_observer(&self, f: MintFailureObserver) {
        let mut guard = self
            .failure_observer
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *guard = Some(f);
    }

    /// Leaf certificates minted since start
    /// (`consentgate_tls_certificates_minted_total`).
    pub fn minted_total(&self) -> u64 {
        self.minted_total.load(Ordering::Relaxed)
    }

    /// Hosts currently cached (approximate, as moka's entry count).
    pub(crate) fn cache_size(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The interception CA certificate.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        self.ca.cert_der()
    }

    /// The certificate and key for `host` (a DNS name or an IP literal),
    /// minted on first use and then cached. Concurrent calls for the same
    /// new host mint once; the others wait for that result.
    pub async fn certified_key(&self, host: &str) -> Result<Arc<CertifiedKey>, MintError> {
        Ok(self.entry(host).await?.key.clone())
    }

    async fn entry(&self, host: &str) -> Result<Arc<HostEntry>, MintError> {
        let name = normalize_host(host)?;
        let key = name.cache_key();
        self.cache
            .try_get_with(key, async { self.mint(&name).map(Arc::new) })
            .await
            .map_err(|e: Arc<MintError>| (*e).clone())
    }

    /// Mint, telling the failure observer (and the log) when it fails.
    fn mint(&self, name: &HostName) -> Result<HostEntry, MintError> {
        let r = self.mint_inner(name);
        if let Err(e) = &r {
            tracing::warn!(host = %name.cache_key(), error = %e, "interception certificate not minted");
            let observer = self
                .failure_observer
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(observe) = observer {
                observe(e);
            }
        }
        r
    }

    fn mint_inner(&self, name: &HostName) -> Result<HostEntry, MintError> {
        let started = Instant::now();
        let host = name.cache_key();
        // A leaf the apps would refuse anyway (RFC 5280 name constraints) is not
        // minted: the failure is then counted and logged here, naming the host.
        let permitted = match name {
            HostName::Dns(d) => self.ca.permits_dns(d),
            HostName::Ip(_) => self.ca.permitted_dns().is_none(),
        };
        if !permitted {
            return Err(MintError::NotPermitted { host });
        }
        let fail = |reason: String| MintError::Mint {
            host: host.clone(),
            reason,
        };

        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(format!("key generation: {e}")))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // ub-common-name is 64; clients validate the SAN anyway.
        if host.len() <= 64 {
            dn.push(DnType::CommonName, host.as_str());
        } else {
            dn.push(DnType::CommonName, "consentgate intercepted host");
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            HostName::Dns(dns) => SanType::DnsName(
                dns.as_str()
                    .try_into()
                    .map_err(|e| fail(format!("SAN: {e}")))?,
            ),
            HostName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = now.checked_sub(LEAF_BACKDATE).unwrap_or(now).into();
        params.not_after = (now + LEAF_VALIDITY).into();

        let cert = params
            .signed_by(&leaf_key, self.ca.issuer())
            .map_err(|e| fail(format!("signing: {e}")))?;

        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| fail(format!("loading leaf key: {e}")))?;
        let chain = vec![cert.der().clone(), self.ca.cert_der().clone()];
        let key = Arc::new(CertifiedKey::new(chain, signing_key));

        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| fail(format!("TLS config: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        config.session_storage = self.sessions.clone();

        self.minted_total.fetch_add(1, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(observe) = observer {
            observe(elapsed);
        }
        tracing::debug!(host = %host, elapsed_us = elapsed.as_micros() as u64, "minted interception certificate");
        Ok(HostEntry {
            key,
            config: Arc::new(config),
        })
    }

    /// Accept an intercepted TLS connection on `io`: read the ClientHello,
    /// take its SNI (else `fallback_host`, e.g. the CONNECT authority's host),
    /// present a certificate for that name and complete the handshake
    /// (TLS 1.2/1.3, ALPN `h2` then `http/1.1`). Returns the stream and the
    /// host name used; the negotiated protocol is
    /// `stream.get_ref().1.alpn_protocol()`. Bounded by [`HANDSHAKE_TIMEOUT`].
    ///
    /// When the client sends SNI, it wins over `fallback_host`; callers that
    /// need both to agree compare them on the returned name.
    pub async fn accept<IO>(
        &self,
        io: IO,
        fallback_host: Option<&str>,
    ) -> Result<(TlsStream<IO>, String), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut sni = None;
        let r = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.accept_inner(io, fallback_host, &mut sni),
        )
        .await;
        let error = match r {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => e,
            Err(_) => AcceptError::Timeout(HANDSHAKE_TIMEOUT),
        };
        Err(HandshakeError { sni, error })
    }

    async fn accept_inner<IO>(
        &self,
        io: IO,
        fallback_host: Option<&str>,
        sni_seen: &mut Option<String>,
    ) -> Result<(TlsStream<IO>, String), AcceptError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        // Bounded: rustls accepts only a valid DNS name as SNI.
        sni_seen.clone_from(&sni);
        let requested = match (sni, fallback_host) {
            (Some(s), _) => s,
            (None, Some(f)) => f.to_owned(),
            (None, None) => return Err(AcceptError::NoServerName),
        };
        let name = normalize_host(&requested)?;
        let entry = self.entry(&requested).await?;
        let stream = start.into_stream(entry.config.clone()).await?;
        Ok((stream, name.cache_key()))
    }
}

/// A validated host: DNS name (lower-case, no trailing dot) or IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostName {
    Dns(String),
    Ip(IpAddr),
}

impl HostName {
    fn cache_key(&self) -> String {
        match self {
            HostName::Dns(d) => d.clone(),
            HostName::Ip(ip) => ip.to_string(),
        }
    }
}

/// Validate and normalise a host for a certificate. Accepts `[v6]` brackets
/// and a trailing dot; rejects empty names, wildcards, ports and anything
/// that is not a valid DNS name or IP literal.
fn normalize_host(host: &str) -> Result<HostName, MintError> {
    let invalid = || MintError::InvalidHost(host.chars().take(300).collect());
    let h = host.trim();
    if let Some(inner) = h.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        // Brackets only ever enclose an IPv6 literal.
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => Ok(HostName::Ip(IpAddr::V6(ip))),
            Err(_) => Err(invalid()),
        };
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(HostName::Ip(ip));
    }
    let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    if h.is_empty() || h.len() > 253 || h.contains('*') {
        return Err(invalid());
    }
    match ServerName::try_from(h.as_str()) {
        Ok(ServerName::DnsName(_)) => Ok(HostName::Dns(h)),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ca::{init_ca, load_ca, CaOptions};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::{ClientConfig, RootCertStore};
    use rustls_pki_types::UnixTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsConnector;

    /// A minter whose CA has no name constraints (these tests mint for made-up hosts).
    fn test_minter() -> (Arc<CertMinter>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false, &CaOptions::unconstrained()).unwrap();
        let ca = load_ca(&files.cert, &files.key).unwrap();
        (Arc::new(CertMinter::new(ca)), dir)
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn roots(minter: &CertMinter) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(minter.ca_cert_der().clone()).unwrap();
        Arc::new(roots)
    }

    fn client_config(minter: &CertMinter, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(minter))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    #[tokio::test]
    async fn minted_leaf_verifies_against_ca_with_own_key_and_san() {
        let (minter, _dir) = test_minter();
        let ck = minter.certified_key("graph.facebook.com").await.unwrap();
        assert_eq!(ck.cert.len(), 2, "chain = [leaf, CA]");
        assert_eq!(&ck.cert[1], minter.ca_cert_der());

        let verifier = WebPkiServerVerifier::builder_with_provider(roots(&minter), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from("graph.facebook.com").unwrap();
        verifier
            .verify_server_cert(&ck.cert[0], &ck.cert[1..], &name, &[], UnixTime::now())
            .unwrap();
        let other = ServerName::try_from("evil.example").unwrap();
        assert!(verifier
            .verify_server_cert(&ck.cert[0], &ck.cert[1..], &other, &[], UnixTime::now())
            .is_err());

        let (_, leaf) = x509_parser::parse_x509_certificate(&ck.cert[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ck.cert[1]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            vec![x509_parser::extensions::GeneralName::DNSName(
                "graph.facebook.com"
            )]
        );
        assert_ne!(leaf.public_key().raw, ca.public_key().raw);
        assert_eq!(
            ck.key.public_key().unwrap().as_ref(),
            leaf.public_key().raw,
            "signing key is the leaf's own key"
        );
        assert!(!leaf
            .basic_constraints()
            .unwrap()
            .map(|b| b.value.ca)
            .unwrap_or(false));
        assert!(
            leaf.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .server_auth
        );
        let v = leaf.validity();
        let life = v.not_after.timestamp() - v.not_before.timestamp();
        assert_eq!(life, (LEAF_VALIDITY + LEAF_BACKDATE).as_secs() as i64);
        assert!(CACHE_TTL < LEAF_VALIDITY);
        assert_eq!(minter.minted_total(), 1);
    }

    #[tokio::test]
    async fn ip_literal_gets_ip_san() {
        let (minter, _dir) = test_minter();
        let ck = minter.certified_key("127.0.0.1").await.unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(&minter), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        verifier
            .verify_server_cert(&ck.cert[0], &ck.cert[1..], &name, &[], UnixTime::now())
            .unwrap();
        let ck6 = minter.certified_key("[::1]").await.unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&ck6.cert[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap().value;
        assert!(matches!(
            san.general_names[0],
            x509_parser::extensions::GeneralName::IPAddress(b) if b.len() == 16
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_use_mints_once() {
        let (minter, _dir) = test_minter();
        let observed = Arc::new(AtomicU64::new(0));
        let o = observed.clone();
        minter.set_observer(Arc::new(move |_d| {
            o.fetch_add(1, Ordering::Relaxed);
        }));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let m = minter.clone();
            tasks.push(tokio::spawn(async move {
                m.certified_key("new.example").await.unwrap()
            }));
        }
        let mut keys = Vec::new();
        for t in tasks {
            keys.push(t.await.unwrap());
        }
        assert_eq!(minter.minted_total(), 1);
        assert_eq!(observed.load(Ordering::Relaxed), 1);
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
        // Same host, other spelling: still cached.
        minter.certified_key("NEW.example.").await.unwrap();
        assert_eq!(minter.minted_total(), 1);
        minter.cache.run_pending_tasks().await;
        assert_eq!(minter.cache_size(), 1);
        minter.certified_key("other.example").await.unwrap();
        assert_eq!(minter.minted_total(), 2);
    }

    #[tokio::test]
    async fn invalid_hosts_are_errors_not_panics() {
        let (minter, _dir) = test_minter();
        for bad in [
            "",
            " ",
            ".",
            "*.example.com",
            "exa mple.com",
            "host:443",
            "-bad-.com",
            "a..b",
            "über.example",
            &"a".repeat(300),
            "[not-an-ip]",
            "[127.0.0.1]",
        ] {
            let err = minter.certified_key(bad).await.unwrap_err();
            assert!(matches!(err, MintError::InvalidHost(_)), "{bad:?}: {err}");
        }
        assert_eq!(minter.minted_total(), 0);
    }

    /// Listener that accepts one TLS connection through `accept` and echoes.
    async fn echo_server(
        minter: Arc<CertMinter>,
        fallback: Option<&'static str>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<(String, Option<Vec<u8>>), AcceptError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut tls, host) = minter.accept(tcp, fallback).await.map_err(|e| e.error)?;
            let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            let mut buf = [0u8; 64];
            let n = tls.read(&mut buf).await?;
            tls.write_all(&buf[..n]).await?;
            tls.shutdown().await?;
            Ok((host, alpn))
        });
        (addr, handle)
    }

    #[tokio::test]
    async fn tls_handshake_with_sni_negotiates_h2_and_echoes() {
        let (minter, _dir) = test_minter();
        let (addr, server) = echo_server(minter.clone(), Some("ignored.example")).await;
        let connector = TlsConnector::from(client_config(&minter, &[b"h2"]));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("api.example.com").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(b"ping").await.unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"ping");
        let (host, alpn) = server.await.unwrap().unwrap();
        assert_eq!(host, "api.example.com", "SNI wins over the fallback");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(minter.minted_total(), 1);

        // A second connection to the same host is served from the cache,
        // and http/1.1-only clients get http/1.1 (TLS 1.2 too).
        let (addr, server) = echo_server(minter.clone(), None).await;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(&minter))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("api.example.com").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        tls.write_all(b"pong").await.unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"pong");
        let (_, alpn) = server.await.unwrap().unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(minter.minted_total(), 1);
    }

    #[tokio::test]
    async fn no_sni_uses_fallback_host() {
        let (minter, _dir) = test_minter();
        let (addr, server) = echo_server(minter.clone(), Some("connect-target.example")).await;
        // An IP server name makes rustls omit SNI; verification is then
        // done by hand against the fallback host's name.
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&minter))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg.dangerous()
            .set_certificate_verifier(Arc::new(FixedNameVerifier {
                inner: WebPkiServerVerifier::builder_with_provider(roots(&minter), provider())
                    .build()
                    .unwrap(),
                name: ServerName::try_from("connect-target.example").unwrap(),
            }));
        let connector = TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello");
        let (host, alpn) = server.await.unwrap().unwrap();
        assert_eq!(host, "connect-target.example");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn no_sni_and_no_fallback_is_an_error() {
        let (minter, _dir) = test_minter();
        let (addr, server) = echo_server(minter.clone(), None).await;
        let connector = TlsConnector::from(client_config(&minter, &[b"h2"]));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        assert!(connector.connect(name, tcp).await.is_err());
        let err = server.await.unwrap().unwrap_err();
        assert!(matches!(err, AcceptError::NoServerName), "{err}");
        assert_eq!(minter.minted_total(), 0);
    }

    #[tokio::test]
    async fn invalid_fallback_host_is_an_error() {
        let (minter, _dir) = test_minter();
        let (addr, server) = echo_server(minter.clone(), Some("bad host!")).await;
        let connector = TlsConnector::from(client_config(&minter, &[b"h2"]));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        assert!(connector.connect(name, tcp).await.is_err());
        let err = server.await.unwrap().unwrap_err();
        assert!(
            matches!(err, AcceptError::Mint(MintError::InvalidHost(_))),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_instead_of_client_hello_is_an_error() {
        let (minter, _dir) = test_minter();
        let (addr, server) = echo_server(minter.clone(), Some("x.example")).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let err = server.await.unwrap().unwrap_err();
        assert!(matches!(err, AcceptError::Io(_)), "{err}");
    }

    /// Verifies the chain against a fixed name, whatever name the client
    /// connected with (used to test the no-SNI path).
    #[derive(Debug)]
    struct FixedNameVerifier {
        inner: Arc<WebPkiServerVerifier>,
        name: ServerName<'static>,
    }

    impl ServerCertVerifier for FixedNameVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            self.inner
                .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }
}
