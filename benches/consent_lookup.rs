//! Consent lookup latency and memory per patient.
//!
//! `CONSENT_BENCH_PATIENTS` (default 1,000,000) synthetic patients, each with one
//! email, one phone and one external id. Prints the RSS growth per patient
//! (from /proc/self/statm) and measures lookups by patient id, external id,
//! plaintext email (normalise + hash included), email SHA-256 and plaintext phone.

use chrono::{TimeZone, Utc};
use consentgate::{
    sha256_hex, Category, ConsentRecord, ConsentStore, Grant, Identifiers, RecordIdentifiers,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;

fn patients() -> usize {
    std::env::var("CONSENT_BENCH_PATIENTS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(1_000_000)
}

fn email(i: usize) -> String {
    format!("patient.{i}@example.org")
}

fn phone(i: usize) -> String {
    format!("+1 (415) {:03}-{:04}", (i / 10_000) % 1000, i % 10_000)
}

fn external(i: usize) -> String {
    format!("crm:{i:010}")
}

fn patient(i: usize) -> String {
    format!("P-{i:08}")
}

fn synth(i: usize) -> ConsentRecord {
    let mut categories = BTreeMap::new();
    categories.insert(Category::Advertising, Grant::Granted);
    categories.insert(Category::MarketingEmail, Grant::Denied);
    ConsentRecord {
        patient_id: patient(i),
        identifiers: RecordIdentifiers {
            emails: vec![email(i)],
            phones: vec![phone(i)],
            external_ids: vec![external(i)],
            email_sha256: Vec::new(),
            phone_sha256: Vec::new(),
            email_md5: Vec::new(),
        },
        jurisdiction: Some("US-CA".into()),
        categories,
        channels: BTreeMap::new(),
        sale_share_opt_out: i.is_multiple_of(7),
        limit_sensitive: false,
        gpc: false,
        updated_at: Utc
            .with_ymd_and_hms(2026, 11, 20, 10, 0, 0)
            .single()
            .unwrap_or_default(),
        source: Some("preference-center".into()),
        version: 0,
    }
}

/// Resident set size in bytes (Linux; 4 KiB pages).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

pub(crate) fn bench(c: &mut Criterion) {
    let n = patients();
    let before = rss_bytes();
    let t0 = std::time::Instant::now();
    let store = ConsentStore::new();
    for i in 0..n {
        store.put(synth(i));
    }
    let load = t0.elapsed();
    let after = rss_bytes();
    println!(
        "consent store: {n} patients ({} index keys) loaded in {:.2?}",
        store.index_len(),
        load
    );
    if let (Some(b), Some(a)) = (before, after) {
        let delta = a.saturating_sub(b);
        println!(
            "consent store: RSS +{:.1} MiB = {} bytes/patient",
            delta as f64 / (1024.0 * 1024.0),
            delta / n.max(1) as u64
        );
    }

    // Probe a spread of patients so lookups are not all cache-hot.
    let probes: Vec<usize> = (0..4096).map(|k| (k * 7919 + 13) % n.max(1)).collect();
    let email_hashes: Vec<String> = probes
        .iter()
        .map(|&i| sha256_hex(email(i).as_bytes()))
        .collect();
    let emails: Vec<String> = probes.iter().map(|&i| email(i)).collect();
    let phones: Vec<String> = probes.iter().map(|&i| phone(i)).collect();
    let externals: Vec<String> = probes.iter().map(|&i| external(i)).collect();
    let pids: Vec<String> = probes.iter().map(|&i| patient(i)).collect();

    // Per-lookup latency distribution (criterion reports means of batches;
    // the goal is a p99). Each lookup is timed on its own with
    // `Instant` (which adds ~20-40 ns of clock reads to every sample).
    for (name, vals, add) in [
        (
            "patient_id",
            &pids,
            Identifiers::add_patient as fn(&mut Identifiers, &str),
        ),
        ("email_sha256", &email_hashes, Identifiers::add_email),
        ("email_plaintext", &emails, Identifiers::add_email),
    ] {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3)
            .expect("histogram");
        for k in 0..200_000usize {
            let v = &vals[k % vals.len()];
            let t = std::time::Instant::now();
            let mut ids = Identifiers::new();
            add(&mut ids, black_box(v));
            let hits = black_box(store.lookup(&ids));
            h.saturating_record(t.elapsed().as_nanos() as u64);
            assert_eq!(hits.len(), 1);
        }
        println!(
            "consent lookup latency {name}: p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }

    let mut g = c.benchmark_group("consent_lookup");
    let mut k = 0usize;
    let mut run = |name: &str, vals: &[String], add: fn(&mut Identifiers, &str)| {
        g.bench_function(name, |b| {
            b.iter(|| {
                k = (k + 1) % vals.len();
                let mut ids = Identifiers::new();
                add(&mut ids, black_box(&vals[k]));
                let hits = store.lookup(&ids);
                assert_eq!(hits.len(), 1);
                hits
            })
        });
    };
    run("patient_id", &pids, |i, v| i.add_patient(v));
    run("external_id", &externals, |i, v| i.add_external(v));
    run("email_plaintext", &emails, |i, v| i.add_email(v));
    run("email_sha256", &email_hashes, |i, v| i.add_email(v));
    run("phone_plaintext", &phones, |i, v| i.add_phone(v));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
