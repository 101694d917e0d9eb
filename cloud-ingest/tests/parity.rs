//! The same dataset into plain PostgreSQL and into TimescaleDB (a private cluster; skipped
//! loudly where the extension is not installed): two tenants' `pump-1` over two days, late
//! readings, replays and a four-day-old backfill. Every API answer (raw, 1h, 1d, auto,
//! latest, aggregate) is compared between the flavours: equal, or equal within float
//! rounding.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::BTreeMap;

use cloud_ingest::api::App;
use cloud_ingest::postgres::Part;
use common::timescale::Backend;
use plantlink_model::{Reading, Timestamp};
use serde_json::Value;

const MIN_US: i64 = 60_000_000;
const HOUR_US: i64 = 60 * MIN_US;
const DAY_US: i64 = 24 * HOUR_US;
const ACME: &str = "acme-token-0123456789abcdef";
const BETA: &str = "beta-token-0123456789abcdef";

fn series(start_us: i64, n: i64, step_us: i64, base: f64) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            Reading::new(
                "x",
                "pump-1",
                "temperature",
                Timestamp(start_us + i * step_us),
                base + ((i * 37) % 101) as f64 / 8.0,
            )
        })
        .collect()
}

async fn write(b: &Backend, c: &mut tokio_postgres::Client, acme: &[Reading], beta: &[Reading]) {
    let parts = [
        Part {
            tenant: "acme",
            gateway: "gw-a",
            readings: acme,
        },
        Part {
            tenant: "beta",
            gateway: "gw-b",
            readings: beta,
        },
    ];
    b.write(c, &parts).await;
}

/// What the upkeep does for the rollups, on each flavour (the default raw retention).
async fn upkeep(b: &Backend, c: &tokio_postgres::Client) {
    b.roll(c, 7).await;
}

/// Numbers equal within rounding; everything else equal.
fn same(a: &Value, b: &Value, path: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            if (x - y).abs() <= 1e-9 * x.abs().max(1.0) {
                Ok(())
            } else {
                Err(format!("{path}: {x} vs {y}"))
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .try_for_each(|(i, (x, y))| same(x, y, &format!("{path}[{i}]"))),
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
            x.iter().try_for_each(|(k, v)| {
                same(v, y.get(k).unwrap_or(&Value::Null), &format!("{path}.{k}"))
            })
        }
        _ if a == b => Ok(()),
        _ => Err(format!("{path}: {a} vs {b}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_flavours_answer_every_query_alike() {
    let backends = Backend::all("parity");
    if backends.len() < 2 {
        return; // Backend::all said why
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let now = now - now % MIN_US;
    let main_acme = series(now - 2 * DAY_US, 2 * 24 * 30, 2 * MIN_US, 20.0);
    let main_beta = series(now - 2 * DAY_US, 2 * 24 * 30, 2 * MIN_US, 80.0);
    let late_hour = (now - 5 * HOUR_US).div_euclid(HOUR_US) * HOUR_US;
    let late = series(late_hour + 1_000_000, 20, 1_000_000, 300.0);
    let backfill = series(now - 4 * DAY_US, 90, MIN_US, -40.0);

    let db = format!("plantlink_test_parity_{}", std::process::id());
    let tokens = BTreeMap::from([
        ("acme".to_owned(), ACME.to_owned()),
        ("beta".to_owned(), BETA.to_owned()),
    ]);
    let mut servers = Vec::new();
    let mut admins = Vec::new();
    for b in &backends {
        let (admin, url, mut c) = b.database(&db).await;
        write(b, &mut c, &main_acme, &main_beta).await;
        upkeep(b, &c).await;
        // Late readings for a rolled-up hour, a replay of the main batch, the backfill.
        write(b, &mut c, &late, &late).await;
        write(b, &mut c, &main_acme, &main_beta).await;
        write(b, &mut c, &backfill, &backfill[..45]).await;
        upkeep(b, &c).await;
        let app = App::new(&url, &tokens, Default::default(), None, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app.router()).await });
        servers.push(addr);
        admins.push((admin, c));
    }

    let iso = |us: i64| cloud_ingest::kafka::rfc3339(us);
    let mut paths = Vec::new();
    for (from, to) in [
        (now - DAY_US, now + MIN_US),
        (now - 5 * DAY_US, now + MIN_US),
    ] {
        for res in ["raw", "1h", "1d", "auto"] {
            paths.push(format!(
                "/v1/devices/pump-1/metrics?metric=temperature&from={}&to={}&resolution={res}&limit=100000",
                iso(from),
                iso(to)
            ));
        }
        for agg in ["avg", "min", "max", "count"] {
            for tenant in ["acme", "beta"] {
                paths.push(format!(
                    "/v1/tenants/{tenant}/metrics/aggregate?metric=temperature&agg={agg}&from={}&to={}",
                    iso(from),
                    iso(to)
                ));
            }
        }
    }
    paths.push("/v1/devices/pump-1/metrics/latest".to_owned());
    let mut compared = 0;
    for path in &paths {
        for token in [ACME, BETA] {
            if (path.contains("/tenants/acme/") && token == BETA)
                || (path.contains("/tenants/beta/") && token == ACME)
            {
                continue;
            }
            let answers: Vec<Value> = servers
                .iter()
                .map(|addr| {
                    let text = common::http_get(*addr, path, Some(token)).unwrap();
                    assert!(text.contains(" 200 "), "{path}: {text}");
                    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
                    serde_json::from_str(body).unwrap()
                })
                .collect();
            if let Err(e) = same(&answers[0], &answers[1], path) {
                panic!(
                    "plain and TimescaleDB differ: {e}\nplain: {}\ntimescale: {}",
                    answers[0], answers[1]
                );
            }
            compared += 1;
        }
    }
    assert!(compared >= 30, "{compared}");
    for (admin, c) in admins.into_iter().take(1) {
        drop(c);
        admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await
            .unwrap();
    }
}
