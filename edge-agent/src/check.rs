//! What `edge-agent check-config` prints: what a valid config sets up, and which device,
//! metric and tags an MQTT topic becomes under its `[[mqtt.topics]]`.
//!
//! Everything here renders to a `String`, so the output is tested without running the
//! program.

use std::fmt::Write;
use std::path::Path;

use crate::config::Config;
use crate::payload::{Context, Decoder, name_problem};

/// The summary of a valid config.
pub fn summary(path: &Path, c: &Config) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "config {} is valid", path.display());
    let _ = writeln!(
        o,
        "  gateway    {} (tenant {})",
        c.gateway.id, c.gateway.tenant
    );
    let _ = writeln!(
        o,
        "  queue      {} (max {} bytes, synchronous {:?})",
        c.store.path.display(),
        c.store.max_bytes.0,
        c.store.synchronous
    );
    let _ = match &c.mqtt {
        Some(m) => writeln!(
            o,
            "  mqtt       {} as {}, {} subscription(s), {} template(s)",
            m.url,
            m.client_id,
            m.subscriptions.len(),
            m.topics.len()
        ),
        None => writeln!(o, "  mqtt       off"),
    };
    if let Some(sp) = c.mqtt.as_ref().and_then(|m| m.sparkplug.as_ref()) {
        let _ = writeln!(
            o,
            "  sparkplug  groups {} (node id {}, device id {}, rebirth requests {})",
            sp.groups.join(", "),
            sp.node,
            sp.device,
            if sp.rebirth { "on" } else { "off" }
        );
    }
    let _ = match &c.coap {
        Some(co) => writeln!(o, "  coap       {}", co.bind),
        None => writeln!(o, "  coap       off"),
    };
    let _ = writeln!(
        o,
        "  limits     {}/s per device, burst {}, payloads up to {} bytes",
        c.limits.per_device_per_sec, c.limits.burst, c.limits.max_payload_bytes
    );
    let _ = writeln!(o, "  dedupe     {} s window", c.dedupe.window_secs);
    let _ = match &c.metrics {
        Some(m) => writeln!(o, "  metrics    http://{}/metrics", m.bind),
        None => writeln!(o, "  metrics    off"),
    };
    let _ = writeln!(
        o,
        "  firmware   {} mapping(s), {} known device(s)",
        c.firmware.len(),
        c.devices.known.len()
    );
    let _ = writeln!(o, "  schemas    {}", schema_line(c));
    let _ = writeln!(
        o,
        "  devices    {}, at most {} tracked at once",
        if c.devices.allow.is_empty() {
            "any id".to_owned()
        } else {
            format!("only {}", c.devices.allow.join(", "))
        },
        c.devices.max
    );
    o
}

/// The schema set the queue holds (pushed from the cloud's registry), and which of its
/// device types `[[firmware]]` shadows.
fn schema_line(c: &Config) -> String {
    if !c.store.path.exists() {
        return "none yet (the queue file does not exist; the cloud sends its set on connect)"
            .to_owned();
    }
    let set = crate::store::open_read_only(&c.store.path)
        .map_err(|e| e.to_string())
        .and_then(|conn| crate::store::schema_set(&conn).map_err(|e| e.to_string()));
    match set {
        Err(e) => format!("unreadable ({e})"),
        Ok(None) => "none received from the registry yet".to_owned(),
        Ok(Some((version, entries))) => {
            let registry = crate::schemas::Registry::compile(version, entries);
            let mut line = format!(
                "registry set version {version}: {} schema(s)",
                registry.entries.len()
            );
            let refused = registry.refused();
            if !refused.is_empty() {
                let _ = write!(line, ", {} refused", refused.len());
                for (label, why) in refused {
                    let _ = write!(line, "\n             refused {label}: {why}");
                }
            }
            let mut shadowed: Vec<&str> = registry
                .entries
                .iter()
                .map(|a| a.entry.device_type.as_str())
                .filter(|t| c.firmware.iter().any(|f| f.device_type == *t))
                .collect();
            shadowed.dedup();
            if !shadowed.is_empty() {
                let _ = write!(
                    line,
                    "\n             [[firmware]] wins for {}",
                    shadowed.join(", ")
                );
            }
            line
        }
    }
}

/// For each topic template, a topic made from the template itself (each capture replaced
/// by its name and `1`) and the reading it becomes. Empty without `[mqtt]`.
pub fn examples(c: &Config) -> String {
    let mut o = String::new();
    let templates = c.templates();
    if templates.is_empty() {
        return o;
    }
    let decoder = Decoder::new(c);
    let _ = writeln!(
        o,
        "mqtt.topics (tried in order, the first match wins; try a topic with --topic TOPIC)"
    );
    for (i, t) in templates.iter().enumerate() {
        let _ = write!(o, "  [{i}] template {:?}", t.as_str());
        if let Some(f) = t.device_format() {
            let _ = write!(o, ", device {:?}", f.as_str());
        }
        let example = t.example();
        let _ = writeln!(o, "\n      e.g. {example}");
        match decoder.topic_match(&example) {
            Some((j, ctx)) => {
                if j != i {
                    let _ = writeln!(
                        o,
                        "        matched first by mqtt.topics[{j}] {:?}, so this one never sees it",
                        templates[j].as_str()
                    );
                }
                let _ = writeln!(o, "        -> {}", describe(&ctx));
            }
            None => {
                let _ = writeln!(o, "        -> matches no template");
            }
        }
    }
    o
}

