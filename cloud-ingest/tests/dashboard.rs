//! Every metric the Grafana dashboard (`deploy/grafana/plantlink-pipeline.json`) and the
//! Prometheus alerting examples query exists in the programs' `/metrics` output: the real
//! cloud-ingest binary's, freshly started on each storage flavour, and the edge agent's
//! exporter. On TimescaleDB (a private cluster running its job scheduler; skipped loudly
//! where the extension is not installed) the policy jobs' metrics are there too, and a
//! policy that fails shows in the failure counter and in a warning with TimescaleDB's error.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::timescale::{Backend, Cluster};

/// Metric names a text mentions (`plantlink_...`).
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("plantlink_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Series lines only (not HELP/TYPE): what a query can actually select.
fn series(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Metrics only TimescaleDB's flavour exports.
const TIMESCALE_ONLY: &str = "plantlink_cloud_timescale_";

/// Metrics only the scale-out mode's members export (`tests/roles.rs` checks them there).
const SCALE_OUT_ONLY: [&str; 2] = ["plantlink_cloud_consumer_", "plantlink_cloud_writer_"];

fn scale_out_only(name: &str) -> bool {
    SCALE_OUT_ONLY.iter().any(|p| name.starts_with(p))
}

/// Starts cloud-ingest on `b` and answers what its `/metrics` exports once `ready` holds
/// for a scrape, with what it logged so far.
async fn cloud_metrics_on(b: &Backend, ready: impl Fn(&str) -> bool) -> (String, String) {
    let flavor = match b {
        Backend::Plain => "off",
        Backend::Timescale(_) => "on",
    };
    let d = common::Dir::new(&format!("dashboard-{flavor}"));
    common::fleet(&d.0, "gw-d");
    let db = format!("plantlink_test_dashboard_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let cfg = d.0.join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "[quic]\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\ntimescaledb = \"{flavor}\"\nrollup_interval_ms = 200\n\
             [metrics]\nbind = \"{metrics}\"\n"
        ),
    )
    .unwrap();
    let log = d.0.join("cloud.log");
    let cloud = common::Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let text = loop {
        if let Some(t) = common::scrape(metrics).filter(|t| ready(t)) {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "cloud-ingest /metrics on {} did not come up with what was awaited; log:\n{}",
            b.name(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(cloud);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    (text, logged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_that_exist() {
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/plantlink-pipeline.json"
    ))
    .unwrap();
    let wanted = names(&dashboard);
    assert!(wanted.len() >= 10, "{wanted:?}");
    assert!(
        wanted.iter().any(|n| n.starts_with(TIMESCALE_ONLY)),
        "the dashboard shows TimescaleDB's policy jobs"
    );

    let edge_metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    edge_agent::telemetry::install_metrics(edge_metrics, None)
        .await
        .unwrap();
    let edge = series(&common::scrape(edge_metrics).unwrap());

    // Plain PostgreSQL: everything but TimescaleDB's jobs.
    let (plain, _) = cloud_metrics_on(&Backend::Plain, |_| true).await;
    let exported = names(&format!("{}\n{edge}", series(&plain)));
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|n| !n.starts_with(TIMESCALE_ONLY) && !scale_out_only(n))
        .filter(|n| !exported.contains(*n))
        .collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    assert!(
        !exported.iter().any(|n| n.starts_with(TIMESCALE_ONLY)),
        "plain PostgreSQL has no TimescaleDB jobs"
    );

    // TimescaleDB with its scheduler: the jobs' metrics, once the upkeep has read them. In
    // the build on this machine every background job fails (../shared/timescaledb/README.md),
    // which must show as failures and a warning; a healthy TimescaleDB shows none.
    let Some(cluster) = Cluster::start_with_scheduler("dashboard") else {
        return;
    };
    let b = Backend::Timescale(cluster);
    let failures = "plantlink_cloud_timescale_job_failures_total";
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ts, logged) = cloud_metrics_on(&b, |t| {
        let jobs = names(&series(t));
        let all = wanted
            .iter()
            .filter(|n| n.starts_with(TIMESCALE_ONLY))
            .all(|n| jobs.contains(n));
        all && (common::metric_total(t, failures) > 0.0 || Instant::now() > deadline)
    })
    .await;
    let exported = names(&format!("{}\n{edge}", series(&ts)));
    let missing: Vec<&String> = wanted
        .difference(&exported)
        .filter(|n| !scale_out_only(n))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported on TimescaleDB: {missing:?}"
    );
    if common::metric_total(&ts, failures) > 0.0 {
        assert!(
            logged.contains("a TimescaleDB policy job failed") && logged.contains("policy_"),
            "a failing job is logged with its name: {logged}"
        );
    } else {
        eprintln!("no policy job failed within 60 s: this TimescaleDB's scheduler is healthy");
    }
}
