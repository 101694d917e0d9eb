//! MQTT ingest from the plant's broker: an MQTT 3.1.1 subscriber built on rumqttc's packet
//! codec, with a loop of its own so that acknowledgements keep up with a full-speed stream.
//!
//! The session is persistent (clean session off) and subscriptions are QoS 1. A PUBACK goes
//! out only after the writer has committed the message's readings (or its dead letter);
//! every PUBACK waiting is written in one go. (rumqttc's event loop sends one request per
//! poll while it reads up to ten messages, so under load its manual acks fell thousands of
//! messages behind: memory grew and every crash meant a storm of redeliveries.)
//!
//! If the agent dies between commit and PUBACK, the broker redelivers the message with DUP
//! set, and the writer recognises it. Acks are tagged with the connection they belong to:
//! one left over from a lost connection is dropped, never sent on the next, where its packet
//! id may already name another message.
//!
//! Lost connections are retried with exponential backoff (200 ms to 30 s), reset by every
//! successful connection.

use std::time::Duration;

use bytes::BytesMut;
use metrics::{counter, gauge};
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{
    ConnectReturnCode, Disconnect, Login, Packet, PingReq, PubAck, QoS, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};

use crate::config::{Mqtt, parse_mqtt_url};
use crate::intake::{
    Ack, AckHandle, Command, Completion, Message, Source, bytes_like::Payload, now_us,
};
use crate::payload::Format;

enum End {
    /// Shutdown finished: every ack was sent and DISCONNECT went out.
    Done,
    /// The connection failed; retry.
    Lost(String),
}

