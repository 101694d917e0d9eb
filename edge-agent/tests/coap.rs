//! CoAP against the real agent: CON and NON requests, a retransmitted message id, bad input,
//! oversize payloads and an unsupported Content-Format.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use common::{TempDir, all_readings, queued, start_agent, wait_for};

struct Client {
    sock: UdpSocket,
    agent: String,
}

impl Client {
    fn new(port: u16) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Self {
            sock,
            agent: format!("127.0.0.1:{port}"),
        }
    }

    fn packet(
        kind: MessageType,
        mid: u16,
        path: &[&str],
        cf: Option<usize>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.message_id = mid;
        p.header.code = MessageClass::Request(RequestType::Post);
        p.set_token(mid.to_be_bytes().to_vec());
        for seg in path {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        if let Some(cf) = cf {
            let bytes = if cf == 0 {
                vec![]
            } else if cf < 256 {
                vec![cf as u8]
            } else {
                (cf as u16).to_be_bytes().to_vec()
            };
            p.add_option(CoapOption::ContentFormat, bytes);
        }
        p.payload = payload.to_vec();
        p.to_bytes().unwrap()
    }

    /// Sends a CON request, retransmitting like a CoAP client until answered.
    fn con(&self, mid: u16, path: &[&str], cf: Option<usize>, payload: &[u8]) -> Packet {
        let bytes = Self::packet(MessageType::Confirmable, mid, path, cf, payload);
        let mut buf = [0u8; 2048];
        for _ in 0..20 {
            self.sock.send_to(&bytes, &self.agent).unwrap();
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let resp = Packet::from_bytes(&buf[..n]).unwrap();
                assert_eq!(resp.header.message_id, mid);
                assert_eq!(resp.header.get_type(), MessageType::Acknowledgement);
                assert_eq!(resp.get_token(), mid.to_be_bytes());
                return resp;
            }
        }
        panic!("no CoAP answer to message {mid}");
    }

    fn non(&self, mid: u16, path: &[&str], cf: Option<usize>, payload: &[u8]) {
        let bytes = Self::packet(MessageType::NonConfirmable, mid, path, cf, payload);
        self.sock.send_to(&bytes, &self.agent).unwrap();
    }
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn agent() -> (TempDir, u16, u16, common::Proc) {
    let dir = TempDir::new("coap");
    let port = common::free_udp_port();
    let metrics = common::free_tcp_port();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\n[store]\npath = \"{}\"\n[coap]\nbind = \"127.0.0.1:{port}\"\n\
             [limits]\nmax_payload_bytes = 512\n[metrics]\nbind = \"127.0.0.1:{metrics}\"\n",
            dir.path().join("queue.db").display()
        ),
    )
    .unwrap();
    let proc = start_agent(&cfg);
    (dir, port, metrics, proc)
}

