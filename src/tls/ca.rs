//! The interception CA: creation (`consentgate ca init`, first `run`), loading
//! and validation.
//!
//! Files: `ca.pem` (the CA certificate, mode 0644) and `ca-key.pem` (its PKCS#8
//! private key, ECDSA P-256, mode 0600 from the moment it is created), and for
//! the apps: `ca-bundle.pem` (the system roots followed by the CA, for apps that
//! take one bundle file) and `truststore.p12` (a PKCS#12 truststore holding the
//! CA as a trusted certificate, for JVMs).
//!
//! Apps trust this CA for every TLS connection they make, so it is made to be
//! worth little if stolen: valid two years by default (`--days`), and with X.509
//! name constraints (RFC 5280 §4.2.1.10) that permit only the destination hosts
//! (the built-in catalog's, [`BUILTIN_PERMITTED_HOSTS`], plus configured ones) and
//! exclude every IP address. A client that checks name constraints (rustls/webpki,
//! OpenSSL, Go, Java, browsers) then refuses a certificate this CA signed for any
//! other host, and the minter refuses to mint one.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData, SerialNumber,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Common name of the CA created by [`init_ca`] / [`ensure_ca`].
const CA_COMMON_NAME: &str = "consentgate interception CA";
/// File name of the CA certificate inside the `ca init` output directory.
pub(crate) const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the `ca init` output directory.
const CA_KEY_FILE: &str = "ca-key.pem";

/// File name of the bundle (system roots + CA) written beside `ca.pem`.
pub(crate) const CA_BUNDLE_FILE: &str = "ca-bundle.pem";
/// File name of the PKCS#12 truststore written beside `ca.pem`.
pub(crate) const TRUSTSTORE_FILE: &str = "truststore.p12";
/// Password of `truststore.p12`. It guards nothing secret (the truststore holds
/// only the public CA certificate; the MAC just lets Java check integrity), so it
/// is the JVM's customary truststore password.
pub(crate) const TRUSTSTORE_PASSWORD: &str = "changeit";
/// Alias of the CA in `truststore.p12`.
const TRUSTSTORE_ALIAS: &str = "consentgate-interception-ca";
/// Default CA validity (`ca init --days`): two years.
pub(crate) const CA_DEFAULT_DAYS: u32 = 730;
/// Longest validity `--days` accepts (ten years).
const CA_MAX_DAYS: u32 = 3650;
/// Where the system's root bundle usually is (Debian/Ubuntu, RHEL/Fedora,
/// openSUSE, Alpine/macOS), for `ca-bundle.pem`.
const SYSTEM_ROOT_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The DNS subtrees the built-in destinations need (each permits the name and
/// every name below it). Kept in step with the adapters' `matches_host` by
/// `builtin_hosts_are_permitted` below.
pub(crate) const BUILTIN_PERMITTED_HOSTS: &[&str] = &[
    "graph.facebook.com",
    "google-analytics.com",
    // gtag's regional hosts (`region1.analytics.google.com`).
    "analytics.google.com",
    "googleads.googleapis.com",
    "business-api.tiktok.com",
    "api.linkedin.com",
    "api.pinterest.com",
    "tr.snapchat.com",
    "api.sendgrid.com",
    "api.eu.sendgrid.com",
    "api.mailchimp.com",
    "mandrillapp.com",
    "a.klaviyo.com",
    "braze.com",
    "braze.eu",
    "api.twilio.com",
    "api.hubapi.com",
    // Genesys Cloud regions (api.mypurecloud.<tld> and api.<region>.pure.cloud).
    "api.mypurecloud.com",
    "api.mypurecloud.ie",
    "api.mypurecloud.de",
    "api.mypurecloud.jp",
    "api.mypurecloud.com.au",
    "pure.cloud",
];
/// Backdating of `notBefore`, to tolerate clock skew between proxy and apps.
const CA_BACKDATE: Duration = Duration::from_secs(3600);

/// How a new CA is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaOptions {
    /// Validity in days from now (`--days`).
    pub(crate) days: u32,
    /// DNS subtrees the CA may sign for; `None` leaves it unconstrained
    /// (`--no-name-constraints`).
    pub(crate) permitted_dns: Option<Vec<String>>,
    /// The system root bundle to put in `ca-bundle.pem`; `None`: the first of
    /// [`SYSTEM_ROOT_BUNDLES`] that exists.
    pub(crate) system_roots: Option<PathBuf>,
}

