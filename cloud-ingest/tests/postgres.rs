//! The PostgreSQL writer against a real server, in a database of its own: a replayed batch
//! adds nothing, values, timestamps, tags and sequence numbers come back exactly, two tenants'
//! devices of one name never meet, and a reading that conflicts with a stored one is kept
//! and reported while the first value stays. Each test body is written once and runs on
//! plain PostgreSQL and on TimescaleDB (a private cluster, where the extension is installed).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::BTreeSet;

use cloud_ingest::postgres::maintain::{Partitions, day_of};
use cloud_ingest::postgres::{Flavor, Part, STAGING, Written, connect, migrate, write};
use common::pg;
use common::timescale::Backend;
use plantlink_model::{Reading, Timestamp};

/// Writes one gateway's batch as the sink does: on plain PostgreSQL partitions first, then
/// the write.
async fn write_batch(
    client: &mut tokio_postgres::Client,
    flavor: Flavor,
    tenant: &str,
    gateway: &str,
    readings: &[Reading],
) -> Result<Written, tokio_postgres::Error> {
    if flavor == Flavor::Plain {
        let days: BTreeSet<i64> = readings.iter().map(|r| day_of(r.ts.0)).collect();
        Partitions::default().ensure(client, &days).await?;
    }
    let part = Part {
        tenant,
        gateway,
        readings,
    };
    write(client, flavor, &[part]).await
}

#[tokio::test]
async fn replays_add_nothing_and_values_round_trip() {
    for b in Backend::all("pg-replays") {
        replays_and_round_trip(&b).await;
    }
}

