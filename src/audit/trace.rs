//! `trace_id` for audit records: the trace id of the caller's W3C `traceparent`
//! (Trace Context, version 00), so an audit record can be joined with the app's
//! traces.
//!
//! Only the exact version-00 form is trusted: `00-<32 hex>-<16 hex>-<2 hex>`,
//! 55 characters, lowercase hex, neither id all zeros. Anything else (another
//! version, another length, upper case, a zero id, several `traceparent` headers)
//! yields no trace id: a malformed header must not put attacker-shaped text into
//! the audit trail, and the request itself is decided the same either way.

use http::HeaderMap;

/// Length of a version-00 `traceparent` value.
const TRACEPARENT_LEN: usize = 55;

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The 32-hex trace id of a version-00 `traceparent` value, or None when the
/// value is not exactly that format (surrounding spaces and tabs are ignored).
pub(super) fn parse_traceparent(value: &str) -> Option<String> {
    let v = value.trim_matches([' ', '\t']).as_bytes();
    if v.len() != TRACEPARENT_LEN {
        return None;
    }
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if version != b"00" || !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
        return None;
    }
    if trace.iter().all(|&b| b == b'0') || parent.iter().all(|&b| b == b'0') {
        return None;
    }
    // All checked ASCII hex above.
    std::str::from_utf8(trace).ok().map(str::to_string)
}

/// The trace id of a request's single `traceparent` header, if valid.
pub(crate) fn trace_id(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all("traceparent").iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse_traceparent(first.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_gives_its_trace_id() {
        assert_eq!(parse_traceparent(GOOD).as_deref(), Some(TRACE));
        assert_eq!(
            parse_traceparent(&format!(" {GOOD}\t")).as_deref(),
            Some(TRACE)
        );
        let unsampled = GOOD.replace("-01", "-00");
        assert_eq!(parse_traceparent(&unsampled).as_deref(), Some(TRACE));
    }

    #[test]
    fn malformed_values_give_none() {
        let bad = [
            String::new(),
            "00".into(),
            // Upper-case hex is invalid in version 00.
            GOOD.to_uppercase(),
            // All-zero trace id or parent id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into(),
            // Version ff is forbidden; other versions are not trusted here.
            GOOD.replacen("00", "ff", 1),
            GOOD.replacen("00", "01", 1),
            // Longer (a future version's extra fields) or shorter.
            format!("{GOOD}-extra"),
            GOOD[..54].to_string(),
            // Wrong separators, non-hex, a short trace id padded elsewhere.
            GOOD.replace('-', "_"),
            GOOD.replacen('4', "g", 1),
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x".into(),
            // Multi-byte text of the right byte length.
            format!("00-{}-00f067aa0ba902b7-01", "é".repeat(16)),
        ];
        for b in &bad {
            assert_eq!(parse_traceparent(b), None, "{b:?}");
        }
    }

    #[test]
    fn one_header_only() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert("traceparent", GOOD.parse().unwrap());
        assert_eq!(trace_id(&h).as_deref(), Some(TRACE));
        h.append(
            "traceparent",
            "00-11111111111111111111111111111111-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&h), None, "two traceparent headers are ambiguous");
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_bytes(b"00-\xff").unwrap(),
        );
        assert_eq!(trace_id(&h), None);
    }
}
