//! Every metric the Grafana dashboard (`deploy/grafana/plantlink-pipeline.json`) and the
//! Prometheus alerting examples query exists in the programs' `/metrics` output: the real
//! cloud-ingest binary's, and the edge agent's exporter, both freshly started.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_that_exist() {
    let d = common::Dir::new("dashboard");
    common::fleet(&d.0, "gw-d");
    let db = format!("plantlink_test_dashboard_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let port = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let cloud_metrics = port(common::free_tcp_port());
    let cfg = d.0.join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "[quic]\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\n[metrics]\nbind = \"{cloud_metrics}\"\n"
        ),
    )
    .unwrap();
    let _cloud = common::Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let edge_metrics = port(common::free_tcp_port());
    edge_agent::telemetry::install_metrics(edge_metrics).unwrap();

    let start = Instant::now();
    let cloud = loop {
        if let Some(t) = common::scrape(cloud_metrics) {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "cloud-ingest /metrics did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let edge = common::scrape(edge_metrics).unwrap();
    // Series lines only (not HELP/TYPE): what a query can actually select.
    let exported: BTreeSet<String> = names(
        &format!("{cloud}\n{edge}")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/plantlink-pipeline.json"
    ))
    .unwrap();
    let wanted = names(&dashboard);
    assert!(wanted.len() >= 10, "{wanted:?}");
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");

    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
