//! The built binary answers --help and --version, and `check-config --topic` shows which
//! device a topic becomes.
#![allow(clippy::unwrap_used)] // tests may panic

#[path = "../../tests/lib/help_readme.rs"]
mod help_readme;

use std::process::Command;

#[test]
fn help_and_version() {
    let bin = env!("CARGO_BIN_EXE_edge-agent");
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run edge-agent");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Plantlink"), "{text}");
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run edge-agent");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_shows_the_device_a_topic_becomes() {
    let dir = std::env::temp_dir().join(format!("plantlink-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        r#"
[gateway]
id = "gw"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "c"
subscriptions = ["plant/#"]
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}/{metric}"
device = "{line}-{device}"
"#,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("check-config")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .expect("run edge-agent");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.success(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, text, _) = run(&[]);
    assert!(ok, "{text}");
    assert!(text.contains("is valid"), "{text}");
    assert!(
        text.contains(
            "e.g. plant/site1/line1/device1/metric1\n        -> device \"line1-device1\""
        ),
        "{text}"
    );

    let (ok, text, _) = run(&[
        "--topic",
        "plant/p1/l3/press01/temperature",
        "--topic",
        "plant/p1/l4/press01/temperature",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("-> device \"l3-press01\", metric \"temperature\", tags line=l3, site=p1"),
        "{text}"
    );
    assert!(text.contains("-> device \"l4-press01\""), "{text}");

    let (ok, text, err) = run(&["--topic", "elsewhere/press01"]);
    assert!(!ok, "a topic that matches nothing fails the check: {text}");
    assert!(
        text.contains("matches no [[mqtt.topics]] template"),
        "{text}"
    );
    assert!(err.contains("1 of 1 topic(s) match no"), "{err}");

    // A bad format fails at load, naming the key, the value and the fix.
    let bad = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("{line}-{device}", "{line}-{dev}");
    std::fs::write(&cfg, bad).unwrap();
    let (ok, _, err) = run(&[]);
    assert!(!ok);
    assert!(
        err.contains("mqtt.topics[0].device: \"{line}-{dev}\": {dev} is not a capture"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_dead_letters_marks_what_can_be_replayed_and_names_bad_reasons() {
    let dir = std::env::temp_dir().join(format!("plantlink-cli-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"gw\"\n[store]\npath = \"{}\"\n",
            dir.join("queue.db").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("queue")
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run edge-agent");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["replay-dead-letters", "--reason", "no_schema"]);
    assert!(!ok && err.contains("does not exist yet"), "{err}");
    {
        let config = edge_agent::config::Config::load(&cfg).unwrap();
        let mut store =
            edge_agent::store::Store::open(edge_agent::store::Options::from_config(&config))
                .unwrap();
        store.begin(1).unwrap();
        for (source, origin) in [
            ("mqtt", "plant/a"),
            ("mqtt", "plant/b"),
            ("coap", "[::1]:5 /c"),
        ] {
            store
                .dead_letter(1, source, origin, "no_schema", "no schema", b"\x0a\x01", 2)
                .unwrap();
        }
        store
            .dead_letter(
                1,
                "mqtt",
                "plant/big",
                "no_schema",
                "no schema",
                b"\x0a",
                9000,
            )
            .unwrap();
        store.commit().unwrap();
    }
    let (ok, _, err) = run(&["replay-dead-letters", "--reason", "no-schema"]);
    assert!(
        !ok && err.contains("no_schema, unknown_alias, seq_gap"),
        "{err}"
    );
    let (ok, out, err) = run(&["replay-dead-letters", "--reason", "no_schema"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("2 dead letter(s) of reason no_schema marked"),
        "{out}"
    );
    assert!(out.contains("2 cannot be replayed"), "{out}");
    let (ok, out, _) = run(&["stats"]);
    assert!(ok);
    assert!(out.contains("replaying   2 dead letters pending"), "{out}");
    assert!(out.contains("schema set  none received yet"), "{out}");
    let (_, json, _) = run(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (
            v["replay_pending"].as_u64(),
            v["schema_set_version"].as_u64()
        ),
        (Some(2), Some(0))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every subcommand `--help` lists has an example in the README, and every `edge-agent` command
/// the README shows exists.
#[test]
fn the_readme_shows_every_command_and_only_real_ones() {
    help_readme::check(
        std::path::Path::new(env!("CARGO_BIN_EXE_edge-agent")),
        "edge-agent",
        &["queue"],
    );
}
