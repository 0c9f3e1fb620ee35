//! The tools `scripts/bench` drives, in one binary (one release link instead
//! of seven: the cold build is most of the bench's wall time on a small machine).
//! Built only with `--features bench-kit`:
//! `cargo build --release --features bench-kit --bin bench_kit`.
//!
//! ```sh
//! bench_kit upstream --dir D --tls ADDR [--plain ADDR] [--threads N]   # fast local TLS upstream
//! bench_kit load --target plain|tls|connect --addr ADDR ...            # open-loop / saturation load
//! bench_kit tls [--iters N] [--mints M]                                # P5: minted vs static handshakes
//! bench_kit pgprop --url URL --admin ADDR --token T --patient ID [--n N] # PostgreSQL propagation
//! bench_kit fanout --bin CONSENTGATE --work DIR [--watchers N] ...      # NATS fleet fan-out
//! bench_kit crit [--warm-up-time S] [--measurement-time S] [--sample-size N] [BENCH]
//! ```
//!
//! `crit` runs the same criterion benchmarks as `cargo bench` (the files in
//! `benches/` are compiled in here as modules), with criterion's usual output.

mod fanout;
mod load;
mod pgprop;
mod tls;
mod upstream;

// The criterion bench files, unchanged; their own `criterion_main!` `main`s are unused here.
#[allow(dead_code)]
#[path = "../../../benches/adapters.rs"]
mod adapters;
#[allow(dead_code)]
#[path = "../../../benches/consent_lookup.rs"]
mod consent_lookup;
#[allow(dead_code)]
#[path = "../../../benches/identify.rs"]
mod identify;

use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: bench_kit upstream|load|tls|pgprop|fanout|crit [args...] (see src/bin/bench_kit/main.rs)"
    );
    std::process::exit(2)
}

/// `crit [--warm-up-time S] [--measurement-time S] [--sample-size N] [BENCH]`:
/// the benches identify, adapters and consent_lookup (`CONSENT_BENCH_PATIENTS`
/// as for `cargo bench`), or only the one named BENCH.
fn crit() {
    let mut c = criterion::Criterion::default();
    let mut filter: Option<String> = None;
    let mut it = std::env::args().skip(2);
    while let Some(k) = it.next() {
        let mut num = || -> f64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        c = match k.as_str() {
            "--warm-up-time" => c.warm_up_time(Duration::from_secs_f64(num())),
            "--measurement-time" => c.measurement_time(Duration::from_secs_f64(num())),
            "--sample-size" => c.sample_size(num() as usize),
            f if !f.starts_with('-') && filter.is_none() => {
                filter = Some(f.to_string());
                c
            }
            _ => usage(),
        };
    }
    let wanted = |bench: &str| filter.as_deref().is_none_or(|f| f == bench);
    if wanted("identify") {
        identify::bench(&mut c);
    }
    if wanted("adapters") {
        adapters::bench(&mut c);
    }
    if wanted("consent_lookup") {
        consent_lookup::bench(&mut c);
    }
    c.final_summary();
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("upstream") => upstream::main(),
        Some("load") => load::main(),
        Some("tls") => tls::main(),
        Some("pgprop") => pgprop::main(),
        Some("fanout") => fanout::main(),
        Some("crit") => crit(),
        _ => usage(),
    }
}
