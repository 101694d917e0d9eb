//! Versioned frames on the QUIC link, serialized with postcard.
//!
//! On a stream each frame is `u32 length (big-endian) | u8 version | postcard(Frame)`,
//! where `length` counts the version byte and the postcard bytes. [`decode_frame`] is
//! sans-IO: give it whatever bytes have arrived and it returns a frame and how many bytes
//! it used, or [`FrameError::Incomplete`] with how many more it needs.
//!
//! A session: the agent opens a stream and sends [`Frame::Hello`]; the cloud answers
//! [`Frame::Welcome`] (or [`Frame::Error`] and closes). Then the agent sends
//! [`Frame::Batch`] frames, each with a gateway-assigned sequence number, and the cloud
//! answers [`Frame::Ack`] once the batch is durable in every sink. A batch the cloud
//! refuses gets a [`Frame::Error`] naming its sequence number. On the first stream the
//! agent reports its queue now and then with [`Frame::Status`], or with
//! [`Frame::QueueReport`] on a connection that negotiated [`ALPN_1_1`].
//!
//! Revisions: the ALPN id says which frames a peer knows. Both ends offer [`ALPNS`], the
//! newest first, and TLS settles on the newest both know: a peer that knows only
//! [`ALPN`] still connects, and is sent no frame it could not decode.

use serde::{Deserialize, Serialize};

/// The frame format version written by this build.
pub const PROTOCOL_VERSION: u8 = 1;

/// The ALPN protocol id of the Plantlink uplink, first release: version 1 frames up to
/// [`Frame::Devices`].
pub const ALPN: &[u8] = b"plantlink/1";

/// Revision 1.1: as [`ALPN`], and the agent reports its queue with [`Frame::QueueReport`]
/// (bytes and the oldest reading's age) in place of [`Frame::Status`]. The frame version
/// byte stays 1.
pub const ALPN_1_1: &[u8] = b"plantlink/1.1";

/// The ALPN ids this build speaks, most preferred first.
pub const ALPNS: [&[u8]; 2] = [ALPN_1_1, ALPN];

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Default cap on one frame (version byte and postcard bytes).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// One message on the uplink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Agent to cloud, first on a connection.
    Hello(Hello),
    /// Cloud to agent: the hello was accepted.
    Welcome(Welcome),
    /// Agent to cloud: a batch of readings.
    Batch(Batch),
    /// Cloud to agent: the batch with this sequence number is durable in every sink.
    Ack(Ack),
    /// Either way: something was refused.
    Error(ErrorFrame),
    /// Agent to cloud, on the first stream now and then: the gateway's queue. Added after
    /// the first release at the end of the enum, so older peers decode everything else.
    Status(Status),
    /// Cloud to agent, on the first stream: the tenant's payload schemas. Sent only to an
    /// agent that has sent [`Frame::SchemasApplied`] (an older agent never gets one).
    Schemas(SchemaSet),
    /// Agent to cloud, on the first stream: the schema set in force and what of it was
    /// refused. Sent after Welcome (version 0: none yet) and after each [`Frame::Schemas`].
    SchemasApplied(SchemasApplied),
    /// Agent to cloud, on the first stream: which device type and firmware each device
    /// reported, and the registry schema that read it. All of them after
    /// [`Frame::SchemasApplied`] on connect, then the changes.
    Devices(DeviceReport),
    /// Agent to cloud, on the first stream now and then, in place of [`Frame::Status`]:
    /// the gateway's queue with its bytes and the age of its oldest reading. Sent only on
    /// a connection that negotiated [`ALPN_1_1`].
    QueueReport(QueueReport),
}

/// What a gateway reports of its queue, revision 1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    /// What [`Frame::Status`] carries.
    pub status: Status,
    /// Bytes the queue holds in the gateway's store.
    pub queued_bytes: u64,
    /// How old the reading queued first (the next the backlog sends) was when the report
    /// was written, in milliseconds of the gateway's clock against the reading's timestamp;
    /// `None` when the queue is empty.
    pub oldest_age_ms: Option<u64>,
}

/// The most devices one [`Frame::Devices`] carries (a report of more is several frames).
/// With names of at most 128 bytes a frame stays under 64 KiB, the control stream's cap.
pub const DEVICES_PER_FRAME: usize = 128;

/// Devices and what reads their payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// At most [`DEVICES_PER_FRAME`].
    pub devices: Vec<DeviceInfo>,
}

