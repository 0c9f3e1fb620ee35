//! A minimal PKCS#12 (RFC 7292) writer for one job: a truststore of trusted
//! certificates that a JVM loads (`-Djavax.net.ssl.trustStore=truststore.p12
//! -Djavax.net.ssl.trustStoreType=PKCS12`, or `keytool -list`). No crate writes
//! one without OpenSSL, and the subset is small: an unencrypted SafeContents of
//! certificate bags (there is nothing secret to encrypt), each with its alias
//! (`friendlyName`) and the attribute by which Java marks a trusted certificate
//! entry, and an HMAC-SHA-256 integrity MAC keyed by the PKCS#12 KDF from the
//! password (read by Java 8u301+, 11.0.12+ and 17+).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// MAC iterations (Java's default for PKCS#12 is 10000).
const MAC_ITERATIONS: u32 = 10_000;

// OIDs, DER-encoded contents (without tag and length).
/// 1.2.840.113549.1.7.1 id-data
const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
/// 1.2.840.113549.1.12.10.1.3 certBag
const OID_CERT_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x03,
];
/// 1.2.840.113549.1.9.22.1 x509Certificate
const OID_X509_CERT: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x16, 0x01];
/// 1.2.840.113549.1.9.20 friendlyName
const OID_FRIENDLY_NAME: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x14];
/// 2.16.840.1.113894.746875.1.1: Oracle's "trusted key usage" attribute, which
/// makes a certificate bag a trustedCertEntry in Java's PKCS12 keystore.
const OID_ORACLE_TRUSTED_KEY_USAGE: &[u8] = &[
    0x60, 0x86, 0x48, 0x01, 0x86, 0xf9, 0x66, 0xad, 0xca, 0x7b, 0x01, 0x01,
];
/// 2.5.29.37.0 anyExtendedKeyUsage
const OID_ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];
/// 2.16.840.1.101.3.4.2.1 sha256
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];

const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const NULL: u8 = 0x05;
const OID: u8 = 0x06;
const BMP_STRING: u8 = 0x1e;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const EXPLICIT_0: u8 = 0xa0;

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

fn integer(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|&&x| x == 0).count().min(3);
    let mut c = b[skip..].to_vec();
    if c[0] & 0x80 != 0 {
        c.insert(0, 0);
    }
    tlv(INTEGER, &c)
}

/// The password as PKCS#12 wants it: BMPString (UTF-16BE) with a 2-byte NUL.
fn bmp_password(password: &str) -> Vec<u8> {
    let mut out: Vec<u8> = password.encode_utf16().flat_map(u16::to_be_bytes).collect();
    out.extend_from_slice(&[0, 0]);
    out
}

/// RFC 7292 Appendix B.2 key derivation with SHA-256 (u = 32, v = 64), for
/// `id` 3 (MAC key) and an output of one hash length.
fn pkcs12_kdf_sha256(password: &[u8], salt: &[u8], id: u8, iterations: u32) -> [u8; 32] {
    const V: usize = 64;
    let fill = |src: &[u8]| -> Vec<u8> {
        if src.is_empty() {
            return Vec::new();
        }
        let len = V * src.len().div_ceil(V);
        src.iter().cycle().take(len).copied().collect()
    };
    let mut h = Sha256::new();
    h.update([id; V]);
    h.update(fill(salt));
    h.update(fill(password));
    let mut a: [u8; 32] = h.finalize().into();
    for _ in 1..iterations {
        a = Sha256::digest(a).into();
    }
    // n = u: one block, so I needs no update (step 6C).
    a
}

/// A PKCS#12 truststore holding `certs` (alias, DER) as trusted certificate
/// entries, with an integrity MAC under `password`.
pub(crate) fn truststore(certs: &[(&str, &[u8])], password: &str) -> Result<Vec<u8>, String> {
    let mut bags = Vec::new();
    for (alias, der) in certs {
        let cert_bag = seq(&[
            &tlv(OID, OID_X509_CERT),
            &tlv(EXPLICIT_0, &tlv(OCTET_STRING, der)),
        ]);
        let alias_bmp: Vec<u8> = alias.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let friendly = seq(&[
            &tlv(OID, OID_FRIENDLY_NAME),
            &tlv(SET, &tlv(BMP_STRING, &alias_bmp)),
        ]);
        let trusted = seq(&[
            &tlv(OID, OID_ORACLE_TRUSTED_KEY_USAGE),
            &tlv(SET, &tlv(OID, OID_ANY_EKU)),
        ]);
        let attrs = tlv(SET, &[friendly, trusted].concat());
        bags.push(seq(&[
            &tlv(OID, OID_CERT_BAG),
            &tlv(EXPLICIT_0, &cert_bag),
            &attrs,
        ]));
    }
    let safe_contents = tlv(SEQUENCE, &bags.concat());
    let data_info = seq(&[
        &tlv(OID, OID_DATA),
        &tlv(EXPLICIT_0, &tlv(OCTET_STRING, &safe_contents)),
    ]);
    // AuthenticatedSafe: the content the MAC covers.
    let auth_safe = tlv(SEQUENCE, &data_info);
    let auth_info = seq(&[
        &tlv(OID, OID_DATA),
        &tlv(EXPLICIT_0, &tlv(OCTET_STRING, &auth_safe)),
    ]);

    let salt: [u8; 16] = rand::random();
    let key = pkcs12_kdf_sha256(&bmp_password(password), &salt, 3, MAC_ITERATIONS);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| format!("MAC key: {e}"))?;
    mac.update(&auth_safe);
    let digest = mac.finalize().into_bytes();
    let mac_data = seq(&[
        &seq(&[
            &seq(&[&tlv(OID, OID_SHA256), &tlv(NULL, &[])]),
            &tlv(OCTET_STRING, &digest),
        ]),
        &tlv(OCTET_STRING, &salt),
        &integer(MAC_ITERATIONS),
    ]);
    Ok(seq(&[&integer(3), &auth_info, &mac_data]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_and_integers() {
        assert_eq!(tlv(OCTET_STRING, &[1, 2]), vec![4, 2, 1, 2]);
        let long = tlv(OCTET_STRING, &[0; 300]);
        assert_eq!(&long[..4], &[4, 0x82, 0x01, 0x2c]);
        assert_eq!(integer(3), vec![2, 1, 3]);
        assert_eq!(integer(10_000), vec![2, 2, 0x27, 0x10]);
        assert_eq!(integer(128), vec![2, 2, 0, 128]);
        assert_eq!(bmp_password("ab"), vec![0, b'a', 0, b'b', 0, 0]);
    }

    /// The KDF against a vector computed independently (Python, RFC 7292 B.2 by
    /// hand): SHA-256, ID 3, password "changeit", salt 00..0f, 2048 iterations.
    #[test]
    fn kdf_matches_an_independent_computation() {
        let salt: Vec<u8> = (0u8..16).collect();
        let key = pkcs12_kdf_sha256(&bmp_password("changeit"), &salt, 3, 2048);
        assert_eq!(
            hex::encode(key),
            "28bc2bdc8fed903ab2805785ab9c166a41ed0222c6ad38b25876476bd45af4e7"
        );
    }
}
