//! The MQTT session as a state machine without I/O: it takes the bytes the broker sent, the
//! writer's acknowledgements and the time, and gives back the bytes to send and the
//! messages for the writer. [`super::eventloop`] moves the bytes; tests drive it directly.
//!
//! What it keeps:
//! - **Connection generations.** Each CONNACK starts a generation; an ack of an earlier one
//!   is dropped, never sent on the next connection, where its packet id may already name
//!   another message.
//! - **Ack batching.** Every PUBACK waiting is written into one buffer (up to 60 KiB), then
//!   sent in one write.
//! - **Ping-confirmed redelivery records.** A PUBACK's record (the queue's note that the
//!   message was committed) is confirmed when the broker answers a later PINGREQ: it handles
//!   a connection's packets in order, so the PINGRESP means it processed the PUBACK.
//! - **Keep-alive.** A PINGREQ when nothing was sent for half the keep-alive; the
//!   connection is lost when nothing came for one and a half.
//! - **Backpressure.** Messages the writer has not taken yet wait here; while any wait, the
//!   event loop does not read the socket, but acks and pings still go out.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;
use metrics::counter;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{
    ConnectReturnCode, Disconnect, Login, Packet, PingReq, PubAck, QoS, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Mqtt;
use crate::intake::{Ack, AckHandle, Completion, Message, Source, bytes_like::Payload, now_us};
use crate::payload::Format;

/// Bytes of PUBACKs written before they are sent (the rest wait for the next round).
const ACK_BATCH_BYTES: usize = 60 * 1024;

/// One agent's MQTT session, across its connections.
pub(super) struct State {
    client_id: String,
    login: Option<(String, String)>,
    filters: Vec<String>,
    pub(super) max_packet: usize,
    pub(super) keep_alive: Duration,
    /// Our own ack sender, handed to each message; `None` once draining (no new messages
    /// go to the writer, and the ack channel closes once the writer is done).
    ack_tx: Option<mpsc::UnboundedSender<Ack>>,
    generation: u64,
    /// Bytes of an oversize packet still to be discarded.
    skipping: usize,
    /// Where records of messages whose PUBACK the broker processed go (to the writer).
    confirmed: mpsc::UnboundedSender<Vec<i64>>,
    /// Records of PUBACKs written since the last PINGREQ.
    unconfirmed: Vec<i64>,
    /// Messages read from the broker and not yet taken by the writer.
    pending: VecDeque<Message>,
    /// Per PINGREQ in flight, the records its PINGRESP confirms.
    pings: VecDeque<Vec<i64>>,
    /// Bytes to send.
    out: BytesMut,
    last_in: Instant,
    last_out: Instant,
}

impl State {
    /// A session for `cfg`; `ack_tx` is the sending half of the channel the writer's acks
    /// come back on, `confirmed` where confirmed records go.
    pub(super) fn new(
        cfg: &Mqtt,
        max_payload: usize,
        ack_tx: mpsc::UnboundedSender<Ack>,
        confirmed: mpsc::UnboundedSender<Vec<i64>>,
        now: Instant,
    ) -> Self {
        Self {
            client_id: cfg.client_id.clone(),
            login: cfg.username.clone().zip(cfg.password.clone()),
            filters: cfg.filters(),
            max_packet: max_payload.max(1 << 20) * 2,
            keep_alive: Duration::from_secs(cfg.keep_alive_secs.clamp(5, 65_535)),
            ack_tx: Some(ack_tx),
            generation: 0,
            skipping: 0,
            confirmed,
            unconfirmed: Vec::new(),
            pending: VecDeque::new(),
            pings: VecDeque::new(),
            out: BytesMut::with_capacity(16 * 1024),
            last_in: now,
            last_out: now,
        }
    }

    /// The current connection generation (0 before the first CONNACK).
    #[cfg(test)]
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the session is draining (shutting down).
    #[cfg(test)]
    pub(super) fn draining(&self) -> bool {
        self.ack_tx.is_none()
    }

    /// A connection is being opened: writes CONNECT.
    pub(super) fn connect(&mut self) -> Result<(), String> {
        let mut connect = rumqttc::Connect::new(self.client_id.clone());
        connect.keep_alive = self.keep_alive.as_secs() as u16;
        connect.clean_session = false;
        if let Some((u, p)) = &self.login {
            connect.login = Some(Login::new(u.clone(), p.clone()));
        }
        self.out.clear();
        connect.write(&mut self.out).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The first packet of a connection: a CONNACK that accepts starts a new generation and
    /// writes SUBSCRIBE; returns whether the broker had the session.
    pub(super) fn connack(&mut self, packet: Packet, now: Instant) -> Result<bool, String> {
        let Packet::ConnAck(ack) = packet else {
            return Err(format!("expected CONNACK, got {packet:?}"));
        };
        if ack.code != ConnectReturnCode::Success {
            return Err(format!(
                "broker refused the connection: {:?} (check mqtt.client_id, username and password)",
                ack.code
            ));
        }
        // Subscribing again is harmless with a persistent session and picks up new filters.
        let filters = self
            .filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect::<Vec<_>>();
        let mut sub = Subscribe::new_many(filters);
        sub.pkid = 1;
        self.out.clear();
        sub.write(&mut self.out).map_err(|e| e.to_string())?;
        self.generation += 1;
        self.skipping = 0;
        // Unconfirmed records stay in the queue file: those messages may be redelivered.
        self.unconfirmed.clear();
        // Never handed to the writer, so never acknowledged: the broker sends them again.
        self.pending.clear();
        self.pings.clear();
        self.last_in = now;
        self.last_out = now;
        Ok(ack.session_present)
    }

    /// The bytes to send now, if any (the caller writes them all, or loses the connection).
    pub(super) fn take_out(&mut self, now: Instant) -> Option<BytesMut> {
        if self.out.is_empty() {
            return None;
        }
        self.last_out = now;
        Some(self.out.split())
    }

    /// Bytes arrived from the broker (in `inbuf`, which keeps a partial packet).
    pub(super) fn received(&mut self, inbuf: &mut BytesMut, now: Instant) -> Result<(), String> {
        self.last_in = now;
        self.handle_packets(inbuf)?;
        self.ping_if_unconfirmed();
        Ok(())
    }

    /// The writer committed a message (or its dead letter): its PUBACK, on the connection
    /// it came on only. Returns false when the ack batch is full (send it, then go on).
    pub(super) fn acked(&mut self, (generation, pkid, record): Ack) -> bool {
        if generation == self.generation {
            let _ = PubAck::new(pkid).write(&mut self.out);
            self.unconfirmed.extend(record);
        }
        self.out.len() <= ACK_BATCH_BYTES
    }

    /// A batch of acks is written: asks for their confirmation.
    pub(super) fn acks_written(&mut self) {
        self.ping_if_unconfirmed();
    }

    /// A QoS 0 PUBLISH of ours (Sparkplug B commands; a lost one is asked for again).
    pub(super) fn publish(&mut self, topic: String, payload: Vec<u8>) {
        let p = rumqttc::Publish::new(topic, QoS::AtMostOnce, payload);
        let before = self.out.len();
        if let Err(e) = p.write(&mut self.out) {
            // The codec may have written part of it (a payload over MQTT's 256 MiB limit):
            // none of it goes out.
            self.out.truncate(before);
            tracing::warn!(error = %e, "MQTT: a command too large to publish was dropped");
        }
    }

    /// The keep-alive timer (every half keep-alive): pings when nothing went out for that
    /// long; the connection is lost when nothing came in for one and a half keep-alives.
    pub(super) fn tick(&mut self, now: Instant) -> Result<(), String> {
        let quiet = now.saturating_duration_since(self.last_in);
        if quiet > self.keep_alive * 3 / 2 {
            return Err(format!("no answer from the broker for {quiet:?}"));
        }
        if now.saturating_duration_since(self.last_out) >= self.keep_alive / 2 {
            let _ = PingReq.write(&mut self.out);
            self.pings.push_back(std::mem::take(&mut self.unconfirmed));
        }
        Ok(())
    }

    /// Whether messages wait for the writer (the socket is not read meanwhile).
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next message for the writer.
    pub(super) fn next_message(&mut self) -> Option<Message> {
        self.pending.pop_front()
    }

    /// Shutting down: no more messages for the writer; those waiting are left
    /// unacknowledged, for the broker to redeliver next session.
    pub(super) fn drain(&mut self) {
        self.ack_tx = None;
        self.pending.clear();
    }

    /// Draining is done: writes DISCONNECT.
    pub(super) fn disconnect(&mut self) {
        let _ = Disconnect.write(&mut self.out);
    }

    /// Asks for a PINGRESP to confirm the PUBACKs written since the last PINGREQ, unless a
    /// PINGREQ is already in flight (its answer leads to the next one).
    fn ping_if_unconfirmed(&mut self) {
        if self.pings.is_empty() && !self.unconfirmed.is_empty() {
            let _ = PingReq.write(&mut self.out);
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
                    for (filter, code) in self.filters.iter().zip(&s.return_codes) {
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
        let Some(ack_tx) = &self.ack_tx else {
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
        let Some(ack_tx) = &self.ack_tx else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{ConnAck, PingResp, Publish};

    fn config(keep_alive_secs: u64) -> Mqtt {
        toml::from_str(&format!(
            "url = \"mqtt://127.0.0.1:1883\"\nclient_id = \"t\"\n\
             subscriptions = [\"plant/#\"]\nkeep_alive_secs = {keep_alive_secs}\n"
        ))
        .unwrap()
    }

    /// A session with its channels, connected once at `now`.
    fn connected(
        now: Instant,
    ) -> (
        State,
        mpsc::UnboundedReceiver<Ack>,
        mpsc::UnboundedReceiver<Vec<i64>>,
    ) {
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (confirmed_tx, confirmed) = mpsc::unbounded_channel();
        let mut s = State::new(&config(10), 1 << 16, ack_tx, confirmed_tx, now);
        s.connect().unwrap();
        let connect = s.take_out(now).unwrap();
        assert!(matches!(
            Packet::read(&mut connect.clone(), 1 << 20),
            Ok(Packet::Connect(..))
        ));
        assert!(
            s.connack(
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)),
                now
            )
            .unwrap()
        );
        let sub = s.take_out(now).unwrap();
        assert!(matches!(
            Packet::read(&mut sub.clone(), 1 << 20),
            Ok(Packet::Subscribe(_))
        ));
        (s, acks, confirmed)
    }

    fn publish(pkid: u16, dup: bool) -> BytesMut {
        let mut p = Publish::new(format!("plant/d{pkid}"), QoS::AtLeastOnce, b"1".to_vec());
        p.pkid = pkid;
        p.dup = dup;
        let mut out = BytesMut::new();
        p.write(&mut out).unwrap();
        out
    }

    /// The packets in `bytes`, in order.
    fn packets(mut bytes: BytesMut) -> Vec<Packet> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            out.push(Packet::read(&mut bytes, 1 << 20).unwrap());
        }
        out
    }

    #[test]
    fn acks_go_out_together_and_a_pingresp_confirms_their_records() {
        let now = Instant::now();
        let (mut s, _acks, mut confirmed) = connected(now);
        let mut inbuf = publish(1, false);
        inbuf.extend_from_slice(&publish(2, true));
        // Half of a third packet: kept for the next read.
        let third = publish(3, false);
        inbuf.extend_from_slice(&third[..4]);
        s.received(&mut inbuf, now).unwrap();
        assert_eq!(inbuf.len(), 4);
        let a = s.next_message().unwrap();
        let b = s.next_message().unwrap();
        assert!(s.next_message().is_none());
        assert_eq!(
            (a.redelivery, b.redelivery),
            (Some((1, false)), Some((2, true)))
        );
        assert!(
            s.take_out(now).is_none(),
            "nothing to send before the writer commits"
        );
        // Acks of both, with their records: two PUBACKs and one PINGREQ in one write.
        assert!(s.acked((s.generation(), 1, Some(11))));
        assert!(s.acked((s.generation(), 2, Some(12))));
        s.acks_written();
        let sent = packets(s.take_out(now).unwrap());
        assert!(
            matches!(
                sent.as_slice(),
                [Packet::PubAck(x), Packet::PubAck(y), Packet::PingReq] if x.pkid == 1 && y.pkid == 2
            ),
            "{sent:?}"
        );
        // While that PINGREQ is out, a later ack waits for its answer's successor.
        assert!(s.acked((s.generation(), 3, Some(13))));
        s.acks_written();
        assert!(matches!(
            packets(s.take_out(now).unwrap()).as_slice(),
            [Packet::PubAck(_)]
        ));
        assert!(confirmed.try_recv().is_err());
        let mut resp = BytesMut::new();
        PingResp.write(&mut resp).unwrap();
        s.received(&mut resp, now).unwrap();
        assert_eq!(confirmed.try_recv().unwrap(), vec![11, 12]);
        // The next PINGREQ asks for the rest.
        assert!(matches!(
            packets(s.take_out(now).unwrap()).as_slice(),
            [Packet::PingReq]
        ));
        let mut resp = BytesMut::new();
        PingResp.write(&mut resp).unwrap();
        s.received(&mut resp, now).unwrap();
        assert_eq!(confirmed.try_recv().unwrap(), vec![13]);
    }

    #[test]
    fn an_ack_of_an_earlier_connection_is_never_sent() {
        let now = Instant::now();
        let (mut s, _acks, _confirmed) = connected(now);
        let old = s.generation();
        let mut inbuf = publish(7, false);
        s.received(&mut inbuf, now).unwrap();
        // The connection is lost and a new one made before the writer commits.
        s.connect().unwrap();
        let _ = s.take_out(now);
        s.connack(
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)),
            now,
        )
        .unwrap();
        let _ = s.take_out(now);
        assert!(
            s.next_message().is_none(),
            "unhanded messages are redelivered, not kept"
        );
        assert!(s.acked((old, 7, Some(70))));
        s.acks_written();
        assert!(
            s.take_out(now).is_none(),
            "packet 7 may name another message now"
        );
        assert!(s.acked((s.generation(), 7, None)));
        assert!(
            matches!(packets(s.take_out(now).unwrap()).as_slice(), [Packet::PubAck(p)] if p.pkid == 7)
        );
    }

    #[test]
    fn keep_alive_pings_a_quiet_link_and_gives_up_on_a_deaf_broker() {
        let t0 = Instant::now();
        let (mut s, _acks, _confirmed) = connected(t0);
        let ka = s.keep_alive;
        s.tick(t0 + ka / 4).unwrap();
        assert!(
            s.take_out(t0 + ka / 4).is_none(),
            "sent recently: no ping yet"
        );
        s.tick(t0 + ka / 2).unwrap();
        assert!(matches!(
            packets(s.take_out(t0 + ka / 2).unwrap()).as_slice(),
            [Packet::PingReq]
        ));
        // Something heard resets the deadline.
        let mut resp = BytesMut::new();
        PingResp.write(&mut resp).unwrap();
        s.received(&mut resp, t0 + ka).unwrap();
        s.tick(t0 + ka * 2).unwrap();
        let err = s
            .tick(t0 + ka * 5 / 2 + Duration::from_millis(1))
            .unwrap_err();
        assert!(err.contains("no answer from the broker"), "{err}");
    }

    #[test]
    fn draining_takes_no_new_messages_and_retained_ones_are_acked_unstored() {
        let now = Instant::now();
        let (mut s, mut acks, _confirmed) = connected(now);
        let mut p = Publish::new("plant/old", QoS::AtLeastOnce, b"1".to_vec());
        p.pkid = 4;
        p.retain = true;
        let mut inbuf = BytesMut::new();
        p.write(&mut inbuf).unwrap();
        s.received(&mut inbuf, now).unwrap();
        assert!(s.next_message().is_none());
        assert_eq!(acks.try_recv().unwrap(), (s.generation(), 4, None));
        s.drain();
        assert!(s.draining());
        let mut inbuf = publish(5, false);
        s.received(&mut inbuf, now).unwrap();
        assert!(!s.has_pending());
    }

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