/// One device's identity as its payloads and topics tell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device id, as readings carry it.
    pub device: String,
    /// Its device type.
    pub device_type: String,
    /// Its firmware version.
    pub firmware_version: String,
    /// The registry schema that decodes it; `None` when none does (a local `[[firmware]]`
    /// mapping, or plain JSON).
    pub schema_id: Option<i64>,
}

/// A tenant's payload schemas, as the registry holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSet {
    /// The set's version: it grows with every change to the tenant's schemas.
    pub version: u64,
    /// Every schema of the tenant.
    pub schemas: Vec<SchemaEntry>,
}

/// One payload schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaEntry {
    /// The registry's id.
    pub id: i64,
    /// Its revision.
    pub revision: i32,
    /// The device type.
    pub device_type: String,
    /// The firmware versions (`2.1.0`, `2.x`).
    pub firmware_version: String,
    /// `json`, `cbor` or `protobuf`.
    pub format: String,
    /// The definition, as JSON text.
    pub definition: String,
}

/// What an agent made of a [`SchemaSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemasApplied {
    /// The version in force (0: none).
    pub version: u64,
    /// The schemas that could not be applied: which one, and why.
    pub refused: Vec<SchemaRefusal>,
}

/// A schema an agent refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaRefusal {
    /// The schema's id.
    pub id: i64,
    /// Its revision.
    pub revision: i32,
    /// Why, naming the field.
    pub reason: String,
}

/// What a gateway reports of its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Readings waiting in the gateway's queue (sent or not, not yet acknowledged).
    pub queued_readings: u64,
    /// Live readings not yet sent.
    pub live_waiting: u64,
    /// Whether a backlog is still being drained.
    pub backlog: bool,
    /// Batches sent and not yet acknowledged.
    pub in_flight: u32,
}

/// The agent's greeting. The gateway's identity is taken from its certificate; the id
/// here is only compared with it, to catch misconfigured gateways early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The gateway id the agent is configured with.
    pub gateway_id: String,
    /// The agent's name and version, e.g. `edge-agent/0.1.0`.
    pub agent: String,
    /// The newest batch codec version the agent writes.
    pub codec_version: u8,
}

/// The cloud's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The gateway id taken from the certificate.
    pub gateway_id: String,
    /// The tenant taken from the certificate.
    pub tenant: String,
    /// The largest batch payload the cloud accepts, in bytes.
    pub max_batch_bytes: u32,
    /// How many unacked batches the agent may have in flight.
    pub max_in_flight: u32,
}

/// Which queue a batch was drawn from: live data goes first, the backlog is rate-capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lane {
    /// Fresh readings.
    Live,
    /// Readings replayed after an outage.
    Backlog,
}

/// One batch of readings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The gateway-assigned sequence number, unique per gateway.
    pub seq: u64,
    /// The lane the batch travels in.
    pub lane: Lane,
    /// How many readings the payload holds, checked against it on decode.
    pub readings: u32,
    /// The payload written by [`crate::BatchEncoder`].
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The acknowledgement of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The batch's sequence number.
    pub seq: u64,
}

/// A refusal, with a machine-readable code and a reason for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// The batch it concerns, if any.
    pub seq: Option<u64>,
    /// What was wrong and what to do about it.
    pub reason: String,
}

/// Refusal codes. A number rather than an enum, so a peer can carry codes it does not
/// know yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The frame or payload did not decode.
    pub const MALFORMED: Self = Self(1);
    /// The frame or codec version is not supported.
    pub const UNSUPPORTED_VERSION: Self = Self(2);
    /// The frame or batch was over a size limit.
    pub const TOO_LARGE: Self = Self(3);
    /// The peer broke the session order (e.g. a batch before hello).
    pub const PROTOCOL: Self = Self(4);
    /// The gateway may not write this data.
    pub const FORBIDDEN: Self = Self(5);
    /// A sink failed; the batch should be retried later.
    pub const UNAVAILABLE: Self = Self(6);
}

/// Why bytes did not make a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed; nothing was consumed.
    #[error("frame incomplete: {needed} more bytes needed")]
    Incomplete {
        /// How many more bytes are needed at least.
        needed: usize,
    },
    /// The length prefix is over the limit.
    #[error("frame of {len} bytes is over the limit of {limit}")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The frame was written by another protocol version.
    #[error("frame version {found} is not supported (this build speaks version {supported})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The frame body is not a valid postcard frame.
    #[error("frame is malformed: {0}")]
    Malformed(String),
}