impl Default for CaOptions {
    /// Two years, constrained to the built-in destination hosts.
    fn default() -> CaOptions {
        CaOptions {
            days: CA_DEFAULT_DAYS,
            permitted_dns: Some(
                BUILTIN_PERMITTED_HOSTS
                    .iter()
                    .map(|h| h.to_string())
                    .collect(),
            ),
            system_roots: None,
        }
    }
}

impl CaOptions {
    /// The defaults, without name constraints (tests and benches that mint for made-up hosts).
    pub fn unconstrained() -> CaOptions {
        CaOptions {
            permitted_dns: None,
            ..CaOptions::default()
        }
    }

    /// Also permit these hosts (configured destinations): `*.example.com` is
    /// permitted as its subtree `example.com`. Duplicates and hosts already
    /// below a permitted subtree are dropped. No effect when unconstrained.
    pub(crate) fn permit<I, S>(mut self, hosts: I) -> CaOptions
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        if let Some(list) = &mut self.permitted_dns {
            for h in hosts {
                let h = h.as_ref().trim().trim_end_matches('.').to_ascii_lowercase();
                let h = h.strip_prefix("*.").unwrap_or(&h).to_string();
                if !h.is_empty() && !list.iter().any(|base| dns_within(&h, base)) {
                    list.push(h);
                }
            }
        }
        self
    }
}

/// Whether `host` is `base` or a name below it (RFC 5280 dNSName constraint).
fn dns_within(host: &str, base: &str) -> bool {
    let base = base.trim_start_matches('.');
    host.eq_ignore_ascii_case(base)
        || (host.len() > base.len()
            && host[host.len() - base.len()..].eq_ignore_ascii_case(base)
            && host.as_bytes()[host.len() - base.len() - 1] == b'.')
}

/// Paths of the files written by [`init_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ca-bundle.pem`; `None` when no system root bundle was found (see `notes`).
    pub(crate) bundle: Option<PathBuf>,
    pub(crate) truststore: PathBuf,
    /// What the operator should know (e.g. no system bundle found).
    pub(crate) notes: Vec<String>,
}

/// Errors creating or loading the interception CA. Every variant names the
/// file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0} already exists; refusing to overwrite it (use --force to replace it)")]
    Exists(PathBuf),
    #[error(
        "interception CA is incomplete: {present} exists but {missing} is missing; \
         restore the missing file or remove the other one to have a new CA created"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("generating the interception CA: {0}")]
    Generate(String),
}

