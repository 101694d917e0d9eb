//! The gateway's own web page, for the technician on the plant LAN: `GET /` on
//! `[metrics] bind`, beside `GET /metrics` (Prometheus) and `GET /status.json` (the same
//! figures as JSON).
//!
//! It is read-only and answers GET and HEAD only. Its queue figures are those of
//! `edge-agent queue stats --json`, read from the queue file per request (a read-only
//! connection, as the command opens; WAL lets it read beside the writer). What the file does
//! not hold comes from this process: the uplink's state and last error, set by the uplink
//! driver, and each device's rate over the last second or so, set by the writer.
//!
//! The server is a few lines of HTTP/1.1 over a tokio listener (one request per connection,
//! `Connection: close`): the agent needs no HTTP library for it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::store::{self, DeadLetter, QueueStats};

/// The uplink as its driver last reported it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Uplink {
    /// `[uplink] server`, or empty when there is no `[uplink]`.
    pub server: String,
    /// Connected to cloud-ingest now.
    pub connected: bool,
    /// When it connected, or went down (µs since the epoch).
    pub since_us: Option<i64>,
    /// The last error that ended a session or stopped one from starting.
    pub last_error: Option<String>,
    /// When that was.
    pub last_error_us: Option<i64>,
    /// When the cloud last acknowledged a batch.
    pub last_ack_us: Option<i64>,
}

/// One device's rate: readings per second it sent (stored or rate-limited).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRate {
    /// The device id.
    pub device: String,
    /// Readings per second over the last measured interval.
    pub per_sec: f64,
}

#[derive(Debug, Default)]
struct Live {
    uplink: Uplink,
    top: Vec<DeviceRate>,
}

fn live() -> MutexGuard<'static, Live> {
    static LIVE: OnceLock<Mutex<Live>> = OnceLock::new();
    LIVE.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The uplink is configured, towards `server`, and not connected yet.
pub fn uplink_configured(server: &str) {
    let mut l = live();
    l.uplink.server = server.to_owned();
    l.uplink.since_us = Some(now_us());
}

/// The uplink's session is up.
pub fn uplink_connected() {
    let mut l = live();
    l.uplink.connected = true;
    l.uplink.since_us = Some(now_us());
}

/// The uplink's session ended, with `error` if it failed.
pub fn uplink_down(error: Option<String>) {
    let mut l = live();
    let now = now_us();
    if l.uplink.connected || l.uplink.since_us.is_none() {
        l.uplink.since_us = Some(now);
    }
    l.uplink.connected = false;
    if let Some(e) = error {
        l.uplink.last_error = Some(e);
        l.uplink.last_error_us = Some(now);
    }
}

/// The cloud acknowledged a batch.
pub fn uplink_acked() {
    live().uplink.last_ack_us = Some(now_us());
}

/// How many devices the page lists by rate.
pub const TOP_DEVICES: usize = 10;

/// Over how long the page's device rates are averaged (an exponential moving average).
const RATE_TAU_SECS: f64 = 60.0;

/// Turns the writer's per-device counts into rates, once a second or so.
#[derive(Debug)]
pub struct Rates {
    /// Per device id: the count last seen and the average rate.
    last: HashMap<i64, (u64, f64)>,
    at: Instant,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
            at: Instant::now(),
        }
    }
}

impl Rates {
    /// Takes each device's (id, name, readings sent so far) and publishes the
    /// [`TOP_DEVICES`] fastest, averaged over about [`RATE_TAU_SECS`]. A count that went back
    /// (the writer reloaded its state) counts as nothing for that interval.
    pub fn update<'a>(&mut self, counts: impl Iterator<Item = (i64, &'a str, u64)>) {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        self.at = Instant::now();
        self.update_after(secs, counts);
    }

    /// [`Rates::update`] with the time since the last call given.
    pub fn update_after<'a>(
        &mut self,
        secs: f64,
        counts: impl Iterator<Item = (i64, &'a str, u64)>,
    ) {
        let keep = (-secs / RATE_TAU_SECS).exp();
        let mut next = HashMap::with_capacity(self.last.len());
        let mut top: Vec<DeviceRate> = Vec::new();
        for (id, name, sent) in counts {
            let (before, rate) = self.last.get(&id).copied().unwrap_or((0, 0.0));
            let now = sent.saturating_sub(before) as f64 / secs;
            let rate = rate * keep + now * (1.0 - keep);
            next.insert(id, (sent, rate));
            if rate >= 0.01 {
                top.push(DeviceRate {
                    device: name.to_owned(),
                    per_sec: rate,
                });
            }
        }
        self.last = next;
        top.sort_by(|a, b| {
            b.per_sec
                .total_cmp(&a.per_sec)
                .then_with(|| a.device.cmp(&b.device))
        });
        top.truncate(TOP_DEVICES);
        live().top = top;
    }
}

