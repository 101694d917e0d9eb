//! `migrate` upgrades a database of the first release (schema version 1, keys without the
//! tenant) in place, on plain PostgreSQL and on TimescaleDB (a private cluster that preloads
//! it; skipped loudly where the extension is not installed): no row lost, keys that lead with
//! the tenant, rollups per tenant, devices per tenant, safe with two replicas at once; a
//! version 2 TimescaleDB database gets its daily aggregate rebuilt on the hourly one where
//! that loses nothing, and keeps it where it would; and a schema newer than the binary makes
//! `migrate` and `run` refuse to start.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::process::Command;

use cloud_ingest::config::{Postgres, Timescale};
use cloud_ingest::postgres::{self, Flavor, Part, STAGING, maintain};
use plantlink_model::{Reading, Timestamp};

const COMMON_V1: &str = include_str!("fixtures/schema_v1_common.sql");
const PLAIN_V1: &str = include_str!("fixtures/schema_v1_plain.sql");
const TIMESCALE_V1: &str = include_str!("fixtures/schema_v1_timescale.sql");

/// Row counts and value sums that must not change: raw per tenant and device, and the
/// total count the daily rollups hold.
async fn totals(c: &tokio_postgres::Client) -> Vec<(String, i64, f64)> {
    c.query(
        "SELECT tenant_id || '/' || device_id, count(*), sum(value) FROM raw_metrics
         GROUP BY 1 ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

async fn key_of(c: &tokio_postgres::Client, table: &str) -> String {
    c.query_one(
        "SELECT string_agg(a.attname, ', ' ORDER BY k.ord)
         FROM pg_constraint p
         CROSS JOIN LATERAL unnest(p.conkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = p.conrelid AND a.attnum = k.attnum
         WHERE p.conrelid = $1::text::regclass AND p.contype = 'p'",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_version_1_database_in_place() {
    let db = format!("plantlink_test_upgrade_{}", std::process::id());
    let admin = common::pg(&common::admin_dsn(), &db).await;
    let url = format!(
        "{} dbname={db}",
        common::admin_dsn().replace("dbname=postgres", "")
    );
    let c = postgres::connect(&url).await.unwrap();
    c.batch_execute(COMMON_V1).await.unwrap();
    c.batch_execute(PLAIN_V1).await.unwrap();
    let before = totals(&c).await;
    assert_eq!(before.len(), 3, "{before:?}");
    assert_eq!(postgres::upgrade::current(&c).await.unwrap(), 1);
    // Version 1 mixed beta's press01 into acme's rollups.
    assert!(common::rollup_mismatches(&c, "downsampled_metrics_1h", "hour").await > 0);

    let mut cfg = Postgres::with_url(&url);
    cfg.timescaledb = Timescale::Auto;
    // The fixture's days stay inside the raw retention whatever day the test runs.
    cfg.retention.raw_days = 36_500;
    // `run` refuses to upgrade, naming the command that does; nothing changes.
    let dir = std::env::temp_dir().join(format!("plantlink-upgrade-{}", std::process::id()));
    common::fleet(&dir, "gw-u");
    let toml = dir.join("cloud.toml");
    std::fs::write(
        &toml,
        format!(
            "[quic]\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
             client_ca = \"ca.pem\"\n[postgres]\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
        .args(["run", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("schema version 1") && stderr.contains("cloud-ingest migrate"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(postgres::upgrade::current(&c).await.unwrap(), 1);

    // Two `migrate`s at once, both waiting on the lock that a third connection holds, then
    // let go together: one upgrades, the other finds it done.
    let c2 = postgres::connect(&url).await.unwrap();
    let holder = postgres::connect(&url).await.unwrap();
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&0x706c_616e_746c_6e6bi64])
        .await
        .unwrap();
    let (ca, cb) = (cfg.clone(), cfg.clone());
    let (url_a, url_b) = (url.clone(), url.clone());
    let a = tokio::spawn(async move {
        let c = postgres::connect(&url_a).await.unwrap();
        postgres::migrate(&c, &ca).await.map_err(|e| e.to_string())
    });
    let b = tokio::spawn(async move {
        let c = postgres::connect(&url_b).await.unwrap();
        postgres::migrate(&c, &cb).await.map_err(|e| e.to_string())
    });
    loop {
        let waiting: i64 = holder
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    holder
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!((a.unwrap(), b.unwrap()), (Flavor::Plain, Flavor::Plain));
    drop(holder);
    assert_eq!(
        postgres::upgrade::current(&c).await.unwrap(),
        postgres::schema::VERSION
    );

    assert_eq!(
        totals(&c).await,
        before,
        "raw rows and sums survive the upgrade"
    );
    assert_eq!(
        key_of(&c, "raw_metrics").await,
        "tenant_id, device_id, metric_name, ts"
    );
    for t in ["downsampled_metrics_1h", "downsampled_metrics_1d"] {
        assert_eq!(
            key_of(&c, t).await,
            "tenant_id, device_id, metric_name, bucket"
        );
    }
    assert_eq!(
        key_of(&c, "rollup_dirty").await,
        "tenant_id, device_id, metric_name, bucket"
    );
    assert_eq!(key_of(&c, "devices").await, "tenant_id, device_id");
    // `migrate` recomputed the rollups per tenant.
    assert_eq!(
        common::rollup_mismatches(&c, "downsampled_metrics_1h", "hour").await,
        0
    );
    assert_eq!(
        common::rollup_mismatches(&c, "downsampled_metrics_1d", "day").await,
        0
    );
    let devices: Vec<(String, String)> = c
        .query(
            "SELECT tenant_id, device_id FROM devices ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        devices,
        [
            ("acme", "press01"),
            ("acme", "press02"),
            ("beta", "press01")
        ]
        .map(|(t, d)| (t.to_owned(), d.to_owned()))
    );
    let open: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'alerts_one_open'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(open.contains("(tenant_id, rule_id, device_id)"), "{open}");
    let firing: i64 = c
        .query_one("SELECT count(*) FROM alerts WHERE state = 'firing'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(firing, 1, "the open alert survives");

    // What version 1 could not hold: beta's press01 at acme's exact timestamps.
    let mut w = postgres::connect(&url).await.unwrap();
    w.batch_execute(STAGING).await.unwrap();
    let same: Vec<Reading> = (0..60)
        .map(|i| {
            Reading::new(
                "x",
                "press01",
                "temperature",
                Timestamp(1_795_910_400_000_000 + i * 10_000_000), // 2026-11-29 00:00 UTC
                -1.0,
            )
        })
        .collect();
    let parts = [Part {
        tenant: "beta",
        gateway: "gw-beta",
        readings: &same,
    }];
    let written = postgres::write(&mut w, Flavor::Plain, &parts)
        .await
        .unwrap();
    assert_eq!((written.inserted, written.conflicts.len()), (60, 0));
    maintain::roll(&w).await.unwrap();
    assert_eq!(
        common::rollup_mismatches(&c, "downsampled_metrics_1h", "hour").await,
        0
    );

    // Running migrate again changes nothing.
    assert_eq!(postgres::migrate(&c, &cfg).await.unwrap(), Flavor::Plain);
    let versions: i64 = c
        .query_one("SELECT count(*) FROM plantlink_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 1);

    drop((c, c2, w));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_schema_from_the_future_is_refused_by_migrate_and_run() {
    let db = format!("plantlink_test_future_{}", std::process::id());
    let (admin, url, c) = common::database(&db).await;
    let future = postgres::schema::VERSION + 1;
    c.execute(
        "INSERT INTO plantlink_schema (version, applied_by) VALUES ($1, 'cloud-ingest 9.9.9')",
        &[&future],
    )
    .await
    .unwrap();
    let before: i64 = c
        .query_one("SELECT count(*) FROM pg_tables", &[])
        .await
        .unwrap()
        .get(0);
    let err = postgres::migrate(&c, &Postgres::with_url(&url))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("schema version {future}")) && err.contains("newer"),
        "{err}"
    );

    // The binary: `migrate` and `run` both exit with the reason.
    let dir = std::env::temp_dir().join(format!("plantlink-future-{}", std::process::id()));
    common::fleet(&dir, "gw-f");
    let cfg = dir.join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "[quic]\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
             client_ca = \"ca.pem\"\n[postgres]\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    for cmd in ["migrate", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} started: {stderr}");
        assert!(
            stderr.contains(&format!("schema version {future}")),
            "{cmd}: {stderr}"
        );
    }
    let after: i64 = c
        .query_one("SELECT count(*) FROM pg_tables", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after, "nothing was changed");

    let _ = std::fs::remove_dir_all(&dir);
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_version_1_timescaledb_database_in_place() {
    let Some(cluster) = common::timescale::Cluster::start("upgrade") else {
        return;
    };
    let db = "plantlink_upgrade";
    let _admin = common::pg(&cluster.admin_dsn(), db).await;
    let url = cluster.dsn(db);
    let c = postgres::connect(&url).await.unwrap();
    c.batch_execute(COMMON_V1).await.unwrap();
    c.batch_execute(TIMESCALE_V1).await.unwrap();
    // The first day compressed, as the policy would have done; the aggregates refreshed.
    c.batch_execute(
        "SELECT compress_chunk(c) FROM show_chunks('raw_metrics', older_than => '2026-11-29 00:00+00'::timestamptz) c",
    )
    .await
    .unwrap();
    for cagg in ["downsampled_metrics_1h", "downsampled_metrics_1d"] {
        c.batch_execute(&format!(
            "CALL refresh_continuous_aggregate('{cagg}', NULL, NULL)"
        ))
        .await
        .unwrap();
    }
    let before = totals(&c).await;
    assert_eq!(before.len(), 3, "{before:?}");
    assert_eq!(postgres::upgrade::current(&c).await.unwrap(), 1);

    let mut cfg = Postgres::with_url(&url);
    cfg.timescaledb = Timescale::Auto;
    cfg.retention.raw_days = 36_500;
    let c2 = postgres::connect(&url).await.unwrap();
    let (a, b) = tokio::join!(postgres::migrate(&c, &cfg), postgres::migrate(&c2, &cfg));
    assert_eq!(
        (a.unwrap(), b.unwrap()),
        (Flavor::Timescale, Flavor::Timescale)
    );
    assert_eq!(
        postgres::upgrade::current(&c).await.unwrap(),
        postgres::schema::VERSION
    );
    assert_eq!(
        totals(&c).await,
        before,
        "raw rows and sums survive the upgrade"
    );
    assert_eq!(
        key_of(&c, "raw_metrics").await,
        "tenant_id, device_id, metric_name, ts"
    );
    assert_eq!(key_of(&c, "devices").await, "tenant_id, device_id");
    assert!(
        daily_definition(&c)
            .await
            .contains("downsampled_metrics_1h"),
        "the daily aggregate is rebuilt on the hourly one"
    );
    let segmentby: String = c
        .query_one(
            "SELECT segmentby FROM timescaledb_information.hypertable_compression_settings
             WHERE hypertable = 'raw_metrics'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(segmentby, "tenant_id,device_id,metric_name");
    let devices: i64 = c
        .query_one("SELECT count(*) FROM devices", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(devices, 3);

    // Beta's press01 at acme's exact timestamps, on both days; then the compression policy
    // runs (by hand: see ../shared/timescaledb/README.md) and everything is still there once.
    let mut w = postgres::connect(&url).await.unwrap();
    w.batch_execute(STAGING).await.unwrap();
    let same: Vec<Reading> = [1_795_824_000_000_000i64, 1_795_910_400_000_000]
        .iter()
        .flat_map(|day| {
            (0..30).map(move |i| {
                Reading::new(
                    "x",
                    "press01",
                    "temperature",
                    Timestamp(day + i * 10_000_000),
                    -1.0,
                )
            })
        })
        .collect();
    let parts = [Part {
        tenant: "beta",
        gateway: "gw-beta",
        readings: &same,
    }];
    let written = postgres::write(&mut w, Flavor::Timescale, &parts)
        .await
        .unwrap();
    assert_eq!((written.inserted, written.conflicts.len()), (60, 0));
    let job: i32 = c
        .query_one(
            "SELECT job_id FROM timescaledb_information.jobs
             WHERE proc_name = 'policy_compression' AND hypertable_name = 'raw_metrics'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.batch_execute(&format!("CALL run_job({job})"))
        .await
        .unwrap();
    // The first day's chunk, decompressed by the upgrade, is compressed again (the second
    // day's is too once it is older than compress_after_days).
    let first_day: bool = c
        .query_one(
            "SELECT is_compressed FROM timescaledb_information.chunks
             WHERE hypertable_name = 'raw_metrics' AND range_start = '2026-11-28 00:00+00'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(first_day, "the policy recompresses the first day's chunk");
    let replay = postgres::write(&mut w, Flavor::Timescale, &parts)
        .await
        .unwrap();
    assert_eq!(
        (replay.inserted, replay.replays),
        (0, 60),
        "a replay into compressed chunks adds nothing"
    );
    let mut after = before.clone();
    after[2].1 += 60;
    after[2].2 -= 60.0;
    assert_eq!(totals(&c).await, after);
    for cagg in ["downsampled_metrics_1h", "downsampled_metrics_1d"] {
        c.batch_execute(&format!(
            "CALL refresh_continuous_aggregate('{cagg}', NULL, NULL)"
        ))
        .await
        .unwrap();
    }
    assert_eq!(
        common::rollup_mismatches(&c, "downsampled_metrics_1h", "hour").await,
        0
    );
    assert_eq!(
        common::rollup_mismatches(&c, "downsampled_metrics_1d", "day").await,
        0
    );
    drop((c, c2, w));
}

/// `migrate` on TimescaleDB, which must leave the current schema version.
async fn migrate_to_current(c: &tokio_postgres::Client, cfg: &Postgres) {
    assert_eq!(postgres::migrate(c, cfg).await.unwrap(), Flavor::Timescale);
    assert_eq!(
        postgres::upgrade::current(c).await.unwrap(),
        postgres::schema::VERSION
    );
}

/// The definition of the daily continuous aggregate.
async fn daily_definition(c: &tokio_postgres::Client) -> String {
    c.query_one(
        "SELECT view_definition FROM timescaledb_information.continuous_aggregates
         WHERE view_name = 'downsampled_metrics_1d'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Every daily rollup row: key, count, min, max, the sum rounded to 1e-6 and the mean to 1e-9.
async fn daily_rows(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT concat_ws(' ', tenant_id, device_id, metric_name, bucket, count, min_val,
                          max_val, round(sum_val::numeric, 6), round(avg_val::numeric, 9))
         FROM downsampled_metrics_1d ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Turns a current TimescaleDB database back into version 2: its daily aggregate read raw.
async fn as_version_2(c: &tokio_postgres::Client, today: &str) {
    c.batch_execute(
        "DROP MATERIALIZED VIEW downsampled_metrics_1d;
         CREATE MATERIALIZED VIEW downsampled_metrics_1d
         WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
         SELECT tenant_id, device_id, metric_name, time_bucket(INTERVAL '1 day', ts) AS bucket,
                min(value) AS min_val, max(value) AS max_val, avg(value) AS avg_val,
                sum(value) AS sum_val, count(*) AS count
         FROM raw_metrics
         GROUP BY tenant_id, device_id, metric_name, time_bucket(INTERVAL '1 day', ts)
         WITH NO DATA;
         DELETE FROM plantlink_schema WHERE version > 2;
         INSERT INTO plantlink_schema (version, applied_by) VALUES (2, 'the test')
         ON CONFLICT DO NOTHING;",
    )
    .await
    .unwrap();
    c.batch_execute(&format!(
        "CALL refresh_continuous_aggregate('downsampled_metrics_1d', NULL, '{today}')"
    ))
    .await
    .unwrap();
    assert_eq!(postgres::upgrade::current(c).await.unwrap(), 2);
    assert!(!daily_definition(c).await.contains("downsampled_metrics_1h"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_daily_aggregate_is_rebuilt_on_the_hourly_one_where_nothing_is_lost() {
    let Some(cluster) = common::timescale::Cluster::start("upgrade-v2") else {
        return;
    };
    let b = common::timescale::Backend::Timescale(cluster);
    let (_admin, url, mut c) = b.database("plantlink_upgrade_v2").await;
    let mut cfg = b.config(&url);
    cfg.retention.raw_days = 36_500;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    const DAY_US: i64 = 86_400_000_000;
    let today_us = now.div_euclid(DAY_US) * DAY_US;
    let today = cloud_ingest::kafka::rfc3339(today_us);
    // Three complete days of two tenants' readings, every 10 minutes, rolled up.
    let rs: Vec<Reading> = (0..3 * 144)
        .map(|i| {
            Reading::new(
                "x",
                format!("dev-{}", i % 3),
                "temperature",
                Timestamp(today_us - 3 * DAY_US + i * 600_000_000),
                (i % 41) as f64 / 3.0,
            )
        })
        .collect();
    let parts = [
        Part {
            tenant: "acme",
            gateway: "gw-a",
            readings: &rs,
        },
        Part {
            tenant: "beta",
            gateway: "gw-b",
            readings: &rs[..200],
        },
    ];
    b.write(&mut c, &parts).await;
    b.roll(&c, cfg.retention.raw_days).await;

    // Hourly rollups that reproduce every daily row: rebuilt on the hourly one, refreshed,
    // the same rows. `run` does this upgrade itself (its tables stay as version 2 wrote them).
    as_version_2(&c, &today).await;
    let before = daily_rows(&c).await;
    assert_eq!(before.len(), 3 * 3 + 3 * 2, "{before:?}");
    let hourly_days = cfg.retention.hourly_days;
    assert_eq!(
        postgres::upgrade::v3_daily(&c, hourly_days).await.unwrap(),
        postgres::upgrade::Daily::Rebuild
    );
    // `run` leaves the upgrade to `migrate`, and says so.
    let err = postgres::migrate_for_run(&c, &cfg)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("schema version 2") && err.contains("cloud-ingest migrate"),
        "{err}"
    );
    migrate_to_current(&c, &cfg).await;
    assert!(
        daily_definition(&c)
            .await
            .contains("downsampled_metrics_1h")
    );
    assert_eq!(daily_rows(&c).await, before);
    // Materialized, not only computed at query time: the rows are in its hypertable.
    let materialized: i64 = c
        .query_one(
            "SELECT count(*) FROM downsampled_metrics_1d WHERE bucket < $1",
            &[&postgres::system_time(today_us)],
        )
        .await
        .unwrap()
        .get(0);
    c.batch_execute(
        "ALTER MATERIALIZED VIEW downsampled_metrics_1d SET (timescaledb.materialized_only = true)",
    )
    .await
    .unwrap();
    let only: i64 = c
        .query_one("SELECT count(*) FROM downsampled_metrics_1d", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(only, materialized);
    c.batch_execute("ALTER MATERIALIZED VIEW downsampled_metrics_1d SET (timescaledb.materialized_only = false)")
        .await
        .unwrap();
    assert_eq!(
        common::rollup_mismatches(&c, "downsampled_metrics_1d", "day").await,
        0
    );

    // An upgrade stopped after the rebuild, before its refresh: still version 2, and the next
    // `migrate` refreshes, adds the policies and records version 3.
    as_version_2(&c, &today).await;
    c.batch_execute(&format!(
        "BEGIN; {}{}COMMIT;",
        postgres::upgrade::DROP_DAILY,
        postgres::schema::DAILY
    ))
    .await
    .unwrap();
    assert_eq!(postgres::upgrade::current(&c).await.unwrap(), 2);
    assert_eq!(
        postgres::upgrade::v3_daily(&c, hourly_days).await.unwrap(),
        postgres::upgrade::Daily::Refresh
    );
    migrate_to_current(&c, &cfg).await;
    assert_eq!(daily_rows(&c).await, before);
    let policies: i64 = c
        .query_one(
            "SELECT count(*) FROM timescaledb_information.jobs j
             LEFT JOIN timescaledb_information.continuous_aggregates ca
                    ON ca.materialization_hypertable_name = j.hypertable_name
             WHERE coalesce(ca.view_name, j.hypertable_name) = 'downsampled_metrics_1d'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(policies, 2, "refresh and retention policies");

    // Hourly rollups that lost days the daily ones hold (as the hourly retention does after
    // two years, long after the raw retention): the daily aggregate keeps its version 2
    // definition and its rows.
    as_version_2(&c, &today).await;
    c.batch_execute(&format!(
        "SELECT drop_chunks('raw_metrics', older_than => '{today}'::timestamptz);
         SELECT drop_chunks('downsampled_metrics_1h', older_than => now() + INTERVAL '3650 days');"
    ))
    .await
    .unwrap();
    let before = daily_rows(&c).await;
    assert_eq!(before.len(), 3 * 3 + 3 * 2, "{before:?}");
    assert_eq!(
        postgres::upgrade::v3_daily(&c, hourly_days).await.unwrap(),
        postgres::upgrade::Daily::Keep { rows: 15 }
    );
    migrate_to_current(&c, &cfg).await;
    assert!(
        !daily_definition(&c)
            .await
            .contains("downsampled_metrics_1h")
    );
    assert_eq!(daily_rows(&c).await, before);
}