async fn replays_and_round_trip(b: &Backend) {
    let flavor = b.flavor();
    let db = format!("plantlink_test_pg_{}", std::process::id());
    let admin = pg(&b.admin_dsn(), &db).await;
    let url = b.dsn(&db);
    let mut client = connect(&url).await.unwrap();
    let cfg = b.config(&url);
    assert_eq!(migrate(&client, &cfg).await.unwrap(), flavor);
    assert_eq!(migrate(&client, &cfg).await.unwrap(), flavor); // idempotent
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
    let first = write_batch(&mut client, flavor, "acme", "gw-1", &readings)
        .await
        .unwrap();
    assert_eq!(first.inserted, 1000);
    // The same batch again (a lost ack), and a batch overlapping it by half: replays, not
    // conflicts (NaN equals NaN here, as in the model).
    let again = write_batch(&mut client, flavor, "acme", "gw-1", &readings)
        .await
        .unwrap();
    assert_eq!((again.inserted, again.replays), (0, 1000));
    assert!(again.conflicts.is_empty(), "{:?}", again.conflicts);
    let half = write_batch(&mut client, flavor, "acme", "gw-1", &readings[500..])
        .await
        .unwrap();
    assert_eq!(
        (half.inserted, half.replays, half.conflicts.len()),
        (0, 500, 0)
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

/// A database of the test's own, migrated, with a connection that has the staging table.
async fn fresh(b: &Backend, tag: &str) -> (tokio_postgres::Client, tokio_postgres::Client, String) {
    let db = format!("plantlink_test_pg_{tag}_{}", std::process::id());
    let admin = pg(&b.admin_dsn(), &db).await;
    let url = b.dsn(&db);
    let client = connect(&url).await.unwrap();
    migrate(&client, &b.config(&url)).await.unwrap();
    client.batch_execute(STAGING).await.unwrap();
    (admin, client, db)
}

fn pump(i: i64, value: f64) -> Reading {
    Reading::new(
        "ignored",
        "pump-1",
        "temperature",
        Timestamp(1_767_225_600_000_000 + i * 1_000_000),
        value,
    )
}

#[tokio::test]
async fn two_tenants_with_one_device_name_keep_their_own_readings() {
    for b in Backend::all("pg-tenants") {
        two_tenants(&b).await;
    }
}

async fn two_tenants(b: &Backend) {
    let flavor = b.flavor();
    let (admin, mut client, db) = fresh(b, "tenants").await;
    let a: Vec<Reading> = (0..100).map(|i| pump(i, i as f64)).collect();
    let b: Vec<Reading> = (0..100).map(|i| pump(i, 1000.0 + i as f64)).collect();
    let wa = write_batch(&mut client, flavor, "acme", "gw-a", &a)
        .await
        .unwrap();
    let wb = write_batch(&mut client, flavor, "globex", "gw-b", &b)
        .await
        .unwrap();
    assert_eq!((wa.inserted, wb.inserted), (100, 100));
    assert!(
        wb.conflicts.is_empty(),
        "another tenant is never a conflict"
    );
    for (tenant, sum) in [("acme", 4950.0), ("globex", 104_950.0)] {
        let row = client
            .query_one(
                "SELECT count(*), sum(value) FROM raw_metrics WHERE tenant_id = $1 AND device_id = 'pump-1'",
                &[&tenant],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, f64>(1)),
            (100, sum),
            "{tenant}"
        );
    }
    // Both in one merged flush, too.
    let later: Vec<Reading> = (100..110).map(|i| pump(i, 1.0)).collect();
    let parts = [
        Part {
            tenant: "acme",
            gateway: "gw-a",
            readings: &later,
        },
        Part {
            tenant: "globex",
            gateway: "gw-b",
            readings: &later,
        },
    ];
    if flavor == Flavor::Plain {
        let days: BTreeSet<i64> = later.iter().map(|r| day_of(r.ts.0)).collect();
        Partitions::default()
            .ensure(&mut client, &days)
            .await
            .unwrap();
    }
    let w = write(&mut client, flavor, &parts).await.unwrap();
    assert_eq!((w.inserted, w.conflicts.len()), (20, 0));
    if flavor == Flavor::Plain {
        // The rollups' dirty marks are per tenant.
        let dirty: i64 = client
            .query_one("SELECT count(DISTINCT tenant_id) FROM rollup_dirty", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(dirty, 2);
    }
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_conflicting_reading_is_kept_reported_once_and_never_replaces_the_first() {
    for b in Backend::all("pg-conflicts") {
        conflicts(&b).await;
    }
}

async fn conflicts(b: &Backend) {
    let flavor = b.flavor();
    let (admin, mut client, db) = fresh(b, "conflict").await;
    let first: Vec<Reading> = (0..10).map(|i| pump(i, 20.0)).collect();
    assert_eq!(
        write_batch(&mut client, flavor, "acme", "gw-1", &first)
            .await
            .unwrap()
            .inserted,
        10
    );

    // Another line's press with the same name, same seconds, other values; one reading the
    // same as stored but with a new seq (a replay), one with other tags (a conflict).
    let mut second: Vec<Reading> = (0..10).map(|i| pump(i, 30.0 + i as f64)).collect();
    second[0].value = 20.0;
    second[0].seq = Some(99);
    second[1].value = 20.0;
    second[1].tags.insert("line".into(), "4".into());
    let w = write_batch(&mut client, flavor, "acme", "gw-2", &second)
        .await
        .unwrap();
    assert_eq!((w.inserted, w.replays, w.conflicts.len()), (0, 1, 9));
    let c = w.conflicts.iter().find(|c| c.value == 32.0).unwrap();
    assert_eq!(
        (
            c.tenant.as_str(),
            c.gateway.as_str(),
            c.device.as_str(),
            c.metric.as_str()
        ),
        ("acme", "gw-2", "pump-1", "temperature")
    );
    assert_eq!((c.stored, c.ts_us), (20.0, 1_767_225_602_000_000));

    // The same conflicting batch again (a lost ack): nothing new is reported.
    let again = write_batch(&mut client, flavor, "acme", "gw-2", &second)
        .await
        .unwrap();
    assert_eq!(
        (again.inserted, again.replays, again.conflicts.len()),
        (0, 10, 0)
    );

    // Two readings of one identity inside one batch: the first received is stored.
    let mut inside = vec![pump(50, 1.0), pump(50, 2.0), pump(50, 1.0)];
    inside[2].seq = Some(7);
    let w = write_batch(&mut client, flavor, "acme", "gw-1", &inside)
        .await
        .unwrap();
    assert_eq!((w.inserted, w.replays, w.conflicts.len()), (1, 1, 1));
    assert_eq!((w.conflicts[0].value, w.conflicts[0].stored), (2.0, 1.0));

    let stored: Vec<f64> = client
        .query("SELECT value FROM raw_metrics ORDER BY ts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored.len(), 11);
    assert!(
        stored.iter().take(10).all(|v| *v == 20.0),
        "the first values stay: {stored:?}"
    );
    assert_eq!(stored[10], 1.0);
    let kept: i64 = client
        .query_one(
            "SELECT count(*) FROM reading_conflicts WHERE tenant_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 10);
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