/// What the page shows, and `/status.json` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// `[gateway] id`.
    pub gateway: String,
    /// `edge-agent/<version>`.
    pub agent: String,
    /// When the page was made (µs since the epoch).
    pub now_us: i64,
    /// The uplink.
    pub uplink: Uplink,
    /// `[store] max_bytes`.
    pub max_bytes: u64,
    /// Exactly what `edge-agent queue stats --json` prints.
    pub queue: QueueStats,
    /// Readings dropped by the rate limiter, over the queue's life (the sum of
    /// `queue.per_device[].rate_limited`).
    pub rate_limited: u64,
    /// Dead letters the file keeps, by reason, most first.
    pub dead_letters_by_reason: Vec<(String, u64)>,
    /// The newest few dead letters.
    pub recent_dead_letters: Vec<DeadLetter>,
    /// The fastest devices now.
    pub top_devices: Vec<DeviceRate>,
}

/// What the page reads from outside this module.
#[derive(Debug, Clone)]
pub struct Source {
    /// The queue file.
    pub queue: PathBuf,
    /// `[gateway] id`.
    pub gateway: String,
    /// `[store] max_bytes`.
    pub max_bytes: u64,
}

/// How many dead letters the page lists.
const RECENT_DEAD_LETTERS: u64 = 5;

impl Source {
    /// Reads the figures now (blocking: SQLite).
    pub fn page(&self) -> Result<Page, String> {
        let conn = store::open_read_only(&self.queue)
            .map_err(|e| format!("opening the queue {}: {e}", self.queue.display()))?;
        let queue = store::stats(&conn).map_err(|e| format!("reading the queue: {e}"))?;
        let reasons =
            store::dead_letter_reasons(&conn).map_err(|e| format!("reading dead letters: {e}"))?;
        let recent = store::dead_letters(&conn, RECENT_DEAD_LETTERS)
            .map_err(|e| format!("reading dead letters: {e}"))?;
        let (uplink, top) = {
            let l = live();
            (l.uplink.clone(), l.top.clone())
        };
        Ok(Page {
            gateway: self.gateway.clone(),
            agent: format!("edge-agent/{}", env!("CARGO_PKG_VERSION")),
            now_us: now_us(),
            uplink,
            max_bytes: self.max_bytes,
            rate_limited: queue.per_device.iter().map(|d| d.rate_limited).sum(),
            queue,
            dead_letters_by_reason: reasons,
            recent_dead_letters: recent,
            top_devices: top,
        })
    }
}

/// Connections served at once; more are closed at once, so a client on the LAN cannot take
/// the descriptors that MQTT, CoAP, SQLite and QUIC need.
const MAX_CONNECTIONS: usize = 16;

/// How long a page read from the queue is reused: requests in a burst cost one read.
const PAGE_REUSE: Duration = Duration::from_secs(1);

/// The queue file's figures, read once per [`PAGE_REUSE`] at most, one read at a time.
struct Pages {
    source: Option<Source>,
    last: tokio::sync::Mutex<Option<(Instant, Page)>>,
}

impl Pages {
    async fn get(self: &Arc<Self>) -> Result<Page, String> {
        let mut last = self.last.lock().await;
        if let Some((at, p)) = last.as_ref()
            && at.elapsed() < PAGE_REUSE
        {
            return Ok(p.clone());
        }
        let me = self.clone();
        let page = tokio::task::spawn_blocking(move || match me.source.as_ref() {
            Some(s) => s.page(),
            None => Err("this process serves no queue".to_owned()),
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))?;
        *last = Some((Instant::now(), page.clone()));
        Ok(page)
    }
}

/// Serves `/`, `/status.json` (503 without a `source`) and `/metrics` on `listener` for as
/// long as the runtime runs.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, source: Option<Source>) {
    let pages = Arc::new(Pages {
        source,
        last: tokio::sync::Mutex::new(None),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
    }
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // Out of descriptors, say: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(sock); // busy: the client may retry
            continue;
        };
        let (metrics, pages) = (metrics.clone(), pages.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), answer(sock, &metrics, pages)).await;
            drop(slot);
        });
    }
}

