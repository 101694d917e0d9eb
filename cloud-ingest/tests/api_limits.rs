//! The query API's limits over a real PostgreSQL: a raw range over the limit is refused at
//! once, before any query; one tenant's slow queries run into the statement timeout and its
//! concurrency limit without holding up another tenant or `/readyz`; the pool replaces
//! connections the server ended; `/v1/pipeline/lag` shows a tenant only its own gateways.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloud_ingest::api::{APPLICATION_NAME, App, Limits};
use cloud_ingest::postgres::maintain::{self, Partitions};
use cloud_ingest::status::Gateways;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ACME: &str = "acme-token-0123456789abcdef";
const BETA: &str = "beta-token-0123456789abcdef";
const DAY_US: i64 = 86_400_000_000;

fn tokens() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("acme".to_owned(), ACME.to_owned()),
        ("beta".to_owned(), BETA.to_owned()),
    ])
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn iso(us: i64) -> String {
    cloud_ingest::kafka::rfc3339(us)
}

/// `GET path` with an optional bearer token: (status, the head, the JSON body).
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, Value) {
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
    let split = text.find("\r\n\r\n").unwrap();
    let body = serde_json::from_str(&text[split + 4..]).unwrap_or(Value::Null);
    (status, text[..split].to_ascii_lowercase(), body)
}

/// `get`, and how long it took.
async fn timed(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, Value, Duration) {
    let start = Instant::now();
    let (st, _, body) = get(addr, path, token).await;
    (st, body, start.elapsed())
}

/// Serves `app` on a free port.
async fn serve(app: App) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app.router()).await.unwrap();
    });
    (addr, server)
}

fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

/// The API's sessions on `db` (those running a statement over raw_metrics when `active`).
async fn api_sessions(c: &tokio_postgres::Client, db: &str, active: bool) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2
           AND (NOT $3 OR (state = 'active' AND query LIKE '%raw_metrics%'))",
        &[&db, &APPLICATION_NAME, &active],
    )
    .await
    .unwrap()
    .get(0)
}