/// Runs until `shutdown` turns true, then drains: every message already handed to the writer
/// is acknowledged before a clean DISCONNECT. Messages arriving after that are left
/// unacknowledged, for the broker to redeliver next session.
pub async fn run(
    cfg: Mqtt,
    max_payload: usize,
    tx: mpsc::Sender<Command>,
    confirmed: mpsc::UnboundedSender<Vec<i64>>,
    mut publish: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (host, port) = parse_mqtt_url(&cfg.url).map_err(anyhow::Error::msg)?;
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
    let mut session = Session {
        cfg,
        max_packet: max_payload.max(1 << 20) * 2,
        tx: Some(tx),
        ack_tx: Some(ack_tx),
        generation: 0,
        skipping: 0,
        confirmed,
        unconfirmed: Vec::new(),
        pending: std::collections::VecDeque::new(),
        pings: std::collections::VecDeque::new(),
    };
    let mut backoff = Duration::from_millis(200);
    let mut connected_before = false;
    loop {
        let connected = tokio::select! {
            c = session.connect(&host, port) => c,
            _ = shutdown.changed() => break,
        };
        let end = match connected {
            Ok((stream, session_present, inbuf)) => {
                gauge!("plantlink_edge_mqtt_connected").set(1.0);
                tracing::info!(url = %session.cfg.url, session_present, "MQTT connected");
                if connected_before && !session_present {
                    counter!("plantlink_edge_mqtt_sessions_lost_total").increment(1);
                    tracing::warn!(url = %session.cfg.url,
                        "the broker forgot this agent's session: what was published while the agent \
                         was away may be lost at the broker; enable persistence in mosquitto.conf");
                }
                connected_before = true;
                backoff = Duration::from_millis(200);
                session
                    .serve(stream, inbuf, &mut ack_rx, &mut publish, &mut shutdown)
                    .await
            }
            Err(e) => End::Lost(e),
        };
        gauge!("plantlink_edge_mqtt_connected").set(0.0);
        match end {
            End::Done => return Ok(()),
            End::Lost(e) => {
                if session.tx.is_none() {
                    break; // shutting down; unacked messages are redelivered next time
                }
                counter!("plantlink_edge_mqtt_reconnects_total").increment(1);
                tracing::warn!(url = %session.cfg.url, error = %e, retry_in = ?backoff,
                    "MQTT connection lost");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    Ok(())
}

struct Session {
    cfg: Mqtt,
    max_packet: usize,
    /// `None` once draining: no new messages go to the writer.
    tx: Option<mpsc::Sender<Command>>,
    /// Our own sender, dropped when draining so the ack channel closes once the writer is done.
    ack_tx: Option<mpsc::UnboundedSender<Ack>>,
    generation: u64,
    /// Bytes of an oversize packet still to be discarded.
    skipping: usize,
    /// Where records of messages whose PUBACK the broker processed go (to the writer).
    confirmed: mpsc::UnboundedSender<Vec<i64>>,
    /// Records of PUBACKs written since the last PINGREQ.
    unconfirmed: Vec<i64>,
    /// Messages read from the broker and not yet taken by the writer. While any wait, the
    /// socket is not read (backpressure), but PUBACKs and PINGREQs still go out.
    pending: std::collections::VecDeque<Message>,
    /// Per PINGREQ in flight, the records its PINGRESP confirms. The broker handles a
    /// connection's packets in order, so a PINGRESP means every earlier PUBACK was processed.
    pings: std::collections::VecDeque<Vec<i64>>,
}

/// Whether the packet at the start of a buffer is a PUBLISH too large to hold.
#[derive(Debug, PartialEq, Eq)]
enum Oversize {
    No,
    NeedMore,
    Yes {
        total: usize,
        header: usize,
        topic: String,
        pkid: u16,
        qos1: bool,
    },
}

/// Reads just the fixed header, topic and packet id of the packet at the start of `buf`.
fn oversize_publish(buf: &[u8], max_packet: usize) -> Oversize {
    let Some(&first) = buf.first() else {
        return Oversize::No;
    };
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Oversize::NeedMore;
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Oversize::No; // malformed; Packet::read reports it
        }
    }
    let total = i + len;
    if total <= max_packet || first >> 4 != 3 {
        return Oversize::No;
    }
    let qos1 = (first >> 1) & 0b11 != 0;
    let Some(tl) = buf
        .get(i..i + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Oversize::NeedMore;
    };
    let id_end = i + 2 + tl + if qos1 { 2 } else { 0 };
    let Some(head) = buf.get(..id_end) else {
        return Oversize::NeedMore;
    };
    let topic = String::from_utf8_lossy(&head[i + 2..i + 2 + tl]).into_owned();
    let pkid = if qos1 {
        u16::from_be_bytes([head[id_end - 2], head[id_end - 1]])
    } else {
        0
    };
    Oversize::Yes {
        total,
        header: id_end,
        topic,
        pkid,
        qos1,
    }
}

impl Session {
    /// Connects, subscribes, and returns the stream, whether the session was present, and
    /// whatever the broker already sent after its CONNACK (queued messages follow at once).
    async fn connect(
        &mut self,
        host: &str,
        port: u16,
    ) -> Result<(TcpStream, bool, BytesMut), String> {
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let mut stream = timeout(Duration::from_secs(10), TcpStream::connect((host, port)))
            .await
            .map_err(|_| "connect timed out after 10 s".to_owned())?
            .map_err(|e| io("connect", e))?;
        stream.set_nodelay(true).map_err(|e| io("nodelay", e))?;
        let mut out = BytesMut::new();
        let mut connect = rumqttc::Connect::new(self.cfg.client_id.clone());
        connect.keep_alive = self.cfg.keep_alive_secs.clamp(5, 65_535) as u16;
        connect.clean_session = false;
        if let (Some(u), Some(p)) = (&self.cfg.username, &self.cfg.password) {
            connect.login = Some(Login::new(u.clone(), p.clone()));
        }
        connect.write(&mut out).map_err(|e| e.to_string())?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| io("sending CONNECT", e))?;
        let mut inbuf = BytesMut::with_capacity(64 * 1024);
        let connack = timeout(Duration::from_secs(10), async {
            loop {
                match Packet::read(&mut inbuf, self.max_packet) {
                    Ok(p) => return Ok(p),
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(e) => return Err(format!("reading CONNACK: {e}")),
                }
                if stream
                    .read_buf(&mut inbuf)
                    .await
                    .map_err(|e| io("reading CONNACK", e))?
                    == 0
                {
                    return Err("broker closed the connection before CONNACK".to_owned());
                }
            }
        })
        .await
        .map_err(|_| "no CONNACK within 10 s".to_owned())??;
        let Packet::ConnAck(ack) = connack else {
            return Err(format!("expected CONNACK, got {connack:?}"));
        };
        if ack.code != ConnectReturnCode::Success {
            return Err(format!(
                "broker refused the connection: {:?} (check mqtt.client_id, username and password)",
                ack.code
            ));
        }
        // Subscribing again is harmless with a persistent session and picks up new filters.
        let filters = self
            .cfg
            .filters()
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect::<Vec<_>>();
        let mut sub = Subscribe::new_many(filters);
        sub.pkid = 1;
        out.clear();
        sub.write(&mut out).map_err(|e| e.to_string())?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| io("sending SUBSCRIBE", e))?;
        self.generation += 1;
        self.skipping = 0;
        // Unconfirmed records stay in the queue file: those messages may be redelivered.
        self.unconfirmed.clear();
        // Never handed to the writer, so never acknowledged: the broker sends them again.
        self.pending.clear();
        self.pings.clear();
        Ok((stream, ack.session_present, inbuf))
    }

    async fn serve(
        &mut self,
        mut stream: TcpStream,
        mut inbuf: BytesMut,
        acks: &mut mpsc::UnboundedReceiver<Ack>,
        publish: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let keep_alive = Duration::from_secs(self.cfg.keep_alive_secs.clamp(5, 65_535));
        if let Err(e) = self.handle_packets(&mut inbuf) {
            return End::Lost(e);
        }
        let mut out = BytesMut::with_capacity(16 * 1024);
        let mut last_in = Instant::now();
        let mut last_out = Instant::now();
        let mut ping = tokio::time::interval(keep_alive / 2);
        loop {
            out.clear();
            let writer = self.tx.clone();
            tokio::select! {
                biased;
                changed = shutdown.changed(), if self.tx.is_some() => {
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!("MQTT: stopping intake; acknowledging what was committed");
                        self.tx = None;
                        self.ack_tx = None;
                        self.pending.clear(); // left unacknowledged for redelivery
                    }
                }
                permit = async { writer.as_ref().expect("intake open").reserve().await },
                    if writer.is_some() && !self.pending.is_empty() =>
                {
                    let Ok(permit) = permit else {
                        return End::Lost("the queue writer stopped".into());
                    };
                    if let Some(m) = self.pending.pop_front() {
                        permit.send(Command::Ingest(m));
                    }
                }
                first = acks.recv() => {
                    let Some(first) = first else {
                        // Draining and the writer is done: every ack is out.
                        let _ = Disconnect.write(&mut out);
                        let _ = stream.write_all(&out).await;
                        let _ = stream.shutdown().await;
                        return End::Done;
                    };
                    let mut pending = Some(first);
                    while let Some((generation, pkid, record)) = pending.take().or_else(|| acks.try_recv().ok()) {
                        if generation == self.generation {
                            let _ = PubAck::new(pkid).write(&mut out);
                            self.unconfirmed.extend(record);
                        }
                        if out.len() > 60 * 1024 {
                            break;
                        }
                    }
                    self.ping_if_unconfirmed(&mut out);
                    if !out.is_empty() {
                        if let Err(e) = stream.write_all(&out).await {
                            return End::Lost(format!("sending PUBACKs: {e}"));
                        }
                        last_out = Instant::now();
                    }
                }
                read = stream.read_buf(&mut inbuf), if self.pending.is_empty() => {
                    match read {
                        Ok(0) => return End::Lost("broker closed the connection".into()),
                        Err(e) => return End::Lost(format!("reading: {e}")),
                        Ok(_) => last_in = Instant::now(),
                    }
                    if let Err(e) = self.handle_packets(&mut inbuf) {
                        return End::Lost(e);
                    }
                    self.ping_if_unconfirmed(&mut out);
                    if !out.is_empty() {
                        if let Err(e) = stream.write_all(&out).await {
                            return End::Lost(format!("sending PINGREQ: {e}"));
                        }
                        last_out = Instant::now();
                    }
                }
                Some((topic, payload)) = publish.recv() => {
                    // QoS 0, as Sparkplug B sends commands; a lost one is asked for again.
                    let p = rumqttc::Publish::new(topic, QoS::AtMostOnce, payload);
                    if p.write(&mut out).is_ok() {
                        if let Err(e) = stream.write_all(&out).await {
                            return End::Lost(format!("sending PUBLISH: {e}"));
                        }
                        last_out = Instant::now();
                    }
                }
                _ = ping.tick() => {
                    if last_in.elapsed() > keep_alive * 3 / 2 {
                        return End::Lost(format!("no answer from the broker for {:?}", last_in.elapsed()));
                    }
                    if last_out.elapsed() >= keep_alive / 2 {
                        let _ = PingReq.write(&mut out);
                        self.pings.push_back(std::mem::take(&mut self.unconfirmed));
                        if let Err(e) = stream.write_all(&out).await {
                            return End::Lost(format!("sending PINGREQ: {e}"));
                        }
                        last_out = Instant::now();
                    }
                }
            }
        }
    }

    /// Asks for a PINGRESP to confirm the PUBACKs written since the last PINGREQ, unless a
    /// PINGREQ is already in flight (its answer leads to the next one).
    fn ping_if_unconfirmed(&mut self, out: &mut BytesMut) {
        if self.pings.is_empty() && !self.unconfirmed.is_empty() {
            let _ = PingReq.write(out);
            self.pings.push_back(std::mem::take(&mut self.unconfirmed));
        }
    }

    /// Handles every complete packet in `inbuf`, leaving a partial one for the next read.
    fn handle_packets(&mut self, inbuf: &mut BytesMut) -> Result<(), String> {
        loop {
            if self.skipping > 0 {
                let n = self.skipping.min(inbuf.len());
                let _ = inbuf.split_to(n);
                self.skipping -= n;
                if self.skipping > 0 {
                    return Ok(());
                }
            }
            match oversize_publish(inbuf, self.max_packet) {
                Oversize::NeedMore => return Ok(()),
                Oversize::No => {}
                Oversize::Yes {
                    total,
                    header,
                    topic,
                    pkid,
                    qos1,
                } => {
                    // Too large to hold: keep its first bytes as evidence, skip the rest,
                    // and let the writer dead-letter it before it is acknowledged.
                    let keep = inbuf.len().min(total).min(header + 4096);
                    let evidence = inbuf.split_to(keep)[header..].to_vec();
                    self.skipping = total - keep;
                    self.forward_oversize(topic, pkid, qos1, total, evidence);
                    continue;
                }
            }
            match Packet::read(inbuf, self.max_packet) {
                Ok(Packet::Publish(p)) => self.forward(p),
                Ok(Packet::SubAck(s)) => {
                    for (filter, code) in self.cfg.filters().iter().zip(&s.return_codes) {
                        if *code == SubscribeReasonCode::Failure {
                            tracing::error!(%filter, "broker refused the subscription; check its ACL");
                        }
                    }
                }
                Ok(Packet::PingResp) => {
                    if let Some(records) = self.pings.pop_front()
                        && !records.is_empty()
                    {
                        let _ = self.confirmed.send(records);
                    }
                }
                Ok(_) => {}
                Err(CodecError::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(format!("malformed packet from the broker: {e}")),
            }
        }
    }

    fn forward_oversize(
        &mut self,
        topic: String,
        pkid: u16,
        qos1: bool,
        total: usize,
        evidence: Vec<u8>,
    ) {
        let (Some(_), Some(ack_tx)) = (&self.tx, &self.ack_tx) else {
            return;
        };
        let m = Message {
            source: Source::Mqtt,
            origin: topic,
            context: None,
            format: Format::TooLarge(total),
            received_us: now_us(),
            redelivery: None,
            done: if qos1 {
                Completion::Mqtt(AckHandle::new(self.generation, pkid, ack_tx.clone()))
            } else {
                Completion::None
            },
            payload: Payload::Owned(evidence),
        };
        self.pending.push_back(m);
    }

    /// Queues one PUBLISH for the writer.
    fn forward(&mut self, p: rumqttc::Publish) {
        let (Some(_), Some(ack_tx)) = (&self.tx, &self.ack_tx) else {
            return; // draining: left unacknowledged for redelivery
        };
        let qos1 = p.qos != QoS::AtMostOnce;
        if p.retain {
            // Sent because we (re)subscribed, not because a device just published: an old
            // value without a time of its own would be stored again as new.
            counter!("plantlink_edge_mqtt_retained_skipped_total").increment(1);
            if qos1 {
                let _ = ack_tx.send((self.generation, p.pkid, None));
            }
            return;
        }
        let m = Message {
            source: Source::Mqtt,
            origin: p.topic.clone(),
            context: None,
            format: Format::Auto,
            received_us: now_us(),
            redelivery: qos1.then_some((p.pkid, p.dup)),
            done: if qos1 {
                Completion::Mqtt(AckHandle::new(self.generation, p.pkid, ack_tx.clone()))
            } else {
                Completion::None
            },
            payload: Payload::Shared(p),
        };
        self.pending.push_back(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_header(topic: &str, pkid: u16, payload_len: usize) -> Vec<u8> {
        let remaining = 2 + topic.len() + 2 + payload_len;
        let mut out = vec![0x32]; // PUBLISH, QoS 1
        let mut r = remaining;
        loop {
            let mut b = (r & 0x7f) as u8;
            r >>= 7;
            if r > 0 {
                b |= 0x80;
            }
            out.push(b);
            if r == 0 {
                break;
            }
        }
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&pkid.to_be_bytes());
        out
    }

    #[test]
    fn oversize_publish_is_recognised_from_its_header() {
        let h = publish_header("plant/a/b", 7, 5_000_000);
        match oversize_publish(&h, 1 << 20) {
            Oversize::Yes {
                total,
                header,
                topic,
                pkid,
                qos1,
            } => {
                assert_eq!(
                    (topic.as_str(), pkid, qos1, header),
                    ("plant/a/b", 7, true, h.len())
                );
                assert_eq!(total, h.len() + 5_000_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(oversize_publish(&h[..3], 1 << 20), Oversize::NeedMore);
        assert_eq!(
            oversize_publish(&publish_header("t", 1, 10), 1 << 20),
            Oversize::No
        );
        assert_eq!(oversize_publish(&[], 1 << 20), Oversize::No);
    }
}
