//! The query API over a real PostgreSQL, on both storage flavours (TimescaleDB on a private
//! cluster, skipped loudly where its files are not installed): ranges are routed to raw, hourly or daily data and
//! answer what SQL over raw answers; a tenant's token cannot read another tenant's devices;
//! bad parameters get a 400 naming them.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::{BTreeMap, BTreeSet};

use cloud_ingest::api::App;
use cloud_ingest::postgres::maintain;
use cloud_ingest::postgres::{self, Part};
use cloud_ingest::status::Gateways;
use common::timescale::Backend;
use plantlink_model::{Reading, Timestamp};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ACME: &str = "acme-token-0123456789abcdef";
const BETA: &str = "beta-token-0123456789abcdef";
const MIN_US: i64 = 60_000_000;
const DAY_US: i64 = 1440 * MIN_US;

/// `GET path` with an optional bearer token: (status, JSON body).
async fn get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn iso(us: i64) -> String {
    cloud_ingest::kafka::rfc3339(us)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_route_to_rollups_and_tenants_stay_apart() {
    for b in Backend::all("api") {
        eprintln!("the API on {}", b.name());
        ranges_route_and_tenants_stay_apart_on(&b).await;
    }
}

async fn ranges_route_and_tenants_stay_apart_on(b: &Backend) {
    let db = format!("plantlink_test_api_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let mut c = postgres::connect(&url).await.unwrap();

    // press01 (acme): temperature every 10 minutes for 200 days up to now; beta01 (beta).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let now = now - now % MIN_US;
    let start = now - 200 * DAY_US;
    let press: Vec<Reading> = (0..200 * 144)
        .map(|i| {
            let ts = start + i * 10 * MIN_US;
            Reading::new(
                "x",
                "press01",
                "temperature",
                Timestamp(ts),
                20.0 + (i % 37) as f64 / 4.0,
            )
        })
        .chain((0..100).map(|i| {
            Reading::new(
                "x",
                "press01",
                "pressure",
                Timestamp(now - i * MIN_US),
                1013.0 + i as f64,
            )
        }))
        .collect();
    let beta: Vec<Reading> = (0..100)
        .map(|i| {
            Reading::new(
                "x",
                "beta01",
                "temperature",
                Timestamp(now - i * MIN_US),
                99.0,
            )
        })
        .collect();
    let parts = [
        Part {
            tenant: "acme",
            gateway: "gw-a",
            readings: &press,
        },
        Part {
            tenant: "beta",
            gateway: "gw-b",
            readings: &beta,
        },
    ];
    b.write(&mut c, &parts).await;
    // Everything written is rolled up: a raw retention longer than the 200 days.
    b.roll(&c, 365).await;

    let tokens = BTreeMap::from([
        ("acme".to_owned(), ACME.to_owned()),
        ("beta".to_owned(), BETA.to_owned()),
    ]);
    let app = App::new(&url, &tokens, Gateways::default(), None, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app.router()).await });

    assert_eq!(get(addr, "/healthz", None).await.0, 200);
    assert_eq!(get(addr, "/readyz", None).await.0, 200);
    let (st, body) = get(addr, "/v1/devices/press01/metrics", None).await;
    assert_eq!(st, 401);
    assert!(body["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        get(
            addr,
            "/v1/devices/press01/metrics",
            Some("nope-nope-nope-nope")
        )
        .await
        .0,
        401
    );

    // One day: raw points, exactly the stored ones.
    let q = |from: i64, extra: &str| {
        format!(
            "/v1/devices/press01/metrics?metric=temperature&from={}&to={}{extra}",
            iso(now - from),
            iso(now + MIN_US)
        )
    };
    let (st, body) = get(addr, &q(DAY_US, ""), Some(ACME)).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["resolution"], "raw");
    let points = body["series"][0]["points"].as_array().unwrap();
    let want: i64 = pgc
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE device_id = 'press01' AND metric_name = 'temperature' AND ts >= $1",
            &[&(std::time::UNIX_EPOCH + std::time::Duration::from_micros((now - DAY_US) as u64))],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(points.len() as i64, want);
    assert_eq!(body["series"][0]["metric"], "temperature");

    // Ten days: hourly rollups; two hundred days: daily; each point as the rollup table has it.
    for (span, res, unit, table) in [
        (10 * DAY_US, "1h", "hour", "downsampled_metrics_1h"),
        (199 * DAY_US, "1d", "day", "downsampled_metrics_1d"),
    ] {
        let (st, body) = get(addr, &q(span, ""), Some(ACME)).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["resolution"], res);
        let points = body["series"][0]["points"].as_array().unwrap();
        let from = std::time::UNIX_EPOCH + std::time::Duration::from_micros((now - span) as u64);
        let rows = pgc
            .query(
                &format!(
                    "SELECT avg_val, count FROM {table} WHERE device_id = 'press01' AND metric_name = 'temperature'
                     AND bucket >= date_trunc('{unit}', $1::timestamptz) ORDER BY bucket"
                ),
                &[&from],
            )
            .await
            .unwrap();
        assert_eq!(points.len(), rows.len(), "{res}");
        for (p, r) in points.iter().zip(&rows) {
            // serde_json parses floats to within one ulp (its exact parser is the
            // `float_roundtrip` feature), so the mean is compared to within rounding.
            let (got, want) = (p["avg"].as_f64().unwrap(), r.get::<_, f64>(0));
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{res}: avg {got} from the API, {want} in {table}"
            );
            assert_eq!(p["count"].as_i64().unwrap(), r.get::<_, i64>(1));
        }
    }
    // An explicit resolution wins over auto.
    let (_, body) = get(addr, &q(DAY_US, "&resolution=1h"), Some(ACME)).await;
    assert_eq!(body["resolution"], "1h");
    // limit truncates, and says so.
    let (_, body) = get(addr, &q(DAY_US, "&limit=5"), Some(ACME)).await;
    assert_eq!(body["series"][0]["points"].as_array().unwrap().len(), 5);
    assert_eq!(body["truncated"], true);

    // Latest value per metric.
    let (st, body) = get(addr, "/v1/devices/press01/metrics/latest", Some(ACME)).await;
    assert_eq!(st, 200);
    assert_eq!(body["metrics"]["pressure"]["value"], 1013.0);
    assert_eq!(body["metrics"]["pressure"]["ts"], iso(now));

    // Fleet aggregates: a day from raw, 199 days from the daily rollups, both equal to SQL
    // over raw.
    for span in [DAY_US, 199 * DAY_US] {
        let path = format!(
            "/v1/tenants/acme/metrics/aggregate?metric=temperature&agg=avg&from={}&to={}",
            iso(maintain::day_of(now - span) * DAY_US),
            iso(now + MIN_US)
        );
        let (st, body) = get(addr, &path, Some(ACME)).await;
        assert_eq!(st, 200, "{body}");
        let from = std::time::UNIX_EPOCH
            + std::time::Duration::from_micros((maintain::day_of(now - span) * DAY_US) as u64);
        let truth: f64 = pgc
            .query_one(
                "SELECT avg(value) FROM raw_metrics WHERE tenant_id = 'acme' AND metric_name = 'temperature' AND ts >= $1",
                &[&from],
            )
            .await
            .unwrap()
            .get(0);
        let got = body["value"].as_f64().unwrap();
        assert!(
            (got - truth).abs() < 1e-9 * truth.abs(),
            "{got} vs {truth} ({})",
            body["resolution"]
        );
        assert_eq!(body["devices"], 1);
    }
    for agg in ["min", "max", "count"] {
        let (st, body) = get(
            addr,
            &format!("/v1/tenants/acme/metrics/aggregate?metric=pressure&agg={agg}"),
            Some(ACME),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        assert!(body["value"].is_number(), "{body}");
    }

    // Tenants stay apart: beta's token sees nothing of acme's, and the other way round.
    for (path, token) in [
        ("/v1/devices/press01/metrics".to_owned(), BETA),
        ("/v1/devices/press01/metrics/latest".to_owned(), BETA),
        ("/v1/devices/beta01/metrics/latest".to_owned(), ACME),
        ("/v1/devices/no-such-device/metrics".to_owned(), ACME),
    ] {
        let (st, body) = get(addr, &path, Some(token)).await;
        assert_eq!(st, 404, "{path}: {body}");
        assert!(body.get("series").is_none() && body.get("metrics").is_none());
    }
    let (st, body) = get(
        addr,
        "/v1/tenants/acme/metrics/aggregate?metric=temperature",
        Some(BETA),
    )
    .await;
    assert_eq!(st, 403);
    assert!(body.get("value").is_none());
    let (st, body) = get(
        addr,
        "/v1/devices/beta01/metrics?metric=temperature",
        Some(BETA),
    )
    .await;
    assert_eq!(st, 200);
    assert!(!body["series"].as_array().unwrap().is_empty());

    // Bad parameters: 400, naming the parameter.
    for (path, param) in [
        ("/v1/devices/press01/metrics?from=yesterday", "from"),
        ("/v1/devices/press01/metrics?to=2026-13-01T00:00:00Z", "to"),
        ("/v1/devices/press01/metrics?resolution=5m", "resolution"),
        ("/v1/devices/press01/metrics?limit=0", "limit"),
        ("/v1/devices/press01/metrics?metrics=temperature", "metrics"),
        (
            "/v1/devices/press01/metrics?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
            "from",
        ),
        (
            "/v1/tenants/acme/metrics/aggregate?metric=temperature&agg=median",
            "agg",
        ),
        ("/v1/tenants/acme/metrics/aggregate", "metric"),
    ] {
        let (st, body) = get(addr, path, Some(ACME)).await;
        assert_eq!(st, 400, "{path}: {body}");
        let msg = body["error"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("parameter {param}:")),
            "{path}: {msg}"
        );
    }

    let (st, body) = get(addr, "/v1/pipeline/lag", Some(ACME)).await;
    assert_eq!(st, 200);
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["kafka"]["enabled"], false);
    assert_eq!(get(addr, "/v2/nothing", Some(ACME)).await.0, 404);

    server.abort();
    drop((c, pgc));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// `deploy/openapi.yaml` documents every route the API serves, and nothing else.
#[test]
fn the_openapi_document_matches_the_routes() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/openapi.yaml"
    ))
    .unwrap();
    let documented: BTreeSet<&str> = doc
        .lines()
        .filter(|l| l.starts_with("  /") && l.trim_end().ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':'))
        .collect();
    let served: BTreeSet<&str> = cloud_ingest::api::ROUTES.into_iter().collect();
    assert_eq!(documented, served);
}