/// Polls `f` every 5 ms until it holds, for at most `limit`.
async fn until<F: std::future::Future<Output = bool>>(limit: Duration, mut f: impl FnMut() -> F) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn drop_db(admin: &tokio_postgres::Client, db: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_query_over_ten_years_is_refused_at_once_and_lag_shows_only_own_gateways() {
    let db = format!("plantlink_test_api_limits_raw_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let gateways = Gateways::default();
    gateways.connected("gw-acme", "acme");
    gateways.connected("gw-beta", "beta");
    let (addr, server) = serve(App::new(&url, &tokens(), gateways, None, None)).await;
    // Nothing listens on port 1: whatever this one answers, it answered without a database.
    let (nodb, nodb_server) = serve(App::new(
        "host=127.0.0.1 port=1 user=x connect_timeout=2",
        &tokens(),
        Gateways::default(),
        None,
        None,
    ))
    .await;

    let now = now_us();
    let ten_years = format!("from={}&to={}", iso(now - 3653 * DAY_US), iso(now));
    let raw = [
        format!("/v1/devices/press01/metrics?resolution=raw&{ten_years}"),
        format!("/v1/tenants/acme/metrics/aggregate?metric=temperature&resolution=raw&{ten_years}"),
    ];
    for a in [addr, nodb] {
        for path in &raw {
            let (st, body, took) = timed(a, path, Some(ACME)).await;
            assert_eq!(st, 400, "{path}: {body}");
            let msg = error(&body);
            assert!(msg.starts_with("parameter resolution: "), "{msg}");
            assert!(
                msg.contains("at most 7 days ([api] max_raw_range_days)"),
                "{msg}"
            );
            assert!(msg.contains("this range is 3653 days"), "{msg}");
            assert!(msg.contains("use resolution=1h, 1d or auto"), "{msg}");
            assert!(took < Duration::from_secs(2), "{path}: {took:?}");
        }
    }
    // The same ten years at auto (daily rollups) or 1h are answered from the database.
    for path in [
        format!("/v1/devices/press01/metrics?{ten_years}"),
        format!("/v1/tenants/acme/metrics/aggregate?metric=temperature&resolution=1h&{ten_years}"),
    ] {
        let (st, body, _) = timed(addr, &path, Some(ACME)).await;
        // press01 has no data: 404 for the series, a null value for the aggregate.
        assert!(st == 404 || st == 200, "{path}: {st} {body}");
        assert_ne!(body["resolution"], "raw", "{path}: {body}");
    }
    // The database down: answered quickly, with a 503 that says to retry.
    for path in ["/readyz", "/v1/alert-rules"] {
        let (st, body, took) = timed(nodb, path, Some(ACME)).await;
        assert_eq!(st, 503, "{path}: {body}");
        assert!(took < Duration::from_secs(3), "{path}: {took:?}");
    }

    // Each tenant sees only its own gateways.
    for (token, mine, theirs) in [(ACME, "gw-acme", "gw-beta"), (BETA, "gw-beta", "gw-acme")] {
        let (st, body, _) = timed(addr, "/v1/pipeline/lag", Some(token)).await;
        assert_eq!(st, 200, "{body}");
        let gws: BTreeSet<&str> = body["gateways"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            gws,
            BTreeSet::from([mine]),
            "{theirs} must not show: {body}"
        );
    }

    server.abort();
    nodb_server.abort();
    drop(pgc);
    drop_db(&admin, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_slow_queries_of_one_tenant_do_not_hold_up_another_or_readyz() {
    let db = format!("plantlink_test_api_limits_slow_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let now = now_us();
    // acme: four million readings over the last three days (1 s apart on each of 16
    // devices), so a raw aggregate over them takes several statement timeouts even on a
    // fast machine (a million took under one on this one); beta: a few.
    let start = now - 3 * DAY_US;
    let days: BTreeSet<i64> = (maintain::day_of(start)..=maintain::day_of(now)).collect();
    let mut c = cloud_ingest::postgres::connect(&url).await.unwrap();
    Partitions::default().ensure(&mut c, &days).await.unwrap();
    let since = UNIX_EPOCH + Duration::from_micros(start as u64);
    let filled = Instant::now();
    c.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    c.execute(
        "INSERT INTO raw_metrics (tenant_id, device_id, metric_name, value, ts, gateway_id)
         SELECT 'acme', 'press' || d, 'temperature', i % 100, $1::timestamptz + i * interval '1 s', 'gw-a'
         FROM generate_series(0, 15) d, generate_series(0, 249999) i",
        &[&since],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO raw_metrics (tenant_id, device_id, metric_name, value, ts, gateway_id)
         SELECT 'beta', 'beta01', 'temperature', 20, now() - i * interval '10 s', 'gw-b'
         FROM generate_series(1, 100) i",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("ANALYZE raw_metrics").await.unwrap();
    eprintln!("4,000,100 readings written in {:?}", filled.elapsed());

    let limits = Limits {
        statement_timeout_ms: 250,
        tenant_queue_ms: 100,
        ..Limits::default()
    };
    let app = App::new(&url, &tokens(), Gateways::default(), None, None).with_limits(limits);
    let (addr, server) = serve(app).await;
    let slow = format!(
        "/v1/tenants/acme/metrics/aggregate?metric=temperature&resolution=raw&from={}&to={}",
        iso(now - 4 * DAY_US),
        iso(now)
    );
    let fast = "/v1/tenants/beta/metrics/aggregate?metric=temperature";

    // Alone, acme's query runs into the statement timeout: it is slow for real.
    let (st, body, took) = timed(addr, &slow, Some(ACME)).await;
    assert_eq!(st, 503, "the slow query is not slow here: {body}");
    let msg = error(&body);
    assert!(
        msg.contains("statement timeout of 250 ms ([api] statement_timeout_ms)"),
        "{msg}"
    );
    assert!(
        msg.contains("narrow the range") && msg.contains("resolution=1h"),
        "{msg}"
    );
    eprintln!("acme's query alone: 503 after {took:?}");

    // Ten at once from acme; once its four turns are running in the database, beta and
    // /readyz are answered at once.
    let flood: Vec<_> = (0..10)
        .map(|_| {
            let slow = slow.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let (st, head, body) = get(addr, &slow, Some(ACME)).await;
                (st, head, body, start.elapsed())
            })
        })
        .collect();
    let running = limits.max_concurrent_per_tenant as i64;
    until(Duration::from_secs(10), || async {
        api_sessions(&pgc, &db, true).await >= running
    })
    .await;
    let (b, r) = tokio::join!(timed(addr, fast, Some(BETA)), timed(addr, "/readyz", None));
    // Were acme's queries still running while beta's was answered?
    let still = api_sessions(&pgc, &db, true).await;
    eprintln!(
        "while acme floods: beta {} in {:?}, /readyz {} in {:?}; acme statements still running: {still}",
        b.0, b.2, r.0, r.2
    );
    assert_eq!(b.0, 200, "{}", b.1);
    assert_eq!(b.1["devices"], 1, "{}", b.1);
    let bound = Duration::from_millis(limits.statement_timeout_ms + 1_000);
    assert!(b.2 < bound, "beta waited {:?}", b.2);
    assert_eq!(r.0, 200, "{}", r.1);
    assert!(r.2 < bound, "/readyz waited {:?}", r.2);

    let (mut timed_out, mut refused) = (0, 0);
    for a in flood {
        let (st, head, body, took) = a.await.unwrap();
        let msg = error(&body);
        match st {
            503 => {
                assert!(msg.contains("statement timeout of 250 ms"), "{msg}");
                timed_out += 1;
            }
            429 => {
                assert!(
                    msg.contains(
                        "already has 4 requests running ([api] max_concurrent_per_tenant)"
                    ),
                    "{msg}"
                );
                assert!(msg.contains("[api] tenant_queue_ms"), "{msg}");
                assert!(head.contains("retry-after: 1"), "{head}");
                refused += 1;
            }
            other => panic!("acme: {other} {body}"),
        }
        assert!(took < Duration::from_secs(5), "acme waited {took:?}");
    }
    eprintln!("acme's ten: {timed_out} cut off by the statement timeout, {refused} refused 429");
    assert!(timed_out >= running, "{timed_out} timed out");
    assert!(refused >= 1, "none refused");
    assert_eq!(timed_out + refused, 10);

    server.abort();
    drop((c, pgc));
    drop_db(&admin, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reconnects_after_the_server_ends_its_connections() {
    let db = format!("plantlink_test_api_limits_reconnect_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (addr, server) = serve(App::new(&url, &tokens(), Gateways::default(), None, None)).await;
    let rules = "/v1/alert-rules";
    assert_eq!(timed(addr, rules, Some(ACME)).await.0, 200);
    assert_eq!(timed(addr, "/readyz", None).await.0, 200);
    // One query connection and the one of /readyz.
    assert_eq!(api_sessions(&pgc, &db, false).await, 2);

    let ended: i64 = pgc
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE datname = $1 AND application_name = $2) t",
            &[&db, &APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 2);
    until(Duration::from_secs(10), || async {
        api_sessions(&pgc, &db, false).await == 0
    })
    .await;

    for _ in 0..3 {
        let (st, body, _) = timed(addr, rules, Some(ACME)).await;
        assert_eq!(st, 200, "{body}");
        let (st, body, _) = timed(addr, "/readyz", None).await;
        assert_eq!(st, 200, "{body}");
    }
    assert_eq!(api_sessions(&pgc, &db, false).await, 2);

    server.abort();
    drop(pgc);
    drop_db(&admin, &db).await;
}
