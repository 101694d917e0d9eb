//! MQTT ingest from the plant's broker with rumqttc.
//!
//! The session is persistent (clean session off) and subscriptions are QoS 1 with manual
//! acknowledgement: a PUBACK goes out only after the writer has committed the message's
//! readings (or its dead letter). If the agent dies in between, the broker redelivers the
//! message with DUP set, and the writer recognises it by packet id and content.
//!
//! rumqttc reconnects on the next poll after an error; this task waits with exponential
//! backoff (capped at 30 s) in between, and resets it on every successful connection.

use std::time::Duration;

use metrics::{counter, gauge};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};

use crate::config::{Mqtt, parse_mqtt_url};
use crate::ingest::{Completion, Message, Source, bytes_like::Payload, now_us};
use crate::payload::Format;

/// Runs until `shutdown` turns true, then drains: every message already handed to the
/// writer is acknowledged before the clean disconnect. Messages arriving after that are left
/// unacknowledged for the broker to redeliver.
pub async fn run(
    cfg: Mqtt,
    max_payload: usize,
    tx: mpsc::Sender<Message>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (host, port) = parse_mqtt_url(&cfg.url).map_err(anyhow::Error::msg)?;
    let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(cfg.inflight)
        // Larger packets than this would kill the connection and be redelivered forever, so
        // accept generously and let the decoder turn oversize payloads into dead letters.
        .set_max_packet_size(max_payload.max(1 << 20) * 2, 1 << 20)
        .set_request_channel_capacity(cfg.inflight as usize * 2 + 16);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, cfg.inflight as usize * 2 + 16);
    let filters: Vec<SubscribeFilter> = cfg
        .subscriptions
        .iter()
        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
        .collect();

    // Acks come back from the writer thread; a task forwards them into rumqttc while the
    // loop below keeps polling the connection.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
    let acker = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(p) = ack_rx.recv().await {
                if client.ack(&p).await.is_err() {
                    break;
                }
            }
        })
    };

    let mut backoff = Duration::from_millis(200);
    let mut draining = false;
    let mut tx = Some(tx);
    let mut ack_tx = Some(ack_tx);
    let mut acker = Some(acker);
    let mut disconnect_sent = false;
    loop {
        tokio::select! {
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    draining = true;
                    tx = None; // lets the writer finish once it has committed the rest
                    ack_tx = None;
                    tracing::info!("MQTT: stopping intake; acknowledging what was committed");
                }
            }
            // Once the writer is done and every ack is queued, disconnect cleanly.
            _ = async { acker.as_mut().expect("acker present").await }, if draining && acker.is_some() => {
                acker = None;
                let _ = client.disconnect().await;
                disconnect_sent = true;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    gauge!("plantlink_edge_mqtt_connected").set(1.0);
                    backoff = Duration::from_millis(200);
                    tracing::info!(url = %cfg.url, session_present = ack.session_present, "MQTT connected");
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %e, "MQTT subscribe could not be queued");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if draining {
                        continue; // unacknowledged: the broker redelivers it next session
                    }
                    let (Some(tx), Some(ack_tx)) = (&tx, &ack_tx) else { continue };
                    let m = Message {
                        source: Source::Mqtt,
                        origin: p.topic.clone(),
                        context: None,
                        format: Format::Auto,
                        received_us: now_us(),
                        redelivery: (p.qos != QoS::AtMostOnce).then_some((p.pkid, p.dup)),
                        payload: Payload::Shared(p.clone()),
                        done: if p.qos == QoS::AtMostOnce {
                            Completion::None
                        } else {
                            Completion::Mqtt(Box::new(p), ack_tx.clone())
                        },
                    };
                    if tx.send(m).await.is_err() {
                        tracing::error!("the queue writer stopped; MQTT intake stops");
                        break;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if disconnect_sent => break,
                Ok(_) => {}
                Err(e) => {
                    gauge!("plantlink_edge_mqtt_connected").set(0.0);
                    if disconnect_sent {
                        break;
                    }
                    counter!("plantlink_edge_mqtt_reconnects_total").increment(1);
                    tracing::warn!(url = %cfg.url, error = %e, retry_in = ?backoff, "MQTT connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed(), if !draining => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    if draining && acker.is_none() {
                        break;
                    }
                }
            }
        }
    }
    gauge!("plantlink_edge_mqtt_connected").set(0.0);
    Ok(())
}