/// Binds `bind` for [`serve`]; the error names the setting.
pub async fn bind(bind: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(bind).await.map_err(|e| {
        anyhow::anyhow!(
            "metrics.bind = {bind}: cannot serve the status page and /metrics: {e}; \
             choose a free address (the default is 127.0.0.1:9310)"
        )
    })
}

async fn answer(
    mut sock: TcpStream,
    metrics: &PrometheusHandle,
    pages: Arc<Pages>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        // Only the new bytes (and the three before them) can complete the head.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if buf.len() > 16 * 1024 {
            return respond(
                &mut sock,
                "431 Request Header Fields Too Large",
                TEXT,
                b"request too large\n",
                false,
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split(['?', '#']).next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut sock,
            "405 Method Not Allowed",
            TEXT,
            b"this page is read-only: GET or HEAD\n",
            head_only,
        )
        .await;
    }
    match path {
        "/metrics" => {
            let body = metrics.render();
            respond(
                &mut sock,
                "200 OK",
                "text/plain; version=0.0.4",
                body.as_bytes(),
                head_only,
            )
            .await
        }
        "/" | "/status.json" => {
            let page = pages.get().await;
            match (page, path) {
                (Ok(p), "/") => {
                    respond(
                        &mut sock,
                        "200 OK",
                        "text/html; charset=utf-8",
                        html(&p).as_bytes(),
                        head_only,
                    )
                    .await
                }
                (Ok(p), _) => {
                    let body = serde_json::to_vec_pretty(&p).unwrap_or_default();
                    respond(&mut sock, "200 OK", "application/json", &body, head_only).await
                }
                (Err(e), _) => {
                    respond(
                        &mut sock,
                        "503 Service Unavailable",
                        TEXT,
                        format!("{e}\n").as_bytes(),
                        head_only,
                    )
                    .await
                }
            }
        }
        _ => {
            respond(
                &mut sock,
                "404 Not Found",
                TEXT,
                b"not here: try / (status), /status.json or /metrics\n",
                head_only,
            )
            .await
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn respond(
    sock: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    if !head_only {
        sock.write_all(body).await?;
    }
    sock.shutdown().await
}

/// `s` safe inside HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn rfc3339(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .ok()
        .and_then(|t| {
            t.replace_millisecond(t.millisecond())
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{us} µs"))
}

/// `secs` as people read an age: 45 s, 12 min, 3.5 h, 2.1 d.
fn age(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else if secs < 172_800.0 {
        format!("{:.1} h", secs / 3600.0)
    } else {
        format!("{:.1} d", secs / 86_400.0)
    }
}

/// A time and how long ago it was, with the µs in `data-us` for machines.
fn when(id: &str, us: Option<i64>, now: i64) -> String {
    match us {
        Some(us) => format!(
            "<span id=\"{id}\" data-us=\"{us}\">{} ({} ago)</span>",
            rfc3339(us),
            age((now - us) as f64 / 1e6)
        ),
        None => format!("<span id=\"{id}\">never</span>"),
    }
}

fn bytes(n: u64) -> String {
    let f = n as f64;
    if f >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    } else if f >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", f / (1024.0 * 1024.0))
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// A figure: its exact value in `data-value`, and as people read it.
fn fig(id: &str, value: u64, shown: &str) -> String {
    format!("<td id=\"{id}\" data-value=\"{value}\">{}</td>", esc(shown))
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}\
header{background:#1d2330;color:#fff;padding:12px 20px}header h1{font-size:18px;margin:0}\
header p{margin:2px 0 0;color:#b8c0d0;font-size:13px}main{padding:16px 20px;display:grid;\
grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px}section{background:#fff;\
border-radius:6px;padding:12px 16px;box-shadow:0 1px 2px #0002}h2{font-size:15px;margin:0 0 8px}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:3px 6px;border-bottom:1px solid #eceef2;\
vertical-align:top}th{font-weight:600;color:#566}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#0a7a3b;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#778}\
.wide{grid-column:1/-1}code{font-size:13px;word-break:break-all}footer{padding:0 20px 16px;color:#778;font-size:13px}";

/// The page as HTML: server-rendered, no scripts; it reloads itself every 5 seconds.
pub fn html(p: &Page) -> String {
    let q = &p.queue;
    let now = p.now_us;
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>{gw} · Plantlink gateway</title>\
         <style>{STYLE}</style></head><body><header><h1>Gateway <span id=\"gateway\">{gw}</span></h1>\
         <p>{agent} · payload schema set <span id=\"schema-version\" data-value=\"{sv}\">{svs}</span> \
         · page made {made} · reloads every 5 s</p></header><main>",
        gw = esc(&p.gateway),
        agent = esc(&p.agent),
        sv = q.schema_set_version,
        svs = if q.schema_set_version == 0 {
            "none received (built-in decoders)".to_owned()
        } else {
            format!("version {} ({} schemas)", q.schema_set_version, q.schemas)
        },
        made = rfc3339(now),
    );

    // Uplink.
    let u = &p.uplink;
    let (state, class) = if u.server.is_empty() {
        (
            "not configured (no [uplink]: collecting and storing only)",
            "muted",
        )
    } else if u.connected {
        ("connected", "ok")
    } else {
        ("down", "bad")
    };
    let _ = write!(
        h,
        "<section><h2>Uplink to the cloud</h2><table>\
         <tr><th>State</th><td id=\"uplink-state\" class=\"{class}\" data-value=\"{sv}\">{state}</td></tr>\
         <tr><th>Server</th><td><code>{server}</code></td></tr>\
         <tr><th>Since</th><td>{since}</td></tr>\
         <tr><th>Last acknowledged batch</th><td>{ack}</td></tr>\
         <tr><th>Last error</th><td>{err}</td></tr></table></section>",
        sv = if u.connected {
            "connected"
        } else if u.server.is_empty() {
            "off"
        } else {
            "down"
        },
        server = esc(&u.server),
        since = when("uplink-since", u.since_us, now),
        ack = when("uplink-last-ack", u.last_ack_us, now),
        err = match (&u.last_error, u.last_error_us) {
            (Some(e), Some(at)) => format!(
                "<code id=\"uplink-error\">{}</code><br><span class=\"muted\">{}</span>",
                esc(e),
                when("uplink-error-at", Some(at), now)
            ),
            _ => "<span id=\"uplink-error\" class=\"muted\">none</span>".to_owned(),
        },
    );

    // Queue.
    let oldest = q.oldest_ts;
    let _ = write!(
        h,
        "<section><h2>Queue (store and forward)</h2><table>\
         <tr><th>Readings waiting</th>{readings}</tr>\
         <tr><th>Bytes (of {max})</th>{bytes}</tr>\
         <tr><th>Oldest waiting reading</th><td>{oldest}</td></tr>\
         <tr><th>Devices with readings waiting</th>{devices}</tr>\
         <tr><th>Evicted (queue full), ever</th>{evicted}</tr>\
         <tr><th>Rate-limited, ever</th>{limited}</tr>\
         <tr><th>Quarantined (refused by the cloud)</th>{quarantined}</tr>\
         <tr><th>File on disk</th>{file}</tr></table></section>",
        readings = fig("queue-readings", q.readings, &q.readings.to_string()),
        max = bytes(p.max_bytes),
        bytes = fig("queue-bytes", q.bytes, &bytes(q.bytes)),
        oldest = when("queue-oldest", oldest, now).replace(">never<", ">none: the queue is empty<"),
        devices = fig("queue-devices", q.devices, &q.devices.to_string()),
        evicted = fig("queue-evicted", q.evicted, &q.evicted.to_string()),
        limited = fig(
            "queue-rate-limited",
            p.rate_limited,
            &p.rate_limited.to_string()
        ),
        quarantined = fig(
            "queue-quarantined",
            q.quarantined,
            &q.quarantined.to_string()
        ),
        file = fig("queue-file-bytes", q.file_bytes, &bytes(q.file_bytes)),
    );

    // Devices: the fastest now, with their lifetime drops.
    let per: HashMap<&str, &store::DeviceStats> = q
        .per_device
        .iter()
        .map(|d| (d.device.as_str(), d))
        .collect();
    let _ = write!(
        h,
        "<section><h2>Busiest devices (readings/s, averaged over about a minute)</h2><table id=\"top-devices\"><tr><th>Device</th>\
         <th class=\"n\">Readings/s</th><th class=\"n\">Waiting</th><th class=\"n\">Rate-limited</th>\
         <th class=\"n\">Evicted</th></tr>"
    );
    if p.top_devices.is_empty() {
        h.push_str(
            "<tr><td colspan=\"5\" class=\"muted\">no readings in the last minutes</td></tr>",
        );
    }
    for d in &p.top_devices {
        let s = per.get(d.device.as_str());
        let _ = write!(
            h,
            "<tr data-device=\"{dev}\"><td>{dev}</td><td class=\"n\">{rate:.1}</td>\
             <td class=\"n\">{w}</td><td class=\"n\">{l}</td><td class=\"n\">{e}</td></tr>",
            dev = esc(&d.device),
            rate = d.per_sec,
            w = s.map_or(0, |s| s.readings),
            l = s.map_or(0, |s| s.rate_limited),
            e = s.map_or(0, |s| s.evicted),
        );
    }
    h.push_str("</table></section>");

    // Dead letters.
    let kept: u64 = p.dead_letters_by_reason.iter().map(|(_, n)| n).sum();
    let _ = write!(
        h,
        "<section class=\"wide\"><h2>Dead letters (payloads refused here), <span id=\"dead-letters\" \
         data-value=\"{kept}\">{kept}</span> kept</h2><table id=\"dead-letter-reasons\">\
         <tr><th>Reason</th><th class=\"n\">Kept</th></tr>"
    );
    if p.dead_letters_by_reason.is_empty() {
        h.push_str("<tr><td colspan=\"2\" class=\"muted\">none</td></tr>");
    }
    for (reason, n) in &p.dead_letters_by_reason {
        let _ = write!(
            h,
            "<tr data-reason=\"{r}\"><td>{r}</td><td class=\"n\" data-value=\"{n}\">{n}</td></tr>",
            r = esc(reason)
        );
    }
    h.push_str(
        "</table><h2 style=\"margin-top:12px\">The newest</h2><table id=\"recent-dead-letters\">\
         <tr><th>When</th><th>Source</th><th>From</th><th>Reason</th><th>What was wrong</th></tr>",
    );
    for d in &p.recent_dead_letters {
        let _ = write!(
            h,
            "<tr data-id=\"{id}\"><td>{t}</td><td>{s}</td><td><code>{o}</code></td><td>{r}</td><td>{w}</td></tr>",
            id = d.id,
            t = rfc3339(d.received_us),
            s = esc(&d.source),
            o = esc(&d.origin),
            r = esc(&d.reason),
            w = esc(&d.detail),
        );
    }
    h.push_str(
        "</table><p class=\"muted\">All of them, with payloads: <code>edge-agent queue dead-letters</code>; \
         decode them again once a schema arrives: <code>edge-agent queue replay-dead-letters</code>.</p>\
         </section></main><footer>Read-only. Machines: <a href=\"/status.json\">/status.json</a> \
         (the queue figures are <code>edge-agent queue stats --json</code>) and \
         <a href=\"/metrics\">/metrics</a> (Prometheus).</footer></body></html>",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_average_the_counts_and_skip_a_reset() {
        let mut r = Rates::default();
        // Counts start at 0 with the process: a device's first readings are a rate.
        r.update_after(1.0, [(1, "a", 500), (2, "b", 0)].into_iter());
        assert_eq!(live().top.len(), 1);
        // 100/s for 5 minutes: the average comes within 5% of it.
        for s in 1..=300 {
            r.update_after(1.0, [(1, "a", 500 + 100 * s), (2, "b", s)].into_iter());
        }
        let top = live().top.clone();
        assert_eq!(top[0].device, "a");
        assert!((top[0].per_sec - 100.0).abs() < 5.0, "{top:?}");
        assert!((top[1].per_sec - 1.0).abs() < 0.1, "{top:?}");
        // "a" reloaded (its count went back) and silent: it decays, "b" goes on.
        for _ in 0..400 {
            r.update_after(1.0, [(1, "a", 0), (2, "b", 301)].into_iter());
        }
        let top = live().top.clone();
        assert!(top.iter().all(|d| d.per_sec < 1.0), "{top:?}");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(45.0), "45 s");
        assert_eq!(age(600.0), "10 min");
        assert_eq!(age(3.5 * 3600.0), "3.5 h");
        assert_eq!(age(3.0 * 86_400.0), "3.0 d");
    }
}
