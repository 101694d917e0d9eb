//! The PostgreSQL writer against a real server, in a database of its own: a replayed batch
//! adds nothing, and values, timestamps, tags and sequence numbers come back exactly.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::BTreeSet;

use cloud_ingest::config::Postgres;
use cloud_ingest::postgres::maintain::{Partitions, day_of};
use cloud_ingest::postgres::{Flavor, Part, STAGING, connect, migrate, write};
use common::{admin_dsn as admin_url, pg};
use plantlink_model::{Reading, Timestamp};

/// Writes one gateway's batch as the sink does: partitions first, then the write.
async fn write_batch(
    client: &mut tokio_postgres::Client,
    tenant: &str,
    gateway: &str,
    readings: &[Reading],
) -> Result<u64, tokio_postgres::Error> {
    let days: BTreeSet<i64> = readings.iter().map(|r| day_of(r.ts.0)).collect();
    Partitions::default().ensure(client, &days).await?;
    let part = Part {
        tenant,
        gateway,
        readings,
    };
    write(client, Flavor::Plain, &[part]).await
}

#[tokio::test]
async fn replays_add_nothing_and_values_round_trip() {
    let db = format!("plantlink_test_pg_{}", std::process::id());
    let admin = pg(&admin_url(), &db).await;
    let url = format!("{} dbname={db}", admin_url().replace("dbname=postgres", ""));
    let mut client = connect(&url).await.unwrap();
    let mut cfg = Postgres::with_url(&url);
    cfg.timescaledb = cloud_ingest::config::Timescale::Off;
    assert_eq!(migrate(&client, &cfg).await.unwrap(), Flavor::Plain);
    assert_eq!(migrate(&client, &cfg).await.unwrap(), Flavor::Plain); // idempotent
    client.batch_execute(STAGING).await.unwrap();

    let mut readings: Vec<Reading> = (0..1000)
        .map(|i| {
            let mut r = Reading::new(
                "ignored",
                format!("dev-{}", i % 10),
                "temperature",
                Timestamp(1_767_225_600_000_000 + i * 1_001),
                i as f64 / 100.0,
            );
            r.seq = Some(i as u64);
            r
        })
        .collect();
    readings[1].value = f64::NAN;
    readings[2].value = f64::INFINITY;
    readings[3].tags.insert("site".into(), "p1".into());
    let first = write_batch(&mut client, "acme", "gw-1", &readings)
        .await
        .unwrap();
    assert_eq!(first, 1000);
    // The same batch again (a lost ack), and a batch overlapping it by half.
    assert_eq!(
        write_batch(&mut client, "acme", "gw-1", &readings)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        write_batch(&mut client, "acme", "gw-1", &readings[500..])
            .await
            .unwrap(),
        0
    );

    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (device_id, metric_name, ts)) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1000, 1000));
    // Tenant and gateway are what the caller passed (from the certificate), not the batch's.
    let tenants: i64 = client
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE tenant_id = 'acme' AND gateway_id = 'gw-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenants, 1000);
    let r = client
        .query_one(
            "SELECT value, (extract(epoch FROM ts) * 1000000)::bigint, seq, tags->>'site' FROM raw_metrics
             WHERE device_id = 'dev-3' AND ts = to_timestamp(1767225600.003003)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, f64>(0), 0.03);
    assert_eq!(r.get::<_, i64>(1), 1_767_225_600_003_003);
    assert_eq!(r.get::<_, Option<i64>>(2), Some(3));
    assert_eq!(r.get::<_, Option<String>>(3).as_deref(), Some("p1"));
    let special: Vec<f64> = client
        .query(
            "SELECT value FROM raw_metrics WHERE seq IN (1, 2) ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        special[0].is_nan() && special[1] == f64::INFINITY,
        "{special:?}"
    );

    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
