//! Propagation for `consent.source: postgres`: commit of a SQL UPDATE to the
//! change being visible through the running proxy's admin GET.
//!
//! ```sh
//! bench_kit pgprop --url POSTGRES_URL --admin 127.0.0.1:PORT --token TOKEN --patient P-1 [--n 1000]
//! ```
//!
//! Each of `--n` rounds sets the row's `record.source` to a fresh tag with one
//! autocommitted UPDATE, then polls `GET /v1/consent/{patient}` on one
//! keep-alive connection until the tag shows; the time from the UPDATE's
//! return (commit) to that answer is one sample. Prints one line with p50, p99
//! and max (the line `scripts/bench` copies into docs/BENCHMARKS.md).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};

struct Args {
    url: String,
    admin: String,
    token: String,
    patient: String,
    n: usize,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        admin: String::new(),
        token: String::new(),
        patient: String::new(),
        n: 1000,
    };
    let mut it = std::env::args().skip(2);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v,
            "--admin" => a.admin = v,
            "--token" => a.token = v,
            "--patient" => a.patient = v,
            "--n" => a.n = v.parse().expect("--n: a number"),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(
        !a.url.is_empty() && !a.admin.is_empty() && !a.token.is_empty() && !a.patient.is_empty(),
        "--url, --admin, --token and --patient are required"
    );
    a
}

async fn admin_conn(addr: &str) -> SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("admin handshake");
    tokio::spawn(conn);
    send
}

/// The record's `source` as the proxy serves it now.
async fn source(send: &mut SendRequest<Empty<Bytes>>, a: &Args) -> Option<String> {
    let req = hyper::Request::get(format!("/v1/consent/{}", a.patient))
        .header("host", a.admin.as_str())
        .header("authorization", format!("Bearer {}", a.token))
        .body(Empty::new())
        .expect("request");
    send.ready().await.expect("admin connection");
    let resp = send.send_request(req).await.expect("admin GET");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(
        status == 200 || status == 404,
        "GET /v1/consent/{}: {status}",
        a.patient
    );
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("source")?.as_str().map(str::to_string)
}

pub(crate) fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (db, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls)
            .await
            .expect("postgres connect");
        tokio::spawn(conn);
        let stmt = db
            .prepare(
                "UPDATE consentgate_consent SET record = jsonb_set(record, '{source}', to_jsonb($1::text)) \
                 WHERE patient_id = $2",
            )
            .await
            .expect("prepare");
        let mut send = admin_conn(&a.admin).await;
        let mut lat = Vec::with_capacity(a.n);
        for i in 0..a.n {
            let tag = format!("bench-{i}");
            let rows = db
                .execute(&stmt, &[&tag, &a.patient])
                .await
                .expect("UPDATE");
            assert_eq!(rows, 1, "patient {} is not in the table", a.patient);
            let t = Instant::now();
            while source(&mut send, &a).await.as_deref() != Some(tag.as_str()) {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "update {i} not visible after 10 s"
                );
            }
            lat.push(t.elapsed());
        }
        lat.sort();
        let q = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
        println!(
            "propagation over {} SQL updates (commit -> visible via admin GET): p50 {:?} p99 {:?} max {:?}",
            lat.len(),
            q(0.50),
            q(0.99),
            lat[lat.len() - 1]
        );
    });
}
