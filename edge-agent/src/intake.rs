//! What the sources hand the writer: the intake types, a leaf that both sides use.
//!
//! MQTT ([`crate::mqtt`]) and CoAP ([`crate::coap`]) turn what they receive into
//! [`Message`]s and send them as [`Command`]s; the writer ([`crate::ingest`]) stores them and
//! completes each with its [`Completion`]: an MQTT PUBACK through an [`AckHandle`], or a
//! CoAP answer with the [`Outcome`].

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::payload::{Context, Format, Reject};

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The plant's MQTT broker.
    Mqtt,
    /// A CoAP request.
    Coap,
}

impl Source {
    /// The `source` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Coap => "coap",
        }
    }
}

/// What happened to one message, for its sender.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Readings stored.
    pub stored: usize,
    /// Readings dropped as duplicates or by the rate limiter.
    pub dropped: usize,
    /// What was refused, with reasons.
    pub rejects: Vec<Reject>,
    /// The message was a redelivery of one already committed.
    pub redelivery: bool,
    /// The MQTT message record to forget once the broker confirms the PUBACK.
    pub mqtt_record: Option<i64>,
}

/// How to acknowledge a message once its commit is durable.
pub enum Completion {
    /// Send this MQTT PUBACK.
    Mqtt(AckHandle),
    /// Answer this CoAP request.
    Coap(oneshot::Sender<Outcome>),
    /// Nothing to acknowledge (tests, QoS 0).
    None,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Completion::Mqtt(..) => "Completion::Mqtt",
            Completion::Coap(_) => "Completion::Coap",
            Completion::None => "Completion::None",
        })
    }
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// MQTT or CoAP.
    pub source: Source,
    /// The topic, or the CoAP peer and path; used for templates and dead letters.
    pub origin: String,
    /// Device and metric named by a CoAP path; `None` means: match `origin` as a topic.
    pub context: Option<Context>,
    /// How to parse the payload.
    pub format: Format,
    /// The payload.
    pub payload: bytes_like::Payload,
    /// Wall-clock receive time, µs since the epoch.
    pub received_us: i64,
    /// MQTT packet id and DUP flag, for recognising redeliveries.
    pub redelivery: Option<(u16, bool)>,
    /// How to acknowledge it.
    pub done: Completion,
}

/// What the writer thread is asked to do. Everything that touches the queue goes through it,
/// so the queue has one owner and needs no locks.
#[derive(Debug)]
// Nearly every command is Ingest; boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Store a received message.
    Ingest(Message),
    /// Look at the requests' inbox (sent by [`crate::ingest::Requests::ask`] to a writer that may be asleep).
    Wake,
}

/// Payload bytes without copying MQTT's buffer.
pub mod bytes_like {
    /// A payload: MQTT's shared buffer or an owned vector.
    #[derive(Debug, Clone)]
    pub enum Payload {
        /// From rumqttc.
        Shared(rumqttc::Publish),
        /// Owned bytes.
        Owned(Vec<u8>),
    }

    impl std::ops::Deref for Payload {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            match self {
                Payload::Shared(p) => &p.payload,
                Payload::Owned(v) => v,
            }
        }
    }
}

/// Wall-clock microseconds since the epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One PUBACK to send: connection generation, packet id, and the writer's record of the
/// message (forgotten once the broker confirms the PUBACK).
pub type Ack = (u64, u16, Option<i64>);

/// Where a committed message's PUBACK goes: the connection generation and packet id.
#[derive(Debug, Clone)]
pub struct AckHandle {
    generation: u64,
    pkid: u16,
    tx: mpsc::UnboundedSender<Ack>,
}

impl AckHandle {
    /// The PUBACK of packet `pkid` on connection `generation`, sent to `tx`.
    pub fn new(generation: u64, pkid: u16, tx: mpsc::UnboundedSender<Ack>) -> Self {
        Self {
            generation,
            pkid,
            tx,
        }
    }
}

impl AckHandle {
    /// Queues the PUBACK. If the MQTT task is gone, the broker redelivers the message and
    /// the writer recognises it, so nothing is lost.
    pub fn ack(self, record: Option<i64>) {
        let _ = self.tx.send((self.generation, self.pkid, record));
    }
}