impl CaError {
    fn io(path: &Path, source: io::Error) -> Self {
        CaError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        CaError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// A loaded, validated interception CA, ready to sign leaf certificates.
pub struct LoadedCa {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    cert_path: PathBuf,
    /// The permitted DNS subtrees of the CA's name constraints (`None`: no constraints).
    permitted_dns: Option<Vec<String>>,
}

impl std::fmt::Debug for LoadedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl LoadedCa {
    /// The CA certificate (DER).
    pub(crate) fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The signer for leaf certificates.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The DNS subtrees the CA may sign for; `None` when it has no name constraints.
    pub(crate) fn permitted_dns(&self) -> Option<&[String]> {
        self.permitted_dns.as_deref()
    }

    /// Whether a leaf for DNS name `host` would satisfy the CA's name constraints.
    pub(crate) fn permits_dns(&self, host: &str) -> bool {
        match &self.permitted_dns {
            None => true,
            Some(list) => list.iter().any(|base| dns_within(host, base)),
        }
    }
}

/// `consentgate ca init [--out DIR]`: write `DIR/ca.pem` and `DIR/ca-key.pem`,
/// then `DIR/ca-bundle.pem` and `DIR/truststore.p12` for the apps.
///
/// Without `force`, refuses (before writing anything) if either CA file exists.
/// With `force`, each file is replaced atomically (written to a new 0600/0644
/// temporary file in the same directory, then renamed over the old one). The
/// bundle and truststore are derived files and are always (re)written.
pub fn init_ca(out_dir: &Path, force: bool, opts: &CaOptions) -> Result<CaFiles, CaError> {
    let cert = out_dir.join(CA_CERT_FILE);
    let key = out_dir.join(CA_KEY_FILE);
    let cert_pem = write_new_ca(&cert, &key, force, opts)?;
    write_trust_files(cert, key, &cert_pem, opts)
}

/// For `run` / `check`: create the CA at exactly these paths when BOTH files
/// are missing (returns the files written), do nothing when both exist
/// (returns `None`), and fail naming the files when exactly one of them exists.
pub(crate) fn ensure_ca(
    cert: &Path,
    key: &Path,
    opts: &CaOptions,
) -> Result<Option<CaFiles>, CaError> {
    let cert_exists = exists(cert)?;
    let key_exists = exists(key)?;
    match (cert_exists, key_exists) {
        (true, true) => Ok(None),
        (false, false) => {
            let cert_pem = write_new_ca(cert, key, false, opts)?;
            write_trust_files(cert.to_path_buf(), key.to_path_buf(), &cert_pem, opts).map(Some)
        }
        (true, false) => Err(CaError::Incomplete {
            present: cert.to_path_buf(),
            missing: key.to_path_buf(),
        }),
        (false, true) => Err(CaError::Incomplete {
            present: key.to_path_buf(),
            missing: cert.to_path_buf(),
        }),
    }
}

/// Load and validate the CA: the certificate file must hold a CA certificate
/// (basicConstraints cA=TRUE, and keyCertSign if a keyUsage is present), and the
/// key file a private key whose public key is the certificate's.
pub fn load_ca(cert: &Path, key: &Path) -> Result<LoadedCa, CaError> {
    let cert_pem = fs::read(cert).map_err(|e| CaError::io(cert, e))?;
    let cert_der = first_pem_cert(cert, &cert_pem)?;

    let key_pem = fs::read(key).map_err(|e| CaError::io(key, e))?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => {
            return Err(CaError::invalid(
                key,
                "no private key found (expected a PEM \"PRIVATE KEY\" block)",
            ))
        }
        Err(e) => return Err(CaError::invalid(key, format!("unreadable PEM: {e}"))),
    };
    let key_pair = KeyPair::try_from(&key_der)
        .map_err(|e| CaError::invalid(key, format!("unsupported or corrupt private key: {e}")))?;

    let info = der::inspect_certificate(cert_der.as_ref())
        .ok_or_else(|| CaError::invalid(cert, "not a parseable X.509 certificate"))?;
    if !info.is_ca {
        return Err(CaError::invalid(
            cert,
            "certificate is not a CA (basicConstraints cA is not TRUE); \
             run `consentgate ca init` to create an interception CA",
        ));
    }
    if info.spki != key_pair.subject_public_key_info().as_slice() {
        return Err(CaError::invalid(
            key,
            format!(
                "private key does not match the public key of the CA certificate {}",
                cert.display()
            ),
        ));
    }

    let permitted_dns = permitted_dns_of(cert, cert_der.as_ref())?;
    let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair)
        .map_err(|e| CaError::invalid(cert, format!("cannot use certificate as issuer: {e}")))?;
    if !issuer.key_usages().is_empty()
        && !issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign)
    {
        return Err(CaError::invalid(
            cert,
            "certificate's keyUsage does not allow signing certificates (keyCertSign)",
        ));
    }

    Ok(LoadedCa {
        cert_der,
        issuer,
        cert_path: cert.to_path_buf(),
        permitted_dns,
    })
}

/// The permitted DNS subtrees of a CA certificate's name constraints.
fn permitted_dns_of(path: &Path, der: &[u8]) -> Result<Option<Vec<String>>, CaError> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::invalid(path, format!("not a parseable X.509 certificate: {e}")))?;
    let nc = x509
        .name_constraints()
        .map_err(|e| CaError::invalid(path, format!("unreadable name constraints: {e}")))?;
    let Some(nc) = nc else { return Ok(None) };
    let Some(permitted) = &nc.value.permitted_subtrees else {
        // Only exclusions: every DNS name not excluded is permitted; the proxy
        // never writes such a CA, and treats it as unconstrained for DNS.
        return Ok(None);
    };
    Ok(Some(
        permitted
            .iter()
            .filter_map(|s| match &s.base {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
    ))
}

/// The system root bundle for `ca-bundle.pem`: the given file, else the first
/// usual location that exists.
fn system_roots(opts: &CaOptions) -> Option<PathBuf> {
    match &opts.system_roots {
        Some(p) => Some(p.clone()),
        None => SYSTEM_ROOT_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file()),
    }
}

