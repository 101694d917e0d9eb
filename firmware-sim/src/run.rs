//! `firmware-sim run`: a fleet publishing over MQTT at a steady rate, with faults on demand,
//! a ledger of what the broker acknowledged, and a load-test report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;

use crate::fleet::{self, Expect, Kind};
use crate::ledger::Ledger;
use crate::rng::Rng;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// `mqtt://host:port`.
    pub mqtt: Option<String>,
    /// `coap://host:port`; with `mqtt` too, every other device uses CoAP.
    pub coap: Option<String>,
    /// CoAP confirmable (true) or non-confirmable requests.
    pub coap_con: bool,
    /// Devices.
    pub devices: u32,
    /// Kinds and weights.
    pub mix: Vec<(Kind, u32)>,
    /// Messages per second per device.
    pub rate: f64,
    /// Seconds to run.
    pub duration: f64,
    /// Seed.
    pub seed: u64,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Topic prefix.
    pub prefix: String,
    /// Run name; device ids start with it.
    pub run: String,
    /// The ledger file.
    pub ledger: Option<PathBuf>,
    /// Share of turns after which a device resends its last messages (a duplicate burst, as
    /// after a reconnect).
    pub duplicate_rate: f64,
    /// Share of messages replaced by a malformed payload.
    pub malformed_rate: f64,
    /// Share of messages stamped up to 5 s in the past (out of order).
    pub out_of_order_rate: f64,
    /// Share of messages replaced by a payload over the agent's default 64 KiB limit.
    pub oversize_rate: f64,
    /// Share of devices whose clock is off by 30 s to 5 min, either way.
    pub skewed_devices: f64,
    /// Devices that fall silent halfway through the run (for absence alerts).
    pub silent_devices: u32,
    /// Devices that run hot (temperature + 60) from 40% to 60% of the run, for threshold
    /// alerts at known times.
    pub hot_devices: u32,
    /// Seconds: when over 0, the hot devices run hot in the first half of every cycle of
    /// this length instead ([`hot_phase`]), for alerts all through a run.
    pub hot_cycle: f64,
    /// Devices (from the middle of the fleet) that flood at 50 times the rate; the agent's
    /// rate limit may drop some of theirs, and the ledger says so.
    pub flood_devices: u32,
    /// Send the reference dataset's signals (`refdata`) instead of the plant profile.
    pub reference: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// The report of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Run name (device ids start with it; `verify --run`).
    pub run: String,
    /// Messages handed to the client.
    pub sent: u64,
    /// Messages the broker acknowledged (QoS 0: written to the socket).
    pub acked: u64,
    /// Readings the ledger expects the pipeline to store.
    pub readings: u64,
    /// Acknowledged messages per second.
    pub rate_per_sec: f64,
    /// Publish-to-acknowledgement latency.
    pub latency_ms: Latency,
    /// Errors by kind (and the faults planted, by kind).
    pub errors: BTreeMap<String, u64>,
    /// Seconds.
    pub elapsed_s: f64,
    /// Rebirth requests (NCMD) the Sparkplug nodes answered with their births.
    pub sparkplug_rebirths: u64,
}

struct Pending {
    at: Instant,
    device: String,
    expect: Vec<Expect>,
    rejected: Option<&'static str>,
    /// Readings of other devices the message makes.
    also: Vec<(String, Vec<Expect>)>,
}

impl Pending {
    fn new(sender: &str, msg: &fleet::Message, rejected: Option<&'static str>) -> Self {
        Self {
            at: Instant::now(),
            device: msg.device.clone().unwrap_or_else(|| sender.to_owned()),
            expect: msg.expect.clone(),
            rejected,
            also: msg.also.clone(),
        }
    }
}

/// Hands a message to the MQTT client; false (and counted) when its queue is full.
fn publish(
    client: &AsyncClient,
    qos: QoS,
    msg: &fleet::Message,
    pending: Pending,
    report: &mut Report,
    queued: &mut VecDeque<Pending>,
) -> bool {
    if let Err(e) = client.try_publish(msg.topic.clone(), qos, false, msg.payload.clone()) {
        let n = report.errors.entry("client_queue_full".into()).or_default();
        if *n == 0 {
            tracing_free_log(&format!(
                "{e}: more offered than the connection carries; counting the rest"
            ));
        }
        *n += 1;
        return false;
    }
    report.sent += 1;
    queued.push_back(pending);
    true
}

