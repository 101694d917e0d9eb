//! CoAP ingest with coap-lite on a tokio UDP socket.
//!
//! `POST /t/{device}` and `POST /t/{device}/{metric}` take JSON (Content-Format 50), CBOR
//! (60) or a text number (0); without a Content-Format the payload is detected. A CON
//! request is answered (piggybacked on the ACK) only after its readings are committed:
//! 2.04 Changed when something was stored or deliberately dropped, 4.00 Bad Request with a
//! diagnostic when nothing could be read, 4.13 when the payload is too large, 4.15 for an
//! unsupported Content-Format, 4.04 for another path and 4.05 for another method. NON
//! requests are stored the same way and not answered.
//!
//! Retransmissions are answered from the RFC 7252 deduplication cache, keyed by peer and
//! message id and kept for EXCHANGE_LIFETIME, so a retransmitted request is never stored
//! twice: while the first copy is still being committed the copy is ignored, and after that
//! the cached response is sent again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use metrics::counter;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::intake::{Command, Completion, Message, Outcome, Source, bytes_like::Payload, now_us};
use crate::payload::{Context, Format, Reason};

/// RFC 7252 EXCHANGE_LIFETIME.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// Most exchanges remembered; the oldest are forgotten first beyond this.
const CACHE_CAP: usize = 100_000;

/// An exchange: the peer and its message id.
type ExchangeKey = (SocketAddr, u16);

/// When an exchange began, and its response once there is one.
#[derive(Debug)]
struct CacheEntry {
    at: Instant,
    response: Option<Vec<u8>>,
}

/// The deduplication cache of recent exchanges.
#[derive(Debug, Default)]
pub struct MidCache {
    entries: HashMap<ExchangeKey, CacheEntry>,
}

/// What to do with a request, according to the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// New: process it.
    New,
    /// A retransmission of one still in progress: ignore it.
    InProgress,
    /// A retransmission of one answered: send this response again.
    Answered(Vec<u8>),
}

impl MidCache {
    /// Looks up (and, if new, records) an exchange at `now`.
    pub fn check(&mut self, peer: SocketAddr, mid: u16, now: Instant) -> Seen {
        if self.entries.len() >= CACHE_CAP {
            self.entries
                .retain(|_, e| now.duration_since(e.at) < EXCHANGE_LIFETIME);
            if self.entries.len() >= CACHE_CAP {
                // Still full of live exchanges: drop the oldest tenth.
                let mut ages: Vec<Instant> = self.entries.values().map(|e| e.at).collect();
                ages.sort();
                let cut = ages[ages.len() / 10];
                self.entries.retain(|_, e| e.at > cut);
            }
        }
        match self.entries.get(&(peer, mid)) {
            Some(e) if now.duration_since(e.at) < EXCHANGE_LIFETIME => match &e.response {
                None => Seen::InProgress,
                Some(r) => Seen::Answered(r.clone()),
            },
            _ => {
                self.entries.insert(
                    (peer, mid),
                    CacheEntry {
                        at: now,
                        response: None,
                    },
                );
                Seen::New
            }
        }
    }

    /// Stores the response to an exchange.
    pub fn answer(&mut self, peer: SocketAddr, mid: u16, response: Vec<u8>) {
        if let Some(e) = self.entries.get_mut(&(peer, mid)) {
            e.response = Some(response);
        }
    }
}

/// Serves CoAP on an already bound socket until `shutdown`.
pub async fn serve(
    socket: UdpSocket,
    tx: mpsc::Sender<Command>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let socket = Arc::new(socket);
    let cache = Arc::new(Mutex::new(MidCache::default()));
    // Answers wait for their commit; they are awaited before returning, so a shutdown
    // never drops an answer (the device would resend to a fresh cache and store twice).
    let mut answers = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "CoAP receive failed");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(packet) = Packet::from_bytes(&buf[..n]) else {
            counter!("plantlink_edge_coap_malformed_total").increment(1);
            tracing::debug!(%peer, bytes = n, "CoAP: not a CoAP message; ignored");
            continue;
        };
        let confirmable = match packet.header.get_type() {
            MessageType::Confirmable => true,
            MessageType::NonConfirmable => false,
            _ => continue, // ACK and RST need no answer
        };
        let mid = packet.header.message_id;
        let seen = cache
            .lock()
            .expect("CoAP cache lock")
            .check(peer, mid, Instant::now());
        match seen {
            Seen::New => {}
            Seen::InProgress => {
                counter!("plantlink_edge_coap_duplicates_total").increment(1);
                continue;
            }
            Seen::Answered(resp) => {
                counter!("plantlink_edge_coap_duplicates_total").increment(1);
                if confirmable {
                    let _ = socket.send_to(&resp, peer).await;
                }
                continue;
            }
        }
        let exchange = Exchange {
            socket: socket.clone(),
            cache: cache.clone(),
            peer,
            mid,
            token: packet.get_token().to_vec(),
            confirmable,
        };
        if packet.header.code != MessageClass::Request(RequestType::Post) {
            exchange
                .reply(
                    ResponseType::MethodNotAllowed,
                    "use POST /t/{device}[/{metric}]",
                )
                .await;
            continue;
        }
        let path: Vec<String> = packet
            .get_option(CoapOption::UriPath)
            .map(|l| {
                l.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let (device, metric) = match path.as_slice() {
            [t, d] if t == "t" => (d.clone(), None),
            [t, d, m] if t == "t" => (d.clone(), Some(m.clone())),
            _ => {
                exchange
                    .reply(
                        ResponseType::NotFound,
                        "POST to /t/{device} or /t/{device}/{metric}",
                    )
                    .await;
                continue;
            }
        };
        let format = content_format(&packet);
        let (otx, orx) = oneshot::channel();
        let m = Message {
            source: Source::Coap,
            origin: format!("{peer} /{}", path.join("/")),
            context: Some(Context {
                device: Some(device),
                metric,
                ..Context::default()
            }),
            format,
            received_us: now_us(),
            redelivery: None,
            payload: Payload::Owned(packet.payload.clone()),
            done: Completion::Coap(otx),
        };
        if tx.send(Command::Ingest(m)).await.is_err() {
            break;
        }
        let answer = async move {
            let Ok(outcome) = orx.await else { return };
            let (code, diag) = verdict(&outcome);
            exchange.reply(code, &diag).await;
        };
        answers.spawn(answer);
        while answers.try_join_next().is_some() {}
    }
    drop(tx);
    while answers.join_next().await.is_some() {}
    Ok(())
}