/// Write `ca-bundle.pem` and `truststore.p12` beside the CA certificate.
fn write_trust_files(
    cert: PathBuf,
    key: PathBuf,
    cert_pem: &str,
    opts: &CaOptions,
) -> Result<CaFiles, CaError> {
    let dir = cert.parent().map(Path::to_path_buf).unwrap_or_default();
    let bundle_path = dir.join(CA_BUNDLE_FILE);
    let truststore = dir.join(TRUSTSTORE_FILE);
    let mut notes = Vec::new();
    let bundle = match system_roots(opts) {
        Some(roots) => {
            let mut text = fs::read_to_string(&roots).map_err(|e| CaError::io(&roots, e))?;
            let n = CertificateDer::pem_slice_iter(text.as_bytes())
                .filter(Result::is_ok)
                .count();
            if n == 0 {
                return Err(CaError::invalid(
                    &roots,
                    "no PEM certificates in the system root bundle",
                ));
            }
            if !text.ends_with('\n') {
                text.push('\n');
            }
            let _ = writeln!(text, "# {CA_COMMON_NAME}");
            text.push_str(cert_pem);
            write_file(&bundle_path, text.as_bytes(), 0o644, true)?;
            Some(bundle_path)
        }
        None => {
            notes.push(format!(
                "{CA_BUNDLE_FILE} not written: no system root bundle found (looked at {}); \
                 pass --system-roots FILE",
                SYSTEM_ROOT_BUNDLES.join(", ")
            ));
            None
        }
    };
    let der = first_pem_cert(&cert, cert_pem.as_bytes())?;
    let p12 = super::p12::truststore(&[(TRUSTSTORE_ALIAS, der.as_ref())], TRUSTSTORE_PASSWORD)
        .map_err(|e| CaError::Generate(format!("{TRUSTSTORE_FILE}: {e}")))?;
    write_file(&truststore, &p12, 0o644, true)?;
    Ok(CaFiles {
        cert,
        key,
        bundle,
        truststore,
        notes,
    })
}

/// Short text on how an app or pod trusts the interception CA (the files of
/// `ca init`: `ca.pem`, and `ca-bundle.pem` / `truststore.p12` beside it).
pub(crate) fn trust_instructions(ca_path: &Path) -> String {
    let p = ca_path.display();
    let dir = ca_path.parent().unwrap_or(Path::new(""));
    let bundle = dir.join(CA_BUNDLE_FILE);
    let b = bundle.display();
    let store = dir.join(TRUSTSTORE_FILE);
    let ts = store.display();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Apps that send traffic through consentgate must trust its interception CA: {p}"
    );
    let _ = writeln!(
        s,
        "Treat {CA_KEY_FILE} as a secret (mode 0600, never in an image or a ConfigMap); only {CA_CERT_FILE} is distributed."
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  OpenSSL-based tools, Go, Ruby, curl:  export SSL_CERT_FILE={b}"
    );
    let _ = writeln!(
        s,
        "      ({CA_BUNDLE_FILE}: the system roots plus this CA, for apps that take one bundle)"
    );
    let _ = writeln!(
        s,
        "  Python requests:                      export REQUESTS_CA_BUNDLE={b}"
    );
    let _ = writeln!(
        s,
        "  Node.js:                              export NODE_EXTRA_CA_CERTS={p}"
    );
    let _ = writeln!(
        s,
        "  Debian/Ubuntu image or host:          cp {p} /usr/local/share/ca-certificates/consentgate.crt && update-ca-certificates"
    );
    let _ = writeln!(
        s,
        "  Java:                                 -Djavax.net.ssl.trustStore={ts} -Djavax.net.ssl.trustStoreType=PKCS12 -Djavax.net.ssl.trustStorePassword={TRUSTSTORE_PASSWORD}"
    );
    let _ = writeln!(
        s,
        "      (this CA only; to keep the JDK's roots too: keytool -importcert -noprompt -alias consentgate -file {p} -cacerts -storepass changeit)"
    );
    let _ = writeln!(
        s,
        "  Kubernetes: mount {CA_CERT_FILE} from a Secret or ConfigMap into the app container and set the variables above."
    );
    s
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|e| CaError::io(path, e))
}

fn first_pem_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(CaError::invalid(path, format!("unreadable PEM: {e}"))),
        None => Err(CaError::invalid(
            path,
            "no certificate found (expected a PEM \"CERTIFICATE\" block)",
        )),
    }
}

/// Generate a fresh CA and write it to `cert_path` / `key_path`; returns the
/// certificate's PEM.
fn write_new_ca(
    cert_path: &Path,
    key_path: &Path,
    force: bool,
    opts: &CaOptions,
) -> Result<String, CaError> {
    if !force {
        // Check both before writing either, so a refusal leaves nothing behind.
        for p in [cert_path, key_path] {
            if exists(p)? {
                return Err(CaError::Exists(p.to_path_buf()));
            }
        }
    }
    let (cert_pem, key_pem) = generate_ca(opts)?;
    for p in [cert_path, key_path] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| CaError::io(dir, e))?;
        }
    }
    // Key first: a crash in between leaves "key without cert", which
    // `ensure_ca` reports instead of silently minting a new CA.
    write_file(key_path, key_pem.as_bytes(), 0o600, force)?;
    if let Err(e) = write_file(cert_path, cert_pem.as_bytes(), 0o644, force) {
        if !force {
            let _ = fs::remove_file(key_path);
        }
        return Err(e);
    }
    Ok(cert_pem)
}