/// GET /metrics from the agent.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn con_non_duplicates_and_errors() {
    let (dir, port, metrics_port, _agent) = agent();
    let db = dir.path().join("queue.db");
    let c = Client::new(port);

    // CON with JSON: answered 2.04 after the commit, so the reading is already on disk.
    let r = c.con(
        1,
        &["t", "press01", "temperature"],
        Some(50),
        b"{\"ts\": 1767225600000, \"value\": 87.3}",
    );
    assert_eq!(code(&r), ResponseType::Changed);
    assert_eq!(queued(&db), 1);

    // A retransmission of message 1 is answered from the cache and not stored again.
    let r = c.con(
        1,
        &["t", "press01", "temperature"],
        Some(50),
        b"{\"ts\": 1767225600000, \"value\": 87.3}",
    );
    assert_eq!(code(&r), ResponseType::Changed);
    // Same id, different payload, still the same exchange for 247 s: not stored either.
    let r = c.con(1, &["t", "press01", "temperature"], Some(50), b"99");
    assert_eq!(code(&r), ResponseType::Changed);
    assert_eq!(queued(&db), 1);

    // CBOR multi-metric to /t/{device}.
    let mut cbor = Vec::new();
    ciborium::ser::into_writer(
        &ciborium::Value::Map(vec![
            (
                ciborium::Value::Text("ts".into()),
                ciborium::Value::Integer(1_767_225_601_000i64.into()),
            ),
            (
                ciborium::Value::Text("temperature".into()),
                ciborium::Value::Float(21.5),
            ),
            (
                ciborium::Value::Text("humidity".into()),
                ciborium::Value::Float(40.0),
            ),
        ]),
        &mut cbor,
    )
    .unwrap();
    assert_eq!(
        code(&c.con(2, &["t", "th1"], Some(60), &cbor)),
        ResponseType::Changed
    );
    assert_eq!(queued(&db), 3);

    // NON is accepted and stored without an answer.
    c.non(3, &["t", "th2", "humidity"], Some(0), b"41.5");
    wait_for("the NON reading", Duration::from_secs(10), || {
        queued(&db) == 4
    });

    // Bad input: 4.00 with a diagnostic naming the problem.
    let r = c.con(4, &["t", "th1", "temperature"], Some(50), b"{not json");
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert!(
        String::from_utf8_lossy(&r.payload).contains("malformed"),
        "{:?}",
        r.payload
    );
    let r = c.con(5, &["t", "th1"], Some(50), b"{\"temperature\": \"hot\"}");
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert!(String::from_utf8_lossy(&r.payload).contains("temperature"));
    // Too large: 4.13. Unsupported format: 4.15. Other path: 4.04.
    assert_eq!(
        code(&c.con(6, &["t", "th1", "x"], Some(50), &[b'1'; 600])),
        ResponseType::RequestEntityTooLarge
    );
    assert_eq!(
        code(&c.con(7, &["t", "th1", "x"], Some(41), b"<x/>")),
        ResponseType::UnsupportedContentFormat
    );
    assert_eq!(
        code(&c.con(8, &["nope"], Some(50), b"1")),
        ResponseType::NotFound
    );
    assert_eq!(queued(&db), 4, "refused requests store nothing");

    let rows = all_readings(&db);
    let mut got: Vec<(String, String, f64)> = rows.into_iter().map(|r| (r.0, r.1, r.3)).collect();
    got.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(
        got,
        vec![
            ("press01".into(), "temperature".into(), 87.3),
            ("th1".into(), "humidity".into(), 40.0),
            ("th1".into(), "temperature".into(), 21.5),
            ("th2".into(), "humidity".into(), 41.5),
        ]
    );
    // The refused payloads are dead letters with their reasons.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let reasons: Vec<String> = conn
        .prepare("SELECT reason FROM dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        reasons,
        vec!["malformed", "wrong_type", "oversize", "unsupported_format"]
    );
    let _ = ContentFormat::ApplicationJSON; // the formats used above: 50 JSON, 60 CBOR, 0 text

    // The Prometheus endpoint has every documented metric, with these counts.
    let text = scrape(metrics_port);
    for name in [
        "plantlink_edge_readings_received_total{source=\"coap\"} 4",
        "plantlink_edge_readings_stored_total 4",
        "plantlink_edge_duplicates_dropped_total 0",
        "plantlink_edge_rate_limited_total 0",
        "plantlink_edge_dead_letters_total{reason=\"malformed\"} 1",
        "plantlink_edge_dead_letters_total{reason=\"oversize\"} 1",
        "plantlink_edge_evicted_total 0",
        "plantlink_edge_queue_readings 4",
        "plantlink_edge_queue_bytes ",
        "plantlink_edge_queue_oldest_age_seconds",
        "plantlink_edge_coap_duplicates_total 2",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }

    // `queue stats --json` reads the file while the agent runs.
    let cfg = dir.path().join("agent.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["queue", "stats", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["readings"], 4);
    // 4 readings at 64 bytes, and the rows of their devices and series at their size.
    let (devices, series, series_rows): (u64, u64, u64) = {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.query_row(
            "SELECT (SELECT sum(length(name)) FROM devices),
                    (SELECT sum(length(metric) + length(tags)) FROM series),
                    (SELECT count(*) FROM series)",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            },
        )
        .unwrap()
    };
    assert_eq!(
        series_rows, 4,
        "press01 temperature, th1 temperature and humidity, th2 humidity"
    );
    assert_eq!(
        v["bytes"].as_u64().unwrap(),
        256 + 3 * 48 + 2 * devices + series_rows * 48 + 2 * series
    );
    assert!(
        text.contains(&format!("plantlink_edge_queue_bytes {}\n", v["bytes"])),
        "the gauge and queue stats agree"
    );
    assert_eq!(v["devices"], 3);
    assert_eq!(v["dead_letters"], 4);
    assert_eq!(v["oldest_ts"], 1_767_225_600_000_000i64);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["queue", "dead-letters", "--limit", "2", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("unsupported_format") && text.contains("oversize"),
        "{text}"
    );
}

