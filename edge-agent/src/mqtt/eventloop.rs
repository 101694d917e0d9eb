//! The thin I/O loop around [`super::state::State`]: dials the broker, moves bytes between
//! the socket and the state, hands messages to the writer as it takes them, and brings the
//! writer's acks back. Generic over the stream, so tests run it over an in-memory pipe.

use std::time::Duration;

use bytes::BytesMut;
use metrics::{counter, gauge};
use rumqttc::Packet;
use rumqttc::mqttbytes::Error as CodecError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};

use super::state::State;
use crate::config::{Mqtt, parse_mqtt_url};
use crate::intake::{Ack, Command};

/// How a connection ended.
#[derive(Debug)]
pub(super) enum End {
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
    let mut state = State::new(&cfg, max_payload, ack_tx, confirmed, Instant::now());
    let mut tx = Some(tx);
    let mut backoff = Duration::from_millis(200);
    let mut connected_before = false;
    loop {
        let connected = tokio::select! {
            c = dial(&mut state, &host, port) => c,
            _ = shutdown.changed() => break,
        };
        let end = match connected {
            Ok((stream, session_present, inbuf)) => {
                gauge!("plantlink_edge_mqtt_connected").set(1.0);
                tracing::info!(url = %cfg.url, session_present, "MQTT connected");
                if connected_before && !session_present {
                    counter!("plantlink_edge_mqtt_sessions_lost_total").increment(1);
                    tracing::warn!(url = %cfg.url,
                        "the broker forgot this agent's session: what was published while the agent \
                         was away may be lost at the broker; enable persistence in mosquitto.conf");
                }
                connected_before = true;
                backoff = Duration::from_millis(200);
                serve(
                    &mut state,
                    stream,
                    inbuf,
                    &mut tx,
                    &mut ack_rx,
                    &mut publish,
                    &mut shutdown,
                )
                .await
            }
            Err(e) => End::Lost(e),
        };
        gauge!("plantlink_edge_mqtt_connected").set(0.0);
        match end {
            End::Done => return Ok(()),
            End::Lost(e) => {
                if tx.is_none() {
                    break; // shutting down; unacked messages are redelivered next time
                }
                counter!("plantlink_edge_mqtt_reconnects_total").increment(1);
                tracing::warn!(url = %cfg.url, error = %e, retry_in = ?backoff,
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

/// Dials the broker and runs [`handshake`] on the connection.
async fn dial(
    state: &mut State,
    host: &str,
    port: u16,
) -> Result<(TcpStream, bool, BytesMut), String> {
    let mut stream = timeout(Duration::from_secs(10), TcpStream::connect((host, port)))
        .await
        .map_err(|_| "connect timed out after 10 s".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let (present, inbuf) = handshake(state, &mut stream).await?;
    Ok((stream, present, inbuf))
}

/// CONNECT, CONNACK and SUBSCRIBE on a fresh connection; returns whether the session was
/// present, and whatever the broker already sent after its CONNACK (queued messages follow
/// at once).
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    state: &mut State,
    stream: &mut S,
) -> Result<(bool, BytesMut), String> {
    state.connect()?;
    send(state, stream, "sending CONNECT").await?;
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let max_packet = state.max_packet;
    let connack = timeout(Duration::from_secs(10), async {
        loop {
            match Packet::read(&mut inbuf, max_packet) {
                Ok(p) => return Ok(p),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("reading CONNACK: {e}")),
            }
            if stream
                .read_buf(&mut inbuf)
                .await
                .map_err(|e| format!("reading CONNACK: {e}"))?
                == 0
            {
                return Err("broker closed the connection before CONNACK".to_owned());
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK within 10 s".to_owned())??;
    let present = state.connack(connack, Instant::now())?;
    send(state, stream, "sending SUBSCRIBE").await?;
    Ok((present, inbuf))
}

/// Writes what the state has to send.
async fn send<S: AsyncWrite + Unpin>(
    state: &mut State,
    stream: &mut S,
    what: &str,
) -> Result<(), String> {
    if let Some(out) = state.take_out(Instant::now()) {
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

/// Serves one connection until it is lost or, once draining, every ack is out. `tx` (the
/// writer's intake) turns `None` when shutdown begins.
pub(super) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    state: &mut State,
    mut stream: S,
    mut inbuf: BytesMut,
    tx: &mut Option<mpsc::Sender<Command>>,
    acks: &mut mpsc::UnboundedReceiver<Ack>,
    publish: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    if let Err(e) = state.received(&mut inbuf, Instant::now()) {
        return End::Lost(e);
    }
    if let Err(e) = send(state, &mut stream, "sending PINGREQ").await {
        return End::Lost(e);
    }
    let mut ping = tokio::time::interval(state.keep_alive / 2);
    loop {
        let writer = tx.clone();
        let what = tokio::select! {
            biased;
            changed = shutdown.changed(), if tx.is_some() => {
                if changed.is_err() || *shutdown.borrow() {
                    tracing::info!("MQTT: stopping intake; acknowledging what was committed");
                    *tx = None;
                    state.drain();
                }
                "sending"
            }
            permit = async { writer.as_ref().expect("intake open").reserve().await },
                if writer.is_some() && state.has_pending() =>
            {
                let Ok(permit) = permit else {
                    return End::Lost("the queue writer stopped".into());
                };
                if let Some(m) = state.next_message() {
                    permit.send(Command::Ingest(m));
                }
                "sending"
            }
            first = acks.recv() => {
                let Some(first) = first else {
                    // Draining and the writer is done: every ack is out.
                    state.disconnect();
                    let _ = send(state, &mut stream, "sending DISCONNECT").await;
                    let _ = stream.shutdown().await;
                    return End::Done;
                };
                let mut next = Some(first);
                while let Some(ack) = next.take().or_else(|| acks.try_recv().ok()) {
                    if !state.acked(ack) {
                        break;
                    }
                }
                state.acks_written();
                "sending PUBACKs"
            }
            read = stream.read_buf(&mut inbuf), if !state.has_pending() => {
                match read {
                    Ok(0) => return End::Lost("broker closed the connection".into()),
                    Err(e) => return End::Lost(format!("reading: {e}")),
                    Ok(_) => {}
                }
                if let Err(e) = state.received(&mut inbuf, Instant::now()) {
                    return End::Lost(e);
                }
                "sending PINGREQ"
            }
            Some((topic, payload)) = publish.recv() => {
                state.publish(topic, payload);
                "sending PUBLISH"
            }
            _ = ping.tick() => {
                if let Err(e) = state.tick(Instant::now()) {
                    return End::Lost(e);
                }
                "sending PINGREQ"
            }
        };
        if let Err(e) = send(state, &mut stream, what).await {
            return End::Lost(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::Completion;
    use rumqttc::{
        ConnAck, ConnectReturnCode, PingResp, Publish, QoS, SubAck, SubscribeReasonCode,
    };
    use tokio::io::DuplexStream;

    /// The broker's side: the next packet the agent sent.
    async fn next_packet(io: &mut DuplexStream, buf: &mut BytesMut) -> Packet {
        loop {
            match Packet::read(buf, 1 << 20) {
                Ok(p) => return p,
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => panic!("the agent sent a malformed packet: {e}"),
            }
            assert!(
                io.read_buf(buf).await.unwrap() > 0,
                "the agent closed the pipe"
            );
        }
    }

    // The session over an in-memory pipe, on paused time: the clock only moves when every
    // task waits, straight to the next timer.
    #[tokio::test(start_paused = true)]
    async fn over_a_pipe_acks_follow_commits_and_a_deaf_broker_is_left() {
        let cfg: Mqtt = toml::from_str(
            "url = \"mqtt://127.0.0.1:1883\"\nclient_id = \"pipe\"\n\
             subscriptions = [\"plant/#\"]\nkeep_alive_secs = 10\n",
        )
        .unwrap();
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let (confirmed_tx, mut confirmed) = mpsc::unbounded_channel();
        let mut state = State::new(&cfg, 1 << 16, ack_tx, confirmed_tx, Instant::now());
        let (mut agent_io, mut broker) = tokio::io::duplex(1 << 16);
        let (wtx, mut writer) = mpsc::channel(16);
        let (_publish_tx, mut publish) = mpsc::unbounded_channel();
        let (_shutdown_tx, mut shutdown) = watch::channel(false);
        let agent = tokio::spawn(async move {
            let (present, inbuf) = handshake(&mut state, &mut agent_io).await?;
            let mut tx = Some(wtx);
            let end = serve(
                &mut state,
                agent_io,
                inbuf,
                &mut tx,
                &mut acks,
                &mut publish,
                &mut shutdown,
            )
            .await;
            Ok::<_, String>((present, end))
        });

        let mut buf = BytesMut::new();
        assert!(matches!(
            next_packet(&mut broker, &mut buf).await,
            Packet::Connect(..)
        ));
        let mut out = BytesMut::new();
        ConnAck::new(ConnectReturnCode::Success, true)
            .write(&mut out)
            .unwrap();
        broker.write_all(&out).await.unwrap();
        let Packet::Subscribe(sub) = next_packet(&mut broker, &mut buf).await else {
            panic!("no SUBSCRIBE after the CONNACK");
        };
        out.clear();
        SubAck::new(
            sub.pkid,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        )
        .write(&mut out)
        .unwrap();
        for pkid in [1u16, 2] {
            let mut p = Publish::new("plant/a", QoS::AtLeastOnce, b"1".to_vec());
            p.pkid = pkid;
            p.write(&mut out).unwrap();
        }
        broker.write_all(&out).await.unwrap();

        // The writer gets both; the broker hears nothing until it commits them.
        let mut handles = Vec::new();
        for want in [1u16, 2] {
            let Some(Command::Ingest(m)) = writer.recv().await else {
                panic!("the writer got no message");
            };
            assert_eq!(m.redelivery, Some((want, false)));
            let Completion::Mqtt(h) = m.done else {
                panic!("a QoS 1 message without its PUBACK handle");
            };
            handles.push((want, h));
        }
        for (pkid, h) in handles {
            h.ack(Some(i64::from(pkid) * 10));
        }
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(next_packet(&mut broker, &mut buf).await);
        }
        assert!(
            matches!(got.as_slice(),
                [Packet::PubAck(a), Packet::PubAck(b), Packet::PingReq] if a.pkid == 1 && b.pkid == 2),
            "{got:?}"
        );
        out.clear();
        PingResp.write(&mut out).unwrap();
        broker.write_all(&out).await.unwrap();
        assert_eq!(confirmed.recv().await.unwrap(), vec![10, 20]);

        // Then the broker falls silent: a PINGREQ once nothing went out for half the
        // keep-alive, and the connection is given up once nothing came for one and a half.
        let start = Instant::now();
        assert!(matches!(
            next_packet(&mut broker, &mut buf).await,
            Packet::PingReq
        ));
        assert!(
            start.elapsed() >= Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let (present, end) = agent.await.unwrap().unwrap();
        assert!(present);
        let End::Lost(e) = end else {
            panic!("{end:?}");
        };
        assert!(e.contains("no answer from the broker"), "{e}");
        assert!(
            start.elapsed() >= Duration::from_secs(15),
            "{:?}",
            start.elapsed()
        );
    }
}
