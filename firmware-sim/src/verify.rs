//! `firmware-sim verify`: the ledger against what PostgreSQL (and Kafka) hold.
//!
//! A reading the broker acknowledged and the ledger recorded must be in `raw_metrics` exactly
//! once (and, with `--kafka`, on the readings topic at least once and, when `--strict-kafka`,
//! exactly once). Readings the agent stamps with its own receive time are checked by count per
//! (device, metric). Anything stored for the run's devices that the ledger does not expect is
//! reported as unexpected. Expected refusals (malformed payloads) are listed, not counted as
//! loss. With `--tenant`, only that tenant's rows and records count (by `tenant_id` and the
//! `plantlink-tenant` header), so another tenant's devices of the same names in a shared
//! database are not taken for this run's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::ledger::{Expected, Ledger};

/// What verify found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The run checked.
    pub run: String,
    /// Readings the ledger expects.
    pub expected: u64,
    /// Expected and found.
    pub found: u64,
    /// Expected and not in PostgreSQL.
    pub lost: u64,
    /// In PostgreSQL more than once.
    pub duplicated: u64,
    /// In PostgreSQL for the run's devices, not expected.
    pub unexpected: u64,
    /// Up to 10 examples of each problem.
    pub examples: Vec<String>,
    /// Refusals the run planted, by reason.
    pub expected_rejections: BTreeMap<String, i64>,
    /// Per device with a problem: (lost, duplicated, unexpected).
    pub devices: BTreeMap<String, (u64, u64, u64)>,
    /// With Kafka: expected readings missing from the topic, and identities seen twice.
    pub kafka: Option<KafkaReport>,
}

/// The Kafka half of a [`Report`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct KafkaReport {
    /// Records of the run's devices read.
    pub records: u64,
    /// Expected and not on the topic.
    pub lost: u64,
    /// Identities on the topic more than once.
    pub duplicated: u64,
}

impl Report {
    /// Whether the pipeline kept its promise for this run.
    pub fn ok(&self, strict_kafka: bool) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self
                .kafka
                .as_ref()
                .is_none_or(|k| k.lost == 0 && (!strict_kafka || k.duplicated == 0))
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 30 {
            self.examples.push(what);
        }
    }

    fn device(&mut self, d: &str) -> &mut (u64, u64, u64) {
        self.devices.entry(d.to_owned()).or_default()
    }
}