/// Issue 14: a LAN host POSTing invented device ids (`/t/<uuid>/x`) cannot fill the disk or
/// crowd out real devices. 100,000 of them against `[devices] max = 300`: the queue tracks at
/// most 300 devices and stays inside `max_bytes`; every reading of the real devices, sent
/// throughout, is stored; the invented ids over the cap are dead-lettered (`device_cap`) and
/// counted, and answered 5.03.
#[test]
fn invented_device_ids_stay_within_the_cap_and_real_devices_lose_nothing() {
    let dir = TempDir::new("coap-flood");
    let port = common::free_udp_port();
    let metrics = common::free_tcp_port();
    let cfg = dir.path().join("agent.toml");
    let db = dir.path().join("queue.db");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\n[store]\npath = \"{}\"\nmax_bytes = \"1MiB\"\ndead_letters_keep = 100\n\
             synchronous = \"normal\"\n[coap]\nbind = \"127.0.0.1:{port}\"\n[devices]\nmax = 300\n\
             [metrics]\nbind = \"127.0.0.1:{metrics}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let _agent = start_agent(&cfg);
    let c = Client::new(port);
    let flood = Client::new(port);
    let real = ["real-1", "real-2", "real-3"];
    let mut mid = 0u16;
    let mut sent_real = 0;
    let mut cap_answers = 0;
    const INVENTED: u32 = 100_000;
    for i in 0..INVENTED {
        let id = format!(
            "{:08x}-{:04x}-4{:03x}",
            i.wrapping_mul(2_654_435_761),
            i % 65_536,
            i % 4096
        );
        let body = format!("{{\"value\": {i}}}");
        if i % 10 == 0 {
            // Every tenth invented id waits for its answer, which paces the flood to what the
            // agent commits; the others are sent without waiting.
            mid = mid.wrapping_add(1);
            let r = flood.con(mid, &["t", &id, "x"], Some(50), body.as_bytes());
            if code(&r) == ResponseType::ServiceUnavailable {
                cap_answers += 1;
                assert!(
                    String::from_utf8_lossy(&r.payload).contains("device_cap"),
                    "{:?}",
                    String::from_utf8_lossy(&r.payload)
                );
            }
        } else {
            flood.non(
                mid.wrapping_add(30_000),
                &["t", &id, "x"],
                Some(50),
                body.as_bytes(),
            );
        }
        if i % 2000 == 0 {
            for d in real {
                mid = mid.wrapping_add(1);
                let body = format!(
                    "{{\"ts\": {}, \"value\": {i}}}",
                    1_767_225_600_000i64 + i as i64
                );
                let r = c.con(mid, &["t", d, "temperature"], Some(50), body.as_bytes());
                assert_eq!(code(&r), ResponseType::Changed, "{d} at {i}");
                sent_real += 1;
            }
        }
    }
    assert!(cap_answers > 5_000, "{cap_answers} requests answered 5.03");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["queue", "stats", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tracked = v["per_device"].as_array().unwrap().len();
    assert!(
        tracked <= 300,
        "{tracked} devices tracked, over the cap of 300"
    );
    assert!(
        v["bytes"].as_u64().unwrap() <= 1 << 20,
        "accounted {} bytes, over max_bytes",
        v["bytes"]
    );
    assert!(
        v["file_bytes"].as_u64().unwrap() <= 2 << 20,
        "the file is {} bytes for a 1 MiB queue and 100 dead letters",
        v["file_bytes"]
    );
    let stored_real = all_readings(&db)
        .iter()
        .filter(|r| r.0.starts_with("real-"))
        .count();
    assert_eq!(
        stored_real, sent_real,
        "every reading of the real devices is stored"
    );
    let text = scrape(metrics);
    let capped: f64 = text
        .lines()
        .find(|l| l.starts_with("plantlink_edge_dead_letters_total") && l.contains("device_cap"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        capped >= cap_answers as f64,
        "{capped} device_cap dead letters counted"
    );
}

/// `[devices] allow`: a device it does not list is refused 4.03 and dead-lettered.
#[test]
fn devices_outside_the_allow_list_are_refused() {
    let dir = TempDir::new("coap-allow");
    let port = common::free_udp_port();
    let cfg = dir.path().join("agent.toml");
    let db = dir.path().join("queue.db");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\n[store]\npath = \"{}\"\n[coap]\nbind = \"127.0.0.1:{port}\"\n\
             [devices]\nallow = [\"press*\"]\n",
            db.display()
        ),
    )
    .unwrap();
    let _agent = start_agent(&cfg);
    let c = Client::new(port);
    let r = c.con(1, &["t", "press01", "temperature"], Some(0), b"80.5");
    assert_eq!(code(&r), ResponseType::Changed);
    let r = c.con(2, &["t", "intruder", "temperature"], Some(0), b"80.5");
    assert_eq!(code(&r), ResponseType::Forbidden);
    let why = String::from_utf8_lossy(&r.payload).into_owned();
    assert!(
        why.contains("not_allowed") && why.contains("press*"),
        "{why}"
    );
    assert_eq!(queued(&db), 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["queue", "dead-letters", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("not_allowed") && text.contains("intruder"),
        "{text}"
    );
}