/// What each of `topics` becomes, and how many match no template.
pub fn explain(c: &Config, topics: &[String]) -> (String, usize) {
    let mut o = String::new();
    let mut unmatched = 0;
    let templates = c.templates();
    let decoder = Decoder::new(c);
    for topic in topics {
        let _ = writeln!(o, "topic {topic}");
        match decoder.topic_match(topic) {
            Some((i, ctx)) => {
                let _ = writeln!(
                    o,
                    "  matches mqtt.topics[{i}] {:?}\n  -> {}",
                    templates[i].as_str(),
                    describe(&ctx)
                );
            }
            None => {
                unmatched += 1;
                let why = if c.mqtt.is_none() {
                    "[mqtt] is off, so no topic is read"
                } else {
                    "its messages would become dead letters (no_template)"
                };
                let _ = writeln!(o, "  matches no [[mqtt.topics]] template: {why}");
            }
        }
    }
    (o, unmatched)
}

/// One line: the device, metric, tags and firmware hints a topic gives.
fn describe(ctx: &Context) -> String {
    let device = match &ctx.device {
        Some(d) => match name_problem("device", d) {
            Some(problem) => format!("device {d:?} (refused: {problem})"),
            None => format!("device {d:?}"),
        },
        None => "device from the payload (sensor_id, device_id or device)".to_owned(),
    };
    let metric = match &ctx.metric {
        Some(m) => match name_problem("metric", m) {
            Some(problem) => format!("metric {m:?} (refused: {problem})"),
            None => format!("metric {m:?}"),
        },
        None => "metrics from the payload".to_owned(),
    };
    let tags = if ctx.tags.is_empty() {
        "no tags".to_owned()
    } else {
        let t: Vec<String> = ctx.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("tags {}", t.join(", "))
    };
    let mut line = format!("{device}, {metric}, {tags}");
    if let Some(t) = &ctx.device_type {
        let _ = write!(line, ", device type {t}");
    }
    if let Some(f) = &ctx.firmware {
        let _ = write!(line, ", firmware {f}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!(
                r#"
[gateway]
id = "gw"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "c"
subscriptions = ["plant/#"]
[[mqtt.topics]]
template = "plant/{{site}}/{{line}}/{{device}}/{{metric}}"
device = "{{line}}-{{device}}"
[[mqtt.topics]]
template = "plant/{{site}}/{{line}}/{{device}}"
{extra}
"#
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn a_topic_shows_its_template_device_metric_and_tags() {
        let c = config("");
        let topics = [
            "plant/p1/l3/press01/temperature".to_owned(),
            "plant/p1/l4/press01".to_owned(),
            "other/x".to_owned(),
        ];
        let (text, unmatched) = explain(&c, &topics);
        assert_eq!(unmatched, 1, "{text}");
        assert!(
            text.contains(
                "topic plant/p1/l3/press01/temperature\n  matches mqtt.topics[0] \
                 \"plant/{site}/{line}/{device}/{metric}\"\n  -> device \"l3-press01\", \
                 metric \"temperature\", tags line=l3, site=p1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("-> device \"press01\", metrics from the payload, tags line=l4"),
            "{text}"
        );
        assert!(
            text.contains("topic other/x\n  matches no [[mqtt.topics]] template"),
            "{text}"
        );
    }

    #[test]
    fn every_template_gets_an_example_and_its_device() {
        let c = config("[[mqtt.topics]]\ntemplate = \"plant/{a}/{b}/{c}\"");
        let text = examples(&c);
        assert!(
            text.contains(
                "[0] template \"plant/{site}/{line}/{device}/{metric}\", device \
                 \"{line}-{device}\"\n      e.g. plant/site1/line1/device1/metric1\n        \
                 -> device \"line1-device1\", metric \"metric1\", tags line=line1, site=site1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("e.g. plant/site1/line1/device1\n        -> device \"device1\""),
            "{text}"
        );
        // A template an earlier one always beats says so.
        assert!(
            text.contains("e.g. plant/a1/b1/c1\n        matched first by mqtt.topics[1]"),
            "{text}"
        );
    }

    #[test]
    fn composed_ids_over_the_limit_are_shown_refused() {
        let c = config("");
        let long = format!("plant/p1/l3/{}/t", "d".repeat(130));
        let (text, _) = explain(&c, &[long]);
        assert!(text.contains("(refused: device name"), "{text}");
    }
}