fn us(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Compares run `run` (the newest in the ledger when `None`) with PostgreSQL at `postgres`.
pub async fn verify(
    ledger: &Path,
    run: Option<&str>,
    postgres: &str,
    kafka: Option<(&str, &str)>,
    tenant: Option<&str>,
) -> anyhow::Result<Report> {
    let run = match run {
        Some(r) => r.to_owned(),
        None => Ledger::runs(ledger)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("ledger {} holds no run", ledger.display()))?,
    };
    let e: Expected = Ledger::expected(ledger, &run)?;
    let (client, conn) = tokio_postgres::connect(postgres, tokio_postgres::NoTls)
        .await
        .map_err(|err| anyhow::anyhow!("--postgres {postgres}: {err}"))?;
    tokio::spawn(conn);
    let prefix = format!("{run}-");
    if tenant.is_none() {
        // Two tenants' rows under one key would hide each other's losses.
        let tenants: i64 = client
            .query_one(
                "SELECT count(DISTINCT tenant_id) FROM raw_metrics WHERE device_id LIKE $1 || '%'",
                &[&prefix],
            )
            .await?
            .get(0);
        if tenants > 1 {
            anyhow::bail!(
                "raw_metrics holds devices named {prefix}* for {tenants} tenants; pass --tenant \
                 with the gateway's [gateway] tenant to check this run's"
            );
        }
    }
    // What PostgreSQL holds for the run's devices (their ids start with the run name).
    let rows = client
        .query(
            "SELECT device_id, metric_name, ts,
                    count(*) OVER (PARTITION BY tenant_id, device_id, metric_name, ts)
             FROM raw_metrics WHERE ($2::text IS NULL OR tenant_id = $2) AND device_id LIKE $1 || '%'",
            &[&prefix, &tenant],
        )
        .await?;
    let mut r = Report {
        run: run.clone(),
        expected: e.timed.len() as u64 + e.stamped.iter().map(|s| s.2 as u64).sum::<u64>(),
        expected_rejections: e.rejected.iter().cloned().collect(),
        ..Report::default()
    };
    let stamped: HashMap<(String, String), i64> = e
        .stamped
        .iter()
        .map(|(d, m, n)| ((d.clone(), m.clone()), *n))
        .collect();
    let e_timed: HashSet<&(String, String, i64)> = e.timed.iter().collect();
    let mut held: HashMap<(String, String, i64), i64> = HashMap::new();
    let mut stamped_held: HashMap<(String, String), i64> = HashMap::new();
    for row in &rows {
        let (d, m): (String, String) = (row.get(0), row.get(1));
        let ts = us(row.get(2));
        // A metric may have both: a Sparkplug device's `online` is timed at births and
        // stamped at its node's death. Rows at an expected time count as timed.
        let key = (d, m, ts);
        if !e_timed.contains(&key) && stamped.contains_key(&(key.0.clone(), key.1.clone())) {
            *stamped_held.entry((key.0, key.1)).or_default() += 1;
        } else {
            held.insert(key, row.get(3));
        }
    }
    let timed: HashSet<(String, String, i64)> = e.timed.iter().cloned().collect();
    let best_effort: HashSet<&str> = e.best_effort.iter().map(String::as_str).collect();
    for key in &e.timed {
        match held.get(key) {
            None if best_effort.contains(key.0.as_str()) => {
                *r.expected_rejections
                    .entry("rate_limited".into())
                    .or_default() += 1;
            }
            None => {
                r.lost += 1;
                r.device(&key.0).0 += 1;
                r.example(format!("lost: {} {} at {} µs", key.0, key.1, key.2));
            }
            Some(&n) => {
                r.found += 1;
                if n > 1 {
                    r.duplicated += (n - 1) as u64;
                    r.device(&key.0).1 += (n - 1) as u64;
                    r.example(format!(
                        "stored {n} times: {} {} at {} µs",
                        key.0, key.1, key.2
                    ));
                }
            }
        }
    }
    for key in held.keys().filter(|k| !timed.contains(*k)) {
        r.unexpected += 1;
        r.device(&key.0).2 += 1;
        r.example(format!("unexpected: {} {} at {} µs", key.0, key.1, key.2));
    }
    for ((d, m), want) in &stamped {
        let got = stamped_held
            .get(&(d.clone(), m.clone()))
            .copied()
            .unwrap_or(0);
        r.found += got.min(*want) as u64;
        if got < *want && best_effort.contains(d.as_str()) {
            *r.expected_rejections
                .entry("rate_limited".into())
                .or_default() += want - got;
        } else if got < *want {
            r.lost += (want - got) as u64;
            r.device(d).0 += (want - got) as u64;
            r.example(format!(
                "lost: {} of {want} receive-stamped {d} {m}",
                want - got
            ));
        } else if got > *want {
            r.duplicated += (got - want) as u64;
            r.device(d).1 += (got - want) as u64;
            r.example(format!("{got} receive-stamped {d} {m} stored, {want} sent"));
        }
    }
    #[cfg(not(feature = "kafka"))]
    if kafka.is_some() {
        anyhow::bail!(
            "--kafka: this firmware-sim was built without Kafka support (feature \"kafka\")"
        );
    }
    #[cfg(feature = "kafka")]
    if let Some((brokers, topic)) = kafka {
        let (brokers, topic, prefix) = (brokers.to_owned(), topic.to_owned(), prefix.clone());
        let tenant = tenant.map(str::to_owned);
        let seen = tokio::task::spawn_blocking(move || {
            read_topic(&brokers, &topic, &prefix, tenant.as_deref())
        })
        .await??;
        let mut k = KafkaReport {
            records: seen.values().sum::<u64>(),
            ..KafkaReport::default()
        };
        for key in &e.timed {
            match seen.get(key) {
                None if best_effort.contains(key.0.as_str()) => {}
                None => {
                    k.lost += 1;
                    r.example(format!("not on Kafka: {} {} at {} µs", key.0, key.1, key.2));
                }
                Some(n) if *n > 1 => k.duplicated += n - 1,
                Some(_) => {}
            }
        }
        r.kafka = Some(k);
    }
    Ok(r)
}

/// Identities on `topic` of devices starting with `prefix`, with how often each was seen.
#[cfg(feature = "kafka")]
fn read_topic(
    brokers: &str,
    topic: &str,
    prefix: &str,
    tenant: Option<&str>,
) -> anyhow::Result<HashMap<(String, String, i64), u64>> {
    use std::time::Duration;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("firmware-sim-verify-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("--kafka {brokers}: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in md
        .topics()
        .first()
        .map(|t| t.partitions())
        .unwrap_or_default()
    {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut seen = HashMap::new();
    // Read until the topic has been quiet for a while: high watermarks are not reported
    // alike by every Kafka-API broker.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut last = std::time::Instant::now();
    while last.elapsed() < Duration::from_secs(3) && std::time::Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        last = std::time::Instant::now();
        let Some(h) = m.headers() else { continue };
        let mut id = (String::new(), String::new(), 0i64);
        let mut of_tenant = tenant.is_none();
        for h in h.iter() {
            let v = String::from_utf8_lossy(h.value.unwrap_or_default()).to_string();
            match h.key {
                "plantlink-tenant" => of_tenant |= tenant == Some(v.as_str()),
                "plantlink-device" => id.0 = v,
                "plantlink-metric" => id.1 = v,
                "plantlink-ts-us" => id.2 = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if of_tenant && id.0.starts_with(prefix) {
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    Ok(seen)
}
