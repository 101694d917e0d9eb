//! `firmware-sim publish`: publishes lines as MQTT messages and returns only once the broker
//! has acknowledged every one, so a benchmark or test knows exactly what the broker holds.
//! (`mosquitto_pub -l` can exit with QoS 1 messages still unsent.)

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// What was published.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Messages the broker acknowledged (or, at QoS 0, sent).
    pub messages: usize,
    /// Wall time.
    pub elapsed: Duration,
}

/// Publishes each of `lines` to `topic` at `qos` on the broker at `host:port`.
pub async fn publish(
    host: &str,
    port: u16,
    topic: &str,
    qos: u8,
    lines: Vec<String>,
) -> anyhow::Result<Published> {
    let qos = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => bail!("--qos {q}: use 0, 1 or 2"),
    };
    let mut o = MqttOptions::new(
        format!("firmware-sim-pub-{}", std::process::id()),
        host,
        port,
    );
    o.set_inflight(1000).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 1000);
    let n = lines.len();
    let topic = topic.to_owned();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for line in lines {
            client
                .publish(topic.as_str(), qos, false, line.into_bytes())
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut done = 0;
    while done < n {
        match el.poll().await.context("MQTT connection to the broker")? {
            Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) if qos != QoS::AtMostOnce => {
                done += 1
            }
            Event::Outgoing(Outgoing::Publish(_)) if qos == QoS::AtMostOnce => done += 1,
            _ => {}
        }
    }
    let client = sender.await??;
    client.disconnect().await.ok();
    while let Ok(ev) = el.poll().await {
        if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(Published {
        messages: done,
        elapsed: start.elapsed(),
    })
}
