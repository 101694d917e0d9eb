//! The plant-data dashboard (`deploy/grafana/plantlink-plant-data.json`) against a real
//! database of both flavours: every panel's and every variable's SQL, with Grafana's macros
//! expanded as its PostgreSQL data source expands them, runs and returns rows for demo-like
//! data, and the series panel picks raw readings, the hourly or the daily rollup by the
//! dashboard's time range, as the API's `resolution=auto` does. Another tenant's readings
//! never show.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use cloud_ingest::postgres::Part;
use common::timescale::Backend;
use plantlink_model::{Reading, Timestamp};

const DAY_US: i64 = 86_400_000_000;

/// (title, SQL) of every panel target and template variable.
fn queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/plantlink-plant-data.json"
    ))
    .unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(
                p["datasource"]["uid"], "plantlink-postgres",
                "{}",
                p["title"]
            );
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["rawSql"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        out.push((
            format!("variable {}", v["name"]),
            v["query"].as_str().unwrap().to_owned(),
        ));
    }
    out
}

/// `sql` as Grafana sends it for the range `from`..`to` (RFC 3339) and these variables.
fn expand(sql: &str, from: &str, to: &str, vars: &[(&str, &str)]) -> String {
    let mut s = sql.to_owned();
    while let Some(at) = s.find("$__timeFilter(") {
        let open = at + "$__timeFilter(".len();
        let close = open + s[open..].find(')').unwrap();
        let col = s[open..close].to_owned();
        s.replace_range(at..=close, &format!("{col} BETWEEN '{from}' AND '{to}'"));
    }
    s = s
        .replace("$__timeFrom()", &format!("'{from}'"))
        .replace("$__timeTo()", &format!("'{to}'"));
    for (k, v) in vars {
        s = s.replace(&format!("${k}"), v);
    }
    assert!(!s.contains('$'), "unexpanded: {s}");
    s
}

fn rfc3339(us: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_the_demo_data_on_both_flavours() {
    for b in Backend::all("grafana") {
        eprintln!("the plant-data dashboard on {}", b.name());
        on(&b).await;
    }
}

async fn on(b: &Backend) {
    let db = format!("plantlink_test_grafana_{}", std::process::id());
    let (admin, _url, mut c) = b.database(&db).await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let step = 300_000_000; // 5 minutes
    let start = (now_us - 3 * DAY_US) / step * step;
    let mut demo = Vec::new();
    let mut other = Vec::new();
    let mut ts = start;
    while ts < now_us {
        for device in ["press01", "press02"] {
            let v = 60.0 + ((ts / step) % 20) as f64;
            demo.push(Reading::new(
                "demo",
                device,
                "temperature",
                Timestamp(ts),
                v,
            ));
            demo.push(Reading::new("demo", device, "pressure", Timestamp(ts), 6.0));
        }
        other.push(Reading::new(
            "other",
            "press01",
            "temperature",
            Timestamp(ts),
            1000.0,
        ));
        ts += step;
    }
    for chunk in demo.chunks(5_000) {
        b.write(
            &mut c,
            &[Part {
                tenant: "demo",
                gateway: "gw-1",
                readings: chunk,
            }],
        )
        .await;
    }
    b.write(
        &mut c,
        &[Part {
            tenant: "other",
            gateway: "gw-9",
            readings: &other,
        }],
    )
    .await;
    b.roll(&c, 36_500).await;
    c.batch_execute(
        "INSERT INTO devices (tenant_id, device_id, last_seen_at) VALUES
             ('demo', 'press01', now()), ('demo', 'press02', now()), ('other', 'press01', now())
         ON CONFLICT (tenant_id, device_id) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at;
         INSERT INTO alert_rules (tenant_id, name, metric_name, condition_expr, threshold,
                                  window_seconds, severity)
         VALUES ('demo', 'overheating', 'temperature', '{}'::jsonb, 75, 60, 'critical');
         INSERT INTO alerts (rule_id, tenant_id, device_id, state, severity, value, threshold,
                             window_start, window_end, backfill, event_id)
         SELECT rule_id, 'demo', 'press01', 'firing', 'critical', 79, 75,
                now() - interval '2 minutes', now() - interval '1 minute', false, 'grafana-test'
         FROM alert_rules WHERE tenant_id = 'demo'",
    )
    .await
    .unwrap();

    let vars = [
        ("tenant", "demo"),
        ("device", "press01"),
        ("metric", "temperature"),
    ];
    // (range, the series panel's rows: raw 5-minute points, hourly or daily buckets)
    let ranges = [
        (6 * 3_600_000_000i64, "raw", 71..=73),
        (30 * DAY_US, "1h", 71..=74),
        (365 * DAY_US, "1d", 3..=4),
    ];
    for (span, resolution, rows) in ranges {
        let (from, to) = (rfc3339(now_us - span), rfc3339(now_us));
        for (title, sql) in queries() {
            let sql = expand(&sql, &from, &to, &vars);
            let got = c
                .query(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{} on {}: {title}: {e}\n{sql}", b.name(), resolution));
            assert!(
                !got.is_empty(),
                "{} over {resolution}: {title} returned no rows\n{sql}",
                b.name()
            );
            if title.starts_with("$metric of $device (raw") {
                assert!(
                    rows.contains(&got.len()),
                    "{} over {resolution}: the series has {} rows, expected {rows:?}",
                    b.name(),
                    got.len()
                );
                let max = got
                    .iter()
                    .map(|r| r.get::<_, f64>(1))
                    .fold(f64::MIN, f64::max);
                assert!(
                    max < 100.0,
                    "another tenant's readings in the series: {max}"
                );
            }
            if title.starts_with("variable tenant") {
                let tenants: Vec<String> = got.iter().map(|r| r.get(0)).collect();
                assert_eq!(tenants, ["demo", "other"]);
            }
            if title.starts_with("variable metric") {
                let metrics: Vec<String> = got.iter().map(|r| r.get(0)).collect();
                assert_eq!(metrics, ["pressure", "temperature"]);
            }
            if title.starts_with("Open alerts") {
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].get::<_, String>("rule"), "overheating");
            }
        }
    }
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