/// Whether a hot device runs hot at its event time `ts_us`, `progress` (0 to 1) into the
/// run: from 40% to 60% of the run; or, with a `cycle` of seconds, in the first half of each
/// cycle, the cycles counted from the Unix epoch (with a cycle of 2 s: in even seconds), so
/// a reader knows the times without knowing when the run started.
pub fn hot_phase(cycle: f64, progress: f64, ts_us: i64) -> bool {
    if cycle > 0.0 {
        let c = ((cycle * 1e6) as i64).max(2);
        ts_us.rem_euclid(c) < c / 2
    } else {
        (0.4..0.6).contains(&progress)
    }
}

/// A duration as people type it: `90`, `90s`, `1.5s`, `250ms`, `5m`, `2h`; bare numbers are
/// seconds. Seconds, for `--duration`.
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("{s:?} is not a duration: write seconds (90) or a number with a unit: 90s, 250ms, 5m, 2h")
    })?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "{s:?}: unit {other:?} is not one of ms, s, m, h (e.g. 90s, 5m)"
            ));
        }
    };
    let secs = n * scale;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?}: give a duration above 0"));
    }
    Ok(secs)
}

fn broker(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| anyhow::anyhow!("--mqtt {url:?}: write mqtt://host:port"))?;
    Ok(match rest.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse()
                .map_err(|_| anyhow::anyhow!("--mqtt {url:?}: {p:?} is not a port"))?,
        ),
        None => (rest.to_owned(), 1883),
    })
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Runs the fleet until `duration` has passed and every acknowledgement is in.
pub async fn run(o: Options) -> anyhow::Result<Report> {
    let qos = match o.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => bail!("--qos {q}: use 0, 1 or 2"),
    };
    if !(o.rate > 0.0 && o.duration > 0.0 && o.devices > 0) {
        bail!("--devices, --rate and --duration must be above 0");
    }
    anyhow::ensure!(
        o.mqtt.is_some() || o.coap.is_some(),
        "give --mqtt mqtt://host:port and/or --coap coap://host:port"
    );
    let mut ledger = match &o.ledger {
        Some(p) => Some(Ledger::create(p, &o.run, &format!("{o:?}"), now_us())?),
        None => None,
    };
    let mut rng = Rng::new(o.seed);
    let mut devices = fleet::devices(&o.run, o.devices, &o.mix, &mut rng);
    if o.reference {
        let seconds = (o.duration * o.rate).ceil().min(60.0) as usize;
        fleet::use_reference(&mut devices, seconds, o.seed);
    }
    // Per-device clock skew, in µs.
    let skew: Vec<i64> = (0..devices.len())
        .map(|_| {
            if rng.chance(o.skewed_devices) {
                let s = rng.range(30_000_000, 300_000_000);
                if rng.chance(0.5) { s } else { -s }
            } else {
                0
            }
        })
        .collect();
    let silent_from = devices.len().saturating_sub(o.silent_devices as usize);
    let flood =
        (devices.len() / 2)..(devices.len() / 2 + o.flood_devices as usize).min(devices.len());
    if let Some(l) = ledger.as_mut() {
        for d in &devices[flood.clone()] {
            l.best_effort(&d.id)?;
        }
    }
    if o.silent_devices > 0 || o.hot_devices > 0 || o.skewed_devices > 0.0 {
        let hot: Vec<&str> = devices
            .iter()
            .take(o.hot_devices as usize)
            .map(|d| d.id.as_str())
            .collect();
        let silent: Vec<&str> = devices[silent_from..]
            .iter()
            .map(|d| d.id.as_str())
            .collect();
        let when = if o.hot_cycle > 0.0 {
            format!("in the first half of every {} s of the clock", o.hot_cycle)
        } else {
            "from 40% to 60% of the run".to_owned()
        };
        tracing_free_log(&format!(
            "hot devices ({when}): {hot:?}; silent after half the run: {silent:?}; skewed clocks: {}",
            skew.iter().filter(|s| **s != 0).count()
        ));
    }
    let (client, mut el) = match &o.mqtt {
        Some(url) => {
            let (host, port) = broker(url)?;
            let mut mo = MqttOptions::new(format!("firmware-sim-{}", o.run), host, port);
            mo.set_inflight(1000)
                .set_max_packet_size(1 << 20, 1 << 20)
                .set_keep_alive(Duration::from_secs(30));
            let (c, el) = AsyncClient::new(mo, 10_000);
            (Some(c), Some(el))
        }
        None => (None, None),
    };
    let (coap_tx, mut coap_rx) = match &o.coap {
        Some(url) => {
            let (tx, rx) =
                crate::coap::start::<Pending>(crate::coap::address(url)?, o.coap_con, |p| {
                    p.rejected.is_some()
                })
                .await?;
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    // With both transports, odd-numbered devices speak CoAP.
    let uses_coap = |i: usize| coap_tx.is_some() && (client.is_none() || i % 2 == 1);
    let mut coap_outstanding = 0usize;
    let bar = o.progress.then(|| {
        let b = indicatif::ProgressBar::new((o.duration * 1000.0) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut report = Report {
        run: o.run.clone(),
        ..Report::default()
    };
    let mut queued: VecDeque<Pending> = VecDeque::new();
    let mut inflight: HashMap<u16, Pending> = HashMap::new();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(o.duration);
    let per_sec = o.rate * f64::from(o.devices);
    let mut due = 0.0f64;
    let mut next_device = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last_draw = Instant::now();
    let mut acked_batch: Vec<Pending> = Vec::new();
    let mut recent: HashMap<usize, VecDeque<fleet::Message>> = HashMap::new();
    // Sparkplug nodes by name, for their rebirth commands.
    let nodes: HashMap<String, usize> = devices
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.spb.as_ref().map(|n| (n.name.clone(), i)))
        .collect();
    loop {
        let sending = Instant::now() < end;
        if !sending && queued.is_empty() && inflight.is_empty() && coap_outstanding == 0 {
            break;
        }
        let mqtt_event = async {
            match el.as_mut() {
                Some(el) => el.poll().await,
                None => std::future::pending().await,
            }
        };
        let coap_done = async {
            match coap_rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick(), if sending => {
                due += per_sec / 100.0;
                let progress = start.elapsed().as_secs_f64() / o.duration;
                while due >= 1.0 {
                    due -= 1.0;
                    let n = devices.len();
                    let i = next_device % n;
                    next_device += 1;
                    if i >= silent_from && progress >= 0.5 {
                        // Fallen silent; a Sparkplug node says so first.
                        if let (Some(node), Some(client)) = (devices[i].spb.as_mut(), &client) {
                            for msg in node.ndeath(now_us().div_euclid(1000)) {
                                let p = Pending::new(&devices[i].id, &msg, None);
                                publish(client, qos, &msg, p, &mut report, &mut queued);
                            }
                        }
                        continue;
                    }
                    let d = &mut devices[i];
                    // Hot or not by the time the reading carries (after any planted shift).
                    let hot = i < o.hot_devices as usize;
                    if d.kind == Kind::Sparkplug {
                        // Its own session: no planted faults but silence.
                        let Some(client) = &client else { continue };
                        let ts = now_us() + skew[i];
                        d.hot = hot && hot_phase(o.hot_cycle, progress, ts);
                        for msg in d.turn(&o.prefix, ts, progress, &mut rng) {
                            let p = Pending::new(&d.id, &msg, None);
                            publish(client, qos, &msg, p, &mut report, &mut queued);
                        }
                        continue;
                    }
                    let mut ts = now_us() + skew[i];
                    if rng.chance(o.out_of_order_rate) {
                        ts -= rng.range(1_000_000, 5_000_000);
                        *report.errors.entry("planted_out_of_order".into()).or_default() += 1;
                    }
                    d.hot = hot && hot_phase(o.hot_cycle, progress, ts);
                    let (msg, rejected) = if rng.chance(o.malformed_rate) {
                        *report.errors.entry("planted_malformed".into()).or_default() += 1;
                        (fleet::malformed(&o.prefix, &d.id), Some("malformed"))
                    } else if rng.chance(o.oversize_rate) {
                        *report.errors.entry("planted_oversize".into()).or_default() += 1;
                        (fleet::oversize(&o.prefix, &d.id), Some("oversize"))
                    } else {
                        (d.turn(&o.prefix, ts, progress, &mut rng).remove(0), None)
                    };
                    // What goes out for this turn: the message; for a flooding device 49
                    // more distinct ones; after a planted reconnect, a burst resending the
                    // device's last messages (what a device does when unsure they arrived).
                    let mut batch = vec![(msg.clone(), rejected)];
                    if flood.contains(&i) {
                        *report.errors.entry("planted_flood_messages".into()).or_default() += 49;
                        for k in 1..50 {
                            let more = d.turn(&o.prefix, ts + k * 1000, progress, &mut rng);
                            batch.extend(more.into_iter().map(|m| (m, None)));
                        }
                    } else if d.kind != Kind::Bare && rejected.is_none() && rng.chance(o.duplicate_rate) {
                        let last = recent.entry(i).or_default();
                        *report.errors.entry("planted_duplicate".into()).or_default() += last.len() as u64 + 1;
                        batch.extend(last.iter().map(|m| (m.clone(), None)));
                        batch.push((msg.clone(), None));
                    }
                    if d.kind != Kind::Bare && rejected.is_none() {
                        let last = recent.entry(i).or_default();
                        last.push_back(msg.clone());
                        if last.len() > 5 {
                            last.pop_front();
                        }
                    }
                    for (msg, rejected) in batch {
                        if uses_coap(i) {
                            let Some(tx) = &coap_tx else { continue };
                            let tag = Pending::new(&d.id, &msg, rejected);
                            if tx.try_send(crate::coap::Job { message: msg.clone(), tag }).is_err() {
                                *report.errors.entry("coap_queue_full".into()).or_default() += 1;
                                continue;
                            }
                            report.sent += 1;
                            coap_outstanding += 1;
                            continue;
                        }
                        let Some(client) = &client else { continue };
                        let p = Pending::new(&d.id, &msg, rejected);
                        publish(client, qos, &msg, p, &mut report, &mut queued);
                    }
                }
            }
            done = coap_done => {
                coap_outstanding = coap_outstanding.saturating_sub(1);
                match done {
                    Some(crate::coap::Done::Acked(p)) => acked_batch.push(p),
                    Some(crate::coap::Done::Failed(_, why)) => {
                        *report.errors.entry(format!("coap: {why}")).or_default() += 1;
                    }
                    None => coap_outstanding = 0,
                }
            }
            ev = mqtt_event => {
                match ev {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(p) = queued.pop_front() {
                            if qos == QoS::AtMostOnce {
                                acked_batch.push(p);
                            } else {
                                inflight.insert(pkid, p);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) if qos == QoS::AtLeastOnce => {
                        if let Some(p) = inflight.remove(&a.pkid) { acked_batch.push(p); }
                    }
                    Ok(Event::Incoming(Packet::PubComp(a))) if qos == QoS::ExactlyOnce => {
                        if let Some(p) = inflight.remove(&a.pkid) { acked_batch.push(p); }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !nodes.is_empty() => {
                        // Each (clean) session subscribes to the nodes' commands again.
                        if let Some(c) = &client {
                            let _ = c.try_subscribe(crate::sparkplug::commands(&o.run), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let node = crate::sparkplug::command_node(&p.topic);
                        if let Some(&i) = node.as_ref().and_then(|n| nodes.get(n))
                            && crate::sparkplug::is_rebirth(&p.payload)
                            && let Some(n) = devices[i].spb.as_mut()
                        {
                            n.rebirth();
                            report.sparkplug_rebirths += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        *report.errors.entry("connection".into()).or_default() += 1;
                        tracing_free_log(&format!("MQTT: {e}; reconnecting"));
                        // With a clean session the client drops what was queued or in flight
                        // when the connection went: those messages were never acknowledged, so
                        // they stay out of the ledger and count as errors.
                        let dropped = (queued.len() + inflight.len()) as u64;
                        if dropped > 0 {
                            *report.errors.entry("unacknowledged_at_disconnect".into()).or_default() += dropped;
                        }
                        queued.clear();
                        inflight.clear();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if Instant::now() > end + Duration::from_secs(30) {
                            bail!("the broker at {} is unreachable: {e}", o.mqtt.as_deref().unwrap_or("?"));
                        }
                    }
                }
            }
        }
        if acked_batch.len() >= 500
            || (!acked_batch.is_empty() && !sending)
            || last_draw.elapsed() > Duration::from_millis(200)
        {
            settle(&mut acked_batch, &mut report, &mut hist, ledger.as_mut())?;
        }
        if last_draw.elapsed() > Duration::from_millis(200) {
            last_draw = Instant::now();
            if let Some(b) = &bar {
                b.set_position(start.elapsed().as_millis().min(u128::from(u64::MAX)) as u64);
                b.set_message(format!(
                    "sent {} acked {} ({:.0}/s) errors {}",
                    report.sent,
                    report.acked,
                    report.acked as f64 / start.elapsed().as_secs_f64().max(1e-3),
                    report
                        .errors
                        .iter()
                        .filter(|(k, _)| !k.starts_with("planted"))
                        .map(|(_, v)| v)
                        .sum::<u64>()
                ));
            }
        }
    }
    // What was acknowledged in the last round.
    settle(&mut acked_batch, &mut report, &mut hist, ledger.as_mut())?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(c) = &client {
        let _ = c.disconnect().await;
    }
    report.elapsed_s = start.elapsed().as_secs_f64();
    report.rate_per_sec = report.acked as f64 / o.duration.min(report.elapsed_s).max(1e-3);
    let ms = |v: u64| v as f64 / 1000.0;
    report.latency_ms = Latency {
        p50: ms(hist.value_at_quantile(0.5)),
        p90: ms(hist.value_at_quantile(0.9)),
        p99: ms(hist.value_at_quantile(0.99)),
        max: ms(hist.max()),
    };
    Ok(report)
}

/// Counts acknowledged messages, their latency, and records them in the ledger.
fn settle(
    acked: &mut Vec<Pending>,
    report: &mut Report,
    hist: &mut hdrhistogram::Histogram<u64>,
    mut ledger: Option<&mut Ledger>,
) -> rusqlite::Result<()> {
    for p in acked.drain(..) {
        report.acked += 1;
        let _ = hist.record(p.at.elapsed().as_micros().max(1) as u64);
        if p.rejected.is_none() {
            report.readings += p.expect.len() as u64;
            report.readings += p.also.iter().map(|a| a.1.len() as u64).sum::<u64>();
        }
        if let Some(l) = ledger.as_deref_mut() {
            l.record(&p.device, &p.expect, p.rejected)?;
            for (device, expect) in &p.also {
                l.record(device, expect, None)?;
            }
        }
    }
    Ok(())
}

fn tracing_free_log(msg: &str) {
    eprintln!("firmware-sim: {msg}");
}

#[cfg(test)]
mod tests {
    use super::{hot_phase, parse_duration};

    #[test]
    fn hot_devices_run_hot_in_the_first_half_of_each_cycle_of_the_clock() {
        // A 2 s cycle: hot in even seconds since the epoch, whatever the run's progress.
        assert!(hot_phase(2.0, 0.0, 4_000_000));
        assert!(hot_phase(2.0, 0.99, 4_999_999));
        assert!(!hot_phase(2.0, 0.5, 5_000_000));
        assert!(!hot_phase(2.0, 0.5, 5_999_999));
        assert!(hot_phase(2.0, 0.5, 6_000_000));
        assert!(!hot_phase(2.0, 0.5, -1_000_000));
        // Without a cycle: from 40% to 60% of the run, whatever the clock.
        assert!(!hot_phase(0.0, 0.39, 4_000_000));
        assert!(hot_phase(0.0, 0.4, 5_000_000));
        assert!(!hot_phase(0.0, 0.6, 4_000_000));
    }

    #[test]
    fn durations_take_units_as_people_type_them() {
        assert_eq!(parse_duration("90"), Ok(90.0));
        assert_eq!(parse_duration("90s"), Ok(90.0));
        assert_eq!(parse_duration("1.5s"), Ok(1.5));
        assert_eq!(parse_duration("250ms"), Ok(0.25));
        assert_eq!(parse_duration("5m"), Ok(300.0));
        assert_eq!(parse_duration("2h"), Ok(7200.0));
        assert!(parse_duration("5 days").unwrap_err().contains("\"days\""));
        assert!(parse_duration("soon").unwrap_err().contains("90s"));
        assert!(parse_duration("0s").is_err());
    }
}
