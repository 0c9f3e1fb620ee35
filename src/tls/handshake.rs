//! Why a TLS handshake failed, as the fixed `reason` label of
//! `consentgate_tls_handshake_failures_total` ([`crate::metrics::HANDSHAKE_REASONS`]).
//!
//! Client side (an app's handshake with the proxy): read from the error the
//! accept path returns, usually the alert the app sent. Upstream side (the
//! proxy's handshake with the vendor): read from the upstream error's detail,
//! which is `upstream TLS: ` and rustls's own message (the upstream client keeps
//! only that text); the tests below pin those messages, so a rustls upgrade that
//! rewords them fails here rather than silently counting `other`.

use super::mint::{AcceptError, MintError};
use rustls::AlertDescription as A;

/// The reason an app's handshake with the proxy failed.
pub(crate) fn client_reason(e: &AcceptError) -> &'static str {
    match e {
        AcceptError::NoServerName => "no_sni",
        AcceptError::Mint(MintError::InvalidHost(_)) => "invalid_sni",
        AcceptError::Mint(_) => "mint_failed",
        AcceptError::Timeout(_) => "timeout",
        AcceptError::Io(io) => io_reason(io),
    }
}

fn io_reason(io: &std::io::Error) -> &'static str {
    if let Some(t) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return rustls_reason(t);
    }
    match io.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => "eof",
        std::io::ErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::AlertReceived(a) => alert_reason(*a),
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => "unknown_ca",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::PeerIncompatible(_) => "protocol_version",
        _ => "other",
    }
}

fn alert_reason(a: A) -> &'static str {
    match a {
        A::UnknownCA => "unknown_ca",
        A::BadCertificate
        | A::CertificateUnknown
        | A::UnsupportedCertificate
        | A::CertificateExpired
        | A::CertificateRevoked
        | A::AccessDenied => "bad_certificate",
        A::ProtocolVersion | A::HandshakeFailure | A::InsufficientSecurity => "protocol_version",
        _ => "other",
    }
}

/// The reason the proxy's handshake with a vendor failed, from the detail of an
/// upstream error of kind `tls` (`upstream TLS: <rustls message>`).
pub(crate) fn upstream_reason(detail: &str) -> &'static str {
    let d = detail.strip_prefix("upstream TLS: ").unwrap_or(detail);
    if d.contains("UnknownIssuer") || d.contains("UnknownCA") {
        "unknown_ca"
    } else if d.starts_with("invalid peer certificate")
        || d.contains("BadCertificate")
        || d.contains("CertificateUnknown")
    {
        "bad_certificate"
    } else if d.starts_with("peer is incompatible")
        || d.contains("ProtocolVersion")
        || d.contains("HandshakeFailure")
    {
        "protocol_version"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn io(e: rustls::Error) -> AcceptError {
        AcceptError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn client_reasons_come_from_the_alert_or_the_error() {
        let cases = [
            (io(rustls::Error::AlertReceived(A::UnknownCA)), "unknown_ca"),
            (
                io(rustls::Error::AlertReceived(A::BadCertificate)),
                "bad_certificate",
            ),
            (
                io(rustls::Error::AlertReceived(A::CertificateUnknown)),
                "bad_certificate",
            ),
            (
                io(rustls::Error::AlertReceived(A::ProtocolVersion)),
                "protocol_version",
            ),
            (
                io(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::Tls12NotOffered,
                )),
                "protocol_version",
            ),
            (io(rustls::Error::AlertReceived(A::DecodeError)), "other"),
            (
                AcceptError::Io(std::io::ErrorKind::UnexpectedEof.into()),
                "eof",
            ),
            (AcceptError::NoServerName, "no_sni"),
            (
                AcceptError::Mint(MintError::InvalidHost("a b".into())),
                "invalid_sni",
            ),
            (
                AcceptError::Mint(MintError::Mint {
                    host: "h".into(),
                    reason: "r".into(),
                }),
                "mint_failed",
            ),
            (AcceptError::Timeout(Duration::from_secs(1)), "timeout"),
        ];
        for (e, want) in cases {
            let got = client_reason(&e);
            assert_eq!(got, want, "{e}");
            assert!(crate::metrics::HANDSHAKE_REASONS.contains(&got));
        }
    }

    #[test]
    fn upstream_reasons_from_rustls_messages() {
        // Formatted exactly as the upstream client does (forward.rs `classify`).
        let detail = |e: rustls::Error| format!("upstream TLS: {e}");
        let cases = [
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                "unknown_ca",
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
                "bad_certificate",
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
                "bad_certificate",
            ),
            (
                rustls::Error::AlertReceived(A::ProtocolVersion),
                "protocol_version",
            ),
            (
                rustls::Error::AlertReceived(A::HandshakeFailure),
                "protocol_version",
            ),
            (
                rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered),
                "protocol_version",
            ),
            (rustls::Error::AlertReceived(A::UnknownCA), "unknown_ca"),
            (rustls::Error::DecryptError, "other"),
        ];
        for (e, want) in cases {
            let d = detail(e);
            assert_eq!(upstream_reason(&d), want, "{d}");
        }
    }
}