fn generate_ca(opts: &CaOptions) -> Result<(String, String), CaError> {
    if opts.days == 0 || opts.days > CA_MAX_DAYS {
        return Err(CaError::Generate(format!(
            "validity of {} days: expected 1 to {CA_MAX_DAYS}",
            opts.days
        )));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "consentgate");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    if let Some(hosts) = &opts.permitted_dns {
        if hosts.is_empty() {
            return Err(CaError::Generate(
                "name constraints with no permitted host would make a useless CA".into(),
            ));
        }
        let mut permitted = Vec::new();
        for h in hosts {
            // rcgen writes the name as given: only a valid DNS name may go in.
            if rustls_pki_types::DnsName::try_from(h.as_str()).is_err() {
                return Err(CaError::Generate(format!(
                    "name constraints: {h:?} is not a DNS name"
                )));
            }
            permitted.push(GeneralSubtree::DnsName(h.clone()));
        }
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted,
            // Without an IP subtree, RFC 5280 leaves IP addresses unconstrained.
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
    }
    let now = SystemTime::now();
    params.not_before = now.checked_sub(CA_BACKDATE).unwrap_or(now).into();
    params.not_after = (now + Duration::from_secs(u64::from(opts.days) * 24 * 3600)).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A random, positive 128-bit serial number.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // non-zero leading byte: always 16 bytes, never zero
    SerialNumber::from_slice(&bytes)
}

/// Write `data` to `path`, creating it with `mode` (so a key file is never
/// readable by others, not even briefly). Without `overwrite`, fails if the
/// file exists; with it, writes a temporary file and renames it into place.
fn write_file(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<(), CaError> {
    if !overwrite {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    CaError::Exists(path.to_path_buf())
                } else {
                    CaError::io(path, e)
                }
            })?;
        if let Err(e) = write_sync(file, data) {
            let _ = fs::remove_file(path);
            return Err(CaError::io(path, e));
        }
        return Ok(());
    }

    let file_name = path
        .file_name()
        .ok_or_else(|| CaError::invalid(path, "not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|f| write_sync(f, data))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(CaError::io(path, e));
    }
    Ok(())
}

fn write_sync(mut file: File, data: &[u8]) -> io::Result<()> {
    file.write_all(data)?;
    file.sync_all()
}

/// Minimal DER reading, just enough to check an X.509 certificate's
/// basicConstraints and to extract its SubjectPublicKeyInfo (the crate does not
/// depend on a full X.509 parser).
pub(crate) mod der {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const OID: u8 = 0x06;
    const CTX_0: u8 = 0xa0;
    const CTX_3: u8 = 0xa3;
    /// 2.5.29.19 basicConstraints
    const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

