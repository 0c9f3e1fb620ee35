//! Identifier normalisation and hashing (src/identify.rs): what every event
//! pays before its consent lookup, and what outgoing plaintext pays to be
//! hashed for the vendor.

use consentgate::{
    email_index_hashes, hash_email_for_vendor, hash_phone_digits_for_vendor, normalize_email,
    normalize_phone, Identifiers,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

const EMAIL: &str = "  Jane.Roe@Example.COM ";
const GMAIL: &str = "Mixed.Case@Gmail.com";
const PHONE: &str = "+1 (415) 555-0100";
const HASHED: &str = "6b3a55e0261b0304143f805a24924d0c1c44524821305f31d9277843b8a10f4e";

pub(crate) fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("identify");
    g.bench_function("normalize_email", |b| {
        b.iter(|| normalize_email(black_box(EMAIL)))
    });
    g.bench_function("normalize_phone", |b| {
        b.iter(|| normalize_phone(black_box(PHONE)))
    });
    g.bench_function("add_email_plaintext", |b| {
        b.iter(|| {
            let mut ids = Identifiers::new();
            ids.add_email(black_box(EMAIL));
            ids
        })
    });
    g.bench_function("add_email_sha256_hex", |b| {
        b.iter(|| {
            let mut ids = Identifiers::new();
            ids.add_email(black_box(HASHED));
            ids
        })
    });
    g.bench_function("add_phone_plaintext", |b| {
        b.iter(|| {
            let mut ids = Identifiers::new();
            ids.add_phone(black_box(PHONE));
            ids
        })
    });
    g.bench_function("add_email_phone_external", |b| {
        b.iter(|| {
            let mut ids = Identifiers::new();
            ids.add_email(black_box(EMAIL));
            ids.add_phone(black_box(PHONE));
            ids.add_external(black_box("crm:0031x00000abc"));
            ids
        })
    });
    g.bench_function("email_index_hashes_gmail", |b| {
        b.iter(|| email_index_hashes(black_box(GMAIL)))
    });
    g.bench_function("hash_email_for_vendor", |b| {
        b.iter(|| hash_email_for_vendor(black_box(EMAIL)))
    });
    g.bench_function("hash_phone_digits_for_vendor", |b| {
        b.iter(|| hash_phone_digits_for_vendor(black_box(PHONE)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
