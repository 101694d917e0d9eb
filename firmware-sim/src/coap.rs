//! The CoAP side of `firmware-sim run` (coap-lite on a tokio UDP socket): `POST
//! /t/<device>[/<metric>]` with the message's Content-Format, confirmable (retransmitted
//! with exponential back-off until acknowledged, as RFC 7252 says) or not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::fleet::Message;

/// A message handed to CoAP, with what the caller needs back.
#[derive(Debug)]
pub struct Job<T> {
    /// The message.
    pub message: Message,
    /// Returned with the outcome.
    pub tag: T,
}

/// What became of a message: acknowledged (NON: sent), or why not.
#[derive(Debug)]
pub enum Done<T> {
    /// Acknowledged with a 2.xx, or refused with a 4.xx when `refusal_expected`.
    Acked(T),
    /// Refused or never answered.
    Failed(T, String),
}

const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;

struct Outstanding<T> {
    bytes: Vec<u8>,
    tag: T,
    refusal_expected: bool,
    attempts: u32,
    next: Instant,
}

/// `coap://host:port` to an address.
pub fn address(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("coap://")
        .ok_or_else(|| anyhow::anyhow!("--coap {url:?}: write coap://host:port"))?;
    let rest = if rest.contains(':') {
        rest.to_owned()
    } else {
        format!("{rest}:5683")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&rest)
        .map_err(|e| anyhow::anyhow!("--coap {url:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--coap {url:?} resolves to nothing"))
}

fn packet(kind: MessageType, mid: u16, m: &Message) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.message_id = mid;
    p.header.code = MessageClass::Request(RequestType::Post);
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in m.coap_path() {
        p.add_option(CoapOption::UriPath, seg.into_bytes());
    }
    let cf = match m.content_format {
        0 => vec![],
        f if f < 256 => vec![f as u8],
        f => f.to_be_bytes().to_vec(),
    };
    p.add_option(CoapOption::ContentFormat, cf);
    p.payload = m.payload.clone();
    p.to_bytes().unwrap_or_default()
}

/// Starts the sender; feed it jobs, read outcomes. `refusal_expected(tag)` says whether a
/// 4.xx answer is what the caller planted.
pub async fn start<T: Send + 'static>(
    to: SocketAddr,
    confirmable: bool,
    refusal_expected: fn(&T) -> bool,
) -> anyhow::Result<(mpsc::Sender<Job<T>>, mpsc::Receiver<Done<T>>)> {
    let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).await?;
    sock.connect(to).await?;
    let (jobs_tx, mut jobs) = mpsc::channel::<Job<T>>(10_000);
    let (done_tx, done) = mpsc::channel(10_000);
    tokio::spawn(async move {
        let mut mid: u16 = 1;
        let mut out: HashMap<u16, Outstanding<T>> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut open = true;
        while open || !out.is_empty() {
            tokio::select! {
                job = jobs.recv(), if open && out.len() < 1000 => {
                    let Some(job) = job else { open = false; continue };
                    mid = mid.wrapping_add(1).max(1);
                    let kind = if confirmable { MessageType::Confirmable } else { MessageType::NonConfirmable };
                    let bytes = packet(kind, mid, &job.message);
                    let sent = sock.send(&bytes).await;
                    if !confirmable {
                        let d = match sent {
                            Ok(_) => Done::Acked(job.tag),
                            Err(e) => Done::Failed(job.tag, e.to_string()),
                        };
                        if done_tx.send(d).await.is_err() { return; }
                        continue;
                    }
                    let expected = refusal_expected(&job.tag);
                    out.insert(mid, Outstanding { bytes, tag: job.tag, refusal_expected: expected, attempts: 0, next: Instant::now() + ACK_TIMEOUT });
                }
                r = sock.recv(&mut buf) => {
                    let Ok(n) = r else { continue };
                    let Ok(p) = Packet::from_bytes(&buf[..n]) else { continue };
                    if p.header.get_type() != MessageType::Acknowledgement { continue; }
                    let Some(o) = out.remove(&p.header.message_id) else { continue };
                    let d = match p.header.code {
                        MessageClass::Response(ResponseType::Changed | ResponseType::Created | ResponseType::Content) => Done::Acked(o.tag),
                        MessageClass::Response(r) if o.refusal_expected && !matches!(r, ResponseType::InternalServerError | ResponseType::ServiceUnavailable) => Done::Acked(o.tag),
                        code => Done::Failed(o.tag, format!("answered {code:?}")),
                    };
                    if done_tx.send(d).await.is_err() { return; }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let due: Vec<u16> = out.iter().filter(|(_, o)| o.next <= now).map(|(m, _)| *m).collect();
                    for m in due {
                        let Some(o) = out.get_mut(&m) else { continue };
                        if o.attempts >= MAX_RETRANSMIT {
                            if let Some(o) = out.remove(&m)
                                && done_tx.send(Done::Failed(o.tag, "no answer after 4 retransmissions".into())).await.is_err()
                            {
                                return;
                            }
                            continue;
                        }
                        o.attempts += 1;
                        o.next = now + ACK_TIMEOUT * 2u32.pow(o.attempts);
                        let _ = sock.send(&o.bytes).await;
                    }
                }
            }
        }
    });
    Ok((jobs_tx, done))
}