/// Appends `frame`, length prefix included, to `out`.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX]);
    out.push(PROTOCOL_VERSION);
    // Serializing into a Vec cannot fail for these types.
    let body = postcard::to_extend(frame, Vec::new())
        .unwrap_or_else(|e| panic!("postcard cannot serialize a frame: {e}"));
    out.extend_from_slice(&body);
    let len = (out.len() - start - LENGTH_PREFIX) as u32;
    out[start..start + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
}

/// The length of the frame starting at `buf`, length prefix included, once the prefix
/// has arrived. Lets a reader wait for exactly one frame.
pub fn frame_len(buf: &[u8], max_frame: usize) -> Result<usize, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Err(FrameError::Incomplete {
            needed: LENGTH_PREFIX - buf.len(),
        });
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            limit: max_frame,
        });
    }
    if len == 0 {
        return Err(FrameError::Malformed("zero-length frame".into()));
    }
    Ok(LENGTH_PREFIX + len)
}

/// Decodes the frame at the start of `buf`, returning it and the bytes it used.
pub fn decode_frame(buf: &[u8], max_frame: usize) -> Result<(Frame, usize), FrameError> {
    let total = frame_len(buf, max_frame)?;
    if buf.len() < total {
        return Err(FrameError::Incomplete {
            needed: total - buf.len(),
        });
    }
    let version = buf[LENGTH_PREFIX];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(&buf[LENGTH_PREFIX + 1..total])
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the frame",
            rest.len()
        )));
    }
    Ok((frame, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                gateway_id: "gw-1".into(),
                agent: "edge-agent/0.1.0".into(),
                codec_version: 1,
            }),
            Frame::Welcome(Welcome {
                gateway_id: "gw-1".into(),
                tenant: "acme".into(),
                max_batch_bytes: 1 << 20,
                max_in_flight: 8,
            }),
            Frame::Batch(Batch {
                seq: 42,
                lane: Lane::Backlog,
                readings: 3,
                payload: vec![1, 2, 3, 0xff],
            }),
            Frame::Ack(Ack { seq: u64::MAX }),
            Frame::Error(ErrorFrame {
                code: ErrorCode::MALFORMED,
                seq: Some(7),
                reason: "bad".into(),
            }),
            Frame::Status(Status {
                queued_readings: 1_000_000,
                live_waiting: 12,
                backlog: true,
                in_flight: 16,
            }),
            Frame::Schemas(SchemaSet {
                version: 3,
                schemas: vec![SchemaEntry {
                    id: 1,
                    revision: 2,
                    device_type: "th-300".into(),
                    firmware_version: "3.x".into(),
                    format: "protobuf".into(),
                    definition: "{}".into(),
                }],
            }),
            Frame::SchemasApplied(SchemasApplied {
                version: 3,
                refused: vec![SchemaRefusal {
                    id: 1,
                    revision: 2,
                    reason: "definition.message: no".into(),
                }],
            }),
            Frame::Devices(DeviceReport {
                devices: vec![DeviceInfo {
                    device: "line1-th7".into(),
                    device_type: "th-300".into(),
                    firmware_version: "3.1.0".into(),
                    schema_id: Some(4),
                }],
            }),
            Frame::QueueReport(QueueReport {
                status: Status {
                    queued_readings: 5,
                    live_waiting: 0,
                    backlog: false,
                    in_flight: 1,
                },
                queued_bytes: 640,
                oldest_age_ms: Some(1_500),
            }),
        ]
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut buf = Vec::new();
        for f in sample() {
            encode_frame(&f, &mut buf);
        }
        let mut at = 0;
        for want in sample() {
            let (got, used) = decode_frame(&buf[at..], DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(got, want);
            at += used;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error() {
        let mut buf = Vec::new();
        encode_frame(&sample()[2], &mut buf);
        for cut in 0..buf.len() {
            match decode_frame(&buf[..cut], DEFAULT_MAX_FRAME) {
                Err(FrameError::Incomplete { needed }) => assert!(needed > 0),
                other => panic!("prefix of {cut} bytes gave {other:?}"),
            }
        }
    }

    #[test]
    fn oversize_and_wrong_version_are_refused() {
        let mut buf = Vec::new();
        encode_frame(&sample()[2], &mut buf);
        assert!(matches!(
            decode_frame(&buf, 4),
            Err(FrameError::TooLarge { limit: 4, .. })
        ));
        buf[LENGTH_PREFIX] = 9;
        assert!(matches!(
            decode_frame(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::UnsupportedVersion { found: 9, .. })
        ));
    }
}