    pub(crate) struct CertInfo<'a> {
        pub(crate) is_ca: bool,
        /// The full DER of SubjectPublicKeyInfo (tag and length included).
        pub(crate) spki: &'a [u8],
    }

    struct Tlv<'a> {
        tag: u8,
        content: &'a [u8],
        raw: &'a [u8],
    }

    /// Read one TLV from the front of `input`; returns it and the rest.
    fn read(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let mut len = 0usize;
            for &b in &rest[..n] {
                len = (len << 8) | usize::from(b);
            }
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let header = input.len() - rest.len();
        let content = &rest[..len];
        let raw = &input[..header + len];
        Some((Tlv { tag, content, raw }, &rest[len..]))
    }

    fn expect(input: &[u8], tag: u8) -> Option<(Tlv<'_>, &[u8])> {
        let (tlv, rest) = read(input)?;
        (tlv.tag == tag).then_some((tlv, rest))
    }

    pub(super) fn inspect_certificate(der: &[u8]) -> Option<CertInfo<'_>> {
        let (cert, _) = expect(der, SEQUENCE)?;
        let (tbs, _) = expect(cert.content, SEQUENCE)?;
        let mut rest = tbs.content;
        // version [0] EXPLICIT, optional
        if let Some((tlv, r)) = read(rest) {
            if tlv.tag == CTX_0 {
                rest = r;
            }
        }
        let (_serial, r) = expect(rest, INTEGER)?;
        let (_sig_alg, r) = expect(r, SEQUENCE)?;
        let (_issuer, r) = expect(r, SEQUENCE)?;
        let (_validity, r) = expect(r, SEQUENCE)?;
        let (_subject, r) = expect(r, SEQUENCE)?;
        let (spki, mut r) = expect(r, SEQUENCE)?;

        let mut is_ca = false;
        while !r.is_empty() {
            let (tlv, next) = read(r)?;
            r = next;
            if tlv.tag != CTX_3 {
                continue; // issuerUniqueID / subjectUniqueID
            }
            let (exts, _) = expect(tlv.content, SEQUENCE)?;
            let mut e = exts.content;
            while !e.is_empty() {
                let (ext, next) = expect(e, SEQUENCE)?;
                e = next;
                let (oid, mut body) = expect(ext.content, OID)?;
                if oid.content != BASIC_CONSTRAINTS {
                    continue;
                }
                if let Some((crit, b)) = read(body) {
                    if crit.tag == BOOLEAN {
                        body = b;
                    }
                }
                let (value, _) = expect(body, OCTET_STRING)?;
                let (bc, _) = expect(value.content, SEQUENCE)?;
                if let Some((flag, _)) = read(bc.content) {
                    is_ca = flag.tag == BOOLEAN && flag.content.first().is_some_and(|&b| b != 0);
                }
            }
        }
        Some(CertInfo {
            is_ca,
            spki: spki.raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    #[test]
    fn init_ca_writes_both_files_key_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let files = init_ca(&out, false, &CaOptions::default()).unwrap();
        assert_eq!(files.cert, out.join("ca.pem"));
        assert_eq!(files.key, out.join("ca-key.pem"));
        let cert = fs::read_to_string(&files.cert).unwrap();
        let key = fs::read_to_string(&files.key).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE"));
        assert!(key.contains("PRIVATE KEY"));
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key mode {mode:o}");

        let ca = load_ca(&files.cert, &files.key).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let bc = x509.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(x509
            .subject()
            .iter_common_name()
            .any(|cn| cn.as_str().ok() == Some(CA_COMMON_NAME)));
        let validity = x509.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / (24 * 3600);
        assert_eq!(
            days,
            i64::from(CA_DEFAULT_DAYS),
            "two years (and the hour of backdating)"
        );
        assert_eq!(
            x509.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
    }

    #[test]
    fn init_ca_refuses_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false, &CaOptions::default()).unwrap();
        let before = fs::read(&files.key).unwrap();
        let err = init_ca(dir.path(), false, &CaOptions::default()).unwrap_err();
        assert!(matches!(err, CaError::Exists(_)), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(fs::read(&files.key).unwrap(), before);

        // Only the key present: still refused, and the error names the key.
        fs::remove_file(&files.cert).unwrap();
        let err = init_ca(dir.path(), false, &CaOptions::default()).unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert!(!files.cert.exists(), "nothing written on refusal");
    }

    #[test]
    fn init_ca_force_overwrites_and_keeps_0600() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false, &CaOptions::default()).unwrap();
        // A loosened mode on the old key must not survive a forced re-init.
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o644)).unwrap();
        let before = fs::read(&files.key).unwrap();
        let again = init_ca(dir.path(), true, &CaOptions::default()).unwrap();
        assert_eq!(again, files);
        assert_ne!(fs::read(&files.key).unwrap(), before);
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        load_ca(&files.cert, &files.key).unwrap();
        // No temporary files left behind: the CA pair, bundle and truststore.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["ca-bundle.pem", "ca-key.pem", "ca.pem", "truststore.p12"]
        );
    }

    #[test]
    fn load_ca_rejects_mismatched_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let fa = init_ca(a.path(), false, &CaOptions::default()).unwrap();
        let fb = init_ca(b.path(), false, &CaOptions::default()).unwrap();
        let err = load_ca(&fa.cert, &fb.key).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("does not match"), "{msg}");
        assert!(msg.contains(&fb.key.display().to_string()), "{msg}");
    }

    #[test]
    fn load_ca_rejects_non_ca_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        // A self-signed leaf (not a CA) with its key.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["leaf.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cp = dir.path().join("leaf.pem");
        let kp = dir.path().join("leaf-key.pem");
        fs::write(&cp, cert.pem()).unwrap();
        fs::write(&kp, key.serialize_pem()).unwrap();
        let err = load_ca(&cp, &kp).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        assert!(err.to_string().contains("leaf.pem"), "{err}");

        let junk = dir.path().join("junk.pem");
        fs::write(&junk, "hello").unwrap();
        let err = load_ca(&junk, &kp).unwrap_err();
        assert!(err.to_string().contains("junk.pem"), "{err}");
        let err = load_ca(&cp, &junk).unwrap_err();
        assert!(err.to_string().contains("junk.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = load_ca(&missing, &kp).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn ensure_ca_creates_when_both_missing_errors_when_one_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("a/ca.pem");
        let key = dir.path().join("b/ca-key.pem");
        assert!(ensure_ca(&cert, &key, &CaOptions::default())
            .unwrap()
            .is_some());
        assert!(ensure_ca(&cert, &key, &CaOptions::default())
            .unwrap()
            .is_none());
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        load_ca(&cert, &key).unwrap();

        fs::remove_file(&cert).unwrap();
        let err = ensure_ca(&cert, &key, &CaOptions::default()).unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }));
        assert!(err.to_string().contains("a/ca.pem"), "{err}");
        assert!(
            !cert.exists(),
            "must not create a new CA next to an old key"
        );
    }

    #[test]
    fn name_constraints_days_bundle_and_truststore() {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join("roots.pem");
        let other = init_ca(
            &dir.path().join("other"),
            false,
            &CaOptions::unconstrained(),
        )
        .unwrap();
        fs::copy(&other.cert, &roots).unwrap();
        let opts = CaOptions {
            days: 30,
            system_roots: Some(roots.clone()),
            ..CaOptions::default()
        }
        .permit([
            "*.acme-crm.example",
            "api.sendgrid.com",
            "x.api.mailchimp.com",
        ]);
        let files = init_ca(&dir.path().join("ca"), false, &opts).unwrap();
        let ca = load_ca(&files.cert, &files.key).unwrap();
        let permitted = ca.permitted_dns().unwrap();
        assert!(permitted.contains(&"acme-crm.example".to_string()));
        assert_eq!(
            permitted.len(),
            BUILTIN_PERMITTED_HOSTS.len() + 1,
            "hosts under a permitted subtree are not repeated"
        );
        assert!(ca.permits_dns("graph.facebook.com"));
        assert!(ca.permits_dns("us21.api.mailchimp.com"));
        assert!(ca.permits_dns("crm.acme-crm.example"));
        assert!(!ca.permits_dns("facebook.com"));
        assert!(!ca.permits_dns("evilgraph.facebook.com.example"));
        assert!(!ca.permits_dns("www.example.com"));

        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let nc = x509.name_constraints().unwrap().unwrap();
        assert!(nc.critical, "name constraints must be critical (RFC 5280)");
        assert_eq!(
            nc.value.excluded_subtrees.as_ref().unwrap().len(),
            2,
            "all IPv4 and IPv6"
        );
        let v = x509.validity();
        assert_eq!(
            (v.not_after.timestamp() - v.not_before.timestamp()) / 3600,
            30 * 24 + 1
        );

        // The bundle: the system roots first, then this CA.
        let bundle = fs::read(files.bundle.as_ref().unwrap()).unwrap();
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&bundle)
            .map(Result::unwrap)
            .collect();
        let first_other = first_pem_cert(&other.cert, &fs::read(&other.cert).unwrap()).unwrap();
        assert_eq!(certs, vec![first_other, ca.cert_der().clone()]);

        // Without constraints: no extension at all.
        let free = init_ca(&dir.path().join("free"), false, &CaOptions::unconstrained()).unwrap();
        let free = load_ca(&free.cert, &free.key).unwrap();
        assert_eq!(free.permitted_dns(), None);
        assert!(free.permits_dns("anything.example"));

        for days in [0, CA_MAX_DAYS + 1] {
            let o = CaOptions {
                days,
                ..CaOptions::default()
            };
            let err = init_ca(&dir.path().join(format!("d{days}")), false, &o).unwrap_err();
            assert!(err.to_string().contains("days"), "{err}");
        }
    }

    /// rustls/webpki (what the apps' rustls and reqwest use) accepts a leaf the
    /// CA signs for a permitted host, and refuses one for any other host even
    /// though the CA's key signed it: the constraint is in the CA certificate.
    #[test]
    fn webpki_enforces_the_name_constraints() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false, &CaOptions::default()).unwrap();
        let ca = load_ca(&files.cert, &files.key).unwrap();
        let sign = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
            p.is_ca = IsCa::ExplicitNoCa;
            p.signed_by(&key, ca.issuer()).unwrap().der().clone()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let verify = |leaf: &CertificateDer<'static>, name: &str| {
            v.verify_server_cert(
                leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        verify(&sign("graph.facebook.com"), "graph.facebook.com").unwrap();
        verify(&sign("us21.api.mailchimp.com"), "us21.api.mailchimp.com").unwrap();
        for outside in ["www.example.com", "facebook.com", "accounts.google.com"] {
            let err = verify(&sign(outside), outside).unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraintViolation"),
                "{outside}: {err:?}"
            );
        }
    }

    /// The rotation procedure (docs/RUNBOOK.md) relies on this: in a `ca.pem` of
    /// several certificates the first is the CA (matched to the key), the rest are
    /// for the apps only.
    #[test]
    fn the_first_certificate_of_ca_pem_is_the_one_that_signs() {
        let dir = tempfile::tempdir().unwrap();
        let old = init_ca(&dir.path().join("old"), false, &CaOptions::default()).unwrap();
        let new = init_ca(&dir.path().join("new"), false, &CaOptions::default()).unwrap();
        let pem = |p: &Path| fs::read_to_string(p).unwrap();
        let both = dir.path().join("both.pem");
        fs::write(&both, pem(&old.cert) + &pem(&new.cert)).unwrap();
        let ca = load_ca(&both, &old.key).unwrap();
        assert_eq!(
            ca.cert_der(),
            load_ca(&old.cert, &old.key).unwrap().cert_der()
        );
        let err = load_ca(&both, &new.key).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn keytool_reads_the_truststore() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false, &CaOptions::default()).unwrap();
        let Ok(out) = std::process::Command::new("keytool")
            .args([
                "-list",
                "-v",
                "-storetype",
                "PKCS12",
                "-storepass",
                TRUSTSTORE_PASSWORD,
                "-keystore",
            ])
            .arg(&files.truststore)
            .output()
        else {
            eprintln!("keytool not installed: truststore not checked with a JDK");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(TRUSTSTORE_ALIAS), "{text}");
        assert!(text.contains("trustedCertEntry"), "{text}");
        assert!(text.contains(CA_COMMON_NAME), "{text}");
        // The MAC is checked: a wrong password is refused.
        let bad = std::process::Command::new("keytool")
            .args([
                "-list",
                "-storetype",
                "PKCS12",
                "-storepass",
                "wrong-password",
                "-keystore",
            ])
            .arg(&files.truststore)
            .output()
            .unwrap();
        assert!(
            !bad.status.success(),
            "{}",
            String::from_utf8_lossy(&bad.stdout)
        );
    }

    /// Every host a built-in adapter routes (a sample of each one's hosts,
    /// regional ones included) is inside the default name constraints: a new
    /// adapter host fails here until BUILTIN_PERMITTED_HOSTS has it.
    #[test]
    fn builtin_hosts_are_permitted() {
        let sample = [
            "graph.facebook.com",
            "www.google-analytics.com",
            "region1.google-analytics.com",
            "region1.analytics.google.com",
            "googleads.googleapis.com",
            "business-api.tiktok.com",
            "api.linkedin.com",
            "api.pinterest.com",
            "tr.snapchat.com",
            "api.sendgrid.com",
            "api.eu.sendgrid.com",
            "us21.api.mailchimp.com",
            "mandrillapp.com",
            "a.klaviyo.com",
            "rest.iad-01.braze.com",
            "rest.fra-01.braze.eu",
            "api.twilio.com",
            "api.hubapi.com",
            "api.mypurecloud.com",
            "api.mypurecloud.ie",
            "api.mypurecloud.de",
            "api.mypurecloud.jp",
            "api.mypurecloud.com.au",
            "api.usw2.pure.cloud",
        ];
        let opts = CaOptions::default();
        let permitted = opts.permitted_dns.as_deref().unwrap();
        let adapters = crate::destinations::builtins();
        let mut routed = 0;
        for host in sample {
            if adapters.iter().any(|a| a.matches_host(host)) {
                routed += 1;
                assert!(
                    permitted.iter().any(|base| dns_within(host, base)),
                    "{host} is a built-in destination host outside BUILTIN_PERMITTED_HOSTS"
                );
            }
        }
        assert!(
            routed >= 20,
            "the sample names hosts the adapters route ({routed})"
        );
        // And each permitted subtree is there for some adapter's host.
        for base in BUILTIN_PERMITTED_HOSTS {
            assert!(
                sample
                    .iter()
                    .any(|h| dns_within(h, base) && adapters.iter().any(|a| a.matches_host(h))),
                "{base}: no built-in destination needs it"
            );
        }
    }

    #[test]
    fn trust_instructions_mention_the_usual_knobs() {
        let s = trust_instructions(Path::new("certs/ca.pem"));
        for needle in [
            "certs/ca.pem",
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "update-ca-certificates",
            "keytool",
        ] {
            assert!(s.contains(needle), "missing {needle}");
        }
    }
}
