//! The interception CA: creation (`consentgate ca init`, first `run`), loading
//! and validation.
//!
//! Files: `ca.pem` (the CA certificate, mode 0644) and `ca-key.pem` (its PKCS#8
//! private key, ECDSA P-256, mode 0600 from the moment it is created).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Common name of the CA created by [`init_ca`] / [`ensure_ca`].
pub const CA_COMMON_NAME: &str = "consentgate interception CA";
/// File name of the CA certificate inside the `ca init` output directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the `ca init` output directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// CA validity: about ten years.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Backdating of `notBefore`, to tolerate clock skew between proxy and apps.
const CA_BACKDATE: Duration = Duration::from_secs(3600);

/// Paths of the files written by [`init_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
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
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Where the CA certificate was loaded from.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The signer for leaf certificates.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The DER SubjectPublicKeyInfo of the CA key.
    pub fn public_key_spki(&self) -> Vec<u8> {
        self.issuer.key().subject_public_key_info()
    }
}

/// `consentgate ca init [--out DIR]`: write `DIR/ca.pem` and `DIR/ca-key.pem`.
///
/// Without `force`, refuses (before writing anything) if either file exists.
/// With `force`, each file is replaced atomically (written to a new 0600/0644
/// temporary file in the same directory, then renamed over the old one).
pub fn init_ca(out_dir: &Path, force: bool) -> Result<CaFiles, CaError> {
    let files = CaFiles {
        cert: out_dir.join(CA_CERT_FILE),
        key: out_dir.join(CA_KEY_FILE),
    };
    write_new_ca(&files.cert, &files.key, force)?;
    Ok(files)
}

/// For `run` / `check`: create the CA at exactly these paths when BOTH files
/// are missing (returns `true`), do nothing when both exist (returns `false`),
/// and fail naming the files when exactly one of them exists.
pub fn ensure_ca(cert: &Path, key: &Path) -> Result<bool, CaError> {
    let cert_exists = exists(cert)?;
    let key_exists = exists(key)?;
    match (cert_exists, key_exists) {
        (true, true) => Ok(false),
        (false, false) => {
            write_new_ca(cert, key, false)?;
            Ok(true)
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
    })
}

/// Short text on how an app or pod trusts the interception CA.
pub fn trust_instructions(ca_path: &Path) -> String {
    let p = ca_path.display();
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
        "  OpenSSL-based tools, Go, Ruby, curl:  export SSL_CERT_FILE=/path/to/bundle.pem"
    );
    let _ = writeln!(
        s,
        "      (a bundle: the system roots plus this CA, e.g. cat /etc/ssl/certs/ca-certificates.crt {p} > bundle.pem)"
    );
    let _ = writeln!(
        s,
        "  Python requests:                      export REQUESTS_CA_BUNDLE=/path/to/bundle.pem"
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
        "  Java:                                 keytool -importcert -noprompt -alias consentgate -file {p} -cacerts -storepass changeit"
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

/// Generate a fresh CA and write it to `cert_path` / `key_path`.
fn write_new_ca(cert_path: &Path, key_path: &Path, force: bool) -> Result<(), CaError> {
    if !force {
        // Check both before writing either, so a refusal leaves nothing behind.
        for p in [cert_path, key_path] {
            if exists(p)? {
                return Err(CaError::Exists(p.to_path_buf()));
            }
        }
    }
    let (cert_pem, key_pem) = generate_ca()?;
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
    Ok(())
}

fn generate_ca() -> Result<(String, String), CaError> {
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
    let now = SystemTime::now();
    params.not_before = now.checked_sub(CA_BACKDATE).unwrap_or(now).into();
    params.not_after = (now + CA_VALIDITY).into();
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

    pub(crate) fn inspect_certificate(der: &[u8]) -> Option<CertInfo<'_>> {
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

    #[test]
    fn init_ca_writes_both_files_key_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let files = init_ca(&out, false).unwrap();
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
        let years =
            (validity.not_after.timestamp() - validity.not_before.timestamp()) / (365 * 24 * 3600);
        assert!((9..=11).contains(&years), "validity {years} years");
        assert_eq!(
            x509.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
    }

    #[test]
    fn init_ca_refuses_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false).unwrap();
        let before = fs::read(&files.key).unwrap();
        let err = init_ca(dir.path(), false).unwrap_err();
        assert!(matches!(err, CaError::Exists(_)), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(fs::read(&files.key).unwrap(), before);

        // Only the key present: still refused, and the error names the key.
        fs::remove_file(&files.cert).unwrap();
        let err = init_ca(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert!(!files.cert.exists(), "nothing written on refusal");
    }

    #[test]
    fn init_ca_force_overwrites_and_keeps_0600() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), false).unwrap();
        // A loosened mode on the old key must not survive a forced re-init.
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o644)).unwrap();
        let before = fs::read(&files.key).unwrap();
        let again = init_ca(dir.path(), true).unwrap();
        assert_eq!(again, files);
        assert_ne!(fs::read(&files.key).unwrap(), before);
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        load_ca(&files.cert, &files.key).unwrap();
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn load_ca_rejects_mismatched_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let fa = init_ca(a.path(), false).unwrap();
        let fb = init_ca(b.path(), false).unwrap();
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
        assert!(ensure_ca(&cert, &key).unwrap());
        assert!(!ensure_ca(&cert, &key).unwrap());
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        load_ca(&cert, &key).unwrap();

        fs::remove_file(&cert).unwrap();
        let err = ensure_ca(&cert, &key).unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }));
        assert!(err.to_string().contains("a/ca.pem"), "{err}");
        assert!(
            !cert.exists(),
            "must not create a new CA next to an old key"
        );
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