/// The response code and diagnostic for a committed outcome.
pub fn verdict(o: &Outcome) -> (ResponseType, String) {
    if o.stored > 0 || o.dropped > 0 || o.redelivery {
        return (ResponseType::Changed, String::new());
    }
    match o.rejects.first() {
        None => (ResponseType::Changed, String::new()),
        Some(r) => {
            let code = match r.reason {
                Reason::Oversize => ResponseType::RequestEntityTooLarge,
                Reason::UnsupportedFormat => ResponseType::UnsupportedContentFormat,
                Reason::NotAllowed => ResponseType::Forbidden,
                Reason::DeviceCap | Reason::SeriesCap => ResponseType::ServiceUnavailable,
                _ => ResponseType::BadRequest,
            };
            (code, format!("{}: {}", r.reason.as_str(), r.detail))
        }
    }
}

/// The request's Content-Format; one this agent does not read is refused by the decoder
/// (4.15, a dead letter and a counter).
fn content_format(p: &Packet) -> Format {
    let Some(raw) = p
        .get_option(CoapOption::ContentFormat)
        .and_then(|l| l.front())
    else {
        return Format::Auto;
    };
    match raw.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) {
        0 => Format::Text,
        50 => Format::Json,
        60 => Format::Cbor,
        other => Format::Unsupported(other),
    }
}

/// One request being answered.
struct Exchange {
    socket: Arc<UdpSocket>,
    cache: Arc<Mutex<MidCache>>,
    peer: SocketAddr,
    mid: u16,
    token: Vec<u8>,
    confirmable: bool,
}

impl Exchange {
    /// Caches the response for retransmissions and, for a CON request, sends it.
    async fn reply(self, code: ResponseType, diag: &str) {
        let mut p = Packet::new();
        p.header.set_type(if self.confirmable {
            MessageType::Acknowledgement
        } else {
            MessageType::NonConfirmable
        });
        p.header.message_id = self.mid;
        p.header.code = MessageClass::Response(code);
        p.set_token(self.token);
        // coap-lite caps a datagram at 1280 bytes: keep the diagnostic short.
        let mut end = diag.len().min(200);
        while !diag.is_char_boundary(end) {
            end -= 1;
        }
        p.payload = diag.as_bytes()[..end].to_vec();
        let bytes = p.to_bytes().unwrap_or_default();
        self.cache
            .lock()
            .expect("CoAP cache lock")
            .answer(self.peer, self.mid, bytes.clone());
        if self.confirmable {
            let _ = self.socket.send_to(&bytes, self.peer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_answers_retransmissions() {
        let mut c = MidCache::default();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(c.check(peer, 1, t0), Seen::New);
        assert_eq!(c.check(peer, 1, t0), Seen::InProgress);
        c.answer(peer, 1, vec![9]);
        assert_eq!(
            c.check(peer, 1, t0 + Duration::from_secs(10)),
            Seen::Answered(vec![9])
        );
        // Another peer with the same id is another exchange.
        assert_eq!(c.check("127.0.0.1:5001".parse().unwrap(), 1, t0), Seen::New);
        // After EXCHANGE_LIFETIME the id may be reused.
        assert_eq!(c.check(peer, 1, t0 + EXCHANGE_LIFETIME), Seen::New);
    }

    #[test]
    fn verdicts() {
        let ok = Outcome {
            stored: 1,
            ..Outcome::default()
        };
        assert_eq!(verdict(&ok).0, ResponseType::Changed);
        let bad = Outcome {
            rejects: vec![crate::payload::Reject {
                reason: Reason::Malformed,
                detail: "x".into(),
            }],
            ..Outcome::default()
        };
        assert_eq!(verdict(&bad).0, ResponseType::BadRequest);
        assert!(verdict(&bad).1.contains("malformed"));
        let big = Outcome {
            rejects: vec![crate::payload::Reject {
                reason: Reason::Oversize,
                detail: "x".into(),
            }],
            ..Outcome::default()
        };
        assert_eq!(verdict(&big).0, ResponseType::RequestEntityTooLarge);
    }
}
