//! Issue 14: the cloud's budget holds before decoding. Against the real cloud-ingest binary
//! with `ingest.max_buffered_mib = 512`: one gateway opens many connections and streams and
//! sends maximum-expansion batches (a few KB on the wire, 61 MB of strings once decoded)
//! as fast as the cloud takes them. The cloud's RSS stays under a stated bound, and another
//! gateway's batches keep being acknowledged and stored meanwhile.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cloud_ingest::quic;
use common::Dir;
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Batch, Frame, Lane};

const BUDGET_MIB: u64 = 512;
/// What the cloud may use besides the budget: the runtime, PostgreSQL's and the writers'
/// copies of batches being written, allocator slack.
const RSS_BOUND_MIB: u64 = 2 * BUDGET_MIB + 128;

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// 1900 readings of one series with 32 tags of 1000 bytes: one series on the wire, each
/// reading its own copy of the tags when decoded (61 MB, under the decoder's 64 MiB).
fn expanding_batch(start_us: i64) -> Vec<Reading> {
    let mut template = Reading::new("x", "evil-1", "m", Timestamp(0), 1.0);
    for t in 0..32 {
        template
            .tags
            .insert(format!("k{t:02}"), format!("{t:02}{}", "v".repeat(998)));
    }
    (0..1900)
        .map(|i| {
            let mut r = template.clone();
            r.ts = Timestamp(start_us + i);
            r
        })
        .collect()
}

async fn send_batch(send: &mut quinn::SendStream, seq: u64, payload: Vec<u8>, n: usize) -> bool {
    let f = Frame::Batch(Batch {
        seq,
        lane: Lane::Live,
        readings: n as u32,
        payload,
    });
    quic::write_frame(send, &f).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_gateway_keeps_the_cloud_in_its_memory_bound_and_others_flowing() {
    let d = Dir::new("flood");
    common::fleet(&d.0, "gw-good");
    cloud_ingest::pki::gateway(&d.0, "gw-evil", "acme", 365).unwrap();
    let db = format!("plantlink_test_flood_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let port = common::free_tcp_port();
    let cloud_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let cfg = d.0.join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "[quic]\nbind = \"{cloud_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
             client_ca = \"ca.pem\"\n[postgres]\nurl = \"{url}\"\n\
             [ingest]\nmax_buffered_mib = {BUDGET_MIB}\n[alerting]\nenabled = false\n\
             [metrics]\nbind = \"{metrics}\"\n"
        ),
    )
    .unwrap();
    let cloud = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = cloud.0.id();
    let good_ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-good")));
    // Wait until it accepts gateways.
    let start = Instant::now();
    let good = loop {
        if let Ok(Frame::Welcome(_)) = common::attempt(&good_ep, cloud_addr, "gw-good").await {
            break common::connect(&good_ep, cloud_addr, "gw-good").await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "cloud-ingest did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let idle_rss = rss_mib(pid);

    // The flood: 6 connections of gw-evil, each with 6 streams, each sending expanding
    // batches without waiting for answers (QUIC flow control is all that holds them).
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut encoder = BatchEncoder::default();
    let batch = expanding_batch(now_us() - 60_000_000);
    let payload = encoder.encode(&batch);
    eprintln!(
        "an expanding batch: {} bytes on the wire, {} readings",
        payload.len(),
        batch.len()
    );
    let mut floods = Vec::new();
    for _ in 0..6 {
        let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-evil")));
        let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::spawn(async move {
                let c = common::connect(&ep, cloud_addr, "gw-evil").await;
                Ok::<_, ()>((c, ep))
            }),
        )
        .await
        .map(|r| r.unwrap()) else {
            continue;
        };
        let (conn, ep) = conn;
        for _ in 0..6 {
            let conn = conn.clone();
            let (stop, sent, payload) = (stop.clone(), sent.clone(), payload.clone());
            floods.push(tokio::spawn(async move {
                let Ok(Ok((mut send, mut recv))) =
                    tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await
                else {
                    return;
                };
                // Drain the answers so the cloud's acker never blocks on us.
                tokio::spawn(
                    async move { while quic::read_frame(&mut recv, 1 << 20).await.is_ok() {} },
                );
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    if !send_batch(&mut send, seq, payload.clone(), 1900).await {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        std::mem::forget(ep); // keep each endpoint alive for the test's length
    }

    // Meanwhile gw-good sends 20 batches of 100 readings, one at a time, each acknowledged.
    let mut peak = idle_rss;
    let (mut send, mut recv) = good.open_bi().await.unwrap();
    let good_start = now_us() - 30_000_000;
    let mut worst_ack = Duration::ZERO;
    for b in 0..20u64 {
        let readings: Vec<Reading> = (0..100)
            .map(|i| {
                Reading::new(
                    "x",
                    "good-1",
                    "temperature",
                    Timestamp(good_start + (b as i64 * 100 + i) * 1000),
                    20.0 + i as f64,
                )
            })
            .collect();
        let t = Instant::now();
        assert!(send_batch(&mut send, b + 1, encoder.encode(&readings), 100).await);
        let answer = loop {
            tokio::select! {
                f = quic::read_frame(&mut recv, 1 << 20) => break f.unwrap(),
                _ = tokio::time::sleep(Duration::from_millis(100)) => peak = peak.max(rss_mib(pid)),
            }
        };
        assert!(
            matches!(answer, Frame::Ack(ref a) if a.seq == b + 1),
            "gw-good's batch {b}: {answer:?}"
        );
        worst_ack = worst_ack.max(t.elapsed());
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "gw-good's batch {b} waited {:?}",
            t.elapsed()
        );
        peak = peak.max(rss_mib(pid));
    }
    // Keep the flood on a little longer, watching memory.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        peak = peak.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    // How many expanding batches the cloud decoded: what it received, less gw-good's.
    let text = common::scrape(metrics).unwrap();
    let received: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("plantlink_cloud_readings_received_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let decoded = (received as u64 - 2000) / 1900;
    eprintln!(
        "RSS idle {idle_rss} MiB, peak {peak} MiB under the flood (bound {RSS_BOUND_MIB} MiB); \
         {} flood batches queued by the client, {decoded} decoded by the cloud ({} MB of \
         strings); gw-good's slowest ack {worst_ack:?}",
        sent.load(Ordering::Relaxed),
        decoded * 61
    );
    assert!(
        decoded >= 1,
        "the cloud decoded only {decoded} flood batches"
    );
    assert!(
        peak <= RSS_BOUND_MIB,
        "cloud-ingest reached {peak} MiB RSS, over the bound of {RSS_BOUND_MIB} MiB"
    );
    let good_rows: i64 = pgc
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE device_id = 'good-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(good_rows, 2000);

    for f in floods {
        f.abort();
    }
    drop(cloud);
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
